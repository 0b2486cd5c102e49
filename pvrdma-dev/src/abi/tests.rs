use super::*;
use std::mem::{offset_of, size_of};

#[test]
fn sizes_match_the_spec() {
    assert_eq!(size_of::<Dsr>(), 280);
    assert_eq!(size_of::<Caps>(), 208);
    assert_eq!(size_of::<CmdHdr>(), 16);
    assert_eq!(size_of::<RespHdr>(), 16);
    for (s, n) in [
        (size_of::<CmdQueryPort>(), 24),
        (size_of::<CmdQueryPkey>(), 24),
        (size_of::<CmdCreateUc>(), 24),
        (size_of::<CmdDestroyUc>(), 24),
        (size_of::<CmdCreatePd>(), 24),
        (size_of::<CmdDestroyPd>(), 24),
        (size_of::<CmdCreateMr>(), 56),
        (size_of::<CmdDestroyMr>(), 24),
        (size_of::<CmdCreateCq>(), 40),
        (size_of::<CmdResizeCq>(), 24),
        (size_of::<CmdDestroyCq>(), 24),
        (size_of::<CmdCreateSrq>(), 56),
        (size_of::<CmdModifySrq>(), 40),
        (size_of::<CmdQuerySrq>(), 24),
        (size_of::<CmdDestroySrq>(), 24),
        (size_of::<CmdCreateQp>(), 80),
        (size_of::<CmdModifyQp>(), CMD_SLOT_SIZE),
        (size_of::<CmdQueryQp>(), 24),
        (size_of::<CmdDestroyQp>(), 24),
        (size_of::<CmdCreateBind>(), 48),
        (size_of::<CmdDestroyBind>(), 40),
        (size_of::<RespQueryPort>(), 64),
        (size_of::<RespQueryPkey>(), 24),
        (size_of::<RespCreateUc>(), 24),
        (size_of::<RespCreatePd>(), 24),
        (size_of::<RespCreateMr>(), 32),
        (size_of::<RespCreateCq>(), 24),
        (size_of::<RespResizeCq>(), 24),
        (size_of::<RespCreateSrq>(), 24),
        (size_of::<RespQuerySrq>(), 32),
        (size_of::<RespCreateQpV1>(), 40),
        (size_of::<RespCreateQpV2>(), 48),
        (size_of::<RespQueryQp>(), RESP_SLOT_SIZE),
        (size_of::<RespDestroyQp>(), 24),
        (size_of::<QpAttr>(), 160),
        (size_of::<AhAttr>(), 40),
        (size_of::<PortAttr>(), 48),
        (size_of::<SqWqeHdr>(), 80),
        (size_of::<RqWqeHdr>(), 16),
        (size_of::<WireSge>(), 16),
        (size_of::<Cqe>(), 64),
        (size_of::<Eqe>(), 8),
        (size_of::<Cqne>(), 4),
        (size_of::<WireAv>(), 40),
    ] {
        assert_eq!(s, n);
    }
}

#[test]
fn dsr_offsets() {
    assert_eq!(offset_of!(Dsr, driver_version), 0);
    assert_eq!(offset_of!(Dsr, gos_info), 8);
    assert_eq!(offset_of!(Dsr, cmd_slot_dma), 16);
    assert_eq!(offset_of!(Dsr, resp_slot_dma), 24);
    assert_eq!(offset_of!(Dsr, async_ring_pages), 32);
    assert_eq!(
        offset_of!(Dsr, async_ring_pages) + offset_of!(RingPages, pdir_dma),
        40
    );
    assert_eq!(offset_of!(Dsr, cq_ring_pages), 48);
    assert_eq!(
        offset_of!(Dsr, cq_ring_pages) + offset_of!(RingPages, pdir_dma),
        56
    );
    assert_eq!(offset_of!(Dsr, uar_pfn64), 64);
    assert_eq!(offset_of!(Dsr, caps) as u64, DSR_CAPS_OFFSET);
}

#[test]
fn caps_offsets() {
    assert_eq!(offset_of!(Caps, node_guid), 8);
    assert_eq!(offset_of!(Caps, max_mr_size), 24);
    assert_eq!(offset_of!(Caps, page_size_cap), 32);
    assert_eq!(offset_of!(Caps, ex_comp_mask), 48);
    assert_eq!(offset_of!(Caps, log_max_atomic_inline_arg), 60);
    assert_eq!(offset_of!(Caps, vendor_id), 64);
    assert_eq!(offset_of!(Caps, hw_ver), 72);
    assert_eq!(offset_of!(Caps, max_qp), 76);
    assert_eq!(offset_of!(Caps, max_qp_wr), 80);
    assert_eq!(offset_of!(Caps, device_cap_flags), 84);
    assert_eq!(offset_of!(Caps, max_sge), 88);
    assert_eq!(offset_of!(Caps, max_sge_rd), 92);
    assert_eq!(offset_of!(Caps, max_cq), 96);
    assert_eq!(offset_of!(Caps, max_cqe), 100);
    assert_eq!(offset_of!(Caps, max_mr), 104);
    assert_eq!(offset_of!(Caps, max_pd), 108);
    assert_eq!(offset_of!(Caps, max_qp_rd_atom), 112);
    assert_eq!(offset_of!(Caps, max_qp_init_rd_atom), 124);
    assert_eq!(offset_of!(Caps, max_ah), 164);
    assert_eq!(offset_of!(Caps, max_srq), 176);
    assert_eq!(offset_of!(Caps, max_srq_wr), 180);
    assert_eq!(offset_of!(Caps, max_srq_sge), 184);
    assert_eq!(offset_of!(Caps, max_uar), 188);
    assert_eq!(offset_of!(Caps, gid_tbl_len), 192);
    assert_eq!(offset_of!(Caps, max_pkeys), 196);
    assert_eq!(offset_of!(Caps, local_ca_ack_delay), 198);
    assert_eq!(offset_of!(Caps, phys_port_cnt), 199);
    assert_eq!(offset_of!(Caps, mode), 200);
    assert_eq!(offset_of!(Caps, atomic_ops), 201);
    assert_eq!(offset_of!(Caps, bmme_flags), 202);
    assert_eq!(offset_of!(Caps, gid_types), 203);
    assert_eq!(offset_of!(Caps, max_fast_reg_page_list_len), 204);
}

#[test]
fn command_offsets() {
    assert_eq!(offset_of!(CmdHdr, cmd), 8);
    assert_eq!(offset_of!(RespHdr, ack), 8);
    assert_eq!(offset_of!(RespHdr, err), 12);
    assert_eq!(offset_of!(CmdQueryPkey, index), 17);
    assert_eq!(offset_of!(CmdCreateMr, start), 16);
    assert_eq!(offset_of!(CmdCreateMr, length), 24);
    assert_eq!(offset_of!(CmdCreateMr, pdir_dma), 32);
    assert_eq!(offset_of!(CmdCreateMr, pd_handle), 40);
    assert_eq!(offset_of!(CmdCreateMr, access_flags), 44);
    assert_eq!(offset_of!(CmdCreateMr, flags), 48);
    assert_eq!(offset_of!(CmdCreateMr, nchunks), 52);
    assert_eq!(offset_of!(CmdCreateCq, ctx_handle), 24);
    assert_eq!(offset_of!(CmdCreateCq, cqe), 28);
    assert_eq!(offset_of!(CmdCreateCq, nchunks), 32);
    assert_eq!(offset_of!(CmdCreateSrq, pd_handle), 24);
    assert_eq!(offset_of!(CmdCreateSrq, nchunks), 28);
    assert_eq!(offset_of!(CmdCreateSrq, attrs), 32);
    assert_eq!(offset_of!(CmdCreateSrq, srq_type), 48);
    assert_eq!(offset_of!(CmdModifySrq, attr_mask), 20);
    assert_eq!(
        offset_of!(CmdModifySrq, attrs) + offset_of!(SrqAttr, srq_limit),
        32
    );
    assert_eq!(offset_of!(CmdCreateQp, pd_handle), 24);
    assert_eq!(offset_of!(CmdCreateQp, send_cq_handle), 28);
    assert_eq!(offset_of!(CmdCreateQp, recv_cq_handle), 32);
    assert_eq!(offset_of!(CmdCreateQp, srq_handle), 36);
    assert_eq!(offset_of!(CmdCreateQp, max_send_wr), 40);
    assert_eq!(offset_of!(CmdCreateQp, max_recv_wr), 44);
    assert_eq!(offset_of!(CmdCreateQp, max_send_sge), 48);
    assert_eq!(offset_of!(CmdCreateQp, max_recv_sge), 52);
    assert_eq!(offset_of!(CmdCreateQp, max_inline_data), 56);
    assert_eq!(offset_of!(CmdCreateQp, lkey), 60);
    assert_eq!(offset_of!(CmdCreateQp, access_flags), 64);
    assert_eq!(offset_of!(CmdCreateQp, total_chunks), 68);
    assert_eq!(offset_of!(CmdCreateQp, send_chunks), 70);
    assert_eq!(offset_of!(CmdCreateQp, max_atomic_arg), 72);
    assert_eq!(offset_of!(CmdCreateQp, sq_sig_all), 74);
    assert_eq!(offset_of!(CmdCreateQp, qp_type), 75);
    assert_eq!(offset_of!(CmdCreateQp, is_srq), 76);
    assert_eq!(offset_of!(CmdCreateBind, mtu), 16);
    assert_eq!(offset_of!(CmdCreateBind, vlan), 20);
    assert_eq!(offset_of!(CmdCreateBind, index), 24);
    assert_eq!(offset_of!(CmdCreateBind, new_gid), 28);
    assert_eq!(offset_of!(CmdCreateBind, gid_type), 44);
    assert_eq!(offset_of!(CmdDestroyBind, dest_gid), 20);
}

#[test]
fn modify_qp_offsets() {
    let a = offset_of!(CmdModifyQp, attrs);
    assert_eq!(offset_of!(CmdModifyQp, qp_handle), 16);
    assert_eq!(offset_of!(CmdModifyQp, attr_mask), 20);
    assert_eq!(a, 24);
    assert_eq!(a + offset_of!(QpAttr, cur_qp_state), 28);
    assert_eq!(a + offset_of!(QpAttr, path_mtu), 32);
    assert_eq!(a + offset_of!(QpAttr, qkey), 40);
    assert_eq!(a + offset_of!(QpAttr, rq_psn), 44);
    assert_eq!(a + offset_of!(QpAttr, sq_psn), 48);
    assert_eq!(a + offset_of!(QpAttr, dest_qp_num), 52);
    assert_eq!(a + offset_of!(QpAttr, qp_access_flags), 56);
    assert_eq!(a + offset_of!(QpAttr, pkey_index), 60);
    assert_eq!(a + offset_of!(QpAttr, alt_pkey_index), 62);
    assert_eq!(a + offset_of!(QpAttr, en_sqd_async_notify), 64);
    assert_eq!(a + offset_of!(QpAttr, min_rnr_timer), 68);
    assert_eq!(a + offset_of!(QpAttr, port_num), 69);
    assert_eq!(a + offset_of!(QpAttr, timeout), 70);
    assert_eq!(a + offset_of!(QpAttr, retry_cnt), 71);
    assert_eq!(a + offset_of!(QpAttr, rnr_retry), 72);
    assert_eq!(a + offset_of!(QpAttr, alt_timeout), 74);
    assert_eq!(a + offset_of!(QpAttr, cap), 80);
    assert_eq!(a + offset_of!(QpAttr, ah_attr), 104);
    let ah = a + offset_of!(QpAttr, ah_attr);
    assert_eq!(
        ah + offset_of!(AhAttr, grh) + offset_of!(GlobalRoute, flow_label),
        120
    );
    assert_eq!(
        ah + offset_of!(AhAttr, grh) + offset_of!(GlobalRoute, sgid_index),
        124
    );
    assert_eq!(
        ah + offset_of!(AhAttr, grh) + offset_of!(GlobalRoute, hop_limit),
        125
    );
    assert_eq!(
        ah + offset_of!(AhAttr, grh) + offset_of!(GlobalRoute, traffic_class),
        126
    );
    assert_eq!(ah + offset_of!(AhAttr, dlid), 128);
    assert_eq!(ah + offset_of!(AhAttr, vlan_id), 130);
    assert_eq!(ah + offset_of!(AhAttr, sl), 132);
    assert_eq!(ah + offset_of!(AhAttr, src_path_bits), 133);
    assert_eq!(ah + offset_of!(AhAttr, static_rate), 134);
    assert_eq!(ah + offset_of!(AhAttr, ah_flags), 135);
    assert_eq!(ah + offset_of!(AhAttr, port_num), 136);
    assert_eq!(ah + offset_of!(AhAttr, dmac), 137);
    assert_eq!(a + offset_of!(QpAttr, alt_ah_attr), 144);
}

#[test]
fn response_offsets() {
    let p = offset_of!(RespQueryPort, attrs);
    assert_eq!(p, 16);
    assert_eq!(p + offset_of!(PortAttr, max_mtu), 20);
    assert_eq!(p + offset_of!(PortAttr, active_mtu), 24);
    assert_eq!(p + offset_of!(PortAttr, gid_tbl_len), 28);
    assert_eq!(p + offset_of!(PortAttr, port_cap_flags), 32);
    assert_eq!(p + offset_of!(PortAttr, max_msg_sz), 36);
    assert_eq!(p + offset_of!(PortAttr, pkey_tbl_len), 48);
    assert_eq!(p + offset_of!(PortAttr, lid), 50);
    assert_eq!(p + offset_of!(PortAttr, sm_lid), 52);
    assert_eq!(p + offset_of!(PortAttr, lmc), 54);
    assert_eq!(p + offset_of!(PortAttr, max_vl_num), 55);
    assert_eq!(p + offset_of!(PortAttr, active_width), 59);
    assert_eq!(p + offset_of!(PortAttr, active_speed), 60);
    assert_eq!(p + offset_of!(PortAttr, phys_state), 61);
    assert_eq!(offset_of!(RespCreateMr, lkey), 20);
    assert_eq!(offset_of!(RespCreateMr, rkey), 24);
    assert_eq!(offset_of!(RespCreateCq, cqe), 20);
    assert_eq!(offset_of!(RespCreateQpV2, qp_handle), 20);
    assert_eq!(offset_of!(RespCreateQpV2, max_send_wr), 24);
    assert_eq!(offset_of!(RespCreateQpV1, max_send_wr), 20);
    assert_eq!(offset_of!(RespQueryQp, attrs), 16);
    // QUERY_QP_RESP attrs sit 8 bytes before MODIFY_QP's.
    assert_eq!(
        offset_of!(CmdModifyQp, attrs) - offset_of!(RespQueryQp, attrs),
        8
    );
}

#[test]
fn wqe_and_cqe_offsets() {
    assert_eq!(offset_of!(SqWqeHdr, num_sge), 8);
    assert_eq!(offset_of!(SqWqeHdr, total_len), 12);
    assert_eq!(offset_of!(SqWqeHdr, opcode), 16);
    assert_eq!(offset_of!(SqWqeHdr, send_flags), 20);
    assert_eq!(offset_of!(SqWqeHdr, ex), 24);
    assert_eq!(offset_of!(SqWqeHdr, wr), 32);
    assert_eq!(offset_of!(RqWqeHdr, num_sge), 8);
    assert_eq!(offset_of!(WireSge, length), 8);
    assert_eq!(offset_of!(WireSge, lkey), 12);
    assert_eq!(offset_of!(Cqe, qp), 8);
    assert_eq!(offset_of!(Cqe, opcode), 16);
    assert_eq!(offset_of!(Cqe, status), 20);
    assert_eq!(offset_of!(Cqe, byte_len), 24);
    assert_eq!(offset_of!(Cqe, imm_data), 28);
    assert_eq!(offset_of!(Cqe, src_qp), 32);
    assert_eq!(offset_of!(Cqe, wc_flags), 36);
    assert_eq!(offset_of!(Cqe, vendor_err), 40);
    assert_eq!(offset_of!(Cqe, pkey_index), 44);
    assert_eq!(offset_of!(Cqe, slid), 46);
    assert_eq!(offset_of!(Cqe, sl), 48);
    assert_eq!(offset_of!(Cqe, port_num), 50);
    assert_eq!(offset_of!(Cqe, smac), 51);
    assert_eq!(offset_of!(Cqe, network_hdr_type), 57);
    // The AV sits at absolute WQE offset 40, i.e. union offset 8.
    assert_eq!(32 + 8 + offset_of!(WireAv, dgid), 48);
    assert_eq!(32 + 8 + offset_of!(WireAv, src_path_bits), 64);
    assert_eq!(32 + 8 + offset_of!(WireAv, gid_index), 65);
    assert_eq!(32 + 8 + offset_of!(WireAv, hop_limit), 67);
    assert_eq!(32 + 8 + offset_of!(WireAv, dmac), 68);
}

#[test]
fn wr_union_views() {
    let mut w = SqWqeHdr::default();
    let b = w.as_mut_slice();
    b[32..40].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
    b[40..44].copy_from_slice(&0xaabb_ccddu32.to_le_bytes());
    b[48..56].copy_from_slice(&7u64.to_le_bytes());
    b[56..60].copy_from_slice(&9u32.to_le_bytes());
    assert_eq!(w.rdma(), (0x1122_3344_5566_7788, 0xaabb_ccdd));
    let (ra, cmp, swap, rkey) = w.atomic();
    assert_eq!((ra, swap, rkey), (0x1122_3344_5566_7788, 7, 9));
    assert_eq!(cmp & 0xffff_ffff, 0xaabb_ccdd);
    let (qpn, qkey, av) = w.ud();
    assert_eq!(qpn, 0x5566_7788);
    assert_eq!(qkey, 0x1122_3344);
    assert_eq!(av.port_pd, 0xaabb_ccdd);
}

#[test]
fn fast_reg_view_at_the_spec_offsets() {
    let mut w = SqWqeHdr::default();
    let b = w.as_mut_slice();
    b[32..40].copy_from_slice(&0x7f00_0000_1234u64.to_le_bytes());
    b[40..48].copy_from_slice(&0x5000u64.to_le_bytes());
    b[48..52].copy_from_slice(&12u32.to_le_bytes());
    b[52..56].copy_from_slice(&3u32.to_le_bytes());
    b[56..60].copy_from_slice(&0x2345u32.to_le_bytes());
    b[60..64].copy_from_slice(&7u32.to_le_bytes());
    b[64..68].copy_from_slice(&0xabcd_ef42u32.to_le_bytes());
    assert_eq!(
        w.fast_reg(),
        FastRegWr {
            iova_start: 0x7f00_0000_1234,
            pl_pdir_dma: 0x5000,
            page_shift: 12,
            page_list_len: 3,
            length: 0x2345,
            access_flags: 7,
            rkey: 0xabcd_ef42,
        }
    );
}
