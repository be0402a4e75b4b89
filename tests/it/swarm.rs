//! Real libp2p swarms on loopback, in one process: joining a domain by topic (bootstrap peers
//! and the DHT), adverts seen by every member, chat relays with failover, rejection of an
//! uncertified node, revocations, and malformed frames.
//!
//! Each test runs a handful of swarms (a real swarm costs about a megabyte here) with short
//! heartbeats, and every wait has a deadline so that a failure fails instead of hanging.

use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{AsyncReadExt, AsyncWriteExt};
use gaia_node::swarm::{self, InboundChat, RelayEvent, Running, SwarmConfig, SwarmParams};
use gaia_protocol::advert::{Capabilities, Load};
use gaia_protocol::domain::{
    Admission, DomainManifest, MembershipCertificate, Requirements, Revocation,
};
use gaia_protocol::machine::failover;
use gaia_protocol::machine::membership::LocalService;
use gaia_protocol::machine::router::Needs;
use gaia_protocol::stream::{ErrorCode, FinishReason, StreamFrame, Usage};
use gaia_protocol::{ContentHash, NodeId, SecretKey, Signed, protocols};
use libp2p::{Multiaddr, StreamProtocol};
use tokio::sync::mpsc;

pub(crate) const WAIT: Duration = Duration::from_secs(20);
const HEARTBEAT_MS: u64 = 1000;

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

pub(crate) fn manifest(
    operator: &SecretKey,
    name: &str,
    admission: Admission,
) -> Signed<DomainManifest> {
    let manifest = DomainManifest {
        name: name.into(),
        topic: format!("/gaia/test/{name}"),
        operator: operator.node_id(),
        requirements: Requirements {
            accepted_model_hashes: vec![ContentHash::of(b"model")],
            kb_hash: None,
            prompt_hash: None,
        },
        bootstrap: Vec::new(),
        admission,
        created_at: unix_now(),
        version: 1,
        pricing: None,
    };
    Signed::sign(manifest, operator).expect("a valid manifest signs")
}

pub(crate) fn certificate(
    operator: &SecretKey,
    manifest: &Signed<DomainManifest>,
    member: NodeId,
    serial: u64,
) -> Signed<MembershipCertificate> {
    let cert = MembershipCertificate {
        domain: manifest.payload.id(),
        member,
        issued_at: unix_now() - 10,
        expires_at: unix_now() + 3600,
        serial,
    };
    Signed::sign(cert, operator).expect("a valid certificate signs")
}

pub(crate) fn service() -> LocalService {
    LocalService {
        model_name: "test-model".into(),
        model_hash: ContentHash::of(b"model"),
        kb_hash: None,
        prompt_hash: None,
        capabilities: Capabilities {
            tools: false,
            structured_output: false,
            context_length: 4096,
            max_tokens: 512,
        },
        load: Load {
            in_flight: 0,
            queued: 0,
            tokens_per_s: 10.0,
        },
        price: gaia_protocol::payment::Price::default(),
        addrs: Vec::new(),
    }
}

pub(crate) struct Node {
    pub(crate) key: SecretKey,
    pub(crate) running: Running,
}

impl Node {
    pub(crate) fn id(&self) -> NodeId {
        self.key.node_id()
    }

    /// The node's dialable address (loopback, with its peer id).
    pub(crate) async fn addr(&self) -> Multiaddr {
        let handle = self.running.handle.clone();
        let status = wait_for("a listen address", || {
            let handle = handle.clone();
            async move {
                let status = handle.status().await.ok()?;
                (!status.listen_addrs.is_empty()).then_some(status)
            }
        })
        .await;
        let addr = status
            .listen_addrs
            .iter()
            .find(|a| a.to_string().starts_with("/ip4/127.0.0.1/"))
            .cloned()
            .unwrap_or_else(|| status.listen_addrs[0].clone());
        addr.with(libp2p::multiaddr::Protocol::P2p(status.peer_id))
    }

    pub(crate) async fn member_ids(&self) -> Vec<NodeId> {
        self.running
            .handle
            .members()
            .await
            .map(|m| m.into_iter().map(|m| m.node).collect())
            .unwrap_or_default()
    }
}

pub(crate) async fn start(
    key: SecretKey,
    manifest: Option<Signed<DomainManifest>>,
    certificate: Option<Signed<MembershipCertificate>>,
    service: Option<LocalService>,
    bootstrap: &[Multiaddr],
) -> Node {
    let listen = "/ip4/127.0.0.1/tcp/0";
    start_on(listen, key, manifest, certificate, service, bootstrap).await
}

/// A node of a fresh identity that joins the open domain `manifest` through `bootstrap` and
/// serves chats.
pub(crate) async fn member(manifest: &Signed<DomainManifest>, bootstrap: &[Multiaddr]) -> Node {
    start(
        SecretKey::generate(),
        Some(manifest.clone()),
        None,
        Some(service()),
        bootstrap,
    )
    .await
}

/// [`start`], listening only on `listen`.
pub(crate) async fn start_on(
    listen: &str,
    key: SecretKey,
    manifest: Option<Signed<DomainManifest>>,
    certificate: Option<Signed<MembershipCertificate>>,
    service: Option<LocalService>,
    bootstrap: &[Multiaddr],
) -> Node {
    let config = SwarmConfig {
        listen: vec![listen.into()],
        bootstrap: bootstrap.iter().map(ToString::to_string).collect(),
        heartbeat_ms: HEARTBEAT_MS,
        ..SwarmConfig::default()
    };
    let seed = u64::from_le_bytes(key.node_id().0[..8].try_into().expect("8 bytes"));
    let running = swarm::spawn(SwarmParams {
        key: key.clone(),
        config,
        manifest,
        certificate,
        service,
        seed,
        state_dir: None,
        vouchers: None,
        voucher_source: None,
        content: None,
    })
    .await
    .expect("the swarm starts");
    Node { key, running }
}

/// Polls `check` until it returns `Some`, failing the test after [`WAIT`].
pub(crate) async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub(crate) async fn wait_members(node: &Node, expected: &[NodeId], what: &str) {
    wait_for(what, || async {
        let mut have = node.member_ids().await;
        have.sort();
        let mut want = expected.to_vec();
        want.sort();
        (have == want).then_some(())
    })
    .await;
}

/// What a fake engine saw of one request.
#[derive(Debug)]
pub(crate) struct Seen {
    pub(crate) from: NodeId,
    request: Vec<u8>,
    resume: Option<gaia_protocol::stream::Resume>,
}

/// A fake engine: answers each request with three tokens then `Done` (or, with `die_after`,
/// stops after that many tokens without an end frame, as a crashing node would).
pub(crate) fn fake_engine(
    mut inbound: mpsc::Receiver<InboundChat>,
    label: &'static str,
    die_after: Option<usize>,
    seen: mpsc::Sender<Seen>,
) {
    tokio::spawn(async move {
        while let Some(chat) = inbound.recv().await {
            let start = chat.resume.as_ref().map_or(0, |r| r.tokens_sent);
            let _ = seen.try_send(Seen {
                from: chat.from,
                request: chat.request.clone(),
                resume: chat.resume.clone(),
            });
            let reply = chat.reply;
            tokio::spawn(async move {
                for i in 0..3u32 {
                    if die_after.is_some_and(|n| i as usize >= n) {
                        return; // dropping `reply` without Done
                    }
                    let frame = StreamFrame::Token {
                        text: format!("{label}{} ", start + i),
                        index: start + i,
                        logprob: None,
                        top_logprobs: Vec::new(),
                    };
                    if reply.send(frame).await.is_err() {
                        return;
                    }
                }
                let _ = reply
                    .send(StreamFrame::Done {
                        usage: Usage {
                            prompt_tokens: 1,
                            completion_tokens: 3,
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

/// Waits until `node` accepts chat requests from `from` (a gateway's certificate travels by
/// gossip, so it reaches members a moment after the connection).
pub(crate) async fn wait_authorized(from: &Node, node: NodeId) {
    wait_for("the node to accept the gateway's requests", || async {
        let mut chat = from
            .running
            .handle
            .open_chat(node, b"{}".to_vec())
            .await
            .ok()?;
        let mut authorized = false;
        while let Ok(Some(Ok(frame))) = tokio::time::timeout(WAIT, chat.recv()).await {
            match frame {
                StreamFrame::Error {
                    code: ErrorCode::Unauthorized,
                    ..
                } => return None,
                StreamFrame::Done { .. } | StreamFrame::Error { .. } => return Some(()),
                _ => authorized = true,
            }
        }
        authorized.then_some(())
    })
    .await;
}

fn allow_all(nodes: &[&SecretKey]) -> Admission {
    Admission::AllowList(nodes.iter().map(|k| k.node_id()).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_by_bootstrap_see_adverts_and_leave_cleanly() {
    let operator = SecretKey::generate();
    let keys: Vec<SecretKey> = (0..3).map(|_| SecretKey::generate()).collect();
    let refs: Vec<&SecretKey> = keys.iter().collect();
    let m = manifest(&operator, "join", allow_all(&refs));
    let cert = |k: &SecretKey, s| Some(certificate(&operator, &m, k.node_id(), s));

    let a = start(
        keys[0].clone(),
        Some(m.clone()),
        cert(&keys[0], 1),
        Some(service()),
        &[],
    )
    .await;
    let boot = [a.addr().await];
    let b = start(
        keys[1].clone(),
        Some(m.clone()),
        cert(&keys[1], 2),
        Some(service()),
        &boot,
    )
    .await;
    wait_members(&a, &[b.id()], "a to see b").await;
    wait_members(&b, &[a.id()], "b to see a").await;

    let joined = Instant::now();
    let c = start(
        keys[2].clone(),
        Some(m.clone()),
        cert(&keys[2], 3),
        Some(service()),
        &boot,
    )
    .await;
    wait_members(&c, &[a.id(), b.id()], "c to see a and b").await;
    wait_members(&a, &[b.id(), c.id()], "a to see c").await;
    wait_members(&b, &[a.id(), c.id()], "b to see c").await;
    eprintln!(
        "figure: a new node was in every member's table {} ms after it started",
        joined.elapsed().as_millis()
    );

    let members = a.running.handle.members().await.expect("members");
    let advert = &members.iter().find(|m| m.node == c.id()).expect("c").advert;
    assert_eq!(advert.model_name, "test-model");
    assert!(advert.addrs.iter().any(|addr| addr.contains("/p2p/")));
    assert!(members.iter().all(|m| m.routable));

    // A clean leave is seen at once (not after three heartbeats).
    let left = Instant::now();
    c.running.handle.shutdown().await.expect("c leaves");
    wait_members(&a, &[b.id()], "a to drop c").await;
    wait_members(&b, &[a.id()], "b to drop c").await;
    assert!(
        left.elapsed() < Duration::from_millis(3 * HEARTBEAT_MS),
        "leave took {:?}",
        left.elapsed()
    );

    // A node that dies silently leaves within three heartbeats (plus one of slack).
    let died = Instant::now();
    b.running.task.abort();
    drop(b.running.handle);
    wait_members(&a, &[], "a to drop the silent b").await;
    assert!(
        died.elapsed() < Duration::from_millis(5 * HEARTBEAT_MS + 1000),
        "silence took {:?}",
        died.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_join_and_relay_a_chat_over_quic_only() {
    let operator = SecretKey::generate();
    let m = manifest(&operator, "quic", Admission::Open);
    let quic = "/ip4/127.0.0.1/udp/0/quic-v1";
    let mut a = start_on(
        quic,
        SecretKey::generate(),
        Some(m.clone()),
        None,
        Some(service()),
        &[],
    )
    .await;
    let boot = a.addr().await;
    assert!(
        boot.to_string().contains("/udp/") && boot.to_string().contains("/quic-v1/"),
        "{boot}"
    );
    let b = start_on(
        quic,
        SecretKey::generate(),
        Some(m.clone()),
        None,
        Some(service()),
        std::slice::from_ref(&boot),
    )
    .await;
    wait_members(&a, &[b.id()], "a to see b over quic").await;
    wait_members(&b, &[a.id()], "b to see a over quic").await;
    // Every address either side advertises is a QUIC one: nothing went over TCP.
    let members = b.running.handle.members().await.expect("members");
    let advert = &members.iter().find(|m| m.node == a.id()).expect("a").advert;
    assert!(!advert.addrs.is_empty());
    assert!(
        advert.addrs.iter().all(|addr| addr.contains("/quic-v1/")),
        "{:?}",
        advert.addrs
    );

    let (seen_tx, mut seen) = mpsc::channel(16);
    let inbound = std::mem::replace(&mut a.running.inbound, mpsc::channel(1).1);
    fake_engine(inbound, "a", None, seen_tx);
    let mut chat = b
        .running
        .handle
        .open_chat(a.id(), b"{\"messages\":[]}".to_vec())
        .await
        .expect("b opens a chat stream to a over quic");
    let mut text = String::new();
    loop {
        match tokio::time::timeout(WAIT, chat.recv())
            .await
            .expect("a frame in time")
        {
            Some(Ok(StreamFrame::Token { text: t, .. })) => text.push_str(&t),
            Some(Ok(StreamFrame::Done { .. })) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(text, "a0 a1 a2 ");
    let request = seen.recv().await.expect("a saw the request");
    assert_eq!(request.from, b.id());
    assert_eq!(request.request, b"{\"messages\":[]}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replayed_or_miscounted_receipts_are_refused_and_the_client_still_served() {
    use gaia_protocol::payment::Receipt;

    let operator = SecretKey::generate();
    let m = manifest(&operator, "receipts", Admission::Open);
    let domain = m.payload.id();
    let server_key = SecretKey::generate();
    let mut a = start(
        server_key.clone(),
        Some(m.clone()),
        None,
        Some(service()),
        &[],
    )
    .await;
    let boot = [a.addr().await];
    // The entry node serves no model: every chat goes to `a`.
    let b = start(SecretKey::generate(), Some(m.clone()), None, None, &boot).await;
    wait_members(&b, &[a.id()], "b to see a").await;

    // `a` answers four chats, each with one token, and returns in turn: a good receipt, one
    // that overstates the completion, one signed by a stranger, and the first one again.
    let mut inbound = std::mem::replace(&mut a.running.inbound, mpsc::channel(1).1);
    let stranger = SecretKey::generate();
    tokio::spawn(async move {
        let mut first: Option<Signed<Receipt>> = None;
        let mut k = 0;
        while let Some(chat) = inbound.recv().await {
            let mut receipt = Receipt {
                request_id: chat.id,
                domain,
                node: server_key.node_id(),
                client: chat.from,
                model_hash: service().model_hash,
                prompt_tokens: 1,
                completion_tokens: 1,
                prompt_price: 0,
                timestamp: unix_now(),
                completion_price: 0,
            };
            let signed = match k {
                0 => Signed::sign(receipt, &server_key).ok(),
                1 => {
                    receipt.completion_tokens = 5;
                    Signed::sign(receipt, &server_key).ok()
                }
                2 => {
                    receipt.node = stranger.node_id();
                    Signed::sign(receipt, &stranger).ok()
                }
                _ => first.clone(),
            };
            if k == 0 {
                first = signed.clone();
            }
            k += 1;
            let token = StreamFrame::Token {
                text: "x".into(),
                index: 0,
                logprob: None,
                top_logprobs: Vec::new(),
            };
            let _ = chat.reply.send(token).await;
            let done = StreamFrame::Done {
                usage: Usage {
                    prompt_tokens: 1,
                    completion_tokens: 1,
                },
                cached_tokens: 0,
                finish_reason: FinishReason::Stop,
                receipt: signed,
            };
            let _ = chat.reply.send(done).await;
        }
    });

    let mut kept = Vec::new();
    for _ in 0..4 {
        let mut relay = b.running.handle.chat(
            Needs::default(),
            "{\"messages\":[]}".into(),
            failover::Config::default(),
        );
        let mut text = String::new();
        loop {
            match tokio::time::timeout(WAIT, relay.recv())
                .await
                .expect("an event in time")
            {
                Some(RelayEvent::Output(failover::ClientOutput::Token(t))) => {
                    text.push_str(&t.text)
                }
                Some(RelayEvent::Done { receipt, .. }) => {
                    kept.push(receipt.is_some());
                    break;
                }
                Some(RelayEvent::Failed(error)) => panic!("relay failed: {error}"),
                Some(_) => {}
                None => panic!("relay ended without a last event"),
            }
        }
        // A refused receipt costs the serving node its pay, not the client its answer.
        assert_eq!(text, "x");
    }
    assert_eq!(kept, [true, false, false, false]);
    let meter = b.running.handle.meter().expect("a member meters");
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(count(&meter.counters.accepted), 1);
    assert_eq!(count(&meter.counters.refused), 3);
    assert_eq!(count(&meter.counters.missing), 0);
    let owed = meter.owed_by_clients();
    assert_eq!(owed.len(), 1, "{owed:?}");
    assert_eq!(owed[&a.id()].completion_tokens, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_found_through_the_dht_joins() {
    // `r` is in no domain: it only runs the DHT. `b` and `c` know only `r`; `c` finds `b` as a
    // provider of the domain's key.
    let operator = SecretKey::generate();
    let m = manifest(&operator, "dht", Admission::Open);
    let r = start(SecretKey::generate(), None, None, None, &[]).await;
    let boot = [r.addr().await];
    let b = member(&m, &boot).await;
    let c = member(&m, &boot).await;
    wait_members(&c, &[b.id()], "c to find b through the DHT").await;
    wait_members(&b, &[c.id()], "b to see c").await;
    assert!(r.member_ids().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_relays_chats_and_fails_over_mid_stream() {
    let operator = SecretKey::generate();
    let keys: Vec<SecretKey> = (0..3).map(|_| SecretKey::generate()).collect();
    let refs: Vec<&SecretKey> = keys.iter().collect();
    let m = manifest(&operator, "relay", allow_all(&refs));
    let cert = |k: &SecretKey, s| Some(certificate(&operator, &m, k.node_id(), s));

    // The gateway serves no model.
    let gw = start(
        keys[0].clone(),
        Some(m.clone()),
        cert(&keys[0], 1),
        None,
        &[],
    )
    .await;
    let boot = [gw.addr().await];
    let mut b = start(
        keys[1].clone(),
        Some(m.clone()),
        cert(&keys[1], 2),
        Some(service()),
        &boot,
    )
    .await;
    let (seen_tx, mut seen_b) = mpsc::channel(16);
    let inbound = std::mem::replace(&mut b.running.inbound, mpsc::channel(1).1);
    fake_engine(inbound, "b", None, seen_tx);
    wait_members(&gw, &[b.id()], "the gateway to see b").await;
    wait_authorized(&gw, b.id()).await;
    while seen_b.try_recv().is_ok() {}

    // One relayed chat.
    let started = Instant::now();
    let mut chat = gw
        .running
        .handle
        .open_chat(b.id(), b"{\"messages\":[]}".to_vec())
        .await
        .expect("open");
    let mut text = String::new();
    let mut first_token = None;
    loop {
        match tokio::time::timeout(WAIT, chat.recv())
            .await
            .expect("a frame in time")
        {
            Some(Ok(StreamFrame::Token { text: t, .. })) => {
                first_token.get_or_insert_with(|| started.elapsed());
                text.push_str(&t);
            }
            Some(Ok(StreamFrame::Done { .. })) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(text, "b0 b1 b2 ");
    let request = seen_b.recv().await.expect("b saw the request");
    assert!(request.resume.is_none());
    assert_eq!(request.from, gw.id());
    assert_eq!(request.request, b"{\"messages\":[]}");
    eprintln!(
        "figure: relayed chat through a peer: first token {:?}, whole stream {:?}",
        first_token.unwrap_or_default(),
        started.elapsed()
    );

    // Failover: `c` dies after its first token; `b` takes over from where `c` stopped.
    let mut c = start(
        keys[2].clone(),
        Some(m.clone()),
        cert(&keys[2], 3),
        Some(service()),
        &boot,
    )
    .await;
    let (seen_c_tx, mut seen_c) = mpsc::channel(16);
    let inbound = std::mem::replace(&mut c.running.inbound, mpsc::channel(1).1);
    fake_engine(inbound, "c", Some(1), seen_c_tx);
    wait_members(&gw, &[b.id(), c.id()], "the gateway to see c").await;
    wait_authorized(&gw, c.id()).await;
    while seen_c.try_recv().is_ok() {}

    // Route until `c` is chosen first (the router spreads requests), then check the failover.
    let mut saw_failover = false;
    for _ in 0..20 {
        let mut relay = gw.running.handle.chat(
            Needs::default(),
            "{\"messages\":[]}".into(),
            failover::Config::default(),
        );
        let mut serving = Vec::new();
        let mut text = String::new();
        loop {
            match tokio::time::timeout(WAIT, relay.recv())
                .await
                .expect("an event in time")
            {
                Some(RelayEvent::Serving { node, .. }) => serving.push(node),
                Some(RelayEvent::Output(failover::ClientOutput::Token(t))) => {
                    text.push_str(&t.text)
                }
                Some(RelayEvent::Output(other)) => panic!("unexpected {other:?}"),
                Some(RelayEvent::Done { node, attempts, .. }) => {
                    assert_eq!(node, b.id());
                    if serving == [c.id(), b.id()] {
                        assert_eq!(attempts, 2);
                        // c sent token 0, b continued from token 1.
                        assert_eq!(text, "c0 b1 b2 b3 ");
                        let resume = loop {
                            let seen = tokio::time::timeout(WAIT, seen_b.recv())
                                .await
                                .expect("b saw the resumed request in time")
                                .expect("b's engine runs");
                            if let Some(resume) = seen.resume {
                                break resume;
                            }
                        };
                        assert_eq!(resume.text, "c0 ");
                        assert_eq!(resume.tokens_sent, 1);
                        saw_failover = true;
                    } else {
                        assert_eq!(serving, [b.id()]);
                    }
                    break;
                }
                Some(RelayEvent::Failed(error)) => panic!("relay failed: {error}"),
                None => panic!("relay ended without a last event"),
            }
        }
        while seen_c.try_recv().is_ok() {}
        if saw_failover {
            break;
        }
    }
    assert!(saw_failover, "the router never picked c in 20 requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncertified_node_is_rejected_and_revocation_takes_effect() {
    let operator = SecretKey::generate();
    let keys: Vec<SecretKey> = (0..3).map(|_| SecretKey::generate()).collect();
    let outsider = SecretKey::generate();
    let refs: Vec<&SecretKey> = keys.iter().collect();
    let m = manifest(&operator, "guarded", allow_all(&refs));
    let cert = |k: &SecretKey, s| Some(certificate(&operator, &m, k.node_id(), s));

    let a = start(
        keys[0].clone(),
        Some(m.clone()),
        cert(&keys[0], 1),
        Some(service()),
        &[],
    )
    .await;
    let boot = [a.addr().await];
    let mut b = start(
        keys[1].clone(),
        Some(m.clone()),
        cert(&keys[1], 2),
        Some(service()),
        &boot,
    )
    .await;
    let (seen_tx, _seen) = mpsc::channel(16);
    let inbound = std::mem::replace(&mut b.running.inbound, mpsc::channel(1).1);
    fake_engine(inbound, "b", None, seen_tx);
    let c = start(
        keys[2].clone(),
        Some(m.clone()),
        cert(&keys[2], 3),
        Some(service()),
        &boot,
    )
    .await;
    wait_members(&a, &[b.id(), c.id()], "a to see b and c").await;
    wait_members(&c, &[a.id(), b.id()], "c to see a and b").await;

    // The outsider believes in a look-alike open domain on the same topic: its adverts are
    // for another domain, and it has no certificate for the real one.
    let fake = manifest(&outsider, "guarded", Admission::Open);
    let mut fake = fake.payload;
    fake.topic = m.payload.topic.clone();
    let fake = Signed::sign(fake, &outsider).expect("signs");
    let u = start(outsider.clone(), Some(fake), None, Some(service()), &boot).await;
    wait_for("a to penalise the outsider", || async {
        let status = a.running.handle.status().await.ok()?;
        status
            .penalised
            .iter()
            .any(|(peer, _)| *peer == u.running.handle.peer_id())
            .then_some(())
    })
    .await;
    assert!(!a.member_ids().await.contains(&outsider.node_id()));
    // Its chat request is refused.
    let mut chat = u.running.handle.open_chat(b.id(), b"{}".to_vec()).await;
    if chat.is_err() {
        // b's address comes from a's snapshot, which the outsider cannot get: ask via a.
        chat = u.running.handle.open_chat(a.id(), b"{}".to_vec()).await;
    }
    let mut chat = chat.expect("the stream opens");
    match tokio::time::timeout(WAIT, chat.recv())
        .await
        .expect("an answer in time")
    {
        Some(Ok(StreamFrame::Error { code, message })) => {
            assert_eq!(code, ErrorCode::Unauthorized, "{message}");
        }
        other => panic!("expected an Unauthorized error, got {other:?}"),
    }

    // The operator revokes b; the revocation is published through a and reaches c.
    let revocation = Signed::sign(
        Revocation {
            domain: m.payload.id(),
            member: b.id(),
            serial: 2,
            revoked_at: unix_now(),
        },
        &operator,
    )
    .expect("signs");
    a.running
        .handle
        .publish_revocation(revocation)
        .await
        .expect("published");
    wait_members(&a, &[c.id()], "a to drop b").await;
    wait_members(&c, &[a.id()], "c to drop b").await;
    // b's requests are refused now.
    let mut chat = b
        .running
        .handle
        .open_chat(c.id(), b"{}".to_vec())
        .await
        .expect("opens");
    match tokio::time::timeout(WAIT, chat.recv())
        .await
        .expect("an answer in time")
    {
        Some(Ok(StreamFrame::Error { code, .. })) => assert_eq!(code, ErrorCode::Unauthorized),
        other => panic!("expected an Unauthorized error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_the_stream_and_penalise_the_sender() {
    let operator = SecretKey::generate();
    let m = manifest(&operator, "hardened", Admission::Open);
    let a = member(&m, &[]).await;
    let boot = [a.addr().await];
    let x = member(&m, &boot).await;
    wait_members(&a, &[x.id()], "a to see x").await;
    let a_peer = a.running.handle.peer_id();
    let x_peer = x.running.handle.peer_id();
    let control = x.running.handle.clone();

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("oversized length", u32::MAX.to_be_bytes().to_vec()),
        ("zero length", vec![0, 0, 0, 0]),
        ("garbage body", vec![0, 0, 0, 4, 0xde, 0xad, 0xbe, 0xef]),
        ("truncated", vec![0, 0, 1, 0, 1, 2, 3]),
    ];
    'outer: for protocol in [protocols::STREAM, protocols::CONTROL] {
        for (what, bytes) in &cases {
            // Once banned, x cannot even open a stream: that is the penalty working.
            let Some(mut stream) = swarm_stream(&control, a_peer, protocol).await else {
                break 'outer;
            };
            let _ = stream.write_all(bytes).await;
            let _ = stream.close().await;
            // The node closes the stream (or answers an error) without crashing.
            let mut rest = Vec::new();
            let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
            assert!(read.is_ok(), "{protocol} {what}: the stream was not closed");
        }
    }
    wait_for("a to penalise x", || async {
        let status = a.running.handle.status().await.ok()?;
        status
            .penalised
            .iter()
            .any(|(peer, _)| *peer == x_peer)
            .then_some(())
    })
    .await;
    // a still works.
    assert!(a.running.handle.status().await.is_ok());
}

pub(crate) async fn swarm_stream(
    handle: &gaia_node::swarm::SwarmHandle,
    peer: libp2p::PeerId,
    protocol: &'static str,
) -> Option<libp2p::Stream> {
    let mut control = handle.stream_control();
    let open = control.open_stream(peer, StreamProtocol::new(protocol));
    tokio::time::timeout(Duration::from_secs(5), open)
        .await
        .ok()?
        .ok()
}
