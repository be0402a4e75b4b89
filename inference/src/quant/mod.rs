//! Quantized matrix kernels: weights stay in their GGUF encoding, in place in the file's
//! memory map, and are multiplied with activations without being dequantized to f32.
//!
//! Like ggml, an activation row is first quantized to 8 bits in blocks matching the weight
//! type (32 values for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, 256 for the K-quants); the dot products are
//! then integer multiply-adds per block, scaled in f32. Each weight byte is read once per
//! matrix-vector product; for several tokens (prefill) a weight block is decoded once and used
//! for up to four tokens, and tokens are processed in tiles so that a tile's activations stay
//! in cache. Rows are split across a persistent [`ThreadPool`].
//!
//! On x86_64 the AVX2 + FMA + F16C kernels are chosen at run time when the CPU has them
//! ([`Isa::detect`]); everywhere else (and on request, for tests) portable scalar kernels run.
//! F32, F16 and BF16 weights use f32 activations directly.

mod act;
#[cfg(target_arch = "x86_64")]
mod avx2;
pub mod bench;
mod packed;
mod pool;
mod rows8;
mod scalar;

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use memmap2::Mmap;

use crate::gguf::{GgmlType, GgufError, GgufFile, TensorInfo};
use act::{BlockQ8, BlockQ8K};
pub use packed::{Epilogue, PackError, PackedQ8, quantize_q8_0};
pub use pool::ThreadPool;

/// Which kernels to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust, any CPU.
    Scalar,
    /// x86_64 with AVX2, FMA and F16C.
    Avx2,
    /// [`Isa::Avx2`] plus AVX-512 F, VL and VNNI: `vpdpbusd` (four u8 × i8 products and their
    /// sum in one instruction, where AVX2 needs two multiplies and the 16-bit intermediate) on
    /// 256-bit registers, and on 512-bit ones in the embedder's kernel. Results are bit-identical to [`Isa::Avx2`]'s: no product sum of
    /// these kernels can saturate the 16-bit step.
    Vnni,
}

impl Isa {
    /// The fastest kernels this CPU supports (detected once, then cached).
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::sync::OnceLock;
            static DETECTED: OnceLock<Isa> = OnceLock::new();
            *DETECTED.get_or_init(|| {
                if Isa::Vnni.available() {
                    Isa::Vnni
                } else if Isa::Avx2.available() {
                    Isa::Avx2
                } else {
                    Isa::Scalar
                }
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Isa::Scalar
        }
    }

    /// Whether this CPU can run these kernels.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Vnni => {
                Isa::Avx2.available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Vnni => false,
        }
    }

    /// Whether these are x86 kernels (AVX2 at least).
    fn x86(self) -> bool {
        matches!(self, Isa::Avx2 | Isa::Vnni)
    }
}

/// Where a matrix's bytes live.
#[derive(Clone)]
enum Storage {
    /// A range of a GGUF file's memory map (zero-copy).
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    /// Bytes owned by the matrix.
    Owned(Arc<Vec<u8>>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            // In range: checked when the matrix was made.
            Storage::Mapped { map, start, len } => &map[*start..*start + *len],
            Storage::Owned(v) => v,
        }
    }
}

/// A weight matrix kept in its GGUF encoding. `rows` = output features (`dims[1]`),
/// `cols` = input features (`dims[0]`); row `r` is the contiguous bytes of output `r`.
#[derive(Clone)]
pub struct QMatrix {
    storage: Storage,
    dtype: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    /// How the bytes are laid out.
    layout: Layout,
}

/// The order of a matrix's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// The GGUF order: row after row.
    Rows,
    /// Eight rows interleaved block by block ([`QMatrix::interleaved`]).
    Rows8(rows8::Width),
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QMatrix")
            .field("dtype", &self.dtype)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("mapped", &self.is_mapped())
            .field("interleaved", &self.is_interleaved())
            .finish()
    }
}

/// How the activations of one product are encoded.
enum Acts {
    Q8(Vec<BlockQ8>),
    Q8K(Vec<BlockQ8K>),
    F32,
}

/// A pointer to the output, shared by the workers of one product.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the workers of one product write disjoint elements (each (token, row) pair belongs
// to exactly one work unit) and the pool joins them before `matmul` returns.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// Everything a kernel needs for one product.
struct Job<'a> {
    w: &'a [u8],
    row_bytes: usize,
    rows: usize,
    n: usize,
    x: &'a [f32],
    q8: &'a [BlockQ8],
    q8k: &'a [BlockQ8K],
    y: OutPtr,
}

/// Computes `y[t][r]` for rows `rows` and tokens `toks`.
type Kernel = unsafe fn(&Job<'_>, Range<usize>, Range<usize>);

/// Tokens per tile: a tile's quantized activations (at most ~1.1 bytes per value) stay in L2.
const TOKEN_TILE: usize = 32;
/// Tokens sharing one decode of a weight block: with AVX2's 16 vector registers, more
/// tokens' accumulators would spill.
const GROUP: usize = 4;
/// [`GROUP`] for the VNNI kernels, which have 32 registers (AVX-512 VL) and one instruction
/// per product where AVX2 has two: the decode of a block is then a larger share of the work.
#[cfg(target_arch = "x86_64")]
const VNNI_GROUP: usize = 8;

/// Generates a kernel driver: walks `rows` × `toks` in groups of up to [`GROUP`] tokens (or
/// the given group size, with the list of sizes to dispatch on) and calls the dot-product
/// function `$dot::<.., T>` for each row.
macro_rules! driver {
    ($(#[$attr:meta])* $name:ident, $acts:ident, $dot:path) => {
        driver!($(#[$attr])* $name, $acts, $dot, GROUP: [4 3 2]);
    };
    ($(#[$attr:meta])* $name:ident, $acts:ident, $dot:path, $max:ident: [$($g:literal)*]) => {
        $(#[$attr])*
        pub(super) unsafe fn $name(job: &Job<'_>, rows: Range<usize>, toks: Range<usize>) {
            $(#[$attr])*
            unsafe fn group<const T: usize>(job: &Job<'_>, rows: Range<usize>, t0: usize) {
                let acts = job.$acts;
                let stride = acts.len() / job.n;
                let x: [_; T] = std::array::from_fn(|k| &acts[(t0 + k) * stride..(t0 + k + 1) * stride]);
                for r in rows {
                    let w = &job.w[r * job.row_bytes..(r + 1) * job.row_bytes];
                    // SAFETY: the caller of the driver guarantees the CPU features of `$dot`.
                    #[allow(unused_unsafe)]
                    let out: [f32; T] = unsafe { $dot(w, x) };
                    for (k, v) in out.into_iter().enumerate() {
                        // SAFETY: (t0 + k) < n and r < rows, so the index is inside `y`
                        // (n * rows long); this (token, row) is written by this unit only.
                        unsafe { *job.y.0.add((t0 + k) * job.rows + r) = v };
                    }
                }
            }
            let mut t = toks.start;
            while t < toks.end {
                let nt = (toks.end - t).min($max);
                // SAFETY: same contract as this function.
                unsafe {
                    match nt {
                        $($g => group::<$g>(job, rows.clone(), t),)*
                        _ => group::<1>(job, rows.clone(), t),
                    }
                }
                t += nt;
            }
        }
    };
}

/// Scalar drivers.
mod scalar_drivers {
    use super::scalar::{self, *};
    use super::*;

    driver!(q4_0, q8, scalar::dot_block32::<Q4_0, T>);
    driver!(q4_1, q8, scalar::dot_block32::<Q4_1, T>);
    driver!(q5_0, q8, scalar::dot_block32::<Q5_0, T>);
    driver!(q5_1, q8, scalar::dot_block32::<Q5_1, T>);
    driver!(q8_0, q8, scalar::dot_block32::<Q8_0, T>);
    driver!(q2k, q8k, scalar::dot_k::<Q2K, T>);
    driver!(q3k, q8k, scalar::dot_k::<Q3K, T>);
    driver!(q4k, q8k, scalar::dot_k::<Q4K, T>);
    driver!(q5k, q8k, scalar::dot_k::<Q5K, T>);
    driver!(q6k, q8k, scalar::dot_k::<Q6K, T>);
    driver!(f32, x, scalar::dot_float::<0, T>);
    driver!(f16, x, scalar::dot_float::<1, T>);
    driver!(bf16, x, scalar::dot_float::<2, T>);
}

/// AVX2 drivers.
#[cfg(target_arch = "x86_64")]
mod avx2_drivers {
    use super::avx2;
    use super::scalar::*;
    use super::*;

    driver!(
        #[target_feature(enable = "avx2,fma,f16c")]
        q4_0,
        q8,
        avx2::dot_block32::<Q4_0, T, false>
    );
    driver!(
        #[target_feature(enable = "avx2,fma,f16c")]
        q4_1,
        q8,
        avx2::dot_block32::<Q4_1, T, false>
    );
    driver!(
        #[target_feature(enable = "avx2,fma,f16c")]
        q5_0,
        q8,
        avx2::dot_block32::<Q5_0, T, false>
    );
    driver!(
        #[target_feature(enable = "avx2,fma,f16c")]
        q5_1,
        q8,
        avx2::dot_block32::<Q5_1, T, false>
    );
    driver!(
        #[target_feature(enable = "avx2,fma,f16c")]
        q8_0,
        q8,
        avx2::dot_block32::<Q8_0, T, false>
    );
    driver!(
        #[target_feature(enable = "avx2,fma,f16c")]
        q2k,
        q8k,
        avx2::dot_q23k::<false, T>
    );
    driver!(
        #[target_feature(enable = "avx2,fma,f16c")]
        q3k,
        q8k,
        avx2::dot_q23k::<true, T>
    );
    driver!(
        #[target_feature(enable = "avx2,fma,f16c")]
        q4k,
        q8k,
        avx2::dot_q45k::<false, T>
    );
    driver!(
        #[target_feature(enable = "avx2,fma,f16c")]
        q5k,
        q8k,
        avx2::dot_q45k::<true, T>
    );
    driver!(
        #[target_feature(enable = "avx2,fma,f16c")]
        q6k,
        q8k,
        avx2::dot_q6k::<T>
    );
    driver!(
        #[target_feature(enable = "avx2,fma,f16c")]
        f32,
        x,
        avx2::dot_float::<0, T>
    );
    driver!(
        #[target_feature(enable = "avx2,fma,f16c")]
        f16,
        x,
        avx2::dot_float::<1, T>
    );
    driver!(
        #[target_feature(enable = "avx2,fma,f16c")]
        bf16,
        x,
        avx2::dot_float::<2, T>
    );
}

/// AVX-512 VNNI drivers, for the 32-element block types. (The K-quants fold their sub-block
/// scales into the 16-bit multiply, which `vpdpbusd` has no room for: they keep the AVX2
/// drivers.)
#[cfg(target_arch = "x86_64")]
mod vnni_drivers {
    use super::avx2;
    use super::scalar::*;
    use super::*;

    driver!(
        #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
        q4_0,
        q8,
        avx2::dot_block32::<Q4_0, T, true>,
        VNNI_GROUP: [8 7 6 5 4 3 2]
    );
    driver!(
        #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
        q4_1,
        q8,
        avx2::dot_block32::<Q4_1, T, true>,
        VNNI_GROUP: [8 7 6 5 4 3 2]
    );
    driver!(
        #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
        q5_0,
        q8,
        avx2::dot_block32::<Q5_0, T, true>,
        VNNI_GROUP: [8 7 6 5 4 3 2]
    );
    driver!(
        #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
        q5_1,
        q8,
        avx2::dot_block32::<Q5_1, T, true>,
        VNNI_GROUP: [8 7 6 5 4 3 2]
    );
    driver!(
        #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
        q8_0,
        q8,
        avx2::dot_block32::<Q8_0, T, true>,
        VNNI_GROUP: [8 7 6 5 4 3 2]
    );
}

/// The kernel for `dtype` on `isa`; `None` for types without kernels (rejected at
/// construction).
fn kernel(dtype: GgmlType, isa: Isa) -> Option<Kernel> {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Vnni {
        use vnni_drivers as v;
        let k: Option<Kernel> = match dtype {
            GgmlType::Q4_0 => Some(v::q4_0),
            GgmlType::Q4_1 => Some(v::q4_1),
            GgmlType::Q5_0 => Some(v::q5_0),
            GgmlType::Q5_1 => Some(v::q5_1),
            GgmlType::Q8_0 => Some(v::q8_0),
            _ => None,
        };
        if k.is_some() {
            return k;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if isa.x86() {
        use avx2_drivers as a;
        let k: Kernel = match dtype {
            GgmlType::Q4_0 => a::q4_0,
            GgmlType::Q4_1 => a::q4_1,
            GgmlType::Q5_0 => a::q5_0,
            GgmlType::Q5_1 => a::q5_1,
            GgmlType::Q8_0 => a::q8_0,
            GgmlType::Q2K => a::q2k,
            GgmlType::Q3K => a::q3k,
            GgmlType::Q4K => a::q4k,
            GgmlType::Q5K => a::q5k,
            GgmlType::Q6K => a::q6k,
            GgmlType::F32 => a::f32,
            GgmlType::F16 => a::f16,
            GgmlType::BF16 => a::bf16,
            _ => return None,
        };
        return Some(k);
    }
    let _ = isa;
    use scalar_drivers as s;
    let k: Kernel = match dtype {
        GgmlType::Q4_0 => s::q4_0,
        GgmlType::Q4_1 => s::q4_1,
        GgmlType::Q5_0 => s::q5_0,
        GgmlType::Q5_1 => s::q5_1,
        GgmlType::Q8_0 => s::q8_0,
        GgmlType::Q2K => s::q2k,
        GgmlType::Q3K => s::q3k,
        GgmlType::Q4K => s::q4k,
        GgmlType::Q5K => s::q5k,
        GgmlType::Q6K => s::q6k,
        GgmlType::F32 => s::f32,
        GgmlType::F16 => s::f16,
        GgmlType::BF16 => s::bf16,
        _ => return None,
    };
    Some(k)
}

/// Runs `f(tile, chunk)` once for every token tile and chunk of rows, on the pool's threads
/// (each takes the next unit until none is left), tile-major so that a tile's activations stay
/// in cache while all the row chunks go past; on the caller's thread alone when there is one
/// unit or one thread.
fn for_each_unit(pool: &ThreadPool, tiles: usize, chunks: usize, f: impl Fn(usize, usize) + Sync) {
    let units = tiles * chunks;
    let next = AtomicUsize::new(0);
    let work = |_share: usize| {
        loop {
            let u = next.fetch_add(1, Ordering::Relaxed);
            if u >= units {
                break;
            }
            f(u / chunks, u % chunks);
        }
    };
    if units == 1 || pool.threads() == 1 {
        work(0);
    } else {
        pool.run(&work);
    }
}

/// The activation encoding used with weights of type `dtype`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ActKind {
    Q8,
    Q8K,
    F32,
}

fn act_kind(dtype: GgmlType) -> ActKind {
    match dtype {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
            ActKind::Q8
        }
        GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => {
            ActKind::Q8K
        }
        _ => ActKind::F32,
    }
}

/// Quantizes `x` (`n` rows) for weights of activation kind `kind`, using the pool for large
/// inputs.
fn quantize_acts(kind: ActKind, x: &[f32], n: usize, isa: Isa, pool: &ThreadPool) -> Acts {
    let (parts, per_part) = split_rows(x.len(), n, pool);
    let cols = x.len().checked_div(n).unwrap_or(0);
    match kind {
        ActKind::F32 => Acts::F32,
        ActKind::Q8 => {
            let mut q = vec![BlockQ8::ZERO; x.len() / 32];
            let bpr = cols / 32;
            run_split(&mut q, per_part * bpr, parts, pool, |i, out| {
                let xs = &x[i * per_part * cols..][..out.len() * 32];
                quantize_q8(isa, xs, out);
            });
            Acts::Q8(q)
        }
        ActKind::Q8K => {
            let mut q = vec![BlockQ8K::ZERO; x.len() / 256];
            let bpr = cols / 256;
            run_split(&mut q, per_part * bpr, parts, pool, |i, out| {
                let xs = &x[i * per_part * cols..][..out.len() * 256];
                quantize_q8k(isa, xs, out);
            });
            Acts::Q8K(q)
        }
    }
}

/// How quantizing `n` rows (`values` in all) is split: into how many parts, of how many rows
/// each (one part for small inputs, where waking the other threads costs more than it saves).
fn split_rows(values: usize, n: usize, pool: &ThreadPool) -> (usize, usize) {
    /// Below this many values, quantizing on one thread is faster than waking the others.
    const PARALLEL_MIN: usize = 16 * 1024;
    let parts = if values >= PARALLEL_MIN {
        pool.threads().min(n)
    } else {
        1
    };
    (parts, n.div_ceil(parts.max(1)))
}

/// Runs `f(i, chunk_i)` over `chunk`-sized pieces of `out`, on the pool when `parts > 1`.
fn run_split<T: Send, F: Fn(usize, &mut [T]) + Sync>(
    out: &mut [T],
    chunk: usize,
    parts: usize,
    pool: &ThreadPool,
    f: F,
) {
    if parts <= 1 || chunk == 0 {
        f(0, out);
        return;
    }
    let pieces: Vec<std::sync::Mutex<&mut [T]>> =
        out.chunks_mut(chunk).map(std::sync::Mutex::new).collect();
    pool.run(&|share| {
        let mut i = share;
        while i < pieces.len() {
            if let Ok(mut p) = pieces[i].lock() {
                f(i, &mut p);
            }
            i += pool.threads();
        }
    });
}

fn quantize_q8(isa: Isa, x: &[f32], out: &mut [BlockQ8]) {
    #[cfg(target_arch = "x86_64")]
    if isa.x86() {
        // SAFETY: x86 kernels are only used when `available()` (checked by `matmul_with`).
        unsafe { act::avx2::quantize_q8(x, out) };
        return;
    }
    let _ = isa;
    act::quantize_q8_scalar(x, out);
}

fn quantize_q8k(isa: Isa, x: &[f32], out: &mut [BlockQ8K]) {
    #[cfg(target_arch = "x86_64")]
    if isa.x86() {
        // SAFETY: as in `quantize_q8`.
        unsafe { act::avx2::quantize_q8k(x, out) };
        return;
    }
    let _ = isa;
    act::quantize_q8k_scalar(x, out);
}

impl QMatrix {
    /// The weight matrix of tensor `info` of `file`, used in place (no copy).
    ///
    /// The tensor must be 2-D (`[cols, rows]`; a 1-D tensor is one row) of a type with
    /// kernels ([`GgmlType::SUPPORTED`]); for the K-quants `cols` must be a multiple of 256
    /// (checked at open), for the 32-block types of 32.
    pub fn from_gguf(file: &GgufFile, info: &TensorInfo) -> Result<QMatrix, GgufError> {
        let (cols, rows) = match info.dims[..] {
            [c] => (c, 1),
            [c, r] => (c, r),
            [c, r, 1] | [c, r, 1, 1] => (c, r),
            _ => {
                return Err(GgufError::BadShape {
                    name: info.name.clone(),
                    dims: info.dims.clone(),
                    expected: "a weight matrix must have 1 or 2 dimensions".to_owned(),
                });
            }
        };
        if !info.dtype.is_supported() {
            return Err(GgufError::UnsupportedType {
                what: format!("tensor '{}'", info.name),
                dtype: info.dtype,
            });
        }
        let bytes = file.tensor_bytes(info);
        let row_bytes = info.dtype.bytes_for(cols);
        let expected = row_bytes.and_then(|rb| rb.checked_mul(rows));
        let sizes = (
            usize::try_from(rows),
            usize::try_from(cols),
            row_bytes.map(usize::try_from),
        );
        let (Ok(rows), Ok(cols), Some(Ok(row_bytes))) = sizes else {
            return Err(GgufError::BadShape {
                name: info.name.clone(),
                dims: info.dims.clone(),
                expected: "a matrix that fits in this platform's address space".to_owned(),
            });
        };
        if expected != Some(bytes.len() as u64) {
            return Err(GgufError::BufferMismatch {
                dtype: info.dtype,
                n_bytes: bytes.len() as u64,
                n_elements: info.n_elements(),
            });
        }
        let map = file.mmap();
        // `bytes` is a subslice of `map` (tensor_bytes slices the same map).
        let start = bytes.as_ptr() as usize - map.as_ptr() as usize;
        #[cfg(unix)]
        {
            // Ask the kernel to read the weights in ahead of the first product; failure only
            // costs speed.
            let _ = map.advise_range(memmap2::Advice::WillNeed, start, bytes.len());
        }
        Ok(QMatrix {
            storage: Storage::Mapped {
                map,
                start,
                len: bytes.len(),
            },
            dtype: info.dtype,
            rows,
            cols,
            row_bytes,
            layout: Layout::Rows,
        })
    }

    /// A matrix of `rows` × `cols` elements of `dtype` from its encoded bytes (row-major, as
    /// in a GGUF file).
    pub fn from_bytes(
        dtype: GgmlType,
        rows: usize,
        cols: usize,
        bytes: Vec<u8>,
    ) -> Result<QMatrix, GgufError> {
        if !dtype.is_supported() {
            return Err(GgufError::UnsupportedType {
                what: "the matrix".to_owned(),
                dtype,
            });
        }
        let row_bytes = dtype.bytes_for(cols as u64);
        let total = row_bytes.and_then(|rb| rb.checked_mul(rows as u64));
        match (row_bytes, total) {
            (Some(rb), Some(t)) if t == bytes.len() as u64 => Ok(QMatrix {
                storage: Storage::Owned(Arc::new(bytes)),
                dtype,
                rows,
                cols,
                row_bytes: rb as usize,
                layout: Layout::Rows,
            }),
            _ => Err(GgufError::BufferMismatch {
                dtype,
                n_bytes: bytes.len() as u64,
                n_elements: (rows as u64).saturating_mul(cols as u64),
            }),
        }
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The weights' encoding.
    pub fn dtype(&self) -> GgmlType {
        self.dtype
    }

    /// The encoded bytes (`rows × row_bytes`), in the GGUF order unless the matrix is
    /// [interleaved](QMatrix::interleaved).
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    /// Whether the rows are interleaved ([`QMatrix::interleaved`]).
    pub fn is_interleaved(&self) -> bool {
        matches!(self.layout, Layout::Rows8(_))
    }

    /// A copy of this matrix with its rows interleaved eight at a time, or `None` for
    /// types without that layout (all but Q4_0, Q4_1 and Q8_0), row counts that are not a
    /// multiple of 8, and matrices already interleaved.
    ///
    /// The values are the same; products with several tokens are faster (each block's
    /// float work is shared by eight rows), and a token's result is the same alone or in
    /// any batch. It differs from the row layout's only in the order of float additions.
    pub fn interleaved(&self) -> Option<QMatrix> {
        if self.layout != Layout::Rows {
            return None;
        }
        let width = rows8::Width::of(self.dtype)?;
        let data = rows8::interleave(self.dtype, self.rows, self.cols, self.bytes())?;
        Some(QMatrix {
            storage: Storage::Owned(Arc::new(data)),
            dtype: self.dtype,
            rows: self.rows,
            cols: self.cols,
            row_bytes: self.row_bytes,
            layout: Layout::Rows8(width),
        })
    }

    /// Whether the bytes are used in place from a file's memory map.
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }

    /// `y[n × rows] = x[n × cols] · Wᵀ` (x row-major, `n` tokens), on the pool's threads with
    /// the fastest kernels of this CPU.
    ///
    /// # Panics
    /// If `x.len() != n * cols` or `y.len() != n * rows`.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32], pool: &ThreadPool) {
        self.matmul_with(Isa::detect(), x, n, y, pool);
    }

    /// [`QMatrix::matmul`] with the given kernels (for tests and benchmarks).
    ///
    /// # Panics
    /// If the shapes are wrong (as for `matmul`) or `isa` is not available on this CPU.
    pub fn matmul_with(&self, isa: Isa, x: &[f32], n: usize, y: &mut [f32], pool: &ThreadPool) {
        assert_eq!(
            x.len(),
            n * self.cols,
            "matmul: x has {} values, expected n ({n}) × cols ({})",
            x.len(),
            self.cols
        );
        assert_eq!(
            y.len(),
            n * self.rows,
            "matmul: y has {} values, expected n ({n}) × rows ({})",
            y.len(),
            self.rows
        );
        assert!(
            isa.available(),
            "matmul: {isa:?} kernels are not supported by this CPU"
        );
        if n == 0 || self.rows == 0 {
            return;
        }
        if self.cols == 0 {
            y.fill(0.0);
            return;
        }
        if let Layout::Rows8(width) = self.layout {
            let Acts::Q8(acts) = quantize_acts(ActKind::Q8, x, n, isa, pool) else {
                unreachable!("Q8 activations were asked for");
            };
            rows8::product(
                isa,
                width,
                self.bytes(),
                self.rows,
                self.cols,
                &acts,
                n,
                y,
                pool,
            );
            return;
        }
        let Some(kernel) = kernel(self.dtype, isa) else {
            // Unreachable: construction rejects types without kernels.
            y.fill(f32::NAN);
            return;
        };
        let acts = quantize_acts(act_kind(self.dtype), x, n, isa, pool);
        let (q8, q8k): (&[BlockQ8], &[BlockQ8K]) = match &acts {
            Acts::Q8(q) => (q, &[]),
            Acts::Q8K(q) => (&[], q),
            Acts::F32 => (&[], &[]),
        };
        let job = Job {
            w: self.bytes(),
            row_bytes: self.row_bytes,
            rows: self.rows,
            n,
            x,
            q8,
            q8k,
            y: OutPtr(y.as_mut_ptr()),
        };
        // Work units: token tiles × row chunks.
        let threads = pool.threads();
        let tiles = n.div_ceil(TOKEN_TILE);
        // About 8 chunks per thread per tile for balance, at least 16 rows, a multiple of 4.
        let target = self.rows.div_ceil(threads * 8).max(16).next_multiple_of(4);
        let chunk = target.min(self.rows);
        let chunks = self.rows.div_ceil(chunk);
        for_each_unit(pool, tiles, chunks, |tile, c| {
            let rows = c * chunk..((c + 1) * chunk).min(self.rows);
            let toks = tile * TOKEN_TILE..((tile + 1) * TOKEN_TILE).min(n);
            // SAFETY: `kernel` was chosen for `isa`, which is available (asserted above);
            // the job's slices have the sizes the kernels expect (x: n × cols, activations
            // n × cols / block, w: rows × row_bytes, y: n × rows).
            unsafe { kernel(&job, rows, toks) };
        });
    }

    /// Dequantizes row `row` into `out` (`cols` values), e.g. for an embedding lookup.
    ///
    /// # Panics
    /// If `row >= rows` or `out.len() != cols`.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(
            row < self.rows,
            "dequantize_row: row {row} out of range (rows = {})",
            self.rows
        );
        assert_eq!(
            out.len(),
            self.cols,
            "dequantize_row: out must hold cols values"
        );
        if let Layout::Rows8(width) = self.layout {
            rows8::dequantize_row(width, self.bytes(), self.cols, row, out);
            return;
        }
        let bytes = &self.bytes()[row * self.row_bytes..(row + 1) * self.row_bytes];
        // Sizes match by construction and the type is supported, so this cannot fail.
        if crate::gguf::dequantize(self.dtype, bytes, out).is_err() {
            out.fill(f32::NAN);
        }
    }

    /// The whole matrix as f32, row-major (`rows × cols`), e.g. for GPU backends.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.is_interleaved() {
            for (r, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
                self.dequantize_row(r, row);
            }
            return out;
        }
        if crate::gguf::dequantize(self.dtype, self.bytes(), &mut out).is_err() {
            out.fill(f32::NAN);
        }
        out
    }
}

#[cfg(test)]
mod tests;
