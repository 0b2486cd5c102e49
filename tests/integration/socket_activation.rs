//! `pvrdma serve` started the way systemd starts it from a socket unit: the socket is bound by
//! the service manager and inherited as fd 3 (`LISTEN_FDS`/`LISTEN_PID`), and the command line
//! names no socket. `systemd-socket-activate` (Debian's `systemd` package; `scripts/test`
//! installs it) does exactly what `contrib/systemd/pvrdma@.socket` makes systemd do. Without it
//! the test says so and passes, except under CI (`CI=true`), where it fails.
//! Alone: `cargo test -p pvrdma --test integration socket_activation::`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pvrdma_guest::vfio::VfioUser;
use pvrdma_guest::{kernel, Driver, Transport};

use crate::common::{assert_device_healthy, MAC};

/// `systemd-socket-activate`, if installed.
fn socket_activate() -> Option<PathBuf> {
    let p = Path::new("/usr/bin/systemd-socket-activate");
    if p.exists() {
        return Some(p.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("systemd-socket-activate"))
            .find(|p| p.exists())
    })
}

#[test]
fn serve_takes_the_socket_systemd_hands_it() {
    let _shared = crate::common::shared();
    let Some(tool) = socket_activate() else {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(
            !ci,
            "systemd-socket-activate is missing (Debian package `systemd`; scripts/test installs \
             it): the socket-activation path of `pvrdma serve` is untested"
        );
        println!("skipped: no systemd-socket-activate here (apt-get install systemd)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("pvrdma-activate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("vm.sock");
    let log_path = dir.join("serve.log");
    let mac: Vec<String> = MAC.iter().map(|b| format!("{b:02x}")).collect();
    // What ExecStart= of contrib/systemd/pvrdma@.service runs, under the socket unit's socket.
    let mut child = Command::new(&tool)
        .arg("-l")
        .arg(&sock)
        .arg(env!("CARGO_BIN_EXE_pvrdma"))
        .args(["serve", "--log-format", "json", "--workers", "1", "--mac"])
        .arg(mac.join(":"))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("run systemd-socket-activate");
    let t = Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no socket {}",
            sock.display()
        );
        assert!(child.try_wait().unwrap().is_none(), "exited early");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The socket is the service manager's; the server may still be starting: the connection
    // waits in the backlog until it accepts.
    let client = Arc::new(VfioUser::connect(&sock).expect("vfio-user connect"));
    let drv = Driver::probe(client.clone() as Arc<dyn Transport>).expect("probe");
    kernel::ib_register(&drv, MAC).expect("ib registration");
    assert_device_healthy(&drv);
    drop(drv);
    drop(client);
    // systemd-socket-activate execs the program: the child is `pvrdma serve` itself.
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "pvrdma serve did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(status.success(), "exit status {status}; log:\n{log}");
    // Its log: JSON lines at the daemon's default level (info), each with its thread's name
    // (after systemd-socket-activate's own lines).
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let says = |s: &str| {
        lines
            .iter()
            .any(|l| l["message"].as_str().is_some_and(|m| m.contains(s)))
    };
    assert!(says("an inherited socket"), "{log}");
    assert!(says("serving 1 device(s)"), "{log}");
    assert!(lines.iter().all(|l| l["threadName"].is_string()), "{log}");
    assert!(
        lines
            .iter()
            .all(|l| l["level"] != "DEBUG" && l["level"] != "TRACE"),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
