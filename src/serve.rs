//! `pvrdma serve`: the standalone vfio-user backend process.

/// Runs the vfio-user server.
pub fn run(_args: &[String]) -> Result<(), String> {
    Err("the vfio-user server is not built yet (issue 5)".into())
}
