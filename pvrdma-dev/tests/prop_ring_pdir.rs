//! Property tests of ring index handling and page-directory bounds against simple models.
//!
//! What the unit tests in `ring.rs`/`pdir.rs` do not already cover: ring formulas for any
//! power-of-two size up to `MAX_RING_ELEMS` and any position in the index cycle (the unit
//! test enumerates N ≤ 64); a consumer and a producer ring fed *arbitrary* guest indices
//! (legal or not) against a counting model; `PageDir::load` of random scattered layouts of up
//! to 1500 pages with one random corruption against a model of which corruptions matter; and
//! `read_at`/`write_at` at random offsets and lengths against a byte-by-byte model.

use proptest::prelude::*;
use pvrdma_dev::pdir::{PageDir, PAGE_SIZE};
use pvrdma_dev::ring::{self, ConsumerRing, ProducerRing, RingAddr, MAX_RING_ELEMS};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const RING: GuestAddress = GuestAddress(0x1000);

fn small_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
}

/// Entries a guest index claims, by walking the index cycle from the device's count.
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The driver's formulas equal a (produced, consumed) counting model for any power-of-two N.
    #[test]
    fn formulas_match_counting_model(log_n in 0u32..=28, produced in any::<u64>(), used in any::<u64>()) {
        let n = 1u32 << log_n;
        prop_assume!(n <= MAX_RING_ELEMS);
        let used = used % (u64::from(n) + 1);
        let produced = produced.max(used);
        let consumed = produced - used;
        let two_n = 2 * u64::from(n);
        let (tail, head) = ((produced % two_n) as u32, (consumed % two_n) as u32);
        prop_assert!(ring::valid(tail, n) && ring::valid(head, n));
        prop_assert!(!ring::valid(tail + two_n as u32, n));
        prop_assert_eq!(ring::has_data(tail, head, n), Some(used > 0));
        prop_assert_eq!(ring::has_space(tail, head, n), Some(used < u64::from(n)));
        prop_assert_eq!(u64::from(ring::slot(tail, n)), produced % u64::from(n));
        prop_assert_eq!(u64::from(ring::inc(tail, n)), (produced + 1) % two_n);
    }

    /// A consumer ring fed arbitrary `prod_tail` values follows the counting model: data only
    /// when the tail is 1..=N entries ahead, an error (and no movement) otherwise.
    #[test]
    fn consumer_ring_against_model(log_n in 0u32..8, tails in proptest::collection::vec((any::<bool>(), any::<u32>(), 0u64..300), 1..64)) {
        let m = small_mem();
        let n = 1u32 << log_n;
        let r = ConsumerRing::new(RingAddr { addr: RING, n }).unwrap();
        let (cycle, cap) = (2 * u64::from(n), u64::from(n));
        let mut consumed = 0u64;
        for (raw, v, ahead) in tails {
            let t = if raw { v } else { ((consumed + ahead % (cap + 2)) % cycle) as u32 };
            m.write_obj(t.to_le(), RING).unwrap();
            match (r.peek(&m), claimed(consumed, t, cycle, cap, true)) {
                (Ok(None), Some(0)) => {}
                (Ok(Some(s)), Some(k)) if k > 0 => {
                    prop_assert_eq!(u64::from(s), consumed % cap);
                    r.advance(&m).unwrap();
                    consumed += 1;
                    let head: u32 = u32::from_le(m.read_obj(GuestAddress(RING.0 + 4)).unwrap());
                    prop_assert_eq!(u64::from(head), consumed % cycle);
                }
                (Err(_), None) => prop_assert!(r.advance(&m).is_err()),
                (got, k) => prop_assert!(false, "tail {:#x}: {:?} vs model {:?}", t, got.ok(), k),
            }
            prop_assert_eq!(u64::from(r.head()), consumed % cycle);
        }
    }

    /// A producer ring (power of two or a DSR quirk size) fed arbitrary `cons_head` values: it
    /// never has more than its capacity outstanding and writes slots in order.
    #[test]
    fn producer_ring_against_model(quirk in any::<bool>(), sz in 0u32..8, heads in proptest::collection::vec((any::<bool>(), any::<u32>(), 0u64..2000), 1..64)) {
        let m = small_mem();
        let r = if quirk {
            let n = ring::dsr_ring_elems(2 + sz % 6, if sz % 2 == 0 { 4 } else { 8 }).unwrap();
            ProducerRing::new_quirk(RingAddr { addr: RING, n }).unwrap()
        } else {
            ProducerRing::new(RingAddr { addr: RING, n: 1 << sz }).unwrap()
        };
        let n = r.ring().n;
        let cap = u64::from(r.capacity());
        let cycle = 2 * cap;
        let mut produced = 0u64;
        for (raw, v, behind) in heads {
            let h = if raw { v } else { ((produced + 4 * cycle - behind % (cap + 2)) % cycle) as u32 };
            m.write_obj(h.to_le(), GuestAddress(RING.0 + 4)).unwrap();
            match (r.free_slot(&m), claimed(produced, h, cycle, cap, false)) {
                (Ok(slot), Some(k)) => {
                    prop_assert_eq!(u64::from(r.outstanding(&m).unwrap()), k);
                    prop_assert_eq!(slot.is_some(), k < cap);
                    if let Some(s) = slot {
                        prop_assert!(s < n);
                        prop_assert_eq!(u64::from(s), produced % cap);
                        r.produce(&m).unwrap();
                        produced += 1;
                    } else {
                        prop_assert!(r.produce(&m).is_err());
                    }
                }
                (Err(_), None) => prop_assert!(r.produce(&m).is_err()),
                (got, k) => prop_assert!(false, "head {:#x}: {:?} vs model {:?}", h, got.ok(), k),
            }
            prop_assert_eq!(u64::from(r.tail()), produced % cycle);
        }
    }
}

const MEM_PAGES: u64 = 4096; // 16 MiB

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Scattered layouts load to exactly the listed pages; a corrupted entry (zero, unaligned,
    /// outside memory) fails the load iff it lies among the first `npages` entries.
    #[test]
    fn pdir_load_against_model(npages in 1usize..1500, seed in any::<u64>(), kind in 0u8..4, at in any::<usize>(), extra in 0usize..600) {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), (MEM_PAGES * PAGE_SIZE) as usize)]).unwrap();
        // Page 1 holds the directory, pages 2..=4 the tables; data pages are scattered above.
        let listed = npages + extra; // the guest lists more pages than the command claims
        let mut s = seed | 1;
        let pages: Vec<u64> = (0..listed).map(|_| {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            (16 + s % (MEM_PAGES - 16)) * PAGE_SIZE
        }).collect();
        let dir = PAGE_SIZE;
        let ntables = listed.div_ceil(512);
        prop_assume!(ntables <= 3);
        for t in 0..ntables {
            let table = (2 + t as u64) * PAGE_SIZE;
            m.write_obj(table, GuestAddress(dir + 8 * t as u64)).unwrap();
            for (j, p) in pages.iter().skip(512 * t).take(512).enumerate() {
                m.write_obj(*p, GuestAddress(table + 8 * j as u64)).unwrap();
            }
        }
        let i = at % listed;
        let bad = match kind {
            0 => None,
            1 => Some(0),
            2 => Some(pages[i] + 8),
            _ => Some(MEM_PAGES * PAGE_SIZE),
        };
        if let Some(v) = bad {
            let table = (2 + (i / 512) as u64) * PAGE_SIZE;
            m.write_obj(v, GuestAddress(table + 8 * (i % 512) as u64)).unwrap();
        }
        let r = PageDir::load(&m, dir, npages as u32);
        if bad.is_some() && i < npages {
            prop_assert!(r.is_err());
        } else {
            let pd = r.unwrap();
            prop_assert_eq!(pd.len(), npages);
            for (j, p) in pd.pages().iter().enumerate() {
                prop_assert_eq!(p.0, pages[j]);
            }
        }
    }

    /// `read_at`/`write_at` succeed exactly for spans inside the pages and move the same bytes
    /// as a byte-by-byte model (pages listed twice alias: the last write wins).
    #[test]
    fn pdir_access_against_model(pages in proptest::collection::vec(1u64..64, 1..8), off in 0u64..40000, len in 0usize..10000, fill in any::<u8>()) {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 * PAGE_SIZE as usize)]).unwrap();
        let pd = PageDir::from_pages(pages.iter().map(|p| GuestAddress(p * PAGE_SIZE)).collect::<Vec<_>>().into());
        let at = |o: u64| pages[(o / PAGE_SIZE) as usize] * PAGE_SIZE + o % PAGE_SIZE;
        let fits = off + len as u64 <= pages.len() as u64 * PAGE_SIZE;
        let buf: Vec<u8> = (0..len).map(|i| fill.wrapping_add((i * 7) as u8)).collect();
        prop_assert_eq!(pd.write_at(&m, off, &buf).is_ok(), fits);
        let mut back = vec![0u8; len];
        prop_assert_eq!(pd.read_at(&m, off, &mut back).is_ok(), fits);
        if fits {
            let mut model = std::collections::HashMap::new();
            for (i, b) in buf.iter().enumerate() {
                model.insert(at(off + i as u64), *b);
            }
            for (i, b) in back.iter().enumerate() {
                prop_assert_eq!(*b, model[&at(off + i as u64)]);
            }
        }
    }
}
