//! The `pvrdma` binary (every build has the rdma-core backend), on the host the test runs on:
//! `--backend emulated` serves a guest whether or not libibverbs is installed, and
//! `--backend rdma-core` either works or refuses at start-up with a message that says why.
//! Alone: `cargo test -p pvrdma --test integration rdma_core_feature::` (the CI host has no
//! libibverbs).

use crate::common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use crate::common::assert_device_healthy;
use pvrdma_guest::vfio::{ServeProcess, VfioUser};
use pvrdma_guest::{kernel, Driver, Transport};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_pvrdma"))
}

#[test]
fn emulated_backend_serves_with_or_without_libibverbs() {
    let _shared = crate::common::shared();
    let loadable = rdma_backend::rdma_core::available().is_ok();
    println!("libibverbs.so.1 loadable here: {loadable}");
    let serve = ServeProcess::spawn(
        bin(),
        &["--backend", "emulated", "--mac", "00:50:56:12:34:56"],
    )
    .expect("pvrdma serve --backend emulated starts");
    let t = Arc::new(VfioUser::connect(serve.socket()).expect("connect"));
    let drv = Driver::probe(t as Arc<dyn Transport>).expect("probe");
    kernel::ib_register(&drv, common::MAC).expect("ib registration");
    assert_device_healthy(&drv);
}

#[test]
fn rdma_core_backend_refuses_clearly_without_libibverbs() {
    let _shared = crate::common::shared();
    if rdma_backend::rdma_core::available().is_ok() {
        println!("skipped: libibverbs is installed here");
        return;
    }
    let dir = std::env::temp_dir().join(format!("pvrdma-rcf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(bin())
        .args([
            "serve",
            "--backend",
            "rdma-core",
            "--ibdev",
            "rxe0",
            "--socket",
        ])
        .arg(dir.join("s.sock"))
        .output()
        .expect("run pvrdma serve");
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must not start: {err}");
    assert!(
        err.contains("libibverbs.so.1") && err.contains("--backend emulated"),
        "the message names the missing library and the way out: {err}"
    );
}
