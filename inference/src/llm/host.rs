//! The CPU path: weights stay quantized in the GGUF memory map ([`QMatrix`]), activations are
//! plain f32 slices, and the small operations (norms, RoPE, attention over the KV cache) are
//! hand-vectorised loops. Burn's per-operation dispatch costs more than these operations
//! themselves at decode time (one token, a few hundred floats), so they do not go through it.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::gguf::{GgmlType, GgufFile};
use crate::quant::{QMatrix, ThreadPool};

use super::config::{Architecture, FfnActivation, LlmConfig};
use super::rope::Rope;
use super::{LlmError, ops};

/// Tokens processed together in one prefill step: bounds the scratch memory
/// (`CHUNK × d_ff` floats) while keeping the matrix kernels efficient.
pub(crate) const CHUNK: usize = 128;

/// One transformer block's weights.
#[derive(Debug)]
struct Layer {
    attn_norm: Vec<f32>,
    /// q, k and v projections.
    qkv: Fused,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    /// Per-head RMSNorm weights of queries and keys (qwen3).
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    wo: QMatrix,
    /// Norms of the attention and feed-forward outputs before their residual additions
    /// (gemma3).
    post_attn_norm: Option<Vec<f32>>,
    post_ffn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    /// Gate and up projections.
    gate_up: Fused,
    w_down: QMatrix,
}

/// Matrices that multiply the same input. When they share an encoding they are concatenated
/// (row-wise) into one matrix at load time: one product instead of several means one
/// activation quantization and one hand-off to the thread pool instead of two or three, and
/// larger work units to balance. The concatenated copy replaces the mapped bytes, which are then
/// never touched, so resident memory does not grow.
#[derive(Debug)]
enum Fused {
    /// One matrix; `rows[i]` rows belong to output `i`.
    One { matrix: QMatrix, rows: Vec<usize> },
    /// Different encodings: one product each.
    Separate(Vec<QMatrix>),
}

impl Fused {
    fn new(parts: Vec<QMatrix>) -> Result<Fused, LlmError> {
        let first = &parts[0];
        let same = parts
            .iter()
            .all(|m| m.dtype() == first.dtype() && m.cols() == first.cols());
        if !same || parts.len() < 2 {
            return Ok(Fused::Separate(parts));
        }
        let rows: Vec<usize> = parts.iter().map(QMatrix::rows).collect();
        let mut bytes = Vec::with_capacity(parts.iter().map(|m| m.bytes().len()).sum());
        for m in &parts {
            bytes.extend_from_slice(m.bytes());
        }
        let matrix = QMatrix::from_bytes(first.dtype(), rows.iter().sum(), first.cols(), bytes)?;
        Ok(Fused::One { matrix, rows })
    }

    /// `outs[i][n × rows_i] = x · W_iᵀ`; `scratch` holds the fused product.
    fn matmul(
        &self,
        x: &[f32],
        n: usize,
        outs: &mut [&mut [f32]],
        scratch: &mut Vec<f32>,
        pool: &ThreadPool,
    ) {
        match self {
            Fused::Separate(parts) => {
                for (m, out) in parts.iter().zip(outs.iter_mut()) {
                    m.matmul(x, n, &mut out[..n * m.rows()], pool);
                }
            }
            Fused::One { matrix, rows } => {
                let total = matrix.rows();
                if scratch.len() < n * total {
                    scratch.resize(n * total, 0.0);
                }
                matrix.matmul(x, n, &mut scratch[..n * total], pool);
                for t in 0..n {
                    let mut start = t * total;
                    for (out, &r) in outs.iter_mut().zip(rows) {
                        out[t * r..(t + 1) * r].copy_from_slice(&scratch[start..start + r]);
                        start += r;
                    }
                }
            }
        }
    }
}

impl Fused {
    /// The matrices with their rows interleaved where the type allows
    /// ([`QMatrix::interleaved`]).
    fn interleaved(self) -> Fused {
        match self {
            Fused::One { matrix, rows } => Fused::One {
                matrix: interleaved(matrix),
                rows,
            },
            Fused::Separate(parts) => Fused::Separate(parts.into_iter().map(interleaved).collect()),
        }
    }
}

/// `m` with its rows interleaved eight at a time when its type allows (Q4_0, Q4_1, Q8_0): the
/// batched decode's products are then about twice as fast, and single-token products faster
/// too (see `qbench`). The copy replaces the mapped bytes, released by the caller.
fn interleaved(m: QMatrix) -> QMatrix {
    m.interleaved().unwrap_or(m)
}

/// Weights of the CPU path.
#[derive(Debug)]
pub(crate) struct HostModel {
    config: LlmConfig,
    rope: Rope,
    /// The local (sliding-window) layers' rotary embedding, when they have their own.
    rope_local: Option<Rope>,
    embd: QMatrix,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    /// `None`: the LM head is `embd` (tied embeddings).
    output: Option<QMatrix>,
    pool: ThreadPool,
    /// Activation buffers of batched steps ([`HostModel::forward_batch`]; one batch runs at a
    /// time, the lock is taken once per step).
    batch_scratch: std::sync::Mutex<Scratch>,
}

/// Loads a tensor that must exist, as a matrix of `rows × cols`; with `f32`, dequantized to
/// f32 (exact activations, four to eight times the memory).
fn qmatrix(
    file: &GgufFile,
    name: &str,
    rows: usize,
    cols: usize,
    f32: bool,
) -> Result<QMatrix, LlmError> {
    let info = file.tensor(name).ok_or_else(|| LlmError::MissingTensor {
        name: name.to_string(),
    })?;
    let m = QMatrix::from_gguf(file, info)?;
    if m.rows() != rows || m.cols() != cols {
        return Err(LlmError::TensorShape {
            name: name.to_string(),
            dims: info.dims.clone(),
            expected: format!("[{cols}, {rows}]"),
        });
    }
    if f32 && m.dtype() != GgmlType::F32 {
        let bytes: Vec<u8> = m.to_f32().iter().flat_map(|v| v.to_le_bytes()).collect();
        return Ok(QMatrix::from_bytes(GgmlType::F32, rows, cols, bytes)?);
    }
    Ok(m)
}

/// Drops this process's mapped pages of tensor `name`, which was copied into a fused matrix,
/// so they stop counting as resident memory (without this the copy costs 44 MB of RSS on the
/// default model). Only for maps of real files: the pages are re-read from the file if touched
/// again (a neighbouring tensor sharing a page), whereas an anonymous map would lose them.
fn release_mapped(file: &GgufFile, name: &str) {
    #[cfg(unix)]
    if let Some(info) = file.tensor(name) {
        let (Ok(offset), Ok(len)) = (usize::try_from(info.offset), usize::try_from(info.n_bytes))
        else {
            return;
        };
        let map = file.mmap();
        // SAFETY: the map is a read-only private mapping of a file (the caller checks it is
        // file-backed): MADV_DONTNEED only discards this process's copy of the pages, and any
        // later read of them faults the same bytes back in from the file. Nothing is written.
        // Failure only costs memory.
        let _ =
            unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len) };
    }
    #[cfg(not(unix))]
    let _ = (file, name);
}

/// Loads a vector tensor of `n` values as f32.
pub(crate) fn vector(file: &GgufFile, name: &str, n: usize) -> Result<Vec<f32>, LlmError> {
    let info = file.tensor(name).ok_or_else(|| LlmError::MissingTensor {
        name: name.to_string(),
    })?;
    if info.n_elements() != n as u64 {
        return Err(LlmError::TensorShape {
            name: name.to_string(),
            dims: info.dims.clone(),
            expected: format!("[{n}]"),
        });
    }
    Ok(file.dequantize(info)?)
}

fn optional_vector(file: &GgufFile, name: &str, n: usize) -> Result<Option<Vec<f32>>, LlmError> {
    if file.tensor(name).is_some() {
        vector(file, name, n).map(Some)
    } else {
        Ok(None)
    }
}

impl HostModel {
    /// Maps the weights of `file` (no copy of the matrices; with `f32_weights` they are
    /// dequantized instead) and starts `threads` workers.
    pub(crate) fn load(
        file: &GgufFile,
        config: &LlmConfig,
        rope: Rope,
        threads: usize,
        f32_weights: bool,
        file_backed: bool,
    ) -> Result<HostModel, LlmError> {
        let f = f32_weights;
        let c = config;
        let (d, q, kv, ff) = (c.d_model, c.q_dim(), c.kv_dim(), c.d_ff);
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            let n = |s: &str| format!("blk.{l}.{s}");
            let bias = |s: &str, len: usize| -> Result<Option<Vec<f32>>, LlmError> {
                let b = optional_vector(file, &n(s), len)?;
                if c.qkv_bias && b.is_none() {
                    return Err(LlmError::MissingTensor { name: n(s) });
                }
                Ok(b)
            };
            let head_norm = |s: &str| -> Result<Option<Vec<f32>>, LlmError> {
                c.qk_norm
                    .then(|| vector(file, &n(s), c.head_dim))
                    .transpose()
            };
            let post_norm = |s: &str| -> Result<Option<Vec<f32>>, LlmError> {
                c.post_norms.then(|| vector(file, &n(s), d)).transpose()
            };
            let qkv = if c.architecture == Architecture::Phi3 {
                // One matrix in the file: rows q, then k, then v.
                Fused::One {
                    matrix: qmatrix(file, &n("attn_qkv.weight"), q + 2 * kv, d, f)?,
                    rows: vec![q, kv, kv],
                }
            } else {
                Fused::new(vec![
                    qmatrix(file, &n("attn_q.weight"), q, d, f)?,
                    qmatrix(file, &n("attn_k.weight"), kv, d, f)?,
                    qmatrix(file, &n("attn_v.weight"), kv, d, f)?,
                ])?
            };
            let gate_up = if c.architecture == Architecture::Phi3 {
                // One matrix in the file: the gate's rows, then the up projection's.
                Fused::One {
                    matrix: qmatrix(file, &n("ffn_up.weight"), 2 * ff, d, f)?,
                    rows: vec![ff, ff],
                }
            } else {
                Fused::new(vec![
                    qmatrix(file, &n("ffn_gate.weight"), ff, d, f)?,
                    qmatrix(file, &n("ffn_up.weight"), ff, d, f)?,
                ])?
            };
            let (qkv, gate_up) = (qkv.interleaved(), gate_up.interleaved());
            let wo = interleaved(qmatrix(file, &n("attn_output.weight"), d, q, f)?);
            let w_down = interleaved(qmatrix(file, &n("ffn_down.weight"), d, ff, f)?);
            // Matrices copied (fused or interleaved) no longer use their mapped pages.
            if file_backed {
                let copied = |fused: &Fused| match fused {
                    Fused::One { matrix, .. } => !matrix.is_mapped(),
                    Fused::Separate(parts) => parts.iter().all(|m| !m.is_mapped()),
                };
                let qkv_names: &[&str] = if c.architecture == Architecture::Phi3 {
                    &["attn_qkv.weight"]
                } else {
                    &["attn_q.weight", "attn_k.weight", "attn_v.weight"]
                };
                let gate_up_names: &[&str] = if c.architecture == Architecture::Phi3 {
                    &["ffn_up.weight"]
                } else {
                    &["ffn_gate.weight", "ffn_up.weight"]
                };
                let mut names = Vec::new();
                if copied(&qkv) {
                    names.extend_from_slice(qkv_names);
                }
                if copied(&gate_up) {
                    names.extend_from_slice(gate_up_names);
                }
                if !wo.is_mapped() {
                    names.push("attn_output.weight");
                }
                if !w_down.is_mapped() {
                    names.push("ffn_down.weight");
                }
                for name in names {
                    release_mapped(file, &n(name));
                }
            }
            layers.push(Layer {
                attn_norm: vector(file, &n("attn_norm.weight"), d)?,
                qkv,
                bq: bias("attn_q.bias", q)?,
                bk: bias("attn_k.bias", kv)?,
                bv: bias("attn_v.bias", kv)?,
                q_norm: head_norm("attn_q_norm.weight")?,
                k_norm: head_norm("attn_k_norm.weight")?,
                post_attn_norm: post_norm("post_attention_norm.weight")?,
                post_ffn_norm: post_norm("post_ffw_norm.weight")?,
                wo,
                ffn_norm: vector(file, &n("ffn_norm.weight"), d)?,
                gate_up,
                w_down,
            });
        }
        let output = if c.tied_embeddings {
            None
        } else {
            Some(interleaved(qmatrix(
                file,
                "output.weight",
                c.vocab_size,
                d,
                f,
            )?))
        };
        let mut embd = qmatrix(file, "token_embd.weight", c.vocab_size, d, f)?;
        // Tied: the embedding is the LM head, whose products the layout speeds up (its rows
        // are still looked up, from the interleaved copy). Untied, it is only looked up.
        if c.tied_embeddings {
            embd = interleaved(embd);
        }
        if file_backed {
            for (m, name) in [
                (Some(&embd), "token_embd.weight"),
                (output.as_ref(), "output.weight"),
            ] {
                if m.is_some_and(|m| !m.is_mapped()) {
                    release_mapped(file, name);
                }
            }
        }
        Ok(HostModel {
            config: config.clone(),
            rope,
            rope_local: c.rope_base_local.map(|_| Rope::new(&c.local_rope(), None)),
            embd,
            layers,
            output_norm: vector(file, "output_norm.weight", d)?,
            output,
            pool: ThreadPool::new(threads),
            batch_scratch: std::sync::Mutex::new(Scratch::default()),
        })
    }

    /// Dimension of one attention head.
    pub(crate) fn head_dim(&self) -> usize {
        self.config.head_dim
    }

    /// Number of threads the kernels use.
    pub(crate) fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Runs `tokens` through the model at positions `cache.len()..`, appending to the cache,
    /// and writes the logits of the last token into `logits` (`vocab_size` values).
    pub(crate) fn forward(
        &self,
        cache: &mut HostCache,
        tokens: &[u32],
        logits: &mut Vec<f32>,
    ) -> Result<(), LlmError> {
        self.check_tokens(tokens)?;
        let HostCache {
            layers,
            len,
            scratch,
        } = cache;
        for chunk in tokens.chunks(CHUNK) {
            self.step(
                scratch,
                &mut [Part {
                    layers: layers.as_mut_slice(),
                    len: &mut *len,
                    tokens: chunk,
                }],
            );
        }
        if tokens.is_empty() {
            return Ok(());
        }
        // The last token's hidden state is the last row of the last chunk.
        let rows = (tokens.len() - 1) % CHUNK + 1;
        self.logits(scratch, &[rows - 1], std::slice::from_mut(logits));
        Ok(())
    }

    /// One step of several sequences at once (continuous batching): `batch[i].1` runs through
    /// the model at positions `batch[i].0.len()..`, appending to that sequence's cache, and the
    /// logits of its last token go to `logits[i]`. The sequences' rows go through every weight
    /// matrix together (one read of the weights for all of them, where one sequence at a time
    /// reads them once per sequence); attention stays per sequence, over its own cache. The
    /// result is what [`forward`](Self::forward) gives each sequence alone. At most [`CHUNK`]
    /// tokens in all (bounds the scratch memory); every sequence brings at least one.
    pub(crate) fn forward_batch(
        &self,
        batch: &mut [(&mut HostCache, &[u32])],
        logits: &mut [Vec<f32>],
    ) -> Result<(), LlmError> {
        let total: usize = batch.iter().map(|(_, t)| t.len()).sum();
        if total > CHUNK || batch.iter().any(|(_, t)| t.is_empty()) || logits.len() != batch.len() {
            return Err(LlmError::Backend(format!(
                "a batched step takes 1 to {CHUNK} tokens in all, at least one per sequence \
                 ({total} tokens for {} sequences, {} logit buffers)",
                batch.len(),
                logits.len()
            )));
        }
        for (_, tokens) in batch.iter() {
            self.check_tokens(tokens)?;
        }
        // A poisoned lock only means an earlier step panicked; the scratch holds no state.
        let mut scratch = self
            .batch_scratch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let scratch = &mut *scratch;
        if scratch.scores.len() < self.threads() {
            scratch.scores.resize(self.threads(), Vec::new());
        }
        let mut last_rows = Vec::with_capacity(batch.len());
        let mut row = 0;
        let mut parts: Vec<Part<'_>> = batch
            .iter_mut()
            .map(|(cache, tokens)| {
                let tokens: &[u32] = tokens;
                row += tokens.len();
                last_rows.push(row - 1);
                Part {
                    layers: cache.layers.as_mut_slice(),
                    len: &mut cache.len,
                    tokens,
                }
            })
            .collect();
        self.step(scratch, &mut parts);
        self.logits(scratch, &last_rows, logits);
        Ok(())
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<(), LlmError> {
        let vocab_size = self.config.vocab_size;
        match tokens.iter().find(|&&t| t as usize >= vocab_size) {
            Some(&token) => Err(LlmError::InvalidToken { token, vocab_size }),
            None => Ok(()),
        }
    }

    /// The logits of the hidden states in rows `rows` of the last step, one row at a time
    /// into `logits` (the LM head multiplies them all at once).
    fn logits(&self, s: &mut Scratch, rows: &[usize], logits: &mut [Vec<f32>]) {
        let c = &self.config;
        let (d, vocab) = (c.d_model, c.vocab_size);
        let k = rows.len();
        s.normed.resize(k * d, 0.0);
        for (i, &r) in rows.iter().enumerate() {
            ops::rmsnorm(
                &mut s.normed[i * d..(i + 1) * d],
                &s.x[r * d..(r + 1) * d],
                &self.output_norm,
                c.rms_eps,
            );
        }
        let head = self.output.as_ref().unwrap_or(&self.embd);
        if k == 1 {
            logits[0].resize(vocab, 0.0);
            head.matmul(&s.normed[..d], 1, &mut logits[0], &self.pool);
            return;
        }
        s.head.resize(k * vocab, 0.0);
        head.matmul(&s.normed[..k * d], k, &mut s.head[..k * vocab], &self.pool);
        for (i, out) in logits.iter_mut().enumerate() {
            out.clear();
            out.extend_from_slice(&s.head[i * vocab..(i + 1) * vocab]);
        }
    }

    /// Runs the rows of `parts` (one sequence each, in order) through every layer.
    fn step(&self, s: &mut Scratch, parts: &mut [Part<'_>]) {
        let c = &self.config;
        let (d, qd, kvd, ff, hd) = (c.d_model, c.q_dim(), c.kv_dim(), c.d_ff, c.head_dim);
        let n: usize = parts.iter().map(|p| p.tokens.len()).sum();
        s.resize(n, c);
        // One score row per pool thread: `attention` relies on it (a scratch released for a
        // cached sequence has none).
        if s.scores.len() < self.threads() {
            s.scores.resize(self.threads(), Vec::new());
        }
        s.cos.clear();
        s.sin.clear();
        s.cos_local.clear();
        s.sin_local.clear();
        let mut row = 0;
        for part in parts.iter() {
            for &t in part.tokens {
                let x = &mut s.x[row * d..(row + 1) * d];
                self.embd.dequantize_row(t as usize, x);
                if let Some(scale) = c.embed_scale {
                    x.iter_mut().for_each(|v| *v *= scale);
                }
                row += 1;
            }
            self.rope
                .append_tables(*part.len, part.tokens.len(), &mut s.cos, &mut s.sin);
            if let Some(local) = &self.rope_local {
                local.append_tables(
                    *part.len,
                    part.tokens.len(),
                    &mut s.cos_local,
                    &mut s.sin_local,
                );
            }
        }
        let half = self.rope.half();
        for (l, layer) in self.layers.iter().enumerate() {
            let window = c.window(l);
            let (rope, cos_table, sin_table) = match (&self.rope_local, window) {
                (Some(local), Some(_)) => (local, &s.cos_local, &s.sin_local),
                _ => (&self.rope, &s.cos, &s.sin),
            };
            for i in 0..n {
                ops::rmsnorm(
                    &mut s.h[i * d..(i + 1) * d],
                    &s.x[i * d..(i + 1) * d],
                    &layer.attn_norm,
                    c.rms_eps,
                );
            }
            let h = &s.h[..n * d];
            layer.qkv.matmul(
                h,
                n,
                &mut [&mut s.q[..n * qd], &mut s.k[..n * kvd], &mut s.v[..n * kvd]],
                &mut s.fused,
                &self.pool,
            );
            for (buf, bias, width) in [
                (&mut s.q, &layer.bq, qd),
                (&mut s.k, &layer.bk, kvd),
                (&mut s.v, &layer.bv, kvd),
            ] {
                if let Some(b) = bias {
                    for row in buf[..n * width].chunks_exact_mut(width) {
                        ops::add(row, b);
                    }
                }
            }
            for (buf, norm, width) in [
                (&mut s.q, &layer.q_norm, qd),
                (&mut s.k, &layer.k_norm, kvd),
            ] {
                if let Some(w) = norm {
                    let mut head_in = vec![0.0; hd];
                    for head in buf[..n * width].chunks_exact_mut(hd) {
                        head_in.copy_from_slice(head);
                        ops::rmsnorm(head, &head_in, w, c.rms_eps);
                    }
                }
            }
            for i in 0..n {
                let (cos, sin) = (
                    &cos_table[i * half..(i + 1) * half],
                    &sin_table[i * half..(i + 1) * half],
                );
                for head in s.q[i * qd..(i + 1) * qd].chunks_exact_mut(hd) {
                    rope.apply(head, cos, sin);
                }
                for head in s.k[i * kvd..(i + 1) * kvd].chunks_exact_mut(hd) {
                    rope.apply(head, cos, sin);
                }
            }
            let mut row = 0;
            for part in parts.iter_mut() {
                let m = part.tokens.len();
                part.layers[l].append(
                    &s.k[row * kvd..(row + m) * kvd],
                    &s.v[row * kvd..(row + m) * kvd],
                    *part.len,
                    hd,
                );
                row += m;
            }
            let mut row = 0;
            let spans: Vec<Span<'_>> = parts
                .iter()
                .map(|part| {
                    let span = Span {
                        row,
                        n: part.tokens.len(),
                        pos0: *part.len,
                        cache: &part.layers[l],
                    };
                    row += span.n;
                    span
                })
                .collect();
            self.attention(
                &s.q[..n * qd],
                &spans,
                window,
                &mut s.att[..n * qd],
                &mut s.scores,
            );
            layer
                .wo
                .matmul(&s.att[..n * qd], n, &mut s.o[..n * d], &self.pool);
            post_norm(
                &mut s.o[..n * d],
                &mut s.h,
                &layer.post_attn_norm,
                c.rms_eps,
            );
            ops::add(&mut s.x[..n * d], &s.o[..n * d]);

            for i in 0..n {
                ops::rmsnorm(
                    &mut s.h[i * d..(i + 1) * d],
                    &s.x[i * d..(i + 1) * d],
                    &layer.ffn_norm,
                    c.rms_eps,
                );
            }
            let h = &s.h[..n * d];
            layer.gate_up.matmul(
                h,
                n,
                &mut [&mut s.g[..n * ff], &mut s.u[..n * ff]],
                &mut s.fused,
                &self.pool,
            );
            match c.ffn_activation {
                FfnActivation::Silu => ops::silu_mul(&mut s.g[..n * ff], &s.u[..n * ff]),
                FfnActivation::GeluTanh => ops::gelu_tanh_mul(&mut s.g[..n * ff], &s.u[..n * ff]),
            }
            layer
                .w_down
                .matmul(&s.g[..n * ff], n, &mut s.o[..n * d], &self.pool);
            post_norm(&mut s.o[..n * d], &mut s.h, &layer.post_ffn_norm, c.rms_eps);
            ops::add(&mut s.x[..n * d], &s.o[..n * d]);
        }
        for part in parts.iter_mut() {
            *part.len += part.tokens.len();
        }
    }

    /// Causal attention of each span's new queries (rows `row..row + n` of `q`, positions
    /// `pos0..pos0 + n` of its sequence) over that sequence's cache (`pos0 + n` positions),
    /// split over the pool by (token, head) across all spans.
    fn attention(
        &self,
        q: &[f32],
        spans: &[Span<'_>],
        window: Option<usize>,
        out: &mut [f32],
        scores: &mut [Vec<f32>],
    ) {
        let c = &self.config;
        let (hd, qd) = (c.head_dim, c.q_dim());
        let group = c.n_heads / c.n_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let block = hd * ops::KBLOCK;
        let rows: usize = spans.iter().map(|s| s.n).sum();
        let units = rows * c.n_heads;
        let next = AtomicUsize::new(0);
        let out_ptr = OutPtr(out.as_mut_ptr());
        assert!(
            scores.len() >= self.pool.threads(),
            "one score buffer per pool thread"
        );
        let scores_ptr = ScoresPtr(scores.as_mut_ptr());
        let work = |share: usize| {
            // SAFETY: each share uses its own scores buffer (`share < threads == scores.len()`).
            let sc = unsafe { &mut *scores_ptr.get().add(share) };
            loop {
                let u = next.fetch_add(1, Ordering::Relaxed);
                if u >= units {
                    break;
                }
                let (r, h) = (u / c.n_heads, u % c.n_heads);
                // Spans are few (one per sequence of the batch): a scan finds the row's.
                let Some(span) = spans.iter().find(|s| (s.row..s.row + s.n).contains(&r)) else {
                    break;
                };
                let i = r - span.row;
                let kvh = h / group;
                let ctx = span.pos0 + i + 1;
                // A local layer's query sees the last `window` positions only: from the block
                // holding the first of them.
                let start = window.map_or(0, |w| ctx.saturating_sub(w));
                let first_block = start / ops::KBLOCK;
                let skipped = first_block * ops::KBLOCK;
                let qh = &q[r * qd + h * hd..r * qd + (h + 1) * hd];
                let keys = &span.cache.k[kvh];
                sc.resize((ctx - skipped).next_multiple_of(ops::KBLOCK), 0.0);
                for (b, chunk) in sc[..ctx - skipped].chunks_mut(ops::KBLOCK).enumerate() {
                    let b = first_block + b;
                    ops::scores_block(qh, &keys[b * block..(b + 1) * block], chunk);
                }
                let p = &mut sc[start - skipped..ctx - skipped];
                ops::softmax_scaled(p, scale);
                // SAFETY: unit (r, h) owns out[r*qd + h*hd ..][..hd]; units are disjoint and
                // the pool joins before `attention` returns.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(out_ptr.get().add(r * qd + h * hd), hd)
                };
                ops::weighted_sum(p, &span.cache.v[kvh][start * hd..], hd, o);
            }
        };
        let work_size: usize = spans.iter().map(|s| s.n * (s.pos0 + s.n)).sum();
        if units < 2 || self.pool.threads() == 1 || work_size < 64 {
            work(0);
        } else {
            self.pool.run(&work);
        }
    }
}

/// RMS-normalises the rows of `x` (`d` = `norm.len()` wide) with `norm`, when there is one;
/// `tmp` holds a copy of the input.
fn post_norm(x: &mut [f32], tmp: &mut [f32], norm: &Option<Vec<f32>>, eps: f32) {
    let Some(w) = norm else {
        return;
    };
    let d = w.len();
    let tmp = &mut tmp[..x.len()];
    tmp.copy_from_slice(x);
    for (row, input) in x.chunks_exact_mut(d).zip(tmp.chunks_exact(d)) {
        ops::rmsnorm(row, input, w, eps);
    }
}

/// One sequence's share of a step: its cache's layers and length, and its new tokens.
struct Part<'a> {
    layers: &'a mut [LayerCache],
    len: &'a mut usize,
    tokens: &'a [u32],
}

/// One sequence's rows in a step's attention.
struct Span<'a> {
    /// Its first row in the step.
    row: usize,
    /// Its rows.
    n: usize,
    /// The position of its first row.
    pos0: usize,
    cache: &'a LayerCache,
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

impl OutPtr {
    // A method (not field access) so closures capture the Sync wrapper, not the raw pointer.
    fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: shares write disjoint ranges (see `attention`), joined before the buffer is reused.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

#[derive(Clone, Copy)]
struct ScoresPtr(*mut Vec<f32>);

impl ScoresPtr {
    fn get(self) -> *mut Vec<f32> {
        self.0
    }
}
// SAFETY: each share touches only the buffer at its own index.
unsafe impl Send for ScoresPtr {}
// SAFETY: as above.
unsafe impl Sync for ScoresPtr {}

/// One layer's keys and values of the positions seen so far, per key/value head: keys in
/// blocks of [`ops::KBLOCK`] positions stored `[head_dim][KBLOCK]` (transposed, for the score
/// kernel), values as rows `[pos][head_dim]`.
#[derive(Debug, Default)]
struct LayerCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl LayerCache {
    /// Stores the keys and values of `n` tokens (rows of `n_kv_heads * hd`) at positions
    /// `pos0..pos0 + n`.
    fn append(&mut self, k: &[f32], v: &[f32], pos0: usize, hd: usize) {
        let n_kv = self.k.len();
        let n = if n_kv == 0 { 0 } else { k.len() / (n_kv * hd) };
        let block = hd * ops::KBLOCK;
        for h in 0..n_kv {
            let keys = &mut self.k[h];
            let needed = (pos0 + n).div_ceil(ops::KBLOCK) * block;
            if keys.len() < needed {
                // Grow by a quarter (amortised, at most 25% unused), in whole blocks.
                let target = needed
                    .max(keys.len() + keys.len() / 4)
                    .next_multiple_of(block);
                keys.reserve_exact(target - keys.len());
                keys.resize(target, 0.0);
            }
            let values = &mut self.v[h];
            values.truncate(pos0 * hd);
            let needed = (pos0 + n) * hd;
            if values.capacity() < needed {
                let target = needed.max(values.capacity() + values.capacity() / 4);
                values.reserve_exact(target - values.len());
            }
            for i in 0..n {
                let t = pos0 + i;
                let row = &k[(i * n_kv + h) * hd..(i * n_kv + h + 1) * hd];
                let base = (t / ops::KBLOCK) * block + t % ops::KBLOCK;
                for (d, &x) in row.iter().enumerate() {
                    keys[base + d * ops::KBLOCK] = x;
                }
                values.extend_from_slice(&v[(i * n_kv + h) * hd..(i * n_kv + h + 1) * hd]);
            }
        }
    }
}

/// Activation buffers, reused across steps.
#[derive(Debug, Default)]
struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// The local layers' rotary tables.
    cos_local: Vec<f32>,
    sin_local: Vec<f32>,
    /// Output of fused products.
    fused: Vec<f32>,
    /// Final-normed hidden states of the rows whose logits are wanted.
    normed: Vec<f32>,
    /// LM-head output of several rows.
    head: Vec<f32>,
    /// One attention score row per pool thread.
    scores: Vec<Vec<f32>>,
}

impl Scratch {
    fn resize(&mut self, n: usize, c: &LlmConfig) {
        let grow = |v: &mut Vec<f32>, len: usize| {
            if v.len() < len {
                v.resize(len, 0.0);
            }
        };
        grow(&mut self.x, n * c.d_model);
        grow(&mut self.h, n * c.d_model);
        grow(&mut self.o, n * c.d_model);
        grow(&mut self.q, n * c.q_dim());
        grow(&mut self.att, n * c.q_dim());
        grow(&mut self.k, n * c.kv_dim());
        grow(&mut self.v, n * c.kv_dim());
        grow(&mut self.g, n * c.d_ff);
        grow(&mut self.u, n * c.d_ff);
    }
}

/// The KV cache and scratch space of one sequence on the CPU path.
#[derive(Debug)]
pub(crate) struct HostCache {
    layers: Vec<LayerCache>,
    len: usize,
    scratch: Scratch,
}

impl HostCache {
    /// An empty cache for `model`.
    pub(crate) fn new(model: &HostModel) -> HostCache {
        let scratch = Scratch {
            scores: vec![Vec::new(); model.threads()],
            ..Scratch::default()
        };
        HostCache {
            layers: (0..model.config.n_layers)
                .map(|_| LayerCache {
                    k: vec![Vec::new(); model.config.n_kv_heads],
                    v: vec![Vec::new(); model.config.n_kv_heads],
                })
                .collect(),
            len: 0,
            scratch,
        }
    }

    /// Positions cached.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Forgets every position from `len` on (e.g. to reuse a shared prompt prefix). Key blocks
    /// keep their memory; stale lanes are overwritten by later positions.
    pub(crate) fn truncate(&mut self, len: usize, head_dim: usize) {
        if len < self.len {
            for l in &mut self.layers {
                for v in &mut l.v {
                    v.truncate(len * head_dim);
                }
            }
            self.len = len;
        }
    }

    /// A new cache holding a copy of the first `len` positions (at most [`len`](Self::len)).
    pub(crate) fn fork(&self, len: usize, head_dim: usize) -> HostCache {
        let len = len.min(self.len);
        let key_floats = len.div_ceil(ops::KBLOCK) * head_dim * ops::KBLOCK;
        let copy = |blocks: &Vec<f32>, floats: usize| blocks[..floats.min(blocks.len())].to_vec();
        HostCache {
            layers: self
                .layers
                .iter()
                .map(|l| LayerCache {
                    k: l.k.iter().map(|k| copy(k, key_floats)).collect(),
                    v: l.v.iter().map(|v| copy(v, len * head_dim)).collect(),
                })
                .collect(),
            len,
            scratch: Scratch::default(),
        }
    }

    /// Frees the scratch space (a cache kept for later reuse needs none until it runs again).
    pub(crate) fn release_scratch(&mut self) {
        self.scratch = Scratch::default();
    }

    /// Bytes held by the cached keys and values.
    pub(crate) fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| l.k.iter().chain(&l.v))
            .map(|b| b.capacity() * 4)
            .sum()
    }
}
