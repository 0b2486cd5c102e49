//! Integrity soak: random-size transfers across many QP pairs, every byte checked, while other
//! QPs are created and destroyed on the same device.
//!
//! Short by default; `PVRDMA_SOAK_LONG=1` runs at least 10^6 transfers (see docs/benchmarks.md).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use pvrdma_dev::abi::wr_opcode;
use pvrdma_guest::{Driver, QpKind, SendWqe};

const BUF: u64 = 64 * 1024;

fn churn(drv: &Driver, stop: &AtomicBool, uar: u32) -> u64 {
    let ctx = drv.create_uc(uar).expect("churn context");
    let pd = drv.create_pd(ctx).expect("churn pd");
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let cq = drv.create_cq(ctx, 64).expect("churn cq");
        let qp = drv
            .create_qp(ctx, QpKind::Rc, pd, &cq, &cq, None, (16, 16, 1, 1), false)
            .expect("churn qp");
        for m in pvrdma_guest::driver::rc_connect_attrs(qp.qpn, gid_of(MAC), ALL_ACCESS) {
            drv.modify_qp(&qp, m).expect("churn modify");
        }
        drv.destroy_qp(qp).expect("churn destroy qp");
        drv.destroy_cq(cq).expect("churn destroy cq");
        n += 1;
    }
    n
}

fn run_soak(pairs: usize, transfers: u64, threads: usize) {
    let (_t, drv) = probed();
    let drv = &drv;
    let mut ps: Vec<_> = (0..pairs).map(|_| rc_pair(drv, MAC, 16, 2)).collect();
    let mrs: Vec<_> = ps
        .iter()
        .map(|p| {
            let a = drv.reg_mr(p.pd, 0x1_0000_0000, BUF, ALL_ACCESS).unwrap();
            let b = drv.reg_mr(p.pd, 0x2_0000_0000, BUF, ALL_ACCESS).unwrap();
            (a, b)
        })
        .collect();
    let done = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let per_pair = transfers.div_ceil(pairs as u64);
    let churned = std::thread::scope(|s| {
        let churner = s.spawn(|| churn(drv, &stop, 200));
        let chunk = pairs.div_ceil(threads);
        let mut workers = Vec::new();
        for (ti, (group, mgroup)) in ps.chunks_mut(chunk).zip(mrs.chunks(chunk)).enumerate() {
            let (done, bytes) = (&done, &bytes);
            workers.push(s.spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (ti as u64 + 1));
                let mem = drv.mem();
                for round in 0..per_pair {
                    for (p, (ma, mb)) in group.iter_mut().zip(mgroup) {
                        let size = (rng.next() % BUF) as u32 + 1;
                        let off = rng.next() % (BUF - u64::from(size) + 1);
                        let seed = rng.next() as u8;
                        let data = pattern(size as usize, seed);
                        ma.write(mem, off, &data);
                        let use_write = round % 2 == 1;
                        if use_write {
                            let w = SendWqe {
                                wr_id: round,
                                opcode: wr_opcode::RDMA_WRITE,
                                flags: 2,
                                sges: vec![ma.sge(off, size)],
                                remote_addr: mb.iova + off,
                                rkey: mb.rkey,
                                ..Default::default()
                            };
                            assert!(drv.post_send(&mut p.a, &w));
                        } else {
                            assert!(drv.post_recv(&mut p.b, round, &[mb.sge(0, BUF as u32)]));
                            assert!(drv.post_send(&mut p.a, &send(round, ma.sge(off, size))));
                            let r = one(drv, &mut p.cq_b);
                            assert_eq!((r.status, r.byte_len), (0, size), "receive of {size}");
                        }
                        let c = one(drv, &mut p.cq_a);
                        assert_eq!(c.status, 0);
                        let mut got = vec![0u8; size as usize];
                        mb.read(mem, if use_write { off } else { 0 }, &mut got);
                        assert!(got == data, "corrupted transfer of {size} bytes");
                        done.fetch_add(1, Ordering::Relaxed);
                        bytes.fetch_add(u64::from(size), Ordering::Relaxed);
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
    let el = start.elapsed();
    let n = done.load(Ordering::Relaxed);
    eprintln!(
        "soak: {n} transfers ({:.1} MiB) over {pairs} QP pairs in {:.2?} ({:.0} transfers/s); \
         {churned} QPs created and destroyed meanwhile",
        bytes.load(Ordering::Relaxed) as f64 / 1048576.0,
        el,
        n as f64 / el.as_secs_f64().max(1e-9)
    );
    assert!(n >= transfers);
    assert!(churned > 0, "the churn thread ran");
    let _ = Duration::ZERO;
}

#[test]
fn integrity_soak() {
    let _shared = crate::common::shared();
    if std::env::var_os("PVRDMA_SOAK_LONG").is_some() {
        run_soak(64, 1_000_000, 2);
    } else {
        run_soak(64, 64 * 20, 2);
    }
}
