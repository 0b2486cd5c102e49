//! The `pvrdma` command: a paravirtual RDMA (VMware PVRDMA) device model.
//!
//! ```text
//! pvrdma demo [--size N] [--iters N]     bring a device up in-process and run ping-pong, RDMA
//!                                        write/read and atomics through the real guest rings
//! pvrdma bench [--quick] [options]     perftest-style figures, command latencies and memory,
//!                                        in-process and over a `pvrdma serve` process
//! pvrdma serve --socket PATH [options]   serve the device to a VMM over vfio-user
//! pvrdma ctl [--control PATH] COMMAND    ask a running `pvrdma serve` about its devices
//! ```
#![deny(unsafe_code)]

mod bench;
mod ctl;
mod demo;
mod serve;

use std::process::ExitCode;

fn usage() -> &'static str {
    "usage: pvrdma <command> [options]\n\
     \n\
     commands:\n\
     \x20 demo    bring a device up in-process (emulated backend) and run RC ping-pong,\n\
     \x20         RDMA WRITE/READ and atomics through the guest rings; prints a perftest-like table\n\
     \x20 bench   perftest-style benchmarks in-process and over vfio-user (see `pvrdma bench --help`)\n\
     \x20 serve   run the device as a vfio-user server (see `pvrdma serve --help`)\n\
     \n\
     options for every command: -v (more logging; RUST_LOG also works)\n"
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut verbose = 0u8;
    args.retain(|a| match a.as_str() {
        "-v" | "--verbose" => {
            verbose += 1;
            false
        }
        "-vv" => {
            verbose += 2;
            false
        }
        _ => true,
    });
    init_logging(verbose);
    let Some(cmd) = args.first().cloned() else {
        eprint!("{}", usage());
        return ExitCode::from(2);
    };
    let rest = &args[1..];
    let r = match cmd.as_str() {
        "bench" => bench::run(rest),
        "demo" => demo::run(rest),
        "serve" => serve::run(rest),
        "ctl" => {
            return match ctl::run(rest) {
                Ok(()) => ExitCode::SUCCESS,
                Err(ctl::CtlError::Refused(e)) => {
                    eprintln!("pvrdma ctl: {e}");
                    ExitCode::FAILURE
                }
                Err(ctl::CtlError::Usage(e)) => {
                    eprintln!("pvrdma ctl: {e}");
                    ExitCode::from(2)
                }
            }
        }
        "-h" | "--help" | "help" => {
            print!("{}", usage());
            Ok(())
        }
        other => Err(format!("unknown command `{other}`\n{}", usage())),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pvrdma: {e}");
            ExitCode::FAILURE
        }
    }
}
