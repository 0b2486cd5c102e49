//! Records real command-channel traffic as `cmd_channel` seeds: the kernel's registration
//! sequence (`pvrdma_guest::kernel::ib_register`) and an RC ping-pong, each run through a
//! transport that turns every REQUEST into an `op::CMD` (preceded by `op::SCRIBBLE`s that
//! recreate the page directories it names) and every UAR doorbell into an `op::DOORBELL`
//! (preceded by the non-zero bytes of the queue pages). Also records `registers` seeds: every
//! register access of a driver probe and its first commands, in that target's format. Run from
//! `fuzz/`: `cargo run --example record_seeds -- corpus/cmd_channel corpus/registers`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pvrdma_dev::abi::{cmd, CmdCreateCq, CmdCreateMr, CmdCreateQp, CmdCreateSrq, CMD_SLOT_SIZE};
use pvrdma_dev::regs::offset;
use pvrdma_dev::Region;
use pvrdma_fuzz::{device, op, reg_op, small_cfg};
use pvrdma_guest::driver::rc_connect_attrs;
use pvrdma_guest::{Ctx, Driver, Local, QpKind, SendWqe, Transport};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

struct Recorder {
    inner: Arc<Local>,
    dsr: Mutex<u64>,
    /// Page addresses of every queue/ring page directory seen so far.
    pages: Mutex<Vec<u64>>,
    out: Mutex<Vec<u8>>,
    /// What the seed has written to each queue page so far.
    seen: Mutex<std::collections::HashMap<u64, Vec<u8>>>,
}

fn scribble(out: &mut Vec<u8>, addr: u64, bytes: &[u8]) {
    for (i, chunk) in bytes.chunks(255).enumerate() {
        if chunk.iter().all(|b| *b == 0) {
            continue;
        }
        out.push(op::SCRIBBLE);
        out.extend_from_slice(&((addr + 255 * i as u64) as u32).to_le_bytes());
        out.push(chunk.len() as u8);
        out.extend_from_slice(chunk);
    }
}

fn page(mem: &GuestMemoryMmap, a: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    let _ = mem.read_slice(&mut b, GuestAddress(a));
    b
}

fn parse<T: ByteValued + Default>(req: &[u8]) -> T {
    let mut v = T::default();
    let n = std::mem::size_of::<T>();
    v.as_mut_slice().copy_from_slice(&req[..n]);
    v
}

impl Recorder {
    /// Recreates the directory and tables of a pdir (and remembers its pages if `queue`).
    fn pdir(&self, out: &mut Vec<u8>, dir: u64, npages: u32, queue: bool) {
        let mem = self.inner.mem();
        if dir == 0 || npages == 0 || npages > 4096 {
            return;
        }
        let d = page(mem, dir);
        let ntables = (npages as usize).div_ceil(512);
        scribble(out, dir, &d[..8 * ntables]);
        for t in 0..ntables {
            let table = u64::from_le_bytes(d[8 * t..8 * t + 8].try_into().unwrap());
            let tb = page(mem, table);
            let n = (npages as usize - 512 * t).min(512);
            scribble(out, table, &tb[..8 * n]);
            if queue {
                let mut pages = self.pages.lock().unwrap();
                for j in 0..n {
                    pages.push(u64::from_le_bytes(tb[8 * j..8 * j + 8].try_into().unwrap()));
                }
            }
        }
    }

    fn request(&self) {
        let mem = self.inner.mem();
        let dsr = *self.dsr.lock().unwrap();
        let slot: u64 = mem.read_obj(GuestAddress(dsr + 16)).unwrap();
        let mut req = [0u8; CMD_SLOT_SIZE];
        mem.read_slice(&mut req, GuestAddress(slot)).unwrap();
        let code = u32::from_le_bytes(req[8..12].try_into().unwrap());
        let mut out = Vec::new();
        match code {
            cmd::CREATE_CQ => {
                let r: CmdCreateCq = parse(&req);
                self.pdir(&mut out, r.pdir_dma, r.nchunks, true);
            }
            cmd::CREATE_QP => {
                let r: CmdCreateQp = parse(&req);
                self.pdir(&mut out, r.pdir_dma, u32::from(r.total_chunks), true);
            }
            cmd::CREATE_SRQ => {
                let r: CmdCreateSrq = parse(&req);
                self.pdir(&mut out, r.pdir_dma, r.nchunks, true);
            }
            cmd::CREATE_MR => {
                let r: CmdCreateMr = parse(&req);
                self.pdir(&mut out, r.pdir_dma, r.nchunks, false);
            }
            _ => {}
        }
        out.push(op::CMD);
        out.extend_from_slice(&req);
        self.out.lock().unwrap().extend_from_slice(&out);
    }

    fn doorbell(&self, off: u64, data: &[u8]) {
        let mem = self.inner.mem();
        let mut out = Vec::new();
        let mut seen = self.seen.lock().unwrap();
        for p in self.pages.lock().unwrap().iter() {
            let now = page(mem, *p);
            let before = seen.entry(*p).or_insert_with(|| vec![0u8; 4096]);
            for i in (0..4096).step_by(255) {
                let e = (i + 255).min(4096);
                if now[i..e] != before[i..e] {
                    out.push(op::SCRIBBLE);
                    out.extend_from_slice(&((*p + i as u64) as u32).to_le_bytes());
                    out.push((e - i) as u8);
                    out.extend_from_slice(&now[i..e]);
                }
            }
            *before = now;
        }
        out.push(op::DOORBELL);
        out.extend_from_slice(&(off as u16).to_le_bytes());
        let mut v = [0u8; 4];
        v[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
        out.extend_from_slice(&v);
        self.out.lock().unwrap().extend_from_slice(&out);
    }
}

impl Transport for Recorder {
    fn read(&self, region: Region, offset: u64, data: &mut [u8]) {
        self.inner.read(region, offset, data)
    }
    fn write(&self, region: Region, off: u64, data: &[u8]) {
        let v = data
            .iter()
            .rev()
            .fold(0u64, |a, b| (a << 8) | u64::from(*b));
        match region {
            Region::Bar(1) if off == offset::DSRLOW => {
                let mut d = self.dsr.lock().unwrap();
                *d = (*d & !0xffff_ffff) | v;
            }
            Region::Bar(1) if off == offset::DSRHIGH => {
                let mut d = self.dsr.lock().unwrap();
                *d = (*d & 0xffff_ffff) | (v << 32);
            }
            Region::Bar(1) if off == offset::REQUEST && v == 0 => self.request(),
            Region::Bar(2) => self.doorbell(off, data),
            _ => {}
        }
        self.inner.write(region, off, data)
    }
    fn mem(&self) -> &GuestMemoryMmap {
        self.inner.mem()
    }
    fn irq_count(&self, vector: u16) -> u64 {
        self.inner.irq_count(vector)
    }
    fn wait_irq(&self, vector: u16, seen: u64, timeout: Duration) -> bool {
        self.inner.wait_irq(vector, seen, timeout)
    }
    fn reset(&self) {
        self.inner.reset()
    }
    fn idle(&self, max: Duration) {
        self.inner.idle(max)
    }
}

/// Records every register access in the `registers` target's format.
struct RegRecorder {
    inner: Arc<Local>,
    dsr: Mutex<u64>,
    out: Mutex<Vec<u8>>,
    ops: Mutex<usize>,
}

impl RegRecorder {
    fn record(&self, region: Region, off: u64, len: usize, write: Option<&[u8]>) {
        let r = match region {
            Region::Config => 0u8,
            Region::Bar(0) => 1,
            Region::Bar(1) => 2,
            _ => 3,
        };
        let len_idx = match len {
            1 => 0u8,
            2 => 1,
            4 => reg_op::LEN4,
            _ => 3,
        };
        let mut out = vec![r | (reg_op::MODE_U16 << 2) | (len_idx << 5)];
        out.extend_from_slice(&(off as u16).to_le_bytes());
        match write {
            None => out.push(0),
            Some(data) => {
                out.push(1);
                let mut v = [0u8; 8];
                v[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
                out.extend_from_slice(&v);
                if region == Region::Bar(1) && off == offset::REQUEST && len == 4 {
                    let dsr = *self.dsr.lock().unwrap();
                    let mem = self.inner.mem();
                    let slot: u64 = mem.read_obj(GuestAddress(dsr + 16)).unwrap_or(0);
                    let mut req = [0u8; CMD_SLOT_SIZE];
                    let _ = mem.read_slice(&mut req, GuestAddress(slot));
                    out.extend_from_slice(&req);
                }
            }
        }
        let mut n = self.ops.lock().unwrap();
        if *n < 128 {
            *n += 1;
            self.out.lock().unwrap().extend_from_slice(&out);
        }
    }
}

impl Transport for RegRecorder {
    fn read(&self, region: Region, offset: u64, data: &mut [u8]) {
        self.record(region, offset, data.len(), None);
        self.inner.read(region, offset, data)
    }
    fn write(&self, region: Region, off: u64, data: &[u8]) {
        let v = data
            .iter()
            .rev()
            .fold(0u64, |a, b| (a << 8) | u64::from(*b));
        if region == Region::Bar(1) && off == offset::DSRLOW {
            let mut d = self.dsr.lock().unwrap();
            *d = (*d & !0xffff_ffff) | v;
        } else if region == Region::Bar(1) && off == offset::DSRHIGH {
            let mut d = self.dsr.lock().unwrap();
            *d = (*d & 0xffff_ffff) | (v << 32);
        }
        self.record(region, off, data.len(), Some(data));
        self.inner.write(region, off, data)
    }
    fn mem(&self) -> &GuestMemoryMmap {
        self.inner.mem()
    }
    fn irq_count(&self, vector: u16) -> u64 {
        self.inner.irq_count(vector)
    }
    fn wait_irq(&self, vector: u16, seen: u64, timeout: Duration) -> bool {
        self.inner.wait_irq(vector, seen, timeout)
    }
    fn reset(&self) {
        self.inner.reset()
    }
    fn idle(&self, max: Duration) {
        self.inner.idle(max)
    }
}

/// `registers` seeds: a driver probe and its first commands, recorded access by access.
fn record_registers(dir: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let seeds: [(&str, fn(&Driver)); 2] = [
        ("probe_query", |drv| {
            drv.query_port(1).unwrap();
            let ctx = drv.create_uc(1).unwrap_or(Ctx::KERNEL);
            let pd = drv.create_pd(ctx).unwrap();
            drv.destroy_pd(pd).unwrap();
        }),
        ("probe_ib_register", |drv| {
            let _ = pvrdma_guest::kernel::ib_register(drv, small_cfg().mac);
        }),
    ];
    for (name, f) in seeds {
        let r = Arc::new(RegRecorder {
            inner: device(&small_cfg()),
            dsr: Mutex::new(0),
            out: Mutex::new(Vec::new()),
            ops: Mutex::new(0),
        });
        let drv = Driver::probe(r.clone() as Arc<dyn Transport>).expect("probe");
        f(&drv);
        let data = r.out.lock().unwrap().clone();
        let path = format!("{dir}/seed-{name}");
        std::fs::write(&path, &data).expect("write seed");
        println!(
            "{path}: {} bytes, {} accesses",
            data.len(),
            r.ops.lock().unwrap()
        );
        pvrdma_fuzz::run_registers(&data);
    }
}

fn recorder() -> (Arc<Recorder>, Driver) {
    let r = Arc::new(Recorder {
        inner: device(&small_cfg()),
        dsr: Mutex::new(0),
        pages: Mutex::new(Vec::new()),
        out: Mutex::new(Vec::new()),
        seen: Mutex::new(std::collections::HashMap::new()),
    });
    let drv = Driver::probe(r.clone() as Arc<dyn Transport>).expect("probe");
    (r, drv)
}

fn save(dir: &str, name: &str, r: &Recorder) {
    let mut data = r.out.lock().unwrap().clone();
    // Keep seeds small (the GSI QP's 512 receives add ~520 bytes each): the first 48 KiB.
    data.truncate(48 << 10);
    let path = format!("{dir}/seed-{name}");
    std::fs::write(&path, &data).expect("write seed");
    println!("{path}: {} bytes", data.len());
    // The seed must pass the target's own invariants.
    pvrdma_fuzz::run_cmd_channel(&data);
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "corpus/cmd_channel".into());
    std::fs::create_dir_all(&dir).unwrap();
    let mac = small_cfg().mac;

    // Registration only: QUERY_PORT, QUERY_PKEY, CREATE_BIND, CREATE_PD, DMA MR, CQ, GSI QP
    // (the 512 receives are doorbells).
    let (r, drv) = recorder();
    pvrdma_guest::kernel::ib_register(&drv, mac).expect("ib_register");
    save(&dir, "ib_register", &r);
    // Devices share the thread's fabric: this one must give up the GID the next one binds.
    drop(drv);
    drop(r);

    // A user context, PD, two CQs, two RC QPs connected to each other, MRs, one ping-pong,
    // then everything destroyed.
    let (r, drv) = recorder();
    let gid = rdma_backend::Gid::from_mac(mac).0;
    drv.create_bind(0, gid, 1).unwrap();
    let ctx = drv.create_uc(1).unwrap_or(Ctx::KERNEL);
    let pd = drv.create_pd(ctx).unwrap();
    let mut cq_a = drv.create_cq(ctx, 16).unwrap();
    let mut cq_b = drv.create_cq(ctx, 16).unwrap();
    let caps = (4, 4, 1, 1);
    let mut a = drv
        .create_qp(ctx, QpKind::Rc, pd, &cq_a, &cq_a, None, caps, false)
        .unwrap();
    let mut b = drv
        .create_qp(ctx, QpKind::Rc, pd, &cq_b, &cq_b, None, caps, false)
        .unwrap();
    for m in rc_connect_attrs(b.qpn, gid, 0xf) {
        drv.modify_qp(&a, m).unwrap();
    }
    for m in rc_connect_attrs(a.qpn, gid, 0xf) {
        drv.modify_qp(&b, m).unwrap();
    }
    let ma = drv.reg_mr(pd, 0x7000_0000, 4096, 0xf).unwrap();
    let mb = drv.reg_mr(pd, 0x7100_0000, 4096, 0xf).unwrap();
    ma.write(drv.mem(), 0, b"ping");
    assert!(drv.post_recv(&mut b, 1, &[mb.sge(0, 4096)]));
    let send = SendWqe {
        wr_id: 7,
        opcode: pvrdma_dev::abi::wr_opcode::SEND,
        flags: pvrdma_dev::abi::send_flags::SIGNALED,
        sges: vec![ma.sge(0, 4)],
        ..SendWqe::default()
    };
    assert!(drv.post_send(&mut a, &send));
    assert_eq!(drv.wait_cqes(&mut cq_a, 1, Duration::from_secs(5)).len(), 1);
    assert_eq!(drv.wait_cqes(&mut cq_b, 1, Duration::from_secs(5)).len(), 1);
    let _ = drv.query_qp(&a);
    drv.destroy_qp(a).unwrap();
    drv.destroy_qp(b).unwrap();
    drv.destroy_mr(ma).unwrap();
    drv.destroy_mr(mb).unwrap();
    drv.destroy_cq(cq_a).unwrap();
    drv.destroy_cq(cq_b).unwrap();
    drv.destroy_pd(pd).unwrap();
    let _ = drv.destroy_uc(ctx);
    save(&dir, "rc_pingpong", &r);

    let reg_dir = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "corpus/registers".into());
    record_registers(&reg_dir);
}
