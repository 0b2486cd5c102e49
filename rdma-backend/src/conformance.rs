//! A backend-agnostic conformance suite.
//!
//! Every case is a function taking a [`Factory`] that creates one device per call; all devices
//! made by one factory must reach each other by GID (the emulated backend: one [`Fabric`] shared
//! by the factory; rdma-core: the host's RDMA devices). Each device gets its own 64 MiB guest
//! memory (a shared memfd mapping, as vfio-user guest RAM is), a GID `fe80::1:<n>` at index 0, a
//! PD and a CQ. Cases panic on failure.
//!
//! [`Fabric`]: crate::emulated::Fabric

use std::collections::HashSet;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryMmap};

use crate::{
    Access, AddressVector, AsyncEvent, Backend, CompletionSink, CqId, Error, FastReg, Gid, GidType,
    GuestMem, MrKeys, MrKind, PdId, ProgressThread, QpAttrs, QpId, QpInit, QpState, QpType, RecvWr,
    SendOp, SendWr, Sge, SgeList, SrqId, UdDest, WcOpcode, WcStatus, WorkCompletion,
};

/// Creates one device over `mem` delivering to the sink. Devices of one factory share a fabric.
pub type Factory<'a> = dyn Fn(GuestMem, Arc<dyn CompletionSink>) -> Arc<dyn Backend> + 'a;

/// Guest memory of each device.
pub const MEM_SIZE: usize = 64 << 20;
/// How long a case waits for an expected completion.
pub const WAIT: Duration = Duration::from_secs(10);
/// Qkey of the UD QPs the cases create.
pub const QKEY: u32 = 0x1234_5678;
/// Qkey of the GSI QP.
pub const GSI_QKEY: u32 = 0x8001_0000;

/// A sink that records completions and events, and resumes its backend's deferred work on a
/// thread of its own.
#[derive(Debug)]
pub struct TestSink {
    wcs: Mutex<Vec<WorkCompletion>>,
    events: Mutex<Vec<AsyncEvent>>,
    cv: Condvar,
    progress: ProgressThread,
}

impl Default for TestSink {
    fn default() -> Self {
        TestSink {
            wcs: Mutex::default(),
            events: Mutex::default(),
            cv: Condvar::new(),
            progress: ProgressThread::new("test-progress").expect("spawn a progress thread"),
        }
    }
}

impl CompletionSink for TestSink {
    fn complete(&self, wcs: &[WorkCompletion]) {
        self.wcs.lock().unwrap().extend_from_slice(wcs);
        self.cv.notify_all();
    }
    fn event(&self, ev: AsyncEvent) {
        self.events.lock().unwrap().push(ev);
        self.cv.notify_all();
    }
    fn progress_needed(&self) {
        self.progress.notify();
    }
}

impl TestSink {
    /// The backend this sink's deferred work belongs to.
    pub fn attach(&self, be: &Arc<dyn Backend>) {
        self.progress.attach(be);
    }
    /// Waits up to `timeout` for `n` completions and takes the first `n` (panics on timeout).
    pub fn wait(&self, n: usize, timeout: Duration) -> Vec<WorkCompletion> {
        let deadline = Instant::now() + timeout;
        let mut g = self.wcs.lock().unwrap();
        while g.len() < n {
            let now = Instant::now();
            assert!(
                now < deadline,
                "timed out waiting for {n} completions, got {:?}",
                *g
            );
            g = self.cv.wait_timeout(g, deadline - now).unwrap().0;
        }
        g.drain(..n).collect()
    }
    /// Takes every completion recorded so far.
    pub fn take(&self) -> Vec<WorkCompletion> {
        std::mem::take(&mut *self.wcs.lock().unwrap())
    }
    /// Number of completions recorded and not taken.
    pub fn len(&self) -> usize {
        self.wcs.lock().unwrap().len()
    }
    /// Whether no completion is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The events so far.
    pub fn events(&self) -> Vec<AsyncEvent> {
        self.events.lock().unwrap().clone()
    }
    /// Waits until an event matching `f` was recorded.
    pub fn wait_event(&self, f: impl Fn(&AsyncEvent) -> bool) {
        let deadline = Instant::now() + WAIT;
        let mut g = self.events.lock().unwrap();
        while !g.iter().any(&f) {
            let now = Instant::now();
            assert!(
                now < deadline,
                "timed out waiting for an event, got {:?}",
                *g
            );
            g = self.cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }
}

/// A deterministic PRNG (xorshift64*).
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Fills a buffer.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// A user MR over guest pages, as a guest process sees it.
#[derive(Debug, Clone)]
pub struct Buf {
    /// Start (user virtual) address.
    pub iova: u64,
    /// Length.
    pub len: u64,
    /// Guest-physical pages.
    pub pages: Arc<[GuestAddress]>,
    /// Keys.
    pub keys: MrKeys,
}

impl Buf {
    fn gpa(&self, a: u64) -> u64 {
        let i = ((a - (self.iova & !0xfff)) >> 12) as usize;
        self.pages[i].0 + (a & 0xfff)
    }
    fn for_chunks(&self, off: u64, len: u64, mut f: impl FnMut(u64, usize, usize)) {
        assert!(off + len <= self.len);
        let mut done = 0u64;
        while done < len {
            let a = self.iova + off + done;
            let n = (0x1000 - (a & 0xfff)).min(len - done);
            f(self.gpa(a), done as usize, n as usize);
            done += n;
        }
    }
    /// Writes `data` at offset `off`.
    pub fn write(&self, mem: &GuestMem, off: u64, data: &[u8]) {
        let m = mem.memory();
        self.for_chunks(off, data.len() as u64, |gpa, at, n| {
            m.write_slice(&data[at..at + n], GuestAddress(gpa)).unwrap()
        });
    }
    /// Reads `len` bytes at offset `off`.
    pub fn read(&self, mem: &GuestMem, off: u64, len: u64) -> Vec<u8> {
        let m = mem.memory();
        let mut v = vec![0u8; len as usize];
        self.for_chunks(off, len, |gpa, at, n| {
            m.read_slice(&mut v[at..at + n], GuestAddress(gpa)).unwrap()
        });
        v
    }
    /// One SGE for `[off, off + len)`.
    pub fn sge(&self, off: u64, len: u32) -> Sge {
        Sge {
            addr: self.iova + off,
            length: len,
            lkey: self.keys.lkey,
        }
    }
    /// `[off, off + len)` split into up to `parts` SGEs of uneven sizes.
    pub fn sges(&self, off: u64, len: u64, parts: usize) -> SgeList {
        let mut l = SgeList::new();
        if len == 0 {
            return l;
        }
        let parts = parts.clamp(1, len as usize);
        let mut at = 0u64;
        for i in 0..parts {
            let n = if i + 1 == parts {
                len - at
            } else {
                (len / parts as u64 / 2 + i as u64 * 7).min(len - at)
            };
            l.push(self.sge(off + at, n as u32));
            at += n;
        }
        l
    }
}

/// Options of an RC connection.
#[derive(Debug, Clone, Copy)]
pub struct RcOpts {
    /// Remote rights granted by the QP.
    pub access: Access,
    /// RNR retries (7 = infinite).
    pub rnr_retry: u8,
    /// RNR timer of the responder (IB encoding).
    pub min_rnr_timer: u8,
}

impl Default for RcOpts {
    fn default() -> Self {
        RcOpts {
            access: Access::REMOTE_WRITE | Access::REMOTE_READ | Access::REMOTE_ATOMIC,
            rnr_retry: 7,
            min_rnr_timer: 1,
        }
    }
}

/// [`MEM_SIZE`] of guest RAM in a memfd, mapped shared, as vfio-user guest RAM is (QEMU's
/// `memory-backend-memfd` passed in DMA_MAP): a backend may map its pages a second time.
pub fn guest_memory() -> GuestMem {
    let file = crate::shm::memfd(c"pvrdma-conformance", MEM_SIZE as u64).expect("memfd");
    let ranges = [(GuestAddress(0), MEM_SIZE, Some(FileOffset::new(file, 0)))];
    GuestMem::new(GuestMemoryMmap::from_ranges_with_files(&ranges).expect("guest memory"))
}

/// The GID device `n` of the suite binds at index 0: `fe80::1:<n>`.
pub fn device_gid(n: u8) -> Gid {
    let mut g = [0u8; 16];
    g[0] = 0xfe;
    g[1] = 0x80;
    g[13] = 1;
    g[15] = n;
    Gid(g)
}

/// One device with its memory, sink, PD and CQ.
pub struct Dev {
    /// The backend.
    pub be: Arc<dyn Backend>,
    /// Its completions.
    pub sink: Arc<TestSink>,
    /// Its guest memory.
    pub mem: GuestMem,
    /// GID at index 0.
    pub gid: Gid,
    /// A PD.
    pub pd: PdId,
    /// A CQ used by every QP the helpers create.
    pub cq: CqId,
    next_page: AtomicU64,
    next_iova: AtomicU64,
    rng: Mutex<Rng>,
}

impl std::fmt::Debug for Dev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dev")
            .field("gid", &self.gid)
            .finish_non_exhaustive()
    }
}

impl Dev {
    /// Device number `n` from the factory.
    pub fn new(f: &Factory<'_>, n: u8) -> Dev {
        let mem = guest_memory();
        let sink = Arc::new(TestSink::default());
        let be = f(mem.clone(), sink.clone());
        sink.attach(&be);
        let gid = device_gid(n);
        be.add_gid(0, gid, GidType::RoceV2).unwrap();
        let pd = be.create_pd().unwrap();
        let cq = be.create_cq(4096, u64::from(n)).unwrap();
        Dev {
            be,
            sink,
            mem,
            gid,
            pd,
            cq,
            next_page: AtomicU64::new(1 << 20),
            next_iova: AtomicU64::new(0x7f00_0000_0000),
            rng: Mutex::new(Rng::new(0x9e37_79b9 + u64::from(n))),
        }
    }

    /// Random bytes.
    pub fn random(&self, n: usize) -> Vec<u8> {
        self.rng.lock().unwrap().bytes(n)
    }

    /// `n` guest pages in shuffled order.
    pub fn pages(&self, n: usize, shuffle: bool) -> Vec<GuestAddress> {
        let start = self.next_page.fetch_add(n as u64 * 4096, Ordering::Relaxed);
        assert!(
            start + n as u64 * 4096 <= MEM_SIZE as u64,
            "test guest memory exhausted"
        );
        let mut v: Vec<GuestAddress> = (0..n as u64)
            .map(|i| GuestAddress(start + i * 4096))
            .collect();
        if shuffle {
            let mut r = self.rng.lock().unwrap();
            for i in (1..v.len()).rev() {
                let j = (r.next_u64() % (i as u64 + 1)) as usize;
                v.swap(i, j);
            }
        }
        v
    }

    /// A user MR of `len` bytes on shuffled pages, starting at a page offset of 0x123.
    pub fn buf(&self, len: u64, access: Access) -> Buf {
        self.buf_in(self.pd, len, access, true)
    }

    /// A user MR in `pd`.
    pub fn buf_in(&self, pd: PdId, len: u64, access: Access, shuffle: bool) -> Buf {
        let iova = self.next_iova.fetch_add(1 << 32, Ordering::Relaxed) + 0x123;
        let npages = ((iova + len.max(1)).div_ceil(4096) - iova / 4096) as usize;
        let pages: Arc<[GuestAddress]> = self.pages(npages, shuffle).into();
        let keys = self
            .be
            .create_mr(
                pd,
                MrKind::User {
                    iova,
                    length: len,
                    pages: pages.clone(),
                },
                access,
            )
            .unwrap();
        Buf {
            iova,
            len,
            pages,
            keys,
        }
    }

    /// A QP of `ty` on this device's PD and CQ.
    pub fn qp(&self, ty: QpType, srq: Option<SrqId>) -> (QpId, u32) {
        self.be
            .create_qp(&QpInit {
                qp_type: ty,
                pd: self.pd,
                send_cq: self.cq,
                recv_cq: self.cq,
                srq,
                max_send_wr: 256,
                max_recv_wr: 256,
                max_send_sge: 16,
                max_recv_sge: 16,
                sq_sig_all: false,
                cookie: 0x1000,
            })
            .unwrap()
    }

    /// Moves `qp` through INIT, RTR and RTS towards `(dgid, dqpn)`.
    pub fn connect(&self, qp: QpId, dgid: Gid, dqpn: u32, o: RcOpts) {
        let m = |a: QpAttrs| self.be.modify_qp(qp, &a).unwrap();
        m(QpAttrs {
            state: Some(QpState::Init),
            pkey_index: Some(0),
            port_num: Some(1),
            access: Some(o.access | Access::LOCAL_WRITE),
            ..Default::default()
        });
        m(QpAttrs {
            state: Some(QpState::Rtr),
            path_mtu: Some(3),
            dest_qp_num: Some(dqpn),
            rq_psn: Some(0),
            max_dest_rd_atomic: Some(16),
            min_rnr_timer: Some(o.min_rnr_timer),
            ah: Some(AddressVector {
                dgid,
                hop_limit: 64,
                ..Default::default()
            }),
            ..Default::default()
        });
        m(QpAttrs {
            state: Some(QpState::Rts),
            sq_psn: Some(0),
            timeout: Some(10),
            retry_cnt: Some(7),
            rnr_retry: Some(o.rnr_retry),
            max_rd_atomic: Some(16),
            ..Default::default()
        });
    }

    /// Moves a UD/GSI QP to RTS with `qkey`.
    pub fn ud_up(&self, qp: QpId, qkey: u32) {
        for (s, q) in [
            (QpState::Init, Some(qkey)),
            (QpState::Rtr, None),
            (QpState::Rts, None),
        ] {
            self.be
                .modify_qp(
                    qp,
                    &QpAttrs {
                        state: Some(s),
                        qkey: q,
                        pkey_index: Some(0),
                        port_num: Some(1),
                        sq_psn: Some(0),
                        ..Default::default()
                    },
                )
                .unwrap();
        }
    }

    /// Waits for `n` completions.
    pub fn wait(&self, n: usize) -> Vec<WorkCompletion> {
        self.sink.wait(n, WAIT)
    }

    /// Posts a receive.
    pub fn recv(&self, qp: QpId, wr_id: u64, sges: SgeList) {
        self.be.post_recv(qp, &RecvWr { wr_id, sges }).unwrap();
    }

    /// Posts a signaled send WR.
    pub fn send(&self, qp: QpId, wr_id: u64, op: SendOp, sges: SgeList) {
        self.be.post_send(qp, &wr(wr_id, op, sges)).unwrap();
    }

    /// Asserts that no completion arrives within `d`.
    pub fn quiet(&self, d: Duration) {
        thread::sleep(d);
        assert!(
            self.sink.is_empty(),
            "unexpected completions {:?}",
            self.sink.take()
        );
    }
}

/// A signaled send WR.
pub fn wr(wr_id: u64, op: SendOp, sges: SgeList) -> SendWr {
    SendWr {
        wr_id,
        op,
        sges,
        signaled: true,
        solicited: false,
        ud: None,
    }
}

/// `Send` without immediate.
pub const SEND: SendOp = SendOp::Send { imm: None };

fn find(wcs: &[WorkCompletion], wr_id: u64) -> WorkCompletion {
    *wcs.iter()
        .find(|w| w.wr_id == wr_id)
        .unwrap_or_else(|| panic!("no completion for wr_id {wr_id:#x} in {wcs:?}"))
}

const ALL: Access = Access::LOCAL_WRITE
    .union(Access::REMOTE_WRITE)
    .union(Access::REMOTE_READ)
    .union(Access::REMOTE_ATOMIC);

/// Two connected RC QPs `a → b` (`b` may be the same device).
pub fn rc_pair(a: &Dev, b: &Dev, o: RcOpts) -> (QpId, QpId, u32, u32) {
    let (qa, na) = a.qp(QpType::Rc, None);
    let (qb, nb) = b.qp(QpType::Rc, None);
    a.connect(qa, b.gid, nb, o);
    b.connect(qb, a.gid, na, o);
    (qa, qb, na, nb)
}

/// RC ping-pong between two QPs of one device (loopback).
pub fn rc_ping_pong(f: &Factory<'_>) {
    let d = Dev::new(f, 1);
    ping_pong(&d, &d, 100);
}

fn ping_pong(a: &Dev, b: &Dev, rounds: u64) {
    let (qa, qb, na, nb) = rc_pair(a, b, RcOpts::default());
    let ba = a.buf(8192, ALL);
    let bb = b.buf(8192, ALL);
    for i in 0..rounds {
        let ping = format!("ping {i}").into_bytes();
        ba.write(&a.mem, 0, &ping);
        b.recv(qb, 100 + i, [bb.sge(4096, 4096)].into_iter().collect());
        a.send(
            qa,
            i,
            SEND,
            [ba.sge(0, ping.len() as u32)].into_iter().collect(),
        );
        let mut wcs = b.wait(1);
        wcs.extend(a.wait(1));
        let r = find(&wcs, 100 + i);
        assert_eq!(
            (r.status, r.opcode, r.byte_len, r.src_qp),
            (WcStatus::Success, WcOpcode::Recv, ping.len() as u32, na)
        );
        let s = find(&wcs, i);
        assert_eq!((s.status, s.opcode), (WcStatus::Success, WcOpcode::Send));
        assert_eq!(bb.read(&b.mem, 4096, ping.len() as u64), ping);
        let pong = format!("pong {i}").into_bytes();
        bb.write(&b.mem, 0, &pong);
        a.recv(qa, 200 + i, [ba.sge(4096, 4096)].into_iter().collect());
        b.send(
            qb,
            300 + i,
            SEND,
            [bb.sge(0, pong.len() as u32)].into_iter().collect(),
        );
        let mut wcs = a.wait(1);
        wcs.extend(b.wait(1));
        let r = find(&wcs, 200 + i);
        assert_eq!(
            (r.status, r.byte_len, r.src_qp),
            (WcStatus::Success, pong.len() as u32, nb)
        );
        assert_eq!(ba.read(&a.mem, 4096, pong.len() as u64), pong);
    }
}

/// Sizes every data-path case runs.
pub const SIZES: [u64; 6] = [0, 1, 4095, 4096, 4097, 1 << 20];

/// SEND, SEND_WITH_IMM, RDMA WRITE, WRITE_WITH_IMM and READ of every size in [`SIZES`], over
/// shuffled pages and several SGEs, data checked byte for byte.
pub fn rc_opcodes(f: &Factory<'_>) {
    let d = Dev::new(f, 1);
    let (qa, qb, na, _) = rc_pair(&d, &d, RcOpts::default());
    for (k, &len) in SIZES.iter().enumerate() {
        let k = k as u64 * 100;
        let src = d.buf(len + 64, ALL);
        let dst = d.buf(len + 64, ALL);
        let data = d.random(len as usize);
        src.write(&d.mem, 3, &data);
        // SEND with immediate, 3 source SGEs, 3 target SGEs (with room to spare).
        d.recv(qb, k + 1, dst.sges(0, len + 64, 3));
        d.send(
            qa,
            k + 2,
            SendOp::Send {
                imm: Some(0xdead_beef),
            },
            src.sges(3, len, 3),
        );
        let wcs = d.wait(2);
        let r = find(&wcs, k + 1);
        assert_eq!(
            (r.status, r.opcode, r.byte_len, r.imm_data, r.src_qp),
            (
                WcStatus::Success,
                WcOpcode::Recv,
                len as u32,
                Some(0xdead_beef),
                na
            )
        );
        let s = find(&wcs, k + 2);
        assert_eq!((s.status, s.opcode), (WcStatus::Success, WcOpcode::Send));
        assert!(dst.read(&d.mem, 0, len) == data, "SEND data, len {len}");
        // RDMA WRITE into the middle of the target.
        let data = d.random(len as usize);
        src.write(&d.mem, 0, &data);
        let op = SendOp::RdmaWrite {
            remote_addr: dst.iova + 5,
            rkey: dst.keys.rkey,
            imm: None,
        };
        d.send(qa, k + 3, op, src.sges(0, len, 4));
        let s = d.wait(1)[0];
        assert_eq!(
            (s.wr_id, s.status, s.opcode),
            (k + 3, WcStatus::Success, WcOpcode::RdmaWrite)
        );
        assert!(dst.read(&d.mem, 5, len) == data, "WRITE data, len {len}");
        // RDMA WRITE with immediate consumes a receive.
        let data = d.random(len as usize);
        src.write(&d.mem, 0, &data);
        d.recv(qb, k + 4, SgeList::new());
        let op = SendOp::RdmaWrite {
            remote_addr: dst.iova,
            rkey: dst.keys.rkey,
            imm: Some(7),
        };
        d.send(qa, k + 5, op, src.sges(0, len, 1));
        let wcs = d.wait(2);
        let r = find(&wcs, k + 4);
        assert_eq!(
            (r.status, r.opcode, r.byte_len, r.imm_data),
            (
                WcStatus::Success,
                WcOpcode::RecvRdmaWithImm,
                len as u32,
                Some(7)
            )
        );
        assert_eq!(find(&wcs, k + 5).status, WcStatus::Success);
        assert!(
            dst.read(&d.mem, 0, len) == data,
            "WRITE_WITH_IMM data, len {len}"
        );
        // RDMA READ back into three local SGEs.
        let back = d.buf(len + 64, ALL);
        let op = SendOp::RdmaRead {
            remote_addr: dst.iova,
            rkey: dst.keys.rkey,
        };
        d.send(qa, k + 6, op, back.sges(1, len, 3));
        let s = d.wait(1)[0];
        assert_eq!(
            (s.wr_id, s.status, s.opcode, s.byte_len),
            (k + 6, WcStatus::Success, WcOpcode::RdmaRead, len as u32)
        );
        assert!(back.read(&d.mem, 1, len) == data, "READ data, len {len}");
    }
}

/// A 16 MiB RDMA WRITE and SEND between two devices.
pub fn rc_16mib(f: &Factory<'_>) {
    let a = Dev::new(f, 1);
    let b = Dev::new(f, 2);
    let (qa, qb, _, _) = rc_pair(&a, &b, RcOpts::default());
    let len = 16u64 << 20;
    let src = a.buf(len, ALL);
    let dst = b.buf(len, ALL);
    let data = a.random(len as usize);
    src.write(&a.mem, 0, &data);
    let op = SendOp::RdmaWrite {
        remote_addr: dst.iova,
        rkey: dst.keys.rkey,
        imm: None,
    };
    a.send(qa, 1, op, src.sges(0, len, 2));
    assert_eq!(a.wait(1)[0].status, WcStatus::Success);
    assert!(dst.read(&b.mem, 0, len) == data, "16 MiB WRITE data");
    let data: Vec<u8> = data.iter().map(|x| x ^ 0x5a).collect();
    src.write(&a.mem, 0, &data);
    b.recv(qb, 2, dst.sges(0, len, 1));
    a.send(qa, 3, SEND, src.sges(0, len, 1));
    assert_eq!(a.wait(1)[0].status, WcStatus::Success);
    let r = b.wait(1)[0];
    assert_eq!((r.status, r.byte_len), (WcStatus::Success, len as u32));
    assert!(dst.read(&b.mem, 0, len) == data, "16 MiB SEND data");
}

/// A WRITE whose 16 SGEs of 4 GiB − 1 each (over an MR that lists one guest page a million
/// times) add up to 64 GiB, aimed at a remote MR of one page: the requester completes in error
/// (the responder's length check, or the backend declining to buffer it) within seconds, nothing
/// of that size is allocated, and the devices go on working.
pub fn oversized_sge_total(f: &Factory<'_>) {
    let a = Dev::new(f, 1);
    let b = Dev::new(f, 2);
    let (qa, qb, _, _) = rc_pair(&a, &b, RcOpts::default());
    let page = a.pages(1, false)[0];
    let mr_len: u64 = 1 << 32;
    let pages: Arc<[GuestAddress]> = vec![page; (mr_len / 4096) as usize].into();
    let iova = 0x60_0000_0000;
    let mr =
        a.be.create_mr(
            a.pd,
            MrKind::User {
                iova,
                length: mr_len,
                pages,
            },
            Access::LOCAL_WRITE,
        )
        .unwrap();
    let sges: SgeList = (0..16)
        .map(|_| Sge {
            addr: iova,
            length: u32::MAX,
            lkey: mr.lkey,
        })
        .collect();
    let dst = b.buf(4096, ALL);
    let op = SendOp::RdmaWrite {
        remote_addr: dst.iova,
        rkey: dst.keys.rkey,
        imm: None,
    };
    let t = Instant::now();
    a.send(qa, 1, op, sges);
    let w = a.wait(1);
    assert_ne!(w[0].status, WcStatus::Success, "{w:?}");
    assert!(t.elapsed() < WAIT, "took {:?}", t.elapsed());
    assert!(dst.read(&b.mem, 0, 4096).iter().all(|&x| x == 0));
    let _ = qb;
    // A fresh pair on the same devices works.
    let (qc, qd, _, _) = rc_pair(&a, &b, RcOpts::default());
    let src = a.buf(4096, ALL);
    src.write(&a.mem, 0, &[0x42; 64]);
    b.recv(qd, 2, dst.sges(0, 64, 1));
    a.send(qc, 3, SEND, src.sges(0, 64, 1));
    assert_eq!(a.wait(1)[0].status, WcStatus::Success);
    assert_eq!(b.wait(1)[0].status, WcStatus::Success);
}

/// Compare-and-swap and fetch-and-add results.
pub fn rc_atomics(f: &Factory<'_>) {
    let d = Dev::new(f, 1);
    let (qa, _, _, _) = rc_pair(&d, &d, RcOpts::default());
    let target = d.buf(64, ALL);
    let res = d.buf(64, ALL);
    let t = target.iova.next_multiple_of(8);
    let toff = t - target.iova;
    target.write(&d.mem, toff, &5u64.to_ne_bytes());
    let rd = |off| u64::from_ne_bytes(res.read(&d.mem, off, 8).try_into().unwrap());
    let rk = target.keys.rkey;
    let ops = [
        (
            SendOp::CmpSwap {
                remote_addr: t,
                rkey: rk,
                compare: 5,
                swap: 9,
            },
            5,
            9,
        ),
        (
            SendOp::CmpSwap {
                remote_addr: t,
                rkey: rk,
                compare: 5,
                swap: 1,
            },
            9,
            9,
        ),
        (
            SendOp::FetchAdd {
                remote_addr: t,
                rkey: rk,
                add: 3,
            },
            9,
            12,
        ),
        (
            SendOp::FetchAdd {
                remote_addr: t,
                rkey: rk,
                add: u64::MAX,
            },
            12,
            11,
        ),
    ];
    for (i, (op, orig, now)) in ops.into_iter().enumerate() {
        let opc = if matches!(op, SendOp::CmpSwap { .. }) {
            WcOpcode::CompSwap
        } else {
            WcOpcode::FetchAdd
        };
        d.send(qa, i as u64, op, [res.sge(8, 8)].into_iter().collect());
        let s = d.wait(1)[0];
        assert_eq!((s.status, s.opcode), (WcStatus::Success, opc));
        assert_eq!(rd(8), orig, "original value of op {i}");
        let cur = u64::from_ne_bytes(target.read(&d.mem, toff, 8).try_into().unwrap());
        assert_eq!(cur, now, "value after op {i}");
    }
}

/// Fetch-and-add from 4 QPs on 4 threads at once: every original value is seen exactly once.
pub fn atomics_concurrent(f: &Factory<'_>) {
    const THREADS: u64 = 4;
    const OPS: u64 = 500;
    let a = Dev::new(f, 1);
    let b = Dev::new(f, 2);
    let target = b.buf(64, ALL);
    let t = target.iova.next_multiple_of(8);
    let toff = t - target.iova;
    let qps: Vec<_> = (0..THREADS)
        .map(|_| rc_pair(&a, &b, RcOpts::default()).0)
        .collect();
    let bufs: Vec<_> = (0..THREADS).map(|_| a.buf(OPS * 8, ALL)).collect();
    thread::scope(|s| {
        for (qp, buf) in qps.iter().zip(&bufs) {
            let a = &a;
            let rkey = target.keys.rkey;
            s.spawn(move || {
                for i in 0..OPS {
                    let op = SendOp::FetchAdd {
                        remote_addr: t,
                        rkey,
                        add: 1,
                    };
                    a.send(*qp, i, op, [buf.sge(i * 8, 8)].into_iter().collect());
                }
            });
        }
    });
    let wcs = a.wait((THREADS * OPS) as usize);
    assert!(wcs.iter().all(|w| w.status == WcStatus::Success));
    let cur = u64::from_ne_bytes(target.read(&b.mem, toff, 8).try_into().unwrap());
    assert_eq!(cur, THREADS * OPS);
    let mut seen = HashSet::new();
    for buf in &bufs {
        let v = buf.read(&a.mem, 0, OPS * 8);
        for c in v.chunks(8) {
            assert!(seen.insert(u64::from_ne_bytes(c.try_into().unwrap())));
        }
    }
    assert_eq!(seen.len() as u64, THREADS * OPS);
}

#[allow(clippy::too_many_arguments)]
fn ud_send(
    d: &Dev,
    qp: QpId,
    wr_id: u64,
    dgid: Gid,
    qpn: u32,
    qkey: u32,
    imm: Option<u32>,
    sges: SgeList,
) {
    let w = SendWr {
        ud: Some(UdDest {
            av: AddressVector {
                dgid,
                sgid_index: 0,
                hop_limit: 64,
                traffic_class: 0x12,
                flow_label: 0x3_4567,
                ..Default::default()
            },
            remote_qpn: qpn,
            remote_qkey: qkey,
        }),
        ..wr(wr_id, SendOp::Send { imm }, sges)
    };
    d.be.post_send(qp, &w).unwrap();
}

/// IPv6 next-header value of UDP: a RoCE v2 packet's IPv6 header.
const NEXT_HEADER_UDP: u8 = 17;
/// Next-header value of an IB GRH followed by the IBA transport headers.
const NEXT_HEADER_IBA: u8 = 0x1b;

/// Checks the 40 bytes a UD receive gets before a `len`-byte payload sent by [`ud_send`]
/// (traffic class 0x12, flow label 0x34567, hop limit 64). The suite's GIDs are RoCE v2 GIDs, and
/// the slot holds one of two forms, each checked in full:
/// - an IB GRH (the emulated fabric writes one): next header 0x1b, the AV's flow label, payload
///   length = the message length;
/// - the IPv6 header as received (RoCE v2 carries IB over UDP/IPv6; rxe and HCAs hand the
///   received IPv6 header to the receive buffer): next header UDP, payload length = the UDP
///   datagram: UDP header (8), BTH (12), DETH (8), ImmDt (4, with immediate data), the payload
///   padded to 4 bytes, ICRC (4). The IPv6 flow label is the sender's choice: the AV's, or 0
///   (rxe leaves it 0).
fn check_grh(g: &[u8], len: usize, imm: bool, sgid: Gid, dgid: Gid) {
    assert_eq!(g[0] >> 4, 6, "IP version");
    assert_eq!(((g[0] & 0xf) << 4) | (g[1] >> 4), 0x12, "traffic class");
    let flow = u32::from_be_bytes([0, g[1] & 0xf, g[2], g[3]]);
    let paylen = usize::from(u16::from_be_bytes([g[4], g[5]]));
    match g[6] {
        NEXT_HEADER_IBA => {
            assert_eq!(flow, 0x3_4567, "flow label");
            assert_eq!(paylen, len, "payload length");
        }
        NEXT_HEADER_UDP => {
            assert!(flow == 0x3_4567 || flow == 0, "flow label {flow:#x}");
            let udp = 8 + 12 + 8 + if imm { 4 } else { 0 } + len.next_multiple_of(4) + 4;
            assert_eq!(paylen, udp, "payload length (UDP datagram)");
        }
        other => panic!("next header {other:#x}"),
    }
    assert_eq!(g[7], 64, "hop limit");
    assert_eq!(&g[8..24], &sgid.0, "sgid");
    assert_eq!(&g[24..40], &dgid.0, "dgid");
}

/// Two UD QPs of `d` in RTS with Q_Key [`QKEY`]: (a, its QPN, b, its QPN).
fn ud_pair(d: &Dev) -> (QpId, u32, QpId, u32) {
    let (qa, na) = d.qp(QpType::Ud, None);
    let (qb, nb) = d.qp(QpType::Ud, None);
    d.ud_up(qa, QKEY);
    d.ud_up(qb, QKEY);
    (qa, na, qb, nb)
}

/// UD SEND (loopback) with the GRH and immediate data checked.
pub fn ud_send_grh(f: &Factory<'_>) {
    let d = Dev::new(f, 1);
    let (qa, na, qb, nb) = ud_pair(&d);
    let src = d.buf(1024, ALL);
    let dst = d.buf(2048, ALL);
    for (i, len) in [0usize, 1, 1000, 1024].into_iter().enumerate() {
        let i = i as u64 * 10;
        let data = d.random(len);
        src.write(&d.mem, 0, &data);
        d.recv(qb, i + 1, dst.sges(0, 2048, 2));
        ud_send(
            &d,
            qa,
            i + 2,
            d.gid,
            nb,
            QKEY,
            Some(42),
            src.sges(0, len as u64, 2),
        );
        let wcs = d.wait(2);
        let r = find(&wcs, i + 1);
        assert_eq!(
            (
                r.status,
                r.opcode,
                r.byte_len,
                r.src_qp,
                r.grh.is_some(),
                r.imm_data
            ),
            (
                WcStatus::Success,
                WcOpcode::Recv,
                40 + len as u32,
                na,
                true,
                Some(42)
            )
        );
        assert_eq!(find(&wcs, i + 2).status, WcStatus::Success);
        check_grh(&dst.read(&d.mem, 0, 40), len, true, d.gid, d.gid);
        assert!(dst.read(&d.mem, 40, len as u64) == data);
    }
}

/// UD SENDs through 300 distinct address vectors (flow labels and traffic classes of the
/// guest's choosing): each arrives, however many the backend has seen (an rdma-core backend
/// creates a host address handle per vector and keeps a bounded cache of them).
pub fn ud_many_address_vectors(f: &Factory<'_>) {
    let d = Dev::new(f, 1);
    let (qa, na, qb, nb) = ud_pair(&d);
    let src = d.buf(64, ALL);
    let dst = d.buf(128, ALL);
    for i in 0..300u32 {
        d.recv(qb, u64::from(i) * 2 + 1, dst.sges(0, 128, 1));
        let w = SendWr {
            ud: Some(UdDest {
                av: AddressVector {
                    dgid: d.gid,
                    hop_limit: 64,
                    traffic_class: (i % 64) as u8,
                    flow_label: 0x1000 + i,
                    ..Default::default()
                },
                remote_qpn: nb,
                remote_qkey: QKEY,
            }),
            ..wr(u64::from(i) * 2 + 2, SEND, src.sges(0, 32, 1))
        };
        d.be.post_send(qa, &w).unwrap();
        let wcs = d.wait(2);
        let r = find(&wcs, u64::from(i) * 2 + 1);
        assert_eq!(
            (r.status, r.byte_len, r.src_qp),
            (WcStatus::Success, 72, na),
            "AV {i}"
        );
        assert_eq!(find(&wcs, u64::from(i) * 2 + 2).status, WcStatus::Success);
    }
}

/// UD length errors: a receive too small for GRH + payload completes with `LocLenErr` (the send
/// succeeds); a send larger than the path MTU completes with `LocLenErr` and the QP goes to SQE.
pub fn ud_length_errors(f: &Factory<'_>) {
    let d = Dev::new(f, 1);
    let (qa, _, qb, nb) = ud_pair(&d);
    let src = d.buf(1024, ALL);
    let dst = d.buf(2048, ALL);
    // A receive too small for GRH + payload completes with LocLenErr; the send succeeds.
    d.recv(qb, 101, dst.sges(0, 40 + 9, 1));
    ud_send(&d, qa, 102, d.gid, nb, QKEY, None, src.sges(0, 10, 1));
    let wcs = d.wait(2);
    assert_eq!(find(&wcs, 101).status, WcStatus::LocLenErr);
    assert_eq!(find(&wcs, 102).status, WcStatus::Success);
    // Larger than the path MTU (default 1024): local length error, the QP goes to SQE.
    ud_send(&d, qa, 99, d.gid, nb, QKEY, None, src.sges(0, 1024, 1));
    assert_eq!(d.wait(1)[0].status, WcStatus::Success);
    let big = d.buf(1025, ALL);
    ud_send(&d, qa, 100, d.gid, nb, QKEY, None, big.sges(0, 1025, 1));
    let s = d.wait(1)[0];
    assert_eq!((s.wr_id, s.status), (100, WcStatus::LocLenErr));
    assert_eq!(d.be.query_qp_state(qa).unwrap(), QpState::Sqe);
    d.be.modify_qp(
        qa,
        &QpAttrs {
            state: Some(QpState::Rts),
            ..Default::default()
        },
    )
    .unwrap();
}

/// The GSI QP is QP 1; a WR qkey with bit 31 set means the sending QP's own qkey.
pub fn gsi_send(f: &Factory<'_>) {
    let d = Dev::new(f, 1);
    let (q1, n1) = d.qp(QpType::Gsi, None);
    assert_eq!(n1, 1);
    d.ud_up(q1, GSI_QKEY);
    let buf = d.buf(4096, ALL);
    let data = d.random(256);
    buf.write(&d.mem, 0, &data);
    d.recv(q1, 1, buf.sges(1024, 40 + 256, 1));
    ud_send(&d, q1, 2, d.gid, 1, 0x8000_0000, None, buf.sges(0, 256, 1));
    let wcs = d.wait(2);
    let r = find(&wcs, 1);
    assert_eq!(
        (r.status, r.byte_len, r.src_qp, r.grh.is_some()),
        (WcStatus::Success, 296, 1, true)
    );
    check_grh(&buf.read(&d.mem, 1024, 40), 256, false, d.gid, d.gid);
    assert!(buf.read(&d.mem, 1064, 256) == data);
    // A second GSI QP is refused.
    assert!(d
        .be
        .create_qp(&QpInit {
            qp_type: QpType::Gsi,
            pd: d.pd,
            send_cq: d.cq,
            recv_cq: d.cq,
            srq: None,
            max_send_wr: 1,
            max_recv_wr: 1,
            max_send_sge: 1,
            max_recv_sge: 1,
            sq_sig_all: false,
            cookie: 0,
        })
        .is_err());
}

/// A datagram with the wrong qkey is dropped without a receive completion.
pub fn ud_qkey_mismatch(f: &Factory<'_>) {
    let d = Dev::new(f, 1);
    let (qa, _, qb, nb) = ud_pair(&d);
    let buf = d.buf(8192, ALL);
    buf.write(&d.mem, 0, b"bad!good");
    d.recv(qb, 1, buf.sges(4096, 100, 1));
    ud_send(&d, qa, 2, d.gid, nb, QKEY + 1, None, buf.sges(0, 4, 1));
    assert_eq!(d.wait(1)[0].wr_id, 2, "the send completes locally");
    d.quiet(Duration::from_millis(20));
    // The QP's own qkey (bit 31) matches.
    ud_send(&d, qa, 3, d.gid, nb, 0x8000_0000, None, buf.sges(4, 4, 1));
    let wcs = d.wait(2);
    assert_eq!(find(&wcs, 1).byte_len, 44);
    assert_eq!(buf.read(&d.mem, 4096 + 40, 4), b"good");
}

/// Receives come from an SRQ in order; the limit event fires once when armed.
pub fn srq(f: &Factory<'_>) {
    let d = Dev::new(f, 1);
    let srq = d.be.create_srq(d.pd, 16, 2, 0, 0x55).unwrap();
    let (q1, n1) = d.qp(QpType::Rc, Some(srq));
    let (q2, n2) = d.qp(QpType::Rc, Some(srq));
    let (s1, m1) = d.qp(QpType::Rc, None);
    let (s2, m2) = d.qp(QpType::Rc, None);
    let o = RcOpts::default();
    d.connect(q1, d.gid, m1, o);
    d.connect(q2, d.gid, m2, o);
    d.connect(s1, d.gid, n1, o);
    d.connect(s2, d.gid, n2, o);
    assert!(matches!(
        d.be.post_recv(
            q1,
            &RecvWr {
                wr_id: 0,
                sges: SgeList::new()
            }
        ),
        Err(Error::Invalid(_))
    ));
    let buf = d.buf(16 * 64, ALL);
    for i in 0..8u64 {
        d.be.post_srq_recv(
            srq,
            &RecvWr {
                wr_id: i,
                sges: buf.sges(i * 64, 64, 1),
            },
        )
        .unwrap();
    }
    d.be.modify_srq(srq, 4).unwrap();
    let src = d.buf(64, ALL);
    for i in 0..5u64 {
        src.write(&d.mem, 0, &[i as u8; 8]);
        let qp = if i % 2 == 0 { s1 } else { s2 };
        d.send(qp, 100 + i, SEND, src.sges(0, 8, 1));
        let wcs = d.wait(2);
        let r = find(&wcs, i);
        assert_eq!((r.status, r.byte_len), (WcStatus::Success, 8));
        assert_eq!(buf.read(&d.mem, i * 64, 8), [i as u8; 8]);
        let limit_hit = d
            .sink
            .events()
            .contains(&AsyncEvent::SrqLimitReached { srq_cookie: 0x55 });
        assert_eq!(limit_hit, i >= 4, "limit event after receive {i}");
    }
    assert_eq!(
        d.sink.events().len(),
        1,
        "one limit event: {:?}",
        d.sink.events()
    );
    assert!(matches!(d.be.destroy_srq(srq), Err(Error::Busy(_))));
}

/// A SEND without a receive waits (RNR) and the next ones queue behind it; a late post_recv
/// lets them through promptly and in order.
pub fn rnr_late_recv(f: &Factory<'_>) {
    let d = Dev::new(f, 1);
    let (qa, qb, _, _) = rc_pair(
        &d,
        &d,
        RcOpts {
            rnr_retry: 7,
            min_rnr_timer: 14,
            ..Default::default()
        },
    );
    let buf = d.buf(8192, ALL);
    buf.write(&d.mem, 0, b"firstsecond");
    d.send(qa, 1, SEND, buf.sges(0, 5, 1));
    d.send(qa, 2, SEND, buf.sges(5, 6, 1));
    d.quiet(Duration::from_millis(50));
    let t = Instant::now();
    d.recv(qb, 11, buf.sges(4096, 100, 1));
    d.recv(qb, 12, buf.sges(4096 + 100, 100, 1));
    let wcs = d.wait(4);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "late receive took {:?}",
        t.elapsed()
    );
    let ids: Vec<u64> = wcs.iter().map(|w| w.wr_id).collect();
    assert!(wcs.iter().all(|w| w.status == WcStatus::Success), "{wcs:?}");
    let pos = |id| ids.iter().position(|&x| x == id).unwrap();
    assert!(pos(11) < pos(12) && pos(1) < pos(2), "order {ids:?}");
    assert_eq!(buf.read(&d.mem, 4096, 5), b"first");
    assert_eq!(buf.read(&d.mem, 4196, 6), b"second");
}

/// RNR retries run out: `RnrRetryExcErr`, the QP goes to ERR and the next WR is flushed.
pub fn rnr_exhausted(f: &Factory<'_>) {
    let d = Dev::new(f, 1);
    let (qa, _, _, _) = rc_pair(
        &d,
        &d,
        RcOpts {
            rnr_retry: 3,
            min_rnr_timer: 1,
            ..Default::default()
        },
    );
    let buf = d.buf(64, ALL);
    d.send(qa, 1, SEND, buf.sges(0, 8, 1));
    d.send(qa, 2, SEND, buf.sges(0, 8, 1));
    let wcs = d.wait(2);
    assert_eq!((wcs[0].wr_id, wcs[0].status), (1, WcStatus::RnrRetryExcErr));
    assert_eq!((wcs[1].wr_id, wcs[1].status), (2, WcStatus::WrFlushErr));
    assert_eq!(d.be.query_qp_state(qa).unwrap(), QpState::Err);
}

/// Protection and access errors complete as a hardware HCA does.
pub fn access_errors(f: &Factory<'_>) {
    let d = Dev::new(f, 1);
    let buf = d.buf(8192, ALL);
    let ro = d.buf(4096, Access::LOCAL_WRITE);
    let fresh = || {
        rc_pair(
            &d,
            &d,
            RcOpts {
                rnr_retry: 0,
                ..Default::default()
            },
        )
    };
    let one = |qp, id, op, sges: SgeList| {
        d.send(qp, id, op, sges);
        let mut wcs = d.wait(1);
        wcs.extend(d.sink.take());
        find(&wcs, id)
    };
    // Bad lkey, an lkey used as nothing, and a range past the MR: LocProtErr.
    for (i, sge) in [
        Sge {
            addr: buf.iova,
            length: 8,
            lkey: 0xdead_0001,
        },
        Sge {
            addr: buf.iova,
            length: 8,
            lkey: buf.keys.rkey,
        },
        Sge {
            addr: buf.iova + 8190,
            length: 8,
            lkey: buf.keys.lkey,
        },
        Sge {
            addr: buf.iova - 1,
            length: 8,
            lkey: buf.keys.lkey,
        },
    ]
    .into_iter()
    .enumerate()
    {
        let (qa, _, _, _) = fresh();
        let s = one(qa, i as u64, SEND, [sge].into_iter().collect());
        assert_eq!(s.status, WcStatus::LocProtErr, "case {i}");
        assert_eq!(d.be.query_qp_state(qa).unwrap(), QpState::Err);
    }
    // An MR of another PD.
    let pd2 = d.be.create_pd().unwrap();
    let other = d.buf_in(pd2, 64, ALL, false);
    let (qa, _, _, _) = fresh();
    assert_eq!(
        one(qa, 10, SEND, other.sges(0, 8, 1)).status,
        WcStatus::LocProtErr
    );
    // RDMA READ into an MR without LOCAL_WRITE.
    let nolw = d.buf(64, Access::empty());
    let (qa, _, _, _) = fresh();
    let op = SendOp::RdmaRead {
        remote_addr: buf.iova,
        rkey: buf.keys.rkey,
    };
    assert_eq!(
        one(qa, 11, op, nolw.sges(0, 8, 1)).status,
        WcStatus::LocProtErr
    );
    // Remote errors: bad rkey, lkey as rkey, out of range, MR without the right.
    let w = |addr, rkey| SendOp::RdmaWrite {
        remote_addr: addr,
        rkey,
        imm: None,
    };
    let remote_cases = [
        w(buf.iova, 0x1234_5600),
        w(buf.iova, buf.keys.lkey),
        w(buf.iova + 8190, buf.keys.rkey),
        w(ro.iova, ro.keys.rkey),
        SendOp::RdmaRead {
            remote_addr: ro.iova,
            rkey: ro.keys.rkey,
        },
        SendOp::FetchAdd {
            remote_addr: ro.iova.next_multiple_of(8),
            rkey: ro.keys.rkey,
            add: 1,
        },
    ];
    for (i, op) in remote_cases.into_iter().enumerate() {
        let (qa, qb, _, _) = fresh();
        let s = one(qa, 20 + i as u64, op, buf.sges(0, 8, 1));
        assert_eq!(s.status, WcStatus::RemAccessErr, "remote case {i}");
        assert_eq!(d.be.query_qp_state(qa).unwrap(), QpState::Err);
        assert_eq!(
            d.be.query_qp_state(qb).unwrap(),
            QpState::Err,
            "responder of case {i}"
        );
    }
    // The responder QP does not grant remote write: the operation is not supported by that QP,
    // which IB answers with NAK Invalid Request (not an R_Key violation), so RemInvReqErr.
    let o = RcOpts {
        access: Access::REMOTE_READ,
        rnr_retry: 0,
        ..Default::default()
    };
    let (qa, qb, _, _) = rc_pair(&d, &d, o);
    assert_eq!(
        one(qa, 30, w(buf.iova, buf.keys.rkey), buf.sges(0, 8, 1)).status,
        WcStatus::RemInvReqErr
    );
    assert_eq!(d.be.query_qp_state(qb).unwrap(), QpState::Err);
    // Misaligned atomic.
    let (qa, _, _, _) = fresh();
    let op = SendOp::FetchAdd {
        remote_addr: buf.iova.next_multiple_of(8) + 4,
        rkey: buf.keys.rkey,
        add: 1,
    };
    assert_eq!(
        one(qa, 31, op, buf.sges(0, 8, 1)).status,
        WcStatus::RemInvReqErr
    );
    // A stale key after destroy_mr does not reach a new MR.
    let tmp = d.buf(64, ALL);
    d.be.destroy_mr(tmp.keys.id).unwrap();
    let tmp2 = d.buf(64, ALL);
    assert_ne!(tmp.keys.lkey, tmp2.keys.lkey);
    let (qa, _, _, _) = fresh();
    let sge = Sge {
        addr: tmp2.iova,
        length: 8,
        lkey: tmp.keys.lkey,
    };
    assert_eq!(
        one(qa, 32, SEND, [sge].into_iter().collect()).status,
        WcStatus::LocProtErr
    );
}

/// A receive buffer too small: the responder's receive completes with `LocLenErr` and the
/// requester with `RemInvReqErr` (or the malformed-WQE pair, see below); both QPs go to ERR.
pub fn recv_too_small(f: &Factory<'_>) {
    let d = Dev::new(f, 1);
    let (qa, qb, _, _) = rc_pair(&d, &d, RcOpts::default());
    let buf = d.buf(8192, ALL);
    d.recv(qb, 1, buf.sges(4096, 10, 1));
    d.recv(qb, 2, buf.sges(4096, 100, 1));
    d.send(qa, 3, SEND, buf.sges(0, 11, 2));
    let wcs = d.wait(3);
    let st = [1, 2, 3].map(|id| find(&wcs, id).status);
    // IB: a length error (receive LocLenErr, NAK Invalid Request → RemInvReqErr), as the
    // emulated fabric and HCAs report it. rxe classes the overflowing receive as a malformed
    // receive WQE instead (receive LocQpOpErr, NAK Remote Operational Error → RemOpErr): a
    // consistent pair (the one IB gives a malformed receive WQE), so the suite accepts either
    // pair, not a mix.
    let ib = [
        WcStatus::LocLenErr,
        WcStatus::WrFlushErr,
        WcStatus::RemInvReqErr,
    ];
    let malformed_wqe = [
        WcStatus::LocQpOpErr,
        WcStatus::WrFlushErr,
        WcStatus::RemOpErr,
    ];
    assert!(st == ib || st == malformed_wqe, "{st:?}");
    assert_eq!(d.be.query_qp_state(qa).unwrap(), QpState::Err);
    assert_eq!(d.be.query_qp_state(qb).unwrap(), QpState::Err);
}

/// Several WRs posted in one batch: each queue's completions come in the order of its queue,
/// around a responder error in the middle and across more WRs than a backend may hold back.
pub fn order_in_batches(f: &Factory<'_>) {
    let d = Dev::new(f, 1);
    let buf = d.buf(8192, ALL);
    // (wr_id, status) of the receives (wr_id ≥ 100) and of the sends, each in delivery order.
    // Told apart by wr_id: a flushed completion's opcode is undefined in verbs.
    type Seen = Vec<(u64, WcStatus)>;
    let split = |wcs: &[WorkCompletion]| -> (Seen, Seen) {
        let (r, s): (Vec<_>, Vec<_>) = wcs.iter().partition(|w| w.wr_id >= 100);
        let pairs = |v: Vec<&WorkCompletion>| v.iter().map(|w| (w.wr_id, w.status)).collect();
        (pairs(r), pairs(s))
    };
    let ok = WcStatus::Success;
    // 40 SENDs in one batch, each into its own receive.
    let (qa, qb, _, _) = rc_pair(&d, &d, RcOpts::default());
    for i in 0..40 {
        d.recv(qb, 100 + i, buf.sges(4096, 64, 1));
    }
    let wrs: Vec<SendWr> = (0..40).map(|i| wr(i, SEND, buf.sges(0, 8, 1))).collect();
    assert_eq!(d.be.post_send_batch(qa, &wrs).0, 40);
    let (recvs, sends) = split(&d.wait(80));
    assert_eq!(recvs, (0..40).map(|i| (100 + i, ok)).collect::<Seen>());
    assert_eq!(sends, (0..40).map(|i| (i, ok)).collect::<Seen>());
    // The second of three SENDs overflows its receive: the responder's completions are the
    // first receive, the error, then the flush of the third, in that order; the requester's the
    // same way (see recv_too_small for the two status pairs HCAs use).
    let (qa, qb, _, _) = rc_pair(&d, &d, RcOpts::default());
    d.recv(qb, 201, buf.sges(4096, 64, 1));
    d.recv(qb, 202, buf.sges(4096, 4, 1));
    d.recv(qb, 203, buf.sges(4096, 64, 1));
    let wrs: Vec<SendWr> = (1..=3).map(|i| wr(i, SEND, buf.sges(0, 8, 1))).collect();
    let taken = d.be.post_send_batch(qa, &wrs).0;
    assert!(taken >= 2, "{taken}");
    let (recvs, sends) = split(&d.wait(3 + taken));
    let (rerr, serr) = match recvs.get(1).map(|r| r.1) {
        Some(WcStatus::LocQpOpErr) => (WcStatus::LocQpOpErr, WcStatus::RemOpErr),
        _ => (WcStatus::LocLenErr, WcStatus::RemInvReqErr),
    };
    let flush = WcStatus::WrFlushErr;
    assert_eq!(recvs, [(201, ok), (202, rerr), (203, flush)]);
    assert_eq!(sends[..2], [(1, ok), (2, serr)]);
    assert!(sends[2..].iter().all(|s| s.1 == flush), "{sends:?}");
}

/// Work outstanding when a QP goes to ERR, and work posted afterwards, completes with
/// `WrFlushErr`.
pub fn flush_on_error(f: &Factory<'_>) {
    let d = Dev::new(f, 1);
    let (qa, _, _, _) = rc_pair(&d, &d, RcOpts::default());
    let buf = d.buf(8192, ALL);
    d.recv(qa, 10, buf.sges(4096, 64, 1));
    d.recv(qa, 11, buf.sges(4096, 64, 1));
    // Stalled (RNR, infinite) head and two WRs behind it.
    for i in 1..=3 {
        d.send(qa, i, SEND, buf.sges(0, 8, 1));
    }
    d.quiet(Duration::from_millis(20));
    d.be.modify_qp(
        qa,
        &QpAttrs {
            state: Some(QpState::Err),
            ..Default::default()
        },
    )
    .unwrap();
    let wcs = d.wait(5);
    assert!(
        wcs.iter().all(|w| w.status == WcStatus::WrFlushErr),
        "{wcs:?}"
    );
    let sends: Vec<u64> = wcs
        .iter()
        .filter(|w| w.opcode == WcOpcode::Send)
        .map(|w| w.wr_id)
        .collect();
    assert_eq!(sends, [1, 2, 3]);
    // Posted after: flushed immediately.
    d.send(qa, 4, SEND, buf.sges(0, 8, 1));
    d.recv(qa, 12, buf.sges(4096, 64, 1));
    let wcs = d.wait(2);
    assert!(wcs.iter().all(|w| w.status == WcStatus::WrFlushErr));
    // An error completion moves the QP to ERR and flushes its receives.
    let (qa, _, _, _) = rc_pair(&d, &d, RcOpts::default());
    d.recv(qa, 20, buf.sges(4096, 64, 1));
    d.send(
        qa,
        21,
        SEND,
        [Sge {
            addr: 0,
            length: 8,
            lkey: 0,
        }]
        .into_iter()
        .collect(),
    );
    let wcs = d.wait(2);
    assert_eq!(find(&wcs, 21).status, WcStatus::LocProtErr);
    assert_eq!(find(&wcs, 20).status, WcStatus::WrFlushErr);
    // To RESET drops everything silently; the QP can be brought up again.
    let (qa, qb, _, nb) = rc_pair(&d, &d, RcOpts::default());
    d.recv(qa, 30, buf.sges(4096, 64, 1));
    d.send(qa, 31, SEND, buf.sges(0, 8, 1));
    d.quiet(Duration::from_millis(10));
    d.be.modify_qp(
        qa,
        &QpAttrs {
            state: Some(QpState::Reset),
            ..Default::default()
        },
    )
    .unwrap();
    d.quiet(Duration::from_millis(10));
    d.connect(qa, d.gid, nb, RcOpts::default());
    d.recv(qb, 32, buf.sges(4096, 64, 1));
    d.send(qa, 33, SEND, buf.sges(0, 8, 1));
    let wcs = d.wait(2);
    assert!(wcs.iter().all(|w| w.status == WcStatus::Success) && wcs.len() == 2);
}

/// Only the transitions IB allows are accepted; posting in the wrong state is refused.
pub fn state_transitions(f: &Factory<'_>) {
    let d = Dev::new(f, 1);
    let (qp, _) = d.qp(QpType::Rc, None);
    let to = |s| {
        d.be.modify_qp(
            qp,
            &QpAttrs {
                state: Some(s),
                ..Default::default()
            },
        )
    };
    let bad =
        |r: crate::Result<()>| assert!(matches!(r, Err(Error::BadTransition { .. })), "{r:?}");
    let buf = d.buf(64, ALL);
    assert!(d
        .be
        .post_recv(
            qp,
            &RecvWr {
                wr_id: 0,
                sges: buf.sges(0, 8, 1)
            }
        )
        .is_err());
    bad(to(QpState::Rtr));
    bad(to(QpState::Rts));
    bad(to(QpState::Sqd));
    to(QpState::Init).unwrap();
    to(QpState::Init).unwrap();
    assert!(d.be.post_send(qp, &wr(1, SEND, buf.sges(0, 8, 1))).is_err());
    d.recv(qp, 2, buf.sges(0, 8, 1));
    bad(to(QpState::Rts));
    to(QpState::Rtr).unwrap();
    assert!(d.be.post_send(qp, &wr(3, SEND, buf.sges(0, 8, 1))).is_err());
    bad(to(QpState::Init));
    to(QpState::Rts).unwrap();
    bad(to(QpState::Rtr));
    to(QpState::Sqd).unwrap();
    to(QpState::Rts).unwrap();
    assert_eq!(d.be.query_qp_state(qp).unwrap(), QpState::Rts);
    to(QpState::Err).unwrap();
    assert_eq!(d.wait(1)[0].status, WcStatus::WrFlushErr);
    bad(to(QpState::Rts));
    bad(to(QpState::Init));
    to(QpState::Reset).unwrap();
    to(QpState::Init).unwrap();
    assert!(d
        .be
        .modify_qp(
            qp,
            &QpAttrs {
                path_mtu: Some(9),
                ..Default::default()
            }
        )
        .is_err());
}

/// Objects still referenced cannot be destroyed.
pub fn destroy_busy(f: &Factory<'_>) {
    let d = Dev::new(f, 1);
    let pd = d.be.create_pd().unwrap();
    let cq = d.be.create_cq(16, 9).unwrap();
    let mr = d.buf_in(pd, 64, ALL, false);
    assert!(matches!(d.be.destroy_pd(pd), Err(Error::Busy(_))));
    d.be.destroy_mr(mr.keys.id).unwrap();
    let srq = d.be.create_srq(pd, 4, 1, 0, 0).unwrap();
    let init = QpInit {
        qp_type: QpType::Rc,
        pd,
        send_cq: cq,
        recv_cq: d.cq,
        srq: Some(srq),
        max_send_wr: 4,
        max_recv_wr: 4,
        max_send_sge: 1,
        max_recv_sge: 1,
        sq_sig_all: true,
        cookie: 0,
    };
    let (qp, _) = d.be.create_qp(&init).unwrap();
    assert!(matches!(d.be.destroy_pd(pd), Err(Error::Busy(_))));
    assert!(matches!(d.be.destroy_cq(cq), Err(Error::Busy(_))));
    assert!(matches!(d.be.destroy_srq(srq), Err(Error::Busy(_))));
    d.be.destroy_qp(qp).unwrap();
    assert!(matches!(d.be.destroy_qp(qp), Err(Error::NoSuchObject(_))));
    assert!(matches!(d.be.destroy_pd(pd), Err(Error::Busy(_))));
    d.be.destroy_srq(srq).unwrap();
    d.be.destroy_cq(cq).unwrap();
    d.be.destroy_pd(pd).unwrap();
    assert!(matches!(
        d.be.destroy_mr(mr.keys.id),
        Err(Error::NoSuchObject(_))
    ));
}

/// Two devices on one fabric talk by GID: RC ping-pong, WRITE/READ and UD (GSI: see
/// [`gsi_two_devices`]).
pub fn two_devices(f: &Factory<'_>) {
    let a = Dev::new(f, 1);
    let b = Dev::new(f, 2);
    ping_pong(&a, &b, 10);
    let (qa, _, _, _) = rc_pair(&a, &b, RcOpts::default());
    let la = a.buf(10000, ALL);
    let rb = b.buf(10000, ALL);
    let data = a.random(10000);
    la.write(&a.mem, 0, &data);
    let op = SendOp::RdmaWrite {
        remote_addr: rb.iova,
        rkey: rb.keys.rkey,
        imm: None,
    };
    a.send(qa, 1, op, la.sges(0, 10000, 3));
    assert_eq!(a.wait(1)[0].status, WcStatus::Success);
    assert!(rb.read(&b.mem, 0, 10000) == data);
    let op = SendOp::RdmaRead {
        remote_addr: rb.iova + 100,
        rkey: rb.keys.rkey,
    };
    a.send(qa, 2, op, la.sges(5000, 5000, 2));
    assert_eq!(a.wait(1)[0].status, WcStatus::Success);
    assert!(la.read(&a.mem, 5000, 5000) == data[100..5100]);
    // UD between the devices.
    let (ua, _) = a.qp(QpType::Ud, None);
    let (ub, nb) = b.qp(QpType::Ud, None);
    a.ud_up(ua, QKEY);
    b.ud_up(ub, QKEY);
    b.recv(ub, 3, rb.sges(0, 1000, 1));
    ud_send(&a, ua, 4, b.gid, nb, QKEY, None, la.sges(0, 100, 1));
    assert_eq!(a.wait(1)[0].status, WcStatus::Success);
    let r = b.wait(1)[0];
    assert_eq!((r.wr_id, r.status, r.byte_len), (3, WcStatus::Success, 140));
    check_grh(&rb.read(&b.mem, 0, 40), 100, false, a.gid, b.gid);
    // Once B deletes its GID, datagrams to it go nowhere.
    b.be.del_gid(0).unwrap();
    b.recv(ub, 7, rb.sges(0, 1000, 1));
    ud_send(&a, ua, 8, b.gid, nb, QKEY, None, la.sges(0, 100, 1));
    assert_eq!(a.wait(1)[0].status, WcStatus::Success);
    b.quiet(Duration::from_millis(20));
}

/// GSI between two devices: QP 1 of one reaches QP 1 of the other by GID.
pub fn gsi_two_devices(f: &Factory<'_>) {
    let a = Dev::new(f, 1);
    let b = Dev::new(f, 2);
    let la = a.buf(4096, ALL);
    let rb = b.buf(4096, ALL);
    let data = a.random(200);
    la.write(&a.mem, 0, &data);
    let (ga, na) = a.qp(QpType::Gsi, None);
    let (gb, nb) = b.qp(QpType::Gsi, None);
    assert_eq!((na, nb), (1, 1));
    a.ud_up(ga, GSI_QKEY);
    b.ud_up(gb, GSI_QKEY);
    b.recv(gb, 5, rb.sges(2000, 1000, 1));
    ud_send(&a, ga, 6, b.gid, 1, 0x8000_0000, None, la.sges(0, 200, 1));
    assert_eq!(a.wait(1)[0].status, WcStatus::Success);
    let r = b.wait(1)[0];
    assert_eq!(
        (r.wr_id, r.status, r.byte_len, r.src_qp),
        (5, WcStatus::Success, 240, 1)
    );
    check_grh(&rb.read(&b.mem, 2000, 40), 200, false, a.gid, b.gid);
    assert!(rb.read(&b.mem, 2040, 200) == data);
}

/// Nothing of a QP is delivered once `destroy_qp` has returned, even with sends waiting for
/// an RNR retry and with a thread posting concurrently.
pub fn no_completion_after_destroy(f: &Factory<'_>) {
    let d = Dev::new(f, 1);
    let (qa, qb, _, _) = rc_pair(
        &d,
        &d,
        RcOpts {
            rnr_retry: 7,
            min_rnr_timer: 1,
            ..Default::default()
        },
    );
    let buf = d.buf(8192, ALL);
    for i in 0..3 {
        d.send(qa, i, SEND, buf.sges(0, 8, 1));
    }
    thread::sleep(Duration::from_millis(5));
    d.be.destroy_qp(qa).unwrap();
    d.recv(qb, 10, buf.sges(4096, 64, 1));
    d.quiet(Duration::from_millis(30));
    // A thread posts (and receives) while the QP is destroyed.
    let (qa, qb, _, _) = rc_pair(&d, &d, RcOpts::default());
    let stop = std::sync::atomic::AtomicBool::new(false);
    thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                if d.be
                    .post_recv(
                        qb,
                        &RecvWr {
                            wr_id: i,
                            sges: buf.sges(4096, 64, 1),
                        },
                    )
                    .is_err()
                {
                    break;
                }
                if d.be.post_send(qa, &wr(i, SEND, buf.sges(0, 8, 1))).is_err() {
                    break;
                }
                i += 1;
            }
        });
        thread::sleep(Duration::from_millis(20));
        d.be.destroy_qp(qa).unwrap();
        d.be.destroy_qp(qb).unwrap();
        let n = d.sink.len();
        thread::sleep(Duration::from_millis(30));
        assert_eq!(d.sink.len(), n, "completions after destroy_qp returned");
        stop.store(true, Ordering::Relaxed);
    });
}

/// Two QPs send to each other from two threads at once (with RNR waits on both sides): every
/// message arrives, nothing deadlocks.
pub fn bidirectional_stress(f: &Factory<'_>) {
    const N: u64 = 2000;
    let d = Dev::new(f, 1);
    let (qa, qb, _, _) = rc_pair(&d, &d, RcOpts::default());
    let buf = d.buf(8192, ALL);
    thread::scope(|s| {
        for (me, _peer) in [(qa, qb), (qb, qa)] {
            let (d, buf) = (&d, &buf);
            s.spawn(move || {
                let retry = |r: &dyn Fn() -> crate::Result<()>| loop {
                    match r() {
                        Err(Error::QueueFull) => thread::yield_now(),
                        other => break other.unwrap(),
                    }
                };
                for i in 0..N {
                    let rwr = RecvWr {
                        wr_id: i,
                        sges: buf.sges(4096, 64, 1),
                    };
                    retry(&|| d.be.post_recv(me, &rwr));
                    let swr = wr(N + i, SEND, buf.sges(0, 16, 1));
                    retry(&|| d.be.post_send(me, &swr));
                }
            });
        }
    });
    let wcs = d.sink.wait(4 * N as usize, WAIT);
    assert!(wcs.iter().all(|w| w.status == WcStatus::Success), "errors");
}

/// Device reset drops every object; later posts name no object.
pub fn device_reset(f: &Factory<'_>) {
    let d = Dev::new(f, 1);
    let (qa, _, _, _) = rc_pair(&d, &d, RcOpts::default());
    let buf = d.buf(64, ALL);
    d.send(qa, 1, SEND, buf.sges(0, 8, 1));
    d.be.reset();
    d.quiet(Duration::from_millis(20));
    assert!(matches!(
        d.be.post_send(qa, &wr(2, SEND, buf.sges(0, 8, 1))),
        Err(Error::NoSuchObject(_))
    ));
    assert!(d.be.destroy_pd(d.pd).is_err());
}

/// A fast-register MR of `d` in `pd` (room for `max_pages`), mapped as a [`Buf`] of `len`
/// bytes at a page offset of 0x123 once a [`fast_reg`] with the buffer's keys has run.
fn frmr_buf(d: &Dev, pd: PdId, max_pages: u32, len: u64) -> Buf {
    let keys =
        d.be.create_mr(pd, MrKind::Frmr { max_pages }, Access::empty())
            .expect("a fast-register MR");
    let iova = d.next_iova.fetch_add(1 << 32, Ordering::Relaxed) + 0x123;
    let npages = ((iova + len).div_ceil(4096) - iova / 4096) as usize;
    Buf {
        iova,
        len,
        pages: d.pages(npages, true).into(),
        keys,
    }
}

/// `buf` with the consumer's part of its keys (the low 8 bits) set to `low`.
fn rekeyed(buf: &Buf, low: u8) -> Buf {
    let mut b = buf.clone();
    b.keys.lkey = (b.keys.lkey & !0xff) | u32::from(low);
    b.keys.rkey = (b.keys.rkey & !0xff) | u32::from(low);
    b
}

/// The FAST_REG WR that maps `buf` (its pages, iova and length) with its rkey and `access`.
fn fast_reg(buf: &Buf, access: Access) -> SendOp {
    SendOp::FastReg(Box::new(FastReg {
        key: buf.keys.rkey,
        iova: buf.iova,
        length: buf.len,
        access,
        pages: buf.pages.clone(),
    }))
}

/// Posts one signaled WR and returns its completion (and any others that came with it).
fn one(d: &Dev, qp: QpId, id: u64, op: SendOp, sges: SgeList) -> WorkCompletion {
    d.send(qp, id, op, sges);
    let mut wcs = d.wait(1);
    wcs.extend(d.sink.take());
    find(&wcs, id)
}

/// Without fast registration (`fast_reg_max_pages` 0), a backend refuses it cleanly: no
/// fast-register MR, and the WRs complete in error instead of hanging. `true` if so.
fn frmr_refused(d: &Dev) -> bool {
    if d.be.fast_reg_max_pages() > 0 {
        return false;
    }
    assert!(matches!(
        d.be.create_mr(d.pd, MrKind::Frmr { max_pages: 4 }, Access::empty()),
        Err(Error::Unsupported(_))
    ));
    let buf = d.buf(4096, ALL);
    for op in [
        fast_reg(&buf, ALL),
        SendOp::LocalInv { key: buf.keys.lkey },
        SendOp::SendInv {
            rkey: buf.keys.rkey,
        },
    ] {
        let (qa, qb, _, _) = rc_pair(d, d, RcOpts::default());
        d.recv(qb, 1, buf.sges(0, 64, 1));
        let s = one(d, qa, 2, op, SgeList::new());
        assert_eq!(s.status, WcStatus::LocQpOpErr);
        d.sink.take();
    }
    true
}

/// Fast registration as the guest kernel uses it: REG_MR with a fresh key, RDMA WRITE and READ
/// by a peer with that key within exactly the registered range, LOCAL_INV, then the peer's
/// access fails and writes nothing; a new registration with another key works again, and a
/// SEND with invalidate from the peer unmaps it on arrival (the key in the receive's
/// completion).
pub fn frmr_register_and_invalidate(f: &Factory<'_>) {
    let a = Dev::new(f, 1);
    let b = Dev::new(f, 2);
    if frmr_refused(&b) {
        return;
    }
    let len = 3 * 4096 + 100;
    let mr = frmr_buf(&b, b.pd, 8, len);
    let src = a.buf(len, ALL);
    let back = a.buf(len, ALL);
    let (qa, qb, _, _) = rc_pair(&a, &b, RcOpts::default());
    // Map it with the consumer's key 0x42.
    let m = rekeyed(&mr, 0x42);
    let s = one(&b, qb, 1, fast_reg(&m, ALL), SgeList::new());
    assert_eq!(
        (s.status, s.opcode),
        (WcStatus::Success, WcOpcode::FastRegMr)
    );
    let data = a.random(len as usize);
    src.write(&a.mem, 0, &data);
    let write = |rkey, at: u64| SendOp::RdmaWrite {
        remote_addr: m.iova + at,
        rkey,
        imm: None,
    };
    let s = one(&a, qa, 2, write(m.keys.rkey, 0), src.sges(0, len, 2));
    assert_eq!(s.status, WcStatus::Success);
    assert!(
        m.read(&b.mem, 0, len) == data,
        "WRITE through the fast-registered key"
    );
    let read = SendOp::RdmaRead {
        remote_addr: m.iova,
        rkey: m.keys.rkey,
    };
    let s = one(&a, qa, 3, read, back.sges(0, len, 3));
    assert_eq!(s.status, WcStatus::Success);
    assert!(
        back.read(&a.mem, 0, len) == data,
        "READ through the fast-registered key"
    );
    // The MR's own lkey, with the same low 8 bits, serves its owner's local SGEs.
    b.recv(qb, 4, m.sges(0, 64, 1));
    let s = one(&a, qa, 5, SEND, src.sges(0, 64, 1));
    assert_eq!(s.status, WcStatus::Success);
    b.sink.wait(1, WAIT);
    // Invalidate; every later use of the key fails and writes nothing.
    let inv = SendOp::LocalInv { key: m.keys.rkey };
    let s = one(&b, qb, 6, inv, SgeList::new());
    assert_eq!(
        (s.status, s.opcode),
        (WcStatus::Success, WcOpcode::LocalInv)
    );
    let before = m.read(&b.mem, 0, len);
    let s = one(&a, qa, 7, write(m.keys.rkey, 0), src.sges(0, 8, 1));
    assert_eq!(s.status, WcStatus::RemAccessErr);
    assert!(
        m.read(&b.mem, 0, len) == before,
        "nothing written after LOCAL_INV"
    );
    b.sink.take();
    // A new registration with another key; the old key and a range off by one fail.
    let (qa, qb, _, _) = rc_pair(&a, &b, RcOpts::default());
    let m2 = rekeyed(&mr, 0x43);
    let s = one(&b, qb, 10, fast_reg(&m2, ALL), SgeList::new());
    assert_eq!(s.status, WcStatus::Success);
    let s = one(&a, qa, 11, write(m2.keys.rkey, len - 8), src.sges(0, 8, 1));
    assert_eq!(s.status, WcStatus::Success, "the last 8 bytes of the range");
    for (i, (rkey, at)) in [(m.keys.rkey, 0), (m2.keys.rkey, len - 7)]
        .into_iter()
        .enumerate()
    {
        let (qa, _, _, _) = rc_pair(&a, &b, RcOpts::default());
        let s = one(&a, qa, 12 + i as u64, write(rkey, at), src.sges(0, 8, 1));
        assert_eq!(s.status, WcStatus::RemAccessErr, "case {i}");
        b.sink.take();
    }
    // SEND with invalidate from the peer: the key arrives in the receive's completion and no
    // longer works.
    let dst = b.buf(64, ALL);
    b.recv(qb, 20, dst.sges(0, 64, 1));
    let send_inv = SendOp::SendInv { rkey: m2.keys.rkey };
    let s = one(&a, qa, 21, send_inv, src.sges(0, 64, 1));
    assert_eq!((s.status, s.opcode), (WcStatus::Success, WcOpcode::Send));
    let r = find(&b.sink.wait(1, WAIT), 20);
    assert_eq!(
        (r.status, r.opcode, r.invalidated, r.byte_len),
        (WcStatus::Success, WcOpcode::Recv, Some(m2.keys.rkey), 64)
    );
    let s = one(&a, qa, 22, write(m2.keys.rkey, 0), src.sges(0, 8, 1));
    assert_eq!(
        s.status,
        WcStatus::RemAccessErr,
        "after the remote invalidation"
    );
}

/// Fast registration's state errors, each a `LocQpOpErr` completion that moves the QP to ERR
/// (a new QP for each): register a mapped MR, invalidate a free one, an MR of another PD, a key
/// that differs beyond its low 8 bits, more pages than the MR has room for, pages short of the
/// range, length 0, a range that wraps; a SEND with invalidate naming a key that is not a
/// mapped fast-register MR of the responder fails on both sides (`RemInvReqErr`).
pub fn frmr_state_errors(f: &Factory<'_>) {
    let d = Dev::new(f, 1);
    if frmr_refused(&d) {
        return;
    }
    let fresh = || rc_pair(&d, &d, RcOpts::default()).0;
    let expect_err = |what: &str, op: SendOp| {
        let qp = fresh();
        let s = one(&d, qp, 1, op, SgeList::new());
        assert_eq!(s.status, WcStatus::LocQpOpErr, "{what}");
        // The QP is in ERR: the next WR is flushed.
        let s = one(&d, qp, 2, SEND, SgeList::new());
        assert_eq!(s.status, WcStatus::WrFlushErr, "{what}: QP in ERR");
        d.sink.take();
    };
    let mr = frmr_buf(&d, d.pd, 4, 2 * 4096);
    let mapped = rekeyed(&mr, 1);
    let s = one(&d, fresh(), 1, fast_reg(&mapped, ALL), SgeList::new());
    assert_eq!(s.status, WcStatus::Success);
    expect_err("register a mapped MR", fast_reg(&rekeyed(&mr, 2), ALL));
    let free = frmr_buf(&d, d.pd, 4, 4096);
    expect_err(
        "invalidate a free MR",
        SendOp::LocalInv {
            key: free.keys.rkey,
        },
    );
    expect_err(
        "invalidate a user MR",
        SendOp::LocalInv {
            key: d.buf(4096, ALL).keys.lkey,
        },
    );
    let other_pd = d.be.create_pd().unwrap();
    let theirs = frmr_buf(&d, other_pd, 4, 4096);
    expect_err("an MR of another PD", fast_reg(&theirs, ALL));
    let mut wrong = free.clone();
    wrong.keys.rkey ^= 0x100;
    expect_err("key bits beyond the low 8", fast_reg(&wrong, ALL));
    let big = Buf {
        len: 5 * 4096,
        pages: d.pages(6, false).into(),
        ..free.clone()
    };
    expect_err("more pages than its room", fast_reg(&big, ALL));
    let short = Buf {
        len: 2 * 4096,
        pages: d.pages(1, false).into(),
        ..free.clone()
    };
    expect_err("pages short of the range", fast_reg(&short, ALL));
    let empty = Buf {
        len: 0,
        ..free.clone()
    };
    expect_err("length 0", fast_reg(&empty, ALL));
    let wraps = Buf {
        iova: u64::MAX - 100,
        ..free.clone()
    };
    expect_err("a range that wraps", fast_reg(&wraps, ALL));
    // The free MR is still usable after all that.
    let s = one(
        &d,
        fresh(),
        3,
        fast_reg(&rekeyed(&free, 9), ALL),
        SgeList::new(),
    );
    assert_eq!(s.status, WcStatus::Success);
    // SEND with invalidate of a key that is no mapped fast-register MR of the responder.
    let dst = d.buf(64, ALL);
    for (i, rkey) in [dst.keys.rkey, free.keys.rkey, theirs.keys.rkey]
        .into_iter()
        .enumerate()
    {
        let (qa, qb, _, _) = rc_pair(&d, &d, RcOpts::default());
        d.recv(qb, 100 + i as u64, dst.sges(0, 64, 1));
        d.send(
            qa,
            200 + i as u64,
            SendOp::SendInv { rkey },
            dst.sges(0, 8, 1),
        );
        let wcs = d.wait(2);
        assert_eq!(
            find(&wcs, 200 + i as u64).status,
            WcStatus::RemInvReqErr,
            "{i}"
        );
        assert_eq!(
            find(&wcs, 100 + i as u64).status,
            WcStatus::RemInvReqErr,
            "{i}"
        );
        d.sink.take();
    }
}

/// A conformance case.
pub type Case = fn(&Factory<'_>);

/// Every case with its name.
pub const CASES: &[(&str, Case)] = &[
    ("rc_ping_pong", rc_ping_pong),
    ("rc_opcodes", rc_opcodes),
    ("rc_16mib", rc_16mib),
    ("oversized_sge_total", oversized_sge_total),
    ("rc_atomics", rc_atomics),
    ("atomics_concurrent", atomics_concurrent),
    ("ud_send_grh", ud_send_grh),
    ("ud_length_errors", ud_length_errors),
    ("ud_many_address_vectors", ud_many_address_vectors),
    ("gsi_send", gsi_send),
    ("ud_qkey_mismatch", ud_qkey_mismatch),
    ("srq", srq),
    ("rnr_late_recv", rnr_late_recv),
    ("rnr_exhausted", rnr_exhausted),
    ("access_errors", access_errors),
    ("recv_too_small", recv_too_small),
    ("order_in_batches", order_in_batches),
    ("flush_on_error", flush_on_error),
    ("state_transitions", state_transitions),
    ("destroy_busy", destroy_busy),
    ("two_devices", two_devices),
    ("gsi_two_devices", gsi_two_devices),
    ("no_completion_after_destroy", no_completion_after_destroy),
    ("bidirectional_stress", bidirectional_stress),
    ("device_reset", device_reset),
    ("frmr_register_and_invalidate", frmr_register_and_invalidate),
    ("frmr_state_errors", frmr_state_errors),
];
