//! The seeder: hands the content this node advertises to members of its domain.
//!
//! A content stream is served request by request, in order: the first must be a `Describe`
//! (which carries the fetcher's certificate and is authorised like a chat request), and
//! `Chunk` requests are answered from the files that descriptor lists, read at their offset.
//! Only what this node advertises is ever described: its chat model, its embedding model and
//! its knowledge base's current snapshot (exported on first demand under
//! `<data dir>/content/`); no other path can be named, as chunks are asked by file index.
//! Limits: `content.max_uploads` streams at once (`content.max_uploads_per_peer` per peer),
//! `content.upload_bytes_per_s` for all of them together and `upload_bytes_per_s_per_peer` for
//! each peer's; a stream that idles is closed.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{AsyncRead, AsyncWrite, AsyncWriteExt};
use gaia_protocol::content::{
    CHUNK_SIZE, ContentDescriptor, ContentFile, ContentKind, ContentRequest, ContentResponse,
    Refusal,
};
use gaia_protocol::domain::MembershipCertificate;
use gaia_protocol::{ContentHash, NodeId, Signed};
use libp2p::PeerId;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::{ContentConfig, RateLimit, read_request, write_body};
use crate::agent::rag::SharedKb;
use crate::models::{ModelKind, Store};

/// How long a fetcher may take to send its first request.
const FIRST_REQUEST: Duration = Duration::from_secs(15);
/// How long a stream about to be refused may take to send its first request.
const REFUSAL_WAIT: Duration = Duration::from_secs(5);
/// How long a stream may idle between two requests.
const IDLE: Duration = Duration::from_secs(60);

/// Who may fetch, and who gets penalised: the swarm (its membership and guard) in a node, a
/// stand-in in unit tests.
pub trait Gate: Send + Sync {
    /// Whether `peer` (with the certificate it sent) may fetch: a member of the domain.
    fn authorize(
        &self,
        peer: PeerId,
        certificate: Option<Signed<MembershipCertificate>>,
    ) -> BoxFuture<'_, Result<NodeId, String>>;
    /// `peer` broke the protocol.
    fn penalise(&self, peer: PeerId, reason: String);
}

/// A model this node can seed: its store name, its main file's hash and its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelOffer {
    /// The main file's sha256 (the hash adverts and manifests name).
    pub hash: ContentHash,
    /// Chat or embedding.
    pub kind: ContentKind,
    /// The store name.
    pub name: String,
    /// The model's directory.
    pub dir: PathBuf,
    /// Its files (name, size, sha256 as the store's manifest records them).
    pub files: Vec<(String, u64, String)>,
}

impl ModelOffer {
    /// The offer of the stored model `name`, when it is in the store and has a main file
    /// (`.gguf` for chat, `.safetensors` for embedding).
    pub fn from_store(store: &Store, name: &str) -> Option<ModelOffer> {
        let manifest = store.get(name).ok()?;
        let (kind, ext) = match manifest.kind {
            ModelKind::Chat => (ContentKind::ChatModel, ".gguf"),
            ModelKind::Embedding => (ContentKind::EmbeddingModel, ".safetensors"),
        };
        let main = manifest.files.iter().find(|f| f.name.ends_with(ext))?;
        Some(ModelOffer {
            hash: main.sha256.parse().ok()?,
            kind,
            name: manifest.name.clone(),
            dir: store.model_dir(name),
            files: manifest
                .files
                .iter()
                .map(|f| (f.name.clone(), f.size, f.sha256.clone()))
                .collect(),
        })
    }
}

/// A described piece of content and where its files are.
#[derive(Debug)]
pub struct Described {
    /// What the fetcher gets.
    pub descriptor: ContentDescriptor,
    /// The file behind each of the descriptor's files.
    pub paths: Vec<PathBuf>,
}

/// The content a stream described last, and its files once opened.
type Serving = (Arc<Described>, Vec<Option<Arc<File>>>);

/// What this node seeds, and its upload limits.
pub struct Seeder {
    config: ContentConfig,
    archive_dir: PathBuf,
    models: Vec<ModelOffer>,
    kb: Option<SharedKb>,
    described: tokio::sync::Mutex<HashMap<ContentHash, Arc<Described>>>,
    limit: RateLimit,
    uploads: Arc<Semaphore>,
    per_peer: Mutex<HashMap<PeerId, (usize, Arc<RateLimit>)>>,
    counters: Arc<SeedCounters>,
}

/// What a node has seeded since it started (`GET /metrics`).
#[derive(Debug, Default)]
pub struct SeedCounters {
    /// Descriptions sent (a fetcher starting on a model or a knowledge base).
    pub descriptions: AtomicU64,
    /// Streams refused or cut: over a limit, not a member, content this node does not seed or
    /// cannot read.
    pub refused: AtomicU64,
    /// Chunks sent.
    pub chunks: AtomicU64,
    /// Bytes of content sent.
    pub bytes: AtomicU64,
}

impl SeedCounters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Seeder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seeder")
            .field("config", &self.config)
            .field("models", &self.models)
            .finish_non_exhaustive()
    }
}

impl Seeder {
    /// A seeder of `models` and the knowledge base `kb` (its snapshots are written under
    /// `archive_dir`), within `config`'s limits.
    pub fn new(
        config: ContentConfig,
        archive_dir: PathBuf,
        models: Vec<ModelOffer>,
        kb: Option<SharedKb>,
    ) -> Self {
        Self {
            limit: RateLimit::new(config.upload_bytes_per_s),
            uploads: Arc::new(Semaphore::new(config.max_uploads)),
            config,
            archive_dir,
            models,
            kb,
            described: tokio::sync::Mutex::new(HashMap::new()),
            per_peer: Mutex::new(HashMap::new()),
            counters: Arc::default(),
        }
    }

    /// This seeder's counters, for the node's metrics.
    pub fn counters(&self) -> Arc<SeedCounters> {
        Arc::clone(&self.counters)
    }

    /// The configuration.
    pub fn config(&self) -> &ContentConfig {
        &self.config
    }

    fn share_key(kind: ContentKind) -> &'static str {
        match kind {
            ContentKind::ChatModel => "chat",
            ContentKind::EmbeddingModel => "embedding",
            ContentKind::KnowledgeBase => "kb",
        }
    }

    /// The knowledge base's current hash, when it is shared.
    fn current_kb(&self) -> Option<(ContentHash, SharedKb)> {
        let kb = self.kb.as_ref().filter(|_| self.config.shares("kb"))?;
        let hash = kb.read().ok()?.info().hash;
        Some((hash, Arc::clone(kb)))
    }

    /// Describes `hash` when this node seeds it: `Ok(None)` when it does not (not advertised,
    /// or not shared), `Err` when it should but cannot (a file changed on disk).
    pub async fn describe(&self, hash: &ContentHash) -> Result<Option<Arc<Described>>, String> {
        let model = self
            .models
            .iter()
            .find(|m| m.hash == *hash && self.config.shares(Self::share_key(m.kind)))
            .cloned();
        let kb = self.current_kb().filter(|(h, _)| h == hash);
        if model.is_none() && kb.is_none() {
            return Ok(None);
        }
        // One description at a time: the first request for a model hashes it, the others wait
        // for that and take it from the cache.
        let mut described = self.described.lock().await;
        if let Some(found) = described.get(hash) {
            return Ok(Some(Arc::clone(found)));
        }
        let hash = *hash;
        let archive_dir = self.archive_dir.clone();
        let made = tokio::task::spawn_blocking(move || match (model, kb) {
            (Some(model), _) => describe_model(&model),
            (None, Some((_, kb))) => describe_kb(&kb, &hash, &archive_dir),
            (None, None) => Err("nothing to describe".to_string()),
        })
        .await
        .map_err(|e| format!("describing the content failed: {e}"))??;
        let made = Arc::new(made);
        // Snapshots of older KB versions are no longer served.
        described.retain(|_, d| d.descriptor.kind != ContentKind::KnowledgeBase);
        described.insert(hash, Arc::clone(&made));
        Ok(Some(made))
    }

    /// Describes everything this node seeds now, so the first fetcher does not wait for the
    /// hashing; returns what it describes.
    pub async fn prepare(&self) -> Vec<Result<Arc<Described>, String>> {
        let mut hashes: Vec<ContentHash> = self
            .models
            .iter()
            .filter(|m| self.config.shares(Self::share_key(m.kind)))
            .map(|m| m.hash)
            .collect();
        hashes.extend(self.current_kb().map(|(h, _)| h));
        let mut out = Vec::new();
        for hash in hashes {
            match self.describe(&hash).await {
                Ok(Some(d)) => out.push(Ok(d)),
                Ok(None) => {}
                Err(e) => out.push(Err(e)),
            }
        }
        out
    }

    fn refused(&self) {
        SeedCounters::add(&self.counters.refused, 1);
    }

    /// Counts a refusal and answers the request in hand with it (not retryable).
    async fn refuse<S: AsyncWrite + Unpin>(&self, stream: &mut S, reason: String) {
        self.refused();
        let _ = send(stream, &refusal(false, reason)).await;
    }

    /// Serves one content stream from `peer` to its end.
    pub async fn serve<S>(self: Arc<Self>, gate: &dyn Gate, peer: PeerId, mut stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if !self.config.seed {
            self.refused();
            refuse_first(&mut stream, false, "this node does not seed content".into()).await;
            return;
        }
        let Ok(permit) = Arc::clone(&self.uploads).try_acquire_owned() else {
            let why = format!(
                "this node serves {} fetchers at once; ask another seeder or retry later",
                self.config.max_uploads
            );
            self.refused();
            refuse_first(&mut stream, true, why).await;
            return;
        };
        let slot = PeerSlot::take(
            &self.per_peer,
            peer,
            self.config.max_uploads_per_peer,
            self.config.upload_bytes_per_s_per_peer,
        );
        let slot = match slot {
            Some(slot) => slot,
            None => {
                let why = format!(
                    "at most {} streams per peer",
                    self.config.max_uploads_per_peer
                );
                // The node-wide slot goes back before the refusal is sent: a fetcher that reads
                // it may open its next stream at once.
                drop(permit);
                self.refused();
                refuse_first(&mut stream, true, why).await;
                return;
            }
        };
        let _permit = permit;
        let mut current: Option<Serving> = None;
        let mut first = true;
        loop {
            let wait = if first { FIRST_REQUEST } else { IDLE };
            let request = match tokio::time::timeout(wait, read_request(&mut stream)).await {
                Err(_) | Ok(Ok(None)) => return,
                Ok(Err(error)) => {
                    gate.penalise(peer, format!("malformed content request: {error}"));
                    return;
                }
                Ok(Ok(Some(request))) => request,
            };
            let response = match request {
                ContentRequest::Describe { hash, certificate } => {
                    if first && let Err(reason) = gate.authorize(peer, certificate).await {
                        tracing::info!(%peer, %reason, "refused a content fetch");
                        self.refuse(&mut stream, reason).await;
                        return;
                    }
                    first = false;
                    match self.describe(&hash).await {
                        Ok(Some(described)) => {
                            let files = vec![None; described.paths.len()];
                            let response =
                                ContentResponse::Descriptor(described.descriptor.clone());
                            current = Some((described, files));
                            response
                        }
                        Ok(None) => {
                            let why = format!("this node does not seed {hash}");
                            self.refuse(&mut stream, why).await;
                            return;
                        }
                        Err(why) => {
                            self.refuse(&mut stream, why).await;
                            return;
                        }
                    }
                }
                ContentRequest::Chunk { hash, file, index } => {
                    let Some((described, files)) =
                        current.as_mut().filter(|(d, _)| d.descriptor.hash == hash)
                    else {
                        gate.penalise(peer, "asked a chunk of content it did not describe".into());
                        return;
                    };
                    let file = usize::from(file);
                    let range = described
                        .descriptor
                        .files
                        .get(file)
                        .and_then(|f| f.chunk_range(CHUNK_SIZE, index));
                    let Some((offset, len)) = range else {
                        gate.penalise(peer, "asked a chunk beyond the content".into());
                        return;
                    };
                    let handle = match &files[file] {
                        Some(handle) => Arc::clone(handle),
                        None => match File::open(&described.paths[file]) {
                            Ok(opened) => {
                                let opened = Arc::new(opened);
                                files[file] = Some(Arc::clone(&opened));
                                opened
                            }
                            Err(e) => {
                                let why = format!("cannot read the content: {e}");
                                self.refuse(&mut stream, why).await;
                                return;
                            }
                        },
                    };
                    let read = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; len];
                        handle.read_exact_at(&mut buf, offset).map(|()| buf)
                    })
                    .await;
                    match read {
                        Ok(Ok(bytes)) => {
                            slot.limit.take(bytes.len()).await;
                            self.limit.take(bytes.len()).await;
                            ContentResponse::Chunk(bytes)
                        }
                        _ => {
                            let why = "cannot read the content: the file changed".to_string();
                            self.refuse(&mut stream, why).await;
                            return;
                        }
                    }
                }
            };
            let counted = match &response {
                ContentResponse::Chunk(bytes) => Some(bytes.len() as u64),
                _ => None,
            };
            if send(&mut stream, &response).await.is_err() {
                return;
            }
            match counted {
                Some(bytes) => {
                    SeedCounters::add(&self.counters.chunks, 1);
                    SeedCounters::add(&self.counters.bytes, bytes);
                }
                None => SeedCounters::add(&self.counters.descriptions, 1),
            }
        }
    }
}

/// Answers a content stream of a node that seeds nothing.
pub async fn refuse_all<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    refuse_first(&mut stream, false, "this node seeds no content".into()).await;
}

/// Refuses a stream before serving anything: reads the fetcher's first request (briefly, and
/// whatever it is) so that the refusal answers it, then says why and closes. Answering before
/// the request arrives would race the fetcher's write against the close, and the fetcher could
/// see a broken pipe instead of the reason.
async fn refuse_first<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    retry: bool,
    reason: String,
) {
    let _ = tokio::time::timeout(REFUSAL_WAIT, read_request(stream)).await;
    let _ = send(stream, &refusal(retry, reason)).await;
    let _ = stream.close().await;
}

/// A refusal with its reason (at most 400 characters).
fn refusal(retry: bool, reason: String) -> ContentResponse {
    ContentResponse::Refused(Refusal {
        retry,
        reason: reason.chars().take(400).collect(),
    })
}

/// Writes and flushes one response.
async fn send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    response: &ContentResponse,
) -> std::io::Result<()> {
    let body = response
        .encode()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    write_body(stream, &body).await?;
    stream.flush().await
}

/// One of a peer's streams, with the peer's own upload limit; released on drop.
struct PeerSlot<'a> {
    map: &'a Mutex<HashMap<PeerId, (usize, Arc<RateLimit>)>>,
    peer: PeerId,
    limit: Arc<RateLimit>,
}

impl<'a> PeerSlot<'a> {
    fn take(
        map: &'a Mutex<HashMap<PeerId, (usize, Arc<RateLimit>)>>,
        peer: PeerId,
        max: usize,
        bytes_per_s: u64,
    ) -> Option<Self> {
        let mut slots = map.lock().unwrap_or_else(|p| p.into_inner());
        let (count, limit) = slots
            .entry(peer)
            .or_insert_with(|| (0, Arc::new(RateLimit::new(bytes_per_s))));
        if *count >= max {
            return None;
        }
        *count += 1;
        let limit = Arc::clone(limit);
        Some(Self { map, peer, limit })
    }
}

impl Drop for PeerSlot<'_> {
    fn drop(&mut self) {
        let mut slots = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((count, _)) = slots.get_mut(&self.peer) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                slots.remove(&self.peer);
            }
        }
    }
}

/// The file's chunk digests and whole sha256, in one pass.
pub fn digest_file(path: &Path) -> std::io::Result<(u64, ContentHash, Vec<ContentHash>)> {
    let mut file = File::open(path)?;
    let mut whole = Sha256::new();
    let mut chunks = Vec::new();
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    let mut size = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = file.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        whole.update(&buf[..filled]);
        chunks.push(ContentHash::of(&buf[..filled]));
        size += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    Ok((size, ContentHash(whole.finalize().into()), chunks))
}

fn describe_files(
    hash: ContentHash,
    kind: ContentKind,
    name: &str,
    files: &[(String, PathBuf)],
) -> Result<Described, String> {
    let mut out = Vec::new();
    let mut paths = Vec::new();
    for (file_name, path) in files {
        let (size, sha256, chunks) =
            digest_file(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        out.push(ContentFile {
            name: file_name.clone(),
            size,
            sha256,
            chunks,
        });
        paths.push(path.clone());
    }
    let descriptor = ContentDescriptor {
        hash,
        kind,
        name: name.to_string(),
        chunk_size: CHUNK_SIZE,
        files: out,
    };
    gaia_protocol::Validate::validate(&descriptor)
        .map_err(|e| format!("this node cannot describe {name}: {e}"))?;
    Ok(Described { descriptor, paths })
}

fn describe_model(model: &ModelOffer) -> Result<Described, String> {
    let files: Vec<(String, PathBuf)> = model
        .files
        .iter()
        .map(|(name, _, _)| (name.clone(), model.dir.join(name)))
        .collect();
    let described = describe_files(model.hash, model.kind, &model.name, &files)?;
    // What is served must be what the store verified: a file changed on disk is not seeded.
    for (file, (name, size, sha256)) in described.descriptor.files.iter().zip(&model.files) {
        if file.size != *size || file.sha256.to_hex() != *sha256 {
            return Err(format!(
                "{name} of model {} changed on disk since it was pulled; it is not seeded \
                 (pull the model again)",
                model.name
            ));
        }
    }
    Ok(described)
}

fn describe_kb(kb: &SharedKb, hash: &ContentHash, dir: &Path) -> Result<Described, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let name = format!("kb-{}.tar", hash.to_hex());
    let path = dir.join(&name);
    if !path.is_file() {
        let kb = kb
            .read()
            .map_err(|_| "the knowledge base is unavailable".to_string())?;
        if kb.info().hash != *hash {
            return Err("the knowledge base changed; ask again".into());
        }
        kb.export_snapshot(&path)
            .map_err(|e| format!("exporting the knowledge base: {e}"))?;
    }
    // Older snapshots are not served any more.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let other = entry.file_name().to_string_lossy().into_owned();
            if other.starts_with("kb-") && other.ends_with(".tar") && other != name {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    describe_files(*hash, ContentKind::KnowledgeBase, "kb", &[(name, path)])
}
