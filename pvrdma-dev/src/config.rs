//! Device configuration: identity and the limits advertised in the DSR caps.
//!
//! Every limit here is enforced by the device, not just advertised (spec/device-abi.md §2, and
//! qemu-reference.md §2.2: "an implementation should advertise what it accepts").

use rdma_backend::MAX_SGE;

/// Largest QP table the driver can index (`cqe->qp & 0xFFFF`, spec §0.5).
pub const MAX_QP_LIMIT: u32 = 0xffff;

/// Device configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// MAC of the paired vmxnet3; the node GUID and default GID derive from it.
    pub mac: [u8; 6],
    /// ABI version reported in the VERSION register (17..=20).
    pub version: u32,
    /// QPs (handles 1..max_qp).
    pub max_qp: u32,
    /// WRs per send or receive queue.
    pub max_qp_wr: u32,
    /// SGEs per WR.
    pub max_sge: u32,
    /// CQs.
    pub max_cq: u32,
    /// Entries per CQ.
    pub max_cqe: u32,
    /// MRs.
    pub max_mr: u32,
    /// Bytes per MR.
    pub max_mr_size: u64,
    /// 4 KiB pages all user MRs together may list. Each listed page costs the device 8 bytes of
    /// host memory, and a guest can list the same page many times, so this bounds what MR
    /// registration can make the device allocate (default 2^22 pages: 16 GiB of registrations,
    /// 32 MiB of page lists).
    pub max_mr_pages: u64,
    /// Host memory, in bytes, the device may hold for the guest's objects and everything they
    /// can queue (see `budget.rs`): a CREATE command that would pass it fails with ENOMEM.
    /// Default 128 MiB: e.g. ~90 QPs with 8192-deep send and receive queues, or ~1,000 with
    /// 512-deep ones.
    pub max_host_mem: u64,
    /// PDs.
    pub max_pd: u32,
    /// Address handles (driver-side only; advertised).
    pub max_ah: u32,
    /// SRQs (0 disables the SRQ verbs in the driver).
    pub max_srq: u32,
    /// WRs per SRQ.
    pub max_srq_wr: u32,
    /// SGEs per SRQ WR.
    pub max_srq_sge: u32,
    /// UAR pages (BAR2 size / 4096); a power of two.
    pub max_uar: u32,
    /// GID table entries.
    pub gid_tbl_len: u32,
    /// Outstanding RDMA READ/atomic operations per QP.
    pub max_qp_rd_atom: u32,
    /// Advertise atomics (CMP_SWAP and FETCH_ADD).
    pub atomics: bool,
    /// The RoCE version the device offers (caps `gid_types`; a device offers exactly one): 1
    /// (the default: every driver version takes it, and the GIDs are the netdev's link-local
    /// and IP addresses with an IB GRH on UD) or 2 (ABI 18 and later: RoCE v2 GIDs, UD
    /// receives carry the IPv4 or IPv6 header; what a host's RoCE v2 fabric and rxe speak).
    pub roce_version: u8,
    /// Pages one fast registration may map (caps `max_fast_reg_page_list_len`): with a nonzero
    /// value the device offers the guest kernel fast-register MRs, local and remote
    /// invalidation (`bmme_flags`, which NVMe over Fabrics, NFS over RDMA and iSER need). 0 turns
    /// them off; a device lowers it to what its backend supports (0 for one without them).
    pub fast_reg_pages: u32,
    /// Worker threads of the data path and command pool.
    pub workers: usize,
    /// Microseconds the main loop polls for the next access or completion before it parks its
    /// thread ([`task_core::MainLoop::set_poll`]; QEMU's `poll-max-ns`), and a
    /// [`DeviceHandle`](crate::DeviceHandle) access polls for its answer. 0 (the default): an
    /// access does not poll, and the loop only yields its core a few times before it parks (as
    /// every [`task_core::MainLoop`] does). Polling, which yields the core between checks, pays
    /// where an access already crosses several threads (`pvrdma serve` uses 32: the socket, the
    /// server thread, the loop); with the device called directly by the vCPU thread on a quiet
    /// host, a futex wake-up is cheaper than the yields (docs/benchmarks.md has both).
    pub poll_us: u32,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            mac: [0x00, 0x50, 0x56, 0x00, 0x00, 0x01],
            version: 20,
            max_qp: 1024,
            max_qp_wr: 8192,
            max_sge: MAX_SGE as u32,
            max_cq: 1024,
            max_cqe: 65536,
            max_mr: 4096,
            max_mr_size: 1 << 40,
            max_mr_pages: 1 << 22,
            max_host_mem: 128 << 20,
            max_pd: 1024,
            max_ah: 1024,
            max_srq: 1024,
            max_srq_wr: 8192,
            max_srq_sge: MAX_SGE as u32,
            max_uar: 512,
            gid_tbl_len: 128,
            max_qp_rd_atom: 16,
            atomics: true,
            fast_reg_pages: 128,
            roce_version: 1,
            workers: 2,
            poll_us: 0,
        }
    }
}

/// Why a configuration is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A value is outside what the driver or the device supports.
    #[error("invalid configuration: {0}")]
    Invalid(&'static str),
}

impl DeviceConfig {
    /// Checks the limits the real driver depends on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |c: bool, m| {
            if c {
                Err(ConfigError::Invalid(m))
            } else {
                Ok(())
            }
        };
        bad(
            !(17..=20).contains(&self.version),
            "version must be 17..=20",
        )?;
        bad(
            self.max_qp < 2 || self.max_qp > MAX_QP_LIMIT,
            "max_qp must be 2..=65535",
        )?;
        bad(
            self.max_uar < 2 || !self.max_uar.is_power_of_two(),
            "max_uar: a power of two >= 2",
        )?;
        bad(
            self.max_sge == 0 || self.max_sge as usize > MAX_SGE,
            "max_sge must be 1..=16",
        )?;
        bad(
            self.max_srq_sge == 0 || self.max_srq_sge as usize > MAX_SGE,
            "max_srq_sge must be 1..=16",
        )?;
        bad(
            !self.max_qp_wr.is_power_of_two(),
            "max_qp_wr must be a power of two",
        )?;
        bad(self.max_qp_wr > 1 << 16, "max_qp_wr must be at most 65536")?;
        bad(
            !(1..=2).contains(&self.roce_version),
            "roce_version must be 1 or 2",
        )?;
        bad(
            self.roce_version == 2 && self.version < 18,
            "RoCE v2 needs version 18 or later (version 17 drivers take RoCE v1 only)",
        )?;
        bad(
            self.fast_reg_pages > 128,
            "fast_reg_pages must be at most 128 (the driver's own bound)",
        )?;
        bad(
            !self.max_cqe.is_power_of_two() || self.max_cqe > 1 << 20,
            "max_cqe: power of two <= 2^20",
        )?;
        bad(
            self.max_srq_wr > 1 << 16 || !self.max_srq_wr.is_power_of_two(),
            "max_srq_wr",
        )?;
        bad(
            self.gid_tbl_len == 0 || self.gid_tbl_len > 256,
            "gid_tbl_len must be 1..=256",
        )?;
        bad(
            self.max_cq == 0 || self.max_cq > 1 << 16,
            "max_cq must be 1..=65536",
        )?;
        bad(
            self.max_pd == 0 || self.max_mr == 0,
            "max_pd and max_mr must be non-zero",
        )?;
        bad(self.max_srq > 1 << 16, "max_srq must be at most 65536")?;
        bad(
            self.max_host_mem < 1 << 20,
            "max_host_mem must be at least 1 MiB",
        )?;
        bad(
            self.workers == 0 || self.workers > 64,
            "workers must be 1..=64",
        )?;
        Ok(())
    }

    /// Size of BAR2 (the UAR pages).
    pub fn uar_bar_size(&self) -> u64 {
        u64::from(self.max_uar) * 4096
    }
}
