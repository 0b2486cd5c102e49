//! Task engine with QEMU QIOTask semantics.
#![warn(missing_docs)]
