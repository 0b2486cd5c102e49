use super::*;

fn cs() -> ConfigSpace {
    ConfigSpace::new(uar_bar_size(512), (0x1af4, 0x1100))
}

fn r32(c: &ConfigSpace, off: u64) -> u32 {
    let mut b = [0u8; 4];
    c.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn w32(c: &mut ConfigSpace, off: u64, v: u32) {
    c.write(off, &v.to_le_bytes());
}

fn r8(c: &ConfigSpace, off: u64) -> u8 {
    let mut b = [0u8; 1];
    c.read(off, &mut b);
    b[0]
}

#[test]
fn identity() {
    let c = cs();
    assert_eq!(r32(&c, 0), 0x0820_15ad);
    assert_eq!(r32(&c, 8), 0x0280_0001);
    assert_eq!(r8(&c, 0x0e), 0, "header type 0, single function");
    assert_eq!(r32(&c, 0x2c), 0x1100_1af4);
    assert_eq!(r8(&c, 0x3d), 1, "INTA");
    assert_eq!(r32(&c, 0x04) >> 16 & u32::from(STATUS_CAP_LIST), 0x10);
    assert_eq!(uar_bar_size(512), 2 << 20);
    assert_eq!(uar_bar_size(0), 4096);
    assert_eq!(uar_bar_size(3), 4 * 4096);
    assert_eq!(uar_bar_size(u32::MAX), 1 << 44);
}

#[test]
fn read_only_bits_stay_read_only() {
    let mut c = cs();
    let before: Vec<u32> = (0..64).map(|i| r32(&c, i * 4)).collect();
    for i in 0..64u64 {
        w32(&mut c, i * 4, 0xffff_ffff);
    }
    let after: Vec<u32> = (0..64).map(|i| r32(&c, i * 4)).collect();
    // Dwords where something may change: command, cache line/latency, BAR0-3, interrupt
    // line, MSI-X control.
    let changeable = [1usize, 3, 4, 5, 6, 7, 15, 16];
    for i in 0..64 {
        if !changeable.contains(&i) {
            assert_eq!(before[i], after[i], "dword {i:#x} changed");
        }
    }
    assert_eq!(after[0], before[0]);
    assert_eq!(
        after[1],
        u32::from(STATUS_CAP_LIST) << 16 | 0x0547,
        "status read-only, command writable bits only"
    );
    assert_eq!(after[15], 0x0000_01ff, "pin read-only, line writable");
    assert_eq!(
        after[16], 0xc002_0011,
        "only enable/function mask in MSI-X control"
    );
    assert_eq!(after[3], 0x0000_ffff);
    // Sub-dword writes: a byte write to the vendor ID does nothing, to the line works.
    c.write(0, &[0]);
    assert_eq!(r32(&c, 0), 0x0820_15ad);
    c.write(0x3c, &[0x0b]);
    assert_eq!(c.interrupt_line(), 0x0b);
}

#[test]
fn command_bits() {
    let mut c = cs();
    assert!(!c.memory_enabled() && !c.bus_master() && !c.intx_disabled());
    c.write(4, &(COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes());
    assert!(c.memory_enabled() && c.bus_master() && !c.intx_disabled());
    c.write(4, &COMMAND_INTX_DISABLE.to_le_bytes());
    assert!(!c.memory_enabled() && c.intx_disabled());
}

/// Sizes a BAR the way Linux does: save, write all ones, read, restore.
fn size_bar(c: &mut ConfigSpace, bar: u64) -> u32 {
    let off = 0x10 + bar * 4;
    let saved = r32(c, off);
    w32(c, off, !0);
    let v = r32(c, off);
    w32(c, off, saved);
    v
}

#[test]
fn bar_sizing() {
    let mut c = cs();
    assert_eq!(size_bar(&mut c, 0), 0xffff_c000);
    assert_eq!(size_bar(&mut c, 1), 0xffff_f000);
    let lo = size_bar(&mut c, 2);
    let hi = size_bar(&mut c, 3);
    assert_eq!(lo & 0xf, 0b0100, "64-bit, non-prefetchable memory");
    let mask = u64::from(hi) << 32 | u64::from(lo & !0xf);
    assert_eq!(!mask + 1, 2 << 20);
    assert_eq!(size_bar(&mut c, 4), 0);
    assert_eq!(size_bar(&mut c, 5), 0);
    w32(&mut c, 0x30, !0);
    assert_eq!(r32(&c, 0x30), 0, "no expansion ROM");
    assert_eq!(
        (0..6).map(|b| c.bar_size(b)).collect::<Vec<_>>(),
        [16 << 10, 4 << 10, 2 << 20, 0, 0, 0]
    );
    // A large UAR BAR needs upper address bits to be read-only too.
    let mut big = ConfigSpace::new(1 << 33, DEFAULT_SUBSYSTEM);
    assert_eq!(size_bar(&mut big, 2), 0x0000_0004);
    assert_eq!(size_bar(&mut big, 3), 0xffff_fffe);
    assert_eq!(big.bar_size(2), 1 << 33);
}

#[test]
fn bar_programming() {
    let mut c = cs();
    for b in 0..7 {
        assert_eq!(c.bar_addr(b), None);
    }
    w32(&mut c, 0x10, 0xfebf_0000);
    w32(&mut c, 0x14, 0xfebf_4123); // low bits read-only
    w32(&mut c, 0x18, 0x0020_0000);
    w32(&mut c, 0x1c, 0x0000_0080);
    assert_eq!(c.bar_addr(0), Some(0xfebf_0000));
    assert_eq!(c.bar_addr(1), Some(0xfebf_4000));
    assert_eq!(r32(&c, 0x14), 0xfebf_4000);
    assert_eq!(c.bar_addr(2), Some(0x80_0020_0000));
    assert_eq!(r32(&c, 0x18), 0x0020_0004);
    assert_eq!(c.bar_addr(3), None);
    // While being sized, a BAR has no address.
    w32(&mut c, 0x1c, !0);
    assert_eq!(c.bar_addr(2), None);
    w32(&mut c, 0x1c, 0);
    assert_eq!(c.bar_addr(2), Some(0x20_0000));
    w32(&mut c, 0x10, !0);
    assert_eq!(c.bar_addr(0), None);
}

#[test]
fn capability_walk_finds_msix() {
    let c = cs();
    let mut ptr = r8(&c, 0x34);
    let mut found = None;
    let mut hops = 0;
    while ptr != 0 && hops < 48 {
        assert_eq!(ptr % 4, 0);
        if r8(&c, u64::from(ptr)) == MSIX_CAP_ID {
            found = Some(ptr);
        }
        ptr = r8(&c, u64::from(ptr) + 1);
        hops += 1;
    }
    let cap = u64::from(found.expect("MSI-X capability"));
    let ctrl = r32(&c, cap) >> 16;
    assert_eq!((ctrl & 0x7ff) + 1, u32::from(MSIX_VECTORS));
    let table = r32(&c, cap + 4);
    let pba = r32(&c, cap + 8);
    assert_eq!((table & 7, table & !7), (0, 0));
    assert_eq!((pba & 7, pba & !7), (0, 0x2000));
}

#[test]
fn msix_control_and_reset() {
    let mut c = cs();
    assert!(!c.msix_enabled() && !c.msix_function_masked());
    // Linux writes the control word as 16 bits at cap+2.
    c.write(
        MSIX_CAP_OFFSET + 2,
        &(MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK).to_le_bytes(),
    );
    assert!(c.msix_enabled() && c.msix_function_masked());
    c.write(MSIX_CAP_OFFSET + 3, &[0x80]);
    assert!(c.msix_enabled() && !c.msix_function_masked());
    c.write(4, &0x0546u16.to_le_bytes());
    w32(&mut c, 0x10, 0xfebf_0000);
    c.reset();
    assert!(!c.msix_enabled() && !c.memory_enabled() && !c.bus_master());
    assert_eq!(c.bar_addr(0), None);
    assert_eq!(r32(&c, 0), 0x0820_15ad);
    assert_eq!(r8(&c, 0x3d), 1);
}

#[test]
fn any_access_answered() {
    let mut c = cs();
    for off in 0..300u64 {
        for size in 1..=8usize {
            let mut buf = vec![0u8; size];
            c.read(off, &mut buf);
            for (i, b) in buf.iter().enumerate() {
                if off + i as u64 >= 256 {
                    assert_eq!(*b, 0xff);
                }
            }
            c.write(off, &vec![0xa5; size]);
        }
    }
    let mut buf = [0u8; 8];
    c.read(u64::MAX - 3, &mut buf);
    assert_eq!(buf, [0xff; 8]);
    c.write(u64::MAX - 3, &[0; 8]);
    c.read(0, &mut []);
    // Identity survived the random writes.
    assert_eq!(r32(&c, 0), 0x0820_15ad);
    let mut t = MsixTable::new();
    for off in (0..300u64)
        .chain(0x1ff0..0x2010)
        .chain([0x3fff, u64::MAX - 3])
    {
        for size in 1..=8usize {
            let mut buf = vec![0u8; size];
            t.read(off, &mut buf);
            t.write(off, &vec![0x5a; size]);
        }
    }
}

#[test]
fn msix_table_entries() {
    let mut t = MsixTable::new();
    for v in 0..MSIX_VECTORS {
        assert!(t.is_masked(v));
        assert!(!t.is_pending(v));
    }
    assert!(t.is_masked(3));
    // Program vector 1 with 32-bit writes as Linux does.
    let base = MSIX_TABLE_OFFSET + 16;
    t.write(base, &0xfee0_1003u32.to_le_bytes());
    t.write(base + 4, &0u32.to_le_bytes());
    t.write(base + 8, &0x4041u32.to_le_bytes());
    t.write(base + 12, &0xffff_fffeu32.to_le_bytes());
    assert_eq!(t.message(1), Some((0xfee0_1000, 0x4041)));
    assert!(!t.is_masked(1));
    assert!(t.is_masked(0) && t.is_masked(2));
    let mut b = [0u8; 4];
    t.read(base + 12, &mut b);
    assert_eq!(
        u32::from_le_bytes(b),
        0,
        "reserved vector-control bits read 0"
    );
    // 64-bit write of the address.
    t.write(base, &0x0000_0001_fee0_2000u64.to_le_bytes());
    assert_eq!(t.message(1), Some((0x1_fee0_2000, 0x4041)));
    assert_eq!(t.message(3), None);
    assert_eq!(t.message(u16::MAX), None);
}

#[test]
fn msix_pending() {
    let mut t = MsixTable::new();
    t.set_pending(2, true);
    t.set_pending(7, true);
    assert!(t.is_pending(2) && !t.is_pending(7));
    let mut b = [0u8; 8];
    t.read(MSIX_PBA_OFFSET, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0b100);
    // PBA is read-only.
    t.write(MSIX_PBA_OFFSET, &[0; 8]);
    assert!(t.is_pending(2));
    assert_eq!(t.pending_unmasked().count(), 0);
    t.write(MSIX_TABLE_OFFSET + 2 * 16 + 12, &[0]);
    assert_eq!(t.pending_unmasked().collect::<Vec<_>>(), [2]);
    t.set_pending(2, false);
    assert!(!t.is_pending(2));
    t.set_pending(0, true);
    t.reset();
    assert!(!t.is_pending(0) && t.is_masked(2));
    assert_eq!(t.message(2), Some((0, 0)));
}
