//! The scenarios CI runs, with asserted outcomes, and the simulator's determinism.

use std::path::Path;

use gaia_simulations::{Scenario, run};

/// The runs use two threads, as on a machine with two cores or more.
const THREADS: usize = 2;

fn scenario(name: &str) -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(format!("{name}.toml"));
    Scenario::load(&path).expect("the scenario file is valid")
}

/// 200 nodes, 20 % of them self-made hostile identities, replayers, load liars, relayed nodes,
/// loss and clock skew; a newcomer; 10 % of the honest nodes crash mid-stream.
#[test]
fn two_hundred_nodes_converge_route_around_crashes_and_hostile_identities() {
    let scenario = scenario("ci-200");
    let heartbeat_s = scenario.effective_heartbeat_ms() as f64 / 1000.0;
    let silence_s = 3.0 * heartbeat_s;
    let report = run(scenario, false, THREADS).expect("the run starts");
    println!("{report}");

    // Every table holds every node within two heartbeats of the cold start.
    let cold = &report.phases[0];
    assert_eq!(cold.not_converged, 0, "{report}");
    let all = cold.all_s.expect("every table completes");
    assert!(all <= 2.0 * heartbeat_s, "cold start took {all} s");
    // A newcomer is routable by every node within a heartbeat.
    let probe = report.probes_s[0].expect("the newcomer became routable by all");
    assert!(probe <= heartbeat_s, "newcomer took {probe} s");

    // Crashed nodes leave every table within the silence timeout plus a heartbeat, and no
    // request goes to one after the silence timeout.
    let forgotten = report
        .down_forgotten_s
        .expect("crashed nodes were forgotten");
    assert!(forgotten <= silence_s + heartbeat_s, "{forgotten} s");
    assert_eq!(report.down_still_held, 0);
    assert_eq!(report.routed_to_dead_after_silence, 0, "{report}");
    // Requests that were on a crashing node mostly complete elsewhere (the others had spent
    // their three attempts: a crash after one or two first-token timeouts on hostile
    // identities).
    assert!(
        report.hit_by_crash > 0,
        "the crash hit no request: {report}"
    );
    assert!(
        report.hit_completed as f64 >= 0.6 * report.hit_by_crash as f64,
        "{report}"
    );

    // Hostile identities never complete a request, and get at most their share of the
    // dispatches (they are 20 % of the identities; entry nodes learn them one by one).
    let sybil_served = report
        .served_by
        .iter()
        .find(|(role, _)| role == "sybil")
        .map_or(0, |(_, n)| *n);
    assert_eq!(sybil_served, 0);
    let share = report
        .sybil_dispatch_share
        .expect("requests were dispatched");
    assert!(
        share < 0.25,
        "sybils got {:.1} % of dispatches",
        share * 100.0
    );
    // Nearly every request that ended completed (the others were still waiting out a
    // hostile node's first-token timeout at the end).
    let done = report.completed as f64 / (report.completed + report.failed) as f64;
    assert!(done > 0.95, "{report}");
    // Replayers are caught: penalised and banned, and nobody honest is.
    let count = |table: &[(String, u64)], role: &str| {
        table.iter().find(|(r, _)| r == role).map_or(0, |(_, n)| *n)
    };
    assert!(count(&report.banned, "replayer") > 0, "{report}");
    assert_eq!(count(&report.penalised, "honest"), 0, "{report}");
    // Load is spread over the honest nodes.
    let imbalance = report.imbalance.expect("honest nodes served");
    assert!(imbalance < 2.5, "imbalance {imbalance}");
}

/// A domain of certified members with certificate flooders, cut in two and healed.
#[test]
fn a_partitioned_domain_heals_and_floods_are_banned() {
    let scenario = scenario("ci-partition");
    let heartbeat_s = scenario.effective_heartbeat_ms() as f64 / 1000.0;
    let report = run(scenario, false, THREADS).expect("the run starts");
    println!("{report}");
    let heal = report
        .phases
        .iter()
        .find(|p| p.name == "heal")
        .expect("the partition healed");
    let all = heal.all_s.expect("every table completes after the heal");
    assert!(all <= 3.0 * heartbeat_s, "healing took {all} s");
    let count = |table: &[(String, u64)], role: &str| {
        table.iter().find(|(r, _)| r == role).map_or(0, |(_, n)| *n)
    };
    assert!(count(&report.banned, "certificate-flooder") > 0, "{report}");
    assert_eq!(count(&report.penalised, "honest"), 0, "{report}");
}

/// The same seed gives the same event log, bit for bit, on one thread or two; another seed
/// another one.
#[test]
fn a_seed_gives_the_same_event_log() {
    let mut small = scenario("ci-200");
    // Both shards hold nodes (blocks of 64).
    small.nodes = 160;
    small.duration_s = 90.0;
    small.churn[0].at_s = 50.0;
    small.probes = vec![30.0];
    let a = run(small.clone(), false, 2).expect("runs");
    let b = run(small.clone(), false, 2).expect("runs");
    let c = run(small.clone(), false, 1).expect("runs");
    for other in [&b, &c] {
        assert_eq!(a.log_hash, other.log_hash);
        assert_eq!(a.events, other.events);
        assert_eq!(a.samples, other.samples);
        assert_eq!(a.phases, other.phases);
        assert_eq!(a.probes_s, other.probes_s);
        assert_eq!(
            (a.completed, a.failed, a.duplicates, a.gossip_bytes),
            (
                other.completed,
                other.failed,
                other.duplicates,
                other.gossip_bytes
            )
        );
    }
    small.seed += 1;
    let d = run(small, false, 2).expect("runs");
    assert_ne!(a.log_hash, d.log_hash);
}
