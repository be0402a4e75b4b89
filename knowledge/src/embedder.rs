//! The [`Embedder`] trait: the only thing this crate needs from a model runtime.

use serde::{Deserialize, Serialize};

/// Turns text into fixed-size vectors. The node adapts the inference crate's embedder to it, so
/// this crate does not depend on a model runtime.
///
/// Implementations must be deterministic for a given model: the same text gives the same vector
/// (the knowledge-base hash covers the stored vectors).
pub trait Embedder: Send + Sync {
    /// A short, stable name of the embedding model, for example `all-minilm-l6-v2`.
    fn model_id(&self) -> &str;

    /// A digest identifying the exact weights, for example the sha256 of the model file in hex.
    /// Two embedders with the same id and digest produce interchangeable vectors.
    fn model_digest(&self) -> &str;

    /// Number of dimensions of every vector.
    fn dimensions(&self) -> usize;

    /// The most tokens one input may have (special tokens such as `[CLS]` excluded), or `None`
    /// when the model has no tokenizer-based limit; chunks are then sized in characters.
    fn max_input_tokens(&self) -> Option<usize>;

    /// Number of tokens the model sees for `text`, special tokens excluded. Only called when
    /// [`Embedder::max_input_tokens`] returns `Some`; the default counts whitespace-separated
    /// words, which only suits toy models.
    fn count_tokens(&self, text: &str) -> usize {
        text.split_whitespace().count()
    }

    /// One vector of [`Embedder::dimensions`] finite values per text, in order.
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError>;
}

/// Why an [`Embedder`] could not embed a batch.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The model failed (the message comes from the runtime).
    #[error("the embedding model failed: {0}")]
    Model(String),
    /// The embedder is shutting down or overloaded; retry later.
    #[error("the embedding model is unavailable: {0}")]
    Unavailable(String),
}

/// The embedding model a knowledge base was built with; recorded in its manifest and compared
/// on open and on snapshot import.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// [`Embedder::model_id`].
    pub id: String,
    /// [`Embedder::model_digest`].
    pub digest: String,
    /// [`Embedder::dimensions`].
    pub dimensions: usize,
}

impl ModelInfo {
    /// The model behind `embedder`.
    pub fn of(embedder: &dyn Embedder) -> Self {
        Self {
            id: embedder.model_id().to_string(),
            digest: embedder.model_digest().to_string(),
            dimensions: embedder.dimensions(),
        }
    }

    /// `id (digest abcdef012345…, N dims)`, for error messages.
    pub fn describe(&self) -> String {
        let short: String = self.digest.chars().take(12).collect();
        format!("{} (digest {short}…, {} dims)", self.id, self.dimensions)
    }
}

impl std::fmt::Display for ModelInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}
