//! `gaia init`, `gaia start`, `gaia info` and `gaia config get|set`.
//!
//! `gaia start`: load the configuration (defaults < gaia.toml < `GAIA_<SECTION>_<KEY>` <
//! flags), make sure the models are in the store (pulling the defaults, verified by sha256),
//! load the chat model and the embedder, open the knowledge base (ingesting the demo documents
//! into an empty one when `knowledge.demo` is on), start the engine, bind, print
//! `gaia: listening on http://ADDR` as one line on stdout, and serve until SIGINT or SIGTERM.
//! Nodes with their own `--data-dir` and `--port` share nothing.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use gaia_inference::device::DeviceChoice;
use gaia_inference::generate::ChatModel;
use gaia_knowledge::KbOptions;
use gaia_protocol::SecretKey;
use gaia_protocol::keystore::{self, ScryptParams};

use gaia_protocol::ContentHash;
use gaia_protocol::advert::{Capabilities, Load};

use crate::agent::{self, AppState, LocalModels, NodeInfo};
use crate::api;
use crate::config::{self, Config};
use crate::embedder::NodeEmbedder;
use crate::engine::{Engine, EngineOptions};
use crate::models::{ModelKind, Store};
use crate::pay::accounts::Payments;
use crate::swarm::{self, SwarmHandle, SwarmParams};
use gaia_protocol::machine::membership::LocalService;

/// Where the voucher book lives in the data directory.
pub const PAYMENTS_DIR: &str = "payments";

/// The node key's file name in the data directory (keystore v3 JSON).
pub const KEY_FILE: &str = "node.key";
/// Where a generated key password is kept (mode 0600).
pub const PASSWORD_FILE: &str = "node.key.password";
/// The environment variable holding the key password.
pub const PASSWORD_ENV: &str = "GAIA_KEY_PASSWORD";

/// `gaia start`
#[derive(Debug, Args, Default)]
pub struct StartArgs {
    /// Listen address (overrides server.host).
    #[arg(long)]
    pub host: Option<String>,
    /// Listen port; 0 picks a free one (overrides server.port).
    #[arg(long)]
    pub port: Option<u16>,
    /// Any setting, as `section.key=value` (repeatable; wins over the file and environment).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Join a domain: the path of its signed manifest, or the name of a domain this node
    /// created (`gaia domain create NAME`) (sets swarm.domain).
    #[arg(long, value_name = "NAME_OR_MANIFEST")]
    pub domain: Option<String>,
    /// Run without models: only route chat completions to the domain (sets swarm.gateway).
    #[arg(long)]
    pub gateway: bool,
    /// A peer to join through, as a multiaddr ending in /p2p/<peer id> (repeatable; sets
    /// swarm.bootstrap).
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<String>,
    /// The peer-to-peer port on every interface, TCP and QUIC (UDP); 0 picks free ones (sets
    /// swarm.listen).
    #[arg(long, value_name = "PORT")]
    pub p2p_port: Option<u16>,
}

/// `gaia init`
#[derive(Debug, Args, Default)]
pub struct InitArgs {
    /// A file holding the node key's password (else $GAIA_KEY_PASSWORD, else a generated one
    /// kept in <data_dir>/node.key.password).
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Skip pulling the models and opening the knowledge base.
    #[arg(long)]
    pub no_models: bool,
    /// Use an existing key as the node key: a file holding a hex secp256k1 private key, or a
    /// keystore v3 JSON file encrypted with the node's password (--password-file or
    /// $GAIA_KEY_PASSWORD). It is stored encrypted as <data_dir>/node.key.
    #[arg(long, value_name = "FILE")]
    pub import_key: Option<PathBuf>,
    /// Move a GaiaNet node over: map its config.json onto gaia.toml (system and RAG prompts,
    /// RAG policy, qdrant_limit, qdrant_score_threshold, port), fetch its chat model, and list
    /// what could not be mapped.
    #[arg(long, value_name = "CONFIG_JSON")]
    pub from_gaianet: Option<PathBuf>,
}

/// `gaia config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective value of a key (`server.port`), or the whole configuration.
    Get {
        /// `section.key`; omitted: everything.
        key: Option<String>,
    },
    /// Set a key in <data_dir>/gaia.toml, keeping its comments.
    Set {
        /// `section.key`
        key: String,
        /// The value (lists comma-separated).
        value: String,
    },
    /// Print the config file's path.
    Path,
}

fn overrides(args: &StartArgs) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for kv in &args.set {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--set {kv:?}: expected section.key=value"))?;
        out.push((k.trim().to_string(), v.to_string()));
    }
    if let Some(host) = &args.host {
        out.push(("server.host".into(), host.clone()));
    }
    if let Some(port) = args.port {
        out.push(("server.port".into(), port.to_string()));
    }
    if let Some(domain) = &args.domain {
        out.push(("swarm.domain".into(), domain.clone()));
    }
    if args.gateway {
        out.push(("swarm.gateway".into(), "true".into()));
    }
    if !args.bootstrap.is_empty() {
        out.push(("swarm.bootstrap".into(), args.bootstrap.join(",")));
    }
    if let Some(port) = args.p2p_port {
        let listen = crate::swarm::SwarmConfig::default().with_port(port).listen;
        let quoted: Vec<String> = listen.iter().map(|a| format!("{a:?}")).collect();
        out.push(("swarm.listen".into(), format!("[{}]", quoted.join(", "))));
    }
    Ok(out)
}

/// Resolves `swarm.domain` given as a domain name (one this node created) to its manifest
/// file, and finds this node's certificate next to the manifest (`certs/<address>.bin`) when
/// `swarm.certificate` is not set.
fn resolve_domain(data_dir: &Path, config: &mut Config, address: &str) -> anyhow::Result<()> {
    let Some(domain) = config.swarm.domain.clone() else {
        return Ok(());
    };
    let manifest = if domain.is_file() {
        domain
    } else {
        let by_name = crate::domain_cli::manifest_path(data_dir, &domain.to_string_lossy())
            .with_context(|| {
                format!(
                    "swarm.domain {}: no such manifest file, nor a domain name",
                    domain.display()
                )
            })?;
        if !by_name.is_file() {
            bail!(
                "swarm.domain {}: no such manifest file, and this node created no domain of that \
                 name (gaia domain create); pass the manifest file the operator gave you",
                domain.display()
            );
        }
        by_name
    };
    if config.swarm.certificate.is_none()
        && let Some(dir) = manifest.parent()
    {
        let cert = dir.join("certs").join(format!("{address}.bin"));
        if cert.is_file() {
            config.swarm.certificate = Some(cert);
        }
    }
    config.swarm.domain = Some(manifest);
    Ok(())
}

/// The sha256 of a stored model's main file (`.gguf` or `.safetensors`).
fn model_digest(store: &Store, name: &str) -> String {
    store
        .get(name)
        .ok()
        .and_then(|m| {
            m.files
                .iter()
                .find(|f| f.name.ends_with(".gguf") || f.name.ends_with(".safetensors"))
                .map(|f| f.sha256.clone())
        })
        .unwrap_or_default()
}

/// The node's address from its key file, if there is one (no password needed).
pub fn node_address(data_dir: &Path) -> anyhow::Result<Option<String>> {
    let path = data_dir.join(KEY_FILE);
    let json = match std::fs::read_to_string(&path) {
        Ok(j) => j,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    Ok(keystore::address(&json)
        .with_context(|| format!("{} is not a keystore file", path.display()))?
        .map(|id| id.to_string()))
}

fn load_models(store: &Store, config: &Config) -> anyhow::Result<(ChatModel, NodeEmbedder)> {
    let m = &config.models;
    let path = crate::local::chat_model_path(store, &m.chat)?;
    let device = m
        .device
        .parse::<DeviceChoice>()?
        .resolve()
        .context("choosing the device (models.device)")?;
    let chat = ChatModel::load(&path, &device, usize::from(m.threads.max(1)))
        .with_context(|| format!("loading the chat model {}", path.display()))?;
    let embedder = crate::kb::load_embedder(store, &m.embedding, &m.device)?;
    Ok((chat, embedder))
}

fn open_knowledge(
    data_dir: &Path,
    config: &Config,
    embedder: &NodeEmbedder,
) -> anyhow::Result<Option<agent::rag::SharedKb>> {
    if !config.knowledge.enabled {
        return Ok(None);
    }
    let mut kb = crate::kb::open_kb(data_dir, embedder, KbOptions::default())?;
    if config.knowledge.demo && crate::kb::ensure_demo_kb(&mut kb)? {
        eprintln!("gaia: the knowledge base was empty; ingested the demo documents");
    }
    Ok(Some(Arc::new(RwLock::new(kb))))
}

/// What a node serving models loads: the engine, the embedder, the knowledge base.
type Loaded = (LocalModels, Option<agent::rag::SharedKb>);

/// Loads the models, starts the engine and opens the knowledge base.
fn load_local(data_dir: &Path, store: &Store, config: &Config) -> anyhow::Result<Loaded> {
    let (chat, embedder) = load_models(store, config)?;
    let kb = open_knowledge(data_dir, config, &embedder)?;
    let s = &config.server;
    let engine = Engine::start(
        chat,
        EngineOptions {
            workers: s.workers,
            batch_size: s.batch_size,
            queue_depth: s.queue_depth,
            timeout: Duration::from_secs(s.request_timeout_secs),
            prefix_cache_bytes: s.prefix_cache_mb.saturating_mul(1 << 20),
        },
    )
    .context("starting the inference threads")?;
    Ok((LocalModels { engine, embedder }, kb))
}

/// What this node offers its domain, for its adverts.
pub(crate) fn local_service(state: &AppState) -> Option<LocalService> {
    let local = state.local.as_ref()?;
    let config = &state.config;
    let model = local.engine.model();
    let kb_hash = state
        .kb
        .as_ref()
        .and_then(|kb| kb.read().ok().map(|kb| kb.info().hash));
    let prompt = &config.agent.system_prompt;
    Some(LocalService {
        model_name: config.models.chat.clone(),
        model_hash: state
            .info
            .chat_sha256
            .parse()
            .unwrap_or_else(|_| ContentHash::of(config.models.chat.as_bytes())),
        kb_hash,
        prompt_hash: (!prompt.is_empty()).then(|| ContentHash::of(prompt.as_bytes())),
        capabilities: Capabilities {
            tools: true,
            structured_output: model.constraints().is_ok(),
            context_length: u32::try_from(model.model().max_context()).unwrap_or(u32::MAX),
            max_tokens: u32::try_from(config.server.max_tokens).unwrap_or(u32::MAX),
        },
        load: advert_load(&state.load()),
        price: config.payments.prices(),
        addrs: Vec::new(),
    })
}

fn advert_load(load: &crate::engine::LoadFigures) -> Load {
    Load {
        in_flight: u32::try_from(load.in_flight).unwrap_or(u32::MAX),
        queued: u32::try_from(load.queued).unwrap_or(u32::MAX),
        tokens_per_s: load.tokens_per_second as f32,
    }
}

/// Tells the swarm about load changes (the router weighs this node by them; adverts carry
/// them at the next heartbeat).
async fn report_load(state: agent::Shared, handle: SwarmHandle) {
    let mut last = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let load = advert_load(&state.load());
        if last.as_ref() != Some(&load) {
            handle.set_load(load.clone());
            last = Some(load);
        }
    }
}

/// Where a node keeps the state of the domains it joined (newest manifest, revocations), one
/// directory per domain id.
pub const DOMAIN_STATE_DIR: &str = "domain-state";

/// Where the snapshots of the knowledge base this node seeds are written.
pub const CONTENT_DIR: &str = "content";

/// How often a running operator node looks for new certificate and revocation files.
const DOMAIN_FILES_SCAN: Duration = Duration::from_secs(2);
/// How often it publishes all of them again (for members that joined since).
const DOMAIN_FILES_REPUBLISH: Duration = Duration::from_secs(300);

/// On the operator's own node: publishes the certificates and revocations that `gaia domain
/// admit|revoke` write next to the manifest, new ones within [`DOMAIN_FILES_SCAN`], all of them
/// again every [`DOMAIN_FILES_REPUBLISH`].
async fn publish_domain_files(handle: SwarmHandle, manifest_path: PathBuf) {
    let manifest = match crate::domain_cli::read_manifest(&manifest_path) {
        Ok(manifest) => manifest.payload,
        Err(_) => return,
    };
    let mut published = std::collections::HashSet::new();
    let mut last_full = Instant::now();
    let mut manifest_version = manifest.version;
    let mut tick = tokio::time::interval(DOMAIN_FILES_SCAN);
    loop {
        tick.tick().await;
        // A new manifest version (gaia domain admit in an allow-list domain, ...).
        let path = manifest_path.clone();
        if let Ok(Ok(newer)) =
            tokio::task::spawn_blocking(move || crate::domain_cli::read_manifest(&path)).await
            && newer.payload.version > manifest_version
            && newer.payload.id() == manifest.id()
        {
            manifest_version = newer.payload.version;
            eprintln!(
                "gaia: publishing manifest version {manifest_version} of {}",
                manifest_path.display()
            );
            if handle.publish_manifest(newer).await.is_err() {
                return;
            }
        }
        if last_full.elapsed() >= DOMAIN_FILES_REPUBLISH {
            published.clear();
            last_full = Instant::now();
        }
        let (path, m) = (manifest_path.clone(), manifest.clone());
        let Ok(files) =
            tokio::task::spawn_blocking(move || crate::domain_cli::domain_files(&path, &m)).await
        else {
            continue;
        };
        for (path, modified, file) in files {
            if !published.insert((path.clone(), modified)) {
                continue;
            }
            let sent = match file {
                crate::domain_cli::DomainFile::Certificate(c) => {
                    handle.publish_certificate(c).await
                }
                crate::domain_cli::DomainFile::Revocation(r) => {
                    eprintln!("gaia: publishing the revocation {}", path.display());
                    handle.publish_revocation(r).await
                }
            };
            if sent.is_err() {
                return; // the swarm stopped
            }
        }
    }
}

/// Loads the node key, creating it first when the data directory has none.
fn node_key(data_dir: &Path) -> anyhow::Result<SecretKey> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    ensure_key(data_dir, &InitArgs::default())?;
    crate::domain_cli::load_key(data_dir, &crate::domain_cli::KeyArgs::default())
}

/// `gaia models pull --from-domain MANIFEST`: fetches what the domain requires from its
/// members, as `gaia start --domain MANIFEST` would before it loads, and nothing else.
pub fn pull_from_domain(data_dir: &Path, store: &Store, manifest: &Path) -> anyhow::Result<()> {
    let overrides = vec![(
        "swarm.domain".to_string(),
        manifest.to_string_lossy().into_owned(),
    )];
    let mut config = Config::load(data_dir, &overrides)?;
    config.swarm.gateway = false;
    let key = node_key(data_dir)?;
    resolve_domain(data_dir, &mut config, &key.node_id().to_string())?;
    let report =
        crate::content::join::ensure(data_dir, store, &mut config, &key, store.progress())?;
    if report.fetched.is_empty() {
        println!(
            "this node has what the domain requires (chat model {}); nothing to fetch",
            config.models.chat
        );
    }
    for fetched in &report.fetched {
        let d = &fetched.descriptor;
        println!(
            "{} {}: fetched {} from {} seeder(s) in {:.1} s",
            d.kind,
            d.name,
            crate::human_size(d.total_bytes()),
            fetched.per_seeder.len(),
            fetched.elapsed.as_secs_f64()
        );
    }
    Ok(())
}

/// `gaia start`
pub fn start(data_dir: &Path, store: &Store, args: &StartArgs) -> anyhow::Result<()> {
    let mut config = Config::load(data_dir, &overrides(args)?)?;
    let addr = format!("{}:{}", config.server.host, config.server.port);
    let key = if config.swarm.domain.is_some() {
        let key = node_key(data_dir)?;
        resolve_domain(data_dir, &mut config, &key.node_id().to_string())?;
        Some(key)
    } else {
        None
    };
    let payments = if config.payments.enabled() {
        let node_key = match &key {
            Some(key) => key.clone(),
            None => node_key(data_dir)?,
        };
        let payments = Payments::open(
            &config.payments,
            node_key,
            Some(&data_dir.join(PAYMENTS_DIR)),
        )
        .map_err(anyhow::Error::msg)?;
        eprintln!(
            "gaia: paid access keys on: escrow {} on chain {}, this node's price {}",
            payments.escrow().contract,
            config.payments.chain_id,
            config.payments.prices(),
        );
        Some(payments)
    } else {
        None
    };
    // A member that lacks the model or knowledge base its domain requires fetches them from
    // the members that hold them, before it loads anything.
    if let Some(key) = &key {
        crate::content::join::ensure(data_dir, store, &mut config, key, store.progress())
            .context("fetching what the domain requires from its members")?;
    }
    let (local, kb) = if config.swarm.gateway {
        (None, None)
    } else {
        let (local, kb) = load_local(data_dir, store, &config)?;
        (Some(local), kb)
    };
    let seeder = (!config.swarm.gateway).then(|| {
        let models = [&config.models.chat, &config.models.embedding]
            .into_iter()
            .filter_map(|name| crate::content::seed::ModelOffer::from_store(store, name))
            .collect();
        Arc::new(crate::content::seed::Seeder::new(
            config.content.clone(),
            data_dir.join(CONTENT_DIR),
            models,
            kb.clone(),
        ))
    });
    let info = NodeInfo {
        address: node_address(data_dir)?,
        data_dir: data_dir.to_path_buf(),
        chat_sha256: model_digest(store, &config.models.chat),
        embedding_sha256: model_digest(store, &config.models.embedding),
    };
    let mcp = crate::agent::mcp::McpHub::new(&config.mcp, &config.tools_policy, data_dir);
    let mut state = AppState {
        mcp,
        config,
        local,
        swarm: None,
        kb,
        payments,
        metrics: crate::metrics::Metrics::with_content(
            seeder.as_ref().map(|s| s.counters()).unwrap_or_default(),
        ),
        info,
        listen: OnceLock::new(),
        started: Instant::now(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("gaia-io")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        state.mcp.start();
        let Some(key) = key else {
            return serve(Arc::new(state), &addr).await;
        };
        let mut params =
            SwarmParams::from_config(key, state.config.swarm.clone(), local_service(&state))?;
        params.state_dir = Some(state.info.data_dir.join(DOMAIN_STATE_DIR));
        params.content = seeder.clone();
        if let Some(seeder) = seeder.filter(|s| s.config().seed) {
            tokio::spawn(async move {
                for described in seeder.prepare().await {
                    match described {
                        Ok(d) => {
                            let d = &d.descriptor;
                            eprintln!(
                                "gaia: seeding {} {} ({}, {} chunks) to the domain",
                                d.kind,
                                d.name,
                                crate::human_size(d.total_bytes()),
                                d.total_chunks()
                            );
                        }
                        Err(e) => eprintln!("gaia: not seeding: {e}"),
                    }
                }
            });
        }
        let (vouchers_in, vouchers) = tokio::sync::mpsc::channel(256);
        if let Some(payments) = &state.payments {
            params.vouchers = Some(vouchers_in);
            params.voucher_source = Some(Arc::clone(payments) as Arc<dyn swarm::VoucherSource>);
        }
        let running = swarm::spawn(params).await?;
        let sharing = state.payments.clone().map(|payments| {
            tokio::spawn(share_vouchers(payments, vouchers, running.handle.clone()))
        });
        let following = tokio::spawn(follow_terms(
            state.payments.clone(),
            state
                .local
                .is_some()
                .then(|| state.config.payments.prices()),
            running.handle.terms(),
        ));
        state.swarm = Some(running.handle.clone());
        let state = Arc::new(state);
        let serving = tokio::spawn(swarm::serve::serve_inbound(
            running.inbound,
            Arc::clone(&state),
        ));
        let reporting = tokio::spawn(report_load(Arc::clone(&state), running.handle.clone()));
        let operator = state.config.swarm.domain.as_ref().and_then(|path| {
            crate::domain_cli::read_manifest(path)
                .ok()
                .filter(|m| m.payload.operator == running.handle.node_id())
                .map(|_| path.clone())
        });
        let publishing =
            operator.map(|path| tokio::spawn(publish_domain_files(running.handle.clone(), path)));
        // Print the peer-to-peer addresses once the listeners are up (members bootstrap
        // through them). A listener on 0.0.0.0 reports one address per interface, one by one:
        // wait until the list stops growing.
        let mut status = running.handle.status().await?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = 0;
        while (status.listen_addrs.is_empty() || status.listen_addrs.len() != seen)
            && Instant::now() < deadline
        {
            seen = status.listen_addrs.len();
            tokio::time::sleep(Duration::from_millis(100)).await;
            status = running.handle.status().await?;
        }
        for addr in &status.listen_addrs {
            println!("gaia: peer-to-peer on {addr}/p2p/{}", status.peer_id);
        }
        let served = serve(Arc::clone(&state), &addr).await;
        reporting.abort();
        for task in publishing.into_iter().chain(sharing).chain([following]) {
            task.abort();
        }
        // Say goodbye to the domain (a last advert with `leaving`), then stop.
        if tokio::time::timeout(Duration::from_secs(5), running.handle.shutdown())
            .await
            .is_err()
        {
            eprintln!("gaia: the swarm did not stop within 5 s");
        }
        serving.abort();
        served
    })
}

/// Follows the domain's terms as newer manifests come: the ceiling of paid requests and the
/// escrow they must be paid through; says when this node (serving at `own` prices) asks more
/// than the domain lets paid requests pay.
async fn follow_terms(
    payments: Option<Arc<Payments>>,
    own: Option<gaia_protocol::payment::Price>,
    mut terms: tokio::sync::watch::Receiver<Option<swarm::DomainTerms>>,
) {
    loop {
        let current = *terms.borrow_and_update();
        if let Some(terms) = current {
            if let Some(payments) = &payments {
                payments.set_domain(terms.operator, terms.pricing);
            }
            if let (Some(own), Some(pricing)) = (own, terms.pricing) {
                if own.within(&pricing.price) {
                    eprintln!(
                        "gaia: the domain's price (manifest version {}): {}; operator share {} \
                         basis points",
                        terms.version, pricing.price, pricing.operator_share_bps
                    );
                } else {
                    eprintln!(
                        "gaia: this node asks {own}, above the domain's price {} (manifest \
                         version {}): no paid request will be routed to it; lower \
                         payments.price",
                        pricing.price, terms.version
                    );
                }
            }
        }
        if terms.changed().await.is_err() {
            return;
        }
    }
}

/// Tells the domain of this node's vouchers as it signs them, and takes those of other entry
/// nodes into account (so that an access key used at several entry nodes cannot spend its
/// deposit at each).
async fn share_vouchers(
    payments: Arc<Payments>,
    mut from_domain: tokio::sync::mpsc::Receiver<gaia_protocol::payment::VoucherShare>,
    swarm: SwarmHandle,
) {
    let learning = {
        let payments = Arc::clone(&payments);
        async move {
            while let Some(share) = from_domain.recv().await {
                let raised = payments.learn(&share.escrow, &share.vouchers);
                tracing::debug!(
                    vouchers = share.vouchers.len(),
                    raised,
                    "vouchers from another entry node"
                );
            }
        }
    };
    let telling = async {
        loop {
            let vouchers = payments.outgoing().await;
            let share = gaia_protocol::payment::VoucherShare {
                escrow: *payments.escrow(),
                vouchers,
            };
            if swarm.publish_vouchers(share).await.is_err() {
                return;
            }
            tokio::time::sleep(crate::pay::accounts::SHARE_EVERY).await;
        }
    };
    tokio::join!(learning, telling);
}

async fn serve(state: agent::Shared, addr: &str) -> anyhow::Result<()> {
    let every = state.config.payments.settle_secs;
    if let Some(payments) = state.payments.as_ref().filter(|_| every > 0) {
        tokio::spawn(crate::pay::accounts::settle_every(
            Arc::clone(payments),
            Duration::from_secs(every),
        ));
    }
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "cannot listen on {addr}: address already in use; choose another port with \
                 --port (0 picks a free one)"
            )
        } else {
            anyhow::anyhow!("cannot listen on {addr}: {e}")
        }
    })?;
    let local = listener.local_addr().context("reading the bound address")?;
    let _ = state.listen.set(local);
    println!("gaia: listening on http://{local}");
    std::io::stdout().flush().ok();
    let app = api::router(state);
    // With the caller's address: changing the knowledge base is for the node's own machine
    // when no keys are set (api/documents.rs).
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await
    .context("serving HTTP")?;
    eprintln!("gaia: stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    eprintln!("gaia: shutting down");
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut f = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn key_password(data_dir: &Path, args: &InitArgs) -> anyhow::Result<(String, Option<PathBuf>)> {
    if let Some(file) = &args.password_file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading the password file {}", file.display()))?;
        let pw = text.trim_end_matches(['\n', '\r']).to_string();
        if pw.is_empty() {
            bail!("the password file {} is empty", file.display());
        }
        return Ok((pw, None));
    }
    if let Ok(pw) = std::env::var(PASSWORD_ENV)
        && !pw.is_empty()
    {
        return Ok((pw, None));
    }
    let pw = hex::encode(rand::random::<[u8; 24]>());
    let path = data_dir.join(PASSWORD_FILE);
    write_private(&path, pw.as_bytes())?;
    Ok((pw, Some(path)))
}

/// Reads the key file given to `gaia init --import-key`: a hex private key, or a keystore v3
/// JSON encrypted with `password`.
fn import_key(path: &Path, password: &str) -> anyhow::Result<SecretKey> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading the key file {}", path.display()))?
        .len();
    if len > 64 * 1024 {
        bail!(
            "the key file {} is {len} bytes: expected a hex private key or a keystore v3 JSON",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the key file {}", path.display()))?;
    let text = text.trim();
    if text.starts_with('{') {
        return keystore::decrypt(text, password.as_bytes()).with_context(|| {
            format!(
                "cannot decrypt the keystore {} with the node's password (--password-file or \
                 {PASSWORD_ENV})",
                path.display()
            )
        });
    }
    SecretKey::from_hex(text).map_err(|e| {
        anyhow::anyhow!(
            "{} holds neither a keystore v3 JSON nor a hex secp256k1 private key: {e}",
            path.display()
        )
    })
}

/// Creates (or imports) the node key unless it exists; returns the address.
fn ensure_key(data_dir: &Path, args: &InitArgs) -> anyhow::Result<String> {
    if let Some(address) = node_address(data_dir)? {
        if args.import_key.is_some() {
            bail!(
                "{} exists already: move it away before importing another key",
                data_dir.join(KEY_FILE).display()
            );
        }
        println!("node key: {} (exists)", data_dir.join(KEY_FILE).display());
        return Ok(address);
    }
    let (password, generated) = key_password(data_dir, args)?;
    let key = match &args.import_key {
        Some(path) => import_key(path, &password)?,
        None => SecretKey::generate(),
    };
    let json = keystore::encrypt(&key, password.as_bytes(), ScryptParams::STANDARD)
        .context("encrypting the node key")?;
    write_private(&data_dir.join(KEY_FILE), json.as_bytes())?;
    let how = if args.import_key.is_some() {
        "imported"
    } else {
        "created"
    };
    println!("node key: {} ({how})", data_dir.join(KEY_FILE).display());
    if let Some(path) = generated {
        println!(
            "no password given ({PASSWORD_ENV} or --password-file): generated one and stored it \
             in {} (mode 0600); keep it safe",
            path.display()
        );
    }
    Ok(key.node_id().to_string())
}

/// `gaia init`
pub fn init(data_dir: &Path, store: &Store, args: &InitArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    let path = Config::path(data_dir);
    if path.exists() {
        println!("config: {} (exists, kept)", path.display());
    } else {
        config::write_atomic(&path, config::DEFAULT_TOML)?;
        println!("config: {} (created)", path.display());
    }
    if let Some(source) = &args.from_gaianet {
        from_gaianet(data_dir, store, source, args.no_models)?;
    }
    let config = Config::load(data_dir, &[])?;
    let address = ensure_key(data_dir, args)?;
    println!("address: {address}");
    if args.no_models {
        return Ok(());
    }
    for (name, outcome) in store.pull_defaults()? {
        let what = match outcome {
            crate::models::PullOutcome::UpToDate => "present and verified",
            crate::models::PullOutcome::Fetched(_) => "fetched and verified",
        };
        println!("model {name}: {what}");
    }
    let embedder =
        crate::kb::load_embedder(store, &config.models.embedding, &config.models.device)?;
    if let Some(kb) = open_knowledge(data_dir, &config, &embedder)? {
        let kb = kb
            .read()
            .map_err(|_| anyhow::anyhow!("knowledge base lock poisoned"))?;
        let info = kb.info();
        println!(
            "knowledge base: {} ({} documents, hash {})",
            info.dir.display(),
            info.documents,
            info.hash.to_hex()
        );
    }
    println!("ready: run `gaia start`");
    Ok(())
}

/// `gaia init --from-gaianet`: applies a GaiaNet config.json ([`crate::gaianet`]) to the
/// data directory's gaia.toml and model store, and says what it did and did not do.
fn from_gaianet(
    data_dir: &Path,
    store: &Store,
    source: &Path,
    no_models: bool,
) -> anyhow::Result<()> {
    let migration = crate::gaianet::read(source)?;
    println!("from GaiaNet {}:", source.display());
    for (key, value, from) in &migration.set {
        config::set(data_dir, key, value).with_context(|| format!("setting {key} from {from}"))?;
        println!("  mapped      {from} -> {key}");
    }
    for (kind, src, from, key) in &migration.pull {
        if no_models {
            println!(
                "  not fetched {from} ({src}): --no-models; later `gaia models pull {src}` and \
                 `gaia config set {key} NAME`"
            );
            continue;
        }
        match store.pull(src, None, *kind, None) {
            Ok(pulled) => {
                if let Some((name, _)) = pulled.first() {
                    config::set(data_dir, key, name)
                        .with_context(|| format!("setting {key} to the pulled model"))?;
                    println!("  fetched     {from} -> model {name} ({key})");
                }
            }
            Err(e) => println!(
                "  not fetched {from} ({src}): {e}; the node keeps its model; later `gaia models \
                 pull {src}` and `gaia config set {key} NAME`"
            ),
        }
    }
    for (field, why) in &migration.unmapped {
        println!("  not mapped  {field}: {why}");
    }
    Ok(())
}

/// `gaia info`
pub fn info(data_dir: &Path, store: &Store) -> anyhow::Result<()> {
    let config = Config::load(data_dir, &[])?;
    let address = node_address(data_dir)?.unwrap_or_else(|| "(no key: run `gaia init`)".into());
    println!("address:    {address}");
    if data_dir.join(KEY_FILE).exists() {
        let peer = crate::domain_cli::load_key(data_dir, &crate::domain_cli::KeyArgs::default())
            .and_then(|key| Ok(swarm::peer_id(&key)?.to_string()))
            .unwrap_or_else(|e| format!("(cannot unlock the key: {e:#})"));
        println!("peer id:    {peer}");
    }
    match &config.swarm.domain {
        Some(domain) => println!(
            "domain:     {}{}",
            domain.display(),
            if config.swarm.gateway {
                " (gateway)"
            } else {
                ""
            }
        ),
        None => println!("domain:     none (gaia start --domain NAME_OR_MANIFEST joins one)"),
    }
    println!("data dir:   {}", data_dir.display());
    println!(
        "listen:     http://{}:{}",
        config.server.host, config.server.port
    );
    for (label, name, kind) in [
        ("chat", &config.models.chat, ModelKind::Chat),
        ("embedding", &config.models.embedding, ModelKind::Embedding),
    ] {
        let digest = model_digest(store, name);
        let state = if digest.is_empty() {
            format!("not in the store ({kind}; `gaia models pull`)")
        } else {
            format!("sha256 {digest}")
        };
        println!("{:<11} {name} {state}", format!("{label}:"));
    }
    let kb = crate::kb::kb_dir(data_dir);
    let kb_line = if !config.knowledge.enabled {
        "disabled".to_string()
    } else if !kb.exists() {
        "not created yet".to_string()
    } else {
        match crate::kb::load_embedder(store, &config.models.embedding, &config.models.device)
            .and_then(|e| crate::kb::open_kb(data_dir, &e, KbOptions::default()))
        {
            Ok(kb) => {
                let i = kb.info();
                format!(
                    "hash {} ({} documents, {} chunks)",
                    i.hash.to_hex(),
                    i.documents,
                    i.chunks
                )
            }
            Err(e) => format!("unavailable ({e:#})"),
        }
    };
    println!("kb:         {kb_line}");
    println!("version:    gaia {}", env!("CARGO_PKG_VERSION"));
    Ok(())
}

/// `gaia config ...`
pub fn config_command(data_dir: &Path, cmd: &ConfigCommand) -> anyhow::Result<()> {
    match cmd {
        ConfigCommand::Get { key } => {
            let config = Config::load(data_dir, &[])?;
            println!("{}", config::get(&config, key.as_deref())?.trim_end());
        }
        ConfigCommand::Set { key, value } => {
            config::set(data_dir, key, value)?;
            println!("{key} = {value} (in {})", Config::path(data_dir).display());
        }
        ConfigCommand::Path => println!("{}", Config::path(data_dir).display()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_become_overrides() {
        let args = StartArgs {
            host: Some("0.0.0.0".into()),
            port: Some(0),
            set: vec!["agent.top_k=5".into()],
            ..StartArgs::default()
        };
        let o = overrides(&args).unwrap();
        assert_eq!(o[0], ("agent.top_k".to_string(), "5".to_string()));
        assert!(o.contains(&("server.port".to_string(), "0".to_string())));
        let bad = StartArgs {
            set: vec!["nokey".into()],
            ..StartArgs::default()
        };
        assert!(overrides(&bad).is_err());
    }

    #[test]
    fn init_creates_config_and_a_key_with_a_private_password() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), crate::models::Progress::Quiet);
        let args = InitArgs {
            no_models: true,
            ..InitArgs::default()
        };
        init(dir.path(), &store, &args).unwrap();
        let address = node_address(dir.path()).unwrap().unwrap();
        assert!(address.starts_with("0x"), "{address}");
        assert!(dir.path().join(config::FILE_NAME).exists());
        let pw_path = dir.path().join(PASSWORD_FILE);
        if std::env::var(PASSWORD_ENV).is_err() {
            let pw = std::fs::read_to_string(&pw_path).unwrap();
            let json = std::fs::read_to_string(dir.path().join(KEY_FILE)).unwrap();
            let key = keystore::decrypt(&json, pw.as_bytes()).unwrap();
            assert_eq!(key.node_id().to_string(), address);
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                let mode = std::fs::metadata(&pw_path).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600);
            }
        }
        // A second init keeps the key.
        init(dir.path(), &store, &args).unwrap();
        assert_eq!(node_address(dir.path()).unwrap().unwrap(), address);
    }

    #[test]
    fn a_domain_name_resolves_to_its_manifest_and_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let domain = dir.path().join("domains").join("my-agent");
        std::fs::create_dir_all(domain.join("certs")).unwrap();
        std::fs::write(domain.join("manifest.bin"), b"m").unwrap();
        std::fs::write(domain.join("certs").join("0xabc.bin"), b"c").unwrap();
        let mut config = Config::default();
        config.swarm.domain = Some("my-agent".into());
        resolve_domain(dir.path(), &mut config, "0xabc").unwrap();
        assert_eq!(config.swarm.domain, Some(domain.join("manifest.bin")));
        assert_eq!(
            config.swarm.certificate,
            Some(domain.join("certs").join("0xabc.bin"))
        );
        // A manifest path is kept; no certificate is invented for another address.
        let mut config = Config::default();
        config.swarm.domain = Some(domain.join("manifest.bin"));
        resolve_domain(dir.path(), &mut config, "0xdef").unwrap();
        assert_eq!(config.swarm.certificate, None);
        // Neither a file nor a known name: a clear error.
        config.swarm.domain = Some("unknown".into());
        let err = resolve_domain(dir.path(), &mut config, "0xabc").unwrap_err();
        assert!(format!("{err:#}").contains("no such manifest"), "{err:#}");
    }

    #[test]
    fn domain_flags_become_swarm_settings() {
        let args = StartArgs {
            domain: Some("my-agent".into()),
            gateway: true,
            bootstrap: vec!["/ip4/127.0.0.1/tcp/1".into(), "/ip4/127.0.0.1/tcp/2".into()],
            p2p_port: Some(0),
            ..StartArgs::default()
        };
        let o = overrides(&args).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = Config::from_layers(toml::Table::new(), &[], &o, dir.path()).unwrap();
        assert_eq!(config.swarm.domain, Some("my-agent".into()));
        assert!(config.swarm.gateway);
        assert_eq!(config.swarm.bootstrap.len(), 2);
        assert!(
            config
                .swarm
                .listen
                .iter()
                .all(|a| a.ends_with("/tcp/0") || a.contains("/udp/0/")),
            "{:?}",
            config.swarm.listen
        );
        // A gateway needs a domain.
        let lone = StartArgs {
            gateway: true,
            ..StartArgs::default()
        };
        let err = Config::from_layers(
            toml::Table::new(),
            &[],
            &overrides(&lone).unwrap(),
            dir.path(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("swarm.gateway"), "{err}");
    }

    #[test]
    fn init_imports_a_hex_key_and_refuses_garbage() {
        let key = SecretKey::generate();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key.hex");
        std::fs::write(&file, format!("0x{}\n", hex::encode(*key.to_bytes()))).unwrap();
        let node = dir.path().join("node");
        let store = Store::new(&node, crate::models::Progress::Quiet);
        let args = InitArgs {
            no_models: true,
            import_key: Some(file.clone()),
            ..InitArgs::default()
        };
        init(&node, &store, &args).unwrap();
        assert_eq!(
            node_address(&node).unwrap().unwrap(),
            key.node_id().to_string()
        );
        // Importing over an existing key is refused; so is a file that holds no key.
        assert!(init(&node, &store, &args).is_err());
        std::fs::write(&file, "not a key").unwrap();
        let other = dir.path().join("other");
        let err = init(&other, &store, &args).unwrap_err();
        assert!(format!("{err:#}").contains("neither"), "{err:#}");
    }
}
