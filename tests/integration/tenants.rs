//! Hostile tenants: one VM makes the emulated fabric copy without end (an MR may list one guest
//! page 262,144 times: 1 GiB of MR from 4 KiB of RAM, and tens of such WRITEs can wait behind a
//! stall, then run in one go). Whatever thread runs them, copies must run in bounded slices on
//! the owning device's workers: the fabric's timer thread keeps serving every other tenant's
//! retries, a reset or departed tenant's copies stop at the next slice, teardown and RESET do
//! not wait behind them, and a DMA_UNMAP is answered promptly with no write into the range
//! after its answer.
//!
//! The bounds asserted here are generous (hundreds of milliseconds for what takes a few); each
//! test prints what it measured. In-process by default; with `PVRDMA_TRANSPORT=vfio-user` the
//! VMs are devices of one `pvrdma serve` process, as in `multi_vm.rs`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::vms::*;
use crate::common::*;
use pvrdma_dev::abi::wr_opcode;
use pvrdma_guest::driver::rc_connect_attrs;
use pvrdma_guest::tenant::{aliased_gib, GIB};
use pvrdma_guest::{Mr, SendWqe, Transport};
use rdma_backend::WcStatus;
use vm_memory::{Bytes, GuestAddress};

/// The 1 GiB WRITEs a hostile tenant queues behind a stall: 64 GiB, which the emulated backend
/// copied in one uninterruptible pass of 7-10 s on a 2-core test machine (~0.13 s per GiB, debug
/// build) before copies were sliced.
const K: u64 = 64;
/// The generous bound on anything that must not wait behind another tenant's copies.
const PROMPT: Duration = Duration::from_millis(500);
/// The most CPU time the host may burn in the second after a copying tenant is reset or leaves.
const CPU_AFTER: Duration = Duration::from_millis(300);

/// A zeroed guest page of `v` filled with pattern `seed` (left zero for `None`).
fn page_of(v: &Vm, seed: Option<u8>) -> GuestAddress {
    let p = v.drv.alloc.page(v.drv.mem());
    if let Some(seed) = seed {
        v.drv
            .mem()
            .write_slice(&pattern(4096, seed), p)
            .expect("fill page");
    }
    p
}

/// The 4 KiB at guest page `p` of `v`.
fn page_bytes(v: &Vm, p: GuestAddress) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    v.drv.mem().read_slice(&mut b, p).expect("read page");
    b
}

/// A signaled 1 GiB RDMA WRITE of all of `src` to the start of `dst`.
fn write_gib(wr_id: u64, src: &Mr, dst: &Mr) -> SendWqe {
    wqe(
        wr_id,
        wr_opcode::RDMA_WRITE,
        vec![src.sge(0, GIB as u32)],
        dst,
    )
}

/// Waits until the device of `v` has run everything its worker was handed so far: a loopback
/// WRITE on a fresh pair, and its completion. Every VM here has ONE worker, which takes queues
/// in the order their doorbells rang, so the WRs posted before are then in the backend.
fn barrier(v: &Vm) {
    let (mut a, _b) = connect(v, v, 4);
    let m = v
        .drv
        .reg_mr(v.pd, 0x7e_0000_0000, 4096, ALL_ACCESS)
        .unwrap();
    let w = wqe(0xba, wr_opcode::RDMA_WRITE, vec![m.sge(0, 8)], &m);
    assert!(v.drv.post_send(&mut a.qp, &w));
    let c = one(&v.drv, &mut a.cq);
    assert_eq!((c.wr_id, c.status), (0xba, 0), "barrier WRITE");
}

/// Waits (up to 20 s) until guest page `p` of `v` holds `want`; returns how long that took.
fn until_page_holds(v: &Vm, p: GuestAddress, want: &[u8]) -> Duration {
    let t = Instant::now();
    while page_bytes(v, p) != want {
        assert!(t.elapsed() < WAIT, "the copies never began");
        std::thread::sleep(Duration::from_millis(1));
    }
    t.elapsed()
}

/// User + system CPU time process `pid` has used (`/proc/PID/stat`, in 10 ms clock ticks).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    let after_name = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after_name
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the line; the state after the name is field 3.
    Duration::from_millis((f[11] + f[12]) * 10)
}

/// The CPU time process `pid` uses in the `window` from now (measured on another thread).
fn cpu_over(pid: u32, window: Duration) -> std::thread::JoinHandle<Duration> {
    let c0 = cpu_time(pid);
    std::thread::spawn(move || {
        std::thread::sleep(window);
        cpu_time(pid).saturating_sub(c0)
    })
}

/// The process the devices of `host` run in.
fn devices_pid(host: &Host) -> u32 {
    match host {
        Host::Serve(s) => s.pid(),
        Host::Fabric(..) => std::process::id(),
    }
}

/// A hostile tenant's copies, under way: h1 → h2 (both QPs of the hostile VM), `K` WRITEs of
/// 1 GiB between two aliased MRs, queued while h2 was still in INIT (so h1's first attempt
/// found no ready responder and waits for a transport retry, which the fabric's timer thread
/// makes), then h2 made ready. The timer's retry finds the responder and runs the queue.
struct Copies {
    h1: End,
    _h2: End,
    _mrs: (Mr, Mr),
}

fn start_copies(h: &Vm) -> Copies {
    let h1 = end_on(h, K as u32);
    let h2 = end_on(h, 4);
    // h1: RTS towards h2, transport timeout 14 (67 ms), 7 retries: ~0.5 s to make h2 ready.
    for m in rc_connect_attrs(h2.qp.qpn, h.gid, ALL_ACCESS) {
        h.drv.modify_qp(&h1.qp, m).expect("modify h1");
    }
    let [init, rtr, rts] = rc_connect_attrs(h1.qp.qpn, h.gid, ALL_ACCESS);
    h.drv.modify_qp(&h2.qp, init).expect("h2 to INIT");
    let (x, d) = (page_of(h, Some(0x3c)), page_of(h, None));
    let src = aliased_gib(&h.drv, h.pd, 0x10_0000_0000, x).expect("a 1 GiB MR over one page");
    let dst = aliased_gib(&h.drv, h.pd, 0x20_0000_0000, d).expect("a 1 GiB MR over one page");
    let mut h1 = h1;
    for i in 0..K {
        assert!(h.drv.post_send(&mut h1.qp, &write_gib(i, &src, &dst)));
    }
    // h1 has tried its first WRITE and found h2 not ready before h2 becomes ready.
    barrier(h);
    let released = Instant::now();
    h.drv.modify_qp(&h2.qp, rtr).expect("h2 to RTR");
    h.drv.modify_qp(&h2.qp, rts).expect("h2 to RTS");
    let began = until_page_holds(h, d, &page_bytes(h, x));
    eprintln!(
        "hostile copies ({K} x 1 GiB) began {began:?} after h2 became ready ({:?} since)",
        released.elapsed()
    );
    Copies {
        h1,
        _h2: h2,
        _mrs: (src, dst),
    }
}

/// Completions of the hostile QP so far (without waiting).
fn completed(h: &Vm, c: &mut Copies) -> usize {
    h.drv
        .wait_cqes(&mut c.h1.cq, K as usize, Duration::ZERO)
        .len()
}

/// A well-behaved tenant's work that only the fabric's timer completes: an RC SEND to a QP with
/// no receive posted (RNR timer 10 µs, 2 RNR retries: RNR_RETRY_EXC_ERR after two timer
/// retries) and one to a QP that stays in INIT (timeout 8 µs, 1 retry: RETRY_EXC_ERR after one
/// timer retry). Each takes well under a millisecond on an idle fabric.
struct TimerWork {
    rnr: End,
    timeout: End,
    _peers: (End, End),
    mr: Mr,
}

fn timer_work(w: &Vm) -> TimerWork {
    let (rnr, rnr_peer, timeout, unready) =
        (end_on(w, 4), end_on(w, 4), end_on(w, 4), end_on(w, 4));
    let mut m = rc_connect_attrs(rnr_peer.qp.qpn, w.gid, ALL_ACCESS);
    m[2].attrs.rnr_retry = 2;
    for m in m {
        w.drv.modify_qp(&rnr.qp, m).expect("modify rnr");
    }
    let mut m = rc_connect_attrs(rnr.qp.qpn, w.gid, ALL_ACCESS);
    m[1].attrs.min_rnr_timer = 1;
    for m in m {
        w.drv.modify_qp(&rnr_peer.qp, m).expect("modify rnr peer");
    }
    let mut m = rc_connect_attrs(unready.qp.qpn, w.gid, ALL_ACCESS);
    (m[2].attrs.timeout, m[2].attrs.retry_cnt) = (1, 1);
    for m in m {
        w.drv.modify_qp(&timeout.qp, m).expect("modify timeout");
    }
    let [init, ..] = rc_connect_attrs(timeout.qp.qpn, w.gid, ALL_ACCESS);
    w.drv.modify_qp(&unready.qp, init).expect("unready to INIT");
    let mr = w
        .drv
        .reg_mr(w.pd, 0x40_0000_0000, 4096, ALL_ACCESS)
        .unwrap();
    TimerWork {
        rnr,
        timeout,
        _peers: (rnr_peer, unready),
        mr,
    }
}

impl TimerWork {
    /// Posts both SENDs and waits (up to `limit`) for their completions: how long each took,
    /// and its status.
    fn run(&mut self, w: &Vm, limit: Duration) -> [(Option<Duration>, u32); 2] {
        let t = Instant::now();
        assert!(w
            .drv
            .post_send(&mut self.rnr.qp, &send(1, self.mr.sge(0, 8))));
        assert!(w
            .drv
            .post_send(&mut self.timeout.qp, &send(2, self.mr.sge(0, 8))));
        [&mut self.rnr.cq, &mut self.timeout.cq].map(|cq| {
            match w
                .drv
                .wait_cqes(cq, 1, limit.saturating_sub(t.elapsed()))
                .pop()
            {
                Some(c) => (Some(t.elapsed()), c.status),
                None => (None, u32::MAX),
            }
        })
    }
}

/// While one tenant's 64 GiB of copies run, another tenant's RNR and transport retries (made by
/// the fabric's timer thread) complete on time; the copying tenant's device resets promptly, its
/// copies stop, and a new driver on it is answered at once.
/// Two VMs W and H on one host, H's 64 GiB of copies under way for 200 ms: the host, W, H, the
/// copies, how many are still in flight, and the device process's CPU over the next second.
fn mid_copy() -> (
    Host,
    Vm,
    Vm,
    Copies,
    usize,
    std::thread::JoinHandle<Duration>,
) {
    let (host, mut vms) = host(2);
    let w = vms.pop().unwrap();
    let h = vms.pop().unwrap();
    let pid = devices_pid(&host);
    let mut copies = start_copies(&h);
    std::thread::sleep(Duration::from_millis(200));
    let in_flight = K as usize - completed(&h, &mut copies);
    let cpu = cpu_over(pid, Duration::from_secs(1));
    (host, w, h, copies, in_flight, cpu)
}

/// `a` and `b` connect and exchange every opcode both ways (seeds `seed` and `seed + 1`).
fn talk_both_ways(a: &Vm, b: &Vm, seed: u8) {
    let (mut ea, mut eb) = connect(a, b, 8);
    every_opcode_light(a, b, &mut ea, &mut eb, seed);
    every_opcode_light(b, a, &mut eb, &mut ea, seed + 1);
}

#[test]
fn one_tenants_long_copies_stall_no_other_tenant() {
    let _alone = crate::common::alone();
    let (host, mut vms) = host(2);
    let w = vms.pop().unwrap();
    let h = vms.pop().unwrap();
    let pid = devices_pid(&host);
    let mut work = timer_work(&w);
    let mut copies = start_copies(&h);

    // W's timer work while H's copies run; H is reset after W's work is done, or after 1 s.
    let (w_rnr, w_timeout, in_flight, reset_in, answered_in, cpu, h) = std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let (w, work) = (&w, &mut work);
        let wt = s.spawn(move || {
            let first = work.run(w, Duration::from_secs(120));
            let _ = tx.send(());
            first
        });
        let _ = rx.recv_timeout(Duration::from_secs(1));
        let in_flight = K as usize - completed(&h, &mut copies);
        let cpu = cpu_over(pid, Duration::from_secs(1));
        let t = Instant::now();
        h.t.reset();
        let reset_in = t.elapsed();
        let (ht, hv, mac) = (h.t.clone(), h.vfio.clone(), h.mac);
        drop(h);
        let h = vm_on(ht, hv, mac);
        let answered_in = t.elapsed();
        let [w_rnr, w_timeout] = wt.join().expect("W's thread");
        let cpu = cpu.join().expect("CPU sampler");
        (w_rnr, w_timeout, in_flight, reset_in, answered_in, cpu, h)
    });
    eprintln!(
        "W's timer work during H's copies: RNR retries done in {:?} (status {}), transport \
         retries in {:?} (status {}); H reset with {in_flight} of {K} WRITEs in flight: reset \
         returned in {reset_in:?}, a new driver was answered {answered_in:?} after the reset; \
         {cpu:?} of CPU in the second after the reset",
        w_rnr.0, w_rnr.1, w_timeout.0, w_timeout.1
    );
    assert!(in_flight > 0, "the reset came after every copy");
    assert_eq!(w_rnr.1, WcStatus::RnrRetryExcErr as u32, "W's RNR send");
    assert_eq!(
        w_timeout.1,
        WcStatus::RetryExcErr as u32,
        "W's unready send"
    );
    for (what, d) in [
        ("W's RNR retries", w_rnr.0.unwrap()),
        ("W's transport retries", w_timeout.0.unwrap()),
        ("H's reset", reset_in),
        ("a new driver on H", answered_in),
    ] {
        assert!(d < PROMPT, "{what} waited {d:?} behind H's copies");
    }
    assert!(
        cpu < CPU_AFTER,
        "{cpu:?} of CPU in the second after H's reset: its copies went on"
    );
    // H's new driver and W talk.
    talk_both_ways(&h, &w, 1);
}

/// A tenant that goes away (its client disconnects; in-process, its device is shut down) in the
/// middle of 64 GiB of copies is torn down promptly, its copies stop, and the VM that takes its
/// place is answered at once.
#[test]
fn a_tenant_that_leaves_mid_copy_is_torn_down_promptly() {
    let _alone = crate::common::alone();
    let (host, w, h, _copies, in_flight, cpu) = mid_copy();
    let t = Instant::now();
    drop(h);
    let left_in = t.elapsed();
    let h = host.boot(0);
    let answered_in = t.elapsed();
    let cpu = cpu.join().expect("CPU sampler");
    eprintln!(
        "H left with {in_flight} of {K} WRITEs in flight: gone in {left_in:?}, the next VM on \
         its device answered {answered_in:?} after it left; {cpu:?} of CPU in the second after"
    );
    assert!(in_flight > 0, "H left after every copy");
    assert!(left_in < PROMPT, "leaving took {left_in:?}");
    assert!(
        answered_in < PROMPT,
        "the next VM was answered {answered_in:?} after H left"
    );
    assert!(
        cpu < CPU_AFTER,
        "{cpu:?} of CPU in the second after H left: its copies went on"
    );
    talk_both_ways(&h, &w, 3);
}

/// A tenant that destroys its QP in the middle of 64 GiB of copies gets its answer promptly, the
/// copies stop, and its device keeps serving it.
#[test]
fn a_qp_destroyed_mid_copy_stops_copying() {
    let _alone = crate::common::alone();
    let (_host, w, h, copies, in_flight, cpu) = mid_copy();
    let t = Instant::now();
    h.drv.destroy_qp(copies.h1.qp).expect("destroy h1");
    let destroyed_in = t.elapsed();
    let (mut eh, mut ew) = connect(&h, &w, 8);
    let answered_in = t.elapsed();
    let cpu = cpu.join().expect("CPU sampler");
    eprintln!(
        "h1 destroyed with {in_flight} of {K} WRITEs in flight: answered in {destroyed_in:?}, \
         H's next commands answered {answered_in:?} after the destroy; {cpu:?} of CPU in the \
         second after"
    );
    assert!(in_flight > 0, "h1 was destroyed after every copy");
    assert!(destroyed_in < PROMPT, "DESTROY_QP took {destroyed_in:?}");
    assert!(
        answered_in < PROMPT,
        "H's next commands were answered {answered_in:?} after the destroy"
    );
    assert!(
        cpu < CPU_AFTER,
        "{cpu:?} of CPU in the second after h1 was destroyed: its copies went on"
    );
    every_opcode_light(&h, &w, &mut eh, &mut ew, 5);
    every_opcode_light(&w, &h, &mut ew, &mut eh, 6);
}

/// VM a WRITEs 128 GiB into one aliased 1 GiB MR of VM b, released in one go by b's receive (the
/// first WRITE carries an immediate and waited for it). Once the copies are under way b's
/// client unmaps all of b's RAM: the unmap is answered promptly, and from its answer on no byte
/// of b's RAM changes (after the answer a's source page holds bytes b has never seen, so any
/// later copy would show); a's WRs each complete exactly once; the process keeps serving, and
/// after a remap and a reset b's device serves a new driver. (vfio-user only: DMA_UNMAP is a
/// message of that protocol.)
#[test]
fn an_unmap_is_answered_promptly_during_one_huge_copy() {
    let _alone = crate::common::alone();
    if !over_vfio_user() {
        return;
    }
    let (mut host, mut vms) = host(2);
    let b = vms.pop().unwrap();
    let a = &vms[0];
    // Twice the WRITEs of the other tests: today the copies outlast the unmap's 10 s drain
    // timeout, and what they write after the unmap's answer shows.
    const N: u64 = 2 * K;
    let mut ea = end_on(a, N as u32);
    let mut eb = end_on(&b, 4);
    for m in rc_connect_attrs(eb.qp.qpn, b.gid, ALL_ACCESS) {
        a.drv.modify_qp(&ea.qp, m).expect("modify a");
    }
    // b's RNR timer is 655 ms: its receive, not the fabric's timer, releases a's WRs.
    let mut m = rc_connect_attrs(ea.qp.qpn, a.gid, ALL_ACCESS);
    m[1].attrs.min_rnr_timer = 0;
    for m in m {
        b.drv.modify_qp(&eb.qp, m).expect("modify b");
    }
    let x = page_of(a, Some(0x5a));
    let d = page_of(&b, None);
    let src = aliased_gib(&a.drv, a.pd, 0x10_0000_0000, x).expect("a 1 GiB MR over one page");
    let dst = aliased_gib(&b.drv, b.pd, 0x20_0000_0000, d).expect("a 1 GiB MR over one page");
    let small = b
        .drv
        .reg_mr(b.pd, 0x30_0000_0000, 4096, ALL_ACCESS)
        .unwrap();
    for i in 0..N {
        let mut w = write_gib(i, &src, &dst);
        if i == 0 {
            (w.opcode, w.imm) = (wr_opcode::RDMA_WRITE_WITH_IMM, 0x1234);
        }
        assert!(a.drv.post_send(&mut ea.qp, &w));
    }
    barrier(a);
    assert!(b.drv.post_recv(&mut eb.qp, 7, &[small.sge(0, 8)]));
    until_page_holds(&b, d, &page_bytes(a, x));

    let vb = b.vfio.clone().expect("vfio-user");
    let ram = pvrdma_guest::vfio::DEFAULT_RAM as u64;
    let t = Instant::now();
    vb.with_client(|c| c.dma_unmap(0, ram))
        .expect("DMA_UNMAP answered");
    let answered_in = t.elapsed();
    let snapshot = || {
        let mut v = vec![0u8; ram as usize];
        b.drv.mem().read_slice(&mut v, GuestAddress(0)).unwrap();
        v
    };
    let at_answer = snapshot();
    // From here a's source holds bytes that b's RAM has never held.
    a.drv
        .mem()
        .write_slice(&pattern(4096, 0xa7), x)
        .expect("new source bytes");
    let mut seen = BTreeMap::new();
    let start = Instant::now();
    while seen.len() < N as usize && start.elapsed() < Duration::from_secs(120) {
        for c in a.drv.wait_cqes(
            &mut ea.cq,
            N as usize - seen.len(),
            Duration::from_millis(100),
        ) {
            assert!(c.wr_id < N, "{c:?}");
            assert!(
                seen.insert(c.wr_id, c.status).is_none(),
                "wr {} twice",
                c.wr_id
            );
        }
    }
    let done_in = start.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let after = snapshot();
    // Pages compared whole (a debug build counts bytes slowly), bytes only in those that differ.
    let changed: usize = after
        .chunks(4096)
        .zip(at_answer.chunks(4096))
        .filter(|(x, y)| x != y)
        .map(|(x, y)| x.iter().zip(y).filter(|(p, q)| p != q).count())
        .sum();
    let ok = seen.values().filter(|&&s| s == 0).count();
    eprintln!(
        "unmap answered in {answered_in:?}; {changed} bytes of b's RAM changed after the \
         answer; a's {N} WRITEs: {} completed ({done_in:?} after the answer), {ok} landed",
        seen.len(),
    );
    assert!(answered_in < PROMPT, "unmap answered in {answered_in:?}");
    assert_eq!(
        changed, 0,
        "the device wrote into b's RAM after its unmap was answered"
    );
    assert_eq!(seen.len(), N as usize, "every WR of a completes: {seen:?}");
    assert!(
        ok < N as usize,
        "the unmap came after every copy: the test saw nothing in flight"
    );
    // In order: the WRITEs that landed, then one error, then flushes.
    let st: Vec<u32> = seen.values().copied().collect();
    assert!(st[..ok].iter().all(|&s| s == 0), "{seen:?}");
    let remote = [
        WcStatus::RemOpErr as u32,
        WcStatus::RemAccessErr as u32,
        WcStatus::RetryExcErr as u32,
    ];
    assert!(remote.contains(&st[ok]), "{seen:?}");
    assert!(
        st[ok + 1..]
            .iter()
            .all(|&s| s == WcStatus::WrFlushErr as u32),
        "{seen:?}"
    );
    if let Host::Serve(s) = &mut host {
        assert!(s.try_wait().unwrap().is_none(), "pvrdma serve exited");
    }
    // b maps its RAM again and resets its device; a new driver on it talks to a both ways.
    let fd = std::os::fd::AsRawFd::as_raw_fd(vb.ram_file());
    vb.with_client(|c| c.dma_map(0, 0, ram, fd))
        .expect("DMA_MAP again");
    vb.reset();
    let mac = b.mac;
    drop((eb, b));
    let b = vm_on(vb.clone(), Some(vb), mac);
    let (mut ea, mut eb) = connect(a, &b, 8);
    every_opcode(a, &b, &mut ea, &mut eb, 4);
    every_opcode(&b, a, &mut eb, &mut ea, 5);
}

/// The ERR value of a command that must fail.
fn refused<T: std::fmt::Debug>(r: pvrdma_guest::driver::Result<T>) -> u32 {
    match r {
        Err(pvrdma_guest::GuestError::Command { err, .. }) => err,
        other => panic!("expected a refused command, got {other:?}"),
    }
}

/// A VM cannot take another VM's GIDs, and so cannot receive its traffic: the link-local GID
/// of another device's MAC is refused (EINVAL) even while that device is down, and a GID another
/// live device holds is refused (EBUSY) instead of being half-taken.
#[test]
fn a_vm_cannot_take_another_vms_gid() {
    let _alone = crate::common::alone();
    let (host, mut vms) = host(2);
    let h = vms.pop().unwrap();
    let a = vms.pop().unwrap();
    let (einval, ebusy) = (pvrdma_dev::regs::err::EINVAL, pvrdma_dev::regs::err::EBUSY);
    assert_eq!(refused(h.drv.create_bind(1, a.gid, 1)), einval);
    // An address-based GID of a (IPv4-mapped 10.0.0.1): first come, first served.
    let ip: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1];
    a.drv.create_bind(1, ip, 1).expect("a binds its address");
    assert_eq!(refused(h.drv.create_bind(1, ip, 1)), ebusy);
    // a's device goes down (a reset drops its GIDs, then its client leaves): its link-local
    // GID is still not h's.
    a.t.reset();
    let gid = a.gid;
    drop(a);
    assert_eq!(refused(h.drv.create_bind(2, gid, 1)), einval);
    // The device that comes back on a's socket binds its GIDs again.
    let a2 = host.boot(0);
    assert_eq!(a2.gid, gid);
    a2.drv
        .create_bind(1, ip, 1)
        .expect("a binds its address again");
    let (mut ea, mut eh) = connect(&a2, &h, 8);
    every_opcode_light(&a2, &h, &mut ea, &mut eh, 9);
}
