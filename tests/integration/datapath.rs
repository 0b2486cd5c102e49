//! Data path through the real guest rings: RC, UD, SRQ, arming, errors, two devices.

use std::time::Duration;

use vm_memory::Address;

use crate::common::*;
use pvrdma_dev::abi::{wr_opcode, WireSge};
use pvrdma_guest::driver::ud_attrs;
use pvrdma_guest::{QpKind, SendWqe, UdAddr};
use rdma_backend::emulated::Fabric;

#[test]
fn rc_ping_pong() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed();
    let mut p = rc_pair(&drv, MAC, 16, 1);
    let mem = drv.mem();
    let ma = drv
        .reg_mr(p.pd, 0x7f00_0000_1000, 4096, ALL_ACCESS)
        .unwrap();
    let mb = drv
        .reg_mr(p.pd, 0x7f00_0010_0000, 4096, ALL_ACCESS)
        .unwrap();
    for round in 0..50u64 {
        let msg = pattern(100 + round as usize, round as u8);
        // ping: a → b
        assert!(drv.post_recv(&mut p.b, round, &[mb.sge(0, 4096)]));
        ma.write(mem, 0, &msg);
        assert!(drv.post_send(&mut p.a, &send(1000 + round, ma.sge(0, msg.len() as u32))));
        let s = one(&drv, &mut p.cq_a);
        assert_eq!((s.wr_id, s.status, s.opcode), (1000 + round, 0, 0));
        assert_eq!(s.qp, u64::from(p.a.handle), "CQE qp is the QP handle");
        let r = one(&drv, &mut p.cq_b);
        assert_eq!((r.wr_id, r.status, r.opcode), (round, 0, 128));
        assert_eq!(r.byte_len as usize, msg.len());
        assert_eq!(r.src_qp, p.a.qpn);
        let mut got = vec![0u8; msg.len()];
        mb.read(mem, 0, &mut got);
        assert_eq!(got, msg);
        // pong: b → a
        assert!(drv.post_recv(&mut p.a, round, &[ma.sge(0, 4096)]));
        assert!(drv.post_send(&mut p.b, &send(2000 + round, mb.sge(0, msg.len() as u32))));
        assert_eq!(one(&drv, &mut p.cq_b).wr_id, 2000 + round);
        let r = one(&drv, &mut p.cq_a);
        assert_eq!(
            (r.wr_id, r.status, r.byte_len as usize),
            (round, 0, msg.len())
        );
    }
}

#[test]
fn unsignaled_sends_produce_no_cqe_but_advance_the_ring() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed();
    let mut p = rc_pair(&drv, MAC, 8, 1);
    let m = drv.reg_mr(p.pd, 0x1000, 8192, ALL_ACCESS).unwrap();
    // 3 rounds of 8 sends through an 8-deep SQ: only possible if cons_head advances.
    for round in 0..3u64 {
        for i in 0..8u64 {
            assert!(drv.post_recv(&mut p.b, i, &[m.sge(4096, 64)]));
        }
        for i in 0..8u64 {
            let mut w = send(round * 8 + i, m.sge(0, 64));
            w.flags = if i == 7 { 2 } else { 0 };
            assert!(drv.post_send(&mut p.a, &w), "SQ slot reclaimed");
        }
        let s = drv.wait_cqes(&mut p.cq_a, 1, WAIT);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].wr_id, round * 8 + 7);
        assert_eq!(drv.wait_cqes(&mut p.cq_b, 8, WAIT).len(), 8);
    }
    assert!(drv
        .wait_cqes(&mut p.cq_a, 1, Duration::from_millis(100))
        .is_empty());
}

#[test]
fn rdma_write_read_and_atomics_verified() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed();
    let mut p = rc_pair(&drv, MAC, 16, 4);
    let mem = drv.mem();
    for &size in &[0usize, 1, 4095, 4096, 4097, 65536 + 3, 1 << 20, 16 << 20] {
        let len = size.max(1) as u64;
        let local = drv.reg_mr(p.pd, 0x10_0000_0123, len, ALL_ACCESS).unwrap();
        let remote = drv.reg_mr(p.pd, 0x20_0000_0456, len, ALL_ACCESS).unwrap();
        let data = pattern(size, size as u8);
        local.write(mem, 0, &data);
        // WRITE a → b's MR, with the payload split over up to 3 SGEs.
        let cut1 = size / 3;
        let cut2 = 2 * size / 3;
        let w = SendWqe {
            wr_id: 1,
            opcode: wr_opcode::RDMA_WRITE,
            flags: 2,
            sges: vec![
                local.sge(0, cut1 as u32),
                local.sge(cut1 as u64, (cut2 - cut1) as u32),
                local.sge(cut2 as u64, (size - cut2) as u32),
            ],
            remote_addr: remote.iova,
            rkey: remote.rkey,
            ..Default::default()
        };
        assert!(drv.post_send(&mut p.a, &w));
        let c = one(&drv, &mut p.cq_a);
        assert_eq!((c.status, c.opcode), (0, 1), "write of {size}");
        let mut got = vec![0u8; size];
        remote.read(mem, 0, &mut got);
        assert!(got == data, "RDMA WRITE of {size} bytes corrupted");
        // READ it back into a cleared local buffer.
        local.write(mem, 0, &vec![0u8; size]);
        let r = SendWqe {
            wr_id: 2,
            opcode: wr_opcode::RDMA_READ,
            flags: 2,
            sges: vec![local.sge(0, size as u32)],
            remote_addr: remote.iova,
            rkey: remote.rkey,
            ..Default::default()
        };
        assert!(drv.post_send(&mut p.a, &r));
        let c = one(&drv, &mut p.cq_a);
        assert_eq!((c.status, c.opcode), (0, 2), "read of {size}");
        local.read(mem, 0, &mut got);
        assert!(got == data, "RDMA READ of {size} bytes corrupted");
        drv.destroy_mr(local).unwrap();
        drv.destroy_mr(remote).unwrap();
    }
    // Atomics on an 8-byte aligned counter.
    let target = drv.reg_mr(p.pd, 0x30_0000_0000, 4096, ALL_ACCESS).unwrap();
    let res = drv.reg_mr(p.pd, 0x31_0000_0000, 4096, ALL_ACCESS).unwrap();
    target.write(mem, 8, &41u64.to_le_bytes());
    let faa = SendWqe {
        wr_id: 3,
        opcode: wr_opcode::ATOMIC_FETCH_AND_ADD,
        flags: 2,
        sges: vec![res.sge(0, 8)],
        remote_addr: target.iova + 8,
        rkey: target.rkey,
        compare_add: 1,
        ..Default::default()
    };
    assert!(drv.post_send(&mut p.a, &faa));
    let c = one(&drv, &mut p.cq_a);
    assert_eq!((c.status, c.opcode), (0, 4));
    let mut b = [0u8; 8];
    res.read(mem, 0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 41);
    let cas = SendWqe {
        wr_id: 4,
        opcode: wr_opcode::ATOMIC_CMP_AND_SWP,
        sges: vec![res.sge(0, 8)],
        compare_add: 42,
        swap: 7,
        ..faa.clone()
    };
    assert!(drv.post_send(&mut p.a, &cas));
    let c = one(&drv, &mut p.cq_a);
    assert_eq!((c.status, c.opcode), (0, 3));
    target.read(mem, 8, &mut b);
    assert_eq!(u64::from_le_bytes(b), 7);
}

#[test]
fn write_with_imm_consumes_a_receive() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed();
    let mut p = rc_pair(&drv, MAC, 8, 1);
    let m = drv.reg_mr(p.pd, 0x5000, 8192, ALL_ACCESS).unwrap();
    assert!(drv.post_recv(&mut p.b, 77, &[m.sge(4096, 16)]));
    let w = SendWqe {
        wr_id: 9,
        opcode: wr_opcode::RDMA_WRITE_WITH_IMM,
        flags: 2,
        imm: 0xabcd_ef01,
        sges: vec![m.sge(0, 32)],
        remote_addr: m.iova + 1024,
        rkey: m.rkey,
        ..Default::default()
    };
    assert!(drv.post_send(&mut p.a, &w));
    assert_eq!(one(&drv, &mut p.cq_a).opcode, 1);
    let r = one(&drv, &mut p.cq_b);
    assert_eq!((r.wr_id, r.opcode, r.imm_data), (77, 129, 0xabcd_ef01));
    assert_ne!(r.wc_flags & 2, 0, "WITH_IMM");
}

#[test]
fn cq_arm_fires_exactly_once_per_arm() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed();
    let mut p = rc_pair(&drv, MAC, 16, 1);
    let m = drv.reg_mr(p.pd, 0x9000, 4096, ALL_ACCESS).unwrap();
    let v2 = drv.irqs(2);
    drv.arm_cq(&p.cq_b, false);
    for i in 0..4 {
        assert!(drv.post_recv(&mut p.b, i, &[m.sge(2048, 64)]));
        assert!(drv.post_send(&mut p.a, &send(i, m.sge(0, 64))));
    }
    assert_eq!(drv.wait_cqes(&mut p.cq_b, 4, WAIT).len(), 4);
    assert_eq!(drv.wait_cqes(&mut p.cq_a, 4, WAIT).len(), 4);
    assert!(drv.transport().wait_irq(2, v2, WAIT));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(drv.irqs(2), v2 + 1, "one notification per arm");
    assert_eq!(drv.cq_notifications(), vec![p.cq_b.handle]);
    // ARM_SOL: an unsolicited receive does not fire, a solicited one does.
    drv.arm_cq(&p.cq_b, true);
    assert!(drv.post_recv(&mut p.b, 10, &[m.sge(2048, 64)]));
    assert!(drv.post_send(&mut p.a, &send(10, m.sge(0, 64))));
    assert_eq!(drv.wait_cqes(&mut p.cq_b, 1, WAIT).len(), 1);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        drv.irqs(2),
        v2 + 1,
        "unsolicited completion must not wake ARM_SOL"
    );
    assert!(drv.post_recv(&mut p.b, 11, &[m.sge(2048, 64)]));
    let mut w = send(11, m.sge(0, 64));
    w.flags |= 4; // SOLICITED
    assert!(drv.post_send(&mut p.a, &w));
    assert_eq!(drv.wait_cqes(&mut p.cq_b, 1, WAIT).len(), 1);
    assert!(drv.transport().wait_irq(2, v2 + 1, WAIT));
}

#[test]
fn access_violation_errors_and_flushes() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed();
    let mut p = rc_pair(&drv, MAC, 8, 1);
    let m = drv.reg_mr(p.pd, 0xa000, 4096, 1).unwrap(); // local write only: no remote access
    let w = SendWqe {
        wr_id: 1,
        opcode: wr_opcode::RDMA_WRITE,
        flags: 2,
        sges: vec![m.sge(0, 16)],
        remote_addr: m.iova,
        rkey: m.rkey,
        ..Default::default()
    };
    assert!(drv.post_send(&mut p.a, &w));
    assert!(drv.post_send(&mut p.a, &send(2, m.sge(0, 16))));
    let c = drv.wait_cqes(&mut p.cq_a, 2, WAIT);
    assert_eq!(c.len(), 2);
    assert_eq!((c[0].wr_id, c[0].status), (1, 10), "REM_ACCESS_ERR");
    assert_eq!((c[1].wr_id, c[1].status), (2, 5), "the rest flush");
    // A bad lkey is a local protection error.
    let mut q = rc_pair(&drv, MAC, 8, 1);
    let bad = WireSge {
        addr: 0xa000,
        length: 16,
        lkey: 0xdead_0000,
    };
    assert!(drv.post_send(&mut q.a, &send(3, bad)));
    assert_eq!(one(&drv, &mut q.cq_a).status, 4, "LOC_PROT_ERR");
}

#[test]
fn bad_wqes_complete_in_error_and_the_ring_moves_on() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed();
    let mut p = rc_pair(&drv, MAC, 8, 2);
    let m = drv.reg_mr(p.pd, 0xb000, 4096, ALL_ACCESS).unwrap();
    // num_sge above the QP's max (2) — and above the device max.
    for (i, n) in [(1u64, 3u32), (2, 5000)] {
        let mut w = send(i, m.sge(0, 8));
        w.num_sge_override = Some(n);
        assert!(drv.post_send(&mut p.a, &w));
        let c = one(&drv, &mut p.cq_a);
        assert_eq!(c.wr_id, i);
        assert_ne!(c.status, 0);
        drv.reset_qp(&mut p.a).unwrap();
        for mm in pvrdma_guest::driver::rc_connect_attrs(p.b.qpn, p.gid, ALL_ACCESS) {
            drv.modify_qp(&p.a, mm).unwrap();
        }
    }
    // Userspace opcodes ≥ 7 are not what they say.
    let mut w = send(9, m.sge(0, 8));
    w.opcode = 7;
    assert!(drv.post_send(&mut p.a, &w));
    assert_eq!(one(&drv, &mut p.cq_a).status, 2, "LOC_QP_OP_ERR");
}

#[test]
fn ud_send_with_grh_and_qkey_check() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed();
    let gid = gid_of(MAC);
    drv.create_bind(0, gid, 1).unwrap();
    let ctx = drv.create_uc(3).unwrap();
    let pd = drv.create_pd(ctx).unwrap();
    let mut cq = drv.create_cq(ctx, 64).unwrap();
    let mut a = drv
        .create_qp(ctx, QpKind::Ud, pd, &cq, &cq, None, (16, 16, 1, 1), false)
        .unwrap();
    let mut b = drv
        .create_qp(ctx, QpKind::Ud, pd, &cq, &cq, None, (16, 16, 1, 1), false)
        .unwrap();
    for m in ud_attrs(0x1111) {
        drv.modify_qp(&a, m).unwrap();
        drv.modify_qp(&b, m).unwrap();
    }
    let m = drv.reg_mr(pd, 0x4000_0000, 8192, ALL_ACCESS).unwrap();
    let mem = drv.mem();
    let payload = pattern(500, 3);
    m.write(mem, 0, &payload);
    assert!(drv.post_recv(&mut b, 5, &[m.sge(4096, 40 + 1024)]));
    let to = |qkey| SendWqe {
        ud: Some(UdAddr {
            remote_qpn: b.qpn,
            qkey,
            dgid: gid,
            gid_index: 0,
            dmac: MAC,
            pd,
        }),
        ..send(1, m.sge(0, 500))
    };
    // Wrong qkey: dropped silently, the sender still completes.
    assert!(drv.post_send(&mut a, &to(0x2222)));
    let c = one(&drv, &mut cq);
    assert_eq!((c.qp, c.status), (u64::from(a.handle), 0));
    assert!(drv
        .wait_cqes(&mut cq, 1, Duration::from_millis(100))
        .is_empty());
    assert!(drv.post_send(&mut a, &to(0x1111)));
    let c = drv.wait_cqes(&mut cq, 2, WAIT);
    let r = c.iter().find(|c| c.opcode == 128).expect("receive CQE");
    assert_eq!(r.byte_len, 540);
    assert_eq!(r.src_qp, a.qpn);
    assert_ne!(r.wc_flags & 1, 0, "GRH flag");
    let mut grh = [0u8; 40];
    m.read(mem, 4096, &mut grh);
    assert_eq!(grh[0] >> 4, 6, "IPv6-style GRH");
    assert_eq!(&grh[8..24], &gid, "sgid");
    assert_eq!(&grh[24..40], &gid, "dgid");
    let mut got = vec![0u8; 500];
    m.read(mem, 4096 + 40, &mut got);
    assert_eq!(got, payload);
}

#[test]
fn srq_receives_are_shared() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed();
    let gid = gid_of(MAC);
    drv.create_bind(0, gid, 1).unwrap();
    let ctx = drv.create_uc(4).unwrap();
    let pd = drv.create_pd(ctx).unwrap();
    let mut cq = drv.create_cq(ctx, 64).unwrap();
    let mut srq = drv.create_srq(ctx, pd, 16, 1, 0).unwrap();
    let mut a = drv
        .create_qp(ctx, QpKind::Rc, pd, &cq, &cq, None, (16, 16, 1, 1), false)
        .unwrap();
    let b = drv
        .create_qp(
            ctx,
            QpKind::Rc,
            pd,
            &cq,
            &cq,
            Some(&srq),
            // As the provider sends it: no receive queue, so no receive SGEs.
            (16, 0, 1, 0),
            false,
        )
        .unwrap();
    for m in pvrdma_guest::driver::rc_connect_attrs(b.qpn, gid, ALL_ACCESS) {
        drv.modify_qp(&a, m).unwrap();
    }
    for m in pvrdma_guest::driver::rc_connect_attrs(a.qpn, gid, ALL_ACCESS) {
        drv.modify_qp(&b, m).unwrap();
    }
    let m = drv.reg_mr(pd, 0x6000_0000, 8192, ALL_ACCESS).unwrap();
    for i in 0..4 {
        assert!(drv.post_srq_recv(&mut srq, 100 + i, &[m.sge(4096 + i * 256, 256)]));
    }
    for i in 0..4 {
        assert!(drv.post_send(&mut a, &send(i, m.sge(0, 32))));
    }
    let c = drv.wait_cqes(&mut cq, 8, WAIT);
    let mut recv: Vec<u64> = c
        .iter()
        .filter(|c| c.opcode == 128)
        .map(|c| c.wr_id)
        .collect();
    recv.sort_unstable();
    assert_eq!(recv, vec![100, 101, 102, 103]);
    assert!(c.iter().all(|c| c.status == 0));
    assert_eq!(drv.query_srq(&srq).unwrap().max_wr, 16);
}

#[test]
fn two_devices_on_one_fabric() {
    let _shared = crate::common::shared();
    let fabric = Fabric::new();
    let mac_a = [0x00, 0x50, 0x56, 0, 0, 0xa];
    let mac_b = [0x00, 0x50, 0x56, 0, 0, 0xb];
    let (_ta, da) = probed_on(&fabric, mac_a);
    let (_tb, db) = probed_on(&fabric, mac_b);
    let (ga, gb) = (gid_of(mac_a), gid_of(mac_b));
    da.create_bind(0, ga, 1).unwrap();
    db.create_bind(0, gb, 1).unwrap();
    let (ca, cb) = (da.create_uc(1).unwrap(), db.create_uc(1).unwrap());
    let (pa, pb) = (da.create_pd(ca).unwrap(), db.create_pd(cb).unwrap());
    let mut cqa = da.create_cq(ca, 16).unwrap();
    let mut cqb = db.create_cq(cb, 16).unwrap();
    let mut qa = da
        .create_qp(ca, QpKind::Rc, pa, &cqa, &cqa, None, (8, 8, 1, 1), false)
        .unwrap();
    let mut qb = db
        .create_qp(cb, QpKind::Rc, pb, &cqb, &cqb, None, (8, 8, 1, 1), false)
        .unwrap();
    for m in pvrdma_guest::driver::rc_connect_attrs(qb.qpn, gb, ALL_ACCESS) {
        da.modify_qp(&qa, m).unwrap();
    }
    for m in pvrdma_guest::driver::rc_connect_attrs(qa.qpn, ga, ALL_ACCESS) {
        db.modify_qp(&qb, m).unwrap();
    }
    let ma = da.reg_mr(pa, 0x1000, 4096, ALL_ACCESS).unwrap();
    let mb = db.reg_mr(pb, 0x1000, 4096, ALL_ACCESS).unwrap();
    let msg = pattern(777, 9);
    ma.write(da.mem(), 0, &msg);
    assert!(db.post_recv(&mut qb, 1, &[mb.sge(0, 4096)]));
    assert!(da.post_send(&mut qa, &send(2, ma.sge(0, 777))));
    assert_eq!(one(&da, &mut cqa).status, 0);
    let r = one(&db, &mut cqb);
    assert_eq!((r.status, r.byte_len), (0, 777));
    let mut got = vec![0u8; 777];
    mb.read(db.mem(), 0, &mut got);
    assert_eq!(got, msg);
    let _ = &mut qa;
}

#[test]
fn gsi_mads_loop_back_to_qp1_with_a_grh() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed();
    let mut k = pvrdma_guest::kernel::ib_register(&drv, MAC).unwrap();
    let mad = pattern(256, 0x4d);
    let buf = drv.alloc.contiguous(drv.mem(), 1);
    use vm_memory::Bytes;
    drv.mem().write_slice(&mad, buf).unwrap();
    let w = SendWqe {
        wr_id: 0x51,
        opcode: wr_opcode::SEND,
        flags: 2,
        sges: vec![WireSge {
            addr: buf.0,
            length: 256,
            lkey: k.dma_mr.lkey,
        }],
        ud: Some(UdAddr {
            remote_qpn: 1,
            qkey: 0x8000_0000, // bit 31: use the QP's own qkey (ib_mad does this)
            dgid: k.gid,
            gid_index: 0,
            dmac: MAC,
            pd: k.pd,
        }),
        ..Default::default()
    };
    assert!(drv.post_send(&mut k.gsi, &w));
    let c = drv.wait_cqes(&mut k.cq, 2, WAIT);
    assert_eq!(c.len(), 2);
    let r = c.iter().find(|c| c.opcode == 128).expect("MAD received");
    assert_eq!((r.status, r.byte_len, r.src_qp), (0, 296, 1));
    assert_ne!(r.wc_flags & 1, 0, "GRH");
    assert_ne!(
        r.wc_flags & (1 << 6),
        0,
        "kernel CQ: network header type valid"
    );
    // Receive buffer r.wr_id lives at bufs + wr_id * 296; its payload follows the 40-byte GRH.
    let s = c.iter().find(|c| c.opcode == 0).expect("send completion");
    assert_eq!((s.wr_id, s.status), (0x51, 0));
}

#[test]
fn atomics_from_several_qps_at_once_are_exact() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed();
    let threads = 4u64;
    let per = 500u64;
    let mut pairs: Vec<_> = (0..threads).map(|_| rc_pair(&drv, MAC, 32, 1)).collect();
    // One counter, registered by the first pair's PD; the others reach it through its rkey only
    // if their PD matches, so every pair targets its peer QP's MR — all aliasing one guest page.
    let page = drv.alloc.contiguous(drv.mem(), 1);
    let counters: Vec<_> = pairs
        .iter()
        .map(|p| {
            let pdir = pvrdma_guest::mem::GuestPdir::build(&drv.alloc, drv.mem(), vec![page]);
            drv.reg_mr_pdir(p.pd, 0x4242_0000, 4096, ALL_ACCESS, pdir)
                .unwrap()
        })
        .collect();
    let results: Vec<_> = pairs
        .iter()
        .map(|p| drv.reg_mr(p.pd, 0x5151_0000, 8 * per, ALL_ACCESS).unwrap())
        .collect();
    let drv = &drv;
    std::thread::scope(|s| {
        for ((p, ctr), res) in pairs.iter_mut().zip(&counters).zip(&results) {
            s.spawn(move || {
                for i in 0..per {
                    let w = SendWqe {
                        wr_id: i,
                        opcode: wr_opcode::ATOMIC_FETCH_AND_ADD,
                        flags: 2,
                        sges: vec![res.sge(8 * i, 8)],
                        remote_addr: ctr.iova + 64,
                        rkey: ctr.rkey,
                        compare_add: 1,
                        ..Default::default()
                    };
                    assert!(drv.post_send(&mut p.a, &w));
                    assert_eq!(one(drv, &mut p.cq_a).status, 0);
                }
            });
        }
    });
    let mut b = [0u8; 8];
    use vm_memory::Bytes;
    drv.mem()
        .read_slice(&mut b, page.unchecked_add(64))
        .unwrap();
    assert_eq!(
        u64::from_le_bytes(b),
        threads * per,
        "every add applied exactly once"
    );
    // Every fetched value is distinct: each add saw a different counter value.
    let mut seen = Vec::new();
    for r in &results {
        for i in 0..per {
            r.read(drv.mem(), 8 * i, &mut b);
            seen.push(u64::from_le_bytes(b));
        }
    }
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len() as u64, threads * per);
}

#[test]
fn rnr_waits_for_a_receive_then_gives_up_when_retries_are_exhausted() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed();
    let mut p = rc_pair(&drv, MAC, 8, 1);
    let m = drv.reg_mr(p.pd, 0xc000, 4096, ALL_ACCESS).unwrap();
    // rnr_retry 7 = infinite: the send waits until the receive arrives.
    assert!(drv.post_send(&mut p.a, &send(1, m.sge(0, 32))));
    assert!(drv
        .wait_cqes(&mut p.cq_a, 1, Duration::from_millis(200))
        .is_empty());
    assert!(drv.post_recv(&mut p.b, 2, &[m.sge(2048, 64)]));
    assert_eq!(one(&drv, &mut p.cq_a).status, 0);
    assert_eq!(one(&drv, &mut p.cq_b).wr_id, 2);
    // rnr_retry 0: no receive → RNR_RETRY_EXC_ERR.
    let mut q = rc_pair(&drv, MAC, 8, 1);
    drv.reset_qp(&mut q.a).unwrap();
    let mut attrs = pvrdma_guest::driver::rc_connect_attrs(q.b.qpn, q.gid, ALL_ACCESS);
    attrs[2].attrs.rnr_retry = 0;
    for mm in attrs {
        drv.modify_qp(&q.a, mm).unwrap();
    }
    let mq = drv.reg_mr(q.pd, 0xc000, 4096, ALL_ACCESS).unwrap();
    assert!(drv.post_send(&mut q.a, &send(3, mq.sge(0, 32))));
    let c = one(&drv, &mut q.cq_a);
    assert_eq!((c.wr_id, c.status), (3, 13), "RNR_RETRY_EXC_ERR");
}

#[test]
fn a_wqe_slot_is_free_once_its_work_is_visible() {
    let _shared = crate::common::shared();
    // ib_write_lat with a send queue of depth 1: the next WQE is posted as soon as the peer's
    // data arrives, so the slot must be given back before the work completes (as an HCA does
    // when it fetches a WQE).
    let (_t, drv) = probed();
    let mut p = rc_pair(&drv, MAC, 1, 1);
    let local = drv.reg_mr(p.pd, 0x1000, 4096, ALL_ACCESS).unwrap();
    let remote = drv.reg_mr(p.pd, 0x9000, 4096, ALL_ACCESS).unwrap();
    let mem = drv.mem();
    for i in 1..=200u64 {
        local.write(mem, 0, &i.to_le_bytes());
        let w = SendWqe {
            wr_id: i,
            opcode: wr_opcode::RDMA_WRITE,
            flags: if i % 50 == 0 { 2 } else { 0 },
            sges: vec![local.sge(0, 8)],
            remote_addr: remote.iova,
            rkey: remote.rkey,
            ..Default::default()
        };
        assert!(
            drv.post_send(&mut p.a, &w),
            "SQ slot still busy at write {i}"
        );
        let deadline = std::time::Instant::now() + WAIT;
        let mut b = [0u8; 8];
        loop {
            remote.read(mem, 0, &mut b);
            if u64::from_le_bytes(b) == i {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "write {i} never arrived"
            );
            std::hint::spin_loop();
        }
        if i % 50 == 0 {
            assert_eq!(one(&drv, &mut p.cq_a).wr_id, i);
        }
    }
}

#[test]
fn sends_beyond_the_backend_queue_wait_in_order_and_none_is_lost() {
    let _shared = crate::common::shared();
    // The responder has no receive (RNR, retried forever), so the backend's send queue fills
    // (16 WRs), the device keeps what it fetched beyond that, and the guest's ring fills behind
    // it. Once receives arrive every send completes, in order, with its own bytes.
    let (_t, drv) = probed();
    let depth = 16u32;
    let mut p = rc_pair(&drv, MAC, depth, 1);
    let mem = drv.mem();
    let src = drv.reg_mr(p.pd, 0x10_0000, 4096, ALL_ACCESS).unwrap();
    let dst = drv.reg_mr(p.pd, 0x20_0000, 4096, ALL_ACCESS).unwrap();
    let len = 64u32;
    let max = 4096 / u64::from(len);
    for i in 0..max {
        src.write(mem, i * u64::from(len), &pattern(len as usize, i as u8));
    }
    // Post until the ring stays full (for a second: generous on a loaded host).
    let mut total = 0u64;
    let mut last = std::time::Instant::now();
    while total < max && last.elapsed() < Duration::from_millis(1000) {
        if drv.post_send(&mut p.a, &send(total, src.sge(total * u64::from(len), len))) {
            total += 1;
            last = std::time::Instant::now();
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert!(
        total > u64::from(2 * depth),
        "only {total} sends fit: the device took none beyond the backend's queue"
    );
    assert!(drv
        .wait_cqes(&mut p.cq_a, 1, Duration::from_millis(50))
        .is_empty());
    let deadline = std::time::Instant::now() + WAIT;
    let (mut posted, mut recvd, mut sent) = (0u64, Vec::new(), Vec::new());
    while (recvd.len() as u64) < total || (sent.len() as u64) < total {
        while posted < total && drv.post_recv(&mut p.b, posted, &[dst.sge(posted * 64, len)]) {
            posted += 1;
        }
        recvd.extend(drv.wait_cqes(&mut p.cq_b, 1, Duration::from_millis(10)));
        sent.extend(drv.wait_cqes(&mut p.cq_a, 1, Duration::from_millis(1)));
        assert!(std::time::Instant::now() < deadline, "completions stopped");
    }
    for (i, c) in sent.iter().enumerate() {
        assert_eq!((c.wr_id, c.status), (i as u64, 0), "send CQE {i}");
    }
    for (i, c) in recvd.iter().enumerate() {
        assert_eq!(
            (c.wr_id, c.status, c.byte_len),
            (i as u64, 0, len),
            "recv CQE {i}"
        );
        let mut got = vec![0u8; len as usize];
        dst.read(mem, i as u64 * 64, &mut got);
        assert_eq!(got, pattern(len as usize, i as u8), "bytes of message {i}");
    }
}

#[test]
fn a_malformed_receive_completes_on_the_receive_cq() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed();
    let p = rc_pair(&drv, MAC, 8, 1);
    let mut scq = drv.create_cq(p.ctx, 16).unwrap();
    let mut rcq = drv.create_cq(p.ctx, 16).unwrap();
    let mut qp = drv
        .create_qp(
            p.ctx,
            QpKind::Rc,
            p.pd,
            &scq,
            &rcq,
            None,
            (8, 8, 1, 1),
            false,
        )
        .unwrap();
    for m in pvrdma_guest::driver::rc_connect_attrs(p.a.qpn, p.gid, ALL_ACCESS) {
        drv.modify_qp(&qp, m).unwrap();
    }
    let m = drv.reg_mr(p.pd, 0xd000, 4096, ALL_ACCESS).unwrap();
    // Two SGEs on a QP whose receives take one (the WQE spills into the next, unused slot).
    assert!(drv.post_recv(&mut qp, 77, &[m.sge(0, 8), m.sge(8, 8)]));
    let c = one(&drv, &mut rcq);
    assert_eq!(
        (c.wr_id, c.status, c.opcode),
        (77, 1, 128),
        "LOC_LEN_ERR on RECV"
    );
    assert_eq!(c.qp, u64::from(qp.handle));
    assert!(drv
        .wait_cqes(&mut scq, 1, Duration::from_millis(50))
        .is_empty());
}
