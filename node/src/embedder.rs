//! The node's embedder: the inference crate's BERT model behind the knowledge crate's
//! [`gaia_knowledge::Embedder`] trait, so knowledge bases, `/v1/embeddings` and RAG share one
//! loaded model.

use std::path::Path;
use std::sync::Arc;

use gaia_inference::device::Device;
use gaia_inference::embed::Embedder as BertEmbedder;
use gaia_knowledge::{EmbedError, Embedder};

use crate::models::{Manifest, Store};

/// A loaded embedding model with the identity a knowledge base records (store name and the
/// sha256 of its weights).
#[derive(Debug, Clone)]
pub struct NodeEmbedder {
    inner: Arc<BertEmbedder>,
    id: String,
    digest: String,
}

impl NodeEmbedder {
    /// Loads the embedding model `name` from the store onto `device`.
    pub fn from_store(store: &Store, name: &str, device: &Device) -> anyhow::Result<NodeEmbedder> {
        let manifest = store.get(name)?;
        NodeEmbedder::load(&store.model_dir(name), &manifest, device)
    }

    /// Loads the embedding model in `dir`, described by `manifest`.
    pub fn load(dir: &Path, manifest: &Manifest, device: &Device) -> anyhow::Result<NodeEmbedder> {
        let weights = manifest
            .files
            .iter()
            .find(|f| f.name.ends_with(".safetensors"))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "model {} has no .safetensors file; it is not an embedding model",
                    manifest.name
                )
            })?;
        let inner = BertEmbedder::load(dir, device).map_err(|e| {
            anyhow::anyhow!(
                "loading embedding model {} from {}: {e}",
                manifest.name,
                dir.display()
            )
        })?;
        Ok(NodeEmbedder {
            inner: Arc::new(inner),
            id: manifest.name.clone(),
            digest: weights.sha256.clone(),
        })
    }

    /// The underlying model, for callers that want it directly (`/v1/embeddings`).
    pub fn model(&self) -> &BertEmbedder {
        &self.inner
    }

    /// This embedder as the knowledge crate's trait object.
    pub fn shared(&self) -> Arc<dyn Embedder> {
        Arc::new(self.clone())
    }
}

impl Embedder for NodeEmbedder {
    fn model_id(&self) -> &str {
        &self.id
    }

    fn model_digest(&self) -> &str {
        &self.digest
    }

    fn dimensions(&self) -> usize {
        self.inner.dim()
    }

    fn max_input_tokens(&self) -> Option<usize> {
        // [CLS] and [SEP] count against the model's limit but not against the chunker's.
        Some(self.inner.max_seq_len().saturating_sub(2).max(1))
    }

    fn count_tokens(&self, text: &str) -> usize {
        // On a tokenizer failure, count bytes: WordPiece never makes more tokens than bytes,
        // so the chunker splits rather than the model truncating.
        self.inner
            .count_tokens(text)
            .map(|n| n.saturating_sub(2))
            .unwrap_or(text.len())
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.inner
            .embed(texts)
            .map_err(|e| EmbedError::Model(e.to_string()))
    }
}
