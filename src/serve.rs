//! `pvrdma serve`: the standalone vfio-user backend process, serving a device per VM on one
//! emulated fabric.

use std::ops::Range;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::ValueEnum;
use pvrdma_dev::DeviceConfig;
use pvrdma_vfio_user::control::ControlServer;
use pvrdma_vfio_user::host::DEFAULT_MAX_DEVICES;
use pvrdma_vfio_user::metrics::{MetricsAddr, MetricsServer};
use pvrdma_vfio_user::{listen_fd_from_env, serve_host, DeviceSpec, Host, HostLimits};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::LogFormat;

const ABOUT: &str = "Serve PVRDMA devices to VMMs over vfio-user";

const LONG_ABOUT: &str = "Serve PVRDMA devices to VMMs over vfio-user.

Serves until SIGINT or SIGTERM (exit status 0): one device per VM, each on its own UNIX socket \
with its own MAC, all on one emulated RDMA fabric, so the VMs of this host exchange RDMA with \
each other. Each client (QEMU: -device '{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\
\"path\":\"PATH\"},\"x-no-posted-writes\":true,...}') gets a fresh device; after it disconnects the \
next client of that socket is accepted. A stale socket file is removed. With socket activation \
(LISTEN_PID/LISTEN_FDS, e.g. a systemd socket unit) the inherited socket is the first device's, \
and --socket is optional.

Every option can also be set in the --config file; the command line wins over the file.";

/// The RDMA backend of `pvrdma serve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// A software fabric shared by the devices of this process.
    Emulated,
    /// A host RDMA device through libibverbs.so.1 (loaded at start; needs rdma-core).
    RdmaCore,
}

/// The options of `pvrdma serve`.
#[derive(Debug, Clone, clap::Args)]
#[command(about = ABOUT, long_about = LONG_ABOUT, args_override_self = true)]
pub struct ServeArgs {
    /// One device on PATH, with --mac and the device options below
    #[arg(long, value_name = "PATH", help_heading = "Devices")]
    socket: Option<PathBuf>,
    /// A device (repeatable): socket=PATH,mac=MAC[,name=NAME][,KEY=VALUE]..., KEY one of
    /// max-qp, max-cq, max-mr, max-host-mem, workers, poll-us, roce-version; keys left out take
    /// the device options below. NAME (default: the socket's file name without .sock) names the
    /// device in logs and thread names
    #[arg(long, value_name = "SPEC", value_parser = DeviceDecl::parse, help_heading = "Devices")]
    device: Vec<DeviceDecl>,
    /// Options and devices from a TOML file (docs/running-with-qemu.md). SIGHUP re-reads it:
    /// devices added to it start, devices taken out of it stop, other device changes reach a
    /// device's next client
    #[arg(long, value_name = "FILE", help_heading = "Devices")]
    config: Option<PathBuf>,
    /// Devices this process serves at most [default: 64]
    #[arg(long, value_name = "N", help_heading = "Devices")]
    max_devices: Option<usize>,
    /// Host memory the devices' budgets (max-host-mem) may add up to; a device past it is
    /// refused [default: half the host's RAM; suffixes K, M, G]
    #[arg(long, value_name = "SIZE", value_parser = parse_size, help_heading = "Devices")]
    max_memory: Option<u64>,
    /// A control socket for `pvrdma ctl` (list, stats, resources, add, remove)
    #[arg(long, value_name = "PATH", help_heading = "Devices")]
    control: Option<PathBuf>,
    /// Prometheus metrics on a loopback IP:PORT (127.0.0.1:9464) or a UNIX socket (unix:PATH)
    #[arg(long, value_name = "ADDR", help_heading = "Devices")]
    metrics: Option<MetricsAddr>,
    /// RDMA backend: `emulated` (a software fabric shared by the devices of this process) or
    /// `rdma-core` (a host RDMA device through libibverbs.so.1) [default: emulated]
    #[arg(
        long,
        value_name = "BACKEND",
        hide_possible_values = true,
        help_heading = "Backend"
    )]
    backend: Option<Backend>,
    /// Host RDMA device of `rdma-core` [default: rxe0]
    #[arg(long, value_name = "NAME", help_heading = "Backend")]
    ibdev: Option<String>,
    /// Its port [default: 1]
    #[arg(long, value_name = "N", help_heading = "Backend")]
    ibport: Option<u8>,
    #[command(flatten)]
    dev: DeviceOpts,
    #[command(flatten)]
    pub verbosity: crate::Verbosity,
}

/// The device options of the command line: the defaults of every device.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Device options (defaults of every device)")]
struct DeviceOpts {
    /// MAC of the paired vmxnet3, xx:xx:xx:xx:xx:xx [default: 00:50:56:00:00:01]
    #[arg(long, value_name = "MAC", value_parser = key_arg("mac"))]
    mac: Option<String>,
    /// QPs advertised and enforced [default: 1024]
    #[arg(long, value_name = "N", value_parser = key_arg("max-qp"))]
    max_qp: Option<String>,
    /// CQs [default: 1024]
    #[arg(long, value_name = "N", value_parser = key_arg("max-cq"))]
    max_cq: Option<String>,
    /// MRs [default: 4096]
    #[arg(long, value_name = "N", value_parser = key_arg("max-mr"))]
    max_mr: Option<String>,
    /// Host memory a guest's objects and queued work may hold; CREATE commands past it fail
    /// with ENOMEM [default: 128M; suffixes K, M, G]
    #[arg(long, value_name = "SIZE", value_parser = key_arg("max-host-mem"))]
    max_host_mem: Option<String>,
    /// Worker threads of each device's data path [default: 2]
    #[arg(long, value_name = "N", value_parser = key_arg("workers"))]
    workers: Option<String>,
    /// Polling for the next access / answer before a thread sleeps, in µs (0: off) [default: 32]
    #[arg(long, value_name = "N", value_parser = key_arg("poll-us"))]
    poll_us: Option<String>,
    /// The RoCE version the device offers the guest: 1 (every driver version takes it) or 2
    /// (RoCE v2 GIDs and IP headers on UD, drivers of ABI 18 and later) [default: 1]
    #[arg(long, value_name = "1|2", value_parser = key_arg("roce-version"))]
    roce_version: Option<String>,
}

impl DeviceOpts {
    /// The keys given, as `--device` would name them.
    fn keys(&self) -> Vec<(String, String)> {
        [
            ("mac", &self.mac),
            ("max-qp", &self.max_qp),
            ("max-cq", &self.max_cq),
            ("max-mr", &self.max_mr),
            ("max-host-mem", &self.max_host_mem),
            ("workers", &self.workers),
            ("poll-us", &self.poll_us),
            ("roce-version", &self.roce_version),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), v.clone())))
        .collect()
    }
}

/// A clap value parser for the device key `key`: checks the value, keeps its text.
fn key_arg(key: &'static str) -> impl Fn(&str) -> Result<String, String> + Clone + Send + Sync {
    move |v: &str| {
        set_device_key(&mut DeviceConfig::default(), key, v)?;
        Ok(v.to_string())
    }
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("bad MAC `{s}` (want xx:xx:xx:xx:xx:xx)"));
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(format!("bad MAC `{s}` (want xx:xx:xx:xx:xx:xx)"));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("bad MAC `{s}`"))?;
    }
    Ok(mac)
}

fn parse_num<T: std::str::FromStr>(v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("`{v}` is not a valid number"))
}

/// A size in bytes: a number with an optional binary suffix K, M or G (`128M`).
fn parse_size(v: &str) -> Result<u64, String> {
    let bad = || format!("`{v}` is not a size (bytes, or with a suffix K, M, G)");
    let t = v.trim();
    let (num, shift) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 10),
        Some((i, 'M' | 'm')) => (&t[..i], 20),
        Some((i, 'G' | 'g')) => (&t[..i], 30),
        _ => (t, 0),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// Sets the device option `key` (the long option's name without `--`) in `cfg`. The one place
/// that knows the per-device keys: the command line, `--device` and the file all go through it.
/// Errors do not name the key: the caller knows how the user spelled it.
fn set_device_key(cfg: &mut DeviceConfig, key: &str, v: &str) -> Result<(), String> {
    match key {
        "mac" => cfg.mac = parse_mac(v)?,
        "max-qp" => cfg.max_qp = parse_num(v)?,
        "max-cq" => cfg.max_cq = parse_num(v)?,
        "max-mr" => cfg.max_mr = parse_num(v)?,
        "max-host-mem" => cfg.max_host_mem = parse_size(v)?,
        "workers" => cfg.workers = parse_num(v)?,
        "poll-us" => cfg.poll_us = parse_num(v)?,
        "roce-version" => cfg.roce_version = parse_num(v)?,
        _ => {
            return Err(format!(
                "unknown device key (keys: socket, name, {})",
                DEVICE_KEYS.join(", ")
            ))
        }
    }
    Ok(())
}

/// The per-device keys [`set_device_key`] knows.
const DEVICE_KEYS: [&str; 8] = [
    "mac",
    "max-qp",
    "max-cq",
    "max-mr",
    "max-host-mem",
    "workers",
    "poll-us",
    "roce-version",
];

/// Checks the `name` of a device.
fn check_name(v: &str) -> Result<(), String> {
    if v.is_empty() || v.contains(['/', '\0']) {
        return Err(format!("bad name `{v}` (not empty, no `/`)"));
    }
    Ok(())
}

/// One device as declared: its socket, name, and the keys set for it (over the defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
struct DeviceDecl {
    socket: PathBuf,
    name: Option<String>,
    keys: Vec<(String, String)>,
}

impl DeviceDecl {
    /// From `key=value` pairs (`--device`, `pvrdma ctl add`, or a file's `[[device]]` table).
    fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, String)>,
        what: &str,
    ) -> Result<DeviceDecl, String> {
        let mut d = DeviceDecl {
            socket: PathBuf::new(),
            name: None,
            keys: Vec::new(),
        };
        for (k, v) in pairs {
            match k {
                "socket" => d.socket = PathBuf::from(v),
                "name" => {
                    check_name(&v).map_err(|e| format!("{what}: name: {e}"))?;
                    d.name = Some(v);
                }
                _ => {
                    // Checked now, so that a typo fails at start-up or reload, not later.
                    set_device_key(&mut DeviceConfig::default(), k, &v)
                        .map_err(|e| format!("{what}: {k}: {e}"))?;
                    d.keys.push((k.to_string(), v));
                }
            }
        }
        if d.socket.as_os_str().is_empty() {
            return Err(format!("{what}: no socket=PATH"));
        }
        Ok(d)
    }

    /// `--device socket=PATH,mac=MAC,...`.
    fn parse(spec: &str) -> Result<DeviceDecl, String> {
        let what = format!("`{spec}`");
        let pairs = spec
            .split(',')
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k, v.to_string()))
                    .ok_or_else(|| format!("{what}: `{kv}` is not key=value"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        DeviceDecl::from_pairs(pairs, &what)
    }

    /// The device with `defaults` under its own keys.
    fn spec(&self, defaults: &DeviceConfig) -> Result<DeviceSpec, String> {
        let mut cfg = defaults.clone();
        for (k, v) in &self.keys {
            set_device_key(&mut cfg, k, v)?;
        }
        let mut s = DeviceSpec::new(self.socket.clone(), cfg);
        if let Some(n) = &self.name {
            s.name = n.clone();
        }
        Ok(s)
    }
}

/// What a `--config` file declares.
#[derive(Debug, Default, PartialEq, Eq)]
struct FileDecl {
    max_devices: Option<usize>,
    max_memory: Option<u64>,
    control: Option<PathBuf>,
    metrics: Option<MetricsAddr>,
    backend: Option<Backend>,
    ibdev: Option<String>,
    ibport: Option<u8>,
    log_format: Option<LogFormat>,
    log_level: Option<String>,
    defaults: Vec<(String, String)>,
    devices: Vec<DeviceDecl>,
}

/// The keys of a file's top level, in the order the docs list them.
const FILE_KEYS: [&str; 11] = [
    "max-devices",
    "max-memory",
    "control",
    "metrics",
    "backend",
    "ibdev",
    "ibport",
    "log-format",
    "log-level",
    "defaults",
    "device",
];

fn read_config(path: &Path) -> Result<FileDecl, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_config(path, &text)
}

/// A value of a `ValueEnum`, as the command line spells it.
fn enum_value<T: ValueEnum>(s: &str) -> Result<T, String> {
    T::from_str(s, false).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
            .collect();
        format!("`{s}` is not one of {}", names.join(", "))
    })
}

/// A config file's text, for messages that name the file, the line and the field.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    /// The 1-based line of byte `offset`.
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    /// `FILE:LINE: FIELD: MSG`.
    fn err(&self, span: Range<usize>, field: &str, msg: impl std::fmt::Display) -> String {
        format!(
            "{}:{}: {field}: {msg}",
            self.path.display(),
            self.line(span.start)
        )
    }

    /// The value as written in the file.
    fn raw(&self, span: Range<usize>) -> &str {
        self.text.get(span).unwrap_or("?").trim()
    }

    /// A string or an integer, as the command line would have written it.
    fn scalar(&self, field: &str, v: &Spanned<DeValue<'_>>) -> Result<String, String> {
        match v.get_ref() {
            DeValue::String(s) => Ok(s.to_string()),
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
                .map(|n| n.to_string())
                .map_err(|_| self.err(v.span(), field, "the integer is out of range")),
            _ => Err(self.err(
                v.span(),
                field,
                format!("`{}` is not a string or an integer", self.raw(v.span())),
            )),
        }
    }

    /// A value checked by `parse`.
    fn value<T>(
        &self,
        field: &str,
        v: &Spanned<DeValue<'_>>,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, String> {
        let s = self.scalar(field, v)?;
        parse(&s).map_err(|e| self.err(v.span(), field, e))
    }

    /// The keys of a table in the order of the file.
    fn entries<'t, 'i>(
        table: &'t DeTable<'i>,
    ) -> Vec<(
        &'t Spanned<std::borrow::Cow<'i, str>>,
        &'t Spanned<DeValue<'i>>,
    )> {
        let mut e: Vec<_> = table.iter().collect();
        e.sort_by_key(|(k, _)| k.span().start);
        e
    }

    /// A device table's keys (`[defaults]`, or a `[[device]]` when `device`).
    fn device_keys(
        &self,
        what: &str,
        table: &DeTable<'_>,
        device: bool,
    ) -> Result<Vec<(String, String)>, String> {
        let mut out = Vec::new();
        for (k, v) in Self::entries(table) {
            let key: &str = k.get_ref();
            let field = format!("{what}: {key}");
            match key {
                "socket" | "name" if !device => {
                    return Err(self.err(
                        k.span(),
                        &field,
                        "a key of [[device]] only (each device has its own)",
                    ))
                }
                "socket" => out.push((key.to_string(), self.scalar(&field, v)?)),
                "name" => out.push((
                    key.to_string(),
                    self.value(&field, v, |s| check_name(s).map(|()| s.to_string()))?,
                )),
                _ if !DEVICE_KEYS.contains(&key) => {
                    let keys = if device { "socket, name, " } else { "" };
                    return Err(self.err(
                        k.span(),
                        &field,
                        format!("unknown key (keys: {keys}{})", DEVICE_KEYS.join(", ")),
                    ));
                }
                _ => {
                    let s = self.value(&field, v, |s| {
                        set_device_key(&mut DeviceConfig::default(), key, s).map(|()| s.to_string())
                    })?;
                    out.push((key.to_string(), s));
                }
            }
        }
        Ok(out)
    }
}

/// A `--config` file's text (`path` only names it in messages): top-level options,
/// `[defaults]` (device keys) and `[[device]]` tables. Errors say `FILE:LINE: FIELD: what`.
fn parse_config(path: &Path, text: &str) -> Result<FileDecl, String> {
    let src = Source { path, text };
    let root = DeTable::parse(text).map_err(|e| {
        let Some(span) = e.span() else {
            return format!("{}: {}", path.display(), e.message());
        };
        // The field of a syntax error: the key of its line, or the table header.
        let line = src.line(span.start);
        let l = text.lines().nth(line - 1).unwrap_or("").trim();
        let field = l.split_once('=').map_or(l, |(k, _)| k.trim());
        let field = if field.is_empty() { "syntax" } else { field };
        src.err(span, field, e.message().trim())
    })?;
    let mut f = FileDecl::default();
    for (k, v) in Source::entries(root.get_ref()) {
        let key: &str = k.get_ref();
        match key {
            "max-devices" => f.max_devices = Some(src.value(key, v, parse_num)?),
            "max-memory" => f.max_memory = Some(src.value(key, v, parse_size)?),
            "control" => f.control = Some(src.value(key, v, |s| Ok(PathBuf::from(s)))?),
            "metrics" => f.metrics = Some(src.value(key, v, str::parse)?),
            "backend" => f.backend = Some(src.value(key, v, enum_value::<Backend>)?),
            "ibdev" => f.ibdev = Some(src.scalar(key, v)?),
            "ibport" => f.ibport = Some(src.value(key, v, parse_num)?),
            "log-format" => f.log_format = Some(src.value(key, v, enum_value::<LogFormat>)?),
            "log-level" => {
                f.log_level = Some(src.value(key, v, |s| {
                    tracing_subscriber::EnvFilter::try_new(s)
                        .map(|_| s.to_string())
                        .map_err(|e| format!("`{s}`: {e}"))
                })?)
            }
            "defaults" => match v.get_ref() {
                DeValue::Table(t) => f.defaults = src.device_keys("[defaults]", t, false)?,
                _ => return Err(src.err(v.span(), key, "must be a table ([defaults])")),
            },
            "device" => {
                let DeValue::Array(a) = v.get_ref() else {
                    return Err(src.err(v.span(), key, "must be tables ([[device]])"));
                };
                for (i, t) in a.iter().enumerate() {
                    let what = format!("[[device]] {}", i + 1);
                    let DeValue::Table(table) = t.get_ref() else {
                        return Err(src.err(t.span(), &what, "must be a table"));
                    };
                    let pairs = src.device_keys(&what, table, true)?;
                    let d = DeviceDecl::from_pairs(
                        pairs.iter().map(|(k, v)| (k.as_str(), v.clone())),
                        "",
                    )
                    .map_err(|_| src.err(t.span(), &what, "no socket (socket = \"PATH\")"))?;
                    f.devices.push(d);
                }
            }
            _ => {
                return Err(src.err(
                    k.span(),
                    key,
                    format!("unknown key (keys: {})", FILE_KEYS.join(", ")),
                ))
            }
        }
    }
    Ok(f)
}

/// `--poll-us` default of `pvrdma serve`: each access crosses the socket, the server thread
/// and the main loop, and polling saves two thread wake-ups per access (docs/benchmarks.md).
const SERVE_POLL_US: u32 = 32;

/// The options of the command line over those of the file.
#[derive(Debug)]
struct Settings {
    max_devices: usize,
    max_memory: u64,
    control: Option<PathBuf>,
    metrics: Option<MetricsAddr>,
    backend: Backend,
    ibdev: String,
    ibport: u8,
}

impl Settings {
    fn new(a: &ServeArgs, f: Option<&FileDecl>) -> Settings {
        Settings {
            max_devices: a
                .max_devices
                .or(f.and_then(|f| f.max_devices))
                .unwrap_or(DEFAULT_MAX_DEVICES),
            max_memory: a
                .max_memory
                .or(f.and_then(|f| f.max_memory))
                .unwrap_or_else(pvrdma_vfio_user::default_max_memory),
            control: a.control.clone().or(f.and_then(|f| f.control.clone())),
            metrics: a.metrics.clone().or(f.and_then(|f| f.metrics.clone())),
            backend: a
                .backend
                .or(f.and_then(|f| f.backend))
                .unwrap_or(Backend::Emulated),
            ibdev: a
                .ibdev
                .clone()
                .or(f.and_then(|f| f.ibdev.clone()))
                .unwrap_or_else(|| "rxe0".into()),
            ibport: a.ibport.or(f.and_then(|f| f.ibport)).unwrap_or(1),
        }
    }
}

/// The backend choice for the server; checks that rdma-core can run here.
fn backend_choice(s: &Settings) -> Result<pvrdma_vfio_user::BackendChoice, String> {
    if s.backend == Backend::Emulated {
        return Ok(pvrdma_vfio_user::BackendChoice::Emulated);
    }
    use rdma_backend::rdma_core;
    rdma_core::available().map_err(|e| {
        format!(
            "--backend rdma-core: {e}; install rdma-core (libibverbs1) or use --backend emulated"
        )
    })?;
    let cfg = rdma_core::Config {
        ibdev: s.ibdev.clone(),
        port: s.ibport,
        // Each device gets the link-local GID of its own MAC (`pvrdma_vfio_user`).
        gids: Vec::new(),
    };
    // Open the device once now, so a wrong name or a port that is down fails here rather than
    // at the first client.
    struct NoSink;
    impl rdma_backend::CompletionSink for NoSink {
        fn complete(&self, _: &[rdma_backend::WorkCompletion]) {}
        fn event(&self, _: rdma_backend::AsyncEvent) {}
        fn progress_needed(&self) {}
    }
    let mem = rdma_backend::GuestMem::new(vm_memory::GuestMemoryMmap::new());
    rdma_core::RdmaCoreBackend::new(cfg.clone(), mem, std::sync::Arc::new(NoSink))
        .and_then(|b| b.port_active())
        .map_err(|e| format!("--backend rdma-core: {e}"))?;
    Ok(pvrdma_vfio_user::BackendChoice::RdmaCore(cfg))
}

/// Removes `path` if it is a socket nobody listens on.
fn remove_stale_socket(path: &Path) -> Result<(), String> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(format!("{} exists and is not a socket", path.display()));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(format!("{} is in use by another server", path.display()));
    }
    std::fs::remove_file(path).map_err(|e| format!("cannot remove {}: {e}", path.display()))?;
    log::info!("removed stale socket {}", path.display());
    Ok(())
}

/// Removes the stale socket files of `specs` that `host` does not serve already.
fn clear_stale(specs: &[DeviceSpec], host: Option<&Host>) -> Result<(), String> {
    let served: Vec<PathBuf> = host
        .map(|h| h.devices().into_iter().map(|d| d.socket).collect())
        .unwrap_or_default();
    specs
        .iter()
        .filter(|s| !s.socket.as_os_str().is_empty() && !served.contains(&s.socket))
        .try_for_each(|s| remove_stale_socket(&s.socket))
}

use pvrdma_vfio_user::error_chain as chain;

/// The device defaults: the built-in ones, then the file's `[defaults]` (if `file`), then the
/// device options of the command line, which win.
fn defaults(a: &ServeArgs, file: Option<&FileDecl>) -> Result<DeviceConfig, String> {
    let mut cfg = DeviceConfig {
        poll_us: SERVE_POLL_US,
        ..DeviceConfig::default()
    };
    for (k, v) in file.iter().flat_map(|f| &f.defaults) {
        set_device_key(&mut cfg, k, v)?;
    }
    for (k, v) in a.dev.keys() {
        set_device_key(&mut cfg, &k, &v)?;
    }
    Ok(cfg)
}

/// The devices of the command line and (if any) the file, in that order. A device's own keys
/// win over the device options of the command line, which win over the file's `[defaults]`
/// (which apply to the file's devices only). With socket activation the first device listens
/// on the inherited socket (its path left empty; the caller hands it the fd), and is the only
/// device, with the file's `[defaults]`, if nothing else is declared.
fn device_specs(
    a: &ServeArgs,
    file: Option<&FileDecl>,
    activated: bool,
) -> Result<Vec<DeviceSpec>, String> {
    let cli = defaults(a, None)?;
    let mut specs = Vec::new();
    if let Some(p) = &a.socket {
        specs.push(DeviceSpec::new(p.clone(), cli.clone()));
    }
    for d in &a.device {
        specs.push(d.spec(&cli)?);
    }
    if let Some(f) = file {
        let defaults = defaults(a, Some(f))?;
        for d in &f.devices {
            specs.push(d.spec(&defaults)?);
        }
    }
    if activated {
        if specs.is_empty() {
            specs.push(DeviceSpec::new(PathBuf::new(), defaults(a, file)?));
        }
        specs[0].socket = PathBuf::new();
    }
    Ok(specs)
}

/// Reads the `--config` file, if any: before logging starts, since it may set the log format.
pub fn load(a: &ServeArgs) -> Result<Loaded, String> {
    let file = a.config.as_deref().map(read_config).transpose()?;
    Ok(Loaded { file })
}

/// The `--config` file as read at start.
#[derive(Debug)]
pub struct Loaded {
    file: Option<FileDecl>,
}

impl Loaded {
    /// The file's `log-format`.
    pub fn log_format(&self) -> Option<LogFormat> {
        self.file.as_ref().and_then(|f| f.log_format)
    }

    /// The file's `log-level` (a `RUST_LOG` filter).
    pub fn log_level(&self) -> Option<&str> {
        self.file.as_ref().and_then(|f| f.log_level.as_deref())
    }
}

/// Runs the vfio-user server.
pub fn run(a: &ServeArgs, loaded: Loaded) -> Result<(), String> {
    let file = loaded.file;
    let listen_fd: Option<OwnedFd> = listen_fd_from_env();
    let activated = listen_fd.is_some();
    let mut specs = device_specs(a, file.as_ref(), activated)?;
    let settings = Settings::new(a, file.as_ref());
    if specs.is_empty() && settings.control.is_none() {
        return Err(
            "no device: give --socket, --device or --config (or --control to add them later); \
             see `pvrdma serve --help`"
                .into(),
        );
    }
    if let Some(fd) = listen_fd {
        specs[0].listen_fd = Some(fd);
    }
    clear_stale(&specs, None)?;
    let backend = backend_choice(&settings)?;
    let limits = HostLimits {
        max_devices: settings.max_devices,
        max_memory: settings.max_memory,
    };
    let host = Arc::new(Host::new(backend, limits).map_err(|e| chain(&e))?);
    let n = specs.len();
    host.apply(specs).map_err(|e| chain(&e))?;
    log::info!(
        "pvrdma {} serving {n} device(s), backend {}",
        env!("CARGO_PKG_VERSION"),
        match settings.backend {
            Backend::Emulated => "emulated".to_string(),
            Backend::RdmaCore => format!("rdma-core ({} port {})", settings.ibdev, settings.ibport),
        }
    );
    // Devices added over the control socket take the defaults of the file's devices (as they
    // were at start) under their own keys.
    let defaults = defaults(a, file.as_ref())?;
    let parser = {
        let host = host.clone();
        Arc::new(move |pairs: Vec<(String, String)>| {
            let d =
                DeviceDecl::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.clone())), "add")?;
            let spec = d.spec(&defaults)?;
            clear_stale(std::slice::from_ref(&spec), Some(&host))?;
            Ok(spec)
        })
    };
    let _control = settings
        .control
        .map(|p| {
            remove_stale_socket(&p)?;
            ControlServer::spawn(&p, host.clone(), Some(parser)).map_err(|e| chain(&e))
        })
        .transpose()?;
    let _metrics = settings
        .metrics
        .map(|m| {
            if let MetricsAddr::Unix(p) = &m {
                remove_stale_socket(p)?;
            }
            MetricsServer::spawn(&m, host.clone()).map_err(|e| chain(&e))
        })
        .transpose()?;
    // SIGHUP: the same command line with the file as it is now (its devices and [defaults];
    // the other options are read at start only).
    let reload = a.config.as_deref().map(|path| {
        let host = &*host;
        move || -> Result<Vec<DeviceSpec>, String> {
            let specs = device_specs(a, Some(&read_config(path)?), activated)?;
            clear_stale(&specs, Some(host))?;
            Ok(specs)
        }
    });
    serve_host(&host, reload).map_err(|e| chain(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `pvrdma serve ARGS` as the command line parses it.
    fn parse(v: &[&str]) -> Result<ServeArgs, String> {
        let cli = crate::Cli::try_parse_from(["pvrdma", "serve"].iter().chain(v))
            .map_err(|e| e.to_string())?;
        match cli.command {
            crate::Command::Serve(a) => Ok(*a),
            other => panic!("{other:?}"),
        }
    }

    fn cfg(text: &str) -> Result<FileDecl, String> {
        parse_config(Path::new("/etc/pvrdma/t.toml"), text)
    }

    #[test]
    fn parses_options() {
        let a = parse(&[
            "--socket",
            "/tmp/x.sock",
            "--mac=00:11:22:33:44:55",
            "--max-qp",
            "64",
            "--max-cq",
            "32",
            "--max-mr",
            "16",
            "--workers",
            "1",
            "--roce-version",
            "2",
            "--backend",
            "emulated",
        ])
        .unwrap();
        assert_eq!(a.socket.as_deref(), Some(Path::new("/tmp/x.sock")));
        let d = defaults(&a, None).unwrap();
        assert_eq!(d.mac, [0, 0x11, 0x22, 0x33, 0x44, 0x55]);
        assert_eq!((d.max_qp, d.max_cq, d.max_mr), (64, 32, 16));
        assert_eq!(
            (d.workers, d.roce_version, d.poll_us),
            (1, 2, SERVE_POLL_US)
        );
        assert!(parse(&["--backend", "nope"]).is_err());
        let a = parse(&["--backend", "rdma-core", "--ibdev", "x", "--ibport", "2"]).unwrap();
        let s = Settings::new(&a, None);
        assert_eq!((s.ibdev.as_str(), s.ibport), ("x", 2));
        // Without libibverbs (this host), rdma-core is refused clearly.
        if rdma_backend::rdma_core::available().is_err() {
            assert!(backend_choice(&s).unwrap_err().contains("rdma-core"));
        }
        let e = parse(&["--mac", "00:11"]).unwrap_err();
        assert!(e.contains("--mac") && e.contains("bad MAC"), "{e}");
        assert!(parse(&["--max-qp"]).is_err());
        let a = parse(&["--max-host-mem", "64M", "--max-memory=2G"]).unwrap();
        assert_eq!(
            (defaults(&a, None).unwrap().max_host_mem, a.max_memory),
            (64 << 20, Some(2 << 30))
        );
        for (v, want) in [
            ("4096", Some(4096)),
            ("8k", Some(8192)),
            ("1G", Some(1 << 30)),
        ] {
            assert_eq!(parse_size(v).ok(), want, "{v}");
        }
        for bad in ["", "M", "1.5G", "-1M", "99999999999G", "1T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(parse(&["--bogus"]).is_err());
        // The last of a repeated option wins, as it always did.
        let a = parse(&["--max-qp", "1", "--max-qp=2"]).unwrap();
        assert_eq!(defaults(&a, None).unwrap().max_qp, 2);
        let a = parse(&["--control", "/run/c.sock", "--metrics", "127.0.0.1:9464"]).unwrap();
        assert_eq!(a.control.as_deref(), Some(Path::new("/run/c.sock")));
        assert!(
            parse(&["--metrics", "0.0.0.0:9464"]).is_err(),
            "not loopback"
        );
    }

    #[test]
    fn devices_from_the_command_line_take_the_options_as_defaults() {
        let a = parse(&[
            "--device",
            "socket=/tmp/a.sock,mac=52:54:00:00:00:01",
            "--max-qp=64",
            "--device=socket=/tmp/b.sock,mac=52:54:00:00:00:02,name=vm-b,max-qp=32,workers=1",
        ])
        .unwrap();
        let specs = device_specs(&a, None, false).unwrap();
        let got: Vec<_> = specs
            .iter()
            .map(|s| {
                (
                    s.name.as_str(),
                    s.device.mac[5],
                    s.device.max_qp,
                    s.device.workers,
                )
            })
            .collect();
        // An option applies to every device, whichever side of --device it is on.
        assert_eq!(got, [("a", 1, 64, 2), ("vm-b", 2, 32, 1)]);
        assert_eq!(specs[1].socket, PathBuf::from("/tmp/b.sock"));
        for bad in [
            "mac=52:54:00:00:00:01",          // no socket
            "socket=/tmp/a.sock,max-qp=lots", // not a number
            "socket=/tmp/a.sock,colour=blue", // unknown key
            "socket=/tmp/a.sock,mac",         // not key=value
            "socket=/tmp/a.sock,name=a/b",    // a name is not a path
        ] {
            let e = parse(&["--device", bad]).unwrap_err();
            assert!(e.contains("--device"), "{bad}: {e}");
        }
        // Socket activation: the first device takes the inherited socket; alone if none.
        let a = parse(&[]).unwrap();
        let specs = device_specs(&a, None, true).unwrap();
        assert_eq!(specs.len(), 1);
        assert!(specs[0].socket.as_os_str().is_empty());
        assert!(device_specs(&a, None, false).unwrap().is_empty());
        let f = cfg("[defaults]\nmac = \"52:54:00:12:34:07\"").unwrap();
        let specs = device_specs(&a, Some(&f), true).unwrap();
        assert_eq!(specs[0].device.mac[5], 7, "the file's [defaults]");
    }

    #[test]
    fn a_config_file_declares_devices_over_its_defaults() {
        let f = cfg(r#"
max-devices = 8
max-memory = "4G"
control = "/run/pvrdma/control.sock"
metrics = "unix:/run/pvrdma/metrics.sock"
backend = "emulated"
ibdev = "mlx5_0"
ibport = 2
log-format = "json"
log-level = "debug"
[defaults]
max-qp = 128
max-cq = 32
workers = 1
[[device]]
socket = "/run/pvrdma/vm1.sock"
mac = "52:54:00:12:34:01"
max-host-mem = "256M"
[[device]]
name = "second"
socket = "/run/pvrdma/vm2.sock"
mac = "52:54:00:12:34:02"
max-qp = 16
"#)
        .unwrap();
        assert_eq!((f.max_devices, f.max_memory), (Some(8), Some(4 << 30)));
        assert_eq!(
            (f.backend, f.ibdev.as_deref(), f.ibport),
            (Some(Backend::Emulated), Some("mlx5_0"), Some(2))
        );
        assert_eq!(
            (f.log_format, f.log_level.as_deref()),
            (Some(LogFormat::Json), Some("debug"))
        );
        // The command line wins over the file; a device's own keys win over both.
        let a = parse(&["--max-cq", "64", "--max-devices", "4", "--ibport", "1"]).unwrap();
        let s = Settings::new(&a, Some(&f));
        assert_eq!((s.max_devices, s.max_memory, s.ibport), (4, 4 << 30, 1));
        assert_eq!(s.ibdev, "mlx5_0");
        assert_eq!(
            s.control.as_deref(),
            Some(Path::new("/run/pvrdma/control.sock"))
        );
        let specs = device_specs(&a, Some(&f), false).unwrap();
        let got: Vec<_> = specs
            .iter()
            .map(|s| {
                let d = &s.device;
                (s.name.as_str(), d.mac[5], d.max_qp, d.max_cq, d.workers)
            })
            .collect();
        assert_eq!(got, [("vm1", 1, 128, 64, 1), ("second", 2, 16, 64, 1)]);
        assert_eq!(specs[0].device.max_host_mem, 256 << 20);
        assert_eq!(
            specs[1].device.max_host_mem,
            DeviceConfig::default().max_host_mem
        );
    }

    /// Every error of a config file names the file, the line and the field.
    #[test]
    fn config_errors_name_the_file_the_line_and_the_field() {
        for (text, want) in [
            // Syntax errors: the key or the table header of the line.
            ("max-devices = 8\n[[device]\n", "t.toml:2: [[device]: "),
            ("[defaults]\nmax-qp = 12x\n", "t.toml:2: max-qp: "),
            ("max-devices = 1\nmax-devices = 2\n", "t.toml:2: max-devices: "),
            // Unknown keys.
            ("\n\ncolour = 1", "t.toml:3: colour: unknown key (keys: max-devices"),
            ("[defaults]\nmac = \"52:54:00:12:34:01\"\nsocket = \"/a\"", "t.toml:3: [defaults]: socket: a key of [[device]] only"),
            ("[[device]]\nsocket = \"/a\"\n\nfoo = 1", "t.toml:4: [[device]] 1: foo: unknown key (keys: socket, name, mac"),
            // Bad values.
            ("max-memory = \"lots\"", "t.toml:1: max-memory: `lots` is not a size"),
            ("# c\nmax-devices = \"many\"", "t.toml:2: max-devices: `many` is not a valid number"),
            ("metrics = \"0.0.0.0:1\"", "t.toml:1: metrics: `0.0.0.0:1` is not a loopback address"),
            ("backend = \"fast\"", "t.toml:1: backend: `fast` is not one of emulated, rdma-core"),
            ("log-format = \"xml\"", "t.toml:1: log-format: `xml` is not one of text, json"),
            ("ibport = 300", "t.toml:1: ibport: `300` is not a valid number"),
            ("[defaults]\nmax-qp = \"x\"", "t.toml:2: [defaults]: max-qp: `x` is not a valid number"),
            (
                "[[device]]\nsocket = \"/a\"\nmac = \"52:54:00:12:34:01\"\n[[device]]\nsocket = \"/b\"\n\nmax-qp = \"abc\"\n",
                "/etc/pvrdma/t.toml:7: [[device]] 2: max-qp: `abc` is not a valid number",
            ),
            ("[[device]]\nsocket = \"/a\"\nmax-qp = 1.5", "t.toml:3: [[device]] 1: max-qp: `1.5` is not a string or an integer"),
            ("[[device]]\nsocket = \"/a\"\nname = \"a/b\"", "t.toml:3: [[device]] 1: name: bad name `a/b`"),
            ("[[device]]\nmac = \"52:54:00:12:34:01\"", "t.toml:1: [[device]] 1: no socket"),
            ("defaults = 1", "t.toml:1: defaults: must be a table"),
        ] {
            let e = cfg(text).unwrap_err();
            assert!(e.starts_with("/etc/pvrdma/"), "{text:?}: {e}");
            assert!(e.contains(want), "{text:?}:\n got {e}\nwant {want}");
        }
    }
}
