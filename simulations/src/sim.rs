//! The discrete-event simulator.
//!
//! Every simulated node runs the protocol crate's own machines — [`Membership`], [`Guard`],
//! [`Router`] and, for each request it enters, a [`failover::Request`] — exactly as the node's
//! swarm actor drives them; the simulator stands in for libp2p:
//!
//! - **gossip** is a mesh like gossipsub's: each node keeps `mesh_degree` random peers (repaired
//!   every heartbeat), publishes to them, and forwards what its guard accepts to its other mesh
//!   peers; a per-node cache of message ids (gossipsub's duplicate cache, `seen_ttl_s`) drops
//!   copies. The messages are the real [`GossipMessage`]s, signed by real keys; their encoded
//!   size (plus framing) is what the links carry.
//! - **member snapshots** are the control RPC: a joining node asks a mesh peer, whose guard and
//!   membership answer page by page.
//! - **requests** are completion streams: the entry node's failover machine dispatches to the
//!   node its router chose; the serving node queues it behind its concurrency limit and answers
//!   with a first token and an end, at its speed; a crash breaks its streams.
//!
//! Time is virtual ([`Time`], microseconds). Events at the same time run in the order they were
//! scheduled, every random choice comes from a generator seeded by the scenario, and no
//! iteration order of a hash map reaches the outcome, so a seed always gives the same event
//! log, whose hash the report shows.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::{Rc, Weak};

use gaia_protocol::advert::{Capabilities, Load};
use gaia_protocol::control::ControlResponse;
use gaia_protocol::domain::{Admission, DomainManifest, MembershipCertificate, Requirements};
use gaia_protocol::gossip::GossipMessage;
use gaia_protocol::machine::failover::{self, AttemptError, Token};
use gaia_protocol::machine::guard::{Guard, GuardAction, GuardConfig};
use gaia_protocol::machine::membership::{
    self, Action as MAction, Event as MEvent, LocalService, Membership, Verdict,
};
use gaia_protocol::machine::rate::Spend;
use gaia_protocol::machine::router::{self, Needs, Observation, Router};
use gaia_protocol::machine::{Millis, SeededRng};
use gaia_protocol::stream::{ErrorCode, FinishReason, Usage};
use gaia_protocol::{ContentHash, NodeId, SecretKey, Signed, Wire};

use crate::net::{MS, Net, SEC, Time, mix, unit};
use crate::queue::Queue;
use crate::report::{Metrics, Report};
use crate::scenario::{AdmissionKind, ChurnKind, Scenario};

/// The wall-clock time the virtual clock starts at (unix milliseconds): certificates and
/// adverts carry real timestamps.
const EPOCH_MS: u64 = 1_767_225_600_000;
/// The most requests a node queues behind its running ones; more are refused `Busy`.
const MAX_QUEUE: usize = 64;
/// How long an entry node takes to see that a node it cannot reach is unreachable.
const CONNECT_TIMEOUT: Time = 3 * SEC;
/// Re-gossip of the manifest: as the node's actor, at most every 125 s.
const REGOSSIP_MIN: Time = 125 * SEC;
/// Bytes of a control request (a snapshot request).
const CONTROL_REQUEST_BYTES: u32 = 80;
/// Bytes of a stream request, of a token frame, of the end frame.
const STREAM_REQUEST_BYTES: u32 = 600;
const STREAM_FRAME_BYTES: u32 = 40;

/// What a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Follows the protocol and serves.
    Honest,
    /// A self-made identity that advertises a light load and never answers.
    Sybil,
    /// Serves, and replays adverts it saw minutes ago.
    Replayer,
    /// Serves, and re-publishes its certificate with new wrappings as fast as it can.
    CertificateFlooder,
    /// Advertises no load and a high speed while serving at a quarter of its speed.
    LoadLiar,
}

impl Role {
    /// Whether the node follows the gossip protocol, so every table should hold it (replayers
    /// and flooders get banned and cut off, as they should).
    pub fn follows_gossip(self) -> bool {
        !matches!(self, Role::Replayer | Role::CertificateFlooder)
    }
}

/// A gossip message in flight, shared by every copy.
#[derive(Debug)]
struct Msg {
    id: u64,
    bytes: u32,
    message: GossipMessage,
    /// When it was first published.
    created: Time,
    /// Where it is for each node: gossipsub's duplicate cache and the copies on their way,
    /// kept per message rather than per node (one word per node instead of a map entry per
    /// node and message), in one array so that forwarding to a peer reads one cache line.
    copies: RefCell<Copies>,
}

/// A message's state at each node (see [`Copies::slots`]).
#[derive(Debug)]
struct Copies {
    /// When the duplicate cache was last cleared: after the cache's time to live the nodes
    /// have forgotten the message (as gossipsub's cache does) and a copy counts as new again.
    since: Time,
    /// Indexed by node (allocated when the message is published and freed with it, a few
    /// seconds later): [`SEEN`] if the node has seen it since `since`; else the earliest
    /// arrival of a copy on its way, in µs after `created` plus one (0: none). A copy that
    /// would arrive after one already on its way is dropped on arrival in any case (the node
    /// has seen the message by then), so it is counted (bytes and duplicates) but never
    /// becomes an event: without this, a large cold start keeps about four copies of each
    /// advert in flight per node. (One difference: if the earliest copy is then refused,
    /// because its sender was banned meanwhile or its receiver went down, the later copies
    /// are not delivered either.)
    slots: Vec<u32>,
}

/// [`Copies::slots`] of a node that has seen the message.
const SEEN: u32 = u32::MAX;

impl Msg {
    /// Puts it in `node`'s duplicate cache; false if it was there.
    fn mark_seen(&self, node: u32, now: Time, ttl: Time) -> bool {
        let mut copies = self.copies.borrow_mut();
        if now >= copies.since + ttl {
            copies.since = now;
            for slot in &mut copies.slots {
                if *slot == SEEN {
                    *slot = 0;
                }
            }
        }
        match copies.slots.get_mut(node as usize) {
            Some(slot) => {
                let fresh = *slot != SEEN;
                *slot = SEEN;
                fresh
            }
            None => true,
        }
    }
}

/// A completion being served (or queued) at a node.
#[derive(Debug, Clone, Copy)]
struct Job {
    request: u32,
    attempt: u32,
    entry: u32,
}

/// One simulated node.
struct Node {
    id: NodeId,
    role: Role,
    up: bool,
    joined: bool,
    skew_ms: i64,
    speed: f64,
    membership: Option<Membership>,
    guard: Guard,
    router: Router,
    service: LocalService,
    /// Its gossip mesh: each peer with the link's base latency (drawn once per link).
    mesh: Vec<(u32, Time)>,
    tick_at: Option<Time>,
    snapshot_done: bool,
    /// Its own message that no peer could take yet.
    pending_publish: Option<Rc<Msg>>,
    certificate: Option<Signed<MembershipCertificate>>,
    running: Vec<(Job, Time)>,
    queue: VecDeque<Job>,
    /// Members of this node's table that are up (kept by the actions, see `count_*`).
    known_up: u32,
    /// Members of its table that are up and do not follow the gossip protocol.
    known_other: u32,
    /// Adverts this replayer saw, with when.
    replay_buffer: VecDeque<(Time, Rc<Msg>)>,
    bytes_sent: u64,
    completed: u64,
    last_regossip: Time,
}

/// A newcomer whose spread is measured: when it joined, and the nodes whose table should take
/// it (all of them, or in a domain larger than the tables, those whose table would keep it)
/// that do not hold it yet.
struct Probe {
    node: u32,
    joined: Time,
    done: Option<Time>,
    waiting: std::collections::BTreeSet<u32>,
}

impl Probe {
    /// `n` holds the newcomer, or went down: it is no longer waited for.
    fn reached(&mut self, n: u32, now: Time) {
        self.waiting.remove(&n);
        if self.done.is_none() && self.waiting.is_empty() {
            self.done = Some(now);
        }
    }
}

/// A request entered at a node.
struct Req {
    entry: u32,
    machine: failover::Request,
    started: Time,
    wake_at: Option<Time>,
    finished: bool,
    /// It was running on a node that crashed.
    hit_by_crash: bool,
}

#[derive(Debug)]
enum Ev {
    Join(u32),
    Maintain(u32),
    Tick(u32),
    Gossip {
        to: u32,
        from: u32,
        msg: Rc<Msg>,
    },
    SnapshotAsk {
        to: u32,
        from: u32,
        after: Option<NodeId>,
    },
    SnapshotPage {
        to: u32,
        from: u32,
        page: Box<ControlResponse>,
    },
    Churn(usize),
    ChurnOne(ChurnKind),
    Probe,
    PartitionStart(usize),
    PartitionHeal(usize),
    Arrival,
    /// A stream request reaches its node.
    StreamOpen {
        job: Job,
        at_node: u32,
    },
    /// The serving node finished the prompt (first token) or the completion.
    JobFirstToken {
        node: u32,
        job: Job,
    },
    JobDone {
        node: u32,
        job: Job,
    },
    /// A frame reaches the entry node.
    ToEntry {
        request: u32,
        event: Box<failover::Event>,
    },
    Cancel {
        node: u32,
        job: Job,
    },
    RequestWake(u32),
    FloodCertificate(u32),
    Sample,
    /// A node's own message that waited for a peer goes out now.
    FlushPublish(u32),
}

impl Ev {
    /// A code for the event log.
    fn code(&self) -> (u64, u64) {
        match self {
            Ev::Join(n) => (1, u64::from(*n)),
            Ev::Maintain(n) => (2, u64::from(*n)),
            Ev::Tick(n) => (3, u64::from(*n)),
            Ev::Gossip { to, from, msg } => {
                (4, mix(u64::from(*to) << 32 | u64::from(*from)) ^ msg.id)
            }
            Ev::SnapshotAsk { to, from, .. } => (5, u64::from(*to) << 32 | u64::from(*from)),
            Ev::SnapshotPage { to, from, .. } => (6, u64::from(*to) << 32 | u64::from(*from)),
            Ev::Churn(i) => (7, *i as u64),
            Ev::ChurnOne(k) => (8, *k as u64),
            Ev::Probe => (9, 0),
            Ev::PartitionStart(i) => (10, *i as u64),
            Ev::PartitionHeal(i) => (11, *i as u64),
            Ev::Arrival => (12, 0),
            Ev::StreamOpen { job, at_node } => {
                (13, u64::from(job.request) << 32 | u64::from(*at_node))
            }
            Ev::JobFirstToken { node, job } => {
                (14, u64::from(job.request) << 32 | u64::from(*node))
            }
            Ev::JobDone { node, job } => (15, u64::from(job.request) << 32 | u64::from(*node)),
            Ev::ToEntry { request, .. } => (16, u64::from(*request)),
            Ev::Cancel { node, job } => (17, u64::from(job.request) << 32 | u64::from(*node)),
            Ev::RequestWake(r) => (18, u64::from(*r)),
            Ev::FloodCertificate(n) => (19, u64::from(*n)),
            Ev::Sample => (20, 0),
            Ev::FlushPublish(n) => (21, u64::from(*n)),
        }
    }
}

/// A run in progress.
pub struct Sim {
    scenario: Scenario,
    now: Time,
    queue: Queue<Ev>,
    rng: SeededRng,
    net: Net,
    operator: SecretKey,
    manifest: Signed<DomainManifest>,
    model: ContentHash,
    nodes: Vec<Node>,
    /// Per node, when its gossip mesh is ready (apart from the nodes: read for every peer of
    /// every forwarded message, and a node's state is far larger than a cache line).
    mesh_ready_at: Vec<Time>,
    index: HashMap<NodeId, u32>,
    /// Nodes up, for random choices (swap-removed).
    up_list: Vec<u32>,
    up_pos: Vec<usize>,
    /// Messages recently published, by id, so the same bytes published again within the
    /// duplicate cache's lifetime are the same message (pruned at each sample).
    live: HashMap<u64, Weak<Msg>>,
    /// Nodes up that follow the gossip protocol (the ones every table should hold).
    followers_up: usize,
    requests: Vec<Req>,
    /// Newcomers whose spread is measured.
    probes: Vec<Probe>,
    log_hash: u64,
    events: u64,
    /// Metrics collected along the run.
    pub metrics: Metrics,
    progress: Option<indicatif::ProgressBar>,
    /// Progress as a line every ten virtual seconds (stderr is not a terminal: a log).
    plain_progress: bool,
}

impl Sim {
    /// Sets up the run: keys, certificates, the initial nodes' join times, the script.
    pub fn new(scenario: Scenario, progress: bool) -> anyhow::Result<Self> {
        scenario.check()?;
        let mut rng = SeededRng::new(mix(scenario.seed));
        let operator = key_from(&mut rng);
        let model = ContentHash::of(b"simulated model");
        let admission = match scenario.admission {
            AdmissionKind::Open => Admission::Open,
            AdmissionKind::Certificates => Admission::DenyList(Vec::new()),
        };
        let manifest = DomainManifest {
            name: "simulated".into(),
            topic: "/gaia/domain/simulated/adverts".into(),
            operator: operator.node_id(),
            requirements: Requirements {
                accepted_model_hashes: vec![model],
                kb_hash: None,
                prompt_hash: None,
            },
            bootstrap: vec!["/ip4/10.0.0.1/tcp/4001".into()],
            admission,
            created_at: EPOCH_MS / 1000 - 3600,
            version: 1,
            pricing: None,
        };
        let manifest = Signed::sign(manifest, &operator)?;
        let net = Net::new(scenario.network.clone(), scenario.seed);
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let plain_progress = progress && !terminal;
        let progress = (progress && terminal).then(|| {
            let bar = indicatif::ProgressBar::new(scenario.duration_s.ceil() as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} virtual {pos}/{len} s [{bar:30}] {elapsed_precise} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        let mut sim = Sim {
            metrics: Metrics::new(&scenario),
            scenario,
            now: 0,
            queue: Queue::new(MS),
            rng,
            net,
            operator,
            manifest,
            model,
            nodes: Vec::new(),
            mesh_ready_at: Vec::new(),
            index: HashMap::new(),
            live: HashMap::new(),
            up_list: Vec::new(),
            up_pos: Vec::new(),
            followers_up: 0,
            requests: Vec::new(),
            probes: Vec::new(),
            log_hash: 0,
            events: 0,
            progress,
            plain_progress,
        };
        sim.populate()?;
        Ok(sim)
    }

    fn populate(&mut self) -> anyhow::Result<()> {
        let n = self.scenario.nodes;
        let adv = self.scenario.adversaries.clone();
        let sybils = (f64::from(n) * adv.sybils).round() as u32;
        let liars = (f64::from(n) * adv.load_liars).round() as u32;
        let mut roles = Vec::with_capacity(n as usize);
        for i in 0..n {
            // Adversaries take the last indices, so the first nodes (the bootstrap ones in
            // practice) are honest.
            let from_end = n - 1 - i;
            let role = if from_end < sybils {
                Role::Sybil
            } else if from_end < sybils + liars {
                Role::LoadLiar
            } else if from_end < sybils + liars + adv.replayers {
                Role::Replayer
            } else if from_end < sybils + liars + adv.replayers + adv.certificate_flooders {
                Role::CertificateFlooder
            } else {
                Role::Honest
            };
            roles.push(role);
        }
        let spread = (self.scenario.start.spread_s * SEC as f64) as Time;
        for role in roles {
            let node = self.add_node(role)?;
            let at = if spread == 0 {
                0
            } else {
                self.rng.below(spread)
            };
            self.schedule(at, Ev::Join(node));
        }
        for (i, churn) in self.scenario.churn.clone().iter().enumerate() {
            self.schedule((churn.at_s * SEC as f64) as Time, Ev::Churn(i));
        }
        for (i, partition) in self.scenario.partitions.clone().iter().enumerate() {
            self.schedule((partition.at_s * SEC as f64) as Time, Ev::PartitionStart(i));
            self.schedule(
                (partition.heal_s * SEC as f64) as Time,
                Ev::PartitionHeal(i),
            );
        }
        for at in self.scenario.probes.clone() {
            self.schedule((at * SEC as f64) as Time, Ev::Probe);
        }
        if self.scenario.workload.rate_per_s > 0.0 {
            let start = (self.scenario.workload.start_s * SEC as f64) as Time;
            self.schedule(start, Ev::Arrival);
        }
        self.schedule(0, Ev::Sample);
        Ok(())
    }

    fn add_node(&mut self, role: Role) -> anyhow::Result<u32> {
        let index = u32::try_from(self.nodes.len())?;
        let key = key_from(&mut self.rng);
        let id = key.node_id();
        self.net.add_node();
        let skew_max = self.scenario.network.clock_skew_ms;
        let skew_ms = if skew_max > 0.0 {
            ((unit(self.rng.next_u64()) * 2.0 - 1.0) * skew_max) as i64
        } else {
            0
        };
        let speeds = &self.scenario.workload.speeds;
        let total: f64 = speeds.iter().map(|s| s.share).sum();
        let mut draw = unit(self.rng.next_u64()) * total.max(f64::MIN_POSITIVE);
        let mut speed = speeds[0].tokens_per_s;
        for class in speeds {
            if draw < class.share {
                speed = class.tokens_per_s;
                break;
            }
            draw -= class.share;
        }
        let certificate = match self.scenario.admission {
            AdmissionKind::Open => None,
            AdmissionKind::Certificates => Some(Signed::sign(
                MembershipCertificate {
                    domain: self.manifest.payload.id(),
                    member: id,
                    issued_at: EPOCH_MS / 1000 - 3600,
                    expires_at: EPOCH_MS / 1000 + 30 * 86_400,
                    serial: u64::from(index) + 1,
                },
                &self.operator,
            )?),
        };
        let heartbeat_ms = self.scenario.membership.heartbeat_ms;
        let config = membership::Config {
            heartbeat_ms,
            jitter_ms: (heartbeat_ms / 10).max(1),
            max_members: self.scenario.membership.max_members,
            max_clock_skew_secs: self.scenario.membership.max_clock_skew_s,
            max_adverts_per_s: self.scenario.membership.max_adverts_per_s,
            ..membership::Config::default()
        };
        let seed = mix(self.scenario.seed ^ mix(u64::from(index)));
        let membership = Membership::new(config, self.manifest.clone(), key, seed)?;
        let advertised = match role {
            Role::Sybil | Role::LoadLiar => 1_000.0,
            _ => speed,
        };
        let service = LocalService {
            model_name: "simulated-model".into(),
            model_hash: self.model,
            kb_hash: None,
            prompt_hash: None,
            capabilities: Capabilities {
                tools: true,
                structured_output: true,
                context_length: 8192,
                max_tokens: 2048,
            },
            load: Load {
                in_flight: 0,
                queued: 0,
                tokens_per_s: advertised as f32,
            },
            price: gaia_protocol::payment::Price::default(),
            addrs: vec![format!(
                "/ip4/10.{}.{}.{}/tcp/4001",
                index >> 16,
                (index >> 8) & 255,
                index & 255
            )],
        };
        let node = Node {
            id,
            role,
            up: false,
            joined: false,
            skew_ms,
            speed: if role == Role::LoadLiar {
                speed / 4.0
            } else {
                speed
            },
            membership: Some(membership),
            guard: Guard::new(GuardConfig {
                heartbeat_ms,
                ..GuardConfig::default()
            }),
            router: Router::new(router::Config::default(), seed ^ 0x5eed)
                .map_err(|e| anyhow::anyhow!("router: {e}"))?,
            service,
            mesh: Vec::new(),
            tick_at: None,
            snapshot_done: false,
            pending_publish: None,
            certificate,
            running: Vec::new(),
            queue: VecDeque::new(),
            known_up: 0,
            known_other: 0,
            replay_buffer: VecDeque::new(),
            bytes_sent: 0,
            completed: 0,
            last_regossip: 0,
        };
        self.index.insert(id, index);
        self.nodes.push(node);
        self.mesh_ready_at.push(0);
        self.up_pos.push(usize::MAX);
        Ok(index)
    }

    fn schedule(&mut self, at: Time, ev: Ev) {
        self.queue.push(at, ev);
    }

    /// `node`'s clock at the current virtual time.
    fn local(&self, node: u32) -> Millis {
        let ms = EPOCH_MS as i64 + (self.now / MS) as i64 + self.nodes[node as usize].skew_ms;
        Millis(ms.max(0) as u64)
    }

    /// The virtual time at which `node`'s clock reads `at`.
    fn virtual_of(&self, node: u32, at: Millis) -> Time {
        let ms = at.0 as i64 - EPOCH_MS as i64 - self.nodes[node as usize].skew_ms;
        (ms.max(0) as u64).saturating_mul(MS)
    }

    /// Runs to the end and reports.
    pub fn run(mut self) -> Report {
        let started = std::time::Instant::now();
        let end = (self.scenario.duration_s * SEC as f64) as Time;
        let mut next_progress = SEC;
        while let Some((at, ev)) = self.queue.pop() {
            if at > end {
                break;
            }
            self.now = at;
            let (code, detail) = ev.code();
            self.log_hash = mix(self.log_hash ^ mix(at ^ code.rotate_left(56) ^ detail));
            self.events += 1;
            self.handle(ev);
            if self.now >= next_progress {
                next_progress = self.now + SEC;
                if let Some(bar) = &self.progress {
                    bar.set_position(self.now / SEC);
                    bar.set_message(format!("{} events", self.events));
                }
                if self.plain_progress && (self.now / SEC).is_multiple_of(10) {
                    eprintln!(
                        "virtual {}/{} s, {} events, {:.0} s wall",
                        self.now / SEC,
                        end / SEC,
                        self.events,
                        started.elapsed().as_secs_f64()
                    );
                }
            }
        }
        if let Some(bar) = &self.progress {
            bar.finish_and_clear();
        }
        self.now = end;
        self.finish(started.elapsed())
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Join(n) => self.join(n),
            Ev::Maintain(n) => self.maintain(n),
            Ev::Tick(n) => {
                if self.nodes[n as usize].tick_at == Some(self.now) {
                    self.nodes[n as usize].tick_at = None;
                    self.membership_event(n, MEvent::Tick);
                }
            }
            Ev::Gossip { to, from, msg } => self.deliver_gossip(to, from, &msg),
            Ev::SnapshotAsk { to, from, after } => self.answer_snapshot(to, from, after),
            Ev::SnapshotPage { to, from, page } => self.take_snapshot(to, from, *page),
            Ev::Churn(i) => self.churn(i),
            Ev::ChurnOne(kind) => self.churn_one(kind),
            Ev::Probe => {
                if let Ok(node) = self.add_node(Role::Honest) {
                    let id = self.nodes[node as usize].id;
                    let waiting = self
                        .up_list
                        .iter()
                        .copied()
                        .filter(|&n| {
                            let other = &self.nodes[n as usize];
                            other.role.follows_gossip()
                                && other.membership.as_ref().is_some_and(|m| m.would_keep(&id))
                        })
                        .collect();
                    self.probes.push(Probe {
                        node,
                        joined: self.now,
                        done: None,
                        waiting,
                    });
                    self.join(node);
                }
            }
            Ev::PartitionStart(i) => {
                let share = self.scenario.partitions[i].share;
                self.net.partition(share);
            }
            Ev::PartitionHeal(_) => {
                self.net.heal();
                self.metrics.phase_started("heal", self.now);
            }
            Ev::Arrival => self.arrival(),
            Ev::StreamOpen { job, at_node } => self.stream_open(at_node, job),
            Ev::JobFirstToken { node, job } => self.job_first_token(node, job),
            Ev::JobDone { node, job } => self.job_done(node, job),
            Ev::ToEntry { request, event } => self.request_event(request, *event),
            Ev::Cancel { node, job } => self.cancel_job(node, job),
            Ev::RequestWake(r) => {
                if self.requests[r as usize].wake_at == Some(self.now) {
                    self.requests[r as usize].wake_at = None;
                    self.request_event(r, failover::Event::Tick);
                }
            }
            Ev::FloodCertificate(n) => self.flood_certificate(n),
            Ev::Sample => self.sample(),
            Ev::FlushPublish(n) => self.flush_publish(n),
        }
    }

    // ---- nodes coming and going ----------------------------------------------------------

    fn join(&mut self, n: u32) {
        let node = &mut self.nodes[n as usize];
        if node.joined {
            return;
        }
        node.joined = true;
        node.up = true;
        self.mesh_ready_at[n as usize] =
            self.now + (self.scenario.network.mesh_delay_ms * MS as f64) as Time;
        self.up_pos[n as usize] = self.up_list.len();
        self.up_list.push(n);
        if self.nodes[n as usize].role.follows_gossip() {
            self.followers_up += 1;
        }
        self.repair_mesh(n);
        let certificate = self.nodes[n as usize].certificate.clone();
        let service = self.nodes[n as usize].service.clone();
        if let Some(certificate) = certificate {
            self.membership_event(
                n,
                MEvent::CertificateReceived {
                    from: None,
                    certificate,
                },
            );
        }
        self.membership_event(n, MEvent::LocalAdvertChanged(Some(service)));
        self.ask_snapshot(n);
        let heartbeat = self.heartbeat();
        let phase = self.rng.below(heartbeat);
        self.schedule(self.now + phase + 1, Ev::Maintain(n));
        if self.nodes[n as usize].role == Role::CertificateFlooder {
            self.schedule(self.now + 100 * MS, Ev::FloodCertificate(n));
        }
    }

    fn heartbeat(&self) -> Time {
        self.scenario.membership.heartbeat_ms * MS
    }

    /// Takes `n` down: crashed (`leave` false) or after a last advert (`leave` true).
    fn take_down(&mut self, n: u32, leave: bool) {
        if !self.nodes[n as usize].up {
            return;
        }
        if leave {
            self.membership_event(n, MEvent::LocalAdvertChanged(None));
        }
        let node = &mut self.nodes[n as usize];
        node.up = false;
        if node.role.follows_gossip() {
            self.followers_up -= 1;
        }
        let pos = self.up_pos[n as usize];
        self.up_list.swap_remove(pos);
        if let Some(moved) = self.up_list.get(pos).copied() {
            self.up_pos[moved as usize] = pos;
        }
        self.up_pos[n as usize] = usize::MAX;
        let now = self.now;
        for probe in &mut self.probes {
            probe.reached(n, now);
        }
        // Whoever holds it no longer holds an up member.
        let id = self.nodes[n as usize].id;
        let mut holders = 0;
        for other in 0..self.nodes.len() {
            let holds = self.nodes[other]
                .membership
                .as_ref()
                .is_some_and(|m| m.member(&id).is_some());
            if holds && self.nodes[other].up {
                let follows = self.nodes[n as usize].role.follows_gossip();
                let node = &mut self.nodes[other];
                if follows {
                    node.known_up = node.known_up.saturating_sub(1);
                } else {
                    node.known_other = node.known_other.saturating_sub(1);
                }
                holders += 1;
            }
        }
        // What it held of nodes already down no longer counts as held.
        let held_down = self.nodes[n as usize].membership.as_ref().map_or(0, |m| {
            m.members()
                .filter(|member| {
                    self.index
                        .get(&member.node())
                        .is_some_and(|i| !self.nodes[*i as usize].up)
                })
                .count() as u64
        });
        self.metrics.went_down(holders, held_down, self.now);
        // Its streams break: the entry nodes see the connection close.
        let node = &mut self.nodes[n as usize];
        let jobs: Vec<Job> = node
            .running
            .drain(..)
            .map(|(job, _)| job)
            .chain(node.queue.drain(..))
            .collect();
        node.mesh.clear();
        node.membership = None;
        for job in jobs {
            self.requests[job.request as usize].hit_by_crash = !leave;
            if job.entry == n {
                continue;
            }
            let event = failover::Event::AttemptFailed {
                attempt: job.attempt,
                error: AttemptError::Broken("the connection closed".into()),
            };
            if let Some(at) = self.net.rpc(self.now, n, job.entry, STREAM_FRAME_BYTES) {
                self.schedule(
                    at,
                    Ev::ToEntry {
                        request: job.request,
                        event: Box::new(event),
                    },
                );
            }
        }
        for r in 0..self.requests.len() {
            // Requests it entered die with it.
            if self.requests[r].entry == n && !self.requests[r].finished {
                self.requests[r].finished = true;
                self.metrics.request_lost_with_entry();
            }
        }
    }

    fn churn(&mut self, i: usize) {
        let churn = self.scenario.churn[i].clone();
        let count = if churn.count > 0 {
            churn.count
        } else {
            let honest_up = self
                .up_list
                .iter()
                .filter(|n| self.nodes[**n as usize].role == Role::Honest)
                .count();
            (honest_up as f64 * churn.share).round() as u32
        };
        let over = (churn.over_s * SEC as f64) as Time;
        for _ in 0..count {
            let at = if over == 0 {
                self.now
            } else {
                self.now + self.rng.below(over)
            };
            self.schedule(at, Ev::ChurnOne(churn.kind));
        }
    }

    fn churn_one(&mut self, kind: ChurnKind) {
        match kind {
            ChurnKind::Join => {
                if let Ok(n) = self.add_node(Role::Honest) {
                    self.join(n);
                }
            }
            ChurnKind::Leave | ChurnKind::Crash => {
                // A random honest node that is up, never the only one.
                let honest: Vec<u32> = self
                    .up_list
                    .iter()
                    .copied()
                    .filter(|n| self.nodes[*n as usize].role == Role::Honest)
                    .collect();
                if honest.len() > 1 {
                    let mut sorted = honest;
                    sorted.sort_unstable();
                    let n = sorted[self.rng.index(sorted.len())];
                    self.take_down(n, kind == ChurnKind::Leave);
                    if kind == ChurnKind::Crash {
                        self.metrics.crashed(n, self.now);
                    }
                }
            }
        }
    }

    /// Keeps `n`'s mesh at `mesh_degree` up peers (gossipsub's heartbeat grafts).
    fn repair_mesh(&mut self, n: u32) {
        let degree = self.scenario.network.mesh_degree;
        let high = degree * 2;
        let mut mesh = std::mem::take(&mut self.nodes[n as usize].mesh);
        let now_local = self.local(n);
        mesh.retain(|(p, _)| self.nodes[*p as usize].up);
        let mut tries = 0;
        let mut flush = Vec::new();
        while mesh.len() < degree && tries < degree * 4 && self.up_list.len() > 1 {
            tries += 1;
            let p = self.up_list[self.rng.index(self.up_list.len())];
            if p == n
                || mesh.iter().any(|(q, _)| *q == p)
                || self.nodes[p as usize].mesh.len() >= high
            {
                continue;
            }
            let banned = self.nodes[n as usize]
                .guard
                .is_banned(&self.nodes[p as usize].id, now_local)
                || {
                    let their = self.local(p);
                    self.nodes[p as usize]
                        .guard
                        .is_banned(&self.nodes[n as usize].id, their)
                };
            if banned {
                continue;
            }
            let latency = self.net.base_latency(n, p);
            mesh.push((p, latency));
            self.nodes[p as usize].mesh.push((n, latency));
            if self.nodes[p as usize].pending_publish.is_some() {
                flush.push(p);
            }
        }
        let has_peers = !mesh.is_empty();
        self.nodes[n as usize].mesh = mesh;
        if has_peers && self.nodes[n as usize].pending_publish.is_some() {
            flush.push(n);
        }
        for node in flush {
            self.flush_publish(node);
        }
    }

    /// Publishes `n`'s message that waited for a peer, if it has one now.
    fn flush_publish(&mut self, n: u32) {
        if !self.nodes[n as usize].up {
            return;
        }
        if let Some(msg) = self.nodes[n as usize].pending_publish.take() {
            self.forward(n, None, &msg);
        }
    }

    fn drop_edge(&mut self, a: u32, b: u32) {
        self.nodes[a as usize].mesh.retain(|(p, _)| *p != b);
        self.nodes[b as usize].mesh.retain(|(p, _)| *p != a);
    }

    fn maintain(&mut self, n: u32) {
        if !self.nodes[n as usize].up {
            return;
        }
        let heartbeat = self.heartbeat();
        self.schedule(self.now + heartbeat, Ev::Maintain(n));
        let now_local = self.local(n);
        self.nodes[n as usize].guard.expire(now_local);
        self.repair_mesh(n);
        if !self.nodes[n as usize].snapshot_done {
            self.ask_snapshot(n);
        }
        let regossip = REGOSSIP_MIN.max(5 * heartbeat);
        if self.now >= self.nodes[n as usize].last_regossip + regossip {
            self.nodes[n as usize].last_regossip = self.now;
            let manifest = GossipMessage::Manifest(self.manifest.clone());
            self.publish(n, manifest);
        }
        if self.nodes[n as usize].role == Role::Replayer {
            self.replay(n);
        }
    }

    fn ask_snapshot(&mut self, n: u32) {
        let mesh = &self.nodes[n as usize].mesh;
        if mesh.is_empty() {
            return;
        }
        let (peer, _) = mesh[self.rng.index(mesh.len())];
        self.send_snapshot_ask(n, peer, None);
    }

    fn send_snapshot_ask(&mut self, n: u32, peer: u32, after: Option<NodeId>) {
        self.nodes[n as usize].bytes_sent += u64::from(CONTROL_REQUEST_BYTES);
        if let Some(at) = self.net.rpc(self.now, n, peer, CONTROL_REQUEST_BYTES) {
            self.schedule(
                at,
                Ev::SnapshotAsk {
                    to: peer,
                    from: n,
                    after,
                },
            );
        }
    }

    fn answer_snapshot(&mut self, to: u32, from: u32, after: Option<NodeId>) {
        if !self.nodes[to as usize].up {
            return;
        }
        let now_local = self.local(to);
        let asker = self.nodes[from as usize].id;
        let node = &mut self.nodes[to as usize];
        let Some(m) = node.membership.as_ref() else {
            return;
        };
        let spend = node.guard.control_request(asker, now_local);
        let page = if spend != Spend::Allowed {
            ControlResponse::Error {
                code: ErrorCode::Busy,
                message: "over budget".into(),
            }
        } else if !node.guard.may_read_members(&asker, m) {
            ControlResponse::Error {
                code: ErrorCode::Unauthorized,
                message: "not a certified member".into(),
            }
        } else {
            match m.member_page(after) {
                Ok(page) => page,
                Err(_) => return,
            }
        };
        self.run_guard_actions(to);
        let bytes = page.to_bytes().map_or(1024, |b| b.len()) as u32;
        self.nodes[to as usize].bytes_sent += u64::from(bytes);
        if let Some(at) = self.net.rpc(self.now, to, from, bytes) {
            self.schedule(
                at,
                Ev::SnapshotPage {
                    to: from,
                    from: to,
                    page: Box::new(page),
                },
            );
        }
    }

    fn take_snapshot(&mut self, to: u32, from: u32, page: ControlResponse) {
        if !self.nodes[to as usize].up {
            return;
        }
        match page {
            ControlResponse::Members {
                domain,
                members,
                next,
            } => {
                if next.is_none() {
                    self.nodes[to as usize].snapshot_done = true;
                }
                let from_id = self.nodes[from as usize].id;
                self.membership_event(
                    to,
                    MEvent::SnapshotReceived {
                        from: from_id,
                        domain,
                        members,
                        next,
                    },
                );
            }
            _ => {
                // Refused: asked again at the next maintenance.
            }
        }
    }

    // ---- the membership machine ----------------------------------------------------------

    fn membership_event(&mut self, n: u32, event: MEvent) -> Verdict {
        let now_local = self.local(n);
        let node = &mut self.nodes[n as usize];
        let Some(m) = node.membership.as_mut() else {
            return Verdict::Ignore(membership::Ignored::Own);
        };
        let mut actions = Vec::new();
        let verdict = m.handle(now_local, event, &mut actions);
        self.run_membership_actions(n, actions);
        self.reschedule_tick(n);
        verdict
    }

    fn reschedule_tick(&mut self, n: u32) {
        let Some(wake) = self.nodes[n as usize]
            .membership
            .as_ref()
            .and_then(Membership::next_wakeup)
        else {
            return;
        };
        let at = self.virtual_of(n, wake).max(self.now);
        let node = &mut self.nodes[n as usize];
        if node.tick_at.is_none_or(|t| at < t) {
            node.tick_at = Some(at);
            self.schedule(at, Ev::Tick(n));
        }
    }

    fn run_membership_actions(&mut self, n: u32, actions: Vec<MAction>) {
        for action in actions {
            self.nodes[n as usize].guard.on_membership_action(&action);
            match action {
                MAction::Publish(entry) => self.publish(n, GossipMessage::Advert(entry)),
                MAction::RequestSnapshot { peer, after } => {
                    if let Some(&p) = self.index.get(&peer) {
                        self.send_snapshot_ask(n, p, after);
                    }
                }
                MAction::MemberJoined { node, routable } => self.count_join(n, node, routable),
                MAction::MemberLeft { node, .. } => self.count_leave(n, node),
                MAction::MemberUpdated { .. } => {}
                MAction::Penalise { peer, reason } => {
                    let now_local = self.local(n);
                    self.nodes[n as usize]
                        .guard
                        .penalise(peer, reason.to_string(), now_local);
                    self.run_guard_actions(n);
                }
                MAction::LocalStatusChanged(_) | MAction::ManifestUpdated { .. } => {}
            }
        }
    }

    fn count_join(&mut self, n: u32, member: NodeId, routable: bool) {
        let Some(&m) = self.index.get(&member) else {
            return;
        };
        if !self.nodes[m as usize].up {
            return;
        }
        if self.nodes[m as usize].role.follows_gossip() {
            self.nodes[n as usize].known_up += 1;
        } else {
            self.nodes[n as usize].known_other += 1;
        }
        if routable {
            let now = self.now;
            for probe in &mut self.probes {
                if probe.node == m {
                    probe.reached(n, now);
                }
            }
        }
    }

    fn count_leave(&mut self, n: u32, member: NodeId) {
        if let Some(&m) = self.index.get(&member)
            && !self.nodes[m as usize].up
            && self.nodes[n as usize].up
        {
            self.metrics.forgot_down_member(self.now);
        }
        if let Some(&m) = self.index.get(&member)
            && self.nodes[m as usize].up
        {
            let follows = self.nodes[m as usize].role.follows_gossip();
            let node = &mut self.nodes[n as usize];
            if follows {
                node.known_up = node.known_up.saturating_sub(1);
            } else {
                node.known_other = node.known_other.saturating_sub(1);
            }
        }
    }

    fn run_guard_actions(&mut self, n: u32) {
        for action in self.nodes[n as usize].guard.take_actions() {
            match action {
                GuardAction::Penalised { node, reason, .. } => {
                    self.metrics.penalised(self.role_of(&node), &reason);
                }
                GuardAction::Banned { node, .. } => {
                    self.metrics.banned(self.role_of(&node));
                    if let Some(&b) = self.index.get(&node) {
                        self.drop_edge(n, b);
                    }
                }
            }
        }
    }

    fn role_of(&self, node: &NodeId) -> Option<Role> {
        self.index.get(node).map(|i| self.nodes[*i as usize].role)
    }

    // ---- gossip --------------------------------------------------------------------------

    fn publish(&mut self, n: u32, message: GossipMessage) {
        let Ok(bytes) = message.encode() else {
            return;
        };
        let id = hash_bytes(&bytes);
        let msg = match self.live.get(&id).and_then(Weak::upgrade) {
            Some(msg) => msg,
            None => {
                let msg = Rc::new(Msg {
                    id,
                    bytes: bytes.len() as u32 + self.scenario.network.frame_overhead,
                    message,
                    created: self.now,
                    copies: RefCell::new(Copies {
                        since: self.now,
                        slots: vec![0; self.nodes.len()],
                    }),
                });
                self.live.insert(id, Rc::downgrade(&msg));
                msg
            }
        };
        if !msg.mark_seen(n, self.now, self.seen_ttl()) {
            // This node sent or relayed the same bytes within the cache's lifetime: gossipsub
            // drops a duplicate publish.
            return;
        }
        self.forward(n, None, &msg);
    }

    fn forward(&mut self, n: u32, except: Option<u32>, msg: &Rc<Msg>) {
        let ready_at = self.mesh_ready_at[n as usize];
        if except.is_none() {
            let has_peer = ready_at <= self.now
                && self.nodes[n as usize]
                    .mesh
                    .iter()
                    .any(|&(p, _)| self.mesh_ready_at[p as usize] <= self.now);
            if !has_peer {
                // Its own message, and no peer to take it (its mesh has not formed, or it is
                // the first node up): it waits, as the node keeps an advert that no peer
                // could take and publishes it when a peer subscribes.
                self.nodes[n as usize].pending_publish = Some(Rc::clone(msg));
                if ready_at > self.now {
                    self.schedule(ready_at, Ev::FlushPublish(n));
                }
                return;
            }
        }
        if ready_at > self.now {
            return;
        }
        for i in 0..self.nodes[n as usize].mesh.len() {
            let (peer, base_latency) = self.nodes[n as usize].mesh[i];
            if Some(peer) == except || self.mesh_ready_at[peer as usize] > self.now {
                continue;
            }
            self.nodes[n as usize].bytes_sent += u64::from(msg.bytes);
            self.metrics.gossip_sent(u64::from(msg.bytes));
            let left = self.net.transmit(self.now, n, peer, msg.bytes);
            let mut copies = msg.copies.borrow_mut();
            let fresh_since = copies.since + self.seen_ttl();
            if copies.slots.len() <= peer as usize {
                // A node that joined after the message was published.
                copies.slots.resize(self.nodes.len(), 0);
            }
            let Some(slot) = copies.slots.get_mut(peer as usize) else {
                continue;
            };
            if *slot == SEEN {
                if self.now < fresh_since {
                    // It already has it: this copy only costs bandwidth (dropped on arrival).
                    self.metrics.duplicate();
                    continue;
                }
                *slot = 0;
            }
            if let Some(left) = left {
                let at = left + base_latency + self.net.jitter();
                let offset = at - msg.created;
                if let Ok(offset) = u32::try_from(offset + 1)
                    && offset != SEEN
                {
                    // A copy on its way (its arrival not past) that comes first makes this one a
                    // duplicate.
                    let earliest = Time::from(*slot);
                    if earliest != 0
                        && msg.created + earliest > self.now
                        && earliest <= Time::from(offset)
                    {
                        self.metrics.duplicate();
                        continue;
                    }
                    *slot = offset;
                }
                drop(copies);
                self.schedule(
                    at,
                    Ev::Gossip {
                        to: peer,
                        from: n,
                        msg: Rc::clone(msg),
                    },
                );
            }
        }
    }

    /// How long a node's duplicate cache remembers a message.
    fn seen_ttl(&self) -> Time {
        (self.scenario.network.seen_ttl_s * SEC as f64) as Time
    }

    fn deliver_gossip(&mut self, to: u32, from: u32, msg: &Rc<Msg>) {
        if !self.nodes[to as usize].up || self.nodes[to as usize].membership.is_none() {
            return;
        }
        let now_local = self.local(to);
        let from_id = self.nodes[from as usize].id;
        if self.nodes[to as usize].guard.is_banned(&from_id, now_local) {
            return;
        }
        if !msg.mark_seen(to, self.now, self.seen_ttl()) {
            self.metrics.duplicate();
            return;
        }
        let node = &mut self.nodes[to as usize];
        let Some(m) = node.membership.as_mut() else {
            return;
        };
        let mut actions = Vec::new();
        let outcome = node
            .guard
            .gossip(m, from_id, msg.message.clone(), now_local, &mut actions);
        self.run_guard_actions(to);
        // Without a membership action (a member joined, left or changed) the table's next
        // wakeup can only have moved later, unless a certificate changed: the tick already
        // planned comes early and plans the next (next_wakeup costs a few cache misses, and
        // a large run delivers millions of adverts).
        let may_be_sooner =
            !actions.is_empty() || matches!(self.scenario.admission, AdmissionKind::Certificates);
        self.run_membership_actions(to, actions);
        if may_be_sooner {
            self.reschedule_tick(to);
        }
        self.metrics.verdict(&outcome.verdict);
        if outcome.verdict == Verdict::Accept {
            if self.nodes[to as usize].role == Role::Replayer
                && matches!(msg.message, GossipMessage::Advert(_))
            {
                let buffer = &mut self.nodes[to as usize].replay_buffer;
                if buffer.len() < 256 {
                    buffer.push_back((self.now, Rc::clone(msg)));
                }
            }
            self.forward(to, Some(from), msg);
        }
    }

    /// A replayer re-sends adverts it saw once they are older than the acceptance window
    /// (younger replays are only stale copies, ignored without harm).
    fn replay(&mut self, n: u32) {
        let tuning = &self.scenario.membership;
        let ttl = (self.scenario.network.seen_ttl_s * SEC as f64) as Time;
        let window =
            self.scenario.effective_heartbeat_ms() * 3 * MS + 2 * tuning.max_clock_skew_s * SEC;
        let after = ttl.max(window) + 2 * SEC;
        let mut due = Vec::new();
        while let Some((at, _)) = self.nodes[n as usize].replay_buffer.front() {
            if *at + after > self.now {
                break;
            }
            if let Some((_, msg)) = self.nodes[n as usize].replay_buffer.pop_front() {
                due.push(msg);
            }
        }
        for msg in due.into_iter().take(16) {
            // Not marked seen here, so it goes out as if new.
            self.forward(n, None, &msg);
        }
    }

    /// A certificate flooder re-wraps its certificate every 100 ms.
    fn flood_certificate(&mut self, n: u32) {
        if !self.nodes[n as usize].up {
            return;
        }
        if let Some(certificate) = self.nodes[n as usize].certificate.clone() {
            let sent_at = self.local(n).0;
            self.publish(
                n,
                GossipMessage::Certificate {
                    certificate,
                    sent_at,
                },
            );
        }
        self.schedule(self.now + 100 * MS, Ev::FloodCertificate(n));
    }

    // ---- requests ------------------------------------------------------------------------

    fn arrival(&mut self) {
        let rate = self.scenario.workload.rate_per_s;
        let gap = -unit(self.rng.next_u64()).ln() / rate;
        self.schedule(self.now + (gap * SEC as f64) as Time + 1, Ev::Arrival);
        // Entry nodes are honest nodes that are up (a client talks to a node it trusts).
        let mut tries = 0;
        let entry = loop {
            tries += 1;
            if self.up_list.is_empty() || tries > 64 {
                return;
            }
            let n = self.up_list[self.rng.index(self.up_list.len())];
            if self.nodes[n as usize].role == Role::Honest {
                break n;
            }
        };
        let request = self.requests.len() as u32;
        let workload = &self.scenario.workload;
        let machine = failover::Request::new(failover::Config {
            first_token_timeout_ms: workload.first_token_timeout_ms,
            stall_timeout_ms: workload.stall_timeout_ms,
            ..failover::Config::default()
        });
        self.requests.push(Req {
            entry,
            machine,
            started: self.now,
            wake_at: None,
            finished: false,
            hit_by_crash: false,
        });
        self.metrics.request_started();
        self.request_event(request, failover::Event::Start);
    }

    fn request_event(&mut self, r: u32, event: failover::Event) {
        let req = &self.requests[r as usize];
        if req.finished {
            return;
        }
        let entry = req.entry;
        if !self.nodes[entry as usize].up {
            return;
        }
        let now_local = self.local(entry);
        let mut actions = Vec::new();
        {
            let (requests, nodes) = (&mut self.requests, &mut self.nodes);
            let req = &mut requests[r as usize];
            let node = &mut nodes[entry as usize];
            let Some(m) = node.membership.as_ref() else {
                return;
            };
            let router = &mut node.router;
            let needs = Needs::default();
            req.machine.handle(
                now_local,
                event,
                |exclude| router.choose_in(now_local, &needs, m, exclude),
                &mut actions,
            );
        }
        for action in actions {
            match action {
                failover::Action::Dispatch { attempt, node, .. } => {
                    self.dispatch(r, attempt, node);
                }
                failover::Action::Cancel { attempt, node } => {
                    if let Some(&target) = self.index.get(&node) {
                        let job = Job {
                            request: r,
                            attempt,
                            entry,
                        };
                        if let Some(at) = self.net.rpc(self.now, entry, target, STREAM_FRAME_BYTES)
                        {
                            self.schedule(at, Ev::Cancel { node: target, job });
                        }
                    }
                }
                failover::Action::Observe(observation) => {
                    let node = &mut self.nodes[entry as usize];
                    node.router.observe(now_local, observation);
                    if let Observation::Succeeded { node: served } = observation {
                        self.membership_event(entry, MEvent::Served(served));
                    }
                }
                failover::Action::EmitToClient(_) => {}
                failover::Action::Finish { node, attempts, .. } => {
                    let req = &mut self.requests[r as usize];
                    req.finished = true;
                    let latency = self.now - req.started;
                    let hit = req.hit_by_crash;
                    let role = self.role_of(&node);
                    if let Some(&i) = self.index.get(&node) {
                        self.nodes[i as usize].completed += 1;
                    }
                    self.metrics.request_done(latency, attempts, role, hit);
                }
                failover::Action::FailWithError(_) => {
                    let req = &mut self.requests[r as usize];
                    req.finished = true;
                    let hit = req.hit_by_crash;
                    self.metrics.request_failed(hit);
                }
            }
        }
        let wake = self.requests[r as usize].machine.next_wakeup();
        if let Some(wake) = wake
            && !self.requests[r as usize].finished
        {
            let at = self.virtual_of(entry, wake).max(self.now);
            let req = &mut self.requests[r as usize];
            if req.wake_at.is_none_or(|t| at < t) {
                req.wake_at = Some(at);
                self.schedule(at, Ev::RequestWake(r));
            }
        }
    }

    fn dispatch(&mut self, r: u32, attempt: u32, node: NodeId) {
        let entry = self.requests[r as usize].entry;
        let Some(&target) = self.index.get(&node) else {
            return;
        };
        self.metrics
            .dispatched(target, self.nodes[target as usize].role, self.now);
        let job = Job {
            request: r,
            attempt,
            entry,
        };
        if target == entry {
            self.stream_open(target, job);
            return;
        }
        let reachable = self.nodes[target as usize].up && self.net.connected(entry, target);
        match reachable.then(|| self.net.rpc(self.now, entry, target, STREAM_REQUEST_BYTES)) {
            Some(Some(at)) => self.schedule(
                at,
                Ev::StreamOpen {
                    job,
                    at_node: target,
                },
            ),
            _ => {
                let event = failover::Event::AttemptFailed {
                    attempt,
                    error: AttemptError::Unreachable("no connection".into()),
                };
                self.schedule(
                    self.now + CONNECT_TIMEOUT,
                    Ev::ToEntry {
                        request: r,
                        event: Box::new(event),
                    },
                );
            }
        }
    }

    fn stream_open(&mut self, n: u32, job: Job) {
        let node = &mut self.nodes[n as usize];
        if !node.up {
            return;
        }
        if node.role == Role::Sybil {
            // Holds the stream and never answers.
            return;
        }
        let concurrency = self.scenario.workload.concurrency as usize;
        if node.running.len() < concurrency {
            self.start_job(n, job);
        } else if node.queue.len() < MAX_QUEUE {
            node.queue.push_back(job);
            self.update_load(n);
        } else {
            let event = failover::Event::AttemptFailed {
                attempt: job.attempt,
                error: AttemptError::Node {
                    code: ErrorCode::Busy,
                    message: "queue full".into(),
                },
            };
            self.send_to_entry(n, job, event);
        }
    }

    fn start_job(&mut self, n: u32, job: Job) {
        let workload = &self.scenario.workload;
        let node = &mut self.nodes[n as usize];
        let prefill = (workload.prefill_ms * MS as f64) as Time;
        let decode = (f64::from(workload.tokens) / node.speed * SEC as f64) as Time;
        let done_at = self.now + prefill + decode;
        node.running.push((job, done_at));
        self.schedule(self.now + prefill, Ev::JobFirstToken { node: n, job });
        self.schedule(done_at, Ev::JobDone { node: n, job });
        self.update_load(n);
    }

    fn is_running(&self, n: u32, job: Job) -> bool {
        self.nodes[n as usize]
            .running
            .iter()
            .any(|(j, _)| j.request == job.request && j.attempt == job.attempt)
    }

    fn job_first_token(&mut self, n: u32, job: Job) {
        if !self.nodes[n as usize].up || !self.is_running(n, job) {
            return;
        }
        let event = failover::Event::TokenReceived {
            attempt: job.attempt,
            token: Token {
                text: "x".into(),
                index: 0,
                logprob: None,
                top_logprobs: Vec::new(),
            },
        };
        self.send_to_entry(n, job, event);
    }

    fn job_done(&mut self, n: u32, job: Job) {
        if !self.nodes[n as usize].up || !self.is_running(n, job) {
            return;
        }
        let tokens = self.scenario.workload.tokens;
        let event = failover::Event::StreamEnded {
            attempt: job.attempt,
            usage: Usage {
                prompt_tokens: 100,
                completion_tokens: tokens,
            },
            finish_reason: FinishReason::Stop,
            receipt: None,
        };
        self.send_to_entry(n, job, event);
        self.end_job(n, job);
    }

    fn cancel_job(&mut self, n: u32, job: Job) {
        let node = &mut self.nodes[n as usize];
        node.queue
            .retain(|j| !(j.request == job.request && j.attempt == job.attempt));
        self.end_job(n, job);
    }

    fn end_job(&mut self, n: u32, job: Job) {
        let node = &mut self.nodes[n as usize];
        node.running
            .retain(|(j, _)| !(j.request == job.request && j.attempt == job.attempt));
        let concurrency = self.scenario.workload.concurrency as usize;
        if node.running.len() < concurrency
            && let Some(next) = node.queue.pop_front()
        {
            self.start_job(n, next);
        } else {
            self.update_load(n);
        }
    }

    fn send_to_entry(&mut self, n: u32, job: Job, event: failover::Event) {
        let at = if job.entry == n {
            Some(self.now)
        } else {
            self.net.rpc(self.now, n, job.entry, STREAM_FRAME_BYTES)
        };
        if let Some(at) = at {
            self.schedule(
                at,
                Ev::ToEntry {
                    request: job.request,
                    event: Box::new(event),
                },
            );
        }
    }

    /// Tells the membership machine the node's load (published with the next heartbeat).
    fn update_load(&mut self, n: u32) {
        let node = &mut self.nodes[n as usize];
        if node.role == Role::LoadLiar || node.role == Role::Sybil {
            return;
        }
        let in_flight = node.running.len() as u32;
        let queued = node.queue.len() as u32;
        if node.service.load.in_flight == in_flight && node.service.load.queued == queued {
            return;
        }
        node.service.load.in_flight = in_flight;
        node.service.load.queued = queued;
        let service = node.service.clone();
        self.membership_event(n, MEvent::LocalAdvertChanged(Some(service)));
    }

    // ---- metrics -------------------------------------------------------------------------

    fn sample(&mut self) {
        self.live.retain(|_, msg| msg.strong_count() > 0);
        let sample = self.scenario.sample_ms * MS;
        self.schedule(self.now + sample, Ev::Sample);
        let up = self.up_list.len() as u32;
        // Tables should hold every node up that follows the gossip protocol.
        let expected = self
            .up_list
            .iter()
            .filter(|n| self.nodes[**n as usize].role.follows_gossip())
            .count() as u32;
        // A table is complete when it holds them all, or is full of members that are up (in a
        // domain larger than the tables).
        let room = self.scenario.membership.max_members as u32;
        let mut complete = Vec::with_capacity(self.up_list.len());
        let mut members = 0u64;
        for &n in &self.up_list {
            let node = &self.nodes[n as usize];
            if !node.role.follows_gossip() {
                continue;
            }
            members += u64::from(node.known_up);
            let full = node.known_up + node.known_other >= room;
            complete.push((n, node.known_up + 1 >= expected || full));
        }
        let bytes: u64 = self.nodes.iter().map(|n| n.bytes_sent).sum();
        self.metrics.sample(self.now, up, &complete, members, bytes);
    }

    fn finish(self, wall: std::time::Duration) -> Report {
        let served: Vec<(Role, u64)> = self
            .nodes
            .iter()
            .filter(|n| n.joined)
            .map(|n| (n.role, n.completed))
            .collect();
        let probes = self
            .probes
            .iter()
            .map(|p| p.done.map(|d| d - p.joined))
            .collect();
        let relay_only = self.net.relay_only_count();
        self.metrics.finish(
            &self.scenario,
            self.log_hash,
            self.events,
            wall,
            &served,
            probes,
            relay_only,
            self.nodes.len(),
        )
    }
}

/// A key drawn from the run's generator.
fn key_from(rng: &mut SeededRng) -> SecretKey {
    loop {
        let mut bytes = [0u8; 32];
        for chunk in bytes.chunks_mut(8) {
            chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        if let Ok(key) = SecretKey::from_bytes(&bytes) {
            return key;
        }
    }
}

/// A 64-bit hash of a message's bytes (gossipsub's message id is a hash of the data).
fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for chunk in bytes.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        h = mix(h ^ u64::from_le_bytes(word));
    }
    mix(h ^ bytes.len() as u64)
}
