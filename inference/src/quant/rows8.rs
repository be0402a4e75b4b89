//! The Q4_0, Q4_1 and Q8_0 weights of a [`QMatrix`](super::QMatrix) re-laid eight rows at a
//! time, for the products of the batched decode.
//!
//! In the GGUF layout a weight row is contiguous, and a 32-element block dotted with one token
//! ends in a horizontal sum, a conversion, a scale and an add of its own: with many tokens
//! this float work per (row, block, token) costs more than the integer products. Here the
//! 32-bit lanes of one register belong to eight rows. Block `i` of rows `8g..8g + 8` is stored
//! as the rows' eight f16 scales `d`, for the 4-bit types their eight offsets `m`, then
//! registers of quants whose lane `r` holds four consecutive quants of row `r`:
//!
//! - **4-bit** (Q4_0, Q4_1; 160 bytes per block of eight rows): four registers, lane `r` of
//!   register `j` holding row `r`'s bytes `4j..4j + 4`, whose low nibbles are elements
//!   `4j..4j + 4` and high nibbles elements `16 + 4j..`. A value is `d q + m`; Q4_0's
//!   `d (q - 8)` is stored with `m = -8 d`, exact in f16, so both types share the kernels.
//! - **8-bit** (Q8_0; 272 bytes): eight registers, lane `r` of register `j` holding row `r`'s
//!   quants `4j..4j + 4` plus 128 (unsigned), so `vpdpbusd` (unsigned × signed) takes them
//!   with the signed activations as they are; the sum starts from `-128 Σ x` to take the
//!   offset back out.
//!
//! The sizes are the GGUF sizes (Q4_0 grows from 18 to 20 bytes per block), four activation
//! bytes are broadcast to all lanes, and a block costs one conversion and one or two
//! multiply-adds per eight rows and token, and no horizontal sum. The integer sums are exact,
//! and the float steps run in the same order in the scalar, AVX2 and VNNI kernels, so all three
//! give the same bits, for a token alone or in any batch. The values (see
//! [`dequantize_row`]) are exactly the GGUF ones; products differ from the row layout's only
//! in the order of float additions.

use std::ops::Range;

use half::f16;

use super::act::BlockQ8;
use super::{Isa, OutPtr, ThreadPool, for_each_unit};
use crate::gguf::GgmlType;

/// Rows interleaved together.
pub(super) const ROWS: usize = 8;
/// Tokens per tile (their activations stay in L2 while every row group goes past).
const TOKEN_TILE: usize = 32;

/// The two quant widths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Width {
    /// Q4_0 and Q4_1.
    Four,
    /// Q8_0.
    Eight,
}

impl Width {
    /// The width of `dtype`, if it has this layout.
    pub(super) fn of(dtype: GgmlType) -> Option<Width> {
        match dtype {
            GgmlType::Q4_0 | GgmlType::Q4_1 => Some(Width::Four),
            GgmlType::Q8_0 => Some(Width::Eight),
            _ => None,
        }
    }

    /// Bytes of one block of eight rows.
    pub(super) const fn group_block(self) -> usize {
        match self {
            Width::Four => 2 * ROWS * 2 + ROWS * 16,
            Width::Eight => ROWS * 2 + ROWS * 32,
        }
    }

    /// Offset of the quants in a group block.
    const fn quants(self) -> usize {
        match self {
            Width::Four => 2 * ROWS * 2,
            Width::Eight => ROWS * 2,
        }
    }
}

/// The interleaved bytes of `rows × cols` weights of `dtype` given in the GGUF layout, or
/// `None` when the type has no such layout or `rows` is not a multiple of 8.
pub(super) fn interleave(
    dtype: GgmlType,
    rows: usize,
    cols: usize,
    bytes: &[u8],
) -> Option<Vec<u8>> {
    let width = Width::of(dtype)?;
    if rows == 0 || !rows.is_multiple_of(ROWS) || cols == 0 || !cols.is_multiple_of(32) {
        return None;
    }
    let size = dtype.type_size();
    let blocks = cols / 32;
    if bytes.len() != rows * blocks * size {
        return None;
    }
    let gb = width.group_block();
    let mut out = vec![0u8; rows / ROWS * blocks * gb];
    for (g, group) in out.chunks_exact_mut(blocks * gb).enumerate() {
        for (i, dst) in group.chunks_exact_mut(gb).enumerate() {
            for r in 0..ROWS {
                let src = &bytes[((g * ROWS + r) * blocks + i) * size..][..size];
                dst[2 * r..2 * r + 2].copy_from_slice(&src[..2]);
                let q = width.quants();
                match dtype {
                    GgmlType::Q8_0 => {
                        for j in 0..8 {
                            for e in 0..4 {
                                dst[q + 32 * j + 4 * r + e] = src[2 + 4 * j + e] ^ 0x80;
                            }
                        }
                    }
                    _ => {
                        let (m, qs) = if dtype == GgmlType::Q4_1 {
                            ([src[2], src[3]], &src[4..20])
                        } else {
                            // Q4_0: d (q - 8) = d q + m with m = -8 d (exact: a power of two).
                            let d = f16::from_le_bytes([src[0], src[1]]).to_f32();
                            (f16::from_f32(-8.0 * d).to_le_bytes(), &src[2..18])
                        };
                        dst[2 * ROWS + 2 * r..][..2].copy_from_slice(&m);
                        for j in 0..4 {
                            dst[q + 32 * j + 4 * r..][..4].copy_from_slice(&qs[4 * j..4 * j + 4]);
                        }
                    }
                }
            }
        }
    }
    Some(out)
}

/// Decodes row `row` of interleaved weights (`cols` values) into `out`: the same values as the
/// GGUF blocks they came from.
pub(super) fn dequantize_row(width: Width, data: &[u8], cols: usize, row: usize, out: &mut [f32]) {
    let blocks = cols / 32;
    let gb = width.group_block();
    let (g, r) = (row / ROWS, row % ROWS);
    let group = &data[g * blocks * gb..][..blocks * gb];
    let f16_at = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
    for (blk, values) in group.chunks_exact(gb).zip(out.chunks_exact_mut(32)) {
        let d = f16_at(blk, 2 * r);
        let q = &blk[width.quants()..];
        match width {
            Width::Four => {
                let m = f16_at(blk, 2 * ROWS + 2 * r);
                for j in 0..4 {
                    for e in 0..4 {
                        let byte = q[32 * j + 4 * r + e];
                        values[4 * j + e] = d * f32::from(byte & 0x0F) + m;
                        values[16 + 4 * j + e] = d * f32::from(byte >> 4) + m;
                    }
                }
            }
            Width::Eight => {
                for j in 0..8 {
                    for e in 0..4 {
                        let v = i32::from(q[32 * j + 4 * r + e]) - 128;
                        values[4 * j + e] = d * v as f32;
                    }
                }
            }
        }
    }
}

/// One token's activations: its Q8 blocks and, for 8-bit weights, each block's `Σ qs`.
#[derive(Clone, Copy)]
struct Tok<'a> {
    q8: &'a [BlockQ8],
    sums: &'a [i32],
}

/// Everything the workers of one product share.
struct Job<'a> {
    data: &'a [u8],
    width: Width,
    blocks: usize,
    rows: usize,
    acts: &'a [BlockQ8],
    sums: &'a [i32],
    y: OutPtr,
}

impl Job<'_> {
    fn tok(&self, t: usize) -> Tok<'_> {
        let b = self.blocks;
        Tok {
            q8: &self.acts[t * b..(t + 1) * b],
            sums: self.sums.get(t * b..(t + 1) * b).unwrap_or(&[]),
        }
    }
}

/// Computes the outputs of row group `g` for tokens `toks`.
type Driver = unsafe fn(&Job<'_>, usize, Range<usize>);

/// `y[n × rows] = x · Wᵀ` for interleaved weights `data` (`rows × cols`), with the activations
/// already quantized (`acts`: `n` rows of `cols / 32` blocks).
#[allow(clippy::too_many_arguments)]
pub(super) fn product(
    isa: Isa,
    width: Width,
    data: &[u8],
    rows: usize,
    cols: usize,
    acts: &[BlockQ8],
    n: usize,
    y: &mut [f32],
    pool: &ThreadPool,
) {
    let blocks = cols / 32;
    let sums: Vec<i32> = if width == Width::Eight {
        acts.iter()
            .map(|b| b.qs.iter().map(|&q| i32::from(q)).sum())
            .collect()
    } else {
        Vec::new()
    };
    let job = Job {
        data,
        width,
        blocks,
        rows,
        acts,
        sums: &sums,
        y: OutPtr(y.as_mut_ptr()),
    };
    let driver = driver(isa, width);
    let groups = rows / ROWS;
    let tiles = n.div_ceil(TOKEN_TILE);
    // About 4 chunks of row groups per thread per tile, for balance.
    let chunk = groups.div_ceil(pool.threads() * 4).max(1);
    let chunks = groups.div_ceil(chunk);
    for_each_unit(pool, tiles, chunks, |tile, c| {
        let toks = tile * TOKEN_TILE..((tile + 1) * TOKEN_TILE).min(n);
        for g in c * chunk..((c + 1) * chunk).min(groups) {
            // SAFETY: the driver was chosen for `isa`, which the caller checked is available;
            // g < groups and the tokens are < n, so every read is inside the job's slices and
            // every write inside `y` (n × rows), written by this unit alone.
            unsafe { driver(&job, g, toks.clone()) };
        }
    });
}

/// Generates a driver: walks the tokens in groups of up to `$max` and runs the group kernel
/// `$kernel::<T>` on each.
macro_rules! driver {
    ($(#[$attr:meta])* $name:ident, $kernel:path, [$($t:literal)*]) => {
        $(#[$attr])*
        unsafe fn $name(job: &Job<'_>, g: usize, toks: Range<usize>) {
            $(#[$attr])*
            unsafe fn run<const T: usize>(job: &Job<'_>, g: usize, t0: usize) {
                let gb = job.width.group_block();
                let w = &job.data[g * job.blocks * gb..][..job.blocks * gb];
                let x: [Tok<'_>; T] = std::array::from_fn(|k| job.tok(t0 + k));
                // SAFETY: the driver's contract (features of this CPU, sizes of the job).
                #[allow(unused_unsafe)]
                let out: [[f32; ROWS]; T] = unsafe { $kernel(job.width, w, &x) };
                for (k, v) in out.iter().enumerate() {
                    // SAFETY: token t0 + k < n and rows 8g..8g + 8 < rows: inside `y`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            v.as_ptr(),
                            job.y.0.add((t0 + k) * job.rows + g * ROWS),
                            ROWS,
                        );
                    }
                }
            }
            let max = [$($t),*][0];
            let mut t = toks.start;
            while t < toks.end {
                let nt = (toks.end - t).min(max);
                // SAFETY: as this function.
                unsafe {
                    match nt {
                        $($t => run::<$t>(job, g, t),)*
                        _ => run::<1>(job, g, t),
                    }
                }
                t += nt;
            }
        }
    };
}

driver!(scalar_driver, group_scalar, [4 3 2]);
#[cfg(target_arch = "x86_64")]
driver!(
    #[target_feature(enable = "avx2,fma,f16c")]
    avx2_driver,
    avx2::group::<false, T>,
    [4 3 2]
);
#[cfg(target_arch = "x86_64")]
driver!(
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    vnni_driver,
    avx2::group::<true, T>,
    [8 7 6 5 4 3 2]
);

fn driver(isa: Isa, _width: Width) -> Driver {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2_driver,
        #[cfg(target_arch = "x86_64")]
        Isa::Vnni => vnni_driver,
        _ => scalar_driver,
    }
}

/// Portable group kernel, with the float steps in the order of the SIMD kernels (so all give
/// the same bits).
fn group_scalar<const T: usize>(width: Width, w: &[u8], x: &[Tok<'_>; T]) -> [[f32; ROWS]; T] {
    let gb = width.group_block();
    let f16_at = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
    let mut acc = [[0.0f32; ROWS]; T];
    for (i, blk) in w.chunks_exact(gb).enumerate() {
        let q = &blk[width.quants()..];
        for (k, tok) in x.iter().enumerate() {
            let xb = &tok.q8[i];
            for r in 0..ROWS {
                let mut isum = 0i32;
                match width {
                    Width::Four => {
                        for j in 0..4 {
                            for e in 0..4 {
                                let byte = q[32 * j + 4 * r + e];
                                isum += i32::from(byte & 0x0F) * i32::from(xb.qs[4 * j + e]);
                                isum += i32::from(byte >> 4) * i32::from(xb.qs[16 + 4 * j + e]);
                            }
                        }
                    }
                    Width::Eight => {
                        for j in 0..8 {
                            for e in 0..4 {
                                let v = i32::from(q[32 * j + 4 * r + e]) - 128;
                                isum += v * i32::from(xb.qs[4 * j + e]);
                            }
                        }
                    }
                }
                let dd = f16_at(blk, 2 * r) * xb.d;
                acc[k][r] = dd.mul_add(isum as f32, acc[k][r]);
                if width == Width::Four {
                    acc[k][r] = f16_at(blk, 2 * ROWS + 2 * r).mul_add(xb.s, acc[k][r]);
                }
            }
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{ROWS, Tok, Width};
    use crate::quant::avx2::acc_u8i8;

    /// Four activation bytes at `at` of `qs`, in every lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn four(qs: &[i8; 32], at: usize) -> __m256i {
        // SAFETY: at ≤ 28 at every call, so the four bytes are inside `qs`; unaligned read.
        let v = unsafe { (qs.as_ptr().add(at) as *const i32).read_unaligned() };
        _mm256_set1_epi32(v)
    }

    /// The eight rows of one group (`w`: its blocks) dotted with `T` tokens; with VNNI when
    /// `V`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C, and AVX-512 VNNI and VL when `V`; `w` whole group blocks of
    /// `width` and every token's activations at least as many blocks long (8-bit weights:
    /// with as many sums).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn group<const V: bool, const T: usize>(
        width: Width,
        w: &[u8],
        x: &[Tok<'_>; T],
    ) -> [[f32; ROWS]; T] {
        let gb = width.group_block();
        let nb = w.len() / gb;
        for t in x {
            assert!(
                t.q8.len() >= nb && (width == Width::Four || t.sums.len() >= nb),
                "activation row shorter than the weight row"
            );
        }
        let low = _mm256_set1_epi8(0x0F);
        let flip = _mm256_set1_epi8(-128);
        let mut acc = [_mm256_setzero_ps(); T];
        for i in 0..nb {
            // SAFETY: block i lies inside `w` (i < nb).
            let base = unsafe { w.as_ptr().add(i * gb) };
            // SAFETY (all activation reads): i < nb ≤ the tokens' lengths (asserted).
            let xb = |k: usize| unsafe { x[k].q8.get_unchecked(i) };
            // With VNNI and few tokens each token's sums run in two chains, added at the end
            // (exactly): one chain would make every `vpdpbusd` wait for the previous one's
            // result (a latency of about five cycles against a throughput of two a cycle),
            // which bounds the decode of one token. (With more tokens there are enough chains,
            // and twice as many would not fit in the registers.)
            let chains = if V && T <= 4 { 2 } else { 1 };
            let mut isum = [[_mm256_setzero_si256(); 2]; T];
            match width {
                Width::Four => {
                    for j in 0..4 {
                        // SAFETY: register j of the quants lies inside the block.
                        let raw =
                            unsafe { _mm256_loadu_si256(base.add(32 + 32 * j) as *const __m256i) };
                        let lo = _mm256_and_si256(raw, low);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
                        for (k, sums) in isum.iter_mut().enumerate() {
                            let qs = &xb(k).qs;
                            let c = (j * 2) % (2 * chains) / 2;
                            // SAFETY (both): V only when the caller has the features.
                            sums[0] = unsafe { acc_u8i8::<V>(sums[0], lo, four(qs, 4 * j)) };
                            sums[c] = unsafe { acc_u8i8::<V>(sums[c], hi, four(qs, 16 + 4 * j)) };
                        }
                    }
                }
                Width::Eight => {
                    if V {
                        for (k, s) in isum.iter_mut().enumerate() {
                            // SAFETY: as the other activation reads.
                            let sum = unsafe { *x[k].sums.get_unchecked(i) };
                            s[0] = _mm256_set1_epi32(-128 * sum);
                        }
                    }
                    for j in 0..8 {
                        // SAFETY: register j of the quants lies inside the block.
                        let u =
                            unsafe { _mm256_loadu_si256(base.add(16 + 32 * j) as *const __m256i) };
                        if V {
                            for (k, sums) in isum.iter_mut().enumerate() {
                                let c = &mut sums[j % chains];
                                // SAFETY: the caller has the features.
                                *c = unsafe { acc_u8i8::<true>(*c, u, four(&xb(k).qs, 4 * j)) };
                            }
                        } else {
                            // Signed × signed: the weight's sign moves onto the activation.
                            let q = _mm256_xor_si256(u, flip);
                            let magnitude = _mm256_sign_epi8(q, q);
                            for (k, sums) in isum.iter_mut().enumerate() {
                                let signed = _mm256_sign_epi8(four(&xb(k).qs, 4 * j), q);
                                // SAFETY: AVX2 only.
                                sums[0] = unsafe { acc_u8i8::<false>(sums[0], magnitude, signed) };
                            }
                        }
                    }
                }
            }
            // SAFETY: the eight f16 scales open the block.
            let d = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(base as *const __m128i)) };
            for k in 0..T {
                let sum = _mm256_add_epi32(isum[k][0], isum[k][1]);
                let dd = _mm256_mul_ps(d, _mm256_set1_ps(xb(k).d));
                acc[k] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(sum), acc[k]);
            }
            if width == Width::Four {
                // SAFETY: the eight f16 offsets follow the scales.
                let m = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(base.add(16) as *const __m128i)) };
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(m, _mm256_set1_ps(xb(k).s), *a);
                }
            }
        }
        let mut out = [[0.0f32; ROWS]; T];
        for k in 0..T {
            // SAFETY: `out[k]` is 8 writable floats.
            unsafe { _mm256_storeu_ps(out[k].as_mut_ptr(), acc[k]) };
        }
        out
    }
}
