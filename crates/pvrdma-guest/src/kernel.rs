//! What the kernel's ib core and ib_mad do right after `ib_register_device` (spec §1 step 19 and
//! §11): query the port and P_Key, add the default GID, then set up the GSI QP with 512 receives.

use pvrdma_dev::abi::WireSge;

use crate::driver::{ud_attrs, Cq, Ctx, Driver, Mr, Qp, QpKind, Result};

/// The objects ib_mad leaves behind on port 1.
#[derive(Debug)]
pub struct KernelSetup {
    /// The kernel PD.
    pub pd: u32,
    /// Its DMA MR (`pd->local_dma_lkey`).
    pub dma_mr: Mr,
    /// The MAD CQ (640 entries rounded to 1024).
    pub cq: Cq,
    /// The GSI QP (qpn 1).
    pub gsi: Qp,
    /// The default GID (`fe80::` + EUI-64 of the MAC).
    pub gid: [u8; 16],
}

/// Receive buffer of a MAD: 40-byte GRH + 256-byte MAD.
pub const MAD_BUF: u32 = 40 + 256;

/// Runs the registration sequence for a device whose paired netdev has `mac`.
pub fn ib_register(drv: &Driver, mac: [u8; 6]) -> Result<KernelSetup> {
    let port = drv.query_port(1)?;
    assert!(port.gid_tbl_len <= drv.caps.gid_tbl_len);
    let _pkey = drv.query_pkey(1, 0)?;
    let gid = rdma_backend::Gid::from_mac(mac).0;
    drv.create_bind(0, gid, 1)?;
    let pd = drv.create_pd(Ctx::KERNEL)?;
    let dma_mr = drv.dma_mr(pd)?;
    let mut cq = drv.create_cq(Ctx::KERNEL, 1024)?;
    let mut gsi = drv.create_qp(
        Ctx::KERNEL,
        QpKind::Gsi,
        pd,
        &cq,
        &cq,
        None,
        (128, 512, 2, 1),
        false,
    )?;
    for m in ud_attrs(0x8001_0000) {
        drv.modify_qp(&gsi, m)?;
    }
    drv.arm_cq(&cq, false);
    let bufs = drv
        .alloc
        .contiguous(drv.mem(), (512 * u64::from(MAD_BUF)).div_ceil(4096));
    for i in 0..512u64 {
        let sge = WireSge {
            addr: bufs.0 + i * u64::from(MAD_BUF),
            length: MAD_BUF,
            lkey: dma_mr.lkey,
        };
        assert!(
            drv.post_recv(&mut gsi, i, &[sge]),
            "GSI RQ has room for 512"
        );
    }
    let _ = &mut cq;
    Ok(KernelSetup {
        pd,
        dma_mr,
        cq,
        gsi,
        gid,
    })
}
