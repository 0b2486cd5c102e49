//! The guest driver: does what `vmw_pvrdma` does at probe and for every verb, and what the
//! `libvmw_pvrdma` provider does for user objects.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pvrdma_dev::abi::{self, *};
use pvrdma_dev::regs::{ctl, offset, uar};
use pvrdma_dev::{rq_wqe_size, sq_wqe_size, Region};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::mem::{GuestPdir, PageAlloc, PAGE};
use crate::transport::Transport;

/// Where the harness programs the BARs (as firmware would).
pub const BAR0_ADDR: u64 = 0xfe00_0000;
/// Register BAR address.
pub const BAR1_ADDR: u64 = 0xfe10_0000;
/// UAR BAR address (64-bit BAR above 4 GiB).
pub const BAR2_ADDR: u64 = 0x80_0000_0000;

/// How long the driver waits for a command response (the driver's own timeout).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a harness operation failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuestError {
    /// The device is not a PVRDMA device.
    #[error("no PVRDMA device: {0:04x}:{1:04x}")]
    NotPvrdma(u16, u16),
    /// The caps fail the driver's PVRDMA_SUPPORTED check.
    #[error("driver needs RoCE v1 or v2 support")]
    Unsupported,
    /// `max_uar` is not a power of two.
    #[error("failed to allocate UAR table")]
    UarTable,
    /// ACTIVATE left ERR non-zero.
    #[error("failed to activate device (ERR {0})")]
    Activate(u32),
    /// A command failed through the ERR register.
    #[error("command {cmd} failed with ERR {err}")]
    Command {
        /// Command code.
        cmd: u32,
        /// ERR value.
        err: u32,
    },
    /// No response interrupt within the timeout.
    #[error("command {0} timed out")]
    Timeout(u32),
    /// The response's ack does not match.
    #[error("unknown response {got:#x} to command {cmd}")]
    BadAck {
        /// Command code.
        cmd: u32,
        /// Ack found in the response slot.
        got: u32,
    },
    /// MODIFY_QP answered with `hdr.err`.
    #[error("modify QP failed with resp err {0}")]
    ModifyErr(u8),
}

/// Result type of the harness.
pub type Result<T> = std::result::Result<T, GuestError>;

/// Index arithmetic of `pvrdma_ring.h`.
pub mod idx {
    /// `pvrdma_idx_valid`.
    pub fn valid(i: u32, n: u32) -> bool {
        i & !((n << 1).wrapping_sub(1)) == 0
    }
    /// `pvrdma_idx_ring_inc`.
    pub fn inc(i: u32, n: u32) -> u32 {
        i.wrapping_add(1) & (n << 1).wrapping_sub(1)
    }
    /// Slot of an index.
    pub fn slot(i: u32, n: u32) -> u32 {
        i & n.wrapping_sub(1)
    }
}

/// A device-produced DSR ring as the driver reads it.
#[derive(Debug)]
pub struct DsrRing {
    /// The ring's page directory (page 0 = ring state).
    pub pdir: GuestPdir,
    /// N as the driver computes it.
    pub n: u32,
    elem: u64,
}

impl DsrRing {
    fn new(alloc: &PageAlloc, mem: &GuestMemoryMmap, pages: usize, elem: u64) -> DsrRing {
        let p = (0..pages).map(|_| alloc.page(mem)).collect();
        DsrRing {
            pdir: GuestPdir::build(alloc, mem, p),
            n: ((pages as u64 - 1) * PAGE / elem) as u32,
            elem,
        }
    }

    /// Takes every available element (raw bytes), advancing `cons_head` like the driver.
    pub fn drain(&self, mem: &GuestMemoryMmap) -> Vec<Vec<u8>> {
        let st = self.pdir.pages[0].unchecked_add(8);
        let mut out = Vec::new();
        for _ in 0..4096 {
            let tail: u32 = mem.load(st, Ordering::Acquire).unwrap_or(0);
            let head: u32 = mem
                .load(st.unchecked_add(4), Ordering::Acquire)
                .unwrap_or(0);
            if !idx::valid(tail, self.n) || !idx::valid(head, self.n) || tail == head {
                break;
            }
            let mut b = vec![0u8; self.elem as usize];
            let off = PAGE + u64::from(idx::slot(head, self.n)) * self.elem;
            self.pdir.read(mem, off, &mut b);
            out.push(b);
            let _ = mem.store(
                idx::inc(head, self.n),
                st.unchecked_add(4),
                Ordering::Release,
            );
        }
        out
    }
}

/// The driver's state for one device.
pub struct Driver {
    t: Arc<dyn Transport>,
    /// Allocator of guest pages.
    pub alloc: PageAlloc,
    /// Device ABI version read at probe.
    pub version: u32,
    /// The DSR page.
    pub dsr: GuestAddress,
    cmd_slot: GuestAddress,
    resp_slot: GuestAddress,
    /// Async event ring.
    pub async_ring: DsrRing,
    /// CQ notification ring.
    pub cq_ring: DsrRing,
    /// Caps the device wrote.
    pub caps: Caps,
    cmd_lock: Mutex<()>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// A user context (or the kernel: handle 0, UAR page 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ctx {
    /// `ctx_handle` (0 = kernel).
    pub handle: u32,
    /// UAR page index this context rings.
    pub uar: u32,
}

impl Ctx {
    /// The kernel's context.
    pub const KERNEL: Ctx = Ctx { handle: 0, uar: 0 };
}

/// A registered memory region and its pages.
#[derive(Debug)]
pub struct Mr {
    /// Handle.
    pub handle: u32,
    /// Local key.
    pub lkey: u32,
    /// Remote key.
    pub rkey: u32,
    /// Start address (user VA).
    pub iova: u64,
    /// Length in bytes.
    pub len: u64,
    /// The pages (`None` for the DMA MR).
    pub pdir: Option<GuestPdir>,
}

impl Mr {
    /// Writes `data` at `iova + off`.
    pub fn write(&self, mem: &GuestMemoryMmap, off: u64, data: &[u8]) {
        let p = self.pdir.as_ref().expect("user MR");
        p.write(mem, (self.iova % PAGE) + off, data);
    }
    /// Reads `buf.len()` bytes at `iova + off`.
    pub fn read(&self, mem: &GuestMemoryMmap, off: u64, buf: &mut [u8]) {
        let p = self.pdir.as_ref().expect("user MR");
        p.read(mem, (self.iova % PAGE) + off, buf);
    }
    /// An SGE covering `[off, off + len)`.
    pub fn sge(&self, off: u64, len: u32) -> WireSge {
        WireSge {
            addr: self.iova + off,
            length: len,
            lkey: self.lkey,
        }
    }
}

/// A CQ as the guest sees it.
#[derive(Debug)]
pub struct Cq {
    /// Handle.
    pub handle: u32,
    /// Entries.
    pub n: u32,
    /// Pages (page 0 = ring state).
    pub pdir: GuestPdir,
    /// Context whose UAR page rings this CQ.
    pub ctx: Ctx,
    pub(crate) cons: u32,
}

/// A work queue of a QP or SRQ as the producer sees it.
#[derive(Debug)]
pub struct Wq {
    /// Entries.
    pub n: u32,
    /// Bytes per WQE.
    pub wqe_size: u32,
    /// Byte offset of WQE 0 in the pdir's pages.
    pub base: u64,
    /// Offset of the ring state in page 0 (0 = SQ/tx, 8 = RQ/rx).
    pub state: u64,
    pub(crate) prod: u32,
}

/// QP types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpKind {
    /// GSI (QP1).
    Gsi = 1,
    /// RC.
    Rc = 2,
    /// UD.
    Ud = 4,
}

/// A QP as the guest sees it.
#[derive(Debug)]
pub struct Qp {
    /// Handle (CQE `qp`).
    pub handle: u32,
    /// QP number on the fabric.
    pub qpn: u32,
    /// Type.
    pub kind: QpKind,
    /// Pages.
    pub pdir: GuestPdir,
    /// Send queue.
    pub sq: Wq,
    /// Receive queue (`None` with an SRQ).
    pub rq: Option<Wq>,
    /// Owning context.
    pub ctx: Ctx,
}

/// An SRQ as the guest sees it.
#[derive(Debug)]
pub struct Srq {
    /// Handle.
    pub handle: u32,
    /// Pages.
    pub pdir: GuestPdir,
    /// The queue.
    pub rq: Wq,
    /// Owning context.
    pub ctx: Ctx,
}

/// A send WQE to post.
#[derive(Debug, Clone, Default)]
pub struct SendWqe {
    /// Identifier.
    pub wr_id: u64,
    /// pvrdma opcode (see `abi::wr_opcode`).
    pub opcode: u32,
    /// `send_flags`.
    pub flags: u32,
    /// Immediate data / invalidate key.
    pub imm: u32,
    /// SGEs.
    pub sges: Vec<WireSge>,
    /// RDMA/atomic remote address.
    pub remote_addr: u64,
    /// RDMA/atomic rkey.
    pub rkey: u32,
    /// Atomic compare (CAS) or add (FAA) value.
    pub compare_add: u64,
    /// Atomic swap value.
    pub swap: u64,
    /// UD destination.
    pub ud: Option<UdAddr>,
    /// FAST_REG_MR: the `fast_reg` member of the `wr` union.
    pub fast_reg: Option<FastRegWqe>,
    /// Overrides `num_sge` (to post malformed WQEs).
    pub num_sge_override: Option<u32>,
}

/// The `fast_reg` member of a FAST_REG_MR WQE, as `pvrdma_post_send` fills it.
#[derive(Debug, Clone, Copy, Default)]
pub struct FastRegWqe {
    /// First address of the mapping (`mr->ibmr.iova`).
    pub iova: u64,
    /// Page directory of the page list.
    pub pl_pdir: u64,
    /// log2 of the page size (the driver: 12).
    pub page_shift: u32,
    /// Pages in the list.
    pub page_list_len: u32,
    /// Length in bytes.
    pub length: u32,
    /// Access flags.
    pub access: u32,
    /// The key (the MR's with the consumer's low 8 bits).
    pub rkey: u32,
}

/// A fast-register MR (the kernel's `ib_alloc_mr`): its keys and room. Each registration
/// brings its own pages.
#[derive(Debug, Clone, Copy)]
pub struct Frmr {
    /// Handle.
    pub handle: u32,
    /// Local key as created.
    pub lkey: u32,
    /// Remote key as created.
    pub rkey: u32,
    /// Pages a registration may map.
    pub max_pages: u32,
}

impl Frmr {
    /// Its rkey with the consumer's low 8 bits set to `low` (`ib_update_fast_reg_key`).
    pub fn key(&self, low: u8) -> u32 {
        (self.rkey & !0xff) | u32::from(low)
    }
}

/// UD destination of a send.
#[derive(Debug, Clone, Copy, Default)]
pub struct UdAddr {
    /// Remote QPN.
    pub remote_qpn: u32,
    /// Q_Key.
    pub qkey: u32,
    /// Destination GID.
    pub dgid: [u8; 16],
    /// Source GID index.
    pub gid_index: u8,
    /// Destination MAC.
    pub dmac: [u8; 6],
    /// PD handle (for `port_pd`).
    pub pd: u32,
}

/// Parameters of MODIFY_QP: the mask and the attributes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Modify {
    /// `attr_mask`.
    pub mask: u32,
    /// Attributes.
    pub attrs: QpAttr,
}

/// IB attribute mask bits (the device's own definitions).
pub use pvrdma_dev::abi::qp_attr_mask as qp_mask;

fn cfg_read(t: &dyn Transport, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    t.read(Region::Config, off, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn cfg_write(t: &dyn Transport, off: u64, v: u64, len: usize) {
    t.write(Region::Config, off, &v.to_le_bytes()[..len]);
}

/// Programs BARs, enables memory decoding, bus mastering and MSI-X with all 3 vectors unmasked,
/// as firmware and `pci_alloc_irq_vectors` would. Returns (vendor, device).
pub fn pci_enable(t: &dyn Transport) -> (u16, u16) {
    let id = cfg_read(t, 0, 4) as u32;
    cfg_write(t, 0x10, BAR0_ADDR, 4);
    cfg_write(t, 0x14, BAR1_ADDR, 4);
    cfg_write(t, 0x18, BAR2_ADDR & 0xffff_ffff, 4);
    cfg_write(t, 0x1c, BAR2_ADDR >> 32, 4);
    cfg_write(t, 0x04, 0x6, 2); // MEM | bus master
    let mut cap = cfg_read(t, 0x34, 1);
    for _ in 0..48 {
        if cap == 0 || cap >= 256 {
            break;
        }
        if cfg_read(t, cap, 1) == 0x11 {
            let ctrl = cfg_read(t, cap + 2, 2);
            cfg_write(t, cap + 2, ctrl | 0x8000, 2);
            break;
        }
        cap = cfg_read(t, cap + 1, 1);
    }
    for v in 0..3u64 {
        t.write(Region::Bar(0), v * 16, &0xfee0_0000u32.to_le_bytes());
        t.write(Region::Bar(0), v * 16 + 8, &(0x40 + v as u32).to_le_bytes());
        t.write(Region::Bar(0), v * 16 + 12, &0u32.to_le_bytes());
    }
    (id as u16, (id >> 16) as u16)
}

fn reg_read(t: &dyn Transport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(Region::Bar(1), off, &mut b);
    u32::from_le_bytes(b)
}

fn reg_write(t: &dyn Transport, off: u64, v: u32) {
    t.write(Region::Bar(1), off, &v.to_le_bytes());
}

impl Driver {
    /// `pvrdma_pci_probe`: PCI enable, VERSION, DSR, DSRLOW/DSRHIGH, caps check, IMR, ACTIVATE.
    pub fn probe(t: Arc<dyn Transport>) -> Result<Driver> {
        let (ven, dev) = pci_enable(&*t);
        if (ven, dev) != (0x15ad, 0x0820) {
            return Err(GuestError::NotPvrdma(ven, dev));
        }
        let mem = t.mem().clone();
        let top = mem.last_addr().0 + 1;
        let alloc = PageAlloc::new(1 << 20, top);
        let version = reg_read(&*t, offset::VERSION);
        let dsr = alloc.page(&mem);
        let cmd_slot = alloc.page(&mem);
        let resp_slot = alloc.page(&mem);
        let async_ring = DsrRing::new(&alloc, &mem, 4, 8);
        let cq_ring = DsrRing::new(&alloc, &mem, 4, 4);
        let d = Dsr {
            driver_version: 20,
            gos_info: 0x46,
            cmd_slot_dma: cmd_slot.0,
            resp_slot_dma: resp_slot.0,
            async_ring_pages: RingPages {
                num_pages: 4,
                reserved: 0,
                pdir_dma: async_ring.pdir.dir.0,
            },
            cq_ring_pages: RingPages {
                num_pages: 4,
                reserved: 0,
                pdir_dma: cq_ring.pdir.dir.0,
            },
            uar_pfn64: BAR2_ADDR >> 12,
            ..Dsr::default()
        };
        mem.write_obj(d, dsr).expect("DSR write");
        reg_write(&*t, offset::DSRLOW, dsr.0 as u32);
        reg_write(&*t, offset::DSRHIGH, (dsr.0 >> 32) as u32);
        let caps: Caps = mem
            .read_obj(dsr.unchecked_add(abi::DSR_CAPS_OFFSET))
            .expect("caps read");
        let supported = caps.mode == 0
            && ((version == 17 && caps.gid_types == 1)
                || (version >= 18 && (caps.gid_types == 1 || caps.gid_types == 2)));
        if !supported {
            return Err(GuestError::Unsupported);
        }
        if !caps.max_uar.is_power_of_two() {
            return Err(GuestError::UarTable);
        }
        reg_write(&*t, offset::IMR, 0);
        reg_write(&*t, offset::CTL, ctl::ACTIVATE);
        let err = reg_read(&*t, offset::ERR);
        if err != 0 {
            return Err(GuestError::Activate(err));
        }
        Ok(Driver {
            t,
            alloc,
            version,
            dsr,
            cmd_slot,
            resp_slot,
            async_ring,
            cq_ring,
            caps,
            cmd_lock: Mutex::new(()),
        })
    }

    /// The transport.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.t
    }

    /// Guest RAM.
    pub fn mem(&self) -> &GuestMemoryMmap {
        self.t.mem()
    }

    /// Reads a register.
    pub fn reg(&self, off: u64) -> u32 {
        reg_read(&*self.t, off)
    }

    /// Writes a register.
    pub fn set_reg(&self, off: u64, v: u32) {
        reg_write(&*self.t, off, v)
    }

    /// Posts a raw request (padded to the slot size) exactly as `pvrdma_cmd_post` does and
    /// returns the response bytes when one is expected.
    pub fn cmd_raw(&self, req: &[u8], expect_resp: bool) -> Result<Vec<u8>> {
        let _g = self.cmd_lock.lock().expect("command lock");
        let mut slot = [0u8; CMD_SLOT_SIZE];
        let n = req.len().min(CMD_SLOT_SIZE);
        slot[..n].copy_from_slice(&req[..n]);
        let cmd = u32::from_le_bytes([slot[8], slot[9], slot[10], slot[11]]);
        let mem = self.mem();
        mem.write_slice(&slot, self.cmd_slot).expect("cmd slot");
        let seen = self.t.irq_count(0);
        // Posted, as the driver's writel is: the ERR read below is ordered after it and waits
        // for the command.
        self.t
            .write_posted(Region::Bar(1), offset::REQUEST, &0u32.to_le_bytes());
        let err = reg_read(&*self.t, offset::ERR);
        if err != 0 {
            return Err(GuestError::Command { cmd, err });
        }
        if !expect_resp {
            return Ok(Vec::new());
        }
        if !self.t.wait_irq(0, seen, CMD_TIMEOUT) {
            return Err(GuestError::Timeout(cmd));
        }
        let mut resp = vec![0u8; RESP_SLOT_SIZE];
        mem.read_slice(&mut resp, self.resp_slot)
            .expect("resp slot");
        let ack = u32::from_le_bytes([resp[8], resp[9], resp[10], resp[11]]);
        if ack != cmd | RESP_ACK {
            return Err(GuestError::BadAck { cmd, got: ack });
        }
        Ok(resp)
    }

    /// Posts a typed request and decodes a typed response.
    pub fn cmd<Q: ByteValued, R: ByteValued + Default>(&self, code: u32, mut req: Q) -> Result<R> {
        let b = req.as_mut_slice();
        b[8..12].copy_from_slice(&code.to_le_bytes());
        let resp = self.cmd_raw(req.as_slice(), true)?;
        let mut r = R::default();
        let n = std::mem::size_of::<R>();
        r.as_mut_slice().copy_from_slice(&resp[..n]);
        Ok(r)
    }

    /// Posts a typed request that has no response.
    pub fn cmd_noresp<Q: ByteValued>(&self, code: u32, mut req: Q) -> Result<()> {
        let b = req.as_mut_slice();
        b[8..12].copy_from_slice(&code.to_le_bytes());
        self.cmd_raw(req.as_slice(), false).map(|_| ())
    }

    // ---- verbs --------------------------------------------------------------------------

    /// QUERY_PORT.
    pub fn query_port(&self, port: u8) -> Result<PortAttr> {
        let r: RespQueryPort = self.cmd(
            cmd::QUERY_PORT,
            CmdQueryPort {
                port_num: port,
                ..Default::default()
            },
        )?;
        Ok(r.attrs)
    }

    /// QUERY_PKEY.
    pub fn query_pkey(&self, port: u8, index: u8) -> Result<u16> {
        let r: RespQueryPkey = self.cmd(
            cmd::QUERY_PKEY,
            CmdQueryPkey {
                port_num: port,
                index,
                ..Default::default()
            },
        )?;
        Ok(r.pkey)
    }

    /// CREATE_BIND.
    pub fn create_bind(&self, index: u32, gid: [u8; 16], gid_type: u8) -> Result<()> {
        self.cmd_noresp(
            cmd::CREATE_BIND,
            CmdCreateBind {
                mtu: 1024,
                vlan: 0xfff,
                index,
                new_gid: gid,
                gid_type,
                ..Default::default()
            },
        )
    }

    /// DESTROY_BIND.
    pub fn destroy_bind(&self, index: u32, gid: [u8; 16]) -> Result<()> {
        self.cmd_noresp(
            cmd::DESTROY_BIND,
            CmdDestroyBind {
                index,
                dest_gid: gid,
                ..Default::default()
            },
        )
    }

    /// CREATE_UC for UAR page `uar` (1..max_uar).
    pub fn create_uc(&self, uar: u32) -> Result<Ctx> {
        let r: RespCreateUc = self.cmd(
            cmd::CREATE_UC,
            CmdCreateUc {
                pfn64: (BAR2_ADDR >> 12) + u64::from(uar),
                ..Default::default()
            },
        )?;
        Ok(Ctx {
            handle: r.ctx_handle,
            uar,
        })
    }

    /// DESTROY_UC.
    pub fn destroy_uc(&self, ctx: Ctx) -> Result<()> {
        self.cmd_noresp(
            cmd::DESTROY_UC,
            CmdDestroyUc {
                ctx_handle: ctx.handle,
                ..Default::default()
            },
        )
    }

    /// CREATE_PD.
    pub fn create_pd(&self, ctx: Ctx) -> Result<u32> {
        let r: RespCreatePd = self.cmd(
            cmd::CREATE_PD,
            CmdCreatePd {
                ctx_handle: ctx.handle,
                ..Default::default()
            },
        )?;
        Ok(r.pd_handle)
    }

    /// DESTROY_PD.
    pub fn destroy_pd(&self, pd: u32) -> Result<()> {
        self.cmd_noresp(
            cmd::DESTROY_PD,
            CmdDestroyPd {
                pd_handle: pd,
                ..Default::default()
            },
        )
    }

    /// The kernel's DMA MR (`flags = 1`, LOCAL_WRITE).
    pub fn dma_mr(&self, pd: u32) -> Result<Mr> {
        let r: RespCreateMr = self.cmd(
            cmd::CREATE_MR,
            CmdCreateMr {
                pd_handle: pd,
                access_flags: 1,
                flags: 1,
                ..Default::default()
            },
        )?;
        Ok(Mr {
            handle: r.mr_handle,
            lkey: r.lkey,
            rkey: r.rkey,
            iova: 0,
            len: u64::MAX,
            pdir: None,
        })
    }

    /// Registers `len` bytes at user address `iova` backed by fresh scattered guest pages.
    pub fn reg_mr(&self, pd: u32, iova: u64, len: u64, access: u32) -> Result<Mr> {
        let npages = ((iova % PAGE) + len).div_ceil(PAGE) as usize;
        let pages = self.alloc.scattered(self.mem(), npages);
        let pdir = GuestPdir::build(&self.alloc, self.mem(), pages);
        self.freed_on_err(self.reg_mr_pdir(pd, iova, len, access, pdir.clone()), &pdir)
    }

    /// `r`, with `pdir`'s pages, tables and directory handed back to the allocator if it is an
    /// error: the command that was to take them failed (the kernel driver frees them too).
    fn freed_on_err<T>(&self, r: Result<T>, pdir: &GuestPdir) -> Result<T> {
        if r.is_err() {
            pdir.clone().free(&self.alloc);
        }
        r
    }

    /// Registers an MR over an existing page list.
    pub fn reg_mr_pdir(
        &self,
        pd: u32,
        iova: u64,
        len: u64,
        access: u32,
        pdir: GuestPdir,
    ) -> Result<Mr> {
        let r: RespCreateMr = self.cmd(
            cmd::CREATE_MR,
            CmdCreateMr {
                start: iova,
                length: len,
                pdir_dma: pdir.dir.0,
                pd_handle: pd,
                access_flags: access,
                flags: 0,
                nchunks: pdir.pages.len() as u32,
                ..Default::default()
            },
        )?;
        Ok(Mr {
            handle: r.mr_handle,
            lkey: r.lkey,
            rkey: r.rkey,
            iova,
            len,
            pdir: Some(pdir),
        })
    }

    /// A fast-register MR of `max_pages` (CREATE_MR with the FRMR flag, as `pvrdma_alloc_mr`).
    pub fn alloc_mr(&self, pd: u32, max_pages: u32) -> Result<Frmr> {
        let r: RespCreateMr = self.cmd(
            cmd::CREATE_MR,
            CmdCreateMr {
                pd_handle: pd,
                flags: 2,
                nchunks: max_pages,
                ..Default::default()
            },
        )?;
        Ok(Frmr {
            handle: r.mr_handle,
            lkey: r.lkey,
            rkey: r.rkey,
            max_pages,
        })
    }

    /// DESTROY_MR of a fast-register MR.
    pub fn destroy_frmr(&self, mr: Frmr) -> Result<()> {
        self.cmd_noresp(
            cmd::DESTROY_MR,
            CmdDestroyMr {
                mr_handle: mr.handle,
                ..Default::default()
            },
        )
    }

    /// DESTROY_MR.
    pub fn destroy_mr(&self, mr: Mr) -> Result<()> {
        self.cmd_noresp(
            cmd::DESTROY_MR,
            CmdDestroyMr {
                mr_handle: mr.handle,
                ..Default::default()
            },
        )?;
        if let Some(p) = mr.pdir {
            p.free(&self.alloc);
        }
        Ok(())
    }

    /// CREATE_CQ with `n` entries (a power of two) laid out as the kernel does.
    pub fn create_cq(&self, ctx: Ctx, n: u32) -> Result<Cq> {
        let npages = 1 + (u64::from(n) * 64).div_ceil(PAGE) as usize;
        let pages = self.alloc.scattered(self.mem(), npages);
        let pdir = GuestPdir::build(&self.alloc, self.mem(), pages);
        let r: RespCreateCq = self.freed_on_err(
            self.cmd(
                cmd::CREATE_CQ,
                CmdCreateCq {
                    pdir_dma: pdir.dir.0,
                    ctx_handle: ctx.handle,
                    cqe: n,
                    nchunks: npages as u32,
                    ..Default::default()
                },
            ),
            &pdir,
        )?;
        assert_eq!(r.cqe, n, "CREATE_CQ_RESP.cqe must equal the request");
        Ok(Cq {
            handle: r.cq_handle,
            n,
            pdir,
            ctx,
            cons: 0,
        })
    }

    /// DESTROY_CQ.
    pub fn destroy_cq(&self, cq: Cq) -> Result<()> {
        self.cmd_noresp(
            cmd::DESTROY_CQ,
            CmdDestroyCq {
                cq_handle: cq.handle,
                ..Default::default()
            },
        )?;
        cq.pdir.free(&self.alloc);
        Ok(())
    }

    /// CREATE_QP with queues laid out as the kernel does (header page, SQ pages, RQ pages).
    #[allow(clippy::too_many_arguments)]
    pub fn create_qp(
        &self,
        ctx: Ctx,
        kind: QpKind,
        pd: u32,
        send_cq: &Cq,
        recv_cq: &Cq,
        srq: Option<&Srq>,
        caps: (u32, u32, u32, u32),
        sq_sig_all: bool,
    ) -> Result<Qp> {
        let (max_send_wr, max_recv_wr, max_send_sge, max_recv_sge) = caps;
        let max_recv_wr = if srq.is_some() { 0 } else { max_recv_wr };
        let sq_wqe = sq_wqe_size(max_send_sge);
        let rq_wqe = rq_wqe_size(max_recv_sge);
        let send_chunks = (u64::from(max_send_wr) * u64::from(sq_wqe)).div_ceil(PAGE);
        let rq_pages = (u64::from(max_recv_wr) * u64::from(rq_wqe)).div_ceil(PAGE);
        let total = 1 + send_chunks + rq_pages;
        let pages = self.alloc.scattered(self.mem(), total as usize);
        let pdir = GuestPdir::build(&self.alloc, self.mem(), pages);
        let r: RespCreateQpV2 = self.freed_on_err(
            self.cmd(
                cmd::CREATE_QP,
                CmdCreateQp {
                    pdir_dma: pdir.dir.0,
                    pd_handle: pd,
                    send_cq_handle: send_cq.handle,
                    recv_cq_handle: recv_cq.handle,
                    srq_handle: srq.map(|s| s.handle).unwrap_or(0),
                    max_send_wr,
                    max_recv_wr,
                    max_send_sge,
                    max_recv_sge,
                    access_flags: 1,
                    total_chunks: total as u16,
                    send_chunks: send_chunks as u16,
                    sq_sig_all: sq_sig_all as u8,
                    qp_type: kind as u8,
                    is_srq: srq.is_some() as u8,
                    ..Default::default()
                },
            ),
            &pdir,
        )?;
        Ok(Qp {
            handle: r.qp_handle,
            qpn: r.qpn,
            kind,
            pdir,
            sq: Wq {
                n: max_send_wr,
                wqe_size: sq_wqe,
                base: PAGE,
                state: 0,
                prod: 0,
            },
            rq: srq.is_none().then_some(Wq {
                n: max_recv_wr,
                wqe_size: rq_wqe,
                base: (1 + send_chunks) * PAGE,
                state: 8,
                prod: 0,
            }),
            ctx,
        })
    }

    /// MODIFY_QP.
    pub fn modify_qp(&self, qp: &Qp, m: Modify) -> Result<()> {
        let r: RespHdr = self.cmd(
            cmd::MODIFY_QP,
            CmdModifyQp {
                qp_handle: qp.handle,
                attr_mask: m.mask,
                attrs: m.attrs,
                ..Default::default()
            },
        )?;
        if r.err > 0 {
            return Err(GuestError::ModifyErr(r.err));
        }
        Ok(())
    }

    /// Moves `qp` to RESET and zeroes its rings as the driver does.
    pub fn reset_qp(&self, qp: &mut Qp) -> Result<()> {
        self.modify_qp(
            qp,
            Modify {
                mask: qp_mask::STATE,
                attrs: QpAttr::default(),
            },
        )?;
        let st = qp.pdir.pages[0];
        self.mem().write_slice(&[0u8; 16], st).expect("ring state");
        qp.sq.prod = 0;
        if let Some(rq) = qp.rq.as_mut() {
            rq.prod = 0;
        }
        Ok(())
    }

    /// QUERY_QP.
    pub fn query_qp(&self, qp: &Qp) -> Result<QpAttr> {
        let r: RespQueryQp = self.cmd(
            cmd::QUERY_QP,
            CmdQueryQp {
                qp_handle: qp.handle,
                attr_mask: !0,
                ..Default::default()
            },
        )?;
        Ok(r.attrs)
    }

    /// DESTROY_QP.
    pub fn destroy_qp(&self, qp: Qp) -> Result<()> {
        self.cmd_noresp(
            cmd::DESTROY_QP,
            CmdDestroyQp {
                qp_handle: qp.handle,
                ..Default::default()
            },
        )?;
        qp.pdir.free(&self.alloc);
        Ok(())
    }

    /// CREATE_SRQ (provider layout: header page + WQE pages).
    pub fn create_srq(
        &self,
        ctx: Ctx,
        pd: u32,
        max_wr: u32,
        max_sge: u32,
        limit: u32,
    ) -> Result<Srq> {
        let wqe = rq_wqe_size(max_sge);
        let npages = 1 + (u64::from(max_wr) * u64::from(wqe)).div_ceil(PAGE) as usize;
        let pages = self.alloc.scattered(self.mem(), npages);
        let pdir = GuestPdir::build(&self.alloc, self.mem(), pages);
        let r: RespCreateSrq = self.freed_on_err(
            self.cmd(
                cmd::CREATE_SRQ,
                CmdCreateSrq {
                    pdir_dma: pdir.dir.0,
                    pd_handle: pd,
                    nchunks: npages as u32,
                    attrs: SrqAttr {
                        max_wr,
                        max_sge,
                        srq_limit: limit,
                        reserved: 0,
                    },
                    ..Default::default()
                },
            ),
            &pdir,
        )?;
        Ok(Srq {
            handle: r.srqn,
            pdir,
            rq: Wq {
                n: max_wr,
                wqe_size: wqe,
                base: PAGE,
                state: 8,
                prod: 0,
            },
            ctx,
        })
    }

    /// MODIFY_SRQ (limit).
    pub fn modify_srq(&self, srq: &Srq, limit: u32) -> Result<()> {
        self.cmd_noresp(
            cmd::MODIFY_SRQ,
            CmdModifySrq {
                srq_handle: srq.handle,
                attr_mask: 2,
                attrs: SrqAttr {
                    srq_limit: limit,
                    ..Default::default()
                },
                ..Default::default()
            },
        )
    }

    /// QUERY_SRQ.
    pub fn query_srq(&self, srq: &Srq) -> Result<SrqAttr> {
        let r: RespQuerySrq = self.cmd(
            cmd::QUERY_SRQ,
            CmdQuerySrq {
                srq_handle: srq.handle,
                ..Default::default()
            },
        )?;
        Ok(r.attrs)
    }

    /// DESTROY_SRQ.
    pub fn destroy_srq(&self, srq: Srq) -> Result<()> {
        self.cmd_noresp(
            cmd::DESTROY_SRQ,
            CmdDestroySrq {
                srq_handle: srq.handle,
                ..Default::default()
            },
        )?;
        srq.pdir.free(&self.alloc);
        Ok(())
    }

    // ---- doorbells and rings ------------------------------------------------------------

    /// Writes a doorbell on `ctx`'s UAR page: posted, like the driver's writel, except a CQ
    /// ARM/ARM_SOL, which the VMM delivers before the guest's next step (QEMU's
    /// `x-no-posted-writes`, the server's [`uar::may_post`]): an ARM must be in force before the
    /// guest polls the CQ again.
    pub fn doorbell(&self, ctx: Ctx, reg: u64, v: u32) {
        let at = u64::from(ctx.uar) * PAGE + reg;
        if uar::may_post(reg, &v.to_le_bytes()) {
            self.t.write_posted(Region::Bar(2), at, &v.to_le_bytes());
        } else {
            self.t.write(Region::Bar(2), at, &v.to_le_bytes());
        }
    }

    fn wq_push(&self, pdir: &GuestPdir, wq: &mut Wq, bytes: &[u8]) -> bool {
        let mem = self.mem();
        let st = pdir.pages[0].unchecked_add(wq.state);
        let head: u32 = mem
            .load(st.unchecked_add(4), Ordering::Acquire)
            .unwrap_or(0);
        // has_space: tail != head ^ N
        if wq.prod == head ^ wq.n {
            return false;
        }
        let off = wq.base + u64::from(idx::slot(wq.prod, wq.n)) * u64::from(wq.wqe_size);
        pdir.write(mem, off, bytes);
        wq.prod = idx::inc(wq.prod, wq.n);
        mem.store(wq.prod, st, Ordering::Release)
            .expect("prod_tail");
        true
    }

    /// Writes a send WQE into the SQ without ringing; false when the SQ is full.
    pub fn push_send(&self, qp: &mut Qp, w: &SendWqe) -> bool {
        let mut hdr = SqWqeHdr {
            wr_id: w.wr_id,
            num_sge: w.num_sge_override.unwrap_or(w.sges.len() as u32),
            total_len: 0xdead_beef, // stale, as the provider leaves it
            opcode: w.opcode,
            send_flags: w.flags,
            ex: w.imm,
            ..Default::default()
        };
        {
            let b = hdr.as_mut_slice();
            if let Some(f) = w.fast_reg {
                b[32..40].copy_from_slice(&f.iova.to_le_bytes());
                b[40..48].copy_from_slice(&f.pl_pdir.to_le_bytes());
                b[48..52].copy_from_slice(&f.page_shift.to_le_bytes());
                b[52..56].copy_from_slice(&f.page_list_len.to_le_bytes());
                b[56..60].copy_from_slice(&f.length.to_le_bytes());
                b[60..64].copy_from_slice(&f.access.to_le_bytes());
                b[64..68].copy_from_slice(&f.rkey.to_le_bytes());
            } else if let Some(ud) = w.ud {
                b[32..36].copy_from_slice(&ud.remote_qpn.to_le_bytes());
                b[36..40].copy_from_slice(&ud.qkey.to_le_bytes());
                b[40..44].copy_from_slice(&(ud.pd | (1 << 24)).to_le_bytes());
                b[48..64].copy_from_slice(&ud.dgid);
                b[64] = 0x80;
                b[65] = ud.gid_index;
                b[67] = 64;
                b[68..74].copy_from_slice(&ud.dmac);
            } else {
                b[32..40].copy_from_slice(&w.remote_addr.to_le_bytes());
                match w.opcode {
                    wr_opcode::ATOMIC_CMP_AND_SWP | wr_opcode::ATOMIC_FETCH_AND_ADD => {
                        b[40..48].copy_from_slice(&w.compare_add.to_le_bytes());
                        b[48..56].copy_from_slice(&w.swap.to_le_bytes());
                        b[56..60].copy_from_slice(&w.rkey.to_le_bytes());
                    }
                    _ => b[40..44].copy_from_slice(&w.rkey.to_le_bytes()),
                }
            }
        }
        let mut bytes = hdr.as_slice().to_vec();
        for s in &w.sges {
            bytes.extend_from_slice(s.as_slice());
        }
        bytes.truncate(qp.sq.wqe_size as usize);
        let pdir = qp.pdir.clone();
        self.wq_push(&pdir, &mut qp.sq, &bytes)
    }

    /// Posts a send WQE and rings the SQ doorbell; false when the SQ is full.
    pub fn post_send(&self, qp: &mut Qp, w: &SendWqe) -> bool {
        let ok = self.push_send(qp, w);
        if ok {
            self.ring_sq(qp);
        }
        ok
    }

    /// Rings the SQ doorbell.
    pub fn ring_sq(&self, qp: &Qp) {
        self.doorbell(qp.ctx, uar::QP, qp.handle | (1 << 30));
    }

    /// Writes a receive WQE; false when the RQ is full.
    pub fn push_recv(&self, qp: &mut Qp, wr_id: u64, sges: &[WireSge]) -> bool {
        let bytes = recv_bytes(wr_id, sges);
        let pdir = qp.pdir.clone();
        let rq = qp.rq.as_mut().expect("QP without an SRQ");
        self.wq_push(&pdir, rq, &bytes)
    }

    /// Whether the device has taken every receive WQE written to `qp`'s ring.
    pub fn rq_drained(&self, qp: &Qp) -> bool {
        let rq = qp.rq.as_ref().expect("QP without an SRQ");
        let st = qp.pdir.pages[0].unchecked_add(rq.state);
        let head: u32 = self
            .mem()
            .load(st.unchecked_add(4), Ordering::Acquire)
            .unwrap_or(0);
        head == rq.prod
    }

    /// Posts a receive and rings the RQ doorbell.
    pub fn post_recv(&self, qp: &mut Qp, wr_id: u64, sges: &[WireSge]) -> bool {
        let ok = self.push_recv(qp, wr_id, sges);
        if ok {
            self.doorbell(qp.ctx, uar::QP, qp.handle | (1 << 31));
        }
        ok
    }

    /// Posts a receive to an SRQ and rings its doorbell.
    pub fn post_srq_recv(&self, srq: &mut Srq, wr_id: u64, sges: &[WireSge]) -> bool {
        let bytes = recv_bytes(wr_id, sges);
        let pdir = srq.pdir.clone();
        let ok = self.wq_push(&pdir, &mut srq.rq, &bytes);
        if ok {
            self.doorbell(srq.ctx, uar::SRQ, srq.handle | (1 << 30));
        }
        ok
    }

    /// Arms `cq` (ARM, or ARM_SOL when `solicited_only`).
    pub fn arm_cq(&self, cq: &Cq, solicited_only: bool) {
        let bit = if solicited_only { 1 << 29 } else { 1 << 30 };
        self.doorbell(cq.ctx, uar::CQ, cq.handle | bit);
    }

    /// Takes one CQE if available (without a POLL doorbell).
    pub fn poll_cq(&self, cq: &mut Cq) -> Option<Cqe> {
        let mem = self.mem();
        let st = cq.pdir.pages[0].unchecked_add(8);
        let tail: u32 = mem.load(st, Ordering::Acquire).ok()?;
        if !idx::valid(tail, cq.n) || tail == cq.cons {
            return None;
        }
        let off = PAGE + u64::from(idx::slot(cq.cons, cq.n)) * 64;
        let mut c = Cqe::default();
        cq.pdir.read(mem, off, c.as_mut_slice());
        cq.cons = idx::inc(cq.cons, cq.n);
        mem.store(cq.cons, st.unchecked_add(4), Ordering::Release)
            .ok()?;
        Some(c)
    }

    /// Polls until `n` CQEs arrived or `timeout` passed; rings POLL when the CQ looks empty.
    pub fn wait_cqes(&self, cq: &mut Cq, n: usize, timeout: Duration) -> Vec<Cqe> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n.min(1024));
        let mut spins = 0u32;
        while out.len() < n {
            match self.poll_cq(cq) {
                Some(c) => {
                    out.push(c);
                    spins = 0;
                }
                None => {
                    if Instant::now() >= deadline {
                        break;
                    }
                    spins += 1;
                    if spins == 1 {
                        self.doorbell(cq.ctx, uar::CQ, cq.handle | (1 << 31));
                    }
                    self.t.idle(if spins > 64 {
                        Duration::from_micros(50)
                    } else {
                        Duration::ZERO
                    });
                }
            }
        }
        out
    }

    /// Async events posted so far (type, info), consumed like the driver's handler.
    pub fn events(&self) -> Vec<(u32, u32)> {
        self.async_ring
            .drain(self.mem())
            .into_iter()
            .map(|b| {
                (
                    u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
                )
            })
            .collect()
    }

    /// CQ notifications posted so far (CQ handles).
    pub fn cq_notifications(&self) -> Vec<u32> {
        self.cq_ring
            .drain(self.mem())
            .into_iter()
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    /// Interrupts seen on `vector`.
    pub fn irqs(&self, vector: u16) -> u64 {
        self.t.irq_count(vector)
    }

    /// CTL RESET, as `pvrdma_pci_remove` does (IMR off first).
    pub fn remove(&self) {
        reg_write(&*self.t, offset::IMR, !0);
        reg_write(&*self.t, offset::CTL, ctl::RESET);
    }
}

fn recv_bytes(wr_id: u64, sges: &[WireSge]) -> Vec<u8> {
    let hdr = RqWqeHdr {
        wr_id,
        num_sge: sges.len() as u32,
        total_len: 0,
    };
    let mut bytes = hdr.as_slice().to_vec();
    for s in sges {
        bytes.extend_from_slice(s.as_slice());
    }
    bytes
}

/// A convenient RC connection: modify `qp` through INIT → RTR → RTS towards `dest_qpn` at `dgid`.
pub fn rc_connect_attrs(dest_qpn: u32, dgid: [u8; 16], access: u32) -> [Modify; 3] {
    let init = Modify {
        mask: qp_mask::STATE | qp_mask::PKEY_INDEX | qp_mask::PORT | qp_mask::ACCESS_FLAGS,
        attrs: QpAttr {
            qp_state: 1,
            port_num: 1,
            qp_access_flags: access,
            ..Default::default()
        },
    };
    let mut ah = AhAttr {
        port_num: 1,
        ah_flags: 1,
        ..Default::default()
    };
    ah.grh.dgid = dgid;
    ah.grh.hop_limit = 1;
    let rtr = Modify {
        mask: qp_mask::STATE
            | qp_mask::AV
            | qp_mask::PATH_MTU
            | qp_mask::DEST_QPN
            | qp_mask::RQ_PSN
            | qp_mask::MAX_DEST_RD_ATOMIC
            | qp_mask::MIN_RNR_TIMER,
        attrs: QpAttr {
            qp_state: 2,
            path_mtu: 3,
            dest_qp_num: dest_qpn,
            rq_psn: 0,
            max_dest_rd_atomic: 16,
            min_rnr_timer: 1,
            ah_attr: ah,
            ..Default::default()
        },
    };
    let rts = Modify {
        mask: qp_mask::STATE
            | qp_mask::TIMEOUT
            | qp_mask::RETRY_CNT
            | qp_mask::RNR_RETRY
            | qp_mask::SQ_PSN
            | qp_mask::MAX_QP_RD_ATOMIC,
        attrs: QpAttr {
            qp_state: 3,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            max_rd_atomic: 16,
            ..Default::default()
        },
    };
    [init, rtr, rts]
}

/// UD/GSI: INIT (pkey, qkey, port) → RTR → RTS (sq_psn).
pub fn ud_attrs(qkey: u32) -> [Modify; 3] {
    [
        Modify {
            mask: qp_mask::STATE | qp_mask::PKEY_INDEX | qp_mask::PORT | qp_mask::QKEY,
            attrs: QpAttr {
                qp_state: 1,
                port_num: 1,
                qkey,
                ..Default::default()
            },
        },
        Modify {
            mask: qp_mask::STATE,
            attrs: QpAttr {
                qp_state: 2,
                ..Default::default()
            },
        },
        Modify {
            mask: qp_mask::STATE | qp_mask::SQ_PSN,
            attrs: QpAttr {
                qp_state: 3,
                ..Default::default()
            },
        },
    ]
}
