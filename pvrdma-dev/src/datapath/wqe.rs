//! WQE parsing (spec/device-abi.md §7): every field the opcode defines is checked, stale fields
//! are ignored, INLINE is a no-op, and userspace opcodes ≥ 7 are rejected.

use rdma_backend::{AddressVector, Gid, QpType, SendOp, SendWr, UdDest};
use rdma_backend::{WcOpcode, WcStatus, MAX_SGE};

use crate::abi::{send_flags, wr_opcode, SqWqeHdr};

/// Why a WQE cannot be executed; it completes with this status and opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WqeError {
    pub status: WcStatus,
    pub opcode: WcOpcode,
}

/// The CQE opcode a send opcode completes with (for error completions too).
pub(crate) fn wc_opcode_of(opcode: u32) -> WcOpcode {
    match opcode {
        wr_opcode::RDMA_WRITE | wr_opcode::RDMA_WRITE_WITH_IMM => WcOpcode::RdmaWrite,
        wr_opcode::RDMA_READ => WcOpcode::RdmaRead,
        wr_opcode::ATOMIC_CMP_AND_SWP => WcOpcode::CompSwap,
        wr_opcode::ATOMIC_FETCH_AND_ADD => WcOpcode::FetchAdd,
        _ => WcOpcode::Send,
    }
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
/// has put in `out` already).
pub(crate) fn parse_send(
    hdr: &SqWqeHdr,
    qp_type: QpType,
    sq_sig_all: bool,
    out: &mut SendWr,
) -> Result<(), WqeError> {
    let opcode = hdr.opcode;
    let err = |status| WqeError {
        status,
        opcode: wc_opcode_of(opcode),
    };
    let imm = Some(hdr.ex);
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
    out.signaled = sq_sig_all || hdr.send_flags & send_flags::SIGNALED != 0;
    out.solicited = hdr.send_flags & send_flags::SOLICITED != 0;
    out.ud = ud;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdma_backend::Sge;
    use vm_memory::ByteValued;

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

    /// `parse_send` into a fresh WR carrying `sges`.
    fn parse(
        hdr: &SqWqeHdr,
        sges: SgeList,
        qp_type: QpType,
        sq_sig_all: bool,
    ) -> Result<SendWr, WqeError> {
        let mut wr = SendWr {
            wr_id: 0,
            op: SendOp::Send { imm: None },
            sges,
            signaled: false,
            solicited: false,
            ud: None,
        };
        parse_send(hdr, qp_type, sq_sig_all, &mut wr).map(|()| wr)
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
