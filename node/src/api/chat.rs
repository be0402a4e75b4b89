//! `POST /v1/chat/completions` and `POST /v1/completions`.
//!
//! Life of a chat request: the body is parsed and checked ([`super::types`]); the knowledge base
//! is searched with the last user message and the context injected ([`super::rag`]); the
//! conversation is rendered with the chat template (tools described per [`super::tools`]) and
//! tokenized off the runtime; constraints are compiled (response_format, enforced tool calls);
//! the generations are queued on the [`crate::engine::Engine`]; events are collected (or
//! streamed as SSE chunks); tool calls of node-executed tools are run and the loop continues.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream, StreamExt};
use gaia_inference::generate::{
    CancelToken, FinishReason, GenerateError, GenerateEvent, GenerateRequest, TokenLogprobs, Usage,
};
use gaia_inference::llm::LlmError;
use gaia_inference::sampling::SamplingError;
use gaia_inference::template::{ChatMessage, MessageContent, RenderOptions};
use serde_json::{Value as Json, json};

use super::error::{ApiError, Body, BodyJson};
use super::rag::{self, Source};
use super::tools::{self, Tool};
use super::types::{
    self, ChatRequest, CompletionRequest, GenSettings, Limits, Prompt, ResponseFormat, ToolChoice,
};
use super::{Shared, now_secs};
use crate::engine::{CancelOnDrop, Job, TaggedEvent};
use crate::swarm::{RelayEvent, RelayStream, SwarmHandle};
use gaia_protocol::NodeId;
use gaia_protocol::machine::failover::{self, ClientOutput, FailoverError};
use gaia_protocol::machine::router::Needs;
use gaia_protocol::stream::{ErrorCode, Resume};

/// The response header that names the node that served a chat completion.
pub const SERVED_BY_HEADER: &str = "x-gaia-node";

/// Events buffered between a generation thread and its HTTP response.
const EVENT_BUFFER: usize = 64;

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

/// What the output must be.
#[derive(Debug, Clone)]
enum Output {
    Text,
    Json(Json),
}

/// A checked chat request.
#[derive(Debug, Clone)]
struct Plan {
    settings: GenSettings,
    tools: Vec<Tool>,
    choice: ToolChoice,
    parallel: bool,
    output: Output,
    rag: bool,
    /// Completions' `logprobs` (alternatives per token), in the text flavor.
    text_logprobs: Option<usize>,
    /// Where the rounds run.
    route: Route,
    /// The node that served the request (the last round's), for the response.
    served_by: ServedBy,
}

/// Where a chat request's rounds run.
#[derive(Debug, Clone)]
enum Route {
    /// On this node's engine.
    Local,
    /// On a node of the domain, through the swarm (with failover).
    Swarm(Box<Relayed>),
}

/// What a routed request needs to relay its rounds.
#[derive(Debug, Clone)]
struct Relayed {
    handle: SwarmHandle,
    /// The node the router picked for the first attempt.
    first: NodeId,
    needs: Needs,
    /// The client's request body, the base of each round's relayed body.
    raw: Arc<Json>,
}

/// The node serving a request, shared between the round driver and the response.
#[derive(Debug, Clone, Default)]
struct ServedBy(Arc<std::sync::Mutex<Option<String>>>);

impl ServedBy {
    fn set(&self, node: impl ToString) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(node.to_string());
        }
    }

    fn get(&self) -> Option<String> {
        self.0.lock().ok().and_then(|slot| slot.clone())
    }
}

/// What one round's consumer receives: the generation's events, or (for a relayed round)
/// the failure the swarm reports.
enum Events {
    Local(tokio::sync::mpsc::Receiver<TaggedEvent>),
    Relayed(tokio::sync::mpsc::Receiver<Result<GenerateEvent, ApiError>>),
}

impl Events {
    /// The next event of choice `.0`; `None` when the generation ended without one.
    async fn recv(&mut self) -> Option<(usize, Result<GenerateEvent, ApiError>)> {
        match self {
            Events::Local(rx) => rx.recv().await.map(|(i, event)| match event {
                GenerateEvent::Error(e) => (i, Err(generation_error(e))),
                other => (i, Ok(other)),
            }),
            Events::Relayed(rx) => rx.recv().await.map(|event| (0, event)),
        }
    }
}

impl Plan {
    fn node_tools_active(&self) -> bool {
        self.choice != ToolChoice::None && self.tools.iter().any(|t| t.node)
    }
}

fn limits(st: &Shared) -> Limits {
    Limits {
        max_tokens: st.config.server.max_tokens,
        max_n: st.config.server.max_n,
        // A gateway has no vocabulary: the serving node checks token ids.
        vocab: st.local.as_ref().map_or(u32::MAX as usize, |m| {
            m.engine.model().tokenizer().vocab_size()
        }),
    }
}

/// The OpenAI rules for one message: a known role; content on system, user and tool messages;
/// an assistant message has content or tool calls; a tool message names the call it answers.
fn check_message(i: usize, m: &ChatMessage) -> Result<(), ApiError> {
    let param = format!("messages[{i}]");
    let has_content = m.content.is_some();
    let problem = match m.role.as_str() {
        "system" | "developer" | "user" if !has_content => Some("has no `content`"),
        "assistant" if !has_content && m.tool_calls.as_ref().is_none_or(|c| c.is_empty()) => {
            Some("has neither `content` nor `tool_calls`")
        }
        "tool" if !has_content => Some("has no `content`"),
        "tool" if m.tool_call_id.is_none() => Some("is a `tool` message without `tool_call_id`"),
        "system" | "developer" | "user" | "assistant" | "tool" => None,
        _ => Some("has an unknown `role`; use system, developer, user, assistant or tool"),
    };
    match problem {
        Some(what) => Err(ApiError::invalid(&param, format!("`{param}` {what}"))),
        None => Ok(()),
    }
}

/// Checks a chat request. `node_tools`: offer the node-executed tools of `[[tools]]` (not on
/// a relayed request: the entry node runs those).
fn chat_plan(st: &Shared, req: &ChatRequest, node_tools: bool) -> Result<Plan, ApiError> {
    st.check_chat_model(&req.model)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must not be empty",
        ));
    }
    if req.messages.len() > types::MAX_MESSAGES {
        return Err(ApiError::invalid(
            "messages",
            format!("at most {} messages", types::MAX_MESSAGES),
        ));
    }
    for (i, message) in req.messages.iter().enumerate() {
        check_message(i, message)?;
    }
    if req.common.max_tokens.is_some() && req.max_completion_tokens.is_some() {
        return Err(ApiError::invalid(
            "max_completion_tokens",
            "give `max_tokens` or `max_completion_tokens`, not both",
        ));
    }
    let max = req.max_completion_tokens.or(req.common.max_tokens);
    let mut settings = types::validate_common(&req.common, max, limits(st))?;
    types::chat_logprobs(&mut settings.sampling, req.logprobs, req.top_logprobs)?;
    let configured: &[crate::config::ToolConfig] = if node_tools { &st.config.tools } else { &[] };
    let tools = tools::collect(req.tools.as_deref(), configured)?;
    let choice = types::tool_choice(req.tool_choice.as_ref(), !tools.is_empty())?;
    if let ToolChoice::Named(name) = &choice
        && !tools.iter().any(|t| &t.name == name)
    {
        return Err(ApiError::invalid(
            "tool_choice",
            format!("`tool_choice` names {name:?}, which is not among the tools"),
        ));
    }
    let output = match &req.response_format {
        None | Some(ResponseFormat::Text) => Output::Text,
        Some(ResponseFormat::JsonObject) => Output::Json(json!({"type": "object"})),
        Some(ResponseFormat::JsonSchema { json_schema }) => Output::Json(
            json_schema
                .schema
                .clone()
                .unwrap_or_else(|| json!({"type": "object"})),
        ),
    };
    if matches!(output, Output::Json(_))
        && matches!(choice, ToolChoice::Required | ToolChoice::Named(_))
    {
        return Err(ApiError::invalid(
            "response_format",
            "`response_format` cannot be combined with a required tool call",
        ));
    }
    Ok(Plan {
        settings,
        tools,
        choice,
        parallel: req.parallel_tool_calls.unwrap_or(true),
        output,
        rag: req.rag.unwrap_or(true),
        text_logprobs: None,
        route: Route::Local,
        served_by: ServedBy::default(),
    })
}

/// The schema the output is constrained to in one round, if any.
fn round_schema(plan: &Plan, choice: &ToolChoice) -> Option<Json> {
    match choice {
        ToolChoice::Required | ToolChoice::Named(_) => {
            Some(tools::call_schema(&plan.tools, choice, plan.parallel))
        }
        _ => match &plan.output {
            Output::Json(schema) => Some(schema.clone()),
            Output::Text => None,
        },
    }
}

/// Renders and tokenizes the conversation for one round.
fn render(
    st: &Shared,
    plan: &Plan,
    messages: &[ChatMessage],
    choice: &ToolChoice,
) -> Result<Vec<u32>, ApiError> {
    let model = st.engine()?.model();
    let template = model.template();
    let native = template.supports_tools();
    let offered = *choice != ToolChoice::None && !plan.tools.is_empty();
    let mut msgs = if native {
        messages.to_vec()
    } else {
        tools::lower_messages(messages)
    };
    if offered && !native {
        let text = tools::system_prompt(&plan.tools);
        prepend_system(&mut msgs, &text);
    }
    let prompt = &st.config.agent.system_prompt;
    if !prompt.is_empty() && !msgs.iter().any(|m| m.role == "system") {
        msgs.insert(0, ChatMessage::new("system", prompt.clone()));
    }
    let schemas: Vec<Json> = plan.tools.iter().map(Tool::openai).collect();
    let rendered = template
        .render(
            &msgs,
            &RenderOptions {
                add_generation_prompt: true,
                tools: (offered && native).then_some(schemas.as_slice()),
                ..RenderOptions::default()
            },
        )
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    rendered
        .tokenize(model.tokenizer())
        .map_err(|e| ApiError::invalid("messages", e.to_string()))
}

/// Adds `text` to the first system message, or inserts one.
pub(super) fn prepend_system(msgs: &mut Vec<ChatMessage>, text: &str) {
    if let Some(first) = msgs.first_mut()
        && first.role == "system"
    {
        let old = match &first.content {
            Some(MessageContent::Text(t)) => t.clone(),
            Some(MessageContent::Parts(parts)) => parts
                .iter()
                .filter_map(|p| p.text.clone())
                .collect::<Vec<_>>()
                .join("\n"),
            None => String::new(),
        };
        first.content = Some(MessageContent::Text(format!("{old}\n\n{text}")));
        return;
    }
    msgs.insert(0, ChatMessage::new("system", text));
}

/// Builds the `n` generation requests of one round (constraints compiled here).
fn requests(
    st: &Shared,
    plan: &Plan,
    prompt: Vec<u32>,
    schema: Option<&Json>,
    cancel: &CancelToken,
) -> Result<Vec<GenerateRequest>, ApiError> {
    let model = st.engine()?.model();
    let ctx = model.model().max_context();
    if prompt.len() >= ctx {
        return Err(ApiError::context_length(format!(
            "the prompt is {} tokens; this model's context is {ctx} tokens; shorten the messages",
            prompt.len()
        )));
    }
    let room = ctx - prompt.len();
    let max_tokens = match plan.settings.max_tokens {
        Some(m) if m > room => {
            return Err(ApiError::context_length(format!(
                "the prompt ({} tokens) plus max_tokens ({m}) exceeds this model's context of \
                 {ctx} tokens; lower max_tokens or shorten the messages",
                prompt.len()
            )));
        }
        Some(m) => m,
        None => room.min(st.config.server.max_tokens),
    };
    let mut out = Vec::with_capacity(plan.settings.n);
    for i in 0..plan.settings.n {
        let constraint = match schema {
            None => None,
            Some(s) => Some(
                model
                    .constraints()
                    .and_then(|f| f.json_schema(s).map_err(GenerateError::from))
                    .map_err(|e| ApiError::invalid("response_format", e.to_string()))?,
            ),
        };
        let mut sampling = plan.settings.sampling.clone();
        sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
        out.push(GenerateRequest {
            prompt: prompt.clone(),
            sampling,
            max_tokens: Some(max_tokens),
            stop: plan.settings.stop.clone(),
            constraint,
            cancel: cancel.clone(),
        });
    }
    Ok(out)
}

/// Prepares one chat round (off the runtime) and queues it on this node's engine, or relays
/// it to the node the route names. `resume`: the text another node already generated for
/// this round (a relayed request that failed over); the round continues after it.
async fn start_round(
    st: &Shared,
    plan: &Plan,
    messages: Vec<ChatMessage>,
    choice: ToolChoice,
    cancel: &CancelToken,
    resume: Option<Resume>,
) -> Result<(Events, usize), ApiError> {
    if let Route::Swarm(_) = &plan.route {
        return relay_round(st, plan, &messages, &choice).await;
    }
    plan.served_by
        .set(st.info.address.as_deref().unwrap_or("local"));
    let (st2, plan2, cancel2) = (Arc::clone(st), plan.clone(), cancel.clone());
    let prepared = tokio::task::spawn_blocking(move || {
        let mut prompt = render(&st2, &plan2, &messages, &choice)?;
        let len = prompt.len();
        let resumed = match resume.as_ref().filter(|r| !r.text.is_empty()) {
            Some(r) => st2
                .engine()?
                .model()
                .tokenizer()
                .encode_continuation(&r.text)
                .map_err(|e| {
                    ApiError::bad_request(format!("cannot tokenize the resumed text: {e}"))
                })?,
            None => Vec::new(),
        };
        prompt.extend_from_slice(&resumed);
        let schema = round_schema(&plan2, &choice);
        let mut reqs = requests(&st2, &plan2, prompt, schema.as_ref(), &cancel2)?;
        for req in &mut reqs {
            if let Some(constraint) = req.constraint.as_mut() {
                for &id in &resumed {
                    constraint.commit_token(id).map_err(|e| {
                        ApiError::bad_request(format!(
                            "the resumed text does not fit the requested output format: {e}"
                        ))
                    })?;
                }
            }
        }
        Ok::<_, ApiError>((reqs, len))
    })
    .await
    .map_err(|e| ApiError::internal(format!("preparing the prompt failed: {e}")))??;
    let (reqs, prompt_len) = prepared;
    Ok((Events::Local(submit(st, reqs, cancel)?), prompt_len))
}

fn submit(
    st: &Shared,
    requests: Vec<GenerateRequest>,
    cancel: &CancelToken,
) -> Result<tokio::sync::mpsc::Receiver<TaggedEvent>, ApiError> {
    let (tx, rx) = tokio::sync::mpsc::channel(EVENT_BUFFER);
    st.engine()?.submit(Job {
        requests,
        cancel: cancel.clone(),
        events: tx,
    })?;
    Ok(rx)
}

/// Decides where a chat request runs: here, or on the node of the domain the router picks
/// (load- and capability-aware; it may pick this node). Requests that only this node can
/// serve (`n` > 1, log-probabilities) stay here; a gateway refuses them.
async fn choose_route(st: &Shared, plan: &Plan, model: &str, raw: Json) -> Result<Route, ApiError> {
    let Some(handle) = &st.swarm else {
        st.models()?;
        return Ok(Route::Local);
    };
    let local_only = plan.settings.n > 1 || plan.settings.sampling.logprobs;
    if local_only {
        if st.local.is_some() {
            return Ok(Route::Local);
        }
        let param = if plan.settings.n > 1 { "n" } else { "logprobs" };
        return Err(ApiError::unsupported(
            param,
            "a gateway relays one choice without log-probabilities; send n = 1 without \
             logprobs, or ask a serving node directly",
        ));
    }
    let constrained = matches!(plan.output, Output::Json(_))
        || matches!(plan.choice, ToolChoice::Required | ToolChoice::Named(_));
    let needs = Needs {
        model: (model != "default").then(|| model.to_string()),
        tools: plan.choice != ToolChoice::None && !plan.tools.is_empty(),
        structured_output: constrained,
        min_context: plan
            .settings
            .max_tokens
            .map_or(0, |m| u32::try_from(m).unwrap_or(u32::MAX)),
    };
    match handle.pick(&needs).await {
        Ok(Ok(node)) if node == handle.node_id() => Ok(Route::Local),
        Ok(Ok(node)) => Ok(Route::Swarm(Box::new(Relayed {
            handle: handle.clone(),
            first: node,
            needs,
            raw: Arc::new(raw),
        }))),
        // No other node qualifies, or the swarm is not answering: serve here if we can.
        _ if st.local.is_some() => Ok(Route::Local),
        Ok(Err(route)) => Err(ApiError::unavailable(route.to_string())),
        Err(e) => Err(ApiError::unavailable(e.to_string())),
    }
}

/// The OpenAI body of one relayed round: the client's body with this round's messages, the
/// tools (node-executed ones as plain functions: this node runs them) and tool choice, one
/// choice, not streamed.
fn round_body(raw: &Json, plan: &Plan, messages: &[ChatMessage], choice: &ToolChoice) -> Json {
    let mut body = raw.clone();
    let Some(object) = body.as_object_mut() else {
        return body;
    };
    for field in ["stream", "stream_options", "n", "logprobs", "top_logprobs"] {
        object.remove(field);
    }
    object.insert("messages".into(), json!(messages));
    if plan.tools.is_empty() {
        object.remove("tools");
        object.remove("tool_choice");
        object.remove("parallel_tool_calls");
    } else {
        let specs: Vec<Json> = plan.tools.iter().map(Tool::openai).collect();
        object.insert("tools".into(), Json::Array(specs));
        let wire = match choice {
            ToolChoice::None => json!("none"),
            ToolChoice::Auto => json!("auto"),
            ToolChoice::Required => json!("required"),
            ToolChoice::Named(name) => json!({"type": "function", "function": {"name": name}}),
        };
        object.insert("tool_choice".into(), wire);
    }
    body
}

/// Relays one round to the domain (failover included) and turns its events into generation
/// events. Returns once the first output arrived, so that a request no node can serve gets
/// its HTTP error status, and the response names the node that serves it.
async fn relay_round(
    st: &Shared,
    plan: &Plan,
    messages: &[ChatMessage],
    choice: &ToolChoice,
) -> Result<(Events, usize), ApiError> {
    let Route::Swarm(relayed) = &plan.route else {
        return Err(ApiError::internal("a local round was relayed"));
    };
    let Relayed {
        handle,
        first,
        needs,
        raw,
    } = relayed.as_ref();
    let body = round_body(raw, plan, messages, choice).to_string();
    let mut stream = handle.chat_via(
        Some(*first),
        needs.clone(),
        body,
        failover::Config::default(),
    );
    let (tx, rx) = tokio::sync::mpsc::channel(EVENT_BUFFER);
    loop {
        match stream.recv().await {
            Some(RelayEvent::Serving { node, .. }) => plan.served_by.set(node),
            Some(RelayEvent::Failed(error)) => return Err(failover_error(error)),
            None => {
                return Err(ApiError::unavailable(
                    "the swarm stopped while routing the request; retry",
                ));
            }
            Some(event) => {
                count_failovers(st, &event);
                if let Some(event) = relay_event(&plan.served_by, event) {
                    let _ = tx.send(event).await;
                }
                break;
            }
        }
    }
    tokio::spawn(forward_relay(
        Arc::clone(st),
        stream,
        tx,
        plan.served_by.clone(),
    ));
    Ok((Events::Relayed(rx), 0))
}

/// Forwards a relayed round's events until its end, or until the consumer goes away (which
/// drops the relay stream and so cancels the generation on the serving node).
async fn forward_relay(
    st: Shared,
    mut stream: RelayStream,
    tx: tokio::sync::mpsc::Sender<Result<GenerateEvent, ApiError>>,
    served_by: ServedBy,
) {
    loop {
        let event = tokio::select! {
            event = stream.recv() => event,
            () = tx.closed() => return,
        };
        let Some(event) = event else { return };
        count_failovers(&st, &event);
        let last = matches!(event, RelayEvent::Done { .. } | RelayEvent::Failed(_));
        if let Some(event) = relay_event(&served_by, event)
            && tx.send(event).await.is_err()
        {
            return;
        }
        if last {
            return;
        }
    }
}

/// Counts the failovers of a routed chat when it ends.
fn count_failovers(st: &Shared, event: &RelayEvent) {
    let attempts = match event {
        RelayEvent::Done { attempts, .. } => *attempts,
        RelayEvent::Failed(
            FailoverError::Exhausted { attempts, .. } | FailoverError::NoRoute { attempts, .. },
        ) => *attempts,
        _ => return,
    };
    st.metrics.failovers(attempts.saturating_sub(1));
}

/// One relay event as a generation event (`None`: nothing for the client).
fn relay_event(served_by: &ServedBy, event: RelayEvent) -> Option<Result<GenerateEvent, ApiError>> {
    match event {
        RelayEvent::Serving { node, .. } => {
            served_by.set(node);
            None
        }
        RelayEvent::Output(ClientOutput::Token(token)) => Some(Ok(GenerateEvent::Token {
            id: 0,
            text_delta: token.text,
            logprob: token.logprob,
            top_logprobs: Vec::new(),
        })),
        // Gaia nodes send tool calls as text (parsed here); a peer's structured call is
        // passed on in the same JSON shape.
        RelayEvent::Output(ClientOutput::ToolCall(call)) => Some(Ok(GenerateEvent::Token {
            id: 0,
            text_delta: json!({"tool_calls": [{"name": call.name,
                "arguments": serde_json::from_str::<Json>(&call.arguments)
                    .unwrap_or(Json::String(call.arguments))}]})
            .to_string(),
            logprob: None,
            top_logprobs: Vec::new(),
        })),
        RelayEvent::Done {
            node,
            usage,
            finish_reason,
            ..
        } => {
            served_by.set(node);
            Some(Ok(GenerateEvent::Done {
                finish_reason: match finish_reason {
                    gaia_protocol::stream::FinishReason::Stop => FinishReason::Stop,
                    _ => FinishReason::Length,
                },
                usage: Usage {
                    prompt_tokens: usage.prompt_tokens as usize,
                    completion_tokens: usage.completion_tokens as usize,
                },
                timings: Default::default(),
            }))
        }
        RelayEvent::Failed(error) => Some(Err(failover_error(error))),
    }
}

/// The client's error for a routed request that failed.
fn failover_error(error: FailoverError) -> ApiError {
    match &error {
        FailoverError::Refused { code, message, .. } => match code {
            ErrorCode::BadRequest => ApiError::bad_request(message.clone()),
            ErrorCode::TooLarge => ApiError::context_length(message.clone()),
            ErrorCode::Busy => ApiError::busy(message.clone()),
            _ => ApiError::unavailable(error.to_string()),
        },
        _ => ApiError::unavailable(error.to_string()),
    }
}

/// Maps a generation failure to the client's error.
fn generation_error(e: GenerateError) -> ApiError {
    match e {
        GenerateError::Llm(LlmError::ContextOverflow { limit, requested }) => {
            ApiError::context_length(format!(
                "the request needs {requested} tokens of context; this model has {limit}"
            ))
        }
        GenerateError::Llm(other) => ApiError::internal(format!("the model failed: {other}")),
        GenerateError::Sampling(SamplingError::LogitsSize { .. })
        | GenerateError::VocabMismatch { .. } => ApiError::internal(e.to_string()),
        other => ApiError::bad_request(other.to_string()),
    }
}

/// One finished choice.
#[derive(Debug, Clone, Default)]
struct ChoiceOut {
    text: String,
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprobs>,
    finish: Option<FinishReason>,
    usage: Usage,
    calls: Option<Vec<(String, Json)>>,
}

/// Waits for all `n` choices of a round. Cancel-safe: dropping it cancels the generation.
async fn collect(
    mut rx: Events,
    n: usize,
    cancel: &CancelToken,
) -> Result<Vec<ChoiceOut>, ApiError> {
    let guard = CancelOnDrop::new(cancel.clone());
    let mut outs = vec![ChoiceOut::default(); n];
    let mut done = 0;
    while done < n {
        let Some((i, event)) = rx.recv().await else {
            return Err(ApiError::unavailable(
                "the generation stopped before finishing; the node may be shutting down",
            ));
        };
        let Some(out) = outs.get_mut(i) else { continue };
        match event? {
            GenerateEvent::Token {
                id,
                text_delta,
                logprob,
                top_logprobs,
            } => {
                out.text.push_str(&text_delta);
                out.tokens.push(id);
                out.logprobs.push(TokenLogprobs {
                    logprob,
                    top_logprobs,
                });
            }
            GenerateEvent::Done {
                finish_reason,
                usage,
                ..
            } => {
                out.finish = Some(finish_reason);
                out.usage = usage;
                done += 1;
            }
            GenerateEvent::Error(e) => return Err(generation_error(e)),
        }
    }
    guard.disarm();
    Ok(outs)
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

fn usage_json(prompt: usize, completion: usize) -> Json {
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion})
}

/// A node-executed call and its result, reported in the `tool_results` extension field.
#[derive(Debug, Clone, serde::Serialize)]
struct Executed {
    name: String,
    arguments: Json,
    result: String,
    ok: bool,
}

/// The result of a (possibly multi-round) chat.
#[derive(Debug, Default)]
struct Outcome {
    choices: Vec<ChoiceOut>,
    prompt_tokens: usize,
    completion_tokens: usize,
    executed: Vec<Executed>,
}

/// Runs rounds until the model answers without calling a node-executed tool.
async fn run_rounds(
    st: &Shared,
    plan: &Plan,
    mut messages: Vec<ChatMessage>,
    cancel: &CancelToken,
) -> Result<Outcome, ApiError> {
    let max_rounds = st.config.agent.max_tool_rounds;
    let mut outcome = Outcome::default();
    for round in 0..=max_rounds {
        let choice = if round == 0 {
            plan.choice.clone()
        } else if round >= max_rounds || plan.choice == ToolChoice::None {
            ToolChoice::None
        } else {
            ToolChoice::Auto
        };
        let (rx, _) = start_round(st, plan, messages.clone(), choice.clone(), cancel, None).await?;
        let mut outs = collect(rx, plan.settings.n, cancel).await?;
        outcome.prompt_tokens += outs.first().map_or(0, |o| o.usage.prompt_tokens);
        outcome.completion_tokens += outs
            .iter()
            .map(|o| o.usage.completion_tokens)
            .sum::<usize>();
        if choice != ToolChoice::None {
            for out in &mut outs {
                out.calls = tools::parse_calls(&out.text, &plan.tools);
            }
        }
        let node_calls = match outs.as_slice() {
            [only] => only.calls.as_ref().filter(|calls| {
                calls
                    .iter()
                    .all(|(name, _)| plan.tools.iter().any(|t| &t.name == name && t.node))
            }),
            _ => None,
        };
        let Some(calls) = node_calls.cloned() else {
            outcome.choices = outs;
            return Ok(outcome);
        };
        let wire = tools::wire_calls(&calls);
        let mut assistant = ChatMessage::new("assistant", "");
        assistant.content = None;
        assistant.tool_calls = Some(wire.clone());
        messages.push(assistant);
        for ((name, args), call) in calls.iter().zip(&wire) {
            let executed = execute_node_tool(st, name, args).await;
            let mut msg = ChatMessage::new("tool", executed.result.clone());
            msg.tool_call_id = call.id.clone();
            msg.name = Some(name.clone());
            messages.push(msg);
            outcome.executed.push(executed);
        }
    }
    Err(ApiError::internal("the tool loop ended without an answer"))
}

async fn execute_node_tool(st: &Shared, name: &str, args: &Json) -> Executed {
    let Some(tool) = st.config.tools.iter().find(|t| t.name == name) else {
        return Executed {
            name: name.into(),
            arguments: args.clone(),
            result: format!("error: unknown tool {name}"),
            ok: false,
        };
    };
    let result = tools::execute(tool, &st.config.tools_policy, args).await;
    st.metrics.tool_call(name, result.is_ok());
    let (result, ok) = match result {
        Ok(body) => (body, true),
        Err(e) => (format!("error: {e}"), false),
    };
    Executed {
        name: name.into(),
        arguments: args.clone(),
        result,
        ok,
    }
}

fn chat_choice_json(st: &Shared, plan: &Plan, i: usize, out: &ChoiceOut) -> Json {
    let (message, finish) = match &out.calls {
        Some(calls) => (
            json!({"role": "assistant", "content": null, "tool_calls": tools::wire_calls(calls)}),
            "tool_calls",
        ),
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

/// `POST /v1/chat/completions`
pub async fn chat_completions(
    State(st): State<Shared>,
    BodyJson(req, raw): BodyJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let mut plan = chat_plan(&st, &req, true)?;
    plan.route = choose_route(&st, &plan, &req.model, raw).await?;
    st.metrics.route(matches!(plan.route, Route::Swarm(_)));
    let meta = Meta::new(&st, Flavor::Chat, &req.model);
    let mut messages = req.messages;
    // A relayed request is augmented by the node that serves it, from its own copy of the
    // domain's knowledge base.
    let sources = if plan.rag && matches!(plan.route, Route::Local) {
        rag::augment(&st, &mut messages).await?
    } else {
        Vec::new()
    };
    let cancel = CancelToken::new();
    if plan.settings.stream && !plan.node_tools_active() {
        let (rx, prompt_len) =
            start_round(&st, &plan, messages, plan.choice.clone(), &cancel, None).await?;
        let served = plan.served_by.get();
        let stream = token_stream(st, plan, meta, rx, cancel, prompt_len, sources);
        return Ok(served_header(sse(stream), served));
    }
    let outcome = run_rounds(&st, &plan, messages, &cancel).await?;
    st.metrics
        .tokens(outcome.prompt_tokens, outcome.completion_tokens);
    let served = plan.served_by.get();
    if plan.settings.stream {
        return Ok(served_header(
            sse(stream::iter(replay_chunks(
                &st, &plan, &meta, &outcome, &sources,
            ))),
            served,
        ));
    }
    let choices: Vec<Json> = outcome
        .choices
        .iter()
        .enumerate()
        .map(|(i, o)| chat_choice_json(&st, &plan, i, o))
        .collect();
    let mut body = meta.envelope(false, Json::Array(choices));
    body["usage"] = usage_json(outcome.prompt_tokens, outcome.completion_tokens);
    extensions(&mut body, &sources, &outcome.executed);
    if let Some(node) = &served {
        body["served_by"] = json!(node);
    }
    Ok(served_header(axum::Json(body).into_response(), served))
}

/// Adds the [`SERVED_BY_HEADER`] naming the serving node.
fn served_header(mut response: Response, node: Option<String>) -> Response {
    if let Some(value) = node.and_then(|n| axum::http::HeaderValue::from_str(&n).ok()) {
        response.headers_mut().insert(SERVED_BY_HEADER, value);
    }
    response
}

/// Serves a chat request that a peer routed to this node (or that this node's own router
/// sent to itself), the way the HTTP API serves it: the agent's system prompt, retrieval from
/// this node's knowledge base, the request's tools described in the prompt (the entry node
/// runs node-executed tools), constrained output. One choice; `resume` continues after text
/// another node already sent, with `max_tokens` tokens at most.
pub(crate) async fn serve_relayed(
    st: &Shared,
    req: ChatRequest,
    resume: Option<Resume>,
    max_tokens: Option<usize>,
    cancel: &CancelToken,
) -> Result<tokio::sync::mpsc::Receiver<TaggedEvent>, ApiError> {
    let mut plan = chat_plan(st, &req, false)?;
    if plan.settings.n != 1 {
        return Err(ApiError::invalid(
            "n",
            format!(
                "a relayed chat serves one choice, not n = {}; send n = 1",
                plan.settings.n
            ),
        ));
    }
    plan.settings.max_tokens = max_tokens;
    let mut messages = req.messages;
    if plan.rag {
        rag::augment(st, &mut messages).await?;
    }
    match start_round(st, &plan, messages, plan.choice.clone(), cancel, resume).await? {
        (Events::Local(rx), _) => Ok(rx),
        (Events::Relayed(_), _) => Err(ApiError::internal("a relayed chat was relayed again")),
    }
}

fn sse<S>(stream: S) -> Response
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn data(value: &Json) -> Result<Event, Infallible> {
    Ok(Event::default().data(value.to_string()))
}

fn done_event() -> Result<Event, Infallible> {
    Ok(Event::default().data("[DONE]"))
}

/// The chunks of an answer that was computed whole (node-executed tools ran first).
fn replay_chunks(
    st: &Shared,
    plan: &Plan,
    meta: &Meta,
    outcome: &Outcome,
    sources: &[Source],
) -> Vec<Result<Event, Infallible>> {
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
        events.push(data(&meta.envelope(true, first)));
        let last = json!([{"index": i, "delta": {}, "logprobs": null,
            "finish_reason": choice["finish_reason"]}]);
        let mut chunk = meta.envelope(true, last);
        if i + 1 == outcome.choices.len() {
            extensions(&mut chunk, sources, &outcome.executed);
        }
        events.push(data(&chunk));
    }
    if plan.settings.include_usage {
        let mut chunk = meta.envelope(true, json!([]));
        chunk["usage"] = usage_json(outcome.prompt_tokens, outcome.completion_tokens);
        events.push(data(&chunk));
    }
    events.push(done_event());
    events
}

/// Per-choice state of a token stream.
#[derive(Debug, Default, Clone)]
struct StreamChoice {
    /// Text held back because it may become a tool call.
    held: String,
    holding: bool,
    started: bool,
    completion_tokens: usize,
}

struct TokenStream {
    st: Shared,
    plan: Plan,
    meta: Meta,
    rx: Events,
    _guard: CancelOnDrop,
    choices: Vec<StreamChoice>,
    prompt_tokens: usize,
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
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let holding = plan.choice != ToolChoice::None && !plan.tools.is_empty();
    let n = plan.settings.n;
    let state = TokenStream {
        st,
        plan,
        meta,
        rx,
        _guard: CancelOnDrop::new(cancel),
        choices: vec![
            StreamChoice {
                holding,
                ..StreamChoice::default()
            };
            n
        ],
        prompt_tokens,
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

    async fn step(&mut self) -> Vec<Result<Event, Infallible>> {
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
                return vec![data(&err.body()), done_event()];
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
                    if tools::may_be_call(&c.held) {
                        return Vec::new();
                    }
                    c.holding = false;
                    let text = std::mem::take(&mut c.held);
                    return vec![data(&self.content_delta(i, &text, Json::Null))];
                }
                if text_delta.is_empty() && lp.is_null() {
                    return Vec::new();
                }
                vec![data(&self.content_delta(i, &text_delta, lp))]
            }
            GenerateEvent::Done {
                finish_reason,
                usage,
                ..
            } => self.finish_choice(i, finish_reason, usage),
            GenerateEvent::Error(e) => {
                self.finished = true;
                let err = generation_error(e);
                vec![data(&err.body()), done_event()]
            }
        }
    }

    fn finish_choice(
        &mut self,
        i: usize,
        finish: FinishReason,
        usage: Usage,
    ) -> Vec<Result<Event, Infallible>> {
        let mut events = Vec::new();
        self.choices[i].completion_tokens = usage.completion_tokens;
        self.prompt_tokens = self.prompt_tokens.max(usage.prompt_tokens);
        let held = std::mem::take(&mut self.choices[i].held);
        let mut reason = finish_str(Some(finish));
        if let Some(calls) =
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
            events.push(data(&self.chunk(i, delta, Json::Null, None)));
            reason = "tool_calls";
        } else if !held.is_empty() || !self.choices[i].started {
            events.push(data(&self.content_delta(i, &held, Json::Null)));
        }
        let delta = match self.meta.flavor {
            Flavor::Chat => json!({}),
            Flavor::Text => json!({"content": ""}),
        };
        let mut last = self.chunk(i, delta, Json::Null, Some(reason));
        self.done += 1;
        if self.done == self.choices.len() {
            if !self.sources.is_empty() {
                last["sources"] = json!(self.sources);
            }
            events.push(data(&last));
            let completion: usize = self.choices.iter().map(|c| c.completion_tokens).sum();
            self.st.metrics.tokens(self.prompt_tokens, completion);
            if self.plan.settings.include_usage {
                let mut chunk = self.meta.envelope(true, json!([]));
                chunk["usage"] = usage_json(self.prompt_tokens, completion);
                events.push(data(&chunk));
            }
            events.push(done_event());
            self.finished = true;
        } else {
            events.push(data(&last));
        }
        events
    }
}

/// `POST /v1/completions`
pub async fn completions(
    State(st): State<Shared>,
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
    let plan = Plan {
        settings,
        tools: Vec::new(),
        choice: ToolChoice::None,
        parallel: false,
        output: Output::Text,
        rag: false,
        text_logprobs,
        route: Route::Local,
        served_by: ServedBy::default(),
    };
    let echo = req.echo.unwrap_or(false);
    let meta = Meta::new(&st, Flavor::Text, &req.model);
    let cancel = CancelToken::new();
    let (st2, plan2, cancel2, text) = (
        Arc::clone(&st),
        plan.clone(),
        cancel.clone(),
        prompt.clone(),
    );
    let (reqs, prompt_len) = tokio::task::spawn_blocking(move || {
        let tokenizer = st2.engine()?.model().tokenizer();
        let tokens = tokenizer
            .encode_prompt(&text, std::slice::from_ref(&(0..text.len())))
            .map_err(|e| ApiError::invalid("prompt", e.to_string()))?;
        if tokens.is_empty() {
            return Err(ApiError::invalid("prompt", "`prompt` is empty"));
        }
        let len = tokens.len();
        Ok((requests(&st2, &plan2, tokens, None, &cancel2)?, len))
    })
    .await
    .map_err(|e| ApiError::internal(format!("preparing the prompt failed: {e}")))??;
    if plan.settings.stream {
        if echo {
            return Err(ApiError::unsupported(
                "echo",
                "echo is not supported with stream",
            ));
        }
        let rx = Events::Local(submit(&st, reqs, &cancel)?);
        return Ok(sse(token_stream(
            st,
            plan,
            meta,
            rx,
            cancel,
            prompt_len,
            Vec::new(),
        )));
    }
    let rx = Events::Local(submit(&st, reqs, &cancel)?);
    let outs = collect(rx, plan.settings.n, &cancel).await?;
    let completion: usize = outs.iter().map(|o| o.usage.completion_tokens).sum();
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
    body["usage"] = usage_json(prompt_len, completion);
    Ok(axum::Json(body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepend_system_merges_or_inserts() {
        let mut m = vec![ChatMessage::new("user", "hi")];
        prepend_system(&mut m, "ctx");
        assert_eq!(m[0].role, "system");
        prepend_system(&mut m, "more");
        assert_eq!(m.len(), 2);
        let Some(MessageContent::Text(t)) = &m[0].content else {
            panic!()
        };
        assert_eq!(t, "ctx\n\nmore");
    }

    #[test]
    fn finish_reasons() {
        assert_eq!(finish_str(Some(FinishReason::Stop)), "stop");
        assert_eq!(finish_str(Some(FinishReason::Cancelled)), "length");
        assert_eq!(usage_json(2, 3)["total_tokens"], 5);
    }
}
