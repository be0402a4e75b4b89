//! AVX2 + FMA + F16C dot products of one weight row with `T` activation rows.
//!
//! Same arithmetic as [`super::scalar`]: weights are expanded to bytes, multiplied with the
//! 8-bit activations by `vpmaddubsw` (unsigned × signed → pairs of i16), widened by `vpmaddwd`,
//! scaled per block in f32. The weight block is decoded once and used for all `T` tokens.
//!
//! Every function here is `unsafe` because it needs the CPU features (checked once by the
//! caller through [`super::Isa::detect`]); the memory accesses are bounds-checked at entry.

use std::arch::x86_64::*;
use std::array;

use super::act::{BlockQ8, BlockQ8K};
use super::scalar;

/// Sum of the 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum_ps(v: __m256) -> f32 {
    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
    _mm_cvtss_f32(s1)
}

/// Sum of the 8 i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum_epi32(v: __m256i) -> i32 {
    let s4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
    let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1));
    _mm_cvtsi128_si32(s1)
}

/// Lane 1 of `v`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn lane1(v: __m128) -> f32 {
    _mm_cvtss_f32(_mm_movehdup_ps(v))
}

/// 16 bytes of nibbles at `p` -> 32 bytes: low nibbles first, then high nibbles.
///
/// # Safety
/// `p..p + 16` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles32(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes.
    let v = unsafe { _mm_loadu_si128(p as *const __m128i) };
    let both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// The 32 bits of the little-endian u32 at `p` -> 32 bytes, 0x10 where the bit is set.
///
/// # Safety
/// `p..p + 4` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bits32_x16(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 4 readable bytes; unaligned read.
    let x = unsafe { (p as *const u32).read_unaligned() };
    let shuf = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    // Byte j gets byte j / 8 of x; OR-ing every bit but bit j % 8 leaves 0xFF iff it was set.
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
    let set = _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// Σ pairs of u8 × i8 -> 8 × i32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_u8i8(a: __m256i, b: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
}

/// [`dot_u8i8`] in one `vpdpbusd`. The same result whenever no pair of products overflows
/// i16 in `vpmaddubsw` (which saturates): true of every use here, where `a ≤ 128` and
/// `|b| ≤ 127`, so a pair is at most 32 512 in magnitude.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
fn dot_u8i8_vnni(a: __m256i, b: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
}

/// [`dot_u8i8`], or [`dot_u8i8_vnni`] when `V`.
///
/// # Safety
/// When `V`, the CPU must support AVX-512 VNNI and VL. (Callers are compiled with those
/// features for `V`, so this inlines to the one instruction.)
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_u8i8_as<const V: bool>(a: __m256i, b: __m256i) -> __m256i {
    if V {
        // SAFETY: the caller guarantees the features when V.
        unsafe { dot_u8i8_vnni(a, b) }
    } else {
        dot_u8i8(a, b)
    }
}

/// `acc + Σ` of each lane's four u8 × i8 products: one `vpdpbusd` when `V`, else
/// `vpmaddubsw` + `vpmaddwd` + add (the same result while no pair of products reaches the
/// 16-bit saturation, as for [`dot_u8i8_vnni`]).
///
/// # Safety
/// When `V`, the CPU must support AVX-512 VNNI and VL.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn acc_u8i8<const V: bool>(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    if V {
        // SAFETY: the caller guarantees the features when V.
        unsafe { dpbusd(acc, a, b) }
    } else {
        _mm256_add_epi32(acc, dot_u8i8(a, b))
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
fn dpbusd(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, a, b)
}

/// Loads the f16 at `p` into all four lanes as f32.
///
/// # Safety
/// `p..p + 2` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16x4(p: *const u8) -> __m128 {
    // SAFETY: the caller guarantees 2 readable bytes; unaligned read.
    let h = unsafe { (p as *const i16).read_unaligned() };
    _mm_cvtph_ps(_mm_set1_epi16(h))
}

/// Loads the f16 pair at `p` as `[p0, p1, 0, 0]` in f32.
///
/// # Safety
/// `p..p + 4` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16x2(p: *const u8) -> __m128 {
    // SAFETY: the caller guarantees 4 readable bytes; unaligned read.
    let h = unsafe { (p as *const i32).read_unaligned() };
    _mm_cvtph_ps(_mm_cvtsi32_si128(h))
}

/// `[d, s, 0, 0]` of an activation block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn act_ds(b: &BlockQ8) -> __m128 {
    _mm_setr_ps(b.d, b.s, 0.0, 0.0)
}

/// The 32 activation quants of a block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn act_qs(b: &BlockQ8) -> __m256i {
    // SAFETY: `qs` is 32 readable bytes; unaligned load.
    unsafe { _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i) }
}

/// Adds block `i` of a row of 32-element blocks (at `b`) times the `T` activation blocks
/// `x[k][i]` to `acc` (integer part, scaled) and `acc_s` (lane 1: the activation-sum term).
///
/// # Safety
/// AVX2/FMA/F16C; `b` points to a whole block of kind `KIND`; `i < x[k].len()` for all `k`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block32_step<const KIND: u8, const T: usize, const V: bool>(
    b: *const u8,
    x: &[&[BlockQ8]; T],
    i: usize,
    acc: &mut [__m256; T],
    acc_s: &mut [__m128; T],
) {
    // Decode the block: q (bytes, unsigned except Q8_0) and the scale pair [d, m or d].
    // SAFETY (all reads): offsets stay inside the block, which the caller guarantees.
    let (q, dm) = unsafe {
        match KIND {
            scalar::Q4_0 => (nibbles32(b.add(2)), f16x4(b)),
            scalar::Q4_1 => (nibbles32(b.add(4)), f16x2(b)),
            scalar::Q5_0 => (
                _mm256_or_si256(nibbles32(b.add(6)), bits32_x16(b.add(2))),
                f16x4(b),
            ),
            scalar::Q5_1 => (
                _mm256_or_si256(nibbles32(b.add(8)), bits32_x16(b.add(4))),
                f16x2(b),
            ),
            _ => (_mm256_loadu_si256(b.add(2) as *const __m256i), f16x4(b)),
        }
    };
    for k in 0..T {
        // SAFETY: i < x[k].len(), guaranteed by the caller.
        let xb = unsafe { x[k].get_unchecked(i) };
        let qx = act_qs(xb);
        let p = if KIND == scalar::Q8_0 {
            // Signed × signed: move the sign of the weight onto the activation.
            // SAFETY (both): V only when the caller has the features.
            unsafe { dot_u8i8_as::<V>(_mm256_sign_epi8(q, q), _mm256_sign_epi8(qx, q)) }
        } else {
            unsafe { dot_u8i8_as::<V>(q, qx) }
        };
        // [d dx, d s] or [d dx, m s].
        let ds = _mm_mul_ps(dm, act_ds(xb));
        acc[k] = _mm256_fmadd_ps(_mm256_broadcastss_ps(ds), _mm256_cvtepi32_ps(p), acc[k]);
        if KIND != scalar::Q8_0 {
            acc_s[k] = _mm_add_ps(acc_s[k], ds);
        }
    }
}

/// Dot products of a row of 32-element blocks with `T` activation rows (AVX2 version of
/// [`scalar::dot_block32`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C, and AVX-512 VNNI and VL when `V`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_block32<const KIND: u8, const T: usize, const V: bool>(
    w: &[u8],
    x: [&[BlockQ8]; T],
) -> [f32; T] {
    let size = scalar::block32_size(KIND);
    let nb = w.len() / size;
    for xr in &x {
        assert!(xr.len() >= nb, "activation row shorter than the weight row");
    }
    // One accumulator per token, whatever T: a token's result then does not depend on how
    // many tokens are multiplied together (decode and prefill agree bit for bit).
    let mut acc = [_mm256_setzero_ps(); T];
    let mut acc_s = [_mm_setzero_ps(); T];
    let p = w.as_ptr();
    for i in 0..nb {
        // SAFETY: block i spans w[i * size..(i + 1) * size], inside `w` since i < nb, and
        // i < nb <= x[k].len() (checked above).
        unsafe { block32_step::<KIND, T, V>(p.add(i * size), &x, i, &mut acc, &mut acc_s) };
    }
    array::from_fn(|k| {
        let main = hsum_ps(acc[k]);
        let s = lane1(acc_s[k]);
        match KIND {
            scalar::Q4_0 => main - 8.0 * s,
            scalar::Q5_0 => main - 16.0 * s,
            scalar::Q4_1 | scalar::Q5_1 => main + s,
            _ => main,
        }
    })
}

/// `Σ_g m[g] * bsums[g]` for the eight 32-element sub-blocks of Q4_K/Q5_K (mins in `m8`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mins_dot(m8: __m128i, xb: &BlockQ8K) -> i32 {
    // SAFETY: `bsums` is 16 i16 = 32 readable bytes.
    let bs = unsafe { _mm256_loadu_si256(xb.bsums.as_ptr() as *const __m256i) };
    // Pairwise sums -> one i16 per 32-element sub-block.
    let pairs = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
    let prod = _mm_madd_epi16(m8, pairs);
    let s2 = _mm_add_epi32(prod, _mm_unpackhi_epi64(prod, prod));
    _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1)))
}

/// Q4_K and Q5_K rows (`HIGH` = Q5_K) with `T` activation rows.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q45k<const HIGH: bool, const T: usize>(
    w: &[u8],
    x: [&[BlockQ8K]; T],
) -> [f32; T] {
    let size = if HIGH { 176 } else { 144 };
    let qs_at = if HIGH { 48 } else { 16 };
    let nb = w.len() / size;
    for xr in &x {
        assert!(xr.len() >= nb, "activation row shorter than the weight row");
    }
    let m4 = _mm256_set1_epi8(0x0F);
    let m1 = _mm256_set1_epi8(0x01);
    let mut acc = [_mm256_setzero_ps(); T];
    let mut acc_m = [0f32; T];
    for i in 0..nb {
        let b = &w[i * size..(i + 1) * size];
        let d = crate::gguf::f16_at(b, 0);
        let dmin = crate::gguf::f16_at(b, 2);
        let mut sc = [0i16; 8];
        let mut mn = [0i16; 8];
        for s in 0..8 {
            let (a, m) = crate::gguf::scale_min_k4(s, &b[4..16]);
            sc[s] = i16::from(a);
            mn[s] = i16::from(m);
        }
        // SAFETY: `mn` is 8 i16 = 16 readable bytes.
        let m8 = unsafe { _mm_loadu_si128(mn.as_ptr() as *const __m128i) };
        // SAFETY: qh (32 bytes at 16) lies inside the block for Q5_K; unused for Q4_K.
        let mut hbits = if HIGH {
            unsafe { _mm256_loadu_si256(b.as_ptr().add(16) as *const __m256i) }
        } else {
            _mm256_setzero_si256()
        };
        let mut sumi = [_mm256_setzero_si256(); T];
        for j in 0..4 {
            // SAFETY: qs[32 j..32 j + 32] lies inside the block.
            let raw =
                unsafe { _mm256_loadu_si256(b.as_ptr().add(qs_at + 32 * j) as *const __m256i) };
            let mut lo = _mm256_and_si256(raw, m4);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            if HIGH {
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(hbits, m1), 4));
                hbits = _mm256_srli_epi16(hbits, 1);
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(hbits, m1), 4));
                hbits = _mm256_srli_epi16(hbits, 1);
            }
            let sc_lo = _mm256_set1_epi16(sc[2 * j]);
            let sc_hi = _mm256_set1_epi16(sc[2 * j + 1]);
            for k in 0..T {
                // SAFETY: i < nb <= x[k].len(), checked at entry; qs has 256 bytes.
                let xb = unsafe { x[k].get_unchecked(i) };
                let (xl, xh) = unsafe {
                    let p = xb.qs.as_ptr().add(64 * j) as *const __m256i;
                    (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)))
                };
                let pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xl), sc_lo);
                let ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xh), sc_hi);
                sumi[k] = _mm256_add_epi32(sumi[k], _mm256_add_epi32(pl, ph));
            }
        }
        for k in 0..T {
            // SAFETY: as above.
            let xb = unsafe { x[k].get_unchecked(i) };
            acc[k] = _mm256_fmadd_ps(
                _mm256_set1_ps(d * xb.d),
                _mm256_cvtepi32_ps(sumi[k]),
                acc[k],
            );
            acc_m[k] += dmin * xb.d * mins_dot(m8, xb) as f32;
        }
    }
    array::from_fn(|k| hsum_ps(acc[k]) - acc_m[k])
}

/// Q6_K rows with `T` activation rows.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q6k<const T: usize>(w: &[u8], x: [&[BlockQ8K]; T]) -> [f32; T] {
    const SIZE: usize = 210;
    let nb = w.len() / SIZE;
    for xr in &x {
        assert!(xr.len() >= nb, "activation row shorter than the weight row");
    }
    let m4 = _mm256_set1_epi8(0x0F);
    let m3 = _mm256_set1_epi8(0x03);
    let mut acc = [_mm256_setzero_ps(); T];
    for i in 0..nb {
        let b = &w[i * SIZE..(i + 1) * SIZE];
        let d = crate::gguf::f16_at(b, 208);
        // SAFETY: the 16 scale bytes at 192 lie inside the block.
        let sc16 =
            unsafe { _mm256_cvtepi8_epi16(_mm_loadu_si128(b.as_ptr().add(192) as *const __m128i)) };
        let mut sumi = [_mm256_setzero_si256(); T];
        for n in 0..2 {
            // SAFETY: ql (64 bytes at 64 n) and qh (32 bytes at 128 + 32 n) lie inside the block.
            let (ql0, ql1, qh) = unsafe {
                let p = b.as_ptr();
                (
                    _mm256_loadu_si256(p.add(64 * n) as *const __m256i),
                    _mm256_loadu_si256(p.add(64 * n + 32) as *const __m256i),
                    _mm256_loadu_si256(p.add(128 + 32 * n) as *const __m256i),
                )
            };
            let h = |shift: i32| -> __m256i {
                let v = match shift {
                    0 => qh,
                    2 => _mm256_srli_epi16(qh, 2),
                    4 => _mm256_srli_epi16(qh, 4),
                    _ => _mm256_srli_epi16(qh, 6),
                };
                _mm256_slli_epi16(_mm256_and_si256(v, m3), 4)
            };
            let q = [
                _mm256_or_si256(_mm256_and_si256(ql0, m4), h(0)),
                _mm256_or_si256(_mm256_and_si256(ql1, m4), h(2)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), h(4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), h(6)),
            ];
            // SAFETY: reading 16 bytes of scales at 192 + 8 n + 2 p (p < 4) stays in the block.
            let scales: [__m256i; 4] = array::from_fn(|p| {
                let g = 192 + 8 * n + 2 * p;
                _mm256_set_m128i(
                    _mm_set1_epi16(i16::from(b[g + 1] as i8)),
                    _mm_set1_epi16(i16::from(b[g] as i8)),
                )
            });
            for k in 0..T {
                // SAFETY: i < nb <= x[k].len(), checked at entry.
                let xb = unsafe { x[k].get_unchecked(i) };
                for p in 0..4 {
                    // SAFETY: 128 n + 32 p + 32 <= 256 bytes of qs.
                    let xv = unsafe {
                        _mm256_loadu_si256(xb.qs.as_ptr().add(128 * n + 32 * p) as *const __m256i)
                    };
                    let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(q[p], xv), scales[p]);
                    sumi[k] = _mm256_add_epi32(sumi[k], prod);
                }
            }
        }
        for k in 0..T {
            // SAFETY: as above.
            let xb = unsafe { x[k].get_unchecked(i) };
            // The -32 offset: Σ_g sc[g] * bsums[g] * 32.
            // SAFETY: bsums is 32 readable bytes.
            let bs = unsafe { _mm256_loadu_si256(xb.bsums.as_ptr() as *const __m256i) };
            let off = _mm256_slli_epi32(_mm256_madd_epi16(bs, sc16), 5);
            let total = _mm256_sub_epi32(sumi[k], off);
            acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), _mm256_cvtepi32_ps(total), acc[k]);
        }
    }
    array::from_fn(|k| hsum_ps(acc[k]))
}

/// Q2_K and Q3_K rows (`THREE` = Q3_K) with `T` activation rows.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q23k<const THREE: bool, const T: usize>(
    w: &[u8],
    x: [&[BlockQ8K]; T],
) -> [f32; T] {
    let size = if THREE { 110 } else { 84 };
    let nb = w.len() / size;
    for xr in &x {
        assert!(xr.len() >= nb, "activation row shorter than the weight row");
    }
    let m3 = _mm256_set1_epi8(0x03);
    let m1 = _mm256_set1_epi8(0x01);
    let mut acc = [_mm256_setzero_ps(); T];
    let mut acc_m = [0f32; T];
    for i in 0..nb {
        let b = &w[i * size..(i + 1) * size];
        // Per 16-element group: scale (and for Q2_K the minimum).
        let (sc, mn, d, dmin, qs_at) = if THREE {
            let s = crate::gguf::q3_k_scales(&b[96..108]);
            (
                s.map(i16::from),
                [0i16; 16],
                crate::gguf::f16_at(b, 108),
                0.0,
                32,
            )
        } else {
            let sc: [i16; 16] = array::from_fn(|g| i16::from(b[g] & 0x0F));
            let mn: [i16; 16] = array::from_fn(|g| i16::from(b[g] >> 4));
            (
                sc,
                mn,
                crate::gguf::f16_at(b, 80),
                crate::gguf::f16_at(b, 82),
                16,
            )
        };
        // SAFETY: 16 i16 = 32 readable bytes each.
        let (sc16, mn16) = unsafe {
            (
                _mm256_loadu_si256(sc.as_ptr() as *const __m256i),
                _mm256_loadu_si256(mn.as_ptr() as *const __m256i),
            )
        };
        // SAFETY: Q3_K's hmask is the first 32 bytes of the block.
        let mut hm = if THREE {
            unsafe { _mm256_loadu_si256(b.as_ptr() as *const __m256i) }
        } else {
            _mm256_setzero_si256()
        };
        let mut sumi = [_mm256_setzero_si256(); T];
        for n in 0..2 {
            // SAFETY: qs[32 n..32 n + 32] lies inside the block.
            let mut qv =
                unsafe { _mm256_loadu_si256(b.as_ptr().add(qs_at + 32 * n) as *const __m256i) };
            for j in 0..4 {
                let mut q = _mm256_and_si256(qv, m3);
                qv = _mm256_srli_epi16(qv, 2);
                if THREE {
                    q = _mm256_or_si256(q, _mm256_slli_epi16(_mm256_and_si256(hm, m1), 2));
                    hm = _mm256_srli_epi16(hm, 1);
                }
                let g = 8 * n + 2 * j;
                let s = _mm256_set_m128i(_mm_set1_epi16(sc[g + 1]), _mm_set1_epi16(sc[g]));
                for k in 0..T {
                    // SAFETY: i < nb <= x[k].len(), checked at entry; 32 g / 2 + 32 <= 256.
                    let xv = unsafe {
                        let xb = x[k].get_unchecked(i);
                        _mm256_loadu_si256(xb.qs.as_ptr().add(16 * g) as *const __m256i)
                    };
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), s);
                    sumi[k] = _mm256_add_epi32(sumi[k], p);
                }
            }
        }
        for k in 0..T {
            // SAFETY: as above; bsums is 32 readable bytes.
            let (xb, bs) = unsafe {
                let xb = x[k].get_unchecked(i);
                (xb, _mm256_loadu_si256(xb.bsums.as_ptr() as *const __m256i))
            };
            let mut total = sumi[k];
            if THREE {
                // q - 4: subtract 4 · Σ_g sc[g] · bsums[g].
                total = _mm256_sub_epi32(total, _mm256_slli_epi32(_mm256_madd_epi16(bs, sc16), 2));
            } else {
                acc_m[k] += dmin * xb.d * hsum_epi32(_mm256_madd_epi16(bs, mn16)) as f32;
            }
            acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), _mm256_cvtepi32_ps(total), acc[k]);
        }
    }
    array::from_fn(|k| hsum_ps(acc[k]) - acc_m[k])
}

/// Eight weights of float kind `F` (0 = f32, 1 = f16, 2 = bf16) at `p`, as f32.
///
/// # Safety
/// `p` must have 8 readable elements of the kind.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn float8<const F: u8>(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 8 readable elements (32 or 16 bytes); unaligned loads.
    unsafe {
        match F {
            0 => _mm256_loadu_ps(p as *const f32),
            1 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            _ => _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
                16,
            )),
        }
    }
}

/// Float rows (`F`: 0 = f32, 1 = f16, 2 = bf16) with `T` f32 activation rows.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_float<const F: u8, const T: usize>(w: &[u8], x: [&[f32]; T]) -> [f32; T] {
    let width = if F == 0 { 4 } else { 2 };
    let n = w.len() / width;
    for xr in &x {
        assert!(xr.len() >= n, "activation row shorter than the weight row");
    }
    // Two accumulators per token (even and odd groups of 8), whatever T, so that the
    // multiply-adds of consecutive groups do not wait on each other and a token's result does
    // not depend on how many tokens are multiplied together.
    let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); T], [_mm256_setzero_ps(); T]);
    let full = n / 8 * 8;
    let mut c = 0;
    while c < full {
        // SAFETY: elements c..c + 8 (and c + 8..c + 16 when used) are inside the row and
        // inside every x[k] (n <= x[k].len(), checked at entry).
        unsafe {
            let wv = float8::<F>(w.as_ptr().add(c * width));
            for k in 0..T {
                acc0[k] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[k].as_ptr().add(c)), acc0[k]);
            }
            if c + 8 < full {
                let wv = float8::<F>(w.as_ptr().add((c + 8) * width));
                for k in 0..T {
                    let xv = _mm256_loadu_ps(x[k].as_ptr().add(c + 8));
                    acc1[k] = _mm256_fmadd_ps(wv, xv, acc1[k]);
                }
            }
        }
        c += 16;
    }
    let acc: [__m256; T] = array::from_fn(|k| _mm256_add_ps(acc0[k], acc1[k]));
    array::from_fn(|k| {
        let tail = (full..n).map(|i| scalar::float_at::<F>(w, i) * x[k][i]);
        hsum_ps(acc[k]) + tail.sum::<f32>()
    })
}
