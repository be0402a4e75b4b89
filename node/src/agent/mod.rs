//! The agent: the chat pipeline a node runs for every chat request, whichever way it came. The
//! HTTP API (`crate::api`) and the relay server (`crate::swarm::serve`, chats that peers route
//! to this node) both call it; it knows nothing of HTTP responses or stream frames, and gives
//! its results as the engine's [`GenerateEvent`](gaia_inference::generate::GenerateEvent)s and
//! an [`ApiError`].
//!
//! A chat request goes through these stages:
//!
//! 1. **Plan** (`plan.rs`): the body ([`types::ChatRequest`]) is checked against the node's
//!    limits into a `Plan`: generation settings, the tools on offer ([`tools`]), the tool
//!    choice, the output format.
//! 2. **Route** (`route.rs`): the swarm's router picks the node that runs the request, this one
//!    included; `n` > 1 and log-probabilities stay here.
//! 3. **Retrieve** ([`rag`]): on the node that runs the request, the knowledge base is searched
//!    with the last user message and the context injected.
//! 4. **Prompt and constraints** (`prompt.rs`): the conversation is rendered with the chat
//!    template (the agent's system prompt, the tools described in it) and tokenized off the
//!    runtime; the output constraint is compiled (`response_format`, an enforced tool call).
//! 5. **Run** (`run.rs`): a round is queued on the [`Engine`](crate::engine::Engine), or relayed
//!    to the chosen node with failover; its events are streamed or collected; calls of
//!    node-executed tools are run ([`tools::execute`], or an MCP server's tool through
//!    [`mcp::McpHub`]) and the loop goes on.
//!
//! It reads the node's shared state ([`AppState`]: configuration, engine, knowledge base,
//! swarm handle, counters), the same the front ends hold, and reaches peers through the swarm's
//! handle alone (`SwarmHandle::pick`, `SwarmHandle::chat_via`).

pub mod error;
pub mod mcp;
mod plan;
mod prompt;
pub mod rag;
mod route;
mod run;
mod state;
pub mod tools;
pub mod types;

pub use error::ApiError;
pub(crate) use plan::{Plan, limits};
pub(crate) use prompt::text_requests;
pub(crate) use run::{
    ChoiceOut, Events, Executed, Outcome, collect, generation_error, plan, retrieve, route,
    run_rounds, serve_relayed, start_round, submit,
};
pub use state::{AppState, LocalModels, NodeInfo, Shared};
