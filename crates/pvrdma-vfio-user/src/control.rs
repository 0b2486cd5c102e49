//! The control socket of `pvrdma serve`: a UNIX socket only its owner may connect to (mode
//! 0600, placed without a moment at other permissions), speaking JSON lines.
//!
//! Each request is one JSON object on one line; each gets one JSON object on one line back,
//! `{"ok":true,"result":…}` or `{"ok":false,"error":"why"}`. A connection may send any number
//! of requests. The commands (`"command"` field):
//!
//! | command     | fields                      | result                                        |
//! |-------------|-----------------------------|-----------------------------------------------|
//! | `version`   |                             | `{"name":"pvrdma","version":"…"}`             |
//! | `list`      |                             | every device's [`DeviceStatus`]               |
//! | `stats`     | `device`                    | the device's counters ([`pvrdma_dev::DeviceStats`]) |
//! | `resources` | `device`                    | its PDs, CQs, MRs, QPs, SRQs and GIDs         |
//! | `add`       | `device`: `{key: value, …}` | the new device's [`DeviceStatus`]             |
//! | `remove`    | `device`                    | `null`                                        |
//!
//! `add` takes the keys of `pvrdma serve --device` (`socket`, `mac`, `name`, `max-qp`, …; values
//! strings or integers); how they become a device is the caller's ([`DeviceParser`]), so that
//! the command line, the configuration file and this socket read them alike.
//!
//! A request line longer than [`MAX_REQUEST`] bytes, a line that is not JSON, an unknown
//! command or field: an error reply (the connection goes on, except after an over-long line).
//! At most [`MAX_CONNECTIONS`] connections at once; one idle for [`IDLE`] is closed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::host::{DeviceStatus, Host};
use crate::{lock, DeviceSpec, Error, Result};

/// The longest request line, in bytes.
pub const MAX_REQUEST: usize = 64 << 10;
/// Connections served at once; more are told so and closed.
pub const MAX_CONNECTIONS: usize = 8;
/// A connection with no request for this long is closed.
pub const IDLE: Duration = Duration::from_secs(60);

/// Turns the key/value pairs of an `add` request into a device (the caller's defaults under
/// them), or says why not.
pub type DeviceParser =
    dyn Fn(Vec<(String, String)>) -> std::result::Result<DeviceSpec, String> + Send + Sync;

/// One request.
#[derive(Debug, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
enum Request {
    // Braces, so that unknown fields are refused as they are for the other commands.
    Version {},
    List {},
    Stats {
        device: String,
    },
    Resources {
        device: String,
    },
    Add {
        device: serde_json::Map<String, Value>,
    },
    Remove {
        device: String,
    },
}

/// What a request failed with; the reply's `error`.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("bad request: {0}")]
    Bad(String),
    #[error("no device `{0}`")]
    NoDevice(String),
    #[error("device `{0}` is not running")]
    Stopped(String),
    #[error("this process does not add devices at run time")]
    NoAdd,
    #[error("{0}")]
    Refused(String),
}

struct Shared {
    host: Arc<Host>,
    parser: Option<Arc<DeviceParser>>,
    stop: AtomicBool,
    /// Written at stop: wakes the accept loop whatever became of the socket file.
    wake: EventFd,
    connections: AtomicUsize,
    /// Clones of the open connections, to end them at stop.
    streams: Mutex<Vec<(u64, UnixStream)>>,
}

/// A running control socket; stopped (and its file removed) on [`ControlServer::stop`] or drop.
pub struct ControlServer {
    shared: Arc<Shared>,
    path: PathBuf,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ControlServer {
    /// Listens on `path` (mode 0600; it must not exist) and answers requests about `host` on a
    /// thread of its own. Without `parser`, `add` is refused.
    pub fn spawn(
        path: &Path,
        host: Arc<Host>,
        parser: Option<Arc<DeviceParser>>,
    ) -> Result<ControlServer> {
        let listener = crate::bind_atomically(path, Some(0o600))?;
        listener.set_nonblocking(true).map_err(Error::Socket)?;
        let shared = Arc::new(Shared {
            host,
            parser,
            stop: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Socket)?,
            connections: AtomicUsize::new(0),
            streams: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("pvrdma-control".into())
            .spawn(move || accept_loop(&listener, &s))
            .map_err(Error::Spawn)?;
        log::info!("control socket on {}", path.display());
        Ok(ControlServer {
            shared,
            path: path.to_path_buf(),
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, ends the open connections and removes the socket file.
    pub fn stop(&mut self) {
        let Some(t) = self.thread.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.shared.wake.write(1) {
            log::warn!("control socket: cannot wake its thread: {e}");
        }
        let _ = t.join();
        for (_, s) in lock(&self.shared.streams).drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits for a connection or the stop event; `None` at stop or when the wait fails.
fn next_connection(listener: &UnixListener, epoll: &Epoll, shared: &Shared) -> Option<UnixStream> {
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return None;
        }
        match listener.accept() {
            Ok((s, _)) => {
                // Accepted sockets do not inherit the listener's O_NONBLOCK on Linux; be sure.
                if s.set_nonblocking(false).is_ok() {
                    return Some(s);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut events = [EpollEvent::default(); 2];
                if let Err(e) = epoll.wait(-1, &mut events) {
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        log::error!("control socket: epoll_wait: {e}");
                        return None;
                    }
                }
            }
            Err(e) => {
                log::warn!("control socket: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn accept_loop(listener: &UnixListener, shared: &Arc<Shared>) {
    let epoll = Epoll::new().and_then(|ep| {
        ep.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )?;
        ep.ctl(
            ControlOperation::Add,
            shared.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 1),
        )?;
        Ok(ep)
    });
    let epoll = match epoll {
        Ok(ep) => ep,
        Err(e) => {
            log::error!("control socket: epoll: {e}; not serving");
            return;
        }
    };
    let mut next_id = 0u64;
    while let Some(mut stream) = next_connection(listener, &epoll, shared) {
        if shared.connections.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            let _ = writeln!(
                stream,
                "{}",
                reply(Err(RequestError::Refused(format!(
                    "{MAX_CONNECTIONS} control connections are open already"
                ))))
            );
            continue;
        }
        next_id += 1;
        let id = next_id;
        if let Ok(c) = stream.try_clone() {
            lock(&shared.streams).push((id, c));
        }
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("pvrdma-control-conn".into())
            .spawn(move || {
                serve_connection(stream, &s);
                lock(&s.streams).retain(|(i, _)| *i != id);
                s.connections.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            log::warn!("control socket: cannot start a connection thread: {e}");
            lock(&shared.streams).retain(|(i, _)| *i != id);
            shared.connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn serve_connection(stream: UnixStream, shared: &Shared) {
    if stream.set_read_timeout(Some(IDLE)).is_err() {
        return;
    }
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut input = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        // One byte past the limit tells an over-long line from one of exactly the limit.
        let limit = (MAX_REQUEST + 1) as u64;
        match (&mut input).take(limit).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let complete = line.last() == Some(&b'\n');
        if !complete && line.len() > MAX_REQUEST {
            let _ = writeln!(
                out,
                "{}",
                reply(Err(RequestError::Bad(format!(
                    "a request is one line of at most {MAX_REQUEST} bytes"
                ))))
            );
            return;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let answer = reply(handle(&line, shared));
        if writeln!(out, "{answer}").is_err() {
            return;
        }
    }
}

fn reply(r: std::result::Result<Value, RequestError>) -> Value {
    match r {
        Ok(v) => json!({"ok": true, "result": v}),
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    }
}

fn handle(line: &[u8], shared: &Shared) -> std::result::Result<Value, RequestError> {
    let req: Request =
        serde_json::from_slice(line).map_err(|e| RequestError::Bad(e.to_string()))?;
    let host = &shared.host;
    let device = |name: &str| {
        if !host.status().iter().any(|d| d.name == name) {
            return Err(RequestError::NoDevice(name.to_string()));
        }
        host.device(name)
            .ok_or_else(|| RequestError::Stopped(name.to_string()))
    };
    match req {
        Request::Version {} => Ok(json!({
            "name": "pvrdma",
            "version": env!("CARGO_PKG_VERSION"),
        })),
        Request::List {} => to_value(&host.status()),
        Request::Stats { device: name } => {
            let stats = device(&name)?
                .stats()
                .map_err(|_| RequestError::Stopped(name))?;
            to_value(&stats)
        }
        Request::Resources { device: name } => {
            let res = device(&name)?
                .resources()
                .map_err(|_| RequestError::Stopped(name))?;
            to_value(&res)
        }
        Request::Add { device: keys } => {
            let parser = shared.parser.as_ref().ok_or(RequestError::NoAdd)?;
            let pairs = keys
                .into_iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k, s)),
                    Value::Number(n) => Ok((k, n.to_string())),
                    _ => Err(RequestError::Bad(format!("`{k}`: a string or an integer"))),
                })
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let spec = parser(pairs).map_err(RequestError::Refused)?;
            let name = spec.name.clone();
            host.add_at_runtime(spec)
                .map_err(|e| RequestError::Refused(crate::error_chain(&e)))?;
            log::info!("control socket: device {name} added");
            let status: Vec<DeviceStatus> = host.status();
            to_value(&status.into_iter().find(|d| d.name == name))
        }
        Request::Remove { device: name } => {
            if !host.remove(&name) {
                return Err(RequestError::NoDevice(name));
            }
            log::info!("control socket: device {name} removed");
            Ok(Value::Null)
        }
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> std::result::Result<Value, RequestError> {
    serde_json::to_value(v).map_err(|e| RequestError::Bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BackendChoice, HostLimits};
    use pvrdma_dev::DeviceConfig;
    use std::os::unix::fs::PermissionsExt;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pvrdma-ctl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    struct Client {
        out: UnixStream,
        input: BufReader<UnixStream>,
    }

    impl Client {
        fn new(path: &Path) -> Client {
            let s = UnixStream::connect(path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            Client {
                out: s.try_clone().unwrap(),
                input: BufReader::new(s),
            }
        }

        fn raw(&mut self, line: &[u8]) -> Option<Value> {
            self.out.write_all(line).ok()?;
            self.out.write_all(b"\n").ok()?;
            let mut r = String::new();
            match self.input.read_line(&mut r) {
                Ok(0) | Err(_) => None,
                Ok(_) => Some(serde_json::from_str(&r).unwrap()),
            }
        }

        fn ask(&mut self, v: Value) -> Value {
            self.raw(v.to_string().as_bytes()).expect("a reply")
        }
    }

    fn parser() -> Arc<DeviceParser> {
        Arc::new(|pairs: Vec<(String, String)>| {
            let mut socket = None;
            let mut cfg = DeviceConfig::default();
            for (k, v) in pairs {
                match k.as_str() {
                    "socket" => socket = Some(PathBuf::from(v)),
                    "last" => cfg.mac[5] = v.parse().map_err(|_| "bad last".to_string())?,
                    _ => return Err(format!("unknown key `{k}`")),
                }
            }
            Ok(DeviceSpec::new(socket.ok_or("no socket")?, cfg))
        })
    }

    #[test]
    fn the_socket_is_the_owners_and_answers_every_command() {
        let d = dir("commands");
        let host = Arc::new(Host::new(BackendChoice::Emulated, HostLimits::default()).unwrap());
        let path = d.join("control.sock");
        let mut server = ControlServer::spawn(&path, host.clone(), Some(parser())).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        assert!(
            std::fs::read_dir(&d).unwrap().count() == 1,
            "no temporary left"
        );

        let mut c = Client::new(&path);
        let v = c.ask(json!({"command": "version"}));
        assert_eq!(v["result"]["name"], "pvrdma");
        assert_eq!(c.ask(json!({"command": "list"}))["result"], json!([]));
        let sock = d.join("a.sock");
        let added = c.ask(json!({"command": "add", "device": {"socket": sock, "last": 7}}));
        assert_eq!(added["ok"], true, "{added}");
        assert_eq!(added["result"]["name"], "a");
        assert_eq!(added["result"]["mac"], "00:50:56:00:00:07");
        assert_eq!(added["result"]["origin"], "runtime");
        assert!(sock.exists());
        let list = c.ask(json!({"command": "list"}));
        assert_eq!(list["result"][0]["connected"], false);
        let stats = c.ask(json!({"command": "stats", "device": "a"}));
        assert_eq!(stats["result"]["commands"], 0, "{stats}");
        // The same MAC again: refused with the host's reason.
        let again =
            c.ask(json!({"command": "add", "device": {"socket": d.join("b.sock"), "last": 7}}));
        assert_eq!(again["ok"], false);
        assert!(again["error"].as_str().unwrap().contains("MAC"), "{again}");
        let bad = c.ask(json!({"command": "add", "device": {"socket": "x", "last": [1]}}));
        assert!(bad["error"].as_str().unwrap().contains("`last`"), "{bad}");
        assert_eq!(
            c.ask(json!({"command": "remove", "device": "a"}))["ok"],
            true
        );
        assert!(!sock.exists());
        let gone = c.ask(json!({"command": "stats", "device": "a"}));
        assert_eq!(gone["error"], "no device `a`");
        server.stop();
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn malformed_requests_get_an_error_and_the_server_goes_on() {
        let d = dir("malformed");
        let host = Arc::new(Host::new(BackendChoice::Emulated, HostLimits::default()).unwrap());
        let path = d.join("control.sock");
        let _server = ControlServer::spawn(&path, host, None).unwrap();
        let mut c = Client::new(&path);
        let deep = "[".repeat(10_000);
        let cases: Vec<&[u8]> = vec![
            b"garbage",
            b"{}",
            b"[]",
            b"null",
            b"{\"command\":\"bogus\"}",
            b"{\"command\":\"list\",\"extra\":1}",
            b"{\"command\":\"stats\"}",
            b"{\"command\":\"stats\",\"device\":7}",
            b"{\"command\":\"remove\",\"device\":\"nobody\"}",
            b"{\"command\":\"add\",\"device\":{\"socket\":\"/nonexistent/x.sock\"}}",
            b"\xff\xfe\x00\x01",
            deep.as_bytes(),
        ];
        for line in cases {
            let r = c.raw(line).expect("a reply");
            assert_eq!(r["ok"], false, "{}: {r}", String::from_utf8_lossy(line));
            assert!(r["error"].as_str().is_some_and(|e| !e.is_empty()));
        }
        // Blank lines are skipped; the connection still answers.
        c.out.write_all(b"  \n\n").unwrap();
        assert_eq!(c.ask(json!({"command": "list"}))["ok"], true);
        // A line past the limit: an error, then the connection ends; others are unaffected.
        // The server may answer and close before the client has written the whole line, so
        // the write may fail; the answer is there to read either way.
        let long = vec![b'x'; MAX_REQUEST + 10];
        let _ = c.out.write_all(&long).and_then(|()| c.out.write_all(b"\n"));
        let mut answer = String::new();
        c.input.read_line(&mut answer).expect("a reply");
        let r: Value = serde_json::from_str(&answer).expect("a JSON reply");
        assert!(r["error"].as_str().unwrap().contains("at most"), "{r}");
        assert!(c.raw(b"{\"command\":\"list\"}").is_none());
        let mut c2 = Client::new(&path);
        assert_eq!(c2.ask(json!({"command": "list"}))["ok"], true);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn connections_past_the_limit_are_told_and_closed() {
        let d = dir("limit");
        let host = Arc::new(Host::new(BackendChoice::Emulated, HostLimits::default()).unwrap());
        let path = d.join("control.sock");
        let _server = ControlServer::spawn(&path, host, None).unwrap();
        let mut open: Vec<Client> = (0..MAX_CONNECTIONS).map(|_| Client::new(&path)).collect();
        for c in &mut open {
            assert_eq!(c.ask(json!({"command": "version"}))["ok"], true);
        }
        let mut extra = Client::new(&path);
        let mut r = String::new();
        extra.input.read_line(&mut r).unwrap();
        assert!(r.contains("connections are open"), "{r}");
        drop(open.pop());
        // The slot frees once the server sees the connection end. Until then a new connection
        // is refused and closed, maybe before the request is even written.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut c = Client::new(&path);
            let request = json!({"command": "version"}).to_string();
            if c.raw(request.as_bytes()).is_some_and(|r| r["ok"] == true) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no slot freed");
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}
