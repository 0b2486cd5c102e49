//! Shared memory files: guest RAM as vfio-user hands it over (QEMU's `memory-backend-memfd`),
//! made here for the conformance suite, the test harness's vfio-user client and tests.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// A new anonymous shared memory file (`memfd_create`, close-on-exec) named `name`, `size`
/// bytes long. Pages cost memory only once touched.
pub fn memfd(name: &CStr, size: u64) -> io::Result<File> {
    // SAFETY: `name` is a valid NUL-terminated string (a `CStr`); memfd_create has no other
    // preconditions and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create, is open, and nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_memfd_has_its_size_and_keeps_what_is_written() {
        let f = super::memfd(c"shm-test", 8192).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 8192);
        f.write_all_at(b"pvrdma", 4096).unwrap();
        let mut b = [0u8; 6];
        f.read_exact_at(&mut b, 4096).unwrap();
        assert_eq!(&b, b"pvrdma");
    }
}
