//! Queue pairs, SRQs and the data path.
//!
//! # Locking
//! Each QP has two locks: `sq` (send side: pending WRs, path attributes, retry state) and `rq`
//! (receive side: posted receives, RNR waiters, qkey). The only nesting is
//! `sender.sq → responder.rq → srq.q`, never the other way, so two QPs sending to each other
//! cannot deadlock, and a QP sending to itself takes its own `sq` then its own `rq`. Completions
//! are handed to the sink while the lock of the queue they belong to is held: that keeps the
//! completions of one queue in order and makes `destroy_qp` (which takes both locks and marks
//! the QP dead) a barrier after which nothing of that QP is delivered. The sink must therefore
//! never call back into the backend.
//!
//! A run of a send queue ([`drive`]) does not hand over each completion as it is made: the
//! successful ones wait in the [`Held`] list of their queue (the requester's `sq`, the
//! responder's `rq`) and go to the sink together at the end of the run, or every [`HOLD_MAX`].
//! Whoever delivers any other completion of that queue (an error, a flush), resets it or
//! destroys it, holds the same lock and delivers the held ones first, so the order stays that of
//! the queue. Under load this is one sink call per run and queue instead of one per message.
//!
//! Object tables (`qps`, `mrs`) are `RwLock`s held only for a lookup, never across a copy.
//!
//! # Bounded work
//! A run of a send queue moves at most [`RUN_BUDGET`] (bytes, plus [`WR_COST`] per WR), and one
//! message at most [`SLICE`] bytes per step under the responder's lock; a longer message keeps
//! its progress in the queue ([`Partial`]) and goes on in the next run. A run out of budget asks
//! its backend to resume the queue later ([`EmulatedBackend::wake`]), which the device does on
//! one of its own workers ([`crate::Backend::progress`]). So a destroy, reset or state change
//! waits for a send queue's lock about a millisecond at most, and a QP that dies stops at the
//! next step. Runs happen only on the threads of the QP's own device: the fabric's timer and a
//! receive posted by another device only wake the queue, they never run it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use smallvec::SmallVec;
use vm_memory::{atomic::GuestMemoryLoadGuard, GuestAddressSpace, GuestMemoryMmap};

use super::mem::{atomic_at, atomic_target, copy, write_bytes, Fault, Segs, Window};
use super::{lock, EmulatedBackend};
use crate::{
    Access, AddressVector, AsyncEvent, CompletionSink, CqId, Gid, GidType, NetworkHeader, PdId,
    QpState, QpType, RecvWr, SendOp, SendWr, Sge, SrqId, UdDest, WcOpcode, WcStatus,
    WorkCompletion,
};

/// Token of a timer entry that only flushes a QP that went to ERR as a responder.
pub(crate) const FLUSH_TOKEN: u64 = 0;

/// Largest transport-retry delay the emulation waits (IB `timeout` 0 means "infinite").
const MAX_TIMEOUT_DELAY: Duration = Duration::from_millis(100);

/// RNR NAK timer, IB encoding (o9-?? table 45) → microseconds.
const RNR_US: [u32; 32] = [
    655_360, 10, 20, 30, 40, 60, 80, 120, 160, 240, 320, 480, 640, 960, 1280, 1920, 2560, 3840,
    5120, 7680, 10_240, 15_360, 20_480, 30_720, 40_960, 61_440, 81_920, 122_880, 163_840, 245_760,
    327_680, 491_520,
];

/// What a run of a send queue may move before it yields its thread: about a millisecond of
/// copying.
pub(crate) const RUN_BUDGET: u64 = 4 << 20;
/// What one call of [`crate::Backend::progress`] may spend, in runs of at most [`RUN_BUDGET`]
/// each (locks and guest-memory snapshots are let go between runs): enough that handing a
/// long transfer back to the device's pool is rare next to the copying, little enough that
/// the device's other work waits a few milliseconds at most.
pub(crate) const PROGRESS_BUDGET: u64 = 32 << 20;
/// Most bytes of one message moved in one step (under one lock of the responder's queue).
pub(crate) const SLICE: u64 = 1 << 20;
/// What a WR costs a run besides its bytes: a queue of 64-byte messages yields too.
pub(crate) const WR_COST: u64 = 256;

/// Why a queue is woken ([`EmulatedBackend::wake`]); bits of [`Qp::wakes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// Go on where a run stopped (out of budget, or newly able to send).
    Resume,
    /// A receive was posted where the head WR waits (RNR).
    Kick,
    /// The retry timer with this token fired.
    Timer(u64),
}

impl Wake {
    pub(crate) fn bit(self) -> u8 {
        match self {
            Wake::Resume => 1,
            Wake::Kick => 2,
            Wake::Timer(_) => 4,
        }
    }
}

/// Most completions a queue holds back before it hands them to the sink anyway: the batch the
/// device posts at a time, and at most 16 × 48 bytes kept per queue that ever held any.
pub const HOLD_MAX: usize = 16;

/// Completions of one queue made by a run of a send queue and not yet handed to the sink (see
/// the module's locking notes). Kept in the queue's locked state; empty outside a run.
#[derive(Debug, Default)]
pub(crate) struct Held(Vec<WorkCompletion>);

impl Held {
    /// Holds a successful completion, handing the lot over once [`HOLD_MAX`] are held.
    fn hold(&mut self, sink: &dyn CompletionSink, wc: WorkCompletion) {
        if self.0.capacity() == 0 {
            self.0.reserve_exact(HOLD_MAX);
        }
        self.0.push(wc);
        if self.0.len() >= HOLD_MAX {
            self.deliver(sink);
        }
    }

    /// Hands everything held to the sink.
    pub(crate) fn deliver(&mut self, sink: &dyn CompletionSink) {
        if !self.0.is_empty() {
            sink.complete(&self.0);
            self.0.clear();
        }
    }

    /// Hands everything held to the sink, then `wcs`: how every completion of the queue that
    /// is not held reaches the sink.
    pub(crate) fn deliver_then(&mut self, sink: &dyn CompletionSink, wcs: &[WorkCompletion]) {
        self.deliver(sink);
        sink.complete(wcs);
    }
}

/// The SGE list of a queued WR. A guest's WQEs nearly always carry one or two SGEs, so two are
/// kept inline and a longer list (at most [`crate::MAX_SGE`], the bound of an `SgeList`) goes
/// to the heap: a queued receive of one SGE takes 48 bytes, not the 272 of a [`RecvWr`]
/// with its 16 inline slots, and posted receives nobody consumes are most of what a guest can
/// make the backend hold.
pub(crate) type QueuedSges = SmallVec<[Sge; INLINE_SGES]>;

/// SGEs a queued WR keeps inline.
pub(crate) const INLINE_SGES: usize = 2;

/// A send WR as a send queue keeps it: a [`SendWr`] with a compact SGE list.
#[derive(Debug)]
pub(crate) struct QueuedSend {
    pub wr_id: u64,
    pub op: SendOp,
    pub sges: QueuedSges,
    pub signaled: bool,
    pub solicited: bool,
    pub ud: Option<UdDest>,
}

impl From<&SendWr> for QueuedSend {
    #[inline]
    fn from(wr: &SendWr) -> Self {
        QueuedSend {
            wr_id: wr.wr_id,
            op: wr.op.clone(),
            sges: QueuedSges::from_slice(wr.sges.as_slice()),
            signaled: wr.signaled,
            solicited: wr.solicited,
            ud: wr.ud,
        }
    }
}

/// A receive WR as a receive queue or SRQ keeps it: a [`RecvWr`] with a compact SGE list.
#[derive(Debug)]
pub(crate) struct QueuedRecv {
    pub wr_id: u64,
    pub sges: QueuedSges,
}

impl From<&RecvWr> for QueuedRecv {
    fn from(wr: &RecvWr) -> Self {
        QueuedRecv {
            wr_id: wr.wr_id,
            sges: QueuedSges::from_slice(wr.sges.as_slice()),
        }
    }
}

/// The head WR of a send queue part-way through: a message longer than a [`SLICE`], or one a
/// run ran out of budget in.
#[derive(Debug)]
pub(crate) struct Partial {
    /// Bytes moved so far.
    done: u64,
    /// The receive the message lands in (SEND, WRITE with immediate).
    recv: Reserved,
}

/// The receive a message part-way through has taken at the responder.
#[derive(Debug)]
enum Reserved {
    /// None (RDMA WRITE, READ).
    None,
    /// The head of the responder's own receive queue, as long as its [`Rq::taken`] is this.
    Own(u64),
    /// Taken from the responder's SRQ (put back first in line if the message is abandoned).
    /// Boxed: a send queue moves its [`Partial`] for every WR, and this is the rare case.
    Srq(Box<(Arc<Srq>, QueuedRecv)>),
}

/// The send-side state of a QP.
#[derive(Debug)]
pub(crate) struct Sq {
    /// WRs posted and not yet completed, in order.
    pub pending: VecDeque<QueuedSend>,
    /// The head WR's progress, when it is part-way through.
    pub partial: Option<Partial>,
    /// Completions of the current run not yet delivered.
    pub held: Held,
    /// The head WR is waiting for a retry.
    pub stall: Option<Stall>,
    /// Identifies the current timer entry; bumped to make older ones stale.
    pub token: u64,
    pub path_mtu: u8,
    pub dest_qpn: u32,
    pub ah: Option<AddressVector>,
    pub rnr_retry: u8,
    pub retry_cnt: u8,
    pub timeout: u8,
    pub qkey: u32,
    /// Cached RC responder.
    pub remote: Weak<Qp>,
    /// Times the head WR waited for a receive at the responder (RNR), and was tried again
    /// after a wait of either kind (monitoring: [`crate::Backend::qp_retries`]).
    pub rnr_waits: u64,
    pub retries: u64,
}

impl Sq {
    /// An empty send queue (timer token 1: 0 never names a timer entry).
    fn new() -> Sq {
        Sq {
            pending: VecDeque::new(),
            partial: None,
            held: Held::default(),
            stall: None,
            token: 1,
            path_mtu: 0,
            dest_qpn: 0,
            ah: None,
            rnr_retry: 0,
            retry_cnt: 0,
            timeout: 0,
            qkey: 0,
            remote: Weak::new(),
            rnr_waits: 0,
            retries: 0,
        }
    }

    /// Forgets the head WR's progress (it starts over if it runs again); a receive it took
    /// from an SRQ goes back first in line.
    pub(crate) fn abandon(&mut self) {
        if let Some(Partial {
            recv: Reserved::Srq(held),
            ..
        }) = self.partial.take()
        {
            let (srq, w) = *held;
            lock(&srq.q).wqes.push_front(w);
        }
    }
}

/// Why the head WR waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StallKind {
    /// The responder had no receive posted.
    Rnr,
    /// The responder is unreachable or not ready (the packet was dropped).
    Timeout,
}

/// Retry state of the head WR.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stall {
    kind: StallKind,
    /// Retries left (`None`: infinite).
    left: Option<u8>,
}

/// The receive-side state of a QP.
#[derive(Debug, Default)]
pub(crate) struct Rq {
    pub wqes: VecDeque<QueuedRecv>,
    /// Receives ever removed from `wqes` (used or dropped): while it is unchanged, the head is
    /// the receive a message part-way through has reserved.
    pub taken: u64,
    /// Completions made by a sender's run not yet delivered.
    pub held: Held,
    /// Senders waiting (RNR) for a receive here.
    pub waiters: Vec<Weak<Qp>>,
    pub qkey: u32,
    pub min_rnr_timer: u8,
}

/// A shared receive queue.
#[derive(Debug)]
pub(crate) struct Srq {
    pub id: SrqId,
    pub pd: PdId,
    pub cookie: u64,
    pub max_wr: u32,
    pub max_sge: u32,
    pub q: Mutex<SrqQ>,
}

/// The queue of an SRQ.
#[derive(Debug)]
pub(crate) struct SrqQ {
    pub wqes: VecDeque<QueuedRecv>,
    pub limit: u32,
    pub waiters: Vec<Weak<Qp>>,
}

/// A queue pair.
#[derive(Debug)]
pub(crate) struct Qp {
    pub qpn: u32,
    pub ty: QpType,
    pub pd: PdId,
    pub send_cq: CqId,
    pub recv_cq: CqId,
    pub srq: Option<Arc<Srq>>,
    pub sig_all: bool,
    pub cookie: u64,
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub backend: Weak<EmulatedBackend>,
    pub state: AtomicU8,
    /// Remote access rights (bits of [`Access`]).
    pub access: AtomicU32,
    /// Set (under both locks) by destroy: nothing of the QP is delivered afterwards.
    pub dead: AtomicBool,
    /// Why the QP waits in its backend's ready list (bits of [`Wake`]; 0: it is not there).
    pub wakes: AtomicU8,
    /// The newest timer token it was woken with.
    pub wake_token: AtomicU64,
    /// The one requester an RC QP serves as responder (set with the QP's own destination; a
    /// leaf lock, taken by requesters of other QPs while they hold their own `sq`).
    pub connected: Mutex<Connected>,
    pub sq: Mutex<Sq>,
    pub rq: Mutex<Rq>,
}

/// The peer an RC QP is connected to: its QPN and, with an address vector, its GID.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Connected {
    pub qpn: u32,
    pub gid: Option<Gid>,
}

impl Qp {
    /// Whether QP `qpn` of backend `from` is the requester this QP is connected to. The fabric
    /// knows which backend sent a request, so a guest cannot pose as another VM's QP: the GID
    /// this QP was connected to must belong to `from` (without an address vector, the peer is
    /// on this QP's own backend).
    pub(crate) fn serves(&self, from: &EmulatedBackend, qpn: u32) -> bool {
        let c = *lock(&self.connected);
        if c.qpn != qpn {
            return false;
        }
        match c.gid {
            Some(g) => from.fabric.lookup(&g).is_some_and(|b| b.id == from.id),
            None => self.backend.upgrade().is_some_and(|b| b.id == from.id),
        }
    }
}

impl Qp {
    /// A new QP in RESET, QPN `qpn`, of backend `backend`, on `srq` if it has one.
    pub(crate) fn new(
        backend: Weak<EmulatedBackend>,
        qpn: u32,
        init: &crate::QpInit,
        srq: Option<Arc<Srq>>,
    ) -> Qp {
        Qp {
            qpn,
            ty: init.qp_type,
            pd: init.pd,
            send_cq: init.send_cq,
            recv_cq: init.recv_cq,
            srq,
            sig_all: init.sq_sig_all,
            cookie: init.cookie,
            max_send_wr: init.max_send_wr,
            max_recv_wr: init.max_recv_wr,
            max_send_sge: init.max_send_sge,
            // With an SRQ the receives are the SRQ's, whose own SGE limit was checked when they
            // were posted; the QP's receive limits (0 from the provider) do not apply.
            max_recv_sge: if init.srq.is_some() {
                crate::MAX_SGE as u32
            } else {
                init.max_recv_sge
            },
            backend,
            state: AtomicU8::new(QpState::Reset as u8),
            access: AtomicU32::new(0),
            dead: AtomicBool::new(false),
            wakes: AtomicU8::new(0),
            wake_token: AtomicU64::new(0),
            connected: Mutex::new(Connected::default()),
            sq: Mutex::new(Sq::new()),
            rq: Mutex::new(Rq::default()),
        }
    }
}

pub(crate) fn state_from(v: u8) -> QpState {
    QpState::from_u32(u32::from(v)).unwrap_or(QpState::Err)
}

impl Qp {
    pub fn state(&self) -> QpState {
        state_from(self.state.load(Ordering::Acquire))
    }
    pub fn set_state(&self, s: QpState) {
        self.state.store(s as u8, Ordering::Release);
    }
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }
    fn can_receive(&self) -> bool {
        matches!(
            self.state(),
            QpState::Rtr | QpState::Rts | QpState::Sqd | QpState::Sqe
        )
    }
    fn remote_access(&self) -> Access {
        Access::from_bits_retain(self.access.load(Ordering::Acquire))
    }
    pub(crate) fn wc(
        &self,
        cq: CqId,
        wr_id: u64,
        status: WcStatus,
        opcode: WcOpcode,
        len: u64,
    ) -> WorkCompletion {
        WorkCompletion {
            cq,
            qp_cookie: self.cookie,
            wr_id,
            status,
            opcode,
            byte_len: u32::try_from(len).unwrap_or(u32::MAX),
            imm_data: None,
            invalidated: None,
            src_qp: 0,
            grh: None,
            solicited: false,
        }
    }
}

/// The completion opcode of a send WR.
pub(crate) fn send_opcode(op: &SendOp) -> WcOpcode {
    match op {
        SendOp::Send { .. } | SendOp::SendInv { .. } => WcOpcode::Send,
        SendOp::LocalInv { .. } => WcOpcode::LocalInv,
        SendOp::FastReg(_) => WcOpcode::FastRegMr,
        SendOp::RdmaWrite { .. } => WcOpcode::RdmaWrite,
        SendOp::RdmaRead { .. } => WcOpcode::RdmaRead,
        SendOp::CmpSwap { .. } => WcOpcode::CompSwap,
        SendOp::FetchAdd { .. } => WcOpcode::FetchAdd,
    }
}

/// Path MTU in bytes from the IB encoding (default 1024).
fn mtu_bytes(enc: u8) -> u64 {
    match enc {
        1..=5 => 128u64 << enc,
        _ => 1024,
    }
}

/// What triggered a run of the send queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// A post or a state change.
    Post,
    /// A receive was posted where the head WR waits (RNR).
    Kick,
    /// The retry timer fired with this token.
    Timer(u64),
}

/// The result of executing one send WR.
enum Outcome {
    /// Completed; the completion is delivered if signaled.
    Done(u64),
    /// Moved this many more bytes of the WR, which goes on in the next step (its progress is
    /// in the queue's [`Partial`]).
    Partial(u64),
    /// Completed with an error: the QP leaves RTS.
    Error(WcStatus),
    /// Must be retried later.
    Stall(StallKind, Duration),
}

/// How far one step of an RC operation got.
enum Step {
    /// The operation is complete: its length.
    Done(u64),
    /// This many more bytes moved; more to go.
    More(u64),
}

/// Where a message that uses a receive puts its bytes.
#[derive(Clone, Copy)]
enum Into {
    /// In the receive's buffers (SEND).
    Recv,
    /// In the receive's buffers, invalidating the responder's fast-register MR with this rkey
    /// (SEND with invalidate).
    RecvInv(u32),
    /// In the responder's MR (RDMA WRITE with immediate).
    Remote { addr: u64, rkey: u32 },
}

/// Errors of the responder side of an RC operation.
enum Resp {
    /// No receive posted (RNR NAK with this timer).
    Rnr(u8),
    /// Dropped: the responder is not there or not ready.
    Dropped,
    /// NAK: the requester completes with this status.
    Nak(WcStatus),
    /// The requester's own memory faulted.
    LocalFault,
}

/// Flushes the pending send WRs with `WrFlushErr` (sq locked), after the completions held.
fn flush_sq(be: &EmulatedBackend, qp: &Qp, sq: &mut Sq) {
    sq.held.deliver(&*be.sink);
    sq.abandon();
    if sq.pending.is_empty() {
        return;
    }
    let wcs: Vec<WorkCompletion> = sq
        .pending
        .drain(..)
        .map(|wr| {
            qp.wc(
                qp.send_cq,
                wr.wr_id,
                WcStatus::WrFlushErr,
                send_opcode(&wr.op),
                0,
            )
        })
        .collect();
    sq.stall = None;
    sq.token += 1;
    if !qp.is_dead() {
        be.sink.complete(&wcs);
    }
}

/// Flushes the posted receives with `WrFlushErr` (rq locked), after the completions held. A QP
/// on an SRQ gets the last-WQE-reached event instead.
fn flush_rq(be: &EmulatedBackend, qp: &Qp, rq: &mut Rq) {
    rq.held.deliver(&*be.sink);
    rq.taken += rq.wqes.len() as u64;
    if qp.is_dead() {
        rq.wqes.clear();
        return;
    }
    if qp.srq.is_some() {
        be.sink.event(AsyncEvent::QpLastWqeReached {
            qp_cookie: qp.cookie,
        });
        return;
    }
    if rq.wqes.is_empty() {
        return;
    }
    let wcs: Vec<WorkCompletion> = rq
        .wqes
        .drain(..)
        .map(|wr| {
            qp.wc(
                qp.recv_cq,
                wr.wr_id,
                WcStatus::WrFlushErr,
                WcOpcode::Recv,
                0,
            )
        })
        .collect();
    be.sink.complete(&wcs);
}

/// Moves a QP to ERR from its send side (sq locked): flushes both queues.
pub(crate) fn to_err_locked_sq(be: &EmulatedBackend, qp: &Qp, sq: &mut Sq) {
    qp.set_state(QpState::Err);
    flush_sq(be, qp, sq);
    let mut rq = lock(&qp.rq);
    flush_rq(be, qp, &mut rq);
}

/// Moves a responder QP to ERR (its rq locked): flushes its receives now and its send queue
/// on a worker, through the timer (its `sq` may not be taken here).
/// The responder refuses a request as invalid (IB's NAK Invalid Request): its QP goes to ERR
/// with a QP_REQ_ERR event, and the requester completes with `RemInvReqErr`.
fn invalid_request(be: &EmulatedBackend, qp: &Arc<Qp>) -> Resp {
    let mut rq = lock(&qp.rq);
    responder_err(
        be,
        qp,
        &mut rq,
        Some(AsyncEvent::QpReqErr {
            qp_cookie: qp.cookie,
        }),
    );
    Resp::Nak(WcStatus::RemInvReqErr)
}

fn responder_err(be: &EmulatedBackend, qp: &Arc<Qp>, rq: &mut Rq, ev: Option<AsyncEvent>) {
    if qp.state() == QpState::Err || qp.is_dead() {
        return;
    }
    qp.set_state(QpState::Err);
    if let Some(ev) = ev {
        be.sink.event(ev);
    }
    flush_rq(be, qp, rq);
    be.fabric
        .schedule(Instant::now(), Arc::downgrade(qp), FLUSH_TOKEN);
}

/// The RC responder a run of the send queue talks to, resolved once per run.
struct Peer {
    tb: Arc<EmulatedBackend>,
    tqp: Arc<Qp>,
    tmem: GuestMemoryLoadGuard<GuestMemoryMmap>,
}

/// Runs the send queue of `qp` (its `sq` locked by the caller) for at most [`RUN_BUDGET`];
/// returns what the run cost. Guest memory and, for RC, the responder are looked up once per
/// run, not per WR; the completions the run made and held (the responder's receives, then the
/// requester's sends) are handed to the sink at its end.
pub(crate) fn drive(be: &EmulatedBackend, qp: &Arc<Qp>, sq: &mut Sq, trigger: Trigger) -> u64 {
    if !may_run(be, qp, sq, trigger) {
        return 0;
    }
    let peer = match qp.ty {
        QpType::Rc => rc_target(be, qp.qpn, sq).map(|(tb, tqp)| Peer {
            tmem: tb.mem.memory(),
            tb,
            tqp,
        }),
        QpType::Ud | QpType::Gsi => None,
    };
    let spent = run(be, qp, sq, trigger, peer.as_ref());
    if let Some(p) = &peer {
        lock(&p.tqp.rq).held.deliver(&*p.tb.sink);
    }
    sq.held.deliver(&*be.sink);
    spent
}

/// Whether a run of the send queue has anything to do now (flushing it if the QP is in error).
fn may_run(be: &EmulatedBackend, qp: &Qp, sq: &mut Sq, trigger: Trigger) -> bool {
    if qp.is_dead() {
        return false;
    }
    match qp.state() {
        QpState::Err | QpState::Sqe => {
            flush_sq(be, qp, sq);
            return false;
        }
        QpState::Rts => {}
        _ => return false,
    }
    if trigger == Trigger::Post && qp.wakes.load(Ordering::Acquire) & Wake::Resume.bit() != 0 {
        // A run ran out of budget and the queue waits for its device's `progress`: WRs posted
        // meanwhile only queue, or one drain of a long ring would run a budget per batch.
        return false;
    }
    if let Some(st) = sq.stall {
        let go = match trigger {
            Trigger::Timer(t) => t == sq.token,
            Trigger::Kick => st.kind == StallKind::Rnr,
            Trigger::Post => false,
        };
        if !go {
            return false;
        }
    }
    !sq.pending.is_empty()
}

/// The WRs of a run, in order, until the queue is empty, stalls or fails, or the run has spent
/// its budget (then the queue is woken to go on later). Returns what it spent.
fn run(
    be: &EmulatedBackend,
    qp: &Arc<Qp>,
    sq: &mut Sq,
    mut trigger: Trigger,
    peer: Option<&Peer>,
) -> u64 {
    let mem = be.mem.memory();
    let mut lw = Window::new(&mem);
    let mut rw = peer.map(|p| Window::new(&p.tmem));
    let mut spent = 0u64;
    while let Some(wr) = sq.pending.front() {
        if spent >= RUN_BUDGET {
            be.wake(qp, Wake::Resume);
            return spent;
        }
        let mut part = sq.partial.take();
        let before = part.as_ref().map_or(0, |p| p.done);
        let outcome = match qp.ty {
            QpType::Rc => {
                let peer = peer.zip(rw.as_mut());
                execute_rc(be, qp, &mut lw, peer, sq.timeout, wr, &mut part)
            }
            QpType::Ud | QpType::Gsi => execute_ud(be, qp, &mut lw, sq, wr),
        };
        let (wr_id, signaled, opcode) = (wr.wr_id, wr.signaled, send_opcode(&wr.op));
        spent += WR_COST;
        match outcome {
            Outcome::Partial(n) => {
                sq.partial = part;
                spent += n;
                if sq.stall.take().is_some() {
                    sq.token += 1;
                    sq.retries += 1;
                }
            }
            Outcome::Done(len) => {
                spent += len.saturating_sub(before);
                sq.pending.pop_front();
                if sq.stall.take().is_some() {
                    sq.token += 1;
                    sq.retries += 1;
                }
                if signaled || qp.sig_all {
                    let wc = qp.wc(qp.send_cq, wr_id, WcStatus::Success, opcode, len);
                    sq.held.hold(&*be.sink, wc);
                }
            }
            Outcome::Error(status) => {
                sq.partial = part;
                sq.abandon();
                sq.pending.pop_front();
                if sq.stall.take().is_some() {
                    sq.retries += 1;
                }
                sq.token += 1;
                let wc = qp.wc(qp.send_cq, wr_id, status, opcode, 0);
                sq.held.deliver_then(&*be.sink, std::slice::from_ref(&wc));
                if qp.ty == QpType::Rc {
                    to_err_locked_sq(be, qp, sq);
                } else {
                    qp.set_state(QpState::Sqe);
                    flush_sq(be, qp, sq);
                }
                return spent;
            }
            Outcome::Stall(kind, delay) => {
                // A message part-way through starts over when it is retried.
                sq.partial = part;
                sq.abandon();
                sq.retries += u64::from(sq.stall.is_some());
                sq.rnr_waits += u64::from(kind == StallKind::Rnr);
                let fresh = match (sq.stall, trigger) {
                    (None, _) => true,
                    (Some(st), _) if st.kind != kind => true,
                    (Some(_), Trigger::Timer(_)) => false,
                    // A kick that found no receive again: keep waiting for the timer.
                    (Some(_), _) => return spent,
                };
                let left = if fresh {
                    match kind {
                        StallKind::Rnr if sq.rnr_retry >= 7 => None,
                        StallKind::Rnr => Some(sq.rnr_retry),
                        StallKind::Timeout => Some(sq.retry_cnt.min(7)),
                    }
                } else {
                    sq.stall.and_then(|s| s.left)
                };
                if left == Some(0) {
                    let status = match kind {
                        StallKind::Rnr => WcStatus::RnrRetryExcErr,
                        StallKind::Timeout => WcStatus::RetryExcErr,
                    };
                    sq.pending.pop_front();
                    sq.stall = None;
                    sq.token += 1;
                    let wc = qp.wc(qp.send_cq, wr_id, status, opcode, 0);
                    sq.held.deliver_then(&*be.sink, std::slice::from_ref(&wc));
                    to_err_locked_sq(be, qp, sq);
                    return spent;
                }
                sq.stall = Some(Stall {
                    kind,
                    left: left.map(|l| l - 1),
                });
                sq.token += 1;
                // With infinite RNR retries a receive posted to the responder retries at once
                // (the waiter registered by `Landing::find`): the timer is only a backstop for a
                // responder that changes state, and need not wake the timer thread per stall.
                let at = if kind == StallKind::Rnr && left.is_none() {
                    be.fabric.backstop(delay)
                } else {
                    Instant::now() + delay
                };
                be.fabric.schedule(at, Arc::downgrade(qp), sq.token);
                return spent;
            }
        }
        trigger = Trigger::Post;
    }
    spent
}

/// Timer callback (on the fabric's timer thread): wakes the QP, whose device retries its head
/// WR, or flushes it if it went to ERR as a responder ([`FLUSH_TOKEN`]), on a worker.
pub(crate) fn on_timer(qp: &Arc<Qp>, token: u64) {
    if let Some(be) = qp.backend.upgrade() {
        be.wake(qp, Wake::Timer(token));
    }
}

/// Resumes the send queue of a woken QP (see [`crate::Backend::progress`]); returns what the
/// run cost.
pub(crate) fn resume(be: &EmulatedBackend, qp: &Arc<Qp>) -> u64 {
    let mut sq = lock(&qp.sq);
    let bits = qp.wakes.swap(0, Ordering::AcqRel);
    let token = qp.wake_token.load(Ordering::Acquire);
    let timer = bits & Wake::Timer(0).bit() != 0;
    let trigger = if timer && token == sq.token {
        Trigger::Timer(token)
    } else if bits & Wake::Kick.bit() != 0 {
        Trigger::Kick
    } else if timer {
        // A stale timer (or the responder-flush one): runs nothing while the queue waits.
        Trigger::Timer(token)
    } else {
        Trigger::Post
    };
    drive(be, qp, &mut sq, trigger)
}

/// Lets senders waiting for a receive of `be` retry now: a sender of `be` itself on this
/// thread (the device's own worker), one of another device by waking it there.
pub(crate) fn kick(be: &EmulatedBackend, waiters: Vec<Weak<Qp>>) {
    for w in waiters {
        let Some(qp) = w.upgrade() else { continue };
        let Some(owner) = qp.backend.upgrade() else {
            continue;
        };
        if owner.id == be.id {
            let mut sq = lock(&qp.sq);
            drive(&owner, &qp, &mut sq, Trigger::Kick);
        } else {
            owner.wake(&qp, Wake::Kick);
        }
    }
}

/// Registers `qp` to be kicked once (every RNR retry would otherwise add it again).
fn add_waiter(list: &mut Vec<Weak<Qp>>, qp: &Arc<Qp>) {
    let me = Arc::downgrade(qp);
    if !list.iter().any(|w| w.ptr_eq(&me)) {
        list.retain(|w| w.strong_count() > 0);
        list.push(me);
    }
}

/// The receive an incoming message lands in (its QP's `rq` locked), found with [`Landing::find`].
/// A receive of the QP's own queue stays at the head of that queue and is read in place (no
/// copy out and back) until the message is known to use it; one of an SRQ is taken out at once,
/// since the SRQ's lock is not held across the copy.
/// Made once per message and never moved.
#[derive(Default)]
struct Landing {
    /// The receive taken from the QP's SRQ (`None`: the head of its own queue).
    from_srq: Option<QueuedRecv>,
}

impl Landing {
    /// Finds the receive for a message to `qp` (rq locked), from its SRQ or its own queue;
    /// registers `waiter` for a kick when there is none. False if there is none.
    fn find(
        &mut self,
        be: &EmulatedBackend,
        qp: &Qp,
        rq: &mut Rq,
        waiter: Option<&Arc<Qp>>,
    ) -> bool {
        let Some(srq) = &qp.srq else {
            if rq.wqes.is_empty() {
                if let Some(s) = waiter {
                    add_waiter(&mut rq.waiters, s);
                }
                return false;
            }
            return true;
        };
        let mut q = lock(&srq.q);
        if q.wqes.is_empty() {
            if let Some(s) = waiter {
                add_waiter(&mut q.waiters, s);
            }
            return false;
        }
        self.from_srq = q.wqes.pop_front();
        if q.limit > 0 && (q.wqes.len() as u64) < u64::from(q.limit) {
            q.limit = 0;
            be.sink.event(AsyncEvent::SrqLimitReached {
                srq_cookie: srq.cookie,
            });
        }
        true
    }

    /// The receive found (`None` only if the own queue's head vanished, which the `rq` lock
    /// rules out).
    fn wr<'a>(&'a self, rq: &'a Rq) -> Option<&'a QueuedRecv> {
        self.from_srq.as_ref().or_else(|| rq.wqes.front())
    }

    /// The message used the receive: it completes (successfully or with an error).
    fn consume(&self, rq: &mut Rq) {
        if self.from_srq.is_none() {
            rq.wqes.pop_front();
            rq.taken += 1;
        }
    }

    /// The message did not use the receive (the sender faulted before any effect): it stays
    /// first in line.
    fn put_back(&mut self, qp: &Qp) {
        if let (Some(w), Some(srq)) = (self.from_srq.take(), &qp.srq) {
            lock(&srq.q).wqes.push_front(w);
        }
    }
}

/// Resolves the RC responder of QP `qpn` (whose `sq` this is). A responder that is not
/// connected back to this QP drops the request, as an HCA drops packets for a QP from a source
/// it is not connected to: to the requester that looks like a missing responder.
fn rc_target(
    be: &EmulatedBackend,
    qpn: u32,
    sq: &mut Sq,
) -> Option<(Arc<EmulatedBackend>, Arc<Qp>)> {
    if let Some(t) = sq.remote.upgrade() {
        if !t.is_dead() {
            if let Some(tb) = t.backend.upgrade() {
                // Checked on every run: the responder may have been connected elsewhere since.
                return t.serves(be, qpn).then_some((tb, t));
            }
        }
    }
    let tb = match &sq.ah {
        Some(av) => be.fabric.lookup(&av.dgid)?,
        None => be.me.upgrade()?,
    };
    let t = tb.qp_by_qpn(sq.dest_qpn)?;
    if t.ty != QpType::Rc {
        return None;
    }
    sq.remote = Arc::downgrade(&t);
    t.serves(be, qpn).then_some((tb, t))
}

fn timeout_delay(enc: u8) -> Duration {
    if enc == 0 || enc >= 32 {
        return MAX_TIMEOUT_DELAY;
    }
    Duration::from_nanos(4096u64 << enc).min(MAX_TIMEOUT_DELAY)
}

fn rnr_delay(enc: u8) -> Duration {
    Duration::from_micros(u64::from(RNR_US[usize::from(enc & 31)]))
}

/// Executes one step of an RC send WR against `peer` and a window on its memory (`None`: the
/// responder cannot be reached); `lw` is a window on the requester's memory, `part` the WR's
/// progress so far (updated).
fn execute_rc(
    be: &EmulatedBackend,
    qp: &Arc<Qp>,
    lw: &mut Window<'_>,
    peer: Option<(&Peer, &mut Window<'_>)>,
    timeout: u8,
    wr: &QueuedSend,
    part: &mut Option<Partial>,
) -> Outcome {
    if wr.sges.as_slice().len() > qp.max_send_sge as usize {
        return Outcome::Error(WcStatus::LocLenErr);
    }
    // Local operations: in queue order, with no responder.
    match &wr.op {
        SendOp::FastReg(reg) => {
            return match be.fast_reg(qp.pd, reg) {
                Ok(()) => Outcome::Done(0),
                Err(status) => Outcome::Error(status),
            }
        }
        SendOp::LocalInv { key } => {
            return match be.invalidate(qp.pd, *key, false) {
                true => Outcome::Done(0),
                false => Outcome::Error(WcStatus::LocQpOpErr),
            }
        }
        _ => {}
    }
    let needs_write = matches!(
        wr.op,
        SendOp::RdmaRead { .. } | SendOp::CmpSwap { .. } | SendOp::FetchAdd { .. }
    );
    let need = if needs_write {
        Access::LOCAL_WRITE
    } else {
        Access::empty()
    };
    // Checked at every step: an MR deregistered part-way fails the rest of the transfer.
    let Some(local) = be.resolve_local(wr.sges.as_slice(), qp.pd, need) else {
        return Outcome::Error(WcStatus::LocProtErr);
    };
    let stall_timeout = || Outcome::Stall(StallKind::Timeout, timeout_delay(timeout));
    let Some((Peer { tb, tqp, .. }, rw)) = peer else {
        return stall_timeout();
    };
    if !tqp.can_receive() || tqp.is_dead() {
        return stall_timeout();
    }
    let at = part.as_ref().map_or(0, |p| p.done);
    let io = Io {
        lw,
        src: &local,
        rw,
        at,
    };
    let solicited = wr.solicited;
    let res = match wr.op {
        SendOp::Send { imm } => rc_message(qp, io, tb, tqp, Into::Recv, imm, solicited, part),
        SendOp::SendInv { rkey } => {
            rc_message(qp, io, tb, tqp, Into::RecvInv(rkey), None, solicited, part)
        }
        // Executed above.
        SendOp::LocalInv { .. } | SendOp::FastReg(_) => Ok(Step::Done(0)),
        SendOp::RdmaWrite {
            remote_addr: addr,
            rkey,
            imm: Some(imm),
        } => {
            let into = Into::Remote { addr, rkey };
            rc_message(qp, io, tb, tqp, into, Some(imm), solicited, part)
        }
        SendOp::RdmaWrite {
            remote_addr,
            rkey,
            imm: None,
        } => rc_write(io, tb, tqp, remote_addr, rkey),
        SendOp::RdmaRead { remote_addr, rkey } => rc_read(io, tb, tqp, remote_addr, rkey),
        SendOp::CmpSwap {
            remote_addr,
            rkey,
            compare,
            swap,
        } => rc_atomic(io, tb, tqp, remote_addr, rkey, |a| {
            match a.compare_exchange(compare, swap, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(v) | Err(v) => v,
            }
        }),
        SendOp::FetchAdd {
            remote_addr,
            rkey,
            add,
        } => rc_atomic(io, tb, tqp, remote_addr, rkey, |a| {
            a.fetch_add(add, Ordering::SeqCst)
        }),
    };
    match res {
        Ok(Step::Done(len)) => Outcome::Done(len),
        Ok(Step::More(n)) => {
            // A receive the message reserved is already recorded in `part`.
            match part {
                Some(p) => p.done = at + n,
                None => {
                    *part = Some(Partial {
                        done: at + n,
                        recv: Reserved::None,
                    })
                }
            }
            Outcome::Partial(n)
        }
        Err(Resp::Rnr(t)) => Outcome::Stall(StallKind::Rnr, rnr_delay(t)),
        Err(Resp::Dropped) => stall_timeout(),
        Err(Resp::Nak(s)) => Outcome::Error(s),
        Err(Resp::LocalFault) => Outcome::Error(WcStatus::LocProtErr),
    }
}

/// The two sides of one step of a transfer: the requester's window and its validated SGEs,
/// the responder's window, and how far the transfer has got.
struct Io<'a, 'w, 'm> {
    lw: &'a mut Window<'w>,
    src: &'a Segs,
    rw: &'a mut Window<'m>,
    at: u64,
}

/// The bytes of the next step of a transfer of `len` bytes that has moved `at`.
fn step_len(len: u64, at: u64) -> u64 {
    len.saturating_sub(at).min(SLICE)
}

/// The result of a step that moved `n` of `len` bytes from `at`.
fn step(len: u64, at: u64, n: u64) -> Step {
    if at + n >= len {
        Step::Done(len)
    } else {
        Step::More(n)
    }
}

/// A message that uses a receive at the responder (SEND, RDMA WRITE with immediate), one step.
/// The first step reserves the receive (RNR if there is none); the last uses it and makes its
/// completion. A step after the first finds the reservation gone if the responder was reset,
/// flushed or destroyed meanwhile: the message is dropped and retried from its start.
#[allow(clippy::too_many_arguments)]
fn rc_message(
    qp: &Arc<Qp>,
    io: Io<'_, '_, '_>,
    tb: &EmulatedBackend,
    tqp: &Arc<Qp>,
    into: Into,
    imm: Option<u32>,
    solicited: bool,
    part: &mut Option<Partial>,
) -> Result<Step, Resp> {
    let len = io.src.total();
    let at = io.at;
    let remote = match into {
        Into::Remote { addr, rkey } if len > 0 => Some(remote_check(
            tb,
            tqp,
            Access::REMOTE_WRITE,
            rkey,
            addr,
            len,
        )?),
        Into::Remote { .. } => Some(Segs::new()),
        Into::Recv | Into::RecvInv(_) => None,
    };
    let mut rq = lock(&tqp.rq);
    if tqp.is_dead() || !tqp.can_receive() {
        return Err(Resp::Dropped);
    }
    let mut landing = Landing::default();
    match part
        .as_mut()
        .map(|p| std::mem::replace(&mut p.recv, Reserved::None))
    {
        Some(Reserved::Own(taken)) if rq.taken == taken && !rq.wqes.is_empty() => {}
        Some(Reserved::Srq(held)) => landing.from_srq = Some(held.1),
        Some(Reserved::Own(_)) => return Err(Resp::Dropped),
        Some(Reserved::None) | None => {
            if !landing.find(tb, tqp, &mut rq, Some(qp)) {
                return Err(Resp::Rnr(rq.min_rnr_timer));
            }
        }
    }
    let opcode = match into {
        Into::Recv | Into::RecvInv(_) => WcOpcode::Recv,
        Into::Remote { .. } => WcOpcode::RecvRdmaWithImm,
    };
    // The receive's id, and where the bytes go (or the receive and NAK statuses of why not).
    let (wr_id, dst) = {
        let Some(rwr) = landing.wr(&rq) else {
            return Err(Resp::Rnr(rq.min_rnr_timer));
        };
        let dst = match remote {
            Some(r) => Ok(r),
            None if rwr.sges.as_slice().len() > tqp.max_recv_sge as usize => {
                Err((WcStatus::LocLenErr, WcStatus::RemInvReqErr))
            }
            None => match tb.resolve_local(rwr.sges.as_slice(), tqp.pd, Access::LOCAL_WRITE) {
                None => Err((WcStatus::LocProtErr, WcStatus::RemOpErr)),
                Some(d) if d.total() < len => Err((WcStatus::LocLenErr, WcStatus::RemInvReqErr)),
                Some(d) => Ok(d),
            },
        };
        (rwr.wr_id, dst)
    };
    let fail = |rq: &mut Rq, landing: &Landing, (status, nak): (WcStatus, WcStatus)| {
        landing.consume(rq);
        let wc = tqp.wc(tqp.recv_cq, wr_id, status, opcode, 0);
        rq.held.deliver_then(&*tb.sink, std::slice::from_ref(&wc));
        responder_err(tb, tqp, rq, None);
        Err(Resp::Nak(nak))
    };
    let dst = match dst {
        Ok(d) => d,
        Err(why) => return fail(&mut rq, &landing, why),
    };
    let n = step_len(len, at);
    let Io { lw, src, rw, .. } = io;
    match copy(lw, &mut src.cursor_at(at), rw, &mut dst.cursor_at(at), n) {
        Ok(()) => {}
        Err(Fault::Src) => {
            landing.put_back(tqp);
            return Err(Resp::LocalFault);
        }
        Err(Fault::Dst) => {
            return fail(
                &mut rq,
                &landing,
                (WcStatus::LocProtErr, WcStatus::RemOpErr),
            )
        }
    }
    if let Step::More(n) = step(len, at, n) {
        let recv = match (landing.from_srq.take(), &tqp.srq) {
            (Some(w), Some(srq)) => Reserved::Srq(Box::new((srq.clone(), w))),
            _ => Reserved::Own(rq.taken),
        };
        *part = Some(Partial { done: at, recv });
        return Ok(Step::More(n));
    }
    if let Into::RecvInv(rkey) = into {
        if !tb.invalidate(tqp.pd, rkey, true) {
            let status = WcStatus::RemInvReqErr;
            return fail(&mut rq, &landing, (status, status));
        }
    }
    landing.consume(&mut rq);
    let mut wc = tqp.wc(tqp.recv_cq, wr_id, WcStatus::Success, opcode, len);
    wc.imm_data = imm;
    if let Into::RecvInv(rkey) = into {
        wc.invalidated = Some(rkey);
    }
    wc.src_qp = qp.qpn;
    wc.solicited = solicited;
    rq.held.hold(&*tb.sink, wc);
    Ok(Step::Done(len))
}

/// Checks an incoming RDMA/atomic request against the responder QP and its MR.
fn remote_check(
    tb: &EmulatedBackend,
    tqp: &Arc<Qp>,
    right: Access,
    rkey: u32,
    addr: u64,
    len: u64,
) -> Result<Segs, Resp> {
    if !tqp.remote_access().contains(right) {
        // The QP does not accept this operation at all: IB's responder answers with NAK Invalid
        // Request (before looking at the R_Key), as rxe and the verbs documentation say
        // ("operation not supported by this receive queue").
        return Err(invalid_request(tb, tqp));
    }
    match tb.resolve_remote(rkey, addr, len, tqp.pd, right) {
        Some(s) => Ok(s),
        None => {
            let mut rq = lock(&tqp.rq);
            responder_err(
                tb,
                tqp,
                &mut rq,
                Some(AsyncEvent::QpAccessErr {
                    qp_cookie: tqp.cookie,
                }),
            );
            Err(Resp::Nak(WcStatus::RemAccessErr))
        }
    }
}

/// A fault in the responder's memory during an operation: remote operational error.
fn remote_fault(tb: &EmulatedBackend, tqp: &Arc<Qp>) -> Resp {
    let mut rq = lock(&tqp.rq);
    responder_err(
        tb,
        tqp,
        &mut rq,
        Some(AsyncEvent::QpFatal {
            qp_cookie: tqp.cookie,
        }),
    );
    Resp::Nak(WcStatus::RemOpErr)
}

/// RDMA WRITE without immediate, one step. The remote range is checked at every step: an MR
/// deregistered part-way stops the rest.
fn rc_write(
    io: Io<'_, '_, '_>,
    tb: &EmulatedBackend,
    tqp: &Arc<Qp>,
    addr: u64,
    rkey: u32,
) -> Result<Step, Resp> {
    let len = io.src.total();
    let dst = if len > 0 {
        remote_check(tb, tqp, Access::REMOTE_WRITE, rkey, addr, len)?
    } else {
        Segs::new()
    };
    let (at, n) = (io.at, step_len(len, io.at));
    match copy(
        io.lw,
        &mut io.src.cursor_at(at),
        io.rw,
        &mut dst.cursor_at(at),
        n,
    ) {
        Ok(()) => Ok(step(len, at, n)),
        Err(Fault::Src) => Err(Resp::LocalFault),
        Err(Fault::Dst) => Err(remote_fault(tb, tqp)),
    }
}

/// RDMA READ, one step (`io.src` is where the data goes, in the requester's memory).
fn rc_read(
    io: Io<'_, '_, '_>,
    tb: &EmulatedBackend,
    tqp: &Arc<Qp>,
    addr: u64,
    rkey: u32,
) -> Result<Step, Resp> {
    let dst = io.src;
    let len = dst.total();
    let src = if len > 0 {
        remote_check(tb, tqp, Access::REMOTE_READ, rkey, addr, len)?
    } else {
        Segs::new()
    };
    let (at, n) = (io.at, step_len(len, io.at));
    match copy(
        io.rw,
        &mut src.cursor_at(at),
        io.lw,
        &mut dst.cursor_at(at),
        n,
    ) {
        Ok(()) => Ok(step(len, at, n)),
        Err(Fault::Dst) => Err(Resp::LocalFault),
        Err(Fault::Src) => Err(remote_fault(tb, tqp)),
    }
}

/// Atomics: `f` runs on the remote 8 bytes and returns the original value, which lands in
/// `io.src` (the requester's buffer).
fn rc_atomic(
    io: Io<'_, '_, '_>,
    tb: &EmulatedBackend,
    tqp: &Arc<Qp>,
    addr: u64,
    rkey: u32,
    f: impl FnOnce(&std::sync::atomic::AtomicU64) -> u64,
) -> Result<Step, Resp> {
    let dst = io.src;
    if dst.total() < 8 {
        return Err(Resp::Nak(WcStatus::LocLenErr));
    }
    if addr % 8 != 0 {
        return Err(invalid_request(tb, tqp));
    }
    let target = remote_check(tb, tqp, Access::REMOTE_ATOMIC, rkey, addr, 8)?;
    let Some(gpa) = atomic_target(&target) else {
        return Err(remote_fault(tb, tqp));
    };
    let Some(orig) = atomic_at(io.rw.mem(), gpa, f) else {
        return Err(remote_fault(tb, tqp));
    };
    if !write_bytes(io.lw.mem(), &mut dst.cursor(), &orig.to_ne_bytes()) {
        return Err(Resp::LocalFault);
    }
    Ok(Step::Done(8))
}

/// The UDP datagram of a RoCE v2 UD packet with `len` bytes of payload: UDP (8), BTH (12),
/// DETH (8), the immediate (4) if any, the payload padded to 4 bytes, ICRC (4).
fn roce_v2_udp_len(len: u64, imm: bool) -> u64 {
    8 + 12 + 8 + if imm { 4 } else { 0 } + len.next_multiple_of(4) + 4
}

/// The 40-byte network header in front of a UD datagram of `len` bytes from `sgid`, as the
/// receiver finds it: an IB GRH for a RoCE v1 source GID; for RoCE v2 the IP header of the
/// packet (IPv4 in bytes 20..40 for an IPv4-mapped GID, with its checksum: the guest kernel
/// checks it; else IPv6 with next header UDP).
fn network_header(
    av: &AddressVector,
    sgid: &Gid,
    ty: GidType,
    len: u64,
    imm: bool,
) -> ([u8; 40], NetworkHeader) {
    match (ty, sgid.ipv4(), av.dgid.ipv4()) {
        (GidType::RoceV2, Some(src), Some(dst)) => {
            let mut g = [0u8; 40];
            let total = u16::try_from(20 + roce_v2_udp_len(len, imm)).unwrap_or(u16::MAX);
            let h = &mut g[20..40];
            h[0] = 0x45;
            h[1] = av.traffic_class;
            h[2..4].copy_from_slice(&total.to_be_bytes());
            h[6] = 0x40; // don't fragment
            h[8] = av.hop_limit;
            h[9] = 17; // UDP
            h[12..16].copy_from_slice(&src);
            h[16..20].copy_from_slice(&dst);
            let sum = h
                .chunks_exact(2)
                .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
                .sum::<u32>();
            let sum = (sum & 0xffff) + (sum >> 16);
            let sum = (sum & 0xffff) + (sum >> 16);
            h[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
            (g, NetworkHeader::Ipv4)
        }
        // UDP after an IPv6 header.
        (GidType::RoceV2, ..) => (
            ipv6_style(av, sgid, roce_v2_udp_len(len, imm), 17),
            NetworkHeader::Ipv6,
        ),
        // IB: the BTH after a GRH.
        (GidType::RoceV1, ..) => (ipv6_style(av, sgid, len, 0x1b), NetworkHeader::Grh),
    }
}

/// An IPv6-shaped header (an IPv6 header or an IB GRH, the same layout) from `sgid` to the
/// address vector's GID, with this payload length and next header.
fn ipv6_style(av: &AddressVector, sgid: &Gid, payload: u64, next: u8) -> [u8; 40] {
    let mut g = [0u8; 40];
    let tc = av.traffic_class;
    let fl = av.flow_label & 0xf_ffff;
    g[0] = 0x60 | (tc >> 4);
    g[1] = (tc << 4) | ((fl >> 16) as u8 & 0xf);
    g[2..4].copy_from_slice(&(fl as u16).to_be_bytes());
    g[4..6].copy_from_slice(&u16::try_from(payload).unwrap_or(u16::MAX).to_be_bytes());
    g[6] = next;
    g[7] = av.hop_limit;
    g[8..24].copy_from_slice(&sgid.0);
    g[24..40].copy_from_slice(&av.dgid.0);
    g
}

/// Executes one UD/GSI send WR. The send completes locally whether or not it is delivered.
fn execute_ud(
    be: &EmulatedBackend,
    qp: &Arc<Qp>,
    lw: &mut Window<'_>,
    sq: &Sq,
    wr: &QueuedSend,
) -> Outcome {
    let (&SendOp::Send { imm }, Some(ud)) = (&wr.op, wr.ud) else {
        return Outcome::Error(WcStatus::LocQpOpErr);
    };
    if wr.sges.as_slice().len() > qp.max_send_sge as usize {
        return Outcome::Error(WcStatus::LocLenErr);
    }
    let Some(src) = be.resolve_local(wr.sges.as_slice(), qp.pd, Access::empty()) else {
        return Outcome::Error(WcStatus::LocProtErr);
    };
    let len = src.total();
    if len > mtu_bytes(sq.path_mtu) {
        return Outcome::Error(WcStatus::LocLenErr);
    }
    let Some((sgid, sgid_type)) = be.gid(ud.av.sgid_index) else {
        return Outcome::Error(WcStatus::LocQpOpErr);
    };
    let qkey = if ud.remote_qkey & 0x8000_0000 != 0 {
        sq.qkey
    } else {
        ud.remote_qkey
    };
    let Some(tb) = be.fabric.lookup(&ud.av.dgid) else {
        return Outcome::Done(len);
    };
    let Some(tqp) = tb.qp_by_qpn(ud.remote_qpn) else {
        return Outcome::Done(len);
    };
    if tqp.ty == QpType::Rc {
        return Outcome::Done(len);
    }
    let mut rq = lock(&tqp.rq);
    if tqp.is_dead() || !tqp.can_receive() || rq.qkey != qkey {
        return Outcome::Done(len);
    }
    let mut landing = Landing::default();
    if !landing.find(&tb, &tqp, &mut rq, None) {
        return Outcome::Done(len);
    }
    let (wr_id, dst) = {
        let Some(rwr) = landing.wr(&rq) else {
            return Outcome::Done(len);
        };
        let dst = if rwr.sges.as_slice().len() > tqp.max_recv_sge as usize {
            None
        } else {
            tb.resolve_local(rwr.sges.as_slice(), tqp.pd, Access::LOCAL_WRITE)
        };
        (rwr.wr_id, dst)
    };
    let mut wc = tqp.wc(tqp.recv_cq, wr_id, WcStatus::Success, WcOpcode::Recv, 0);
    let tmem = tb.mem.memory();
    let mut rw = Window::new(&tmem);
    match dst {
        None => wc.status = WcStatus::LocProtErr,
        Some(dst) if dst.total() < 40 + len => wc.status = WcStatus::LocLenErr,
        Some(dst) => {
            let mut c = dst.cursor();
            let (header, kind) = network_header(&ud.av, &sgid, sgid_type, len, imm.is_some());
            let res = if write_bytes(&tmem, &mut c, &header) {
                copy(lw, &mut src.cursor(), &mut rw, &mut c, len)
            } else {
                Err(Fault::Dst)
            };
            match res {
                Ok(()) => {
                    wc.byte_len = (40 + len) as u32;
                    wc.imm_data = imm;
                    wc.src_qp = qp.qpn;
                    wc.grh = Some(kind);
                    wc.solicited = wr.solicited;
                }
                Err(Fault::Src) => {
                    landing.put_back(&tqp);
                    return Outcome::Error(WcStatus::LocProtErr);
                }
                Err(Fault::Dst) => wc.status = WcStatus::LocProtErr,
            }
        }
    }
    landing.consume(&mut rq);
    rq.held.deliver_then(&*tb.sink, std::slice::from_ref(&wc));
    Outcome::Done(len)
}

#[cfg(test)]
mod tests {
    use super::{network_header, QueuedRecv, QueuedSend};
    use crate::{AddressVector, Gid, GidType, NetworkHeader, RecvWr, SendWr, Sge, SgeList};

    fn v4(a: [u8; 4]) -> Gid {
        let mut g = [0u8; 16];
        g[10] = 0xff;
        g[11] = 0xff;
        g[12..].copy_from_slice(&a);
        Gid(g)
    }

    #[test]
    fn network_headers_by_gid_type() {
        let av = AddressVector {
            dgid: v4([10, 0, 2, 15]),
            hop_limit: 64,
            traffic_class: 0x12,
            ..Default::default()
        };
        let src = v4([10, 0, 2, 16]);
        // RoCE v2 between IPv4-mapped GIDs: an IPv4 header in bytes 20..40 whose checksum
        // verifies (the guest kernel checks it), total length = IP + UDP datagram.
        let (h, kind) = network_header(&av, &src, GidType::RoceV2, 100, false);
        assert_eq!(kind, NetworkHeader::Ipv4);
        assert!(h[..20].iter().all(|&b| b == 0));
        let ip = &h[20..];
        assert_eq!((ip[0], ip[1], ip[8], ip[9]), (0x45, 0x12, 64, 17));
        assert_eq!(
            u16::from_be_bytes([ip[2], ip[3]]),
            20 + 8 + 12 + 8 + 100 + 4
        );
        assert_eq!(
            (&ip[12..16], &ip[16..20]),
            (&[10, 0, 2, 16][..], &[10, 0, 2, 15][..])
        );
        let sum: u32 = ip
            .chunks_exact(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        assert_eq!((sum & 0xffff) + (sum >> 16), 0xffff, "checksum");
        // RoCE v2 on other GIDs: IPv6, next header UDP, payload = the UDP datagram (padded
        // payload, immediate).
        let ll = Gid::from_mac([0, 0x50, 0x56, 1, 2, 3]);
        let av6 = AddressVector { dgid: ll, ..av };
        let (h, kind) = network_header(&av6, &ll, GidType::RoceV2, 5, true);
        assert_eq!(kind, NetworkHeader::Ipv6);
        assert_eq!((h[0] >> 4, h[6], h[7]), (6, 17, 64));
        assert_eq!(u16::from_be_bytes([h[4], h[5]]), 8 + 12 + 8 + 4 + 8 + 4);
        assert_eq!((&h[8..24], &h[24..40]), (&ll.0[..], &ll.0[..]));
        // RoCE v1: an IB GRH (next header 0x1b, payload length = the message).
        let (h, kind) = network_header(&av, &src, GidType::RoceV1, 100, false);
        assert_eq!(kind, NetworkHeader::Grh);
        assert_eq!((h[6], u16::from_be_bytes([h[4], h[5]])), (0x1b, 100));
    }

    #[test]
    fn queued_wrs_keep_short_sge_lists_inline_and_long_ones_whole() {
        // What a posted WR costs the host while it waits (docs/benchmarks.md, memory).
        assert_eq!(std::mem::size_of::<QueuedRecv>(), 48);
        assert!(std::mem::size_of::<QueuedSend>() <= 160);
        assert!(std::mem::size_of::<RecvWr>() >= 5 * std::mem::size_of::<QueuedRecv>());
        for n in [0u32, 1, 2, 3, 16] {
            let mut sges = SgeList::new();
            for i in 0..n {
                assert!(sges.push(Sge {
                    addr: u64::from(i) << 12,
                    length: i + 1,
                    lkey: 100 + i,
                }));
            }
            let r = QueuedRecv::from(&RecvWr { wr_id: 7, sges });
            assert_eq!((r.wr_id, r.sges.as_slice()), (7, sges.as_slice()));
            assert_eq!(r.sges.spilled(), n > 2);
            let wr = SendWr {
                wr_id: 9,
                op: crate::SendOp::Send { imm: Some(1) },
                sges,
                signaled: true,
                solicited: false,
                ud: None,
            };
            let s = QueuedSend::from(&wr);
            assert_eq!(s.sges.as_slice(), sges.as_slice());
            assert_eq!((s.wr_id, s.signaled, s.solicited), (9, true, false));
        }
    }
}
