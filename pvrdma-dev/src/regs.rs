//! Register file (BAR1), interrupt causes and UAR doorbells (BAR2), spec/device-abi.md §1 and §5.

/// BAR1 register offsets.
pub mod offset {
    /// Device ABI version (read once at probe).
    pub const VERSION: u64 = 0x00;
    /// Low 32 bits of the DSR address.
    pub const DSRLOW: u64 = 0x04;
    /// High 32 bits of the DSR address; the write that loads the DSR and writes the caps.
    pub const DSRHIGH: u64 = 0x08;
    /// Control: ACTIVATE, UNQUIESCE, RESET.
    pub const CTL: u64 = 0x0c;
    /// Writing 0 executes the command in the command slot.
    pub const REQUEST: u64 = 0x10;
    /// Result of the last CTL write or command (0 = success).
    pub const ERR: u64 = 0x14;
    /// Interrupt cause register (read-to-clear), used without MSI-X.
    pub const ICR: u64 = 0x18;
    /// Interrupt mask register (bit per vector; the driver writes 0 or !0).
    pub const IMR: u64 = 0x1c;
    /// MAC address, low 32 bits (storage only).
    pub const MACL: u64 = 0x20;
    /// MAC address, high 16 bits (storage only).
    pub const MACH: u64 = 0x24;
}

/// CTL register values.
pub mod ctl {
    /// Activate the device.
    pub const ACTIVATE: u32 = 0;
    /// Unquiesce (link up).
    pub const UNQUIESCE: u32 = 1;
    /// Reset to the power-on state.
    pub const RESET: u32 = 2;
}

bitflags::bitflags! {
    /// Interrupt causes (ICR bits), one per MSI-X vector.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct IntrCause: u32 {
        /// A command completed (vector 0).
        const RESPONSE = 1 << 0;
        /// An async event was posted (vector 1).
        const ASYNC = 1 << 1;
        /// A CQ notification was posted (vector 2).
        const CQ = 1 << 2;
    }
}

/// MSI-X vector numbers.
pub mod vector {
    /// Command response.
    pub const RESPONSE: u16 = 0;
    /// Async events.
    pub const ASYNC: u16 = 1;
    /// CQ notifications.
    pub const CQ: u16 = 2;
}

/// Doorbell register offsets within a UAR page.
pub mod uar {
    /// QP doorbell (SEND/RECV).
    pub const QP: u64 = 0x0;
    /// CQ doorbell (ARM, ARM_SOL, POLL).
    pub const CQ: u64 = 0x4;
    /// SRQ doorbell (RECV).
    pub const SRQ: u64 = 0x8;
    /// Bits of a doorbell value that carry the handle.
    pub const HANDLE_MASK: u32 = 0x00ff_ffff;

    /// Whether a front end may answer a UAR write of `data` at `offset` (within BAR2) before
    /// the device has handled it (a posted write). QP and SRQ doorbells only make the device
    /// read rings, and the guest sees their effect through CQEs; so does a CQ POLL. A CQ ARM or
    /// ARM_SOL may not be posted: it must be in force before the guest's next look at the CQ
    /// (`ibv_req_notify_cq`, then poll, then sleep for the event), or a CQE written in between
    /// is neither in that poll nor notified, and the guest sleeps for good. A write that is not
    /// a whole 32-bit doorbell is not posted either.
    pub fn may_post(offset: u64, data: &[u8]) -> bool {
        let Ok(v) = <[u8; 4]>::try_from(data) else {
            return false;
        };
        let arm = super::CqDoorbell::ARM | super::CqDoorbell::ARM_SOL;
        offset & 0xfff != CQ
            || !super::CqDoorbell::from_bits_retain(u32::from_le_bytes(v)).intersects(arm)
    }
}

bitflags::bitflags! {
    /// QP doorbell operation bits.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct QpDoorbell: u32 {
        /// New send WQEs.
        const SEND = 1 << 30;
        /// New receive WQEs.
        const RECV = 1 << 31;
    }
}

bitflags::bitflags! {
    /// CQ doorbell operation bits.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct CqDoorbell: u32 {
        /// Arm for solicited (and error) completions only.
        const ARM_SOL = 1 << 29;
        /// Arm for any completion.
        const ARM = 1 << 30;
        /// Poll hint: the guest found the CQ empty.
        const POLL = 1 << 31;
    }
}

bitflags::bitflags! {
    /// SRQ doorbell operation bits.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct SrqDoorbell: u32 {
        /// New receive WQEs.
        const RECV = 1 << 30;
    }
}

/// ERR register values the device reports. The driver only distinguishes zero from non-zero;
/// the values are errno numbers so logs and tests can tell causes apart.
pub mod err {
    /// Success.
    pub const OK: u32 = 0;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// A referenced object does not exist.
    pub const ENOENT: u32 = 2;
    /// Out of resources.
    pub const ENOMEM: u32 = 12;
    /// Object in use.
    pub const EBUSY: u32 = 16;
    /// Bad guest address.
    pub const EFAULT: u32 = 14;
    /// Operation not supported.
    pub const EOPNOTSUPP: u32 = 95;
    /// Device not in a state that allows the operation.
    pub const EIO: u32 = 5;
    /// ERR value before any command ran (as QEMU's device; never 0 so an early read fails).
    pub const RESET_VALUE: u32 = 0xffff;
}

#[cfg(test)]
mod tests {
    use super::{uar, CqDoorbell};

    #[test]
    fn only_cq_arms_wait_for_the_device() {
        let w = |v: u32| v.to_le_bytes();
        for page in [0u64, 1, 7] {
            let base = page * 4096;
            assert!(uar::may_post(base + uar::QP, &w(5 | 1 << 30)));
            assert!(uar::may_post(base + uar::SRQ, &w(5 | 1 << 30)));
            assert!(uar::may_post(
                base + uar::CQ,
                &w(5 | CqDoorbell::POLL.bits())
            ));
            assert!(!uar::may_post(
                base + uar::CQ,
                &w(5 | CqDoorbell::ARM.bits())
            ));
            assert!(!uar::may_post(
                base + uar::CQ,
                &w(5 | CqDoorbell::ARM_SOL.bits())
            ));
            assert!(!uar::may_post(base + uar::QP, &[1, 2]));
        }
    }
}
