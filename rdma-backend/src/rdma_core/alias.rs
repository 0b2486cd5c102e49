//! A contiguous host view of guest pages that are scattered in the host mapping.
//!
//! A host MR covers one contiguous range of host virtual addresses, but a guest MR's pages may lie
//! anywhere in guest RAM. When guest RAM is a shared file mapping (a memfd, as with vfio-user),
//! the same pages can be mapped a second time, in the MR's order: reserve an inaccessible range of
//! the MR's size, then map each run of file-contiguous pages over it (`MAP_SHARED | MAP_FIXED`).
//! Both mappings share the file's pages, so the HCA writing through a registration of the alias
//! writes guest RAM. The alias is unmapped when dropped (after its MR is deregistered).
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr;

/// Size of a guest page (the PVRDMA page size), which must also be the host page size.
pub const PAGE: usize = 4096;

/// One guest page as a page of a file: the file and the page's offset in it.
#[derive(Debug, Clone, Copy)]
pub struct FilePage<'a> {
    /// The file backing the guest RAM region.
    pub fd: BorrowedFd<'a>,
    /// Offset of the page in the file (a multiple of [`PAGE`]).
    pub offset: u64,
}

/// A host mapping of guest pages, in a given order, at consecutive addresses.
#[derive(Debug)]
pub struct Alias {
    base: *mut c_void,
    size: usize,
}

// SAFETY: the alias is a plain range of this process's address space; nothing in it is
// thread-bound, and it is only unmapped once (on drop).
unsafe impl Send for Alias {}
// SAFETY: as above; `&Alias` only gives out the address.
unsafe impl Sync for Alias {}

impl Alias {
    /// Maps `pages` back to back. File-contiguous pages are mapped together, so a guest MR on
    /// contiguous guest-physical pages costs one mapping.
    pub fn new(pages: &[FilePage<'_>]) -> io::Result<Alias> {
        // SAFETY: sysconf has no preconditions.
        let host_page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if host_page != PAGE as libc::c_long {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("host page size {host_page} is not {PAGE}"),
            ));
        }
        if pages.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no pages"));
        }
        if pages.iter().any(|p| p.offset % PAGE as u64 != 0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "page offset not page aligned",
            ));
        }
        let size = pages
            .len()
            .checked_mul(PAGE)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "alias too large"))?;
        // SAFETY: a fresh anonymous reservation at an address the kernel chooses; it overlaps
        // nothing of ours. PROT_NONE: until a page is mapped over it, it cannot be accessed.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                size,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // From here on, drop unmaps the whole range (also on the error paths below).
        let alias = Alias { base, size };
        let mut i = 0;
        while i < pages.len() {
            let first = pages[i];
            let mut n = 1;
            while i + n < pages.len()
                && pages[i + n].fd.as_raw_fd() == first.fd.as_raw_fd()
                && Some(pages[i + n].offset) == first.offset.checked_add((n * PAGE) as u64)
            {
                n += 1;
            }
            let offset = libc::off_t::try_from(first.offset)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file offset"))?;
            let at = alias
                .base
                .cast::<u8>()
                .wrapping_add(i * PAGE)
                .cast::<c_void>();
            // SAFETY: `[at, at + n * PAGE)` lies inside the reservation this Alias owns (i + n
            // <= pages.len()), so MAP_FIXED replaces only our own PROT_NONE pages. The fd is
            // borrowed, hence open for the call; the mapping keeps its own file reference.
            let got = unsafe {
                libc::mmap(
                    at,
                    n * PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    first.fd.as_raw_fd(),
                    offset,
                )
            };
            if got == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            if got != at {
                return Err(io::Error::other("MAP_FIXED mapped elsewhere"));
            }
            i += n;
        }
        Ok(alias)
    }

    /// Start of the alias in this process.
    pub fn addr(&self) -> usize {
        self.base as usize
    }

    /// Length of the alias in bytes.
    pub fn size(&self) -> usize {
        self.size
    }
}

impl Drop for Alias {
    fn drop(&mut self) {
        // SAFETY: `[base, base + size)` is the reservation made in `new`, owned by this Alias and
        // unmapped only here. Anything registered on it was deregistered before (MR drop order).
        unsafe { libc::munmap(self.base, self.size) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;

    fn memfd(size: u64) -> File {
        crate::shm::memfd(c"alias-test", size).unwrap()
    }

    #[test]
    fn pages_appear_in_order() {
        let f = memfd(8 * PAGE as u64);
        for p in 0..8u8 {
            f.write_all_at(&[p; PAGE], u64::from(p) * PAGE as u64)
                .unwrap();
        }
        // Pages 5, 2, 3, 0: 2 and 3 coalesce into one mapping.
        let order = [5u64, 2, 3, 0];
        let pages: Vec<FilePage<'_>> = order
            .iter()
            .map(|&p| FilePage {
                fd: f.as_fd(),
                offset: p * PAGE as u64,
            })
            .collect();
        let a = Alias::new(&pages).unwrap();
        assert_eq!(a.size(), 4 * PAGE);
        for (i, &p) in order.iter().enumerate() {
            // SAFETY: the alias maps 4 readable pages.
            let b = unsafe { *(a.addr() as *const u8).add(i * PAGE + 7) };
            assert_eq!(u64::from(b), p);
        }
        // Writes through the alias reach the file.
        // SAFETY: inside the alias's second page, mapped read-write.
        unsafe { *(a.addr() as *mut u8).add(PAGE + 1) = 0xaa };
        let mut got = [0u8; 2];
        f.read_exact_at(&mut got, 2 * PAGE as u64).unwrap();
        assert_eq!(got, [2, 0xaa]);
    }

    #[test]
    fn refuses_unaligned_offsets() {
        let f = memfd(PAGE as u64);
        let p = FilePage {
            fd: f.as_fd(),
            offset: 12,
        };
        assert!(Alias::new(&[p]).is_err());
        assert!(Alias::new(&[]).is_err());
    }
}
