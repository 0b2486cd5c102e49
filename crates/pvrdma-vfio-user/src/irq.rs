//! Interrupts: the eventfds a client hands over in SET_IRQS, and the device's interrupt sink that
//! signals them.
//!
//! QEMU sets one vector per SET_IRQS message (DATA_EVENTFD | ACTION_TRIGGER, `count` 1, one fd),
//! deassigns with the same message carrying no fd, and disables an index with DATA_NONE and
//! `count` 0. INTx is level-triggered and automasked: an assertion signals the eventfd and masks
//! the line until the client's UNMASK (after the guest's EOI); if the line is still asserted then,
//! it fires again.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;

use pvrdma_dev::pci::MSIX_VECTORS;
use pvrdma_dev::InterruptSink;
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_TYPE_MASK,
    VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_IRQ_SET_DATA_TYPE_MASK,
};

use crate::regions::{INTX_IRQ, MSIX_IRQ};

#[derive(Debug, Default)]
struct Vector {
    fd: Option<File>,
    masked: bool,
    pending: bool,
}

impl Vector {
    fn signal(&mut self) {
        match &self.fd {
            Some(f) => {
                let mut f: &File = f;
                if let Err(e) = f.write_all(&1u64.to_ne_bytes()) {
                    log::warn!("cannot signal an interrupt eventfd: {e}");
                }
            }
            None => log::trace!("interrupt with no eventfd assigned: dropped"),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    msix: [Vector; MSIX_VECTORS as usize],
    intx: Vector,
    intx_level: bool,
    /// Budget of the log lines of SET_IRQS mistakes (the client's to make).
    log: pvrdma_dev::ratelog::Limiter,
}

/// The device's interrupt sink for one connection: MSI-X vectors and INTx as eventfds.
#[derive(Debug, Default)]
pub struct EventfdIrqs {
    state: Mutex<State>,
}

impl EventfdIrqs {
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    /// Handles a SET_IRQS request. Mistakes (unknown index, range outside the vectors,
    /// unsupported combination) are logged and ignored.
    pub fn set_irqs(&self, index: u32, flags: u32, start: u32, count: u32, fds: Vec<File>) {
        let data = flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
        let action = flags & VFIO_IRQ_SET_ACTION_TYPE_MASK;
        log::debug!(
            "SET_IRQS index {index} flags {flags:#x} start {start} count {count} fds {}",
            fds.len()
        );
        self.with(|s| {
            let vectors: &mut [Vector] = match index {
                MSIX_IRQ => &mut s.msix,
                INTX_IRQ => std::slice::from_mut(&mut s.intx),
                _ => {
                    pvrdma_dev::limited_warn!(
                        s.log,
                        "SET_IRQS on unsupported interrupt index {index}: ignored"
                    );
                    return;
                }
            };
            let n = vectors.len() as u64;
            if data == VFIO_IRQ_SET_DATA_NONE && action == VFIO_IRQ_SET_ACTION_TRIGGER && count == 0
            {
                // Disable the whole index.
                for v in vectors.iter_mut() {
                    *v = Vector::default();
                }
                return;
            }
            if u64::from(start) + u64::from(count) > n {
                pvrdma_dev::limited_warn!(
                    s.log,
                    "SET_IRQS index {index}: vectors {start}+{count} out of range: ignored"
                );
                return;
            }
            let range = start as usize..(start + count) as usize;
            let mut fds = fds.into_iter();
            match (data, action) {
                (VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_ACTION_TRIGGER) => {
                    // An fd per vector; vectors without one (a chunk carrying no fds) are
                    // deassigned.
                    for v in &mut vectors[range] {
                        v.fd = fds.next();
                        v.pending = false;
                    }
                }
                (VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_ACTION_TRIGGER) => {
                    for v in &mut vectors[range] {
                        v.signal();
                    }
                }
                (VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_ACTION_MASK) => {
                    for v in &mut vectors[range] {
                        v.masked = true;
                    }
                }
                (VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_ACTION_UNMASK) => {
                    for v in &mut vectors[range] {
                        v.masked = false;
                        if std::mem::take(&mut v.pending) {
                            v.signal();
                        }
                    }
                    if index == INTX_IRQ && s.intx_level && !s.intx.masked {
                        s.intx.signal();
                        s.intx.masked = true;
                    }
                }
                _ => pvrdma_dev::limited_warn!(
                    s.log,
                    "SET_IRQS index {index}: unsupported flags {flags:#x}: ignored"
                ),
            }
        });
    }

    /// Forgets every eventfd (the client is gone).
    pub fn clear(&self) {
        self.with(|s| *s = State::default());
    }
}

impl InterruptSink for EventfdIrqs {
    fn trigger(&self, vector: u16) {
        self.with(|s| {
            let Some(v) = s.msix.get_mut(usize::from(vector)) else {
                log::warn!("device raised unknown MSI-X vector {vector}");
                return;
            };
            if v.masked {
                v.pending = true;
            } else {
                v.signal();
            }
        });
    }

    fn set_intx(&self, asserted: bool) {
        self.with(|s| {
            let rising = asserted && !s.intx_level;
            s.intx_level = asserted;
            if rising && !s.intx.masked {
                s.intx.signal();
                s.intx.masked = true;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    /// A socket pair stands in for an eventfd: a signal is 8 bytes on the other end.
    fn pair() -> (File, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        (File::from(std::os::fd::OwnedFd::from(a)), b)
    }

    fn signals(s: &mut UnixStream) -> usize {
        let mut buf = [0u8; 64];
        s.read(&mut buf).map(|n| n / 8).unwrap_or(0)
    }

    #[test]
    fn msix_assign_trigger_deassign() {
        let irqs = EventfdIrqs::default();
        let (f, mut peer) = pair();
        let assign = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        irqs.set_irqs(MSIX_IRQ, assign, 2, 1, vec![f]);
        irqs.trigger(2);
        assert_eq!(signals(&mut peer), 1);
        irqs.set_irqs(
            MSIX_IRQ,
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK,
            2,
            1,
            vec![],
        );
        irqs.trigger(2);
        assert_eq!(signals(&mut peer), 0);
        let unmask = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK;
        irqs.set_irqs(MSIX_IRQ, unmask, 2, 1, vec![]);
        assert_eq!(signals(&mut peer), 1, "pending fires on unmask");
        irqs.set_irqs(MSIX_IRQ, assign, 2, 1, vec![]);
        irqs.trigger(2);
        assert_eq!(signals(&mut peer), 0, "deassigned");
        // Out of range is ignored.
        irqs.set_irqs(MSIX_IRQ, assign, 3, 1, vec![]);
    }

    #[test]
    fn intx_is_automasked() {
        let irqs = EventfdIrqs::default();
        let (f, mut peer) = pair();
        let assign = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        irqs.set_irqs(INTX_IRQ, assign, 0, 1, vec![f]);
        irqs.set_intx(true);
        assert_eq!(signals(&mut peer), 1);
        irqs.set_intx(false);
        irqs.set_intx(true);
        assert_eq!(signals(&mut peer), 0, "masked until unmask");
        let unmask = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK;
        irqs.set_irqs(INTX_IRQ, unmask, 0, 1, vec![]);
        assert_eq!(signals(&mut peer), 1, "still asserted: fires again");
        irqs.set_intx(false);
        irqs.set_irqs(INTX_IRQ, unmask, 0, 1, vec![]);
        assert_eq!(signals(&mut peer), 0);
    }
}
