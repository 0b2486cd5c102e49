//! The command channel of a probed in-process device, fed a sequence of 184-byte requests,
//! guest-memory scribbles, page directories and doorbells (format: `pvrdma_fuzz::op`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pvrdma_fuzz::run_cmd_channel(data);
});
