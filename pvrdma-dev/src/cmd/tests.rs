//! Command validation, one command at a time: each command runs through [`prepare`], its work
//! and its finish on a [`Ctx`] built here, over 16 MiB of guest memory and the emulated
//! backend, without a device, a main loop or a transport.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use rdma_backend::emulated::{EmulatedBackend, Fabric};
use rdma_backend::{AsyncEvent, CompletionSink, GuestMem, WorkCompletion};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::objects::{CQ_SLACK_PAGES, MR_FLAG_DMA};
use super::*;
use crate::abi::*;
use crate::datapath::{pages_for, rq_wqe_size, sq_wqe_size};
use crate::pdir::PAGE_SIZE;

const MEM: usize = 16 << 20;

/// Completions have nowhere to go: no command waits for one.
struct Nowhere;

impl CompletionSink for Nowhere {
    fn complete(&self, _: &[WorkCompletion]) {}
    fn event(&self, _: AsyncEvent) {}
    fn progress_needed(&self) {}
}

/// What a command needs of a device, and a bump allocator of guest pages.
struct Seam {
    cfg: DeviceConfig,
    mem: GuestMem,
    env: Arc<Env>,
    objects: Objects,
    uar_pfn: Option<u64>,
    /// The next free guest page.
    next: u64,
    /// The QP the last command asked to drain.
    drained: Option<u32>,
    /// The first page of the last page directory made.
    last_pages: u64,
}

impl Seam {
    fn new(cfg: DeviceConfig) -> Seam {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory"),
        );
        let backend = EmulatedBackend::new(&Fabric::new(), mem.clone(), Arc::new(Nowhere));
        let env = Arc::new(Env {
            mem: mem.clone(),
            backend,
            sink: Arc::new(Nowhere),
            progress: Arc::new(AtomicBool::new(false)),
        });
        Seam {
            objects: Objects::new(&cfg),
            cfg,
            mem,
            env,
            uar_pfn: Some(0x1000),
            next: PAGE_SIZE,
            drained: None,
            last_pages: 0,
        }
    }

    /// Runs command `code` with request `req` as the device does: prepare, work, finish.
    fn run<T: ByteValued>(&mut self, code: u32, req: &T) -> CmdResult {
        let mut bytes = [0u8; crate::abi::CMD_SLOT_SIZE];
        bytes[..req.as_slice().len()].copy_from_slice(req.as_slice());
        let work = prepare(&mut self.ctx(), code, &bytes)?;
        let finish = work(&self.env)?;
        let mut ctx = self.ctx();
        let r = finish(&mut ctx);
        let drain = ctx.drain;
        self.drained = drain;
        r
    }

    fn ctx(&mut self) -> Ctx<'_> {
        Ctx {
            cfg: &self.cfg,
            mem: &self.mem,
            env: &self.env,
            active: true,
            uar_pfn: self.uar_pfn,
            objects: &mut self.objects,
            drain: None,
        }
    }

    /// A page directory over `n` fresh zeroed pages; its DMA address.
    fn pdir(&mut self, n: u32) -> u64 {
        let ntables = u64::from(n.div_ceil(512)).max(1);
        let dir = self.take(1);
        let tables = self.take(ntables);
        let pages = self.take(u64::from(n));
        self.last_pages = pages;
        let m = self.mem.memory();
        for t in 0..ntables {
            let table = tables + t * PAGE_SIZE;
            m.write_obj(table, GuestAddress(dir + t * 8)).unwrap();
            for j in 0..512u64 {
                let i = t * 512 + j;
                if i < u64::from(n) {
                    let page = pages + i * PAGE_SIZE;
                    m.write_obj(page, GuestAddress(table + j * 8)).unwrap();
                }
            }
        }
        dir
    }

    fn take(&mut self, pages: u64) -> u64 {
        let at = self.next;
        self.next += pages * PAGE_SIZE;
        assert!(self.next <= MEM as u64, "test guest memory exhausted");
        at
    }

    fn pd(&mut self) -> u32 {
        let r = self.run(code::CREATE_PD, &CmdCreatePd::default()).unwrap();
        parse::<RespCreatePd>(&r).pd_handle
    }

    fn cq_req(&mut self, cqe: u32) -> CmdCreateCq {
        let n = (1 + (u64::from(cqe) * u64::from(CQE_SIZE)).div_ceil(PAGE_SIZE)) as u32;
        CmdCreateCq {
            pdir_dma: self.pdir(n),
            cqe,
            nchunks: n,
            ..Default::default()
        }
    }

    fn cq(&mut self, cqe: u32) -> u32 {
        let req = self.cq_req(cqe);
        parse::<RespCreateCq>(&self.run(code::CREATE_CQ, &req).unwrap()).cq_handle
    }

    /// A CREATE_QP request of `qp_type` on `pd` with both queues on `cq`, 16 WRs of 1 SGE
    /// each way, and exactly the pages its queues need.
    fn qp_req(&mut self, pd: u32, cq: u32, ty: u8) -> CmdCreateQp {
        let sq = pages_for(16, sq_wqe_size(1));
        let rq = pages_for(16, rq_wqe_size(1));
        let total = 1 + sq + rq;
        CmdCreateQp {
            pdir_dma: self.pdir(total as u32),
            pd_handle: pd,
            send_cq_handle: cq,
            recv_cq_handle: cq,
            max_send_wr: 16,
            max_recv_wr: 16,
            max_send_sge: 1,
            max_recv_sge: 1,
            total_chunks: total as u16,
            send_chunks: sq as u16,
            qp_type: ty,
            ..Default::default()
        }
    }

    fn qp(&mut self, pd: u32, cq: u32) -> u32 {
        let req = self.qp_req(pd, cq, qp_type::RC);
        let r = self.run(code::CREATE_QP, &req).unwrap();
        parse::<RespCreateQpV2>(&r).qp_handle
    }
}

fn seam() -> Seam {
    Seam::new(DeviceConfig::default())
}

/// The ERR code a command answers.
fn err_of(r: CmdResult) -> u32 {
    r.map_or_else(|e| e.code(), |_| err::OK)
}

#[test]
fn an_unknown_command_is_unsupported() {
    let mut s = seam();
    assert_eq!(err_of(s.run(77, &CmdHdr::default())), err::EOPNOTSUPP);
}

#[test]
fn query_pkey_knows_index_0_of_port_1_only() {
    let mut s = seam();
    let mut req = CmdQueryPkey {
        port_num: 1,
        ..Default::default()
    };
    let r = s.run(code::QUERY_PKEY, &req).unwrap();
    assert_eq!(parse::<RespQueryPkey>(&r).pkey, 0xffff);
    req.index = 1;
    assert_eq!(err_of(s.run(code::QUERY_PKEY, &req)), err::EINVAL);
    req.index = 0;
    req.port_num = 2;
    assert_eq!(err_of(s.run(code::QUERY_PKEY, &req)), err::EINVAL);
}

#[test]
fn a_user_context_takes_one_uar_page_after_the_kernels() {
    let mut s = seam();
    let base = s.uar_pfn.unwrap();
    let mut req = CmdCreateUc {
        pfn64: base,
        ..Default::default()
    };
    // Page 0 is the kernel's; a page past BAR2 is no page.
    assert_eq!(err_of(s.run(code::CREATE_UC, &req)), err::EINVAL);
    req.pfn64 = base + u64::from(s.cfg.max_uar);
    assert_eq!(err_of(s.run(code::CREATE_UC, &req)), err::EINVAL);
    req.pfn64 = base + 1;
    let ctx = parse::<RespCreateUc>(&s.run(code::CREATE_UC, &req).unwrap()).ctx_handle;
    assert_eq!(s.objects.page_ctx(1), Some(ctx));
    assert_eq!(err_of(s.run(code::CREATE_UC, &req)), err::EBUSY);
    // A context with a PD cannot go.
    let pd = s.run(
        code::CREATE_PD,
        &CmdCreatePd {
            ctx_handle: ctx,
            ..Default::default()
        },
    );
    let destroy = CmdDestroyUc {
        ctx_handle: ctx,
        ..Default::default()
    };
    assert_eq!(err_of(s.run(code::DESTROY_UC, &destroy)), err::EBUSY);
    let pd = parse::<RespCreatePd>(&pd.unwrap()).pd_handle;
    s.run(
        code::DESTROY_PD,
        &CmdDestroyPd {
            pd_handle: pd,
            ..Default::default()
        },
    )
    .unwrap();
    s.run(code::DESTROY_UC, &destroy).unwrap();
    assert_eq!(s.objects.page_ctx(1), None);
    // Before a DSR is loaded there is no UAR to map.
    s.uar_pfn = None;
    assert_eq!(err_of(s.run(code::CREATE_UC, &req)), err::EIO);
}

#[test]
fn a_pd_of_an_unknown_context_is_refused() {
    let mut s = seam();
    let req = CmdCreatePd {
        ctx_handle: 5,
        ..Default::default()
    };
    assert_eq!(err_of(s.run(code::CREATE_PD, &req)), err::ENOENT);
}

#[test]
fn cq_sizes_are_powers_of_two_that_their_pages_hold() {
    let mut s = seam();
    for cqe in [0, 3, s.cfg.max_cqe * 2] {
        let mut req = s.cq_req(4);
        req.cqe = cqe;
        assert_eq!(err_of(s.run(code::CREATE_CQ, &req)), err::EINVAL, "{cqe}");
    }
    // One page short, and more pages than the slack allows.
    let mut req = s.cq_req(256);
    req.nchunks -= 1;
    assert_eq!(err_of(s.run(code::CREATE_CQ, &req)), err::EINVAL);
    req.nchunks += 2 + CQ_SLACK_PAGES as u32;
    assert_eq!(err_of(s.run(code::CREATE_CQ, &req)), err::EINVAL);
    // A directory outside guest memory.
    let mut req = s.cq_req(4);
    req.pdir_dma = MEM as u64;
    assert_eq!(err_of(s.run(code::CREATE_CQ, &req)), err::EFAULT);
    let cq = s.cq(4);
    // RESIZE_CQ: within its own pages only.
    let mut resize = CmdResizeCq {
        cq_handle: cq,
        cqe: 8,
        ..Default::default()
    };
    assert_eq!(err_of(s.run(code::RESIZE_CQ, &resize)), err::OK);
    resize.cqe = 1024;
    assert_eq!(err_of(s.run(code::RESIZE_CQ, &resize)), err::EINVAL);
}

#[test]
fn user_mrs_list_exactly_their_pages() {
    let mut s = seam();
    let pd = s.pd();
    let mut req = CmdCreateMr {
        start: 0x10_0800,
        length: 2 * PAGE_SIZE,
        pd_handle: pd,
        access_flags: 1,
        nchunks: 3,
        ..Default::default()
    };
    req.pdir_dma = s.pdir(3);
    assert_eq!(err_of(s.run(code::CREATE_MR, &req)), err::OK);
    for (what, bad) in [
        ("one page short", CmdCreateMr { nchunks: 2, ..req }),
        ("one page long", CmdCreateMr { nchunks: 4, ..req }),
        ("length 0", CmdCreateMr { length: 0, ..req }),
        (
            "a range that wraps",
            CmdCreateMr {
                start: u64::MAX - PAGE_SIZE,
                ..req
            },
        ),
        ("unknown flags", CmdCreateMr { flags: 8, ..req }),
    ] {
        assert_eq!(err_of(s.run(code::CREATE_MR, &bad)), err::EINVAL, "{what}");
    }
    let no_pd = CmdCreateMr {
        pd_handle: pd + 1,
        ..req
    };
    assert_eq!(err_of(s.run(code::CREATE_MR, &no_pd)), err::ENOENT);
}

#[test]
fn a_dma_mr_is_local_only() {
    let mut s = seam();
    let pd = s.pd();
    let mut req = CmdCreateMr {
        pd_handle: pd,
        flags: MR_FLAG_DMA,
        access_flags: 1,
        ..Default::default()
    };
    assert_eq!(err_of(s.run(code::CREATE_MR, &req)), err::OK);
    req.access_flags = 1 | 2;
    assert_eq!(err_of(s.run(code::CREATE_MR, &req)), err::EINVAL);
}

#[test]
fn mr_pages_stop_at_the_page_list_budget_and_come_back() {
    let mut s = Seam::new(DeviceConfig {
        max_mr_pages: 4,
        ..DeviceConfig::default()
    });
    let pd = s.pd();
    let mut req = CmdCreateMr {
        length: 3 * PAGE_SIZE,
        pd_handle: pd,
        access_flags: 1,
        nchunks: 3,
        ..Default::default()
    };
    req.pdir_dma = s.pdir(3);
    let mr = parse::<RespCreateMr>(&s.run(code::CREATE_MR, &req).unwrap()).mr_handle;
    assert_eq!(err_of(s.run(code::CREATE_MR, &req)), err::ENOMEM);
    s.run(
        code::DESTROY_MR,
        &CmdDestroyMr {
            mr_handle: mr,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(err_of(s.run(code::CREATE_MR, &req)), err::OK);
}

#[test]
fn a_qp_holds_its_pd_and_cq_until_it_is_destroyed() {
    let mut s = seam();
    let pd = s.pd();
    let cq = s.cq(64);
    let qp = s.qp(pd, cq);
    assert_eq!(s.objects.pds.get(pd).unwrap().refs, 1);
    // Both queues complete into the one CQ.
    assert_eq!(s.objects.cqs.get(cq).unwrap().refs, 2);
    let reserved = s.objects.host_mem();
    let destroy_pd = CmdDestroyPd {
        pd_handle: pd,
        ..Default::default()
    };
    let destroy_cq = CmdDestroyCq {
        cq_handle: cq,
        ..Default::default()
    };
    assert_eq!(err_of(s.run(code::DESTROY_PD, &destroy_pd)), err::EBUSY);
    assert_eq!(err_of(s.run(code::DESTROY_CQ, &destroy_cq)), err::EBUSY);
    s.run(
        code::DESTROY_QP,
        &CmdDestroyQp {
            qp_handle: qp,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(s.objects.pds.get(pd).unwrap().refs, 0);
    assert_eq!(s.objects.cqs.get(cq).unwrap().refs, 0);
    assert!(s.objects.host_mem() < reserved);
    s.run(code::DESTROY_CQ, &destroy_cq).unwrap();
    s.run(code::DESTROY_PD, &destroy_pd).unwrap();
    assert_eq!(s.objects.host_mem(), 0);
}

#[test]
fn create_qp_checks_its_queues_against_its_pages() {
    let mut s = seam();
    let pd = s.pd();
    let cq = s.cq(64);
    let ok = s.qp_req(pd, cq, qp_type::RC);
    let cases = [
        ("unknown type", CmdCreateQp { qp_type: 3, ..ok }),
        (
            "send WRs not a power of two",
            CmdCreateQp {
                max_send_wr: 12,
                ..ok
            },
        ),
        (
            "no receive WRs",
            CmdCreateQp {
                max_recv_wr: 0,
                ..ok
            },
        ),
        (
            "too many SGEs",
            CmdCreateQp {
                max_send_sge: s.cfg.max_sge + 1,
                ..ok
            },
        ),
        (
            "send pages short",
            CmdCreateQp {
                send_chunks: ok.send_chunks - 1,
                total_chunks: ok.total_chunks - 1,
                ..ok
            },
        ),
        (
            "total pages short",
            CmdCreateQp {
                total_chunks: ok.total_chunks - 1,
                ..ok
            },
        ),
        (
            "total pages past the slack",
            CmdCreateQp {
                total_chunks: ok.total_chunks + 3,
                ..ok
            },
        ),
    ];
    for (what, req) in cases {
        assert_eq!(err_of(s.run(code::CREATE_QP, &req)), err::EINVAL, "{what}");
    }
    let no_cq = CmdCreateQp {
        recv_cq_handle: cq + 1,
        ..ok
    };
    assert_eq!(err_of(s.run(code::CREATE_QP, &no_cq)), err::ENOENT);
    assert_eq!(err_of(s.run(code::CREATE_QP, &ok)), err::OK);
    assert!(
        s.objects.pds.get(pd).unwrap().refs == 1,
        "refused QPs hold nothing"
    );
}

#[test]
fn a_qp_cannot_mix_contexts() {
    let mut s = seam();
    let uc = CmdCreateUc {
        pfn64: s.uar_pfn.unwrap() + 1,
        ..Default::default()
    };
    let ctx = parse::<RespCreateUc>(&s.run(code::CREATE_UC, &uc).unwrap()).ctx_handle;
    let user_pd = CmdCreatePd {
        ctx_handle: ctx,
        ..Default::default()
    };
    let pd = parse::<RespCreatePd>(&s.run(code::CREATE_PD, &user_pd).unwrap()).pd_handle;
    // The kernel's CQ (context 0) under a user PD.
    let cq = s.cq(64);
    let req = s.qp_req(pd, cq, qp_type::RC);
    assert_eq!(err_of(s.run(code::CREATE_QP, &req)), err::EINVAL);
}

#[test]
fn there_is_one_gsi_qp() {
    let mut s = seam();
    let pd = s.pd();
    let cq = s.cq(64);
    let gsi = s.qp_req(pd, cq, qp_type::GSI);
    assert_eq!(err_of(s.run(code::CREATE_QP, &gsi)), err::OK);
    let again = s.qp_req(pd, cq, qp_type::GSI);
    assert_eq!(err_of(s.run(code::CREATE_QP, &again)), err::EBUSY);
}

#[test]
fn objects_stop_at_the_host_memory_budget() {
    let mut s = Seam::new(DeviceConfig {
        max_host_mem: 1 << 20,
        ..DeviceConfig::default()
    });
    let pd = s.pd();
    let cq = s.cq(64);
    let mut made = 0;
    let refused = loop {
        let req = s.qp_req(pd, cq, qp_type::RC);
        match s.run(code::CREATE_QP, &req) {
            Ok(_) => made += 1,
            Err(e) => break e,
        }
        assert!(made < 1000, "the budget never ran out");
    };
    assert!(made > 0);
    assert!(matches!(refused, CmdError::NoRoom(NoRoom::OverBudget(_))));
    assert_eq!(refused.code(), err::ENOMEM);
    assert!(s.objects.host_mem() <= 1 << 20);
}

#[test]
fn a_qp_that_can_take_posted_receives_asks_for_a_drain() {
    let mut s = seam();
    let pd = s.pd();
    let cq = s.cq(64);
    let init = CmdModifyQp {
        attr_mask: qp_attr_mask::STATE
            | qp_attr_mask::PKEY_INDEX
            | qp_attr_mask::PORT
            | qp_attr_mask::ACCESS_FLAGS,
        attrs: QpAttr {
            qp_state: rdma_backend::QpState::Init as u32,
            port_num: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    // Empty rings: nothing to drain.
    let qp = s.qp(pd, cq);
    s.run(
        code::MODIFY_QP,
        &CmdModifyQp {
            qp_handle: qp,
            ..init
        },
    )
    .unwrap();
    assert_eq!(s.drained, None);
    // A receive posted in RESET (the receive ring's producer, at 8 in the QP's first page)
    // waits for INIT, which asks for the drain that posts it.
    let req = s.qp_req(pd, cq, qp_type::RC);
    let first_page = s.last_pages;
    let qp = parse::<RespCreateQpV2>(&s.run(code::CREATE_QP, &req).unwrap()).qp_handle;
    s.mem
        .memory()
        .write_obj(1u32, GuestAddress(first_page + 8))
        .unwrap();
    s.run(
        code::MODIFY_QP,
        &CmdModifyQp {
            qp_handle: qp,
            ..init
        },
    )
    .unwrap();
    assert_eq!(s.drained, Some(qp));
}

#[test]
fn gid_entries_are_bound_within_the_table() {
    let mut s = seam();
    let mut req = CmdCreateBind {
        index: s.cfg.gid_tbl_len,
        gid_type: 1,
        ..Default::default()
    };
    req.new_gid[0] = 0xfe;
    req.new_gid[1] = 0x80;
    req.new_gid[15] = 1;
    assert_eq!(err_of(s.run(code::CREATE_BIND, &req)), err::EINVAL);
    req.index = 0;
    req.gid_type = 3;
    assert_eq!(err_of(s.run(code::CREATE_BIND, &req)), err::EINVAL);
    let unbind = CmdDestroyBind {
        index: 0,
        ..Default::default()
    };
    assert_eq!(err_of(s.run(code::DESTROY_BIND, &unbind)), err::ENOENT);
    // Only the type the device offers (RoCE v1 by default).
    req.gid_type = 2;
    assert_eq!(err_of(s.run(code::CREATE_BIND, &req)), err::EINVAL);
    req.gid_type = 1;
    s.run(code::CREATE_BIND, &req).unwrap();
    assert_eq!(s.objects.gids[0], Some((req.new_gid, 1)));
    s.run(code::DESTROY_BIND, &unbind).unwrap();
    assert_eq!(s.objects.gids[0], None);
}

#[test]
fn a_roce_v2_device_binds_roce_v2_gids_only() {
    let mut s = Seam::new(DeviceConfig {
        roce_version: 2,
        ..DeviceConfig::default()
    });
    assert_eq!(crate::dsr::caps(&s.cfg).gid_types, 0x2);
    let mut req = CmdCreateBind {
        index: 1,
        gid_type: 1,
        ..Default::default()
    };
    req.new_gid[10] = 0xff;
    req.new_gid[11] = 0xff;
    req.new_gid[12..].copy_from_slice(&[10, 0, 2, 15]);
    assert_eq!(err_of(s.run(code::CREATE_BIND, &req)), err::EINVAL);
    req.gid_type = 2;
    s.run(code::CREATE_BIND, &req).unwrap();
    assert_eq!(s.objects.gids[1], Some((req.new_gid, 2)));
    // Version 17 drivers take RoCE v1 only.
    let old = DeviceConfig {
        roce_version: 2,
        version: 17,
        ..DeviceConfig::default()
    };
    assert!(old.validate().is_err());
}

#[test]
fn an_srq_limit_stays_within_its_queue() {
    let mut s = seam();
    let pd = s.pd();
    let n = pages_for(16, rq_wqe_size(1)) as u32;
    let req = CmdCreateSrq {
        pdir_dma: s.pdir(1 + n),
        pd_handle: pd,
        nchunks: 1 + n,
        attrs: SrqAttr {
            max_wr: 16,
            max_sge: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    let srq = parse::<RespCreateSrq>(&s.run(code::CREATE_SRQ, &req).unwrap()).srqn;
    assert_eq!(s.objects.pds.get(pd).unwrap().refs, 1);
    let mut modify = CmdModifySrq {
        srq_handle: srq,
        attr_mask: 2,
        attrs: SrqAttr {
            srq_limit: 17,
            ..Default::default()
        },
        ..Default::default()
    };
    assert_eq!(err_of(s.run(code::MODIFY_SRQ, &modify)), err::EINVAL);
    modify.attrs.srq_limit = 16;
    assert_eq!(err_of(s.run(code::MODIFY_SRQ, &modify)), err::OK);
    modify.attr_mask = 1;
    assert_eq!(err_of(s.run(code::MODIFY_SRQ, &modify)), err::EOPNOTSUPP);
}
