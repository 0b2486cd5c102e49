//! Shared set-up for the harness-driven integration tests.

pub mod vms;

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use pvrdma_dev::DeviceConfig;
use pvrdma_guest::transport::DEFAULT_RAM;
use pvrdma_guest::vfio::{ServeProcess, VfioUser};
use pvrdma_guest::{Driver, InProcess, Transport};
use rdma_backend::emulated::Fabric;

/// MAC of the test device (its default GID derives from it).
pub const MAC: [u8; 6] = [0x00, 0x50, 0x56, 0x12, 0x34, 0x56];

/// The device under test, in this process or in a `pvrdma serve` process over vfio-user.
pub enum Dev {
    /// In-process transport.
    Local(Arc<InProcess>),
    /// The vfio-user client of a `pvrdma serve` child process (held here: it stops when
    /// dropped).
    Remote {
        client: Arc<VfioUser>,
        _serve: ServeProcess,
    },
}

impl Dev {
    /// The transport, for a second probe after a reset.
    pub fn transport(&self) -> Arc<dyn Transport> {
        match self {
            Dev::Local(t) => t.clone(),
            Dev::Remote { client, .. } => client.clone(),
        }
    }

    /// Device counters (in-process only: the server process keeps its own).
    pub fn stats(&self) -> Option<pvrdma_dev::DeviceStats> {
        match self {
            Dev::Local(t) => t.device().stats().ok(),
            Dev::Remote { .. } => None,
        }
    }
}

/// Whether the suite runs over vfio-user against a real `pvrdma serve` process
/// (`PVRDMA_TRANSPORT=vfio-user`; `scripts/test` runs the suite both ways).
pub fn over_vfio_user() -> bool {
    std::env::var("PVRDMA_TRANSPORT").is_ok_and(|v| v == "vfio-user")
}

/// A device probed like the Linux driver does, over the transport the run selects.
pub fn probed() -> (Dev, Driver) {
    if over_vfio_user() {
        let (server, t, drv) = probed_vfio();
        (
            Dev::Remote {
                client: t,
                _serve: server,
            },
            drv,
        )
    } else {
        let (t, drv) = probed_local();
        (Dev::Local(t), drv)
    }
}

/// A device on its own fabric in this process, probed (tests that need the device's counters or
/// custom configurations).
pub fn probed_local() -> (Arc<InProcess>, Driver) {
    probed_on(&Fabric::new(), MAC)
}

/// A device with `mac` on `fabric`, probed.
pub fn probed_on(fabric: &Arc<Fabric>, mac: [u8; 6]) -> (Arc<InProcess>, Driver) {
    let cfg = DeviceConfig {
        mac,
        ..DeviceConfig::default()
    };
    probed_with(fabric, cfg)
}

/// A device with configuration `cfg` on `fabric`, probed.
pub fn probed_with(fabric: &Arc<Fabric>, cfg: DeviceConfig) -> (Arc<InProcess>, Driver) {
    let t = Arc::new(InProcess::new(cfg, DEFAULT_RAM, fabric));
    let drv = Driver::probe(t.clone() as Arc<dyn Transport>).expect("probe");
    (t, drv)
}

/// A `pvrdma serve` process (this package's binary) for a device with [`MAC`].
pub fn serve_process() -> ServeProcess {
    ServeProcess::spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_pvrdma")),
        &["--mac", "00:50:56:12:34:56", "--workers", "2"],
    )
    .expect("pvrdma serve starts")
}

/// A vfio-user client of `server`, probed like the Linux driver does.
pub fn probed_over(server: &ServeProcess) -> (Arc<VfioUser>, Driver) {
    let t = Arc::new(VfioUser::connect(server.socket()).expect("vfio-user connect"));
    let drv = Driver::probe(t.clone() as Arc<dyn Transport>).expect("probe over vfio-user");
    (t, drv)
}

/// Like [`probed`], but the device runs in a `pvrdma serve` process and the harness reaches it
/// over vfio-user. Keep the process alive as long as the driver.
pub fn probed_vfio() -> (ServeProcess, Arc<VfioUser>, Driver) {
    let server = serve_process();
    let (t, drv) = probed_over(&server);
    (server, t, drv)
}

use std::time::Duration;

use pvrdma_dev::abi::{wr_opcode, Cqe};
use pvrdma_guest::driver::rc_connect_attrs;
use pvrdma_guest::{Cq, Ctx, Qp, QpKind};

/// Generous wait for completions (debug builds on a loaded 2-core machine).
pub const WAIT: Duration = Duration::from_secs(20);

/// Remote access for test MRs and QPs: local write, remote write/read/atomic.
pub const ALL_ACCESS: u32 = 1 | 2 | 4 | 8;

/// Two connected RC QPs on one device, each with its own CQ, in user context `ctx`.
pub struct RcPair {
    pub ctx: Ctx,
    pub pd: u32,
    pub cq_a: Cq,
    pub cq_b: Cq,
    pub a: Qp,
    pub b: Qp,
    pub gid: [u8; 16],
}

/// The default GID of `mac`.
pub fn gid_of(mac: [u8; 6]) -> [u8; 16] {
    rdma_backend::Gid::from_mac(mac).0
}

/// A user context, GID 0 bound, and two RC QPs connected to each other (loopback).
pub fn rc_pair(drv: &Driver, mac: [u8; 6], depth: u32, sge: u32) -> RcPair {
    let gid = gid_of(mac);
    let _ = drv.create_bind(0, gid, 1);
    // The first free UAR page below the ones `fresh_ctx` hands out.
    let ctx = (1..300)
        .find_map(|u| drv.create_uc(u).ok())
        .expect("a free UAR page for the pair");
    let pd = drv.create_pd(ctx).expect("pd");
    let ((a, cq_a), (b, cq_b)) = connected_rc(drv, ctx, pd, gid, depth, sge);
    RcPair {
        ctx,
        pd,
        cq_a,
        cq_b,
        a,
        b,
        gid,
    }
}

/// Two RC QPs of `ctx` on `pd`, each with a CQ of its own, connected to each other through
/// `gid` (loopback), with `depth` WRs and `sge` SGEs per queue.
pub fn connected_rc(
    drv: &Driver,
    ctx: Ctx,
    pd: u32,
    gid: [u8; 16],
    depth: u32,
    sge: u32,
) -> ((Qp, Cq), (Qp, Cq)) {
    let cq_a = drv
        .create_cq(ctx, 4 * depth.next_power_of_two())
        .expect("cq a");
    let cq_b = drv
        .create_cq(ctx, 4 * depth.next_power_of_two())
        .expect("cq b");
    let caps = (depth, depth, sge, sge);
    let a = drv
        .create_qp(ctx, QpKind::Rc, pd, &cq_a, &cq_a, None, caps, false)
        .expect("qp a");
    let b = drv
        .create_qp(ctx, QpKind::Rc, pd, &cq_b, &cq_b, None, caps, false)
        .expect("qp b");
    for m in rc_connect_attrs(b.qpn, gid, ALL_ACCESS) {
        drv.modify_qp(&a, m).expect("modify a");
    }
    for m in rc_connect_attrs(a.qpn, gid, ALL_ACCESS) {
        drv.modify_qp(&b, m).expect("modify b");
    }
    ((a, cq_a), (b, cq_b))
}

/// A signaled SEND of one SGE.
pub fn send(wr_id: u64, sge: pvrdma_dev::abi::WireSge) -> pvrdma_guest::SendWqe {
    pvrdma_guest::SendWqe {
        wr_id,
        opcode: wr_opcode::SEND,
        flags: 2,
        sges: vec![sge],
        ..Default::default()
    }
}

/// A xorshift generator: deterministic random sizes, offsets and bytes for the soaks.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (0 for `n` = 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Deterministic test bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2654435761)
                .rotate_left(seed as u32 % 31) as u8
                ^ seed
        })
        .collect()
}

/// Waits for exactly one CQE.
pub fn one(drv: &Driver, cq: &mut Cq) -> Cqe {
    let v = drv.wait_cqes(cq, 1, WAIT);
    assert_eq!(v.len(), 1, "expected a CQE on CQ {}", cq.handle);
    v[0]
}

/// A free UAR page for a new user context (pages 300.. are left to the health check).
pub fn fresh_ctx(drv: &Driver) -> Ctx {
    (300..drv.caps.max_uar)
        .find_map(|u| drv.create_uc(u).ok())
        .expect("a free UAR page")
}

/// Fresh objects (context, PD, CQs, RC QPs, MRs), two ping-pong rounds, then everything freed.
pub fn assert_device_healthy(drv: &Driver) {
    let gid = gid_of(MAC);
    let _ = drv.create_bind(0, gid, 1);
    let ctx = fresh_ctx(drv);
    let pd = drv.create_pd(ctx).expect("healthy: pd");
    let mut cq_a = drv.create_cq(ctx, 16).expect("healthy: cq a");
    let mut cq_b = drv.create_cq(ctx, 16).expect("healthy: cq b");
    let caps = (4, 4, 1, 1);
    let mut a = drv
        .create_qp(ctx, QpKind::Rc, pd, &cq_a, &cq_a, None, caps, false)
        .expect("healthy: qp a");
    let mut b = drv
        .create_qp(ctx, QpKind::Rc, pd, &cq_b, &cq_b, None, caps, false)
        .expect("healthy: qp b");
    for m in rc_connect_attrs(b.qpn, gid, ALL_ACCESS) {
        drv.modify_qp(&a, m).expect("healthy: modify a");
    }
    for m in rc_connect_attrs(a.qpn, gid, ALL_ACCESS) {
        drv.modify_qp(&b, m).expect("healthy: modify b");
    }
    let ma = drv.reg_mr(pd, 0x7000_0000, 4096, ALL_ACCESS).unwrap();
    let mb = drv.reg_mr(pd, 0x7100_0000, 4096, ALL_ACCESS).unwrap();
    let mem = drv.mem();
    for round in 0..2u64 {
        let msg = pattern(64 + round as usize, round as u8);
        ma.write(mem, 0, &msg);
        assert!(drv.post_recv(&mut b, round, &[mb.sge(0, 4096)]));
        assert!(drv.post_send(&mut a, &send(100 + round, ma.sge(0, msg.len() as u32))));
        let s = one(drv, &mut cq_a);
        assert_eq!((s.wr_id, s.status), (100 + round, 0), "healthy: ping send");
        let r = one(drv, &mut cq_b);
        assert_eq!((r.wr_id, r.status), (round, 0), "healthy: ping recv");
        let mut got = vec![0u8; msg.len()];
        mb.read(mem, 0, &mut got);
        assert_eq!(got, msg, "healthy: payload");
        assert!(drv.post_recv(&mut a, round, &[ma.sge(0, 4096)]));
        assert!(drv.post_send(&mut b, &send(200 + round, mb.sge(0, 8))));
        assert_eq!(one(drv, &mut cq_b).status, 0, "healthy: pong send");
        assert_eq!(one(drv, &mut cq_a).status, 0, "healthy: pong recv");
    }
    drv.destroy_qp(a).unwrap();
    drv.destroy_qp(b).unwrap();
    drv.destroy_mr(ma).unwrap();
    drv.destroy_mr(mb).unwrap();
    drv.destroy_cq(cq_a).unwrap();
    drv.destroy_cq(cq_b).unwrap();
    drv.destroy_pd(pd).unwrap();
    drv.destroy_uc(ctx).unwrap();
}

/// Registers two `size`-byte MRs on `p`'s PD and posts `n` signaled RDMA WRITEs of the whole
/// buffer from `p.a`, without waiting: work in flight for reset/unmap/disconnect tests.
pub fn post_writes_in_flight(
    drv: &Driver,
    p: &mut RcPair,
    n: u64,
    size: u64,
) -> (pvrdma_guest::Mr, pvrdma_guest::Mr) {
    let local = drv.reg_mr(p.pd, 0x10_0000_0000, size, ALL_ACCESS).unwrap();
    let remote = drv.reg_mr(p.pd, 0x20_0000_0000, size, ALL_ACCESS).unwrap();
    for i in 0..n {
        let w = pvrdma_guest::SendWqe {
            wr_id: i,
            opcode: wr_opcode::RDMA_WRITE,
            flags: 2,
            sges: vec![local.sge(0, size as u32)],
            remote_addr: remote.iova,
            rkey: remote.rkey,
            ..Default::default()
        };
        assert!(drv.post_send(&mut p.a, &w));
    }
    (local, remote)
}

/// Open fds, threads and VmRSS (KiB) of process `pid`.
pub fn proc_counts(pid: u32) -> (usize, usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (fds, field("Threads:") as usize, field("VmRSS:"))
}

/// The ERR code of a command that must fail through the command channel (never 0).
pub fn err_of<T: std::fmt::Debug>(r: pvrdma_guest::driver::Result<T>) -> u32 {
    match r {
        Err(pvrdma_guest::GuestError::Command { err, .. }) => {
            assert_ne!(err, 0);
            err
        }
        other => panic!("expected a command failing through ERR, got {other:?}"),
    }
}

/// The tests share one process. Those that measure time or the process's CPU (hostile tenants,
/// faults, the tenant soak) run alone ([`alone`]); the others run side by side ([`shared`]).
static ROOM: RwLock<()> = RwLock::new(());

/// Held by a test that must have the process to itself.
pub fn alone() -> RwLockWriteGuard<'static, ()> {
    ROOM.write().unwrap_or_else(|e| e.into_inner())
}

/// Held by every other test.
pub fn shared() -> RwLockReadGuard<'static, ()> {
    ROOM.read().unwrap_or_else(|e| e.into_inner())
}
