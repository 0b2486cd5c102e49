//! One client connection: a fresh device, its guest memory and interrupts, and the
//! `vfio_user::ServerBackend` that the message loop ([`crate::protocol`]) hands each message to.

use std::fs::File;
use std::io;
use std::sync::Arc;

use pvrdma_dev::{
    BackendFactory, DeviceAccess, DeviceConfig, DeviceHandle, DeviceOptions, InterruptSink,
    LocalDevice, Region,
};
use rdma_backend::emulated::{EmulatedBackend, Fabric};
use rdma_backend::{Backend, CompletionSink, GuestMem};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, ServerBackend};
use vm_memory::GuestMemoryMmap;

use pvrdma_dev::regs::uar;

use crate::dma::DmaMaps;
use crate::irq::EventfdIrqs;
use crate::regions::region_of;

/// The device of one connection and what the client gave it. The device runs on its own
/// thread ([`DeviceHandle`], what `pvrdma serve` uses) or, for deterministic tests and fuzzing,
/// on the caller's ([`LocalDevice`], [`Connection::new_local`]).
#[derive(Debug)]
pub struct Connection<D: DeviceAccess = DeviceHandle> {
    device: D,
    irqs: Arc<EventfdIrqs>,
    dma: DmaMaps,
    uar_bar_size: u64,
    /// Budget of the log lines of accesses outside the device's regions (a client can send
    /// them at will).
    bad_access_log: pvrdma_dev::ratelog::Limiter,
}

/// The constructor of the backend `choice` names, for the device with MAC `mac`.
fn backend_factory(
    fabric: &Arc<Fabric>,
    choice: &crate::BackendChoice,
    mac: [u8; 6],
) -> BackendFactory {
    let fabric = fabric.clone();
    let choice = choice.clone();
    Box::new(
        move |mem: GuestMem, sink: Arc<dyn CompletionSink>| match &choice {
            crate::BackendChoice::Emulated => {
                EmulatedBackend::for_device(&fabric, mem, sink, mac) as Arc<dyn Backend>
            }
            crate::BackendChoice::RdmaCore(cfg) => {
                // `pvrdma serve` opened the device once at start, so this fails only if the host
                // device went away meanwhile.
                // The guest binds the host GIDs the operator gave it: its MAC's link-local one.
                let mut cfg = cfg.clone();
                cfg.gids.push(rdma_backend::Gid::from_mac(mac));
                rdma_backend::rdma_core::RdmaCoreBackend::new(cfg.clone(), mem, sink)
                    .unwrap_or_else(|e| panic!("rdma-core backend on {}: {e}", cfg.ibdev))
                    as Arc<dyn Backend>
            }
        },
    )
}

fn options(name: String) -> DeviceOptions {
    DeviceOptions {
        // QEMU emulates the MSI-X table and PBA itself.
        msix_table_in_device: false,
        name,
    }
}

/// A device constructor: [`DeviceHandle::spawn`] or [`LocalDevice::new`].
type Start<D> = fn(
    DeviceConfig,
    DeviceOptions,
    GuestMem,
    Arc<dyn InterruptSink>,
    BackendFactory,
) -> Result<D, pvrdma_dev::DeviceError>;

impl Connection<DeviceHandle> {
    /// Starts a device on its own thread, with empty guest memory and no interrupts assigned.
    pub fn new(
        cfg: &DeviceConfig,
        name: String,
        fabric: &Arc<Fabric>,
        backend: &crate::BackendChoice,
    ) -> Result<Self, pvrdma_dev::DeviceError> {
        Connection::start(cfg, name, fabric, backend, DeviceHandle::spawn)
    }
}

impl Connection<LocalDevice> {
    /// As [`Connection::new`], with the device on the calling thread: every message is handled,
    /// with everything it made ready, before its method returns.
    pub fn new_local(
        cfg: &DeviceConfig,
        name: String,
        fabric: &Arc<Fabric>,
        backend: &crate::BackendChoice,
    ) -> Result<Self, pvrdma_dev::DeviceError> {
        Connection::start(cfg, name, fabric, backend, LocalDevice::new)
    }
}

impl<D: DeviceAccess> Connection<D> {
    /// A device built by `start` with empty guest memory and no interrupts assigned.
    fn start(
        cfg: &DeviceConfig,
        name: String,
        fabric: &Arc<Fabric>,
        backend: &crate::BackendChoice,
        start: Start<D>,
    ) -> Result<Self, pvrdma_dev::DeviceError> {
        let mem = GuestMem::new(GuestMemoryMmap::new());
        let irqs = Arc::new(EventfdIrqs::default());
        let device = start(
            cfg.clone(),
            options(name),
            mem.clone(),
            irqs.clone(),
            backend_factory(fabric, backend, cfg.mac),
        )?;
        Ok(Connection {
            device,
            irqs,
            dma: DmaMaps::new(mem),
            uar_bar_size: pvrdma_dev::pci::uar_bar_size(cfg.max_uar),
            bad_access_log: Default::default(),
        })
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// Stops the device and drops the client's eventfds.
    pub fn shutdown(&self) {
        self.device.shutdown();
        self.irqs.clear();
    }

    /// Checks an access against the region; `None` (logged) if it is outside.
    fn target(&mut self, index: u32, offset: u64, len: usize, what: &str) -> Option<Region> {
        let Some((region, size)) = region_of(index, self.uar_bar_size) else {
            pvrdma_dev::limited_warn!(
                self.bad_access_log,
                "{what} of region {index}, which the device does not have: ignored"
            );
            return None;
        };
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            pvrdma_dev::limited_warn!(
                self.bad_access_log,
                "{what} of {len} bytes at {offset:#x} is outside region {index} \
                 ({size:#x} bytes): ignored"
            );
            return None;
        }
        Some(region)
    }
}

/// Splits `[offset, offset + len)` into naturally aligned pieces of at most `max` bytes (the
/// device takes accesses of 1..=8 bytes; QEMU reads the whole config space at once).
fn chunks(offset: u64, len: usize, max: usize) -> impl Iterator<Item = (u64, usize)> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at >= len {
            return None;
        }
        let o = offset + at as u64;
        let mut n = max;
        while n > 1 && (o % n as u64 != 0 || n > len - at) {
            n /= 2;
        }
        let piece = (o, n);
        at += n;
        Some(piece)
    })
}

fn max_access(region: Region) -> usize {
    match region {
        Region::Config => 4,
        Region::Bar(_) => 8,
    }
}

impl<D: DeviceAccess> ServerBackend for Connection<D> {
    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        data.fill(0xff);
        let Some(region) = self.target(index, offset, data.len(), "read") else {
            return Ok(());
        };
        for (o, n) in chunks(offset, data.len(), max_access(region)) {
            let at = (o - offset) as usize;
            if self.device.read(region, o, &mut data[at..at + n]).is_err() {
                log::error!("the device has stopped; read answered with all-ones");
                break;
            }
        }
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        let Some(region) = self.target(index, offset, data.len(), "write") else {
            return Ok(());
        };
        for (o, n) in chunks(offset, data.len(), max_access(region)) {
            let at = (o - offset) as usize;
            // Registers and config space are non-posted: the write returns once the device has
            // handled it, so the client's reply (QEMU with x-no-posted-writes waits for it)
            // orders it before the guest's next step (the driver reads the caps from RAM right
            // after its DSRHIGH write). QP and SRQ doorbells are posted, as on PCI: the guest
            // sees their effect only through guest memory (CQEs) or a later access, and every
            // later access reaches the device after it on the same channel. This saves the vCPU
            // a round trip to the main loop per doorbell. A CQ ARM is not posted: it must be in
            // force before the guest polls the CQ again (`uar::may_post`).
            let piece = &data[at..at + n];
            let r = if region == Region::Bar(2) && uar::may_post(o, piece) {
                self.device.write_posted(region, o, piece)
            } else {
                self.device.write(region, o, piece)
            };
            if r.is_err() {
                log::error!("the device has stopped; write dropped");
                break;
            }
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> io::Result<()> {
        self.dma.map(flags, offset, address, size, fd)
    }

    fn dma_unmap(&mut self, flags: DmaUnmapFlags, address: u64, size: u64) -> io::Result<()> {
        self.dma.unmap(flags, address, size)
    }

    fn reset(&mut self) -> io::Result<()> {
        log::info!("DEVICE_RESET");
        if self.device.reset().is_err() {
            log::error!("the device has stopped; reset ignored");
        }
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> io::Result<()> {
        self.irqs.set_irqs(index, flags, start, count, fds);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{chunks, Connection};
    use pvrdma_dev::pci::{DEVICE_ID, VENDOR_ID};
    use pvrdma_dev::regs::offset;
    use pvrdma_dev::DeviceConfig;
    use rdma_backend::emulated::Fabric;
    use vfio_user::ServerBackend;

    #[test]
    fn local_connection_answers_on_the_calling_thread() {
        let cfg = DeviceConfig::default();
        let mut c = Connection::new_local(
            &cfg,
            "t".into(),
            &Fabric::new(),
            &crate::BackendChoice::Emulated,
        )
        .unwrap();
        let mut id = [0u8; 4];
        c.region_read(7, 0, &mut id).unwrap(); // config space
        assert_eq!(
            id,
            [VENDOR_ID.to_le_bytes(), DEVICE_ID.to_le_bytes()].concat()[..]
        );
        let mut v = [0u8; 4];
        c.region_read(1, offset::VERSION, &mut v).unwrap();
        assert_eq!(u32::from_le_bytes(v), cfg.version);
        // IMR is writable and reads back; a reset brings it back to all masked.
        c.region_write(1, offset::IMR, &0u32.to_le_bytes()).unwrap();
        c.region_read(1, offset::IMR, &mut v).unwrap();
        assert_eq!(u32::from_le_bytes(v), 0);
        c.reset().unwrap();
        c.region_read(1, offset::IMR, &mut v).unwrap();
        assert_ne!(u32::from_le_bytes(v), 0);
        // A region the device does not have reads as all-ones.
        c.region_read(11, 0, &mut v).unwrap();
        assert_eq!(v, [0xff; 4]);
        c.shutdown();
    }

    #[test]
    fn chunking() {
        let v: Vec<_> = chunks(0, 256, 4).collect();
        assert_eq!(v.len(), 64);
        assert_eq!(chunks(2, 4, 8).collect::<Vec<_>>(), vec![(2, 2), (4, 2)]);
        assert_eq!(chunks(8, 8, 8).collect::<Vec<_>>(), vec![(8, 8)]);
        assert_eq!(
            chunks(1, 7, 8).collect::<Vec<_>>(),
            vec![(1, 1), (2, 2), (4, 4)]
        );
    }
}
