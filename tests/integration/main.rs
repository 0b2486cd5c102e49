//! The integration tests: the device driven through the guest harness (`pvrdma-guest`) as the
//! Linux driver and rdma-core drive it, in-process and, with `PVRDMA_TRANSPORT=vfio-user`,
//! against a real `pvrdma serve` process; the `pvrdma` binary's own behaviour. One module per
//! subject, one set of helpers (`common`).

mod common;

mod commands;
mod counters;
mod datapath;
mod faults;
mod frmr;
mod hostile;
mod hostile_soak;
mod local;
mod multi_vm;
mod operations;
mod probe;
mod rdma_core_feature;
mod soak;
mod socket_activation;
mod tenant_soak;
mod tenants;
mod vfio_transport;
