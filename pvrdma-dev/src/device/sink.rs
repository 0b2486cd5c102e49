//! Where backends deliver completions, events and requests for progress.

use super::*;

pub(super) enum Completion {
    Wc(WorkCompletion),
    Event(AsyncEvent),
}

/// Where backends deliver completions. Producers append to one shared queue under a short lock
/// (so completions keep the order they were produced in, whatever the thread) and wake the main
/// loop only when the queue goes from empty to non-empty: under load the loop takes hundreds of
/// completions per wake-up instead of one message each.
pub(super) struct Sink {
    pub(super) pending: std::sync::Mutex<Vec<Completion>>,
    pub(super) wake: Sender<()>,
    /// Set by [`CompletionSink::progress_needed`]; the main loop starts the backend's progress
    /// on a worker (`Core::start_progress`).
    pub(super) progress: Arc<std::sync::atomic::AtomicBool>,
}

impl Sink {
    pub(super) fn push(&self, items: impl Iterator<Item = Completion>) {
        let was_empty = {
            let Ok(mut g) = self.pending.lock() else {
                return;
            };
            let was_empty = g.is_empty();
            g.extend(items);
            was_empty
        };
        if was_empty {
            let _ = self.wake.send(());
        }
    }

    /// Takes everything queued, leaving `spare` (emptied) in its place to reuse its allocation.
    pub(super) fn take(&self, spare: &mut Vec<Completion>) {
        if let Ok(mut g) = self.pending.lock() {
            std::mem::swap(&mut *g, spare);
        }
    }
}

impl CompletionSink for Sink {
    fn complete(&self, wcs: &[WorkCompletion]) {
        self.push(wcs.iter().copied().map(Completion::Wc));
    }
    fn event(&self, ev: AsyncEvent) {
        self.push(std::iter::once(Completion::Event(ev)));
    }
    fn progress_needed(&self) {
        if !self.progress.swap(true, Ordering::AcqRel) {
            let _ = self.wake.send(());
        }
    }
}
