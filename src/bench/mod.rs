//! `pvrdma bench`: perftest-style figures through the real guest rings, over the in-process
//! device and over a `pvrdma serve` process (vfio-user), next to single-thread memcpy; command
//! path latencies; resident memory of `pvrdma serve`. A human table on stdout and one JSON line
//! per case (prefixed `JSON `), so `grep '^JSON ' | cut -c6-` gives JSON lines.

mod vms;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pvrdma_dev::abi::{cmd, CmdDestroyMr};
use pvrdma_dev::DeviceConfig;
use pvrdma_guest::driver::{rc_connect_attrs, QpKind};
use pvrdma_guest::kernel::ib_register;
use pvrdma_guest::mem::{GuestPdir, PAGE};
use pvrdma_guest::perf::{self, BwOpts, Pair, Sample, Test};
use pvrdma_guest::tenant;
use pvrdma_guest::vfio::{ServeProcess, VfioUser};
use pvrdma_guest::{Driver, InProcess, Transport};
use rdma_backend::emulated::Fabric;
use vm_memory::GuestAddress;

/// Latency cases that stalled in this run (reported at the end).
static STALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

const MAC: [u8; 6] = [0x00, 0x50, 0x56, 0x00, 0x00, 0x01];
const ACCESS: u32 = 1 | 2 | 4 | 8;

const LONG_ABOUT: &str = "Perftest-style benchmarks in-process and over vfio-user.

perftest-style runs through the guest rings (lean posting: prebuilt WQEs, one doorbell per \
batch, signaled every N), next to single-thread memcpy of the same sizes; command-path \
latencies; resident memory of `pvrdma serve`. A human table on stdout and one JSON line per case \
(prefixed `JSON `).";

/// The `--transport` of `pvrdma bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TransportArg {
    /// The device in this process
    Inproc,
    /// A `pvrdma serve` child process over vfio-user
    Vfio,
    /// Both
    Both,
}

/// The options of `pvrdma bench`.
#[derive(Debug, Clone, clap::Args)]
#[command(long_about = LONG_ABOUT, args_override_self = true)]
pub struct BenchArgs {
    /// A short run (seconds); checks the tool works, figures are rough
    #[arg(long)]
    quick: bool,
    /// Tests: send_bw,write_bw,read_bw,atomic_bw,send_lat,write_lat [default: all]
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = test_arg)]
    tests: Vec<Test>,
    /// Message sizes in bytes [default: 2,8,64,512,4096,65536,1048576,8388608; with --quick
    /// 2,64,4096,1048576]
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    sizes: Vec<u64>,
    /// inproc, vfio or both
    #[arg(long, value_name = "T", value_enum, default_value_t = TransportArg::Both, hide_possible_values = true)]
    transport: TransportArg,
    /// QP pairs of the data-path bandwidth runs (1..=256)
    #[arg(long, value_name = "N", default_value_t = 1)]
    pairs: u64,
    /// QP pairs of the multi-QP run (0 skips it)
    #[arg(long, value_name = "N", default_value_t = 64)]
    qps: u64,
    /// Queue depth (a power of two in 2..=4096)
    #[arg(long, value_name = "N", default_value_t = 128)]
    depth: u64,
    /// WQEs per doorbell
    #[arg(long, value_name = "N", default_value_t = 32)]
    batch: u64,
    /// Signal every Nth send
    #[arg(long, value_name = "N", default_value_t = 32)]
    sig: u64,
    /// Device worker threads
    #[arg(long, value_name = "N", default_value_t = 2)]
    workers: u64,
    /// Device polling before a thread sleeps, in µs [default: the device's 0 in-process,
    /// `pvrdma serve`'s 32 over vfio-user]
    #[arg(long, value_name = "N")]
    poll_us: Option<u64>,
    /// Bytes per bandwidth case (iterations derive from it) [default: 1 GiB]
    #[arg(long, value_name = "N", default_value_t = 1 << 30, hide_default_value = true)]
    bytes: u64,
    /// Sections: data,multi,cmd,mem,vms,hostile [default: all]; vms: devices of one `pvrdma
    /// serve` as VMs of one host (VM to VM next to loopback, latency also on one core; fairness
    /// under a flooding VM, also with a core per tenant; 16 VMs); hostile: a VM pair's latency
    /// next to a VM that fills its host-memory budget, queues stalled 1 GiB WRITEs and aims its
    /// QPs at the pair's (also with a core per tenant)
    #[arg(long, value_name = "SECTIONS", value_delimiter = ',')]
    only: Vec<String>,
    /// The hostile VM's loops: mem,copy,intrude [default: all three]
    #[arg(long, value_name = "LOOPS", value_parser = tenant::Loops::parse)]
    hostile: Option<tenant::Loops>,
    #[command(flatten)]
    pub verbosity: crate::Verbosity,
}

fn test_arg(s: &str) -> Result<Test, String> {
    test_by_name(s).ok_or_else(|| {
        let names: Vec<_> = ALL_TESTS.iter().map(|t| t.name()).collect();
        format!("unknown test `{s}` (tests: {})", names.join(","))
    })
}

#[derive(Debug, Clone)]
struct Opts {
    quick: bool,
    tests: Vec<Test>,
    sizes: Vec<u64>,
    inproc: bool,
    vfio: bool,
    qps: usize,
    pairs: usize,
    depth: u32,
    batch: u32,
    sig: u32,
    workers: usize,
    bytes: u64,
    sections: Vec<String>,
    /// The hostile tenant's loops (`hostile` section).
    hostile: tenant::Loops,
}

/// Every test, in the order the tables list them.
const ALL_TESTS: [Test; 6] = [
    Test::SendBw,
    Test::WriteBw,
    Test::ReadBw,
    Test::AtomicBw,
    Test::SendLat,
    Test::WriteLat,
];

fn test_by_name(s: &str) -> Option<Test> {
    ALL_TESTS.into_iter().find(|t| t.name() == s)
}

fn opts(a: &BenchArgs) -> Result<Opts, String> {
    let mut o = Opts {
        quick: a.quick,
        tests: if a.tests.is_empty() {
            ALL_TESTS.to_vec()
        } else {
            a.tests.clone()
        },
        sizes: if a.sizes.is_empty() {
            vec![2, 8, 64, 512, 4096, 65536, 1 << 20, 8 << 20]
        } else {
            a.sizes.clone()
        },
        inproc: a.transport != TransportArg::Vfio,
        vfio: a.transport != TransportArg::Inproc,
        qps: a.qps as usize,
        pairs: a.pairs.clamp(1, 256) as usize,
        depth: a.depth as u32,
        batch: a.batch as u32,
        sig: a.sig as u32,
        workers: a.workers as usize,
        bytes: a.bytes,
        sections: if a.only.is_empty() {
            ["data", "multi", "cmd", "mem", "vms", "hostile"]
                .map(String::from)
                .to_vec()
        } else {
            a.only.clone()
        },
        hostile: a.hostile.unwrap_or(tenant::Loops::ALL),
    };
    let sizes_set = !a.sizes.is_empty();
    if let Some(p) = a.poll_us {
        POLL_US.store(p as i64, Ordering::Relaxed);
    }
    if o.quick {
        if !sizes_set {
            o.sizes = vec![2, 64, 4096, 1 << 20];
        }
        o.bytes = o.bytes.min(16 << 20);
        o.qps = o.qps.min(8);
    }
    if o.sizes.iter().any(|&s| s == 0 || s > 8 << 20) {
        return Err("bench: sizes must be 1..=8 MiB".into());
    }
    if !(2..=4096).contains(&o.depth) || !o.depth.is_power_of_two() {
        return Err("bench: --depth must be a power of two in 2..=4096".into());
    }
    o.batch = o.batch.clamp(1, o.depth);
    o.sig = o.sig.clamp(1, o.depth);
    o.workers = o.workers.max(1);
    Ok(o)
}

fn has(o: &Opts, section: &str) -> bool {
    o.sections.iter().any(|s| s == section)
}

/// Iterations for a bandwidth case of `size` bytes.
fn iters_for(o: &Opts, size: u64, test: Test) -> u64 {
    let (lo, hi) = if o.quick {
        (16, 20_000)
    } else {
        (64, 1_000_000)
    };
    let per_msg = match test {
        Test::AtomicBw => 64,
        _ => size.max(64),
    };
    (o.bytes / per_msg).clamp(lo, hi)
}

fn json_line(fields: &[(&str, String)]) -> String {
    let mut s = String::from("JSON {");
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "\"{k}\":{v}");
    }
    s.push('}');
    s
}

fn q(s: &str) -> String {
    format!("\"{s}\"")
}

/// CPU time (ns) of each thread of process `pid`, summed by thread name, from
/// `/proc/PID/task/*/{comm,schedstat}` (the first schedstat field is the time on a CPU). Threads
/// that cannot be read (gone meanwhile) are skipped; `prefix` goes before each name.
fn thread_cpu(pid: u32, prefix: &str, into: &mut BTreeMap<String, u64>) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        let dir = t.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let ns = std::fs::read_to_string(dir.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
        if let Some(ns) = ns {
            *into.entry(format!("{prefix}{}", name.trim())).or_default() += ns;
        }
    }
}

/// CPU time per thread name of this process and, for the vfio-user rig, of `pvrdma serve`.
fn cpu_snapshot(rig: &Rig) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    thread_cpu(std::process::id(), "", &mut m);
    if let Some(serve) = &rig._serve {
        thread_cpu(serve.pid(), "serve:", &mut m);
    }
    m
}

/// Prints the CPU time each thread spent per message between two snapshots (time on a CPU, so
/// a thread's polling while it waits counts too), and the rate the busiest thread's time alone
/// would allow. On a host with a core for every busy thread that thread's work bounds the rate;
/// on this one the threads share cores and the sum of their times matters. Returns the JSON
/// fields for the case's `cpu` line.
fn cpu_per_msg(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    msgs: u64,
) -> Vec<(&'static str, String)> {
    let per: Vec<(String, f64)> = after
        .iter()
        .map(|(k, &v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (k.clone(), d as f64 / msgs.max(1) as f64)
        })
        .filter(|(_, ns)| *ns >= 1.0)
        .collect();
    let Some((busiest, max)) = per
        .iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(k, v)| (k.clone(), *v))
    else {
        return Vec::new();
    };
    let list: Vec<String> = per.iter().map(|(k, v)| format!("{k} {v:.0}")).collect();
    let total: f64 = per.iter().map(|(_, v)| v).sum();
    println!(
        "{:<8} cpu ns/msg: {} (sum {total:.0}); busiest {busiest} = {:.2} M msg/s alone",
        "",
        list.join(", "),
        1e3 / max
    );
    let obj: Vec<String> = per
        .iter()
        .map(|(k, v)| format!("{}:{}", q(k), f(*v)))
        .collect();
    vec![
        ("cpu_ns_per_msg", format!("{{{}}}", obj.join(","))),
        ("cpu_ns_per_msg_sum", f(total)),
        ("busiest_thread", q(&busiest)),
        ("mmsg_s_busiest_alone", f(1e3 / max)),
    ]
}

fn f(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.4}")
    } else {
        "null".into()
    }
}

/// Single-thread memcpy bandwidth of `size`-byte copies, in MB/s (10^6 bytes), over buffers
/// large enough that 8 MiB copies miss the caches as RDMA of 8 MiB does.
fn memcpy_mb_s(size: u64, budget: u64) -> f64 {
    let size = size as usize;
    let mut src = vec![1u8; size];
    let mut dst = vec![0u8; size];
    src[0] = 2;
    let iters = (budget / size as u64).clamp(16, 10_000_000);
    // Warm up (page faults), then measure.
    dst.copy_from_slice(&src);
    let t = Instant::now();
    for _ in 0..iters {
        black_box(&mut dst).copy_from_slice(black_box(&src));
    }
    let e = t.elapsed().as_secs_f64();
    (size as u64 * iters) as f64 / e / 1e6
}

/// The same copy as [`memcpy_mb_s`] done the way the device must do it for guest buffers: page
/// by page (4 KiB) between two page lists in shuffled order, as the harness allocates MR pages.
/// `None` up to one page. This is the layout's own cost, beside the device's (docs/benchmarks.md).
fn memcpy_pages_mb_s(size: u64, budget: u64) -> Option<f64> {
    const PAGE: usize = 4096;
    let pages = usize::try_from(size).ok()?.div_ceil(PAGE);
    if pages < 2 {
        return None;
    }
    let shuffled = |seed: u64| {
        let mut order: Vec<usize> = (0..pages).collect();
        let mut x = seed;
        for i in (1..pages).rev() {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            order.swap(i, (x >> 33) as usize % (i + 1));
        }
        order
    };
    let (sp, dp) = (shuffled(1), shuffled(2));
    // Page-aligned, as guest pages are: two buffers whose addresses differ by a few bytes modulo
    // 4 KiB (what two heap allocations may give) copy ~25 % slower on this host (4K aliasing).
    let src = vec![1u8; (pages + 1) * PAGE];
    let mut dst = vec![0u8; (pages + 1) * PAGE];
    let (s0, d0) = (
        src.as_ptr().align_offset(PAGE),
        dst.as_ptr().align_offset(PAGE),
    );
    let src = &src[s0..s0 + pages * PAGE];
    let dst = &mut dst[d0..d0 + pages * PAGE];
    let iters = (budget / size).clamp(16, 10_000_000);
    let pass = |dst: &mut [u8]| {
        for (&s, &d) in sp.iter().zip(&dp) {
            black_box(&mut dst[d * PAGE..(d + 1) * PAGE])
                .copy_from_slice(black_box(&src[s * PAGE..(s + 1) * PAGE]));
        }
    };
    pass(dst);
    let t = Instant::now();
    for _ in 0..iters {
        pass(dst);
    }
    let e = t.elapsed().as_secs_f64();
    Some((pages * PAGE) as f64 * iters as f64 / e / 1e6)
}

/// A device and its driver brought up the way the kernel does it.
struct Rig {
    drv: Driver,
    gid: [u8; 16],
    name: &'static str,
    _serve: Option<ServeProcess>,
}

/// `--poll-us`, for every device this run starts; negative: each one's own default.
static POLL_US: AtomicI64 = AtomicI64::new(-1);

fn rig_inproc(workers: usize, ram: usize) -> Result<Rig, String> {
    let cfg = DeviceConfig {
        mac: MAC,
        workers,
        poll_us: u32::try_from(POLL_US.load(Ordering::Relaxed))
            .unwrap_or(DeviceConfig::default().poll_us),
        ..DeviceConfig::default()
    };
    let t = Arc::new(InProcess::new(cfg, ram, &Fabric::new()));
    let drv = Driver::probe(t as Arc<dyn Transport>).map_err(|e| format!("probe: {e}"))?;
    let k = ib_register(&drv, MAC).map_err(|e| format!("ib registration: {e}"))?;
    Ok(Rig {
        drv,
        gid: k.gid,
        name: "inproc",
        _serve: None,
    })
}

fn spawn_serve(workers: usize) -> Result<ServeProcess, String> {
    spawn_serve_with(workers, &[])
}

/// `pvrdma serve` with `workers` and `extra` options.
fn spawn_serve_with(workers: usize, extra: &[&str]) -> Result<ServeProcess, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let w = workers.to_string();
    let p = POLL_US.load(Ordering::Relaxed);
    let p = p.to_string();
    let mut args = vec!["--workers", &w];
    if !p.starts_with('-') {
        args.extend(["--poll-us", &p]);
    }
    args.extend(extra);
    ServeProcess::spawn(&exe, &args).map_err(|e| format!("pvrdma serve: {e}"))
}

fn rig_vfio(workers: usize, ram: usize) -> Result<Rig, String> {
    let serve = spawn_serve(workers)?;
    let t = VfioUser::connect_with_ram(serve.socket(), ram).map_err(|e| format!("connect: {e}"))?;
    let drv =
        Driver::probe(Arc::new(t) as Arc<dyn Transport>).map_err(|e| format!("probe: {e}"))?;
    let k = ib_register(&drv, MAC).map_err(|e| format!("ib registration: {e}"))?;
    Ok(Rig {
        drv,
        gid: k.gid,
        name: "vfio",
        _serve: Some(serve),
    })
}

fn header() {
    println!(
        "{:<8} {:<10} {:>9} {:>4} {:>9} {:>12} {:>10} {:>12} {:>8} {:>10} {:>10}",
        "transp",
        "test",
        "bytes",
        "qps",
        "iters",
        "BW[MB/s]",
        "Mmsg/s",
        "memcpy[MB/s]",
        "ratio",
        "p50[us]",
        "p99[us]"
    );
}

#[allow(clippy::too_many_arguments)]
fn report(
    transport: &str,
    s: &Sample,
    qps: usize,
    workers: usize,
    o: &Opts,
    memcpy: Option<f64>,
    extra: &[(&str, String)],
) {
    let lat = !s.lat.is_empty();
    let ratio = memcpy.map(|m| s.mb_per_s() / m);
    println!(
        "{:<8} {:<10} {:>9} {:>4} {:>9} {:>12.1} {:>10.4} {:>12} {:>8} {:>10} {:>10}",
        transport,
        s.test.name(),
        s.size,
        qps,
        s.iters,
        s.mb_per_s(),
        s.mmsg_per_s(),
        memcpy.map_or("-".into(), |m| format!("{m:.1}")),
        ratio.map_or("-".into(), |r| format!("{r:.3}")),
        if lat {
            format!("{:.2}", s.lat_us(0.5))
        } else {
            "-".into()
        },
        if lat {
            format!("{:.2}", s.lat_us(0.99))
        } else {
            "-".into()
        },
    );
    let mut fields = vec![
        ("kind", q(if lat { "lat" } else { "bw" })),
        ("transport", q(transport)),
        ("test", q(s.test.name())),
        ("size", s.size.to_string()),
        ("qps", qps.to_string()),
        ("workers", workers.to_string()),
        ("depth", o.depth.to_string()),
        ("batch", o.batch.to_string()),
        ("sig_every", o.sig.to_string()),
        ("iters", s.iters.to_string()),
        ("secs", f(s.elapsed.as_secs_f64())),
        ("mb_s", f(s.mb_per_s())),
        ("mmsg_s", f(s.mmsg_per_s())),
    ];
    if lat {
        fields.push(("lat_p50_us", f(s.lat_us(0.5))));
        fields.push(("lat_p99_us", f(s.lat_us(0.99))));
    }
    if let Some(m) = memcpy {
        fields.push(("memcpy_mb_s", f(m)));
        fields.push(("ratio_to_memcpy", f(s.mb_per_s() / m)));
    }
    fields.extend(extra.iter().cloned());
    println!("{}", json_line(&fields));
}

fn new_pairs(rig: &Rig, n: usize, depth: u32, buf: u64) -> Result<Vec<Pair>, String> {
    (0..n)
        .map(|i| {
            Pair::new(&rig.drv, 1 + i as u32, rig.gid, depth, buf.max(4096))
                .map_err(|e| format!("pair {i}: {e}"))
        })
        .collect()
}

fn data_section(rig: &Rig, o: &Opts, memcpy: &[(u64, f64)]) -> Result<(), String> {
    let max = *o.sizes.iter().max().unwrap_or(&4096);
    let mut pairs = new_pairs(rig, o.pairs, o.depth, max)?;
    let mut next_uar = 1 + o.pairs as u32;
    let mc = |size: u64| memcpy.iter().find(|m| m.0 == size).map(|m| m.1);
    for &test in &o.tests {
        for &size in &o.sizes {
            match test {
                Test::SendLat | Test::WriteLat => {
                    if size > 65536 {
                        continue;
                    }
                    let n = if o.quick { 200 } else { 20_000 };
                    // A fresh pair per latency case (receives a send_lat case leaves posted
                    // stay out of the way), with room for 2 x 64 KiB per side.
                    let mut lp = Pair::new(&rig.drv, next_uar, rig.gid, o.depth, 2 << 16)
                        .map_err(|e| format!("latency pair: {e}"))?;
                    next_uar += 1;
                    let r = if test == Test::SendLat {
                        perf::send_lat_lean(&rig.drv, &mut lp, size, n)
                    } else {
                        perf::write_lat(&rig.drv, &mut lp, size, n)
                    };
                    match r {
                        Ok(s) => report(rig.name, &s, 1, o.workers, o, None, &[]),
                        Err(e) => {
                            // Reported and counted, not fatal: the other cases still run.
                            println!(
                                "{:<8} {:<10} {:>9} STALLED: a ping-pong step took over 2 s ({e})",
                                rig.name,
                                test.name(),
                                size
                            );
                            println!(
                                "{}",
                                json_line(&[
                                    ("kind", q("lat")),
                                    ("transport", q(rig.name)),
                                    ("test", q(test.name())),
                                    ("size", size.to_string()),
                                    ("error", q(&format!("stalled: {e}"))),
                                ])
                            );
                            STALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
                Test::AtomicBw => {
                    if size != o.sizes[0] {
                        continue;
                    }
                    let bo = BwOpts {
                        size: 8,
                        iters: iters_for(o, 8, test),
                        batch: o.batch,
                        sig_every: o.sig,
                    };
                    let s = perf::bw_lean(&rig.drv, &mut pairs, test, bo)
                        .map_err(|e| format!("atomic_bw: {e}"))?;
                    report(rig.name, &s, o.pairs, o.workers, o, None, &[]);
                }
                _ => {
                    let bo = BwOpts {
                        size,
                        iters: iters_for(o, size, test),
                        batch: o.batch,
                        sig_every: o.sig,
                    };
                    let before = cpu_snapshot(rig);
                    let s = perf::bw_lean(&rig.drv, &mut pairs, test, bo)
                        .map_err(|e| format!("{} {size}: {e}", test.name()))?;
                    let after = cpu_snapshot(rig);
                    report(rig.name, &s, o.pairs, o.workers, o, mc(size), &[]);
                    if size <= 4096 {
                        let extra = cpu_per_msg(&before, &after, s.iters);
                        if !extra.is_empty() {
                            let mut fields = vec![
                                ("kind", q("cpu")),
                                ("transport", q(rig.name)),
                                ("test", q(test.name())),
                                ("size", size.to_string()),
                            ];
                            fields.extend(extra);
                            println!("{}", json_line(&fields));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// 64-byte SEND over `o.qps` pairs, with 1 and with `o.workers.max(2)` device workers.
fn multi_section(o: &Opts) -> Result<(), String> {
    let mut rates = Vec::new();
    for workers in [1, o.workers.max(2)] {
        let rig = rig_inproc(workers, pvrdma_guest::transport::DEFAULT_RAM)?;
        let mut pairs = new_pairs(&rig, o.qps, o.depth.min(64), 4096)?;
        let size = 64;
        let per = if o.quick { 2_000 } else { 50_000 };
        let bo = BwOpts {
            size,
            iters: per,
            batch: o.batch.min(32),
            sig_every: o.sig.min(32),
        };
        let before = cpu_snapshot(&rig);
        let s = perf::bw_lean_threads(&rig.drv, &mut pairs, Test::SendBw, bo, 1)
            .map_err(|e| format!("multi-QP send_bw: {e}"))?;
        let after = cpu_snapshot(&rig);
        rates.push(s.mmsg_per_s());
        let extra = [("harness_threads", "1".to_string())];
        report("inproc", &s, o.qps, workers, o, None, &extra);
        let cpu = cpu_per_msg(&before, &after, s.iters);
        if !cpu.is_empty() {
            let mut fields = vec![
                ("kind", q("cpu")),
                ("transport", q("inproc")),
                ("test", q("send_bw")),
                ("qps", o.qps.to_string()),
                ("workers", workers.to_string()),
            ];
            fields.extend(cpu);
            println!("{}", json_line(&fields));
        }
    }
    let scale = rates[1] / rates[0];
    println!(
        "multi-QP scaling ({} pairs): {:.2}x with {} workers over 1",
        o.qps,
        scale,
        o.workers.max(2)
    );
    println!(
        "{}",
        json_line(&[
            ("kind", q("scaling")),
            ("qps", o.qps.to_string()),
            ("workers", o.workers.max(2).to_string()),
            ("mmsg_s_1_worker", f(rates[0])),
            ("mmsg_s_n_workers", f(rates[1])),
            ("ratio", f(scale)),
        ])
    );
    Ok(())
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort_unstable();
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i].as_secs_f64() * 1e6
}

fn lat_row(transport: &str, what: &str, v: &mut [Duration]) {
    let (p50, p99) = (pct(v, 0.5), pct(v, 0.99));
    println!(
        "{transport:<8} {what:<44} {:>8} {p50:>12.2} {p99:>12.2}",
        v.len()
    );
    println!(
        "{}",
        json_line(&[
            ("kind", q("cmd")),
            ("transport", q(transport)),
            ("what", q(what)),
            ("n", v.len().to_string()),
            ("p50_us", f(p50)),
            ("p99_us", f(p99)),
        ])
    );
}

/// Command-path latencies: QP create → RTS → destroy; MR register/deregister of 1 MiB and 1 GiB.
fn cmd_section(rig: &Rig, o: &Opts, big_base: u64) -> Result<(), String> {
    let d = &rig.drv;
    let e = |e: pvrdma_guest::driver::GuestError| e.to_string();
    let ctx = d.create_uc(100).map_err(e)?;
    let pd = d.create_pd(ctx).map_err(e)?;
    let cq = d.create_cq(ctx, 256).map_err(e)?;
    let n = if o.quick { 50 } else { 2000 };
    println!(
        "{:<8} {:<44} {:>8} {:>12} {:>12}",
        "transp", "command", "n", "p50[us]", "p99[us]"
    );
    let (mut create, mut rts, mut both, mut destroy, mut setup) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // The QP's pages as `Driver::create_qp` lays them out (depth 128, one SGE: 4 SQ pages, 1 RQ
    // page, the header page, plus the directory and one table), allocated, zeroed and listed
    // then freed: the guest's own share of "create QP", timed on its own.
    let qp_pages = 1
        + (128 * u64::from(pvrdma_dev::sq_wqe_size(1))).div_ceil(4096)
        + (128 * u64::from(pvrdma_dev::rq_wqe_size(1))).div_ceil(4096);
    for _ in 0..n {
        let t0 = Instant::now();
        let pages = d.alloc.scattered(d.mem(), qp_pages as usize);
        let pdir = GuestPdir::build(&d.alloc, d.mem(), pages);
        pdir.free(&d.alloc);
        setup.push(t0.elapsed());
    }
    for _ in 0..n {
        // Timed as the guest sees it: the harness lays out and zeroes the QP's pages, then
        // issues CREATE_QP (the page setup alone is the row after).
        let t0 = Instant::now();
        let qp = d
            .create_qp(ctx, QpKind::Rc, pd, &cq, &cq, None, (128, 128, 1, 1), false)
            .map_err(e)?;
        let t1 = Instant::now();
        for m in rc_connect_attrs(qp.qpn, rig.gid, ACCESS) {
            d.modify_qp(&qp, m).map_err(e)?;
        }
        let t2 = Instant::now();
        d.destroy_qp(qp).map_err(e)?;
        let t3 = Instant::now();
        create.push(t1 - t0);
        rts.push(t2 - t1);
        both.push(t2 - t0);
        destroy.push(t3 - t2);
    }
    lat_row(rig.name, "create QP (incl. guest page setup)", &mut create);
    lat_row(rig.name, "  guest page setup alone (harness)", &mut setup);
    lat_row(rig.name, "modify QP INIT+RTR+RTS (3 commands)", &mut rts);
    lat_row(rig.name, "create QP and take it to RTS", &mut both);
    lat_row(rig.name, "destroy QP", &mut destroy);
    // MRs: the page list is built once (outside the timing); register and deregister it.
    for (label, len, reps) in [
        ("1 MiB", 1u64 << 20, if o.quick { 50 } else { 1000 }),
        ("1 GiB", 1u64 << 30, if o.quick { 3 } else { 30 }),
    ] {
        let npages = len / PAGE;
        let pages: Vec<GuestAddress> = if len >= 1 << 30 {
            // 1 GiB of guest pages the harness's allocator never hands out (the top of guest
            // RAM, see `big_base`), untouched: registration never reads the data pages.
            (0..npages)
                .map(|i| GuestAddress(big_base + i * PAGE))
                .collect()
        } else {
            d.alloc.scattered(d.mem(), npages as usize)
        };
        let pdir = GuestPdir::build(&d.alloc, d.mem(), pages);
        let (mut reg, mut dereg) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let t0 = Instant::now();
            let mr = d
                .reg_mr_pdir(pd, 0x7f00_0000_0000, len, ACCESS, pdir.clone())
                .map_err(e)?;
            let t1 = Instant::now();
            d.cmd_noresp(
                cmd::DESTROY_MR,
                CmdDestroyMr {
                    mr_handle: mr.handle,
                    ..Default::default()
                },
            )
            .map_err(e)?;
            reg.push(t1 - t0);
            dereg.push(t1.elapsed());
        }
        lat_row(rig.name, &format!("register MR {label}"), &mut reg);
        lat_row(rig.name, &format!("deregister MR {label}"), &mut dereg);
        d.alloc.free(&pdir.tables);
        d.alloc.free(&[pdir.dir]);
        if len < 1 << 30 {
            d.alloc.free(&pdir.pages);
        }
    }
    Ok(())
}

fn rss(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssAnon:"))
}

/// Receives `mem_section` posts to each QP (its receive queue's size).
const RECVS_PER_QP: u64 = 64;

/// Resident memory of a `pvrdma serve` process: idle, then per idle CQ, QP and MR, and per
/// receive posted and not consumed.
fn mem_section(o: &Opts) -> Result<(), String> {
    let serve = spawn_serve(o.workers)?;
    let pid = serve.pid();
    std::thread::sleep(Duration::from_millis(200));
    let idle = rss(pid);
    let t = VfioUser::connect(serve.socket()).map_err(|e| format!("connect: {e}"))?;
    let d = Driver::probe(Arc::new(t) as Arc<dyn Transport>).map_err(|e| format!("probe: {e}"))?;
    let k = ib_register(&d, MAC).map_err(|e| format!("ib registration: {e}"))?;
    let e = |e: pvrdma_guest::driver::GuestError| e.to_string();
    let ctx = d.create_uc(1).map_err(e)?;
    let pd = d.create_pd(ctx).map_err(e)?;
    std::thread::sleep(Duration::from_millis(100));
    let active = rss(pid);
    let n = if o.quick { 100 } else { 1000 };
    let mut cqs = Vec::new();
    for _ in 0..n {
        cqs.push(d.create_cq(ctx, 64).map_err(e)?);
    }
    let after_cq = rss(pid);
    let mut qps = Vec::new();
    for c in &cqs {
        let qp = d
            .create_qp(ctx, QpKind::Rc, pd, c, c, None, (64, 64, 1, 1), false)
            .map_err(e)?;
        for m in rc_connect_attrs(qp.qpn, k.gid, ACCESS) {
            d.modify_qp(&qp, m).map_err(e)?;
        }
        qps.push(qp);
    }
    let after_qp = rss(pid);
    let mut mrs = Vec::new();
    for i in 0..n {
        mrs.push(
            d.reg_mr(pd, 0x7f00_0000_0000 + (i as u64) * PAGE, PAGE, ACCESS)
                .map_err(e)?,
        );
    }
    let after_mr = rss(pid);
    // Receives posted and not (yet) consumed: once the device has moved one from the guest's
    // ring to the backend, the ring slot is the guest's again and the backend keeps the WR.
    for (qp, mr) in qps.iter_mut().zip(&mrs) {
        let sge = [mr.sge(0, 64)];
        for r in 0..RECVS_PER_QP {
            let ok = if r + 1 < RECVS_PER_QP {
                d.push_recv(qp, r, &sge)
            } else {
                d.post_recv(qp, r, &sge)
            };
            if !ok {
                return Err(format!("receive queue of QP {} full", qp.qpn));
            }
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let after_recv = rss(pid);
    let per_n = |a: (u64, u64), b: (u64, u64), n: f64| {
        (
            (b.0 as f64 - a.0 as f64) * 1024.0 / n,
            (b.1 as f64 - a.1 as f64) * 1024.0 / n,
        )
    };
    let per = |a, b| per_n(a, b, n as f64);
    println!("pvrdma serve (pid {pid}), {} worker threads", o.workers);
    println!(
        "{:<40} {:>12} {:>12}",
        "state", "VmRSS[KiB]", "RssAnon[KiB]"
    );
    for (what, v) in [
        ("idle, no client", idle),
        ("client connected, device active", active),
        ("+ idle CQs", after_cq),
        ("+ idle QPs (RTS)", after_qp),
        ("+ idle MRs (4 KiB)", after_mr),
        ("+ 64 receives posted per QP", after_recv),
    ] {
        println!("{what:<40} {:>12} {:>12}", v.0, v.1);
    }
    println!(
        "{:<40} {:>12} {:>12}",
        "per object (bytes)", "VmRSS", "RssAnon"
    );
    let mut fields = vec![
        ("kind", q("mem")),
        ("objects", n.to_string()),
        ("idle_rss_kib", idle.0.to_string()),
        ("active_rss_kib", active.0.to_string()),
        ("active_rss_anon_kib", active.1.to_string()),
    ];
    let rows = [
        ("cq", per(active, after_cq)),
        ("qp", per(after_cq, after_qp)),
        ("mr", per(after_qp, after_mr)),
    ];
    for (what, (vm, anon)) in rows {
        println!("{:<40} {vm:>12.0} {anon:>12.0}", format!("per idle {what}"));
    }
    let recv = per_n(after_mr, after_recv, (n as u64 * RECVS_PER_QP) as f64);
    println!(
        "{:<40} {:>12.0} {:>12.0}",
        "per posted receive (1 SGE)", recv.0, recv.1
    );
    fields.push(("per_cq_rss_bytes", f(rows[0].1 .0)));
    fields.push(("per_cq_anon_bytes", f(rows[0].1 .1)));
    fields.push(("per_qp_rss_bytes", f(rows[1].1 .0)));
    fields.push(("per_qp_anon_bytes", f(rows[1].1 .1)));
    fields.push(("per_mr_rss_bytes", f(rows[2].1 .0)));
    fields.push(("per_mr_anon_bytes", f(rows[2].1 .1)));
    fields.push(("per_recv_rss_bytes", f(recv.0)));
    fields.push(("per_recv_anon_bytes", f(recv.1)));
    println!("{}", json_line(&fields));
    d.remove();
    worst_case_memory(o)
}

/// Host-memory budget of the device the worst case runs against.
const WORST_BUDGET_MIB: u64 = 32;

/// The most host memory a guest can make a device hold: QPs with the deepest receive queues of
/// the longest SGE lists, created until the device's budget refuses one (ENOMEM), every queue
/// then filled with receives nobody consumes. Without the budget, 1,023 such QPs cost 2.5 GiB.
fn worst_case_memory(o: &Opts) -> Result<(), String> {
    let budget = format!("{WORST_BUDGET_MIB}M");
    let serve = spawn_serve_with(o.workers, &["--max-host-mem", &budget])?;
    let pid = serve.pid();
    let t = VfioUser::connect(serve.socket()).map_err(|e| format!("connect: {e}"))?;
    let d = Driver::probe(Arc::new(t) as Arc<dyn Transport>).map_err(|e| format!("probe: {e}"))?;
    let e = |e: pvrdma_guest::driver::GuestError| e.to_string();
    let ctx = d.create_uc(1).map_err(e)?;
    let pd = d.create_pd(ctx).map_err(e)?;
    let cq = d.create_cq(ctx, 64).map_err(e)?;
    let mr = d.reg_mr(pd, 0x7000_0000, PAGE, 1).map_err(e)?;
    let sges: Vec<_> = (0..u64::from(tenant::SGES))
        .map(|i| mr.sge(i * 64, 64))
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let before = rss(pid);
    let never = || false;
    let mut qps = tenant::qps_to_the_budget(&d, (ctx, pd, &cq), 1023, &never)?;
    let receives = tenant::fill_receive_queues(&d, &mut qps, &sges, &never)?;
    let after = rss(pid);
    let grown_mib = after.1.saturating_sub(before.1) as f64 / 1024.0;
    println!(
        "worst case, budget {WORST_BUDGET_MIB} MiB (--max-host-mem): {} QPs of {} {}-SGE \
         receives, the next refused (ENOMEM); all filled: RssAnon +{grown_mib:.1} MiB",
        qps.len(),
        tenant::DEEP,
        tenant::SGES,
    );
    println!(
        "{}",
        json_line(&[
            ("kind", q("mem_worst")),
            ("budget_mib", WORST_BUDGET_MIB.to_string()),
            ("qps", qps.len().to_string()),
            ("receives", receives.to_string()),
            ("rss_anon_grown_mib", f(grown_mib)),
        ])
    );
    d.remove();
    Ok(())
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Runs the benchmarks.
pub fn run(args: &BenchArgs) -> Result<(), String> {
    let o = opts(args)?;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "pvrdma bench{}: {cpus} CPUs, load average {} (start); depth {}, {} WQEs per doorbell, \
         signaled every {}, {} device workers",
        if o.quick { " --quick" } else { "" },
        load(),
        o.depth,
        o.batch,
        o.sig,
        o.workers
    );
    println!(
        "{}",
        json_line(&[
            ("kind", q("run")),
            ("quick", o.quick.to_string()),
            ("cpus", cpus.to_string()),
            ("load", q(&load())),
        ])
    );
    if has(&o, "data") {
        println!();
        println!("== memcpy (single thread), the limit data-path figures are held against");
        let budget = if o.quick { 64 << 20 } else { 4 << 30 };
        let memcpy: Vec<(u64, f64)> = o
            .sizes
            .iter()
            .map(|&s| (s, memcpy_mb_s(s, budget)))
            .collect();
        for (s, m) in &memcpy {
            // The same bytes in shuffled 4 KiB pages: what the layout alone costs. The ratio
            // column stays against the contiguous copy (the target's definition).
            let paged = memcpy_pages_mb_s(*s, budget);
            let shown = paged.map_or(String::new(), |p| {
                format!("; in shuffled 4 KiB pages {p:.1} MB/s ({:.3}x)", p / m)
            });
            println!("memcpy {s:>9} B: {m:>10.1} MB/s{shown}");
            let mut fields = vec![
                ("kind", q("memcpy")),
                ("size", s.to_string()),
                ("mb_s", f(*m)),
            ];
            if let Some(p) = paged {
                fields.push(("pages_mb_s", f(p)));
            }
            println!("{}", json_line(&fields));
        }
        let ram = pvrdma_guest::transport::DEFAULT_RAM;
        let max = *o.sizes.iter().max().unwrap_or(&0) as usize;
        let ram = ram.max(4 * max * o.pairs + (128 << 20));
        if o.inproc {
            println!();
            println!("== data path, in-process device, {} QP pair(s)", o.pairs);
            header();
            data_section(&rig_inproc(o.workers, ram)?, &o, &memcpy)?;
        }
        if o.vfio {
            println!();
            println!(
                "== data path, vfio-user to a `pvrdma serve` process, {} QP pair(s)",
                o.pairs
            );
            header();
            data_section(&rig_vfio(o.workers, ram)?, &o, &memcpy)?;
        }
    }
    if has(&o, "multi") && o.qps > 0 {
        println!();
        println!(
            "== {} QP pairs, 64 B SEND, in-process: 1 device worker vs {}",
            o.qps,
            o.workers.max(2)
        );
        header();
        multi_section(&o)?;
    }
    if has(&o, "cmd") {
        // Guest RAM: what the harness allocates from, plus 1 GiB at the top for the 1 GiB MR.
        let low = 256usize << 20;
        let ram = low + (1 << 30);
        println!();
        println!("== command path, in-process");
        cmd_section(&rig_inproc(o.workers, ram)?, &o, low as u64)?;
        if o.vfio {
            println!();
            println!("== command path, vfio-user");
            cmd_section(&rig_vfio(o.workers, ram)?, &o, low as u64)?;
        }
    }
    if has(&o, "mem") {
        println!();
        println!("== resident memory of `pvrdma serve`");
        mem_section(&o)?;
    }
    if has(&o, "vms") {
        println!();
        println!("== VMs of one host: the devices of one `pvrdma serve`, a vfio-user client each");
        vms::vms_section(&o)?;
    }
    if has(&o, "hostile") {
        println!();
        println!(
            "== a hostile neighbour: VMs 0-1 of one `pvrdma serve` measure latency, idle, while \
             VM 2 is a hostile tenant, and while it is one in another process"
        );
        vms::hostile_section(&o)?;
    }
    println!();
    let stalls = STALLS.load(std::sync::atomic::Ordering::Relaxed);
    if stalls > 0 {
        println!("WARNING: {stalls} latency case(s) stalled (see the STALLED rows)");
    }
    println!("load average at the end: {}", load());
    Ok(())
}
