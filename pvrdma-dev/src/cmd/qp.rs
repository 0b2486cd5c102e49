//! QP and SRQ commands.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rdma_backend::{
    Access, AddressVector, CqId, Gid, GuestMem, PdId, QpAttrs, QpInit, QpState, QpType, SrqId,
};
use vm_memory::GuestAddressSpace;

use super::{main_loop_only, resp, CmdError, Ctx, Finish, Work};
use crate::abi::*;
use crate::budget;
use crate::config::DeviceConfig;
use crate::datapath::Env;
use crate::datapath::{pages_for, rq_wqe_size, sq_wqe_size, QpShared, SrqShared, WorkQueue};
use crate::objects::{cookie, Qp, Sched, Srq};
use crate::pdir::{PageDir, PAGE_SIZE};

use crate::abi::qp_attr_mask as mask;

/// IB SRQ attribute mask bits.
const SRQ_MAX_WR: u32 = 1 << 0;
const SRQ_LIMIT: u32 = 1 << 1;

/// Extra pages a queue buffer may carry beyond what its WQEs need (page rounding by the
/// producers). Bounds the page-directory walk a guest can ask for.
const QUEUE_SLACK_PAGES: u64 = 2;

fn hdr() -> RespHdr {
    RespHdr::default()
}

fn check_wr(n: u32, max: u32, what: &'static str) -> Result<(), CmdError> {
    if n == 0 || !n.is_power_of_two() || n > max {
        Err(CmdError::Invalid(what))
    } else {
        Ok(())
    }
}

/// A QP's queues as CREATE_QP lays them out in its page directory (spec §6): page 0 holds the
/// rings' state, the send queue's WQEs follow from page 1, the receive queue's (none on an
/// SRQ) after `send_chunks` pages.
#[derive(Clone, Copy)]
struct QpLayout {
    sq_wqe: u32,
    rq_wqe: u32,
    send_chunks: u64,
    total_chunks: u16,
    on_srq: bool,
}

impl QpLayout {
    /// Checks the queue sizes against the device's limits and the page counts against what the
    /// queues need (with a little slack for the producers' rounding).
    fn check(cfg: &DeviceConfig, req: &CmdCreateQp) -> Result<QpLayout, CmdError> {
        let on_srq = req.is_srq != 0;
        check_wr(req.max_send_wr, cfg.max_qp_wr, "max_send_wr")?;
        if req.max_send_sge > cfg.max_sge || req.max_recv_sge > cfg.max_sge {
            return Err(CmdError::Invalid("SGE count"));
        }
        let sq_wqe = sq_wqe_size(req.max_send_sge);
        let rq_wqe = rq_wqe_size(req.max_recv_sge);
        let sq_pages = pages_for(req.max_send_wr, sq_wqe);
        let send_chunks = u64::from(req.send_chunks);
        if send_chunks < sq_pages || send_chunks > sq_pages + QUEUE_SLACK_PAGES {
            return Err(CmdError::Invalid("send_chunks"));
        }
        let rq_pages = if on_srq {
            0
        } else {
            check_wr(req.max_recv_wr, cfg.max_qp_wr, "max_recv_wr")?;
            pages_for(req.max_recv_wr, rq_wqe)
        };
        let total = u64::from(req.total_chunks);
        let min_total = 1 + send_chunks + rq_pages;
        let max_total = min_total + if on_srq { 0 } else { QUEUE_SLACK_PAGES };
        if total < min_total || total > max_total {
            return Err(CmdError::Invalid("total_chunks"));
        }
        Ok(QpLayout {
            sq_wqe,
            rq_wqe,
            send_chunks,
            total_chunks: req.total_chunks,
            on_srq,
        })
    }

    /// Loads the page directory and places the queues in it (on a worker).
    fn load(
        self,
        mem: &GuestMem,
        pdir_dma: u64,
        init: &QpInit,
    ) -> Result<(PageDir, WorkQueue, Option<WorkQueue>), CmdError> {
        let pdir = PageDir::load(&*mem.memory(), pdir_dma, u32::from(self.total_chunks))?;
        let sq = WorkQueue::new(
            &pdir,
            ring_state::TX,
            init.max_send_wr,
            PAGE_SIZE,
            self.sq_wqe,
            init.max_send_sge,
        )
        .ok_or(CmdError::Invalid("send queue"))?;
        let rq = if self.on_srq {
            None
        } else {
            let rq = WorkQueue::new(
                &pdir,
                ring_state::RX,
                init.max_recv_wr,
                (1 + self.send_chunks) * PAGE_SIZE,
                self.rq_wqe,
                init.max_recv_sge,
            );
            Some(rq.ok_or(CmdError::Invalid("receive queue"))?)
        };
        Ok((pdir, sq, rq))
    }
}

/// The backend objects a new QP uses: its PD, CQs and SRQ, all of one user context.
fn qp_peers(
    dev: &Ctx<'_>,
    req: &CmdCreateQp,
) -> Result<(PdId, CqId, CqId, Option<SrqId>), CmdError> {
    let objects = &*dev.objects;
    let pd = objects
        .pds
        .get(req.pd_handle)
        .ok_or(CmdError::NoSuch("PD"))?;
    let cq = |h, what| objects.cqs.get(h).ok_or(CmdError::NoSuch(what));
    let (scq, rcq) = (
        cq(req.send_cq_handle, "send CQ")?,
        cq(req.recv_cq_handle, "recv CQ")?,
    );
    if scq.ctx != pd.ctx || rcq.ctx != pd.ctx {
        return Err(CmdError::Invalid("CQ of another context"));
    }
    let srq = if req.is_srq != 0 {
        let srq = objects
            .srqs
            .get(req.srq_handle)
            .ok_or(CmdError::NoSuch("SRQ"))?;
        if srq.pd != req.pd_handle && objects.pd_ctx(srq.pd) != Some(pd.ctx) {
            return Err(CmdError::Invalid("SRQ of another context"));
        }
        Some(srq.shared.backend_srq)
    } else {
        None
    };
    Ok((pd.backend, scq.backend, rcq.backend, srq))
}

pub(super) fn create_qp(dev: &mut Ctx<'_>, req: CmdCreateQp) -> Result<Work, CmdError> {
    let qp_type = match req.qp_type {
        qp_type::GSI => QpType::Gsi,
        qp_type::RC => QpType::Rc,
        qp_type::UD => QpType::Ud,
        _ => return Err(CmdError::Invalid("QP type")),
    };
    let (pd, send_cq, recv_cq, srq) = qp_peers(dev, &req)?;
    let layout = QpLayout::check(dev.cfg, &req)?;
    if qp_type == QpType::Gsi
        && dev
            .objects
            .qps
            .iter()
            .any(|(_, q)| q.qp_type == QpType::Gsi)
    {
        return Err(CmdError::Busy("GSI QP"));
    }
    let recv_wr = if layout.on_srq { 0 } else { req.max_recv_wr };
    // The guest kernel's RC QPs (PD of context 0) take fast registration and invalidation.
    let fast_reg_pages = match (qp_type, dev.objects.pd_ctx(req.pd_handle)) {
        (QpType::Rc, Some(0)) => dev.cfg.fast_reg_pages,
        _ => 0,
    };
    let cost = budget::qp(
        &*dev.env.backend,
        budget::SendQueue {
            wr: req.max_send_wr,
            sge: req.max_send_sge,
            fast_reg_pages,
        },
        recv_wr,
        req.max_recv_sge,
        u64::from(req.total_chunks),
    );
    dev.objects.room(cost)?;
    let handle = dev
        .objects
        .qps
        .next_handle()
        .ok_or(CmdError::Exhausted("QPs"))?;
    let gen = dev.objects.new_gen();
    let init = QpInit {
        qp_type,
        pd,
        send_cq,
        recv_cq,
        srq,
        max_send_wr: req.max_send_wr,
        max_recv_wr: recv_wr,
        max_send_sge: req.max_send_sge,
        max_recv_sge: req.max_recv_sge,
        sq_sig_all: req.sq_sig_all != 0,
        cookie: cookie(handle, gen),
    };
    let version = dev.cfg.version;
    Ok(Box::new(move |env: &Env| {
        let (pdir, sq, rq) = layout.load(&env.mem, req.pdir_dma, &init)?;
        let (backend_qp, qpn) = env.backend.create_qp(&init)?;
        let shared = Arc::new(QpShared {
            backend_qp,
            qp_type,
            cookie: init.cookie,
            send_cq: init.send_cq,
            recv_cq: init.recv_cq,
            pdir,
            sq,
            rq,
            sq_sig_all: init.sq_sig_all,
            fast_reg_pages,
            dead: AtomicBool::new(false),
            pending: Default::default(),
            resets: Default::default(),
            traffic: Default::default(),
        });
        let b = env.backend.clone();
        Ok(Box::new(move |dev: &mut Ctx<'_>| {
            let cap = QpCap {
                max_send_wr: init.max_send_wr,
                max_recv_wr: init.max_recv_wr,
                max_send_sge: init.max_send_sge,
                max_recv_sge: init.max_recv_sge,
                ..QpCap::default()
            };
            let qp = Qp {
                pd: req.pd_handle,
                gen,
                qpn,
                qp_type,
                send_cq: req.send_cq_handle,
                recv_cq: req.recv_cq_handle,
                srq: layout.on_srq.then_some(req.srq_handle),
                attrs: QpAttr {
                    cap,
                    ..QpAttr::default()
                },
                shared,
                sched: Sched::default(),
                completions: Default::default(),
                cost,
            };
            dev.objects.add_qp(handle, qp).inspect_err(|_| {
                let _ = b.destroy_qp(backend_qp);
            })?;
            Ok(create_qp_response(version, cap, qpn, handle))
        }) as Finish)
    }))
}

/// CREATE_QP's response: from ABI 20 with the QP's handle beside its QPN; before, the QPN is
/// the handle (spec §4).
fn create_qp_response(version: u32, cap: QpCap, qpn: u32, handle: u32) -> Vec<u8> {
    if version >= 20 {
        resp(&RespCreateQpV2 {
            hdr: hdr(),
            qpn,
            qp_handle: handle,
            max_send_wr: cap.max_send_wr,
            max_recv_wr: cap.max_recv_wr,
            max_send_sge: cap.max_send_sge,
            max_recv_sge: cap.max_recv_sge,
            ..Default::default()
        })
    } else {
        resp(&RespCreateQpV1 {
            hdr: hdr(),
            qpn: handle,
            max_send_wr: cap.max_send_wr,
            max_recv_wr: cap.max_recv_wr,
            max_send_sge: cap.max_send_sge,
            max_recv_sge: cap.max_recv_sge,
            max_inline_data: 0,
        })
    }
}

/// Converts the masked wire attributes into backend attributes, validating what the device
/// itself depends on.
fn to_backend_attrs(dev: &Ctx<'_>, m: u32, a: &QpAttr) -> Result<QpAttrs, CmdError> {
    let mut out = QpAttrs::default();
    let state = |v: u32| QpState::from_u32(v).ok_or(CmdError::Invalid("QP state"));
    if m & mask::STATE != 0 {
        out.state = Some(state(a.qp_state)?);
    }
    if m & mask::CUR_STATE != 0 {
        out.cur_state = Some(state(a.cur_qp_state)?);
    }
    if m & mask::ACCESS_FLAGS != 0 {
        out.access = Some(Access::from_bits_truncate(a.qp_access_flags));
    }
    if m & mask::PKEY_INDEX != 0 {
        if a.pkey_index != 0 {
            return Err(CmdError::Invalid("pkey index"));
        }
        out.pkey_index = Some(a.pkey_index);
    }
    if m & mask::PORT != 0 {
        if a.port_num != 1 {
            return Err(CmdError::Invalid("port"));
        }
        out.port_num = Some(a.port_num);
    }
    if m & mask::QKEY != 0 {
        out.qkey = Some(a.qkey);
    }
    if m & mask::AV != 0 {
        let ah = &a.ah_attr;
        if u32::from(ah.grh.sgid_index) >= dev.cfg.gid_tbl_len {
            return Err(CmdError::Invalid("sgid index"));
        }
        out.ah = Some(AddressVector {
            dgid: Gid(ah.grh.dgid),
            sgid_index: ah.grh.sgid_index,
            hop_limit: ah.grh.hop_limit,
            traffic_class: ah.grh.traffic_class,
            flow_label: ah.grh.flow_label & 0xf_ffff,
            sl: ah.sl,
            dmac: ah.dmac,
        });
    }
    if m & mask::PATH_MTU != 0 {
        if !(1..=5).contains(&a.path_mtu) {
            return Err(CmdError::Invalid("path MTU"));
        }
        out.path_mtu = Some(a.path_mtu as u8);
    }
    if m & mask::TIMEOUT != 0 {
        out.timeout = Some(a.timeout);
    }
    if m & mask::RETRY_CNT != 0 {
        out.retry_cnt = Some(a.retry_cnt);
    }
    if m & mask::RNR_RETRY != 0 {
        out.rnr_retry = Some(a.rnr_retry);
    }
    if m & mask::RQ_PSN != 0 {
        out.rq_psn = Some(a.rq_psn & 0xff_ffff);
    }
    if m & mask::MAX_QP_RD_ATOMIC != 0 {
        out.max_rd_atomic = Some(a.max_rd_atomic);
    }
    if m & mask::MIN_RNR_TIMER != 0 {
        out.min_rnr_timer = Some(a.min_rnr_timer);
    }
    if m & mask::SQ_PSN != 0 {
        out.sq_psn = Some(a.sq_psn & 0xff_ffff);
    }
    if m & mask::MAX_DEST_RD_ATOMIC != 0 {
        out.max_dest_rd_atomic = Some(a.max_dest_rd_atomic);
    }
    if m & mask::DEST_QPN != 0 {
        out.dest_qp_num = Some(a.dest_qp_num & 0xff_ffff);
    }
    Ok(out)
}

/// Copies the masked fields into the stored attributes (QUERY_QP reports them).
fn merge_attrs(stored: &mut QpAttr, m: u32, a: &QpAttr) {
    macro_rules! take {
        ($bit:expr, $($f:ident),+) => {
            if m & $bit != 0 { $(stored.$f = a.$f;)+ }
        };
    }
    take!(mask::ACCESS_FLAGS, qp_access_flags);
    take!(mask::PKEY_INDEX, pkey_index);
    take!(mask::PORT, port_num);
    take!(mask::QKEY, qkey);
    take!(mask::AV, ah_attr);
    take!(mask::PATH_MTU, path_mtu);
    take!(mask::TIMEOUT, timeout);
    take!(mask::RETRY_CNT, retry_cnt);
    take!(mask::RNR_RETRY, rnr_retry);
    take!(mask::RQ_PSN, rq_psn);
    take!(mask::MAX_QP_RD_ATOMIC, max_rd_atomic);
    take!(mask::MIN_RNR_TIMER, min_rnr_timer);
    take!(mask::SQ_PSN, sq_psn);
    take!(mask::MAX_DEST_RD_ATOMIC, max_dest_rd_atomic);
    take!(mask::DEST_QPN, dest_qp_num);
}

pub(super) fn modify_qp(dev: &mut Ctx<'_>, req: CmdModifyQp) -> Result<Work, CmdError> {
    let h = req.qp_handle;
    let qp = dev.objects.qps.get(h).ok_or(CmdError::NoSuch("QP"))?;
    let m = req.attr_mask & mask::ALL;
    let attrs = to_backend_attrs(dev, m, &req.attrs)?;
    let b = qp.backend();
    let gen = qp.gen;
    let wire = req.attrs;
    Ok(Box::new(move |env: &Env| {
        env.backend.modify_qp(b, &attrs)?;
        Ok(Box::new(move |dev: &mut Ctx<'_>| {
            let mem = dev.mem.memory();
            let Some(qp) = dev.objects.qps.get_mut(h).filter(|q| q.gen == gen) else {
                return Err(CmdError::NoSuch("QP"));
            };
            merge_attrs(&mut qp.attrs, m, &wire);
            if attrs.state == Some(QpState::Reset) {
                // Both sides start the rings again from 0 (spec §6).
                qp.shared.resets.fetch_add(1, Ordering::AcqRel);
                let _ = qp.shared.sq.ring.reset(&*mem);
                if let Some(rq) = &qp.shared.rq {
                    let _ = rq.ring.reset(&*mem);
                }
            }
            // WQEs posted before the QP could take them (receives before INIT, sends before
            // RTS) wait in the rings; a transition that enables them starts a drain, if there
            // is anything to drain.
            let drain = matches!(
                attrs.state,
                Some(QpState::Init | QpState::Rtr | QpState::Rts)
            ) && qp.shared.may_have_work(&*mem);
            drop(mem);
            if drain {
                dev.drain = Some(h);
            }
            Ok(resp(&hdr()))
        }) as Finish)
    }))
}

pub(super) fn query_qp(dev: &mut Ctx<'_>, req: CmdQueryQp) -> Result<Work, CmdError> {
    let h = req.qp_handle;
    let qp = dev.objects.qps.get(h).ok_or(CmdError::NoSuch("QP"))?;
    let b = qp.backend();
    let gen = qp.gen;
    Ok(Box::new(move |env: &Env| {
        let state = env.backend.query_qp_state(b)?;
        Ok(Box::new(move |dev: &mut Ctx<'_>| {
            let qp = dev
                .objects
                .qps
                .get(h)
                .filter(|q| q.gen == gen)
                .ok_or(CmdError::NoSuch("QP"))?;
            let mut attrs = qp.attrs;
            attrs.qp_state = state as u32;
            attrs.cur_qp_state = state as u32;
            Ok(resp(&RespQueryQp { hdr: hdr(), attrs }))
        }) as Finish)
    }))
}

pub(super) fn destroy_qp(dev: &mut Ctx<'_>, req: CmdDestroyQp) -> Result<Work, CmdError> {
    let h = req.qp_handle;
    let qp = dev.objects.qps.get(h).ok_or(CmdError::NoSuch("QP"))?;
    // Workers stop at their next WQE; completions already queued are dropped by generation.
    qp.shared.dead.store(true, Ordering::Release);
    let b = qp.backend();
    Ok(Box::new(move |env: &Env| {
        let r = env.backend.destroy_qp(b);
        Ok(Box::new(move |dev: &mut Ctx<'_>| {
            if let Err(e) = r {
                if let Some(qp) = dev.objects.qps.get(h) {
                    qp.shared.dead.store(false, Ordering::Release);
                }
                return Err(e.into());
            }
            dev.objects.remove_qp(h);
            Ok(resp(&RespDestroyQp {
                hdr: hdr(),
                events_reported: 0,
                reserved: 0,
            }))
        }) as Finish)
    }))
}

pub(super) fn create_srq(dev: &mut Ctx<'_>, req: CmdCreateSrq) -> Result<Work, CmdError> {
    if dev.cfg.max_srq == 0 {
        return Err(CmdError::Unsupported(cmd::CREATE_SRQ));
    }
    if req.srq_type != 0 {
        return Err(CmdError::Invalid("SRQ type"));
    }
    let pd_h = req.pd_handle;
    let pd_b = dev
        .objects
        .pds
        .get(pd_h)
        .ok_or(CmdError::NoSuch("PD"))?
        .backend;
    let a = req.attrs;
    check_wr(a.max_wr, dev.cfg.max_srq_wr, "SRQ max_wr")?;
    if a.max_sge == 0 || a.max_sge > dev.cfg.max_srq_sge {
        return Err(CmdError::Invalid("SRQ max_sge"));
    }
    if a.srq_limit > a.max_wr {
        return Err(CmdError::Invalid("SRQ limit"));
    }
    let wqe = rq_wqe_size(a.max_sge);
    let need = pages_for(a.max_wr, wqe);
    let n = u64::from(req.nchunks);
    // The provider allocates 1 + 2× the WQE pages (spec §6); allow that and a little rounding.
    if n < 1 + need || n > 1 + 2 * need + QUEUE_SLACK_PAGES {
        return Err(CmdError::Invalid("SRQ nchunks"));
    }
    let handle = dev
        .objects
        .srqs
        .next_handle()
        .ok_or(CmdError::Exhausted("SRQs"))?;
    let cost = budget::srq(&*dev.env.backend, a.max_wr, a.max_sge, n);
    dev.objects.room(cost)?;
    let gen = dev.objects.new_gen();
    let (pdir_dma, nchunks) = (req.pdir_dma, req.nchunks);
    Ok(Box::new(move |env: &Env| {
        let pdir = {
            let mem = env.mem.memory();
            PageDir::load(&*mem, pdir_dma, nchunks)?
        };
        let rq = WorkQueue::new(&pdir, ring_state::RX, a.max_wr, PAGE_SIZE, wqe, a.max_sge)
            .ok_or(CmdError::Invalid("SRQ ring"))?;
        let backend_srq =
            env.backend
                .create_srq(pd_b, a.max_wr, a.max_sge, a.srq_limit, cookie(handle, gen))?;
        let shared = Arc::new(SrqShared {
            backend_srq,
            pdir,
            rq,
            dead: AtomicBool::new(false),
            pending: Default::default(),
        });
        let b = env.backend.clone();
        Ok(Box::new(move |dev: &mut Ctx<'_>| {
            let srq = Srq {
                pd: pd_h,
                gen,
                attrs: a,
                shared,
                sched: Sched::default(),
                refs: 0,
                cost,
            };
            dev.objects.add_srq(handle, srq).inspect_err(|_| {
                let _ = b.destroy_srq(backend_srq);
            })?;
            Ok(resp(&RespCreateSrq {
                hdr: hdr(),
                srqn: handle,
                reserved: 0,
            }))
        }) as Finish)
    }))
}

pub(super) fn modify_srq(dev: &mut Ctx<'_>, req: CmdModifySrq) -> Result<Work, CmdError> {
    let h = req.srq_handle;
    let srq = dev.objects.srqs.get(h).ok_or(CmdError::NoSuch("SRQ"))?;
    if req.attr_mask & SRQ_MAX_WR != 0 {
        // Resizing an SRQ is not supported (the kernel never asks).
        return Err(CmdError::Unsupported(cmd::MODIFY_SRQ));
    }
    if req.attr_mask & SRQ_LIMIT == 0 {
        return main_loop_only(|_| Ok(resp(&hdr())));
    }
    let limit = req.attrs.srq_limit;
    if limit > srq.attrs.max_wr {
        return Err(CmdError::Invalid("SRQ limit"));
    }
    let b = srq.shared.backend_srq;
    Ok(Box::new(move |env: &Env| {
        env.backend.modify_srq(b, limit)?;
        Ok(Box::new(move |dev: &mut Ctx<'_>| {
            if let Some(s) = dev.objects.srqs.get_mut(h) {
                s.attrs.srq_limit = limit;
            }
            Ok(resp(&hdr()))
        }) as Finish)
    }))
}

pub(super) fn query_srq(dev: &mut Ctx<'_>, req: CmdQuerySrq) -> Result<Work, CmdError> {
    let attrs = dev
        .objects
        .srqs
        .get(req.srq_handle)
        .ok_or(CmdError::NoSuch("SRQ"))?
        .attrs;
    main_loop_only(move |_| Ok(resp(&RespQuerySrq { hdr: hdr(), attrs })))
}

pub(super) fn destroy_srq(dev: &mut Ctx<'_>, req: CmdDestroySrq) -> Result<Work, CmdError> {
    let h = req.srq_handle;
    let srq = dev.objects.srqs.get(h).ok_or(CmdError::NoSuch("SRQ"))?;
    if srq.refs != 0 {
        return Err(CmdError::Busy("SRQ"));
    }
    srq.shared.dead.store(true, Ordering::Release);
    let b = srq.shared.backend_srq;
    Ok(Box::new(move |env: &Env| {
        env.backend.destroy_srq(b)?;
        Ok(Box::new(move |dev: &mut Ctx<'_>| {
            dev.objects.remove_srq(h);
            Ok(resp(&hdr()))
        }) as Finish)
    }))
}
