//! The HTTP API's overhead and throughput.
//!
//! 1. The engine alone: `gaia_inference` in this process, greedy, on the chat template of one
//!    user message: time to first token and decode tokens/s.
//! 2. The same prompt and `max_tokens` through a node's `/v1/chat/completions` (streaming):
//!    time to the first content chunk and tokens/s between the first and last chunk.
//! 3. Throughput with 1, 4 and 16 concurrent streaming clients: total completion tokens/s,
//!    request latency p50/p99, time to first token p50/p99, refusals (429/503).
//!
//! Without `--url` it starts `target/release/gaia start` itself (temporary data directory,
//! port 0, the models of `GAIA_MODELS_DIR`, no system prompt and no knowledge base so the prompt
//! is the engine's). Run:
//!
//! ```text
//! cargo build --release -p gaia-node --bin gaia --example api_bench
//! GAIA_MODELS_DIR=/path/to/store target/release/examples/api_bench
//! ```

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use gaia_inference::device::DeviceChoice;
use gaia_inference::generate::{ChatModel, GenerateEvent, GenerateRequest};
use gaia_inference::sampling::SamplingParams;
use gaia_inference::template::ChatMessage;
use serde_json::{Value, json};

/// Command-line options.
#[derive(Debug, Parser)]
#[command(about = "Time to first token and tokens/s through the HTTP API vs the engine alone")]
struct Args {
    /// A running node's base URL (e.g. http://127.0.0.1:8080); default: start one.
    #[arg(long)]
    url: Option<String>,
    /// The gaia binary to start [default: next to this example, ../gaia].
    #[arg(long)]
    gaia: Option<PathBuf>,
    /// The model store [default: $GAIA_MODELS_DIR].
    #[arg(long, env = "GAIA_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// The chat model's name.
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    /// The user message.
    #[arg(long, default_value = "Write a short story about a lighthouse keeper.")]
    prompt: String,
    /// Tokens per generation.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Repetitions of the single-stream measurements.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Requests per concurrency level.
    #[arg(long, default_value_t = 16)]
    requests: usize,
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    clients: Vec<usize>,
    /// Generations the started node runs at once (`server.workers`).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// CPU threads per generation.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Skip the engine-alone measurement.
    #[arg(long)]
    skip_engine: bool,
}

/// Figures of one streamed generation.
#[derive(Debug, Clone, Copy)]
struct Run {
    ttft: Duration,
    total: Duration,
    tokens: usize,
    prompt_tokens: usize,
}

impl Run {
    /// Decode speed: tokens after the first over the time after the first.
    fn decode_tps(&self) -> f64 {
        let decode = self.total.saturating_sub(self.ttft).as_secs_f64();
        if self.tokens > 1 && decode > 0.0 {
            (self.tokens - 1) as f64 / decode
        } else {
            0.0
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "prompt {:?}, max_tokens {}, greedy, {} repetition(s)",
        args.prompt, args.max_tokens, args.repeat
    );

    let mut engine_runs = Vec::new();
    if !args.skip_engine {
        let store = args
            .models_dir
            .as_deref()
            .context("no model store: set GAIA_MODELS_DIR or pass --models-dir")?;
        engine_runs = engine_alone(&args, store)?;
        report("engine alone (gaia_inference)", &engine_runs);
    }

    let (_node, url) = match &args.url {
        Some(url) => (None, url.trim_end_matches('/').to_string()),
        None => {
            let node = NodeProcess::start(&args)?;
            let url = node.url.clone();
            (Some(node), url)
        }
    };
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    // Warm up (first request pays lazy initialisation).
    stream_chat(&client, &url, &args, 4)?;
    let mut api_runs = Vec::new();
    for _ in 0..args.repeat {
        api_runs.push(stream_chat(&client, &url, &args, args.max_tokens)?);
    }
    report("HTTP API, 1 client (streaming)", &api_runs);
    if let (Some(e), Some(a)) = (median_run(&engine_runs), median_run(&api_runs)) {
        if e.prompt_tokens != a.prompt_tokens {
            println!(
                "  note: prompt tokens differ (engine {}, API {}): the node adds text to the prompt",
                e.prompt_tokens, a.prompt_tokens
            );
        }
        let ((e_ttft, e_tps), (a_ttft, a_tps)) = (medians(&engine_runs), medians(&api_runs));
        println!(
            "API overhead (medians): time to first token {:+.1} ms, decode {a_tps:.1} vs \
             {e_tps:.1} tokens/s ({:+.1}%)",
            a_ttft - e_ttft,
            (a_tps / e_tps - 1.0) * 100.0
        );
    }

    println!(
        "\n{:>7} {:>8} {:>9} {:>12} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "clients",
        "requests",
        "wall s",
        "tokens/s",
        "lat p50",
        "lat p99",
        "ttft p50",
        "ttft p99",
        "refused"
    );
    for &clients in &args.clients {
        concurrency(&client, &url, &args, clients.max(1))?;
    }
    Ok(())
}

fn engine_alone(args: &Args, store: &Path) -> anyhow::Result<Vec<Run>> {
    let dir = store.join(&args.model);
    let gguf = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "gguf"))
        .with_context(|| format!("no .gguf file in {}", dir.display()))?;
    let device = "auto".parse::<DeviceChoice>()?.resolve()?;
    let model = ChatModel::load(&gguf, &device, args.threads)
        .with_context(|| format!("loading {}", gguf.display()))?;
    let prompt = model.chat_prompt(&[ChatMessage::new("user", args.prompt.clone())])?;
    let once = |max_tokens: usize| -> anyhow::Result<Run> {
        let start = Instant::now();
        let mut first = None;
        let mut tokens = 0;
        let mut failure = None;
        let mut sink = |event: GenerateEvent| {
            match event {
                GenerateEvent::Token { .. } => {
                    tokens += 1;
                    if first.is_none() {
                        first = Some(start.elapsed());
                    }
                }
                GenerateEvent::Done { .. } => {}
                GenerateEvent::Error(e) => failure = Some(e),
            }
            true
        };
        model.generate(
            GenerateRequest {
                prompt: prompt.clone(),
                sampling: SamplingParams::greedy(),
                max_tokens: Some(max_tokens),
                ..GenerateRequest::default()
            },
            &mut sink,
        );
        if let Some(e) = failure {
            return Err(e.into());
        }
        Ok(Run {
            ttft: first.unwrap_or_default(),
            total: start.elapsed(),
            tokens,
            prompt_tokens: prompt.len(),
        })
    };
    once(4)?; // warm-up
    (0..args.repeat).map(|_| once(args.max_tokens)).collect()
}

/// One streamed chat completion; `Err` on anything but a clean stream.
fn stream_chat(
    client: &reqwest::blocking::Client,
    url: &str,
    args: &Args,
    max_tokens: usize,
) -> anyhow::Result<Run> {
    match stream_chat_status(client, url, args, max_tokens)? {
        Ok(run) => Ok(run),
        Err(status) => bail!("the node answered {status}"),
    }
}

/// One streamed chat completion; `Ok(Err(status))` when the node refused it.
fn stream_chat_status(
    client: &reqwest::blocking::Client,
    url: &str,
    args: &Args,
    max_tokens: usize,
) -> anyhow::Result<Result<Run, u16>> {
    let body = json!({
        "model": args.model,
        "messages": [{"role": "user", "content": args.prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let start = Instant::now();
    let response = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .context("sending a chat request")?;
    let status = response.status().as_u16();
    if status == 429 || status == 503 {
        return Ok(Err(status));
    }
    if status != 200 {
        let text = response.text().unwrap_or_default();
        bail!("the node answered {status}: {text}");
    }
    let mut first = None;
    let mut last = start.elapsed();
    let mut usage = None;
    let mut chunks = 0;
    let mut done = false;
    for line in BufReader::new(response).lines() {
        let line = line.context("reading the stream")?;
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let data = data.trim();
        if data == "[DONE]" {
            done = true;
            break;
        }
        let chunk: Value = serde_json::from_str(data).context("a stream chunk is not JSON")?;
        if let Some(error) = chunk.get("error") {
            bail!("the stream carried an error: {error}");
        }
        if chunk["usage"].is_object() {
            usage = Some(chunk["usage"].clone());
        }
        let has_content = chunk["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|s| !s.is_empty());
        if has_content {
            chunks += 1;
            let now = start.elapsed();
            if first.is_none() {
                first = Some(now);
            }
            last = now;
        }
    }
    if !done {
        bail!("the stream ended without [DONE]");
    }
    let usage = usage.context("no usage chunk although include_usage was set")?;
    let tokens = usage["completion_tokens"].as_u64().unwrap_or(chunks) as usize;
    Ok(Ok(Run {
        ttft: first.unwrap_or(last),
        total: last,
        tokens,
        prompt_tokens: usage["prompt_tokens"].as_u64().unwrap_or(0) as usize,
    }))
}

/// What one concurrent client saw: per request, the run and its latency, or the refusal status.
type ClientRuns = Vec<Result<(Run, Duration), u16>>;

fn concurrency(
    client: &reqwest::blocking::Client,
    url: &str,
    args: &Args,
    clients: usize,
) -> anyhow::Result<()> {
    let requests = args.requests.max(clients);
    let start = Instant::now();
    let results: Vec<anyhow::Result<ClientRuns>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let share = requests / clients + usize::from(c < requests % clients);
                scope.spawn(move || {
                    let mut out = Vec::new();
                    for _ in 0..share {
                        let t0 = Instant::now();
                        match stream_chat_status(client, url, args, args.max_tokens)? {
                            Ok(run) => out.push(Ok((run, t0.elapsed()))),
                            Err(status) => out.push(Err(status)),
                        }
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a client panicked")))
            })
            .collect()
    });
    let wall = start.elapsed();
    let mut runs = Vec::new();
    let mut refused = 0;
    for r in results {
        for outcome in r? {
            match outcome {
                Ok(x) => runs.push(x),
                Err(_) => refused += 1,
            }
        }
    }
    let tokens: usize = runs.iter().map(|(r, _)| r.tokens).sum();
    let mut latency: Vec<f64> = runs.iter().map(|(_, d)| d.as_secs_f64()).collect();
    let mut ttft: Vec<f64> = runs.iter().map(|(r, _)| r.ttft.as_secs_f64()).collect();
    println!(
        "{:>7} {:>8} {:>9.2} {:>12.1} {:>9.2}s {:>9.2}s {:>9.2}s {:>9.2}s {:>8}",
        clients,
        requests,
        wall.as_secs_f64(),
        tokens as f64 / wall.as_secs_f64(),
        percentile(&mut latency, 0.50),
        percentile(&mut latency, 0.99),
        percentile(&mut ttft, 0.50),
        percentile(&mut ttft, 0.99),
        refused
    );
    Ok(())
}

/// The `p` quantile (nearest rank) of `values`; 0 when empty.
fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

fn median_run(runs: &[Run]) -> Option<Run> {
    let mut sorted = runs.to_vec();
    sorted.sort_by_key(|r| r.total);
    sorted.get(sorted.len() / 2).copied()
}

/// Median time to first token (ms) and median decode tokens/s of `runs`.
fn medians(runs: &[Run]) -> (f64, f64) {
    let mut ttft: Vec<f64> = runs.iter().map(|r| r.ttft.as_secs_f64() * 1e3).collect();
    let mut tps: Vec<f64> = runs.iter().map(Run::decode_tps).collect();
    (percentile(&mut ttft, 0.5), percentile(&mut tps, 0.5))
}

fn report(what: &str, runs: &[Run]) {
    let Some(m) = median_run(runs) else { return };
    let mut ttft: Vec<f64> = runs.iter().map(|r| r.ttft.as_secs_f64() * 1e3).collect();
    let mut tps: Vec<f64> = runs.iter().map(Run::decode_tps).collect();
    println!(
        "{what}: prompt {} tokens, {} completion tokens; time to first token median {:.1} ms \
         (min {:.1}), decode median {:.1} tokens/s (max {:.1}), total {:.2} s",
        m.prompt_tokens,
        m.tokens,
        percentile(&mut ttft, 0.5),
        ttft.first().copied().unwrap_or(0.0),
        percentile(&mut tps, 0.5),
        tps.last().copied().unwrap_or(0.0),
        m.total.as_secs_f64()
    );
}

/// A `gaia start` this program started; killed on drop.
struct NodeProcess {
    child: Child,
    url: String,
    _data_dir: tempfile::TempDir,
}

impl NodeProcess {
    fn start(args: &Args) -> anyhow::Result<NodeProcess> {
        let gaia = match &args.gaia {
            Some(path) => path.clone(),
            None => std::env::current_exe()?
                .parent()
                .and_then(Path::parent)
                .map(|d| d.join("gaia"))
                .context("cannot locate the gaia binary; pass --gaia")?,
        };
        let models = args
            .models_dir
            .as_deref()
            .context("no model store: set GAIA_MODELS_DIR or pass --models-dir")?;
        let data_dir = tempfile::tempdir()?;
        // The node's store: one symlink per model file of the given store.
        for entry in std::fs::read_dir(models)? {
            let model = entry?.path();
            if !model.is_dir() {
                continue;
            }
            let name = model
                .file_name()
                .context("a model directory without a name")?;
            let dir = data_dir.path().join("models").join(name);
            std::fs::create_dir_all(&dir)?;
            for file in std::fs::read_dir(&model)? {
                let file = file?;
                std::os::unix::fs::symlink(file.path(), dir.join(file.file_name()))?;
            }
        }
        let mut child = Command::new(&gaia)
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(["--quiet", "start"])
            .env("GAIA_SERVER_HOST", "127.0.0.1")
            .env("GAIA_SERVER_PORT", "0")
            .env("GAIA_SERVER_WORKERS", args.workers.to_string())
            .env("GAIA_SERVER_QUEUE_DEPTH", "64")
            .env("GAIA_MODELS_THREADS", args.threads.to_string())
            .env("GAIA_AGENT_SYSTEM_PROMPT", "")
            .env("GAIA_KNOWLEDGE_ENABLED", "false")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", gaia.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.trim().strip_prefix("gaia: listening on ") {
                    let _ = tx.try_send(url.trim().trim_end_matches('/').to_string());
                }
            }
        });
        let mut node = NodeProcess {
            child,
            url: String::new(),
            _data_dir: data_dir,
        };
        node.url = rx
            .recv_timeout(Duration::from_secs(300))
            .context("the node did not print `gaia: listening on` within 300 s")?;
        println!("started {} at {}", gaia.display(), node.url);
        Ok(node)
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
