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
use crate::quant::{Epilogue, PackedQ8, ThreadPool};

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

/// `x = LayerNorm(x + y)` for one row (`y` optional), in place.
fn add_norm(x: &mut [f32], y: Option<&[f32]>, norm: &Norm, eps: f32) {
    if let Some(y) = y {
        ops::add(x, y);
    }
    ops::layer_norm(x, &norm.weight, &norm.bias, eps);
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
        // Biases and GELU run inside the products, on outputs still in cache.
        let with_bias = |bias| Epilogue {
            bias: Some(bias),
            gelu: false,
        };
        for layer in &self.layers {
            let pool = &self.pool;
            layer
                .qkv
                .matmul_then(&x, total, &mut qkv, with_bias(&layer.b_qkv), pool);
            self.attention(&qkv, &spans, &mut ctx);
            layer
                .out
                .matmul_then(&ctx, total, &mut proj, with_bias(&layer.b_out), pool);
            par_chunks(pool, &mut x, d, &|t, row| {
                add_norm(row, Some(&proj[t * d..(t + 1) * d]), &layer.ln1, eps)
            });
            let bias_gelu = Epilogue {
                bias: Some(&layer.b_up),
                gelu: true,
            };
            layer
                .up
                .matmul_then(&x, total, &mut hidden, bias_gelu, pool);
            layer
                .down
                .matmul_then(&hidden, total, &mut proj, with_bias(&layer.b_down), pool);
            par_chunks(pool, &mut x, d, &|t, row| {
                add_norm(row, Some(&proj[t * d..(t + 1) * d]), &layer.ln2, eps)
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
                #[cfg(target_arch = "x86_64")]
                if let Some(shape) = wide::Shape::new(3 * d, hd, len) {
                    let at = |part: usize| start * 3 * d + part * d + h * hd;
                    let heads = wide::Head {
                        qkv,
                        q: at(0),
                        k: at(1),
                        v: at(2),
                    };
                    // SAFETY: `Shape::new` checked the CPU and the shape; the text's rows lie
                    // inside `qkv` and `out` holds its `len × hd` outputs.
                    unsafe { wide::attend(shape, heads, scale, &mut keys, &mut scores, &mut out) };
                    continue;
                }
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

/// Attention of one text and head with AVX-512 (16 keys a register), for the embedder's short
/// texts and narrow heads (MiniLM: about 40 tokens, 32 dimensions): four query rows at a time
/// share each load of the transposed keys and of the values, the scale is applied to the
/// scores, and the exponentials use `vscalefps`.
#[cfg(target_arch = "x86_64")]
mod wide {
    use std::arch::x86_64::*;

    use crate::llm::ops::avx512::exp;

    /// Lanes of a register.
    const W: usize = 16;
    /// Query rows per pass.
    const R: usize = 4;

    /// The shape of one attention: row stride of `qkv`, head width and text length.
    #[derive(Clone, Copy)]
    pub(super) struct Shape {
        stride: usize,
        hd: usize,
        len: usize,
    }

    impl Shape {
        /// The shape, where this kernel runs it: AVX-512 on this CPU, a head of 16 to 64
        /// dimensions in whole registers, and a text of at least one token.
        pub(super) fn new(stride: usize, hd: usize, len: usize) -> Option<Shape> {
            let fits = hd.is_multiple_of(W) && (W..=4 * W).contains(&hd) && len > 0;
            (fits && std::is_x86_feature_detected!("avx512f")).then_some(Shape { stride, hd, len })
        }
    }

    /// Where the head's query, key and value rows of the text start in `qkv`.
    pub(super) struct Head<'a> {
        pub(super) qkv: &'a [f32],
        pub(super) q: usize,
        pub(super) k: usize,
        pub(super) v: usize,
    }

    /// `out[t] = softmax(q_t · Kᵀ · scale) V` for the `len` rows of one text.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F (as [`Shape::new`] checks); the `len` rows of `hd`
    /// values at `q`, `k` and `v` (stride `stride`) must lie inside `head.qkv`, and `out`
    /// must hold `len × hd` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn attend(
        shape: Shape,
        head: Head<'_>,
        scale: f32,
        kt: &mut Vec<f32>,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let Shape { stride, hd, len } = shape;
        assert!(out.len() >= len * hd, "attention output too short");
        for base in [head.q, head.k, head.v] {
            assert!(
                base + (len - 1) * stride + hd <= head.qkv.len(),
                "rows outside qkv"
            );
        }
        // Keys transposed to `[hd][lp]`, zero-padded to whole registers.
        let lp = len.div_ceil(W) * W;
        kt.clear();
        kt.resize(hd * lp, 0.0);
        for j in 0..len {
            let k = &head.qkv[head.k + j * stride..][..hd];
            for (e, &x) in k.iter().enumerate() {
                kt[e * lp + j] = x;
            }
        }
        scores.clear();
        scores.resize(R * lp, 0.0);
        let mut i = 0;
        while i < len {
            let rows = (len - i).min(R);
            // SAFETY: the caller's guarantees, and the buffers sized above.
            unsafe {
                match (rows, hd / W) {
                    (1, 1) => rows_of::<1, 1>(shape, &head, i, scale, kt, scores, out),
                    (2, 1) => rows_of::<2, 1>(shape, &head, i, scale, kt, scores, out),
                    (3, 1) => rows_of::<3, 1>(shape, &head, i, scale, kt, scores, out),
                    (_, 1) => rows_of::<4, 1>(shape, &head, i, scale, kt, scores, out),
                    (1, 2) => rows_of::<1, 2>(shape, &head, i, scale, kt, scores, out),
                    (2, 2) => rows_of::<2, 2>(shape, &head, i, scale, kt, scores, out),
                    (3, 2) => rows_of::<3, 2>(shape, &head, i, scale, kt, scores, out),
                    (_, 2) => rows_of::<4, 2>(shape, &head, i, scale, kt, scores, out),
                    (1, 3) => rows_of::<1, 3>(shape, &head, i, scale, kt, scores, out),
                    (2, 3) => rows_of::<2, 3>(shape, &head, i, scale, kt, scores, out),
                    (3, 3) => rows_of::<3, 3>(shape, &head, i, scale, kt, scores, out),
                    (_, 3) => rows_of::<4, 3>(shape, &head, i, scale, kt, scores, out),
                    (1, _) => rows_of::<1, 4>(shape, &head, i, scale, kt, scores, out),
                    (2, _) => rows_of::<2, 4>(shape, &head, i, scale, kt, scores, out),
                    (3, _) => rows_of::<3, 4>(shape, &head, i, scale, kt, scores, out),
                    (_, _) => rows_of::<4, 4>(shape, &head, i, scale, kt, scores, out),
                }
            }
            i += rows;
        }
    }

    /// Query rows `i..i + NR` of [`attend`], for a head of `HV` registers.
    ///
    /// # Safety
    /// As [`attend`] (whose checks cover these rows); `kt` is `[hd][lp]` and `scores` holds
    /// `R × lp` values.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)]
    unsafe fn rows_of<const NR: usize, const HV: usize>(
        shape: Shape,
        head: &Head<'_>,
        i: usize,
        scale: f32,
        kt: &[f32],
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let Shape { stride, hd, len } = shape;
        let lp = len.div_ceil(W) * W;
        let blocks = lp / W;
        let tail = len - (blocks - 1) * W;
        let last_mask: __mmask16 = if tail == W { 0xFFFF } else { (1 << tail) - 1 };
        let qkv = head.qkv.as_ptr();
        let sc = scores.as_mut_ptr();
        // Scores, scaled: four rows share each register of keys.
        for b in 0..blocks {
            let mut acc = [_mm512_setzero_ps(); NR];
            for e in 0..hd {
                // SAFETY: kt is hd × lp.
                let k = unsafe { _mm512_loadu_ps(kt.as_ptr().add(e * lp + b * W)) };
                for r in 0..NR {
                    // SAFETY: row i + r < len lies inside qkv (checked by `attend`).
                    let q = unsafe { *qkv.add(head.q + (i + r) * stride + e) };
                    acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(q), k, acc[r]);
                }
            }
            for r in 0..NR {
                let s = _mm512_mul_ps(acc[r], _mm512_set1_ps(scale));
                // SAFETY: scores holds R × lp values.
                unsafe { _mm512_storeu_ps(sc.add(r * lp + b * W), s) };
            }
        }
        // Softmax numerators (padding lanes zero) and their sums.
        let mut inv = [0.0f32; NR];
        for r in 0..NR {
            let mask = |b: usize| if b + 1 == blocks { last_mask } else { 0xFFFF };
            let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
            for b in 0..blocks {
                // SAFETY: inside scores.
                let s = unsafe { _mm512_loadu_ps(sc.add(r * lp + b * W)) };
                m = _mm512_mask_max_ps(m, mask(b), m, s);
            }
            let max = _mm512_set1_ps(_mm512_reduce_max_ps(m));
            let mut sum = _mm512_setzero_ps();
            for b in 0..blocks {
                let at = r * lp + b * W;
                // SAFETY: inside scores.
                let s = unsafe { _mm512_loadu_ps(sc.add(at)) };
                let e = _mm512_maskz_mov_ps(mask(b), exp(_mm512_sub_ps(s, max)));
                // SAFETY: inside scores.
                unsafe { _mm512_storeu_ps(sc.add(at), e) };
                sum = _mm512_add_ps(sum, e);
            }
            inv[r] = 1.0 / _mm512_reduce_add_ps(sum);
        }
        // Weighted values: four rows share each load of a value row.
        let mut acc = [[_mm512_setzero_ps(); HV]; NR];
        for j in 0..len {
            let mut v = [_mm512_setzero_ps(); HV];
            for c in 0..HV {
                // SAFETY: value row j < len lies inside qkv (checked by `attend`).
                v[c] = unsafe { _mm512_loadu_ps(qkv.add(head.v + j * stride + c * W)) };
            }
            for r in 0..NR {
                // SAFETY: inside scores.
                let p = _mm512_set1_ps(unsafe { *sc.add(r * lp + j) });
                for c in 0..HV {
                    acc[r][c] = _mm512_fmadd_ps(p, v[c], acc[r][c]);
                }
            }
        }
        for r in 0..NR {
            let s = _mm512_set1_ps(inv[r]);
            for c in 0..HV {
                // SAFETY: out holds len × hd values and row i + r < len.
                unsafe {
                    _mm512_storeu_ps(
                        out.as_mut_ptr().add((i + r) * hd + c * W),
                        _mm512_mul_ps(acc[r][c], s),
                    )
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// The AVX-512 attention equals the naive softmax(q · Kᵀ · scale) V on every head width
    /// it takes and on lengths around its register and row blocks.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn wide_attention_matches_the_naive_one() {
        let mut seed = 1u32;
        let mut value = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 4.0
        };
        let (mut kt, mut scores) = (Vec::new(), Vec::new());
        for hd in [16, 32, 48, 64] {
            for len in [1, 2, 5, 15, 16, 17, 40, 77] {
                let stride = 3 * hd + 5;
                let qkv: Vec<f32> = (0..len * stride + 2).map(|_| value()).collect();
                let (q, k, v) = (1, 1 + hd, 1 + 2 * hd);
                let scale = 1.0 / (hd as f32).sqrt();
                let Some(shape) = super::wide::Shape::new(stride, hd, len) else {
                    return; // no AVX-512 on this CPU
                };
                let mut out = vec![f32::NAN; len * hd];
                let head = super::wide::Head { qkv: &qkv, q, k, v };
                // SAFETY: the rows lie inside qkv and out holds len × hd values.
                unsafe { super::wide::attend(shape, head, scale, &mut kt, &mut scores, &mut out) };
                for t in 0..len {
                    let s: Vec<f64> = (0..len)
                        .map(|j| {
                            (0..hd)
                                .map(|e| {
                                    f64::from(qkv[q + t * stride + e] * qkv[k + j * stride + e])
                                })
                                .sum::<f64>()
                                * f64::from(scale)
                        })
                        .collect();
                    let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for c in 0..hd {
                        let want: f64 = (0..len)
                            .map(|j| e[j] / sum * f64::from(qkv[v + j * stride + c]))
                            .sum();
                        let got = f64::from(out[t * hd + c]);
                        assert!(
                            (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                            "hd {hd} len {len} [{t}][{c}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
