//! The command channel (spec/device-abi.md §4): every command is prepared on the main loop
//! (decode, check handles against the tables), runs its backend work on a worker as a task, and
//! finishes on the main loop (tables updated, response written, ERR set, vector 0 raised).
//!
//! A command sees the device only through [`Ctx`]: the configuration, guest memory, the
//! backend, and the object tables ([`Objects`], which do every reference count and
//! reservation). What it needs the device to do afterwards it says in the context
//! ([`Ctx::drain`]); the device does it once the command has finished.

mod objects;
mod qp;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use rdma_backend::GuestMem;
use vm_memory::ByteValued;

use crate::abi::cmd as code;
use crate::config::DeviceConfig;
use crate::datapath::Env;
use crate::objects::{NoRoom, Objects};
use crate::regs::err;

/// What a command sees of the device, on the main loop.
pub(crate) struct Ctx<'a> {
    pub cfg: &'a DeviceConfig,
    pub mem: &'a GuestMem,
    pub env: &'a Arc<Env>,
    /// The device is active (ports up).
    pub active: bool,
    /// The UAR PFN of the loaded DSR (`None` before one is loaded).
    pub uar_pfn: Option<u64>,
    pub objects: &'a mut Objects,
    /// A QP to drain once the command has finished (a QP that reached RTS with WRs posted
    /// before it could send).
    pub drain: Option<u32>,
}

/// Why a command failed. Mapped to the ERR register (and `resp.hdr.err`) at one place,
/// [`CmdError::code`].
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    /// Unknown or unsupported command code.
    #[error("unsupported command {0}")]
    Unsupported(u32),
    /// A field is outside what the device accepts.
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// A handle does not name a live object.
    #[error("no such {0}")]
    NoSuch(&'static str),
    /// A table is full.
    #[error("out of {0}")]
    Exhausted(&'static str),
    /// The object is still referenced.
    #[error("{0} is in use")]
    Busy(&'static str),
    /// A page directory is invalid.
    #[error("bad page directory")]
    Pdir(#[from] crate::pdir::Error),
    /// The backend refused.
    #[error("backend")]
    Backend(#[from] rdma_backend::Error),
    /// The device was reset while the command ran.
    #[error("the device was reset during the command")]
    Reset,
    /// The worker panicked.
    #[error("internal error: {0}")]
    Internal(String),
    /// The device has no room for the object (a full table, the host-memory or the MR
    /// page-list budget).
    #[error(transparent)]
    NoRoom(#[from] NoRoom),
}

impl CmdError {
    /// The ERR register value for this error (never 0).
    pub fn code(&self) -> u32 {
        use rdma_backend::Error as B;
        match self {
            CmdError::Unsupported(_) => err::EOPNOTSUPP,
            CmdError::Invalid(_) => err::EINVAL,
            CmdError::NoSuch(_) => err::ENOENT,
            CmdError::Exhausted(_) | CmdError::NoRoom(_) => err::ENOMEM,
            CmdError::Busy(_) => err::EBUSY,
            CmdError::Pdir(_) => err::EFAULT,
            CmdError::Backend(b) => match b {
                B::NoSuchObject(_) => err::ENOENT,
                B::Busy(_) => err::EBUSY,
                B::Exhausted(_) => err::ENOMEM,
                B::Invalid(_) | B::BadTransition { .. } => err::EINVAL,
                B::Unsupported(_) => err::EOPNOTSUPP,
                B::QueueFull | B::Host(_) => err::EIO,
            },
            CmdError::Reset | CmdError::Internal(_) => err::EIO,
        }
    }
}

/// A command's response bytes (header included; the device fills the header in).
pub(crate) type CmdResult = Result<Vec<u8>, CmdError>;
/// The main-loop half of a command, produced by its worker half.
pub(crate) type Finish = Box<dyn FnOnce(&mut Ctx<'_>) -> CmdResult + Send>;
/// The worker half of a command.
pub(crate) type Work = Box<dyn FnOnce(&Env) -> Result<Finish, CmdError> + Send>;

/// Copies a request structure out of the snapshot of the command slot (only its own length:
/// bytes past it are the driver's uninitialised stack).
pub(crate) fn parse<T: ByteValued + Default>(req: &[u8]) -> T {
    let mut v = T::default();
    let n = std::mem::size_of::<T>().min(req.len());
    v.as_mut_slice()[..n].copy_from_slice(&req[..n]);
    v
}

/// Serialises a response structure.
pub(crate) fn resp<T: ByteValued>(r: &T) -> Vec<u8> {
    r.as_slice().to_vec()
}

/// A command whose work is entirely on the main loop (it still runs as a task).
pub(crate) fn main_loop_only(
    f: impl FnOnce(&mut Ctx<'_>) -> CmdResult + Send + 'static,
) -> Result<Work, CmdError> {
    Ok(Box::new(move |_env: &Env| Ok(Box::new(f) as Finish)))
}

/// Page-directory pages a command may list and still count as quick (see [`is_quick`]).
const QUICK_PAGES: u32 = 64;

/// Whether a command's work is bounded and small: everything except creating an object from a
/// page directory of more than [`QUICK_PAGES`] pages (a large MR walks and pins its whole page
/// list). With a backend whose control operations never block
/// ([`rdma_backend::Backend::inline_control`]) such a command's task runs on the main loop's
/// thread instead of a worker.
pub(crate) fn is_quick(cmd: u32, req: &[u8]) -> bool {
    let u32_at = |off: usize| {
        req.get(off..off + 4)
            .map_or(u32::MAX, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u16_at = |off: usize| {
        req.get(off..off + 2)
            .map_or(u32::MAX, |b| u32::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let pages = match cmd {
        code::CREATE_MR => u32_at(std::mem::offset_of!(crate::abi::CmdCreateMr, nchunks)),
        code::CREATE_CQ => u32_at(std::mem::offset_of!(crate::abi::CmdCreateCq, nchunks)),
        code::CREATE_SRQ => u32_at(std::mem::offset_of!(crate::abi::CmdCreateSrq, nchunks)),
        code::CREATE_QP => u16_at(std::mem::offset_of!(crate::abi::CmdCreateQp, total_chunks)),
        _ => 0,
    };
    pages <= QUICK_PAGES
}

/// Decodes and checks a command; returns its work.
pub(crate) fn prepare(dev: &mut Ctx<'_>, cmd: u32, req: &[u8]) -> Result<Work, CmdError> {
    match cmd {
        code::QUERY_PORT => objects::query_port(dev, parse(req)),
        code::QUERY_PKEY => objects::query_pkey(dev, parse(req)),
        code::CREATE_UC => objects::create_uc(dev, parse(req)),
        code::DESTROY_UC => objects::destroy_uc(dev, parse(req)),
        code::CREATE_PD => objects::create_pd(dev, parse(req)),
        code::DESTROY_PD => objects::destroy_pd(dev, parse(req)),
        code::CREATE_MR => objects::create_mr(dev, parse(req)),
        code::DESTROY_MR => objects::destroy_mr(dev, parse(req)),
        code::CREATE_CQ => objects::create_cq(dev, parse(req)),
        code::RESIZE_CQ => objects::resize_cq(dev, parse(req)),
        code::DESTROY_CQ => objects::destroy_cq(dev, parse(req)),
        code::CREATE_BIND => objects::create_bind(dev, parse(req)),
        code::DESTROY_BIND => objects::destroy_bind(dev, parse(req)),
        code::CREATE_QP => qp::create_qp(dev, parse(req)),
        code::MODIFY_QP => qp::modify_qp(dev, parse(req)),
        code::QUERY_QP => qp::query_qp(dev, parse(req)),
        code::DESTROY_QP => qp::destroy_qp(dev, parse(req)),
        code::CREATE_SRQ => qp::create_srq(dev, parse(req)),
        code::MODIFY_SRQ => qp::modify_srq(dev, parse(req)),
        code::QUERY_SRQ => qp::query_srq(dev, parse(req)),
        code::DESTROY_SRQ => qp::destroy_srq(dev, parse(req)),
        other => Err(CmdError::Unsupported(other)),
    }
}

#[cfg(test)]
mod quick_tests {
    use super::*;
    use crate::abi::{CmdCreateMr, CmdCreateQp, CMD_SLOT_SIZE};

    #[test]
    fn only_small_page_directories_are_quick() {
        let mut req = [0u8; CMD_SLOT_SIZE];
        assert!(is_quick(code::QUERY_PORT, &req));
        assert!(is_quick(code::MODIFY_QP, &req));
        let off = std::mem::offset_of!(CmdCreateMr, nchunks);
        for (n, quick) in [(0u32, true), (QUICK_PAGES, true), (QUICK_PAGES + 1, false)] {
            req[off..off + 4].copy_from_slice(&n.to_le_bytes());
            assert_eq!(is_quick(code::CREATE_MR, &req), quick, "{n} pages");
        }
        let off = std::mem::offset_of!(CmdCreateQp, total_chunks);
        req[off..off + 2].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(!is_quick(code::CREATE_QP, &req));
        // A request too short to hold its page count is not quick.
        assert!(!is_quick(code::CREATE_MR, &req[..8]));
    }
}
