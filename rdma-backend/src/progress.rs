//! A thread that resumes a backend's deferred work, for embedders without workers of their own.

use std::sync::{Arc, OnceLock, Weak};
use std::thread;

use crossbeam_channel::{unbounded, Sender};

use crate::Backend;

/// Calls [`Backend::progress`] on a thread of its own whenever [`ProgressThread::notify`] is
/// called (what a sink's [`crate::CompletionSink::progress_needed`] does when the sink has no
/// worker pool to run it on: tests, tools). The thread ends when the `ProgressThread` is dropped.
#[derive(Debug)]
pub struct ProgressThread {
    tx: Sender<()>,
    target: Arc<OnceLock<Weak<dyn Backend>>>,
}

impl ProgressThread {
    /// Starts the thread, named `name`; nothing runs until [`ProgressThread::attach`].
    pub fn new(name: &str) -> std::io::Result<ProgressThread> {
        let (tx, rx) = unbounded::<()>();
        let target: Arc<OnceLock<Weak<dyn Backend>>> = Arc::new(OnceLock::new());
        let t = target.clone();
        thread::Builder::new().name(name.into()).spawn(move || {
            while rx.recv().is_ok() {
                // The backend holds the sink that holds this: only a weak reference here.
                if let Some(be) = t.get().and_then(Weak::upgrade) {
                    while be.progress() {}
                }
            }
        })?;
        Ok(ProgressThread { tx, target })
    }

    /// The backend whose work the thread resumes (once; later calls are ignored). Attach it
    /// right after creating it: requests made before are dropped.
    pub fn attach(&self, be: &Arc<dyn Backend>) {
        let _ = self.target.set(Arc::downgrade(be));
    }

    /// Asks for a round of [`Backend::progress`].
    pub fn notify(&self) {
        let _ = self.tx.send(());
    }
}
