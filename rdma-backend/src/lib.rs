//! RDMA backends for the pvrdma device.
#![warn(missing_docs)]
