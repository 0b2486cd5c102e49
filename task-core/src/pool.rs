//! A fixed-size pool of named worker threads fed by a bounded queue.

use std::fmt;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};

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

/// How often a worker that finds the queue empty yields its core (taking a job if one came)
/// before it goes to sleep.
const IDLE_YIELDS: u32 = 16;

/// How workers wait for jobs.
///
/// crossbeam's blocking receive spins on the CPU (~127 `pause` instructions, a few microseconds)
/// and yields four times before it sleeps. A pool's workers wait like that after every burst of
/// work, and on a host with fewer cores than busy threads (the device's main loop, its workers,
/// the vCPUs) the spin holds a core that a thread with work could have had; sleeping at once is
/// worse still (a futex wake-up per burst, measured). So a worker takes jobs with `try_recv`,
/// yields its core between tries ([`IDLE_YIELDS`] times), and then sleeps on a condition variable
/// until a submitter wakes it (docs/benchmarks.md, "task-core engine"). A queue of capacity 0 is a
/// rendezvous (a submission waits for a worker blocked in `recv`), so its workers keep
/// crossbeam's wait.
#[derive(Default)]
struct Idle {
    rendezvous: bool,
    sleeping: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Idle {
    /// After a job was queued: wakes one sleeping worker, if any.
    fn wake_one(&self) {
        // Pairs with the fence in `next`: either the worker sees the job, or we see it asleep.
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) > 0 {
            // Taking `lock` waits out a worker between its last look at the queue and its wait;
            // notifying after letting the lock go spares the woken worker from blocking on it at
            // once (it would wake, find the lock held, sleep again and need a second wake-up).
            drop(self.lock.lock().unwrap_or_else(PoisonError::into_inner));
            self.cv.notify_one();
        }
    }

    /// After the queue was closed: wakes every worker.
    fn wake_all(&self) {
        let _g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.cv.notify_all();
    }

    /// The next job, waiting while the queue is empty; `None` once it is closed and empty.
    fn next(&self, rx: &Receiver<Job>) -> Option<Job> {
        if self.rendezvous {
            return rx.recv().ok();
        }
        for i in 0..=IDLE_YIELDS {
            match rx.try_recv() {
                Ok(job) => return Some(job),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => {}
            }
            if i < IDLE_YIELDS {
                std::thread::yield_now();
            }
        }
        let mut g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.sleeping.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let job = loop {
            match rx.try_recv() {
                Ok(job) => break Some(job),
                Err(TryRecvError::Disconnected) => break None,
                // A submitter that queued after our check takes `lock` before it notifies, so
                // the notification cannot fall between the check and the wait.
                Err(TryRecvError::Empty) => {
                    g = self.cv.wait(g).unwrap_or_else(PoisonError::into_inner);
                }
            }
        };
        self.sleeping.fetch_sub(1, Ordering::SeqCst);
        job
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
    /// An inline pool ([`Pool::inline`]): jobs run on the submitting thread.
    inline: bool,
    pub(crate) shutting_down: Arc<AtomicBool>,
    idle: Arc<Idle>,
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
        let idle = Arc::new(Idle {
            rendezvous: queue_capacity == 0,
            ..Idle::default()
        });
        let mut pool = Pool {
            name: name.to_owned(),
            tx: Some(tx),
            inline: false,
            shutting_down: shutting_down.clone(),
            idle: idle.clone(),
            threads: Vec::with_capacity(threads),
            capacity: queue_capacity,
        };
        for i in 0..threads {
            let rx = rx.clone();
            let stop = shutting_down.clone();
            let idle = idle.clone();
            // On error `pool` is dropped, which stops the threads already started.
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || worker_loop(rx, stop, &idle))?;
            pool.threads.push(handle);
        }
        Ok(pool)
    }

    /// A pool without threads: every job runs at once on the thread that submits it, with the
    /// same panic handling as a worker thread. Task semantics are kept: a task's completion is
    /// still queued to its main loop and runs on a later dispatch, never inside `run_in_thread`.
    /// For deterministic single-threaded runs (tests, fuzzing): work that blocks waits on the
    /// submitter's thread.
    pub fn inline(name: &str) -> Pool {
        Pool {
            name: name.to_owned(),
            tx: None,
            inline: true,
            shutting_down: Arc::new(AtomicBool::new(false)),
            idle: Arc::default(),
            threads: Vec::new(),
            capacity: 0,
        }
    }

    /// True for a pool made by [`Pool::inline`].
    pub fn is_inline(&self) -> bool {
        self.inline
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
        if self.inline {
            run_inline(job, &self.shutting_down);
            return;
        }
        if let Some(tx) = &self.tx {
            // On error (cannot happen while we hold a sender and workers run) the job is dropped,
            // i.e. cancelled.
            if tx.send(job).is_ok() {
                self.idle.wake_one();
            }
        }
    }

    /// Runs a plain closure on a worker, blocking while the queue is full. A panic in `f` is caught
    /// and logged. Returns `false` (dropping `f`) if the pool is shut down.
    pub fn execute(&self, f: impl FnOnce() + Send + 'static) -> bool {
        if self.inline {
            if self.shutting_down.load(Ordering::Relaxed) {
                return false;
            }
            run_inline(
                Job::new(move |cancelled| {
                    if !cancelled {
                        f()
                    }
                }),
                &self.shutting_down,
            );
            return true;
        }
        let Some(tx) = &self.tx else { return false };
        let sent = tx
            .send(Job::new(move |cancelled| {
                if !cancelled {
                    f();
                }
            }))
            .is_ok();
        if sent {
            self.idle.wake_one();
        }
        sent
    }

    /// Like [`execute`](Self::execute) but never blocks: gives `f` back if the queue is full or the
    /// pool is shut down.
    pub fn try_execute<F: FnOnce() + Send + 'static>(&self, f: F) -> Result<(), F> {
        if self.inline {
            if self.shutting_down.load(Ordering::Relaxed) {
                return Err(f);
            }
            self.execute(f);
            return Ok(());
        }
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
            Ok(()) => {
                self.idle.wake_one();
                Ok(())
            }
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
        self.idle.wake_all();
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

/// Runs one job of an inline pool on this thread, as a worker would.
fn run_inline(job: Job, stop: &AtomicBool) {
    if stop.load(Ordering::Relaxed) {
        drop(job); // cancelled
        return;
    }
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| job.run())) {
        log::warn!("a pool job panicked: {}", panic_message(&*p));
    }
}

fn worker_loop(rx: Receiver<Job>, stop: Arc<AtomicBool>, idle: &Idle) {
    while let Some(job) = idle.next(&rx) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    struct DropCount(Arc<AtomicUsize>);
    impl Drop for DropCount {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Runs `n` jobs that each wait until all `n` run at once: proves `n` live workers. Returns
    /// the thread names seen.
    fn all_threads_serve(pool: &Pool, n: usize) -> HashSet<String> {
        let arrived = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = crossbeam_channel::unbounded();
        for _ in 0..n {
            let (arrived, tx) = (arrived.clone(), tx.clone());
            assert!(pool.execute(move || {
                arrived.fetch_add(1, Ordering::SeqCst);
                let end = Instant::now() + Duration::from_secs(5);
                while arrived.load(Ordering::SeqCst) < n && Instant::now() < end {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let all = arrived.load(Ordering::SeqCst) >= n;
                tx.send((std::thread::current().name().unwrap().to_owned(), all))
                    .unwrap();
            }));
        }
        (0..n)
            .map(|_| {
                let (name, all) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
                assert!(all, "not all {n} workers ran at once");
                name
            })
            .collect()
    }

    /// Waits until every worker of `pool` has gone to sleep (after its yields).
    fn all_asleep(pool: &Pool) {
        let end = Instant::now() + Duration::from_secs(10);
        while pool.idle.sleeping.load(Ordering::SeqCst) < pool.threads() {
            assert!(Instant::now() < end, "workers did not go to sleep");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn sleeping_workers_wake_for_every_kind_of_submission_and_for_shutdown() {
        let pool = Pool::new("sleepy", 2, 8).unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        for round in 0..3 {
            all_asleep(&pool);
            let tx = tx.clone();
            match round {
                0 => assert!(pool.execute(move || tx.send(0).unwrap())),
                1 => assert!(pool.try_execute(move || tx.send(1).unwrap()).is_ok()),
                _ => pool.submit(Job::new(move |cancelled| {
                    assert!(!cancelled);
                    tx.send(2).unwrap();
                })),
            }
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(round));
        }
        all_asleep(&pool);
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            pool.shutdown();
            done_tx.send(()).unwrap();
        });
        assert!(
            done_rx.recv_timeout(Duration::from_secs(10)).is_ok(),
            "shutdown did not wake the sleeping workers"
        );
    }

    #[test]
    fn threads_are_named_and_counted() {
        let pool = Pool::new("named", 3, 4).unwrap();
        assert_eq!(pool.threads(), 3);
        assert_eq!(pool.name(), "named");
        assert_eq!(pool.queue_capacity(), 4);
        let names = all_threads_serve(&pool, 3);
        let want: HashSet<String> = (0..3).map(|i| format!("named-{i}")).collect();
        assert_eq!(names, want);
    }

    #[test]
    fn zero_threads_is_an_error() {
        assert_eq!(
            Pool::new("z", 0, 1).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn panics_are_caught_and_the_pool_keeps_its_size() {
        let pool = Pool::new("panicky", 2, 8).unwrap();
        for _ in 0..6 {
            assert!(pool.execute(|| panic!("job panic")));
        }
        let names = all_threads_serve(&pool, 2);
        assert_eq!(names.len(), 2);
    }

    #[test]
    fn try_execute_gives_the_closure_back_when_full() {
        let pool = Pool::new("full", 1, 2).unwrap();
        let (started_tx, started_rx) = crossbeam_channel::bounded(1);
        let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(0);
        assert!(pool.execute(move || {
            started_tx.send(()).unwrap();
            go_rx.recv().unwrap();
        }));
        started_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        for _ in 0..2 {
            let r = ran.clone();
            assert!(pool
                .try_execute(move || {
                    r.fetch_add(1, Ordering::SeqCst);
                })
                .is_ok());
        }
        assert_eq!(pool.queued(), 2);
        let drops = Arc::new(AtomicUsize::new(0));
        let d = DropCount(drops.clone());
        let back = pool
            .try_execute(move || drop(d))
            .expect_err("queue is full");
        assert_eq!(
            drops.load(Ordering::SeqCst),
            0,
            "the closure came back intact"
        );
        drop(back);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
        go_tx.send(()).unwrap();
        pool.shutdown();
    }

    #[test]
    fn shutdown_drops_queued_closures_once_without_running_them() {
        let pool = Pool::new("shut", 1, 8).unwrap();
        let (started_tx, started_rx) = crossbeam_channel::bounded(1);
        let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(0);
        assert!(pool.execute(move || {
            started_tx.send(()).unwrap();
            let _ = go_rx.recv_timeout(Duration::from_secs(5));
        }));
        started_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let drops = Arc::new(AtomicUsize::new(0));
        let ran = Arc::new(AtomicUsize::new(0));
        for _ in 0..5 {
            let (d, r) = (DropCount(drops.clone()), ran.clone());
            assert!(pool.execute(move || {
                let _keep = &d;
                r.fetch_add(1, Ordering::SeqCst);
            }));
        }
        let flag = pool.shutting_down.clone();
        let (joined_tx, joined_rx) = crossbeam_channel::bounded(1);
        let t = std::thread::spawn(move || {
            drop(pool); // Drop is shutdown
            joined_tx.send(()).unwrap();
        });
        while !flag.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        go_tx.send(()).unwrap();
        joined_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("shutdown hung");
        t.join().unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        assert_eq!(drops.load(Ordering::SeqCst), 5);
    }

    #[test]
    fn submission_blocks_while_the_queue_is_full() {
        let pool = Arc::new(Pool::new("bp", 1, 1).unwrap());
        let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(0);
        let (started_tx, started_rx) = crossbeam_channel::bounded(1);
        assert!(pool.execute(move || {
            started_tx.send(()).unwrap();
            go_rx.recv().unwrap();
        }));
        started_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(pool.execute(|| {})); // fills the queue
        let (sent_tx, sent_rx) = crossbeam_channel::bounded(1);
        let p = pool.clone();
        let t = std::thread::spawn(move || {
            assert!(p.execute(|| {}));
            sent_tx.send(()).unwrap();
        });
        assert!(
            sent_rx.recv_timeout(Duration::from_millis(50)).is_err(),
            "submission went through a full queue"
        );
        go_tx.send(()).unwrap();
        sent_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("submission never unblocked");
        t.join().unwrap();
    }
}
