//! The vfio-user server's message layer as a whole byte stream: the input is what a client
//! writes on the socket (framing, headers, bodies, all of it), fed to
//! `pvrdma_vfio_user::protocol::serve_connection` over a socket pair with a device on this
//! thread (`Connection::new_local`). Invariants: no panic, no hang (the input ends with EOF, and
//! the connection must end), no allocation beyond the message bound.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use pvrdma_fuzz::{local_connection, small_cfg};
use pvrdma_vfio_user::protocol::{serve_connection, DeviceLayout};
use pvrdma_vfio_user::regions::{server_irqs, server_regions};

fuzz_target!(|data: &[u8]| {
    let cfg = small_cfg();
    let mut conn = local_connection();
    let (mut client, mut server) = UnixStream::pair().expect("socketpair");
    // The client writes everything and reads every reply on its own thread, so that neither
    // side's socket buffer can fill up and stall the other.
    let input = data.to_vec();
    let peer = std::thread::spawn(move || {
        let _ = client.write_all(&input);
        let _ = client.shutdown(std::net::Shutdown::Write);
        let mut sink = [0u8; 65536];
        while let Ok(n) = client.read(&mut sink) {
            if n == 0 {
                break;
            }
        }
    });
    let (regions, irqs) = (server_regions(cfg.max_uar), server_irqs());
    let layout = DeviceLayout {
        regions: &regions,
        irqs: &irqs,
        resettable: true,
    };
    let _ = serve_connection(&mut server, &mut conn, layout);
    drop(server);
    peer.join().expect("client thread");
    conn.shutdown();
});
