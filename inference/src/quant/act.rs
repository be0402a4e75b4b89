//! Activations quantized to 8 bits, the other operand of the integer dot products.
//!
//! [`BlockQ8`] (32 values) pairs with the Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 weights and [`BlockQ8K`]
//! (256 values) with the K-quants, as ggml's q8_0/q8_1 and q8_K do. Scales are kept in f32
//! (ggml stores q8_1's in f16), which makes the activation error a little smaller.
//!
//! Rounding is to nearest, ties to even, in both the scalar and the AVX2 code, so both produce
//! identical blocks.

/// 32 activations: `x[i] ≈ d * qs[i]`, `s = d * Σ qs` (for weights with a minimum).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct BlockQ8 {
    pub(crate) d: f32,
    pub(crate) s: f32,
    pub(crate) qs: [i8; 32],
}

/// 256 activations: `x[i] ≈ d * qs[i]`, `bsums[g] = Σ qs[16g..16g + 16]`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct BlockQ8K {
    pub(crate) d: f32,
    pub(crate) qs: [i8; 256],
    pub(crate) bsums: [i16; 16],
}

impl BlockQ8 {
    pub(crate) const ZERO: BlockQ8 = BlockQ8 {
        d: 0.0,
        s: 0.0,
        qs: [0; 32],
    };
}

impl BlockQ8K {
    pub(crate) const ZERO: BlockQ8K = BlockQ8K {
        d: 0.0,
        qs: [0; 256],
        bsums: [0; 16],
    };
}

/// Scale and inverse scale for a block whose largest magnitude is `amax`.
#[inline(always)]
fn scales(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    (d, id)
}

/// Quantizes `x` (a multiple of 32 long) into `out` (`x.len() / 32` blocks), scalar code.
pub(crate) fn quantize_q8_scalar(x: &[f32], out: &mut [BlockQ8]) {
    debug_assert_eq!(x.len(), out.len() * 32);
    for (xb, ob) in x.chunks_exact(32).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (d, id) = scales(amax);
        let mut sum = 0i32;
        for (q, &v) in ob.qs.iter_mut().zip(xb) {
            *q = (v * id).round_ties_even() as i8;
            sum += i32::from(*q);
        }
        ob.d = d;
        ob.s = d * sum as f32;
    }
}

/// Quantizes `x` (a multiple of 256 long) into `out` (`x.len() / 256` blocks), scalar code.
pub(crate) fn quantize_q8k_scalar(x: &[f32], out: &mut [BlockQ8K]) {
    debug_assert_eq!(x.len(), out.len() * 256);
    for (xb, ob) in x.chunks_exact(256).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (d, id) = scales(amax);
        for (q, &v) in ob.qs.iter_mut().zip(xb) {
            *q = (v * id).round_ties_even() as i8;
        }
        for (g, s) in ob.bsums.iter_mut().enumerate() {
            *s = ob.qs[16 * g..16 * g + 16]
                .iter()
                .map(|&q| i16::from(q))
                .sum();
        }
        ob.d = d;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::{BlockQ8, BlockQ8K, scales};

    /// Largest |x| of 32 floats starting at `p`.
    ///
    /// # Safety
    /// AVX2 must be available and `p..p + 32` readable.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn amax32(p: *const f32) -> f32 {
        // SAFETY: the caller guarantees 32 readable floats at `p` and AVX2.
        unsafe {
            let sign = _mm256_set1_ps(-0.0);
            let mut m = _mm256_setzero_ps();
            for k in 0..4 {
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(8 * k))));
            }
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let m1 = _mm_max_ss(m2, _mm_movehdup_ps(m2));
            _mm_cvtss_f32(m1)
        }
    }

    /// Quantizes 32 floats at `p` with inverse scale `id` into `q`; returns Σ q as i16 lanes.
    ///
    /// # Safety
    /// AVX2 must be available, `p..p + 32` readable and `q..q + 32` writable.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn quant32(p: *const f32, id: f32, q: *mut i8) -> __m256i {
        // SAFETY: the caller guarantees the ranges and AVX2.
        unsafe {
            let idv = _mm256_set1_ps(id);
            let mut v = [_mm256_setzero_si256(); 4];
            for (k, vk) in v.iter_mut().enumerate() {
                let x = _mm256_mul_ps(_mm256_loadu_ps(p.add(8 * k)), idv);
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
                *vk = _mm256_cvtps_epi32(r);
            }
            // Pack 32 x i32 -> 32 x i8 (saturating; values are within ±127 anyway), then undo
            // the lane interleaving of the pack instructions.
            let a = _mm256_packs_epi32(v[0], v[1]);
            let b = _mm256_packs_epi32(v[2], v[3]);
            let c = _mm256_packs_epi16(a, b);
            let c = _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(q as *mut __m256i, c);
            // Pairwise sums of the bytes, as i16 lanes.
            _mm256_maddubs_epi16(_mm256_set1_epi8(1), c)
        }
    }

    /// Horizontal sum of 16 i16 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum_i16(v: __m256i) -> i32 {
        let s = _mm256_madd_epi16(v, _mm256_set1_epi16(1));
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
        let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1));
        _mm_cvtsi128_si32(s1)
    }

    /// AVX2 version of [`super::quantize_q8_scalar`] (identical output).
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
        assert_eq!(x.len(), out.len() * 32);
        for (xb, ob) in x.chunks_exact(32).zip(out.iter_mut()) {
            // SAFETY: `xb` has 32 floats and `ob.qs` 32 bytes; AVX2 is guaranteed by the caller.
            unsafe {
                let (d, id) = scales(amax32(xb.as_ptr()));
                let sums = quant32(xb.as_ptr(), id, ob.qs.as_mut_ptr());
                ob.d = d;
                ob.s = d * hsum_i16(sums) as f32;
            }
        }
    }

    /// AVX2 version of [`super::quantize_q8k_scalar`] (identical output).
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn quantize_q8k(x: &[f32], out: &mut [BlockQ8K]) {
        assert_eq!(x.len(), out.len() * 256);
        for (xb, ob) in x.chunks_exact(256).zip(out.iter_mut()) {
            // SAFETY: `xb` has 256 floats, `ob.qs` 256 bytes; AVX2 is guaranteed by the caller.
            unsafe {
                let mut m = 0f32;
                for k in 0..8 {
                    m = m.max(amax32(xb.as_ptr().add(32 * k)));
                }
                let (d, id) = scales(m);
                for k in 0..8 {
                    let sums = quant32(xb.as_ptr().add(32 * k), id, ob.qs.as_mut_ptr().add(32 * k));
                    // The low 128-bit half holds the pair sums of bytes 0..16, the high half
                    // those of bytes 16..32: one bsum each.
                    let s = _mm256_madd_epi16(sums, _mm256_set1_epi16(1));
                    let lo = _mm256_castsi256_si128(s);
                    let hi = _mm256_extracti128_si256(s, 1);
                    let lo2 = _mm_add_epi32(lo, _mm_unpackhi_epi64(lo, lo));
                    let hi2 = _mm_add_epi32(hi, _mm_unpackhi_epi64(hi, hi));
                    let l = _mm_cvtsi128_si32(_mm_add_epi32(lo2, _mm_shuffle_epi32(lo2, 1)));
                    let h = _mm_cvtsi128_si32(_mm_add_epi32(hi2, _mm_shuffle_epi32(hi2, 1)));
                    ob.bsums[2 * k] = l as i16;
                    ob.bsums[2 * k + 1] = h as i16;
                }
                ob.d = d;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let v = (s >> 8) as f32 / (1 << 24) as f32 - 0.5;
                // Some exact ties and zeros too.
                match i % 17 {
                    0 => 0.0,
                    1 => 0.5,
                    _ => v * 3.0,
                }
            })
            .collect()
    }

    #[test]
    fn q8_round_trip_error_is_small() {
        let x = data(256, 1);
        let mut q = vec![BlockQ8::ZERO; 8];
        quantize_q8_scalar(&x, &mut q);
        for (xb, b) in x.chunks(32).zip(&q) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let sum: i32 = b.qs.iter().map(|&v| i32::from(v)).sum();
            assert!((b.s - b.d * sum as f32).abs() <= 1e-6);
            for (v, &qi) in xb.iter().zip(&b.qs) {
                assert!((v - b.d * f32::from(qi)).abs() <= amax / 254.0 * 1.001);
            }
        }
        let mut k = vec![BlockQ8K::ZERO; 1];
        quantize_q8k_scalar(&x, &mut k);
        for g in 0..16 {
            let s: i16 = k[0].qs[16 * g..16 * g + 16]
                .iter()
                .map(|&v| i16::from(v))
                .sum();
            assert_eq!(k[0].bsums[g], s);
        }
    }

    #[test]
    fn zeros_quantize_to_zero() {
        let x = vec![0f32; 256];
        let mut q = vec![BlockQ8::ZERO; 8];
        quantize_q8_scalar(&x, &mut q);
        assert!(q.iter().all(|b| b.d == 0.0 && b.qs == [0; 32]));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_matches_scalar_exactly() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        for seed in 0..20 {
            let x = data(512, seed);
            let (mut a, mut b) = (vec![BlockQ8::ZERO; 16], vec![BlockQ8::ZERO; 16]);
            quantize_q8_scalar(&x, &mut a);
            // SAFETY: AVX2 and FMA were detected above.
            unsafe { avx2::quantize_q8(&x, &mut b) };
            assert_eq!(a, b);
            let (mut a, mut b) = (vec![BlockQ8K::ZERO; 2], vec![BlockQ8K::ZERO; 2]);
            quantize_q8k_scalar(&x, &mut a);
            // SAFETY: as above.
            unsafe { avx2::quantize_q8k(&x, &mut b) };
            assert_eq!(a, b);
        }
    }
}
