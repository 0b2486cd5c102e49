//! The emulated GSI QP (QP1) and address handles: a host UD QP with a reserved Q_Key per guest
//! GID, published in a process-wide table; guest GID indices and address vectors on the host.

use super::*;
use crate::NetworkHeader;

/// Q_Key of the host UD QPs that stand in for guest GSI QPs (QP1). Not IB's GSI Q_Key
/// 0x80010000: Q_Keys with bit 31 set are privileged (a host process needs CAP_NET_RAW to set one),
/// and only emulated QP1s use this one, so they receive from each other only.
pub(super) const GSI_HOST_QKEY: u32 = 0x5076_5131;

/// Emulated QP1s of this process: (host device, port, guest GID) → host QPN of the UD QP that
/// stands in for QP 1 at that GID. A GSI send to "QP 1 at GID g" goes to that QPN.
pub(super) static GSI_QPS: Mutex<BTreeMap<GsiKey, u32>> = Mutex::new(BTreeMap::new());

/// Host device, port, guest GID.
type GsiKey = (String, u8, [u8; 16]);

/// The Q_Key the host QP gets: the guest's, except for an emulated QP1.
pub(super) fn host_qkey(ty: QpType, guest: Option<u32>) -> u32 {
    if ty == QpType::Gsi {
        GSI_HOST_QKEY
    } else {
        guest.unwrap_or(0)
    }
}

impl Shared {
    pub(super) fn gsi_key(&self, gid: Gid) -> GsiKey {
        (self.cfg.ibdev.clone(), self.cfg.port, gid.0)
    }

    /// Publishes the guest's QP1 at `gid` (when it has a GSI QP).
    pub(super) fn gsi_register(&self, gid: Gid) {
        if let Some(qpn) = *lock(&self.gsi_qpn) {
            lock(&GSI_QPS).insert(self.gsi_key(gid), qpn);
        }
    }

    /// Withdraws the guest's QP1 at `gid`.
    pub(super) fn gsi_unregister(&self, gid: Gid) {
        if let Some(qpn) = *lock(&self.gsi_qpn) {
            let mut r = lock(&GSI_QPS);
            let k = self.gsi_key(gid);
            if r.get(&k) == Some(&qpn) {
                r.remove(&k);
            }
        }
    }

    /// Withdraws the guest's QP1 everywhere and forgets it.
    pub(super) fn gsi_drop(&self) {
        if let Some(qpn) = lock(&self.gsi_qpn).take() {
            lock(&GSI_QPS).retain(|(dev, port, _), v| {
                !(*v == qpn && *dev == self.cfg.ibdev && *port == self.cfg.port)
            });
        }
    }

    /// The datagram whose GRH slot is at `head`: the kind of its network header (an IPv6
    /// header with next header UDP is RoCE v2, an IPv4 header in the last 20 bytes RoCE v2 over
    /// IPv4, anything else an IB GRH), and whether its destination is one of the guest's GIDs
    /// (`true` too when the slot cannot be read: the guest then sees what arrived).
    pub(super) fn received_header(&self, head: &[(u64, usize)]) -> (NetworkHeader, bool) {
        let m = self.mem.memory();
        let mut g = [0u8; 40];
        let mut at = 0;
        for &(gpa, n) in head {
            if m.read_slice(&mut g[at..at + n], GuestAddress(gpa)).is_err() {
                return (NetworkHeader::Grh, true);
            }
            at += n;
        }
        if at < 40 {
            return (NetworkHeader::Grh, true);
        }
        let mut dgid = [0u8; 16];
        let kind = if g[20] >> 4 == 4 && g[0] >> 4 != 6 {
            dgid[10] = 0xff;
            dgid[11] = 0xff;
            dgid[12..].copy_from_slice(&g[36..40]);
            NetworkHeader::Ipv4
        } else {
            dgid.copy_from_slice(&g[24..40]);
            if g[6] == 17 {
                NetworkHeader::Ipv6
            } else {
                NetworkHeader::Grh
            }
        };
        let ours = read(&self.gids)
            .iter()
            .any(|e| e.is_some_and(|(gid, _, _)| gid.0 == dgid));
        (kind, ours)
    }

    /// Posts a UD receive whose datagram was not for the guest again.
    pub(super) fn repost_ud_recv(&self, qp: &QpEntry, p: Pending) {
        let Some(mut sges) = p.ud_recv.as_ref().map(|u| u.sges.clone()) else {
            return;
        };
        let mut pend = lock(&qp.pending);
        let slot = pend.put(p);
        if let Err(rc) = qp.qp.post_recv(slot | WR_RECV, &mut sges) {
            pend.take(slot);
            log::warn!("rdma-core: posting a UD receive again: errno {rc}");
        } else {
            // The completion decremented it; the receive is outstanding again.
            qp.host_recvs.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The host GID index of the guest's GID entry `guest_index`, if the guest bound it.
    fn host_gid_index(&self, guest_index: u8) -> Option<u8> {
        read(&self.gids)
            .get(usize::from(guest_index))
            .and_then(|g| g.map(|g| g.2))
    }

    /// The host address vector of `av`, and whether its source GID is one the guest bound
    /// (if not, the host's GID 0 stands in, for a WR that is only flushed: never sent).
    pub(super) fn host_av(&self, av: &crate::AddressVector) -> (verbs::HostAv, bool) {
        let sgid = self.host_gid_index(av.sgid_index);
        let hav = verbs::HostAv {
            dgid: av.dgid.0,
            sgid_index: sgid.unwrap_or(0),
            hop_limit: av.hop_limit,
            traffic_class: av.traffic_class,
            flow_label: av.flow_label,
            sl: av.sl,
            port: self.cfg.port,
        };
        (hav, sgid.is_some())
    }

    /// Where a UD or GSI send goes on the host: the address handle (cached per PD), the
    /// destination QPN and Q_Key, and whether the source GID index is bound (if not, the WR
    /// is never sent and completes in error).
    pub(super) fn ud_destination(
        &self,
        t: &Tables,
        e: &QpEntry,
        d: &crate::UdDest,
    ) -> Result<(Arc<verbs::Ah>, u32, u32, bool)> {
        let pde = t.pds.get(&e.pd.0).ok_or(Error::NoSuchObject("PD"))?;
        let (av, bound) = self.host_av(&d.av);
        let mut cache = lock(&pde.ahs);
        let ah = match cache.get(&av) {
            Some(a) => a.clone(),
            None => {
                let a = verbs::Ah::new(&pde.pd, av).map_err(host)?;
                if cache.len() >= MAX_CACHED_AHS {
                    cache.clear();
                }
                cache.insert(av, a.clone());
                a
            }
        };
        let (qpn, qkey) = if e.ty == QpType::Gsi {
            // MADs go from QP1 to QP1: to the emulated QP1 published at the destination GID;
            // with none there, to our own host QP with a Q_Key it drops, so the send still
            // completes in order and the datagram goes nowhere.
            let own = *lock(&self.gsi_qpn);
            let to = (d.remote_qpn == 1)
                .then(|| lock(&GSI_QPS).get(&self.gsi_key(d.av.dgid)).copied())
                .flatten();
            match (to, own) {
                (Some(q), _) => (q, GSI_HOST_QKEY),
                (None, Some(o)) => (o, !GSI_HOST_QKEY & 0x7fff_ffff),
                (None, None) => (e.qp.qp_num, !GSI_HOST_QKEY & 0x7fff_ffff),
            }
        } else if d.remote_qkey & 0x8000_0000 != 0 {
            (d.remote_qpn, lock(&e.attrs).qkey.unwrap_or(0))
        } else if d.remote_qkey == GSI_HOST_QKEY {
            // Only emulated QP1s hold this Q_Key (no guest UD QP may): a guest UD QP sending
            // with it could only pose as QP1. Send with another one instead, which cannot reach
            // an emulated QP1.
            (d.remote_qpn, GSI_HOST_QKEY ^ 1)
        } else {
            (d.remote_qpn, d.remote_qkey)
        };
        Ok((ah, qpn, qkey, bound))
    }
}
