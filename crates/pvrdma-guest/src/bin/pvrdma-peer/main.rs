//! `pvrdma-peer`: a guest driving a pvrdma device over vfio-user (the harness) plays one end of
//! rdma-core's `ibv_rc_pingpong` or `ibv_ud_pingpong`, or of perftest's `ib_write_bw`,
//! `ib_read_bw` or `ib_send_bw`, against the native tool on another RDMA device, and verifies
//! the payload.
//!
//! ```text
//! pvrdma-peer --socket PATH --mac MAC (--mode rc|ud | --perftest write|read|send --native-buf FILE)
//!             (--listen PORT | --connect HOST:PORT) [--size BYTES] [--iters N]
//! ```
//!
//! perftest: see the `perftest` module (the native tool runs with `--mmap=FILE`, `-x <GID index>`
//! and the same `-s` and `-n`). The rest of this comment is about the ping-pong tools.
//!
//! The device (a `pvrdma serve` process on PATH, with `--roce-version 2` and `--mac MAC`) is
//! probed as the Linux driver does; the harness binds GID 0 = the link-local GID of MAC
//! (RoCE v2), creates a QP (RC, or UD with the tools' Q_Key 0x11111111) and exchanges the tools'
//! TCP message `LID:QPN:PSN:GID` (`--listen`: as `ibv_*_pingpong` without a host name;
//! `--connect`: as the tool with one). Run the native tool with `-g <its link-local GID index>
//! -c`, the same `-s` and `-n`.
//!
//! The native tools send from the buffer they receive into (UD: the payload after the 40-byte
//! GRH slot), so after its first message the native side echoes what it last received. The
//! harness sends pattern `k` in round `k` (zero at offsets that are multiples of 4096, which is
//! what the tool's `-c` check wants) and requires, byte for byte:
//! - the native client's first message: 0x7b, with 0 at every 4096-byte boundary (its `-c`
//!   marks);
//! - every later message: the pattern the harness sent before it (so the native side received
//!   it intact, and the harness received the echo intact);
//! - UD: the receive's first 40 bytes are the IPv6 header of the datagram (RoCE v2): source =
//!   the native side's GID, destination = the harness's.
//!
//! Exit status 0 when all rounds passed; a line per step on stdout, the failure on stderr.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod perftest;

use pvrdma_dev::abi::{wr_opcode, Cqe};
use pvrdma_guest::driver::{rc_connect_attrs, ud_attrs};
use pvrdma_guest::vfio::VfioUser;
use pvrdma_guest::{Cq, Driver, Mr, Qp, QpKind, SendWqe, Transport, UdAddr};

/// `sizeof "0000:000000:000000:00000000000000000000000000000000"` (with the NUL).
const MSG_LEN: usize = 52;
/// The Q_Key of `ibv_ud_pingpong`.
const UD_QKEY: u32 = 0x1111_1111;
/// The GRH slot at the start of a UD receive buffer.
const GRH: usize = 40;
/// The native tool's page size: its `-c` marks every page's first byte.
const PAGE: usize = 4096;
/// Bound on one round (TCG guests are slow).
const WAIT: Duration = Duration::from_secs(60);
/// Guest RAM of the harness (the backend registers it all per PD).
const RAM: usize = 64 << 20;
/// Local write: what the pingpong tools give their MRs and QPs.
const LOCAL_WRITE: u32 = 1;
/// Receives kept posted, each with its own slot of the receive MR (receive `k` in slot
/// `k % RX_DEPTH`). A UD datagram that finds no receive at the host QP is dropped; receives
/// kept ahead cover the time the device may take to pass a posted receive on to the host.
const RX_DEPTH: u32 = 8;

type Res<T> = Result<T, String>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Rc,
    Ud,
}

#[derive(Debug)]
struct Args {
    socket: PathBuf,
    mac: [u8; 6],
    mode: Mode,
    /// `--perftest`: play `ib_<verb>_bw` instead of a ping-pong tool.
    perftest: Option<perftest::Verb>,
    /// `--native-buf`: the native perftest's buffer file (its `--mmap`).
    native_buf: Option<PathBuf>,
    listen: Option<u16>,
    connect: Option<String>,
    size: usize,
    iters: u32,
}

fn usage() -> String {
    "usage: pvrdma-peer --socket PATH --mac MAC (--mode rc|ud | --perftest write|read|send \
     --native-buf FILE) (--listen PORT | --connect HOST:PORT) [--size BYTES] [--iters N]"
        .into()
}

fn parse_mac(s: &str) -> Res<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad MAC {s}: {e}"))?;
    v.try_into().map_err(|_| format!("bad MAC {s}"))
}

fn parse_args() -> Res<Args> {
    let mut it = std::env::args().skip(1);
    let (mut socket, mut mac, mut mode) = (None, None, None);
    let mut a = Args {
        socket: PathBuf::new(),
        mac: [0; 6],
        mode: Mode::Rc,
        perftest: None,
        native_buf: None,
        listen: None,
        connect: None,
        size: 4096,
        iters: 1000,
    };
    while let Some(opt) = it.next() {
        let mut val = || {
            it.next()
                .ok_or_else(|| format!("{opt} needs a value\n{}", usage()))
        };
        match opt.as_str() {
            "--socket" => socket = Some(PathBuf::from(val()?)),
            "--mac" => mac = Some(parse_mac(&val()?)?),
            "--mode" => {
                mode = Some(match val()?.as_str() {
                    "rc" => Mode::Rc,
                    "ud" => Mode::Ud,
                    m => return Err(format!("unknown mode {m}\n{}", usage())),
                })
            }
            "--perftest" => {
                a.perftest = Some(match val()?.as_str() {
                    "write" => perftest::Verb::Write,
                    "read" => perftest::Verb::Read,
                    "send" => perftest::Verb::Send,
                    v => return Err(format!("unknown perftest verb {v}\n{}", usage())),
                })
            }
            "--native-buf" => a.native_buf = Some(PathBuf::from(val()?)),
            "--listen" => a.listen = Some(val()?.parse().map_err(|e| format!("--listen: {e}"))?),
            "--connect" => a.connect = Some(val()?),
            "--size" => a.size = val()?.parse().map_err(|e| format!("--size: {e}"))?,
            "--iters" => a.iters = val()?.parse().map_err(|e| format!("--iters: {e}"))?,
            "-h" | "--help" => return Err(usage()),
            o => return Err(format!("unknown option {o}\n{}", usage())),
        }
    }
    a.socket = socket.ok_or_else(usage)?;
    a.mac = mac.ok_or_else(usage)?;
    match (mode, a.perftest) {
        (Some(m), None) => a.mode = m,
        (None, Some(_)) if a.native_buf.is_some() => {}
        (None, Some(_)) => return Err(format!("--perftest needs --native-buf\n{}", usage())),
        _ => return Err(format!("exactly one of --mode and --perftest\n{}", usage())),
    }
    if a.listen.is_some() == a.connect.is_some() {
        return Err(format!(
            "exactly one of --listen and --connect\n{}",
            usage()
        ));
    }
    if a.size == 0 || a.iters == 0 {
        return Err("--size and --iters must be positive".into());
    }
    Ok(a)
}

/// One side's connection data, as the tools exchange it.
#[derive(Debug, Clone, Copy)]
struct Dest {
    lid: u32,
    qpn: u32,
    psn: u32,
    gid: [u8; 16],
}

impl Dest {
    /// `sprintf(msg, "%04x:%06x:%06x:%s", lid, qpn, psn, wire_gid)` in a NUL-padded buffer.
    fn encode(&self) -> [u8; MSG_LEN] {
        let gid: String = self.gid.iter().map(|b| format!("{b:02x}")).collect();
        let s = format!("{:04x}:{:06x}:{:06x}:{gid}", self.lid, self.qpn, self.psn);
        let mut m = [0u8; MSG_LEN];
        m[..s.len()].copy_from_slice(s.as_bytes());
        m
    }

    fn decode(m: &[u8]) -> Res<Dest> {
        let end = m.iter().position(|&b| b == 0).unwrap_or(m.len());
        let s = std::str::from_utf8(&m[..end]).map_err(|_| "message is not text".to_string())?;
        let f: Vec<&str> = s.split(':').collect();
        let bad = || format!("bad message {s:?}");
        if f.len() != 4 || f[3].len() != 32 {
            return Err(bad());
        }
        let num = |x: &str| u32::from_str_radix(x, 16).map_err(|_| bad());
        let mut gid = [0u8; 16];
        for (i, g) in gid.iter_mut().enumerate() {
            *g = u8::from_str_radix(&f[3][2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Dest {
            lid: num(f[0])?,
            qpn: num(f[1])?,
            psn: num(f[2])?,
            gid,
        })
    }
}

fn gid_str(g: &[u8; 16]) -> String {
    std::net::Ipv6Addr::from(*g).to_string()
}

/// The MAC inside a link-local GID's EUI-64.
fn mac_of_gid(g: &[u8; 16]) -> [u8; 6] {
    [g[8] ^ 2, g[9], g[10], g[13], g[14], g[15]]
}

/// What the harness sends in round `k`: 0 at every page boundary (the tools' `-c` marks).
fn pattern(len: usize, k: u32) -> Vec<u8> {
    (0..len)
        .map(|i| {
            if i % PAGE == 0 {
                0
            } else {
                let x = (i as u32).wrapping_mul(2_654_435_761) ^ k.wrapping_mul(0x9e37_79b9);
                (x >> 11) as u8 | 1
            }
        })
        .collect()
}

/// The native client's first message under `-c`: 0x7b, 0 at every page boundary.
fn native_first(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| if i % PAGE == 0 { 0 } else { 0x7b })
        .collect()
}

fn first_difference(got: &[u8], want: &[u8]) -> String {
    match got.iter().zip(want).position(|(a, b)| a != b) {
        Some(i) => format!(
            "first difference at byte {i}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        ),
        None => format!("lengths {} and {}", got.len(), want.len()),
    }
}

/// A device probed over vfio-user as the Linux driver does, with GID 0 bound (the link-local
/// GID of the MAC, RoCE v2), one UC and PD, one CQ and one QP.
struct Device {
    drv: Driver,
    pd: u32,
    cq: Cq,
    qp: Qp,
    gid: [u8; 16],
}

impl Device {
    /// `caps`: (send WRs, receive WRs, send SGEs, receive SGEs) of the QP.
    fn open(
        socket: &Path,
        mac: [u8; 6],
        kind: QpKind,
        cqe: u32,
        caps: (u32, u32, u32, u32),
    ) -> Res<Device> {
        let t = Arc::new(
            VfioUser::connect_with_ram(socket, RAM)
                .map_err(|e| format!("vfio-user connect {}: {e}", socket.display()))?,
        );
        let drv = Driver::probe(t as Arc<dyn Transport>).map_err(|e| format!("probe: {e}"))?;
        let port = drv.query_port(1).map_err(|e| format!("QUERY_PORT: {e}"))?;
        println!(
            "pvrdma-peer: device probed over {}: port state {} active_mtu {} gid_tbl_len {}",
            socket.display(),
            port.state,
            port.active_mtu,
            port.gid_tbl_len
        );
        let gid = rdma_backend::Gid::from_mac(mac).0;
        // gid_type 2: RoCE v2 (the device must be served with --roce-version 2).
        drv.create_bind(0, gid, 2)
            .map_err(|e| format!("CREATE_BIND GID 0 {} (RoCE v2): {e}", gid_str(&gid)))?;
        let ctx = drv.create_uc(1).map_err(|e| format!("CREATE_UC: {e}"))?;
        let pd = drv.create_pd(ctx).map_err(|e| format!("CREATE_PD: {e}"))?;
        let cq = drv
            .create_cq(ctx, cqe)
            .map_err(|e| format!("CREATE_CQ: {e}"))?;
        let qp = drv
            .create_qp(ctx, kind, pd, &cq, &cq, None, caps, false)
            .map_err(|e| format!("CREATE_QP: {e}"))?;
        Ok(Device {
            drv,
            pd,
            cq,
            qp,
            gid,
        })
    }
}

/// A PSN that differs between runs (the tools use a random one too).
fn random_psn() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (std::process::id().wrapping_mul(2_654_435_761) ^ nanos) & 0xff_ffff
}

/// The harness's side: a probed device with one QP, its CQ and two MRs.
struct Peer {
    drv: Driver,
    mode: Mode,
    pd: u32,
    qp: Qp,
    cq: Cq,
    send_mr: Mr,
    recv_mr: Mr,
    /// Bytes of one receive slot (size, plus the GRH slot for UD).
    slot: usize,
    me: Dest,
    remote: Option<Dest>,
    /// Completions seen but not yet asked for (wr_id → CQE).
    seen: Vec<Cqe>,
}

const SEND_ID: u64 = 1 << 32;

impl Peer {
    fn open(a: &Args) -> Res<Peer> {
        let kind = match a.mode {
            Mode::Rc => QpKind::Rc,
            Mode::Ud => QpKind::Ud,
        };
        let Device {
            drv,
            pd,
            cq,
            qp,
            gid,
        } = Device::open(&a.socket, a.mac, kind, 64, (16, 16, 1, 1))?;
        let slot = a.size + if a.mode == Mode::Ud { GRH } else { 0 };
        let send_mr = drv
            .reg_mr(pd, 0x1000_0000, a.size as u64, LOCAL_WRITE)
            .map_err(|e| format!("CREATE_MR (send): {e}"))?;
        let recv_mr = drv
            .reg_mr(
                pd,
                0x2000_0000,
                (slot * RX_DEPTH as usize) as u64,
                LOCAL_WRITE,
            )
            .map_err(|e| format!("CREATE_MR (recv): {e}"))?;
        let psn = random_psn();
        let me = Dest {
            lid: 0,
            qpn: qp.qpn,
            psn,
            gid,
        };
        println!(
            "pvrdma-peer: local address:  QPN {:#08x}, PSN {:#08x}, GID {}",
            me.qpn,
            me.psn,
            gid_str(&gid)
        );
        Ok(Peer {
            drv,
            mode: a.mode,
            pd,
            qp,
            cq,
            send_mr,
            recv_mr,
            slot,
            me,
            remote: None,
            seen: Vec::new(),
        })
    }

    /// Moves the QP to RTS towards `r` (RC: as `pp_connect_ctx` does; UD: its own states, the
    /// destination goes into each send).
    fn connect(&mut self, r: Dest) -> Res<()> {
        println!(
            "pvrdma-peer: remote address: QPN {:#08x}, PSN {:#08x}, GID {}",
            r.qpn,
            r.psn,
            gid_str(&r.gid)
        );
        let steps = match self.mode {
            Mode::Rc => {
                let [init, mut rtr, mut rts] = rc_connect_attrs(r.qpn, r.gid, LOCAL_WRITE);
                rtr.attrs.rq_psn = r.psn;
                rtr.attrs.max_dest_rd_atomic = 1;
                rtr.attrs.min_rnr_timer = 12;
                rtr.attrs.ah_attr.grh.sgid_index = 0;
                rtr.attrs.ah_attr.dmac = mac_of_gid(&r.gid);
                rts.attrs.sq_psn = self.me.psn;
                rts.attrs.max_rd_atomic = 1;
                [init, rtr, rts]
            }
            Mode::Ud => {
                let [init, rtr, mut rts] = ud_attrs(UD_QKEY);
                rts.attrs.sq_psn = self.me.psn;
                [init, rtr, rts]
            }
        };
        for (m, name) in steps.into_iter().zip(["INIT", "RTR", "RTS"]) {
            self.drv
                .modify_qp(&self.qp, m)
                .map_err(|e| format!("MODIFY_QP to {name}: {e}"))?;
        }
        self.remote = Some(r);
        Ok(())
    }

    fn slot_of(&self, k: u32) -> u64 {
        ((k % RX_DEPTH) as usize * self.slot) as u64
    }

    /// Posts receives `0..RX_DEPTH` (before the native side may send).
    fn post_recvs(&mut self) -> Res<()> {
        (0..RX_DEPTH).try_for_each(|k| self.post_recv(k))
    }

    fn post_recv(&mut self, k: u32) -> Res<()> {
        let sge = self.recv_mr.sge(self.slot_of(k), self.slot as u32);
        if !self.drv.post_recv(&mut self.qp, u64::from(k), &[sge]) {
            return Err("receive queue full".into());
        }
        Ok(())
    }

    fn send(&mut self, data: &[u8], k: u32) -> Res<()> {
        let mem = self.drv.mem();
        self.send_mr.write(mem, 0, data);
        let ud = match (self.mode, self.remote) {
            (Mode::Ud, Some(r)) => Some(UdAddr {
                remote_qpn: r.qpn,
                qkey: UD_QKEY,
                dgid: r.gid,
                gid_index: 0,
                dmac: mac_of_gid(&r.gid),
                pd: self.pd,
            }),
            _ => None,
        };
        let w = SendWqe {
            wr_id: SEND_ID | u64::from(k),
            opcode: wr_opcode::SEND,
            flags: 2, // signaled
            sges: vec![self.send_mr.sge(0, data.len() as u32)],
            ud,
            ..Default::default()
        };
        if !self.drv.post_send(&mut self.qp, &w) {
            return Err("send queue full".into());
        }
        Ok(())
    }

    /// Waits for the completion of `wr_id` (within [`WAIT`]); it must be a success.
    fn wait(&mut self, wr_id: u64) -> Res<Cqe> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(i) = self.seen.iter().position(|c| c.wr_id == wr_id) {
                let c = self.seen.swap_remove(i);
                if c.status != 0 {
                    return Err(format!(
                        "completion of wr_id {wr_id:#x}: status {} (vendor_err {})",
                        c.status, c.vendor_err
                    ));
                }
                return Ok(c);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "no completion of wr_id {wr_id:#x} within {} s",
                    WAIT.as_secs()
                ));
            }
            let got = self.drv.wait_cqes(&mut self.cq, 1, deadline - now);
            self.seen.extend(got);
        }
    }

    /// Waits for receive `k` and checks its payload against `want` (UD: and the GRH slot);
    /// then posts receive `k + RX_DEPTH` in its slot.
    fn expect_recv(&mut self, k: u32, want: &[u8]) -> Res<()> {
        let c = self.wait(u64::from(k))?;
        let off = if self.mode == Mode::Ud { GRH } else { 0 };
        if c.byte_len as usize != off + want.len() {
            return Err(format!(
                "receive {k}: {} bytes, want {}",
                c.byte_len,
                off + want.len()
            ));
        }
        let mut got = vec![0u8; off + want.len()];
        self.recv_mr.read(self.drv.mem(), self.slot_of(k), &mut got);
        if got[off..] != *want {
            return Err(format!(
                "receive {k}: payload differs ({})",
                first_difference(&got[off..], want)
            ));
        }
        if self.mode == Mode::Ud {
            let r = self.remote.ok_or("UD receive before the exchange")?;
            // RoCE v2 over IPv6: version 6, next header UDP, then source and destination.
            let (src, dst) = (&got[8..24], &got[24..40]);
            if got[0] >> 4 != 6 || got[6] != 17 || src != r.gid || dst != self.me.gid {
                return Err(format!(
                    "receive {k}: GRH slot is not the datagram's IPv6 header from {} to {}: {:02x?}",
                    gid_str(&r.gid),
                    gid_str(&self.me.gid),
                    &got[..GRH]
                ));
            }
        }
        self.post_recv(k + RX_DEPTH)
    }

    fn close(self) -> Res<()> {
        let d = &self.drv;
        d.destroy_qp(self.qp)
            .map_err(|e| format!("DESTROY_QP: {e}"))?;
        d.destroy_mr(self.send_mr)
            .map_err(|e| format!("DESTROY_MR: {e}"))?;
        d.destroy_mr(self.recv_mr)
            .map_err(|e| format!("DESTROY_MR: {e}"))?;
        d.destroy_cq(self.cq)
            .map_err(|e| format!("DESTROY_CQ: {e}"))?;
        d.destroy_pd(self.pd)
            .map_err(|e| format!("DESTROY_PD: {e}"))?;
        Ok(())
    }
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Connects to `addr`, retrying for `wait` while the native tool does not listen yet.
fn connect_retrying(addr: &str, wait: Duration) -> Res<TcpStream> {
    let deadline = Instant::now() + wait;
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return Ok(s),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => return Err(format!("connect {addr}: {e}")),
        }
    }
}

/// The tool's client side of the exchange (`pp_client_exch_dest`), retrying the connect for
/// [`WAIT`] while the server does not listen yet.
fn exchange_as_client(peer: &mut Peer, addr: &str) -> Res<()> {
    let mut s = connect_retrying(addr, WAIT)?;
    s.write_all(&peer.me.encode()).map_err(io("send address"))?;
    let mut m = [0u8; MSG_LEN];
    s.read_exact(&mut m).map_err(io("read remote address"))?;
    let r = Dest::decode(&m)?;
    // The server connected its QP before answering; ours goes to RTS before the first send.
    peer.connect(r)?;
    peer.post_recvs()?;
    s.write_all(b"done\0").map_err(io("send done"))?;
    Ok(())
}

/// The tool's server side (`pp_server_exch_dest`): our QP is ready and receive 0 posted before
/// the answer goes out (the native client sends as soon as it has it).
fn exchange_as_server(peer: &mut Peer, port: u16) -> Res<()> {
    let l = TcpListener::bind(("0.0.0.0", port)).map_err(io("listen"))?;
    println!("pvrdma-peer: listening on port {port}");
    let (mut s, from) = l.accept().map_err(io("accept"))?;
    drop(l);
    println!("pvrdma-peer: connection from {from}");
    let mut m = [0u8; MSG_LEN];
    s.read_exact(&mut m).map_err(io("read remote address"))?;
    let r = Dest::decode(&m)?;
    peer.connect(r)?;
    peer.post_recvs()?;
    s.write_all(&peer.me.encode()).map_err(io("send address"))?;
    let mut done = [0u8; 5];
    s.read_exact(&mut done).map_err(io("read done"))?;
    if &done != b"done\0" {
        return Err(format!("expected \"done\", got {done:02x?}"));
    }
    Ok(())
}

fn run(a: &Args) -> Res<()> {
    if let Some(verb) = a.perftest {
        return perftest::run(a, verb);
    }
    let mut peer = Peer::open(a)?;
    let (size, iters) = (a.size, a.iters);
    let start;
    if let Some(addr) = &a.connect {
        // Native server: it echoes each message. Round k: our pattern k out, the same back.
        exchange_as_client(&mut peer, addr)?;
        start = Instant::now();
        for k in 0..iters {
            let p = pattern(size, k);
            peer.send(&p, k)?;
            peer.wait(SEND_ID | u64::from(k))?;
            peer.expect_recv(k, &p)?;
        }
    } else {
        // Native client: its first message is its own (0x7b with -c marks); each later one
        // echoes our pattern of the round before. Our last pattern ends the run on its side.
        exchange_as_server(&mut peer, a.listen.unwrap_or_default())?;
        start = Instant::now();
        peer.expect_recv(0, &native_first(size))?;
        for k in 0..iters {
            let next = k + 1 < iters;
            let p = pattern(size, k);
            peer.send(&p, k)?;
            peer.wait(SEND_ID | u64::from(k))?;
            if next {
                peer.expect_recv(k + 1, &p)?;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "pvrdma-peer: {} {}: {iters} round trips of {size} bytes, every payload verified, in {secs:.2} s \
         ({:.1} usec/iter)",
        match a.mode {
            Mode::Rc => "rc",
            Mode::Ud => "ud",
        },
        if a.connect.is_some() { "client" } else { "server" },
        secs * 1e6 / f64::from(iters)
    );
    peer.close()
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&a) {
        eprintln!("pvrdma-peer: FAILED: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trip() {
        let d = Dest {
            lid: 0,
            qpn: 0x11,
            psn: 0xabcdef,
            gid: rdma_backend::Gid::from_mac([0x52, 0x54, 0, 0x77, 0, 1]).0,
        };
        let m = d.encode();
        assert_eq!(
            &m[..MSG_LEN - 1],
            b"0000:000011:abcdef:fe80000000000000505400fffe770001"
        );
        assert_eq!(m[MSG_LEN - 1], 0);
        let e = Dest::decode(&m).unwrap();
        assert_eq!((e.lid, e.qpn, e.psn, e.gid), (0, 0x11, 0xabcdef, d.gid));
        assert_eq!(mac_of_gid(&d.gid), [0x52, 0x54, 0, 0x77, 0, 1]);
    }

    #[test]
    fn patterns_carry_the_check_marks() {
        let p = pattern(3 * PAGE, 5);
        assert!(p
            .iter()
            .enumerate()
            .all(|(i, &b)| (i % PAGE == 0) == (b == 0)));
        assert_ne!(p, pattern(3 * PAGE, 6));
        assert_eq!(native_first(PAGE + 2)[..3], [0, 0x7b, 0x7b]);
    }
}
