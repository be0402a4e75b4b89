//! Scenarios: what a run simulates, read from a TOML file (`simulations/scenarios/*.toml`).
//!
//! Every field has a default, so a scenario names only what it changes. Unknown keys are an
//! error (a typo must not silently run another scenario).

use std::path::Path;

use anyhow::{Context as _, bail};
use serde::Deserialize;

/// One simulated run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// A name for the report.
    pub name: String,
    /// The seed of every random choice; the same seed gives the same event log.
    pub seed: u64,
    /// Nodes started at the beginning (adversaries included).
    pub nodes: u32,
    /// Virtual time simulated, in seconds.
    pub duration_s: f64,
    /// The domain's admission: `open` or `certificates` (every node holds an operator
    /// certificate; adversaries included, as certified members gone bad).
    pub admission: AdmissionKind,
    /// The membership machine's tuning.
    pub membership: MembershipTuning,
    /// Links between nodes.
    pub network: Network,
    /// How the nodes start.
    pub start: Start,
    /// Nodes that join, leave or crash later.
    pub churn: Vec<Churn>,
    /// Partitions and their healing.
    pub partitions: Vec<Partition>,
    /// Requests.
    pub workload: Workload,
    /// Hostile nodes.
    pub adversaries: Adversaries,
    /// Single nodes joining at a given time, whose time to become routable by all is measured.
    pub probes: Vec<f64>,
    /// How often the metrics are sampled, in virtual milliseconds.
    pub sample_ms: u64,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            name: "unnamed".into(),
            seed: 1,
            nodes: 100,
            duration_s: 120.0,
            admission: AdmissionKind::Open,
            membership: MembershipTuning::default(),
            network: Network::default(),
            start: Start::default(),
            churn: Vec::new(),
            partitions: Vec::new(),
            workload: Workload::default(),
            adversaries: Adversaries::default(),
            probes: Vec::new(),
            sample_ms: 250,
        }
    }
}

/// Who may join.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdmissionKind {
    /// Anyone.
    Open,
    /// Certified members only.
    Certificates,
}

/// The membership machine's settings (the node's `[swarm]` keys).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MembershipTuning {
    /// Heartbeat interval, in milliseconds (the node's default is 10 000).
    pub heartbeat_ms: u64,
    /// The most members in a table.
    pub max_members: usize,
    /// The clock skew the machines tolerate, in seconds (the protocol's default is 300).
    pub max_clock_skew_s: u64,
    /// The domain's advert budget per second (heartbeats stretch beyond it).
    pub max_adverts_per_s: u32,
}

impl Default for MembershipTuning {
    fn default() -> Self {
        Self {
            heartbeat_ms: 10_000,
            max_members: 10_000,
            max_clock_skew_s: gaia_protocol::domain::MAX_CLOCK_SKEW_SECS,
            max_adverts_per_s: gaia_protocol::machine::membership::Config::default()
                .max_adverts_per_s,
        }
    }
}

/// Link properties.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    /// One-way latency of a link, drawn once per link.
    pub latency: Latency,
    /// The least one-way latency of a link, in milliseconds (default 1): links drawn shorter
    /// take this long. It is the parallel event loop's lookahead: whatever a node sends
    /// another arrives at least this much later, so the shards of nodes run windows this long
    /// at the same time; a larger value means fewer windows (a faster run), a smaller one
    /// links closer to the distribution. Between 0.001 and 1 000.
    pub min_latency_ms: f64,
    /// Extra random delay per message, uniform in `0..jitter_ms`.
    pub jitter_ms: f64,
    /// Probability that one transmission is lost.
    pub loss: f64,
    /// Each node's upload bandwidth, in kilobits per second (messages queue behind it).
    pub uplink_kbps: f64,
    /// Gossip mesh peers per node (libp2p gossipsub's `mesh_n`).
    pub mesh_degree: usize,
    /// Share of nodes behind NATs that only relays reach: their links to each other go
    /// through a relay.
    pub relay_only: f64,
    /// What a relay adds to a link's one-way latency, in milliseconds.
    pub relay_latency_ms: f64,
    /// Clock skew: each node's clock is off by a uniform amount in `-max..max` milliseconds.
    pub clock_skew_ms: f64,
    /// How long gossip remembers a message id (gossipsub's duplicate cache), in seconds.
    pub seen_ttl_s: f64,
    /// How long after its start a node's mesh links carry gossip, in milliseconds (gossipsub
    /// grafts at its heartbeat, once subscriptions are exchanged); what it publishes before is
    /// lost, as a real node's first advert is before its mesh forms. Default 0.
    pub mesh_delay_ms: f64,
    /// Bytes of framing each gossip transmission adds (gossipsub's protobuf, yamux, noise).
    pub frame_overhead: u32,
}

impl Default for Network {
    fn default() -> Self {
        Self {
            latency: Latency::default(),
            min_latency_ms: 1.0,
            jitter_ms: 5.0,
            loss: 0.0,
            uplink_kbps: 20_000.0,
            mesh_degree: 6,
            relay_only: 0.0,
            relay_latency_ms: 30.0,
            clock_skew_ms: 0.0,
            seen_ttl_s: 120.0,
            mesh_delay_ms: 0.0,
            frame_overhead: 60,
        }
    }
}

/// A latency distribution, in milliseconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "distribution", rename_all = "kebab-case")]
pub enum Latency {
    /// Every link the same.
    Constant {
        /// The latency.
        ms: f64,
    },
    /// Uniform between two values.
    Uniform {
        /// The lowest.
        min_ms: f64,
        /// The highest.
        max_ms: f64,
    },
    /// Log-normal (internet paths): `median_ms * exp(sigma * N(0,1))`.
    LogNormal {
        /// The median.
        median_ms: f64,
        /// The spread.
        sigma: f64,
    },
}

impl Default for Latency {
    fn default() -> Self {
        Latency::LogNormal {
            median_ms: 40.0,
            sigma: 0.6,
        }
    }
}

/// How the initial nodes start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Start {
    /// The initial nodes start at uniform times in `0..spread_s`.
    pub spread_s: f64,
}

impl Default for Start {
    fn default() -> Self {
        Self { spread_s: 5.0 }
    }
}

/// Nodes joining, leaving or crashing at a time.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Churn {
    /// When, in seconds.
    pub at_s: f64,
    /// What happens.
    pub kind: ChurnKind,
    /// How many nodes (chosen at random among the honest nodes up).
    #[serde(default)]
    pub count: u32,
    /// Or what share of the honest nodes up (used when `count` is 0).
    #[serde(default)]
    pub share: f64,
    /// Spread the events over this many seconds from `at_s`.
    #[serde(default)]
    pub over_s: f64,
}

/// What a churn event does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChurnKind {
    /// New nodes join.
    Join,
    /// Nodes leave cleanly (a last advert says so).
    Leave,
    /// Nodes stop without a word, in the middle of what they serve.
    Crash,
}

/// The network splits in two and heals.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    /// When it splits, in seconds.
    pub at_s: f64,
    /// When it heals, in seconds.
    pub heal_s: f64,
    /// The share of nodes on one side.
    #[serde(default = "half")]
    pub share: f64,
}

fn half() -> f64 {
    0.5
}

/// Requests: Poisson arrivals at random honest entry nodes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    /// Requests per second over the whole domain (0: none).
    pub rate_per_s: f64,
    /// When requests start, in seconds.
    pub start_s: f64,
    /// Completion tokens per request.
    pub tokens: u32,
    /// Prompt processing time, in milliseconds.
    pub prefill_ms: f64,
    /// Requests a node runs at once; more wait in its queue.
    pub concurrency: u32,
    /// Node speeds (tokens per second of one request) and their shares.
    pub speeds: Vec<Speed>,
    /// The failover machine's first-token timeout, in milliseconds.
    pub first_token_timeout_ms: u64,
    /// The failover machine's stall timeout, in milliseconds.
    pub stall_timeout_ms: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            rate_per_s: 0.0,
            start_s: 0.0,
            tokens: 64,
            prefill_ms: 150.0,
            concurrency: 4,
            speeds: vec![Speed {
                tokens_per_s: 100.0,
                share: 1.0,
            }],
            first_token_timeout_ms: 60_000,
            stall_timeout_ms: 30_000,
        }
    }
}

/// A class of node speed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Speed {
    /// Tokens per second of one request.
    pub tokens_per_s: f64,
    /// Share of the nodes.
    pub share: f64,
}

/// Hostile nodes, as shares of the initial nodes (or counts).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Adversaries {
    /// Self-made identities (open domains): they advertise a light load and never answer
    /// the requests routed to them.
    pub sybils: f64,
    /// Nodes that replay adverts they saw, minutes later.
    pub replayers: u32,
    /// Nodes that re-publish certificates with new wrappings as fast as they can.
    pub certificate_flooders: u32,
    /// Nodes that advertise no load and a high speed while they serve slowly.
    pub load_liars: f64,
}

impl Scenario {
    /// Reads a scenario file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read scenario {}", path.display()))?;
        let scenario: Scenario = toml::from_str(&text)
            .with_context(|| format!("scenario {} is not valid", path.display()))?;
        scenario
            .check()
            .with_context(|| format!("scenario {} is not valid", path.display()))?;
        Ok(scenario)
    }

    /// The longest heartbeat interval the membership machines settle on with every node in
    /// the table: the configured one, stretched by the advert budget in a large domain (as
    /// `Membership::heartbeat_ms` computes it).
    pub fn effective_heartbeat_ms(&self) -> u64 {
        let spread = u64::from(self.nodes).saturating_mul(4000)
            / (3 * u64::from(self.membership.max_adverts_per_s.max(1)));
        self.membership.heartbeat_ms.max(spread)
    }

    /// Checks the values a run relies on.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.nodes < 2 || self.nodes > 1_000_000 {
            bail!("nodes must be between 2 and 1 000 000");
        }
        if !(self.duration_s > 0.0 && self.duration_s <= 86_400.0) {
            bail!("duration_s must be above 0 and at most a day");
        }
        if self.membership.heartbeat_ms < 100 {
            bail!("membership.heartbeat_ms must be at least 100");
        }
        if self.membership.max_adverts_per_s == 0 {
            bail!("membership.max_adverts_per_s must be at least 1");
        }
        let shares = [
            ("network.loss", self.network.loss),
            ("network.relay_only", self.network.relay_only),
            ("adversaries.sybils", self.adversaries.sybils),
            ("adversaries.load_liars", self.adversaries.load_liars),
        ];
        for (name, value) in shares {
            if !(0.0..=1.0).contains(&value) {
                bail!("{name} must be between 0 and 1");
            }
        }
        if self.adversaries.sybils + self.adversaries.load_liars >= 1.0 {
            bail!("adversaries leave no honest node");
        }
        if !(0.0..=3_600_000.0).contains(&self.network.mesh_delay_ms) {
            bail!("network.mesh_delay_ms must be between 0 and 3 600 000 (an hour)");
        }
        if !(0.001..=1000.0).contains(&self.network.min_latency_ms) {
            bail!("network.min_latency_ms must be between 0.001 and 1 000");
        }
        if self.network.mesh_degree == 0 || self.network.mesh_degree > 64 {
            bail!("network.mesh_degree must be between 1 and 64");
        }
        if self.network.uplink_kbps.is_nan() || self.network.uplink_kbps <= 0.0 {
            bail!("network.uplink_kbps must be above 0");
        }
        if self.workload.concurrency == 0 || self.workload.tokens == 0 {
            bail!("workload.concurrency and workload.tokens must be at least 1");
        }
        if self.workload.speeds.is_empty()
            || self.workload.speeds.iter().any(|s| {
                s.tokens_per_s.is_nan()
                    || s.tokens_per_s <= 0.0
                    || s.share.is_nan()
                    || s.share < 0.0
            })
        {
            bail!("workload.speeds needs at least one class with tokens_per_s above 0");
        }
        if !(self.workload.rate_per_s >= 0.0 && self.workload.rate_per_s <= 100_000.0) {
            bail!("workload.rate_per_s must be between 0 and 100 000");
        }
        for p in &self.partitions {
            if p.heal_s.is_nan() || p.heal_s <= p.at_s || !(0.0..=1.0).contains(&p.share) {
                bail!("a partition must heal after it starts, and its share be in 0..1");
            }
        }
        for c in &self.churn {
            if !(0.0..=1.0).contains(&c.share) || c.at_s < 0.0 || c.over_s < 0.0 {
                bail!("a churn event needs at_s >= 0, over_s >= 0 and a share in 0..1");
            }
        }
        if self.sample_ms == 0 {
            bail!("sample_ms must be at least 1");
        }
        Ok(())
    }
}
