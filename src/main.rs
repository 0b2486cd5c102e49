//! The `pvrdma` command.
fn main() {}
