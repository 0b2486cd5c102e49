//! The Device Shared Region: loading it on the DSRHIGH write, writing the caps, and the two
//! device-produced DSR rings (async events and CQ notifications), spec/device-abi.md §2 and §5.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::abi::{Caps, Cqne, Dsr, Eqe, DSR_CAPS_OFFSET};
use crate::config::DeviceConfig;
use crate::pdir::{self, PageDir, PAGE_SIZE};
use crate::ring::{self, ProducerRing, RingAddr};

/// Most pages a DSR ring may have (CVE-2023-1544: QEMU read past one page table with more).
pub use crate::ring::MAX_DSR_RING_PAGES;
/// Async events outstanding at once: the quirk ring only ever uses page 1 (spec §5), 512 EQEs.
pub const MAX_OUTSTANDING_EQES: u32 = 512;
/// CQ notifications outstanding at once: page 1 only, 1024 CQNEs.
pub const MAX_OUTSTANDING_CQNES: u32 = 1024;

/// Errors of DSR handling.
#[derive(Debug, thiserror::Error)]
pub enum DsrError {
    /// The DSR itself is not in guest memory.
    #[error("DSR at {0:#x} is not in guest memory")]
    BadAddress(u64),
    /// A slot address is zero, unaligned or outside guest memory.
    #[error("{0} slot at {1:#x} is not a usable guest page")]
    BadSlot(&'static str, u64),
    /// A ring's page count is out of range (CVE-2021-3607, CVE-2023-1544).
    #[error("{0} ring has {1} pages; 2..=512 are accepted")]
    BadRingPages(&'static str, u32),
    /// A ring's page directory is invalid.
    #[error("{0} ring page directory")]
    RingPdir(&'static str, #[source] pdir::Error),
    /// A ring's indices are invalid.
    #[error("{0} ring")]
    Ring(&'static str, #[source] ring::Error),
    /// Guest memory access failed.
    #[error("guest memory access failed")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, DsrError>;

/// The caps this device advertises for `cfg`.
pub fn caps(cfg: &DeviceConfig) -> Caps {
    let guid = rdma_backend::eui64(cfg.mac);
    Caps {
        fw_ver: (1u64 << 32) | (2 << 16) | 3,
        node_guid: guid.to_be(),
        sys_image_guid: guid.to_be(),
        max_mr_size: cfg.max_mr_size,
        page_size_cap: PAGE_SIZE,
        vendor_id: u32::from(crate::pci::VENDOR_ID),
        vendor_part_id: u32::from(crate::pci::DEVICE_ID),
        hw_ver: 1,
        max_qp: cfg.max_qp,
        max_qp_wr: cfg.max_qp_wr,
        device_cap_flags: 0,
        max_sge: cfg.max_sge,
        max_sge_rd: cfg.max_sge,
        max_cq: cfg.max_cq,
        max_cqe: cfg.max_cqe,
        max_mr: cfg.max_mr,
        max_pd: cfg.max_pd,
        max_qp_rd_atom: cfg.max_qp_rd_atom,
        max_res_rd_atom: cfg.max_qp_rd_atom.saturating_mul(cfg.max_qp),
        max_qp_init_rd_atom: cfg.max_qp_rd_atom,
        max_ah: cfg.max_ah,
        max_srq: cfg.max_srq,
        max_srq_wr: cfg.max_srq_wr,
        max_srq_sge: cfg.max_srq_sge,
        max_uar: cfg.max_uar,
        gid_tbl_len: cfg.gid_tbl_len,
        max_pkeys: 1,
        local_ca_ack_delay: 15,
        phys_port_cnt: 1,
        mode: 0,
        atomic_ops: if cfg.atomics { 0x3 } else { 0 },
        bmme_flags: if cfg.fast_reg_pages > 0 {
            crate::abi::bmme::ALL
        } else {
            0
        },
        // Exactly one type: 0x1 RoCE v1 (every driver version), 0x2 RoCE v2 (18 and later).
        gid_types: 1 << (cfg.roce_version.clamp(1, 2) - 1),
        max_fast_reg_page_list_len: cfg.fast_reg_pages,
        ..Caps::default()
    }
}

/// A device-produced DSR ring (async events or CQ notifications) with the driver's quirky
/// index formulas and an outstanding-entry cap, since overrun is undetectable by the driver.
#[derive(Debug)]
pub struct EventRing {
    pdir: PageDir,
    ring: ProducerRing,
    elem_size: u64,
    cap: u32,
    /// Entries dropped because the guest did not consume.
    pub dropped: u64,
}

impl EventRing {
    fn load<M: GuestMemory>(
        mem: &M,
        name: &'static str,
        num_pages: u32,
        pdir_dma: u64,
        elem_size: u32,
        cap: u32,
    ) -> Result<Self> {
        if !(2..=MAX_DSR_RING_PAGES).contains(&num_pages) {
            return Err(DsrError::BadRingPages(name, num_pages));
        }
        let pdir =
            PageDir::load(mem, pdir_dma, num_pages).map_err(|e| DsrError::RingPdir(name, e))?;
        let n = ring::dsr_ring_elems(num_pages, elem_size).map_err(|e| DsrError::Ring(name, e))?;
        let state = pdir
            .page(0)
            .ok_or(DsrError::BadRingPages(name, num_pages))?;
        // The device produces into the rx half of the ring state (@8).
        let ring = ProducerRing::new_quirk(RingAddr {
            addr: state.unchecked_add(crate::abi::ring_state::RX),
            n,
        })
        .map_err(|e| DsrError::Ring(name, e))?;
        Ok(EventRing {
            pdir,
            ring,
            elem_size: u64::from(elem_size),
            cap: cap.min(n),
            dropped: 0,
        })
    }

    /// Writes one element and publishes it; `Ok(false)` when the ring is full (dropped).
    fn push<M: GuestMemory>(&mut self, mem: &M, bytes: &[u8]) -> Result<bool> {
        let outstanding = self
            .ring
            .outstanding(mem)
            .map_err(|e| DsrError::Ring("event", e))?;
        if outstanding >= self.cap {
            self.dropped += 1;
            return Ok(false);
        }
        let Some(slot) = self
            .ring
            .free_slot(mem)
            .map_err(|e| DsrError::Ring("event", e))?
        else {
            self.dropped += 1;
            return Ok(false);
        };
        let off = PAGE_SIZE + u64::from(slot) * self.elem_size;
        self.pdir
            .write_at(mem, off, bytes)
            .map_err(|e| DsrError::RingPdir("event", e))?;
        self.ring
            .produce(mem)
            .map_err(|e| DsrError::Ring("event", e))?;
        Ok(true)
    }
}

/// The loaded DSR: slots and rings.
#[derive(Debug)]
pub struct LoadedDsr {
    /// Where the DSR lives.
    pub addr: GuestAddress,
    /// The driver's ABI version.
    pub driver_version: u32,
    /// Command slot.
    pub cmd_slot: GuestAddress,
    /// Response slot.
    pub resp_slot: GuestAddress,
    /// Async event ring.
    pub async_ring: EventRing,
    /// CQ notification ring.
    pub cq_ring: EventRing,
    /// UAR PFN the driver uses for its own doorbells.
    pub uar_pfn: u64,
}

impl LoadedDsr {
    /// Posts an async event (`ib_event_type` numbering, handle or port in `info`).
    pub fn post_event<M: GuestMemory>(
        &mut self,
        mem: &M,
        event_type: u32,
        info: u32,
    ) -> Result<bool> {
        let e = Eqe { event_type, info };
        self.async_ring
            .push(mem, vm_memory::ByteValued::as_slice(&e))
    }

    /// Posts a CQ notification for `cq_handle`.
    pub fn post_cqne<M: GuestMemory>(&mut self, mem: &M, cq_handle: u32) -> Result<bool> {
        let e = Cqne { info: cq_handle };
        self.cq_ring.push(mem, vm_memory::ByteValued::as_slice(&e))
    }
}

fn check_slot<M: GuestMemory>(mem: &M, name: &'static str, addr: u64) -> Result<GuestAddress> {
    let a = GuestAddress(addr);
    let ok = addr != 0
        && addr % PAGE_SIZE == 0
        && mem.check_range(a, PAGE_SIZE as usize, Permissions::ReadWrite);
    if ok {
        Ok(a)
    } else {
        Err(DsrError::BadSlot(name, addr))
    }
}

/// Writes the caps into the DSR at `addr` (synchronously, on the DSRHIGH write), then reads and
/// validates the rest of it. The caps are written even when the rest is invalid, so the driver's
/// check passes and ACTIVATE is where it learns that the device cannot run (ERR ≠ 0).
pub fn load<M: GuestMemory>(mem: &M, addr: u64, cfg: &DeviceConfig) -> Result<LoadedDsr> {
    let base = GuestAddress(addr);
    let dsr: Dsr = mem.read_obj(base).map_err(|_| DsrError::BadAddress(addr))?;
    mem.write_obj(caps(cfg), base.unchecked_add(DSR_CAPS_OFFSET))
        .map_err(|_| DsrError::BadAddress(addr))?;
    let cmd_slot = check_slot(mem, "command", dsr.cmd_slot_dma)?;
    let resp_slot = check_slot(mem, "response", dsr.resp_slot_dma)?;
    let async_ring = EventRing::load(
        mem,
        "async event",
        dsr.async_ring_pages.num_pages,
        dsr.async_ring_pages.pdir_dma,
        std::mem::size_of::<Eqe>() as u32,
        MAX_OUTSTANDING_EQES,
    )?;
    let cq_ring = EventRing::load(
        mem,
        "CQ notification",
        dsr.cq_ring_pages.num_pages,
        dsr.cq_ring_pages.pdir_dma,
        std::mem::size_of::<Cqne>() as u32,
        MAX_OUTSTANDING_CQNES,
    )?;
    let uar_pfn = if cfg.version >= 19 {
        dsr.uar_pfn64
    } else {
        dsr.uar_pfn64 & 0xffff_ffff
    };
    Ok(LoadedDsr {
        addr: base,
        driver_version: dsr.driver_version,
        cmd_slot,
        resp_slot,
        async_ring,
        cq_ring,
        uar_pfn,
    })
}
