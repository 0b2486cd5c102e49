//! The `rdma-core` backend: guest verbs carried by a host RDMA device through libibverbs.
//!
//! libibverbs is loaded at run time (`ffi.rs`: `dlopen` and hand-written declarations), so
//! building needs nothing of rdma-core and the binary runs on a host without it; [`available`]
//! says whether this backend can be offered.
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
mod completions;
mod ffi;
mod gsi;
mod qp;
mod translate;
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

use completions::{completion_thread, wc_status};
use gsi::{host_qkey, GSI_HOST_QKEY};
use qp::qp_state_from_host;
use translate::{file_pages, poison_sge};

/// Whether the rdma-core backend can run here (libibverbs loads); the error says why not.
pub fn available() -> std::result::Result<(), String> {
    verbs::libibverbs_available()
}

/// The host's `enum ibv_gid_type` code of `ty`.
fn gid_type_code(ty: GidType) -> u32 {
    match ty {
        GidType::RoceV1 => consts::GID_ROCE_V1,
        GidType::RoceV2 => consts::GID_ROCE_V2,
    }
}

fn gid_type_name(code: u32) -> &'static str {
    match code {
        consts::GID_ROCE_V1 => "RoCE v1",
        consts::GID_ROCE_V2 => "RoCE v2",
        0 => "IB",
        _ => "unknown",
    }
}

/// When `port` of `ctx` has no GID of type `ty`: the error, naming the types it has and what to
/// do.
fn missing_gid_type(
    ctx: &verbs::Context,
    cfg: &Config,
    gid_tbl_len: u32,
    ty: GidType,
) -> Option<String> {
    let want = gid_type_code(ty);
    let mut have: Vec<&str> = Vec::new();
    for h in 0..gid_tbl_len.min(256) {
        if let Some((_, t)) = ctx.gid(cfg.port, h) {
            if t == want {
                return None;
            }
            if !have.contains(&gid_type_name(t)) {
                have.push(gid_type_name(t));
            }
        }
    }
    let (ibdev, port, name) = (&cfg.ibdev, cfg.port, gid_type_name(want));
    Some(if have.is_empty() {
        format!("{ibdev} port {port} has no GIDs at all: give its netdev an address")
    } else {
        let other = match ty {
            GidType::RoceV1 => 2,
            GidType::RoceV2 => 1,
        };
        format!(
            "{ibdev} port {port} has no {name} GID (its GIDs are {}): the guest could bind none; \
             serve the device with --roce-version {other}",
            have.join(", ")
        )
    })
}

/// Whether a device whose guest binds GIDs of type `ty` can work on `cfg`'s port: the error
/// names the port and the GID types it has when it has none of `ty`. `pvrdma serve` refuses
/// such a device when it is configured or added.
pub fn check_gid_type(cfg: &Config, ty: GidType) -> Result<()> {
    let ctx = verbs::Context::open(&cfg.ibdev).map_err(host)?;
    let info = ctx.port_info(cfg.port).map_err(host)?;
    match missing_gid_type(&ctx, cfg, info.gid_tbl_len, ty) {
        Some(e) => Err(Error::Host(e)),
        None => Ok(()),
    }
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
    /// Host QPN of the guest's GSI QP, if it has one (see `gsi::GSI_QPS`).
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
    /// Whether the port is ACTIVE now; the error names the device, the port, its state and
    /// what to do. A backend works on a port that is not (yet) active, but nothing it sends
    /// leaves: `pvrdma serve` refuses to start on one.
    pub fn port_active(&self) -> Result<()> {
        const STATES: [&str; 6] = ["NOP", "DOWN", "INIT", "ARMED", "ACTIVE", "ACTIVE_DEFER"];
        let info = self.s.ctx.port_info(self.s.cfg.port).map_err(host)?;
        if info.state == 4 {
            return Ok(());
        }
        let state = STATES
            .get(info.state as usize)
            .copied()
            .unwrap_or("unknown");
        Err(Error::Host(format!(
            "{} port {} is not ACTIVE ({state}): bring up its netdev (`rdma link show` names it) \
             or choose another --ibdev/--ibport",
            self.s.cfg.ibdev, self.s.cfg.port
        )))
    }

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

impl Shared {}

impl Backend for RdmaCoreBackend {
    fn name(&self) -> &'static str {
        "rdma-core"
    }

    fn add_gid(&self, index: u32, gid: Gid, ty: GidType) -> Result<()> {
        let i = index as usize;
        if i >= MAX_GIDS {
            return Err(Error::Invalid("GID index"));
        }
        let want = gid_type_code(ty);
        let s = &self.s;
        if !s.cfg.gids.contains(&gid) {
            return Err(Error::Invalid(
                "a GID the operator did not give this device",
            ));
        }
        let found = (0..s.info.gid_tbl_len.min(256))
            .find(|&h| s.ctx.gid(s.cfg.port, h) == Some((gid.0, want)));
        let Some(h) = found else {
            if let Some(e) = missing_gid_type(&s.ctx, &s.cfg, s.info.gid_tbl_len, ty) {
                return Err(Error::Host(e));
            }
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
        if let MrKind::Frmr { .. } = kind {
            return Err(Error::Unsupported(
                "fast-register MRs (user-space verbs have no fast registration)",
            ));
        }
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
        self.create_qp_impl(init)
    }

    fn modify_qp(&self, qp: QpId, attrs: &QpAttrs) -> Result<()> {
        self.modify_qp_impl(qp, attrs)
    }

    fn query_qp_state(&self, qp: QpId) -> Result<QpState> {
        let e = self.qp(qp)?;
        Ok(qp_state_from_host(e.qp.state().map_err(host)?))
    }

    fn destroy_qp(&self, qp: QpId) -> Result<()> {
        self.destroy_qp_impl(qp)
    }

    fn post_send(&self, qp: QpId, wr: &SendWr) -> Result<()> {
        self.post_send_impl(qp, wr)
    }

    fn post_recv(&self, qp: QpId, wr: &RecvWr) -> Result<()> {
        self.post_recv_impl(qp, wr)
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
