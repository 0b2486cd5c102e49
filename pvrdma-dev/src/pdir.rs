//! Two-level page directories: how the device finds guest memory (spec `device-abi.md` §3,
//! `qemu-reference.md` §2.3).
//!
//! `pdir_dma` points at one 4 KiB *directory* of `u64` DMA addresses of *tables*; each table is
//! 4 KiB of `u64` addresses of 4 KiB *pages*. Page `i` lives in `table[(i >> 9) & 0x1ff]`,
//! entry `[i & 0x1ff]`. There is only ever one directory, so a page directory holds at most
//! 512 × 512 pages (1 GiB).
//!
//! [`PageDir::load`] walks the whole structure once, validates every entry and keeps a snapshot
//! of the page addresses; later changes to the guest's tables are not seen (the driver never
//! changes them while the object exists). Every later access still goes through `vm-memory` and
//! reports an error, never panics, if the VMM has unmapped the memory since.
//!
//! Hazards this module closes (`qemu-reference.md` §6.3): a page count of 0 or one that walks
//! past the directory page (CVE-2021-3607, CVE-2023-1544, hazard 6), page-table entries equal to
//! 0 (hazard 5, CVE-2021-3608), and offset arithmetic overflow.

use std::fmt;
use std::sync::Arc;

use vm_memory::bitmap::MS;
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError,
    Permissions, VolatileSlice,
};

/// Size of every directory, table and data page.
pub const PAGE_SIZE: u64 = 4096;

/// Number of `u64` entries in one directory or table page.
const ENTRIES_PER_PAGE: u32 = (PAGE_SIZE / 8) as u32;

/// Most pages one page directory can describe: one directory page → 512 tables × 512 pages
/// (1 GiB). This is the driver's `PVRDMA_PAGE_DIR_MAX_PAGES`; it also bounds the per-directory
/// allocation the guest can make the device do (262144 addresses = 2 MiB).
pub const MAX_PAGES: u32 = ENTRIES_PER_PAGE * ENTRIES_PER_PAGE;

/// Which level of the page directory an error refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// The directory page itself (`pdir_dma`).
    Directory,
    /// A page table (an entry of the directory).
    Table,
    /// A data page (an entry of a page table).
    Page,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Directory => "directory",
            Level::Table => "page table",
            Level::Page => "data page",
        })
    }
}

/// Errors from loading or accessing a page directory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The page count is 0 or above [`MAX_PAGES`].
    #[error("page count {0} is outside 1..={MAX_PAGES}")]
    BadCount(u32),
    /// A directory address or table/page entry is zero.
    #[error("{level} address {index} is zero")]
    NullEntry {
        /// Level of the zero address.
        level: Level,
        /// Table index (for tables) or page index (for pages); 0 for the directory.
        index: u32,
    },
    /// An address is not aligned to [`PAGE_SIZE`].
    #[error("{level} address {addr:#x} is not page-aligned")]
    Unaligned {
        /// Level of the misaligned address.
        level: Level,
        /// The guest-supplied address.
        addr: u64,
    },
    /// A whole page at this address is not inside guest memory.
    #[error("{level} at {addr:#x} is not a whole page inside guest memory")]
    OutOfGuestMemory {
        /// Level of the address.
        level: Level,
        /// The guest-supplied address.
        addr: u64,
    },
    /// An access falls (partly) outside the concatenated pages.
    #[error("access of {len} bytes at offset {offset:#x} is outside the page directory")]
    OutOfRange {
        /// Byte offset of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
    },
    /// Guest memory refused the access (for example it was unmapped after load).
    #[error("guest memory access failed")]
    Memory(#[from] GuestMemoryError),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// A validated snapshot of a guest page directory: the address of every page, in order.
#[derive(Debug, Clone)]
pub struct PageDir {
    pages: Arc<[GuestAddress]>,
}

/// Checks that `addr` is non-zero, page-aligned and a whole page inside guest memory.
fn check_page<M: GuestMemory + ?Sized>(mem: &M, level: Level, index: u32, addr: u64) -> Result<()> {
    if addr == 0 {
        return Err(Error::NullEntry { level, index });
    }
    if addr % PAGE_SIZE != 0 {
        return Err(Error::Unaligned { level, addr });
    }
    if !mem.check_range(GuestAddress(addr), PAGE_SIZE as usize, Permissions::Read) {
        return Err(Error::OutOfGuestMemory { level, addr });
    }
    Ok(())
}

/// Reads the first `count` (≤ 512) `u64` entries of the page at `addr` into `buf` (one
/// guest-memory read of exactly those bytes; the caller reuses `buf` for every table) and
/// returns them.
fn read_entries<'b, M: GuestMemory + ?Sized>(
    mem: &M,
    addr: u64,
    count: u32,
    buf: &'b mut [u8; PAGE_SIZE as usize],
) -> Result<impl Iterator<Item = u64> + 'b> {
    let bytes = &mut buf[..count.min(ENTRIES_PER_PAGE) as usize * 8];
    mem.read_slice(bytes, GuestAddress(addr))?;
    Ok(bytes.chunks_exact(8).map(|b| {
        let mut le = [0u8; 8];
        le.copy_from_slice(b);
        u64::from_le_bytes(le)
    }))
}

/// `len` bytes at `addr` as one volatile slice of the backing memory, when there is no IOMMU
/// layer in between (`physical_memory`) and the range lies in one region; `None` otherwise. The
/// caller then takes vm-memory's general path, which gives the same bytes and the same errors
/// but walks the regions with an iterator: a few hundred instructions per WQE or CQE on the
/// data path (measured with callgrind, the command in docs/benchmarks.md, "Where the time
/// goes").
pub(crate) fn backing_slice<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
) -> Option<VolatileSlice<'_, MS<'_, M::PhysicalMemory>>> {
    mem.physical_memory()?.get_slice(addr, len).ok()
}

/// Reads `buf` at `addr` (a piece inside one guest page).
fn read_piece<M: GuestMemory + ?Sized>(
    mem: &M,
    buf: &mut [u8],
    addr: GuestAddress,
) -> std::result::Result<(), GuestMemoryError> {
    match backing_slice(mem, addr, buf.len()) {
        Some(s) => {
            s.copy_to(buf);
            Ok(())
        }
        None => mem.read_slice(buf, addr),
    }
}

/// Writes `buf` at `addr` (a piece inside one guest page).
fn write_piece<M: GuestMemory + ?Sized>(
    mem: &M,
    buf: &[u8],
    addr: GuestAddress,
) -> std::result::Result<(), GuestMemoryError> {
    match backing_slice(mem, addr, buf.len()) {
        Some(s) => {
            s.copy_from(buf);
            Ok(())
        }
        None => mem.write_slice(buf, addr),
    }
}

impl PageDir {
    /// Walks directory → tables → pages, reading `ntables = ((npages-1)>>9)+1` tables.
    ///
    /// Validates: `npages` in `1..=MAX_PAGES`; `pdir_dma` non-zero, page-aligned and a whole page
    /// inside guest memory; every table and page entry non-zero, page-aligned and a whole 4 KiB
    /// page inside guest memory. Entries past `npages` are not read.
    pub fn load<M: GuestMemory + ?Sized>(mem: &M, pdir_dma: u64, npages: u32) -> Result<PageDir> {
        if npages == 0 || npages > MAX_PAGES {
            return Err(Error::BadCount(npages));
        }
        check_page(mem, Level::Directory, 0, pdir_dma)?;
        let ntables = ((npages - 1) >> 9) + 1; // ≤ 512 because npages ≤ MAX_PAGES
        let mut dir_buf = [0u8; PAGE_SIZE as usize];
        let mut table_buf = [0u8; PAGE_SIZE as usize];
        let dir = read_entries(mem, pdir_dma, ntables, &mut dir_buf)?;
        // Bounded by MAX_PAGES (checked above).
        let mut pages = Vec::with_capacity(npages as usize);
        for (t, table) in (0..ntables).zip(dir) {
            check_page(mem, Level::Table, t, table)?;
            let first = t * ENTRIES_PER_PAGE;
            let in_table = (npages - first).min(ENTRIES_PER_PAGE);
            let entries = read_entries(mem, table, in_table, &mut table_buf)?;
            for (j, page) in entries.enumerate() {
                check_page(mem, Level::Page, first + j as u32, page)?;
                pages.push(GuestAddress(page));
            }
        }
        Ok(PageDir {
            pages: pages.into(),
        })
    }

    /// Builds a page directory from page addresses directly (for tests and the harness).
    /// No validation is done; accesses still go through guest memory and report errors.
    pub fn from_pages(pages: Arc<[GuestAddress]>) -> PageDir {
        PageDir { pages }
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether there are no pages (only possible through [`PageDir::from_pages`]).
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Guest address of page `i`.
    pub fn page(&self, i: usize) -> Option<GuestAddress> {
        self.pages.get(i).copied()
    }

    /// All page addresses, in order.
    pub fn pages(&self) -> &Arc<[GuestAddress]> {
        &self.pages
    }

    /// Size in bytes of the concatenated pages.
    pub fn byte_len(&self) -> u64 {
        (self.pages.len() as u64).saturating_mul(PAGE_SIZE)
    }

    /// Guest address of byte `offset` of the concatenated pages.
    pub fn translate(&self, offset: u64) -> Option<GuestAddress> {
        let idx = usize::try_from(offset / PAGE_SIZE).ok()?;
        self.pages.get(idx)?.checked_add(offset % PAGE_SIZE)
    }

    /// Checks that `[offset, offset + len)` lies inside the concatenated pages.
    fn check_span(&self, offset: u64, len: usize) -> Result<()> {
        let len = len as u64;
        match offset.checked_add(len) {
            Some(end) if end <= self.byte_len() => Ok(()),
            _ => Err(Error::OutOfRange { offset, len }),
        }
    }

    /// Calls `f(chunk_start_in_buf, chunk_len, guest_addr)` for each page-contained piece of
    /// `[offset, offset + len)`. The span must have been checked.
    fn for_each_chunk(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(usize, usize, GuestAddress) -> Result<()>,
    ) -> Result<()> {
        let mut done = 0usize;
        while done < len {
            let off = offset + done as u64;
            let in_page = (PAGE_SIZE - off % PAGE_SIZE) as usize;
            let n = in_page.min(len - done);
            let addr = self.translate(off).ok_or(Error::OutOfRange {
                offset,
                len: len as u64,
            })?;
            f(done, n, addr)?;
            done += n;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes starting at byte `offset` of the concatenated pages, crossing
    /// pages as needed.
    pub fn read_at<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        self.check_span(offset, buf.len())?;
        self.for_each_chunk(offset, buf.len(), |start, n, addr| {
            read_piece(mem, &mut buf[start..start + n], addr)?;
            Ok(())
        })
    }

    /// Writes `buf` starting at byte `offset` of the concatenated pages, crossing pages as needed.
    pub fn write_at<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        buf: &[u8],
    ) -> Result<()> {
        self.check_span(offset, buf.len())?;
        self.for_each_chunk(offset, buf.len(), |start, n, addr| {
            write_piece(mem, &buf[start..start + n], addr)?;
            Ok(())
        })
    }

    /// Reads a `T` at byte `offset` of the concatenated pages (it may straddle pages).
    pub fn read_obj<T: ByteValued, M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
    ) -> Result<T> {
        let mut val = T::zeroed();
        self.read_at(mem, offset, val.as_mut_slice())?;
        Ok(val)
    }

    /// Writes `val` at byte `offset` of the concatenated pages (it may straddle pages).
    pub fn write_obj<T: ByteValued, M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        val: &T,
    ) -> Result<()> {
        self.write_at(mem, offset, val.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const MEM_SIZE: usize = 16 << 20;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    /// Lays out a directory at 0x1000, tables from 0x2000, data pages from `data`.
    /// Returns the page addresses.
    fn build(m: &GuestMemoryMmap, npages: u32, data: u64) -> Vec<u64> {
        let ntables = ((npages - 1) >> 9) + 1;
        let pages: Vec<u64> = (0..npages as u64).map(|i| data + i * PAGE_SIZE).collect();
        for t in 0..ntables as u64 {
            let table = 0x2000 + t * PAGE_SIZE;
            m.write_obj(table, GuestAddress(0x1000 + t * 8)).unwrap();
            for j in 0..512u64 {
                let i = t * 512 + j;
                if let Some(p) = pages.get(i as usize) {
                    m.write_obj(*p, GuestAddress(table + j * 8)).unwrap();
                }
            }
        }
        pages
    }

    #[test]
    fn load_small_and_translate() {
        let m = mem();
        let pages = build(&m, 4, 0x10_0000);
        let pd = PageDir::load(&m, 0x1000, 4).unwrap();
        assert_eq!(pd.len(), 4);
        assert!(!pd.is_empty());
        for (i, p) in pages.iter().enumerate() {
            assert_eq!(pd.page(i), Some(GuestAddress(*p)));
        }
        assert_eq!(pd.page(4), None);
        assert_eq!(pd.translate(0x1234), Some(GuestAddress(0x10_1234)));
        assert_eq!(pd.translate(4 * PAGE_SIZE), None);
        assert_eq!(pd.translate(u64::MAX), None);
    }

    #[test]
    fn load_multi_table() {
        let m = mem();
        // 513 pages need 2 tables; the last page comes from the second table.
        build(&m, 513, 0x40_0000);
        let pd = PageDir::load(&m, 0x1000, 513).unwrap();
        assert_eq!(pd.len(), 513);
        assert_eq!(
            pd.page(512),
            Some(GuestAddress(0x40_0000 + 512 * PAGE_SIZE))
        );
    }

    #[test]
    fn bad_counts() {
        let m = mem();
        build(&m, 1, 0x10_0000);
        assert!(matches!(
            PageDir::load(&m, 0x1000, 0),
            Err(Error::BadCount(0))
        ));
        assert!(matches!(
            PageDir::load(&m, 0x1000, MAX_PAGES + 1),
            Err(Error::BadCount(_))
        ));
        assert!(matches!(
            PageDir::load(&m, 0x1000, u32::MAX),
            Err(Error::BadCount(_))
        ));
    }

    #[test]
    fn bad_directory() {
        let m = mem();
        build(&m, 1, 0x10_0000);
        assert!(matches!(
            PageDir::load(&m, 0, 1),
            Err(Error::NullEntry {
                level: Level::Directory,
                ..
            })
        ));
        assert!(matches!(
            PageDir::load(&m, 0x1008, 1),
            Err(Error::Unaligned { .. })
        ));
        assert!(matches!(
            PageDir::load(&m, MEM_SIZE as u64, 1),
            Err(Error::OutOfGuestMemory { .. })
        ));
        assert!(matches!(
            PageDir::load(&m, !0xfffu64, 1),
            Err(Error::OutOfGuestMemory { .. })
        ));
    }

    #[test]
    fn bad_entries() {
        let m = mem();
        build(&m, 600, 0x10_0000);
        // Table 1 missing.
        m.write_obj(0u64, GuestAddress(0x1008)).unwrap();
        assert!(matches!(
            PageDir::load(&m, 0x1000, 600),
            Err(Error::NullEntry {
                level: Level::Table,
                index: 1
            })
        ));
        // Only 512 pages needs one table: the zero entry is not read.
        assert!(PageDir::load(&m, 0x1000, 512).is_ok());
        // A zero page entry.
        m.write_obj(0u64, GuestAddress(0x2000 + 7 * 8)).unwrap();
        assert!(matches!(
            PageDir::load(&m, 0x1000, 8),
            Err(Error::NullEntry {
                level: Level::Page,
                index: 7
            })
        ));
        assert!(PageDir::load(&m, 0x1000, 7).is_ok());
        // Unaligned page entry.
        m.write_obj(0x10_0010u64, GuestAddress(0x2000)).unwrap();
        assert!(matches!(
            PageDir::load(&m, 0x1000, 1),
            Err(Error::Unaligned {
                level: Level::Page,
                ..
            })
        ));
        // Page outside memory, and the last page partly outside.
        m.write_obj(MEM_SIZE as u64, GuestAddress(0x2000)).unwrap();
        assert!(matches!(
            PageDir::load(&m, 0x1000, 1),
            Err(Error::OutOfGuestMemory { .. })
        ));
        m.write_obj(!0xfffu64, GuestAddress(0x2000)).unwrap();
        assert!(matches!(
            PageDir::load(&m, 0x1000, 1),
            Err(Error::OutOfGuestMemory { .. })
        ));
        // Table pointing outside memory.
        m.write_obj(0xffff_f000u64, GuestAddress(0x1000)).unwrap();
        assert!(matches!(
            PageDir::load(&m, 0x1000, 1),
            Err(Error::OutOfGuestMemory {
                level: Level::Table,
                ..
            })
        ));
    }

    #[test]
    fn max_pages_stays_in_directory() {
        // MAX_PAGES reads exactly 512 directory entries; all zero here → the first table fails,
        // and nothing past the directory page is touched.
        let m = mem();
        assert!(matches!(
            PageDir::load(&m, 0x1000, MAX_PAGES),
            Err(Error::NullEntry {
                level: Level::Table,
                index: 0
            })
        ));
    }

    #[test]
    fn read_write_across_pages() {
        let m = mem();
        // Non-contiguous pages: page 0 at 0x30_0000, page 1 at 0x10_0000.
        let pd = PageDir::from_pages(vec![GuestAddress(0x30_0000), GuestAddress(0x10_0000)].into());
        let data: Vec<u8> = (0..100u8).collect();
        pd.write_at(&m, 4096 - 50, &data).unwrap();
        let mut a = [0u8; 50];
        m.read_slice(&mut a, GuestAddress(0x30_0000 + 4096 - 50))
            .unwrap();
        assert_eq!(&a[..], &data[..50]);
        m.read_slice(&mut a, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(&a[..], &data[50..]);
        let mut back = vec![0u8; 100];
        pd.read_at(&m, 4096 - 50, &mut back).unwrap();
        assert_eq!(back, data);

        pd.write_obj(&m, 4096 - 4, &0x1122_3344_5566_7788u64)
            .unwrap();
        assert_eq!(
            pd.read_obj::<u64, _>(&m, 4096 - 4).unwrap(),
            0x1122_3344_5566_7788
        );

        // Whole range, empty access at the end, and out of range.
        let mut all = vec![0u8; 8192];
        pd.read_at(&m, 0, &mut all).unwrap();
        pd.read_at(&m, 8192, &mut []).unwrap();
        assert!(matches!(
            pd.read_at(&m, 8190, &mut [0u8; 4]),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            pd.read_at(&m, u64::MAX, &mut [0u8; 4]),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            pd.read_obj::<u32, _>(&m, u64::MAX - 1),
            Err(Error::OutOfRange { .. })
        ));
    }

    #[test]
    fn unmapped_after_load_is_an_error() {
        let m = mem();
        build(&m, 2, 0x10_0000);
        let pd = PageDir::load(&m, 0x1000, 2).unwrap();
        // The VMM replaces guest memory with a smaller map: accesses report errors.
        let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_1000)]).unwrap();
        assert!(pd.read_obj::<u32, _>(&small, 0).is_ok());
        assert!(matches!(
            pd.read_obj::<u32, _>(&small, 4096),
            Err(Error::Memory(_))
        ));
        assert!(matches!(
            pd.write_at(&small, 4000, &[0u8; 200]),
            Err(Error::Memory(_))
        ));
        // Garbage pages from from_pages near the top of the address space never panic.
        let pd = PageDir::from_pages(vec![GuestAddress(u64::MAX - 10)].into());
        assert!(pd.translate(100).is_none());
        assert!(pd.read_at(&small, 0, &mut [0u8; 8]).is_err());
        assert!(pd.read_at(&small, 100, &mut [0u8; 8]).is_err());
    }

    #[test]
    fn a_page_split_between_two_regions_is_read_and_written_whole() {
        // Regions [0, 0x1800) and [0x1800, 0x4000): page 0x1000 lies in both, so no single slice
        // of the backing memory holds it and the general path must do the access.
        let m = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1800),
            (GuestAddress(0x1800), 0x2800),
        ])
        .unwrap();
        let pd = PageDir::from_pages(vec![GuestAddress(0x3000), GuestAddress(0x1000)].into());
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 13 + 5) as u8).collect();
        pd.write_at(&m, 4096, &data).unwrap();
        let mut back = vec![0u8; 4096];
        m.read_slice(&mut back, GuestAddress(0x1000)).unwrap();
        assert!(back == data);
        // Across the page boundary of the directory: the end of page 0 and the split page.
        let mut got = vec![0u8; 1024];
        pd.read_at(&m, 4096 - 512, &mut got).unwrap();
        let mut want = vec![0u8; 512];
        m.read_slice(&mut want, GuestAddress(0x3000 + 4096 - 512))
            .unwrap();
        want.extend_from_slice(&data[..512]);
        assert!(got == want);
        pd.write_obj(&m, 4096 + 0x7fe, &0xa5a5_5a5au32).unwrap();
        assert_eq!(
            pd.read_obj::<u32, _>(&m, 4096 + 0x7fe).unwrap(),
            0xa5a5_5a5a
        );
    }
}
