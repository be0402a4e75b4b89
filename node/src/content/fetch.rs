//! The fetcher: one piece of content from several seeders at once, verified chunk by chunk,
//! resumable.
//!
//! 1. Every seeder is asked for a descriptor at once. Those that answer with a valid one for
//!    the hash and kind asked are grouped by what they answered; the largest group is used
//!    first (a seeder alone in describing something else cannot outvote the others).
//! 2. The partial files under `<dir>/<hash>/` are sized, and what they already hold is checked
//!    chunk by chunk against the descriptor (a resumed fetch keeps what is good).
//! 3. Each seeder's stream keeps up to `window` chunk requests in flight, taking chunks from
//!    one shared queue. A chunk is checked against its digest before it is written at its
//!    offset. A seeder that sends a bad chunk or a malformed frame is penalised and dropped;
//!    one that closes, refuses or stalls is dropped; either way its chunks go back to the
//!    queue for the others.
//! 4. When every chunk is in, each whole file is checked against its sha256 (a model's main
//!    file against the hash asked for). A descriptor whose digests lied fails here: its
//!    seeders are penalised and the next group's descriptor is tried.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{AsyncRead, AsyncWrite, AsyncWriteExt};
use gaia_protocol::Wire;
use gaia_protocol::content::{
    CHUNK_SIZE, ContentDescriptor, ContentKind, ContentRequest, ContentResponse,
};
use gaia_protocol::domain::MembershipCertificate;
use gaia_protocol::{ContentHash, Signed};
use indicatif::{ProgressBar, ProgressStyle};
use libp2p::PeerId;
use tokio::sync::Notify;

use super::{ReadError, read_response, write_body};
use crate::models::Progress;

/// Opens content streams to seeders and reports the ones that break the protocol: the swarm
/// in a node, in-memory pipes in unit tests.
pub trait Connector: Send + Sync {
    /// The stream type.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Opens a content stream to `peer`.
    fn open(&self, peer: PeerId) -> BoxFuture<'_, Result<Self::Stream, String>>;
    /// `peer` broke the protocol (a bad chunk, a lying descriptor, a malformed frame).
    fn penalise(&self, peer: PeerId, reason: String);
}

/// What to fetch.
#[derive(Debug, Clone)]
pub struct Want {
    /// The content hash.
    pub hash: ContentHash,
    /// What it must be.
    pub kind: ContentKind,
}

/// How to fetch.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where partial and finished downloads go (`<dir>/<hash>/`).
    pub dir: PathBuf,
    /// Chunk requests in flight per seeder.
    pub window: usize,
    /// How long a seeder may take to describe the content.
    pub describe_timeout: Duration,
    /// How long a seeder may take to send a chunk it was asked for.
    pub chunk_timeout: Duration,
    /// Progress bars, or log lines only.
    pub progress: Progress,
    /// This node's membership certificate, sent with each `Describe`.
    pub certificate: Option<Signed<MembershipCertificate>>,
}

impl Options {
    /// Defaults: 8 chunks in flight per seeder, 20 s to describe, 30 s per chunk.
    pub fn new(dir: PathBuf, progress: Progress) -> Self {
        Self {
            dir,
            window: 8,
            describe_timeout: Duration::from_secs(20),
            chunk_timeout: Duration::from_secs(30),
            progress,
            certificate: None,
        }
    }
}

/// A finished fetch.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The directory holding the verified files, named as the descriptor names them.
    pub dir: PathBuf,
    /// The descriptor they match.
    pub descriptor: ContentDescriptor,
    /// Bytes received from seeders (without what a resumed fetch already had).
    pub bytes_fetched: u64,
    /// Bytes a previous, interrupted fetch had left that were good.
    pub bytes_resumed: u64,
    /// Bytes each seeder sent.
    pub per_seeder: Vec<(PeerId, u64)>,
    /// Seeders dropped on the way, and why.
    pub dropped: Vec<(PeerId, String)>,
    /// From the first descriptor request to the last verified file.
    pub elapsed: Duration,
}

/// A fetch that did not complete.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No seeder described the content.
    #[error("no seeder could describe {hash}: {}", reasons(.tried))]
    NoSeeder {
        /// The content.
        hash: ContentHash,
        /// Each seeder tried and why it failed.
        tried: Vec<(PeerId, String)>,
    },
    /// Every seeder failed before every chunk was in; what was fetched stays for a resume.
    #[error(
        "fetching {hash} stopped with {missing} of {total} chunks missing, as every seeder \
         failed ({}); run it again to resume",
        reasons(.dropped)
    )]
    Incomplete {
        /// The content.
        hash: ContentHash,
        /// Chunks still missing.
        missing: usize,
        /// Chunks in all.
        total: usize,
        /// Each seeder dropped and why.
        dropped: Vec<(PeerId, String)>,
    },
    /// Every descriptor offered led to files that do not match their hash.
    #[error("every seeder's description of {hash} led to files that fail their sha256: {detail}")]
    Unverified {
        /// The content.
        hash: ContentHash,
        /// What failed.
        detail: String,
    },
    /// The local disk failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

fn reasons(list: &[(PeerId, String)]) -> String {
    if list.is_empty() {
        return "no seeder was given".into();
    }
    list.iter()
        .map(|(peer, why)| format!("{peer}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> FetchError + 'a {
    move |source| FetchError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The name of the saved descriptor inside a partial download's directory.
const DESCRIPTOR_FILE: &str = ".descriptor";

/// Fetches `want` from `seeders`.
pub async fn fetch<C: Connector>(
    conn: &C,
    seeders: &[PeerId],
    want: &Want,
    opts: &Options,
) -> Result<Fetched, FetchError> {
    let start = Instant::now();
    let described = futures::future::join_all(
        seeders
            .iter()
            .map(|peer| describe_one(conn, *peer, want, opts)),
    )
    .await;
    let mut groups: Vec<Group<C::Stream>> = Vec::new();
    let mut refused = Vec::new();
    for (peer, result) in seeders.iter().zip(described) {
        match result {
            Ok((descriptor, stream)) => match groups.iter_mut().find(|(d, _)| *d == descriptor) {
                Some((_, members)) => members.push((*peer, stream)),
                None => groups.push((descriptor, vec![(*peer, stream)])),
            },
            Err(why) => refused.push((*peer, why)),
        }
    }
    if groups.is_empty() {
        return Err(FetchError::NoSeeder {
            hash: want.hash,
            tried: refused,
        });
    }
    groups.sort_by_key(|(_, members)| std::cmp::Reverse(members.len()));
    let mut failures = Vec::new();
    for (descriptor, streams) in groups {
        let peers: Vec<PeerId> = streams.iter().map(|(p, _)| *p).collect();
        match fetch_described(conn, &descriptor, streams, opts).await? {
            Ok(mut fetched) => {
                fetched.elapsed = start.elapsed();
                fetched.dropped.extend(refused);
                return Ok(fetched);
            }
            Err(detail) => {
                for peer in peers {
                    conn.penalise(
                        peer,
                        format!("described {} with digests that lie", want.hash),
                    );
                }
                failures.push(detail);
            }
        }
    }
    Err(FetchError::Unverified {
        hash: want.hash,
        detail: failures.join("; "),
    })
}

/// Seeders that described the content alike, with their streams.
type Group<S> = (ContentDescriptor, Vec<(PeerId, S)>);

/// Opens a stream to `peer` and asks it to describe `want`.
async fn describe_one<C: Connector>(
    conn: &C,
    peer: PeerId,
    want: &Want,
    opts: &Options,
) -> Result<(ContentDescriptor, C::Stream), String> {
    let ask = async {
        let mut stream = conn.open(peer).await?;
        let request = ContentRequest::Describe {
            hash: want.hash,
            certificate: opts.certificate.clone(),
        };
        send(&mut stream, &request)
            .await
            .map_err(|e| e.to_string())?;
        match read_response(&mut stream).await {
            Ok(ContentResponse::Descriptor(d)) if d.hash == want.hash && d.kind == want.kind => {
                Ok((d, stream))
            }
            Ok(ContentResponse::Descriptor(d)) => {
                conn.penalise(peer, "described content other than what was asked".into());
                Err(format!("it described {} {} instead", d.kind, d.hash))
            }
            Ok(ContentResponse::Refused(r)) => Err(format!("refused: {}", r.reason)),
            Ok(ContentResponse::Chunk(_)) => {
                conn.penalise(peer, "answered a describe with a chunk".into());
                Err("it answered with a chunk".into())
            }
            Err(ReadError::Malformed(why)) => {
                conn.penalise(peer, format!("malformed content response: {why}"));
                Err(format!("a malformed answer: {why}"))
            }
            Err(ReadError::Closed) => Err("it closed the stream".into()),
        }
    };
    match tokio::time::timeout(opts.describe_timeout, ask).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no description within {} s",
            opts.describe_timeout.as_secs()
        )),
    }
}

async fn send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    request: &ContentRequest,
) -> std::io::Result<()> {
    let body = request
        .to_bytes()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    write_body(stream, &body).await
}

/// A chunk: file index, chunk index.
type Job = (u16, u32);

/// What the workers share.
struct Shared {
    state: Mutex<State>,
    changed: Notify,
}

struct State {
    queue: VecDeque<Job>,
    outstanding: usize,
    done: usize,
    bytes: u64,
}

impl Shared {
    fn take(&self) -> Option<Job> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let job = s.queue.pop_front()?;
        s.outstanding += 1;
        Some(job)
    }

    fn give_back(&self, jobs: impl IntoIterator<Item = Job>) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for job in jobs {
            s.queue.push_front(job);
            s.outstanding = s.outstanding.saturating_sub(1);
        }
        drop(s);
        self.changed.notify_waiters();
    }

    fn finish(&self, bytes: usize) -> (usize, u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.outstanding = s.outstanding.saturating_sub(1);
        s.done += 1;
        s.bytes += bytes as u64;
        let out = (s.done, s.bytes);
        drop(s);
        self.changed.notify_waiters();
        out
    }

    fn all_taken_or_done(&self) -> (bool, bool) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (s.queue.is_empty(), s.queue.is_empty() && s.outstanding == 0)
    }

    fn missing(&self) -> usize {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.queue.len() + s.outstanding
    }
}

/// Shows how far a fetch is: a bar on a terminal, a line every 10 % otherwise.
struct Meter {
    bar: Option<ProgressBar>,
    label: String,
    total_chunks: usize,
    total_bytes: u64,
    last_tenth: Mutex<usize>,
}

impl Meter {
    fn new(progress: Progress, label: String, total_chunks: usize, total_bytes: u64) -> Self {
        let bar = (progress == Progress::Bars
            && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .then(|| {
            let bar = ProgressBar::new(total_bytes);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(label.clone());
            bar
        });
        Self {
            bar,
            label,
            total_chunks,
            total_bytes,
            last_tenth: Mutex::new(0),
        }
    }

    fn set(&self, done: usize, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(bytes);
            return;
        }
        let tenth = (done * 10) / self.total_chunks.max(1);
        let mut last = self.last_tenth.lock().unwrap_or_else(|p| p.into_inner());
        if tenth > *last {
            *last = tenth;
            eprintln!(
                "gaia: fetching {}: {}% ({} of {} chunks, {} of {})",
                self.label,
                tenth * 10,
                done,
                self.total_chunks,
                crate::human_size(bytes),
                crate::human_size(self.total_bytes)
            );
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Fetches the files `descriptor` lists from `streams` (each has described it already).
/// The outer error is the local disk's or an incomplete fetch; the inner one a whole-file
/// digest that does not match (the descriptor lied).
async fn fetch_described<C: Connector>(
    conn: &C,
    descriptor: &ContentDescriptor,
    streams: Vec<(PeerId, C::Stream)>,
    opts: &Options,
) -> Result<Result<Fetched, String>, FetchError> {
    let dir = opts.dir.join(descriptor.hash.to_hex());
    std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    // A partial download of another descriptor (another seeder's description) is dropped.
    let saved = dir.join(DESCRIPTOR_FILE);
    let encoded = descriptor.to_bytes().map_err(|e| FetchError::Io {
        action: "encoding the descriptor for",
        path: saved.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
    })?;
    if std::fs::read(&saved).ok().as_deref() != Some(&encoded[..]) {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        std::fs::write(&saved, &encoded).map_err(io_err("writing", &saved))?;
    }
    let mut files = Vec::new();
    let mut queue = VecDeque::new();
    let mut resumed_bytes = 0u64;
    let mut resumed_chunks = 0usize;
    for (i, f) in descriptor.files.iter().enumerate() {
        let path = dir.join(&f.name);
        let existed = path.is_file();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        file.set_len(f.size).map_err(io_err("sizing", &path))?;
        let mut buf = vec![0u8; CHUNK_SIZE as usize];
        for (index, digest) in f.chunks.iter().enumerate() {
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            let Some((offset, len)) = f.chunk_range(CHUNK_SIZE, index) else {
                continue;
            };
            let have = existed
                && file.read_exact_at(&mut buf[..len], offset).is_ok()
                && ContentHash::of(&buf[..len]) == *digest;
            if have {
                resumed_bytes += len as u64;
                resumed_chunks += 1;
            } else {
                queue.push_back((u16::try_from(i).unwrap_or(u16::MAX), index));
            }
        }
        files.push(file);
    }
    let total = descriptor.total_chunks();
    let label = format!(
        "{} {} ({})",
        descriptor.kind,
        descriptor.name,
        crate::human_size(descriptor.total_bytes())
    );
    if resumed_chunks > 0 {
        eprintln!(
            "gaia: resuming {label}: {resumed_chunks} of {total} chunks were already here and \
             are good"
        );
    }
    eprintln!(
        "gaia: fetching {label} from {} seeder(s), {} chunk(s) to go",
        streams.len(),
        queue.len()
    );
    let meter = Meter::new(
        opts.progress,
        label.clone(),
        total,
        descriptor.total_bytes(),
    );
    let shared = Shared {
        state: Mutex::new(State {
            queue,
            outstanding: 0,
            done: resumed_chunks,
            bytes: resumed_bytes,
        }),
        changed: Notify::new(),
    };
    let results = futures::future::join_all(streams.into_iter().map(|(peer, stream)| {
        let worker = Worker {
            conn,
            peer,
            descriptor,
            files: &files,
            shared: &shared,
            meter: &meter,
            opts,
        };
        async move { (peer, worker.run(stream).await) }
    }))
    .await;
    meter.finish();
    let mut per_seeder = Vec::new();
    let mut dropped = Vec::new();
    for (peer, (sent, result)) in results {
        per_seeder.push((peer, sent));
        if let Err(why) = result {
            dropped.push((peer, why));
        }
    }
    let missing = shared.missing();
    if missing > 0 {
        return Err(FetchError::Incomplete {
            hash: descriptor.hash,
            missing,
            total,
            dropped,
        });
    }
    drop(files);
    // Every chunk matched its digest; the whole files must match theirs.
    for f in &descriptor.files {
        let path = dir.join(&f.name);
        let actual = sha256_file(&path).map_err(io_err("verifying", &path))?;
        if actual != f.sha256 {
            let _ = std::fs::remove_dir_all(&dir);
            return Ok(Err(format!(
                "{} has sha256 {actual}, the descriptor said {}",
                f.name, f.sha256
            )));
        }
    }
    let _ = std::fs::remove_file(&saved);
    let bytes_fetched = per_seeder.iter().map(|(_, b)| *b).sum();
    Ok(Ok(Fetched {
        dir,
        descriptor: descriptor.clone(),
        bytes_fetched,
        bytes_resumed: resumed_bytes,
        per_seeder,
        dropped,
        elapsed: Duration::ZERO,
    }))
}

/// The sha256 of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<ContentHash> {
    use sha2::Digest as _;
    let mut file = File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(ContentHash(hasher.finalize().into()))
}

/// One seeder's part of a fetch.
struct Worker<'a, C: Connector> {
    conn: &'a C,
    peer: PeerId,
    descriptor: &'a ContentDescriptor,
    files: &'a [File],
    shared: &'a Shared,
    meter: &'a Meter,
    opts: &'a Options,
}

impl<C: Connector> Worker<'_, C> {
    /// Runs until every chunk is in or this seeder fails; returns the bytes it sent.
    async fn run(&self, mut stream: C::Stream) -> (u64, Result<(), String>) {
        let mut in_flight: VecDeque<Job> = VecDeque::new();
        let mut sent = 0u64;
        let result = self.pump(&mut stream, &mut in_flight, &mut sent).await;
        if let Err(why) = &result {
            eprintln!(
                "gaia: seeder {} dropped: {why}; {} chunk(s) it held go to the others",
                self.peer,
                in_flight.len()
            );
        }
        self.shared.give_back(in_flight.drain(..).rev());
        if result.is_ok() {
            let _ = stream.close().await;
        }
        (sent, result)
    }

    async fn pump(
        &self,
        stream: &mut C::Stream,
        in_flight: &mut VecDeque<Job>,
        sent: &mut u64,
    ) -> Result<(), String> {
        let window = self.opts.window.max(1);
        loop {
            let mut asked = false;
            while in_flight.len() < window {
                let Some(job) = self.shared.take() else { break };
                in_flight.push_back(job);
                let request = ContentRequest::Chunk {
                    hash: self.descriptor.hash,
                    file: job.0,
                    index: job.1,
                };
                send(stream, &request)
                    .await
                    .map_err(|e| format!("cannot send a request: {e}"))?;
                asked = true;
            }
            if asked {
                stream
                    .flush()
                    .await
                    .map_err(|e| format!("cannot send a request: {e}"))?;
            }
            let Some(&(file, index)) = in_flight.front() else {
                let (queue_empty, all_done) = self.shared.all_taken_or_done();
                if all_done {
                    return Ok(());
                }
                if queue_empty {
                    // Others hold the rest; wait in case a failing seeder hands chunks back.
                    let _ = tokio::time::timeout(
                        Duration::from_millis(250),
                        self.shared.changed.notified(),
                    )
                    .await;
                }
                continue;
            };
            let response =
                match tokio::time::timeout(self.opts.chunk_timeout, read_response(stream)).await {
                    Err(_) => {
                        return Err(format!(
                            "no chunk within {} s",
                            self.opts.chunk_timeout.as_secs()
                        ));
                    }
                    Ok(Err(ReadError::Closed)) => return Err("the stream closed".into()),
                    Ok(Err(ReadError::Malformed(why))) => {
                        self.conn
                            .penalise(self.peer, format!("malformed content response: {why}"));
                        return Err(format!("a malformed response: {why}"));
                    }
                    Ok(Ok(response)) => response,
                };
            let f = &self.descriptor.files[usize::from(file)];
            let (offset, len) = f
                .chunk_range(CHUNK_SIZE, index)
                .ok_or_else(|| "a chunk beyond its file was queued".to_string())?;
            let bytes = match response {
                ContentResponse::Chunk(bytes) => bytes,
                ContentResponse::Refused(r) => return Err(format!("refused: {}", r.reason)),
                ContentResponse::Descriptor(_) => {
                    self.conn.penalise(
                        self.peer,
                        "answered a chunk request with a descriptor".into(),
                    );
                    return Err("it answered a chunk request with a descriptor".into());
                }
            };
            if bytes.len() != len || ContentHash::of(&bytes) != f.chunks[index as usize] {
                self.conn.penalise(
                    self.peer,
                    format!(
                        "sent chunk {index} of {} that does not match its digest",
                        f.name
                    ),
                );
                return Err(format!(
                    "it sent chunk {index} of {} that does not match its digest",
                    f.name
                ));
            }
            self.files[usize::from(file)]
                .write_all_at(&bytes, offset)
                .map_err(|e| format!("cannot write the chunk here: {e}"))?;
            in_flight.pop_front();
            *sent += len as u64;
            let (done, total_bytes) = self.shared.finish(len);
            self.meter.set(done, total_bytes);
            // The workers share one task: a seeder whose chunks are always ready must not
            // starve the others.
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests;
