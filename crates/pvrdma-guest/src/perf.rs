//! perftest-style measurements over the harness: the same loops `ib_send_bw`, `ib_write_bw`,
//! `ib_read_bw`, `ib_atomic_bw` and `ib_send_lat` run, through the real guest rings.

use std::time::{Duration, Instant};

use pvrdma_dev::abi::{wr_opcode, Cqe};

use crate::driver::{rc_connect_attrs, Cq, Ctx, Driver, Mr, Qp, QpKind, Result, SendWqe};

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
    /// User context.
    pub ctx: Ctx,
    /// PD.
    pub pd: u32,
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
    /// Queue depth.
    pub depth: u32,
}

/// Full access.
const ACCESS: u32 = 1 | 2 | 4 | 8;

impl Pair {
    /// Creates a pair in a new user context on UAR page `uar`, with `buf` bytes per side.
    pub fn new(drv: &Driver, uar: u32, gid: [u8; 16], depth: u32, buf: u64) -> Result<Pair> {
        let ctx = drv.create_uc(uar)?;
        let pd = drv.create_pd(ctx)?;
        let cqn = (2 * depth).next_power_of_two();
        let cq_a = drv.create_cq(ctx, cqn)?;
        let cq_b = drv.create_cq(ctx, cqn)?;
        let caps = (depth, depth, 1, 1);
        let a = drv.create_qp(ctx, QpKind::Rc, pd, &cq_a, &cq_a, None, caps, false)?;
        let b = drv.create_qp(ctx, QpKind::Rc, pd, &cq_b, &cq_b, None, caps, false)?;
        for m in rc_connect_attrs(b.qpn, gid, ACCESS) {
            drv.modify_qp(&a, m)?;
        }
        for m in rc_connect_attrs(a.qpn, gid, ACCESS) {
            drv.modify_qp(&b, m)?;
        }
        let mr_a = drv.reg_mr(pd, 0x7f10_0000_0000, buf, ACCESS)?;
        let mr_b = drv.reg_mr(pd, 0x7f20_0000_0000, buf, ACCESS)?;
        Ok(Pair {
            ctx,
            pd,
            cq_a,
            cq_b,
            a,
            b,
            mr_a,
            mr_b,
            depth,
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
        Test::WriteBw => SendWqe {
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
