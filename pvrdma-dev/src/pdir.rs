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
mod tests;
