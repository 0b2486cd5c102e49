//! The device's records of guest objects, and their one owner.
//!
//! [`Objects`] holds every table (user contexts and their UAR pages, PDs, MRs, CQs, QPs, SRQs,
//! GID entries) and is the only place a record is added or removed: adding checks the
//! device's limits (the table's size, the host-memory budget, the MR page-list budget),
//! reserves the record's host memory and takes its references (a QP holds its PD, its CQs and
//! its SRQ; an MR or SRQ holds its PD); removing gives all of it back. A referenced object
//! cannot be removed (the caller checks [`Pd::refs`], [`Cq::refs`], [`Srq::refs`] first, as a
//! real HCA refuses to free what is in use).

use std::collections::HashMap;
use std::sync::Arc;

use rdma_backend::{CqId, MrId, PdId, QpId, QpType};

use crate::abi::{QpAttr, SrqAttr};
use crate::budget::{Account, OverBudget};
use crate::config::DeviceConfig;
use crate::datapath::cq::CqRing;
use crate::datapath::{QpShared, SrqShared};
use crate::resources::HandleTable;
use crate::stats::{CompletionCounts, SendTotals};

/// Why a record could not be added.
#[derive(Debug, thiserror::Error)]
pub enum NoRoom {
    /// Its table is full.
    #[error("out of {0}")]
    Full(&'static str),
    /// Its host memory would pass the device's budget.
    #[error(transparent)]
    OverBudget(#[from] OverBudget),
    /// Its page list would pass the device's MR page-list budget (`max_mr_pages`).
    #[error("out of the MR page-list budget")]
    MrPages,
}

/// Scheduling state of a queue drained by workers: one worker at a time, rerun if rung meanwhile.
#[derive(Debug, Default)]
pub(crate) struct Sched {
    pub busy: bool,
    pub again: bool,
    pub stalled: bool,
}

#[derive(Debug)]
pub(crate) struct Uc {
    pub uar_index: u32,
}

#[derive(Debug)]
pub(crate) struct Pd {
    pub ctx: u32,
    pub backend: PdId,
    /// MRs, QPs and SRQs on this PD.
    pub refs: u32,
    /// Bytes reserved against the host-memory budget.
    pub cost: u64,
}

#[derive(Debug)]
pub(crate) struct Mr {
    pub pd: u32,
    pub backend: MrId,
    pub lkey: u32,
    pub rkey: u32,
    /// Start address as the guest sees it, and length (0 for the DMA and fast-register MRs).
    pub iova: u64,
    pub length: u64,
    /// Access flags as the guest gave them.
    pub access: u32,
    /// `"USER"`, `"DMA"` or `"FAST_REG"`.
    pub kind: &'static str,
    /// Pages its page list holds (counted against `max_mr_pages`).
    pub pages: u64,
    /// Bytes reserved against the host-memory budget.
    pub cost: u64,
}

#[derive(Debug)]
pub(crate) struct Cq {
    pub ctx: u32,
    pub backend: CqId,
    pub ring: CqRing,
    pub cqe: u32,
    /// QPs completing into this CQ (a QP with one CQ for both queues counts twice).
    pub refs: u32,
    /// CQEs written to it, and lost to it being full or unusable.
    pub cqes: u64,
    pub overflows: u64,
    /// Bytes reserved against the host-memory budget.
    pub cost: u64,
}

#[derive(Debug)]
pub(crate) struct Srq {
    pub pd: u32,
    pub gen: u32,
    pub attrs: SrqAttr,
    pub shared: Arc<SrqShared>,
    pub sched: Sched,
    /// QPs attached to this SRQ.
    pub refs: u32,
    /// Bytes reserved against the host-memory budget.
    pub cost: u64,
}

#[derive(Debug)]
pub(crate) struct Qp {
    pub pd: u32,
    pub gen: u32,
    /// Its QP number on the fabric.
    pub qpn: u32,
    pub qp_type: QpType,
    pub send_cq: u32,
    pub recv_cq: u32,
    pub srq: Option<u32>,
    pub attrs: QpAttr,
    pub shared: Arc<QpShared>,
    pub sched: Sched,
    /// Counts of the completions written for it (the send side's are in `shared`).
    pub completions: CompletionCounts,
    /// Bytes reserved against the host-memory budget.
    pub cost: u64,
}

impl Qp {
    pub(crate) fn backend(&self) -> QpId {
        self.shared.backend_qp
    }
}

/// The cookie of an object the backend knows: its handle and generation (the high half).
pub(crate) fn cookie(handle: u32, gen: u32) -> u64 {
    (u64::from(gen) << 32) | u64::from(handle)
}

/// The handle and generation of a [`cookie`].
pub(crate) fn split_cookie(c: u64) -> (u32, u32) {
    (c as u32, (c >> 32) as u32)
}

/// The guest's objects on one device. The tables are readable by all; records are added and
/// removed only through the methods below.
pub(crate) struct Objects {
    pub ucs: HandleTable<Uc>,
    /// UAR page index → the user context that owns it.
    pub uar_owner: HashMap<u32, u32>,
    pub pds: HandleTable<Pd>,
    pub mrs: HandleTable<Mr>,
    pub cqs: HandleTable<Cq>,
    pub qps: HandleTable<Qp>,
    pub srqs: HandleTable<Srq>,
    /// GID table entries bound by the guest: the GID and its type.
    pub gids: Vec<Option<([u8; 16], u8)>>,
    /// Pages listed by all user MRs.
    mr_pages: u64,
    max_mr_pages: u64,
    /// Host memory reserved by the records.
    host_mem: Account,
    max_host_mem: u64,
    /// Generation counter for objects (cookie high half).
    next_gen: u32,
    /// Send-side counts of the QPs removed, so the device's totals keep them.
    retired: SendTotals,
}

impl Objects {
    /// Empty tables sized from the configuration.
    pub(crate) fn new(cfg: &DeviceConfig) -> Objects {
        Objects {
            // User contexts are non-zero so CQs with ctx 0 are the kernel's (spec §8).
            ucs: HandleTable::new(1, cfg.max_uar),
            uar_owner: HashMap::new(),
            pds: HandleTable::new(1, cfg.max_pd.saturating_add(1)),
            mrs: HandleTable::new(1, cfg.max_mr.saturating_add(1)),
            cqs: HandleTable::new(1, cfg.max_cq),
            // QP handles are never 0 and stay below max_qp (spec §0.5).
            qps: HandleTable::new(1, cfg.max_qp),
            srqs: HandleTable::new(1, cfg.max_srq),
            gids: vec![None; cfg.gid_tbl_len as usize],
            mr_pages: 0,
            max_mr_pages: cfg.max_mr_pages,
            host_mem: Account::default(),
            max_host_mem: cfg.max_host_mem,
            next_gen: 1,
            retired: SendTotals::default(),
        }
    }

    /// Every record gone (device reset); generations keep counting, so a cookie of before
    /// never matches an object of after.
    pub(crate) fn clear(&mut self) {
        for (_, qp) in self.qps.iter() {
            self.retired.add(&qp.shared.traffic);
        }
        self.qps.clear();
        self.srqs.clear();
        self.cqs.clear();
        self.mrs.clear();
        self.pds.clear();
        self.ucs.clear();
        self.uar_owner.clear();
        self.gids.iter_mut().for_each(|g| *g = None);
        self.mr_pages = 0;
        self.host_mem.clear();
    }

    /// A fresh generation for a QP's or SRQ's cookie (never 0).
    pub(crate) fn new_gen(&mut self) -> u32 {
        let g = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        g
    }

    /// The send-side counts of every QP there has been: those removed, and the live ones as
    /// far as their workers have got.
    pub(crate) fn send_totals(&self) -> SendTotals {
        let mut t = self.retired;
        for (_, qp) in self.qps.iter() {
            t.add(&qp.shared.traffic);
        }
        t
    }

    /// Host memory the records reserve, in bytes.
    pub(crate) fn host_mem(&self) -> u64 {
        self.host_mem.reserved()
    }

    /// Whether `cost` more bytes fit the host-memory budget.
    pub(crate) fn room(&self, cost: u64) -> Result<(), NoRoom> {
        Ok(self.host_mem.check(cost, self.max_host_mem)?)
    }

    /// Whether an MR of `pages` pages fits the MR page-list budget.
    pub(crate) fn room_for_mr_pages(&self, pages: u64) -> Result<(), NoRoom> {
        if self.mr_pages.saturating_add(pages) > self.max_mr_pages {
            return Err(NoRoom::MrPages);
        }
        Ok(())
    }

    /// The user context that owns UAR page `page` (0 = the kernel).
    pub(crate) fn page_ctx(&self, page: u32) -> Option<u32> {
        if page == 0 {
            Some(0)
        } else {
            self.uar_owner.get(&page).copied()
        }
    }

    /// The user context of PD `pd`.
    pub(crate) fn pd_ctx(&self, pd: u32) -> Option<u32> {
        self.pds.get(pd).map(|p| p.ctx)
    }

    /// Adds a user context owning UAR page `uar_index`.
    pub(crate) fn add_uc(&mut self, uar_index: u32) -> Result<u32, NoRoom> {
        let h = self
            .ucs
            .insert(Uc { uar_index })
            .ok_or(NoRoom::Full("user contexts"))?;
        self.uar_owner.insert(uar_index, h);
        Ok(h)
    }

    pub(crate) fn remove_uc(&mut self, h: u32) {
        if let Some(uc) = self.ucs.remove(h) {
            self.uar_owner.remove(&uc.uar_index);
        }
    }

    pub(crate) fn add_pd(&mut self, pd: Pd) -> Result<u32, NoRoom> {
        self.room(pd.cost)?;
        let cost = pd.cost;
        let h = self.pds.insert(pd).ok_or(NoRoom::Full("PDs"))?;
        self.host_mem.reserve(cost);
        Ok(h)
    }

    pub(crate) fn remove_pd(&mut self, h: u32) {
        if let Some(pd) = self.pds.remove(h) {
            self.host_mem.release(pd.cost);
        }
    }

    /// Adds an MR on its PD, counting its pages against the MR page-list budget.
    pub(crate) fn add_mr(&mut self, mr: Mr) -> Result<u32, NoRoom> {
        self.room_for_mr_pages(mr.pages)?;
        self.room(mr.cost)?;
        let (pd, pages, cost) = (mr.pd, mr.pages, mr.cost);
        let h = self.mrs.insert(mr).ok_or(NoRoom::Full("MRs"))?;
        self.mr_pages += pages;
        self.host_mem.reserve(cost);
        self.hold_pd(pd, true);
        Ok(h)
    }

    pub(crate) fn remove_mr(&mut self, h: u32) {
        if let Some(mr) = self.mrs.remove(h) {
            self.mr_pages = self.mr_pages.saturating_sub(mr.pages);
            self.host_mem.release(mr.cost);
            self.hold_pd(mr.pd, false);
        }
    }

    pub(crate) fn add_cq(&mut self, cq: Cq) -> Result<u32, NoRoom> {
        self.room(cq.cost)?;
        let cost = cq.cost;
        let h = self.cqs.insert(cq).ok_or(NoRoom::Full("CQs"))?;
        self.host_mem.reserve(cost);
        Ok(h)
    }

    pub(crate) fn remove_cq(&mut self, h: u32) {
        if let Some(cq) = self.cqs.remove(h) {
            self.host_mem.release(cq.cost);
        }
    }

    /// Adds an SRQ under `handle`, the handle its cookie was made with
    /// ([`HandleTable::next_handle`] when the command started), on its PD.
    pub(crate) fn add_srq(&mut self, handle: u32, srq: Srq) -> Result<(), NoRoom> {
        self.room(srq.cost)?;
        let (pd, cost) = (srq.pd, srq.cost);
        insert_at(&mut self.srqs, handle, srq, "SRQs")?;
        self.host_mem.reserve(cost);
        self.hold_pd(pd, true);
        Ok(())
    }

    pub(crate) fn remove_srq(&mut self, h: u32) {
        if let Some(srq) = self.srqs.remove(h) {
            self.host_mem.release(srq.cost);
            self.hold_pd(srq.pd, false);
        }
    }

    /// Adds a QP under `handle`, the handle its cookie was made with
    /// ([`HandleTable::next_handle`] when the command started), taking its PD, CQs and SRQ.
    pub(crate) fn add_qp(&mut self, handle: u32, qp: Qp) -> Result<(), NoRoom> {
        self.room(qp.cost)?;
        let (pd, cqs, srq, cost) = (qp.pd, [qp.send_cq, qp.recv_cq], qp.srq, qp.cost);
        insert_at(&mut self.qps, handle, qp, "QPs")?;
        self.host_mem.reserve(cost);
        self.hold_pd(pd, true);
        for c in cqs {
            if let Some(c) = self.cqs.get_mut(c) {
                c.refs += 1;
            }
        }
        if let Some(s) = srq.and_then(|s| self.srqs.get_mut(s)) {
            s.refs += 1;
        }
        Ok(())
    }

    /// Removes a QP, releasing its PD, CQs and SRQ.
    pub(crate) fn remove_qp(&mut self, h: u32) -> Option<Qp> {
        let qp = self.qps.remove(h)?;
        self.retired.add(&qp.shared.traffic);
        self.host_mem.release(qp.cost);
        self.hold_pd(qp.pd, false);
        for c in [qp.send_cq, qp.recv_cq] {
            if let Some(c) = self.cqs.get_mut(c) {
                c.refs = c.refs.saturating_sub(1);
            }
        }
        if let Some(s) = qp.srq.and_then(|s| self.srqs.get_mut(s)) {
            s.refs = s.refs.saturating_sub(1);
        }
        Some(qp)
    }

    fn hold_pd(&mut self, pd: u32, hold: bool) {
        if let Some(p) = self.pds.get_mut(pd) {
            p.refs = if hold {
                p.refs + 1
            } else {
                p.refs.saturating_sub(1)
            };
        }
    }
}

/// Inserts `value` into `table` under `handle` (the next free one when the command started;
/// taken meanwhile, the table answers full).
fn insert_at<T>(
    table: &mut HandleTable<T>,
    handle: u32,
    value: T,
    what: &'static str,
) -> Result<(), NoRoom> {
    match table.insert(value) {
        Some(h) if h == handle => Ok(()),
        Some(h) => {
            table.remove(h);
            Err(NoRoom::Full(what))
        }
        None => Err(NoRoom::Full(what)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::QP_FIXED;
    use crate::datapath::Pending;

    #[test]
    fn the_fixed_part_of_a_qp_covers_what_the_device_keeps_for_it() {
        // A full batch of each kind waiting for the backend, and the shared state.
        let batch = 16
            * (std::mem::size_of::<rdma_backend::SendWr>()
                + std::mem::size_of::<rdma_backend::RecvWr>());
        let device = std::mem::size_of::<QpShared>()
            + std::mem::size_of::<Pending>()
            + std::mem::size_of::<Qp>();
        // Half the fixed part is left for the backend's QP, timers and list entries.
        assert!(
            ((batch + device) as u64) < QP_FIXED / 2,
            "{batch} + {device}"
        );
    }

    #[test]
    fn a_handle_taken_meanwhile_reads_as_a_full_table() {
        let mut t = HandleTable::new(1, 4);
        let expected = t.next_handle().unwrap();
        t.insert(7u8).unwrap();
        assert!(matches!(
            insert_at(&mut t, expected, 8u8, "things"),
            Err(NoRoom::Full("things"))
        ));
        // Nothing of the refused insert stays.
        assert_eq!(t.len(), 1);
        let next = t.next_handle().unwrap();
        assert!(insert_at(&mut t, next, 9u8, "things").is_ok());
    }

    #[test]
    fn pds_stop_at_the_budget_and_give_it_back() {
        let cfg = DeviceConfig {
            max_host_mem: 1 << 20,
            ..DeviceConfig::default()
        };
        let mut o = Objects::new(&cfg);
        let pd = |cost| Pd {
            ctx: 0,
            backend: PdId(1),
            refs: 0,
            cost,
        };
        let a = o.add_pd(pd(600 << 10)).unwrap();
        assert!(matches!(
            o.add_pd(pd(600 << 10)),
            Err(NoRoom::OverBudget(_))
        ));
        assert_eq!(o.pds.len(), 1);
        o.remove_pd(a);
        assert_eq!(o.host_mem(), 0);
        o.add_pd(pd(600 << 10)).unwrap();
        o.clear();
        assert_eq!((o.host_mem(), o.pds.len()), (0, 0));
    }
}
