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
    rc_ping_pong,
    rc_opcodes,
    rc_16mib,
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
