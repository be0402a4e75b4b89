//! Hyper-parameters of a llama-family model, read from GGUF metadata.

use crate::gguf::{GgufFile, MetadataValue};

use super::LlmError;

/// The architectures this crate runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// `llama`: Llama 2 and 3.x, Mistral, SmolLM2 and other files converted as llama. A
    /// `llama.attention.sliding_window` key (Mistral 7B v0.1) limits every layer's attention to
    /// that many positions.
    Llama,
    /// `qwen2`: Qwen2 and Qwen2.5 (biases on q, k and v; NEOX rotary embedding).
    Qwen2,
    /// `qwen3`: Qwen3 dense models (RMSNorm of each query and key head before the rotary
    /// embedding, no biases; NEOX rotary embedding).
    Qwen3,
    /// `phi3`: Phi-3 and Phi-3.5 mini (q, k and v in one matrix `attn_qkv`, gate and up in one
    /// `ffn_up`; NEOX rotary embedding).
    Phi3,
    /// `gemma3`: Gemma 3 text models (embeddings scaled by the square root of their width,
    /// RMSNorm of each query and key head, norms after attention and after the feed-forward
    /// block as well as before, a GELU-gated feed-forward block, and five sliding-window layers
    /// (their own rotary base) for each global one).
    Gemma3,
}

/// The feed-forward block's gate activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnActivation {
    /// `silu(gate) * up` (SwiGLU).
    Silu,
    /// `gelu(gate) * up` with GELU's tanh approximation (GeGLU, as llama.cpp and Gemma compute).
    GeluTanh,
}

impl Architecture {
    /// The GGUF name (`general.architecture`).
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Phi3 => "phi3",
            Architecture::Gemma3 => "gemma3",
        }
    }
}

/// How the rotary embedding pairs up the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(x[2i], x[2i+1])`: GGUF `llama` files (q and k are permuted at
    /// conversion so that this is right).
    Interleaved,
    /// Pairs `(x[i], x[i + d/2])` (GPT-NeoX): `qwen2`, `qwen3`, `phi3`, `gemma3`.
    Neox,
}

/// Hyper-parameters of a llama-family decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct LlmConfig {
    /// The architecture.
    pub architecture: Architecture,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Number of query heads.
    pub n_heads: usize,
    /// Number of key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Hidden width of the feed-forward block.
    pub d_ff: usize,
    /// Vocabulary size (rows of `token_embd`).
    pub vocab_size: usize,
    /// The context length the model was trained for.
    pub train_context: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// RoPE base frequency.
    pub rope_base: f32,
    /// How many dimensions of each head are rotated (the first `rope_dim`).
    pub rope_dim: usize,
    /// The pairing of rotated dimensions.
    pub rope_style: RopeStyle,
    /// Linear position scaling (`rope.scaling.factor` with type `linear`); 1 when absent.
    pub rope_linear_factor: f32,
    /// Whether q, k and v have biases.
    pub qkv_bias: bool,
    /// Whether each query and key head is RMS-normalised (weights `attn_q_norm`,
    /// `attn_k_norm` of `head_dim` values) before the rotary embedding.
    pub qk_norm: bool,
    /// What the token embeddings are multiplied by (gemma3: `sqrt(d_model)`).
    pub embed_scale: Option<f32>,
    /// Whether the attention output and the feed-forward output are RMS-normalised before
    /// their residual additions (`post_attention_norm`, `post_ffw_norm`).
    pub post_norms: bool,
    /// The feed-forward gate's activation.
    pub ffn_activation: FfnActivation,
    /// The sliding window of the local layers: a query attends to the last `window` positions
    /// (itself included). `None`: every layer is global.
    pub sliding_window: Option<usize>,
    /// Every `global_every`-th layer is global (layers `global_every - 1`, `2 global_every - 1`,
    /// ...), the others local, when there is a sliding window (0: all layers local).
    pub global_every: usize,
    /// The rotary base of the local layers when it differs from the global one (Gemma 3; their
    /// positions are not scaled). `None`: every layer uses the global rotary embedding.
    pub rope_base_local: Option<f32>,
    /// Whether the LM head reuses `token_embd` (no `output.weight` tensor).
    pub tied_embeddings: bool,
    /// Whether the file has a `rope_freqs.weight` tensor (Llama 3.1+ frequency scaling).
    pub rope_freq_factors: bool,
}

impl LlmConfig {
    /// Reads and checks the hyper-parameters of `file`.
    pub fn from_gguf(file: &GgufFile) -> Result<LlmConfig, LlmError> {
        let arch_name = file
            .get("general.architecture")
            .and_then(MetadataValue::as_str)
            .ok_or(LlmError::MissingMetadata {
                key: "general.architecture".to_string(),
            })?;
        let architecture = match arch_name {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            "qwen3" => Architecture::Qwen3,
            "phi3" => Architecture::Phi3,
            "gemma3" => Architecture::Gemma3,
            other => {
                return Err(LlmError::UnsupportedArchitecture {
                    architecture: other.to_string(),
                });
            }
        };
        let key = |suffix: &str| format!("{arch_name}.{suffix}");
        let usize_key = |suffix: &str| -> Result<Option<usize>, LlmError> {
            let k = key(suffix);
            match file.get(&k) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|v| usize::try_from(v).ok())
                    .map(Some)
                    .ok_or_else(|| LlmError::InvalidMetadata {
                        key: k,
                        reason: "expected a non-negative integer".to_string(),
                    }),
            }
        };
        let required = |suffix: &str| -> Result<usize, LlmError> {
            usize_key(suffix)?.ok_or_else(|| LlmError::MissingMetadata { key: key(suffix) })
        };
        let f32_key =
            |suffix: &str| -> Result<Option<f32>, LlmError> {
                let k = key(suffix);
                match file.get(&k) {
                    None => Ok(None),
                    Some(v) => v.as_f64().map(|v| Some(v as f32)).ok_or_else(|| {
                        LlmError::InvalidMetadata {
                            key: k,
                            reason: "expected a number".to_string(),
                        }
                    }),
                }
            };

        let n_layers = required("block_count")?;
        let d_model = required("embedding_length")?;
        let n_heads = required("attention.head_count")?;
        let n_kv_heads = usize_key("attention.head_count_kv")?.unwrap_or(n_heads);
        let d_ff = required("feed_forward_length")?;
        let train_context = usize_key("context_length")?.unwrap_or(2048);
        let rms_eps = f32_key("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5);
        let rope_base = f32_key("rope.freq_base")?.unwrap_or(10_000.0);

        let invalid = |k: &str, reason: String| LlmError::InvalidMetadata {
            key: key(k),
            reason,
        };
        if n_layers == 0 || n_layers > 1024 {
            return Err(invalid(
                "block_count",
                format!("{n_layers} is not in 1..=1024"),
            ));
        }
        if n_heads == 0 || d_model % n_heads != 0 {
            return Err(invalid(
                "attention.head_count",
                format!("{n_heads} heads do not divide the embedding length {d_model}"),
            ));
        }
        if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(invalid(
                "attention.head_count_kv",
                format!("{n_kv_heads} key/value heads do not divide {n_heads} query heads"),
            ));
        }
        let head_dim = usize_key("attention.key_length")?.unwrap_or(d_model / n_heads);
        if let Some(v) = usize_key("attention.value_length")?
            && v != head_dim
        {
            return Err(invalid(
                "attention.value_length",
                format!(
                    "value heads of {v} dims differ from key heads of {head_dim}; not supported"
                ),
            ));
        }
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(invalid(
                "attention.key_length",
                format!("head dimension {head_dim} must be even and positive"),
            ));
        }
        let rope_dim = usize_key("rope.dimension_count")?.unwrap_or(head_dim);
        if rope_dim == 0 || rope_dim % 2 != 0 || rope_dim > head_dim {
            return Err(invalid(
                "rope.dimension_count",
                format!("{rope_dim} must be even and at most the head dimension {head_dim}"),
            ));
        }
        if !(rope_base.is_finite() && rope_base > 1.0) {
            return Err(invalid(
                "rope.freq_base",
                format!("{rope_base} must be > 1"),
            ));
        }
        if !(rms_eps.is_finite() && rms_eps > 0.0) {
            return Err(invalid(
                "attention.layer_norm_rms_epsilon",
                format!("{rms_eps} must be > 0"),
            ));
        }

        let scaling_type = file
            .get(&key("rope.scaling.type"))
            .and_then(MetadataValue::as_str)
            .unwrap_or("none");
        let scaling_factor = f32_key("rope.scaling.factor")?.unwrap_or(1.0);
        let rope_linear_factor = match scaling_type {
            "none" => 1.0,
            "linear" => {
                if !(scaling_factor.is_finite() && scaling_factor > 0.0) {
                    return Err(invalid(
                        "rope.scaling.factor",
                        format!("{scaling_factor} must be > 0"),
                    ));
                }
                scaling_factor
            }
            // Llama 3.1 files carry their scaling in the rope_freqs tensor; a "llama3" type is
            // accepted when that tensor is present (checked below).
            "llama3" => 1.0,
            other => {
                return Err(invalid(
                    "rope.scaling.type",
                    format!(
                        "rope scaling {other:?} is not supported (supported: none, linear, llama3 via rope_freqs)"
                    ),
                ));
            }
        };

        let embd = file
            .tensor("token_embd.weight")
            .ok_or_else(|| LlmError::MissingTensor {
                name: "token_embd.weight".to_string(),
            })?;
        if embd.dims.len() != 2 || embd.dims[0] != d_model as u64 {
            return Err(LlmError::TensorShape {
                name: embd.name.clone(),
                dims: embd.dims.clone(),
                expected: format!("[{d_model}, vocab_size]"),
            });
        }
        let vocab_size = usize::try_from(embd.dims[1]).map_err(|_| LlmError::TensorShape {
            name: embd.name.clone(),
            dims: embd.dims.clone(),
            expected: "a vocabulary that fits in memory".to_string(),
        })?;
        if let Some(v) = usize_key("vocab_size")?
            && v != vocab_size
        {
            return Err(invalid(
                "vocab_size",
                format!("{v} disagrees with token_embd.weight's {vocab_size} rows"),
            ));
        }
        let rope_freq_factors = file.tensor("rope_freqs.weight").is_some();
        if scaling_type == "llama3" && !rope_freq_factors {
            return Err(invalid(
                "rope.scaling.type",
                "llama3 scaling without a rope_freqs.weight tensor; re-convert the model with a current llama.cpp".to_string(),
            ));
        }
        let (rope_style, qkv_bias, qk_norm) = match architecture {
            Architecture::Llama => (RopeStyle::Interleaved, false, false),
            Architecture::Qwen2 => (RopeStyle::Neox, true, false),
            Architecture::Qwen3 => (RopeStyle::Neox, false, true),
            Architecture::Phi3 => (RopeStyle::Neox, false, false),
            Architecture::Gemma3 => (RopeStyle::Neox, false, true),
        };
        let gemma3 = architecture == Architecture::Gemma3;
        // Gemma 3 needs its window; a llama file may name one (Mistral 7B v0.1 attends over
        // the last 4 096 positions in every layer); the other architectures attend to all.
        let sliding_window = match architecture {
            Architecture::Gemma3 => Some(required("attention.sliding_window")?),
            Architecture::Llama => usize_key("attention.sliding_window")?,
            _ => None,
        };
        if sliding_window == Some(0) {
            return Err(invalid(
                "attention.sliding_window",
                "must be at least 1".to_string(),
            ));
        }
        if file.tensor("rope_factors_long.weight").is_some() {
            return Err(LlmError::InvalidMetadata {
                key: "rope_factors_long.weight".to_string(),
                reason: "LongRoPE (the 128k-context Phi-3 variants) is not supported; use a \
                         4k-context model"
                    .to_string(),
            });
        }
        Ok(LlmConfig {
            architecture,
            n_layers,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
            d_ff,
            vocab_size,
            train_context,
            rms_eps,
            rope_base,
            rope_dim,
            rope_style,
            rope_linear_factor,
            qkv_bias,
            qk_norm,
            embed_scale: gemma3.then(|| (d_model as f32).sqrt()),
            post_norms: gemma3,
            ffn_activation: if gemma3 {
                FfnActivation::GeluTanh
            } else {
                FfnActivation::Silu
            },
            sliding_window,
            // llama.cpp: every sixth layer of gemma3 is global, the others slide with a
            // rotary base of 10 000 and no scaling.
            global_every: if gemma3 { 6 } else { 0 },
            rope_base_local: gemma3.then_some(10_000.0),
            tied_embeddings: file.tensor("output.weight").is_none(),
            rope_freq_factors,
        })
    }

    /// The sliding window of layer `l`, if it is a local layer.
    pub fn window(&self, l: usize) -> Option<usize> {
        let window = self.sliding_window?;
        let global = self.global_every > 0 && l % self.global_every == self.global_every - 1;
        (!global).then_some(window)
    }

    /// The configuration the local layers' rotary embedding is computed from.
    pub(crate) fn local_rope(&self) -> LlmConfig {
        LlmConfig {
            rope_base: self.rope_base_local.unwrap_or(self.rope_base),
            rope_linear_factor: 1.0,
            ..self.clone()
        }
    }

    /// Width of the key (and value) projections: `n_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Width of the query projection: `n_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
}
