//! `pvrdma ctl`: asks a running `pvrdma serve` about its devices over its control socket
//! (`--control PATH`; the protocol is `pvrdma_vfio_user::control`'s) and prints the answer as
//! a table, or as the JSON the server sent (`--json`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Map, Value};

/// The options of `pvrdma ctl`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    args_override_self = true,
    after_help = "Exit status: 0 done, 1 the server refused (its reason on stderr), 2 bad usage \
                  or no server."
)]
pub struct CtlArgs {
    /// The control socket of `pvrdma serve --control PATH`
    #[arg(
        long,
        value_name = "PATH",
        env = "PVRDMA_CONTROL",
        default_value = "/run/pvrdma/control.sock",
        global = true
    )]
    control: PathBuf,
    /// Print the server's JSON result instead of a table
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    verbosity: crate::Verbosity,
    #[command(subcommand)]
    command: CtlCommand,
}

/// A request to the server.
#[derive(Debug, Clone, clap::Subcommand)]
enum CtlCommand {
    /// Every device: socket, MAC, backend, client connected, clients so far
    List {
        #[command(flatten)]
        v: crate::Verbosity,
    },
    /// The device's counters
    Stats {
        /// The device's name
        device: String,
        #[command(flatten)]
        v: crate::Verbosity,
    },
    /// Its objects like `rdma resource show`
    Resources {
        /// The device's name
        device: String,
        /// Only objects of this kind [default: all]
        #[arg(value_enum)]
        kind: Option<Kind>,
        #[command(flatten)]
        v: crate::Verbosity,
    },
    /// Start a device: the SPEC of `pvrdma serve --device` (socket=PATH,mac=MAC,...)
    Add {
        /// socket=PATH,mac=MAC,...
        spec: String,
        #[command(flatten)]
        v: crate::Verbosity,
    },
    /// Stop a device (its client's connection is closed)
    Remove {
        /// The device's name
        device: String,
        #[command(flatten)]
        v: crate::Verbosity,
    },
    /// The server's version
    Version {
        #[command(flatten)]
        v: crate::Verbosity,
    },
}

impl CtlArgs {
    /// Its `-v`s, before the command and after it.
    pub fn verbose(&self) -> u8 {
        let sub = match &self.command {
            CtlCommand::List { v }
            | CtlCommand::Version { v }
            | CtlCommand::Stats { v, .. }
            | CtlCommand::Resources { v, .. }
            | CtlCommand::Add { v, .. }
            | CtlCommand::Remove { v, .. } => v.verbose,
        };
        self.verbosity.verbose.saturating_add(sub)
    }
}

/// The kinds of objects of `resources`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Kind {
    Pd,
    Cq,
    Mr,
    Qp,
    Srq,
    Gid,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Pd => "pd",
            Kind::Cq => "cq",
            Kind::Mr => "mr",
            Kind::Qp => "qp",
            Kind::Srq => "srq",
            Kind::Gid => "gid",
        }
    }
}

/// What went wrong, and the exit status it deserves.
#[derive(Debug)]
pub enum CtlError {
    /// Bad command line, or the server cannot be reached (exit status 2).
    Usage(String),
    /// The server answered with an error (exit status 1).
    Refused(String),
}

fn usage(msg: impl Into<String>) -> CtlError {
    CtlError::Usage(msg.into())
}

/// Runs `pvrdma ctl`.
pub fn run(a: &CtlArgs) -> Result<(), CtlError> {
    let request = request(&a.command)?;
    let result = call(&a.control, &request)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&result).unwrap_or_default()
        );
        return Ok(());
    }
    match &a.command {
        CtlCommand::List { .. } => print_table(result.as_array().map_or(&[][..], |v| v)),
        CtlCommand::Stats { .. } => print_pairs(&result),
        CtlCommand::Resources { kind, .. } => print_resources(&result, kind.map(Kind::name)),
        CtlCommand::Add { .. } => print_table(std::slice::from_ref(&result)),
        CtlCommand::Version { .. } => println!(
            "{} {}",
            result["name"].as_str().unwrap_or("?"),
            result["version"].as_str().unwrap_or("?")
        ),
        CtlCommand::Remove { .. } => {}
    }
    Ok(())
}

/// The request for a command.
fn request(c: &CtlCommand) -> Result<Value, CtlError> {
    Ok(match c {
        CtlCommand::List { .. } => json!({"command": "list"}),
        CtlCommand::Version { .. } => json!({"command": "version"}),
        CtlCommand::Stats { device, .. } => json!({"command": "stats", "device": device}),
        CtlCommand::Remove { device, .. } => json!({"command": "remove", "device": device}),
        CtlCommand::Resources { device, .. } => json!({"command": "resources", "device": device}),
        CtlCommand::Add { spec, .. } => {
            let mut keys = Map::new();
            for kv in spec.split(',') {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| usage(format!("`{kv}` is not key=value")))?;
                keys.insert(k.to_string(), Value::String(v.to_string()));
            }
            json!({"command": "add", "device": keys})
        }
    })
}

/// Sends one request and returns the result, or the server's error.
fn call(socket: &std::path::Path, request: &Value) -> Result<Value, CtlError> {
    let unreachable =
        |e: std::io::Error| usage(format!("control socket {}: {e}", socket.display()));
    let stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(unreachable)?;
    let mut out = stream.try_clone().map_err(unreachable)?;
    writeln!(out, "{request}").map_err(unreachable)?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(unreachable)?;
    let reply: Value = serde_json::from_str(&line).map_err(|e| {
        usage(format!(
            "control socket {}: bad reply: {e}",
            socket.display()
        ))
    })?;
    if reply["ok"] == Value::Bool(true) {
        Ok(reply["result"].clone())
    } else {
        Err(CtlError::Refused(
            reply["error"]
                .as_str()
                .unwrap_or("unknown error")
                .to_string(),
        ))
    }
}

/// A scalar as a table cell.
fn cell(v: &Value) -> String {
    match v {
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// `obj` flattened to `a.b.c = value` pairs, in order.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => out.push((prefix.to_string(), cell(other))),
    }
}

/// Rows of objects as a table: a column per (flattened) field of the first row.
fn print_table(rows: &[Value]) {
    if rows.is_empty() {
        println!("(none)");
        return;
    }
    let flat: Vec<Vec<(String, String)>> = rows
        .iter()
        .map(|r| {
            let mut f = Vec::new();
            flatten("", r, &mut f);
            f
        })
        .collect();
    // `counters.send_wqes` → SEND_WQES, `peer.gid` → PEER_GID.
    let header: Vec<String> = flat[0]
        .iter()
        .map(|(k, _)| {
            k.strip_prefix("counters.")
                .unwrap_or(k)
                .replace('.', "_")
                .to_uppercase()
        })
        .collect();
    let cells: Vec<Vec<String>> = flat
        .iter()
        .map(|f| {
            flat[0]
                .iter()
                .map(|(k, _)| {
                    f.iter()
                        .find(|(k2, _)| k2 == k)
                        .map_or_else(|| "-".to_string(), |(_, v)| v.clone())
                })
                .collect()
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            cells
                .iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |r: &[String]| {
        r.iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(&header));
    for r in &cells {
        println!("{}", line(r));
    }
}

/// An object as `name  value` lines (nested objects dotted).
fn print_pairs(v: &Value) {
    let mut f = Vec::new();
    flatten("", v, &mut f);
    let w = f.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in f {
        println!("{k:<w$}  {v}");
    }
}

/// Each kind of object as its own table, like `rdma resource show`.
fn print_resources(v: &Value, kind: Option<&str>) {
    let Some(m) = v.as_object() else {
        print_pairs(v);
        return;
    };
    let mut first = true;
    for (k, rows) in m {
        let name = k.trim_end_matches('s');
        if kind.is_some_and(|want| want != name) {
            continue;
        }
        if !first {
            println!();
        }
        first = false;
        println!("{}:", k.to_uppercase());
        match rows.as_array() {
            Some(r) => print_table(r),
            None => print_pairs(rows),
        }
    }
}
