//! The counters and the resource listing, as the main loop answers for them.

use super::*;
use crate::stats::{
    qp_state_name, qp_type_name, CqInfo, GidInfo, MrInfo, ObjectCounts, PdInfo, QpCounters, QpInfo,
    QpPeer, SrqInfo, UcInfo,
};

impl Core {
    /// The device's counters: the main loop's own, the data path's (summed over the QPs, live
    /// and gone), the live objects.
    pub(super) fn report(&self) -> DeviceStats {
        let o = &self.objects;
        let objects = ObjectCounts {
            pds: o.pds.len() as u64,
            mrs: o.mrs.len() as u64,
            cqs: o.cqs.len() as u64,
            qps: o.qps.len() as u64,
            srqs: o.srqs.len() as u64,
            ucs: o.ucs.len() as u64,
        };
        self.stats.report(&o.send_totals(), objects, o.host_mem())
    }

    /// The live objects, each with what the device knows of it.
    pub(super) fn resources(&self) -> Resources {
        let o = &self.objects;
        Resources {
            ucs: o
                .ucs
                .iter()
                .map(|(handle, u)| UcInfo {
                    handle,
                    uar_index: u.uar_index,
                })
                .collect(),
            pds: o
                .pds
                .iter()
                .map(|(handle, p)| PdInfo {
                    handle,
                    ctx: p.ctx,
                    users: p.refs,
                })
                .collect(),
            mrs: o
                .mrs
                .iter()
                .map(|(handle, m)| MrInfo {
                    handle,
                    pd: m.pd,
                    lkey: m.lkey,
                    rkey: m.rkey,
                    length: m.length,
                    iova: m.iova,
                    access: m.access,
                    kind: m.kind.to_string(),
                    pages: m.pages,
                })
                .collect(),
            cqs: o
                .cqs
                .iter()
                .map(|(handle, c)| CqInfo {
                    handle,
                    ctx: c.ctx,
                    size: c.cqe,
                    users: c.refs,
                    cqes: c.cqes,
                    overflows: c.overflows,
                })
                .collect(),
            qps: o.qps.iter().map(|(h, q)| self.qp_info(h, q)).collect(),
            srqs: o
                .srqs
                .iter()
                .map(|(handle, s)| SrqInfo {
                    handle,
                    pd: s.pd,
                    max_wr: s.attrs.max_wr,
                    max_sge: s.attrs.max_sge,
                    limit: s.attrs.srq_limit,
                    users: s.refs,
                })
                .collect(),
            gids: o
                .gids
                .iter()
                .enumerate()
                .filter_map(|(index, g)| {
                    let (gid, ty) = (*g)?;
                    Some(GidInfo {
                        index: index as u32,
                        gid: std::net::Ipv6Addr::from(gid).to_string(),
                        gid_type: if ty == 2 { "RoCEv2" } else { "RoCEv1" }.into(),
                    })
                })
                .collect(),
        }
    }

    fn qp_info(&self, handle: u32, q: &crate::objects::Qp) -> QpInfo {
        let b = q.backend();
        // The backend's state: it moves a QP to ERR by itself (a failed WR, a flush).
        let state = self
            .env
            .backend
            .query_qp_state(b)
            .ok()
            .or_else(|| QpState::from_u32(q.attrs.qp_state));
        let peer =
            (q.qp_type == rdma_backend::QpType::Rc && q.attrs.dest_qp_num != 0).then(|| QpPeer {
                gid: std::net::Ipv6Addr::from(q.attrs.ah_attr.grh.dgid).to_string(),
                qpn: q.attrs.dest_qp_num,
            });
        let send = {
            let mut t = crate::stats::SendTotals::default();
            t.add(&q.shared.traffic);
            t
        };
        let sent = send.total();
        let retries = self.env.backend.qp_retries(b);
        QpInfo {
            handle,
            qpn: q.qpn,
            qp_type: qp_type_name(q.qp_type).to_string(),
            state: state.map_or("UNKNOWN", qp_state_name).to_string(),
            pd: q.pd,
            send_cq: q.send_cq,
            recv_cq: q.recv_cq,
            srq: q.srq,
            peer,
            counters: QpCounters {
                send_wqes: sent.wqes,
                send_bytes: sent.bytes,
                recv_wqes: q.completions.recv_wqes,
                recv_bytes: q.completions.recv_bytes,
                error_completions: q.completions.errors,
                bad_wqes: send.bad_wqes,
                rnr_waits: retries.map(|r| r.rnr_waits),
                retries: retries.map(|r| r.retries),
            },
        }
    }
}
