//! Gaia simulations: deterministic, event-driven runs of the domain's own decision logic
//! (the sans-IO machines of [`gaia_protocol::machine`]: membership, guard, routing, failover)
//! at scales that real swarms in one process cannot reach.
//!
//! - [`scenario`]: what a run simulates, read from `simulations/scenarios/*.toml`.
//! - [`net`]: the link model (latency distribution, jitter, loss, bandwidth, relays,
//!   partitions).
//! - [`sim`]: the event loop (parallel in windows over two shards of nodes, deterministic),
//!   the simulated gossip mesh, snapshots and completion streams;
//!   [`queue`]: its event queue (time buckets, so millions of pending events stay cheap).
//! - [`report`]: the metrics, the summary, CSV; [`plot`]: SVG plots.
//!
//! It depends on `gaia-protocol` alone (no Burn, libp2p, tokio or axum).

pub mod net;
pub mod plot;
pub mod queue;
pub mod report;
pub mod scenario;
pub mod sim;

pub use report::Report;
pub use scenario::Scenario;

/// Runs `scenario` to its end on `threads` threads (see [`sim::default_threads`]; the outcome
/// does not depend on it). `progress`: a progress bar on a terminal, else a line on stderr
/// every ten virtual seconds.
pub fn run(scenario: Scenario, progress: bool, threads: usize) -> anyhow::Result<Report> {
    Ok(sim::Sim::new(scenario, progress)?.threads(threads).run())
}
