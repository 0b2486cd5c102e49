//! The probe sequence and the kernel's registration sequence, as `vmw_pvrdma` and ib_mad run them.

use crate::common;

use pvrdma_dev::regs::offset;
use pvrdma_guest::kernel::ib_register;

#[test]
fn probe_writes_caps_and_activates() {
    let _shared = crate::common::shared();
    let (_t, drv) = common::probed();
    assert_eq!(drv.version, 20);
    assert_eq!(drv.caps.mode, 0);
    assert_eq!(drv.caps.gid_types, 1);
    assert!(drv.caps.max_uar.is_power_of_two());
    assert!(drv.caps.max_qp < 65536);
    assert_eq!(drv.caps.phys_port_cnt, 1);
    assert_eq!(drv.reg(offset::ERR), 0);
    // PORT_ACTIVE is posted on activation (no link-state caching in the driver).
    let ev = drv.events();
    assert_eq!(ev, vec![(9, 1)]);
}

#[test]
fn kernel_registration_sequence() {
    let _shared = crate::common::shared();
    let (_t, drv) = common::probed();
    let k = ib_register(&drv, common::MAC).expect("ib_register");
    assert_eq!(k.gsi.qpn, 1, "GSI must be QP1");
    assert_ne!(k.gsi.handle, 0);
    let port = drv.query_port(1).unwrap();
    assert_eq!(port.state, 4);
    assert_eq!(port.phys_state, 5);
    assert_eq!(port.active_mtu, 3);
    assert_eq!(drv.query_pkey(1, 0).unwrap(), 0xffff);
}
