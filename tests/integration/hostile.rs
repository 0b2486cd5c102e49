//! Hostile guest input: one test per entry of `qemu-reference.md` §6.3 (every CVE row and the 13
//! hazards) plus the register, DSR, page-directory, ring, doorbell, command and lifecycle abuse
//! the device must survive. Every test asserts the documented error and then that the device
//! still serves a fresh RC ping-pong ([`assert_device_healthy`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use pvrdma_dev::abi::{cmd, *};
use pvrdma_dev::regs::{ctl, err, offset, uar};
use pvrdma_dev::{DeviceConfig, Region};
use pvrdma_guest::driver::{pci_enable, rc_connect_attrs, ud_attrs, GuestError};
use pvrdma_guest::kernel::ib_register;
use pvrdma_guest::mem::{GuestPdir, PageAlloc};
use pvrdma_guest::transport::DEFAULT_RAM;
use pvrdma_guest::{Ctx, Driver, InProcess, Qp, QpKind, SendWqe, Transport, UdAddr};
use rdma_backend::emulated::Fabric;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress};

/// Short wait for things that must (or must not) happen soon.
const SHORT: Duration = Duration::from_millis(100);

/// An address far outside the 256 MiB of test guest RAM.
const OUTSIDE: u64 = 1 << 40;

// ---- helpers ------------------------------------------------------------------------------

/// Posts `req` under `code`, expecting a response.
pub(crate) fn raw<Q: ByteValued>(
    drv: &Driver,
    code: u32,
    req: Q,
) -> pvrdma_guest::driver::Result<RespHdr> {
    drv.cmd::<Q, RespHdr>(code, req)
}

/// A fresh device on its own fabric and its transport.
pub(crate) fn device() -> Arc<InProcess> {
    let cfg = DeviceConfig {
        mac: MAC,
        ..DeviceConfig::default()
    };
    Arc::new(InProcess::new(cfg, DEFAULT_RAM, &Fabric::new()))
}

pub(crate) fn probe(t: &Arc<InProcess>) -> Driver {
    Driver::probe(t.clone() as Arc<dyn Transport>).expect("probe")
}

fn stats(t: &InProcess) -> pvrdma_dev::DeviceStats {
    t.device().stats().expect("stats")
}

/// Waits (bounded) for an async event `(ty, info)`; returns every event seen.
fn wait_event(drv: &Driver, ty: u32, info: u32) -> Vec<(u32, u32)> {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        seen.extend(drv.events());
        if seen.contains(&(ty, info)) || Instant::now() >= deadline {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Reads a u32 of guest memory.
fn peek32(drv: &Driver, a: GuestAddress) -> u32 {
    drv.mem().read_obj(a).unwrap()
}

pub(crate) fn poke32(drv: &Driver, a: GuestAddress, v: u32) {
    drv.mem().write_obj(v, a).unwrap();
}

/// A CQ page directory for `cqe` entries, not registered.
fn cq_pdir(drv: &Driver, cqe: u32) -> GuestPdir {
    let n = 1 + (u64::from(cqe) * 64).div_ceil(4096) as usize;
    GuestPdir::build(&drv.alloc, drv.mem(), drv.alloc.scattered(drv.mem(), n))
}

fn create_cq_raw(
    drv: &Driver,
    ctx: u32,
    pdir: u64,
    cqe: u32,
    nchunks: u32,
) -> pvrdma_guest::driver::Result<RespCreateCq> {
    drv.cmd(
        cmd::CREATE_CQ,
        CmdCreateCq {
            pdir_dma: pdir,
            ctx_handle: ctx,
            cqe,
            nchunks,
            ..Default::default()
        },
    )
}

/// A valid CREATE_QP request (RC, 4+4 WRs, 1+1 SGEs: header + 1 SQ page + 1 RQ page).
fn qp_req(pd: u32, cq: u32, pdir: &GuestPdir) -> CmdCreateQp {
    CmdCreateQp {
        pdir_dma: pdir.dir.0,
        pd_handle: pd,
        send_cq_handle: cq,
        recv_cq_handle: cq,
        max_send_wr: 4,
        max_recv_wr: 4,
        max_send_sge: 1,
        max_recv_sge: 1,
        access_flags: 1,
        total_chunks: 3,
        send_chunks: 1,
        qp_type: 2,
        ..Default::default()
    }
}

fn create_qp_raw(drv: &Driver, req: CmdCreateQp) -> pvrdma_guest::driver::Result<RespCreateQpV2> {
    drv.cmd(cmd::CREATE_QP, req)
}

fn pages(drv: &Driver, n: usize) -> GuestPdir {
    GuestPdir::build(&drv.alloc, drv.mem(), drv.alloc.scattered(drv.mem(), n))
}

/// Objects a device holds: PDs, MRs, CQs, QPs, SRQs, contexts.
fn objects(t: &InProcess) -> [usize; 6] {
    let o = stats(t).objects;
    [o.pds, o.mrs, o.cqs, o.qps, o.srqs, o.ucs].map(|n| n as usize)
}

/// Brings a device up by hand with a DSR `tweak`ed from the driver's; returns (ERR after
/// ACTIVATE, ERR after a REQUEST).
fn manual_probe(t: &Arc<InProcess>, tweak: impl FnOnce(&mut Dsr, &PageAlloc)) -> (u32, u32) {
    let tr: &dyn Transport = &**t;
    pci_enable(tr);
    let mem = tr.mem();
    let alloc = PageAlloc::new(200 << 20, 256 << 20);
    let dsr = alloc.page(mem);
    let cmd_slot = alloc.page(mem);
    let resp_slot = alloc.page(mem);
    let ring = |n| GuestPdir::build(&alloc, mem, (0..n).map(|_| alloc.page(mem)).collect());
    let (ar, cr) = (ring(4), ring(4));
    let mut d = Dsr {
        driver_version: 20,
        cmd_slot_dma: cmd_slot.0,
        resp_slot_dma: resp_slot.0,
        async_ring_pages: RingPages {
            num_pages: 4,
            reserved: 0,
            pdir_dma: ar.dir.0,
        },
        cq_ring_pages: RingPages {
            num_pages: 4,
            reserved: 0,
            pdir_dma: cr.dir.0,
        },
        uar_pfn64: pvrdma_guest::driver::BAR2_ADDR >> 12,
        ..Dsr::default()
    };
    tweak(&mut d, &alloc);
    mem.write_obj(d, dsr).unwrap();
    let w = |off, v: u32| tr.write(Region::Bar(1), off, &v.to_le_bytes());
    let r = |off| {
        let mut b = [0u8; 4];
        tr.read(Region::Bar(1), off, &mut b);
        u32::from_le_bytes(b)
    };
    w(offset::DSRLOW, dsr.0 as u32);
    w(offset::DSRHIGH, (dsr.0 >> 32) as u32);
    w(offset::IMR, 0);
    w(offset::CTL, ctl::ACTIVATE);
    let e1 = r(offset::ERR);
    let mut q = CmdQueryPort {
        port_num: 1,
        ..Default::default()
    };
    q.hdr.cmd = cmd::QUERY_PORT;
    let _ = mem.write_obj(q, cmd_slot);
    w(offset::REQUEST, 0);
    let e2 = r(offset::ERR);
    (e1, e2)
}

// ---- CVE rows -----------------------------------------------------------------------------

/// CVE-2018-20123 (realize error path leaked): devices start and stop cleanly, failing commands
/// leave no objects, and RESET frees everything.
#[test]
fn cve_2018_20123_start_stop_and_failures_leak_nothing() {
    let _shared = crate::common::shared();
    for _ in 0..3 {
        let t = device();
        let drv = probe(&t);
        let _k = ib_register(&drv, MAC).unwrap();
        drop(drv);
        t.device().shutdown();
    }
    let t = device();
    let drv = probe(&t);
    let bad = cq_pdir(&drv, 16);
    let mem = drv.mem();
    mem.write_obj(OUTSIDE, bad.tables[0].unchecked_add(8))
        .unwrap();
    for _ in 0..20 {
        err_of(create_cq_raw(&drv, 0, bad.dir.0, 16, 2));
        err_of(drv.create_uc(0));
        err_of(raw(
            &drv,
            cmd::CREATE_PD,
            CmdCreatePd {
                ctx_handle: 77,
                ..Default::default()
            },
        ));
    }
    assert_eq!(objects(&t), [0; 6], "failed commands leave no objects");
    let _k = ib_register(&drv, MAC).unwrap();
    assert_ne!(objects(&t), [0; 6]);
    drv.remove();
    assert_eq!(objects(&t), [0; 6], "RESET frees every object");
    let drv = probe(&t);
    assert_device_healthy(&drv);
    assert_eq!(objects(&t), [0; 6], "the health check frees what it made");
}

/// CVE-2018-20124: SQ and RQ WQEs with num_sge > 4 complete in error; nothing overflows.
#[test]
fn cve_2018_20124_num_sge_above_max_sge() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed_local();
    let mut p = rc_pair(&drv, MAC, 8, 4);
    let m = drv.reg_mr(p.pd, 0x1000, 4096, ALL_ACCESS).unwrap();
    let mut w = send(1, m.sge(0, 8));
    w.num_sge_override = Some(5);
    assert!(drv.post_send(&mut p.a, &w));
    let c = one(&drv, &mut p.cq_a);
    assert_eq!(c.wr_id, 1);
    assert_ne!(c.status, 0, "num_sge 5 completes in error");
    // RQ: a receive WQE claiming 0xffff SGEs (slot 0 of a fresh RQ).
    assert!(drv.push_recv(&mut p.b, 7, &[m.sge(0, 8)]));
    let rq = p.b.rq.as_ref().unwrap();
    poke32(&drv, p.b.pdir.addr(rq.base + 8), 0xffff);
    drv.doorbell(p.b.ctx, uar::QP, p.b.handle | (1 << 31));
    let c = one(&drv, &mut p.cq_b);
    assert_eq!(c.wr_id, 7);
    assert_ne!(
        c.status, 0,
        "receive with num_sge 0xffff completes in error"
    );
    assert_device_healthy(&drv);
}

/// CVE-2018-20125: CREATE_CQ/CREATE_QP with 0 or huge page counts are refused.
#[test]
fn cve_2018_20125_zero_or_huge_page_counts() {
    let _shared = crate::common::shared();
    let (t, drv) = probed_local();
    let pd = drv.create_pd(Ctx::KERNEL).unwrap();
    let good = cq_pdir(&drv, 64);
    for n in [0u32, 1, 0x1_0000, u32::MAX] {
        assert_eq!(
            err_of(create_cq_raw(&drv, 0, good.dir.0, 64, n)),
            err::EINVAL
        );
    }
    let cq = drv.create_cq(Ctx::KERNEL, 16).unwrap();
    let qpd = pages(&drv, 3);
    for (total, send) in [
        (0u16, 0u16),
        (0, 1),
        (3, 0),
        (u16::MAX, 1),
        (u16::MAX, u16::MAX),
        (2, 1),
    ] {
        let mut r = qp_req(pd, cq.handle, &qpd);
        r.total_chunks = total;
        r.send_chunks = send;
        assert_eq!(
            err_of(create_qp_raw(&drv, r)),
            err::EINVAL,
            "{total}/{send}"
        );
    }
    assert_eq!(objects(&t)[3], 0);
    assert_device_healthy(&drv);
}

/// CVE-2018-20126: a QP whose last ring page is bad fails midway and leaks nothing (the CQ and
/// PD it referenced can still be destroyed).
#[test]
fn cve_2018_20126_ring_creation_failing_midway_leaks_nothing() {
    let _shared = crate::common::shared();
    let (t, drv) = probed_local();
    let pd = drv.create_pd(Ctx::KERNEL).unwrap();
    let cq = drv.create_cq(Ctx::KERNEL, 16).unwrap();
    let qpd = pages(&drv, 3);
    drv.mem()
        .write_obj(OUTSIDE, qpd.tables[0].unchecked_add(16))
        .unwrap();
    for _ in 0..10 {
        assert_eq!(
            err_of(create_qp_raw(&drv, qp_req(pd, cq.handle, &qpd))),
            err::EFAULT
        );
    }
    let o = objects(&t);
    assert_eq!((o[0], o[2], o[3]), (1, 1, 0));
    drv.destroy_cq(cq).expect("no reference leaked on the CQ");
    drv.destroy_pd(pd).expect("no reference leaked on the PD");
    assert_eq!(objects(&t), [0; 6]);
    assert_device_healthy(&drv);
}

/// CVE-2018-20191: BAR2 reads are answered with all-ones.
#[test]
fn cve_2018_20191_uar_reads_return_all_ones() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed_local();
    let tr = drv.transport();
    for off in [
        0u64,
        4,
        8,
        0xffc,
        0x1000,
        0x1004,
        511 * 4096 + 8,
        2 << 20,
        u64::MAX - 3,
    ] {
        for len in 1..=8usize {
            let mut b = [0u8; 8];
            tr.read(Region::Bar(2), off, &mut b[..len]);
            assert!(
                b[..len].iter().all(|&x| x == 0xff),
                "BAR2 read at {off:#x}/{len}"
            );
        }
    }
    assert_device_healthy(&drv);
}

/// CVE-2018-20216: ring indices outside [0, 2N) in SQ, RQ and CQ state: no loop, QP_FATAL for
/// the QP, and the device keeps serving other QPs.
#[test]
fn cve_2018_20216_ring_indices_out_of_range() {
    let _shared = crate::common::shared();
    let (t, drv) = probed_local();
    let _ = drv.events();
    for (state_off, bell, bad) in [
        (0u64, 1u32 << 30, 16u32), // SQ prod_tail = 2N
        (0, 1 << 30, u32::MAX),
        (0, 1 << 30, 12),          // valid bits, but claims 12 > N entries
        (8, 1 << 31, 0x8000_0000), // RQ prod_tail
    ] {
        let mut p = rc_pair(&drv, MAC, 8, 1);
        let m = drv.reg_mr(p.pd, 0x1000, 4096, ALL_ACCESS).unwrap();
        assert!(drv.push_send(&mut p.a, &send(1, m.sge(0, 8))));
        poke32(&drv, p.a.pdir.pages[0].unchecked_add(state_off), bad);
        drv.doorbell(p.a.ctx, uar::QP, p.a.handle | bell);
        let ev = wait_event(&drv, 1, p.a.handle);
        assert!(
            ev.contains(&(1, p.a.handle)),
            "QP_FATAL for bad index {bad:#x} @{state_off}: {ev:?}"
        );
        // Ringing again must not loop either.
        drv.doorbell(p.a.ctx, uar::QP, p.a.handle | bell);
        // The other QP of the pair still works (b → a uses a's RQ, which may be broken: send
        // b → b's own CQ only needs b's SQ and a receiver; use a fresh pair in the health check).
        assert_device_healthy(&drv);
    }
    // SQ cons_head is the device's: a scribbled copy is ignored (overwritten on the next step).
    let mut p = rc_pair(&drv, MAC, 8, 1);
    let m = drv.reg_mr(p.pd, 0x1000, 4096, ALL_ACCESS).unwrap();
    poke32(&drv, p.a.pdir.pages[0].unchecked_add(4), 0x40);
    assert!(drv.post_recv(&mut p.b, 1, &[m.sge(0, 64)]));
    assert!(drv.post_send(&mut p.a, &send(1, m.sge(0, 8))));
    assert_eq!(one(&drv, &mut p.cq_a).status, 0);
    assert_eq!(peek32(&drv, p.a.pdir.pages[0].unchecked_add(4)), 1);
    // CQ cons_head scribbled: completions into that CQ are dropped, never looped on.
    let mut p = rc_pair(&drv, MAC, 8, 1);
    let m = drv.reg_mr(p.pd, 0x1000, 4096, ALL_ACCESS).unwrap();
    poke32(&drv, p.cq_b.pdir.pages[0].unchecked_add(12), 0xdead_beef);
    let before = stats(&t).cqes;
    assert!(drv.post_recv(&mut p.b, 1, &[m.sge(0, 64)]));
    assert!(drv.post_send(&mut p.a, &send(1, m.sge(0, 8))));
    assert_eq!(one(&drv, &mut p.cq_a).status, 0);
    std::thread::sleep(SHORT);
    assert_eq!(
        peek32(&drv, p.cq_b.pdir.pages[0].unchecked_add(8)),
        0,
        "no CQE into a broken CQ"
    );
    assert_eq!(stats(&t).cqes, before + 1);
    assert_device_healthy(&drv);
}

/// CVE-2021-3582 and hazard 6 (first half): MR length vs nchunks, computed in 64 bits.
#[test]
fn cve_2021_3582_mr_length_exceeds_nchunks() {
    let _shared = crate::common::shared();
    let (t, drv) = probed_local();
    let pd = drv.create_pd(Ctx::KERNEL).unwrap();
    let pdir = pages(&drv, 2);
    let mr = |start: u64, length: u64, nchunks: u32| {
        raw(
            &drv,
            cmd::CREATE_MR,
            CmdCreateMr {
                start,
                length,
                pdir_dma: pdir.dir.0,
                pd_handle: pd,
                access_flags: ALL_ACCESS,
                flags: 0,
                nchunks,
                ..Default::default()
            },
        )
    };
    for (start, length, nchunks) in [
        (0u64, 8192u64, 1u32),    // length exceeds the pages
        (0, 4096, 2),             // nchunks exceeds the length
        (0, 4096, 0x10_0001),     // 0x100001·4096 wraps to 4096 in 32 bits
        (0, 0, 0),                // empty
        (0, 4096, 0),             // no pages
        (4095, 2, 1),             // crosses a page: needs 2
        (u64::MAX - 10, 4096, 2), // wraps the address space
    ] {
        assert_eq!(
            err_of(mr(start, length, nchunks)),
            err::EINVAL,
            "{start:#x}+{length}/{nchunks}"
        );
    }
    mr(4095, 2, 2).expect("exact page count is accepted");
    assert_eq!(objects(&t)[1], 1);
    assert_device_healthy(&drv);
}

/// CVE-2021-3607 and CVE-2023-1544: DSR ring num_pages 0, 1, 513 and u32::MAX are refused
/// (no DSR, ACTIVATE and REQUEST fail), and a proper probe works afterwards.
#[test]
fn cve_2021_3607_and_2023_1544_dsr_ring_num_pages() {
    let _shared = crate::common::shared();
    let t = device();
    for n in [0u32, 1, 513, u32::MAX] {
        for which in 0..2 {
            let (e1, e2) = manual_probe(&t, |d, _| {
                if which == 0 {
                    d.async_ring_pages.num_pages = n;
                } else {
                    d.cq_ring_pages.num_pages = n;
                }
            });
            assert_ne!(e1, 0, "ACTIVATE with num_pages {n}");
            assert_ne!(e2, 0, "REQUEST with num_pages {n}");
        }
    }
    // 512 pages (one full page table) is the most accepted.
    let (e1, e2) = manual_probe(&t, |d, alloc| {
        let mem = t.mem();
        let p = GuestPdir::build(alloc, mem, (0..512).map(|_| alloc.page(mem)).collect());
        d.async_ring_pages = RingPages {
            num_pages: 512,
            reserved: 0,
            pdir_dma: p.dir.0,
        };
    });
    assert_eq!((e1, e2), (0, 0), "512 pages accepted");
    let drv = probe(&t);
    assert_device_healthy(&drv);
}

/// CVE-2021-3608: a DSR ring or CQ whose page table has an unmappable entry midway.
#[test]
fn cve_2021_3608_ring_page_unmappable_midway() {
    let _shared = crate::common::shared();
    let t = device();
    for bad in [0u64, OUTSIDE, 0x1234] {
        let (e1, e2) = manual_probe(&t, |d, _| {
            let mem = t.mem();
            let table: u64 = mem
                .read_obj(GuestAddress(d.cq_ring_pages.pdir_dma))
                .unwrap();
            mem.write_obj(bad, GuestAddress(table + 16)).unwrap();
        });
        assert_ne!(e1, 0);
        assert_ne!(e2, 0);
    }
    let drv = probe(&t);
    let p = cq_pdir(&drv, 64);
    drv.mem()
        .write_obj(OUTSIDE, p.tables[0].unchecked_add(8))
        .unwrap();
    assert_eq!(err_of(create_cq_raw(&drv, 0, p.dir.0, 64, 2)), err::EFAULT);
    assert_eq!(objects(&t)[2], 0);
    assert_device_healthy(&drv);
}

/// CVE-2022-1050: REQUEST before any DSR, and after a DSR load failed.
#[test]
fn cve_2022_1050_request_without_dsr() {
    let _shared = crate::common::shared();
    let t = device();
    let tr: &dyn Transport = &*t;
    pci_enable(tr);
    let req = |tr: &dyn Transport| {
        tr.write(Region::Bar(1), offset::REQUEST, &0u32.to_le_bytes());
        let mut b = [0u8; 4];
        tr.read(Region::Bar(1), offset::ERR, &mut b);
        u32::from_le_bytes(b)
    };
    assert_ne!(req(tr), 0, "REQUEST before a DSR");
    // A DSR outside guest RAM fails to load; REQUEST still fails.
    tr.write(Region::Bar(1), offset::DSRLOW, &0u32.to_le_bytes());
    tr.write(Region::Bar(1), offset::DSRHIGH, &0x100u32.to_le_bytes());
    assert_ne!(req(tr), 0, "REQUEST after a failed DSR load");
    // A DSR that loaded, then a failing reload: the old slots must not be used.
    let drv = probe(&t);
    drv.set_reg(offset::DSRLOW, 0xffff_f000);
    drv.set_reg(offset::DSRHIGH, 0xffff);
    assert_ne!(req(tr), 0, "REQUEST after a failed reload");
    let drv = probe(&t);
    assert_device_healthy(&drv);
}

// ---- the 13 hazards -----------------------------------------------------------------------

/// Hazard 1: SQ/RQ/SRQ WQEs with num_sge > 4 and a UD send whose gid_index does not resolve
/// (incl. 255) complete in error and the ring moves on.
#[test]
fn hazard_01_bad_num_sge_and_gid_index_do_not_loop() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed_local();
    let gid = gid_of(MAC);
    drv.create_bind(0, gid, 1).unwrap();
    let ctx = drv.create_uc(3).unwrap();
    let pd = drv.create_pd(ctx).unwrap();
    let mut cq = drv.create_cq(ctx, 64).unwrap();
    let mut a = drv
        .create_qp(ctx, QpKind::Ud, pd, &cq, &cq, None, (8, 8, 1, 1), false)
        .unwrap();
    for m in ud_attrs(0x1111) {
        drv.modify_qp(&a, m).unwrap();
    }
    let m = drv.reg_mr(pd, 0x2000, 4096, ALL_ACCESS).unwrap();
    let qpn = a.qpn;
    let dest = |gid_index| UdAddr {
        remote_qpn: qpn,
        qkey: 0x1111,
        dgid: gid,
        gid_index,
        pd,
        ..Default::default()
    };
    // Each bad WQE completes in error (a UD QP may then flush: reset it as the driver would).
    for (i, gi, nsge) in [
        (1u64, 255u8, None),
        (2, 127, None),
        (3, 5, None),
        (4, 0, Some(5u32)),
    ] {
        let mut w = SendWqe {
            ud: Some(dest(gi)),
            ..send(i, m.sge(0, 16))
        };
        w.num_sge_override = nsge;
        assert!(drv.post_send(&mut a, &w));
        let c = one(&drv, &mut cq);
        assert_eq!(c.wr_id, i);
        assert_ne!(c.status, 0, "gid_index {gi} / num_sge {nsge:?}");
        drv.reset_qp(&mut a).unwrap();
        for m in ud_attrs(0x1111) {
            drv.modify_qp(&a, m).unwrap();
        }
        let _ = drv.wait_cqes(&mut cq, 64, Duration::from_millis(20));
    }
    // The ring moved on: a good send and its receive complete.
    assert!(drv.post_recv(&mut a, 50, &[m.sge(2048, 1024)]));
    assert!(drv.post_send(
        &mut a,
        &SendWqe {
            ud: Some(dest(0)),
            ..send(10, m.sge(0, 16))
        }
    ));
    let got = drv.wait_cqes(&mut cq, 2, WAIT);
    assert_eq!(got.len(), 2, "send and its receive complete: {got:?}");
    assert!(got.iter().all(|c| c.status == 0), "{got:?}");
    // SRQ receive with num_sge 5.
    let mut srq = drv.create_srq(ctx, pd, 8, 1, 0).unwrap();
    let mut cq2 = drv.create_cq(ctx, 16).unwrap();
    let _q = drv
        .create_qp(
            ctx,
            QpKind::Rc,
            pd,
            &cq2,
            &cq2,
            Some(&srq),
            (4, 0, 1, 1),
            false,
        )
        .unwrap();
    assert!(drv.post_srq_recv(&mut srq, 1, &[m.sge(0, 16)]));
    poke32(&drv, srq.pdir.addr(srq.rq.base + 8), 5);
    drv.doorbell(ctx, uar::SRQ, srq.handle | (1 << 30));
    std::thread::sleep(SHORT);
    let _ = drv.wait_cqes(&mut cq2, 1, SHORT);
    assert_device_healthy(&drv);
}

/// Hazard 2: ring sizes that are 0, not a power of two, or larger than the pages supplied.
#[test]
fn hazard_02_ring_sizes() {
    let _shared = crate::common::shared();
    let (t, drv) = probed_local();
    let ctx = drv.create_uc(5).unwrap();
    let pd = drv.create_pd(ctx).unwrap();
    let p = cq_pdir(&drv, 64);
    for (cqe, n) in [
        (0u32, 2u32),
        (3, 2),
        (48, 2),
        (128, 2),
        (1 << 20, 2),
        (1 << 31, 2),
    ] {
        assert_eq!(
            err_of(create_cq_raw(&drv, ctx.handle, p.dir.0, cqe, n)),
            err::EINVAL,
            "cqe {cqe}"
        );
    }
    let cq = drv.create_cq(ctx, 16).unwrap();
    let qpd = pages(&drv, 3);
    for (s, r) in [
        (0u32, 4u32),
        (3, 4),
        (4, 0),
        (4, 6),
        (64, 4),
        (4, 256),
        (1 << 20, 4),
        (u32::MAX, 4),
    ] {
        let mut q = qp_req(pd, cq.handle, &qpd);
        q.max_send_wr = s;
        q.max_recv_wr = r;
        assert_eq!(err_of(create_qp_raw(&drv, q)), err::EINVAL, "wr {s}/{r}");
    }
    for (wr, n) in [(0u32, 2u32), (3, 2), (1024, 2)] {
        let r = raw(
            &drv,
            cmd::CREATE_SRQ,
            CmdCreateSrq {
                pdir_dma: p.dir.0,
                pd_handle: pd,
                nchunks: n,
                attrs: SrqAttr {
                    max_wr: wr,
                    max_sge: 1,
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        assert_eq!(err_of(r), err::EINVAL, "srq wr {wr}");
    }
    let o = objects(&t);
    assert_eq!((o[3], o[4]), (0, 0));
    assert_device_healthy(&drv);
}

/// Hazard 3: a WQE in the last slot of a page, with num_sge above the QP's max_send_sge (the
/// SGEs would cross the page): error CQE; a good WQE in the last slot works.
#[test]
fn hazard_03_wqe_in_last_slot_of_a_page() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed_local();
    // max_send_sge 1 → 128-byte WQEs, 32 per page; depth 32 = exactly one page.
    let mut p = rc_pair(&drv, MAC, 32, 1);
    let m = drv.reg_mr(p.pd, 0x3000, 8192, ALL_ACCESS).unwrap();
    for i in 0..32u64 {
        assert!(drv.post_recv(&mut p.b, i, &[m.sge(4096, 64)]));
    }
    for i in 0..31u64 {
        assert!(drv.post_send(&mut p.a, &send(i, m.sge(0, 8))));
    }
    assert_eq!(drv.wait_cqes(&mut p.cq_a, 31, WAIT).len(), 31);
    let mut w = send(31, m.sge(0, 8));
    w.num_sge_override = Some(4);
    assert!(
        drv.post_send(&mut p.a, &w),
        "slot 31 is the last of the page"
    );
    let c = one(&drv, &mut p.cq_a);
    assert_eq!(c.wr_id, 31);
    assert_ne!(c.status, 0, "4 SGEs > max_send_sge 1");
    // A good WQE in the last slot of a page: fresh pair, 32 sends.
    let mut q = rc_pair(&drv, MAC, 32, 1);
    let m = drv.reg_mr(q.pd, 0x3000, 8192, ALL_ACCESS).unwrap();
    for i in 0..32u64 {
        assert!(drv.post_recv(&mut q.b, i, &[m.sge(4096, 64)]));
        assert!(drv.post_send(&mut q.a, &send(i, m.sge(0, 8))));
    }
    let got = drv.wait_cqes(&mut q.cq_a, 32, WAIT);
    assert_eq!(got.len(), 32);
    assert!(got.iter().all(|c| c.status == 0));
    assert_device_healthy(&drv);
}

/// Hazard 4: huge max_send_sge / max_recv_sge / SRQ max_sge at create time.
#[test]
fn hazard_04_huge_sge_counts() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed_local();
    let pd = drv.create_pd(Ctx::KERNEL).unwrap();
    let cq = drv.create_cq(Ctx::KERNEL, 16).unwrap();
    let qpd = pages(&drv, 3);
    let max = drv.caps.max_sge;
    for n in [
        max + 1,
        253,
        255,
        0x0fff_fffb,
        0x1000_0000,
        u32::MAX / 16,
        u32::MAX,
    ] {
        let mut q = qp_req(pd, cq.handle, &qpd);
        q.max_send_sge = n;
        assert_eq!(err_of(create_qp_raw(&drv, q)), err::EINVAL, "send sge {n}");
        let mut q = qp_req(pd, cq.handle, &qpd);
        q.max_recv_sge = n;
        assert_eq!(err_of(create_qp_raw(&drv, q)), err::EINVAL, "recv sge {n}");
        let r = raw(
            &drv,
            cmd::CREATE_SRQ,
            CmdCreateSrq {
                pdir_dma: qpd.dir.0,
                pd_handle: pd,
                nchunks: 2,
                attrs: SrqAttr {
                    max_wr: 4,
                    max_sge: n,
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        assert_ne!(err_of(r), 0);
    }
    assert_device_healthy(&drv);
}

/// Hazard 5 and the pdir checklist: entries 0, unaligned, outside RAM; directory page outside
/// RAM or 0; a directory entry 0.
#[test]
fn hazard_05_page_directory_entries() {
    let _shared = crate::common::shared();
    let (t, drv) = probed_local();
    let mem = drv.mem();
    for (what, bad) in [
        ("zero", 0u64),
        ("unaligned", 0x10_0800),
        ("outside", OUTSIDE),
    ] {
        for idx in [0u64, 1] {
            let p = cq_pdir(&drv, 64);
            mem.write_obj(bad, p.tables[0].unchecked_add(8 * idx))
                .unwrap();
            assert_eq!(
                err_of(create_cq_raw(&drv, 0, p.dir.0, 64, 2)),
                err::EFAULT,
                "{what} page {idx}"
            );
        }
        let p = cq_pdir(&drv, 64);
        mem.write_obj(bad, p.dir).unwrap();
        assert_eq!(
            err_of(create_cq_raw(&drv, 0, p.dir.0, 64, 2)),
            err::EFAULT,
            "{what} table"
        );
        assert_eq!(
            err_of(create_cq_raw(&drv, 0, bad, 64, 2)),
            err::EFAULT,
            "{what} directory"
        );
    }
    // The last page of RAM is fine; one byte past it is not.
    assert_eq!(objects(&t)[2], 0);
    assert_device_healthy(&drv);
}

/// Hazard 6: CREATE_MR with nchunks > 262144 (past the directory page) and the 32-bit overflow.
#[test]
fn hazard_06_mr_nchunks_beyond_directory() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed_local();
    let pd = drv.create_pd(Ctx::KERNEL).unwrap();
    let pdir = pages(&drv, 1);
    for (length, nchunks) in [
        (262_145u64 * 4096, 262_145u32),
        (u64::from(u32::MAX) * 4096, u32::MAX),
        (4096, 0x10_0001),
        (4096, 0x8000_0001),
    ] {
        let r = raw(
            &drv,
            cmd::CREATE_MR,
            CmdCreateMr {
                start: 0,
                length,
                pdir_dma: pdir.dir.0,
                pd_handle: pd,
                access_flags: 1,
                nchunks,
                ..Default::default()
            },
        );
        assert_eq!(err_of(r), err::EINVAL, "{length}/{nchunks}");
    }
    assert_device_healthy(&drv);
}

/// Hazard 7 and 13: exhaust every table (PD, MR, CQ, QP, SRQ, UC); handles stay below the
/// limits the driver indexes with; free everything and reuse.
#[test]
fn hazard_07_and_13_exhaust_every_table_then_reuse() {
    let _shared = crate::common::shared();
    let (t, drv) = probed_local();
    let caps = &drv.caps;
    // UCs.
    let mut ucs = Vec::new();
    for u in 1..caps.max_uar {
        match drv.create_uc(u) {
            Ok(c) => ucs.push(c),
            Err(e) => panic!("UC {u}: {e}"),
        }
    }
    assert_eq!(err_of(drv.create_uc(caps.max_uar)), err::EINVAL);
    assert!(ucs.iter().all(|c| c.handle > 0 && c.handle < caps.max_uar));
    for c in ucs.drain(..) {
        drv.destroy_uc(c).unwrap();
    }
    // PDs.
    let mut pds = Vec::new();
    let e = loop {
        match drv.create_pd(Ctx::KERNEL) {
            Ok(h) => pds.push(h),
            Err(e) => break e,
        }
        assert!(pds.len() <= caps.max_pd as usize, "PD table unbounded");
    };
    assert_eq!(err_of::<()>(Err(e)), err::ENOMEM);
    assert_eq!(pds.len(), caps.max_pd as usize);
    let pd = pds.pop().unwrap();
    for h in pds.drain(..) {
        drv.destroy_pd(h).unwrap();
    }
    // MRs (DMA MRs need no pages).
    let mut mrs = Vec::new();
    let e = loop {
        match drv.dma_mr(pd) {
            Ok(m) => mrs.push(m),
            Err(e) => break e,
        }
        assert!(mrs.len() <= caps.max_mr as usize, "MR table unbounded");
    };
    assert_eq!(err_of::<()>(Err(e)), err::ENOMEM);
    assert_eq!(mrs.len(), caps.max_mr as usize);
    for m in mrs.drain(..) {
        drv.destroy_mr(m).unwrap();
    }
    // CQs (one page directory shared by all).
    let cqp = cq_pdir(&drv, 16);
    let mut cqs = Vec::new();
    let e = loop {
        match create_cq_raw(&drv, 0, cqp.dir.0, 16, 2) {
            Ok(r) => cqs.push(r.cq_handle),
            Err(e) => break e,
        }
        assert!(cqs.len() <= caps.max_cq as usize, "CQ table unbounded");
    };
    assert_eq!(err_of::<()>(Err(e)), err::ENOMEM);
    assert!(
        cqs.iter().all(|&h| h < caps.max_cq),
        "CQ handles index cq_tbl"
    );
    assert!(cqs.len() + 1 >= caps.max_cq as usize);
    let keep_cq = cqs.pop().unwrap();
    for h in cqs.drain(..) {
        raw(
            &drv,
            cmd::DESTROY_CQ,
            CmdDestroyCq {
                cq_handle: h,
                ..Default::default()
            },
        )
        .map(|_| ())
        .or_else(|e| match e {
            GuestError::Timeout(_) => Ok(()),
            e => Err(e),
        })
        .unwrap();
    }
    // QPs (one page directory shared by all).
    let qpd = pages(&drv, 3);
    let mut qps = Vec::new();
    let e = loop {
        match create_qp_raw(&drv, qp_req(pd, keep_cq, &qpd)) {
            Ok(r) => qps.push(r.qp_handle),
            Err(e) => break e,
        }
        assert!(qps.len() <= caps.max_qp as usize, "QP table unbounded");
    };
    assert_eq!(err_of::<()>(Err(e)), err::ENOMEM);
    assert!(
        qps.iter().all(|&h| h > 0 && h < caps.max_qp),
        "QP handles index qp_tbl"
    );
    assert!(qps.len() + 1 >= caps.max_qp as usize);
    for h in qps.drain(..) {
        drv.cmd_noresp(
            cmd::DESTROY_QP,
            CmdDestroyQp {
                qp_handle: h,
                ..Default::default()
            },
        )
        .unwrap();
    }
    // SRQs.
    let ctx = drv.create_uc(7).unwrap();
    let upd = drv.create_pd(ctx).unwrap();
    let s0 = drv.create_srq(ctx, upd, 16, 1, 0).unwrap();
    let mut srqs = vec![s0.handle];
    let e = loop {
        let r: pvrdma_guest::driver::Result<RespCreateSrq> = drv.cmd(
            cmd::CREATE_SRQ,
            CmdCreateSrq {
                pdir_dma: s0.pdir.dir.0,
                pd_handle: upd,
                nchunks: s0.pdir.pages.len() as u32,
                attrs: SrqAttr {
                    max_wr: 16,
                    max_sge: 1,
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        match r {
            Ok(r) => srqs.push(r.srqn),
            Err(e) => break e,
        }
        assert!(srqs.len() <= caps.max_srq as usize, "SRQ table unbounded");
    };
    assert_eq!(err_of::<()>(Err(e)), err::ENOMEM);
    assert!(srqs.len() + 1 >= caps.max_srq as usize);
    for h in srqs.drain(..) {
        drv.cmd_noresp(
            cmd::DESTROY_SRQ,
            CmdDestroySrq {
                srq_handle: h,
                ..Default::default()
            },
        )
        .unwrap();
    }
    drv.destroy_pd(upd).unwrap();
    drv.destroy_uc(ctx).unwrap();
    drv.cmd_noresp(
        cmd::DESTROY_CQ,
        CmdDestroyCq {
            cq_handle: keep_cq,
            ..Default::default()
        },
    )
    .unwrap();
    drv.destroy_pd(pd).unwrap();
    assert_eq!(objects(&t), [0; 6], "everything freed");
    // Reuse: lowest handles come back.
    let pd = drv.create_pd(Ctx::KERNEL).unwrap();
    assert_eq!(pd, 1);
    drv.destroy_pd(pd).unwrap();
    assert_device_healthy(&drv);
}

/// Hazard 8: DESTROY_PD/CQ/SRQ while in use fail with EBUSY; in order they succeed.
#[test]
fn hazard_08_destroy_in_use_is_ebusy() {
    let _shared = crate::common::shared();
    let (t, drv) = probed_local();
    let ctx = drv.create_uc(9).unwrap();
    let pd = drv.create_pd(ctx).unwrap();
    let cq = drv.create_cq(ctx, 16).unwrap();
    let srq = drv.create_srq(ctx, pd, 16, 1, 0).unwrap();
    let qp = drv
        .create_qp(
            ctx,
            QpKind::Rc,
            pd,
            &cq,
            &cq,
            Some(&srq),
            (4, 0, 1, 1),
            false,
        )
        .unwrap();
    let busy = |code, h: u32| {
        let mut req = [0u8; 24];
        req[16..20].copy_from_slice(&h.to_le_bytes());
        req[8..12].copy_from_slice(&u32::to_le_bytes(code));
        err_of(drv.cmd_raw(&req, false))
    };
    assert_eq!(busy(cmd::DESTROY_PD, pd), err::EBUSY);
    assert_eq!(busy(cmd::DESTROY_CQ, cq.handle), err::EBUSY);
    assert_eq!(busy(cmd::DESTROY_SRQ, srq.handle), err::EBUSY);
    assert_eq!(
        err_of(drv.cmd_noresp(
            cmd::DESTROY_UC,
            CmdDestroyUc {
                ctx_handle: ctx.handle,
                ..Default::default()
            }
        )),
        err::EBUSY
    );
    drv.destroy_qp(qp).unwrap();
    drv.destroy_srq(srq).unwrap();
    drv.destroy_cq(cq).unwrap();
    drv.destroy_pd(pd).unwrap();
    drv.destroy_uc(ctx).unwrap();
    assert_eq!(objects(&t), [0; 6]);
    assert_device_healthy(&drv);
}

/// Hazard 9: a second DSRHIGH write while objects exist starts from a clean device.
#[test]
fn hazard_09_dsr_reload_while_objects_exist() {
    let _shared = crate::common::shared();
    let (t, drv) = probed_local();
    let mut p = rc_pair(&drv, MAC, 8, 1);
    let m = drv.reg_mr(p.pd, 0x1000, 4096, ALL_ACCESS).unwrap();
    for i in 0..8 {
        assert!(drv.post_recv(&mut p.b, i, &[m.sge(2048, 64)]));
        assert!(drv.push_send(&mut p.a, &send(i, m.sge(0, 64))));
    }
    drv.ring_sq(&p.a);
    drv.set_reg(offset::DSRHIGH, (drv.dsr.0 >> 32) as u32);
    assert_eq!(objects(&t), [0; 6], "reload frees every object");
    let drv2 = probe(&t);
    assert_device_healthy(&drv2);
}

/// Hazard 9 (second half): CTL RESET with WQEs outstanding, then a fresh probe works.
#[test]
fn hazard_09_reset_with_wqes_outstanding() {
    let _shared = crate::common::shared();
    let (t, drv) = probed_local();
    let mut p = rc_pair(&drv, MAC, 64, 1);
    let m = drv.reg_mr(p.pd, 0x1000, 1 << 20, ALL_ACCESS).unwrap();
    for i in 0..64 {
        assert!(drv.post_recv(&mut p.b, i, &[m.sge(1 << 19, 4096)]));
        assert!(drv.push_send(&mut p.a, &send(i, m.sge(0, 4096))));
    }
    drv.ring_sq(&p.a);
    drv.remove();
    assert_eq!(objects(&t), [0; 6]);
    let drv2 = probe(&t);
    assert_device_healthy(&drv2);
}

/// Hazard 10: GSI sends with odd SGE counts or > 256 bytes, and a GSI receive buffer < 296 B.
#[test]
fn hazard_10_gsi_odd_sges() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed_local();
    let mut k = ib_register(&drv, MAC).unwrap();
    let bufs = drv.alloc.contiguous(drv.mem(), 4);
    let sge = |off: u64, len: u32| WireSge {
        addr: bufs.0 + off,
        length: len,
        lkey: k.dma_mr.lkey,
    };
    let dest = UdAddr {
        remote_qpn: 1,
        qkey: 0x8001_0000,
        dgid: k.gid,
        pd: k.pd,
        ..Default::default()
    };
    let cases: Vec<(u64, Vec<WireSge>, Option<u32>)> = vec![
        (1, vec![sge(0, 40)], None),
        (2, vec![sge(0, 40), sge(64, 256)], Some(3)),
        (3, vec![sge(0, 40), sge(64, 1000)], None),
        (4, vec![], Some(0)),
        (5, vec![sge(0, 4000), sge(4096, 4000)], None),
    ];
    for (i, sges, ov) in cases {
        let w = SendWqe {
            ud: Some(dest),
            sges,
            num_sge_override: ov,
            ..send(i, sge(0, 0))
        };
        assert!(drv.post_send(&mut k.gsi, &w));
    }
    // Every send completes (in error or not), within bounded time; receives may too.
    let got = drv.wait_cqes(&mut k.cq, 5, WAIT);
    assert!(got.len() >= 5, "GSI sends complete: {got:?}");
    let sends: Vec<_> = got.iter().filter(|c| c.opcode < 128).collect();
    assert!(
        sends.iter().any(|c| c.wr_id == 2 && c.status != 0),
        "3 SGEs > max 2: {sends:?}"
    );
    assert_device_healthy(&drv);
}

/// Hazard 11: QUERY_PKEY index 1; QUERY_PORT port 0 and 2.
#[test]
fn hazard_11_query_pkey_and_port_bounds() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed_local();
    assert_eq!(err_of(drv.query_pkey(1, 1)), err::EINVAL);
    assert_eq!(err_of(drv.query_pkey(1, 255)), err::EINVAL);
    assert_eq!(err_of(drv.query_pkey(0, 0)), err::EINVAL);
    assert_eq!(err_of(drv.query_port(0)), err::EINVAL);
    assert_eq!(err_of(drv.query_port(2)), err::EINVAL);
    assert_eq!(err_of(drv.query_port(255)), err::EINVAL);
    assert_eq!(drv.query_pkey(1, 0).unwrap(), 0xffff);
    assert_device_healthy(&drv);
}

/// Hazard 12: command codes 7 (bad args), 21, 0xffffffff; REQUEST with a non-zero value.
#[test]
fn hazard_12_unknown_commands_and_request_values() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed_local();
    let cq = drv.create_cq(Ctx::KERNEL, 16).unwrap();
    let resize = |h: u32, cqe: u32| {
        raw(
            &drv,
            cmd::RESIZE_CQ,
            CmdResizeCq {
                cq_handle: h,
                cqe,
                ..Default::default()
            },
        )
    };
    assert_eq!(err_of(resize(9999, 16)), err::ENOENT);
    assert_eq!(err_of(resize(cq.handle, 3)), err::EINVAL);
    assert_eq!(err_of(resize(cq.handle, 0)), err::EINVAL);
    assert_eq!(
        err_of(resize(cq.handle, 1 << 16)),
        err::EINVAL,
        "more than its pages"
    );
    for code in [cmd::COUNT, 22, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff] {
        let mut req = [0u8; 184];
        req[8..12].copy_from_slice(&code.to_le_bytes());
        req[16..].fill(0xa5);
        assert_ne!(err_of(drv.cmd_raw(&req, false)), 0, "code {code:#x}");
    }
    // REQUEST with a non-zero value: ignored, no interrupt, ERR unchanged.
    drv.query_port(1).unwrap();
    let v0 = drv.irqs(0);
    for v in [1u32, 0x8000_0000, u32::MAX] {
        drv.set_reg(offset::REQUEST, v);
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(drv.irqs(0), v0, "no interrupt for a non-zero REQUEST");
    assert_eq!(drv.reg(offset::ERR), 0);
    assert_device_healthy(&drv);
}

// ---- registers, DSR, doorbells ------------------------------------------------------------

/// Reads of every size 1..8 at every offset of BAR0, BAR1, the first and last UAR pages, and
/// config space are answered; garbage writes everywhere are survived.
#[test]
fn register_accesses_of_every_size_and_offset() {
    let _shared = crate::common::shared();
    let t = device();
    let _drv = probe(&t);
    let tr: &dyn Transport = &*t;
    let regions: [(Region, std::ops::Range<u64>); 5] = [
        (Region::Config, 0..4096 + 16),
        (Region::Bar(0), 0..(16 << 10) + 16),
        (Region::Bar(1), 0..4096 + 16),
        (Region::Bar(2), 0..2 * 4096),
        (Region::Bar(2), (511 << 12)..(513 << 12)),
    ];
    for (region, range) in regions.iter().cloned() {
        for off in range {
            for len in 1..=8usize {
                let mut b = [0u8; 8];
                tr.read(region, off, &mut b[..len]);
                if region == Region::Bar(2) {
                    assert!(b[..len].iter().all(|&x| x == 0xff));
                }
            }
        }
    }
    for bar in [3u8, 4, 5, 6, 200] {
        let mut b = [0u8; 8];
        tr.read(Region::Bar(bar), 0, &mut b);
        tr.write(Region::Bar(bar), 0, &[0xa5; 8]);
    }
    // Garbage writes of every size at every offset (BAR1 too: CTL, DSRHIGH, REQUEST, IMR).
    for (region, range) in [
        (Region::Bar(0), 0..(16u64 << 10) + 8),
        (Region::Bar(1), 0..4096 + 8),
        (Region::Bar(2), 0..2 * 4096),
    ] {
        for off in range {
            for len in 1..=8usize {
                tr.write(region, off, &[0xa5; 8][..len]);
            }
        }
    }
    for off in 0..256u64 + 8 {
        for len in 1..=8usize {
            tr.write(Region::Config, off, &[0xa5; 8][..len]);
        }
    }
    for off in (0..256u64).step_by(4) {
        tr.write(Region::Config, off, &[0; 4]);
    }
    assert!(stats(&t).refused.doorbells > 0);
    let drv = probe(&t);
    assert_device_healthy(&drv);
}

/// BAR2 reads return all-ones (any page, any size), also before probe.
#[test]
fn bar2_reads_return_all_ones() {
    let _shared = crate::common::shared();
    let t = device();
    let tr: &dyn Transport = &*t;
    for off in [0u64, 3, 0x1000, 0x1ff_ffc] {
        let mut b = [0u8; 8];
        tr.read(Region::Bar(2), off, &mut b);
        assert_eq!(b, [0xff; 8]);
    }
    let drv = probe(&t);
    assert_device_healthy(&drv);
}

/// A DSR outside guest RAM, straddling its end, or with slots outside it.
#[test]
fn dsr_outside_guest_ram() {
    let _shared = crate::common::shared();
    let t = device();
    let tr: &dyn Transport = &*t;
    pci_enable(tr);
    let ram = DEFAULT_RAM as u64;
    for addr in [ram, ram - 100, OUTSIDE, !0xfff] {
        tr.write(Region::Bar(1), offset::DSRLOW, &(addr as u32).to_le_bytes());
        tr.write(
            Region::Bar(1),
            offset::DSRHIGH,
            &((addr >> 32) as u32).to_le_bytes(),
        );
        tr.write(Region::Bar(1), offset::CTL, &ctl::ACTIVATE.to_le_bytes());
        let mut b = [0u8; 4];
        tr.read(Region::Bar(1), offset::ERR, &mut b);
        assert_ne!(u32::from_le_bytes(b), 0, "DSR at {addr:#x}");
    }
    for (cmd_slot, resp_slot) in [(OUTSIDE, 0), (0, OUTSIDE), (0x1001, 0), (ram, 0)] {
        let (e1, e2) = manual_probe(&t, |d, _| {
            if cmd_slot != 0 {
                d.cmd_slot_dma = cmd_slot;
            }
            if resp_slot != 0 {
                d.resp_slot_dma = resp_slot;
            }
        });
        assert_ne!(e1, 0);
        assert_ne!(e2, 0);
    }
    for pdir in [0u64, OUTSIDE, 0x1234] {
        let (e1, e2) = manual_probe(&t, |d, _| d.async_ring_pages.pdir_dma = pdir);
        assert_ne!((e1, e2), (0, 0), "async pdir {pdir:#x}");
        let (e1, e2) = manual_probe(&t, |d, _| d.cq_ring_pages.pdir_dma = pdir);
        assert_ne!((e1, e2), (0, 0), "cq pdir {pdir:#x}");
    }
    let drv = probe(&t);
    assert_device_healthy(&drv);
}

/// Doorbells with unknown handles, another context's page, garbage bits and odd sizes are
/// ignored; the right doorbell still works.
#[test]
fn doorbells_unknown_foreign_and_garbage() {
    let _shared = crate::common::shared();
    let (t, drv) = probed_local();
    let mut p = rc_pair(&drv, MAC, 8, 1);
    let m = drv.reg_mr(p.pd, 0x1000, 4096, ALL_ACCESS).unwrap();
    let other = drv.create_uc(200).unwrap();
    let bad0 = stats(&t).refused.doorbells;
    for (ctx, reg, v) in [
        (Ctx::KERNEL, uar::QP, 0x00ff_ffff | (1 << 30)),
        (Ctx::KERNEL, uar::CQ, 999 | (1 << 30)),
        (Ctx::KERNEL, uar::SRQ, 999 | (1 << 30)),
        (p.ctx, uar::QP, p.a.handle),         // no flag
        (p.ctx, uar::SRQ, 1),                 // no RECV bit, no SRQ
        (p.ctx, 0xc, p.a.handle | (1 << 30)), // unknown register
        (p.ctx, 0xffc, u32::MAX),
        (other, uar::QP, p.a.handle | (1 << 30)), // another context's page
        (other, uar::CQ, p.cq_a.handle | (1 << 30)),
        (
            Ctx {
                handle: 0,
                uar: 450,
            },
            uar::QP,
            p.a.handle | (1 << 30),
        ), // unowned page
        (
            Ctx {
                handle: 0,
                uar: 4096,
            },
            uar::QP,
            p.a.handle | (1 << 30),
        ), // past BAR2
    ] {
        drv.doorbell(ctx, reg, v);
    }
    let tr = drv.transport();
    let page = u64::from(p.ctx.uar) * 4096;
    tr.write(Region::Bar(2), page + 1, &[0xff, 0xff]);
    tr.write(Region::Bar(2), page, &[0x01]);
    tr.write(Region::Bar(2), page + 2, &[0; 2]);
    assert!(stats(&t).refused.doorbells >= bad0 + 13, "{:?}", stats(&t));
    // The QP rung on another context's page did not send.
    assert!(drv.post_recv(&mut p.b, 1, &[m.sge(2048, 64)]));
    assert!(drv.push_send(&mut p.a, &send(5, m.sge(0, 8))));
    drv.doorbell(other, uar::QP, p.a.handle | (1 << 30));
    assert!(
        drv.wait_cqes(&mut p.cq_a, 1, SHORT).is_empty(),
        "foreign doorbell ignored"
    );
    // 8-byte write: QP doorbell + CQ doorbell at once, garbage high bits.
    let v = u64::from(p.a.handle | (1 << 30)) | (u64::from(p.cq_a.handle | (1 << 31)) << 32);
    tr.write(Region::Bar(2), page, &v.to_le_bytes());
    assert_eq!(one(&drv, &mut p.cq_a).wr_id, 5);
    drv.doorbell(p.ctx, uar::QP, p.a.handle | (3 << 30) | (0x3f << 24));
    assert_device_healthy(&drv);
}

/// Arming a destroyed CQ is ignored (no notification, no crash).
#[test]
fn cq_arm_of_destroyed_cq() {
    let _shared = crate::common::shared();
    let (t, drv) = probed_local();
    let cq = drv.create_cq(Ctx::KERNEL, 16).unwrap();
    let (h, ctx) = (cq.handle, cq.ctx);
    drv.destroy_cq(cq).unwrap();
    let bad0 = stats(&t).refused.doorbells;
    for bits in [1u32 << 29, 1 << 30, 1 << 31, 7 << 29] {
        drv.doorbell(ctx, uar::CQ, h | bits);
    }
    assert_eq!(stats(&t).refused.doorbells, bad0 + 4);
    let v2 = drv.irqs(2);
    assert_device_healthy(&drv);
    assert!(!drv.cq_notifications().contains(&h) || drv.irqs(2) > v2);
}

/// CQ overflow: CQ_ERR (type 0, info = CQ handle), and the device keeps serving.
#[test]
fn cq_overflow_posts_cq_err() {
    let _shared = crate::common::shared();
    let (t, drv) = probed_local();
    let mut p = rc_pair(&drv, MAC, 16, 1);
    let m = drv.reg_mr(p.pd, 0x1000, 4096, ALL_ACCESS).unwrap();
    let small = drv.create_cq(p.ctx, 4).unwrap();
    let mut a = drv
        .create_qp(
            p.ctx,
            QpKind::Rc,
            p.pd,
            &small,
            &small,
            None,
            (16, 16, 1, 1),
            false,
        )
        .unwrap();
    let mut b = drv
        .create_qp(
            p.ctx,
            QpKind::Rc,
            p.pd,
            &p.cq_b,
            &p.cq_b,
            None,
            (16, 16, 1, 1),
            false,
        )
        .unwrap();
    for mm in rc_connect_attrs(b.qpn, p.gid, ALL_ACCESS) {
        drv.modify_qp(&a, mm).unwrap();
    }
    for mm in rc_connect_attrs(a.qpn, p.gid, ALL_ACCESS) {
        drv.modify_qp(&b, mm).unwrap();
    }
    let _ = drv.events();
    for i in 0..12 {
        assert!(drv.post_recv(&mut b, i, &[m.sge(2048, 64)]));
        assert!(drv.post_send(&mut a, &send(i, m.sge(0, 8))));
    }
    assert_eq!(drv.wait_cqes(&mut p.cq_b, 12, WAIT).len(), 12);
    let ev = wait_event(&drv, 0, small.handle);
    assert!(
        ev.contains(&(0, small.handle)),
        "CQ_ERR with the CQ handle: {ev:?}"
    );
    assert!(stats(&t).cq_overflows > 0);
    assert_device_healthy(&drv);
}

/// A QP destroyed while its completions are in flight never yields a CQE naming it afterwards,
/// even when its handle is reused at once.
#[test]
fn destroyed_qp_completions_never_surface() {
    let _shared = crate::common::shared();
    let (t, drv) = probed_local();
    for _ in 0..3 {
        let mut p = rc_pair(&drv, MAC, 64, 1);
        let m = drv.reg_mr(p.pd, 0x1000, 1 << 20, ALL_ACCESS).unwrap();
        for i in 0..64 {
            assert!(drv.post_recv(&mut p.b, i, &[m.sge(1 << 19, 8192)]));
            assert!(drv.push_send(&mut p.a, &send(i, m.sge(0, 8192))));
        }
        drv.ring_sq(&p.a);
        let ah = p.a.handle;
        drv.destroy_qp(p.a).unwrap();
        let tail_at_destroy = peek32(&drv, p.cq_a.pdir.pages[0].unchecked_add(8));
        // Reuse the handle immediately on the same CQ.
        let a2 = drv
            .create_qp(
                p.ctx,
                QpKind::Rc,
                p.pd,
                &p.cq_a,
                &p.cq_a,
                None,
                (4, 4, 1, 1),
                false,
            )
            .unwrap();
        assert_eq!(a2.handle, ah, "lowest handle reused");
        std::thread::sleep(SHORT);
        let tail = peek32(&drv, p.cq_a.pdir.pages[0].unchecked_add(8));
        assert_eq!(tail, tail_at_destroy, "no CQE written after DESTROY_QP");
        let _ = drv.wait_cqes(&mut p.cq_b, 64, SHORT);
        drv.destroy_qp(a2).unwrap();
        drv.destroy_qp(p.b).unwrap();
    }
    let _ = stats(&t);
    assert_device_healthy(&drv);
}

// ---- lifecycle and DSR rings ---------------------------------------------------------------

/// CTL RESET, then a full re-probe (new DSR) and ib registration, twice.
#[test]
fn reset_then_reprobe_and_ib_register_twice() {
    let _shared = crate::common::shared();
    let t = device();
    let drv = probe(&t);
    ib_register(&drv, MAC).unwrap();
    for round in 0..2 {
        drv.remove();
        assert_eq!(objects(&t), [0; 6], "round {round}");
        let drv = probe(&t);
        assert_eq!(
            drv.events(),
            vec![(9, 1)],
            "PORT_ACTIVE after re-activation"
        );
        let k = ib_register(&drv, MAC).expect("ib_register after reset");
        assert_eq!(k.gsi.qpn, 1);
        assert_device_healthy(&drv);
        drv.remove();
    }
    let drv = probe(&t);
    assert_device_healthy(&drv);
    // Transport-level reset too.
    t.reset();
    let drv = probe(&t);
    ib_register(&drv, MAC).unwrap();
    assert_device_healthy(&drv);
}

/// A QP whose SQ prod_tail is invalid: every SQ doorbell posts one QP_FATAL event.
pub(crate) fn fatal_qp(drv: &Driver) -> Qp {
    let ctx = fresh_ctx(drv);
    let pd = drv.create_pd(ctx).unwrap();
    let cq = drv.create_cq(ctx, 16).unwrap();
    let qp = drv
        .create_qp(ctx, QpKind::Rc, pd, &cq, &cq, None, (4, 4, 1, 1), false)
        .unwrap();
    poke32(drv, qp.pdir.pages[0], 0xffff_ffff);
    std::mem::forget(cq);
    qp
}

/// More than 1536 async events and 3072 CQ notifications pass through the DSR rings with the
/// driver's index formulas; none is lost while the guest keeps up.
#[test]
fn dsr_rings_wrap_without_loss_when_consumed() {
    let _shared = crate::common::shared();
    let (_t, drv) = probed_local();
    assert_eq!(drv.events(), vec![(9, 1)]);
    let qp = fatal_qp(&drv);
    let mut got = 0usize;
    for i in 0..1700 {
        drv.ring_sq(&qp);
        // Consume as the driver does; keep the backlog small.
        let deadline = Instant::now() + WAIT;
        while got <= i {
            let ev = drv.events();
            assert!(ev.iter().all(|&e| e == (1, qp.handle)), "{ev:?}");
            got += ev.len();
            if got <= i {
                assert!(Instant::now() < deadline, "event {i} lost");
                std::thread::yield_now();
            }
        }
    }
    assert_eq!(got, 1700);
    // CQ notifications: arm + one completion, 3100 times.
    let mut p = rc_pair(&drv, MAC, 16, 1);
    let m = drv.reg_mr(p.pd, 0x1000, 4096, ALL_ACCESS).unwrap();
    let mut notes = 0usize;
    for i in 0..3100u64 {
        drv.arm_cq(&p.cq_b, false);
        assert!(drv.post_recv(&mut p.b, i, &[m.sge(2048, 64)]));
        let mut w = send(i, m.sge(0, 8));
        w.flags = if i % 16 == 15 { 2 } else { 0 };
        assert!(drv.post_send(&mut p.a, &w));
        assert_eq!(one(&drv, &mut p.cq_b).wr_id, i);
        if i % 16 == 15 {
            assert_eq!(one(&drv, &mut p.cq_a).wr_id, i);
        }
        let n = drv.cq_notifications();
        assert!(n.iter().all(|&h| h == p.cq_b.handle));
        notes += n.len();
    }
    let deadline = Instant::now() + WAIT;
    while notes < 3100 && Instant::now() < deadline {
        notes += drv.cq_notifications().len();
    }
    assert_eq!(notes, 3100, "every CQ notification arrives");
    assert_device_healthy(&drv);
}

/// When the guest does not consume, the device caps outstanding entries: 512 EQEs and 1024
/// CQNEs (the driver cannot detect an overrun of its non-power-of-two rings).
#[test]
fn dsr_rings_cap_outstanding_entries() {
    let _shared = crate::common::shared();
    let (t, drv) = probed_local();
    let qp = fatal_qp(&drv);
    // Doorbells rung while a drain runs coalesce, so wait for each event before the next ring.
    for i in 0..600u64 {
        drv.ring_sq(&qp);
        let want = (2 + i).min(512); // PORT_ACTIVE is still outstanding too
        let deadline = Instant::now() + WAIT;
        while stats(&t).events < want && Instant::now() < deadline {
            std::thread::yield_now();
        }
    }
    let mut p = rc_pair(&drv, MAC, 16, 1);
    let m = drv.reg_mr(p.pd, 0x1000, 4096, ALL_ACCESS).unwrap();
    for i in 0..1200u64 {
        drv.arm_cq(&p.cq_b, false);
        assert!(drv.post_recv(&mut p.b, i, &[m.sge(2048, 64)]));
        let mut w = send(i, m.sge(0, 8));
        w.flags = if i % 16 == 15 { 2 } else { 0 };
        assert!(drv.post_send(&mut p.a, &w));
        assert_eq!(one(&drv, &mut p.cq_b).wr_id, i);
        if i % 16 == 15 {
            one(&drv, &mut p.cq_a);
        }
    }
    std::thread::sleep(SHORT);
    let _ = stats(&t);
    let ev = drv.events();
    assert_eq!(ev.len(), 512, "outstanding EQEs capped at 512");
    let n = drv.cq_notifications();
    assert_eq!(n.len(), 1024, "outstanding CQNEs capped at 1024");
    assert!(n.iter().all(|&h| h == p.cq_b.handle));
    // After consuming, new entries flow again.
    drv.ring_sq(&qp);
    let ev = wait_event(&drv, 1, qp.handle);
    assert!(ev.contains(&(1, qp.handle)));
    assert_device_healthy(&drv);
}

/// A doorbell written past the end of BAR2 (offset 2^44 + x) must not alias the kernel's UAR
/// page 0; zero-length accesses change nothing.
#[test]
fn uar_offsets_past_bar2_do_not_alias_page_0() {
    let _shared = crate::common::shared();
    let (t, drv) = probed_local();
    let gid = gid_of(MAC);
    drv.create_bind(0, gid, 1).unwrap();
    let pd = drv.create_pd(Ctx::KERNEL).unwrap();
    let mut cq_a = drv.create_cq(Ctx::KERNEL, 16).unwrap();
    let cq_b = drv.create_cq(Ctx::KERNEL, 16).unwrap();
    let caps = (4, 4, 1, 1);
    let mut a = drv
        .create_qp(Ctx::KERNEL, QpKind::Rc, pd, &cq_a, &cq_a, None, caps, false)
        .unwrap();
    let mut b = drv
        .create_qp(Ctx::KERNEL, QpKind::Rc, pd, &cq_b, &cq_b, None, caps, false)
        .unwrap();
    for m in rc_connect_attrs(b.qpn, gid, ALL_ACCESS) {
        drv.modify_qp(&a, m).unwrap();
    }
    for m in rc_connect_attrs(a.qpn, gid, ALL_ACCESS) {
        drv.modify_qp(&b, m).unwrap();
    }
    let m = drv.reg_mr(pd, 0x1000, 4096, ALL_ACCESS).unwrap();
    assert!(drv.post_recv(&mut b, 1, &[m.sge(2048, 64)]));
    assert!(drv.push_send(&mut a, &send(1, m.sge(0, 8))));
    let tr = drv.transport();
    let bad0 = stats(&t).refused.doorbells;
    let v = (a.handle | (1 << 30)).to_le_bytes();
    for off in [1u64 << 44, (1 << 44) + (1 << 32) * 4096, u64::MAX - 3] {
        tr.write(Region::Bar(2), off, &v);
    }
    tr.write(Region::Bar(2), 0, &[]);
    assert!(
        drv.wait_cqes(&mut cq_a, 1, SHORT).is_empty(),
        "aliased doorbell rang page 0"
    );
    assert_eq!(stats(&t).refused.doorbells, bad0 + 3);
    drv.ring_sq(&a);
    assert_eq!(one(&drv, &mut cq_a).status, 0);
    // Zero-length config write: the command register keeps MEM | bus master.
    tr.write(Region::Config, 4, &[]);
    let mut c = [0u8; 2];
    tr.read(Region::Config, 4, &mut c);
    assert_eq!(c[0] & 0x6, 0x6);
    assert_device_healthy(&drv);
}

/// RssAnon of this process, in KiB.
fn rss_anon_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Host memory a guest makes the device hold is bounded by the device's budget, not by what
/// the guest's RAM and limits allow: QPs with 8,192-deep receive queues of 16-SGE receives over
/// one MR page (each such receive costs the host ~300 bytes; 1,023 such QPs would cost 2.5 GiB)
/// are refused with ENOMEM once their reservations reach the budget, and filling every queue the
/// guest did get grows the process by less than the budget.
#[test]
fn a_guest_holds_no_more_host_memory_than_the_devices_budget() {
    let _shared = crate::common::shared();
    const BUDGET: u64 = 48 << 20;
    let cfg = DeviceConfig {
        mac: MAC,
        max_host_mem: BUDGET,
        ..DeviceConfig::default()
    };
    let t = Arc::new(InProcess::new(cfg, DEFAULT_RAM, &Fabric::new()));
    let drv = probe(&t);
    let ctx = fresh_ctx(&drv);
    let pd = drv.create_pd(ctx).unwrap();
    let cq = drv.create_cq(ctx, 64).unwrap();
    let mr = drv.reg_mr(pd, 0x7000_0000, 4096, 1).unwrap();
    let sges: Vec<_> = (0..16).map(|i| mr.sge(i * 64, 64)).collect();
    // Guest RAM is anonymous memory of this process: fault all of it in first (each page's
    // first byte written back), so that what grows below is the device's own memory.
    let mem = drv.mem();
    for page in (0..DEFAULT_RAM as u64).step_by(4096) {
        let b: u8 = mem.read_obj(GuestAddress(page)).unwrap();
        mem.write_obj(b, GuestAddress(page)).unwrap();
    }
    let rss0 = rss_anon_kib();
    let mut qps = Vec::new();
    let refused = loop {
        match drv.create_qp(ctx, QpKind::Rc, pd, &cq, &cq, None, (1, 8192, 1, 16), false) {
            Ok(qp) => qps.push(qp),
            Err(e) => break err_of::<()>(Err(e)),
        }
        assert!(qps.len() < 1000, "never refused");
    };
    assert_eq!(refused, err::ENOMEM);
    assert!(!qps.is_empty(), "not even one QP fits the budget");
    let st = stats(&t);
    assert!(st.host_mem <= BUDGET, "{} reserved", st.host_mem);
    for qp in &mut qps {
        let [init, _, _] = rc_connect_attrs(0, [0; 16], 1);
        drv.modify_qp(qp, init).unwrap();
        let mut n = 0;
        while drv.push_recv(qp, n, &sges) {
            n += 1;
        }
        assert_eq!(n, 8192);
        drv.doorbell(qp.ctx, uar::QP, qp.handle | (1 << 31));
    }
    // Every receive reaches the backend (the device takes them from the rings).
    let deadline = Instant::now() + Duration::from_secs(60);
    while qps.iter().any(|q| !drv.rq_drained(q)) {
        assert!(Instant::now() < deadline, "the receives were not taken");
        std::thread::sleep(Duration::from_millis(10));
    }
    let grown = (rss_anon_kib().saturating_sub(rss0)) << 10;
    eprintln!(
        "{} QPs × 8192 receives of 16 SGEs: {} MiB reserved of {} MiB, RssAnon +{} MiB",
        qps.len(),
        st.host_mem >> 20,
        BUDGET >> 20,
        grown >> 20
    );
    // The other tests of this binary run alongside and allocate too: some slack on top.
    assert!(
        grown <= BUDGET + (16 << 20),
        "RssAnon grew by {grown} bytes"
    );
    // Destroying a QP gives its reservation back: one more fits.
    let qp = qps.pop().unwrap();
    drv.destroy_qp(qp).unwrap();
    let again = drv.create_qp(ctx, QpKind::Rc, pd, &cq, &cq, None, (1, 8192, 1, 16), false);
    assert!(again.is_ok(), "{again:?}");
    assert_device_healthy(&drv);
}

/// A guest ringing a million bad doorbells is counted, one by one, and writes no log line; a
/// guest rewriting a bad DSR and a client accessing outside the regions, 20,000 times each, on a
/// real `pvrdma serve` at its default log level, leave at most a burst of lines per kind
/// (`pvrdma_dev::ratelog`).
#[test]
fn guest_log_floods_are_bounded() {
    let _alone = crate::common::alone();
    let t = device();
    let _drv = probe(&t);
    let tr: &dyn Transport = &*t;
    let before = stats(&t).refused.doorbells;
    // UAR page 511 belongs to no context.
    for i in 0..1_000_000u32 {
        tr.write(
            Region::Bar(2),
            (511 << 12) | uar::QP,
            &(i | (1 << 31)).to_le_bytes(),
        );
    }
    assert_eq!(stats(&t).refused.doorbells - before, 1_000_000);

    let log_path =
        std::env::temp_dir().join(format!("pvrdma-log-flood-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut server = pvrdma_guest::vfio::ServeProcess::spawn_logging(
        std::path::Path::new(env!("CARGO_BIN_EXE_pvrdma")),
        &["--mac", "00:50:56:12:34:56"],
        log,
    )
    .expect("pvrdma serve starts");
    let (client, drv) = probed_over(&server);
    let tr: &dyn Transport = &*client;
    for _ in 0..20_000 {
        tr.write(
            Region::Bar(1),
            offset::DSRLOW,
            &(OUTSIDE as u32 | 0x1000).to_le_bytes(),
        );
        tr.write(
            Region::Bar(1),
            offset::DSRHIGH,
            &((OUTSIDE >> 32) as u32).to_le_bytes(),
        );
        tr.write(Region::Bar(1), 1 << 20, &[0xa5; 4]);
    }
    drop(drv);
    drop(client);
    server
        .terminate(Duration::from_secs(30))
        .expect("serve stops");
    let text = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    let count = |pat: &str| text.lines().filter(|l| l.contains(pat)).count();
    let lines = text.lines().count();
    assert!(lines < 100, "{lines} log lines:\n{text}");
    assert!((1..=10).contains(&count("rejected")), "DSR lines:\n{text}");
    assert!(
        (1..=10).contains(&count("outside region")),
        "access lines:\n{text}"
    );
}
