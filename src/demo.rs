//! `pvrdma demo`: a device in this process (emulated backend), brought up by the guest-driver
//! harness exactly as `vmw_pvrdma` would, then perftest-like runs through the real guest rings.

use std::sync::Arc;

use pvrdma_dev::DeviceConfig;
use pvrdma_guest::kernel::ib_register;
use pvrdma_guest::perf::{self, Pair, Test};
use pvrdma_guest::transport::DEFAULT_RAM;
use pvrdma_guest::{Driver, InProcess, Transport};
use rdma_backend::emulated::Fabric;

/// The options of `pvrdma demo`.
#[derive(Debug, Clone, clap::Args)]
#[command(args_override_self = true)]
pub struct DemoArgs {
    /// Iterations of each bandwidth case and of the fetch-and-add run (the SEND latency run
    /// takes at most 2000)
    #[arg(short = 'n', long, value_name = "N", default_value_t = 2000)]
    iters: u64,
    /// One message size in bytes instead of 64, 4096, 65536 and 1048576
    #[arg(short, long, value_name = "BYTES")]
    size: Option<u64>,
    #[command(flatten)]
    pub verbosity: crate::Verbosity,
}

struct Opts {
    iters: u64,
    sizes: Vec<u64>,
}

fn opts(a: &DemoArgs) -> Result<Opts, String> {
    let o = Opts {
        iters: a.iters,
        sizes: a
            .size
            .map_or_else(|| vec![64, 4096, 65536, 1 << 20], |s| vec![s]),
    };
    if o.iters == 0 || o.sizes.iter().any(|&s| s == 0 || s > 1 << 30) {
        return Err("demo: iterations must be > 0 and sizes 1..=1 GiB".into());
    }
    Ok(o)
}

/// Runs the demo.
pub fn run(args: &DemoArgs) -> Result<(), String> {
    let o = opts(args)?;
    let mac = [0x00, 0x50, 0x56, 0xaa, 0xbb, 0xcc];
    let cfg = DeviceConfig {
        mac,
        ..DeviceConfig::default()
    };
    let max = *o.sizes.iter().max().unwrap_or(&4096);
    let ram = DEFAULT_RAM.max((4 * max as usize).next_power_of_two() + (64 << 20));
    let t = Arc::new(InProcess::new(cfg, ram, &Fabric::new()));
    let drv = Driver::probe(t.clone() as Arc<dyn Transport>).map_err(|e| format!("probe: {e}"))?;
    println!(
        "device: VMware PVRDMA 15ad:0820, ABI version {}, backend emulated, {} worker threads",
        drv.version,
        DeviceConfig::default().workers
    );
    let k = ib_register(&drv, mac).map_err(|e| format!("ib registration: {e}"))?;
    let port = drv.query_port(1).map_err(|e| e.to_string())?;
    println!(
        "port 1: {} (phys {}), active MTU {}, GID[0] {:?}, GSI qpn {}",
        if port.state == 4 { "ACTIVE" } else { "DOWN" },
        port.phys_state,
        128u32 << port.active_mtu,
        rdma_backend::Gid(k.gid),
        k.gsi.qpn
    );
    let mut p = Pair::new(&drv, 1, k.gid, 128, max.max(4096)).map_err(|e| e.to_string())?;
    println!(
        "RC pair: qpn {} <-> qpn {} (loopback by GID)",
        p.a.qpn, p.b.qpn
    );
    println!();
    println!("{}", perf::header());
    let lat = perf::send_lat(&drv, &mut p, 8, o.iters.min(2000)).map_err(|e| e.to_string())?;
    println!("{}", perf::row(&lat));
    for &size in &o.sizes {
        for test in [Test::SendBw, Test::WriteBw, Test::ReadBw] {
            let s = perf::bw(&drv, &mut p, test, size, o.iters)
                .map_err(|e| format!("{}: {e}", test.name()))?;
            println!("{}", perf::row(&s));
        }
    }
    // The atomic's effect is checked, not just timed: the counter equals the number of adds.
    p.mr_b.write(drv.mem(), 0, &0u64.to_le_bytes());
    let a = perf::bw(&drv, &mut p, Test::AtomicBw, 8, o.iters).map_err(|e| e.to_string())?;
    println!("{}", perf::row(&a));
    let mut b = [0u8; 8];
    p.mr_b.read(drv.mem(), 0, &mut b);
    let counter = u64::from_le_bytes(b);
    if counter != o.iters {
        return Err(format!("atomic counter is {counter}, expected {}", o.iters));
    }
    println!();
    println!(
        "atomic fetch-and-add counter: {counter} (expected {})",
        o.iters
    );
    drv.remove();
    Ok(())
}
