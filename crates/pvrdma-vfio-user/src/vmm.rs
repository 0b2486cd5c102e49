//! The rust-vmm adapter: the device embedded in a VMM process, behind `vm-device`'s MMIO traits.
//!
//! A VMM that embeds the device registers the three BARs with its `IoManager` (or any bus that
//! takes `DeviceMmio`), forwards PCI config-space accesses to [`EmbeddedPvrdma::config_read`] and
//! [`EmbeddedPvrdma::config_write`], and gives the device an [`InterruptSink`] (an irqfd per MSI-X
//! vector, or its own MSI delivery using the table the device emulates in BAR0). Accesses are
//! forwarded to the device's main loop and are non-posted: a vCPU's write returns once the device
//! has handled it, which is what the driver's DSRHIGH and REQUEST/ERR sequences need.

use std::sync::Arc;

use pvrdma_dev::pci::{MSIX_BAR, MSIX_BAR_SIZE, REG_BAR, REG_BAR_SIZE, UAR_BAR};
use pvrdma_dev::{BackendFactory, DeviceConfig, DeviceError, DeviceHandle, DeviceOptions};
use pvrdma_dev::{InterruptSink, Region};
use rdma_backend::GuestMem;
use vm_device::bus::{MmioAddress, MmioAddressOffset, MmioRange};
use vm_device::device_manager::MmioManager;
use vm_device::DeviceMmio;

/// One BAR of the device as a `vm-device` MMIO device.
#[derive(Debug, Clone)]
pub struct BarMmio {
    device: DeviceHandle,
    bar: u8,
}

impl DeviceMmio for BarMmio {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        for (i, chunk) in data.chunks_mut(8).enumerate() {
            if self
                .device
                .read(Region::Bar(self.bar), offset + 8 * i as u64, chunk)
                .is_err()
            {
                chunk.fill(0xff);
            }
        }
    }

    fn mmio_write(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        for (i, chunk) in data.chunks(8).enumerate() {
            let _ = self
                .device
                .write(Region::Bar(self.bar), offset + 8 * i as u64, chunk);
        }
    }
}

/// Errors of the adapter.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The device could not start.
    #[error("device")]
    Device(#[from] DeviceError),
    /// A BAR range could not be registered on the bus.
    #[error("cannot register BAR {0} on the MMIO bus: {1:?}")]
    Bus(usize, vm_device::bus::Error),
}

/// The device embedded in a VMM process.
#[derive(Debug)]
pub struct EmbeddedPvrdma {
    device: DeviceHandle,
    uar_size: u64,
}

impl EmbeddedPvrdma {
    /// Starts the device with the device-side MSI-X table (the VMM reads messages from BAR0 or
    /// just uses the sink's vector numbers).
    pub fn new(
        cfg: DeviceConfig,
        mem: GuestMem,
        irq: Arc<dyn InterruptSink>,
        backend: BackendFactory,
    ) -> Result<EmbeddedPvrdma, VmmError> {
        let uar_size = cfg.uar_bar_size();
        let device = DeviceHandle::spawn(
            cfg,
            DeviceOptions {
                msix_table_in_device: true,
                name: "pvrdma".into(),
            },
            mem,
            irq,
            backend,
        )?;
        Ok(EmbeddedPvrdma { device, uar_size })
    }

    /// The device handle (reset, stats, shutdown).
    pub fn handle(&self) -> &DeviceHandle {
        &self.device
    }

    /// Reads PCI config space.
    pub fn config_read(&self, offset: u64, data: &mut [u8]) {
        if self.device.read(Region::Config, offset, data).is_err() {
            data.fill(0xff);
        }
    }

    /// Writes PCI config space (BAR programming, command register, MSI-X enable).
    pub fn config_write(&self, offset: u64, data: &[u8]) {
        let _ = self.device.write(Region::Config, offset, data);
    }

    /// The MMIO device of `bar` (0 = MSI-X, 1 = registers, 2 = UAR pages).
    pub fn bar(&self, bar: u8) -> Arc<BarMmio> {
        Arc::new(BarMmio {
            device: self.device.clone(),
            bar,
        })
    }

    /// Size of each BAR, in the order 0, 1, 2.
    pub fn bar_sizes(&self) -> [u64; 3] {
        [MSIX_BAR_SIZE, REG_BAR_SIZE, self.uar_size]
    }

    /// Registers the three BARs at `bases` on a `vm-device` MMIO manager (e.g. `IoManager`).
    pub fn register<M>(&self, bus: &mut M, bases: [u64; 3]) -> Result<(), VmmError>
    where
        M: MmioManager<D = Arc<dyn DeviceMmio + Send + Sync>>,
    {
        for (bar, (&base, size)) in [MSIX_BAR, REG_BAR, UAR_BAR]
            .iter()
            .zip(bases.iter().zip(self.bar_sizes()))
        {
            let range =
                MmioRange::new(MmioAddress(base), size).map_err(|e| VmmError::Bus(*bar, e))?;
            bus.register_mmio(
                range,
                self.bar(*bar as u8) as Arc<dyn DeviceMmio + Send + Sync>,
            )
            .map_err(|e| VmmError::Bus(*bar, e))?;
        }
        Ok(())
    }
}

impl Drop for EmbeddedPvrdma {
    fn drop(&mut self) {
        self.device.shutdown();
    }
}
