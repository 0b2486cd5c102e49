//! How the harness reaches a device: config space, BARs, guest RAM and interrupts.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use pvrdma_dev::{
    DeviceConfig, DeviceError, DeviceHandle, DeviceOptions, DeviceStats, InterruptSink, Region,
};
use rdma_backend::emulated::{EmulatedBackend, Fabric};
use rdma_backend::{Backend, CompletionSink, GuestMem};
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

/// A way to talk to a pvrdma device, as a guest would: register accesses and interrupts. Guest
/// RAM is shared with the device and reached through [`Transport::mem`].
pub trait Transport: Send + Sync {
    /// Reads `data.len()` bytes (1..=8) of a region.
    fn read(&self, region: Region, offset: u64, data: &mut [u8]);
    /// Writes `data` (1..=8 bytes); returns once the device has handled it (non-posted).
    fn write(&self, region: Region, offset: u64, data: &[u8]);
    /// Writes `data` without waiting for the device when the transport can (a posted MMIO
    /// write, like the driver's `writel`); later accesses are still ordered after it.
    fn write_posted(&self, region: Region, offset: u64, data: &[u8]) {
        self.write(region, offset, data)
    }
    /// Guest RAM.
    fn mem(&self) -> &GuestMemoryMmap;
    /// Interrupts seen so far on `vector`.
    fn irq_count(&self, vector: u16) -> u64;
    /// Waits until more than `seen` interrupts arrived on `vector`; false on timeout.
    fn wait_irq(&self, vector: u16, seen: u64, timeout: Duration) -> bool;
    /// Function-level reset (vfio-user DEVICE_RESET).
    fn reset(&self);
    /// Called while the harness waits on guest memory (a CQ poll loop) for up to `max`: a
    /// device that runs on the caller's thread ([`Local`]) makes progress here; others need
    /// nothing and the default just yields.
    fn idle(&self, max: Duration) {
        if max >= Duration::from_micros(50) {
            std::thread::sleep(Duration::from_micros(50));
        } else {
            std::thread::yield_now();
        }
    }
}

/// Counts interrupts per vector; a transport's interrupt sink.
#[derive(Debug, Default)]
pub struct IrqRecorder {
    counts: Mutex<[u64; 3]>,
    intx: Mutex<bool>,
    cv: Condvar,
}

impl IrqRecorder {
    /// Interrupts seen on `vector`.
    pub fn count(&self, vector: u16) -> u64 {
        self.counts
            .lock()
            .map(|c| c.get(usize::from(vector)).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Waits for the count of `vector` to exceed `seen`.
    pub fn wait(&self, vector: u16, seen: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let Ok(mut g) = self.counts.lock() else {
            return false;
        };
        loop {
            if g.get(usize::from(vector)).copied().unwrap_or(0) > seen {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            match self.cv.wait_timeout(g, deadline - now) {
                Ok((ng, _)) => g = ng,
                Err(_) => return false,
            }
        }
    }

    /// Records one interrupt on `vector`.
    pub fn record(&self, vector: u16) {
        if let Ok(mut g) = self.counts.lock() {
            if let Some(c) = g.get_mut(usize::from(vector)) {
                *c += 1;
            }
        }
        self.cv.notify_all();
    }

    /// INTx line level.
    pub fn intx(&self) -> bool {
        self.intx.lock().map(|g| *g).unwrap_or(false)
    }
}

impl InterruptSink for IrqRecorder {
    fn trigger(&self, vector: u16) {
        self.record(vector);
    }
    fn set_intx(&self, asserted: bool) {
        if let Ok(mut g) = self.intx.lock() {
            *g = asserted;
        }
        if asserted {
            self.record(0);
        }
    }
}

/// The device in this process, on its own main-loop thread, with guest RAM in an anonymous
/// mapping at guest-physical address 0.
pub struct InProcess {
    device: DeviceHandle,
    mem: GuestMemoryMmap,
    irq: Arc<IrqRecorder>,
}

impl std::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcess").finish_non_exhaustive()
    }
}

/// Default guest RAM of the in-process transport (mapped lazily; only touched pages cost memory).
pub const DEFAULT_RAM: usize = 256 << 20;

impl InProcess {
    /// A device with the emulated backend on `fabric`.
    pub fn new(cfg: DeviceConfig, ram: usize, fabric: &Arc<Fabric>) -> InProcess {
        let fabric = fabric.clone();
        let mac = cfg.mac;
        Self::with_backend(
            cfg,
            ram,
            Box::new(move |mem: GuestMem, sink: Arc<dyn CompletionSink>| {
                EmulatedBackend::for_device(&fabric, mem, sink, mac) as Arc<dyn Backend>
            }),
        )
    }

    /// A device with the backend `factory` builds.
    pub fn with_backend(
        cfg: DeviceConfig,
        ram: usize,
        factory: pvrdma_dev::BackendFactory,
    ) -> InProcess {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), ram)])
            .expect("anonymous guest RAM mapping");
        let irq = Arc::new(IrqRecorder::default());
        let device = DeviceHandle::spawn(
            cfg,
            DeviceOptions::default(),
            GuestMemoryAtomic::new(mem.clone()),
            irq.clone(),
            factory,
        )
        .expect("device starts");
        InProcess { device, mem, irq }
    }

    /// The device handle.
    pub fn device(&self) -> &DeviceHandle {
        &self.device
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.device.shutdown();
    }
}

impl Transport for InProcess {
    fn read(&self, region: Region, offset: u64, data: &mut [u8]) {
        if self.device.read(region, offset, data).is_err() {
            data.fill(0xff);
        }
    }
    fn write(&self, region: Region, offset: u64, data: &[u8]) {
        let _ = self.device.write(region, offset, data);
    }
    fn write_posted(&self, region: Region, offset: u64, data: &[u8]) {
        let _ = self.device.write_posted(region, offset, data);
    }
    fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }
    fn irq_count(&self, vector: u16) -> u64 {
        self.irq.count(vector)
    }
    fn wait_irq(&self, vector: u16, seen: u64, timeout: Duration) -> bool {
        self.irq.wait(vector, seen, timeout)
    }
    fn reset(&self) {
        let _ = self.device.reset();
    }
}

thread_local! {
    /// The [`Local`] devices of this thread, by id.
    static LOCAL_DEVICES: std::cell::RefCell<std::collections::HashMap<u64, pvrdma_dev::LocalDevice>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

static NEXT_LOCAL_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The device on the calling thread ([`pvrdma_dev::LocalDevice`]): no device thread, no worker
/// threads, deterministic. The device makes progress only inside this transport's calls (a
/// register access, [`Transport::wait_irq`], [`Local::poll`]), so a harness that busy-waits on
/// guest memory alone must call [`Local::poll`]. The device lives in a thread-local slot of the
/// thread that created it; used from any other thread it reads as all-ones and ignores writes.
/// For fuzzing and deterministic tests.
pub struct Local {
    id: u64,
    mem: GuestMemoryMmap,
    irq: Arc<IrqRecorder>,
}

impl std::fmt::Debug for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Local")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Local {
    /// A device with the emulated backend on `fabric`, `ram` bytes of anonymous guest RAM at 0.
    pub fn new(cfg: DeviceConfig, ram: usize, fabric: &Arc<Fabric>) -> Result<Local, DeviceError> {
        let fabric = fabric.clone();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), ram)])
            .expect("anonymous guest RAM mapping");
        let irq = Arc::new(IrqRecorder::default());
        let dev = pvrdma_dev::LocalDevice::new(
            cfg,
            DeviceOptions::default(),
            GuestMemoryAtomic::new(mem.clone()),
            irq.clone(),
            Box::new(move |mem: GuestMem, sink: Arc<dyn CompletionSink>| {
                EmulatedBackend::new(&fabric, mem, sink) as Arc<dyn Backend>
            }),
        )?;
        let id = NEXT_LOCAL_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        LOCAL_DEVICES.with(|m| m.borrow_mut().insert(id, dev));
        Ok(Local { id, mem, irq })
    }

    /// Runs `f` on the device; `None` on another thread than the creator's.
    pub fn with_device<R>(&self, f: impl FnOnce(&pvrdma_dev::LocalDevice) -> R) -> Option<R> {
        LOCAL_DEVICES
            .try_with(|m| m.borrow().get(&self.id).map(f))
            .ok()
            .flatten()
    }

    /// Lets the device run what is ready (completions, CQEs, interrupts) without blocking.
    pub fn poll(&self) -> usize {
        self.with_device(|d| d.poll()).unwrap_or(0)
    }

    /// The device's counters.
    pub fn stats(&self) -> Result<DeviceStats, DeviceError> {
        self.with_device(|d| d.stats())
            .unwrap_or(Err(DeviceError::Stopped))
    }

    /// The device's live objects and their counters.
    pub fn resources(&self) -> Result<pvrdma_dev::Resources, DeviceError> {
        self.with_device(|d| d.resources())
            .unwrap_or(Err(DeviceError::Stopped))
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        // Take the device out first: its teardown must not run under the map's borrow.
        let dev = LOCAL_DEVICES
            .try_with(|m| m.borrow_mut().remove(&self.id))
            .ok()
            .flatten();
        drop(dev);
    }
}

impl Transport for Local {
    fn read(&self, region: Region, offset: u64, data: &mut [u8]) {
        if !matches!(
            self.with_device(|d| d.read(region, offset, data)),
            Some(Ok(()))
        ) {
            data.fill(0xff);
        }
    }
    fn write(&self, region: Region, offset: u64, data: &[u8]) {
        let _ = self.with_device(|d| d.write(region, offset, data));
    }
    fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }
    fn irq_count(&self, vector: u16) -> u64 {
        self.poll();
        self.irq.count(vector)
    }
    fn wait_irq(&self, vector: u16, seen: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.irq.count(vector) > seen {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            if self.with_device(|d| d.iterate(deadline - now)).is_none() {
                return self.irq.wait(vector, seen, deadline - now);
            }
        }
    }
    fn reset(&self) {
        let _ = self.with_device(|d| d.reset());
    }
    fn idle(&self, max: Duration) {
        if self.with_device(|d| d.iterate(max)).is_none() {
            std::thread::sleep(max);
        }
    }
}
