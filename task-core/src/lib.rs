//! Task engine with QEMU QIOTask semantics.
#![warn(missing_docs)]

mod error;
mod main_loop;
mod pool;
mod task;

pub use error::TaskError;
pub use main_loop::{LoopHandle, MainLoop, SourceId, TimerId, WeakLoop};
pub use pool::Pool;
pub use task::{Task, TaskId, TaskOutcome, WorkerCtx};
