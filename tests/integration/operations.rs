//! The operator's view of a `pvrdma serve` process: its control socket through `pvrdma ctl`
//! (tables and JSON), its Prometheus metrics scraped while a client's traffic runs and parsed
//! with a Prometheus text parser, and the bounded log of a guest ringing a million bad
//! doorbells.

use std::io::{BufRead, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use pvrdma_dev::regs::uar;
use pvrdma_dev::Region;
use pvrdma_guest::vfio::ServeProcess;
use pvrdma_guest::Transport;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_pvrdma");

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pvrdma-ops-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `pvrdma ctl --control CONTROL ARGS…`: exit status, stdout, stderr.
fn ctl(control: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("ctl")
        .arg("--control")
        .arg(control)
        .args(args)
        .output()
        .expect("pvrdma ctl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `pvrdma ctl --json …` that must succeed, parsed.
fn ctl_json(control: &Path, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let (code, out, err) = ctl(control, &a);
    assert_eq!(code, 0, "pvrdma ctl {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// One scrape of the metrics served on the UNIX socket `path`: the body, parsed by
/// `prometheus-parse`, and the number of sample lines in it (the parser skips lines it cannot
/// read, so the two counts must agree).
fn scrape(path: &Path) -> (prometheus_parse::Scrape, usize) {
    let mut s = UnixStream::connect(path).expect("metrics socket");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    assert!(head
        .to_ascii_lowercase()
        .contains("content-type: application/openmetrics-text"));
    assert!(
        body.ends_with("# EOF\n"),
        "an OpenMetrics body ends with # EOF"
    );
    let lines = body.lines().filter(|l| !l.starts_with('#')).count();
    let parsed = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    (parsed, lines)
}

/// The value of `metric` with exactly the labels `labels` in `s`.
fn sample(s: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| {
            x.metric == metric
                && x.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v))
        })
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

/// A client's SENDs of known count and size, read back through `pvrdma ctl` (its tables and
/// its JSON) and through Prometheus scrapes taken while the traffic runs; the device list
/// follows the client's connection; devices are added and removed over the socket; the socket
/// is its owner's only.
#[test]
fn the_control_socket_and_the_metrics_show_a_clients_traffic() {
    let _shared = shared();
    let dir = temp_dir("traffic");
    let control = dir.join("control.sock");
    let metrics = dir.join("metrics.sock");
    let server = ServeProcess::spawn(
        Path::new(BIN),
        &[
            "--mac",
            "00:50:56:12:34:56",
            "--workers",
            "2",
            "--control",
            control.to_str().unwrap(),
            "--metrics",
            &format!("unix:{}", metrics.display()),
        ],
    )
    .expect("pvrdma serve starts");
    let mode = std::fs::metadata(&control).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");

    let list = ctl_json(&control, &["list"]);
    assert_eq!(list[0]["name"], "pvrdma");
    assert_eq!(list[0]["connected"], false);
    let (code, table, _) = ctl(&control, &["list"]);
    assert_eq!(code, 0);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("00:50:56:12:34:56") && table.contains("emulated"),
        "{table}"
    );

    let (_client, drv) = probed_over(&server);
    let list = ctl_json(&control, &["list"]);
    assert_eq!(
        (&list[0]["connected"], &list[0]["clients"]),
        (&Value::Bool(true), &1.into())
    );

    let mut p = rc_pair(&drv, MAC, 32, 1);
    let m = drv.reg_mr(p.pd, 0x10_0000, 1 << 16, ALL_ACCESS).unwrap();
    // Scrapes while the traffic runs: each must parse completely.
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let (stop, metrics) = (stop.clone(), metrics.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) || n == 0 {
                let (s, lines) = scrape(&metrics);
                assert_eq!(s.samples.len(), lines, "every sample line parses");
                assert_eq!(sample(&s, "pvrdma_devices", &[]), Some(1.0));
                n += 1;
            }
            n
        })
    };
    const ROUNDS: u64 = 20;
    const BATCH: u64 = 16;
    const SIZE: u32 = 100;
    for r in 0..ROUNDS {
        for i in 0..BATCH {
            assert!(drv.post_recv(&mut p.b, r * BATCH + i, &[m.sge(32768, 256)]));
        }
        for i in 0..BATCH {
            assert!(drv.post_send(&mut p.a, &send(r * BATCH + i, m.sge(0, SIZE))));
        }
        assert_eq!(
            drv.wait_cqes(&mut p.cq_a, BATCH as usize, WAIT).len(),
            BATCH as usize
        );
        assert_eq!(
            drv.wait_cqes(&mut p.cq_b, BATCH as usize, WAIT).len(),
            BATCH as usize
        );
    }
    stop.store(true, Ordering::Relaxed);
    let scrapes = scraper.join().expect("every scrape parsed");
    assert!(scrapes >= 1);

    const N: u64 = ROUNDS * BATCH;
    let stats = ctl_json(&control, &["stats", "pvrdma"]);
    assert_eq!(stats["send"]["SEND"]["wqes"], N, "{stats}");
    assert_eq!(stats["send"]["SEND"]["bytes"], N * u64::from(SIZE));
    assert_eq!(stats["recv"]["RECV"]["wqes"], N);
    assert_eq!(stats["recv"]["RECV"]["bytes"], N * u64::from(SIZE));
    assert!(stats["cqes"].as_u64().unwrap() >= 2 * N);
    assert_eq!(stats["objects"]["qps"], 2);
    assert!(stats["commands_by_code"]["CREATE_QP"]["count"].as_u64() == Some(2));

    let (s, lines) = scrape(&metrics);
    assert_eq!(s.samples.len(), lines);
    let dev = [("device", "pvrdma")];
    let op = |o| [("device", "pvrdma"), ("opcode", o)];
    assert_eq!(
        sample(&s, "pvrdma_device_send_wqes_total", &op("SEND")),
        Some(N as f64)
    );
    assert_eq!(
        sample(&s, "pvrdma_device_recv_bytes_total", &op("RECV")),
        Some((N * u64::from(SIZE)) as f64)
    );
    assert_eq!(sample(&s, "pvrdma_device_connected", &dev), Some(1.0));
    assert_eq!(sample(&s, "pvrdma_device_clients_total", &dev), Some(1.0));
    assert_eq!(
        sample(
            &s,
            "pvrdma_device_objects",
            &[("device", "pvrdma"), ("kind", "qps")]
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(&s, "pvrdma_device_cqes_total", &dev),
        stats["cqes"].as_u64().map(|v| v as f64)
    );

    // Each QP in the scrape too, with its own counts and its peer.
    let qa = p.a.qpn.to_string();
    let qb = p.b.qpn.to_string();
    assert_eq!(
        sample(
            &s,
            "pvrdma_qp_send_wqes_total",
            &[("device", "pvrdma"), ("qpn", &qa)]
        ),
        Some(N as f64)
    );
    assert_eq!(
        sample(
            &s,
            "pvrdma_qp_recv_bytes_total",
            &[("device", "pvrdma"), ("qpn", &qb)]
        ),
        Some((N * u64::from(SIZE)) as f64)
    );
    let info = s
        .samples
        .iter()
        .find(|x| x.metric == "pvrdma_qp_info" && x.labels.get("qpn") == Some(qa.as_str()))
        .expect("pvrdma_qp_info of QP a");
    assert_eq!(info.labels.get("state"), Some("RTS"));
    assert_eq!(info.labels.get("type"), Some("RC"));
    assert_eq!(info.labels.get("peer_qpn"), Some(qb.as_str()));

    // The objects, like `rdma resource show`: each QP with its own counts, and GID 0.
    let res = ctl_json(&control, &["resources", "pvrdma"]);
    let qps = res["qps"].as_array().unwrap();
    let qp = |qpn: u32| qps.iter().find(|q| q["qpn"] == qpn).expect("listed");
    assert_eq!(qp(p.a.qpn)["counters"]["send_wqes"], N);
    assert_eq!(qp(p.b.qpn)["counters"]["recv_bytes"], N * u64::from(SIZE));
    assert_eq!(qp(p.a.qpn)["peer"]["qpn"], p.b.qpn);
    assert_eq!(qp(p.a.qpn)["state"], "RTS");
    assert_eq!(res["gids"][0]["index"], 0);
    let (code, table, _) = ctl(&control, &["resources", "pvrdma", "qp"]);
    assert_eq!(code, 0);
    assert!(
        table.starts_with("QPS:") && table.contains("RTS"),
        "{table}"
    );
    assert!(!table.contains("CQS:"), "only the kind asked for: {table}");

    // Devices added and removed at run time; refusals exit 1, a missing server 2.
    let vm2 = dir.join("vm2.sock");
    let added = ctl_json(
        &control,
        &[
            "add",
            &format!("socket={},mac=00:50:56:00:00:22,max-qp=8", vm2.display()),
        ],
    );
    assert_eq!(
        (&added["name"], &added["max_qp"]),
        (&"vm2".into(), &8.into())
    );
    assert!(vm2.exists());
    assert_eq!(ctl_json(&control, &["list"]).as_array().unwrap().len(), 2);
    let (code, _, err) = ctl(
        &control,
        &[
            "add",
            &format!("socket={}/vm3.sock,mac=00:50:56:00:00:22", dir.display()),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("MAC"), "{err}");
    let (code, _, _) = ctl(&control, &["remove", "vm2"]);
    assert_eq!(code, 0);
    assert!(!vm2.exists());
    let (code, _, err) = ctl(&control, &["stats", "vm2"]);
    assert_eq!((code, err.trim()), (1, "pvrdma ctl: no device `vm2`"));
    let (code, _, err) = ctl(&dir.join("nobody.sock"), &["list"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, _) = ctl(&control, &["frobnicate"]);
    assert_eq!(code, 2);

    drop(p);
    drop(drv);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `pvrdma serve` with a control socket whose log goes to a file: (its directory, the
/// control socket, the log file, the process).
fn logging_server(name: &str) -> (PathBuf, PathBuf, PathBuf, ServeProcess) {
    let dir = temp_dir(name);
    let control = dir.join("control.sock");
    let log_path = dir.join("serve.log");
    let server = ServeProcess::spawn_logging(
        Path::new(BIN),
        &[
            "--mac",
            "00:50:56:12:34:56",
            "--control",
            control.to_str().unwrap(),
        ],
        std::fs::File::create(&log_path).unwrap(),
    )
    .expect("pvrdma serve starts");
    (dir, control, log_path, server)
}

/// A guest ringing a million doorbells that ring nothing: the counter says 1,000,000, the
/// process's log a few lines (the first ones, then one with the count left out), and the
/// device still serves.
#[test]
fn a_million_bad_doorbells_make_one_counter_and_few_log_lines() {
    let _alone = alone();
    let (dir, control, log_path, mut server) = logging_server("flood");
    let (client, drv) = probed_over(&server);
    let before = ctl_json(&control, &["stats", "pvrdma"])["refused"]["doorbells"]
        .as_u64()
        .unwrap();
    let tr: &dyn Transport = &*client;
    // UAR page 511 belongs to no context.
    for i in 0..1_000_000u32 {
        tr.write(
            Region::Bar(2),
            (511 << 12) | uar::QP,
            &(i | (1 << 31)).to_le_bytes(),
        );
    }
    assert_device_healthy(&drv);
    let after = ctl_json(&control, &["stats", "pvrdma"])["refused"]["doorbells"]
        .as_u64()
        .unwrap();
    assert_eq!(after - before, 1_000_000);
    drop(drv);
    drop(client);
    server
        .terminate(Duration::from_secs(30))
        .expect("serve stops");
    let log = std::fs::File::open(&log_path).unwrap();
    let lines: Vec<String> = std::io::BufReader::new(log)
        .lines()
        .map_while(Result::ok)
        .collect();
    let about = lines.iter().filter(|l| l.contains("doorbell")).count();
    assert!(
        lines.len() < 100,
        "{} log lines:\n{}",
        lines.len(),
        lines.join("\n")
    );
    assert!(
        (1..=20).contains(&about),
        "{about} doorbell lines:\n{}",
        lines.join("\n")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client that connects and goes in a loop: every connection is served (and counted), the
/// log keeps a bounded number of lines about them.
#[test]
fn a_client_reconnecting_in_a_loop_writes_few_lines() {
    let _shared = shared();
    let (dir, control, log_path, mut server) = logging_server("reconnect");
    const N: u64 = 300;
    for _ in 0..N {
        drop(UnixStream::connect(server.socket()).expect("connect"));
    }
    let deadline = std::time::Instant::now() + WAIT;
    while ctl_json(&control, &["list"])[0]["clients"] != N {
        assert!(
            std::time::Instant::now() < deadline,
            "not every client was served"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server
        .terminate(Duration::from_secs(30))
        .expect("serve stops");
    let text = std::fs::read_to_string(&log_path).unwrap();
    let about = text.lines().filter(|l| l.contains("client")).count();
    // 600 connect and disconnect lines without the budget; 10 a minute with it.
    assert!(
        (2..=10).contains(&about),
        "{about} lines about clients:\n{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
