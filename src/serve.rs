//! `pvrdma serve`: the standalone vfio-user backend process.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use pvrdma_dev::DeviceConfig;
use pvrdma_vfio_user::{listen_fd_from_env, serve, ServeOptions};

const HELP: &str = "usage: pvrdma serve --socket PATH [options]\n\
\n\
Serves a PVRDMA device over vfio-user on PATH until SIGINT or SIGTERM (exit status 0).\n\
Each client (QEMU: -device '{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\n\
\"path\":\"PATH\"},\"x-no-posted-writes\":true,...}') gets a fresh device; after it disconnects\n\
the next client is accepted. A stale socket file at PATH is removed. With socket activation\n\
(LISTEN_PID/LISTEN_FDS) the inherited socket is used and --socket is optional.\n\
\n\
options:\n\
\x20 --socket PATH        UNIX socket to listen on\n\
\x20 --backend emulated   RDMA backend: `emulated` (a software fabric shared by the devices of\n\
\x20                      this process) or `rdma-core` (a host RDMA device through libibverbs;\n\
\x20                      only in binaries built with the `rdma-core` feature)\n\
\x20 --ibdev NAME         host RDMA device of `rdma-core` (default rxe0)\n\
\x20 --ibport N           its port (default 1)\n\
\x20 --mac MAC            MAC of the paired vmxnet3, xx:xx:xx:xx:xx:xx (default 00:50:56:00:00:01)\n\
\x20 --max-qp N           QPs advertised and enforced (default 1024)\n\
\x20 --max-cq N           CQs (default 1024)\n\
\x20 --max-mr N           MRs (default 4096)\n\
\x20 --workers N          worker threads of the data path (default 2)\n\
\x20 --poll-us N          polling for the next access / answer before a thread sleeps, in µs\n\
\x20                      (default 32; 0 off)\n\
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

/// What the command line asked for.
#[derive(Debug)]
struct Args {
    socket: Option<PathBuf>,
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
            "--mac" => out.device.mac = parse_mac(&value()?)?,
            "--max-qp" => out.device.max_qp = parse_num(opt, &value()?)?,
            "--max-cq" => out.device.max_cq = parse_num(opt, &value()?)?,
            "--max-mr" => out.device.max_mr = parse_num(opt, &value()?)?,
            "--workers" => out.device.workers = parse_num(opt, &value()?)?,
            "--poll-us" => out.device.poll_us = parse_num(opt, &value()?)?,
            other => return Err(format!("unknown option `{other}`\n\n{HELP}")),
        }
    }
    Ok(out)
}

/// The backends this binary can offer here, for messages.
fn available_backends() -> String {
    #[cfg(feature = "rdma-core")]
    let rc = match rdma_backend::rdma_core::available() {
        Ok(()) => "rdma-core".to_string(),
        Err(e) => format!("rdma-core unavailable here: {e}"),
    };
    #[cfg(not(feature = "rdma-core"))]
    let rc = "rdma-core not built in (build with --features rdma-core)".to_string();
    format!("emulated; {rc}")
}

/// The backend choice for the server; checks that rdma-core can run here.
fn backend_choice(a: &Args) -> Result<pvrdma_vfio_user::BackendChoice, String> {
    if a.backend == "emulated" {
        return Ok(pvrdma_vfio_user::BackendChoice::Emulated);
    }
    #[cfg(feature = "rdma-core")]
    {
        use rdma_backend::rdma_core;
        rdma_core::available().map_err(|e| {
            format!("--backend rdma-core: {e}; install rdma-core (libibverbs1) or use --backend emulated")
        })?;
        let cfg = rdma_core::Config {
            ibdev: a.ibdev.clone(),
            port: a.ibport,
        };
        // Open the device once now, so a wrong name fails here rather than at the first client.
        struct NoSink;
        impl rdma_backend::CompletionSink for NoSink {
            fn complete(&self, _: &[rdma_backend::WorkCompletion]) {}
            fn event(&self, _: rdma_backend::AsyncEvent) {}
        }
        let mem = rdma_backend::GuestMem::new(vm_memory::GuestMemoryMmap::new());
        rdma_core::RdmaCoreBackend::new(cfg.clone(), mem, std::sync::Arc::new(NoSink))
            .map_err(|e| format!("--backend rdma-core: {e}"))?;
        Ok(pvrdma_vfio_user::BackendChoice::RdmaCore(cfg))
    }
    #[cfg(not(feature = "rdma-core"))]
    Err(format!(
        "--backend rdma-core: not built into this binary (build with --features rdma-core); \
         backends: {}",
        available_backends()
    ))
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

/// Runs the vfio-user server.
pub fn run(args: &[String]) -> Result<(), String> {
    let a = parse(args)?;
    if a.help {
        print!("{HELP}");
        return Ok(());
    }
    let listen_fd = listen_fd_from_env();
    let socket = match (&a.socket, &listen_fd) {
        (Some(p), None) => {
            remove_stale_socket(p)?;
            p.clone()
        }
        (p, Some(_)) => p.clone().unwrap_or_default(),
        (None, None) => return Err(format!("--socket is required\n\n{HELP}")),
    };
    a.device.validate().map_err(|e| e.to_string())?;
    let backend = backend_choice(&a)?;
    let opts = ServeOptions {
        socket,
        listen_fd,
        device: a.device,
        backend,
    };
    log::info!("serving on {}", opts.socket.display());
    serve(opts).map_err(|e| {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(c) = src {
            s.push_str(": ");
            s.push_str(&c.to_string());
            src = c.source();
        }
        s
    })
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
        assert_eq!(a.device.workers, 1);
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
        // Without the feature, or without libibverbs (this host), rdma-core is refused clearly.
        if cfg!(not(feature = "rdma-core"))
            || !std::path::Path::new("/usr/lib/x86_64-linux-gnu/libibverbs.so.1").exists()
        {
            assert!(backend_choice(&a).unwrap_err().contains("rdma-core"));
        }
        assert!(parse(&args(&["--mac", "00:11"])).is_err());
        assert!(parse(&args(&["--max-qp"])).is_err());
        assert!(parse(&args(&["--bogus"])).is_err());
        assert!(parse(&args(&["-h"])).unwrap().help);
    }
}
