//! A fixed-size pool of named worker threads fed by a bounded queue.

use std::fmt;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::error::panic_message;

/// One unit of work. If it is dropped without running (the pool shut down, or its queue went
/// away), its closure is called with `cancelled = true` so that the task still reports.
pub(crate) struct Job {
    f: Option<Box<dyn FnOnce(bool) + Send>>,
}

impl Job {
    pub(crate) fn new(f: impl FnOnce(bool) + Send + 'static) -> Self {
        Job {
            f: Some(Box::new(f)),
        }
    }

    fn run(mut self) {
        if let Some(f) = self.f.take() {
            f(false);
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if let Some(f) = self.f.take() {
            f(true);
        }
    }
}

/// A fixed-size worker pool. Threads are named `{name}-{i}`.
///
/// Submission blocks while the queue is full (back-pressure); [`try_execute`](Self::try_execute)
/// does not block. A panicking job is caught and the thread keeps serving, so the pool keeps its
/// size. Dropping the pool is [`shutdown`](Self::shutdown).
pub struct Pool {
    name: String,
    tx: Option<Sender<Job>>,
    pub(crate) shutting_down: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    capacity: usize,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.name)
            .field("threads", &self.threads.len())
            .field("queue_capacity", &self.capacity)
            .field("queued", &self.queued())
            .finish()
    }
}

impl Pool {
    /// Starts `threads` workers named `{name}-0` .. `{name}-{threads-1}`, fed by a queue of at most
    /// `queue_capacity` jobs that no worker has taken yet (0: a submitter waits for a free worker).
    ///
    /// Fails if `threads` is 0 or a thread cannot be spawned.
    pub fn new(name: &str, threads: usize, queue_capacity: usize) -> io::Result<Pool> {
        if threads == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a pool needs at least one thread",
            ));
        }
        let (tx, rx) = crossbeam_channel::bounded::<Job>(queue_capacity);
        let shutting_down = Arc::new(AtomicBool::new(false));
        let mut pool = Pool {
            name: name.to_owned(),
            tx: Some(tx),
            shutting_down: shutting_down.clone(),
            threads: Vec::with_capacity(threads),
            capacity: queue_capacity,
        };
        for i in 0..threads {
            let rx = rx.clone();
            let stop = shutting_down.clone();
            // On error `pool` is dropped, which stops the threads already started.
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || worker_loop(rx, stop))?;
            pool.threads.push(handle);
        }
        Ok(pool)
    }

    /// The name given at creation.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Capacity of the queue.
    pub fn queue_capacity(&self) -> usize {
        self.capacity
    }

    /// Jobs queued and not yet taken by a worker.
    pub fn queued(&self) -> usize {
        self.tx.as_ref().map_or(0, Sender::len)
    }

    /// Queues a job, blocking while the queue is full. After shutdown the job is cancelled at once.
    pub(crate) fn submit(&self, job: Job) {
        if let Some(tx) = &self.tx {
            // On error (cannot happen while we hold a sender and workers run) the job is dropped,
            // i.e. cancelled.
            let _ = tx.send(job);
        }
    }

    /// Runs a plain closure on a worker, blocking while the queue is full. A panic in `f` is caught
    /// and logged. Returns `false` (dropping `f`) if the pool is shut down.
    pub fn execute(&self, f: impl FnOnce() + Send + 'static) -> bool {
        let Some(tx) = &self.tx else { return false };
        tx.send(Job::new(move |cancelled| {
            if !cancelled {
                f();
            }
        }))
        .is_ok()
    }

    /// Like [`execute`](Self::execute) but never blocks: gives `f` back if the queue is full or the
    /// pool is shut down.
    pub fn try_execute<F: FnOnce() + Send + 'static>(&self, f: F) -> Result<(), F> {
        let Some(tx) = &self.tx else { return Err(f) };
        if tx.is_full() {
            return Err(f);
        }
        // A queued job cannot hand `f` back, so `f` waits in a slot that the job empties when it
        // runs; if the queue filled up meanwhile, `f` is taken back from the slot.
        let slot = Arc::new(Mutex::new(Some(f)));
        let job_slot = slot.clone();
        let job = Job::new(move |cancelled| {
            let f = job_slot
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let (false, Some(f)) = (cancelled, f) {
                f();
            }
        });
        match tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(job)) | Err(TrySendError::Disconnected(job)) => {
                // Take `f` back before dropping the job (whose cancel path would drop `f`).
                let f = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
                drop(job);
                Err(f.expect("a job that was not queued cannot have run"))
            }
        }
    }

    /// Stops the pool: jobs still queued are cancelled (a task's completion then runs on the loop
    /// with [`TaskError::Cancelled`](crate::TaskError::Cancelled)); jobs already running finish (they
    /// are not interrupted) and the threads are joined.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        // Workers drain the rest of the queue, cancelling, then see the disconnect.
        self.tx = None;
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("a worker thread of pool {} died", self.name);
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn worker_loop(rx: Receiver<Job>, stop: Arc<AtomicBool>) {
    while let Ok(job) = rx.recv() {
        if stop.load(Ordering::Relaxed) {
            drop(job); // cancelled
            continue;
        }
        // Task jobs catch their worker's panic themselves; this catches plain `execute` closures.
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| job.run())) {
            log::warn!("a pool job panicked: {}", panic_message(&*p));
        }
    }
}
