//! Guest-driver harness for the pvrdma device.
//!
//! It drives a device exactly as the Linux `vmw_pvrdma` driver and the `libvmw_pvrdma` provider
//! do: the probe sequence, the command channel with its slots and ERR register, page directories
//! and rings in guest memory, doorbells, CQ polling and the DSR rings. It talks to the device
//! through a [`Transport`], so the same tests run in-process and over vfio-user.
#![warn(missing_docs)]
#![deny(unsafe_code)]

pub mod driver;
pub mod kernel;
pub mod mem;
pub mod perf;
pub mod tenant;
pub mod transport;
pub mod vfio;

pub use driver::{Cq, Ctx, Driver, GuestError, Modify, Mr, Qp, QpKind, SendWqe, Srq, UdAddr};
pub use transport::{InProcess, IrqRecorder, Local, Transport};
