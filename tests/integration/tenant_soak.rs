//! A soak with a hostile tenant next to well-behaved ones. VM h (a device of its own) runs in a
//! loop, on threads of its own, what a tenant can do to cost its neighbours
//! (`pvrdma_guest::tenant`): QPs of 8,192 16-SGE receives over one MR page until its device's
//! budget refuses one with ENOMEM, filled and destroyed; 1 GiB WRITEs over one aliased page
//! queued behind RNR and transport-timeout stalls, released, run out or cut short; RC QPs aimed
//! at the QPs of VMs a and b with their MRs' rkeys and guessed ones, some from a QP with the
//! QPN of the victim's own peer. Meanwhile a and b run a verified 8 B ping-pong and checksummed
//! transfers of random size (SEND, WRITE and READ, both ways) between them.
//!
//! Asserted: every byte a and b move is right and lands where it should and nowhere else,
//! every WR of theirs completes exactly once, none of their steps waits longer than
//! [`LIVENESS`] (a stall, not a speed figure: the latency figure is `pvrdma bench --only
//! hostile`), the intruder gets `RETRY_EXC_ERR` and flushes only, memory of a and b that no
//! transfer touches (an MR whose rkey the intruder is given) is untouched, and afterwards the
//! devices serve a fresh VM.
//!
//! In-process by default; with `PVRDMA_TRANSPORT=vfio-user` the VMs are devices of one `pvrdma
//! serve` process. Short by default (a few seconds, a 24 MiB budget per device);
//! `PVRDMA_SOAK_LONG=1` runs it for five minutes with the default budget (128 MiB).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::vms::*;
use crate::common::*;
use pvrdma_dev::abi::{wr_opcode, Cqe};
use pvrdma_dev::DeviceConfig;
use pvrdma_guest::tenant::{self, Loops, Tally, Target};
use pvrdma_guest::{Cq, Mr, SendWqe};

/// The longest any step of a well-behaved VM may wait: generous (debug builds on two cores
/// shared with the hostile tenant's threads); it catches a stall, not a slow-down.
const LIVENESS: Duration = Duration::from_secs(2);
/// Bytes of each transfer buffer: a source half and a landing half.
const HALF: u64 = 64 << 10;

/// The WRs an end has outstanding: its CQ must deliver each exactly once, with success.
#[derive(Default)]
struct Outstanding {
    pending: BTreeMap<u64, &'static str>,
    arrived: BTreeMap<u64, Cqe>,
    longest: Duration,
}

impl Outstanding {
    fn posted(&mut self, wr_id: u64, what: &'static str) {
        assert!(self.pending.insert(wr_id, what).is_none(), "WR id reused");
    }

    /// Waits for WR `wr_id`'s CQE (taking any others that arrive first) and returns it.
    fn wait(&mut self, v: &Vm, cq: &mut Cq, wr_id: u64) -> Cqe {
        let t = Instant::now();
        while !self.arrived.contains_key(&wr_id) {
            let got = v.drv.wait_cqes(cq, 1, WAIT);
            let what = self.pending.get(&wr_id).copied().unwrap_or("?");
            assert!(!got.is_empty(), "{what} {wr_id:#x}: no CQE in {WAIT:?}");
            for c in got {
                let of = self.pending.remove(&c.wr_id);
                assert!(
                    of.is_some(),
                    "a CQE of no outstanding WR (or its second): {c:?}"
                );
                assert_eq!(c.status, 0, "{} {:#x}: {c:?}", of.unwrap(), c.wr_id);
                self.arrived.insert(c.wr_id, c);
            }
        }
        let waited = t.elapsed();
        assert!(waited < LIVENESS, "WR {wr_id:#x} waited {waited:?}");
        self.longest = self.longest.max(waited);
        self.arrived.remove(&wr_id).unwrap()
    }

    /// Nothing outstanding, and the CQ stays empty.
    fn done(&self, v: &Vm, cq: &mut Cq) {
        assert!(self.pending.is_empty() && self.arrived.is_empty());
        let extra = v.drv.wait_cqes(cq, 1, Duration::from_millis(50));
        assert!(
            extra.is_empty(),
            "a CQE after every WR completed: {extra:?}"
        );
    }
}

/// One VM's side of a connection: its QP and CQ, what it has outstanding, and its buffer.
struct Side<'v> {
    vm: &'v Vm,
    end: End,
    out: Outstanding,
    mr: Mr,
}

impl Side<'_> {
    fn post_recv(&mut self, wr_id: u64, off: u64, len: u32) {
        assert!(self
            .vm
            .drv
            .post_recv(&mut self.end.qp, wr_id, &[self.mr.sge(off, len)]));
        self.out.posted(wr_id, "receive");
    }

    fn post_send(&mut self, w: &SendWqe) {
        assert!(self.vm.drv.post_send(&mut self.end.qp, w));
        self.out.posted(w.wr_id, "send");
    }

    fn wait(&mut self, wr_id: u64) -> Cqe {
        self.out.wait(self.vm, &mut self.end.cq, wr_id)
    }

    fn read(&self, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mr.read(self.vm.drv.mem(), off, &mut v);
        v
    }
}

/// A connection between `a` and `b` (depth 16) with a buffer of `2 * HALF` bytes on each side.
fn sides<'v>(a: &'v Vm, b: &'v Vm, iova: u64) -> (Side<'v>, Side<'v>) {
    let (ea, eb) = connect(a, b, 16);
    let side = |vm: &'v Vm, end| Side {
        vm,
        end,
        out: Outstanding::default(),
        mr: vm.drv.reg_mr(vm.pd, iova, 2 * HALF, ALL_ACCESS).unwrap(),
    };
    (side(a, ea), side(b, eb))
}

/// 8 B ping-pong rounds from `a` to `b` and back until `stop`, each message checked; the
/// half round trips.
fn ping_pong(a: &mut Side<'_>, b: &mut Side<'_>, stop: &AtomicBool) -> Vec<Duration> {
    let mut lat = Vec::new();
    for i in 0u64.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let id = |k: u64| i << 2 | k;
        b.post_recv(id(1), HALF, 64);
        a.post_recv(id(3), HALF, 64);
        let ping = (i ^ 0x5eed_0000_0000_0000).to_le_bytes();
        a.mr.write(a.vm.drv.mem(), 0, &ping);
        let t = Instant::now();
        a.post_send(&send(id(0), a.mr.sge(0, 8)));
        let r = b.wait(id(1));
        assert_eq!(r.byte_len, 8, "ping {i}");
        assert_eq!(b.read(HALF, 8), ping, "ping {i}");
        let pong = (!i).to_le_bytes();
        b.mr.write(b.vm.drv.mem(), 0, &pong);
        b.post_send(&send(id(2), b.mr.sge(0, 8)));
        let r = a.wait(id(3));
        lat.push(t.elapsed() / 2);
        assert_eq!(r.byte_len, 8, "pong {i}");
        assert_eq!(a.read(HALF, 8), pong, "pong {i}");
        a.wait(id(0));
        b.wait(id(2));
    }
    lat
}

/// Transfer `i`: a SEND, WRITE or READ of a random size and offset, from `a` to `b` or back
/// (reads fetch from the other side). The landing half is refilled with `guard` first, and
/// afterwards must hold the data where it belongs and `guard` everywhere else.
fn transfer<'v>(x: &mut Side<'v>, y: &mut Side<'v>, i: u64, rng: &mut Rng, guard: &[u8]) {
    let (from, to) = if i % 6 < 3 { (x, y) } else { (y, x) };
    let size = 1 + rng.next() % HALF;
    let src_off = rng.next() % (HALF - size + 1);
    let dst_off = rng.next() % (HALF - size + 1);
    let data = pattern(size as usize, rng.next() as u8);
    // What lands where: `to`'s landing half, except for a READ, which lands in `from`'s.
    let read = i % 3 == 2;
    let (src, dst) = if read { (&*to, &*from) } else { (&*from, &*to) };
    src.mr.write(src.vm.drv.mem(), src_off, &data);
    dst.mr.write(dst.vm.drv.mem(), HALF, guard);
    let wr_id = i << 2;
    let mut landed_at = dst_off;
    match i % 3 {
        0 => {
            to.post_recv(wr_id | 1, HALF, HALF as u32);
            from.post_send(&send(wr_id, from.mr.sge(src_off, size as u32)));
            let r = to.wait(wr_id | 1);
            assert_eq!(r.byte_len, size as u32, "SEND {i}");
            landed_at = 0;
        }
        1 => {
            let w = SendWqe {
                remote_addr: to.mr.iova + HALF + dst_off,
                ..wqe(
                    wr_id,
                    wr_opcode::RDMA_WRITE,
                    vec![from.mr.sge(src_off, size as u32)],
                    &to.mr,
                )
            };
            from.post_send(&w);
        }
        _ => {
            let w = SendWqe {
                remote_addr: to.mr.iova + src_off,
                ..wqe(
                    wr_id,
                    wr_opcode::RDMA_READ,
                    vec![from.mr.sge(HALF + dst_off, size as u32)],
                    &to.mr,
                )
            };
            from.post_send(&w);
        }
    }
    from.wait(wr_id);
    let dst = if read { &*from } else { &*to };
    let mut want = guard.to_vec();
    want[landed_at as usize..(landed_at + size) as usize].copy_from_slice(&data);
    let got = dst.read(HALF, HALF as usize);
    if got != want {
        let first = got.iter().zip(&want).position(|(g, w)| g != w).unwrap();
        panic!(
            "transfer {i} ({size} B, op {}): landing half differs from byte {first} on",
            i % 3
        );
    }
}

/// Sets the flag when dropped: the other threads stop when this one panics.
struct StopOnDrop<'a>(&'a AtomicBool);
impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn pct(v: &[Duration], p: f64) -> Duration {
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn soak(min_time: Duration, budget: u64, gib_writes: u32) {
    let (mut host, mut vms) = host_with_budget(3, budget);
    let h = vms.pop().unwrap();
    let (a, b) = (&vms[0], &vms[1]);
    let (mut pa, mut pb) = sides(a, b, 0x51_0000_0000);
    let (mut xa, mut xb) = sides(a, b, 0x52_0000_0000);
    // Memory of a and b no transfer touches, with full remote access.
    let canary = |v: &Vm, seed| {
        let m = v
            .drv
            .reg_mr(v.pd, 0x53_0000_0000, HALF, ALL_ACCESS)
            .unwrap();
        m.write(v.drv.mem(), 0, &pattern(HALF as usize, seed));
        m
    };
    let (ca, cb) = (canary(a, 0xca), canary(b, 0xcb));
    let targets = [
        Target::new(&pa.end.qp, a.gid, &pb.end.qp, b.gid, &[&pa.mr, &ca, &xa.mr]),
        Target::new(&pb.end.qp, b.gid, &pa.end.qp, a.gid, &[&pb.mr, &cb, &xb.mr]),
        Target::new(&xa.end.qp, a.gid, &xb.end.qp, b.gid, &[&xa.mr, &ca]),
        Target::new(&xb.end.qp, b.gid, &xa.end.qp, a.gid, &[&xb.mr, &cb]),
    ];
    let o = tenant::Opts {
        gib_writes,
        loops: Loops::ALL,
    };
    let stop = AtomicBool::new(false);
    let tally = Tally::default();
    let start = Instant::now();
    let (lat, transfers, hostile) = std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let hostile = s.spawn(|| tenant::run(&h.drv, h.gid, &targets, o, &tally, &stop));
        let (pa, pb, stop) = (&mut pa, &mut pb, &stop);
        let pinger = s.spawn(move || ping_pong(pa, pb, stop));
        let guard = pattern(HALF as usize, 0x9d);
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut n = 0;
        // Until the work loop has also cut its copies short both ways.
        let ran =
            || tally.every_loop_ran(Loops::ALL) && tally.copy_rounds.load(Ordering::Relaxed) >= 3;
        while (start.elapsed() < min_time || !ran()) && !hostile.is_finished() {
            assert!(
                start.elapsed() < min_time + Duration::from_secs(120),
                "the hostile tenant's loops have not each completed their rounds: {tally}"
            );
            transfer(&mut xa, &mut xb, n, &mut rng, &guard);
            n += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let lat = pinger.join().expect("ping-pong thread");
        (lat, n, hostile.join().expect("hostile thread"))
    });
    let elapsed = start.elapsed();
    let mut lat = lat;
    lat.sort_unstable();
    eprintln!(
        "{elapsed:.1?}: a and b made {} ping-pong rounds (8 B, half round trip p50 {:?}, p99 \
         {:?}, max {:?}; longest wait {:?}) and {transfers} verified transfers (longest wait \
         {:?}) while h did: {tally}",
        lat.len(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        lat.last().unwrap(),
        pa.out.longest.max(pb.out.longest),
        xa.out.longest.max(xb.out.longest),
    );
    hostile.expect("the hostile tenant saw what no tenant may see");
    assert!(tally.every_loop_ran(Loops::ALL), "{tally}");
    assert!(
        tally.impostors.load(Ordering::Relaxed) > 0,
        "no intruder QP got a victim's peer's QPN"
    );
    assert!(!lat.is_empty() && transfers > 0);
    for s in [&mut pa, &mut pb, &mut xa, &mut xb] {
        s.out.done(s.vm, &mut s.end.cq);
    }
    for (m, v, seed) in [(&ca, a, 0xca), (&cb, b, 0xcb)] {
        let mut got = vec![0u8; HALF as usize];
        m.read(v.drv.mem(), 0, &mut got);
        assert!(got == pattern(HALF as usize, seed), "a canary MR changed");
    }
    if let Host::Serve(s) = &mut host {
        assert!(s.try_wait().unwrap().is_none(), "pvrdma serve exited");
    }
    // h leaves; a fresh VM on its device, and a and b, talk.
    drop(h);
    let h = host.boot(2);
    let (mut eh, mut ea) = connect(&h, a, 8);
    every_opcode_light(&h, a, &mut eh, &mut ea, 1);
    every_opcode_light(a, &h, &mut ea, &mut eh, 2);
    let (mut ea, mut eb) = connect(a, b, 8);
    every_opcode_light(a, b, &mut ea, &mut eb, 3);
    every_opcode_light(b, a, &mut eb, &mut ea, 4);
}

#[test]
fn a_hostile_tenant_costs_its_neighbours_no_byte_and_no_stall() {
    let _alone = crate::common::alone();
    if std::env::var_os("PVRDMA_SOAK_LONG").is_some() {
        soak(
            Duration::from_secs(300),
            DeviceConfig::default().max_host_mem,
            16,
        );
    } else {
        soak(Duration::from_secs(3), 24 << 20, 2);
    }
}
