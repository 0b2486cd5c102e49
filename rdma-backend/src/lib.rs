//! Verbs-level RDMA backends for the pvrdma device.
//!
//! The device (`pvrdma-dev`) parses everything the guest writes (commands, rings, WQEs) and calls
//! this trait with plain, already-validated Rust values. A backend never sees a PVRDMA structure.
//! Two implementations exist:
//! - [`emulated`]: a software RDMA fabric (RC and UD semantics, loopback, several devices in one
//!   process reaching each other by GID). It is the default every user gets.
//! - [`rdma_core`]: host libibverbs, loaded at run time (always built). It maps every
//!   call here onto the matching `ibv_*` verb; guest RAM is registered with the host device, MRs
//!   with remote access with `ibv_reg_mr_iova` so guest virtual addresses stay valid, and a
//!   completion thread polls the host CQs and feeds the same [`CompletionSink`].
//!
//! # Threading
//! A backend is `Send + Sync`. The device calls the object-management methods from task workers
//! (one command at a time) and `post_send`/`post_recv` from data-path workers, with the guarantee
//! that one QP is posted to by at most one thread at a time. Completions may be delivered on any
//! thread; the sink forwards them to the device's main loop.
#![warn(missing_docs)]
#![deny(unsafe_code)]

use std::fmt;
use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

#[cfg(feature = "conformance")]
pub mod conformance;
pub mod emulated;
mod progress;
pub mod rdma_core;
// memfd_create and taking ownership of its descriptor.
#[allow(unsafe_code)]
pub mod shm;
mod sync;

pub use progress::ProgressThread;

/// Guest memory as the device and backends see it: swapped atomically when the VMM maps or unmaps.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Maximum scatter/gather entries in one work request that any backend accepts.
///
/// Bounds the inline SGE array in [`SendWr`] and [`RecvWr`] so posting never allocates.
pub const MAX_SGE: usize = 16;

/// Errors a backend returns to the device. The device maps them to a guest-visible status at one
/// boundary (the command ERR register or a completion status).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// An identifier does not name a live object of this backend.
    #[error("no such {0}")]
    NoSuchObject(&'static str),
    /// The object is still referenced by another object.
    #[error("{0} is still in use")]
    Busy(&'static str),
    /// A limit of the backend was reached.
    #[error("out of {0}")]
    Exhausted(&'static str),
    /// An argument is outside what the backend accepts.
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// The QP state transition is not allowed by the IB state machine.
    #[error("invalid QP state transition from {from:?} to {to:?}")]
    BadTransition {
        /// Current state.
        from: QpState,
        /// Requested state.
        to: QpState,
    },
    /// The send or receive queue of the QP is full.
    #[error("work queue full")]
    QueueFull,
    /// The operation is not supported by this backend.
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    /// The host RDMA stack failed.
    #[error("host RDMA error: {0}")]
    Host(String),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// A protection domain of one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PdId(pub u32);
/// A memory region of one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MrId(pub u32);
/// A completion queue of one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CqId(pub u32);
/// A queue pair of one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QpId(pub u32);
/// A shared receive queue of one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrqId(pub u32);

/// A 128-bit GID in network byte order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Gid(pub [u8; 16]);

impl fmt::Debug for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, pair) in self.0.chunks(2).enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{:02x}{:02x}", pair[0], pair[1])?;
        }
        Ok(())
    }
}

impl Gid {
    /// The link-local default GID `fe80::<EUI-64 of mac>`, as RoCE derives it.
    pub fn from_mac(mac: [u8; 6]) -> Gid {
        let mut g = [0u8; 16];
        g[0] = 0xfe;
        g[1] = 0x80;
        g[8..16].copy_from_slice(&eui64(mac).to_be_bytes());
        Gid(g)
    }
}

/// The EUI-64 of a MAC address (U/L bit flipped), as used for the node GUID and link-local GIDs.
pub fn eui64(mac: [u8; 6]) -> u64 {
    u64::from_be_bytes([
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ])
}

/// GID type of a GID table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GidType {
    /// RoCE v1 (GRH over Ethernet).
    RoceV1,
    /// RoCE v2 (UDP/IP encapsulation).
    RoceV2,
}

bitflags::bitflags! {
    /// IB access flags (raw IB numbering, as the guest passes them).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Access: u32 {
        /// Local write (receive targets, RDMA READ targets, atomics' local buffer).
        const LOCAL_WRITE = 1;
        /// Remote RDMA WRITE.
        const REMOTE_WRITE = 2;
        /// Remote RDMA READ.
        const REMOTE_READ = 4;
        /// Remote atomics.
        const REMOTE_ATOMIC = 8;
        /// Memory-window binding.
        const MW_BIND = 16;
        /// Zero-based addressing.
        const ZERO_BASED = 32;
    }
}

/// How an MR maps addresses to guest memory.
#[derive(Debug, Clone)]
pub enum MrKind {
    /// The kernel DMA MR: addresses are guest-physical, any guest memory is reachable.
    Dma,
    /// A user MR: `length` bytes starting at `iova`, whose 4 KiB pages are `pages` in order. Byte
    /// at iova `a` lives in `pages[(a - (iova & !0xfff)) >> 12]` at offset `a & 0xfff`.
    User {
        /// Start address as the guest sees it (user virtual address).
        iova: u64,
        /// Length in bytes.
        length: u64,
        /// Guest-physical addresses of the 4 KiB pages covering `[iova, iova + length)`.
        pages: Arc<[GuestAddress]>,
    },
    /// A fast-register MR (the guest kernel's `ib_alloc_mr`): no pages and no access yet, room
    /// for `max_pages` pages. A [`SendOp::FastReg`] maps it (it is then usable with the key the
    /// WR carries) and a [`SendOp::LocalInv`] or a [`SendOp::SendInv`] received unmaps it.
    Frmr {
        /// Pages a registration may map, at most ([`Backend::fast_reg_max_pages`] bounds it).
        max_pages: u32,
    },
}

/// Keys of a registered MR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MrKeys {
    /// Backend identifier used to destroy the MR.
    pub id: MrId,
    /// Local key (SGE `lkey`).
    pub lkey: u32,
    /// Remote key (RDMA/atomic `rkey`).
    pub rkey: u32,
}

/// QP transport type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QpType {
    /// The general services QP (QP1): UD semantics, QP number 1 on each device.
    Gsi,
    /// Reliable connected.
    Rc,
    /// Unreliable datagram.
    Ud,
}

/// IB QP states (numbering as in `ib_qp_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QpState {
    /// RESET.
    Reset = 0,
    /// INIT.
    Init = 1,
    /// Ready to receive.
    Rtr = 2,
    /// Ready to send.
    Rts = 3,
    /// Send queue drain.
    Sqd = 4,
    /// Send queue error.
    Sqe = 5,
    /// Error.
    Err = 6,
}

impl QpState {
    /// Decodes the IB numbering; `None` for anything else.
    pub fn from_u32(v: u32) -> Option<QpState> {
        Some(match v {
            0 => QpState::Reset,
            1 => QpState::Init,
            2 => QpState::Rtr,
            3 => QpState::Rts,
            4 => QpState::Sqd,
            5 => QpState::Sqe,
            6 => QpState::Err,
            _ => return None,
        })
    }

    /// Whether IB's QP state machine allows `self → to` (`ib_modify_qp_is_ok`, without its
    /// attribute rules). Every backend checks a state change against this one table.
    pub fn can_transition_to(self, to: QpState) -> bool {
        use QpState::*;
        matches!(
            (self, to),
            (_, Reset)
                | (_, Err)
                | (Reset, Init)
                | (Init, Init)
                | (Init, Rtr)
                | (Rtr, Rts)
                | (Rts, Rts)
                | (Rts, Sqd)
                | (Sqd, Sqd)
                | (Sqd, Rts)
                | (Sqe, Rts)
        )
    }
}

/// Parameters of a new QP.
#[derive(Debug, Clone)]
pub struct QpInit {
    /// Transport type.
    pub qp_type: QpType,
    /// Protection domain.
    pub pd: PdId,
    /// CQ for send completions.
    pub send_cq: CqId,
    /// CQ for receive completions.
    pub recv_cq: CqId,
    /// SRQ receives are taken from, if any.
    pub srq: Option<SrqId>,
    /// Send queue depth (WQEs outstanding in the backend at once).
    pub max_send_wr: u32,
    /// Receive queue depth.
    pub max_recv_wr: u32,
    /// Maximum SGEs per send WR.
    pub max_send_sge: u32,
    /// Maximum SGEs per receive WR.
    pub max_recv_sge: u32,
    /// Every send WR produces a completion, whatever its SIGNALED flag.
    pub sq_sig_all: bool,
    /// Opaque value returned in every completion of this QP (the device puts its handle and a
    /// generation here).
    pub cookie: u64,
}

/// An address vector: where a UD datagram or an RC connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AddressVector {
    /// Destination GID.
    pub dgid: Gid,
    /// Source GID index in the local GID table.
    pub sgid_index: u8,
    /// Hop limit for the GRH.
    pub hop_limit: u8,
    /// Traffic class for the GRH.
    pub traffic_class: u8,
    /// Flow label for the GRH.
    pub flow_label: u32,
    /// Service level.
    pub sl: u8,
    /// Destination MAC (as the guest resolved it).
    pub dmac: [u8; 6],
}

/// QP attributes to change; `None` leaves an attribute as it is (the IB attribute mask).
#[derive(Debug, Clone, Default)]
pub struct QpAttrs {
    /// New state.
    pub state: Option<QpState>,
    /// Current state the caller believes the QP is in (IB_QP_CUR_STATE).
    pub cur_state: Option<QpState>,
    /// Path MTU in IB encoding (1 = 256 … 5 = 4096).
    pub path_mtu: Option<u8>,
    /// Q_Key (UD/GSI).
    pub qkey: Option<u32>,
    /// Receive PSN.
    pub rq_psn: Option<u32>,
    /// Send PSN.
    pub sq_psn: Option<u32>,
    /// Remote QP number (RC).
    pub dest_qp_num: Option<u32>,
    /// Remote access rights granted to incoming operations.
    pub access: Option<Access>,
    /// P_Key index.
    pub pkey_index: Option<u16>,
    /// Outstanding RDMA READ/atomic as initiator.
    pub max_rd_atomic: Option<u8>,
    /// Outstanding RDMA READ/atomic as responder.
    pub max_dest_rd_atomic: Option<u8>,
    /// Minimum RNR NAK timer (IB encoding).
    pub min_rnr_timer: Option<u8>,
    /// Local ACK timeout (IB encoding).
    pub timeout: Option<u8>,
    /// Retry count.
    pub retry_cnt: Option<u8>,
    /// RNR retry count (7 = infinite).
    pub rnr_retry: Option<u8>,
    /// Port number.
    pub port_num: Option<u8>,
    /// Primary path (RC).
    pub ah: Option<AddressVector>,
}

/// A scatter/gather entry as posted by the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sge {
    /// Address within the MR named by `lkey`.
    pub addr: u64,
    /// Length in bytes.
    pub length: u32,
    /// Local key.
    pub lkey: u32,
}

/// An inline, bounded list of SGEs (no allocation on the data path).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SgeList {
    len: u8,
    sges: [Sge; MAX_SGE],
}

impl Default for SgeList {
    fn default() -> Self {
        SgeList {
            len: 0,
            sges: [Sge::default(); MAX_SGE],
        }
    }
}

impl fmt::Debug for SgeList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl SgeList {
    /// The empty list (what [`SgeList::new`] returns, usable in constants).
    pub const EMPTY: SgeList = SgeList {
        len: 0,
        sges: [Sge {
            addr: 0,
            length: 0,
            lkey: 0,
        }; MAX_SGE],
    };

    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }
    /// Removes every entry.
    pub fn clear(&mut self) {
        self.len = 0;
    }
    /// Appends an SGE; returns `false` (and drops it) when [`MAX_SGE`] entries are present.
    pub fn push(&mut self, sge: Sge) -> bool {
        if usize::from(self.len) >= MAX_SGE {
            return false;
        }
        self.sges[usize::from(self.len)] = sge;
        self.len += 1;
        true
    }
    /// The entries.
    pub fn as_slice(&self) -> &[Sge] {
        &self.sges[..usize::from(self.len)]
    }
    /// Total byte length of all entries (saturating).
    pub fn total_len(&self) -> u64 {
        self.as_slice().iter().map(|s| u64::from(s.length)).sum()
    }
}

impl FromIterator<Sge> for SgeList {
    fn from_iter<I: IntoIterator<Item = Sge>>(iter: I) -> Self {
        let mut l = SgeList::new();
        for s in iter {
            if !l.push(s) {
                break;
            }
        }
        l
    }
}

/// A fast registration: what [`SendOp::FastReg`] binds to a fast-register MR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FastReg {
    /// The MR's key with its new low 8 bits (the consumer's part): the other bits must be the
    /// MR's, and afterwards the MR answers to exactly this key (and the lkey with the same low
    /// 8 bits).
    pub key: u32,
    /// First address of the mapping as the guest sees it.
    pub iova: u64,
    /// Length in bytes.
    pub length: u64,
    /// Access rights of the mapping.
    pub access: Access,
    /// Guest-physical addresses of the 4 KiB pages covering `[iova, iova + length)`, as for
    /// [`MrKind::User`].
    pub pages: Arc<[GuestAddress]>,
}

/// What a send work request does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOp {
    /// SEND, optionally with immediate data.
    Send {
        /// Immediate data (network order value as the guest wrote it).
        imm: Option<u32>,
    },
    /// RDMA WRITE, optionally with immediate data.
    RdmaWrite {
        /// Remote address.
        remote_addr: u64,
        /// Remote key.
        rkey: u32,
        /// Immediate data.
        imm: Option<u32>,
    },
    /// RDMA READ.
    RdmaRead {
        /// Remote address.
        remote_addr: u64,
        /// Remote key.
        rkey: u32,
    },
    /// 8-byte compare and swap.
    CmpSwap {
        /// Remote address (8-byte aligned).
        remote_addr: u64,
        /// Remote key.
        rkey: u32,
        /// Compare value.
        compare: u64,
        /// Swap value.
        swap: u64,
    },
    /// 8-byte fetch and add.
    FetchAdd {
        /// Remote address (8-byte aligned).
        remote_addr: u64,
        /// Remote key.
        rkey: u32,
        /// Value to add.
        add: u64,
    },
    /// SEND that invalidates the responder's fast-register MR `rkey` when it lands (RC).
    SendInv {
        /// The responder's key to invalidate.
        rkey: u32,
    },
    /// Invalidates one of the QP's own fast-register MRs (local; RC).
    LocalInv {
        /// Its lkey or rkey.
        key: u32,
    },
    /// Maps one of the QP's own fast-register MRs (local; RC). Boxed: the other operations,
    /// on every data-path WR, stay as small as before.
    FastReg(Box<FastReg>),
}

/// UD/GSI destination of a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdDest {
    /// Address vector.
    pub av: AddressVector,
    /// Remote QP number.
    pub remote_qpn: u32,
    /// Q_Key; bit 31 set means "use the QP's own qkey" (the IB rule).
    pub remote_qkey: u32,
}

/// A send work request.
#[derive(Debug, Clone)]
pub struct SendWr {
    /// Caller's identifier, returned in the completion.
    pub wr_id: u64,
    /// The operation.
    pub op: SendOp,
    /// Local buffers (source for SEND/WRITE, target for READ/atomics).
    pub sges: SgeList,
    /// Produce a completion on success (errors always complete).
    pub signaled: bool,
    /// Set the solicited-event bit at the receiver.
    pub solicited: bool,
    /// Destination for UD and GSI QPs.
    pub ud: Option<UdDest>,
}

/// A receive work request.
#[derive(Debug, Clone, Copy)]
pub struct RecvWr {
    /// Caller's identifier.
    pub wr_id: u64,
    /// Target buffers.
    pub sges: SgeList,
}

/// Completion status (numbering of `ib_wc_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum WcStatus {
    /// Success.
    Success = 0,
    /// Local length error.
    LocLenErr = 1,
    /// Local QP operation error.
    LocQpOpErr = 2,
    /// Local protection error.
    LocProtErr = 4,
    /// Flushed.
    WrFlushErr = 5,
    /// Bad response.
    BadRespErr = 7,
    /// Local access error.
    LocAccessErr = 8,
    /// Remote invalid request.
    RemInvReqErr = 9,
    /// Remote access error.
    RemAccessErr = 10,
    /// Remote operation error.
    RemOpErr = 11,
    /// Transport retry counter exceeded.
    RetryExcErr = 12,
    /// RNR retry counter exceeded.
    RnrRetryExcErr = 13,
    /// Fatal error.
    FatalErr = 19,
    /// General error.
    GeneralErr = 21,
}

/// Completion opcode (numbering of the pvrdma/ib work-completion opcodes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum WcOpcode {
    /// SEND.
    Send = 0,
    /// RDMA WRITE.
    RdmaWrite = 1,
    /// RDMA READ.
    RdmaRead = 2,
    /// Compare and swap.
    CompSwap = 3,
    /// Fetch and add.
    FetchAdd = 4,
    /// Local invalidation.
    LocalInv = 7,
    /// Fast registration.
    FastRegMr = 8,
    /// A receive.
    Recv = 128,
    /// A receive consumed by RDMA WRITE with immediate.
    RecvRdmaWithImm = 129,
}

/// A work completion, as the backend reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkCompletion {
    /// The CQ it belongs to.
    pub cq: CqId,
    /// The QP's cookie (see [`QpInit::cookie`]).
    pub qp_cookie: u64,
    /// The work request's identifier.
    pub wr_id: u64,
    /// Status.
    pub status: WcStatus,
    /// Opcode.
    pub opcode: WcOpcode,
    /// Bytes received (receives; for UD including the 40-byte GRH) or transferred.
    pub byte_len: u32,
    /// Immediate data, if any.
    pub imm_data: Option<u32>,
    /// The responder's key a SEND with invalidate invalidated (receives).
    pub invalidated: Option<u32>,
    /// Source QP number (UD/GSI receives).
    pub src_qp: u32,
    /// The network header written in the 40 bytes before the payload (UD/GSI receives), if
    /// any.
    pub grh: Option<NetworkHeader>,
    /// The sender asked for a solicited event.
    pub solicited: bool,
}

/// The network header in front of a UD/GSI receive's payload (its first 40 bytes), as the
/// sender's GID type makes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NetworkHeader {
    /// An IB GRH (RoCE v1).
    Grh,
    /// An IPv4 header in bytes 20..40 (RoCE v2, IPv4-mapped GIDs).
    Ipv4,
    /// An IPv6 header (RoCE v2).
    Ipv6,
}

impl Gid {
    /// The IPv4 address of an IPv4-mapped GID (`::ffff:a.b.c.d`).
    pub fn ipv4(&self) -> Option<[u8; 4]> {
        let g = &self.0;
        (g[..10].iter().all(|&b| b == 0) && g[10] == 0xff && g[11] == 0xff)
            .then(|| [g[12], g[13], g[14], g[15]])
    }
}

/// Asynchronous events a backend raises (numbering of `ib_event_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsyncEvent {
    /// A QP went to the error state on its own (QP_FATAL).
    QpFatal {
        /// The QP's cookie.
        qp_cookie: u64,
    },
    /// A remote access error hit the QP as a responder (QP_ACCESS_ERR).
    QpAccessErr {
        /// The QP's cookie.
        qp_cookie: u64,
    },
    /// An invalid request hit the QP as a responder (QP_REQ_ERR).
    QpReqErr {
        /// The QP's cookie.
        qp_cookie: u64,
    },
    /// An SRQ fell below its limit (SRQ_LIMIT_REACHED); the limit is disarmed.
    SrqLimitReached {
        /// The SRQ's cookie.
        srq_cookie: u64,
    },
    /// The last WQE of a QP attached to an SRQ was reached (QP_LAST_WQE_REACHED).
    QpLastWqeReached {
        /// The QP's cookie.
        qp_cookie: u64,
    },
}

/// Where a backend delivers completions and events. Called from any thread; must not block for
/// long (the device forwards to its main loop).
pub trait CompletionSink: Send + Sync {
    /// A batch of completions, in order. Completions of one QP are never reordered.
    fn complete(&self, wcs: &[WorkCompletion]);
    /// An asynchronous event.
    fn event(&self, ev: AsyncEvent);
    /// The backend has work to resume (a retry whose timer fired, a receive that ends an RNR
    /// wait, the rest of a long transfer): call [`Backend::progress`] soon, on a worker thread
    /// of the device this sink belongs to, and again for as long as it returns `true`. Never
    /// from inside this call (it may be made with the backend's locks held). A backend that
    /// never defers work never calls it.
    fn progress_needed(&self);
}

/// How often a QP's send queue had to wait and try again (monitoring).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QpRetries {
    /// Times the head send WR found no receive posted at the responder and waited (RNR NAKs).
    pub rnr_waits: u64,
    /// Times the head send WR was sent again after an RNR wait or a transport timeout.
    pub retries: u64,
}

/// A verbs-level RDMA backend.
pub trait Backend: Send + Sync {
    /// Short name for logs (`emulated`, `rdma-core`).
    fn name(&self) -> &'static str;

    /// True if control operations (create/modify/destroy, GID changes) complete in memory and
    /// never block on I/O or on other threads for long, so the device may run the quick ones
    /// on its main loop's thread instead of handing them to a worker. False by default.
    fn inline_control(&self) -> bool {
        false
    }

    /// Sets GID table entry `index` (the guest's CREATE_BIND).
    fn add_gid(&self, index: u32, gid: Gid, ty: GidType) -> Result<()>;
    /// Clears GID table entry `index` (the guest's DESTROY_BIND).
    fn del_gid(&self, index: u32) -> Result<()>;

    /// Allocates a protection domain.
    fn create_pd(&self) -> Result<PdId>;
    /// Frees a protection domain; fails with [`Error::Busy`] while MRs, QPs or SRQs use it.
    fn destroy_pd(&self, pd: PdId) -> Result<()>;

    /// Registers a memory region.
    fn create_mr(&self, pd: PdId, kind: MrKind, access: Access) -> Result<MrKeys>;
    /// Deregisters a memory region.
    fn destroy_mr(&self, mr: MrId) -> Result<()>;

    /// Creates a CQ with room for `cqe` entries. `cookie` is opaque to the backend.
    fn create_cq(&self, cqe: u32, cookie: u64) -> Result<CqId>;
    /// Destroys a CQ; fails with [`Error::Busy`] while QPs use it.
    fn destroy_cq(&self, cq: CqId) -> Result<()>;

    /// Creates a shared receive queue.
    fn create_srq(
        &self,
        pd: PdId,
        max_wr: u32,
        max_sge: u32,
        limit: u32,
        cookie: u64,
    ) -> Result<SrqId>;
    /// Arms the SRQ limit event (`limit` 0 disarms).
    fn modify_srq(&self, srq: SrqId, limit: u32) -> Result<()>;
    /// Destroys an SRQ; fails with [`Error::Busy`] while QPs use it.
    fn destroy_srq(&self, srq: SrqId) -> Result<()>;
    /// Posts a receive to an SRQ.
    fn post_srq_recv(&self, srq: SrqId, wr: &RecvWr) -> Result<()>;

    /// Creates a QP in the RESET state; returns its id and its QP number on the fabric
    /// (always 1 for [`QpType::Gsi`]).
    fn create_qp(&self, init: &QpInit) -> Result<(QpId, u32)>;
    /// Applies attributes; enforces the IB state machine. To RESET drops queued work silently; to
    /// ERR flushes it with [`WcStatus::WrFlushErr`].
    fn modify_qp(&self, qp: QpId, attrs: &QpAttrs) -> Result<()>;
    /// The QP's current state.
    fn query_qp_state(&self, qp: QpId) -> Result<QpState>;
    /// Destroys a QP. No completion of it is delivered after this returns.
    fn destroy_qp(&self, qp: QpId) -> Result<()>;

    /// Posts a send WR. A WR that fails validation is completed with an error status (and the QP
    /// moves to ERR for RC); `Err` is only for a QP that does not exist or a full queue.
    fn post_send(&self, qp: QpId, wr: &SendWr) -> Result<()>;
    /// Posts a receive WR.
    fn post_recv(&self, qp: QpId, wr: &RecvWr) -> Result<()>;
    /// Posts send WRs in order until one is not taken. Returns how many were taken and, when
    /// not all, what [`Backend::post_send`] said about the next. The default posts them one by
    /// one; a backend can look the QP up and lock it once for the lot.
    fn post_send_batch(&self, qp: QpId, wrs: &[SendWr]) -> (usize, Result<()>) {
        for (i, wr) in wrs.iter().enumerate() {
            if let Err(e) = self.post_send(qp, wr) {
                return (i, Err(e));
            }
        }
        (wrs.len(), Ok(()))
    }
    /// Posts receive WRs in order until one is not taken (as [`Backend::post_send_batch`]).
    fn post_recv_batch(&self, qp: QpId, wrs: &[RecvWr]) -> (usize, Result<()>) {
        for (i, wr) in wrs.iter().enumerate() {
            if let Err(e) = self.post_recv(qp, wr) {
                return (i, Err(e));
            }
        }
        (wrs.len(), Ok(()))
    }

    /// Pages one fast registration may map, at most; 0 when the backend has no fast-register
    /// MRs ([`MrKind::Frmr`], [`SendOp::FastReg`], [`SendOp::LocalInv`], [`SendOp::SendInv`]
    /// are then refused). The default is 0.
    fn fast_reg_max_pages(&self) -> u32 {
        0
    }

    /// Drops every object (device RESET). No completion is delivered after this returns.
    fn reset(&self);

    /// Host memory the backend may hold for one queued WR of `sges` SGEs (`send`: on a send
    /// queue; else on a receive queue or SRQ), at most: what a device counts against its
    /// budget for each WR of a queue it creates. The default covers a whole [`SendWr`].
    fn queued_wr_bytes(&self, send: bool, sges: u32) -> u64 {
        let _ = (send, sges);
        std::mem::size_of::<SendWr>() as u64
    }

    /// Host memory a PD of this backend holds, at most (beyond its objects): what a device
    /// counts against its budget for each PD. The default is a few hundred bytes.
    fn pd_bytes(&self) -> u64 {
        256
    }

    /// How often QP `qp`'s send queue waited and retried, since it was created; `None` when the
    /// backend does not count it (the default) or the QP does not exist.
    fn qp_retries(&self, qp: QpId) -> Option<QpRetries> {
        let _ = qp;
        None
    }

    /// Resumes deferred work (see [`CompletionSink::progress_needed`]) for a bounded time, on
    /// the caller's thread. Returns `true` if work remains: call it again (after letting the
    /// device's other work run). The default has nothing to resume.
    fn progress(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod state_tests {
    use super::QpState;

    #[test]
    fn ib_qp_transitions() {
        assert!(QpState::Reset.can_transition_to(QpState::Init));
        assert!(!QpState::Reset.can_transition_to(QpState::Rtr));
        assert!(!QpState::Rts.can_transition_to(QpState::Rtr));
        assert!(QpState::Sqe.can_transition_to(QpState::Rts));
        assert!(QpState::Sqd.can_transition_to(QpState::Rts));
        assert!(QpState::Rtr.can_transition_to(QpState::Err));
        assert!(!QpState::Err.can_transition_to(QpState::Rts));
    }
}
