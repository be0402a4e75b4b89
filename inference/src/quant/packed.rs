//! Q8_0 weights repacked sixteen rows at a time, for products with many activation rows (the
//! embedder's batches).
//!
//! [`QMatrix`](super::QMatrix) keeps a weight row contiguous and dots it with a few activation
//! rows: each 32-element block ends in a horizontal sum, a conversion and a scale per (row,
//! token) pair. Here the 32-bit lanes of one 512-bit register belong to sixteen different rows:
//! block `i` of rows `16g..16g + 16` is stored as eight registers, register `j` holding
//! elements `4j..4j + 4` of each of the sixteen rows (its low half holds rows 0 to 7, which
//! the AVX2 kernel reads as one 256-bit register, and its high half rows 8 to 15). An
//! activation's four bytes are broadcast to all lanes, so a block costs eight `vpdpbusd` per
//! 16 rows and token with AVX-512 VNNI (two a cycle on this class of CPU, for 256-bit and
//! 512-bit registers alike: the wider register does twice the work), one conversion and one
//! multiply-add, and no horizontal sum. The quantization is Q8_0's (`scale = max|w| / 127` per
//! 32 weights, rounded to f16), so results equal [`QMatrix`](super::QMatrix)'s Q8_0 product up
//! to the order of float additions.

use half::f16;

use super::act::BlockQ8;
use super::{Acts, Isa, OutPtr, ThreadPool, for_each_unit, quantize_acts};

/// Rows interleaved together.
const ROWS: usize = 16;
/// Bytes of one block of sixteen rows: sixteen f32 scales, sixteen i32 `-128 Σ q` (the VNNI
/// kernel's correction for its unsigned activations), then 16 × 32 quants.
const GROUP_BLOCK: usize = ROWS * 4 + ROWS * 4 + ROWS * 32;
/// Offset of the quants in a group block.
const QUANTS: usize = ROWS * 8;
/// Bytes of one register of quants (four of each row's).
const REG: usize = ROWS * 4;
/// Tokens per tile (their activations stay in L2 while every row group goes past).
const TOKEN_TILE: usize = 32;
/// Tokens multiplied with one load of a weight register: 8 with AVX-512's 32 registers, 4 for
/// the AVX2 and scalar kernels.
const TOKENS_VNNI: usize = 8;
const TOKENS: usize = 4;

/// Encodes f32 values as ggml's Q8_0 blocks (an f16 scale, then 32 signed bytes; a short last
/// block is padded with zeros): `scale = max|x| / 127`, `q = round(x / scale)`.
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len().div_ceil(32) * 34);
    for block in values.chunks(32) {
        let amax = block.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
        let d = f16::from_f32(amax / 127.0);
        let inverse = if d.to_f32() > 0.0 {
            1.0 / d.to_f32()
        } else {
            0.0
        };
        out.extend_from_slice(&d.to_le_bytes());
        for i in 0..32 {
            let x = block.get(i).copied().unwrap_or(0.0);
            out.push((x * inverse).round().clamp(-127.0, 127.0) as i8 as u8);
        }
    }
    out
}

/// A weight matrix (`rows` outputs × `cols` inputs) in the eight-row Q8_0 layout.
#[derive(Clone)]
pub struct PackedQ8 {
    rows: usize,
    cols: usize,
    /// `rows / 8` groups, each `cols / 32` blocks of [`GROUP_BLOCK`] bytes.
    data: Vec<u8>,
}

impl std::fmt::Debug for PackedQ8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedQ8")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

/// Why a matrix cannot be packed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    /// The shape does not fit the layout.
    #[error(
        "a {rows} × {cols} matrix cannot be packed: rows must be a multiple of 16 and columns of 32"
    )]
    Shape {
        /// Rows given.
        rows: usize,
        /// Columns given.
        cols: usize,
    },
    /// The value count is not `rows × cols`.
    #[error("{got} values for a {rows} × {cols} matrix")]
    Length {
        /// Values given.
        got: usize,
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
    },
}

impl PackedQ8 {
    /// Quantizes `values` (row-major, `rows × cols`, a row per output) into the packed layout.
    pub fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Result<PackedQ8, PackError> {
        if rows == 0 || cols == 0 || !rows.is_multiple_of(ROWS) || !cols.is_multiple_of(32) {
            return Err(PackError::Shape { rows, cols });
        }
        if rows.checked_mul(cols) != Some(values.len()) {
            return Err(PackError::Length {
                got: values.len(),
                rows,
                cols,
            });
        }
        let blocks = cols / 32;
        let mut data = vec![0u8; rows / ROWS * blocks * GROUP_BLOCK];
        for (g, group) in data.chunks_exact_mut(blocks * GROUP_BLOCK).enumerate() {
            for (i, out) in group.chunks_exact_mut(GROUP_BLOCK).enumerate() {
                let (scales, rest) = out.split_at_mut(ROWS * 4);
                let (corrections, quants) = rest.split_at_mut(ROWS * 4);
                for r in 0..ROWS {
                    let w = &values[(g * ROWS + r) * cols + i * 32..][..32];
                    let amax = w.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
                    // Q8_0's scale is an f16.
                    let d = f16::from_f32(amax / 127.0).to_f32();
                    let inverse = if d > 0.0 { 1.0 / d } else { 0.0 };
                    scales[r * 4..][..4].copy_from_slice(&d.to_le_bytes());
                    let mut sum = 0i32;
                    for (e, &x) in w.iter().enumerate() {
                        let q = (x * inverse).round().clamp(-127.0, 127.0) as i8;
                        quants[(e / 4) * REG + r * 4 + e % 4] = q as u8;
                        sum += i32::from(q);
                    }
                    corrections[r * 4..][..4].copy_from_slice(&(-128 * sum).to_le_bytes());
                }
            }
        }
        Ok(PackedQ8 { rows, cols, data })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// `y[n × rows] = x[n × cols] · Wᵀ`, on the pool's threads with the fastest kernels of this
    /// CPU.
    ///
    /// # Panics
    /// If `x.len() != n * cols` or `y.len() != n * rows`.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32], pool: &ThreadPool) {
        self.matmul_with(Isa::detect(), x, n, y, Epilogue::NONE, pool);
    }

    /// [`PackedQ8::matmul`], then `epilogue` on each output while it is still in cache (a
    /// layer's bias and activation, with no pass of their own).
    ///
    /// # Panics
    /// As [`PackedQ8::matmul`], and if the bias is not `rows` long.
    pub fn matmul_then(
        &self,
        x: &[f32],
        n: usize,
        y: &mut [f32],
        epilogue: Epilogue<'_>,
        pool: &ThreadPool,
    ) {
        self.matmul_with(Isa::detect(), x, n, y, epilogue, pool);
    }

    /// [`PackedQ8::matmul_then`] with the given kernels (for tests and benchmarks).
    ///
    /// # Panics
    /// If the shapes are wrong or `isa` is not available on this CPU.
    pub fn matmul_with(
        &self,
        isa: Isa,
        x: &[f32],
        n: usize,
        y: &mut [f32],
        epilogue: Epilogue<'_>,
        pool: &ThreadPool,
    ) {
        if let Some(bias) = epilogue.bias {
            assert_eq!(
                bias.len(),
                self.rows,
                "packed matmul: the bias has the wrong size"
            );
        }
        assert_eq!(
            x.len(),
            n * self.cols,
            "packed matmul: x has the wrong size"
        );
        assert_eq!(
            y.len(),
            n * self.rows,
            "packed matmul: y has the wrong size"
        );
        assert!(isa.available(), "packed matmul: {isa:?} is not available");
        if n == 0 {
            return;
        }
        let kernel = Kernel::for_isa(isa);
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Vnni {
            let unsigned = quantize_unsigned(x, n, pool);
            return self.product(kernel, &[], &unsigned, n, y, epilogue, pool);
        }
        let Acts::Q8(acts) = quantize_acts(super::ActKind::Q8, x, n, isa, pool) else {
            unreachable!("Q8 activations were asked for");
        };
        self.product(kernel, &acts, &[], n, y, epilogue, pool);
    }

    /// The product with quantized activations (`n` rows of `cols / 32` blocks: Q8 blocks, or
    /// unsigned ones for the VNNI kernel) on `kernel`.
    #[allow(clippy::too_many_arguments)]
    fn product(
        &self,
        kernel: Kernel,
        acts: &[BlockQ8],
        unsigned: &[BlockU8],
        n: usize,
        y: &mut [f32],
        epilogue: Epilogue<'_>,
        pool: &ThreadPool,
    ) {
        let blocks = self.cols / 32;
        let groups = self.rows / ROWS;
        let tiles = n.div_ceil(TOKEN_TILE);
        // About 4 chunks of row groups per thread per tile.
        let chunk = groups.div_ceil(pool.threads() * 4).max(1);
        let chunks = groups.div_ceil(chunk);
        let out = OutPtr(y.as_mut_ptr());
        for_each_unit(pool, tiles, chunks, |tile, c| {
            // Keep the whole wrapper captured (not its raw-pointer field), so the closure is Sync.
            let out = &out;
            let toks = tile * TOKEN_TILE..((tile + 1) * TOKEN_TILE).min(n);
            for g in c * chunk..((c + 1) * chunk).min(groups) {
                let w = &self.data[g * blocks * GROUP_BLOCK..][..blocks * GROUP_BLOCK];
                let row = |t: usize| Row {
                    q8: acts.get(t * blocks..(t + 1) * blocks).unwrap_or(&[]),
                    unsigned: unsigned.get(t * blocks..(t + 1) * blocks).unwrap_or(&[]),
                };
                // The bias is added as the outputs are stored.
                let bias: &[f32; ROWS] = epilogue
                    .bias
                    .and_then(|b| b.get(g * ROWS..(g + 1) * ROWS)?.try_into().ok())
                    .unwrap_or(&[0.0; ROWS]);
                let mut t = toks.start;
                while t < toks.end {
                    let nt = (toks.end - t).min(kernel.tokens());
                    // Token t's 16 outputs of this group start here.
                    // SAFETY: token t < n and rows 16g..16g + 16 < rows, so the outputs of
                    // tokens t..t + nt lie inside `y` (n × rows); this unit alone writes
                    // them.
                    let dst = unsafe { out.0.add(t * self.rows + g * ROWS) };
                    macro_rules! run {
                            ($($n:literal)*) => {
                                match nt {
                                    $($n => {
                                        let x: [Row<'_>; $n] = std::array::from_fn(|k| row(t + k));
                                        // SAFETY: as above; `dst` has `nt` rows of outputs at
                                        // stride `rows`.
                                        unsafe { dot_group::<$n>(kernel, w, &x, bias, dst, self.rows) };
                                    })*
                                    _ => unreachable!("at most {TOKENS_VNNI} tokens a group"),
                                }
                            };
                        }
                    run!(1 2 3 4 5 6 7 8);
                    t += nt;
                }
            }
            if epilogue.gelu {
                let span = c * chunk * ROWS..((c + 1) * chunk).min(groups) * ROWS;
                for t in toks {
                    // SAFETY: this unit alone wrote (and now rewrites) these outputs of token
                    // t: rows `span` of its row of `y`.
                    let out = unsafe {
                        std::slice::from_raw_parts_mut(
                            out.0.add(t * self.rows + span.start),
                            span.len(),
                        )
                    };
                    crate::llm::ops::gelu(out);
                }
            }
        });
    }
}

/// What a product does to its outputs once they are written, while they are still in cache.
#[derive(Clone, Copy, Debug, Default)]
pub struct Epilogue<'a> {
    /// Added to every token's outputs (one value per row of the matrix).
    pub bias: Option<&'a [f32]>,
    /// Then exact GELU.
    pub gelu: bool,
}

impl Epilogue<'_> {
    /// Outputs as the product gives them.
    pub const NONE: Epilogue<'static> = Epilogue {
        bias: None,
        gelu: false,
    };
}

/// Quantizes `x` (`n` rows) for the VNNI kernel, in parts on the pool's threads for large
/// inputs.
#[cfg(target_arch = "x86_64")]
fn quantize_unsigned(x: &[f32], n: usize, pool: &ThreadPool) -> Vec<BlockU8> {
    let (parts, per_part) = super::split_rows(x.len(), n, pool);
    let blocks_per_row = x.len().checked_div(n).unwrap_or(0) / 32;
    let mut out = vec![BlockU8 { d: 0.0, q: [0; 32] }; x.len() / 32];
    super::run_split(
        &mut out,
        per_part * blocks_per_row,
        parts,
        pool,
        |i, out| {
            let xs = &x[i * per_part * blocks_per_row * 32..][..out.len() * 32];
            // SAFETY: only the VNNI kernel reads these blocks, and `matmul_with` asserted that its
            // ISA (which includes AVX-512 F) is available.
            unsafe { avx2::quantize_unsigned(xs, out) };
        },
    );
    out
}

/// The kernel a product runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Scalar,
    Avx2,
    /// AVX-512 VNNI on 256-bit registers (`vpdpbusd`: four u8 × i8 products and their sum in
    /// one instruction).
    Vnni,
}

impl Kernel {
    /// Tokens this kernel multiplies together.
    fn tokens(self) -> usize {
        if self == Kernel::Vnni {
            TOKENS_VNNI
        } else {
            TOKENS
        }
    }

    /// The fastest kernel for `isa` on this CPU.
    fn for_isa(isa: Isa) -> Kernel {
        match isa {
            Isa::Scalar => Kernel::Scalar,
            Isa::Vnni => Kernel::Vnni,
            Isa::Avx2 => Kernel::Avx2,
        }
    }
}

/// One token's activations: Q8 blocks for the scalar and AVX2 kernels, or unsigned blocks for
/// the VNNI kernel (the other slice is empty).
#[derive(Clone, Copy)]
struct Row<'a> {
    q8: &'a [BlockQ8],
    unsigned: &'a [BlockU8],
}

/// 32 activations for the VNNI kernel: Q8_0's scale `d` and its quants offset by 128.
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct BlockU8 {
    d: f32,
    q: [u8; 32],
}

/// The sixteen rows of one group (`w`: its blocks) dotted with `T` activation rows (at most
/// the kernel's [`Kernel::tokens`]); token `k`'s sixteen results go to `out + k * stride`.
///
/// # Safety
/// `out + k * stride .. + 16` must be writable for every `k < T`.
unsafe fn dot_group<const T: usize>(
    kernel: Kernel,
    w: &[u8],
    x: &[Row<'_>; T],
    bias: &[f32; ROWS],
    out: *mut f32,
    stride: usize,
) {
    let sums = match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the kernel was chosen for this CPU (`Kernel::for_isa` after `matmul_with`
        // asserted the ISA); `w` holds whole blocks and every activation row as many.
        Kernel::Avx2 => unsafe { avx2::dot_group(w, x.map(|r| r.q8)) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; VNNI was detected, the rows are unsigned blocks, and the caller
        // guarantees the outputs.
        Kernel::Vnni => return unsafe { avx2::dot_group_vnni(w, x, bias, out, stride) },
        _ => dot_group_scalar(w, x.map(|r| r.q8)),
    };
    for (k, s) in sums.iter().enumerate() {
        let s: [f32; ROWS] = std::array::from_fn(|r| s[r] + bias[r]);
        // SAFETY: the caller guarantees the 16 outputs of token k.
        unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), out.add(k * stride), ROWS) };
    }
}

/// Portable [`dot_group`], with the same order of operations as the SIMD code (so all give
/// identical results).
fn dot_group_scalar<const T: usize>(w: &[u8], x: [&[BlockQ8]; T]) -> [[f32; ROWS]; T] {
    let mut acc = [[0.0f32; ROWS]; T];
    for (i, block) in w.chunks_exact(GROUP_BLOCK).enumerate() {
        let (scales, quants) = (&block[..ROWS * 4], &block[QUANTS..]);
        for (k, xr) in x.iter().enumerate() {
            let xb = &xr[i];
            for r in 0..ROWS {
                let mut sum = 0i32;
                for e in 0..32 {
                    let q = quants[(e / 4) * REG + r * 4 + e % 4] as i8;
                    sum += i32::from(q) * i32::from(xb.qs[e]);
                }
                let d = f32::from_le_bytes([
                    scales[r * 4],
                    scales[r * 4 + 1],
                    scales[r * 4 + 2],
                    scales[r * 4 + 3],
                ]);
                acc[k][r] = (d * xb.d).mul_add(sum as f32, acc[k][r]);
            }
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BlockQ8, BlockU8, GROUP_BLOCK, QUANTS, REG, ROWS};

    /// AVX2 [`super::dot_group`]: the two halves of the sixteen rows one after the other, as
    /// 256-bit registers.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `w` must be whole blocks and every `x[k]` at least
    /// as many blocks long.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_group<const T: usize>(
        w: &[u8],
        x: [&[BlockQ8]; T],
    ) -> [[f32; ROWS]; T] {
        let nb = w.len() / GROUP_BLOCK;
        for xr in &x {
            assert!(xr.len() >= nb, "activation row shorter than the weight row");
        }
        let ones = _mm256_set1_epi16(1);
        let mut out = [[0.0f32; ROWS]; T];
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); T];
            for i in 0..nb {
                // SAFETY: block i lies inside `w` (i < nb); its scales and registers of
                // quants are read unaligned within it.
                let base = unsafe { w.as_ptr().add(i * GROUP_BLOCK) };
                let mut sums = [_mm256_setzero_si256(); T];
                for j in 0..8 {
                    // SAFETY: this half of register j of the quants lies inside the block.
                    let q = unsafe {
                        _mm256_loadu_si256(base.add(QUANTS + j * REG + 32 * half) as *const __m256i)
                    };
                    let magnitude = _mm256_sign_epi8(q, q);
                    for k in 0..T {
                        // SAFETY: i < x[k].len() (asserted); bytes 4j..4j + 4 of its 32 quants.
                        let four = unsafe {
                            (x[k].get_unchecked(i).qs.as_ptr().add(4 * j) as *const i32)
                                .read_unaligned()
                        };
                        // Signed × signed: the weight's sign moves onto the activation.
                        let signed = _mm256_sign_epi8(_mm256_set1_epi32(four), q);
                        let pairs = _mm256_maddubs_epi16(magnitude, signed);
                        sums[k] = _mm256_add_epi32(sums[k], _mm256_madd_epi16(pairs, ones));
                    }
                }
                // SAFETY: this half's 8 f32 scales are inside the block's 16.
                let scales = unsafe { _mm256_loadu_ps((base as *const f32).add(8 * half)) };
                for k in 0..T {
                    // SAFETY: as above.
                    let d = unsafe { x[k].get_unchecked(i).d };
                    let s = _mm256_mul_ps(scales, _mm256_set1_ps(d));
                    acc[k] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(sums[k]), acc[k]);
                }
            }
            for k in 0..T {
                // SAFETY: `out[k][8 half..]` is 8 writable floats.
                unsafe { _mm256_storeu_ps(out[k].as_mut_ptr().add(8 * half), acc[k]) };
            }
        }
        out
    }

    /// Q8_0 activations for the VNNI kernel in one pass: each block's scale `d` (as
    /// `act::quantize_q8_scalar` computes it) and its quants offset by 128.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F.
    #[target_feature(enable = "avx2,avx512f")]
    pub(super) unsafe fn quantize_unsigned(x: &[f32], out: &mut [BlockU8]) {
        assert_eq!(x.len(), out.len() * 32);
        for (xb, ob) in x.chunks_exact(32).zip(out) {
            // SAFETY: xb holds 32 floats and ob.q 32 bytes.
            unsafe {
                let lo = _mm512_loadu_ps(xb.as_ptr());
                let hi = _mm512_loadu_ps(xb.as_ptr().add(16));
                let amax =
                    _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
                let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
                let idv = _mm512_set1_ps(id);
                // Rounded to nearest even (the default mode), saturated to bytes.
                let ql = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(lo, idv)));
                let qh = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(hi, idv)));
                let q = _mm256_set_m128i(qh, ql);
                let u = _mm256_xor_si256(q, _mm256_set1_epi8(i8::MIN));
                _mm256_storeu_si256(ob.q.as_mut_ptr() as *mut __m256i, u);
                ob.d = amax / 127.0;
            }
        }
    }

    /// [`dot_group`] with 512-bit `vpdpbusd`: the activations are offset to unsigned bytes
    /// (`x + 128`), so each register of weights needs one instruction per token for all
    /// sixteen rows; the block's integer sums start from `-128 Σ q` to take the offset back out
    /// (exactly). With four tokens or fewer each token's sums run in two chains (even and odd
    /// registers), so that consecutive `vpdpbusd` do not wait for each other's results.
    ///
    /// # Safety
    /// As [`dot_group`], and the CPU must support AVX-512 F, VNNI and VL; `x[k].unsigned` must
    /// be as long as `x[k].q8`; `out + k * stride .. + 16` must be writable for every `k < T`.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vnni,avx512vl")]
    pub(super) unsafe fn dot_group_vnni<const T: usize>(
        w: &[u8],
        x: &[super::Row<'_>; T],
        bias: &[f32; ROWS],
        out: *mut f32,
        stride: usize,
    ) {
        let nb = w.len() / GROUP_BLOCK;
        for xr in x {
            assert!(
                xr.unsigned.len() >= nb,
                "activation row shorter than the weight row"
            );
        }
        let chains = if T <= 4 { 2 } else { 1 };
        let mut acc = [_mm512_setzero_ps(); T];
        for i in 0..nb {
            // SAFETY: block i lies inside `w` (i < nb).
            let base = unsafe { w.as_ptr().add(i * GROUP_BLOCK) };
            // SAFETY: the 16 corrections follow the 16 scales inside the block.
            let start = unsafe { _mm512_loadu_si512(base.add(ROWS * 4) as *const _) };
            let mut sums = [[start, _mm512_setzero_si512()]; T];
            for j in 0..8 {
                // SAFETY: register j of the quants lies inside the block.
                let q = unsafe { _mm512_loadu_si512(base.add(QUANTS + j * REG) as *const _) };
                for (k, chain) in sums.iter_mut().enumerate() {
                    // SAFETY: i < x[k].unsigned.len() (asserted); bytes 4j..4j + 4.
                    let four = unsafe {
                        (x[k].unsigned.get_unchecked(i).q.as_ptr().add(4 * j) as *const i32)
                            .read_unaligned()
                    };
                    let c = &mut chain[j % chains];
                    *c = _mm512_dpbusd_epi32(*c, _mm512_set1_epi32(four), q);
                }
            }
            // SAFETY: the 16 f32 scales open the block.
            let scales = unsafe { _mm512_loadu_ps(base as *const f32) };
            for k in 0..T {
                let sum = _mm512_add_epi32(sums[k][0], sums[k][1]);
                // SAFETY: i < x[k].unsigned.len() (asserted).
                let d = unsafe { x[k].unsigned.get_unchecked(i).d };
                let s = _mm512_mul_ps(scales, _mm512_set1_ps(d));
                acc[k] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(sum), acc[k]);
            }
        }
        // SAFETY: `bias` is 16 floats.
        let bias = unsafe { _mm512_loadu_ps(bias.as_ptr()) };
        for (k, a) in acc.iter().enumerate() {
            // SAFETY: the caller guarantees 16 writable floats at `out + k * stride`.
            unsafe { _mm512_storeu_ps(out.add(k * stride), _mm512_add_ps(*a, bias)) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgmlType;
    use crate::quant::QMatrix;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 2.0
            })
            .collect()
    }

    /// The packed product equals the Q8_0 matrix product of the same weights (all CPU
    /// kernels, token counts around the group and tile sizes), and the scalar and AVX2 kernels
    /// agree bit for bit.
    #[test]
    fn packed_product_matches_the_q8_0_matrix() {
        let (rows, cols) = (48, 96);
        let w = values(rows * cols, 7);
        let packed = PackedQ8::from_f32(rows, cols, &w).expect("packs");
        let reference =
            QMatrix::from_bytes(GgmlType::Q8_0, rows, cols, quantize_q8_0(&w)).expect("q8_0");
        let pool = ThreadPool::new(3);
        for n in [1, 2, 3, 4, 5, 7, 8, 9, 33, 70] {
            let x = values(n * cols, n as u32);
            let mut want = vec![0.0; n * rows];
            reference.matmul(&x, n, &mut want, &pool);
            let mut by_isa = Vec::new();
            let isas = [Isa::Scalar, Isa::Avx2, Isa::Vnni];
            for isa in isas.into_iter().filter(|i| i.available()) {
                let mut got = vec![f32::NAN; n * rows];
                packed.matmul_with(isa, &x, n, &mut got, Epilogue::NONE, &pool);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "n {n} [{i}]: {a} vs {b}"
                    );
                }
                // The same product with a bias and GELU applied as it is written.
                let bias = values(rows, 99);
                let mut fused = vec![f32::NAN; n * rows];
                let epilogue = Epilogue {
                    bias: Some(&bias),
                    gelu: true,
                };
                packed.matmul_with(isa, &x, n, &mut fused, epilogue, &pool);
                for t in 0..n {
                    let mut row = got[t * rows..(t + 1) * rows].to_vec();
                    crate::llm::ops::add(&mut row, &bias);
                    crate::llm::ops::gelu(&mut row);
                    assert_eq!(
                        &fused[t * rows..(t + 1) * rows],
                        &row[..],
                        "{isa:?} n {n} t {t}"
                    );
                }
                by_isa.push(got);
            }
            for (isa, got) in isas.iter().zip(&by_isa).skip(1) {
                assert_eq!(&by_isa[0], got, "scalar and {isa:?} differ");
            }
        }
    }

    #[test]
    fn q8_0_blocks_round_trip_within_half_a_step() {
        let values: Vec<f32> = (0..64).map(|i| ((i * 37) % 29) as f32 - 14.5).collect();
        let bytes = quantize_q8_0(&values);
        assert_eq!(bytes.len(), 2 * 34);
        let m = QMatrix::from_bytes(GgmlType::Q8_0, 1, 64, bytes).expect("q8_0 matrix");
        let back = m.to_f32();
        for block in 0..2 {
            let amax = values[block * 32..][..32]
                .iter()
                .fold(0.0f32, |a, &x| a.max(x.abs()));
            for i in block * 32..(block + 1) * 32 {
                assert!(
                    (back[i] - values[i]).abs() <= amax / 127.0 * 0.51 + 1e-3,
                    "{i}: {} vs {}",
                    back[i],
                    values[i]
                );
            }
        }
        let zeros = quantize_q8_0(&[0.0; 32]);
        let m = QMatrix::from_bytes(GgmlType::Q8_0, 1, 32, zeros).expect("zero block");
        assert!(m.to_f32().iter().all(|&x| x == 0.0));
    }

    #[test]
    fn shapes_that_do_not_fit_are_refused() {
        assert!(matches!(
            PackedQ8::from_f32(24, 32, &[0.0; 768]),
            Err(PackError::Shape { .. })
        ));
        assert!(matches!(
            PackedQ8::from_f32(16, 48, &[0.0; 768]),
            Err(PackError::Shape { .. })
        ));
        assert!(matches!(
            PackedQ8::from_f32(16, 32, &[0.0; 511]),
            Err(PackError::Length { .. })
        ));
        let zero = PackedQ8::from_f32(16, 32, &[0.0; 512]).expect("packs");
        let mut y = [1.0f32; 16];
        zero.matmul(&[0.5; 32], 1, &mut y, &ThreadPool::new(1));
        assert_eq!(y, [0.0; 16]);
    }
}
