//! The part of libibverbs (`<infiniband/verbs.h>`) the backend uses, written by hand and
//! resolved at run time: `libibverbs.so.1` is opened with `dlopen` once per process (the first
//! time [`lib`] is called) and every function is looked up with `dlsym`. Building needs nothing
//! of rdma-core; running needs `libibverbs.so.1` and a provider for the host device.
//!
//! Layouts are those of `verbs.h` on 64-bit Linux (the structs are part of libibverbs' stable
//! ABI); the compile-time assertions below check sizes and offsets against a C compiler's view
//! of the header. Structs libibverbs allocates and this crate only reads through pointers
//! (`ibv_context`, `ibv_cq`, `ibv_qp`, `ibv_srq`) are declared up to the last field read.
//!
//! Functions that `verbs.h` defines `static inline` are reproduced as the header does:
//! [`ibv_poll_cq`], [`ibv_req_notify_cq`], [`ibv_post_send`], [`ibv_post_recv`] and
//! [`ibv_post_srq_recv`] call through `context->ops`; [`Lib::query_port`] is the exported
//! `ibv_query_port` (the header's inline falls back to it, with the compat struct);
//! [`ibv_query_gid_ex`] is `_ibv_query_gid_ex` with the entry size; and registration is
//! `ibv_reg_mr_iova2`, what the header's `ibv_reg_mr`/`ibv_reg_mr_iova` call when the access
//! flags are not a compile-time constant.
#![allow(unsafe_code, non_camel_case_types)]

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::OnceLock;

/// The library opened.
pub const LIBIBVERBS: &str = "libibverbs.so.1";

macro_rules! opaque {
    ($($(#[$m:meta])* $name:ident;)*) => {$(
        $(#[$m])*
        #[repr(C)]
        #[derive(Debug)]
        pub struct $name {
            _private: [u8; 0],
        }
    )*};
}

opaque! {
    /// `struct ibv_device` (only passed back to libibverbs).
    ibv_device;
    /// `struct ibv_pd`.
    ibv_pd;
    /// `struct ibv_ah`.
    ibv_ah;
}

/// `union ibv_gid`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union ibv_gid {
    /// The 16 bytes.
    pub raw: [u8; 16],
    /// Subnet prefix and interface id (big endian).
    pub global: ibv_gid_global,
}

/// `union ibv_gid`'s `global`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_gid_global {
    /// Subnet prefix (big endian).
    pub subnet_prefix: u64,
    /// Interface id (big endian).
    pub interface_id: u64,
}

/// `struct ibv_gid_entry`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ibv_gid_entry {
    /// The GID.
    pub gid: ibv_gid,
    /// Index in the port's table.
    pub gid_index: u32,
    /// Port.
    pub port_num: u32,
    /// `enum ibv_gid_type`.
    pub gid_type: u32,
    /// Interface index of the netdev.
    pub ndev_ifindex: u32,
}

/// `struct ibv_device_attr`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ibv_device_attr {
    /// Firmware version.
    pub fw_ver: [c_char; 64],
    /// Node GUID (big endian).
    pub node_guid: u64,
    /// System image GUID (big endian).
    pub sys_image_guid: u64,
    /// Largest MR.
    pub max_mr_size: u64,
    /// Supported page sizes.
    pub page_size_cap: u64,
    /// Vendor id.
    pub vendor_id: u32,
    /// Vendor part id.
    pub vendor_part_id: u32,
    /// Hardware version.
    pub hw_ver: u32,
    /// Max QPs.
    pub max_qp: c_int,
    /// Max WRs per queue.
    pub max_qp_wr: c_int,
    /// `ibv_device_cap_flags`.
    pub device_cap_flags: c_uint,
    /// Max SGEs per WR.
    pub max_sge: c_int,
    /// Max SGEs per RDMA READ.
    pub max_sge_rd: c_int,
    /// Max CQs.
    pub max_cq: c_int,
    /// Max CQEs per CQ.
    pub max_cqe: c_int,
    /// Max MRs.
    pub max_mr: c_int,
    /// Max PDs.
    pub max_pd: c_int,
    /// Max outstanding RDMA READ/atomic per QP as target.
    pub max_qp_rd_atom: c_int,
    /// Max outstanding RDMA READ/atomic per EE.
    pub max_ee_rd_atom: c_int,
    /// Max resources for RDMA READ/atomic as target.
    pub max_res_rd_atom: c_int,
    /// Max outstanding RDMA READ/atomic per QP as initiator.
    pub max_qp_init_rd_atom: c_int,
    /// Max outstanding RDMA READ/atomic per EE as initiator.
    pub max_ee_init_rd_atom: c_int,
    /// `enum ibv_atomic_cap`.
    pub atomic_cap: u32,
    /// Max EEs.
    pub max_ee: c_int,
    /// Max RDDs.
    pub max_rdd: c_int,
    /// Max MWs.
    pub max_mw: c_int,
    /// Max raw IPv6 QPs.
    pub max_raw_ipv6_qp: c_int,
    /// Max raw Ethertype QPs.
    pub max_raw_ethy_qp: c_int,
    /// Max multicast groups.
    pub max_mcast_grp: c_int,
    /// Max QPs per multicast group.
    pub max_mcast_qp_attach: c_int,
    /// Max QP attachments in all.
    pub max_total_mcast_qp_attach: c_int,
    /// Max AHs.
    pub max_ah: c_int,
    /// Max FMRs.
    pub max_fmr: c_int,
    /// Max remaps per FMR.
    pub max_map_per_fmr: c_int,
    /// Max SRQs.
    pub max_srq: c_int,
    /// Max WRs per SRQ.
    pub max_srq_wr: c_int,
    /// Max SGEs per SRQ WR.
    pub max_srq_sge: c_int,
    /// P_Key table length.
    pub max_pkeys: u16,
    /// Local CA ACK delay.
    pub local_ca_ack_delay: u8,
    /// Number of ports.
    pub phys_port_cnt: u8,
}

/// `struct _compat_ibv_port_attr`: the `ibv_port_attr` of libibverbs 1.1, which the exported
/// `ibv_query_port` fills (the later fields of `ibv_port_attr` are not read here).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_port_attr_compat {
    /// `enum ibv_port_state` (4 = ACTIVE).
    pub state: u32,
    /// `enum ibv_mtu`.
    pub max_mtu: u32,
    /// `enum ibv_mtu`.
    pub active_mtu: u32,
    /// GID table length.
    pub gid_tbl_len: c_int,
    /// Capability flags.
    pub port_cap_flags: u32,
    /// Max message size.
    pub max_msg_sz: u32,
    /// Bad P_Key counter.
    pub bad_pkey_cntr: u32,
    /// Q_Key violation counter.
    pub qkey_viol_cntr: u32,
    /// P_Key table length.
    pub pkey_tbl_len: u16,
    /// LID.
    pub lid: u16,
    /// SM LID.
    pub sm_lid: u16,
    /// LMC.
    pub lmc: u8,
    /// Max VLs.
    pub max_vl_num: u8,
    /// SM SL.
    pub sm_sl: u8,
    /// Subnet timeout.
    pub subnet_timeout: u8,
    /// Init type reply.
    pub init_type_reply: u8,
    /// Active width.
    pub active_width: u8,
    /// Active speed.
    pub active_speed: u8,
    /// Physical state.
    pub phys_state: u8,
    /// Link layer.
    pub link_layer: u8,
    /// Flags.
    pub flags: u8,
}

/// `enum ibv_event_type` (the values read).
pub mod ibv_event_type {
    /// IBV_EVENT_QP_FATAL.
    pub const IBV_EVENT_QP_FATAL: u32 = 1;
    /// IBV_EVENT_QP_REQ_ERR.
    pub const IBV_EVENT_QP_REQ_ERR: u32 = 2;
    /// IBV_EVENT_QP_ACCESS_ERR.
    pub const IBV_EVENT_QP_ACCESS_ERR: u32 = 3;
    /// IBV_EVENT_SRQ_LIMIT_REACHED.
    pub const IBV_EVENT_SRQ_LIMIT_REACHED: u32 = 15;
    /// IBV_EVENT_QP_LAST_WQE_REACHED.
    pub const IBV_EVENT_QP_LAST_WQE_REACHED: u32 = 16;
}

/// `struct ibv_async_event`'s `element`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union ibv_async_event_element {
    /// CQ events.
    pub cq: *mut ibv_cq,
    /// QP events.
    pub qp: *mut ibv_qp,
    /// SRQ events.
    pub srq: *mut ibv_srq,
    /// WQ events (`struct ibv_wq *`).
    pub wq: *mut c_void,
    /// Port events.
    pub port_num: c_int,
}

/// `struct ibv_async_event`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ibv_async_event {
    /// The object the event is about.
    pub element: ibv_async_event_element,
    /// `enum ibv_event_type`.
    pub event_type: u32,
}

/// `enum ibv_wc_flags`: a GRH is present.
pub const IBV_WC_GRH: c_uint = 1 << 0;
/// `enum ibv_wc_flags`: immediate data is present.
pub const IBV_WC_WITH_IMM: c_uint = 1 << 1;

/// `struct ibv_wc`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_wc {
    /// Work request id.
    pub wr_id: u64,
    /// `enum ibv_wc_status`.
    pub status: u32,
    /// `enum ibv_wc_opcode`.
    pub opcode: u32,
    /// Vendor error.
    pub vendor_err: u32,
    /// Bytes transferred.
    pub byte_len: u32,
    /// Immediate data (network byte order, with `IBV_WC_WITH_IMM`) or the invalidated rkey.
    pub imm_data: u32,
    /// Local QP number.
    pub qp_num: u32,
    /// Source QP number (UD).
    pub src_qp: u32,
    /// `enum ibv_wc_flags`.
    pub wc_flags: c_uint,
    /// P_Key index.
    pub pkey_index: u16,
    /// Source LID.
    pub slid: u16,
    /// Service level.
    pub sl: u8,
    /// Destination LID path bits.
    pub dlid_path_bits: u8,
}

/// `struct ibv_global_route`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ibv_global_route {
    /// Destination GID.
    pub dgid: ibv_gid,
    /// Flow label.
    pub flow_label: u32,
    /// Source GID index.
    pub sgid_index: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// Traffic class.
    pub traffic_class: u8,
}

/// `struct ibv_ah_attr`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ibv_ah_attr {
    /// Global route.
    pub grh: ibv_global_route,
    /// Destination LID.
    pub dlid: u16,
    /// Service level.
    pub sl: u8,
    /// Source path bits.
    pub src_path_bits: u8,
    /// Static rate.
    pub static_rate: u8,
    /// Whether `grh` is used.
    pub is_global: u8,
    /// Port.
    pub port_num: u8,
}

/// `enum ibv_srq_attr_mask`: the limit.
pub const IBV_SRQ_LIMIT: c_int = 1 << 1;

/// `struct ibv_srq_attr`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_srq_attr {
    /// Max WRs.
    pub max_wr: u32,
    /// Max SGEs per WR.
    pub max_sge: u32,
    /// Limit.
    pub srq_limit: u32,
}

/// `struct ibv_srq_init_attr`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_srq_init_attr {
    /// User context.
    pub srq_context: *mut c_void,
    /// Attributes.
    pub attr: ibv_srq_attr,
}

/// `enum ibv_qp_type` (the values used).
pub mod ibv_qp_type {
    /// IBV_QPT_RC.
    pub const IBV_QPT_RC: u32 = 2;
    /// IBV_QPT_UD.
    pub const IBV_QPT_UD: u32 = 4;
}

/// `struct ibv_qp_cap`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_qp_cap {
    /// Send queue depth.
    pub max_send_wr: u32,
    /// Receive queue depth.
    pub max_recv_wr: u32,
    /// Send SGEs.
    pub max_send_sge: u32,
    /// Receive SGEs.
    pub max_recv_sge: u32,
    /// Inline data.
    pub max_inline_data: u32,
}

/// `struct ibv_qp_init_attr`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_qp_init_attr {
    /// User context.
    pub qp_context: *mut c_void,
    /// Send CQ.
    pub send_cq: *mut ibv_cq,
    /// Receive CQ.
    pub recv_cq: *mut ibv_cq,
    /// SRQ or null.
    pub srq: *mut ibv_srq,
    /// Capabilities.
    pub cap: ibv_qp_cap,
    /// `enum ibv_qp_type`.
    pub qp_type: u32,
    /// Signal every send.
    pub sq_sig_all: c_int,
}

/// `enum ibv_qp_attr_mask` (the bits used).
pub mod ibv_qp_attr_mask {
    /// IBV_QP_STATE.
    pub const IBV_QP_STATE: u32 = 1 << 0;
    /// IBV_QP_ACCESS_FLAGS.
    pub const IBV_QP_ACCESS_FLAGS: u32 = 1 << 3;
    /// IBV_QP_PKEY_INDEX.
    pub const IBV_QP_PKEY_INDEX: u32 = 1 << 4;
    /// IBV_QP_PORT.
    pub const IBV_QP_PORT: u32 = 1 << 5;
    /// IBV_QP_QKEY.
    pub const IBV_QP_QKEY: u32 = 1 << 6;
    /// IBV_QP_AV.
    pub const IBV_QP_AV: u32 = 1 << 7;
    /// IBV_QP_PATH_MTU.
    pub const IBV_QP_PATH_MTU: u32 = 1 << 8;
    /// IBV_QP_TIMEOUT.
    pub const IBV_QP_TIMEOUT: u32 = 1 << 9;
    /// IBV_QP_RETRY_CNT.
    pub const IBV_QP_RETRY_CNT: u32 = 1 << 10;
    /// IBV_QP_RNR_RETRY.
    pub const IBV_QP_RNR_RETRY: u32 = 1 << 11;
    /// IBV_QP_RQ_PSN.
    pub const IBV_QP_RQ_PSN: u32 = 1 << 12;
    /// IBV_QP_MAX_QP_RD_ATOMIC.
    pub const IBV_QP_MAX_QP_RD_ATOMIC: u32 = 1 << 13;
    /// IBV_QP_MIN_RNR_TIMER.
    pub const IBV_QP_MIN_RNR_TIMER: u32 = 1 << 15;
    /// IBV_QP_SQ_PSN.
    pub const IBV_QP_SQ_PSN: u32 = 1 << 16;
    /// IBV_QP_MAX_DEST_RD_ATOMIC.
    pub const IBV_QP_MAX_DEST_RD_ATOMIC: u32 = 1 << 17;
    /// IBV_QP_DEST_QPN.
    pub const IBV_QP_DEST_QPN: u32 = 1 << 20;
}

/// `enum ibv_qp_state` (the states used).
pub mod ibv_qp_state {
    /// IBV_QPS_RESET.
    pub const IBV_QPS_RESET: u32 = 0;
    /// IBV_QPS_INIT.
    pub const IBV_QPS_INIT: u32 = 1;
    /// IBV_QPS_RTR.
    pub const IBV_QPS_RTR: u32 = 2;
    /// IBV_QPS_RTS.
    pub const IBV_QPS_RTS: u32 = 3;
    /// IBV_QPS_SQD.
    pub const IBV_QPS_SQD: u32 = 4;
    /// IBV_QPS_SQE.
    pub const IBV_QPS_SQE: u32 = 5;
    /// IBV_QPS_ERR.
    pub const IBV_QPS_ERR: u32 = 6;
}

/// `struct ibv_qp_attr`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ibv_qp_attr {
    /// `enum ibv_qp_state`.
    pub qp_state: u32,
    /// `enum ibv_qp_state`.
    pub cur_qp_state: u32,
    /// `enum ibv_mtu`.
    pub path_mtu: u32,
    /// `enum ibv_mig_state`.
    pub path_mig_state: u32,
    /// Q_Key.
    pub qkey: u32,
    /// RQ PSN.
    pub rq_psn: u32,
    /// SQ PSN.
    pub sq_psn: u32,
    /// Destination QPN.
    pub dest_qp_num: u32,
    /// `enum ibv_access_flags`.
    pub qp_access_flags: c_uint,
    /// Capabilities.
    pub cap: ibv_qp_cap,
    /// Primary path.
    pub ah_attr: ibv_ah_attr,
    /// Alternate path.
    pub alt_ah_attr: ibv_ah_attr,
    /// P_Key index.
    pub pkey_index: u16,
    /// Alternate P_Key index.
    pub alt_pkey_index: u16,
    /// Enable the SQD async event.
    pub en_sqd_async_notify: u8,
    /// The SQ is draining (in SQD).
    pub sq_draining: u8,
    /// Max outstanding RDMA READ/atomic as initiator.
    pub max_rd_atomic: u8,
    /// Max outstanding RDMA READ/atomic as responder.
    pub max_dest_rd_atomic: u8,
    /// Min RNR NAK timer.
    pub min_rnr_timer: u8,
    /// Port.
    pub port_num: u8,
    /// Local ACK timeout.
    pub timeout: u8,
    /// Retry count.
    pub retry_cnt: u8,
    /// RNR retry count.
    pub rnr_retry: u8,
    /// Alternate port.
    pub alt_port_num: u8,
    /// Alternate timeout.
    pub alt_timeout: u8,
    /// Rate limit (kbps).
    pub rate_limit: u32,
}

/// `struct ibv_sge`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ibv_sge {
    /// Address.
    pub addr: u64,
    /// Length.
    pub length: u32,
    /// Local key.
    pub lkey: u32,
}

/// `enum ibv_wr_opcode` (the values used).
pub mod ibv_wr_opcode {
    /// IBV_WR_RDMA_WRITE.
    pub const IBV_WR_RDMA_WRITE: u32 = 0;
    /// IBV_WR_RDMA_WRITE_WITH_IMM.
    pub const IBV_WR_RDMA_WRITE_WITH_IMM: u32 = 1;
    /// IBV_WR_SEND.
    pub const IBV_WR_SEND: u32 = 2;
    /// IBV_WR_SEND_WITH_IMM.
    pub const IBV_WR_SEND_WITH_IMM: u32 = 3;
    /// IBV_WR_RDMA_READ.
    pub const IBV_WR_RDMA_READ: u32 = 4;
    /// IBV_WR_ATOMIC_CMP_AND_SWP.
    pub const IBV_WR_ATOMIC_CMP_AND_SWP: u32 = 5;
    /// IBV_WR_ATOMIC_FETCH_AND_ADD.
    pub const IBV_WR_ATOMIC_FETCH_AND_ADD: u32 = 6;
}

/// `enum ibv_send_flags`: signaled.
pub const IBV_SEND_SIGNALED: c_uint = 1 << 1;
/// `enum ibv_send_flags`: solicited.
pub const IBV_SEND_SOLICITED: c_uint = 1 << 2;

/// `enum ibv_gid_type`: RoCE v1.
pub const IBV_GID_TYPE_ROCE_V1: u32 = 1;
/// `enum ibv_gid_type`: RoCE v2.
pub const IBV_GID_TYPE_ROCE_V2: u32 = 2;

/// `ibv_send_wr.wr.rdma`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_send_wr_rdma {
    /// Remote address.
    pub remote_addr: u64,
    /// Remote key.
    pub rkey: u32,
}

/// `ibv_send_wr.wr.atomic`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_send_wr_atomic {
    /// Remote address.
    pub remote_addr: u64,
    /// Compare (CMP_AND_SWP) or add (FETCH_AND_ADD).
    pub compare_add: u64,
    /// Swap.
    pub swap: u64,
    /// Remote key.
    pub rkey: u32,
}

/// `ibv_send_wr.wr.ud`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_send_wr_ud {
    /// Address handle.
    pub ah: *mut ibv_ah,
    /// Remote QPN.
    pub remote_qpn: u32,
    /// Remote Q_Key.
    pub remote_qkey: u32,
}

/// `ibv_send_wr.wr`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union ibv_send_wr_wr {
    /// RDMA WRITE/READ.
    pub rdma: ibv_send_wr_rdma,
    /// Atomics.
    pub atomic: ibv_send_wr_atomic,
    /// UD.
    pub ud: ibv_send_wr_ud,
}

/// `struct ibv_mw_bind_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_mw_bind_info {
    /// MR (`struct ibv_mr *`).
    pub mr: *mut ibv_mr,
    /// Address.
    pub addr: u64,
    /// Length.
    pub length: u64,
    /// Access flags.
    pub mw_access_flags: c_uint,
}

/// `ibv_send_wr.bind_mw`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_send_wr_bind_mw {
    /// MW (`struct ibv_mw *`).
    pub mw: *mut c_void,
    /// Its rkey.
    pub rkey: u32,
    /// What it binds.
    pub bind_info: ibv_mw_bind_info,
}

/// `ibv_send_wr.tso`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_send_wr_tso {
    /// Header.
    pub hdr: *mut c_void,
    /// Header size.
    pub hdr_sz: u16,
    /// MSS.
    pub mss: u16,
}

/// The anonymous last union of `ibv_send_wr`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union ibv_send_wr_ext {
    /// BIND_MW.
    pub bind_mw: ibv_send_wr_bind_mw,
    /// TSO.
    pub tso: ibv_send_wr_tso,
}

/// `struct ibv_send_wr`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ibv_send_wr {
    /// Work request id.
    pub wr_id: u64,
    /// Next WR of the list.
    pub next: *mut ibv_send_wr,
    /// SGEs.
    pub sg_list: *mut ibv_sge,
    /// SGE count.
    pub num_sge: c_int,
    /// `enum ibv_wr_opcode`.
    pub opcode: u32,
    /// `enum ibv_send_flags`.
    pub send_flags: c_uint,
    /// Immediate data (network byte order) or the rkey to invalidate.
    pub imm_data: u32,
    /// Operation parameters.
    pub wr: ibv_send_wr_wr,
    /// `qp_type.xrc.remote_srqn`.
    pub qp_type_xrc_remote_srqn: u32,
    /// BIND_MW / TSO parameters.
    pub ext: ibv_send_wr_ext,
}

/// `struct ibv_recv_wr`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_recv_wr {
    /// Work request id.
    pub wr_id: u64,
    /// Next WR of the list.
    pub next: *mut ibv_recv_wr,
    /// SGEs.
    pub sg_list: *mut ibv_sge,
    /// SGE count.
    pub num_sge: c_int,
}

/// `struct ibv_mr`.
#[repr(C)]
#[derive(Debug)]
pub struct ibv_mr {
    /// Context (`struct ibv_context *`).
    pub context: *mut ibv_context,
    /// PD.
    pub pd: *mut ibv_pd,
    /// Address.
    pub addr: *mut c_void,
    /// Length.
    pub length: usize,
    /// Kernel handle.
    pub handle: u32,
    /// Local key.
    pub lkey: u32,
    /// Remote key.
    pub rkey: u32,
}

/// `struct ibv_comp_channel`.
#[repr(C)]
#[derive(Debug)]
pub struct ibv_comp_channel {
    /// Context.
    pub context: *mut ibv_context,
    /// Event fd.
    pub fd: c_int,
    /// Reference count.
    pub refcnt: c_int,
}

type PollCq = unsafe extern "C" fn(*mut ibv_cq, c_int, *mut ibv_wc) -> c_int;
type ReqNotifyCq = unsafe extern "C" fn(*mut ibv_cq, c_int) -> c_int;
type PostSrqRecv =
    unsafe extern "C" fn(*mut ibv_srq, *mut ibv_recv_wr, *mut *mut ibv_recv_wr) -> c_int;
type PostSend = unsafe extern "C" fn(*mut ibv_qp, *mut ibv_send_wr, *mut *mut ibv_send_wr) -> c_int;
type PostRecv = unsafe extern "C" fn(*mut ibv_qp, *mut ibv_recv_wr, *mut *mut ibv_recv_wr) -> c_int;

/// `struct ibv_context_ops`: the data-path entries the header's inline functions call; the other
/// slots (compat entries and memory windows) are kept as untyped pointers.
#[repr(C)]
#[derive(Debug)]
pub struct ibv_context_ops {
    /// `_compat_query_device` .. `_compat_create_cq` (11 slots).
    _before_poll_cq: [*mut c_void; 11],
    /// `poll_cq`.
    pub poll_cq: Option<PollCq>,
    /// `req_notify_cq`.
    pub req_notify_cq: Option<ReqNotifyCq>,
    /// `_compat_cq_event` .. `_compat_destroy_srq` (7 slots).
    _before_post_srq_recv: [*mut c_void; 7],
    /// `post_srq_recv`.
    pub post_srq_recv: Option<PostSrqRecv>,
    /// `_compat_create_qp` .. `_compat_destroy_qp` (4 slots).
    _before_post_send: [*mut c_void; 4],
    /// `post_send`.
    pub post_send: Option<PostSend>,
    /// `post_recv`.
    pub post_recv: Option<PostRecv>,
    /// `_compat_create_ah` .. `_compat_async_event` (5 slots).
    _after_post_recv: [*mut c_void; 5],
}

/// `struct ibv_context`, up to `num_comp_vectors` (allocated by libibverbs, read through
/// pointers only).
#[repr(C)]
#[derive(Debug)]
pub struct ibv_context {
    /// Device.
    pub device: *mut ibv_device,
    /// Operations.
    pub ops: ibv_context_ops,
    /// Command fd.
    pub cmd_fd: c_int,
    /// Async event fd.
    pub async_fd: c_int,
    /// Completion vectors.
    pub num_comp_vectors: c_int,
}

/// `struct ibv_cq`, up to `channel` (read through pointers only).
#[repr(C)]
#[derive(Debug)]
pub struct ibv_cq {
    /// Context.
    pub context: *mut ibv_context,
    /// Completion channel.
    pub channel: *mut ibv_comp_channel,
}

/// `struct ibv_qp`, up to `qp_num` (read through pointers only).
#[repr(C)]
#[derive(Debug)]
pub struct ibv_qp {
    /// Context.
    pub context: *mut ibv_context,
    /// User context.
    pub qp_context: *mut c_void,
    /// PD.
    pub pd: *mut ibv_pd,
    /// Send CQ.
    pub send_cq: *mut ibv_cq,
    /// Receive CQ.
    pub recv_cq: *mut ibv_cq,
    /// SRQ.
    pub srq: *mut ibv_srq,
    /// Kernel handle.
    pub handle: u32,
    /// QP number.
    pub qp_num: u32,
}

/// `struct ibv_srq`, up to `context` (read through pointers only).
#[repr(C)]
#[derive(Debug)]
pub struct ibv_srq {
    /// Context.
    pub context: *mut ibv_context,
}

// Layouts as gcc computes them from rdma-core's verbs.h (x86_64 and other LP64 Linux targets).
#[cfg(target_pointer_width = "64")]
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<ibv_gid>() == 16);
    assert!(size_of::<ibv_gid_entry>() == 32);
    assert!(offset_of!(ibv_gid_entry, gid_index) == 16);
    assert!(offset_of!(ibv_gid_entry, port_num) == 20);
    assert!(offset_of!(ibv_gid_entry, gid_type) == 24);
    assert!(offset_of!(ibv_gid_entry, ndev_ifindex) == 28);

    assert!(size_of::<ibv_device_attr>() == 232);
    assert!(offset_of!(ibv_device_attr, node_guid) == 64);
    assert!(offset_of!(ibv_device_attr, max_qp_wr) == 112);
    assert!(offset_of!(ibv_device_attr, max_sge) == 120);
    assert!(offset_of!(ibv_device_attr, max_cqe) == 132);
    assert!(offset_of!(ibv_device_attr, atomic_cap) == 164);
    assert!(offset_of!(ibv_device_attr, max_pkeys) == 224);
    assert!(offset_of!(ibv_device_attr, phys_port_cnt) == 227);

    assert!(size_of::<ibv_port_attr_compat>() == 48);
    assert!(offset_of!(ibv_port_attr_compat, state) == 0);
    assert!(offset_of!(ibv_port_attr_compat, active_mtu) == 8);
    assert!(offset_of!(ibv_port_attr_compat, gid_tbl_len) == 12);
    assert!(offset_of!(ibv_port_attr_compat, pkey_tbl_len) == 32);
    assert!(offset_of!(ibv_port_attr_compat, lmc) == 38);
    assert!(offset_of!(ibv_port_attr_compat, flags) == 47);

    assert!(size_of::<ibv_async_event>() == 16);
    assert!(offset_of!(ibv_async_event, event_type) == 8);

    assert!(size_of::<ibv_wc>() == 48);
    assert!(offset_of!(ibv_wc, status) == 8);
    assert!(offset_of!(ibv_wc, opcode) == 12);
    assert!(offset_of!(ibv_wc, vendor_err) == 16);
    assert!(offset_of!(ibv_wc, byte_len) == 20);
    assert!(offset_of!(ibv_wc, imm_data) == 24);
    assert!(offset_of!(ibv_wc, qp_num) == 28);
    assert!(offset_of!(ibv_wc, src_qp) == 32);
    assert!(offset_of!(ibv_wc, wc_flags) == 36);
    assert!(offset_of!(ibv_wc, pkey_index) == 40);
    assert!(offset_of!(ibv_wc, slid) == 42);
    assert!(offset_of!(ibv_wc, sl) == 44);
    assert!(offset_of!(ibv_wc, dlid_path_bits) == 45);

    assert!(size_of::<ibv_global_route>() == 24);
    assert!(offset_of!(ibv_global_route, flow_label) == 16);
    assert!(offset_of!(ibv_global_route, sgid_index) == 20);
    assert!(offset_of!(ibv_global_route, hop_limit) == 21);
    assert!(offset_of!(ibv_global_route, traffic_class) == 22);
    assert!(size_of::<ibv_ah_attr>() == 32);
    assert!(offset_of!(ibv_ah_attr, dlid) == 24);
    assert!(offset_of!(ibv_ah_attr, sl) == 26);
    assert!(offset_of!(ibv_ah_attr, src_path_bits) == 27);
    assert!(offset_of!(ibv_ah_attr, static_rate) == 28);
    assert!(offset_of!(ibv_ah_attr, is_global) == 29);
    assert!(offset_of!(ibv_ah_attr, port_num) == 30);

    assert!(size_of::<ibv_srq_attr>() == 12);
    assert!(size_of::<ibv_srq_init_attr>() == 24);
    assert!(offset_of!(ibv_srq_init_attr, attr) == 8);

    assert!(size_of::<ibv_qp_cap>() == 20);
    assert!(size_of::<ibv_qp_init_attr>() == 64);
    assert!(offset_of!(ibv_qp_init_attr, send_cq) == 8);
    assert!(offset_of!(ibv_qp_init_attr, recv_cq) == 16);
    assert!(offset_of!(ibv_qp_init_attr, srq) == 24);
    assert!(offset_of!(ibv_qp_init_attr, cap) == 32);
    assert!(offset_of!(ibv_qp_init_attr, qp_type) == 52);
    assert!(offset_of!(ibv_qp_init_attr, sq_sig_all) == 56);

    assert!(size_of::<ibv_qp_attr>() == 144);
    assert!(offset_of!(ibv_qp_attr, cur_qp_state) == 4);
    assert!(offset_of!(ibv_qp_attr, path_mtu) == 8);
    assert!(offset_of!(ibv_qp_attr, path_mig_state) == 12);
    assert!(offset_of!(ibv_qp_attr, qkey) == 16);
    assert!(offset_of!(ibv_qp_attr, rq_psn) == 20);
    assert!(offset_of!(ibv_qp_attr, sq_psn) == 24);
    assert!(offset_of!(ibv_qp_attr, dest_qp_num) == 28);
    assert!(offset_of!(ibv_qp_attr, qp_access_flags) == 32);
    assert!(offset_of!(ibv_qp_attr, cap) == 36);
    assert!(offset_of!(ibv_qp_attr, ah_attr) == 56);
    assert!(offset_of!(ibv_qp_attr, alt_ah_attr) == 88);
    assert!(offset_of!(ibv_qp_attr, pkey_index) == 120);
    assert!(offset_of!(ibv_qp_attr, alt_pkey_index) == 122);
    assert!(offset_of!(ibv_qp_attr, en_sqd_async_notify) == 124);
    assert!(offset_of!(ibv_qp_attr, sq_draining) == 125);
    assert!(offset_of!(ibv_qp_attr, max_rd_atomic) == 126);
    assert!(offset_of!(ibv_qp_attr, max_dest_rd_atomic) == 127);
    assert!(offset_of!(ibv_qp_attr, min_rnr_timer) == 128);
    assert!(offset_of!(ibv_qp_attr, port_num) == 129);
    assert!(offset_of!(ibv_qp_attr, timeout) == 130);
    assert!(offset_of!(ibv_qp_attr, retry_cnt) == 131);
    assert!(offset_of!(ibv_qp_attr, rnr_retry) == 132);
    assert!(offset_of!(ibv_qp_attr, alt_port_num) == 133);
    assert!(offset_of!(ibv_qp_attr, alt_timeout) == 134);
    assert!(offset_of!(ibv_qp_attr, rate_limit) == 136);

    assert!(size_of::<ibv_sge>() == 16);
    assert!(offset_of!(ibv_sge, length) == 8);
    assert!(offset_of!(ibv_sge, lkey) == 12);

    assert!(size_of::<ibv_send_wr_wr>() == 32);
    assert!(offset_of!(ibv_send_wr_rdma, rkey) == 8);
    assert!(offset_of!(ibv_send_wr_atomic, compare_add) == 8);
    assert!(offset_of!(ibv_send_wr_atomic, swap) == 16);
    assert!(offset_of!(ibv_send_wr_atomic, rkey) == 24);
    assert!(offset_of!(ibv_send_wr_ud, remote_qpn) == 8);
    assert!(offset_of!(ibv_send_wr_ud, remote_qkey) == 12);
    assert!(size_of::<ibv_mw_bind_info>() == 32);
    assert!(size_of::<ibv_send_wr_ext>() == 48);
    assert!(size_of::<ibv_send_wr>() == 128);
    assert!(offset_of!(ibv_send_wr, next) == 8);
    assert!(offset_of!(ibv_send_wr, sg_list) == 16);
    assert!(offset_of!(ibv_send_wr, num_sge) == 24);
    assert!(offset_of!(ibv_send_wr, opcode) == 28);
    assert!(offset_of!(ibv_send_wr, send_flags) == 32);
    assert!(offset_of!(ibv_send_wr, imm_data) == 36);
    assert!(offset_of!(ibv_send_wr, wr) == 40);
    assert!(offset_of!(ibv_send_wr, qp_type_xrc_remote_srqn) == 72);
    assert!(offset_of!(ibv_send_wr, ext) == 80);

    assert!(size_of::<ibv_recv_wr>() == 32);
    assert!(offset_of!(ibv_recv_wr, next) == 8);
    assert!(offset_of!(ibv_recv_wr, sg_list) == 16);
    assert!(offset_of!(ibv_recv_wr, num_sge) == 24);

    assert!(size_of::<ibv_mr>() == 48);
    assert!(offset_of!(ibv_mr, handle) == 32);
    assert!(offset_of!(ibv_mr, lkey) == 36);
    assert!(offset_of!(ibv_mr, rkey) == 40);

    assert!(size_of::<ibv_comp_channel>() == 16);
    assert!(offset_of!(ibv_comp_channel, fd) == 8);

    assert!(size_of::<ibv_context_ops>() == 256);
    assert!(offset_of!(ibv_context_ops, poll_cq) == 88);
    assert!(offset_of!(ibv_context_ops, req_notify_cq) == 96);
    assert!(offset_of!(ibv_context_ops, post_srq_recv) == 160);
    assert!(offset_of!(ibv_context_ops, post_send) == 200);
    assert!(offset_of!(ibv_context_ops, post_recv) == 208);
    assert!(offset_of!(ibv_context, ops) == 8);
    assert!(offset_of!(ibv_context, cmd_fd) == 264);
    assert!(offset_of!(ibv_context, async_fd) == 268);
    assert!(offset_of!(ibv_context, num_comp_vectors) == 272);

    assert!(offset_of!(ibv_cq, context) == 0);
    assert!(offset_of!(ibv_cq, channel) == 8);
    assert!(offset_of!(ibv_qp, context) == 0);
    assert!(offset_of!(ibv_qp, handle) == 48);
    assert!(offset_of!(ibv_qp, qp_num) == 52);
    assert!(offset_of!(ibv_srq, context) == 0);
};

/// Declares [`Lib`] (one field per exported function) and its loader, from one list so the
/// field types and the types the symbols are read as cannot differ.
macro_rules! verbs_functions {
    ($($(#[$doc:meta])* $field:ident = $sym:literal: fn($($arg:ty),*) $(-> $ret:ty)?;)*) => {
        /// The exported libibverbs functions, resolved with `dlsym`.
        pub struct Lib {
            $($(#[$doc])* pub $field: unsafe extern "C" fn($($arg),*) $(-> $ret)?,)*
        }

        impl Lib {
            fn resolve(handle: *mut c_void) -> Result<Lib, String> {
                Ok(Lib {
                    $($field: {
                        let p = symbol(handle, $sym)?;
                        // SAFETY: `p` is the non-null address of the libibverbs function named
                        // `$sym`, whose C prototype in verbs.h is the one written here.
                        unsafe {
                            std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) $(-> $ret)?>(p)
                        }
                    },)*
                })
            }
        }
    };
}

verbs_functions! {
    /// `ibv_get_device_list`.
    get_device_list = c"ibv_get_device_list": fn(*mut c_int) -> *mut *mut ibv_device;
    /// `ibv_free_device_list`.
    free_device_list = c"ibv_free_device_list": fn(*mut *mut ibv_device);
    /// `ibv_get_device_name`.
    get_device_name = c"ibv_get_device_name": fn(*mut ibv_device) -> *const c_char;
    /// `ibv_open_device`.
    open_device = c"ibv_open_device": fn(*mut ibv_device) -> *mut ibv_context;
    /// `ibv_close_device`.
    close_device = c"ibv_close_device": fn(*mut ibv_context) -> c_int;
    /// `ibv_query_device`.
    query_device = c"ibv_query_device": fn(*mut ibv_context, *mut ibv_device_attr) -> c_int;
    /// `ibv_query_port` as exported (`struct _compat_ibv_port_attr`).
    query_port = c"ibv_query_port": fn(*mut ibv_context, u8, *mut ibv_port_attr_compat) -> c_int;
    /// `_ibv_query_gid_ex` (the header's `ibv_query_gid_ex` passes the entry size).
    query_gid_ex = c"_ibv_query_gid_ex":
        fn(*mut ibv_context, u32, u32, *mut ibv_gid_entry, u32, usize) -> c_int;
    /// `ibv_get_async_event`.
    get_async_event = c"ibv_get_async_event": fn(*mut ibv_context, *mut ibv_async_event) -> c_int;
    /// `ibv_ack_async_event`.
    ack_async_event = c"ibv_ack_async_event": fn(*mut ibv_async_event);
    /// `ibv_alloc_pd`.
    alloc_pd = c"ibv_alloc_pd": fn(*mut ibv_context) -> *mut ibv_pd;
    /// `ibv_dealloc_pd`.
    dealloc_pd = c"ibv_dealloc_pd": fn(*mut ibv_pd) -> c_int;
    /// `ibv_reg_mr_iova2`.
    reg_mr_iova2 = c"ibv_reg_mr_iova2": fn(*mut ibv_pd, *mut c_void, usize, u64, c_uint) -> *mut ibv_mr;
    /// `ibv_dereg_mr`.
    dereg_mr = c"ibv_dereg_mr": fn(*mut ibv_mr) -> c_int;
    /// `ibv_create_comp_channel`.
    create_comp_channel = c"ibv_create_comp_channel": fn(*mut ibv_context) -> *mut ibv_comp_channel;
    /// `ibv_destroy_comp_channel`.
    destroy_comp_channel = c"ibv_destroy_comp_channel": fn(*mut ibv_comp_channel) -> c_int;
    /// `ibv_get_cq_event`.
    get_cq_event = c"ibv_get_cq_event":
        fn(*mut ibv_comp_channel, *mut *mut ibv_cq, *mut *mut c_void) -> c_int;
    /// `ibv_ack_cq_events`.
    ack_cq_events = c"ibv_ack_cq_events": fn(*mut ibv_cq, c_uint);
    /// `ibv_create_cq`.
    create_cq = c"ibv_create_cq":
        fn(*mut ibv_context, c_int, *mut c_void, *mut ibv_comp_channel, c_int) -> *mut ibv_cq;
    /// `ibv_destroy_cq`.
    destroy_cq = c"ibv_destroy_cq": fn(*mut ibv_cq) -> c_int;
    /// `ibv_create_srq`.
    create_srq = c"ibv_create_srq": fn(*mut ibv_pd, *mut ibv_srq_init_attr) -> *mut ibv_srq;
    /// `ibv_modify_srq`.
    modify_srq = c"ibv_modify_srq": fn(*mut ibv_srq, *mut ibv_srq_attr, c_int) -> c_int;
    /// `ibv_destroy_srq`.
    destroy_srq = c"ibv_destroy_srq": fn(*mut ibv_srq) -> c_int;
    /// `ibv_create_ah`.
    create_ah = c"ibv_create_ah": fn(*mut ibv_pd, *mut ibv_ah_attr) -> *mut ibv_ah;
    /// `ibv_destroy_ah`.
    destroy_ah = c"ibv_destroy_ah": fn(*mut ibv_ah) -> c_int;
    /// `ibv_create_qp`.
    create_qp = c"ibv_create_qp": fn(*mut ibv_pd, *mut ibv_qp_init_attr) -> *mut ibv_qp;
    /// `ibv_query_qp`.
    query_qp = c"ibv_query_qp":
        fn(*mut ibv_qp, *mut ibv_qp_attr, c_int, *mut ibv_qp_init_attr) -> c_int;
    /// `ibv_modify_qp`.
    modify_qp = c"ibv_modify_qp": fn(*mut ibv_qp, *mut ibv_qp_attr, c_int) -> c_int;
    /// `ibv_destroy_qp`.
    destroy_qp = c"ibv_destroy_qp": fn(*mut ibv_qp) -> c_int;
}

impl std::fmt::Debug for Lib {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(LIBIBVERBS)
    }
}

/// The last `dlerror` text.
fn dlerror() -> String {
    // SAFETY: dlerror has no preconditions; it returns NULL or a NUL-terminated string owned by
    // libc, valid until the next dl* call of this thread (it is copied right away).
    let msg = unsafe { libc::dlerror() };
    if msg.is_null() {
        return "unknown error".to_string();
    }
    // SAFETY: non-null, NUL-terminated (see above).
    unsafe { CStr::from_ptr(msg) }
        .to_string_lossy()
        .into_owned()
}

fn symbol(handle: *mut c_void, name: &CStr) -> Result<*mut c_void, String> {
    // SAFETY: `handle` is a live dlopen handle (never closed); `name` is NUL-terminated.
    let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
    if p.is_null() {
        return Err(format!(
            "{LIBIBVERBS} has no {} ({}); rdma-core is too old (v32 or later is needed)",
            name.to_string_lossy(),
            dlerror()
        ));
    }
    Ok(p)
}

fn load() -> Result<Lib, String> {
    let name = c"libibverbs.so.1";
    // SAFETY: dlopen with a NUL-terminated name. The handle is never closed: the functions
    // resolved from it are used for the rest of the process.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return Err(format!("{LIBIBVERBS} cannot be loaded ({})", dlerror()));
    }
    Lib::resolve(handle)
}

static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();

/// libibverbs, loaded on first use; the error says why it cannot be (library or a function
/// missing). Later calls return the first outcome.
pub fn lib() -> Result<&'static Lib, String> {
    LIB.get_or_init(load).as_ref().map_err(Clone::clone)
}

/// `ibv_poll_cq` (inline in verbs.h: `cq->context->ops.poll_cq`).
///
/// # Safety
/// `cq` is a live CQ and `wc` has room for `num_entries` entries.
pub unsafe fn ibv_poll_cq(cq: *mut ibv_cq, num_entries: c_int, wc: *mut ibv_wc) -> c_int {
    // SAFETY: `cq` is live (caller), so are its context and ops table, which every provider
    // fills for the data path.
    unsafe {
        let f = (*(*cq).context).ops.poll_cq.expect("provider has poll_cq");
        f(cq, num_entries, wc)
    }
}

/// `ibv_req_notify_cq` (inline in verbs.h: `cq->context->ops.req_notify_cq`).
///
/// # Safety
/// `cq` is a live CQ.
pub unsafe fn ibv_req_notify_cq(cq: *mut ibv_cq, solicited_only: c_int) -> c_int {
    // SAFETY: as in `ibv_poll_cq`.
    unsafe {
        let f = (*(*cq).context)
            .ops
            .req_notify_cq
            .expect("provider has req_notify_cq");
        f(cq, solicited_only)
    }
}

/// `ibv_post_send` (inline in verbs.h: `qp->context->ops.post_send`).
///
/// # Safety
/// `qp` is a live QP; `wr` is a valid WR list whose SGEs (and AHs) are valid; `bad_wr` is
/// writable.
pub unsafe fn ibv_post_send(
    qp: *mut ibv_qp,
    wr: *mut ibv_send_wr,
    bad_wr: *mut *mut ibv_send_wr,
) -> c_int {
    // SAFETY: `qp` is live (caller), so are its context and ops table.
    unsafe {
        let f = (*(*qp).context)
            .ops
            .post_send
            .expect("provider has post_send");
        f(qp, wr, bad_wr)
    }
}

/// `ibv_post_recv` (inline in verbs.h: `qp->context->ops.post_recv`).
///
/// # Safety
/// `qp` is a live QP; `wr` is a valid WR list; `bad_wr` is writable.
pub unsafe fn ibv_post_recv(
    qp: *mut ibv_qp,
    wr: *mut ibv_recv_wr,
    bad_wr: *mut *mut ibv_recv_wr,
) -> c_int {
    // SAFETY: as in `ibv_post_send`.
    unsafe {
        let f = (*(*qp).context)
            .ops
            .post_recv
            .expect("provider has post_recv");
        f(qp, wr, bad_wr)
    }
}

/// `ibv_post_srq_recv` (inline in verbs.h: `srq->context->ops.post_srq_recv`).
///
/// # Safety
/// `srq` is a live SRQ; `wr` is a valid WR list; `bad_wr` is writable.
pub unsafe fn ibv_post_srq_recv(
    srq: *mut ibv_srq,
    wr: *mut ibv_recv_wr,
    bad_wr: *mut *mut ibv_recv_wr,
) -> c_int {
    // SAFETY: `srq` is live (caller), so are its context and ops table.
    unsafe {
        let f = (*(*srq).context)
            .ops
            .post_srq_recv
            .expect("provider has post_srq_recv");
        f(srq, wr, bad_wr)
    }
}

/// `ibv_query_gid_ex` (inline in verbs.h: `_ibv_query_gid_ex` with `sizeof(*entry)`).
///
/// # Safety
/// `context` is an open context and `entry` is writable.
pub unsafe fn ibv_query_gid_ex(
    lib: &Lib,
    context: *mut ibv_context,
    port_num: u32,
    gid_index: u32,
    entry: *mut ibv_gid_entry,
    flags: u32,
) -> c_int {
    // SAFETY: the caller's guarantees; the size is that of `entry`'s type.
    unsafe {
        (lib.query_gid_ex)(
            context,
            port_num,
            gid_index,
            entry,
            flags,
            std::mem::size_of::<ibv_gid_entry>(),
        )
    }
}
