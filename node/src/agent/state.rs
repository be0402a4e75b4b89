//! The node's shared state: its configuration, its models (none on a gateway), the swarm
//! handle, the knowledge base, the counters, and its identity. The pipeline reads it, and so
//! do its front ends: the HTTP API's handlers and the relay server (`swarm::serve`).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use super::error::ApiError;
use super::rag;
use crate::config::Config;
use crate::embedder::NodeEmbedder;
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::swarm::SwarmHandle;

/// What the node reports about itself in `/v1/info`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct NodeInfo {
    /// The node's address (from its key), if it has one.
    pub address: Option<String>,
    /// The data directory.
    pub data_dir: PathBuf,
    /// sha256 of the chat model's GGUF.
    pub chat_sha256: String,
    /// sha256 of the embedding model's weights.
    pub embedding_sha256: String,
}

/// The models a serving node runs (a gateway has none).
pub struct LocalModels {
    /// The inference engine.
    pub engine: Engine,
    /// The embedding model.
    pub embedder: NodeEmbedder,
}

/// Everything the pipeline and its front ends (the HTTP handlers, the relay server) share.
pub struct AppState {
    /// The configuration the node started with.
    pub config: Config,
    /// The chat engine and the embedder; `None` on a gateway (`swarm.gateway`), which only
    /// routes chat completions to its domain.
    pub local: Option<LocalModels>,
    /// The swarm, when the node takes part in a domain (`swarm.domain`).
    pub swarm: Option<SwarmHandle>,
    /// The knowledge base (when enabled).
    pub kb: Option<rag::SharedKb>,
    /// Paid access keys (`[payments]` with an `rpc_url`).
    pub payments: Option<std::sync::Arc<crate::pay::accounts::Payments>>,
    /// The MCP servers of `[[mcp]]` and their tools.
    pub mcp: super::mcp::McpHub,
    /// Counters.
    pub metrics: Metrics,
    /// Identity and digests.
    pub info: NodeInfo,
    /// The bound address, once listening.
    pub listen: OnceLock<std::net::SocketAddr>,
    /// When the node started.
    pub started: Instant,
}

/// The state handed to the pipeline and to the HTTP handlers.
pub type Shared = Arc<AppState>;

impl AppState {
    /// Checks a chat model name (`default` is an alias). A gateway accepts any name: the
    /// domain's adverts decide which nodes serve it.
    pub fn check_chat_model(&self, model: &str) -> Result<(), ApiError> {
        let chat = &self.config.models.chat;
        if model == chat || model == "default" || self.local.is_none() {
            return Ok(());
        }
        Err(ApiError::unknown_model(model, &[chat.as_str(), "default"]))
    }

    /// The local models, or the error a gateway gives for what needs them.
    pub fn models(&self) -> Result<&LocalModels, ApiError> {
        self.local.as_ref().ok_or_else(|| {
            ApiError::unavailable(
                "this node is a gateway without models: it serves chat completions by routing \
                 them to its domain; ask a serving node for this",
            )
        })
    }

    /// The inference engine (see [`AppState::models`]).
    pub fn engine(&self) -> Result<&Engine, ApiError> {
        Ok(&self.models()?.engine)
    }

    /// The current load: the engine's, or zero on a gateway.
    pub fn load(&self) -> crate::engine::LoadFigures {
        self.local
            .as_ref()
            .map(|m| m.engine.load())
            .unwrap_or_default()
    }

    /// The tools the node executes itself: `[[tools]]`, then those of its connected MCP
    /// servers.
    pub fn node_tools(&self) -> Vec<super::tools::Tool> {
        let mut tools: Vec<super::tools::Tool> = self
            .config
            .tools
            .iter()
            .map(|t| super::tools::Tool {
                name: t.name.clone(),
                description: t.description.clone(),
                parameters: t.parameters.clone(),
                node: true,
            })
            .collect();
        tools.extend(self.mcp.tools());
        tools
    }

    /// `system_fingerprint`: the version and the chat model's digest.
    pub fn fingerprint(&self) -> String {
        let digest = self.info.chat_sha256.get(..12).unwrap_or("");
        format!("gaia-{}-{digest}", env!("CARGO_PKG_VERSION"))
    }
}
