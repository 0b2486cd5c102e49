//! Memory regions and the copy engine.
//!
//! Every guest access goes through vm-memory volatile slices, clamped to one guest memory region
//! at a time; nothing here creates a Rust reference into guest memory. Copies move whole
//! guest-physically contiguous runs (one `memmove` per run), so an MR over contiguous pages is
//! copied in one piece and a scattered one page by page.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use smallvec::SmallVec;
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress, VolatileMemory, VolatileSlice,
};

use crate::{Access, MrKind, PdId, MAX_SGE};

/// Page size of user MR page lists.
pub(crate) const PAGE: u64 = 4096;

/// A registered memory region.
#[derive(Debug)]
pub(crate) struct Mr {
    /// Owning protection domain.
    pub pd: PdId,
    /// Access rights.
    pub access: Access,
    /// Address translation.
    pub kind: MrKind,
}

impl Mr {
    /// Whether `[addr, addr + len)` lies within the MR.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        match &self.kind {
            MrKind::Dma => true,
            MrKind::User { iova, length, .. } => iova
                .checked_add(*length)
                .is_some_and(|mr_end| addr >= *iova && end <= mr_end),
            MrKind::Frmr { .. } => false,
        }
    }

    /// The guest-physical run that holds MR address `a`, at most `max` bytes long (pages that
    /// are guest-physically adjacent are merged into one run).
    fn run(&self, a: u64, max: u64) -> Option<(u64, u64)> {
        match &self.kind {
            MrKind::Dma => Some((a, max)),
            MrKind::User { iova, pages, .. } => {
                let base = iova & !(PAGE - 1);
                let idx = usize::try_from(a.checked_sub(base)? >> 12).ok()?;
                let first = pages.get(idx)?.raw_value();
                let off = a & (PAGE - 1);
                let mut len = (PAGE - off).min(max);
                let mut k = 1usize;
                while len < max {
                    match pages.get(idx + k) {
                        Some(p) if Some(p.raw_value()) == first.checked_add(k as u64 * PAGE) => {
                            len = (len + PAGE).min(max);
                            k += 1;
                        }
                        _ => break,
                    }
                }
                Some((first.checked_add(off)?, len))
            }
            MrKind::Frmr { .. } => None,
        }
    }
}

/// One validated piece of a scatter/gather list.
#[derive(Debug, Clone)]
pub(crate) struct Seg {
    mr: Arc<Mr>,
    addr: u64,
    len: u64,
}

/// A validated scatter/gather list: up to two pieces inline (no allocation, nothing to
/// initialise or drop beyond them), more on the heap.
#[derive(Debug)]
pub(crate) struct Segs {
    total: u64,
    segs: SmallVec<[Seg; 2]>,
}

impl Segs {
    /// An empty list.
    pub fn new() -> Self {
        Segs {
            total: 0,
            segs: SmallVec::new(),
        }
    }

    /// Appends a piece; `false` when [`MAX_SGE`] pieces are present.
    pub fn push(&mut self, mr: Arc<Mr>, addr: u64, len: u64) -> bool {
        if self.segs.len() >= MAX_SGE {
            return false;
        }
        self.segs.push(Seg { mr, addr, len });
        self.total = self.total.saturating_add(len);
        true
    }

    /// Total length in bytes.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// A cursor at the start of the list.
    #[inline]
    pub fn cursor(&self) -> Cursor<'_> {
        Cursor {
            segs: &self.segs,
            i: 0,
            off: 0,
        }
    }

    /// A cursor `at` bytes into the list (at its end if it is shorter).
    #[inline]
    pub fn cursor_at(&self, at: u64) -> Cursor<'_> {
        let mut c = Cursor {
            segs: &self.segs,
            i: 0,
            off: at,
        };
        while let Some(s) = self.segs.get(c.i) {
            if c.off < s.len {
                break;
            }
            c.off -= s.len;
            c.i += 1;
        }
        c
    }
}

/// A position within a [`Segs`].
#[derive(Debug)]
pub(crate) struct Cursor<'a> {
    segs: &'a [Seg],
    i: usize,
    off: u64,
}

impl Cursor<'_> {
    /// The next guest-physical run (at most `max` bytes), advancing past it. `Err` when the list
    /// is exhausted or an MR page list is too short.
    #[inline]
    fn next_run(&mut self, max: u64) -> Result<(u64, u64), ()> {
        loop {
            let seg = self.segs.get(self.i).ok_or(())?;
            if self.off >= seg.len {
                self.i += 1;
                self.off = 0;
                continue;
            }
            let mr = &seg.mr;
            let want = (seg.len - self.off).min(max);
            let (gpa, n) = mr.run(seg.addr + self.off, want).ok_or(())?;
            self.off += n;
            return Ok((gpa, n));
        }
    }
}

/// Which side of a copy faulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The source.
    Src,
    /// The destination.
    Dst,
}

/// A volatile slice of at most `n` bytes at `gpa`, clamped to the end of its region.
fn slice_at(mem: &GuestMemoryMmap, gpa: u64, n: u64) -> Option<VolatileSlice<'_, ()>> {
    let (region, off) = mem.to_region_addr(GuestAddress(gpa))?;
    let avail = region.len().checked_sub(off.raw_value())?;
    let take = usize::try_from(n.min(avail)).ok()?;
    if take == 0 {
        return None;
    }
    region.get_slice(off, take).ok()
}

/// The guest memory region a copy used last, as one volatile slice: the next run in the same
/// region (the usual case: guest RAM is one or two regions and an MR's pages are scattered in
/// it) is a bounds-checked subslice instead of a region lookup. For 4 KiB runs the lookup cost
/// about 8 % of the copy (measured with perf); a send queue keeps one window per
/// side for a whole run of WRs, so small copies skip it too.
pub(crate) struct Window<'m> {
    mem: &'m GuestMemoryMmap,
    start: u64,
    whole: Option<VolatileSlice<'m, ()>>,
}

impl<'m> Window<'m> {
    /// A window over `mem` (nothing looked up yet).
    pub(crate) fn new(mem: &'m GuestMemoryMmap) -> Self {
        Window {
            mem,
            start: 0,
            whole: None,
        }
    }

    /// The guest memory the window is over.
    pub(crate) fn mem(&self) -> &'m GuestMemoryMmap {
        self.mem
    }

    /// Like [`slice_at`]: at most `n` bytes at `gpa`, clamped to the end of its region.
    #[inline]
    fn slice(&mut self, gpa: u64, n: u64) -> Option<VolatileSlice<'m, ()>> {
        let cached = self.whole.is_some_and(|w| {
            gpa.checked_sub(self.start)
                .is_some_and(|off| off < w.len() as u64)
        });
        if !cached {
            let region = self.mem.find_region(GuestAddress(gpa))?;
            let len = usize::try_from(region.len()).ok()?;
            self.whole = Some(region.get_slice(MemoryRegionAddress(0), len).ok()?);
            self.start = region.start_addr().raw_value();
        }
        let whole = self.whole?;
        let off = gpa.checked_sub(self.start)?;
        let avail = (whole.len() as u64).checked_sub(off)?;
        let take = usize::try_from(n.min(avail)).ok()?;
        if take == 0 {
            return None;
        }
        whole.subslice(usize::try_from(off).ok()?, take).ok()
    }
}

/// Copies `len` bytes from `src` (in the memory of `sw`) to `dst` (in that of `dw`).
pub(crate) fn copy(
    sw: &mut Window<'_>,
    src: &mut Cursor<'_>,
    dw: &mut Window<'_>,
    dst: &mut Cursor<'_>,
    len: u64,
) -> Result<(), Fault> {
    let (mut left, mut sa, mut sl, mut da, mut dl) = (len, 0u64, 0u64, 0u64, 0u64);
    while left > 0 {
        if sl == 0 {
            (sa, sl) = src.next_run(left).map_err(|()| Fault::Src)?;
        }
        if dl == 0 {
            (da, dl) = dst.next_run(left).map_err(|()| Fault::Dst)?;
        }
        let want = sl.min(dl);
        let s = sw.slice(sa, want).ok_or(Fault::Src)?;
        let d = dw.slice(da, want).ok_or(Fault::Dst)?;
        let n = s.len().min(d.len());
        s.copy_to_volatile_slice(d);
        let n = n as u64;
        sa += n;
        sl -= n;
        da += n;
        dl -= n;
        left -= n;
    }
    Ok(())
}

/// Writes `buf` at the cursor.
pub(crate) fn write_bytes(mem: &GuestMemoryMmap, dst: &mut Cursor<'_>, buf: &[u8]) -> bool {
    let mut done = 0usize;
    while done < buf.len() {
        let Ok((gpa, n)) = dst.next_run((buf.len() - done) as u64) else {
            return false;
        };
        let (mut gpa, mut n) = (gpa, n);
        while n > 0 {
            let Some(s) = slice_at(mem, gpa, n) else {
                return false;
            };
            let k = s.len();
            s.copy_from(&buf[done..done + k]);
            done += k;
            gpa += k as u64;
            n -= k as u64;
        }
    }
    true
}

/// Runs `f` on the 8-byte aligned atomic at `gpa`; `None` when it is not in guest memory or not
/// aligned.
pub(crate) fn atomic_at(
    mem: &GuestMemoryMmap,
    gpa: u64,
    f: impl FnOnce(&AtomicU64) -> u64,
) -> Option<u64> {
    let s = slice_at(mem, gpa, 8)?;
    if s.len() != 8 {
        return None;
    }
    let a = s.get_atomic_ref::<AtomicU64>(0).ok()?;
    Some(f(a))
}

/// The single guest-physical address of an 8-byte remote atomic target in `segs`.
pub(crate) fn atomic_target(segs: &Segs) -> Option<u64> {
    let mut c = segs.cursor();
    let (gpa, n) = c.next_run(8).ok()?;
    (n == 8).then_some(gpa)
}

#[cfg(test)]
mod tests {
    use super::{copy, Fault, Mr, Segs, Window};
    use crate::{Access, MrKind, PdId};
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const K: u64 = 1024;

    /// Two adjacent regions [0, 64K) and [64K, 128K), a hole, then [256K, 320K).
    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 64 * K as usize),
            (GuestAddress(64 * K), 64 * K as usize),
            (GuestAddress(256 * K), 64 * K as usize),
        ])
        .unwrap()
    }

    fn dma(addr: u64, len: u64) -> Segs {
        let mr = Arc::new(Mr {
            pd: PdId(1),
            access: Access::LOCAL_WRITE,
            kind: MrKind::Dma,
        });
        let mut s = Segs::new();
        assert!(s.push(mr, addr, len));
        s
    }

    fn user(pages: &[u64], len: u64) -> Segs {
        let mr = Arc::new(Mr {
            pd: PdId(1),
            access: Access::LOCAL_WRITE,
            kind: MrKind::User {
                iova: 0x7f00_0000_0000,
                length: len,
                pages: pages.iter().map(|&p| GuestAddress(p)).collect(),
            },
        });
        let mut s = Segs::new();
        assert!(s.push(mr, 0x7f00_0000_0000, len));
        s
    }

    #[test]
    fn copies_across_regions_and_scattered_pages_byte_for_byte() {
        let mem = memory();
        let data: Vec<u8> = (0..32 * K).map(|i| (i * 7 + i / 4096) as u8).collect();
        // Source straddles the boundary of the two adjacent regions.
        mem.write_slice(&data, GuestAddress(48 * K)).unwrap();
        // Destination: eight pages out of order, in the first and the third region.
        let pages = [
            260 * K,
            4 * K,
            300 * K,
            8 * K,
            256 * K,
            16 * K,
            312 * K,
            12 * K,
        ];
        let (src, dst) = (dma(48 * K, 32 * K), user(&pages, 32 * K));
        copy(
            &mut Window::new(&mem),
            &mut src.cursor(),
            &mut Window::new(&mem),
            &mut dst.cursor(),
            32 * K,
        )
        .unwrap();
        for (i, &p) in pages.iter().enumerate() {
            let mut got = vec![0u8; 4096];
            mem.read_slice(&mut got, GuestAddress(p)).unwrap();
            assert!(got == data[i * 4096..(i + 1) * 4096], "page {i}");
        }
    }

    #[test]
    fn a_run_into_a_hole_faults_on_the_side_that_has_it() {
        let mem = memory();
        // [120K, 136K) crosses from the second region into the hole at 128K.
        let err = copy(
            &mut Window::new(&mem),
            &mut dma(120 * K, 16 * K).cursor(),
            &mut Window::new(&mem),
            &mut dma(256 * K, 16 * K).cursor(),
            16 * K,
        );
        assert_eq!(err, Err(Fault::Src));
        let err = copy(
            &mut Window::new(&mem),
            &mut dma(0, 16 * K).cursor(),
            &mut Window::new(&mem),
            &mut dma(316 * K, 16 * K).cursor(),
            16 * K,
        );
        assert_eq!(err, Err(Fault::Dst));
        // A page list entry in the hole.
        let err = copy(
            &mut Window::new(&mem),
            &mut dma(0, 8 * K).cursor(),
            &mut Window::new(&mem),
            &mut user(&[4 * K, 200 * K], 8 * K).cursor(),
            8 * K,
        );
        assert_eq!(err, Err(Fault::Dst));
    }
}
