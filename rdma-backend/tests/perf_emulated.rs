//! Rough throughput checks of the emulated backend (release builds only):
//! `cargo test --release -p rdma-backend --test perf_emulated -- --ignored --nocapture`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rdma_backend::conformance::{Dev, RcOpts, SEND};
use rdma_backend::emulated::{EmulatedBackend, Fabric};
use rdma_backend::{
    Access, AsyncEvent, Backend, CompletionSink, GuestMem, RecvWr, SendOp, SendWr, WorkCompletion,
};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};

/// Counts completions; deferred work goes to the suite's sink (its progress thread).
struct Counter(Arc<AtomicU64>, Arc<dyn CompletionSink>);

impl CompletionSink for Counter {
    fn complete(&self, wcs: &[WorkCompletion]) {
        self.0.fetch_add(wcs.len() as u64, Ordering::Relaxed);
    }
    fn event(&self, _: AsyncEvent) {}
    fn progress_needed(&self) {
        self.1.progress_needed();
    }
}

const ALL: Access = Access::all();

#[test]
#[ignore = "performance check; run in release"]
fn send_rate_and_write_bandwidth() {
    let fabric = Fabric::new();
    let counter = Arc::new(AtomicU64::new(0));
    let c = counter.clone();
    let f = move |mem: GuestMem, sink: Arc<dyn CompletionSink>| -> Arc<dyn Backend> {
        EmulatedBackend::new(&fabric, mem, Arc::new(Counter(c.clone(), sink)))
    };
    let d = Dev::new(&f, 1);
    let (qa, qb, _, _) = rdma_backend::conformance::rc_pair(&d, &d, RcOpts::default());
    let buf = d.buf(8 << 20, ALL);
    let n = 2_000_000u64;
    let recv = RecvWr {
        wr_id: 0,
        sges: buf.sges(4096, 64, 1),
    };
    let send = SendWr {
        signaled: true,
        ..rdma_backend::conformance::wr(0, SEND, buf.sges(0, 64, 1))
    };
    let t = Instant::now();
    for _ in 0..n {
        d.be.post_recv(qb, &recv).unwrap();
        d.be.post_send(qa, &send).unwrap();
    }
    let el = t.elapsed();
    assert_eq!(counter.load(Ordering::Relaxed), 2 * n);
    println!(
        "64-byte SEND: {:.2} M msg/s",
        n as f64 / el.as_secs_f64() / 1e6
    );

    let len = 1u64 << 20;
    let dst = d.buf(len, ALL);
    let op = SendOp::RdmaWrite {
        remote_addr: dst.iova,
        rkey: dst.keys.rkey,
        imm: None,
    };
    let w = rdma_backend::conformance::wr(1, op, buf.sges(0, len, 1));
    let iters = 2000;
    let t = Instant::now();
    for _ in 0..iters {
        d.be.post_send(qa, &w).unwrap();
    }
    let write_bw = (len * iters) as f64 / t.elapsed().as_secs_f64() / 1e9;
    let csrc = d.buf_in(d.pd, len, ALL, false);
    let cdst = d.buf_in(d.pd, len, ALL, false);
    let op = SendOp::RdmaWrite {
        remote_addr: cdst.iova,
        rkey: cdst.keys.rkey,
        imm: None,
    };
    let w = rdma_backend::conformance::wr(2, op, csrc.sges(0, len, 1));
    let t = Instant::now();
    for _ in 0..iters {
        d.be.post_send(qa, &w).unwrap();
    }
    let contig_bw = (len * iters) as f64 / t.elapsed().as_secs_f64() / 1e9;
    // Reference: memcpy of 1 MiB within guest memory.
    let m = d.mem.memory();
    let src = m.get_slice(GuestAddress(32 << 20), len as usize).unwrap();
    let dstm = m.get_slice(GuestAddress(48 << 20), len as usize).unwrap();
    m.write_slice(&vec![1u8; len as usize], GuestAddress(32 << 20))
        .unwrap();
    let t = Instant::now();
    for _ in 0..iters {
        src.copy_to_volatile_slice(dstm);
    }
    let memcpy_bw = (len * iters) as f64 / t.elapsed().as_secs_f64() / 1e9;
    println!(
        "1 MiB WRITE (contiguous pages): {contig_bw:.2} GB/s; ratio {:.2}",
        contig_bw / memcpy_bw
    );
    println!(
        "1 MiB WRITE (shuffled pages): {write_bw:.2} GB/s; memcpy {memcpy_bw:.2} GB/s; ratio {:.2}",
        write_bw / memcpy_bw
    );
}
