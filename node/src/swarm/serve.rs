//! Serving the chat requests that peers route to this node.
//!
//! The swarm hands every inbound chat stream to an [`InboundChat`] channel; [`serve_inbound`]
//! answers them with the node's chat pipeline, as its HTTP API does
//! ([`crate::agent::serve_relayed`]): the agent's system prompt, retrieval from this node's
//! knowledge base, the request's tools described in the prompt, constrained output for
//! `response_format` and required tool calls.
//! It writes `Token` frames followed by exactly one `Done` or `Error` frame. A request with
//! [`Resume`] continues after the text a failed node already sent (token indices go on from
//! `tokens_sent`, `max_tokens` shrinks by as much, and a constrained output's grammar is
//! advanced over the resumed text). When the reply channel closes (the requester went away)
//! the generation is cancelled.
//!
//! Tool calls come back as text (the JSON the entry node parses, as it does for its own
//! model); node-executed tools run on the entry node. A relayed chat has one choice and no
//! log-probability alternatives: the entry node serves `n` > 1 and `top_logprobs` itself.
//!
//! The frame logic is generic over a [`Backend`] so that it is tested without a model.

use std::sync::Arc;

use futures::future::BoxFuture;
use gaia_inference::generate::{CancelToken, FinishReason as GenFinish, GenerateEvent};
use gaia_protocol::stream::{
    ErrorCode, FinishReason, MAX_SOURCE_LABEL, MAX_SOURCE_TEXT, MAX_SOURCES, Resume, Source,
    StreamFrame, Usage,
};
use tokio::sync::mpsc;

use super::handle::InboundChat;
use super::meter::Meter;
use crate::agent::types::{self, ChatRequest, Limits};
use crate::agent::{ApiError, Shared};
use crate::engine::{EngineError, TaggedEvent};

/// Why a relayed chat cannot be served: the code and the message of its `Error` frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ServeError {
    /// The frame's error code (retryable codes let the requester try another node).
    pub code: ErrorCode,
    /// A lowercase sentence that says what went wrong and what to do.
    pub message: String,
}

impl ServeError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
}

impl From<ApiError> for ServeError {
    fn from(error: ApiError) -> Self {
        let code = match error.status.as_u16() {
            429 => ErrorCode::Busy,
            400 if error.code == Some("context_length_exceeded") => ErrorCode::TooLarge,
            413 => ErrorCode::TooLarge,
            400..=499 => ErrorCode::BadRequest,
            503 => ErrorCode::NotServed,
            _ => ErrorCode::Internal,
        };
        Self::new(code, error.message)
    }
}

impl From<EngineError> for ServeError {
    fn from(error: EngineError) -> Self {
        let code = match error {
            EngineError::Busy { .. } => ErrorCode::Busy,
            EngineError::Stopped => ErrorCode::ShuttingDown,
        };
        Self::new(code, error.to_string())
    }
}

/// A parsed and checked relayed chat, ready for a [`Backend`].
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The request as the pipeline reads it.
    pub request: ChatRequest,
    /// Its checked generation settings (`n` is 1).
    pub settings: types::GenSettings,
    /// Where to continue, for a request that failed over mid-stream.
    pub resume: Option<Resume>,
}

/// What runs relayed chats: the [`Engine`], or a test double.
pub trait Backend: Send + Sync + 'static {
    /// The limits requests are checked against.
    fn limits(&self) -> Limits;

    /// Where receipts are signed and recorded (`None`: the requests go unreceipted).
    fn meter(&self) -> Option<Arc<Meter>> {
        None
    }

    /// Prepares the conversation (plus the resumed text) and queues one generation of at
    /// most `max_tokens` tokens; its events come on the returned channel, with the
    /// knowledge-base passages put in the prompt.
    fn start(
        &self,
        chat: Prepared,
        max_tokens: Option<usize>,
        cancel: CancelToken,
    ) -> BoxFuture<'static, Result<Started, ServeError>>;
}

/// A generation that [`Backend::start`] queued.
pub struct Started {
    /// Its events.
    pub events: mpsc::Receiver<TaggedEvent>,
    /// The knowledge-base passages in its prompt, best first (sent to the entry node before
    /// the first token).
    pub sources: Vec<Source>,
}

/// The node itself: relayed chats run through its chat pipeline ([`crate::agent`]).
pub struct AgentBackend(pub Shared);

impl Backend for AgentBackend {
    fn limits(&self) -> Limits {
        let st = &self.0;
        Limits {
            max_tokens: st.config.server.max_tokens,
            max_n: 1,
            vocab: st
                .local
                .as_ref()
                .map_or(0, |m| m.engine.model().tokenizer().vocab_size()),
            defaults: crate::agent::types::Defaults::of(&st.config.agent),
        }
    }

    fn meter(&self) -> Option<Arc<Meter>> {
        self.0.swarm.as_ref().and_then(|h| h.meter().cloned())
    }

    fn start(
        &self,
        chat: Prepared,
        max_tokens: Option<usize>,
        cancel: CancelToken,
    ) -> BoxFuture<'static, Result<Started, ServeError>> {
        let st = Arc::clone(&self.0);
        st.metrics.served_for_peer();
        Box::pin(async move {
            let (events, sources) =
                crate::agent::serve_relayed(&st, chat.request, chat.resume, max_tokens, &cancel)
                    .await
                    .map_err(ServeError::from)?;
            Ok(Started {
                events,
                sources: sources.iter().take(MAX_SOURCES).map(wire_source).collect(),
            })
        })
    }
}

/// A retrieved passage as the stream protocol carries it: its texts cut (at a character
/// boundary) to the protocol's bounds.
fn wire_source(s: &crate::agent::rag::Source) -> Source {
    fn cut(text: &str, max: usize) -> String {
        let mut end = text.len().min(max);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text[..end].to_string()
    }
    Source {
        source: cut(&s.source, MAX_SOURCE_LABEL),
        title: cut(&s.title, MAX_SOURCE_LABEL),
        heading: s.heading.as_deref().map(|h| cut(h, MAX_SOURCE_LABEL)),
        score: if s.score.is_finite() { s.score } else { 0.0 },
        text: cut(&s.text, MAX_SOURCE_TEXT),
    }
}

/// Serves every chat that peers route to this node with its models, until the swarm closes
/// the channel. Each request runs in its own task; the engine's queue bounds the work (a full
/// queue answers `Busy`, and the requester tries another node).
pub async fn serve_inbound(inbound: mpsc::Receiver<InboundChat>, state: Shared) {
    serve_inbound_with(inbound, Arc::new(AgentBackend(state))).await;
}

/// [`serve_inbound`] with any [`Backend`].
pub async fn serve_inbound_with<B: Backend>(
    mut inbound: mpsc::Receiver<InboundChat>,
    backend: Arc<B>,
) {
    while let Some(chat) = inbound.recv().await {
        tokio::spawn(serve_one(chat, Arc::clone(&backend)));
    }
}

/// Cancels a generation when the task serving it ends, however it ends.
struct CancelGuard(CancelToken);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Parses and checks a relayed chat body.
pub fn prepare(
    body: &[u8],
    resume: Option<Resume>,
    limits: Limits,
) -> Result<Prepared, ServeError> {
    let request: ChatRequest = serde_json::from_slice(body).map_err(|e| {
        ServeError::bad_request(format!(
            "the relayed request is not an OpenAI chat completion body: {e}"
        ))
    })?;
    if request.messages.is_empty() {
        return Err(ServeError::bad_request("`messages` must not be empty"));
    }
    if request.messages.len() > types::MAX_MESSAGES {
        return Err(ServeError::bad_request(format!(
            "at most {} messages",
            types::MAX_MESSAGES
        )));
    }
    if request.common.max_tokens.is_some() && request.max_completion_tokens.is_some() {
        return Err(ServeError::bad_request(
            "give `max_tokens` or `max_completion_tokens`, not both",
        ));
    }
    let max = request.max_completion_tokens.or(request.common.max_tokens);
    let mut settings = types::validate_common(&request.common, max, limits)
        .map_err(|e| ServeError::bad_request(e.message))?;
    if settings.n != 1 {
        return Err(ServeError::bad_request(format!(
            "a relayed chat serves one choice, not n = {}; send n = 1",
            settings.n
        )));
    }
    types::chat_logprobs(
        &mut settings.sampling,
        request.logprobs,
        request.top_logprobs,
    )
    .map_err(|e| ServeError::bad_request(e.message))?;
    Ok(Prepared {
        request,
        settings,
        resume,
    })
}

/// Answers one relayed chat: `Token` frames, then exactly one `Done` or `Error`.
async fn serve_one<B: Backend>(chat: InboundChat, backend: Arc<B>) {
    let InboundChat {
        from,
        id,
        request,
        resume,
        reply,
    } = chat;
    let error = |e: ServeError| StreamFrame::Error {
        code: e.code,
        message: e.message,
    };
    let prepared = match prepare(&request, resume, backend.limits()) {
        Ok(prepared) => prepared,
        Err(e) => {
            tracing::debug!(%from, %id, error = %e, "refusing a relayed chat");
            let _ = reply.send(error(e)).await;
            return;
        }
    };
    let already = prepared.resume.as_ref().map_or(0, |r| r.tokens_sent);
    let max_tokens = match prepared.settings.max_tokens {
        Some(max) => {
            let left = max.saturating_sub(already as usize);
            if left == 0 {
                // Everything asked for was sent before the failover.
                let receipt = match backend.meter() {
                    Some(meter) => meter.issue(id, from, 0, 0).await,
                    None => None,
                };
                let done = StreamFrame::Done {
                    usage: Usage {
                        prompt_tokens: 0,
                        completion_tokens: already,
                    },
                    cached_tokens: 0,
                    finish_reason: FinishReason::Length,
                    receipt,
                };
                let _ = reply.send(done).await;
                return;
            }
            Some(left)
        }
        None => None,
    };
    let cancel = CancelToken::new();
    let _cancel_on_drop = CancelGuard(cancel.clone());
    let Started {
        mut events,
        sources,
    } = match backend.start(prepared, max_tokens, cancel.clone()).await {
        Ok(started) => started,
        Err(e) => {
            let _ = reply.send(error(e)).await;
            return;
        }
    };
    if !sources.is_empty() && reply.send(StreamFrame::Sources { sources }).await.is_err() {
        return;
    }
    let mut index = already;
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            () = reply.closed() => {
                tracing::debug!(%from, %id, "the requester went away: cancelling its generation");
                return; // `_cancel_on_drop` cancels the generation
            }
        };
        let frame = match event {
            Some((
                _,
                GenerateEvent::Token {
                    text_delta,
                    logprob,
                    ..
                },
            )) => {
                let frame = StreamFrame::Token {
                    text: text_delta,
                    index,
                    logprob,
                    top_logprobs: Vec::new(),
                };
                index = index.saturating_add(1);
                if reply.send(frame).await.is_err() {
                    return;
                }
                continue;
            }
            Some((
                _,
                GenerateEvent::Done {
                    finish_reason,
                    usage,
                    ..
                },
            )) => {
                let prompt = u32::try_from(usage.prompt_tokens).unwrap_or(u32::MAX);
                let own = u32::try_from(usage.completion_tokens).unwrap_or(u32::MAX);
                // Signed and on this node's disk before the entry node learns the end.
                let receipt = match backend.meter() {
                    Some(meter) => meter.issue(id, from, prompt, own).await,
                    None => None,
                };
                StreamFrame::Done {
                    usage: Usage {
                        prompt_tokens: prompt,
                        completion_tokens: already.saturating_add(own),
                    },
                    cached_tokens: u32::try_from(usage.cached_tokens)
                        .unwrap_or(u32::MAX)
                        .min(prompt),
                    finish_reason: match finish_reason {
                        GenFinish::Stop => FinishReason::Stop,
                        // A generation cut by the node's time limit ends like one cut by
                        // length.
                        GenFinish::Length | GenFinish::Cancelled => FinishReason::Length,
                    },
                    receipt,
                }
            }
            Some((_, GenerateEvent::Error(e))) => error(ServeError::new(
                ErrorCode::Internal,
                format!("the generation failed: {e}"),
            )),
            None => error(ServeError::new(
                ErrorCode::Internal,
                "the generation ended without a result; retry the request",
            )),
        };
        let _ = reply.send(frame).await;
        return;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use gaia_inference::generate::{Timings, Usage as GenUsage};
    use gaia_protocol::NodeId;
    use gaia_protocol::stream::RequestId;

    use super::*;

    /// What the fake backend saw of one request: its resume, its token budget, its cancel.
    type SeenRequest = (Option<Resume>, Option<usize>, CancelToken);

    /// Emits `tokens` tokens `t0`, `t1`, ... (slowly if asked), and records what it saw.
    struct Fake {
        tokens: usize,
        delay: Duration,
        fail: Option<ServeError>,
        seen: Mutex<Vec<SeenRequest>>,
        sources: Vec<Source>,
    }

    impl Fake {
        fn new(tokens: usize) -> Self {
            Self {
                tokens,
                delay: Duration::ZERO,
                fail: None,
                seen: Mutex::new(Vec::new()),
                sources: Vec::new(),
            }
        }
    }

    impl Backend for Fake {
        fn limits(&self) -> Limits {
            Limits {
                max_tokens: 64,
                max_n: 4,
                vocab: 1000,
                defaults: crate::agent::types::Defaults::OPENAI,
            }
        }

        fn start(
            &self,
            chat: Prepared,
            max_tokens: Option<usize>,
            cancel: CancelToken,
        ) -> BoxFuture<'static, Result<Started, ServeError>> {
            Box::pin(std::future::ready(
                self.start_now(&chat, max_tokens, &cancel)
                    .map(|events| Started {
                        events,
                        sources: self.sources.clone(),
                    }),
            ))
        }
    }

    impl Fake {
        fn start_now(
            &self,
            chat: &Prepared,
            max_tokens: Option<usize>,
            cancel: &CancelToken,
        ) -> Result<mpsc::Receiver<TaggedEvent>, ServeError> {
            self.seen.lock().expect("not poisoned").push((
                chat.resume.clone(),
                max_tokens,
                cancel.clone(),
            ));
            if let Some(e) = &self.fail {
                return Err(e.clone());
            }
            let (tx, rx) = mpsc::channel(4);
            let n = max_tokens.unwrap_or(usize::MAX).min(self.tokens);
            let (delay, cancel) = (self.delay, cancel.clone());
            std::thread::spawn(move || {
                for i in 0..n {
                    std::thread::sleep(delay);
                    if cancel.is_cancelled() {
                        return;
                    }
                    let token = GenerateEvent::Token {
                        id: i as u32,
                        text_delta: format!("t{i}"),
                        logprob: None,
                        top_logprobs: Vec::new(),
                    };
                    if tx.blocking_send((0, token)).is_err() {
                        return;
                    }
                }
                let done = GenerateEvent::Done {
                    finish_reason: GenFinish::Stop,
                    usage: GenUsage {
                        prompt_tokens: 5,
                        completion_tokens: n,
                        cached_tokens: 3,
                    },
                    timings: Timings::default(),
                };
                let _ = tx.blocking_send((0, done));
            });
            Ok(rx)
        }
    }

    const BODY: &str = r#"{"model":"default","messages":[{"role":"user","content":"hi"}]}"#;

    /// Sends one chat to a server running `backend` and collects every frame until the server
    /// drops the reply channel.
    async fn exchange(backend: Arc<Fake>, body: &str, resume: Option<Resume>) -> Vec<StreamFrame> {
        let (tx, inbound) = mpsc::channel(4);
        let server = tokio::spawn(serve_inbound_with(inbound, backend));
        let (reply, mut frames) = mpsc::channel(4);
        tx.send(InboundChat {
            from: NodeId([7; 20]),
            id: RequestId::random(),
            request: body.as_bytes().to_vec(),
            resume,
            reply,
        })
        .await
        .expect("the server runs");
        let mut out = Vec::new();
        while let Ok(Some(frame)) =
            tokio::time::timeout(Duration::from_secs(10), frames.recv()).await
        {
            out.push(frame);
        }
        drop(tx);
        server
            .await
            .expect("the server ends when the swarm closes the channel");
        out
    }

    fn texts(frames: &[StreamFrame]) -> Vec<(String, u32)> {
        frames
            .iter()
            .filter_map(|f| match f {
                StreamFrame::Token { text, index, .. } => Some((text.clone(), *index)),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn tokens_then_exactly_one_done() {
        let frames = exchange(Arc::new(Fake::new(4)), BODY, None).await;
        assert_eq!(frames.len(), 5, "{frames:?}");
        assert_eq!(
            texts(&frames),
            [
                ("t0".into(), 0),
                ("t1".into(), 1),
                ("t2".into(), 2),
                ("t3".into(), 3)
            ]
        );
        match &frames[4] {
            StreamFrame::Done {
                usage,
                cached_tokens,
                finish_reason,
                ..
            } => {
                assert_eq!(*finish_reason, FinishReason::Stop);
                assert_eq!(usage.completion_tokens, 4);
                assert_eq!(usage.prompt_tokens, 5);
                assert_eq!(*cached_tokens, 3, "the prefix cache's share of the prompt");
            }
            other => panic!("expected Done, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_retrieved_sources_come_before_the_first_token() {
        let mut fake = Fake::new(2);
        fake.sources = vec![Source {
            source: "guide.md".into(),
            title: "Guide".into(),
            heading: None,
            score: 0.7,
            text: "Gaia nodes form domains.".into(),
        }];
        let frames = exchange(Arc::new(fake), BODY, None).await;
        assert_eq!(frames.len(), 4, "{frames:?}");
        let StreamFrame::Sources { sources } = &frames[0] else {
            panic!("expected the sources first, got {:?}", frames[0]);
        };
        assert_eq!(sources[0].source, "guide.md");
        assert!(matches!(frames[1], StreamFrame::Token { index: 0, .. }));
        assert!(matches!(frames[3], StreamFrame::Done { .. }));
        // Long texts are cut at a character boundary to the protocol's bounds.
        let long = crate::agent::rag::Source {
            source: "é".repeat(MAX_SOURCE_LABEL),
            title: "t".into(),
            heading: Some("h".into()),
            score: f32::NAN,
            text: "ü".repeat(MAX_SOURCE_TEXT),
        };
        let wire = wire_source(&long);
        assert!(wire.source.len() <= MAX_SOURCE_LABEL && wire.text.len() <= MAX_SOURCE_TEXT);
        assert!(wire.source.chars().all(|c| c == 'é'));
        assert_eq!(wire.score, 0.0);
        let frame = StreamFrame::Sources {
            sources: vec![wire],
        };
        gaia_protocol::validate::Validate::validate(&frame).expect("within the bounds");
    }

    #[tokio::test]
    async fn bad_requests_get_exactly_one_error() {
        let cases = [
            ("not json", ErrorCode::BadRequest),
            (
                r#"{"model":"default","messages":[]}"#,
                ErrorCode::BadRequest,
            ),
            (
                r#"{"model":"x","messages":[{"role":"user","content":"hi"}],"n":2}"#,
                ErrorCode::BadRequest,
            ),
            (
                r#"{"model":"x","messages":[{"role":"user","content":"hi"}],"temperature":9}"#,
                ErrorCode::BadRequest,
            ),
            (
                r#"{"model":"x","messages":[{"role":"user","content":"hi"}],
                   "max_tokens":5,"max_completion_tokens":5}"#,
                ErrorCode::BadRequest,
            ),
        ];
        for (body, code) in cases {
            let backend = Arc::new(Fake::new(3));
            let frames = exchange(Arc::clone(&backend), body, None).await;
            assert_eq!(frames.len(), 1, "{body}: {frames:?}");
            match &frames[0] {
                StreamFrame::Error { code: got, message } => {
                    assert_eq!(*got, code, "{body}: {message}");
                    assert!(!message.is_empty());
                }
                other => panic!("{body}: expected an error, got {other:?}"),
            }
            assert!(
                backend.seen.lock().expect("lock").is_empty(),
                "{body} reached the engine"
            );
        }
    }

    #[tokio::test]
    async fn an_engine_refusal_is_one_retryable_error() {
        let mut fake = Fake::new(3);
        fake.fail = Some(EngineError::Busy { queued: 8 }.into());
        let frames = exchange(Arc::new(fake), BODY, None).await;
        assert!(
            matches!(
                &frames[..],
                [StreamFrame::Error {
                    code: ErrorCode::Busy,
                    ..
                }]
            ),
            "{frames:?}"
        );
    }

    #[tokio::test]
    async fn resume_continues_after_the_text_already_sent() {
        let backend = Arc::new(Fake::new(10));
        let body = r#"{"model":"default","messages":[{"role":"user","content":"hi"}],
                       "max_tokens":5}"#;
        let resume = Resume {
            text: "t0t1".into(),
            tokens_sent: 2,
        };
        let frames = exchange(Arc::clone(&backend), body, Some(resume.clone())).await;
        // The backend got the resumed text and the tokens left of max_tokens.
        {
            let seen = backend.seen.lock().expect("lock");
            assert_eq!(seen.len(), 1);
            assert_eq!(seen[0].0.as_ref(), Some(&resume));
            assert_eq!(seen[0].1, Some(3));
        }
        // Indices go on from tokens_sent; usage counts the whole completion.
        let indices: Vec<u32> = texts(&frames).iter().map(|(_, i)| *i).collect();
        assert_eq!(indices, [2, 3, 4]);
        assert!(matches!(
            frames.last(),
            Some(StreamFrame::Done {
                usage: Usage {
                    completion_tokens: 5,
                    ..
                },
                ..
            })
        ));

        // Nothing left to generate: a Done at once, without the engine.
        let backend = Arc::new(Fake::new(10));
        let resume = Resume {
            text: "t0t1t2t3t4".into(),
            tokens_sent: 5,
        };
        let frames = exchange(Arc::clone(&backend), body, Some(resume)).await;
        assert!(
            matches!(
                &frames[..],
                [StreamFrame::Done {
                    finish_reason: FinishReason::Length,
                    ..
                }]
            ),
            "{frames:?}"
        );
        assert!(backend.seen.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn a_closed_reply_cancels_the_generation() {
        let mut fake = Fake::new(1000);
        fake.delay = Duration::from_millis(5);
        let backend = Arc::new(fake);
        let (tx, inbound) = mpsc::channel(4);
        tokio::spawn(serve_inbound_with(inbound, Arc::clone(&backend)));
        let (reply, mut frames) = mpsc::channel(4);
        tx.send(InboundChat {
            from: NodeId([7; 20]),
            id: RequestId::random(),
            request: BODY.as_bytes().to_vec(),
            resume: None,
            reply,
        })
        .await
        .expect("the server runs");
        let first = tokio::time::timeout(Duration::from_secs(10), frames.recv()).await;
        assert!(matches!(
            first,
            Ok(Some(StreamFrame::Token { index: 0, .. }))
        ));
        drop(frames);
        let cancel = backend.seen.lock().expect("lock")[0].2.clone();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !cancel.is_cancelled() {
            assert!(
                std::time::Instant::now() < deadline,
                "the generation was not cancelled after the requester left"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
