//! The conformance suite on the emulated backend.

use std::sync::Arc;

use rdma_backend::conformance::{self, Factory};
use rdma_backend::emulated::{EmulatedBackend, Fabric};
use rdma_backend::{Backend, CompletionSink, GuestMem};

fn run(case: fn(&Factory<'_>)) {
    let fabric = Fabric::new();
    let f = move |mem: GuestMem, sink: Arc<dyn CompletionSink>| -> Arc<dyn Backend> {
        EmulatedBackend::new(&fabric, mem, sink)
    };
    case(&f);
}

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        $(#[test] fn $name() { run(conformance::$name); })*
        #[test]
        fn every_case_is_listed() {
            let here = [$(stringify!($name)),*];
            for (name, _) in conformance::CASES {
                assert!(here.contains(name), "{name} is not run");
            }
        }
    };
}

cases!(
    rc_ping_pong,
    rc_opcodes,
    rc_16mib,
    rc_atomics,
    atomics_concurrent,
    ud_send_grh,
    ud_length_errors,
    gsi_send,
    ud_qkey_mismatch,
    srq,
    rnr_late_recv,
    rnr_exhausted,
    access_errors,
    recv_too_small,
    flush_on_error,
    state_transitions,
    destroy_busy,
    two_devices,
    gsi_two_devices,
    no_completion_after_destroy,
    bidirectional_stress,
    device_reset,
);
