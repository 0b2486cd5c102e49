//! The backend conformance suite on the rdma-core backend.
//!
//! The device comes from `PVRDMA_IBDEV` (default `rxe0`), port `PVRDMA_IBPORT` (default 1).
//! Without libibverbs or without that device, the test prints "skipped: no RDMA device" and
//! passes (there is nothing to test here; `tests/e2e/guest/rdma_core_backend.sh` runs it in a
//! guest with soft-RoCE). The conformance cases use the guest GIDs `fe80::1:<n>`: the host netdev
//! must carry those addresses (the guest script adds them to eth0). `PVRDMA_CASES=a,b` runs only
//! those cases; `PVRDMA_PROBE_UNSUPPORTED=1` also runs the unsupported ones and reports how they
//! end (diagnostics; they never fail the test).

use std::sync::Arc;

use rdma_backend::conformance::{self, Factory, CASES};
use rdma_backend::rdma_core::{self, Config, RdmaCoreBackend};
use rdma_backend::{Backend, CompletionSink, GuestMem};

/// Cases the backend does not support, with the reason.
pub const UNSUPPORTED: &[(&str, &str)] = &[(
    "ud_length_errors",
    "rxe (6.12) sends a UD message longer than the path MTU and completes it successfully, \
         and drops a datagram too long for the receive buffer without completing the receive \
         (IB: LocLenErr for both, the sender's QP to SQE)",
)];

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
        Ok(names) if names.contains(&ibdev) => Some(Config {
            ibdev,
            port,
            // The suite's devices bind fe80::1:<n>.
            gids: (1..=16).map(conformance::device_gid).collect(),
        }),
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
    let probe_unsupported = std::env::var_os("PVRDMA_PROBE_UNSUPPORTED").is_some();
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
            if probe_unsupported {
                // Diagnostics only: run it anyway and say how it ends; never a failure.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(f)));
                println!(
                    "conformance {name}: unsupported, ran anyway: {}",
                    if r.is_ok() { "passes" } else { "fails" }
                );
            }
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

/// A sink for backends that never carry traffic.
struct NoSink;
impl CompletionSink for NoSink {
    fn complete(&self, _: &[rdma_backend::WorkCompletion]) {}
    fn event(&self, _: rdma_backend::AsyncEvent) {}
    fn progress_needed(&self) {}
}

fn open(cfg: Config) -> rdma_backend::Result<Arc<RdmaCoreBackend>> {
    let mem = GuestMem::new(vm_memory::GuestMemoryMmap::new());
    RdmaCoreBackend::new(cfg, mem, Arc::new(NoSink))
}

/// An unknown host device: the error names it and lists the host's devices.
#[test]
fn clear_error_unknown_ibdev() {
    let Some(cfg) = config() else { return };
    let e = open(Config {
        ibdev: "pvrdma_no_such_dev".into(),
        ..cfg.clone()
    })
    .expect_err("no such device")
    .to_string();
    println!("clear error, unknown ibdev: {e}");
    assert!(
        e.contains("no RDMA device named pvrdma_no_such_dev") && e.contains(&cfg.ibdev),
        "{e}"
    );
}

/// A port the host device does not have: the error names the device and the port.
#[test]
fn clear_error_missing_port() {
    let Some(cfg) = config() else { return };
    let e = open(Config {
        port: 9,
        ..cfg.clone()
    })
    .expect_err("no port 9")
    .to_string();
    println!("clear error, missing port: {e}");
    assert!(
        e.contains(&format!("ibv_query_port({}, 9)", cfg.ibdev)),
        "{e}"
    );
}

/// A guest GID the host port has no entry for (with the guest's GID type): ADD_GID fails,
/// naming the GID, its type, the device and port, and what to do.
#[test]
fn clear_error_gid_not_on_host() {
    let Some(cfg) = config() else { return };
    // The guest script gives the host netdev fe80::1:1 and fe80::1:2 only.
    let g = conformance::device_gid(16);
    let b = open(cfg.clone()).expect("open the rdma-core backend");
    let e = b
        .add_gid(0, g, rdma_backend::GidType::RoceV2)
        .expect_err("GID not on the host")
        .to_string();
    println!("clear error, GID not on the host: {e}");
    assert!(
        e.contains(&format!(
            "is not in the GID table of {} port {}",
            cfg.ibdev, cfg.port
        )) && e.contains("give the host netdev the guest's address"),
        "{e}"
    );
}

/// A host port with no GID of the guest's type (rxe's GIDs are all RoCE v2; the guest binds
/// RoCE v1): the check `pvrdma serve` runs when a device is configured or added, and ADD_GID,
/// both say so, naming the types the port has and what to do.
#[test]
fn clear_error_no_gid_of_the_guests_type() {
    let Some(cfg) = config() else { return };
    let want = format!(
        "{} port {} has no RoCE v1 GID (its GIDs are RoCE v2)",
        cfg.ibdev, cfg.port
    );
    let e = rdma_core::check_gid_type(&cfg, rdma_backend::GidType::RoceV1)
        .expect_err("no RoCE v1 GID on rxe")
        .to_string();
    println!("clear error, no GID of the guest's type: {e}");
    assert!(e.contains(&want) && e.contains("--roce-version 2"), "{e}");
    rdma_core::check_gid_type(&cfg, rdma_backend::GidType::RoceV2).expect("rxe's GIDs are RoCE v2");
    // fe80::1:1 is on the host (as RoCE v2); bound as RoCE v1 it is refused the same way.
    let b = open(cfg.clone()).expect("open the rdma-core backend");
    let e = b
        .add_gid(0, conformance::device_gid(1), rdma_backend::GidType::RoceV1)
        .expect_err("no RoCE v1 GID on rxe")
        .to_string();
    assert!(e.contains(&want), "{e}");
}
