//! Shared set-up for the harness-driven integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use pvrdma_dev::DeviceConfig;
use pvrdma_guest::transport::DEFAULT_RAM;
use pvrdma_guest::{Driver, InProcess, Transport};
use rdma_backend::emulated::Fabric;

/// MAC of the test device (its default GID derives from it).
pub const MAC: [u8; 6] = [0x00, 0x50, 0x56, 0x12, 0x34, 0x56];

/// A device on its own fabric, probed like the Linux driver does.
pub fn probed() -> (Arc<InProcess>, Driver) {
    probed_on(&Fabric::new(), MAC)
}

/// A device with `mac` on `fabric`, probed.
pub fn probed_on(fabric: &Arc<Fabric>, mac: [u8; 6]) -> (Arc<InProcess>, Driver) {
    let cfg = DeviceConfig {
        mac,
        ..DeviceConfig::default()
    };
    let t = Arc::new(InProcess::new(cfg, DEFAULT_RAM, fabric));
    let drv = Driver::probe(t.clone() as Arc<dyn Transport>).expect("probe");
    (t, drv)
}
