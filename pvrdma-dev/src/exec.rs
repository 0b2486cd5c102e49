//! The one place the device meets task-core: run work on the pool, finish on the main loop.

use std::rc::Rc;

use task_core::{MainLoop, Pool, Task, TaskError};

/// Runs device work as task-core tasks.
pub(crate) struct Exec {
    main_loop: Rc<MainLoop>,
    pool: Pool,
    /// Runs quick work on the loop's own thread (still as tasks: completions come later).
    inline: Pool,
}

impl std::fmt::Debug for Exec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exec").finish_non_exhaustive()
    }
}

impl Exec {
    pub(crate) fn new(main_loop: Rc<MainLoop>, pool: Pool) -> Self {
        Exec {
            main_loop,
            pool,
            inline: Pool::inline("inline"),
        }
    }

    /// Runs `work` on a worker; `done` runs on the main loop with its value, or with the panic
    /// message if the worker panicked. With `inline` the work runs now, on this (the loop's)
    /// thread, through an inline pool, and `done` still runs on a later dispatch: for work that
    /// is known to be short and never to block.
    pub(crate) fn run_on<S, R>(
        &self,
        inline: bool,
        source: std::sync::Arc<S>,
        work: impl FnOnce(&S) -> R + Send + 'static,
        done: impl FnOnce(Result<R, String>) + 'static,
    ) where
        S: Send + Sync + 'static,
        R: Send + 'static,
    {
        let task: Task<S, R, TaskError> = Task::new(
            source,
            move |t: &mut task_core::TaskOutcome<S, R, TaskError>| {
                let r = match t.propagate_error() {
                    Ok(()) => t
                        .take_result()
                        .ok_or_else(|| "task produced no result".to_string()),
                    Err(e) => Err(e.to_string()),
                };
                done(r);
            },
        );
        let pool = if inline { &self.inline } else { &self.pool };
        task.run_in_thread(&self.main_loop, pool, move |w| {
            let r = work(&**w.source());
            w.set_result(r);
        });
    }
}
