//! The BERT encoder on Burn, with weights from a safetensors file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::activation::{gelu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use super::{Batch, EmbedError};

/// The fields of a Hugging Face BERT `config.json` the encoder needs.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
pub struct BertConfig {
    /// Width of the hidden states (the embedding dimension).
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Hidden width of the feed-forward block.
    pub intermediate_size: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest sequence the position embeddings cover.
    pub max_position_embeddings: usize,
    /// Number of token types (segments).
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Activation of the feed-forward block (`gelu` is supported).
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".to_string()
}

impl BertConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<BertConfig, EmbedError> {
        let text = std::fs::read_to_string(path).map_err(|source| EmbedError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let config: BertConfig = serde_json::from_str(&text).map_err(|e| EmbedError::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let bad = |reason: String| EmbedError::Config {
            path: path.to_path_buf(),
            reason,
        };
        if config.hidden_act != "gelu" {
            return Err(bad(format!(
                "hidden_act {:?} is not supported (only gelu)",
                config.hidden_act
            )));
        }
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return Err(bad(format!(
                "{} heads do not divide hidden_size {}",
                config.num_attention_heads, config.hidden_size
            )));
        }
        let sane = |v: usize| v > 0 && v <= 1 << 20;
        if !(sane(config.hidden_size)
            && sane(config.intermediate_size)
            && sane(config.vocab_size)
            && sane(config.max_position_embeddings)
            && sane(config.type_vocab_size)
            && config.num_hidden_layers > 0
            && config.num_hidden_layers <= 256)
        {
            return Err(bad("a dimension is zero or implausibly large".to_string()));
        }
        Ok(config)
    }
}

/// One encoder layer; linear weights are stored `[in, out]` so `x.matmul(w)` needs no
/// transposed view.
#[derive(Debug)]
struct Layer<B: Backend> {
    w_q: Tensor<B, 2>,
    b_q: Tensor<B, 1>,
    w_k: Tensor<B, 2>,
    b_k: Tensor<B, 1>,
    w_v: Tensor<B, 2>,
    b_v: Tensor<B, 1>,
    w_o: Tensor<B, 2>,
    b_o: Tensor<B, 1>,
    ln1: (Tensor<B, 1>, Tensor<B, 1>),
    w_in: Tensor<B, 2>,
    b_in: Tensor<B, 1>,
    w_out: Tensor<B, 2>,
    b_out: Tensor<B, 1>,
    ln2: (Tensor<B, 1>, Tensor<B, 1>),
}

/// A BERT encoder with mean pooling and L2 normalisation.
#[derive(Debug)]
pub(crate) struct BertModel<B: Backend> {
    config: BertConfig,
    device: B::Device,
    word: Tensor<B, 2>,
    position: Tensor<B, 2>,
    token_type: Tensor<B, 2>,
    ln_emb: (Tensor<B, 1>, Tensor<B, 1>),
    layers: Vec<Layer<B>>,
    /// Compute GELU on the host (the CPU backend; zero-copy there).
    host_gelu: bool,
}

impl<B: Backend> BertModel<B> {
    /// Loads the weights of `path` (Hugging Face names, with or without a `bert.` prefix).
    pub(crate) fn load(
        path: &Path,
        config: BertConfig,
        device: &B::Device,
        host_gelu: bool,
    ) -> Result<BertModel<B>, EmbedError> {
        let file = SafeTensors::open(path)?;
        let d = config.hidden_size;
        let load =
            |name: &str, shape: &[usize]| -> Result<Vec<f32>, EmbedError> { file.f32(name, shape) };
        let vec1 = |name: &str, n: usize| -> Result<Tensor<B, 1>, EmbedError> {
            Ok(Tensor::from_data(
                TensorData::new(load(name, &[n])?, [n]),
                device,
            ))
        };
        let mat = |name: &str, rows: usize, cols: usize| -> Result<Tensor<B, 2>, EmbedError> {
            Ok(Tensor::from_data(
                TensorData::new(load(name, &[rows, cols])?, [rows, cols]),
                device,
            ))
        };
        // PyTorch linear weights are [out, in]: transpose on the host once.
        let linear_t = |name: &str, out: usize, inp: usize| -> Result<Vec<f32>, EmbedError> {
            let w = load(name, &[out, inp])?;
            let mut t = vec![0.0f32; w.len()];
            for o in 0..out {
                for i in 0..inp {
                    t[i * out + o] = w[o * inp + i];
                }
            }
            Ok(t)
        };
        let ln = |prefix: &str| -> Result<(Tensor<B, 1>, Tensor<B, 1>), EmbedError> {
            Ok((
                vec1(&format!("{prefix}.weight"), d)?,
                vec1(&format!("{prefix}.bias"), d)?,
            ))
        };
        let word = mat("embeddings.word_embeddings.weight", config.vocab_size, d)?;
        let position = mat(
            "embeddings.position_embeddings.weight",
            config.max_position_embeddings,
            d,
        )?;
        let token_type = mat(
            "embeddings.token_type_embeddings.weight",
            config.type_vocab_size,
            d,
        )?;
        let ln_emb = ln("embeddings.LayerNorm")?;
        let ff = config.intermediate_size;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            let t2 = |data: Vec<f32>, rows: usize, cols: usize| {
                Tensor::<B, 2>::from_data(TensorData::new(data, [rows, cols]), device)
            };
            let attn = |name: &str| -> Result<(Tensor<B, 2>, Tensor<B, 1>), EmbedError> {
                let w = linear_t(&format!("{p}.attention.self.{name}.weight"), d, d)?;
                Ok((
                    t2(w, d, d),
                    vec1(&format!("{p}.attention.self.{name}.bias"), d)?,
                ))
            };
            let (w_q, b_q) = attn("query")?;
            let (w_k, b_k) = attn("key")?;
            let (w_v, b_v) = attn("value")?;
            layers.push(Layer {
                w_q,
                b_q,
                w_k,
                b_k,
                w_v,
                b_v,
                w_o: t2(
                    linear_t(&format!("{p}.attention.output.dense.weight"), d, d)?,
                    d,
                    d,
                ),
                b_o: vec1(&format!("{p}.attention.output.dense.bias"), d)?,
                ln1: ln(&format!("{p}.attention.output.LayerNorm"))?,
                w_in: t2(
                    linear_t(&format!("{p}.intermediate.dense.weight"), ff, d)?,
                    d,
                    ff,
                ),
                b_in: vec1(&format!("{p}.intermediate.dense.bias"), ff)?,
                w_out: t2(linear_t(&format!("{p}.output.dense.weight"), d, ff)?, ff, d),
                b_out: vec1(&format!("{p}.output.dense.bias"), d)?,
                ln2: ln(&format!("{p}.output.LayerNorm"))?,
            });
        }
        Ok(BertModel {
            config,
            device: device.clone(),
            word,
            position,
            token_type,
            ln_emb,
            layers,
            host_gelu,
        })
    }

    /// Exact (erf) GELU. On the CPU backend it runs on the host with a vectorised erf: flex
    /// computes `erf` with scalar libm calls, which took 15% of the encoder's time.
    fn gelu(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        if !self.host_gelu {
            return gelu(x);
        }
        let device = x.device();
        let mut data = x.into_data();
        match data.as_mut_slice::<f32>() {
            Ok(values) => {
                crate::llm::ops::gelu(values);
                Tensor::from_data(data, &device)
            }
            Err(_) => gelu(Tensor::from_data(data, &device)),
        }
    }

    fn layer_norm<const D: usize>(
        &self,
        x: Tensor<B, D>,
        ln: &(Tensor<B, 1>, Tensor<B, 1>),
    ) -> Tensor<B, D> {
        let (var, mean) = x.clone().var_mean_bias(D - 1);
        let x = (x - mean) / (var + self.config.layer_norm_eps).sqrt();
        x * ln.0.clone().unsqueeze() + ln.1.clone().unsqueeze()
    }

    /// Embeds one padded batch: `[batch][hidden_size]`, mean-pooled and L2-normalised.
    pub(crate) fn embed_batch(&self, batch: &Batch) -> Result<Vec<Vec<f32>>, EmbedError> {
        let (b, n, d) = (batch.batch, batch.seq_len, self.config.hidden_size);
        let heads = self.config.num_attention_heads;
        let hd = d / heads;
        if n > self.config.max_position_embeddings {
            return Err(EmbedError::Backend(format!(
                "a sequence of {n} tokens exceeds the {} positions of the model",
                self.config.max_position_embeddings
            )));
        }
        let dev = &self.device;
        let to_i = |v: &[u32]| -> Vec<i64> { v.iter().map(|&x| i64::from(x)).collect() };
        let max_id = batch.ids.iter().copied().max().unwrap_or(0) as usize;
        if max_id >= self.config.vocab_size {
            return Err(EmbedError::Backend(format!(
                "token id {max_id} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let max_type = batch.type_ids.iter().copied().max().unwrap_or(0) as usize;
        if max_type >= self.config.type_vocab_size {
            return Err(EmbedError::Backend(format!(
                "token type {max_type} is outside the {} types of the model",
                self.config.type_vocab_size
            )));
        }
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(to_i(&batch.ids), [b * n]), dev);
        let types =
            Tensor::<B, 1, Int>::from_data(TensorData::new(to_i(&batch.type_ids), [b * n]), dev);
        let x = self.word.clone().select(0, ids).reshape([b, n, d])
            + self.token_type.clone().select(0, types).reshape([b, n, d])
            + self.position.clone().slice([0..n, 0..d]).unsqueeze::<3>();
        let mut x = self.layer_norm(x, &self.ln_emb).reshape([b * n, d]);

        let mask_f: Vec<f32> = batch.mask.iter().map(|&m| m as f32).collect();
        let mask = Tensor::<B, 2>::from_data(TensorData::new(mask_f, [b, n]), dev);
        // Additive attention bias: 0 for real keys, a large negative number for padding.
        let pad_bias = (mask.clone() - 1.0).reshape([b, 1, 1, n]) * 1e30;
        let scale = 1.0 / (hd as f64).sqrt();
        for layer in &self.layers {
            // [b*n, d] -> [b, n, h, hd] (free) -> [b, h, n, hd] (a strided view: the batched
            // matmuls read it in place, where the fused attention op would copy it).
            let heads_of = |w: &Tensor<B, 2>, bias: &Tensor<B, 1>| -> Tensor<B, 4> {
                (x.clone().matmul(w.clone()) + bias.clone().unsqueeze())
                    .reshape([b, n, heads, hd])
                    .swap_dims(1, 2)
            };
            let q = heads_of(&layer.w_q, &layer.b_q);
            let k = heads_of(&layer.w_k, &layer.b_k);
            let v = heads_of(&layer.w_v, &layer.b_v);
            let scores = q.matmul(k.swap_dims(2, 3)) * scale + pad_bias.clone();
            let ctx = softmax(scores, 3).matmul(v);
            let ctx = ctx.swap_dims(1, 2).reshape([b * n, d]);
            let a = ctx.matmul(layer.w_o.clone()) + layer.b_o.clone().unsqueeze();
            x = self.layer_norm(x + a, &layer.ln1);
            let h =
                self.gelu(x.clone().matmul(layer.w_in.clone()) + layer.b_in.clone().unsqueeze());
            let o = h.matmul(layer.w_out.clone()) + layer.b_out.clone().unsqueeze();
            x = self.layer_norm(x + o, &layer.ln2);
        }
        // Mean pooling over real tokens, then L2 normalisation.
        let x = x.reshape([b, n, d]);
        let m = mask.reshape([b, n, 1]);
        let summed = (x * m.clone()).sum_dim(1).reshape([b, d]);
        let counts = m.sum_dim(1).reshape([b, 1]).clamp_min(1e-9);
        let mean = summed / counts;
        let norm = mean
            .clone()
            .powi_scalar(2)
            .sum_dim(1)
            .sqrt()
            .clamp_min(1e-12);
        let out = mean / norm;
        let values = out
            .into_data()
            .to_vec::<f32>()
            .map_err(|e| EmbedError::Backend(format!("{e:?}")))?;
        Ok(values.chunks(d).map(<[f32]>::to_vec).collect())
    }
}

/// A minimal, validating reader of the safetensors format (8-byte header length, JSON header,
/// raw little-endian data).
pub(super) struct SafeTensors {
    path: PathBuf,
    map: memmap2::Mmap,
    data_start: usize,
    tensors: HashMap<String, (String, Vec<usize>, usize, usize)>,
}

/// Largest JSON header accepted (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100 << 20;

impl SafeTensors {
    pub(super) fn open(path: &Path) -> Result<SafeTensors, EmbedError> {
        let bad = |reason: String| EmbedError::Weights {
            path: path.to_path_buf(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(|source| EmbedError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: read-only map; the file must not be modified while the model loads (the map
        // is dropped once the weights are copied into tensors).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| EmbedError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let len = map.len() as u64;
        if len < 8 {
            return Err(bad("file too short for a safetensors header".to_string()));
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&map[..8]);
        let header_len = u64::from_le_bytes(n);
        if header_len > MAX_HEADER || header_len > len - 8 {
            return Err(bad(format!(
                "header of {header_len} bytes does not fit the {len}-byte file"
            )));
        }
        let data_start = 8 + header_len as usize;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&map[8..data_start])
                .map_err(|e| bad(format!("header is not a json object: {e}")))?;
        let data_len = map.len() - data_start;
        let mut tensors = HashMap::new();
        for (name, info) in header {
            if name == "__metadata__" {
                continue;
            }
            let dtype = info
                .get("dtype")
                .and_then(|v| v.as_str())
                .ok_or_else(|| bad(format!("tensor {name} has no dtype")))?
                .to_string();
            let shape: Vec<usize> = info
                .get("shape")
                .and_then(|v| v.as_array())
                .ok_or_else(|| bad(format!("tensor {name} has no shape")))?
                .iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect::<Option<_>>()
                .ok_or_else(|| bad(format!("tensor {name} has a malformed shape")))?;
            let offsets: Vec<usize> = info
                .get("data_offsets")
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                        .collect()
                })
                .unwrap_or_default();
            let [start, end] = offsets[..] else {
                return Err(bad(format!("tensor {name} has malformed data_offsets")));
            };
            if start > end || end > data_len {
                return Err(bad(format!(
                    "tensor {name} spans bytes {start}..{end} outside the {data_len} data bytes"
                )));
            }
            tensors.insert(name, (dtype, shape, start, end));
        }
        Ok(SafeTensors {
            path: path.to_path_buf(),
            map,
            data_start,
            tensors,
        })
    }

    /// Drops this process's pages of a range already converted, so that loading does not hold
    /// the whole file resident next to the tensors made from it.
    fn release(&self, offset: usize, len: usize) {
        #[cfg(unix)]
        {
            // SAFETY: a read-only private mapping of a file: MADV_DONTNEED discards only our
            // copy of the pages, and reading them again (a neighbouring tensor sharing a page)
            // faults the same bytes back in from the file. Nothing is written.
            let _ = unsafe {
                self.map
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
            };
        }
        #[cfg(not(unix))]
        let _ = (offset, len);
    }

    /// The tensor `name` (or `bert.name`) as f32 values, checking its shape.
    pub(super) fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, EmbedError> {
        let bad = |reason: String| EmbedError::Weights {
            path: self.path.clone(),
            reason,
        };
        let (dtype, got, start, end) = self
            .tensors
            .get(name)
            .or_else(|| self.tensors.get(&format!("bert.{name}")))
            .ok_or_else(|| bad(format!("tensor {name} is missing")))?;
        if got != shape {
            return Err(bad(format!(
                "tensor {name} has shape {got:?}, expected {shape:?}"
            )));
        }
        let n: usize = shape.iter().product();
        let bytes = &self.map[self.data_start + start..self.data_start + end];
        let width = match dtype.as_str() {
            "F32" => 4,
            "F16" | "BF16" => 2,
            other => {
                return Err(bad(format!(
                    "tensor {name} has dtype {other}; only F32, F16 and BF16 are supported"
                )));
            }
        };
        if bytes.len() != n * width {
            return Err(bad(format!(
                "tensor {name} has {} bytes, expected {} for shape {shape:?}",
                bytes.len(),
                n * width
            )));
        }
        let values = match dtype.as_str() {
            "F32" => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            "F16" => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        };
        self.release(self.data_start + start, end - start);
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_reader_validates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let header = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,40]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&1.5f32.to_le_bytes());
        bytes.extend_from_slice(&(-2.0f32).to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        // "b" claims bytes past the end.
        let err = SafeTensors::open(&path).err().expect("invalid").to_string();
        assert!(err.contains("outside"), "{err}");

        let header = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&1.5f32.to_le_bytes());
        bytes.extend_from_slice(&(-2.0f32).to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let st = SafeTensors::open(&path).expect("valid");
        assert_eq!(st.f32("a", &[2]).unwrap(), vec![1.5, -2.0]);
        assert!(st.f32("a", &[3]).is_err());
        assert!(
            st.f32("missing", &[1])
                .unwrap_err()
                .to_string()
                .contains("missing")
        );

        std::fs::write(&path, u64::MAX.to_le_bytes()).unwrap();
        assert!(SafeTensors::open(&path).is_err());
    }
}
