//! Sentence embeddings with a BERT encoder on Burn (all-MiniLM-L6-v2 and its relatives).
//!
//! A model directory holds `model.safetensors`, `config.json` and `tokenizer.json` (and,
//! optionally, `sentence_bert_config.json` whose `max_seq_length` bounds the input, 256 for
//! all-MiniLM-L6-v2). [`Embedder::embed`] tokenizes, sorts the texts by length and runs them in
//! padded batches, mean-pools the last hidden states over the real tokens (attention mask) and
//! L2-normalises the result, as sentence-transformers does.
//!
//! ```no_run
//! # fn main() -> Result<(), gaia_inference::embed::EmbedError> {
//! use gaia_inference::device::DeviceChoice;
//! use gaia_inference::embed::Embedder;
//! let device = DeviceChoice::Cpu.resolve().expect("cpu backend");
//! let embedder = Embedder::load("models/all-minilm-l6-v2".as_ref(), &device)?;
//! let vectors = embedder.embed(&["A man is eating food.", "A man is eating bread."])?;
//! assert_eq!(vectors[0].len(), embedder.dim());
//! # Ok(()) }
//! ```

mod bert;
mod host;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::backend::Backend;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::device::{BackendVisitor, Device};

pub use bert::BertConfig;
use bert::BertModel;
use host::HostBert;

/// Largest number of texts run through the encoder at once.
pub const DEFAULT_BATCH_SIZE: usize = 32;
/// Sequence limit when `sentence_bert_config.json` is absent.
pub const DEFAULT_MAX_SEQ_LEN: usize = 256;
/// Most texts one [`Embedder::embed`] call accepts (bounds the memory a request can use).
pub const MAX_TEXTS_PER_CALL: usize = 4096;

/// Everything that can go wrong loading or running the embedder.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// A file of the model directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` or `sentence_bert_config.json` is malformed or unsupported.
    #[error("invalid embedding model config {path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The tokenizer could not be loaded or failed on an input.
    #[error("tokenizer error ({context}): {reason}")]
    Tokenizer {
        /// Loading, or which input.
        context: String,
        /// The tokenizer's message.
        reason: String,
    },
    /// The weights file is malformed or lacks a tensor.
    #[error("invalid weights in {path}: {reason}")]
    Weights {
        /// The safetensors file.
        path: PathBuf,
        /// What is wrong (names the tensor).
        reason: String,
    },
    /// Too many texts in one call.
    #[error("{count} texts in one embedding call; at most {limit} are accepted, split the input")]
    TooManyTexts {
        /// Texts given.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// The backend failed while computing.
    #[error("embedding computation failed: {0}")]
    Backend(String),
}

/// Options for [`Embedder::load_with`].
#[derive(Clone, Debug)]
pub struct EmbedderOptions {
    /// Texts per encoder batch (default 32).
    pub batch_size: usize,
    /// Overrides the sequence limit of `sentence_bert_config.json`.
    pub max_seq_len: Option<usize>,
    /// Threads of the CPU encoder (0: one per core). Other devices ignore it.
    pub threads: usize,
    /// The arithmetic of the CPU encoder. Other devices run f32.
    pub precision: EmbedPrecision,
}

/// How the CPU encoder multiplies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EmbedPrecision {
    /// Q8_0 weights and 8-bit activations on the host kernels, no padding: the fast path
    /// (cosine to the f32 model at least 0.998 on the reference sentences).
    #[default]
    Q8,
    /// The f32 graph on Burn's CPU backend: the reference's arithmetic, slower.
    F32,
}

impl Default for EmbedderOptions {
    fn default() -> Self {
        EmbedderOptions {
            batch_size: DEFAULT_BATCH_SIZE,
            max_seq_len: None,
            threads: 0,
            precision: EmbedPrecision::default(),
        }
    }
}

/// One batch of token ids, padded to a common length.
#[derive(Debug)]
pub(crate) struct Batch {
    /// `[batch, seq_len]` token ids, row-major.
    pub(crate) ids: Vec<u32>,
    /// `[batch, seq_len]` token type ids.
    pub(crate) type_ids: Vec<u32>,
    /// `[batch, seq_len]` 1 for real tokens, 0 for padding.
    pub(crate) mask: Vec<u32>,
    /// Real tokens of each row (the rest is padding).
    pub(crate) lens: Vec<usize>,
    pub(crate) batch: usize,
    pub(crate) seq_len: usize,
}

/// The encoder on one backend, behind a trait object so [`Embedder`] is not generic.
trait Encode: Send + Sync {
    /// L2-normalised, mean-pooled embeddings of one batch, `[batch][dim]`.
    fn encode(&self, batch: &Batch) -> Result<Vec<Vec<f32>>, EmbedError>;
}

impl<B: Backend> Encode for BertModel<B> {
    fn encode(&self, batch: &Batch) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.embed_batch(batch)
    }
}

impl Encode for HostBert {
    fn encode(&self, batch: &Batch) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.embed_batch(batch)
    }
}

/// A loaded sentence embedder. Cheap to clone (the model is shared); `embed` may be called from
/// several threads.
#[derive(Clone)]
pub struct Embedder {
    model: Arc<dyn Encode>,
    tokenizer: Arc<Tokenizer>,
    /// The same tokenizer without truncation, for [`Embedder::count_tokens`] (a chunker asks
    /// many times per chunk; cloning the vocabulary each time took a fifth of an ingest).
    counter: Arc<Tokenizer>,
    dim: usize,
    max_seq_len: usize,
    batch_size: usize,
    device: String,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("dim", &self.dim)
            .field("max_seq_len", &self.max_seq_len)
            .field("batch_size", &self.batch_size)
            .field("device", &self.device)
            .finish()
    }
}

struct LoadBert {
    dir: PathBuf,
    config: BertConfig,
}

impl BackendVisitor for LoadBert {
    type Output = Result<Arc<dyn Encode>, EmbedError>;

    fn visit<B: crate::llm::qweight::QuantOps>(
        self,
        device: B::Device,
        resolved: &Device,
    ) -> Self::Output {
        let model = BertModel::<B>::load(
            &self.dir.join("model.safetensors"),
            self.config,
            &device,
            resolved.is_cpu(),
        )?;
        Ok(Arc::new(model))
    }
}

impl Embedder {
    /// Loads the model in `dir` onto `device` with default options.
    pub fn load(dir: &Path, device: &Device) -> Result<Embedder, EmbedError> {
        Embedder::load_with(dir, device, EmbedderOptions::default())
    }

    /// Loads the model in `dir` onto `device`.
    pub fn load_with(
        dir: &Path,
        device: &Device,
        options: EmbedderOptions,
    ) -> Result<Embedder, EmbedError> {
        let config_path = dir.join("config.json");
        let config = BertConfig::from_file(&config_path)?;
        let max_seq_len = match options.max_seq_len {
            Some(n) => n,
            None => read_max_seq_len(&dir.join("sentence_bert_config.json"))?,
        }
        .min(config.max_position_embeddings);
        if max_seq_len < 2 {
            return Err(EmbedError::Config {
                path: dir.join("sentence_bert_config.json"),
                reason: format!("max_seq_length {max_seq_len} leaves no room for text"),
            });
        }
        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|e| EmbedError::Tokenizer {
                context: format!("loading {}", tokenizer_path.display()),
                reason: e.to_string(),
            })?;
        // tokenizer.json of sentence-transformers models pads and truncates to 128; we pad per
        // batch ourselves and truncate at the model's max_seq_length.
        tokenizer.with_padding(None);
        let mut counter = tokenizer.clone();
        counter
            .with_truncation(None)
            .map_err(|e| EmbedError::Tokenizer {
                context: "counting tokens".to_string(),
                reason: e.to_string(),
            })?;
        let counter = Arc::new(counter);
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_seq_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| EmbedError::Tokenizer {
                context: "setting truncation".to_string(),
                reason: e.to_string(),
            })?;
        let dim = config.hidden_size;
        // On the CPU the host encoder (Q8_0 kernels, no padding) runs unless f32 is asked for;
        // Burn runs the GPUs.
        let model: Arc<dyn Encode> = if device.is_cpu() && options.precision == EmbedPrecision::Q8 {
            let threads = match options.threads {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n,
            };
            Arc::new(HostBert::load(
                &dir.join("model.safetensors"),
                config,
                threads,
            )?)
        } else {
            device.visit(LoadBert {
                dir: dir.to_path_buf(),
                config,
            })?
        };
        Ok(Embedder {
            model,
            tokenizer: Arc::new(tokenizer),
            counter,
            dim,
            max_seq_len,
            batch_size: options.batch_size.max(1),
            device: device.to_string(),
        })
    }

    /// Dimension of the embeddings.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Longest input in tokens (special tokens included); longer texts are truncated.
    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    /// Number of tokens of `text` as the model sees it (special tokens included, before
    /// truncation), e.g. for chunking documents to fit.
    pub fn count_tokens(&self, text: &str) -> Result<usize, EmbedError> {
        let enc = self
            .counter
            .encode(text, true)
            .map_err(|e| EmbedError::Tokenizer {
                context: "counting tokens".to_string(),
                reason: e.to_string(),
            })?;
        Ok(enc.get_ids().len())
    }

    /// Embeds `texts`: one L2-normalised vector of [`Embedder::dim`] values per text, in order.
    pub fn embed<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.embed_counted(texts).map(|(vectors, _)| vectors)
    }

    /// [`Embedder::embed`], and the tokens the model read (special tokens included, each text
    /// cut at [`Embedder::max_seq_len`]), for usage figures without tokenizing twice.
    pub fn embed_counted<S: AsRef<str>>(
        &self,
        texts: &[S],
    ) -> Result<(Vec<Vec<f32>>, usize), EmbedError> {
        if texts.len() > MAX_TEXTS_PER_CALL {
            return Err(EmbedError::TooManyTexts {
                count: texts.len(),
                limit: MAX_TEXTS_PER_CALL,
            });
        }
        if texts.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let inputs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        let encodings =
            self.tokenizer
                .encode_batch(inputs, true)
                .map_err(|e| EmbedError::Tokenizer {
                    context: "encoding the input texts".to_string(),
                    reason: e.to_string(),
                })?;
        // Sort by length so that each batch pads little; restore the order at the end.
        let mut order: Vec<usize> = (0..encodings.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encodings[i].get_ids().len()));
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); encodings.len()];
        for chunk in order.chunks(self.batch_size) {
            let seq_len = chunk
                .iter()
                .map(|&i| encodings[i].get_ids().len())
                .max()
                .unwrap_or(0)
                .max(1);
            let mut batch = Batch {
                ids: vec![0; chunk.len() * seq_len],
                type_ids: vec![0; chunk.len() * seq_len],
                mask: vec![0; chunk.len() * seq_len],
                lens: Vec::with_capacity(chunk.len()),
                batch: chunk.len(),
                seq_len,
            };
            for (row, &i) in chunk.iter().enumerate() {
                let enc = &encodings[i];
                let base = row * seq_len;
                let n = enc.get_ids().len();
                batch.lens.push(n);
                batch.ids[base..base + n].copy_from_slice(enc.get_ids());
                batch.type_ids[base..base + n].copy_from_slice(enc.get_type_ids());
                batch.mask[base..base + n].copy_from_slice(enc.get_attention_mask());
            }
            let vectors = self.model.encode(&batch)?;
            for (&i, v) in chunk.iter().zip(vectors) {
                out[i] = v;
            }
        }
        let tokens = encodings.iter().map(|e| e.get_ids().len()).sum();
        Ok((out, tokens))
    }
}

fn read_max_seq_len(path: &Path) -> Result<usize, EmbedError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DEFAULT_MAX_SEQ_LEN),
        Err(source) => {
            return Err(EmbedError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| EmbedError::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    match value.get("max_seq_length") {
        None => Ok(DEFAULT_MAX_SEQ_LEN),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| EmbedError::Config {
                path: path.to_path_buf(),
                reason: format!("max_seq_length must be a positive integer, got {v}"),
            }),
    }
}

/// Cosine similarity of two vectors (the dot product for normalised embeddings).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_of_known_vectors() {
        assert!((cosine(&[1.0, 0.0], &[1.0, 0.0]) - 1.0).abs() < 1e-6);
        assert!(cosine(&[1.0, 0.0], &[0.0, 2.0]).abs() < 1e-6);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }

    #[test]
    fn max_seq_len_defaults_and_parses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sentence_bert_config.json");
        assert_eq!(read_max_seq_len(&path).unwrap(), DEFAULT_MAX_SEQ_LEN);
        std::fs::write(&path, r#"{"max_seq_length": 128}"#).unwrap();
        assert_eq!(read_max_seq_len(&path).unwrap(), 128);
        std::fs::write(&path, r#"{"max_seq_length": -1}"#).unwrap();
        let err = read_max_seq_len(&path).unwrap_err().to_string();
        assert!(err.contains("max_seq_length"), "{err}");
    }
}
