//! Kernel tests: every type's product against dequantize + f32 reference, both kernel sets,
//! odd shapes and token counts.

use super::bench::{XorShift, random_matrix};
use super::*;

/// `y_ref[t][r] = Σ_c w[r][c] x[t][c]` in f64, and the error allowed for each output:
/// the bound of 8-bit activation rounding (`Σ |w| · amax_block / 254`, zero for float weights
/// whose activations stay f32) plus 1e-5 of `Σ |w x|` for float summation, and `Σ |w x|`.
fn reference(m: &QMatrix, x: &[f32], n: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let w = m.to_f32();
    let (rows, cols) = (m.rows(), m.cols());
    let block = match act_kind(m.dtype()) {
        ActKind::Q8 => 32,
        ActKind::Q8K => 256,
        ActKind::F32 => 0,
    };
    let mut y = vec![0f64; n * rows];
    let mut allowed = vec![0f64; n * rows];
    let mut magnitude = vec![0f64; n * rows];
    for t in 0..n {
        let xt = &x[t * cols..(t + 1) * cols];
        let half_step: Vec<f64> = (0..cols)
            .map(|c| {
                if block == 0 {
                    return 0.0;
                }
                let b = &xt[c / block * block..(c / block + 1) * block];
                f64::from(b.iter().fold(0f32, |a, v| a.max(v.abs()))) / 254.0
            })
            .collect();
        for r in 0..rows {
            let (mut s, mut mag, mut q) = (0f64, 0f64, 0f64);
            for c in 0..cols {
                let wc = f64::from(w[r * cols + c]);
                let p = wc * f64::from(xt[c]);
                s += p;
                mag += p.abs();
                q += wc.abs() * half_step[c];
            }
            y[t * rows + r] = s;
            allowed[t * rows + r] = q * 1.001 + 1e-5 * mag + 1e-6;
            magnitude[t * rows + r] = mag;
        }
    }
    (y, allowed, magnitude)
}

fn activations(n: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = XorShift::new(seed);
    (0..n * cols)
        .map(|i| {
            // Mostly small values with an occasional outlier, as in real hidden states.
            let v = rng.next_f32();
            if i % 97 == 5 { v * 8.0 } else { v }
        })
        .collect()
}

fn isas() -> Vec<Isa> {
    let mut v = vec![Isa::Scalar];
    for isa in [Isa::Avx2, Isa::Vnni] {
        if isa.available() {
            v.push(isa);
        }
    }
    v
}

fn check(m: &QMatrix, n: usize, pool: &ThreadPool, isa: Isa, seed: u64) -> Vec<f32> {
    let x = activations(n, m.cols(), seed);
    let mut y = vec![f32::NAN; n * m.rows()];
    m.matmul_with(isa, &x, n, &mut y, pool);
    let (want, allowed, mag) = reference(m, &x, n);
    for (i, ((&got, &want), &allowed)) in y.iter().zip(&want).zip(&allowed).enumerate() {
        let err = (f64::from(got) - want).abs();
        assert!(
            err <= allowed,
            "{} {}x{} n={n} threads={} {isa:?}: y[{i}] = {got}, reference {want} (error {err}, \
             allowed {allowed})",
            m.dtype(),
            m.rows(),
            m.cols(),
            pool.threads(),
        );
    }
    // Typical error over the whole output relative to the size of the terms summed (Σ |w x|,
    // which unlike |y| does not vanish when terms cancel): the figure that matters for a model.
    // Meaningful once rows are long enough to average the rounding out.
    if m.cols() >= 256 {
        let num: f64 = y
            .iter()
            .zip(&want)
            .map(|(&a, &b)| (f64::from(a) - b).powi(2))
            .sum();
        let den: f64 = mag.iter().map(|b| b * b).sum();
        let rel = (num / den.max(1e-30)).sqrt();
        assert!(
            rel <= 1e-2,
            "{} n={n} {isa:?}: relative rms error {rel}",
            m.dtype()
        );
    }
    y
}

#[test]
fn every_type_matches_the_reference_on_odd_shapes() {
    let pools = [ThreadPool::new(1), ThreadPool::new(2), ThreadPool::new(3)];
    for dtype in GgmlType::SUPPORTED {
        let block = dtype.block_size().max(32);
        let mut shapes = vec![(1, block), (3, 2 * block), (37, 3 * block), (70, block)];
        if dtype.block_size() == 1 {
            // Float rows: an odd number of 8-wide groups, and a tail shorter than 8.
            shapes.extend([(5, 40), (3, 43), (2, 7)]);
        }
        for (rows, cols) in shapes {
            let m = random_matrix(dtype, rows, cols, (rows * 31 + cols) as u64);
            for n in 1..=9 {
                let pool = &pools[n % 3];
                let mut outs = Vec::new();
                for isa in isas() {
                    outs.push(check(&m, n, pool, isa, n as u64));
                }
                // Scalar and SIMD agree much more closely than either with the f32 reference:
                // same 8-bit activations, same integer sums; only float order differs.
                let (a, simd) = outs.split_first().expect("scalar always runs");
                for b in simd {
                    for (x, y) in a.iter().zip(b) {
                        assert!(
                            (x - y).abs() <= 1e-4 * x.abs().max(1.0),
                            "{dtype}: scalar {x} vs simd {y}"
                        );
                    }
                }
                // AVX2 and VNNI compute the same integer sums in the same float order.
                if let [avx2, vnni] = simd {
                    assert_eq!(avx2, vnni, "{dtype} n={n}: AVX2 and VNNI differ");
                }
            }
        }
    }
}

#[test]
fn many_tokens_cross_tiles_and_groups() {
    let pool = ThreadPool::new(2);
    for dtype in [
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
        GgmlType::F16,
    ] {
        let m = random_matrix(dtype, 45, 512, 3);
        for n in [TOKEN_TILE - 1, TOKEN_TILE + 5, 2 * TOKEN_TILE + 3] {
            for isa in isas() {
                check(&m, n, &pool, isa, 11);
            }
        }
    }
}

#[test]
fn a_token_row_gives_the_same_result_alone_or_in_a_batch() {
    let pool = ThreadPool::new(2);
    for dtype in GgmlType::SUPPORTED {
        let m = random_matrix(dtype, 33, 256, 9);
        // More than one group of the widest kernel, and a partial one.
        let n = 11;
        let x = activations(n, m.cols(), 4);
        for isa in isas() {
            let mut batch = vec![0f32; n * m.rows()];
            m.matmul_with(isa, &x, n, &mut batch, &pool);
            for t in 0..n {
                let mut one = vec![0f32; m.rows()];
                m.matmul_with(
                    isa,
                    &x[t * m.cols()..(t + 1) * m.cols()],
                    1,
                    &mut one,
                    &pool,
                );
                assert_eq!(
                    &batch[t * m.rows()..(t + 1) * m.rows()],
                    &one[..],
                    "{dtype} {isa:?} token {t}"
                );
            }
        }
    }
}

/// The interleaved layout: the same values as the GGUF rows, every kernel within the
/// reference's bounds, scalar, AVX2 and VNNI identical to the bit, and a token's result the
/// same alone or in any batch (1 to 9 tokens: every group size of every kernel, and a tile
/// and a half).
#[test]
fn interleaved_rows_match_the_reference_and_agree_bit_for_bit() {
    let pools = [ThreadPool::new(1), ThreadPool::new(2), ThreadPool::new(3)];
    for dtype in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
        for (rows, cols) in [(8, 32), (24, 96), (64, 576)] {
            let rowwise = random_matrix(dtype, rows, cols, (rows + cols) as u64);
            let m = rowwise.interleaved().expect("these types interleave");
            assert!(m.is_interleaved() && !rowwise.is_interleaved());
            assert!(m.interleaved().is_none(), "interleaving twice");
            assert_eq!(
                m.bytes().len(),
                rows * cols / 32 * dtype.type_size().max(20)
            );
            assert_eq!(m.to_f32(), rowwise.to_f32(), "{dtype} values changed");
            let mut row = vec![0f32; cols];
            let mut want = vec![0f32; cols];
            for r in [0, 5, rows - 1] {
                m.dequantize_row(r, &mut row);
                rowwise.dequantize_row(r, &mut want);
                assert_eq!(row, want, "{dtype} row {r}");
            }
            for n in (1..=9).chain([TOKEN_TILE + 17]) {
                let pool = &pools[n % 3];
                let outs: Vec<Vec<f32>> = isas()
                    .into_iter()
                    .map(|isa| check(&m, n, pool, isa, n as u64))
                    .collect();
                for (isa, out) in isas().iter().zip(&outs) {
                    assert_eq!(
                        out, &outs[0],
                        "{dtype} {rows}x{cols} n={n}: {isa:?} vs scalar"
                    );
                }
                let x = activations(n, cols, n as u64);
                for isa in isas() {
                    for t in [0, n - 1] {
                        let mut one = vec![0f32; rows];
                        m.matmul_with(isa, &x[t * cols..(t + 1) * cols], 1, &mut one, pool);
                        assert_eq!(
                            &outs[0][t * rows..(t + 1) * rows],
                            &one[..],
                            "{dtype} {isa:?} n={n} token {t}: alone and batched differ"
                        );
                    }
                }
            }
        }
    }
    // Other types and row counts keep the row layout.
    assert!(
        random_matrix(GgmlType::Q4K, 8, 256, 1)
            .interleaved()
            .is_none()
    );
    assert!(
        random_matrix(GgmlType::Q4_1, 12, 64, 1)
            .interleaved()
            .is_none()
    );
}

#[test]
fn dequantize_row_and_to_f32_agree() {
    for dtype in GgmlType::SUPPORTED {
        let m = random_matrix(dtype, 5, 256, 1);
        let all = m.to_f32();
        let mut row = vec![0f32; 256];
        for r in 0..5 {
            m.dequantize_row(r, &mut row);
            assert_eq!(&all[r * 256..(r + 1) * 256], &row[..]);
        }
    }
}

#[test]
fn zero_activations_and_empty_shapes() {
    let pool = ThreadPool::new(2);
    let m = random_matrix(GgmlType::Q4_1, 8, 64, 1);
    let mut y = vec![1f32; 8];
    m.matmul(&[0.0; 64], 1, &mut y, &pool);
    assert!(y.iter().all(|&v| v == 0.0), "{y:?}");
    let mut y: Vec<f32> = vec![];
    m.matmul(&[], 0, &mut y, &pool);
}

#[test]
fn from_bytes_rejects_bad_sizes_and_types() {
    assert!(QMatrix::from_bytes(GgmlType::Q4_0, 2, 32, vec![0; 36]).is_ok());
    assert!(matches!(
        QMatrix::from_bytes(GgmlType::Q4_0, 2, 32, vec![0; 35]),
        Err(GgufError::BufferMismatch { .. })
    ));
    assert!(QMatrix::from_bytes(GgmlType::Q4_0, 1, 33, vec![0; 18]).is_err());
    let err = QMatrix::from_bytes(GgmlType::IQ4_NL, 1, 32, vec![0; 18]).unwrap_err();
    assert!(err.to_string().contains("IQ4_NL"), "{err}");
}

#[test]
#[should_panic(expected = "matmul: x has")]
fn wrong_shapes_panic_with_a_message() {
    let m = random_matrix(GgmlType::Q8_0, 2, 32, 1);
    m.matmul(&[0.0; 31], 1, &mut [0.0; 2], &ThreadPool::new(1));
}

#[test]
fn real_model_matrices_are_zero_copy_and_correct() {
    let path = crate::gguf::tests::default_model_path();
    let file = GgufFile::open(&path).unwrap();
    let pool = ThreadPool::new(2);
    for name in [
        "blk.0.ffn_down.weight",
        "blk.0.attn_k.weight",
        "token_embd.weight",
    ] {
        let info = file.tensor(name).unwrap();
        let m = QMatrix::from_gguf(&file, info).unwrap();
        assert!(m.is_mapped());
        assert_eq!(
            (m.cols() as u64, m.rows() as u64),
            (info.dims[0], info.dims[1])
        );
        assert_eq!(
            m.bytes().as_ptr(),
            file.tensor_bytes(info).as_ptr(),
            "{name} was copied"
        );
        let mut row = vec![0f32; m.cols()];
        m.dequantize_row(m.rows() - 1, &mut row);
        let all = file.dequantize(info).unwrap();
        assert_eq!(&all[all.len() - m.cols()..], &row[..]);
        if m.rows() <= 1536 {
            for isa in isas() {
                check(&m, 3, &pool, isa, 5);
            }
        } else {
            // The LM head: check a slice of rows against the reference only.
            let x = activations(1, m.cols(), 8);
            let mut y = vec![0f32; m.rows()];
            m.matmul(&x, 1, &mut y, &pool);
            for r in (0..m.rows()).step_by(997) {
                let w = &all[r * m.cols()..(r + 1) * m.cols()];
                let want: f64 = w
                    .iter()
                    .zip(&x)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                let mag: f64 = w
                    .iter()
                    .zip(&x)
                    .map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs())
                    .sum();
                assert!(
                    (f64::from(y[r]) - want).abs() <= 1e-2 * mag,
                    "row {r}: {} vs {want}",
                    y[r]
                );
            }
        }
    }
    let norm = file.tensor("output_norm.weight").unwrap();
    assert!(
        QMatrix::from_gguf(&file, norm).is_ok(),
        "1-D tensors are one-row matrices"
    );
}
