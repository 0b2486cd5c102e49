//! The `rdma-core` backend: guest verbs carried by a host RDMA device through libibverbs.
//!
//! libibverbs is loaded at run time (`rdma-mummy-sys`), so a binary built with this feature runs
//! on a host without rdma-core; [`available`] says whether this backend can be offered.
//! The approach (see `docs/rdma-core-backend.md`):
//! - Every guest RAM region is registered once per PD (`ibv_reg_mr`, local write only). Guest
//!   SGEs are checked against the guest MR (key, PD, bounds, access) here and translated
//!   (iova → guest-physical page → host virtual address) into host SGEs of that registration.
//!   When a WR needs more host SGEs than the device allows, it goes through a registered bounce
//!   buffer (copied in at post, out at completion).
//! - Remote access (rkeys): a guest MR with remote rights gets its own `ibv_reg_mr_iova`
//!   registration with the guest's iova and access, whose rkey is the guest's rkey: directly on
//!   the guest mapping when its pages are contiguous there, otherwise on an alias (`alias.rs`):
//!   the MR's pages mapped once more, in order, from the file backing guest RAM (a memfd with
//!   vfio-user). On anonymous guest RAM such an MR gets an rkey that no host MR has: remote
//!   operations naming it fail with a remote access error (documented limitation).
//! - A guest SGE that fails the checks is posted as a host WR with an invalid lkey, so the host
//!   completes it with a local protection error in order and moves the QP to ERR.
//! - One thread waits on the completion channel and the async-event fd and feeds the sink.
//! - The GSI QP (QP1) is emulated: user space cannot own the host's QP1, so a host UD QP with a
//!   reserved Q_Key stands in for it, published per guest GID in a process-wide table; GSI sends
//!   to QP 1 at a GID go to the emulated QP1 there. It reaches pvrdma devices of this process
//!   (loopback included), nothing else.
#![allow(clippy::missing_docs_in_private_items)]

mod alias;
mod verbs;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::os::fd::AsFd;

use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::{
    Access, AsyncEvent, Backend, CompletionSink, CqId, Error, Gid, GidType, GuestMem, MrId, MrKeys,
    MrKind, PdId, QpAttrs, QpId, QpInit, QpState, QpType, RecvWr, Result, SendOp, SendWr, Sge,
    SrqId, WcOpcode, WcStatus, WorkCompletion,
};
use verbs::{consts, ibv_qp_state as S, ibv_wr_opcode as Op, QpMask};

pub use verbs::device_names;

/// Whether the rdma-core backend can run here (libibverbs loads); the error says why not.
pub fn available() -> std::result::Result<(), String> {
    verbs::libibverbs_available()
}

/// GID table entries the guest may set (the PVRDMA device exposes at most this many).
const MAX_GIDS: usize = 128;
/// Host address handles cached per PD. A guest chooses the address vectors of its UD sends, so
/// without a bound it could make the host create AHs (objects of the host NIC) without end;
/// past the bound the cache starts again (WRs in flight keep their own reference).
const MAX_CACHED_AHS: usize = 256;
/// Largest bounce buffer of one WR (twice perftest's largest message): a WR whose SGEs are
/// spread over more host runs than the device takes and add up to more than this completes
/// with a local length error instead of making the process allocate what the guest asks (up to
/// 16 × 4 GiB).
const MAX_BOUNCE: usize = 16 << 20;
/// Bounce buffers of one device's WRs in flight, together. A WR that would pass it is not
/// taken yet (`QueueFull`: it stays in the guest's ring) until buffers in flight complete.
const MAX_BOUNCE_IN_FLIGHT: u64 = 64 << 20;
/// Guest lkeys/rkeys the backend invents carry this tag in the top byte, so that they never equal
/// a key of the host device (rxe and mlx keys stay below it) and a guest lkey is not a host rkey.
const KEY_TAG: u32 = 0x8000_0000;
/// Host lkey used to make the host fail a WR with a local protection error.
const POISON_LKEY: u32 = 0;
/// Q_Key of the host UD QPs that stand in for guest GSI QPs (QP1). Not IB's GSI Q_Key
/// 0x80010000: Q_Keys with bit 31 set are privileged (a host process needs CAP_NET_RAW to set one),
/// and only emulated QP1s use this one, so they receive from each other only.
const GSI_HOST_QKEY: u32 = 0x5076_5131;

/// Emulated QP1s of this process: (host device, port, guest GID) → host QPN of the UD QP that
/// stands in for QP 1 at that GID. A GSI send to "QP 1 at GID g" goes to that QPN.
static GSI_QPS: Mutex<BTreeMap<GsiKey, u32>> = Mutex::new(BTreeMap::new());

/// Host device, port, guest GID.
type GsiKey = (String, u8, [u8; 16]);

/// Host work request ids: bit 63 marks receives, bit 62 SRQ receives; the low 32 bits index the
/// pending-WR slab.
const WR_RECV: u64 = 1 << 63;
const WR_SRQ: u64 = 1 << 62;

fn host(e: String) -> Error {
    Error::Host(e)
}

use crate::sync::{lock, read, write};

/// Where the backend runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Host device name (`rxe0`, `mlx5_0`).
    pub ibdev: String,
    /// Host port (1-based).
    pub port: u8,
    /// The GIDs of the host port the guest may bind (its CREATE_BIND of any other fails): what
    /// the operator gave this device. A guest sends only from GIDs it bound.
    pub gids: Vec<Gid>,
}

struct RamMr {
    host: usize,
    len: usize,
    mr: verbs::Mr,
}

struct PdEntry {
    // Drop order: registrations before the PD.
    ram: Vec<RamMr>,
    ahs: Mutex<HashMap<verbs::HostAv, Arc<verbs::Ah>>>,
    pd: Arc<verbs::Pd>,
    users: u32,
}

struct MrEntry {
    pd: PdId,
    kind: MrKind,
    access: Access,
    lkey: u32,
    _remote: Option<RemoteMr>,
}

/// The host registration that gives a guest MR its rkey.
struct RemoteMr {
    // Drop order: deregister before unmapping the alias the registration covers.
    mr: verbs::Mr,
    /// The MR's pages mapped contiguously, when they are not contiguous in the guest mapping.
    _alias: Option<alias::Alias>,
}

struct CqEntry {
    cq: Arc<verbs::Cq>,
    cookie: u64,
    users: u32,
}

struct SrqEntry {
    srq: Arc<verbs::Srq>,
    pd: PdId,
    cookie: u64,
    users: AtomicU32,
    pending: Mutex<Slab>,
}

/// A host-contiguous run of a WR's memory: guest-physical address, host address, length, and
/// the lkey of the RAM registration it lies in.
type Run = (u64, usize, usize, u32);

/// A WR the host holds.
struct Pending {
    wr_id: u64,
    opcode: WcOpcode,
    signaled: bool,
    /// Bounce buffer and where its content goes (guest-physical runs) on success.
    bounce: Option<Bounce>,
    _ah: Option<Arc<verbs::Ah>>,
    /// The WR failed the backend's checks: it was posted to a QP moved to ERR, and its flush
    /// completion is reported with this status instead.
    failed: Option<WcStatus>,
    /// A UD receive: what it takes to check the datagram's destination GID and to post the
    /// receive again when the GID is not (or no longer) the guest's.
    ud_recv: Option<UdRecv>,
}

struct UdRecv {
    /// The host SGEs the receive was posted with.
    sges: Vec<verbs::HostSge>,
    /// Guest-physical runs of the receive's first 40 bytes (the GRH / IP header slot).
    head: Vec<(u64, usize)>,
}

struct Bounce {
    _mr: verbs::Mr,
    buf: Vec<u8>,
    copy_out: Vec<(u64, usize)>,
    _in_flight: InFlight,
}

/// A device's bounce buffers in flight.
struct BounceBudget {
    bytes: AtomicU64,
    limit: u64,
    /// A WR was refused for want of room: tell the device when room is made.
    starved: AtomicBool,
    sink: Arc<dyn CompletionSink>,
}

/// Bytes counted in a device's bounce buffers in flight, until dropped.
struct InFlight {
    bytes: u64,
    budget: Arc<BounceBudget>,
}

impl InFlight {
    /// Counts `bytes` in `budget`, unless that would pass its limit. A refusal is remembered:
    /// the device hears ([`CompletionSink::progress_needed`]) when buffers are given back, and
    /// posts what it kept.
    fn take(budget: &Arc<BounceBudget>, bytes: u64) -> Option<InFlight> {
        let try_take = || {
            budget
                .bytes
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    n.checked_add(bytes).filter(|&t| t <= budget.limit)
                })
                .is_ok()
        };
        if !try_take() {
            budget.starved.store(true, Ordering::Release);
            // Room made between the refusal and the flag would go unheard: look once more.
            if !try_take() {
                return None;
            }
        }
        Some(InFlight {
            bytes,
            budget: budget.clone(),
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.budget.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
        if self.budget.starved.swap(false, Ordering::AcqRel) {
            self.budget.sink.progress_needed();
        }
    }
}

/// Why [`Shared::prepare`] gives no host SGEs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unprepared {
    /// The WR completes in error with this status.
    Fail(WcStatus),
    /// Not now: bounce buffers in flight are at their limit (the WR is not taken).
    Busy,
}

#[derive(Default)]
struct Slab {
    slots: Vec<Option<Pending>>,
    free: Vec<u32>,
}

impl Slab {
    fn put(&mut self, p: Pending) -> u64 {
        if let Some(i) = self.free.pop() {
            self.slots[i as usize] = Some(p);
            u64::from(i)
        } else {
            self.slots.push(Some(p));
            (self.slots.len() - 1) as u64
        }
    }
    fn take(&mut self, i: u64) -> Option<Pending> {
        let i = (i & 0xffff_ffff) as usize;
        let p = self.slots.get_mut(i)?.take();
        if p.is_some() {
            self.free.push(i as u32);
        }
        p
    }
    fn clear(&mut self) {
        self.slots.clear();
        self.free.clear();
    }
}

struct QpEntry {
    qp: verbs::Qp,
    ty: QpType,
    pd: PdId,
    send_cq: CqId,
    recv_cq: CqId,
    srq: Option<SrqId>,
    cookie: u64,
    max_send_sge: u32,
    max_recv_sge: u32,
    /// Attributes the guest has set so far (the host needs some again on later transitions).
    attrs: Mutex<QpAttrs>,
    /// Serialises posts with the slab.
    pending: Mutex<Slab>,
    /// The host QP is known to be in ERR: the guest or the backend moved it there, or an RC error
    /// completion, a receive flush or a fatal event said so. Receives posted meanwhile are
    /// flushed by the backend (IB: WRs posted to a QP in ERR complete with a flush error; rxe
    /// 6.12 never completes a receive posted then).
    in_err: AtomicBool,
    /// Receives posted to the host and not completed yet.
    host_recvs: AtomicU32,
    /// Flush completions of receives posted in ERR, held until the receives posted to the host
    /// before them have completed (a receive queue completes in order), and when the first one
    /// was queued.
    flushed: Mutex<(Vec<WorkCompletion>, Option<Instant>)>,
}

impl QpEntry {
    fn set_err(&self) {
        self.in_err.store(true, Ordering::Release);
    }
}

#[derive(Default)]
struct Tables {
    /// The last id handed out (ids of every kind come from one sequence).
    next: u32,
    pds: HashMap<u32, PdEntry>,
    mrs: HashMap<u32, MrEntry>,
    /// Guest lkey → MR id.
    lkeys: HashMap<u32, u32>,
    cqs: HashMap<u32, CqEntry>,
    srqs: HashMap<u32, Arc<SrqEntry>>,
    /// QP id → host QP number.
    qp_ids: HashMap<u32, u32>,
}

impl Tables {
    /// A fresh id no live object of any kind has: the sequence wraps after 2^32 objects, and
    /// an id in use is skipped (the tables together hold far fewer than 2^32).
    fn new_id(&mut self) -> u32 {
        loop {
            self.next = self.next.wrapping_add(1).max(1);
            let id = self.next;
            let used = self.pds.contains_key(&id)
                || self.mrs.contains_key(&id)
                || self.cqs.contains_key(&id)
                || self.srqs.contains_key(&id)
                || self.qp_ids.contains_key(&id);
            if !used {
                return id;
            }
        }
    }

    /// A fresh MR id and its lkey (`gen`: 7 bits that vary the key between registrations).
    /// The lkey holds 24 bits of the id, so ids 2^24 apart would share one: an lkey a live MR
    /// holds is never handed out again, whatever the id sequence has come to.
    fn new_mr_key(&mut self, gen: u32) -> (u32, u32) {
        loop {
            let id = self.new_id();
            let lkey = KEY_TAG | ((id & 0xff_ffff) << 7) | (gen & 0x7f);
            if !self.lkeys.contains_key(&lkey) {
                return (id, lkey);
            }
        }
    }
}

struct Shared {
    ctx: Arc<verbs::Context>,
    ch: Arc<verbs::Channel>,
    cfg: Config,
    info: verbs::PortInfo,
    mem: GuestMem,
    sink: Arc<dyn CompletionSink>,
    t: Mutex<Tables>,
    /// Host QP number → QP; the completion thread delivers only for QPs in here.
    qps: RwLock<HashMap<u32, Arc<QpEntry>>>,
    /// Guest GID index → (GID, type, host GID index).
    gids: RwLock<Vec<Option<(Gid, GidType, u8)>>>,
    key_gen: AtomicU32,
    /// Bounce buffers in flight (bounded by [`MAX_BOUNCE_IN_FLIGHT`]).
    bounce: Arc<BounceBudget>,
    /// Receive flush completions queued by `post_recv` (a hint for the completion thread).
    flush_waiting: AtomicU32,
    /// Host QPN of the guest's GSI QP, if it has one (see [`GSI_QPS`]).
    gsi_qpn: Mutex<Option<u32>>,
    stop: AtomicBool,
}

/// The rdma-core backend of one device.
pub struct RdmaCoreBackend {
    s: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for RdmaCoreBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaCoreBackend")
            .field("ibdev", &self.s.cfg.ibdev)
            .field("port", &self.s.cfg.port)
            .finish_non_exhaustive()
    }
}

impl RdmaCoreBackend {
    /// Opens `cfg.ibdev` and starts the completion thread.
    pub fn new(
        cfg: Config,
        mem: GuestMem,
        sink: Arc<dyn CompletionSink>,
    ) -> Result<Arc<RdmaCoreBackend>> {
        let ctx = verbs::Context::open(&cfg.ibdev).map_err(host)?;
        let info = ctx.port_info(cfg.port).map_err(host)?;
        if info.state != 4 {
            log::warn!(
                "rdma-core: {} port {} is not ACTIVE (state {}), active MTU code {}",
                cfg.ibdev,
                cfg.port,
                info.state,
                info.active_mtu
            );
        }
        let ch = verbs::Channel::new(&ctx).map_err(host)?;
        let s = Arc::new(Shared {
            ctx,
            ch,
            cfg,
            info,
            mem,
            sink: sink.clone(),
            t: Mutex::new(Tables::default()),
            qps: RwLock::new(HashMap::new()),
            gids: RwLock::new(vec![None; MAX_GIDS]),
            key_gen: AtomicU32::new(1),
            bounce: Arc::new(BounceBudget {
                bytes: AtomicU64::new(0),
                limit: MAX_BOUNCE_IN_FLIGHT,
                starved: AtomicBool::new(false),
                sink: sink.clone(),
            }),
            flush_waiting: AtomicU32::new(0),
            gsi_qpn: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let s2 = s.clone();
        let th = std::thread::Builder::new()
            .name(format!("rdma-core-cq-{}", s.cfg.ibdev))
            .spawn(move || completion_thread(&s2))
            .map_err(|e| Error::Host(format!("spawning the completion thread: {e}")))?;
        Ok(Arc::new(RdmaCoreBackend {
            s,
            thread: Mutex::new(Some(th)),
        }))
    }
}

impl Drop for RdmaCoreBackend {
    fn drop(&mut self) {
        self.s.stop.store(true, Ordering::Relaxed);
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
        self.reset();
    }
}

fn completion_thread(s: &Shared) {
    let fds = [s.ch.fd(), s.ctx.async_fd()];
    let mut wcs = Vec::with_capacity(64);
    let mut out = Vec::with_capacity(64);
    while !s.stop.load(Ordering::Relaxed) {
        verbs::poll_fds(&fds, 50);
        while let Some(ev) = s.ctx.next_async_event() {
            s.async_event(ev);
        }
        s.deliver_flushed();
        while let Some(cq_addr) = s.ch.next_event() {
            let cq = {
                let t = lock(&s.t);
                t.cqs
                    .iter()
                    .find(|(_, c)| c.cq.addr() == cq_addr)
                    .map(|(id, c)| (CqId(*id), c.cq.clone()))
            };
            let Some((cq_id, cq)) = cq else { continue };
            if let Err(e) = cq.arm() {
                log::warn!("rdma-core: {e}");
            }
            loop {
                wcs.clear();
                cq.poll(&mut wcs, 32);
                if wcs.is_empty() {
                    break;
                }
                // An affiliated event the host raised before these completions (an SRQ limit
                // is raised when the receive is taken) goes out before them.
                while let Some(ev) = s.ctx.next_async_event() {
                    s.async_event(ev);
                }
                let qps = read(&s.qps);
                out.clear();
                for w in &wcs {
                    if let Some(wc) = s.translate(cq_id, &qps, w) {
                        out.push(wc);
                    }
                }
                if !out.is_empty() {
                    s.sink.complete(&out);
                }
            }
            s.deliver_flushed();
        }
    }
}

/// Longest wait for the host to complete the receives posted before a backend-flushed one (rxe
/// may drop a receive posted in the moment between the QP failing and the backend noticing).
const FLUSH_ORDER_WAIT: Duration = Duration::from_secs(1);

fn wc_status(s: u32) -> WcStatus {
    match s {
        0 => WcStatus::Success,
        1 => WcStatus::LocLenErr,
        2 => WcStatus::LocQpOpErr,
        4 => WcStatus::LocProtErr,
        5 => WcStatus::WrFlushErr,
        7 => WcStatus::BadRespErr,
        8 => WcStatus::LocAccessErr,
        9 => WcStatus::RemInvReqErr,
        10 => WcStatus::RemAccessErr,
        11 => WcStatus::RemOpErr,
        12 => WcStatus::RetryExcErr,
        13 => WcStatus::RnrRetryExcErr,
        19 => WcStatus::FatalErr,
        _ => WcStatus::GeneralErr,
    }
}

impl Shared {
    /// Delivers the receive flush completions `post_recv` queued, once the QP's earlier host
    /// receives have completed (or after [`FLUSH_ORDER_WAIT`]). Runs on the completion thread,
    /// after the host completions it polled, and under the QP table's read lock, so nothing is
    /// delivered for a QP once `destroy_qp` has returned.
    fn deliver_flushed(&self) {
        if self.flush_waiting.load(Ordering::Acquire) == 0 {
            return;
        }
        let qps = read(&self.qps);
        for q in qps.values() {
            let mut f = lock(&q.flushed);
            if f.0.is_empty() {
                continue;
            }
            let late = f.1.is_some_and(|t| t.elapsed() >= FLUSH_ORDER_WAIT);
            if q.host_recvs.load(Ordering::Acquire) == 0 || late {
                if late {
                    // Those host receives will not complete; do not wait for them again.
                    q.host_recvs.store(0, Ordering::Release);
                }
                let v = std::mem::take(&mut f.0);
                f.1 = None;
                self.sink.complete(&v);
                self.flushes_gone(v.len());
            }
        }
    }

    /// `n` queued receive flushes were delivered or dropped.
    fn flushes_gone(&self, n: usize) {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let _ = self
            .flush_waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                Some(w.saturating_sub(n))
            });
    }

    fn async_event(&self, ev: verbs::AsyncEv) {
        use verbs::AsyncEv as E;
        if let E::QpFatal(n) = ev {
            if let Some(q) = read(&self.qps).get(&n) {
                q.set_err();
            }
        }
        let qp_cookie = |n: u32| read(&self.qps).get(&n).map(|q| q.cookie);
        let ev = match ev {
            E::QpFatal(n) => qp_cookie(n).map(|c| AsyncEvent::QpFatal { qp_cookie: c }),
            E::QpReqErr(n) => qp_cookie(n).map(|c| AsyncEvent::QpReqErr { qp_cookie: c }),
            E::QpAccessErr(n) => qp_cookie(n).map(|c| AsyncEvent::QpAccessErr { qp_cookie: c }),
            E::QpLastWqe(n) => qp_cookie(n).map(|c| AsyncEvent::QpLastWqeReached { qp_cookie: c }),
            E::SrqLimit(a) => lock(&self.t)
                .srqs
                .values()
                .find(|s| s.srq.addr() == a)
                .map(|s| AsyncEvent::SrqLimitReached {
                    srq_cookie: s.cookie,
                }),
            E::Other => None,
        };
        if let Some(ev) = ev {
            self.sink.event(ev);
        }
    }

    fn translate(
        &self,
        cq: CqId,
        qps: &HashMap<u32, Arc<QpEntry>>,
        w: &verbs::HostWc,
    ) -> Option<WorkCompletion> {
        let qp = qps.get(&w.qp_num)?;
        let recv = w.wr_id & WR_RECV != 0;
        let p = if w.wr_id & WR_SRQ != 0 {
            let srq = lock(&self.t).srqs.get(&qp.srq?.0)?.clone();
            let p = lock(&srq.pending).take(w.wr_id);
            p
        } else {
            lock(&qp.pending).take(w.wr_id)
        }?;
        let mut status = wc_status(w.status);
        if recv && w.wr_id & WR_SRQ == 0 {
            let _ = qp
                .host_recvs
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        }
        if status != WcStatus::Success
            && (qp.ty == QpType::Rc || (recv && status == WcStatus::WrFlushErr))
        {
            // An RC error completion moves the QP to ERR; so does anything flushing receives.
            qp.set_err();
        }
        if let Some(f) = p.failed {
            if status == WcStatus::WrFlushErr {
                status = f;
            }
        }
        if status == WcStatus::Success {
            if let Some(b) = &p.bounce {
                let m = self.mem.memory();
                let mut at = 0usize;
                let limit = if recv {
                    w.byte_len as usize
                } else {
                    b.buf.len()
                };
                for &(gpa, n) in &b.copy_out {
                    if at >= limit {
                        break;
                    }
                    let n = n.min(limit - at);
                    let _ = m.write_slice(&b.buf[at..at + n], GuestAddress(gpa));
                    at += n;
                }
            }
            if !p.signaled && !recv {
                return None;
            }
            if recv && w.grh {
                if let Some(u) = &p.ud_recv {
                    if !self.owns_dest_gid(&u.head) {
                        // Addressed to a GID the guest does not hold (host QPNs are shared by
                        // every GID of the host device): not for this guest. The receive stays
                        // posted, as if the datagram had gone elsewhere.
                        self.repost_ud_recv(qp, p);
                        return None;
                    }
                }
            }
        }
        let opcode = if recv && status == WcStatus::Success && w.opcode == 129 {
            WcOpcode::RecvRdmaWithImm
        } else {
            p.opcode
        };
        // RC completions carry no source QP on the host; the guest expects the connected peer.
        let src_qp = if recv && qp.ty == QpType::Rc {
            lock(&qp.attrs).dest_qp_num.unwrap_or(w.src_qp)
        } else if recv && qp.ty == QpType::Gsi {
            // Only emulated QP1s send with GSI_HOST_QKEY.
            1
        } else {
            w.src_qp
        };
        Some(WorkCompletion {
            cq,
            qp_cookie: qp.cookie,
            wr_id: p.wr_id,
            status,
            opcode,
            byte_len: w.byte_len,
            imm_data: w.imm,
            src_qp,
            grh: w.grh,
            solicited: false,
        })
    }

    /// Translates guest SGEs to host SGEs of the PD's RAM registration (host-contiguous runs
    /// merged). `LocProtErr` when a check fails (the caller poisons the WR); `LocLenErr` when
    /// they make more than `max_runs` runs, which neither the device's SGEs nor a bounce buffer
    /// can carry (counted as they are built: aliased pages cost no more than that many steps).
    /// `need_write`: the MR must grant local write.
    fn host_sges(
        &self,
        t: &Tables,
        pd: PdId,
        sges: &[Sge],
        need_write: bool,
        max_runs: usize,
    ) -> std::result::Result<Vec<Run>, WcStatus> {
        let bad = WcStatus::LocProtErr;
        let pde = t.pds.get(&pd.0).ok_or(bad)?;
        let m = self.mem.memory();
        let mut out: Vec<Run> = Vec::new();
        for s in sges {
            if s.length == 0 {
                continue;
            }
            let mr = t
                .lkeys
                .get(&s.lkey)
                .and_then(|id| t.mrs.get(id))
                .ok_or(bad)?;
            if mr.pd != pd || (need_write && !mr.access.contains(Access::LOCAL_WRITE)) {
                return Err(bad);
            }
            let mut a = s.addr;
            let end = s.addr.checked_add(u64::from(s.length)).ok_or(bad)?;
            if let MrKind::User { iova, length, .. } = &mr.kind {
                if a < *iova || iova.checked_add(*length).is_none_or(|e| end > e) {
                    return Err(bad);
                }
            }
            while a < end {
                if out.len() > max_runs {
                    return Err(WcStatus::LocLenErr);
                }
                let n = (0x1000 - (a & 0xfff)).min(end - a);
                let gpa = match &mr.kind {
                    MrKind::Dma => a,
                    MrKind::User { iova, pages, .. } => {
                        let i = ((a - (iova & !0xfff)) >> 12) as usize;
                        pages.get(i).ok_or(bad)?.0 + (a & 0xfff)
                    }
                };
                let hva = m.get_host_address(GuestAddress(gpa)).map_err(|_| bad)? as usize;
                let reg = pde
                    .ram
                    .iter()
                    .find(|r| hva >= r.host && hva + n as usize <= r.host + r.len)
                    .ok_or(bad)?;
                match out.last_mut() {
                    Some(l) if l.1 + l.2 == hva && l.3 == reg.mr.lkey => l.2 += n as usize,
                    _ => out.push((gpa, hva, n as usize, reg.mr.lkey)),
                }
                a += n;
            }
        }
        Ok(out)
    }

    /// Host SGEs for a WR, or a bounce buffer when there are too many runs. `copy_in`: the data
    /// goes out of guest memory (SEND/WRITE). If it cannot be posted: the status of its error
    /// completion (a bad SGE: `LocProtErr`; a bounce buffer past [`MAX_BOUNCE`]: `LocLenErr`),
    /// or `Busy` while bounce buffers in flight are at [`MAX_BOUNCE_IN_FLIGHT`].
    fn prepare(
        &self,
        t: &Tables,
        pd: PdId,
        sges: &[Sge],
        need_write: bool,
        copy_in: bool,
        max_sge: u32,
    ) -> std::result::Result<(Vec<verbs::HostSge>, Option<Bounce>), Unprepared> {
        let fail = Unprepared::Fail;
        // Past this many runs only a bounce buffer could carry the WR, and it would pass
        // MAX_BOUNCE: a run is at most a page, plus a partial page at each end of each SGE.
        let max_runs = (max_sge as usize).max(MAX_BOUNCE / 4096 + 2 * crate::MAX_SGE);
        let runs = self
            .host_sges(t, pd, sges, need_write, max_runs)
            .map_err(fail)?;
        if runs.len() <= max_sge as usize {
            let v = runs
                .iter()
                .map(|&(_, hva, n, lkey)| verbs::HostSge {
                    addr: hva as u64,
                    length: n as u32,
                    lkey,
                })
                .collect();
            return Ok((v, None));
        }
        let total: usize = runs.iter().map(|r| r.2).sum();
        if total > MAX_BOUNCE {
            return Err(fail(WcStatus::LocLenErr));
        }
        let in_flight = InFlight::take(&self.bounce, total as u64).ok_or(Unprepared::Busy)?;
        let mut buf = vec![0u8; total];
        if copy_in {
            let m = self.mem.memory();
            let mut at = 0;
            for &(gpa, _, n, _) in &runs {
                m.read_slice(&mut buf[at..at + n], GuestAddress(gpa))
                    .map_err(|_| fail(WcStatus::LocProtErr))?;
                at += n;
            }
        }
        let pde = t.pds.get(&pd.0).ok_or(fail(WcStatus::LocProtErr))?;
        let mr = verbs::Mr::register(
            &pde.pd,
            buf.as_ptr() as usize,
            buf.len(),
            None,
            Access::LOCAL_WRITE.bits(),
        )
        .map_err(|e| {
            log::warn!("rdma-core: bounce buffer: {e}");
            fail(WcStatus::LocProtErr)
        })?;
        let sge = verbs::HostSge {
            addr: buf.as_ptr() as u64,
            // At most MAX_BOUNCE.
            length: total as u32,
            lkey: mr.lkey,
        };
        let copy_out = if copy_in {
            Vec::new()
        } else {
            runs.iter().map(|r| (r.0, r.2)).collect()
        };
        Ok((
            vec![sge],
            Some(Bounce {
                _mr: mr,
                buf,
                copy_out,
                _in_flight: in_flight,
            }),
        ))
    }

    fn gsi_key(&self, gid: Gid) -> GsiKey {
        (self.cfg.ibdev.clone(), self.cfg.port, gid.0)
    }

    /// Publishes the guest's QP1 at `gid` (when it has a GSI QP).
    fn gsi_register(&self, gid: Gid) {
        if let Some(qpn) = *lock(&self.gsi_qpn) {
            lock(&GSI_QPS).insert(self.gsi_key(gid), qpn);
        }
    }

    /// Withdraws the guest's QP1 at `gid`.
    fn gsi_unregister(&self, gid: Gid) {
        if let Some(qpn) = *lock(&self.gsi_qpn) {
            let mut r = lock(&GSI_QPS);
            let k = self.gsi_key(gid);
            if r.get(&k) == Some(&qpn) {
                r.remove(&k);
            }
        }
    }

    /// Withdraws the guest's QP1 everywhere and forgets it.
    fn gsi_drop(&self) {
        if let Some(qpn) = lock(&self.gsi_qpn).take() {
            lock(&GSI_QPS).retain(|(dev, port, _), v| {
                !(*v == qpn && *dev == self.cfg.ibdev && *port == self.cfg.port)
            });
        }
    }

    /// Whether the destination of the datagram whose GRH slot is at `head` (IPv6 header, or IPv4
    /// header in its last 20 bytes for IPv4-mapped GIDs) is one of the guest's GIDs.
    fn owns_dest_gid(&self, head: &[(u64, usize)]) -> bool {
        let m = self.mem.memory();
        let mut g = [0u8; 40];
        let mut at = 0;
        for &(gpa, n) in head {
            if m.read_slice(&mut g[at..at + n], GuestAddress(gpa)).is_err() {
                return true;
            }
            at += n;
        }
        if at < 40 {
            return true;
        }
        let mut dgid = [0u8; 16];
        if g[20] >> 4 == 4 && g[0] >> 4 != 6 {
            dgid[10] = 0xff;
            dgid[11] = 0xff;
            dgid[12..].copy_from_slice(&g[36..40]);
        } else {
            dgid.copy_from_slice(&g[24..40]);
        }
        read(&self.gids)
            .iter()
            .any(|e| e.is_some_and(|(gid, _, _)| gid.0 == dgid))
    }

    /// Posts a UD receive whose datagram was not for the guest again.
    fn repost_ud_recv(&self, qp: &QpEntry, p: Pending) {
        let Some(mut sges) = p.ud_recv.as_ref().map(|u| u.sges.clone()) else {
            return;
        };
        let mut pend = lock(&qp.pending);
        let slot = pend.put(p);
        if let Err(rc) = qp.qp.post_recv(slot | WR_RECV, &mut sges) {
            pend.take(slot);
            log::warn!("rdma-core: posting a UD receive again: errno {rc}");
        } else {
            // The completion decremented it; the receive is outstanding again.
            qp.host_recvs.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The host GID index of the guest's GID entry `guest_index`, if the guest bound it.
    fn host_gid_index(&self, guest_index: u8) -> Option<u8> {
        read(&self.gids)
            .get(usize::from(guest_index))
            .and_then(|g| g.map(|g| g.2))
    }

    /// The host address vector of `av`, and whether its source GID is one the guest bound
    /// (if not, the host's GID 0 stands in, for a WR that is only flushed: never sent).
    fn host_av(&self, av: &crate::AddressVector) -> (verbs::HostAv, bool) {
        let sgid = self.host_gid_index(av.sgid_index);
        let hav = verbs::HostAv {
            dgid: av.dgid.0,
            sgid_index: sgid.unwrap_or(0),
            hop_limit: av.hop_limit,
            traffic_class: av.traffic_class,
            flow_label: av.flow_label,
            sl: av.sl,
            port: self.cfg.port,
        };
        (hav, sgid.is_some())
    }
}

/// The Q_Key the host QP gets: the guest's, except for an emulated QP1.
fn host_qkey(ty: QpType, guest: Option<u32>) -> u32 {
    if ty == QpType::Gsi {
        GSI_HOST_QKEY
    } else {
        guest.unwrap_or(0)
    }
}

/// Longest wait for a QP in SQD to finish draining before a transition out of SQD.
const SQD_DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Waits (at most [`SQD_DRAIN_WAIT`]) until the host QP no longer reports `sq_draining`.
fn wait_drained(qp: &verbs::Qp) {
    let deadline = std::time::Instant::now() + SQD_DRAIN_WAIT;
    let mut pause = std::time::Duration::from_micros(100);
    loop {
        match qp.state_draining() {
            Ok((S::IBV_QPS_SQD, true)) => {}
            Ok(_) => return,
            Err(e) => {
                log::warn!("rdma-core: {e}");
                return;
            }
        }
        if std::time::Instant::now() >= deadline {
            log::warn!("rdma-core: QP still draining after {SQD_DRAIN_WAIT:?}");
            return;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(20));
    }
}

/// Each page as a page of the file backing its guest RAM region, or `None` when some page's
/// region is anonymous or a private mapping (an alias would not share its pages).
fn file_pages<'m>(
    m: &'m GuestMemoryMmap,
    pages: &[GuestAddress],
) -> Option<Vec<alias::FilePage<'m>>> {
    pages
        .iter()
        .map(|&p| {
            let r = m.find_region(p)?;
            if r.flags() & libc::MAP_SHARED == 0 || p.0 % alias::PAGE as u64 != 0 {
                return None;
            }
            let fo = r.file_offset()?;
            let offset = fo.start().checked_add(p.0 - r.start_addr().0)?;
            Some(alias::FilePage {
                fd: fo.file().as_fd(),
                offset,
            })
        })
        .collect()
}

fn qp_state_from_host(s: u32) -> QpState {
    match s {
        S::IBV_QPS_RESET => QpState::Reset,
        S::IBV_QPS_INIT => QpState::Init,
        S::IBV_QPS_RTR => QpState::Rtr,
        S::IBV_QPS_RTS => QpState::Rts,
        S::IBV_QPS_SQD => QpState::Sqd,
        S::IBV_QPS_SQE => QpState::Sqe,
        _ => QpState::Err,
    }
}

fn merge(into: &mut QpAttrs, a: &QpAttrs) {
    macro_rules! m {
        ($($f:ident),*) => { $( if a.$f.is_some() { into.$f = a.$f; } )* };
    }
    m!(
        path_mtu,
        qkey,
        rq_psn,
        sq_psn,
        dest_qp_num,
        access,
        pkey_index,
        max_rd_atomic,
        max_dest_rd_atomic,
        min_rnr_timer,
        timeout,
        retry_cnt,
        rnr_retry,
        port_num,
        ah
    );
}

impl Backend for RdmaCoreBackend {
    fn name(&self) -> &'static str {
        "rdma-core"
    }

    fn add_gid(&self, index: u32, gid: Gid, ty: GidType) -> Result<()> {
        let i = index as usize;
        if i >= MAX_GIDS {
            return Err(Error::Invalid("GID index"));
        }
        let want = match ty {
            GidType::RoceV1 => consts::GID_ROCE_V1,
            GidType::RoceV2 => consts::GID_ROCE_V2,
        };
        let s = &self.s;
        if !s.cfg.gids.contains(&gid) {
            return Err(Error::Invalid(
                "a GID the operator did not give this device",
            ));
        }
        let found = (0..s.info.gid_tbl_len.min(256))
            .find(|&h| s.ctx.gid(s.cfg.port, h) == Some((gid.0, want)));
        let Some(h) = found else {
            return Err(Error::Host(format!(
                "GID {gid:?} ({ty:?}) is not in the GID table of {} port {}: give the host \
                 netdev the guest's address",
                s.cfg.ibdev, s.cfg.port
            )));
        };
        let old = write(&s.gids)[i].replace((gid, ty, h as u8));
        if let Some((g, _, _)) = old {
            s.gsi_unregister(g);
        }
        s.gsi_register(gid);
        Ok(())
    }

    fn del_gid(&self, index: u32) -> Result<()> {
        let old = write(&self.s.gids)
            .get_mut(index as usize)
            .ok_or(Error::Invalid("GID index"))?
            .take();
        if let Some((g, _, _)) = old {
            self.s.gsi_unregister(g);
        }
        Ok(())
    }

    /// Each PD registers all of guest RAM once more (its QPs may only use MRs of their own
    /// host PD): the host keeps a page list of it, ~8 bytes per 4 KiB page.
    fn pd_bytes(&self) -> u64 {
        let ram: u64 = self.s.mem.memory().iter().map(|r| r.len()).sum();
        4096 + ram / 4096 * 8
    }

    fn create_pd(&self) -> Result<PdId> {
        let s = &self.s;
        let pd = verbs::Pd::new(&s.ctx).map_err(host)?;
        let mut ram = Vec::new();
        for r in s.mem.memory().iter() {
            let Some(host) = r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok() else {
                continue;
            };
            let len = r.len() as usize;
            let mr = verbs::Mr::register(&pd, host as usize, len, None, Access::LOCAL_WRITE.bits())
                .map_err(|e| Error::Host(format!("registering guest RAM: {e}")))?;
            ram.push(RamMr {
                host: host as usize,
                len,
                mr,
            });
        }
        let mut t = lock(&s.t);
        let id = t.new_id();
        t.pds.insert(
            id,
            PdEntry {
                ram,
                ahs: Mutex::new(HashMap::new()),
                pd,
                users: 0,
            },
        );
        Ok(PdId(id))
    }

    fn destroy_pd(&self, pd: PdId) -> Result<()> {
        let mut t = lock(&self.s.t);
        let e = t.pds.get(&pd.0).ok_or(Error::NoSuchObject("PD"))?;
        if e.users > 0 {
            return Err(Error::Busy("PD"));
        }
        t.pds.remove(&pd.0);
        Ok(())
    }

    fn create_mr(&self, pd: PdId, kind: MrKind, access: Access) -> Result<MrKeys> {
        if let MrKind::User {
            iova,
            length,
            pages,
        } = &kind
        {
            // The page list must cover [iova, iova + length): host registrations span that much.
            let end = iova
                .checked_add(*length)
                .ok_or(Error::Invalid("MR wraps around"))?;
            let npages = end.div_ceil(0x1000) - iova / 0x1000;
            if (pages.len() as u64) < npages {
                return Err(Error::Invalid("MR page list too short"));
            }
        }
        let s = &self.s;
        let mut t = lock(&s.t);
        let pde = t.pds.get(&pd.0).ok_or(Error::NoSuchObject("PD"))?;
        let remote =
            access.intersects(Access::REMOTE_WRITE | Access::REMOTE_READ | Access::REMOTE_ATOMIC);
        let mut remote_mr = None;
        if let (
            true,
            MrKind::User {
                iova,
                length,
                pages,
            },
        ) = (remote, &kind)
        {
            if pages.is_empty() || *length == 0 {
                return Err(Error::Invalid("MR length"));
            }
            // Host-contiguous pages: one host registration with the guest's iova.
            let m = s.mem.memory();
            let hvas: Option<Vec<usize>> = pages
                .iter()
                .map(|p| m.get_host_address(*p).ok().map(|h| h as usize))
                .collect();
            let hvas = hvas.ok_or(Error::Invalid("MR page outside guest memory"))?;
            let first = (*iova & 0xfff) as usize;
            let len = usize::try_from(*length).map_err(|_| Error::Invalid("MR length"))?;
            let access = access.bits() & 0xf;
            if hvas.windows(2).all(|w| w[1] == w[0] + 0x1000) {
                let mr = verbs::Mr::register(&pde.pd, hvas[0] + first, len, Some(*iova), access)
                    .map_err(host)?;
                remote_mr = Some(RemoteMr { mr, _alias: None });
            } else if let Some(file_pages) = file_pages(&m, pages) {
                // Scattered pages of file-backed guest RAM: map them contiguously once more.
                let a = alias::Alias::new(&file_pages)
                    .map_err(|e| Error::Host(format!("mapping the MR's pages: {e}")))?;
                if first + len > a.size() {
                    return Err(Error::Invalid("MR page list too short"));
                }
                let mr = verbs::Mr::register(&pde.pd, a.addr() + first, len, Some(*iova), access)
                    .map_err(host)?;
                remote_mr = Some(RemoteMr {
                    mr,
                    _alias: Some(a),
                });
            } else {
                log::warn!(
                    "rdma-core: MR at iova {iova:#x} ({} pages) is not contiguous in the host \
                     mapping and guest RAM is not a shared file mapping: remote access to it is \
                     not possible (its rkey matches no host MR)",
                    pages.len()
                );
            }
        }
        let gen = s.key_gen.fetch_add(1, Ordering::Relaxed);
        let (id, lkey) = t.new_mr_key(gen);
        let rkey = remote_mr.as_ref().map_or(lkey ^ 0x4000_0000, |m| m.mr.rkey);
        t.lkeys.insert(lkey, id);
        t.pds.get_mut(&pd.0).expect("checked").users += 1;
        t.mrs.insert(
            id,
            MrEntry {
                pd,
                kind,
                access,
                lkey,
                _remote: remote_mr,
            },
        );
        Ok(MrKeys {
            id: MrId(id),
            lkey,
            rkey,
        })
    }

    fn destroy_mr(&self, mr: MrId) -> Result<()> {
        let mut t = lock(&self.s.t);
        let e = t.mrs.remove(&mr.0).ok_or(Error::NoSuchObject("MR"))?;
        t.lkeys.remove(&e.lkey);
        if let Some(p) = t.pds.get_mut(&e.pd.0) {
            p.users -= 1;
        }
        Ok(())
    }

    fn create_cq(&self, cqe: u32, cookie: u64) -> Result<CqId> {
        let s = &self.s;
        // Every host send is signaled (see post_send), so leave room beyond the guest's depth.
        let n = cqe.saturating_mul(2).clamp(64, s.info.max_cqe);
        let cq = verbs::Cq::new(&s.ctx, &s.ch, n).map_err(host)?;
        let mut t = lock(&s.t);
        let id = t.new_id();
        t.cqs.insert(
            id,
            CqEntry {
                cq,
                cookie,
                users: 0,
            },
        );
        let _ = cookie;
        Ok(CqId(id))
    }

    fn destroy_cq(&self, cq: CqId) -> Result<()> {
        let mut t = lock(&self.s.t);
        let e = t.cqs.get(&cq.0).ok_or(Error::NoSuchObject("CQ"))?;
        if e.users > 0 {
            return Err(Error::Busy("CQ"));
        }
        let _ = e.cookie;
        t.cqs.remove(&cq.0);
        Ok(())
    }

    fn create_srq(
        &self,
        pd: PdId,
        max_wr: u32,
        max_sge: u32,
        limit: u32,
        cookie: u64,
    ) -> Result<SrqId> {
        let mut t = lock(&self.s.t);
        let pde = t.pds.get_mut(&pd.0).ok_or(Error::NoSuchObject("PD"))?;
        let srq = verbs::Srq::new(&pde.pd, max_wr.max(1), max_sge.max(1), limit).map_err(host)?;
        pde.users += 1;
        let id = t.new_id();
        t.srqs.insert(
            id,
            Arc::new(SrqEntry {
                srq,
                pd,
                cookie,
                users: AtomicU32::new(0),
                pending: Mutex::new(Slab::default()),
            }),
        );
        Ok(SrqId(id))
    }

    fn modify_srq(&self, srq: SrqId, limit: u32) -> Result<()> {
        let e = lock(&self.s.t)
            .srqs
            .get(&srq.0)
            .cloned()
            .ok_or(Error::NoSuchObject("SRQ"))?;
        e.srq.set_limit(limit).map_err(host)
    }

    fn destroy_srq(&self, srq: SrqId) -> Result<()> {
        let mut t = lock(&self.s.t);
        let e = t.srqs.get(&srq.0).ok_or(Error::NoSuchObject("SRQ"))?;
        if e.users.load(Ordering::Relaxed) > 0 {
            return Err(Error::Busy("SRQ"));
        }
        let pd = e.pd;
        t.srqs.remove(&srq.0);
        if let Some(p) = t.pds.get_mut(&pd.0) {
            p.users -= 1;
        }
        Ok(())
    }

    fn post_srq_recv(&self, srq: SrqId, wr: &RecvWr) -> Result<()> {
        let s = &self.s;
        let t = lock(&s.t);
        let e = t
            .srqs
            .get(&srq.0)
            .ok_or(Error::NoSuchObject("SRQ"))?
            .clone();
        let prep = s.prepare(&t, e.pd, wr.sges.as_slice(), true, false, s.info.max_sge);
        drop(t);
        if prep.as_ref().err() == Some(&Unprepared::Busy) {
            return Err(Error::QueueFull);
        }
        let prep = prep.ok();
        let (mut sges, bounce) = prep.unwrap_or_else(|| (vec![poison_sge()], None));
        let mut pend = lock(&e.pending);
        let slot = pend.put(Pending {
            wr_id: wr.wr_id,
            opcode: WcOpcode::Recv,
            signaled: true,
            bounce,
            _ah: None,
            failed: None,
            ud_recv: None,
        });
        if let Err(rc) = e.srq.post_recv(slot | WR_RECV | WR_SRQ, &mut sges) {
            pend.take(slot);
            return Err(post_err(rc));
        }
        Ok(())
    }

    fn create_qp(&self, init: &QpInit) -> Result<(QpId, u32)> {
        let s = &self.s;
        let ud = init.qp_type != QpType::Rc;
        let mut t = lock(&s.t);
        if init.qp_type == QpType::Gsi && lock(&s.gsi_qpn).is_some() {
            return Err(Error::Invalid("the device has a GSI QP already"));
        }
        let pd = t
            .pds
            .get(&init.pd.0)
            .ok_or(Error::NoSuchObject("PD"))?
            .pd
            .clone();
        let scq = t
            .cqs
            .get(&init.send_cq.0)
            .ok_or(Error::NoSuchObject("CQ"))?
            .cq
            .clone();
        let rcq = t
            .cqs
            .get(&init.recv_cq.0)
            .ok_or(Error::NoSuchObject("CQ"))?
            .cq
            .clone();
        let srq = match init.srq {
            Some(id) => Some(
                t.srqs
                    .get(&id.0)
                    .ok_or(Error::NoSuchObject("SRQ"))?
                    .srq
                    .clone(),
            ),
            None => None,
        };
        let caps = verbs::QpCaps {
            max_send_wr: init.max_send_wr.clamp(1, s.info.max_qp_wr),
            max_recv_wr: if srq.is_some() {
                0
            } else {
                init.max_recv_wr.clamp(1, s.info.max_qp_wr)
            },
            max_send_sge: init.max_send_sge.clamp(1, s.info.max_sge),
            max_recv_sge: if srq.is_some() {
                0
            } else {
                init.max_recv_sge.clamp(1, s.info.max_sge)
            },
        };
        let qp = verbs::Qp::new(&pd, &scq, &rcq, srq.as_ref(), ud, caps).map_err(host)?;
        let qpn = qp.qp_num;
        t.pds.get_mut(&init.pd.0).expect("checked").users += 1;
        t.cqs.get_mut(&init.send_cq.0).expect("checked").users += 1;
        t.cqs.get_mut(&init.recv_cq.0).expect("checked").users += 1;
        if let Some(id) = init.srq {
            if let Some(e) = t.srqs.get(&id.0) {
                e.users.fetch_add(1, Ordering::Relaxed);
            }
        }
        let id = t.new_id();
        t.qp_ids.insert(id, qpn);
        let e = Arc::new(QpEntry {
            qp,
            ty: init.qp_type,
            pd: init.pd,
            send_cq: init.send_cq,
            recv_cq: init.recv_cq,
            srq: init.srq,
            cookie: init.cookie,
            max_send_sge: caps.max_send_sge,
            max_recv_sge: caps.max_recv_sge.max(1),
            attrs: Mutex::new(QpAttrs::default()),
            pending: Mutex::new(Slab::default()),
            in_err: AtomicBool::new(false),
            host_recvs: AtomicU32::new(0),
            flushed: Mutex::new((Vec::new(), None)),
        });
        write(&s.qps).insert(qpn, e);
        if init.qp_type == QpType::Gsi {
            // QP1 emulated by a host UD QP, published under each of the guest's GIDs.
            *lock(&s.gsi_qpn) = Some(qpn);
            let gids: Vec<Gid> = read(&s.gids).iter().flatten().map(|g| g.0).collect();
            for g in gids {
                s.gsi_register(g);
            }
            return Ok((QpId(id), 1));
        }
        Ok((QpId(id), qpn))
    }

    fn modify_qp(&self, qp: QpId, attrs: &QpAttrs) -> Result<()> {
        let s = &self.s;
        let e = self.qp(qp)?;
        if let Some(m) = attrs.path_mtu {
            if !(1..=5).contains(&m) {
                return Err(Error::Invalid("path MTU"));
            }
        }
        if e.ty == QpType::Ud && attrs.qkey == Some(GSI_HOST_QKEY) {
            // Reserved for emulated QP1s: a guest UD QP must not receive their traffic.
            return Err(Error::Invalid("Q_Key reserved by the backend for QP1"));
        }
        let cur = qp_state_from_host(e.qp.state().map_err(host)?);
        let to = attrs.state.unwrap_or(cur);
        if attrs.state.is_some() && !cur.can_transition_to(to) {
            return Err(Error::BadTransition { from: cur, to });
        }
        let mut sh = lock(&e.attrs);
        merge(&mut sh, attrs);
        let mut h = verbs::HostQpAttr::default();
        let mut mask = 0u32;
        macro_rules! set {
            ($bit:ident, $field:ident, $v:expr) => {{
                mask |= QpMask::$bit.0;
                h.$field = $v;
            }};
        }
        if attrs.state.is_some() {
            set!(IBV_QP_STATE, state, to as u32);
        }
        let ud = e.ty != QpType::Rc;
        // Required attributes of the transition come from what the guest set now or earlier,
        // with IB's usual defaults for any it never set.
        let entering = |st| attrs.state == Some(st) && cur != st;
        let port = sh.port_num.unwrap_or(s.cfg.port);
        let _ = port;
        if entering(QpState::Init) || (cur == QpState::Init && to == QpState::Init) {
            set!(IBV_QP_PKEY_INDEX, pkey_index, sh.pkey_index.unwrap_or(0));
            // The guest's port number is its own (1); the host port is configured.
            set!(IBV_QP_PORT, port_num, s.cfg.port);
            if ud {
                set!(IBV_QP_QKEY, qkey, host_qkey(e.ty, sh.qkey));
            } else {
                set!(
                    IBV_QP_ACCESS_FLAGS,
                    access,
                    sh.access.map_or(0, |a| a.bits() & 0xf)
                );
            }
        } else {
            if attrs.qkey.is_some() {
                set!(IBV_QP_QKEY, qkey, host_qkey(e.ty, sh.qkey));
            }
            if attrs.access.is_some() && !ud {
                set!(
                    IBV_QP_ACCESS_FLAGS,
                    access,
                    sh.access.map_or(0, |a| a.bits() & 0xf)
                );
            }
        }
        if entering(QpState::Rtr) && !ud {
            set!(
                IBV_QP_PATH_MTU,
                path_mtu,
                u32::from(sh.path_mtu.unwrap_or(3))
            );
            set!(IBV_QP_DEST_QPN, dest_qp_num, sh.dest_qp_num.unwrap_or(0));
            set!(IBV_QP_RQ_PSN, rq_psn, sh.rq_psn.unwrap_or(0));
            set!(
                IBV_QP_MAX_DEST_RD_ATOMIC,
                max_dest_rd_atomic,
                sh.max_dest_rd_atomic.unwrap_or(0)
            );
            set!(
                IBV_QP_MIN_RNR_TIMER,
                min_rnr_timer,
                sh.min_rnr_timer.unwrap_or(0)
            );
            // No path given: loop back to our own GID 0 (a real guest always gives one).
            let av = sh.ah.unwrap_or_else(|| crate::AddressVector {
                dgid: read(&s.gids)[0].map(|g| g.0).unwrap_or_default(),
                hop_limit: 64,
                ..Default::default()
            });
            mask |= QpMask::IBV_QP_AV.0;
            let (hav, bound) = s.host_av(&av);
            if !bound {
                return Err(Error::Invalid("the path's source GID index is not bound"));
            }
            h.av = Some(hav);
        }
        if entering(QpState::Rts) && cur == QpState::Rtr {
            set!(IBV_QP_SQ_PSN, sq_psn, sh.sq_psn.unwrap_or(0));
            if !ud {
                set!(IBV_QP_TIMEOUT, timeout, sh.timeout.unwrap_or(14));
                set!(IBV_QP_RETRY_CNT, retry_cnt, sh.retry_cnt.unwrap_or(7));
                set!(IBV_QP_RNR_RETRY, rnr_retry, sh.rnr_retry.unwrap_or(7));
                set!(
                    IBV_QP_MAX_QP_RD_ATOMIC,
                    max_rd_atomic,
                    sh.max_rd_atomic.unwrap_or(0)
                );
            }
        }
        h.mask = mask;
        if to == QpState::Reset {
            // The host drops queued work silently; so do we.
            let mut p = lock(&e.pending);
            e.qp.modify(&h)
                .map_err(|rc| Error::Host(format!("ibv_modify_qp: errno {rc}")))?;
            p.clear();
            *sh = QpAttrs::default();
            e.in_err.store(false, Ordering::Release);
            e.host_recvs.store(0, Ordering::Release);
            let dropped = std::mem::take(&mut lock(&e.flushed).0).len();
            s.flushes_gone(dropped);
            return Ok(());
        }
        if mask == 0 {
            return Ok(());
        }
        if cur == QpState::Sqd && attrs.state.is_some() && to != QpState::Sqd && to != QpState::Err
        {
            // A QP may leave SQD once its SQ has drained (IB's "SQ drained" point); rxe refuses
            // with EINVAL before that, and the guest's modify may come right after the one to
            // SQD. Wait a bounded time for the drain, then let the host decide.
            wait_drained(&e.qp);
        }
        e.qp.modify(&h).map_err(|rc| {
            Error::Host(format!(
                "ibv_modify_qp {cur:?} -> {to:?} (mask {mask:#x}): {}",
                std::io::Error::from_raw_os_error(rc)
            ))
        })?;
        if to == QpState::Err {
            e.set_err();
        }
        Ok(())
    }

    fn query_qp_state(&self, qp: QpId) -> Result<QpState> {
        let e = self.qp(qp)?;
        Ok(qp_state_from_host(e.qp.state().map_err(host)?))
    }

    fn destroy_qp(&self, qp: QpId) -> Result<()> {
        let s = &self.s;
        let mut t = lock(&s.t);
        let qpn = t.qp_ids.remove(&qp.0).ok_or(Error::NoSuchObject("QP"))?;
        let e = write(&s.qps).remove(&qpn);
        if e.as_ref().is_some_and(|e| e.ty == QpType::Gsi) {
            s.gsi_drop();
        }
        if let Some(e) = &e {
            s.flushes_gone(lock(&e.flushed).0.len());
        }
        if let Some(e) = e {
            if let Some(p) = t.pds.get_mut(&e.pd.0) {
                p.users -= 1;
            }
            for c in [e.send_cq, e.recv_cq] {
                if let Some(c) = t.cqs.get_mut(&c.0) {
                    c.users -= 1;
                }
            }
            if let Some(srq) = e.srq {
                if let Some(x) = t.srqs.get(&srq.0) {
                    x.users.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    fn post_send(&self, qp: QpId, wr: &SendWr) -> Result<()> {
        let s = &self.s;
        let e = self.qp(qp)?;
        let (opcode, hop, need_write, copy_in) = match wr.op {
            SendOp::Send { imm } => (
                WcOpcode::Send,
                if imm.is_some() {
                    Op::IBV_WR_SEND_WITH_IMM
                } else {
                    Op::IBV_WR_SEND
                },
                false,
                true,
            ),
            SendOp::RdmaWrite { imm, .. } => (
                WcOpcode::RdmaWrite,
                if imm.is_some() {
                    Op::IBV_WR_RDMA_WRITE_WITH_IMM
                } else {
                    Op::IBV_WR_RDMA_WRITE
                },
                false,
                true,
            ),
            SendOp::RdmaRead { .. } => (WcOpcode::RdmaRead, Op::IBV_WR_RDMA_READ, true, false),
            SendOp::CmpSwap { .. } => (
                WcOpcode::CompSwap,
                Op::IBV_WR_ATOMIC_CMP_AND_SWP,
                true,
                false,
            ),
            SendOp::FetchAdd { .. } => (
                WcOpcode::FetchAdd,
                Op::IBV_WR_ATOMIC_FETCH_AND_ADD,
                true,
                false,
            ),
        };
        let mut op = verbs::HostSend {
            opcode: hop,
            flags: consts::SEND_SIGNALED
                | if wr.solicited {
                    consts::SEND_SOLICITED
                } else {
                    0
                },
            imm: 0,
            remote_addr: 0,
            rkey: 0,
            compare_add: 0,
            swap: 0,
            ud: None,
        };
        match wr.op {
            SendOp::Send { imm } => op.imm = imm.unwrap_or(0),
            SendOp::RdmaWrite {
                remote_addr,
                rkey,
                imm,
            } => (op.remote_addr, op.rkey, op.imm) = (remote_addr, rkey, imm.unwrap_or(0)),
            SendOp::RdmaRead { remote_addr, rkey } => {
                (op.remote_addr, op.rkey) = (remote_addr, rkey)
            }
            SendOp::CmpSwap {
                remote_addr,
                rkey,
                compare,
                swap,
            } => {
                (op.remote_addr, op.rkey, op.compare_add, op.swap) =
                    (remote_addr, rkey, compare, swap)
            }
            SendOp::FetchAdd {
                remote_addr,
                rkey,
                add,
            } => (op.remote_addr, op.rkey, op.compare_add) = (remote_addr, rkey, add),
        }
        let t = lock(&s.t);
        let mut prep = s.prepare(
            &t,
            e.pd,
            wr.sges.as_slice(),
            need_write,
            copy_in,
            e.max_send_sge,
        );
        let mut ah = None;
        if e.ty != QpType::Rc {
            let d = wr
                .ud
                .ok_or(Error::Invalid("UD send without a destination"))?;
            let pde = t.pds.get(&e.pd.0).ok_or(Error::NoSuchObject("PD"))?;
            let (av, bound) = s.host_av(&d.av);
            if !bound {
                // Never sent: the WR completes in error (the QP is moved to ERR below).
                prep = Err(Unprepared::Fail(WcStatus::LocQpOpErr));
            }
            let mut cache = lock(&pde.ahs);
            let a = match cache.get(&av) {
                Some(a) => a.clone(),
                None => {
                    let a = verbs::Ah::new(&pde.pd, av).map_err(host)?;
                    if cache.len() >= MAX_CACHED_AHS {
                        cache.clear();
                    }
                    cache.insert(av, a.clone());
                    a
                }
            };
            let (qpn, qkey) = if e.ty == QpType::Gsi {
                // MADs go from QP1 to QP1: to the emulated QP1 published at the destination
                // GID; with none there, to our own host QP with a Q_Key it drops, so the send
                // still completes in order and the datagram goes nowhere.
                let own = *lock(&s.gsi_qpn);
                let to = (d.remote_qpn == 1)
                    .then(|| lock(&GSI_QPS).get(&s.gsi_key(d.av.dgid)).copied())
                    .flatten();
                match (to, own) {
                    (Some(q), _) => (q, GSI_HOST_QKEY),
                    (None, Some(o)) => (o, !GSI_HOST_QKEY & 0x7fff_ffff),
                    (None, None) => (e.qp.qp_num, !GSI_HOST_QKEY & 0x7fff_ffff),
                }
            } else if d.remote_qkey & 0x8000_0000 != 0 {
                (d.remote_qpn, lock(&e.attrs).qkey.unwrap_or(0))
            } else if d.remote_qkey == GSI_HOST_QKEY {
                // Only emulated QP1s hold this Q_Key (no guest UD QP may): a guest UD QP sending
                // with it could only pose as QP1. Send with another one instead, which cannot
                // reach an emulated QP1.
                (d.remote_qpn, GSI_HOST_QKEY ^ 1)
            } else {
                (d.remote_qpn, d.remote_qkey)
            };
            op.ud = Some((a.clone(), qpn, qkey));
            ah = Some(a);
        }
        drop(t);
        // Atomics rxe refuses at post time (EINVAL), which a guest ring cannot report: a local
        // buffer other than 8 bytes is a local length error; a misaligned target is NAKed by an
        // HCA's responder (Invalid Request). Report the requester's view of both.
        let atomic_err = match wr.op {
            SendOp::CmpSwap { remote_addr, .. } | SendOp::FetchAdd { remote_addr, .. } => {
                let local: u64 = wr.sges.as_slice().iter().map(|s| u64::from(s.length)).sum();
                if local != 8 {
                    Some(WcStatus::LocLenErr)
                } else if remote_addr % 8 != 0 {
                    Some(WcStatus::RemInvReqErr)
                } else {
                    None
                }
            }
            _ => None,
        };
        let mut pend = lock(&e.pending);
        let (mut sges, bounce, failed) = match (prep, atomic_err) {
            (Ok((s, b)), None) => (s, b, None),
            (Err(Unprepared::Busy), _) => {
                drop(pend);
                return Err(Error::QueueFull);
            }
            (prep, atomic_err) => {
                let status = match prep {
                    Err(Unprepared::Fail(status)) => status,
                    _ => atomic_err.unwrap_or(WcStatus::LocProtErr),
                };
                // An error found before sending, as an HCA reports it: the QP goes to ERR, this
                // WR completes (in order, after the earlier ones) with `status`, later ones flush.
                e.qp.modify(&verbs::HostQpAttr {
                    mask: QpMask::IBV_QP_STATE.0,
                    state: S::IBV_QPS_ERR,
                    ..Default::default()
                })
                .map_err(|rc| Error::Host(format!("ibv_modify_qp to ERR: errno {rc}")))?;
                e.set_err();
                // Posted as a plain SEND (rxe would refuse the atomic); it only gets flushed.
                op.opcode = Op::IBV_WR_SEND;
                (vec![poison_sge()], None, Some(status))
            }
        };
        let slot = pend.put(Pending {
            wr_id: wr.wr_id,
            opcode,
            signaled: wr.signaled,
            bounce,
            _ah: ah,
            failed,
            ud_recv: None,
        });
        if let Err(rc) = e.qp.post_send(slot, &mut sges, &op) {
            pend.take(slot);
            return Err(post_err(rc));
        }
        Ok(())
    }

    fn post_recv(&self, qp: QpId, wr: &RecvWr) -> Result<()> {
        let s = &self.s;
        let e = self.qp(qp)?;
        if e.srq.is_some() {
            return Err(Error::Invalid("the QP receives from an SRQ"));
        }
        if e.in_err.load(Ordering::Acquire) {
            // Flushed by the backend, delivered by the completion thread after the receives
            // before it (see `deliver_flushed`).
            let wc = WorkCompletion {
                cq: e.recv_cq,
                qp_cookie: e.cookie,
                wr_id: wr.wr_id,
                status: WcStatus::WrFlushErr,
                opcode: WcOpcode::Recv,
                byte_len: 0,
                imm_data: None,
                src_qp: 0,
                grh: false,
                solicited: false,
            };
            let mut f = lock(&e.flushed);
            f.0.push(wc);
            f.1.get_or_insert_with(Instant::now);
            s.flush_waiting.fetch_add(1, Ordering::AcqRel);
            return Ok(());
        }
        let t = lock(&s.t);
        let prep = s.prepare(&t, e.pd, wr.sges.as_slice(), true, false, e.max_recv_sge);
        if prep.as_ref().err() == Some(&Unprepared::Busy) {
            return Err(Error::QueueFull);
        }
        let prep = prep.ok();
        let head = if e.ty == QpType::Rc || prep.is_none() {
            None
        } else {
            s.host_sges(&t, e.pd, wr.sges.as_slice(), true, usize::MAX)
                .ok()
                .map(|runs| {
                    let mut left = 40usize;
                    let mut head = Vec::new();
                    for &(gpa, _, n, _) in &runs {
                        if left == 0 {
                            break;
                        }
                        head.push((gpa, n.min(left)));
                        left -= n.min(left);
                    }
                    head
                })
        };
        drop(t);
        let (mut sges, bounce) = prep.unwrap_or_else(|| (vec![poison_sge()], None));
        let ud_recv = head.map(|head| UdRecv {
            sges: sges.clone(),
            head,
        });
        let mut pend = lock(&e.pending);
        let slot = pend.put(Pending {
            wr_id: wr.wr_id,
            opcode: WcOpcode::Recv,
            signaled: true,
            bounce,
            _ah: None,
            failed: None,
            ud_recv,
        });
        e.host_recvs.fetch_add(1, Ordering::AcqRel);
        if let Err(rc) = e.qp.post_recv(slot | WR_RECV, &mut sges) {
            pend.take(slot);
            e.host_recvs.fetch_sub(1, Ordering::AcqRel);
            return Err(post_err(rc));
        }
        Ok(())
    }

    fn reset(&self) {
        let s = &self.s;
        s.gsi_drop();
        let mut t = lock(&s.t);
        write(&s.qps).clear();
        s.flush_waiting.store(0, Ordering::Release);
        let next = t.next;
        *t = Tables::default();
        t.next = next;
        for g in write(&s.gids).iter_mut() {
            *g = None;
        }
    }
}

impl RdmaCoreBackend {
    fn qp(&self, qp: QpId) -> Result<Arc<QpEntry>> {
        let qpn = *lock(&self.s.t)
            .qp_ids
            .get(&qp.0)
            .ok_or(Error::NoSuchObject("QP"))?;
        read(&self.s.qps)
            .get(&qpn)
            .cloned()
            .ok_or(Error::NoSuchObject("QP"))
    }
}

fn poison_sge() -> verbs::HostSge {
    verbs::HostSge {
        addr: 0,
        length: 1,
        lkey: POISON_LKEY,
    }
}

fn post_err(rc: i32) -> Error {
    if rc == libc::ENOMEM {
        Error::QueueFull
    } else {
        Error::Invalid("the host refused the work request (QP state)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slab_reuses_slots() {
        let mut s = Slab::default();
        let p = || Pending {
            wr_id: 7,
            opcode: WcOpcode::Send,
            signaled: true,
            bounce: None,
            _ah: None,
            failed: None,
            ud_recv: None,
        };
        let a = s.put(p());
        assert_eq!(s.take(a | WR_RECV).map(|p| p.wr_id), Some(7));
        assert!(s.take(a).is_none());
        assert_eq!(s.put(p()), a);
    }

    /// Bounce bytes in flight stop at the limit, and come back when a buffer is dropped.
    #[test]
    fn bounce_bytes_in_flight_are_bounded() {
        struct Asked(AtomicU32);
        impl CompletionSink for Asked {
            fn complete(&self, _: &[WorkCompletion]) {}
            fn event(&self, _: AsyncEvent) {}
            fn progress_needed(&self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let asked = Arc::new(Asked(AtomicU32::new(0)));
        let b = Arc::new(BounceBudget {
            bytes: AtomicU64::new(0),
            limit: 100,
            starved: AtomicBool::new(false),
            sink: asked.clone(),
        });
        let x = InFlight::take(&b, 60).unwrap();
        assert!(InFlight::take(&b, 41).is_none());
        let y = InFlight::take(&b, 40).unwrap();
        assert!(InFlight::take(&b, u64::MAX).is_none(), "no wrap");
        // Room given back after a refusal: the device hears it, once.
        drop(x);
        assert_eq!(asked.0.load(Ordering::SeqCst), 1);
        assert_eq!(b.bytes.load(Ordering::Acquire), 40);
        drop(y);
        assert_eq!(asked.0.load(Ordering::SeqCst), 1);
        assert_eq!(b.bytes.load(Ordering::Acquire), 0);
    }

    /// Ids 2^24 apart share the id bits of an lkey: a live MR's lkey is never handed out again,
    /// and ids in use are skipped when the sequence wraps.
    #[test]
    fn keys_and_ids_of_live_objects_are_never_reused() {
        let mut t = Tables::default();
        let (id, lkey) = t.new_mr_key(5);
        t.lkeys.insert(lkey, id);
        t.mrs.insert(
            id,
            MrEntry {
                pd: PdId(0),
                kind: MrKind::Dma,
                access: Access::LOCAL_WRITE,
                lkey,
                _remote: None,
            },
        );
        t.next = id + (1 << 24) - 1;
        let (id2, lkey2) = t.new_mr_key(5);
        assert_ne!(lkey2, lkey);
        assert_eq!(id2, id + (1 << 24) + 1);
        t.next = u32::MAX;
        assert_eq!(t.new_id(), id + 1, "0 and the live id skipped");
    }
}
