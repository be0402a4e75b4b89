//! What a run measures, and its report: a summary for people, CSV for tools, SVG plots.

use std::fmt;
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use gaia_protocol::machine::membership::Verdict;

use crate::net::{MS, SEC, Time};
use crate::scenario::Scenario;
use crate::sim::Role;

/// One row of the time series.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Virtual time, in seconds.
    pub t_s: f64,
    /// Nodes up.
    pub up: u32,
    /// Share of the nodes up (that follow the protocol) whose table holds every other one.
    pub complete: f64,
    /// Mean number of up members in a table, over the nodes up that follow the protocol.
    pub members_mean: f64,
    /// Bytes sent per node up per second since the previous sample (gossip, snapshots,
    /// streams).
    pub bytes_per_node_s: f64,
    /// Requests completed and failed since the previous sample.
    pub completed: u64,
    /// See [`completed`](Self::completed).
    pub failed: u64,
}

/// A convergence phase: from a moment (the end of the cold start, a partition's healing), how
/// long each node up took until its table held every node up.
#[derive(Debug, Clone)]
struct Phase {
    name: &'static str,
    start: Time,
    /// Per node index, when its table was first complete after `start`.
    done: std::collections::HashMap<u32, Time>,
    finished: Option<Time>,
    pending: u32,
}

/// Counts that add up, kept by each shard of the run (see [`crate::sim`]) and merged into the
/// [`Metrics`] at each sample and at the end: sums, and latencies that the report sorts, so the
/// order of merging does not reach the outcome.
#[derive(Debug)]
pub struct Counters {
    /// When the second half of the run starts.
    half_time: Time,
    /// After how long without an advert a silent member is dropped.
    silence: Time,
    completed_window: u64,
    failed_window: u64,
    requests: u64,
    completed: u64,
    failed: u64,
    lost_with_entry: u64,
    latencies: Vec<Time>,
    retried: u64,
    hit_by_crash: u64,
    hit_completed: u64,
    served_by: [u64; 5],
    dispatched_to: [u64; 5],
    /// The same, in the second half of the run (after the entry nodes learnt who answers).
    late_dispatched_to: [u64; 5],
    routed_to_dead: u64,
    penalised: [u64; 5],
    honest_penalties: std::collections::BTreeMap<String, u64>,
    banned: [u64; 5],
    gossip_bytes: u64,
    duplicates: u64,
    accepted: u64,
    ignored: u64,
    rejected: u64,
}

/// Counters and series collected during a run.
#[derive(Debug)]
pub struct Metrics {
    /// What the shards' counters added up to at the last merge.
    counters: Counters,
    samples: Vec<Sample>,
    phases: Vec<Phase>,
    cold_start_end: Time,
    last_bytes: u64,
    last_t: Time,
    /// (table, member) pairs where the member is down and the table's node up.
    stale: u64,
    /// When the last node went down, and when no table held a node down any more after it.
    last_down: Option<Time>,
    stale_cleared: Option<Time>,
    max_stale_clear: Option<Time>,
}

fn role_index(role: Role) -> usize {
    match role {
        Role::Honest => 0,
        Role::Sybil => 1,
        Role::Replayer => 2,
        Role::CertificateFlooder => 3,
        Role::LoadLiar => 4,
    }
}

const ROLES: [&str; 5] = [
    "honest",
    "sybil",
    "replayer",
    "certificate-flooder",
    "load-liar",
];

fn add(into: &mut [u64; 5], from: &[u64; 5]) {
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

impl Counters {
    /// Zero counts for `scenario`.
    pub fn new(scenario: &Scenario) -> Self {
        Self {
            half_time: (scenario.duration_s * SEC as f64 / 2.0) as Time,
            silence: scenario.effective_heartbeat_ms() * 3 * MS,
            completed_window: 0,
            failed_window: 0,
            requests: 0,
            completed: 0,
            failed: 0,
            lost_with_entry: 0,
            latencies: Vec::new(),
            retried: 0,
            hit_by_crash: 0,
            hit_completed: 0,
            served_by: [0; 5],
            dispatched_to: [0; 5],
            late_dispatched_to: [0; 5],
            routed_to_dead: 0,
            penalised: [0; 5],
            honest_penalties: std::collections::BTreeMap::new(),
            banned: [0; 5],
            gossip_bytes: 0,
            duplicates: 0,
            accepted: 0,
            ignored: 0,
            rejected: 0,
        }
    }

    /// Moves `other`'s counts into these (`other` is left at zero).
    pub fn take_from(&mut self, other: &mut Counters) {
        self.completed_window += std::mem::take(&mut other.completed_window);
        self.failed_window += std::mem::take(&mut other.failed_window);
        self.requests += std::mem::take(&mut other.requests);
        self.completed += std::mem::take(&mut other.completed);
        self.failed += std::mem::take(&mut other.failed);
        self.lost_with_entry += std::mem::take(&mut other.lost_with_entry);
        self.latencies.append(&mut other.latencies);
        self.retried += std::mem::take(&mut other.retried);
        self.hit_by_crash += std::mem::take(&mut other.hit_by_crash);
        self.hit_completed += std::mem::take(&mut other.hit_completed);
        add(&mut self.served_by, &std::mem::take(&mut other.served_by));
        add(
            &mut self.dispatched_to,
            &std::mem::take(&mut other.dispatched_to),
        );
        add(
            &mut self.late_dispatched_to,
            &std::mem::take(&mut other.late_dispatched_to),
        );
        self.routed_to_dead += std::mem::take(&mut other.routed_to_dead);
        add(&mut self.penalised, &std::mem::take(&mut other.penalised));
        for (kind, n) in std::mem::take(&mut other.honest_penalties) {
            *self.honest_penalties.entry(kind).or_default() += n;
        }
        add(&mut self.banned, &std::mem::take(&mut other.banned));
        self.gossip_bytes += std::mem::take(&mut other.gossip_bytes);
        self.duplicates += std::mem::take(&mut other.duplicates);
        self.accepted += std::mem::take(&mut other.accepted);
        self.ignored += std::mem::take(&mut other.ignored);
        self.rejected += std::mem::take(&mut other.rejected);
    }

    /// A request died with its entry node.
    pub fn request_lost_with_entry(&mut self) {
        self.lost_with_entry += 1;
    }

    /// A guard penalised a node, for `reason`.
    pub fn penalised(&mut self, role: Option<Role>, reason: &str) {
        if let Some(role) = role {
            self.penalised[role_index(role)] += 1;
            if role == Role::Honest {
                // The kind of fault, without the figures that follow it.
                let kind = reason.split([':', '(']).next().unwrap_or(reason).trim();
                let kind: String = kind.chars().take(80).collect();
                *self.honest_penalties.entry(kind).or_default() += 1;
            }
        }
    }

    /// A guard banned a node.
    pub fn banned(&mut self, role: Option<Role>) {
        if let Some(role) = role {
            self.banned[role_index(role)] += 1;
        }
    }

    /// A gossip transmission of `bytes`.
    pub fn gossip_sent(&mut self, bytes: u64) {
        self.gossip_bytes += bytes;
    }

    /// A gossip copy dropped as already seen.
    pub fn duplicate(&mut self) {
        self.duplicates += 1;
    }

    /// A node's guard judged a gossip message.
    pub fn verdict(&mut self, verdict: &Verdict) {
        match verdict {
            Verdict::Accept => self.accepted += 1,
            Verdict::Ignore(_) => self.ignored += 1,
            Verdict::Reject(_) => self.rejected += 1,
        }
    }

    /// A request entered the domain.
    pub fn request_started(&mut self) {
        self.requests += 1;
    }

    /// A request was dispatched at `now` to a node of `role`, which crashed at `crashed` if it
    /// did.
    pub fn dispatched(&mut self, role: Role, now: Time, crashed: Option<Time>) {
        self.dispatched_to[role_index(role)] += 1;
        if now >= self.half_time {
            self.late_dispatched_to[role_index(role)] += 1;
        }
        if let Some(crashed) = crashed
            && now > crashed + self.silence
        {
            self.routed_to_dead += 1;
        }
    }

    /// A request completed, served last by a node of `role`.
    pub fn request_done(&mut self, latency: Time, attempts: u32, role: Option<Role>, hit: bool) {
        self.completed += 1;
        self.completed_window += 1;
        self.latencies.push(latency);
        if attempts > 1 {
            self.retried += 1;
        }
        if hit {
            self.hit_by_crash += 1;
            self.hit_completed += 1;
        }
        if let Some(role) = role {
            self.served_by[role_index(role)] += 1;
        }
    }

    /// A request failed.
    pub fn request_failed(&mut self, hit: bool) {
        self.failed += 1;
        self.failed_window += 1;
        if hit {
            self.hit_by_crash += 1;
        }
    }
}

impl Metrics {
    /// Empty metrics for `scenario`.
    pub fn new(scenario: &Scenario) -> Self {
        let cold_start_end = (scenario.start.spread_s * SEC as f64) as Time;
        Self {
            counters: Counters::new(scenario),
            samples: Vec::new(),
            phases: vec![Phase {
                name: "cold start",
                start: cold_start_end,
                done: Default::default(),
                finished: None,
                pending: 0,
            }],
            cold_start_end,
            last_bytes: 0,
            last_t: 0,
            stale: 0,
            last_down: None,
            stale_cleared: None,
            max_stale_clear: None,
        }
    }

    /// The counts of the run as a whole (global events count here; the shards count apart
    /// and are merged in with [`Counters::take_from`]).
    pub fn counters(&mut self) -> &mut Counters {
        &mut self.counters
    }

    /// A phase whose convergence is measured starts now.
    pub fn phase_started(&mut self, name: &'static str, now: Time) {
        self.phases.push(Phase {
            name,
            start: now,
            done: Default::default(),
            finished: None,
            pending: 0,
        });
    }

    /// A node went down while `holders` tables held it, holding itself `held_down` nodes
    /// that were already down.
    pub fn went_down(&mut self, holders: u64, held_down: u64, now: Time) {
        self.stale = (self.stale + holders).saturating_sub(held_down);
        self.last_down = Some(now);
        self.stale_cleared = None;
    }

    /// A table forgot a member that is down.
    pub fn forgot_down_member(&mut self, now: Time) {
        self.stale = self.stale.saturating_sub(1);
        if self.stale == 0
            && let Some(down) = self.last_down
        {
            self.stale_cleared = Some(now);
            let took = now - down;
            self.max_stale_clear = Some(self.max_stale_clear.map_or(took, |m| m.max(took)));
        }
    }

    /// One sample: the nodes up and whether each one's table is complete (the shards'
    /// counters merged in first).
    pub fn sample(
        &mut self,
        now: Time,
        up: u32,
        complete: &[(u32, bool)],
        members: u64,
        bytes: u64,
    ) {
        let share = if complete.is_empty() {
            0.0
        } else {
            complete.iter().filter(|(_, c)| *c).count() as f64 / complete.len() as f64
        };
        let dt = (now - self.last_t) as f64 / SEC as f64;
        let bytes_per_node_s = if dt > 0.0 && up > 0 {
            (bytes - self.last_bytes) as f64 / dt / f64::from(up)
        } else {
            0.0
        };
        self.samples.push(Sample {
            t_s: now as f64 / SEC as f64,
            up,
            complete: share,
            members_mean: if complete.is_empty() {
                0.0
            } else {
                members as f64 / complete.len() as f64
            },
            bytes_per_node_s,
            completed: std::mem::take(&mut self.counters.completed_window),
            failed: std::mem::take(&mut self.counters.failed_window),
        });
        self.last_bytes = bytes;
        self.last_t = now;
        for phase in &mut self.phases {
            if phase.finished.is_some() || now < phase.start {
                continue;
            }
            let mut pending = 0;
            for &(n, c) in complete {
                if c {
                    phase.done.entry(n).or_insert(now);
                } else if !phase.done.contains_key(&n) {
                    pending += 1;
                }
            }
            phase.pending = pending;
            if pending == 0 {
                phase.finished = Some(now);
            }
        }
    }

    /// The report.
    #[allow(clippy::too_many_arguments)]
    pub fn finish(
        self,
        scenario: &Scenario,
        log_hash: u64,
        events: u64,
        windows: u64,
        threads: usize,
        wall: Duration,
        served: &[(Role, u64)],
        probes: Vec<Option<Time>>,
        relay_only: usize,
        nodes: usize,
    ) -> Report {
        let phases = self
            .phases
            .iter()
            .map(|p| {
                let mut times: Vec<f64> = p
                    .done
                    .values()
                    .map(|t| (t - p.start) as f64 / SEC as f64)
                    .collect();
                times.sort_by(f64::total_cmp);
                Convergence {
                    name: p.name.to_string(),
                    at_s: p.start as f64 / SEC as f64,
                    p50_s: quantile(&times, 0.5),
                    p99_s: quantile(&times, 0.99),
                    all_s: p.finished.map(|f| (f - p.start) as f64 / SEC as f64),
                    not_converged: p.pending,
                }
            })
            .collect();
        let honest: Vec<u64> = served
            .iter()
            .filter(|(r, _)| *r == Role::Honest)
            .map(|(_, c)| *c)
            .collect();
        let mean = honest.iter().sum::<u64>() as f64 / honest.len().max(1) as f64;
        let max = honest.iter().copied().max().unwrap_or(0) as f64;
        let steady_from = self.cold_start_end as f64 / SEC as f64 + 30.0;
        let steady: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.t_s >= steady_from)
            .collect();
        let bytes_per_node_s = if steady.is_empty() {
            None
        } else {
            Some(steady.iter().map(|s| s.bytes_per_node_s).sum::<f64>() / steady.len() as f64)
        };
        let mut latencies: Vec<f64> = self
            .counters
            .latencies
            .iter()
            .map(|l| *l as f64 / SEC as f64)
            .collect();
        latencies.sort_by(f64::total_cmp);
        let total_served: u64 = self.counters.served_by.iter().sum();
        Report {
            name: scenario.name.clone(),
            seed: scenario.seed,
            nodes,
            relay_only,
            duration_s: scenario.duration_s,
            log_hash,
            events,
            windows,
            threads,
            wall_s: wall.as_secs_f64(),
            peak_rss_mib: peak_rss_mib(),
            phases,
            probes_s: probes
                .into_iter()
                .map(|p| p.map(|t| t as f64 / SEC as f64))
                .collect(),
            bytes_per_node_s,
            gossip_bytes: self.counters.gossip_bytes,
            duplicates: self.counters.duplicates,
            accepted: self.counters.accepted,
            ignored: self.counters.ignored,
            rejected: self.counters.rejected,
            requests: self.counters.requests,
            completed: self.counters.completed,
            failed: self.counters.failed,
            lost_with_entry: self.counters.lost_with_entry,
            retried: self.counters.retried,
            latency_p50_s: quantile(&latencies, 0.5),
            latency_p99_s: quantile(&latencies, 0.99),
            imbalance: if mean > 0.0 { Some(max / mean) } else { None },
            hit_by_crash: self.counters.hit_by_crash,
            hit_completed: self.counters.hit_completed,
            routed_to_dead_after_silence: self.counters.routed_to_dead,
            down_forgotten_s: self.max_stale_clear.map(|t| t as f64 / SEC as f64),
            down_still_held: self.stale,
            honest_share: if total_served > 0 {
                Some(self.counters.served_by[0] as f64 / total_served as f64)
            } else {
                None
            },
            sybil_dispatch_share: share(&self.counters.dispatched_to, 1),
            late_sybil_dispatch_share: share(&self.counters.late_dispatched_to, 1),
            served_by: ROLES
                .iter()
                .zip(self.counters.served_by)
                .map(|(r, c)| (r.to_string(), c))
                .collect(),
            dispatched_to: ROLES
                .iter()
                .zip(self.counters.dispatched_to)
                .map(|(r, c)| (r.to_string(), c))
                .collect(),
            penalised: ROLES
                .iter()
                .zip(self.counters.penalised)
                .map(|(r, c)| (r.to_string(), c))
                .collect(),
            banned: ROLES
                .iter()
                .zip(self.counters.banned)
                .map(|(r, c)| (r.to_string(), c))
                .collect(),
            honest_penalties: self.counters.honest_penalties.into_iter().collect(),
            samples: self.samples,
        }
    }
}

/// The share of `counts` at `index`.
fn share(counts: &[u64; 5], index: usize) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    (total > 0).then(|| counts[index] as f64 / total as f64)
}

/// The `q` quantile of sorted values (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// The process's peak resident memory, from `/proc/self/status` (Linux).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Convergence after one phase's start.
#[derive(Debug, Clone, PartialEq)]
pub struct Convergence {
    /// What started the phase.
    pub name: String,
    /// When, in virtual seconds.
    pub at_s: f64,
    /// Median time until a node's table was complete.
    pub p50_s: Option<f64>,
    /// 99th percentile.
    pub p99_s: Option<f64>,
    /// Time until every node's table was complete (`None`: not by the end).
    pub all_s: Option<f64>,
    /// Nodes whose table was never complete.
    pub not_converged: u32,
}

/// The outcome of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The scenario's name.
    pub name: String,
    /// Its seed.
    pub seed: u64,
    /// Nodes that existed (joined later ones included).
    pub nodes: usize,
    /// Of which reachable only through relays.
    pub relay_only: usize,
    /// Virtual seconds simulated.
    pub duration_s: f64,
    /// A hash of every event in order: equal for equal seeds.
    pub log_hash: u64,
    /// Events processed.
    pub events: u64,
    /// Windows of the parallel event loop (see [`crate::sim`]): the shards met this many
    /// times.
    pub windows: u64,
    /// Threads the run used.
    pub threads: usize,
    /// Wall time of the run.
    pub wall_s: f64,
    /// Peak resident memory of the process.
    pub peak_rss_mib: Option<f64>,
    /// Convergence after the cold start and after each measured phase.
    pub phases: Vec<Convergence>,
    /// For each probe node, how long until every node up held it as routable.
    pub probes_s: Vec<Option<f64>>,
    /// Mean bytes sent per node per second once the cold start is over (all protocols).
    pub bytes_per_node_s: Option<f64>,
    /// Gossip bytes sent in all.
    pub gossip_bytes: u64,
    /// Gossip copies dropped as duplicates.
    pub duplicates: u64,
    /// Gossip verdicts.
    pub accepted: u64,
    /// See [`accepted`](Self::accepted).
    pub ignored: u64,
    /// See [`accepted`](Self::accepted).
    pub rejected: u64,
    /// Requests entered.
    pub requests: u64,
    /// Completed.
    pub completed: u64,
    /// Failed with an error.
    pub failed: u64,
    /// Lost because their entry node crashed.
    pub lost_with_entry: u64,
    /// Completed after more than one dispatch.
    pub retried: u64,
    /// Median and 99th percentile of completed requests' latency.
    pub latency_p50_s: Option<f64>,
    /// See [`latency_p50_s`](Self::latency_p50_s).
    pub latency_p99_s: Option<f64>,
    /// Most requests served by one honest node over the mean.
    pub imbalance: Option<f64>,
    /// Requests that were running on a node that crashed.
    pub hit_by_crash: u64,
    /// Of those, completed anyway (on another node).
    pub hit_completed: u64,
    /// Dispatches to a crashed node later than the silence timeout after its crash.
    pub routed_to_dead_after_silence: u64,
    /// The longest time from a node going down until no table held it (after the last
    /// departure of a batch).
    pub down_forgotten_s: Option<f64>,
    /// Tables still holding a node that is down at the end.
    pub down_still_held: u64,
    /// Share of completed requests served by honest nodes.
    pub honest_share: Option<f64>,
    /// Share of dispatches that went to self-made hostile identities (sybils).
    pub sybil_dispatch_share: Option<f64>,
    /// The same over the second half of the run.
    pub late_sybil_dispatch_share: Option<f64>,
    /// Completed requests by the role of the node that served them.
    pub served_by: Vec<(String, u64)>,
    /// Dispatches by the role of their node.
    pub dispatched_to: Vec<(String, u64)>,
    /// Penalties given, by the role of the node penalised.
    pub penalised: Vec<(String, u64)>,
    /// Bans, by the role of the node banned.
    pub banned: Vec<(String, u64)>,
    /// Penalties given to honest nodes, by kind of fault (none is the goal).
    pub honest_penalties: Vec<(String, u64)>,
    /// The time series.
    pub samples: Vec<Sample>,
}

fn opt(v: Option<f64>, unit: &str) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.2}{unit}"))
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "scenario {} (seed {}): {} nodes ({} relay-only), {:.0} virtual s",
            self.name, self.seed, self.nodes, self.relay_only, self.duration_s
        )?;
        writeln!(
            f,
            "  run: {} events in {} windows, {:.1} s wall on {} thread{}, peak memory {}, event log {:016x}",
            self.events,
            self.windows,
            self.wall_s,
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            opt(self.peak_rss_mib, " MiB"),
            self.log_hash
        )?;
        for p in &self.phases {
            writeln!(
                f,
                "  tables complete after {} (t={:.1} s): p50 {}, p99 {}, all {}{}",
                p.name,
                p.at_s,
                opt(p.p50_s, " s"),
                opt(p.p99_s, " s"),
                opt(p.all_s, " s"),
                if p.not_converged > 0 {
                    format!(" ({} nodes not complete at the end)", p.not_converged)
                } else {
                    String::new()
                }
            )?;
        }
        if self.down_forgotten_s.is_some() || self.down_still_held > 0 {
            writeln!(
                f,
                "  nodes that went down were forgotten by every table {} after the last one went down ({} entries still held at the end)",
                opt(self.down_forgotten_s, " s"),
                self.down_still_held
            )?;
        }
        for (i, p) in self.probes_s.iter().enumerate() {
            writeln!(
                f,
                "  newcomer {i} routable by every node after {}",
                opt(*p, " s")
            )?;
        }
        writeln!(
            f,
            "  traffic: {} per node per s after the cold start; gossip {:.1} MB sent, {} duplicates dropped; verdicts {} accepted, {} ignored, {} rejected",
            opt(self.bytes_per_node_s.map(|b| b / 1000.0), " kB"),
            self.gossip_bytes as f64 / 1e6,
            self.duplicates,
            self.accepted,
            self.ignored,
            self.rejected
        )?;
        if self.requests > 0 {
            writeln!(
                f,
                "  requests: {} entered, {} completed ({:.2} % of those that ended), {} failed, {} lost with their entry node, {} still running at the end, {} completed after a retry; latency p50 {}, p99 {}",
                self.requests,
                self.completed,
                100.0 * self.completed as f64 / (self.completed + self.failed).max(1) as f64,
                self.failed,
                self.lost_with_entry,
                self.requests
                    .saturating_sub(self.completed + self.failed + self.lost_with_entry),
                self.retried,
                opt(self.latency_p50_s, " s"),
                opt(self.latency_p99_s, " s"),
            )?;
            writeln!(
                f,
                "  load imbalance (max/mean served per honest node): {}",
                opt(self.imbalance, "")
            )?;
            if self.hit_by_crash > 0 {
                writeln!(
                    f,
                    "  crashes: {} requests were on a crashing node, {} of them completed elsewhere ({:.1} %); dispatches to a crashed node after the silence timeout: {}",
                    self.hit_by_crash,
                    self.hit_completed,
                    100.0 * self.hit_completed as f64 / self.hit_by_crash as f64,
                    self.routed_to_dead_after_silence
                )?;
            }
            if self.sybil_dispatch_share.is_some_and(|s| s > 0.0) {
                writeln!(
                    f,
                    "  dispatches to self-made hostile identities: {} of all, {} in the second half",
                    opt(self.sybil_dispatch_share.map(|s| s * 100.0), " %"),
                    opt(self.late_sybil_dispatch_share.map(|s| s * 100.0), " %"),
                )?;
            }
            writeln!(
                f,
                "  served by honest nodes: {}; served by role {:?}; dispatched by role {:?}",
                opt(self.honest_share.map(|s| s * 100.0), " %"),
                self.served_by,
                self.dispatched_to
            )?;
        }
        writeln!(
            f,
            "  penalties by role {:?}; bans by role {:?}",
            self.penalised, self.banned
        )?;
        if !self.honest_penalties.is_empty() {
            writeln!(
                f,
                "  honest nodes penalised for {:?}",
                self.honest_penalties
            )?;
        }
        Ok(())
    }
}

impl Report {
    /// The time series as CSV.
    pub fn write_csv(&self, path: &Path) -> anyhow::Result<()> {
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        writeln!(
            out,
            "t_s,up,complete_share,members_mean,bytes_per_node_s,completed,failed"
        )?;
        for s in &self.samples {
            writeln!(
                out,
                "{:.3},{},{:.4},{:.1},{:.1},{},{}",
                s.t_s, s.up, s.complete, s.members_mean, s.bytes_per_node_s, s.completed, s.failed
            )?;
        }
        out.flush()?;
        Ok(())
    }
}
