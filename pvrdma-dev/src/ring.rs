//! PVRDMA ring index arithmetic (spec `device-abi.md` §5, `qemu-reference.md` §4.1).
//!
//! A ring is `struct pvrdma_ring { u32 prod_tail; u32 cons_head; }` in guest memory. With `N`
//! elements, indices run over `0..2N`: the low bits give the slot, the next bit is a
//! "generation" bit that tells a full ring from an empty one. The free functions below are the
//! driver's formulas, used literally:
//!
//! ```text
//! valid(idx,N) = (idx & ~((N<<1)-1)) == 0
//! inc(idx,N)   = (idx+1) & ((N<<1)-1)
//! slot(idx,N)  = idx & (N-1)
//! has_data     = tail != head            (both valid)
//! has_space    = tail != (head ^ N)      (both valid)
//! ```
//!
//! # The non-power-of-two quirk
//!
//! The driver sizes the two DSR rings from their page count, `N = (num_pages-1)·4096/elem_size`
//! (see [`dsr_ring_elems`]); with its 4 pages that is N=1536 for the async ring (8-byte EQEs) and
//! N=3072 for the CQ-notification ring (4-byte CQNEs). The masks then degenerate, and the device
//! must reproduce that exactly because the driver consumes with the same formulas:
//!
//! - N=1536: `2N-1 = 0xBFF` has a hole at bit 10, so `inc` wraps from 1023 to 0 (indices cycle
//!   over 0..=1023, the generation bit never flips); `slot = idx & 0x5FF` only ever yields slots
//!   0..=511 (all in data page 1); `head ^ 1536` always has bit 10 set so `has_space` is always
//!   true.
//! - N=3072: `2N-1 = 0x17FF`, indices cycle over 0..=2047, `slot = idx & 0xBFF` yields 0..=1023
//!   (page 1), `has_space` always true.
//!
//! In general, with `s` = number of trailing one bits of `N-1`, indices cycle over
//! `0..2^(s+1)` and slots over `0..2^s` (for a power of two N that is `0..2N` and `0..N`). Since
//! the driver cannot detect an overrun, [`ProducerRing`] caps the entries outstanding at `2^s`
//! (512 EQEs, 1024 CQNEs) by reading `cons_head`.
//!
//! # Ownership of indices
//!
//! The device keeps its own copy of the index it owns (`cons_head` for [`ConsumerRing`],
//! `prod_tail` for [`ProducerRing`]) and writes it to guest memory after each step; it never
//! reads its own index back. A guest that scribbles on the device-owned index therefore cannot
//! steer the device; the value is overwritten on the next step. The guest-owned index is read
//! with `Acquire` on every call and validated: an index outside the ring, or one that claims
//! more entries than the ring holds, is an error, never data (CVE-2018-20216: QEMU treated the
//! `-1` "invalid" result as "has data" and looped forever).

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use crate::pdir::backing_slice;

/// Largest element count accepted for any ring. No allocation scales with it; it is the most
/// 4-byte elements a full page directory (1 GiB) can hold, and keeps `2N` and `slot × elem_size`
/// far from `u32` overflow. Callers still check that `N × elem_size` fits the pages supplied.
pub const MAX_RING_ELEMS: u32 = 1 << 28;

/// Most pages accepted for a DSR (async or CQ-notification) ring: one page table (512 pages),
/// in the spirit of QEMU's CVE-2023-1544 fix. The Linux driver always uses 4.
pub const MAX_DSR_RING_PAGES: u32 = 512;

/// Bytes in a guest page.
const PAGE_SIZE: u32 = 4096;

/// Whether `idx` is a valid index for a ring of `n` elements (the driver's formula).
pub fn valid(idx: u32, n: u32) -> bool {
    (idx & !(n << 1).wrapping_sub(1)) == 0
}

/// The index after `idx` (the driver's formula; wraps at the generation bit).
pub fn inc(idx: u32, n: u32) -> u32 {
    idx.wrapping_add(1) & (n << 1).wrapping_sub(1)
}

/// The element slot of index `idx` (the driver's formula).
pub fn slot(idx: u32, n: u32) -> u32 {
    idx & n.wrapping_sub(1)
}

/// Whether the ring has data to consume; `None` when either index is invalid.
pub fn has_data(tail: u32, head: u32, n: u32) -> Option<bool> {
    (valid(tail, n) && valid(head, n)).then_some(tail != head)
}

/// Whether the ring has space to produce into; `None` when either index is invalid.
pub fn has_space(tail: u32, head: u32, n: u32) -> Option<bool> {
    (valid(tail, n) && valid(head, n)).then_some(tail != (head ^ n))
}

/// Number of distinct slots the index cycle of a ring with `n` elements visits: `2^s` with `s`
/// the trailing ones of `n-1` (`n` for a power of two, 512 for 1536, 1024 for 3072).
fn capacity(n: u32) -> u32 {
    1 << n.wrapping_sub(1).trailing_ones().min(30)
}

/// Length of the index cycle that `inc` runs through from 0 (twice the capacity).
fn cycle(n: u32) -> u32 {
    capacity(n) << 1
}

/// Element count of a DSR ring, computed as the driver does: `(num_pages-1)·4096/elem_size`
/// (page 0 holds the ring state). `num_pages` must be in `2..=MAX_DSR_RING_PAGES` and the result
/// at least 1 (CVE-2021-3607: `num_pages` 0 made `num_pages-1` wrap).
pub fn dsr_ring_elems(num_pages: u32, elem_size: u32) -> Result<u32> {
    let bad = || Error::BadDsrRing {
        num_pages,
        elem_size,
    };
    if !(2..=MAX_DSR_RING_PAGES).contains(&num_pages) || elem_size == 0 {
        return Err(bad());
    }
    let n = (num_pages - 1) * PAGE_SIZE / elem_size;
    if n == 0 || n > MAX_RING_ELEMS {
        return Err(bad());
    }
    Ok(n)
}

/// Which index of a ring an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Index {
    /// `prod_tail`, at offset 0 of the ring.
    ProdTail,
    /// `cons_head`, at offset 4 of the ring.
    ConsHead,
}

impl fmt::Display for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Index::ProdTail => "prod_tail",
            Index::ConsHead => "cons_head",
        })
    }
}

/// Errors from ring operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The element count is not acceptable for this ring kind.
    #[error("ring size {0} is not supported")]
    BadSize(u32),
    /// The ring address is not 4-byte aligned or too close to the top of the address space.
    #[error("ring address {0:#x} is misaligned or out of range")]
    BadAddress(u64),
    /// The guest wrote an index outside the ring.
    #[error("{which} {value:#x} is invalid for a ring of {n} elements")]
    InvalidIndex {
        /// Which index.
        which: Index,
        /// The value read from guest memory.
        value: u32,
        /// Element count of the ring.
        n: u32,
    },
    /// Both indices are valid but claim more entries than the ring holds.
    #[error(
        "prod_tail {tail:#x} and cons_head {head:#x} are inconsistent for a ring of {n} elements"
    )]
    Inconsistent {
        /// Producer index.
        tail: u32,
        /// Consumer index.
        head: u32,
        /// Element count of the ring.
        n: u32,
    },
    /// `advance` was called on an empty ring.
    #[error("ring is empty")]
    Empty,
    /// `produce` was called on a full ring.
    #[error("ring is full")]
    Full,
    /// A DSR ring's page count or element size is unusable.
    #[error("DSR ring of {num_pages} pages with {elem_size}-byte elements is not supported")]
    BadDsrRing {
        /// `num_pages` from the DSR.
        num_pages: u32,
        /// Element size in bytes.
        elem_size: u32,
    },
    /// Guest memory refused the access.
    #[error("guest memory access failed")]
    Memory(#[from] GuestMemoryError),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// A `struct pvrdma_ring { u32 prod_tail; u32 cons_head; }` living at a guest address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAddr {
    /// Guest address of `prod_tail`; `cons_head` follows at +4.
    pub addr: GuestAddress,
    /// Element count N.
    pub n: u32,
}

impl RingAddr {
    fn checked(self, pow2: bool) -> Result<Self> {
        let n_ok = (1..=MAX_RING_ELEMS).contains(&self.n) && (!pow2 || self.n.is_power_of_two());
        if !n_ok {
            return Err(Error::BadSize(self.n));
        }
        if self.addr.raw_value() % 4 != 0 || self.addr.checked_add(8).is_none() {
            return Err(Error::BadAddress(self.addr.raw_value()));
        }
        Ok(self)
    }

    fn tail_addr(&self) -> GuestAddress {
        self.addr
    }

    fn head_addr(&self) -> GuestAddress {
        // Cannot overflow: checked at construction.
        self.addr.unchecked_add(4)
    }

    /// Loads a guest-owned index with `Acquire` and checks it lies in the index cycle.
    fn load<M: GuestMemory + ?Sized>(&self, mem: &M, which: Index) -> Result<u32> {
        let at = match which {
            Index::ProdTail => self.tail_addr(),
            Index::ConsHead => self.head_addr(),
        };
        let value = u32::from_le(load_u32(mem, at)?);
        // `valid` is the driver's check; the cycle bound matters for the quirk rings only,
        // where some "valid" indices (e.g. 2048 for N=1536) can never be reached by `inc`.
        if !valid(value, self.n) || value >= cycle(self.n) {
            return Err(Error::InvalidIndex {
                which,
                value,
                n: self.n,
            });
        }
        Ok(value)
    }

    fn store<M: GuestMemory + ?Sized>(&self, mem: &M, which: Index, value: u32) -> Result<()> {
        let at = match which {
            Index::ProdTail => self.tail_addr(),
            Index::ConsHead => self.head_addr(),
        };
        store_u32(mem, at, value.to_le())?;
        Ok(())
    }

    /// Entries between `head` and `tail`, or an error if that exceeds the capacity.
    fn distance(&self, tail: u32, head: u32) -> Result<u32> {
        let d = tail.wrapping_sub(head) & (cycle(self.n) - 1);
        if d > capacity(self.n) {
            return Err(Error::Inconsistent {
                tail,
                head,
                n: self.n,
            });
        }
        Ok(d)
    }
}

/// A ring the device consumes (SQ, RQ, SRQ): reads `prod_tail` (`Acquire`), owns `cons_head`.
#[derive(Debug)]
pub struct ConsumerRing {
    ring: RingAddr,
    head: AtomicU32,
}

impl ConsumerRing {
    /// Creates the device side of a consumer ring with `cons_head` = 0. `n` must be a power of
    /// two in `1..=MAX_RING_ELEMS`.
    pub fn new(ring: RingAddr) -> Result<Self> {
        Ok(ConsumerRing {
            ring: ring.checked(true)?,
            head: AtomicU32::new(0),
        })
    }

    /// The ring's address and size.
    pub fn ring(&self) -> RingAddr {
        self.ring
    }

    /// The device's copy of `cons_head`.
    pub fn head(&self) -> u32 {
        self.head.load(Ordering::Relaxed)
    }

    /// The next slot to consume, `None` when empty. Errors when the guest's `prod_tail` is
    /// invalid or claims more than N entries (never treated as data, CVE-2018-20216).
    pub fn peek<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<Option<u32>> {
        let tail = self.ring.load(mem, Index::ProdTail)?;
        let head = self.head();
        let n = self.ring.n;
        self.ring.distance(tail, head)?;
        Ok((has_data(tail, head, n) == Some(true)).then(|| slot(head, n)))
    }

    /// Increments `cons_head` and stores it (`Release`), after the element has been read.
    /// Errors (without moving) if the ring is empty.
    pub fn advance<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<()> {
        if self.peek(mem)?.is_none() {
            return Err(Error::Empty);
        }
        let next = inc(self.head(), self.ring.n);
        self.ring.store(mem, Index::ConsHead, next)?;
        self.head.store(next, Ordering::Relaxed);
        Ok(())
    }

    /// Entries produced and not yet consumed (one `Acquire` load of `prod_tail`). Errors as
    /// [`ConsumerRing::peek`] does.
    pub fn available<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<u32> {
        let tail = self.ring.load(mem, Index::ProdTail)?;
        self.ring.distance(tail, self.head())
    }

    /// The slot of the entry `k` places after `cons_head` (`k` below [`Self::available`]).
    pub fn slot_ahead(&self, k: u32) -> u32 {
        let n = self.ring.n;
        slot(self.head().wrapping_add(k) & (cycle(n) - 1), n)
    }

    /// Consumes `k` entries at once, after they have been read: one `Release` store of
    /// `cons_head`. Errors (without moving) if fewer than `k` are available.
    pub fn advance_by<M: GuestMemory + ?Sized>(&self, mem: &M, k: u32) -> Result<()> {
        if k == 0 {
            return Ok(());
        }
        if self.available(mem)? < k {
            return Err(Error::Empty);
        }
        let next = self.head().wrapping_add(k) & (cycle(self.ring.n) - 1);
        self.ring.store(mem, Index::ConsHead, next)?;
        self.head.store(next, Ordering::Relaxed);
        Ok(())
    }

    /// QP/SRQ reset: the driver and provider zero both indices on a transition to RESET; the
    /// device zeroes its own view and both indices in guest memory (idempotent with the guest's
    /// own zeroing).
    pub fn reset<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<()> {
        self.head.store(0, Ordering::Relaxed);
        self.ring.store(mem, Index::ProdTail, 0)?;
        self.ring.store(mem, Index::ConsHead, 0)
    }
}

/// A ring the device produces (CQ, async event ring, CQ-notification ring): owns `prod_tail`,
/// reads `cons_head` (`Acquire`).
#[derive(Debug)]
pub struct ProducerRing {
    ring: RingAddr,
    tail: AtomicU32,
}

impl ProducerRing {
    /// Creates the device side of a producer ring with `prod_tail` = 0; `n` must be a power of
    /// two in `1..=MAX_RING_ELEMS` (CQs).
    pub fn new(ring: RingAddr) -> Result<Self> {
        Ok(ProducerRing {
            ring: ring.checked(true)?,
            tail: AtomicU32::new(0),
        })
    }

    /// Like [`ProducerRing::new`] but any `n` in `1..=MAX_RING_ELEMS`, for the DSR async and
    /// CQ-notification rings whose N comes from [`dsr_ring_elems`]. The driver's formulas are
    /// used literally (see the module documentation for what that means for N=1536 and 3072).
    pub fn new_quirk(ring: RingAddr) -> Result<Self> {
        Ok(ProducerRing {
            ring: ring.checked(false)?,
            tail: AtomicU32::new(0),
        })
    }

    /// The ring's address and size.
    pub fn ring(&self) -> RingAddr {
        self.ring
    }

    /// The device's copy of `prod_tail`.
    pub fn tail(&self) -> u32 {
        self.tail.load(Ordering::Relaxed)
    }

    /// Most entries that can be outstanding: N for a power of two, 512 for N=1536, 1024 for
    /// N=3072.
    pub fn capacity(&self) -> u32 {
        capacity(self.ring.n)
    }

    /// Entries produced but not yet consumed. Errors when the guest's `cons_head` is invalid or
    /// ahead of `prod_tail`.
    pub fn outstanding<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<u32> {
        let head = self.ring.load(mem, Index::ConsHead)?;
        self.ring.distance(self.tail(), head)
    }

    /// The slot to write the next element into, `None` when the ring is full.
    pub fn free_slot<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<Option<u32>> {
        let head = self.ring.load(mem, Index::ConsHead)?;
        self.slot_with_head(head)
    }

    /// [`free_slot`](ProducerRing::free_slot) against a `cons_head` read earlier (`seen`),
    /// loading it from the guest again only when that old value shows no room. The consumer
    /// only moves `cons_head` forward, so an old value can only understate the room; a guest
    /// that moves it backwards only delays when the device sees it.
    pub fn free_slot_seen<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        seen: &mut Option<u32>,
    ) -> Result<Option<u32>> {
        if let Some(head) = *seen {
            if let Ok(Some(s)) = self.slot_with_head(head) {
                return Ok(Some(s));
            }
        }
        let head = self.ring.load(mem, Index::ConsHead)?;
        *seen = Some(head);
        self.slot_with_head(head)
    }

    fn slot_with_head(&self, head: u32) -> Result<Option<u32>> {
        let tail = self.tail();
        let n = self.ring.n;
        let used = self.ring.distance(tail, head)?;
        // `has_space` is the driver's formula (always true for the quirk rings); the capacity
        // check is what keeps the quirk rings from overwriting unconsumed entries.
        let space = has_space(tail, head, n) == Some(true) && used < capacity(n);
        Ok(space.then(|| slot(tail, n)))
    }

    /// Publishes the element written at [`free_slot`](ProducerRing::free_slot): a `Release`
    /// store of `inc(prod_tail)`. Errors (without moving) if the ring is full.
    pub fn produce<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<()> {
        if self.free_slot(mem)?.is_none() {
            return Err(Error::Full);
        }
        self.advance_tail(mem)
    }

    /// Counts the element written at [`free_slot`](ProducerRing::free_slot) as produced
    /// without telling the guest yet: [`publish_tail`](ProducerRing::publish_tail) stores
    /// `prod_tail` once for everything produced so far.
    pub fn produce_unpublished(&mut self) {
        self.tail
            .store(inc(self.tail(), self.ring.n), Ordering::Relaxed);
    }

    /// A `Release` store of the device's `prod_tail`: every element produced before becomes
    /// visible to the guest.
    pub fn publish_tail<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<()> {
        self.ring.store(mem, Index::ProdTail, self.tail())
    }

    fn advance_tail<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<()> {
        let next = inc(self.tail(), self.ring.n);
        self.ring.store(mem, Index::ProdTail, next)?;
        self.tail.store(next, Ordering::Relaxed);
        Ok(())
    }
}

/// An `Acquire` load of the ring index at `at`, through one slice of the backing memory when
/// there is one ([`backing_slice`]): the data path does this on every batch.
fn load_u32<M: GuestMemory + ?Sized>(
    mem: &M,
    at: GuestAddress,
) -> std::result::Result<u32, GuestMemoryError> {
    match backing_slice(mem, at, 4) {
        Some(s) => Ok(s.load::<u32>(0, Ordering::Acquire)?),
        None => mem.load::<u32>(at, Ordering::Acquire),
    }
}

/// A `Release` store of a ring index; the store side of [`load_u32`].
fn store_u32<M: GuestMemory + ?Sized>(
    mem: &M,
    at: GuestAddress,
    value: u32,
) -> std::result::Result<(), GuestMemoryError> {
    match backing_slice(mem, at, 4) {
        Some(s) => Ok(s.store(value, 0, Ordering::Release)?),
        None => mem.store(value, at, Ordering::Release),
    }
}

#[cfg(test)]
mod tests;
