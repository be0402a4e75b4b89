//! Small vector kernels of the CPU path (attention, norms, activations) on plain slices.
//!
//! Each kernel is written once in a form LLVM vectorises (fixed-width lanes with independent
//! accumulators) and compiled twice: for the baseline target and, on x86-64 machines that have
//! them, with AVX2 and FMA enabled (chosen at run time; the check is a cached atomic load).

/// Lanes per accumulator block: one AVX register of f32.
const LANES: usize = 8;

#[cfg(target_arch = "x86_64")]
#[inline]
fn has_avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

#[inline(always)]
fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

#[inline(always)]
fn dot_generic<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [[0.0f32; LANES]; 4];
    let mut ca = a.chunks_exact(4 * LANES);
    let mut cb = b.chunks_exact(4 * LANES);
    for (xa, xb) in (&mut ca).zip(&mut cb) {
        for k in 0..4 {
            for l in 0..LANES {
                acc[k][l] = fmadd::<FMA>(xa[k * LANES + l], xb[k * LANES + l], acc[k][l]);
            }
        }
    }
    let mut sum = 0.0f32;
    for (&x, &y) in ca.remainder().iter().zip(cb.remainder()) {
        sum = fmadd::<FMA>(x, y, sum);
    }
    let mut lanes = [0.0f32; LANES];
    for l in 0..LANES {
        lanes[l] = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
    }
    lanes.iter().sum::<f32>() + sum
}

/// Fast `exp` for f32 (relative error about 2e-7), written so that it vectorises:
/// `e^x = 2^n · e^r` with `n = round(x / ln 2)`, `r = x - n ln 2` split in two parts
/// (Cody–Waite, so `r` is exact) and a degree-6 polynomial for `e^r` on `|r| <= 0.35`.
#[inline(always)]
fn exp_fast(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 · 2²³: adding it rounds to an integer (to nearest, ties to even) held in the low
    // mantissa bits, with no float-to-int conversion (whose saturating Rust form does not
    // vectorise).
    const SHIFT: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    let t = x * std::f32::consts::LOG2_E + SHIFT;
    let n = t - SHIFT;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // n + 127 in the exponent field: t's bits are SHIFT's (0x4B40_0000) plus n.
    let bits = t.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127) << 23;
    p * f32::from_bits(bits)
}

#[inline(always)]
fn silu_mul_generic<const FMA: bool>(g: &mut [f32], u: &[f32]) {
    for (g, &u) in g.iter_mut().zip(u) {
        let x = *g;
        *g = x / (1.0 + exp_fast(-x)) * u;
    }
}

/// `erf` with absolute error below 1.5e-7 (Abramowitz & Stegun 7.1.26), vectorisable.
#[inline(always)]
fn erf_fast(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let p = 1.061_405_4_f32;
    let p = p * t - 1.453_152_1;
    let p = p * t + 1.421_413_8;
    let p = p * t - 0.284_496_74;
    let p = p * t + 0.254_829_6;
    let y = 1.0 - p * t * exp_fast(-a * a);
    if x < 0.0 { -y } else { y }
}

#[inline(always)]
fn gelu_generic<const FMA: bool>(x: &mut [f32]) {
    for v in x.iter_mut() {
        let a = *v;
        *v = 0.5 * a * (1.0 + erf_fast(a * std::f32::consts::FRAC_1_SQRT_2));
    }
}

#[inline(always)]
fn rmsnorm_generic<const FMA: bool>(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let ss = dot_generic::<FMA>(x, x);
    let scale = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for ((o, &x), &w) in out.iter_mut().zip(x).zip(w) {
        *o = x * scale * w;
    }
}

/// Positions per key block of the attention cache: keys are stored transposed in blocks of
/// `[head_dim][KBLOCK]`, so the scores of a block are `KBLOCK` lanes of FMAs with no horizontal
/// sums.
pub(crate) const KBLOCK: usize = 64;

#[inline(always)]
fn scores_block_generic<const FMA: bool>(q: &[f32], kb: &[f32], out: &mut [f32]) {
    let mut acc = [0.0f32; KBLOCK];
    for (d, &qd) in q.iter().enumerate() {
        let row: &[f32; KBLOCK] = match kb.get(d * KBLOCK..(d + 1) * KBLOCK) {
            Some(r) => r.try_into().unwrap_or(&[0.0; KBLOCK]),
            None => return,
        };
        for j in 0..KBLOCK {
            acc[j] = fmadd::<FMA>(qd, row[j], acc[j]);
        }
    }
    let n = out.len().min(KBLOCK);
    out[..n].copy_from_slice(&acc[..n]);
}

/// [`weighted_sum_generic`] on the lanes `from..` of `out` in chunks of `W` (`W` accumulators,
/// which LLVM keeps in registers); returns where the whole chunks end.
#[inline(always)]
fn weighted_chunks<const FMA: bool, const W: usize>(
    p: &[f32],
    v: &[f32],
    stride: usize,
    from: usize,
    out: &mut [f32],
) -> usize {
    let end = from + (out.len() - from) / W * W;
    for c in (from..end).step_by(W) {
        let mut acc = [0.0f32; W];
        for (t, &pt) in p.iter().enumerate() {
            let row: &[f32; W] = match v.get(t * stride + c..t * stride + c + W) {
                Some(r) => r.try_into().unwrap_or(&[0.0; W]),
                None => break,
            };
            for j in 0..W {
                acc[j] = fmadd::<FMA>(pt, row[j], acc[j]);
            }
        }
        out[c..c + W].copy_from_slice(&acc);
    }
    end
}

#[inline(always)]
fn weighted_sum_generic<const FMA: bool>(p: &[f32], v: &[f32], stride: usize, out: &mut [f32]) {
    let hd = out.len();
    // 64 lanes at a time, then heads narrower than that (MiniLM's 32) in 16-lane chunks, then
    // any last few lanes.
    let full = weighted_chunks::<FMA, 64>(p, v, stride, 0, out);
    let mid = weighted_chunks::<FMA, 16>(p, v, stride, full, out);
    if mid < hd {
        let rest = &mut out[mid..];
        rest.fill(0.0);
        for (t, &pt) in p.iter().enumerate() {
            let row = &v[t * stride + mid..t * stride + hd];
            for (o, &x) in rest.iter_mut().zip(row) {
                *o = fmadd::<FMA>(pt, x, *o);
            }
        }
    }
}

/// Sum of `x` in lane-wise partial sums (a plain fold is one long dependency chain).
#[inline(always)]
fn sum_generic(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 2 * LANES];
    let mut chunks = x.chunks_exact(2 * LANES);
    for c in &mut chunks {
        for l in 0..2 * LANES {
            lanes[l] += c[l];
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[inline(always)]
fn layer_norm_generic<const FMA: bool>(x: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    let n = x.len() as f32;
    let mean = sum_generic(x) / n;
    let mut lanes = [0.0f32; 2 * LANES];
    let mut chunks = x.chunks_exact(2 * LANES);
    for c in &mut chunks {
        for l in 0..2 * LANES {
            let d = c[l] - mean;
            lanes[l] = fmadd::<FMA>(d, d, lanes[l]);
        }
    }
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|&v| (v - mean) * (v - mean))
        .sum();
    let var = (lanes.iter().sum::<f32>() + tail) / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((x, &w), &b) in x.iter_mut().zip(w).zip(b) {
        *x = fmadd::<FMA>((*x - mean) * inv, w, b);
    }
}

#[inline(always)]
fn softmax_scaled_generic<const FMA: bool>(x: &mut [f32], scale: f32) {
    // Lane-wise reductions so that LLVM vectorises them (a plain fold is sequential).
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            lanes[l] = if c[l] > lanes[l] { c[l] } else { lanes[l] };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        x.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    let mut sums = [0.0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp_fast((c[l] - max) * scale);
            sums[l] += c[l];
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp_fast((*v - max) * scale);
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn gelu(x: &mut [f32]) {
        super::gelu_generic::<true>(x)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn silu_mul(g: &mut [f32], u: &[f32]) {
        super::silu_mul_generic::<true>(g, u)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn scores_block(q: &[f32], kb: &[f32], out: &mut [f32]) {
        super::scores_block_generic::<true>(q, kb, out)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn weighted_sum(p: &[f32], v: &[f32], stride: usize, out: &mut [f32]) {
        super::weighted_sum_generic::<true>(p, v, stride, out)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn softmax_scaled(x: &mut [f32], scale: f32) {
        super::softmax_scaled_generic::<true>(x, scale)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn layer_norm(x: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
        super::layer_norm_generic::<true>(x, w, b, eps)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
        super::rmsnorm_generic::<true>(out, x, w, eps)
    }
}

/// The embedder's element-wise kernels again with AVX-512 (16 lanes a register).
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    /// Exact GELU, as [`super::gelu_generic`] computes it, a register at a time: the erf's
    /// reciprocal by `vrcp14ps` and one Newton step (a division would cost more than the rest),
    /// the exponential by [`exp`].
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) fn gelu(x: &mut [f32]) {
        #[inline]
        #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
        fn gelu16(v: __m512) -> __m512 {
            let z = _mm512_mul_ps(v, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
            let a = _mm512_abs_ps(z);
            let den = _mm512_fmadd_ps(a, _mm512_set1_ps(0.327_591_1), _mm512_set1_ps(1.0));
            let t0 = _mm512_rcp14_ps(den);
            let t = _mm512_mul_ps(t0, _mm512_fnmadd_ps(den, t0, _mm512_set1_ps(2.0)));
            let mut p = _mm512_set1_ps(1.061_405_4);
            for c in [-1.453_152_1, 1.421_413_8, -0.284_496_74, 0.254_829_6] {
                p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c));
            }
            let e = exp(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), a), a));
            let y = _mm512_fnmadd_ps(_mm512_mul_ps(p, t), e, _mm512_set1_ps(1.0));
            // erf takes z's sign (y >= 0).
            let sign = _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32(i32::MIN));
            let erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y), sign));
            let half = _mm512_mul_ps(v, _mm512_set1_ps(0.5));
            _mm512_fmadd_ps(half, erf, half)
        }
        let mut chunks = x.chunks_exact_mut(16);
        for c in &mut chunks {
            // SAFETY: c holds 16 floats.
            unsafe { _mm512_storeu_ps(c.as_mut_ptr(), gelu16(_mm512_loadu_ps(c.as_ptr()))) };
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mask: __mmask16 = (1 << rest.len()) - 1;
            // SAFETY: the mask covers the rest.len() < 16 floats of `rest`.
            unsafe {
                let v = _mm512_maskz_loadu_ps(mask, rest.as_ptr());
                _mm512_mask_storeu_ps(rest.as_mut_ptr(), mask, gelu16(v));
            }
        }
    }

    /// `e^x` of each lane (relative error about 2e-7), as [`super::exp_fast`]: `2^n · e^r` with
    /// `n = round(x / ln 2)`, a degree-6 polynomial for `e^r`, and `vscalefps` for `2^n`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn exp(x: __m512) -> __m512 {
        const LN2_HI: f32 = 0.693_145_75;
        const LN2_LO: f32 = 1.428_606_8e-6;
        let x = _mm512_max_ps(x, _mm512_set1_ps(-87.3));
        let x = _mm512_min_ps(x, _mm512_set1_ps(88.0));
        let n =
            _mm512_roundscale_ps::<0>(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) fn layer_norm(x: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
        super::layer_norm_generic::<true>(x, w, b, eps)
    }
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) fn add(x: &mut [f32], y: &[f32]) {
        super::add_generic(x, y)
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn has_avx512() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512vl")
        && has_avx2_fma()
}

/// `g = silu(g) · u` (the SwiGLU gate).
#[inline]
pub(crate) fn silu_mul(g: &mut [f32], u: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        return unsafe { avx2::silu_mul(g, u) };
    }
    silu_mul_generic::<false>(g, u)
}

/// `g = gelu(g) · u`, GELU in its tanh approximation
/// `0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))` (the gated feed-forward block of Gemma, as
/// llama.cpp computes it).
pub(crate) fn gelu_tanh_mul(g: &mut [f32], u: &[f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for (g, &u) in g.iter_mut().zip(u) {
        let x = *g;
        let inner = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
        *g = 0.5 * x * (1.0 + inner.tanh()) * u;
    }
}

/// Exact GELU in place: `x · Φ(x)` with a vectorised erf.
#[inline]
pub(crate) fn gelu(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU supports AVX-512 F and VL, AVX2 and FMA (checked above).
        return unsafe { avx512::gelu(x) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        return unsafe { avx2::gelu(x) };
    }
    gelu_generic::<false>(x)
}

/// `out = x / rms(x) · w`.
#[inline]
pub(crate) fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        return unsafe { avx2::rmsnorm(out, x, w, eps) };
    }
    rmsnorm_generic::<false>(out, x, w, eps)
}

/// LayerNorm in place: `x = (x - mean) / sqrt(var + eps) · w + b`.
#[inline]
pub(crate) fn layer_norm(x: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU supports AVX-512 F and VL, AVX2 and FMA (checked above).
        return unsafe { avx512::layer_norm(x, w, b, eps) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        return unsafe { avx2::layer_norm(x, w, b, eps) };
    }
    layer_norm_generic::<false>(x, w, b, eps)
}

/// Attention scores of one query against one key block (`[head_dim][KBLOCK]`): `out[j] =
/// q · k_j` for the first `out.len()` (at most `KBLOCK`) positions of the block.
#[inline]
pub(crate) fn scores_block(q: &[f32], kb: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        return unsafe { avx2::scores_block(q, kb, out) };
    }
    scores_block_generic::<false>(q, kb, out)
}

/// `out = Σ_t p[t] · v[t·stride ..][..out.len()]`: the attention-weighted sum of value rows.
#[inline]
pub(crate) fn weighted_sum(p: &[f32], v: &[f32], stride: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        return unsafe { avx2::weighted_sum(p, v, stride, out) };
    }
    weighted_sum_generic::<false>(p, v, stride, out)
}

/// In-place `softmax(x · scale)` (`scale > 0`); an all `-inf` row becomes all zeros.
#[inline]
pub(crate) fn softmax_scaled(x: &mut [f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        return unsafe { avx2::softmax_scaled(x, scale) };
    }
    softmax_scaled_generic::<false>(x, scale)
}

#[inline(always)]
fn add_generic(x: &mut [f32], y: &[f32]) {
    for (x, &y) in x.iter_mut().zip(y) {
        *x += y;
    }
}

/// `x += y`.
#[inline]
pub(crate) fn add(x: &mut [f32], y: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU supports AVX-512 F and VL, AVX2 and FMA (checked above).
        return unsafe { avx512::add(x, y) };
    }
    add_generic(x, y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_scalar() {
        let a: Vec<f32> = (0..77).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..77).map(|i| (i as f32 * 0.11).cos()).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot_generic::<false>(&a, &b) - want).abs() < 1e-4);
        assert!((dot_generic::<true>(&a, &b) - want).abs() < 1e-4);
    }

    #[test]
    fn attention_kernels_match_naive() {
        let hd = 80; // one full 64-lane chunk and a remainder
        let q: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.3).sin()).collect();
        let keys: Vec<Vec<f32>> = (0..KBLOCK)
            .map(|t| (0..hd).map(|d| ((t * 7 + d) as f32 * 0.01).cos()).collect())
            .collect();
        let mut block = vec![0.0f32; hd * KBLOCK];
        for (t, k) in keys.iter().enumerate() {
            for d in 0..hd {
                block[d * KBLOCK + t] = k[d];
            }
        }
        let mut scores = vec![0.0f32; 10];
        scores_block(&q, &block, &mut scores);
        for t in 0..10 {
            let want: f32 = q.iter().zip(&keys[t]).map(|(a, b)| a * b).sum();
            assert!(
                (scores[t] - want).abs() < 1e-4,
                "{t}: {} vs {want}",
                scores[t]
            );
        }
        // Widths with and without 64-lane chunks, 16-lane chunks and a last few lanes.
        for hd in [80, 32, 64, 85, 5] {
            let stride = hd + 3;
            let v: Vec<f32> = (0..10 * stride).map(|i| (i as f32 * 0.05).sin()).collect();
            let p: Vec<f32> = (0..10).map(|t| t as f32 / 45.0).collect();
            let mut out = vec![7.0f32; hd];
            weighted_sum(&p, &v, stride, &mut out);
            for d in 0..hd {
                let want: f32 = (0..10).map(|t| p[t] * v[t * stride + d]).sum();
                assert!((out[d] - want).abs() < 1e-5, "width {hd}, lane {d}");
            }
        }
        let mut x = vec![1.0f32, 3.0];
        softmax_scaled(&mut x, 0.5);
        let e = (1.0f32).exp();
        assert!((x[1] - e / (1.0 + e)).abs() < 1e-6);
    }

    #[test]
    fn gelu_matches_erf_definition() {
        // erf by its Taylor series (converges fast for |x| <= 3), then the tail ~ 1.
        fn erf_ref(x: f64) -> f64 {
            if x.abs() > 4.0 {
                return x.signum();
            }
            let mut sum = 0.0;
            let mut term = x;
            let mut n = 0;
            while n < 200 {
                sum += term / (2 * n + 1) as f64;
                n += 1;
                term *= -x * x / n as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        }
        let xs: Vec<f32> = (-80..=80).map(|i| i as f32 * 0.1).collect();
        let mut ys = xs.clone();
        gelu(&mut ys);
        for (x, y) in xs.iter().zip(&ys) {
            let x64 = f64::from(*x);
            let want = 0.5 * x64 * (1.0 + erf_ref(x64 / std::f64::consts::SQRT_2));
            assert!(
                (f64::from(*y) - want).abs() < 2e-6,
                "gelu({x}) = {y}, want {want}"
            );
        }
    }

    #[test]
    fn layer_norm_matches_its_definition() {
        for n in [384, 37, 3] {
            let x: Vec<f32> = (0..n)
                .map(|i| (i as f32 * 0.37).sin() * 4.0 + 1.5)
                .collect();
            let w: Vec<f32> = (0..n).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
            let b: Vec<f32> = (0..n).map(|i| (i % 5) as f32 * 0.01 - 0.02).collect();
            let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
            let var = x
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / n as f64;
            let mut y = x.clone();
            layer_norm(&mut y, &w, &b, 1e-12);
            for i in 0..n {
                let want = (f64::from(x[i]) - mean) / (var + 1e-12).sqrt() * f64::from(w[i])
                    + f64::from(b[i]);
                assert!(
                    (f64::from(y[i]) - want).abs() < 1e-5,
                    "{n}/{i}: {} vs {want}",
                    y[i]
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_exp_is_accurate() {
        use std::arch::x86_64::*;
        if !has_avx512() {
            return;
        }
        let xs: Vec<f32> = (0..11_680).map(|i| -80.0 + i as f32 * 0.0137).collect();
        let mut worst = 0.0f32;
        for c in xs.chunks_exact(16) {
            let mut got = [0.0f32; 16];
            // SAFETY: AVX-512 F is present (checked above); both hold 16 floats.
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), avx512::exp(_mm512_loadu_ps(c.as_ptr()))) };
            for (&x, &y) in c.iter().zip(&got) {
                worst = worst.max(((y - x.exp()) / x.exp()).abs());
            }
        }
        assert!(worst < 1e-6, "{worst}");
    }

    #[test]
    fn exp_fast_is_accurate() {
        let mut worst = 0.0f32;
        let mut x = -80.0f32;
        while x < 80.0 {
            let rel = ((exp_fast(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 1e-6, "{worst}");
        assert_eq!(exp_fast(-200.0), exp_fast(-87.3));
    }

    #[test]
    fn softmax_rmsnorm_silu() {
        let raw: Vec<f32> = (0..21).map(|i| (i as f32 * 0.7).sin() * 3.0).collect();
        let mut x = raw.clone();
        softmax_scaled(&mut x, 1.0);
        let e: Vec<f32> = raw.iter().map(|v| v.exp()).collect();
        let s: f32 = e.iter().sum();
        for i in 0..raw.len() {
            assert!((x[i] - e[i] / s).abs() < 1e-6);
        }
        let mut masked = vec![f32::NEG_INFINITY; 11];
        softmax_scaled(&mut masked, 1.0);
        assert_eq!(masked, vec![0.0; 11]);

        let x = [3.0f32, -4.0];
        let mut out = [0.0f32; 2];
        rmsnorm(&mut out, &x, &[1.0, 2.0], 0.0);
        let rms = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / rms).abs() < 1e-6 && (out[1] + 8.0 / rms).abs() < 1e-6);

        let mut g = [1.0f32, -2.0];
        silu_mul(&mut g, &[2.0, 1.0]);
        let silu = |v: f32| v / (1.0 + (-v).exp());
        assert!((g[0] - 2.0 * silu(1.0)).abs() < 1e-6);
        assert!((g[1] - silu(-2.0)).abs() < 1e-6);
    }
}
