//! A hostile tenant, for the soaks and the benches: one VM that does, in a loop and on threads
//! of its own, what a guest can do to cost the other tenants of its host (docs/security.md):
//!
//! - **host memory**: QPs with 8,192-deep receive queues of 16-SGE receives over one MR page,
//!   created until CREATE_QP fails with ENOMEM (its device's `max_host_mem` budget), every
//!   queue filled and taken by the device, then all destroyed, and again;
//! - **work**: 1 GiB RDMA WRITEs between two MRs that list one 4 KiB page 262,144 times,
//!   queued behind a stall (an RNR wait, or transport timeouts against a responder that is not
//!   ready yet), then released; they run out, or their QP is moved to ERR or RESET part way;
//! - **intrusion**: RC QPs aimed at other VMs' QPs (their QPN and GID, or a QPN next to it)
//!   with the rkeys of those VMs' MRs or guessed ones; where it can, from a QP with the very
//!   QPN of the victim's own peer, with the peer's GID bound in its own GID table.
//!
//! What a tenant must never get is an error of [`run`]: a success, or any answer but
//! `RETRY_EXC_ERR` and flushes, against another VM; bytes read from one; a WR of its own that
//! completes twice, never, or after its QP was reset. [`Tally`] counts what it did, as it goes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pvrdma_dev::abi::{wr_opcode, Cqe, QpAttr, WireSge};
use pvrdma_dev::regs::err;
use rdma_backend::WcStatus;
use vm_memory::{Bytes, GuestAddress};

use crate::driver::{qp_mask, rc_connect_attrs, Cq, Ctx, Driver, GuestError, Modify, Mr, Qp};
use crate::driver::{QpKind, SendWqe};
use crate::mem::GuestPdir;

/// 1 GiB.
pub const GIB: u64 = 1 << 30;
/// Pages of a 1 GiB MR: the most one page directory lists (512 tables of 512 entries).
pub const GIB_PAGES: usize = 262_144;
/// Receives per QP of the host-memory loop: the device's `max_qp_wr`.
pub const DEEP: u32 = 8192;
/// SGEs per receive of the host-memory loop.
pub const SGES: u32 = 16;

/// Local write, remote write, read and atomic.
const ACCESS: u32 = 1 | 2 | 4 | 8;
/// The longest a WR of the tenant's own may take to complete once nothing stalls it, and the
/// longest the device may take to take the receives of a round: generous (debug builds on two
/// busy cores), a hang and not a speed figure.
const HANG: Duration = Duration::from_secs(60);
/// How long the work loop leaves its WRs stalled before it releases them.
const STALL: Duration = Duration::from_millis(20);
/// How long the work loop lets its copies run before it cuts them short (when it does).
const CUT_AFTER: Duration = Duration::from_millis(50);
/// What the intruder's local buffer holds: a READ or an atomic that reached a victim would
/// change it.
const BAIT: u8 = 0xee;

type Result<T> = std::result::Result<T, String>;

fn e(what: &str) -> impl Fn(GuestError) -> String + '_ {
    move |err| format!("{what}: {err}")
}

/// A 1 GiB MR of `pd` at `iova` whose 262,144 pages are all `page`: 4 KiB of guest RAM. Free it
/// with [`free_aliased`] (`Driver::destroy_mr` would hand the page out 262,144 times).
pub fn aliased_gib(
    drv: &Driver,
    pd: u32,
    iova: u64,
    page: GuestAddress,
) -> std::result::Result<Mr, GuestError> {
    let pdir = GuestPdir::build(&drv.alloc, drv.mem(), vec![page; GIB_PAGES]);
    let (dir, tables) = (pdir.dir, pdir.tables.clone());
    drv.reg_mr_pdir(pd, iova, GIB, ACCESS, pdir)
        .inspect_err(|_| {
            drv.alloc.free(&tables);
            drv.alloc.free(&[dir]);
        })
}

/// Deregisters an MR made by [`aliased_gib`] and frees its directory, tables and page.
pub fn free_aliased(drv: &Driver, mut mr: Mr) -> std::result::Result<(), GuestError> {
    let pdir = mr.pdir.take();
    drv.destroy_mr(mr)?;
    if let Some(p) = pdir {
        drv.alloc.free(&p.tables);
        drv.alloc.free(&[p.dir]);
        drv.alloc.free(&p.pages[..1]);
    }
    Ok(())
}

/// QPs of [`DEEP`] receives of [`SGES`] SGEs each (one send WR), on `cq`, created until the
/// device refuses one with ENOMEM: what its budget lets one guest make it hold. An error if it
/// refuses with anything else, or has not refused after `cap` QPs (no budget), or on `stop`
/// (the QPs made so far are destroyed).
pub fn qps_to_the_budget(
    drv: &Driver,
    (ctx, pd, cq): (Ctx, u32, &Cq),
    cap: usize,
    stop: &dyn Fn() -> bool,
) -> Result<Vec<Qp>> {
    let mut qps = Vec::new();
    loop {
        let caps = (1, DEEP, 1, SGES);
        match drv.create_qp(ctx, QpKind::Rc, pd, cq, cq, None, caps, false) {
            Ok(qp) => qps.push(qp),
            Err(GuestError::Command { err, .. }) if err == err::ENOMEM => return Ok(qps),
            Err(x) => {
                destroy_all(drv, qps);
                return Err(format!("CREATE_QP refused with {x}, not ENOMEM"));
            }
        }
        if qps.len() >= cap || stop() {
            let n = qps.len();
            destroy_all(drv, qps);
            return Err(if n >= cap {
                format!("the device never refused a QP ({n} created): no budget?")
            } else {
                "stopped".into()
            });
        }
    }
}

fn destroy_all(drv: &Driver, qps: Vec<Qp>) {
    for qp in qps {
        let _ = drv.destroy_qp(qp);
    }
}

/// Moves each of `qps` to INIT, fills its receive queue with receives of `sges`, and waits
/// until the device has taken every one (up to [`HANG`]). Returns the receives posted.
pub fn fill_receive_queues(
    drv: &Driver,
    qps: &mut [Qp],
    sges: &[WireSge],
    stop: &dyn Fn() -> bool,
) -> Result<u64> {
    let [init, _, _] = rc_connect_attrs(0, [0; 16], 1);
    let mut n = 0;
    for qp in qps.iter_mut() {
        drv.modify_qp(qp, init).map_err(e("receive QP to INIT"))?;
        while drv.push_recv(qp, n, sges) {
            n += 1;
        }
        drv.doorbell(qp.ctx, pvrdma_dev::regs::uar::QP, qp.handle | (1 << 31));
        if stop() {
            return Ok(n);
        }
    }
    let t = Instant::now();
    while qps.iter().any(|q| !drv.rq_drained(q)) {
        if stop() {
            return Ok(n);
        }
        if t.elapsed() > HANG {
            return Err(format!("the device did not take {n} receives in {HANG:?}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(n)
}

/// A QP of another VM the intruder aims at, and MRs of that VM it tries to reach.
#[derive(Debug, Clone)]
pub struct Target {
    /// The QP's number.
    pub qpn: u32,
    /// The GID of its device.
    pub gid: [u8; 16],
    /// The QPN of the QP it is connected to (on another device): the intruder takes the same
    /// number on its own device when it can.
    pub peer_qpn: u32,
    /// The GID of that QP's device (the impostor binds it in its own table and sends from it).
    pub peer_gid: [u8; 16],
    /// MRs of the target's VM (iova, length, rkey): their rkeys are used as stolen, and guessed
    /// at.
    pub mrs: Vec<(u64, u64, u32)>,
}

impl Target {
    /// `qp` of the VM with `gid`, connected to `peer` of the VM with `peer_gid`, with `mrs`
    /// of the target's VM to aim at.
    pub fn new(qp: &Qp, gid: [u8; 16], peer: &Qp, peer_gid: [u8; 16], mrs: &[&Mr]) -> Target {
        Target {
            qpn: qp.qpn,
            gid,
            peer_qpn: peer.qpn,
            peer_gid,
            mrs: mrs.iter().map(|m| (m.iova, m.len, m.rkey)).collect(),
        }
    }
}

/// Which of the tenant's loops run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loops {
    /// QPs to the budget, filled, destroyed.
    pub mem: bool,
    /// Stalled 1 GiB WRITEs, released.
    pub copy: bool,
    /// WRs aimed at other VMs.
    pub intrude: bool,
}

impl Loops {
    /// All three.
    pub const ALL: Loops = Loops {
        mem: true,
        copy: true,
        intrude: true,
    };

    /// From a comma-separated list of `mem`, `copy` and `intrude`.
    pub fn parse(list: &str) -> Result<Loops> {
        let mut l = Loops {
            mem: false,
            copy: false,
            intrude: false,
        };
        for name in list.split(',') {
            match name {
                "mem" => l.mem = true,
                "copy" => l.copy = true,
                "intrude" => l.intrude = true,
                _ => return Err(format!("unknown loop `{name}` (mem, copy, intrude)")),
            }
        }
        Ok(l)
    }
}

impl fmt::Display for Loops {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on = [
            (self.mem, "mem"),
            (self.copy, "copy"),
            (self.intrude, "intrude"),
        ];
        let names: Vec<&str> = on.iter().filter(|o| o.0).map(|o| o.1).collect();
        f.write_str(&names.join(","))
    }
}

/// How the tenant runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opts {
    /// 1 GiB WRITEs per round of the work loop.
    pub gib_writes: u32,
    /// Which loops run.
    pub loops: Loops,
}

/// What the hostile tenant has done so far (each loop adds as it goes).
#[derive(Debug, Default)]
pub struct Tally {
    /// Rounds of the host-memory loop: QPs created to the budget, filled, destroyed.
    pub mem_rounds: AtomicU64,
    /// QPs created in those rounds (the one refused aside).
    pub mem_qps: AtomicU64,
    /// Receives posted to them, each taken by the device.
    pub receives: AtomicU64,
    /// Rounds of the work loop whose stalled WRs were released.
    pub released: AtomicU64,
    /// Rounds of the work loop that ended (their WRs run out, or cut short).
    pub copy_rounds: AtomicU64,
    /// 1 GiB WRITEs that completed with success.
    pub gib_written: AtomicU64,
    /// 1 GiB WRITEs flushed, or dropped by a RESET, part way.
    pub gib_cut: AtomicU64,
    /// WRs aimed at another VM (each `RETRY_EXC_ERR` or flushed).
    pub intrusions: AtomicU64,
    /// Intruder QPs that have the QPN of a victim's own peer.
    pub impostors: AtomicU64,
}

impl Tally {
    /// Whether each of `loops` is under way: QPs made, copies released, WRs aimed.
    pub fn every_loop_began(&self, loops: Loops) -> bool {
        let on = [loops.mem, loops.copy, loops.intrude];
        [&self.mem_qps, &self.released, &self.intrusions]
            .iter()
            .zip(on)
            .all(|(c, on)| !on || c.load(Ordering::Relaxed) > 0)
    }

    /// Whether each of `loops` has completed a round.
    pub fn every_loop_ran(&self, loops: Loops) -> bool {
        let on = [loops.mem, loops.copy, loops.intrude];
        [&self.mem_rounds, &self.copy_rounds, &self.intrusions]
            .iter()
            .zip(on)
            .all(|(c, on)| !on || c.load(Ordering::Relaxed) > 0)
    }

    /// The counters by name (for JSON lines).
    pub fn fields(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("mem_rounds", g(&self.mem_rounds)),
            ("mem_qps", g(&self.mem_qps)),
            ("receives", g(&self.receives)),
            ("released", g(&self.released)),
            ("copy_rounds", g(&self.copy_rounds)),
            ("gib_written", g(&self.gib_written)),
            ("gib_cut", g(&self.gib_cut)),
            ("intrusions", g(&self.intrusions)),
            ("impostors", g(&self.impostors)),
        ]
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v: BTreeMap<_, _> = self.fields().into_iter().collect();
        write!(
            f,
            "{} rounds to the budget ({} QPs, {} receives of {SGES} SGEs); {} rounds of stalled \
             1 GiB WRITEs ({} written, {} cut short); {} WRs aimed at other VMs ({} from a QP \
             with a victim's peer's QPN)",
            v["mem_rounds"],
            v["mem_qps"],
            v["receives"],
            v["copy_rounds"],
            v["gib_written"],
            v["gib_cut"],
            v["intrusions"],
            v["impostors"],
        )
    }
}

/// Runs the hostile tenant on the device of `drv` (whose GID 0 is `gid`) until `stop`: each of
/// `o.loops` on a thread of its own (`hostile-mem`, `hostile-copy`, `hostile-intrude`),
/// `o.gib_writes` 1 GiB WRITEs per round of the work loop, the intruder aimed at `targets` in
/// turn. Everything it made is destroyed before it returns; the first thing it saw that a
/// tenant must never see is its error.
pub fn run(
    drv: &Driver,
    gid: [u8; 16],
    targets: &[Target],
    o: Opts,
    tally: &Tally,
    stop: &AtomicBool,
) -> Result<()> {
    let loops = o.loops;
    assert!(!targets.is_empty(), "the intruder needs a target");
    let ctx = (1..drv.caps.max_uar)
        .rev()
        .find_map(|u| drv.create_uc(u).ok())
        .ok_or("no free UAR page")?;
    let pd = drv.create_pd(ctx).map_err(e("PD"))?;
    // The intruders first: QPNs are handed out in order, so the first QPs can take the numbers
    // of the victims' peers.
    let mut intruder = Intruder::new(drv, (ctx, pd), targets, tally)?;
    let mut copier = Copier::new(drv, (ctx, pd), o.gib_writes)?;
    let mem_cq = drv.create_cq(ctx, 64).map_err(e("CQ"))?;
    let one_page = drv.reg_mr(pd, 0x7e_0000_0000, 4096, 1).map_err(e("MR"))?;
    let failed = AtomicBool::new(false);
    let quit = || stop.load(Ordering::Relaxed) || failed.load(Ordering::Relaxed);
    let (intruder_ref, copier_ref, mem_cq_ref, one_page_ref) =
        (&mut intruder, &mut copier, &mem_cq, &one_page);
    let results = std::thread::scope(|s| {
        let threads = [
            on_thread(s, "hostile-mem", &failed, move || {
                let sges: Vec<_> = (0..u64::from(SGES))
                    .map(|i| one_page_ref.sge(i * 64, 64))
                    .collect();
                while loops.mem && !quit() {
                    let mut qps = match qps_to_the_budget(drv, (ctx, pd, mem_cq_ref), 4096, &quit) {
                        Err(_) if quit() => break,
                        r => r?,
                    };
                    tally.mem_qps.fetch_add(qps.len() as u64, Ordering::Relaxed);
                    let filled = fill_receive_queues(drv, &mut qps, &sges, &quit);
                    let done = !quit();
                    for qp in qps {
                        drv.destroy_qp(qp).map_err(e("DESTROY_QP"))?;
                    }
                    tally.receives.fetch_add(filled?, Ordering::Relaxed);
                    if done {
                        tally.mem_rounds.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(())
            }),
            on_thread(s, "hostile-copy", &failed, move || {
                let mut round = 0;
                while loops.copy && !quit() {
                    copier_ref.round(drv, gid, round, tally, &quit)?;
                    round += 1;
                }
                Ok(())
            }),
            on_thread(s, "hostile-intrude", &failed, move || {
                let mut round = 0;
                while loops.intrude && !quit() {
                    intruder_ref.round(drv, targets, round, tally)?;
                    round += 1;
                }
                Ok(())
            }),
        ];
        threads.map(|t| {
            t.join()
                .unwrap_or_else(|_| Err("a hostile thread panicked".into()))
        })
    });
    let cleanup = (|| {
        copier.free(drv)?;
        intruder.free(drv)?;
        drv.destroy_cq(mem_cq)?;
        drv.destroy_mr(one_page)?;
        drv.destroy_pd(pd)?;
        drv.destroy_uc(ctx)
    })()
    .map_err(e("cleanup"));
    results.into_iter().collect::<Result<Vec<()>>>()?;
    cleanup
}

/// Runs `f` on a thread named `name` of scope `s`; its error sets `failed` (the other loops
/// stop).
fn on_thread<'s, 'e: 's>(
    s: &'s std::thread::Scope<'s, 'e>,
    name: &str,
    failed: &'e AtomicBool,
    f: impl FnOnce() -> Result<()> + Send + 's,
) -> std::thread::ScopedJoinHandle<'s, Result<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn_scoped(s, move || {
            let r = f();
            if r.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
            r
        })
        .expect("spawn a hostile thread")
}

/// The work loop's objects: `h1` WRITEs from one aliased GiB to another at `h2` (both QPs of
/// the tenant's own device).
struct Copier {
    h1: Qp,
    cq1: Cq,
    h2: Qp,
    cq2: Cq,
    src: Mr,
    dst: Mr,
    /// What `h2`'s receive (the RNR round's release) lands in.
    small: Mr,
    k: u32,
}

impl Copier {
    fn new(drv: &Driver, (ctx, pd): (Ctx, u32), k: u32) -> Result<Copier> {
        let k = k.max(1);
        let cq1 = drv
            .create_cq(ctx, (2 * k).next_power_of_two())
            .map_err(e("CQ"))?;
        let cq2 = drv.create_cq(ctx, 16).map_err(e("CQ"))?;
        let h1 = drv
            .create_qp(ctx, QpKind::Rc, pd, &cq1, &cq1, None, (k, 1, 1, 1), false)
            .map_err(e("h1"))?;
        let h2 = drv
            .create_qp(ctx, QpKind::Rc, pd, &cq2, &cq2, None, (1, 4, 1, 1), false)
            .map_err(e("h2"))?;
        let (x, d) = (drv.alloc.page(drv.mem()), drv.alloc.page(drv.mem()));
        let fill: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        drv.mem()
            .write_slice(&fill, x)
            .expect("fill the source page");
        let src = aliased_gib(drv, pd, 0x10_0000_0000, x).map_err(e("1 GiB MR"))?;
        let dst = aliased_gib(drv, pd, 0x20_0000_0000, d).map_err(e("1 GiB MR"))?;
        let small = drv
            .reg_mr(pd, 0x30_0000_0000, 4096, ACCESS)
            .map_err(e("MR"))?;
        Ok(Copier {
            h1,
            cq1,
            h2,
            cq2,
            src,
            dst,
            small,
            k,
        })
    }

    /// One round: `k` 1 GiB WRITEs queued behind an RNR wait (odd rounds: the first carries an
    /// immediate, `h2` has no receive) or transport timeouts (even rounds: `h2` is in INIT),
    /// released, then run out, or cut short by ERR or RESET (in turn: every pairing within six
    /// rounds).
    fn round(
        &mut self,
        drv: &Driver,
        gid: [u8; 16],
        round: u64,
        tally: &Tally,
        quit: &dyn Fn() -> bool,
    ) -> Result<()> {
        let (rnr, cut) = (round % 2 == 1, round % 3);
        // h2 waits in INIT; h1 retries every 67 ms, 7 times, and waits out RNR NAKs without end.
        let [init, mut rtr, rts] = rc_connect_attrs(self.h1.qpn, gid, ACCESS);
        reconnect(drv, &mut self.h2, &[init]).map_err(|x| format!("h2: {x}"))?;
        let mut m = rc_connect_attrs(self.h2.qpn, gid, ACCESS);
        (m[2].attrs.timeout, m[2].attrs.retry_cnt) = (14, 7);
        m[2].attrs.rnr_retry = 7;
        reconnect(drv, &mut self.h1, &m).map_err(|x| format!("h1: {x}"))?;
        // What the last round left: h2's receive CQE, if its release landed before a cut.
        drv.wait_cqes(&mut self.cq2, 16, Duration::ZERO);
        let late = drv.wait_cqes(&mut self.cq1, 1, Duration::ZERO);
        if let Some(c) = late.first() {
            return Err(format!("a CQE after h1 was reset: {c:?}"));
        }
        // h2's RNR timer is 655 ms: the receive, not the timer, ends the RNR wait.
        rtr.attrs.min_rnr_timer = 0;
        let ready = |h2: &Qp| -> Result<()> {
            drv.modify_qp(h2, rtr).map_err(e("h2 to RTR"))?;
            drv.modify_qp(h2, rts).map_err(e("h2 to RTS"))
        };
        if rnr {
            ready(&self.h2)?;
        }
        for i in 0..self.k {
            let w = SendWqe {
                wr_id: round << 32 | u64::from(i),
                opcode: if rnr && i == 0 {
                    wr_opcode::RDMA_WRITE_WITH_IMM
                } else {
                    wr_opcode::RDMA_WRITE
                },
                flags: 2,
                imm: 0x0bad_cafe,
                sges: vec![self.src.sge(0, GIB as u32)],
                remote_addr: self.dst.iova,
                rkey: self.dst.rkey,
                ..Default::default()
            };
            if !drv.post_send(&mut self.h1, &w) {
                return Err("h1's send queue is full".into());
            }
        }
        // h1's first try meets the stall; then the stall is released.
        std::thread::sleep(STALL);
        if rnr {
            if !drv.post_recv(&mut self.h2, round, &[self.small.sge(0, 8)]) {
                return Err("h2's receive queue is full".into());
            }
        } else {
            ready(&self.h2)?;
        }
        let released = Instant::now();
        tally.released.fetch_add(1, Ordering::Relaxed);
        let (k, mut seen) = (self.k, BTreeMap::new());
        let take = |cq: &mut Cq, seen: &mut BTreeMap<u32, u32>, wait| {
            take_round(drv, cq, seen, (round, k), wait)
        };
        match cut {
            0 => {
                while seen.len() < k as usize && !quit() {
                    if released.elapsed() > HANG * k {
                        return Err(format!("h1: {} of {k} WRITEs completed", seen.len()));
                    }
                    take(&mut self.cq1, &mut seen, Duration::from_millis(10))?;
                }
            }
            _ => {
                take(&mut self.cq1, &mut seen, CUT_AFTER)?;
                if cut == 1 {
                    let to_err = Modify {
                        mask: qp_mask::STATE,
                        attrs: QpAttr {
                            qp_state: 6,
                            ..Default::default()
                        },
                    };
                    drv.modify_qp(&self.h1, to_err).map_err(e("h1 to ERR"))?;
                    let t = Instant::now();
                    while seen.len() < k as usize {
                        if t.elapsed() > HANG {
                            return Err(format!("h1 in ERR: {} of {k} WRs completed", seen.len()));
                        }
                        take(&mut self.cq1, &mut seen, Duration::from_millis(10))?;
                    }
                } else {
                    // RESET drops what is queued without a CQE: what completed before it is
                    // in the CQ when the command is answered; nothing of this round may come
                    // after (the next round looks).
                    drv.reset_qp(&mut self.h1).map_err(e("h1 to RESET"))?;
                    take(&mut self.cq1, &mut seen, Duration::ZERO)?;
                }
            }
        }
        // Successes first, then (when cut by ERR) flushes only.
        let ok = seen.values().take_while(|&&s| s == 0).count();
        let flushed = WcStatus::WrFlushErr as u32;
        if let Some((i, s)) = seen.iter().skip(ok).find(|(_, &s)| s != flushed) {
            return Err(format!(
                "h1: WR {i} of round {round} ended with status {s}: {seen:?}"
            ));
        }
        if quit() {
            return Ok(());
        }
        if ok > 0 {
            let mut a = vec![0u8; 4096];
            let mut b = vec![0u8; 4096];
            self.src.read(drv.mem(), 0, &mut a);
            self.dst.read(drv.mem(), 0, &mut b);
            if a != b {
                return Err("h1's WRITEs completed and the destination page differs".into());
            }
        }
        tally.copy_rounds.fetch_add(1, Ordering::Relaxed);
        tally.gib_written.fetch_add(ok as u64, Ordering::Relaxed);
        tally
            .gib_cut
            .fetch_add(u64::from(self.k) - ok as u64, Ordering::Relaxed);
        Ok(())
    }

    fn free(self, drv: &Driver) -> std::result::Result<(), GuestError> {
        drv.destroy_qp(self.h1)?;
        drv.destroy_qp(self.h2)?;
        drv.destroy_cq(self.cq1)?;
        drv.destroy_cq(self.cq2)?;
        free_aliased(drv, self.src)?;
        free_aliased(drv, self.dst)?;
        drv.destroy_mr(self.small)
    }
}

/// Moves `qp` to RESET (zeroing its ring indices, as the driver does) and then through `mods`.
/// A drain of the device under way across the RESET must not put the QP in ERR (a race the
/// device had): any failure here is one of the device's.
fn reconnect(drv: &Driver, qp: &mut Qp, mods: &[Modify]) -> Result<()> {
    drv.reset_qp(qp).map_err(e("to RESET"))?;
    mods.iter()
        .try_for_each(|m| drv.modify_qp(qp, *m))
        .map_err(|x| {
            let state = drv.query_qp(qp).map(|a| a.qp_state);
            format!("QP {} from RESET: {x} (then in state {state:?})", qp.qpn)
        })
}

/// Takes up to the rest of round `round`'s `k` CQEs from `cq` into `seen` (WR index → status),
/// waiting up to `wait`: a CQE of another round, or a second one of a WR, is an error.
fn take_round(
    drv: &Driver,
    cq: &mut Cq,
    seen: &mut BTreeMap<u32, u32>,
    (round, k): (u64, u32),
    wait: Duration,
) -> Result<()> {
    for c in drv.wait_cqes(cq, k as usize - seen.len(), wait) {
        let (r, i) = (c.wr_id >> 32, (c.wr_id & 0xffff_ffff) as u32);
        if r != round || i >= k {
            return Err(format!("h1: a CQE of no WR of round {round}: {c:?}"));
        }
        if seen.insert(i, c.status).is_some() {
            return Err(format!("h1: WR {i} of round {round} completed twice"));
        }
    }
    Ok(())
}

/// The intruder's objects: QPs (some with the QPN of a victim's peer), their CQ, and the buffer
/// its WRs send from and read into.
struct Intruder {
    qps: Vec<Qp>,
    cq: Cq,
    bait: Mr,
    rng: u64,
}

/// The opcodes an intruder tries, in turn.
const OPS: [u32; 6] = [
    wr_opcode::RDMA_WRITE,
    wr_opcode::RDMA_READ,
    wr_opcode::SEND,
    wr_opcode::RDMA_WRITE_WITH_IMM,
    wr_opcode::ATOMIC_FETCH_AND_ADD,
    wr_opcode::ATOMIC_CMP_AND_SWP,
];

impl Intruder {
    fn new(
        drv: &Driver,
        (ctx, pd): (Ctx, u32),
        targets: &[Target],
        tally: &Tally,
    ) -> Result<Intruder> {
        let cq = drv.create_cq(ctx, 16).map_err(e("CQ"))?;
        // QPs until the numbers of the victims' peers are passed (at least one).
        let peers: BTreeSet<u32> = targets.iter().map(|t| t.peer_qpn).collect();
        let last = peers.last().copied().unwrap_or(0);
        let mut qps = Vec::new();
        while qps.len() < 64 {
            let qp = drv
                .create_qp(ctx, QpKind::Rc, pd, &cq, &cq, None, (4, 4, 1, 1), false)
                .map_err(e("intruder QP"))?;
            let qpn = qp.qpn;
            qps.push(qp);
            if peers.contains(&qpn) {
                tally.impostors.fetch_add(1, Ordering::Relaxed);
            }
            if qpn >= last {
                break;
            }
        }
        let bait = drv
            .reg_mr(pd, 0x40_0000_0000, 4096, ACCESS)
            .map_err(e("MR"))?;
        bait.write(drv.mem(), 0, &[BAIT; 4096]);
        Ok(Intruder {
            qps,
            cq,
            bait,
            rng: 0x9e37_79b9_7f4a_7c15,
        })
    }

    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// One round against target `round % targets.len()`: 1-3 WRs from a QP aimed at it (from
    /// the one with its peer's QPN if there is one, sending from the peer's GID, which it binds
    /// to its own table for the round; every fourth round at a QPN just past the target's),
    /// with its MRs' rkeys or guessed ones: the first must end in `RETRY_EXC_ERR`, the rest be
    /// flushed, and the bait stay as it was.
    fn round(&mut self, drv: &Driver, targets: &[Target], round: u64, tally: &Tally) -> Result<()> {
        let t = &targets[(round % targets.len() as u64) as usize];
        let dest = if round % 4 == 3 {
            (t.qpn + 1 + (self.next() % 4) as u32) & 0xff_ffff
        } else {
            t.qpn
        };
        let stolen = (round / 4) % 2 == 0;
        let n = 1 + round % 3;
        let mut wrs = Vec::new();
        for w in 0..n {
            let (iova, len, rkey) = t.mrs[(self.next() % t.mrs.len() as u64) as usize];
            let rkey = if stolen { rkey } else { self.next() as u32 };
            let opcode = OPS[((round + w) % OPS.len() as u64) as usize];
            let atomic = matches!(
                opcode,
                wr_opcode::ATOMIC_FETCH_AND_ADD | wr_opcode::ATOMIC_CMP_AND_SWP
            );
            let size = if atomic {
                8
            } else {
                1 + self.next() % len.min(4096)
            };
            let at = (self.next() % (len - size + 1)) & !7;
            wrs.push(SendWqe {
                wr_id: round << 8 | w,
                opcode,
                flags: 2,
                imm: 0xbad,
                sges: vec![self.bait.sge(0, size as u32)],
                remote_addr: iova + at,
                rkey,
                compare_add: 1,
                swap: 0xbad0_bad0,
                ..Default::default()
            });
        }
        let impostor = self.qps.iter().position(|q| q.qpn == t.peer_qpn);
        let k = impostor.unwrap_or(round as usize % self.qps.len());
        let qp = &mut self.qps[k];
        // Once in a while (once per target in 256 rounds) the impostor binds the peer's GID
        // too: the device takes it into its table (the fabric keeps it its owner's, and
        // `pvrdma serve` logs a warning each time).
        let spoofed = impostor.is_some()
            && round % 256 < targets.len() as u64
            && drv.create_bind(1, t.peer_gid, 1).is_ok();
        // Transport timeout 8 µs, one retry: RETRY_EXC_ERR within a few timer ticks.
        let mut m = rc_connect_attrs(dest, t.gid, ACCESS);
        m[1].attrs.ah_attr.grh.sgid_index = u8::from(spoofed);
        (m[2].attrs.timeout, m[2].attrs.retry_cnt) = (1, 1);
        reconnect(drv, qp, &m).map_err(|x| format!("intruder: {x}"))?;
        if let Some(c) = drv.wait_cqes(&mut self.cq, 1, Duration::ZERO).first() {
            return Err(format!("an intruder's CQE after its QP was reset: {c:?}"));
        }
        for w in &wrs {
            if !drv.post_send(qp, w) {
                return Err("the intruder's send queue is full".into());
            }
        }
        let got: Vec<Cqe> = drv.wait_cqes(&mut self.cq, n as usize, HANG);
        let what = || {
            format!(
                "intruder QP {} to QPN {dest} of {:02x?} ({} rkeys): {got:?}",
                qp.qpn,
                t.gid,
                if stolen { "stolen" } else { "guessed" }
            )
        };
        if got.len() != n as usize {
            return Err(format!("{} of {n} WRs completed: {}", got.len(), what()));
        }
        for (w, c) in got.iter().enumerate() {
            let want = if w == 0 {
                WcStatus::RetryExcErr
            } else {
                WcStatus::WrFlushErr
            };
            if c.wr_id != wrs[w].wr_id || c.status != want as u32 {
                return Err(format!("WR {w} answered: {}", what()));
            }
        }
        let mut b = [0u8; 4096];
        self.bait.read(drv.mem(), 0, &mut b);
        if b.iter().any(|&x| x != BAIT) {
            return Err(format!("the intruder's buffer changed: {}", what()));
        }
        if spoofed {
            drv.destroy_bind(1, t.peer_gid)
                .map_err(e("unbind the peer's GID"))?;
        }
        tally.intrusions.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    fn free(self, drv: &Driver) -> std::result::Result<(), GuestError> {
        for qp in self.qps {
            drv.destroy_qp(qp)?;
        }
        drv.destroy_cq(self.cq)?;
        drv.destroy_mr(self.bait)
    }
}
