//! Task engine with QEMU `QIOTask` semantics (`include/io/task.h`), without an async runtime.
//!
//! - [`MainLoop`] lives on one thread (it is not `Send`) and runs every callback: task
//!   completions, timers ([`MainLoop::timeout_add`]), closures sent from other threads
//!   ([`LoopHandle::invoke`]) and channel sources ([`MainLoop::add_receiver`]).
//! - [`Pool`] is a fixed-size, named worker pool with a bounded queue.
//! - [`Task`] holds an `Arc` to its source object until its completion has run. The completion
//!   runs exactly once, on the loop thread, and need not be `Send`. The blocking part runs on a
//!   pool thread with [`Task::run_in_thread`], or the task is finished on the loop thread with
//!   [`Task::complete`]. The first error set wins; a typed result is dropped with the task; a
//!   worker panic becomes an error; [`MainLoop::wait`] runs one completion synchronously.
//!
//! # Threads
//!
//! | what | runs on |
//! | --- | --- |
//! | completion, timer, `invoke` closure, source callback | the loop thread, from `dispatch`/`iterate`/`run`/`wait` |
//! | `run_in_thread` worker | a pool thread named `{pool name}-{i}` |
//! | drop of the source and of an untaken result or error | the loop thread, after the completion (or wherever the loop is dropped) |
//!
//! # Example: a timer completes a task
//!
//! Like the first example of `task.h`: an operation on an object finishes some time later, from
//! a timer on the main loop; the caller's completion gets the object back.
//!
//! ```
//! use std::cell::Cell;
//! use std::rc::Rc;
//! use std::sync::Arc;
//! use std::time::Duration;
//! use task_core::{MainLoop, Task, TaskError};
//!
//! struct MyObject {
//!     name: &'static str,
//! }
//!
//! /// Starts the operation; `done` runs when it has finished.
//! fn my_object_operation(
//!     ml: &MainLoop,
//!     obj: Arc<MyObject>,
//!     done: impl FnOnce(&MyObject, Result<(), TaskError>) + 'static,
//! ) {
//!     let task: Task<MyObject> = Task::new(obj, move |t| {
//!         let res = t.propagate_error();
//!         done(t.source(), res);
//!     });
//!     let m = ml.clone();
//!     ml.timeout_add_once(Duration::from_millis(10), move || task.complete(&m));
//! }
//!
//! let ml = MainLoop::new();
//! let finished = Rc::new(Cell::new(false));
//! let f = finished.clone();
//! my_object_operation(&ml, Arc::new(MyObject { name: "obj0" }), move |obj, res| {
//!     assert_eq!(obj.name, "obj0");
//!     assert!(res.is_ok());
//!     f.set(true);
//! });
//! while !finished.get() {
//!     ml.iterate(None);
//! }
//! ```
//!
//! # Example: a blocking lookup on a worker, reported on the main loop
//!
//! Like the second example of `task.h` (`getaddrinfo` in a thread): the worker does the blocking
//! call and records a typed result or an error; the completion runs on the loop thread.
//!
//! ```
//! use std::net::{SocketAddr, ToSocketAddrs};
//! use std::sync::Arc;
//! use task_core::{MainLoop, Pool, Task, TaskError};
//!
//! #[derive(Debug)]
//! enum ListenError {
//!     Lookup(std::io::Error),
//!     Engine(TaskError),
//! }
//! impl From<TaskError> for ListenError {
//!     fn from(e: TaskError) -> Self {
//!         ListenError::Engine(e)
//!     }
//! }
//!
//! struct Listener {
//!     host: String,
//!     port: u16,
//! }
//!
//! let ml = MainLoop::new();
//! let pool = Pool::new("lookup", 1, 16).unwrap();
//! let main_thread = std::thread::current().id();
//! let listener = Arc::new(Listener { host: "127.0.0.1".into(), port: 4420 });
//!
//! let task = Task::<Listener, Vec<SocketAddr>, ListenError>::new(listener, move |t| {
//!     assert_eq!(std::thread::current().id(), main_thread);
//!     match t.propagate_error() {
//!         Ok(()) => {
//!             let addrs = t.take_result().unwrap();
//!             assert_eq!(addrs[0].port(), t.source().port);
//!         }
//!         Err(e) => panic!("lookup failed: {e:?}"),
//!     }
//! });
//! let id = task.run_in_thread(&ml, &pool, |w| {
//!     let l = w.source();
//!     match (l.host.as_str(), l.port).to_socket_addrs() {
//!         Ok(addrs) => w.set_result(addrs.collect()),
//!         Err(e) => w.set_error(ListenError::Lookup(e)),
//!     }
//! });
//! // Block until that worker is done and run its completion now (qio_task_wait_thread).
//! ml.wait(id);
//! assert_eq!(ml.tasks_in_flight(), 0);
//! ```
#![warn(missing_docs)]
#![deny(unsafe_code)]

mod error;
mod main_loop;
mod pool;
mod task;

pub use error::TaskError;
pub use main_loop::{LoopHandle, MainLoop, SourceId, TimerId, WeakLoop};
pub use pool::Pool;
pub use task::{Task, TaskId, TaskOutcome, WorkerCtx};
