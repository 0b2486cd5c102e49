//! The device embedded as a rust-vmm VMM would: BARs on a `vm-device` `IoManager`, config space
//! through the adapter, interrupts through a sink. The guest-driver harness drives it end to end.

use std::sync::Arc;
use std::time::Duration;

use pvrdma_dev::{DeviceConfig, Region};
use pvrdma_guest::driver::{BAR0_ADDR, BAR1_ADDR, BAR2_ADDR};
use pvrdma_guest::{Driver, IrqRecorder, Transport};
use pvrdma_vfio_user::vmm::EmbeddedPvrdma;
use rdma_backend::emulated::{EmulatedBackend, Fabric};
use rdma_backend::{Backend, CompletionSink, GuestMem};
use vm_device::bus::MmioAddress;
use vm_device::device_manager::{IoManager, MmioManager};
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

struct VmmTransport {
    dev: EmbeddedPvrdma,
    io: IoManager,
    mem: GuestMemoryMmap,
    irq: Arc<IrqRecorder>,
}

impl VmmTransport {
    fn base(region: Region) -> Option<u64> {
        match region {
            Region::Bar(0) => Some(BAR0_ADDR),
            Region::Bar(1) => Some(BAR1_ADDR),
            Region::Bar(2) => Some(BAR2_ADDR),
            _ => None,
        }
    }
}

impl Transport for VmmTransport {
    fn read(&self, region: Region, offset: u64, data: &mut [u8]) {
        match Self::base(region) {
            Some(b) => {
                if self.io.mmio_read(MmioAddress(b + offset), data).is_err() {
                    data.fill(0xff);
                }
            }
            None => self.dev.config_read(offset, data),
        }
    }
    fn write(&self, region: Region, offset: u64, data: &[u8]) {
        match Self::base(region) {
            Some(b) => {
                let _ = self.io.mmio_write(MmioAddress(b + offset), data);
            }
            None => self.dev.config_write(offset, data),
        }
    }
    fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }
    fn irq_count(&self, vector: u16) -> u64 {
        self.irq.count(vector)
    }
    fn wait_irq(&self, vector: u16, seen: u64, timeout: Duration) -> bool {
        self.irq.wait(vector, seen, timeout)
    }
    fn reset(&self) {
        let _ = self.dev.handle().reset();
    }
}

#[test]
fn harness_drives_the_device_through_io_manager() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let irq = Arc::new(IrqRecorder::default());
    let fabric = Fabric::new();
    let dev = EmbeddedPvrdma::new(
        DeviceConfig::default(),
        GuestMemoryAtomic::new(mem.clone()),
        irq.clone(),
        Box::new(move |m: GuestMem, s: Arc<dyn CompletionSink>| {
            EmulatedBackend::new(&fabric, m, s) as Arc<dyn Backend>
        }),
    )
    .unwrap();
    let mut io = IoManager::new();
    dev.register(&mut io, [BAR0_ADDR, BAR1_ADDR, BAR2_ADDR])
        .unwrap();
    let t = Arc::new(VmmTransport { dev, io, mem, irq });
    let drv = Driver::probe(t.clone() as Arc<dyn Transport>).expect("probe through IoManager");
    let mac = DeviceConfig::default().mac;
    let k = pvrdma_guest::kernel::ib_register(&drv, mac).expect("registration");
    assert_eq!(k.gsi.qpn, 1);
    // Command responses arrived as vector-0 interrupts through the sink.
    assert!(t.irq.count(0) >= 10);
    // An access outside every BAR is refused by the bus, not by the device.
    let mut b = [0u8; 4];
    assert!(t.io.mmio_read(MmioAddress(0x1234), &mut b).is_err());
}
