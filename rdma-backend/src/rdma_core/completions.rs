//! The completion thread: host completions and async events into the sink, flushed WRs in
//! the order the guest posted them.

use super::*;

pub(super) fn completion_thread(s: &Shared) {
    let fds = [s.ch.fd(), s.ctx.async_fd()];
    let mut wcs = Vec::with_capacity(64);
    let mut out = Vec::with_capacity(64);
    while !s.stop.load(Ordering::Relaxed) {
        verbs::poll_fds(&fds, 50);
        while let Some(ev) = s.ctx.next_async_event() {
            s.async_event(ev);
        }
        s.deliver_flushed();
        while let Some(cq_addr) = s.ch.next_event() {
            let cq = {
                let t = lock(&s.t);
                t.cqs
                    .iter()
                    .find(|(_, c)| c.cq.addr() == cq_addr)
                    .map(|(id, c)| (CqId(*id), c.cq.clone()))
            };
            let Some((cq_id, cq)) = cq else { continue };
            if let Err(e) = cq.arm() {
                log::warn!("rdma-core: {e}");
            }
            loop {
                wcs.clear();
                cq.poll(&mut wcs, 32);
                if wcs.is_empty() {
                    break;
                }
                // An affiliated event the host raised before these completions (an SRQ limit
                // is raised when the receive is taken) goes out before them.
                while let Some(ev) = s.ctx.next_async_event() {
                    s.async_event(ev);
                }
                let qps = read(&s.qps);
                out.clear();
                for w in &wcs {
                    if let Some(wc) = s.translate(cq_id, &qps, w) {
                        out.push(wc);
                    }
                }
                if !out.is_empty() {
                    s.sink.complete(&out);
                }
            }
            s.deliver_flushed();
        }
    }
}

/// Longest wait for the host to complete the receives posted before a backend-flushed one (rxe
/// may drop a receive posted in the moment between the QP failing and the backend noticing).
const FLUSH_ORDER_WAIT: Duration = Duration::from_secs(1);

pub(super) fn wc_status(s: u32) -> WcStatus {
    match s {
        0 => WcStatus::Success,
        1 => WcStatus::LocLenErr,
        2 => WcStatus::LocQpOpErr,
        4 => WcStatus::LocProtErr,
        5 => WcStatus::WrFlushErr,
        7 => WcStatus::BadRespErr,
        8 => WcStatus::LocAccessErr,
        9 => WcStatus::RemInvReqErr,
        10 => WcStatus::RemAccessErr,
        11 => WcStatus::RemOpErr,
        12 => WcStatus::RetryExcErr,
        13 => WcStatus::RnrRetryExcErr,
        19 => WcStatus::FatalErr,
        _ => WcStatus::GeneralErr,
    }
}

impl Shared {
    /// Delivers the receive flush completions `post_recv` queued, once the QP's earlier host
    /// receives have completed (or after [`FLUSH_ORDER_WAIT`]). Runs on the completion thread,
    /// after the host completions it polled, and under the QP table's read lock, so nothing is
    /// delivered for a QP once `destroy_qp` has returned.
    pub(super) fn deliver_flushed(&self) {
        if self.flush_waiting.load(Ordering::Acquire) == 0 {
            return;
        }
        let qps = read(&self.qps);
        for q in qps.values() {
            let mut f = lock(&q.flushed);
            if f.0.is_empty() {
                continue;
            }
            let late = f.1.is_some_and(|t| t.elapsed() >= FLUSH_ORDER_WAIT);
            if q.host_recvs.load(Ordering::Acquire) == 0 || late {
                if late {
                    // Those host receives will not complete; do not wait for them again.
                    q.host_recvs.store(0, Ordering::Release);
                }
                let v = std::mem::take(&mut f.0);
                f.1 = None;
                self.sink.complete(&v);
                self.flushes_gone(v.len());
            }
        }
    }

    /// `n` queued receive flushes were delivered or dropped.
    pub(super) fn flushes_gone(&self, n: usize) {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let _ = self
            .flush_waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                Some(w.saturating_sub(n))
            });
    }

    fn async_event(&self, ev: verbs::AsyncEv) {
        use verbs::AsyncEv as E;
        if let E::QpFatal(n) = ev {
            if let Some(q) = read(&self.qps).get(&n) {
                q.set_err();
            }
        }
        let qp_cookie = |n: u32| read(&self.qps).get(&n).map(|q| q.cookie);
        let ev = match ev {
            E::QpFatal(n) => qp_cookie(n).map(|c| AsyncEvent::QpFatal { qp_cookie: c }),
            E::QpReqErr(n) => qp_cookie(n).map(|c| AsyncEvent::QpReqErr { qp_cookie: c }),
            E::QpAccessErr(n) => qp_cookie(n).map(|c| AsyncEvent::QpAccessErr { qp_cookie: c }),
            E::QpLastWqe(n) => qp_cookie(n).map(|c| AsyncEvent::QpLastWqeReached { qp_cookie: c }),
            E::SrqLimit(a) => lock(&self.t)
                .srqs
                .values()
                .find(|s| s.srq.addr() == a)
                .map(|s| AsyncEvent::SrqLimitReached {
                    srq_cookie: s.cookie,
                }),
            E::Other => None,
        };
        if let Some(ev) = ev {
            self.sink.event(ev);
        }
    }
}
