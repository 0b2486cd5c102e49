//! Shared pieces of the fuzz targets: an input cursor, a small device configuration, a probed
//! in-process device, and the `cmd_channel` input format (also written by the seed recorder,
//! `examples/record_seeds.rs`).

use std::sync::Arc;

use pvrdma_dev::abi::{self, cmd, CMD_SLOT_SIZE};
use pvrdma_dev::{DeviceConfig, Region};
use pvrdma_guest::driver::GuestError;
use pvrdma_guest::{Driver, Local, Transport};
use rdma_backend::emulated::Fabric;
use vm_memory::{ByteValued, Bytes, GuestAddress};

/// Guest RAM of the in-process devices the targets drive.
pub const RAM: usize = 16 << 20;

/// Reads fixed-size little-endian fields off the fuzz input; past the end it yields zeros.
#[derive(Debug)]
pub struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// A cursor over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { data }
    }
    /// Whether all input is consumed.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a
    }
    fn fixed<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }
    /// A byte.
    pub fn u8(&mut self) -> u8 {
        self.fixed::<1>()[0]
    }
    /// A u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.fixed())
    }
    /// A u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.fixed())
    }
    /// A u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.fixed())
    }
}

/// Small tables so the fuzzer reaches exhaustion quickly; one worker to keep runs repeatable.
pub fn small_cfg() -> DeviceConfig {
    DeviceConfig {
        max_qp: 8,
        max_qp_wr: 512,
        max_cq: 8,
        max_cqe: 1024,
        max_mr: 8,
        max_mr_pages: 4096,
        max_pd: 8,
        max_srq: 4,
        max_srq_wr: 64,
        max_uar: 8,
        gid_tbl_len: 4,
        workers: 1,
        ..DeviceConfig::default()
    }
}

/// A device with the emulated backend in 16 MiB of guest RAM.
///
/// The device runs on the calling thread ([`Local`]: inline worker pool, no device thread), so an
/// input replays the same way every time, and one fabric (with its timer thread) serves every
/// input of the process.
pub fn device(cfg: &DeviceConfig) -> Arc<Local> {
    Arc::new(Local::new(cfg.clone(), RAM, &fabric()).expect("a local device"))
}

/// The process's one emulated fabric (with its timer thread), shared by every input.
fn fabric() -> Arc<Fabric> {
    thread_local! {
        static FABRIC: Arc<Fabric> = Fabric::new();
    }
    FABRIC.with(Arc::clone)
}

/// A device probed as `vmw_pvrdma` does (DSR, rings, ACTIVATE).
pub fn probed(cfg: &DeviceConfig) -> (Arc<Local>, Driver) {
    let t = device(cfg);
    let drv = Driver::probe(t.clone() as Arc<dyn Transport>).expect("probe of a fresh device");
    (t, drv)
}

/// `cmd_channel` input: a sequence of operations, each a tag byte then its fields.
pub mod op {
    /// A 184-byte request posted through the command channel (short input is zero-padded).
    pub const CMD: u8 = 0;
    /// `addr: u32` (taken modulo guest RAM), `len: u8`, then `len` bytes written to guest RAM.
    pub const SCRIBBLE: u8 = 1;
    /// `dir: u16, npages: u16, first: u16` (page numbers modulo guest RAM): a valid page
    /// directory at page `dir` (tables right after it) listing `npages % 1024 + 1` contiguous
    /// pages from page `first`.
    pub const PDIR: u8 = 2;
    /// `offset: u16, value: u32`: a 4-byte UAR (BAR2) doorbell write.
    pub const DOORBELL: u8 = 3;
    /// Number of tags (the tag byte is taken modulo this).
    pub const COUNT: u8 = 4;
}

/// Pages of guest RAM.
pub const RAM_PAGES: u64 = (RAM as u64) / 4096;

/// Writes a page directory at page `dir` listing `npages` pages from page `first`
/// (the [`op::PDIR`] operation). Returns the directory's guest address.
pub fn build_pdir(t: &Local, dir: u16, npages: u16, first: u16) -> u64 {
    let mem = t.mem();
    let npages = u64::from(npages % 1024) + 1;
    let ntables = npages.div_ceil(512);
    // Directory and tables must fit in RAM; page 0 is left alone.
    let dir = 1 + u64::from(dir) % (RAM_PAGES - 1 - ntables);
    let first = u64::from(first) % (RAM_PAGES - npages);
    let dir_addr = dir * 4096;
    for t_idx in 0..ntables {
        let table = (dir + 1 + t_idx) * 4096;
        let _ = mem.write_obj(table, GuestAddress(dir_addr + 8 * t_idx));
        for j in 0..512u64.min(npages - t_idx * 512) {
            let page = (first + t_idx * 512 + j) * 4096;
            let _ = mem.write_obj(page, GuestAddress(table + 8 * j));
        }
    }
    dir_addr
}

/// What a successful command's response must satisfy. Panics (a fuzzer crash) on a violation.
pub fn check_response(cfg: &DeviceConfig, code: u32, resp: &[u8]) {
    fn get<T: ByteValued + Default>(resp: &[u8]) -> T {
        let mut v = T::default();
        let n = std::mem::size_of::<T>();
        v.as_mut_slice().copy_from_slice(&resp[..n]);
        v
    }
    match code {
        cmd::CREATE_QP => {
            let r: abi::RespCreateQpV2 = get(resp);
            assert!(
                (1..cfg.max_qp).contains(&r.qp_handle),
                "CREATE_QP handle {} outside 1..{}",
                r.qp_handle,
                cfg.max_qp
            );
            // With the v2 response the qpn is the backend's wire QP number, independent of the
            // handle: any non-zero 24-bit value (the emulated backend's counter wraps there).
            assert!(
                (1..=0xff_ffff).contains(&r.qpn),
                "CREATE_QP qpn {:#x} is not a non-zero 24-bit number",
                r.qpn
            );
            assert!(r.max_send_wr <= cfg.max_qp_wr && r.max_recv_wr <= cfg.max_qp_wr);
            assert!(r.max_send_sge <= cfg.max_sge && r.max_recv_sge <= cfg.max_sge);
        }
        cmd::CREATE_CQ => {
            let r: abi::RespCreateCq = get(resp);
            assert!(
                (1..cfg.max_cq).contains(&r.cq_handle),
                "CREATE_CQ handle {} outside 1..{}",
                r.cq_handle,
                cfg.max_cq
            );
            assert!(r.cqe <= cfg.max_cqe, "CREATE_CQ cqe {}", r.cqe);
        }
        cmd::CREATE_PD => {
            let r: abi::RespCreatePd = get(resp);
            assert!(
                (1..=cfg.max_pd).contains(&r.pd_handle),
                "PD {}",
                r.pd_handle
            );
        }
        cmd::CREATE_SRQ => {
            let r: abi::RespCreateSrq = get(resp);
            assert!((1..cfg.max_srq).contains(&r.srqn), "SRQ {}", r.srqn);
        }
        cmd::CREATE_UC => {
            let r: abi::RespCreateUc = get(resp);
            assert!(
                (1..cfg.max_uar).contains(&r.ctx_handle),
                "UC {}",
                r.ctx_handle
            );
        }
        _ => {}
    }
}

/// Runs one `cmd_channel` input against a probed device and checks the invariants: every
/// command answers through ERR (and, when ERR is 0, with an acknowledged response), responses
/// stay within the advertised limits, no table outgrows its limit, and the device still
/// answers QUERY_PORT at the end.
pub fn run_cmd_channel(data: &[u8]) {
    let cfg = small_cfg();
    let (t, drv) = probed(&cfg);
    let mut c = Cursor::new(data);
    let mut n_ops = 0;
    while !c.is_empty() && n_ops < 512 {
        n_ops += 1;
        match c.u8() % op::COUNT {
            op::CMD => {
                let mut req = [0u8; CMD_SLOT_SIZE];
                let b = c.bytes(CMD_SLOT_SIZE);
                req[..b.len()].copy_from_slice(b);
                let code = u32::from_le_bytes([req[8], req[9], req[10], req[11]]);
                match drv.cmd_raw(&req, true) {
                    Ok(resp) => check_response(&cfg, code, &resp),
                    Err(GuestError::Command { err, .. }) => assert_ne!(err, 0),
                    Err(e) => panic!("command {code} did not answer properly: {e:?}"),
                }
            }
            op::SCRIBBLE => {
                let addr = u64::from(c.u32()) % RAM as u64;
                let len = usize::from(c.u8());
                let bytes = c.bytes(len);
                let _ = t.mem().write_slice(bytes, GuestAddress(addr));
            }
            op::PDIR => {
                let (dir, n, first) = (c.u16(), c.u16(), c.u16());
                build_pdir(&t, dir, n, first);
            }
            _ => {
                let off = u64::from(c.u16()) % cfg.uar_bar_size();
                let v = c.u32();
                t.write(Region::Bar(2), off & !3, &v.to_le_bytes());
            }
        }
    }
    let port = drv.query_port(1).expect("QUERY_PORT after the sequence");
    assert!(port.gid_tbl_len <= cfg.gid_tbl_len);
    let s = t.stats().expect("stats");
    let o = s.objects;
    assert!(o.pds <= u64::from(cfg.max_pd) && o.mrs <= u64::from(cfg.max_mr));
    assert!(o.cqs < u64::from(cfg.max_cq) && o.qps < u64::from(cfg.max_qp));
    assert!(o.srqs < u64::from(cfg.max_srq.max(1)) && o.ucs < u64::from(cfg.max_uar));
}

/// `registers` input: up to 128 accesses, each `sel: u8` (region `sel % 4`: config, BAR0, BAR1,
/// BAR2; offset mode `(sel >> 2) % 8`: 0 a raw u64, 1–3 a u8 below 0x40, 4–7 a u16 modulo the
/// region size; length `[1, 2, 4, 8, 4, 4, 0, 3][sel >> 5]`), then `rw: u8` (bit 0: write), then
/// for a write a u64 value and, for a 4-byte REQUEST write, 184 bytes for the command slot.
pub mod reg_op {
    /// Length index (`sel >> 5`) of a 4-byte access.
    pub const LEN4: u8 = 2;
    /// Offset mode of "u16 modulo the region size".
    pub const MODE_U16: u8 = 4;
}

/// Runs one `registers` input (format: [`reg_op`]) on a probed device and checks the
/// invariants: every access is answered; afterwards a CTL RESET brings the device back to a
/// state the driver probes again, and that probe's device answers QUERY_PORT.
pub fn run_registers(data: &[u8]) {
    use pvrdma_dev::pci::{
        CONFIG_SPACE_SIZE, MSIX_BAR_SIZE, MSIX_CAP_OFFSET, MSIX_CTRL_ENABLE, REG_BAR_SIZE,
    };
    use pvrdma_dev::regs::{ctl, offset};

    let cfg = small_cfg();
    let (t, drv) = probed(&cfg);
    // The device's own answer to each access (the transport hides a failed one as all-ones).
    let read = |region, off, buf: &mut [u8]| {
        t.with_device(|d| d.read(region, off, buf))
            .expect("the device lives on this thread")
    };
    let write = |region, off, buf: &[u8]| {
        t.with_device(|d| d.write(region, off, buf))
            .expect("the device lives on this thread")
    };
    let mut c = Cursor::new(data);
    let mut ops = 0;
    while !c.is_empty() && ops < 128 {
        ops += 1;
        let sel = c.u8();
        let (region, size) = match sel % 4 {
            0 => (Region::Config, CONFIG_SPACE_SIZE),
            1 => (Region::Bar(0), MSIX_BAR_SIZE),
            2 => (Region::Bar(1), REG_BAR_SIZE),
            _ => (Region::Bar(2), cfg.uar_bar_size()),
        };
        // Mostly in range (registers cluster at low offsets); sometimes anything.
        let off = match (sel >> 2) % 8 {
            0 => c.u64(),
            1 | 2 | 3 => u64::from(c.u8() % 0x40),
            _ => u64::from(c.u16()) % size,
        };
        let len = [1usize, 2, 4, 8, 4, 4, 0, 3][usize::from(sel >> 5)];
        if c.u8() & 1 == 0 {
            let mut buf = [0u8; 8];
            read(region, off, &mut buf[..len]).expect("read answered");
        } else {
            let v = c.u64().to_le_bytes();
            // Give the command slot fuzz content now and then, so REQUEST does something.
            if region == Region::Bar(1) && off == offset::REQUEST && len == 4 {
                let slot = c.bytes(184);
                let dsr = drv.dsr;
                let cmd_slot: u64 = t.mem().read_obj(GuestAddress(dsr.0 + 16)).unwrap_or(0);
                let _ = t.mem().write_slice(slot, GuestAddress(cmd_slot));
            }
            write(region, off, &v[..len]).expect("write handled");
        }
    }
    // What firmware and the kernel redo before a probe: memory decoding and bus mastering on,
    // MSI-X enabled with the function unmasked (a CTL RESET leaves config space alone). Then a
    // CTL RESET, and the driver's probe again.
    write(Region::Config, 4, &6u16.to_le_bytes()).unwrap();
    write(
        Region::Config,
        MSIX_CAP_OFFSET + 2,
        &MSIX_CTRL_ENABLE.to_le_bytes(),
    )
    .unwrap();
    write(Region::Bar(1), offset::CTL, &ctl::RESET.to_le_bytes()).unwrap();
    let mut err = [0u8; 4];
    read(Region::Bar(1), offset::ERR, &mut err).unwrap();
    assert_eq!(u32::from_le_bytes(err), 0);
    drop(drv);
    let drv = Driver::probe(t.clone() as Arc<dyn Transport>).expect("probe after CTL RESET");
    drv.query_port(1).expect("QUERY_PORT after reset and probe");
}

/// A vfio-user connection's device on the fuzzer's thread (`Connection::new_local`: no thread
/// per input, exact replay) with [`small_cfg`], on one emulated fabric per process.
pub fn local_connection() -> pvrdma_vfio_user::Connection<pvrdma_dev::LocalDevice> {
    pvrdma_vfio_user::Connection::new_local(
        &small_cfg(),
        "fuzz".into(),
        &fabric(),
        &pvrdma_vfio_user::BackendChoice::Emulated,
    )
    .expect("device starts")
}
