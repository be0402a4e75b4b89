//! Swarm figures with real libp2p swarms on loopback, in one process:
//!
//! 1. member-table convergence: `NODES` nodes start at once (each bootstraps from the first);
//!    the time until every node's table holds every other node;
//! 2. the time for one more node to become routable by every member;
//! 3. steady traffic: the bytes each node sends per second with no chats (root only: the bench
//!    then runs in a network namespace of its own and reads its loopback counters);
//! 4. routing overhead: time to first token and per-token latency of a chat relayed through
//!    one peer, against the same fake engine called locally (through the node's own serving
//!    channel). The fake engine emits `TOKENS` tokens as fast as it can, so the figures are
//!    the swarm's cost alone; the real model's figures come from `examples/api_bench.rs`.
//!
//! Run: `cargo run --release -p gaia-node --example swarm_bench [NODES] [REQUESTS] [TOKENS]
//! [HEARTBEAT_MS]` (heartbeat default 1000 ms; the node default is 10 000).
//! Memory: a real swarm costs about a megabyte here (DESIGN.md), so a few hundred nodes at
//! most; the default is 50.

use std::time::{Duration, Instant};

use gaia_node::swarm::{self, InboundChat, Running, SwarmConfig, SwarmParams};
use gaia_protocol::advert::{Capabilities, Load};
use gaia_protocol::domain::{Admission, DomainManifest, Requirements};
use gaia_protocol::machine::membership::LocalService;
use gaia_protocol::stream::{FinishReason, StreamFrame, Usage};
use gaia_protocol::{ContentHash, NodeId, SecretKey, Signed};
use libp2p::Multiaddr;
use tokio::sync::mpsc;

/// The heartbeat when none is given: short, so a run shows silence detection quickly.
const DEFAULT_HEARTBEAT_MS: u64 = 1000;
const DEADLINE: Duration = Duration::from_secs(300);

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn service() -> LocalService {
    LocalService {
        model_name: "bench-model".into(),
        model_hash: ContentHash::of(b"bench-model"),
        kb_hash: None,
        prompt_hash: None,
        capabilities: Capabilities {
            tools: false,
            structured_output: false,
            context_length: 4096,
            max_tokens: 4096,
        },
        load: Load {
            in_flight: 0,
            queued: 0,
            tokens_per_s: 100.0,
        },
        price: gaia_protocol::payment::Price::default(),
        addrs: Vec::new(),
    }
}

async fn start(
    key: &SecretKey,
    manifest: &Signed<DomainManifest>,
    bootstrap: Option<&Multiaddr>,
    heartbeat_ms: u64,
) -> anyhow::Result<Running> {
    let config = SwarmConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        bootstrap: bootstrap.iter().map(ToString::to_string).collect(),
        heartbeat_ms,
        ..SwarmConfig::default()
    };
    Ok(swarm::spawn(SwarmParams {
        key: key.clone(),
        config,
        manifest: Some(manifest.clone()),
        certificate: None,
        service: Some(service()),
        seed: rand::random(),
        state_dir: None,
        vouchers: None,
        voucher_source: None,
        content: None,
    })
    .await?)
}

async fn addr(running: &Running) -> anyhow::Result<Multiaddr> {
    let started = Instant::now();
    loop {
        let status = running.handle.status().await?;
        if let Some(addr) = status.listen_addrs.first() {
            return Ok(addr
                .clone()
                .with(libp2p::multiaddr::Protocol::P2p(status.peer_id)));
        }
        anyhow::ensure!(started.elapsed() < DEADLINE, "no listen address");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A fake engine: `tokens` tokens then `Done`, as fast as the channel takes them.
fn fake_engine(mut inbound: mpsc::Receiver<InboundChat>, tokens: u32) {
    tokio::spawn(async move {
        while let Some(chat) = inbound.recv().await {
            tokio::spawn(async move {
                for index in 0..tokens {
                    let frame = StreamFrame::Token {
                        text: "tok ".into(),
                        index,
                        logprob: None,
                        top_logprobs: Vec::new(),
                    };
                    if chat.reply.send(frame).await.is_err() {
                        return;
                    }
                }
                let _ = chat
                    .reply
                    .send(StreamFrame::Done {
                        usage: Usage {
                            prompt_tokens: 1,
                            completion_tokens: tokens,
                        },
                        cached_tokens: 0,
                        finish_reason: FinishReason::Stop,
                        receipt: None,
                    })
                    .await;
            });
        }
    });
}

/// Waits until every node's table satisfies `done`, returning the elapsed time.
async fn until_all(
    nodes: &[Running],
    started: Instant,
    done: impl Fn(&[gaia_node::swarm::MemberInfo]) -> bool,
) -> anyhow::Result<Duration> {
    let mut pending: Vec<usize> = (0..nodes.len()).collect();
    let mut last_report = Instant::now();
    while !pending.is_empty() {
        let mut left = Vec::new();
        for i in pending {
            let members = nodes[i].handle.members().await?;
            if !done(&members) {
                left.push(i);
            }
        }
        pending = left;
        if last_report.elapsed() >= Duration::from_secs(5) && !pending.is_empty() {
            last_report = Instant::now();
            let mut sizes = Vec::new();
            for &i in &pending {
                sizes.push(nodes[i].handle.members().await?.len());
            }
            sizes.sort_unstable();
            eprintln!(
                "  .. {:.0} s: {} nodes pending, their table sizes {:?}",
                started.elapsed().as_secs_f64(),
                pending.len(),
                sizes
            );
        }
        anyhow::ensure!(
            started.elapsed() < DEADLINE,
            "{} nodes did not converge within {DEADLINE:?}",
            pending.len()
        );
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(started.elapsed())
}

/// One chat: (time to first token, mean gap between tokens after the first).
async fn one_chat(
    from: &swarm::SwarmHandle,
    to: NodeId,
    tokens: u32,
) -> anyhow::Result<(Duration, Duration)> {
    let body = br#"{"model":"default","messages":[{"role":"user","content":"hi"}]}"#.to_vec();
    let started = Instant::now();
    let mut chat = from.open_chat(to, body).await?;
    let mut first = None;
    let mut count = 0u32;
    loop {
        match chat.recv().await {
            Some(Ok(StreamFrame::Token { .. })) => {
                first.get_or_insert_with(|| started.elapsed());
                count += 1;
            }
            Some(Ok(StreamFrame::Done { .. })) => break,
            other => anyhow::bail!("the chat failed: {other:?}"),
        }
    }
    anyhow::ensure!(count == tokens, "got {count} tokens of {tokens}");
    let total = started.elapsed();
    let first = first.unwrap_or(total);
    let per_token = (total - first) / tokens.saturating_sub(1).max(1);
    Ok((first, per_token))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

fn summary(label: &str, mut ttft: Vec<Duration>, mut per_token: Vec<Duration>) {
    ttft.sort();
    per_token.sort();
    println!(
        "  {label:<22} ttft p50 {:>8.3} ms  p95 {:>8.3} ms   per-token p50 {:>7.2} us  p95 {:>7.2} us",
        percentile(&ttft, 0.5).as_secs_f64() * 1e3,
        percentile(&ttft, 0.95).as_secs_f64() * 1e3,
        percentile(&per_token, 0.5).as_secs_f64() * 1e6,
        percentile(&per_token, 0.95).as_secs_f64() * 1e6,
    );
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Moves this process into a network namespace of its own (root only), before any thread
/// starts, so that the loopback counters count this bench's traffic alone. Whether it did.
fn isolate_network() -> bool {
    // SAFETY: geteuid has no preconditions; unshare runs before any other thread exists.
    if unsafe { libc::geteuid() } != 0 || unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return false;
    }
    std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .is_ok_and(|s| s.success())
}

/// Bytes sent on the loopback interface of this process's network namespace so far
/// (`/proc/net/dev` follows the namespace; `/sys/class/net` shows the one sysfs was mounted
/// in).
fn loopback_tx_bytes() -> Option<u64> {
    let dev = std::fs::read_to_string("/proc/net/dev").ok()?;
    let line = dev.lines().find(|l| l.trim_start().starts_with("lo:"))?;
    let fields: Vec<&str> = line.split(':').nth(1)?.split_whitespace().collect();
    // Eight receive counters, then the transmitted bytes.
    fields.get(8)?.parse().ok()
}

fn main() -> anyhow::Result<()> {
    let isolated = isolate_network();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(isolated))
}

async fn run(isolated: bool) -> anyhow::Result<()> {
    // Diagnostics: RUST_LOG=gaia_node=debug shows what the swarm actors do.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let mut args = std::env::args().skip(1);
    let nodes: usize = args.next().map_or(Ok(50), |a| a.parse())?;
    let requests: usize = args.next().map_or(Ok(50), |a| a.parse())?;
    let tokens: u32 = args.next().map_or(Ok(256), |a| a.parse())?;
    let heartbeat_ms: u64 = args
        .next()
        .map_or(Ok(DEFAULT_HEARTBEAT_MS), |a| a.parse())?;
    anyhow::ensure!(
        nodes >= 2 && requests >= 1 && tokens >= 2,
        "need 2+ nodes, 1+ requests, 2+ tokens"
    );

    let operator = SecretKey::generate();
    let manifest = Signed::sign(
        DomainManifest {
            name: "bench".into(),
            topic: "/gaia/bench/1".into(),
            operator: operator.node_id(),
            requirements: Requirements {
                accepted_model_hashes: vec![ContentHash::of(b"bench-model")],
                kb_hash: None,
                prompt_hash: None,
            },
            bootstrap: Vec::new(),
            admission: Admission::Open,
            created_at: unix_now(),
            version: 1,
            pricing: None,
        },
        &operator,
    )?;
    println!(
        "swarm bench: {nodes} nodes, heartbeat {heartbeat_ms} ms, {requests} chats of {tokens} tokens, {} cpus",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let rss0 = rss_mib();

    // 1. Convergence.
    let keys: Vec<SecretKey> = (0..nodes).map(|_| SecretKey::generate()).collect();
    let started = Instant::now();
    let mut running = vec![start(&keys[0], &manifest, None, heartbeat_ms).await?];
    let boot = addr(&running[0]).await?;
    for key in &keys[1..] {
        running.push(start(key, &manifest, Some(&boot), heartbeat_ms).await?);
    }
    let spawned = started.elapsed();
    let everyone = until_all(&running, started, |m| m.len() == nodes - 1).await?;
    let routable = until_all(&running, started, |m| {
        m.len() == nodes - 1 && m.iter().all(|m| m.routable)
    })
    .await?;
    println!(
        "convergence: {nodes} nodes spawned in {:.2} s; every table holds all {nodes} after {:.2} s, all routable after {:.2} s (RSS {:.0} MiB, {:.2} MiB per node)",
        spawned.as_secs_f64(),
        everyone.as_secs_f64(),
        routable.as_secs_f64(),
        rss_mib(),
        (rss_mib() - rss0) / nodes as f64,
    );

    // 2. A newcomer becomes routable by every member.
    let newcomer = SecretKey::generate();
    let id = newcomer.node_id();
    let started = Instant::now();
    let new = start(&newcomer, &manifest, Some(&boot), heartbeat_ms).await?;
    let seen = until_all(&running, started, |m| {
        m.iter().any(|m| m.node == id && m.routable)
    })
    .await?;
    println!(
        "newcomer: routable by all {nodes} members {:.2} s after its start",
        seen.as_secs_f64()
    );
    running.push(new);

    // 3. Steady-state traffic: everything the swarm sends (gossip adverts, mesh upkeep,
    // identify, ping, Kademlia, AutoNAT) over ten heartbeats, with no chats.
    if isolated {
        let window = Duration::from_millis(heartbeat_ms * 10);
        tokio::time::sleep(Duration::from_millis(heartbeat_ms * 2)).await;
        let before = loopback_tx_bytes();
        tokio::time::sleep(window).await;
        if let (Some(before), Some(after)) = (before, loopback_tx_bytes()) {
            let per_node = (after - before) as f64 / running.len() as f64 / window.as_secs_f64();
            println!(
                "steady traffic: {:.0} bytes per node per second sent ({} nodes, heartbeat {heartbeat_ms} ms, all protocols, TCP/IP headers included)",
                per_node,
                running.len()
            );
        }
    } else {
        println!(
            "steady traffic: not measured (run as root: the bench then has a network namespace of its own)"
        );
    }

    // 4. Routing overhead: node 0 serves; node 1 relays to it; node 0 also serves itself.
    let inbound = std::mem::replace(&mut running[0].inbound, mpsc::channel(1).1);
    fake_engine(inbound, tokens);
    let server = running[0].handle.clone();
    let client = running[1].handle.clone();
    // Warm up the stream path.
    for _ in 0..3 {
        one_chat(&client, server.node_id(), tokens).await?;
        one_chat(&server, server.node_id(), tokens).await?;
    }
    let (mut local_ttft, mut local_tok, mut relay_ttft, mut relay_tok) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..requests {
        let (t, p) = one_chat(&server, server.node_id(), tokens).await?;
        local_ttft.push(t);
        local_tok.push(p);
        let (t, p) = one_chat(&client, server.node_id(), tokens).await?;
        relay_ttft.push(t);
        relay_tok.push(p);
    }
    println!("routing overhead (fake engine, {tokens} tokens, {requests} chats each):");
    summary("local (same node)", local_ttft, local_tok);
    summary("relayed through a peer", relay_ttft, relay_tok);
    println!(
        "  (the model's own time to first token and decode speed come from examples/api_bench.rs)"
    );

    for node in &running {
        let _ = node.handle.shutdown().await;
    }
    Ok(())
}
