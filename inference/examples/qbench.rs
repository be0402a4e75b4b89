//! Quantized kernel benchmark: µs per matrix-vector product and GB/s for the default model's
//! shapes, then the time of all the matrix products of one decode step and of a prefill of the
//! real model (matrix products only: no attention, norms or sampling).
//!
//! ```text
//! cargo run --release -p gaia-inference --example qbench [-- path/to/model.gguf] [--scalar | --avx2]
//! ```
//! Without a path the model is looked up in `$GAIA_MODELS_DIR` (a node model store).

use std::path::PathBuf;
use std::time::Duration;

use gaia_inference::gguf::{GgmlType, GgufFile};
use gaia_inference::quant::bench::{XorShift, matvec_report, time_per_call};
use gaia_inference::quant::{Isa, QMatrix, ThreadPool};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let isa = if args.iter().any(|a| a == "--scalar") {
        Isa::Scalar
    } else if args.iter().any(|a| a == "--avx2") {
        Isa::Avx2
    } else {
        Isa::detect()
    };
    let model = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("GAIA_MODELS_DIR").map(|d| {
                PathBuf::from(d).join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
            })
        });

    println!("kernels: {isa:?}");
    let shapes = [
        (576, 576, GgmlType::Q4_1),
        (1536, 576, GgmlType::Q4_1),
        (576, 1536, GgmlType::Q4_1),
        (49152, 576, GgmlType::Q8_0),
    ];
    for fig in matvec_report(&shapes, &[1, 2], isa, 128 << 20, Duration::from_millis(400)) {
        println!("{fig}");
    }

    let Some(path) = model else {
        println!("no model given and GAIA_MODELS_DIR unset: skipping the whole-model figures");
        return Ok(());
    };
    let file = GgufFile::open(&path)?;
    let mut mats = Vec::new();
    for t in file.tensors() {
        let is_linear = t.dims.len() == 2 && t.name.starts_with("blk.");
        if is_linear || t.name == "token_embd.weight" {
            mats.push(QMatrix::from_gguf(&file, t)?);
        }
    }
    let bytes: usize = mats.iter().map(|m| m.bytes().len()).sum();
    println!(
        "\n{}: {} matrices, {:.1} MB of weights",
        path.display(),
        mats.len(),
        bytes as f64 / 1e6
    );
    // The same matrices with their rows interleaved where the type allows (as the chat
    // engine loads them).
    let interleaved: Vec<QMatrix> = mats
        .iter()
        .map(|m| m.interleaved().unwrap_or_else(|| m.clone()))
        .collect();
    let mut rng = XorShift::new(3);
    for threads in [1, 2] {
        let pool = ThreadPool::new(threads);
        for n in [1usize, 8, 16, 128] {
            let xs: Vec<Vec<f32>> = mats
                .iter()
                .map(|m| (0..n * m.cols()).map(|_| rng.next_f32()).collect())
                .collect();
            let mut ys: Vec<Vec<f32>> = mats.iter().map(|m| vec![0f32; n * m.rows()]).collect();
            for (layout, set) in [("rows", &mats), ("interleaved", &interleaved)] {
                let secs = time_per_call(Duration::from_secs(2), || {
                    for ((m, x), y) in set.iter().zip(&xs).zip(ys.iter_mut()) {
                        m.matmul_with(isa, x, n, y, &pool);
                    }
                });
                println!(
                    "threads={threads} n={n:>3} {layout:>11}: {:>8.2} ms per step, {:>7.1} tokens/s from matrix products, {:>5.2} GB/s",
                    secs * 1e3,
                    n as f64 / secs,
                    bytes as f64 / secs / 1e9
                );
            }
        }
    }
    Ok(())
}
