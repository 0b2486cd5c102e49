//! The server on a thread, reached with `vfio_user::Client`: an inherited listening socket,
//! the advertised regions and interrupts, register access, reset, reconnect and stop.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use pvrdma_vfio_user::{RunningServer, ServeOptions};
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_MSIX_IRQ_INDEX,
};

fn temp_socket(name: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("pvrdma-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

#[test]
fn inherited_listener_regions_reset_reconnect_and_stop() {
    let path = temp_socket("inherited");
    let listener = UnixListener::bind(&path).unwrap();
    let mut opts = ServeOptions::new("");
    opts.listen_fd = Some(OwnedFd::from(listener));
    let server = RunningServer::spawn(opts).unwrap();
    for _ in 0..2 {
        let mut c = vfio_user::Client::new(&path).unwrap();
        assert_eq!(c.region(0).unwrap().size, 16 << 10);
        assert_eq!(c.region(1).unwrap().size, 4 << 10);
        assert_eq!(c.region(2).unwrap().size, 512 * 4096);
        assert_eq!(c.region(3).unwrap().size, 0);
        assert_eq!(c.region(7).unwrap().size, 256);
        assert_eq!(c.get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX).unwrap().count, 3);
        assert_eq!(c.get_irq_info(0).unwrap().count, 1);
        let mut id = [0u8; 4];
        c.region_read(7, 0, &mut id).unwrap();
        assert_eq!(u32::from_le_bytes(id), 0x0820_15ad);
        // The whole config space at once, as QEMU reads it.
        let mut cfg = [0u8; 256];
        c.region_read(7, 0, &mut cfg).unwrap();
        assert_eq!(cfg[..4], id);
        // VERSION register.
        let mut v = [0u8; 4];
        c.region_read(1, 0, &mut v).unwrap();
        assert_eq!(u32::from_le_bytes(v), 20);
        c.set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            0,
            &[],
        )
        .unwrap();
        c.reset().unwrap();
        c.shutdown().unwrap();
    }
    server.stop(Duration::from_secs(5)).unwrap();
    let _ = std::fs::remove_file(&path);
}

#[test]
fn stop_while_idle_removes_the_socket() {
    let path = temp_socket("idle");
    let server = RunningServer::spawn(ServeOptions::new(&path)).unwrap();
    assert!(path.exists());
    assert!(
        RunningServer::spawn(ServeOptions::new(&path)).is_err(),
        "path in use"
    );
    server.stop(Duration::from_secs(5)).unwrap();
    assert!(!path.exists());
}
