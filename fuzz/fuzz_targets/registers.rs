//! Arbitrary register traffic on config space and BAR0/1/2 of a probed in-process device.
//! Invariants: every read is answered; afterwards a CTL RESET brings the device back to a
//! state the driver probes again, and that probe's device answers QUERY_PORT.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use pvrdma_dev::pci::{
    CONFIG_SPACE_SIZE, MSIX_BAR_SIZE, MSIX_CAP_OFFSET, MSIX_CTRL_ENABLE, REG_BAR_SIZE,
};
use pvrdma_dev::regs::{ctl, offset};
use pvrdma_dev::Region;
use pvrdma_fuzz::{probed, small_cfg, Cursor};
use pvrdma_guest::{Driver, Transport};
use vm_memory::{Bytes, GuestAddress};

fuzz_target!(|data: &[u8]| {
    let cfg = small_cfg();
    let (t, drv) = probed(&cfg);
    // The device's own answer to each access (the transport hides a failed one as all-ones).
    let read = |region, off, buf: &mut [u8]| {
        t.with_device(|d| d.read(region, off, buf))
            .expect("the device lives on this thread")
    };
    let write = |region, off, buf: &[u8]| {
        t.with_device(|d| d.write(region, off, buf))
            .expect("the device lives on this thread")
    };
    let mut c = Cursor::new(data);
    let mut ops = 0;
    while !c.is_empty() && ops < 128 {
        ops += 1;
        let sel = c.u8();
        let (region, size) = match sel % 4 {
            0 => (Region::Config, CONFIG_SPACE_SIZE),
            1 => (Region::Bar(0), MSIX_BAR_SIZE),
            2 => (Region::Bar(1), REG_BAR_SIZE),
            _ => (Region::Bar(2), cfg.uar_bar_size()),
        };
        // Mostly in range (registers cluster at low offsets); sometimes anything.
        let off = match (sel >> 2) % 8 {
            0 => c.u64(),
            1 | 2 | 3 => u64::from(c.u8() % 0x40),
            _ => u64::from(c.u16()) % size,
        };
        let len = [1usize, 2, 4, 8, 4, 4, 0, 3][usize::from(sel >> 5)];
        if c.u8() & 1 == 0 {
            let mut buf = [0u8; 8];
            read(region, off, &mut buf[..len]).expect("read answered");
        } else {
            let v = c.u64().to_le_bytes();
            // Give the command slot fuzz content now and then, so REQUEST does something.
            if region == Region::Bar(1) && off == offset::REQUEST && len == 4 {
                let slot = c.bytes(184);
                let dsr = drv.dsr;
                let cmd_slot: u64 = t.mem().read_obj(GuestAddress(dsr.0 + 16)).unwrap_or(0);
                let _ = t.mem().write_slice(slot, GuestAddress(cmd_slot));
            }
            write(region, off, &v[..len]).expect("write handled");
        }
    }
    // What firmware and the kernel redo before a probe: memory decoding and bus mastering on,
    // MSI-X enabled with the function unmasked (a CTL RESET leaves config space alone). Then a
    // CTL RESET, and the driver's probe again.
    write(Region::Config, 4, &6u16.to_le_bytes()).unwrap();
    write(
        Region::Config,
        MSIX_CAP_OFFSET + 2,
        &MSIX_CTRL_ENABLE.to_le_bytes(),
    )
    .unwrap();
    write(Region::Bar(1), offset::CTL, &ctl::RESET.to_le_bytes()).unwrap();
    let mut err = [0u8; 4];
    read(Region::Bar(1), offset::ERR, &mut err).unwrap();
    assert_eq!(u32::from_le_bytes(err), 0);
    drop(drv);
    let drv = Driver::probe(t.clone() as Arc<dyn Transport>).expect("probe after CTL RESET");
    drv.query_port(1).expect("QUERY_PORT after reset and probe");
});
