//! Routing: where a chat's rounds run, on this node's engine or on a node of the domain that
//! the swarm's router picks ([`choose_route`]); a relayed round goes through
//! [`SwarmHandle::chat_via`] (failover and resume in `gaia_protocol::machine::failover`), and
//! its events come back as the engine's [`GenerateEvent`]s, so that the rest of the pipeline
//! and the front ends treat both alike.

use std::sync::Arc;

use gaia_inference::generate::{FinishReason, GenerateEvent, Usage};
use gaia_inference::template::ChatMessage;
use gaia_protocol::NodeId;
use gaia_protocol::machine::failover::{self, ClientOutput, FailoverError};
use gaia_protocol::machine::router::{Conversation, Needs};
use gaia_protocol::stream::ErrorCode;
use serde_json::{Value as Json, json};

use super::Shared;
use super::error::ApiError;
use super::plan::{Output, Plan};
use super::rag::Source;
use super::run::{EVENT_BUFFER, Events};
use super::tools::Tool;
use super::types::ToolChoice;
use crate::pay::accounts::Tab;
use crate::swarm::{RelayEvent, RelayStream, SwarmHandle};

/// Where a chat request's rounds run.
#[derive(Debug, Clone)]
pub(crate) enum Route {
    /// On this node's engine.
    Local,
    /// On a node of the domain, through the swarm (with failover).
    Swarm(Box<Relayed>),
}

/// What a routed request needs to relay its rounds.
#[derive(Debug, Clone)]
pub(crate) struct Relayed {
    handle: SwarmHandle,
    /// The node the router picked for the first attempt.
    first: NodeId,
    needs: Needs,
    /// The client's request body, the base of each round's relayed body.
    raw: Arc<Json>,
}

/// The node serving a request and the knowledge-base passages it retrieved (a relayed
/// request's: the serving node retrieves), shared between the round driver and the response.
#[derive(Debug, Clone, Default)]
pub(crate) struct ServedBy(Arc<std::sync::Mutex<Served>>);

#[derive(Debug, Default)]
struct Served {
    node: Option<String>,
    sources: Vec<Source>,
}

impl ServedBy {
    pub(crate) fn set(&self, node: impl ToString) {
        if let Ok(mut slot) = self.0.lock() {
            slot.node = Some(node.to_string());
        }
    }

    pub(crate) fn get(&self) -> Option<String> {
        self.0.lock().ok().and_then(|slot| slot.node.clone())
    }

    /// Records the passages the serving node sent (after a failover: the last node's).
    fn set_sources(&self, sources: Vec<Source>) {
        if let Ok(mut slot) = self.0.lock() {
            slot.sources = sources;
        }
    }

    /// The passages the serving node of a relayed request retrieved (none for a local one).
    pub(crate) fn sources(&self) -> Vec<Source> {
        self.0
            .lock()
            .map(|slot| slot.sources.clone())
            .unwrap_or_default()
    }
}

/// Decides where a chat request runs: here, or on the node of the domain the router picks
/// (load- and capability-aware; it may pick this node). Requests that only this node can
/// serve (`n` > 1, log-probabilities) stay here; a gateway refuses them.
pub(crate) async fn choose_route(
    st: &Shared,
    plan: &Plan,
    model: &str,
    raw: Json,
) -> Result<Route, ApiError> {
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
        max_price: plan.tab.as_ref().map(|tab| tab.max_price()),
        conversation: conversation(&raw),
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

/// The keys of a chat's message prefixes, for the router's prefix affinity: a chat's next
/// turn goes to the node that holds the history in its prefix cache. Each message counts by
/// its role, content, tool calls and tool call id, not by the other fields a client may or
/// may not send back with an assistant message.
fn conversation(raw: &Json) -> Conversation {
    let Some(messages) = raw.get("messages").and_then(Json::as_array) else {
        return Conversation::default();
    };
    let encoded: Vec<Vec<u8>> = messages
        .iter()
        .map(|m| {
            let content = match m.get("content") {
                Some(Json::String(text)) => Json::String(text.clone()),
                Some(Json::Null) | None => Json::Null,
                Some(other) => other.clone(),
            };
            json!([
                m.get("role"),
                content,
                m.get("tool_calls"),
                m.get("tool_call_id")
            ])
            .to_string()
            .into_bytes()
        })
        .collect();
    Conversation::of(encoded.iter().map(Vec::as_slice))
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
pub(crate) async fn relay_round(
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
                debit(plan.tab.as_deref(), &event).await;
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
        plan.tab.clone(),
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
    tab: Option<Arc<Tab>>,
) {
    loop {
        let event = tokio::select! {
            event = stream.recv() => event,
            () = tx.closed() => return,
        };
        let Some(event) = event else { return };
        count_failovers(&st, &event);
        debit(tab.as_deref(), &event).await;
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

/// Debits a paid relayed round when it ends: by the amount of the serving node's receipt
/// (checked against the stream and recorded by the swarm), on disk before the end goes on to
/// the client. A round without an accepted receipt is not charged.
async fn debit(tab: Option<&Tab>, event: &RelayEvent) {
    let (Some(tab), RelayEvent::Done { node, receipt, .. }) = (tab, event) else {
        return;
    };
    let Some(receipt) = receipt else {
        tracing::warn!(%node, payer = %tab.payer(), "a paid round without an accepted receipt is not charged");
        return;
    };
    if let Err(error) = tab.charge(*node, receipt.payload.amount()).await {
        tracing::error!(%error, payer = %tab.payer(), "a paid request ends undebited");
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
        RelayEvent::Output(ClientOutput::Sources(sources)) => {
            served_by.set_sources(
                sources
                    .into_iter()
                    .map(|s| Source {
                        source: s.source,
                        title: s.title,
                        heading: s.heading,
                        score: s.score,
                        text: s.text,
                    })
                    .collect(),
            );
            None
        }
        RelayEvent::Done {
            node,
            usage,
            cached_tokens,
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
                    cached_tokens: cached_tokens as usize,
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
