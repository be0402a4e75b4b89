//! Benchmark support for the quantized kernels: random but valid weights and a matrix-vector
//! timing report (µs per product, GB/s of weights read).
//!
//! The `qbench` example prints the report for the default model's shapes.

use std::time::{Duration, Instant};

use half::{bf16, f16};

use super::{Isa, QMatrix, ThreadPool};
use crate::gguf::GgmlType;

/// A small deterministic generator (xorshift64*), so benchmarks and tests need no `rand`.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A float uniform in `[-1, 1)`.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Encoded bytes of a random `rows × cols` matrix of `dtype`: random quants with scales of
/// sane size (|d| ≤ 0.05), as a real model's weights would have.
///
/// # Panics
/// If `dtype` is unsupported or `cols` is not a multiple of its block size.
pub fn random_weights(dtype: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    assert!(dtype.is_supported(), "no kernels for {dtype}");
    assert_eq!(
        cols % dtype.block_size(),
        0,
        "cols must be a multiple of the {dtype} block size"
    );
    let mut rng = XorShift::new(seed);
    let n_blocks = rows * cols / dtype.block_size();
    let size = dtype.type_size();
    let mut bytes = vec![0u8; n_blocks * size];
    let f16_bytes = |v: f32| f16::from_f32(v).to_bits().to_le_bytes();
    for b in bytes.chunks_exact_mut(size) {
        match dtype {
            GgmlType::F32 => b.copy_from_slice(&rng.next_f32().to_le_bytes()),
            GgmlType::F16 => b.copy_from_slice(&f16_bytes(rng.next_f32())),
            GgmlType::BF16 => {
                b.copy_from_slice(&bf16::from_f32(rng.next_f32()).to_bits().to_le_bytes())
            }
            _ => {
                for byte in b.iter_mut() {
                    *byte = rng.next_u64() as u8;
                }
                let scale_at: &[usize] = match dtype {
                    GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
                    GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
                    GgmlType::Q2K => &[80, 82],
                    GgmlType::Q3K => &[108],
                    _ => &[208],
                };
                for &at in scale_at {
                    let v = rng.next_f32() * 0.05;
                    b[at..at + 2].copy_from_slice(&f16_bytes(v));
                }
                if dtype == GgmlType::Q6K {
                    // Scales are i8; keep them moderate like real ones.
                    for s in &mut b[192..208] {
                        *s = ((rng.next_u64() % 128) as i8 - 64) as u8;
                    }
                }
            }
        }
    }
    bytes
}

/// A random matrix (see [`random_weights`]) owned in memory.
///
/// # Panics
/// As [`random_weights`].
pub fn random_matrix(dtype: GgmlType, rows: usize, cols: usize, seed: u64) -> QMatrix {
    match QMatrix::from_bytes(dtype, rows, cols, random_weights(dtype, rows, cols, seed)) {
        Ok(m) => m,
        Err(e) => panic!("random_weights made a bad matrix: {e}"),
    }
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct MatvecFigure {
    /// Weight type.
    pub dtype: GgmlType,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Pool threads.
    pub threads: usize,
    /// Kernels used.
    pub isa: Isa,
    /// Whether the weights were cycled through a working set larger than the caches (like a
    /// real decode step, which streams ~100 MB of weights) or stayed cache-resident.
    pub cold: bool,
    /// Microseconds per matrix-vector product.
    pub micros: f64,
    /// Weight bytes read per second, in GB/s (10⁹ bytes).
    pub gb_per_s: f64,
}

impl std::fmt::Display for MatvecFigure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>6} {:>6}x{:<5} threads={} {:?} {:<5} {:>9.1} µs/matvec {:>6.2} GB/s",
            self.dtype.name(),
            self.rows,
            self.cols,
            self.threads,
            self.isa,
            if self.cold { "cold" } else { "hot" },
            self.micros,
            self.gb_per_s
        )
    }
}

/// Times `f` until `budget` has passed (after a warm-up); returns seconds per call.
pub fn time_per_call(budget: Duration, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let start = Instant::now();
    let mut calls = 0u64;
    while start.elapsed() < budget || calls < 5 {
        f();
        calls += 1;
    }
    start.elapsed().as_secs_f64() / calls as f64
}

/// Times matrix-vector products (`n = 1`) of random matrices of each `(rows, cols, dtype)`
/// with each thread count, hot (one matrix, cache-resident when small) and cold (cycling
/// through copies totalling `cold_bytes`, so that every product reads from memory).
pub fn matvec_report(
    shapes: &[(usize, usize, GgmlType)],
    threads: &[usize],
    isa: Isa,
    cold_bytes: usize,
    budget: Duration,
) -> Vec<MatvecFigure> {
    let mut out = Vec::new();
    for &t in threads {
        let pool = ThreadPool::new(t);
        for &(rows, cols, dtype) in shapes {
            let copies = cold_bytes
                .div_ceil(rows * cols * dtype.type_size() / dtype.block_size())
                .max(1);
            let mats: Vec<QMatrix> = (0..copies)
                .map(|i| random_matrix(dtype, rows, cols, i as u64 + 1))
                .collect();
            let mut rng = XorShift::new(7);
            let x: Vec<f32> = (0..cols).map(|_| rng.next_f32()).collect();
            let mut y = vec![0f32; rows];
            let bytes = mats[0].bytes().len() as f64;
            for cold in [false, true] {
                let mut i = 0;
                let secs = time_per_call(budget, || {
                    let m = if cold {
                        &mats[i % mats.len()]
                    } else {
                        &mats[0]
                    };
                    i += 1;
                    m.matmul_with(isa, &x, 1, &mut y, &pool);
                });
                out.push(MatvecFigure {
                    dtype,
                    rows,
                    cols,
                    threads: t,
                    isa,
                    cold,
                    micros: secs * 1e6,
                    gb_per_s: bytes / secs / 1e9,
                });
            }
        }
    }
    out
}
