//! The vfio-user server's per-client `ServerBackend` (`pvrdma_vfio_user::Connection`) driven
//! directly with fuzz-chosen region reads/writes, DMA_MAP (with a memfd, or without an fd),
//! DMA_UNMAP, SET_IRQS (with eventfds), DEVICE_RESET, and writes to the client's RAM.
//! The device runs on the fuzzer's thread (`Connection::new_local`).
//! Invariants: no panic, every message is answered, the device still answers VERSION.
#![no_main]

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;

use libfuzzer_sys::fuzz_target;
use pvrdma_dev::regs::offset;
use pvrdma_fuzz::{local_connection, small_cfg, Cursor};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, ServerBackend};

fn memfd(len: u64) -> File {
    // SAFETY: a fresh fd from memfd_create is owned by nobody else; -1 is checked.
    unsafe {
        let fd = libc::memfd_create(c"pvrdma-fuzz".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0, "memfd_create");
        let f = File::from_raw_fd(fd);
        f.set_len(len).expect("ftruncate memfd");
        f
    }
}

fn eventfd() -> File {
    // SAFETY: as for memfd.
    unsafe {
        let fd = libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK);
        assert!(fd >= 0, "eventfd");
        File::from_raw_fd(fd)
    }
}

fn region_offset(c: &mut Cursor) -> u64 {
    match c.u8() % 4 {
        0 => c.u64(),
        1 => u64::from(c.u8()),
        _ => u64::from(c.u16()),
    }
}

fuzz_target!(|data: &[u8]| {
    let cfg = small_cfg();
    let mut conn = local_connection();
    let mut rams: Vec<File> = Vec::new();
    let mut c = Cursor::new(data);
    let mut ops = 0;
    while !c.is_empty() && ops < 48 {
        ops += 1;
        match c.u8() % 7 {
            0 => {
                let index = u32::from(c.u8() % 12);
                let off = region_offset(&mut c);
                let len = usize::from(c.u16() % 300);
                let mut buf = vec![0u8; len];
                conn.region_read(index, off, &mut buf)
                    .expect("read answered");
            }
            1 => {
                let index = u32::from(c.u8() % 12);
                let off = region_offset(&mut c);
                let len = usize::from(c.u8() % 17);
                let mut buf = vec![0u8; len];
                let b = c.bytes(len);
                buf[..b.len()].copy_from_slice(b);
                conn.region_write(index, off, &buf).expect("write answered");
            }
            2 => {
                let flags = DmaMapFlags::from_bits_retain(c.u32() & 0xf);
                let iova = match c.u8() % 4 {
                    0 => c.u64(),
                    _ => u64::from(c.u16()) << 12,
                };
                let pages = u64::from(c.u8() % 64) + 1;
                let (size, file_off) = match c.u8() % 4 {
                    0 => (c.u64(), c.u64()),
                    1 => (pages * 4096, u64::from(c.u8()) << 12),
                    _ => (pages * 4096, 0),
                };
                let fd = if c.u8() % 4 != 0 && rams.len() < 4 {
                    let f = memfd(pages * 4096);
                    let server = f.try_clone().expect("dup memfd");
                    rams.push(f);
                    Some(server)
                } else {
                    None
                };
                let _ = conn.dma_map(flags, file_off, iova, size, fd);
            }
            3 => {
                let flags = DmaUnmapFlags::from_bits_retain(c.u32() & 0x3);
                let iova = match c.u8() % 4 {
                    0 => c.u64(),
                    _ => u64::from(c.u16()) << 12,
                };
                let size = match c.u8() % 4 {
                    0 => c.u64(),
                    _ => (u64::from(c.u8()) + 1) * 4096,
                };
                let _ = conn.dma_unmap(flags, iova, size);
            }
            4 => {
                let index = u32::from(c.u8() % 6);
                let flags = match c.u8() % 6 {
                    0 => c.u32(),
                    1 => 0x1 | 0x20, // DATA_NONE | TRIGGER
                    2 => 0x4 | 0x20, // DATA_EVENTFD | TRIGGER
                    3 => 0x1 | 0x8,  // DATA_NONE | MASK
                    4 => 0x1 | 0x10, // DATA_NONE | UNMASK
                    _ => 0x4 | 0x20,
                };
                let start = u32::from(c.u8() % 5);
                let count = match c.u8() % 8 {
                    0 => c.u32(),
                    b => u32::from(b % 5),
                };
                let fds = (0..c.u8() % 4).map(|_| eventfd()).collect();
                conn.set_irqs(index, flags, start, count, fds)
                    .expect("SET_IRQS answered");
            }
            5 => conn.reset().expect("reset answered"),
            _ => {
                let i = usize::from(c.u8());
                let off = u64::from(c.u32() % (64 * 4096));
                let len = usize::from(c.u8());
                let bytes = c.bytes(len);
                if let Some(f) = rams.get(i % rams.len().max(1)) {
                    let _ = f.write_at(bytes, off);
                }
            }
        }
    }
    let mut v = [0u8; 4];
    conn.region_read(1, offset::VERSION, &mut v)
        .expect("read answered");
    assert_eq!(
        u32::from_le_bytes(v),
        cfg.version,
        "device still answers VERSION"
    );
    conn.shutdown();
});
