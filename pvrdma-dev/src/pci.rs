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
mod tests;
