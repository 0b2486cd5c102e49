//! With `ffi.rs` and `alias.rs`, the only modules of the rdma-core backend with `unsafe`: narrow
//! RAII wrappers around the libibverbs objects (through `ffi`, which loads `libibverbs.so.1` at
//! run time).
//!
//! Every wrapper owns one verbs object and destroys it on drop; objects a verbs object depends on
//! (the context, a PD, CQs, an SRQ) are held by `Arc` so they outlive it. libibverbs objects may
//! be used from any thread (libibverbs serialises internally), hence the `Send`/`Sync` impls.
#![allow(unsafe_code)]

use std::ffi::{c_void, CStr};
use std::ptr;
use std::sync::Arc;

use super::ffi as sys;

pub use sys::{ibv_qp_attr_mask as QpMask, ibv_qp_state, ibv_qp_type, ibv_wr_opcode};

/// Result of a verbs call: the error text names the verb and errno.
pub type VResult<T> = std::result::Result<T, String>;

fn errno_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn rc_err(what: &str, rc: i32) -> String {
    let e = if rc > 0 {
        std::io::Error::from_raw_os_error(rc)
    } else {
        std::io::Error::last_os_error()
    };
    format!("{what}: {e}")
}

/// Whether `libibverbs.so.1` (with every function the backend calls) can be loaded in this
/// process; the error says why not.
pub fn libibverbs_available() -> VResult<()> {
    sys::lib().map(|_| ())
}

/// The devices of `ibv_get_device_list`, by name; the list is freed on drop.
struct DeviceList {
    lib: &'static sys::Lib,
    list: *mut *mut sys::ibv_device,
    n: usize,
}

impl DeviceList {
    fn get() -> VResult<DeviceList> {
        let lib = sys::lib()?;
        let mut n = 0;
        // SAFETY: `n` is a valid out pointer; the list is freed on drop.
        let list = unsafe { (lib.get_device_list)(&mut n) };
        if list.is_null() {
            let e = errno_err("ibv_get_device_list");
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
                // libibverbs found no /sys/class/infiniband_verbs.
                return Err(format!(
                    "{e}: the kernel offers no RDMA devices to user space (is ib_uverbs loaded?)"
                ));
            }
            return Err(e);
        }
        Ok(DeviceList {
            lib,
            list,
            n: n.max(0) as usize,
        })
    }

    /// Device `i` (`i < n`) and its name.
    fn device(&self, i: usize) -> (*mut sys::ibv_device, String) {
        assert!(i < self.n);
        // SAFETY: the list has `n` valid device pointers.
        let d = unsafe { *self.list.add(i) };
        // SAFETY: `d` is a valid device; the name is a NUL-terminated string owned by it.
        let name = unsafe { CStr::from_ptr((self.lib.get_device_name)(d)) };
        (d, name.to_string_lossy().into_owned())
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: `list` came from ibv_get_device_list and is freed once; contexts opened from
        // its devices do not need it.
        unsafe { (self.lib.free_device_list)(self.list) };
    }
}

/// Names of the host RDMA devices.
pub fn device_names() -> VResult<Vec<String>> {
    let list = DeviceList::get()?;
    Ok((0..list.n).map(|i| list.device(i).1).collect())
}

/// Port and device limits the backend needs.
#[derive(Debug, Clone, Copy)]
pub struct PortInfo {
    /// Active MTU (IB encoding).
    pub active_mtu: u32,
    /// GID table length.
    pub gid_tbl_len: u32,
    /// Port state (IBV_PORT_*).
    pub state: u32,
    /// Device max SGEs per WR.
    pub max_sge: u32,
    /// Device max CQEs per CQ.
    pub max_cqe: u32,
    /// Device max WRs per queue.
    pub max_qp_wr: u32,
}

/// An open device.
#[derive(Debug)]
pub struct Context {
    lib: &'static sys::Lib,
    ctx: *mut sys::ibv_context,
    /// Device name.
    pub name: String,
}

// SAFETY: an ibv_context may be used from any thread.
unsafe impl Send for Context {}
// SAFETY: as above; libibverbs locks internally.
unsafe impl Sync for Context {}

impl Context {
    /// Opens the device named `name`.
    pub fn open(name: &str) -> VResult<Arc<Context>> {
        let list = DeviceList::get()?;
        let mut names = Vec::new();
        for i in 0..list.n {
            let (d, dn) = list.device(i);
            if dn == name {
                // SAFETY: valid device pointer while the list is alive.
                let ctx = unsafe { (list.lib.open_device)(d) };
                if ctx.is_null() {
                    return Err(errno_err(&format!("ibv_open_device({name})")));
                }
                return Ok(Arc::new(Context {
                    lib: list.lib,
                    ctx,
                    name: name.to_string(),
                }));
            }
            names.push(dn);
        }
        Err(format!(
            "no RDMA device named {name} (host devices: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        ))
    }

    /// Port attributes and device limits.
    pub fn port_info(&self, port: u8) -> VResult<PortInfo> {
        // SAFETY: all-zero is a valid ibv_port_attr_compat / ibv_device_attr (plain integers).
        let mut pa: sys::ibv_port_attr_compat = unsafe { std::mem::zeroed() };
        // SAFETY: valid context and out pointer of the struct the exported ibv_query_port fills.
        let rc = unsafe { (self.lib.query_port)(self.ctx, port, &mut pa) };
        if rc != 0 {
            return Err(rc_err(
                &format!("ibv_query_port({}, {port})", self.name),
                rc,
            ));
        }
        // SAFETY: as above.
        let mut da: sys::ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: valid context and out pointer.
        let rc = unsafe { (self.lib.query_device)(self.ctx, &mut da) };
        if rc != 0 {
            return Err(rc_err("ibv_query_device", rc));
        }
        Ok(PortInfo {
            active_mtu: pa.active_mtu,
            gid_tbl_len: pa.gid_tbl_len.max(0) as u32,
            state: pa.state,
            max_sge: da.max_sge.max(1) as u32,
            max_cqe: da.max_cqe.max(1) as u32,
            max_qp_wr: da.max_qp_wr.max(1) as u32,
        })
    }

    /// GID table entry `index` of `port`: the GID and its type (0 IB, 1 RoCE v1, 2 RoCE v2), or
    /// `None` for an empty or unreadable entry.
    pub fn gid(&self, port: u8, index: u32) -> Option<([u8; 16], u32)> {
        // SAFETY: all-zero is a valid ibv_gid_entry.
        let mut e: sys::ibv_gid_entry = unsafe { std::mem::zeroed() };
        // SAFETY: valid context and out pointer of the size the wrapper passes.
        let rc =
            unsafe { sys::ibv_query_gid_ex(self.lib, self.ctx, u32::from(port), index, &mut e, 0) };
        if rc != 0 {
            return None;
        }
        // SAFETY: every bit pattern of the union is a valid [u8; 16].
        let raw = unsafe { e.gid.raw };
        (raw != [0; 16]).then_some((raw, e.gid_type))
    }

    /// The file descriptor of asynchronous events (made non-blocking).
    pub fn async_fd(&self) -> i32 {
        // SAFETY: valid context.
        let fd = unsafe { (*self.ctx).async_fd };
        set_nonblocking(fd);
        fd
    }

    /// Reads one asynchronous event (non-blocking) and acknowledges it.
    pub fn next_async_event(&self) -> Option<AsyncEv> {
        // SAFETY: all-zero is a valid out buffer for ibv_async_event (pointer/int union + enum
        // value 0, which is IBV_EVENT_CQ_ERR).
        let mut ev: sys::ibv_async_event = unsafe { std::mem::zeroed() };
        // SAFETY: valid context and out pointer; the fd is non-blocking.
        if unsafe { (self.lib.get_async_event)(self.ctx, &mut ev) } != 0 {
            return None;
        }
        use sys::ibv_event_type as T;
        // SAFETY: the union member read matches the event type, as documented by libibverbs.
        let out = unsafe {
            match ev.event_type {
                T::IBV_EVENT_QP_FATAL => AsyncEv::QpFatal((*ev.element.qp).qp_num),
                T::IBV_EVENT_QP_REQ_ERR => AsyncEv::QpReqErr((*ev.element.qp).qp_num),
                T::IBV_EVENT_QP_ACCESS_ERR => AsyncEv::QpAccessErr((*ev.element.qp).qp_num),
                T::IBV_EVENT_QP_LAST_WQE_REACHED => AsyncEv::QpLastWqe((*ev.element.qp).qp_num),
                T::IBV_EVENT_SRQ_LIMIT_REACHED => AsyncEv::SrqLimit(ev.element.srq as usize),
                _ => AsyncEv::Other,
            }
        };
        // SAFETY: `ev` was filled by ibv_get_async_event and is acked once.
        unsafe { (self.lib.ack_async_event)(&mut ev) };
        Some(out)
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every object of the context holds an Arc to it, so none is left.
        unsafe { (self.lib.close_device)(self.ctx) };
    }
}

/// An asynchronous event, reduced to what the backend forwards.
#[derive(Debug, Clone, Copy)]
pub enum AsyncEv {
    /// QP fatal (host QP number).
    QpFatal(u32),
    /// Invalid request as responder.
    QpReqErr(u32),
    /// Access error as responder.
    QpAccessErr(u32),
    /// Last WQE reached.
    QpLastWqe(u32),
    /// SRQ limit (address of the host SRQ).
    SrqLimit(usize),
    /// Anything else (port, CQ, device events).
    Other,
}

fn set_nonblocking(fd: i32) {
    // SAFETY: fcntl on an fd owned by libibverbs; only the O_NONBLOCK flag changes.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }
}

/// Waits until one of `fds` is readable or `timeout_ms` passes.
pub fn poll_fds(fds: &[i32], timeout_ms: i32) {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `p` is a valid array of `p.len()` pollfd.
    unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
}

/// A protection domain.
#[derive(Debug)]
pub struct Pd {
    lib: &'static sys::Lib,
    pd: *mut sys::ibv_pd,
    _ctx: Arc<Context>,
}
// SAFETY: see Context.
unsafe impl Send for Pd {}
// SAFETY: see Context.
unsafe impl Sync for Pd {}

impl Pd {
    /// Allocates a PD.
    pub fn new(ctx: &Arc<Context>) -> VResult<Arc<Pd>> {
        // SAFETY: valid context.
        let pd = unsafe { (ctx.lib.alloc_pd)(ctx.ctx) };
        if pd.is_null() {
            return Err(errno_err("ibv_alloc_pd"));
        }
        Ok(Arc::new(Pd {
            lib: ctx.lib,
            pd,
            _ctx: ctx.clone(),
        }))
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: MRs, QPs, SRQs and AHs hold an Arc to the PD, so none is left.
        unsafe { (self.lib.dealloc_pd)(self.pd) };
    }
}

/// A registered memory region.
#[derive(Debug)]
pub struct Mr {
    lib: &'static sys::Lib,
    mr: *mut sys::ibv_mr,
    _pd: Arc<Pd>,
    /// Local key.
    pub lkey: u32,
    /// Remote key.
    pub rkey: u32,
}
// SAFETY: see Context.
unsafe impl Send for Mr {}
// SAFETY: see Context.
unsafe impl Sync for Mr {}

impl Mr {
    /// Registers `[addr, addr + len)` of this process with iova `iova` (`None`: the address).
    ///
    /// The memory must stay mapped while the MR lives; the caller guarantees that (guest RAM
    /// mappings outlive the backend, bounce buffers are owned next to their MR). The kernel pins
    /// the pages, so an unmapping would not make the HCA touch unrelated memory.
    pub fn register(
        pd: &Arc<Pd>,
        addr: usize,
        len: usize,
        iova: Option<u64>,
        access: u32,
    ) -> VResult<Mr> {
        // verbs.h's ibv_reg_mr and ibv_reg_mr_iova with access flags that are not a compile-time
        // constant: ibv_reg_mr_iova2, iova = the address for ibv_reg_mr.
        let iova = iova.unwrap_or(addr as u64);
        // SAFETY: registering memory does not access it from Rust; see the doc comment.
        let mr = unsafe { (pd.lib.reg_mr_iova2)(pd.pd, addr as *mut c_void, len, iova, access) };
        if mr.is_null() {
            return Err(errno_err("ibv_reg_mr"));
        }
        // SAFETY: `mr` is a valid MR.
        let (lkey, rkey) = unsafe { ((*mr).lkey, (*mr).rkey) };
        Ok(Mr {
            lib: pd.lib,
            mr,
            _pd: pd.clone(),
            lkey,
            rkey,
        })
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: valid MR, deregistered once.
        unsafe { (self.lib.dereg_mr)(self.mr) };
    }
}

/// A completion channel.
#[derive(Debug)]
pub struct Channel {
    lib: &'static sys::Lib,
    ch: *mut sys::ibv_comp_channel,
    _ctx: Arc<Context>,
}
// SAFETY: see Context.
unsafe impl Send for Channel {}
// SAFETY: see Context.
unsafe impl Sync for Channel {}

impl Channel {
    /// Creates a completion channel with a non-blocking fd.
    pub fn new(ctx: &Arc<Context>) -> VResult<Arc<Channel>> {
        // SAFETY: valid context.
        let ch = unsafe { (ctx.lib.create_comp_channel)(ctx.ctx) };
        if ch.is_null() {
            return Err(errno_err("ibv_create_comp_channel"));
        }
        // SAFETY: valid channel.
        set_nonblocking(unsafe { (*ch).fd });
        Ok(Arc::new(Channel {
            lib: ctx.lib,
            ch,
            _ctx: ctx.clone(),
        }))
    }
    /// The channel's fd.
    pub fn fd(&self) -> i32 {
        // SAFETY: valid channel.
        unsafe { (*self.ch).fd }
    }
    /// Takes one CQ event (non-blocking) and acknowledges it right away; returns the address of
    /// the CQ it names (compare with [`Cq::addr`]).
    pub fn next_event(&self) -> Option<usize> {
        let mut cq = ptr::null_mut();
        let mut cq_ctx = ptr::null_mut();
        // SAFETY: valid channel and out pointers.
        if unsafe { (self.lib.get_cq_event)(self.ch, &mut cq, &mut cq_ctx) } != 0 {
            return None;
        }
        // SAFETY: `cq` is alive until its events are acked (ibv_destroy_cq waits for that).
        unsafe { (self.lib.ack_cq_events)(cq, 1) };
        Some(cq as usize)
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        // SAFETY: CQs hold an Arc to the channel, so none is left.
        unsafe { (self.lib.destroy_comp_channel)(self.ch) };
    }
}

/// A work completion as read from a host CQ.
#[derive(Debug, Clone, Copy)]
pub struct HostWc {
    /// Host work request id.
    pub wr_id: u64,
    /// `ibv_wc_status`.
    pub status: u32,
    /// `ibv_wc_opcode`.
    pub opcode: u32,
    /// Byte length.
    pub byte_len: u32,
    /// Immediate data (as received), if any.
    pub imm: Option<u32>,
    /// Host QP number.
    pub qp_num: u32,
    /// Source QP.
    pub src_qp: u32,
    /// GRH present.
    pub grh: bool,
}

/// A completion queue.
#[derive(Debug)]
pub struct Cq {
    lib: &'static sys::Lib,
    cq: *mut sys::ibv_cq,
    _ch: Arc<Channel>,
}
// SAFETY: see Context.
unsafe impl Send for Cq {}
// SAFETY: see Context.
unsafe impl Sync for Cq {}

impl Cq {
    /// Creates a CQ bound to `ch` and arms it.
    pub fn new(ctx: &Arc<Context>, ch: &Arc<Channel>, cqe: u32) -> VResult<Arc<Cq>> {
        // SAFETY: valid context and channel.
        let cq = unsafe { (ctx.lib.create_cq)(ctx.ctx, cqe as i32, ptr::null_mut(), ch.ch, 0) };
        if cq.is_null() {
            return Err(errno_err("ibv_create_cq"));
        }
        let cq = Arc::new(Cq {
            lib: ctx.lib,
            cq,
            _ch: ch.clone(),
        });
        cq.arm()?;
        Ok(cq)
    }
    /// Address identifying the CQ in channel events.
    pub fn addr(&self) -> usize {
        self.cq as usize
    }
    /// Requests a notification for the next completion.
    pub fn arm(&self) -> VResult<()> {
        // SAFETY: valid CQ.
        let rc = unsafe { sys::ibv_req_notify_cq(self.cq, 0) };
        if rc != 0 {
            return Err(rc_err("ibv_req_notify_cq", rc));
        }
        Ok(())
    }
    /// Polls up to `out.capacity()` completions into `out`.
    pub fn poll(&self, out: &mut Vec<HostWc>, max: usize) {
        // SAFETY: all-zero is a valid ibv_wc (integers and an integer union).
        let mut wcs: [sys::ibv_wc; 32] = unsafe { std::mem::zeroed() };
        let n = max.min(wcs.len()) as i32;
        // SAFETY: valid CQ and an array of `n` entries.
        let got = unsafe { sys::ibv_poll_cq(self.cq, n, wcs.as_mut_ptr()) };
        for w in wcs.iter().take(got.max(0) as usize) {
            let flags = w.wc_flags;
            out.push(HostWc {
                wr_id: w.wr_id,
                status: w.status,
                opcode: w.opcode,
                byte_len: w.byte_len,
                imm: (flags & sys::IBV_WC_WITH_IMM != 0).then_some(w.imm_data),
                qp_num: w.qp_num,
                src_qp: w.src_qp,
                grh: flags & sys::IBV_WC_GRH != 0,
            });
        }
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: QPs hold an Arc to their CQs, so none uses it; events are acked when taken.
        unsafe { (self.lib.destroy_cq)(self.cq) };
    }
}

/// A host SGE.
pub type HostSge = sys::ibv_sge;

/// A shared receive queue.
#[derive(Debug)]
pub struct Srq {
    lib: &'static sys::Lib,
    srq: *mut sys::ibv_srq,
    _pd: Arc<Pd>,
}
// SAFETY: see Context.
unsafe impl Send for Srq {}
// SAFETY: see Context.
unsafe impl Sync for Srq {}

impl Srq {
    /// Creates an SRQ.
    pub fn new(pd: &Arc<Pd>, max_wr: u32, max_sge: u32, limit: u32) -> VResult<Arc<Srq>> {
        let mut a = sys::ibv_srq_init_attr {
            srq_context: ptr::null_mut(),
            attr: sys::ibv_srq_attr {
                max_wr,
                max_sge,
                srq_limit: limit,
            },
        };
        // SAFETY: valid PD and attributes.
        let srq = unsafe { (pd.lib.create_srq)(pd.pd, &mut a) };
        if srq.is_null() {
            return Err(errno_err("ibv_create_srq"));
        }
        Ok(Arc::new(Srq {
            lib: pd.lib,
            srq,
            _pd: pd.clone(),
        }))
    }
    /// Address identifying the SRQ in async events.
    pub fn addr(&self) -> usize {
        self.srq as usize
    }
    /// Arms the limit.
    pub fn set_limit(&self, limit: u32) -> VResult<()> {
        let mut a = sys::ibv_srq_attr {
            max_wr: 0,
            max_sge: 0,
            srq_limit: limit,
        };
        // SAFETY: valid SRQ and attributes.
        let rc = unsafe { (self.lib.modify_srq)(self.srq, &mut a, sys::IBV_SRQ_LIMIT) };
        if rc != 0 {
            return Err(rc_err("ibv_modify_srq", rc));
        }
        Ok(())
    }
    /// Posts one receive.
    pub fn post_recv(&self, wr_id: u64, sges: &mut [HostSge]) -> std::result::Result<(), i32> {
        let mut wr = sys::ibv_recv_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: sges.as_mut_ptr(),
            num_sge: sges.len() as i32,
        };
        let mut bad = ptr::null_mut();
        // SAFETY: valid SRQ; the WR and SGE array live across the call (copied by the provider).
        let rc = unsafe { sys::ibv_post_srq_recv(self.srq, &mut wr, &mut bad) };
        if rc != 0 {
            return Err(rc);
        }
        Ok(())
    }
}

impl Drop for Srq {
    fn drop(&mut self) {
        // SAFETY: QPs hold an Arc to their SRQ.
        unsafe { (self.lib.destroy_srq)(self.srq) };
    }
}

/// An address handle.
#[derive(Debug)]
pub struct Ah {
    lib: &'static sys::Lib,
    ah: *mut sys::ibv_ah,
    _pd: Arc<Pd>,
}
// SAFETY: see Context.
unsafe impl Send for Ah {}
// SAFETY: see Context.
unsafe impl Sync for Ah {}

/// A RoCE address vector in host terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HostAv {
    /// Destination GID.
    pub dgid: [u8; 16],
    /// Host source GID index.
    pub sgid_index: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// Traffic class.
    pub traffic_class: u8,
    /// Flow label.
    pub flow_label: u32,
    /// Service level.
    pub sl: u8,
    /// Port.
    pub port: u8,
}

impl HostAv {
    fn to_sys(self) -> sys::ibv_ah_attr {
        sys::ibv_ah_attr {
            grh: sys::ibv_global_route {
                dgid: sys::ibv_gid { raw: self.dgid },
                flow_label: self.flow_label,
                sgid_index: self.sgid_index,
                hop_limit: self.hop_limit,
                traffic_class: self.traffic_class,
            },
            dlid: 0,
            sl: self.sl,
            src_path_bits: 0,
            static_rate: 0,
            is_global: 1,
            port_num: self.port,
        }
    }
}

impl Ah {
    /// Creates an AH.
    pub fn new(pd: &Arc<Pd>, av: HostAv) -> VResult<Arc<Ah>> {
        let mut a = av.to_sys();
        // SAFETY: valid PD and attributes.
        let ah = unsafe { (pd.lib.create_ah)(pd.pd, &mut a) };
        if ah.is_null() {
            return Err(errno_err("ibv_create_ah"));
        }
        Ok(Arc::new(Ah {
            lib: pd.lib,
            ah,
            _pd: pd.clone(),
        }))
    }
}

impl Drop for Ah {
    fn drop(&mut self) {
        // SAFETY: valid AH; sends naming it hold an Arc until they complete or the QP goes.
        unsafe { (self.lib.destroy_ah)(self.ah) };
    }
}

/// QP attributes in host terms, with the mask of those set.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostQpAttr {
    /// Mask (IBV_QP_*).
    pub mask: u32,
    /// State.
    pub state: u32,
    /// Path MTU.
    pub path_mtu: u32,
    /// Q_Key.
    pub qkey: u32,
    /// RQ PSN.
    pub rq_psn: u32,
    /// SQ PSN.
    pub sq_psn: u32,
    /// Destination QPN.
    pub dest_qp_num: u32,
    /// Access flags.
    pub access: u32,
    /// P_Key index.
    pub pkey_index: u16,
    /// Max RD atomic.
    pub max_rd_atomic: u8,
    /// Max dest RD atomic.
    pub max_dest_rd_atomic: u8,
    /// Min RNR timer.
    pub min_rnr_timer: u8,
    /// Port.
    pub port_num: u8,
    /// Timeout.
    pub timeout: u8,
    /// Retry count.
    pub retry_cnt: u8,
    /// RNR retry.
    pub rnr_retry: u8,
    /// Primary path.
    pub av: Option<HostAv>,
}

/// Send operation in host terms.
#[derive(Debug, Clone)]
pub struct HostSend {
    /// `ibv_wr_opcode`.
    pub opcode: u32,
    /// IBV_SEND_* flags.
    pub flags: u32,
    /// Immediate data.
    pub imm: u32,
    /// Remote address.
    pub remote_addr: u64,
    /// Remote key.
    pub rkey: u32,
    /// Compare / add.
    pub compare_add: u64,
    /// Swap.
    pub swap: u64,
    /// UD destination.
    pub ud: Option<(Arc<Ah>, u32, u32)>,
}

/// A queue pair.
#[derive(Debug)]
pub struct Qp {
    lib: &'static sys::Lib,
    qp: *mut sys::ibv_qp,
    /// Host QP number.
    pub qp_num: u32,
    _pd: Arc<Pd>,
    _cqs: (Arc<Cq>, Arc<Cq>),
    _srq: Option<Arc<Srq>>,
}
// SAFETY: see Context.
unsafe impl Send for Qp {}
// SAFETY: see Context.
unsafe impl Sync for Qp {}

/// QP capabilities.
#[derive(Debug, Clone, Copy)]
pub struct QpCaps {
    /// Send queue depth.
    pub max_send_wr: u32,
    /// Receive queue depth.
    pub max_recv_wr: u32,
    /// Send SGEs.
    pub max_send_sge: u32,
    /// Receive SGEs.
    pub max_recv_sge: u32,
}

impl Qp {
    /// Creates an RC (`ud == false`) or UD QP.
    pub fn new(
        pd: &Arc<Pd>,
        send_cq: &Arc<Cq>,
        recv_cq: &Arc<Cq>,
        srq: Option<&Arc<Srq>>,
        ud: bool,
        caps: QpCaps,
    ) -> VResult<Qp> {
        let mut a = sys::ibv_qp_init_attr {
            qp_context: ptr::null_mut(),
            send_cq: send_cq.cq,
            recv_cq: recv_cq.cq,
            srq: srq.map_or(ptr::null_mut(), |s| s.srq),
            cap: sys::ibv_qp_cap {
                max_send_wr: caps.max_send_wr,
                max_recv_wr: caps.max_recv_wr,
                max_send_sge: caps.max_send_sge,
                max_recv_sge: caps.max_recv_sge,
                max_inline_data: 0,
            },
            qp_type: if ud {
                ibv_qp_type::IBV_QPT_UD
            } else {
                ibv_qp_type::IBV_QPT_RC
            },
            sq_sig_all: 0,
        };
        // SAFETY: valid PD, CQs, SRQ and attributes.
        let qp = unsafe { (pd.lib.create_qp)(pd.pd, &mut a) };
        if qp.is_null() {
            return Err(errno_err("ibv_create_qp"));
        }
        // SAFETY: valid QP.
        let qp_num = unsafe { (*qp).qp_num };
        Ok(Qp {
            lib: pd.lib,
            qp,
            qp_num,
            _pd: pd.clone(),
            _cqs: (send_cq.clone(), recv_cq.clone()),
            _srq: srq.cloned(),
        })
    }

    /// Current state (`ibv_qp_state`).
    pub fn state(&self) -> VResult<u32> {
        self.state_draining().map(|(s, _)| s)
    }

    /// Current state (`ibv_qp_state`) and whether the send queue is still draining (only
    /// meaningful in SQD: the HCA has not yet finished the WRs that were in flight).
    pub fn state_draining(&self) -> VResult<(u32, bool)> {
        // SAFETY: all-zero is valid for both attribute structs.
        let (mut a, mut i): (sys::ibv_qp_attr, sys::ibv_qp_init_attr) =
            unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
        // SAFETY: valid QP and out pointers.
        let rc =
            unsafe { (self.lib.query_qp)(self.qp, &mut a, QpMask::IBV_QP_STATE as i32, &mut i) };
        if rc != 0 {
            return Err(rc_err("ibv_query_qp", rc));
        }
        Ok((a.qp_state, a.sq_draining != 0))
    }

    /// Modifies the QP.
    pub fn modify(&self, h: &HostQpAttr) -> std::result::Result<(), i32> {
        // SAFETY: all-zero is a valid ibv_qp_attr.
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = h.state;
        a.path_mtu = h.path_mtu;
        a.qkey = h.qkey;
        a.rq_psn = h.rq_psn;
        a.sq_psn = h.sq_psn;
        a.dest_qp_num = h.dest_qp_num;
        a.qp_access_flags = h.access;
        a.pkey_index = h.pkey_index;
        a.max_rd_atomic = h.max_rd_atomic;
        a.max_dest_rd_atomic = h.max_dest_rd_atomic;
        a.min_rnr_timer = h.min_rnr_timer;
        a.port_num = h.port_num;
        a.timeout = h.timeout;
        a.retry_cnt = h.retry_cnt;
        a.rnr_retry = h.rnr_retry;
        if let Some(av) = h.av {
            a.ah_attr = av.to_sys();
        }
        // SAFETY: valid QP and attributes.
        let rc = unsafe { (self.lib.modify_qp)(self.qp, &mut a, h.mask as i32) };
        if rc != 0 {
            return Err(if rc > 0 { rc } else { libc::EINVAL });
        }
        Ok(())
    }

    /// Posts one send WR; returns the errno on failure.
    pub fn post_send(
        &self,
        wr_id: u64,
        sges: &mut [HostSge],
        op: &HostSend,
    ) -> std::result::Result<(), i32> {
        // SAFETY: all-zero is a valid ibv_send_wr (null pointers, integers, POD unions).
        let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = sges.as_mut_ptr();
        wr.num_sge = sges.len() as i32;
        wr.opcode = op.opcode;
        wr.send_flags = op.flags;
        wr.imm_data = op.imm;
        match op.opcode {
            ibv_wr_opcode::IBV_WR_ATOMIC_CMP_AND_SWP
            | ibv_wr_opcode::IBV_WR_ATOMIC_FETCH_AND_ADD => {
                wr.wr.atomic = sys::ibv_send_wr_atomic {
                    remote_addr: op.remote_addr,
                    compare_add: op.compare_add,
                    swap: op.swap,
                    rkey: op.rkey,
                };
            }
            _ if op.ud.is_some() => {
                let (ah, qpn, qkey) = op.ud.as_ref().expect("checked");
                wr.wr.ud = sys::ibv_send_wr_ud {
                    ah: ah.ah,
                    remote_qpn: *qpn,
                    remote_qkey: *qkey,
                };
            }
            _ => {
                wr.wr.rdma = sys::ibv_send_wr_rdma {
                    remote_addr: op.remote_addr,
                    rkey: op.rkey,
                };
            }
        }
        let mut bad = ptr::null_mut();
        // SAFETY: valid QP; the WR, SGEs and AH stay valid across the call (the provider copies
        // the WR; the AH is kept alive by the caller until the WR completes).
        let rc = unsafe { sys::ibv_post_send(self.qp, &mut wr, &mut bad) };
        if rc != 0 {
            return Err(rc);
        }
        Ok(())
    }

    /// Posts one receive WR; returns the errno on failure.
    pub fn post_recv(&self, wr_id: u64, sges: &mut [HostSge]) -> std::result::Result<(), i32> {
        let mut wr = sys::ibv_recv_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: sges.as_mut_ptr(),
            num_sge: sges.len() as i32,
        };
        let mut bad = ptr::null_mut();
        // SAFETY: valid QP; WR and SGEs live across the call.
        let rc = unsafe { sys::ibv_post_recv(self.qp, &mut wr, &mut bad) };
        if rc != 0 {
            return Err(rc);
        }
        Ok(())
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: valid QP, destroyed once.
        unsafe { (self.lib.destroy_qp)(self.qp) };
    }
}

/// Flags and constants the safe code needs.
pub mod consts {
    use super::sys;
    /// IBV_SEND_SIGNALED.
    pub const SEND_SIGNALED: u32 = sys::IBV_SEND_SIGNALED;
    /// IBV_SEND_SOLICITED.
    pub const SEND_SOLICITED: u32 = sys::IBV_SEND_SOLICITED;
    /// RoCE v1 GID type.
    pub const GID_ROCE_V1: u32 = sys::IBV_GID_TYPE_ROCE_V1;
    /// RoCE v2 GID type.
    pub const GID_ROCE_V2: u32 = sys::IBV_GID_TYPE_ROCE_V2;
}
