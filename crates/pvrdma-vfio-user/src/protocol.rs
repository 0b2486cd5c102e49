//! The server side of the vfio-user protocol: framing, every message the device answers, and
//! the bounds that make a hostile client cost only its own connection.
//!
//! Owned here rather than taken from the `vfio_user` crate's `Server`, whose message loop trusts
//! the client: a VERSION shorter than its fixed part or without a NUL panics it, and a
//! REGION_READ/WRITE allocates the `count` the client names (up to 4 GiB) before any check. The
//! crate's types (`ServerBackend`, `ServerRegion`, `IrqInfo`, the DMA flags) are still used, and
//! its `Client` drives the tests.
//!
//! Rules:
//! - Framing errors (a message shorter than its header or longer than [`MAX_MESSAGE`], a reply
//!   where a command belongs, a read error) close the connection: the stream cannot be trusted
//!   to be in step any more.
//! - Anything else wrong with a message (an unknown command, a field out of range, a body of the
//!   wrong size, a backend refusal) gets an error reply (`EINVAL`, `ENOSYS`, or the backend's
//!   errno) and the connection goes on.
//! - One message costs at most [`MAX_MESSAGE`] bytes of buffer, kept for the connection.
//! - A message with the NO_REPLY flag is never answered, not even with an error.

use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::size_of;
use std::os::unix::net::UnixStream;

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_SET_DATA_BOOL,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, ServerBackend, ServerRegion};
use vm_memory::ByteValued;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Largest region access the server takes in one message, advertised as `max_data_xfer_size`
/// (the protocol's default; QEMU splits larger accesses).
pub const MAX_DATA_XFER: u32 = 1 << 20;

/// Largest message the server reads: a region access header and [`MAX_DATA_XFER`] bytes, with
/// room for the largest fixed-size request.
pub const MAX_MESSAGE: usize = HEADER + 64 + MAX_DATA_XFER as usize;

/// Largest VERSION body (major, minor and the capabilities JSON).
const MAX_VERSION_BODY: usize = 4096;

const HEADER: usize = size_of::<Header>();

/// The command numbers of the protocol.
mod cmd {
    pub const VERSION: u16 = 1;
    pub const DMA_MAP: u16 = 2;
    pub const DMA_UNMAP: u16 = 3;
    pub const DEVICE_GET_INFO: u16 = 4;
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    pub const DEVICE_GET_IRQ_INFO: u16 = 7;
    pub const DEVICE_SET_IRQS: u16 = 8;
    pub const REGION_READ: u16 = 9;
    pub const REGION_WRITE: u16 = 10;
    pub const DEVICE_RESET: u16 = 13;
}

/// `flags` of the header.
mod flags {
    /// The message type (bits 0-3): 0 command, 1 reply.
    pub const TYPE_MASK: u32 = 0xf;
    pub const REPLY: u32 = 1;
    pub const NO_REPLY: u32 = 1 << 4;
    pub const ERROR: u32 = 1 << 5;
}

/// The header of every message.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct Header {
    message_id: u16,
    command: u16,
    message_size: u32,
    flags: u32,
    error: u32,
}

/// DMA_MAP body.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    offset: u64,
    address: u64,
    size: u64,
}

/// DMA_UNMAP body (and reply).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct DmaUnmap {
    argsz: u32,
    flags: u32,
    address: u64,
    size: u64,
}

/// DEVICE_GET_INFO reply body.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct DeviceInfo {
    argsz: u32,
    flags: u32,
    num_regions: u32,
    num_irqs: u32,
}

/// DEVICE_GET_REGION_INFO body (and reply): `struct vfio_region_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct RegionInfo {
    argsz: u32,
    flags: u32,
    index: u32,
    cap_offset: u32,
    size: u64,
    offset: u64,
}

/// DEVICE_GET_IRQ_INFO body (and reply).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct IrqInfoMsg {
    argsz: u32,
    flags: u32,
    index: u32,
    count: u32,
}

/// DEVICE_SET_IRQS body (any data follows it).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct SetIrqs {
    argsz: u32,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
}

/// REGION_READ/WRITE body (the data of a write, or of a read's reply, follows it).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct RegionAccess {
    offset: u64,
    region: u32,
    count: u32,
}

// SAFETY: all of these are `repr(C)` structs of integers without padding holes that matter
// (every bit pattern is a valid value), as `ByteValued` requires.
unsafe impl ByteValued for Header {}
// SAFETY: as above.
unsafe impl ByteValued for DmaMap {}
// SAFETY: as above.
unsafe impl ByteValued for DmaUnmap {}
// SAFETY: as above.
unsafe impl ByteValued for DeviceInfo {}
// SAFETY: as above.
unsafe impl ByteValued for RegionInfo {}
// SAFETY: as above.
unsafe impl ByteValued for IrqInfoMsg {}
// SAFETY: as above.
unsafe impl ByteValued for SetIrqs {}
// SAFETY: as above.
unsafe impl ByteValued for RegionAccess {}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the socket failed.
    #[error("socket I/O failed")]
    Io(#[from] io::Error),
    /// The client broke the framing; the connection is closed.
    #[error("malformed message: {0}")]
    Framing(String),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Why one message is refused (an error reply; the connection goes on).
enum Refuse {
    /// `EINVAL`: a field out of range or a body of the wrong size.
    Invalid,
    /// `ENOSYS`: a command this server does not implement.
    Unsupported,
    /// The backend's error.
    Backend(io::Error),
}

impl Refuse {
    fn errno(&self) -> u32 {
        match self {
            Refuse::Invalid => libc::EINVAL as u32,
            Refuse::Unsupported => libc::ENOSYS as u32,
            Refuse::Backend(e) => e.raw_os_error().unwrap_or(libc::EIO) as u32,
        }
    }
}

/// What the server tells the client about the device.
#[derive(Clone, Copy)]
pub struct DeviceLayout<'a> {
    /// The regions, index = position.
    pub regions: &'a [ServerRegion],
    /// The interrupt indexes, index = position.
    pub irqs: &'a [IrqInfo],
    /// Whether DEVICE_RESET is offered.
    pub resettable: bool,
}

impl std::fmt::Debug for DeviceLayout<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceLayout")
            .field("regions", &self.regions.len())
            .field("irqs", &self.irqs)
            .field("resettable", &self.resettable)
            .finish()
    }
}

/// Reads one `T` from the front of `body`, if it is long enough.
fn take<T: ByteValued + Default>(body: &[u8]) -> Option<T> {
    let mut v = T::default();
    let n = size_of::<T>();
    v.as_mut_slice().copy_from_slice(body.get(..n)?);
    Some(v)
}

/// One connection: reads messages until the client closes it (`Ok`), breaks the framing or the
/// socket fails (`Err`); each message is handed to `backend` and answered.
pub fn serve_connection(
    stream: &mut UnixStream,
    backend: &mut dyn ServerBackend,
    layout: DeviceLayout<'_>,
) -> Result<()> {
    let mut body = Vec::new();
    // The reply is built in place behind room for its header: one buffer, one write.
    let mut out = Vec::new();
    loop {
        let mut hdr = Header::default();
        // The fd (at most one: the server advertises `max_msg_fds` 1) comes with the first
        // bytes of its message.
        let (n, fd) = stream
            .recv_with_fd(hdr.as_mut_slice())
            .map_err(io::Error::from)?;
        if n == 0 {
            return Ok(());
        }
        if n < HEADER {
            stream.read_exact(&mut hdr.as_mut_slice()[n..])?;
        }
        let size = hdr.message_size as usize;
        if !(HEADER..=MAX_MESSAGE).contains(&size) {
            return Err(Error::Framing(format!(
                "command {} of {size} bytes (at least {HEADER}, at most {MAX_MESSAGE})",
                hdr.command
            )));
        }
        if hdr.flags & flags::TYPE_MASK != 0 {
            return Err(Error::Framing(format!(
                "a reply (flags {:#x}) where a command belongs",
                hdr.flags
            )));
        }
        body.resize(size - HEADER, 0);
        stream.read_exact(&mut body)?;
        out.clear();
        out.resize(HEADER, 0);
        let reply = handle(&hdr, &body, fd, backend, layout, &mut out);
        if hdr.flags & flags::NO_REPLY != 0 {
            continue;
        }
        let mut rh = Header {
            message_id: hdr.message_id,
            command: hdr.command,
            message_size: 0,
            flags: flags::REPLY,
            error: 0,
        };
        if let Err(r) = reply {
            rh.flags |= flags::ERROR;
            rh.error = r.errno();
            out.truncate(HEADER);
            // Debug, not warn: a client could otherwise write log lines as fast as it sends.
            if let Refuse::Backend(e) = &r {
                log::debug!("command {}: {e}", hdr.command);
            }
        }
        rh.message_size = out.len() as u32;
        out[..HEADER].copy_from_slice(rh.as_slice());
        stream.write_all(&out)?;
    }
}

/// Handles one command, appending its reply body to `out` (the caller writes the header in
/// front of it).
fn handle(
    hdr: &Header,
    body: &[u8],
    fd: Option<File>,
    backend: &mut dyn ServerBackend,
    layout: DeviceLayout<'_>,
    out: &mut Vec<u8>,
) -> std::result::Result<(), Refuse> {
    let exact = |n: usize| {
        if body.len() == n {
            Ok(())
        } else {
            Err(Refuse::Invalid)
        }
    };
    match hdr.command {
        cmd::VERSION => {
            if body.len() < 4 || body.len() > MAX_VERSION_BODY {
                return Err(Refuse::Invalid);
            }
            let major = u16::from_le_bytes([body[0], body[1]]);
            // The capabilities are a NUL-terminated JSON string (absent: the defaults).
            if major != 0 || (body.len() > 4 && body.last() != Some(&0)) {
                return Err(Refuse::Invalid);
            }
            log::debug!(
                "client version 0.{}: {}",
                u16::from_le_bytes([body[2], body[3]]),
                String::from_utf8_lossy(&body[4..]).trim_end_matches('\0')
            );
            let caps = format!(
                "{{\"capabilities\":{{\"max_msg_fds\":1,\"max_data_xfer_size\":{MAX_DATA_XFER},\
                 \"migration\":{{\"pgsize\":4096}}}}}}"
            );
            out.extend_from_slice(&[0, 0, 0, 0]); // major 0, minor 0
            out.extend_from_slice(caps.as_bytes());
            out.push(0);
            Ok(())
        }
        cmd::DMA_MAP => {
            let m: DmaMap = take(body).ok_or(Refuse::Invalid)?;
            exact(size_of::<DmaMap>())?;
            backend
                .dma_map(
                    DmaMapFlags::from_bits_truncate(m.flags),
                    m.offset,
                    m.address,
                    m.size,
                    fd,
                )
                .map_err(Refuse::Backend)?;
            Ok(())
        }
        cmd::DMA_UNMAP => {
            let u: DmaUnmap = take(body).ok_or(Refuse::Invalid)?;
            exact(size_of::<DmaUnmap>())?;
            backend
                .dma_unmap(
                    DmaUnmapFlags::from_bits_truncate(u.flags),
                    u.address,
                    u.size,
                )
                .map_err(Refuse::Backend)?;
            out.extend_from_slice(u.as_slice());
            Ok(())
        }
        cmd::DEVICE_GET_INFO => {
            let info = DeviceInfo {
                argsz: size_of::<DeviceInfo>() as u32,
                flags: VFIO_DEVICE_FLAGS_PCI
                    | if layout.resettable {
                        VFIO_DEVICE_FLAGS_RESET
                    } else {
                        0
                    },
                num_regions: layout.regions.len() as u32,
                num_irqs: layout.irqs.len() as u32,
            };
            out.extend_from_slice(info.as_slice());
            Ok(())
        }
        cmd::DEVICE_GET_REGION_INFO => {
            let q: RegionInfo = take(body).ok_or(Refuse::Invalid)?;
            let r = layout
                .regions
                .get(q.index as usize)
                .ok_or(Refuse::Invalid)?
                .region_info;
            // No region has capabilities (nothing is mmappable): the fixed part only.
            let info = RegionInfo {
                argsz: size_of::<RegionInfo>() as u32,
                flags: r.flags,
                index: r.index,
                cap_offset: 0,
                size: r.size,
                offset: r.offset,
            };
            out.extend_from_slice(info.as_slice());
            Ok(())
        }
        cmd::DEVICE_GET_IRQ_INFO => {
            let q: IrqInfoMsg = take(body).ok_or(Refuse::Invalid)?;
            let irq = layout.irqs.get(q.index as usize).ok_or(Refuse::Invalid)?;
            let info = IrqInfoMsg {
                argsz: size_of::<IrqInfoMsg>() as u32,
                flags: irq.flags,
                index: irq.index,
                count: irq.count,
            };
            out.extend_from_slice(info.as_slice());
            Ok(())
        }
        cmd::DEVICE_SET_IRQS => {
            let s: SetIrqs = take(body).ok_or(Refuse::Invalid)?;
            if s.index as usize >= layout.irqs.len() || s.flags & VFIO_IRQ_SET_DATA_BOOL != 0 {
                return Err(Refuse::Invalid);
            }
            backend
                .set_irqs(s.index, s.flags, s.start, s.count, fd.into_iter().collect())
                .map_err(Refuse::Backend)?;
            Ok(())
        }
        cmd::REGION_READ => {
            let a: RegionAccess = take(body).ok_or(Refuse::Invalid)?;
            exact(size_of::<RegionAccess>())?;
            if a.count > MAX_DATA_XFER || a.region as usize >= layout.regions.len() {
                return Err(Refuse::Invalid);
            }
            out.extend_from_slice(a.as_slice());
            let at = out.len();
            out.resize(at + a.count as usize, 0);
            backend
                .region_read(a.region, a.offset, &mut out[at..])
                .map_err(Refuse::Backend)?;
            Ok(())
        }
        cmd::REGION_WRITE => {
            let a: RegionAccess = take(body).ok_or(Refuse::Invalid)?;
            let data = &body[size_of::<RegionAccess>()..];
            if data.len() != a.count as usize || a.region as usize >= layout.regions.len() {
                return Err(Refuse::Invalid);
            }
            backend
                .region_write(a.region, a.offset, data)
                .map_err(Refuse::Backend)?;
            out.extend_from_slice(a.as_slice());
            Ok(())
        }
        cmd::DEVICE_RESET => {
            if !layout.resettable {
                return Err(Refuse::Unsupported);
            }
            backend.reset().map_err(Refuse::Backend)?;
            Ok(())
        }
        other => {
            log::debug!("command {other}: not supported");
            Err(Refuse::Unsupported)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regions::{server_irqs, server_regions};
    use crate::Connection;
    use pvrdma_dev::DeviceConfig;
    use rdma_backend::emulated::Fabric;

    fn msg(id: u16, command: u16, fl: u32, body: &[u8]) -> Vec<u8> {
        let h = Header {
            message_id: id,
            command,
            message_size: (HEADER + body.len()) as u32,
            flags: fl,
            error: 0,
        };
        let mut m = h.as_slice().to_vec();
        m.extend_from_slice(body);
        m
    }

    /// Feeds `input` to a server on a fresh local device, closes the sending side, and returns
    /// what the server answered and how the connection ended.
    fn exchange(input: &[u8]) -> (Vec<(Header, Vec<u8>)>, Result<()>) {
        let (mut client, mut server) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let cfg = DeviceConfig::default();
            let mut conn = Connection::new_local(
                &cfg,
                "t".into(),
                &Fabric::new(),
                &crate::BackendChoice::Emulated,
            )
            .unwrap();
            let (regions, irqs) = (server_regions(cfg.max_uar), server_irqs());
            let layout = DeviceLayout {
                regions: &regions,
                irqs: &irqs,
                resettable: true,
            };
            let r = serve_connection(&mut server, &mut conn, layout);
            conn.shutdown();
            r
        });
        // The server may close before it read everything (a framing error): then writes fail
        // and reads end with a reset; what it answered before is still read.
        let _ = client.write_all(input);
        let _ = client.shutdown(std::net::Shutdown::Write);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = client.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        let mut replies = Vec::new();
        let mut at = 0;
        while at + HEADER <= out.len() {
            let h: Header = take(&out[at..]).unwrap();
            let end = at + h.message_size as usize;
            replies.push((h, out[at + HEADER..end].to_vec()));
            at = end;
        }
        (replies, t.join().unwrap())
    }

    fn access(region: u32, offset: u64, count: u32) -> Vec<u8> {
        RegionAccess {
            offset,
            region,
            count,
        }
        .as_slice()
        .to_vec()
    }

    #[test]
    fn each_command_is_answered_in_order() {
        let mut input = msg(1, cmd::VERSION, 0, b"\0\0\x01\0{\"capabilities\":{}}\0");
        input.extend(msg(2, cmd::DEVICE_GET_INFO, 0, &[0; 16]));
        let q = RegionInfo {
            argsz: 32,
            index: 7,
            ..Default::default()
        };
        input.extend(msg(3, cmd::DEVICE_GET_REGION_INFO, 0, q.as_slice()));
        let q = IrqInfoMsg {
            argsz: 16,
            index: 2,
            ..Default::default()
        };
        input.extend(msg(4, cmd::DEVICE_GET_IRQ_INFO, 0, q.as_slice()));
        input.extend(msg(5, cmd::REGION_READ, 0, &access(7, 0, 4)));
        let mut w = access(1, 0x0c, 4); // IMR
        w.extend_from_slice(&0u32.to_le_bytes());
        input.extend(msg(6, cmd::REGION_WRITE, 0, &w));
        input.extend(msg(7, cmd::REGION_WRITE, flags::NO_REPLY, &w));
        input.extend(msg(8, cmd::DEVICE_RESET, 0, &[]));
        input.extend(msg(9, 99, 0, &[1, 2, 3]));
        input.extend(msg(10, cmd::DEVICE_SET_IRQS, 0, &[0; 4]));
        let (r, end) = exchange(&input);
        assert!(end.is_ok(), "{end:?}");
        let ids: Vec<u16> = r.iter().map(|(h, _)| h.message_id).collect();
        assert_eq!(
            ids,
            [1, 2, 3, 4, 5, 6, 8, 9, 10],
            "NO_REPLY is not answered"
        );
        assert!(r
            .iter()
            .all(|(h, _)| h.flags & flags::TYPE_MASK == flags::REPLY));
        assert!(r[0].1.ends_with(b"}\0") && r[0].1[..2] == [0, 0]);
        let info: DeviceInfo = take(&r[1].1).unwrap();
        assert_eq!((info.num_regions, info.num_irqs), (9, 5));
        let ri: RegionInfo = take(&r[2].1).unwrap();
        assert_eq!((ri.index, ri.size), (7, 256));
        let ii: IrqInfoMsg = take(&r[3].1).unwrap();
        assert_eq!((ii.index, ii.count), (2, 3));
        assert_eq!(
            r[4].1[16..],
            [0xad, 0x15, 0x20, 0x08],
            "vendor and device id"
        );
        assert_eq!(r[5].1.len(), 16);
        assert_eq!(r[6].0.flags & flags::ERROR, 0, "reset");
        assert_eq!(
            (r[7].0.flags & flags::ERROR, r[7].0.error),
            (flags::ERROR, libc::ENOSYS as u32)
        );
        assert_eq!(r[8].0.error, libc::EINVAL as u32, "SET_IRQS body too short");
    }

    /// A count or size a client names is checked before anything is allocated for it: an
    /// access beyond `MAX_DATA_XFER` gets EINVAL, a message beyond `MAX_MESSAGE` (or shorter
    /// than its header) ends the connection, and so does a reply where a command belongs.
    #[test]
    fn client_sized_counts_are_bounded_before_allocation() {
        for count in [MAX_DATA_XFER + 1, u32::MAX] {
            let (r, end) = exchange(&msg(1, cmd::REGION_READ, 0, &access(1, 0, count)));
            assert!(end.is_ok());
            assert_eq!((r.len(), r[0].0.error), (1, libc::EINVAL as u32), "{count}");
        }
        // A write whose data is not `count` bytes.
        let mut w = access(1, 0, 1 << 30);
        w.extend_from_slice(&[0; 8]);
        let (r, _) = exchange(&msg(1, cmd::REGION_WRITE, 0, &w));
        assert_eq!(r[0].0.error, libc::EINVAL as u32);
        for size in [0u32, 15, MAX_MESSAGE as u32 + 1, u32::MAX] {
            let mut m = msg(1, cmd::REGION_WRITE, 0, &[]);
            m[4..8].copy_from_slice(&size.to_le_bytes());
            let (r, end) = exchange(&m);
            assert!(
                r.is_empty() && matches!(end, Err(Error::Framing(_))),
                "{size}"
            );
        }
        let (r, end) = exchange(&msg(1, cmd::VERSION, flags::REPLY, &[0; 4]));
        assert!(r.is_empty() && matches!(end, Err(Error::Framing(_))));
    }

    /// Any byte sequence: the server answers or ends the connection, never panics or hangs.
    #[test]
    fn garbage_streams_end_cleanly() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..200 {
            let mut input = Vec::new();
            for _ in 0..(next() % 8) {
                // Mostly well-framed messages of random commands and bodies, some raw noise.
                let body: Vec<u8> = (0..next() % 48).map(|_| next() as u8).collect();
                let mut m = msg(round, (next() % 16) as u16, (next() % 64) as u32, &body);
                if next() % 5 == 0 {
                    let i = (next() as usize) % m.len();
                    m[i] = next() as u8;
                }
                input.extend(m);
            }
            let (_, end) = exchange(&input);
            if let Err(e) = end {
                assert!(matches!(e, Error::Framing(_) | Error::Io(_)), "{e}");
            }
        }
    }
}
