//! `pvrdma serve`: the standalone vfio-user backend process, serving a device per VM on one
//! emulated fabric.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use pvrdma_dev::DeviceConfig;
use pvrdma_vfio_user::host::DEFAULT_MAX_DEVICES;
use std::sync::Arc;

use pvrdma_vfio_user::control::ControlServer;
use pvrdma_vfio_user::metrics::{MetricsAddr, MetricsServer};
use pvrdma_vfio_user::{listen_fd_from_env, serve_host, DeviceSpec, Host, HostLimits};

const HELP: &str = "usage: pvrdma serve (--socket PATH | --device SPEC... | --config FILE) [options]\n\
\n\
Serves PVRDMA devices over vfio-user until SIGINT or SIGTERM (exit status 0): one device per VM,\n\
each on its own UNIX socket with its own MAC, all on one emulated RDMA fabric, so the VMs of this\n\
host exchange RDMA with each other. Each client (QEMU: -device '{\"driver\":\"vfio-user-pci\",\n\
\"socket\":{\"type\":\"unix\",\"path\":\"PATH\"},\"x-no-posted-writes\":true,...}') gets a fresh\n\
device; after it disconnects the next client of that socket is accepted. A stale socket file is\n\
removed. With socket activation (LISTEN_PID/LISTEN_FDS) the inherited socket is the first\n\
device's, and --socket is optional.\n\
\n\
devices:\n\
\x20 --socket PATH        one device on PATH (with --mac and the limits below)\n\
\x20 --device SPEC        a device (repeatable): socket=PATH,mac=MAC[,name=NAME][,max-qp=N]\n\
\x20                      [,max-cq=N][,max-mr=N][,max-host-mem=SIZE][,workers=N][,poll-us=N]\n\
\x20                      [,roce-version=1|2];\n\
\x20                      unset keys take the\n\
\x20                      options below. NAME (default: the socket's file name without .sock)\n\
\x20                      names the device in logs and thread names\n\
\x20 --config FILE        devices from a TOML file (docs/running-with-qemu.md): `max-devices`,\n\
\x20                      a [defaults] table and [[device]] tables with the keys of --device.\n\
\x20                      SIGHUP re-reads it: devices added to it start, devices taken out of it\n\
\x20                      stop, other changes reach a device's next client\n\
\x20 --max-devices N      devices this process serves at most (default 64)\n\
\x20 --max-memory SIZE    host memory the devices' budgets (max-host-mem) may add up to\n\
\x20                      (default: half the host's RAM); a device past it is refused\n\
\n\
options (defaults for every device):\n\
\x20 --backend emulated   RDMA backend: `emulated` (a software fabric shared by the devices of\n\
\x20                      this process) or `rdma-core` (a host RDMA device through\n\
\x20                      libibverbs.so.1, loaded at start; needs rdma-core installed)\n\
\x20 --ibdev NAME         host RDMA device of `rdma-core` (default rxe0)\n\
\x20 --ibport N           its port (default 1)\n\
\x20 --mac MAC            MAC of the paired vmxnet3, xx:xx:xx:xx:xx:xx (default 00:50:56:00:00:01)\n\
\x20 --max-qp N           QPs advertised and enforced (default 1024)\n\
\x20 --max-cq N           CQs (default 1024)\n\
\x20 --max-mr N           MRs (default 4096)\n\
\x20 --max-host-mem SIZE  host memory a guest's objects and queued work may hold; CREATE\n\
\x20                      commands past it fail with ENOMEM (default 128M; suffixes K, M, G)\n\
\x20 --workers N          worker threads of each device's data path (default 2)\n\
\x20 --poll-us N          polling for the next access / answer before a thread sleeps, in µs\n\
\x20                      (default 32; 0 off)\n\
\x20 --roce-version 1|2   the RoCE version the device offers the guest (default 1: every driver\n\
\x20                      version takes it; 2: RoCE v2 GIDs and IP headers on UD, drivers of\n\
\x20                      ABI 18 and later)\n\
\x20 -h, --help           this text\n";

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

fn parse_num<T: std::str::FromStr>(opt: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("{opt}: `{v}` is not a valid number"))
}

/// A size in bytes: a number with an optional binary suffix K, M or G (`128M`).
fn parse_size(opt: &str, v: &str) -> Result<u64, String> {
    let bad = || format!("{opt}: `{v}` is not a size (bytes, or with a suffix K, M, G)");
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
fn set_device_key(cfg: &mut DeviceConfig, key: &str, v: &str) -> Result<(), String> {
    let opt = format!("--{key}");
    match key {
        "mac" => cfg.mac = parse_mac(v)?,
        "max-qp" => cfg.max_qp = parse_num(&opt, v)?,
        "max-cq" => cfg.max_cq = parse_num(&opt, v)?,
        "max-mr" => cfg.max_mr = parse_num(&opt, v)?,
        "max-host-mem" => cfg.max_host_mem = parse_size(&opt, v)?,
        "workers" => cfg.workers = parse_num(&opt, v)?,
        "poll-us" => cfg.poll_us = parse_num(&opt, v)?,
        "roce-version" => cfg.roce_version = parse_num(&opt, v)?,
        _ => return Err(format!("unknown device key `{key}`")),
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
    /// From `key=value` pairs (`--device`, or a file's `[[device]]` table).
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
                "name" if v.is_empty() || v.contains(['/', '\0']) => {
                    return Err(format!("{what}: bad name `{v}`"))
                }
                "name" => d.name = Some(v),
                _ => {
                    // Checked now, so that a typo fails at start-up or reload, not later.
                    set_device_key(&mut DeviceConfig::default(), k, &v)
                        .map_err(|e| format!("{what}: {e}"))?;
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
        let what = format!("--device {spec}");
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

/// A `--config` file: `max-devices`, `[defaults]` (device keys) and `[[device]]` tables.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    max_devices: Option<usize>,
    max_memory: Option<toml::Value>,
    control: Option<PathBuf>,
    metrics: Option<String>,
    #[serde(default)]
    defaults: BTreeMap<String, toml::Value>,
    #[serde(default)]
    device: Vec<BTreeMap<String, toml::Value>>,
}

/// A TOML value as the command line would have written it.
fn value_str(k: &str, v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        _ => Err(format!("`{k}`: a string or an integer")),
    }
}

/// What a `--config` file declares.
#[derive(Debug, Default, PartialEq, Eq)]
struct FileDecl {
    max_devices: Option<usize>,
    max_memory: Option<u64>,
    control: Option<PathBuf>,
    metrics: Option<MetricsAddr>,
    defaults: Vec<(String, String)>,
    devices: Vec<DeviceDecl>,
}

fn read_config(path: &Path) -> Result<FileDecl, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_config(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn parse_config(text: &str) -> Result<FileDecl, String> {
    let f: FileConfig = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut defaults = Vec::new();
    for (k, v) in &f.defaults {
        let v = value_str(k, v)?;
        set_device_key(&mut DeviceConfig::default(), k, &v)
            .map_err(|e| format!("[defaults]: {e}"))?;
        defaults.push((k.clone(), v));
    }
    let devices = f
        .device
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let what = format!("[[device]] {}", i + 1);
            let pairs = t
                .iter()
                .map(|(k, v)| {
                    Ok((
                        k.as_str(),
                        value_str(k, v).map_err(|e| format!("{what}: {e}"))?,
                    ))
                })
                .collect::<Result<Vec<_>, String>>()?;
            DeviceDecl::from_pairs(pairs, &what)
        })
        .collect::<Result<Vec<_>, String>>()?;
    let max_memory = match &f.max_memory {
        Some(v) => Some(parse_size("max-memory", &value_str("max-memory", v)?)?),
        None => None,
    };
    let metrics = f
        .metrics
        .as_deref()
        .map(|m| m.parse().map_err(|e| format!("metrics: {e}")))
        .transpose()?;
    Ok(FileDecl {
        max_devices: f.max_devices,
        max_memory,
        control: f.control,
        metrics,
        defaults,
        devices,
    })
}

/// What the command line asked for.
#[derive(Debug)]
struct Args {
    /// `--socket PATH` (with the global options as its device).
    socket: Option<PathBuf>,
    devices: Vec<DeviceDecl>,
    config: Option<PathBuf>,
    max_devices: Option<usize>,
    max_memory: Option<u64>,
    control: Option<PathBuf>,
    metrics: Option<MetricsAddr>,
    /// The device options given as options: defaults of every device.
    device: DeviceConfig,
    backend: String,
    ibdev: String,
    ibport: u8,
    help: bool,
}

/// `--poll-us` default of `pvrdma serve`.
const SERVE_POLL_US: u32 = 32;

fn parse(args: &[String]) -> Result<Args, String> {
    let mut out = Args {
        socket: None,
        devices: Vec::new(),
        config: None,
        max_devices: None,
        max_memory: None,
        control: None,
        metrics: None,
        device: DeviceConfig {
            // Each access crosses the socket, the server thread and the main loop: polling
            // saves two thread wake-ups per access (docs/benchmarks.md).
            poll_us: SERVE_POLL_US,
            ..DeviceConfig::default()
        },
        backend: "emulated".into(),
        ibdev: "rxe0".into(),
        ibport: 1,
        help: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (opt, inline) = match a.split_once('=') {
            Some((o, v)) if o.starts_with("--") => (o, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        if matches!(opt, "-h" | "--help") {
            out.help = true;
            continue;
        }
        let mut value = || -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{opt} needs a value"))
        };
        match opt {
            "--socket" => out.socket = Some(PathBuf::from(value()?)),
            "--device" => out.devices.push(DeviceDecl::parse(&value()?)?),
            "--config" => out.config = Some(PathBuf::from(value()?)),
            "--max-devices" => out.max_devices = Some(parse_num(opt, &value()?)?),
            "--max-memory" => out.max_memory = Some(parse_size(opt, &value()?)?),
            "--control" => out.control = Some(PathBuf::from(value()?)),
            "--metrics" => {
                out.metrics = Some(value()?.parse().map_err(|e| format!("--metrics: {e}"))?)
            }
            "--backend" => {
                let b = value()?;
                if !matches!(b.as_str(), "emulated" | "rdma-core") {
                    return Err(format!(
                        "unknown backend `{b}` (backends: {})",
                        available_backends()
                    ));
                }
                out.backend = b;
            }
            "--ibdev" => out.ibdev = value()?,
            "--ibport" => out.ibport = parse_num(opt, &value()?)?,
            "--mac" | "--max-qp" | "--max-cq" | "--max-mr" | "--max-host-mem" | "--workers"
            | "--poll-us" | "--roce-version" => {
                set_device_key(&mut out.device, &opt[2..], &value()?)?
            }
            other => return Err(format!("unknown option `{other}`\n\n{HELP}")),
        }
    }
    Ok(out)
}

/// The backends this binary can offer here, for messages.
fn available_backends() -> String {
    let rc = match rdma_backend::rdma_core::available() {
        Ok(()) => "rdma-core".to_string(),
        Err(e) => format!("rdma-core unavailable here: {e}"),
    };
    format!("emulated; {rc}")
}

/// The backend choice for the server; checks that rdma-core can run here.
fn backend_choice(a: &Args) -> Result<pvrdma_vfio_user::BackendChoice, String> {
    if a.backend == "emulated" {
        return Ok(pvrdma_vfio_user::BackendChoice::Emulated);
    }
    {
        use rdma_backend::rdma_core;
        rdma_core::available().map_err(|e| {
            format!("--backend rdma-core: {e}; install rdma-core (libibverbs1) or use --backend emulated")
        })?;
        let cfg = rdma_core::Config {
            ibdev: a.ibdev.clone(),
            port: a.ibport,
            // Each device gets the link-local GID of its own MAC (`pvrdma_vfio_user`).
            gids: Vec::new(),
        };
        // Open the device once now, so a wrong name fails here rather than at the first client.
        struct NoSink;
        impl rdma_backend::CompletionSink for NoSink {
            fn complete(&self, _: &[rdma_backend::WorkCompletion]) {}
            fn event(&self, _: rdma_backend::AsyncEvent) {}
            fn progress_needed(&self) {}
        }
        let mem = rdma_backend::GuestMem::new(vm_memory::GuestMemoryMmap::new());
        rdma_core::RdmaCoreBackend::new(cfg.clone(), mem, std::sync::Arc::new(NoSink))
            .map_err(|e| format!("--backend rdma-core: {e}"))?;
        Ok(pvrdma_vfio_user::BackendChoice::RdmaCore(cfg))
    }
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

/// The devices of the command line and (if any) the file, in that order; the file's
/// `[defaults]` apply over the options to its own devices only. With socket activation the
/// first device listens on the inherited socket (its path left empty; the caller hands it the
/// fd), and is the only device if nothing else is declared.
fn device_specs(
    a: &Args,
    file: Option<&FileDecl>,
    activated: bool,
) -> Result<Vec<DeviceSpec>, String> {
    let mut specs = Vec::new();
    if let Some(p) = &a.socket {
        specs.push(DeviceSpec::new(p.clone(), a.device.clone()));
    }
    for d in &a.devices {
        specs.push(d.spec(&a.device)?);
    }
    if let Some(f) = file {
        let mut defaults = a.device.clone();
        for (k, v) in &f.defaults {
            set_device_key(&mut defaults, k, v)?;
        }
        for d in &f.devices {
            specs.push(d.spec(&defaults)?);
        }
    }
    if activated {
        if specs.is_empty() {
            specs.push(DeviceSpec::new(PathBuf::new(), a.device.clone()));
        }
        specs[0].socket = PathBuf::new();
    }
    Ok(specs)
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

/// An error with its chain of sources, for the one line `pvrdma` prints.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Runs the vfio-user server.
pub fn run(args: &[String]) -> Result<(), String> {
    let a = parse(args)?;
    if a.help {
        print!("{HELP}");
        return Ok(());
    }
    let file = a.config.as_deref().map(read_config).transpose()?;
    let listen_fd: Option<OwnedFd> = listen_fd_from_env();
    let activated = listen_fd.is_some();
    let mut specs = device_specs(&a, file.as_ref(), activated)?;
    let control = a
        .control
        .clone()
        .or_else(|| file.as_ref().and_then(|f| f.control.clone()));
    let metrics = a
        .metrics
        .clone()
        .or_else(|| file.as_ref().and_then(|f| f.metrics.clone()));
    if specs.is_empty() && control.is_none() {
        return Err(format!(
            "no device: give --socket, --device or --config (or --control to add them later)\n\n{HELP}"
        ));
    }
    if let Some(fd) = listen_fd {
        specs[0].listen_fd = Some(fd);
    }
    clear_stale(&specs, None)?;
    let max_devices = a
        .max_devices
        .or(file.as_ref().and_then(|f| f.max_devices))
        .unwrap_or(DEFAULT_MAX_DEVICES);
    let max_memory = a
        .max_memory
        .or(file.as_ref().and_then(|f| f.max_memory))
        .unwrap_or_else(pvrdma_vfio_user::default_max_memory);
    let backend = backend_choice(&a)?;
    let limits = HostLimits {
        max_devices,
        max_memory,
    };
    let host = Arc::new(Host::new(backend, limits).map_err(|e| chain(&e))?);
    let n = specs.len();
    host.apply(specs).map_err(|e| chain(&e))?;
    log::info!("serving {n} device(s)");
    // Devices added over the control socket take the command line's options and the file's
    // [defaults] (as they were at start) under their own keys.
    let mut defaults = a.device.clone();
    for (k, v) in file.iter().flat_map(|f| &f.defaults) {
        set_device_key(&mut defaults, k, v)?;
    }
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
    let _control = control
        .map(|p| {
            remove_stale_socket(&p)?;
            ControlServer::spawn(&p, host.clone(), Some(parser)).map_err(|e| chain(&e))
        })
        .transpose()?;
    let _metrics = metrics
        .map(|m| {
            if let MetricsAddr::Unix(p) = &m {
                remove_stale_socket(p)?;
            }
            MetricsServer::spawn(&m, host.clone()).map_err(|e| chain(&e))
        })
        .transpose()?;
    // SIGHUP: the same command line with the file as it is now.
    let reload = a.config.as_deref().map(|path| {
        let (a, host) = (&a, &*host);
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

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_options() {
        let a = parse(&args(&[
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
        ]))
        .unwrap();
        assert_eq!(a.socket.unwrap(), PathBuf::from("/tmp/x.sock"));
        assert_eq!(a.device.mac, [0, 0x11, 0x22, 0x33, 0x44, 0x55]);
        assert_eq!(
            (a.device.max_qp, a.device.max_cq, a.device.max_mr),
            (64, 32, 16)
        );
        assert_eq!((a.device.workers, a.device.roce_version), (1, 2));
        assert!(parse(&args(&["--backend", "nope"])).is_err());
        let a = parse(&args(&[
            "--backend",
            "rdma-core",
            "--ibdev",
            "x",
            "--ibport",
            "2",
        ]))
        .unwrap();
        assert_eq!((a.ibdev.as_str(), a.ibport), ("x", 2));
        // Without libibverbs (this host), rdma-core is refused clearly.
        if !std::path::Path::new("/usr/lib/x86_64-linux-gnu/libibverbs.so.1").exists() {
            assert!(backend_choice(&a).unwrap_err().contains("rdma-core"));
        }
        assert!(parse(&args(&["--mac", "00:11"])).is_err());
        assert!(parse(&args(&["--max-qp"])).is_err());
        let a = parse(&args(&["--max-host-mem", "64M", "--max-memory=2G"])).unwrap();
        assert_eq!(
            (a.device.max_host_mem, a.max_memory),
            (64 << 20, Some(2 << 30))
        );
        for (v, want) in [
            ("4096", Some(4096)),
            ("8k", Some(8192)),
            ("1G", Some(1 << 30)),
        ] {
            assert_eq!(parse_size("x", v).ok(), want, "{v}");
        }
        for bad in ["", "M", "1.5G", "-1M", "99999999999G", "1T"] {
            assert!(parse_size("x", bad).is_err(), "{bad}");
        }
        assert!(parse(&args(&["--bogus"])).is_err());
        assert!(parse(&args(&["-h"])).unwrap().help);
    }

    #[test]
    fn devices_from_the_command_line_take_the_options_as_defaults() {
        let a = parse(&args(&[
            "--device",
            "socket=/tmp/a.sock,mac=52:54:00:00:00:01",
            "--max-qp=64",
            "--device=socket=/tmp/b.sock,mac=52:54:00:00:00:02,name=vm-b,max-qp=32,workers=1",
        ]))
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
            assert!(parse(&args(&["--device", bad])).is_err(), "{bad}");
        }
        // Socket activation: the first device takes the inherited socket; alone if none.
        let a = parse(&args(&[])).unwrap();
        let specs = device_specs(&a, None, true).unwrap();
        assert_eq!(specs.len(), 1);
        assert!(specs[0].socket.as_os_str().is_empty());
        assert!(device_specs(&a, None, false).unwrap().is_empty());
    }

    #[test]
    fn a_config_file_declares_devices_over_its_defaults() {
        let f = parse_config(
            r#"
max-devices = 8
max-memory = "4G"
[defaults]
max-qp = 128
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
"#,
        )
        .unwrap();
        assert_eq!((f.max_devices, f.max_memory), (Some(8), Some(4 << 30)));
        let a = parse(&args(&["--max-cq", "64", "--max-qp", "512"])).unwrap();
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
        for bad in [
            "max-memory = \"lots\"",
            "max-devices = \"many\"",
            "colour = 1",
            "[defaults]\nmax-qp = \"x\"",
            "[defaults]\nsocket = \"/a\"",
            "[[device]]\nmac = \"52:54:00:12:34:01\"",
            "[[device]]\nsocket = \"/a\"\nmax-qp = 1.5",
            "[[device]]\nsocket = \"/a\"\nfoo = 1",
        ] {
            assert!(parse_config(bad).is_err(), "{bad}");
        }
    }
}
