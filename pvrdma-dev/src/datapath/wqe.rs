//! WQE parsing (spec/device-abi.md §7): every field the opcode defines is checked, stale fields
//! are ignored, INLINE is a no-op, and userspace opcodes ≥ 7 are rejected (the kernel's
//! SEND_WITH_INV, LOCAL_INV and FAST_REG_MR are taken from kernel QPs only).

use rdma_backend::{Access, AddressVector, FastReg, Gid, QpType, SendOp, SendWr, UdDest};
use rdma_backend::{WcOpcode, WcStatus, MAX_SGE};
use vm_memory::GuestMemory;

use crate::abi::{send_flags, wr_opcode, FastRegWr, SqWqeHdr};
use crate::pdir::PageDir;

/// What a send queue takes, as its WQEs are parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SqKind {
    pub qp_type: QpType,
    /// Every WQE is signaled.
    pub sq_sig_all: bool,
    /// Pages a FAST_REG_MR may list. 0: the kernel-only opcodes (fast registration and
    /// invalidation) are refused: a user QP, or a device without fast-register MRs.
    pub fast_reg_pages: u32,
}

impl SqKind {
    fn kernel_ops(&self) -> bool {
        self.fast_reg_pages > 0
    }
}

/// Why a WQE cannot be executed; it completes with this status and opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WqeError {
    pub status: WcStatus,
    pub opcode: WcOpcode,
}

/// The CQE opcode a send opcode completes with (for error completions too). `kernel_ops`: the
/// queue takes the kernel-only opcodes (elsewhere 10 and 11 are user space's TSO and DRIVER1).
pub(crate) fn wc_opcode_of(opcode: u32, kernel_ops: bool) -> WcOpcode {
    match opcode {
        wr_opcode::RDMA_WRITE | wr_opcode::RDMA_WRITE_WITH_IMM => WcOpcode::RdmaWrite,
        wr_opcode::RDMA_READ => WcOpcode::RdmaRead,
        wr_opcode::ATOMIC_CMP_AND_SWP => WcOpcode::CompSwap,
        wr_opcode::ATOMIC_FETCH_AND_ADD => WcOpcode::FetchAdd,
        wr_opcode::LOCAL_INV if kernel_ops => WcOpcode::LocalInv,
        wr_opcode::FAST_REG_MR if kernel_ops => WcOpcode::FastRegMr,
        _ => WcOpcode::Send,
    }
}

/// The registration a FAST_REG_MR WQE asks for, its page list read through its page directory.
/// A list of 4 KiB pages (the driver's `page_shift` is always 12), 1 to `max_pages` of them;
/// a list that cannot be read is a local protection error. The backend checks the rest (the
/// MR, the key, the range against the pages).
fn fast_reg<M: GuestMemory + ?Sized>(
    w: &FastRegWr,
    max_pages: u32,
    mem: &M,
) -> Result<FastReg, WcStatus> {
    if w.page_shift != 12 || w.page_list_len == 0 || w.page_list_len > max_pages {
        return Err(WcStatus::LocQpOpErr);
    }
    let list =
        PageDir::load(mem, w.pl_pdir_dma, w.page_list_len).map_err(|_| WcStatus::LocProtErr)?;
    Ok(FastReg {
        key: w.rkey,
        iova: w.iova_start,
        length: w.length.into(),
        access: Access::from_bits_truncate(w.access_flags),
        pages: list.pages().clone(),
    })
}

/// Number of SGEs a WQE claims, checked against the QP's own maximum (CVE-2018-20124 and
/// qemu-reference.md §6.3 hazard 3: never read past the WQE's slot).
pub(crate) fn checked_num_sge(num_sge: u32, max_sge: u32) -> Option<usize> {
    if num_sge > max_sge || num_sge as usize > MAX_SGE {
        None
    } else {
        Some(num_sge as usize)
    }
}

/// Fills a backend send WR from a send WQE header (everything but its SGEs, which the caller
/// has put in `out` already). `mem` holds a FAST_REG_MR's page list.
pub(crate) fn parse_send<M: GuestMemory + ?Sized>(
    hdr: &SqWqeHdr,
    sq: SqKind,
    mem: &M,
    out: &mut SendWr,
) -> Result<(), WqeError> {
    let opcode = hdr.opcode;
    let err = |status| WqeError {
        status,
        opcode: wc_opcode_of(opcode, sq.kernel_ops()),
    };
    let imm = Some(hdr.ex);
    let qp_type = sq.qp_type;
    let op = match (qp_type, opcode) {
        (_, wr_opcode::SEND) => SendOp::Send { imm: None },
        (_, wr_opcode::SEND_WITH_IMM) => SendOp::Send { imm },
        (QpType::Rc, wr_opcode::RDMA_WRITE) => {
            let (remote_addr, rkey) = hdr.rdma();
            SendOp::RdmaWrite {
                remote_addr,
                rkey,
                imm: None,
            }
        }
        (QpType::Rc, wr_opcode::RDMA_WRITE_WITH_IMM) => {
            let (remote_addr, rkey) = hdr.rdma();
            SendOp::RdmaWrite {
                remote_addr,
                rkey,
                imm,
            }
        }
        (QpType::Rc, wr_opcode::RDMA_READ) => {
            let (remote_addr, rkey) = hdr.rdma();
            SendOp::RdmaRead { remote_addr, rkey }
        }
        (QpType::Rc, wr_opcode::ATOMIC_CMP_AND_SWP) => {
            let (remote_addr, compare, swap, rkey) = hdr.atomic();
            SendOp::CmpSwap {
                remote_addr,
                rkey,
                compare,
                swap,
            }
        }
        (QpType::Rc, wr_opcode::ATOMIC_FETCH_AND_ADD) => {
            let (remote_addr, add, _, rkey) = hdr.atomic();
            SendOp::FetchAdd {
                remote_addr,
                rkey,
                add,
            }
        }
        (QpType::Rc, wr_opcode::SEND_WITH_INV) if sq.kernel_ops() => {
            SendOp::SendInv { rkey: hdr.ex }
        }
        (QpType::Rc, wr_opcode::LOCAL_INV) if sq.kernel_ops() => SendOp::LocalInv { key: hdr.ex },
        (QpType::Rc, wr_opcode::FAST_REG_MR) if sq.kernel_ops() => {
            let reg = fast_reg(&hdr.fast_reg(), sq.fast_reg_pages, mem).map_err(err)?;
            SendOp::FastReg(Box::new(reg))
        }
        // Opcodes ≥ 7 from userspace are mis-numbered ibv opcodes (LOCAL_INV, BIND_MW, …), and
        // RDMA/atomics are not allowed on UD/GSI.
        _ => return Err(err(WcStatus::LocQpOpErr)),
    };
    let ud = match qp_type {
        QpType::Rc => None,
        QpType::Ud | QpType::Gsi => {
            let (remote_qpn, remote_qkey, av) = hdr.ud();
            Some(UdDest {
                av: AddressVector {
                    dgid: Gid(av.dgid),
                    sgid_index: av.gid_index,
                    hop_limit: av.hop_limit,
                    traffic_class: ((av.sl_tclass_flowlabel >> 20) & 0xff) as u8,
                    flow_label: av.sl_tclass_flowlabel & 0xf_ffff,
                    sl: 0,
                    dmac: av.dmac,
                },
                remote_qpn: remote_qpn & 0x00ff_ffff,
                remote_qkey,
            })
        }
    };
    // INLINE (8) is never honoured by the producers: the SGEs are still addresses.
    out.wr_id = hdr.wr_id;
    out.op = op;
    out.signaled = sq.sq_sig_all || hdr.send_flags & send_flags::SIGNALED != 0;
    out.solicited = hdr.send_flags & send_flags::SOLICITED != 0;
    out.ud = ud;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdma_backend::Sge;
    use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

    use rdma_backend::SgeList;

    fn one_sge() -> SgeList {
        [Sge {
            addr: 0x1000,
            length: 64,
            lkey: 5,
        }]
        .into_iter()
        .collect()
    }

    /// `parse_send` into a fresh WR carrying `sges`, for a user QP.
    fn parse(
        hdr: &SqWqeHdr,
        sges: SgeList,
        qp_type: QpType,
        sq_sig_all: bool,
    ) -> Result<SendWr, WqeError> {
        let sq = SqKind {
            qp_type,
            sq_sig_all,
            fast_reg_pages: 0,
        };
        parse_in(hdr, sges, sq, &mem())
    }

    fn parse_in(
        hdr: &SqWqeHdr,
        sges: SgeList,
        sq: SqKind,
        mem: &GuestMemoryMmap,
    ) -> Result<SendWr, WqeError> {
        let mut wr = SendWr {
            wr_id: 0,
            op: SendOp::Send { imm: None },
            sges,
            signaled: false,
            solicited: false,
            ud: None,
        };
        parse_send(hdr, sq, mem, &mut wr).map(|()| wr)
    }

    /// 1 MiB of guest memory.
    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    const KERNEL_RC: SqKind = SqKind {
        qp_type: QpType::Rc,
        sq_sig_all: false,
        fast_reg_pages: 128,
    };

    /// A FAST_REG_MR WQE whose page list (`pages`) sits in a page directory at 0x1000 (its one
    /// table at 0x2000).
    fn fast_reg_wqe(m: &GuestMemoryMmap, pages: &[u64], shift: u32, len: u32) -> SqWqeHdr {
        m.write_obj(0x2000u64, GuestAddress(0x1000)).unwrap();
        for (i, p) in pages.iter().enumerate() {
            m.write_obj(*p, GuestAddress(0x2000 + 8 * i as u64))
                .unwrap();
        }
        let mut h = hdr(wr_opcode::FAST_REG_MR, 2);
        h.num_sge = 0;
        let b = h.as_mut_slice();
        b[32..40].copy_from_slice(&0x7f00_0000_0100u64.to_le_bytes());
        b[40..48].copy_from_slice(&0x1000u64.to_le_bytes());
        b[48..52].copy_from_slice(&shift.to_le_bytes());
        b[52..56].copy_from_slice(&len.to_le_bytes());
        b[56..60].copy_from_slice(&0x2f00u32.to_le_bytes());
        b[60..64].copy_from_slice(&7u32.to_le_bytes());
        b[64..68].copy_from_slice(&0x0001_2345u32.to_le_bytes());
        h
    }

    #[test]
    fn fast_reg_reads_its_page_list() {
        let m = mem();
        let pages = [0x10000, 0x30000, 0x11000];
        let h = fast_reg_wqe(&m, &pages, 12, 3);
        let w = parse_in(&h, SgeList::EMPTY, KERNEL_RC, &m).unwrap();
        let SendOp::FastReg(r) = w.op else {
            panic!("not a fast registration: {:?}", w.op)
        };
        assert_eq!(
            (r.key, r.iova, r.length),
            (0x0001_2345, 0x7f00_0000_0100, 0x2f00)
        );
        assert_eq!(
            r.access,
            Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::REMOTE_READ
        );
        let got: Vec<u64> = r.pages.iter().map(|p| p.0).collect();
        assert_eq!(got, pages);
    }

    #[test]
    fn fast_reg_bad_lists_complete_in_error() {
        let m = mem();
        let status = |h: &SqWqeHdr, sq: SqKind| {
            let e = parse_in(h, SgeList::EMPTY, sq, &m).unwrap_err();
            assert_eq!(e.opcode, WcOpcode::FastRegMr);
            e.status
        };
        let h = fast_reg_wqe(&m, &[0x10000], 16, 1);
        assert_eq!(status(&h, KERNEL_RC), WcStatus::LocQpOpErr, "page_shift 16");
        let h = fast_reg_wqe(&m, &[0x10000], 12, 0);
        assert_eq!(status(&h, KERNEL_RC), WcStatus::LocQpOpErr, "no pages");
        let h = fast_reg_wqe(&m, &[0x10000], 12, 129);
        assert_eq!(status(&h, KERNEL_RC), WcStatus::LocQpOpErr, "past the cap");
        let small = SqKind {
            fast_reg_pages: 2,
            ..KERNEL_RC
        };
        let h = fast_reg_wqe(&m, &[0x10000; 3], 12, 3);
        assert_eq!(
            status(&h, small),
            WcStatus::LocQpOpErr,
            "past the device's cap"
        );
        // A page-list directory outside guest RAM.
        let mut h = fast_reg_wqe(&m, &[0x10000], 12, 1);
        h.as_mut_slice()[40..48].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert_eq!(
            status(&h, KERNEL_RC),
            WcStatus::LocProtErr,
            "directory outside RAM"
        );
        // A table pointer outside guest RAM.
        let h = fast_reg_wqe(&m, &[0x10000], 12, 1);
        m.write_obj(1u64 << 40, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            status(&h, KERNEL_RC),
            WcStatus::LocProtErr,
            "table outside RAM"
        );
    }

    #[test]
    fn kernel_opcodes_only_on_kernel_rc_qps() {
        let m = mem();
        let inv = |op, sq| parse_in(&hdr(op, 2), SgeList::EMPTY, sq, &m);
        assert_eq!(
            inv(wr_opcode::LOCAL_INV, KERNEL_RC).unwrap().op,
            SendOp::LocalInv { key: 0x1234_5678 }
        );
        assert_eq!(
            inv(wr_opcode::SEND_WITH_INV, KERNEL_RC).unwrap().op,
            SendOp::SendInv { rkey: 0x1234_5678 }
        );
        let user = SqKind {
            fast_reg_pages: 0,
            ..KERNEL_RC
        };
        let ud = SqKind {
            qp_type: QpType::Ud,
            ..KERNEL_RC
        };
        for op in [
            wr_opcode::SEND_WITH_INV,
            wr_opcode::LOCAL_INV,
            wr_opcode::FAST_REG_MR,
        ] {
            for sq in [user, ud] {
                let e = inv(op, sq).unwrap_err();
                assert_eq!(e.status, WcStatus::LocQpOpErr, "opcode {op} on {sq:?}");
            }
            // User space's opcodes 10 and 11 (TSO, DRIVER1) complete as sends, as before.
            assert_eq!(inv(op, user).unwrap_err().opcode, WcOpcode::Send);
        }
    }

    fn hdr(opcode: u32, flags: u32) -> SqWqeHdr {
        SqWqeHdr {
            wr_id: 77,
            num_sge: 1,
            total_len: 0xdead_beef, // stale: ignored
            opcode,
            send_flags: flags,
            ex: 0x1234_5678,
            ..SqWqeHdr::default()
        }
    }

    #[test]
    fn send_and_imm() {
        let s = one_sge();
        let w = parse(&hdr(wr_opcode::SEND, 2), s, QpType::Rc, false).unwrap();
        assert_eq!(w.op, SendOp::Send { imm: None });
        assert!(w.signaled);
        assert_eq!(w.sges.as_slice().len(), 1);
        let w = parse(&hdr(wr_opcode::SEND_WITH_IMM, 0), s, QpType::Rc, false).unwrap();
        assert_eq!(
            w.op,
            SendOp::Send {
                imm: Some(0x1234_5678)
            }
        );
        assert!(!w.signaled, "unsignaled without sq_sig_all");
        let w = parse(&hdr(wr_opcode::SEND, 0), s, QpType::Rc, true).unwrap();
        assert!(w.signaled, "sq_sig_all signals everything");
    }

    #[test]
    fn userspace_opcodes_from_7_are_rejected() {
        for op in 7..=20 {
            let e = parse(&hdr(op, 2), SgeList::EMPTY, QpType::Rc, false).unwrap_err();
            assert_eq!(e.status, WcStatus::LocQpOpErr);
        }
    }

    #[test]
    fn rdma_and_atomics_not_allowed_on_ud() {
        for op in [0, 1, 4, 5, 6] {
            assert!(parse(&hdr(op, 2), SgeList::EMPTY, QpType::Ud, false).is_err());
            assert!(parse(&hdr(op, 2), SgeList::EMPTY, QpType::Gsi, false).is_err());
            assert!(parse(&hdr(op, 2), SgeList::EMPTY, QpType::Rc, false).is_ok());
        }
    }

    #[test]
    fn ud_address_vector() {
        let mut h = hdr(wr_opcode::SEND, 2);
        let b = h.as_mut_slice();
        b[32..36].copy_from_slice(&0xff00_0007u32.to_le_bytes()); // qpn with junk high byte
        b[36..40].copy_from_slice(&0x8000_0000u32.to_le_bytes());
        b[44..48].copy_from_slice(&((3u32 << 20) | 0x12345).to_le_bytes());
        b[48] = 0xfe;
        b[65] = 2; // gid index
        b[67] = 64; // hop limit
        b[68..74].copy_from_slice(&[1, 2, 3, 4, 5, 6]);
        let w = parse(&h, SgeList::EMPTY, QpType::Ud, false).unwrap();
        let ud = w.ud.unwrap();
        assert_eq!(ud.remote_qpn, 7);
        assert_eq!(ud.remote_qkey, 0x8000_0000);
        assert_eq!(ud.av.sgid_index, 2);
        assert_eq!(ud.av.hop_limit, 64);
        assert_eq!(ud.av.traffic_class, 3);
        assert_eq!(ud.av.flow_label, 0x12345);
        assert_eq!(ud.av.dgid.0[0], 0xfe);
        assert_eq!(ud.av.dmac, [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn num_sge_bounds() {
        assert_eq!(checked_num_sge(4, 4), Some(4));
        assert_eq!(checked_num_sge(5, 4), None);
        assert_eq!(checked_num_sge(17, 64), None);
        assert_eq!(checked_num_sge(u32::MAX, u32::MAX), None);
    }
}
