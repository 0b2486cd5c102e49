//! Spawns and shuts down 50 probed devices and prints the process's thread count and RSS
//! before and after (a regression check for devices leaking their worker threads).
fn status(key: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or("")
        .to_string()
}

fn main() {
    let cfg = pvrdma_fuzz::small_cfg();
    println!("before: {} {}", status("Threads"), status("VmRSS"));
    for _ in 0..50 {
        let (t, drv) = pvrdma_fuzz::probed(&cfg);
        drv.query_port(1).unwrap();
        drop(drv);
        drop(t);
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    println!(
        "after 50 devices: {} {}",
        status("Threads"),
        status("VmRSS")
    );
}
