//! The device's counters and resource listing (`DeviceHandle::stats`, `DeviceHandle::resources`):
//! traffic of known count and size gives exactly those counts and bytes, per device and per QP;
//! guest input the device refuses is counted by kind (the hostile cases); the interrupts counted
//! are the interrupts the guest took. In-process only: the counters are read through the device
//! handle, which a `pvrdma serve` process does not export to the harness.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::hostile::{device, fatal_qp, poke32, probe, raw};
use pvrdma_dev::abi::{cmd, wr_opcode, CmdResizeCq};
use pvrdma_dev::regs::{offset, uar};
use pvrdma_dev::stats::{CommandCount, DeviceStats, OpCount, QpInfo, Refused};
use pvrdma_dev::{DeviceConfig, Region};
use pvrdma_guest::driver::pci_enable;
use pvrdma_guest::{Ctx, InProcess, SendWqe, Transport};
use rdma_backend::emulated::Fabric;

fn stats(t: &InProcess) -> DeviceStats {
    t.device().stats().expect("stats")
}

/// The listing's entry of QP `handle`.
fn qp_info(t: &InProcess, handle: u32) -> QpInfo {
    t.device()
        .resources()
        .expect("resources")
        .qps
        .into_iter()
        .find(|q| q.handle == handle)
        .expect("a live QP")
}

/// What `after` counts of opcode `name` beyond `before`.
fn grew(
    before: &BTreeMap<String, OpCount>,
    after: &BTreeMap<String, OpCount>,
    name: &str,
) -> OpCount {
    let b = before.get(name).copied().unwrap_or_default();
    let a = after.get(name).copied().unwrap_or_default();
    OpCount {
        wqes: a.wqes - b.wqes,
        bytes: a.bytes - b.bytes,
    }
}

fn ops(wqes: u64, bytes: u64) -> OpCount {
    OpCount { wqes, bytes }
}

/// Polls the device's counters until `done` holds (the data path runs on workers).
fn wait_stats(t: &InProcess, done: impl Fn(&DeviceStats) -> bool) -> DeviceStats {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = stats(t);
        if done(&s) || Instant::now() >= deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// SENDs, SENDs with immediate, RDMA WRITEs (with and without immediate) and READs of known
/// count and size: the device counts exactly those WQEs and bytes by opcode on the send side,
/// exactly the receive completions and their bytes on the receive side, each QP its own, and
/// a QP's counts stay in the device's totals after it is destroyed.
#[test]
fn known_traffic_gives_exact_counts_and_bytes() {
    let _shared = crate::common::shared();
    let (t, drv) = probed_local();
    let mut p = rc_pair(&drv, MAC, 32, 1);
    let m = drv.reg_mr(p.pd, 0x10_0000, 1 << 16, ALL_ACCESS).unwrap();
    let before = stats(&t);
    const N: u64 = 10;
    const S: u32 = 100;
    for i in 0..N {
        assert!(drv.post_recv(&mut p.b, i, &[m.sge(32768, 256)]));
    }
    for i in 0..N {
        assert!(drv.post_send(&mut p.a, &send(i, m.sge(0, S))));
    }
    let sent = drv.wait_cqes(&mut p.cq_a, N as usize, WAIT);
    let got = drv.wait_cqes(&mut p.cq_b, N as usize, WAIT);
    assert_eq!((sent.len(), got.len()), (N as usize, N as usize));
    assert!(sent.iter().chain(&got).all(|c| c.status == 0));
    // 3 RDMA WRITEs of 500 bytes, 2 RDMA READs of 300.
    let rdma = |wr_id, opcode, len| SendWqe {
        wr_id,
        opcode,
        flags: 2,
        sges: vec![m.sge(0, len)],
        remote_addr: m.iova + 8192,
        rkey: m.rkey,
        ..Default::default()
    };
    for i in 0..3 {
        assert!(drv.post_send(&mut p.a, &rdma(100 + i, wr_opcode::RDMA_WRITE, 500)));
    }
    for i in 0..2 {
        assert!(drv.post_send(&mut p.a, &rdma(200 + i, wr_opcode::RDMA_READ, 300)));
    }
    assert_eq!(drv.wait_cqes(&mut p.cq_a, 5, WAIT).len(), 5);
    // One WRITE with immediate of 40 bytes and one SEND with immediate of 64, each consuming
    // a receive.
    assert!(drv.post_recv(&mut p.b, 300, &[m.sge(32768, 256)]));
    assert!(drv.post_send(&mut p.a, &rdma(301, wr_opcode::RDMA_WRITE_WITH_IMM, 40)));
    let imm = one(&drv, &mut p.cq_b);
    assert_eq!((imm.opcode, imm.byte_len), (129, 40));
    assert!(drv.post_recv(&mut p.b, 302, &[m.sge(32768, 256)]));
    let mut w = send(303, m.sge(0, 64));
    w.opcode = wr_opcode::SEND_WITH_IMM;
    assert!(drv.post_send(&mut p.a, &w));
    assert_eq!(one(&drv, &mut p.cq_b).byte_len, 64);
    assert_eq!(drv.wait_cqes(&mut p.cq_a, 2, WAIT).len(), 2);

    let after = stats(&t);
    let sends = |name| grew(&before.send, &after.send, name);
    assert_eq!(sends("SEND"), ops(N, N * u64::from(S)));
    assert_eq!(sends("RDMA_WRITE"), ops(3, 1500));
    assert_eq!(sends("RDMA_READ"), ops(2, 600));
    assert_eq!(sends("RDMA_WRITE_WITH_IMM"), ops(1, 40));
    assert_eq!(sends("SEND_WITH_IMM"), ops(1, 64));
    assert_eq!(after.send.len(), 5, "{:?}", after.send);
    let recvs = |name| grew(&before.recv, &after.recv, name);
    assert_eq!(recvs("RECV"), ops(N + 1, N * u64::from(S) + 64));
    assert_eq!(recvs("RECV_RDMA_WITH_IMM"), ops(1, 40));
    // Every WQE was signaled: a CQE each on a's CQ, one per receive on b's.
    assert_eq!(after.cqes - before.cqes, (N + 7) + (N + 2));
    assert_eq!(after.refused, before.refused);
    assert_eq!(after.cq_overflows, before.cq_overflows);
    assert_eq!(after.stale_completions, before.stale_completions);
    assert!(after.doorbells - before.doorbells >= 2 * N + 9);

    // Per QP, in the listing.
    let a = qp_info(&t, p.a.handle);
    let b = qp_info(&t, p.b.handle);
    let sent_bytes = N * u64::from(S) + 1500 + 600 + 40 + 64;
    assert_eq!(
        (a.counters.send_wqes, a.counters.send_bytes),
        (N + 7, sent_bytes)
    );
    assert_eq!((a.counters.recv_wqes, a.counters.recv_bytes), (0, 0));
    assert_eq!((b.counters.send_wqes, b.counters.send_bytes), (0, 0));
    assert_eq!(
        (b.counters.recv_wqes, b.counters.recv_bytes),
        (N + 2, N * u64::from(S) + 104)
    );
    for q in [&a, &b] {
        assert_eq!((q.counters.error_completions, q.counters.bad_wqes), (0, 0));
        assert!(q.counters.rnr_waits.is_some() && q.counters.retries.is_some());
        assert_eq!((q.qp_type.as_str(), q.state.as_str()), ("RC", "RTS"));
        assert_eq!(q.pd, p.pd);
        assert_eq!(q.srq, None);
    }
    let gid = std::net::Ipv6Addr::from(p.gid).to_string();
    assert!(gid.starts_with("fe80::"), "{gid}");
    let peer = a.peer.as_ref().expect("a is connected");
    assert_eq!((peer.gid.as_str(), peer.qpn), (gid.as_str(), p.b.qpn));
    assert_eq!(b.peer.as_ref().map(|p| p.qpn), Some(p.a.qpn));
    assert_eq!(
        (a.qpn, a.send_cq, a.recv_cq),
        (p.a.qpn, p.cq_a.handle, p.cq_a.handle)
    );
    let res = t.device().resources().unwrap();
    let cq = |h| res.cqs.iter().find(|c| c.handle == h).expect("live CQ");
    assert_eq!(cq(p.cq_a.handle).cqes, N + 7);
    assert_eq!(cq(p.cq_b.handle).cqes, N + 2);
    assert_eq!(cq(p.cq_a.handle).overflows, 0);
    assert_eq!(cq(p.cq_a.handle).users, 2, "a's send and receive queues");
    let mr = res.mrs.iter().find(|r| r.handle == m.handle).expect("MR");
    assert_eq!(
        (
            mr.pd,
            mr.lkey,
            mr.rkey,
            mr.iova,
            mr.length,
            mr.access,
            mr.kind.as_str()
        ),
        (p.pd, m.lkey, m.rkey, 0x10_0000, 1 << 16, ALL_ACCESS, "USER")
    );
    assert!(res.pds.iter().any(|d| d.handle == p.pd && d.users == 3));
    assert_eq!(res.qps.len() as u64, after.objects.qps);

    // Destroyed QPs still count in the device's totals.
    drv.destroy_qp(p.a).unwrap();
    drv.destroy_qp(p.b).unwrap();
    let gone = stats(&t);
    assert_eq!(gone.send, after.send);
    assert_eq!(gone.recv, after.recv);
    assert_eq!(gone.objects.qps, after.objects.qps - 2);
    let destroys = |s: &DeviceStats| s.commands_by_code.get("DESTROY_QP").map_or(0, |c| c.count);
    assert_eq!(destroys(&gone) - destroys(&after), 2);
    assert_eq!(gone.commands - after.commands, 2);
}

/// The hostile cases, each counted under its kind and nowhere else.
#[test]
fn refused_guest_input_is_counted_by_kind() {
    let _shared = crate::common::shared();
    let t = device();
    let tr: &dyn Transport = &*t;
    // REQUEST before a DSR, then a DSR outside guest RAM.
    pci_enable(tr);
    tr.write(Region::Bar(1), offset::REQUEST, &0u32.to_le_bytes());
    tr.write(Region::Bar(1), offset::DSRLOW, &0u32.to_le_bytes());
    tr.write(Region::Bar(1), offset::DSRHIGH, &0x100u32.to_le_bytes());
    let s = stats(&t);
    assert_eq!(
        s.refused,
        Refused {
            commands: 1,
            dsr: 1,
            ..Refused::default()
        }
    );
    assert_eq!(s.commands, 0, "no command was read");

    let drv = probe(&t);
    let base = stats(&t);
    // Unknown command codes, and a known one naming no object.
    for code in [cmd::COUNT, 0xffff_ffff] {
        let mut req = [0u8; 184];
        req[8..12].copy_from_slice(&code.to_le_bytes());
        assert_ne!(err_of(drv.cmd_raw(&req, false)), 0);
    }
    let resize = CmdResizeCq {
        cq_handle: 9999,
        cqe: 16,
        ..Default::default()
    };
    assert_ne!(err_of(raw(&drv, cmd::RESIZE_CQ, resize)), 0);
    // REQUEST values other than 0.
    for v in [1u32, 0x8000_0000, u32::MAX] {
        drv.set_reg(offset::REQUEST, v);
    }
    // Doorbells on a UAR page no context owns.
    for i in 0..5u32 {
        tr.write(
            Region::Bar(2),
            (511 << 12) | uar::QP,
            &(i | (1 << 31)).to_le_bytes(),
        );
    }
    // A send WQE with more SGEs than its QP takes, and a receive WQE claiming 0xffff.
    let mut p = rc_pair(&drv, MAC, 8, 4);
    let m = drv.reg_mr(p.pd, 0x1000, 4096, ALL_ACCESS).unwrap();
    let mut w = send(1, m.sge(0, 8));
    w.num_sge_override = Some(5);
    assert!(drv.post_send(&mut p.a, &w));
    assert_ne!(one(&drv, &mut p.cq_a).status, 0);
    assert!(drv.push_recv(&mut p.b, 7, &[m.sge(0, 8)]));
    let rq = p.b.rq.as_ref().unwrap();
    poke32(&drv, p.b.pdir.addr(rq.base + 8), 0xffff);
    drv.doorbell(p.b.ctx, uar::QP, p.b.handle | (1 << 31));
    assert_ne!(one(&drv, &mut p.cq_b).status, 0);
    // A QP whose ring indices are garbage.
    let fatal = fatal_qp(&drv);
    drv.ring_sq(&fatal);
    let s = wait_stats(&t, |s| s.refused.rings > base.refused.rings);

    let grown = |f: fn(&Refused) -> u64| f(&s.refused) - f(&base.refused);
    assert_eq!(grown(|r| r.commands), 3);
    assert_eq!(grown(|r| r.registers), 3);
    assert_eq!(grown(|r| r.doorbells), 5);
    assert_eq!(grown(|r| r.wqes), 2);
    assert_eq!(grown(|r| r.rings), 1);
    for kind in [
        (|r: &Refused| r.dsr) as fn(&Refused) -> u64,
        |r| r.over_limit,
        |r| r.dma,
        |r| r.dropped_writes,
    ] {
        assert_eq!(grown(kind), 0, "{:?}", s.refused);
    }
    assert_eq!(
        s.commands_by_code["UNKNOWN"],
        CommandCount {
            count: 2,
            errors: 2
        }
    );
    assert_eq!(s.commands_by_code["RESIZE_CQ"].errors, 1);
    let a = qp_info(&t, p.a.handle);
    assert_eq!((a.counters.bad_wqes, a.counters.error_completions), (1, 1));
    assert_eq!(a.counters.send_wqes, 0, "a malformed WQE is not traffic");
    assert_eq!(a.state, "ERR");
    let b = qp_info(&t, p.b.handle);
    assert_eq!((b.counters.bad_wqes, b.counters.error_completions), (1, 1));

    // Tables full: refused as over the limit, not as malformed.
    let cfg = DeviceConfig {
        mac: MAC,
        max_pd: 2,
        ..DeviceConfig::default()
    };
    let (t2, drv2) = probed_with(&Fabric::new(), cfg);
    let made = (0..4)
        .filter(|_| drv2.create_pd(Ctx::KERNEL).is_ok())
        .count();
    let s2 = stats(&t2);
    assert_eq!(s2.refused.over_limit, 4 - made as u64, "{made} PDs made");
    assert_eq!(s2.refused.commands, 0);
    assert_eq!(s2.commands_by_code["CREATE_PD"].errors, 4 - made as u64);
}

/// A million bad doorbells from a hostile guest: one counter of exactly 1,000,000, and nothing
/// else refused.
#[test]
fn a_million_bad_doorbells_count_exactly() {
    let _shared = crate::common::shared();
    let t = device();
    let _drv = probe(&t);
    let tr: &dyn Transport = &*t;
    let before = stats(&t);
    for i in 0..1_000_000u32 {
        tr.write(
            Region::Bar(2),
            (511 << 12) | uar::QP,
            &(i | (1 << 31)).to_le_bytes(),
        );
    }
    let after = stats(&t);
    assert_eq!(
        after.refused.doorbells - before.refused.doorbells,
        1_000_000
    );
    assert_eq!(after.doorbells - before.doorbells, 1_000_000);
    assert_eq!(
        Refused {
            doorbells: before.refused.doorbells,
            ..after.refused
        },
        before.refused
    );
}

/// The interrupts the device counts are the ones the guest took, vector by vector; resets are
/// counted, and the traffic of QPs a reset freed stays counted.
#[test]
fn interrupts_events_and_resets_are_counted() {
    let _shared = crate::common::shared();
    let (t, drv) = probed_local();
    let mut p = rc_pair(&drv, MAC, 8, 1);
    let m = drv.reg_mr(p.pd, 0x9000, 4096, ALL_ACCESS).unwrap();
    for i in 0..3 {
        drv.arm_cq(&p.cq_b, false);
        assert!(drv.post_recv(&mut p.b, i, &[m.sge(2048, 64)]));
        assert!(drv.post_send(&mut p.a, &send(i, m.sge(0, 64))));
        assert_eq!(drv.wait_cqes(&mut p.cq_b, 1, WAIT).len(), 1);
        assert_eq!(drv.wait_cqes(&mut p.cq_a, 1, WAIT).len(), 1);
    }
    let s = wait_stats(&t, |s| s.interrupts.cq >= 3);
    assert_eq!(s.interrupts.response, drv.irqs(0));
    assert_eq!(s.interrupts.async_events, drv.irqs(1));
    assert_eq!(s.interrupts.cq, drv.irqs(2));
    assert_eq!(s.interrupts.intx, 0, "MSI-X is on");
    assert!(s.events >= 1, "PORT_ACTIVE at activation");
    assert!(s.commands >= 10 && s.commands_by_code["CREATE_QP"].count == 2);
    assert_eq!(s.resets, 0);

    drv.remove();
    t.device().reset().unwrap();
    let r = stats(&t);
    assert_eq!(r.resets, 2);
    assert_eq!(r.objects, pvrdma_dev::stats::ObjectCounts::default());
    assert_eq!(
        r.send, s.send,
        "the traffic of QPs a reset freed stays counted"
    );
    assert_eq!(r.recv, s.recv);
    assert_eq!(r.send["SEND"], ops(3, 192));
}

/// A SEND that finds no receive posted waits (RNR) and is sent again once one is.
#[test]
fn rnr_waits_and_retries_are_counted_per_qp() {
    let _shared = crate::common::shared();
    let (t, drv) = probed_local();
    let mut p = rc_pair(&drv, MAC, 8, 1);
    let m = drv.reg_mr(p.pd, 0x9000, 4096, ALL_ACCESS).unwrap();
    assert!(drv.post_send(&mut p.a, &send(1, m.sge(0, 64))));
    let deadline = Instant::now() + WAIT;
    while qp_info(&t, p.a.handle).counters.rnr_waits < Some(1) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let waiting = qp_info(&t, p.a.handle).counters;
    assert!(waiting.rnr_waits >= Some(1), "{waiting:?}");
    assert_eq!(waiting.send_wqes, 1);
    assert!(drv.post_recv(&mut p.b, 2, &[m.sge(2048, 64)]));
    assert_eq!(one(&drv, &mut p.cq_a).status, 0);
    assert_eq!(one(&drv, &mut p.cq_b).byte_len, 64);
    let done = qp_info(&t, p.a.handle).counters;
    assert!(done.retries >= Some(1), "{done:?}");
    assert_eq!(done.error_completions, 0);
    let b = qp_info(&t, p.b.handle).counters;
    assert_eq!((b.rnr_waits, b.retries), (Some(0), Some(0)));
}
