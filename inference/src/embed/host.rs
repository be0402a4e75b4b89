//! The BERT encoder on the CPU: linear weights in Q8_0, repacked eight rows at a time
//! ([`PackedQ8`]) and run on the chat engine's [`ThreadPool`]; attention and norms in f32.
//!
//! Two things make it faster than the same graph on Burn's CPU backend (and than ONNX Runtime's
//! f32 one): the linear layers, nearly all of the work, run as 8-bit integer dot products with
//! per-32 scales, as llama.cpp runs a Q8_0 embedding model (against the f32 model: cosine at
//! least 0.998 on the reference sentences, pair similarities within 0.004; the f32 encoder
//! stays one option away, [`super::EmbedPrecision::F32`]), and a batch
//! is packed without padding: the linear layers see only the real tokens of every text, and
//! attention runs within each text.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::bert::{BertConfig, SafeTensors};
use super::{Batch, EmbedError};
use crate::llm::ops;
use crate::quant::{PackedQ8, ThreadPool};

/// A LayerNorm's scale and shift.
struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

/// One encoder layer. Linear weights keep PyTorch's `[out, in]` layout, which is
/// [`PackedQ8`]'s (a row per output feature).
struct Layer {
    /// Query, key and value stacked: `[3 · hidden, hidden]`.
    qkv: PackedQ8,
    b_qkv: Vec<f32>,
    out: PackedQ8,
    b_out: Vec<f32>,
    ln1: Norm,
    up: PackedQ8,
    b_up: Vec<f32>,
    down: PackedQ8,
    b_down: Vec<f32>,
    ln2: Norm,
}

/// The encoder with mean pooling and L2 normalisation, on the host.
pub(crate) struct HostBert {
    config: BertConfig,
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    ln_emb: Norm,
    layers: Vec<Layer>,
    pool: ThreadPool,
}

impl std::fmt::Debug for HostBert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBert")
            .field("config", &self.config)
            .field("threads", &self.pool.threads())
            .finish()
    }
}

/// Runs `f(index, chunk)` over the `len`-value chunks of `data` on the pool's threads.
fn par_chunks(
    pool: &ThreadPool,
    data: &mut [f32],
    len: usize,
    f: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    if data.is_empty() || len == 0 {
        return;
    }
    let chunks: Vec<Mutex<&mut [f32]>> = data.chunks_mut(len).map(Mutex::new).collect();
    let next = AtomicUsize::new(0);
    pool.run(&|_| {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(chunk) = chunks.get(i) else { break };
            // Each chunk is taken by exactly one share, so the lock is never contended.
            let mut chunk = chunk.lock().unwrap_or_else(|e| e.into_inner());
            f(i, &mut chunk);
        }
    });
}

/// `x = LayerNorm(x + y + bias)` for one row (`y` and `bias` optional), in place.
fn add_norm(x: &mut [f32], y: Option<(&[f32], &[f32])>, norm: &Norm, eps: f32) {
    if let Some((y, bias)) = y {
        for ((x, &y), &b) in x.iter_mut().zip(y).zip(bias) {
            *x += y + b;
        }
    }
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((x, &w), &b) in x.iter_mut().zip(&norm.weight).zip(&norm.bias) {
        *x = (*x - mean) * inv * w + b;
    }
}

impl HostBert {
    /// Loads the weights of `path` and quantizes the linear layers.
    pub(crate) fn load(
        path: &std::path::Path,
        config: BertConfig,
        threads: usize,
    ) -> Result<HostBert, EmbedError> {
        let file = SafeTensors::open(path)?;
        let d = config.hidden_size;
        let ff = config.intermediate_size;
        let bad = |reason: String| EmbedError::Weights {
            path: path.to_path_buf(),
            reason,
        };
        let norm = |prefix: &str| -> Result<Norm, EmbedError> {
            Ok(Norm {
                weight: file.f32(&format!("{prefix}.weight"), &[d])?,
                bias: file.f32(&format!("{prefix}.bias"), &[d])?,
            })
        };
        let matrix = |rows: usize, cols: usize, values: &[f32]| -> Result<PackedQ8, EmbedError> {
            PackedQ8::from_f32(rows, cols, values).map_err(|e| bad(e.to_string()))
        };
        let linear = |name: &str, out: usize, inp: usize| -> Result<PackedQ8, EmbedError> {
            matrix(out, inp, &file.f32(&format!("{name}.weight"), &[out, inp])?)
        };
        let word = file.f32("embeddings.word_embeddings.weight", &[config.vocab_size, d])?;
        let position = file.f32(
            "embeddings.position_embeddings.weight",
            &[config.max_position_embeddings, d],
        )?;
        let token_type = file.f32(
            "embeddings.token_type_embeddings.weight",
            &[config.type_vocab_size, d],
        )?;
        let ln_emb = norm("embeddings.LayerNorm")?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            let mut w_qkv = Vec::with_capacity(3 * d * d);
            let mut b_qkv = Vec::with_capacity(3 * d);
            for name in ["query", "key", "value"] {
                w_qkv.extend(file.f32(&format!("{p}.attention.self.{name}.weight"), &[d, d])?);
                b_qkv.extend(file.f32(&format!("{p}.attention.self.{name}.bias"), &[d])?);
            }
            layers.push(Layer {
                qkv: matrix(3 * d, d, &w_qkv)?,
                b_qkv,
                out: linear(&format!("{p}.attention.output.dense"), d, d)?,
                b_out: file.f32(&format!("{p}.attention.output.dense.bias"), &[d])?,
                ln1: norm(&format!("{p}.attention.output.LayerNorm"))?,
                up: linear(&format!("{p}.intermediate.dense"), ff, d)?,
                b_up: file.f32(&format!("{p}.intermediate.dense.bias"), &[ff])?,
                down: linear(&format!("{p}.output.dense"), d, ff)?,
                b_down: file.f32(&format!("{p}.output.dense.bias"), &[d])?,
                ln2: norm(&format!("{p}.output.LayerNorm"))?,
            });
        }
        Ok(HostBert {
            config,
            word,
            position,
            token_type,
            ln_emb,
            layers,
            pool: ThreadPool::new(threads),
        })
    }

    /// Embeds one batch: `[batch][hidden_size]`, mean-pooled and L2-normalised. The padding of
    /// the batch is dropped: every text runs at its own length.
    pub(crate) fn embed_batch(&self, batch: &Batch) -> Result<Vec<Vec<f32>>, EmbedError> {
        let c = &self.config;
        let (d, ff) = (c.hidden_size, c.intermediate_size);
        let eps = c.layer_norm_eps as f32;
        // The texts' token ranges in the packed sequence.
        let mut spans = Vec::with_capacity(batch.batch);
        let mut total = 0;
        for row in 0..batch.batch {
            let len = batch.lens[row];
            if len > c.max_position_embeddings || len > batch.seq_len {
                return Err(EmbedError::Backend(format!(
                    "a sequence of {len} tokens exceeds the {} positions of the model",
                    c.max_position_embeddings
                )));
            }
            spans.push((row, total, len));
            total += len;
        }
        // Embeddings: word + position + token type, then LayerNorm.
        let mut x = vec![0.0f32; total * d];
        for &(row, start, len) in &spans {
            for p in 0..len {
                let id = batch.ids[row * batch.seq_len + p] as usize;
                let ty = batch.type_ids[row * batch.seq_len + p] as usize;
                if id >= c.vocab_size {
                    return Err(EmbedError::Backend(format!(
                        "token id {id} is outside the vocabulary of {}",
                        c.vocab_size
                    )));
                }
                if ty >= c.type_vocab_size {
                    return Err(EmbedError::Backend(format!(
                        "token type {ty} is outside the {} types of the model",
                        c.type_vocab_size
                    )));
                }
                let out = &mut x[(start + p) * d..(start + p + 1) * d];
                let (w, pos, t) = (
                    &self.word[id * d..(id + 1) * d],
                    &self.position[p * d..(p + 1) * d],
                    &self.token_type[ty * d..(ty + 1) * d],
                );
                for i in 0..d {
                    out[i] = w[i] + pos[i] + t[i];
                }
            }
        }
        par_chunks(&self.pool, &mut x, d, &|_, row| {
            add_norm(row, None, &self.ln_emb, eps)
        });

        let mut qkv = vec![0.0f32; total * 3 * d];
        let mut ctx = vec![0.0f32; total * d];
        let mut proj = vec![0.0f32; total * d];
        let mut hidden = vec![0.0f32; total * ff];
        for layer in &self.layers {
            layer.qkv.matmul(&x, total, &mut qkv, &self.pool);
            par_chunks(&self.pool, &mut qkv, 3 * d, &|_, row| {
                ops::add(row, &layer.b_qkv)
            });
            self.attention(&qkv, &spans, &mut ctx);
            layer.out.matmul(&ctx, total, &mut proj, &self.pool);
            par_chunks(&self.pool, &mut x, d, &|t, row| {
                add_norm(
                    row,
                    Some((&proj[t * d..(t + 1) * d], &layer.b_out)),
                    &layer.ln1,
                    eps,
                )
            });
            layer.up.matmul(&x, total, &mut hidden, &self.pool);
            par_chunks(&self.pool, &mut hidden, ff, &|_, row| {
                ops::add(row, &layer.b_up);
                ops::gelu(row);
            });
            layer.down.matmul(&hidden, total, &mut proj, &self.pool);
            par_chunks(&self.pool, &mut x, d, &|t, row| {
                add_norm(
                    row,
                    Some((&proj[t * d..(t + 1) * d], &layer.b_down)),
                    &layer.ln2,
                    eps,
                )
            });
        }
        // Mean pooling over each text's tokens, then L2 normalisation.
        Ok(spans
            .iter()
            .map(|&(_, start, len)| {
                let mut v = vec![0.0f32; d];
                for t in start..start + len {
                    ops::add(&mut v, &x[t * d..(t + 1) * d]);
                }
                let n = len.max(1) as f32;
                v.iter_mut().for_each(|x| *x /= n);
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                v.iter_mut().for_each(|x| *x /= norm);
                v
            })
            .collect())
    }

    /// Self-attention of every text over its own tokens: `ctx[t] = softmax(q_t · Kᵀ / √hd) V`
    /// per head, from the packed `[q | k | v]` rows.
    fn attention(&self, qkv: &[f32], spans: &[(usize, usize, usize)], ctx: &mut [f32]) {
        let d = self.config.hidden_size;
        let heads = self.config.num_attention_heads;
        let hd = d / heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let total = ctx.len() / d;
        // Head-major output, `[heads][total][hd]`: each (text, head) item writes one
        // contiguous range, so the items can run in parallel on disjoint slices.
        let mut by_head = vec![0.0f32; heads * total * hd];
        let mut items: Vec<(usize, usize, Mutex<&mut [f32]>)> = Vec::new();
        for (h, plane) in by_head.chunks_mut(total * hd).enumerate() {
            let mut rest = plane;
            for (s, &(_, _, len)) in spans.iter().enumerate() {
                let (mine, tail) = std::mem::take(&mut rest).split_at_mut(len * hd);
                rest = tail;
                items.push((h, s, Mutex::new(mine)));
            }
        }
        let next = AtomicUsize::new(0);
        self.pool.run(&|_| {
            let mut keys = Vec::new();
            let mut scores = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((h, s, out)) = items.get(i) else {
                    break;
                };
                let (_, start, len) = spans[*s];
                let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
                // Keys of this head, transposed into blocks of `[hd][KBLOCK]`.
                let blocks = len.div_ceil(ops::KBLOCK);
                keys.clear();
                keys.resize(blocks * hd * ops::KBLOCK, 0.0);
                for j in 0..len {
                    let k = &qkv[(start + j) * 3 * d + d + h * hd..][..hd];
                    let (b, jj) = (j / ops::KBLOCK, j % ops::KBLOCK);
                    for (e, &kv) in k.iter().enumerate() {
                        keys[b * hd * ops::KBLOCK + e * ops::KBLOCK + jj] = kv;
                    }
                }
                scores.clear();
                scores.resize(blocks * ops::KBLOCK, 0.0);
                let values = &qkv[start * 3 * d + 2 * d + h * hd..];
                for (t, row) in out.chunks_mut(hd).enumerate() {
                    let q = &qkv[(start + t) * 3 * d + h * hd..][..hd];
                    for (b, block) in keys.chunks(hd * ops::KBLOCK).enumerate() {
                        let n = (len - b * ops::KBLOCK).min(ops::KBLOCK);
                        ops::scores_block(q, block, &mut scores[b * ops::KBLOCK..][..n]);
                    }
                    let p = &mut scores[..len];
                    ops::softmax_scaled(p, scale);
                    ops::weighted_sum(p, values, 3 * d, row);
                }
            }
        });
        drop(items);
        // Back to token-major `[total][d]`.
        for (h, plane) in by_head.chunks(total * hd).enumerate() {
            for (t, src) in plane.chunks(hd).enumerate() {
                ctx[t * d + h * hd..][..hd].copy_from_slice(src);
            }
        }
    }
}
