//! Failover: one routed request from its first dispatch to its end.
//!
//! A [`Request`] is a sans-IO state machine for one chat completion that this node (the entry
//! node) sends to a member of its domain. The caller feeds it [`Event`]s with the current time
//! and a function that chooses a node (normally [`Router::choose`](super::router::Router::choose)
//! over [`Membership::candidates`](super::membership::Membership::candidates)); it appends
//! [`Action`]s.
//!
//! # States ([`Phase`])
//!
//! ```text
//!             Start
//!               │ Start: choose a node, Dispatch
//!               ▼
//!   ┌───────► Attempt(node) ── no token before the first-token timeout ──┐
//!   │           │ first token or tool call: EmitToClient                 │
//!   │           ▼                                                        │
//!   │       Streaming(node) ── no output before the stall timeout ───────┤
//!   │           │ StreamEnded: Finish                                    │
//!   │           ▼                                                        │
//!   │         Done                                                       │
//!   │                                                                    │
//!   └── retryable failure (or timeout): exclude the node, Dispatch ◄─────┘
//!       another, with Resume{text, tokens_sent} if output was sent
//!
//!   Failed: no node left, attempts exhausted, a non-retryable error, or output that
//!           cannot be resumed (FailWithError)
//!   Cancelled: the client went away (Cancel the attempt)
//! ```
//!
//! # Rules
//!
//! - Each dispatch gets a new attempt number; events name the attempt they belong to, so a late
//!   frame from an abandoned node is ignored.
//! - A node that fails this request (unreachable, broken stream, retryable error frame, first
//!   token or stall timeout) is excluded for the rest of the request, and reported to the router
//!   as [`Observation::Failed`] (which bans it for a while for every request).
//! - A timeout counts as the node's death: the attempt is cancelled ([`Action::Cancel`]) before
//!   the next dispatch.
//! - Once output has reached the client, a retry continues the completion on another node from
//!   the text already sent ([`Resume`]), so the client sees one uninterrupted answer. That is
//!   impossible after a tool call was sent, or when the text outgrew [`MAX_RESUME_TEXT`]; the
//!   request then fails.
//! - At most [`Config::max_attempts`] dispatches. An error the node reports as not retryable
//!   (a bad request, a request too large) ends the request with that error.

use std::fmt;

use crate::payment::Receipt;
use crate::stream::{
    ErrorCode, FinishReason, MAX_RESUME_TEXT, Resume, Source, StreamFrame, TopLogprob, Usage,
};
use crate::{NodeId, Signed};

use super::Millis;
use super::router::{NoRoute, Observation};

/// Tuning of a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The most dispatches for one request (the first included). Default 3.
    pub max_attempts: u32,
    /// How long a node may take to send its first token, in milliseconds (covers queueing
    /// and prompt processing). Default 60 000.
    pub first_token_timeout_ms: u64,
    /// How long a streaming node may stay silent between two outputs, in milliseconds.
    /// Default 30 000.
    pub stall_timeout_ms: u64,
    /// Whether a completion interrupted mid-stream continues on another node. Default true.
    pub resume: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            first_token_timeout_ms: 60_000,
            stall_timeout_ms: 30_000,
            resume: true,
        }
    }
}

/// Generated text from the serving node (a [`StreamFrame::Token`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    /// The text of one token, or of a few batched.
    pub text: String,
    /// The index of the (first) token in the completion.
    pub index: u32,
    /// Its log-probability, if asked for.
    pub logprob: Option<f32>,
    /// The most likely alternatives, if asked for.
    pub top_logprobs: Vec<TopLogprob>,
}

/// A complete tool call from the serving node (a [`StreamFrame::ToolCall`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// Its position among the completion's tool calls.
    pub index: u32,
    /// The call id.
    pub id: String,
    /// The function name.
    pub name: String,
    /// The arguments, as JSON text.
    pub arguments: String,
}

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptError {
    /// No stream could be opened to the node.
    Unreachable(String),
    /// The stream broke before its last frame (connection lost, undecodable frame).
    Broken(String),
    /// The node answered with an error frame.
    Node {
        /// Its error code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
}

impl AttemptError {
    /// Whether another node may succeed; a failure that is retryable is also the node's fault.
    pub fn is_retryable(&self) -> bool {
        match self {
            AttemptError::Unreachable(_) | AttemptError::Broken(_) => true,
            AttemptError::Node { code, .. } => code.is_retryable(),
        }
    }
}

impl fmt::Display for AttemptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttemptError::Unreachable(reason) => write!(f, "unreachable: {reason}"),
            AttemptError::Broken(reason) => write!(f, "stream broke: {reason}"),
            AttemptError::Node { code, message } => write!(f, "{code:?}: {message}"),
        }
    }
}

/// Something that happened to the request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Begin: choose a node and dispatch.
    Start,
    /// The node of `attempt` sent text.
    TokenReceived {
        /// The attempt.
        attempt: u32,
        /// The text.
        token: Token,
    },
    /// The node of `attempt` sent a tool call.
    ToolCallReceived {
        /// The attempt.
        attempt: u32,
        /// The call.
        call: ToolCall,
    },
    /// The node of `attempt` sent the knowledge-base passages it put in the prompt.
    SourcesReceived {
        /// The attempt.
        attempt: u32,
        /// The passages.
        sources: Vec<Source>,
    },
    /// The node of `attempt` ended the completion normally.
    StreamEnded {
        /// The attempt.
        attempt: u32,
        /// Token counts, as the last node reported them.
        usage: Usage,
        /// Prompt tokens that node's prefix cache held.
        cached_tokens: u32,
        /// Why generation stopped.
        finish_reason: FinishReason,
        /// The last node's receipt, if the domain meters usage.
        receipt: Option<Signed<Receipt>>,
    },
    /// The attempt failed.
    AttemptFailed {
        /// The attempt.
        attempt: u32,
        /// How.
        error: AttemptError,
    },
    /// Time passed: check the timeouts.
    Tick,
    /// The client went away: stop.
    ClientGone,
}

impl Event {
    /// The event a frame received on `attempt`'s stream stands for.
    pub fn from_frame(attempt: u32, frame: StreamFrame) -> Event {
        match frame {
            StreamFrame::Token {
                text,
                index,
                logprob,
                top_logprobs,
            } => Event::TokenReceived {
                attempt,
                token: Token {
                    text,
                    index,
                    logprob,
                    top_logprobs,
                },
            },
            StreamFrame::ToolCall {
                index,
                id,
                name,
                arguments,
            } => Event::ToolCallReceived {
                attempt,
                call: ToolCall {
                    index,
                    id,
                    name,
                    arguments,
                },
            },
            StreamFrame::Sources { sources } => Event::SourcesReceived { attempt, sources },
            StreamFrame::Done {
                usage,
                cached_tokens,
                finish_reason,
                receipt,
            } => Event::StreamEnded {
                attempt,
                usage,
                cached_tokens,
                finish_reason,
                receipt,
            },
            StreamFrame::DoneV1 {
                usage,
                finish_reason,
                receipt,
            }
            | StreamFrame::DoneV2 {
                usage,
                finish_reason,
                receipt,
            } => Event::StreamEnded {
                attempt,
                usage,
                cached_tokens: 0,
                finish_reason,
                receipt,
            },
            StreamFrame::Error { code, message } => Event::AttemptFailed {
                attempt,
                error: AttemptError::Node { code, message },
            },
            StreamFrame::Request { .. } => Event::AttemptFailed {
                attempt,
                error: AttemptError::Broken(
                    "the serving node sent a request frame, which only entry nodes send".into(),
                ),
            },
        }
    }
}

/// Output for the client.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientOutput {
    /// Text, with its index renumbered so indices never go backwards across nodes.
    Token(Token),
    /// A tool call.
    ToolCall(ToolCall),
    /// The knowledge-base passages the serving node put in the prompt (the last node's, after
    /// a failover).
    Sources(Vec<Source>),
}

/// The request failed.
#[derive(Debug, Clone, PartialEq)]
pub enum FailoverError {
    /// No node qualifies (any more).
    NoRoute {
        /// Why, filter by filter.
        route: NoRoute,
        /// Dispatches made.
        attempts: u32,
        /// The last attempt's failure, if there was one.
        last_error: Option<String>,
    },
    /// Every allowed attempt failed.
    Exhausted {
        /// Dispatches made.
        attempts: u32,
        /// The last attempt's failure.
        last_error: String,
    },
    /// The node refused the request with an error that another node would repeat.
    Refused {
        /// The node.
        node: NodeId,
        /// Its error code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// The serving node failed after output reached the client, and the completion cannot
    /// continue elsewhere.
    CannotResume {
        /// Tokens already sent to the client.
        tokens_sent: u32,
        /// Why it cannot be resumed.
        reason: &'static str,
        /// The failure.
        last_error: String,
    },
}

impl fmt::Display for FailoverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailoverError::NoRoute {
                route, last_error, ..
            } => {
                write!(f, "{route}")?;
                if let Some(error) = last_error {
                    write!(f, "; the last attempt failed with {error}")?;
                }
                Ok(())
            }
            FailoverError::Exhausted {
                attempts,
                last_error,
            } => write!(
                f,
                "no node in the domain can serve this request: all {attempts} attempts failed, \
                 the last with {last_error}; try again later"
            ),
            FailoverError::Refused {
                node,
                code,
                message,
            } => write!(f, "node {node} refused the request ({code:?}): {message}"),
            FailoverError::CannotResume {
                tokens_sent,
                reason,
                last_error,
            } => write!(
                f,
                "the node serving this request failed after {tokens_sent} tokens ({last_error}) \
                 and no other node can continue it: {reason}"
            ),
        }
    }
}

impl std::error::Error for FailoverError {}

impl FailoverError {
    /// The protocol error code that best describes the failure (for the API's status code).
    pub fn code(&self) -> ErrorCode {
        match self {
            FailoverError::NoRoute { route, .. }
                if route.known > 0 && route.excluded == 0 && route.banned == 0 =>
            {
                ErrorCode::NotServed
            }
            FailoverError::NoRoute { .. } | FailoverError::Exhausted { .. } => ErrorCode::Busy,
            FailoverError::Refused { code, .. } => *code,
            FailoverError::CannotResume { .. } => ErrorCode::Internal,
        }
    }
}

/// What the caller should do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Open a stream to `node` and send the request (with `resume` when continuing).
    Dispatch {
        /// The attempt number, to tag the stream's events with.
        attempt: u32,
        /// The node.
        node: NodeId,
        /// Where to continue, when output already reached the client.
        resume: Option<Resume>,
    },
    /// Close the stream of `attempt` (its node timed out, or the client left).
    Cancel {
        /// The attempt.
        attempt: u32,
        /// Its node.
        node: NodeId,
    },
    /// Send this to the client.
    EmitToClient(ClientOutput),
    /// Pass this to [`Router::observe`](super::router::Router::observe).
    Observe(Observation),
    /// The completion is complete: end the client's response.
    Finish {
        /// The node that finished it.
        node: NodeId,
        /// Token counts, as that node reported them.
        usage: Usage,
        /// Prompt tokens that node's prefix cache held.
        cached_tokens: u32,
        /// Why generation stopped.
        finish_reason: FinishReason,
        /// That node's receipt.
        receipt: Option<Signed<Receipt>>,
        /// Dispatches made.
        attempts: u32,
    },
    /// The request failed: tell the client.
    FailWithError(FailoverError),
}

/// Where the request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not dispatched yet.
    Start,
    /// Dispatched, no output yet.
    Attempt {
        /// The node.
        node: NodeId,
        /// The attempt number.
        attempt: u32,
        /// When it was dispatched.
        since: Millis,
    },
    /// Output is flowing.
    Streaming {
        /// The node.
        node: NodeId,
        /// The attempt number.
        attempt: u32,
        /// When the last output arrived.
        last_output: Millis,
    },
    /// Finished normally.
    Done,
    /// Failed.
    Failed,
    /// The client went away.
    Cancelled,
}

/// One routed request; see the [module documentation](self).
#[derive(Debug, Clone)]
pub struct Request {
    config: Config,
    phase: Phase,
    attempts: u32,
    excluded: Vec<NodeId>,
    text: String,
    tokens_sent: u32,
    output_started: bool,
    not_resumable: Option<&'static str>,
    last_error: Option<String>,
}

impl Request {
    /// A request not dispatched yet.
    pub fn new(config: Config) -> Self {
        let not_resumable = (!config.resume).then_some("resuming is disabled on this node");
        Self {
            config,
            phase: Phase::Start,
            attempts: 0,
            excluded: Vec::new(),
            text: String::new(),
            tokens_sent: 0,
            output_started: false,
            not_resumable,
            last_error: None,
        }
    }

    /// Handles `event` at `now`, appending what to do to `actions`. `choose` picks a node that
    /// is not in the given list (the nodes that failed this request); it is called only when a
    /// dispatch is needed.
    pub fn handle(
        &mut self,
        now: Millis,
        event: Event,
        choose: impl FnOnce(&[NodeId]) -> Result<NodeId, NoRoute>,
        actions: &mut Vec<Action>,
    ) {
        match event {
            Event::Start => {
                if self.phase == Phase::Start {
                    self.dispatch(now, choose, actions);
                }
            }
            Event::TokenReceived { attempt, token } => {
                if self.output_arrived(now, attempt, actions).is_none() {
                    return;
                }
                let index = token.index.max(self.tokens_sent);
                self.tokens_sent = index.saturating_add(1);
                if self.not_resumable.is_none() {
                    if self.text.len().saturating_add(token.text.len()) > MAX_RESUME_TEXT {
                        self.not_resumable =
                            Some("the text already sent is longer than a resume can carry");
                        self.text = String::new();
                    } else {
                        self.text.push_str(&token.text);
                    }
                }
                actions.push(Action::EmitToClient(ClientOutput::Token(Token {
                    index,
                    ..token
                })));
            }
            Event::ToolCallReceived { attempt, call } => {
                if self.output_arrived(now, attempt, actions).is_none() {
                    return;
                }
                self.not_resumable = Some("a tool call was already sent to the client");
                self.text = String::new();
                actions.push(Action::EmitToClient(ClientOutput::ToolCall(call)));
            }
            Event::SourcesReceived { attempt, sources } => {
                if self.current(attempt).is_some() {
                    actions.push(Action::EmitToClient(ClientOutput::Sources(sources)));
                }
            }
            Event::StreamEnded {
                attempt,
                usage,
                cached_tokens,
                finish_reason,
                receipt,
            } => {
                let Some(node) = self.current(attempt) else {
                    return;
                };
                actions.push(Action::Observe(Observation::Succeeded { node }));
                actions.push(Action::Finish {
                    node,
                    usage,
                    cached_tokens,
                    finish_reason,
                    receipt,
                    attempts: self.attempts,
                });
                self.phase = Phase::Done;
            }
            Event::AttemptFailed { attempt, error } => {
                let Some(node) = self.current(attempt) else {
                    return;
                };
                if error.is_retryable() {
                    self.node_failed(now, node, format!("node {node}: {error}"), choose, actions);
                } else {
                    actions.push(Action::Observe(Observation::Released { node }));
                    let error = match error {
                        AttemptError::Node { code, message } => FailoverError::Refused {
                            node,
                            code,
                            message,
                        },
                        // Not reachable: those are retryable.
                        other => FailoverError::Exhausted {
                            attempts: self.attempts,
                            last_error: other.to_string(),
                        },
                    };
                    self.fail(error, actions);
                }
            }
            Event::Tick => match self.phase {
                Phase::Attempt {
                    node,
                    attempt,
                    since,
                } if now.since(since) >= self.config.first_token_timeout_ms => {
                    actions.push(Action::Cancel { attempt, node });
                    let error = format!(
                        "node {node}: no first token within {} s",
                        self.config.first_token_timeout_ms / 1000
                    );
                    self.node_failed(now, node, error, choose, actions);
                }
                Phase::Streaming {
                    node,
                    attempt,
                    last_output,
                } if now.since(last_output) >= self.config.stall_timeout_ms => {
                    actions.push(Action::Cancel { attempt, node });
                    let error = format!(
                        "node {node}: stalled for {} s mid-stream",
                        self.config.stall_timeout_ms / 1000
                    );
                    self.node_failed(now, node, error, choose, actions);
                }
                _ => {}
            },
            Event::ClientGone => match self.phase {
                Phase::Attempt { node, attempt, .. } | Phase::Streaming { node, attempt, .. } => {
                    actions.push(Action::Cancel { attempt, node });
                    actions.push(Action::Observe(Observation::Released { node }));
                    self.phase = Phase::Cancelled;
                }
                Phase::Start => self.phase = Phase::Cancelled,
                Phase::Done | Phase::Failed | Phase::Cancelled => {}
            },
        }
    }

    /// When the caller should send the next [`Event::Tick`]: the running attempt's timeout.
    pub fn next_wakeup(&self) -> Option<Millis> {
        match self.phase {
            Phase::Attempt { since, .. } => Some(since.plus(self.config.first_token_timeout_ms)),
            Phase::Streaming { last_output, .. } => {
                Some(last_output.plus(self.config.stall_timeout_ms))
            }
            _ => None,
        }
    }

    /// Where the request stands.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the request has ended (done, failed or cancelled).
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Done | Phase::Failed | Phase::Cancelled)
    }

    /// Dispatches made so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The nodes that failed this request.
    pub fn excluded(&self) -> &[NodeId] {
        &self.excluded
    }

    /// Tokens sent to the client so far (the index the next token gets).
    pub fn tokens_sent(&self) -> u32 {
        self.tokens_sent
    }

    /// The text sent to the client so far (kept while a resume is possible; empty after).
    pub fn text_so_far(&self) -> &str {
        &self.text
    }

    /// The node of `attempt`, if it is the running one.
    fn current(&self, attempt: u32) -> Option<NodeId> {
        match self.phase {
            Phase::Attempt {
                node, attempt: a, ..
            }
            | Phase::Streaming {
                node, attempt: a, ..
            } if a == attempt => Some(node),
            _ => None,
        }
    }

    /// Output of `attempt` arrived: move to (or stay in) streaming. `None` if the attempt is
    /// not the running one.
    fn output_arrived(
        &mut self,
        now: Millis,
        attempt: u32,
        actions: &mut Vec<Action>,
    ) -> Option<NodeId> {
        let node = self.current(attempt)?;
        if let Phase::Attempt { since, .. } = self.phase {
            actions.push(Action::Observe(Observation::FirstToken {
                node,
                latency_ms: now.since(since),
            }));
        }
        self.output_started = true;
        self.phase = Phase::Streaming {
            node,
            attempt,
            last_output: now,
        };
        Some(node)
    }

    fn node_failed(
        &mut self,
        now: Millis,
        node: NodeId,
        error: String,
        choose: impl FnOnce(&[NodeId]) -> Result<NodeId, NoRoute>,
        actions: &mut Vec<Action>,
    ) {
        actions.push(Action::Observe(Observation::Failed { node }));
        if !self.excluded.contains(&node) {
            self.excluded.push(node);
        }
        self.last_error = Some(error);
        self.dispatch(now, choose, actions);
    }

    fn dispatch(
        &mut self,
        now: Millis,
        choose: impl FnOnce(&[NodeId]) -> Result<NodeId, NoRoute>,
        actions: &mut Vec<Action>,
    ) {
        let last_error = self.last_error.clone().unwrap_or_default();
        if self.output_started
            && let Some(reason) = self.not_resumable
        {
            let error = FailoverError::CannotResume {
                tokens_sent: self.tokens_sent,
                reason,
                last_error,
            };
            return self.fail(error, actions);
        }
        if self.attempts >= self.config.max_attempts {
            let error = FailoverError::Exhausted {
                attempts: self.attempts,
                last_error,
            };
            return self.fail(error, actions);
        }
        match choose(&self.excluded) {
            Err(route) => {
                let error = FailoverError::NoRoute {
                    route,
                    attempts: self.attempts,
                    last_error: self.last_error.clone(),
                };
                self.fail(error, actions);
            }
            Ok(node) => {
                self.attempts += 1;
                let attempt = self.attempts;
                let resume = self.output_started.then(|| Resume {
                    text: self.text.clone(),
                    tokens_sent: self.tokens_sent,
                });
                actions.push(Action::Observe(Observation::Dispatched { node }));
                actions.push(Action::Dispatch {
                    attempt,
                    node,
                    resume,
                });
                self.phase = Phase::Attempt {
                    node,
                    attempt,
                    since: now,
                };
            }
        }
    }

    fn fail(&mut self, error: FailoverError, actions: &mut Vec<Action>) {
        self.phase = Phase::Failed;
        actions.push(Action::FailWithError(error));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advert::{Capabilities, Load};
    use crate::machine::router::{self, Candidate, Needs, Router};

    /// A small domain: nodes with equal adverts, a real router, and a request.
    struct World {
        nodes: Vec<NodeId>,
        caps: Capabilities,
        load: Load,
        router: Router,
        request: Request,
        actions: Vec<Action>,
    }

    impl World {
        fn new(n: u8, config: Config) -> Self {
            Self {
                nodes: (1..=n).map(|i| NodeId([i; 20])).collect(),
                caps: Capabilities {
                    tools: true,
                    structured_output: false,
                    context_length: 4096,
                    max_tokens: 512,
                },
                load: Load {
                    in_flight: 0,
                    queued: 0,
                    tokens_per_s: 10.0,
                },
                router: Router::new(router::Config::default(), 9).unwrap(),
                request: Request::new(config),
                actions: Vec::new(),
            }
        }

        /// Handles `event`, routing through the real router, and applies observations.
        fn handle(&mut self, now: Millis, event: Event) -> Vec<Action> {
            let candidates = self.nodes.iter().map(|&node| Candidate {
                node,
                model_name: "m",
                capabilities: &self.caps,
                load: &self.load,
                price: crate::payment::Price::flat(0),
            });
            let router = &mut self.router;
            let needs = Needs {
                model: Some("m".into()),
                ..Needs::default()
            };
            self.request.handle(
                now,
                event,
                |exclude| router.choose(now, &needs, candidates, exclude),
                &mut self.actions,
            );
            let actions = std::mem::take(&mut self.actions);
            for action in &actions {
                if let Action::Observe(observation) = action {
                    self.router.observe(now, *observation);
                }
            }
            actions
        }

        fn token(&mut self, now: Millis, attempt: u32, text: &str, index: u32) -> Vec<Action> {
            self.handle(
                now,
                Event::TokenReceived {
                    attempt,
                    token: Token {
                        text: text.into(),
                        index,
                        logprob: None,
                        top_logprobs: vec![],
                    },
                },
            )
        }
    }

    fn dispatched(actions: &[Action]) -> Option<(u32, NodeId, Option<Resume>)> {
        actions.iter().find_map(|a| match a {
            Action::Dispatch {
                attempt,
                node,
                resume,
            } => Some((*attempt, *node, resume.clone())),
            _ => None,
        })
    }

    fn emitted_text(actions: &[Action]) -> String {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::EmitToClient(ClientOutput::Token(t)) => Some(t.text.as_str()),
                _ => None,
            })
            .collect()
    }

    fn failure(actions: &[Action]) -> Option<&FailoverError> {
        actions.iter().find_map(|a| match a {
            Action::FailWithError(e) => Some(e),
            _ => None,
        })
    }

    fn ended(attempt: u32) -> Event {
        Event::StreamEnded {
            attempt,
            usage: Usage {
                prompt_tokens: 10,
                completion_tokens: 3,
            },
            cached_tokens: 4,
            finish_reason: FinishReason::Stop,
            receipt: None,
        }
    }

    /// The current attempt's sources go to the client; a stale attempt's do not. The end
    /// carries the serving node's cached-token count.
    #[test]
    fn sources_and_cached_tokens_reach_the_client() {
        let mut w = World::new(3, Config::default());
        let t0 = Millis(1_000);
        let actions = w.handle(t0, Event::Start);
        let (attempt, _, _) = dispatched(&actions).unwrap();
        let source = Source {
            source: "guide.md".into(),
            title: "Guide".into(),
            heading: None,
            score: 0.5,
            text: "passage".into(),
        };
        let stale = w.handle(
            t0.plus(10),
            Event::SourcesReceived {
                attempt: attempt + 7,
                sources: vec![source.clone()],
            },
        );
        assert!(stale.is_empty(), "{stale:?}");
        let actions = w.handle(
            t0.plus(20),
            Event::SourcesReceived {
                attempt,
                sources: vec![source.clone()],
            },
        );
        assert_eq!(
            actions,
            [Action::EmitToClient(ClientOutput::Sources(vec![source]))]
        );
        w.token(t0.plus(30), attempt, "Hi", 0);
        let actions = w.handle(t0.plus(40), ended(attempt));
        assert!(
            actions.iter().any(|a| matches!(
                a,
                Action::Finish {
                    cached_tokens: 4,
                    ..
                }
            )),
            "{actions:?}"
        );
    }

    #[test]
    fn a_request_that_goes_well() {
        let mut w = World::new(3, Config::default());
        let t0 = Millis(1_000);
        let actions = w.handle(t0, Event::Start);
        let (attempt, node, resume) = dispatched(&actions).unwrap();
        assert_eq!((attempt, resume), (1, None));
        assert!(actions.contains(&Action::Observe(Observation::Dispatched { node })));
        assert_eq!(w.request.next_wakeup(), Some(t0.plus(60_000)));
        assert_eq!(w.router.stats(&node).unwrap().in_flight, 1);

        let actions = w.token(t0.plus(250), 1, "Hel", 0);
        assert!(actions.contains(&Action::Observe(Observation::FirstToken {
            node,
            latency_ms: 250
        })));
        assert_eq!(emitted_text(&actions), "Hel");
        let actions = w.token(t0.plus(300), 1, "lo", 1);
        assert_eq!(emitted_text(&actions), "lo");
        assert_eq!(w.request.text_so_far(), "Hello");
        assert_eq!(w.request.tokens_sent(), 2);
        assert_eq!(w.request.next_wakeup(), Some(t0.plus(30_300)));

        let actions = w.handle(t0.plus(400), ended(1));
        assert!(matches!(
            actions.last(),
            Some(Action::Finish { node: n, attempts: 1, finish_reason: FinishReason::Stop, .. }) if *n == node
        ));
        assert_eq!(w.request.phase(), Phase::Done);
        assert!(w.request.is_finished());
        assert_eq!(w.request.next_wakeup(), None);
        let stats = w.router.stats(&node).unwrap();
        assert_eq!((stats.in_flight, stats.latency_ms), (0, Some(250.0)));

        // Anything later is ignored.
        assert!(w.token(t0.plus(500), 1, "!", 2).is_empty());
        assert!(w.handle(t0.plus(500), Event::Start).is_empty());
    }

    #[test]
    fn a_failure_before_the_first_token_retries_elsewhere() {
        let mut w = World::new(3, Config::default());
        let t0 = Millis(0);
        let (_, first, _) = dispatched(&w.handle(t0, Event::Start)).unwrap();
        let actions = w.handle(
            t0.plus(10),
            Event::AttemptFailed {
                attempt: 1,
                error: AttemptError::Unreachable("connection refused".into()),
            },
        );
        assert!(actions.contains(&Action::Observe(Observation::Failed { node: first })));
        let (attempt, second, resume) = dispatched(&actions).unwrap();
        assert_eq!(attempt, 2);
        assert_ne!(second, first);
        assert_eq!(resume, None);
        assert_eq!(w.request.excluded(), &[first]);
        assert!(w.router.is_banned(t0.plus(10), &first));

        // A late frame from the first node is ignored.
        assert!(w.token(t0.plus(20), 1, "late", 0).is_empty());
        assert_eq!(emitted_text(&w.token(t0.plus(30), 2, "ok", 0)), "ok");
        let actions = w.handle(t0.plus(40), ended(2));
        assert!(matches!(
            actions.last(),
            Some(Action::Finish { attempts: 2, .. })
        ));
    }

    #[test]
    fn a_failure_mid_stream_resumes_from_the_text_sent() {
        let mut w = World::new(3, Config::default());
        let t0 = Millis(0);
        let (_, first, _) = dispatched(&w.handle(t0, Event::Start)).unwrap();
        let mut client = String::new();
        for (i, piece) in ["The ", "capital ", "of France"].iter().enumerate() {
            client += &emitted_text(&w.token(t0.plus(10), 1, piece, i as u32));
        }
        let actions = w.handle(
            t0.plus(20),
            Event::AttemptFailed {
                attempt: 1,
                error: AttemptError::Broken("connection reset".into()),
            },
        );
        let (attempt, second, resume) = dispatched(&actions).unwrap();
        assert_ne!(second, first);
        assert_eq!(
            resume,
            Some(Resume {
                text: "The capital of France".into(),
                tokens_sent: 3
            })
        );
        // The second node numbers its tokens from 3; indices keep growing for the client.
        let actions = w.token(t0.plus(30), attempt, " is", 3);
        client += &emitted_text(&actions);
        let Some(Action::EmitToClient(ClientOutput::Token(token))) = actions.last() else {
            panic!("{actions:?}");
        };
        assert_eq!(token.index, 3);
        // A node that numbers from 0 anyway cannot make indices go backwards.
        let actions = w.token(t0.plus(31), attempt, " Paris", 0);
        let Some(Action::EmitToClient(ClientOutput::Token(token))) = actions.last() else {
            panic!("{actions:?}");
        };
        assert_eq!(token.index, 4);
        client += &token.text;
        assert_eq!(client, "The capital of France is Paris");
        w.handle(t0.plus(40), ended(attempt));
        assert_eq!(w.request.phase(), Phase::Done);
    }

    #[test]
    fn timeouts_count_as_node_death() {
        let config = Config {
            first_token_timeout_ms: 5_000,
            stall_timeout_ms: 2_000,
            ..Config::default()
        };
        let mut w = World::new(3, config);
        let t0 = Millis(0);
        let (_, first, _) = dispatched(&w.handle(t0, Event::Start)).unwrap();
        assert!(w.handle(t0.plus(4_999), Event::Tick).is_empty());
        let actions = w.handle(t0.plus(5_000), Event::Tick);
        assert_eq!(
            actions[0],
            Action::Cancel {
                attempt: 1,
                node: first
            }
        );
        assert!(actions.contains(&Action::Observe(Observation::Failed { node: first })));
        let (attempt, second, _) = dispatched(&actions).unwrap();
        assert_eq!(attempt, 2);

        // The second streams, then stalls.
        w.token(t0.plus(6_000), 2, "a", 0);
        assert!(w.handle(t0.plus(7_999), Event::Tick).is_empty());
        let actions = w.handle(t0.plus(8_000), Event::Tick);
        assert_eq!(
            actions[0],
            Action::Cancel {
                attempt: 2,
                node: second
            }
        );
        let (attempt, third, resume) = dispatched(&actions).unwrap();
        assert_eq!(attempt, 3);
        assert!(third != first && third != second);
        assert_eq!(resume.unwrap().text, "a");

        // The third stalls too: three attempts are the limit.
        w.token(t0.plus(8_500), 3, "b", 1);
        let actions = w.handle(t0.plus(20_000), Event::Tick);
        let error = failure(&actions).unwrap();
        assert!(matches!(
            error,
            FailoverError::Exhausted { attempts: 3, .. }
        ));
        let message = error.to_string();
        assert!(
            message.starts_with("no node in the domain can serve this request: all 3 attempts"),
            "{message}"
        );
        assert!(message.contains("stalled for 2 s"), "{message}");
        assert_eq!(w.request.phase(), Phase::Failed);
        assert_eq!(error.code(), ErrorCode::Busy);
    }

    #[test]
    fn running_out_of_nodes_says_why() {
        let mut w = World::new(2, Config::default());
        let t0 = Millis(0);
        w.handle(t0, Event::Start);
        let fail = |attempt| Event::AttemptFailed {
            attempt,
            error: AttemptError::Node {
                code: ErrorCode::Busy,
                message: "queue full".into(),
            },
        };
        dispatched(&w.handle(t0, fail(1))).unwrap();
        let actions = w.handle(t0, fail(2));
        let error = failure(&actions).unwrap();
        let FailoverError::NoRoute {
            route, attempts, ..
        } = error
        else {
            panic!("{error:?}");
        };
        assert_eq!((route.known, route.excluded, *attempts), (2, 2, 2));
        let message = error.to_string();
        assert!(
            message.starts_with("no node in the domain can serve this request: of 2 candidate"),
            "{message}"
        );
        assert!(
            message.contains("2 already failed this request"),
            "{message}"
        );
        assert!(message.contains("queue full"), "{message}");

        // An empty domain fails at once.
        let mut empty = World::new(0, Config::default());
        let actions = empty.handle(t0, Event::Start);
        let error = failure(&actions).unwrap();
        assert!(error.to_string().contains("no routable member is known"));
        assert_eq!(empty.request.attempts(), 0);
    }

    #[test]
    fn a_non_retryable_error_ends_the_request() {
        let mut w = World::new(3, Config::default());
        let (_, node, _) = dispatched(&w.handle(Millis(0), Event::Start)).unwrap();
        let actions = w.handle(
            Millis(5),
            Event::AttemptFailed {
                attempt: 1,
                error: AttemptError::Node {
                    code: ErrorCode::BadRequest,
                    message: "messages must not be empty".into(),
                },
            },
        );
        assert!(actions.contains(&Action::Observe(Observation::Released { node })));
        assert!(dispatched(&actions).is_none());
        let error = failure(&actions).unwrap();
        assert_eq!(error.code(), ErrorCode::BadRequest);
        assert!(error.to_string().contains("messages must not be empty"));
        // The node is not blamed.
        assert!(!w.router.is_banned(Millis(5), &node));
    }

    #[test]
    fn tool_calls_and_long_texts_cannot_be_resumed() {
        let mut w = World::new(3, Config::default());
        w.handle(Millis(0), Event::Start);
        let actions = w.handle(
            Millis(1),
            Event::ToolCallReceived {
                attempt: 1,
                call: ToolCall {
                    index: 0,
                    id: "call_1".into(),
                    name: "search".into(),
                    arguments: "{}".into(),
                },
            },
        );
        assert!(matches!(
            actions.last(),
            Some(Action::EmitToClient(ClientOutput::ToolCall(_)))
        ));
        let actions = w.handle(
            Millis(2),
            Event::AttemptFailed {
                attempt: 1,
                error: AttemptError::Broken("reset".into()),
            },
        );
        assert!(dispatched(&actions).is_none());
        let error = failure(&actions).unwrap();
        assert!(
            error.to_string().contains("a tool call was already sent"),
            "{error}"
        );

        let mut w = World::new(3, Config::default());
        w.handle(Millis(0), Event::Start);
        let big = "x".repeat(MAX_RESUME_TEXT / 2 + 1);
        w.token(Millis(1), 1, &big, 0);
        assert_eq!(w.request.text_so_far().len(), big.len());
        w.token(Millis(2), 1, &big, 1);
        assert!(w.request.text_so_far().is_empty());
        let actions = w.handle(
            Millis(3),
            Event::AttemptFailed {
                attempt: 1,
                error: AttemptError::Broken("reset".into()),
            },
        );
        let error = failure(&actions).unwrap();
        assert!(matches!(
            error,
            FailoverError::CannotResume { tokens_sent: 2, .. }
        ));

        // Resuming can also be switched off; a failure before output still retries.
        let mut w = World::new(
            3,
            Config {
                resume: false,
                ..Config::default()
            },
        );
        w.handle(Millis(0), Event::Start);
        let actions = w.handle(
            Millis(1),
            Event::AttemptFailed {
                attempt: 1,
                error: AttemptError::Broken("reset".into()),
            },
        );
        assert!(dispatched(&actions).is_some());
        w.token(Millis(2), 2, "a", 0);
        let actions = w.handle(
            Millis(3),
            Event::AttemptFailed {
                attempt: 2,
                error: AttemptError::Broken("reset".into()),
            },
        );
        assert!(failure(&actions).unwrap().to_string().contains("disabled"));
    }

    #[test]
    fn the_client_leaving_cancels_without_blame() {
        let mut w = World::new(3, Config::default());
        let (_, node, _) = dispatched(&w.handle(Millis(0), Event::Start)).unwrap();
        w.token(Millis(1), 1, "a", 0);
        let actions = w.handle(Millis(2), Event::ClientGone);
        assert_eq!(
            actions,
            vec![
                Action::Cancel { attempt: 1, node },
                Action::Observe(Observation::Released { node })
            ]
        );
        assert_eq!(w.request.phase(), Phase::Cancelled);
        assert_eq!(w.router.stats(&node).unwrap().in_flight, 0);
        assert!(!w.router.is_banned(Millis(2), &node));
        assert!(w.handle(Millis(3), Event::Tick).is_empty());

        let mut idle = Request::new(Config::default());
        let mut actions = Vec::new();
        idle.handle(
            Millis(0),
            Event::ClientGone,
            |_| unreachable!("no dispatch after the client left"),
            &mut actions,
        );
        assert!(actions.is_empty());
        assert_eq!(idle.phase(), Phase::Cancelled);
    }

    #[test]
    fn never_dispatches_to_a_node_that_failed_the_request() {
        // Many requests against a flaky domain: each attempt's node is new to its request.
        for seed in 0..50u64 {
            let mut w = World::new(
                5,
                Config {
                    max_attempts: 5,
                    ..Config::default()
                },
            );
            w.router = Router::new(router::Config::default(), seed).unwrap();
            let mut seen = Vec::new();
            let mut actions = w.handle(Millis(0), Event::Start);
            while let Some((attempt, node, _)) = dispatched(&actions) {
                assert!(!seen.contains(&node), "seed {seed}: {node} twice");
                seen.push(node);
                actions = w.handle(
                    Millis(u64::from(attempt)),
                    Event::AttemptFailed {
                        attempt,
                        error: AttemptError::Node {
                            code: ErrorCode::Internal,
                            message: "boom".into(),
                        },
                    },
                );
            }
            assert_eq!(seen.len(), 5);
            assert!(matches!(
                failure(&actions),
                Some(FailoverError::Exhausted { attempts: 5, .. })
            ));
        }
    }

    #[test]
    fn error_codes_tell_unservable_from_busy() {
        let no_route = |route: NoRoute| FailoverError::NoRoute {
            route,
            attempts: 0,
            last_error: None,
        };
        let mismatch = NoRoute {
            known: 2,
            wrong_model: 2,
            ..NoRoute::default()
        };
        assert_eq!(no_route(mismatch).code(), ErrorCode::NotServed);
        let banned = NoRoute {
            known: 2,
            banned: 2,
            ..NoRoute::default()
        };
        assert_eq!(no_route(banned).code(), ErrorCode::Busy);
        assert_eq!(no_route(NoRoute::default()).code(), ErrorCode::Busy);
        let resume = FailoverError::CannotResume {
            tokens_sent: 1,
            reason: "r",
            last_error: "e".into(),
        };
        assert_eq!(resume.code(), ErrorCode::Internal);
    }

    #[test]
    fn frames_map_to_events() {
        let token = StreamFrame::Token {
            text: "a".into(),
            index: 4,
            logprob: Some(-0.5),
            top_logprobs: vec![],
        };
        assert!(matches!(
            Event::from_frame(2, token),
            Event::TokenReceived { attempt: 2, token } if token.index == 4 && token.text == "a"
        ));
        let error = StreamFrame::Error {
            code: ErrorCode::ShuttingDown,
            message: "bye".into(),
        };
        let Event::AttemptFailed { error, .. } = Event::from_frame(1, error) else {
            panic!("not a failure");
        };
        assert!(error.is_retryable());
        let request = StreamFrame::Request {
            id: crate::stream::RequestId([0; 16]),
            body_json: "{}".into(),
            resume: None,
            certificate: None,
        };
        assert!(matches!(
            Event::from_frame(1, request),
            Event::AttemptFailed {
                error: AttemptError::Broken(_),
                ..
            }
        ));
        let done = StreamFrame::Done {
            usage: Usage {
                prompt_tokens: 1,
                completion_tokens: 1,
            },
            cached_tokens: 0,
            finish_reason: FinishReason::Length,
            receipt: None,
        };
        assert!(matches!(
            Event::from_frame(1, done),
            Event::StreamEnded {
                finish_reason: FinishReason::Length,
                ..
            }
        ));
        let call = StreamFrame::ToolCall {
            index: 0,
            id: "c".into(),
            name: "f".into(),
            arguments: "{}".into(),
        };
        assert!(matches!(
            Event::from_frame(1, call),
            Event::ToolCallReceived { .. }
        ));
    }
}
