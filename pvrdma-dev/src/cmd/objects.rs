//! Port, user-context, PD, MR, CQ and GID-table commands.

use rdma_backend::{Access, Gid, GidType, MrKind};
use vm_memory::GuestAddressSpace;

use super::{main_loop_only, resp, CmdError, Finish, Work};
use crate::abi::*;
use crate::budget;
use crate::datapath::cq::CqRing;
use crate::datapath::Env;
use crate::device::{Core, Cq, Mr, Pd, Uc};
use crate::pdir::{PageDir, MAX_PAGES, PAGE_SIZE};

/// MR flags in CREATE_MR.
const MR_FLAG_DMA: u32 = 1;
const MR_FLAG_FRMR: u32 = 2;

/// Extra pages a user CQ buffer may carry beyond what its entries need: the provider rounds its
/// buffer to whole pages; anything larger is refused so a guest cannot make the device walk a
/// page directory far larger than the ring.
const CQ_SLACK_PAGES: u64 = 2;

fn hdr() -> RespHdr {
    RespHdr::default()
}

pub(super) fn query_port(core: &mut Core, req: CmdQueryPort) -> Result<Work, CmdError> {
    // Port 0 is not a port (qemu-reference.md hazard 11).
    if req.port_num != 1 {
        return Err(CmdError::Invalid("port number"));
    }
    let gid_tbl_len = core.cfg.gid_tbl_len;
    main_loop_only(move |core| {
        let attrs = PortAttr {
            state: if core.active {
                port_state::ACTIVE
            } else {
                port_state::DOWN
            },
            max_mtu: 5,
            active_mtu: 3,
            gid_tbl_len,
            port_cap_flags: 0,
            max_msg_sz: 1 << 31,
            pkey_tbl_len: 1,
            max_vl_num: 1,
            active_width: 2,
            active_speed: 32,
            phys_state: if core.active {
                port_state::PHYS_LINK_UP
            } else {
                port_state::PHYS_DISABLED
            },
            ..PortAttr::default()
        };
        Ok(resp(&RespQueryPort { hdr: hdr(), attrs }))
    })
}

pub(super) fn query_pkey(_core: &mut Core, req: CmdQueryPkey) -> Result<Work, CmdError> {
    // One P_Key (index 0); QEMU's off-by-one accepted index 1 (hazard 11).
    if req.port_num != 1 || req.index != 0 {
        return Err(CmdError::Invalid("port or pkey index"));
    }
    main_loop_only(|_| {
        Ok(resp(&RespQueryPkey {
            hdr: hdr(),
            pkey: 0xffff,
            reserved: [0; 6],
        }))
    })
}

pub(super) fn create_uc(core: &mut Core, req: CmdCreateUc) -> Result<Work, CmdError> {
    let pfn = if core.cfg.version >= 19 {
        req.pfn64
    } else {
        req.pfn64 & 0xffff_ffff
    };
    // The DSR's UAR PFN is BAR2's first page (the kernel's); contexts get the pages after it.
    let base = core
        .dsr
        .as_ref()
        .map(|d| d.uar_pfn)
        .ok_or(CmdError::Reset)?;
    let index = pfn
        .checked_sub(base)
        .filter(|i| (1..u64::from(core.cfg.max_uar)).contains(i))
        .ok_or(CmdError::Invalid("UAR pfn"))? as u32;
    if core.uar_owner.contains_key(&index) {
        return Err(CmdError::Busy("UAR page"));
    }
    main_loop_only(move |core| {
        let ctx = core
            .ucs
            .insert(Uc { uar_index: index })
            .ok_or(CmdError::Exhausted("user contexts"))?;
        core.uar_owner.insert(index, ctx);
        Ok(resp(&RespCreateUc {
            hdr: hdr(),
            ctx_handle: ctx,
            reserved: 0,
        }))
    })
}

pub(super) fn destroy_uc(core: &mut Core, req: CmdDestroyUc) -> Result<Work, CmdError> {
    let ctx = req.ctx_handle;
    if core.ucs.get(ctx).is_none() {
        return Err(CmdError::NoSuch("user context"));
    }
    if core.pds.iter().any(|(_, p)| p.ctx == ctx) || core.cqs.iter().any(|(_, c)| c.ctx == ctx) {
        return Err(CmdError::Busy("user context"));
    }
    main_loop_only(move |core| {
        if let Some(uc) = core.ucs.remove(ctx) {
            core.uar_owner.remove(&uc.uar_index);
        }
        Ok(resp(&hdr()))
    })
}

fn check_ctx(core: &Core, ctx: u32) -> Result<(), CmdError> {
    if ctx == 0 || core.ucs.get(ctx).is_some() {
        Ok(())
    } else {
        Err(CmdError::NoSuch("user context"))
    }
}

pub(super) fn create_pd(core: &mut Core, req: CmdCreatePd) -> Result<Work, CmdError> {
    check_ctx(core, req.ctx_handle)?;
    if core.pds.is_full() {
        return Err(CmdError::Exhausted("PDs"));
    }
    let ctx = req.ctx_handle;
    let cost = budget::pd(&*core.env.backend);
    core.host_mem.check(cost, core.cfg.max_host_mem)?;
    Ok(Box::new(move |env: &Env| {
        let backend = env.backend.create_pd()?;
        let b = env.backend.clone();
        Ok(Box::new(move |core: &mut Core| {
            if let Err(e) = core.host_mem.check(cost, core.cfg.max_host_mem) {
                let _ = b.destroy_pd(backend);
                return Err(e.into());
            }
            let Some(h) = core.pds.insert(Pd {
                ctx,
                backend,
                refs: 0,
                cost,
            }) else {
                let _ = b.destroy_pd(backend);
                return Err(CmdError::Exhausted("PDs"));
            };
            core.host_mem.reserve(cost);
            Ok(resp(&RespCreatePd {
                hdr: hdr(),
                pd_handle: h,
                reserved: 0,
            }))
        }) as Finish)
    }))
}

pub(super) fn destroy_pd(core: &mut Core, req: CmdDestroyPd) -> Result<Work, CmdError> {
    let h = req.pd_handle;
    let pd = core.pds.get(h).ok_or(CmdError::NoSuch("PD"))?;
    // A real HCA refuses to free a PD that MRs, QPs or SRQs still use (hazard 8).
    if pd.refs != 0 {
        return Err(CmdError::Busy("PD"));
    }
    let b = pd.backend;
    Ok(Box::new(move |env: &Env| {
        env.backend.destroy_pd(b)?;
        Ok(Box::new(move |core: &mut Core| {
            if let Some(pd) = core.pds.remove(h) {
                core.host_mem.release(pd.cost);
            }
            Ok(resp(&hdr()))
        }) as Finish)
    }))
}

pub(super) fn create_mr(core: &mut Core, req: CmdCreateMr) -> Result<Work, CmdError> {
    let pd_h = req.pd_handle;
    let pd = core.pds.get(pd_h).ok_or(CmdError::NoSuch("PD"))?.backend;
    if core.mrs.is_full() {
        return Err(CmdError::Exhausted("MRs"));
    }
    let access = Access::from_bits_truncate(req.access_flags);
    let max_mr_size = core.cfg.max_mr_size;
    enum Plan {
        Dma,
        User { npages: u32 },
    }
    let plan = match req.flags {
        MR_FLAG_DMA => {
            // The DMA MR reaches all guest memory: local access only, never remote.
            if access.intersects(Access::REMOTE_READ | Access::REMOTE_WRITE | Access::REMOTE_ATOMIC)
            {
                return Err(CmdError::Invalid("DMA MR with remote access"));
            }
            Plan::Dma
        }
        MR_FLAG_FRMR => return Err(CmdError::Unsupported(4)),
        0 => {
            if req.length == 0 || req.length > max_mr_size {
                return Err(CmdError::Invalid("MR length"));
            }
            // CVE-2021-3582 and hazard 6: nchunks must cover exactly the MR's pages, computed
            // in 64 bits.
            let first = req.start & !(PAGE_SIZE - 1);
            let end = req
                .start
                .checked_add(req.length)
                .ok_or(CmdError::Invalid("MR range wraps"))?;
            let need = end.div_ceil(PAGE_SIZE) - first / PAGE_SIZE;
            if u64::from(req.nchunks) != need || req.nchunks > MAX_PAGES {
                return Err(CmdError::Invalid("MR nchunks"));
            }
            if core.mr_pages + need > core.cfg.max_mr_pages {
                return Err(CmdError::Exhausted("MR page-list budget"));
            }
            Plan::User {
                npages: req.nchunks,
            }
        }
        _ => return Err(CmdError::Invalid("MR flags")),
    };
    let (start, length, pdir_dma) = (req.start, req.length, req.pdir_dma);
    let pages = match plan {
        Plan::Dma => 0,
        Plan::User { npages } => u64::from(npages),
    };
    let cost = budget::mr(pages);
    core.host_mem.check(cost, core.cfg.max_host_mem)?;
    Ok(Box::new(move |env: &Env| {
        let kind = match plan {
            Plan::Dma => MrKind::Dma,
            Plan::User { npages } => {
                let mem = env.mem.memory();
                let pdir = PageDir::load(&*mem, pdir_dma, npages)?;
                MrKind::User {
                    iova: start,
                    length,
                    pages: pdir.pages().clone(),
                }
            }
        };
        let keys = env.backend.create_mr(pd, kind, access)?;
        let b = env.backend.clone();
        Ok(Box::new(move |core: &mut Core| {
            if core.mr_pages + pages > core.cfg.max_mr_pages {
                let _ = b.destroy_mr(keys.id);
                return Err(CmdError::Exhausted("MR page-list budget"));
            }
            if let Err(e) = core.host_mem.check(cost, core.cfg.max_host_mem) {
                let _ = b.destroy_mr(keys.id);
                return Err(e.into());
            }
            let Some(h) = core.mrs.insert(Mr {
                pd: pd_h,
                backend: keys.id,
                pages,
                cost,
            }) else {
                let _ = b.destroy_mr(keys.id);
                return Err(CmdError::Exhausted("MRs"));
            };
            core.mr_pages += pages;
            core.host_mem.reserve(cost);
            if let Some(p) = core.pds.get_mut(pd_h) {
                p.refs += 1;
            }
            Ok(resp(&RespCreateMr {
                hdr: hdr(),
                mr_handle: h,
                lkey: keys.lkey,
                rkey: keys.rkey,
                reserved: 0,
            }))
        }) as Finish)
    }))
}

pub(super) fn destroy_mr(core: &mut Core, req: CmdDestroyMr) -> Result<Work, CmdError> {
    let h = req.mr_handle;
    let b = core.mrs.get(h).ok_or(CmdError::NoSuch("MR"))?.backend;
    Ok(Box::new(move |env: &Env| {
        env.backend.destroy_mr(b)?;
        Ok(Box::new(move |core: &mut Core| {
            if let Some(mr) = core.mrs.remove(h) {
                core.mr_pages = core.mr_pages.saturating_sub(mr.pages);
                core.host_mem.release(mr.cost);
                if let Some(p) = core.pds.get_mut(mr.pd) {
                    p.refs = p.refs.saturating_sub(1);
                }
            }
            Ok(resp(&hdr()))
        }) as Finish)
    }))
}

/// Pages a CQ of `cqe` entries needs, header page included.
fn cq_pages(cqe: u32) -> u64 {
    1 + (u64::from(cqe) * u64::from(CQE_SIZE)).div_ceil(PAGE_SIZE)
}

pub(super) fn create_cq(core: &mut Core, req: CmdCreateCq) -> Result<Work, CmdError> {
    check_ctx(core, req.ctx_handle)?;
    let cqe = req.cqe;
    // Hazard 2: a power of two the ring masks work with, and no more than the pages hold.
    if cqe == 0 || !cqe.is_power_of_two() || cqe > core.cfg.max_cqe {
        return Err(CmdError::Invalid("CQ size"));
    }
    let need = cq_pages(cqe);
    let n = u64::from(req.nchunks);
    if n < need || n > need + CQ_SLACK_PAGES {
        return Err(CmdError::Invalid("CQ nchunks"));
    }
    if core.cqs.is_full() {
        return Err(CmdError::Exhausted("CQs"));
    }
    let cost = budget::cq(n);
    core.host_mem.check(cost, core.cfg.max_host_mem)?;
    let (ctx, pdir_dma, nchunks) = (req.ctx_handle, req.pdir_dma, req.nchunks);
    Ok(Box::new(move |env: &Env| {
        let pdir = {
            let mem = env.mem.memory();
            PageDir::load(&*mem, pdir_dma, nchunks)?
        };
        let ring = CqRing::new(pdir, cqe).ok_or(CmdError::Invalid("CQ ring"))?;
        let backend = env.backend.create_cq(cqe, 0)?;
        let b = env.backend.clone();
        Ok(Box::new(move |core: &mut Core| {
            if let Err(e) = core.host_mem.check(cost, core.cfg.max_host_mem) {
                let _ = b.destroy_cq(backend);
                return Err(e.into());
            }
            let Some(h) = core.cqs.insert(Cq {
                ctx,
                backend,
                ring,
                cqe,
                refs: 0,
                cost,
            }) else {
                let _ = b.destroy_cq(backend);
                return Err(CmdError::Exhausted("CQs"));
            };
            core.host_mem.reserve(cost);
            Ok(resp(&RespCreateCq {
                hdr: hdr(),
                cq_handle: h,
                cqe,
            }))
        }) as Finish)
    }))
}

pub(super) fn resize_cq(core: &mut Core, req: CmdResizeCq) -> Result<Work, CmdError> {
    let h = req.cq_handle;
    let cqe = req.cqe;
    let cq = core.cqs.get(h).ok_or(CmdError::NoSuch("CQ"))?;
    if cqe == 0 || !cqe.is_power_of_two() || cqe > core.cfg.max_cqe {
        return Err(CmdError::Invalid("CQ size"));
    }
    // RESIZE_CQ carries no new pages: the new size must fit the CQ's own pages, and the ring must
    // be empty since the index arithmetic changes with N.
    if cq_pages(cqe) > cq.ring.pages() as u64 {
        return Err(CmdError::Invalid("CQ size exceeds its pages"));
    }
    main_loop_only(move |core| {
        let mem = core.mem.memory();
        let cq = core.cqs.get_mut(h).ok_or(CmdError::NoSuch("CQ"))?;
        let ring = cq
            .ring
            .resized(&*mem, cqe)
            .ok_or(CmdError::Busy("CQ with unpolled entries"))?;
        cq.ring = ring;
        cq.cqe = cqe;
        Ok(resp(&RespResizeCq {
            hdr: hdr(),
            cqe,
            reserved: 0,
        }))
    })
}

pub(super) fn destroy_cq(core: &mut Core, req: CmdDestroyCq) -> Result<Work, CmdError> {
    let h = req.cq_handle;
    let cq = core.cqs.get(h).ok_or(CmdError::NoSuch("CQ"))?;
    // Hazard 8: QEMU freed CQs that QPs still completed into.
    if cq.refs != 0 {
        return Err(CmdError::Busy("CQ"));
    }
    let b = cq.backend;
    Ok(Box::new(move |env: &Env| {
        env.backend.destroy_cq(b)?;
        Ok(Box::new(move |core: &mut Core| {
            if let Some(cq) = core.cqs.remove(h) {
                core.host_mem.release(cq.cost);
            }
            Ok(resp(&hdr()))
        }) as Finish)
    }))
}

pub(super) fn create_bind(core: &mut Core, req: CmdCreateBind) -> Result<Work, CmdError> {
    let index = req.index;
    if index >= core.cfg.gid_tbl_len {
        return Err(CmdError::Invalid("GID index"));
    }
    let ty = match req.gid_type {
        1 => GidType::RoceV1,
        2 => GidType::RoceV2,
        _ => return Err(CmdError::Invalid("GID type")),
    };
    let (gid, gid_type) = (req.new_gid, req.gid_type);
    Ok(Box::new(move |env: &Env| {
        env.backend.add_gid(index, Gid(gid), ty)?;
        Ok(Box::new(move |core: &mut Core| {
            if let Some(slot) = core.gids.get_mut(index as usize) {
                *slot = Some((gid, gid_type));
            }
            Ok(resp(&hdr()))
        }) as Finish)
    }))
}

pub(super) fn destroy_bind(core: &mut Core, req: CmdDestroyBind) -> Result<Work, CmdError> {
    let index = req.index;
    if core.gids.get(index as usize).is_none_or(|g| g.is_none()) {
        return Err(CmdError::NoSuch("GID entry"));
    }
    Ok(Box::new(move |env: &Env| {
        env.backend.del_gid(index)?;
        Ok(Box::new(move |core: &mut Core| {
            if let Some(slot) = core.gids.get_mut(index as usize) {
                *slot = None;
            }
            Ok(resp(&hdr()))
        }) as Finish)
    }))
}
