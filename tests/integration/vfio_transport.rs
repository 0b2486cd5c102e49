//! The harness against a real `pvrdma serve` process over a vfio-user socket: probe, kernel
//! registration, data path, interrupts through eventfds, reconnect, DMA maps without an fd,
//! DEVICE_RESET with work in flight, and a clean exit on SIGTERM.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use pvrdma_dev::abi::wr_opcode;
use pvrdma_guest::kernel::ib_register;
use pvrdma_guest::{Driver, SendWqe, Transport};

#[test]
fn probe_and_kernel_registration() {
    let _shared = crate::common::shared();
    let (_server, _t, drv) = probed_vfio();
    assert_eq!(drv.version, 20);
    assert_eq!(drv.caps.phys_port_cnt, 1);
    assert_eq!(drv.events(), vec![(9, 1)], "PORT_ACTIVE on activation");
    let k = ib_register(&drv, MAC).expect("ib_register");
    assert_eq!(k.gsi.qpn, 1);
    assert_eq!(k.gid, gid_of(MAC));
    assert_eq!(drv.query_port(1).unwrap().state, 4);
}

#[test]
fn rc_ping_pong_rdma_write_and_cq_interrupt() {
    let _shared = crate::common::shared();
    let (_server, t, drv) = probed_vfio();
    let mut p = rc_pair(&drv, MAC, 16, 1);
    let mem = drv.mem();
    let ma = drv
        .reg_mr(p.pd, 0x7f00_0000_1000, 4096, ALL_ACCESS)
        .unwrap();
    let mb = drv
        .reg_mr(p.pd, 0x7f00_0010_0000, 4096, ALL_ACCESS)
        .unwrap();
    for round in 0..20u64 {
        let msg = pattern(100 + round as usize, round as u8);
        assert!(drv.post_recv(&mut p.b, round, &[mb.sge(0, 4096)]));
        ma.write(mem, 0, &msg);
        assert!(drv.post_send(&mut p.a, &send(1000 + round, ma.sge(0, msg.len() as u32))));
        let s = one(&drv, &mut p.cq_a);
        assert_eq!((s.wr_id, s.status), (1000 + round, 0));
        let r = one(&drv, &mut p.cq_b);
        assert_eq!(
            (r.wr_id, r.status, r.byte_len as usize),
            (round, 0, msg.len())
        );
        let mut got = vec![0u8; msg.len()];
        mb.read(mem, 0, &mut got);
        assert_eq!(got, msg);
        assert!(drv.post_recv(&mut p.a, round, &[ma.sge(0, 4096)]));
        assert!(drv.post_send(&mut p.b, &send(2000 + round, mb.sge(0, msg.len() as u32))));
        assert_eq!(one(&drv, &mut p.cq_b).wr_id, 2000 + round);
        assert_eq!(one(&drv, &mut p.cq_a).status, 0);
    }

    // RDMA WRITE of 1 MiB, verified in the remote MR (guest RAM is the shared memfd).
    let size = 1usize << 20;
    let local = drv
        .reg_mr(p.pd, 0x10_0000_0123, size as u64, ALL_ACCESS)
        .unwrap();
    let remote = drv
        .reg_mr(p.pd, 0x20_0000_0456, size as u64, ALL_ACCESS)
        .unwrap();
    let data = pattern(size, 7);
    local.write(mem, 0, &data);
    let w = SendWqe {
        wr_id: 77,
        opcode: wr_opcode::RDMA_WRITE,
        flags: 2,
        sges: vec![local.sge(0, size as u32)],
        remote_addr: remote.iova,
        rkey: remote.rkey,
        ..Default::default()
    };
    assert!(drv.post_send(&mut p.a, &w));
    let c = one(&drv, &mut p.cq_a);
    assert_eq!((c.wr_id, c.status, c.opcode), (77, 0, 1));
    let mut got = vec![0u8; size];
    remote.read(mem, 0, &mut got);
    assert!(got == data, "RDMA WRITE of 1 MiB corrupted");

    // CQ arm → vector 2, counted through its eventfd.
    let v2 = t.irq_count(2);
    drv.arm_cq(&p.cq_b, false);
    assert!(drv.post_recv(&mut p.b, 500, &[mb.sge(0, 64)]));
    assert!(drv.post_send(&mut p.a, &send(501, ma.sge(0, 64))));
    assert_eq!(one(&drv, &mut p.cq_b).wr_id, 500);
    assert!(t.wait_irq(2, v2, WAIT), "CQ notification on vector 2");
    assert_eq!(drv.cq_notifications(), vec![p.cq_b.handle]);
    // Command completions come on vector 0 too.
    assert!(t.irq_count(0) > 0);
}

#[test]
fn reconnect_gets_a_fresh_device() {
    let _shared = crate::common::shared();
    let server = serve_process();
    {
        let (t, drv) = probed_over(&server);
        let _k = ib_register(&drv, MAC).expect("ib_register");
        let _p = rc_pair(&drv, MAC, 8, 1);
        drop(drv);
        drop(t);
    }
    // A fresh device: probe, PORT_ACTIVE again as the first event, and QP1 free again.
    let (_t, drv) = probed_over(&server);
    assert_eq!(drv.events(), vec![(9, 1)]);
    let k = ib_register(&drv, MAC).expect("ib_register on the new device");
    assert_eq!(k.gsi.qpn, 1);
}

#[test]
fn device_reset_with_work_in_flight_then_probe_again() {
    let _shared = crate::common::shared();
    let (_server, t, drv) = probed_vfio();
    let mut p = rc_pair(&drv, MAC, 64, 1);
    let _mrs = post_writes_in_flight(&drv, &mut p, 32, 256 << 10);
    t.reset();
    drop(drv);
    let drv = Driver::probe(t.clone() as Arc<dyn Transport>).expect("probe after reset");
    assert_eq!(drv.events(), vec![(9, 1)]);
    let k = ib_register(&drv, MAC).expect("ib_register after reset");
    assert_eq!(k.gsi.qpn, 1);
    let mut p = rc_pair(&drv, MAC, 8, 1);
    let m = drv.reg_mr(p.pd, 0x9000, 4096, ALL_ACCESS).unwrap();
    assert!(drv.post_recv(&mut p.b, 1, &[m.sge(2048, 64)]));
    assert!(drv.post_send(&mut p.a, &send(2, m.sge(0, 64))));
    assert_eq!(one(&drv, &mut p.cq_b).status, 0);
}

#[test]
fn dma_unmap_while_transfers_use_the_range() {
    let _shared = crate::common::shared();
    let (server, t, drv) = probed_vfio();
    let mut p = rc_pair(&drv, MAC, 64, 1);
    let _mrs = post_writes_in_flight(&drv, &mut p, 32, 1 << 20);
    // Pull all guest RAM out from under the transfers: the unmap is answered once no work uses
    // it, the device does not crash, and after a remap and reset it serves a new driver.
    let ram = pvrdma_guest::vfio::DEFAULT_RAM as u64;
    t.with_client(|c| c.dma_unmap(0, ram))
        .expect("DMA_UNMAP answered");
    let fd = std::os::fd::AsRawFd::as_raw_fd(t.ram_file());
    t.with_client(|c| c.dma_map(0, 0, ram, fd))
        .expect("DMA_MAP again");
    t.reset();
    drop(drv);
    let drv = Driver::probe(t.clone() as Arc<dyn Transport>).expect("probe after unmap");
    let mut p = rc_pair(&drv, MAC, 8, 1);
    let m = drv.reg_mr(p.pd, 0x9000, 4096, ALL_ACCESS).unwrap();
    assert!(drv.post_recv(&mut p.b, 1, &[m.sge(2048, 64)]));
    assert!(drv.post_send(&mut p.a, &send(2, m.sge(0, 64))));
    assert_eq!(one(&drv, &mut p.cq_b).status, 0);
    drop(server);
}

// ---- a raw vfio-user client, for messages `vfio_user::Client` cannot send -------------------

const HDR: usize = 16;
const REPLY_ERROR: u32 = 1 << 5;

struct Raw {
    s: UnixStream,
    id: u16,
}

impl Raw {
    fn connect(path: &std::path::Path) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut r = Raw { s, id: 0 };
        let json = b"{\"capabilities\":{\"max_msg_fds\":8}}\0";
        let mut body = vec![0u8, 0, 1, 0]; // major 0, minor 1
        body.extend_from_slice(json);
        let (_, reply) = r.call(1, &body);
        assert!(reply.len() > 4, "version reply");
        r
    }

    /// Sends command `cmd` with `body`; returns (reply flags, reply body).
    fn call(&mut self, cmd: u16, body: &[u8]) -> (u32, Vec<u8>) {
        let mut m = Vec::with_capacity(HDR + body.len());
        m.extend_from_slice(&self.id.to_le_bytes());
        m.extend_from_slice(&cmd.to_le_bytes());
        m.extend_from_slice(&((HDR + body.len()) as u32).to_le_bytes());
        m.extend_from_slice(&0u32.to_le_bytes());
        m.extend_from_slice(&0u32.to_le_bytes());
        m.extend_from_slice(body);
        self.id = self.id.wrapping_add(1);
        self.s.write_all(&m).unwrap();
        let mut h = [0u8; HDR];
        self.s.read_exact(&mut h).unwrap();
        let size = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
        let flags = u32::from_le_bytes(h[8..12].try_into().unwrap());
        let mut rest = vec![0u8; size.saturating_sub(HDR)];
        self.s.read_exact(&mut rest).unwrap();
        (flags, rest)
    }

    fn dma_map_no_fd(&mut self, iova: u64, size: u64) -> bool {
        let mut b = Vec::new();
        b.extend_from_slice(&32u32.to_le_bytes()); // argsz
        b.extend_from_slice(&3u32.to_le_bytes()); // READ | WRITE
        b.extend_from_slice(&0u64.to_le_bytes()); // offset
        b.extend_from_slice(&iova.to_le_bytes());
        b.extend_from_slice(&size.to_le_bytes());
        self.call(2, &b).0 & REPLY_ERROR == 0
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> bool {
        let mut b = Vec::new();
        b.extend_from_slice(&24u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&iova.to_le_bytes());
        b.extend_from_slice(&size.to_le_bytes());
        self.call(3, &b).0 & REPLY_ERROR == 0
    }

    fn config_read32(&mut self, off: u64) -> u32 {
        let mut b = Vec::new();
        b.extend_from_slice(&off.to_le_bytes());
        b.extend_from_slice(&7u32.to_le_bytes()); // config region
        b.extend_from_slice(&4u32.to_le_bytes());
        let (flags, r) = self.call(9, &b);
        assert_eq!(flags & REPLY_ERROR, 0);
        u32::from_le_bytes(r[16..20].try_into().unwrap())
    }
}

#[test]
fn dma_map_without_fd_is_accepted_and_skipped() {
    let _shared = crate::common::shared();
    let server = serve_process();
    let mut raw = Raw::connect(server.socket());
    // QEMU's ROM/VGA/PAM ranges: no fd; mapped, unmapped and mapped again.
    for _ in 0..3 {
        assert!(raw.dma_map_no_fd(0xc0000, 0x20000));
        assert!(raw.dma_map_no_fd(0xe0000, 0x20000));
        assert!(raw.dma_unmap(0xc0000, 0x20000));
        assert!(raw.dma_unmap(0xe0000, 0x20000));
    }
    assert!(raw.dma_map_no_fd(0xc0000, 0x20000));
    assert!(
        !raw.dma_map_no_fd(0xd0000, 0x1000),
        "overlapping map refused"
    );
    // Guest mistakes are answered: a read past the config space and of a region that does
    // not exist still get a reply, and the connection goes on.
    assert_eq!(raw.config_read32(0) & 0xffff, 0x15ad);
    assert_eq!(raw.config_read32(0x1000), 0xffff_ffff);
    drop(raw);
    // The device is unaffected: a normal client probes it.
    let (_t, drv) = probed_over(&server);
    assert_eq!(drv.version, 20);
}

#[test]
fn sigterm_exits_zero_and_removes_the_socket() {
    let _shared = crate::common::shared();
    let mut server = serve_process();
    {
        let (_t, _drv) = probed_over(&server);
    }
    let sock = server.socket().to_path_buf();
    let st = server.terminate(Duration::from_secs(10)).unwrap();
    assert!(st.success(), "exit status {st}");
    assert!(!sock.exists(), "socket removed");
}

#[test]
fn sigterm_with_a_client_connected_exits_zero() {
    let _shared = crate::common::shared();
    let mut server = serve_process();
    let (_t, drv) = probed_over(&server);
    let st = server.terminate(Duration::from_secs(10)).unwrap();
    assert!(st.success(), "exit status {st}");
    drop(drv);
}

/// A VERSION message shorter than its fixed part, or with JSON and no NUL (each panicked the
/// `vfio_user` crate's server, which ended the whole process), costs its sender an error reply
/// or its connection and nothing else: the process lives, a client of another device of the same
/// process goes on as if nothing happened, and the attacked socket serves the next client.
#[test]
fn a_malformed_version_costs_its_sender_the_connection_only() {
    let _shared = crate::common::shared();
    let macs = [MAC, [0x00, 0x50, 0x56, 0x12, 0x34, 0x57]];
    let mut server = pvrdma_guest::vfio::ServeProcess::spawn_devices(
        std::path::Path::new(env!("CARGO_BIN_EXE_pvrdma")),
        &macs,
        &["--workers", "1"],
    )
    .expect("pvrdma serve starts");
    let other = Arc::new(pvrdma_guest::vfio::VfioUser::connect(&server.sockets()[1]).unwrap());
    let other_drv = Driver::probe(other.clone() as Arc<dyn Transport>).expect("probe");
    // VERSION: header (id, command 1, size, flags 0, error 0), then major/minor and JSON.
    let version = |size: u32, json: &[u8]| {
        let mut m = Vec::new();
        m.extend_from_slice(&0u16.to_le_bytes());
        m.extend_from_slice(&1u16.to_le_bytes());
        m.extend_from_slice(&size.to_le_bytes());
        m.extend_from_slice(&[0u8; 8]);
        m.extend_from_slice(&[0, 0, 1, 0]);
        m.extend_from_slice(json);
        m
    };
    let json = b"{\"capabilities\":{}}";
    for bad in [version(16, b""), version(20 + json.len() as u32, json)] {
        let mut s = UnixStream::connect(&server.sockets()[0]).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(&bad).unwrap();
        let mut hdr = [0u8; 16];
        // An error reply, or the connection ends (EOF or reset).
        match s.read_exact(&mut hdr) {
            Ok(()) => {
                let flags = u32::from_le_bytes(hdr[8..12].try_into().unwrap());
                assert_ne!(flags & (1 << 5), 0, "an error reply: {hdr:?}");
            }
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}"),
        }
        assert!(
            server.try_wait().unwrap().is_none(),
            "pvrdma serve is alive"
        );
        // The neighbour's device still answers, commands and data path alike.
        assert_eq!(other_drv.query_port(1).unwrap().state, 4);
    }
    let k = ib_register(&other_drv, macs[1]).expect("the neighbour registers");
    assert_eq!(k.gsi.qpn, 1);
    // The attacked socket serves the next, well-behaved client.
    let (_t, drv) = probed_over_socket(&server.sockets()[0]);
    assert_eq!(drv.query_port(1).unwrap().state, 4);
}

fn probed_over_socket(p: &std::path::Path) -> (Arc<pvrdma_guest::vfio::VfioUser>, Driver) {
    let t = Arc::new(pvrdma_guest::vfio::VfioUser::connect(p).expect("connect"));
    let drv = Driver::probe(t.clone() as Arc<dyn Transport>).expect("probe");
    (t, drv)
}

/// A VM that starts later gets its device without a restart: `pvrdma serve --config FILE`
/// re-reads the file on SIGHUP, starts the devices added to it and stops the ones taken out
/// (closing their client's connection), while the device of the command line serves on.
#[test]
fn sighup_adds_and_removes_the_devices_of_the_config_file() {
    let _shared = crate::common::shared();
    let dir = std::env::temp_dir().join(format!("pvrdma-reload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("devices.toml");
    let device = |name: &str, last: u8| {
        format!(
            "[[device]]\nsocket = \"{}\"\nmac = \"52:54:00:00:10:{last:02x}\"\n",
            dir.join(format!("{name}.sock")).display()
        )
    };
    std::fs::write(&conf, device("b", 2)).unwrap();
    let conf_arg = conf.display().to_string();
    let mut server = pvrdma_guest::vfio::ServeProcess::spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_pvrdma")),
        &[
            "--mac",
            "52:54:00:00:10:01",
            "--workers",
            "1",
            "--config",
            &conf_arg,
        ],
    )
    .expect("pvrdma serve starts");
    let wait_for = |p: &std::path::Path, present: bool| {
        let t = std::time::Instant::now();
        while p.exists() != present {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{} present: {present}",
                p.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let (b_sock, c_sock) = (dir.join("b.sock"), dir.join("c.sock"));
    wait_for(&b_sock, true);
    let (_ta, a) = probed_over_socket(server.socket());
    let (tb, b) = probed_over_socket(&b_sock);
    let hup = |pid: u32| {
        let st = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    };
    // c joins.
    std::fs::write(&conf, device("b", 2) + &device("c", 3)).unwrap();
    hup(server.pid());
    wait_for(&c_sock, true);
    let (_tc, c) = probed_over_socket(&c_sock);
    let k = ib_register(&c, [0x52, 0x54, 0, 0, 0x10, 3]).expect("c registers");
    assert_eq!(k.gsi.qpn, 1);
    // b leaves: its socket goes, and its client's next access fails.
    std::fs::write(&conf, device("c", 3)).unwrap();
    hup(server.pid());
    wait_for(&b_sock, false);
    let mut v = [0u8; 4];
    let t = std::time::Instant::now();
    loop {
        let r = tb.with_client(|cl| cl.region_read(1, 0, &mut v));
        if r.is_err() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "b's connection still open"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A file that does not parse changes nothing.
    std::fs::write(&conf, "[[device]\n").unwrap();
    hup(server.pid());
    std::thread::sleep(Duration::from_millis(300));
    assert!(c_sock.exists());
    // The others never noticed.
    assert_eq!(a.query_port(1).unwrap().state, 4);
    assert_eq!(c.query_port(1).unwrap().state, 4);
    drop(b);
    assert!(
        server.try_wait().unwrap().is_none(),
        "pvrdma serve is alive"
    );
    let st = server.terminate(Duration::from_secs(20)).unwrap();
    assert!(st.success(), "{st}");
    let _ = std::fs::remove_dir_all(&dir);
}
