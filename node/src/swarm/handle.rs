//! [`SwarmHandle`]: what the rest of the node calls, and the chat streams it opens.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::AsyncReadExt;
use gaia_protocol::advert::{Advert, Load};
use gaia_protocol::domain::{DomainManifest, MembershipCertificate, Pricing, Revocation};
use gaia_protocol::protocols;
use gaia_protocol::stream::{ErrorCode, RequestId, Resume, StreamFrame};
use gaia_protocol::{NodeId, Signed};
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use tokio::sync::{mpsc, oneshot};

use super::codec::{read_frame, write_frame};
use super::config::SwarmLimits;
use gaia_protocol::machine::membership::{LocalService, LocalStatus};
use gaia_protocol::machine::router::{Needs, NoRoute, Observation};

/// A command to the swarm actor; each carries its reply channel.
#[derive(Debug)]
pub enum Command {
    /// The member table.
    Members {
        /// Where to answer.
        reply: oneshot::Sender<Vec<MemberInfo>>,
    },
    /// Choose the node for a request.
    Pick {
        /// What the request needs.
        needs: Needs,
        /// Nodes that must not be chosen.
        exclude: Vec<NodeId>,
        /// Where to answer.
        reply: oneshot::Sender<Result<NodeId, NoRoute>>,
    },
    /// Feed the router what happened to a request.
    Observe(Observation),
    /// The peer id of a node, if known.
    PeerOf {
        /// The node.
        node: NodeId,
        /// Where to answer.
        reply: oneshot::Sender<Option<PeerId>>,
    },
    /// Whether `peer` may send chat requests to this node.
    Authorize {
        /// The peer.
        peer: PeerId,
        /// The certificate the peer sent with its request, if any.
        certificate: Option<Signed<MembershipCertificate>>,
        /// Where to answer: the peer's node address, or why it is refused.
        reply: oneshot::Sender<Result<NodeId, String>>,
    },
    /// `peer` broke a protocol: lower its score.
    Penalise {
        /// The peer.
        peer: PeerId,
        /// What it did.
        reason: String,
    },
    /// What this node serves changed (`None`: it stops serving).
    SetService(Option<LocalService>),
    /// This node's load changed (published with the next heartbeat).
    SetLoad(Load),
    /// Publish a certificate on the domain topic (and take it into account here).
    PublishCertificate(Signed<MembershipCertificate>),
    /// Publish a revocation on the domain topic (and take it into account here).
    PublishRevocation(Signed<Revocation>),
    /// Adopt (if newer) and publish a manifest of the domain.
    PublishManifest(Signed<DomainManifest>),
    /// Tell the domain's other entry nodes of this node's latest vouchers.
    PublishVouchers(gaia_protocol::payment::VoucherShare),
    /// Publish raw bytes on the domain topic (hardening tests and diagnostics).
    PublishRaw {
        bytes: Vec<u8>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Dial an address.
    Dial(Multiaddr),
    /// The swarm's state.
    Status {
        /// Where to answer.
        reply: oneshot::Sender<SwarmStatus>,
    },
    /// Leave the domain cleanly (a last advert says so) and stop.
    Shutdown {
        /// Answered once the actor has stopped.
        reply: oneshot::Sender<()>,
    },
}

/// One member of the domain, as this node sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberInfo {
    /// Its address.
    pub node: NodeId,
    /// Its libp2p peer id, when known.
    pub peer_id: Option<PeerId>,
    /// Its latest verified advert.
    pub advert: Advert,
    /// Whether requests may be routed to it.
    pub routable: bool,
    /// Why it is not routable, if it is not.
    pub unroutable: Option<String>,
    /// When it was last heard of (unix milliseconds).
    pub last_heard_ms: u64,
}

/// The swarm's state, for `gaia info`, logs and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct SwarmStatus {
    /// This node's address.
    pub node: NodeId,
    /// This node's peer id.
    pub peer_id: PeerId,
    /// The addresses it listens on.
    pub listen_addrs: Vec<Multiaddr>,
    /// Peers connected now.
    pub connected: Vec<PeerId>,
    /// The domain's topic, when in a domain.
    pub topic: Option<String>,
    /// The number of members in the table (not counting this node).
    pub members: usize,
    /// This node's standing in its domain.
    pub local_status: Option<LocalStatus>,
    /// Peers this node penalised for breaking the protocol, with their application score.
    pub penalised: Vec<(PeerId, f64)>,
    /// Peers subscribed to the domain's topic.
    pub topic_peers: usize,
    /// The version of the domain's manifest this node holds.
    pub manifest_version: Option<u64>,
    /// Reachability as AutoNAT sees it: `public`, `private` or `unknown`.
    pub nat: String,
    /// How many times AutoNAT's verdict changed since the node started.
    pub nat_changes: u64,
    /// Members holding a relay slot on this node.
    pub relay_slots: usize,
    /// Confirmed external addresses (AutoNAT, `swarm.external_addrs`, relay slots).
    pub external_addrs: Vec<Multiaddr>,
    /// Relays holding a slot for this node.
    pub relays: Vec<PeerId>,
    /// Hole punches that opened a direct connection.
    pub hole_punches: u64,
    /// Hole punches that failed (the connection stayed relayed).
    pub hole_punch_failures: u64,
}

/// A chat request sent to one node: the OpenAI chat-completion body and, on failover, where
/// to resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatRequest {
    /// The request id.
    pub id: RequestId,
    /// The OpenAI chat-completion request body, as JSON text.
    pub body_json: String,
    /// Set when continuing a completion another node started.
    pub resume: Option<Resume>,
}

/// A chat request for this node's engine.
///
/// The engine sends [`StreamFrame::Token`] / [`StreamFrame::ToolCall`] frames on `reply` and
/// ends with exactly one [`StreamFrame::Done`] or [`StreamFrame::Error`]. When `reply.send`
/// fails, the requester went away: stop generating.
#[derive(Debug)]
pub struct InboundChat {
    /// The node that sent it (this node itself when its own router picked it).
    pub from: NodeId,
    /// The request id.
    pub id: RequestId,
    /// The OpenAI chat-completion request body (JSON bytes).
    pub request: Vec<u8>,
    /// Set when continuing a completion another node started: continue after this text.
    pub resume: Option<Resume>,
    /// Where to send the frames (bounded).
    pub reply: mpsc::Sender<StreamFrame>,
}

/// A relayed chat failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// The swarm actor is gone.
    #[error("the swarm has stopped: restart the node")]
    Stopped,
    /// The swarm actor's queue is full.
    #[error("the swarm is busy: try again")]
    Busy,
    /// No address is known for the node.
    #[error("no known peer id for node {0}: it is not a member this node has heard of")]
    UnknownNode(NodeId),
    /// The stream could not be opened.
    #[error("cannot open a chat stream to {node}: {reason}")]
    Open {
        /// The node.
        node: NodeId,
        /// Why.
        reason: String,
    },
    /// The node did not answer in time.
    #[error("node {node} sent nothing for {secs} s")]
    Timeout {
        /// The node.
        node: NodeId,
        /// The limit.
        secs: u64,
    },
    /// The node sent bytes that are not a valid frame; it was penalised.
    #[error("node {node} sent a malformed frame: {reason}")]
    Malformed {
        /// The node.
        node: NodeId,
        /// Why.
        reason: String,
    },
    /// The stream ended before a `Done` or `Error` frame.
    #[error("node {node} closed the stream before the end of the completion")]
    Closed {
        /// The node.
        node: NodeId,
    },
    /// The request is not valid (too large, empty).
    #[error("invalid chat request: {0}")]
    Invalid(String),
}

/// The frames of one chat stream, until (and including) the `Done` or `Error` frame.
///
/// A `futures::Stream` of `Result<StreamFrame, RelayError>`; after an `Err` the stream ends.
/// Dropping it closes the substream, which cancels the generation on the serving node.
#[derive(Debug)]
pub struct ChatStream {
    node: NodeId,
    frames: mpsc::Receiver<Result<StreamFrame, RelayError>>,
}

impl ChatStream {
    /// The node serving it.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The next frame; `None` after the last one. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Result<StreamFrame, RelayError>> {
        self.frames.recv().await
    }

    /// A stream fed by `frames` (the local engine, or a test).
    pub(crate) fn from_channel(
        node: NodeId,
        frames: mpsc::Receiver<Result<StreamFrame, RelayError>>,
    ) -> Self {
        Self { node, frames }
    }
}

impl futures::Stream for ChatStream {
    type Item = Result<StreamFrame, RelayError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.frames.poll_recv(cx)
    }
}

/// Tries to open a chat stream to a peer (within the open timeout) before giving up.
const OPEN_TRIES: usize = 2;

/// The handle to a running swarm; cheap to clone.
#[derive(Clone)]
pub struct SwarmHandle {
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) control: libp2p_stream::Control,
    pub(crate) node: NodeId,
    pub(crate) peer_id: PeerId,
    pub(crate) limits: Arc<SwarmLimits>,
    /// This node's engine, for requests its own router sends to itself.
    pub(crate) local_engine: mpsc::Sender<InboundChat>,
    /// This node's membership certificate, sent with each chat request.
    pub(crate) certificate: Option<Signed<MembershipCertificate>>,
    /// Receipts signed and checked (`None` outside a domain).
    pub(crate) meter: Option<std::sync::Arc<super::meter::Meter>>,
    /// The domain's terms as the newest manifest states them (`None` outside a domain).
    pub(crate) terms: tokio::sync::watch::Receiver<Option<DomainTerms>>,
}

/// What a domain's newest manifest says of money: who operates it and its pricing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainTerms {
    /// The operator (who must run the domain's escrow).
    pub operator: NodeId,
    /// The manifest version they come from.
    pub version: u64,
    /// The domain's prices and the operator's share, when it states them.
    pub pricing: Option<Pricing>,
}

impl DomainTerms {
    /// The terms `manifest` states.
    pub fn of(manifest: &DomainManifest) -> Self {
        Self {
            operator: manifest.operator,
            version: manifest.version,
            pricing: manifest.pricing,
        }
    }
}

impl std::fmt::Debug for SwarmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwarmHandle")
            .field("node", &self.node)
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

impl SwarmHandle {
    /// This node's address.
    pub fn node_id(&self) -> NodeId {
        self.node
    }

    /// This node's libp2p peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// This node's metering (receipts), when it is in a domain.
    pub fn meter(&self) -> Option<&std::sync::Arc<super::meter::Meter>> {
        self.meter.as_ref()
    }

    /// A raw libp2p-stream control, to open streams of any protocol (tools and tests).
    pub fn stream_control(&self) -> libp2p_stream::Control {
        self.control.clone()
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, RelayError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| RelayError::Stopped)?;
        answer.await.map_err(|_| RelayError::Stopped)
    }

    fn tell(&self, command: Command) -> Result<(), RelayError> {
        self.commands.try_send(command).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => RelayError::Busy,
            mpsc::error::TrySendError::Closed(_) => RelayError::Stopped,
        })
    }

    /// The domain's terms as the newest manifest states them, updated as newer versions come.
    pub fn terms(&self) -> tokio::sync::watch::Receiver<Option<DomainTerms>> {
        self.terms.clone()
    }

    /// The member table (other nodes, with their adverts). Cancel-safe.
    pub async fn members(&self) -> Result<Vec<MemberInfo>, RelayError> {
        self.ask(|reply| Command::Members { reply }).await
    }

    /// The swarm's state. Cancel-safe.
    pub async fn status(&self) -> Result<SwarmStatus, RelayError> {
        self.ask(|reply| Command::Status { reply }).await
    }

    /// The node that should serve a request with `needs` (load- and capability-aware, see
    /// [`gaia_protocol::machine::router`]); may be this node itself when it serves. Cancel-safe.
    pub async fn pick(&self, needs: &Needs) -> Result<Result<NodeId, NoRoute>, RelayError> {
        self.pick_excluding(needs, Vec::new()).await
    }

    /// Like [`pick`](Self::pick), never choosing a node in `exclude`.
    pub async fn pick_excluding(
        &self,
        needs: &Needs,
        exclude: Vec<NodeId>,
    ) -> Result<Result<NodeId, NoRoute>, RelayError> {
        let needs = needs.clone();
        self.ask(|reply| Command::Pick {
            needs,
            exclude,
            reply,
        })
        .await
    }

    /// Tells the router what happened to a request (dropped when the actor is busy).
    pub fn observe(&self, observation: Observation) {
        let _ = self.tell(Command::Observe(observation));
    }

    /// Sets what this node serves (`None`: stop serving; a last advert says it left).
    pub async fn set_service(&self, service: Option<LocalService>) -> Result<(), RelayError> {
        self.commands
            .send(Command::SetService(service))
            .await
            .map_err(|_| RelayError::Stopped)
    }

    /// Updates this node's advertised load (sent with the next heartbeat; never blocks).
    pub fn set_load(&self, load: Load) {
        let _ = self.tell(Command::SetLoad(load));
    }

    /// Publishes a membership certificate to the domain.
    pub async fn publish_certificate(
        &self,
        certificate: Signed<MembershipCertificate>,
    ) -> Result<(), RelayError> {
        self.commands
            .send(Command::PublishCertificate(certificate))
            .await
            .map_err(|_| RelayError::Stopped)
    }

    /// Publishes a revocation to the domain.
    pub async fn publish_revocation(
        &self,
        revocation: Signed<Revocation>,
    ) -> Result<(), RelayError> {
        self.commands
            .send(Command::PublishRevocation(revocation))
            .await
            .map_err(|_| RelayError::Stopped)
    }

    /// Publishes this node's latest vouchers on the domain's topic.
    pub async fn publish_vouchers(
        &self,
        share: gaia_protocol::payment::VoucherShare,
    ) -> Result<(), RelayError> {
        self.commands
            .send(Command::PublishVouchers(share))
            .await
            .map_err(|_| RelayError::Stopped)
    }

    /// Adopts `manifest` if it is a newer version of the domain's, and publishes it on the
    /// domain's topic.
    pub async fn publish_manifest(
        &self,
        manifest: Signed<DomainManifest>,
    ) -> Result<(), RelayError> {
        self.commands
            .send(Command::PublishManifest(manifest))
            .await
            .map_err(|_| RelayError::Stopped)
    }

    /// Dials `addr`.
    /// Publishes `bytes` as they are on the domain's gossip topic, without any check: for
    /// protocol hardening tests and diagnostics (peers reject and penalise anything that is not
    /// a valid gossip message). Fails when no peer is subscribed to the topic yet.
    pub async fn publish_raw_gossip(&self, bytes: Vec<u8>) -> Result<(), RelayError> {
        self.ask(|reply| Command::PublishRaw { bytes, reply })
            .await?
            .map_err(RelayError::Invalid)
    }

    pub async fn dial(&self, addr: Multiaddr) -> Result<(), RelayError> {
        self.commands
            .send(Command::Dial(addr))
            .await
            .map_err(|_| RelayError::Stopped)
    }

    /// Leaves the domain cleanly (a last advert with `leaving: true`) and stops the actor.
    /// Cancel-safe.
    pub async fn shutdown(&self) -> Result<(), RelayError> {
        self.ask(|reply| Command::Shutdown { reply }).await
    }

    /// Whether `peer` (with the certificate it sent) may be served: a valid member of the
    /// domain; the error says why not.
    pub(crate) async fn authorize(
        &self,
        peer: PeerId,
        certificate: Option<Signed<MembershipCertificate>>,
    ) -> Result<NodeId, String> {
        self.ask(|reply| Command::Authorize {
            peer,
            certificate,
            reply,
        })
        .await
        .map_err(|e| e.to_string())?
    }

    pub(crate) fn penalise(&self, peer: PeerId, reason: String) {
        let _ = self.tell(Command::Penalise { peer, reason });
    }

    /// Opens a chat stream to `node` with the OpenAI chat-completion `request` body.
    ///
    /// Cancel-safe (a cancelled open drops the half-open stream).
    pub async fn open_chat(
        &self,
        node: NodeId,
        request: Vec<u8>,
    ) -> Result<ChatStream, RelayError> {
        let body_json = String::from_utf8(request)
            .map_err(|_| RelayError::Invalid("the body is not UTF-8".into()))?;
        self.open_chat_with(
            node,
            ChatRequest {
                id: RequestId::random(),
                body_json,
                resume: None,
            },
        )
        .await
    }

    /// Opens a chat stream to `node` with `request`; this node's own engine when `node` is
    /// this node.
    pub async fn open_chat_with(
        &self,
        node: NodeId,
        request: ChatRequest,
    ) -> Result<ChatStream, RelayError> {
        let first = StreamFrame::Request {
            id: request.id,
            body_json: request.body_json,
            resume: request.resume,
            certificate: self.certificate.clone(),
        };
        gaia_protocol::Validate::validate(&first)
            .map_err(|e| RelayError::Invalid(e.to_string()))?;
        if node == self.node {
            return self.open_local(first);
        }
        let peer = self
            .ask(|reply| Command::PeerOf { node, reply })
            .await?
            .ok_or(RelayError::UnknownNode(node))?;
        let open_timeout = Duration::from_millis(self.limits.open_timeout_ms);
        let mut control = self.control.clone();
        let open = async {
            // A connection can close just as a stream opens on it (an idle or redundant
            // connection being dropped); the second try dials or picks another one.
            let mut last_error = String::new();
            for attempt in 0..OPEN_TRIES {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // The newest version first; a node of a previous version answers an older one.
                let mut opened = control
                    .open_stream(peer, StreamProtocol::new(protocols::STREAM))
                    .await;
                for older in [protocols::STREAM_V2, protocols::STREAM_V1] {
                    if let Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_)) = &opened {
                        opened = control.open_stream(peer, StreamProtocol::new(older)).await;
                    }
                }
                let mut stream = match opened {
                    Ok(stream) => stream,
                    Err(e) => {
                        last_error = e.to_string();
                        continue;
                    }
                };
                match write_frame(&mut stream, &first, 3).await {
                    Ok(()) => return Ok(stream),
                    Err(e) => last_error = e.to_string(),
                }
            }
            Err::<libp2p::Stream, String>(last_error)
        };
        let stream = match tokio::time::timeout(open_timeout, open).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(reason)) => return Err(RelayError::Open { node, reason }),
            Err(_) => {
                return Err(RelayError::Open {
                    node,
                    reason: format!("no stream within {} s", open_timeout.as_secs()),
                });
            }
        };
        let (tx, rx) = mpsc::channel(self.limits.chat_buffer);
        let frame_timeout = Duration::from_millis(self.limits.frame_timeout_ms);
        let handle = self.clone();
        tokio::spawn(async move {
            // Keep the write half open: closing it would tell the server we left.
            let (mut reader, _writer) = stream.split();
            loop {
                let next = tokio::select! {
                    next = tokio::time::timeout(frame_timeout, read_frame(&mut reader)) => next,
                    () = tx.closed() => return,
                };
                let item = match next {
                    Err(_) => Err(RelayError::Timeout {
                        node,
                        secs: frame_timeout.as_secs(),
                    }),
                    Ok(Ok(None)) => Err(RelayError::Closed { node }),
                    Ok(Ok(Some(StreamFrame::Request { .. }))) => {
                        handle.penalise(peer, "sent a request frame on a reply stream".into());
                        Err(RelayError::Malformed {
                            node,
                            reason: "a request frame in a reply".into(),
                        })
                    }
                    Ok(Ok(Some(frame))) => Ok(frame),
                    Ok(Err(error)) => {
                        handle.penalise(peer, format!("malformed chat frame: {error}"));
                        Err(RelayError::Malformed {
                            node,
                            reason: error.to_string(),
                        })
                    }
                };
                let last = matches!(
                    item,
                    Err(_) | Ok(StreamFrame::Done { .. } | StreamFrame::Error { .. })
                );
                if tx.send(item).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(ChatStream { node, frames: rx })
    }

    /// Hands `first` (a request frame) to this node's engine.
    fn open_local(&self, first: StreamFrame) -> Result<ChatStream, RelayError> {
        let StreamFrame::Request {
            id,
            body_json,
            resume,
            ..
        } = first
        else {
            return Err(RelayError::Invalid("not a request frame".into()));
        };
        let (reply, mut frames) = mpsc::channel(self.limits.chat_buffer);
        let chat = InboundChat {
            from: self.node,
            id,
            request: body_json.into_bytes(),
            resume,
            reply,
        };
        self.local_engine.try_send(chat).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => RelayError::Busy,
            mpsc::error::TrySendError::Closed(_) => RelayError::Stopped,
        })?;
        let (tx, rx) = mpsc::channel(self.limits.chat_buffer);
        let node = self.node;
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    item = frames.recv() => item,
                    () = tx.closed() => return,
                };
                let item = item.ok_or(RelayError::Closed { node });
                let last = matches!(
                    item,
                    Err(_) | Ok(StreamFrame::Done { .. } | StreamFrame::Error { .. })
                );
                if tx.send(item).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(ChatStream::from_channel(node, rx))
    }
}

/// Serves one inbound chat stream of protocol `version`: reads the request, checks the peer,
/// hands the request to the engine and writes its frames back (a node asking two prices
/// refuses a version-1 entry node at once: its receipt could not say them). Runs in its own task; `permit` bounds how many run.
pub(crate) async fn serve_stream(
    handle: SwarmHandle,
    engine: mpsc::Sender<InboundChat>,
    peer: PeerId,
    (stream, version): (libp2p::Stream, u32),
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let (mut reader, mut writer) = stream.split();
    let refuse = |code: ErrorCode, message: String| StreamFrame::Error { code, message };
    let Some(_permit) = permit else {
        let frame = refuse(
            ErrorCode::Busy,
            "this node serves too many streams: retry elsewhere".into(),
        );
        let _ = write_frame(&mut writer, &frame, version).await;
        return;
    };
    let open_timeout = Duration::from_millis(handle.limits.open_timeout_ms);
    let first = match tokio::time::timeout(open_timeout, read_frame(&mut reader)).await {
        Err(_) => {
            tracing::debug!(%peer, "chat stream without a request in time");
            return;
        }
        Ok(Ok(Some(StreamFrame::Request {
            id,
            body_json,
            resume,
            certificate,
        }))) => (id, body_json, resume, certificate),
        Ok(Ok(None)) => return,
        Ok(Ok(Some(_))) => {
            handle.penalise(
                peer,
                "chat stream started with a frame other than a request".into(),
            );
            return;
        }
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "malformed chat request");
            handle.penalise(peer, format!("malformed chat request: {error}"));
            return;
        }
    };
    let (id, body_json, resume, certificate) = first;
    let authorize = |reply| Command::Authorize {
        peer,
        certificate,
        reply,
    };
    let from = match handle.ask(authorize).await {
        Ok(Ok(node)) => node,
        Ok(Err(reason)) => {
            tracing::info!(%peer, %reason, "refused a chat request");
            let frame = refuse(ErrorCode::Unauthorized, reason);
            let _ = write_frame(&mut writer, &frame, version).await;
            let _ = futures::AsyncWriteExt::close(&mut writer).await;
            return;
        }
        Err(_) => return,
    };
    if let Some(price) = handle
        .meter
        .as_ref()
        .map(|meter| meter.price())
        .filter(|price| version < 2 && !price.is_flat())
    {
        let message = format!(
            "this node charges {price}, which the entry node's Gaia (stream protocol 1) cannot \
             pay: upgrade it"
        );
        let _ = write_frame(
            &mut writer,
            &refuse(ErrorCode::BadRequest, message),
            version,
        )
        .await;
        let _ = futures::AsyncWriteExt::close(&mut writer).await;
        return;
    }
    let (reply, mut frames) = mpsc::channel(handle.limits.chat_buffer);
    let chat = InboundChat {
        from,
        id,
        request: body_json.into_bytes(),
        resume,
        reply,
    };
    if let Err(error) = engine.try_send(chat) {
        let message = match error {
            mpsc::error::TrySendError::Full(_) => "this node's engine is busy: retry elsewhere",
            mpsc::error::TrySendError::Closed(_) => "this node does not serve chat requests",
        };
        let frame = refuse(ErrorCode::Busy, message.into());
        let _ = write_frame(&mut writer, &frame, version).await;
        return;
    }
    let mut probe = [0u8; 1];
    loop {
        tokio::select! {
            frame = frames.recv() => {
                let frame = frame.unwrap_or_else(|| refuse(
                    ErrorCode::Internal,
                    "the engine dropped the request without an answer".into(),
                ));
                let last = matches!(frame, StreamFrame::Done { .. } | StreamFrame::Error { .. });
                if let Err(error) = write_frame(&mut writer, &frame, version).await {
                    tracing::debug!(%peer, %error, "chat stream write failed");
                    return;
                }
                if last {
                    let _ = futures::AsyncWriteExt::close(&mut writer).await;
                    return;
                }
            }
            read = reader.read(&mut probe) => {
                match read {
                    Ok(0) | Err(_) => {
                        tracing::debug!(%peer, "requester closed the chat stream: cancelling");
                    }
                    Ok(_) => handle.penalise(peer, "sent data after its chat request".into()),
                }
                // Dropping `frames` tells the engine to stop.
                return;
            }
        }
    }
}

/// A handle that does not keep the actor alive (the stream acceptors hold one): it becomes a
/// [`SwarmHandle`] while some other handle still exists.
#[derive(Clone)]
pub(crate) struct WeakHandle {
    commands: mpsc::WeakSender<Command>,
    control: libp2p_stream::Control,
    node: NodeId,
    peer_id: PeerId,
    limits: Arc<SwarmLimits>,
    local_engine: mpsc::Sender<InboundChat>,
    meter: Option<std::sync::Arc<super::meter::Meter>>,
    terms: tokio::sync::watch::Receiver<Option<DomainTerms>>,
}

impl SwarmHandle {
    /// This handle without its hold on the actor.
    pub(crate) fn downgrade(&self) -> WeakHandle {
        WeakHandle {
            commands: self.commands.downgrade(),
            control: self.control.clone(),
            node: self.node,
            peer_id: self.peer_id,
            limits: self.limits.clone(),
            local_engine: self.local_engine.clone(),
            meter: self.meter.clone(),
            terms: self.terms.clone(),
        }
    }
}

impl WeakHandle {
    /// A handle again, without this node's certificate (acceptors send no requests); `None`
    /// once every other handle is gone.
    pub(crate) fn upgrade(&self) -> Option<SwarmHandle> {
        Some(SwarmHandle {
            commands: self.commands.upgrade()?,
            control: self.control.clone(),
            node: self.node,
            peer_id: self.peer_id,
            limits: self.limits.clone(),
            local_engine: self.local_engine.clone(),
            certificate: None,
            meter: self.meter.clone(),
            terms: self.terms.clone(),
        })
    }
}

impl crate::content::seed::Gate for SwarmHandle {
    fn authorize(
        &self,
        peer: PeerId,
        certificate: Option<Signed<MembershipCertificate>>,
    ) -> futures::future::BoxFuture<'_, Result<NodeId, String>> {
        Box::pin(SwarmHandle::authorize(self, peer, certificate))
    }

    fn penalise(&self, peer: PeerId, reason: String) {
        SwarmHandle::penalise(self, peer, reason);
    }
}
