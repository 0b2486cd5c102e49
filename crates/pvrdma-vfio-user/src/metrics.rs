//! Prometheus metrics of `pvrdma serve`: every device's counters and the process's totals in
//! the text exposition format (OpenMetrics text, `prometheus-client`), served over HTTP
//! (`tiny_http`) at `/metrics` on a loopback TCP address or a UNIX socket the operator names.
//!
//! Each scrape reads the devices' counters then and there ([`Host::status`],
//! `DeviceHandle::stats`); nothing is kept between scrapes. A device's counters belong to the
//! device of its current client: they start again from zero when the next client connects
//! (Prometheus sees a counter reset), and `pvrdma_device_clients_total` counts the clients.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
#[cfg(test)]
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::host::Host;
use crate::{Error, Result};

/// Where the metrics are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    /// A loopback TCP address.
    Tcp(SocketAddr),
    /// A UNIX socket path.
    Unix(PathBuf),
}

impl std::str::FromStr for MetricsAddr {
    type Err = String;

    /// `unix:PATH` or an absolute path: a UNIX socket; otherwise `IP:PORT` on loopback
    /// (`127.0.0.1:9464`, `[::1]:9464`).
    fn from_str(s: &str) -> std::result::Result<MetricsAddr, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(MetricsAddr::Unix(PathBuf::from(p)));
        }
        if s.starts_with('/') {
            return Ok(MetricsAddr::Unix(PathBuf::from(s)));
        }
        let a: SocketAddr = s
            .parse()
            .map_err(|_| format!("`{s}` is neither IP:PORT nor unix:PATH (e.g. 127.0.0.1:9464)"))?;
        if !a.ip().is_loopback() {
            return Err(format!(
                "`{s}` is not a loopback address: the metrics name every VM of this host, serve \
                 them on 127.0.0.1 or ::1 (or a UNIX socket) and let a proxy expose them"
            ));
        }
        Ok(MetricsAddr::Tcp(a))
    }
}

/// The devices of a host as a `prometheus-client` collector, read at each scrape.
#[derive(Debug)]
struct HostCollector(Arc<Host>);

/// A count as a gauge's or counter's value (saturating).
fn sat(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

type FmtResult = std::result::Result<(), std::fmt::Error>;

/// One device-labelled family: `rows` are (device, labels besides `device`, value).
struct Family {
    name: &'static str,
    help: &'static str,
    counter: bool,
    rows: Vec<(Vec<(&'static str, String)>, i64)>,
}

impl Family {
    fn new(name: &'static str, help: &'static str, counter: bool) -> Family {
        Family {
            name,
            help,
            counter,
            rows: Vec::new(),
        }
    }

    fn encode(&self, enc: &mut DescriptorEncoder) -> FmtResult {
        let ty = if self.counter {
            prometheus_client::metrics::MetricType::Counter
        } else {
            prometheus_client::metrics::MetricType::Gauge
        };
        let mut family = enc.encode_descriptor(self.name, self.help, None, ty)?;
        for (labels, v) in &self.rows {
            let m = family.encode_family(labels)?;
            if self.counter {
                ConstCounter::new(u64::try_from(*v).unwrap_or(0)).encode(m)?;
            } else {
                ConstGauge::new(*v).encode(m)?;
            }
        }
        Ok(())
    }
}

impl Collector for HostCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> FmtResult {
        let host = &self.0;
        let status = host.status();
        let limits = host.limits();
        let gauge = |enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64| -> FmtResult {
            ConstGauge::new(v).encode(enc.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?)
        };
        gauge(
            &mut enc,
            "pvrdma_devices",
            "Devices served.",
            status.len() as i64,
        )?;
        gauge(
            &mut enc,
            "pvrdma_max_devices",
            "Devices this process serves at most.",
            limits.max_devices as i64,
        )?;
        gauge(
            &mut enc,
            "pvrdma_max_memory_bytes",
            "Host memory the devices' budgets may add up to.",
            sat(limits.max_memory),
        )?;
        gauge(
            &mut enc,
            "pvrdma_memory_budget_bytes",
            "The devices' host-memory budgets added up.",
            sat(status
                .iter()
                .map(|d| d.max_host_mem)
                .fold(0, u64::saturating_add)),
        )?;
        for f in device_families(host, &status)
            .iter()
            .chain(&qp_families(host, &status))
        {
            f.encode(&mut enc)?;
        }
        Ok(())
    }
}

/// The fields of a plain struct of counters (`Refused`, `Interrupts`, …) as (name, value).
fn fields<T: serde::Serialize>(v: &T) -> Vec<(String, u64)> {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::Object(m)) => m
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.as_u64()?)))
            .collect(),
        _ => Vec::new(),
    }
}

/// The per-device families, read now.
fn device_families(host: &Host, status: &[crate::host::DeviceStatus]) -> Vec<Family> {
    let fam = Family::new;
    let mut f = [
        fam(
            "pvrdma_device_connected",
            "Whether a VMM is connected.",
            false,
        ),
        fam(
            "pvrdma_device_clients",
            "Clients accepted since the device was added.",
            true,
        ),
        fam(
            "pvrdma_device_host_memory_limit_bytes",
            "Host memory the device's guest may make the process hold.",
            false,
        ),
        fam(
            "pvrdma_device_host_memory_bytes",
            "Host memory the device's live objects reserve.",
            false,
        ),
        fam("pvrdma_device_objects", "Live objects by kind.", false),
        fam(
            "pvrdma_device_commands",
            "Commands executed, by code.",
            true,
        ),
        fam(
            "pvrdma_device_command_errors",
            "Commands that failed, by code.",
            true,
        ),
        fam("pvrdma_device_doorbells", "Doorbells rung.", true),
        fam(
            "pvrdma_device_send_wqes",
            "Send work requests taken from the guest's send queues, by opcode.",
            true,
        ),
        fam(
            "pvrdma_device_send_bytes",
            "Bytes those work requests carry, by opcode.",
            true,
        ),
        fam(
            "pvrdma_device_recv_wqes",
            "Receive completions written, by opcode.",
            true,
        ),
        fam(
            "pvrdma_device_recv_bytes",
            "Bytes received, by opcode.",
            true,
        ),
        fam(
            "pvrdma_device_cqes",
            "Completions written to the guest's CQs.",
            true,
        ),
        fam(
            "pvrdma_device_stale_completions",
            "Completions dropped because their QP or CQ was gone.",
            true,
        ),
        fam(
            "pvrdma_device_cq_overflows",
            "Completions lost to a full CQ.",
            true,
        ),
        fam(
            "pvrdma_device_interrupts",
            "Interrupts raised, by vector.",
            true,
        ),
        fam(
            "pvrdma_device_async_events",
            "Asynchronous events posted.",
            true,
        ),
        fam("pvrdma_device_resets", "Device resets.", true),
        fam(
            "pvrdma_device_refused",
            "Guest input refused, by kind.",
            true,
        ),
    ];
    for d in status {
        let l = |extra: Option<(&'static str, &str)>| {
            let mut v = vec![("device", d.name.clone())];
            v.extend(extra.map(|(k, x)| (k, x.to_string())));
            v
        };
        let [connected, clients, budget, mem, objects, commands, command_errors, doorbells, send_wqes, send_bytes, recv_wqes, recv_bytes, cqes, stale, overflows, interrupts, events, resets, refused] =
            &mut f;
        connected.rows.push((l(None), i64::from(d.connected)));
        clients.rows.push((l(None), sat(d.clients)));
        budget.rows.push((l(None), sat(d.max_host_mem)));
        let Some(s) = host.device(&d.name).and_then(|h| h.stats().ok()) else {
            continue;
        };
        mem.rows.push((l(None), sat(s.host_mem)));
        for (kind, n) in fields(&s.objects) {
            objects.rows.push((l(Some(("kind", &kind))), sat(n)));
        }
        for (code, c) in &s.commands_by_code {
            commands.rows.push((l(Some(("code", code))), sat(c.count)));
            command_errors
                .rows
                .push((l(Some(("code", code))), sat(c.errors)));
        }
        doorbells.rows.push((l(None), sat(s.doorbells)));
        for (op, c) in &s.send {
            send_wqes.rows.push((l(Some(("opcode", op))), sat(c.wqes)));
            send_bytes
                .rows
                .push((l(Some(("opcode", op))), sat(c.bytes)));
        }
        for (op, c) in &s.recv {
            recv_wqes.rows.push((l(Some(("opcode", op))), sat(c.wqes)));
            recv_bytes
                .rows
                .push((l(Some(("opcode", op))), sat(c.bytes)));
        }
        cqes.rows.push((l(None), sat(s.cqes)));
        stale.rows.push((l(None), sat(s.stale_completions)));
        overflows.rows.push((l(None), sat(s.cq_overflows)));
        for (v, n) in fields(&s.interrupts) {
            interrupts.rows.push((l(Some(("vector", &v))), sat(n)));
        }
        events.rows.push((l(None), sat(s.events)));
        resets.rows.push((l(None), sat(s.resets)));
        for (kind, n) in fields(&s.refused) {
            refused.rows.push((l(Some(("kind", &kind))), sat(n)));
        }
    }
    f.into()
}

/// The per-QP families of every device's live QPs, read now: `pvrdma_qp_info` (1, with the
/// QP's type, state and peer as labels) and its counters, each labelled `device` and `qpn`.
fn qp_families(host: &Host, status: &[crate::host::DeviceStatus]) -> Vec<Family> {
    let fam = Family::new;
    let mut f = [
        fam(
            "pvrdma_qp_info",
            "A live QP (always 1): its type, state and peer in the labels.",
            false,
        ),
        fam(
            "pvrdma_qp_send_wqes",
            "Send work requests the QP posted.",
            true,
        ),
        fam(
            "pvrdma_qp_send_bytes",
            "Bytes its send work requests carry.",
            true,
        ),
        fam(
            "pvrdma_qp_recv_wqes",
            "Receive completions of the QP.",
            true,
        ),
        fam("pvrdma_qp_recv_bytes", "Bytes the QP received.", true),
        fam(
            "pvrdma_qp_error_completions",
            "Completions of the QP with an error status.",
            true,
        ),
        fam("pvrdma_qp_bad_wqes", "Malformed WQEs the QP posted.", true),
        fam(
            "pvrdma_qp_rnr_waits",
            "Receiver-not-ready waits (emulated backend).",
            true,
        ),
        fam(
            "pvrdma_qp_retries",
            "Transport retries (emulated backend).",
            true,
        ),
    ];
    for d in status {
        let Some(res) = host.device(&d.name).and_then(|h| h.resources().ok()) else {
            continue;
        };
        for q in &res.qps {
            let l = || vec![("device", d.name.clone()), ("qpn", q.qpn.to_string())];
            let mut info = l();
            info.push(("type", q.qp_type.clone()));
            info.push(("state", q.state.clone()));
            if let Some(p) = &q.peer {
                info.push(("peer_gid", p.gid.clone()));
                info.push(("peer_qpn", p.qpn.to_string()));
            }
            let c = &q.counters;
            let [qp_info, send_wqes, send_bytes, recv_wqes, recv_bytes, errors, bad, rnr, retries] =
                &mut f;
            qp_info.rows.push((info, 1));
            send_wqes.rows.push((l(), sat(c.send_wqes)));
            send_bytes.rows.push((l(), sat(c.send_bytes)));
            recv_wqes.rows.push((l(), sat(c.recv_wqes)));
            recv_bytes.rows.push((l(), sat(c.recv_bytes)));
            errors.rows.push((l(), sat(c.error_completions)));
            bad.rows.push((l(), sat(c.bad_wqes)));
            if let Some(n) = c.rnr_waits {
                rnr.rows.push((l(), sat(n)));
            }
            if let Some(n) = c.retries {
                retries.rows.push((l(), sat(n)));
            }
        }
    }
    f.into()
}

/// The text of one scrape of `host`.
pub fn render(host: &Arc<Host>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(HostCollector(host.clone())));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        log::warn!("metrics: cannot encode: {e}");
    }
    out
}

/// A running metrics endpoint; stopped on [`MetricsServer::stop`] or drop.
pub struct MetricsServer {
    server: Option<Arc<tiny_http::Server>>,
    unix: Option<PathBuf>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("unix", &self.unix)
            .finish_non_exhaustive()
    }
}

/// The OpenMetrics text content type `prometheus-client` writes.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl MetricsServer {
    /// Serves `host`'s metrics at `addr` on a thread of its own.
    pub fn spawn(addr: &MetricsAddr, host: Arc<Host>) -> Result<MetricsServer> {
        let (server, unix) = match addr {
            MetricsAddr::Tcp(a) => {
                let l = TcpListener::bind(a).map_err(|source| Error::Listen {
                    path: PathBuf::from(a.to_string()),
                    source,
                })?;
                (tiny_http::Server::from_listener(l, None), None)
            }
            MetricsAddr::Unix(p) => {
                // Bound at its own path: tiny_http wakes its accept thread at drop by
                // connecting to the address the listener was bound to.
                let l =
                    std::os::unix::net::UnixListener::bind(p).map_err(|source| Error::Listen {
                        path: p.clone(),
                        source,
                    })?;
                (tiny_http::Server::from_listener(l, None), Some(p.clone()))
            }
        };
        let server =
            Arc::new(server.map_err(|e| Error::Socket(std::io::Error::other(e.to_string())))?);
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("pvrdma-metrics".into())
            .spawn(move || {
                for req in s.incoming_requests() {
                    respond(req, &host);
                }
            })
            .map_err(Error::Spawn)?;
        log::info!("metrics on {}", describe(addr));
        Ok(MetricsServer {
            server: Some(server),
            unix,
            thread: Some(thread),
        })
    }

    /// The TCP address it listens on (with the port the system chose for port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.server.as_ref()?.server_addr().to_ip()
    }

    /// Stops serving and closes the socket.
    pub fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.unblock();
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
            // The last reference: dropping it ends tiny_http's accept thread and the listener.
            drop(server);
        }
        if let Some(p) = &self.unix {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn describe(addr: &MetricsAddr) -> String {
    match addr {
        MetricsAddr::Tcp(a) => format!("http://{a}/metrics"),
        MetricsAddr::Unix(p) => format!("{} (HTTP, /metrics)", Path::display(p)),
    }
}

fn respond(req: tiny_http::Request, host: &Arc<Host>) {
    use tiny_http::{Header, Method, Response};
    let path = req.url().split('?').next().unwrap_or("");
    let r = match (req.method(), path) {
        (Method::Get, "/metrics") => {
            let header = Header::from_bytes("Content-Type", CONTENT_TYPE).ok();
            let mut resp = Response::from_string(render(host));
            if let Some(h) = header {
                resp = resp.with_header(h);
            }
            req.respond(resp)
        }
        (Method::Get, _) => {
            req.respond(Response::from_string("see /metrics\n").with_status_code(404))
        }
        _ => req.respond(Response::from_string("GET only\n").with_status_code(405)),
    };
    if let Err(e) = r {
        log::debug!("metrics: answering a scrape failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BackendChoice, DeviceSpec, HostLimits};
    use std::io::{Read, Write};

    #[test]
    fn addresses_are_loopback_or_unix() {
        let ok = |s: &str| s.parse::<MetricsAddr>().unwrap();
        assert_eq!(
            ok("127.0.0.1:9464"),
            MetricsAddr::Tcp("127.0.0.1:9464".parse().unwrap())
        );
        assert_eq!(
            ok("[::1]:9464"),
            MetricsAddr::Tcp("[::1]:9464".parse().unwrap())
        );
        assert_eq!(
            ok("unix:/run/m.sock"),
            MetricsAddr::Unix("/run/m.sock".into())
        );
        assert_eq!(ok("/run/m.sock"), MetricsAddr::Unix("/run/m.sock".into()));
        let err = "0.0.0.0:9464".parse::<MetricsAddr>().unwrap_err();
        assert!(err.contains("not a loopback"), "{err}");
        assert!("localhost".parse::<MetricsAddr>().is_err());
    }

    fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r
    }

    #[test]
    fn a_scrape_over_tcp_parses_and_names_every_device() {
        let host = Arc::new(Host::new(BackendChoice::Emulated, HostLimits::default()).unwrap());
        let d = std::env::temp_dir().join(format!("pvrdma-metrics-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        for (n, last) in [("a", 1u8), ("b", 2)] {
            let mut cfg = pvrdma_dev::DeviceConfig::default();
            cfg.mac[5] = last;
            host.add(DeviceSpec::new(d.join(format!("{n}.sock")), cfg))
                .unwrap();
        }
        let addr: MetricsAddr = "127.0.0.1:0".parse().unwrap();
        let mut server = MetricsServer::spawn(&addr, host.clone()).unwrap();
        let at = server.local_addr().unwrap();
        let r = get(at, "GET /metrics HTTP/1.0\r\n\r\n");
        let (_, body) = r.split_once("\r\n\r\n").unwrap();
        let lines = body.lines().filter(|l| !l.starts_with('#')).count();
        let s = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
        assert_eq!(s.samples.len(), lines, "{body}");
        for dev in ["a", "b"] {
            assert!(
                s.samples
                    .iter()
                    .any(|x| x.metric == "pvrdma_device_connected"
                        && x.labels.get("device") == Some(dev)),
                "{body}"
            );
        }
        assert!(get(at, "GET /other HTTP/1.0\r\n\r\n").contains(" 404 "));
        assert!(get(at, "POST /metrics HTTP/1.0\r\n\r\n").contains(" 405 "));
        server.stop();
        // tiny_http's accept thread closes the listener once woken.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(at).is_ok() {
            assert!(std::time::Instant::now() < deadline, "still listening");
            std::thread::sleep(Duration::from_millis(10));
        }
        host.stop(Duration::ZERO);
        let _ = std::fs::remove_dir_all(&d);
    }
}
