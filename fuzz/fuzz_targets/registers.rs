//! Arbitrary register traffic on config space and BAR0/1/2 of a probed in-process device.
//! Invariants: every read is answered; afterwards a CTL RESET brings the device back to a
//! state the driver probes again, and that probe's device answers QUERY_PORT.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pvrdma_fuzz::run_registers(data);
});
