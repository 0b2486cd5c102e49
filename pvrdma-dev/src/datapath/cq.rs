//! CQ rings as the device produces into them (spec §5, §8, §9): CQEs, arming and notification.

use rdma_backend::{NetworkHeader, WcOpcode, WcStatus, WorkCompletion};
use vm_memory::{Address, Bytes, GuestMemory};

use crate::abi::{network_hdr, wc_flags, Cqe, CQE_SIZE};
use crate::pdir::{PageDir, PAGE_SIZE};
use crate::ring::{ProducerRing, RingAddr};

/// How a CQ is armed. Arming is one-shot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arm {
    /// Not armed.
    Off,
    /// ARM: notify on the next completion of any kind.
    Any,
    /// ARM_SOL: notify on the next solicited or error completion.
    Solicited,
}

/// Result of writing a CQE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Written and published; `notify` says a CQ notification is due.
    Written { notify: bool },
    /// The CQ just became full: the CQE is lost and the guest must be told (CQ_ERR), once.
    Overflow,
    /// The CQ overflowed earlier; the CQE is lost.
    Dropped,
    /// The guest's indices or pages are unusable.
    Broken,
}

/// The device's side of a CQ ring.
#[derive(Debug)]
pub(crate) struct CqRing {
    pdir: PageDir,
    ring: ProducerRing,
    pub arm: Arm,
    /// A CQ_ERR was already reported; no more CQEs are written to this CQ.
    pub overflowed: bool,
    /// The guest's `cons_head` as last read (see [`ProducerRing::free_slot_seen`]).
    head_seen: Option<u32>,
    /// CQEs written that `prod_tail` does not show yet ([`CqRing::publish`]).
    unpublished: bool,
}

impl CqRing {
    /// The ring state is the rx half of page 0 (@8); CQE `i` is at `4096 + 64·i`.
    pub(crate) fn new(pdir: PageDir, cqe: u32) -> Option<CqRing> {
        let state = pdir.page(0)?;
        let ring = ProducerRing::new(RingAddr {
            addr: state.unchecked_add(crate::abi::ring_state::RX),
            n: cqe,
        })
        .ok()?;
        Some(CqRing {
            pdir,
            ring,
            arm: Arm::Off,
            overflowed: false,
            head_seen: None,
            unpublished: false,
        })
    }

    /// Pages of the CQ, header included.
    pub(crate) fn pages(&self) -> usize {
        self.pdir.len()
    }

    /// The same pages as a ring of `n` entries (RESIZE_CQ); `None` while CQEs are unpolled.
    pub(crate) fn resized<M: GuestMemory + ?Sized>(&self, mem: &M, n: u32) -> Option<CqRing> {
        if self.ring.outstanding(mem).ok()? != 0 {
            return None;
        }
        // Both indices restart at 0 for the new size.
        let st = self.ring.ring().addr;
        mem.write_slice(&[0u8; 8], st).ok()?;
        CqRing::new(self.pdir.clone(), n)
    }

    /// Writes one CQE. The guest sees it at the next [`CqRing::publish`], which the caller
    /// must do before it notifies or answers anything about this CQ: the main loop writes a
    /// run of CQEs, then stores each CQ's `prod_tail` once.
    pub(crate) fn push<M: GuestMemory>(
        &mut self,
        mem: &M,
        cqe: &Cqe,
        solicited_or_error: bool,
    ) -> Pushed {
        if self.overflowed {
            return Pushed::Dropped;
        }
        let slot = match self.ring.free_slot_seen(mem, &mut self.head_seen) {
            Ok(Some(s)) => s,
            Ok(None) => {
                self.overflowed = true;
                return Pushed::Overflow;
            }
            Err(_) => return Pushed::Broken,
        };
        let off = PAGE_SIZE + u64::from(slot) * u64::from(CQE_SIZE);
        if self.pdir.write_obj(mem, off, cqe).is_err() {
            return Pushed::Broken;
        }
        self.ring.produce_unpublished();
        self.unpublished = true;
        let notify = match self.arm {
            Arm::Off => false,
            Arm::Any => true,
            Arm::Solicited => solicited_or_error,
        };
        if notify {
            self.arm = Arm::Off;
        }
        Pushed::Written { notify }
    }

    /// Makes the CQEs written since the last call visible: one `Release` store of `prod_tail`
    /// (after the CQEs themselves). `false` when the guest's ring state cannot be written.
    pub(crate) fn publish<M: GuestMemory>(&mut self, mem: &M) -> bool {
        if !std::mem::take(&mut self.unpublished) {
            return true;
        }
        self.ring.publish_tail(mem).is_ok()
    }
}

/// The CQE for a backend completion. `kernel` CQs (ctx 0) get the kernel-only flags.
pub(crate) fn make_cqe(wc: &WorkCompletion, qp_handle: u32, kernel: bool) -> Cqe {
    let mut flags = 0;
    let mut network_hdr_type = 0;
    if let Some(h) = wc.grh {
        flags |= wc_flags::GRH;
        if kernel {
            flags |= wc_flags::WITH_NETWORK_HDR_TYPE;
            network_hdr_type = match h {
                NetworkHeader::Grh => network_hdr::ROCE_V1,
                NetworkHeader::Ipv4 => network_hdr::IPV4,
                NetworkHeader::Ipv6 => network_hdr::IPV6,
            };
        }
    }
    if wc.imm_data.is_some() {
        flags |= wc_flags::WITH_IMM;
    }
    // The invalidated key goes where the kernel reads `ex.invalidate_rkey` (the same 4 bytes
    // as the immediate). User space reads the flag bit as IP_CSUM_OK: not there.
    if wc.invalidated.is_some() && kernel {
        flags |= wc_flags::WITH_INVALIDATE;
    }
    Cqe {
        wr_id: wc.wr_id,
        qp: u64::from(qp_handle),
        opcode: wc.opcode as u32,
        status: wc.status as u32,
        byte_len: wc.byte_len,
        imm_data: wc.imm_data.or(wc.invalidated).unwrap_or(0),
        src_qp: wc.src_qp,
        wc_flags: flags,
        port_num: if kernel { 1 } else { 0 },
        network_hdr_type,
        ..Cqe::default()
    }
}

/// Whether a completion wakes an ARM_SOL-armed CQ.
pub(crate) fn solicited_or_error(wc: &WorkCompletion) -> bool {
    wc.status != WcStatus::Success
        || (wc.solicited && matches!(wc.opcode, WcOpcode::Recv | WcOpcode::RecvRdmaWithImm))
}
