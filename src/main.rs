//! The `pvrdma` command: a paravirtual RDMA (VMware PVRDMA) device model.
//!
//! ```text
//! pvrdma demo [--size N] [--iters N]     bring a device up in-process and run ping-pong, RDMA
//!                                        write/read and atomics through the real guest rings
//! pvrdma bench [--quick] [options]       perftest-style figures, command latencies and memory,
//!                                        in-process and over a `pvrdma serve` process
//! pvrdma serve --socket PATH [options]   serve the device to a VMM over vfio-user
//! pvrdma ctl [--control PATH] COMMAND    ask a running `pvrdma serve` about its devices
//! ```
//!
//! Exit status: 0 done, 1 a run-time error (`pvrdma: <error>` on stderr), 2 bad usage (clap's
//! message); `pvrdma ctl` also exits 2 when the server cannot be reached and 1 when it refuses.
#![deny(unsafe_code)]

mod bench;
mod ctl;
mod demo;
mod serve;

use std::process::ExitCode;

use clap::{ArgAction, Parser, Subcommand, ValueEnum};

/// The format of log lines (on stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line (JSON lines), for log collectors.
    Json,
}

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "pvrdma",
    version,
    about = "Paravirtual RDMA (VMware PVRDMA) device model",
    propagate_version = true,
    term_width = 100,
    subcommand_required = true,
    arg_required_else_help = true,
    after_help = "Exit status: 0 done, 1 a run-time error, 2 bad usage (`pvrdma ctl`: 1 the \
                  server refused, 2 bad usage or no server)."
)]
struct Cli {
    #[command(flatten)]
    verbosity: Verbosity,
    /// Log lines as `text` or `json` (JSON lines) [default: text]
    #[arg(long, value_name = "FORMAT", global = true)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

/// `-v`: the commands take it too, so it counts wherever it is on the line.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Verbosity {
    /// More logging (-v, -vv, -vvv); RUST_LOG overrides. Default: info for `serve`, warnings
    /// for the other commands
    #[arg(short, long, action = ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Bring a device up in-process (emulated backend) and run RC ping-pong, RDMA WRITE/READ
    /// and atomics through the guest rings; prints a perftest-like table
    Demo(demo::DemoArgs),
    /// Perftest-style benchmarks in-process and over vfio-user
    Bench(bench::BenchArgs),
    Serve(Box<serve::ServeArgs>),
    /// Ask a running `pvrdma serve --control PATH` about its devices
    Ctl(ctl::CtlArgs),
}

/// The log filter: `RUST_LOG` if set, else `-v` over the command's default, else the
/// configuration's `level` (a filter like RUST_LOG's), else the command's default.
fn log_filter(verbose: u8, daemon: bool, level: Option<&str>) -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::EnvFilter;
    if let Ok(f) = EnvFilter::try_from_default_env() {
        return f;
    }
    const LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];
    let base = if daemon { 2 } else { 1 };
    if verbose == 0 {
        if let Some(f) = level.and_then(|l| EnvFilter::try_new(l).ok()) {
            return f;
        }
    }
    EnvFilter::new(LEVELS[(base + verbose as usize).min(LEVELS.len() - 1)])
}

/// Logs on stderr, each line with its thread's name: the threads of a device are named after
/// the device, so every line says which device it is about. Colours only on a terminal (not in
/// the journal or a log file).
fn init_logging(filter: tracing_subscriber::EnvFilter, format: LogFormat) {
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_thread_names(true);
    let _ = match format {
        LogFormat::Text => b.try_init(),
        LogFormat::Json => b.json().flatten_event(true).try_init(),
    };
}

/// A run-time error: `pvrdma: <error>`, exit status 1.
fn failed(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("pvrdma: {e}");
    ExitCode::FAILURE
}

impl Cli {
    /// Every `-v` of the line, before the command and after it.
    fn verbose(&self) -> u8 {
        let sub = match &self.command {
            Command::Demo(a) => a.verbosity.verbose,
            Command::Bench(a) => a.verbosity.verbose,
            Command::Serve(a) => a.verbosity.verbose,
            Command::Ctl(a) => a.verbose(),
        };
        self.verbosity.verbose.saturating_add(sub)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let verbose = cli.verbose();
    let format = cli.log_format;
    let plain = || {
        init_logging(
            log_filter(verbose, false, None),
            format.unwrap_or(LogFormat::Text),
        )
    };
    let r = match &cli.command {
        Command::Serve(a) => {
            let loaded = match serve::load(a) {
                Ok(l) => l,
                Err(e) => return failed(e),
            };
            init_logging(
                log_filter(verbose, true, loaded.log_level()),
                format.or(loaded.log_format()).unwrap_or(LogFormat::Text),
            );
            serve::run(a, loaded)
        }
        Command::Demo(a) => {
            plain();
            demo::run(a)
        }
        Command::Bench(a) => {
            plain();
            bench::run(a)
        }
        Command::Ctl(a) => {
            plain();
            return match ctl::run(a) {
                Ok(()) => ExitCode::SUCCESS,
                Err(ctl::CtlError::Refused(e)) => {
                    eprintln!("pvrdma ctl: {e}");
                    ExitCode::FAILURE
                }
                Err(ctl::CtlError::Usage(e)) => {
                    eprintln!("pvrdma ctl: {e}");
                    ExitCode::from(2)
                }
            };
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(line: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(line.split_whitespace())
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every way the README, the docs, the scripts and the tests start `pvrdma` still parses.
    #[test]
    fn old_invocations_still_parse() {
        for line in [
            "pvrdma demo",
            "pvrdma demo --iters 100 --size 4096",
            "pvrdma demo -n 100 -s 64 -v",
            "pvrdma -v demo",
            "pvrdma bench --quick",
            "pvrdma bench --quick --only mem",
            "pvrdma bench --only vms --sizes 64,4096,65536,1048576",
            "pvrdma bench --sizes 8,64,1048576 --tests send_bw,write_bw,send_lat",
            "pvrdma bench --quick --only data --transport inproc --tests send_bw --sizes 64",
            "pvrdma bench --only hostile --hostile mem,copy --pairs 2 --qps 0 --depth 64 \
             --batch 16 --sig 8 --workers 1 --poll-us 0 --bytes 1048576",
            "pvrdma serve --socket /run/pvrdma.sock --mac 52:54:00:12:34:56",
            "pvrdma serve --socket /tmp/s.sock --mac 52:54:00:12:34:56 --roce-version 2",
            "pvrdma serve --device socket=/run/pvrdma/vm1.sock,mac=52:54:00:12:34:01 \
             --device socket=/run/pvrdma/vm2.sock,mac=52:54:00:12:34:02,max-qp=256",
            "pvrdma serve --config /etc/pvrdma/devices.toml",
            "pvrdma serve --socket S --backend rdma-core --ibdev mlx5_0 --ibport 1",
            "pvrdma serve --backend rdma-core --ibdev rxe0 --socket /tmp/s.sock",
            "pvrdma serve --backend emulated --mac 00:50:56:12:34:56",
            "pvrdma serve --mac 52:54:00:00:10:01 --workers 1 --config /tmp/devices.toml",
            "pvrdma serve --socket /tmp/p.sock --workers 2 --poll-us 32 --max-host-mem 64M",
            "pvrdma serve --device socket=/tmp/vm0.sock,mac=00:50:56:12:34:56 --workers 1 \
             --max-host-mem 16M",
            "pvrdma serve --control /run/pvrdma/control.sock --metrics 127.0.0.1:9464 \
             --max-devices 16 --max-memory 4G --max-cq 64 --max-mr 128",
            "pvrdma serve -vv --mac 52:54:00:12:34:56",
            "pvrdma -v serve --socket /tmp/s.sock -v",
            "pvrdma serve --mac=52:54:00:12:34:56 --max-qp=64 --socket=/tmp/s.sock",
            "pvrdma ctl list",
            "pvrdma ctl --control /run/pvrdma/control.sock --json list",
            "pvrdma ctl list --json --control=/tmp/c.sock",
            "pvrdma ctl stats vm1",
            "pvrdma ctl resources vm1",
            "pvrdma ctl resources vm1 qp",
            "pvrdma ctl add socket=/run/pvrdma/vm3.sock,mac=52:54:00:12:34:03",
            "pvrdma ctl remove vm3",
            "pvrdma ctl version",
        ] {
            if let Err(e) = parse(line) {
                panic!("{line}: {e}");
            }
        }
    }

    #[test]
    fn verbosity_and_log_format_are_global() {
        for (line, v) in [
            ("pvrdma -v demo", 1),
            ("pvrdma demo -vv", 2),
            ("pvrdma -v serve --socket /s -v --verbose", 3),
            ("pvrdma ctl -v list", 1),
            ("pvrdma ctl list -vvv", 3),
            ("pvrdma -v ctl -v stats vm1 -v", 3),
        ] {
            assert_eq!(parse(line).unwrap().verbose(), v, "{line}");
        }
        let c = parse("pvrdma serve --log-format json --socket /s").unwrap();
        assert_eq!(c.log_format, Some(LogFormat::Json));
        let c = parse("pvrdma --log-format=text bench --quick").unwrap();
        assert_eq!(c.log_format, Some(LogFormat::Text));
        assert!(parse("pvrdma --log-format xml demo").is_err());
    }

    #[test]
    fn usage_errors_are_clap_errors() {
        use clap::error::ErrorKind;
        for (line, kind) in [
            (
                "pvrdma",
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand,
            ),
            ("pvrdma frobnicate", ErrorKind::InvalidSubcommand),
            ("pvrdma serve --bogus", ErrorKind::UnknownArgument),
            ("pvrdma serve --max-qp", ErrorKind::InvalidValue),
            ("pvrdma serve --max-qp lots", ErrorKind::ValueValidation),
            ("pvrdma serve --backend nope", ErrorKind::InvalidValue),
            (
                "pvrdma serve --device mac=52:54:00:12:34:01",
                ErrorKind::ValueValidation,
            ),
            ("pvrdma demo --iters x", ErrorKind::ValueValidation),
            ("pvrdma bench --tests nope", ErrorKind::ValueValidation),
            (
                "pvrdma bench --transport carrier-pigeon",
                ErrorKind::InvalidValue,
            ),
            (
                "pvrdma ctl",
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand,
            ),
            ("pvrdma ctl stats", ErrorKind::MissingRequiredArgument),
            ("pvrdma ctl resources vm1 nope", ErrorKind::InvalidValue),
            ("pvrdma ctl list extra", ErrorKind::UnknownArgument),
            ("pvrdma --version", ErrorKind::DisplayVersion),
            ("pvrdma serve --help", ErrorKind::DisplayHelp),
        ] {
            let e = parse(line).expect_err(line);
            assert_eq!(e.kind(), kind, "{line}: {e}");
            let help = matches!(
                kind,
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            );
            assert_eq!(
                e.exit_code(),
                if help && kind != ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    0
                } else {
                    2
                },
                "{line}"
            );
        }
    }

    #[test]
    fn the_default_log_level_suits_the_command() {
        if std::env::var_os("RUST_LOG").is_some() {
            return;
        }
        let f = |v, daemon, level| log_filter(v, daemon, level).to_string();
        assert_eq!(f(0, true, None), "info");
        assert_eq!(f(0, false, None), "warn");
        assert_eq!(f(1, false, None), "info");
        assert_eq!(f(1, true, None), "debug");
        assert_eq!(f(9, true, None), "trace");
        assert_eq!(f(0, true, Some("warn")), "warn");
        assert_eq!(f(2, true, Some("warn")), "trace");
    }
}
