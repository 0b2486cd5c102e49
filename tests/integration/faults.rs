//! Fault injection: worker panics during a command and during a transfer, backend errors on
//! create, a client disconnecting mid-transfer, and connect/RESET/disconnect cycles that must not
//! grow the server's fds, threads or memory.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use pvrdma_dev::DeviceConfig;
use pvrdma_guest::transport::DEFAULT_RAM;
use pvrdma_guest::vfio::VfioUser;
use pvrdma_guest::{Ctx, Driver, InProcess, QpKind, Transport};
use rdma_backend::emulated::{EmulatedBackend, Fabric};
use rdma_backend::*;

/// The emulated backend with faults armed on demand (each fires once).
struct Faulty {
    inner: Arc<dyn Backend>,
    panic_create_qp: AtomicBool,
    fail_create_cq: AtomicBool,
    /// A send with this wr_id makes the worker panic (0 = off).
    panic_on_wr: AtomicU64,
    /// While set, sends are refused as a full queue would refuse them.
    refuse_sends: AtomicBool,
    /// The device's sink (to say "progress" as a backend that made room does).
    sink: Arc<dyn CompletionSink>,
    /// While set, CREATE_PD's backend work waits (a command that takes long).
    hold_create_pd: std::sync::Mutex<bool>,
    released: std::sync::Condvar,
}

impl Backend for Faulty {
    fn name(&self) -> &'static str {
        "faulty"
    }
    fn add_gid(&self, index: u32, gid: Gid, ty: GidType) -> Result<()> {
        self.inner.add_gid(index, gid, ty)
    }
    fn del_gid(&self, index: u32) -> Result<()> {
        self.inner.del_gid(index)
    }
    fn create_pd(&self) -> Result<PdId> {
        let mut held = self.hold_create_pd.lock().unwrap();
        while *held {
            held = self.released.wait(held).unwrap();
        }
        drop(held);
        self.inner.create_pd()
    }
    fn destroy_pd(&self, pd: PdId) -> Result<()> {
        self.inner.destroy_pd(pd)
    }
    fn create_mr(&self, pd: PdId, kind: MrKind, access: Access) -> Result<MrKeys> {
        self.inner.create_mr(pd, kind, access)
    }
    fn destroy_mr(&self, mr: MrId) -> Result<()> {
        self.inner.destroy_mr(mr)
    }
    fn create_cq(&self, cqe: u32, cookie: u64) -> Result<CqId> {
        if self.fail_create_cq.swap(false, Ordering::SeqCst) {
            return Err(Error::Exhausted("CQs (injected)"));
        }
        self.inner.create_cq(cqe, cookie)
    }
    fn destroy_cq(&self, cq: CqId) -> Result<()> {
        self.inner.destroy_cq(cq)
    }
    fn create_srq(
        &self,
        pd: PdId,
        max_wr: u32,
        max_sge: u32,
        limit: u32,
        cookie: u64,
    ) -> Result<SrqId> {
        self.inner.create_srq(pd, max_wr, max_sge, limit, cookie)
    }
    fn modify_srq(&self, srq: SrqId, limit: u32) -> Result<()> {
        self.inner.modify_srq(srq, limit)
    }
    fn destroy_srq(&self, srq: SrqId) -> Result<()> {
        self.inner.destroy_srq(srq)
    }
    fn post_srq_recv(&self, srq: SrqId, wr: &RecvWr) -> Result<()> {
        self.inner.post_srq_recv(srq, wr)
    }
    fn create_qp(&self, init: &QpInit) -> Result<(QpId, u32)> {
        if self.panic_create_qp.swap(false, Ordering::SeqCst) {
            panic!("injected panic in create_qp");
        }
        self.inner.create_qp(init)
    }
    fn modify_qp(&self, qp: QpId, attrs: &QpAttrs) -> Result<()> {
        self.inner.modify_qp(qp, attrs)
    }
    fn query_qp_state(&self, qp: QpId) -> Result<QpState> {
        self.inner.query_qp_state(qp)
    }
    fn destroy_qp(&self, qp: QpId) -> Result<()> {
        self.inner.destroy_qp(qp)
    }
    fn post_send(&self, qp: QpId, wr: &SendWr) -> Result<()> {
        if self.refuse_sends.load(Ordering::SeqCst) {
            return Err(Error::QueueFull);
        }
        let w = self.panic_on_wr.load(Ordering::SeqCst);
        if w != 0 && wr.wr_id == w && self.panic_on_wr.swap(0, Ordering::SeqCst) == w {
            panic!("injected panic in post_send");
        }
        self.inner.post_send(qp, wr)
    }
    fn post_recv(&self, qp: QpId, wr: &RecvWr) -> Result<()> {
        self.inner.post_recv(qp, wr)
    }
    fn reset(&self) {
        self.inner.reset()
    }
    fn queued_wr_bytes(&self, send: bool, sges: u32) -> u64 {
        self.inner.queued_wr_bytes(send, sges)
    }
    fn progress(&self) -> bool {
        self.inner.progress()
    }
}

fn faulty_device() -> (Arc<InProcess>, Driver, Arc<Faulty>) {
    let fabric = Fabric::new();
    let slot: Arc<std::sync::Mutex<Option<Arc<Faulty>>>> = Arc::default();
    let s2 = slot.clone();
    let cfg = DeviceConfig {
        mac: MAC,
        ..DeviceConfig::default()
    };
    let t = Arc::new(InProcess::with_backend(
        cfg,
        DEFAULT_RAM,
        Box::new(move |mem: GuestMem, sink: Arc<dyn CompletionSink>| {
            let f = Arc::new(Faulty {
                inner: EmulatedBackend::new(&fabric, mem, sink.clone()),
                refuse_sends: AtomicBool::new(false),
                sink,
                panic_create_qp: AtomicBool::new(false),
                fail_create_cq: AtomicBool::new(false),
                panic_on_wr: AtomicU64::new(0),
                hold_create_pd: Default::default(),
                released: Default::default(),
            });
            *s2.lock().unwrap() = Some(f.clone());
            f as Arc<dyn Backend>
        }),
    ));
    let drv = Driver::probe(t.clone() as Arc<dyn Transport>).expect("probe");
    let f = slot.lock().unwrap().clone().expect("backend built");
    (t, drv, f)
}

#[test]
fn worker_panic_during_a_command_fails_it_and_the_device_goes_on() {
    let _alone = crate::common::alone();
    let (_t, drv, f) = faulty_device();
    let pd = drv.create_pd(Ctx::KERNEL).unwrap();
    let cq = drv.create_cq(Ctx::KERNEL, 16).unwrap();
    f.panic_create_qp.store(true, Ordering::SeqCst);
    let r = drv.create_qp(
        Ctx::KERNEL,
        QpKind::Rc,
        pd,
        &cq,
        &cq,
        None,
        (4, 4, 1, 1),
        false,
    );
    assert_ne!(err_of(r), 0, "a panicking command fails through ERR");
    // The same command works now, and the pool still has its workers.
    drv.create_qp(
        Ctx::KERNEL,
        QpKind::Rc,
        pd,
        &cq,
        &cq,
        None,
        (4, 4, 1, 1),
        false,
    )
    .expect("create after the panic");
    assert_device_healthy(&drv);
}

#[test]
fn backend_error_on_create_is_reported_and_nothing_leaks() {
    let _alone = crate::common::alone();
    let (t, drv, f) = faulty_device();
    let before = t.device().stats().unwrap().objects;
    f.fail_create_cq.store(true, Ordering::SeqCst);
    assert_ne!(err_of(drv.create_cq(Ctx::KERNEL, 16)), 0);
    assert_eq!(
        t.device().stats().unwrap().objects,
        before,
        "no half-created CQ"
    );
    assert_device_healthy(&drv);
}

#[test]
fn worker_panic_during_a_transfer_fails_that_qp_only() {
    let _alone = crate::common::alone();
    let (_t, drv, f) = faulty_device();
    let mut p = rc_pair(&drv, MAC, 8, 1);
    let m = drv.reg_mr(p.pd, 0x1000, 4096, ALL_ACCESS).unwrap();
    f.panic_on_wr.store(666, Ordering::SeqCst);
    assert!(drv.post_send(&mut p.a, &send(666, m.sge(0, 8))));
    // The QP whose worker panicked is reported fatal (QP_FATAL, info = its handle).
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    while !seen.contains(&(1, p.a.handle)) && Instant::now() < deadline {
        seen.extend(drv.events());
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        seen.contains(&(1, p.a.handle)),
        "QP_FATAL for the QP: {seen:?}"
    );
    // Other QPs keep working.
    assert_device_healthy(&drv);
}

#[test]
fn client_disconnect_mid_transfer_then_a_new_client() {
    let _alone = crate::common::alone();
    let server = serve_process();
    {
        let (t, drv) = probed_over(&server);
        let mut p = rc_pair(&drv, MAC, 64, 1);
        let _mrs = post_writes_in_flight(&drv, &mut p, 32, 1 << 20);
        drop(drv);
        drop(t); // disconnect with work in flight
    }
    let (_t, drv) = probed_over(&server);
    assert_eq!(drv.events(), vec![(9, 1)], "a fresh device");
    assert_device_healthy(&drv);
}

#[test]
fn connect_reset_disconnect_cycles_do_not_grow_the_server() {
    let _alone = crate::common::alone();
    let server = serve_process();
    let pid = server.pid();
    let cycle = || {
        let t = VfioUser::connect_with_ram(server.socket(), 16 << 20).expect("connect");
        t.reset();
        drop(t);
    };
    for _ in 0..50 {
        cycle();
    }
    std::thread::sleep(Duration::from_millis(200));
    let (fds0, threads0, rss0) = proc_counts(pid);
    for _ in 0..1000 {
        cycle();
    }
    std::thread::sleep(Duration::from_millis(200));
    let (fds1, threads1, rss1) = proc_counts(pid);
    eprintln!(
        "after 50 cycles: {fds0} fds, {threads0} threads, {rss0} KiB; \
         after 1050: {fds1} fds, {threads1} threads, {rss1} KiB"
    );
    assert!(fds1 <= fds0, "fds grew from {fds0} to {fds1}");
    assert!(
        threads1 <= threads0,
        "threads grew from {threads0} to {threads1}"
    );
    assert!(
        rss1 <= rss0 + 8 * 1024,
        "RSS grew from {rss0} KiB to {rss1} KiB"
    );
    // And the server still serves.
    let (_t, drv) = probed_over(&server);
    assert_device_healthy(&drv);
}

/// The main loop never waits for a worker: with its one worker busy copying for a long time,
/// the guest rings the doorbells of more QPs than the pool's old queue (1,024 jobs) held, and a
/// register read right after is still answered at once, not when the worker is free again.
#[test]
fn the_main_loop_answers_while_the_worker_copies_and_jobs_pile_up() {
    let _alone = crate::common::alone();
    const QPS: usize = 1100;
    let cfg = DeviceConfig {
        mac: MAC,
        max_qp: 2048,
        max_cq: 16,
        workers: 1,
        ..DeviceConfig::default()
    };
    let (t, drv) = probed_with(&Fabric::new(), cfg);
    // The long job: 64 WRITEs of 64 MiB on one QP, drained by the one worker in one go.
    let mut p = rc_pair(&drv, MAC, 64, 1);
    const SIZE: u64 = 64 << 20;
    let src = drv.reg_mr(p.pd, 0x10_0000_0000, SIZE, ALL_ACCESS).unwrap();
    let dst = drv.reg_mr(p.pd, 0x20_0000_0000, SIZE, ALL_ACCESS).unwrap();
    let ctx = fresh_ctx(&drv);
    let pd = drv.create_pd(ctx).unwrap();
    let cq = drv.create_cq(ctx, 16).unwrap();
    let idle: Vec<_> = (0..QPS)
        .map(|_| {
            drv.create_qp(ctx, QpKind::Rc, pd, &cq, &cq, None, (1, 1, 1, 1), false)
                .expect("idle qp")
        })
        .collect();
    let start = Instant::now();
    for i in 0..64 {
        let w = pvrdma_guest::SendWqe {
            wr_id: i,
            opcode: pvrdma_dev::abi::wr_opcode::RDMA_WRITE,
            flags: 2,
            sges: vec![src.sge(0, SIZE as u32)],
            remote_addr: dst.iova,
            rkey: dst.rkey,
            ..Default::default()
        };
        assert!(drv.push_send(&mut p.a, &w));
    }
    drv.ring_sq(&p.a);
    std::thread::sleep(Duration::from_millis(20));
    for q in &idle {
        drv.ring_sq(q);
    }
    let t0 = Instant::now();
    let mut v = [0u8; 4];
    t.read(
        pvrdma_dev::Region::Bar(1),
        pvrdma_dev::regs::offset::IMR,
        &mut v,
    );
    let answered = t0.elapsed();
    let done = drv.wait_cqes(&mut p.cq_a, 64, Duration::from_secs(120));
    let copies = start.elapsed();
    assert_eq!(done.len(), 64);
    assert!(done.iter().all(|c| c.status == 0));
    assert!(
        copies > Duration::from_millis(400),
        "the copies took {copies:?}: too short to show anything"
    );
    assert!(
        answered * 4 < copies,
        "a register read took {answered:?} while the worker copied for {copies:?}"
    );
}

/// A function-level reset does not wait for a command in progress: with CREATE_PD's backend work
/// held, the reset returns at once, the held command's late completion changes nothing, and a
/// new driver probes and runs on the reset device.
#[test]
fn a_reset_does_not_wait_for_a_command_in_progress() {
    let _alone = crate::common::alone();
    let (t, drv, f) = faulty_device();
    let ctx = drv.create_uc(1).unwrap();
    *f.hold_create_pd.lock().unwrap() = true;
    let held = std::thread::spawn(move || drv.create_pd(ctx));
    // The command is under way once its worker waits in the backend.
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let t2 = t.clone();
    std::thread::spawn(move || {
        t2.reset();
        let _ = tx.send(());
    });
    let answered = rx.recv_timeout(Duration::from_secs(2)).is_ok();
    let took = start.elapsed();
    if !answered {
        // Let the command (and then the reset) finish before failing.
        *f.hold_create_pd.lock().unwrap() = false;
        f.released.notify_all();
    }
    assert!(answered, "the reset waited for the command ({took:?})");
    let drv = Driver::probe(t.clone() as Arc<dyn Transport>).expect("probe after the reset");
    // Now the abandoned command's work completes; the new driver's state is untouched.
    *f.hold_create_pd.lock().unwrap() = false;
    f.released.notify_all();
    let _ = held.join();
    // The probe's objects only (the abandoned PD never reached the device's tables).
    let before = t.device().stats().unwrap().objects;
    assert_eq!(before.pds, 0, "PDs: {before:?}");
    assert_device_healthy(&drv);
    eprintln!("reset answered in {took:?} with a command in progress");
}

/// A WR the backend refused (a full queue, or no room for a bounce buffer) stays in the guest's
/// ring; when the backend says it has made progress, the device drains that queue again, even
/// if no completion of the queue arrives to wake it.
#[test]
fn a_refused_wr_is_posted_when_the_backend_makes_room() {
    let _alone = crate::common::alone();
    let (_t, drv, f) = faulty_device();
    let mut p = rc_pair(&drv, MAC, 8, 1);
    let m = drv.reg_mr(p.pd, 0x1000, 4096, ALL_ACCESS).unwrap();
    assert!(drv.post_recv(&mut p.b, 1, &[m.sge(2048, 64)]));
    f.refuse_sends.store(true, Ordering::SeqCst);
    assert!(drv.post_send(&mut p.a, &send(2, m.sge(0, 8))));
    assert!(
        drv.wait_cqes(&mut p.cq_a, 1, Duration::from_millis(200))
            .is_empty(),
        "a refused send completed"
    );
    f.refuse_sends.store(false, Ordering::SeqCst);
    f.sink.progress_needed();
    let c = drv.wait_cqes(&mut p.cq_a, 1, WAIT);
    assert_eq!(c.len(), 1, "the kept send was never posted");
    assert_eq!((c[0].wr_id, c[0].status), (2, 0));
}
