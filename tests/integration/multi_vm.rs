//! Many VMs on one host: a device per VM, all on one emulated fabric, exchanging RDMA through
//! their own guest rings. In-process by default; with `PVRDMA_TRANSPORT=vfio-user` the devices
//! are those of ONE `pvrdma serve` process (`--device` per VM), each reached by its own client
//! with its own guest RAM, as separate QEMUs would.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common::vms::*;
use crate::common::*;
use pvrdma_dev::abi::{wr_opcode, Cqe};
use pvrdma_guest::driver::ud_attrs;
use pvrdma_guest::{Cq, Mr, Qp, QpKind, SendWqe, Transport, UdAddr};
use rdma_backend::WcStatus;

#[test]
fn every_rc_opcode_both_ways_between_two_vms() {
    let _shared = crate::common::shared();
    let (_host, vms) = host(2);
    let (a, b) = (&vms[0], &vms[1]);
    let (mut ea, mut eb) = connect(a, b, 16);
    every_opcode(a, b, &mut ea, &mut eb, 1);
    every_opcode(b, a, &mut eb, &mut ea, 2);
}

/// Sends `w` on `qp` of `from` until `to` receives it on `cq_to` (at most 50 tries, 200 ms
/// each), as UD's users do: a datagram that finds no receive is dropped, and a receive the
/// guest has posted reaches the device's backend only once the device's worker has taken it
/// from the ring. Returns the receive's CQE.
fn send_until_received(
    (from, qp, cq_from): (&Vm, &mut Qp, &mut Cq),
    w: &SendWqe,
    (to, cq_to): (&Vm, &mut Cq),
) -> Cqe {
    for _ in 0..50 {
        assert!(from.drv.post_send(qp, w));
        assert_eq!(one(&from.drv, cq_from).status, 0, "sent");
        if let Some(r) = to.drv.wait_cqes(cq_to, 1, Duration::from_millis(200)).pop() {
            return r;
        }
    }
    panic!("50 datagrams sent, none received");
}

#[test]
fn ud_and_gsi_between_two_vms() {
    let _shared = crate::common::shared();
    let (_host, vms) = host(2);
    let (a, b) = (&vms[0], &vms[1]);
    // UD: a datagram with the right Q_Key arrives with a GRH naming the sender; a wrong Q_Key
    // is dropped (the sender still completes, as on a real network).
    let mut cqa = a.drv.create_cq(a.ctx, 64).unwrap();
    let mut cqb = b.drv.create_cq(b.ctx, 64).unwrap();
    let caps = (16, 16, 1, 1);
    let mut ua = a
        .drv
        .create_qp(a.ctx, QpKind::Ud, a.pd, &cqa, &cqa, None, caps, false)
        .unwrap();
    let mut ub = b
        .drv
        .create_qp(b.ctx, QpKind::Ud, b.pd, &cqb, &cqb, None, caps, false)
        .unwrap();
    for m in ud_attrs(0x1234) {
        a.drv.modify_qp(&ua, m).unwrap();
        b.drv.modify_qp(&ub, m).unwrap();
    }
    let ma = a.drv.reg_mr(a.pd, 0x4000_0000, 4096, ALL_ACCESS).unwrap();
    let mb = b.drv.reg_mr(b.pd, 0x4000_0000, 8192, ALL_ACCESS).unwrap();
    let payload = pattern(700, 9);
    ma.write(a.drv.mem(), 0, &payload);
    let ub_qpn = ub.qpn;
    let to_b = |qkey| SendWqe {
        ud: Some(UdAddr {
            remote_qpn: ub_qpn,
            qkey,
            dgid: b.gid,
            gid_index: 0,
            dmac: b.mac,
            pd: a.pd,
        }),
        ..send(1, ma.sge(0, 700))
    };
    assert!(b.drv.post_recv(&mut ub, 5, &[mb.sge(0, 40 + 1024)]));
    assert!(a.drv.post_send(&mut ua, &to_b(0x9999)));
    assert_eq!(one(&a.drv, &mut cqa).status, 0);
    assert!(
        b.drv
            .wait_cqes(&mut cqb, 1, Duration::from_millis(200))
            .is_empty(),
        "wrong Q_Key dropped"
    );
    let r = send_until_received((a, &mut ua, &mut cqa), &to_b(0x1234), (b, &mut cqb));
    assert_eq!((r.status, r.byte_len, r.src_qp), (0, 740, ua.qpn));
    let mut grh = [0u8; 40];
    mb.read(b.drv.mem(), 0, &mut grh);
    assert_eq!(
        (&grh[8..24], &grh[24..40]),
        (&a.gid[..], &b.gid[..]),
        "GRH sgid, dgid"
    );
    let mut got = vec![0u8; 700];
    mb.read(b.drv.mem(), 40, &mut got);
    assert_eq!(got, payload);

    // GSI: a MAD from a's QP1 to b's QP1 (what ib_cm and rdma_cm send), and the reply.
    let mut ka = pvrdma_guest::kernel::ib_register(&a.drv, a.mac).unwrap();
    let mut kb = pvrdma_guest::kernel::ib_register(&b.drv, b.mac).unwrap();
    let mad = |from: &Vm,
               k: &mut pvrdma_guest::kernel::KernelSetup,
               to: &Vm,
               kto: &mut pvrdma_guest::kernel::KernelSetup| {
        let mad = pattern(256, 0x4d);
        let buf = from.drv.alloc.contiguous(from.drv.mem(), 1);
        use vm_memory::Bytes;
        from.drv.mem().write_slice(&mad, buf).unwrap();
        let w = SendWqe {
            wr_id: 0x51,
            opcode: wr_opcode::SEND,
            flags: 2,
            sges: vec![pvrdma_dev::abi::WireSge {
                addr: buf.0,
                length: 256,
                lkey: k.dma_mr.lkey,
            }],
            ud: Some(UdAddr {
                remote_qpn: 1,
                qkey: 0x8000_0000,
                dgid: kto.gid,
                gid_index: 0,
                dmac: to.mac,
                pd: k.pd,
            }),
            ..Default::default()
        };
        let r = send_until_received((from, &mut k.gsi, &mut k.cq), &w, (to, &mut kto.cq));
        assert_eq!(
            (r.status, r.byte_len, r.src_qp, r.opcode),
            (0, 296, 1, 128),
            "MAD received"
        );
    };
    mad(a, &mut ka, b, &mut kb);
    mad(b, &mut kb, a, &mut ka);
    let _ = (&mut ua, &mut ub);
}

/// A VM reaches another VM's memory only through an rkey of an MR that VM registered with the
/// matching remote access, within its bounds, on the QP connected to it. Every other attempt
/// is a remote access error on the initiator, with nothing written or read.
#[test]
fn a_vm_reaches_another_only_with_its_keys_within_bounds() {
    let _shared = crate::common::shared();
    let (_host, vms) = host(3);
    let (a, b, c) = (&vms[0], &vms[1], &vms[2]);
    let la = a.drv.reg_mr(a.pd, 0x1000, 8192, ALL_ACCESS).unwrap();
    la.write(a.drv.mem(), 0, &[0xa5; 8192]);
    // b: an MR with remote write and read, one with none; c: an MR of its own.
    let rw = b.drv.reg_mr(b.pd, 0x50_0000, 4096, ALL_ACCESS).unwrap();
    let local_only = b.drv.reg_mr(b.pd, 0x60_0000, 4096, 1).unwrap();
    // c's MR comes after others of its own, so that its rkey names no MR of b (keys are
    // per device: the same number may be valid on two devices, each for its own MR).
    for i in 0..4 {
        c.drv
            .reg_mr(c.pd, 0x80_0000 + i * 0x1_0000, 4096, ALL_ACCESS)
            .unwrap();
    }
    let of_c = c.drv.reg_mr(c.pd, 0x50_0000, 4096, ALL_ACCESS).unwrap();
    let zero = vec![0u8; 4096];
    rw.write(b.drv.mem(), 0, &zero);
    local_only.write(b.drv.mem(), 0, &zero);
    of_c.write(c.drv.mem(), 0, &zero);
    type Bad = (&'static str, u32, u64, u32, u32);
    let cases: [Bad; 7] = [
        (
            "wrong rkey",
            wr_opcode::RDMA_WRITE,
            rw.iova,
            rw.rkey ^ 0x00ff_0000,
            8,
        ),
        (
            "rkey of another VM's MR",
            wr_opcode::RDMA_WRITE,
            of_c.iova,
            of_c.rkey,
            8,
        ),
        (
            "one byte past the end",
            wr_opcode::RDMA_WRITE,
            rw.iova + 1,
            rw.rkey,
            4096,
        ),
        (
            "one byte before the start",
            wr_opcode::RDMA_WRITE,
            rw.iova - 1,
            rw.rkey,
            8,
        ),
        (
            "no remote write",
            wr_opcode::RDMA_WRITE,
            local_only.iova,
            local_only.rkey,
            8,
        ),
        (
            "no remote read",
            wr_opcode::RDMA_READ,
            local_only.iova,
            local_only.rkey,
            8,
        ),
        (
            "read past the end",
            wr_opcode::RDMA_READ,
            rw.iova + 4095,
            rw.rkey,
            2,
        ),
    ];
    for (what, op, addr, rkey, len) in cases {
        // A fresh connection each time: the error moves the initiator's QP to ERR.
        let (mut ea, _eb) = connect(a, b, 4);
        let w = SendWqe {
            wr_id: 1,
            opcode: op,
            flags: 2,
            sges: vec![la.sge(0, len)],
            remote_addr: addr,
            rkey,
            ..Default::default()
        };
        assert!(a.drv.post_send(&mut ea.qp, &w));
        let c = one(&a.drv, &mut ea.cq);
        assert_eq!(c.status, WcStatus::RemAccessErr as u32, "{what}");
    }
    let mut got = vec![0u8; 4096];
    for (mr, vm) in [(&rw, b), (&local_only, b), (&of_c, c)] {
        mr.read(vm.drv.mem(), 0, &mut got);
        assert!(got == zero, "nothing written into an MR of another VM");
    }
    // The same MR, in bounds, with the right key, works.
    let (mut ea, _eb) = connect(a, b, 4);
    let w = wqe(2, wr_opcode::RDMA_WRITE, vec![la.sge(0, 4096)], &rw);
    assert!(a.drv.post_send(&mut ea.qp, &w));
    assert_eq!(one(&a.drv, &mut ea.cq).status, 0);
    rw.read(b.drv.mem(), 0, &mut got);
    assert!(got.iter().all(|&x| x == 0xa5));
}

/// 16 VMs, each connected to each of the others: SENDs and WRITEs all to all, every payload
/// checked, every completion accounted for.
#[test]
fn sixteen_vms_all_to_all() {
    let _shared = crate::common::shared();
    const N: usize = 16;
    const ROUNDS: u64 = 4;
    const SIZE: usize = 3000;
    let (_host, vms) = host(N);
    // links[(i, j)] for i < j.
    let mut links = BTreeMap::new();
    for i in 0..N {
        for j in i + 1..N {
            links.insert((i, j), connect(&vms[i], &vms[j], 8));
        }
    }
    // One buffer per VM: a send area per peer (at peer * 8 KiB) and a receive area per peer
    // (at 128 KiB + peer * 8 KiB).
    let mrs: Vec<Mr> = vms
        .iter()
        .map(|v| {
            v.drv
                .reg_mr(v.pd, 0x7000_0000, 256 << 10, ALL_ACCESS)
                .unwrap()
        })
        .collect();
    let send_at = |peer: usize| (peer * 8192) as u64;
    let recv_at = |peer: usize| (128 * 1024 + peer * 8192) as u64;
    let payload = |from: usize, to: usize, round: u64| {
        pattern(SIZE, (from * 17 + to * 3) as u8 ^ round as u8)
    };
    for round in 0..ROUNDS {
        // Everyone posts a receive for each peer, then sends to each peer (SEND on even
        // rounds, WRITE_WITH_IMM on odd ones, which also consumes the receive).
        for (&(i, j), (ei, ej)) in links.iter_mut() {
            for (me, e, peer) in [(i, &mut *ei, j), (j, &mut *ej, i)] {
                let v = &vms[me];
                assert!(v
                    .drv
                    .post_recv(&mut e.qp, round, &[mrs[me].sge(recv_at(peer), 8192)]));
            }
        }
        for (&(i, j), (ei, ej)) in links.iter_mut() {
            for (me, e, peer) in [(i, &mut *ei, j), (j, &mut *ej, i)] {
                let v = &vms[me];
                mrs[me].write(v.drv.mem(), send_at(peer), &payload(me, peer, round));
                let sge = vec![mrs[me].sge(send_at(peer), SIZE as u32)];
                let w = if round % 2 == 0 {
                    wqe(round, wr_opcode::SEND, sge, &mrs[peer])
                } else {
                    SendWqe {
                        imm: (me * 100 + peer) as u32,
                        remote_addr: mrs[peer].iova + recv_at(me),
                        ..wqe(round, wr_opcode::RDMA_WRITE_WITH_IMM, sge, &mrs[peer])
                    }
                };
                assert!(v.drv.post_send(&mut e.qp, &w));
            }
        }
        // Each end sees its send and its peer's message complete, exactly once.
        for (&(i, j), (ei, ej)) in links.iter_mut() {
            for (me, e, peer) in [(i, &mut *ei, j), (j, &mut *ej, i)] {
                let v = &vms[me];
                let c = v.drv.wait_cqes(&mut e.cq, 2, WAIT);
                assert_eq!(c.len(), 2, "vm {me} from/to {peer} round {round}");
                assert!(c.iter().all(|c| c.status == 0 && c.wr_id == round), "{c:?}");
                let r = c.iter().find(|c| c.opcode >= 128).expect("a receive");
                assert_eq!(r.byte_len, SIZE as u32);
                let mut got = vec![0u8; SIZE];
                mrs[me].read(v.drv.mem(), recv_at(peer), &mut got);
                assert!(
                    got == payload(peer, me, round),
                    "vm {me} from {peer} round {round}"
                );
            }
        }
    }
    // Nothing completed twice.
    for (&(i, j), (ei, ej)) in links.iter_mut() {
        for (me, e) in [(i, ei), (j, ej)] {
            let extra = vms[me]
                .drv
                .wait_cqes(&mut e.cq, 1, Duration::from_millis(1));
            assert!(extra.is_empty(), "vm {me}: {extra:?}");
        }
    }
}

/// A VM that goes away (its client disconnects, as when its QEMU is killed) in the middle of
/// WRITEs, READs and atomics from another VM: the survivor's outstanding work completes — each WR
/// exactly once, successes or a transport error — its QP ends in error, nothing hangs, and
/// the survivor then talks to the VM that takes the socket next.
#[test]
fn a_peer_that_goes_away_mid_transfer_costs_only_error_completions() {
    let _shared = crate::common::shared();
    let (host, mut vms) = host(2);
    let b = vms.pop().unwrap();
    let a = &vms[0];
    let (mut ea, eb) = connect(a, &b, 64);
    const SIZE: u64 = 1 << 20;
    const N: u64 = 48;
    let la = a
        .drv
        .reg_mr(a.pd, 0x10_0000_0000, SIZE, ALL_ACCESS)
        .unwrap();
    let lb = b
        .drv
        .reg_mr(b.pd, 0x20_0000_0000, SIZE, ALL_ACCESS)
        .unwrap();
    for i in 0..N {
        let w = match i % 3 {
            0 => wqe(i, wr_opcode::RDMA_WRITE, vec![la.sge(0, SIZE as u32)], &lb),
            1 => wqe(i, wr_opcode::RDMA_READ, vec![la.sge(0, SIZE as u32)], &lb),
            _ => SendWqe {
                compare_add: 1,
                ..wqe(i, wr_opcode::ATOMIC_FETCH_AND_ADD, vec![la.sge(0, 8)], &lb)
            },
        };
        assert!(a.drv.post_send(&mut ea.qp, &w));
    }
    // b goes away with the transfers in flight (in-process: its device is shut down).
    drop(eb);
    drop(b);
    let start = Instant::now();
    let mut seen = BTreeMap::new();
    while seen.len() < N as usize {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "completions stopped at {}",
            seen.len()
        );
        for c in a.drv.wait_cqes(
            &mut ea.cq,
            N as usize - seen.len(),
            Duration::from_millis(200),
        ) {
            assert!(
                seen.insert(c.wr_id, c.status).is_none(),
                "wr {} completed twice",
                c.wr_id
            );
        }
    }
    let ok = [0, WcStatus::RetryExcErr as u32, WcStatus::WrFlushErr as u32];
    assert!(seen.values().all(|s| ok.contains(s)), "{seen:?}");
    assert!(
        seen.values().any(|&s| s == WcStatus::RetryExcErr as u32),
        "the peer's loss is seen as a transport error: {seen:?}"
    );
    assert_eq!(
        a.drv.query_qp(&ea.qp).unwrap().qp_state,
        6,
        "the QP is in ERR"
    );
    // A new VM on the gone VM's socket (a fresh device, same MAC) and the survivor talk.
    let b = host.boot(1);
    let (mut ea, mut eb) = connect(a, &b, 8);
    every_opcode(a, &b, &mut ea, &mut eb, 3);
}

/// A VM's guest RAM is unmapped (DMA_UNMAP) while another VM WRITEs into it and it WRITEs out
/// of it. The unmap is answered promptly; from its answer on, no byte of the unmapped RAM
/// changes (the device can no longer even write the unmapped VM's CQEs); the other VM's WRs
/// all complete, exactly once, successes or errors; after a remap and a reset the unmapped
/// VM's device serves a new driver that talks to the other VM. (vfio-user only: DMA_UNMAP is a
/// message of that protocol.)
#[test]
fn unmapping_a_vms_memory_during_copies_both_ways() {
    let _shared = crate::common::shared();
    if !over_vfio_user() {
        return;
    }
    let (_host, mut vms) = host(2);
    let b = vms.pop().unwrap();
    let a = &vms[0];
    let (mut ea, mut eb) = connect(a, &b, 128);
    const CHUNK: u64 = 1 << 20;
    const N: u64 = 128;
    // a WRITEs each chunk of b's zeroed MR once: a WRITE that lands late changes b's bytes.
    let la = a
        .drv
        .reg_mr(a.pd, 0x10_0000_0000, CHUNK, ALL_ACCESS)
        .unwrap();
    la.write(a.drv.mem(), 0, &pattern(CHUNK as usize, 0x77));
    let lb = b
        .drv
        .reg_mr(b.pd, 0x20_0000_0000, N * CHUNK, ALL_ACCESS)
        .unwrap();
    let ta = a
        .drv
        .reg_mr(a.pd, 0x30_0000_0000, CHUNK, ALL_ACCESS)
        .unwrap();
    for i in 0..N {
        let w = SendWqe {
            remote_addr: lb.iova + i * CHUNK,
            ..wqe(i, wr_opcode::RDMA_WRITE, vec![la.sge(0, CHUNK as u32)], &lb)
        };
        assert!(a.drv.post_send(&mut ea.qp, &w));
        if i < 32 {
            let w = wqe(
                1000 + i,
                wr_opcode::RDMA_WRITE,
                vec![lb.sge(i * CHUNK, CHUNK as u32)],
                &ta,
            );
            assert!(b.drv.post_send(&mut eb.qp, &w));
        }
    }
    // Once the copies are under way, pull all of b's RAM out from under them.
    let mut seen = BTreeMap::new();
    for c in a.drv.wait_cqes(&mut ea.cq, 1, WAIT) {
        seen.insert(c.wr_id, c.status);
    }
    let vb = b.vfio.clone().expect("vfio-user");
    let ram = pvrdma_guest::vfio::DEFAULT_RAM as u64;
    let t = Instant::now();
    vb.with_client(|c| c.dma_unmap(0, ram))
        .expect("DMA_UNMAP answered");
    let answered_in = t.elapsed();
    // b's whole RAM as the device left it when the unmap was answered.
    let snapshot = || {
        let mut v = vec![0u8; ram as usize];
        use vm_memory::Bytes;
        b.drv
            .mem()
            .read_slice(&mut v, vm_memory::GuestAddress(0))
            .unwrap();
        v
    };
    let at_answer = snapshot();
    let start = Instant::now();
    while seen.len() < N as usize && start.elapsed() < Duration::from_secs(30) {
        for c in a.drv.wait_cqes(
            &mut ea.cq,
            N as usize - seen.len(),
            Duration::from_millis(100),
        ) {
            assert!(c.wr_id < N, "{c:?}");
            assert!(
                seen.insert(c.wr_id, c.status).is_none(),
                "wr {} twice",
                c.wr_id
            );
        }
    }
    assert_eq!(seen.len(), N as usize, "every WR of a completes: {seen:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        snapshot() == at_answer,
        "the device wrote into b's RAM after its unmap was answered"
    );
    assert!(
        answered_in < Duration::from_secs(1),
        "unmap answered in {answered_in:?}"
    );
    let ok = seen.values().filter(|&&s| s == 0).count();
    eprintln!("unmap answered in {answered_in:?}; a's WRITEs into b: {ok} of {N} landed");
    assert!(
        ok < N as usize,
        "the unmap came after every copy: the test saw nothing in flight"
    );
    // In order: the WRITEs that landed, then one error, then flushes. The error is a remote
    // one if the responder faulted on the unmapped memory, or a transport one if b's QP went
    // to ERR first (its own send queue lost its ring) and stopped answering.
    let st: Vec<u32> = seen.values().copied().collect();
    assert!(st[..ok].iter().all(|&s| s == 0), "{seen:?}");
    let remote = [
        WcStatus::RemOpErr as u32,
        WcStatus::RemAccessErr as u32,
        WcStatus::RetryExcErr as u32,
    ];
    assert!(remote.contains(&st[ok]), "{seen:?}");
    assert!(
        st[ok + 1..]
            .iter()
            .all(|&s| s == WcStatus::WrFlushErr as u32),
        "{seen:?}"
    );
    // b maps its RAM again and resets its device (what QEMU does on a guest reboot); a new
    // driver on it connects to a, and every opcode works both ways.
    let fd = std::os::fd::AsRawFd::as_raw_fd(vb.ram_file());
    vb.with_client(|c| c.dma_map(0, 0, ram, fd))
        .expect("DMA_MAP again");
    vb.reset();
    let mac = b.mac;
    drop((eb, b));
    let b = vm_on(vb.clone(), Some(vb), mac);
    let (mut ea, mut eb) = connect(a, &b, 8);
    every_opcode(a, &b, &mut ea, &mut eb, 4);
    every_opcode(&b, a, &mut eb, &mut ea, 5);
}

/// A soak across VMs: four VMs move random-size transfers over RC connections between them,
/// every byte checked, while a fifth VM joins again and again, talks to one of the four, and
/// leaves in the middle of transfers (disconnect, device reset, or its QP destroyed). The four
/// see no corruption and no lost or duplicated completion; the VM that left costs the one it
/// talked to error completions only; the `pvrdma serve` process ends with the threads and
/// fds it had. Short by default; `PVRDMA_SOAK_LONG=1` runs at least 10^6 transfers.
#[test]
fn cross_vm_soak_with_a_vm_joining_and_leaving() {
    let _shared = crate::common::shared();
    let long = std::env::var_os("PVRDMA_SOAK_LONG").is_some();
    let transfers: u64 = if long { 1_000_000 } else { 4_000 };
    const BUF: u64 = 64 * 1024;
    let (host, mut vms) = host(5);
    drop(vms.pop()); // VM 4 is the one that comes and goes
    let stable = &vms;
    // Links 0-1, 2-3, 0-2, 1-3, each with an MR per side.
    let pairs = [(0, 1), (2, 3), (0, 2), (1, 3)];
    let mut links: Vec<_> = pairs
        .iter()
        .enumerate()
        .map(|(n, &(i, j))| {
            let (ei, ej) = connect(&stable[i], &stable[j], 16);
            let iova = 0x1_0000_0000 * (n as u64 + 1);
            let mi = stable[i]
                .drv
                .reg_mr(stable[i].pd, iova, BUF, ALL_ACCESS)
                .unwrap();
            let mj = stable[j]
                .drv
                .reg_mr(stable[j].pd, iova, BUF, ALL_ACCESS)
                .unwrap();
            ((i, ei, mi), (j, ej, mj))
        })
        .collect();
    let baseline = |pid: u32| {
        // The server's threads and fds once a VM's device is gone (teardown is asynchronous).
        let t = Instant::now();
        let mut c = proc_counts(pid);
        while t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
            let n = proc_counts(pid);
            if (n.0, n.1) == (c.0, c.1) {
                break;
            }
            c = n;
        }
        (c.0, c.1)
    };
    let pid = match &host {
        Host::Serve(s) => Some(s.pid()),
        Host::Fabric(..) => None,
    };
    let before = pid.map(baseline);
    let done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let per_link = transfers.div_ceil(links.len() as u64);
    let cycles = std::thread::scope(|s| {
        let churner = s.spawn(|| {
            let mut cycles = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let v = host.boot(4);
                let k = &stable[(cycles % 4) as usize];
                let (mut ek, mut ev) = connect(k, &v, 32);
                // One verified exchange each way.
                every_opcode_light(k, &v, &mut ek, &mut ev, cycles as u8);
                every_opcode_light(&v, k, &mut ev, &mut ek, cycles as u8 ^ 0x55);
                // WRITEs in flight from k when v leaves.
                let mk = k.drv.reg_mr(k.pd, 0x77_0000_0000, BUF, ALL_ACCESS).unwrap();
                let mv = v.drv.reg_mr(v.pd, 0x77_0000_0000, BUF, ALL_ACCESS).unwrap();
                for i in 0..16 {
                    let w = wqe(i, wr_opcode::RDMA_WRITE, vec![mk.sge(0, BUF as u32)], &mv);
                    assert!(k.drv.post_send(&mut ek.qp, &w));
                }
                match cycles % 3 {
                    0 => drop(v),
                    1 => {
                        v.t.reset();
                        drop(v);
                    }
                    _ => {
                        v.drv.destroy_qp(ev.qp).unwrap();
                        drop(v);
                    }
                }
                let mut seen = BTreeMap::new();
                let t = Instant::now();
                while seen.len() < 16 {
                    assert!(
                        t.elapsed() < Duration::from_secs(30),
                        "k's WRs stopped: {seen:?}"
                    );
                    for c in
                        k.drv
                            .wait_cqes(&mut ek.cq, 16 - seen.len(), Duration::from_millis(100))
                    {
                        assert!(
                            c.wr_id < 16 && seen.insert(c.wr_id, c.status).is_none(),
                            "{c:?}"
                        );
                    }
                }
                let allowed = [0, WcStatus::RetryExcErr as u32, WcStatus::WrFlushErr as u32];
                assert!(seen.values().all(|s| allowed.contains(s)), "{seen:?}");
                k.drv.destroy_qp(ek.qp).unwrap();
                k.drv.destroy_cq(ek.cq).unwrap();
                k.drv.destroy_mr(mk).unwrap();
                cycles += 1;
            }
            cycles
        });
        let mut workers = Vec::new();
        for (ti, group) in links.chunks_mut(2).enumerate() {
            let done = &done;
            workers.push(s.spawn(move || {
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (ti as u64 + 1);
                let mut next = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                for round in 0..per_link {
                    for link in group.iter_mut() {
                        let ((i, ei, mi), (j, ej, mj)) = link;
                        // Alternate the direction and the opcode.
                        let (from, ef, mf, to, et, mt) = if round % 4 < 2 {
                            (&stable[*i], &mut *ei, &*mi, &stable[*j], &mut *ej, &*mj)
                        } else {
                            (&stable[*j], &mut *ej, &*mj, &stable[*i], &mut *ei, &*mi)
                        };
                        let size = (next() % BUF) as u32 + 1;
                        let off = next() % (BUF - u64::from(size) + 1);
                        let data = pattern(size as usize, next() as u8);
                        mf.write(from.drv.mem(), off, &data);
                        let write = round % 2 == 1;
                        if write {
                            let w = SendWqe {
                                remote_addr: mt.iova + off,
                                ..wqe(round, wr_opcode::RDMA_WRITE, vec![mf.sge(off, size)], mt)
                            };
                            assert!(from.drv.post_send(&mut ef.qp, &w));
                        } else {
                            assert!(to
                                .drv
                                .post_recv(&mut et.qp, round, &[mt.sge(0, BUF as u32)]));
                            assert!(from
                                .drv
                                .post_send(&mut ef.qp, &send(round, mf.sge(off, size))));
                            let r = one(&to.drv, &mut et.cq);
                            assert_eq!((r.wr_id, r.status, r.byte_len), (round, 0, size));
                        }
                        let c = one(&from.drv, &mut ef.cq);
                        assert_eq!((c.wr_id, c.status), (round, 0));
                        let mut got = vec![0u8; size as usize];
                        mt.read(to.drv.mem(), if write { off } else { 0 }, &mut got);
                        assert!(got == data, "corrupted transfer of {size} bytes");
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for w in workers {
            w.join().expect("soak worker");
        }
        stop.store(true, Ordering::Relaxed);
        churner.join().expect("churn thread")
    });
    let n = done.load(Ordering::Relaxed);
    let el = start.elapsed();
    eprintln!(
        "cross-VM soak: {n} transfers in {el:.2?} ({:.0}/s); a VM joined and left {cycles} times",
        n as f64 / el.as_secs_f64().max(1e-9)
    );
    assert!(n >= transfers);
    assert!(cycles > 0, "the joining VM ran");
    // Nothing completed twice on the stable VMs.
    for ((i, ei, _), (j, ej, _)) in links.iter_mut() {
        for (v, e) in [(&stable[*i], ei), (&stable[*j], ej)] {
            assert!(v
                .drv
                .wait_cqes(&mut e.cq, 1, Duration::from_millis(1))
                .is_empty());
        }
    }
    if let (Some(pid), Some((fds0, threads0))) = (pid, before) {
        let (fds1, threads1) = baseline(pid);
        assert!(
            fds1 <= fds0 && threads1 <= threads0,
            "pvrdma serve grew: fds {fds0} -> {fds1}, threads {threads0} -> {threads1}"
        );
    }
}
