//! The harness over `pvrdma_guest::Local`: the device driven on the test's own thread, with an
//! inline worker pool. The same guest accesses give the same device behaviour, run after run
//! (what the fuzz targets rely on to reproduce a crash from its input).

use std::sync::Arc;

use crate::common::{assert_device_healthy, MAC};
use pvrdma_dev::DeviceConfig;
use pvrdma_guest::{kernel, Driver, Local, Transport};
use rdma_backend::emulated::Fabric;

fn run_once() -> (pvrdma_dev::DeviceStats, u64) {
    let fabric = Fabric::new();
    let cfg = DeviceConfig {
        mac: MAC,
        ..DeviceConfig::default()
    };
    let t = Arc::new(Local::new(cfg, 64 << 20, &fabric).expect("local device"));
    let drv = Driver::probe(t.clone() as Arc<dyn Transport>).expect("probe");
    let _ib = kernel::ib_register(&drv, MAC).expect("ib core registration");
    for _ in 0..3 {
        assert_device_healthy(&drv);
    }
    (t.stats().expect("stats"), t.irq_count(0))
}

#[test]
fn local_device_serves_the_driver_deterministically() {
    let _shared = crate::common::shared();
    let first = run_once();
    assert!(first.0.commands > 50 && first.0.cqes >= 24, "{first:?}");
    assert_eq!(first.0.command_errors, 0);
    // Everything the first run built was destroyed; the second run sees the same device.
    assert_eq!(run_once(), first);
}

#[test]
fn local_device_is_inert_on_another_thread() {
    let _shared = crate::common::shared();
    let fabric = Fabric::new();
    let t = Arc::new(Local::new(DeviceConfig::default(), 16 << 20, &fabric).expect("local"));
    let t2 = t.clone();
    let read = std::thread::spawn(move || {
        let mut b = [0u8; 4];
        t2.read(pvrdma_dev::Region::Bar(1), 0, &mut b);
        u32::from_le_bytes(b)
    })
    .join()
    .unwrap();
    assert_eq!(read, u32::MAX);
    let mut b = [0u8; 4];
    t.read(pvrdma_dev::Region::Bar(1), 0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 20, "VERSION on the owning thread");
}
