//! The engine actor: inference off the async runtime.
//!
//! - **Generation workers** (`server.workers` std threads named `gaia-generate-N`) share one
//!   bounded queue of [`Job`]s (`server.queue_depth`). A job is one request's `n` generations,
//!   run one after the other on the worker's thread; every [`GenerateEvent`] goes back tagged
//!   with its choice index through the job's bounded tokio channel (`blocking_send`, so a slow
//!   client slows its own generation only).
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
//! [`Engine::load`] gives the figures `/metrics` and swarm adverts use.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gaia_inference::generate::{
    CancelToken, ChatModel, FinishReason, GenerateEvent, GenerateRequest,
};

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
    /// The generations (one per choice), run in order; each carries `cancel`.
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
    /// Generations running at once.
    pub workers: usize,
    /// Jobs waiting before new ones are refused.
    pub queue_depth: usize,
    /// Longest a generation may run.
    pub timeout: Duration,
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
    /// Decode speed of recent generations (exponential moving average), tokens per second.
    pub tokens_per_second: f64,
    /// Tokens generated since start.
    pub generated_tokens: u64,
    /// Prompt tokens processed since start.
    pub prompt_tokens: u64,
    /// Generations finished since start.
    pub generations: u64,
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
            queue_depth: options.queue_depth.max(1),
            timeout: options.timeout,
        };
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(options.queue_depth);
        let rx = Arc::new(Mutex::new(rx));
        let load = Arc::new(Load::default());
        for i in 0..options.workers {
            let rx = Arc::clone(&rx);
            let load = Arc::clone(&load);
            let model = model.clone();
            std::thread::Builder::new()
                .name(format!("gaia-generate-{i}"))
                .spawn(move || generation_worker(&model, &rx, &load, options.timeout))?;
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
            tokens_per_second: f64::from_bits(l.tps_bits.load(Ordering::Relaxed)),
            generated_tokens: l.generated.load(Ordering::Relaxed),
            prompt_tokens: l.prompt.load(Ordering::Relaxed),
            generations: l.generations.load(Ordering::Relaxed),
        }
    }
}

/// Decrements a counter when dropped (so a panicking generation still leaves the figures
/// right).
struct Gauge<'a>(&'a AtomicUsize);

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn generation_worker(model: &ChatModel, rx: &Mutex<Receiver<Job>>, load: &Load, timeout: Duration) {
    loop {
        let job = {
            let Ok(guard) = rx.lock() else { return };
            match guard.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        load.in_flight.fetch_add(1, Ordering::SeqCst);
        load.queued.fetch_sub(1, Ordering::SeqCst);
        let _running = Gauge(&load.in_flight);
        if job.cancel.is_cancelled() || job.events.is_closed() {
            continue;
        }
        let deadline = Instant::now() + timeout;
        let Job {
            requests,
            cancel,
            events,
        } = job;
        for (index, request) in requests.into_iter().enumerate() {
            if cancel.is_cancelled() {
                break;
            }
            let mut sink = |event: GenerateEvent| {
                if let GenerateEvent::Done {
                    usage,
                    timings,
                    finish_reason,
                } = &event
                    && (*finish_reason != FinishReason::Cancelled || !events.is_closed())
                {
                    load.record(usage.prompt_tokens, usage.completion_tokens, timings.decode);
                }
                if Instant::now() > deadline {
                    cancel.cancel();
                }
                events.blocking_send((index, event)).is_ok()
            };
            model.generate(request, &mut sink);
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
