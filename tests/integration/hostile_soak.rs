//! Hostile-guest soak: one QP pair runs a verified workload while, on the same device, another
//! context throws random commands, rings garbage doorbells, scribbles over its own rings and page
//! directories and resets its QPs. The verified workload must finish with every byte correct,
//! and the device must serve new contexts afterwards.
//!
//! Short by default; `PVRDMA_SOAK_LONG=1` runs it for much longer.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::common::*;
use pvrdma_dev::abi::{wr_opcode, CMD_SLOT_SIZE};
use pvrdma_guest::{Driver, QpKind, SendWqe};
use vm_memory::{Bytes, GuestAddress};

/// The attacker: its own context, objects it scribbles over, random commands and doorbells that
/// never name the victim's handles (the command channel trusts the guest kernel with handles, as
/// the real driver's device does; isolation between contexts is about doorbells and memory).
fn attacker(drv: &Driver, victim: &HashSet<u32>, stop: &AtomicBool, rounds: &AtomicU64) {
    let mut rng = Rng(0x51ed_270b_1c3a_94f7);
    let ctx = fresh_ctx(drv);
    let pd = drv.create_pd(ctx).expect("attacker pd");
    let mem = drv.mem();
    while !stop.load(Ordering::Relaxed) {
        rounds.fetch_add(1, Ordering::Relaxed);
        // Objects of its own, then scribbled over and rung.
        let Ok(cq) = drv.create_cq(ctx, 16) else {
            continue;
        };
        let qp = drv.create_qp(ctx, QpKind::Rc, pd, &cq, &cq, None, (8, 8, 2, 2), false);
        if let Ok(mut qp) = qp {
            for m in pvrdma_guest::driver::rc_connect_attrs(qp.qpn, gid_of(MAC), ALL_ACCESS) {
                let _ = drv.modify_qp(&qp, m);
            }
            for _ in 0..8 {
                let page = qp.pdir.pages[rng.below(qp.pdir.pages.len() as u64) as usize];
                let off = rng.below(4096 - 8);
                let _ = mem.write_obj(rng.next(), GuestAddress(page.0 + off));
            }
            for _ in 0..8 {
                let page = cq.pdir.pages[rng.below(cq.pdir.pages.len() as u64) as usize];
                let _ = mem.write_obj(rng.next(), GuestAddress(page.0 + rng.below(4096 - 8)));
            }
            let _ = drv.push_send(
                &mut qp,
                &SendWqe {
                    wr_id: rng.next(),
                    opcode: rng.below(20) as u32,
                    flags: rng.next() as u32,
                    num_sge_override: Some(rng.below(40) as u32),
                    ..Default::default()
                },
            );
            drv.ring_sq(&qp);
            drv.doorbell(ctx, 0, qp.handle | (1 << 31));
            drv.arm_cq(&cq, rng.below(2) == 0);
            // Garbage doorbells on its own page, including other handles and bits.
            for _ in 0..4 {
                drv.doorbell(ctx, rng.below(3) * 4, rng.next() as u32);
                drv.doorbell(ctx, rng.below(4096) & !3, rng.next() as u32);
            }
            if rng.below(2) == 0 {
                let _ = drv.reset_qp(&mut qp);
            }
            let _ = drv.destroy_qp(qp);
        }
        let _ = drv.destroy_cq(cq);
        // Random commands that never name a victim handle or GID entry 0.
        for _ in 0..4 {
            let mut req = [0u8; CMD_SLOT_SIZE];
            for b in req.iter_mut() {
                *b = rng.next() as u8;
            }
            let code = rng.below(23) as u32;
            req[8..12].copy_from_slice(&code.to_le_bytes());
            for off in [16usize, 20, 24, 28, 32, 36] {
                let v = u32::from_le_bytes(req[off..off + 4].try_into().unwrap());
                if victim.contains(&(v & 0xffff)) || victim.contains(&v) || v < 64 {
                    req[off..off + 4].copy_from_slice(&(0x7fff_0000u32 | v).to_le_bytes());
                }
            }
            let _ = drv.cmd_raw(&req, true);
        }
    }
}

fn run(transfers: u64) {
    let (_t, drv) = probed();
    let mut p = rc_pair(&drv, MAC, 16, 1);
    let ma = drv.reg_mr(p.pd, 0x1_0000_0000, 65536, ALL_ACCESS).unwrap();
    let mb = drv.reg_mr(p.pd, 0x2_0000_0000, 65536, ALL_ACCESS).unwrap();
    let victim: HashSet<u32> = [
        p.ctx.handle,
        p.pd,
        p.cq_a.handle,
        p.cq_b.handle,
        p.a.handle,
        p.b.handle,
        ma.handle,
        mb.handle,
    ]
    .into_iter()
    .collect();
    let stop = AtomicBool::new(false);
    let rounds = AtomicU64::new(0);
    let drv = &drv;
    std::thread::scope(|s| {
        let hostile = s.spawn(|| attacker(drv, &victim, &stop, &rounds));
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mem = drv.mem();
        for i in 0..transfers {
            let size = rng.below(65536) as u32 + 1;
            let data = pattern(size as usize, i as u8);
            ma.write(mem, 0, &data);
            if i % 2 == 0 {
                assert!(drv.post_recv(&mut p.b, i, &[mb.sge(0, 65536)]));
                assert!(drv.post_send(&mut p.a, &send(i, ma.sge(0, size))));
                let r = one(drv, &mut p.cq_b);
                assert_eq!((r.wr_id, r.status, r.byte_len), (i, 0, size));
            } else {
                let w = SendWqe {
                    wr_id: i,
                    opcode: wr_opcode::RDMA_WRITE,
                    flags: 2,
                    sges: vec![ma.sge(0, size)],
                    remote_addr: mb.iova,
                    rkey: mb.rkey,
                    ..Default::default()
                };
                assert!(drv.post_send(&mut p.a, &w));
            }
            let c = one(drv, &mut p.cq_a);
            assert_eq!((c.wr_id, c.status), (i, 0), "victim transfer {i}");
            let mut got = vec![0u8; size as usize];
            mb.read(mem, 0, &mut got);
            assert!(got == data, "victim transfer {i} of {size} bytes corrupted");
        }
        stop.store(true, Ordering::Relaxed);
        hostile.join().expect("attacker thread");
    });
    eprintln!(
        "hostile soak: {transfers} verified transfers while the attacker ran {} rounds",
        rounds.load(Ordering::Relaxed)
    );
    assert!(rounds.load(Ordering::Relaxed) > 0);
    assert_device_healthy(drv);
}

#[test]
fn verified_workload_survives_a_hostile_neighbour() {
    let _shared = crate::common::shared();
    if std::env::var_os("PVRDMA_SOAK_LONG").is_some() {
        run(200_000);
    } else {
        run(600);
    }
}
