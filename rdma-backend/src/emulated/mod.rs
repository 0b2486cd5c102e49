//! A software RDMA fabric.
//!
//! [`EmulatedBackend`]s attach to a shared [`Fabric`] and reach each other by GID (the entries
//! each one registers with [`Backend::add_gid`]); traffic to a backend's own GID loops back to
//! its own QPs. Work executes in the thread that posts it (the device's data-path worker): a
//! SEND copies straight from the sender's buffers into the responder's receive buffers. What is
//! left for later — a WR that has to wait (RNR, or an unreachable responder), or the rest of a
//! run that spent its budget — goes on in [`Backend::progress`], which the QP's own device calls
//! on one of its workers when the backend asks ([`CompletionSink::progress_needed`]): the
//! fabric's timer thread and a receive posted on another device only wake the queue (see the
//! `qp` module's "Bounded work").
//!
//! # Error completions (as a hardware HCA reports them)
//! | Cause | Requester | Responder |
//! |---|---|---|
//! | bad lkey / range / rights in a send WR | `LocProtErr`, QP → ERR | — |
//! | receive buffer too small (RC) | `RemInvReqErr`, QP → ERR | receive `LocLenErr`, QP → ERR |
//! | bad lkey in the receive WR (RC) | `RemOpErr`, QP → ERR | receive `LocProtErr`, QP → ERR |
//! | bad rkey / range / MR rights (RDMA, atomics) | `RemAccessErr`, QP → ERR | QP → ERR, `QpAccessErr` event |
//! | QP without the remote right; misaligned atomic | `RemInvReqErr`, QP → ERR | QP → ERR, `QpReqErr` event |
//! | no receive posted (RC) | retried; `RnrRetryExcErr` when exhausted | — |
//! | responder missing / not in RTR+ | retried; `RetryExcErr` when exhausted | — |
//! | UD: bad lkey / too long for the path MTU | `LocProtErr` / `LocLenErr`, QP → SQE | — |
//! | UD: qkey mismatch, no receive, no such QP | success (datagram dropped) | nothing |
//! | UD: receive buffer too small | success | receive `LocLenErr` |
//! | FAST_REG: MR not a free fast-register MR of the QP's PD, key bits beyond the low 8, pages past its room or short of the range, length 0, range wraps | `LocQpOpErr`, QP → ERR | — |
//! | LOCAL_INV: key names no mapped fast-register MR of the QP's PD | `LocQpOpErr`, QP → ERR | — |
//! | SEND with invalidate: rkey names no mapped fast-register MR of the responder's PD | `RemInvReqErr`, QP → ERR | receive `RemInvReqErr`, QP → ERR |
//!
//! Every other outstanding WR of a QP that went to ERR completes with `WrFlushErr`, and so does
//! every WR posted to it later. Posting a send to a QP in RESET, INIT or RTR, or a receive to a
//! QP in RESET, fails with [`Error::Invalid`] (IB returns `EINVAL` from `post_send`).
//!
//! The transport-retry delay is `4.096 µs × 2^timeout`, capped at 100 ms (and 100 ms for the
//! "infinite" encoding 0); RNR delays follow the IB table unscaled, except with infinite RNR
//! retries (`rnr_retry` 7): the receive that ends the wait retries the send at once, and the
//! timer only backs that up (a responder that changes state meanwhile), so it waits at least
//! 1 ms, rounded up to a 1 ms grid shared by all such waits.

mod fabric;
mod mem;
mod qp;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock, Weak};

pub use fabric::Fabric;
use mem::{Mr, Segs};
pub use qp::HOLD_MAX;
use qp::{drive, kick, resume, Qp, QueuedRecv, QueuedSend, Rq, Sq, Srq, SrqQ, Trigger, Wake};

use crate::{
    Access, Backend, CompletionSink, CqId, Error, FastReg, Gid, GidType, GuestMem, MrId, MrKeys,
    MrKind, PdId, QpAttrs, QpId, QpInit, QpState, QpType, RecvWr, Result, SendWr, Sge, SrqId,
    WcOpcode, WcStatus, MAX_SGE,
};

/// GID table entries per backend (the device reports a smaller `gid_tbl_len`).
pub const MAX_GIDS: u32 = 128;
/// MRs per backend: the MR slot fills bits 8-27 of a key.
const MAX_MRS: usize = 1 << 20;
/// The bits of a key (without [`RKEY_BIT`]) drawn at random for each registration: the low 8
/// and bits 28-30. The slot (bits 8-27) says where the MR is; the random bits make a key
/// unguessable from another key (ReDMArk: keys must not be predictable), and a stale key of a
/// reused slot very likely invalid.
const KEY_RANDOM_BITS: u32 = 0x7000_00ff;
/// Work requests per queue: bounds what a guest can make the backend buffer.
pub const MAX_WR: u32 = 1 << 16;
/// QPs per backend.
const MAX_QPS: usize = 1 << 16;
/// Objects (PDs, CQs, SRQs) per kind per backend.
const MAX_OBJECTS: usize = 1 << 16;
/// QPN → QP, looked up on every work request. QPNs are assigned by this backend (dense,
/// sequential), so a multiplicative hash spreads them and no guest chooses the keys that are
/// inserted; SipHash cost ~60 instructions per lookup on the data path.
type QpMap = HashMap<u32, Arc<Qp>, std::hash::BuildHasherDefault<QpnHasher>>;

/// Fibonacci hashing of a QPN.
#[derive(Debug, Default, Clone, Copy)]
struct QpnHasher(u64);

impl std::hash::Hasher for QpnHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = (self.0 ^ u64::from(v)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Bit that marks an rkey (lkeys and rkeys of one MR differ).
const RKEY_BIT: u32 = 0x8000_0000;

pub(crate) use crate::sync::lock;
use crate::sync::{read, write};

#[derive(Debug, Default)]
struct MrSlot {
    /// The lkey of the MR registered in the slot now (its rkey is `key | RKEY_BIT`).
    key: u32,
    /// What the key reaches; `None` for a fast-register MR with no mapping (free).
    mr: Option<Arc<Mr>>,
    /// Set for a fast-register MR: what its registrations are checked against.
    frmr: Option<Frmr>,
}

/// The fixed part of a fast-register MR.
#[derive(Debug, Clone, Copy)]
struct Frmr {
    pd: PdId,
    max_pages: u32,
}

/// Pages one fast registration maps, at most (the Linux driver's own bound).
pub const FAST_REG_MAX_PAGES: u32 = 128;

#[derive(Debug)]
struct MrTable {
    slots: Vec<MrSlot>,
    free: Vec<u32>,
    /// SplitMix64 state for the random bits of keys, seeded from the OS (through `RandomState`).
    rng: u64,
}

impl Default for MrTable {
    fn default() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x6b65_7973);
        MrTable {
            slots: Vec::new(),
            free: Vec::new(),
            rng: h.finish(),
        }
    }
}

impl MrTable {
    /// The next SplitMix64 output.
    fn random(&mut self) -> u32 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) as u32
    }
}

/// Control-plane state (one command at a time).
#[derive(Debug, Default)]
struct Ctl {
    next_pd: u32,
    /// PD → references (MRs, QPs, SRQs).
    pds: HashMap<u32, u32>,
    next_cq: u32,
    /// CQ → references (QPs).
    cqs: HashMap<u32, u32>,
    next_srq: u32,
    /// SRQ → (object, references).
    srqs: HashMap<u32, (Arc<Srq>, u32)>,
    /// MR → PD.
    mr_pd: HashMap<u32, PdId>,
    next_qpn: u32,
}

fn alloc_id<V>(next: &mut u32, map: &HashMap<u32, V>) -> Result<u32> {
    if map.len() >= MAX_OBJECTS {
        return Err(Error::Exhausted("objects"));
    }
    loop {
        *next = next.wrapping_add(1).max(1);
        if !map.contains_key(next) {
            return Ok(*next);
        }
    }
}

/// Removes `id` from a table of reference counts, unless it is missing or still referenced.
fn remove_unreferenced(map: &mut HashMap<u32, u32>, id: u32, what: &'static str) -> Result<()> {
    match map.get(&id) {
        None => Err(Error::NoSuchObject(what)),
        Some(&r) if r > 0 => Err(Error::Busy(what)),
        Some(_) => {
            map.remove(&id);
            Ok(())
        }
    }
}

/// A software RDMA device attached to a [`Fabric`].
pub struct EmulatedBackend {
    id: u64,
    me: Weak<EmulatedBackend>,
    fabric: Arc<Fabric>,
    mem: GuestMem,
    sink: Arc<dyn CompletionSink>,
    gids: RwLock<Vec<Option<(Gid, GidType)>>>,
    mrs: RwLock<MrTable>,
    qps: RwLock<QpMap>,
    ctl: Mutex<Ctl>,
    /// QPs woken to go on, in order, for [`Backend::progress`].
    ready: Mutex<Ready>,
    /// The MAC of the device this backend serves, when known: the link-local GIDs derived from
    /// a MAC (EUI-64) are then that device's only.
    mac: Option<[u8; 6]>,
}

/// Whether `g` is a link-local GID derived from a MAC (`fe80::/64` with an EUI-64 interface id).
fn eui64_link_local(g: &Gid) -> bool {
    g.0[..8] == [0xfe, 0x80, 0, 0, 0, 0, 0, 0] && g.0[11] == 0xff && g.0[12] == 0xfe
}

/// The QPs of a backend that have work to resume on a worker. A QP is listed at most once (its
/// [`Qp::wakes`] bits say it is), so the list is bounded by the number of QPs.
#[derive(Debug, Default)]
struct Ready {
    qps: VecDeque<Weak<Qp>>,
    /// The sink was asked for a call of [`Backend::progress`] that has not yet found the list
    /// empty.
    asked: bool,
}

impl fmt::Debug for EmulatedBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatedBackend")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl EmulatedBackend {
    /// A new device on `fabric` over guest memory `mem`, delivering completions to `sink`.
    ///
    /// The sink is called with QP locks held: it must not call back into the backend.
    pub fn new(
        fabric: &Arc<Fabric>,
        mem: GuestMem,
        sink: Arc<dyn CompletionSink>,
    ) -> Arc<EmulatedBackend> {
        Self::build(fabric, mem, sink, None)
    }

    /// A new device as [`EmulatedBackend::new`], for the device with MAC `mac`: its guest may
    /// bind the link-local GID of that MAC, and no other MAC-derived link-local GID (another
    /// device's, which it would otherwise take over while that device is down).
    pub fn for_device(
        fabric: &Arc<Fabric>,
        mem: GuestMem,
        sink: Arc<dyn CompletionSink>,
        mac: [u8; 6],
    ) -> Arc<EmulatedBackend> {
        Self::build(fabric, mem, sink, Some(mac))
    }

    fn build(
        fabric: &Arc<Fabric>,
        mem: GuestMem,
        sink: Arc<dyn CompletionSink>,
        mac: Option<[u8; 6]>,
    ) -> Arc<EmulatedBackend> {
        Arc::new_cyclic(|me| EmulatedBackend {
            id: fabric.new_backend_id(),
            me: me.clone(),
            fabric: fabric.clone(),
            mem,
            sink,
            gids: RwLock::new(vec![None; MAX_GIDS as usize]),
            mrs: RwLock::new(MrTable::default()),
            qps: RwLock::new(QpMap::default()),
            ctl: Mutex::new(Ctl {
                next_qpn: 1,
                ..Ctl::default()
            }),
            ready: Mutex::new(Ready::default()),
            mac,
        })
    }

    /// Lists `qp` (of this backend) to go on in [`Backend::progress`] for `why`; asks the sink
    /// for a call of it unless one is due anyway. Never runs anything itself: the timer thread
    /// and other devices' workers call this.
    pub(crate) fn wake(&self, qp: &Arc<Qp>, why: Wake) {
        if let Wake::Timer(t) = why {
            qp.wake_token.fetch_max(t, Ordering::AcqRel);
        }
        if qp.wakes.fetch_or(why.bit(), Ordering::AcqRel) != 0 {
            return;
        }
        let ask = {
            let mut r = lock(&self.ready);
            r.qps.push_back(Arc::downgrade(qp));
            !std::mem::replace(&mut r.asked, true)
        };
        if ask {
            self.sink.progress_needed();
        }
    }

    /// The fabric this device is attached to.
    pub fn fabric(&self) -> &Arc<Fabric> {
        &self.fabric
    }

    pub(crate) fn gid(&self, index: u8) -> Option<(Gid, GidType)> {
        read(&self.gids).get(usize::from(index)).copied().flatten()
    }

    pub(crate) fn qp_by_qpn(&self, qpn: u32) -> Option<Arc<Qp>> {
        read(&self.qps).get(&qpn).cloned()
    }

    fn qp(&self, id: QpId) -> Result<Arc<Qp>> {
        self.qp_by_qpn(id.0).ok_or(Error::NoSuchObject("QP"))
    }

    fn mr_by_key(&self, key: u32, remote: bool) -> Option<Arc<Mr>> {
        if (key & RKEY_BIT != 0) != remote {
            return None;
        }
        let key = key & !RKEY_BIT;
        let slot = ((key & !KEY_RANDOM_BITS) >> 8) as usize;
        let t = read(&self.mrs);
        let s = t.slots.get(slot)?;
        if s.key != key {
            return None;
        }
        s.mr.clone()
    }

    /// Maps the fast-register MR `reg.key` names for a QP on `pd` (a FAST_REG WR). The MR must
    /// be free, of `pd`, with room for the pages, and the key may differ from its own in the
    /// low 8 bits only. Errors are the WR's completion status.
    pub(crate) fn fast_reg(&self, pd: PdId, reg: &FastReg) -> std::result::Result<(), WcStatus> {
        let bad = WcStatus::LocQpOpErr;
        let end = reg.iova.checked_add(reg.length).ok_or(bad)?;
        let npages = end.div_ceil(mem::PAGE) - reg.iova / mem::PAGE;
        if reg.length == 0 || (reg.pages.len() as u64) < npages {
            return Err(bad);
        }
        if reg
            .access
            .intersects(Access::REMOTE_WRITE | Access::REMOTE_ATOMIC)
            && !reg.access.contains(Access::LOCAL_WRITE)
        {
            return Err(bad);
        }
        let key = reg.key & !RKEY_BIT;
        let mut t = write(&self.mrs);
        let s = t
            .slots
            .get_mut(((key & !KEY_RANDOM_BITS) >> 8) as usize)
            .ok_or(bad)?;
        let f = s.frmr.ok_or(bad)?;
        if f.pd != pd
            || s.mr.is_some()
            || s.key & !0xff != key & !0xff
            || reg.pages.len() > f.max_pages as usize
        {
            return Err(bad);
        }
        s.key = key;
        s.mr = Some(Arc::new(Mr {
            pd,
            access: reg.access,
            kind: MrKind::User {
                iova: reg.iova,
                length: reg.length,
                pages: reg.pages.clone(),
            },
        }));
        Ok(())
    }

    /// Unmaps the fast-register MR `key` names, of `pd`: a LOCAL_INV (`remote` false: its lkey
    /// or rkey) or a SEND with invalidate received (`remote`: its rkey). `false` when the key
    /// names no mapped fast-register MR of `pd`. Transfers already under way finish on the
    /// mapping they hold.
    pub(crate) fn invalidate(&self, pd: PdId, key: u32, remote: bool) -> bool {
        if remote && key & RKEY_BIT == 0 {
            return false;
        }
        let key = key & !RKEY_BIT;
        let mut t = write(&self.mrs);
        let Some(s) = t.slots.get_mut(((key & !KEY_RANDOM_BITS) >> 8) as usize) else {
            return false;
        };
        match s.frmr {
            Some(f) if f.pd == pd && s.key == key => s.mr.take().is_some(),
            _ => false,
        }
    }

    /// Validates local SGEs: the lkey exists, belongs to `pd`, grants `need`, covers the range.
    pub(crate) fn resolve_local(&self, sges: &[Sge], pd: PdId, need: Access) -> Option<Segs> {
        let mut segs = Segs::new();
        for s in sges {
            if s.length == 0 {
                continue;
            }
            let mr = self.mr_by_key(s.lkey, false)?;
            if mr.pd != pd || !mr.access.contains(need) || !mr.contains(s.addr, s.length.into()) {
                return None;
            }
            segs.push(mr, s.addr, s.length.into());
        }
        Some(segs)
    }

    /// Validates a remote range: the rkey exists, belongs to `pd`, grants `need`, covers it.
    pub(crate) fn resolve_remote(
        &self,
        rkey: u32,
        addr: u64,
        len: u64,
        pd: PdId,
        need: Access,
    ) -> Option<Segs> {
        let mr = self.mr_by_key(rkey, true)?;
        if mr.pd != pd || !mr.access.contains(need) || !mr.contains(addr, len) {
            return None;
        }
        let mut segs = Segs::new();
        segs.push(mr, addr, len);
        Some(segs)
    }

    /// Takes one send WR onto the locked SQ of `qp` (the caller runs the queue afterwards).
    fn queue_send(&self, qp: &Arc<Qp>, sq: &mut Sq, wr: &SendWr) -> Result<()> {
        if qp.is_dead() {
            return Err(Error::NoSuchObject("QP"));
        }
        match qp.state() {
            QpState::Reset | QpState::Init | QpState::Rtr => {
                return Err(Error::Invalid("QP is not ready to send"))
            }
            QpState::Err | QpState::Sqe => {
                // Whatever is queued is flushed first, then this WR: completions stay in order.
                drive(self, qp, sq, Trigger::Post);
                let opcode = qp::send_opcode(&wr.op);
                let wc = qp.wc(qp.send_cq, wr.wr_id, WcStatus::WrFlushErr, opcode, 0);
                sq.held.deliver_then(&*self.sink, std::slice::from_ref(&wc));
                return Ok(());
            }
            QpState::Rts | QpState::Sqd => {}
        }
        let max = qp.max_send_wr.max(1) as usize;
        if sq.pending.len() >= max {
            // WRs queued earlier in this batch may complete right away.
            drive(self, qp, sq, Trigger::Post);
            if sq.pending.len() >= max {
                return Err(Error::QueueFull);
            }
        }
        sq.pending.push_back(QueuedSend::from(wr));
        Ok(())
    }

    /// Takes one receive WR onto the locked RQ of `qp` (the caller kicks waiting senders).
    fn queue_recv(&self, qp: &Qp, rq: &mut Rq, wr: &RecvWr) -> Result<()> {
        if wr.sges.as_slice().len() > qp.max_recv_sge.max(1) as usize {
            return Err(Error::Invalid("too many SGEs"));
        }
        if qp.is_dead() {
            return Err(Error::NoSuchObject("QP"));
        }
        match qp.state() {
            QpState::Reset => return Err(Error::Invalid("QP is in RESET")),
            QpState::Err => {
                let wc = qp.wc(
                    qp.recv_cq,
                    wr.wr_id,
                    WcStatus::WrFlushErr,
                    WcOpcode::Recv,
                    0,
                );
                rq.held.deliver_then(&*self.sink, std::slice::from_ref(&wc));
                return Ok(());
            }
            _ => {}
        }
        if rq.wqes.len() >= qp.max_recv_wr.max(1) as usize {
            return Err(Error::QueueFull);
        }
        rq.wqes.push_back(QueuedRecv::from(wr));
        Ok(())
    }

    fn destroy_qp_inner(&self, qp: &Arc<Qp>) {
        {
            let mut sq = lock(&qp.sq);
            let mut rq = lock(&qp.rq);
            // What a sender's run made before the destroy is delivered, as it would have been
            // had it not been held; nothing after.
            rq.held.deliver(&*self.sink);
            sq.held.deliver(&*self.sink);
            qp.dead.store(true, Ordering::Release);
            sq.abandon();
            sq.pending.clear();
            sq.stall = None;
            sq.token += 1;
            rq.taken += rq.wqes.len() as u64;
            rq.wqes.clear();
            rq.waiters.clear();
        }
        let mut ctl = lock(&self.ctl);
        for cq in [qp.send_cq, qp.recv_cq] {
            if let Some(r) = ctl.cqs.get_mut(&cq.0) {
                *r = r.saturating_sub(1);
            }
        }
        if let Some(r) = ctl.pds.get_mut(&qp.pd.0) {
            *r = r.saturating_sub(1);
        }
        if let Some(srq) = &qp.srq {
            if let Some((_, r)) = ctl.srqs.get_mut(&srq.id.0) {
                *r = r.saturating_sub(1);
            }
        }
    }

    fn clear_gids(&self) {
        let mut g = write(&self.gids);
        for e in g.iter_mut() {
            if let Some((gid, _)) = e.take() {
                self.fabric.unregister(&gid, self.id);
            }
        }
    }
}

impl Drop for EmulatedBackend {
    fn drop(&mut self) {
        self.clear_gids();
    }
}

impl Backend for EmulatedBackend {
    fn name(&self) -> &'static str {
        "emulated"
    }

    /// Control operations change in-memory tables under short locks.
    fn inline_control(&self) -> bool {
        true
    }

    /// A GID another live device holds is refused (`Busy`): the first device to bind a GID
    /// owns it until it lets go, and nobody else receives its traffic. With the device's MAC
    /// known, a MAC-derived link-local GID not of that MAC is refused too (`Invalid`).
    fn add_gid(&self, index: u32, gid: Gid, ty: GidType) -> Result<()> {
        if let Some(mac) = self.mac {
            if eui64_link_local(&gid) && gid != Gid::from_mac(mac) {
                return Err(Error::Invalid("the link-local GID of another MAC"));
            }
        }
        let mut g = write(&self.gids);
        let slot = g
            .get_mut(index as usize)
            .ok_or(Error::Invalid("GID index"))?;
        if !self.fabric.register(gid, self.id, self.me.clone()) {
            log::debug!("GID {gid:?} is held by another device on the fabric: refused");
            return Err(Error::Busy("GID"));
        }
        if let Some((old, _)) = slot.replace((gid, ty)) {
            if old != gid {
                self.fabric.unregister(&old, self.id);
            }
        }
        Ok(())
    }

    fn del_gid(&self, index: u32) -> Result<()> {
        let mut g = write(&self.gids);
        let slot = g
            .get_mut(index as usize)
            .ok_or(Error::Invalid("GID index"))?;
        if let Some((old, _)) = slot.take() {
            self.fabric.unregister(&old, self.id);
        }
        Ok(())
    }

    fn create_pd(&self) -> Result<PdId> {
        let mut ctl = lock(&self.ctl);
        let Ctl { next_pd, pds, .. } = &mut *ctl;
        let id = alloc_id(next_pd, pds)?;
        pds.insert(id, 0);
        Ok(PdId(id))
    }

    fn destroy_pd(&self, pd: PdId) -> Result<()> {
        remove_unreferenced(&mut lock(&self.ctl).pds, pd.0, "PD")
    }

    fn create_mr(&self, pd: PdId, kind: MrKind, access: Access) -> Result<MrKeys> {
        let mut frmr = None;
        match &kind {
            MrKind::User {
                iova,
                length,
                pages,
            } => {
                let end = iova
                    .checked_add(*length)
                    .ok_or(Error::Invalid("MR wraps around"))?;
                let first = iova & !(mem::PAGE - 1);
                let npages = end.div_ceil(mem::PAGE) - first / mem::PAGE;
                if (pages.len() as u64) < npages {
                    return Err(Error::Invalid("MR page list too short"));
                }
            }
            MrKind::Frmr { max_pages } => {
                if *max_pages == 0 || *max_pages > FAST_REG_MAX_PAGES {
                    return Err(Error::Invalid("fast-register MR size"));
                }
                frmr = Some(Frmr {
                    pd,
                    max_pages: *max_pages,
                });
            }
            MrKind::Dma => {}
        }
        // IB: remote write/atomic need local write.
        if access.intersects(Access::REMOTE_WRITE | Access::REMOTE_ATOMIC)
            && !access.contains(Access::LOCAL_WRITE)
        {
            return Err(Error::Invalid("remote write access without local write"));
        }
        let mut ctl = lock(&self.ctl);
        let refs = ctl.pds.get_mut(&pd.0).ok_or(Error::NoSuchObject("PD"))?;
        let mut t = write(&self.mrs);
        let slot = match t.free.pop() {
            Some(s) => s as usize,
            None if t.slots.len() < MAX_MRS => {
                t.slots.push(MrSlot::default());
                t.slots.len() - 1
            }
            None => return Err(Error::Exhausted("MRs")),
        };
        // Random bits, never those of the slot's previous key (whose holders must miss). The
        // low 8 bits of a fast-register MR's key are its consumer's: its high ones must differ.
        let differ = if frmr.is_some() {
            KEY_RANDOM_BITS & !0xff
        } else {
            KEY_RANDOM_BITS
        };
        let mut bits = t.random() & KEY_RANDOM_BITS;
        while bits & differ == t.slots[slot].key & differ {
            bits = t.random() & KEY_RANDOM_BITS;
        }
        let lkey = ((slot as u32) << 8) | bits;
        let s = &mut t.slots[slot];
        s.key = lkey;
        s.mr = frmr.is_none().then(|| Arc::new(Mr { pd, access, kind }));
        s.frmr = frmr;
        *refs += 1;
        ctl.mr_pd.insert(slot as u32, pd);
        Ok(MrKeys {
            id: MrId(slot as u32),
            lkey,
            rkey: lkey | RKEY_BIT,
        })
    }

    fn destroy_mr(&self, mr: MrId) -> Result<()> {
        let mut ctl = lock(&self.ctl);
        let pd = ctl.mr_pd.remove(&mr.0).ok_or(Error::NoSuchObject("MR"))?;
        let mut t = write(&self.mrs);
        if let Some(s) = t.slots.get_mut(mr.0 as usize) {
            s.mr = None;
            s.frmr = None;
        }
        t.free.push(mr.0);
        if let Some(r) = ctl.pds.get_mut(&pd.0) {
            *r = r.saturating_sub(1);
        }
        Ok(())
    }

    fn create_cq(&self, cqe: u32, _cookie: u64) -> Result<CqId> {
        if cqe == 0 {
            return Err(Error::Invalid("CQ size 0"));
        }
        let mut ctl = lock(&self.ctl);
        let Ctl { next_cq, cqs, .. } = &mut *ctl;
        let id = alloc_id(next_cq, cqs)?;
        cqs.insert(id, 0);
        Ok(CqId(id))
    }

    fn destroy_cq(&self, cq: CqId) -> Result<()> {
        remove_unreferenced(&mut lock(&self.ctl).cqs, cq.0, "CQ")
    }

    fn create_srq(
        &self,
        pd: PdId,
        max_wr: u32,
        max_sge: u32,
        limit: u32,
        cookie: u64,
    ) -> Result<SrqId> {
        if max_wr == 0 || max_wr > MAX_WR || max_sge as usize > MAX_SGE || limit > max_wr {
            return Err(Error::Invalid("SRQ size"));
        }
        let mut ctl = lock(&self.ctl);
        let Ctl {
            next_srq,
            srqs,
            pds,
            ..
        } = &mut *ctl;
        let refs = pds.get_mut(&pd.0).ok_or(Error::NoSuchObject("PD"))?;
        let id = alloc_id(next_srq, srqs)?;
        *refs += 1;
        let srq = Arc::new(Srq {
            id: SrqId(id),
            pd,
            cookie,
            max_wr,
            max_sge,
            q: Mutex::new(SrqQ {
                wqes: VecDeque::new(),
                limit,
                waiters: Vec::new(),
            }),
        });
        srqs.insert(id, (srq, 0));
        Ok(SrqId(id))
    }

    fn modify_srq(&self, srq: SrqId, limit: u32) -> Result<()> {
        let s = lock(&self.ctl)
            .srqs
            .get(&srq.0)
            .map(|(s, _)| s.clone())
            .ok_or(Error::NoSuchObject("SRQ"))?;
        if limit > s.max_wr {
            return Err(Error::Invalid("SRQ limit above its size"));
        }
        lock(&s.q).limit = limit;
        Ok(())
    }

    fn destroy_srq(&self, srq: SrqId) -> Result<()> {
        let mut ctl = lock(&self.ctl);
        let (s, refs) = ctl.srqs.get(&srq.0).ok_or(Error::NoSuchObject("SRQ"))?;
        if *refs > 0 {
            return Err(Error::Busy("SRQ"));
        }
        let pd = s.pd;
        ctl.srqs.remove(&srq.0);
        if let Some(r) = ctl.pds.get_mut(&pd.0) {
            *r = r.saturating_sub(1);
        }
        Ok(())
    }

    fn post_srq_recv(&self, srq: SrqId, wr: &RecvWr) -> Result<()> {
        let s = lock(&self.ctl)
            .srqs
            .get(&srq.0)
            .map(|(s, _)| s.clone())
            .ok_or(Error::NoSuchObject("SRQ"))?;
        if wr.sges.as_slice().len() > s.max_sge as usize {
            return Err(Error::Invalid("too many SGEs"));
        }
        let mut q = lock(&s.q);
        if q.wqes.len() >= s.max_wr as usize {
            return Err(Error::QueueFull);
        }
        q.wqes.push_back(QueuedRecv::from(wr));
        let waiters = std::mem::take(&mut q.waiters);
        drop(q);
        kick(self, waiters);
        Ok(())
    }

    fn create_qp(&self, init: &QpInit) -> Result<(QpId, u32)> {
        if init.max_send_wr > MAX_WR
            || init.max_recv_wr > MAX_WR
            || init.max_send_sge as usize > MAX_SGE
            || init.max_recv_sge as usize > MAX_SGE
        {
            return Err(Error::Invalid("QP size"));
        }
        let mut ctl = lock(&self.ctl);
        if !ctl.pds.contains_key(&init.pd.0) {
            return Err(Error::NoSuchObject("PD"));
        }
        if !ctl.cqs.contains_key(&init.send_cq.0) || !ctl.cqs.contains_key(&init.recv_cq.0) {
            return Err(Error::NoSuchObject("CQ"));
        }
        let srq = match init.srq {
            Some(id) => Some(
                ctl.srqs
                    .get(&id.0)
                    .map(|(s, _)| s.clone())
                    .ok_or(Error::NoSuchObject("SRQ"))?,
            ),
            None => None,
        };
        let mut qps = write(&self.qps);
        let qpn = new_qpn(&mut ctl.next_qpn, &qps, init.qp_type)?;
        let qp = Arc::new(Qp::new(self.me.clone(), qpn, init, srq.clone()));
        qps.insert(qpn, qp);
        *ctl.pds.entry(init.pd.0).or_default() += 1;
        *ctl.cqs.entry(init.send_cq.0).or_default() += 1;
        *ctl.cqs.entry(init.recv_cq.0).or_default() += 1;
        if let Some(s) = srq {
            if let Some((_, r)) = ctl.srqs.get_mut(&s.id.0) {
                *r += 1;
            }
        }
        Ok((QpId(qpn), qpn))
    }

    fn modify_qp(&self, id: QpId, attrs: &QpAttrs) -> Result<()> {
        let qp = self.qp(id)?;
        if attrs.path_mtu.is_some_and(|m| !(1..=5).contains(&m))
            || attrs.min_rnr_timer.is_some_and(|t| t > 31)
            || attrs.timeout.is_some_and(|t| t > 31)
            || attrs.rnr_retry.is_some_and(|r| r > 7)
            || attrs.retry_cnt.is_some_and(|r| r > 7)
        {
            return Err(Error::Invalid("QP attribute out of range"));
        }
        let mut sq = lock(&qp.sq);
        let mut rq = lock(&qp.rq);
        if qp.is_dead() {
            return Err(Error::NoSuchObject("QP"));
        }
        let from = qp.state();
        if let Some(to) = attrs.state {
            if !from.can_transition_to(to) {
                return Err(Error::BadTransition { from, to });
            }
        }
        if let Some(m) = attrs.path_mtu {
            sq.path_mtu = m;
        }
        if let Some(q) = attrs.qkey {
            sq.qkey = q;
            rq.qkey = q;
        }
        if let Some(d) = attrs.dest_qp_num {
            sq.dest_qpn = d & 0xff_ffff;
            sq.remote = Weak::new();
        }
        if let Some(av) = attrs.ah {
            sq.ah = Some(av);
            sq.remote = Weak::new();
        }
        if attrs.dest_qp_num.is_some() || attrs.ah.is_some() {
            *lock(&qp.connected) = qp::Connected {
                qpn: sq.dest_qpn,
                gid: sq.ah.map(|a| a.dgid),
            };
        }
        if let Some(a) = attrs.access {
            qp.access.store(a.bits(), Ordering::Release);
        }
        if let Some(t) = attrs.min_rnr_timer {
            rq.min_rnr_timer = t;
        }
        if let Some(t) = attrs.timeout {
            sq.timeout = t;
        }
        if let Some(r) = attrs.retry_cnt {
            sq.retry_cnt = r;
        }
        if let Some(r) = attrs.rnr_retry {
            sq.rnr_retry = r;
        }
        let Some(to) = attrs.state else {
            return Ok(());
        };
        qp.set_state(to);
        match to {
            QpState::Reset => {
                rq.held.deliver(&*self.sink);
                sq.held.deliver(&*self.sink);
                sq.abandon();
                sq.pending.clear();
                sq.stall = None;
                sq.token += 1;
                sq.remote = Weak::new();
                rq.taken += rq.wqes.len() as u64;
                rq.wqes.clear();
                rq.waiters.clear();
            }
            QpState::Err => {
                drop(rq);
                qp::to_err_locked_sq(self, &qp, &mut sq);
            }
            // Sends queued meanwhile run on a worker (this may be the device's main loop).
            QpState::Rts if from != QpState::Rts && !sq.pending.is_empty() => {
                drop((rq, sq));
                self.wake(&qp, Wake::Resume);
            }
            _ => {}
        }
        Ok(())
    }

    fn query_qp_state(&self, qp: QpId) -> Result<QpState> {
        Ok(self.qp(qp)?.state())
    }

    fn qp_retries(&self, qp: QpId) -> Option<crate::QpRetries> {
        let qp = self.qp(qp).ok()?;
        let sq = lock(&qp.sq);
        Some(crate::QpRetries {
            rnr_waits: sq.rnr_waits,
            retries: sq.retries,
        })
    }

    fn destroy_qp(&self, id: QpId) -> Result<()> {
        let qp = write(&self.qps)
            .remove(&id.0)
            .ok_or(Error::NoSuchObject("QP"))?;
        self.destroy_qp_inner(&qp);
        Ok(())
    }

    fn post_send(&self, id: QpId, wr: &SendWr) -> Result<()> {
        self.post_send_batch(id, std::slice::from_ref(wr)).1
    }

    fn post_recv(&self, id: QpId, wr: &RecvWr) -> Result<()> {
        self.post_recv_batch(id, std::slice::from_ref(wr)).1
    }

    fn post_send_batch(&self, id: QpId, wrs: &[SendWr]) -> (usize, Result<()>) {
        let qp = match self.qp(id) {
            Ok(qp) => qp,
            Err(e) => return (0, Err(e)),
        };
        let mut sq = lock(&qp.sq);
        let mut taken = 0;
        let mut res = Ok(());
        for wr in wrs {
            if let Err(e) = self.queue_send(&qp, &mut sq, wr) {
                res = Err(e);
                break;
            }
            taken += 1;
        }
        // One run of the queue for the lot (a WR that found the queue full ran it already).
        drive(self, &qp, &mut sq, Trigger::Post);
        (taken, res)
    }

    fn post_recv_batch(&self, id: QpId, wrs: &[RecvWr]) -> (usize, Result<()>) {
        let qp = match self.qp(id) {
            Ok(qp) => qp,
            Err(e) => return (0, Err(e)),
        };
        if qp.srq.is_some() {
            return (0, Err(Error::Invalid("the QP receives from an SRQ")));
        }
        let mut rq = lock(&qp.rq);
        let mut taken = 0;
        let mut res = Ok(());
        for wr in wrs {
            if let Err(e) = self.queue_recv(&qp, &mut rq, wr) {
                res = Err(e);
                break;
            }
            taken += 1;
        }
        // Senders waiting (RNR) for a receive here retry once, with all of them posted.
        let waiters = std::mem::take(&mut rq.waiters);
        drop(rq);
        if !waiters.is_empty() {
            kick(self, waiters);
        }
        (taken, res)
    }

    /// A queued WR keeps its first two SGEs inline and a longer list on the heap (one
    /// allocation of exactly its length, plus the allocator's header).
    fn queued_wr_bytes(&self, send: bool, sges: u32) -> u64 {
        let base = if send {
            std::mem::size_of::<QueuedSend>()
        } else {
            std::mem::size_of::<QueuedRecv>()
        } as u64;
        let spilled = if sges as usize > qp::INLINE_SGES {
            u64::from(sges) * std::mem::size_of::<Sge>() as u64 + 16
        } else {
            0
        };
        base + spilled
    }

    /// Runs the listed QPs in turn, one budgeted run each (a QP whose run ran out goes to the
    /// back of the list), until the list is empty or the runs have spent
    /// [`qp::PROGRESS_BUDGET`].
    fn progress(&self) -> bool {
        let mut spent = 0u64;
        while spent < qp::PROGRESS_BUDGET {
            let Some(w) = lock(&self.ready).qps.pop_front() else {
                break;
            };
            if let Some(qp) = w.upgrade() {
                spent += resume(self, &qp).max(qp::WR_COST);
            }
        }
        let mut r = lock(&self.ready);
        r.asked = !r.qps.is_empty();
        r.asked
    }

    fn fast_reg_max_pages(&self) -> u32 {
        FAST_REG_MAX_PAGES
    }

    fn reset(&self) {
        let qps: Vec<Arc<Qp>> = write(&self.qps).drain().map(|(_, q)| q).collect();
        for qp in &qps {
            self.destroy_qp_inner(qp);
        }
        {
            // Keep each slot's last key: a new key of the slot gets other random bits, so keys
            // from before the reset stay stale.
            let mut t = write(&self.mrs);
            for s in t.slots.iter_mut() {
                s.mr = None;
                s.frmr = None;
            }
            t.free = (0..t.slots.len() as u32).rev().collect();
        }
        *lock(&self.ctl) = Ctl {
            next_qpn: 1,
            ..Ctl::default()
        };
        self.clear_gids();
    }
}

/// A QPN for a new QP of type `ty`: 1 for the GSI QP (one per device), otherwise the next free
/// one after `last` in 2..2^24 (0 and 1 are never handed out).
fn new_qpn(last: &mut u32, qps: &QpMap, ty: QpType) -> Result<u32> {
    if ty == QpType::Gsi {
        if qps.contains_key(&1) {
            return Err(Error::Busy("GSI QP"));
        }
        return Ok(1);
    }
    if qps.len() >= MAX_QPS {
        return Err(Error::Exhausted("QPs"));
    }
    loop {
        *last = (*last + 1) & 0xff_ffff;
        if *last < 2 {
            *last = 2;
        }
        if !qps.contains_key(last) {
            return Ok(*last);
        }
    }
}
