//! A small persistent thread pool for the matrix kernels.
//!
//! A matrix-vector product of the default model takes tens of microseconds, so the cost of
//! handing work to threads must be a microsecond or less: no per-call spawning, no channel
//! allocation. The pool keeps `n - 1` workers; [`ThreadPool::run`] publishes a borrowed job,
//! runs share 0 on the calling thread and waits until every worker has run its share.
//! Idle workers spin briefly (the next product usually follows within microseconds) and then
//! sleep on a condition variable, so an idle pool costs no CPU.

use std::cell::{Cell, UnsafeCell};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker polls for the next job before it sleeps.
const SPIN: Duration = Duration::from_micros(300);

/// Waiting strategy of a thread that polls an atomic: a few microseconds of busy spinning
/// (the common case on an idle machine: the other thread is about to finish), then
/// `yield_now` between polls. Yielding matters on a busy machine: if the thread we wait for
/// shares our core, spinning would only steal its time.
#[derive(Default)]
struct Backoff {
    step: u32,
}

impl Backoff {
    const SPIN_STEPS: u32 = 7;

    fn snooze(&mut self) {
        if self.step < Self::SPIN_STEPS {
            for _ in 0..1u32 << self.step {
                std::hint::spin_loop();
            }
            self.step += 1;
        } else {
            std::thread::yield_now();
        }
    }

    fn is_yielding(&self) -> bool {
        self.step >= Self::SPIN_STEPS
    }
}

/// The job being run, with its lifetime erased (see the SAFETY notes in [`ThreadPool::run`]).
type JobPtr = *const (dyn Fn(usize) + Sync + 'static);

/// Bits of [`Shared::state`] holding the count of claimed shares (the rest is the job number).
const CLAIM_BITS: u32 = 24;
const CLAIM_MASK: u64 = (1 << CLAIM_BITS) - 1;

struct Shared {
    /// `(job number << CLAIM_BITS) | shares claimed`. A new job sets the number and claims
    /// share 0 for the submitter; a worker claims a share with a compare-and-swap, and the
    /// submitter claims (and runs) whatever is left once its own share is done, so it never
    /// waits for a worker that has not started.
    state: AtomicU64,
    /// The current job; written only while no share of a job is claimed-but-unfinished.
    job: UnsafeCell<Option<JobPtr>>,
    /// Shares claimed by workers that have finished.
    finished: AtomicUsize,
    /// Workers asleep (or about to sleep) on `wake`.
    sleepers: AtomicUsize,
    sleep_lock: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
    /// A worker's share of the current job panicked.
    panicked: AtomicBool,
    threads: usize,
}

// SAFETY: `job` is written by the submitting thread only between jobs (after every claimed
// share has finished), under the `submit` mutex, and published by the Release store of `state`;
// a worker reads it only after winning a claim (AcqRel CAS) on the state of that very job, and
// the submitter does not retire the job before every claimed share has finished.
unsafe impl Sync for Shared {}
// SAFETY: the raw job pointer is only dereferenced under the protocol above; the closure it
// points to is `Sync`, so calling it from other threads is allowed.
unsafe impl Send for Shared {}

impl Shared {
    /// Claims the next share of job `job`, if that job is current and has shares left.
    fn claim(&self, job: u64) -> Option<usize> {
        let mut cur = self.state.load(Ordering::Acquire);
        loop {
            let claimed = (cur & CLAIM_MASK) as usize;
            if cur >> CLAIM_BITS != job || claimed >= self.threads {
                return None;
            }
            match self.state.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(claimed),
                Err(now) => cur = now,
            }
        }
    }
}

thread_local! {
    /// Set on pool worker threads and while a thread runs share 0 of a job, so that a nested
    /// `run` executes inline instead of deadlocking.
    static IN_POOL: Cell<bool> = const { Cell::new(false) };
}

/// A fixed set of worker threads, reused across calls.
///
/// `ThreadPool::new(n)` gives `n`-way parallelism: `n - 1` threads plus the caller.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    threads: usize,
    submit: Mutex<Submit>,
}

/// State of the submitting side, under the `submit` lock.
#[derive(Default)]
struct Submit {
    /// Number of the last job published.
    job: u64,
    /// Jobs in the current measurement window.
    window_jobs: u32,
    /// Time the caller spent on its own shares in this window.
    worked: Duration,
    /// Time the caller then spent waiting for workers in this window.
    waited: Duration,
    /// Jobs left to run on the caller alone (see [`ThreadPool::run`]).
    solo_left: u32,
}

/// Jobs per measurement window of the waiting time.
const WINDOW_JOBS: u32 = 256;
/// Jobs run on the caller alone, after a window in which waiting cost more than it saved,
/// before workers are tried again.
const SOLO_JOBS: u32 = 1024;

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("threads", &self.threads)
            .finish()
    }
}

impl Default for ThreadPool {
    /// A pool as wide as the machine's available parallelism.
    fn default() -> Self {
        ThreadPool::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

impl ThreadPool {
    /// A pool running jobs on `n` threads (the caller and `n - 1` workers); `0` counts as 1.
    ///
    /// # Panics
    /// If the operating system refuses to start a thread.
    pub fn new(n: usize) -> Self {
        let threads = n.clamp(1, CLAIM_MASK as usize);
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            finished: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            sleep_lock: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            threads,
        });
        let workers = (1..threads)
            .map(|index| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("gaia-matmul-{index}"))
                    .spawn(move || worker(&shared))
                    .expect("cannot start a matmul worker thread")
            })
            .collect();
        ThreadPool {
            shared,
            workers,
            threads,
            submit: Mutex::new(Submit::default()),
        }
    }

    /// Number of threads a job runs on (including the caller).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(i)` once for every `i` in `0..self.threads()`, in parallel where workers are
    /// free, and returns when all calls have finished. The calling thread runs `f(0)` and any
    /// share no worker has picked up by then, so a busy machine degrades to running on the
    /// caller instead of waiting for a thread to be scheduled. Called from inside a job (or
    /// while another thread is submitting), the calls run one after the other on the caller.
    ///
    /// On an oversubscribed machine a worker can be preempted in the middle of its share, and
    /// waiting for it costs more than the parallelism gains. The pool measures, over windows of
    /// jobs, how long the caller worked and how long it then waited for workers; when the
    /// waiting exceeded the work (running alone would have been faster), the next jobs run on
    /// the caller alone, then the workers are tried again. On an idle or moderately busy
    /// machine this does not trigger.
    ///
    /// # Panics
    /// Re-raises a panic of any share after all shares have finished.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.threads == 1 || IN_POOL.with(Cell::get) {
            (0..self.threads).for_each(f);
            return;
        }
        let mut guard: MutexGuard<'_, Submit> = match self.submit.try_lock() {
            Ok(g) => g,
            // Another thread is using the pool: do the work here rather than wait.
            Err(std::sync::TryLockError::WouldBlock) => {
                (0..self.threads).for_each(f);
                return;
            }
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        };
        if guard.solo_left > 0 {
            guard.solo_left -= 1;
            drop(guard);
            (0..self.threads).for_each(f);
            return;
        }
        let shared = &*self.shared;
        guard.job = (guard.job + 1) & ((1 << (64 - CLAIM_BITS)) - 1);
        let job = guard.job;
        // SAFETY: erasing the lifetime is sound because this function does not return or
        // unwind before every claimed share has finished (the wait below; a panic of ours is
        // caught and re-raised after it), and shares cannot be claimed after that (all are
        // claimed). The previous job's shares have all finished, so no one reads `job` now,
        // and we hold the `submit` lock, so this write races with nothing.
        unsafe {
            let raw: *const (dyn Fn(usize) + Sync + '_) = f;
            let ptr = std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), JobPtr>(raw);
            *shared.job.get() = Some(ptr);
        }
        shared.panicked.store(false, Ordering::Relaxed);
        shared.finished.store(0, Ordering::Relaxed);
        // Publish the job with share 0 claimed by us.
        shared
            .state
            .store((job << CLAIM_BITS) | 1, Ordering::SeqCst);
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _lock = shared.sleep_lock.lock().unwrap_or_else(|p| p.into_inner());
            shared.wake.notify_all();
        }

        IN_POOL.with(|c| c.set(true));
        let started = Instant::now();
        let mut result = catch_unwind(AssertUnwindSafe(|| f(0)));
        // Run every share no worker has claimed yet.
        let mut ours = 1;
        while let Some(share) = shared.claim(job) {
            ours += 1;
            if result.is_ok() {
                result = catch_unwind(AssertUnwindSafe(|| f(share)));
            }
        }
        IN_POOL.with(|c| c.set(false));

        let theirs = self.threads - ours;
        let worked = started.elapsed();
        let mut backoff = Backoff::default();
        while shared.finished.load(Ordering::Acquire) != theirs {
            backoff.snooze();
        }
        let waited = started.elapsed() - worked;
        guard.worked += worked;
        guard.waited += waited;
        guard.window_jobs += 1;
        if guard.window_jobs >= WINDOW_JOBS {
            if guard.waited > guard.worked {
                guard.solo_left = SOLO_JOBS;
            }
            guard.window_jobs = 0;
            guard.worked = Duration::ZERO;
            guard.waited = Duration::ZERO;
        }
        // SAFETY: every claimed share has finished and none can be claimed any more; clear the
        // soon-dangling pointer.
        unsafe { *shared.job.get() = None };
        drop(guard);
        if let Err(payload) = result {
            resume_unwind(payload);
        }
        if shared.panicked.load(Ordering::Acquire) {
            panic!("a matmul worker thread panicked (see its message above)");
        }
    }
}

fn worker(shared: &Shared) {
    IN_POOL.with(|c| c.set(true));
    let mut seen = 0u64;
    loop {
        // Wait for a new job number: spin a little, then yield, then sleep.
        let start = Instant::now();
        let mut backoff = Backoff::default();
        let job = loop {
            let job = shared.state.load(Ordering::Acquire) >> CLAIM_BITS;
            if job != seen || shared.shutdown.load(Ordering::Acquire) {
                break job;
            }
            if backoff.is_yielding() && start.elapsed() > SPIN {
                let mut guard = shared.sleep_lock.lock().unwrap_or_else(|p| p.into_inner());
                shared.sleepers.fetch_add(1, Ordering::SeqCst);
                while shared.state.load(Ordering::SeqCst) >> CLAIM_BITS == seen
                    && !shared.shutdown.load(Ordering::SeqCst)
                {
                    guard = shared.wake.wait(guard).unwrap_or_else(|p| p.into_inner());
                }
                shared.sleepers.fetch_sub(1, Ordering::SeqCst);
                drop(guard);
                continue;
            }
            backoff.snooze();
        };
        if shared.shutdown.load(Ordering::Acquire) {
            return;
        }
        seen = job;
        let Some(share) = shared.claim(job) else {
            // The submitter (or other workers) took every share already.
            continue;
        };
        // SAFETY: we hold a claim on the current job, so the submitter keeps the closure alive
        // and the pointer set until we report `finished` below.
        let ptr = unsafe { *shared.job.get() };
        if let Some(ptr) = ptr {
            // SAFETY: as above.
            let f = unsafe { &*ptr };
            if catch_unwind(AssertUnwindSafe(|| f(share))).is_err() {
                shared.panicked.store(true, Ordering::Release);
            }
        }
        shared.finished.fetch_add(1, Ordering::AcqRel);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _lock = self
                .shared
                .sleep_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_share_runs_once_per_job() {
        for n in [1, 2, 3, 5] {
            let pool = ThreadPool::new(n);
            assert_eq!(pool.threads(), n);
            for round in 0..200 {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.run(&|i| {
                    hits[i].fetch_add(round + 1, Ordering::Relaxed);
                });
                for h in &hits {
                    assert_eq!(h.load(Ordering::Relaxed), round + 1);
                }
            }
        }
    }

    #[test]
    fn jobs_can_borrow_the_stack_and_write_disjoint_parts() {
        let pool = ThreadPool::new(3);
        let mut out = vec![0usize; 3 * 1000];
        let chunks: Vec<Mutex<&mut [usize]>> = out.chunks_mut(1000).map(Mutex::new).collect();
        pool.run(&|i| {
            let mut c = chunks[i].lock().unwrap();
            for (k, v) in c.iter_mut().enumerate() {
                *v = i * 1000 + k;
            }
        });
        drop(chunks);
        assert!(out.iter().enumerate().all(|(k, &v)| k == v));
    }

    #[test]
    fn workers_wake_after_sleeping() {
        let pool = ThreadPool::new(2);
        std::thread::sleep(SPIN * 4);
        let count = AtomicUsize::new(0);
        pool.run(&|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn nested_and_concurrent_runs_do_not_deadlock() {
        let pool = ThreadPool::new(2);
        let count = AtomicUsize::new(0);
        pool.run(&|_| {
            pool.run(&|_| {
                count.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(count.load(Ordering::Relaxed), 4);
        let pool = &pool;
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        pool.run(&|_| {
                            total.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 100 * 2);
    }

    #[test]
    fn a_panicking_share_is_reported_and_the_pool_still_works() {
        let pool = ThreadPool::new(2);
        for bad in [0, 1] {
            let r = catch_unwind(AssertUnwindSafe(|| {
                pool.run(&|i| {
                    if i == bad {
                        panic!("share {i} fails on purpose");
                    }
                })
            }));
            assert!(r.is_err());
        }
        let count = AtomicUsize::new(0);
        pool.run(&|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }
}
