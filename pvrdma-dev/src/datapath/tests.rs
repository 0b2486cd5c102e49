use super::*;
use crate::abi::{send_flags, wr_opcode};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A queue in two pages: the ring state, then WQEs of `wqe_size` bytes from `base`.
fn queue(max_sge: u32, wqe_size: u32, base: u64) -> (GuestMemoryMmap, PageDir, WorkQueue) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
    let pdir = PageDir::from_pages(vec![GuestAddress(0x1000), GuestAddress(0x2000)].into());
    let q = WorkQueue::new(&pdir, 0, 4, base, wqe_size, max_sge).unwrap();
    (mem, pdir, q)
}

fn put_send(mem: &GuestMemoryMmap, at: u64, num_sge: u32) {
    let hdr = SqWqeHdr {
        wr_id: 0x77,
        num_sge,
        opcode: wr_opcode::SEND,
        send_flags: send_flags::SIGNALED,
        ..SqWqeHdr::default()
    };
    mem.write_obj(hdr, GuestAddress(at)).unwrap();
    for i in 0..u64::from(num_sge) {
        let sge = crate::abi::WireSge {
            addr: 0x1_0000 * (i + 1),
            length: 100 + i as u32,
            lkey: 7 + i as u32,
        };
        mem.write_obj(sge, GuestAddress(at + 80 + 16 * i)).unwrap();
    }
}

const USER_RC: wqe::SqKind = wqe::SqKind {
    qp_type: QpType::Rc,
    sq_sig_all: false,
    fast_reg_pages: 0,
};

#[test]
fn small_and_large_wqe_buffers_decode_the_same_wr() {
    let (mem, pdir, few) = queue(2, 128, PAGE_SIZE);
    put_send(&mem, 0x2000 + 128, 2);
    let a = fetch_send(&pdir, &mem, &few, 1, USER_RC).unwrap().unwrap();
    let (_, _, many) = queue(16, 512, PAGE_SIZE);
    put_send(&mem, 0x2000, 2);
    let b = fetch_send(&pdir, &mem, &many, 0, USER_RC).unwrap().unwrap();
    for w in [&a, &b] {
        assert_eq!((w.wr_id, w.signaled), (0x77, true));
        let s = w.sges.as_slice();
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].addr, s[0].length, s[0].lkey), (0x1_0000, 100, 7));
        assert_eq!((s[1].addr, s[1].length, s[1].lkey), (0x2_0000, 101, 8));
    }
}

#[test]
fn sges_beyond_the_queue_pages_break_the_queue() {
    // Slot 0 starts 96 bytes before the end of the queue's pages: room for the header and
    // one SGE; claiming two runs past them.
    let (mem, pdir, q) = queue(2, 128, 2 * PAGE_SIZE - 96);
    let at = 0x3000 - 96;
    put_send(&mem, at, 1);
    assert!(fetch_send(&pdir, &mem, &q, 0, USER_RC).is_some());
    mem.write_obj(2u32, GuestAddress(at + 8)).unwrap();
    assert!(fetch_send(&pdir, &mem, &q, 0, USER_RC).is_none());
}
