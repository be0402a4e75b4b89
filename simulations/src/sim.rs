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
//! Time is virtual ([`Time`], microseconds). The event loop is a conservative parallel
//! simulation in windows, so that a large run uses two cores:
//!
//! - The nodes are split into [`SHARDS`] shards by a fixed rule (blocks of 64 consecutive
//!   indices, in turn). A shard owns its nodes' state, its own event queue, the generator of
//!   its nodes' loss and jitter, its counters, the requests entered at its nodes, and its
//!   nodes' part of each message's duplicate-cache state (the message is shared; its slots are
//!   one array per shard).
//! - Whatever a node does to another goes through the network, whose links take at least
//!   `network.min_latency_ms` (the lookahead `L`). A window runs from the earliest pending
//!   event `t` (stretches without events are skipped) to `t + L`, or to the next global event
//!   if that comes sooner. In a window each shard runs its own events in order of time, then of
//!   scheduling (a node's events for itself, at no delay, included); what it sends to a node of
//!   the other shard cannot arrive before `t + L`, so it goes to an outbox, which the other
//!   shard takes in, in the order it was sent, when the next window starts. A gossip copy for a node of the other
//!   shard is checked against the receiver's duplicate cache then (its state by then is at least
//!   as recent as at the sending), so a copy the receiver holds, or one that would arrive after
//!   a copy already on its way, is counted but never becomes an event, as within a shard.
//! - Effects on a node of the other shard that take no time on the network (a ban drops the
//!   link from the banned node's side of the mesh too; a table taking a probed newcomer; a
//!   table forgetting a member that is down, for the stale-entry metric) are queued with their
//!   time and applied between windows, in order of time, then of shard.
//! - Global events (joins, mesh maintenance, churn, partitions, probes, request arrivals,
//!   samples) touch several nodes or draw from the run's own generator: they run alone on the
//!   coordinating thread between windows, each at its time (a window ends at the next one),
//!   before the shards' events of the same time.
//! - The coordinating thread runs shard 0, the global events and the work between windows; a
//!   second thread runs shard 1, and the two meet at the end of each window ([`Rendezvous`]).
//!   The shards are fixed whatever the number of threads (`--threads 1` runs them one after the
//!   other in each window), every random choice comes from a generator seeded by the scenario,
//!   and no iteration order of a hash map reaches the outcome, so a seed always gives the same
//!   event log, whose hash the report shows, on one thread or two.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

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
use crate::report::{Counters, Metrics, Report};
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

/// The shards the nodes are split into: fixed, whatever the number of threads that run them,
/// so that the event log does not depend on it. (The event loop is written for two: what one
/// shard sends goes to the other.)
pub const SHARDS: usize = 2;
/// Nodes go to the shards in blocks of this many consecutive indices, in turn, so that the
/// shards hold as many of the nodes that come later (churn, hostile nodes at the last indices)
/// and the per-node arrays the shards read are seldom written on a line the other one reads.
const BLOCK: u32 = 64;
/// How often the shards forget the messages they published that are no longer about, in
/// virtual time (see [`Step::sweep`]).
const SWEEP: Time = 50 * MS;

/// The shard that owns node `n`.
fn shard_of(n: u32) -> usize {
    (n / BLOCK) as usize % SHARDS
}

/// Where node `n` is in its shard's arrays.
fn place_of(n: u32) -> usize {
    (n / BLOCK) as usize / SHARDS * BLOCK as usize + (n % BLOCK) as usize
}

/// The most nodes a run of `scenario` can have: its nodes, its probes, and the nodes its churn
/// adds (a share of the honest nodes up at most that share of all the nodes).
fn most_nodes(scenario: &Scenario) -> u64 {
    let joins = || scenario.churn.iter().filter(|c| c.kind == ChurnKind::Join);
    let mut most = u64::from(scenario.nodes) + scenario.probes.len() as u64;
    most += joins().map(|c| u64::from(c.count)).sum::<u64>();
    for churn in joins().filter(|c| c.count == 0) {
        most += (churn.share * most as f64).ceil() as u64;
    }
    most
}

/// How many of the first `nodes` nodes each shard holds.
fn places(nodes: u64) -> [usize; SHARDS] {
    let mut places = [0; SHARDS];
    for block in 0..nodes.div_ceil(u64::from(BLOCK)) {
        let size = (nodes - block * u64::from(BLOCK)).min(u64::from(BLOCK));
        places[block as usize % SHARDS] += size as usize;
    }
    places
}

/// The number of threads a run uses unless told otherwise: one per shard, as far as the
/// machine has cores.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(SHARDS))
}

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

/// A gossip message in flight, shared by every copy (in both shards).
#[derive(Debug)]
struct Msg {
    id: u64,
    bytes: u32,
    message: GossipMessage,
    /// When it was first published.
    created: Time,
    /// Where it is for each node, per shard: gossipsub's duplicate cache and the copies on
    /// their way, kept per message rather than per node (one word per node instead of a map
    /// entry per node and message), in one array per shard so that forwarding to a peer reads
    /// one cache line. Each shard's part is written only by the thread that runs the shard.
    copies: [Copies; SHARDS],
}

/// A message's state at each node of one shard (see [`Copies::slots`]), on cache lines of its
/// own. Atomic words, read and written in program order by the one thread that runs the shard
/// (handed from thread to thread between windows, with the rest of the shard), so that both
/// shards can hold the message without a lock.
#[derive(Debug)]
#[repr(align(64))]
struct Copies {
    /// When the duplicate cache was last cleared: after the cache's time to live the nodes
    /// have forgotten the message (as gossipsub's cache does) and a copy counts as new again.
    since: AtomicU64,
    /// Indexed by the node's place in the shard (allocated for every node the run may have,
    /// when the message is published, and freed with it, a few seconds later): [`SEEN`] if
    /// the node has seen it since `since`; else the earliest arrival of a copy on its way, in
    /// µs after `created` plus one (0: none). A copy that would arrive after one already on
    /// its way is dropped on arrival in any case (the node has seen the message by then), so
    /// it is counted (bytes and duplicates) but never becomes an event: without this, a large
    /// cold start keeps about four copies of each advert in flight per node. (One
    /// difference: if the earliest copy is then refused, because its sender was banned
    /// meanwhile or its receiver went down, the later copies are not delivered either.)
    slots: Box<[AtomicU32]>,
}

/// [`Copies::slots`] of a node that has seen the message.
const SEEN: u32 = u32::MAX;

impl Msg {
    /// A message first published at `now`, with slots for `places[s]` nodes in shard `s`.
    fn new(
        id: u64,
        bytes: u32,
        message: GossipMessage,
        now: Time,
        places: [usize; SHARDS],
    ) -> Self {
        Self {
            id,
            bytes,
            message,
            created: now,
            copies: places.map(|n| Copies {
                since: AtomicU64::new(now),
                slots: (0..n).map(|_| AtomicU32::new(0)).collect(),
            }),
        }
    }

    /// Puts the node at `place` of shard `shard` in the duplicate cache at `now`; false if it
    /// was there.
    fn mark_seen(&self, shard: usize, place: usize, now: Time, ttl: Time) -> bool {
        let copies = &self.copies[shard];
        if now >= copies.since.load(Ordering::Relaxed) + ttl {
            copies.since.store(now, Ordering::Relaxed);
            for slot in &copies.slots {
                if slot.load(Ordering::Relaxed) == SEEN {
                    slot.store(0, Ordering::Relaxed);
                }
            }
        }
        copies
            .slots
            .get(place)
            .is_none_or(|slot| slot.swap(SEEN, Ordering::Relaxed) != SEEN)
    }

    /// Whether the node at `place` of shard `shard` already has the message when a copy is
    /// sent to it at `now`: the copy only costs bandwidth (it is dropped on arrival).
    fn holds(&self, shard: usize, place: usize, now: Time, ttl: Time) -> bool {
        let copies = &self.copies[shard];
        let Some(slot) = copies.slots.get(place) else {
            return false;
        };
        if slot.load(Ordering::Relaxed) == SEEN {
            if now < copies.since.load(Ordering::Relaxed) + ttl {
                return true;
            }
            slot.store(0, Ordering::Relaxed);
        }
        false
    }

    /// Files a copy sent at `now` that reaches the node at `place` of shard `shard` (which
    /// does not hold the message, see [`holds`](Self::holds)) at `at`: false if a copy on its
    /// way comes first (its arrival not past), which makes this one a duplicate.
    fn claim(&self, shard: usize, place: usize, now: Time, at: Time) -> bool {
        let Some(slot) = self.copies[shard].slots.get(place) else {
            return true;
        };
        let offset = at.saturating_sub(self.created);
        if let Ok(offset) = u32::try_from(offset + 1)
            && offset != SEEN
        {
            let earliest = Time::from(slot.load(Ordering::Relaxed));
            if earliest != 0 && self.created + earliest > now && earliest <= Time::from(offset) {
                return false;
            }
            slot.store(offset, Ordering::Relaxed);
        }
        true
    }
}

/// A hasher for keys that are already well-spread hashes (message ids): the key itself.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Messages a shard's nodes published, by id, so that the same bytes published again while
/// the message is about are the same message (see [`Step::sweep`]).
type Live = HashMap<u64, Arc<Msg>, BuildHasherDefault<IdHasher>>;

/// A completion being served (or queued) at a node.
#[derive(Debug, Clone, Copy)]
struct Job {
    request: u32,
    attempt: u32,
    entry: u32,
}

/// One simulated node (its identity, role and whether it is up are in the [`World`]).
struct Node {
    joined: bool,
    skew_ms: i64,
    speed: f64,
    membership: Option<Membership>,
    guard: Guard,
    router: Router,
    service: LocalService,
    /// Its gossip mesh: each peer with the link's base latency (drawn once per link).
    mesh: Vec<(u32, Time)>,
    /// When its upload link is free again.
    uplink_free: Time,
    tick_at: Option<Time>,
    snapshot_done: bool,
    /// Its own message that no peer could take yet.
    pending_publish: Option<Arc<Msg>>,
    certificate: Option<Signed<MembershipCertificate>>,
    running: Vec<(Job, Time)>,
    queue: VecDeque<Job>,
    /// Members of this node's table that are up (kept by the actions, see `count_*`).
    known_up: u32,
    /// Members of its table that are up and do not follow the gossip protocol.
    known_other: u32,
    /// Adverts this replayer saw, with when.
    replay_buffer: VecDeque<(Time, Arc<Msg>)>,
    bytes_sent: u64,
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

/// A request entered at a node (kept by the entry node's shard until it ends).
struct Req {
    entry: u32,
    machine: failover::Request,
    started: Time,
    wake_at: Option<Time>,
    finished: bool,
    /// It was running on a node that crashed.
    hit_by_crash: bool,
}

/// An event of the run as a whole: it touches several nodes or draws from the run's generator,
/// so it runs between windows with every shard at hand.
#[derive(Debug)]
enum GlobalEv {
    Join(u32),
    /// A node's heartbeat: its mesh repaired (grafts touch the peer's mesh too), snapshots,
    /// the manifest re-gossiped.
    Maintain(u32),
    Churn(usize),
    ChurnOne(ChurnKind),
    Probe,
    PartitionStart(usize),
    PartitionHeal(usize),
    Arrival,
    Sample,
}

impl GlobalEv {
    /// Its term in the event log's hash, at `at`.
    fn log_term(&self, at: Time) -> u64 {
        let (code, detail) = match self {
            GlobalEv::Join(n) => (1, u64::from(*n)),
            GlobalEv::Maintain(n) => (2, u64::from(*n)),
            GlobalEv::Churn(i) => (7, *i as u64),
            GlobalEv::ChurnOne(k) => (8, *k as u64),
            GlobalEv::Probe => (9, 0),
            GlobalEv::PartitionStart(i) => (10, *i as u64),
            GlobalEv::PartitionHeal(i) => (11, *i as u64),
            GlobalEv::Arrival => (12, 0),
            GlobalEv::Sample => (20, 0),
        };
        log_term(at, code, detail)
    }
}

/// An event at one node, run by the node's shard.
#[derive(Debug)]
enum Ev {
    Tick(u32),
    Gossip {
        to: u32,
        from: u32,
        msg: Arc<Msg>,
    },
    SnapshotAsk {
        to: u32,
        from: u32,
        /// Boxed, so that an event is 24 bytes: millions wait in the queue in a large cold
        /// start (most of them gossip copies behind their senders' uplinks).
        after: Option<Box<NodeId>>,
    },
    SnapshotPage {
        to: u32,
        from: u32,
        page: Box<ControlResponse>,
    },
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
        entry: u32,
        event: Box<failover::Event>,
    },
    Cancel {
        node: u32,
        job: Job,
    },
    /// A request's failover machine wakes up (at its entry node).
    RequestWake {
        request: u32,
        entry: u32,
    },
    FloodCertificate(u32),
    /// A node's own message that waited for a peer goes out now.
    FlushPublish(u32),
}

impl Ev {
    /// Its term in the event log's hash, at `at`.
    fn log_term(&self, at: Time) -> u64 {
        let (code, detail) = match self {
            Ev::Tick(n) => (3, u64::from(*n)),
            Ev::Gossip { to, from, msg } => {
                (4, mix(u64::from(*to) << 32 | u64::from(*from)) ^ msg.id)
            }
            Ev::SnapshotAsk { to, from, .. } => (5, u64::from(*to) << 32 | u64::from(*from)),
            Ev::SnapshotPage { to, from, .. } => (6, u64::from(*to) << 32 | u64::from(*from)),
            Ev::StreamOpen { job, at_node } => {
                (13, u64::from(job.request) << 32 | u64::from(*at_node))
            }
            Ev::JobFirstToken { node, job } => {
                (14, u64::from(job.request) << 32 | u64::from(*node))
            }
            Ev::JobDone { node, job } => (15, u64::from(job.request) << 32 | u64::from(*node)),
            Ev::ToEntry { request, .. } => (16, u64::from(*request)),
            Ev::Cancel { node, job } => (17, u64::from(job.request) << 32 | u64::from(*node)),
            Ev::RequestWake { request, .. } => (18, u64::from(*request)),
            Ev::FloodCertificate(n) => (19, u64::from(*n)),
            Ev::FlushPublish(n) => (21, u64::from(*n)),
        };
        log_term(at, code, detail)
    }

    /// The node it happens at (its shard runs it).
    fn home(&self) -> u32 {
        match self {
            Ev::Tick(n) | Ev::FloodCertificate(n) | Ev::FlushPublish(n) => *n,
            Ev::Gossip { to, .. } | Ev::SnapshotAsk { to, .. } | Ev::SnapshotPage { to, .. } => *to,
            Ev::StreamOpen { at_node, .. } => *at_node,
            Ev::JobFirstToken { node, .. } | Ev::JobDone { node, .. } | Ev::Cancel { node, .. } => {
                *node
            }
            Ev::ToEntry { entry, .. } | Ev::RequestWake { entry, .. } => *entry,
        }
    }
}

// An event waits in the queue with its time and sequence number: 40 bytes in all.
const _: () = assert!(std::mem::size_of::<Ev>() == 24);

/// An event's term in the event log's hash.
fn log_term(at: Time, code: u64, detail: u64) -> u64 {
    mix(at ^ code.rotate_left(56) ^ detail)
}

/// What every shard reads during a window and only global events change: borrowed by both
/// shards during a window, owned by the coordinating thread between windows.
struct World {
    scenario: Scenario,
    manifest: Signed<DomainManifest>,
    net: Net,
    /// Per node: its address, its role, whether it is up, when its gossip mesh is ready (read
    /// for every peer of every forwarded message, so apart from the nodes' larger state).
    ids: Vec<NodeId>,
    roles: Vec<Role>,
    up: Vec<bool>,
    mesh_ready_at: Vec<Time>,
    index: HashMap<NodeId, u32>,
    /// The newcomers whose spread is measured (a table that takes one says so).
    probe_nodes: Vec<u32>,
    /// When nodes crashed (for the dispatches to crashed nodes).
    crashed_at: HashMap<u32, Time>,
    /// How long a node's duplicate cache remembers a message.
    seen_ttl: Time,
    /// How many nodes each shard may hold by the end of the run (a message has a slot for
    /// each, see [`Copies::slots`]).
    places: [usize; SHARDS],
}

impl World {
    fn heartbeat(&self) -> Time {
        self.scenario.membership.heartbeat_ms * MS
    }

    fn role_of(&self, node: &NodeId) -> Option<Role> {
        self.index.get(node).map(|i| self.roles[*i as usize])
    }
}

/// What a shard sends to a node of the other shard.
#[derive(Debug)]
enum Outgoing {
    /// An event at `at`.
    Event { at: Time, ev: Ev },
    /// A gossip copy sent at `sent`, arriving at `at` (`None`: lost): the receiving shard
    /// checks it against the receiver's duplicate cache before it becomes an event.
    Copy {
        sent: Time,
        at: Option<Time>,
        to: u32,
        from: u32,
        msg: Arc<Msg>,
    },
}

/// What a shard sends to the other during a window, in the order sent.
struct Outbox {
    items: Vec<Outgoing>,
    /// The earliest arrival among the items (`Time::MAX`: none).
    first: Time,
}

impl Outbox {
    fn new() -> Self {
        Self {
            items: Vec::new(),
            first: Time::MAX,
        }
    }

    fn push(&mut self, item: Outgoing) {
        let at = match &item {
            Outgoing::Event { at, .. } => Some(*at),
            Outgoing::Copy { at, .. } => *at,
        };
        if let Some(at) = at {
            self.first = self.first.min(at);
        }
        self.items.push(item);
    }
}

/// An effect on a node of another shard, or on the run's global state, that takes no time on
/// the network: applied between windows, in order of time.
#[derive(Debug)]
enum Effect {
    /// `node` drops `peer` from its mesh (`peer` banned it).
    DropEdge { node: u32, peer: u32 },
    /// The table of `holder` took the probed newcomer `probe` as routable.
    Reached { probe: u32, holder: u32 },
    /// A table forgot a member that is down.
    ForgotDown,
}

/// One shard: the nodes it owns and everything their events change.
struct Shard {
    /// Its number (its nodes are those `n` with `shard_of(n)` equal to it).
    index: usize,
    /// Indexed by `place_of`.
    nodes: Vec<Node>,
    /// The time of the event it runs.
    now: Time,
    queue: Queue<Ev>,
    /// Its nodes' draws of loss and jitter.
    rng: SeededRng,
    live: Live,
    /// The requests entered at its nodes, until they end.
    requests: BTreeMap<u32, Req>,
    counters: Counters,
    /// Completions served, by node (all nodes; this shard's entry nodes counted them).
    served: Vec<u64>,
    outbox: Outbox,
    /// The other shard's outbox of the previous window, taken in as this one starts.
    inbox: Vec<Outgoing>,
    effects: Vec<(Time, Effect)>,
    /// The hash of the events of the last window, and how many there were.
    window_hash: u64,
    window_events: u64,
}

/// The run's own state, touched by global events only.
struct Global {
    now: Time,
    queue: Queue<GlobalEv>,
    rng: SeededRng,
    operator: SecretKey,
    model: ContentHash,
    /// Nodes up, for random choices (swap-removed).
    up_list: Vec<u32>,
    up_pos: Vec<usize>,
    /// Nodes up that follow the gossip protocol (the ones every table should hold).
    followers_up: usize,
    next_request: u32,
    /// Newcomers whose spread is measured.
    probes: Vec<Probe>,
    log_hash: u64,
    events: u64,
    /// Windows run.
    windows: u64,
    metrics: Metrics,
    next_sweep: Time,
    progress: Option<indicatif::ProgressBar>,
    /// Progress as a line every ten virtual seconds (stderr is not a terminal: a log).
    plain_progress: bool,
    next_progress: Time,
    started: std::time::Instant,
}

/// A run in progress.
pub struct Sim {
    world: World,
    shards: [Shard; SHARDS],
    global: Global,
    threads: usize,
}

/// The coordinating thread between windows: every shard at hand.
struct Step<'a> {
    world: &'a mut World,
    shards: [&'a mut Shard; SHARDS],
    g: &'a mut Global,
}

/// A shard running its nodes' events: its own state, and the world read-only.
struct Ctx<'a> {
    world: &'a World,
    shard: &'a mut Shard,
    /// Between windows, the other shard's published messages (a message published again is
    /// found there too).
    other_live: Option<&'a Live>,
}

/// Where the coordinating thread and the second one meet between windows.
struct Rendezvous {
    /// The window the second thread is to run (numbered from 1), or [`STOP`].
    go: AtomicU64,
    /// The end of that window.
    end: AtomicU64,
    /// The last window the second thread finished.
    done: AtomicU64,
}

/// [`Rendezvous::go`] when the run is over.
const STOP: u64 = u64::MAX;

/// Tells the second thread to stop when the coordinating one leaves the run, even by a panic
/// (the scope would wait for it forever).
struct StopOnDrop<'a> {
    rendezvous: &'a Rendezvous,
    worker: Option<std::thread::Thread>,
}

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.rendezvous.go.store(STOP, Ordering::Release);
        if let Some(worker) = &self.worker {
            worker.unpark();
        }
    }
}

/// Wakes the coordinating thread when the second one ends, even by a panic (it may be
/// waiting for it).
struct WakeOnDrop(std::thread::Thread);

impl Drop for WakeOnDrop {
    fn drop(&mut self) {
        self.0.unpark();
    }
}

/// How a thread waits for the other at the ends of windows: it spins while the other answers
/// soon (it runs on another core, and windows are short), and sleeps until woken (the other
/// thread unparks it) when it does not, as when the machine has fewer free cores than the run
/// has threads: spinning then would only keep the other one from running.
struct Waiter {
    /// How long it spins before it sleeps (in spin-loop hints): doubled after a wait the
    /// spinning saw through, halved after one it slept.
    spins: u32,
}

impl Waiter {
    const FEWEST_SPINS: u32 = 1 << 6;
    const MOST_SPINS: u32 = 1 << 14;

    fn new() -> Self {
        Self {
            spins: Self::MOST_SPINS,
        }
    }

    /// Waits until `ready` (the other thread unparks this one after it makes it so).
    fn wait_until(&mut self, mut ready: impl FnMut() -> bool) {
        for _ in 0..self.spins {
            if ready() {
                self.spins = (self.spins * 2).min(Self::MOST_SPINS);
                return;
            }
            std::hint::spin_loop();
        }
        self.spins = (self.spins / 2).max(Self::FEWEST_SPINS);
        while !ready() {
            std::thread::park();
        }
    }
}

/// Runs `shard`'s window ending at `end`.
fn run_window(world: &RwLock<World>, shard: &Mutex<Shard>, end: Time) {
    let world = world.read().expect("no thread panicked");
    let mut shard = shard.lock().expect("no thread panicked");
    Ctx {
        world: &world,
        shard: &mut shard,
        other_live: None,
    }
    .window(end);
}

impl Sim {
    /// Sets up the run: keys, certificates, the initial nodes' join times, the script. It runs
    /// on [`default_threads`] threads unless told otherwise ([`Sim::threads`]).
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
        let shards = std::array::from_fn(|index| Shard {
            index,
            nodes: Vec::new(),
            now: 0,
            queue: Queue::new(MS),
            rng: SeededRng::new(mix(scenario.seed ^ 0x006e_6574 ^ mix(index as u64 + 1))),
            live: Live::default(),
            requests: BTreeMap::new(),
            counters: Counters::new(&scenario),
            served: Vec::new(),
            outbox: Outbox::new(),
            inbox: Vec::new(),
            effects: Vec::new(),
            window_hash: 0,
            window_events: 0,
        });
        let global = Global {
            now: 0,
            queue: Queue::new(MS),
            rng,
            operator,
            model,
            up_list: Vec::new(),
            up_pos: Vec::new(),
            followers_up: 0,
            next_request: 0,
            probes: Vec::new(),
            log_hash: 0,
            events: 0,
            windows: 0,
            metrics: Metrics::new(&scenario),
            next_sweep: SWEEP,
            progress,
            plain_progress,
            next_progress: SEC,
            started: std::time::Instant::now(),
        };
        let world = World {
            seen_ttl: (scenario.network.seen_ttl_s * SEC as f64) as Time,
            places: places(most_nodes(&scenario)),
            scenario,
            manifest,
            net,
            ids: Vec::new(),
            roles: Vec::new(),
            up: Vec::new(),
            mesh_ready_at: Vec::new(),
            index: HashMap::new(),
            probe_nodes: Vec::new(),
            crashed_at: HashMap::new(),
        };
        let mut sim = Sim {
            world,
            shards,
            global,
            threads: default_threads(),
        };
        sim.step().populate()?;
        Ok(sim)
    }

    /// Runs on `threads` threads (1 runs the shards one after the other; more than [`SHARDS`]
    /// are not used): the outcome is the same.
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads.clamp(1, SHARDS);
        self
    }

    fn step(&mut self) -> Step<'_> {
        let [a, b] = &mut self.shards;
        Step {
            world: &mut self.world,
            shards: [a, b],
            g: &mut self.global,
        }
    }

    /// Runs to the end and reports.
    ///
    /// The coordinating thread runs shard 0 and the global events, a second thread (if there
    /// are two) shard 1. The state sits in locks that are never contended (the threads take
    /// turns, told by [`Rendezvous`]): they hand it from one thread to the other.
    pub fn run(self) -> Report {
        let Sim {
            world,
            shards,
            mut global,
            threads,
        } = self;
        global.started = std::time::Instant::now();
        let end = (world.scenario.duration_s * SEC as f64) as Time;
        let world = RwLock::new(world);
        let shards = shards.map(Mutex::new);
        let rendezvous = Rendezvous {
            go: AtomicU64::new(0),
            end: AtomicU64::new(0),
            done: AtomicU64::new(0),
        };
        let coordinator = std::thread::current();
        std::thread::scope(|scope| {
            let worker = (threads > 1).then(|| {
                let (world, shard, rendezvous) = (&world, &shards[1], &rendezvous);
                let coordinator = coordinator.clone();
                scope.spawn(move || {
                    let _wake = WakeOnDrop(coordinator.clone());
                    let mut waiter = Waiter::new();
                    let mut last = 0;
                    loop {
                        let mut go = last;
                        waiter.wait_until(|| {
                            go = rendezvous.go.load(Ordering::Acquire);
                            go != last
                        });
                        if go == STOP {
                            return;
                        }
                        last = go;
                        run_window(world, shard, rendezvous.end.load(Ordering::Relaxed));
                        rendezvous.done.store(go, Ordering::Release);
                        coordinator.unpark();
                    }
                })
            });
            let _stop = StopOnDrop {
                rendezvous: &rendezvous,
                worker: worker.as_ref().map(|w| w.thread().clone()),
            };
            let mut waiter = Waiter::new();
            let mut window = 0;
            loop {
                let next = {
                    let mut world = world.write().expect("no thread panicked");
                    let [a, b] = &shards;
                    let mut a = a.lock().expect("no thread panicked");
                    let mut b = b.lock().expect("no thread panicked");
                    Step {
                        world: &mut world,
                        shards: [&mut a, &mut b],
                        g: &mut global,
                    }
                    .between(end, window > 0)
                };
                let Some(window_end) = next else {
                    break;
                };
                window += 1;
                match &worker {
                    Some(worker) => {
                        rendezvous.end.store(window_end, Ordering::Relaxed);
                        rendezvous.go.store(window, Ordering::Release);
                        worker.thread().unpark();
                        run_window(&world, &shards[0], window_end);
                        waiter.wait_until(|| {
                            rendezvous.done.load(Ordering::Acquire) == window
                                || worker.is_finished()
                        });
                        assert_eq!(
                            rendezvous.done.load(Ordering::Acquire),
                            window,
                            "the second thread stopped (it panicked)"
                        );
                    }
                    None => {
                        for shard in &shards {
                            run_window(&world, shard, window_end);
                        }
                    }
                }
            }
        });
        if let Some(bar) = &global.progress {
            bar.finish_and_clear();
        }
        Sim {
            world: world.into_inner().expect("no thread panicked"),
            shards: shards.map(|s| s.into_inner().expect("no thread panicked")),
            global,
            threads,
        }
        .finish()
    }

    fn finish(mut self) -> Report {
        let wall = self.global.started.elapsed();
        for shard in &mut self.shards {
            self.global
                .metrics
                .counters()
                .take_from(&mut shard.counters);
        }
        let served: Vec<(Role, u64)> = (0..self.world.ids.len() as u32)
            .filter(|&n| self.shards[shard_of(n)].nodes[place_of(n)].joined)
            .map(|n| {
                let count = self
                    .shards
                    .iter()
                    .map(|s| s.served.get(n as usize).copied().unwrap_or(0))
                    .sum();
                (self.world.roles[n as usize], count)
            })
            .collect();
        let probes = self
            .global
            .probes
            .iter()
            .map(|p| p.done.map(|d| d - p.joined))
            .collect();
        let relay_only = self.world.net.relay_only_count();
        self.global.metrics.finish(
            &self.world.scenario,
            self.global.log_hash,
            self.global.events,
            self.global.windows,
            self.threads,
            wall,
            &served,
            probes,
            relay_only,
            self.world.ids.len(),
        )
    }
}

/// `skew_ms` off the virtual clock at `now`: a node's clock.
fn local_clock(now: Time, skew_ms: i64) -> Millis {
    let ms = EPOCH_MS as i64 + (now / MS) as i64 + skew_ms;
    Millis(ms.max(0) as u64)
}

/// The virtual time at which a clock `skew_ms` off reads `at`.
fn virtual_time(at: Millis, skew_ms: i64) -> Time {
    let ms = at.0 as i64 - EPOCH_MS as i64 - skew_ms;
    (ms.max(0) as u64).saturating_mul(MS)
}

impl Step<'_> {
    fn node(&self, n: u32) -> &Node {
        &self.shards[shard_of(n)].nodes[place_of(n)]
    }

    fn node_mut(&mut self, n: u32) -> &mut Node {
        &mut self.shards[shard_of(n)].nodes[place_of(n)]
    }

    /// Node `n`'s shard, to run what the node does.
    fn ctx(&mut self, n: u32) -> Ctx<'_> {
        let [a, b] = &mut self.shards;
        let (shard, other) = if shard_of(n) == 0 { (a, b) } else { (b, a) };
        Ctx {
            world: self.world,
            shard,
            other_live: Some(&other.live),
        }
    }

    /// `node`'s clock now.
    fn local(&self, n: u32) -> Millis {
        local_clock(self.g.now, self.node(n).skew_ms)
    }

    /// Schedules an event at a node (into its shard's queue).
    fn schedule(&mut self, at: Time, ev: Ev) {
        self.shards[shard_of(ev.home())].queue.push(at, ev);
    }

    /// Between two windows (`ran`: one just ran; `end`: the end of the run): closes the last
    /// one, runs the global events that come before any shard's next event, and opens the next
    /// window: its end, or `None` when the run is over.
    fn between(&mut self, end: Time, ran: bool) -> Option<Time> {
        if ran {
            self.close_window();
        }
        loop {
            let mut next = Time::MAX;
            for shard in &mut self.shards {
                let queued = shard.queue.peek().unwrap_or(Time::MAX);
                next = next.min(queued).min(shard.outbox.first);
            }
            let global = self.g.queue.peek().unwrap_or(Time::MAX);
            if next.min(global) > end {
                return None;
            }
            if global <= next {
                if let Some((at, ev)) = self.g.queue.pop() {
                    self.global_event(at, ev);
                }
                continue;
            }
            // What one shard sends in [next, next + L) cannot arrive before the window ends.
            let window_end = (next + self.world.net.min_latency())
                .min(global)
                .min(end + 1);
            let [a, b] = &mut self.shards;
            debug_assert!(a.inbox.is_empty() && b.inbox.is_empty());
            std::mem::swap(&mut a.outbox.items, &mut b.inbox);
            std::mem::swap(&mut b.outbox.items, &mut a.inbox);
            a.outbox.first = Time::MAX;
            b.outbox.first = Time::MAX;
            return Some(window_end);
        }
    }

    /// After a window: its events into the log (shard 0's, then shard 1's), the effects it
    /// left, a sweep when one is due, progress.
    fn close_window(&mut self) {
        self.g.windows += 1;
        let mut now = self.g.now;
        for shard in &mut self.shards {
            if shard.window_events > 0 {
                self.g.log_hash = mix(self.g.log_hash ^ shard.window_hash);
                self.g.events += shard.window_events;
                shard.window_events = 0;
                shard.window_hash = 0;
            }
            now = now.max(shard.now);
        }
        self.apply_effects();
        if now >= self.g.next_sweep {
            self.sweep();
            self.g.next_sweep = now + SWEEP;
        }
        self.progress(now);
    }

    fn global_event(&mut self, at: Time, ev: GlobalEv) {
        self.g.now = at;
        for shard in &mut self.shards {
            shard.now = at;
        }
        self.g.log_hash = mix(self.g.log_hash ^ ev.log_term(at));
        self.g.events += 1;
        match ev {
            GlobalEv::Join(n) => self.join(n),
            GlobalEv::Maintain(n) => self.maintain(n),
            GlobalEv::Churn(i) => self.churn(i),
            GlobalEv::ChurnOne(kind) => self.churn_one(kind),
            GlobalEv::Probe => self.probe(),
            GlobalEv::PartitionStart(i) => {
                let share = self.world.scenario.partitions[i].share;
                self.world.net.partition(share);
            }
            GlobalEv::PartitionHeal(_) => {
                self.world.net.heal();
                self.g.metrics.phase_started("heal", at);
            }
            GlobalEv::Arrival => self.arrival(),
            GlobalEv::Sample => self.sample(),
        }
        self.apply_effects();
        self.progress(at);
    }

    /// Applies the effects the shards left, in order of time, then of shard.
    fn apply_effects(&mut self) {
        if self.shards.iter().all(|s| s.effects.is_empty()) {
            return;
        }
        let mut effects = Vec::new();
        for shard in &mut self.shards {
            effects.append(&mut shard.effects);
        }
        // A stable sort: at the same time, shard 0's first, each in its order.
        effects.sort_by_key(|(at, _)| *at);
        for (at, effect) in effects {
            match effect {
                Effect::DropEdge { node, peer } => {
                    self.node_mut(node).mesh.retain(|(p, _)| *p != peer);
                }
                Effect::Reached { probe, holder } => {
                    for p in &mut self.g.probes {
                        if p.node == probe {
                            p.reached(holder, at);
                        }
                    }
                }
                Effect::ForgotDown => self.g.metrics.forgot_down_member(at),
            }
        }
    }

    /// Forgets the messages the shards published that no event, outbox, waiting publish or
    /// replay buffer holds any more: a message published again after that is new to every
    /// node. Done between windows, where the messages' counts stand still (a message a shard
    /// drops at the same time as the other publishes it again would otherwise be found or not
    /// by chance).
    fn sweep(&mut self) {
        for shard in &mut self.shards {
            shard.live.retain(|_, msg| Arc::strong_count(msg) > 1);
        }
    }

    fn progress(&mut self, now: Time) {
        if now < self.g.next_progress {
            return;
        }
        self.g.next_progress = now + SEC;
        if let Some(bar) = &self.g.progress {
            bar.set_position(now / SEC);
            bar.set_message(format!("{} events", self.g.events));
        }
        if self.g.plain_progress && (now / SEC).is_multiple_of(10) {
            eprintln!(
                "virtual {}/{} s, {} events, {:.0} s wall",
                now / SEC,
                self.world.scenario.duration_s as u64,
                self.g.events,
                self.g.started.elapsed().as_secs_f64()
            );
        }
    }

    fn populate(&mut self) -> anyhow::Result<()> {
        let n = self.world.scenario.nodes;
        let adv = self.world.scenario.adversaries.clone();
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
        let spread = (self.world.scenario.start.spread_s * SEC as f64) as Time;
        for role in roles {
            let node = self.add_node(role)?;
            let at = if spread == 0 {
                0
            } else {
                self.g.rng.below(spread)
            };
            self.g.queue.push(at, GlobalEv::Join(node));
        }
        let scenario = &self.world.scenario;
        for (i, churn) in scenario.churn.iter().enumerate() {
            self.g
                .queue
                .push((churn.at_s * SEC as f64) as Time, GlobalEv::Churn(i));
        }
        for (i, partition) in scenario.partitions.iter().enumerate() {
            self.g.queue.push(
                (partition.at_s * SEC as f64) as Time,
                GlobalEv::PartitionStart(i),
            );
            self.g.queue.push(
                (partition.heal_s * SEC as f64) as Time,
                GlobalEv::PartitionHeal(i),
            );
        }
        for at in &scenario.probes {
            self.g
                .queue
                .push((at * SEC as f64) as Time, GlobalEv::Probe);
        }
        if scenario.workload.rate_per_s > 0.0 {
            let start = (scenario.workload.start_s * SEC as f64) as Time;
            self.g.queue.push(start, GlobalEv::Arrival);
        }
        self.g.queue.push(0, GlobalEv::Sample);
        Ok(())
    }

    fn add_node(&mut self, role: Role) -> anyhow::Result<u32> {
        let index = u32::try_from(self.world.ids.len())?;
        let key = key_from(&mut self.g.rng);
        let id = key.node_id();
        self.world.net.add_node();
        let scenario = &self.world.scenario;
        let skew_max = scenario.network.clock_skew_ms;
        let skew_ms = if skew_max > 0.0 {
            ((unit(self.g.rng.next_u64()) * 2.0 - 1.0) * skew_max) as i64
        } else {
            0
        };
        let speeds = &scenario.workload.speeds;
        let total: f64 = speeds.iter().map(|s| s.share).sum();
        let mut draw = unit(self.g.rng.next_u64()) * total.max(f64::MIN_POSITIVE);
        let mut speed = speeds[0].tokens_per_s;
        for class in speeds {
            if draw < class.share {
                speed = class.tokens_per_s;
                break;
            }
            draw -= class.share;
        }
        let certificate = match scenario.admission {
            AdmissionKind::Open => None,
            AdmissionKind::Certificates => Some(Signed::sign(
                MembershipCertificate {
                    domain: self.world.manifest.payload.id(),
                    member: id,
                    issued_at: EPOCH_MS / 1000 - 3600,
                    expires_at: EPOCH_MS / 1000 + 30 * 86_400,
                    serial: u64::from(index) + 1,
                },
                &self.g.operator,
            )?),
        };
        let heartbeat_ms = scenario.membership.heartbeat_ms;
        let config = membership::Config {
            heartbeat_ms,
            jitter_ms: (heartbeat_ms / 10).max(1),
            max_members: scenario.membership.max_members,
            max_clock_skew_secs: scenario.membership.max_clock_skew_s,
            max_adverts_per_s: scenario.membership.max_adverts_per_s,
            ..membership::Config::default()
        };
        let seed = mix(scenario.seed ^ mix(u64::from(index)));
        let membership = Membership::new(config, self.world.manifest.clone(), key, seed)?;
        let advertised = match role {
            Role::Sybil | Role::LoadLiar => 1_000.0,
            _ => speed,
        };
        let service = LocalService {
            model_name: "simulated-model".into(),
            model_hash: self.g.model,
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
            uplink_free: 0,
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
            last_regossip: 0,
        };
        let shard = &mut self.shards[shard_of(index)];
        debug_assert_eq!(shard.nodes.len(), place_of(index));
        shard.nodes.push(node);
        self.world.index.insert(id, index);
        self.world.ids.push(id);
        self.world.roles.push(role);
        self.world.up.push(false);
        self.world.mesh_ready_at.push(0);
        self.g.up_pos.push(usize::MAX);
        Ok(index)
    }

    // ---- nodes coming and going ----------------------------------------------------------

    fn join(&mut self, n: u32) {
        let now = self.g.now;
        let node = self.node_mut(n);
        if node.joined {
            return;
        }
        node.joined = true;
        self.world.up[n as usize] = true;
        self.world.mesh_ready_at[n as usize] =
            now + (self.world.scenario.network.mesh_delay_ms * MS as f64) as Time;
        self.g.up_pos[n as usize] = self.g.up_list.len();
        self.g.up_list.push(n);
        let role = self.world.roles[n as usize];
        if role.follows_gossip() {
            self.g.followers_up += 1;
        }
        self.repair_mesh(n);
        let certificate = self.node(n).certificate.clone();
        let service = self.node(n).service.clone();
        let mut ctx = self.ctx(n);
        if let Some(certificate) = certificate {
            ctx.membership_event(
                n,
                MEvent::CertificateReceived {
                    from: None,
                    certificate,
                },
            );
        }
        ctx.membership_event(n, MEvent::LocalAdvertChanged(Some(service)));
        self.ask_snapshot(n);
        let heartbeat = self.world.heartbeat();
        let phase = self.g.rng.below(heartbeat);
        self.g.queue.push(now + phase + 1, GlobalEv::Maintain(n));
        if role == Role::CertificateFlooder {
            self.schedule(now + 100 * MS, Ev::FloodCertificate(n));
        }
    }

    /// Takes `n` down: crashed (`leave` false) or after a last advert (`leave` true).
    fn take_down(&mut self, n: u32, leave: bool) {
        if !self.world.up[n as usize] {
            return;
        }
        let now = self.g.now;
        if leave {
            self.ctx(n)
                .membership_event(n, MEvent::LocalAdvertChanged(None));
        }
        self.world.up[n as usize] = false;
        let follows = self.world.roles[n as usize].follows_gossip();
        if follows {
            self.g.followers_up -= 1;
        }
        let pos = self.g.up_pos[n as usize];
        self.g.up_list.swap_remove(pos);
        if let Some(moved) = self.g.up_list.get(pos).copied() {
            self.g.up_pos[moved as usize] = pos;
        }
        self.g.up_pos[n as usize] = usize::MAX;
        for probe in &mut self.g.probes {
            probe.reached(n, now);
        }
        // Whoever holds it no longer holds an up member.
        let id = self.world.ids[n as usize];
        let mut holders = 0;
        for other in 0..self.world.ids.len() as u32 {
            let holds = self
                .node(other)
                .membership
                .as_ref()
                .is_some_and(|m| m.member(&id).is_some());
            if holds && self.world.up[other as usize] {
                let node = self.node_mut(other);
                if follows {
                    node.known_up = node.known_up.saturating_sub(1);
                } else {
                    node.known_other = node.known_other.saturating_sub(1);
                }
                holders += 1;
            }
        }
        // What it held of nodes already down no longer counts as held.
        let held_down = self.node(n).membership.as_ref().map_or(0, |m| {
            m.members()
                .filter(|member| {
                    self.world
                        .index
                        .get(&member.node())
                        .is_some_and(|i| !self.world.up[*i as usize])
                })
                .count() as u64
        });
        self.g.metrics.went_down(holders, held_down, now);
        // Its streams break: the entry nodes see the connection close.
        let node = self.node_mut(n);
        let jobs: Vec<Job> = node
            .running
            .drain(..)
            .map(|(job, _)| job)
            .chain(node.queue.drain(..))
            .collect();
        node.mesh.clear();
        node.membership = None;
        for job in jobs {
            let requests = &mut self.shards[shard_of(job.entry)].requests;
            if let Some(req) = requests.get_mut(&job.request) {
                req.hit_by_crash = !leave;
            }
            if job.entry == n {
                continue;
            }
            let event = failover::Event::AttemptFailed {
                attempt: job.attempt,
                error: AttemptError::Broken("the connection closed".into()),
            };
            let uplink = &mut self.shards[shard_of(n)].nodes[place_of(n)].uplink_free;
            if let Some(at) = self
                .world
                .net
                .rpc(uplink, now, n, job.entry, STREAM_FRAME_BYTES)
            {
                self.schedule(
                    at,
                    Ev::ToEntry {
                        request: job.request,
                        entry: job.entry,
                        event: Box::new(event),
                    },
                );
            }
        }
        // Requests it entered die with it.
        let requests = &mut self.shards[shard_of(n)].requests;
        let lost: Vec<u32> = requests
            .iter()
            .filter(|(_, r)| r.entry == n)
            .map(|(r, _)| *r)
            .collect();
        for r in lost {
            requests.remove(&r);
            self.g.metrics.counters().request_lost_with_entry();
        }
    }

    fn churn(&mut self, i: usize) {
        let churn = self.world.scenario.churn[i].clone();
        let count = if churn.count > 0 {
            churn.count
        } else {
            let honest_up = self
                .g
                .up_list
                .iter()
                .filter(|n| self.world.roles[**n as usize] == Role::Honest)
                .count();
            (honest_up as f64 * churn.share).round() as u32
        };
        let over = (churn.over_s * SEC as f64) as Time;
        let now = self.g.now;
        for _ in 0..count {
            let at = if over == 0 {
                now
            } else {
                now + self.g.rng.below(over)
            };
            self.g.queue.push(at, GlobalEv::ChurnOne(churn.kind));
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
                let mut honest: Vec<u32> = self
                    .g
                    .up_list
                    .iter()
                    .copied()
                    .filter(|n| self.world.roles[*n as usize] == Role::Honest)
                    .collect();
                if honest.len() > 1 {
                    honest.sort_unstable();
                    let n = honest[self.g.rng.index(honest.len())];
                    self.take_down(n, kind == ChurnKind::Leave);
                    if kind == ChurnKind::Crash {
                        self.world.crashed_at.insert(n, self.g.now);
                    }
                }
            }
        }
    }

    /// A newcomer joins, and how long until the tables that should hold it do is measured.
    fn probe(&mut self) {
        let Ok(node) = self.add_node(Role::Honest) else {
            return;
        };
        let id = self.world.ids[node as usize];
        let waiting = self
            .g
            .up_list
            .iter()
            .copied()
            .filter(|&n| {
                self.world.roles[n as usize].follows_gossip()
                    && self
                        .node(n)
                        .membership
                        .as_ref()
                        .is_some_and(|m| m.would_keep(&id))
            })
            .collect();
        self.g.probes.push(Probe {
            node,
            joined: self.g.now,
            done: None,
            waiting,
        });
        self.world.probe_nodes.push(node);
        self.join(node);
    }

    /// Keeps `n`'s mesh at `mesh_degree` up peers (gossipsub's heartbeat grafts).
    fn repair_mesh(&mut self, n: u32) {
        let degree = self.world.scenario.network.mesh_degree;
        let high = degree * 2;
        let mut mesh = std::mem::take(&mut self.node_mut(n).mesh);
        let now_local = self.local(n);
        mesh.retain(|(p, _)| self.world.up[*p as usize]);
        let mut tries = 0;
        let mut flush = Vec::new();
        while mesh.len() < degree && tries < degree * 4 && self.g.up_list.len() > 1 {
            tries += 1;
            let p = self.g.up_list[self.g.rng.index(self.g.up_list.len())];
            if p == n || mesh.iter().any(|(q, _)| *q == p) || self.node(p).mesh.len() >= high {
                continue;
            }
            let banned = self
                .node(n)
                .guard
                .is_banned(&self.world.ids[p as usize], now_local)
                || self
                    .node(p)
                    .guard
                    .is_banned(&self.world.ids[n as usize], self.local(p));
            if banned {
                continue;
            }
            let latency = self.world.net.base_latency(n, p);
            mesh.push((p, latency));
            let peer = self.node_mut(p);
            peer.mesh.push((n, latency));
            if peer.pending_publish.is_some() {
                flush.push(p);
            }
        }
        let has_peers = !mesh.is_empty();
        let node = self.node_mut(n);
        node.mesh = mesh;
        if has_peers && node.pending_publish.is_some() {
            flush.push(n);
        }
        for node in flush {
            self.ctx(node).flush_publish(node);
        }
    }

    fn maintain(&mut self, n: u32) {
        if !self.world.up[n as usize] {
            return;
        }
        let now = self.g.now;
        let heartbeat = self.world.heartbeat();
        self.g.queue.push(now + heartbeat, GlobalEv::Maintain(n));
        let now_local = self.local(n);
        self.node_mut(n).guard.expire(now_local);
        self.repair_mesh(n);
        if !self.node(n).snapshot_done {
            self.ask_snapshot(n);
        }
        let regossip = REGOSSIP_MIN.max(5 * heartbeat);
        if now >= self.node(n).last_regossip + regossip {
            self.node_mut(n).last_regossip = now;
            let manifest = GossipMessage::Manifest(self.world.manifest.clone());
            self.ctx(n).publish(n, manifest);
        }
        if self.world.roles[n as usize] == Role::Replayer {
            self.ctx(n).replay(n);
        }
    }

    /// `n` asks a random mesh peer for the member table.
    fn ask_snapshot(&mut self, n: u32) {
        let peers = self.node(n).mesh.len();
        if peers == 0 {
            return;
        }
        let i = self.g.rng.index(peers);
        let (peer, _) = self.node(n).mesh[i];
        self.ctx(n).send_snapshot_ask(n, peer, None);
    }

    // ---- requests ------------------------------------------------------------------------

    fn arrival(&mut self) {
        let now = self.g.now;
        let workload = &self.world.scenario.workload;
        let gap = -unit(self.g.rng.next_u64()).ln() / workload.rate_per_s;
        self.g
            .queue
            .push(now + (gap * SEC as f64) as Time + 1, GlobalEv::Arrival);
        // Entry nodes are honest nodes that are up (a client talks to a node it trusts).
        let mut tries = 0;
        let entry = loop {
            tries += 1;
            if self.g.up_list.is_empty() || tries > 64 {
                return;
            }
            let n = self.g.up_list[self.g.rng.index(self.g.up_list.len())];
            if self.world.roles[n as usize] == Role::Honest {
                break n;
            }
        };
        let request = self.g.next_request;
        self.g.next_request += 1;
        let machine = failover::Request::new(failover::Config {
            first_token_timeout_ms: workload.first_token_timeout_ms,
            stall_timeout_ms: workload.stall_timeout_ms,
            ..failover::Config::default()
        });
        self.shards[shard_of(entry)].requests.insert(
            request,
            Req {
                entry,
                machine,
                started: now,
                wake_at: None,
                finished: false,
                hit_by_crash: false,
            },
        );
        self.g.metrics.counters().request_started();
        self.ctx(entry)
            .request_event(request, failover::Event::Start);
    }

    // ---- metrics -------------------------------------------------------------------------

    fn sample(&mut self) {
        let now = self.g.now;
        let sample = self.world.scenario.sample_ms * MS;
        self.g.queue.push(now + sample, GlobalEv::Sample);
        for shard in &mut self.shards {
            self.g.metrics.counters().take_from(&mut shard.counters);
        }
        let up = self.g.up_list.len() as u32;
        // Tables should hold every node up that follows the gossip protocol.
        let expected = self.g.followers_up as u32;
        // A table is complete when it holds them all, or is full of members that are up (in a
        // domain larger than the tables).
        let room = self.world.scenario.membership.max_members as u32;
        let mut complete = Vec::with_capacity(self.g.up_list.len());
        let mut members = 0u64;
        for &n in &self.g.up_list {
            if !self.world.roles[n as usize].follows_gossip() {
                continue;
            }
            let node = self.node(n);
            members += u64::from(node.known_up);
            let full = node.known_up + node.known_other >= room;
            complete.push((n, node.known_up + 1 >= expected || full));
        }
        let bytes: u64 = self
            .shards
            .iter()
            .flat_map(|s| &s.nodes)
            .map(|n| n.bytes_sent)
            .sum();
        self.g.metrics.sample(now, up, &complete, members, bytes);
    }
}

impl Ctx<'_> {
    fn node(&self, n: u32) -> &Node {
        debug_assert_eq!(
            shard_of(n),
            self.shard.index,
            "node {n} is not this shard's"
        );
        &self.shard.nodes[place_of(n)]
    }

    fn node_mut(&mut self, n: u32) -> &mut Node {
        debug_assert_eq!(
            shard_of(n),
            self.shard.index,
            "node {n} is not this shard's"
        );
        &mut self.shard.nodes[place_of(n)]
    }

    /// `node`'s clock now.
    fn local(&self, n: u32) -> Millis {
        local_clock(self.shard.now, self.node(n).skew_ms)
    }

    /// The virtual time at which `node`'s clock reads `at`.
    fn virtual_of(&self, n: u32, at: Millis) -> Time {
        virtual_time(at, self.node(n).skew_ms)
    }

    /// Schedules an event: in this shard's queue if its node is this shard's, else in the
    /// outbox (it crosses the network, so it comes a window later at the earliest).
    fn schedule(&mut self, at: Time, ev: Ev) {
        if shard_of(ev.home()) == self.shard.index {
            self.shard.queue.push(at, ev);
        } else {
            assert!(
                at >= self.shard.now + self.world.net.min_latency(),
                "an event for another shard's node sooner than the least link latency: {ev:?}"
            );
            self.shard.outbox.push(Outgoing::Event { at, ev });
        }
    }

    /// Runs the shard's window up to `end` (excluded): takes in what the other shard sent in
    /// the previous one, then runs its events.
    fn window(&mut self, end: Time) {
        let mut inbox = std::mem::take(&mut self.shard.inbox);
        for item in inbox.drain(..) {
            match item {
                Outgoing::Event { at, ev } => self.shard.queue.push(at, ev),
                Outgoing::Copy {
                    sent,
                    at,
                    to,
                    from,
                    msg,
                } => self.receive_copy(sent, at, to, from, msg),
            }
        }
        self.shard.inbox = inbox;
        let (mut hash, mut events) = (0, 0);
        while let Some((at, ev)) = self.shard.queue.pop_before(end) {
            self.shard.now = at;
            hash = mix(hash ^ ev.log_term(at));
            events += 1;
            self.handle(ev);
        }
        self.shard.window_hash = hash;
        self.shard.window_events = events;
    }

    fn handle(&mut self, ev: Ev) {
        let now = self.shard.now;
        match ev {
            Ev::Tick(n) => {
                if self.node(n).tick_at == Some(now) {
                    self.node_mut(n).tick_at = None;
                    self.membership_event(n, MEvent::Tick);
                }
            }
            Ev::Gossip { to, from, msg } => self.deliver_gossip(to, from, &msg),
            Ev::SnapshotAsk { to, from, after } => {
                self.answer_snapshot(to, from, after.map(|after| *after));
            }
            Ev::SnapshotPage { to, from, page } => self.take_snapshot(to, from, *page),
            Ev::StreamOpen { job, at_node } => self.stream_open(at_node, job),
            Ev::JobFirstToken { node, job } => self.job_first_token(node, job),
            Ev::JobDone { node, job } => self.job_done(node, job),
            Ev::ToEntry { request, event, .. } => self.request_event(request, *event),
            Ev::Cancel { node, job } => self.cancel_job(node, job),
            Ev::RequestWake { request, .. } => {
                if let Some(req) = self.shard.requests.get_mut(&request)
                    && req.wake_at == Some(now)
                {
                    req.wake_at = None;
                    self.request_event(request, failover::Event::Tick);
                }
            }
            Ev::FloodCertificate(n) => self.flood_certificate(n),
            Ev::FlushPublish(n) => self.flush_publish(n),
        }
    }

    /// Publishes `n`'s message that waited for a peer, if it has one now.
    fn flush_publish(&mut self, n: u32) {
        if !self.world.up[n as usize] {
            return;
        }
        if let Some(msg) = self.node_mut(n).pending_publish.take() {
            self.forward(n, None, &msg);
        }
    }

    /// `a` (this shard's) drops `b` from its mesh, and `b` drops `a`: at once if `b` is this
    /// shard's too, else between windows.
    fn drop_edge(&mut self, a: u32, b: u32) {
        self.node_mut(a).mesh.retain(|(p, _)| *p != b);
        if shard_of(b) == self.shard.index {
            self.node_mut(b).mesh.retain(|(p, _)| *p != a);
        } else {
            let now = self.shard.now;
            self.shard
                .effects
                .push((now, Effect::DropEdge { node: b, peer: a }));
        }
    }

    fn send_snapshot_ask(&mut self, n: u32, peer: u32, after: Option<NodeId>) {
        let (world, now) = (self.world, self.shard.now);
        let node = self.node_mut(n);
        node.bytes_sent += u64::from(CONTROL_REQUEST_BYTES);
        if let Some(at) = world
            .net
            .rpc(&mut node.uplink_free, now, n, peer, CONTROL_REQUEST_BYTES)
        {
            self.schedule(
                at,
                Ev::SnapshotAsk {
                    to: peer,
                    from: n,
                    after: after.map(Box::new),
                },
            );
        }
    }

    fn answer_snapshot(&mut self, to: u32, from: u32, after: Option<NodeId>) {
        let (world, now) = (self.world, self.shard.now);
        if !world.up[to as usize] {
            return;
        }
        let now_local = self.local(to);
        let asker = world.ids[from as usize];
        let node = self.node_mut(to);
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
        let node = self.node_mut(to);
        node.bytes_sent += u64::from(bytes);
        if let Some(at) = world.net.rpc(&mut node.uplink_free, now, to, from, bytes) {
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
        if !self.world.up[to as usize] {
            return;
        }
        match page {
            ControlResponse::Members {
                domain,
                members,
                next,
            } => {
                if next.is_none() {
                    self.node_mut(to).snapshot_done = true;
                }
                let from_id = self.world.ids[from as usize];
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
        let node = self.node_mut(n);
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
        let Some(wake) = self
            .node(n)
            .membership
            .as_ref()
            .and_then(Membership::next_wakeup)
        else {
            return;
        };
        let at = self.virtual_of(n, wake).max(self.shard.now);
        let node = self.node_mut(n);
        if node.tick_at.is_none_or(|t| at < t) {
            node.tick_at = Some(at);
            self.schedule(at, Ev::Tick(n));
        }
    }

    fn run_membership_actions(&mut self, n: u32, actions: Vec<MAction>) {
        for action in actions {
            self.node_mut(n).guard.on_membership_action(&action);
            match action {
                MAction::Publish(entry) => self.publish(n, GossipMessage::Advert(entry)),
                MAction::RequestSnapshot { peer, after } => {
                    if let Some(&p) = self.world.index.get(&peer) {
                        self.send_snapshot_ask(n, p, after);
                    }
                }
                MAction::MemberJoined { node, routable } => self.count_join(n, node, routable),
                MAction::MemberLeft { node, .. } => self.count_leave(n, node),
                MAction::MemberUpdated { .. } => {}
                MAction::Penalise { peer, reason } => {
                    let now_local = self.local(n);
                    self.node_mut(n)
                        .guard
                        .penalise(peer, reason.to_string(), now_local);
                    self.run_guard_actions(n);
                }
                MAction::LocalStatusChanged(_) | MAction::ManifestUpdated { .. } => {}
            }
        }
    }

    fn count_join(&mut self, n: u32, member: NodeId, routable: bool) {
        let world = self.world;
        let Some(&m) = world.index.get(&member) else {
            return;
        };
        if !world.up[m as usize] {
            return;
        }
        let node = self.node_mut(n);
        if world.roles[m as usize].follows_gossip() {
            node.known_up += 1;
        } else {
            node.known_other += 1;
        }
        if routable && world.probe_nodes.contains(&m) {
            let now = self.shard.now;
            self.shard.effects.push((
                now,
                Effect::Reached {
                    probe: m,
                    holder: n,
                },
            ));
        }
    }

    fn count_leave(&mut self, n: u32, member: NodeId) {
        let world = self.world;
        let Some(&m) = world.index.get(&member) else {
            return;
        };
        if world.up[m as usize] {
            let follows = world.roles[m as usize].follows_gossip();
            let node = self.node_mut(n);
            if follows {
                node.known_up = node.known_up.saturating_sub(1);
            } else {
                node.known_other = node.known_other.saturating_sub(1);
            }
        } else if world.up[n as usize] {
            let now = self.shard.now;
            self.shard.effects.push((now, Effect::ForgotDown));
        }
    }

    fn run_guard_actions(&mut self, n: u32) {
        for action in self.node_mut(n).guard.take_actions() {
            match action {
                GuardAction::Penalised { node, reason, .. } => {
                    let role = self.world.role_of(&node);
                    self.shard.counters.penalised(role, &reason);
                }
                GuardAction::Banned { node, .. } => {
                    let role = self.world.role_of(&node);
                    self.shard.counters.banned(role);
                    if let Some(&b) = self.world.index.get(&node) {
                        self.drop_edge(n, b);
                    }
                }
            }
        }
    }

    // ---- gossip --------------------------------------------------------------------------

    /// `n` publishes `message`. The same bytes published again while the message is about
    /// (the manifest, re-gossiped by every node) are the same message: found among this
    /// shard's published messages, or between windows among the other's.
    fn publish(&mut self, n: u32, message: GossipMessage) {
        let Ok(bytes) = message.encode() else {
            return;
        };
        let id = hash_bytes(&bytes);
        let (world, now) = (self.world, self.shard.now);
        let known = self
            .shard
            .live
            .get(&id)
            .or_else(|| self.other_live.and_then(|live| live.get(&id)));
        let msg = match known {
            Some(msg) => Arc::clone(msg),
            None => {
                let bytes = bytes.len() as u32 + world.scenario.network.frame_overhead;
                let msg = Arc::new(Msg::new(id, bytes, message, now, world.places));
                self.shard.live.insert(id, Arc::clone(&msg));
                msg
            }
        };
        if !msg.mark_seen(self.shard.index, place_of(n), now, world.seen_ttl) {
            // This node sent or relayed the same bytes within the cache's lifetime: gossipsub
            // drops a duplicate publish.
            return;
        }
        self.forward(n, None, &msg);
    }

    fn forward(&mut self, n: u32, except: Option<u32>, msg: &Arc<Msg>) {
        let (world, now) = (self.world, self.shard.now);
        let ready_at = world.mesh_ready_at[n as usize];
        if except.is_none() {
            let has_peer = ready_at <= now
                && self
                    .node(n)
                    .mesh
                    .iter()
                    .any(|&(p, _)| world.mesh_ready_at[p as usize] <= now);
            if !has_peer {
                // Its own message, and no peer to take it (its mesh has not formed, or it is
                // the first node up): it waits, as the node keeps an advert that no peer
                // could take and publishes it when a peer subscribes.
                self.node_mut(n).pending_publish = Some(Arc::clone(msg));
                if ready_at > now {
                    self.schedule(ready_at, Ev::FlushPublish(n));
                }
                return;
            }
        }
        if ready_at > now {
            return;
        }
        let ttl = world.seen_ttl;
        let here = self.shard.index;
        let Shard {
            nodes,
            queue,
            rng,
            counters,
            outbox,
            ..
        } = &mut *self.shard;
        let node = &mut nodes[place_of(n)];
        for i in 0..node.mesh.len() {
            let (peer, base_latency) = node.mesh[i];
            if Some(peer) == except || world.mesh_ready_at[peer as usize] > now {
                continue;
            }
            node.bytes_sent += u64::from(msg.bytes);
            counters.gossip_sent(u64::from(msg.bytes));
            let left = world
                .net
                .transmit(rng, &mut node.uplink_free, now, n, peer, msg.bytes);
            if shard_of(peer) != here {
                // The receiver's duplicate cache is the other shard's: checked when it takes
                // the copy in.
                let at = left.map(|left| left + base_latency + world.net.jitter(rng));
                outbox.push(Outgoing::Copy {
                    sent: now,
                    at,
                    to: peer,
                    from: n,
                    msg: Arc::clone(msg),
                });
                continue;
            }
            let place = place_of(peer);
            if msg.holds(here, place, now, ttl) {
                counters.duplicate();
                continue;
            }
            if let Some(left) = left {
                let at = left + base_latency + world.net.jitter(rng);
                if !msg.claim(here, place, now, at) {
                    counters.duplicate();
                    continue;
                }
                queue.push(
                    at,
                    Ev::Gossip {
                        to: peer,
                        from: n,
                        msg: Arc::clone(msg),
                    },
                );
            }
        }
    }

    /// A copy from a node of the other shard, sent at `sent` and arriving at `at` (`None`:
    /// lost), checked against its receiver's duplicate cache as [`forward`](Self::forward)
    /// checks a copy within the shard.
    fn receive_copy(&mut self, sent: Time, at: Option<Time>, to: u32, from: u32, msg: Arc<Msg>) {
        let (here, place) = (self.shard.index, place_of(to));
        if msg.holds(here, place, sent, self.world.seen_ttl) {
            self.shard.counters.duplicate();
            return;
        }
        if let Some(at) = at {
            if !msg.claim(here, place, sent, at) {
                self.shard.counters.duplicate();
                return;
            }
            self.shard.queue.push(at, Ev::Gossip { to, from, msg });
        }
    }

    fn deliver_gossip(&mut self, to: u32, from: u32, msg: &Arc<Msg>) {
        let (world, now) = (self.world, self.shard.now);
        if !world.up[to as usize] || self.node(to).membership.is_none() {
            return;
        }
        let now_local = self.local(to);
        let from_id = world.ids[from as usize];
        if self.node(to).guard.is_banned(&from_id, now_local) {
            return;
        }
        if !msg.mark_seen(self.shard.index, place_of(to), now, world.seen_ttl) {
            self.shard.counters.duplicate();
            return;
        }
        let node = self.node_mut(to);
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
            !actions.is_empty() || matches!(world.scenario.admission, AdmissionKind::Certificates);
        self.run_membership_actions(to, actions);
        if may_be_sooner {
            self.reschedule_tick(to);
        }
        self.shard.counters.verdict(&outcome.verdict);
        if outcome.verdict == Verdict::Accept {
            if world.roles[to as usize] == Role::Replayer
                && matches!(msg.message, GossipMessage::Advert(_))
            {
                let buffer = &mut self.node_mut(to).replay_buffer;
                if buffer.len() < 256 {
                    buffer.push_back((now, Arc::clone(msg)));
                }
            }
            self.forward(to, Some(from), msg);
        }
    }

    /// A replayer re-sends adverts it saw once they are older than the acceptance window
    /// (younger replays are only stale copies, ignored without harm).
    fn replay(&mut self, n: u32) {
        let (world, now) = (self.world, self.shard.now);
        let tuning = &world.scenario.membership;
        let window =
            world.scenario.effective_heartbeat_ms() * 3 * MS + 2 * tuning.max_clock_skew_s * SEC;
        let after = world.seen_ttl.max(window) + 2 * SEC;
        let mut due = Vec::new();
        let buffer = &mut self.node_mut(n).replay_buffer;
        while let Some((at, _)) = buffer.front() {
            if *at + after > now {
                break;
            }
            if let Some((_, msg)) = buffer.pop_front() {
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
        if !self.world.up[n as usize] {
            return;
        }
        if let Some(certificate) = self.node(n).certificate.clone() {
            let sent_at = self.local(n).0;
            self.publish(
                n,
                GossipMessage::Certificate {
                    certificate,
                    sent_at,
                },
            );
        }
        let now = self.shard.now;
        self.schedule(now + 100 * MS, Ev::FloodCertificate(n));
    }

    // ---- requests ------------------------------------------------------------------------

    fn request_event(&mut self, r: u32, event: failover::Event) {
        let (world, now) = (self.world, self.shard.now);
        let Some(req) = self.shard.requests.get(&r) else {
            // It ended (or died with its entry node).
            return;
        };
        let entry = req.entry;
        if !world.up[entry as usize] {
            return;
        }
        let now_local = self.local(entry);
        let mut actions = Vec::new();
        {
            let Shard {
                requests, nodes, ..
            } = &mut *self.shard;
            let Some(req) = requests.get_mut(&r) else {
                return;
            };
            let node = &mut nodes[place_of(entry)];
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
                    self.dispatch(r, entry, attempt, node);
                }
                failover::Action::Cancel { attempt, node } => {
                    if let Some(&target) = world.index.get(&node) {
                        let job = Job {
                            request: r,
                            attempt,
                            entry,
                        };
                        let uplink = &mut self.node_mut(entry).uplink_free;
                        if let Some(at) =
                            world
                                .net
                                .rpc(uplink, now, entry, target, STREAM_FRAME_BYTES)
                        {
                            self.schedule(at, Ev::Cancel { node: target, job });
                        }
                    }
                }
                failover::Action::Observe(observation) => {
                    self.node_mut(entry).router.observe(now_local, observation);
                    if let Observation::Succeeded { node: served } = observation {
                        self.membership_event(entry, MEvent::Served(served));
                    }
                }
                failover::Action::EmitToClient(_) => {}
                failover::Action::Finish { node, attempts, .. } => {
                    let Some(req) = self.shard.requests.get_mut(&r) else {
                        continue;
                    };
                    req.finished = true;
                    let latency = now - req.started;
                    let hit = req.hit_by_crash;
                    if let Some(&i) = world.index.get(&node) {
                        let served = &mut self.shard.served;
                        if served.len() <= i as usize {
                            served.resize(world.ids.len(), 0);
                        }
                        served[i as usize] += 1;
                    }
                    let role = world.role_of(&node);
                    self.shard
                        .counters
                        .request_done(latency, attempts, role, hit);
                }
                failover::Action::FailWithError(_) => {
                    let Some(req) = self.shard.requests.get_mut(&r) else {
                        continue;
                    };
                    req.finished = true;
                    let hit = req.hit_by_crash;
                    self.shard.counters.request_failed(hit);
                }
            }
        }
        let Some(req) = self.shard.requests.get(&r) else {
            return;
        };
        if req.finished {
            self.shard.requests.remove(&r);
            return;
        }
        let Some(wake) = req.machine.next_wakeup() else {
            return;
        };
        let at = self.virtual_of(entry, wake).max(now);
        let Some(req) = self.shard.requests.get_mut(&r) else {
            return;
        };
        if req.wake_at.is_none_or(|t| at < t) {
            req.wake_at = Some(at);
            self.schedule(at, Ev::RequestWake { request: r, entry });
        }
    }

    fn dispatch(&mut self, r: u32, entry: u32, attempt: u32, node: NodeId) {
        let (world, now) = (self.world, self.shard.now);
        let Some(&target) = world.index.get(&node) else {
            return;
        };
        let crashed = world.crashed_at.get(&target).copied();
        self.shard
            .counters
            .dispatched(world.roles[target as usize], now, crashed);
        let job = Job {
            request: r,
            attempt,
            entry,
        };
        if target == entry {
            self.stream_open(target, job);
            return;
        }
        let reachable = world.up[target as usize] && world.net.connected(entry, target);
        let uplink = &mut self.node_mut(entry).uplink_free;
        match reachable.then(|| {
            world
                .net
                .rpc(uplink, now, entry, target, STREAM_REQUEST_BYTES)
        }) {
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
                    now + CONNECT_TIMEOUT,
                    Ev::ToEntry {
                        request: r,
                        entry,
                        event: Box::new(event),
                    },
                );
            }
        }
    }

    fn stream_open(&mut self, n: u32, job: Job) {
        if !self.world.up[n as usize] {
            return;
        }
        if self.world.roles[n as usize] == Role::Sybil {
            // Holds the stream and never answers.
            return;
        }
        let concurrency = self.world.scenario.workload.concurrency as usize;
        let node = self.node_mut(n);
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
        let (workload, now) = (&self.world.scenario.workload, self.shard.now);
        let node = self.node_mut(n);
        let prefill = (workload.prefill_ms * MS as f64) as Time;
        let decode = (f64::from(workload.tokens) / node.speed * SEC as f64) as Time;
        let done_at = now + prefill + decode;
        node.running.push((job, done_at));
        self.schedule(now + prefill, Ev::JobFirstToken { node: n, job });
        self.schedule(done_at, Ev::JobDone { node: n, job });
        self.update_load(n);
    }

    fn is_running(&self, n: u32, job: Job) -> bool {
        self.node(n)
            .running
            .iter()
            .any(|(j, _)| j.request == job.request && j.attempt == job.attempt)
    }

    fn job_first_token(&mut self, n: u32, job: Job) {
        if !self.world.up[n as usize] || !self.is_running(n, job) {
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
        if !self.world.up[n as usize] || !self.is_running(n, job) {
            return;
        }
        let tokens = self.world.scenario.workload.tokens;
        let event = failover::Event::StreamEnded {
            attempt: job.attempt,
            usage: Usage {
                prompt_tokens: 100,
                completion_tokens: tokens,
            },
            cached_tokens: 0,
            finish_reason: FinishReason::Stop,
            receipt: None,
        };
        self.send_to_entry(n, job, event);
        self.end_job(n, job);
    }

    fn cancel_job(&mut self, n: u32, job: Job) {
        let node = self.node_mut(n);
        node.queue
            .retain(|j| !(j.request == job.request && j.attempt == job.attempt));
        self.end_job(n, job);
    }

    fn end_job(&mut self, n: u32, job: Job) {
        let concurrency = self.world.scenario.workload.concurrency as usize;
        let node = self.node_mut(n);
        node.running
            .retain(|(j, _)| !(j.request == job.request && j.attempt == job.attempt));
        if node.running.len() < concurrency
            && let Some(next) = node.queue.pop_front()
        {
            self.start_job(n, next);
        } else {
            self.update_load(n);
        }
    }

    fn send_to_entry(&mut self, n: u32, job: Job, event: failover::Event) {
        let (world, now) = (self.world, self.shard.now);
        let at = if job.entry == n {
            Some(now)
        } else {
            let uplink = &mut self.node_mut(n).uplink_free;
            world.net.rpc(uplink, now, n, job.entry, STREAM_FRAME_BYTES)
        };
        if let Some(at) = at {
            self.schedule(
                at,
                Ev::ToEntry {
                    request: job.request,
                    entry: job.entry,
                    event: Box::new(event),
                },
            );
        }
    }

    /// Tells the membership machine the node's load (published with the next heartbeat).
    fn update_load(&mut self, n: u32) {
        let role = self.world.roles[n as usize];
        if role == Role::LoadLiar || role == Role::Sybil {
            return;
        }
        let node = self.node_mut(n);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Nodes added in order fill each shard's arrays in order, in blocks, half to each.
    #[test]
    fn nodes_fill_the_shards_in_order() {
        let mut places = [0usize; SHARDS];
        for n in 0..10_000u32 {
            let shard = shard_of(n);
            assert_eq!(place_of(n), places[shard], "node {n}");
            places[shard] += 1;
            assert_eq!(shard, (n / BLOCK) as usize % SHARDS);
        }
        assert!(places[0].abs_diff(places[1]) <= BLOCK as usize);
    }

    /// A copy that would arrive after one already on its way is a duplicate, one that comes
    /// first replaces it; a node that has seen the message holds it until the cache forgets;
    /// each shard's nodes have their own slots.
    #[test]
    fn copies_keep_the_earliest_arrival_and_the_duplicate_cache() {
        let scenario = Scenario {
            nodes: 2,
            ..Scenario::default()
        };
        let manifest = Sim::new(scenario, false).expect("sets up").world.manifest;
        let msg = Msg::new(1, 100, GossipMessage::Manifest(manifest), 1000, [4, 3]);
        let ttl = 10 * SEC;
        assert!(!msg.holds(0, 2, 1000, ttl));
        assert!(msg.claim(0, 2, 1000, 50_000));
        // Later than the one on its way: a duplicate; earlier: it takes its place.
        assert!(!msg.claim(0, 2, 2000, 60_000));
        assert!(msg.claim(0, 2, 2000, 40_000));
        // Once that arrival is past, a new copy is filed again.
        assert!(msg.claim(0, 2, 45_000, 90_000));
        assert!(msg.mark_seen(0, 2, 90_000, ttl));
        assert!(msg.holds(0, 2, 95_000, ttl));
        assert!(!msg.mark_seen(0, 2, 95_000, ttl));
        // The other shard's node at the same place has its own slot.
        assert!(!msg.holds(1, 2, 95_000, ttl));
        assert!(msg.mark_seen(1, 2, 95_000, ttl));
        // After the cache's lifetime the message is new again.
        assert!(!msg.holds(0, 2, 1000 + ttl, ttl));
        assert!(msg.mark_seen(0, 2, 1000 + ttl, ttl));
    }

    /// A message has a slot for every node the run may have.
    #[test]
    fn messages_have_slots_for_every_node_to_come() {
        let mut scenario = Scenario {
            nodes: 100,
            probes: vec![10.0, 20.0],
            ..Scenario::default()
        };
        assert_eq!(most_nodes(&scenario), 102);
        assert_eq!(places(102), [64, 38]);
        assert_eq!(places(129), [65, 64]);
        scenario.churn = vec![crate::scenario::Churn {
            at_s: 5.0,
            kind: ChurnKind::Join,
            count: 0,
            share: 0.5,
            over_s: 0.0,
        }];
        assert_eq!(most_nodes(&scenario), 153);
    }
}
