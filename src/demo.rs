//! `pvrdma demo`.

/// Runs the in-process demo.
pub fn run(_args: &[String]) -> Result<(), String> {
    Err("demo: not yet".into())
}
