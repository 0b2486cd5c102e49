//! Guest-driver harness for the pvrdma device.
#![warn(missing_docs)]
