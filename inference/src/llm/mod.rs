//! Llama-family chat models (Llama 2/3.x, Mistral, SmolLM2, Qwen2/2.5, Qwen3, Phi-3, Gemma 3)
//! from GGUF files.
//!
//! One model, two execution paths chosen at load time:
//!
//! - **quantized CPU path** (the default on the `cpu` device): weights stay in their GGUF
//!   encoding in the file's memory map and every linear layer is a [`crate::quant::QMatrix`]
//!   product; norms, RoPE and attention over the KV cache are vectorised loops on slices.
//! - **Burn path** (`wgpu`, `cuda`, or the CPU on request): weights are dequantized to f32
//!   tensors and every operation is a Burn tensor operation, generic over `B: Backend`.
//!
//! Both paths compute the same function; tests check them against each other and against an
//! independent reference. A [`Sequence`] holds the KV cache of one conversation, bounded by a
//! maximum context: running past it is an error that names the limit.

mod config;
mod dense;
mod host;
pub(crate) mod ops;
#[cfg(feature = "cube")]
mod qkernel;
pub mod qweight;
mod rope;

use std::path::Path;
use std::sync::Arc;

use burn::tensor::backend::Backend;

use crate::device::{BackendVisitor, Device};
use crate::gguf::{GgufError, GgufFile};

pub use config::{Architecture, FfnActivation, LlmConfig, RopeStyle};
use dense::{DenseCache, DenseModel};
use host::{HostCache, HostModel};
use qweight::QuantOps;
use rope::Rope;

/// Context limit when the options do not set one (and the model allows that much): bounds the
/// KV cache memory (`2 × layers × context × kv_dim × 4` bytes).
pub const DEFAULT_MAX_CONTEXT: usize = 4096;

/// Everything that can go wrong loading or running a chat model.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// The GGUF file could not be read.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// `general.architecture` names an architecture this crate does not run.
    #[error(
        "unsupported model architecture {architecture:?}: gaia runs llama (Llama 2/3.x, Mistral, \
         SmolLM), qwen2 (Qwen2, Qwen2.5), qwen3 (Qwen3 dense), phi3 (Phi-3 mini) and gemma3 \
         (Gemma 3 text) models"
    )]
    UnsupportedArchitecture {
        /// The architecture named by the file.
        architecture: String,
    },
    /// A required metadata key is absent.
    #[error("the model file lacks metadata key {key}; is it a complete llama.cpp conversion?")]
    MissingMetadata {
        /// The key.
        key: String,
    },
    /// A metadata value is invalid.
    #[error("invalid model metadata {key}: {reason}")]
    InvalidMetadata {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A required tensor is absent.
    #[error("the model file lacks tensor {name}")]
    MissingTensor {
        /// The tensor's name.
        name: String,
    },
    /// A tensor's shape does not match the hyper-parameters.
    #[error("tensor {name} has dims {dims:?}, expected {expected}")]
    TensorShape {
        /// The tensor's name.
        name: String,
        /// Its dims (GGUF order).
        dims: Vec<u64>,
        /// What the hyper-parameters call for.
        expected: String,
    },
    /// The sequence would exceed its maximum context.
    #[error(
        "the context limit of {limit} tokens is exceeded ({requested} tokens needed); shorten \
         the prompt or lower max_tokens"
    )]
    ContextOverflow {
        /// The maximum context of the sequence.
        limit: usize,
        /// Positions the operation needed.
        requested: usize,
    },
    /// A token id outside the vocabulary.
    #[error("token id {token} is outside the vocabulary of {vocab_size} tokens")]
    InvalidToken {
        /// The token.
        token: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// The backend failed.
    #[error("inference backend error: {0}")]
    Backend(String),
}

/// Which kernels run the model on the CPU device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuKernels {
    /// Quantized weights in place, hand-written kernels (fast, small). Activations are
    /// quantized to 8 bits for the integer dot products, like llama.cpp does.
    #[default]
    Quantized,
    /// The same kernels with weights dequantized to f32: exact activations, four to eight times
    /// the memory and slower (for accuracy checks).
    F32,
    /// Dequantized f32 weights and Burn operations (slow; for cross-checks).
    Burn,
}

/// How to load a chat model.
#[derive(Clone, Debug)]
pub struct LlmOptions {
    /// Threads of the CPU kernels (default 2).
    pub threads: usize,
    /// Maximum context of a sequence; default `min(training context, DEFAULT_MAX_CONTEXT)`.
    pub max_context: Option<usize>,
    /// The CPU execution path.
    pub cpu_kernels: CpuKernels,
}

impl Default for LlmOptions {
    fn default() -> Self {
        LlmOptions {
            threads: 2,
            max_context: None,
            cpu_kernels: CpuKernels::Quantized,
        }
    }
}

/// A model's weights on one execution path.
trait Backbone: Send + Sync {
    fn new_state(self: Arc<Self>) -> Box<dyn SequenceState>;
    /// Steps several sequences of this model together, when the path can (`None`: one of them
    /// is not this backbone's, or the path has no batched step; the caller runs them one by
    /// one).
    fn step_batch(
        &self,
        _batch: &mut [(&mut (dyn SequenceState + 'static), &[u32])],
        _logits: &mut [Vec<f32>],
    ) -> Option<Result<(), LlmError>> {
        None
    }
    /// Bytes the weights take on a Burn device (`None` on the host path).
    fn device_weight_bytes(&self) -> Option<usize> {
        None
    }
}

/// The per-sequence state (KV cache) of one execution path.
trait SequenceState: Send {
    fn len(&self) -> usize;
    fn forward(&mut self, tokens: &[u32], logits: &mut Vec<f32>) -> Result<(), LlmError>;
    fn truncate(&mut self, len: usize);
    fn cache_bytes(&self) -> usize;
    /// A new state holding the first `len` positions of this one.
    fn fork(&self, len: usize) -> Box<dyn SequenceState>;
    /// Frees memory only needed while running (the state is kept for later reuse).
    fn release_scratch(&mut self) {}
    /// Makes room for `positions` in all, so that running up to them allocates and copies
    /// nothing more (a path whose cache grows cheaply may ignore it).
    fn reserve(&mut self, _positions: usize) {}
    /// The CPU path's state, which batched steps take together.
    fn host(&mut self) -> Option<&mut HostState> {
        None
    }
    /// This state as `Any`, for a backbone's batched step to find its own states.
    fn as_any(&mut self) -> &mut dyn std::any::Any;
}

struct HostState {
    model: Arc<HostModel>,
    cache: HostCache,
    head_dim: usize,
}

impl Backbone for HostModel {
    fn new_state(self: Arc<Self>) -> Box<dyn SequenceState> {
        let cache = HostCache::new(&self);
        let head_dim = self.head_dim();
        Box::new(HostState {
            model: self,
            cache,
            head_dim,
        })
    }
}

impl SequenceState for HostState {
    fn len(&self) -> usize {
        self.cache.len()
    }
    fn forward(&mut self, tokens: &[u32], logits: &mut Vec<f32>) -> Result<(), LlmError> {
        self.model.forward(&mut self.cache, tokens, logits)
    }
    fn truncate(&mut self, len: usize) {
        self.cache.truncate(len, self.head_dim);
    }
    fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }
    fn fork(&self, len: usize) -> Box<dyn SequenceState> {
        Box::new(HostState {
            model: Arc::clone(&self.model),
            cache: self.cache.fork(len, self.head_dim),
            head_dim: self.head_dim,
        })
    }
    fn release_scratch(&mut self) {
        self.cache.release_scratch();
    }
    fn host(&mut self) -> Option<&mut HostState> {
        Some(self)
    }
    fn as_any(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

struct DenseState<B: Backend> {
    model: Arc<DenseModel<B>>,
    cache: DenseCache<B>,
}

impl<B: QuantOps> Backbone for DenseModel<B> {
    fn new_state(self: Arc<Self>) -> Box<dyn SequenceState> {
        Box::new(DenseState {
            model: self,
            cache: DenseCache::new(),
        })
    }

    fn step_batch(
        &self,
        batch: &mut [(&mut (dyn SequenceState + 'static), &[u32])],
        logits: &mut [Vec<f32>],
    ) -> Option<Result<(), LlmError>> {
        let mut caches: Vec<(&mut DenseCache<B>, &[u32])> = Vec::with_capacity(batch.len());
        for (state, tokens) in batch.iter_mut() {
            let dense = state.as_any().downcast_mut::<DenseState<B>>()?;
            if !std::ptr::eq(Arc::as_ptr(&dense.model), self) {
                return None;
            }
            caches.push((&mut dense.cache, *tokens));
        }
        Some(self.forward_batch(&mut caches, logits))
    }

    fn device_weight_bytes(&self) -> Option<usize> {
        Some(self.weight_bytes())
    }
}

impl<B: QuantOps> SequenceState for DenseState<B> {
    fn len(&self) -> usize {
        self.cache.len()
    }
    fn forward(&mut self, tokens: &[u32], logits: &mut Vec<f32>) -> Result<(), LlmError> {
        self.model.forward(&mut self.cache, tokens, logits)
    }
    fn truncate(&mut self, len: usize) {
        self.cache.truncate(len);
    }
    fn cache_bytes(&self) -> usize {
        self.cache.bytes(self.model.config())
    }
    fn reserve(&mut self, positions: usize) {
        self.model.reserve(&mut self.cache, positions);
    }
    fn fork(&self, len: usize) -> Box<dyn SequenceState> {
        Box::new(DenseState {
            model: Arc::clone(&self.model),
            cache: self.cache.fork(len),
        })
    }
    fn as_any(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// A loaded chat model (weights only). Cheap to clone; sequences are created per request.
#[derive(Clone)]
pub struct LlmModel {
    config: Arc<LlmConfig>,
    backbone: Arc<dyn Backbone>,
    max_context: usize,
    device: String,
    path_name: &'static str,
    file: GgufFile,
}

impl std::fmt::Debug for LlmModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmModel")
            .field("config", &self.config)
            .field("max_context", &self.max_context)
            .field("device", &self.device)
            .field("path", &self.path_name)
            .finish()
    }
}

struct LoadDense<'a> {
    file: &'a GgufFile,
    config: &'a LlmConfig,
    rope: Rope,
}

impl BackendVisitor for LoadDense<'_> {
    /// The model, and whether its weights stay quantized on the device.
    type Output = Result<(Arc<dyn Backbone>, bool), LlmError>;
    fn visit<B: QuantOps>(self, device: B::Device, _resolved: &Device) -> Self::Output {
        let model = DenseModel::<B>::load(self.file, self.config, self.rope, &device)?;
        Ok((Arc::new(model), B::ON_DEVICE))
    }
}

impl LlmModel {
    /// Opens the GGUF file at `path` and loads the model onto `device`.
    pub fn load(path: &Path, device: &Device, options: &LlmOptions) -> Result<LlmModel, LlmError> {
        let file = GgufFile::open(path)?;
        LlmModel::build(file, device, options, true)
    }

    /// Loads the model of an open GGUF file onto `device`. Prefer [`LlmModel::load`] for files
    /// on disk: knowing the map is file-backed lets it release pages it copied.
    pub fn from_gguf(
        file: GgufFile,
        device: &Device,
        options: &LlmOptions,
    ) -> Result<LlmModel, LlmError> {
        LlmModel::build(file, device, options, false)
    }

    fn build(
        file: GgufFile,
        device: &Device,
        options: &LlmOptions,
        file_backed: bool,
    ) -> Result<LlmModel, LlmError> {
        let config = LlmConfig::from_gguf(&file)?;
        let factors = if config.rope_freq_factors {
            Some(host::vector(
                &file,
                "rope_freqs.weight",
                config.rope_dim / 2,
            )?)
        } else {
            None
        };
        let rope = Rope::new(&config, factors.as_deref());
        let host = device.is_cpu() && options.cpu_kernels != CpuKernels::Burn;
        let mut quantized_on_device = false;
        let backbone: Arc<dyn Backbone> = if host {
            let f32_weights = options.cpu_kernels == CpuKernels::F32;
            Arc::new(HostModel::load(
                &file,
                &config,
                rope,
                options.threads.max(1),
                f32_weights,
                file_backed,
            )?)
        } else {
            let (backbone, quantized) = device.visit(LoadDense {
                file: &file,
                config: &config,
                rope,
            })?;
            quantized_on_device = quantized;
            backbone
        };
        let max_context = options
            .max_context
            .unwrap_or_else(|| config.train_context.min(DEFAULT_MAX_CONTEXT))
            .max(1);
        Ok(LlmModel {
            config: Arc::new(config),
            backbone,
            max_context,
            device: device.to_string(),
            path_name: match (host, options.cpu_kernels) {
                (false, _) if quantized_on_device => {
                    "burn tensors, quantized weights on the device"
                }
                (false, _) => "burn tensors",
                (true, CpuKernels::F32) => "cpu kernels, f32 weights",
                (true, _) => "quantized cpu kernels",
            },
            file,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &LlmConfig {
        &self.config
    }

    /// The GGUF file the model was loaded from (metadata, tokenizer, chat template).
    pub fn gguf(&self) -> &GgufFile {
        &self.file
    }

    /// The maximum context of new sequences.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Where and how the model runs, for logs (`cpu, quantized cpu kernels`).
    pub fn describe(&self) -> String {
        format!("{}, {}", self.device, self.path_name)
    }

    /// Bytes the weights take on the device of the Burn path (wgpu, CUDA, or the CPU backend
    /// with `CpuKernels::Burn`); `None` on the CPU kernels' path.
    pub fn device_weight_bytes(&self) -> Option<usize> {
        self.backbone.device_weight_bytes()
    }

    /// A new, empty sequence (its own KV cache) with the model's maximum context.
    pub fn new_sequence(&self) -> Sequence {
        Sequence {
            state: Arc::clone(&self.backbone).new_state(),
            max_context: self.max_context,
            vocab_size: self.config.vocab_size,
        }
    }
}

/// The most tokens one batched step takes, all sequences together ([`LlmModel::forward_batch`]).
pub const MAX_BATCH_TOKENS: usize = host::CHUNK;

impl LlmModel {
    /// One step of several sequences of this model at once (continuous batching): each
    /// `batch[i].0` runs `batch[i].1` (a chunk of its prompt, or its last sampled token) and
    /// gets the logits of its last token in `logits[i]`. On the quantized CPU path the
    /// sequences' rows share every read of the weights, so a step of eight sequences costs far
    /// less than eight steps; the logits are those each sequence would get alone. The Burn
    /// path (wgpu, CUDA) stacks the sequences' rows for every weight product too, with attention
    /// per sequence. At most [`MAX_BATCH_TOKENS`] tokens in all, at least one per sequence; a
    /// sequence that would overflow its context fails the whole step before anything runs.
    pub fn forward_batch(
        &self,
        batch: &mut [(&mut Sequence, &[u32])],
        logits: &mut [Vec<f32>],
    ) -> Result<(), LlmError> {
        for (seq, tokens) in batch.iter() {
            let requested = seq.len() + tokens.len();
            if requested > seq.max_context {
                return Err(LlmError::ContextOverflow {
                    limit: seq.max_context,
                    requested,
                });
            }
        }
        // One sequence alone may bring a whole prompt (its path chunks it); several share the
        // step's bound.
        let total: usize = batch.iter().map(|(_, t)| t.len()).sum();
        let several = batch.len() > 1;
        if (several && (total > MAX_BATCH_TOKENS || batch.iter().any(|(_, t)| t.is_empty())))
            || logits.len() != batch.len()
        {
            return Err(LlmError::Backend(format!(
                "a batched step takes 1 to {MAX_BATCH_TOKENS} tokens in all, at least one per \
                 sequence ({total} tokens for {} sequences, {} logit buffers)",
                batch.len(),
                logits.len()
            )));
        }
        let host = several && batch.iter_mut().all(|(seq, _)| seq.state.host().is_some());
        if !host {
            if several {
                let mut states: Vec<(&mut (dyn SequenceState + 'static), &[u32])> = batch
                    .iter_mut()
                    .map(|(seq, tokens)| (seq.state.as_mut(), *tokens))
                    .collect();
                if let Some(result) = self.backbone.step_batch(&mut states, logits) {
                    return result;
                }
            }
            for ((seq, tokens), out) in batch.iter_mut().zip(logits.iter_mut()) {
                seq.forward(tokens, out)?;
            }
            return Ok(());
        }
        let mut model: Option<Arc<HostModel>> = None;
        let mut caches: Vec<(&mut HostCache, &[u32])> = Vec::with_capacity(batch.len());
        for (seq, tokens) in batch.iter_mut() {
            let Some(state) = seq.state.host() else {
                continue;
            };
            match &model {
                Some(m) if !Arc::ptr_eq(m, &state.model) => {
                    return Err(LlmError::Backend(
                        "a batch mixes sequences of different models".into(),
                    ));
                }
                Some(_) => {}
                None => model = Some(Arc::clone(&state.model)),
            }
            caches.push((&mut state.cache, tokens));
        }
        match model {
            Some(model) => model.forward_batch(&mut caches, logits),
            None => Ok(()),
        }
    }
}

/// One sequence being decoded: its KV cache and position.
pub struct Sequence {
    state: Box<dyn SequenceState>,
    max_context: usize,
    vocab_size: usize,
}

impl std::fmt::Debug for Sequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequence")
            .field("len", &self.len())
            .field("max_context", &self.max_context)
            .finish()
    }
}

impl Sequence {
    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.state.len()
    }

    /// Whether no token has been run yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most positions this sequence may hold.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Vocabulary size (the length of the logits).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Runs `tokens` (all of a prompt at once, or one decoded token) and writes the logits of
    /// the last one into `logits`. Fails without changing the cache if the context would
    /// overflow.
    pub fn forward(&mut self, tokens: &[u32], logits: &mut Vec<f32>) -> Result<(), LlmError> {
        let requested = self.len() + tokens.len();
        if requested > self.max_context {
            return Err(LlmError::ContextOverflow {
                limit: self.max_context,
                requested,
            });
        }
        self.state.forward(tokens, logits)
    }

    /// Makes room for `positions` in all (at most the context): on a GPU the KV cache is
    /// allocated once at that size, so a generation whose bound is known (its prompt and
    /// `max_tokens`) never grows and copies it. Running past it still works (the cache then
    /// grows in steps).
    pub fn reserve(&mut self, positions: usize) {
        self.state.reserve(positions.min(self.max_context));
    }

    /// Forgets every position from `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.state.truncate(len);
    }

    /// Bytes of KV cache held (on a GPU: the backend's tensors, counted at 4 bytes a value).
    pub fn cache_bytes(&self) -> usize {
        self.state.cache_bytes()
    }

    /// A new sequence holding a copy of this one's first `len` positions (at most
    /// [`len`](Self::len)): the KV state of a shared prefix, without running it again.
    pub fn fork(&self, len: usize) -> Sequence {
        Sequence {
            state: self.state.fork(len.min(self.len())),
            max_context: self.max_context,
            vocab_size: self.vocab_size,
        }
    }

    /// Frees the memory only needed while running (scratch space), for a sequence kept to be
    /// reused later.
    pub fn release_scratch(&mut self) {
        self.state.release_scratch();
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests;
