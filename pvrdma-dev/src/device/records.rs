//! The device's records of guest objects, and the tables that hold them.

use super::*;

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
    pub refs: u32,
    /// Bytes reserved against the host-memory budget.
    pub cost: u64,
}

#[derive(Debug)]
pub(crate) struct Mr {
    pub pd: u32,
    pub backend: MrId,
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
    pub refs: u32,
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
    pub refs: u32,
    /// Bytes reserved against the host-memory budget.
    pub cost: u64,
}

#[derive(Debug)]
pub(crate) struct Qp {
    pub pd: u32,
    pub gen: u32,
    pub qp_type: QpType,
    pub send_cq: u32,
    pub recv_cq: u32,
    pub srq: Option<u32>,
    pub attrs: QpAttr,
    pub shared: Arc<QpShared>,
    pub sched: Sched,
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

/// The object tables sized from the configuration.
pub(crate) struct Tables {
    pub(super) ucs: HandleTable<Uc>,
    pub(super) pds: HandleTable<Pd>,
    pub(super) mrs: HandleTable<Mr>,
    pub(super) cqs: HandleTable<Cq>,
    pub(super) qps: HandleTable<Qp>,
    pub(super) srqs: HandleTable<Srq>,
}

impl Tables {
    pub(super) fn new(cfg: &DeviceConfig) -> Tables {
        Tables {
            // User contexts are non-zero so CQs with ctx 0 are the kernel's (spec §8).
            ucs: HandleTable::new(1, cfg.max_uar),
            pds: HandleTable::new(1, cfg.max_pd.saturating_add(1)),
            mrs: HandleTable::new(1, cfg.max_mr.saturating_add(1)),
            cqs: HandleTable::new(1, cfg.max_cq),
            // QP handles are never 0 and stay below max_qp (spec §0.5).
            qps: HandleTable::new(1, cfg.max_qp),
            srqs: HandleTable::new(1, cfg.max_srq),
        }
    }
}
