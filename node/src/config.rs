//! The node's configuration: `<data_dir>/gaia.toml`.
//!
//! Layers, later ones win: built-in defaults < the file < environment variables
//! `GAIA_<SECTION>_<KEY>` (for example `GAIA_SERVER_PORT=9000`, `GAIA_MODELS_THREADS=4`;
//! list values such as `GAIA_SERVER_API_KEYS` are comma-separated) < command-line flags
//! (`gaia start --port`, `--host`, `--set section.key=value`). Unknown keys are errors that
//! name the key path. [`DEFAULT_TOML`] is the commented file `gaia init` writes; every key
//! is listed there with its default.
//!
//! Sections:
//! - `[server]` `host`, `port` (0 picks a free port), `api_keys` (empty: open), `max_body_bytes`,
//!   `max_tokens` (cap per request), `max_n`, `queue_depth` (waiting generations before 429),
//!   `workers` (generations run at once), `request_timeout_secs`, `max_embedding_inputs`.
//! - `[models]` `chat`, `embedding` (names in the model store), `device`, `threads`.
//! - `[agent]` `system_prompt`, `rag_prompt` (`{context}` is replaced by the retrieved chunks),
//!   `rag_policy` (`system` or `last-user`), `retrieval` (`hybrid`, `vector` or `keyword`),
//!   `top_k`, `score_threshold`, `max_tool_rounds`, and the sampling a request gets for the
//!   fields it omits: `temperature`, `top_p`, `repetition_penalty`, `max_tokens`.
//! - `[knowledge]` `enabled`, `demo` (ingest the built-in demo documents into an empty base).
//! - `[tools_policy]` `allow_hosts`: hosts node-executed tools may reach even though they are
//!   private, loopback or link-local (plain `http` is also allowed for them only).
//! - `[[tools]]` `name`, `description`, `url` (https), `parameters` (JSON schema as a TOML
//!   table), `timeout_secs`, `max_response_bytes`: tools the node executes itself.
//! - `[[mcp]]` `name`, `command` (stdio) or `url` (streamable HTTP) with `bearer_token`, `env`,
//!   `tools` (allow-list), `prefix`, `timeout_secs`, `max_response_bytes`: MCP servers whose
//!   tools the node executes ([`crate::agent::mcp`]).
//! - `[swarm]` `listen`, `bootstrap`, `domain` (a manifest file), `certificate`, `gateway`,
//!   `heartbeat_ms`, `external_addrs`, `relay_server`, `relay_client`, `hole_punching`, `mdns`,
//!   `prefix_affinity`, and
//!   `[swarm.limits]`: the peer-to-peer side
//!   ([`crate::swarm::SwarmConfig`]). `gaia start --domain`, `--gateway`, `--bootstrap` and
//!   `--p2p-port` set them.
//! - `[content]` `seed`, `share` (`chat`, `embedding`, `kb`), `upload_bytes_per_s`,
//!   `upload_bytes_per_s_per_peer`, `max_uploads`, `max_uploads_per_peer`: what the node hands to members fetching its model
//!   and knowledge base by hash ([`crate::content`]).
//! - `[payments]` `price` (or `prompt_price` and `completion_price`), `max_price` (per 1000
//!   tokens), `rpc_url`, `chain_id`, `contract`, `settle_secs`:
//!   the node's prices, and paid access keys checked against the domain's escrow
//!   ([`crate::pay::accounts`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use gaia_protocol::payment::Price;
use serde::{Deserialize, Serialize};

/// The config file's name inside the data directory.
pub const FILE_NAME: &str = "gaia.toml";

/// Everything that can go wrong loading or editing the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or written.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{path} is not valid TOML: {detail}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        detail: String,
    },
    /// A key has a wrong type or is unknown.
    #[error("invalid configuration at `{key}`: {detail} (from {origin})")]
    Invalid {
        /// The key path, e.g. `server.port`.
        key: String,
        /// What is wrong.
        detail: String,
        /// Where the value came from (file, environment, flag).
        origin: String,
    },
    /// A key given to `config get|set` or `--set` does not exist.
    #[error("unknown configuration key `{0}`: run `gaia config get` to list the keys")]
    UnknownKey(String),
}

fn invalid(key: impl Into<String>, detail: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        detail: detail.into(),
        origin: "the merged configuration".into(),
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The HTTP server.
    pub server: ServerConfig,
    /// Which models to serve.
    pub models: ModelsConfig,
    /// Prompts, retrieval and tool rounds.
    pub agent: AgentConfig,
    /// The knowledge base.
    pub knowledge: KnowledgeConfig,
    /// Limits on node-executed tools.
    pub tools_policy: ToolsPolicy,
    /// The peer-to-peer network: listen addresses, the domain, gateway mode.
    pub swarm: crate::swarm::SwarmConfig,
    /// What this node seeds to members that fetch its model and knowledge base by hash.
    pub content: crate::content::ContentConfig,
    /// Prices, and paid access keys checked against the domain's escrow contract.
    pub payments: PaymentsConfig,
    /// Node-executed tools (kept last: arrays of tables).
    pub tools: Vec<ToolConfig>,
    /// MCP servers whose tools the node offers to the model and executes.
    pub mcp: Vec<McpConfig>,
}

/// `[server]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address. Default `127.0.0.1`.
    pub host: String,
    /// Listen port; 0 picks a free one. Default 8080.
    pub port: u16,
    /// Bearer keys accepted on every route but `/health`; empty leaves the API open.
    pub api_keys: Vec<String>,
    /// Largest request body. Default 4 MiB.
    pub max_body_bytes: usize,
    /// Largest `max_tokens` a request may ask for (and the default). Default 2048.
    pub max_tokens: usize,
    /// Largest `n`. Default 4.
    pub max_n: usize,
    /// Generations waiting for a worker before requests get 429. Default 16.
    pub queue_depth: usize,
    /// Batch worker threads. Default 1.
    pub workers: usize,
    /// Generations each worker decodes together (continuous batching). Default 16.
    pub batch_size: usize,
    /// MiB of finished generations' KV state kept for later prompts that start the same way
    /// (a chat's next turn, a shared system prompt); 0 turns the prefix cache off. Default 256.
    pub prefix_cache_mb: usize,
    /// Longest a generation may run before it is cut (finish reason `length`). Default 300.
    pub request_timeout_secs: u64,
    /// Most inputs per `/v1/embeddings` request. Default 256.
    pub max_embedding_inputs: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            api_keys: Vec::new(),
            max_body_bytes: 4 << 20,
            max_tokens: 2048,
            max_n: 4,
            queue_depth: 16,
            workers: 1,
            batch_size: 16,
            prefix_cache_mb: 256,
            request_timeout_secs: 300,
            max_embedding_inputs: 256,
        }
    }
}

/// `[models]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsConfig {
    /// The chat model's name in the store. Default `smollm2-135m-instruct`.
    pub chat: String,
    /// The embedding model's name in the store. Default `all-minilm-l6-v2`.
    pub embedding: String,
    /// `auto`, `cpu`, `wgpu` or `cuda`. Default `auto`.
    pub device: String,
    /// CPU threads per generation. Default 2.
    pub threads: u16,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        ModelsConfig {
            chat: crate::models::DEFAULT_CHAT.name.into(),
            embedding: crate::models::DEFAULT_EMBEDDING.name.into(),
            device: "auto".into(),
            threads: 2,
        }
    }
}

/// Where retrieved context goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RagPolicy {
    /// A system message after the system prompt.
    System,
    /// Prepended to the last user message.
    LastUser,
}

/// How the agent retrieves context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Retrieval {
    /// Embedding similarity and BM25 keywords, fused by rank.
    Hybrid,
    /// Embedding similarity only.
    Vector,
    /// BM25 keywords only.
    Keyword,
}

impl Retrieval {
    /// The knowledge base's search mode.
    pub fn mode(self) -> gaia_knowledge::SearchMode {
        match self {
            Retrieval::Hybrid => gaia_knowledge::SearchMode::Hybrid,
            Retrieval::Vector => gaia_knowledge::SearchMode::Vector,
            Retrieval::Keyword => gaia_knowledge::SearchMode::Keyword,
        }
    }
}

/// `[agent]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Sent as the system message when a request has none; empty sends nothing.
    pub system_prompt: String,
    /// Wraps retrieved chunks; `{context}` is replaced by them.
    pub rag_prompt: String,
    /// `system` or `last-user`. Default `system`.
    pub rag_policy: RagPolicy,
    /// How context is retrieved. Default `hybrid`: exact terms (commands, names, error codes)
    /// that an embedding blurs still find their passage.
    pub retrieval: Retrieval,
    /// Chunks retrieved per question. Default 3.
    pub top_k: usize,
    /// Smallest cosine similarity of a chunk used as context (in `hybrid`, a chunk its
    /// keywords found needs half of it). Default 0.35.
    pub score_threshold: f32,
    /// Rounds of node-executed tool calls per request. Default 3.
    pub max_tool_rounds: usize,
    /// Temperature of a request that gives none. Default 0.3.
    pub temperature: f32,
    /// Nucleus `top_p` of a request that gives none. Default 0.9.
    pub top_p: f32,
    /// Repetition penalty of a request that gives none (1 is off). Default 1.1.
    pub repetition_penalty: f32,
    /// Answer length of a request that gives no `max_tokens`, at most `server.max_tokens`.
    /// Default 512.
    pub max_tokens: usize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            system_prompt: "You are a helpful assistant running on a Gaia node.".into(),
            rag_prompt: "Use the following context to answer the question. If the context does \
                         not help, answer from what you know.\n\n{context}"
                .into(),
            rag_policy: RagPolicy::System,
            retrieval: Retrieval::Hybrid,
            top_k: 3,
            score_threshold: 0.35,
            max_tool_rounds: 3,
            temperature: 0.3,
            top_p: 0.9,
            repetition_penalty: 1.1,
            max_tokens: 512,
        }
    }
}

/// `[knowledge]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KnowledgeConfig {
    /// Open `<data_dir>/kb` and use it for retrieval. Default true.
    pub enabled: bool,
    /// Ingest the built-in demo documents when the knowledge base is empty. Default true.
    pub demo: bool,
}

impl Default for KnowledgeConfig {
    fn default() -> Self {
        KnowledgeConfig {
            enabled: true,
            demo: true,
        }
    }
}

/// `[payments]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct PaymentsConfig {
    /// This node's price per 1000 tokens (prompt and completion alike), in the smallest unit
    /// of the chain's currency (wei): advertised to the domain and signed into its receipts.
    pub price: u64,
    /// Its price per 1000 prompt tokens, when not `price`.
    pub prompt_price: Option<u64>,
    /// Its price per 1000 completion tokens, when not `price`.
    pub completion_price: Option<u64>,
    /// The most a paid request entering here may be charged per 1000 tokens (prompt and
    /// completion alike) when the domain's manifest states no price; paid requests go only to
    /// members asking no more. 0: this node's own prices. A manifest's prices take its place.
    pub max_price: u64,
    /// The chain's JSON-RPC endpoint; empty: no paid access keys (the API is open, or closed
    /// by `server.api_keys`, as without payments).
    pub rpc_url: String,
    /// The chain id the endpoint must report (vouchers are bound to it).
    pub chain_id: u64,
    /// The domain's escrow contract (0x…, from `gaia pay deploy`).
    pub contract: String,
    /// Seconds between two settlements of the voucher book (the node key pays the gas); 0:
    /// only `gaia pay settle`.
    pub settle_secs: u64,
}

impl PaymentsConfig {
    /// Whether access keys are checked against an escrow.
    pub fn enabled(&self) -> bool {
        !self.rpc_url.trim().is_empty()
    }

    /// This node's prices.
    pub fn prices(&self) -> Price {
        Price {
            prompt: self.prompt_price.unwrap_or(self.price),
            completion: self.completion_price.unwrap_or(self.price),
        }
    }

    /// The most a paid request may be charged when the domain states no price.
    pub fn ceiling(&self) -> Price {
        if self.max_price == 0 {
            self.prices()
        } else {
            Price::flat(self.max_price)
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        if !(self.rpc_url.starts_with("http://") || self.rpc_url.starts_with("https://")) {
            return Err(invalid(
                "payments.rpc_url",
                format!("{:?} is not an http(s) URL", self.rpc_url),
            ));
        }
        if self.chain_id == 0 {
            return Err(invalid(
                "payments.chain_id",
                "set the chain id of payments.rpc_url",
            ));
        }
        if self.max_price != 0 && !self.prices().within(&Price::flat(self.max_price)) {
            return Err(invalid(
                "payments.max_price",
                format!(
                    "{} is below this node's own price ({}): requests it serves itself would cost \
                     more than it lets them pay elsewhere",
                    self.max_price,
                    self.prices()
                ),
            ));
        }
        if self.contract.parse::<gaia_protocol::NodeId>().is_err() {
            return Err(invalid(
                "payments.contract",
                format!(
                    "{:?} is not a contract address (0x and 40 hex digits, from `gaia pay deploy`)",
                    self.contract
                ),
            ));
        }
        Ok(())
    }
}

/// `[tools_policy]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ToolsPolicy {
    /// Hosts (names or IPs) tools may reach although they resolve to private, loopback or
    /// link-local addresses; plain `http` is accepted for these hosts only.
    pub allow_hosts: Vec<String>,
}

/// One `[[tools]]` entry: a function the node executes by POSTing its arguments to `url`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolConfig {
    /// The function name the model calls (`[A-Za-z0-9_-]`, 1 to 64).
    pub name: String,
    /// What it does, shown to the model.
    #[serde(default)]
    pub description: String,
    /// The endpoint (https).
    pub url: String,
    /// JSON schema of the arguments.
    #[serde(default = "empty_object_schema")]
    pub parameters: serde_json::Value,
    /// Seconds before the call is abandoned. Default 10.
    #[serde(default = "default_tool_timeout")]
    pub timeout_secs: u64,
    /// Largest response accepted. Default 65536.
    #[serde(default = "default_tool_bytes")]
    pub max_response_bytes: usize,
}

/// Most `[[mcp]]` servers.
pub const MAX_MCP_SERVERS: usize = 16;

/// One `[[mcp]]` entry: an MCP server (a local command over stdio, or a streamable-HTTP URL)
/// whose tools the node lists to the model and executes like `[[tools]]`, under the same
/// guards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpConfig {
    /// A label for logs, `/v1/info` and errors (`[A-Za-z0-9_-]`, 1 to 64).
    pub name: String,
    /// The command that runs the server over stdio: the program, then its arguments. It runs
    /// in the data directory with only `PATH`, `HOME`, `LANG` and `env` in its environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Environment variables for `command`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env: std::collections::BTreeMap<String, String>,
    /// Or the server's streamable-HTTP endpoint (https; http only for a host in
    /// `tools_policy.allow_hosts`, which also admits private addresses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Sent as `Authorization: Bearer <token>` to `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token: Option<String>,
    /// The server's tools to offer (empty: all of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
    /// Put before each tool's name as the model sees it (to tell servers apart).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    /// Seconds before connecting, listing or a call is abandoned. Default 10.
    #[serde(default = "default_tool_timeout")]
    pub timeout_secs: u64,
    /// Largest tool result handed to the model. Default 65536.
    #[serde(default = "default_tool_bytes")]
    pub max_response_bytes: usize,
}

impl McpConfig {
    fn validate(&self, policy: &ToolsPolicy) -> Result<(), String> {
        if !valid_function_name(&self.name) {
            return Err(format!(
                "name {:?} must be 1 to 64 of [A-Za-z0-9_-]",
                self.name
            ));
        }
        match (self.command.first(), &self.url) {
            (Some(program), None) => {
                if program.is_empty() {
                    return Err("command: the program is empty".into());
                }
                if self.bearer_token.is_some() {
                    return Err("bearer_token goes with url, not command".into());
                }
            }
            (None, Some(url)) => {
                check_tool_url(url, policy, "MCP servers")?;
                if !self.env.is_empty() {
                    return Err("env goes with command, not url".into());
                }
            }
            (Some(_), Some(_)) => return Err("give command or url, not both".into()),
            (None, None) => {
                return Err("give the server's command (stdio) or url (streamable HTTP)".into());
            }
        }
        if let Some(bad) = self.tools.iter().find(|t| t.is_empty() || t.len() > 128) {
            return Err(format!("tools: {bad:?} is not a tool name"));
        }
        if !self.prefix.is_empty() && !valid_function_name(&self.prefix) {
            return Err(format!(
                "prefix {:?} must be up to 64 of [A-Za-z0-9_-]",
                self.prefix
            ));
        }
        if self.timeout_secs == 0 || self.max_response_bytes == 0 {
            return Err("timeout_secs and max_response_bytes must be at least 1".into());
        }
        Ok(())
    }
}

fn empty_object_schema() -> serde_json::Value {
    serde_json::json!({"type": "object", "properties": {}})
}
fn default_tool_timeout() -> u64 {
    10
}
fn default_tool_bytes() -> usize {
    65536
}

/// The commented configuration `gaia init` writes (all defaults).
pub const DEFAULT_TOML: &str = r#"# Gaia node configuration. Every key is optional; shown here with its default.
# Environment variables GAIA_<SECTION>_<KEY> override this file (GAIA_SERVER_PORT=9000),
# and command-line flags override both. Edit with `gaia config set KEY VALUE`.

[server]
# Listen address and port (port 0 picks a free one).
host = "127.0.0.1"
port = 8080
# Bearer keys accepted on every route but /health; empty leaves the API open.
api_keys = []
# Largest request body in bytes.
max_body_bytes = 4194304
# Largest max_tokens a request may ask for (also the default).
max_tokens = 2048
# Largest n (choices per request).
max_n = 4
# Generations waiting for a worker before requests are refused with 429.
queue_depth = 16
# Batch worker threads (each runs its own batch on the model's threads).
workers = 1
# Generations each worker decodes together: one pass over the weights serves them all, so
# sixteen users cost far less than sixteen times one.
batch_size = 16
# MiB of finished chats' model state kept so that a chat's next turn, or another request with
# the same system prompt, runs only its new tokens (0 turns this off).
prefix_cache_mb = 256
# Longest a generation may run, in seconds; it is then cut (finish_reason "length").
request_timeout_secs = 300
# Most inputs per /v1/embeddings request.
max_embedding_inputs = 256

[models]
# Names in the model store (`gaia models list`).
chat = "smollm2-135m-instruct"
embedding = "all-minilm-l6-v2"
# auto, cpu, wgpu or cuda.
device = "auto"
# CPU threads per generation.
threads = 2

[agent]
# The system message of requests that have none ("" sends none).
system_prompt = "You are a helpful assistant running on a Gaia node."
# Wraps retrieved chunks; {context} is replaced by them.
rag_prompt = "Use the following context to answer the question. If the context does not help, answer from what you know.\n\n{context}"
# Where the context goes: "system" (a system message) or "last-user" (before the last user message).
rag_policy = "system"
# How context is found: "hybrid" (embeddings and keywords, fused by rank), "vector" or "keyword".
retrieval = "hybrid"
# Chunks retrieved per question, and the smallest cosine similarity of a chunk used as context
# (in hybrid retrieval a chunk its keywords found needs half of it).
top_k = 3
score_threshold = 0.35
# Rounds of node-executed tool calls per request.
max_tool_rounds = 3
# Sampling for requests that leave these fields out (a request's own values win).
temperature = 0.3
top_p = 0.9
repetition_penalty = 1.1
# Answer length when a request gives no max_tokens (at most server.max_tokens).
max_tokens = 512

[knowledge]
# Use the knowledge base in <data_dir>/kb for retrieval.
enabled = true
# Ingest the built-in demo documents into an empty knowledge base.
demo = true

[tools_policy]
# Hosts node-executed tools may reach although they are private, loopback or link-local.
allow_hosts = []

[swarm]
# Multiaddrs the peer-to-peer side listens on, TCP and QUIC (port 0 picks a free one; open
# TCP and UDP 4001 in the firewall for members elsewhere). It starts only when
# the node joins a domain (`domain` below, or `gaia start --domain`).
listen = ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"]
# Extra peers to join through (multiaddrs ending in /p2p/<peer id>), besides the manifest's.
bootstrap = []
# The domain to join: a signed manifest file from `gaia domain create`.
# domain = "/path/to/manifest.bin"
# This node's membership certificate from `gaia domain admit` (found next to the manifest,
# in certs/<address>.bin, when not set).
# certificate = "/path/to/certificate.bin"
# Run without models and only route chat completions to the domain.
gateway = false
# Milliseconds between adverts; a member silent for three of them leaves the member table.
heartbeat_ms = 10000
# Where this node is reachable from the internet (a public IP, a forwarded port), without
# /p2p/; none: AutoNAT finds out by asking peers to dial back.
external_addrs = []
# Relay circuits for members behind NAT while this node is publicly reachable.
relay_server = true
# Behind NAT, reserve a slot on a public member, advertise the relayed address and try to
# punch a direct connection (DCUtR).
relay_client = true
# Try to turn relayed connections into direct ones by hole punching.
hole_punching = true
# Find peers on the local network with mDNS, with no bootstrap address.
mdns = false
# Send a chat's next turn to the node that served its earlier turns (it holds the history in
# its prefix cache) unless that node is more than twice as busy as the best other choice.
prefix_affinity = true

[swarm.limits]
# Established connections in all, and per peer; connections being set up.
max_connections = 512
max_connections_per_peer = 4
max_pending = 64
# Yamux streams per connection; chat streams served at once; control RPCs in flight.
max_streams_per_connection = 256
max_inbound_chats = 64
max_concurrent_rpcs = 16
# Timeouts in milliseconds: one control RPC, opening a chat stream, between two frames, idle.
rpc_timeout_ms = 10000
open_timeout_ms = 10000
frame_timeout_ms = 60000
idle_connection_ms = 120000
# Frames buffered per chat stream.
chat_buffer = 64
# Relaying for members behind NAT: slots held, relayed connections at once, and what one
# relayed connection may carry (bytes each way, seconds) before the peers dial again.
relay_reservations = 128
relay_circuits = 64
relay_circuit_bytes = 67108864
relay_circuit_secs = 1800

[content]
# Hand the content this node advertises (its models and its knowledge base's snapshot) to
# members of its domain that fetch it by hash, e.g. a new member starting with nothing.
seed = true
# What to hand out: any of "chat", "embedding" and "kb".
share = ["chat", "embedding", "kb"]
# Upload bandwidth for all fetchers together, and to any one peer, in bytes per second (0: no
# limit).
upload_bytes_per_s = 0
upload_bytes_per_s_per_peer = 0
# Fetchers served at once, and streams per peer; more are told to come back later.
max_uploads = 8
max_uploads_per_peer = 2

[payments]
# This node's price per 1000 tokens (prompt and completion alike), in wei: advertised to the
# domain and signed into the receipts of what it serves.
price = 0
# Or one price per 1000 prompt tokens and one per 1000 completion tokens:
# prompt_price = 0
# completion_price = 0
# The most a paid request entering here may be charged per 1000 tokens when the domain's
# manifest states no price (`gaia domain create --prompt-price ...` does); paid requests go
# only to members asking no more (0: this node's own price).
max_price = 0
# The domain's escrow on an EVM chain (gaia pay deploy). With rpc_url set, clients pay with
# access keys from `gaia pay deposit` (Authorization: Bearer gaia-sk-...): each request is
# debited at the serving node's price, 402 when the deposit cannot cover it. Empty: off.
rpc_url = ""
chain_id = 0
contract = ""
# Redeem what this node's clients owe every this many seconds, paying the gas with the node
# key (0: only `gaia pay settle`).
settle_secs = 0

# Tools the node executes itself: the model's arguments are POSTed as JSON to `url`, and the
# response body is given back to the model.
# [[tools]]
# name = "get_weather"
# description = "Current weather of a city"
# url = "https://example.com/weather"
# timeout_secs = 10
# max_response_bytes = 65536
# [tools.parameters]
# type = "object"
# properties = { city = { type = "string" } }
# required = ["city"]

# MCP servers: their tools are listed to the model and executed by the node, like [[tools]].
# A local server runs over stdio (in the data directory, with only PATH, HOME, LANG and `env`
# in its environment); a remote one is reached by streamable HTTP (https, or http for a host in
# tools_policy.allow_hosts). Its state and tools are shown in /v1/info.
# [[mcp]]
# name = "files"
# command = ["npx", "-y", "@modelcontextprotocol/server-filesystem", "/srv/docs"]
# env = { }
# # url = "https://example.com/mcp"
# # bearer_token = "..."
# # Offer only these of its tools (empty: all); `prefix` goes before their names.
# tools = []
# prefix = ""
# timeout_secs = 10
# max_response_bytes = 65536
"#;

impl Config {
    /// The config file of a data directory.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(FILE_NAME)
    }

    /// Loads defaults < `<data_dir>/gaia.toml` (if present) < the process environment <
    /// `overrides` (`section.key`, raw value) and checks the result.
    pub fn load(data_dir: &Path, overrides: &[(String, String)]) -> Result<Config, ConfigError> {
        let path = Config::path(data_dir);
        let file = read_table(&path)?;
        let env: Vec<(String, String)> = std::env::vars().collect();
        Config::from_layers(file, &env, overrides, &path)
    }

    /// Merges the layers; `env` is a list of environment variables (only `GAIA_<SECTION>_<KEY>`
    /// of existing keys are read).
    pub fn from_layers(
        file: toml::Table,
        env: &[(String, String)],
        overrides: &[(String, String)],
        path: &Path,
    ) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let mut table = file;
        // Check the file alone first, so its errors name the file.
        deserialize(table.clone(), &origin)?;
        for (section, key) in scalar_keys() {
            let var = format!("GAIA_{}_{}", section.to_uppercase(), key.to_uppercase());
            if let Some((_, raw)) = env.iter().find(|(k, _)| *k == var) {
                set_raw(&mut table, &format!("{section}.{key}"), raw)?;
                deserialize(table.clone(), &format!("environment variable {var}"))?;
            }
        }
        for (key, raw) in overrides {
            set_raw(&mut table, key, raw)?;
            deserialize(table.clone(), &format!("the command-line setting {key}"))?;
        }
        let config = deserialize(table, &origin)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.host.parse::<std::net::IpAddr>().is_err() && s.host != "localhost" {
            return Err(invalid(
                "server.host",
                format!("{:?} is not an IP address", s.host),
            ));
        }
        for (key, value) in [
            ("server.max_tokens", s.max_tokens),
            ("server.max_n", s.max_n),
            ("server.queue_depth", s.queue_depth),
            ("server.workers", s.workers),
            ("server.batch_size", s.batch_size),
            ("server.max_body_bytes", s.max_body_bytes),
            ("server.max_embedding_inputs", s.max_embedding_inputs),
            ("agent.top_k", self.agent.top_k),
            ("agent.max_tokens", self.agent.max_tokens),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if s.workers > 64 {
            return Err(invalid("server.workers", "must be at most 64"));
        }
        if s.batch_size > 64 {
            return Err(invalid("server.batch_size", "must be at most 64"));
        }
        if s.prefix_cache_mb > 1 << 20 {
            return Err(invalid(
                "server.prefix_cache_mb",
                "must be at most 1048576 (1 TiB)",
            ));
        }
        if s.api_keys.iter().any(|k| k.trim().is_empty()) {
            return Err(invalid("server.api_keys", "an API key is empty"));
        }
        if !self.agent.rag_prompt.contains("{context}") {
            return Err(invalid("agent.rag_prompt", "must contain {context}"));
        }
        if !(-1.0..=1.0).contains(&self.agent.score_threshold) {
            return Err(invalid("agent.score_threshold", "must be in [-1, 1]"));
        }
        let a = &self.agent;
        if !(0.0..=2.0).contains(&a.temperature) {
            return Err(invalid("agent.temperature", "must be in [0, 2]"));
        }
        if !(a.top_p > 0.0 && a.top_p <= 1.0) {
            return Err(invalid("agent.top_p", "must be in (0, 1]"));
        }
        if !(a.repetition_penalty > 0.0 && a.repetition_penalty <= 10.0) {
            return Err(invalid("agent.repetition_penalty", "must be in (0, 10]"));
        }
        if a.max_tokens > s.max_tokens {
            return Err(invalid(
                "agent.max_tokens",
                format!("is more than server.max_tokens ({})", s.max_tokens),
            ));
        }
        if self.agent.top_k > gaia_knowledge::MAX_TOP_K {
            return Err(invalid(
                "agent.top_k",
                format!("must be at most {}", gaia_knowledge::MAX_TOP_K),
            ));
        }
        self.swarm
            .check()
            .map_err(|detail| invalid("swarm", detail))?;
        self.content
            .check()
            .map_err(|detail| invalid("content", detail))?;
        self.payments.validate()?;
        if self.swarm.gateway && self.swarm.domain.is_none() {
            return Err(invalid(
                "swarm.gateway",
                "a gateway routes to a domain: name it with swarm.domain (gaia start --domain)",
            ));
        }
        let mut names = BTreeSet::new();
        for (i, tool) in self.tools.iter().enumerate() {
            tool.validate(&self.tools_policy)
                .map_err(|detail| invalid(format!("tools[{i}]"), detail))?;
            if !names.insert(tool.name.as_str()) {
                return Err(invalid(
                    format!("tools[{i}].name"),
                    format!("tool {:?} is defined twice", tool.name),
                ));
            }
        }
        if self.mcp.len() > MAX_MCP_SERVERS {
            return Err(invalid(
                "mcp",
                format!("at most {MAX_MCP_SERVERS} MCP servers"),
            ));
        }
        let mut servers = BTreeSet::new();
        for (i, server) in self.mcp.iter().enumerate() {
            server
                .validate(&self.tools_policy)
                .map_err(|detail| invalid(format!("mcp[{i}]"), detail))?;
            if !servers.insert(server.name.as_str()) {
                return Err(invalid(
                    format!("mcp[{i}].name"),
                    format!("MCP server {:?} is named twice", server.name),
                ));
            }
        }
        Ok(())
    }
}

impl ToolConfig {
    fn validate(&self, policy: &ToolsPolicy) -> Result<(), String> {
        if !valid_function_name(&self.name) {
            return Err(format!(
                "name {:?} must be 1 to 64 of [A-Za-z0-9_-]",
                self.name
            ));
        }
        check_tool_url(&self.url, policy, "tools")?;
        if !self.parameters.is_object() {
            return Err("parameters must be a JSON schema object".into());
        }
        if self.timeout_secs == 0 || self.max_response_bytes == 0 {
            return Err("timeout_secs and max_response_bytes must be at least 1".into());
        }
        Ok(())
    }
}

/// A URL `what` (tools, MCP servers) may use: https, or http for a host in
/// `tools_policy.allow_hosts`.
fn check_tool_url(url: &str, policy: &ToolsPolicy, what: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("url: {e}"))?;
    let host = parsed.host_str().unwrap_or_default();
    let allowed = policy.allow_hosts.iter().any(|h| h == host);
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if allowed => Ok(()),
        other => Err(format!(
            "url scheme {other:?}: {what} must use https (http only for hosts in \
             tools_policy.allow_hosts)"
        )),
    }
}

/// Whether `name` is an acceptable function name (OpenAI's rule).
pub fn valid_function_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn deserialize(table: toml::Table, origin: &str) -> Result<Config, ConfigError> {
    serde_path_to_error::deserialize::<_, Config>(toml::Value::Table(table)).map_err(|e| {
        let key = e.path().to_string();
        ConfigError::Invalid {
            key: if key == "." {
                "(top level)".into()
            } else {
                key
            },
            detail: e.into_inner().to_string().trim().to_string(),
            origin: origin.to_string(),
        }
    })
}

fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(toml::Table::new()),
        Err(source) => {
            return Err(ConfigError::Io {
                action: "read",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    text.parse::<toml::Table>()
        .map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })
}

/// The `(section, key)` pairs of scalar and list settings (what env vars and `--set` reach).
pub fn scalar_keys() -> Vec<(String, String)> {
    let Ok(toml::Value::Table(root)) = toml::Value::try_from(Config::default()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (section, value) in root {
        if let toml::Value::Table(t) = value {
            for (key, value) in t {
                if !value.is_table() {
                    out.push((section.clone(), key.clone()));
                }
            }
        }
    }
    for key in OPTIONAL_PATHS.iter().chain(&OPTIONAL_INTEGERS) {
        if let Some((section, name)) = key.split_once('.') {
            out.push((section.to_string(), name.to_string()));
        }
    }
    out
}

/// Settings without a default (absent from the defaults' TOML), all file paths.
const OPTIONAL_PATHS: [&str; 2] = ["swarm.domain", "swarm.certificate"];
/// Integer settings without a default.
const OPTIONAL_INTEGERS: [&str; 2] = ["payments.prompt_price", "payments.completion_price"];

/// The default value of `section.key`, which gives the type a raw string is parsed as.
fn default_value(key: &str) -> Result<toml::Value, ConfigError> {
    let (section, name) = key
        .split_once('.')
        .ok_or_else(|| ConfigError::UnknownKey(key.to_string()))?;
    if OPTIONAL_PATHS.contains(&key) {
        return Ok(toml::Value::String(String::new()));
    }
    if OPTIONAL_INTEGERS.contains(&key) {
        return Ok(toml::Value::Integer(0));
    }
    let root = toml::Value::try_from(Config::default())
        .map_err(|e| invalid(key, format!("cannot serialize the defaults: {e}")))?;
    root.get(section)
        .and_then(|s| s.get(name))
        .filter(|v| !v.is_table())
        .cloned()
        .ok_or_else(|| ConfigError::UnknownKey(key.to_string()))
}

/// Parses `raw` as the type of `key`'s default: strings as is, string lists comma-separated,
/// everything else as a TOML literal.
pub fn parse_raw(key: &str, raw: &str) -> Result<toml::Value, ConfigError> {
    let default = default_value(key)?;
    match default {
        toml::Value::String(_) => Ok(toml::Value::String(raw.to_string())),
        toml::Value::Array(_) if !raw.trim_start().starts_with('[') => Ok(toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        )),
        _ => {
            let doc: toml::Table = format!("v = {raw}")
                .parse()
                .map_err(|_| invalid(key, format!("{raw:?} is not a valid value")))?;
            doc.get("v")
                .cloned()
                .ok_or_else(|| invalid(key, format!("{raw:?} is not a valid value")))
        }
    }
}

fn set_raw(table: &mut toml::Table, key: &str, raw: &str) -> Result<(), ConfigError> {
    let value = parse_raw(key, raw)?;
    let (section, name) = key
        .split_once('.')
        .ok_or_else(|| ConfigError::UnknownKey(key.to_string()))?;
    let entry = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    match entry {
        toml::Value::Table(t) => {
            t.insert(name.to_string(), value);
            Ok(())
        }
        _ => Err(invalid(section, "must be a table")),
    }
}

/// `gaia config get [KEY]`: the effective value of one key, or every key as TOML.
pub fn get(config: &Config, key: Option<&str>) -> Result<String, ConfigError> {
    let root = toml::Value::try_from(config)
        .map_err(|e| invalid("(top level)", format!("cannot serialize: {e}")))?;
    let Some(key) = key else {
        return toml::to_string(config)
            .map_err(|e| invalid("(top level)", format!("cannot serialize: {e}")));
    };
    let mut value = &root;
    for part in key.split('.') {
        value = match value.get(part) {
            Some(v) => v,
            None if OPTIONAL_PATHS.contains(&key) || OPTIONAL_INTEGERS.contains(&key) => {
                return Ok(String::new());
            }
            None => return Err(ConfigError::UnknownKey(key.to_string())),
        };
    }
    Ok(match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Table(t) => toml::to_string(t).unwrap_or_default(),
        other => other.to_string(),
    })
}

/// `gaia config set KEY VALUE`: edits `<data_dir>/gaia.toml` keeping its comments and layout,
/// after checking that the result is a valid configuration.
pub fn set(data_dir: &Path, key: &str, raw: &str) -> Result<(), ConfigError> {
    let path = Config::path(data_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => DEFAULT_TOML.to_string(),
        Err(source) => {
            return Err(ConfigError::Io {
                action: "read",
                path,
                source,
            });
        }
    };
    let mut doc: toml_edit::DocumentMut =
        text.parse()
            .map_err(|e: toml_edit::TomlError| ConfigError::Syntax {
                path: path.clone(),
                detail: e.to_string(),
            })?;
    let value = parse_raw(key, raw)?;
    let (section, name) = key
        .split_once('.')
        .ok_or_else(|| ConfigError::UnknownKey(key.to_string()))?;
    let edit_value = toml_value_to_edit(&value)
        .ok_or_else(|| invalid(key, format!("{raw:?} is not a valid value")))?;
    let table = doc
        .entry(section)
        .or_insert_with(|| toml_edit::Item::Table(toml_edit::Table::new()));
    let Some(table) = table.as_table_like_mut() else {
        return Err(invalid(section, "must be a table"));
    };
    match table.get_mut(name).and_then(toml_edit::Item::as_value_mut) {
        Some(old) => {
            let decor = old.decor().clone();
            *old = edit_value;
            *old.decor_mut() = decor;
        }
        None => {
            table.insert(name, toml_edit::Item::Value(edit_value));
        }
    }
    let new_text = doc.to_string();
    let table: toml::Table =
        new_text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax {
                path: path.clone(),
                detail: e.to_string(),
            })?;
    Config::from_layers(table, &[], &[], &path)?;
    write_atomic(&path, &new_text)
}

fn toml_value_to_edit(value: &toml::Value) -> Option<toml_edit::Value> {
    let doc: toml_edit::DocumentMut = format!("v = {value}").parse().ok()?;
    doc.get("v")?.as_value().cloned()
}

/// Writes `text` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, text: &str) -> Result<(), ConfigError> {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).map_err(|source| ConfigError::Io {
        action: "write",
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| ConfigError::Io {
        action: "replace",
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        text.parse().unwrap()
    }

    #[test]
    fn the_commented_default_file_is_the_defaults() {
        let c = Config::from_layers(table(DEFAULT_TOML), &[], &[], Path::new("x")).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn layers_apply_in_order() {
        let file = table("[server]\nport = 9000\nhost = \"0.0.0.0\"\n");
        let env = vec![
            ("GAIA_SERVER_PORT".to_string(), "9100".to_string()),
            ("GAIA_SERVER_API_KEYS".to_string(), "a, b".to_string()),
            ("GAIA_DATA_DIR".to_string(), "/ignored".to_string()),
            ("GAIA_MODELS_DIR".to_string(), "/ignored".to_string()),
        ];
        let flags = vec![("server.port".to_string(), "9200".to_string())];
        let c = Config::from_layers(file.clone(), &env, &[], Path::new("x")).unwrap();
        assert_eq!(c.server.port, 9100);
        assert_eq!(c.server.host, "0.0.0.0");
        assert_eq!(c.server.api_keys, vec!["a", "b"]);
        let c = Config::from_layers(file, &env, &flags, Path::new("x")).unwrap();
        assert_eq!(c.server.port, 9200);
    }

    #[test]
    fn errors_name_the_key_and_origin() {
        let err = Config::from_layers(table("[server]\nprot = 1\n"), &[], &[], Path::new("f"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("prot"), "{err}");
        let err = Config::from_layers(table("[server]\nport = \"x\"\n"), &[], &[], Path::new("f"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.port"), "{err}");
        let env = vec![("GAIA_SERVER_PORT".to_string(), "70000".to_string())];
        let err = Config::from_layers(toml::Table::new(), &env, &[], Path::new("f"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("GAIA_SERVER_PORT"), "{err}");
        let err = Config::from_layers(
            table("[agent]\nrag_prompt = \"no placeholder\"\n"),
            &[],
            &[],
            Path::new("f"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("{context}"), "{err}");
        for (agent, key) in [
            ("temperature = 2.5", "agent.temperature"),
            ("temperature = nan", "agent.temperature"),
            ("top_p = 0.0", "agent.top_p"),
            ("repetition_penalty = 0.0", "agent.repetition_penalty"),
            ("max_tokens = 0", "agent.max_tokens"),
            ("max_tokens = 4096", "agent.max_tokens"),
            ("retrieval = \"semantic\"", "retrieval"),
        ] {
            let err = Config::from_layers(
                table(&format!("[agent]\n{agent}\n")),
                &[],
                &[],
                Path::new("f"),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains(key), "{agent}: {err}");
        }
    }

    #[test]
    fn payments_are_checked_only_when_on() {
        let on = |extra: &str| {
            let t = format!(
                "[payments]\nrpc_url = \"http://127.0.0.1:8545\"\nchain_id = 1337\n\
                 contract = \"0x{}\"\nprice = 10\n{extra}",
                "ab".repeat(20)
            );
            Config::from_layers(table(&t), &[], &[], Path::new("f")).map_err(|e| e.to_string())
        };
        let c = on("").unwrap();
        assert!(c.payments.enabled());
        assert_eq!(c.payments.ceiling(), Price::flat(10));
        assert_eq!(
            on("max_price = 20\n").unwrap().payments.ceiling(),
            Price::flat(20)
        );
        let err = on("max_price = 5\n").unwrap_err();
        assert!(err.contains("payments.max_price"), "{err}");
        // Two prices: each falls back to `price`, and `max_price` must cover both; the
        // environment sets them too.
        let env = vec![("GAIA_PAYMENTS_PROMPT_PRICE".to_string(), "4".to_string())];
        let c = Config::from_layers(table("[payments]\nprice = 7\n"), &env, &[], Path::new("f"))
            .unwrap();
        assert_eq!(
            c.payments.prices(),
            Price {
                prompt: 4,
                completion: 7
            }
        );
        let c = on("completion_price = 30\n").unwrap();
        assert_eq!(
            c.payments.prices(),
            Price {
                prompt: 10,
                completion: 30
            }
        );
        assert_eq!(c.payments.ceiling(), c.payments.prices());
        let err = on("completion_price = 30\nmax_price = 20\n").unwrap_err();
        assert!(err.contains("payments.max_price"), "{err}");
        let bad = |t: &str| {
            Config::from_layers(table(t), &[], &[], Path::new("f"))
                .unwrap_err()
                .to_string()
        };
        let err = bad("[payments]\nrpc_url = \"http://x\"\ncontract = \"0x00\"\n");
        assert!(err.contains("payments.chain_id"), "{err}");
        let err = bad("[payments]\nrpc_url = \"ftp://x\"\nchain_id = 1\ncontract = \"0x00\"\n");
        assert!(err.contains("payments.rpc_url"), "{err}");
        let err = bad("[payments]\nrpc_url = \"http://x\"\nchain_id = 1\ncontract = \"0x00\"\n");
        assert!(err.contains("payments.contract"), "{err}");
        // Off: a price alone is fine, and nothing else is looked at.
        let c = Config::from_layers(table("[payments]\nprice = 7\n"), &[], &[], Path::new("f"))
            .unwrap();
        assert!(!c.payments.enabled());
    }

    #[test]
    fn tools_need_https_unless_allow_listed() {
        let t = "[[tools]]\nname = \"w\"\nurl = \"http://127.0.0.1:1/x\"\n";
        assert!(Config::from_layers(table(t), &[], &[], Path::new("f")).is_err());
        let t = format!("[tools_policy]\nallow_hosts = [\"127.0.0.1\"]\n{t}");
        let c = Config::from_layers(table(&t), &[], &[], Path::new("f")).unwrap();
        assert_eq!(c.tools[0].timeout_secs, 10);
    }

    #[test]
    fn mcp_servers_take_a_command_or_an_allowed_url() {
        let ok = |t: &str| Config::from_layers(table(t), &[], &[], Path::new("f"));
        let c =
            ok("[[mcp]]\nname = \"m\"\ncommand = [\"python3\", \"s.py\"]\nenv = { A = \"1\" }\n")
                .unwrap();
        assert_eq!(c.mcp[0].timeout_secs, 10);
        assert_eq!(c.mcp[0].env["A"], "1");
        for (bad, key, says) in [
            ("[[mcp]]\nname = \"m\"\n", "mcp[0]", "command"),
            (
                "[[mcp]]\nname = \"m\"\ncommand = [\"x\"]\nurl = \"https://h/mcp\"\n",
                "mcp[0]",
                "not both",
            ),
            (
                "[[mcp]]\nname = \"m\"\nurl = \"http://127.0.0.1:9/mcp\"\n",
                "mcp[0]",
                "https",
            ),
            (
                "[[mcp]]\nname = \"m s\"\ncommand = [\"x\"]\n",
                "mcp[0]",
                "name",
            ),
            (
                "[[mcp]]\nname = \"m\"\ncommand = [\"\"]\n",
                "mcp[0]",
                "empty",
            ),
            (
                "[[mcp]]\nname = \"m\"\ncommand = [\"x\"]\nprefix = \"a.b\"\n",
                "mcp[0]",
                "prefix",
            ),
            (
                "[[mcp]]\nname = \"m\"\ncommand = [\"x\"]\n[[mcp]]\nname = \"m\"\ncommand = [\"y\"]\n",
                "mcp[1].name",
                "twice",
            ),
            (
                "[[mcp]]\nname = \"m\"\ncommand = [\"x\"]\nport = 1\n",
                "mcp",
                "port",
            ),
        ] {
            let err = ok(bad).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(says), "{bad}: {err}");
        }
        let c = ok("[tools_policy]\nallow_hosts = [\"127.0.0.1\"]\n[[mcp]]\nname = \"m\"\nurl = \"http://127.0.0.1:9/mcp\"\n")
            .unwrap();
        assert_eq!(c.mcp[0].url.as_deref(), Some("http://127.0.0.1:9/mcp"));
    }

    #[test]
    fn set_keeps_comments_and_checks_values() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(Config::path(dir.path()), DEFAULT_TOML).unwrap();
        set(dir.path(), "server.port", "9999").unwrap();
        set(dir.path(), "agent.rag_policy", "last-user").unwrap();
        let text = std::fs::read_to_string(Config::path(dir.path())).unwrap();
        assert!(text.contains("# Listen address and port"), "{text}");
        let c = Config::load(dir.path(), &[]).unwrap();
        assert_eq!(c.server.port, 9999);
        assert_eq!(c.agent.rag_policy, RagPolicy::LastUser);
        assert!(set(dir.path(), "server.port", "-1").is_err());
        assert!(set(dir.path(), "server.nope", "1").is_err());
        assert_eq!(get(&c, Some("server.port")).unwrap(), "9999");
    }
}
