//! The emulated backend's copy engine alone: RDMA WRITEs between two user MRs on shuffled guest
//! pages (memfd guest RAM, as vfio-user gives it), one thread, each WRITE posted and its
//! completion awaited before the next. No device, rings or threads: what is left is the page
//! walk and the copies, the part of `pvrdma bench`'s WRITE rows that is not the device's.
//!
//! `cargo bench -p rdma-backend --bench copy` (add `-- --quick` or set `BENCH_QUICK=1` for a
//! short run). For instruction counts: `BENCH_QUICK=1 valgrind --tool=callgrind <the bench
//! binary under target/release/deps>`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma_backend::conformance::{rc_pair, Dev, RcOpts};
use rdma_backend::emulated::{EmulatedBackend, Fabric};
use rdma_backend::{Access, Backend, CompletionSink, GuestMem, SendOp, WcStatus};

fn main() {
    let quick = std::env::args().any(|a| a == "--quick")
        || std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1");
    let fabric = Fabric::new();
    let factory = move |m: GuestMem, s: Arc<dyn CompletionSink>| -> Arc<dyn Backend> {
        EmulatedBackend::new(&fabric, m, s)
    };
    let dev = Dev::new(&factory, 1);
    let (qp, _, _, _) = rc_pair(&dev, &dev, RcOpts::default());
    let access = Access::LOCAL_WRITE | Access::REMOTE_WRITE;
    println!(
        "emulated backend alone: RDMA WRITE between shuffled 4 KiB pages, one thread, synchronous"
    );
    println!(
        "{:>9} {:>10} {:>12} {:>10}",
        "bytes", "writes", "MB/s", "Mmsg/s"
    );
    for size in [64u64, 65536, 1 << 20] {
        let (src, dst) = (dev.buf(size, access), dev.buf(size, access));
        let budget: u64 = if quick { 64 << 20 } else { 8 << 30 };
        let n = (budget / size).clamp(100, if quick { 20_000 } else { 1_000_000 });
        let start = Instant::now();
        for i in 0..n {
            let op = SendOp::RdmaWrite {
                remote_addr: dst.iova,
                rkey: dst.keys.rkey,
                imm: None,
            };
            dev.send(qp, i, op, src.sges(0, size, 1));
            let wc = dev.sink.wait(1, Duration::from_secs(10));
            assert_eq!(wc[0].status, WcStatus::Success);
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{size:>9} {n:>10} {:>12.1} {:>10.4}",
            (size * n) as f64 / secs / 1e6,
            n as f64 / secs / 1e6
        );
    }
}
