//! The main loop: one thread that owns device state and runs every completion, timer, idle
//! callback and channel callback.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, Sender, TryRecvError};

use crate::task::TaskId;

/// A callback sent to the loop from any thread.
type Invoke = Box<dyn FnOnce(&MainLoop) + Send>;
/// The main-thread half of a task started with `run_in_thread`: takes the worker's outcome.
pub(crate) type Completion = Box<dyn FnOnce(Box<dyn Any + Send>)>;

/// What other threads send to the loop.
pub(crate) enum Msg {
    /// Run a closure on the loop thread.
    Invoke(Invoke),
    /// A worker finished task `TaskId`; the payload is its typed outcome.
    Done(TaskId, Box<dyn Any + Send>),
    /// Nothing to run: only wakes the loop (used by `stop`).
    Wake,
}

/// State shared between the loop and its handles.
struct Shared {
    tx: Sender<Msg>,
    stop: AtomicBool,
}

/// A `Send + Clone` handle to a [`MainLoop`], for other threads.
#[derive(Clone)]
pub struct LoopHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for LoopHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoopHandle").finish_non_exhaustive()
    }
}

impl LoopHandle {
    /// Runs `f` on the main loop thread at its next dispatch (like `g_idle_add` for one shot).
    ///
    /// Closures sent from one thread run in the order they were sent. Returns `false` (and drops
    /// `f` on the calling thread) if the loop no longer exists.
    pub fn invoke(&self, f: impl FnOnce() + Send + 'static) -> bool {
        self.invoke_with_loop(move |_| f())
    }

    /// Like [`invoke`](Self::invoke), but `f` gets the loop, so it can start tasks, add timers or
    /// sources: this is how other threads submit tasks whose completions are not `Send`.
    pub fn invoke_with_loop(&self, f: impl FnOnce(&MainLoop) + Send + 'static) -> bool {
        self.shared.tx.send(Msg::Invoke(Box::new(f))).is_ok()
    }

    /// Asks [`MainLoop::run`] to return once the callback it is running (if any) returns.
    ///
    /// A `stop` issued while the loop is not running makes the next `run` return at once.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.shared.tx.send(Msg::Wake);
    }

    pub(crate) fn sender(&self) -> &Sender<Msg> {
        &self.shared.tx
    }
}

/// Identifies a channel source added with [`MainLoop::add_receiver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceId(u64);

/// Identifies a timer added with [`MainLoop::timeout_add`] or [`MainLoop::timeout_add_once`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TimerId(u64);

/// A type-erased channel source.
trait ErasedSource {
    /// Adds the receiver to a select set.
    fn register<'a>(&'a self, sel: &mut Select<'a>);
    /// Messages queued now.
    fn pending(&self) -> usize;
    /// Delivers at most one message.
    fn poll_one(&mut self) -> Poll;
    /// The sender side disconnected: run the close callback, if any.
    fn close(self: Box<Self>);
}

enum Poll {
    Delivered,
    Empty,
    Disconnected,
}

struct RecvSource<T, F, C> {
    rx: Receiver<T>,
    cb: F,
    on_close: Option<C>,
}

impl<T, F: FnMut(T), C: FnOnce()> ErasedSource for RecvSource<T, F, C> {
    fn register<'a>(&'a self, sel: &mut Select<'a>) {
        sel.recv(&self.rx);
    }

    fn pending(&self) -> usize {
        self.rx.len()
    }

    fn poll_one(&mut self) -> Poll {
        match self.rx.try_recv() {
            Ok(v) => {
                (self.cb)(v);
                Poll::Delivered
            }
            Err(TryRecvError::Empty) => Poll::Empty,
            Err(TryRecvError::Disconnected) => Poll::Disconnected,
        }
    }

    fn close(self: Box<Self>) {
        if let Some(c) = self.on_close {
            c();
        }
    }
}

/// Sources; a slot is `None` while its source is being dispatched (taken out so that its callback
/// may use the loop).
#[derive(Default)]
struct Sources {
    next: u64,
    map: BTreeMap<u64, Option<Box<dyn ErasedSource>>>,
}

struct TimerEntry {
    interval: Duration,
    /// `None` while the callback runs.
    cb: Option<Box<dyn FnMut() -> bool>>,
}

#[derive(Default)]
struct Timers {
    next: u64,
    /// Deadlines; entries of cancelled timers stay until they are popped.
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    entries: HashMap<u64, TimerEntry>,
}

impl Timers {
    fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((d, _))| *d)
    }
}

/// Completions of tasks whose workers have not reported yet, indexed by [`TaskId`].
#[derive(Default)]
struct Slab {
    entries: Vec<SlabEntry>,
    free: Vec<u32>,
    live: usize,
}

struct SlabEntry {
    generation: u32,
    completion: Option<Completion>,
}

impl Slab {
    fn insert(&mut self, c: Completion) -> TaskId {
        self.live += 1;
        if let Some(index) = self.free.pop() {
            let e = &mut self.entries[index as usize];
            e.completion = Some(c);
            TaskId::new(index, e.generation)
        } else {
            let index = u32::try_from(self.entries.len()).expect("more than 2^32 tasks in flight");
            self.entries.push(SlabEntry {
                generation: 0,
                completion: Some(c),
            });
            TaskId::new(index, 0)
        }
    }

    fn contains(&self, id: TaskId) -> bool {
        self.entries
            .get(id.index() as usize)
            .is_some_and(|e| e.generation == id.generation() && e.completion.is_some())
    }

    fn take(&mut self, id: TaskId) -> Option<Completion> {
        let e = self.entries.get_mut(id.index() as usize)?;
        if e.generation != id.generation() {
            return None;
        }
        let c = e.completion.take()?;
        e.generation = e.generation.wrapping_add(1);
        self.free.push(id.index());
        self.live -= 1;
        Some(c)
    }
}

struct Inner {
    handle: LoopHandle,
    rx: Receiver<Msg>,
    /// Messages pulled off the channel by `wait` that belong to other tasks; dispatched before the
    /// channel so that per-sender order is kept.
    stash: RefCell<VecDeque<Msg>>,
    tasks: RefCell<Slab>,
    timers: RefCell<Timers>,
    sources: RefCell<Sources>,
    /// Depth of nested `dispatch` calls (for the debug representation only).
    depth: Cell<u32>,
    /// How long [`MainLoop::iterate`] polls for work before it blocks ([`MainLoop::set_poll`]).
    poll: Cell<Duration>,
}

/// How often a loop with nothing ready and no [`MainLoop::set_poll`] yields its core, checking
/// its channels and timers, before it parks. Parking goes through crossbeam's `Select`, which
/// spins (~127 `pause` instructions) and yields 4 times first: on a host with fewer cores than
/// busy threads (the loop, a pool's workers, vCPUs) that spin holds a core a thread with work
/// could have had, and the loop of a busy device waits like that every few microseconds. The
/// pool's workers wait the same way (`pool.rs`; docs/benchmarks.md, "Tried, not kept").
const IDLE_YIELDS: u32 = 16;

/// The main loop. It lives on the thread that created it (it is neither `Send` nor `Sync`).
///
/// Cloning gives another reference to the same loop, so that a callback can capture the loop it
/// runs on. A clone captured by a callback that the loop itself stores (a repeating timer, a
/// source) keeps the loop alive until that callback is removed; capture a [`WeakLoop`] there.
#[derive(Clone)]
pub struct MainLoop {
    inner: Rc<Inner>,
}

impl fmt::Debug for MainLoop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MainLoop")
            .field("tasks_in_flight", &self.tasks_in_flight())
            .field("timers", &self.inner.timers.borrow().entries.len())
            .field("sources", &self.inner.sources.borrow().map.len())
            .field("depth", &self.inner.depth.get())
            .finish_non_exhaustive()
    }
}

/// A weak reference to a [`MainLoop`], for callbacks that the loop stores.
#[derive(Clone)]
pub struct WeakLoop {
    inner: Weak<Inner>,
}

impl fmt::Debug for WeakLoop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeakLoop").finish_non_exhaustive()
    }
}

impl WeakLoop {
    /// The loop, if it still exists.
    pub fn upgrade(&self) -> Option<MainLoop> {
        self.inner.upgrade().map(|inner| MainLoop { inner })
    }
}

impl Default for MainLoop {
    fn default() -> Self {
        Self::new()
    }
}

impl MainLoop {
    /// Creates a loop owned by the calling thread.
    pub fn new() -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        let handle = LoopHandle {
            shared: Arc::new(Shared {
                tx,
                stop: AtomicBool::new(false),
            }),
        };
        MainLoop {
            inner: Rc::new(Inner {
                handle,
                rx,
                stash: RefCell::default(),
                tasks: RefCell::default(),
                timers: RefCell::default(),
                sources: RefCell::default(),
                depth: Cell::new(0),
                poll: Cell::new(Duration::ZERO),
            }),
        }
    }

    /// Polling before blocking, like QEMU's AioContext `poll-max-ns`: when nothing is ready,
    /// [`iterate`](Self::iterate) first polls for up to `d`, checking its channels and yielding
    /// the core between checks, and only then parks the thread. Work that arrives within `d` of
    /// the last is picked up without a wake-up (several microseconds on a busy or virtualized
    /// host) at the price of a busy core for at most `d` after each burst. Zero (the default)
    /// only yields its core 16 times, checking, before parking.
    pub fn set_poll(&self, d: Duration) {
        self.inner.poll.set(d);
    }

    /// True if a channel of the loop has something queued or a timer is due.
    fn ready_now(&self, now: Instant) -> bool {
        if !self.inner.rx.is_empty() || !self.inner.stash.borrow().is_empty() {
            return true;
        }
        if self
            .inner
            .timers
            .borrow()
            .next_deadline()
            .is_some_and(|d| d <= now)
        {
            return true;
        }
        self.inner
            .sources
            .borrow()
            .map
            .values()
            .flatten()
            .any(|s| s.pending() > 0)
    }

    /// Polls until something is ready, `poll` has passed or `deadline` is reached (without a
    /// `poll`, [`IDLE_YIELDS`] times); true if something is ready.
    fn poll_for_work(&self, deadline: Option<Instant>) -> bool {
        let poll = self.inner.poll.get();
        if poll.is_zero() {
            for _ in 0..IDLE_YIELDS {
                std::thread::yield_now();
                if self.ready_now(Instant::now()) {
                    return true;
                }
            }
            return false;
        }
        let start = Instant::now();
        let mut until = start.checked_add(poll).unwrap_or(start);
        if let Some(d) = deadline {
            until = until.min(d);
        }
        let mut now = start;
        loop {
            if self.ready_now(now) {
                return true;
            }
            if now >= until {
                return false;
            }
            // Yield rather than spin: on a host with more runnable threads than cores the
            // thread this loop waits for may need this core to make progress.
            std::thread::yield_now();
            now = Instant::now();
        }
    }

    /// A handle for other threads.
    pub fn handle(&self) -> LoopHandle {
        self.inner.handle.clone()
    }

    /// A weak reference to this loop.
    pub fn downgrade(&self) -> WeakLoop {
        WeakLoop {
            inner: Rc::downgrade(&self.inner),
        }
    }

    /// Number of tasks started with `run_in_thread` whose completion has not run yet.
    pub fn tasks_in_flight(&self) -> usize {
        self.inner.tasks.borrow().live
    }

    pub(crate) fn insert_task(&self, c: Completion) -> TaskId {
        self.inner.tasks.borrow_mut().insert(c)
    }

    /// Delivers every message of `rx` to `cb` on the loop thread, in order. When all senders are
    /// gone (and the channel is drained) the source is removed.
    pub fn add_receiver<T: Send + 'static>(
        &self,
        rx: Receiver<T>,
        cb: impl FnMut(T) + 'static,
    ) -> SourceId {
        self.add_source(Box::new(RecvSource {
            rx,
            cb,
            on_close: None::<fn()>,
        }))
    }

    /// Like [`add_receiver`](Self::add_receiver); `on_close` runs on the loop thread once, when the
    /// sender side has disconnected and every message was delivered. It does not run if the source
    /// is removed with [`remove_source`](Self::remove_source).
    pub fn add_receiver_with_close<T: Send + 'static>(
        &self,
        rx: Receiver<T>,
        cb: impl FnMut(T) + 'static,
        on_close: impl FnOnce() + 'static,
    ) -> SourceId {
        self.add_source(Box::new(RecvSource {
            rx,
            cb,
            on_close: Some(on_close),
        }))
    }

    fn add_source(&self, src: Box<dyn ErasedSource>) -> SourceId {
        let mut s = self.inner.sources.borrow_mut();
        let id = s.next;
        s.next += 1;
        s.map.insert(id, Some(src));
        SourceId(id)
    }

    /// Removes a source; messages still queued in its channel are not delivered. Returns whether
    /// it existed. A source may remove itself from its own callback.
    pub fn remove_source(&self, id: SourceId) -> bool {
        let removed = self.inner.sources.borrow_mut().map.remove(&id.0);
        let existed = removed.is_some();
        drop(removed); // outside the borrow: the callback's captures may use the loop
        existed
    }

    /// Calls `cb` every `interval` while it returns `true` (like `g_timeout_add`); the first call is
    /// one `interval` from now, the next one `interval` after the previous call returned.
    pub fn timeout_add(&self, interval: Duration, cb: impl FnMut() -> bool + 'static) -> TimerId {
        let mut t = self.inner.timers.borrow_mut();
        let id = t.next;
        t.next += 1;
        t.entries.insert(
            id,
            TimerEntry {
                interval,
                cb: Some(Box::new(cb)),
            },
        );
        t.heap
            .push(Reverse((deadline_after(Instant::now(), interval), id)));
        TimerId(id)
    }

    /// Calls `cb` once, `delay` from now.
    pub fn timeout_add_once(&self, delay: Duration, cb: impl FnOnce() + 'static) -> TimerId {
        let mut cb = Some(cb);
        self.timeout_add(delay, move || {
            if let Some(cb) = cb.take() {
                cb();
            }
            false
        })
    }

    /// Cancels a timer; returns whether it was still pending. A timer may cancel itself from its
    /// own callback (then it does not repeat).
    pub fn cancel_timer(&self, id: TimerId) -> bool {
        let removed = self.inner.timers.borrow_mut().entries.remove(&id.0);
        let existed = removed.is_some();
        drop(removed);
        existed
    }

    /// Runs everything that is ready now, without blocking: due timers, invoked closures, task
    /// completions, channel messages. Returns the number of callbacks run.
    ///
    /// Work that becomes ready while dispatching (a timer added with a zero delay, a closure
    /// invoked by a callback) may wait for the next call.
    pub fn dispatch(&self) -> usize {
        self.dispatch_inner().0
    }

    /// Returns (callbacks run, whether anything at all was consumed).
    fn dispatch_inner(&self) -> (usize, bool) {
        self.inner.depth.set(self.inner.depth.get() + 1);
        let mut n = self.dispatch_timers(Instant::now());
        let (m, active) = self.dispatch_messages();
        n += m;
        n += self.dispatch_sources();
        self.inner.depth.set(self.inner.depth.get() - 1);
        (n, active || n > 0)
    }

    fn dispatch_timers(&self, now: Instant) -> usize {
        let due: Vec<u64> = {
            let mut t = self.inner.timers.borrow_mut();
            let mut due = Vec::new();
            while let Some(Reverse((d, id))) = t.heap.peek().copied() {
                if d > now {
                    break;
                }
                t.heap.pop();
                if t.entries.contains_key(&id) {
                    due.push(id);
                }
            }
            due
        };
        let mut n = 0;
        for id in due {
            let cb = self
                .inner
                .timers
                .borrow_mut()
                .entries
                .get_mut(&id)
                .and_then(|e| e.cb.take());
            let Some(mut cb) = cb else { continue };
            let keep = cb();
            n += 1;
            let mut t = self.inner.timers.borrow_mut();
            let dropped = if keep {
                match t.entries.get_mut(&id) {
                    Some(e) => {
                        e.cb = Some(cb);
                        let d = deadline_after(Instant::now(), e.interval);
                        t.heap.push(Reverse((d, id)));
                        None
                    }
                    // Cancelled from its own callback.
                    None => Some(cb),
                }
            } else {
                t.entries.remove(&id);
                Some(cb)
            };
            drop(t);
            drop(dropped);
        }
        n
    }

    fn next_msg(&self) -> Option<Msg> {
        let stashed = self.inner.stash.borrow_mut().pop_front();
        stashed.or_else(|| self.inner.rx.try_recv().ok())
    }

    fn dispatch_messages(&self) -> (usize, bool) {
        // Only what is queued now, so that a closure that re-invokes itself cannot starve the rest.
        let budget = self.inner.stash.borrow().len() + self.inner.rx.len();
        let mut n = 0;
        let mut active = false;
        for _ in 0..budget {
            let Some(msg) = self.next_msg() else { break };
            active = true;
            n += self.handle_msg(msg);
        }
        (n, active)
    }

    fn handle_msg(&self, msg: Msg) -> usize {
        match msg {
            Msg::Invoke(f) => {
                f(self);
                1
            }
            Msg::Done(id, out) => self.finish(id, out),
            Msg::Wake => 0,
        }
    }

    /// Runs task `id`'s completion with the worker's outcome, unless it already ran.
    fn finish(&self, id: TaskId, out: Box<dyn Any + Send>) -> usize {
        let c = self.inner.tasks.borrow_mut().take(id);
        match c {
            Some(c) => {
                c(out);
                1
            }
            None => 0,
        }
    }

    fn dispatch_sources(&self) -> usize {
        let ids: Vec<u64> = self.inner.sources.borrow().map.keys().copied().collect();
        let mut n = 0;
        for id in ids {
            let src = self
                .inner
                .sources
                .borrow_mut()
                .map
                .get_mut(&id)
                .and_then(Option::take);
            let Some(mut src) = src else { continue };
            let budget = src.pending().max(1);
            let mut closed = false;
            for _ in 0..budget {
                match src.poll_one() {
                    Poll::Delivered => {
                        n += 1;
                        // Removed by its own callback: deliver nothing more.
                        if !self.inner.sources.borrow().map.contains_key(&id) {
                            break;
                        }
                    }
                    Poll::Empty => break,
                    Poll::Disconnected => {
                        closed = true;
                        break;
                    }
                }
            }
            let mut s = self.inner.sources.borrow_mut();
            if closed {
                s.map.remove(&id);
                drop(s);
                src.close();
                n += 1;
            } else if let Some(slot) = s.map.get_mut(&id) {
                *slot = Some(src);
            } else {
                // Removed by its own callback.
                drop(s);
                drop(src);
            }
        }
        n
    }

    /// Blocks until something may be ready or `deadline` passes.
    fn block(&self, deadline: Option<Instant>) {
        if !self.inner.stash.borrow().is_empty() || self.poll_for_work(deadline) {
            return;
        }
        let timer = self.inner.timers.borrow().next_deadline();
        let deadline = match (deadline, timer) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let sources = self.inner.sources.borrow();
        if sources.map.is_empty() {
            // Fast path: only the loop's own channel. The message is stashed, not lost.
            let msg = match deadline {
                Some(d) => self.inner.rx.recv_deadline(d).ok(),
                None => self.inner.rx.recv().ok(),
            };
            if let Some(msg) = msg {
                self.inner.stash.borrow_mut().push_back(msg);
            }
            return;
        }
        let mut sel = Select::new();
        sel.recv(&self.inner.rx);
        for s in sources.map.values().flatten() {
            s.register(&mut sel);
        }
        match deadline {
            Some(d) => {
                let _ = sel.ready_deadline(d);
            }
            None => {
                sel.ready();
            }
        }
    }

    /// Blocks until something is ready or `timeout` passes (`None`: no timeout), then dispatches.
    /// Returns the number of callbacks run (0 on timeout).
    pub fn iterate(&self, timeout: Option<Duration>) -> usize {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let forever = timeout.is_some() && deadline.is_none();
        loop {
            let (n, active) = self.dispatch_inner();
            if active {
                return n;
            }
            if let Some(d) = deadline {
                if Instant::now() >= d {
                    return 0;
                }
            }
            self.block(if forever { None } else { deadline });
        }
    }

    /// Runs the loop until [`LoopHandle::stop`] is called.
    pub fn run(&self) {
        let stop = &self.inner.handle.shared.stop;
        while !stop.swap(false, Ordering::SeqCst) {
            self.iterate(None);
        }
    }

    /// Blocks until the worker of task `id` has finished, then runs its completion now, on this
    /// thread (like `qio_task_wait_thread`). Nothing else is dispatched meanwhile. The completion
    /// runs once: the loop will not run it again. Waiting on a task whose completion already ran
    /// returns at once.
    pub fn wait(&self, id: TaskId) {
        loop {
            if !self.inner.tasks.borrow().contains(id) {
                return;
            }
            let found = {
                let mut stash = self.inner.stash.borrow_mut();
                let pos = stash
                    .iter()
                    .position(|m| matches!(m, Msg::Done(d, _) if *d == id));
                pos.and_then(|p| stash.remove(p))
            };
            if let Some(Msg::Done(_, out)) = found {
                self.finish(id, out);
                return;
            }
            match self.inner.rx.recv() {
                Ok(Msg::Done(d, out)) if d == id => {
                    self.finish(id, out);
                    return;
                }
                Ok(other) => self.inner.stash.borrow_mut().push_back(other),
                // Cannot happen: the loop holds a sender itself.
                Err(_) => return,
            }
        }
    }
}

fn deadline_after(now: Instant, d: Duration) -> Instant {
    // A huge interval means "practically never".
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 100))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::thread;

    struct DropCount(Arc<AtomicUsize>);
    impl Drop for DropCount {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Iterates until `cond` holds; panics after 10 s so a bug cannot hang the suite.
    fn drive_until(ml: &MainLoop, mut cond: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < end, "condition not reached in 10 s");
            ml.iterate(Some(Duration::from_millis(20)));
        }
    }

    #[test]
    fn invoke_from_other_threads_runs_on_loop_thread_in_order() {
        let ml = MainLoop::new();
        let main_id = thread::current().id();
        let seen = Rc::new(RefCell::new(Vec::new()));
        let (tx, rx) = crossbeam_channel::unbounded();
        let threads: Vec<_> = (0..3)
            .map(|t| {
                let h = ml.handle();
                let tx = tx.clone();
                thread::spawn(move || {
                    for i in 0..500u32 {
                        let tx = tx.clone();
                        assert!(h.invoke(move || {
                            assert_eq!(thread::current().id(), main_id);
                            tx.send((t, i)).unwrap();
                        }));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(tx);
        let s = seen.clone();
        ml.add_receiver(rx, move |v| s.borrow_mut().push(v));
        drive_until(&ml, || seen.borrow().len() == 1500);
        for t in 0..3 {
            let mine: Vec<u32> = seen
                .borrow()
                .iter()
                .filter(|(x, _)| *x == t)
                .map(|p| p.1)
                .collect();
            assert_eq!(mine, (0..500).collect::<Vec<_>>());
        }
    }

    #[test]
    fn invoke_after_loop_is_gone_drops_the_closure() {
        let ml = MainLoop::new();
        let h = ml.handle();
        drop(ml);
        let drops = Arc::new(AtomicUsize::new(0));
        let d = DropCount(drops.clone());
        assert!(!h.invoke(move || drop(d)));
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn one_shot_timer_fires_once_and_is_dropped_once() {
        let ml = MainLoop::new();
        let fired = Rc::new(Cell::new(0));
        let drops = Arc::new(AtomicUsize::new(0));
        let (f, d) = (fired.clone(), DropCount(drops.clone()));
        let id = ml.timeout_add_once(Duration::from_millis(5), move || {
            let _keep = &d;
            f.set(f.get() + 1);
        });
        assert_eq!(ml.dispatch(), 0, "not due yet");
        drive_until(&ml, || fired.get() == 1);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
        assert!(!ml.cancel_timer(id), "a fired one-shot timer is gone");
        ml.iterate(Some(Duration::from_millis(15)));
        assert_eq!(fired.get(), 1);
    }

    #[test]
    fn repeating_timer_repeats_until_false() {
        let ml = MainLoop::new();
        let fired = Rc::new(Cell::new(0));
        let f = fired.clone();
        ml.timeout_add(Duration::from_millis(1), move || {
            f.set(f.get() + 1);
            f.get() < 3
        });
        drive_until(&ml, || fired.get() == 3);
        ml.iterate(Some(Duration::from_millis(10)));
        assert_eq!(fired.get(), 3);
        assert!(ml.inner.timers.borrow().entries.is_empty());
    }

    #[test]
    fn cancelled_timer_never_fires() {
        let ml = MainLoop::new();
        let fired = Rc::new(Cell::new(false));
        let drops = Arc::new(AtomicUsize::new(0));
        let (f, d) = (fired.clone(), DropCount(drops.clone()));
        let id = ml.timeout_add(Duration::from_millis(2), move || {
            let _keep = &d;
            f.set(true);
            true
        });
        assert!(ml.cancel_timer(id));
        assert_eq!(drops.load(Ordering::SeqCst), 1, "cancel drops the callback");
        assert!(!ml.cancel_timer(id));
        assert_eq!(ml.iterate(Some(Duration::from_millis(10))), 0);
        assert!(!fired.get());
    }

    #[test]
    fn polling_loop_picks_up_work_from_every_source_and_keeps_deadlines() {
        let ml = MainLoop::new();
        ml.set_poll(Duration::from_millis(50));
        // Nothing arrives: iterate returns at its own deadline, not after the poll window.
        let t = Instant::now();
        assert_eq!(ml.iterate(Some(Duration::from_millis(5))), 0);
        assert!(t.elapsed() < Duration::from_millis(45), "{:?}", t.elapsed());
        // Work from another thread during the poll window: an invoke, a receiver message, a timer.
        let got = Rc::new(RefCell::new(Vec::new()));
        let (tx, rx) = crossbeam_channel::unbounded::<u32>();
        let g = got.clone();
        ml.add_receiver(rx, move |v| g.borrow_mut().push(v));
        let h = ml.handle();
        let g = got.clone();
        let sender = thread::spawn(move || {
            thread::sleep(Duration::from_millis(2));
            tx.send(1).unwrap();
            thread::sleep(Duration::from_millis(2));
            h.invoke(|| {});
            tx
        });
        drive_until(&ml, || got.borrow().len() == 1);
        let tx = sender.join().unwrap();
        // The invoke.
        ml.iterate(Some(Duration::from_millis(100)));
        ml.timeout_add_once(Duration::from_millis(3), move || g.borrow_mut().push(2));
        drive_until(&ml, || got.borrow().len() == 2);
        assert_eq!(*got.borrow(), vec![1, 2]);
        drop(tx);
        assert_eq!(
            ml.iterate(Some(Duration::from_millis(100))),
            1,
            "the disconnect"
        );
        ml.set_poll(Duration::ZERO);
        assert_eq!(ml.iterate(Some(Duration::from_millis(2))), 0);
    }

    #[test]
    fn repeating_timer_can_cancel_itself() {
        let ml = MainLoop::new();
        let fired = Rc::new(Cell::new(0));
        let id_cell: Rc<Cell<Option<TimerId>>> = Rc::new(Cell::new(None));
        let (f, idc, weak) = (fired.clone(), id_cell.clone(), ml.downgrade());
        let id = ml.timeout_add(Duration::from_millis(1), move || {
            f.set(f.get() + 1);
            let ml = weak.upgrade().unwrap();
            assert!(ml.cancel_timer(idc.get().unwrap()));
            true // ignored: cancelled
        });
        id_cell.set(Some(id));
        drive_until(&ml, || fired.get() == 1);
        ml.iterate(Some(Duration::from_millis(10)));
        assert_eq!(fired.get(), 1);
    }

    #[test]
    fn iterate_times_out_when_idle() {
        let ml = MainLoop::new();
        assert_eq!(ml.iterate(Some(Duration::from_millis(5))), 0);
        assert_eq!(ml.dispatch(), 0);
    }

    #[test]
    fn iterate_wakes_for_a_timer_without_timeout() {
        let ml = MainLoop::new();
        let fired = Rc::new(Cell::new(false));
        let f = fired.clone();
        ml.timeout_add_once(Duration::from_millis(3), move || f.set(true));
        assert_eq!(ml.iterate(None), 1);
        assert!(fired.get());
    }

    #[test]
    fn receiver_delivers_in_order_then_closes_on_disconnect() {
        let ml = MainLoop::new();
        let (tx, rx) = crossbeam_channel::bounded(16);
        let got = Rc::new(RefCell::new(Vec::new()));
        let closed = Rc::new(Cell::new(0));
        let (g, c) = (got.clone(), closed.clone());
        let main_id = thread::current().id();
        let id = ml.add_receiver_with_close(
            rx,
            move |v: u32| {
                assert_eq!(thread::current().id(), main_id);
                g.borrow_mut().push(v)
            },
            move || c.set(c.get() + 1),
        );
        let sender = thread::spawn(move || {
            for i in 0..2000 {
                tx.send(i).unwrap();
            }
        });
        drive_until(&ml, || closed.get() == 1);
        sender.join().unwrap();
        assert_eq!(*got.borrow(), (0..2000).collect::<Vec<_>>());
        assert!(!ml.remove_source(id), "removed on disconnect");
        ml.dispatch();
        assert_eq!(closed.get(), 1);
    }

    #[test]
    fn iterate_blocks_on_a_receiver() {
        let ml = MainLoop::new();
        let (tx, rx) = crossbeam_channel::unbounded();
        let got = Rc::new(Cell::new(0));
        let g = got.clone();
        ml.add_receiver(rx, move |v: u32| g.set(v));
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(10));
            tx.send(7).unwrap();
            thread::sleep(Duration::from_millis(50));
        });
        assert!(ml.iterate(None) >= 1);
        assert_eq!(got.get(), 7);
        t.join().unwrap();
    }

    #[test]
    fn removed_source_gets_no_more_messages_and_no_close() {
        let ml = MainLoop::new();
        let (tx, rx) = crossbeam_channel::unbounded();
        let got = Rc::new(Cell::new(0));
        let closed = Rc::new(Cell::new(false));
        let (g, c) = (got.clone(), closed.clone());
        let weak = ml.downgrade();
        let id_cell: Rc<Cell<Option<SourceId>>> = Rc::new(Cell::new(None));
        let idc = id_cell.clone();
        let id = ml.add_receiver_with_close(
            rx,
            move |_: u8| {
                g.set(g.get() + 1);
                // Remove itself from its own callback.
                assert!(weak.upgrade().unwrap().remove_source(idc.get().unwrap()));
            },
            move || c.set(true),
        );
        id_cell.set(Some(id));
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        ml.dispatch();
        assert_eq!(got.get(), 1, "nothing is delivered after removal");
        let after_first = got.get();
        assert!(
            tx.send(3).is_err(),
            "the receiver was dropped with the source"
        );
        drop(tx);
        ml.dispatch();
        ml.dispatch();
        assert_eq!(got.get(), after_first);
        assert!(!closed.get());
    }

    #[test]
    fn run_returns_after_stop_from_another_thread_and_from_a_callback() {
        let ml = MainLoop::new();
        let h = ml.handle();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(10));
            h.stop();
        });
        ml.run();
        t.join().unwrap();

        let h = ml.handle();
        ml.timeout_add_once(Duration::from_millis(1), move || h.stop());
        ml.run();
    }

    #[test]
    fn callbacks_may_reenter_the_loop() {
        let ml = MainLoop::new();
        let log = Rc::new(RefCell::new(Vec::new()));
        let (l, inner) = (log.clone(), ml.clone());
        ml.timeout_add_once(Duration::ZERO, move || {
            l.borrow_mut().push("first timer");
            let l2 = l.clone();
            inner.timeout_add_once(Duration::ZERO, move || l2.borrow_mut().push("timer"));
            inner.handle().invoke_with_loop(|ml| {
                ml.timeout_add_once(Duration::ZERO, || {});
            });
            let l3 = l.clone();
            let (tx, rx) = crossbeam_channel::unbounded();
            tx.send(()).unwrap();
            inner.add_receiver(rx, move |()| l3.borrow_mut().push("source"));
            // Nested dispatch from inside a callback must not panic.
            inner.dispatch();
        });
        drive_until(&ml, || log.borrow().len() >= 3);
        let mut l = log.borrow().clone();
        l.sort_unstable();
        assert_eq!(l, ["first timer", "source", "timer"]);
    }

    #[test]
    fn slab_reuses_slots_with_a_new_generation() {
        let mut s = Slab::default();
        let a = s.insert(Box::new(|_| {}));
        assert!(s.contains(a));
        assert!(s.take(a).is_some());
        assert!(!s.contains(a));
        let b = s.insert(Box::new(|_| {}));
        assert_eq!(a.index(), b.index());
        assert_ne!(a, b);
        assert!(
            s.take(a).is_none(),
            "a stale id does not take the new entry"
        );
        assert!(s.take(b).is_some());
        assert_eq!(s.live, 0);
    }
}
