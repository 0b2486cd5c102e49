//! The pvrdma device as a vfio-user server: the standalone backend process behind
//! `pvrdma serve`, which QEMU (>= 10.1, `-device vfio-user-pci`) connects to.
//!
//! # Threads
//! ```text
//!  server thread (protocol::serve_connection)      device main loop (pvrdma-dev, owns all state)
//!    REGION_READ/WRITE ── DeviceHandle::read/write ──▶ registers, doorbells, config space
//!    DEVICE_RESET ─────── DeviceHandle::reset ───────▶ back to power-on
//!    DMA_MAP/UNMAP ────── GuestMemoryAtomic::replace   (workers take snapshots)
//!    SET_IRQS ─────────── EventfdIrqs ◀─────────────── InterruptSink::trigger / set_intx
//! ```
//! A [`Server`] is one device's socket: its thread serves one client at a time, one message at
//! a time. Register and config writes are answered after the device handled them; doorbell
//! writes to the UAR pages are posted (answered at once, handled in order), except a CQ arm,
//! which must be in force before the guest polls again. When the client
//! disconnects, its device is shut down and the next client gets a fresh one (new device, empty
//! guest memory). A [`Host`] runs many such servers at once, one per VM, each on its own thread
//! with its own socket, MAC and limits, all on one emulated RDMA fabric: that is how the VMs of
//! one host reach each other.
//!
//! The protocol's server side is this crate's own ([`protocol`]): any byte sequence a client
//! sends costs it at most an error reply or its connection, and one message at most
//! [`protocol::MAX_MESSAGE`] bytes of buffer. Should the device code behind a connection panic
//! all the same, that connection ends (its device is shut down as at a disconnect); the socket
//! goes on accepting, and no other device notices.
//!
//! Guest mistakes (accesses outside a region, unknown regions or interrupt indexes) are logged
//! and answered, never turned into protocol errors. Client mistakes in DMA_MAP/UNMAP (overlaps,
//! splitting a map) are refused with an error reply.
#![warn(missing_docs)]
#![deny(unsafe_code)]

pub mod conn;
pub mod control;
pub mod dma;
pub mod host;
pub mod irq;
pub mod metrics;
// The `ByteValued` impls of the message structures.
#[allow(unsafe_code)]
pub mod protocol;
pub mod regions;
pub mod vmm;

use std::os::fd::OwnedFd;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pvrdma_dev::{DeviceConfig, DeviceHandle};
use rdma_backend::emulated::Fabric;

pub use conn::Connection;
pub use host::{default_max_memory, DeviceSpec, Host, HostLimits};

/// Errors of the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be created.
    #[error("cannot listen on {path}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The listening socket is unusable.
    #[error("the listening socket is unusable")]
    Socket(#[source] std::io::Error),
    /// The device configuration is invalid or its thread cannot start.
    #[error("cannot start the device")]
    Device(#[source] pvrdma_dev::DeviceError),
    /// A thread could not be started.
    #[error("cannot start the server thread")]
    Spawn(#[source] std::io::Error),
    /// The client broke the protocol; its connection was closed.
    #[error("client connection closed")]
    Protocol(#[source] protocol::Error),
    /// Signal handlers could not be installed.
    #[error("cannot install the SIGINT/SIGTERM handlers")]
    Signals(#[source] std::io::Error),
    /// The server thread panicked.
    #[error("the server thread panicked")]
    Panicked,
    /// A host's limits are out of range, or a set of devices exceeds them.
    #[error("{0}")]
    Limit(String),
    /// A device cannot be added to a host (duplicate socket, MAC or name; too many devices).
    #[error("cannot add device `{name}`: {why}")]
    Refused {
        /// The device's name.
        name: String,
        /// Why.
        why: String,
    },
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// An error and its sources on one line, `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Where to listen and what device to serve.
#[derive(Debug)]
pub struct ServeOptions {
    /// The device's name in logs and thread names (each client's device is `NAME.N`).
    pub name: String,
    /// Socket path to create (must not exist; removed when the server is dropped). Ignored
    /// when `listen_fd` is set.
    pub socket: PathBuf,
    /// An already listening socket (e.g. inherited through `LISTEN_FDS`).
    pub listen_fd: Option<OwnedFd>,
    /// The device each client gets.
    pub device: DeviceConfig,
    /// The RDMA backend of each device.
    pub backend: BackendChoice,
}

/// Which RDMA backend the served devices use.
#[derive(Debug, Clone, Default)]
pub enum BackendChoice {
    /// The software fabric shared by the devices of this process.
    #[default]
    Emulated,
    /// A host RDMA device through libibverbs.
    RdmaCore(rdma_backend::rdma_core::Config),
}

impl BackendChoice {
    /// `emulated`, or `rdma-core:IBDEV:PORT`.
    pub fn describe(&self) -> String {
        match self {
            BackendChoice::Emulated => "emulated".into(),
            BackendChoice::RdmaCore(c) => format!("rdma-core:{}:{}", c.ibdev, c.port),
        }
    }
}

impl ServeOptions {
    /// A default device on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> ServeOptions {
        ServeOptions {
            name: "pvrdma".into(),
            socket: socket.into(),
            listen_fd: None,
            device: DeviceConfig::default(),
            backend: BackendChoice::default(),
        }
    }
}

/// The inherited listening socket of socket activation (`LISTEN_PID` = this process,
/// `LISTEN_FDS` >= 1: fd 3), if any. The variables are removed so children do not see them.
#[allow(unsafe_code)] // the inherited descriptor 3 (socket activation)
pub fn listen_fd_from_env() -> Option<OwnedFd> {
    use std::os::fd::FromRawFd;
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let n: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    if pid != std::process::id() || n < 1 {
        return None;
    }
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    // SAFETY: by the socket-activation protocol fd 3 is an open socket handed to this process
    // (LISTEN_PID matched); nothing else in the process owns it, and the variables are removed
    // above so it is taken only once.
    Some(unsafe { OwnedFd::from_raw_fd(3) })
}

#[derive(Debug, Clone)]
enum Wake {
    Path(PathBuf),
    Addr(SocketAddr),
}

/// Binds a listening socket at `path` so that the path appears only once the socket listens:
/// bound and listening under a temporary name in the same directory, then renamed. A client
/// that sees the path never gets ECONNREFUSED. With `mode` (0o600: only its owner may connect),
/// the temporary name is inside a new directory only the owner can enter, so nobody else can
/// connect before the socket has those permissions.
pub(crate) fn bind_atomically(path: &Path, mode: Option<u32>) -> Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let listen_err = |source| Error::Listen {
        path: path.to_path_buf(),
        source,
    };
    if path.exists() {
        return Err(listen_err(std::io::Error::from(
            std::io::ErrorKind::AlreadyExists,
        )));
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let (tmp, dir) = match mode {
        None => (tmp, None),
        Some(_) => {
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&tmp)
                .map_err(listen_err)?;
            (tmp.join("s"), Some(tmp))
        }
    };
    let cleanup = || {
        let _ = std::fs::remove_file(&tmp);
        if let Some(d) = &dir {
            let _ = std::fs::remove_dir(d);
        }
    };
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(|e| {
        cleanup();
        listen_err(e)
    })?;
    let placed = mode
        .map_or(Ok(()), |m| {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(m))
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    cleanup();
    placed.map_err(listen_err)?;
    Ok(listener)
}

/// Asks a running server to stop.
#[derive(Debug, Clone)]
pub struct Stopper {
    stop: Arc<AtomicBool>,
    /// Where to connect to wake the server's accept().
    wake: Wake,
    current: Arc<Mutex<Option<DeviceHandle>>>,
    /// The connected client's stream (a clone), to end the connection from outside.
    stream: Arc<Mutex<Option<UnixStream>>>,
    /// Clients accepted so far.
    clients: Arc<AtomicU64>,
}

impl Stopper {
    /// Stops accepting clients. The server thread returns once no client is connected (a
    /// connected client keeps it in its message loop until it disconnects).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept() with a connection that closes at once.
        let r = match &self.wake {
            Wake::Path(p) => UnixStream::connect(p),
            Wake::Addr(a) => UnixStream::connect_addr(a),
        };
        if let Err(e) = r {
            log::debug!("cannot wake the server: {e}");
        }
    }

    /// Ends the connected client's connection, if any (the server thread then sees it end and
    /// shuts its device down as at a disconnect).
    pub fn disconnect(&self) {
        if let Some(s) = lock(&self.stream).as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Whether stop was asked.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The device of the connected client, or of the client the server waits for (each device
    /// is started before its client is accepted).
    pub fn current_device(&self) -> Option<DeviceHandle> {
        self.current.lock().ok().and_then(|g| g.clone())
    }

    /// Whether a client is connected now.
    pub fn connected(&self) -> bool {
        lock(&self.stream).is_some()
    }

    /// Clients accepted so far.
    pub fn clients(&self) -> u64 {
        self.clients.load(Ordering::Relaxed)
    }
}

/// A bound server, not yet running.
pub struct Server {
    listener: UnixListener,
    regions: Vec<vfio_user::ServerRegion>,
    irqs: Vec<vfio_user::IrqInfo>,
    path: Option<PathBuf>,
    name: String,
    /// The configuration of the next client's device (a host may change it meanwhile).
    device: Arc<Mutex<DeviceConfig>>,
    backend: BackendChoice,
    fabric: Arc<Fabric>,
    stopper: Stopper,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("name", &self.name)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Listens on `opts.socket` (or `opts.listen_fd`), with a fabric of its own.
    pub fn bind(opts: ServeOptions) -> Result<Server> {
        Server::bind_on(opts, Fabric::new())
    }

    /// Listens on `opts.socket` (or `opts.listen_fd`); each client's device joins `fabric`.
    pub fn bind_on(opts: ServeOptions, fabric: Arc<Fabric>) -> Result<Server> {
        opts.device
            .validate()
            .map_err(|e| Error::Device(pvrdma_dev::DeviceError::Config(e)))?;
        let regions = regions::server_regions(opts.device.max_uar);
        let irqs = regions::server_irqs();
        let (listener, path, addr) = match opts.listen_fd {
            Some(fd) => {
                let listener = UnixListener::from(fd);
                let addr = listener.local_addr().map_err(Error::Socket)?;
                (listener, None, Wake::Addr(addr))
            }
            None => {
                let listener = bind_atomically(&opts.socket, None)?;
                let wake = Wake::Path(opts.socket.clone());
                (listener, Some(opts.socket), wake)
            }
        };
        Ok(Server {
            listener,
            regions,
            irqs,
            path,
            name: opts.name,
            device: Arc::new(Mutex::new(opts.device)),
            backend: opts.backend,
            fabric,
            stopper: Stopper {
                stop: Arc::new(AtomicBool::new(false)),
                wake: addr,
                current: Arc::new(Mutex::new(None)),
                stream: Arc::new(Mutex::new(None)),
                clients: Arc::new(AtomicU64::new(0)),
            },
        })
    }

    /// A handle that stops [`Server::run`].
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// The socket path, if the server created one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the configuration of the next client's device is kept.
    fn config(&self) -> Arc<Mutex<DeviceConfig>> {
        self.device.clone()
    }

    /// Serves clients one after the other, each with a fresh device, until stopped.
    pub fn run(&self) -> Result<()> {
        let name = &self.name;
        let layout = protocol::DeviceLayout {
            regions: &self.regions,
            irqs: &self.irqs,
            resettable: true,
        };
        // A client may connect and go in a loop: its lines share one budget.
        let mut lines = pvrdma_dev::ratelog::Limiter::default();
        while !self.stopper.stopping() {
            let n = self.stopper.clients.load(Ordering::Relaxed);
            let cfg = lock(&self.device).clone();
            let mut conn =
                Connection::new(&cfg, format!("{name}.{n}"), &self.fabric, &self.backend)
                    .map_err(Error::Device)?;
            *lock(&self.stopper.current) = Some(conn.device().clone());
            let accepted = self.listener.accept();
            let r = match accepted {
                Err(e) => Err(Error::Socket(e)),
                Ok(_) if self.stopper.stopping() => Ok(()),
                Ok((mut stream, _)) => {
                    self.stopper.clients.fetch_add(1, Ordering::Relaxed);
                    pvrdma_dev::limited!(log::Level::Info, lines, "{name}: client {n} connected");
                    *lock(&self.stopper.stream) = stream.try_clone().ok();
                    // The device code behind the connection must not take the process down
                    // with it: a panic ends this client's connection (the stream is dropped on
                    // the way out), never another device's.
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        protocol::serve_connection(&mut stream, &mut conn, layout)
                    }));
                    *lock(&self.stopper.stream) = None;
                    match r {
                        Ok(r) => r.map_err(Error::Protocol),
                        Err(_) => {
                            pvrdma_dev::limited!(
                                log::Level::Error,
                                lines,
                                "{name}: the device panicked on a client message"
                            );
                            Ok(())
                        }
                    }
                }
            };
            *lock(&self.stopper.current) = None;
            conn.shutdown();
            match r {
                Ok(()) if self.stopper.stopping() => log::debug!("{name}: woken to stop"),
                Ok(()) => {
                    pvrdma_dev::limited!(log::Level::Info, lines, "{name}: client disconnected")
                }
                Err(e) if self.stopper.stopping() => log::debug!("{name}: stopping: {e}"),
                Err(Error::Socket(e)) => {
                    log::error!("{name}: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => pvrdma_dev::limited!(
                    log::Level::Warn,
                    lines,
                    "{name}: {e}: {}",
                    std::error::Error::source(&e).map_or(String::new(), |s| s.to_string())
                ),
            }
        }
        log::info!("{name}: server stopped");
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A server running on its own thread.
#[derive(Debug)]
pub struct RunningServer {
    stopper: Stopper,
    path: Option<PathBuf>,
    config: Arc<Mutex<DeviceConfig>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl RunningServer {
    /// Binds and starts serving on a thread named `vfio-user:NAME`, with a fabric of its own.
    pub fn spawn(opts: ServeOptions) -> Result<RunningServer> {
        RunningServer::spawn_on(opts, Fabric::new())
    }

    /// Binds and starts serving on a thread named `vfio-user:NAME`; each client's device joins
    /// `fabric`.
    pub fn spawn_on(opts: ServeOptions, fabric: Arc<Fabric>) -> Result<RunningServer> {
        let server = Server::bind_on(opts, fabric)?;
        let stopper = server.stopper();
        let path = server.path().map(Path::to_path_buf);
        let config = server.config();
        let thread = std::thread::Builder::new()
            .name(format!("vfio-user:{}", server.name()))
            .spawn(move || server.run())
            .map_err(Error::Spawn)?;
        Ok(RunningServer {
            stopper,
            path,
            config,
            thread: Some(thread),
        })
    }

    /// Replaces the configuration the next client's device gets (a connected client keeps the
    /// device it has).
    pub fn set_config(&self, cfg: DeviceConfig) {
        *lock(&self.config) = cfg;
    }

    /// The stop handle.
    pub fn stopper(&self) -> &Stopper {
        &self.stopper
    }

    /// Whether the server thread has ended (by itself: an error).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the server. If a client is still connected after `grace`, its device is shut down
    /// and the server thread is left to end when that client disconnects; the socket file is
    /// removed either way.
    pub fn stop(mut self, grace: Duration) -> Result<()> {
        self.stopper.stop();
        let deadline = Instant::now() + grace;
        let t = self.thread.take();
        while t.as_ref().is_some_and(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let r = match t {
            Some(t) if t.is_finished() => t.join().map_err(|_| Error::Panicked)?,
            Some(t) => {
                log::warn!("a client is still connected: closing its connection");
                self.stopper.disconnect();
                // The server thread sees the connection end, shuts its device down and returns.
                let deadline = Instant::now() + Duration::from_secs(5);
                while !t.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if t.is_finished() {
                    t.join().map_err(|_| Error::Panicked)?
                } else {
                    if let Some(d) = self.stopper.current_device() {
                        d.shutdown();
                    }
                    Ok(())
                }
            }
            None => Ok(()),
        };
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
        r
    }
}

/// Serves one device until SIGINT or SIGTERM (then returns `Ok`), or until its server fails.
pub fn serve(opts: ServeOptions) -> Result<()> {
    let host = Host::new(opts.backend.clone(), HostLimits::default())?;
    host.add(DeviceSpec {
        name: opts.name,
        socket: opts.socket,
        listen_fd: opts.listen_fd,
        device: opts.device,
    })?;
    serve_host(
        &host,
        None::<fn() -> std::result::Result<Vec<DeviceSpec>, String>>,
    )
}

/// Serves `host`'s devices until SIGINT or SIGTERM (then returns `Ok`). On SIGHUP, `reload`
/// (if given) says which devices the host should now serve, and [`Host::apply`] makes it so; a
/// reload that fails changes nothing. A device whose server fails is taken out and logged; the
/// call fails only if that leaves the host with no device.
pub fn serve_host<R>(host: &Host, mut reload: Option<R>) -> Result<()>
where
    R: FnMut() -> std::result::Result<Vec<DeviceSpec>, String>,
{
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(Error::Signals)?;
    let (tx, rx) = std::sync::mpsc::channel::<i32>();
    let sig_handle = signals.handle();
    let sig_thread = std::thread::Builder::new()
        .name("pvrdma-signals".into())
        .spawn(move || {
            for s in signals.forever() {
                if tx.send(s).is_err() {
                    break;
                }
            }
        })
        .map_err(Error::Spawn)?;
    let mut result = Ok(());
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(SIGHUP) => match reload.as_mut().map(|r| r()) {
                None => log::info!("SIGHUP: no configuration file to reload"),
                Some(Err(e)) => log::error!("reload: {e}; nothing changed"),
                Some(Ok(specs)) => match host.apply(specs) {
                    Ok(c) => log::info!(
                        "reload: added {:?}, removed {:?}, updated {:?}",
                        c.added,
                        c.removed,
                        c.updated
                    ),
                    Err(e) => log::error!("reload: {e}"),
                },
            },
            Ok(sig) => {
                log::info!("signal {sig}: stopping");
                break;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let failed = host.reap();
                for (name, e) in &failed {
                    log::error!("device {name} failed and is no longer served: {e}");
                }
                if host.devices().is_empty() {
                    if let Some((_, e)) = failed.into_iter().next() {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
    }
    sig_handle.close();
    let _ = sig_thread.join();
    host.stop(Duration::from_millis(500));
    result
}
