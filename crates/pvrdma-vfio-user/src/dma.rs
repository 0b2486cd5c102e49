//! Guest memory from DMA_MAP / DMA_UNMAP.
//!
//! Maps that carry a file descriptor are mmapped (MAP_SHARED, at the fd offset) and inserted at
//! their iova into the `GuestMemoryAtomic<GuestMemoryMmap>` the device shares. Maps without an fd
//! (QEMU sends them for ROM, VGA and PAM ranges while firmware boots) and read-only maps are
//! recorded but not reachable by the device. Overlapping maps are refused. An unmap removes every
//! map inside its range, then waits until no work of the device still uses it: the device's
//! workers and main loop reach memory through short-lived `GuestMemoryAtomic` snapshots, each of
//! which holds the regions it saw, so the unmap is answered only after the last snapshot that can
//! see the range is gone (at most [`UNMAP_DRAIN_TIMEOUT`]; later accesses to the range miss and
//! complete in error).

use std::fs::File;
use std::io;
use std::sync::Arc;

use rdma_backend::GuestMem;
use vfio_user::{DmaMapFlags, DmaUnmapFlags};
use vm_memory::{
    FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};

/// Most maps one client may hold; QEMU uses a few dozen while firmware boots. The cap bounds the
/// server's bookkeeping against a client that never unmaps.
pub const MAX_DMA_MAPS: usize = 4096;

/// Longest an unmap waits for in-flight work to drop the range. A transfer holds a snapshot only
/// while it copies (milliseconds even for 16 MiB); the bound keeps a stuck worker from hanging the
/// protocol.
pub const UNMAP_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Map {
    iova: u64,
    size: u64,
    /// Inserted into guest memory (had a usable fd).
    mapped: bool,
}

impl Map {
    fn end(&self) -> u64 {
        self.iova + self.size
    }
}

/// The DMA maps of one connection.
#[derive(Debug)]
pub struct DmaMaps {
    mem: GuestMem,
    maps: Vec<Map>,
}

/// The error a bad DMA request gets (the client learns it from the reply; a client can send such
/// requests at will, so it is no warning here).
fn einval(msg: String) -> io::Error {
    log::debug!("{msg}");
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl DmaMaps {
    /// Maps into `mem` (which the device also holds).
    pub fn new(mem: GuestMem) -> DmaMaps {
        DmaMaps {
            mem,
            maps: Vec::new(),
        }
    }

    /// Ranges currently recorded: (iova, size, reachable by the device).
    pub fn ranges(&self) -> Vec<(u64, u64, bool)> {
        self.maps
            .iter()
            .map(|m| (m.iova, m.size, m.mapped))
            .collect()
    }

    /// DMA_MAP.
    pub fn map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        iova: u64,
        size: u64,
        fd: Option<File>,
    ) -> io::Result<()> {
        let end = iova.checked_add(size).filter(|_| size > 0).ok_or_else(|| {
            einval(format!(
                "DMA_MAP of {size:#x} bytes at {iova:#x}: bad range"
            ))
        })?;
        if let Some(o) = self.maps.iter().find(|m| m.iova < end && iova < m.end()) {
            return Err(einval(format!(
                "DMA_MAP {iova:#x}+{size:#x} overlaps {:#x}+{:#x}: refused",
                o.iova, o.size
            )));
        }
        if self.maps.len() >= MAX_DMA_MAPS {
            return Err(einval(format!(
                "more than {MAX_DMA_MAPS} DMA maps: refused"
            )));
        }
        let writable = flags.contains(DmaMapFlags::READ_WRITE);
        let mapped = match fd {
            None => {
                log::debug!("DMA_MAP {iova:#x}+{size:#x} without fd: recorded, not reachable");
                false
            }
            Some(_) if !writable => {
                log::debug!("DMA_MAP {iova:#x}+{size:#x} is not read-write: recorded, not mapped");
                false
            }
            Some(file) => {
                let len = usize::try_from(size)
                    .map_err(|_| einval(format!("DMA_MAP of {size:#x} bytes: too large")))?;
                // A mapping past the end of its file would fault (SIGBUS) on the first access
                // to that part, on whichever device thread touched it: refuse it here. (A
                // client that shrinks the file after mapping it is outside the trust model;
                // the VMM is trusted, docs/security.md.) Only regular files have a length to
                // check (memfd, shm, hugetlbfs).
                let meta = file.metadata()?;
                if meta.is_file() && offset.checked_add(size).is_none_or(|e| e > meta.len()) {
                    return Err(einval(format!(
                        "DMA_MAP {iova:#x}+{size:#x} at fd offset {offset:#x}: past the end of \
                         its file ({:#x} bytes): refused",
                        meta.len()
                    )));
                }
                let region = MmapRegion::<()>::from_file(FileOffset::new(file, offset), len)
                    .map_err(|e| einval(format!("DMA_MAP {iova:#x}+{size:#x}: mmap: {e}")))?;
                let region = GuestRegionMmap::new(region, GuestAddress(iova)).ok_or_else(|| {
                    einval(format!("DMA_MAP {iova:#x}+{size:#x}: bad guest region"))
                })?;
                let cur = self.mem.memory();
                let new = cur
                    .insert_region(Arc::new(region))
                    .map_err(|e| einval(format!("DMA_MAP {iova:#x}+{size:#x}: {e}")))?;
                self.replace(new);
                log::debug!("DMA_MAP {iova:#x}+{size:#x} at fd offset {offset:#x}: mapped");
                true
            }
        };
        self.maps.push(Map { iova, size, mapped });
        Ok(())
    }

    /// DMA_UNMAP: removes every map inside the range (all of them with UNMAP_ALL). A map only
    /// partly inside is refused (VFIO never splits a mapping); an empty range is answered.
    pub fn unmap(&mut self, flags: DmaUnmapFlags, iova: u64, size: u64) -> io::Result<()> {
        let end = if flags.contains(DmaUnmapFlags::UNMAP_ALL) {
            u64::MAX
        } else {
            iova.saturating_add(size)
        };
        let start = if flags.contains(DmaUnmapFlags::UNMAP_ALL) {
            0
        } else {
            iova
        };
        if let Some(p) = self
            .maps
            .iter()
            .find(|m| m.iova < end && start < m.end() && !(start <= m.iova && m.end() <= end))
        {
            return Err(einval(format!(
                "DMA_UNMAP {iova:#x}+{size:#x} splits the map {:#x}+{:#x}: refused",
                p.iova, p.size
            )));
        }
        let (gone, keep): (Vec<Map>, Vec<Map>) = self
            .maps
            .iter()
            .partition(|m| start <= m.iova && m.end() <= end);
        if gone.is_empty() {
            log::debug!("DMA_UNMAP {iova:#x}+{size:#x}: nothing mapped there");
        }
        self.maps = keep;
        let mut mem = (*self.mem.memory()).clone();
        let mut removed = Vec::new();
        for m in gone.iter().filter(|m| m.mapped) {
            match mem.remove_region(GuestAddress(m.iova), m.size) {
                Ok((new, region)) => {
                    mem = new;
                    removed.push(region);
                }
                Err(e) => log::warn!("DMA_UNMAP {:#x}+{:#x}: {e}", m.iova, m.size),
            }
        }
        if !removed.is_empty() {
            self.replace(mem);
            wait_unused(&removed, UNMAP_DRAIN_TIMEOUT);
        }
        log::debug!("DMA_UNMAP {iova:#x}+{size:#x}: {} maps removed", gone.len());
        Ok(())
    }

    fn replace(&self, new: GuestMemoryMmap) {
        // Our own `memory()` guard above is gone by now; only the device's may remain.
        match self.mem.lock() {
            Ok(g) => g.replace(new),
            Err(e) => e.into_inner().replace(new),
        }
    }
}

/// Waits until nobody but us holds `regions` (every snapshot that could reach them is dropped).
fn wait_unused(regions: &[Arc<GuestRegionMmap>], timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    let mut pause = std::time::Duration::from_micros(20);
    loop {
        if regions.iter().all(|r| Arc::strong_count(r) == 1) {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            log::warn!("DMA_UNMAP: in-flight work still holds the range after {timeout:?}");
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    fn shm(len: u64) -> File {
        let f = tempfile_in_dev_shm();
        f.set_len(len).unwrap();
        f
    }

    fn tempfile_in_dev_shm() -> File {
        let dir = std::env::temp_dir();
        let p = dir.join(format!(
            "pvrdma-dma-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        std::fs::remove_file(&p).unwrap();
        f
    }

    #[test]
    fn map_unmap_and_refusals() {
        let mem = GuestMem::new(GuestMemoryMmap::new());
        let mut d = DmaMaps::new(mem.clone());
        let f = shm(0x20000);
        let rw = DmaMapFlags::READ_WRITE;
        d.map(rw, 0x10000, 0x100000, 0x10000, Some(f.try_clone().unwrap()))
            .unwrap();
        // The device sees the file at the offset.
        mem.memory()
            .write_obj(0xabcdu32, GuestAddress(0x100004))
            .unwrap();
        let mut b = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 0x10004).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xabcd);
        // Past the end of the file (0x20000 bytes): refused, nothing mapped or recorded.
        let before = mem.memory().num_regions();
        assert!(d
            .map(rw, 0x18000, 0x200000, 0x10000, Some(f.try_clone().unwrap()))
            .is_err());
        assert!(d
            .map(
                rw,
                u64::MAX - 0xfff,
                0x200000,
                0x1000,
                Some(f.try_clone().unwrap())
            )
            .is_err());
        assert_eq!(mem.memory().num_regions(), before);
        d.map(rw, 0x10000, 0x200000, 0x10000, Some(f.try_clone().unwrap()))
            .unwrap();
        d.unmap(DmaUnmapFlags::empty(), 0x200000, 0x10000).unwrap();
        // No fd: recorded, skipped.
        d.map(rw, 0, 0xc0000, 0x20000, None).unwrap();
        assert_eq!(mem.memory().num_regions(), 1);
        // Overlaps refused.
        assert!(d.map(rw, 0, 0x108000, 0x1000, None).is_err());
        assert!(d.map(rw, 0, 0xd0000, 0x1000, None).is_err());
        // Splitting refused; whole unmap works, and again is a no-op.
        assert!(d.unmap(DmaUnmapFlags::empty(), 0x100000, 0x1000).is_err());
        d.unmap(DmaUnmapFlags::empty(), 0x100000, 0x10000).unwrap();
        assert_eq!(mem.memory().num_regions(), 0);
        d.unmap(DmaUnmapFlags::empty(), 0x100000, 0x10000).unwrap();
        d.unmap(DmaUnmapFlags::empty(), 0xc0000, 0x20000).unwrap();
        assert!(d.ranges().is_empty());
        // Remap, then unmap all.
        d.map(rw, 0, 0x100000, 0x10000, Some(f)).unwrap();
        d.unmap(DmaUnmapFlags::UNMAP_ALL, 0, 0).unwrap();
        assert_eq!(mem.memory().num_regions(), 0);
    }

    #[test]
    fn unmap_waits_for_in_flight_work_to_drop_the_range() {
        let mem = GuestMem::new(GuestMemoryMmap::new());
        let mut d = DmaMaps::new(mem.clone());
        d.map(
            DmaMapFlags::READ_WRITE,
            0,
            0x100000,
            0x10000,
            Some(shm(0x10000)),
        )
        .unwrap();
        // A "transfer" holds a snapshot for 200 ms.
        let snap = mem.memory();
        let (tx, rx) = std::sync::mpsc::channel();
        let holder = std::thread::spawn(move || {
            let s = snap;
            tx.send(()).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(200));
            s.write_obj(1u32, GuestAddress(0x100000)).unwrap();
            drop(s);
        });
        rx.recv().unwrap();
        let t0 = std::time::Instant::now();
        d.unmap(DmaUnmapFlags::empty(), 0x100000, 0x10000).unwrap();
        assert!(
            t0.elapsed() >= std::time::Duration::from_millis(150),
            "unmap answered while the range was still in use"
        );
        holder.join().unwrap();
        assert_eq!(mem.memory().num_regions(), 0);
        assert!(mem
            .memory()
            .read_obj::<u32>(GuestAddress(0x100000))
            .is_err());
    }
}
