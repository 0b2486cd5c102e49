//! Where a `cmd_channel` iteration spends its time (spawn, probe, a command, shutdown).
use std::time::Instant;

fn main() {
    let cfg = pvrdma_fuzz::small_cfg();
    for _ in 0..3 {
        let t0 = Instant::now();
        let t = pvrdma_fuzz::device(&cfg);
        let t1 = Instant::now();
        let drv = pvrdma_guest::Driver::probe(t.clone() as std::sync::Arc<dyn pvrdma_guest::Transport>).unwrap();
        let t2 = Instant::now();
        drv.query_port(1).unwrap();
        let t3 = Instant::now();
        drop(drv);
        drop(t);
        let t4 = Instant::now();
        println!("spawn {:?} probe {:?} cmd {:?} drop {:?}", t1 - t0, t2 - t1, t3 - t2, t4 - t3);
    }
}
