//! The fabric: GID routing between backends and the retry timer.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::thread::{self, JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use super::qp::{on_timer, Qp};
use super::{lock, EmulatedBackend};
use crate::Gid;

/// A software RDMA fabric: every [`EmulatedBackend`] attached to it reaches the others by GID.
///
/// The fabric owns one timer thread (RNR and transport retries); it stops when the last `Arc`
/// of the fabric is dropped (each backend holds one).
pub struct Fabric {
    /// GID → owning backend (first registration wins).
    gids: RwLock<HashMap<Gid, (u64, Weak<EmulatedBackend>)>>,
    next_backend: AtomicU64,
    timer: Arc<Timer>,
    thread: Mutex<Option<(JoinHandle<()>, ThreadId)>>,
    /// Origin of the [`BACKSTOP`] grid.
    epoch: Instant,
}

/// Granularity and least delay of backstop timers ([`Fabric::backstop`]).
pub(crate) const BACKSTOP: Duration = Duration::from_millis(1);

impl fmt::Debug for Fabric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fabric")
            .field("gids", &read(&self.gids).len())
            .finish_non_exhaustive()
    }
}

use crate::sync::{read, write};

struct Entry {
    at: Instant,
    seq: u64,
    token: u64,
    qp: Weak<Qp>,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

#[derive(Default)]
struct TimerQ {
    heap: BinaryHeap<Reverse<Entry>>,
    seq: u64,
    stop: bool,
}

#[derive(Default)]
struct Timer {
    q: Mutex<TimerQ>,
    cv: Condvar,
}

impl Timer {
    fn run(&self) {
        let mut due = Vec::new();
        loop {
            {
                let mut q = lock(&self.q);
                loop {
                    if q.stop {
                        return;
                    }
                    let now = Instant::now();
                    while q.heap.peek().is_some_and(|e| e.0.at <= now) {
                        if let Some(Reverse(e)) = q.heap.pop() {
                            due.push(e);
                        }
                    }
                    if !due.is_empty() {
                        break;
                    }
                    q = match q.heap.peek() {
                        Some(e) => {
                            let d = e.0.at.saturating_duration_since(now);
                            self.cv
                                .wait_timeout(q, d)
                                .unwrap_or_else(|e| e.into_inner())
                                .0
                        }
                        None => self.cv.wait(q).unwrap_or_else(|e| e.into_inner()),
                    };
                }
            }
            for e in due.drain(..) {
                if let Some(qp) = e.qp.upgrade() {
                    on_timer(&qp, e.token);
                }
            }
        }
    }
}

impl Fabric {
    /// A new, empty fabric with its timer thread.
    pub fn new() -> Arc<Fabric> {
        let timer = Arc::new(Timer::default());
        let t = timer.clone();
        let handle = thread::Builder::new()
            .name("rdma-fabric-timer".into())
            .spawn(move || t.run())
            .expect("spawn the fabric timer thread");
        let id = handle.thread().id();
        Arc::new(Fabric {
            gids: RwLock::new(HashMap::new()),
            next_backend: AtomicU64::new(1),
            timer,
            thread: Mutex::new(Some((handle, id))),
            epoch: Instant::now(),
        })
    }

    pub(crate) fn new_backend_id(&self) -> u64 {
        self.next_backend.fetch_add(1, Ordering::Relaxed)
    }

    /// The backend that owns `gid`.
    pub(crate) fn lookup(&self, gid: &Gid) -> Option<Arc<EmulatedBackend>> {
        read(&self.gids).get(gid).and_then(|(_, w)| w.upgrade())
    }

    /// Registers `gid` for backend `id`; `false` if a live backend already owns it.
    pub(crate) fn register(&self, gid: Gid, id: u64, be: Weak<EmulatedBackend>) -> bool {
        let mut m = write(&self.gids);
        if let Some((owner, w)) = m.get(&gid) {
            if *owner != id && w.strong_count() > 0 {
                return false;
            }
        }
        m.insert(gid, (id, be));
        true
    }

    /// Removes `gid` if backend `id` owns it.
    pub(crate) fn unregister(&self, gid: &Gid, id: u64) {
        let mut m = write(&self.gids);
        if m.get(gid).is_some_and(|(owner, _)| *owner == id) {
            m.remove(gid);
        }
    }

    /// The deadline of a timer that only backs up another wake-up (an RNR wait with infinite
    /// retries, which a posted receive ends at once): at least `after` and [`BACKSTOP`] from
    /// now, rounded up to the [`BACKSTOP`] grid, so that such timers share the timer thread's
    /// wake-ups instead of costing one each.
    pub(crate) fn backstop(&self, after: Duration) -> Instant {
        let at = Instant::now() + after.max(BACKSTOP);
        let grid = BACKSTOP.as_nanos();
        let since = at.saturating_duration_since(self.epoch).as_nanos();
        let up = since.div_ceil(grid).saturating_mul(grid);
        let add = u64::try_from(up - since).unwrap_or(0);
        at + Duration::from_nanos(add)
    }

    /// Calls [`on_timer`]`(qp, token)` from the timer thread at `at`.
    pub(crate) fn schedule(&self, at: Instant, qp: Weak<Qp>, token: u64) {
        let mut q = lock(&self.timer.q);
        q.seq += 1;
        let seq = q.seq;
        let first = q.heap.peek().is_none_or(|e| at < e.0.at);
        q.heap.push(Reverse(Entry { at, seq, token, qp }));
        drop(q);
        if first {
            self.timer.cv.notify_one();
        }
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        lock(&self.timer.q).stop = true;
        self.timer.cv.notify_all();
        if let Some((h, id)) = lock(&self.thread).take() {
            // The timer thread itself may drop the last reference (through a QP's backend).
            if thread::current().id() != id {
                let _ = h.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{Fabric, BACKSTOP};

    #[test]
    fn backstop_deadlines_fall_on_a_shared_grid() {
        let f = Fabric::new();
        let grid = BACKSTOP.as_nanos();
        let on_grid = |at: Instant| at.duration_since(f.epoch).as_nanos() % grid == 0;
        for after in [
            Duration::ZERO,
            Duration::from_micros(10),
            Duration::from_millis(5),
        ] {
            let before = Instant::now();
            let at = f.backstop(after);
            assert!(on_grid(at), "{after:?}");
            assert!(at >= before + after.max(BACKSTOP), "{after:?}");
            assert!(
                at <= Instant::now() + after.max(BACKSTOP) + BACKSTOP,
                "{after:?}"
            );
        }
        // Short waits begun close together share one deadline (one wake-up of the timer).
        let t = Instant::now();
        let mut deadlines: Vec<Instant> = (0..100)
            .map(|_| f.backstop(Duration::from_micros(10)))
            .collect();
        let ms = t.elapsed().as_millis() as usize;
        deadlines.dedup();
        assert!(
            deadlines.len() <= ms + 2,
            "{} deadlines in {ms} ms",
            deadlines.len()
        );
    }
}
