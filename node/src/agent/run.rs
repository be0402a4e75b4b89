//! Running a chat: the entry points the front ends call. The HTTP API plans and routes a
//! request ([`plan`], [`route`]), retrieves context ([`retrieve`]), then streams one round
//! ([`start_round`]) or runs the tool loop ([`run_rounds`]); the relay server calls
//! [`serve_relayed`]. A round is prepared off the runtime and queued on the engine
//! ([`submit`]), or relayed ([`super::route`]); [`collect`] waits for its choices.

use std::sync::Arc;

use gaia_inference::generate::{
    CancelToken, FinishReason, GenerateError, GenerateEvent, GenerateRequest, TokenLogprobs, Usage,
};
use gaia_inference::llm::LlmError;
use gaia_inference::sampling::SamplingError;
use gaia_inference::template::ChatMessage;
use gaia_protocol::stream::Resume;
use serde_json::Value as Json;

use super::Shared;
use super::error::ApiError;
use super::plan::{Plan, chat_plan};
use super::prompt::{render, requests, round_schema};
use super::rag::{self, Source};
use super::route::{Route, choose_route, relay_round};
use super::tools;
use super::types::{ChatRequest, ToolChoice};
use crate::engine::{CancelOnDrop, Job, TaggedEvent};
use crate::pay::accounts::Tab;

/// Events buffered between a generation (on the engine, or relayed) and its consumer.
pub(crate) const EVENT_BUFFER: usize = 64;

/// What one round's consumer receives: the generation's events, or (for a relayed round)
/// the failure the swarm reports.
pub(crate) enum Events {
    /// A round on this node's engine, and the tab it is debited to (a paid request).
    Local(tokio::sync::mpsc::Receiver<TaggedEvent>, Option<Arc<Tab>>),
    /// A relayed round (debited as its receipt comes, in `route.rs`).
    Relayed(tokio::sync::mpsc::Receiver<Result<GenerateEvent, ApiError>>),
}

impl Events {
    /// The next event of choice `.0`; `None` when the generation ended without one. A paid
    /// choice served here is debited (and the debit on disk) before its end is returned.
    pub(crate) async fn recv(&mut self) -> Option<(usize, Result<GenerateEvent, ApiError>)> {
        match self {
            Events::Local(rx, tab) => {
                let (i, event) = rx.recv().await?;
                if let (Some(tab), GenerateEvent::Done { usage, .. }) = (tab.as_ref(), &event) {
                    // The prompt is processed once for all choices.
                    let prompt = if i == 0 { usage.prompt_tokens } else { 0 };
                    let charged = tab
                        .charge_here(prompt as u64, usage.completion_tokens as u64)
                        .await;
                    if let Err(error) = charged {
                        tracing::error!(%error, payer = %tab.payer(), "a paid request ends undebited");
                    }
                }
                Some(match event {
                    GenerateEvent::Error(e) => (i, Err(generation_error(e))),
                    other => (i, Ok(other)),
                })
            }
            Events::Relayed(rx) => rx.recv().await.map(|event| (0, event)),
        }
    }
}

/// Plans a chat request that came to this node's HTTP API: checks it against the node's
/// limits. [`route`] then decides where it runs.
pub(crate) fn plan(st: &Shared, req: &ChatRequest) -> Result<Plan, ApiError> {
    chat_plan(st, req, true)
}

/// Decides where a planned chat runs ([`choose_route`]); `raw` is the client's body, the base
/// of each relayed round's body; `tab`: what the request may be charged (a paid request goes
/// only to nodes within its price).
pub(crate) async fn route(
    st: &Shared,
    plan: &mut Plan,
    model: &str,
    raw: Json,
    tab: Option<Tab>,
) -> Result<(), ApiError> {
    plan.tab = tab.map(Arc::new);
    plan.route = choose_route(st, plan, model, raw).await?;
    st.metrics.route(matches!(plan.route, Route::Swarm(_)));
    Ok(())
}

/// Retrieves context for a planned chat and injects it into `messages`; returns the sources
/// used. A relayed request is augmented by the node that serves it, from its own copy of the
/// domain's knowledge base.
pub(crate) async fn retrieve(
    st: &Shared,
    plan: &Plan,
    messages: &mut Vec<ChatMessage>,
) -> Result<Vec<Source>, ApiError> {
    if plan.rag && matches!(plan.route, Route::Local) {
        rag::augment(st, messages).await
    } else {
        Ok(Vec::new())
    }
}

/// Prepares one chat round (off the runtime) and queues it on this node's engine, or relays
/// it to the node the route names. `resume`: the text another node already generated for
/// this round (a relayed request that failed over); the round continues after it.
pub(crate) async fn start_round(
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
    Ok((
        Events::Local(submit(st, reqs, cancel)?, plan.tab.clone()),
        prompt_len,
    ))
}

pub(crate) fn submit(
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

/// Maps a generation failure to the client's error.
pub(crate) fn generation_error(e: GenerateError) -> ApiError {
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
pub(crate) struct ChoiceOut {
    pub(crate) text: String,
    pub(crate) tokens: Vec<u32>,
    pub(crate) logprobs: Vec<TokenLogprobs>,
    pub(crate) finish: Option<FinishReason>,
    pub(crate) usage: Usage,
    pub(crate) calls: Option<Vec<(String, Json)>>,
}

/// Waits for all `n` choices of a round. Cancel-safe: dropping it cancels the generation.
pub(crate) async fn collect(
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

/// A node-executed call and its result, reported in the `tool_results` extension field.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Executed {
    pub(crate) name: String,
    pub(crate) arguments: Json,
    pub(crate) result: String,
    pub(crate) ok: bool,
}

/// The result of a (possibly multi-round) chat.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub(crate) choices: Vec<ChoiceOut>,
    pub(crate) prompt_tokens: usize,
    pub(crate) completion_tokens: usize,
    /// Prompt tokens the prefix cache saved running again.
    pub(crate) cached_tokens: usize,
    pub(crate) executed: Vec<Executed>,
}

/// Runs rounds until the model answers without calling a node-executed tool.
pub(crate) async fn run_rounds(
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
        outcome.cached_tokens += outs.first().map_or(0, |o| o.usage.cached_tokens);
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
    let result = match st.config.tools.iter().find(|t| t.name == name) {
        Some(tool) => tools::execute(tool, &st.config.tools_policy, args).await,
        None => match st.mcp.call(name, args).await {
            Some(result) => result,
            None => {
                return Executed {
                    name: name.into(),
                    arguments: args.clone(),
                    result: format!("error: unknown tool {name}"),
                    ok: false,
                };
            }
        },
    };
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
) -> Result<(tokio::sync::mpsc::Receiver<TaggedEvent>, Vec<Source>), ApiError> {
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
    let sources = if plan.rag {
        rag::augment(st, &mut messages).await?
    } else {
        Vec::new()
    };
    match start_round(st, &plan, messages, plan.choice.clone(), cancel, resume).await? {
        (Events::Local(rx, _), _) => Ok((rx, sources)),
        (Events::Relayed(_), _) => Err(ApiError::internal("a relayed chat was relayed again")),
    }
}
