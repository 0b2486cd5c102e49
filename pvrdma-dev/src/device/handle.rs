//! The handles transports use to reach a device, and the main loop they drive.

use super::*;

/// Messages to the main loop.
#[derive(Debug)]
pub(super) enum Msg {
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
    Resources {
        reply: Sender<Resources>,
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

    /// Current counters (see [`DeviceStats`]). Answered by the main loop in order with the
    /// guest's accesses: everything an access returned before this call is counted.
    pub fn stats(&self) -> Result<DeviceStats, DeviceError> {
        let (reply, rx) = bounded(1);
        self.tx
            .send(Msg::Stats { reply })
            .map_err(|_| DeviceError::Stopped)?;
        rx.recv().map_err(|_| DeviceError::Stopped)
    }

    /// The live objects and their counters (see [`Resources`]), like `rdma resource show`.
    pub fn resources(&self) -> Result<Resources, DeviceError> {
        let (reply, rx) = bounded(1);
        self.tx
            .send(Msg::Resources { reply })
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
        mut cfg: DeviceConfig,
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
        // Fast registration only as far as the backend has it.
        cfg.fast_reg_pages = cfg.fast_reg_pages.min(backend.fast_reg_max_pages());
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

    /// Current counters (see [`DeviceStats`]).
    pub fn stats(&self) -> Result<DeviceStats, DeviceError> {
        let (reply, rx) = bounded(1);
        self.call(Msg::Stats { reply }, &rx)
    }

    /// The live objects and their counters (see [`Resources`]).
    pub fn resources(&self) -> Result<Resources, DeviceError> {
        let (reply, rx) = bounded(1);
        self.call(Msg::Resources { reply }, &rx)
    }
}

impl Drop for LocalDevice {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.finish();
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
        assert_eq!(d.stats().unwrap().refused.doorbells, n);
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
