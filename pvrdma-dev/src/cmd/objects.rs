//! Port, user-context, PD, MR, CQ and GID-table commands.

use rdma_backend::{Access, Gid, GidType, MrKind};
use vm_memory::GuestAddressSpace;

use super::{main_loop_only, resp, CmdError, Ctx, Finish, Work};
use crate::abi::*;
use crate::budget;
use crate::datapath::cq::CqRing;
use crate::datapath::Env;
use crate::objects::{Cq, Mr, Pd};
use crate::pdir::{PageDir, MAX_PAGES, PAGE_SIZE};

/// MR flags in CREATE_MR.
pub(super) const MR_FLAG_DMA: u32 = 1;
const MR_FLAG_FRMR: u32 = 2;

/// Extra pages a user CQ buffer may carry beyond what its entries need: the provider rounds its
/// buffer to whole pages; anything larger is refused so a guest cannot make the device walk a
/// page directory far larger than the ring.
pub(super) const CQ_SLACK_PAGES: u64 = 2;

fn hdr() -> RespHdr {
    RespHdr::default()
}

pub(super) fn query_port(dev: &mut Ctx<'_>, req: CmdQueryPort) -> Result<Work, CmdError> {
    // Port 0 is not a port (qemu-reference.md hazard 11).
    if req.port_num != 1 {
        return Err(CmdError::Invalid("port number"));
    }
    let gid_tbl_len = dev.cfg.gid_tbl_len;
    main_loop_only(move |dev| {
        let attrs = PortAttr {
            state: if dev.active {
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
            phys_state: if dev.active {
                port_state::PHYS_LINK_UP
            } else {
                port_state::PHYS_DISABLED
            },
            ..PortAttr::default()
        };
        Ok(resp(&RespQueryPort { hdr: hdr(), attrs }))
    })
}

pub(super) fn query_pkey(_dev: &mut Ctx<'_>, req: CmdQueryPkey) -> Result<Work, CmdError> {
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

pub(super) fn create_uc(dev: &mut Ctx<'_>, req: CmdCreateUc) -> Result<Work, CmdError> {
    let pfn = if dev.cfg.version >= 19 {
        req.pfn64
    } else {
        req.pfn64 & 0xffff_ffff
    };
    // The DSR's UAR PFN is BAR2's first page (the kernel's); contexts get the pages after it.
    let base = dev.uar_pfn.ok_or(CmdError::Reset)?;
    let index = pfn
        .checked_sub(base)
        .filter(|i| (1..u64::from(dev.cfg.max_uar)).contains(i))
        .ok_or(CmdError::Invalid("UAR pfn"))? as u32;
    if dev.objects.uar_owner.contains_key(&index) {
        return Err(CmdError::Busy("UAR page"));
    }
    main_loop_only(move |dev| {
        let ctx = dev.objects.add_uc(index)?;
        Ok(resp(&RespCreateUc {
            hdr: hdr(),
            ctx_handle: ctx,
            reserved: 0,
        }))
    })
}

pub(super) fn destroy_uc(dev: &mut Ctx<'_>, req: CmdDestroyUc) -> Result<Work, CmdError> {
    let ctx = req.ctx_handle;
    if dev.objects.ucs.get(ctx).is_none() {
        return Err(CmdError::NoSuch("user context"));
    }
    if dev.objects.pds.iter().any(|(_, p)| p.ctx == ctx)
        || dev.objects.cqs.iter().any(|(_, c)| c.ctx == ctx)
    {
        return Err(CmdError::Busy("user context"));
    }
    main_loop_only(move |dev| {
        dev.objects.remove_uc(ctx);
        Ok(resp(&hdr()))
    })
}

fn check_ctx(dev: &Ctx<'_>, ctx: u32) -> Result<(), CmdError> {
    if ctx == 0 || dev.objects.ucs.get(ctx).is_some() {
        Ok(())
    } else {
        Err(CmdError::NoSuch("user context"))
    }
}

pub(super) fn create_pd(dev: &mut Ctx<'_>, req: CmdCreatePd) -> Result<Work, CmdError> {
    check_ctx(dev, req.ctx_handle)?;
    if dev.objects.pds.is_full() {
        return Err(CmdError::Exhausted("PDs"));
    }
    let ctx = req.ctx_handle;
    let cost = budget::pd(&*dev.env.backend);
    dev.objects.room(cost)?;
    Ok(Box::new(move |env: &Env| {
        let backend = env.backend.create_pd()?;
        let b = env.backend.clone();
        Ok(Box::new(move |dev: &mut Ctx<'_>| {
            let pd = Pd {
                ctx,
                backend,
                refs: 0,
                cost,
            };
            let h = dev.objects.add_pd(pd).inspect_err(|_| {
                let _ = b.destroy_pd(backend);
            })?;
            Ok(resp(&RespCreatePd {
                hdr: hdr(),
                pd_handle: h,
                reserved: 0,
            }))
        }) as Finish)
    }))
}

pub(super) fn destroy_pd(dev: &mut Ctx<'_>, req: CmdDestroyPd) -> Result<Work, CmdError> {
    let h = req.pd_handle;
    let pd = dev.objects.pds.get(h).ok_or(CmdError::NoSuch("PD"))?;
    // A real HCA refuses to free a PD that MRs, QPs or SRQs still use (hazard 8).
    if pd.refs != 0 {
        return Err(CmdError::Busy("PD"));
    }
    let b = pd.backend;
    Ok(Box::new(move |env: &Env| {
        env.backend.destroy_pd(b)?;
        Ok(Box::new(move |dev: &mut Ctx<'_>| {
            dev.objects.remove_pd(h);
            Ok(resp(&hdr()))
        }) as Finish)
    }))
}

pub(super) fn create_mr(dev: &mut Ctx<'_>, req: CmdCreateMr) -> Result<Work, CmdError> {
    let pd_h = req.pd_handle;
    let pd = dev
        .objects
        .pds
        .get(pd_h)
        .ok_or(CmdError::NoSuch("PD"))?
        .backend;
    if dev.objects.mrs.is_full() {
        return Err(CmdError::Exhausted("MRs"));
    }
    let access = Access::from_bits_truncate(req.access_flags);
    let max_mr_size = dev.cfg.max_mr_size;
    enum Plan {
        Dma,
        User { npages: u32 },
        Frmr { max_pages: u32 },
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
        // The guest kernel's `ib_alloc_mr`: no pages yet, room for `nchunks` (its max_num_sg),
        // mapped later by FAST_REG_MR WQEs. `start`, `length` and `pdir_dma` mean nothing.
        MR_FLAG_FRMR => {
            if dev.cfg.fast_reg_pages == 0 {
                return Err(CmdError::Unsupported(cmd::CREATE_MR));
            }
            if dev.objects.pd_ctx(pd_h) != Some(0) {
                return Err(CmdError::Invalid("fast-register MR outside the kernel"));
            }
            if req.nchunks == 0 || req.nchunks > dev.cfg.fast_reg_pages {
                return Err(CmdError::Invalid("fast-register MR size"));
            }
            dev.objects.room_for_mr_pages(req.nchunks.into())?;
            Plan::Frmr {
                max_pages: req.nchunks,
            }
        }
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
            dev.objects.room_for_mr_pages(need)?;
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
        Plan::Frmr { max_pages } => u64::from(max_pages),
    };
    let cost = budget::mr(pages);
    dev.objects.room(cost)?;
    let (kind_name, iova, len) = match plan {
        Plan::Dma => ("DMA", 0, 0),
        Plan::User { .. } => ("USER", start, length),
        Plan::Frmr { .. } => ("FAST_REG", 0, 0),
    };
    let access_flags = req.access_flags;
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
            Plan::Frmr { max_pages } => MrKind::Frmr { max_pages },
        };
        let keys = env.backend.create_mr(pd, kind, access)?;
        let b = env.backend.clone();
        Ok(Box::new(move |dev: &mut Ctx<'_>| {
            let mr = Mr {
                pd: pd_h,
                backend: keys.id,
                lkey: keys.lkey,
                rkey: keys.rkey,
                iova,
                length: len,
                access: access_flags,
                kind: kind_name,
                pages,
                cost,
            };
            let h = dev.objects.add_mr(mr).inspect_err(|_| {
                let _ = b.destroy_mr(keys.id);
            })?;
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

pub(super) fn destroy_mr(dev: &mut Ctx<'_>, req: CmdDestroyMr) -> Result<Work, CmdError> {
    let h = req.mr_handle;
    let b = dev
        .objects
        .mrs
        .get(h)
        .ok_or(CmdError::NoSuch("MR"))?
        .backend;
    Ok(Box::new(move |env: &Env| {
        env.backend.destroy_mr(b)?;
        Ok(Box::new(move |dev: &mut Ctx<'_>| {
            dev.objects.remove_mr(h);
            Ok(resp(&hdr()))
        }) as Finish)
    }))
}

/// Pages a CQ of `cqe` entries needs, header page included.
fn cq_pages(cqe: u32) -> u64 {
    1 + (u64::from(cqe) * u64::from(CQE_SIZE)).div_ceil(PAGE_SIZE)
}

pub(super) fn create_cq(dev: &mut Ctx<'_>, req: CmdCreateCq) -> Result<Work, CmdError> {
    check_ctx(dev, req.ctx_handle)?;
    let cqe = req.cqe;
    // Hazard 2: a power of two the ring masks work with, and no more than the pages hold.
    if cqe == 0 || !cqe.is_power_of_two() || cqe > dev.cfg.max_cqe {
        return Err(CmdError::Invalid("CQ size"));
    }
    let need = cq_pages(cqe);
    let n = u64::from(req.nchunks);
    if n < need || n > need + CQ_SLACK_PAGES {
        return Err(CmdError::Invalid("CQ nchunks"));
    }
    if dev.objects.cqs.is_full() {
        return Err(CmdError::Exhausted("CQs"));
    }
    let cost = budget::cq(n);
    dev.objects.room(cost)?;
    let (ctx, pdir_dma, nchunks) = (req.ctx_handle, req.pdir_dma, req.nchunks);
    Ok(Box::new(move |env: &Env| {
        let pdir = {
            let mem = env.mem.memory();
            PageDir::load(&*mem, pdir_dma, nchunks)?
        };
        let ring = CqRing::new(pdir, cqe).ok_or(CmdError::Invalid("CQ ring"))?;
        let backend = env.backend.create_cq(cqe, 0)?;
        let b = env.backend.clone();
        Ok(Box::new(move |dev: &mut Ctx<'_>| {
            let cq = Cq {
                ctx,
                backend,
                ring,
                cqe,
                refs: 0,
                cqes: 0,
                overflows: 0,
                cost,
            };
            let h = dev.objects.add_cq(cq).inspect_err(|_| {
                let _ = b.destroy_cq(backend);
            })?;
            Ok(resp(&RespCreateCq {
                hdr: hdr(),
                cq_handle: h,
                cqe,
            }))
        }) as Finish)
    }))
}

pub(super) fn resize_cq(dev: &mut Ctx<'_>, req: CmdResizeCq) -> Result<Work, CmdError> {
    let h = req.cq_handle;
    let cqe = req.cqe;
    let cq = dev.objects.cqs.get(h).ok_or(CmdError::NoSuch("CQ"))?;
    if cqe == 0 || !cqe.is_power_of_two() || cqe > dev.cfg.max_cqe {
        return Err(CmdError::Invalid("CQ size"));
    }
    // RESIZE_CQ carries no new pages: the new size must fit the CQ's own pages, and the ring must
    // be empty since the index arithmetic changes with N.
    if cq_pages(cqe) > cq.ring.pages() as u64 {
        return Err(CmdError::Invalid("CQ size exceeds its pages"));
    }
    main_loop_only(move |dev| {
        let mem = dev.mem.memory();
        let cq = dev.objects.cqs.get_mut(h).ok_or(CmdError::NoSuch("CQ"))?;
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

pub(super) fn destroy_cq(dev: &mut Ctx<'_>, req: CmdDestroyCq) -> Result<Work, CmdError> {
    let h = req.cq_handle;
    let cq = dev.objects.cqs.get(h).ok_or(CmdError::NoSuch("CQ"))?;
    // Hazard 8: QEMU freed CQs that QPs still completed into.
    if cq.refs != 0 {
        return Err(CmdError::Busy("CQ"));
    }
    let b = cq.backend;
    Ok(Box::new(move |env: &Env| {
        env.backend.destroy_cq(b)?;
        Ok(Box::new(move |dev: &mut Ctx<'_>| {
            dev.objects.remove_cq(h);
            Ok(resp(&hdr()))
        }) as Finish)
    }))
}

pub(super) fn create_bind(dev: &mut Ctx<'_>, req: CmdCreateBind) -> Result<Work, CmdError> {
    let index = req.index;
    if index >= dev.cfg.gid_tbl_len {
        return Err(CmdError::Invalid("GID index"));
    }
    // The one GID type the device offers (the core adds no other).
    let ty = match (req.gid_type, dev.cfg.roce_version) {
        (1, 1) => GidType::RoceV1,
        (2, 2) => GidType::RoceV2,
        _ => return Err(CmdError::Invalid("GID type")),
    };
    let (gid, gid_type) = (req.new_gid, req.gid_type);
    Ok(Box::new(move |env: &Env| {
        env.backend.add_gid(index, Gid(gid), ty)?;
        Ok(Box::new(move |dev: &mut Ctx<'_>| {
            if let Some(slot) = dev.objects.gids.get_mut(index as usize) {
                *slot = Some((gid, gid_type));
            }
            Ok(resp(&hdr()))
        }) as Finish)
    }))
}

pub(super) fn destroy_bind(dev: &mut Ctx<'_>, req: CmdDestroyBind) -> Result<Work, CmdError> {
    let index = req.index;
    if dev
        .objects
        .gids
        .get(index as usize)
        .is_none_or(|g| g.is_none())
    {
        return Err(CmdError::NoSuch("GID entry"));
    }
    Ok(Box::new(move |env: &Env| {
        env.backend.del_gid(index)?;
        Ok(Box::new(move |dev: &mut Ctx<'_>| {
            if let Some(slot) = dev.objects.gids.get_mut(index as usize) {
                *slot = None;
            }
            Ok(resp(&hdr()))
        }) as Finish)
    }))
}
