//! Fast-register MRs and invalidation as the guest kernel's RDMA users (NVMe over Fabrics, NFS
//! over RDMA, iSER) drive them through `vmw_pvrdma`: the harness plays the kernel driver
//! (`pvrdma_alloc_mr`, IB_WR_REG_MR and IB_WR_LOCAL_INV WQEs with a page-list directory, SEND
//! with invalidate) and a peer reaches the registered memory with RDMA READ and WRITE; then
//! every hostile variant of those WQEs and commands.

use crate::common::*;
use pvrdma_dev::abi::{bmme, cmd, wc_flags, wr_opcode, CmdCreateMr, Cqe, RespCreateMr};
use pvrdma_guest::driver::FastRegWqe;
use pvrdma_guest::mem::GuestPdir;
use pvrdma_guest::{Cq, Ctx, Driver, Mr, Qp, SendWqe};
use vm_memory::{Bytes, GuestAddress};

/// ib_wc_status values the tests expect.
const SUCCESS: u32 = 0;
const LOC_QP_OP_ERR: u32 = 2;
const LOC_PROT_ERR: u32 = 4;
const WR_FLUSH_ERR: u32 = 5;
const REM_INV_REQ_ERR: u32 = 9;
const REM_ACCESS_ERR: u32 = 10;
/// CQE opcodes.
const WC_SEND: u32 = 0;
const WC_LOCAL_INV: u32 = 7;
const WC_FAST_REG_MR: u32 = 8;
const WC_RECV: u32 = 128;

/// The kernel's objects: its PD with the DMA MR, and connected RC QPs on kernel CQs.
struct Kernel {
    pd: u32,
    dma: Mr,
    gid: [u8; 16],
}

/// A connected pair of kernel RC QPs: `a` (the peer reaching into the registered memory) and
/// `b` (the consumer that registers and invalidates), each with its CQ.
struct Pair {
    a: Qp,
    cq_a: Cq,
    b: Qp,
    cq_b: Cq,
}

impl Kernel {
    fn new(drv: &Driver) -> Kernel {
        let gid = gid_of(MAC);
        let _ = drv.create_bind(0, gid, 1);
        let pd = drv.create_pd(Ctx::KERNEL).expect("kernel PD");
        let dma = drv.dma_mr(pd).expect("DMA MR");
        Kernel { pd, dma, gid }
    }

    fn pair(&self, drv: &Driver) -> Pair {
        self.pair_in(drv, Ctx::KERNEL, self.pd)
    }

    fn pair_in(&self, drv: &Driver, ctx: Ctx, pd: u32) -> Pair {
        let ((a, cq_a), (b, cq_b)) = connected_rc(drv, ctx, pd, self.gid, 16, 4);
        Pair { a, cq_a, b, cq_b }
    }

    /// An SGE of the DMA MR over guest-physical `[addr, addr + len)`.
    fn sge(&self, addr: GuestAddress, len: u32) -> pvrdma_dev::abi::WireSge {
        pvrdma_dev::abi::WireSge {
            addr: addr.0,
            length: len,
            lkey: self.dma.lkey,
        }
    }
}

/// A registration the consumer asks for: `len` bytes at `iova` over fresh scattered pages,
/// their list in a page directory (as `pvrdma_page_dir_insert_page_list` builds it).
struct Mapping {
    iova: u64,
    len: u64,
    pages: Vec<GuestAddress>,
    list: GuestPdir,
}

impl Mapping {
    fn new(drv: &Driver, iova: u64, len: u64) -> Mapping {
        let n = ((iova % 4096) + len).div_ceil(4096) as usize;
        let pages = drv.alloc.scattered(drv.mem(), n);
        let list = GuestPdir::build(&drv.alloc, drv.mem(), pages.clone());
        Mapping {
            iova,
            len,
            pages,
            list,
        }
    }

    /// The FAST_REG_MR WQE that maps it with `key` and `access`.
    fn wqe(&self, wr_id: u64, key: u32, access: u32) -> SendWqe {
        self.wqe_with(
            wr_id,
            FastRegWqe {
                iova: self.iova,
                pl_pdir: self.list.dir.0,
                page_shift: 12,
                page_list_len: self.pages.len() as u32,
                length: self.len as u32,
                access,
                rkey: key,
            },
        )
    }

    fn wqe_with(&self, wr_id: u64, f: FastRegWqe) -> SendWqe {
        SendWqe {
            wr_id,
            opcode: wr_opcode::FAST_REG_MR,
            flags: 2,
            fast_reg: Some(f),
            ..Default::default()
        }
    }

    /// Bytes `[off, off + len)` of the mapping.
    fn read(&self, drv: &Driver, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.list.read(drv.mem(), self.iova % 4096 + off, &mut v);
        v
    }
}

/// A signaled kernel WQE of `opcode` whose `ex` is `key` (LOCAL_INV, SEND_WITH_INV).
fn with_key(wr_id: u64, opcode: u32, key: u32) -> SendWqe {
    SendWqe {
        wr_id,
        opcode,
        flags: 2,
        imm: key,
        ..Default::default()
    }
}

/// An RDMA WRITE (or READ) of `len` bytes between guest-physical `local` and `remote`.
fn rdma(
    k: &Kernel,
    wr_id: u64,
    opcode: u32,
    local: GuestAddress,
    remote: u64,
    rkey: u32,
    len: u32,
) -> SendWqe {
    SendWqe {
        wr_id,
        opcode,
        flags: 2,
        sges: vec![k.sge(local, len)],
        remote_addr: remote,
        rkey,
        ..Default::default()
    }
}

/// Posts `w` on `qp` and returns its CQE.
fn post_one(drv: &Driver, qp: &mut Qp, cq: &mut Cq, w: &SendWqe) -> Cqe {
    assert!(drv.post_send(qp, w), "SQ full");
    one(drv, cq)
}

#[test]
fn caps_offer_memory_management_extensions() {
    let _shared = shared();
    let (_dev, drv) = probed();
    assert_eq!(drv.caps.bmme_flags, bmme::ALL);
    assert_eq!(drv.caps.max_fast_reg_page_list_len, 128);
}

/// The kernel-style user end to end: REG_MR, the peer's WRITE and READ with the key inside the
/// range, LOCAL_INV and a WRITE that fails and writes nothing, a new key, SEND with invalidate
/// with the key in the receive's CQE, and the key dead afterwards.
#[test]
fn kernel_user_registers_peer_accesses_then_invalidates() {
    let _shared = shared();
    let (_dev, drv) = probed();
    let k = Kernel::new(&drv);
    let mut p = k.pair(&drv);
    let frmr = drv.alloc_mr(k.pd, 32).expect("ib_alloc_mr");
    // A kernel buffer: the iova is where the first page's data starts.
    let len = 3 * 4096 + 0x321;
    let map = Mapping::new(&drv, 0xffff_8880_0012_3100, len);
    let key = frmr.key(0x11);
    let c = post_one(&drv, &mut p.b, &mut p.cq_b, &map.wqe(1, key, ALL_ACCESS));
    assert_eq!((c.status, c.opcode, c.wr_id), (SUCCESS, WC_FAST_REG_MR, 1));
    // The peer writes the whole range from a contiguous buffer of its own, and reads it back.
    let src = drv.alloc.contiguous(drv.mem(), 4);
    let back = drv.alloc.contiguous(drv.mem(), 4);
    let data = pattern(len as usize, 7);
    drv.mem().write_slice(&data, src).unwrap();
    let w = rdma(&k, 2, wr_opcode::RDMA_WRITE, src, map.iova, key, len as u32);
    assert_eq!(post_one(&drv, &mut p.a, &mut p.cq_a, &w).status, SUCCESS);
    assert!(
        map.read(&drv, 0, len as usize) == data,
        "WRITE through the key"
    );
    let r = rdma(&k, 3, wr_opcode::RDMA_READ, back, map.iova, key, len as u32);
    assert_eq!(post_one(&drv, &mut p.a, &mut p.cq_a, &r).status, SUCCESS);
    let mut got = vec![0u8; len as usize];
    drv.mem().read_slice(&mut got, back).unwrap();
    assert!(got == data, "READ through the key");
    // LOCAL_INV; the peer's next WRITE fails and writes nothing.
    let c = post_one(
        &drv,
        &mut p.b,
        &mut p.cq_b,
        &with_key(4, wr_opcode::LOCAL_INV, key),
    );
    assert_eq!((c.status, c.opcode), (SUCCESS, WC_LOCAL_INV));
    let before = map.read(&drv, 0, len as usize);
    drv.mem().write_slice(&pattern(64, 9), src).unwrap();
    let w = rdma(&k, 5, wr_opcode::RDMA_WRITE, src, map.iova, key, 64);
    assert_eq!(
        post_one(&drv, &mut p.a, &mut p.cq_a, &w).status,
        REM_ACCESS_ERR
    );
    assert!(
        map.read(&drv, 0, len as usize) == before,
        "nothing written after LOCAL_INV"
    );
    // Registered again with the next key (ib_inc_rkey), on a fresh pair: the old key and one
    // byte past the range fail, the last byte of the range works.
    let mut p = k.pair(&drv);
    let key2 = frmr.key(0x12);
    let c = post_one(&drv, &mut p.b, &mut p.cq_b, &map.wqe(10, key2, ALL_ACCESS));
    assert_eq!(c.status, SUCCESS);
    let w = rdma(
        &k,
        11,
        wr_opcode::RDMA_WRITE,
        src,
        map.iova + len - 1,
        key2,
        1,
    );
    assert_eq!(post_one(&drv, &mut p.a, &mut p.cq_a, &w).status, SUCCESS);
    for (i, (rkey, at, n)) in [(key, 0, 8), (key2, len - 1, 2), (key2 ^ 0x100, 0, 8)]
        .into_iter()
        .enumerate()
    {
        let mut q = k.pair(&drv);
        let w = rdma(&k, 12, wr_opcode::RDMA_WRITE, src, map.iova + at, rkey, n);
        let c = post_one(&drv, &mut q.a, &mut q.cq_a, &w);
        assert_eq!(c.status, REM_ACCESS_ERR, "bad access {i}");
    }
    // SEND with invalidate from the peer: the receive's CQE carries WITH_INVALIDATE and the key
    // (in the kernel's `ex.invalidate_rkey`), and the key no longer works.
    let inbox = drv.alloc.contiguous(drv.mem(), 1);
    assert!(drv.post_recv(&mut p.b, 20, &[k.sge(inbox, 64)]));
    let s = SendWqe {
        sges: vec![k.sge(src, 64)],
        ..with_key(21, wr_opcode::SEND_WITH_INV, key2)
    };
    let c = post_one(&drv, &mut p.a, &mut p.cq_a, &s);
    assert_eq!((c.status, c.opcode), (SUCCESS, WC_SEND));
    let r = one(&drv, &mut p.cq_b);
    assert_eq!(
        (r.wr_id, r.status, r.opcode, r.byte_len),
        (20, SUCCESS, WC_RECV, 64)
    );
    assert_ne!(r.wc_flags & wc_flags::WITH_INVALIDATE, 0, "WITH_INVALIDATE");
    assert_eq!(r.imm_data, key2, "the invalidated key");
    let w = rdma(&k, 22, wr_opcode::RDMA_WRITE, src, map.iova, key2, 8);
    assert_eq!(
        post_one(&drv, &mut p.a, &mut p.cq_a, &w).status,
        REM_ACCESS_ERR
    );
    drv.destroy_frmr(frmr).expect("destroy the FRMR");
    assert_device_healthy(&drv);
}

/// Hostile FAST_REG and invalidation input: each bad WQE completes in error on its QP (which
/// goes to ERR) and the device goes on serving; bad CREATE_MRs are refused.
#[test]
fn hostile_fast_registration() {
    let _shared = shared();
    let (_dev, drv) = probed();
    let k = Kernel::new(&drv);
    let frmr = drv.alloc_mr(k.pd, 4).expect("ib_alloc_mr");
    let map = Mapping::new(&drv, 0x10_0000, 2 * 4096);
    let good = |key| FastRegWqe {
        iova: map.iova,
        pl_pdir: map.list.dir.0,
        page_shift: 12,
        page_list_len: 2,
        length: 2 * 4096,
        access: ALL_ACCESS,
        rkey: key,
    };
    // Each case on a fresh pair: the WQE's status, then the QP is in ERR (the next WQE flushes).
    let expect = |what: &str, w: SendWqe, status: u32, opcode: u32| {
        let mut p = k.pair(&drv);
        let c = post_one(&drv, &mut p.b, &mut p.cq_b, &w);
        assert_eq!((c.status, c.opcode), (status, opcode), "{what}");
        let c = post_one(
            &drv,
            &mut p.b,
            &mut p.cq_b,
            &with_key(99, wr_opcode::SEND, 0),
        );
        assert_eq!(c.status, WR_FLUSH_ERR, "{what}: the QP is in ERR");
    };
    let fr = |f: FastRegWqe| map.wqe_with(1, f);
    let key = frmr.key(1);
    let outside = 1u64 << 40;
    expect(
        "page list directory outside RAM",
        fr(FastRegWqe {
            pl_pdir: outside,
            ..good(key)
        }),
        LOC_PROT_ERR,
        WC_FAST_REG_MR,
    );
    let bad_table = GuestPdir::build(&drv.alloc, drv.mem(), vec![GuestAddress(outside)]);
    expect(
        "a page outside RAM",
        fr(FastRegWqe {
            pl_pdir: bad_table.dir.0,
            page_list_len: 1,
            length: 4096,
            ..good(key)
        }),
        LOC_PROT_ERR,
        WC_FAST_REG_MR,
    );
    expect(
        "page count past the cap",
        fr(FastRegWqe {
            page_list_len: 129,
            ..good(key)
        }),
        LOC_QP_OP_ERR,
        WC_FAST_REG_MR,
    );
    let five = Mapping::new(&drv, 0x20_0000, 5 * 4096);
    expect(
        "pages past the MR's room",
        five.wqe(1, key, ALL_ACCESS),
        LOC_QP_OP_ERR,
        WC_FAST_REG_MR,
    );
    expect(
        "page_shift 16",
        fr(FastRegWqe {
            page_shift: 16,
            ..good(key)
        }),
        LOC_QP_OP_ERR,
        WC_FAST_REG_MR,
    );
    expect(
        "length 0",
        fr(FastRegWqe {
            length: 0,
            ..good(key)
        }),
        LOC_QP_OP_ERR,
        WC_FAST_REG_MR,
    );
    expect(
        "length past the pages",
        fr(FastRegWqe {
            length: 2 * 4096 + 1,
            ..good(key)
        }),
        LOC_QP_OP_ERR,
        WC_FAST_REG_MR,
    );
    expect(
        "range that wraps",
        fr(FastRegWqe {
            iova: u64::MAX - 4095,
            ..good(key)
        }),
        LOC_QP_OP_ERR,
        WC_FAST_REG_MR,
    );
    expect(
        "a key beyond its low 8 bits",
        fr(good(key ^ 0x100)),
        LOC_QP_OP_ERR,
        WC_FAST_REG_MR,
    );
    expect(
        "invalidate a free MR",
        with_key(1, wr_opcode::LOCAL_INV, key),
        LOC_QP_OP_ERR,
        WC_LOCAL_INV,
    );
    expect(
        "invalidate the DMA MR",
        with_key(1, wr_opcode::LOCAL_INV, k.dma.lkey),
        LOC_QP_OP_ERR,
        WC_LOCAL_INV,
    );
    // The key of a destroyed MR.
    let gone = drv.alloc_mr(k.pd, 4).expect("ib_alloc_mr");
    drv.destroy_frmr(gone).unwrap();
    expect(
        "key of a destroyed MR",
        fr(good(gone.key(1))),
        LOC_QP_OP_ERR,
        WC_FAST_REG_MR,
    );
    // An FRMR of another kernel PD.
    let pd2 = drv.create_pd(Ctx::KERNEL).unwrap();
    let theirs = drv.alloc_mr(pd2, 4).expect("ib_alloc_mr");
    expect(
        "FRMR of another PD",
        fr(good(theirs.key(1))),
        LOC_QP_OP_ERR,
        WC_FAST_REG_MR,
    );
    // Registered twice without an invalidation in between.
    let mut p = k.pair(&drv);
    let c = post_one(&drv, &mut p.b, &mut p.cq_b, &fr(good(key)));
    assert_eq!(c.status, SUCCESS);
    expect(
        "register a mapped MR",
        fr(good(frmr.key(2))),
        LOC_QP_OP_ERR,
        WC_FAST_REG_MR,
    );
    // SEND with invalidate of a key the responder does not have mapped: both sides fail.
    let inbox = drv.alloc.contiguous(drv.mem(), 1);
    let mut p = k.pair(&drv);
    assert!(drv.post_recv(&mut p.b, 30, &[k.sge(inbox, 64)]));
    let s = SendWqe {
        sges: vec![k.sge(inbox, 8)],
        ..with_key(31, wr_opcode::SEND_WITH_INV, theirs.key(1))
    };
    assert_eq!(
        post_one(&drv, &mut p.a, &mut p.cq_a, &s).status,
        REM_INV_REQ_ERR
    );
    assert_eq!(one(&drv, &mut p.cq_b).status, REM_INV_REQ_ERR);
    // From user space: the kernel-only opcodes are refused (10 and 11 are user space's TSO and
    // DRIVER1, completing as sends), and so is CREATE_MR with the FRMR flag.
    let ctx = fresh_ctx(&drv);
    let upd = drv.create_pd(ctx).unwrap();
    for (what, w) in [
        ("FAST_REG_MR on a user QP", fr(good(key))),
        (
            "LOCAL_INV on a user QP",
            with_key(1, wr_opcode::LOCAL_INV, key),
        ),
        (
            "SEND_WITH_INV on a user QP",
            with_key(1, wr_opcode::SEND_WITH_INV, key),
        ),
    ] {
        let mut p = k.pair_in(&drv, ctx, upd);
        let c = post_one(&drv, &mut p.b, &mut p.cq_b, &w);
        assert_eq!((c.status, c.opcode), (LOC_QP_OP_ERR, WC_SEND), "{what}");
    }
    let frmr_req = |pd, nchunks| CmdCreateMr {
        pd_handle: pd,
        flags: 2,
        nchunks,
        ..Default::default()
    };
    for (what, req) in [
        ("FRMR on a user PD", frmr_req(upd, 4)),
        ("FRMR of 0 pages", frmr_req(k.pd, 0)),
        ("FRMR past the cap", frmr_req(k.pd, 129)),
        ("FRMR of u32::MAX pages", frmr_req(k.pd, u32::MAX)),
    ] {
        let r = drv.cmd::<_, RespCreateMr>(cmd::CREATE_MR, req);
        assert_ne!(err_of(r), 0, "{what}");
    }
    // The MR still maps and the device still serves.
    let mut p = k.pair(&drv);
    let c = post_one(
        &drv,
        &mut p.b,
        &mut p.cq_b,
        &with_key(40, wr_opcode::LOCAL_INV, key),
    );
    assert_eq!(c.status, SUCCESS);
    drv.destroy_frmr(frmr).unwrap();
    drv.destroy_frmr(theirs).unwrap();
    assert_device_healthy(&drv);
}
