//! The engine actor: inference off the async runtime.
//!
//! - **Batch workers** (`server.workers` std threads named `gaia-generate-N`, default one)
//!   share one bounded queue of [`Job`]s (`server.queue_depth`). A job is one request's `n`
//!   generations. Each worker runs up to `server.batch_size` generations together (continuous
//!   batching): every model step takes the last token of each decoding generation and chunks
//!   of the prompts still being read, in one pass over the weights
//!   ([`gaia_inference::generate::step_together`]); a job waiting in the queue joins between
//!   two steps, and a generation that ends leaves at once. Every [`GenerateEvent`] goes back
//!   tagged with its choice index through the job's bounded tokio channel; when a client reads
//!   slowly its events wait in its own small backlog and its generation sits out the steps
//!   until the backlog drains, so a slow client never slows the others.
//! - **The blocking worker** (`gaia-blocking`, one thread, bounded queue) runs embeddings and
//!   knowledge-base searches, so the embedder never runs on a tokio worker either.
//!
//! A full queue is refused at once ([`EngineError::Busy`]; the API answers 429 with
//! Retry-After). Cancellation: every job carries a [`CancelToken`]; the API cancels it when the
//! client goes away (the response future or SSE stream is dropped), and a dropped event
//! receiver stops the generation too. A job whose token is cancelled while it waits is skipped.
//! A generation that runs past `server.request_timeout_secs` is cancelled; its `Done` event
//! then reports [`FinishReason::Cancelled`], which the API turns into `length`.
//!
//! [`Engine::load`] gives the figures `/metrics` and swarm adverts use: `in_flight` counts the
//! jobs being generated (up to `workers x batch_size`), `queued` the jobs waiting.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::collections::VecDeque;

use gaia_inference::generate::{
    CancelToken, ChatModel, EventSink, FinishReason, GenerateEvent, GenerateRequest, Generation,
    step_together,
};
use gaia_inference::prefix::PrefixStats;
use tokio::sync::mpsc::error::TrySendError as ChannelFull;

/// Events sent back per token: (choice index, event).
pub type TaggedEvent = (usize, GenerateEvent);

/// Why the engine refused work.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum EngineError {
    /// The queue is full.
    #[error("the node is busy: {queued} requests are already waiting; retry in a few seconds")]
    Busy {
        /// Requests waiting.
        queued: usize,
    },
    /// The engine's threads are gone (the node is shutting down).
    #[error("the inference engine has stopped; the node is shutting down")]
    Stopped,
}

/// One request's generations.
pub struct Job {
    /// The generations (one per choice), run side by side; each carries `cancel`.
    pub requests: Vec<GenerateRequest>,
    /// Cancels every generation of the job.
    pub cancel: CancelToken,
    /// Where events go.
    pub events: tokio::sync::mpsc::Sender<TaggedEvent>,
}

type BlockingJob = Box<dyn FnOnce() + Send + 'static>;

/// Sizes of the engine.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Batch worker threads.
    pub workers: usize,
    /// Generations each worker steps together.
    pub batch_size: usize,
    /// Jobs waiting before new ones are refused.
    pub queue_depth: usize,
    /// Longest a generation may run.
    pub timeout: Duration,
    /// Bytes of finished generations' KV state kept for prompts that start the same way
    /// (0: no prefix cache).
    pub prefix_cache_bytes: usize,
}

/// Load figures, for `/metrics` and adverts.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct LoadFigures {
    /// Jobs running now.
    pub in_flight: usize,
    /// Jobs waiting for a worker.
    pub queued: usize,
    /// The queue's capacity.
    pub queue_capacity: usize,
    /// Worker threads.
    pub workers: usize,
    /// Generations each worker steps together.
    pub batch_size: usize,
    /// Decode speed of recent generations (exponential moving average), tokens per second.
    pub tokens_per_second: f64,
    /// Tokens generated since start.
    pub generated_tokens: u64,
    /// Prompt tokens processed since start.
    pub prompt_tokens: u64,
    /// Generations finished since start.
    pub generations: u64,
    /// The prefix cache.
    pub prefix: PrefixStats,
}

#[derive(Debug, Default)]
struct Load {
    in_flight: AtomicUsize,
    queued: AtomicUsize,
    generated: AtomicU64,
    prompt: AtomicU64,
    generations: AtomicU64,
    /// f64 bits of the moving average.
    tps_bits: AtomicU64,
}

impl Load {
    fn record(&self, prompt: usize, completion: usize, decode: Duration) {
        self.generated
            .fetch_add(completion as u64, Ordering::Relaxed);
        self.prompt.fetch_add(prompt as u64, Ordering::Relaxed);
        self.generations.fetch_add(1, Ordering::Relaxed);
        let secs = decode.as_secs_f64();
        if completion < 2 || secs <= 0.0 {
            return;
        }
        let now = completion as f64 / secs;
        let _ = self
            .tps_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let old = f64::from_bits(bits);
                let new = if old == 0.0 {
                    now
                } else {
                    0.7 * old + 0.3 * now
                };
                Some(new.to_bits())
            });
    }
}

struct Inner {
    jobs: SyncSender<Job>,
    blocking: SyncSender<BlockingJob>,
    blocking_queued: Arc<AtomicUsize>,
    load: Arc<Load>,
    options: EngineOptions,
    model: ChatModel,
}

/// A handle to the engine actor; cheap to clone. The threads stop when every handle is gone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("options", &self.inner.options)
            .field("load", &self.load())
            .finish()
    }
}

impl Engine {
    /// Starts the worker threads around `model`.
    pub fn start(model: ChatModel, options: EngineOptions) -> std::io::Result<Engine> {
        let options = EngineOptions {
            workers: options.workers.max(1),
            batch_size: options.batch_size.max(1),
            queue_depth: options.queue_depth.max(1),
            timeout: options.timeout,
            prefix_cache_bytes: options.prefix_cache_bytes,
        };
        let model = model.with_prefix_cache(options.prefix_cache_bytes);
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(options.queue_depth);
        let rx = Arc::new(Mutex::new(rx));
        let load = Arc::new(Load::default());
        for i in 0..options.workers {
            let rx = Arc::clone(&rx);
            let load = Arc::clone(&load);
            let model = model.clone();
            std::thread::Builder::new()
                .name(format!("gaia-generate-{i}"))
                .spawn(move || batch_worker(&model, &rx, &load, &options))?;
        }
        let (blocking, brx) = std::sync::mpsc::sync_channel::<BlockingJob>(options.queue_depth);
        std::thread::Builder::new()
            .name("gaia-blocking".into())
            .spawn(move || {
                while let Ok(job) = brx.recv() {
                    job();
                }
            })?;
        Ok(Engine {
            inner: Arc::new(Inner {
                jobs,
                blocking,
                blocking_queued: Arc::new(AtomicUsize::new(0)),
                load,
                options,
                model,
            }),
        })
    }

    /// The chat model (for templates, tokenization and constraints on the caller's side).
    pub fn model(&self) -> &ChatModel {
        &self.inner.model
    }

    /// Queues a job, or refuses it at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), EngineError> {
        let load = &self.inner.load;
        let depth = self.inner.options.queue_depth;
        let queued = load.queued.fetch_add(1, Ordering::SeqCst);
        if queued >= depth {
            load.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Busy { queued });
        }
        match self.inner.jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                load.queued.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => EngineError::Busy { queued },
                    TrySendError::Disconnected(_) => EngineError::Stopped,
                })
            }
        }
    }

    /// Runs `f` on the blocking worker (embeddings, knowledge-base searches) and waits for its
    /// result. Cancel-safe: dropping the future leaves `f` to run, its result discarded.
    pub async fn run_blocking<T, F>(&self, f: F) -> Result<T, EngineError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let counter = Arc::clone(&self.inner.blocking_queued);
        let queued = counter.fetch_add(1, Ordering::SeqCst);
        if queued >= self.inner.options.queue_depth {
            counter.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Busy { queued });
        }
        let job: BlockingJob = Box::new(move || {
            counter.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(f());
        });
        if let Err(e) = self.inner.blocking.try_send(job) {
            self.inner.blocking_queued.fetch_sub(1, Ordering::SeqCst);
            return Err(match e {
                TrySendError::Full(_) => EngineError::Busy { queued },
                TrySendError::Disconnected(_) => EngineError::Stopped,
            });
        }
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// The current load.
    pub fn load(&self) -> LoadFigures {
        let l = &self.inner.load;
        LoadFigures {
            in_flight: l.in_flight.load(Ordering::Relaxed),
            queued: l.queued.load(Ordering::Relaxed),
            queue_capacity: self.inner.options.queue_depth,
            workers: self.inner.options.workers,
            batch_size: self.inner.options.batch_size,
            tokens_per_second: f64::from_bits(l.tps_bits.load(Ordering::Relaxed)),
            generated_tokens: l.generated.load(Ordering::Relaxed),
            prompt_tokens: l.prompt.load(Ordering::Relaxed),
            generations: l.generations.load(Ordering::Relaxed),
            prefix: self.inner.model.prefix_stats(),
        }
    }
}

/// Events a client has not read yet, beyond its channel's capacity, at most: a generation
/// whose backlog is not empty sits out the steps, so this bounds what one step may add.
const BACKLOG: usize = 64;

/// The events of one generation on their way to its job's channel.
struct Outbox<'a> {
    tx: &'a tokio::sync::mpsc::Sender<TaggedEvent>,
    index: usize,
    /// Events the channel had no room for, oldest first.
    backlog: VecDeque<GenerateEvent>,
    closed: bool,
    load: &'a Load,
}

impl Outbox<'_> {
    /// Sends what waited, as far as the channel takes it.
    fn flush(&mut self) {
        while let Some(event) = self.backlog.pop_front() {
            match self.tx.try_send((self.index, event)) {
                Ok(()) => {}
                Err(ChannelFull::Full((_, event))) => {
                    self.backlog.push_front(event);
                    return;
                }
                Err(ChannelFull::Closed(_)) => {
                    self.closed = true;
                    self.backlog.clear();
                }
            }
        }
    }
}

impl EventSink for Outbox<'_> {
    fn send_event(&mut self, event: GenerateEvent) -> bool {
        if let GenerateEvent::Done {
            usage,
            timings,
            finish_reason,
        } = &event
            && (*finish_reason != FinishReason::Cancelled || !self.tx.is_closed())
        {
            self.load
                .record(usage.prompt_tokens, usage.completion_tokens, timings.decode);
        }
        if self.closed {
            return false;
        }
        if self.backlog.is_empty() {
            match self.tx.try_send((self.index, event)) {
                Ok(()) => return true,
                Err(ChannelFull::Full((_, event))) => self.backlog.push_back(event),
                Err(ChannelFull::Closed(_)) => {
                    self.closed = true;
                    return false;
                }
            }
        } else if self.backlog.len() < BACKLOG * 4 {
            self.backlog.push_back(event);
        } else {
            // Unreachable in practice (the generation sits out while its backlog waits); a
            // client this far behind is treated as gone.
            self.closed = true;
            return false;
        }
        true
    }
}

/// A job being generated: its channel, its cancel token and deadline, and how many of its
/// generations have not ended.
struct Running {
    events: tokio::sync::mpsc::Sender<TaggedEvent>,
    cancel: CancelToken,
    deadline: Instant,
    left: usize,
}

/// One generation of a running job; it stays after the generation ends until its last
/// events have gone out.
struct Slot {
    job: usize,
    index: usize,
    /// `None` once it ended and sent its final event.
    generation: Option<Generation>,
    backlog: VecDeque<GenerateEvent>,
    closed: bool,
}

impl Slot {
    /// The outbox of this slot's events (its backlog moves into it; see [`Slot::put_back`]).
    fn outbox<'a>(&mut self, running: &'a Running, load: &'a Load) -> Outbox<'a> {
        let mut outbox = Outbox {
            tx: &running.events,
            index: self.index,
            backlog: std::mem::take(&mut self.backlog),
            closed: self.closed,
            load,
        };
        outbox.flush();
        outbox
    }

    fn put_back(&mut self, outbox: Outbox<'_>) {
        self.backlog = outbox.backlog;
        self.closed = outbox.closed;
    }

    /// Its generation ended and every event went out (or nobody listens any more).
    fn is_done(&self) -> bool {
        self.generation.is_none() && (self.backlog.is_empty() || self.closed)
    }
}

/// Takes the next job off the queue: waits for one when the worker is idle, otherwise only
/// looks. `None` when there is none (or the engine is stopping: `stopped` is set).
fn next_job(rx: &Mutex<Receiver<Job>>, wait: bool, stopped: &mut bool) -> Option<Job> {
    let Ok(guard) = rx.lock() else {
        *stopped = true;
        return None;
    };
    let next = if wait {
        guard.recv().ok()
    } else {
        match guard.try_recv() {
            Ok(job) => Some(job),
            Err(std::sync::mpsc::TryRecvError::Empty) => return None,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
        }
    };
    *stopped |= next.is_none();
    next
}

/// Starts `job`'s generations as slots (a request that cannot start gets its error at once);
/// returns the running job, or `None` if none of them started.
fn admit(
    job: Job,
    id: usize,
    model: &ChatModel,
    timeout: Duration,
    slots: &mut Vec<Slot>,
) -> Option<Running> {
    let Job {
        requests,
        cancel,
        events,
    } = job;
    let mut running = Running {
        events,
        cancel,
        deadline: Instant::now() + timeout,
        left: 0,
    };
    for (index, request) in requests.into_iter().enumerate() {
        match Generation::start(model, request) {
            Ok(generation) => {
                running.left += 1;
                slots.push(Slot {
                    job: id,
                    index,
                    generation: Some(generation),
                    backlog: VecDeque::new(),
                    closed: false,
                });
            }
            Err(e) => {
                let _ = running.events.try_send((index, GenerateEvent::Error(e)));
            }
        }
    }
    (running.left > 0).then_some(running)
}

fn batch_worker(
    model: &ChatModel,
    rx: &Mutex<Receiver<Job>>,
    load: &Load,
    options: &EngineOptions,
) {
    let mut jobs: Vec<Option<Running>> = Vec::new();
    let mut slots: Vec<Slot> = Vec::new();
    let mut logits = Vec::new();
    let mut stopped = false;
    loop {
        // Admit waiting jobs between two steps, while there is room.
        while slots.len() < options.batch_size && !stopped {
            let Some(job) = next_job(rx, slots.is_empty(), &mut stopped) else {
                break;
            };
            load.queued.fetch_sub(1, Ordering::SeqCst);
            if job.cancel.is_cancelled() || job.events.is_closed() {
                continue;
            }
            let id = jobs.iter().position(Option::is_none).unwrap_or(jobs.len());
            let Some(running) = admit(job, id, model, options.timeout, &mut slots) else {
                continue;
            };
            load.in_flight.fetch_add(1, Ordering::SeqCst);
            if id == jobs.len() {
                jobs.push(Some(running));
            } else {
                jobs[id] = Some(running);
            }
        }
        if slots.is_empty() {
            if stopped {
                return;
            }
            continue;
        }
        let now = Instant::now();
        for running in jobs.iter().flatten() {
            if now > running.deadline {
                running.cancel.cancel();
            }
        }
        // One step for every generation whose client keeps up (its backlog went out).
        let mut stepped: Vec<(usize, Outbox<'_>)> = Vec::with_capacity(slots.len());
        let mut generations: Vec<&mut Generation> = Vec::with_capacity(slots.len());
        for (i, slot) in slots.iter_mut().enumerate() {
            let Some(running) = jobs.get(slot.job).and_then(Option::as_ref) else {
                continue;
            };
            let outbox = slot.outbox(running, load);
            let keeps_up = outbox.backlog.is_empty() && !outbox.closed;
            if !keeps_up || slot.generation.is_none() {
                slot.put_back(outbox);
            } else if let Some(generation) = slot.generation.as_mut() {
                generations.push(generation);
                stepped.push((i, outbox));
            }
        }
        let mut batch: Vec<(&mut Generation, &mut dyn EventSink)> = generations
            .into_iter()
            .zip(stepped.iter_mut())
            .map(|(g, (_, o))| (g, o as &mut dyn EventSink))
            .collect();
        let ran = step_together(model, &mut batch, &mut logits);
        drop(batch);
        let mut returned: Vec<Option<Outbox<'_>>> = (0..slots.len()).map(|_| None).collect();
        for (i, outbox) in stepped {
            returned[i] = Some(outbox);
        }
        for (slot, outbox) in slots.iter_mut().zip(returned) {
            if let Some(outbox) = outbox {
                slot.put_back(outbox);
            }
        }
        // Generations that ended send their last events; a slot leaves once they went out,
        // and a job ends with its last slot.
        for slot in slots.iter_mut() {
            let Some(running) = jobs.get(slot.job).and_then(Option::as_ref) else {
                continue;
            };
            if slot
                .generation
                .as_ref()
                .is_some_and(Generation::is_finished)
                || (slot.closed && slot.generation.is_some())
            {
                let mut outbox = slot.outbox(running, load);
                if let Some(generation) = slot.generation.take() {
                    generation.finish(&mut outbox);
                }
                slot.put_back(outbox);
            }
        }
        let mut i = 0;
        while i < slots.len() {
            if !slots[i].is_done() {
                i += 1;
                continue;
            }
            let slot = slots.swap_remove(i);
            if let Some(running) = jobs.get_mut(slot.job).and_then(Option::as_mut) {
                running.left -= 1;
                if running.left == 0 {
                    jobs[slot.job] = None;
                    load.in_flight.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
        if ran == 0 {
            // Nothing ran: every generation waits for its client. Do not spin.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Cancels a token when dropped: held by whatever waits for a job's events, so a client that
/// goes away stops its generation.
#[derive(Debug)]
pub struct CancelOnDrop(Option<CancelToken>);

impl CancelOnDrop {
    /// Guards `token`.
    pub fn new(token: CancelToken) -> CancelOnDrop {
        CancelOnDrop(Some(token))
    }

    /// Leaves the token alone from now on (the work finished normally).
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(token) = self.0.take() {
            token.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_average_of_decode_speed() {
        let load = Load::default();
        load.record(10, 100, Duration::from_secs(1));
        assert_eq!(f64::from_bits(load.tps_bits.load(Ordering::Relaxed)), 100.0);
        load.record(10, 200, Duration::from_secs(1));
        let v = f64::from_bits(load.tps_bits.load(Ordering::Relaxed));
        assert!((v - 130.0).abs() < 1e-9, "{v}");
        assert_eq!(load.generated.load(Ordering::Relaxed), 300);
        assert_eq!(load.generations.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn cancel_on_drop_cancels() {
        let token = CancelToken::new();
        CancelOnDrop::new(token.clone()).disarm();
        assert!(!token.is_cancelled());
        drop(CancelOnDrop::new(token.clone()));
        assert!(token.is_cancelled());
    }
}
