use super::*;
use std::collections::BTreeSet;
use vm_memory::GuestMemoryMmap;

const RING: GuestAddress = GuestAddress(0x1008);

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
}

fn set(m: &GuestMemoryMmap, which: Index, v: u32) {
    let at = match which {
        Index::ProdTail => RING,
        Index::ConsHead => RING.unchecked_add(4),
    };
    m.write_obj(v.to_le(), at).unwrap();
}

fn get(m: &GuestMemoryMmap, which: Index) -> u32 {
    let at = match which {
        Index::ProdTail => RING,
        Index::ConsHead => RING.unchecked_add(4),
    };
    u32::from_le(m.read_obj(at).unwrap())
}

/// Tiny deterministic generator for interleavings.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
}

#[test]
fn formulas_match_a_counting_model() {
    // Model: a ring is (produced, consumed) counters; index = count mod 2N.
    for n in [1u32, 2, 4, 8, 16, 64] {
        for idx in 0..8 * n {
            assert_eq!(valid(idx, n), idx < 2 * n, "valid n={n} idx={idx}");
        }
        for produced in 0..4 * n {
            for used in 0..=n.min(produced) {
                let consumed = produced - used;
                let tail = produced % (2 * n);
                let head = consumed % (2 * n);
                assert_eq!(has_data(tail, head, n), Some(used > 0));
                assert_eq!(has_space(tail, head, n), Some(used < n));
                assert_eq!(slot(tail, n), produced % n);
                assert_eq!(inc(tail, n), (produced + 1) % (2 * n));
            }
        }
        assert_eq!(has_data(2 * n, 0, n), None);
        assert_eq!(has_space(0, 2 * n, n), None);
        assert_eq!(capacity(n), n);
        assert_eq!(cycle(n), 2 * n);
    }
    // Degenerate inputs never panic.
    for n in [0, u32::MAX, 1 << 31] {
        let _ = (valid(5, n), inc(u32::MAX, n), slot(7, n), has_data(1, 2, n));
        let _ = has_space(1, 2, n);
        let _ = (capacity(n), cycle(n));
    }
}

#[test]
fn quirk_numbers_by_simulation() {
    // (N, index cycle, slots used), from device-abi.md §5.
    for (n, idx_count, slot_count) in [(1536u32, 1024u32, 512u32), (3072, 2048, 1024)] {
        let mut idx = 0u32;
        let mut seen_idx = BTreeSet::new();
        let mut seen_slot = BTreeSet::new();
        for _ in 0..4 * n {
            assert!(valid(idx, n));
            seen_idx.insert(idx);
            seen_slot.insert(slot(idx, n));
            idx = inc(idx, n);
        }
        assert_eq!(seen_idx, (0..idx_count).collect());
        assert_eq!(seen_slot, (0..slot_count).collect());
        assert_eq!(cycle(n), idx_count);
        assert_eq!(capacity(n), slot_count);
        // has_space is always true for every reachable pair of indices.
        for t in 0..idx_count {
            for h in (0..idx_count).step_by(7) {
                assert_eq!(has_space(t, h, n), Some(true));
            }
        }
    }
    assert_eq!(dsr_ring_elems(4, 8).unwrap(), 1536);
    assert_eq!(dsr_ring_elems(4, 4).unwrap(), 3072);
}

#[test]
fn dsr_ring_elems_bounds() {
    for (pages, size) in [(0, 8), (1, 8), (513, 4), (u32::MAX, 4), (4, 0), (2, 8192)] {
        assert!(dsr_ring_elems(pages, size).is_err(), "{pages} {size}");
    }
    assert_eq!(dsr_ring_elems(2, 4096).unwrap(), 1);
    assert_eq!(dsr_ring_elems(512, 4).unwrap(), 511 * 1024);
}

#[test]
fn constructors_validate() {
    let r = |n| RingAddr { addr: RING, n };
    assert!(ConsumerRing::new(r(0)).is_err());
    assert!(ConsumerRing::new(r(3)).is_err());
    assert!(ConsumerRing::new(r(MAX_RING_ELEMS * 2)).is_err());
    assert!(ProducerRing::new(r(1536)).is_err());
    assert!(ProducerRing::new_quirk(r(1536)).is_ok());
    assert!(ProducerRing::new_quirk(r(0)).is_err());
    assert!(ProducerRing::new_quirk(r(u32::MAX)).is_err());
    let bad = RingAddr {
        addr: GuestAddress(0x1002),
        n: 4,
    };
    assert!(matches!(ConsumerRing::new(bad), Err(Error::BadAddress(_))));
    let top = RingAddr {
        addr: GuestAddress(u64::MAX - 3),
        n: 4,
    };
    assert!(matches!(ProducerRing::new(top), Err(Error::BadAddress(_))));
}

#[test]
fn consumer_follows_the_guest() {
    let m = mem();
    let n = 8;
    let ring = ConsumerRing::new(RingAddr { addr: RING, n }).unwrap();
    assert_eq!(ring.peek(&m).unwrap(), None);
    assert!(matches!(ring.advance(&m), Err(Error::Empty)));
    let mut produced = 0u32;
    let mut consumed = 0u32;
    let mut rng = Lcg(1);
    for _ in 0..2000 {
        if rng.next() % 2 == 0 && produced - consumed < n {
            produced += 1;
            set(&m, Index::ProdTail, produced % (2 * n));
        } else {
            match ring.peek(&m).unwrap() {
                Some(s) => {
                    assert_eq!(s, consumed % n);
                    ring.advance(&m).unwrap();
                    consumed += 1;
                    assert_eq!(get(&m, Index::ConsHead), consumed % (2 * n));
                }
                None => assert_eq!(produced, consumed),
            }
        }
    }
}

#[test]
fn consumer_batches_follow_the_guest() {
    let m = mem();
    for n in [1u32, 2, 8, 64] {
        set(&m, Index::ProdTail, 0);
        set(&m, Index::ConsHead, 0);
        let ring = ConsumerRing::new(RingAddr { addr: RING, n }).unwrap();
        let (mut produced, mut consumed) = (0u32, 0u32);
        let mut rng = Lcg(u64::from(n));
        for _ in 0..2000 {
            if rng.next() % 2 == 0 {
                produced += rng.next() % (n - (produced - consumed) + 1);
                set(&m, Index::ProdTail, produced % (2 * n));
            } else {
                let avail = ring.available(&m).unwrap();
                assert_eq!(avail, produced - consumed);
                for k in 0..avail {
                    assert_eq!(ring.slot_ahead(k), (consumed + k) % n);
                }
                assert!(matches!(ring.advance_by(&m, avail + 1), Err(Error::Empty)));
                let k = if avail == 0 {
                    0
                } else {
                    rng.next() % (avail + 1)
                };
                ring.advance_by(&m, k).unwrap();
                consumed += k;
                assert_eq!(get(&m, Index::ConsHead), consumed % (2 * n));
                assert_eq!(ring.head(), consumed % (2 * n));
            }
        }
    }
    // Invalid indices are errors for the batch calls too, and nothing moves.
    let ring = ConsumerRing::new(RingAddr { addr: RING, n: 8 }).unwrap();
    set(&m, Index::ProdTail, 9);
    assert!(matches!(
        ring.available(&m),
        Err(Error::Inconsistent { .. })
    ));
    assert!(ring.advance_by(&m, 1).is_err());
    set(&m, Index::ProdTail, 0xffff);
    assert!(ring.available(&m).is_err());
    assert_eq!(ring.head(), 0);
}

#[test]
fn produced_entries_show_at_publish_and_an_old_head_is_reread_only_when_full() {
    let m = mem();
    let mut r = ProducerRing::new(RingAddr { addr: RING, n: 4 }).unwrap();
    let mut seen = None;
    for i in 0..4u32 {
        assert_eq!(r.free_slot_seen(&m, &mut seen).unwrap(), Some(i));
        r.produce_unpublished();
        assert_eq!(get(&m, Index::ProdTail), 0, "not visible before publish");
    }
    r.publish_tail(&m).unwrap();
    assert_eq!(get(&m, Index::ProdTail), 4);
    assert_eq!(r.free_slot_seen(&m, &mut seen).unwrap(), None);
    // The guest consumes two: the old head shows no room, so it is read again.
    set(&m, Index::ConsHead, 2);
    assert_eq!(r.free_slot_seen(&m, &mut seen).unwrap(), Some(0));
    assert_eq!(seen, Some(2));
    r.produce_unpublished();
    // A head moved backwards is not seen while the old one shows room...
    set(&m, Index::ConsHead, 0);
    assert_eq!(r.free_slot_seen(&m, &mut seen).unwrap(), Some(1));
    r.produce_unpublished();
    // ...and is, once it does not: 6 produced against a head of 0 is an error, not room.
    assert!(r.free_slot_seen(&m, &mut seen).is_err());
    r.publish_tail(&m).unwrap();
    assert_eq!((r.tail(), get(&m, Index::ProdTail)), (6, 6));
}

#[test]
fn invalid_indices_are_errors_not_data() {
    let m = mem();
    let n = 8;
    let ring = ConsumerRing::new(RingAddr { addr: RING, n }).unwrap();
    for bad in [16, 17, 0xffff_ffff, 0x8000_0000] {
        set(&m, Index::ProdTail, bad);
        assert!(matches!(
            ring.peek(&m),
            Err(Error::InvalidIndex {
                which: Index::ProdTail,
                ..
            })
        ));
        assert!(ring.advance(&m).is_err());
        assert_eq!(ring.head(), 0);
    }
    // Valid but more than N ahead of cons_head.
    set(&m, Index::ProdTail, 9);
    assert!(matches!(ring.peek(&m), Err(Error::Inconsistent { .. })));
    // A guest scribbling on cons_head is ignored: the device's copy rules.
    set(&m, Index::ProdTail, 1);
    set(&m, Index::ConsHead, 0xdead);
    assert_eq!(ring.peek(&m).unwrap(), Some(0));
    ring.advance(&m).unwrap();
    assert_eq!(get(&m, Index::ConsHead), 1);
    assert_eq!(ring.peek(&m).unwrap(), None);
}

#[test]
fn consumer_reset() {
    let m = mem();
    let ring = ConsumerRing::new(RingAddr { addr: RING, n: 4 }).unwrap();
    set(&m, Index::ProdTail, 3);
    ring.advance(&m).unwrap();
    ring.advance(&m).unwrap();
    ring.reset(&m).unwrap();
    assert_eq!((ring.head(), get(&m, Index::ProdTail)), (0, 0));
    assert_eq!(get(&m, Index::ConsHead), 0);
    assert_eq!(ring.peek(&m).unwrap(), None);
}

#[test]
fn full_cq_is_reported_full() {
    let m = mem();
    let n = 4;
    let cq = ProducerRing::new(RingAddr { addr: RING, n }).unwrap();
    for i in 0..n {
        assert_eq!(cq.free_slot(&m).unwrap(), Some(i));
        cq.produce(&m).unwrap();
        assert_eq!(cq.outstanding(&m).unwrap(), i + 1);
    }
    assert_eq!(cq.free_slot(&m).unwrap(), None);
    assert!(matches!(cq.produce(&m), Err(Error::Full)));
    assert_eq!(get(&m, Index::ProdTail), 4);
    // The driver sees it full with the same formulas.
    assert_eq!(has_space(4, 0, n), Some(false));
    // The guest consumes one: one slot frees up, the next is slot 0 again.
    set(&m, Index::ConsHead, 1);
    assert_eq!(cq.free_slot(&m).unwrap(), Some(0));
    cq.produce(&m).unwrap();
    assert_eq!(get(&m, Index::ProdTail), 5);
    // Guest cons_head invalid or ahead of prod_tail → error.
    set(&m, Index::ConsHead, 8);
    assert!(matches!(
        cq.free_slot(&m),
        Err(Error::InvalidIndex {
            which: Index::ConsHead,
            ..
        })
    ));
    set(&m, Index::ConsHead, 7);
    assert!(matches!(
        cq.outstanding(&m),
        Err(Error::Inconsistent { .. })
    ));
    // A guest scribbling on prod_tail does not move the device's copy.
    set(&m, Index::ConsHead, 5);
    set(&m, Index::ProdTail, 0xffff);
    assert_eq!(cq.free_slot(&m).unwrap(), Some(1));
    cq.produce(&m).unwrap();
    assert_eq!(get(&m, Index::ProdTail), 6);
}

/// Device produces with the cap, the driver consumes with its literal formulas; nothing is
/// lost or overwritten, and the outstanding count never exceeds the cap.
fn quirk_ring_round_trip(n: u32, cap: u32) {
    let m = mem();
    let ring = ProducerRing::new_quirk(RingAddr { addr: RING, n }).unwrap();
    assert_eq!(ring.capacity(), cap);
    let mut slots = vec![u32::MAX; n as usize];
    let (mut next_val, mut expect) = (0u32, 0u32);
    let mut rng = Lcg(n as u64);
    // Fill to the cap with the guest asleep: the cap holds.
    for _ in 0..cap {
        let s = ring.free_slot(&m).unwrap().unwrap();
        slots[s as usize] = next_val;
        next_val += 1;
        ring.produce(&m).unwrap();
    }
    assert_eq!(ring.outstanding(&m).unwrap(), cap);
    assert_eq!(ring.free_slot(&m).unwrap(), None);
    assert!(matches!(ring.produce(&m), Err(Error::Full)));
    for _ in 0..20 * cap {
        if rng.next() % 3 != 0 {
            if let Some(s) = ring.free_slot(&m).unwrap() {
                assert!(s < cap);
                slots[s as usize] = next_val;
                next_val += 1;
                ring.produce(&m).unwrap();
            }
        } else {
            // Guest consumer, as pvrdma_intr1/intrx do.
            let (tail, head) = (get(&m, Index::ProdTail), get(&m, Index::ConsHead));
            if has_data(tail, head, n).unwrap() {
                assert_eq!(slots[slot(head, n) as usize], expect);
                expect += 1;
                set(&m, Index::ConsHead, inc(head, n));
            }
        }
        assert!(ring.outstanding(&m).unwrap() <= cap);
    }
    assert!(expect > 4 * cap);
}

#[test]
fn async_ring_overrun_cap() {
    quirk_ring_round_trip(dsr_ring_elems(4, 8).unwrap(), 512);
}

#[test]
fn cq_notify_ring_overrun_cap() {
    quirk_ring_round_trip(dsr_ring_elems(4, 4).unwrap(), 1024);
}

#[test]
fn quirk_ring_rejects_unreachable_valid_index() {
    let m = mem();
    let ring = ProducerRing::new_quirk(RingAddr {
        addr: RING,
        n: 1536,
    })
    .unwrap();
    // 2048 passes the driver's valid() for N=1536 but inc() never reaches it.
    assert!(valid(2048, 1536));
    set(&m, Index::ConsHead, 2048);
    assert!(matches!(
        ring.free_slot(&m),
        Err(Error::InvalidIndex { .. })
    ));
}

#[test]
fn unmapped_ring_is_an_error() {
    let m = mem();
    let far = RingAddr {
        addr: GuestAddress(0x10_0000),
        n: 4,
    };
    let c = ConsumerRing::new(far).unwrap();
    assert!(matches!(c.peek(&m), Err(Error::Memory(_))));
    assert!(matches!(c.reset(&m), Err(Error::Memory(_))));
    let p = ProducerRing::new(far).unwrap();
    assert!(matches!(p.free_slot(&m), Err(Error::Memory(_))));
    assert!(matches!(p.produce(&m), Err(Error::Memory(_))));
    // Straddling the end of memory.
    let edge = RingAddr {
        addr: GuestAddress(0x10000 - 4),
        n: 4,
    };
    let c = ConsumerRing::new(edge).unwrap();
    m.write_obj(1u32.to_le(), edge.addr).unwrap();
    assert_eq!(c.peek(&m).unwrap(), Some(0));
    assert!(matches!(c.advance(&m), Err(Error::Memory(_))));
    // The failed store did not move the device's copy.
    assert_eq!(c.head(), 0);
}
