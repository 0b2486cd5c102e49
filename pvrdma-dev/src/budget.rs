//! What the device's objects may cost the host, counted against the device's budget
//! ([`DeviceConfig::max_host_mem`]).
//!
//! Host memory the device allocates on a guest's behalf is reserved when the object that can
//! hold it is created, at its most: a QP or SRQ reserves room for every WR its queues can
//! hold with their largest SGE lists (as the backend reports them,
//! [`rdma_backend::Backend::queued_wr_bytes`]), its page directory, its retry timer and its
//! part of the device's batches; an MR its page list; a CQ its page directory. A create that
//! would pass the budget fails with ENOMEM; a destroy or a reset gives the reservation back.
//! Nothing is counted on the data path: a guest that fills every queue it has holds at most
//! what it reserved, however it aliases pages or stalls its peers. A PD reserves what its
//! backend keeps for it ([`rdma_backend::Backend::pd_bytes`]: the rdma-core backend registers
//! all of guest RAM again per PD). User contexts and GID entries are a few dozen bytes each and
//! bounded by their counts (`max_uar`, `gid_tbl_len`).
//!
//! [`DeviceConfig::max_host_mem`]: crate::DeviceConfig::max_host_mem

use rdma_backend::Backend;

/// A QP besides its queued WRs and page directory: the device's record and shared state, a
/// batch of WQEs fetched and not yet taken (16 of each kind), the backend's QP, its retry
/// timers and its place in the ready list.
pub(crate) const QP_FIXED: u64 = 24 << 10;
/// An SRQ besides its queued WRs and page directory.
pub(crate) const SRQ_FIXED: u64 = 4 << 10;
/// A CQ besides its page directory.
pub(crate) const CQ_FIXED: u64 = 1 << 10;
/// An MR besides its page list.
pub(crate) const MR_FIXED: u64 = 512;
/// One page of a page directory or an MR's page list (its guest address, and the allocator's
/// share).
pub(crate) const PER_PAGE: u64 = 8;

/// A QP's send queue, as far as its cost goes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SendQueue {
    pub wr: u32,
    pub sge: u32,
    /// Pages a fast registration on it may list (0: none): each queued FAST_REG WR holds
    /// its page list.
    pub fast_reg_pages: u32,
}

/// What a QP with these queues reserves (`recv_wr` 0 for a QP on an SRQ).
pub(crate) fn qp(be: &dyn Backend, sq: SendQueue, recv_wr: u32, recv_sge: u32, pages: u64) -> u64 {
    let page_list = match sq.fast_reg_pages {
        0 => 0,
        n => ARC_HEADER + u64::from(n) * PER_PAGE,
    };
    QP_FIXED
        + pages * PER_PAGE
        + u64::from(sq.wr) * (be.queued_wr_bytes(true, sq.sge) + page_list)
        + u64::from(recv_wr) * be.queued_wr_bytes(false, recv_sge)
}

/// The counts in front of a shared page list.
const ARC_HEADER: u64 = 16;

/// What an SRQ reserves.
pub(crate) fn srq(be: &dyn Backend, wr: u32, sge: u32, pages: u64) -> u64 {
    SRQ_FIXED + pages * PER_PAGE + u64::from(wr) * be.queued_wr_bytes(false, sge)
}

/// What a PD reserves (what its backend keeps for it).
pub(crate) fn pd(be: &dyn Backend) -> u64 {
    be.pd_bytes()
}

/// What a CQ reserves.
pub(crate) fn cq(pages: u64) -> u64 {
    CQ_FIXED + pages * PER_PAGE
}

/// What an MR reserves.
pub(crate) fn mr(pages: u64) -> u64 {
    MR_FIXED + pages * PER_PAGE
}

/// The device's account: bytes reserved against its budget.
#[derive(Debug, Default)]
pub(crate) struct Account {
    reserved: u64,
}

/// A reservation would pass the budget.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("host memory budget: {need} more bytes with {reserved} of {limit} reserved")]
pub struct OverBudget {
    /// Bytes asked for.
    pub need: u64,
    /// Bytes reserved already.
    pub reserved: u64,
    /// The budget.
    pub limit: u64,
}

impl Account {
    /// Whether `need` more bytes fit in `limit`.
    pub(crate) fn check(&self, need: u64, limit: u64) -> Result<(), OverBudget> {
        if self.reserved.saturating_add(need) > limit {
            return Err(OverBudget {
                need,
                reserved: self.reserved,
                limit,
            });
        }
        Ok(())
    }

    /// Reserves `bytes` (checked with [`Account::check`] first).
    pub(crate) fn reserve(&mut self, bytes: u64) {
        self.reserved = self.reserved.saturating_add(bytes);
    }

    /// Gives `bytes` back.
    pub(crate) fn release(&mut self, bytes: u64) {
        self.reserved = self.reserved.saturating_sub(bytes);
    }

    /// Everything given back (reset).
    pub(crate) fn clear(&mut self) {
        self.reserved = 0;
    }

    /// Bytes reserved.
    pub(crate) fn reserved(&self) -> u64 {
        self.reserved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stop_at_the_limit_and_come_back() {
        let mut a = Account::default();
        assert!(a.check(100, 100).is_ok());
        a.reserve(60);
        assert_eq!(
            a.check(41, 100),
            Err(OverBudget {
                need: 41,
                reserved: 60,
                limit: 100
            })
        );
        a.release(60);
        assert!(a.check(100, 100).is_ok());
        a.reserve(u64::MAX);
        assert!(a.check(1, u64::MAX - 1).is_err());
        a.clear();
        assert_eq!(a.reserved(), 0);
    }
}
