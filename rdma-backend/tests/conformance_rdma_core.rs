//! The backend conformance suite on the rdma-core backend.
//!
//! The device comes from `PVRDMA_IBDEV` (default `rxe0`), port `PVRDMA_IBPORT` (default 1).
//! Without libibverbs or without that device, the test prints "skipped: no RDMA device" and
//! passes (there is nothing to test here; `tests/e2e/guest/rdma_core_backend.sh` runs it in a
//! guest with soft-RoCE). The conformance cases use the guest GIDs `fe80::1:<n>`: the host netdev
//! must carry those addresses (the guest script adds them to eth0).
#![cfg(feature = "rdma-core")]

use std::sync::Arc;

use rdma_backend::conformance::{Factory, CASES};
use rdma_backend::rdma_core::{self, Config, RdmaCoreBackend};
use rdma_backend::{Backend, CompletionSink, GuestMem};

/// Cases the backend does not support, with the reason.
pub const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "gsi_send",
        "GSI (QP1) is refused: the host's QP1 belongs to the host kernel",
    ),
    (
        "two_devices",
        "includes a GSI exchange (refused, see gsi_send)",
    ),
    (
        "ud_send_grh",
        "RoCE v2 puts the IPv6 header in the GRH slot (rxe: flow label 0, next header UDP)",
    ),
    (
        "access_errors",
        "rxe answers a QP without remote-write rights with RemInvReqErr, not RemAccessErr",
    ),
    (
        "recv_too_small",
        "rxe completes a too-small receive with LocQpOpErr, not LocLenErr",
    ),
    (
        "flush_on_error",
        "rxe (6.12) does not complete a receive posted while the QP is in ERR",
    ),
];

fn config() -> Option<Config> {
    let ibdev = std::env::var("PVRDMA_IBDEV").unwrap_or_else(|_| "rxe0".into());
    let port = std::env::var("PVRDMA_IBPORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(1);
    if let Err(e) = rdma_core::available() {
        println!("skipped: no RDMA device ({e})");
        return None;
    }
    match rdma_core::device_names() {
        Ok(names) if names.contains(&ibdev) => Some(Config { ibdev, port }),
        Ok(names) => {
            println!("skipped: no RDMA device ({ibdev} not among {names:?})");
            None
        }
        Err(e) => {
            println!("skipped: no RDMA device ({e})");
            None
        }
    }
}

#[test]
fn conformance() {
    let Some(cfg) = config() else { return };
    let only = std::env::var("PVRDMA_CASES").ok();
    let factory = |mem: GuestMem, sink: Arc<dyn CompletionSink>| -> Arc<dyn Backend> {
        RdmaCoreBackend::new(cfg.clone(), mem, sink).expect("open the rdma-core backend")
    };
    let f: &Factory<'_> = &factory;
    let (mut passed, mut failed, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    for (name, case) in CASES {
        if let Some(o) = &only {
            if !o.split(',').any(|x| x == *name) {
                continue;
            }
        }
        if let Some((_, why)) = UNSUPPORTED.iter().find(|(n, _)| n == name) {
            println!("conformance {name}: unsupported ({why})");
            skipped.push(*name);
            continue;
        }
        println!("conformance {name}: running");
        let t = std::time::Instant::now();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(f))) {
            Ok(()) => {
                println!("conformance {name}: PASS ({:?})", t.elapsed());
                passed.push(*name);
            }
            Err(_) => {
                println!("conformance {name}: FAIL ({:?})", t.elapsed());
                failed.push(*name);
            }
        }
    }
    println!(
        "conformance on {}: {} passed, {} failed, {} unsupported; failed: {failed:?}",
        cfg.ibdev,
        passed.len(),
        failed.len(),
        skipped.len()
    );
    assert!(failed.is_empty(), "failed cases: {failed:?}");
}
