//! Guest-side memory: a page allocator over guest RAM and page directories built the way
//! `pvrdma_page_dir_init` builds them.

use std::sync::Mutex;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Page size of the guest.
pub const PAGE: u64 = 4096;

/// Hands out zeroed 4 KiB guest pages from a range of guest RAM.
#[derive(Debug)]
pub struct PageAlloc {
    inner: Mutex<AllocInner>,
}

#[derive(Debug)]
struct AllocInner {
    next: u64,
    end: u64,
    free: Vec<u64>,
    /// Simple LCG so "scattered" allocations are reproducible.
    seed: u64,
}

impl PageAlloc {
    /// Allocates from `[start, end)`.
    pub fn new(start: u64, end: u64) -> PageAlloc {
        PageAlloc {
            inner: Mutex::new(AllocInner {
                next: start.next_multiple_of(PAGE),
                end,
                free: Vec::new(),
                seed: 0x2545_f491_4f6c_dd1d,
            }),
        }
    }

    /// One zeroed page.
    pub fn page(&self, mem: &GuestMemoryMmap) -> GuestAddress {
        let a = {
            let mut g = self.inner.lock().expect("allocator lock");
            match g.free.pop() {
                Some(a) => a,
                None => {
                    let a = g.next;
                    assert!(a + PAGE <= g.end, "harness guest RAM exhausted");
                    g.next += PAGE;
                    a
                }
            }
        };
        let addr = GuestAddress(a);
        mem.write_slice(&[0u8; PAGE as usize], addr)
            .expect("zero page");
        addr
    }

    /// `n` physically contiguous zeroed pages.
    pub fn contiguous(&self, mem: &GuestMemoryMmap, n: u64) -> GuestAddress {
        let a = {
            let mut g = self.inner.lock().expect("allocator lock");
            let a = g.next;
            assert!(a + n * PAGE <= g.end, "harness guest RAM exhausted");
            g.next += n * PAGE;
            a
        };
        let zero = vec![0u8; PAGE as usize];
        for i in 0..n {
            mem.write_slice(&zero, GuestAddress(a + i * PAGE))
                .expect("zero page");
        }
        GuestAddress(a)
    }

    /// `n` zeroed pages in a scattered, non-contiguous order (as user memory usually is).
    pub fn scattered(&self, mem: &GuestMemoryMmap, n: usize) -> Vec<GuestAddress> {
        let mut pages: Vec<GuestAddress> = (0..n).map(|_| self.page(mem)).collect();
        let mut g = self.inner.lock().expect("allocator lock");
        for i in (1..pages.len()).rev() {
            g.seed = g
                .seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let j = (g.seed >> 33) as usize % (i + 1);
            pages.swap(i, j);
        }
        pages
    }

    /// Returns pages for reuse.
    pub fn free(&self, pages: &[GuestAddress]) {
        let mut g = self.inner.lock().expect("allocator lock");
        g.free.extend(pages.iter().map(|a| a.0));
    }
}

/// A page directory in guest memory listing `pages`.
#[derive(Debug, Clone)]
pub struct GuestPdir {
    /// The directory page (what commands carry as `pdir_dma`).
    pub dir: GuestAddress,
    /// Table pages.
    pub tables: Vec<GuestAddress>,
    /// The pages, in order.
    pub pages: Vec<GuestAddress>,
}

impl GuestPdir {
    /// Builds the directory and tables for `pages` (at most 512×512).
    pub fn build(alloc: &PageAlloc, mem: &GuestMemoryMmap, pages: Vec<GuestAddress>) -> GuestPdir {
        assert!(pages.len() <= 512 * 512);
        let dir = alloc.page(mem);
        let ntables = pages.len().div_ceil(512).max(1);
        let mut tables = Vec::with_capacity(ntables);
        for t in 0..ntables {
            let tp = alloc.page(mem);
            mem.write_obj(tp.0, dir.unchecked_add(8 * t as u64))
                .expect("dir entry");
            for (i, p) in pages.iter().skip(t * 512).take(512).enumerate() {
                mem.write_obj(p.0, tp.unchecked_add(8 * i as u64))
                    .expect("table entry");
            }
            tables.push(tp);
        }
        GuestPdir { dir, tables, pages }
    }

    /// Guest address of byte `off` of the listed pages.
    pub fn addr(&self, off: u64) -> GuestAddress {
        self.pages[(off / PAGE) as usize].unchecked_add(off % PAGE)
    }

    /// Reads `buf.len()` bytes at `off` across pages.
    pub fn read(&self, mem: &GuestMemoryMmap, mut off: u64, buf: &mut [u8]) {
        let mut done = 0;
        while done < buf.len() {
            let in_page = ((PAGE - off % PAGE) as usize).min(buf.len() - done);
            mem.read_slice(&mut buf[done..done + in_page], self.addr(off))
                .expect("guest read");
            done += in_page;
            off += in_page as u64;
        }
    }

    /// Writes `buf` at `off` across pages.
    pub fn write(&self, mem: &GuestMemoryMmap, mut off: u64, buf: &[u8]) {
        let mut done = 0;
        while done < buf.len() {
            let in_page = ((PAGE - off % PAGE) as usize).min(buf.len() - done);
            mem.write_slice(&buf[done..done + in_page], self.addr(off))
                .expect("guest write");
            done += in_page;
            off += in_page as u64;
        }
    }

    /// Releases the pages, tables and directory.
    pub fn free(self, alloc: &PageAlloc) {
        alloc.free(&self.pages);
        alloc.free(&self.tables);
        alloc.free(&[self.dir]);
    }

    /// Whether guest memory contains every page (sanity for tests).
    pub fn in_memory(&self, mem: &GuestMemoryMmap) -> bool {
        self.pages.iter().all(|p| mem.address_in_range(*p))
    }
}
