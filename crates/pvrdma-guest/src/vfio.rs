//! The harness over a vfio-user socket, as QEMU's `vfio-user-pci` would drive the device: guest
//! RAM is a shared memfd handed over with DMA_MAP, interrupts are eventfds set with SET_IRQS,
//! and every register access is a message (writes wait for their reply: non-posted).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pvrdma_dev::Region;
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::transport::{IrqRecorder, Transport};

/// Guest RAM of the vfio-user transport (a memfd; only touched pages cost memory).
pub const DEFAULT_RAM: usize = 256 << 20;

/// MSI-X vectors of the device.
const VECTORS: u16 = 3;

/// Errors of the vfio-user transport.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// The protocol failed.
    #[error("vfio-user")]
    Protocol(#[from] vfio_user::Error),
    /// A system call failed.
    #[error("{0}")]
    Io(String, #[source] io::Error),
    /// Guest RAM could not be mapped.
    #[error("cannot map guest RAM: {0}")]
    Mmap(String),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, VfioError>;

fn io_err(what: &str) -> impl FnOnce(io::Error) -> VfioError + '_ {
    move |e| VfioError::Io(what.to_string(), e)
}

/// A shared memory file (memfd) of `size` bytes.
fn memfd(size: usize) -> Result<File> {
    rdma_backend::shm::memfd(c"pvrdma-guest-ram", size as u64).map_err(io_err("memfd"))
}

/// The device behind a vfio-user socket.
pub struct VfioUser {
    client: Mutex<vfio_user::Client>,
    mem: GuestMemoryMmap,
    ram: File,
    irq: Arc<IrqRecorder>,
    eventfds: Vec<Arc<EventFd>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for VfioUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioUser").finish_non_exhaustive()
    }
}

impl VfioUser {
    /// Connects with [`DEFAULT_RAM`] of guest RAM.
    pub fn connect(path: &Path) -> Result<VfioUser> {
        Self::connect_with_ram(path, DEFAULT_RAM)
    }

    /// Connects, maps `ram` bytes of memfd guest RAM at iova 0 (DMA_MAP with the fd) and
    /// assigns an eventfd to each MSI-X vector (one SET_IRQS per vector, as QEMU does).
    pub fn connect_with_ram(path: &Path, ram: usize) -> Result<VfioUser> {
        let mut client = vfio_user::Client::new(path)?;
        let file = memfd(ram)?;
        let region = MmapRegion::<()>::from_file(
            FileOffset::new(file.try_clone().map_err(io_err("dup memfd"))?, 0),
            ram,
        )
        .map_err(|e| VfioError::Mmap(e.to_string()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| VfioError::Mmap("bad region".into()))?;
        let mem = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| VfioError::Mmap(e.to_string()))?;
        client.dma_map(0, 0, ram as u64, file.as_raw_fd())?;

        let irq = Arc::new(IrqRecorder::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut eventfds = Vec::new();
        let mut threads = Vec::new();
        for v in 0..VECTORS {
            let efd = Arc::new(EventFd::new(0).map_err(io_err("eventfd"))?);
            client.set_irqs(
                VFIO_PCI_MSIX_IRQ_INDEX,
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                u32::from(v),
                1,
                &[efd.as_raw_fd()],
            )?;
            let (e, r, s) = (efd.clone(), irq.clone(), stop.clone());
            let t = std::thread::Builder::new()
                .name(format!("vfio-irq{v}"))
                .spawn(move || {
                    while let Ok(n) = e.read() {
                        if s.load(Ordering::SeqCst) {
                            break;
                        }
                        // An eventfd adds up signals that arrive before it is read.
                        for _ in 0..n {
                            r.record(v);
                        }
                    }
                })
                .map_err(io_err("irq thread"))?;
            eventfds.push(efd);
            threads.push(t);
        }
        Ok(VfioUser {
            client: Mutex::new(client),
            mem,
            ram: file,
            irq,
            eventfds,
            stop,
            threads,
        })
    }

    /// The guest RAM file (what DMA_MAP sent).
    pub fn ram_file(&self) -> &File {
        &self.ram
    }

    /// Runs `f` on the protocol client (for messages the [`Transport`] trait has no verb for:
    /// DMA_MAP/UNMAP, SET_IRQS).
    pub fn with_client<R>(&self, f: impl FnOnce(&mut vfio_user::Client) -> R) -> R {
        let mut g = self.client.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    fn index(region: Region) -> u32 {
        match region {
            Region::Config => VFIO_PCI_CONFIG_REGION_INDEX,
            Region::Bar(b) => u32::from(b),
        }
    }
}

impl Drop for VfioUser {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for e in &self.eventfds {
            let _ = e.write(1);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = self.with_client(|c| c.shutdown());
    }
}

impl Transport for VfioUser {
    fn read(&self, region: Region, offset: u64, data: &mut [u8]) {
        let r = self.with_client(|c| c.region_read(Self::index(region), offset, data));
        if let Err(e) = r {
            log::warn!("region read failed: {e}");
            data.fill(0xff);
        }
    }

    fn write(&self, region: Region, offset: u64, data: &[u8]) {
        // region_write waits for the server's reply, which comes after the device handled it.
        let r = self.with_client(|c| c.region_write(Self::index(region), offset, data));
        if let Err(e) = r {
            log::warn!("region write failed: {e}");
        }
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
        if let Err(e) = self.with_client(|c| c.reset()) {
            log::warn!("DEVICE_RESET failed: {e}");
        }
    }
}

/// A `pvrdma serve` child process on one or more sockets in a fresh temporary directory.
#[derive(Debug)]
pub struct ServeProcess {
    child: Option<Child>,
    dir: PathBuf,
    sockets: Vec<PathBuf>,
}

impl ServeProcess {
    /// Starts `bin serve --socket DIR/pvrdma.sock ARGS…` and waits (up to 20 s) for the socket
    /// to accept connections. `bin` is the `pvrdma` binary (`env!("CARGO_BIN_EXE_pvrdma")` in
    /// the root package's tests).
    pub fn spawn(bin: &Path, args: &[&str]) -> io::Result<ServeProcess> {
        Self::start(bin, None, args, None)
    }

    /// [`ServeProcess::spawn`] with the server's log (its stderr) going to `log`.
    pub fn spawn_logging(bin: &Path, args: &[&str], log: File) -> io::Result<ServeProcess> {
        Self::start(bin, None, args, Some(log))
    }

    /// Starts one `pvrdma serve` with a device per MAC of `macs` (`--device
    /// socket=DIR/vmI.sock,mac=MAC` each: the VMs of one host), then ARGS, and waits for every
    /// socket. [`ServeProcess::sockets`] lists them in the order of `macs`.
    pub fn spawn_devices(bin: &Path, macs: &[[u8; 6]], args: &[&str]) -> io::Result<ServeProcess> {
        Self::start(bin, Some(macs), args, None)
    }

    fn start(
        bin: &Path,
        macs: Option<&[[u8; 6]]>,
        args: &[&str],
        log: Option<File>,
    ) -> io::Result<ServeProcess> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pvrdma-vfio-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve");
        let sockets = match macs {
            None => {
                let socket = dir.join("pvrdma.sock");
                cmd.arg("--socket").arg(&socket);
                vec![socket]
            }
            Some(macs) => macs
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let socket = dir.join(format!("vm{i}.sock"));
                    let mac: Vec<String> = m.iter().map(|b| format!("{b:02x}")).collect();
                    cmd.arg("--device").arg(format!(
                        "socket={},mac={}",
                        socket.display(),
                        mac.join(":")
                    ));
                    socket
                })
                .collect(),
        };
        cmd.args(args).stdin(Stdio::null());
        match log {
            Some(log) => {
                cmd.stderr(log);
            }
            // A test's output gets the server's warnings, not its daemon-level info lines.
            None if std::env::var_os("RUST_LOG").is_none() => {
                cmd.env("RUST_LOG", "warn");
            }
            None => {}
        }
        let child = cmd.spawn()?;
        let mut p = ServeProcess {
            child: Some(child),
            dir,
            sockets,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !p.sockets.iter().all(|s| s.exists()) {
            if let Some(st) = p.child_mut().try_wait()? {
                return Err(io::Error::other(format!("pvrdma serve exited: {st}")));
            }
            if Instant::now() > deadline {
                return Err(io::Error::other("pvrdma serve did not create its sockets"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(p)
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child is present until drop")
    }

    /// The (first) socket path.
    pub fn socket(&self) -> &Path {
        &self.sockets[0]
    }

    /// Every device's socket path.
    pub fn sockets(&self) -> &[PathBuf] {
        &self.sockets
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether the process has exited (and how).
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child_mut().try_wait()
    }

    /// Sends SIGTERM (with kill(1)) and waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> io::Result<ExitStatus> {
        let pid = self.pid().to_string();
        let st = Command::new("kill").args(["-TERM", &pid]).status()?;
        if !st.success() {
            return Err(io::Error::other(format!("kill -TERM {pid}: {st}")));
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child_mut().try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                return Err(io::Error::other("pvrdma serve did not exit after SIGTERM"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
