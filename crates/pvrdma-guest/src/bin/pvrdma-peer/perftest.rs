//! `pvrdma-peer --perftest write|read|send`: the harness plays one end of perftest's
//! `ib_write_bw`, `ib_read_bw` or `ib_send_bw` (RC, one QP, no rdma_cm) against the native tool,
//! and checks the payload byte for byte through the native tool's buffer, which the native tool
//! maps from a file (`--mmap=FILE`; the harness gets the same path as `--native-buf FILE`).
//!
//! The TCP exchange is perftest 6.24's (Debian's perftest 25.01.0). Every step is a message of a
//! fixed size; the client writes first and the server answers. In order:
//! 1. versions: 16 bytes, a NUL-terminated version string (the remote must be at least 5.70);
//! 2. system data: the cycle buffer and the cache line size, 4 bytes each, big-endian; both sides
//!    go on with the larger of each;
//! 3. MTU: 2 bytes, the port's `enum ibv_mtu` in decimal; both use the smaller;
//! 4. keys, 108 bytes: `LID:OUT_READS:QPN:PSN:RKEY:VADDR:` then the 16 GID bytes and `SRQN:`, all
//!    in hex, NUL-terminated. Both sides then connect their QPs and exchange the keys again, twice
//!    (SEND: three times, the server posting its receives before the last);
//! 5. the run;
//! 6. WRITE and READ: the keys once more, then the client's report (size, iterations, peak and
//!    average MB/s, million messages per second: 8 bytes each, big-endian);
//! 7. the keys a last time, and both close.
//!
//! Buffer layout: perftest's for one QP and a message larger than half the cycle buffer (the
//! harness refuses smaller messages, for which perftest moves its addresses through the cycle
//! buffer). The buffer is `2 × B` bytes, `B` = the message size (at least the cycle buffer)
//! rounded up to the cache line. Local work (the WRITE and SEND source, the READ destination) is
//! at offset 0; the address in the keys (the WRITE destination, the READ source, the receive
//! buffer) is at offset `B`. Every message of the run uses those same bytes, and the source does
//! not change, so afterwards the destination's `size` bytes must equal the source's. The harness
//! fills its source with a pattern and its destination with 0xEE; the native tool fills its whole
//! buffer with random bytes. At the end the harness compares its region with the native file's
//! counterpart, and checks that its destination no longer holds 0xEE or that its source still
//! holds the pattern.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use pvrdma_dev::abi::wr_opcode;
use pvrdma_guest::driver::rc_connect_attrs;
use pvrdma_guest::{Mr, QpKind, SendWqe};

use super::{
    connect_retrying, first_difference, gid_str, io, mac_of_gid, pattern, random_psn, Args, Device,
    Res,
};

/// The perftest whose exchange this is.
pub const VERSION: &str = "6.24";
/// Remotes older than this refuse us (`check_version_compatibility`); we refuse them too.
const MIN_REMOTE_VERSION: f64 = 5.70;
/// `sizeof version` in `struct perftest_parameters`.
const VERSION_LEN: usize = 16;
/// `KEY_MSG_SIZE_GID`.
const KEYS_LEN: usize = 108;
/// The cycle buffer and cache line we offer (the page size and x86's line, as perftest finds).
const CYCLE: u32 = 4096;
const CACHE_LINE: u32 = 64;
/// Bounds on what the remote may raise them to.
const MAX_CYCLE: u32 = 1 << 21;
const MAX_CACHE_LINE: u32 = 4096;
/// The largest message (the harness's guest RAM holds the buffer).
const MAX_SIZE: usize = 8 << 20;
/// Work requests in flight (sends), receives kept posted.
const TX_DEPTH: u32 = 64;
const RX_DEPTH: u32 = 64;
const CQE: u32 = 256;
/// Where the buffer sits in the harness's guest address space.
const IOVA: u64 = 0x1000_0000;
/// IBV_ACCESS_LOCAL_WRITE | REMOTE_WRITE | REMOTE_READ.
const ACCESS: u32 = 1 | 2 | 4;
/// What the harness's destination holds before the run.
const SENTINEL: u8 = 0xee;
/// Bound on any wait (the exchange, or the run making no progress): TCG guests are slow.
const WAIT: Duration = Duration::from_secs(120);
/// `IBV_SEND_SIGNALED` in the device's WQE flags.
const SIGNALED: u32 = 2;

/// Which `ib_<verb>_bw`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Write,
    Read,
    Send,
}

impl Verb {
    fn name(self) -> &'static str {
        match self {
            Verb::Write => "write",
            Verb::Read => "read",
            Verb::Send => "send",
        }
    }
}

/// One side's keys (`struct pingpong_dest` as perftest sends it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Keys {
    pub lid: u32,
    pub out_reads: u32,
    pub qpn: u32,
    pub psn: u32,
    pub rkey: u32,
    pub vaddr: u64,
    pub gid: [u8; 16],
    pub srqn: u32,
}

impl Keys {
    /// `sprintf(msg, KEY_PRINT_FMT_GID, …)` in a NUL-padded buffer.
    pub fn encode(&self) -> [u8; KEYS_LEN] {
        let mut s = format!(
            "{:04x}:{:04x}:{:06x}:{:06x}:{:08x}:{:016x}:",
            self.lid & 0xffff,
            self.out_reads & 0xffff,
            self.qpn & 0xff_ffff,
            self.psn & 0xff_ffff,
            self.rkey,
            self.vaddr
        );
        for b in self.gid {
            s.push_str(&format!("{b:02x}:"));
        }
        s.push_str(&format!("{:08x}:", self.srqn));
        let mut m = [0u8; KEYS_LEN];
        m[..s.len()].copy_from_slice(s.as_bytes());
        m
    }

    pub fn decode(m: &[u8]) -> Res<Keys> {
        let end = m.iter().position(|&b| b == 0).unwrap_or(m.len());
        let s = std::str::from_utf8(&m[..end]).map_err(|_| "keys are not text".to_string())?;
        let bad = || format!("bad keys {s:?}");
        let f: Vec<&str> = s.split(':').collect();
        // 6 numbers, 16 GID bytes, the SRQ number, and the empty rest after the last ':'.
        if f.len() != 24 || !f[23].is_empty() {
            return Err(bad());
        }
        let hex32 = |x: &str| u32::from_str_radix(x, 16).map_err(|_| bad());
        let mut gid = [0u8; 16];
        for (g, x) in gid.iter_mut().zip(&f[6..22]) {
            *g = u8::from_str_radix(x, 16).map_err(|_| bad())?;
        }
        Ok(Keys {
            lid: hex32(f[0])?,
            out_reads: hex32(f[1])?,
            qpn: hex32(f[2])?,
            psn: hex32(f[3])?,
            rkey: hex32(f[4])?,
            vaddr: u64::from_str_radix(f[5], 16).map_err(|_| bad())?,
            gid,
            srqn: hex32(f[22])?,
        })
    }
}

/// `struct bw_report_data` as exchanged (no per-port figures).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Report {
    pub size: u64,
    pub iters: u64,
    /// MB/s (2^20 bytes), as perftest reports by default.
    pub bw_peak: f64,
    pub bw_avg: f64,
    /// Million messages per second.
    pub msg_rate: f64,
}

impl Report {
    fn of(size: usize, iters: u32, secs: f64) -> Report {
        let bw = size as f64 * f64::from(iters) / secs / f64::from(1u32 << 20);
        Report {
            size: size as u64,
            iters: u64::from(iters),
            bw_peak: bw,
            bw_avg: bw,
            msg_rate: f64::from(iters) / secs / 1e6,
        }
    }
}

/// The TCP side of a run: who writes first, and each step's message.
pub struct Exchange {
    s: TcpStream,
    client: bool,
}

impl Exchange {
    /// As the perftest client: connect to the native server (retrying while it does not
    /// listen yet).
    pub fn connect(addr: &str) -> Res<Exchange> {
        Exchange::new(connect_retrying(addr, WAIT)?, true)
    }

    /// As the perftest server: wait for the native client on `port`.
    pub fn accept(port: u16) -> Res<Exchange> {
        let l = TcpListener::bind(("0.0.0.0", port)).map_err(io("listen"))?;
        println!("pvrdma-peer: listening on port {port}");
        let (s, from) = l.accept().map_err(io("accept"))?;
        println!("pvrdma-peer: connection from {from}");
        Exchange::new(s, false)
    }

    fn new(s: TcpStream, client: bool) -> Res<Exchange> {
        s.set_read_timeout(Some(WAIT)).map_err(io("socket"))?;
        s.set_write_timeout(Some(WAIT)).map_err(io("socket"))?;
        s.set_nodelay(true).map_err(io("socket"))?;
        Ok(Exchange { s, client })
    }

    /// One step: the client writes `mine` and reads the answer, the server the other way round.
    fn step(&mut self, what: &str, mine: &[u8], theirs: &mut [u8]) -> Res<()> {
        let what = format!("perftest exchange ({what})");
        if self.client {
            self.s.write_all(mine).map_err(io(&what))?;
            self.s.read_exact(theirs).map_err(io(&what))
        } else {
            self.s.read_exact(theirs).map_err(io(&what))?;
            self.s.write_all(mine).map_err(io(&what))
        }
    }

    /// Step 1: returns the remote's version.
    pub fn versions(&mut self) -> Res<String> {
        let mut mine = [0u8; VERSION_LEN];
        mine[..VERSION.len()].copy_from_slice(VERSION.as_bytes());
        let mut theirs = [0u8; VERSION_LEN];
        self.step("versions", &mine, &mut theirs)?;
        let end = theirs.iter().position(|&b| b == 0).unwrap_or(VERSION_LEN);
        let v = String::from_utf8_lossy(&theirs[..end]).into_owned();
        // atof: the leading number
        let lead: String = v
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        match lead.parse::<f64>() {
            Ok(n) if n >= MIN_REMOTE_VERSION => Ok(v),
            _ => Err(format!(
                "remote perftest version {v:?}: this exchange needs at least {MIN_REMOTE_VERSION}"
            )),
        }
    }

    /// Step 2: returns the cycle buffer and cache line both sides use.
    pub fn sys_data(&mut self) -> Res<(u32, u32)> {
        let mut rc = [0u8; 4];
        self.step("cycle buffer", &CYCLE.to_be_bytes(), &mut rc)?;
        let mut rl = [0u8; 4];
        self.step("cache line", &CACHE_LINE.to_be_bytes(), &mut rl)?;
        let (rc, rl) = (u32::from_be_bytes(rc), u32::from_be_bytes(rl));
        if rc > MAX_CYCLE || rl > MAX_CACHE_LINE || !rl.is_power_of_two() {
            return Err(format!(
                "remote cycle buffer {rc} or cache line {rl} out of range"
            ));
        }
        Ok((CYCLE.max(rc), CACHE_LINE.max(rl)))
    }

    /// Step 3: returns the MTU (`enum ibv_mtu`) both sides use.
    pub fn mtu(&mut self, mine: u8) -> Res<u8> {
        let m = [b'0' + mine.clamp(1, 5), 0];
        let mut theirs = [0u8; 2];
        self.step("MTU", &m, &mut theirs)?;
        match theirs {
            [d @ b'1'..=b'5', 0] => Ok(mine.min(d - b'0')),
            _ => Err(format!("remote MTU {theirs:02x?} is not 1..5")),
        }
    }

    /// Step 4 and every later handshake: returns the remote's keys.
    pub fn keys(&mut self, mine: &Keys) -> Res<Keys> {
        let mut theirs = [0u8; KEYS_LEN];
        self.step("keys", &mine.encode(), &mut theirs)?;
        Keys::decode(&theirs)
    }

    /// The reports after a WRITE or READ run: returns the remote's.
    pub fn reports(&mut self, mine: &Report) -> Res<Report> {
        let mut r = [[0u8; 8]; 5];
        let fields = [
            ("report size", mine.size.to_be_bytes()),
            ("report iterations", mine.iters.to_be_bytes()),
            ("report peak", mine.bw_peak.to_bits().to_be_bytes()),
            ("report average", mine.bw_avg.to_bits().to_be_bytes()),
            ("report rate", mine.msg_rate.to_bits().to_be_bytes()),
        ];
        for ((what, m), t) in fields.iter().zip(r.iter_mut()) {
            self.step(what, m, t)?;
        }
        let f = |b: [u8; 8]| f64::from_bits(u64::from_be_bytes(b));
        Ok(Report {
            size: u64::from_be_bytes(r[0]),
            iters: u64::from_be_bytes(r[1]),
            bw_peak: f(r[2]),
            bw_avg: f(r[3]),
            msg_rate: f(r[4]),
        })
    }
}

/// `B`, half the buffer: perftest's `INC(BUFF_SIZE(size, cycle), line)`, the message size (at
/// least the cycle buffer) rounded up to the cache line.
fn half_buffer(size: usize, cycle: usize, line: usize) -> usize {
    size.max(cycle).div_ceil(line).max(1) * line
}

fn is_v4_mapped(g: &[u8; 16]) -> bool {
    g[..10] == [0; 10] && g[10..12] == [0xff, 0xff]
}

/// Moves the QP to RTS towards `r` as perftest's `ctx_connect` does.
fn connect(dev: &Device, r: &Keys, mtu: u8, out_reads: u32, psn: u32) -> Res<()> {
    let [init, mut rtr, mut rts] = rc_connect_attrs(r.qpn, r.gid, ACCESS);
    rtr.attrs.path_mtu = u32::from(mtu);
    rtr.attrs.rq_psn = r.psn;
    rtr.attrs.max_dest_rd_atomic = out_reads as u8;
    rtr.attrs.min_rnr_timer = 12;
    rtr.attrs.ah_attr.grh.sgid_index = 0;
    rtr.attrs.ah_attr.dmac = mac_of_gid(&r.gid);
    rts.attrs.sq_psn = psn;
    let init_rd = dev.drv.caps.max_qp_init_rd_atom.clamp(1, 16);
    rts.attrs.max_rd_atomic = r.out_reads.clamp(1, init_rd) as u8;
    for (m, name) in [init, rtr, rts].into_iter().zip(["INIT", "RTR", "RTS"]) {
        dev.drv
            .modify_qp(&dev.qp, m)
            .map_err(|e| format!("MODIFY_QP to {name}: {e}"))?;
    }
    Ok(())
}

/// Fails when a completion is an error or out of order; `next` is the wr_id expected.
fn check_cqe(c: &pvrdma_dev::abi::Cqe, next: u64, len: Option<usize>) -> Res<()> {
    if c.status != 0 {
        return Err(format!(
            "completion of wr_id {}: status {} (vendor_err {})",
            c.wr_id, c.status, c.vendor_err
        ));
    }
    if c.wr_id != next {
        return Err(format!("completion of wr_id {}, want {next}", c.wr_id));
    }
    match len {
        Some(l) if c.byte_len as usize != l => {
            Err(format!("receive {next}: {} bytes, want {l}", c.byte_len))
        }
        _ => Ok(()),
    }
}

/// Waits for at least one completion (at most [`WAIT`] without progress) and returns all ready.
fn completions(dev: &mut Device, what: &str, done: u32) -> Res<Vec<pvrdma_dev::abi::Cqe>> {
    let mut got = dev.drv.wait_cqes(&mut dev.cq, 1, WAIT);
    if got.is_empty() {
        return Err(format!(
            "{what}: no completion within {} s after {done}",
            WAIT.as_secs()
        ));
    }
    while let Some(c) = dev.drv.poll_cq(&mut dev.cq) {
        got.push(c);
    }
    Ok(got)
}

/// The client's run: `iters` operations of `size` bytes from/to offset 0, at most [`TX_DEPTH`]
/// in flight, every one signalled.
fn initiate(dev: &mut Device, mr: &Mr, verb: Verb, r: &Keys, size: usize, iters: u32) -> Res<()> {
    let opcode = match verb {
        Verb::Write => wr_opcode::RDMA_WRITE,
        Verb::Read => wr_opcode::RDMA_READ,
        Verb::Send => wr_opcode::SEND,
    };
    let (mut posted, mut done) = (0u32, 0u32);
    while done < iters {
        while posted < iters && posted - done < TX_DEPTH {
            let w = SendWqe {
                wr_id: u64::from(posted),
                opcode,
                flags: SIGNALED,
                sges: vec![mr.sge(0, size as u32)],
                remote_addr: if verb == Verb::Send { 0 } else { r.vaddr },
                rkey: if verb == Verb::Send { 0 } else { r.rkey },
                ..Default::default()
            };
            if !dev.drv.post_send(&mut dev.qp, &w) {
                break;
            }
            posted += 1;
        }
        for c in completions(dev, verb.name(), done)? {
            check_cqe(&c, u64::from(done), None)?;
            done += 1;
        }
    }
    Ok(())
}

/// The SEND server's receives: `[RX_DEPTH, iters]` posted before the last handshake.
fn post_receives(dev: &mut Device, mr: &Mr, b: usize, size: usize, from: u32, to: u32) -> Res<()> {
    for k in from..to {
        if !dev
            .drv
            .post_recv(&mut dev.qp, u64::from(k), &[mr.sge(b as u64, size as u32)])
        {
            return Err(format!("receive queue full at receive {k}"));
        }
    }
    Ok(())
}

/// The SEND server's run: `iters` receives of `size` bytes at offset `b`, each reposted until
/// all are posted.
fn receive(dev: &mut Device, mr: &Mr, b: usize, size: usize, iters: u32, posted: u32) -> Res<()> {
    let (mut posted, mut done) = (posted, 0u32);
    while done < iters {
        for c in completions(dev, "receive", done)? {
            check_cqe(&c, u64::from(done), Some(size))?;
            done += 1;
            if posted < iters {
                post_receives(dev, mr, b, size, posted, posted + 1)?;
                posted += 1;
            }
        }
    }
    Ok(())
}

pub fn run(a: &Args, verb: Verb) -> Res<()> {
    let (size, iters) = (a.size, a.iters);
    if size <= (CYCLE / 2) as usize || size > MAX_SIZE {
        return Err(format!(
            "--perftest needs {} < --size <= {MAX_SIZE} (smaller messages move through perftest's \
             cycle buffer)",
            CYCLE / 2
        ));
    }
    let native_buf = a
        .native_buf
        .as_deref()
        .ok_or("--perftest needs --native-buf")?;
    let client = a.connect.is_some();
    let mut dev = Device::open(
        &a.socket,
        a.mac,
        QpKind::Rc,
        CQE,
        (TX_DEPTH, RX_DEPTH, 1, 1),
    )?;
    let port = dev
        .drv
        .query_port(1)
        .map_err(|e| format!("QUERY_PORT: {e}"))?;
    let out_reads = dev.drv.caps.max_qp_rd_atom.clamp(1, 16);

    let mut x = match &a.connect {
        Some(addr) => Exchange::connect(addr)?,
        None => Exchange::accept(a.listen.unwrap_or_default())?,
    };
    let rv = x.versions()?;
    let (cycle, line) = x.sys_data()?;
    let mtu = x.mtu(port.active_mtu as u8)?;
    println!(
        "pvrdma-peer: perftest {VERSION} exchange with perftest {rv}: cycle buffer {cycle}, cache \
         line {line}, MTU {}",
        128u32 << mtu
    );

    // The buffer: local work at 0, the advertised address at b.
    let b = half_buffer(size, cycle as usize, line as usize);
    let mr = dev
        .drv
        .reg_mr(dev.pd, IOVA, 2 * b as u64, ACCESS)
        .map_err(|e| format!("CREATE_MR: {e}"))?;
    let source_at_0 = verb != Verb::Read;
    let (src_off, dst_off) = if source_at_0 { (0, b) } else { (b, 0) };
    let pat = pattern(size, 1);
    mr.write(dev.drv.mem(), src_off as u64, &pat);
    mr.write(dev.drv.mem(), dst_off as u64, &vec![SENTINEL; size]);

    let me = Keys {
        lid: 0,
        out_reads,
        qpn: dev.qp.qpn,
        psn: random_psn(),
        rkey: mr.rkey,
        vaddr: IOVA + b as u64,
        gid: dev.gid,
        srqn: 0,
    };
    let r = x.keys(&me)?;
    println!(
        "pvrdma-peer: local  QPN {:#08x} PSN {:#08x} RKey {:#010x} VAddr {:#018x} GID {}",
        me.qpn,
        me.psn,
        me.rkey,
        me.vaddr,
        gid_str(&me.gid)
    );
    println!(
        "pvrdma-peer: remote QPN {:#08x} PSN {:#08x} RKey {:#010x} VAddr {:#018x} GID {} \
         out_reads {}",
        r.qpn,
        r.psn,
        r.rkey,
        r.vaddr,
        gid_str(&r.gid),
        r.out_reads
    );
    if is_v4_mapped(&r.gid) != is_v4_mapped(&me.gid) {
        return Err("the GIDs are of different IP versions (perftest refuses that too)".into());
    }
    connect(&dev, &r, mtu, out_reads, me.psn)?;
    x.keys(&me)?;
    if verb == Verb::Send {
        x.keys(&me)?;
    }
    let mut posted = 0;
    if verb == Verb::Send && !client {
        posted = RX_DEPTH.min(iters);
        post_receives(&mut dev, &mr, b, size, 0, posted)?;
    }
    x.keys(&me)?;

    let start = Instant::now();
    if client {
        initiate(&mut dev, &mr, verb, &r, size, iters)?;
    } else if verb == Verb::Send {
        receive(&mut dev, &mr, b, size, iters, posted)?;
    }
    let secs = start.elapsed().as_secs_f64();
    if verb != Verb::Send {
        x.keys(&me)?;
        let mine = if client {
            Report::of(size, iters, secs)
        } else {
            Report::default()
        };
        let theirs = x.reports(&mine)?;
        if !client {
            println!(
                "pvrdma-peer: the native client reports {} x {} bytes at {:.2} MB/s",
                theirs.iters, theirs.size, theirs.bw_avg
            );
        }
    }
    x.keys(&me)?;
    drop(x);

    // The payload: the harness's region against the native tool's.
    let native = std::fs::read(native_buf)
        .map_err(|e| format!("native buffer {}: {e}", native_buf.display()))?;
    let nat_off = if client { b } else { 0 };
    let theirs = native.get(nat_off..nat_off + size).ok_or_else(|| {
        format!(
            "native buffer {} has {} bytes, want at least {}",
            native_buf.display(),
            native.len(),
            nat_off + size
        )
    })?;
    let dev_off = if client { 0 } else { b };
    let mut mine = vec![0u8; size];
    mr.read(dev.drv.mem(), dev_off as u64, &mut mine);
    let device_is_source = dev_off == src_off;
    if mine != theirs {
        return Err(format!(
            "payload: the {} at offset {dev_off} and the native tool's at {nat_off} differ ({})",
            if device_is_source {
                "harness's source"
            } else {
                "harness's destination"
            },
            first_difference(&mine, theirs)
        ));
    }
    if device_is_source && mine != pat {
        return Err("the harness's source changed during the run".into());
    }
    if !device_is_source && mine.iter().all(|&v| v == SENTINEL) {
        return Err("nothing arrived in the harness's destination".into());
    }
    let role = if client { "client" } else { "server" };
    if client {
        let mbs = Report::of(size, iters, secs).bw_avg;
        println!(
            "pvrdma-peer: perftest {} {role}: {iters} x {size} bytes in {secs:.2} s ({mbs:.2} MB/s), \
             payload verified against the native buffer",
            verb.name()
        );
    } else {
        println!(
            "pvrdma-peer: perftest {} {role}: {iters} x {size} bytes, payload verified against the \
             native buffer",
            verb.name()
        );
    }
    let d = &dev.drv;
    d.destroy_qp(dev.qp)
        .map_err(|e| format!("DESTROY_QP: {e}"))?;
    d.destroy_mr(mr).map_err(|e| format!("DESTROY_MR: {e}"))?;
    d.destroy_cq(dev.cq)
        .map_err(|e| format!("DESTROY_CQ: {e}"))?;
    d.destroy_pd(dev.pd)
        .map_err(|e| format!("DESTROY_PD: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys {
            lid: 0,
            out_reads: 16,
            qpn: 0x11,
            psn: 0xabcdef,
            rkey: 0x1234_5678,
            vaddr: 0x1000_1000,
            gid: rdma_backend::Gid::from_mac([0x52, 0x54, 0, 0x77, 0, 2]).0,
            srqn: 0,
        }
    }

    #[test]
    fn keys_are_perftests_text() {
        let m = keys().encode();
        let want = "0000:0010:000011:abcdef:12345678:0000000010001000:\
                    fe:80:00:00:00:00:00:00:50:54:00:ff:fe:77:00:02:00000000:";
        assert_eq!(want.len(), KEYS_LEN - 1);
        assert_eq!(&m[..KEYS_LEN - 1], want.as_bytes());
        assert_eq!(m[KEYS_LEN - 1], 0);
        assert_eq!(Keys::decode(&m).unwrap(), keys());
        for bad in [
            &b"0000:0010:000011"[..],
            b"zzzz:0010:000011:abcdef:12345678:0000000010001000:fe:80:00:00:00:00:00:00:50:54:00:ff:fe:77:00:02:00000000:",
            b"0000:0010:000011:abcdef:12345678:0000000010001000:fe:80:00:00:00:00:00:00:50:54:00:ff:fe:77:00:02:00000000:x",
            &[0xff; KEYS_LEN][..],
        ] {
            assert!(Keys::decode(bad).is_err(), "{bad:?}");
        }
    }

    /// Runs `f` as the client and `g` as the server of one TCP exchange.
    fn pair<A: Send + 'static, B>(
        f: impl FnOnce(&mut Exchange) -> A + Send + 'static,
        g: impl FnOnce(&mut Exchange) -> B,
    ) -> (A, B) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let t = std::thread::spawn(move || f(&mut Exchange::connect(&addr).unwrap()));
        let (s, _) = l.accept().unwrap();
        let b = g(&mut Exchange::new(s, false).unwrap());
        (t.join().unwrap(), b)
    }

    #[test]
    fn both_roles_agree_step_by_step() {
        let steps = |x: &mut Exchange, mtu: u8, k: Keys, rep: Report| {
            let v = x.versions().unwrap();
            let sys = x.sys_data().unwrap();
            let m = x.mtu(mtu).unwrap();
            let r = x.keys(&k).unwrap();
            let rr = x.reports(&rep).unwrap();
            (v, sys, m, r, rr)
        };
        let mut k2 = keys();
        k2.qpn = 0x22;
        let rep = Report::of(65536, 1000, 0.5);
        let (a, b) = pair(
            move |x| steps(x, 3, keys(), rep),
            |x| steps(x, 5, k2, Report::default()),
        );
        assert_eq!(a.0, VERSION);
        assert_eq!(b.0, VERSION);
        assert_eq!((a.1, b.1), ((CYCLE, CACHE_LINE), (CYCLE, CACHE_LINE)));
        assert_eq!((a.2, b.2), (3, 3));
        assert_eq!((a.3, b.3), (k2, keys()));
        assert_eq!((a.4, b.4), (Report::default(), rep));
        assert_eq!(rep.bw_avg, 125.0);
        assert_eq!(rep.msg_rate, 0.002);
    }

    #[test]
    fn old_versions_and_bad_values_are_refused() {
        // The server answers with version 5.60, then a cycle buffer beyond the bound and an MTU 7.
        let (a, ()) = pair(
            |x| {
                let v = x.versions();
                let sys = x.sys_data();
                let m = x.mtu(3);
                (v, sys, m)
            },
            |x| {
                let mut t = [0u8; VERSION_LEN];
                x.step("v", b"5.60\0\0\0\0\0\0\0\0\0\0\0\0", &mut t)
                    .unwrap();
                let mut t4 = [0u8; 4];
                x.step("c", &(1u32 << 30).to_be_bytes(), &mut t4).unwrap();
                x.step("l", &64u32.to_be_bytes(), &mut t4).unwrap();
                let mut t2 = [0u8; 2];
                x.step("m", b"7\0", &mut t2).unwrap();
            },
        );
        assert!(a.0.unwrap_err().contains("5.60"));
        assert!(a.1.unwrap_err().contains("out of range"));
        assert!(a.2.unwrap_err().contains("not 1..5"));
    }

    #[test]
    fn buffer_offsets_are_perftests() {
        assert_eq!(half_buffer(4096, 4096, 64), 4096);
        assert_eq!(half_buffer(65536, 4096, 64), 65536);
        assert_eq!(half_buffer(3000, 4096, 64), 4096);
        assert_eq!(half_buffer(5000, 4096, 64), 5056);
        assert_eq!(half_buffer(5000, 4096, 128), 5120);
        assert!(is_v4_mapped(&[
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1
        ]));
        assert!(!is_v4_mapped(&keys().gid));
    }
}
