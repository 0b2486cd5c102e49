//! The `vms` section of `pvrdma bench`: VMs of one host, i.e. devices of ONE `pvrdma serve`
//! process (`--device` each), each reached by its own vfio-user client with its own guest RAM,
//! as separate QEMUs would be.
//!
//! - VM to VM against the same device's loopback, case by case in the same run: SEND, WRITE and
//!   READ bandwidth 64 B to 1 MiB, SEND latency 8 B.
//! - Fairness: one VM pair's 8 B SEND latency, idle, while two other VMs of the process flood
//!   64 B SENDs, and while the same flood runs in a second process (the CPU contention alone).
//! - 16 VMs with 4 QPs each, connected around a ring: the aggregate rate, and host memory per
//!   device.
//! - A hostile neighbour (its own section, `--only hostile`): one VM pair's 8 B SEND latency,
//!   idle, while a third VM of the process is a hostile tenant (`pvrdma_guest::tenant`), and
//!   while the same tenant runs in a second process; the CPU time per message of each side.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pvrdma_guest::kernel::ib_register;
use pvrdma_guest::perf::{self, BwOpts, Pair, Sample, Side, Test};
use pvrdma_guest::tenant::{self, Tally, Target};
use pvrdma_guest::vfio::{ServeProcess, VfioUser};
use pvrdma_guest::{Driver, Transport};

use super::{
    cpu_per_msg, f, header, iters_for, json_line, q, report, rss, thread_cpu, Opts, POLL_US, STALLS,
};

/// One VM: its device's driver and GID.
struct Vm {
    drv: Driver,
    gid: [u8; 16],
    /// The next free UAR page for a user context.
    uar: std::cell::Cell<u32>,
}

impl Vm {
    fn side(&self) -> Side<'_> {
        let uar = self.uar.get();
        self.uar.set(uar + 1);
        Side {
            drv: &self.drv,
            uar,
            gid: self.gid,
        }
    }
}

fn mac(i: usize) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0x42, (i >> 8) as u8, i as u8 + 1]
}

/// A `pvrdma serve` with `n` devices.
fn serve(o: &Opts, n: usize) -> Result<ServeProcess, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let w = o.workers.to_string();
    let p = POLL_US
        .load(std::sync::atomic::Ordering::Relaxed)
        .to_string();
    let mut args = vec!["--workers", &w];
    if !p.starts_with('-') {
        args.extend(["--poll-us", &p]);
    }
    let macs: Vec<[u8; 6]> = (0..n).map(mac).collect();
    ServeProcess::spawn_devices(&exe, &macs, &args).map_err(|e| format!("pvrdma serve: {e}"))
}

/// VM `i` of `serve`: connected with `ram` bytes of guest RAM, probed and registered with ib
/// core as the Linux driver is (GID 0, the GSI QP).
fn boot(serve: &ServeProcess, i: usize, ram: usize) -> Result<Vm, String> {
    let t = VfioUser::connect_with_ram(&serve.sockets()[i], ram)
        .map_err(|e| format!("connect VM {i}: {e}"))?;
    let drv =
        Driver::probe(Arc::new(t) as Arc<dyn Transport>).map_err(|e| format!("probe: {e}"))?;
    let k = ib_register(&drv, mac(i)).map_err(|e| format!("ib registration: {e}"))?;
    Ok(Vm {
        drv,
        gid: k.gid,
        uar: std::cell::Cell::new(1),
    })
}

fn pair(a: &Vm, b: Option<&Vm>, depth: u32, buf: u64) -> Result<Pair, String> {
    match b {
        Some(b) => Pair::between(a.side(), b.side(), depth, buf),
        None => {
            let s = a.side();
            Pair::new(s.drv, s.uar, s.gid, depth, buf)
        }
    }
    .map_err(|e| format!("QP pair: {e}"))
}

/// One case on `pair` from `a` to `b` (`b` = `a` for loopback).
fn case(a: &Vm, b: &Vm, p: &mut Pair, test: Test, size: u64, o: &Opts) -> Result<Sample, String> {
    let r = if test == Test::SendLat {
        let n = if o.quick { 200 } else { 20_000 };
        perf::send_lat_between(&a.drv, &b.drv, p, size, n)
    } else {
        let bo = BwOpts {
            size,
            iters: iters_for(o, size, test),
            batch: o.batch,
            sig_every: o.sig,
        };
        perf::bw_lean_between(&a.drv, &b.drv, std::slice::from_mut(p), test, bo)
    };
    r.map_err(|e| format!("{} {size}: {e}", test.name()))
}

/// The figure a case is compared by: MB/s, or the median latency for a latency case.
fn figure(s: &Sample) -> f64 {
    if s.lat.is_empty() {
        s.mb_per_s()
    } else {
        s.lat_us(0.5)
    }
}

/// CPU time by thread name of this process and of `serve`.
fn cpu(serve: &ServeProcess) -> std::collections::BTreeMap<String, u64> {
    let mut m = std::collections::BTreeMap::new();
    thread_cpu(std::process::id(), "", &mut m);
    thread_cpu(serve.pid(), "serve:", &mut m);
    m
}

/// CPU nanoseconds per message between two [`cpu`] readings: all threads, and those of the
/// `pvrdma serve` process alone (the device; the rest is the harness playing the VMs).
fn cpu_sums(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
    msgs: u64,
) -> (f64, f64) {
    let (mut all, mut serve) = (0u64, 0u64);
    for (k, &v) in after {
        let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
        all += d;
        if k.starts_with("serve:") {
            serve += d;
        }
    }
    let m = msgs.max(1) as f64;
    (all as f64 / m, serve as f64 / m)
}

/// The median, minimum and maximum of `v` (not empty).
fn spread(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Rounds of each VM-to-VM case: the figures of two devices on two cores swing between runs by
/// up to 2× as the OS places eight busy threads, so a ratio is a median, never one run.
const ROUNDS: usize = 5;

/// VM to VM next to loopback on the same device, case by case, [`ROUNDS`] times in turn (one
/// with `--quick`), with the CPU time per message (per round trip for latency), of all threads
/// and of the device's alone (two cores: where the rate is bound by the sum of the threads' times,
/// a case with more busy threads is slower without doing more work).
fn vm_to_vm(o: &Opts, serve: &ServeProcess, a: &Vm, b: &Vm) -> Result<(), String> {
    let sizes: Vec<u64> = o
        .sizes
        .iter()
        .copied()
        .filter(|&s| (64..=1 << 20).contains(&s))
        .collect();
    let buf = sizes.iter().copied().max().unwrap_or(4096).max(2 << 16);
    let mut lp = pair(a, None, o.depth, buf)?;
    let mut vp = pair(a, Some(b), o.depth, buf)?;
    header();
    for &test in &o.tests {
        let sizes: Vec<u64> = match test {
            Test::SendLat => vec![8],
            Test::SendBw | Test::WriteBw | Test::ReadBw => sizes.clone(),
            _ => continue,
        };
        for size in sizes {
            let got = rounds_of(o, serve, (a, b), (&mut lp, &mut vp), test, size, None)?;
            vm2vm_summary(test, size, &got, false);
            if test == Test::SendLat {
                // The same on one core: see `rounds_of`.
                let got = rounds_of(
                    o,
                    serve,
                    (a, b),
                    (&mut lp, &mut vp),
                    test,
                    size,
                    Some(host_cpus()[0]),
                )?;
                vm2vm_summary(test, size, &got, true);
            }
        }
    }
    Ok(())
}

/// Per side (loopback, VM to VM): the figure, CPU ns/msg of all threads, of the device's.
type Rounds = [Vec<(f64, f64, f64)>; 2];

/// [`ROUNDS`] rounds of one case (one with `--quick`), loopback and VM to VM in turn. With
/// `one_cpu`, every thread of VMs 0 and 1 (the harness's main and interrupt threads, both
/// devices' threads) runs on that CPU alone: with no second core to place threads on, a round
/// trip costs its work and its thread switches and nothing else, so the two paths compare by
/// the work they do, whatever the host's core count; their latencies are then the CPU time of
/// a round trip.
fn rounds_of(
    o: &Opts,
    serve: &ServeProcess,
    (a, b): (&Vm, &Vm),
    (lp, vp): (&mut Pair, &mut Pair),
    test: Test,
    size: u64,
    one_cpu: Option<usize>,
) -> Result<Rounds, String> {
    let rounds = if o.quick { 1 } else { ROUNDS };
    let threads: Vec<(i32, usize)> = match one_cpu {
        Some(_) => tenant_threads(serve.pid())
            .into_iter()
            .filter(|&(_, vm)| vm < 2)
            .collect(),
        None => Vec::new(),
    };
    let place = |set: &[usize]| -> Result<(), String> {
        for &(tid, _) in &threads {
            pin(tid, set).map_err(|e| format!("pin thread {tid}: {e}"))?;
        }
        Ok(())
    };
    let mut got: Rounds = [Vec::new(), Vec::new()];
    if let Some(c) = one_cpu {
        if let Err(e) = place(&[c]) {
            // A sandbox may forbid it: the rows are left out, not the section.
            println!("one core: skipped ({e})");
            let _ = place(host_cpus());
            return Ok(got);
        }
    }
    // Per side: CPU ns and times scheduled by thread role, and the messages they are for.
    let mut by_role: [(Roles, u64); 2] = Default::default();
    for round in 0..rounds {
        // Loopback and VM to VM in turn, first one then the other, so a drift of the host hits
        // both alike.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let (to, p, name) = match (side, one_cpu.is_some()) {
                (0, false) => (a, &mut *lp, "loop"),
                (0, true) => (a, &mut *lp, "loop1c"),
                (_, false) => (b, &mut *vp, "vm2vm"),
                (_, true) => (b, &mut *vp, "vm2vm1c"),
            };
            let before = cpu(serve);
            let roles_before = roles(serve.pid());
            match case(a, to, p, test, size, o) {
                Ok(s) => {
                    let (all, dev) = cpu_sums(&before, &cpu(serve), s.iters);
                    let (acc, msgs) = &mut by_role[side];
                    for (role, (ns, n)) in roles(serve.pid()) {
                        let (ns0, n0) = roles_before.get(role).copied().unwrap_or_default();
                        let e = acc.entry(role).or_default();
                        e.0 += ns.saturating_sub(ns0);
                        e.1 += n.saturating_sub(n0);
                    }
                    *msgs += s.iters;
                    report(name, &s, 1, o.workers, o, None, &[]);
                    got[side].push((figure(&s), all, dev));
                }
                Err(e) => {
                    println!("{name:<8} {:<10} {size:>9} FAILED: {e}", test.name());
                    STALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }
    if one_cpu.is_some() {
        place(host_cpus())?;
        roles_summary(test, size, &by_role);
    }
    Ok(got)
}

/// CPU nanoseconds and times scheduled (`schedstat`'s first and third fields) by thread role.
type Roles = std::collections::BTreeMap<&'static str, (u64, u64)>;

/// The threads of this process and of `serve` by role: the harness's main thread, its
/// interrupt threads, the vfio-user server threads, the devices' main loops and workers.
fn roles(serve: u32) -> Roles {
    let me = std::process::id();
    let mut out = Roles::new();
    for pid in [me, serve] {
        for t in tasks(pid) {
            let role = if pid == me && t.tid == me {
                "harness"
            } else if pid == me {
                "harness irq"
            } else if t.name.starts_with("vfio-user:") {
                "vfio-user"
            } else if t.name.ends_with("-main") {
                "main loop"
            } else if t.name.contains("-worker-") {
                "workers"
            } else {
                "other"
            };
            let stat = std::fs::read_to_string(t.dir.join("schedstat")).unwrap_or_default();
            let v: Vec<u64> = stat
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            if let [ns, _, slices] = v[..] {
                let e = out.entry(role).or_default();
                e.0 += ns;
                e.1 += slices;
            }
        }
    }
    out
}

/// A thread of a process: its id, name and `/proc` directory.
struct Task {
    tid: u32,
    name: String,
    dir: std::path::PathBuf,
}

/// The threads of process `pid` (none if it is gone).
fn tasks(pid: u32) -> Vec<Task> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|t| {
            let tid = t.file_name().to_str()?.parse().ok()?;
            let dir = t.path();
            let name = std::fs::read_to_string(dir.join("comm")).ok()?;
            Some(Task {
                tid,
                name: name.trim().to_owned(),
                dir,
            })
        })
        .collect()
}

/// Where a message's CPU time goes on one core, by thread role, loopback and VM to VM: the
/// CPU time and the times each role was scheduled, per message (per round trip for latency).
fn roles_summary(test: Test, size: u64, by_role: &[(Roles, u64); 2]) {
    let mut line = format!(
        "{:<8} {:<10} {size:>9} per message on one core, CPU us / times scheduled:",
        "roles1c",
        test.name()
    );
    let mut fields: Vec<(String, String)> = vec![
        ("kind".into(), q("vm2vm_one_core_roles")),
        ("test".into(), q(test.name())),
        ("size".into(), size.to_string()),
    ];
    for (side, (acc, msgs)) in ["loop", "vm2vm"].into_iter().zip(by_role) {
        line += &format!(" {side}");
        let m = (*msgs).max(1) as f64;
        for (role, &(ns, n)) in acc {
            if n == 0 {
                continue;
            }
            let (us, times) = (ns as f64 / m / 1e3, n as f64 / m);
            line += &format!(" {role} {us:.1}/{times:.2};");
            let key = role.replace(' ', "_");
            fields.push((format!("{side}_{key}_cpu_us"), f(us)));
            fields.push((format!("{side}_{key}_scheduled"), f(times)));
        }
    }
    println!("{line}");
    let fields: Vec<(&str, String)> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    println!("{}", json_line(&fields));
}

/// The ratio line of one VM-to-VM case over its rounds: the median ratio with its range, and
/// the median CPU time per message (per round trip for latency) of each side.
fn vm2vm_summary(test: Test, size: u64, got: &Rounds, one_cpu: bool) {
    let n = got[0].len().min(got[1].len());
    if n == 0 {
        return;
    }
    // Round by round, so each ratio compares runs next to each other. Latency: loopback /
    // VM-to-VM (above 1: VM to VM is faster), so that for every row 1.0 means "as good as
    // loopback" and the target reads >= 0.9.
    let mut ratios: Vec<f64> = (0..n)
        .map(|i| {
            let (l, v) = (got[0][i].0, got[1][i].0);
            if test == Test::SendLat {
                l / v
            } else {
                v / l
            }
        })
        .collect();
    let (ratio, lo, hi) = spread(&mut ratios);
    let med = |side: usize, k: usize| {
        let mut v: Vec<f64> = got[side][..n].iter().map(|r| [r.0, r.1, r.2][k]).collect();
        spread(&mut v).0
    };
    let (loop_fig, vm_fig) = (med(0, 0), med(1, 0));
    let mut line = format!(
        "{:<8} {:<10} {size:>9} VM-to-VM / loopback{}: {ratio:.3} (median of {n}; {lo:.3}-{hi:.3})",
        if one_cpu { "ratio1c" } else { "ratio" },
        test.name(),
        if one_cpu { " on one core" } else { "" }
    );
    let mut fields = vec![
        ("kind", q(if one_cpu { "vm2vm_one_core" } else { "vm2vm" })),
        ("test", q(test.name())),
        ("size", size.to_string()),
        ("rounds", n.to_string()),
        ("loop", f(loop_fig)),
        ("vm2vm", f(vm_fig)),
        ("ratio", f(ratio)),
        ("ratio_min", f(lo)),
        ("ratio_max", f(hi)),
    ];
    {
        let (la, ld, va, vd) = (med(0, 1), med(0, 2), med(1, 1), med(1, 2));
        line += &format!(
            "; CPU ns/msg all threads {la:.0} vs {va:.0} ({:.3}), device {ld:.0} vs {vd:.0} ({:.3})",
            la / va,
            ld / vd
        );
        fields.extend([
            ("loop_cpu_ns_per_msg", f(la)),
            ("vm2vm_cpu_ns_per_msg", f(va)),
            ("loop_device_cpu_ns_per_msg", f(ld)),
            ("vm2vm_device_cpu_ns_per_msg", f(vd)),
            ("cpu_ratio", f(la / va)),
            ("device_cpu_ratio", f(ld / vd)),
        ]);
    }
    println!("{line}");
    println!("{}", json_line(&fields));
}

/// `n` 8 B SEND round trips between `a` and `b` on `lat` while `flooders` (if any) flood 64 B
/// SENDs with `o.batch` WQEs per doorbell until the latency run ends; the latency sample and
/// the flood's.
fn under_flood(
    o: &Opts,
    (a, b): (&Vm, &Vm),
    lat: &mut Pair,
    n: u64,
    flooders: Option<(&Vm, &Vm)>,
    flood_cpu: Option<usize>,
) -> Result<(Sample, Option<Sample>), String> {
    let Some((c, d)) = flooders else {
        let s = perf::send_lat_between(&a.drv, &b.drv, lat, 8, n)
            .map_err(|e| format!("idle latency: {e}"))?;
        return Ok((s, None));
    };
    // A fresh flooding pair each time: a stopped flood leaves sends in flight.
    let mut flood = pair(c, Some(d), o.depth, 4096)?;
    let bo = BwOpts {
        size: 64,
        iters: u64::MAX / 2,
        batch: o.batch,
        sig_every: o.sig,
    };
    let stop = AtomicBool::new(false);
    let (loaded, flooded) = std::thread::scope(|s| {
        let links = [(&c.drv, &d.drv)];
        let (flood, stop) = (&mut flood, &stop);
        // Named, so that its CPU time is not counted as the latency pair's (`pair_cpu`).
        let h = std::thread::Builder::new()
            .name("flood".into())
            .spawn_scoped(s, move || {
                if let Some(cpu) = flood_cpu {
                    if let Err(e) = pin(0, &[cpu]) {
                        eprintln!("cannot pin the flood thread to CPU {cpu}: {e}");
                    }
                }
                let pairs = std::slice::from_mut(flood);
                perf::bw_lean_until(&links, pairs, Test::SendBw, bo, Some(stop))
            })
            .expect("spawn the flood thread");
        // Let the flood get going first.
        std::thread::sleep(Duration::from_millis(50));
        let r = perf::send_lat_between(&a.drv, &b.drv, lat, 8, n);
        stop.store(true, Ordering::Relaxed);
        (r, h.join().expect("flood thread"))
    });
    let loaded = loaded.map_err(|e| format!("loaded latency: {e}"))?;
    let flooded = flooded.map_err(|e| format!("flood: {e}"))?;
    Ok((loaded, Some(flooded)))
}

/// One VM pair's 8 B SEND latency, idle and while another VM pair floods 64 B SENDs: the flood
/// from devices of the same `pvrdma serve` (what one tenant can do to another), and the same
/// flood from a second `pvrdma serve` process (what the machine's two cores alone do: the same
/// CPU contention with nothing shared).
/// The CPU time per round trip of the latency pair between two snapshots: this process's main
/// thread (it plays VMs 0 and 1) and the threads of their devices (`serve:` names with `vm0` or
/// `vm1`), polling included.
fn pair_cpu(before: &CpuMap, after: &CpuMap, round_trips: u64) -> f64 {
    let ns: u64 = after
        .iter()
        .filter(|(k, _)| {
            *k == "pvrdma"
                || k.strip_prefix("serve:")
                    .is_some_and(|d| d.contains("vm0") || d.contains("vm1"))
        })
        .map(|(k, &v)| v.saturating_sub(before.get(k).copied().unwrap_or(0)))
        .sum();
    ns as f64 / round_trips.max(1) as f64
}

fn fairness(
    o: &Opts,
    (serve, elsewhere): (&ServeProcess, &ServeProcess),
    a: &Vm,
    b: &Vm,
    same: (&Vm, &Vm),
    other: (&Vm, &Vm),
) -> Result<(), String> {
    let n = if o.quick { 500 } else { 20_000 };
    let mut lat = pair(a, Some(b), o.depth, 2 << 16)?;
    let snap = || {
        let mut m = cpu(serve);
        thread_cpu(elsewhere.pid(), "other:", &mut m);
        m
    };
    header();
    let mut rows = Vec::new();
    for (name, flooders) in [
        ("idle", None),
        ("flooded", Some(same)),
        ("elsewhere", Some(other)),
    ] {
        let before = snap();
        let (l, fl) = under_flood(o, (a, b), &mut lat, n, flooders, None)?;
        let cpu_us = pair_cpu(&before, &snap(), l.iters) / 1e3;
        report(name, &l, 1, o.workers, o, None, &[]);
        if let Some(fl) = &fl {
            report("flood", fl, 1, o.workers, o, None, &[("while", q(name))]);
        }
        rows.push((l, fl.map_or(0.0, |s| s.mmsg_per_s()), cpu_us));
    }
    let p99 = |i: usize| rows[i].0.lat_us(0.99);
    let (same_x, other_x) = (p99(1) / p99(0), p99(2) / p99(0));
    println!(
        "fairness: 8 B send_lat p99 {:.2} us idle; {:.2} us ({same_x:.2}x) while VMs of the same \
         process flood 64 B SENDs at {:.3} M msg/s; {:.2} us ({other_x:.2}x) while the same flood \
         runs in another process at {:.3} M msg/s",
        p99(0),
        p99(1),
        rows[1].1,
        p99(2),
        rows[2].1
    );
    println!(
        "fairness: the pair's CPU time per round trip (its harness thread and its two devices' \
         threads, polling included) {:.1} us idle, {:.1} us ({:.2}x) beside the flood in the same \
         process, {:.1} us ({:.2}x) beside the flood in another process",
        rows[0].2,
        rows[1].2,
        rows[1].2 / rows[0].2,
        rows[2].2,
        rows[2].2 / rows[0].2
    );
    println!(
        "{}",
        json_line(&[
            ("kind", q("fairness")),
            ("idle_p50_us", f(rows[0].0.lat_us(0.5))),
            ("idle_p99_us", f(p99(0))),
            ("same_process_p50_us", f(rows[1].0.lat_us(0.5))),
            ("same_process_p99_us", f(p99(1))),
            ("other_process_p50_us", f(rows[2].0.lat_us(0.5))),
            ("other_process_p99_us", f(p99(2))),
            ("same_process_ratio", f(same_x)),
            ("other_process_ratio", f(other_x)),
            ("flood_same_mmsg_s", f(rows[1].1)),
            ("flood_other_mmsg_s", f(rows[2].1)),
            ("idle_pair_cpu_us_per_rt", f(rows[0].2)),
            ("same_process_pair_cpu_us_per_rt", f(rows[1].2)),
            ("other_process_pair_cpu_us_per_rt", f(rows[2].2)),
        ])
    );
    split_fairness(o, serve, (a, b), &mut lat, n, same)
}

/// The CPUs this process may run on, as it started (before the bench pinned any thread); the
/// first two are the latency pair's and the flood's when the cores are split.
fn host_cpus() -> &'static [usize] {
    static CPUS: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();
    CPUS.get_or_init(|| {
        let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0));
        let cpus: Vec<usize> = set
            .map(|set| {
                (0..nix::sched::CpuSet::count())
                    .filter(|&c| set.is_set(c).unwrap_or(false))
                    .collect()
            })
            .unwrap_or_default();
        if cpus.is_empty() {
            vec![0]
        } else {
            cpus
        }
    })
}

/// The threads of VMs 0-3 of `serve` and of this process, placed a core per tenant: VMs 0 and
/// 1 on the first of [`host_cpus`], the others on the second, until [`CoresSplit::run`] ends.
struct CoresSplit {
    threads: Vec<(i32, usize)>,
    pair_cpu: usize,
    other_cpu: usize,
}

impl CoresSplit {
    /// Pins the threads; `None` (having said why, under `what`) with one CPU or when pinning is
    /// refused.
    fn new(serve: &ServeProcess, what: &str) -> Option<CoresSplit> {
        let [pair_cpu, other_cpu, ..] = host_cpus()[..] else {
            println!("{what}, cores split: skipped (one CPU)");
            return None;
        };
        let split = CoresSplit {
            threads: tenant_threads(serve.pid()),
            pair_cpu,
            other_cpu,
        };
        if let Err(e) = split.place(true) {
            println!("{what}, cores split: skipped ({e})");
            if let Err(e) = split.undo() {
                eprintln!("{e}");
            }
            return None;
        }
        Some(split)
    }

    fn place(&self, split: bool) -> Result<(), String> {
        for &(tid, vm) in &self.threads {
            let set = match (split, vm) {
                (true, 0 | 1) => vec![self.pair_cpu],
                (true, _) => vec![self.other_cpu],
                (false, _) => host_cpus().to_vec(),
            };
            pin(tid, &set).map_err(|e| format!("pin thread {tid}: {e}"))?;
        }
        Ok(())
    }

    /// Lets every thread run on all of [`host_cpus`] again.
    fn undo(&self) -> Result<(), String> {
        self.place(false)
    }

    /// Runs `f` with the threads split, then undoes the split (also when `f` fails).
    fn run<T>(self, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
        let r = f();
        self.undo()?;
        r
    }
}

/// The fairness case again with the two tenants on a core each: every thread of VMs 0 and 1
/// (the harness's main thread and their interrupt threads, their devices' main loops, workers
/// and vfio-user threads) on the first of [`host_cpus`], every thread of the flooding VMs 2 and
/// 3 on the second; the process's shared threads (the fabric's timer, signals) float. With no
/// core to fight over, what is left between the tenants is what the process shares (the
/// fabric, its locks and timer, the allocator): the pair's p99 beside the flood against its
/// p99 idle, pinned alike, is the cost of a flooding neighbour that does not depend on the
/// host having more cores than busy threads.
fn split_fairness(
    o: &Opts,
    serve: &ServeProcess,
    (a, b): (&Vm, &Vm),
    lat: &mut Pair,
    n: u64,
    same: (&Vm, &Vm),
) -> Result<(), String> {
    let Some(split) = CoresSplit::new(serve, "fairness") else {
        return Ok(());
    };
    let (pair_cpu, flood_cpu) = (split.pair_cpu, split.other_cpu);
    let (idle, flooded, fl) = split.run(|| {
        let (idle, _) = under_flood(o, (a, b), lat, n, None, None)?;
        let (flooded, fl) = under_flood(o, (a, b), lat, n, Some(same), Some(flood_cpu))?;
        Ok((idle, flooded, fl))
    })?;
    report("split", &idle, 1, o.workers, o, None, &[]);
    report("splitfl", &flooded, 1, o.workers, o, None, &[]);
    let flood_rate = fl.as_ref().map_or(0.0, Sample::mmsg_per_s);
    if let Some(fl) = &fl {
        report("flood", fl, 1, o.workers, o, None, &[("while", q("split"))]);
    }
    let (i99, f99) = (idle.lat_us(0.99), flooded.lat_us(0.99));
    println!(
        "fairness, cores split (VMs 0-1 on CPU {pair_cpu}, VMs 2-3 on CPU {flood_cpu}): 8 B \
         send_lat p99 {i99:.2} us idle, {f99:.2} us ({:.2}x) while VMs 2-3 flood 64 B SENDs at \
         {flood_rate:.3} M msg/s",
        f99 / i99
    );
    println!(
        "{}",
        json_line(&[
            ("kind", q("fairness_split")),
            ("idle_p50_us", f(idle.lat_us(0.5))),
            ("idle_p99_us", f(i99)),
            ("flooded_p50_us", f(flooded.lat_us(0.5))),
            ("flooded_p99_us", f(f99)),
            ("ratio", f(f99 / i99)),
            ("flood_mmsg_s", f(flood_rate)),
        ])
    );
    Ok(())
}

/// The threads of VMs 0-3 with their VM: this process's main thread (VM 0 and 1's harness) and
/// interrupt threads (`vfio-irqN`), and the device threads of `serve` (`vmN.G-main`,
/// `vmN.G-worker-K`, `vfio-user:vmN`).
fn tenant_threads(serve: u32) -> Vec<(i32, usize)> {
    let me = std::process::id();
    let mut out = Vec::new();
    for (pid, harness) in [(me, true), (serve, false)] {
        for t in tasks(pid) {
            let vm = if harness && t.tid == me {
                Some(0)
            } else if harness {
                vm_index(&t.name, "vfio-irq")
            } else {
                vm_index(&t.name, "vfio-user:vm").or_else(|| vm_index(&t.name, "vm"))
            };
            if let (Some(vm), Ok(tid)) = (vm.filter(|&v| v < 4), i32::try_from(t.tid)) {
                out.push((tid, vm));
            }
        }
    }
    out
}

/// The number right after `prefix` in a thread name.
fn vm_index(name: &str, prefix: &str) -> Option<usize> {
    let rest = name.strip_prefix(prefix)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Restricts thread `tid` (0: the calling thread) to `cpus`.
fn pin(tid: i32, cpus: &[usize]) -> nix::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    for &c in cpus {
        set.set(c)?;
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set)
}

/// 16 VMs, 4 QPs each (pairs i -> i+1 and i -> i+2 around a ring): aggregate 64 B SEND and
/// 64 KiB WRITE rates, and the host memory of each device.
fn sixteen(o: &Opts) -> Result<(), String> {
    const N: usize = 16;
    let serve = serve(o, N)?;
    let pid = serve.pid();
    std::thread::sleep(Duration::from_millis(200));
    let idle = rss(pid);
    let ram = 32 << 20;
    let vms = (0..N)
        .map(|i| boot(&serve, i, ram))
        .collect::<Result<Vec<_>, _>>()?;
    std::thread::sleep(Duration::from_millis(100));
    let active = rss(pid);
    let depth = o.depth.min(64);
    let mut links = Vec::new();
    let mut pairs = Vec::new();
    for i in 0..N {
        for k in [1, 2] {
            let j = (i + k) % N;
            pairs.push(pair(&vms[i], Some(&vms[j]), depth, 64 << 10)?);
            links.push((&vms[i].drv, &vms[j].drv));
        }
    }
    let with_qps = rss(pid);
    header();
    for (test, size) in [(Test::SendBw, 64), (Test::WriteBw, 65536)] {
        let per = if o.quick {
            500
        } else {
            iters_for(o, size, test) / 8
        };
        let bo = BwOpts {
            size,
            iters: per.max(16),
            batch: o.batch.min(32),
            sig_every: o.sig.min(32),
        };
        let s = perf::bw_lean_on(&links, &mut pairs, test, bo)
            .map_err(|e| format!("16 VMs {}: {e}", test.name()))?;
        report("16vms", &s, pairs.len(), o.workers, o, None, &[]);
    }
    let busy = rss(pid);
    let per_dev = |a: (u64, u64), b: (u64, u64)| {
        (
            (b.0 as f64 - a.0 as f64) / N as f64,
            (b.1 as f64 - a.1 as f64) / N as f64,
        )
    };
    println!(
        "pvrdma serve with {N} devices (pid {pid}), {} worker threads each",
        o.workers
    );
    println!(
        "{:<44} {:>12} {:>12}",
        "state", "VmRSS[KiB]", "RssAnon[KiB]"
    );
    for (what, v) in [
        ("16 devices, no client", idle),
        ("16 clients, devices active", active),
        ("+ 4 RC QPs per device, 64 KiB MRs", with_qps),
        ("after the traffic", busy),
    ] {
        println!("{what:<44} {:>12} {:>12}", v.0, v.1);
    }
    let (act, traffic) = (per_dev(idle, active), per_dev(idle, busy));
    println!(
        "per device: {:.0} KiB ({:.0} KiB anonymous) once active, {:.0} KiB ({:.0}) after the traffic",
        act.0, act.1, traffic.0, traffic.1
    );
    println!(
        "{}",
        json_line(&[
            ("kind", q("mem16")),
            ("idle_rss_kib", idle.0.to_string()),
            ("active_rss_kib", active.0.to_string()),
            ("busy_rss_kib", busy.0.to_string()),
            ("per_device_active_kib", f(act.0)),
            ("per_device_active_anon_kib", f(act.1)),
            ("per_device_busy_kib", f(traffic.0)),
            ("per_device_busy_anon_kib", f(traffic.1)),
        ])
    );
    Ok(())
}

/// Guest RAM of a hostile VM: room for the receive rings of the QPs its device's budget lets
/// it fill (about 4 MiB of ring per QP of 8,192 16-SGE receives; the default 128 MiB budget
/// takes ~47 of them).
const HOSTILE_RAM: usize = 512 << 20;
/// 1 GiB WRITEs per round of a hostile VM's work loop.
const HOSTILE_GIB_WRITES: u32 = 16;
/// The longest the hostile tenant's loops may take to begin.
const HOSTILE_START: Duration = Duration::from_secs(30);

/// CPU time (ns) by thread name.
type CpuMap = std::collections::BTreeMap<String, u64>;

/// The CPU time per message between two snapshots (of this process, of the `pvrdma serve`
/// of VMs 0-2 as `serve:`, of the second one as `other:`), split four ways: the well-behaved
/// pair's threads (this process's main thread, devices 0 and 1), the hostile tenant's guest
/// (its `hostile-*` threads: the vCPUs a VM would burn), its device (VM 2's device threads, and
/// the second process's), and the rest (the fabric's timer, interrupt threads, each process's
/// main thread).
fn cpu_split(before: &CpuMap, after: &CpuMap, msgs: u64) -> [f64; 4] {
    let mut split = [0.0; 4];
    for (k, &v) in after {
        let ns = v.saturating_sub(before.get(k).copied().unwrap_or(0)) as f64 / msgs.max(1) as f64;
        let device = k.strip_prefix("serve:").unwrap_or("");
        let i = if k == "pvrdma" || device.contains("vm0") || device.contains("vm1") {
            0
        } else if k.starts_with("hostile") {
            1
        } else if device.contains("vm2") || (k.starts_with("other:") && k.contains("vm")) {
            2
        } else {
            3
        };
        split[i] += ns;
    }
    split
}

/// `n` 8 B SEND round trips between `a` and `b` on `lat` while `hostile` (if any) runs
/// [`tenant::run`] against `targets`, measured once each of its loops is under way: the sample,
/// `snap` (CPU time by thread) before and after it, and what the tenant did.
fn beside_a_hostile_tenant(
    snap: &dyn Fn() -> CpuMap,
    (a, b): (&Vm, &Vm),
    lat: &mut Pair,
    n: u64,
    hostile: Option<(&Vm, &[Target], tenant::Opts)>,
    began_hook: &dyn Fn(),
) -> Result<(Sample, [CpuMap; 2], Tally), String> {
    let tally = Tally::default();
    let Some((h, targets, to)) = hostile else {
        let before = snap();
        let s = perf::send_lat_between(&a.drv, &b.drv, lat, 8, n)
            .map_err(|e| format!("idle latency: {e}"))?;
        return Ok((s, [before, snap()], tally));
    };
    let stop = AtomicBool::new(false);
    let (r, cpu, hostile) = std::thread::scope(|s| {
        let (drv, gid, tally, stop) = (&h.drv, h.gid, &tally, &stop);
        let t = s.spawn(move || tenant::run(drv, gid, targets, to, tally, stop));
        let began = || tally.every_loop_began(to.loops);
        let t0 = Instant::now();
        while !began() && !t.is_finished() && t0.elapsed() < HOSTILE_START {
            std::thread::sleep(Duration::from_millis(5));
        }
        began_hook();
        let before = snap();
        let r = if began() {
            perf::send_lat_between(&a.drv, &b.drv, lat, 8, n).map_err(|e| e.to_string())
        } else {
            Err(format!("the hostile tenant's loops did not begin: {tally}"))
        };
        let after = snap();
        stop.store(true, Ordering::Relaxed);
        (
            r,
            [before, after],
            t.join().expect("hostile tenant's thread"),
        )
    });
    hostile.map_err(|e| format!("hostile tenant: {e}"))?;
    let s = r.map_err(|e| format!("latency beside a hostile tenant: {e}"))?;
    Ok((s, cpu, tally))
}

/// One VM pair's 8 B SEND latency idle, while a third VM of the same `pvrdma serve` is a
/// hostile tenant ([`tenant::run`]: QPs to its device's budget filled and destroyed, stalled
/// 1 GiB WRITEs over one aliased page released, its QPs aimed at the pair's QPs with their
/// rkeys and guessed ones), and while the same tenant runs in a second `pvrdma serve` (the
/// CPU contention alone, nothing shared); each with the CPU time per message of the pair's
/// threads and of the tenant's.
pub(super) fn hostile_section(o: &Opts) -> Result<(), String> {
    // Before any thread is pinned.
    let _ = host_cpus();
    let ram = pvrdma_guest::transport::DEFAULT_RAM;
    let same = serve(o, 3)?;
    let (a, b) = (boot(&same, 0, ram)?, boot(&same, 1, ram)?);
    let h = boot(&same, 2, HOSTILE_RAM)?;
    // The second process's hostile VM is its VM 3 (0-2 have no client): a MAC and GID of its
    // own, as on one network.
    let other = serve(o, 4)?;
    let h_other = boot(&other, 3, HOSTILE_RAM)?;
    let snap = || {
        let mut m = cpu(&same);
        thread_cpu(other.pid(), "other:", &mut m);
        m
    };
    let n = if o.quick { 2000 } else { 20_000 };
    let mut lat = pair(&a, Some(&b), o.depth, 2 << 16)?;
    let targets = [
        Target::new(&lat.a, a.gid, &lat.b, b.gid, &[&lat.mr_a]),
        Target::new(&lat.b, b.gid, &lat.a, a.gid, &[&lat.mr_b]),
    ];
    let to = tenant::Opts {
        gib_writes: HOSTILE_GIB_WRITES,
        loops: o.hostile,
    };
    header();
    let mut rows = Vec::new();
    for (name, hostile) in [
        ("idle", None),
        ("hostile", Some((&h, &targets[..], to))),
        ("elsewhere", Some((&h_other, &targets[..], to))),
    ] {
        let (s, [before, after], tally) =
            beside_a_hostile_tenant(&snap, (&a, &b), &mut lat, n, hostile, &|| {})?;
        report(name, &s, 1, o.workers, o, None, &[]);
        let mut fields = vec![("kind", q("cpu")), ("while", q(name))];
        fields.extend(cpu_per_msg(&before, &after, s.iters));
        println!("{}", json_line(&fields));
        if hostile.is_some() {
            println!("{:<8} the hostile tenant meanwhile: {tally}", "");
        }
        let split = cpu_split(&before, &after, s.iters);
        rows.push((s, split, tally));
    }
    let p99 = |i: usize| rows[i].0.lat_us(0.99);
    let (same_x, other_x) = (p99(1) / p99(0), p99(2) / p99(0));
    let split = |i: usize| rows[i].1;
    println!(
        "hostile neighbour ({}): 8 B send_lat p99 {:.2} us idle; {:.2} us ({same_x:.2}x) while a \
         VM of the same process is a hostile tenant; {:.2} us ({other_x:.2}x) while it runs in \
         another process",
        o.hostile,
        p99(0),
        p99(1),
        p99(2)
    );
    for (i, name) in [(0, "idle"), (1, "hostile"), (2, "elsewhere")] {
        let [pair, guest, device, rest] = split(i);
        println!(
            "{:<8} CPU per message ({name}): the pair's threads {pair:.0} ns; the hostile \
             tenant's guest {guest:.0} ns, its device {device:.0} ns; the rest {rest:.0} ns",
            ""
        );
    }
    let mut fields = vec![
        ("kind", q("hostile_fairness")),
        ("loops", q(&o.hostile.to_string())),
        ("iters", n.to_string()),
        ("idle_p50_us", f(rows[0].0.lat_us(0.5))),
        ("idle_p99_us", f(p99(0))),
        ("hostile_p50_us", f(rows[1].0.lat_us(0.5))),
        ("hostile_p99_us", f(p99(1))),
        ("elsewhere_p50_us", f(rows[2].0.lat_us(0.5))),
        ("elsewhere_p99_us", f(p99(2))),
        ("ratio", f(same_x)),
        ("elsewhere_ratio", f(other_x)),
    ];
    let cpu_fields: Vec<(String, String)> = ["idle", "hostile", "elsewhere"]
        .iter()
        .enumerate()
        .flat_map(|(i, row)| {
            ["pair", "tenant_guest", "tenant_device", "rest"]
                .iter()
                .zip(split(i))
                .map(move |(who, ns)| (format!("{row}_{who}_cpu_ns_per_msg"), f(ns)))
        })
        .collect();
    fields.extend(cpu_fields.iter().map(|(k, v)| (k.as_str(), v.clone())));
    let tally: Vec<(String, u64)> = rows[1]
        .2
        .fields()
        .into_iter()
        .map(|(k, v)| (format!("tenant_{k}"), v))
        .collect();
    fields.extend(tally.iter().map(|(k, v)| (k.as_str(), v.to_string())));
    println!("{}", json_line(&fields));
    hostile_split(o, &same, (&a, &b), &mut lat, n, (&h, &targets[..], to))
}

/// The hostile neighbour again with a core each, as [`split_fairness`] does for the flood:
/// every thread of VMs 0 and 1 on the first of [`host_cpus`], every thread of the hostile VM 2
/// (its device's, its interrupt threads, and the tenant's `hostile-*` threads, pinned once they
/// run) on the second.
fn hostile_split(
    o: &Opts,
    serve: &ServeProcess,
    (a, b): (&Vm, &Vm),
    lat: &mut Pair,
    n: u64,
    hostile: (&Vm, &[Target], tenant::Opts),
) -> Result<(), String> {
    let Some(split) = CoresSplit::new(serve, "hostile neighbour") else {
        return Ok(());
    };
    let (pair_cpu, tenant_cpu) = (split.pair_cpu, split.other_cpu);
    let pin_tenant = || {
        for tid in harness_threads_named("hostile-") {
            if let Err(e) = pin(tid, &[tenant_cpu]) {
                eprintln!("cannot pin hostile thread {tid}: {e}");
            }
        }
    };
    let snap = || cpu(serve);
    let (idle, beside, tally) = split.run(|| {
        let (idle, ..) = beside_a_hostile_tenant(&snap, (a, b), lat, n, None, &|| {})?;
        let (beside, _, tally) =
            beside_a_hostile_tenant(&snap, (a, b), lat, n, Some(hostile), &pin_tenant)?;
        Ok((idle, beside, tally))
    })?;
    report("split", &idle, 1, o.workers, o, None, &[]);
    report("splithos", &beside, 1, o.workers, o, None, &[]);
    println!("{:<8} the hostile tenant meanwhile: {tally}", "");
    let (i99, h99) = (idle.lat_us(0.99), beside.lat_us(0.99));
    println!(
        "hostile neighbour, cores split (VMs 0-1 on CPU {pair_cpu}, VM 2 on CPU {tenant_cpu}): 8 B \
         send_lat p99 {i99:.2} us idle, {h99:.2} us ({:.2}x) beside the hostile tenant",
        h99 / i99
    );
    println!(
        "{}",
        json_line(&[
            ("kind", q("hostile_split")),
            ("loops", q(&o.hostile.to_string())),
            ("idle_p50_us", f(idle.lat_us(0.5))),
            ("idle_p99_us", f(i99)),
            ("hostile_p50_us", f(beside.lat_us(0.5))),
            ("hostile_p99_us", f(h99)),
            ("ratio", f(h99 / i99)),
        ])
    );
    Ok(())
}

/// This process's threads whose names start with `prefix`.
fn harness_threads_named(prefix: &str) -> Vec<i32> {
    tasks(std::process::id())
        .into_iter()
        .filter(|t| t.name.starts_with(prefix))
        .filter_map(|t| i32::try_from(t.tid).ok())
        .collect()
}

/// The `vms` section.
pub(super) fn vms_section(o: &Opts) -> Result<(), String> {
    // Before any thread is pinned.
    let _ = host_cpus();
    let serve = serve(o, 4)?;
    let ram = pvrdma_guest::transport::DEFAULT_RAM;
    let vms = (0..4)
        .map(|i| boot(&serve, i, ram))
        .collect::<Result<Vec<_>, _>>()?;
    println!("-- VM to VM (two devices, two clients) next to loopback on the first device");
    vm_to_vm(o, &serve, &vms[0], &vms[1])?;
    println!();
    println!(
        "-- fairness: VMs 0-1 measure latency while VMs 2-3 flood 64 B SENDs, then while VMs of \
         another process do"
    );
    let elsewhere = self::serve(o, 2)?;
    let others = (0..2)
        .map(|i| boot(&elsewhere, i, ram))
        .collect::<Result<Vec<_>, _>>()?;
    fairness(
        o,
        (&serve, &elsewhere),
        &vms[0],
        &vms[1],
        (&vms[2], &vms[3]),
        (&others[0], &others[1]),
    )?;
    drop((vms, others));
    drop((serve, elsewhere));
    println!();
    println!("-- 16 VMs, 4 RC QPs each");
    sixteen(o)
}
