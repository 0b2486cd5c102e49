//! The VMware PVRDMA device model.
#![warn(missing_docs)]

pub mod pci;
pub mod pdir;
pub mod ring;
