//! Wire structures shared with the guest (spec/device-abi.md §2, §4, §7, §8, §9).
//!
//! Every structure is `#[repr(C)]` with explicit reserved fields, so it has no implicit padding,
//! and implements [`ByteValued`] so it can be copied to and from guest memory with
//! `read_obj`/`write_obj`. Field offsets are pinned to the spec's numbers by the tests at the end.
//! Multi-byte fields are little-endian on the wire; the device only runs on little-endian hosts
//! (x86-64, aarch64), which a compile-time check below enforces.

use vm_memory::ByteValued;

#[cfg(not(target_endian = "little"))]
compile_error!("the PVRDMA wire structures are little-endian; big-endian hosts are not supported");

/// Implements [`ByteValued`] for plain wire structures.
macro_rules! byte_valued {
    ($($t:ty),* $(,)?) => {
        $(
            // SAFETY: the type is `#[repr(C)]`, made only of integers and arrays of integers, and
            // its fields are laid out without implicit padding (the layout tests check that the
            // size equals the sum of the fields), so every bit pattern is a valid value.
            unsafe impl ByteValued for $t {}
        )*
    };
}

/// Size of the command slot the device reads (the union of all requests).
pub const CMD_SLOT_SIZE: usize = 184;
/// Size of the response union the driver copies back.
pub const RESP_SLOT_SIZE: usize = 176;
/// The ack bit OR-ed into the command code in every response.
pub const RESP_ACK: u32 = 0x8000_0000;

/// Command codes (spec §4).
pub mod cmd {
    /// QUERY_PORT.
    pub const QUERY_PORT: u32 = 0;
    /// QUERY_PKEY.
    pub const QUERY_PKEY: u32 = 1;
    /// CREATE_PD.
    pub const CREATE_PD: u32 = 2;
    /// DESTROY_PD.
    pub const DESTROY_PD: u32 = 3;
    /// CREATE_MR.
    pub const CREATE_MR: u32 = 4;
    /// DESTROY_MR.
    pub const DESTROY_MR: u32 = 5;
    /// CREATE_CQ.
    pub const CREATE_CQ: u32 = 6;
    /// RESIZE_CQ.
    pub const RESIZE_CQ: u32 = 7;
    /// DESTROY_CQ.
    pub const DESTROY_CQ: u32 = 8;
    /// CREATE_QP.
    pub const CREATE_QP: u32 = 9;
    /// MODIFY_QP.
    pub const MODIFY_QP: u32 = 10;
    /// QUERY_QP.
    pub const QUERY_QP: u32 = 11;
    /// DESTROY_QP.
    pub const DESTROY_QP: u32 = 12;
    /// CREATE_UC.
    pub const CREATE_UC: u32 = 13;
    /// DESTROY_UC.
    pub const DESTROY_UC: u32 = 14;
    /// CREATE_BIND.
    pub const CREATE_BIND: u32 = 15;
    /// DESTROY_BIND.
    pub const DESTROY_BIND: u32 = 16;
    /// CREATE_SRQ.
    pub const CREATE_SRQ: u32 = 17;
    /// MODIFY_SRQ.
    pub const MODIFY_SRQ: u32 = 18;
    /// QUERY_SRQ.
    pub const QUERY_SRQ: u32 = 19;
    /// DESTROY_SRQ.
    pub const DESTROY_SRQ: u32 = 20;
    /// Number of command codes in ABI version 20.
    pub const COUNT: u32 = 21;
}

/// Device Shared Region header fields a ring is described by.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingPages {
    /// Pages including the ring-state page.
    pub num_pages: u32,
    /// Reserved.
    pub reserved: u32,
    /// Page directory of the ring.
    pub pdir_dma: u64,
}

/// Device capabilities, written by the device into the DSR at offset 72.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Caps {
    pub fw_ver: u64,
    /// Big-endian on the wire.
    pub node_guid: u64,
    /// Big-endian on the wire.
    pub sys_image_guid: u64,
    pub max_mr_size: u64,
    pub page_size_cap: u64,
    pub atomic_arg_sizes: u64,
    pub ex_comp_mask: u32,
    pub device_cap_flags2: u32,
    pub max_fa_bit_boundary: u32,
    pub log_max_atomic_inline_arg: u32,
    pub vendor_id: u32,
    pub vendor_part_id: u32,
    pub hw_ver: u32,
    pub max_qp: u32,
    pub max_qp_wr: u32,
    pub device_cap_flags: u32,
    pub max_sge: u32,
    pub max_sge_rd: u32,
    pub max_cq: u32,
    pub max_cqe: u32,
    pub max_mr: u32,
    pub max_pd: u32,
    pub max_qp_rd_atom: u32,
    pub max_ee_rd_atom: u32,
    pub max_res_rd_atom: u32,
    pub max_qp_init_rd_atom: u32,
    pub max_ee_init_rd_atom: u32,
    pub max_ee: u32,
    pub max_rdd: u32,
    pub max_mw: u32,
    pub max_raw_ipv6_qp: u32,
    pub max_raw_ethy_qp: u32,
    pub max_mcast_grp: u32,
    pub max_mcast_qp_attach: u32,
    pub max_total_mcast_qp_attach: u32,
    pub max_ah: u32,
    pub max_fmr: u32,
    pub max_map_per_fmr: u32,
    pub max_srq: u32,
    pub max_srq_wr: u32,
    pub max_srq_sge: u32,
    pub max_uar: u32,
    pub gid_tbl_len: u32,
    pub max_pkeys: u16,
    pub local_ca_ack_delay: u8,
    pub phys_port_cnt: u8,
    pub mode: u8,
    pub atomic_ops: u8,
    pub bmme_flags: u8,
    pub gid_types: u8,
    pub max_fast_reg_page_list_len: u32,
}

/// The Device Shared Region (280 bytes, `#pragma pack(1)` in the driver, naturally aligned here).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dsr {
    /// Driver's ABI version (20 for current Linux).
    pub driver_version: u32,
    /// Padding.
    pub pad1: u32,
    /// Guest OS information bitfield.
    pub gos_info: u32,
    /// Padding.
    pub pad2: u32,
    /// Command slot page.
    pub cmd_slot_dma: u64,
    /// Response slot page.
    pub resp_slot_dma: u64,
    /// Async event ring.
    pub async_ring_pages: RingPages,
    /// CQ notification ring.
    pub cq_ring_pages: RingPages,
    /// UAR PFN (u32 below version 19, u64 from 19).
    pub uar_pfn64: u64,
    /// Capabilities, written by the device.
    pub caps: Caps,
}

/// Offset of `caps` in the DSR.
pub const DSR_CAPS_OFFSET: u64 = 72;

/// Command header (16 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CmdHdr {
    /// Opaque value echoed in the response.
    pub response: u64,
    /// Command code.
    pub cmd: u32,
    /// Reserved.
    pub reserved: u32,
}

/// Response header (16 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RespHdr {
    /// Echo of the request's `response`.
    pub response: u64,
    /// `cmd | RESP_ACK`.
    pub ack: u32,
    /// Error code (checked by the driver for MODIFY_QP only).
    pub err: u8,
    /// Reserved.
    pub reserved: [u8; 3],
}

macro_rules! wire {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[allow(missing_docs)]
        pub struct $name { $($(#[$fm])* pub $f: $t),* }
    };
}

wire!(/// QUERY_PORT request.
    CmdQueryPort { hdr: CmdHdr, port_num: u8, reserved: [u8; 7] });
wire!(/// QUERY_PKEY request.
    CmdQueryPkey { hdr: CmdHdr, port_num: u8, index: u8, reserved: [u8; 6] });
wire!(/// CREATE_UC request (`pfn` is 32-bit below version 19; the request is zeroed, so 64 bits are read).
    CmdCreateUc { hdr: CmdHdr, pfn64: u64 });
wire!(/// DESTROY_UC request.
    CmdDestroyUc { hdr: CmdHdr, ctx_handle: u32, reserved: u32 });
wire!(/// CREATE_PD request.
    CmdCreatePd { hdr: CmdHdr, ctx_handle: u32, reserved: u32 });
wire!(/// DESTROY_PD request.
    CmdDestroyPd { hdr: CmdHdr, pd_handle: u32, reserved: u32 });
wire!(/// CREATE_MR request.
    CmdCreateMr { hdr: CmdHdr, start: u64, length: u64, pdir_dma: u64, pd_handle: u32,
        access_flags: u32, flags: u32, nchunks: u32 });
wire!(/// DESTROY_MR request.
    CmdDestroyMr { hdr: CmdHdr, mr_handle: u32, reserved: u32 });
wire!(/// CREATE_CQ request.
    CmdCreateCq { hdr: CmdHdr, pdir_dma: u64, ctx_handle: u32, cqe: u32, nchunks: u32,
        reserved: u32 });
wire!(/// RESIZE_CQ request.
    CmdResizeCq { hdr: CmdHdr, cq_handle: u32, cqe: u32 });
wire!(/// DESTROY_CQ request.
    CmdDestroyCq { hdr: CmdHdr, cq_handle: u32, reserved: u32 });
wire!(/// SRQ attributes.
    SrqAttr { max_wr: u32, max_sge: u32, srq_limit: u32, reserved: u32 });
wire!(/// CREATE_SRQ request.
    CmdCreateSrq { hdr: CmdHdr, pdir_dma: u64, pd_handle: u32, nchunks: u32, attrs: SrqAttr,
        srq_type: u8, reserved: [u8; 7] });
wire!(/// MODIFY_SRQ request.
    CmdModifySrq { hdr: CmdHdr, srq_handle: u32, attr_mask: u32, attrs: SrqAttr });
wire!(/// QUERY_SRQ request.
    CmdQuerySrq { hdr: CmdHdr, srq_handle: u32, reserved: u32 });
wire!(/// DESTROY_SRQ request.
    CmdDestroySrq { hdr: CmdHdr, srq_handle: u32, reserved: u32 });
wire!(/// CREATE_QP request.
    CmdCreateQp { hdr: CmdHdr, pdir_dma: u64, pd_handle: u32, send_cq_handle: u32,
        recv_cq_handle: u32, srq_handle: u32, max_send_wr: u32, max_recv_wr: u32,
        max_send_sge: u32, max_recv_sge: u32, max_inline_data: u32, lkey: u32,
        access_flags: u32, total_chunks: u16, send_chunks: u16, max_atomic_arg: u16,
        sq_sig_all: u8, qp_type: u8, is_srq: u8, reserved: [u8; 3] });
wire!(/// Global route header part of an address handle attribute.
    GlobalRoute { dgid: [u8; 16], flow_label: u32, sgid_index: u8, hop_limit: u8,
        traffic_class: u8, reserved: u8 });
wire!(/// Address handle attributes (40 bytes).
    AhAttr { grh: GlobalRoute, dlid: u16, vlan_id: u16, sl: u8, src_path_bits: u8,
        static_rate: u8, ah_flags: u8, port_num: u8, dmac: [u8; 6], reserved: u8 });
wire!(/// QP capabilities.
    QpCap { max_send_wr: u32, max_recv_wr: u32, max_send_sge: u32, max_recv_sge: u32,
        max_inline_data: u32, reserved: u32 });
wire!(/// QP attributes (160 bytes).
    QpAttr { qp_state: u32, cur_qp_state: u32, path_mtu: u32, path_mig_state: u32, qkey: u32,
        rq_psn: u32, sq_psn: u32, dest_qp_num: u32, qp_access_flags: u32, pkey_index: u16,
        alt_pkey_index: u16, en_sqd_async_notify: u8, sq_draining: u8, max_rd_atomic: u8,
        max_dest_rd_atomic: u8, min_rnr_timer: u8, port_num: u8, timeout: u8, retry_cnt: u8,
        rnr_retry: u8, alt_port_num: u8, alt_timeout: u8, reserved: [u8; 5], cap: QpCap,
        ah_attr: AhAttr, alt_ah_attr: AhAttr });
wire!(/// MODIFY_QP request (the largest request: 184 bytes).
    CmdModifyQp { hdr: CmdHdr, qp_handle: u32, attr_mask: u32, attrs: QpAttr });
wire!(/// QUERY_QP request.
    CmdQueryQp { hdr: CmdHdr, qp_handle: u32, attr_mask: u32 });
wire!(/// DESTROY_QP request.
    CmdDestroyQp { hdr: CmdHdr, qp_handle: u32, reserved: u32 });
wire!(/// CREATE_BIND request (add a GID table entry).
    CmdCreateBind { hdr: CmdHdr, mtu: u32, vlan: u32, index: u32, new_gid: [u8; 16],
        gid_type: u8, reserved: [u8; 3] });
wire!(/// DESTROY_BIND request.
    CmdDestroyBind { hdr: CmdHdr, index: u32, dest_gid: [u8; 16], reserved: [u8; 4] });

wire!(/// Port attributes (48 bytes).
    PortAttr { state: u32, max_mtu: u32, active_mtu: u32, gid_tbl_len: u32, port_cap_flags: u32,
        max_msg_sz: u32, bad_pkey_cntr: u32, qkey_viol_cntr: u32, pkey_tbl_len: u16, lid: u16,
        sm_lid: u16, lmc: u8, max_vl_num: u8, sm_sl: u8, subnet_timeout: u8,
        init_type_reply: u8, active_width: u8, active_speed: u8, phys_state: u8,
        reserved: [u8; 2] });
wire!(/// QUERY_PORT response.
    RespQueryPort { hdr: RespHdr, attrs: PortAttr });
wire!(/// QUERY_PKEY response.
    RespQueryPkey { hdr: RespHdr, pkey: u16, reserved: [u8; 6] });
wire!(/// CREATE_UC response.
    RespCreateUc { hdr: RespHdr, ctx_handle: u32, reserved: u32 });
wire!(/// CREATE_PD response.
    RespCreatePd { hdr: RespHdr, pd_handle: u32, reserved: u32 });
wire!(/// CREATE_MR response.
    RespCreateMr { hdr: RespHdr, mr_handle: u32, lkey: u32, rkey: u32, reserved: u32 });
wire!(/// CREATE_CQ response.
    RespCreateCq { hdr: RespHdr, cq_handle: u32, cqe: u32 });
wire!(/// RESIZE_CQ response.
    RespResizeCq { hdr: RespHdr, cqe: u32, reserved: u32 });
wire!(/// CREATE_SRQ response.
    RespCreateSrq { hdr: RespHdr, srqn: u32, reserved: u32 });
wire!(/// QUERY_SRQ response.
    RespQuerySrq { hdr: RespHdr, attrs: SrqAttr });
wire!(/// CREATE_QP response, ABI below 20.
    RespCreateQpV1 { hdr: RespHdr, qpn: u32, max_send_wr: u32, max_recv_wr: u32,
        max_send_sge: u32, max_recv_sge: u32, max_inline_data: u32 });
wire!(/// CREATE_QP response, ABI 20 (separate `qp_handle`).
    RespCreateQpV2 { hdr: RespHdr, qpn: u32, qp_handle: u32, max_send_wr: u32,
        max_recv_wr: u32, max_send_sge: u32, max_recv_sge: u32, max_inline_data: u32,
        reserved: u32 });
wire!(/// QUERY_QP response.
    RespQueryQp { hdr: RespHdr, attrs: QpAttr });
wire!(/// DESTROY_QP response.
    RespDestroyQp { hdr: RespHdr, events_reported: u32, reserved: u32 });

wire!(/// Send WQE header (80 bytes; SGEs follow). `wr` is the 48-byte union, decoded per opcode.
    SqWqeHdr { wr_id: u64, num_sge: u32, total_len: u32, opcode: u32, send_flags: u32, ex: u32,
        reserved: u32, wr: [u32; 12] });
wire!(/// Receive WQE header (16 bytes; SGEs follow).
    RqWqeHdr { wr_id: u64, num_sge: u32, total_len: u32 });
wire!(/// Scatter/gather entry (16 bytes).
    WireSge { addr: u64, length: u32, lkey: u32 });
wire!(/// Completion queue entry (64 bytes).
    Cqe { wr_id: u64, qp: u64, opcode: u32, status: u32, byte_len: u32, imm_data: u32,
        src_qp: u32, wc_flags: u32, vendor_err: u32, pkey_index: u16, slid: u16, sl: u8,
        dlid_path_bits: u8, port_num: u8, smac: [u8; 6], network_hdr_type: u8,
        reserved: [u8; 6] });
wire!(/// Async event ring element.
    Eqe { event_type: u32, info: u32 });
wire!(/// CQ notification ring element.
    Cqne { info: u32 });

byte_valued!(
    RingPages,
    Caps,
    Dsr,
    CmdHdr,
    RespHdr,
    CmdQueryPort,
    CmdQueryPkey,
    CmdCreateUc,
    CmdDestroyUc,
    CmdCreatePd,
    CmdDestroyPd,
    CmdCreateMr,
    CmdDestroyMr,
    CmdCreateCq,
    CmdResizeCq,
    CmdDestroyCq,
    SrqAttr,
    CmdCreateSrq,
    CmdModifySrq,
    CmdQuerySrq,
    CmdDestroySrq,
    CmdCreateQp,
    GlobalRoute,
    AhAttr,
    QpCap,
    QpAttr,
    CmdModifyQp,
    CmdQueryQp,
    CmdDestroyQp,
    CmdCreateBind,
    CmdDestroyBind,
    PortAttr,
    RespQueryPort,
    RespQueryPkey,
    RespCreateUc,
    RespCreatePd,
    RespCreateMr,
    RespCreateCq,
    RespResizeCq,
    RespCreateSrq,
    RespQuerySrq,
    RespCreateQpV1,
    RespCreateQpV2,
    RespQueryQp,
    RespDestroyQp,
    SqWqeHdr,
    RqWqeHdr,
    WireSge,
    Cqe,
    Eqe,
    Cqne,
);

/// Size of the send WQE header.
pub const SQ_WQE_HDR_SIZE: u32 = 80;
/// Size of the receive WQE header.
pub const RQ_WQE_HDR_SIZE: u32 = 16;
/// Size of one SGE.
pub const SGE_SIZE: u32 = 16;
/// Size of one CQE.
pub const CQE_SIZE: u32 = 64;

/// Where the two ring states (`struct pvrdma_ring { prod_tail, cons_head }`) sit in page 0 of a
/// queue's page directory (spec §6).
pub mod ring_state {
    /// The tx half: a QP's send queue.
    pub const TX: u64 = 0;
    /// The rx half: a QP's receive queue, an SRQ, a CQ, the async-event ring.
    pub const RX: u64 = 8;
}

/// IB QP attribute mask bits (`ib_qp_attr_mask`), as MODIFY_QP's `attr_mask` carries them.
pub mod qp_attr_mask {
    /// `qp_state`.
    pub const STATE: u32 = 1 << 0;
    /// `cur_qp_state`.
    pub const CUR_STATE: u32 = 1 << 1;
    /// `qp_access_flags`.
    pub const ACCESS_FLAGS: u32 = 1 << 3;
    /// `pkey_index`.
    pub const PKEY_INDEX: u32 = 1 << 4;
    /// `port_num`.
    pub const PORT: u32 = 1 << 5;
    /// `qkey`.
    pub const QKEY: u32 = 1 << 6;
    /// `ah_attr`.
    pub const AV: u32 = 1 << 7;
    /// `path_mtu`.
    pub const PATH_MTU: u32 = 1 << 8;
    /// `timeout`.
    pub const TIMEOUT: u32 = 1 << 9;
    /// `retry_cnt`.
    pub const RETRY_CNT: u32 = 1 << 10;
    /// `rnr_retry`.
    pub const RNR_RETRY: u32 = 1 << 11;
    /// `rq_psn`.
    pub const RQ_PSN: u32 = 1 << 12;
    /// `max_rd_atomic`.
    pub const MAX_QP_RD_ATOMIC: u32 = 1 << 13;
    /// `min_rnr_timer`.
    pub const MIN_RNR_TIMER: u32 = 1 << 15;
    /// `sq_psn`.
    pub const SQ_PSN: u32 = 1 << 16;
    /// `max_dest_rd_atomic`.
    pub const MAX_DEST_RD_ATOMIC: u32 = 1 << 17;
    /// `dest_qp_num`.
    pub const DEST_QPN: u32 = 1 << 20;
    /// Every bit the driver passes (`IB_QP_STATE` … `IB_QP_DEST_QPN`).
    pub const ALL: u32 = (1 << 21) - 1;
}

/// Send opcodes as they appear in the WQE (spec §7).
pub mod wr_opcode {
    /// RDMA WRITE.
    pub const RDMA_WRITE: u32 = 0;
    /// RDMA WRITE with immediate.
    pub const RDMA_WRITE_WITH_IMM: u32 = 1;
    /// SEND.
    pub const SEND: u32 = 2;
    /// SEND with immediate.
    pub const SEND_WITH_IMM: u32 = 3;
    /// RDMA READ.
    pub const RDMA_READ: u32 = 4;
    /// Compare and swap.
    pub const ATOMIC_CMP_AND_SWP: u32 = 5;
    /// Fetch and add.
    pub const ATOMIC_FETCH_AND_ADD: u32 = 6;
    /// SEND with invalidate (kernel QPs only; `ex` is the responder's rkey).
    pub const SEND_WITH_INV: u32 = 8;
    /// Local invalidate (kernel QPs only; `ex` is the key).
    pub const LOCAL_INV: u32 = 10;
    /// Fast registration (kernel QPs only; the `fast_reg` member of the `wr` union).
    pub const FAST_REG_MR: u32 = 11;
}

/// `bmme_flags` bits of the caps (spec §2 @202): all three make the guest core report
/// `IB_DEVICE_MEM_MGT_EXTENSIONS`.
pub mod bmme {
    /// Local invalidate.
    pub const LOCAL_INV: u8 = 1 << 0;
    /// Remote invalidate (SEND with invalidate).
    pub const REMOTE_INV: u8 = 1 << 1;
    /// Fast-register work requests.
    pub const FAST_REG_WR: u8 = 1 << 2;
    /// All of them.
    pub const ALL: u8 = LOCAL_INV | REMOTE_INV | FAST_REG_WR;
}

/// Async event types (`ib_event_type` numbering, spec §9): the `type` of an event ring entry.
pub mod event {
    /// A CQ overflowed (info: CQ handle).
    pub const CQ_ERR: u32 = 0;
    /// A QP is unusable (info: QP handle).
    pub const QP_FATAL: u32 = 1;
    /// A QP's responder refused a request as invalid.
    pub const QP_REQ_ERR: u32 = 2;
    /// A QP's responder refused a request's access.
    pub const QP_ACCESS_ERR: u32 = 3;
    /// The port became ACTIVE (info: port number).
    pub const PORT_ACTIVE: u32 = 9;
    /// An SRQ is unusable (info: SRQ handle).
    pub const SRQ_ERR: u32 = 14;
    /// An SRQ fell below its limit.
    pub const SRQ_LIMIT_REACHED: u32 = 15;
    /// The last WQE of a QP on an SRQ was reached.
    pub const QP_LAST_WQE_REACHED: u32 = 16;
}

/// QP types of CREATE_QP (`ib_qp_type` numbering).
pub mod qp_type {
    /// The GSI QP (QP1).
    pub const GSI: u8 = 1;
    /// Reliable connected.
    pub const RC: u8 = 2;
    /// Unreliable datagram.
    pub const UD: u8 = 4;
}

/// Port states of QUERY_PORT (`ib_port_state`, and the physical state's encoding).
pub mod port_state {
    /// Logical state DOWN.
    pub const DOWN: u32 = 1;
    /// Logical state ACTIVE.
    pub const ACTIVE: u32 = 4;
    /// Physical state DISABLED.
    pub const PHYS_DISABLED: u8 = 3;
    /// Physical state LINK UP.
    pub const PHYS_LINK_UP: u8 = 5;
}

/// `send_flags` bits.
pub mod send_flags {
    /// Fence.
    pub const FENCE: u32 = 1;
    /// Produce a CQE.
    pub const SIGNALED: u32 = 2;
    /// Solicited event at the receiver.
    pub const SOLICITED: u32 = 4;
    /// Inline data (never honoured by the producers; treated as a no-op).
    pub const INLINE: u32 = 8;
}

/// CQE `network_hdr_type` values (kernel CQs only).
pub mod network_hdr {
    /// RoCE v1 (an IB GRH).
    pub const ROCE_V1: u8 = 0;
    /// RoCE v2 over IPv4.
    pub const IPV4: u8 = 1;
    /// RoCE v2 over IPv6.
    pub const IPV6: u8 = 2;
}

/// CQE `wc_flags` bits the device sets.
pub mod wc_flags {
    /// A GRH is present in the first 40 bytes.
    pub const GRH: u32 = 1 << 0;
    /// `imm_data` is valid.
    pub const WITH_IMM: u32 = 1 << 1;
    /// A SEND with invalidate invalidated the key in `imm_data` (kernel CQs only: user space
    /// reads this bit as IP_CSUM_OK).
    pub const WITH_INVALIDATE: u32 = 1 << 2;
    /// `network_hdr_type` is valid (kernel CQs only).
    pub const WITH_NETWORK_HDR_TYPE: u32 = 1 << 6;
}

/// Decoded views of the 48-byte `wr` union of a send WQE. Offsets are relative to the union
/// (absolute offset minus 32).
impl SqWqeHdr {
    fn wr_u32(&self, off: usize) -> u32 {
        self.wr[off / 4]
    }
    fn wr_u64(&self, off: usize) -> u64 {
        u64::from(self.wr[off / 4]) | (u64::from(self.wr[off / 4 + 1]) << 32)
    }
    /// `wr.rdma.remote_addr`, `wr.rdma.rkey`.
    pub fn rdma(&self) -> (u64, u32) {
        (self.wr_u64(0), self.wr_u32(8))
    }
    /// `wr.atomic`: remote_addr, compare_add, swap, rkey.
    pub fn atomic(&self) -> (u64, u64, u64, u32) {
        (
            self.wr_u64(0),
            self.wr_u64(8),
            self.wr_u64(16),
            self.wr_u32(24),
        )
    }
    /// `wr.fast_reg`: iova_start, pl_pdir_dma, page_shift, page_list_len, length, access_flags,
    /// rkey.
    pub fn fast_reg(&self) -> FastRegWr {
        FastRegWr {
            iova_start: self.wr_u64(0),
            pl_pdir_dma: self.wr_u64(8),
            page_shift: self.wr_u32(16),
            page_list_len: self.wr_u32(20),
            length: self.wr_u32(24),
            access_flags: self.wr_u32(28),
            rkey: self.wr_u32(32),
        }
    }
    /// `wr.ud`: remote_qpn, remote_qkey and the address vector.
    pub fn ud(&self) -> (u32, u32, WireAv) {
        let mut av = WireAv::default();
        av.as_mut_slice().copy_from_slice(&self.as_slice()[40..80]);
        (self.wr_u32(0), self.wr_u32(4), av)
    }
}

/// The `fast_reg` member of a send WQE's `wr` union (spec §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastRegWr {
    /// First address of the mapping.
    pub iova_start: u64,
    /// Page directory of the page list.
    pub pl_pdir_dma: u64,
    /// log2 of the page size (the driver uses 12).
    pub page_shift: u32,
    /// Pages in the list.
    pub page_list_len: u32,
    /// Length in bytes (32 bits on the wire).
    pub length: u32,
    /// Access flags (IB numbering).
    pub access_flags: u32,
    /// The new key.
    pub rkey: u32,
}

wire!(/// Address vector inside a UD WQE (40 bytes).
    WireAv { port_pd: u32, sl_tclass_flowlabel: u32, dgid: [u8; 16], src_path_bits: u8,
        gid_index: u8, stat_rate: u8, hop_limit: u8, dmac: [u8; 6], reserved: [u8; 6] });
byte_valued!(WireAv);

#[cfg(test)]
mod tests;
