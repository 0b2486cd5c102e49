//! perftest-style measurements over the harness: the same loops `ib_send_bw`, `ib_write_bw`,
//! `ib_read_bw`, `ib_atomic_bw` and `ib_send_lat` run, through the real guest rings.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pvrdma_dev::abi::{send_flags, wr_opcode, Cqe, RqWqeHdr, SqWqeHdr};
use pvrdma_dev::regs::uar;
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice,
};

use crate::driver::{idx, rc_connect_attrs, Cq, Ctx, Driver, Mr, Qp, QpKind, Result, SendWqe, Wq};
use crate::mem::{GuestPdir, PAGE};

/// What a test does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Test {
    /// SEND/RECV bandwidth.
    SendBw,
    /// RDMA WRITE bandwidth.
    WriteBw,
    /// RDMA READ bandwidth.
    ReadBw,
    /// Fetch-and-add rate.
    AtomicBw,
    /// SEND ping-pong latency.
    SendLat,
    /// RDMA WRITE ping-pong latency.
    WriteLat,
}

impl Test {
    /// perftest's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Test::SendBw => "send_bw",
            Test::WriteBw => "write_bw",
            Test::ReadBw => "read_bw",
            Test::AtomicBw => "atomic_bw",
            Test::SendLat => "send_lat",
            Test::WriteLat => "write_lat",
        }
    }
}

/// One measured case.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Test.
    pub test: Test,
    /// Message size in bytes.
    pub size: u64,
    /// Messages completed.
    pub iters: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Per-message latencies (latency tests only), sorted.
    pub lat: Vec<Duration>,
}

impl Sample {
    /// Bandwidth in MB/s (10^6 bytes).
    pub fn mb_per_s(&self) -> f64 {
        (self.size * self.iters) as f64 / self.elapsed.as_secs_f64() / 1e6
    }
    /// Messages per second, in millions.
    pub fn mmsg_per_s(&self) -> f64 {
        self.iters as f64 / self.elapsed.as_secs_f64() / 1e6
    }
    /// Latency percentile in µs (latency tests), or mean time per message.
    pub fn lat_us(&self, pct: f64) -> f64 {
        if self.lat.is_empty() {
            return self.elapsed.as_secs_f64() * 1e6 / self.iters.max(1) as f64;
        }
        let i = ((self.lat.len() - 1) as f64 * pct).round() as usize;
        self.lat[i].as_secs_f64() * 1e6
    }
}

/// A connected RC pair with MRs on both sides, as a perftest client and server in one guest.
#[derive(Debug)]
pub struct Pair {
    /// User context of the client side.
    pub ctx: Ctx,
    /// PD of the client side.
    pub pd: u32,
    /// User context of the server side (`ctx` when both sides are on one device).
    pub ctx_b: Ctx,
    /// Client CQ.
    pub cq_a: Cq,
    /// Server CQ.
    pub cq_b: Cq,
    /// Client QP.
    pub a: Qp,
    /// Server QP.
    pub b: Qp,
    /// Client buffer.
    pub mr_a: Mr,
    /// Server buffer.
    pub mr_b: Mr,
    /// Send queue depth: WRs in flight at most.
    pub depth: u32,
    /// Receive queue depth ([`rx_depth`]): receives a SEND run keeps posted ahead of its sends.
    pub rx_depth: u32,
}

/// The receives a SEND bandwidth run keeps posted for a send window of `depth`: four times as
/// many, as perftest's `ib_send_bw` does (`rx_depth` 512 for `tx_depth` 128), so that a receive
/// has reached the server's device well before the send that uses it, also when the two sides
/// are different devices whose doorbells race (capped at the device's 8,192 WRs per queue).
pub fn rx_depth(depth: u32) -> u32 {
    depth.saturating_mul(4).min(8192).max(depth)
}

/// Full access.
const ACCESS: u32 = 1 | 2 | 4 | 8;

/// One side of a [`Pair`]: a device's driver, a UAR page for the side's user context, and
/// the device's GID.
#[derive(Debug, Clone, Copy)]
pub struct Side<'d> {
    /// The driver of the side's device.
    pub drv: &'d Driver,
    /// UAR page of the side's new user context.
    pub uar: u32,
    /// The GID the other side connects to.
    pub gid: [u8; 16],
}

impl Pair {
    /// Creates a pair in a new user context on UAR page `uar`, with `buf` bytes per side.
    pub fn new(drv: &Driver, uar: u32, gid: [u8; 16], depth: u32, buf: u64) -> Result<Pair> {
        let side = Side { drv, uar, gid };
        Pair::build(side, None, depth, buf)
    }

    /// Creates a pair whose client is on `a`'s device and whose server is on `b`'s (two VMs),
    /// each side in a new user context, with `buf` bytes per side.
    pub fn between(a: Side<'_>, b: Side<'_>, depth: u32, buf: u64) -> Result<Pair> {
        Pair::build(a, Some(b), depth, buf)
    }

    /// Side `b` on its own device, or (`None`) in `a`'s context.
    fn build(a: Side<'_>, b: Option<Side<'_>>, depth: u32, buf: u64) -> Result<Pair> {
        let ctx = a.drv.create_uc(a.uar)?;
        let pd = a.drv.create_pd(ctx)?;
        let (db, ctx_b, pd_b, gid_b) = match b {
            Some(b) => {
                let c = b.drv.create_uc(b.uar)?;
                (b.drv, c, b.drv.create_pd(c)?, b.gid)
            }
            None => (a.drv, ctx, pd, a.gid),
        };
        let rx = rx_depth(depth);
        let cq_a = a.drv.create_cq(ctx, (2 * depth).next_power_of_two())?;
        let cq_b = db.create_cq(ctx_b, (depth + rx).next_power_of_two())?;
        let qa = a.drv.create_qp(
            ctx,
            QpKind::Rc,
            pd,
            &cq_a,
            &cq_a,
            None,
            (depth, depth, 1, 1),
            false,
        )?;
        let qb = db.create_qp(
            ctx_b,
            QpKind::Rc,
            pd_b,
            &cq_b,
            &cq_b,
            None,
            (depth, rx, 1, 1),
            false,
        )?;
        for m in rc_connect_attrs(qb.qpn, gid_b, ACCESS) {
            a.drv.modify_qp(&qa, m)?;
        }
        for m in rc_connect_attrs(qa.qpn, a.gid, ACCESS) {
            db.modify_qp(&qb, m)?;
        }
        let mr_a = a.drv.reg_mr(pd, 0x7f10_0000_0000, buf, ACCESS)?;
        let mr_b = db.reg_mr(pd_b, 0x7f20_0000_0000, buf, ACCESS)?;
        let (a, b) = (qa, qb);
        Ok(Pair {
            ctx,
            pd,
            ctx_b,
            cq_a,
            cq_b,
            a,
            b,
            mr_a,
            mr_b,
            depth,
            rx_depth: rx,
        })
    }
}

fn wqe(p: &Pair, test: Test, size: u64, i: u64) -> SendWqe {
    let len = size as u32;
    match test {
        Test::SendBw | Test::SendLat => SendWqe {
            wr_id: i,
            opcode: wr_opcode::SEND,
            flags: 2,
            sges: vec![p.mr_a.sge(0, len)],
            ..Default::default()
        },
        Test::WriteBw | Test::WriteLat => SendWqe {
            wr_id: i,
            opcode: wr_opcode::RDMA_WRITE,
            flags: 2,
            sges: vec![p.mr_a.sge(0, len)],
            remote_addr: p.mr_b.iova,
            rkey: p.mr_b.rkey,
            ..Default::default()
        },
        Test::ReadBw => SendWqe {
            wr_id: i,
            opcode: wr_opcode::RDMA_READ,
            flags: 2,
            sges: vec![p.mr_a.sge(0, len)],
            remote_addr: p.mr_b.iova,
            rkey: p.mr_b.rkey,
            ..Default::default()
        },
        Test::AtomicBw => SendWqe {
            wr_id: i,
            opcode: wr_opcode::ATOMIC_FETCH_AND_ADD,
            flags: 2,
            sges: vec![p.mr_a.sge(0, 8)],
            remote_addr: p.mr_b.iova,
            rkey: p.mr_b.rkey,
            compare_add: 1,
            ..Default::default()
        },
    }
}

fn check(c: &Cqe) -> Result<()> {
    if c.status != 0 {
        return Err(crate::driver::GuestError::Command {
            cmd: 1000 + c.opcode,
            err: c.status,
        });
    }
    Ok(())
}

const STALL: Duration = Duration::from_secs(30);

/// Empty polls of a bandwidth loop before it starts yielding its core.
const IDLE_SPINS: u32 = 64;

/// Empty polls of a latency step before it starts yielding its core.
const LAT_SPINS: u32 = 64;

/// A ping-pong step that takes longer than this is reported as stalled.
const LAT_STALL: Duration = Duration::from_secs(2);

/// A bandwidth test: keeps `depth` WQEs in flight, posting in batches with one doorbell each.
pub fn bw(drv: &Driver, p: &mut Pair, test: Test, size: u64, iters: u64) -> Result<Sample> {
    let depth = u64::from(p.depth);
    let mut posted = 0u64;
    let mut done = 0u64;
    let mut recv_posted = 0u64;
    let is_send = test == Test::SendBw;
    let start = Instant::now();
    while done < iters {
        if is_send {
            // Keep the server's RQ full.
            let mut n = 0;
            while recv_posted < iters && recv_posted - done < depth {
                let sge = p.mr_b.sge(0, size.max(1) as u32);
                if !drv.push_recv(&mut p.b, recv_posted, &[sge]) {
                    break;
                }
                recv_posted += 1;
                n += 1;
            }
            if n > 0 {
                drv.doorbell(p.ctx, 0, p.b.handle | (1 << 31));
            }
        }
        let mut n = 0;
        while posted < iters && posted - done < depth {
            let w = wqe(p, test, size, posted);
            if !drv.push_send(&mut p.a, &w) {
                break;
            }
            posted += 1;
            n += 1;
        }
        if n > 0 {
            drv.ring_sq(&p.a);
        }
        let before = done;
        let t0 = Instant::now();
        while done == before {
            while let Some(c) = drv.poll_cq(&mut p.cq_a) {
                check(&c)?;
                done += 1;
            }
            if is_send {
                while let Some(c) = drv.poll_cq(&mut p.cq_b) {
                    check(&c)?;
                }
            }
            if done == before {
                if t0.elapsed() > STALL {
                    return Err(crate::driver::GuestError::Timeout(test as u32));
                }
                std::hint::spin_loop();
            }
        }
    }
    let elapsed = start.elapsed();
    if is_send {
        // Drain the server's remaining completions.
        while drv.poll_cq(&mut p.cq_b).is_some() {}
    }
    Ok(Sample {
        test,
        size,
        iters,
        elapsed,
        lat: Vec::new(),
    })
}

/// `ib_send_lat`: ping-pong of `size` bytes; latency is half the round trip.
pub fn send_lat(drv: &Driver, p: &mut Pair, size: u64, iters: u64) -> Result<Sample> {
    let mut lat = Vec::with_capacity(iters as usize);
    let start = Instant::now();
    for i in 0..iters {
        let t0 = Instant::now();
        let sb = p.mr_b.sge(0, size.max(1) as u32);
        drv.post_recv(&mut p.b, i, &[sb]);
        let w = wqe(p, Test::SendLat, size, i);
        drv.post_send(&mut p.a, &w);
        let r = drv.wait_cqes(&mut p.cq_b, 1, STALL);
        let s = drv.wait_cqes(&mut p.cq_a, 1, STALL);
        if r.len() != 1 || s.len() != 1 {
            return Err(crate::driver::GuestError::Timeout(0));
        }
        check(&r[0])?;
        // pong
        let sa = p.mr_a.sge(0, size.max(1) as u32);
        drv.post_recv(&mut p.a, i, &[sa]);
        let pong = SendWqe {
            sges: vec![p.mr_b.sge(0, size as u32)],
            ..wqe(p, Test::SendLat, size, i)
        };
        drv.post_send(&mut p.b, &pong);
        let mut got = 0;
        let t1 = Instant::now();
        while got < 2 {
            if let Some(c) = drv.poll_cq(&mut p.cq_a) {
                check(&c)?;
                got += 1;
            }
            if let Some(c) = drv.poll_cq(&mut p.cq_b) {
                check(&c)?;
                got += 1;
            }
            if t1.elapsed() > STALL {
                return Err(crate::driver::GuestError::Timeout(0));
            }
        }
        lat.push(t0.elapsed() / 2);
    }
    let elapsed = start.elapsed();
    lat.sort_unstable();
    Ok(Sample {
        test: Test::SendLat,
        size,
        iters,
        elapsed,
        lat,
    })
}

/// Prints perftest's table header.
pub fn header() -> String {
    format!(
        "{:<10} {:>10} {:>10} {:>14} {:>12} {:>12} {:>12}",
        "test", "bytes", "iters", "BW avg[MB/s]", "MsgRate[Mpps]", "lat p50[us]", "lat p99[us]"
    )
}

/// One table row.
pub fn row(s: &Sample) -> String {
    format!(
        "{:<10} {:>10} {:>10} {:>14.2} {:>12.4} {:>12.2} {:>12.2}",
        s.test.name(),
        s.size,
        s.iters,
        s.mb_per_s(),
        s.mmsg_per_s(),
        s.lat_us(0.5),
        s.lat_us(0.99)
    )
}

// ---- the lean posting path (what perftest itself does) ------------------------------------
//
// perftest builds its WQEs once, posts a list of them per doorbell, signals only every Nth
// send (`--cq-mod`) and polls the CQ in bursts. The loops below do the same through the real
// rings: every slot of a queue gets the WQE template once, a post rewrites only `wr_id` and
// `send_flags`, the producer index is published once per batch, and one doorbell follows.

/// How a bandwidth run posts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BwOpts {
    /// Message size in bytes.
    pub size: u64,
    /// Messages per QP pair.
    pub iters: u64,
    /// WQEs written per doorbell (perftest's `--post_list`).
    pub batch: u32,
    /// Every Nth send is signaled (perftest's `--cq-mod`); 1 signals every send.
    pub sig_every: u32,
}

/// One queue's slots as host-visible slices, with the producer index kept locally.
struct RingWriter<'m> {
    slots: Vec<VolatileSlice<'m, ()>>,
    state: GuestAddress,
    n: u32,
    prod: u32,
    head: u32,
}

impl<'m> RingWriter<'m> {
    /// Writes `tmpl` into every slot of `wq` (pages of `pdir`).
    fn new(mem: &'m GuestMemoryMmap, pdir: &GuestPdir, wq: &Wq, tmpl: &[u8]) -> RingWriter<'m> {
        let slots: Vec<_> = (0..wq.n)
            .map(|i| {
                let off = wq.base + u64::from(i) * u64::from(wq.wqe_size);
                let s = mem
                    .get_slice(pdir.addr(off), wq.wqe_size as usize)
                    .expect("WQE slot inside one page");
                s.write_slice(&tmpl[..tmpl.len().min(wq.wqe_size as usize)], 0)
                    .expect("template");
                s
            })
            .collect();
        let state = pdir.pages[0].unchecked_add(wq.state);
        let head = mem
            .load(state.unchecked_add(4), Ordering::Acquire)
            .unwrap_or(0);
        RingWriter {
            slots,
            state,
            n: wq.n,
            prod: wq.prod,
            head,
        }
    }

    /// Whether a slot is free (`tail != head ^ N`), reloading the consumer index when needed.
    fn space(&mut self, mem: &GuestMemoryMmap) -> bool {
        if self.prod == self.head ^ self.n {
            self.head = mem
                .load(self.state.unchecked_add(4), Ordering::Acquire)
                .unwrap_or(self.head);
        }
        self.prod != self.head ^ self.n
    }

    /// Fills the next slot: `wr_id`, and `send_flags` for a send queue.
    fn push(&mut self, wr_id: u64, flags: Option<u32>) {
        let s = &self.slots[idx::slot(self.prod, self.n) as usize];
        let _ = s.write_obj(wr_id, 0);
        if let Some(f) = flags {
            let _ = s.write_obj(f, 20);
        }
        self.prod = idx::inc(self.prod, self.n);
    }

    /// Publishes everything pushed so far (release store of `prod_tail`).
    fn publish(&self, mem: &GuestMemoryMmap) {
        let _ = mem.store(self.prod, self.state, Ordering::Release);
    }
}

/// A CQ read in bursts through host-visible slices.
struct CqReader<'m> {
    slots: Vec<VolatileSlice<'m, ()>>,
    state: GuestAddress,
    n: u32,
    cons: u32,
}

impl<'m> CqReader<'m> {
    fn new(mem: &'m GuestMemoryMmap, cq: &Cq) -> CqReader<'m> {
        let slots = (0..cq.n)
            .map(|i| {
                mem.get_slice(cq.pdir.addr(PAGE + u64::from(i) * 64), 64)
                    .expect("CQE inside one page")
            })
            .collect();
        CqReader {
            slots,
            state: cq.pdir.pages[0].unchecked_add(8),
            n: cq.n,
            cons: cq.cons,
        }
    }

    /// Takes every CQE available; returns how many, or the first error completion.
    fn poll(&mut self, mem: &GuestMemoryMmap, mut f: impl FnMut(&Cqe)) -> Result<u32> {
        let tail: u32 = mem.load(self.state, Ordering::Acquire).unwrap_or(self.cons);
        if tail == self.cons || !idx::valid(tail, self.n) {
            return Ok(0);
        }
        let mut got = 0;
        while self.cons != tail {
            let c: Cqe = self.slots[idx::slot(self.cons, self.n) as usize]
                .read_obj(0)
                .unwrap_or_default();
            check(&c)?;
            f(&c);
            self.cons = idx::inc(self.cons, self.n);
            got += 1;
        }
        let _ = mem.store(self.cons, self.state.unchecked_add(4), Ordering::Release);
        Ok(got)
    }
}

/// The send WQE template of `test` (flags and `wr_id` are filled per post).
fn template(p: &Pair, test: Test, size: u64, wqe_size: u32) -> Vec<u8> {
    let w = wqe(p, test, size, 0);
    let mut hdr = SqWqeHdr {
        num_sge: 1,
        total_len: size as u32,
        opcode: w.opcode,
        ..Default::default()
    };
    {
        let b = hdr.as_mut_slice();
        b[32..40].copy_from_slice(&w.remote_addr.to_le_bytes());
        if test == Test::AtomicBw {
            b[40..48].copy_from_slice(&w.compare_add.to_le_bytes());
            b[56..60].copy_from_slice(&w.rkey.to_le_bytes());
        } else {
            b[40..44].copy_from_slice(&w.rkey.to_le_bytes());
        }
    }
    let mut bytes = hdr.as_slice().to_vec();
    bytes.extend_from_slice(w.sges[0].as_slice());
    bytes.resize(wqe_size as usize, 0);
    bytes
}

fn recv_template(p: &Pair, size: u64) -> Vec<u8> {
    let hdr = RqWqeHdr {
        wr_id: 0,
        num_sge: 1,
        total_len: 0,
    };
    let mut bytes = hdr.as_slice().to_vec();
    bytes.extend_from_slice(p.mr_b.sge(0, size.max(1) as u32).as_slice());
    bytes
}

/// One pair's state in a lean bandwidth loop.
struct Lane<'m> {
    sq: RingWriter<'m>,
    rq: Option<RingWriter<'m>>,
    cq_a: CqReader<'m>,
    cq_b: Option<CqReader<'m>>,
    posted: u64,
    done: u64,
    recv_posted: u64,
    recv_done: u64,
}

/// A lean bandwidth test over `pairs` (each pair moves `o.iters` messages), driven from the
/// calling thread. Returns the aggregate sample (iters = all messages of all pairs).
pub fn bw_lean(drv: &Driver, pairs: &mut [Pair], test: Test, o: BwOpts) -> Result<Sample> {
    bw_lean_between(drv, drv, pairs, test, o)
}

/// [`bw_lean`] over pairs whose clients are on `da`'s device and servers on `db`'s
/// ([`Pair::between`]; the same driver twice for pairs of one device).
pub fn bw_lean_between(
    da: &Driver,
    db: &Driver,
    pairs: &mut [Pair],
    test: Test,
    o: BwOpts,
) -> Result<Sample> {
    let drivers = vec![(da, db); pairs.len()];
    bw_lean_on(&drivers, pairs, test, o)
}

/// [`bw_lean`] over pairs each on its own devices: `drivers[i]` are the client's and the
/// server's drivers of `pairs[i]`.
pub fn bw_lean_on(
    drivers: &[(&Driver, &Driver)],
    pairs: &mut [Pair],
    test: Test,
    o: BwOpts,
) -> Result<Sample> {
    bw_lean_until(drivers, pairs, test, o, None)
}

/// [`bw_lean_on`] that also ends, early, once `stop` is set: no more WRs are posted, the
/// signaled ones in flight are waited for, and the sample counts the messages completed up to
/// the last signaled one (a load generator; the pairs are not for further use then, since up
/// to `sig_every - 1` unsignaled sends may still be in flight).
pub fn bw_lean_until(
    drivers: &[(&Driver, &Driver)],
    pairs: &mut [Pair],
    test: Test,
    o: BwOpts,
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> Result<Sample> {
    assert_eq!(drivers.len(), pairs.len(), "a driver pair per QP pair");
    let is_send = test == Test::SendBw;
    let sig = u64::from(o.sig_every.max(1));
    let batch = o.batch.max(1);
    let mut lanes: Vec<Lane<'_>> = pairs
        .iter()
        .zip(drivers)
        .map(|(p, (da, db))| {
            let (mem, mem_b) = (da.mem(), db.mem());
            Lane {
                sq: RingWriter::new(
                    mem,
                    &p.a.pdir,
                    &p.a.sq,
                    &template(p, test, o.size, p.a.sq.wqe_size),
                ),
                rq: is_send.then(|| {
                    let rq = p.b.rq.as_ref().expect("RQ");
                    RingWriter::new(mem_b, &p.b.pdir, rq, &recv_template(p, o.size))
                }),
                cq_a: CqReader::new(mem, &p.cq_a),
                cq_b: is_send.then(|| CqReader::new(mem_b, &p.cq_b)),
                posted: 0,
                done: 0,
                recv_posted: 0,
                recv_done: 0,
            }
        })
        .collect();
    let iters = o.iters;
    let start = Instant::now();
    let mut idle_since: Option<Instant> = None;
    let mut idle_polls = 0u32;
    loop {
        let mut progress = false;
        let mut finished = 0;
        for ((l, p), (da, db)) in lanes.iter_mut().zip(pairs.iter()).zip(drivers) {
            let (mem, mem_b) = (da.mem(), db.mem());
            let depth = u64::from(p.depth);
            if let Some(rq) = l.rq.as_mut() {
                let mut n = 0;
                while l.recv_posted < iters
                    && l.recv_posted - l.recv_done < u64::from(p.rx_depth)
                    && rq.space(mem_b)
                {
                    rq.push(l.recv_posted, None);
                    l.recv_posted += 1;
                    n += 1;
                }
                if n > 0 {
                    rq.publish(mem_b);
                    db.doorbell(p.ctx_b, uar::QP, p.b.handle | (1 << 31));
                }
            }
            let stopping = stop.is_some_and(|s| s.load(Ordering::Relaxed));
            let limit = if stopping {
                l.posted
            } else if is_send {
                l.recv_posted
            } else {
                iters
            };
            let mut n = 0;
            while n < batch && l.posted < limit && l.posted - l.done < depth && l.sq.space(mem) {
                let i = l.posted;
                let signaled = (i + 1) % sig == 0 || i + 1 == iters;
                l.sq.push(i, Some(if signaled { send_flags::SIGNALED } else { 0 }));
                l.posted += 1;
                n += 1;
            }
            if n > 0 {
                l.sq.publish(mem);
                da.ring_sq(&p.a);
                progress = true;
            }
            let mut last = None;
            if l.cq_a.poll(mem, |c| last = Some(c.wr_id))? > 0 {
                progress = true;
            }
            if let Some(w) = last {
                l.done = w + 1;
            }
            if let Some(cq) = l.cq_b.as_mut() {
                let got = cq.poll(mem_b, |_| {})?;
                l.recv_done += u64::from(got);
                progress |= got > 0;
            }
            if (l.done >= iters && (!is_send || l.recv_done >= iters))
                || (stopping && l.done + sig > l.posted)
            {
                finished += 1;
            }
        }
        if finished == lanes.len() {
            break;
        }
        if progress {
            idle_since = None;
            idle_polls = 0;
        } else {
            let t = *idle_since.get_or_insert_with(Instant::now);
            if t.elapsed() > STALL {
                return Err(crate::driver::GuestError::Timeout(test as u32));
            }
            idle_polls += 1;
            if idle_polls > IDLE_SPINS {
                // Nothing to do for a while: let the device's threads have this core (on a
                // 2-core host the harness, the main loop and a worker share two cores).
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
    let elapsed = start.elapsed();
    for ((l, p), _) in lanes.iter().zip(pairs.iter_mut()).zip(0..) {
        p.a.sq.prod = l.sq.prod;
        p.cq_a.cons = l.cq_a.cons;
        if let (Some(rq), Some(w)) = (l.rq.as_ref(), p.b.rq.as_mut()) {
            w.prod = rq.prod;
        }
        if let Some(cq) = l.cq_b.as_ref() {
            p.cq_b.cons = cq.cons;
        }
    }
    Ok(Sample {
        test,
        size: o.size,
        iters: lanes.iter().map(|l| l.done.min(iters)).sum(),
        elapsed,
        lat: Vec::new(),
    })
}

/// [`bw_lean`] over `pairs` split across `threads` harness threads; the aggregate rate.
pub fn bw_lean_threads(
    drv: &Driver,
    pairs: &mut [Pair],
    test: Test,
    o: BwOpts,
    threads: usize,
) -> Result<Sample> {
    let threads = threads.clamp(1, pairs.len().max(1));
    if threads == 1 {
        return bw_lean(drv, pairs, test, o);
    }
    let per = pairs.len().div_ceil(threads);
    let start = Instant::now();
    let results: Vec<Result<Sample>> = std::thread::scope(|s| {
        let hs: Vec<_> = pairs
            .chunks_mut(per)
            .map(|chunk| s.spawn(move || bw_lean(drv, chunk, test, o)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("harness thread"))
            .collect()
    });
    let elapsed = start.elapsed();
    let mut total = 0;
    for r in results {
        total += r?.iters;
    }
    Ok(Sample {
        test,
        size: o.size,
        iters: total,
        elapsed,
        lat: Vec::new(),
    })
}

/// perftest's `ib_send_lat` with pre-posted receives: ping-pong, half the round trip.
pub fn send_lat_lean(drv: &Driver, p: &mut Pair, size: u64, iters: u64) -> Result<Sample> {
    lat_lean(drv, drv, p, Test::SendLat, size, iters)
}

/// [`send_lat_lean`] over a pair whose client is on `da`'s device and server on `db`'s.
pub fn send_lat_between(
    da: &Driver,
    db: &Driver,
    p: &mut Pair,
    size: u64,
    iters: u64,
) -> Result<Sample> {
    lat_lean(da, db, p, Test::SendLat, size, iters)
}

/// perftest's `ib_write_lat`: each side RDMA-writes into the other's buffer and spins on the
/// buffer's last byte; half the round trip.
pub fn write_lat(drv: &Driver, p: &mut Pair, size: u64, iters: u64) -> Result<Sample> {
    lat_lean(drv, drv, p, Test::WriteLat, size, iters)
}

fn lat_lean(
    da: &Driver,
    db: &Driver,
    p: &mut Pair,
    test: Test,
    size: u64,
    iters: u64,
) -> Result<Sample> {
    let (mem, mem_b) = (da.mem(), db.mem());
    let size = size.max(1);
    let is_send = test == Test::SendLat;
    let kind = if is_send {
        Test::SendLat
    } else {
        Test::WriteBw
    };
    // Each side sends from the first half of its buffer and is written into the second half
    // (`land`), so a late pong can never overwrite the tag of the next ping's source.
    let land = (p.mr_a.len.min(p.mr_b.len) / 2) & !(PAGE - 1);
    assert!(land >= size, "latency buffers need 2 x size bytes");
    let ta = template(p, kind, size, p.a.sq.wqe_size);
    let mut tb = ta.clone();
    let mut ta = ta;
    {
        let sge = p.mr_b.sge(0, size as u32);
        tb[80..96].copy_from_slice(sge.as_slice());
        if !is_send {
            ta[32..40].copy_from_slice(&(p.mr_b.iova + land).to_le_bytes());
            tb[32..40].copy_from_slice(&(p.mr_a.iova + land).to_le_bytes());
            tb[40..44].copy_from_slice(&p.mr_a.rkey.to_le_bytes());
        }
    }
    let mut sqa = RingWriter::new(mem, &p.a.pdir, &p.a.sq, &ta);
    let mut sqb = RingWriter::new(mem_b, &p.b.pdir, &p.b.sq, &tb);
    let mut cqa = CqReader::new(mem, &p.cq_a);
    let mut cqb = CqReader::new(mem_b, &p.cq_b);
    let rq_tmpl = |mr: &Mr| {
        let hdr = RqWqeHdr {
            wr_id: 0,
            num_sge: 1,
            total_len: 0,
        };
        let mut bytes = hdr.as_slice().to_vec();
        bytes.extend_from_slice(mr.sge(land, size as u32).as_slice());
        bytes
    };
    let (ra, rb) = (rq_tmpl(&p.mr_a), rq_tmpl(&p.mr_b));
    let mut rqa =
        p.a.rq
            .as_ref()
            .map(|w| RingWriter::new(mem, &p.a.pdir, w, &ra))
            .expect("RQ");
    let mut rqb =
        p.b.rq
            .as_ref()
            .map(|w| RingWriter::new(mem_b, &p.b.pdir, w, &rb))
            .expect("RQ");
    // The byte each side spins on: the last byte of what lands in its buffer.
    let last = |mr: &Mr| {
        let off = (mr.iova % PAGE) + land + size - 1;
        mr.pdir.as_ref().expect("user MR").addr(off)
    };
    let la = mem.get_slice(last(&p.mr_a), 1).expect("last byte");
    let lb = mem_b.get_slice(last(&p.mr_b), 1).expect("last byte");
    let depth = u64::from(p.depth);
    let sig = depth.div_ceil(2).max(1);
    let mut posted_recv = 0u64;
    let mut lat = Vec::with_capacity(iters as usize);
    let spin = |f: &mut dyn FnMut() -> Result<bool>| -> Result<()> {
        let t0 = Instant::now();
        let mut k = 0u32;
        loop {
            if f()? {
                return Ok(());
            }
            k += 1;
            if k % 1024 == 0 && t0.elapsed() > LAT_STALL {
                return Err(crate::driver::GuestError::Timeout(test as u32));
            }
            if k > LAT_SPINS {
                // The device's threads need a core: on a shared 2-core host a spinning
                // harness otherwise holds its core for a whole scheduler slice (~4 ms).
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    };
    let start = Instant::now();
    for i in 0..iters {
        if is_send && posted_recv <= i {
            // Keep `depth / 2` receives ahead on both sides.
            let mut n = 0;
            while posted_recv < iters && posted_recv < i + sig {
                rqa.push(posted_recv, None);
                rqb.push(posted_recv, None);
                posted_recv += 1;
                n += 1;
            }
            if n > 0 {
                rqa.publish(mem);
                rqb.publish(mem_b);
                da.doorbell(p.ctx, uar::QP, p.a.handle | (1 << 31));
                db.doorbell(p.ctx_b, uar::QP, p.b.handle | (1 << 31));
            }
        }
        let tag = (i % 251) as u8 + 1;
        let flags = if (i + 1) % sig == 0 {
            send_flags::SIGNALED
        } else {
            0
        };
        let t0 = Instant::now();
        // ping
        if !is_send {
            let pd = p.mr_a.pdir.as_ref().expect("user MR");
            let _ = mem.write_obj(tag, pd.addr((p.mr_a.iova % PAGE) + size - 1));
        }
        spin(&mut || Ok(sqa.space(mem)))?;
        sqa.push(i, Some(flags));
        sqa.publish(mem);
        da.ring_sq(&p.a);
        if is_send {
            spin(&mut || Ok(cq_recvs(&mut cqb, mem_b)? > 0))?;
        } else {
            spin(&mut || Ok(lb.read_obj::<u8>(0).unwrap_or(0) == tag))?;
        }
        // pong
        if !is_send {
            let pd = p.mr_b.pdir.as_ref().expect("user MR");
            let _ = mem_b.write_obj(tag, pd.addr((p.mr_b.iova % PAGE) + size - 1));
        }
        spin(&mut || Ok(sqb.space(mem_b)))?;
        sqb.push(i, Some(flags));
        sqb.publish(mem_b);
        db.ring_sq(&p.b);
        if is_send {
            spin(&mut || Ok(cq_recvs(&mut cqa, mem)? > 0))?;
        } else {
            spin(&mut || Ok(la.read_obj::<u8>(0).unwrap_or(0) == tag))?;
        }
        lat.push(t0.elapsed() / 2);
        if !is_send {
            // Reap signaled send completions so the CQs never fill.
            cqa.poll(mem, |_| {})?;
            cqb.poll(mem_b, |_| {})?;
        }
    }
    let elapsed = start.elapsed();
    // Send completions still queued (both sides), then the rings' indices go back to the pair.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(200) {
        cqa.poll(mem, |_| {})?;
        cqb.poll(mem_b, |_| {})?;
        if sqa.head == sqa.prod && sqb.head == sqb.prod {
            break;
        }
        sqa.space(mem);
        sqb.space(mem_b);
        let _ = (sqa.refresh(mem), sqb.refresh(mem_b));
    }
    p.a.sq.prod = sqa.prod;
    p.b.sq.prod = sqb.prod;
    if let Some(w) = p.a.rq.as_mut() {
        w.prod = rqa.prod;
    }
    if let Some(w) = p.b.rq.as_mut() {
        w.prod = rqb.prod;
    }
    p.cq_a.cons = cqa.cons;
    p.cq_b.cons = cqb.cons;
    lat.sort_unstable();
    Ok(Sample {
        test,
        size,
        iters,
        elapsed,
        lat,
    })
}

/// Receive completions taken from `cq` (which also carries its QP's send completions).
fn cq_recvs(cq: &mut CqReader<'_>, mem: &GuestMemoryMmap) -> Result<u32> {
    let mut recvs = 0;
    cq.poll(mem, |c| {
        if c.opcode >= 0x80 {
            recvs += 1;
        }
    })?;
    Ok(recvs)
}

impl RingWriter<'_> {
    /// Reloads the consumer index.
    fn refresh(&mut self, mem: &GuestMemoryMmap) -> u32 {
        self.head = mem
            .load(self.state.unchecked_add(4), Ordering::Acquire)
            .unwrap_or(self.head);
        self.head
    }
}
