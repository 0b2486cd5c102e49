//! The device's counters and its resource listing, as plain data for monitoring
//! ([`DeviceHandle::stats`](crate::DeviceHandle::stats),
//! [`DeviceHandle::resources`](crate::DeviceHandle::resources)).
//!
//! Where they are kept: the main loop keeps everything it does itself (commands, doorbells,
//! CQEs, interrupts, events, resets, refused guest input) in plain fields. The data path's
//! send-side counts are per QP ([`QpTraffic`], in the QP's shared state), written only by the
//! one worker draining that QP at a time, with relaxed loads and stores (no locked
//! instruction, no shared cache line between QPs); the main loop sums them when asked, and
//! folds a QP's counts into the device's totals when the QP goes, so destroyed QPs still count.
//!
//! Names (command codes, opcodes, QP types and states) are the guest ABI's, as strings, so the
//! structures serialise to JSON or Prometheus labels as they are.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use rdma_backend::{QpState, QpType, WcOpcode};
use serde::Serialize;

use crate::abi::cmd as code;

/// Counters of one device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeviceStats {
    /// Commands executed (every REQUEST that read a command from its slot).
    pub commands: u64,
    /// Commands that failed (ERR not 0).
    pub command_errors: u64,
    /// Commands executed and failed, by command name (`"CREATE_QP"`; `"UNKNOWN"` for codes
    /// the device does not know). Only names seen at least once.
    pub commands_by_code: BTreeMap<String, CommandCount>,
    /// Doorbell writes to the UAR BAR, good or refused.
    pub doorbells: u64,
    /// Send WQEs taken from the send rings, by opcode (`"SEND"`, `"RDMA_WRITE"`, …), with the
    /// bytes their SGEs list. WQEs completed in error for being malformed are not here (see
    /// [`Refused::wqes`]). Only opcodes seen at least once.
    pub send: BTreeMap<String, OpCount>,
    /// Successful receive completions written to CQs, by opcode (`"RECV"`,
    /// `"RECV_RDMA_WITH_IMM"`), with the bytes received (`byte_len`). Only opcodes seen at
    /// least once.
    pub recv: BTreeMap<String, OpCount>,
    /// CQEs written.
    pub cqes: u64,
    /// Completions dropped because their QP or CQ is gone.
    pub stale_completions: u64,
    /// CQEs lost to a full (or unusable) CQ.
    pub cq_overflows: u64,
    /// Interrupts raised.
    pub interrupts: Interrupts,
    /// Async events posted.
    pub events: u64,
    /// Device resets (CTL RESET, function-level reset).
    pub resets: u64,
    /// Live objects by kind.
    pub objects: ObjectCounts,
    /// Host memory the live objects reserve, in bytes (bounded by `max_host_mem`).
    pub host_mem: u64,
    /// Guest input the device refused, by kind.
    pub refused: Refused,
}

/// How often one command ran and failed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CommandCount {
    /// Times it was executed.
    pub count: u64,
    /// Times it failed.
    pub errors: u64,
}

/// Work requests of one opcode and their bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OpCount {
    /// Work requests.
    pub wqes: u64,
    /// Bytes.
    pub bytes: u64,
}

/// Interrupts raised, by vector (MSI-X vectors signalled), and INTx assertions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Interrupts {
    /// Vector 0: command responses.
    pub response: u64,
    /// Vector 1: async events.
    pub async_events: u64,
    /// Vector 2: CQ notifications.
    pub cq: u64,
    /// INTx assertions (MSI-X disabled; the driver then reads ICR).
    pub intx: u64,
}

/// Live objects by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ObjectCounts {
    /// Protection domains.
    pub pds: u64,
    /// Memory regions.
    pub mrs: u64,
    /// Completion queues.
    pub cqs: u64,
    /// Queue pairs.
    pub qps: u64,
    /// Shared receive queues.
    pub srqs: u64,
    /// User contexts.
    pub ucs: u64,
}

/// Guest input the device refused, by kind. Each is answered as the ABI says (an error code, an
/// error completion, an event, or nothing) and counted here; none is logged more than a
/// rate-limited line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Refused {
    /// Doorbells ignored: a UAR page no context owns, a handle that is not the context's, a
    /// value with no known bit, an unknown register, an access of the wrong size or outside
    /// the BAR, or the device not active.
    pub doorbells: u64,
    /// DSRs rejected (unreadable, or caps or rings the device does not accept).
    pub dsr: u64,
    /// Commands refused as malformed: an unknown or unsupported code, a field out of range, a
    /// handle naming no object, an object still in use, a bad page directory, a state change
    /// the QP state machine forbids; and REQUEST before a DSR is loaded.
    pub commands: u64,
    /// Commands refused because a table, the host-memory budget or the MR page-list budget is
    /// full.
    pub over_limit: u64,
    /// Register accesses ignored: the wrong size or alignment, a read-only or unknown
    /// register, an unknown CTL value, a REQUEST value other than 0.
    pub registers: u64,
    /// Guest structures the device could not read or write: the command or response slot,
    /// the async event ring, a CQ ring.
    pub dma: u64,
    /// Work queues found broken (ring indices or WQE pages unusable): the QP or SRQ is put in
    /// error and the guest gets QP_FATAL or SRQ_ERR.
    pub rings: u64,
    /// Malformed WQEs (too many SGEs, an opcode the QP does not take, a bad field): completed
    /// in error, or skipped with SRQ_ERR on an SRQ.
    pub wqes: u64,
    /// Posted writes dropped because too many waited behind one command.
    pub dropped_writes: u64,
}

/// The live objects of one device, like `rdma resource show`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Resources {
    /// User contexts.
    pub ucs: Vec<UcInfo>,
    /// Protection domains.
    pub pds: Vec<PdInfo>,
    /// Memory regions.
    pub mrs: Vec<MrInfo>,
    /// Completion queues.
    pub cqs: Vec<CqInfo>,
    /// Queue pairs.
    pub qps: Vec<QpInfo>,
    /// Shared receive queues.
    pub srqs: Vec<SrqInfo>,
    /// The GID table entries the guest bound (CREATE_BIND).
    pub gids: Vec<GidInfo>,
}

/// A bound GID.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GidInfo {
    /// Its index in the GID table.
    pub index: u32,
    /// The GID, as IPv6 text.
    pub gid: String,
    /// `RoCEv1` or `RoCEv2`.
    pub gid_type: String,
}

/// A user context.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UcInfo {
    /// Its handle.
    pub handle: u32,
    /// The UAR page it owns.
    pub uar_index: u32,
}

/// A protection domain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PdInfo {
    /// Its handle.
    pub handle: u32,
    /// The user context that made it (0: the guest kernel).
    pub ctx: u32,
    /// MRs, QPs and SRQs on it.
    pub users: u32,
}

/// A memory region.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MrInfo {
    /// Its handle.
    pub handle: u32,
    /// Its PD's handle.
    pub pd: u32,
    /// Local key.
    pub lkey: u32,
    /// Remote key.
    pub rkey: u32,
    /// Length in bytes (0 for the DMA MR and for a fast-register MR).
    pub length: u64,
    /// Start address as the guest sees it.
    pub iova: u64,
    /// Access flags (IB numbering: 1 local write, 2 remote write, 4 remote read, 8 remote
    /// atomic).
    pub access: u32,
    /// `"USER"`, `"DMA"` or `"FAST_REG"`.
    pub kind: String,
    /// Pages its page list holds (for a fast-register MR: pages it may map).
    pub pages: u64,
}

/// A completion queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CqInfo {
    /// Its handle.
    pub handle: u32,
    /// The user context that made it (0: the guest kernel).
    pub ctx: u32,
    /// Entries it holds.
    pub size: u32,
    /// QP queues completing into it.
    pub users: u32,
    /// CQEs written to it.
    pub cqes: u64,
    /// CQEs lost because it was full or unusable.
    pub overflows: u64,
}

/// A shared receive queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SrqInfo {
    /// Its handle (its SRQ number).
    pub handle: u32,
    /// Its PD's handle.
    pub pd: u32,
    /// Receive WQEs it holds.
    pub max_wr: u32,
    /// SGEs per receive WQE.
    pub max_sge: u32,
    /// The limit that raises SRQ_LIMIT_REACHED (0: disarmed), as last set.
    pub limit: u32,
    /// QPs attached to it.
    pub users: u32,
}

/// Where a connected QP sends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QpPeer {
    /// The destination GID, as an IPv6-style string (`fe80::…`).
    pub gid: String,
    /// The destination QP number.
    pub qpn: u32,
}

/// A queue pair.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QpInfo {
    /// Its handle.
    pub handle: u32,
    /// Its QP number on the fabric.
    pub qpn: u32,
    /// `"RC"`, `"UD"` or `"GSI"`.
    pub qp_type: String,
    /// `"RESET"`, `"INIT"`, `"RTR"`, `"RTS"`, `"SQD"`, `"SQE"` or `"ERR"`.
    pub state: String,
    /// Its PD's handle.
    pub pd: u32,
    /// The handle of its send CQ.
    pub send_cq: u32,
    /// The handle of its receive CQ.
    pub recv_cq: u32,
    /// The handle of its SRQ, if it has one.
    pub srq: Option<u32>,
    /// The remote end of an RC QP once the guest has set it (RTR).
    pub peer: Option<QpPeer>,
    /// Its counters.
    pub counters: QpCounters,
}

/// Counters of one QP.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QpCounters {
    /// Send WQEs taken from its send ring (malformed ones not included).
    pub send_wqes: u64,
    /// Bytes those WQEs list.
    pub send_bytes: u64,
    /// Successful receive completions written for it.
    pub recv_wqes: u64,
    /// Bytes those completions report.
    pub recv_bytes: u64,
    /// Completions with an error status written for it (either queue; flushes included).
    pub error_completions: u64,
    /// Malformed WQEs on its queues (completed in error).
    pub bad_wqes: u64,
    /// Times its head send WR waited for the responder to post a receive (RNR NAKs). `None`
    /// when the backend does not say.
    pub rnr_waits: Option<u64>,
    /// Times its head send WR was sent again after an RNR wait or a transport timeout. `None`
    /// when the backend does not say.
    pub retries: Option<u64>,
}

// ---- names ---------------------------------------------------------------------------------

/// The name of a command code (`"CREATE_QP"`), `None` for one the device does not know.
pub fn command_name(cmd: u32) -> Option<&'static str> {
    COMMAND_NAMES.get(cmd as usize).copied()
}

/// Command names by code (`abi::cmd`).
const COMMAND_NAMES: [&str; code::COUNT as usize] = [
    "QUERY_PORT",
    "QUERY_PKEY",
    "CREATE_PD",
    "DESTROY_PD",
    "CREATE_MR",
    "DESTROY_MR",
    "CREATE_CQ",
    "RESIZE_CQ",
    "DESTROY_CQ",
    "CREATE_QP",
    "MODIFY_QP",
    "QUERY_QP",
    "DESTROY_QP",
    "CREATE_UC",
    "DESTROY_UC",
    "CREATE_BIND",
    "DESTROY_BIND",
    "CREATE_SRQ",
    "MODIFY_SRQ",
    "QUERY_SRQ",
    "DESTROY_SRQ",
];

/// The name of a QP type.
pub(crate) fn qp_type_name(t: QpType) -> &'static str {
    match t {
        QpType::Gsi => "GSI",
        QpType::Rc => "RC",
        QpType::Ud => "UD",
    }
}

/// The name of a QP state.
pub(crate) fn qp_state_name(s: QpState) -> &'static str {
    match s {
        QpState::Reset => "RESET",
        QpState::Init => "INIT",
        QpState::Rtr => "RTR",
        QpState::Rts => "RTS",
        QpState::Sqd => "SQD",
        QpState::Sqe => "SQE",
        QpState::Err => "ERR",
    }
}

/// Send opcodes counted, by the guest's opcode (`abi::wr_opcode`; 7 and 9 are never taken).
const SEND_OPS: [&str; N_SEND_OPS] = [
    "RDMA_WRITE",
    "RDMA_WRITE_WITH_IMM",
    "SEND",
    "SEND_WITH_IMM",
    "RDMA_READ",
    "ATOMIC_CMP_AND_SWP",
    "ATOMIC_FETCH_AND_ADD",
    "OPCODE_7",
    "SEND_WITH_INV",
    "OPCODE_9",
    "LOCAL_INV",
    "FAST_REG_MR",
];
const N_SEND_OPS: usize = 12;

/// Receive opcodes counted, by [`recv_op_index`].
const RECV_OPS: [&str; N_RECV_OPS] = ["RECV", "RECV_RDMA_WITH_IMM"];
pub(crate) const N_RECV_OPS: usize = 2;

/// Where a receive completion is counted in [`RECV_OPS`]; `None` for a send-side opcode.
pub(crate) fn recv_op_index(op: WcOpcode) -> Option<usize> {
    match op {
        WcOpcode::Recv => Some(0),
        WcOpcode::RecvRdmaWithImm => Some(1),
        _ => None,
    }
}

// ---- the counters as kept ------------------------------------------------------------------

/// A counter written by one thread at a time and read by any: a relaxed load and store, which
/// on the common targets is a plain `mov` (no locked instruction). The writer is the worker
/// draining the QP (it holds the QP's `pending` lock).
#[derive(Debug, Default)]
pub(crate) struct OneWriter(AtomicU64);

impl OneWriter {
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// WQEs of one opcode and their bytes, as a worker counts them.
#[derive(Debug, Default)]
struct OpCell {
    wqes: OneWriter,
    bytes: OneWriter,
}

/// A QP's data-path counters kept on the worker side (in its shared state).
#[derive(Debug, Default)]
pub(crate) struct QpTraffic {
    send: [OpCell; N_SEND_OPS],
    bad_wqes: OneWriter,
}

impl QpTraffic {
    /// A send WQE of guest opcode `opcode` listing `bytes`, taken from the ring (an opcode the
    /// device does not take is not counted; it never gets here).
    #[inline]
    pub(crate) fn sent(&self, opcode: u32, bytes: u64) {
        if let Some(c) = self.send.get(opcode as usize) {
            c.wqes.add(1);
            c.bytes.add(bytes);
        }
    }

    /// A malformed WQE completed in error.
    pub(crate) fn bad_wqe(&self) {
        self.bad_wqes.add(1);
    }
}

/// Send-side counts by opcode, and malformed WQEs: the device's totals of QPs destroyed, and
/// the sum read out of live ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SendTotals {
    pub send: [OpCount; N_SEND_OPS],
    pub bad_wqes: u64,
}

impl SendTotals {
    /// Adds a QP's counts. Wrapping, like the counters themselves: the bytes are what the
    /// guest's WQEs list (up to 16 × 4 GiB each, whether or not they move), so a guest could
    /// make them pass 2^64.
    pub(crate) fn add(&mut self, t: &QpTraffic) {
        for (c, t) in self.send.iter_mut().zip(&t.send) {
            c.wqes = c.wqes.wrapping_add(t.wqes.get());
            c.bytes = c.bytes.wrapping_add(t.bytes.get());
        }
        self.bad_wqes = self.bad_wqes.wrapping_add(t.bad_wqes.get());
    }

    /// The sum over all opcodes (wrapping, as [`SendTotals::add`]).
    pub(crate) fn total(&self) -> OpCount {
        self.send.iter().fold(OpCount::default(), |a, c| OpCount {
            wqes: a.wqes.wrapping_add(c.wqes),
            bytes: a.bytes.wrapping_add(c.bytes),
        })
    }

    /// The counts by opcode name (opcodes never seen left out).
    pub(crate) fn by_name(&self) -> BTreeMap<String, OpCount> {
        named(&SEND_OPS, &self.send)
    }
}

/// A QP's counts of the completions written for it, kept on the main loop (in its record).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CompletionCounts {
    /// Successful receive completions, and the bytes they report.
    pub recv_wqes: u64,
    pub recv_bytes: u64,
    /// Completions with an error status, either queue.
    pub errors: u64,
}

/// The counts of `ops` by name, leaving out those never seen.
fn named(names: &[&str], ops: &[OpCount]) -> BTreeMap<String, OpCount> {
    names
        .iter()
        .zip(ops)
        .filter(|(_, c)| c.wqes != 0)
        .map(|(n, c)| ((*n).to_string(), *c))
        .collect()
}

/// What the main loop counts itself.
#[derive(Debug, Clone, Default)]
pub(crate) struct MainCounters {
    /// By command code; the last entry is every unknown code.
    pub commands: [CommandCount; code::COUNT as usize + 1],
    pub doorbells: u64,
    pub recv: [OpCount; N_RECV_OPS],
    pub cqes: u64,
    pub stale_completions: u64,
    pub cq_overflows: u64,
    pub interrupts: Interrupts,
    pub events: u64,
    pub resets: u64,
    /// Guest input refused (the data path's malformed WQEs are added when read).
    pub refused: Refused,
}

impl MainCounters {
    /// The counter of command `cmd`.
    pub(crate) fn command(&mut self, cmd: u32) -> &mut CommandCount {
        let i = (cmd as usize).min(code::COUNT as usize);
        &mut self.commands[i]
    }

    /// The public form: these, with the data path's send-side `send` and the live `objects`.
    pub(crate) fn report(
        &self,
        send: &SendTotals,
        objects: ObjectCounts,
        host_mem: u64,
    ) -> DeviceStats {
        let commands_by_code = self
            .commands
            .iter()
            .enumerate()
            .filter(|(_, c)| c.count != 0)
            .map(|(i, c)| {
                let name = command_name(i as u32).unwrap_or("UNKNOWN");
                (name.to_string(), *c)
            })
            .collect();
        let mut refused = self.refused;
        refused.wqes = refused.wqes.wrapping_add(send.bad_wqes);
        DeviceStats {
            commands: self.commands.iter().map(|c| c.count).sum(),
            command_errors: self.commands.iter().map(|c| c.errors).sum(),
            commands_by_code,
            doorbells: self.doorbells,
            send: send.by_name(),
            recv: named(&RECV_OPS, &self.recv),
            cqes: self.cqes,
            stale_completions: self.stale_completions,
            cq_overflows: self.cq_overflows,
            interrupts: self.interrupts,
            events: self.events,
            resets: self.resets,
            objects,
            host_mem,
            refused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::wr_opcode as op;

    #[test]
    fn command_names_follow_the_codes() {
        assert_eq!(command_name(code::QUERY_PORT), Some("QUERY_PORT"));
        assert_eq!(command_name(code::CREATE_QP), Some("CREATE_QP"));
        assert_eq!(command_name(code::DESTROY_SRQ), Some("DESTROY_SRQ"));
        assert_eq!(command_name(code::COUNT), None);
        let mut m = MainCounters::default();
        m.command(code::CREATE_QP).count += 2;
        m.command(u32::MAX).count += 1;
        m.command(u32::MAX).errors += 1;
        let s = m.report(&SendTotals::default(), ObjectCounts::default(), 0);
        assert_eq!((s.commands, s.command_errors), (3, 1));
        assert_eq!(s.commands_by_code["CREATE_QP"].count, 2);
        assert_eq!(
            s.commands_by_code["UNKNOWN"],
            CommandCount {
                count: 1,
                errors: 1
            }
        );
        assert_eq!(s.commands_by_code.len(), 2, "codes never seen are left out");
    }

    #[test]
    fn byte_counts_a_guest_inflates_wrap_instead_of_overflowing() {
        let t = QpTraffic::default();
        t.sent(op::SEND, u64::MAX);
        t.sent(op::SEND, 2);
        let mut all = SendTotals::default();
        all.add(&t);
        all.add(&t);
        assert_eq!(all.total().bytes, 2);
        assert_eq!(all.total().wqes, 4);
    }

    #[test]
    fn sends_count_by_opcode_with_their_bytes_and_survive_their_qp() {
        let t = QpTraffic::default();
        t.sent(op::SEND, 64);
        t.sent(op::SEND, 128);
        t.sent(op::RDMA_WRITE_WITH_IMM, 4096);
        t.sent(99, 1);
        t.bad_wqe();
        let mut retired = SendTotals::default();
        retired.add(&t);
        let mut live = retired;
        live.add(&t);
        let names = live.by_name();
        assert_eq!(
            names["SEND"],
            OpCount {
                wqes: 4,
                bytes: 384
            }
        );
        assert_eq!(
            names["RDMA_WRITE_WITH_IMM"],
            OpCount {
                wqes: 2,
                bytes: 8192
            }
        );
        assert_eq!(names.len(), 2);
        assert_eq!(live.bad_wqes, 2);
        assert_eq!(
            retired.total(),
            OpCount {
                wqes: 3,
                bytes: 4288
            }
        );
    }

    #[test]
    fn send_ops_are_named_by_the_guests_opcodes() {
        for (code, name) in [
            (op::RDMA_WRITE, "RDMA_WRITE"),
            (op::RDMA_WRITE_WITH_IMM, "RDMA_WRITE_WITH_IMM"),
            (op::SEND, "SEND"),
            (op::SEND_WITH_IMM, "SEND_WITH_IMM"),
            (op::RDMA_READ, "RDMA_READ"),
            (op::ATOMIC_CMP_AND_SWP, "ATOMIC_CMP_AND_SWP"),
            (op::ATOMIC_FETCH_AND_ADD, "ATOMIC_FETCH_AND_ADD"),
            (op::SEND_WITH_INV, "SEND_WITH_INV"),
            (op::LOCAL_INV, "LOCAL_INV"),
            (op::FAST_REG_MR, "FAST_REG_MR"),
        ] {
            assert_eq!(SEND_OPS[code as usize], name);
        }
    }

    #[test]
    fn the_structures_serialise_as_plain_data_with_snake_case_names() {
        let mut m = MainCounters::default();
        m.command(code::CREATE_QP).count += 1;
        m.refused.doorbells = 7;
        let mut send = SendTotals::default();
        send.send[op::RDMA_WRITE as usize] = OpCount { wqes: 1, bytes: 9 };
        let v = serde_json::to_value(m.report(&send, ObjectCounts::default(), 0)).unwrap();
        assert_eq!(v["commands_by_code"]["CREATE_QP"]["count"], 1);
        assert_eq!(v["send"]["RDMA_WRITE"]["bytes"], 9);
        assert_eq!(v["refused"]["doorbells"], 7);
        assert_eq!(v["interrupts"]["async_events"], 0);
        assert_eq!(v["objects"]["qps"], 0);
        let r = Resources {
            qps: vec![QpInfo {
                qp_type: "RC".into(),
                peer: Some(QpPeer {
                    gid: "fe80::1".into(),
                    qpn: 3,
                }),
                ..QpInfo::default()
            }],
            ..Resources::default()
        };
        let v = serde_json::to_value(r).unwrap();
        assert_eq!(v["qps"][0]["peer"]["qpn"], 3);
        assert_eq!(v["qps"][0]["qp_type"], "RC");
        assert!(v["qps"][0]["counters"]["rnr_waits"].is_null());
    }
}
