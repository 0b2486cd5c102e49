//! The device state machine on its main loop, and the handle transports use to reach it.
//!
//! All device state lives on one thread (the main loop) and is never locked. Transports send
//! register and config accesses over a FIFO channel; the main loop serves them strictly in order.
//! A REQUEST write starts the command as a task; every later access waits in `deferred` until
//! that task's completion has written the response and ERR, so a guest's ERR read right after
//! REQUEST sees the final value (spec §4). Doorbells hand queues to workers; backend completions
//! come back over another channel and become CQEs here.

//!
//! One file per concern: `handle.rs` (the handles transports hold, and the loop they drive),
//! `sink.rs` (where backends deliver), `registers.rs` (register and config accesses, DSR, reset), `commands.rs` (a command's start
//! and finish), `events.rs` (interrupts and async events), `work.rs` (doorbells and the
//! workers' jobs), `completions.rs` (completions into CQEs), `report.rs` (counters and the
//! resource listing).

mod commands;
mod completions;
mod events;
mod handle;
mod registers;
mod report;
mod sink;
mod work;

use handle::Msg;
pub use handle::{DeviceAccess, DeviceHandle, LocalDevice};
use sink::{Completion, Sink};

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use rdma_backend::{
    AsyncEvent, Backend, CompletionSink, GuestMem, QpState, WcOpcode, WorkCompletion,
};
use vm_memory::{ByteValued, Bytes, GuestAddressSpace};

use crate::abi::{event, CmdHdr, RespHdr, CMD_SLOT_SIZE, RESP_ACK};
use crate::cmd::{self, CmdError};
use crate::config::DeviceConfig;
use crate::datapath::cq::{self, Arm, Pushed};
use crate::datapath::{self, Drained, Env};
use crate::dsr::{self, LoadedDsr};
use crate::exec::Exec;
use crate::objects::{split_cookie, Objects};
use crate::pci::{ConfigSpace, MsixTable, MSIX_BAR, REG_BAR, UAR_BAR};
use crate::regs::{ctl, err, offset, uar, vector, CqDoorbell, IntrCause, QpDoorbell, SrqDoorbell};
use crate::stats::{DeviceStats, MainCounters, Resources};

/// Accesses that may wait behind one running command. Transports wait for every read and for
/// non-posted writes, so only posted writes queue here; the bound keeps a flood of them finite.
const MAX_DEFERRED: usize = 65536;

/// How the device raises interrupts; implemented by whoever embeds it.
pub trait InterruptSink: Send + Sync {
    /// Signals MSI-X `vector`.
    fn trigger(&self, vector: u16);
    /// Sets the INTx line level (used when MSI-X is disabled).
    fn set_intx(&self, _asserted: bool) {}
}

/// Which address space an access targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    /// PCI configuration space.
    Config,
    /// A BAR (0 = MSI-X, 1 = registers, 2 = UAR pages).
    Bar(u8),
}

/// Options for embedding the device.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// The device emulates the MSI-X table in BAR0 and honours its masks. Transports whose VMM
    /// owns the table (vfio-user: QEMU emulates it) set this to `false`.
    pub msix_table_in_device: bool,
    /// Name prefix of the device's threads.
    pub name: String,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            msix_table_in_device: true,
            name: "pvrdma".into(),
        }
    }
}

/// A backend constructor: receives the guest memory and the sink completions go to.
pub type BackendFactory =
    Box<dyn FnOnce(GuestMem, Arc<dyn CompletionSink>) -> Arc<dyn Backend> + Send>;

/// Errors of the device handle.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The device thread is gone.
    #[error("the device has stopped")]
    Stopped,
    /// The device thread could not be started.
    #[error("cannot start the device thread")]
    Spawn(#[source] std::io::Error),
}

/// Messages queued for the main loop beyond which a posted write waits (back-pressure).
pub const MAX_POSTED: usize = 1024;

/// Register-file state (BAR1).
#[derive(Debug)]
struct Regs {
    dsr_low: u32,
    dsr_high: u32,
    err: u32,
    icr: u32,
    imr: u32,
    macl: u32,
    mach: u32,
}

impl Regs {
    fn power_on() -> Regs {
        Regs {
            dsr_low: 0,
            dsr_high: 0,
            err: err::RESET_VALUE,
            icr: 0,
            imr: !0,
            macl: 0,
            mach: 0,
        }
    }
}

/// The device, owned by its main loop.
pub(crate) struct Core {
    pub cfg: DeviceConfig,
    pub opts: DeviceOptions,
    pub mem: GuestMem,
    pub irq: Arc<dyn InterruptSink>,
    pub env: Arc<Env>,
    pub exec: Exec,
    pub weak: Weak<RefCell<Core>>,
    pub config: ConfigSpace,
    pub msix: MsixTable,
    regs: Regs,
    pub dsr: Option<LoadedDsr>,
    pub active: bool,
    /// Bumped on every reset; work started before carries the old value and is dropped.
    pub epoch: u32,
    cmd_pending: bool,
    deferred: VecDeque<Msg>,
    /// The guest's objects: every table, its references and reservations.
    pub objects: Objects,
    /// What the main loop counts (the data path's counts are in each QP's shared state).
    pub stats: MainCounters,
    /// CQs written by the current run of completions (kept for its allocation).
    cqs_written: Vec<u32>,
    /// A job running [`Backend::progress`] is queued or running on the pool.
    progress_running: bool,
    /// Budgets of the log lines the guest can cause.
    logs: GuestLogs,
}

/// The log lines a guest can cause at will, each kind with its budget.
#[derive(Debug, Default)]
struct GuestLogs {
    /// Posted writes dropped behind a command.
    dropped_writes: crate::ratelog::Limiter,
    /// DSRs rejected.
    bad_dsr: crate::ratelog::Limiter,
    /// Doorbells that ring nothing.
    bad_doorbells: crate::ratelog::Limiter,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}
