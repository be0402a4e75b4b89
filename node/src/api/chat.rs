//! `POST /v1/chat/completions` and `POST /v1/completions`: the HTTP side of the chat pipeline
//! ([`crate::agent`]). The handlers parse the body, hand it to the pipeline, and shape what
//! comes back the OpenAI way: a whole response, or SSE chunks (`data: {...}`, then
//! `data: [DONE]`) with tool calls held back until they are complete; log-probabilities,
//! usage, the `sources` and `tool_results` extension fields, and the [`SERVED_BY_HEADER`].

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream, StreamExt};
use gaia_inference::generate::{CancelToken, FinishReason, GenerateEvent, TokenLogprobs, Usage};
use serde_json::{Value as Json, json};

use super::billing::{self, Caller};
use super::error::{ApiError, Body, BodyJson};
use super::now_secs;
use super::types::{CompletionRequest, Prompt};
use crate::agent::rag::Source;
use crate::agent::tools;
use crate::agent::types::{self, ChatRequest, ToolChoice};
use crate::agent::{
    self, ChoiceOut, Events, Executed, Outcome, Plan, Shared, collect, generation_error, limits,
    run_rounds, start_round, submit,
};
use crate::engine::CancelOnDrop;

/// The response header that names the node that served a chat completion.
pub const SERVED_BY_HEADER: &str = "x-gaia-node";

/// Chat or text completion: the shapes of the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Chat,
    Text,
}

/// Per-request facts every response chunk repeats.
#[derive(Debug, Clone)]
struct Meta {
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
    flavor: Flavor,
}

impl Meta {
    fn new(st: &Shared, flavor: Flavor, requested: &str) -> Meta {
        let prefix = match flavor {
            Flavor::Chat => "chatcmpl",
            Flavor::Text => "cmpl",
        };
        Meta {
            id: format!("{prefix}-{}", hex::encode(rand::random::<[u8; 12]>())),
            created: now_secs(),
            model: if st.local.is_some() || requested == "default" {
                st.config.models.chat.clone()
            } else {
                requested.to_string()
            },
            fingerprint: st.fingerprint(),
            flavor,
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.flavor, chunk) {
            (Flavor::Chat, false) => "chat.completion",
            (Flavor::Chat, true) => "chat.completion.chunk",
            (Flavor::Text, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Json) -> Json {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created,
            "model": self.model, "system_fingerprint": self.fingerprint, "choices": choices})
    }
}

fn finish_str(f: Option<FinishReason>) -> &'static str {
    match f {
        Some(FinishReason::Stop) => "stop",
        // A generation cancelled while its client waits was cut by the request timeout.
        Some(FinishReason::Length | FinishReason::Cancelled) | None => "length",
    }
}

fn token_text(st: &Shared, id: u32) -> (String, Vec<u8>) {
    let Some(local) = &st.local else {
        return (String::new(), Vec::new());
    };
    let bytes = local.engine.model().tokenizer().token_bytes(id).to_vec();
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

fn chat_logprobs_json(st: &Shared, tokens: &[u32], lps: &[TokenLogprobs]) -> Json {
    let content: Vec<Json> = tokens
        .iter()
        .zip(lps)
        .map(|(id, lp)| {
            let (token, bytes) = token_text(st, *id);
            let top: Vec<Json> = lp
                .top_logprobs
                .iter()
                .map(|(tid, l)| {
                    let (t, b) = token_text(st, *tid);
                    json!({"token": t, "logprob": l, "bytes": b})
                })
                .collect();
            json!({"token": token, "logprob": lp.logprob, "bytes": bytes, "top_logprobs": top})
        })
        .collect();
    json!({"content": content})
}

fn text_logprobs_json(st: &Shared, tokens: &[u32], lps: &[TokenLogprobs], offset0: usize) -> Json {
    let mut offset = offset0;
    let (mut toks, mut lp, mut top, mut offs) = (vec![], vec![], vec![], vec![]);
    for (id, l) in tokens.iter().zip(lps) {
        let (t, _) = token_text(st, *id);
        offs.push(offset);
        offset += t.len();
        toks.push(t);
        lp.push(l.logprob);
        let alts: serde_json::Map<String, Json> = l
            .top_logprobs
            .iter()
            .map(|(tid, v)| (token_text(st, *tid).0, json!(v)))
            .collect();
        top.push(Json::Object(alts));
    }
    json!({"tokens": toks, "token_logprobs": lp, "top_logprobs": top, "text_offset": offs})
}

/// OpenAI's usage object; `cached`: prompt tokens the prefix cache saved running again.
fn usage_json(prompt: usize, completion: usize, cached: usize) -> Json {
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached}})
}

/// The tool calls read from an answer cut short, as OpenAI's `tool_calls` (the last one's
/// arguments incomplete); `None` when no call had begun.
fn partial_calls(text: &str, tools_offered: &[tools::Tool]) -> Option<Json> {
    let mut scanner = tools::CallScanner::default();
    scanner.feed(text, tools_offered);
    let calls: Vec<Json> = scanner
        .calls()
        .iter()
        .filter_map(|c| {
            let name = c.name.as_ref()?;
            Some(json!({"id": tools::call_id(), "type": "function",
                "function": {"name": name, "arguments": c.arguments}}))
        })
        .collect();
    (!calls.is_empty()).then_some(Json::Array(calls))
}

fn chat_choice_json(st: &Shared, plan: &Plan, i: usize, out: &ChoiceOut) -> Json {
    let (message, finish) = match &out.calls {
        Some(calls) => (
            json!({"role": "assistant", "content": null, "tool_calls": tools::wire_calls(calls)}),
            "tool_calls",
        ),
        // The budget ran out inside a tool call: the call so far, and `length`, as OpenAI
        // answers.
        None if out.finish == Some(FinishReason::Length)
            && plan.choice != ToolChoice::None
            && !plan.tools.is_empty()
            && let Some(partial) = partial_calls(&out.text, &plan.tools) =>
        {
            (
                json!({"role": "assistant", "content": null, "tool_calls": partial}),
                "length",
            )
        }
        None => (
            json!({"role": "assistant", "content": out.text}),
            finish_str(out.finish),
        ),
    };
    let logprobs = if plan.settings.sampling.logprobs {
        chat_logprobs_json(st, &out.tokens, &out.logprobs)
    } else {
        Json::Null
    };
    json!({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
}

fn extensions(body: &mut Json, sources: &[Source], executed: &[Executed]) {
    if !sources.is_empty() {
        body["sources"] = json!(sources);
    }
    if !executed.is_empty() {
        body["tool_results"] = json!(executed);
    }
}

/// What the chat pipeline gives a front end: chunks to stream, or the whole OpenAI response
/// body; with the node that served it, when another did.
pub(crate) enum ChatReply {
    Stream(Chunks, Option<String>),
    Whole(Json, Option<String>),
}

/// `POST /v1/chat/completions`
pub async fn chat_completions(
    State(st): State<Shared>,
    axum::Extension(caller): axum::Extension<Caller>,
    BodyJson(req, raw): BodyJson<ChatRequest>,
) -> Result<Response, ApiError> {
    Ok(match chat(st, caller, req, raw).await? {
        ChatReply::Stream(chunks, served) => served_header(openai_sse(chunks), served),
        ChatReply::Whole(body, served) => served_header(axum::Json(body).into_response(), served),
    })
}

/// The chat pipeline behind every chat front end (`raw` is the request as it may be relayed).
pub(crate) async fn chat(
    st: Shared,
    caller: Caller,
    req: ChatRequest,
    raw: Json,
) -> Result<ChatReply, ApiError> {
    let mut plan = agent::plan(&st, &req)?;
    let tab = match st.payments {
        None => None,
        Some(_) => {
            let body_bytes = serde_json::to_vec(&raw).map_or(0, |b| b.len());
            let bound = billing::token_bound(body_bytes, &plan.settings, &st.config);
            billing::open_tab(&st, &caller, bound).await?
        }
    };
    agent::route(&st, &mut plan, &req.model, raw, tab).await?;
    let meta = Meta::new(&st, Flavor::Chat, &req.model);
    let mut messages = req.messages;
    let sources = agent::retrieve(&st, &plan, &mut messages).await?;
    let cancel = CancelToken::new();
    if plan.settings.stream && !plan.node_tools_active() {
        let (rx, prompt_len) =
            start_round(&st, &plan, messages, plan.choice.clone(), &cancel, None).await?;
        let served = plan.served_by.get();
        let stream = token_stream(st, plan, meta, rx, cancel, prompt_len, sources);
        return Ok(ChatReply::Stream(Box::pin(stream), served));
    }
    let outcome = run_rounds(&st, &plan, messages, &cancel).await?;
    st.metrics
        .tokens(outcome.prompt_tokens, outcome.completion_tokens);
    let served = plan.served_by.get();
    // A relayed answer carries the serving node's passages.
    let sources = if sources.is_empty() {
        plan.served_by.sources()
    } else {
        sources
    };
    if plan.settings.stream {
        let chunks = replay_chunks(&st, &plan, &meta, &outcome, &sources);
        return Ok(ChatReply::Stream(Box::pin(stream::iter(chunks)), served));
    }
    let choices: Vec<Json> = outcome
        .choices
        .iter()
        .enumerate()
        .map(|(i, o)| chat_choice_json(&st, &plan, i, o))
        .collect();
    let mut body = meta.envelope(false, Json::Array(choices));
    body["usage"] = usage_json(
        outcome.prompt_tokens,
        outcome.completion_tokens,
        outcome.cached_tokens,
    );
    extensions(&mut body, &sources, &outcome.executed);
    if let Some(node) = &served {
        body["served_by"] = json!(node);
    }
    Ok(ChatReply::Whole(body, served))
}

/// Adds the [`SERVED_BY_HEADER`] naming the serving node.
pub(crate) fn served_header(mut response: Response, node: Option<String>) -> Response {
    if let Some(value) = node.and_then(|n| axum::http::HeaderValue::from_str(&n).ok()) {
        response.headers_mut().insert(SERVED_BY_HEADER, value);
    }
    response
}

/// One message of an OpenAI chat or text completion stream, before it is framed as SSE
/// (other API shapes translate these: [`super::anthropic`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Chunk {
    /// A chunk object, or an error body (`{"error": …}`).
    Data(Json),
    /// The end (`data: [DONE]`).
    Done,
}

/// A stream of [`Chunk`]s.
pub(crate) type Chunks = std::pin::Pin<Box<dyn Stream<Item = Chunk> + Send + 'static>>;

/// Frames server-sent events.
pub(crate) fn sse<S>(stream: S) -> Response
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The OpenAI framing of chunks: `data: {…}` and `data: [DONE]`.
fn openai_sse(chunks: Chunks) -> Response {
    sse(chunks.map(|c| {
        Ok(match c {
            Chunk::Data(value) => Event::default().data(value.to_string()),
            Chunk::Done => Event::default().data("[DONE]"),
        })
    }))
}

/// One named server-sent event (`event: <name>`) and its data.
pub(crate) type Named = (&'static str, Json);

/// Turns an OpenAI chunk stream into another API's named events.
pub(crate) trait Translate: Send + 'static {
    /// The events for one chunk.
    fn feed(&mut self, chunk: Chunk) -> Vec<Named>;
}

/// The chunks as `translator`'s named server-sent events.
pub(crate) fn named_sse(chunks: Chunks, translator: impl Translate) -> Response {
    let stream = chunks
        .scan(translator, |t, chunk| {
            futures::future::ready(Some(stream::iter(t.feed(chunk))))
        })
        .flatten()
        .map(|(name, data)| Ok(Event::default().event(name).data(data.to_string())));
    sse(stream)
}

fn data(value: Json) -> Chunk {
    Chunk::Data(value)
}

fn done_event() -> Chunk {
    Chunk::Done
}

/// The chunks of an answer that was computed whole (node-executed tools ran first).
fn replay_chunks(
    st: &Shared,
    plan: &Plan,
    meta: &Meta,
    outcome: &Outcome,
    sources: &[Source],
) -> Vec<Chunk> {
    let mut events = Vec::new();
    for (i, out) in outcome.choices.iter().enumerate() {
        let choice = chat_choice_json(st, plan, i, out);
        let mut delta = choice["message"].clone();
        if let Some(calls) = delta.get_mut("tool_calls").and_then(Json::as_array_mut) {
            for (k, c) in calls.iter_mut().enumerate() {
                c["index"] = json!(k);
            }
        }
        let first = json!([{"index": i, "delta": delta, "logprobs": choice["logprobs"],
            "finish_reason": null}]);
        events.push(data(meta.envelope(true, first)));
        let last = json!([{"index": i, "delta": {}, "logprobs": null,
            "finish_reason": choice["finish_reason"]}]);
        let mut chunk = meta.envelope(true, last);
        if i + 1 == outcome.choices.len() {
            extensions(&mut chunk, sources, &outcome.executed);
        }
        events.push(data(chunk));
    }
    if plan.settings.include_usage {
        let mut chunk = meta.envelope(true, json!([]));
        chunk["usage"] = usage_json(
            outcome.prompt_tokens,
            outcome.completion_tokens,
            outcome.cached_tokens,
        );
        events.push(data(chunk));
    }
    events.push(done_event());
    events
}

/// Per-choice state of a token stream.
#[derive(Debug, Default)]
struct StreamChoice {
    /// Text held back because it may become a tool call.
    held: String,
    holding: bool,
    started: bool,
    completion_tokens: usize,
    /// Reads tool calls out of the held text, to stream them as they are generated.
    calls: tools::CallScanner,
}

struct TokenStream {
    st: Shared,
    plan: Plan,
    meta: Meta,
    rx: Events,
    _guard: CancelOnDrop,
    choices: Vec<StreamChoice>,
    prompt_tokens: usize,
    cached_tokens: usize,
    done: usize,
    sources: Vec<Source>,
    finished: bool,
}

/// Streams tokens as SSE chunks. Dropping the stream (the client went away) cancels the
/// generation.
fn token_stream(
    st: Shared,
    plan: Plan,
    meta: Meta,
    rx: Events,
    cancel: CancelToken,
    prompt_tokens: usize,
    sources: Vec<Source>,
) -> impl Stream<Item = Chunk> + Send + 'static {
    let holding = plan.choice != ToolChoice::None && !plan.tools.is_empty();
    let n = plan.settings.n;
    let state = TokenStream {
        st,
        plan,
        meta,
        rx,
        _guard: CancelOnDrop::new(cancel),
        choices: (0..n)
            .map(|_| StreamChoice {
                holding,
                ..StreamChoice::default()
            })
            .collect(),
        prompt_tokens,
        cached_tokens: 0,
        done: 0,
        sources,
        finished: false,
    };
    stream::unfold(state, |mut s| async move {
        if s.finished {
            return None;
        }
        let events = s.step().await;
        Some((stream::iter(events), s))
    })
    .flatten()
}

impl TokenStream {
    fn chunk(&self, i: usize, delta: Json, logprobs: Json, finish: Option<&str>) -> Json {
        let choice = match self.meta.flavor {
            Flavor::Chat => json!({"index": i, "delta": delta, "logprobs": logprobs,
                "finish_reason": finish}),
            Flavor::Text => json!({"index": i, "text": delta.get("content").cloned()
                .unwrap_or(json!("")), "logprobs": logprobs, "finish_reason": finish}),
        };
        self.meta.envelope(true, json!([choice]))
    }

    fn content_delta(&mut self, i: usize, text: &str, lp: Json) -> Json {
        let mut delta = json!({"content": text});
        if !self.choices[i].started {
            self.choices[i].started = true;
            if self.meta.flavor == Flavor::Chat {
                delta["role"] = json!("assistant");
            }
        }
        self.chunk(i, delta, lp, None)
    }

    fn token_logprobs(&self, id: u32, logprob: Option<f32>, top: Vec<(u32, f32)>) -> Json {
        let lps = [TokenLogprobs {
            logprob,
            top_logprobs: top,
        }];
        match (self.meta.flavor, self.plan.text_logprobs) {
            (Flavor::Chat, _) if self.plan.settings.sampling.logprobs => {
                chat_logprobs_json(&self.st, &[id], &lps)
            }
            (Flavor::Text, Some(_)) => text_logprobs_json(&self.st, &[id], &lps, 0),
            _ => Json::Null,
        }
    }

    async fn step(&mut self) -> Vec<Chunk> {
        let Some((i, event)) = self.rx.recv().await else {
            self.finished = true;
            return vec![done_event()];
        };
        if i >= self.choices.len() {
            return Vec::new();
        }
        let event = match event {
            Ok(event) => event,
            Err(err) => {
                self.finished = true;
                return vec![data(err.body()), done_event()];
            }
        };
        match event {
            GenerateEvent::Token {
                id,
                text_delta,
                logprob,
                top_logprobs,
            } => {
                self.choices[i].completion_tokens += 1;
                let lp = self.token_logprobs(id, logprob, top_logprobs);
                let c = &mut self.choices[i];
                if c.holding {
                    c.held.push_str(&text_delta);
                    let deltas = c.calls.feed(&c.held, &self.plan.tools);
                    if c.calls.started() {
                        return self.call_deltas(i, deltas);
                    }
                    if tools::may_be_call(&c.held) {
                        return Vec::new();
                    }
                    c.holding = false;
                    let text = std::mem::take(&mut c.held);
                    return vec![data(self.content_delta(i, &text, Json::Null))];
                }
                if text_delta.is_empty() && lp.is_null() {
                    return Vec::new();
                }
                vec![data(self.content_delta(i, &text_delta, lp))]
            }
            GenerateEvent::Done {
                finish_reason,
                usage,
                ..
            } => self.finish_choice(i, finish_reason, usage),
            GenerateEvent::Error(e) => {
                self.finished = true;
                let err = generation_error(e);
                vec![data(err.body()), done_event()]
            }
        }
    }

    /// The chunks of tool-call deltas: a call's id, type and name when it begins, then its
    /// arguments as they come.
    fn call_deltas(&mut self, i: usize, deltas: Vec<tools::CallDelta>) -> Vec<Chunk> {
        let mut events = Vec::new();
        for d in deltas {
            let call = match d {
                tools::CallDelta::Start { index, name } => {
                    json!({"index": index, "id": tools::call_id(), "type": "function",
                        "function": {"name": name, "arguments": ""}})
                }
                tools::CallDelta::Args { index, text } => {
                    json!({"index": index, "function": {"arguments": text}})
                }
            };
            let mut delta = json!({"tool_calls": [call]});
            if !self.choices[i].started {
                self.choices[i].started = true;
                delta["role"] = json!("assistant");
                delta["content"] = Json::Null;
            }
            events.push(data(self.chunk(i, delta, Json::Null, None)));
        }
        events
    }

    fn finish_choice(&mut self, i: usize, finish: FinishReason, usage: Usage) -> Vec<Chunk> {
        let mut events = Vec::new();
        self.choices[i].completion_tokens = usage.completion_tokens;
        self.prompt_tokens = self.prompt_tokens.max(usage.prompt_tokens);
        self.cached_tokens = self.cached_tokens.max(usage.cached_tokens);
        let held = std::mem::take(&mut self.choices[i].held);
        let mut reason = finish_str(Some(finish));
        if self.choices[i].calls.started() {
            // The calls went out as they were generated; a call the budget cut short ends
            // with `length`, as OpenAI ends it.
            let complete = self.choices[i].calls.calls().iter().all(|c| c.complete);
            reason = if complete || finish != FinishReason::Length {
                "tool_calls"
            } else {
                "length"
            };
        } else if let Some(calls) =
            tools::parse_calls(&held, &self.plan.tools).filter(|_| !held.is_empty())
        {
            let deltas: Vec<Json> = tools::wire_calls(&calls)
                .into_iter()
                .enumerate()
                .map(|(k, c)| {
                    json!({"index": k, "id": c.id, "type": "function",
                        "function": {"name": c.function.name, "arguments": c.function.arguments}})
                })
                .collect();
            let delta = json!({"role": "assistant", "content": null, "tool_calls": deltas});
            events.push(data(self.chunk(i, delta, Json::Null, None)));
            reason = "tool_calls";
        } else if !held.is_empty() || !self.choices[i].started {
            events.push(data(self.content_delta(i, &held, Json::Null)));
        }
        let delta = match self.meta.flavor {
            Flavor::Chat => json!({}),
            Flavor::Text => json!({"content": ""}),
        };
        let mut last = self.chunk(i, delta, Json::Null, Some(reason));
        self.done += 1;
        if self.done == self.choices.len() {
            if self.sources.is_empty() {
                // A relayed answer: the serving node's passages.
                self.sources = self.plan.served_by.sources();
            }
            if !self.sources.is_empty() {
                last["sources"] = json!(self.sources);
            }
            events.push(data(last));
            let completion: usize = self.choices.iter().map(|c| c.completion_tokens).sum();
            self.st.metrics.tokens(self.prompt_tokens, completion);
            if self.plan.settings.include_usage {
                let mut chunk = self.meta.envelope(true, json!([]));
                chunk["usage"] = usage_json(self.prompt_tokens, completion, self.cached_tokens);
                events.push(data(chunk));
            }
            events.push(done_event());
            self.finished = true;
        } else {
            events.push(data(last));
        }
        events
    }
}

/// `POST /v1/completions`
pub async fn completions(
    State(st): State<Shared>,
    axum::Extension(caller): axum::Extension<Caller>,
    Body(req): Body<CompletionRequest>,
) -> Result<Response, ApiError> {
    st.check_chat_model(&req.model)?;
    st.models()?;
    let prompt = match req.prompt {
        Prompt::Text(t) => t,
        Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Many(_) => {
            return Err(ApiError::unsupported(
                "prompt",
                "send exactly one prompt per request",
            ));
        }
    };
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported(
            "suffix",
            "insertion is not implemented",
        ));
    }
    let mut settings = types::validate_common(&req.common, req.common.max_tokens, limits(&st))?;
    if req.best_of.is_some_and(|b| b != settings.n as u64) {
        return Err(ApiError::unsupported("best_of", "only best_of equal to n"));
    }
    let text_logprobs = match req.logprobs {
        None => None,
        Some(k) if k <= 5 => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("`logprobs` is {k}; at most 5"),
            ));
        }
    };
    settings.sampling.logprobs = text_logprobs.is_some();
    settings.sampling.top_logprobs = text_logprobs.unwrap_or(0);
    let mut plan = Plan::text(settings, text_logprobs);
    if st.payments.is_some() {
        let bound = billing::token_bound(prompt.len(), &plan.settings, &st.config);
        plan.tab = billing::open_tab(&st, &caller, bound)
            .await?
            .map(std::sync::Arc::new);
    }
    let echo = req.echo.unwrap_or(false);
    let meta = Meta::new(&st, Flavor::Text, &req.model);
    let cancel = CancelToken::new();
    let (reqs, prompt_len) = agent::text_requests(&st, &plan, prompt.clone(), &cancel).await?;
    if plan.settings.stream {
        if echo {
            return Err(ApiError::unsupported(
                "echo",
                "echo is not supported with stream",
            ));
        }
        let rx = Events::Local(submit(&st, reqs, &cancel)?, plan.tab.clone());
        return Ok(openai_sse(Box::pin(token_stream(
            st,
            plan,
            meta,
            rx,
            cancel,
            prompt_len,
            Vec::new(),
        ))));
    }
    let rx = Events::Local(submit(&st, reqs, &cancel)?, plan.tab.clone());
    let outs = collect(rx, plan.settings.n, &cancel).await?;
    let completion: usize = outs.iter().map(|o| o.usage.completion_tokens).sum();
    let cached = outs.first().map_or(0, |o| o.usage.cached_tokens);
    st.metrics.tokens(prompt_len, completion);
    let choices: Vec<Json> = outs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let text = if echo {
                format!("{prompt}{}", o.text)
            } else {
                o.text.clone()
            };
            let offset = if echo { prompt.len() } else { 0 };
            let lp = if plan.text_logprobs.is_some() {
                text_logprobs_json(&st, &o.tokens, &o.logprobs, offset)
            } else {
                Json::Null
            };
            json!({"index": i, "text": text, "logprobs": lp, "finish_reason": finish_str(o.finish)})
        })
        .collect();
    let mut body = meta.envelope(false, Json::Array(choices));
    body["usage"] = usage_json(prompt_len, completion, cached);
    Ok(axum::Json(body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_reasons() {
        assert_eq!(finish_str(Some(FinishReason::Stop)), "stop");
        assert_eq!(finish_str(Some(FinishReason::Cancelled)), "length");
        assert_eq!(usage_json(2, 3, 1)["total_tokens"], 5);
        assert_eq!(
            usage_json(2, 3, 1)["prompt_tokens_details"]["cached_tokens"],
            1
        );
    }
}
