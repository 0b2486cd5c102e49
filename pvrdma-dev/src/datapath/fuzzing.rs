//! Entry points for the fuzz targets in `fuzz/` (not API; `#[doc(hidden)]`): the WQE fetch and
//! parse steps of the data path, without a backend or worker.

use rdma_backend::{QpType, RecvWr, SendWr, WcOpcode, WcStatus};
use vm_memory::GuestMemory;

use super::WorkQueue;
use crate::pdir::PageDir;

/// Where a fuzzed work queue lives: WQE `slot` is at `base + slot * wqe_size` in the pdir.
#[derive(Debug, Clone, Copy)]
pub struct Queue {
    /// Element count (a power of two; the ring state sits at offset 0 of page 0).
    pub n: u32,
    /// Byte offset of WQE 0 in the pdir.
    pub base: u64,
    /// Bytes per WQE.
    pub wqe_size: u32,
    /// The queue's own SGE limit.
    pub max_sge: u32,
}

fn work_queue(pdir: &PageDir, q: Queue) -> Option<WorkQueue> {
    WorkQueue::new(pdir, 0, q.n, q.base, q.wqe_size, q.max_sge)
}

/// Fetches and parses the send WQE in `slot` as `drain_qp` does: `None` where the drain would
/// put the ring in error, `Err((status, opcode))` where the WQE completes in error. A `kernel`
/// QP takes fast registration (page lists of up to 128 pages, read from `mem`) and
/// invalidation.
#[allow(clippy::type_complexity)]
pub fn fetch_send<M: GuestMemory + ?Sized>(
    pdir: &PageDir,
    mem: &M,
    q: Queue,
    slot: u32,
    qp_type: QpType,
    sq_sig_all: bool,
    kernel: bool,
) -> Option<Result<SendWr, (WcStatus, WcOpcode)>> {
    let sq = work_queue(pdir, q)?;
    let kind = super::wqe::SqKind {
        qp_type,
        sq_sig_all,
        fast_reg_pages: if kernel { 128 } else { 0 },
    };
    let r = super::fetch_send(pdir, mem, &sq, slot, kind)?;
    Some(r.map_err(|(_, e)| (e.status, e.opcode)))
}

/// Fetches and parses the receive WQE in `slot` as `drain_qp`/`drain_srq` do: `None` where
/// the drain would put the ring in error, `Err(wr_id)` for a malformed WQE.
pub fn fetch_recv<M: GuestMemory + ?Sized>(
    pdir: &PageDir,
    mem: &M,
    q: Queue,
    slot: u32,
) -> Option<Result<RecvWr, u64>> {
    let rq = work_queue(pdir, q)?;
    super::fetch_recv(pdir, mem, &rq, slot)
}
