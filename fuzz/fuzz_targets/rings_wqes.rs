//! Ring index handling against a counting model (the fuzzer plays the guest and writes its
//! index, legally or not), then WQE fetch + parse for SQ/RQ/SRQ on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvrdma_dev::abi::{RqWqeHdr, SqWqeHdr, RQ_WQE_HDR_SIZE, SGE_SIZE, SQ_WQE_HDR_SIZE};
use pvrdma_dev::fuzzing::{fetch_recv, fetch_send, Queue};
use pvrdma_dev::pdir::PageDir;
use pvrdma_dev::ring::{self, ConsumerRing, ProducerRing, RingAddr};
use pvrdma_fuzz::Cursor;
use rdma_backend::{QpType, SendOp, WcStatus, MAX_SGE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const RING: GuestAddress = GuestAddress(0x1000);
const MEM: usize = 0x1_0000;

fn tail_in(m: &GuestMemoryMmap) -> u32 {
    u32::from_le(m.read_obj(RING).unwrap())
}
fn head_in(m: &GuestMemoryMmap) -> u32 {
    u32::from_le(m.read_obj(GuestAddress(RING.0 + 4)).unwrap())
}

/// Entries a guest index `g` claims relative to the device's count `dev`, walking the index
/// cycle (`cycle` indices, `cap` entries at most): `forward` for a producer's tail.
fn claimed(dev: u64, g: u32, cycle: u64, cap: u64, forward: bool) -> Option<u64> {
    (0..=cap).find(|&k| {
        let i = if forward {
            dev + k
        } else {
            dev + cycle * 4 - k
        };
        i % cycle == u64::from(g)
    })
}

fn consumer(c: &mut Cursor, m: &GuestMemoryMmap) {
    let n = 1u32 << (c.u8() % 9);
    let r = ConsumerRing::new(RingAddr { addr: RING, n }).unwrap();
    let (cycle, cap) = (2 * u64::from(n), u64::from(n));
    let mut consumed = 0u64; // the model
    for _ in 0..64 {
        if c.is_empty() {
            break;
        }
        let t = match c.u8() % 4 {
            0 => c.u32(),
            _ => ((consumed + u64::from(c.u8()) % (cap + 2)) % cycle) as u32,
        };
        m.write_obj(t.to_le(), RING).unwrap();
        let k = claimed(consumed, t, cycle, cap, true);
        match (r.peek(m), k) {
            (Ok(None), Some(0)) => assert!(r.advance(m).is_err()),
            (Ok(Some(s)), Some(k)) if k > 0 => {
                assert_eq!(u64::from(s), consumed % cap);
                r.advance(m).unwrap();
                consumed += 1;
                assert_eq!(u64::from(head_in(m)), consumed % cycle);
                assert_eq!(u64::from(r.head()), consumed % cycle);
            }
            (Err(_), None) => {
                assert!(r.advance(m).is_err());
                assert_eq!(u64::from(r.head()), consumed % cycle);
            }
            (got, k) => panic!("n={n} consumed={consumed} tail={t:#x}: {got:?} vs model {k:?}"),
        }
    }
}

fn producer(c: &mut Cursor, m: &GuestMemoryMmap) {
    let quirk = c.u8() % 2 == 0;
    let r = if quirk {
        let pages = 2 + u32::from(c.u8() % 6);
        let elem = if c.u8() % 2 == 0 { 4 } else { 8 };
        let n = ring::dsr_ring_elems(pages, elem).unwrap();
        ProducerRing::new_quirk(RingAddr { addr: RING, n }).unwrap()
    } else {
        let n = 1u32 << (c.u8() % 9);
        ProducerRing::new(RingAddr { addr: RING, n }).unwrap()
    };
    let n = r.ring().n;
    let cap = u64::from(r.capacity());
    let cycle = 2 * cap;
    assert!(cap <= u64::from(n));
    let mut produced = 0u64;
    for _ in 0..64 {
        if c.is_empty() {
            break;
        }
        let h = match c.u8() % 4 {
            0 => c.u32(),
            _ => ((produced + cycle * 4 - u64::from(c.u16()) % (cap + 2)) % cycle) as u32,
        };
        m.write_obj(h.to_le(), GuestAddress(RING.0 + 4)).unwrap();
        let k = claimed(produced, h, cycle, cap, false);
        match (r.free_slot(m), k) {
            (Ok(slot), Some(k)) => {
                assert_eq!(r.outstanding(m).unwrap(), k as u32);
                if k < cap {
                    let s = slot.expect("space");
                    assert_eq!(u64::from(s), produced % cap);
                    assert!(s < n);
                    r.produce(m).unwrap();
                    produced += 1;
                    assert_eq!(u64::from(tail_in(m)), produced % cycle);
                    // The driver's own formulas agree there is data.
                    assert_eq!(ring::has_data(tail_in(m), h, n), Some(true));
                } else {
                    assert!(slot.is_none());
                    assert!(r.produce(m).is_err());
                }
            }
            (Err(_), None) => assert!(r.produce(m).is_err()),
            (got, k) => panic!("n={n} produced={produced} head={h:#x}: {got:?} vs model {k:?}"),
        }
        assert_eq!(u64::from(r.tail()), produced % cycle);
    }
}

fn wqes(c: &mut Cursor, m: &GuestMemoryMmap) {
    let npages = 1 + usize::from(c.u8() % 4);
    let pages: Vec<GuestAddress> = (0..npages)
        .map(|_| GuestAddress(u64::from(c.u8() % 16) * 4096))
        .collect();
    let pdir = PageDir::from_pages(pages.into());
    let q = Queue {
        n: 1 << (c.u8() % 8),
        base: u64::from(c.u16()),
        wqe_size: match c.u8() {
            0 => c.u32(),
            b => 1 << (b % 12),
        },
        max_sge: u32::from(c.u8() % 20),
    };
    let qp_type = [QpType::Rc, QpType::Ud, QpType::Gsi][usize::from(c.u8() % 3)];
    let flags = c.u8();
    let sig_all = flags & 1 != 0;
    // A kernel QP: fast registration (its page list read from `m`) and invalidation.
    let kernel = flags & 2 != 0;
    let fill = c.bytes(4 * 4096);
    let _ = m.write_slice(fill, GuestAddress(0));
    let len = pdir.byte_len();
    for _ in 0..4 {
        let slot = match c.u8() {
            0 => c.u32(),
            b => u32::from(b) % q.n,
        };
        let off = q.base + u64::from(slot) * u64::from(q.wqe_size);
        let fits = |n: u64| off + n <= len;
        if c.u8() % 2 == 0 {
            let r = fetch_send(&pdir, m, q, slot, qp_type, sig_all, kernel);
            if !fits(u64::from(SQ_WQE_HDR_SIZE)) {
                assert!(r.is_none());
                continue;
            }
            let hdr: SqWqeHdr = pdir.read_obj(m, off).unwrap();
            let ok_n = hdr.num_sge <= q.max_sge && hdr.num_sge as usize <= MAX_SGE;
            let sge_end = u64::from(SQ_WQE_HDR_SIZE) + u64::from(SGE_SIZE) * u64::from(hdr.num_sge);
            match r {
                None => assert!(ok_n && !fits(sge_end), "send WQE at {off:#x} refused"),
                Some(Err((st, _))) => {
                    let fast_reg = kernel && qp_type == QpType::Rc && hdr.opcode == 11;
                    if !ok_n {
                        assert_eq!(st, WcStatus::LocLenErr);
                    } else if fast_reg && st == WcStatus::LocProtErr {
                        // Its page list could not be read.
                    } else {
                        assert_eq!(st, WcStatus::LocQpOpErr);
                    }
                }
                Some(Ok(wr)) => {
                    assert!(ok_n && fits(sge_end));
                    assert_eq!(wr.sges.as_slice().len(), hdr.num_sge as usize);
                    assert_eq!(wr.wr_id, hdr.wr_id);
                    assert_eq!(wr.ud.is_some(), qp_type != QpType::Rc);
                    if let Some(ud) = &wr.ud {
                        assert!(ud.remote_qpn <= 0xff_ffff);
                        assert!(matches!(wr.op, SendOp::Send { .. }));
                    }
                    match &wr.op {
                        SendOp::FastReg(r) => {
                            assert!(kernel && hdr.opcode == 11);
                            let fr = hdr.fast_reg();
                            assert_eq!(fr.page_shift, 12);
                            assert!((1..=128).contains(&fr.page_list_len));
                            assert_eq!(r.pages.len(), fr.page_list_len as usize);
                            assert!(r.pages.iter().all(|p| p.0 < MEM as u64));
                        }
                        SendOp::LocalInv { .. } | SendOp::SendInv { .. } => assert!(kernel),
                        _ => {}
                    }
                    if sig_all {
                        assert!(wr.signaled);
                    }
                }
            }
        } else {
            let r = fetch_recv(&pdir, m, q, slot);
            if !fits(u64::from(RQ_WQE_HDR_SIZE)) {
                assert!(r.is_none());
                continue;
            }
            let hdr: RqWqeHdr = pdir.read_obj(m, off).unwrap();
            let ok_n = hdr.num_sge <= q.max_sge && hdr.num_sge as usize <= MAX_SGE;
            let sge_end = u64::from(RQ_WQE_HDR_SIZE) + u64::from(SGE_SIZE) * u64::from(hdr.num_sge);
            match r {
                None => assert!(ok_n && !fits(sge_end)),
                Some(Err(id)) => assert!(!ok_n && id == hdr.wr_id),
                Some(Ok(wr)) => {
                    assert!(ok_n && fits(sge_end));
                    assert_eq!(wr.sges.as_slice().len(), hdr.num_sge as usize);
                    assert_eq!(wr.wr_id, hdr.wr_id);
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mut c = Cursor::new(data);
    match c.u8() % 3 {
        0 => consumer(&mut c, &m),
        1 => producer(&mut c, &m),
        _ => wqes(&mut c, &m),
    }
});
