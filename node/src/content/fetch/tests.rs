//! Seeders and fetchers over in-memory pipes: honest, corrupt, dying, lying and refusing
//! seeders, and a fetch resumed after an interruption.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::{AsyncRead, AsyncWrite};
use gaia_protocol::content::{ContentFile, ContentKind, ContentResponse};
use gaia_protocol::{ContentHash, NodeId, SecretKey};
use libp2p::PeerId;
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

use super::*;
use crate::content::ContentConfig;
use crate::content::seed::{Gate, ModelOffer, Seeder};

/// A seeder's behaviour in a test.
#[derive(Clone)]
enum Behaviour {
    Honest(Arc<Seeder>),
    /// Serves through a stream that breaks after this many bytes.
    Dying(Arc<Seeder>, usize),
    /// Describes `hash` with chunk digests of other bytes, and serves those bytes.
    Lying(ContentDescriptor, Vec<u8>),
}

#[derive(Default)]
struct Penalties(Mutex<Vec<(PeerId, String)>>);

impl Penalties {
    fn of(&self, peer: PeerId) -> Vec<String> {
        let list = self.0.lock().unwrap();
        list.iter()
            .filter(|(p, _)| *p == peer)
            .map(|(_, r)| r.clone())
            .collect()
    }
}

struct TestGate;

impl Gate for TestGate {
    fn authorize(
        &self,
        _peer: PeerId,
        _certificate: Option<Signed<MembershipCertificate>>,
    ) -> BoxFuture<'_, Result<NodeId, String>> {
        Box::pin(async { Ok(SecretKey::random(&mut rand::thread_rng()).node_id()) })
    }
    fn penalise(&self, _peer: PeerId, _reason: String) {}
}

struct Pipes {
    seeders: HashMap<PeerId, Behaviour>,
    penalties: Arc<Penalties>,
}

impl Connector for Pipes {
    type Stream = Compat<tokio::io::DuplexStream>;

    fn open(&self, peer: PeerId) -> BoxFuture<'_, Result<Self::Stream, String>> {
        let behaviour = self.seeders.get(&peer).cloned();
        Box::pin(async move {
            let behaviour = behaviour.ok_or("no such seeder")?;
            let (client, server) = tokio::io::duplex(4 << 20);
            let me = PeerId::random();
            tokio::spawn(async move {
                match behaviour {
                    Behaviour::Honest(seeder) => seeder.serve(&TestGate, me, server.compat()).await,
                    Behaviour::Dying(seeder, budget) => {
                        let stream = Dying {
                            inner: server.compat(),
                            budget,
                        };
                        seeder.serve(&TestGate, me, stream).await
                    }
                    Behaviour::Lying(descriptor, bytes) => {
                        lie(server.compat(), descriptor, bytes).await
                    }
                }
            });
            Ok(client.compat())
        })
    }

    fn penalise(&self, peer: PeerId, reason: String) {
        self.penalties.0.lock().unwrap().push((peer, reason));
    }
}

/// A stream whose writes fail once `budget` bytes went through (a seeder that dies).
struct Dying<S> {
    inner: S,
    budget: usize,
}

impl<S: AsyncRead + Unpin> AsyncRead for Dying<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Dying<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.budget == 0 {
            return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        let n = buf.len().min(self.budget);
        let written = Pin::new(&mut self.inner).poll_write(cx, &buf[..n]);
        if let Poll::Ready(Ok(w)) = &written {
            self.budget -= w;
        }
        written
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// A seeder that answers a descriptor whose chunk digests are those of `bytes`, and `bytes`.
async fn lie<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    descriptor: ContentDescriptor,
    bytes: Vec<u8>,
) {
    let reply = |r: ContentResponse| r.encode().unwrap();
    while let Ok(Some(request)) = crate::content::read_request(&mut stream).await {
        let body = match request {
            ContentRequest::Describe { .. } => {
                reply(ContentResponse::Descriptor(descriptor.clone()))
            }
            ContentRequest::Chunk { index, .. } => {
                let (offset, len) = descriptor.files[0].chunk_range(CHUNK_SIZE, index).unwrap();
                let offset = offset as usize;
                reply(ContentResponse::Chunk(bytes[offset..offset + len].to_vec()))
            }
        };
        if write_body(&mut stream, &body).await.is_err() || stream.flush().await.is_err() {
            return;
        }
    }
}

/// A stored chat model of `size` bytes (and a small second file) in `dir`.
fn model(dir: &Path, size: usize, seed: u8) -> (ModelOffer, Vec<u8>) {
    let bytes: Vec<u8> = (0..size)
        .map(|i| {
            (i as u64)
                .wrapping_mul(2654435761)
                .wrapping_add(u64::from(seed)) as u8
        })
        .collect();
    let model_dir = dir.join("m");
    std::fs::create_dir_all(&model_dir).unwrap();
    std::fs::write(model_dir.join("model.gguf"), &bytes).unwrap();
    std::fs::write(model_dir.join("tokenizer.json"), b"{\"t\": 1}").unwrap();
    let hash = ContentHash::of(&bytes);
    let offer = ModelOffer {
        hash,
        kind: ContentKind::ChatModel,
        name: "tiny".into(),
        dir: model_dir,
        files: vec![
            ("model.gguf".into(), size as u64, hash.to_hex()),
            (
                "tokenizer.json".into(),
                8,
                ContentHash::of(b"{\"t\": 1}").to_hex(),
            ),
        ],
    };
    (offer, bytes)
}

fn seeder(offer: &ModelOffer, config: ContentConfig) -> Arc<Seeder> {
    Arc::new(Seeder::new(
        config,
        offer.dir.join("archives"),
        vec![offer.clone()],
        None,
    ))
}

fn options(dir: &Path) -> Options {
    let mut opts = Options::new(dir.to_path_buf(), Progress::Quiet);
    opts.window = 2;
    opts.chunk_timeout = Duration::from_secs(5);
    opts.describe_timeout = Duration::from_secs(5);
    opts
}

fn want(offer: &ModelOffer) -> Want {
    Want {
        hash: offer.hash,
        kind: ContentKind::ChatModel,
    }
}

fn assert_fetched(fetched: &Fetched, bytes: &[u8]) {
    let got = std::fs::read(fetched.dir.join("model.gguf")).unwrap();
    assert!(got == bytes, "the fetched file differs");
    assert_eq!(
        std::fs::read(fetched.dir.join("tokenizer.json")).unwrap(),
        b"{\"t\": 1}"
    );
    assert!(!fetched.dir.join(DESCRIPTOR_FILE).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_seeders_share_the_work() {
    let store = tempfile::tempdir().unwrap();
    let (offer, bytes) = model(store.path(), 6 * CHUNK_SIZE as usize + 123, 1);
    let (a, b) = (PeerId::random(), PeerId::random());
    let pipes = Pipes {
        seeders: HashMap::from([
            (
                a,
                Behaviour::Honest(seeder(&offer, ContentConfig::default())),
            ),
            (
                b,
                Behaviour::Honest(seeder(&offer, ContentConfig::default())),
            ),
        ]),
        penalties: Arc::default(),
    };
    let out = tempfile::tempdir().unwrap();
    let fetched = fetch(&pipes, &[a, b], &want(&offer), &options(out.path()))
        .await
        .unwrap();
    assert_fetched(&fetched, &bytes);
    assert_eq!(fetched.bytes_fetched, bytes.len() as u64 + 8);
    assert!(fetched.dropped.is_empty(), "{:?}", fetched.dropped);
    for (peer, sent) in &fetched.per_seeder {
        assert!(
            *sent > 0,
            "seeder {peer} sent nothing: {:?}",
            fetched.per_seeder
        );
    }
    assert!(pipes.penalties.0.lock().unwrap().is_empty());
    // The seeders' own counters (their `/metrics`) add up to what was fetched: 7 chunks of
    // the weights and the tokenizer's one.
    let (mut chunks, mut sent) = (0, 0);
    for peer in [a, b] {
        let Behaviour::Honest(seeder) = &pipes.seeders[&peer] else {
            unreachable!()
        };
        let counters = seeder.counters();
        assert_eq!(counters.descriptions.load(Ordering::Relaxed), 1);
        assert_eq!(counters.refused.load(Ordering::Relaxed), 0);
        chunks += counters.chunks.load(Ordering::Relaxed);
        sent += counters.bytes.load(Ordering::Relaxed);
    }
    assert_eq!((chunks, sent), (8, bytes.len() as u64 + 8));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeder_with_a_bad_chunk_is_penalised_and_avoided() {
    let store_a = tempfile::tempdir().unwrap();
    let store_b = tempfile::tempdir().unwrap();
    let (offer_a, bytes) = model(store_a.path(), 5 * CHUNK_SIZE as usize, 2);
    let (offer_b, _) = model(store_b.path(), 5 * CHUNK_SIZE as usize, 2);
    let honest = seeder(&offer_a, ContentConfig::default());
    let rotten = seeder(&offer_b, ContentConfig::default());
    // Both describe the model while it is intact; then B's disk rots in every chunk.
    assert!(rotten.prepare().await.iter().all(Result::is_ok));
    let mut damaged = bytes.clone();
    for chunk in damaged.chunks_mut(CHUNK_SIZE as usize) {
        chunk[100] ^= 0xff;
    }
    std::fs::write(offer_b.dir.join("model.gguf"), &damaged).unwrap();
    let (a, b) = (PeerId::random(), PeerId::random());
    let pipes = Pipes {
        seeders: HashMap::from([
            (a, Behaviour::Honest(honest)),
            (b, Behaviour::Honest(rotten)),
        ]),
        penalties: Arc::default(),
    };
    let out = tempfile::tempdir().unwrap();
    let fetched = fetch(&pipes, &[a, b], &want(&offer_a), &options(out.path()))
        .await
        .unwrap();
    assert_fetched(&fetched, &bytes);
    let penalties = pipes.penalties.of(b);
    assert_eq!(
        penalties.len(),
        1,
        "{penalties:?} {:?} {:?}",
        fetched.per_seeder,
        fetched.dropped
    );
    assert!(
        penalties[0].contains("does not match its digest"),
        "{penalties:?}"
    );
    assert!(pipes.penalties.of(a).is_empty());
    assert!(fetched.dropped.iter().any(|(p, _)| *p == b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dying_seeder_hands_its_chunks_to_the_others() {
    let store = tempfile::tempdir().unwrap();
    let (offer, bytes) = model(store.path(), 8 * CHUNK_SIZE as usize + 1, 3);
    let (a, b) = (PeerId::random(), PeerId::random());
    let pipes = Pipes {
        seeders: HashMap::from([
            (
                a,
                // Slow enough that the dying seeder is asked for more than it can send,
                // however late its stream starts.
                Behaviour::Honest(seeder(
                    &offer,
                    ContentConfig {
                        upload_bytes_per_s: 8 * CHUNK_SIZE as u64,
                        ..ContentConfig::default()
                    },
                )),
            ),
            (
                b,
                Behaviour::Dying(
                    seeder(&offer, ContentConfig::default()),
                    2 * CHUNK_SIZE as usize + 5000,
                ),
            ),
        ]),
        penalties: Arc::default(),
    };
    let out = tempfile::tempdir().unwrap();
    let fetched = fetch(&pipes, &[a, b], &want(&offer), &options(out.path()))
        .await
        .unwrap();
    assert_fetched(&fetched, &bytes);
    let dropped: Vec<_> = fetched.dropped.iter().filter(|(p, _)| *p == b).collect();
    assert_eq!(dropped.len(), 1, "{:?}", fetched.dropped);
    assert!(
        pipes.penalties.0.lock().unwrap().is_empty(),
        "a dead seeder is not a liar"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_fetch_resumes_with_what_it_has() {
    let store = tempfile::tempdir().unwrap();
    let (offer, bytes) = model(store.path(), 6 * CHUNK_SIZE as usize, 4);
    let dying = PeerId::random();
    let pipes = Pipes {
        seeders: HashMap::from([(
            dying,
            Behaviour::Dying(
                seeder(&offer, ContentConfig::default()),
                3 * CHUNK_SIZE as usize + 100,
            ),
        )]),
        penalties: Arc::default(),
    };
    let out = tempfile::tempdir().unwrap();
    let err = fetch(&pipes, &[dying], &want(&offer), &options(out.path()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, FetchError::Incomplete { missing, total: 7, .. } if missing > 0 && missing < 7),
        "{err}"
    );
    assert!(err.to_string().contains("resume"), "{err}");
    // A later run, from another seeder, keeps the good chunks.
    let honest = PeerId::random();
    let pipes = Pipes {
        seeders: HashMap::from([(
            honest,
            Behaviour::Honest(seeder(&offer, ContentConfig::default())),
        )]),
        penalties: Arc::default(),
    };
    let fetched = fetch(&pipes, &[honest], &want(&offer), &options(out.path()))
        .await
        .unwrap();
    assert_fetched(&fetched, &bytes);
    assert!(
        fetched.bytes_resumed >= 2 * u64::from(CHUNK_SIZE),
        "{}",
        fetched.bytes_resumed
    );
    assert_eq!(
        fetched.bytes_fetched + fetched.bytes_resumed,
        bytes.len() as u64 + 8
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_descriptor_is_caught_by_the_whole_file_digest() {
    let store = tempfile::tempdir().unwrap();
    let (offer, bytes) = model(store.path(), 2 * CHUNK_SIZE as usize + 7, 5);
    let fake: Vec<u8> = bytes.iter().map(|b| b.wrapping_add(1)).collect();
    let liar_descriptor = ContentDescriptor {
        hash: offer.hash,
        kind: ContentKind::ChatModel,
        name: "tiny".into(),
        chunk_size: CHUNK_SIZE,
        files: vec![ContentFile {
            name: "model.gguf".into(),
            size: fake.len() as u64,
            sha256: offer.hash,
            chunks: fake
                .chunks(CHUNK_SIZE as usize)
                .map(ContentHash::of)
                .collect(),
        }],
    };
    let (liar, honest) = (PeerId::random(), PeerId::random());
    // Alone, the liar's description is all there is: the fetch ends unverified.
    let pipes = Pipes {
        seeders: HashMap::from([(
            liar,
            Behaviour::Lying(liar_descriptor.clone(), fake.clone()),
        )]),
        penalties: Arc::default(),
    };
    let out = tempfile::tempdir().unwrap();
    let err = fetch(&pipes, &[liar], &want(&offer), &options(out.path()))
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Unverified { .. }), "{err}");
    assert_eq!(pipes.penalties.of(liar).len(), 1);
    // Beside an honest seeder, the liar's description is tried (its group is as large) or not,
    // and the fetch ends with the right file either way.
    let pipes = Pipes {
        seeders: HashMap::from([
            (liar, Behaviour::Lying(liar_descriptor, fake)),
            (
                honest,
                Behaviour::Honest(seeder(&offer, ContentConfig::default())),
            ),
        ]),
        penalties: Arc::default(),
    };
    let fetched = fetch(&pipes, &[liar, honest], &want(&offer), &options(out.path()))
        .await
        .unwrap();
    let got = std::fs::read(fetched.dir.join("model.gguf")).unwrap();
    assert!(got == bytes);
    assert!(pipes.penalties.of(honest).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeder_that_does_not_share_refuses_with_a_reason() {
    let store = tempfile::tempdir().unwrap();
    let (offer, _) = model(store.path(), 1000, 6);
    let (off, no_chat) = (PeerId::random(), PeerId::random());
    let pipes = Pipes {
        seeders: HashMap::from([
            (
                off,
                Behaviour::Honest(seeder(
                    &offer,
                    ContentConfig {
                        seed: false,
                        ..ContentConfig::default()
                    },
                )),
            ),
            (
                no_chat,
                Behaviour::Honest(seeder(
                    &offer,
                    ContentConfig {
                        share: vec!["kb".into()],
                        ..ContentConfig::default()
                    },
                )),
            ),
        ]),
        penalties: Arc::default(),
    };
    let out = tempfile::tempdir().unwrap();
    let err = fetch(&pipes, &[off, no_chat], &want(&offer), &options(out.path()))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("does not seed content"), "{text}");
    assert!(text.contains("does not seed"), "{text}");
    assert!(matches!(err, FetchError::NoSeeder { ref tried, .. } if tried.len() == 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeder_serves_only_what_it_described() {
    // A fetcher that names a path-like file index or a chunk beyond the file is cut off.
    let store = tempfile::tempdir().unwrap();
    let (offer, _) = model(store.path(), 1000, 7);
    let seeder = seeder(&offer, ContentConfig::default());
    let (client, server) = tokio::io::duplex(1 << 20);
    let task = tokio::spawn(async move {
        seeder
            .serve(&TestGate, PeerId::random(), server.compat())
            .await
    });
    let mut client = client.compat();
    // A chunk before any describe.
    let request = ContentRequest::Chunk {
        hash: offer.hash,
        file: 0,
        index: 0,
    };
    send(&mut client, &request).await.unwrap();
    client.flush().await.unwrap();
    assert!(matches!(
        read_response(&mut client).await,
        Err(ReadError::Closed)
    ));
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_gets_its_share_of_streams_and_no_more() {
    let store = tempfile::tempdir().unwrap();
    let (offer, _) = model(store.path(), 1000, 8);
    let seeder = seeder(
        &offer,
        ContentConfig {
            max_uploads_per_peer: 2,
            max_uploads: 3,
            ..ContentConfig::default()
        },
    );
    let peer = PeerId::random();
    let mut open = Vec::new();
    let mut answers = Vec::new();
    for i in 0..4 {
        // The third is the peer's one too many; the fourth, from another peer, still fits in
        // the node-wide limit of 3.
        let from = if i < 3 { peer } else { PeerId::random() };
        let (client, server) = tokio::io::duplex(1 << 20);
        let s = Arc::clone(&seeder);
        tokio::spawn(async move { s.serve(&TestGate, from, server.compat()).await });
        let mut client = client.compat();
        let request = ContentRequest::Describe {
            hash: offer.hash,
            certificate: None,
        };
        send(&mut client, &request).await.unwrap();
        client.flush().await.unwrap();
        answers.push(read_response(&mut client).await.unwrap());
        open.push(client);
    }
    assert!(matches!(answers[0], ContentResponse::Descriptor(_)));
    assert!(matches!(answers[1], ContentResponse::Descriptor(_)));
    assert!(
        matches!(&answers[2], ContentResponse::Refused(r) if r.retry && r.reason.contains("per peer")),
        "{:?}",
        answers[2]
    );
    assert!(
        matches!(&answers[3], ContentResponse::Descriptor(_)),
        "another peer still has room: {:?}",
        answers[3]
    );
    // Closing one of the peer's streams frees its slot (once the seeder has seen it close).
    drop(open.remove(0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (client, server) = tokio::io::duplex(1 << 20);
        let s = Arc::clone(&seeder);
        tokio::spawn(async move { s.serve(&TestGate, peer, server.compat()).await });
        let mut client = client.compat();
        send(
            &mut client,
            &ContentRequest::Describe {
                hash: offer.hash,
                certificate: None,
            },
        )
        .await
        .unwrap();
        client.flush().await.unwrap();
        match read_response(&mut client).await.unwrap() {
            ContentResponse::Descriptor(_) => break,
            ContentResponse::Refused(r) if r.retry && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => panic!("the closed stream's slot was not freed: {other:?}"),
        }
    }
}
