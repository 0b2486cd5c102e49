//! Many VMs on one host, for the tests that need several devices on one fabric: a device per
//! VM, all on one emulated fabric in this process, or (with `PVRDMA_TRANSPORT=vfio-user`) the
//! devices of ONE `pvrdma serve` process (`--device` per VM), each reached by its own client with
//! its own guest RAM, as separate QEMUs would.

use std::sync::Arc;

use pvrdma_dev::abi::{wr_opcode, Cqe};
use pvrdma_dev::DeviceConfig;
use pvrdma_guest::driver::rc_connect_attrs;
use pvrdma_guest::transport::DEFAULT_RAM;
use pvrdma_guest::vfio::{ServeProcess, VfioUser};
use pvrdma_guest::{Cq, Ctx, Driver, InProcess, Mr, Qp, QpKind, SendWqe, Transport};
use rdma_backend::emulated::Fabric;

use super::{gid_of, one, over_vfio_user, pattern, send, ALL_ACCESS};

/// One VM's device, probed, with a user context and a PD.
pub struct Vm {
    /// The device's transport (for a reset).
    pub t: Arc<dyn Transport>,
    pub drv: Driver,
    /// The vfio-user client (its DMA_MAP/UNMAP), when the device is in `pvrdma serve`.
    pub vfio: Option<Arc<VfioUser>>,
    pub mac: [u8; 6],
    pub gid: [u8; 16],
    pub ctx: Ctx,
    pub pd: u32,
}

/// The host: the `pvrdma serve` process (vfio-user) or the shared fabric and the devices'
/// host-memory budget (in-process).
pub enum Host {
    Serve(ServeProcess),
    Fabric(Arc<Fabric>, u64),
}

impl Host {
    /// VM `i` of the host (again, after it went away: a fresh device on the same socket).
    pub fn boot(&self, i: usize) -> Vm {
        let mac = mac_of(i);
        let (t, vfio): (Arc<dyn Transport>, _) = match self {
            Host::Serve(s) => {
                let t = Arc::new(VfioUser::connect(&s.sockets()[i]).expect("connect"));
                (t.clone(), Some(t))
            }
            Host::Fabric(f, max_host_mem) => {
                let cfg = DeviceConfig {
                    mac,
                    workers: 1,
                    max_host_mem: *max_host_mem,
                    ..DeviceConfig::default()
                };
                (Arc::new(InProcess::new(cfg, DEFAULT_RAM, f)), None)
            }
        };
        vm_on(t, vfio, mac)
    }
}

/// A VM whose device is reached through `t`: probed, GID 0 bound, a user context and a PD.
pub fn vm_on(t: Arc<dyn Transport>, vfio: Option<Arc<VfioUser>>, mac: [u8; 6]) -> Vm {
    {
        let drv = Driver::probe(t.clone()).expect("probe");
        let gid = gid_of(mac);
        drv.create_bind(0, gid, 1).expect("bind GID 0");
        let ctx = drv.create_uc(1).expect("context");
        let pd = drv.create_pd(ctx).expect("pd");
        Vm {
            t,
            drv,
            vfio,
            mac,
            gid,
            ctx,
            pd,
        }
    }
}

/// The MAC of VM `i` of a host.
pub fn mac_of(i: usize) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0x17, 0x00, i as u8 + 1]
}

/// `n` VMs on one host.
pub fn host(n: usize) -> (Host, Vec<Vm>) {
    host_with_budget(n, DeviceConfig::default().max_host_mem)
}

/// `n` VMs on one host whose devices each have a host-memory budget of `max_host_mem` bytes.
pub fn host_with_budget(n: usize, max_host_mem: u64) -> (Host, Vec<Vm>) {
    let host = if over_vfio_user() {
        let macs: Vec<[u8; 6]> = (0..n).map(mac_of).collect();
        let budget = max_host_mem.to_string();
        Host::Serve(
            ServeProcess::spawn_devices(
                std::path::Path::new(env!("CARGO_BIN_EXE_pvrdma")),
                &macs,
                &["--workers", "1", "--max-host-mem", &budget],
            )
            .expect("pvrdma serve starts"),
        )
    } else {
        Host::Fabric(Fabric::new(), max_host_mem)
    };
    let vms = (0..n).map(|i| host.boot(i)).collect();
    (host, vms)
}

/// One end of an RC connection between two VMs: its QP and its own CQ.
pub struct End {
    pub qp: Qp,
    pub cq: Cq,
}

/// A QP of `v` that is not connected yet (RESET), RC, depth `depth`, 4 SGEs, on its own CQ.
pub fn end_on(v: &Vm, depth: u32) -> End {
    let cq = v
        .drv
        .create_cq(v.ctx, 4 * depth.next_power_of_two())
        .expect("cq");
    let qp = v
        .drv
        .create_qp(
            v.ctx,
            QpKind::Rc,
            v.pd,
            &cq,
            &cq,
            None,
            (depth, depth, 4, 4),
            false,
        )
        .expect("qp");
    End { qp, cq }
}

/// Connects an RC QP of `a` with one of `b` (depth `depth`, 4 SGEs).
pub fn connect(a: &Vm, b: &Vm, depth: u32) -> (End, End) {
    let (ea, eb) = (end_on(a, depth), end_on(b, depth));
    for m in rc_connect_attrs(eb.qp.qpn, b.gid, ALL_ACCESS) {
        a.drv.modify_qp(&ea.qp, m).expect("modify a");
    }
    for m in rc_connect_attrs(ea.qp.qpn, a.gid, ALL_ACCESS) {
        b.drv.modify_qp(&eb.qp, m).expect("modify b");
    }
    (ea, eb)
}

/// A signaled WR with `opcode` and `sges`, aimed at the start of `remote`.
pub fn wqe(wr_id: u64, opcode: u32, sges: Vec<pvrdma_dev::abi::WireSge>, remote: &Mr) -> SendWqe {
    SendWqe {
        wr_id,
        opcode,
        flags: 2,
        sges,
        remote_addr: remote.iova,
        rkey: remote.rkey,
        ..Default::default()
    }
}

/// Waits for exactly one CQE of `v`.
pub fn one_on(v: &Vm, cq: &mut Cq) -> Cqe {
    one(&v.drv, cq)
}

/// Every RC opcode from `a` to `b` with checksummed payloads of several sizes: SEND,
/// SEND_WITH_IMM, WRITE, WRITE_WITH_IMM, READ, then both atomics on a counter of `b`.
pub fn every_opcode(a: &Vm, b: &Vm, ea: &mut End, eb: &mut End, seed: u8) {
    const LEN: u64 = (1 << 20) + 4096;
    let la = a.drv.reg_mr(a.pd, 0x10_0000_0000, LEN, ALL_ACCESS).unwrap();
    let lb = b.drv.reg_mr(b.pd, 0x20_0000_0000, LEN, ALL_ACCESS).unwrap();
    for (k, &size) in [1usize, 4097, 1 << 20].iter().enumerate() {
        let seed = seed.wrapping_add(k as u8 * 16);
        let data = pattern(size, seed);
        la.write(a.drv.mem(), 0, &data);
        let mut got = vec![0u8; size];
        // SEND and SEND_WITH_IMM land in a posted receive.
        for (op, imm) in [
            (wr_opcode::SEND, 0),
            (wr_opcode::SEND_WITH_IMM, 0x5eed_0000 | size as u32),
        ] {
            lb.write(b.drv.mem(), 0, &vec![0u8; size]);
            assert!(b.drv.post_recv(&mut eb.qp, 7, &[lb.sge(0, LEN as u32)]));
            let w = SendWqe {
                imm,
                ..wqe(1, op, vec![la.sge(0, size as u32)], &lb)
            };
            assert!(a.drv.post_send(&mut ea.qp, &w));
            assert_eq!(one_on(a, &mut ea.cq).status, 0, "send {op} of {size}");
            let r = one_on(b, &mut eb.cq);
            assert_eq!(
                (r.status, r.byte_len),
                (0, size as u32),
                "recv {op} of {size}"
            );
            if op == wr_opcode::SEND_WITH_IMM {
                assert_eq!((r.imm_data, r.wc_flags & 2), (imm, 2), "immediate");
            }
            lb.read(b.drv.mem(), 0, &mut got);
            assert!(got == data, "SEND {op} of {size} bytes corrupted");
        }
        // WRITE, then WRITE_WITH_IMM at an odd offset (consumes a receive).
        lb.write(b.drv.mem(), 0, &vec![0u8; size + 3]);
        let w = wqe(2, wr_opcode::RDMA_WRITE, vec![la.sge(0, size as u32)], &lb);
        assert!(a.drv.post_send(&mut ea.qp, &w));
        assert_eq!(one_on(a, &mut ea.cq).status, 0, "write of {size}");
        lb.read(b.drv.mem(), 0, &mut got);
        assert!(got == data, "WRITE of {size} bytes corrupted");
        assert!(b.drv.post_recv(&mut eb.qp, 8, &[lb.sge(0, 16)]));
        let w = SendWqe {
            imm: 0xfeed_0000 | k as u32,
            remote_addr: lb.iova + 3,
            ..wqe(
                3,
                wr_opcode::RDMA_WRITE_WITH_IMM,
                vec![la.sge(0, size as u32)],
                &lb,
            )
        };
        assert!(a.drv.post_send(&mut ea.qp, &w));
        assert_eq!(one_on(a, &mut ea.cq).status, 0, "write-imm of {size}");
        let r = one_on(b, &mut eb.cq);
        assert_eq!(
            (r.status, r.opcode, r.imm_data),
            (0, 129, 0xfeed_0000 | k as u32)
        );
        lb.read(b.drv.mem(), 3, &mut got);
        assert!(got == data, "WRITE_WITH_IMM of {size} bytes corrupted");
        // READ it back from b into a cleared buffer of a.
        la.write(a.drv.mem(), 0, &vec![0u8; size]);
        let w = SendWqe {
            remote_addr: lb.iova + 3,
            ..wqe(4, wr_opcode::RDMA_READ, vec![la.sge(0, size as u32)], &lb)
        };
        assert!(a.drv.post_send(&mut ea.qp, &w));
        assert_eq!(one_on(a, &mut ea.cq).status, 0, "read of {size}");
        la.read(a.drv.mem(), 0, &mut got);
        assert!(got == data, "READ of {size} bytes corrupted");
    }
    // Atomics on b's counter, results in a's buffer.
    lb.write(b.drv.mem(), 64, &100u64.to_le_bytes());
    let faa = SendWqe {
        compare_add: 5,
        remote_addr: lb.iova + 64,
        ..wqe(5, wr_opcode::ATOMIC_FETCH_AND_ADD, vec![la.sge(0, 8)], &lb)
    };
    assert!(a.drv.post_send(&mut ea.qp, &faa));
    assert_eq!(one_on(a, &mut ea.cq).status, 0, "fetch-add");
    let mut v = [0u8; 8];
    la.read(a.drv.mem(), 0, &mut v);
    assert_eq!(u64::from_le_bytes(v), 100);
    let cas = SendWqe {
        opcode: wr_opcode::ATOMIC_CMP_AND_SWP,
        compare_add: 105,
        swap: 7,
        ..faa
    };
    assert!(a.drv.post_send(&mut ea.qp, &cas));
    assert_eq!(one_on(a, &mut ea.cq).status, 0, "compare-swap");
    lb.read(b.drv.mem(), 64, &mut v);
    assert_eq!(u64::from_le_bytes(v), 7);
    a.drv.destroy_mr(la).unwrap();
    b.drv.destroy_mr(lb).unwrap();
}

/// A verified SEND and WRITE of a few KiB from `a` to `b`.
pub fn every_opcode_light(a: &Vm, b: &Vm, ea: &mut End, eb: &mut End, seed: u8) {
    let la = a
        .drv
        .reg_mr(a.pd, 0x66_0000_0000, 8192, ALL_ACCESS)
        .unwrap();
    let lb = b
        .drv
        .reg_mr(b.pd, 0x66_1000_0000, 8192, ALL_ACCESS)
        .unwrap();
    let data = pattern(5000, seed);
    la.write(a.drv.mem(), 0, &data);
    assert!(b.drv.post_recv(&mut eb.qp, 1, &[lb.sge(0, 8192)]));
    assert!(a.drv.post_send(&mut ea.qp, &send(2, la.sge(0, 5000))));
    assert_eq!(one(&a.drv, &mut ea.cq).status, 0);
    assert_eq!(one(&b.drv, &mut eb.cq).status, 0);
    let mut got = vec![0u8; 5000];
    lb.read(b.drv.mem(), 0, &mut got);
    assert!(got == data, "SEND corrupted");
    let w = SendWqe {
        remote_addr: lb.iova + 100,
        ..wqe(3, wr_opcode::RDMA_WRITE, vec![la.sge(0, 5000)], &lb)
    };
    assert!(a.drv.post_send(&mut ea.qp, &w));
    assert_eq!(one(&a.drv, &mut ea.cq).status, 0);
    lb.read(b.drv.mem(), 100, &mut got);
    assert!(got == data, "WRITE corrupted");
    a.drv.destroy_mr(la).unwrap();
    b.drv.destroy_mr(lb).unwrap();
}
