//! Prints the inference figures of the default models:
//!
//! ```text
//! GAIA_MODELS_DIR=/work/models-store cargo run --release -p gaia-inference --example llm_bench -- [cpu|wgpu|cuda|auto] [threads] [embed|batch|1b]
//! ```
//! With `embed`, only the embedder is measured. With `batch`, the Burn path (the GPU backends,
//! or Burn's CPU backend on `cpu`) decodes 1, 4 and 8 sequences one after the other and as one
//! batched step, side by side: the gain of continuous batching on that path. With `1b`, a
//! synthetic Llama-3.2-1B-shaped Q4_K model (written to the temp dir, then removed) is loaded
//! on the device: its weights' device memory against the file size, prefill and decode speed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use gaia_inference::bench::{bench_embed, bench_llm, peak_rss_bytes};
use gaia_inference::device::{Device, DeviceChoice};
use gaia_inference::llm::{CpuKernels, LlmModel, LlmOptions, Sequence};
use gaia_inference::sampling::argmax;

/// Decode steps measured per batch size.
const STEPS: usize = 16;

/// Aggregate decode tokens/s of `batch` sequences, stepped one after the other and together.
fn sequential_and_batched(model: &LlmModel, batch: usize) -> anyhow::Result<(f64, f64)> {
    let mut figures = [0.0; 2];
    for (together, figure) in [false, true].into_iter().zip(figures.iter_mut()) {
        let mut seqs: Vec<Sequence> = (0..batch).map(|_| model.new_sequence()).collect();
        let mut logits = vec![Vec::new(); batch];
        let mut next = vec![0u32; batch];
        for (i, seq) in seqs.iter_mut().enumerate() {
            let prompt: Vec<u32> = (0..16)
                .map(|t| 100 + (37 * (t + 16 * i as u32)) % 4000)
                .collect();
            seq.forward(&prompt, &mut logits[i])?;
            next[i] = argmax(&logits[i]).unwrap_or(0);
        }
        let t = Instant::now();
        for _ in 0..STEPS {
            let tokens: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            if together {
                let mut step: Vec<(&mut Sequence, &[u32])> = seqs
                    .iter_mut()
                    .zip(&tokens)
                    .map(|(seq, token)| (seq, &token[..]))
                    .collect();
                model.forward_batch(&mut step, &mut logits)?;
            } else {
                for ((seq, token), out) in seqs.iter_mut().zip(&tokens).zip(logits.iter_mut()) {
                    seq.forward(token, out)?;
                }
            }
            for (n, out) in next.iter_mut().zip(&logits) {
                *n = argmax(out).unwrap_or(0);
            }
        }
        *figure = (batch * STEPS) as f64 / t.elapsed().as_secs_f64();
    }
    Ok((figures[0], figures[1]))
}

/// Prints the Burn path's decode figures, one sequence at a time against batched steps.
fn bench_batch(path: &Path, device: &Device, threads: usize) -> anyhow::Result<()> {
    let options = LlmOptions {
        threads,
        cpu_kernels: CpuKernels::Burn,
        ..LlmOptions::default()
    };
    let model = LlmModel::load(path, device, &options)?;
    println!("burn path on {device:?}: aggregate decode tokens/s, {STEPS} steps");
    println!("batch   one at a time   batched   gain");
    for batch in [1, 4, 8] {
        let (alone, together) = sequential_and_batched(&model, batch)?;
        println!(
            "{batch:>5}   {alone:>13.1}   {together:>7.1}   {:>4.2}x",
            together / alone
        );
    }
    Ok(())
}

/// Prints the device memory and speed of a synthetic 1B-shaped Q4_K model.
fn bench_1b(device: &Device, threads: usize) -> anyhow::Result<()> {
    use gaia_inference::gguf::GgmlType;
    use gaia_inference::gguf::synth::{LlamaShape, write_llama};
    let path = std::env::temp_dir().join(format!("gaia-bench-1b-{}.gguf", std::process::id()));
    let t = Instant::now();
    let file_bytes = write_llama(&path, LlamaShape::LLAMA_1B, GgmlType::Q4K, 7)?;
    println!(
        "synthetic llama 1B, Q4_K: {:.1} MiB written in {:.1} s",
        file_bytes as f64 / f64::from(1 << 20),
        t.elapsed().as_secs_f64()
    );
    let result = (|| -> anyhow::Result<()> {
        let options = LlmOptions {
            threads,
            ..LlmOptions::default()
        };
        let t = Instant::now();
        let model = LlmModel::load(&path, device, &options)?;
        println!(
            "loaded on {} in {:.1} s",
            model.describe(),
            t.elapsed().as_secs_f64()
        );
        if let Some(bytes) = model.device_weight_bytes() {
            println!(
                "weights on the device: {:.1} MiB, {:.3}x the file",
                bytes as f64 / f64::from(1 << 20),
                bytes as f64 / file_bytes as f64
            );
        }
        let prompt: Vec<u32> = (0..64).map(|t| 100 + 37 * t).collect();
        let mut seq = model.new_sequence();
        let mut logits = Vec::new();
        let t = Instant::now();
        seq.forward(&prompt, &mut logits)?;
        println!(
            "prefill, 64 tokens: {:.1} tokens/s",
            64.0 / t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        for _ in 0..STEPS {
            let next = argmax(&logits).unwrap_or(0);
            seq.forward(&[next], &mut logits)?;
        }
        println!(
            "decode, {STEPS} tokens: {:.1} tokens/s",
            STEPS as f64 / t.elapsed().as_secs_f64()
        );
        println!(
            "KV cache of that sequence: {:.1} MiB",
            seq.cache_bytes() as f64 / f64::from(1 << 20)
        );
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    result
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let choice: DeviceChoice = args.next().as_deref().unwrap_or("cpu").parse()?;
    let threads: usize = args.next().as_deref().unwrap_or("2").parse()?;
    let models = PathBuf::from(
        std::env::var_os("GAIA_MODELS_DIR")
            .ok_or_else(|| anyhow::anyhow!("set GAIA_MODELS_DIR to the model store"))?,
    );
    let mode = args.next();
    let embed_only = mode.as_deref() == Some("embed");
    let device = choice.resolve()?;
    let chat_path = models.join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    if mode.as_deref() == Some("batch") {
        return bench_batch(&chat_path, &device, threads);
    }
    if mode.as_deref() == Some("1b") {
        return bench_1b(&device, threads);
    }
    if embed_only {
        let (embed, _embedder) = bench_embed(&models.join("all-minilm-l6-v2"), &device)?;
        println!("{embed}");
        return Ok(());
    }
    let (llm, chat_model) = bench_llm(&chat_path, &device, threads)?;
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
