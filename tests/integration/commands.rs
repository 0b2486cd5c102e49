//! Every command of ABI version 20: its success path and an error path, through the real
//! command channel (slot, REQUEST, ERR, vector 0, response slot with its ack).

use crate::common::*;
use pvrdma_dev::abi::{cmd, CmdResizeCq, RespResizeCq};
use pvrdma_guest::driver::{qp_mask, Modify};
use pvrdma_guest::{Ctx, GuestError, QpKind};

#[test]
fn port_pkey_and_gid_table() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed();
    let p = drv.query_port(1).unwrap();
    assert_eq!((p.state, p.pkey_tbl_len, p.max_msg_sz), (4, 1, 1 << 31));
    assert!(p.gid_tbl_len <= drv.caps.gid_tbl_len);
    assert_ne!(err_of(drv.query_port(0)), 0);
    assert_ne!(err_of(drv.query_port(2)), 0);
    assert_eq!(drv.query_pkey(1, 0).unwrap(), 0xffff);
    assert_ne!(err_of(drv.query_pkey(1, 1)), 0);
    let gid = gid_of(MAC);
    drv.create_bind(0, gid, 1).unwrap();
    drv.create_bind(drv.caps.gid_tbl_len - 1, gid, 1).unwrap();
    assert_ne!(err_of(drv.create_bind(drv.caps.gid_tbl_len, gid, 1)), 0);
    assert_ne!(err_of(drv.create_bind(1, gid, 7)), 0, "unknown GID type");
    drv.destroy_bind(drv.caps.gid_tbl_len - 1, gid).unwrap();
    assert_ne!(err_of(drv.destroy_bind(drv.caps.gid_tbl_len - 1, gid)), 0);
}

#[test]
fn user_contexts() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed();
    let c = drv.create_uc(5).unwrap();
    assert_ne!(c.handle, 0, "user contexts are non-zero");
    assert_ne!(err_of(drv.create_uc(5)), 0, "page already owned");
    assert_ne!(err_of(drv.create_uc(0)), 0, "page 0 is the kernel's");
    assert_ne!(err_of(drv.create_uc(drv.caps.max_uar)), 0, "past BAR2");
    let pd = drv.create_pd(c).unwrap();
    assert_ne!(err_of(drv.destroy_uc(c)), 0, "context with a PD");
    drv.destroy_pd(pd).unwrap();
    drv.destroy_uc(c).unwrap();
    assert_ne!(err_of(drv.destroy_uc(c)), 0);
    assert_ne!(err_of(drv.create_pd(c)), 0, "destroyed context");
}

#[test]
fn pds_and_mrs() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed();
    let pd = drv.create_pd(Ctx::KERNEL).unwrap();
    let dma = drv.dma_mr(pd).unwrap();
    let mr = drv.reg_mr(pd, 0x7000_0123, 3 * 4096, ALL_ACCESS).unwrap();
    assert_ne!(mr.lkey, dma.lkey);
    assert_ne!(err_of(drv.destroy_pd(pd)), 0, "PD with MRs");
    // DMA MR with remote access would expose all guest memory.
    let bad = pvrdma_dev::abi::CmdCreateMr {
        pd_handle: pd,
        access_flags: 1 | 2,
        flags: 1,
        ..Default::default()
    };
    assert_ne!(
        err_of(drv.cmd::<_, pvrdma_dev::abi::RespCreateMr>(cmd::CREATE_MR, bad)),
        0
    );
    drv.destroy_mr(mr).unwrap();
    drv.destroy_mr(dma).unwrap();
    drv.destroy_pd(pd).unwrap();
    assert_ne!(err_of(drv.destroy_pd(pd)), 0);
}

#[test]
fn cqs_including_resize() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed();
    let cq = drv.create_cq(Ctx::KERNEL, 256).unwrap();
    // Resize within the CQ's own pages (256 → 64 fits; 4096 does not).
    let r: RespResizeCq = drv
        .cmd(
            cmd::RESIZE_CQ,
            CmdResizeCq {
                cq_handle: cq.handle,
                cqe: 64,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(r.cqe, 64);
    let big = CmdResizeCq {
        cq_handle: cq.handle,
        cqe: 4096,
        ..Default::default()
    };
    assert_ne!(err_of(drv.cmd::<_, RespResizeCq>(cmd::RESIZE_CQ, big)), 0);
    assert_ne!(
        err_of(drv.create_cq(Ctx::KERNEL, 100)),
        0,
        "not a power of two"
    );
    assert_ne!(err_of(drv.create_cq(Ctx::KERNEL, drv.caps.max_cqe * 2)), 0);
    drv.destroy_cq(cq).unwrap();
}

fn destroy_raw(drv: &pvrdma_guest::Driver, code: u32, handle: u32) -> Result<(), GuestError> {
    let req = pvrdma_dev::abi::CmdDestroyCq {
        cq_handle: handle,
        ..Default::default()
    };
    drv.cmd_noresp(code, req)
}

#[test]
fn qps_create_modify_query_destroy() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed();
    let gid = gid_of(MAC);
    drv.create_bind(0, gid, 1).unwrap();
    let pd = drv.create_pd(Ctx::KERNEL).unwrap();
    let cq = drv.create_cq(Ctx::KERNEL, 64).unwrap();
    let qp = drv
        .create_qp(
            Ctx::KERNEL,
            QpKind::Rc,
            pd,
            &cq,
            &cq,
            None,
            (16, 16, 2, 2),
            false,
        )
        .unwrap();
    assert!(qp.handle != 0 && qp.handle < drv.caps.max_qp);
    let a = drv.query_qp(&qp).unwrap();
    assert_eq!(a.qp_state, 0, "RESET");
    assert_eq!((a.cap.max_send_wr, a.cap.max_recv_sge), (16, 2));
    assert_ne!(
        err_of(destroy_raw(&drv, cmd::DESTROY_CQ, cq.handle)),
        0,
        "CQ in use"
    );
    assert_ne!(
        err_of(destroy_raw(&drv, cmd::DESTROY_PD, pd)),
        0,
        "PD in use"
    );
    // RESET → RTR skips INIT: refused, with resp.hdr.err set as well as ERR.
    let rtr = pvrdma_guest::driver::rc_connect_attrs(qp.qpn, gid, ALL_ACCESS)[1];
    assert_ne!(err_of(drv.modify_qp(&qp, rtr)), 0);
    for m in pvrdma_guest::driver::rc_connect_attrs(qp.qpn, gid, ALL_ACCESS) {
        drv.modify_qp(&qp, m).unwrap();
    }
    let a = drv.query_qp(&qp).unwrap();
    assert_eq!(a.qp_state, 3, "RTS");
    assert_eq!(a.dest_qp_num, qp.qpn);
    assert_eq!(a.path_mtu, 3);
    assert_eq!(a.ah_attr.grh.dgid, gid);
    assert_eq!(a.rnr_retry, 7);
    // Bad attributes: pkey index, port, sgid index, MTU.
    let bad = |mask, attrs| Modify { mask, attrs };
    use pvrdma_dev::abi::QpAttr;
    for m in [
        bad(
            qp_mask::PKEY_INDEX,
            QpAttr {
                pkey_index: 1,
                ..Default::default()
            },
        ),
        bad(
            qp_mask::PORT,
            QpAttr {
                port_num: 2,
                ..Default::default()
            },
        ),
        bad(
            qp_mask::PATH_MTU,
            QpAttr {
                path_mtu: 9,
                ..Default::default()
            },
        ),
        bad(
            qp_mask::STATE,
            QpAttr {
                qp_state: 42,
                ..Default::default()
            },
        ),
    ] {
        assert_ne!(err_of(drv.modify_qp(&qp, m)), 0);
    }
    let mut ah = pvrdma_dev::abi::AhAttr::default();
    ah.grh.sgid_index = 255;
    let m = bad(
        qp_mask::AV,
        QpAttr {
            ah_attr: ah,
            ..Default::default()
        },
    );
    assert_ne!(err_of(drv.modify_qp(&qp, m)), 0);
    // Unknown QP type and bad sizes.
    assert_ne!(
        err_of(drv.create_qp(
            Ctx::KERNEL,
            QpKind::Rc,
            pd,
            &cq,
            &cq,
            None,
            (12, 16, 1, 1),
            false
        )),
        0,
        "max_send_wr not a power of two"
    );
    assert_ne!(
        err_of(drv.create_qp(
            Ctx::KERNEL,
            QpKind::Rc,
            pd,
            &cq,
            &cq,
            None,
            (16, 16, 64, 1),
            false
        )),
        0,
        "max_send_sge above caps"
    );
    drv.destroy_qp(qp).unwrap();
    drv.destroy_cq(cq).unwrap();
    drv.destroy_pd(pd).unwrap();
}

#[test]
fn srqs_create_modify_query_destroy() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed();
    let ctx = drv.create_uc(2).unwrap();
    let pd = drv.create_pd(ctx).unwrap();
    let cq = drv.create_cq(ctx, 64).unwrap();
    let srq = drv.create_srq(ctx, pd, 64, 2, 0).unwrap();
    drv.modify_srq(&srq, 8).unwrap();
    let a = drv.query_srq(&srq).unwrap();
    assert_eq!((a.max_wr, a.max_sge, a.srq_limit), (64, 2, 8));
    assert_ne!(err_of(drv.modify_srq(&srq, 65)), 0, "limit above max_wr");
    let qp = drv
        .create_qp(
            ctx,
            QpKind::Rc,
            pd,
            &cq,
            &cq,
            Some(&srq),
            (16, 0, 1, 1),
            false,
        )
        .unwrap();
    assert_ne!(
        err_of(destroy_raw(&drv, cmd::DESTROY_SRQ, srq.handle)),
        0,
        "SRQ in use"
    );
    drv.destroy_qp(qp).unwrap();
    drv.destroy_srq(srq).unwrap();
    assert_ne!(
        err_of(drv.create_srq(ctx, pd, 48, 1, 0)),
        0,
        "not a power of two"
    );
}

#[test]
fn unknown_commands_fail_through_err_and_the_channel_keeps_working() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed();
    for code in [21u32, 100, 0xffff_ffff] {
        let mut req = [0u8; 24];
        req[8..12].copy_from_slice(&code.to_le_bytes());
        assert_ne!(err_of(drv.cmd_raw(&req, true)), 0);
    }
    assert_eq!(drv.query_pkey(1, 0).unwrap(), 0xffff);
}

#[test]
fn reset_and_reactivation() {
    let _shared = crate::common::shared();
    let (t, drv) = probed();
    let k = pvrdma_guest::kernel::ib_register(&drv, MAC).unwrap();
    drop(k);
    drv.remove();
    if let Some(stats) = t.stats() {
        assert_eq!(
            stats.objects,
            pvrdma_dev::stats::ObjectCounts::default(),
            "RESET frees everything"
        );
    }
    let drv2 = pvrdma_guest::Driver::probe(t.transport()).expect("probe after reset");
    let k = pvrdma_guest::kernel::ib_register(&drv2, MAC).expect("registration after reset");
    assert_eq!(k.gsi.qpn, 1);
}

#[test]
fn mr_page_lists_are_bounded_by_a_device_budget() {
    let _shared = crate::common::shared();
    let cfg = pvrdma_dev::DeviceConfig {
        max_mr_pages: 64,
        ..Default::default()
    };
    // A custom device configuration: in-process only.
    let (_t, drv) = probed_with(&rdma_backend::emulated::Fabric::new(), cfg);
    let pd = drv.create_pd(Ctx::KERNEL).unwrap();
    let a = drv.reg_mr(pd, 0x10000, 48 * 4096, ALL_ACCESS).unwrap();
    // 48 + 32 > 64: refused, though each alone is fine.
    assert_ne!(err_of(drv.reg_mr(pd, 0x20000, 32 * 4096, ALL_ACCESS)), 0);
    let b = drv.reg_mr(pd, 0x20000, 16 * 4096, ALL_ACCESS).unwrap();
    drv.destroy_mr(a).unwrap();
    let c = drv.reg_mr(pd, 0x30000, 32 * 4096, ALL_ACCESS).unwrap();
    drv.destroy_mr(b).unwrap();
    drv.destroy_mr(c).unwrap();
}
