//! OpenAI wire types of the HTTP API's other request bodies (text completions, embeddings,
//! retrieval), and the top-level fields each body accepts ([`Fields`]). The chat body and the
//! validation shared with text completions are the pipeline's ([`crate::agent::types`]).

use serde::Deserialize;

use super::error::Fields;
use crate::agent::types::{ChatRequest, Common};

// The chat body's fields: those of `ChatRequest` and of its flattened `Common`.
impl Fields for ChatRequest {
    const FIELDS: &'static [&'static str] = &[
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "n",
        "stream",
        "stream_options",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "user",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "metadata",
        "store",
        "service_tier",
        "top_k",
        "min_p",
        "repetition_penalty",
        "rag",
    ];
}

/// A prompt of `/v1/completions`: a string or a list of one string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Texts (only one is supported).
    Many(Vec<String>),
}

/// `POST /v1/completions`
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The model.
    pub model: String,
    /// The prompt.
    pub prompt: Prompt,
    /// Shared fields.
    #[serde(flatten)]
    pub common: Common,
    /// Log-probabilities with this many alternatives (0 to 5).
    #[serde(default)]
    pub logprobs: Option<u64>,
    /// Include the prompt in the output.
    #[serde(default)]
    pub echo: Option<bool>,
    /// Not supported (400 when set).
    #[serde(default)]
    pub suffix: Option<String>,
    /// Only 1 (or equal to n).
    #[serde(default)]
    pub best_of: Option<u64>,
}

impl Fields for CompletionRequest {
    const FIELDS: &'static [&'static str] = &[
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stream",
        "stream_options",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "echo",
        "suffix",
        "best_of",
        "user",
        "metadata",
        "store",
        "service_tier",
        "top_k",
        "min_p",
        "repetition_penalty",
    ];
}

/// `input` of `/v1/embeddings`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    /// One text.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `POST /v1/embeddings`
#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingRequest {
    /// The embedding model.
    pub model: String,
    /// Texts.
    pub input: EmbeddingInput,
    /// `float` (default) or `base64`.
    #[serde(default)]
    pub encoding_format: Option<String>,
    /// Only the model's own dimension.
    #[serde(default)]
    pub dimensions: Option<u64>,
    /// End-user id.
    #[serde(default)]
    pub user: Option<String>,
}

impl Fields for EmbeddingRequest {
    const FIELDS: &'static [&'static str] =
        &["model", "input", "encoding_format", "dimensions", "user"];
}

/// `POST /v1/retrieve` (Gaia extension): knowledge-base search.
#[derive(Debug, Clone, Deserialize)]
pub struct RetrieveRequest {
    /// The question.
    pub query: String,
    /// Most hits (default `agent.top_k`).
    #[serde(default)]
    pub top_k: Option<u64>,
    /// Smallest similarity (default `agent.score_threshold`); a finite f32.
    #[serde(default)]
    pub score_threshold: Option<f64>,
    /// `hybrid` (default), `vector` or `keyword`.
    #[serde(default)]
    pub mode: Option<String>,
}

impl Fields for RetrieveRequest {
    const FIELDS: &'static [&'static str] = &["query", "top_k", "score_threshold", "mode"];
}
