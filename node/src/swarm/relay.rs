//! Routed chat completions with failover: the driver of [`gaia_protocol::machine::failover::Request`].
//!
//! [`SwarmHandle::chat`] spawns one task per request. The task asks the actor's router for a
//! node, opens a chat stream to it (or hands the request to this node's engine when the
//! router picks this node), feeds the frames to the failover machine and forwards what the
//! machine emits to the caller as [`RelayEvent`]s, retrying and resuming on another node when
//! the first one fails.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use gaia_protocol::NodeId;
use gaia_protocol::Signed;
use gaia_protocol::payment::{Price, Receipt};
use gaia_protocol::stream::{FinishReason, RequestId, Usage};
use tokio::sync::mpsc;

use super::handle::{ChatRequest, ChatStream, SwarmHandle};
use gaia_protocol::machine::Millis;
use gaia_protocol::machine::failover::{
    self, Action, AttemptError, ClientOutput, Event, FailoverError, Request,
};
use gaia_protocol::machine::router::{Needs, NoRoute};

/// What a routed chat produces, in order: `Serving` before each node's output, `Output`s, and
/// exactly one `Done` or `Failed` last.
#[derive(Debug, Clone, PartialEq)]
pub enum RelayEvent {
    /// The request was sent to `node` (again on a failover).
    Serving {
        /// The node.
        node: NodeId,
        /// The attempt number, from 1.
        attempt: u32,
    },
    /// Output for the client.
    Output(ClientOutput),
    /// The completion ended normally.
    Done {
        /// The node that finished it.
        node: NodeId,
        /// Token counts.
        usage: Usage,
        /// Prompt tokens the serving node's prefix cache held.
        cached_tokens: u32,
        /// Why it stopped.
        finish_reason: FinishReason,
        /// The serving node's receipt, if any.
        receipt: Option<Signed<Receipt>>,
        /// How many nodes were tried.
        attempts: u32,
    },
    /// The request failed for good.
    Failed(FailoverError),
}

/// The events of one routed chat; a `futures::Stream`. Dropping it cancels the request.
#[derive(Debug)]
pub struct RelayStream {
    events: mpsc::Receiver<RelayEvent>,
}

impl RelayStream {
    /// The next event; `None` after the last. Cancel-safe.
    pub async fn recv(&mut self) -> Option<RelayEvent> {
        self.events.recv().await
    }
}

impl futures::Stream for RelayStream {
    type Item = RelayEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}

impl SwarmHandle {
    /// Routes the chat completion `body_json` (an OpenAI request body) to a node of the
    /// domain that meets `needs` (this node included, when it serves), with failover per
    /// `config`.
    pub fn chat(&self, needs: Needs, body_json: String, config: failover::Config) -> RelayStream {
        self.chat_via(None, needs, body_json, config)
    }

    /// [`SwarmHandle::chat`], with the first attempt sent to `first` when it is given (a node
    /// the caller already picked, for example with [`SwarmHandle::pick`]); failover picks
    /// the next nodes as usual.
    pub fn chat_via(
        &self,
        first: Option<NodeId>,
        needs: Needs,
        body_json: String,
        config: failover::Config,
    ) -> RelayStream {
        let (tx, rx) = mpsc::channel(self.limits.chat_buffer);
        let handle = self.clone();
        tokio::spawn(drive(handle, first, needs, body_json, config, tx));
        RelayStream { events: rx }
    }
}

/// Millis until `at` from `now`, as a sleep duration.
fn until(now: Millis, at: Millis) -> Duration {
    Duration::from_millis(at.since(now))
}

async fn drive(
    handle: SwarmHandle,
    first: Option<NodeId>,
    needs: Needs,
    body_json: String,
    config: failover::Config,
    events: mpsc::Sender<RelayEvent>,
) {
    let id = RequestId::random();
    let mut request = Request::new(config);
    let mut actions = Vec::new();
    let mut current: Option<(u32, ChatStream)> = None;
    // Tokens earlier nodes sent before the last dispatch (a failover resumes after them).
    let mut served_before = 0;
    let mut pending = vec![Event::Start];
    loop {
        while let Some(event) = pending.pop() {
            // Choosing a node needs the actor's router, which is async: ask it up front with
            // the exclusions the machine will pass (the nodes already excluded and the one
            // failing now), and answer the machine's synchronous query from that.
            let may_dispatch = matches!(
                event,
                Event::Start | Event::AttemptFailed { .. } | Event::Tick
            );
            let choice = if may_dispatch {
                let mut exclude = request.excluded().to_vec();
                if let failover::Phase::Attempt { node, .. }
                | failover::Phase::Streaming { node, .. } = request.phase()
                {
                    exclude.push(node);
                }
                match (&event, first) {
                    (Event::Start, Some(node)) => Some((exclude, Ok(node))),
                    _ => match handle.pick_excluding(&needs, exclude.clone()).await {
                        Ok(choice) => Some((exclude, choice)),
                        Err(_) => Some((exclude, Err(NoRoute::default()))),
                    },
                }
            } else {
                None
            };
            let now = super::now();
            request.handle(
                now,
                event,
                |excluded: &[NodeId]| match choice {
                    Some((asked, Ok(node)))
                        if !excluded.contains(&node)
                            && excluded.iter().all(|e| asked.contains(e)) =>
                    {
                        Ok(node)
                    }
                    Some((_, Err(route))) => Err(route),
                    _ => Err(NoRoute::default()),
                },
                &mut actions,
            );
            for action in actions.drain(..) {
                match action {
                    Action::Dispatch {
                        attempt,
                        node,
                        resume,
                    } => {
                        served_before = resume.as_ref().map_or(0, |r| r.tokens_sent);
                        let _ = events.send(RelayEvent::Serving { node, attempt }).await;
                        let chat = ChatRequest {
                            id,
                            body_json: body_json.clone(),
                            resume,
                        };
                        match handle.open_chat_with(node, chat).await {
                            Ok(stream) => current = Some((attempt, stream)),
                            Err(error) => {
                                current = None;
                                pending.push(Event::AttemptFailed {
                                    attempt,
                                    error: AttemptError::Unreachable(error.to_string()),
                                });
                            }
                        }
                    }
                    Action::Cancel { attempt, .. } => {
                        if current.as_ref().is_some_and(|(a, _)| *a == attempt) {
                            current = None;
                        }
                    }
                    Action::EmitToClient(output) => {
                        if events.send(RelayEvent::Output(output)).await.is_err() {
                            pending.push(Event::ClientGone);
                        }
                    }
                    Action::Observe(observation) => handle.observe(observation),
                    Action::Finish {
                        node,
                        usage,
                        cached_tokens,
                        finish_reason,
                        receipt,
                        attempts,
                    } => {
                        // The debit is final once the receipt is checked and on disk, before
                        // the client sees the end.
                        let receipt = match handle.meter() {
                            Some(meter) => match meter
                                .settle(
                                    id,
                                    node,
                                    receipt.as_ref(),
                                    usage.prompt_tokens,
                                    usage.completion_tokens,
                                    served_before,
                                    // A request nobody pays for may be served at any price.
                                    needs.max_price.unwrap_or(Price::UNLIMITED),
                                )
                                .await
                            {
                                Ok(()) => receipt,
                                Err(error) => {
                                    tracing::warn!(%error, %id, "a request ends unmetered");
                                    None
                                }
                            },
                            None => receipt,
                        };
                        let _ = events
                            .send(RelayEvent::Done {
                                node,
                                usage,
                                cached_tokens,
                                finish_reason,
                                receipt,
                                attempts,
                            })
                            .await;
                    }
                    Action::FailWithError(error) => {
                        let _ = events.send(RelayEvent::Failed(error)).await;
                    }
                }
            }
        }
        if request.is_finished() {
            return;
        }
        let wake = request.next_wakeup().map(|at| until(super::now(), at));
        let sleep = tokio::time::sleep(wake.unwrap_or(Duration::from_secs(3600)));
        let next = async {
            match current.as_mut() {
                Some((attempt, stream)) => Some((*attempt, stream.recv().await)),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            item = next => {
                if let Some((attempt, item)) = item {
                    pending.push(match item {
                        Some(Ok(frame)) => Event::from_frame(attempt, frame),
                        Some(Err(error)) => Event::AttemptFailed {
                            attempt,
                            error: AttemptError::Broken(error.to_string()),
                        },
                        None => Event::AttemptFailed {
                            attempt,
                            error: AttemptError::Broken(
                                "the stream ended before the completion did".into(),
                            ),
                        },
                    });
                }
            }
            () = sleep => pending.push(Event::Tick),
            () = events.closed() => pending.push(Event::ClientGone),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn until_saturates() {
        assert_eq!(until(Millis(10), Millis(5)), Duration::ZERO);
        assert_eq!(until(Millis(10), Millis(25)), Duration::from_millis(15));
    }
}
