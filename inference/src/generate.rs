//! The generation loop: prefill, decode, sampling, stop conditions, streaming and cancellation.
//!
//! [`ChatModel::generate`] runs one request to completion on the calling thread — a thread of
//! its own, never an async runtime's worker — and streams [`GenerateEvent`]s into an
//! [`EventSink`] (a bounded `std::sync::mpsc::SyncSender`, or a closure wrapping
//! `tokio::sync::mpsc::Sender::blocking_send`). The loop:
//!
//! 1. checks the request (prompt not empty, prompt + `max_tokens` within the context limit,
//!    sampling parameters, stop sequences);
//! 2. runs the prompt through the model in chunks (cancellation is checked between them);
//! 3. per step: applies the constraint's token mask (if any), samples, commits the token to the
//!    constraint, stops on an end-of-generation token, decodes the text delta and scans for stop
//!    sequences, then runs the token through the model;
//! 4. ends with exactly one `Done` (or `Error`) event.
//!
//! Text that might be the beginning of a stop sequence is held back (with the token events
//! carrying it) until it is known not to be, so a stop sequence never reaches the client. A
//! cancelled [`CancelToken`] or a dropped receiver stops the loop before the next token.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::constraint::{Constraint, ConstraintError, ConstraintFactory};
use crate::device::Device;
use crate::llm::{LlmError, LlmModel, LlmOptions, MAX_BATCH_TOKENS, Sequence};
use crate::prefix::{PrefixCache, PrefixStats};
use crate::sampling::{Sampler, SamplingError, SamplingParams};
use crate::template::{ChatMessage, ChatTemplate, RenderOptions, TemplateError};
use crate::tokenizer::{StreamDecoder, Tokenizer, TokenizerError};

/// Prompt tokens run through the model per call during prefill (cancellation is checked
/// between calls).
const PREFILL_STEP: usize = 256;
/// Most stop sequences per request.
pub const MAX_STOP_SEQUENCES: usize = 16;
/// Longest stop sequence, in bytes.
pub const MAX_STOP_LEN: usize = 256;

/// Everything that can end a generation with an error.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The model failed (context overflow, backend error, ...).
    #[error(transparent)]
    Llm(#[from] LlmError),
    /// The sampling parameters are invalid, or no token is allowed.
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    /// The tokenizer failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The chat template failed.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The constraint failed.
    #[error(transparent)]
    Constraint(#[from] ConstraintError),
    /// The request has no prompt tokens.
    #[error("the prompt is empty: at least one token is needed to start generating")]
    EmptyPrompt,
    /// A stop sequence is empty or too long, or there are too many.
    #[error("invalid stop sequences: {0}")]
    InvalidStop(String),
    /// The model's vocabulary and the tokenizer disagree.
    #[error(
        "the model has {model} output tokens but its tokenizer has {tokenizer}; the file is inconsistent"
    )]
    VocabMismatch {
        /// Logits per step.
        model: usize,
        /// Tokenizer vocabulary size.
        tokenizer: usize,
    },
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token, a stop sequence, or a completed constraint.
    Stop,
    /// `max_tokens` reached, or the context limit.
    Length,
    /// Cancelled by the caller (or the receiver went away).
    Cancelled,
}

impl FinishReason {
    /// The OpenAI spelling (`stop`, `length`; `cancelled` is ours).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Token counts of one generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated (including any hidden by a stop sequence, excluding end-of-generation).
    pub completion_tokens: usize,
    /// Prompt tokens whose state came from the prefix cache instead of being run.
    #[serde(default)]
    pub cached_tokens: usize,
}

/// Where the time of one generation went.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    /// Running the prompt through the model (time to the first token's logits).
    pub prefill: Duration,
    /// Everything after the prefill.
    pub decode: Duration,
}

/// One event of a streamed generation.
#[derive(Debug)]
pub enum GenerateEvent {
    /// A generated token and the text it releases. `text_delta` may be empty (a partial UTF-8
    /// character, or text held back as a possible stop-sequence prefix and released with a
    /// later token).
    Token {
        /// The token id.
        id: u32,
        /// Text to append to the output.
        text_delta: String,
        /// Log-probability of the token (when requested).
        logprob: Option<f32>,
        /// The most likely alternatives and their log-probabilities (when requested).
        top_logprobs: Vec<(u32, f32)>,
    },
    /// The generation ended normally; always the last event.
    Done {
        /// Why it ended.
        finish_reason: FinishReason,
        /// Token counts.
        usage: Usage,
        /// Time spent in prefill and decode.
        timings: Timings,
    },
    /// The generation failed; always the last event.
    Error(GenerateError),
}

/// Where generation events go. Sending fails when the receiver is gone, which cancels the
/// generation.
pub trait EventSink {
    /// Delivers one event, blocking while the consumer is behind; `false` if it went away.
    fn send_event(&mut self, event: GenerateEvent) -> bool;
}

impl EventSink for SyncSender<GenerateEvent> {
    fn send_event(&mut self, event: GenerateEvent) -> bool {
        self.send(event).is_ok()
    }
}

impl<F: FnMut(GenerateEvent) -> bool> EventSink for F {
    fn send_event(&mut self, event: GenerateEvent) -> bool {
        self(event)
    }
}

/// A cancellation flag shared between a generation and whoever may stop it.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> CancelToken {
        CancelToken::default()
    }

    /// Asks the generation to stop before its next token.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The prefix cache's lock: a thread that panicked holding it left it consistent (every
/// change is one push or removal), so a poisoned lock is taken over.
fn lock(cache: &Mutex<PrefixCache>) -> MutexGuard<'_, PrefixCache> {
    cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One generation request (already tokenized).
#[derive(Debug, Default)]
pub struct GenerateRequest {
    /// The prompt tokens (BOS included when the model wants one).
    pub prompt: Vec<u32>,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Most tokens to generate; `None` runs until an end token or the context limit.
    pub max_tokens: Option<usize>,
    /// Stop sequences: generation ends before the first occurrence of any of them.
    pub stop: Vec<String>,
    /// Constrained decoding (JSON schema, regex, grammar).
    pub constraint: Option<Constraint>,
    /// Cancellation.
    pub cancel: CancelToken,
}

/// The result of a generation that was not streamed.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// The generated text (stop sequence excluded).
    pub text: String,
    /// The generated tokens whose text was emitted.
    pub tokens: Vec<u32>,
    /// Per emitted token: its log-probability and top alternatives (when requested).
    pub logprobs: Vec<TokenLogprobs>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Token counts.
    pub usage: Usage,
    /// Time spent in prefill and decode.
    pub timings: Timings,
}

/// The log-probabilities reported for one token.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    /// Log-probability of the token (when requested).
    pub logprob: Option<f32>,
    /// The most likely alternatives, most likely first.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Parameters of [`ChatModel::chat`].
#[derive(Clone, Debug, Default)]
pub struct ChatParams {
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Most tokens to generate.
    pub max_tokens: Option<usize>,
    /// Stop sequences.
    pub stop: Vec<String>,
}

/// A chat model ready to serve requests: weights, tokenizer and chat template. Cheap to clone;
/// each [`ChatModel::generate`] call has its own KV cache, so calls may run on several threads.
#[derive(Clone, Debug)]
pub struct ChatModel {
    model: LlmModel,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    constraints: Arc<OnceLock<Result<ConstraintFactory, String>>>,
    /// Shared by every clone; off (a budget of 0) unless [`ChatModel::with_prefix_cache`].
    prefix: Arc<Mutex<PrefixCache>>,
}

impl ChatModel {
    /// Loads the GGUF model at `path` onto `device`, with `threads` CPU threads.
    pub fn load(path: &Path, device: &Device, threads: usize) -> Result<ChatModel, GenerateError> {
        ChatModel::load_with(
            path,
            device,
            &LlmOptions {
                threads,
                ..LlmOptions::default()
            },
        )
    }

    /// Loads the GGUF model at `path` onto `device` with explicit options.
    pub fn load_with(
        path: &Path,
        device: &Device,
        options: &LlmOptions,
    ) -> Result<ChatModel, GenerateError> {
        let model = LlmModel::load(path, device, options)?;
        let tokenizer = Tokenizer::from_gguf_metadata(model.gguf().metadata())?;
        // Models may pad their output layer past the vocabulary (Qwen2.5 does); the padding ids
        // are never sampled (see `Generation::start`). Fewer outputs than tokens is an error.
        if tokenizer.vocab_size() > model.config().vocab_size {
            return Err(GenerateError::VocabMismatch {
                model: model.config().vocab_size,
                tokenizer: tokenizer.vocab_size(),
            });
        }
        let template = ChatTemplate::from_gguf_metadata(model.gguf().metadata(), &tokenizer)?;
        tracing::info!(
            path = %path.display(),
            architecture = model.config().architecture.name(),
            layers = model.config().n_layers,
            vocab = model.config().vocab_size,
            max_context = model.max_context(),
            runs_on = %model.describe(),
            "chat model loaded"
        );
        Ok(ChatModel {
            model,
            tokenizer,
            template,
            constraints: Arc::new(OnceLock::new()),
            prefix: Arc::new(Mutex::new(PrefixCache::new(0))),
        })
    }

    /// This model with a prefix cache of its own (see [`crate::prefix`]), shared by its
    /// clones: finished generations' KV state is kept, up to `budget` bytes, for later prompts
    /// that start the same way. 0 turns it off (the default of a loaded model).
    pub fn with_prefix_cache(&self, budget: usize) -> ChatModel {
        ChatModel {
            prefix: Arc::new(Mutex::new(PrefixCache::new(budget))),
            ..self.clone()
        }
    }

    /// What the prefix cache holds and did.
    pub fn prefix_stats(&self) -> PrefixStats {
        lock(&self.prefix).stats()
    }

    /// The model (configuration, GGUF metadata, sequences).
    pub fn model(&self) -> &LlmModel {
        &self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The factory of constraints for this vocabulary (built on first use, then shared).
    pub fn constraints(&self) -> Result<&ConstraintFactory, GenerateError> {
        self.constraints
            .get_or_init(|| ConstraintFactory::new(&self.tokenizer).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| GenerateError::Constraint(ConstraintError::Init(e.clone())))
    }

    /// Renders `messages` with the chat template (with the assistant header) and tokenizes
    /// the prompt.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, GenerateError> {
        let rendered = self.template.render(
            messages,
            &RenderOptions {
                add_generation_prompt: true,
                ..RenderOptions::default()
            },
        )?;
        Ok(rendered.tokenize(&self.tokenizer)?)
    }

    /// Generates a reply to `messages` and returns it whole (blocking).
    pub fn chat(
        &self,
        messages: &[ChatMessage],
        params: ChatParams,
    ) -> Result<Completion, GenerateError> {
        let prompt = self.chat_prompt(messages)?;
        self.complete(GenerateRequest {
            prompt,
            sampling: params.sampling,
            max_tokens: params.max_tokens,
            stop: params.stop,
            ..GenerateRequest::default()
        })
    }

    /// Runs `request` and collects its events into a [`Completion`] (blocking).
    pub fn complete(&self, request: GenerateRequest) -> Result<Completion, GenerateError> {
        let mut text = String::new();
        let mut tokens = Vec::new();
        let mut logprobs = Vec::new();
        let mut end = None;
        let mut sink = |event: GenerateEvent| {
            match event {
                GenerateEvent::Token {
                    id,
                    text_delta,
                    logprob,
                    top_logprobs,
                } => {
                    text.push_str(&text_delta);
                    tokens.push(id);
                    logprobs.push(TokenLogprobs {
                        logprob,
                        top_logprobs,
                    });
                }
                GenerateEvent::Done {
                    finish_reason,
                    usage,
                    timings,
                } => end = Some(Ok((finish_reason, usage, timings))),
                GenerateEvent::Error(e) => end = Some(Err(e)),
            }
            true
        };
        self.generate(request, &mut sink);
        match end {
            Some(Ok((finish_reason, usage, timings))) => Ok(Completion {
                text,
                tokens,
                logprobs,
                finish_reason,
                usage,
                timings,
            }),
            Some(Err(e)) => Err(e),
            None => Err(GenerateError::Llm(LlmError::Backend(
                "the generation ended without a final event".to_string(),
            ))),
        }
    }

    /// Starts `request` on a new thread and returns the receiving end of a channel of
    /// `capacity` events (at least 1) and the thread's handle.
    pub fn spawn(
        &self,
        request: GenerateRequest,
        capacity: usize,
    ) -> std::io::Result<(Receiver<GenerateEvent>, std::thread::JoinHandle<()>)> {
        let (tx, rx) = std::sync::mpsc::sync_channel(capacity.max(1));
        let this = self.clone();
        let handle = std::thread::Builder::new()
            .name("gaia-generate".to_string())
            .spawn(move || {
                let mut tx = tx;
                this.generate(request, &mut tx);
            })?;
        Ok((rx, handle))
    }

    /// Runs `request` to completion on this thread, streaming events into `sink`. The last
    /// event is always `Done` or `Error` (unless the sink went away).
    pub fn generate(&self, request: GenerateRequest, sink: &mut dyn EventSink) {
        let mut generation = match Generation::start(self, request) {
            Ok(generation) => generation,
            Err(e) => {
                sink.send_event(GenerateEvent::Error(e));
                return;
            }
        };
        let mut logits = Vec::new();
        while let Some((seq, input)) = generation.next_step(PREFILL_STEP) {
            let ran = input.len();
            if let Err(e) = seq.forward(input, &mut logits) {
                generation.fail(e.into());
                break;
            }
            generation.advance(ran, &mut logits, sink);
        }
        generation.finish(sink);
    }
}

/// Runs one model step for several generations at once (continuous batching): every
/// decoding generation brings its last token, and the prefilling ones share what is left of
/// [`MAX_BATCH_TOKENS`] in order (a long prompt goes through in chunks beside the others'
/// decoding instead of stalling them). Each then samples and streams into its own sink.
/// Returns the tokens the step ran (0 when none of them had anything to run: all ended).
pub fn step_together(
    model: &ChatModel,
    batch: &mut [(&mut Generation, &mut dyn EventSink)],
    logits: &mut Vec<Vec<f32>>,
) -> usize {
    let decoding = batch
        .iter()
        .filter(|(g, _)| !g.is_finished() && !g.in_prefill())
        .count();
    let mut prefill_left = MAX_BATCH_TOKENS.saturating_sub(decoding);
    let mut inputs: Vec<(usize, &mut Sequence, &[u32])> = Vec::with_capacity(batch.len());
    for (i, (generation, _)) in batch.iter_mut().enumerate() {
        let prefill = generation.in_prefill();
        if prefill && prefill_left == 0 {
            continue;
        }
        let budget = if prefill { prefill_left } else { 1 };
        if let Some((seq, input)) = generation.next_step(budget) {
            if prefill {
                prefill_left = prefill_left.saturating_sub(input.len());
            }
            inputs.push((i, seq, input));
        }
    }
    if inputs.is_empty() {
        return 0;
    }
    let ran: Vec<(usize, usize)> = inputs
        .iter()
        .map(|(i, _, input)| (*i, input.len()))
        .collect();
    let total = ran.iter().map(|(_, n)| n).sum();
    if logits.len() < inputs.len() {
        logits.resize(inputs.len(), Vec::new());
    }
    let mut pairs: Vec<(&mut Sequence, &[u32])> = inputs
        .into_iter()
        .map(|(_, seq, input)| (seq, input))
        .collect();
    let count = pairs.len();
    let result = model.model.forward_batch(&mut pairs, &mut logits[..count]);
    drop(pairs);
    match result {
        Ok(()) => {
            for ((i, n), out) in ran.into_iter().zip(logits.iter_mut()) {
                let (generation, sink) = &mut batch[i];
                generation.advance(n, out, &mut **sink);
            }
        }
        Err(e) => {
            let message = e.to_string();
            for (i, _) in ran {
                batch[i].0.fail(LlmError::Backend(message.clone()).into());
            }
        }
    }
    total
}

/// A token waiting for its text to be released.
struct Pending {
    id: u32,
    text: String,
    logprob: Option<f32>,
    top_logprobs: Vec<(u32, f32)>,
}

/// Holds back text that may start a stop sequence.
struct StopScanner {
    stops: Vec<String>,
    queue: VecDeque<Pending>,
    /// Concatenated text of `queue`.
    text: String,
    /// A stop sequence was found.
    stopped: bool,
}

impl StopScanner {
    fn new(stops: Vec<String>) -> Result<StopScanner, GenerateError> {
        if stops.len() > MAX_STOP_SEQUENCES {
            return Err(GenerateError::InvalidStop(format!(
                "{} stop sequences given, at most {MAX_STOP_SEQUENCES} are allowed",
                stops.len()
            )));
        }
        if let Some(s) = stops
            .iter()
            .find(|s| s.is_empty() || s.len() > MAX_STOP_LEN)
        {
            return Err(GenerateError::InvalidStop(format!(
                "stop sequence {s:?} must have 1 to {MAX_STOP_LEN} bytes"
            )));
        }
        Ok(StopScanner {
            stops,
            queue: VecDeque::new(),
            text: String::new(),
            stopped: false,
        })
    }

    /// Adds a token. Returns the tokens whose text is now final, and whether a stop sequence
    /// was found (then the released texts end right before it and the rest is dropped).
    /// `keep_last` holds the new token back even if its text is final (its character is
    /// incomplete and more bytes may be attached to it at the end).
    fn push(&mut self, token: Pending, keep_last: bool) -> (Vec<Pending>, bool) {
        self.text.push_str(&token.text);
        self.queue.push_back(token);
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min();
        if let Some(cut) = found {
            let mut out = Vec::new();
            let mut start = 0;
            for mut p in self.queue.drain(..) {
                if start >= cut {
                    break;
                }
                let end = start + p.text.len();
                if end > cut {
                    p.text.truncate(cut - start);
                }
                start = end;
                out.push(p);
            }
            self.text.clear();
            self.stopped = true;
            return (out, true);
        }
        // Hold back the longest suffix that is a proper prefix of some stop sequence.
        let hold = self
            .stops
            .iter()
            .map(|s| {
                let max = (s.len() - 1).min(self.text.len());
                (1..=max)
                    .rev()
                    .find(|&k| {
                        let from = self.text.len() - k;
                        self.text.is_char_boundary(from) && s.starts_with(&self.text[from..])
                    })
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let releasable = self.text.len() - hold;
        let keep = usize::from(keep_last);
        let mut out = Vec::new();
        let mut end = 0;
        while let Some(p) = self.queue.front() {
            if end + p.text.len() > releasable || self.queue.len() <= keep {
                break;
            }
            end += p.text.len();
            if let Some(p) = self.queue.pop_front() {
                out.push(p);
            }
        }
        self.text.drain(..end);
        (out, false)
    }

    /// Releases everything held back (the generation ended without a stop sequence).
    fn finish(&mut self) -> Vec<Pending> {
        self.text.clear();
        self.queue.drain(..).collect()
    }
}

/// One generation, advanced a model step at a time: [`ChatModel::generate`] runs one alone,
/// and a batcher runs many side by side, each step of the model taking one input from every
/// generation ([`LlmModel::forward_batch`](crate::llm::LlmModel::forward_batch)). Between
/// steps: [`next_step`](Self::next_step) gives what the next step must run (a chunk of the
/// prompt, or the token just sampled) and the sequence to run it on; after the step
/// [`advance`](Self::advance) takes the logits, samples, streams the token and decides whether
/// the generation goes on; [`finish`](Self::finish) sends the final event.
pub struct Generation {
    seq: Sequence,
    tokenizer: Tokenizer,
    prompt: Vec<u32>,
    /// The tokens sampled so far (each is run at the next step, but the last).
    generated: Vec<u32>,
    /// Where the sequence goes when the generation ends well.
    prefix: Arc<Mutex<PrefixCache>>,
    /// Prompt tokens already run.
    prefilled: usize,
    /// The token sampled last, to run at the next step.
    last: [u32; 1],
    sampler: Sampler,
    scanner: StopScanner,
    decoder: StreamDecoder,
    constraint: Option<Constraint>,
    cancel: CancelToken,
    /// Only ids the tokenizer knows are sampled (a padded output layer has more logits).
    vocab: usize,
    max_new: usize,
    usage: Usage,
    timings: Timings,
    started: Instant,
    decode_started: Option<Instant>,
    /// The sink refused an event: nobody listens any more.
    closed: bool,
    /// How it ended, once it has.
    end: Option<Result<FinishReason, GenerateError>>,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("prompt", &self.prompt.len())
            .field("prefilled", &self.prefilled)
            .field("usage", &self.usage)
            .field("end", &self.end)
            .finish()
    }
}

impl Generation {
    /// Checks `request` (prompt not empty, prompt plus `max_tokens` within the context,
    /// sampling parameters, stop sequences) and prepares its sequence.
    pub fn start(model: &ChatModel, request: GenerateRequest) -> Result<Generation, GenerateError> {
        let GenerateRequest {
            prompt,
            sampling,
            max_tokens,
            stop,
            constraint,
            cancel,
        } = request;
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let limit = model.model.max_context();
        let requested = prompt.len() + max_tokens.unwrap_or(0);
        if prompt.len() >= limit || requested > limit {
            return Err(LlmError::ContextOverflow {
                limit,
                requested: requested.max(prompt.len() + 1),
            }
            .into());
        }
        let max_new = max_tokens
            .unwrap_or(limit - prompt.len())
            .min(limit - prompt.len());
        let vocab = model
            .tokenizer
            .vocab_size()
            .min(model.model.config().vocab_size);
        let sampler = Sampler::new(sampling, vocab, &prompt)?;
        let scanner = StopScanner::new(stop)?;
        let (mut seq, cached) = lock(&model.prefix)
            .take(&prompt)
            .unwrap_or_else(|| (model.model.new_sequence(), 0));
        // With `max_tokens` the generation's bound is known and a GPU cache is allocated once,
        // at that size; without it the prompt is (not the whole context for every request),
        // and the answer grows the cache in steps.
        seq.reserve(prompt.len() + max_tokens.map_or(0, |_| max_new));
        Ok(Generation {
            seq,
            generated: Vec::new(),
            prefix: Arc::clone(&model.prefix),
            decoder: model.tokenizer.stream_decoder(true),
            tokenizer: model.tokenizer.clone(),
            usage: Usage {
                prompt_tokens: prompt.len(),
                completion_tokens: 0,
                cached_tokens: cached,
            },
            prompt,
            prefilled: cached,
            last: [0],
            sampler,
            scanner,
            constraint,
            cancel,
            vocab,
            max_new,
            timings: Timings::default(),
            started: Instant::now(),
            decode_started: None,
            closed: false,
            end: None,
        })
    }

    /// What the next model step must run for this generation: the next chunk of the prompt
    /// (at most `prefill_budget` tokens, at least one) or the token sampled last, with the
    /// sequence to run it on. `None` once it has ended (an end token, a stop sequence, the
    /// length limit, an error, or a cancellation, which is noticed here).
    pub fn next_step(&mut self, prefill_budget: usize) -> Option<(&mut Sequence, &[u32])> {
        if self.end.is_none() && (self.cancel.is_cancelled() || self.closed) {
            self.end_with(Ok(FinishReason::Cancelled));
        }
        if self.end.is_some() {
            return None;
        }
        if self.prefilled < self.prompt.len() {
            let end = (self.prefilled + prefill_budget.max(1)).min(self.prompt.len());
            return Some((&mut self.seq, &self.prompt[self.prefilled..end]));
        }
        Some((&mut self.seq, &self.last))
    }

    /// Whether it is still in its prompt (a prefill step) rather than decoding.
    pub fn in_prefill(&self) -> bool {
        self.prefilled < self.prompt.len()
    }

    /// Prompt tokens not yet run.
    pub fn prefill_left(&self) -> usize {
        self.prompt.len() - self.prefilled
    }

    /// The model ran `ran` tokens of [`next_step`](Self::next_step)'s input and wrote the
    /// logits of the last into `logits`: once the prompt is done, samples the next token
    /// (the constraint's mask applied), streams its text into `sink` (held back while it may
    /// begin a stop sequence) and decides whether the generation goes on.
    pub fn advance(&mut self, ran: usize, logits: &mut [f32], sink: &mut dyn EventSink) {
        if self.end.is_some() {
            return;
        }
        if self.prefilled < self.prompt.len() {
            self.prefilled = (self.prefilled + ran).min(self.prompt.len());
            if self.prefilled < self.prompt.len() {
                return;
            }
            self.timings.prefill = self.started.elapsed();
            self.decode_started = Some(Instant::now());
        }
        match self.sample(logits, sink) {
            Ok(None) => {}
            Ok(Some(reason)) => self.end_with(Ok(reason)),
            Err(e) => self.end_with(Err(e)),
        }
    }

    /// Ends it with `error` (the model step failed).
    pub fn fail(&mut self, error: GenerateError) {
        if self.end.is_none() {
            self.end_with(Err(error));
        }
    }

    /// Whether it has ended.
    pub fn is_finished(&self) -> bool {
        self.end.is_some()
    }

    /// Sends what is left and the final event (`Done`, or `Error`) into `sink`. A generation
    /// finished before it ended counts as cancelled.
    pub fn finish(mut self, sink: &mut dyn EventSink) {
        if self.end.is_none() {
            self.end_with(Ok(FinishReason::Cancelled));
        }
        let event = match self.end.take() {
            Some(Err(e)) => GenerateEvent::Error(e),
            Some(Ok(finish_reason)) => {
                if !(finish_reason == FinishReason::Stop && self.scanner.stopped) {
                    // Flush: bytes of an incomplete character held by the decoder (they
                    // become U+FFFD) go with the last token, which the scanner kept while
                    // they were pending.
                    let tail = self.decoder.finish();
                    let mut rest = self.scanner.finish();
                    if let Some(last) = rest.last_mut() {
                        last.text.push_str(&tail);
                    }
                    self.emit(rest, sink);
                }
                // The sequence holds the prompt and every sampled token but the last: the
                // prefix cache keeps it for a later prompt that starts the same way (a
                // failed step may have left it half-written, so only a generation that ended
                // well gives its sequence back).
                let mut tokens = std::mem::take(&mut self.prompt);
                tokens.extend_from_slice(&self.generated);
                lock(&self.prefix).put(tokens, self.seq);
                GenerateEvent::Done {
                    finish_reason,
                    usage: self.usage,
                    timings: self.timings,
                }
            }
            None => return,
        };
        if !self.closed {
            sink.send_event(event);
        }
    }

    fn end_with(&mut self, end: Result<FinishReason, GenerateError>) {
        if self.prefilled < self.prompt.len() {
            self.timings.prefill = self.started.elapsed();
        }
        if let Some(started) = self.decode_started {
            self.timings.decode = started.elapsed();
        }
        self.end = Some(end);
    }

    /// One decoding step on `logits`: `Some(reason)` when the generation ends here.
    fn sample(
        &mut self,
        logits: &mut [f32],
        sink: &mut dyn EventSink,
    ) -> Result<Option<FinishReason>, GenerateError> {
        if self.cancel.is_cancelled() || self.closed {
            return Ok(Some(FinishReason::Cancelled));
        }
        if self.usage.completion_tokens >= self.max_new {
            return Ok(Some(FinishReason::Length));
        }
        let mask = match self.constraint.as_mut() {
            Some(c) => Some(c.compute_mask()?),
            None => None,
        };
        let vocab = self.vocab.min(logits.len());
        let sampled = self
            .sampler
            .sample(&mut logits[..vocab], mask.as_ref().map(|m| m.as_words()))?;
        let id = sampled.token;
        if let Some(c) = self.constraint.as_mut() {
            c.commit_token(id)?;
        }
        if self.tokenizer.is_eos(id) {
            return Ok(Some(FinishReason::Stop));
        }
        self.usage.completion_tokens += 1;
        let text = self.decoder.push(id);
        let incomplete = self.decoder.has_pending();
        let (ready, stopped) = self.scanner.push(
            Pending {
                id,
                text,
                logprob: sampled.logprob,
                top_logprobs: sampled.top_logprobs,
            },
            incomplete,
        );
        self.emit(ready, sink);
        if stopped
            || self
                .constraint
                .as_ref()
                .is_some_and(Constraint::is_finished)
        {
            return Ok(Some(FinishReason::Stop));
        }
        if self.usage.completion_tokens >= self.max_new {
            return Ok(Some(FinishReason::Length));
        }
        self.last = [id];
        self.generated.push(id);
        Ok(None)
    }

    fn emit(&mut self, tokens: Vec<Pending>, sink: &mut dyn EventSink) {
        for p in tokens {
            if self.closed {
                return;
            }
            let ok = sink.send_event(GenerateEvent::Token {
                id: p.id,
                text_delta: p.text,
                logprob: p.logprob,
                top_logprobs: p.top_logprobs,
            });
            if !ok {
                self.closed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(id: u32, text: &str) -> Pending {
        Pending {
            id,
            text: text.to_string(),
            logprob: None,
            top_logprobs: Vec::new(),
        }
    }

    fn texts(ps: &[Pending]) -> Vec<&str> {
        ps.iter().map(|p| p.text.as_str()).collect()
    }

    #[test]
    fn stop_scanner_without_stops_releases_everything() {
        let mut s = StopScanner::new(Vec::new()).unwrap();
        let (out, stopped) = s.push(pending(1, "hello"), false);
        assert_eq!(texts(&out), ["hello"]);
        assert!(!stopped);
    }

    #[test]
    fn stop_scanner_holds_possible_prefixes_and_cuts_exactly() {
        let mut s = StopScanner::new(vec!["\n\nUser:".to_string()]).unwrap();
        let (out, stopped) = s.push(pending(1, "Paris is"), false);
        assert_eq!(texts(&out), ["Paris is"]);
        assert!(!stopped);
        // A newline might start the stop sequence: held.
        let (out, _) = s.push(pending(2, " nice.\n"), false);
        assert!(out.is_empty());
        // Not the stop sequence after all: both released.
        let (out, _) = s.push(pending(3, "Yes"), false);
        assert_eq!(texts(&out), [" nice.\n", "Yes"]);
        // The stop sequence spread over tokens, with text after it in the same token.
        let (out, stopped) = s.push(pending(4, "\n"), false);
        assert!(out.is_empty() && !stopped);
        let (out, stopped) = s.push(pending(5, "\nUs"), false);
        assert!(out.is_empty() && !stopped);
        let (out, stopped) = s.push(pending(6, "er: hi"), false);
        assert!(stopped);
        // Tokens entirely inside the stop sequence are dropped.
        assert!(out.iter().all(|p| p.text.is_empty()) || out.is_empty());
    }

    #[test]
    fn stop_inside_one_token_truncates_that_token() {
        let mut s = StopScanner::new(vec!["END".to_string(), "xyz".to_string()]).unwrap();
        let (out, stopped) = s.push(pending(1, "abc END def"), false);
        assert!(stopped);
        assert_eq!(texts(&out), ["abc "]);
        // The earliest of several stop sequences wins.
        let mut s = StopScanner::new(vec!["END".to_string(), "b".to_string()]).unwrap();
        let (out, stopped) = s.push(pending(1, "abEND"), false);
        assert!(stopped);
        assert_eq!(texts(&out), ["a"]);
    }

    #[test]
    fn stop_scanner_respects_char_boundaries() {
        let mut s = StopScanner::new(vec!["é!".to_string()]).unwrap();
        let (out, _) = s.push(pending(1, "café"), false);
        // "é" may start the stop sequence.
        assert_eq!(texts(&out), Vec::<&str>::new());
        let rest = s.finish();
        assert_eq!(texts(&rest), ["café"]);
    }

    #[test]
    fn invalid_stops_are_rejected() {
        assert!(StopScanner::new(vec![String::new()]).is_err());
        assert!(StopScanner::new(vec!["x".repeat(MAX_STOP_LEN + 1)]).is_err());
        assert!(StopScanner::new(vec!["a".to_string(); MAX_STOP_SEQUENCES + 1]).is_err());
    }

    #[test]
    fn cancel_token_is_shared() {
        let a = CancelToken::new();
        let b = a.clone();
        assert!(!b.is_cancelled());
        a.cancel();
        assert!(b.is_cancelled());
    }
}
