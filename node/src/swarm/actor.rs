//! The swarm actor: one task that owns the libp2p `Swarm` and the domain's state machines.
//!
//! The loop waits on four things: a swarm event, a [`Command`] from a [`SwarmHandle`], the
//! membership machine's next wake-up, and a maintenance tick (once per heartbeat: redial the
//! bootstrap peers when alone, look the domain up in the DHT while no member is known,
//! re-publish a gateway's certificate, forget expired bans). Nothing in the loop awaits a slow
//! consumer: replies go on oneshot channels, and chat streams are served by their own tasks.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use gaia_protocol::advert::{Load, MAX_ADVERT_ADDRS};
use gaia_protocol::control::{ControlRequest, ControlResponse};
use gaia_protocol::domain::{Admission, MAX_MULTIADDR_LEN, MembershipCertificate};
use gaia_protocol::protocols;
use gaia_protocol::stream::ErrorCode;
use gaia_protocol::{NodeId, Signed};
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, PublishError};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, identify, kad, noise, tcp, yamux};
use tokio::sync::{Semaphore, mpsc, oneshot};

mod nat;

use super::behaviour::{Behaviour, BehaviourEvent, PENALTY, topic};
use super::handle::{Command, DomainTerms, MemberInfo, SwarmHandle, SwarmStatus, serve_stream};
use super::{Running, SwarmError, SwarmParams, node_id_of, now, peer_of_addr};
use gaia_protocol::gossip::{GossipDecodeError, GossipMessage};
use gaia_protocol::machine::guard::{Guard, GuardAction, GuardConfig};
use gaia_protocol::machine::membership::{self, Action, Event, LocalService, Membership, Verdict};
use gaia_protocol::machine::rate::Spend;
use gaia_protocol::machine::router::{self, NoRoute, Router};

/// Commands queued per actor.
const COMMAND_QUEUE: usize = 256;
/// Peers asked for a member snapshot before one answers.
const SNAPSHOT_PEERS: usize = 3;
/// Members this node dials on its own to join the gossip mesh.
const TARGET_PEERS: usize = 8;
/// Most peers with an application score or a certificate remembered.
const MAX_TRACKED: usize = 4096;
/// How long a clean leave waits for its last advert to go out.
const LEAVE_FLUSH: Duration = Duration::from_millis(300);
/// Every this many heartbeats (and at least [`REGOSSIP_MIN`] apart) a member re-publishes the
/// domain's manifest and a batch of the revocations it holds, so that members that joined or
/// restarted since (while the operator may be offline) learn them. Gossip's duplicate filter
/// keeps the copies of many members from travelling further than one hop.
const REGOSSIP_HEARTBEATS: u64 = 5;
/// The least time between two re-publications: gossip's duplicate filter remembers a message
/// for two minutes, so the same bytes sooner would be dropped (and logged) as a duplicate.
const REGOSSIP_MIN: Duration = Duration::from_secs(125);
/// Revocations re-published per round.
const REGOSSIP_REVOCATIONS: usize = 32;
/// The least time between two domain-state requests to one peer, in heartbeats.
const STATE_ASK_HEARTBEATS: u32 = 3;

pub(crate) async fn spawn(params: SwarmParams) -> Result<Running, SwarmError> {
    let SwarmParams {
        key,
        config,
        manifest,
        certificate,
        service,
        seed,
        state_dir,
        vouchers,
        voucher_source,
        content,
    } = params;
    config.check().map_err(SwarmError::Config)?;
    let keypair = super::keypair(&key)?;
    let local_peer = PeerId::from(keypair.public());
    let local_node = key.node_id();

    let heartbeat = config.heartbeat();
    let mut membership = match manifest {
        Some(manifest) => {
            let membership_config = membership::Config {
                heartbeat_ms: config.heartbeat_ms,
                jitter_ms: (config.heartbeat_ms / 10).min(1_000),
                min_publish_interval_ms: (config.heartbeat_ms / 2).min(1_000),
                ..membership::Config::default()
            };
            Some(
                Membership::new(membership_config, manifest, key.clone(), seed)
                    .map_err(|e| SwarmError::Domain(e.to_string()))?,
            )
        }
        None => None,
    };
    let topic = topic(
        membership
            .as_ref()
            .map_or("/gaia/no-domain", |m| m.manifest().topic.as_str()),
    );
    let mut startup_actions = Vec::new();
    // The domain's state saved by an earlier run: a newer manifest (which may be the one that
    // admits this node) and the revocations, each verified again.
    let state_dir = match (&state_dir, &membership) {
        (Some(dir), Some(m)) => Some(dir.join(m.domain().to_string())),
        _ => None,
    };
    if let (Some(dir), Some(m)) = (&state_dir, membership.as_mut()) {
        let saved = super::state::load(dir);
        let at = now();
        if let Some(manifest) = saved.manifest {
            let verdict = m.handle(
                at,
                Event::ManifestReceived {
                    from: None,
                    manifest,
                },
                &mut startup_actions,
            );
            if let Verdict::Reject(why) = verdict {
                tracing::warn!(%why, dir = %dir.display(), "ignoring the saved manifest");
            }
        }
        let count = saved.revocations.len();
        for revocation in saved.revocations {
            m.handle(
                at,
                Event::RevocationReceived {
                    from: None,
                    revocation,
                },
                &mut startup_actions,
            );
        }
        tracing::info!(
            version = m.manifest().version,
            revocations = count,
            "domain state loaded"
        );
    }
    let meter = match &membership {
        Some(m) => Some(Arc::new(super::meter::Meter::open(
            key.clone(),
            m.domain(),
            service.as_ref(),
            state_dir
                .as_ref()
                .map(|dir| dir.join("receipts"))
                .as_deref(),
        )?)),
        None => None,
    };
    let persist = state_dir.map(super::state::writer);
    if let (Some(m), Some(certificate)) = (membership.as_mut(), certificate.clone()) {
        let verdict = m.handle(
            now(),
            Event::CertificateReceived {
                from: None,
                certificate,
            },
            &mut startup_actions,
        );
        match verdict {
            Verdict::Accept => {}
            Verdict::Ignore(why) => {
                return Err(SwarmError::Domain(format!(
                    "this node's certificate is not usable: {why}"
                )));
            }
            Verdict::Reject(why) => {
                return Err(SwarmError::Domain(format!(
                    "this node's certificate is invalid: {why}"
                )));
            }
        }
    }

    let limits = Arc::new(config.limits.clone());
    let max_streams = limits.max_streams_per_connection;
    let yamux_config = move || {
        let mut yamux = yamux::Config::default();
        yamux.set_max_num_streams(max_streams);
        yamux
    };
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux_config,
        )
        .map_err(|e| SwarmError::Transport(e.to_string()))?
        .with_quic_config(|mut quic| {
            quic.max_concurrent_stream_limit = u32::try_from(max_streams).unwrap_or(u32::MAX);
            quic
        })
        .with_relay_client(noise::Config::new, yamux_config)
        .map_err(|e| SwarmError::Transport(e.to_string()))?
        .with_behaviour(|_, relay_client| {
            Behaviour::new(&keypair, &topic, &config, relay_client)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .map_err(|e| SwarmError::Behaviour(e.to_string()))?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(Duration::from_millis(limits.idle_connection_ms))
        })
        .build();
    let mut external = Vec::new();
    for text in &config.external_addrs {
        let addr: Multiaddr = text
            .parse()
            .map_err(|e| SwarmError::Config(format!("swarm.external_addrs: {text}: {e}")))?;
        swarm.add_external_address(addr.clone());
        external.push(addr);
    }
    if !external.is_empty()
        && let Some(relay) = swarm.behaviour_mut().relay.as_mut()
    {
        relay.set_status(Some(libp2p::relay::Status::Enable));
    }

    let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
    let (engine_tx, engine_rx) = mpsc::channel(limits.max_inbound_chats);
    let mut control = swarm.behaviour().stream.new_control();
    // Every version of the chat stream, each stream tagged with its version.
    let mut accept = |protocol: &'static str| {
        control
            .accept(StreamProtocol::new(protocol))
            .map_err(|e| SwarmError::Behaviour(format!("chat stream protocol {protocol}: {e}")))
    };
    let incoming = futures::stream::select(
        futures::stream::select(
            accept(protocols::STREAM)?.map(|(peer, stream)| (peer, stream, 3)),
            accept(protocols::STREAM_V2)?.map(|(peer, stream)| (peer, stream, 2)),
        ),
        accept(protocols::STREAM_V1)?.map(|(peer, stream)| (peer, stream, 1)),
    );
    let content_incoming = control
        .accept(StreamProtocol::new(protocols::CONTENT))
        .map_err(|e| SwarmError::Behaviour(format!("content protocol: {e}")))?;
    let (terms_tx, terms) =
        tokio::sync::watch::channel(membership.as_ref().map(|m| DomainTerms::of(m.manifest())));
    let handle = SwarmHandle {
        commands: commands_tx.clone(),
        control,
        node: local_node,
        peer_id: local_peer,
        limits: limits.clone(),
        local_engine: engine_tx.clone(),
        certificate: certificate.clone(),
        meter: meter.clone(),
        terms,
    };

    let bootstrap: Vec<Multiaddr> = membership
        .iter()
        .flat_map(|m| m.manifest().bootstrap.iter())
        .chain(config.bootstrap.iter())
        .filter_map(|text| match text.parse::<Multiaddr>() {
            Ok(addr) => Some(addr),
            Err(error) => {
                tracing::warn!(addr = %text, %error, "ignoring a bootstrap address that is not a multiaddr");
                None
            }
        })
        .filter(|addr| peer_of_addr(addr) != Some(local_peer))
        .collect();

    let mut actor = Actor {
        swarm,
        commands: commands_rx,
        membership,
        router: Router::new(
            router::Config {
                affinity_slack: if config.prefix_affinity {
                    router::Config::default().affinity_slack
                } else {
                    0.0
                },
                ..router::Config::default()
            },
            seed ^ 0x5eed,
        )
        .map_err(|e| SwarmError::Config(e.to_string()))?,
        topic,
        local_node,
        local_peer,
        heartbeat,
        bootstrap,
        peers: HashMap::new(),
        guard: Guard::new(GuardConfig {
            heartbeat_ms: u64::try_from(heartbeat.as_millis()).unwrap_or(u64::MAX),
            penalty: PENALTY,
            max_tracked: MAX_TRACKED,
            regossip_heartbeats: REGOSSIP_HEARTBEATS,
            ..GuardConfig::default()
        }),
        snapshot_requests: HashMap::new(),
        snapshot_asked: HashSet::new(),
        snapshot_done: false,
        pending_publish: None,
        listen_addrs: Vec::new(),
        local_certificate: certificate,
        service,
        load: None,
        domain_key: None,
        providing: false,
        leaving: None,
        persist,
        terms: terms_tx,
        state_asked: HashMap::new(),
        state_requests: HashMap::new(),
        ticks: 0,
        state_dirty: false,
        regossip_after: None,
        warned_versions: HashSet::new(),
        vouchers,
        voucher_source,
        voucher_requests: HashMap::new(),
        nat: nat::Nat::new(config.relay_client, !external.is_empty(), heartbeat),
    };
    actor.domain_key = actor
        .membership
        .as_ref()
        .map(|m| kad::RecordKey::new(&m.domain().0));
    for addr in &config.listen {
        let parsed: Multiaddr = addr.parse().map_err(|e| SwarmError::Listen {
            addr: addr.clone(),
            reason: format!("not a multiaddr: {e}"),
        })?;
        actor
            .swarm
            .listen_on(parsed)
            .map_err(|e| SwarmError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
    }
    if actor.membership.is_some() {
        actor
            .swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&actor.topic)
            .map_err(|e| {
                SwarmError::Behaviour(format!("cannot subscribe to the domain topic: {e}"))
            })?;
    }
    actor.run_membership_actions(startup_actions);
    actor.dial_bootstrap();

    // The acceptors hold only weak handles, so the actor stops when the last handle goes.
    let weak = handle.downgrade();
    let content_weak = weak.clone();
    drop(commands_tx);
    let semaphore = Arc::new(Semaphore::new(limits.max_inbound_chats));
    tokio::spawn(async move {
        let mut incoming = incoming;
        while let Some((peer, stream, version)) = incoming.next().await {
            let Some(handle) = weak.upgrade() else {
                break;
            };
            let permit = semaphore.clone().try_acquire_owned().ok();
            tokio::spawn(serve_stream(
                handle,
                engine_tx.clone(),
                peer,
                (stream, version),
                permit,
            ));
        }
    });

    // Content streams: each served by the seeder in a task of its own (or refused when this
    // node seeds nothing).
    tokio::spawn(async move {
        let mut incoming = content_incoming;
        while let Some((peer, stream)) = incoming.next().await {
            let Some(gate) = content_weak.upgrade() else {
                break;
            };
            let seeder = content.clone();
            tokio::spawn(async move {
                match seeder {
                    Some(seeder) => seeder.serve(&gate, peer, stream).await,
                    None => crate::content::seed::refuse_all(stream).await,
                }
            });
        }
    });

    let task = tokio::spawn(actor.run());
    Ok(Running {
        handle,
        inbound: engine_rx,
        task,
    })
}

struct Actor {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    membership: Option<Membership>,
    router: Router,
    topic: IdentTopic,
    local_node: NodeId,
    local_peer: PeerId,
    heartbeat: Duration,
    bootstrap: Vec<Multiaddr>,
    /// Node address to peer id, learnt from connections, gossip sources and advert addresses.
    peers: HashMap<NodeId, PeerId>,
    /// Budgets, certificates of gateways, authorisation, penalties and bans (sans-IO).
    guard: Guard,
    snapshot_requests: HashMap<OutboundRequestId, PeerId>,
    snapshot_asked: HashSet<PeerId>,
    snapshot_done: bool,
    /// An advert that found no subscribed peer yet; sent when one subscribes.
    pending_publish: Option<Vec<u8>>,
    listen_addrs: Vec<Multiaddr>,
    local_certificate: Option<Signed<MembershipCertificate>>,
    service: Option<LocalService>,
    load: Option<Load>,
    domain_key: Option<kad::RecordKey>,
    providing: bool,
    leaving: Option<(Instant, oneshot::Sender<()>)>,
    /// The domain's operator and pricing as the newest manifest states them.
    terms: tokio::sync::watch::Sender<Option<DomainTerms>>,
    /// The writer of the domain's saved state, when the node keeps it.
    persist: Option<tokio::sync::watch::Sender<Option<super::state::DomainState>>>,
    /// When each peer was last asked for the domain's state.
    state_asked: HashMap<PeerId, Instant>,
    state_requests: HashMap<OutboundRequestId, PeerId>,
    /// Maintenance ticks so far.
    ticks: u64,
    /// The domain's state changed since it was last handed to the writer.
    state_dirty: bool,
    /// Where the next round of re-gossiped revocations starts.
    regossip_after: Option<(NodeId, u64)>,
    /// Peers already told about a protocol version mismatch (one log line each).
    warned_versions: HashSet<PeerId>,
    /// Where accepted vouchers go (the node's payments).
    vouchers: Option<mpsc::Sender<gaia_protocol::payment::VoucherShare>>,
    /// The vouchers this node knows, and the escrow it asks peers about (an entry node).
    voucher_source: Option<Arc<dyn super::VoucherSource>>,
    /// Voucher pages asked for, by request.
    voucher_requests: HashMap<OutboundRequestId, PeerId>,
    /// Reachability: AutoNAT, relay slots, hole punching.
    nat: nat::Nat,
}

impl Actor {
    async fn run(mut self) {
        let mut maintenance = tokio::time::interval(self.heartbeat);
        maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Some((deadline, _)) = &self.leaving
                && Instant::now() >= *deadline
            {
                break;
            }
            let wake = self
                .membership
                .as_ref()
                .and_then(Membership::next_wakeup)
                .map(|at| Duration::from_millis(at.since(now())))
                .unwrap_or(Duration::from_secs(3600));
            let wake = match &self.leaving {
                Some((deadline, _)) => wake.min(deadline.saturating_duration_since(Instant::now())),
                None => wake,
            };
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                () = tokio::time::sleep(wake) => {
                    self.membership_event(Event::Tick);
                }
                _ = maintenance.tick() => self.maintain(),
            }
            self.flush_state();
        }
        self.flush_state();
        if let Some((_, reply)) = self.leaving.take() {
            let _ = reply.send(());
        }
        tracing::info!(node = %self.local_node, "swarm stopped");
    }

    // ---- membership -------------------------------------------------------------------

    fn membership_event(&mut self, event: Event) -> Verdict {
        let Some(m) = self.membership.as_mut() else {
            return Verdict::Accept;
        };
        let changes_state = matches!(event, Event::RevocationReceived { .. });
        let mut actions = Vec::new();
        let verdict = m.handle(now(), event, &mut actions);
        self.run_membership_actions(actions);
        if changes_state && verdict == Verdict::Accept {
            self.save_state();
        }
        verdict
    }

    /// Marks the domain's state as changed; [`flush_state`](Self::flush_state) hands it to the
    /// writer once per loop turn, so a page of 2 048 revocations costs one copy, not 2 048.
    fn save_state(&mut self) {
        self.state_dirty = true;
    }

    /// Hands the domain's current state to the writer task, if it changed.
    fn flush_state(&mut self) {
        if !std::mem::take(&mut self.state_dirty) {
            return;
        }
        if let Some(m) = &self.membership {
            let terms = DomainTerms::of(m.manifest());
            self.terms.send_if_modified(|held| {
                let changed = held.as_ref() != Some(&terms);
                *held = Some(terms);
                changed
            });
        }
        if let (Some(persist), Some(m)) = (&self.persist, &self.membership) {
            let state = super::state::DomainState {
                manifest: Some(m.signed_manifest().clone()),
                revocations: m.revocations().cloned().collect(),
            };
            persist.send_replace(Some(state));
        }
    }

    /// Asks `peer` for the domain's state (newest manifest, revocations), at most once per
    /// [`STATE_ASK_HEARTBEATS`] heartbeats.
    fn ask_domain_state(&mut self, peer: PeerId, after: Option<(NodeId, u64)>) {
        let Some(m) = &self.membership else {
            return;
        };
        if after.is_none() {
            let now_instant = Instant::now();
            if self.state_asked.get(&peer).is_some_and(|at| {
                now_instant.duration_since(*at) < self.heartbeat * STATE_ASK_HEARTBEATS
            }) {
                return;
            }
            if self.state_asked.len() >= MAX_TRACKED {
                let horizon = self.heartbeat * STATE_ASK_HEARTBEATS;
                self.state_asked
                    .retain(|_, at| now_instant.duration_since(*at) < horizon);
            }
            self.state_asked.insert(peer, now_instant);
        }
        let request = ControlRequest::DomainState {
            domain: m.domain(),
            after,
        };
        let id = self
            .swarm
            .behaviour_mut()
            .control
            .send_request(&peer, request);
        self.state_requests.insert(id, peer);
        if after.is_none() {
            self.ask_vouchers(peer, None);
        }
    }

    /// An entry node asks `peer` for the vouchers of its escrow it knows (what access keys
    /// spent through the domain's other entry nodes), page after page.
    fn ask_vouchers(&mut self, peer: PeerId, after: Option<gaia_protocol::control::VoucherKey>) {
        let Some(source) = &self.voucher_source else {
            return;
        };
        if self.voucher_requests.len() >= MAX_TRACKED {
            return;
        }
        let request = ControlRequest::Vouchers {
            escrow: source.escrow(),
            after,
        };
        let id = self
            .swarm
            .behaviour_mut()
            .control
            .send_request(&peer, request);
        self.voucher_requests.insert(id, peer);
    }

    /// A page of vouchers from `peer`: each must verify for the escrow (a forgery is held
    /// against the peer), then counts like vouchers shared on the topic.
    fn on_vouchers(&mut self, peer: PeerId, response: ControlResponse) {
        match response {
            ControlResponse::Vouchers {
                escrow,
                vouchers,
                next,
            } => {
                if self
                    .voucher_source
                    .as_ref()
                    .is_none_or(|s| s.escrow() != escrow)
                {
                    self.penalise(peer, "answered with the vouchers of another escrow");
                    return;
                }
                tracing::debug!(%peer, count = vouchers.len(), "voucher page");
                for chunk in vouchers.chunks(gaia_protocol::payment::MAX_VOUCHERS_PER_SHARE) {
                    let share = gaia_protocol::payment::VoucherShare {
                        escrow,
                        vouchers: chunk.to_vec(),
                    };
                    if let Err(error) = share.verify() {
                        self.penalise(
                            peer,
                            &format!("a forged voucher in a voucher page: {error}"),
                        );
                        return;
                    }
                    if let Some(to) = &self.vouchers
                        && to.try_send(share).is_err()
                    {
                        tracing::debug!(%peer, "voucher queue full: the rest of the page is dropped");
                        return;
                    }
                }
                if next.is_some() {
                    self.ask_vouchers(peer, next);
                }
            }
            ControlResponse::Error { code, message } => {
                tracing::debug!(%peer, ?code, %message, "vouchers refused");
            }
            _ => self.penalise(peer, "answered a voucher request with another response"),
        }
    }

    /// Re-publishes the manifest and the next batch of revocations (see
    /// [`REGOSSIP_HEARTBEATS`]).
    fn regossip(&mut self) {
        let Some(m) = &self.membership else {
            return;
        };
        let mut messages = vec![GossipMessage::Manifest(m.signed_manifest().clone())];
        let mut revocations: Vec<&Signed<gaia_protocol::domain::Revocation>> = m
            .revocations()
            .filter(|r| {
                self.regossip_after
                    .is_none_or(|after| (r.payload.member, r.payload.serial) > after)
            })
            .collect();
        revocations.sort_by_key(|r| (r.payload.member, r.payload.serial));
        revocations.truncate(REGOSSIP_REVOCATIONS);
        self.regossip_after = if revocations.len() < REGOSSIP_REVOCATIONS {
            None
        } else {
            revocations
                .last()
                .map(|r| (r.payload.member, r.payload.serial))
        };
        messages.extend(
            revocations
                .into_iter()
                .map(|r| GossipMessage::Revocation(r.clone())),
        );
        for message in messages {
            if let Ok(bytes) = message.encode() {
                self.publish(bytes, false);
            }
        }
    }

    /// Logs, once per peer, that it speaks another version of a protocol.
    fn version_mismatch(&mut self, peer: PeerId, detail: &str) {
        if self.warned_versions.len() < MAX_TRACKED && self.warned_versions.insert(peer) {
            tracing::warn!(
                %peer,
                "peer {peer} speaks another version of the Gaia protocol ({detail}); this node \
                 speaks {} and {}: upgrade one of them",
                protocols::CONTROL,
                protocols::STREAM
            );
        }
    }

    fn run_membership_actions(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Publish(entry) => match GossipMessage::Advert(entry).encode() {
                    Ok(bytes) => self.publish(bytes, true),
                    Err(error) => tracing::warn!(%error, "cannot encode this node's advert"),
                },
                Action::RequestSnapshot { peer, after } => {
                    if let (Some(peer), Some(m)) =
                        (self.peers.get(&peer).copied(), &self.membership)
                    {
                        let request = ControlRequest::MemberSnapshot {
                            domain: m.domain(),
                            after,
                        };
                        let id = self
                            .swarm
                            .behaviour_mut()
                            .control
                            .send_request(&peer, request);
                        self.snapshot_requests.insert(id, peer);
                    }
                }
                Action::MemberJoined { node, routable } => {
                    tracing::info!(%node, routable, "member joined");
                    self.learn_member_addrs(node);
                }
                Action::MemberUpdated { node, routable } => {
                    tracing::debug!(%node, routable, "member updated");
                    self.learn_member_addrs(node);
                }
                Action::MemberLeft { node, reason } => {
                    tracing::info!(%node, %reason, "member left");
                    self.router.forget(&node);
                    self.guard
                        .on_membership_action(&Action::MemberLeft { node, reason });
                }
                Action::Penalise { peer, reason } => {
                    tracing::info!(%peer, %reason, "penalising a peer for an invalid message");
                    self.guard.penalise(peer, reason.to_string(), now());
                    self.run_guard_actions();
                }
                Action::LocalStatusChanged(status) => {
                    tracing::info!(?status, "local standing in the domain changed");
                }
                Action::ManifestUpdated { version } => {
                    tracing::info!(version, "domain manifest updated");
                    // Pass it on (a copy that came by gossip is a duplicate there) and keep it.
                    if let Some(m) = &self.membership
                        && let Ok(bytes) =
                            GossipMessage::Manifest(m.signed_manifest().clone()).encode()
                    {
                        self.publish(bytes, false);
                    }
                    self.save_state();
                }
            }
        }
    }

    /// Records the peer ids and addresses a member advertises, and dials it when this node
    /// has few connections.
    fn learn_member_addrs(&mut self, node: NodeId) {
        let Some(member) = self.membership.as_ref().and_then(|m| m.member(&node)) else {
            return;
        };
        let addrs: Vec<Multiaddr> = member
            .advert()
            .addrs
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        let mut found = None;
        for addr in addrs {
            let Some(peer) = peer_of_addr(&addr) else {
                continue;
            };
            if node_id_of(&peer) != Some(node) {
                continue;
            }
            let mut plain = addr.clone();
            plain.pop();
            self.swarm.add_peer_address(peer, plain.clone());
            self.swarm.behaviour_mut().kad.add_address(&peer, plain);
            found = Some(peer);
        }
        if let Some(peer) = found {
            self.remember_peer(node, peer);
            if !self.swarm.is_connected(&peer)
                && self.swarm.connected_peers().count() < TARGET_PEERS
                && !self.is_banned(&peer)
            {
                let opts = DialOpts::peer_id(peer)
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                if let Err(error) = self.swarm.dial(opts) {
                    tracing::debug!(%peer, %error, "cannot dial a member");
                }
            }
        }
    }

    fn publish(&mut self, bytes: Vec<u8>, retry: bool) {
        let topic = self.topic.clone();
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(topic, bytes.clone())
        {
            Ok(_) => {
                if retry {
                    self.pending_publish = None;
                }
            }
            Err(PublishError::NoPeersSubscribedToTopic) if retry => {
                tracing::debug!("no peer on the domain topic yet: the advert waits for one");
                self.pending_publish = Some(bytes);
            }
            Err(PublishError::Duplicate) => {}
            Err(error) => tracing::debug!(%error, "gossip publication failed"),
        }
    }

    /// The service with this node's reachable addresses: confirmed external ones first, then
    /// relayed ones, then the other listen addresses (unspecified ones left out).
    fn service_with_addrs(&self) -> Option<LocalService> {
        let mut service = self.service.clone()?;
        if let Some(load) = &self.load {
            service.load = load.clone();
        }
        let mut addrs: Vec<Multiaddr> = Vec::new();
        let external = self
            .swarm
            .external_addresses()
            .filter(|a| !nat::is_relayed(a));
        let relayed = self
            .swarm
            .external_addresses()
            .chain(&self.listen_addrs)
            .filter(|a| nat::is_relayed(a));
        let direct = self.listen_addrs.iter().filter(|a| !nat::is_relayed(a));
        for addr in external.chain(relayed).chain(direct) {
            if addr.iter().any(|p| {
                matches!(p, Protocol::Ip4(ip) if ip.is_unspecified())
                    || matches!(p, Protocol::Ip6(ip) if ip.is_unspecified())
            }) {
                continue;
            }
            let full = match addr.iter().last() {
                Some(Protocol::P2p(peer)) if peer == self.local_peer => addr.clone(),
                Some(Protocol::P2p(_)) => continue,
                _ => addr.clone().with(Protocol::P2p(self.local_peer)),
            };
            if !addrs.contains(&full) {
                addrs.push(full);
            }
        }
        service.addrs = addrs
            .iter()
            .map(ToString::to_string)
            .filter(|text| text.len() <= MAX_MULTIADDR_LEN)
            .take(MAX_ADVERT_ADDRS)
            .collect();
        Some(service)
    }

    fn service_changed(&mut self) {
        if self.listen_addrs.is_empty() && self.service.is_some() {
            return; // Published once the first listen address is known.
        }
        let service = self.service_with_addrs();
        self.membership_event(Event::LocalAdvertChanged(service));
    }

    // ---- peers ------------------------------------------------------------------------

    fn is_banned(&self, peer: &PeerId) -> bool {
        node_id_of(peer).is_some_and(|node| self.guard.is_banned(&node, now()))
    }

    fn penalise(&mut self, peer: PeerId, reason: &str) {
        let Some(node) = node_id_of(&peer) else {
            // Without a node key it can do nothing here that a penalty would stop.
            let _ = self.swarm.disconnect_peer_id(peer);
            return;
        };
        self.remember_peer(node, peer);
        self.guard.penalise(node, reason, now());
        self.run_guard_actions();
    }

    /// Lets the guard forget ended bans and recovered scores, and gives gossipsub the
    /// recovered scores (a peer penalised long ago is not held back by gossip forever).
    fn forgive(&mut self) {
        let now = now();
        let before: Vec<NodeId> = self.guard.scores(now).map(|(node, _)| node).collect();
        self.guard.expire(now);
        let after: HashMap<NodeId, f64> = self.guard.scores(now).collect();
        for node in before {
            if let Some(peer) = self.peers.get(&node).copied() {
                let score = after.get(&node).copied().unwrap_or(0.0);
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .set_application_score(&peer, score);
            }
        }
    }

    /// Carries out the guard's decisions: gossip scores and disconnections of banned peers.
    fn run_guard_actions(&mut self) {
        for action in self.guard.take_actions() {
            match action {
                GuardAction::Penalised {
                    node,
                    score,
                    reason,
                } => {
                    tracing::info!(%node, score, reason, "peer penalised");
                    if let Some(peer) = self.peers.get(&node).copied() {
                        self.swarm
                            .behaviour_mut()
                            .gossipsub
                            .set_application_score(&peer, score);
                    }
                }
                GuardAction::Banned { node, until } => {
                    tracing::warn!(%node, %until, "banning a peer that keeps breaking the protocol");
                    if let Some(peer) = self.peers.get(&node).copied() {
                        let _ = self.swarm.disconnect_peer_id(peer);
                    }
                }
            }
        }
    }

    fn dial_bootstrap(&mut self) {
        for addr in self.bootstrap.clone() {
            if let Some(peer) = peer_of_addr(&addr) {
                let mut plain = addr.clone();
                plain.pop();
                self.swarm.behaviour_mut().kad.add_address(&peer, plain);
                if self.swarm.is_connected(&peer) {
                    continue;
                }
            }
            if let Err(error) = self.swarm.dial(addr.clone()) {
                tracing::debug!(%addr, %error, "cannot dial a bootstrap peer");
            }
        }
    }

    fn ask_snapshot(&mut self, peer: PeerId) {
        let Some(m) = &self.membership else {
            return;
        };
        if self.snapshot_done
            || self.snapshot_asked.len() >= SNAPSHOT_PEERS
            || !self.snapshot_asked.insert(peer)
        {
            return;
        }
        let request = ControlRequest::MemberSnapshot {
            domain: m.domain(),
            after: None,
        };
        let id = self
            .swarm
            .behaviour_mut()
            .control
            .send_request(&peer, request);
        self.snapshot_requests.insert(id, peer);
    }

    fn maintain(&mut self) {
        self.forgive();
        if self.membership.is_none() {
            return;
        }
        self.ticks += 1;
        self.maintain_relays();
        let regossip_every = REGOSSIP_HEARTBEATS.max(
            REGOSSIP_MIN
                .as_millis()
                .div_ceil(self.heartbeat.as_millis().max(1)) as u64,
        );
        if self.ticks.is_multiple_of(regossip_every) {
            self.regossip();
        }
        let connected = self.swarm.connected_peers().count();
        if connected == 0 {
            self.dial_bootstrap();
        }
        if connected > 0 {
            if !self.snapshot_done {
                // Peers that did not answer leave room for others.
                if self.snapshot_requests.is_empty() {
                    self.snapshot_asked.clear();
                }
                let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
                for peer in peers {
                    self.ask_snapshot(peer);
                }
            }
            if let Some(key) = self.domain_key.clone() {
                if !self.providing {
                    match self.swarm.behaviour_mut().kad.start_providing(key.clone()) {
                        Ok(_) => self.providing = true,
                        Err(error) => tracing::debug!(%error, "cannot provide the domain key"),
                    }
                }
                let members = self.membership.as_ref().map_or(0, Membership::len);
                if members == 0 || connected < 2 {
                    self.swarm.behaviour_mut().kad.get_providers(key);
                }
            }
        }
        // A node without an advert (a gateway) makes its certificate known on its own.
        if self.service.is_none()
            && let Some(certificate) = self.local_certificate.clone()
            && self
                .membership
                .as_ref()
                .is_some_and(|m| !matches!(m.manifest().admission, Admission::Open))
        {
            let message = GossipMessage::Certificate {
                certificate,
                sent_at: now().0,
            };
            if let Ok(bytes) = message.encode() {
                self.publish(bytes, false);
            }
        }
    }

    /// Whether `peer` may send chat requests: a valid member of the domain.
    fn authorize(&self, peer: &PeerId) -> Result<NodeId, String> {
        let node = node_id_of(peer)
            .ok_or_else(|| "the peer id does not carry a secp256k1 node key".to_string())?;
        self.guard
            .authorize(node, self.membership.as_ref(), now())
            .map(|()| node)
    }

    /// Records that `node` is `peer`, keeping the map bounded (members and connected peers
    /// first).
    fn remember_peer(&mut self, node: NodeId, peer: PeerId) {
        if self.peers.len() >= MAX_TRACKED && !self.peers.contains_key(&node) {
            let membership = &self.membership;
            let swarm = &self.swarm;
            self.peers.retain(|n, p| {
                swarm.is_connected(p) || membership.as_ref().is_some_and(|m| m.member(n).is_some())
            });
            if self.peers.len() >= MAX_TRACKED {
                return;
            }
        }
        self.peers.insert(node, peer);
    }

    /// Keeps a verified certificate of a node for [`authorize`](Self::authorize).
    fn remember_certificate(&mut self, certificate: &Signed<MembershipCertificate>) {
        if let Some(m) = &self.membership {
            self.guard.remember_certificate(m, certificate, now());
        }
    }

    // ---- commands ---------------------------------------------------------------------

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Members { reply } => {
                let mut members: Vec<MemberInfo> = self
                    .membership
                    .iter()
                    .flat_map(|m| m.members())
                    .map(|member| MemberInfo {
                        node: member.node(),
                        peer_id: self.peers.get(&member.node()).copied(),
                        advert: member.advert().clone(),
                        routable: member.is_routable(),
                        unroutable: member.unroutable().map(ToString::to_string),
                        last_heard_ms: member.last_heard().0,
                    })
                    .collect();
                // The table keeps no order; callers list members by address.
                members.sort_by_key(|m| m.node);
                let _ = reply.send(members);
            }
            Command::Pick {
                needs,
                exclude,
                reply,
            } => {
                let choice = match &self.membership {
                    Some(m) => self.router.choose_in(now(), &needs, m, &exclude),
                    None => Err(NoRoute {
                        model: needs.model.clone(),
                        ..NoRoute::default()
                    }),
                };
                let _ = reply.send(choice);
            }
            Command::Observe(observation) => {
                if let router::Observation::Succeeded { node } = &observation {
                    self.membership_event(Event::Served(*node));
                }
                self.router.observe(now(), observation);
            }
            Command::PeerOf { node, reply } => {
                let peer = if node == self.local_node {
                    Some(self.local_peer)
                } else {
                    self.peers.get(&node).copied()
                };
                let _ = reply.send(peer);
            }
            Command::Authorize {
                peer,
                certificate,
                reply,
            } => {
                // A certificate sent with the request counts only for its own member (the
                // peer's key), once verified against the manifest and the revocations.
                if let Some(certificate) = certificate
                    && node_id_of(&peer) == Some(certificate.payload.member)
                {
                    self.remember_certificate(&certificate);
                }
                let _ = reply.send(self.authorize(&peer));
            }
            Command::Penalise { peer, reason } => self.penalise(peer, &reason),
            Command::SetService(service) => {
                self.service = service;
                self.service_changed();
            }
            Command::SetLoad(load) => {
                self.load = Some(load);
                self.service_changed();
            }
            Command::PublishCertificate(certificate) => {
                self.remember_certificate(&certificate);
                self.membership_event(Event::CertificateReceived {
                    from: None,
                    certificate: certificate.clone(),
                });
                let message = GossipMessage::Certificate {
                    certificate,
                    sent_at: now().0,
                };
                if let Ok(bytes) = message.encode() {
                    self.publish(bytes, false);
                }
            }
            Command::PublishRaw { bytes, reply } => {
                let topic = self.topic.clone();
                let result = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(topic, bytes)
                    .map(|_| ())
                    .map_err(|e| format!("cannot publish on the domain topic: {e}"));
                let _ = reply.send(result);
            }
            Command::PublishVouchers(share) => match GossipMessage::Vouchers(share).encode() {
                Ok(bytes) => self.publish(bytes, false),
                Err(error) => tracing::warn!(%error, "cannot encode vouchers"),
            },
            Command::PublishRevocation(revocation) => {
                self.membership_event(Event::RevocationReceived {
                    from: None,
                    revocation: revocation.clone(),
                });
                if let Ok(bytes) = GossipMessage::Revocation(revocation).encode() {
                    self.publish(bytes, false);
                }
            }
            Command::PublishManifest(manifest) => {
                let verdict = self.membership_event(Event::ManifestReceived {
                    from: None,
                    manifest: manifest.clone(),
                });
                match verdict {
                    Verdict::Reject(why) => {
                        tracing::warn!(%why, "not publishing an invalid manifest");
                    }
                    _ => {
                        if let Ok(bytes) = GossipMessage::Manifest(manifest).encode() {
                            self.publish(bytes, false);
                        }
                    }
                }
            }
            Command::Dial(addr) => {
                if let Err(error) = self.swarm.dial(addr.clone()) {
                    tracing::warn!(%addr, %error, "cannot dial");
                }
            }
            Command::Status { reply } => {
                let status = SwarmStatus {
                    node: self.local_node,
                    peer_id: self.local_peer,
                    listen_addrs: self.listen_addrs.clone(),
                    connected: self.swarm.connected_peers().copied().collect(),
                    topic: self.membership.as_ref().map(|m| m.manifest().topic.clone()),
                    members: self.membership.as_ref().map_or(0, Membership::len),
                    local_status: self.membership.as_ref().map(|m| m.local_status().clone()),
                    penalised: self
                        .guard
                        .scores(now())
                        .filter_map(|(node, score)| {
                            self.peers.get(&node).map(|peer| (*peer, score))
                        })
                        .collect(),
                    topic_peers: self
                        .swarm
                        .behaviour()
                        .gossipsub
                        .all_peers()
                        .filter(|(_, topics)| topics.contains(&&self.topic.hash()))
                        .count(),
                    manifest_version: self.membership.as_ref().map(|m| m.manifest().version),
                    nat: nat::nat_words(&self.swarm.behaviour().autonat.nat_status()).to_string(),
                    nat_changes: self.nat.changes,
                    relay_slots: self.nat.slots.len(),
                    external_addrs: self.swarm.external_addresses().cloned().collect(),
                    relays: self.nat.relays_in_use(),
                    hole_punches: self.nat.punched,
                    hole_punch_failures: self.nat.punch_failed,
                };
                let _ = reply.send(status);
            }
            Command::Shutdown { reply } => {
                tracing::info!(node = %self.local_node, "leaving the domain");
                self.service = None;
                self.membership_event(Event::LocalAdvertChanged(None));
                self.leaving = Some((Instant::now() + LEAVE_FLUSH, reply));
            }
        }
    }

    // ---- swarm events -----------------------------------------------------------------

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, peer = %self.local_peer, "listening");
                if !self.listen_addrs.contains(&address) {
                    self.listen_addrs.push(address);
                }
                self.service_changed();
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| *a != address);
                self.service_changed();
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                if self.is_banned(&peer_id) {
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                self.on_connection_for_nat(
                    peer_id,
                    connection_id,
                    &endpoint,
                    num_established.get(),
                );
                if let Some(node) = node_id_of(&peer_id) {
                    self.remember_peer(node, peer_id);
                }
                // A second connection to a peer (a dial-back, a hole punch) brings no news.
                if self.membership.is_some() && num_established.get() == 1 {
                    self.ask_snapshot(peer_id);
                    self.ask_domain_state(peer_id, None);
                    if !self.providing
                        && let Some(key) = self.domain_key.clone()
                        && self.swarm.behaviour_mut().kad.start_providing(key).is_ok()
                    {
                        self.providing = true;
                    }
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                tracing::debug!(%peer_id, "disconnected");
                self.on_disconnected_for_nat(&peer_id);
            }
            SwarmEvent::ListenerClosed { listener_id, .. } => {
                self.on_listener_closed(listener_id);
            }
            SwarmEvent::ListenerError { listener_id, error } => {
                tracing::debug!(%error, "listener error");
                self.on_listener_closed(listener_id);
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!(%address, "external address confirmed");
                self.service_changed();
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                tracing::info!(%address, "external address expired");
                self.service_changed();
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(?peer_id, %error, "outgoing connection failed");
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Gossipsub(event) => self.on_gossip(event),
            BehaviourEvent::Control(event) => self.on_control(event),
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                self.on_identify_for_nat(peer_id, &info);
                let kad_protocol = StreamProtocol::new(protocols::KAD);
                if info.protocols.contains(&kad_protocol) {
                    for addr in info.listen_addrs.into_iter().take(MAX_ADVERT_ADDRS) {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result:
                    kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
                        providers,
                        ..
                    })),
                ..
            }) => {
                for peer in providers {
                    if peer == self.local_peer
                        || self.swarm.is_connected(&peer)
                        || self.is_banned(&peer)
                    {
                        continue;
                    }
                    tracing::debug!(%peer, "found a domain member in the DHT");
                    let opts = DialOpts::peer_id(peer)
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    if let Err(error) = self.swarm.dial(opts) {
                        tracing::debug!(%peer, %error, "cannot dial a DHT provider");
                    }
                }
            }
            BehaviourEvent::Autonat(event) => self.on_autonat(event),
            BehaviourEvent::RelayClient(event) => self.on_relay_client(event),
            BehaviourEvent::Relay(event) => self.on_relay_server(event),
            BehaviourEvent::Dcutr(event) => self.on_dcutr(event),
            BehaviourEvent::Mdns(event) => self.on_mdns(event),
            _ => {}
        }
    }

    fn on_gossip(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                let acceptance = self.validate_gossip(&propagation_source, message);
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
            }
            gossipsub::Event::Subscribed { peer_id, topic } => {
                if topic == self.topic.hash()
                    && let Some(bytes) = self.pending_publish.clone()
                {
                    tracing::debug!(%peer_id, "a peer joined the domain topic: sending the waiting advert");
                    self.publish(bytes, true);
                }
            }
            _ => {}
        }
    }

    fn validate_gossip(&mut self, via: &PeerId, message: gossipsub::Message) -> MessageAcceptance {
        if self.membership.is_none() || message.topic != self.topic.hash() {
            return MessageAcceptance::Ignore;
        }
        // Gossip messages are not signed by libp2p (the payloads carry their own signatures),
        // so `message.source` is only a claim: blame goes to the peer that delivered it.
        let Some(from) = node_id_of(via) else {
            return MessageAcceptance::Reject;
        };
        self.remember_peer(from, *via);
        let decoded = match GossipMessage::decode(&message.data) {
            Ok(decoded) => decoded,
            Err(error @ GossipDecodeError::UnknownKind(_)) => {
                self.version_mismatch(*via, &error.to_string());
                return MessageAcceptance::Ignore;
            }
            Err(error) => {
                tracing::info!(%via, %error, "malformed gossip message");
                self.penalise(*via, &format!("malformed gossip message: {error}"));
                return MessageAcceptance::Reject;
            }
        };
        let revocation = matches!(decoded, GossipMessage::Revocation(_));
        let Some(m) = self.membership.as_mut() else {
            return MessageAcceptance::Ignore;
        };
        let mut actions = Vec::new();
        let outcome = self.guard.gossip(m, from, decoded, now(), &mut actions);
        self.run_guard_actions();
        self.run_membership_actions(actions);
        if outcome.ask_domain_state {
            self.ask_domain_state(*via, None);
        }
        if revocation && outcome.verdict == Verdict::Accept {
            self.save_state();
        }
        if let (Some(share), Some(to)) = (outcome.vouchers, &self.vouchers)
            && to.try_send(share).is_err()
        {
            tracing::debug!("vouchers from the domain dropped: the node's payments are behind");
        }
        match outcome.verdict {
            Verdict::Accept => {
                // The claimed source is the author's peer id only if its key is the author's.
                if let (Some(author), Some(source)) = (outcome.author, message.source)
                    && node_id_of(&source) == Some(author)
                {
                    self.remember_peer(author, source);
                }
                MessageAcceptance::Accept
            }
            Verdict::Ignore(why) => {
                tracing::trace!(%why, "gossip message ignored");
                MessageAcceptance::Ignore
            }
            Verdict::Reject(why) => {
                tracing::info!(%via, %why, "gossip message rejected");
                MessageAcceptance::Reject
            }
        }
    }

    /// A page of a peer's domain state: its manifest and revocations go through the membership
    /// machine like gossip (forgeries are penalised), and the next page is asked for.
    fn on_domain_state(&mut self, peer: PeerId, response: ControlResponse) {
        let Some(from) = node_id_of(&peer) else {
            return;
        };
        match response {
            ControlResponse::DomainState {
                manifest,
                revocations,
                next,
            } => {
                if let Some(manifest) = manifest {
                    self.membership_event(Event::ManifestReceived {
                        from: Some(from),
                        manifest: *manifest,
                    });
                }
                for revocation in revocations {
                    self.membership_event(Event::RevocationReceived {
                        from: Some(from),
                        revocation,
                    });
                }
                if next.is_some() {
                    self.ask_domain_state(peer, next);
                }
            }
            ControlResponse::Error { code, message } => {
                tracing::debug!(%peer, ?code, %message, "domain state refused");
            }
            // The codec reads version-1 layouts as the newer responses.
            ControlResponse::Pong
            | ControlResponse::Members { .. }
            | ControlResponse::MembersV1 { .. }
            | ControlResponse::DomainStateV2 { .. }
            | ControlResponse::Vouchers { .. } => {
                self.penalise(
                    peer,
                    "answered a domain-state request with another response",
                );
            }
        }
    }

    fn on_control(&mut self, event: request_response::Event<ControlRequest, ControlResponse>) {
        match event {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let node = node_id_of(&peer);
                if let Some(node) = node {
                    self.remember_peer(node, peer);
                }
                let spend = node.map(|node| self.guard.control_request(node, now()));
                self.run_guard_actions();
                let may_read_members = match (&self.membership, node) {
                    (Some(m), Some(node)) => self.guard.may_read_members(&node, m),
                    _ => false,
                };
                let response = match request {
                    _ if spend.is_none() => ControlResponse::Error {
                        code: ErrorCode::Unauthorized,
                        message: "the peer id does not carry a secp256k1 node key".into(),
                    },
                    _ if spend != Some(Spend::Allowed) => ControlResponse::Error {
                        code: ErrorCode::Busy,
                        message: format!(
                            "over this peer's budget of {} control requests per second",
                            self.guard.config().rpc_per_sec
                        ),
                    },
                    ControlRequest::MemberSnapshot { .. } | ControlRequest::Vouchers { .. }
                        if !may_read_members =>
                    {
                        ControlResponse::Error {
                            code: ErrorCode::Unauthorized,
                            message: "member snapshots are for certified members of this domain: \
                                      publish an advert with your certificate first"
                                .into(),
                        }
                    }
                    ControlRequest::Ping => ControlResponse::Pong,
                    ControlRequest::Vouchers { escrow, after } => match &self.voucher_source {
                        Some(source) if source.escrow() == escrow => ControlResponse::voucher_page(
                            escrow,
                            source.vouchers_after(
                                after,
                                gaia_protocol::control::MAX_VOUCHERS_PER_PAGE + 1,
                            ),
                            after,
                        ),
                        _ => ControlResponse::Error {
                            code: ErrorCode::NotServed,
                            message: "this node takes no payments at that escrow".into(),
                        },
                    },
                    ControlRequest::DomainState { domain, after } => match &self.membership {
                        Some(m) if m.domain() == domain => match m.domain_state_page(after) {
                            Ok(page) => page,
                            Err(error) => ControlResponse::Error {
                                code: ErrorCode::Internal,
                                message: format!("cannot build the domain-state page: {error}"),
                            },
                        },
                        _ => ControlResponse::Error {
                            code: ErrorCode::NotServed,
                            message: "this node is not a member of that domain".into(),
                        },
                    },
                    ControlRequest::MemberSnapshot { domain, after } => match &self.membership {
                        Some(m) if m.domain() == domain => match m.member_page(after) {
                            Ok(page) => page,
                            Err(error) => ControlResponse::Error {
                                code: ErrorCode::Internal,
                                message: format!("cannot build the member page: {error}"),
                            },
                        },
                        _ => ControlResponse::Error {
                            code: ErrorCode::NotServed,
                            message: "this node is not a member of that domain".into(),
                        },
                    },
                };
                if self
                    .swarm
                    .behaviour_mut()
                    .control
                    .send_response(channel, response)
                    .is_err()
                {
                    tracing::debug!(%peer, "control response dropped: the requester left");
                }
            }
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if self.voucher_requests.remove(&request_id).is_some() {
                    self.on_vouchers(peer, response);
                    return;
                }
                if self.state_requests.remove(&request_id).is_some() {
                    self.on_domain_state(peer, response);
                    return;
                }
                if self.snapshot_requests.remove(&request_id).is_none() {
                    return;
                }
                match response {
                    ControlResponse::Members {
                        domain,
                        members,
                        next,
                    } => {
                        let Some(from) = node_id_of(&peer) else {
                            return;
                        };
                        tracing::debug!(%peer, count = members.len(), "member snapshot page");
                        if next.is_none() {
                            self.snapshot_done = true;
                        }
                        self.membership_event(Event::SnapshotReceived {
                            from,
                            domain,
                            members,
                            next,
                        });
                    }
                    ControlResponse::Error { code, message } => {
                        tracing::debug!(%peer, ?code, %message, "member snapshot refused");
                    }
                    ControlResponse::Pong
                    | ControlResponse::DomainState { .. }
                    | ControlResponse::MembersV1 { .. }
                    | ControlResponse::DomainStateV2 { .. }
                    | ControlResponse::Vouchers { .. } => {
                        self.penalise(peer, "answered a snapshot request with another response");
                    }
                }
            }
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                self.snapshot_requests.remove(&request_id);
                self.state_requests.remove(&request_id);
                self.voucher_requests.remove(&request_id);
                if matches!(
                    error,
                    request_response::OutboundFailure::UnsupportedProtocols
                ) || matches!(&error, request_response::OutboundFailure::Io(io)
                        if io.kind() == std::io::ErrorKind::Unsupported)
                {
                    self.version_mismatch(peer, &error.to_string());
                } else if let request_response::OutboundFailure::Io(io) = &error
                    && io.kind() == std::io::ErrorKind::InvalidData
                {
                    self.penalise(peer, &format!("malformed control response: {io}"));
                } else {
                    tracing::debug!(%peer, %error, "control request failed");
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                if let request_response::InboundFailure::Io(io) = &error
                    && io.kind() == std::io::ErrorKind::InvalidData
                {
                    self.penalise(peer, &format!("malformed control request: {io}"));
                } else {
                    tracing::debug!(%peer, %error, "inbound control request failed");
                }
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }
}
