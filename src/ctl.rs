//! `pvrdma ctl`: asks a running `pvrdma serve` about its devices over its control socket
//! (`--control PATH`; the protocol is `pvrdma_vfio_user::control`'s) and prints the answer as
//! a table, or as the JSON the server sent (`--json`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Map, Value};

const HELP: &str = "usage: pvrdma ctl [--control PATH] [--json] COMMAND\n\
\n\
Asks a running `pvrdma serve --control PATH` about its devices.\n\
\n\
commands:\n\
\x20 list                 every device: socket, MAC, backend, client connected, clients so far\n\
\x20 stats DEVICE         the device's counters\n\
\x20 resources DEVICE [KIND]\n\
\x20                      its objects like `rdma resource show`: KIND one of pd, cq, mr, qp,\n\
\x20                      srq, gid (default: all)\n\
\x20 add SPEC             start a device: the SPEC of `pvrdma serve --device`\n\
\x20                      (socket=PATH,mac=MAC[,name=NAME][,max-qp=N]...)\n\
\x20 remove DEVICE        stop a device (its client's connection is closed)\n\
\x20 version              the server's version\n\
\n\
options:\n\
\x20 --control PATH       the control socket (default: $PVRDMA_CONTROL, else\n\
\x20                      /run/pvrdma/control.sock)\n\
\x20 --json               print the server's JSON result instead of a table\n\
\x20 -h, --help           this text\n\
\n\
exit status: 0 done, 1 the server refused (its reason on stderr), 2 bad usage or no server\n";

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

/// Runs `pvrdma ctl ARGS`.
pub fn run(args: &[String]) -> Result<(), CtlError> {
    let mut socket = std::env::var_os("PVRDMA_CONTROL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/pvrdma/control.sock"));
    let mut as_json = false;
    let mut words = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                return Ok(());
            }
            "--json" => as_json = true,
            "--control" => {
                socket = PathBuf::from(it.next().ok_or_else(|| usage("--control needs a value"))?)
            }
            s if s.starts_with("--control=") => socket = PathBuf::from(&s["--control=".len()..]),
            s if s.starts_with('-') => {
                return Err(usage(format!("unknown option `{s}`\n\n{HELP}")))
            }
            _ => words.push(a.as_str()),
        }
    }
    let (request, kind) = request(&words)?;
    let result = call(&socket, &request)?;
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&result).unwrap_or_default()
        );
        return Ok(());
    }
    match (words[0], kind) {
        ("list", _) => print_table(result.as_array().map_or(&[][..], |v| v)),
        ("stats", _) => print_pairs(&result),
        ("resources", kind) => print_resources(&result, kind),
        ("add", _) => print_table(std::slice::from_ref(&result)),
        ("version", _) => println!(
            "{} {}",
            result["name"].as_str().unwrap_or("?"),
            result["version"].as_str().unwrap_or("?")
        ),
        _ => {}
    }
    Ok(())
}

/// The request for the command words, and for `resources` the kind asked for.
fn request<'a>(words: &[&'a str]) -> Result<(Value, Option<&'a str>), CtlError> {
    let need = |n: usize| {
        if words.len() == n {
            Ok(())
        } else {
            Err(usage(format!(
                "`{}` takes {} argument(s)\n\n{HELP}",
                words[0],
                n - 1
            )))
        }
    };
    let Some(cmd) = words.first() else {
        return Err(usage(format!("no command\n\n{HELP}")));
    };
    let r = match *cmd {
        "list" | "version" => {
            need(1)?;
            json!({"command": cmd})
        }
        "stats" | "remove" => {
            need(2)?;
            json!({"command": cmd, "device": words[1]})
        }
        "resources" => {
            if !(2..=3).contains(&words.len()) {
                return Err(usage(format!("`resources` takes DEVICE [KIND]\n\n{HELP}")));
            }
            let kind = words.get(2).copied();
            if let Some(k) = kind {
                if !matches!(k, "pd" | "cq" | "mr" | "qp" | "srq" | "gid") {
                    return Err(usage(format!(
                        "unknown kind `{k}` (pd, cq, mr, qp, srq, gid)"
                    )));
                }
            }
            return Ok((json!({"command": "resources", "device": words[1]}), kind));
        }
        "add" => {
            need(2)?;
            let mut keys = Map::new();
            for kv in words[1].split(',') {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| usage(format!("`{kv}` is not key=value")))?;
                keys.insert(k.to_string(), Value::String(v.to_string()));
            }
            json!({"command": "add", "device": keys})
        }
        other => return Err(usage(format!("unknown command `{other}`\n\n{HELP}"))),
    };
    Ok((r, None))
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
