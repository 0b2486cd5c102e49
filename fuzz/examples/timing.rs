//! Times the cmd_channel target's pieces: probing a fresh device, and whole corpus inputs.
//! `cargo run --release --example timing -- corpus/cmd_channel`
use std::time::Instant;
fn main() {
    let cfg = pvrdma_fuzz::small_cfg();
    let t = Instant::now();
    for _ in 0..200 {
        let (d, drv) = pvrdma_fuzz::probed(&cfg);
        drop(drv);
        drop(d);
    }
    println!("probe+drop: {:?} each", t.elapsed() / 200);
    let (_d, drv) = pvrdma_fuzz::probed(&cfg);
    let t = Instant::now();
    for _ in 0..2000 {
        drv.query_port(1).unwrap();
    }
    println!("query_port: {:?} each", t.elapsed() / 2000);
    if let Some(dir) = std::env::args().nth(1) {
        let repeat: u32 = std::env::var("REPEAT")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(1);
        let inputs: Vec<Vec<u8>> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        let mut n = 0;
        let t = Instant::now();
        for _ in 0..repeat {
            for data in &inputs {
                pvrdma_fuzz::run_cmd_channel(data);
                n += 1;
            }
        }
        println!("corpus: {n} inputs, {:?} each", t.elapsed() / n);
    }
}
