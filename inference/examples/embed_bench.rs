//! The embedder on the peers' workload (what `gaia bench` prints for it), several times over,
//! for comparing changes on a noisy machine: each line is one run of 3 × 8 batches of 32
//! sentences and 20 single sentences.
//!
//! ```text
//! cargo run --release -p gaia-inference --example embed_bench -- path/to/all-minilm-l6-v2 [runs]
//! ```

use std::path::PathBuf;

use gaia_inference::bench::bench_embed;
use gaia_inference::device::Device;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: embed_bench MODEL_DIR [RUNS]")?);
    let runs: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(5);
    let mut rates = Vec::new();
    for run in 0..runs {
        let (figures, _) = bench_embed(&dir, &Device::Cpu)?;
        println!(
            "run {run}: batch of 32 {:.1} sentences/s, one sentence {:.2} ms",
            figures.sentences_per_s,
            figures.single_latency.as_secs_f64() * 1e3
        );
        rates.push(figures.sentences_per_s);
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "median {:.1} sentences/s (min {:.1}, max {:.1})",
        rates[rates.len() / 2],
        rates[0],
        rates[rates.len() - 1]
    );
    Ok(())
}
