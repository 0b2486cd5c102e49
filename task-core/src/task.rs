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
