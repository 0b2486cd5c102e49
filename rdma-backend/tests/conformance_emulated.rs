//! The conformance suite on the emulated backend.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rdma_backend::conformance::{self, rc_pair, wr, Dev, Factory, RcOpts, SEND};
use rdma_backend::emulated::{EmulatedBackend, Fabric, HOLD_MAX};
use rdma_backend::{
    Access, AsyncEvent, Backend, CompletionSink, GuestMem, MrKind, QpAttrs, QpState, QpType,
    RecvWr, SendOp, SendWr, Sge, SgeList, WcStatus, WorkCompletion,
};
use vm_memory::GuestAddress;

/// Emulated backends on a fabric of their own.
fn emulated() -> impl Fn(GuestMem, Arc<dyn CompletionSink>) -> Arc<dyn Backend> {
    let fabric = Fabric::new();
    move |mem: GuestMem, sink: Arc<dyn CompletionSink>| -> Arc<dyn Backend> {
        EmulatedBackend::new(&fabric, mem, sink)
    }
}

fn run(case: fn(&Factory<'_>)) {
    case(&emulated());
}

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        $(#[test] fn $name() { run(conformance::$name); })*
        #[test]
        fn every_case_is_listed() {
            let here = [$(stringify!($name)),*];
            for (name, _) in conformance::CASES {
                assert!(here.contains(name), "{name} is not run");
            }
        }
    };
}

cases!(
    frmr_register_and_invalidate,
    frmr_state_errors,
    rc_ping_pong,
    rc_opcodes,
    rc_16mib,
    oversized_sge_total,
    rc_atomics,
    atomics_concurrent,
    ud_send_grh,
    ud_length_errors,
    ud_many_address_vectors,
    gsi_send,
    ud_qkey_mismatch,
    srq,
    rnr_late_recv,
    rnr_exhausted,
    access_errors,
    recv_too_small,
    order_in_batches,
    flush_on_error,
    state_transitions,
    destroy_busy,
    two_devices,
    gsi_two_devices,
    no_completion_after_destroy,
    bidirectional_stress,
    device_reset,
);

/// Forwards to the suite's sink and counts the calls.
struct Counting {
    inner: Arc<dyn CompletionSink>,
    calls: Arc<AtomicUsize>,
}

impl CompletionSink for Counting {
    fn complete(&self, wcs: &[WorkCompletion]) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.complete(wcs);
    }
    fn event(&self, ev: AsyncEvent) {
        self.inner.event(ev);
    }
    fn progress_needed(&self) {
        self.inner.progress_needed();
    }
}

/// A batch of WRs is one run of the send queue, and the run hands each queue's completions to
/// the sink together ([`HOLD_MAX`] at a time), not one call per WR; the order is checked by
/// `order_in_batches`.
#[test]
fn a_run_hands_over_each_queues_completions_together() {
    let fabric = Fabric::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let f = move |mem: GuestMem, sink: Arc<dyn CompletionSink>| -> Arc<dyn Backend> {
        let calls = c.clone();
        EmulatedBackend::new(&fabric, mem, Arc::new(Counting { inner: sink, calls }))
    };
    let d = Dev::new(&f, 1);
    let (qa, qb, _, _) = rc_pair(&d, &d, RcOpts::default());
    let buf = d.buf(8192, Access::LOCAL_WRITE);
    for i in 0..64 {
        d.recv(qb, 100 + i, buf.sges(4096, 64, 1));
    }
    calls.store(0, Ordering::SeqCst);
    let wrs: Vec<SendWr> = (0..64).map(|i| wr(i, SEND, buf.sges(0, 8, 1))).collect();
    assert_eq!(d.be.post_send_batch(qa, &wrs).0, 64);
    let wcs = d.wait(128);
    assert!(wcs.iter().all(|w| w.status == WcStatus::Success));
    // 64 receives and 64 sends, HOLD_MAX per call.
    assert_eq!(calls.load(Ordering::SeqCst), 2 * 64 / HOLD_MAX);
    // A single WR: one call per queue, as before.
    d.recv(qb, 300, buf.sges(4096, 64, 1));
    calls.store(0, Ordering::SeqCst);
    d.send(qa, 301, SEND, buf.sges(0, 8, 1));
    assert_eq!(d.wait(2).len(), 2);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A SEND whose source memory faults (an MR page outside guest memory) fails at the requester
/// before any effect at the responder: the receive it would have used stays first in line, on
/// the QP's own receive queue and on an SRQ alike, and the next SEND (from another requester
/// aimed at the same QP) lands in it.
#[test]
fn a_faulting_sender_leaves_the_receive_in_place() {
    let f = emulated();
    let d = Dev::new(&f, 1);
    let buf = d.buf(8192, Access::LOCAL_WRITE);
    // One page, far beyond the 64 MiB of guest memory.
    let bad_pages: Arc<[GuestAddress]> = vec![GuestAddress(1 << 40)].into();
    let bad =
        d.be.create_mr(
            d.pd,
            MrKind::User {
                iova: 0x5000,
                length: 64,
                pages: bad_pages,
            },
            Access::LOCAL_WRITE,
        )
        .unwrap();
    let bad_sge: SgeList = [Sge {
        addr: 0x5000,
        length: 8,
        lkey: bad.lkey,
    }]
    .into_iter()
    .collect();
    let srq = d.be.create_srq(d.pd, 16, 1, 0, 0x2000).unwrap();
    for on_srq in [false, true] {
        let (qb, nb) = d.qp(QpType::Rc, on_srq.then_some(srq));
        let (qa, na) = d.qp(QpType::Rc, None);
        d.connect(qa, d.gid, nb, RcOpts::default());
        d.connect(qb, d.gid, na, RcOpts::default());
        for id in [1, 2] {
            let wr = RecvWr {
                wr_id: id,
                sges: buf.sges(4096, 64, 1),
            };
            if on_srq {
                d.be.post_srq_recv(srq, &wr).unwrap();
            } else {
                d.be.post_recv(qb, &wr).unwrap();
            }
        }
        d.send(qa, 10, SEND, bad_sge);
        let w = d.wait(1);
        assert_eq!((w[0].wr_id, w[0].status), (10, WcStatus::LocProtErr));
        // The requester is in ERR now: reset it and connect it again to the same responder.
        let reset = QpAttrs {
            state: Some(QpState::Reset),
            ..Default::default()
        };
        d.be.modify_qp(qa, &reset).unwrap();
        d.connect(qa, d.gid, nb, RcOpts::default());
        d.send(qa, 11, SEND, buf.sges(0, 8, 1));
        let mut w = d.wait(2);
        w.sort_by_key(|w| w.wr_id);
        let got: Vec<(u64, WcStatus)> = w.iter().map(|w| (w.wr_id, w.status)).collect();
        assert_eq!(
            got,
            [(1, WcStatus::Success), (11, WcStatus::Success)],
            "SRQ: {on_srq}"
        );
        // The second receive is still there for the next one.
        d.send(qa, 12, SEND, buf.sges(0, 8, 1));
        let mut w = d.wait(2);
        w.sort_by_key(|w| w.wr_id);
        assert_eq!((w[0].wr_id, w[1].wr_id), (2, 12), "SRQ: {on_srq}");
    }
}

/// A sender that waits without end for a receive (RNR with `rnr_retry` 7) is retried at once by
/// a posted receive; its timer is only a backstop, and this is what it is for: the responder
/// goes away instead, the backstop retry finds no responder, and the transport retries
/// (`retry_cnt` 7, `timeout` 10: ~4 ms each) run out with `RetryExcErr`.
#[test]
fn an_endless_rnr_wait_ends_when_the_responder_goes() {
    let f = emulated();
    let d = Dev::new(&f, 1);
    let (qa, qb, _, _) = rc_pair(&d, &d, RcOpts::default());
    let buf = d.buf(4096, Access::LOCAL_WRITE);
    d.send(qa, 1, SEND, buf.sges(0, 8, 1));
    d.quiet(std::time::Duration::from_millis(20));
    d.be.destroy_qp(qb).unwrap();
    let wcs = d.wait(1);
    assert_eq!((wcs[0].wr_id, wcs[0].status), (1, WcStatus::RetryExcErr));
}

/// An RC responder serves only the requester it is connected to, whatever that requester's
/// guest wrote: a third QP (on another backend of the fabric, as another VM would be) that
/// names the responder's GID and QPN, with a valid rkey, reaches nothing. Its requests are
/// dropped as a real HCA drops them, so it sees a missing responder (`RetryExcErr`), and the
/// responder's receive and memory are untouched.
#[test]
fn a_responder_serves_only_its_connected_requester() {
    let f = emulated();
    let (a, b, c) = (Dev::new(&f, 1), Dev::new(&f, 2), Dev::new(&f, 3));
    let (qa, qb, _, nb) = rc_pair(&a, &b, RcOpts::default());
    let (qc, _) = c.qp(QpType::Rc, None);
    c.connect(qc, b.gid, nb, RcOpts::default());
    let target = b.buf(4096, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
    b.be.post_recv(
        qb,
        &RecvWr {
            wr_id: 1,
            sges: target.sges(0, 64, 1),
        },
    )
    .unwrap();
    let src = c.buf(4096, Access::LOCAL_WRITE);
    src.write(&c.mem, 0, &[0x5a; 64]);
    let write = SendOp::RdmaWrite {
        remote_addr: target.iova,
        rkey: target.keys.rkey,
        imm: None,
    };
    c.send(qc, 20, write, src.sges(0, 64, 1));
    c.send(qc, 21, SEND, src.sges(0, 8, 1));
    let w = c.wait(2);
    assert!(
        w.iter().any(|w| w.status == WcStatus::RetryExcErr),
        "the intruder sees no responder: {w:?}"
    );
    assert!(
        target.read(&b.mem, 0, 64).iter().all(|&x| x == 0),
        "nothing written"
    );
    // The connected requester still gets the receive.
    let sbuf = a.buf(4096, Access::LOCAL_WRITE);
    a.send(qa, 30, SEND, sbuf.sges(0, 8, 1));
    let w = b.wait(1);
    assert_eq!((w[0].wr_id, w[0].status), (1, WcStatus::Success));
    assert_eq!(a.wait(1)[0].status, WcStatus::Success);
}

/// An MR's keys are not predictable from another MR's (ReDMArk): beyond the slot, each key has
/// 11 random bits, drawn anew at every registration; a slot registered again gets a key its
/// old holders cannot use.
#[test]
fn keys_carry_random_bits_and_stale_keys_miss() {
    let f = emulated();
    let d = Dev::new(&f, 1);
    let keys: Vec<u32> = (0..64)
        .map(|_| {
            d.buf(4096, Access::LOCAL_WRITE | Access::REMOTE_WRITE)
                .keys
                .rkey
        })
        .collect();
    let random = |k: u32| k & 0x7000_00ff;
    let distinct: std::collections::HashSet<u32> = keys.iter().map(|&k| random(k)).collect();
    assert!(distinct.len() > 48, "random bits repeat: {keys:x?}");
    let steps: std::collections::HashSet<u32> =
        keys.windows(2).map(|w| w[1].wrapping_sub(w[0])).collect();
    assert!(steps.len() > 48, "keys follow a pattern: {keys:x?}");
    // A slot freed and registered again: the old key finds nothing.
    let b = d.buf(4096, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
    let old = b.keys;
    d.be.destroy_mr(old.id).unwrap();
    let again = d.buf(4096, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
    assert_eq!(again.keys.id, old.id, "the slot is reused");
    assert_ne!(again.keys.rkey, old.rkey);
    let (qa, qb, _, _) = rc_pair(&d, &d, RcOpts::default());
    let _ = qb;
    let src = d.buf(64, Access::LOCAL_WRITE);
    let write = SendOp::RdmaWrite {
        remote_addr: again.iova,
        rkey: old.rkey,
        imm: None,
    };
    d.send(qa, 1, write, src.sges(0, 8, 1));
    assert_eq!(d.wait(1)[0].status, WcStatus::RemAccessErr);
}

/// Forwards completions and events to the suite's sink, but runs the backend's deferred work
/// only when the test calls [`Backend::progress`]; counts the requests for it.
struct Manual {
    inner: Arc<dyn CompletionSink>,
    asked: Arc<AtomicUsize>,
}

impl CompletionSink for Manual {
    fn complete(&self, wcs: &[WorkCompletion]) {
        self.inner.complete(wcs);
    }
    fn event(&self, ev: AsyncEvent) {
        self.inner.event(ev);
    }
    fn progress_needed(&self) {
        self.asked.fetch_add(1, Ordering::SeqCst);
    }
}

/// Emulated backends whose deferred work runs only in the test's own calls of `progress`,
/// and the count of requests for such calls.
fn manual() -> (Box<Factory<'static>>, Arc<AtomicUsize>) {
    let fabric = Fabric::new();
    let asked = Arc::new(AtomicUsize::new(0));
    let a = asked.clone();
    let f = move |mem: GuestMem, inner: Arc<dyn CompletionSink>| -> Arc<dyn Backend> {
        let asked = a.clone();
        EmulatedBackend::new(&fabric, mem, Arc::new(Manual { inner, asked }))
    };
    (Box::new(f), asked)
}

const MIB: u64 = 1 << 20;

/// An MR of `len` bytes whose every page is guest page `page`, filled with a pattern: what a
/// guest registers to make a large transfer out of 4 KiB of RAM.
fn aliased(d: &Dev, page: u64, len: u64, access: Access) -> (rdma_backend::MrKeys, u64) {
    let fill: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    use vm_memory::{Bytes, GuestAddressSpace};
    d.mem
        .memory()
        .write_slice(&fill, GuestAddress(page))
        .unwrap();
    let iova = 0x40_0000_0000;
    let pages: Arc<[GuestAddress]> = vec![GuestAddress(page); (len / 4096) as usize].into();
    let keys =
        d.be.create_mr(
            d.pd,
            MrKind::User {
                iova,
                length: len,
                pages,
            },
            access,
        )
        .unwrap();
    (keys, iova)
}

/// The SGE list of `len` bytes at `iova` of `keys`.
fn sges(keys: &rdma_backend::MrKeys, iova: u64, len: u64) -> SgeList {
    [Sge {
        addr: iova,
        length: len as u32,
        lkey: keys.lkey,
    }]
    .into_iter()
    .collect()
}

/// A loopback RC pair of `d` and, posted on its first QP, a 16 MiB WRITE (wr_id 1) out of an
/// aliased page into a fresh MR: the QP, the destination, and the source (keys, iova).
fn post_long_write(
    d: &Dev,
) -> (
    rdma_backend::QpId,
    conformance::Buf,
    (rdma_backend::MrKeys, u64),
) {
    let (qa, _qb, _, _) = rc_pair(d, d, RcOpts::default());
    let len = 16 * MIB;
    let (src, siova) = aliased(d, 0x1000, len, Access::LOCAL_WRITE);
    let dst = d.buf(len, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
    let write = SendOp::RdmaWrite {
        remote_addr: dst.iova,
        rkey: dst.keys.rkey,
        imm: None,
    };
    d.send(qa, 1, write, sges(&src, siova, len));
    (qa, dst, (src, siova))
}

/// Runs the backend's deferred work until it has none left; returns how many calls it took.
fn progress_all(d: &Dev) -> usize {
    let mut calls = 1;
    while d.be.progress() {
        calls += 1;
        assert!(calls < 10_000, "progress never ends");
    }
    calls
}

/// A transfer longer than one run's budget moves a budget's worth in the post that starts
/// it; the rest goes on in calls of `progress` (on the device's workers), each bounded, and
/// the bytes arrive whole and in place.
#[test]
fn a_long_transfer_moves_in_bounded_runs() {
    let (f, asked) = manual();
    let d = Dev::new(&f, 1);
    asked.store(0, Ordering::SeqCst);
    let (qa, dst, (src, siova)) = post_long_write(&d);
    let len = dst.len;
    assert!(d.sink.is_empty(), "a 16 MiB WRITE finished in one run");
    assert_eq!(asked.load(Ordering::SeqCst), 1, "the rest was handed on");
    let moved = dst.read(&d.mem, 0, len);
    let first_zero = moved.chunks(4096).position(|c| c.iter().all(|&b| b == 0));
    let first_zero = first_zero.expect("something is left") as u64 * 4096;
    assert!(
        (MIB..len / 2).contains(&first_zero),
        "the first run moved {first_zero} bytes"
    );
    // A WR posted meanwhile only queues: the post runs nothing while the queue waits for
    // `progress`, however many WRs are posted.
    let small = d.buf(4096, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
    let write2 = SendOp::RdmaWrite {
        remote_addr: small.iova,
        rkey: small.keys.rkey,
        imm: None,
    };
    d.send(qa, 2, write2, sges(&src, siova, 64));
    assert!(small.read(&d.mem, 0, 64).iter().all(|&b| b == 0));
    progress_all(&d);
    let w = d.wait(2);
    assert_eq!(
        (w[0].wr_id, w[0].status, w[0].byte_len),
        (1, WcStatus::Success, len as u32)
    );
    assert_eq!((w[1].wr_id, w[1].status), (2, WcStatus::Success));
    // Byte k of the source is byte k % 4096 of its one page.
    let page: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let moved = dst.read(&d.mem, 0, len);
    let bad = moved
        .iter()
        .enumerate()
        .position(|(k, &b)| b != page[k % 4096]);
    assert_eq!(bad, None, "the first wrong byte");
    // Each call of `progress` is bounded too: 1 GiB (one page both sides) takes many.
    let gib = 1 << 30;
    let (big_dst, diova) = aliased(&d, 0x3000, gib, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
    let (big_src, siova2) = aliased(&d, 0x1000, gib, Access::LOCAL_WRITE);
    let write = SendOp::RdmaWrite {
        remote_addr: diova,
        rkey: big_dst.rkey,
        imm: None,
    };
    d.send(qa, 3, write, sges(&big_src, siova2, gib));
    let calls = progress_all(&d);
    assert!(calls >= 16, "1 GiB took {calls} calls of progress");
    let w = d.wait(1);
    assert_eq!((w[0].wr_id, w[0].status), (3, WcStatus::Success));
}

/// A retry timer only wakes its QP: the retry runs in the device's `progress` call, never on
/// the fabric's timer thread (whose delay would be every other device's).
#[test]
fn a_timer_retry_runs_in_progress_not_on_the_timer_thread() {
    let (f, asked) = manual();
    let d = Dev::new(&f, 1);
    let o = RcOpts {
        rnr_retry: 1,
        ..RcOpts::default()
    };
    let (qa, _qb, _, _) = rc_pair(&d, &d, o);
    let buf = d.buf(4096, Access::LOCAL_WRITE);
    asked.store(0, Ordering::SeqCst);
    // No receive: RNR, one retry after 10 µs from the timer.
    d.send(qa, 1, SEND, buf.sges(0, 8, 1));
    let deadline = std::time::Instant::now() + conformance::WAIT;
    while asked.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the timer never woke the QP"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // Woken, not run: nothing completes until the device's worker calls `progress`.
    d.quiet(std::time::Duration::from_millis(20));
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    progress_all(&d);
    let w = d.wait(1);
    assert_eq!((w[0].wr_id, w[0].status), (1, WcStatus::RnrRetryExcErr));
}

/// A QP destroyed, or reset, part-way through a long transfer stops at the next step: nothing
/// more is written and nothing completes.
#[test]
fn a_transfer_stops_at_the_next_step_when_its_qp_goes() {
    for destroy in [true, false] {
        let (f, _) = manual();
        let d = Dev::new(&f, 1);
        let (qa, dst, _) = post_long_write(&d);
        let len = dst.len;
        let before = dst.read(&d.mem, 0, len);
        assert!(before.iter().any(|&b| b != 0) && before.contains(&0));
        if destroy {
            d.be.destroy_qp(qa).unwrap();
        } else {
            let reset = QpAttrs {
                state: Some(QpState::Reset),
                ..Default::default()
            };
            d.be.modify_qp(qa, &reset).unwrap();
        }
        progress_all(&d);
        assert!(
            dst.read(&d.mem, 0, len) == before,
            "destroy {destroy}: written on"
        );
        d.quiet(std::time::Duration::from_millis(20));
    }
}

/// A SEND part-way through holds its receive. If the responder stops receiving (here: ERR),
/// the SEND is retried from its start and a receive it took from an SRQ goes back first in
/// line, where the next message finds it; one on the responder's own queue is flushed with it.
#[test]
fn a_send_part_way_through_gives_its_srq_receive_back() {
    let (f, _) = manual();
    let d = Dev::new(&f, 1);
    let srq = d.be.create_srq(d.pd, 16, 1, 0, 0x2000).unwrap();
    let (qb, nb) = d.qp(QpType::Rc, Some(srq));
    let (qa, na) = d.qp(QpType::Rc, None);
    d.connect(qa, d.gid, nb, RcOpts::default());
    d.connect(qb, d.gid, na, RcOpts::default());
    let len = 8 * MIB;
    let (src, siova) = aliased(&d, 0x1000, len, Access::LOCAL_WRITE);
    let sink = d.buf(len, Access::LOCAL_WRITE);
    for id in [7, 8] {
        let wr = RecvWr {
            wr_id: id,
            sges: sink.sges(0, len, 1),
        };
        d.be.post_srq_recv(srq, &wr).unwrap();
    }
    d.send(qa, 1, SEND, sges(&src, siova, len));
    assert!(d.sink.is_empty(), "an 8 MiB SEND finished in one run");
    let err = QpAttrs {
        state: Some(QpState::Err),
        ..Default::default()
    };
    d.be.modify_qp(qb, &err).unwrap();
    // The requester's next step finds no responder: transport retries (~4 ms each), then
    // RetryExcErr.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while d.sink.is_empty() && std::time::Instant::now() < deadline {
        progress_all(&d);
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let w = d.wait(1);
    assert_eq!((w[0].wr_id, w[0].status), (1, WcStatus::RetryExcErr));
    // Another QP on the SRQ gets receive 7 for the next message.
    let (qd, nd) = d.qp(QpType::Rc, Some(srq));
    let (qc, nc) = d.qp(QpType::Rc, None);
    d.connect(qc, d.gid, nd, RcOpts::default());
    d.connect(qd, d.gid, nc, RcOpts::default());
    d.send(qc, 2, SEND, sges(&src, siova, 64));
    let mut w = d.wait(2);
    w.sort_by_key(|w| w.wr_id);
    let got: Vec<(u64, WcStatus)> = w.iter().map(|w| (w.wr_id, w.status)).collect();
    assert_eq!(got, [(2, WcStatus::Success), (7, WcStatus::Success)]);
}

/// A SEND part-way through whose receive vanishes (the responder is reset and connected
/// again) starts over in a new receive, which gets the whole message.
#[test]
fn a_send_part_way_through_starts_over_when_its_receive_vanishes() {
    let (f, _) = manual();
    let d = Dev::new(&f, 1);
    let (qa, qb, na, _) = rc_pair(&d, &d, RcOpts::default());
    let len = 8 * MIB;
    let (src, siova) = aliased(&d, 0x1000, len, Access::LOCAL_WRITE);
    let sink = d.buf(len, Access::LOCAL_WRITE);
    d.recv(qb, 7, sink.sges(0, len, 1));
    d.send(qa, 1, SEND, sges(&src, siova, len));
    assert!(d.sink.is_empty(), "an 8 MiB SEND finished in one run");
    let reset = QpAttrs {
        state: Some(QpState::Reset),
        ..Default::default()
    };
    d.be.modify_qp(qb, &reset).unwrap();
    d.connect(qb, d.gid, na, RcOpts::default());
    d.recv(qb, 8, sink.sges(0, len, 1));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while d.sink.len() < 2 && std::time::Instant::now() < deadline {
        progress_all(&d);
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let mut w = d.wait(2);
    w.sort_by_key(|w| w.wr_id);
    let got: Vec<(u64, WcStatus, u32)> =
        w.iter().map(|w| (w.wr_id, w.status, w.byte_len)).collect();
    assert_eq!(
        got,
        [
            (1, WcStatus::Success, len as u32),
            (8, WcStatus::Success, len as u32)
        ]
    );
}
