//! Portable dot products of one weight row with `T` activation rows.
//!
//! These are the reference for the SIMD kernels (same integer arithmetic, so the results agree
//! up to float summation order) and the path on CPUs without AVX2 (and on aarch64).
//! Each block is decoded to small integers, multiplied with the 8-bit activations in `i32`,
//! then scaled.

use super::act::{BlockQ8, BlockQ8K};
use crate::gguf::{f16_at, q3_k_scales, scale_min_k4};

/// One 32-element block decoded: `value = d * (q - offset) + m`.
struct Block32 {
    q: [i32; 32],
    d: f32,
    m: f32,
    offset: i32,
}

#[inline(always)]
fn nibbles(qs: &[u8], q: &mut [i32; 32]) {
    for j in 0..16 {
        q[j] = i32::from(qs[j] & 0x0F);
        q[j + 16] = i32::from(qs[j] >> 4);
    }
}

#[inline(always)]
fn high_bits(qh: u32, q: &mut [i32; 32]) {
    for (j, v) in q.iter_mut().enumerate() {
        *v |= (((qh >> j) & 1) << 4) as i32;
    }
}

#[inline(always)]
fn decode32<const KIND: u8>(b: &[u8]) -> Block32 {
    let mut q = [0i32; 32];
    match KIND {
        Q4_0 => {
            nibbles(&b[2..18], &mut q);
            Block32 {
                q,
                d: f16_at(b, 0),
                m: 0.0,
                offset: 8,
            }
        }
        Q4_1 => {
            nibbles(&b[4..20], &mut q);
            Block32 {
                q,
                d: f16_at(b, 0),
                m: f16_at(b, 2),
                offset: 0,
            }
        }
        Q5_0 => {
            nibbles(&b[6..22], &mut q);
            high_bits(u32::from_le_bytes([b[2], b[3], b[4], b[5]]), &mut q);
            Block32 {
                q,
                d: f16_at(b, 0),
                m: 0.0,
                offset: 16,
            }
        }
        Q5_1 => {
            nibbles(&b[8..24], &mut q);
            high_bits(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), &mut q);
            Block32 {
                q,
                d: f16_at(b, 0),
                m: f16_at(b, 2),
                offset: 0,
            }
        }
        _ => {
            for (v, &byte) in q.iter_mut().zip(&b[2..34]) {
                *v = i32::from(byte as i8);
            }
            Block32 {
                q,
                d: f16_at(b, 0),
                m: 0.0,
                offset: 0,
            }
        }
    }
}

pub(crate) const Q4_0: u8 = 0;
pub(crate) const Q4_1: u8 = 1;
pub(crate) const Q5_0: u8 = 2;
pub(crate) const Q5_1: u8 = 3;
pub(crate) const Q8_0: u8 = 4;

/// Bytes per block of the 32-element kind `KIND`.
pub(crate) const fn block32_size(kind: u8) -> usize {
    match kind {
        Q4_0 => 18,
        Q4_1 => 20,
        Q5_0 => 22,
        Q5_1 => 24,
        _ => 34,
    }
}

/// Dot products of a row of 32-element blocks of kind `KIND` with `T` activation rows.
pub(crate) fn dot_block32<const KIND: u8, const T: usize>(
    w: &[u8],
    x: [&[BlockQ8]; T],
) -> [f32; T] {
    let size = block32_size(KIND);
    let mut out = [0f32; T];
    for (i, b) in w.chunks_exact(size).enumerate() {
        let blk = decode32::<KIND>(b);
        for (o, xr) in out.iter_mut().zip(&x) {
            let xb = &xr[i];
            let mut isum = 0i32;
            for (q, &v) in blk.q.iter().zip(&xb.qs) {
                isum += q * i32::from(v);
            }
            // Σ (d (q - off) + m) · dx qx = d dx Σ q qx - off d s + m s, with s = dx Σ qx.
            *o += blk.d * xb.d * isum as f32 - blk.offset as f32 * blk.d * xb.s + blk.m * xb.s;
        }
    }
    out
}

/// One K-quant super-block decoded: `value = d * sc[g] * (q - offset) - dmin * m[g]` for
/// element `i` in 16-element group `g = i / 16`.
pub(crate) struct BlockK {
    pub(crate) q: [u8; 256],
    pub(crate) sc: [i32; 16],
    pub(crate) m: [i32; 16],
    pub(crate) d: f32,
    pub(crate) dmin: f32,
    pub(crate) offset: i32,
}

pub(crate) const Q2K: u8 = 10;
pub(crate) const Q3K: u8 = 11;
pub(crate) const Q4K: u8 = 12;
pub(crate) const Q5K: u8 = 13;
pub(crate) const Q6K: u8 = 14;

/// Bytes per super-block of the K-quant kind `KIND`.
pub(crate) const fn blockk_size(kind: u8) -> usize {
    match kind {
        Q2K => 84,
        Q3K => 110,
        Q4K => 144,
        Q5K => 176,
        _ => 210,
    }
}

/// Decodes one super-block of kind `KIND` (layouts as in `gguf::dequant`).
#[inline(always)]
pub(crate) fn decode_k<const KIND: u8>(b: &[u8]) -> BlockK {
    let mut k = BlockK {
        q: [0; 256],
        sc: [0; 16],
        m: [0; 16],
        d: 0.0,
        dmin: 0.0,
        offset: 0,
    };
    match KIND {
        Q2K => {
            k.d = f16_at(b, 80);
            k.dmin = f16_at(b, 82);
            for (g, &byte) in b[..16].iter().enumerate() {
                k.sc[g] = i32::from(byte & 0x0F);
                k.m[g] = i32::from(byte >> 4);
            }
            let mut i = 0;
            for n in 0..2 {
                let q = &b[16 + 32 * n..48 + 32 * n];
                for shift in [0, 2, 4, 6] {
                    for &byte in q {
                        k.q[i] = (byte >> shift) & 3;
                        i += 1;
                    }
                }
            }
        }
        Q3K => {
            k.d = f16_at(b, 108);
            k.offset = 4;
            for (s, v) in k.sc.iter_mut().zip(q3_k_scales(&b[96..108])) {
                *s = i32::from(v);
            }
            let hmask = &b[0..32];
            let mut i = 0;
            for n in 0..2 {
                let q = &b[32 + 32 * n..64 + 32 * n];
                for shift in [0, 2, 4, 6] {
                    let bit = 4 * n + shift / 2;
                    for l in 0..32 {
                        let high = ((hmask[l] >> bit) & 1) << 2;
                        k.q[i] = ((q[l] >> shift) & 3) | high;
                        i += 1;
                    }
                }
            }
        }
        Q4K | Q5K => {
            k.d = f16_at(b, 0);
            k.dmin = f16_at(b, 2);
            let scales = &b[4..16];
            for s in 0..8 {
                let (sc, m) = scale_min_k4(s, scales);
                k.sc[2 * s] = i32::from(sc);
                k.sc[2 * s + 1] = i32::from(sc);
                k.m[2 * s] = i32::from(m);
                k.m[2 * s + 1] = i32::from(m);
            }
            let (qs, qh) = if KIND == Q4K {
                (&b[16..144], None)
            } else {
                (&b[48..176], Some(&b[16..48]))
            };
            for j in 0..4 {
                for l in 0..32 {
                    let (mut lo, mut hi) = (qs[32 * j + l] & 0x0F, qs[32 * j + l] >> 4);
                    if let Some(qh) = qh {
                        lo |= ((qh[l] >> (2 * j)) & 1) << 4;
                        hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
                    }
                    k.q[64 * j + l] = lo;
                    k.q[64 * j + 32 + l] = hi;
                }
            }
        }
        _ => {
            k.d = f16_at(b, 208);
            k.offset = 32;
            for g in 0..16 {
                k.sc[g] = i32::from(b[192 + g] as i8);
            }
            for n in 0..2 {
                let ql = &b[64 * n..64 * n + 64];
                let qh = &b[128 + 32 * n..160 + 32 * n];
                let q = &mut k.q[128 * n..128 * n + 128];
                for l in 0..32 {
                    q[l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
                    q[l + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
                    q[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    q[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
        }
    }
    k
}

/// Dot products of a row of K-quant super-blocks of kind `KIND` with `T` activation rows.
pub(crate) fn dot_k<const KIND: u8, const T: usize>(w: &[u8], x: [&[BlockQ8K]; T]) -> [f32; T] {
    let mut out = [0f32; T];
    for (i, b) in w.chunks_exact(blockk_size(KIND)).enumerate() {
        let k = decode_k::<KIND>(b);
        for (o, xr) in out.iter_mut().zip(&x) {
            let xb = &xr[i];
            let (mut sumi, mut summ) = (0i32, 0i32);
            for g in 0..16 {
                let mut s = 0i32;
                for l in 16 * g..16 * g + 16 {
                    s += i32::from(k.q[l]) * i32::from(xb.qs[l]);
                }
                let bsum = i32::from(xb.bsums[g]);
                sumi += k.sc[g] * (s - k.offset * bsum);
                summ += k.m[g] * bsum;
            }
            *o += k.d * xb.d * sumi as f32 - k.dmin * xb.d * summ as f32;
        }
    }
    out
}

/// Float weights: decodes element `i` of a row of kind `F` (0 = f32, 1 = f16, 2 = bf16).
#[inline(always)]
pub(crate) fn float_at<const F: u8>(w: &[u8], i: usize) -> f32 {
    match F {
        0 => f32::from_le_bytes([w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]]),
        1 => f16_at(w, 2 * i),
        _ => f32::from_bits(u32::from(u16::from_le_bytes([w[2 * i], w[2 * i + 1]])) << 16),
    }
}

/// Dot products of a row of floats of kind `F` with `T` f32 activation rows.
pub(crate) fn dot_float<const F: u8, const T: usize>(w: &[u8], x: [&[f32]; T]) -> [f32; T] {
    let mut out = [0f32; T];
    let n = x.first().map_or(0, |r| r.len());
    for i in 0..n {
        let v = float_at::<F>(w, i);
        for (o, xr) in out.iter_mut().zip(&x) {
            *o += v * xr[i];
        }
    }
    out
}
