//! Protocol hardening: a real node on loopback receives 10,000 hostile inputs over its real
//! protocols (chat streams, control RPCs, gossip) from a rotating crowd of attacker swarms:
//! malformed, truncated and oversized frames, tampered payloads and forged signatures (adverts
//! signed by the wrong key, certificates for another domain or from a non-operator, expired and
//! replayed certificates, forged revocations).
//!
//! It asserts that the node does not panic, that every attacker is penalised (and most banned,
//! after which its connections are refused), that the process's memory stays bounded, and that
//! the node still serves a legitimate member afterwards (a relay round trip).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{AsyncReadExt, AsyncWriteExt};
use gaia_protocol::advert::Advert;
use gaia_protocol::codec::{MAX_FRAME, encode_frame};
use gaia_protocol::control::{ControlRequest, MemberEntry};
use gaia_protocol::domain::{Admission, DomainManifest, MembershipCertificate, Revocation};
use gaia_protocol::gossip::GossipMessage;
use gaia_protocol::stream::{FinishReason, RequestId, StreamFrame};
use gaia_protocol::{SecretKey, Signed, protocols};
use libp2p::PeerId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;

use crate::swarm::{
    WAIT, certificate, fake_engine, manifest, service, start, swarm_stream, unix_now,
    wait_authorized, wait_for, wait_members,
};

/// Hostile inputs the node must read (written on an open stream or published on the topic).
const HOSTILE: usize = 10_000;
/// Attackers running at once.
const PARALLEL: usize = 4;
/// Stream frames one attacker sends at once (the node bans it after a handful of offences).
const STREAM_BURST: usize = 8;
/// Gossip messages one attacker publishes before its stream burst.
const GOSSIP_BURST: usize = 4;
/// Most resident memory the whole test process may gain during the attack.
const RSS_BOUND_KIB: u64 = 256 * 1024;

/// The hardening tests run one at a time: the memory bound is for one attack.
static ONE_ATTACK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The resident set size of this process, from `/proc/self/status`.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line in /proc/self/status")
}

/// What the attack needs to forge its messages.
struct Forgery {
    /// The attacked domain's manifest.
    real: Signed<DomainManifest>,
    /// Its operator (to sign certificates that are expired or for the wrong member).
    operator: SecretKey,
    /// Another domain's operator and manifest.
    other_operator: SecretKey,
    other: Signed<DomainManifest>,
    /// A legitimate member whose adverts the attacker replays or impersonates.
    member: SecretKey,
}

/// A plausible advert of `node` in `domain` (to be forged by the caller).
fn advert_for(node: &SecretKey, domain: gaia_protocol::domain::DomainId) -> Advert {
    // The same service the legitimate test nodes advertise.
    let s = crate::swarm::service();
    Advert {
        node: node.node_id(),
        domain,
        seq: 1,
        model_name: s.model_name,
        model_hash: s.model_hash,
        kb_hash: s.kb_hash,
        prompt_hash: s.prompt_hash,
        capabilities: s.capabilities,
        load: s.load,
        prompt_price: s.price.prompt,
        addrs: s.addrs,
        sent_at: unix_now(),
        leaving: false,
        completion_price: s.price.completion,
    }
}

fn frame_header(len: u32) -> Vec<u8> {
    len.to_be_bytes().to_vec()
}

fn random_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    (0..len).map(|_| rng.r#gen()).collect()
}

fn flip_byte(rng: &mut StdRng, mut bytes: Vec<u8>, from: usize) -> Vec<u8> {
    let at = rng.gen_range(from.min(bytes.len() - 1)..bytes.len());
    bytes[at] ^= 1 << rng.gen_range(0..8);
    bytes
}

/// One malformed chat-stream or control-RPC input (raw bytes written on the stream).
fn stream_input(rng: &mut StdRng, kind: usize) -> Vec<u8> {
    match kind % 7 {
        // Oversized: a length header above the limit (the node must not allocate it).
        0 => {
            let mut bytes = frame_header(rng.gen_range(MAX_FRAME as u32 + 1..=u32::MAX));
            bytes.extend(random_bytes(rng, 16));
            bytes
        }
        // An empty frame.
        1 => frame_header(0),
        // A well-framed body of garbage.
        2 => {
            let len = rng.gen_range(1..512);
            let mut bytes = frame_header(len);
            bytes.extend(random_bytes(rng, len as usize));
            bytes
        }
        // Truncated: the header announces more than is sent before the stream closes.
        3 => {
            let len = rng.gen_range(64..8192);
            let mut bytes = frame_header(len);
            let sent = rng.gen_range(0..len as usize);
            bytes.extend(random_bytes(rng, sent));
            bytes
        }
        // A valid request with one bit flipped in its body.
        4 => {
            let frame = StreamFrame::Request {
                id: RequestId::random(),
                body_json: r#"{"messages":[{"role":"user","content":"hi"}]}"#.into(),
                resume: None,
                certificate: None,
            };
            flip_byte(rng, encode_frame(&frame).expect("encodes"), 4)
        }
        // A valid frame that is not a request (a reply frame sent to the server).
        5 => encode_frame(&StreamFrame::Error {
            code: gaia_protocol::stream::ErrorCode::Internal,
            message: "not a request".into(),
        })
        .expect("encodes"),
        // Random bytes, possibly shorter than a header.
        _ => {
            let len = rng.gen_range(1..64);
            random_bytes(rng, len)
        }
    }
}

/// One malformed control request (the control codec's own frame types).
fn control_input(rng: &mut StdRng, kind: usize) -> Vec<u8> {
    if kind.is_multiple_of(3) {
        let request = ControlRequest::MemberSnapshot {
            domain: gaia_protocol::domain::DomainId(rng.r#gen()),
            after: None,
        };
        flip_byte(rng, encode_frame(&request).expect("encodes"), 4)
    } else {
        stream_input(rng, kind)
    }
}

/// One hostile gossip message: garbage, or a well-formed message with a bad signature or a
/// certificate the domain must not accept.
fn gossip_input(rng: &mut StdRng, kind: usize, attacker: &SecretKey, f: &Forgery) -> Vec<u8> {
    let domain = f.real.payload.id();
    let now = unix_now();
    let seq: u64 = rng.r#gen::<u32>().into();
    let advert = |node: &SecretKey| {
        let mut advert = advert_for(node, domain);
        advert.seq = seq;
        advert
    };
    let message = match kind % 8 {
        // Garbage.
        0 => {
            let len = rng.gen_range(1..256);
            return random_bytes(rng, len);
        }
        // A member's advert signed by the attacker's key (impersonation).
        1 => {
            let mut signed = Signed::sign(advert(attacker), attacker).expect("signs");
            signed.payload.node = f.member.node_id();
            signed.signer = f.member.node_id();
            GossipMessage::Advert(MemberEntry {
                advert: signed.into(),
                certificate: None,
            })
        }
        // An advert whose payload was changed after signing.
        2 => {
            let mut signed = Signed::sign(advert(attacker), attacker).expect("signs");
            signed.payload.model_name = "tampered".into();
            signed.payload.prompt_price = 1;
            GossipMessage::Advert(MemberEntry {
                advert: signed.into(),
                certificate: None,
            })
        }
        // An advert carrying a certificate for another domain.
        3 => {
            let cert = MembershipCertificate {
                domain: f.other.payload.id(),
                member: attacker.node_id(),
                issued_at: now - 10,
                expires_at: now + 3600,
                serial: rng.r#gen(),
            };
            GossipMessage::Advert(MemberEntry {
                advert: Signed::sign(advert(attacker), attacker)
                    .expect("signs")
                    .into(),
                certificate: Some(Signed::sign(cert, &f.other_operator).expect("signs").into()),
            })
        }
        // A certificate for this domain signed by someone other than its operator.
        4 => {
            let cert = MembershipCertificate {
                domain,
                member: attacker.node_id(),
                issued_at: now - 10,
                expires_at: now + 3600,
                serial: rng.r#gen(),
            };
            GossipMessage::Certificate {
                certificate: Signed::sign(cert, attacker).expect("signs"),
                sent_at: now * 1000,
            }
        }
        // An expired certificate, signed by the real operator, replayed.
        5 => {
            let cert = MembershipCertificate {
                domain,
                member: attacker.node_id(),
                issued_at: now - 7200 - u64::from(rng.r#gen::<u16>()),
                expires_at: now - 3600,
                serial: rng.r#gen(),
            };
            GossipMessage::Certificate {
                certificate: Signed::sign(cert, &f.operator).expect("signs"),
                sent_at: now * 1000,
            }
        }
        // A revocation of a legitimate member, not signed by the operator.
        6 => GossipMessage::Revocation(
            Signed::sign(
                Revocation {
                    domain,
                    member: f.member.node_id(),
                    serial: rng.r#gen(),
                    revoked_at: now,
                },
                attacker,
            )
            .expect("signs"),
        ),
        // A well-formed message with one bit flipped.
        _ => {
            let entry = MemberEntry {
                advert: Signed::sign(advert(attacker), attacker)
                    .expect("signs")
                    .into(),
                certificate: None,
            };
            let bytes = GossipMessage::Advert(entry).encode().expect("encodes");
            return flip_byte(rng, bytes, 3);
        }
    };
    message.encode().expect("a forged message still encodes")
}

/// What one attacker achieved.
#[derive(Debug, Default)]
struct Outcome {
    peer: Option<PeerId>,
    /// Inputs the node had to read.
    delivered: usize,
    /// Attempts refused (stream not opened, or publish impossible once disconnected).
    refused: usize,
}

/// Runs one attacker: joins the topic under a look-alike manifest, publishes hostile gossip,
/// then opens a burst of streams with hostile frames.
async fn attack(
    victim: libp2p::Multiaddr,
    victim_peer: PeerId,
    fake: Signed<DomainManifest>,
    f: std::sync::Arc<Forgery>,
    seed: u64,
    budget: usize,
) -> Outcome {
    let mut rng = StdRng::seed_from_u64(seed);
    let key = SecretKey::generate();
    let node = start(key.clone(), Some(fake), None, None, &[victim]).await;
    let handle = node.running.handle.clone();
    let mut outcome = Outcome {
        peer: Some(handle.peer_id()),
        ..Outcome::default()
    };
    // Gossip, once the victim's subscription is known (a few milliseconds after connecting).
    let gossip = GOSSIP_BURST.min(budget);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut sent = 0;
    while sent < gossip {
        let bytes = gossip_input(&mut rng, (seed as usize) * GOSSIP_BURST + sent, &key, &f);
        match handle.publish_raw_gossip(bytes).await {
            Ok(()) => {
                sent += 1;
                outcome.delivered += 1;
            }
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(_) => {
                outcome.refused += gossip - sent;
                break;
            }
        }
    }
    // A burst of streams, all opened at once: the node reads each before the ban lands.
    let burst = STREAM_BURST.min(budget - sent);
    let inputs: Vec<(&'static str, Vec<u8>)> = (0..burst)
        .map(|i| {
            let kind = seed as usize + i;
            if i.is_multiple_of(2) {
                (protocols::STREAM, stream_input(&mut rng, kind))
            } else {
                (protocols::CONTROL, control_input(&mut rng, kind))
            }
        })
        .collect();
    let sends = inputs.into_iter().map(|(protocol, bytes)| {
        let handle = handle.clone();
        async move {
            let Some(mut stream) = swarm_stream(&handle, victim_peer, protocol).await else {
                return false;
            };
            if stream.write_all(&bytes).await.is_err() {
                return false;
            }
            let _ = stream.close().await;
            let mut rest = Vec::new();
            // The node closes the stream (or answers with an error) without hanging.
            let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
            assert!(
                read.is_ok(),
                "{protocol}: the node neither answered nor closed"
            );
            true
        }
    });
    for delivered in futures::future::join_all(sends).await {
        if delivered {
            outcome.delivered += 1;
        } else {
            outcome.refused += 1;
        }
    }
    let _ = handle.shutdown().await;
    node.running.task.abort();
    outcome
}

/// Held by each test of this file for its whole run: both measure penalties that a victim
/// hands out within timing windows (a re-wrap is a copy within a quarter heartbeat), and the
/// ten-thousand-input flood, run beside the other on a 2-core machine, starved its victim
/// enough that the re-wrapper's penalties did not add up in time (seen in CI runs). One at a
/// time, each test measures its own attacks.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long an attacker of `replays_rewraps_and_floods_get_their_sender_penalised` keeps
/// attacking before its penalties must have added up (it stops at once when they have).
const ATTACK_FOR: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_hostile_inputs_leave_the_node_serving_and_the_senders_banned() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let _one = ONE_ATTACK.lock().await;
    let started = Instant::now();
    let operator = SecretKey::generate();
    let (victim_key, member_key) = (SecretKey::generate(), SecretKey::generate());
    let real = manifest(
        &operator,
        "fortress",
        Admission::AllowList(vec![victim_key.node_id(), member_key.node_id()]),
    );
    let other_operator = SecretKey::generate();
    let other = manifest(&other_operator, "elsewhere", Admission::Open);

    // The victim serves a fake engine; a legitimate member talks to it before and after.
    let mut victim = start(
        victim_key.clone(),
        Some(real.clone()),
        Some(certificate(&operator, &real, victim_key.node_id(), 1)),
        Some(service()),
        &[],
    )
    .await;
    let (seen_tx, mut seen) = mpsc::channel(64);
    let inbound = std::mem::replace(&mut victim.running.inbound, mpsc::channel(1).1);
    fake_engine(inbound, "v", None, seen_tx);
    let victim_addr = victim.addr().await;
    let victim_peer = victim.running.handle.peer_id();
    let member = start(
        member_key.clone(),
        Some(real.clone()),
        Some(certificate(&operator, &real, member_key.node_id(), 2)),
        Some(service()),
        std::slice::from_ref(&victim_addr),
    )
    .await;
    wait_members(&victim, &[member.id()], "the victim to see the member").await;
    wait_authorized(&member, victim.id()).await;
    while seen.try_recv().is_ok() {}

    // Attackers share a look-alike open manifest on the real topic (signed by one of them).
    let fake_operator = SecretKey::generate();
    let mut fake = manifest(&fake_operator, "fortress", Admission::Open).payload;
    fake.topic = real.payload.topic.clone();
    let fake = Signed::sign(fake, &fake_operator).expect("signs");
    let forgery = std::sync::Arc::new(Forgery {
        real: real.clone(),
        operator,
        other_operator,
        other,
        member: member_key.clone(),
    });

    // A few attackers first, so that the baseline includes the allocator's warm-up.
    let warm = attack(
        victim_addr.clone(),
        victim_peer,
        fake.clone(),
        forgery.clone(),
        u64::MAX / 2,
        STREAM_BURST,
    )
    .await;
    assert!(
        warm.delivered > 0,
        "the first attacker could not reach the node: {warm:?}"
    );
    let rss_before = rss_kib();

    let mut delivered = 0;
    let mut refused = 0;
    let mut attackers: Vec<PeerId> = Vec::new();
    let mut running = tokio::task::JoinSet::new();
    let mut seed = 0u64;
    while delivered < HOSTILE || !running.is_empty() {
        while running.len() < PARALLEL
            && delivered + running.len() * (GOSSIP_BURST + STREAM_BURST) < HOSTILE
        {
            let budget = GOSSIP_BURST + STREAM_BURST;
            running.spawn(attack(
                victim_addr.clone(),
                victim_peer,
                fake.clone(),
                forgery.clone(),
                seed,
                budget,
            ));
            seed += 1;
        }
        let Some(outcome) = running.join_next().await else {
            break;
        };
        let outcome = outcome.expect("an attacker task panicked");
        delivered += outcome.delivered;
        refused += outcome.refused;
        attackers.extend(outcome.peer);
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "the attack is too slow: {delivered} inputs in {:?}",
            started.elapsed()
        );
    }
    let rss_after = rss_kib();
    let attack_time = started.elapsed();

    // The victim still answers and still serves the legitimate member.
    let status = victim.running.handle.status().await.expect("the node runs");
    let score = |peer: &PeerId| {
        status
            .penalised
            .iter()
            .find(|(p, _)| p == peer)
            .map_or(0.0, |(_, s)| *s)
    };
    let penalised = attackers.iter().filter(|p| score(p) < 0.0).count();
    // The guard bans at -45 (five penalties of 10, with half a penalty of slack).
    let banned = attackers.iter().filter(|p| score(p) <= -45.0).count();
    eprintln!(
        "hardening: {delivered} hostile inputs read by the node, {refused} refused at the door, \
         from {} attackers ({penalised} penalised, {banned} banned) in {:.1} s; \
         RSS {} -> {} KiB ({:+} KiB)",
        attackers.len(),
        attack_time.as_secs_f64(),
        rss_before,
        rss_after,
        rss_after as i64 - rss_before as i64,
    );
    assert!(
        delivered >= HOSTILE,
        "only {delivered} inputs reached the node"
    );
    assert_eq!(
        penalised,
        attackers.len(),
        "every attacker must be penalised; scores: {:?}",
        status.penalised.len()
    );
    // Every attacker is penalised (above); whether its score crosses the ban line before it
    // disconnects depends on timing (84-93% seen on a loaded 2-core machine, fewer on one
    // running a simulation beside the suite), so the ban share has a wide margin.
    assert!(
        banned * 2 >= attackers.len(),
        "at least half of the attackers must be banned, got {banned} of {}",
        attackers.len()
    );
    assert!(
        rss_after.saturating_sub(rss_before) < RSS_BOUND_KIB,
        "memory grew by {} KiB during the attack",
        rss_after - rss_before
    );
    assert!(
        !status
            .penalised
            .iter()
            .any(|(p, _)| *p == member.running.handle.peer_id()),
        "the legitimate member was penalised"
    );
    // The member table holds the legitimate member only; the forged revocations did not land.
    wait_members(
        &victim,
        &[member.id()],
        "the victim to keep only the member",
    )
    .await;

    // A relay round trip from the legitimate member still works.
    let mut chat = member
        .running
        .handle
        .open_chat(victim.id(), br#"{"messages":[]}"#.to_vec())
        .await
        .expect("the member opens a chat to the victim");
    let mut tokens = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, chat.recv()).await {
            Ok(Some(Ok(StreamFrame::Token { text, .. }))) => tokens.push(text),
            Ok(Some(Ok(StreamFrame::Done { finish_reason, .. }))) => {
                assert_eq!(finish_reason, FinishReason::Stop);
                break;
            }
            other => panic!("the relay after the attack failed: {other:?}"),
        }
    }
    assert_eq!(tokens, ["v0 ", "v1 ", "v2 "]);
    let request = seen.recv().await.expect("the engine saw the request");
    assert_eq!(request.from, member.id());
    assert!(
        attack_time < Duration::from_secs(120),
        "the test took {attack_time:?}"
    );
    // One more check that membership in the other direction survived.
    wait_for("the member to still see the victim", || async {
        member
            .member_ids()
            .await
            .contains(&victim.id())
            .then_some(())
    })
    .await;
}

/// Publishes `messages` from `attacker` once the victim's subscription is known.
async fn publish_all(attacker: &crate::swarm::Node, messages: Vec<Vec<u8>>) -> usize {
    let handle = attacker.running.handle.clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut sent = 0;
    for bytes in messages {
        loop {
            match handle.publish_raw_gossip(bytes.clone()).await {
                Ok(()) => {
                    sent += 1;
                    break;
                }
                // No mesh yet, or (once the victim banned the attacker) no peer left: an
                // attacker keeps trying until the deadline.
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(_) => return sent,
            }
        }
    }
    sent
}

/// The victim's score for `peer` (0 when never penalised).
async fn score_of(victim: &crate::swarm::Node, peer: PeerId) -> f64 {
    let status = victim.running.handle.status().await.expect("the node runs");
    status
        .penalised
        .iter()
        .find(|(p, _)| *p == peer)
        .map_or(0.0, |(_, s)| *s)
}

/// Replays, re-wraps and floods, each from its own attacker, each legal message by message:
/// - a valid operator certificate re-wrapped with a new `sent_at`, six at a time, until the
///   victim bans the re-wrapper (one publication per half heartbeat is news; the re-wrapper is
///   penalised for each copy close behind it);
/// - a member's genuine advert, replayed an hour after it was signed (penalised each time,
///   until gossipsub graylists the replayer);
/// - 600 distinct, validly signed adverts in one burst (over the gossip budget: ignored
///   beyond it, the flooder penalised);
/// - voucher shares whose amounts were raised after the payer signed them, six at a time
///   (forgeries: penalised each time, until gossipsub graylists the forger);
/// - 120 control pings in a row (over the RPC budget: answered `Busy`, the flooder penalised).
///
/// The victim keeps serving the legitimate member throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_rewraps_and_floods_get_their_sender_penalised() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let _one = ONE_ATTACK.lock().await;
    let operator = SecretKey::generate();
    let (victim_key, member_key) = (SecretKey::generate(), SecretKey::generate());
    let real = manifest(&operator, "agora", Admission::Open);
    let domain = real.payload.id();
    let victim = start(
        victim_key.clone(),
        Some(real.clone()),
        None,
        Some(service()),
        &[],
    )
    .await;
    let victim_addr = victim.addr().await;
    let victim_peer = victim.running.handle.peer_id();
    let member = start(
        member_key.clone(),
        Some(real.clone()),
        None,
        Some(service()),
        std::slice::from_ref(&victim_addr),
    )
    .await;
    wait_members(&victim, &[member.id()], "the victim to see the member").await;
    let now = unix_now();

    // Re-wrapper.
    let rewrapper = start(
        SecretKey::generate(),
        Some(real.clone()),
        None,
        None,
        std::slice::from_ref(&victim_addr),
    )
    .await;
    let cert = certificate(&operator, &real, member_key.node_id(), 7);
    // One publication per half heartbeat is news; a copy from the same peer within a quarter
    // heartbeat of it is a re-wrap and costs a penalty. On a loaded machine the victim may
    // take its messages apart in time, so the re-wrapper keeps re-wrapping, as an attacker
    // would, until the victim bans it (its connection is then gone) or 60 s pass (a victim
    // starved by the other test binaries' nodes on 2 cores once needed more than 20 s).
    let rewraps_started = Instant::now();
    let mut rewraps = 0u64;
    let rewrapper_peer = rewrapper.running.handle.peer_id();
    while rewraps_started.elapsed() < ATTACK_FOR && score_of(&victim, rewrapper_peer).await > -49.0
    {
        let sent_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_millis() as u64;
        let wraps: Vec<Vec<u8>> = (0..6u64)
            .map(|i| {
                GossipMessage::Certificate {
                    certificate: cert.clone(),
                    sent_at: sent_at + i,
                }
                .encode()
                .expect("encodes")
            })
            .collect();
        let sent = publish_all(&rewrapper, wraps).await;
        rewraps += sent as u64;
        if sent < 6 {
            break; // Banned.
        }
    }
    assert!(rewraps >= 6, "only {rewraps} re-wraps were published");

    // Replayer: the member's own advert, signed an hour ago.
    let replayer = start(
        SecretKey::generate(),
        Some(real.clone()),
        None,
        None,
        std::slice::from_ref(&victim_addr),
    )
    .await;
    let replays: Vec<Vec<u8>> = (0..6u64)
        .map(|i| {
            let mut advert = advert_for(&member_key, domain);
            advert.seq = 10 + i;
            advert.sent_at = now - 3600;
            GossipMessage::Advert(MemberEntry {
                advert: Signed::sign(advert, &member_key).expect("signs").into(),
                certificate: None,
            })
            .encode()
            .expect("encodes")
        })
        .collect();
    let sent = publish_all(&replayer, replays).await;
    assert!(sent >= 3, "only {sent} of 6 replays were published");

    // Flooder: its own adverts, each valid and newer than the last.
    let flood_key = SecretKey::generate();
    let flooder = start(
        flood_key.clone(),
        Some(real.clone()),
        None,
        None,
        std::slice::from_ref(&victim_addr),
    )
    .await;
    let flood: Vec<Vec<u8>> = (0..600u64)
        .map(|i| {
            let mut advert = advert_for(&flood_key, domain);
            advert.seq = now * 1000 + i;
            GossipMessage::Advert(MemberEntry {
                advert: Signed::sign(advert, &flood_key).expect("signs").into(),
                certificate: None,
            })
            .encode()
            .expect("encodes")
        })
        .collect();
    // Over the budget (a burst of four heartbeats' worth, a few hundred here) the flooder is
    // penalised, and banned in the end, which may cut its flood short.
    let sent = publish_all(&flooder, flood).await;
    assert!(sent > 0, "the flood was never published");

    // Voucher forger: shares whose vouchers were raised after the payer signed them.
    let forger = start(
        SecretKey::generate(),
        Some(real.clone()),
        None,
        None,
        std::slice::from_ref(&victim_addr),
    )
    .await;
    let payer = SecretKey::generate();
    let escrow = gaia_protocol::payment::Escrow {
        chain_id: 1337,
        contract: gaia_protocol::NodeId([0xec; 20]),
    };
    let forge = |round: u128| -> Vec<Vec<u8>> {
        (0..6u128)
            .map(|i| {
                let mut voucher = gaia_protocol::payment::Voucher {
                    payer: payer.node_id(),
                    payee: member_key.node_id(),
                    entry: member_key.node_id(),
                    cumulative_amount: 1 + i + 10 * round,
                    expires_at: now + 3600,
                }
                .sign(&escrow, &payer)
                .expect("signs");
                voucher.voucher.cumulative_amount *= 1_000_000;
                GossipMessage::Vouchers(gaia_protocol::payment::VoucherShare {
                    escrow,
                    vouchers: vec![voucher],
                })
                .encode()
                .expect("encodes")
            })
            .collect()
    };
    // Like the re-wrapper, the forger keeps forging (on a loaded machine a few of its shares
    // may go to other peers first) until the victim has penalised it or 60 s pass.
    let (forging, forger_peer) = (Instant::now(), forger.running.handle.peer_id());
    let mut forged = 0;
    for round in 0.. {
        if forging.elapsed() > ATTACK_FOR || score_of(&victim, forger_peer).await <= -9.0 {
            break;
        }
        let sent = publish_all(&forger, forge(round)).await;
        forged += sent;
        if sent < 6 {
            break; // Cut off.
        }
    }
    assert!(forged >= 3, "only {forged} forged vouchers were published");

    // RPC flooder: pings, one stream each, one after the other.
    let pinger = start(
        SecretKey::generate(),
        Some(real.clone()),
        None,
        None,
        std::slice::from_ref(&victim_addr),
    )
    .await;
    let ping = encode_frame(&ControlRequest::Ping).expect("encodes");
    let mut busy = 0;
    for _ in 0..120 {
        let Some(mut stream) =
            swarm_stream(&pinger.running.handle, victim_peer, protocols::CONTROL).await
        else {
            break; // Banned: the connection is gone.
        };
        if stream.write_all(&ping).await.is_err() {
            break;
        }
        let _ = stream.close().await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await;
        let text = String::from_utf8_lossy(&answer);
        if text.contains("budget") {
            busy += 1;
        }
    }
    assert!(busy > 0, "120 pings in a row were all answered");

    let peers = [
        // At least N penalties of 10 each (scores recover by one penalty per 10 minutes, so a
        // few seconds later they are a little above -10 N).
        ("re-wrapper", rewrapper.running.handle.peer_id(), -49.0),
        // Rejected messages also cost gossip score: after three the victim's gossipsub
        // ignores the replayer altogether (graylisted), so its later replays never arrive.
        ("replayer", replayer.running.handle.peer_id(), -29.0),
        ("gossip flooder", flooder.running.handle.peer_id(), -9.0),
        ("voucher forger", forger_peer, -9.0),
        ("RPC flooder", pinger.running.handle.peer_id(), -9.0),
    ];
    for (what, peer, at_most) in peers {
        let score = wait_for(what, || async {
            let score = score_of(&victim, peer).await;
            (score <= at_most).then_some(score)
        })
        .await;
        assert!(score <= at_most, "{what}: score {score}");
    }
    // The flood did not make the flooder's adverts news beyond its budget, and the member is
    // still there and was never penalised.
    assert_eq!(
        score_of(&victim, member.running.handle.peer_id()).await,
        0.0
    );
    assert!(victim.member_ids().await.contains(&member.id()));
}
