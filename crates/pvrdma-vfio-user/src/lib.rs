//! Transports for the pvrdma device: vfio-user server and rust-vmm adapter.
#![warn(missing_docs)]

pub mod vmm;
