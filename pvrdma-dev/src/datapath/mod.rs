//! The data path: draining guest work queues on worker threads into the backend, and turning
//! backend completions into CQEs, CQ notifications and interrupts on the main loop.

pub(crate) mod cq;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod wqe;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rdma_backend::{
    Backend, CompletionSink, CqId, Error as BackendError, GuestMem, QpId, QpType, RecvWr, SendWr,
    SrqId, WcStatus, WorkCompletion,
};
use vm_memory::{Address, GuestAddressSpace, GuestMemory};

use crate::abi::{RqWqeHdr, SqWqeHdr, WireSge, RQ_WQE_HDR_SIZE, SGE_SIZE, SQ_WQE_HDR_SIZE};
use crate::pdir::{PageDir, PAGE_SIZE};
use crate::ring::{ConsumerRing, RingAddr};

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
    pub pdir: PageDir,
    pub sq: WorkQueue,
    /// `None` when the QP uses an SRQ.
    pub rq: Option<WorkQueue>,
    pub sq_sig_all: bool,
    /// Set on the main loop before the QP is destroyed or the device reset: workers stop.
    pub dead: AtomicBool,
    /// WRs fetched but not yet taken by the backend (only its one worker touches it).
    pub pending: std::sync::Mutex<Pending>,
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
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("backend", &self.backend.name())
            .finish()
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

/// Reads the SGEs of a WQE, bounded by `max_sge` (the QP's own maximum).
fn read_sges<M: GuestMemory + ?Sized>(
    pdir: &PageDir,
    mem: &M,
    off: u64,
    num_sge: usize,
) -> Option<[WireSge; rdma_backend::MAX_SGE]> {
    let mut sges = [WireSge::default(); rdma_backend::MAX_SGE];
    for (i, s) in sges.iter_mut().enumerate().take(num_sge) {
        *s = pdir
            .read_obj(mem, off + (i as u64) * u64::from(SGE_SIZE))
            .ok()?;
    }
    Some(sges)
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
        src_qp: 0,
        grh: false,
        solicited: false,
    }
}

/// A WR fetched from a ring (its slot already given back) that the backend could not take yet.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    send: Option<SendWr>,
    recv: Option<RecvWr>,
}

impl QpShared {
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
            Ok(p) => p.send.is_some() || p.recv.is_some(),
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

/// Reads the receive WQE in `slot` (header and SGEs) into local memory.
fn fetch_recv<M: GuestMemory + ?Sized>(
    pdir: &PageDir,
    mem: &M,
    rq: &WorkQueue,
    slot: u32,
) -> Option<Result<RecvWr, u64>> {
    let off = rq.wqe_offset(slot);
    let hdr: RqWqeHdr = pdir.read_obj(mem, off).ok()?;
    let Some(n) = wqe::checked_num_sge(hdr.num_sge, rq.max_sge) else {
        return Some(Err(hdr.wr_id));
    };
    let sges = read_sges(pdir, mem, off + u64::from(RQ_WQE_HDR_SIZE), n)?;
    Some(Ok(wqe::parse_recv(&hdr, &sges[..n])))
}

/// Reads the send WQE in `slot` (header and SGEs) into local memory and parses it. `None` when
/// the WQE cannot be read (the queue is broken); `Err((wr_id, error))` when it completes in error.
pub(crate) fn fetch_send<M: GuestMemory + ?Sized>(
    pdir: &PageDir,
    mem: &M,
    sq: &WorkQueue,
    slot: u32,
    qp_type: QpType,
    sq_sig_all: bool,
) -> Option<Result<SendWr, (u64, wqe::WqeError)>> {
    let off = sq.wqe_offset(slot);
    let hdr: SqWqeHdr = pdir.read_obj(mem, off).ok()?;
    let parsed = match wqe::checked_num_sge(hdr.num_sge, sq.max_sge) {
        None => Err(wqe::WqeError {
            status: WcStatus::LocLenErr,
            opcode: wqe::wc_opcode_of(hdr.opcode),
        }),
        Some(n) => {
            let sges = read_sges(pdir, mem, off + u64::from(SQ_WQE_HDR_SIZE), n)?;
            wqe::parse_send(&hdr, &sges[..n], qp_type, sq_sig_all)
        }
    };
    Some(parsed.map_err(|e| (hdr.wr_id, e)))
}

/// Drains a QP's receive queue, then its send queue, into the backend. Bounded: at most one
/// ring's worth of WQEs per queue per pass, so a guest that keeps producing cannot pin a worker.
///
/// A WQE is copied out of the ring and its slot given back (`cons_head` advanced) before the
/// backend executes it, as an HCA fetches WQEs: the guest may reuse the slot as soon as the work
/// is under way (perftest's latency tests with a queue depth of 1 depend on it). A WR the backend
/// cannot take yet is kept in [`Pending`] and posted first on the next pass.
pub(crate) fn drain_qp(shared: &QpShared, env: &Env) -> Drained {
    let mem = env.mem.memory();
    let mut out = Drained::default();
    let Ok(mut pending) = shared.pending.lock() else {
        out.ring_error = true;
        return out;
    };
    if let Some(rq) = &shared.rq {
        if let Some(wr) = pending.recv.take() {
            match posted(env.backend.post_recv(shared.backend_qp, &wr)) {
                Posted::Done => {}
                Posted::Later => {
                    pending.recv = Some(wr);
                    out.stalled = true;
                }
                Posted::Gone => return out,
            }
        }
        while !out.stalled && out.consumed < rq.ring.ring().n {
            if shared.dead.load(Ordering::Acquire) {
                return out;
            }
            let slot = match rq.ring.peek(&*mem) {
                Ok(Some(s)) => s,
                Ok(None) => break,
                Err(_) => {
                    out.ring_error = true;
                    return out;
                }
            };
            let Some(fetched) = fetch_recv(&shared.pdir, &*mem, rq, slot) else {
                out.ring_error = true;
                return out;
            };
            if rq.ring.advance(&*mem).is_err() {
                out.ring_error = true;
                return out;
            }
            out.consumed += 1;
            match fetched {
                Ok(wr) => match posted(env.backend.post_recv(shared.backend_qp, &wr)) {
                    Posted::Done => {}
                    Posted::Later => {
                        pending.recv = Some(wr);
                        out.stalled = true;
                    }
                    Posted::Gone => return out,
                },
                Err(wr_id) => {
                    // A malformed receive cannot be posted; it completes in error and the QP
                    // moves to ERR, which flushes the rest (IB: local QP operation error).
                    let e = wqe::WqeError {
                        status: WcStatus::LocLenErr,
                        opcode: rdma_backend::WcOpcode::Recv,
                    };
                    env.sink
                        .complete(&[error_wc(shared, shared.send_cq, wr_id, e)]);
                    move_to_error(shared, env);
                }
            }
        }
    }
    let sq = &shared.sq;
    if let Some(wr) = pending.send.take() {
        match posted(env.backend.post_send(shared.backend_qp, &wr)) {
            Posted::Done => {}
            Posted::Later => {
                pending.send = Some(wr);
                out.stalled = true;
                return out;
            }
            Posted::Gone => return out,
        }
    }
    let mut sent = 0;
    while sent < sq.ring.ring().n {
        if shared.dead.load(Ordering::Acquire) {
            return out;
        }
        let slot = match sq.ring.peek(&*mem) {
            Ok(Some(s)) => s,
            Ok(None) => break,
            Err(_) => {
                out.ring_error = true;
                return out;
            }
        };
        let Some(parsed) = fetch_send(
            &shared.pdir,
            &*mem,
            sq,
            slot,
            shared.qp_type,
            shared.sq_sig_all,
        ) else {
            out.ring_error = true;
            return out;
        };
        // cons_head advances for every WQE, signaled or not, failed or not (spec §7).
        if sq.ring.advance(&*mem).is_err() {
            out.ring_error = true;
            return out;
        }
        out.consumed += 1;
        sent += 1;
        match parsed {
            Ok(wr) => match posted(env.backend.post_send(shared.backend_qp, &wr)) {
                Posted::Done => {}
                Posted::Later => {
                    pending.send = Some(wr);
                    out.stalled = true;
                    return out;
                }
                Posted::Gone => return out,
            },
            Err((wr_id, e)) => {
                env.sink
                    .complete(&[error_wc(shared, shared.send_cq, wr_id, e)]);
                if shared.qp_type == QpType::Rc {
                    move_to_error(shared, env);
                }
            }
        }
    }
    out
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
