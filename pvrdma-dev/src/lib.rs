//! The VMware PVRDMA device model, transport-agnostic.
//!
//! A transport (the vfio-user server, a rust-vmm VMM, or the in-process test harness) starts the
//! device with [`DeviceHandle::spawn`] and forwards config-space and BAR accesses to it. The
//! device lives on its own main-loop thread; commands and the data path run as task-core tasks on
//! a worker pool; completions, CQEs and interrupts are produced on the main loop.
//!
//! | concern | module |
//! |---|---|
//! | wire structures | [`abi`] |
//! | registers, doorbell bits | [`regs`] |
//! | PCI config space, MSI-X table | [`pci`] |
//! | DSR, caps, async and CQ-notify rings | [`dsr`] |
//! | page directories | [`pdir`] |
//! | ring index arithmetic | [`ring`] |
//! | commands | `cmd` |
//! | handle tables | [`resources`] |
//! | WQE parsing, CQEs, arming | `datapath` |
//! | the state machine and its handle | [`device`] |
//! | counters and the resource listing | [`stats`] |
#![warn(missing_docs)]
#![deny(unsafe_code)]

// The `ByteValued` impls of the wire structures (one macro, with its SAFETY argument).
#[allow(unsafe_code)]
pub mod abi;
mod budget;
mod cmd;
pub mod config;
mod datapath;
pub mod device;
pub mod dsr;
mod exec;
mod objects;
pub mod pci;
pub mod pdir;
pub mod ratelog;
pub mod regs;
pub mod resources;
pub mod ring;
pub mod stats;

pub use budget::OverBudget;
pub use cmd::CmdError;
pub use config::DeviceConfig;
/// Entry points for the fuzz targets in `fuzz/`; not API.
#[doc(hidden)]
pub use datapath::fuzzing;
pub use datapath::{pages_for, rq_wqe_size, sq_wqe_size};
pub use device::{
    BackendFactory, DeviceAccess, DeviceError, DeviceHandle, DeviceOptions, InterruptSink,
    LocalDevice, Region,
};
pub use objects::NoRoom;
pub use stats::{DeviceStats, Resources};
