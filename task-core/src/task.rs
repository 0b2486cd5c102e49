//! Tasks: an operation on a source object, finished by a completion on the main loop.

use std::any::Any;
use std::cell::RefCell;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use crate::error::{panic_message, TaskError};
use crate::main_loop::{MainLoop, Msg};
use crate::pool::{Job, Pool};

/// Identifies a task started with [`Task::run_in_thread`], for [`MainLoop::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TaskId {
    index: u32,
    generation: u32,
}

impl TaskId {
    pub(crate) fn new(index: u32, generation: u32) -> Self {
        TaskId { index, generation }
    }

    pub(crate) fn index(self) -> u32 {
        self.index
    }

    pub(crate) fn generation(self) -> u32 {
        self.generation
    }
}

type CompletionFn<S, R, E> = Box<dyn FnOnce(&mut TaskOutcome<S, R, E>)>;

/// An operation on a source object (like QEMU's `QIOTask`).
///
/// The task holds an `Arc` to its source until its completion has run. The completion runs exactly
/// once, on the main loop thread, and need not be `Send`. Finish a task either with
/// [`run_in_thread`](Self::run_in_thread) (a worker does the blocking part) or with
/// [`complete`](Self::complete) (finished on the loop thread, e.g. from a timer).
///
/// `R` is the optional typed result, `E` the error type; both are dropped with the task (once),
/// unless the completion takes them.
pub struct Task<S, R = (), E = TaskError> {
    source: Arc<S>,
    completion: CompletionFn<S, R, E>,
    result: Option<R>,
    error: Option<E>,
}

impl<S, R, E> fmt::Debug for Task<S, R, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Task")
            .field("has_result", &self.result.is_some())
            .field("had_error", &self.error.is_some())
            .finish_non_exhaustive()
    }
}

impl<S: 'static, R: 'static, E: 'static> Task<S, R, E> {
    /// Creates a task on `source`; `completion` will run once on the main loop thread.
    pub fn new(
        source: Arc<S>,
        completion: impl FnOnce(&mut TaskOutcome<S, R, E>) + 'static,
    ) -> Self {
        Task {
            source,
            completion: Box::new(completion),
            result: None,
            error: None,
        }
    }

    /// The source object.
    pub fn source(&self) -> &Arc<S> {
        &self.source
    }

    /// Records an error; the first error wins and later ones are dropped.
    pub fn set_error(&mut self, e: E) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }

    /// Records the result, dropping any previous one.
    pub fn set_result(&mut self, r: R) {
        self.result = Some(r);
    }

    /// Runs the completion now, on this (the loop's) thread, like `qio_task_complete`.
    pub fn complete(self, _main_loop: &MainLoop) {
        let Task {
            source,
            completion,
            result,
            error,
        } = self;
        let mut outcome = TaskOutcome {
            source,
            result,
            error,
        };
        completion(&mut outcome);
    }

    /// Runs `worker` on a thread of `pool`, then the completion on `main_loop`'s thread with what
    /// the worker recorded (like `qio_task_run_in_thread`). Blocks while the pool's queue is full.
    ///
    /// A panic in `worker` becomes the error `E::from(TaskError::Panicked(..))`; a task still
    /// queued when the pool shuts down completes with `E::from(TaskError::Cancelled)` and its
    /// worker is dropped without running. The worker's reference to the source is released before
    /// the completion is scheduled, so the source is dropped on the loop thread.
    pub fn run_in_thread<W>(self, main_loop: &MainLoop, pool: &Pool, worker: W) -> TaskId
    where
        S: Send + Sync,
        R: Send,
        E: Send + From<TaskError>,
        W: FnOnce(&WorkerCtx<S, R, E>) + Send + 'static,
    {
        let Task {
            source,
            completion,
            result,
            error,
        } = self;
        let worker_source = source.clone();
        let id = main_loop.insert_task(Box::new(move |out: Box<dyn Any + Send>| {
            let out = out
                .downcast::<WorkerOutcome<R, E>>()
                .unwrap_or_else(|_| unreachable!("a task's outcome has the task's type"));
            let WorkerOutcome { result, error } = *out;
            let mut outcome = TaskOutcome {
                source,
                result,
                error,
            };
            completion(&mut outcome);
        }));
        let tx = main_loop.handle().sender().clone();
        pool.submit(Job::new(move |cancelled| {
            let ctx = WorkerCtx {
                source: worker_source,
                result: RefCell::new(result),
                error: RefCell::new(error),
            };
            if cancelled {
                drop(worker);
                ctx.set_error(E::from(TaskError::Cancelled));
            } else if let Err(p) = catch_unwind(AssertUnwindSafe(|| worker(&ctx))) {
                ctx.set_error(E::from(TaskError::Panicked(panic_message(&*p))));
            }
            let WorkerCtx {
                source,
                result,
                error,
            } = ctx;
            drop(source);
            let out = WorkerOutcome {
                result: result.into_inner(),
                error: error.into_inner(),
            };
            // If the loop is gone the outcome is dropped here.
            let _ = tx.send(Msg::Done(id, Box::new(out)));
        }));
        id
    }
}

/// What travels back from the worker.
struct WorkerOutcome<R, E> {
    result: Option<R>,
    error: Option<E>,
}

/// What a worker sees: the source, and where to record its error or result.
pub struct WorkerCtx<S, R, E> {
    source: Arc<S>,
    result: RefCell<Option<R>>,
    error: RefCell<Option<E>>,
}

impl<S, R, E> fmt::Debug for WorkerCtx<S, R, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerCtx")
            .field("has_result", &self.result.borrow().is_some())
            .field("had_error", &self.error.borrow().is_some())
            .finish_non_exhaustive()
    }
}

impl<S, R, E> WorkerCtx<S, R, E> {
    /// The task's source object.
    pub fn source(&self) -> &Arc<S> {
        &self.source
    }

    /// Records an error; the first error wins and later ones are dropped.
    pub fn set_error(&self, e: E) {
        let mut slot = self.error.borrow_mut();
        if slot.is_none() {
            *slot = Some(e);
        } else {
            drop(slot);
            drop(e);
        }
    }

    /// Whether an error has been recorded.
    pub fn had_error(&self) -> bool {
        self.error.borrow().is_some()
    }

    /// Records the result; a previous result is dropped.
    pub fn set_result(&self, r: R) {
        let old = self.result.borrow_mut().replace(r);
        drop(old);
    }
}

/// What a completion sees (on the main loop thread): the source, and the error and result.
///
/// Whatever the completion does not take is dropped when it returns.
pub struct TaskOutcome<S, R, E> {
    source: Arc<S>,
    result: Option<R>,
    error: Option<E>,
}

impl<S, R, E> fmt::Debug for TaskOutcome<S, R, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskOutcome")
            .field("has_result", &self.result.is_some())
            .field("had_error", &self.error.is_some())
            .finish_non_exhaustive()
    }
}

impl<S, R, E> TaskOutcome<S, R, E> {
    /// The task's source object.
    pub fn source(&self) -> &Arc<S> {
        &self.source
    }

    /// Takes the error, if any (like `qio_task_propagate_error`: afterwards `had_error` is false).
    pub fn propagate_error(&mut self) -> Result<(), E> {
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Whether an error is held (not yet taken by [`propagate_error`](Self::propagate_error)).
    pub fn had_error(&self) -> bool {
        self.error.is_some()
    }

    /// Takes the result, if any.
    pub fn take_result(&mut self) -> Option<R> {
        self.result.take()
    }

    /// The result, if any, without taking it.
    pub fn result(&self) -> Option<&R> {
        self.result.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::thread::{self, ThreadId};
    use std::time::{Duration, Instant};

    /// Counts drops, and remembers the thread of the last drop.
    #[derive(Default)]
    struct Counter {
        drops: AtomicUsize,
        thread: Mutex<Option<ThreadId>>,
    }

    struct Tracked(Arc<Counter>, u32);
    impl Drop for Tracked {
        fn drop(&mut self) {
            self.0.drops.fetch_add(1, Ordering::SeqCst);
            *self.0.thread.lock().unwrap() = Some(thread::current().id());
        }
    }

    /// An error type of the user's own, with drop counting.
    #[derive(Debug)]
    enum MyError {
        Worker(Tracked),
        Engine(TaskError),
    }
    impl std::fmt::Debug for Tracked {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Tracked({})", self.1)
        }
    }
    impl From<TaskError> for MyError {
        fn from(e: TaskError) -> Self {
            MyError::Engine(e)
        }
    }

    fn drive_until(ml: &MainLoop, mut cond: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < end, "condition not reached in 10 s");
            ml.iterate(Some(Duration::from_millis(20)));
        }
    }

    #[test]
    fn completion_on_loop_thread_worker_on_named_pool_thread() {
        let ml = MainLoop::new();
        let pool = Pool::new("tcw", 2, 8).unwrap();
        let main_id = thread::current().id();
        let runs = Rc::new(Cell::new(0));
        let r = runs.clone();
        let task: Task<u32, String> = Task::new(Arc::new(5), move |t| {
            assert_eq!(thread::current().id(), main_id);
            assert_eq!(**t.source(), 5);
            assert!(!t.had_error());
            let name = t.take_result().unwrap();
            assert!(name == "tcw-0" || name == "tcw-1", "{name}");
            r.set(r.get() + 1);
        });
        task.run_in_thread(&ml, &pool, move |w| {
            assert_ne!(thread::current().id(), main_id);
            assert_eq!(**w.source(), 5);
            w.set_result(thread::current().name().unwrap().to_owned());
        });
        assert_eq!(ml.tasks_in_flight(), 1);
        drive_until(&ml, || runs.get() == 1);
        assert_eq!(ml.tasks_in_flight(), 0);
        for _ in 0..3 {
            ml.iterate(Some(Duration::from_millis(5)));
        }
        assert_eq!(runs.get(), 1);
    }

    #[test]
    fn source_lives_until_completion_and_is_dropped_once_on_loop_thread() {
        let ml = MainLoop::new();
        let pool = Pool::new("tcs", 1, 8).unwrap();
        let counter = Arc::new(Counter::default());
        let source = Arc::new(Tracked(counter.clone(), 0));
        let done = Rc::new(Cell::new(false));
        let d = done.clone();
        let c2 = counter.clone();
        let task: Task<Tracked> = Task::new(source, move |t| {
            assert_eq!(
                c2.drops.load(Ordering::SeqCst),
                0,
                "source alive in completion"
            );
            assert_eq!(t.source().1, 0);
            d.set(true);
        });
        let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(0);
        task.run_in_thread(&ml, &pool, move |_| go_rx.recv().unwrap());
        // The caller's reference is gone; the task keeps the source.
        assert_eq!(counter.drops.load(Ordering::SeqCst), 0);
        go_tx.send(()).unwrap();
        drive_until(&ml, || done.get());
        assert_eq!(counter.drops.load(Ordering::SeqCst), 1);
        assert_eq!(
            *counter.thread.lock().unwrap(),
            Some(thread::current().id())
        );
    }

    #[test]
    fn first_error_wins_and_later_errors_are_dropped() {
        let ml = MainLoop::new();
        let pool = Pool::new("tce", 1, 8).unwrap();
        let errs = Arc::new(Counter::default());
        let got = Rc::new(Cell::new(None));
        let g = got.clone();
        let task: Task<(), (), MyError> = Task::new(Arc::new(()), move |t| {
            assert!(t.had_error());
            match t.propagate_error() {
                Err(MyError::Worker(tr)) => g.set(Some(tr.1)),
                other => panic!("unexpected {other:?}"),
            }
            assert!(!t.had_error());
            assert!(t.propagate_error().is_ok());
        });
        let e2 = errs.clone();
        task.run_in_thread(&ml, &pool, move |w| {
            assert!(!w.had_error());
            w.set_error(MyError::Worker(Tracked(e2.clone(), 1)));
            w.set_error(MyError::Worker(Tracked(e2.clone(), 2)));
            assert_eq!(
                e2.drops.load(Ordering::SeqCst),
                1,
                "the second error is dropped at once"
            );
            assert!(w.had_error());
            // A panic after an error keeps the first error.
            panic!("after the error");
        });
        drive_until(&ml, || got.get().is_some());
        assert_eq!(got.get(), Some(1));
        assert_eq!(errs.drops.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn result_is_dropped_exactly_once_taken_or_not() {
        let ml = MainLoop::new();
        let pool = Pool::new("tcr", 2, 8).unwrap();
        let results = Arc::new(Counter::default());
        let done = Rc::new(Cell::new(0));
        for take in [true, false] {
            let d = done.clone();
            let c = results.clone();
            let task = Task::<(), Tracked>::new(Arc::new(()), move |t| {
                if take {
                    let r = t.take_result().unwrap();
                    assert_eq!(r.1, 2);
                    assert!(t.take_result().is_none());
                    drop(r);
                } else {
                    assert_eq!(t.result().unwrap().1, 2);
                }
                d.set(d.get() + 1);
                let _ = &c;
            });
            let c = results.clone();
            task.run_in_thread(&ml, &pool, move |w| {
                w.set_result(Tracked(c.clone(), 1));
                w.set_result(Tracked(c.clone(), 2)); // replaces (and drops) the first
            });
        }
        drive_until(&ml, || done.get() == 2);
        // Two tasks, two results each: four drops, no more, no less.
        assert_eq!(results.drops.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn worker_panic_becomes_a_task_error() {
        let ml = MainLoop::new();
        let pool = Pool::new("tcp", 1, 8).unwrap();
        let got = Rc::new(RefCell::new(None));
        let g = got.clone();
        let task: Task<(), u8> = Task::new(Arc::new(()), move |t| {
            assert!(t.take_result().is_none());
            *g.borrow_mut() = Some(t.propagate_error());
        });
        task.run_in_thread(&ml, &pool, |_| panic!("boom {}", 7));
        drive_until(&ml, || got.borrow().is_some());
        assert_eq!(
            got.borrow_mut().take().unwrap(),
            Err(TaskError::Panicked("boom 7".into()))
        );
    }

    #[test]
    fn inline_pool_runs_the_worker_at_once_and_the_completion_on_dispatch() {
        let ml = MainLoop::new();
        let pool = Pool::inline("tci");
        assert!(pool.is_inline() && pool.threads() == 0);
        let main_id = thread::current().id();
        let worker_ran = Arc::new(AtomicUsize::new(0));
        let done = Rc::new(RefCell::new(Vec::new()));
        for (i, fail) in [(1u32, false), (2, true)] {
            let d = done.clone();
            let w = worker_ran.clone();
            let task: Task<u32, u32> = Task::new(Arc::new(i), move |t| {
                assert_eq!(thread::current().id(), main_id);
                d.borrow_mut()
                    .push((**t.source(), t.propagate_error(), t.take_result()));
            });
            task.run_in_thread(&ml, &pool, move |c| {
                assert_eq!(thread::current().id(), main_id);
                w.fetch_add(1, Ordering::SeqCst);
                if fail {
                    panic!("inline {}", **c.source());
                }
                c.set_result(**c.source() * 10);
            });
        }
        // Both workers ran inside run_in_thread; no completion has run yet.
        assert_eq!(worker_ran.load(Ordering::SeqCst), 2);
        assert!(done.borrow().is_empty());
        assert_eq!(ml.dispatch(), 2);
        assert_eq!(
            *done.borrow(),
            vec![
                (1, Ok(()), Some(10)),
                (2, Err(TaskError::Panicked("inline 2".into())), None)
            ]
        );
        // After shutdown an inline pool cancels instead of running.
        let d = done.clone();
        let task: Task<u32, u32> = Task::new(Arc::new(3), move |t| {
            d.borrow_mut()
                .push((3, t.propagate_error(), t.take_result()));
        });
        let flag = pool.shutting_down.clone();
        flag.store(true, Ordering::SeqCst);
        task.run_in_thread(&ml, &pool, |_| {
            unreachable!("a cancelled worker never runs")
        });
        ml.dispatch();
        assert_eq!(done.borrow()[2], (3, Err(TaskError::Cancelled), None));
        assert!(!pool.execute(|| unreachable!()));
    }

    #[test]
    fn wait_runs_the_completion_synchronously_and_never_twice() {
        let ml = MainLoop::new();
        let pool = Pool::new("tcwait", 2, 8).unwrap();
        let runs = Rc::new(Cell::new(0));
        let order = Rc::new(RefCell::new(Vec::new()));

        // Another task, and an invoke, that arrive while we wait: not run by wait, run later.
        let o = order.clone();
        let other: Task<()> = Task::new(Arc::new(()), move |_| o.borrow_mut().push("other"));
        other.run_in_thread(&ml, &pool, |_| {});
        let o = order.clone();
        let (tx, rx) = crossbeam_channel::unbounded::<&'static str>();
        ml.add_receiver(rx, move |s| o.borrow_mut().push(s));
        let h = ml.handle();
        let tx2 = tx.clone();
        h.invoke(move || tx2.send("invoked").unwrap());

        let r = runs.clone();
        let o = order.clone();
        let task: Task<(), u32> = Task::new(Arc::new(()), move |t| {
            assert_eq!(t.take_result(), Some(9));
            r.set(r.get() + 1);
            o.borrow_mut().push("waited");
        });
        let id = task.run_in_thread(&ml, &pool, |w| {
            thread::sleep(Duration::from_millis(30));
            w.set_result(9);
        });
        thread::sleep(Duration::from_millis(5)); // let the other task finish first
        ml.wait(id);
        assert_eq!(runs.get(), 1, "completion ran inside wait");
        assert_eq!(*order.borrow(), ["waited"], "nothing else ran inside wait");
        ml.wait(id); // no-op
        for _ in 0..5 {
            ml.dispatch();
        }
        drive_until(&ml, || order.borrow().len() == 3);
        assert_eq!(runs.get(), 1);
        let mut rest = order.borrow()[1..].to_vec();
        rest.sort_unstable();
        assert_eq!(rest, ["invoked", "other"]);
        ml.wait(id);
        assert_eq!(runs.get(), 1);
    }

    #[test]
    fn wait_on_a_completion_already_dispatched_is_a_no_op() {
        let ml = MainLoop::new();
        let pool = Pool::new("tcw2", 1, 8).unwrap();
        let runs = Rc::new(Cell::new(0));
        let r = runs.clone();
        let id = Task::<()>::new(Arc::new(()), move |_| r.set(r.get() + 1)).run_in_thread(
            &ml,
            &pool,
            |_| {},
        );
        drive_until(&ml, || runs.get() == 1);
        ml.wait(id);
        assert_eq!(runs.get(), 1);
    }

    #[test]
    fn complete_from_a_timer_runs_the_completion_once() {
        let ml = MainLoop::new();
        let runs = Rc::new(Cell::new(0));
        let r = runs.clone();
        let mut task: Task<&'static str, u8, TaskError> = Task::new(Arc::new("obj"), move |t| {
            assert_eq!(**t.source(), "obj");
            assert_eq!(t.take_result(), Some(3));
            assert!(t.propagate_error().is_ok());
            r.set(r.get() + 1);
        });
        task.set_result(3);
        let m = ml.clone();
        ml.timeout_add_once(Duration::from_millis(2), move || task.complete(&m));
        drive_until(&ml, || runs.get() == 1);
        ml.iterate(Some(Duration::from_millis(5)));
        assert_eq!(runs.get(), 1);
    }

    #[test]
    fn error_set_before_run_in_thread_wins() {
        let ml = MainLoop::new();
        let pool = Pool::new("tcpre", 1, 8).unwrap();
        let got = Rc::new(RefCell::new(None));
        let g = got.clone();
        let mut task: Task<()> = Task::new(Arc::new(()), move |t| {
            *g.borrow_mut() = Some(t.propagate_error())
        });
        task.set_error(TaskError::Cancelled);
        task.set_error(TaskError::Panicked("later".into()));
        task.run_in_thread(&ml, &pool, |w| {
            w.set_error(TaskError::Panicked("worker".into()))
        });
        drive_until(&ml, || got.borrow().is_some());
        assert_eq!(got.borrow_mut().take().unwrap(), Err(TaskError::Cancelled));
    }

    #[test]
    fn completion_can_start_another_task_and_a_timer() {
        let ml = MainLoop::new();
        let pool = Rc::new(Pool::new("tcre", 1, 8).unwrap());
        let log = Rc::new(RefCell::new(Vec::new()));
        let (l, m, p) = (log.clone(), ml.clone(), pool.clone());
        let first: Task<()> = Task::new(Arc::new(()), move |_| {
            l.borrow_mut().push("first");
            let l2 = l.clone();
            let second: Task<()> = Task::new(Arc::new(()), move |_| l2.borrow_mut().push("second"));
            let id = second.run_in_thread(&m, &p, |_| {});
            let l3 = l.clone();
            m.timeout_add_once(Duration::from_millis(1), move || {
                l3.borrow_mut().push("timer")
            });
            m.handle().invoke_with_loop(|ml| {
                let _ = ml.tasks_in_flight();
            });
            // Even waiting from inside a completion is fine.
            m.wait(id);
        });
        first.run_in_thread(&ml, &pool, |_| {});
        drive_until(&ml, || log.borrow().len() == 3);
        assert_eq!(*log.borrow(), ["first", "second", "timer"]);
    }

    #[test]
    fn queued_tasks_are_cancelled_on_shutdown_and_running_ones_finish() {
        let ml = MainLoop::new();
        let pool = Pool::new("tcshut", 1, 16).unwrap();
        let captured = Arc::new(Counter::default());
        let worker_runs = Arc::new(AtomicUsize::new(0));
        let outcomes = Rc::new(RefCell::new(Vec::new()));
        let (started_tx, started_rx) = crossbeam_channel::bounded::<()>(1);
        let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
        for i in 0..6u32 {
            let o = outcomes.clone();
            let task: Task<(), u32, MyError> = Task::new(Arc::new(()), move |t| {
                let e = t.propagate_error();
                let e = e.map_err(|e| match e {
                    MyError::Engine(inner) => inner,
                    MyError::Worker(_) => panic!("no worker error expected"),
                });
                o.borrow_mut().push((i, t.take_result(), e));
            });
            let (cap, runs) = (Tracked(captured.clone(), i), worker_runs.clone());
            let (started_tx, go_rx) = (started_tx.clone(), go_rx.clone());
            task.run_in_thread(&ml, &pool, move |w| {
                let _keep = &cap;
                runs.fetch_add(1, Ordering::SeqCst);
                if i == 0 {
                    started_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                }
                w.set_result(i);
            });
        }
        started_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        // Shut down on another thread while task 0 runs and 1..5 are queued.
        let (joined_tx, joined_rx) = crossbeam_channel::bounded(1);
        let flag = pool.shutting_down.clone();
        let t = thread::spawn(move || {
            pool.shutdown();
            joined_tx.send(()).unwrap();
        });
        while !flag.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(1));
        }
        go_tx.send(()).unwrap();
        joined_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("shutdown hung");
        t.join().unwrap();
        drive_until(&ml, || outcomes.borrow().len() == 6);
        assert_eq!(
            worker_runs.load(Ordering::SeqCst),
            1,
            "queued workers never ran"
        );
        assert_eq!(
            captured.drops.load(Ordering::SeqCst),
            6,
            "each worker dropped exactly once"
        );
        let mut o = outcomes.borrow().clone();
        o.sort_by_key(|x| x.0);
        assert_eq!(o[0], (0, Some(0), Ok(())));
        for (i, x) in o.iter().enumerate().skip(1) {
            assert_eq!(*x, (i as u32, None, Err(TaskError::Cancelled)));
        }
        assert_eq!(ml.tasks_in_flight(), 0);
    }

    #[test]
    fn dropping_the_loop_with_tasks_in_flight_drops_everything_once() {
        let ml = MainLoop::new();
        let pool = Pool::new("tcdrop", 1, 8).unwrap();
        let counter = Arc::new(Counter::default());
        let runs = Rc::new(Cell::new(0));
        let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(0);
        let (started_tx, started_rx) = crossbeam_channel::bounded::<()>(1);
        for i in 0..3 {
            let r = runs.clone();
            let c = counter.clone();
            let task: Task<Tracked, Tracked> =
                Task::new(Arc::new(Tracked(counter.clone(), i)), move |_| {
                    r.set(r.get() + 1)
                });
            let (go_rx, started_tx) = (go_rx.clone(), started_tx.clone());
            task.run_in_thread(&ml, &pool, move |w| {
                if i == 0 {
                    started_tx.send(()).unwrap();
                    let _ = go_rx.recv();
                    w.set_result(Tracked(c.clone(), 10));
                }
            });
        }
        started_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        drop(ml);
        drop(go_tx);
        pool.shutdown();
        assert_eq!(runs.get(), 0);
        // 3 sources + the result of the one worker that ran (the 2 queued were cancelled).
        assert_eq!(counter.drops.load(Ordering::SeqCst), 4);
    }
}
