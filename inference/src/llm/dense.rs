//! The Burn path: every operation a Burn tensor operation on the backend's device. This is what
//! runs on wgpu and CUDA; on the CPU it serves as a cross-check of the quantized path.
//!
//! On a GPU backend the weight matrices of the eight common block types stay quantized on the
//! device (`qweight`, multiplied by the CubeCL kernels of `qkernel`), and the token embedding
//! is looked up on the host from the mapped file (a few rows a step), so the device holds the
//! model at about its file size. Other types, and every weight on the CPU backend, are
//! dequantized to f32 at load.

use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Int, Tensor, TensorData};

use crate::gguf::{GgufFile, TensorInfo, dequantize};

use super::LlmError;
use super::config::{Architecture, FfnActivation, LlmConfig, RopeStyle};
use super::host::vector;
use super::qweight::{QSpec, QuantOps, Weight, repack};
use super::rope::Rope;

/// KV cache growth step, in positions.
const CACHE_STEP: usize = 256;

#[derive(Debug)]
struct Layer<B: Backend> {
    attn_norm: Tensor<B, 2>,
    wq: Weight<B>,
    wk: Weight<B>,
    wv: Weight<B>,
    bq: Option<Tensor<B, 2>>,
    bk: Option<Tensor<B, 2>>,
    bv: Option<Tensor<B, 2>>,
    /// Per-head RMSNorm weights of queries and keys (qwen3), `[1, head_dim]`.
    q_norm: Option<Tensor<B, 2>>,
    k_norm: Option<Tensor<B, 2>>,
    wo: Weight<B>,
    /// Norms of the attention and feed-forward outputs (gemma3), `[1, d_model]`.
    post_attn_norm: Option<Tensor<B, 2>>,
    post_ffn_norm: Option<Tensor<B, 2>>,
    ffn_norm: Tensor<B, 2>,
    w_gate: Weight<B>,
    w_up: Weight<B>,
    w_down: Weight<B>,
}

/// Weights of the Burn path; linear weights are stored `[in, out]` so that `x.matmul(w)`
/// needs no transposed view.
#[derive(Debug)]
pub(crate) struct DenseModel<B: Backend> {
    config: LlmConfig,
    rope: Rope,
    /// The local (sliding-window) layers' rotary embedding, when they have their own.
    rope_local: Option<Rope>,
    device: B::Device,
    embd: Embedding<B>,
    layers: Vec<Layer<B>>,
    output_norm: Tensor<B, 2>,
    head: Weight<B>,
}

/// Where the token embedding is looked up.
#[derive(Debug)]
enum Embedding<B: Backend> {
    /// An f32 `[vocab, d]` table on the device.
    Device(Tensor<B, 2>),
    /// Rows decoded on the host from the mapped file, `token_embd.weight`, as a step needs them.
    Host(GgufFile, TensorInfo),
}

/// GELU in its tanh approximation (see `ops::gelu_tanh_mul`).
fn gelu_tanh<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let inner = (x.clone() + x.clone().powi_scalar(3) * 0.044_715) * 0.797_884_6;
    x * (inner.tanh() + 1.0) * 0.5
}

/// Rows `part` of the `[out, in]` matrix `name` (all of it but for phi3's fused matrices) as a
/// weight of the Burn path: its repacked blocks where the backend multiplies by them on the
/// device, else dequantized into an `[in, part]` f32 tensor.
fn weight<B: QuantOps>(
    file: &GgufFile,
    name: &str,
    (out, inp): (usize, usize),
    part: std::ops::Range<usize>,
    device: &B::Device,
) -> Result<Weight<B>, LlmError> {
    let info = file.tensor(name).ok_or_else(|| LlmError::MissingTensor {
        name: name.to_string(),
    })?;
    if info.dims != [inp as u64, out as u64] {
        return Err(LlmError::TensorShape {
            name: name.to_string(),
            dims: info.dims.clone(),
            expected: format!("[{inp}, {out}]"),
        });
    }
    let row_bytes = info.n_bytes as usize / out;
    let bytes = file.tensor_bytes(info);
    let max_bytes = B::max_buffer_bytes(device);
    if B::ON_DEVICE && QSpec::new(info.dtype, part.len(), inp).is_some() {
        let mut parts = Vec::new();
        for rows in split_rows(part, row_bytes, max_bytes) {
            let spec = QSpec::new(info.dtype, rows.len(), inp).ok_or_else(|| {
                LlmError::Backend(format!("{name}: rows {rows:?} are not whole blocks"))
            })?;
            let words = repack(&spec, &bytes[rows.start * row_bytes..rows.end * row_bytes])?;
            let n = words.len();
            parts.push((Tensor::from_data(TensorData::new(words, [n]), device), spec));
        }
        return Ok(Weight::Quant(parts));
    }
    // Decoded a row at a time into its transposed place: one f32 copy of a part on the host.
    let mut parts = Vec::new();
    let mut row = vec![0.0f32; inp];
    for rows in split_rows(part, inp * 4, max_bytes) {
        let n = rows.len();
        let mut t = vec![0.0f32; n * inp];
        for (o, src) in rows.enumerate() {
            dequantize(
                info.dtype,
                &bytes[src * row_bytes..(src + 1) * row_bytes],
                &mut row,
            )?;
            for (i, &value) in row.iter().enumerate() {
                t[i * n + o] = value;
            }
        }
        parts.push(Tensor::from_data(TensorData::new(t, [inp, n]), device));
    }
    Ok(Weight::Dense(parts))
}

/// `rows` in runs of at most `max_bytes / row_bytes` rows (at least one, and a multiple of 8
/// where there are more).
fn split_rows(
    rows: std::ops::Range<usize>,
    row_bytes: usize,
    max_bytes: usize,
) -> Vec<std::ops::Range<usize>> {
    let per = (max_bytes / row_bytes.max(1)).max(1);
    let per = if per > 8 { per / 8 * 8 } else { per };
    (rows.start..rows.end)
        .step_by(per)
        .map(|start| start..(start + per).min(rows.end))
        .collect()
}

fn row<B: Backend>(values: Vec<f32>, device: &B::Device) -> Tensor<B, 2> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [1, n]), device)
}

impl<B: QuantOps> DenseModel<B> {
    /// The hyper-parameters.
    pub(crate) fn config(&self) -> &LlmConfig {
        &self.config
    }

    /// Dequantizes every weight of `file` onto `device`.
    pub(crate) fn load(
        file: &GgufFile,
        config: &LlmConfig,
        rope: Rope,
        device: &B::Device,
    ) -> Result<DenseModel<B>, LlmError> {
        let c = config;
        let (d, q, kv, ff) = (c.d_model, c.q_dim(), c.kv_dim(), c.d_ff);
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            let n = |s: &str| format!("blk.{l}.{s}");
            let bias = |s: &str, len: usize| -> Result<Option<Tensor<B, 2>>, LlmError> {
                if file.tensor(&n(s)).is_some() {
                    Ok(Some(row(vector(file, &n(s), len)?, device)))
                } else if c.qkv_bias {
                    Err(LlmError::MissingTensor { name: n(s) })
                } else {
                    Ok(None)
                }
            };
            let head_norm = |s: &str| -> Result<Option<Tensor<B, 2>>, LlmError> {
                c.qk_norm
                    .then(|| Ok(row(vector(file, &n(s), c.head_dim)?, device)))
                    .transpose()
            };
            let post_norm = |s: &str| -> Result<Option<Tensor<B, 2>>, LlmError> {
                c.post_norms
                    .then(|| Ok(row(vector(file, &n(s), d)?, device)))
                    .transpose()
            };
            let phi3 = c.architecture == Architecture::Phi3;
            // phi3 files hold q, k and v in one matrix, and the gate and up projections in one:
            // its columns (`[in, out]`) are split.
            let (wq, wk, wv) = if phi3 {
                let name = n("attn_qkv.weight");
                let shape = (q + 2 * kv, d);
                (
                    weight(file, &name, shape, 0..q, device)?,
                    weight(file, &name, shape, q..q + kv, device)?,
                    weight(file, &name, shape, q + kv..q + 2 * kv, device)?,
                )
            } else {
                (
                    weight(file, &n("attn_q.weight"), (q, d), 0..q, device)?,
                    weight(file, &n("attn_k.weight"), (kv, d), 0..kv, device)?,
                    weight(file, &n("attn_v.weight"), (kv, d), 0..kv, device)?,
                )
            };
            let (w_gate, w_up) = if phi3 {
                let name = n("ffn_up.weight");
                (
                    weight(file, &name, (2 * ff, d), 0..ff, device)?,
                    weight(file, &name, (2 * ff, d), ff..2 * ff, device)?,
                )
            } else {
                (
                    weight(file, &n("ffn_gate.weight"), (ff, d), 0..ff, device)?,
                    weight(file, &n("ffn_up.weight"), (ff, d), 0..ff, device)?,
                )
            };
            layers.push(Layer {
                attn_norm: row(vector(file, &n("attn_norm.weight"), d)?, device),
                wq,
                wk,
                wv,
                bq: bias("attn_q.bias", q)?,
                bk: bias("attn_k.bias", kv)?,
                bv: bias("attn_v.bias", kv)?,
                q_norm: head_norm("attn_q_norm.weight")?,
                k_norm: head_norm("attn_k_norm.weight")?,
                post_attn_norm: post_norm("post_attention_norm.weight")?,
                post_ffn_norm: post_norm("post_ffw_norm.weight")?,
                wo: weight(file, &n("attn_output.weight"), (d, q), 0..d, device)?,
                ffn_norm: row(vector(file, &n("ffn_norm.weight"), d)?, device),
                w_gate,
                w_up,
                w_down: weight(file, &n("ffn_down.weight"), (d, ff), 0..d, device)?,
            });
        }
        let embd_info =
            file.tensor("token_embd.weight")
                .ok_or_else(|| LlmError::MissingTensor {
                    name: "token_embd.weight".to_string(),
                })?;
        if embd_info.dims != [d as u64, c.vocab_size as u64] {
            return Err(LlmError::TensorShape {
                name: "token_embd.weight".to_string(),
                dims: embd_info.dims.clone(),
                expected: format!("[{d}, {}]", c.vocab_size),
            });
        }
        // On a GPU the table stays in the mapped file (a step decodes its few rows there); a
        // tied head multiplies by the same matrix, loaded like any other weight.
        let vocab = c.vocab_size;
        let head_name = if c.tied_embeddings {
            "token_embd.weight"
        } else {
            "output.weight"
        };
        let head = weight(file, head_name, (vocab, d), 0..vocab, device)?;
        let embd = if B::ON_DEVICE {
            Embedding::Host(file.clone(), embd_info.clone())
        } else {
            let values = file.dequantize(embd_info)?; // [vocab][d]
            Embedding::Device(Tensor::from_data(
                TensorData::new(values, [vocab, d]),
                device,
            ))
        };
        Ok(DenseModel {
            config: config.clone(),
            rope,
            rope_local: c.rope_base_local.map(|_| Rope::new(&c.local_rope(), None)),
            device: device.clone(),
            embd,
            layers,
            output_norm: row(vector(file, "output_norm.weight", d)?, device),
            head,
        })
    }

    /// Bytes the weights take on the device (the embedding table counts only when it is there).
    pub(crate) fn weight_bytes(&self) -> usize {
        let t = |t: &Tensor<B, 2>| t.shape().num_elements() * 4;
        let o = |x: &Option<Tensor<B, 2>>| x.as_ref().map_or(0, t);
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
                    .iter()
                    .map(|w| w.device_bytes())
                    .sum::<usize>()
                    + t(&l.attn_norm)
                    + t(&l.ffn_norm)
                    + [&l.bq, &l.bk, &l.bv, &l.q_norm, &l.k_norm]
                        .iter()
                        .map(|b| o(b))
                        .sum::<usize>()
                    + o(&l.post_attn_norm)
                    + o(&l.post_ffn_norm)
            })
            .sum();
        let embd = match &self.embd {
            Embedding::Device(e) => t(e),
            Embedding::Host(..) => 0,
        };
        layers + embd + t(&self.output_norm) + self.head.device_bytes()
    }

    /// The embedding rows of `ids`: `[ids.len(), d_model]`.
    fn embed(&self, ids: Vec<i64>) -> Result<Tensor<B, 2>, LlmError> {
        let rows = ids.len();
        match &self.embd {
            Embedding::Device(table) => {
                let ids =
                    Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [rows]), &self.device);
                Ok(table.clone().select(0, ids))
            }
            Embedding::Host(file, info) => {
                let d = self.config.d_model;
                let row_bytes = info.n_bytes as usize / self.config.vocab_size;
                let bytes = file.tensor_bytes(info);
                let mut values = vec![0.0f32; rows * d];
                for (&id, out) in ids.iter().zip(values.chunks_exact_mut(d)) {
                    let at = id as usize * row_bytes;
                    dequantize(info.dtype, &bytes[at..at + row_bytes], out)?;
                }
                Ok(Tensor::from_data(
                    TensorData::new(values, [rows, d]),
                    &self.device,
                ))
            }
        }
    }

    fn rmsnorm(&self, x: Tensor<B, 2>, w: &Tensor<B, 2>) -> Tensor<B, 2> {
        let inv = (x.clone().powi_scalar(2).mean_dim(1) + self.config.rms_eps)
            .sqrt()
            .recip();
        x * inv * w.clone()
    }

    /// Rotates `x` (`[n, heads, head_dim]`) with `cos`/`sin` (`[n, 1, half]`).
    fn rope(&self, x: Tensor<B, 3>, cos: &Tensor<B, 3>, sin: &Tensor<B, 3>) -> Tensor<B, 3> {
        let [n, heads, hd] = x.dims();
        let half = self.rope.half();
        let rd = 2 * half;
        let (rot, pass) = if rd < hd {
            (
                x.clone().slice([0..n, 0..heads, 0..rd]),
                Some(x.slice([0..n, 0..heads, rd..hd])),
            )
        } else {
            (x, None)
        };
        let rotated = match self.rope.style() {
            RopeStyle::Interleaved => {
                let pairs = rot.reshape([n, heads, half, 2]);
                let a = pairs
                    .clone()
                    .slice([0..n, 0..heads, 0..half, 0..1])
                    .reshape([n, heads, half]);
                let b = pairs
                    .slice([0..n, 0..heads, 0..half, 1..2])
                    .reshape([n, heads, half]);
                let ra = a.clone() * cos.clone() - b.clone() * sin.clone();
                let rb = a * sin.clone() + b * cos.clone();
                Tensor::stack::<4>(vec![ra, rb], 3).reshape([n, heads, rd])
            }
            RopeStyle::Neox => {
                let a = rot.clone().slice([0..n, 0..heads, 0..half]);
                let b = rot.slice([0..n, 0..heads, half..rd]);
                let ra = a.clone() * cos.clone() - b.clone() * sin.clone();
                let rb = a * sin.clone() + b * cos.clone();
                Tensor::cat(vec![ra, rb], 2)
            }
        };
        match pass {
            Some(p) => Tensor::cat(vec![rotated, p], 2),
            None => rotated,
        }
    }

    /// Allocates `cache` for `positions` in all, once (see `Sequence::reserve`).
    pub(crate) fn reserve(&self, cache: &mut DenseCache<B>, positions: usize) {
        cache.reserve(positions, true, &self.config, &self.device);
    }

    /// Runs `tokens` at positions `cache.len..`, appending to the cache; writes the last
    /// token's logits into `logits`.
    pub(crate) fn forward(
        &self,
        cache: &mut DenseCache<B>,
        tokens: &[u32],
        logits: &mut Vec<f32>,
    ) -> Result<(), LlmError> {
        self.forward_batch(&mut [(cache, tokens)], std::slice::from_mut(logits))
    }

    /// One step of several sequences at once (continuous batching): `batch[i].1` runs at
    /// positions `batch[i].0.len..`, appending to that cache, and the logits of its last token
    /// go to `logits[i]` (a sequence with no tokens keeps its logits). The sequences' rows are
    /// stacked for every weight product (one read of each weight matrix, and one kernel launch,
    /// for the whole batch), for the norms, RoPE and the final projection; attention runs per
    /// sequence over its own cache. All logits come back in one read from the device.
    pub(crate) fn forward_batch(
        &self,
        batch: &mut [(&mut DenseCache<B>, &[u32])],
        logits: &mut [Vec<f32>],
    ) -> Result<(), LlmError> {
        let c = &self.config;
        if logits.len() != batch.len() {
            return Err(LlmError::Backend(format!(
                "{} logit buffers for {} sequences",
                logits.len(),
                batch.len()
            )));
        }
        for (_, tokens) in batch.iter() {
            if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(LlmError::InvalidToken {
                    token: t,
                    vocab_size: c.vocab_size,
                });
            }
        }
        let (hd, h, kvh) = (c.head_dim, c.n_heads, c.n_kv_heads);
        let group = h / kvh;
        let dev = &self.device;
        // The sequences that run, each with its rows in the step's stacked rows.
        let mut spans: Vec<Span> = Vec::with_capacity(batch.len());
        let mut ids: Vec<i64> = Vec::new();
        for (index, (cache, tokens)) in batch.iter_mut().enumerate() {
            if tokens.is_empty() {
                continue;
            }
            let (n, pos0) = (tokens.len(), cache.len);
            cache.reserve(pos0 + n, false, c, dev);
            spans.push(Span {
                index,
                row0: ids.len(),
                n,
                pos0,
                total: pos0 + n,
            });
            ids.extend(tokens.iter().map(|&t| i64::from(t)));
        }
        let rows = ids.len();
        if rows == 0 {
            return Ok(());
        }
        let mut x = self.embed(ids)?;
        if let Some(scale) = c.embed_scale {
            x = x * scale;
        }
        let half = self.rope.half();
        let tables = |rope: &Rope| {
            let (mut cos, mut sin) = (Vec::new(), Vec::new());
            for s in &spans {
                rope.append_tables(s.pos0, s.n, &mut cos, &mut sin);
            }
            (
                Tensor::<B, 3>::from_data(TensorData::new(cos, [rows, 1, half]), dev),
                Tensor::<B, 3>::from_data(TensorData::new(sin, [rows, 1, half]), dev),
            )
        };
        let global_tables = tables(&self.rope);
        let local_tables = self.rope_local.as_ref().map(tables);
        // An explicit mask wherever `is_causal` would not say the right thing: a local layer
        // whose window is shorter than what the queries see, and any multi-token step over a
        // non-empty cache (a chunked prefill). Query i (position pos0 + i) sees keys j with
        // j <= pos0 + i, and, in a window, pos0 + i - window < j. Burn's fallback attention
        // aligns `is_causal` at the bottom-right, but CubeCL's flash kernels (which autotune
        // may pick) mask from the top-left, so only a step with an empty cache (square scores)
        // relies on it.
        let step_mask =
            |s: &Span, window: Option<usize>| -> Option<Tensor<B, 4, burn::tensor::Bool>> {
                let window = window.filter(|&w| s.total > w);
                if window.is_none() && (s.n == 1 || s.pos0 == 0) {
                    return None;
                }
                let window = window.unwrap_or(usize::MAX);
                let mask: Vec<bool> = (0..s.n)
                    .flat_map(|i| {
                        let pos = s.pos0 + i;
                        (0..s.total).map(move |j| j > pos || pos - j >= window)
                    })
                    .collect();
                let mask = Tensor::<B, 4, burn::tensor::Bool>::from_data(
                    TensorData::new(mask, [1, 1, s.n, s.total]),
                    dev,
                );
                Some(mask.expand([1, h, s.n, s.total]))
            };
        // [n, heads, hd] -> [1, heads, n, hd]
        let to4 = |t: Tensor<B, 3>| t.swap_dims(0, 1).unsqueeze::<4>();
        let post = |y: Tensor<B, 2>, norm: &Option<Tensor<B, 2>>| match norm {
            Some(w) => self.rmsnorm(y, w),
            None => y,
        };
        for (l, layer) in self.layers.iter().enumerate() {
            let window = c.window(l);
            let (cos, sin) = match (&local_tables, window) {
                (Some(local), Some(_)) => (&local.0, &local.1),
                _ => (&global_tables.0, &global_tables.1),
            };
            let hn = self.rmsnorm(x.clone(), &layer.attn_norm);
            let proj = |w: &Weight<B>, b: &Option<Tensor<B, 2>>| {
                let y = w.apply(hn.clone());
                match b {
                    Some(b) => y + b.clone(),
                    None => y,
                }
            };
            let heads = |t: Tensor<B, 2>, count: usize, norm: &Option<Tensor<B, 2>>| match norm {
                Some(w) => self
                    .rmsnorm(t.reshape([rows * count, hd]), w)
                    .reshape([rows, count, hd]),
                None => t.reshape([rows, count, hd]),
            };
            let q = heads(proj(&layer.wq, &layer.bq), h, &layer.q_norm);
            let k = heads(proj(&layer.wk, &layer.bk), kvh, &layer.k_norm);
            let q = self.rope(q, cos, sin);
            let k = self.rope(k, cos, sin);
            let v = proj(&layer.wv, &layer.bv).reshape([rows, kvh, hd]);
            let mut outs = Vec::with_capacity(spans.len());
            for s in &spans {
                // One sequence's rows of a stacked `[rows, heads, hd]` tensor.
                let part = |t: &Tensor<B, 3>, count: usize| {
                    if spans.len() == 1 {
                        t.clone()
                    } else {
                        t.clone().slice([s.row0..s.row0 + s.n, 0..count, 0..hd])
                    }
                };
                let cache = &mut *batch[s.index].0;
                let (k_all, v_all) =
                    cache.append(l, to4(part(&k, kvh)), to4(part(&v, kvh)), s.pos0, s.total);
                let total = s.total;
                let expand = |t: Tensor<B, 4>| {
                    if group == 1 {
                        t
                    } else {
                        t.reshape([1, kvh, 1, total, hd])
                            .expand([1, kvh, group, total, hd])
                            .reshape([1, h, total, hd])
                    }
                };
                let mask = step_mask(s, window);
                let options = AttentionModuleOptions {
                    is_causal: s.n > 1 && mask.is_none(),
                    ..AttentionModuleOptions::default()
                };
                let att = attention(
                    to4(part(&q, h)),
                    expand(k_all),
                    expand(v_all),
                    mask,
                    None,
                    options,
                );
                outs.push(att.swap_dims(1, 2).reshape([s.n, h * hd]));
            }
            let att = if outs.len() == 1 {
                outs.swap_remove(0)
            } else {
                Tensor::cat(outs, 0)
            };
            x = x + post(layer.wo.apply(att), &layer.post_attn_norm);
            let hn = self.rmsnorm(x.clone(), &layer.ffn_norm);
            let g = layer.w_gate.apply(hn.clone());
            let g = match c.ffn_activation {
                FfnActivation::Silu => silu(g),
                FfnActivation::GeluTanh => gelu_tanh(g),
            };
            let u = layer.w_up.apply(hn);
            x = x + post(layer.w_down.apply(g * u), &layer.post_ffn_norm);
        }
        for s in &spans {
            batch[s.index].0.len = s.total;
        }
        let last: Vec<i64> = spans.iter().map(|s| (s.row0 + s.n - 1) as i64).collect();
        let last = Tensor::<B, 1, Int>::from_data(TensorData::new(last, [spans.len()]), dev);
        let out = self
            .head
            .apply(self.rmsnorm(x.select(0, last), &self.output_norm));
        let values = out
            .into_data()
            .to_vec::<f32>()
            .map_err(|e| LlmError::Backend(format!("reading the logits back: {e:?}")))?;
        let vocab = values.len() / spans.len();
        for (s, row) in spans.iter().zip(values.chunks_exact(vocab.max(1))) {
            let out = &mut logits[s.index];
            out.clear();
            out.extend_from_slice(row);
        }
        Ok(())
    }
}

/// One sequence of a batched step: its index in the batch, its first row among the step's
/// stacked rows, its token count, and the positions it starts at and ends before.
struct Span {
    index: usize,
    row0: usize,
    n: usize,
    pos0: usize,
    total: usize,
}

/// Keys and values of one sequence on the Burn path: per layer `[1, kv_heads, capacity, hd]`.
#[derive(Debug)]
pub(crate) struct DenseCache<B: Backend> {
    k: Vec<Tensor<B, 4>>,
    v: Vec<Tensor<B, 4>>,
    len: usize,
    capacity: usize,
}

impl<B: Backend> DenseCache<B> {
    /// An empty cache.
    pub(crate) fn new() -> DenseCache<B> {
        DenseCache {
            k: Vec::new(),
            v: Vec::new(),
            len: 0,
            capacity: 0,
        }
    }

    /// Positions cached.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Forgets positions from `len` on (the tensors keep their capacity).
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// A cache of the first `len` positions of this one. Burn tensors are values: the copy
    /// shares the storage until either cache writes to it, which then copies.
    pub(crate) fn fork(&self, len: usize) -> DenseCache<B> {
        DenseCache {
            k: self.k.clone(),
            v: self.v.clone(),
            len: len.min(self.len),
            capacity: self.capacity,
        }
    }

    /// Bytes of the keys and values held, at 4 bytes a value.
    pub(crate) fn bytes(&self, c: &LlmConfig) -> usize {
        2 * c.n_layers * self.capacity * c.n_kv_heads * c.head_dim * 4
    }

    /// Grows every layer's tensors to hold at least `total` positions: exactly that many when
    /// `exact` (a reservation), else the next multiple of [`CACHE_STEP`].
    fn reserve(&mut self, total: usize, exact: bool, c: &LlmConfig, device: &B::Device) {
        if total <= self.capacity {
            return;
        }
        let new_cap = if exact {
            total
        } else {
            total.next_multiple_of(CACHE_STEP)
        };
        let shape = [1, c.n_kv_heads, new_cap, c.head_dim];
        let grow = |old: Option<Tensor<B, 4>>, cap: usize| {
            let fresh = Tensor::<B, 4>::zeros(shape, device);
            match old {
                Some(t) if cap > 0 => {
                    fresh.slice_assign([0..1, 0..c.n_kv_heads, 0..cap, 0..c.head_dim], t)
                }
                _ => fresh,
            }
        };
        let cap = self.capacity;
        let old_k = std::mem::take(&mut self.k);
        let old_v = std::mem::take(&mut self.v);
        let mut old_k = old_k.into_iter();
        let mut old_v = old_v.into_iter();
        for _ in 0..c.n_layers {
            self.k.push(grow(old_k.next(), cap));
            self.v.push(grow(old_v.next(), cap));
        }
        self.capacity = new_cap;
    }

    /// Writes `k`, `v` (`[1, kv_heads, n, hd]`) at `pos0..total` of layer `l` and returns the
    /// keys and values of positions `0..total`.
    fn append(
        &mut self,
        l: usize,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        pos0: usize,
        total: usize,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [_, kvh, _, hd] = k.dims();
        let write = [0..1, 0..kvh, pos0..total, 0..hd];
        let read = [0..1, 0..kvh, 0..total, 0..hd];
        let kc = std::mem::replace(&mut self.k[l], Tensor::empty([1, 1, 1, 1], &k.device()));
        self.k[l] = kc.slice_assign(write.clone(), k);
        let vc = std::mem::replace(&mut self.v[l], Tensor::empty([1, 1, 1, 1], &v.device()));
        self.v[l] = vc.slice_assign(write, v);
        (
            self.k[l].clone().slice(read.clone()),
            self.v[l].clone().slice(read),
        )
    }
}
