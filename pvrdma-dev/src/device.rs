//! The device state machine on its main loop, and the handle transports use to reach it.
//!
//! All device state lives on one thread (the main loop) and is never locked. Transports send
//! register and config accesses over a FIFO channel; the main loop serves them strictly in order.
//! A REQUEST write starts the command as a task; every later access waits in `deferred` until
//! that task's completion has written the response and ERR, so a guest's ERR read right after
//! REQUEST sees the final value (spec §4). Doorbells hand queues to workers; backend completions
//! come back over another channel and become CQEs here.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use rdma_backend::{
    AsyncEvent, Backend, CompletionSink, CqId, GuestMem, MrId, PdId, QpId, QpState, QpType,
    WcOpcode, WorkCompletion,
};
use vm_memory::{ByteValued, Bytes, GuestAddressSpace};

use crate::abi::{event, CmdHdr, QpAttr, RespHdr, SrqAttr, CMD_SLOT_SIZE, RESP_ACK};
use crate::cmd::{self, CmdError};
use crate::config::DeviceConfig;
use crate::datapath::cq::{self, Arm, CqRing, Pushed};
use crate::datapath::{self, Drained, Env, QpShared, SrqShared};
use crate::dsr::{self, LoadedDsr};
use crate::exec::Exec;
use crate::pci::{ConfigSpace, MsixTable, MSIX_BAR, REG_BAR, UAR_BAR};
use crate::regs::{ctl, err, offset, uar, vector, CqDoorbell, IntrCause, QpDoorbell, SrqDoorbell};
use crate::resources::HandleTable;

/// Accesses that may wait behind one running command. Transports wait for every read and for
/// non-posted writes, so only posted writes queue here; the bound keeps a flood of them finite.
const MAX_DEFERRED: usize = 65536;

/// How the device raises interrupts; implemented by whoever embeds it.
pub trait InterruptSink: Send + Sync {
    /// Signals MSI-X `vector`.
    fn trigger(&self, vector: u16);
    /// Sets the INTx line level (used when MSI-X is disabled).
    fn set_intx(&self, _asserted: bool) {}
}

/// Which address space an access targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    /// PCI configuration space.
    Config,
    /// A BAR (0 = MSI-X, 1 = registers, 2 = UAR pages).
    Bar(u8),
}

/// Options for embedding the device.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// The device emulates the MSI-X table in BAR0 and honours its masks. Transports whose VMM
    /// owns the table (vfio-user: QEMU emulates it) set this to `false`.
    pub msix_table_in_device: bool,
    /// Name prefix of the device's threads.
    pub name: String,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            msix_table_in_device: true,
            name: "pvrdma".into(),
        }
    }
}

/// Messages to the main loop.
#[derive(Debug)]
enum Msg {
    Read {
        region: Region,
        offset: u64,
        len: usize,
        reply: Sender<u64>,
    },
    Write {
        region: Region,
        offset: u64,
        len: usize,
        value: u64,
        done: Option<Sender<()>>,
    },
    Reset {
        done: Sender<()>,
    },
    Stats {
        reply: Sender<DeviceStats>,
    },
    Stop,
}

impl Msg {
    /// A read of `len` (≤ 8) bytes, and where its value arrives.
    fn read(region: Region, offset: u64, len: usize) -> (Msg, Receiver<u64>) {
        let (reply, rx) = bounded(1);
        let msg = Msg::Read {
            region,
            offset,
            len: len.min(8),
            reply,
        };
        (msg, rx)
    }

    /// A write of `data` (the first 8 bytes at most); `done` hears when it was handled.
    fn write(region: Region, offset: u64, data: &[u8], done: Option<Sender<()>>) -> Msg {
        let len = data.len().min(8);
        let mut b = [0u8; 8];
        b[..len].copy_from_slice(&data[..len]);
        Msg::Write {
            region,
            offset,
            len,
            value: u64::from_le_bytes(b),
            done,
        }
    }
}

/// Puts a read's value into `data`: the low bytes, and all-ones past 8.
fn fill_read(v: u64, data: &mut [u8]) {
    let len = data.len().min(8);
    data[..len].copy_from_slice(&v.to_le_bytes()[..len]);
    data[len..].fill(0xff);
}

/// Counters for tests and monitoring.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Commands executed.
    pub commands: u64,
    /// Commands that failed.
    pub command_errors: u64,
    /// CQEs written.
    pub cqes: u64,
    /// Completions dropped because their QP or CQ is gone.
    pub stale_completions: u64,
    /// CQEs lost to a full CQ.
    pub cq_overflows: u64,
    /// Doorbells ignored (unknown handle, wrong context, bad value).
    pub bad_doorbells: u64,
    /// Async events posted.
    pub events: u64,
    /// Live objects: PDs, MRs, CQs, QPs, SRQs, user contexts.
    pub objects: [usize; 6],
    /// Host memory the live objects reserve, in bytes (bounded by `max_host_mem`).
    pub host_mem: u64,
}

enum Completion {
    Wc(WorkCompletion),
    Event(AsyncEvent),
}

/// Where backends deliver completions. Producers append to one shared queue under a short lock
/// (so completions keep the order they were produced in, whatever the thread) and wake the main
/// loop only when the queue goes from empty to non-empty: under load the loop takes hundreds of
/// completions per wake-up instead of one message each.
struct Sink {
    pending: std::sync::Mutex<Vec<Completion>>,
    wake: Sender<()>,
    /// Set by [`CompletionSink::progress_needed`]; the main loop starts the backend's progress
    /// on a worker (`Core::start_progress`).
    progress: Arc<std::sync::atomic::AtomicBool>,
}

impl Sink {
    fn push(&self, items: impl Iterator<Item = Completion>) {
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
    fn take(&self, spare: &mut Vec<Completion>) {
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

/// A backend constructor: receives the guest memory and the sink completions go to.
pub type BackendFactory =
    Box<dyn FnOnce(GuestMem, Arc<dyn CompletionSink>) -> Arc<dyn Backend> + Send>;

/// Handle to a running device; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct DeviceHandle {
    tx: Sender<Msg>,
    thread: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
    /// How long an access polls for the device's answer before it sleeps (`poll_us`).
    poll: std::time::Duration,
}

/// Waits for `rx`'s answer: polls (yielding the core between checks) for up to `poll`, then
/// blocks. The device answers most accesses within microseconds, well inside a scheduler
/// wake-up; the main loop polls the same way on its side ([`DeviceConfig::poll_us`]).
fn recv_polling<T>(rx: &Receiver<T>, poll: std::time::Duration) -> Result<T, DeviceError> {
    if !poll.is_zero() {
        let start = std::time::Instant::now();
        loop {
            match rx.try_recv() {
                Ok(v) => return Ok(v),
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    return Err(DeviceError::Stopped)
                }
                Err(crossbeam_channel::TryRecvError::Empty) => {}
            }
            if start.elapsed() >= poll {
                break;
            }
            std::thread::yield_now();
        }
    }
    rx.recv().map_err(|_| DeviceError::Stopped)
}

impl std::fmt::Debug for DeviceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceHandle").finish_non_exhaustive()
    }
}

/// Errors of the device handle.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The device thread is gone.
    #[error("the device has stopped")]
    Stopped,
    /// The device thread could not be started.
    #[error("cannot start the device thread")]
    Spawn(#[source] std::io::Error),
}

/// Messages queued for the main loop beyond which a posted write waits (back-pressure).
pub const MAX_POSTED: usize = 1024;

impl DeviceHandle {
    /// Starts a device on its own main-loop thread.
    pub fn spawn(
        cfg: DeviceConfig,
        opts: DeviceOptions,
        mem: GuestMem,
        irq: Arc<dyn InterruptSink>,
        backend: BackendFactory,
    ) -> Result<DeviceHandle, DeviceError> {
        cfg.validate()?;
        let (tx, rx) = unbounded::<Msg>();
        let name = opts.name.clone();
        let poll = std::time::Duration::from_micros(u64::from(cfg.poll_us));
        let thread = std::thread::Builder::new()
            .name(format!("{name}-main"))
            .spawn(move || run_main_loop(cfg, opts, mem, irq, backend, rx))
            .map_err(DeviceError::Spawn)?;
        Ok(DeviceHandle {
            tx,
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
            poll,
        })
    }

    /// Reads `data.len()` (1..=8) bytes; unanswered bytes read as all-ones.
    pub fn read(&self, region: Region, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        let (msg, rx) = Msg::read(region, offset, data.len());
        self.tx.send(msg).map_err(|_| DeviceError::Stopped)?;
        fill_read(recv_polling(&rx, self.poll)?, data);
        Ok(())
    }

    /// Writes `data` (1..=8 bytes) and waits until the device has handled it (non-posted).
    pub fn write(&self, region: Region, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let (done, rx) = bounded(1);
        self.send_write(region, offset, data, Some(done))?;
        recv_polling(&rx, self.poll)
    }

    /// Writes without waiting (a posted write); ordering with later accesses is kept. With
    /// [`MAX_POSTED`] messages already queued for the main loop the write waits for the device
    /// instead, so a guest that rings doorbells faster than the loop takes them meets
    /// back-pressure rather than growing the queue without bound.
    pub fn write_posted(
        &self,
        region: Region,
        offset: u64,
        data: &[u8],
    ) -> Result<(), DeviceError> {
        if self.tx.len() >= MAX_POSTED {
            return self.write(region, offset, data);
        }
        self.send_write(region, offset, data, None)
    }

    fn send_write(
        &self,
        region: Region,
        offset: u64,
        data: &[u8],
        done: Option<Sender<()>>,
    ) -> Result<(), DeviceError> {
        self.tx
            .send(Msg::write(region, offset, data, done))
            .map_err(|_| DeviceError::Stopped)
    }

    /// Reads a 32-bit register of `bar`.
    pub fn read32(&self, region: Region, offset: u64) -> Result<u32, DeviceError> {
        let mut b = [0u8; 4];
        self.read(region, offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Writes a 32-bit register of `bar`.
    pub fn write32(&self, region: Region, offset: u64, v: u32) -> Result<(), DeviceError> {
        self.write(region, offset, &v.to_le_bytes())
    }

    /// Function-level reset (vfio-user DEVICE_RESET): everything back to power-on.
    pub fn reset(&self) -> Result<(), DeviceError> {
        let (done, rx) = bounded(1);
        self.tx
            .send(Msg::Reset { done })
            .map_err(|_| DeviceError::Stopped)?;
        rx.recv().map_err(|_| DeviceError::Stopped)
    }

    /// Current counters.
    pub fn stats(&self) -> Result<DeviceStats, DeviceError> {
        let (reply, rx) = bounded(1);
        self.tx
            .send(Msg::Stats { reply })
            .map_err(|_| DeviceError::Stopped)?;
        rx.recv().map_err(|_| DeviceError::Stopped)
    }

    /// Stops the device and joins its thread.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Msg::Stop);
        let t = self.thread.lock().ok().and_then(|mut g| g.take());
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

/// What a front end (the vfio-user server, a VMM's bus) does with a device: the accesses of a PCI
/// function. [`DeviceHandle`] and [`LocalDevice`] both implement it, so a front end can run the
/// device on its own thread or, for deterministic tests and fuzzing, on the caller's.
pub trait DeviceAccess {
    /// Reads `data.len()` (1..=8) bytes; unanswered bytes read as all-ones.
    fn read(&self, region: Region, offset: u64, data: &mut [u8]) -> Result<(), DeviceError>;
    /// Writes `data` (1..=8 bytes); returns once the device has handled it.
    fn write(&self, region: Region, offset: u64, data: &[u8]) -> Result<(), DeviceError>;
    /// A posted write: may return before the device has handled it; order is kept.
    fn write_posted(&self, region: Region, offset: u64, data: &[u8]) -> Result<(), DeviceError>;
    /// Function-level reset.
    fn reset(&self) -> Result<(), DeviceError>;
    /// Stops the device (a later access fails with [`DeviceError::Stopped`] or is not made).
    fn shutdown(&self);
}

impl DeviceAccess for DeviceHandle {
    fn read(&self, region: Region, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        DeviceHandle::read(self, region, offset, data)
    }
    fn write(&self, region: Region, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        DeviceHandle::write(self, region, offset, data)
    }
    fn write_posted(&self, region: Region, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        DeviceHandle::write_posted(self, region, offset, data)
    }
    fn reset(&self) -> Result<(), DeviceError> {
        DeviceHandle::reset(self)
    }
    fn shutdown(&self) {
        DeviceHandle::shutdown(self);
    }
}

impl DeviceAccess for LocalDevice {
    fn read(&self, region: Region, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        LocalDevice::read(self, region, offset, data)
    }
    fn write(&self, region: Region, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        LocalDevice::write(self, region, offset, data)
    }
    /// On the caller's thread a posted write is handled before it returns.
    fn write_posted(&self, region: Region, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        LocalDevice::write(self, region, offset, data)
    }
    fn reset(&self) -> Result<(), DeviceError> {
        LocalDevice::reset(self)
    }
    /// The device stops when it is dropped.
    fn shutdown(&self) {}
}

/// A device's main loop with everything registered on it; the loop is not run yet.
struct Running {
    main_loop: Rc<task_core::MainLoop>,
    core: Rc<RefCell<Core>>,
}

impl Running {
    /// Builds the core, the backend and the loop's sources. `pool` runs the device's work.
    fn new(
        cfg: DeviceConfig,
        opts: DeviceOptions,
        mem: GuestMem,
        irq: Arc<dyn InterruptSink>,
        backend: BackendFactory,
        rx: Receiver<Msg>,
        pool: task_core::Pool,
    ) -> Running {
        let main_loop = Rc::new(task_core::MainLoop::new());
        let (wake, crx) = unbounded::<()>();
        let progress = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let device_sink = Arc::new(Sink {
            pending: std::sync::Mutex::new(Vec::new()),
            wake,
            progress: progress.clone(),
        });
        let sink: Arc<dyn CompletionSink> = device_sink.clone();
        let backend = backend(mem.clone(), sink.clone());
        let env = Arc::new(Env {
            mem: mem.clone(),
            backend: backend.clone(),
            sink,
            progress,
        });
        let core = Rc::new_cyclic(|weak| {
            RefCell::new(Core::new(
                cfg,
                opts,
                mem,
                irq,
                env,
                Exec::new(main_loop.clone(), pool),
                weak.clone(),
            ))
        });
        // The receivers hold the core weakly: the core holds the main loop (through `Exec`), so
        // strong references here would be a cycle that leaks the core, its worker pool's threads
        // and the guest memory snapshot of every device that is shut down.
        let c = Rc::downgrade(&core);
        let handle = main_loop.handle();
        let on_close = main_loop.handle();
        main_loop.add_receiver_with_close(
            rx,
            move |msg| {
                if let Msg::Stop = msg {
                    handle.stop();
                    return;
                }
                if let Some(c) = c.upgrade() {
                    c.borrow_mut().on_msg(msg);
                }
            },
            // Every DeviceHandle dropped without a shutdown: stop too.
            move || on_close.stop(),
        );
        let c = Rc::downgrade(&core);
        let mut batch = Vec::new();
        main_loop.add_receiver(crx, move |()| {
            device_sink.take(&mut batch);
            let Some(c) = c.upgrade() else { return };
            let mut c = c.borrow_mut();
            if !batch.is_empty() {
                c.on_completions(&batch);
                batch.clear();
            }
            c.start_progress();
        });
        Running { main_loop, core }
    }

    /// Tears the device down. The last strong reference to the core (its worker pool, backend,
    /// guest memory and interrupt sink) goes here; a threaded pool's threads are joined.
    fn finish(self) {
        self.core.borrow_mut().teardown();
        drop(self.core);
    }
}

/// Jobs a device can have queued on its pool: one drain per QP and per SRQ (`Sched` keeps at
/// most one in flight each), one command and one run of the backend's progress, and the same
/// again from before a reset whose old jobs have not run yet. Sized so that the main loop never blocks in a submission (it would stop
/// answering the guest while the workers copy).
fn pool_queue(cfg: &DeviceConfig) -> usize {
    2 * (cfg.max_qp as usize + cfg.max_srq as usize + 2) + 16
}

fn run_main_loop(
    cfg: DeviceConfig,
    opts: DeviceOptions,
    mem: GuestMem,
    irq: Arc<dyn InterruptSink>,
    backend: BackendFactory,
    rx: Receiver<Msg>,
) {
    let queue = pool_queue(&cfg);
    let pool = match task_core::Pool::new(&format!("{}-worker", opts.name), cfg.workers, queue) {
        Ok(p) => p,
        Err(e) => {
            log::error!("cannot start the worker pool: {e}");
            return;
        }
    };
    let poll = std::time::Duration::from_micros(u64::from(cfg.poll_us));
    let running = Running::new(cfg, opts, mem, irq, backend, rx, pool);
    running.main_loop.set_poll(poll);
    running.main_loop.run();
    running.finish();
}

/// A device whose main loop runs on the thread that owns it, driven by each access, with an
/// inline worker pool ([`task_core::Pool::inline`]): no thread of its own, and the same guest
/// accesses give the same device behaviour every time. Everything else (the command channel's
/// tasks, CQEs and interrupts posted from completions on the main loop) is as with
/// [`DeviceHandle`]. For deterministic tests and fuzzing; not `Send`.
pub struct LocalDevice {
    tx: Sender<Msg>,
    running: Option<Running>,
}

impl std::fmt::Debug for LocalDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalDevice").finish_non_exhaustive()
    }
}

/// How long a [`LocalDevice`] access drives the loop for its answer before giving up (the
/// backend's own threads, e.g. the emulated fabric's timer, may still have to deliver).
const LOCAL_ACCESS_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

impl LocalDevice {
    /// A device on this thread.
    pub fn new(
        cfg: DeviceConfig,
        opts: DeviceOptions,
        mem: GuestMem,
        irq: Arc<dyn InterruptSink>,
        backend: BackendFactory,
    ) -> Result<LocalDevice, DeviceError> {
        cfg.validate()?;
        let (tx, rx) = unbounded::<Msg>();
        let pool = task_core::Pool::inline(&format!("{}-worker", opts.name));
        let running = Running::new(cfg, opts, mem, irq, backend, rx, pool);
        Ok(LocalDevice {
            tx,
            running: Some(running),
        })
    }

    /// Dispatches what is ready without blocking; returns the number of callbacks run.
    pub fn poll(&self) -> usize {
        self.running.as_ref().map_or(0, |r| r.main_loop.dispatch())
    }

    /// Drives the loop for up to `timeout`, returning early once something ran.
    pub fn iterate(&self, timeout: std::time::Duration) -> usize {
        self.running
            .as_ref()
            .map_or(0, |r| r.main_loop.iterate(Some(timeout)))
    }

    /// Sends `msg` and drives the loop until `rx` has the answer.
    fn call<T>(&self, msg: Msg, rx: &Receiver<T>) -> Result<T, DeviceError> {
        let r = self.running.as_ref().ok_or(DeviceError::Stopped)?;
        self.tx.send(msg).map_err(|_| DeviceError::Stopped)?;
        let deadline = std::time::Instant::now() + LOCAL_ACCESS_LIMIT;
        loop {
            if let Ok(v) = rx.try_recv() {
                // Then what the access made ready (completions → CQEs and interrupts), so the
                // guest sees the device's reaction to an access as soon as it returns.
                for _ in 0..64 {
                    if r.main_loop.dispatch() == 0 {
                        break;
                    }
                }
                return Ok(v);
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Err(DeviceError::Stopped);
            }
            r.main_loop.iterate(Some(deadline - now));
        }
    }

    /// Reads `data.len()` (1..=8) bytes; unanswered bytes read as all-ones.
    pub fn read(&self, region: Region, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        let (msg, rx) = Msg::read(region, offset, data.len());
        fill_read(self.call(msg, &rx)?, data);
        Ok(())
    }

    /// Writes `data` (1..=8 bytes); returns once the device has handled it.
    pub fn write(&self, region: Region, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let (done, rx) = bounded(1);
        self.call(Msg::write(region, offset, data, Some(done)), &rx)
    }

    /// Function-level reset: everything back to power-on.
    pub fn reset(&self) -> Result<(), DeviceError> {
        let (done, rx) = bounded(1);
        self.call(Msg::Reset { done }, &rx)
    }

    /// Current counters.
    pub fn stats(&self) -> Result<DeviceStats, DeviceError> {
        let (reply, rx) = bounded(1);
        self.call(Msg::Stats { reply }, &rx)
    }
}

impl Drop for LocalDevice {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.finish();
        }
    }
}

/// Scheduling state of a queue drained by workers: one worker at a time, rerun if rung meanwhile.
#[derive(Debug, Default)]
pub(crate) struct Sched {
    pub busy: bool,
    pub again: bool,
    pub stalled: bool,
}

#[derive(Debug)]
pub(crate) struct Uc {
    pub uar_index: u32,
}

#[derive(Debug)]
pub(crate) struct Pd {
    pub ctx: u32,
    pub backend: PdId,
    pub refs: u32,
    /// Bytes reserved against the host-memory budget.
    pub cost: u64,
}

#[derive(Debug)]
pub(crate) struct Mr {
    pub pd: u32,
    pub backend: MrId,
    /// Pages its page list holds (counted against `max_mr_pages`).
    pub pages: u64,
    /// Bytes reserved against the host-memory budget.
    pub cost: u64,
}

#[derive(Debug)]
pub(crate) struct Cq {
    pub ctx: u32,
    pub backend: CqId,
    pub ring: CqRing,
    pub cqe: u32,
    pub refs: u32,
    /// Bytes reserved against the host-memory budget.
    pub cost: u64,
}

#[derive(Debug)]
pub(crate) struct Srq {
    pub pd: u32,
    pub gen: u32,
    pub attrs: SrqAttr,
    pub shared: Arc<SrqShared>,
    pub sched: Sched,
    pub refs: u32,
    /// Bytes reserved against the host-memory budget.
    pub cost: u64,
}

#[derive(Debug)]
pub(crate) struct Qp {
    pub pd: u32,
    pub gen: u32,
    pub qp_type: QpType,
    pub send_cq: u32,
    pub recv_cq: u32,
    pub srq: Option<u32>,
    pub attrs: QpAttr,
    pub shared: Arc<QpShared>,
    pub sched: Sched,
    /// Bytes reserved against the host-memory budget.
    pub cost: u64,
}

impl Qp {
    pub(crate) fn backend(&self) -> QpId {
        self.shared.backend_qp
    }
}

/// Register-file state (BAR1).
#[derive(Debug)]
struct Regs {
    dsr_low: u32,
    dsr_high: u32,
    err: u32,
    icr: u32,
    imr: u32,
    macl: u32,
    mach: u32,
}

impl Regs {
    fn power_on() -> Regs {
        Regs {
            dsr_low: 0,
            dsr_high: 0,
            err: err::RESET_VALUE,
            icr: 0,
            imr: !0,
            macl: 0,
            mach: 0,
        }
    }
}

/// The device, owned by its main loop.
pub(crate) struct Core {
    pub cfg: DeviceConfig,
    pub opts: DeviceOptions,
    pub mem: GuestMem,
    pub irq: Arc<dyn InterruptSink>,
    pub env: Arc<Env>,
    pub exec: Exec,
    pub weak: Weak<RefCell<Core>>,
    pub config: ConfigSpace,
    pub msix: MsixTable,
    regs: Regs,
    pub dsr: Option<LoadedDsr>,
    pub active: bool,
    /// Bumped on every reset; work started before carries the old value and is dropped.
    pub epoch: u32,
    /// Generation counter for objects (cookie high half).
    pub next_gen: u32,
    cmd_pending: bool,
    deferred: VecDeque<Msg>,
    pub ucs: HandleTable<Uc>,
    pub uar_owner: HashMap<u32, u32>,
    pub pds: HandleTable<Pd>,
    pub mrs: HandleTable<Mr>,
    pub cqs: HandleTable<Cq>,
    pub qps: HandleTable<Qp>,
    pub srqs: HandleTable<Srq>,
    pub gids: Vec<Option<([u8; 16], u8)>>,
    /// Pages listed by all user MRs (bounded by `max_mr_pages`).
    pub mr_pages: u64,
    /// Host memory reserved by the guest's objects (bounded by `max_host_mem`).
    pub host_mem: crate::budget::Account,
    pub stats: DeviceStats,
    /// CQs written by the current run of completions (kept for its allocation).
    cqs_written: Vec<u32>,
    /// A job running [`Backend::progress`] is queued or running on the pool.
    progress_running: bool,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

/// Whether an access of `len` bytes at `off` lies inside a BAR of `size` bytes. UAR accesses
/// outside BAR2 must not alias a UAR page: `off >> 12` truncated to 32 bits would map
/// offset 2^44 onto the kernel's page 0.
fn access_in_bar(off: u64, len: usize, size: u64) -> bool {
    off.checked_add(len as u64).is_some_and(|end| end <= size)
}

/// The cookie of an object the backend knows: its handle and generation (the high half).
pub(crate) fn cookie(handle: u32, gen: u32) -> u64 {
    (u64::from(gen) << 32) | u64::from(handle)
}

/// The handle and generation of a [`cookie`].
pub(crate) fn split_cookie(c: u64) -> (u32, u32) {
    (c as u32, (c >> 32) as u32)
}

impl Core {
    fn new(
        cfg: DeviceConfig,
        opts: DeviceOptions,
        mem: GuestMem,
        irq: Arc<dyn InterruptSink>,
        env: Arc<Env>,
        exec: Exec,
        weak: Weak<RefCell<Core>>,
    ) -> Core {
        let config = ConfigSpace::new(cfg.uar_bar_size(), (0x15ad, 0x0820));
        let tables = Tables::new(&cfg);
        Core {
            config,
            msix: MsixTable::new(),
            regs: Regs::power_on(),
            dsr: None,
            active: false,
            epoch: 0,
            next_gen: 1,
            cmd_pending: false,
            deferred: VecDeque::new(),
            ucs: tables.ucs,
            uar_owner: HashMap::new(),
            pds: tables.pds,
            mrs: tables.mrs,
            cqs: tables.cqs,
            qps: tables.qps,
            srqs: tables.srqs,
            gids: vec![None; cfg.gid_tbl_len as usize],
            mr_pages: 0,
            host_mem: Default::default(),
            stats: DeviceStats::default(),
            cqs_written: Vec::new(),
            progress_running: false,
            cfg,
            opts,
            mem,
            irq,
            env,
            exec,
            weak,
        }
    }

    pub(crate) fn new_gen(&mut self) -> u32 {
        let g = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        g
    }

    fn on_msg(&mut self, msg: Msg) {
        if self.cmd_pending {
            if let Msg::Reset { .. } = msg {
                // A reset does not wait for the command in progress (its backend work may take
                // long): the command is abandoned, and what waited behind it is answered as a
                // device being reset answers.
                self.abandon_command();
                self.serve(msg);
                return;
            }
            if self.deferred.len() >= MAX_DEFERRED {
                // Only posted writes can pile up here (every other access waits for its
                // answer); a guest that posts this many while one command runs loses them.
                log::warn!("{MAX_DEFERRED} accesses wait for a command; dropping one");
                if let Msg::Read { reply, .. } = msg {
                    let _ = reply.send(u64::MAX);
                }
                return;
            }
            self.deferred.push_back(msg);
            return;
        }
        self.serve(msg);
    }

    fn serve(&mut self, msg: Msg) {
        match msg {
            Msg::Read {
                region,
                offset,
                len,
                reply,
            } => {
                let v = self.read(region, offset, len);
                let _ = reply.send(v);
            }
            Msg::Write {
                region,
                offset,
                len,
                value,
                done,
            } => {
                self.write(region, offset, len, value);
                if let Some(d) = done {
                    let _ = d.send(());
                }
            }
            Msg::Reset { done } => {
                self.reset();
                self.config.reset();
                self.msix.reset();
                let _ = done.send(());
            }
            Msg::Stats { reply } => {
                let mut s = self.stats.clone();
                s.objects = [
                    self.pds.len(),
                    self.mrs.len(),
                    self.cqs.len(),
                    self.qps.len(),
                    self.srqs.len(),
                    self.ucs.len(),
                ];
                s.host_mem = self.host_mem.reserved();
                let _ = reply.send(s);
            }
            Msg::Stop => {}
        }
    }

    /// Gives up the command in progress (for a reset, which follows at once): its completion,
    /// from before the reset, is dropped when it comes; reads that waited behind it read
    /// all-ones, writes are dropped.
    fn abandon_command(&mut self) {
        self.cmd_pending = false;
        for m in self.deferred.drain(..) {
            match m {
                Msg::Read { reply, .. } => {
                    let _ = reply.send(u64::MAX);
                }
                Msg::Write { done, .. } => {
                    if let Some(d) = done {
                        let _ = d.send(());
                    }
                }
                Msg::Reset { done } => {
                    let _ = done.send(());
                }
                Msg::Stats { reply } => {
                    let _ = reply.send(self.stats.clone());
                }
                Msg::Stop => {}
            }
        }
    }

    /// Serves accesses that waited for a command, until one starts another command.
    fn drain_deferred(&mut self) {
        while !self.cmd_pending {
            let Some(m) = self.deferred.pop_front() else {
                break;
            };
            self.serve(m);
        }
    }

    fn read(&mut self, region: Region, off: u64, len: usize) -> u64 {
        let mut buf = [0xffu8; 8];
        if len == 0 {
            // A zero-length read touches nothing (an ICR read would otherwise clear it).
            return u64::from_le_bytes(buf);
        }
        let len = len.min(8);
        match region {
            Region::Config => self.config.read(off, &mut buf[..len]),
            Region::Bar(b) if usize::from(b) == MSIX_BAR => self.msix.read(off, &mut buf[..len]),
            Region::Bar(b) if usize::from(b) == REG_BAR => {
                // Registers are 32-bit; any size and alignment is answered from the bytes.
                for (i, byte) in buf[..len].iter_mut().enumerate() {
                    let o = off.wrapping_add(i as u64);
                    let reg = self.read_reg(o & !3, len <= 4 && o & !3 == off & !3);
                    *byte = reg.to_le_bytes()[(o & 3) as usize];
                }
            }
            // UAR reads return all-ones (CVE-2018-20191: QEMU crashed on them).
            _ => {}
        }
        u64::from_le_bytes(buf)
    }

    fn read_reg(&mut self, off: u64, side_effects: bool) -> u32 {
        match off {
            offset::VERSION => self.cfg.version,
            offset::DSRLOW => self.regs.dsr_low,
            offset::DSRHIGH => self.regs.dsr_high,
            offset::ERR => self.regs.err,
            offset::ICR => {
                let v = self.regs.icr;
                if side_effects {
                    self.regs.icr = 0;
                    self.irq.set_intx(false);
                }
                v
            }
            offset::IMR => self.regs.imr,
            offset::MACL => self.regs.macl,
            offset::MACH => self.regs.mach,
            _ => 0,
        }
    }

    fn write(&mut self, region: Region, off: u64, len: usize, value: u64) {
        if len == 0 {
            // A zero-length write is not a one-byte write of 0.
            return;
        }
        let len = len.min(8);
        let bytes = value.to_le_bytes();
        match region {
            Region::Config => {
                self.config.write(off, &bytes[..len]);
            }
            Region::Bar(b) if usize::from(b) == MSIX_BAR => {
                self.msix.write(off, &bytes[..len]);
                self.fire_unmasked_pending();
            }
            Region::Bar(b) if usize::from(b) == REG_BAR => {
                if len == 4 && off % 4 == 0 {
                    self.write_reg(off, value as u32);
                } else if len == 8 && off % 8 == 0 {
                    self.write_reg(off, value as u32);
                    self.write_reg(off + 4, (value >> 32) as u32);
                } else {
                    log::debug!("ignored {len}-byte register write at {off:#x}");
                }
            }
            Region::Bar(b) if usize::from(b) == UAR_BAR => {
                if !access_in_bar(off, len, self.config.bar_size(UAR_BAR)) {
                    self.stats.bad_doorbells += 1;
                } else if len == 4 && off % 4 == 0 {
                    self.doorbell(off, value as u32);
                } else if len == 8 && off % 8 == 0 {
                    self.doorbell(off, value as u32);
                    self.doorbell(off + 4, (value >> 32) as u32);
                } else {
                    self.stats.bad_doorbells += 1;
                }
            }
            _ => {}
        }
    }

    fn write_reg(&mut self, off: u64, v: u32) {
        match off {
            offset::DSRLOW => self.regs.dsr_low = v,
            offset::DSRHIGH => {
                self.regs.dsr_high = v;
                self.load_dsr();
            }
            offset::CTL => self.control(v),
            offset::REQUEST => {
                if v == 0 {
                    self.start_command();
                } else {
                    log::debug!("REQUEST write of {v:#x} ignored");
                }
            }
            offset::IMR => {
                self.regs.imr = v;
            }
            offset::MACL => self.regs.macl = v,
            offset::MACH => self.regs.mach = v,
            _ => log::debug!("write to read-only or unknown register {off:#x} ignored"),
        }
    }

    fn load_dsr(&mut self) {
        let addr = (u64::from(self.regs.dsr_high) << 32) | u64::from(self.regs.dsr_low);
        // A second DSR load while objects exist (hazard 9) starts from a clean device.
        if self.dsr.is_some() || self.active {
            self.reset_objects();
        }
        let mem = self.mem.memory();
        match dsr::load(&*mem, addr, &self.cfg) {
            Ok(d) => {
                log::debug!(
                    "DSR loaded at {addr:#x}, driver version {}",
                    d.driver_version
                );
                self.dsr = Some(d);
                self.regs.err = err::OK;
            }
            Err(e) => {
                log::warn!("DSR at {addr:#x} rejected: {e}");
                self.dsr = None;
                self.regs.err = err::EFAULT;
            }
        }
    }

    fn control(&mut self, v: u32) {
        match v {
            ctl::ACTIVATE => {
                if self.dsr.is_some() {
                    let was = self.active;
                    self.active = true;
                    self.regs.err = err::OK;
                    if !was {
                        // There is no link-state caching in the driver: the port is ACTIVE
                        // from activation, and an event says so.
                        self.post_event(9, 1);
                    }
                } else {
                    self.regs.err = err::EIO;
                }
            }
            ctl::UNQUIESCE => {
                self.regs.err = if self.active { err::OK } else { err::EIO };
            }
            ctl::RESET => {
                self.reset();
                self.regs.err = err::OK;
            }
            _ => {
                log::debug!("unknown CTL value {v:#x}");
                self.regs.err = err::EINVAL;
            }
        }
    }

    /// Frees every object; the backend and rings are reset; in-flight work is disowned.
    fn reset_objects(&mut self) {
        for (_, qp) in self.qps.iter() {
            qp.shared.dead.store(true, Ordering::Release);
        }
        for (_, srq) in self.srqs.iter() {
            srq.shared.dead.store(true, Ordering::Release);
        }
        self.env.backend.reset();
        self.qps.clear();
        self.srqs.clear();
        self.cqs.clear();
        self.mrs.clear();
        self.pds.clear();
        self.ucs.clear();
        self.uar_owner.clear();
        self.gids.iter_mut().for_each(|g| *g = None);
        self.mr_pages = 0;
        self.host_mem.clear();
        self.epoch = self.epoch.wrapping_add(1);
    }

    /// CTL RESET / DEVICE_RESET: back to the power-on state of the register file.
    pub(crate) fn reset(&mut self) {
        self.reset_objects();
        self.dsr = None;
        self.active = false;
        self.regs = Regs::power_on();
        self.irq.set_intx(false);
    }

    fn teardown(&mut self) {
        self.reset_objects();
    }

    /// Drains again every queue whose last drain stopped at a WR the backend did not take.
    fn restart_stalled(&mut self) {
        let qps: Vec<u32> = self
            .qps
            .iter_mut()
            .filter(|(_, q)| q.sched.stalled)
            .map(|(h, q)| {
                q.sched.stalled = false;
                h
            })
            .collect();
        for h in qps {
            self.schedule_qp(h);
        }
        let srqs: Vec<u32> = self
            .srqs
            .iter_mut()
            .filter(|(_, s)| s.sched.stalled)
            .map(|(h, s)| {
                s.sched.stalled = false;
                h
            })
            .collect();
        for h in srqs {
            self.schedule_srq(h);
        }
    }

    /// Runs the backend's deferred work on a worker if it asked for it: one job at a time (as a
    /// queue's drain), queued behind the device's other work, and again for as long as the
    /// backend says more remains. Not tied to the reset epoch: the backend drops what a reset
    /// removes.
    fn start_progress(&mut self) {
        if self.progress_running || !self.env.progress.swap(false, Ordering::AcqRel) {
            return;
        }
        self.progress_running = true;
        let weak = self.weak.clone();
        self.exec.run_on(
            false,
            self.env.clone(),
            |env: &Env| env.backend.progress(),
            move |more| {
                let Some(core) = weak.upgrade() else { return };
                let mut core = core.borrow_mut();
                core.progress_running = false;
                // The backend may have room again for WRs it refused (QueueFull).
                core.restart_stalled();
                match more {
                    Ok(true) => core.env.progress.store(true, Ordering::Release),
                    Ok(false) => {}
                    Err(e) => log::error!("the backend's deferred work failed: {e}"),
                }
                core.start_progress();
            },
        );
    }

    // ---- interrupts ----------------------------------------------------------------------

    pub(crate) fn raise(&mut self, vector: u16) {
        let cause = match vector {
            vector::RESPONSE => IntrCause::RESPONSE,
            vector::ASYNC => IntrCause::ASYNC,
            _ => IntrCause::CQ,
        };
        if self.regs.imr & (1 << vector) != 0 {
            return;
        }
        if self.config.msix_enabled() {
            if self.opts.msix_table_in_device
                && (self.config.msix_function_masked() || self.msix.is_masked(vector))
            {
                self.msix.set_pending(vector, true);
                return;
            }
            self.irq.trigger(vector);
        } else {
            // MSI/INTx fallback: only vector 0 is handled by the driver, which reads ICR.
            self.regs.icr |= cause.bits();
            if !self.config.intx_disabled() {
                self.irq.set_intx(true);
            }
        }
    }

    fn fire_unmasked_pending(&mut self) {
        if !self.opts.msix_table_in_device || !self.config.msix_enabled() {
            return;
        }
        for v in 0..3u16 {
            if self.msix.is_pending(v)
                && !self.msix.is_masked(v)
                && !self.config.msix_function_masked()
            {
                self.msix.set_pending(v, false);
                self.irq.trigger(v);
            }
        }
    }

    pub(crate) fn post_event(&mut self, event_type: u32, info: u32) {
        if !self.active {
            return;
        }
        let mem = self.mem.memory();
        let Some(d) = self.dsr.as_mut() else { return };
        match d.post_event(&*mem, event_type, info) {
            Ok(true) => {
                self.stats.events += 1;
                self.raise(1);
            }
            Ok(false) => log::debug!("async event ring full; event {event_type} dropped"),
            Err(e) => log::debug!("async event ring unusable: {e}"),
        }
    }

    // ---- commands ------------------------------------------------------------------------

    fn start_command(&mut self) {
        let Some(d) = self.dsr.as_ref() else {
            // CVE-2022-1050: REQUEST before a DSR is loaded.
            self.regs.err = err::EIO;
            self.raise(0);
            return;
        };
        let mut req = [0u8; CMD_SLOT_SIZE];
        if self.mem.memory().read_slice(&mut req, d.cmd_slot).is_err() {
            self.regs.err = err::EFAULT;
            self.raise(0);
            return;
        }
        let hdr = CmdHdr::from_slice(&req[..16]).copied().unwrap_or_default();
        self.stats.commands += 1;
        let job = cmd::prepare(self, hdr.cmd, &req);
        self.cmd_pending = true;
        let weak = self.weak.clone();
        let epoch = self.epoch;
        let inline = self.env.backend.inline_control() && cmd::is_quick(hdr.cmd, &req);
        self.exec.run_on(
            inline,
            self.env.clone(),
            move |env: &Env| job.and_then(|work| work(env)),
            move |r| {
                let Some(core) = weak.upgrade() else { return };
                let mut core = core.borrow_mut();
                if core.epoch != epoch {
                    // A reset abandoned the command: nothing of it reaches the new state (an
                    // object its worker made in the backend went with the backend's reset, or
                    // goes with the next one).
                    return;
                }
                let result = match r {
                    Ok(Ok(finish)) => finish(&mut core),
                    Ok(Err(e)) => Err(e),
                    Err(panic) => Err(CmdError::Internal(panic)),
                };
                core.finish_command(hdr, result);
            },
        );
    }

    fn finish_command(&mut self, hdr: CmdHdr, result: cmd::CmdResult) {
        let ack = hdr.cmd | RESP_ACK;
        let (mut bytes, code) = match result {
            Ok(body) => (body, err::OK),
            Err(e) => {
                log::debug!("command {} failed: {e}", hdr.cmd);
                self.stats.command_errors += 1;
                (vec![0u8; std::mem::size_of::<RespHdr>()], e.code())
            }
        };
        if bytes.len() < std::mem::size_of::<RespHdr>() {
            bytes.resize(std::mem::size_of::<RespHdr>(), 0);
        }
        let rh = RespHdr {
            response: hdr.response,
            ack,
            err: code.min(255) as u8,
            reserved: [0; 3],
        };
        bytes[..16].copy_from_slice(rh.as_slice());
        if let Some(d) = self.dsr.as_ref() {
            if let Err(e) = self.mem.memory().write_slice(&bytes, d.resp_slot) {
                log::debug!("response slot unwritable: {e}");
            }
        }
        self.regs.err = code;
        self.cmd_pending = false;
        self.raise(0);
        self.drain_deferred();
    }

    // ---- doorbells -----------------------------------------------------------------------

    /// The user context that owns UAR page `page` (0 = the kernel).
    fn page_ctx(&self, page: u32) -> Option<u32> {
        if page == 0 {
            Some(0)
        } else {
            self.uar_owner.get(&page).copied()
        }
    }

    fn pd_ctx(&self, pd: u32) -> Option<u32> {
        self.pds.get(pd).map(|p| p.ctx)
    }

    fn doorbell(&mut self, off: u64, v: u32) {
        let page = (off >> 12) as u32;
        let reg = off & 0xfff;
        let handle = v & uar::HANDLE_MASK;
        let Some(ctx) = self.page_ctx(page) else {
            self.stats.bad_doorbells += 1;
            return;
        };
        if !self.active {
            self.stats.bad_doorbells += 1;
            return;
        }
        match reg {
            uar::QP => {
                let ok = self
                    .qps
                    .get(handle)
                    .is_some_and(|qp| self.pd_ctx(qp.pd) == Some(ctx));
                let flags = QpDoorbell::from_bits_truncate(v);
                if !ok || flags.is_empty() {
                    self.stats.bad_doorbells += 1;
                    return;
                }
                self.schedule_qp(handle);
            }
            uar::CQ => {
                let flags = CqDoorbell::from_bits_truncate(v);
                let Some(cq) = self.cqs.get_mut(handle).filter(|c| c.ctx == ctx) else {
                    self.stats.bad_doorbells += 1;
                    return;
                };
                if flags.contains(CqDoorbell::ARM) {
                    cq.ring.arm = Arm::Any;
                } else if flags.contains(CqDoorbell::ARM_SOL) && cq.ring.arm != Arm::Any {
                    cq.ring.arm = Arm::Solicited;
                }
                // POLL is a hint: completions are written as soon as they exist, so there is
                // nothing to flush.
            }
            uar::SRQ => {
                let ok = self
                    .srqs
                    .get(handle)
                    .is_some_and(|s| self.pd_ctx(s.pd) == Some(ctx));
                if !ok || !SrqDoorbell::from_bits_truncate(v).contains(SrqDoorbell::RECV) {
                    self.stats.bad_doorbells += 1;
                    return;
                }
                self.schedule_srq(handle);
            }
            _ => self.stats.bad_doorbells += 1,
        }
    }

    pub(crate) fn schedule_qp(&mut self, handle: u32) {
        let epoch = self.epoch;
        let Some(qp) = self.qps.get_mut(handle) else {
            return;
        };
        if qp.sched.busy {
            qp.sched.again = true;
            return;
        }
        qp.sched.busy = true;
        qp.sched.again = false;
        let gen = qp.gen;
        let shared = qp.shared.clone();
        let weak = self.weak.clone();
        self.exec.run_on(
            false,
            self.env.clone(),
            move |env: &Env| {
                let d = datapath::drain_qp(&shared, env);
                datapath::progress_here(env);
                d
            },
            move |r| {
                let Some(core) = weak.upgrade() else { return };
                let mut core = core.borrow_mut();
                if core.epoch != epoch {
                    return;
                }
                core.qp_drained(
                    handle,
                    gen,
                    r.unwrap_or(Drained {
                        ring_error: true,
                        ..Default::default()
                    }),
                );
            },
        );
    }

    fn qp_drained(&mut self, handle: u32, gen: u32, d: Drained) {
        let Some(qp) = self.qps.get_mut(handle).filter(|q| q.gen == gen) else {
            return;
        };
        qp.sched.busy = false;
        qp.sched.stalled = d.stalled;
        let again = std::mem::take(&mut qp.sched.again);
        if d.ring_error {
            // Broken ring indices or pages: the QP is unusable; tell the guest (QP_FATAL) and
            // move it to ERR so everything outstanding flushes.
            let b = qp.backend();
            let attrs = rdma_backend::QpAttrs {
                state: Some(QpState::Err),
                ..Default::default()
            };
            let _ = self.env.backend.modify_qp(b, &attrs);
            self.post_event(1, handle);
            return;
        }
        if again {
            self.schedule_qp(handle);
        }
    }

    pub(crate) fn schedule_srq(&mut self, handle: u32) {
        let epoch = self.epoch;
        let Some(srq) = self.srqs.get_mut(handle) else {
            return;
        };
        if srq.sched.busy {
            srq.sched.again = true;
            return;
        }
        srq.sched.busy = true;
        srq.sched.again = false;
        let gen = srq.gen;
        let shared = srq.shared.clone();
        let weak = self.weak.clone();
        self.exec.run_on(
            false,
            self.env.clone(),
            move |env: &Env| datapath::drain_srq(&shared, env),
            move |r| {
                let Some(core) = weak.upgrade() else { return };
                let mut core = core.borrow_mut();
                if core.epoch != epoch {
                    return;
                }
                let d = r.unwrap_or_default();
                let Some(srq) = core.srqs.get_mut(handle).filter(|s| s.gen == gen) else {
                    return;
                };
                srq.sched.busy = false;
                srq.sched.stalled = d.stalled;
                let again = std::mem::take(&mut srq.sched.again);
                if d.ring_error || d.malformed > 0 {
                    // SRQ_ERR: the guest's SRQ ring or one of its WQEs is unusable.
                    core.post_event(14, handle);
                }
                if d.ring_error {
                    return;
                }
                if again {
                    core.schedule_srq(handle);
                }
            },
        );
    }

    // ---- completions ---------------------------------------------------------------------

    fn on_completions(&mut self, batch: &[Completion]) {
        // Runs of work completions are written together (one notification per armed CQ per
        // run); events keep their place in the order.
        let mut i = 0;
        while i < batch.len() {
            match batch[i] {
                Completion::Event(ev) => {
                    self.backend_event(ev);
                    i += 1;
                }
                Completion::Wc(_) => {
                    let start = i;
                    while i < batch.len() && matches!(batch[i], Completion::Wc(_)) {
                        i += 1;
                    }
                    self.write_completions(batch[start..i].iter().filter_map(|c| match c {
                        Completion::Wc(w) => Some(w),
                        Completion::Event(_) => None,
                    }));
                }
            }
        }
    }

    fn live_qp(&self, cookie: u64) -> Option<u32> {
        let (handle, gen) = split_cookie(cookie);
        self.qps
            .get(handle)
            .filter(|q| q.gen == gen)
            .map(|_| handle)
    }

    fn write_completions<'a>(&mut self, wcs: impl Iterator<Item = &'a WorkCompletion>) {
        let mem = self.mem.memory();
        let mut notify: Vec<u32> = Vec::new();
        let mut overflowed: Vec<u32> = Vec::new();
        let mut restart: Vec<u32> = Vec::new();
        let mut written = std::mem::take(&mut self.cqs_written);
        written.clear();
        for wc in wcs {
            let Some(qh) = self.live_qp(wc.qp_cookie) else {
                self.stats.stale_completions += 1;
                continue;
            };
            let qp = self.qps.get(qh).expect("live QP");
            let cqh = if matches!(wc.opcode, WcOpcode::Recv | WcOpcode::RecvRdmaWithImm) {
                qp.recv_cq
            } else {
                qp.send_cq
            };
            if qp.sched.stalled {
                restart.push(qh);
            }
            let Some(cq) = self.cqs.get_mut(cqh) else {
                self.stats.stale_completions += 1;
                continue;
            };
            let cqe = cq::make_cqe(wc, qh, cq.ctx == 0);
            match cq.ring.push(&*mem, &cqe, cq::solicited_or_error(wc)) {
                Pushed::Written { notify: n } => {
                    self.stats.cqes += 1;
                    if written.last() != Some(&cqh) && !written.contains(&cqh) {
                        written.push(cqh);
                    }
                    if n && !notify.contains(&cqh) {
                        notify.push(cqh);
                    }
                }
                Pushed::Overflow => {
                    self.stats.cq_overflows += 1;
                    if !overflowed.contains(&cqh) {
                        overflowed.push(cqh);
                    }
                }
                Pushed::Dropped | Pushed::Broken => self.stats.cq_overflows += 1,
            }
        }
        // Each CQ's prod_tail once for the run, before any notification about it.
        for &cqh in &written {
            if let Some(cq) = self.cqs.get_mut(cqh) {
                if !cq.ring.publish(&*mem) {
                    self.stats.cq_overflows += 1;
                }
            }
        }
        self.cqs_written = written;
        drop(mem);
        let mut any = false;
        for cqh in notify {
            let mem = self.mem.memory();
            if let Some(d) = self.dsr.as_mut() {
                if matches!(d.post_cqne(&*mem, cqh), Ok(true)) {
                    any = true;
                }
            }
        }
        if any {
            self.raise(2);
        }
        for cqh in overflowed {
            // Report a CQ overflow once per CQ (CQ_ERR, info = CQ handle).
            if self.cqs.get(cqh).is_some() {
                self.post_event(0, cqh);
            }
        }
        restart.sort_unstable();
        restart.dedup();
        for qh in restart {
            if let Some(qp) = self.qps.get_mut(qh) {
                qp.sched.stalled = false;
            }
            self.schedule_qp(qh);
        }
    }

    fn backend_event(&mut self, ev: AsyncEvent) {
        let (ty, cookie, is_srq) = match ev {
            AsyncEvent::QpFatal { qp_cookie } => (event::QP_FATAL, qp_cookie, false),
            AsyncEvent::QpReqErr { qp_cookie } => (event::QP_REQ_ERR, qp_cookie, false),
            AsyncEvent::QpAccessErr { qp_cookie } => (event::QP_ACCESS_ERR, qp_cookie, false),
            AsyncEvent::QpLastWqeReached { qp_cookie } => {
                (event::QP_LAST_WQE_REACHED, qp_cookie, false)
            }
            AsyncEvent::SrqLimitReached { srq_cookie } => {
                (event::SRQ_LIMIT_REACHED, srq_cookie, true)
            }
        };
        let (handle, gen) = split_cookie(cookie);
        let live = if is_srq {
            self.srqs.get(handle).is_some_and(|s| s.gen == gen)
        } else {
            self.qps.get(handle).is_some_and(|q| q.gen == gen)
        };
        if live {
            self.post_event(ty, handle);
        }
    }
}

/// The object tables sized from the configuration.
pub(crate) struct Tables {
    ucs: HandleTable<Uc>,
    pds: HandleTable<Pd>,
    mrs: HandleTable<Mr>,
    cqs: HandleTable<Cq>,
    qps: HandleTable<Qp>,
    srqs: HandleTable<Srq>,
}

impl Tables {
    fn new(cfg: &DeviceConfig) -> Tables {
        Tables {
            // User contexts are non-zero so CQs with ctx 0 are the kernel's (spec §8).
            ucs: HandleTable::new(1, cfg.max_uar),
            pds: HandleTable::new(1, cfg.max_pd.saturating_add(1)),
            mrs: HandleTable::new(1, cfg.max_mr.saturating_add(1)),
            cqs: HandleTable::new(1, cfg.max_cq),
            // QP handles are never 0 and stay below max_qp (spec §0.5).
            qps: HandleTable::new(1, cfg.max_qp),
            srqs: HandleTable::new(1, cfg.max_srq),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdma_backend::emulated::{EmulatedBackend, Fabric};
    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    struct NoIrq;
    impl InterruptSink for NoIrq {
        fn trigger(&self, _vector: u16) {}
    }

    fn spawn() -> DeviceHandle {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let fabric = Fabric::new();
        DeviceHandle::spawn(
            DeviceConfig::default(),
            DeviceOptions::default(),
            GuestMemoryAtomic::new(mem),
            Arc::new(NoIrq),
            Box::new(move |mem: GuestMem, sink: Arc<dyn CompletionSink>| {
                EmulatedBackend::new(&fabric, mem, sink) as Arc<dyn Backend>
            }),
        )
        .unwrap()
    }

    #[test]
    fn uar_accesses_outside_the_bar_are_rejected() {
        let size = DeviceConfig::default().uar_bar_size();
        assert!(access_in_bar(0, 4, size));
        assert!(access_in_bar(size - 4, 4, size));
        assert!(!access_in_bar(size - 2, 4, size));
        assert!(!access_in_bar(size, 4, size));
        assert!(
            !access_in_bar(1 << 44, 4, size),
            "2^44 must not alias page 0"
        );
        assert!(!access_in_bar(u64::MAX - 1, 4, size));
    }

    #[test]
    fn posted_writes_meet_back_pressure_and_none_is_lost() {
        let d = spawn();
        // Doorbells on a UAR page no context owns: each one is counted as a bad doorbell.
        let n = 20 * MAX_POSTED as u64;
        for i in 0..n {
            d.write_posted(Region::Bar(2), (i % 8) * 4, &0x8000_0001u32.to_le_bytes())
                .unwrap();
            assert!(
                d.tx.len() <= MAX_POSTED,
                "queue {} at write {i}",
                d.tx.len()
            );
        }
        assert_eq!(d.stats().unwrap().bad_doorbells, n);
        d.shutdown();
    }

    #[test]
    fn zero_length_accesses_change_nothing() {
        let d = spawn();
        d.write(Region::Config, 4, &[0x06, 0x00]).unwrap();
        d.write(Region::Config, 4, &[]).unwrap();
        let mut b = [0u8; 2];
        d.read(Region::Config, 4, &mut b).unwrap();
        assert_eq!(b, [0x06, 0x00], "a zero-length write is not a write of 0");
        d.write32(Region::Bar(1), offset::IMR, 0x5).unwrap();
        d.read(Region::Bar(1), offset::IMR, &mut []).unwrap();
        assert_eq!(d.read32(Region::Bar(1), offset::IMR).unwrap(), 0x5);
        d.shutdown();
    }
}
