//! PCI identity, configuration space and the MSI-X table (spec `device-abi.md` §1,
//! `qemu-reference.md` §1.1–1.3).
//!
//! The configuration space is 64 dwords of registers plus a mask of the bits the guest may
//! write; every write is `reg = (reg & !mask) | (value & mask)`, byte by byte, so any size and
//! alignment works and read-only bits stay read-only. BAR sizing falls out of the masks: a BAR's
//! writable bits are its address bits, so writing all ones reads back the size mask.
//!
//! | BAR | Kind | Size | Content |
//! |---|---|---|---|
//! | 0 | 32-bit memory, non-prefetchable | 16 KiB | MSI-X table at 0, PBA at 0x2000 ([`MsixTable`]) |
//! | 1 | 32-bit memory, non-prefetchable | 4 KiB | register file |
//! | 2+3 | 64-bit memory, non-prefetchable | `max_uar × 4096` | UAR (doorbell) pages |
//! | 4, 5, ROM | unimplemented | – | read 0, writes ignored |
//!
//! BAR2 is non-prefetchable because UAR pages are doorbells: writes have side effects and must
//! not be merged or reordered. (A 64-bit non-prefetchable BAR is placed below 4 GiB behind a
//! bridge; the default 2 MiB fits easily.)
//!
//! The only capability is MSI-X (3 vectors: 0 command response, 1 async events, 2 CQ
//! notifications). The Linux driver needs all 3 for full function (`device-abi.md` §0.4).

/// PCI vendor ID (VMware).
pub const VENDOR_ID: u16 = 0x15ad;
/// PCI device ID (`PCI_DEVICE_ID_VMWARE_PVRDMA`).
pub const DEVICE_ID: u16 = 0x0820;
/// Class code: network controller (0x02), other (0x80), programming interface 0.
pub const CLASS_CODE: u32 = 0x028000;
/// Revision ID: VMware's `PVRDMA_REV_ID` (QEMU used 0; the driver does not check it).
pub const REVISION_ID: u8 = 1;
/// Subsystem vendor and device ID to use when the VMM has no preference.
pub const DEFAULT_SUBSYSTEM: (u16, u16) = (VENDOR_ID, DEVICE_ID);

/// BAR holding the MSI-X table and PBA.
pub const MSIX_BAR: usize = 0;
/// Size of [`MSIX_BAR`].
pub const MSIX_BAR_SIZE: u64 = 16 * 1024;
/// Offset of the MSI-X table in [`MSIX_BAR`].
pub const MSIX_TABLE_OFFSET: u64 = 0;
/// Offset of the MSI-X pending-bit array in [`MSIX_BAR`].
pub const MSIX_PBA_OFFSET: u64 = 0x2000;
/// Number of MSI-X vectors.
pub const MSIX_VECTORS: u16 = 3;
/// BAR holding the register file.
pub const REG_BAR: usize = 1;
/// Size of [`REG_BAR`].
pub const REG_BAR_SIZE: u64 = 4096;
/// BAR holding the UAR pages: a 64-bit memory BAR (occupies BAR2 and BAR3), `max_uar × 4096`.
pub const UAR_BAR: usize = 2;
/// Size of one UAR page.
pub const UAR_PAGE_SIZE: u64 = 4096;
/// Size of conventional PCI configuration space.
pub const CONFIG_SPACE_SIZE: u64 = 256;
/// Offset of the MSI-X capability in configuration space.
pub const MSIX_CAP_OFFSET: u64 = 0x40;

/// Command register: I/O space enable.
pub const COMMAND_IO: u16 = 1 << 0;
/// Command register: memory space enable.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus master enable.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: parity error response.
pub const COMMAND_PARITY: u16 = 1 << 6;
/// Command register: SERR# enable.
pub const COMMAND_SERR: u16 = 1 << 8;
/// Command register: INTx disable.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: capabilities list present.
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// MSI-X capability ID.
pub const MSIX_CAP_ID: u8 = 0x11;
/// MSI-X message control: function mask.
pub const MSIX_CTRL_FUNCTION_MASK: u16 = 1 << 14;
/// MSI-X message control: MSI-X enable.
pub const MSIX_CTRL_ENABLE: u16 = 1 << 15;

/// Size of BAR2 for `max_uar` UAR pages, rounded up to a power of two (BAR sizes must be).
pub fn uar_bar_size(max_uar: u32) -> u64 {
    sanitize_bar_size(u64::from(max_uar).saturating_mul(UAR_PAGE_SIZE))
}

/// At least one page, a power of two, at most 2^63.
fn sanitize_bar_size(size: u64) -> u64 {
    size.max(UAR_PAGE_SIZE)
        .checked_next_power_of_two()
        .unwrap_or(1 << 63)
}

const NUM_DWORDS: usize = (CONFIG_SPACE_SIZE / 4) as usize;
// Dword indices of the registers (byte offset / 4).
const REG_ID: usize = 0;
const REG_COMMAND_STATUS: usize = 1;
const REG_CLASS_REV: usize = 0x08 / 4;
const REG_HEADER: usize = 0x0c / 4;
const REG_BAR0: usize = 0x10 / 4;
const REG_SUBSYSTEM: usize = 0x2c / 4;
const REG_CAP_PTR: usize = 0x34 / 4;
const REG_INTERRUPT: usize = 0x3c / 4;
const REG_MSIX: usize = (MSIX_CAP_OFFSET / 4) as usize;

/// BAR low-dword type bits: 64-bit memory.
const BAR_MEM_64: u32 = 0b100;

/// PCI configuration space (type 0 header, 256 bytes) of the PVRDMA function.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    regs: [u32; NUM_DWORDS],
    writable: [u32; NUM_DWORDS],
    power_on: [u32; NUM_DWORDS],
    uar_bar_size: u64,
}

impl ConfigSpace {
    /// Power-on configuration space. `uar_bar_size` is rounded up to a power of two of at least
    /// 4 KiB (see [`uar_bar_size`]).
    pub fn new(uar_bar_size: u64, subsystem: (u16, u16)) -> Self {
        let uar = sanitize_bar_size(uar_bar_size);
        let mut regs = [0u32; NUM_DWORDS];
        let mut writable = [0u32; NUM_DWORDS];

        regs[REG_ID] = u32::from(VENDOR_ID) | u32::from(DEVICE_ID) << 16;
        regs[REG_COMMAND_STATUS] = u32::from(STATUS_CAP_LIST) << 16;
        writable[REG_COMMAND_STATUS] = u32::from(
            COMMAND_IO
                | COMMAND_MEMORY
                | COMMAND_BUS_MASTER
                | COMMAND_PARITY
                | COMMAND_SERR
                | COMMAND_INTX_DISABLE,
        );
        regs[REG_CLASS_REV] = CLASS_CODE << 8 | u32::from(REVISION_ID);
        // Cache line size and latency timer writable; header type 0, single function (the
        // multi-function bit belongs to function 0, the paired vmxnet3); no BIST.
        writable[REG_HEADER] = 0x0000_ffff;

        // BAR0: 32-bit memory, non-prefetchable.
        writable[REG_BAR0] = !(MSIX_BAR_SIZE as u32 - 1);
        // BAR1: 32-bit memory, non-prefetchable.
        writable[REG_BAR0 + REG_BAR] = !(REG_BAR_SIZE as u32 - 1);
        // BAR2/3: 64-bit memory, non-prefetchable.
        let uar_mask = !(uar - 1);
        regs[REG_BAR0 + UAR_BAR] = BAR_MEM_64;
        writable[REG_BAR0 + UAR_BAR] = uar_mask as u32 & !0xf;
        writable[REG_BAR0 + UAR_BAR + 1] = (uar_mask >> 32) as u32;
        // BAR4, BAR5, CardBus CIS, expansion ROM: 0 and read-only.

        regs[REG_SUBSYSTEM] = u32::from(subsystem.0) | u32::from(subsystem.1) << 16;
        regs[REG_CAP_PTR] = MSIX_CAP_OFFSET as u32;
        // Interrupt line writable, interrupt pin 1 (INTA) read-only.
        regs[REG_INTERRUPT] = 1 << 8;
        writable[REG_INTERRUPT] = 0xff;

        // MSI-X: ID, next = 0, message control (table size N-1; only enable and function mask
        // writable), table offset/BIR, PBA offset/BIR.
        regs[REG_MSIX] = u32::from(MSIX_CAP_ID) | u32::from(MSIX_VECTORS - 1) << 16;
        writable[REG_MSIX] = u32::from(MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK) << 16;
        regs[REG_MSIX + 1] = MSIX_TABLE_OFFSET as u32 | MSIX_BAR as u32;
        regs[REG_MSIX + 2] = MSIX_PBA_OFFSET as u32 | MSIX_BAR as u32;

        ConfigSpace {
            regs,
            writable,
            power_on: regs,
            uar_bar_size: uar,
        }
    }

    fn byte(&self, offset: u64) -> u8 {
        match usize::try_from(offset) {
            Ok(o) if o < CONFIG_SPACE_SIZE as usize => (self.regs[o / 4] >> ((o % 4) * 8)) as u8,
            _ => 0xff,
        }
    }

    /// Reads `data.len()` bytes at `offset`; any size and alignment is answered, bytes beyond
    /// the 256-byte space read as 0xff.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset.checked_add(i as u64).map_or(0xff, |o| self.byte(o));
        }
    }

    /// Writes `data` at `offset`; only writable bits change, bytes beyond the space are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let Some(o) = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .filter(|&o| o < CONFIG_SPACE_SIZE as usize)
            else {
                continue;
            };
            let shift = (o % 4) * 8;
            let mask = self.writable[o / 4] & (0xff << shift);
            let reg = &mut self.regs[o / 4];
            *reg = (*reg & !mask) | ((u32::from(b) << shift) & mask);
        }
    }

    fn command(&self) -> u16 {
        self.regs[REG_COMMAND_STATUS] as u16
    }

    fn msix_control(&self) -> u16 {
        (self.regs[REG_MSIX] >> 16) as u16
    }

    /// Programmed base address of `bar` (0, 1 or 2; 2 is the 64-bit UAR BAR). `None` if `bar`
    /// is not an implemented BAR (including 3, the upper half of BAR2), if it is unassigned
    /// (address 0), or while it holds the all-ones sizing pattern.
    pub fn bar_addr(&self, bar: usize) -> Option<u64> {
        let lo_reg = REG_BAR0 + bar;
        let (addr, sizing) = match bar {
            MSIX_BAR | REG_BAR => {
                let mask = self.writable[lo_reg];
                let lo = self.regs[lo_reg] & mask;
                (u64::from(lo), lo == mask)
            }
            UAR_BAR => {
                let (lo_mask, hi_mask) = (self.writable[lo_reg], self.writable[lo_reg + 1]);
                let lo = self.regs[lo_reg] & lo_mask;
                let hi = self.regs[lo_reg + 1] & hi_mask;
                let sizing = (lo_mask != 0 && lo == lo_mask) || (hi_mask != 0 && hi == hi_mask);
                (u64::from(hi) << 32 | u64::from(lo), sizing)
            }
            _ => return None,
        };
        (addr != 0 && !sizing).then_some(addr)
    }

    /// Size of `bar` (0 for unimplemented BARs, including 3, the upper half of BAR2).
    pub fn bar_size(&self, bar: usize) -> u64 {
        match bar {
            MSIX_BAR => MSIX_BAR_SIZE,
            REG_BAR => REG_BAR_SIZE,
            UAR_BAR => self.uar_bar_size,
            _ => 0,
        }
    }

    /// Whether memory decoding is enabled (command bit 1).
    pub fn memory_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY != 0
    }

    /// Whether bus mastering (DMA, MSI-X delivery) is enabled (command bit 2).
    pub fn bus_master(&self) -> bool {
        self.command() & COMMAND_BUS_MASTER != 0
    }

    /// Whether INTx is disabled (command bit 10).
    pub fn intx_disabled(&self) -> bool {
        self.command() & COMMAND_INTX_DISABLE != 0
    }

    /// Whether MSI-X is enabled.
    pub fn msix_enabled(&self) -> bool {
        self.msix_control() & MSIX_CTRL_ENABLE != 0
    }

    /// Whether all MSI-X vectors are masked by the function mask.
    pub fn msix_function_masked(&self) -> bool {
        self.msix_control() & MSIX_CTRL_FUNCTION_MASK != 0
    }

    /// Interrupt line programmed by the guest.
    pub fn interrupt_line(&self) -> u8 {
        self.regs[REG_INTERRUPT] as u8
    }

    /// Back to power-on values: BARs unassigned, command 0, MSI-X disabled.
    pub fn reset(&mut self) {
        self.regs = self.power_on;
    }
}

/// Bytes per MSI-X table entry.
const MSIX_ENTRY_SIZE: u64 = 16;
/// MSI-X vector control: per-vector mask.
const MSIX_VECTOR_MASKED: u32 = 1;
const TABLE_DWORDS: usize = MSIX_VECTORS as usize * 4;
/// Writable bits of {addr_lo, addr_hi, data, vector_ctrl}: the message address is
/// dword-aligned, only the mask bit of vector control is defined.
const ENTRY_WRITABLE: [u32; 4] = [!0b11, !0, !0, MSIX_VECTOR_MASKED];

/// The MSI-X table and pending-bit array as the contents of BAR0, for transports where the device
/// owns them (in-process, rust-vmm). Under vfio-user the client emulates them instead.
#[derive(Debug, Clone)]
pub struct MsixTable {
    table: [u32; TABLE_DWORDS],
    pba: u64,
}

impl Default for MsixTable {
    fn default() -> Self {
        Self::new()
    }
}

impl MsixTable {
    /// Power-on state: every vector masked (PCI spec), nothing pending.
    pub fn new() -> Self {
        let mut table = [0u32; TABLE_DWORDS];
        for v in 0..MSIX_VECTORS as usize {
            table[v * 4 + 3] = MSIX_VECTOR_MASKED;
        }
        MsixTable { table, pba: 0 }
    }

    fn byte(&self, offset: u64) -> u8 {
        let table_end = MSIX_TABLE_OFFSET + MSIX_ENTRY_SIZE * u64::from(MSIX_VECTORS);
        if (MSIX_TABLE_OFFSET..table_end).contains(&offset) {
            let o = (offset - MSIX_TABLE_OFFSET) as usize;
            (self.table[o / 4] >> ((o % 4) * 8)) as u8
        } else if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + 8).contains(&offset) {
            (self.pba >> ((offset - MSIX_PBA_OFFSET) * 8)) as u8
        } else {
            0
        }
    }

    /// Reads `data.len()` bytes at `offset` of BAR0; any size and alignment is answered,
    /// unimplemented parts of the BAR read 0.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset.checked_add(i as u64).map_or(0, |o| self.byte(o));
        }
    }

    /// Writes `data` at `offset` of BAR0. Only the table's writable bits change; the PBA is
    /// read-only. After a write that may unmask a vector, deliver
    /// [`pending_unmasked`](MsixTable::pending_unmasked).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let table_end = MSIX_TABLE_OFFSET + MSIX_ENTRY_SIZE * u64::from(MSIX_VECTORS);
        for (i, &b) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i as u64) else {
                continue;
            };
            if !(MSIX_TABLE_OFFSET..table_end).contains(&o) {
                continue;
            }
            let o = (o - MSIX_TABLE_OFFSET) as usize;
            let shift = (o % 4) * 8;
            let mask = ENTRY_WRITABLE[(o / 4) % 4] & (0xff << shift);
            let reg = &mut self.table[o / 4];
            *reg = (*reg & !mask) | ((u32::from(b) << shift) & mask);
        }
    }

    /// Whether `vector`'s per-vector mask bit is set (out-of-range vectors count as masked).
    pub fn is_masked(&self, vector: u16) -> bool {
        vector >= MSIX_VECTORS || self.table[vector as usize * 4 + 3] & MSIX_VECTOR_MASKED != 0
    }

    /// Sets or clears `vector`'s pending bit (out-of-range vectors are ignored).
    pub fn set_pending(&mut self, vector: u16, pending: bool) {
        if vector < MSIX_VECTORS {
            if pending {
                self.pba |= 1 << vector;
            } else {
                self.pba &= !(1 << vector);
            }
        }
    }

    /// Whether `vector`'s pending bit is set.
    pub fn is_pending(&self, vector: u16) -> bool {
        vector < MSIX_VECTORS && self.pba & (1 << vector) != 0
    }

    /// Vectors that are pending and not masked per vector: the device sends these (and clears
    /// their pending bits) when the function is enabled and not function-masked.
    pub fn pending_unmasked(&self) -> impl Iterator<Item = u16> + '_ {
        (0..MSIX_VECTORS).filter(|&v| self.is_pending(v) && !self.is_masked(v))
    }

    /// Message address and data of `vector` (for a VMM that delivers MSIs itself); `None` for an
    /// out-of-range vector. Masking is not considered.
    pub fn message(&self, vector: u16) -> Option<(u64, u32)> {
        (vector < MSIX_VECTORS).then(|| {
            let e = &self.table[vector as usize * 4..][..4];
            (u64::from(e[1]) << 32 | u64::from(e[0]), e[2])
        })
    }

    /// Back to power-on state: every vector masked, nothing pending.
    pub fn reset(&mut self) {
        *self = Self::new();
    }
}

#[cfg(test)]
mod tests {
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
}
