//! Reading WQEs out of guest memory: one read per WQE (header and SGEs) through the queue's
//! page directory, parsed in place into the WR the backend takes.

use super::*;
use crate::stats::QpTraffic;

/// Bytes read per WQE at most: a send header and [`rdma_backend::MAX_SGE`] SGEs.
const MAX_WQE_READ: usize = (SQ_WQE_HDR_SIZE + SGE_SIZE * rdma_backend::MAX_SGE as u32) as usize;

/// Bytes read per WQE of a queue with at most [`FEW_SGES`] SGEs (the common case; a smaller
/// buffer to clear).
const FEW_SGES: u32 = 2;
const FEW_WQE_READ: usize = (SQ_WQE_HDR_SIZE + SGE_SIZE * FEW_SGES) as usize;

/// A WQE copied out of guest memory in one read: its header and the queue's `max_sge` SGEs
/// (all inside the WQE's slot, which is at least that big), or as much of them as the queue's
/// pages hold. `N` bytes of buffer: [`FEW_WQE_READ`] or [`MAX_WQE_READ`].
struct WqeBytes<const N: usize> {
    buf: [u8; N],
    hdr_size: usize,
    len: usize,
}

impl<const N: usize> WqeBytes<N> {
    /// `None` when not even the header can be read. Inlined so the buffer is built in its
    /// caller's frame rather than copied out.
    #[inline(always)]
    fn read<M: GuestMemory + ?Sized>(
        pdir: &PageDir,
        mem: &M,
        q: &WorkQueue,
        slot: u32,
        hdr_size: u32,
    ) -> Option<Self> {
        let off = q.wqe_offset(slot);
        let max_sge = (q.max_sge as usize).min(rdma_backend::MAX_SGE);
        let in_pages = pdir.byte_len().saturating_sub(off);
        let len = (hdr_size as usize + max_sge * SGE_SIZE as usize)
            .min(usize::try_from(in_pages).unwrap_or(usize::MAX));
        if len < hdr_size as usize {
            return None;
        }
        let mut w = WqeBytes {
            buf: [0; N],
            hdr_size: hdr_size as usize,
            len,
        };
        pdir.read_at(mem, off, w.buf.get_mut(..len)?).ok()?;
        Some(w)
    }

    /// The header (`T` is exactly the queue's header size; a constant-size copy).
    fn hdr<T: ByteValued>(&self) -> T {
        let mut h = T::zeroed();
        if let Some(b) = self.buf.get(..std::mem::size_of::<T>()) {
            h.as_mut_slice().copy_from_slice(b);
        }
        h
    }

    /// Decodes the first `n` SGEs (`n` checked against the queue's `max_sge` by the caller)
    /// straight from the WQE's bytes (little-endian, spec §7) into `out`; returns the bytes
    /// they list, or `None` when they run past the queue's pages.
    fn sges_into(&self, n: usize, out: &mut SgeList) -> Option<u64> {
        let end = self.hdr_size + n * SGE_SIZE as usize;
        let wire = self
            .buf
            .get(self.hdr_size..end)
            .filter(|_| end <= self.len)?;
        out.clear();
        let mut bytes = 0u64;
        for b in wire.chunks_exact(SGE_SIZE as usize) {
            let (addr, rest) = b.split_at(8);
            let (length, lkey) = rest.split_at(4);
            let length = u32::from_le_bytes(length.try_into().ok()?);
            bytes += u64::from(length);
            out.push(Sge {
                addr: u64::from_le_bytes(addr.try_into().ok()?),
                length,
                lkey: u32::from_le_bytes(lkey.try_into().ok()?),
            });
        }
        Some(bytes)
    }
}

/// Reads the receive WQE in `slot` (header and SGEs) into `out`, in place (a WR is a few
/// hundred bytes: the batch buffer is written once, not built and copied). `None` when the
/// WQE cannot be read (the queue is broken); `Err(wr_id)` for a malformed one (`out` is then
/// partly written and must not be posted).
#[inline]
pub(super) fn fetch_recv_into<M: GuestMemory + ?Sized>(
    pdir: &PageDir,
    mem: &M,
    rq: &WorkQueue,
    slot: u32,
    out: &mut RecvWr,
) -> Option<Result<(), u64>> {
    if rq.max_sge <= FEW_SGES {
        recv_from::<FEW_WQE_READ, M>(pdir, mem, rq, slot, out)
    } else {
        recv_from::<MAX_WQE_READ, M>(pdir, mem, rq, slot, out)
    }
}

#[inline(always)]
fn recv_from<const N: usize, M: GuestMemory + ?Sized>(
    pdir: &PageDir,
    mem: &M,
    rq: &WorkQueue,
    slot: u32,
    out: &mut RecvWr,
) -> Option<Result<(), u64>> {
    let w = WqeBytes::<N>::read(pdir, mem, rq, slot, RQ_WQE_HDR_SIZE)?;
    let hdr: RqWqeHdr = w.hdr();
    let Some(n) = wqe::checked_num_sge(hdr.num_sge, rq.max_sge) else {
        return Some(Err(hdr.wr_id));
    };
    w.sges_into(n, &mut out.sges)?;
    out.wr_id = hdr.wr_id;
    Some(Ok(()))
}

/// [`fetch_recv_into`] into a fresh WR.
pub(super) fn fetch_recv<M: GuestMemory + ?Sized>(
    pdir: &PageDir,
    mem: &M,
    rq: &WorkQueue,
    slot: u32,
) -> Option<Result<RecvWr, u64>> {
    let mut wr = NO_RECV;
    Some(fetch_recv_into(pdir, mem, rq, slot, &mut wr)?.map(|()| wr))
}

/// Reads the send WQE in `slot` (header and SGEs) and parses it into `out`, in place, and
/// counts it in `traffic`. `None` when the WQE cannot be read (the queue is broken);
/// `Err((wr_id, error))` when it completes in error (`out` is then partly written and must not
/// be posted; the caller counts it).
#[inline]
pub(super) fn fetch_send_into<M: GuestMemory + ?Sized>(
    pdir: &PageDir,
    mem: &M,
    sq: &WorkQueue,
    slot: u32,
    kind: wqe::SqKind,
    traffic: &QpTraffic,
    out: &mut SendWr,
) -> Option<Result<(), (u64, wqe::WqeError)>> {
    if sq.max_sge <= FEW_SGES {
        send_from::<FEW_WQE_READ, M>(pdir, mem, sq, slot, kind, traffic, out)
    } else {
        send_from::<MAX_WQE_READ, M>(pdir, mem, sq, slot, kind, traffic, out)
    }
}

#[inline(always)]
fn send_from<const N: usize, M: GuestMemory + ?Sized>(
    pdir: &PageDir,
    mem: &M,
    sq: &WorkQueue,
    slot: u32,
    kind: wqe::SqKind,
    traffic: &QpTraffic,
    out: &mut SendWr,
) -> Option<Result<(), (u64, wqe::WqeError)>> {
    let w = WqeBytes::<N>::read(pdir, mem, sq, slot, SQ_WQE_HDR_SIZE)?;
    let hdr: SqWqeHdr = w.hdr();
    let parsed = match wqe::checked_num_sge(hdr.num_sge, sq.max_sge) {
        None => Err(wqe::WqeError {
            status: WcStatus::LocLenErr,
            opcode: wqe::wc_opcode_of(hdr.opcode, kind.fast_reg_pages > 0),
        }),
        Some(n) => {
            let bytes = w.sges_into(n, &mut out.sges)?;
            let r = wqe::parse_send(&hdr, kind, mem, out);
            if r.is_ok() {
                traffic.sent(hdr.opcode, bytes);
            }
            r
        }
    };
    Some(parsed.map_err(|e| (hdr.wr_id, e)))
}

/// [`fetch_send_into`] into a fresh WR.
pub(crate) fn fetch_send<M: GuestMemory + ?Sized>(
    pdir: &PageDir,
    mem: &M,
    sq: &WorkQueue,
    slot: u32,
    kind: wqe::SqKind,
) -> Option<Result<SendWr, (u64, wqe::WqeError)>> {
    let mut wr = NO_SEND;
    let r = fetch_send_into(pdir, mem, sq, slot, kind, &QpTraffic::default(), &mut wr)?;
    Some(r.map(|()| wr))
}
