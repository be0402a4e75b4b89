//! Prints the inference figures of the default models:
//!
//! ```text
//! GAIA_MODELS_DIR=/work/models-store cargo run --release -p gaia-inference --example llm_bench -- [cpu|wgpu|cuda|auto] [threads] [embed]
//! ```
//! With `embed`, only the embedder is measured.

use std::path::PathBuf;

use gaia_inference::bench::{bench_embed, bench_llm, peak_rss_bytes};
use gaia_inference::device::DeviceChoice;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let choice: DeviceChoice = args.next().as_deref().unwrap_or("cpu").parse()?;
    let threads: usize = args.next().as_deref().unwrap_or("2").parse()?;
    let models = PathBuf::from(
        std::env::var_os("GAIA_MODELS_DIR")
            .ok_or_else(|| anyhow::anyhow!("set GAIA_MODELS_DIR to the model store"))?,
    );
    let embed_only = args.next().as_deref() == Some("embed");
    let device = choice.resolve()?;
    if embed_only {
        let (embed, _embedder) = bench_embed(&models.join("all-minilm-l6-v2"), &device)?;
        println!("{embed}");
        return Ok(());
    }
    let (llm, chat_model) = bench_llm(
        &models.join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"),
        &device,
        threads,
    )?;
    println!("{llm}");
    let rss_llm = peak_rss_bytes();
    let (embed, embedder) = bench_embed(&models.join("all-minilm-l6-v2"), &device)?;
    println!("{embed}");
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    if let Some(rss) = rss_llm {
        println!("peak rss, chat model alone      {:>8.1} MiB", mib(rss));
    }
    if let Some(rss) = peak_rss_bytes() {
        println!("peak rss, both models resident  {:>8.1} MiB", mib(rss));
    }
    drop((chat_model, embedder));
    Ok(())
}
