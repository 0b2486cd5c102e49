//! `PageDir::load` over fuzz-built guest memory (two regions with a hole), compared with a
//! straightforward model of the walk, then `read_at`/`write_at` at fuzz offsets.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvrdma_dev::pdir::{PageDir, MAX_PAGES, PAGE_SIZE};
use pvrdma_fuzz::Cursor;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

/// Low region [0, 256 KiB), hole, high region [1 MiB, 1 MiB + 64 KiB).
const LOW: u64 = 0x4_0000;
const HIGH: u64 = 0x10_0000;
const HIGH_LEN: u64 = 0x1_0000;

/// A fuzz-chosen page address: mostly pages of either region (or just past them).
fn page_addr(c: &mut Cursor) -> u64 {
    let v = c.u16();
    match v >> 14 {
        0 | 1 => u64::from(v % 72) * PAGE_SIZE,
        2 => HIGH + u64::from(v % 20) * PAGE_SIZE,
        _ => u64::from(v) << (v % 40), // anything, usually unaligned or far away
    }
}

/// The walk as the spec describes it; `None` where `load` must fail.
fn model(mem: &GuestMemoryMmap, dir: u64, npages: u32) -> Option<Vec<u64>> {
    let whole = |a: u64| {
        a != 0
            && a % PAGE_SIZE == 0
            && mem.check_range(GuestAddress(a), PAGE_SIZE as usize, Permissions::Read)
    };
    if npages == 0 || npages > MAX_PAGES || !whole(dir) {
        return None;
    }
    let mut out = Vec::new();
    for i in 0..u64::from(npages) {
        let table: u64 = mem.read_obj(GuestAddress(dir + 8 * (i / 512))).ok()?;
        if !whole(table) {
            return None;
        }
        let page: u64 = mem.read_obj(GuestAddress(table + 8 * (i % 512))).ok()?;
        if !whole(page) {
            return None;
        }
        out.push(page);
    }
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), LOW as usize),
        (GuestAddress(HIGH), HIGH_LEN as usize),
    ])
    .unwrap();
    let mut c = Cursor::new(data);
    let dir = page_addr(&mut c);
    let npages = match c.u8() {
        0 => c.u32(),
        b => u32::from(b % 40),
    };
    // Build: entries written as page addresses, raw scribbles, or whole valid tables.
    for _ in 0..c.u8() % 32 {
        match c.u8() % 3 {
            0 => {
                let at = page_addr(&mut c) + u64::from(c.u16() % 512) * 8;
                let v = page_addr(&mut c);
                let _ = mem.write_obj(v, GuestAddress(at));
            }
            1 => {
                let at = page_addr(&mut c) + u64::from(c.u16() % 4096);
                let len = usize::from(c.u8());
                let _ = mem.write_slice(c.bytes(len), GuestAddress(at));
            }
            _ => {
                let table = page_addr(&mut c);
                let first = page_addr(&mut c);
                for j in 0..512u64 {
                    let _ = mem.write_obj(first + j * PAGE_SIZE, GuestAddress(table + 8 * j));
                }
            }
        }
    }
    let expect = model(&mem, dir, npages);
    let pd = match PageDir::load(&mem, dir, npages) {
        Ok(pd) => pd,
        Err(e) => {
            assert!(expect.is_none(), "load failed ({e}) where the model walks");
            return;
        }
    };
    let expect = expect.expect("load succeeded where the model fails");
    // Allocation bounded by npages, pages exactly the model's, each a whole page in memory.
    assert_eq!(pd.len(), npages as usize);
    for (i, p) in pd.pages().iter().enumerate() {
        assert_eq!(p.0, expect[i]);
        assert!(p.0 != 0 && p.0 % PAGE_SIZE == 0);
        assert!(mem.check_range(*p, PAGE_SIZE as usize, Permissions::Read));
    }
    let len = pd.byte_len();
    assert_eq!(len, u64::from(npages) * PAGE_SIZE);
    assert!(pd.translate(len).is_none());
    for _ in 0..8 {
        let kind = c.u8();
        let off = if kind & 0x80 != 0 {
            c.u64()
        } else {
            u64::from(c.u32()) % (len + 64)
        };
        let n = usize::from(c.u16() % 9000);
        let fits = off.checked_add(n as u64).is_some_and(|e| e <= len);
        if kind & 1 == 0 {
            let mut buf = vec![0u8; n];
            let r = pd.read_at(&mem, off, &mut buf);
            assert_eq!(r.is_ok(), fits, "read of {n} at {off:#x} in {len:#x}");
            if fits {
                for (i, b) in buf.iter().enumerate().step_by(61) {
                    let a = pd.translate(off + i as u64).unwrap();
                    assert_eq!(*b, mem.read_obj::<u8>(a).unwrap());
                }
            }
        } else {
            let fill = c.u8();
            let buf: Vec<u8> = (0..n).map(|i| fill.wrapping_add(i as u8)).collect();
            let r = pd.write_at(&mem, off, &buf);
            assert_eq!(r.is_ok(), fits, "write of {n} at {off:#x} in {len:#x}");
            if fits {
                // Pages may be listed twice: the last byte written to an address wins. Only
                // bytes a whole number of pages later can share a sampled byte's address.
                for i in (0..n).step_by(13) {
                    let a = pd.translate(off + i as u64).unwrap();
                    let last = (i..n)
                        .step_by(PAGE_SIZE as usize)
                        .filter(|&j| pd.translate(off + j as u64) == Some(a))
                        .last()
                        .unwrap_or(i);
                    assert_eq!(mem.read_obj::<u8>(a).unwrap(), buf[last]);
                }
            }
        }
    }
});
