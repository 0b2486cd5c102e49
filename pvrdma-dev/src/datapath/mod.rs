//! The data path: draining guest work queues on worker threads into the backend, and turning
//! backend completions into CQEs, CQ notifications and interrupts on the main loop.

pub(crate) mod cq;
mod fetch;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod wqe;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rdma_backend::{
    Backend, CompletionSink, CqId, Error as BackendError, GuestMem, QpId, QpType, RecvWr, SendWr,
    Sge, SgeList, SrqId, WcStatus, WorkCompletion,
};
use vm_memory::{Address, ByteValued, GuestAddressSpace, GuestMemory};

use crate::abi::{RqWqeHdr, SqWqeHdr, RQ_WQE_HDR_SIZE, SGE_SIZE, SQ_WQE_HDR_SIZE};
use crate::pdir::{PageDir, PAGE_SIZE};
use crate::ring::{ConsumerRing, RingAddr};

pub(crate) use fetch::fetch_send;
use fetch::{fetch_recv, fetch_recv_into, fetch_send_into};

/// Size of a send WQE for `max_sge` SGEs: `next_pow2(80 + 16·max_sge)` (spec §6).
pub fn sq_wqe_size(max_sge: u32) -> u32 {
    (SQ_WQE_HDR_SIZE + SGE_SIZE * max_sge).next_power_of_two()
}

/// Size of a receive WQE for `max_sge` SGEs: `next_pow2(16 + 16·max_sge)` (spec §6).
pub fn rq_wqe_size(max_sge: u32) -> u32 {
    (RQ_WQE_HDR_SIZE + SGE_SIZE * max_sge).next_power_of_two()
}

/// Pages needed for `n` WQEs of `wqe_size` bytes.
pub fn pages_for(n: u32, wqe_size: u32) -> u64 {
    (u64::from(n) * u64::from(wqe_size)).div_ceil(PAGE_SIZE)
}

/// A guest work queue the device consumes: a ring and where its WQEs live in the pdir.
#[derive(Debug)]
pub(crate) struct WorkQueue {
    pub ring: ConsumerRing,
    /// Byte offset of WQE 0 within the pdir's pages.
    pub base: u64,
    pub wqe_size: u32,
    pub max_sge: u32,
}

impl WorkQueue {
    pub(crate) fn new(
        pdir: &PageDir,
        state_off: u64,
        n: u32,
        base: u64,
        wqe_size: u32,
        max_sge: u32,
    ) -> Option<WorkQueue> {
        let state = pdir.page(0)?;
        let ring = ConsumerRing::new(RingAddr {
            addr: state.unchecked_add(state_off),
            n,
        })
        .ok()?;
        Some(WorkQueue {
            ring,
            base,
            wqe_size,
            max_sge,
        })
    }

    fn wqe_offset(&self, slot: u32) -> u64 {
        self.base + u64::from(slot) * u64::from(self.wqe_size)
    }
}

/// What a QP's worker needs; shared between the main loop and at most one worker at a time.
#[derive(Debug)]
pub(crate) struct QpShared {
    pub backend_qp: QpId,
    pub qp_type: QpType,
    pub cookie: u64,
    pub send_cq: CqId,
    pub recv_cq: CqId,
    pub pdir: PageDir,
    pub sq: WorkQueue,
    /// `None` when the QP uses an SRQ.
    pub rq: Option<WorkQueue>,
    pub sq_sig_all: bool,
    /// Pages a FAST_REG_MR WQE may list; 0 where the kernel-only opcodes are refused (a user
    /// QP, or a device without fast-register MRs).
    pub fast_reg_pages: u32,
    /// Set on the main loop before the QP is destroyed or the device reset: workers stop.
    pub dead: AtomicBool,
    /// WRs fetched but not yet taken by the backend (only its one worker touches it).
    pub pending: std::sync::Mutex<Pending>,
    /// Times the rings were reset (MODIFY_QP to RESET, on the main loop). A drain that ran
    /// across a reset may have read the indices while they were set back to 0: what it took for
    /// a broken ring is not one; and WRs fetched before a reset are dropped, not posted after.
    pub resets: std::sync::atomic::AtomicU32,
    /// Send-side counters, written by the worker draining the QP.
    pub traffic: crate::stats::QpTraffic,
}

/// What an SRQ's worker needs.
#[derive(Debug)]
pub(crate) struct SrqShared {
    pub backend_srq: SrqId,
    pub pdir: PageDir,
    pub rq: WorkQueue,
    pub dead: AtomicBool,
    /// A receive fetched but not yet taken by the backend.
    pub pending: std::sync::Mutex<Option<RecvWr>>,
}

/// Everything a data-path worker touches besides the queue itself.
pub(crate) struct Env {
    pub mem: GuestMem,
    pub backend: Arc<dyn Backend>,
    pub sink: Arc<dyn CompletionSink>,
    /// The backend asked for [`Backend::progress`] and the main loop has not yet started it.
    pub progress: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("backend", &self.backend.name())
            .finish()
    }
}

/// Runs the backend's deferred work on this worker if the backend asked for it and no job has
/// taken the request yet: at the end of a drain (its guest-memory snapshot let go), where a
/// transfer that outgrew one run of its queue is usually asked for. Saves the hop through the
/// main loop to a job of its own; if work remains, the main loop is asked to start that job.
pub(crate) fn progress_here(env: &Env) {
    if env
        .progress
        .swap(false, std::sync::atomic::Ordering::AcqRel)
        && env.backend.progress()
    {
        env.sink.progress_needed();
    }
}

/// Outcome of one drain pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Drained {
    /// WQEs taken from the rings.
    pub consumed: u32,
    /// The backend's queue was full: retry when completions free room.
    pub stalled: bool,
    /// The guest's ring indices were invalid: the queue is in error.
    pub ring_error: bool,
    /// Malformed WQEs skipped (SRQ: there is no QP yet to complete them against).
    pub malformed: u32,
}

fn error_wc(shared: &QpShared, cq: CqId, wr_id: u64, e: wqe::WqeError) -> WorkCompletion {
    WorkCompletion {
        cq,
        qp_cookie: shared.cookie,
        wr_id,
        status: e.status,
        opcode: e.opcode,
        byte_len: 0,
        imm_data: None,
        invalidated: None,
        src_qp: 0,
        grh: None,
        solicited: false,
    }
}

/// A send WQE as fetched: a WR for the backend, or the error it completes with.
type FetchedSend = Result<SendWr, (u64, wqe::WqeError)>;
/// A receive WQE as fetched: a WR for the backend, or the `wr_id` of a malformed one.
type FetchedRecv = Result<RecvWr, u64>;

/// WQEs read from a ring per pass of the loop: one `prod_tail` load and one `cons_head` store
/// for the lot, and one backend call for each run of good WRs in it.
const BATCH: usize = 16;

/// WQEs fetched from a ring (their slots already given back) that the backend could not take
/// yet, in ring order: at most one batch per queue.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    send: VecDeque<FetchedSend>,
    recv: VecDeque<FetchedRecv>,
    /// The QP's [`QpShared::resets`] when these were fetched.
    resets: u32,
}

impl QpShared {
    /// What its send queue takes.
    pub(crate) fn sq_kind(&self) -> wqe::SqKind {
        wqe::SqKind {
            qp_type: self.qp_type,
            sq_sig_all: self.sq_sig_all,
            fast_reg_pages: self.fast_reg_pages,
        }
    }

    /// Whether a drain could do anything: a WQE in either ring, a WR waiting for the backend,
    /// or rings it cannot read (the drain reports those). On the main loop, where it decides if
    /// a state change needs a drain: after a connect's INIT/RTR/RTS the rings are usually empty,
    /// and a drain per transition would wake a worker three times for nothing.
    pub(crate) fn may_have_work<M: vm_memory::GuestMemory + ?Sized>(&self, mem: &M) -> bool {
        let ring_work = |q: &WorkQueue| !matches!(q.ring.peek(mem), Ok(None));
        if ring_work(&self.sq) || self.rq.as_ref().is_some_and(ring_work) {
            return true;
        }
        match self.pending.try_lock() {
            Ok(p) => !p.send.is_empty() || !p.recv.is_empty(),
            // A drain holds it right now: let the scheduler decide.
            Err(_) => true,
        }
    }
}

/// What became of one post.
enum Posted {
    /// Taken (or completed in error) by the backend.
    Done,
    /// Not taken: keep it for the next pass (queue full, or the QP not yet in a state that
    /// accepts it; a QP state change starts a new pass).
    Later,
    /// The QP is gone.
    Gone,
}

fn posted(r: rdma_backend::Result<()>) -> Posted {
    match r {
        Ok(()) => Posted::Done,
        Err(BackendError::NoSuchObject(_)) => Posted::Gone,
        Err(_) => Posted::Later,
    }
}

/// Drains a QP's receive queue, then its send queue, into the backend. Bounded: at most one
/// ring's worth of WQEs per queue per pass, so a guest that keeps producing cannot pin a worker.
///
/// WQEs are copied out of the ring and their slots given back (`cons_head` advanced) before the
/// backend executes them, as an HCA fetches WQEs: the guest may reuse a slot as soon as the work
/// is under way (perftest's latency tests with a queue depth of 1 depend on it). They are taken
/// in batches of up to [`BATCH`]; WRs of a batch the backend cannot take yet are kept in
/// [`Pending`] and posted first on the next pass.
pub(crate) fn drain_qp(shared: &QpShared, env: &Env) -> Drained {
    let mem = env.mem.memory();
    let mut out = Drained::default();
    let Ok(mut pending) = shared.pending.lock() else {
        out.ring_error = true;
        return out;
    };
    let resets = shared.resets.load(Ordering::Acquire);
    if pending.resets != resets {
        // Fetched before the QP was reset: the guest's RESET discarded them.
        pending.send.clear();
        pending.recv.clear();
        pending.resets = resets;
    }
    if let Some(rq) = &shared.rq {
        // A stalled receive queue does not hold up the send queue.
        if !drain_rq(shared, env, &*mem, rq, &mut pending.recv, &mut out) {
            return out;
        }
    }
    drain_sq(shared, env, &*mem, &mut pending.send, &mut out);
    out
}

/// Where a queue's drain stopped early: `Later` (stalled) or `Gone`.
type Stop = Option<Posted>;

/// Posts one fetched receive, or completes a malformed one in error.
fn handle_recv(shared: &QpShared, env: &Env, f: &FetchedRecv) -> Posted {
    match f {
        Ok(wr) => posted(env.backend.post_recv(shared.backend_qp, wr)),
        Err(wr_id) => {
            shared.traffic.bad_wqe();
            // A malformed receive cannot be posted; it completes in error and the QP moves to
            // ERR, which flushes the rest (IB: local QP operation error).
            let e = wqe::WqeError {
                status: WcStatus::LocLenErr,
                opcode: rdma_backend::WcOpcode::Recv,
            };
            env.sink
                .complete(&[error_wc(shared, shared.recv_cq, *wr_id, e)]);
            move_to_error(shared, env);
            Posted::Done
        }
    }
}

/// Posts one fetched send, or completes a malformed one in error.
fn handle_send(shared: &QpShared, env: &Env, f: &FetchedSend) -> Posted {
    match f {
        Ok(wr) => posted(env.backend.post_send(shared.backend_qp, wr)),
        Err((wr_id, e)) => {
            shared.traffic.bad_wqe();
            env.sink
                .complete(&[error_wc(shared, shared.send_cq, *wr_id, *e)]);
            if shared.qp_type == QpType::Rc {
                move_to_error(shared, env);
            }
            Posted::Done
        }
    }
}

/// Posts what an earlier pass could not, in order, until one is not taken.
fn post_leftovers<T>(left: &mut VecDeque<T>, mut handle: impl FnMut(&T) -> Posted) -> Stop {
    while let Some(f) = left.front() {
        match handle(f) {
            Posted::Done => {}
            p => return Some(p),
        }
        left.pop_front();
    }
    None
}

/// Per-thread buffers for a batch of fetched WRs (a few KiB per worker thread rather than per
/// QP, and no initialisation per drain).
#[derive(Default)]
struct Scratch {
    send: Vec<SendWr>,
    recv: Vec<RecvWr>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// A receive WR that is never posted: the place of a malformed one in a batch.
const NO_RECV: RecvWr = RecvWr {
    wr_id: 0,
    sges: rdma_backend::SgeList::EMPTY,
};

/// A send WR that is never posted: the place of a malformed one in a batch.
const NO_SEND: SendWr = SendWr {
    wr_id: 0,
    op: rdma_backend::SendOp::Send { imm: None },
    sges: rdma_backend::SgeList::EMPTY,
    signaled: false,
    solicited: false,
    ud: None,
};

/// Takes up to [`BATCH`] WQEs off `ring` (at most `limit`): reads each with `fetch` straight
/// into its place in `good` (sized to [`BATCH`] with `filler` on first use; for one that
/// completes in error, the error goes to `bad`), then gives their slots back at once. Returns
/// how many, and whether the WQE after them could not be read (the queue is broken: those
/// before it are still executed); `None` when the ring's indices are unusable.
fn take_batch<W: Clone, E>(
    ring: &ConsumerRing,
    mem: &(impl GuestMemory + ?Sized),
    limit: u32,
    good: &mut Vec<W>,
    bad: &mut [Option<E>; BATCH],
    filler: &W,
    mut fetch: impl FnMut(u32, &mut W) -> Option<Result<(), E>>,
) -> Option<(usize, bool)> {
    let avail = ring.available(mem).ok()?;
    let want = avail.min(limit).min(BATCH as u32) as usize;
    if good.len() < BATCH {
        good.resize(BATCH, filler.clone());
    }
    let mut k = 0;
    for (wr, bad) in good.iter_mut().zip(bad.iter_mut()).take(want) {
        match fetch(ring.slot_ahead(k as u32), wr) {
            Some(r) => *bad = r.err(),
            None => break,
        }
        k += 1;
    }
    ring.advance_by(mem, k as u32).ok()?;
    Some((k, k < want))
}

/// Posts a fetched batch in order: runs of good WRs through `post_run` (returns how many it
/// took and, if not all, why the next was not taken), bad ones through `handle_bad`. What is not
/// taken yet stays in `left`.
fn post_batch<W: Clone, E: Copy>(
    good: &[W],
    bad: &[Option<E>; BATCH],
    k: usize,
    left: &mut VecDeque<Result<W, E>>,
    mut post_run: impl FnMut(&[W]) -> (usize, rdma_backend::Result<()>),
    mut handle_bad: impl FnMut(E),
) -> Stop {
    let mut j = 0;
    while j < k {
        if let Some(e) = bad[j] {
            handle_bad(e);
            j += 1;
            continue;
        }
        let end = (j..k).find(|&i| bad[i].is_some()).unwrap_or(k);
        let (taken, r) = post_run(&good[j..end]);
        j += taken.min(end - j);
        if j < end {
            let p = match r {
                Err(_) => posted(r),
                // A backend that stops early must say why; treat silence as "later".
                Ok(()) => Posted::Later,
            };
            if let Posted::Later = p {
                left.extend((j..k).map(|i| bad[i].map_or_else(|| Ok(good[i].clone()), Err)));
            }
            return Some(p);
        }
    }
    None
}

/// How the drain of one queue ended.
enum QueueEnd {
    /// The ring is empty, or a ring's worth was taken.
    Done,
    /// The backend stopped taking WRs (`Later`: stalled) or the QP is gone.
    Stop(Posted),
    /// The ring's indices or a WQE cannot be read.
    Broken,
    /// The QP is being destroyed.
    Dead,
}

/// Runs `f` with this thread's batch buffers.
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        // Not reached (drains do not nest on a thread); fresh buffers keep it correct anyway.
        Err(_) => f(&mut Scratch::default()),
    })
}

/// Drains one ring in batches, at most a ring's worth: WQEs read with `fetch` and given back,
/// good WRs posted in runs with `post_run`, bad ones completed with `handle_bad`; what the
/// backend does not take stays in `left`.
#[allow(clippy::too_many_arguments)]
fn drain_ring<W: Clone, E: Copy>(
    ring: &ConsumerRing,
    dead: &AtomicBool,
    mem: &(impl GuestMemory + ?Sized),
    out: &mut Drained,
    left: &mut VecDeque<Result<W, E>>,
    good: &mut Vec<W>,
    filler: W,
    mut fetch: impl FnMut(u32, &mut W) -> Option<Result<(), E>>,
    mut post_run: impl FnMut(&[W]) -> (usize, rdma_backend::Result<()>),
    mut handle_bad: impl FnMut(E),
) -> QueueEnd {
    let mut bad = [None; BATCH];
    let n = ring.ring().n;
    let mut taken = 0;
    while taken < n {
        if dead.load(Ordering::Acquire) {
            return QueueEnd::Dead;
        }
        let Some((k, broken)) =
            take_batch(ring, mem, n - taken, good, &mut bad, &filler, &mut fetch)
        else {
            return QueueEnd::Broken;
        };
        if k == 0 && !broken {
            break;
        }
        taken += k as u32;
        out.consumed += k as u32;
        if let Some(p) = post_batch(good, &bad, k, left, &mut post_run, &mut handle_bad) {
            return QueueEnd::Stop(p);
        }
        if broken {
            return QueueEnd::Broken;
        }
    }
    QueueEnd::Done
}

/// The receive half of [`drain_qp`]; `false` when the QP's drain must stop here (a stalled
/// receive queue is not a reason).
fn drain_rq(
    shared: &QpShared,
    env: &Env,
    mem: &(impl GuestMemory + ?Sized),
    rq: &WorkQueue,
    left: &mut VecDeque<FetchedRecv>,
    out: &mut Drained,
) -> bool {
    let end = match post_leftovers(left, |f| handle_recv(shared, env, f)) {
        Some(p) => QueueEnd::Stop(p),
        None => with_scratch(|s| {
            drain_ring(
                &rq.ring,
                &shared.dead,
                mem,
                out,
                left,
                &mut s.recv,
                NO_RECV,
                |slot, wr| fetch_recv_into(&shared.pdir, mem, rq, slot, wr),
                |run| env.backend.post_recv_batch(shared.backend_qp, run),
                |wr_id| {
                    handle_recv(shared, env, &Err(wr_id));
                },
            )
        }),
    };
    match end {
        QueueEnd::Done => true,
        QueueEnd::Stop(Posted::Later) => {
            out.stalled = true;
            true
        }
        QueueEnd::Stop(_) | QueueEnd::Dead => false,
        QueueEnd::Broken => {
            out.ring_error = true;
            false
        }
    }
}

/// The send half of [`drain_qp`].
fn drain_sq(
    shared: &QpShared,
    env: &Env,
    mem: &(impl GuestMemory + ?Sized),
    left: &mut VecDeque<FetchedSend>,
    out: &mut Drained,
) {
    let sq = &shared.sq;
    let end = match post_leftovers(left, |f| handle_send(shared, env, f)) {
        Some(p) => QueueEnd::Stop(p),
        // cons_head advances for every WQE, signaled or not, failed or not (spec §7).
        None => with_scratch(|s| {
            drain_ring(
                &sq.ring,
                &shared.dead,
                mem,
                out,
                left,
                &mut s.send,
                NO_SEND,
                |slot, wr| {
                    let kind = shared.sq_kind();
                    fetch_send_into(&shared.pdir, mem, sq, slot, kind, &shared.traffic, wr)
                },
                |run| env.backend.post_send_batch(shared.backend_qp, run),
                |e| {
                    handle_send(shared, env, &Err(e));
                },
            )
        }),
    };
    match end {
        QueueEnd::Stop(p) => out.stalled = matches!(p, Posted::Later),
        QueueEnd::Broken => out.ring_error = true,
        QueueEnd::Done | QueueEnd::Dead => {}
    }
}

fn move_to_error(shared: &QpShared, env: &Env) {
    let attrs = rdma_backend::QpAttrs {
        state: Some(rdma_backend::QpState::Err),
        ..Default::default()
    };
    if let Err(e) = env.backend.modify_qp(shared.backend_qp, &attrs) {
        log::debug!("moving QP to ERR after a bad WQE failed: {e}");
    }
}

/// Drains an SRQ into the backend (fetch, give the slot back, post; see [`drain_qp`]).
pub(crate) fn drain_srq(shared: &SrqShared, env: &Env) -> Drained {
    let mem = env.mem.memory();
    let mut out = Drained::default();
    let Ok(mut pending) = shared.pending.lock() else {
        out.ring_error = true;
        return out;
    };
    if let Some(wr) = pending.take() {
        match posted(env.backend.post_srq_recv(shared.backend_srq, &wr)) {
            Posted::Done => {}
            Posted::Later => {
                *pending = Some(wr);
                out.stalled = true;
                return out;
            }
            Posted::Gone => return out,
        }
    }
    let rq = &shared.rq;
    while out.consumed < rq.ring.ring().n {
        if shared.dead.load(Ordering::Acquire) {
            break;
        }
        let slot = match rq.ring.peek(&*mem) {
            Ok(Some(s)) => s,
            Ok(None) => break,
            Err(_) => {
                out.ring_error = true;
                break;
            }
        };
        let Some(fetched) = fetch_recv(&shared.pdir, &*mem, rq, slot) else {
            out.ring_error = true;
            break;
        };
        if rq.ring.advance(&*mem).is_err() {
            out.ring_error = true;
            break;
        }
        out.consumed += 1;
        match fetched {
            Ok(wr) => match posted(env.backend.post_srq_recv(shared.backend_srq, &wr)) {
                Posted::Done => {}
                Posted::Later => {
                    *pending = Some(wr);
                    out.stalled = true;
                    break;
                }
                Posted::Gone => break,
            },
            Err(n) => {
                // There is no QP yet to complete it against: skip the WQE and report SRQ_ERR.
                log::debug!("SRQ WQE {n:#x} with too many SGEs skipped");
                out.malformed += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
