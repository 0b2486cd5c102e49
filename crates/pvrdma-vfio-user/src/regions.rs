//! The regions and interrupts the server advertises (VFIO PCI layout, as QEMU's vfio-user client
//! expects it), and how a region index maps onto the device's address spaces.

use pvrdma_dev::pci::{self, CONFIG_SPACE_SIZE, MSIX_BAR_SIZE, MSIX_VECTORS, REG_BAR_SIZE};
use pvrdma_dev::Region;
use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_IRQ_INFO_AUTOMASKED, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE,
    VFIO_IRQ_INFO_NORESIZE, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_BAR1_REGION_INDEX,
    VFIO_PCI_BAR2_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{IrqInfo, ServerRegion};

/// Region index of the config space (`VFIO_PCI_CONFIG_REGION_INDEX`).
pub const CONFIG_REGION: u32 = VFIO_PCI_CONFIG_REGION_INDEX;
/// IRQ index of INTx.
pub const INTX_IRQ: u32 = VFIO_PCI_INTX_IRQ_INDEX;
/// IRQ index of MSI-X.
pub const MSIX_IRQ: u32 = VFIO_PCI_MSIX_IRQ_INDEX;

/// The device's address space behind a vfio-user region index, with its size.
pub fn region_of(index: u32, uar_bar_size: u64) -> Option<(Region, u64)> {
    match index {
        VFIO_PCI_BAR0_REGION_INDEX => Some((Region::Bar(0), MSIX_BAR_SIZE)),
        VFIO_PCI_BAR1_REGION_INDEX => Some((Region::Bar(1), REG_BAR_SIZE)),
        VFIO_PCI_BAR2_REGION_INDEX => Some((Region::Bar(2), uar_bar_size)),
        VFIO_PCI_CONFIG_REGION_INDEX => Some((Region::Config, CONFIG_SPACE_SIZE)),
        _ => None,
    }
}

/// The vfio-user region index of a device address space (the client side's view).
pub fn index_of(region: Region) -> u32 {
    match region {
        Region::Config => CONFIG_REGION,
        Region::Bar(b) => u32::from(b),
    }
}

/// All `VFIO_PCI_NUM_REGIONS` regions, index = position: BAR0 (MSI-X, 16 KiB), BAR1 (registers,
/// 4 KiB), BAR2 (64-bit UAR, so BAR3 is empty), no BAR4/5, ROM or VGA, config space 256 bytes.
/// Nothing is mmappable: every access is a message the device sees in order.
pub fn server_regions(max_uar: u32) -> Vec<ServerRegion> {
    let uar = pci::uar_bar_size(max_uar);
    (0..VFIO_PCI_NUM_REGIONS)
        .map(|index| {
            let (flags, size) = match region_of(index, uar) {
                Some((_, size)) => (
                    VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE,
                    size,
                ),
                None => (0, 0),
            };
            ServerRegion {
                region_info: vfio_region_info {
                    argsz: std::mem::size_of::<vfio_region_info>() as u32,
                    flags,
                    index,
                    cap_offset: 0,
                    size,
                    offset: 0,
                },
                sparse_areas: Vec::new(),
                mmap_fd: None,
            }
        })
        .collect()
}

/// All `VFIO_PCI_NUM_IRQS` interrupt indexes: INTx (1, maskable, automasked), no MSI, MSI-X
/// (3 vectors, eventfds), no ERR or REQ.
pub fn server_irqs() -> Vec<IrqInfo> {
    (0..VFIO_PCI_NUM_IRQS)
        .map(|index| {
            let (flags, count) = match index {
                VFIO_PCI_INTX_IRQ_INDEX => (
                    VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED,
                    1,
                ),
                VFIO_PCI_MSIX_IRQ_INDEX => (
                    VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE,
                    u32::from(MSIX_VECTORS),
                ),
                _ => (0, 0),
            };
            IrqInfo {
                index,
                flags,
                count,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let r = server_regions(512);
        assert_eq!(r.len(), 9);
        for (i, reg) in r.iter().enumerate() {
            assert_eq!(reg.region_info.index as usize, i);
        }
        assert_eq!(r[0].region_info.size, 16384);
        assert_eq!(r[1].region_info.size, 4096);
        assert_eq!(r[2].region_info.size, 512 * 4096);
        assert_eq!(r[3].region_info.size, 0);
        assert_eq!(r[7].region_info.size, 256);
        let irqs = server_irqs();
        assert_eq!(irqs.len(), 5);
        assert_eq!(irqs[0].count, 1);
        assert_eq!(irqs[2].count, 3);
        assert_eq!(index_of(Region::Config), 7);
        assert_eq!(index_of(Region::Bar(2)), 2);
    }
}
