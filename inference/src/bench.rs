//! Performance measurements of the chat model and the embedder (what `gaia bench` prints).
//!
//! Figures: load time, prefill throughput on a 512-token prompt, decode throughput (128 tokens
//! after a short prompt, and 128 tokens after 512 tokens of context), time to the first token
//! of a chat request, batched decode, aggregate tokens/s and latency under concurrent chat
//! clients, embeddings per second at batch 32 and the latency of one sentence, and the
//! process's peak resident memory.

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::device::Device;
use crate::embed::{EmbedError, Embedder};
use crate::generate::{
    ChatModel, EventSink, GenerateError, GenerateEvent, GenerateRequest, Generation, step_together,
};
use crate::llm::LlmOptions;
use crate::sampling::{SamplingParams, argmax};
use crate::template::ChatMessage;

/// Prompt length of the prefill measurement.
pub const PREFILL_TOKENS: usize = 512;
/// Tokens decoded per decode measurement.
pub const DECODE_TOKENS: usize = 128;

/// Figures of the chat model.
#[derive(Clone, Debug)]
pub struct LlmBench {
    /// Where it ran.
    pub device: String,
    /// Threads of the CPU kernels.
    pub threads: usize,
    /// Opening the file and preparing the weights.
    pub load: Duration,
    /// Size of the GGUF file.
    pub file_bytes: u64,
    /// Bytes the weights take on the device (the Burn path: wgpu, CUDA); `None` on the CPU
    /// kernels' path, whose weights are the mapped file.
    pub device_weight_bytes: Option<usize>,
    /// Bytes of the KV cache of one sequence after 512 tokens and the decode that follows.
    pub cache_bytes_at_512: usize,
    /// Prefill throughput on a 512-token prompt, tokens/s.
    pub prefill_tps: f64,
    /// Decode throughput for 128 tokens after a 16-token prompt, tokens/s.
    pub decode_tps: f64,
    /// Decode throughput for 128 tokens after 512 tokens of context, tokens/s.
    pub decode_tps_at_512: f64,
    /// Time to the first streamed token of a short chat request.
    pub ttft: Duration,
    /// Aggregate decode throughput of [`BATCH_SIZES`] sequences stepped together (continuous
    /// batching), each 64 tokens after its own 16-token prompt, tokens/s.
    pub batched_decode_tps: Vec<(usize, f64)>,
    /// Chat requests from concurrent clients, as a node serves them (see [`LevelFigures`]).
    pub concurrency: Vec<LevelFigures>,
}

/// Concurrent clients of the concurrency measurement: the load of the peers' script
/// (`../shared/peers/concurrency.py`) run in-process. Each client sends its next request when
/// the last one ends, `2 x clients` requests in all, each a distinct chat prompt ("Write a long
/// story about lighthouse keeper number i."), greedy, at most 64 tokens. As in a node with its
/// defaults: at most [`CONCURRENCY_BATCH`] generations run together (continuous batching), the
/// others wait, and finished requests' state goes to a prefix cache.
pub const CONCURRENCY_LEVELS: [usize; 4] = [1, 4, 8, 16];
/// Generations run together in the concurrency measurement (a node's `server.batch_size`).
pub const CONCURRENCY_BATCH: usize = 16;
/// Tokens each request of the concurrency measurement generates at most.
const CONCURRENCY_TOKENS: usize = 64;

/// Figures of one concurrency level.
#[derive(Clone, Debug)]
pub struct LevelFigures {
    /// Concurrent clients.
    pub clients: usize,
    /// Requests sent.
    pub requests: usize,
    /// Tokens generated, all requests together.
    pub tokens: usize,
    /// Aggregate tokens/s over the level's wall time.
    pub tokens_per_s: f64,
    /// Median request latency (from sent to last token, waiting included).
    pub p50: Duration,
    /// 99th percentile request latency.
    pub p99: Duration,
}

/// Batch sizes of the batched decode measurement.
pub const BATCH_SIZES: [usize; 4] = [1, 4, 8, 16];
/// Tokens each sequence decodes in the batched measurement.
const BATCHED_DECODE_TOKENS: usize = 64;

/// Figures of the embedder.
#[derive(Clone, Debug)]
pub struct EmbedBench {
    /// Loading the weights.
    pub load: Duration,
    /// Throughput at batch 32 on the peers' sentences of about 40 tokens, sentences/s (the
    /// median of 3 rounds).
    pub sentences_per_s: f64,
    /// Latency of embedding one of those sentences (the median of 20).
    pub single_latency: Duration,
}

impl fmt::Display for LlmBench {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "chat model on {} ({} threads)",
            self.device, self.threads
        )?;
        writeln!(f, "  load time             {:>8.1} ms", ms(self.load))?;
        let mib = |b: f64| b / (1u64 << 20) as f64;
        if let Some(bytes) = self.device_weight_bytes {
            writeln!(
                f,
                "  weights on device     {:>8.1} MiB ({:.2}x the {:.1} MiB file)",
                mib(bytes as f64),
                bytes as f64 / self.file_bytes.max(1) as f64,
                mib(self.file_bytes as f64)
            )?;
        }
        writeln!(
            f,
            "  KV cache at 640 ctx   {:>8.1} MiB per sequence",
            mib(self.cache_bytes_at_512 as f64)
        )?;
        writeln!(
            f,
            "  prefill (512 tokens)  {:>8.1} tokens/s",
            self.prefill_tps
        )?;
        writeln!(
            f,
            "  decode (128 tokens)   {:>8.1} tokens/s",
            self.decode_tps
        )?;
        writeln!(
            f,
            "  decode after 512 ctx  {:>8.1} tokens/s",
            self.decode_tps_at_512
        )?;
        write!(f, "  time to first token   {:>8.1} ms", ms(self.ttft))?;
        for (batch, tps) in &self.batched_decode_tps {
            write!(
                f,
                "\n  decode, batch of {batch:<3}  {tps:>8.1} tokens/s (all sequences together)"
            )?;
        }
        for level in &self.concurrency {
            write!(
                f,
                "\n  {:>2} clients            {:>8.1} tokens/s, latency p50 {:.2} s, p99 {:.2} s \
                 ({} requests, {} tokens)",
                level.clients,
                level.tokens_per_s,
                level.p50.as_secs_f64(),
                level.p99.as_secs_f64(),
                level.requests,
                level.tokens
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for EmbedBench {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "embedder")?;
        writeln!(f, "  load time             {:>8.1} ms", ms(self.load))?;
        writeln!(
            f,
            "  batch of 32           {:>8.1} sentences/s",
            self.sentences_per_s
        )?;
        write!(
            f,
            "  one sentence          {:>8.2} ms",
            ms(self.single_latency)
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A text of well over 512 tokens for the prefill measurement.
fn long_text() -> String {
    let paragraph = "The history of computing is a story of abstraction layered upon abstraction. \
        Early machines were programmed by physically rewiring circuits, and every new problem \
        demanded a new arrangement of cables and switches. The stored-program concept changed \
        that: instructions became data, kept in the same memory as the numbers they manipulated. \
        Assemblers translated mnemonic codes into binary, compilers translated structured \
        languages into assembly, and operating systems hid the details of disks, terminals and \
        printers behind uniform interfaces. ";
    paragraph.repeat(8)
}

/// Measures the chat model at `path` on `device` with `threads` CPU threads; returns the
/// loaded model too, so that a caller can measure memory with several models resident.
pub fn bench_llm(
    path: &Path,
    device: &Device,
    threads: usize,
) -> Result<(LlmBench, ChatModel), GenerateError> {
    let started = Instant::now();
    let model = ChatModel::load_with(
        path,
        device,
        &LlmOptions {
            threads,
            ..LlmOptions::default()
        },
    )?;
    let load = started.elapsed();
    let mut prompt = model.tokenizer().encode(&long_text(), false)?;
    prompt.truncate(PREFILL_TOKENS);
    let vocab = model.model().config().vocab_size;

    // Warm-up: page in the weights, size the buffers.
    let mut logits = Vec::with_capacity(vocab);
    let mut seq = model.model().new_sequence();
    seq.forward(&prompt[..32.min(prompt.len())], &mut logits)?;
    seq.forward(&[argmax(&logits).unwrap_or(0)], &mut logits)?;

    let decode =
        |seq: &mut crate::llm::Sequence, logits: &mut Vec<f32>| -> Result<f64, GenerateError> {
            let t = Instant::now();
            for _ in 0..DECODE_TOKENS {
                let next = argmax(logits).unwrap_or(0);
                seq.forward(&[next], logits)?;
            }
            Ok(DECODE_TOKENS as f64 / t.elapsed().as_secs_f64())
        };

    let mut seq = model.model().new_sequence();
    seq.forward(&prompt[..16.min(prompt.len())], &mut logits)?;
    let decode_tps = decode(&mut seq, &mut logits)?;

    let mut seq = model.model().new_sequence();
    let t = Instant::now();
    seq.forward(&prompt, &mut logits)?;
    let prefill_tps = prompt.len() as f64 / t.elapsed().as_secs_f64();
    let decode_tps_at_512 = decode(&mut seq, &mut logits)?;
    let cache_bytes_at_512 = seq.cache_bytes();
    drop(seq);

    let request = GenerateRequest {
        prompt: model.chat_prompt(&[ChatMessage::new("user", "What is the capital of France?")])?,
        sampling: SamplingParams::greedy(),
        max_tokens: Some(1),
        ..GenerateRequest::default()
    };
    let t = Instant::now();
    let mut ttft = None;
    let mut failure = None;
    model.generate(request, &mut |event: GenerateEvent| {
        match event {
            GenerateEvent::Token { .. } => {
                ttft.get_or_insert_with(|| t.elapsed());
            }
            GenerateEvent::Error(e) => failure = Some(e),
            GenerateEvent::Done { .. } => {}
        }
        true
    });
    if let Some(e) = failure {
        return Err(e);
    }
    let mut batched_decode_tps = Vec::new();
    for batch in BATCH_SIZES {
        batched_decode_tps.push((batch, batched_decode(&model, &prompt, batch)?));
    }
    let mut concurrency = Vec::new();
    let served = model.with_prefix_cache(256 << 20);
    concurrency_level(&served, 1, 0)?; // warm-up
    for (level, clients) in CONCURRENCY_LEVELS.into_iter().enumerate() {
        // Distinct prompts at every level: the cache holds what they share, not repeats.
        concurrency.push(concurrency_level(&served, clients, 100 * (level + 1))?);
    }
    let figures = LlmBench {
        device: model.model().describe(),
        threads,
        load,
        file_bytes: std::fs::metadata(path).map_or(0, |m| m.len()),
        device_weight_bytes: model.model().device_weight_bytes(),
        cache_bytes_at_512,
        prefill_tps,
        decode_tps,
        decode_tps_at_512,
        ttft: ttft.unwrap_or_else(|| t.elapsed()),
        batched_decode_tps,
        concurrency,
    };
    Ok((figures, model))
}

/// Counts a request's tokens and keeps its error.
#[derive(Default)]
struct Tally {
    tokens: usize,
    error: Option<GenerateError>,
}

impl EventSink for Tally {
    fn send_event(&mut self, event: GenerateEvent) -> bool {
        match event {
            GenerateEvent::Token { .. } => self.tokens += 1,
            GenerateEvent::Error(e) => self.error = Some(e),
            GenerateEvent::Done { .. } => {}
        }
        true
    }
}

/// One level of the concurrency measurement (see [`CONCURRENCY_LEVELS`]).
fn concurrency_level(
    model: &ChatModel,
    clients: usize,
    first: usize,
) -> Result<LevelFigures, GenerateError> {
    let total = 2 * clients;
    let request = |i: usize| -> Result<GenerateRequest, GenerateError> {
        let content = format!(
            "Write a long story about lighthouse keeper number {}.",
            first + i
        );
        Ok(GenerateRequest {
            prompt: model.chat_prompt(&[ChatMessage::new("user", &content)])?,
            sampling: SamplingParams::greedy(),
            max_tokens: Some(CONCURRENCY_TOKENS),
            ..GenerateRequest::default()
        })
    };
    let started = Instant::now();
    let mut waiting: std::collections::VecDeque<(usize, Instant)> =
        (0..clients).map(|i| (i + 1, started)).collect();
    let mut sent = clients;
    let mut running: Vec<(Generation, Tally, Instant)> = Vec::new();
    let mut latencies = Vec::with_capacity(total);
    let mut tokens = 0;
    let mut logits = Vec::new();
    loop {
        while running.len() < CONCURRENCY_BATCH
            && let Some((i, at)) = waiting.pop_front()
        {
            running.push((Generation::start(model, request(i)?)?, Tally::default(), at));
        }
        if running.is_empty() {
            break;
        }
        let mut batch: Vec<(&mut Generation, &mut dyn EventSink)> = running
            .iter_mut()
            .map(|(g, t, _)| (g, t as &mut dyn EventSink))
            .collect();
        step_together(model, &mut batch, &mut logits);
        drop(batch);
        let mut k = 0;
        while k < running.len() {
            if !running[k].0.is_finished() {
                k += 1;
                continue;
            }
            let (generation, mut tally, at) = running.swap_remove(k);
            generation.finish(&mut tally);
            if let Some(e) = tally.error {
                return Err(e);
            }
            tokens += tally.tokens;
            latencies.push(at.elapsed());
            if sent < total {
                sent += 1;
                waiting.push_back((sent, Instant::now()));
            }
        }
    }
    let wall = started.elapsed().as_secs_f64();
    latencies.sort();
    let quantile = |q: f64| {
        let i = ((latencies.len() as f64 - 1.0) * q).round() as usize;
        latencies.get(i).copied().unwrap_or_default()
    };
    Ok(LevelFigures {
        clients,
        requests: total,
        tokens,
        tokens_per_s: tokens as f64 / wall,
        p50: quantile(0.5),
        p99: quantile(0.99),
    })
}

/// Aggregate decode tokens/s of `batch` sequences stepped together, each after a different
/// 16-token slice of `text` (greedy).
fn batched_decode(model: &ChatModel, text: &[u32], batch: usize) -> Result<f64, GenerateError> {
    let llm = model.model();
    let mut seqs: Vec<crate::llm::Sequence> = (0..batch).map(|_| llm.new_sequence()).collect();
    let mut logits = vec![Vec::new(); batch];
    let mut next = vec![0u32; batch];
    for (i, (seq, out)) in seqs.iter_mut().zip(logits.iter_mut()).enumerate() {
        let start = (i * 16) % text.len().saturating_sub(16).max(1);
        let prompt = &text[start..(start + 16).min(text.len())];
        seq.forward(prompt, out)?;
        next[i] = argmax(out).unwrap_or(0);
    }
    let t = Instant::now();
    for _ in 0..BATCHED_DECODE_TOKENS {
        let tokens: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let mut step: Vec<(&mut crate::llm::Sequence, &[u32])> = seqs
            .iter_mut()
            .zip(&tokens)
            .map(|(seq, token)| (seq, &token[..]))
            .collect();
        llm.forward_batch(&mut step, &mut logits)?;
        for (n, out) in next.iter_mut().zip(&logits) {
            *n = argmax(out).unwrap_or(0);
        }
    }
    Ok((batch * BATCHED_DECODE_TOKENS) as f64 / t.elapsed().as_secs_f64())
}

/// The words of the peers' embedding workload (`../shared/peers/ort/embed_ort.py`).
const WORDS: [&str; 90] = [
    "the",
    "system",
    "reads",
    "a",
    "large",
    "file",
    "from",
    "disk",
    "and",
    "sends",
    "each",
    "record",
    "to",
    "worker",
    "that",
    "checks",
    "its",
    "schema",
    "before",
    "writing",
    "results",
    "into",
    "database",
    "while",
    "logging",
    "errors",
    "for",
    "later",
    "review",
    "by",
    "team",
    "on",
    "call",
    "weather",
    "tomorrow",
    "will",
    "be",
    "cold",
    "with",
    "rain",
    "in",
    "morning",
    "sun",
    "afternoon",
    "children",
    "played",
    "football",
    "park",
    "near",
    "river",
    "until",
    "evening",
    "when",
    "parents",
    "called",
    "them",
    "home",
    "dinner",
    "market",
    "prices",
    "rose",
    "sharply",
    "after",
    "central",
    "bank",
    "announced",
    "new",
    "policy",
    "aimed",
    "at",
    "reducing",
    "inflation",
    "over",
    "next",
    "year",
    "researchers",
    "found",
    "small",
    "models",
    "can",
    "answer",
    "questions",
    "about",
    "documents",
    "quickly",
    "cheap",
    "hardware",
    "without",
    "network",
    "access",
];

/// The peers' embedding workload: `n` pseudo-random sentences of `words` words (about 40
/// tokens for 37 words), the same as ONNX Runtime's harness draws with the same seed.
pub fn peer_sentences(n: usize, words: usize, seed: u64) -> Vec<String> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            let mut w: Vec<String> = (0..words)
                .map(|_| {
                    s = s
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    WORDS[((s >> 33) % WORDS.len() as u64) as usize].to_string()
                })
                .collect();
            if let Some(first) = w.first_mut() {
                let mut chars = first.chars();
                if let Some(c) = chars.next() {
                    *first = c.to_uppercase().chain(chars).collect();
                }
            }
            w.join(" ") + "."
        })
        .collect()
}

/// Texts per batch of the embedding throughput (the peers' batch).
pub const EMBED_BATCH: usize = 32;

/// Measures the embedder in `dir` on `device` on the peers' workload (8 batches of 32
/// sentences of about 40 tokens, and the median latency of 20 single sentences); returns the
/// loaded embedder too.
pub fn bench_embed(dir: &Path, device: &Device) -> Result<(EmbedBench, Embedder), EmbedError> {
    let started = Instant::now();
    let embedder = Embedder::load(dir, device)?;
    let load = started.elapsed();
    let corpus = peer_sentences(8 * EMBED_BATCH, 37, 42);
    embedder.embed(&corpus[..EMBED_BATCH])?; // warm-up
    let mut rates = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        for batch in corpus.chunks(EMBED_BATCH) {
            embedder.embed(batch)?;
        }
        rates.push(corpus.len() as f64 / t.elapsed().as_secs_f64());
    }
    let mut singles = Vec::new();
    for text in corpus.iter().take(20) {
        let t = Instant::now();
        embedder.embed(std::slice::from_ref(text))?;
        singles.push(t.elapsed());
    }
    rates.sort_by(f64::total_cmp);
    singles.sort();
    let figures = EmbedBench {
        load,
        sentences_per_s: rates[rates.len() / 2],
        single_latency: singles[singles.len() / 2],
    };
    Ok((figures, embedder))
}

/// Peak resident set size of this process in bytes (`VmHWM`), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same sentences as the peers' Python harness draws (checked against its output).
    #[test]
    fn peer_sentences_match_the_python_harness() {
        let s = peer_sentences(3, 37, 42);
        assert_eq!(
            s[0],
            "Bank hardware network weather year its access the for announced bank until sun \
             bank review writing reducing by can large access with logging will each dinner \
             its over sun checks logging from review and new call a."
        );
        assert!(
            s[2].ends_with("gging into played will called file year."),
            "{}",
            s[2]
        );
        assert_eq!(s[1].split(' ').count(), 37);
    }
}
