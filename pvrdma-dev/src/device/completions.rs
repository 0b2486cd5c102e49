//! Backend completions and events into CQEs, CQ notifications and async events.

use super::*;

impl Core {
    // ---- completions ---------------------------------------------------------------------

    pub(super) fn on_completions(&mut self, batch: &[Completion]) {
        // Runs of work completions are written together (one notification per armed CQ per
        // run); events keep their place in the order.
        let mut i = 0;
        while i < batch.len() {
            match batch[i] {
                Completion::Event(ev) => {
                    self.backend_event(ev);
                    i += 1;
                }
                Completion::Wc(_) => {
                    let start = i;
                    while i < batch.len() && matches!(batch[i], Completion::Wc(_)) {
                        i += 1;
                    }
                    self.write_completions(batch[start..i].iter().filter_map(|c| match c {
                        Completion::Wc(w) => Some(w),
                        Completion::Event(_) => None,
                    }));
                }
            }
        }
    }

    pub(super) fn live_qp(&self, cookie: u64) -> Option<u32> {
        let (handle, gen) = split_cookie(cookie);
        self.objects
            .qps
            .get(handle)
            .filter(|q| q.gen == gen)
            .map(|_| handle)
    }

    pub(super) fn write_completions<'a>(&mut self, wcs: impl Iterator<Item = &'a WorkCompletion>) {
        let mem = self.mem.memory();
        let mut notify: Vec<u32> = Vec::new();
        let mut overflowed: Vec<u32> = Vec::new();
        let mut restart: Vec<u32> = Vec::new();
        let mut written = std::mem::take(&mut self.cqs_written);
        written.clear();
        for wc in wcs {
            let Some(qh) = self.live_qp(wc.qp_cookie) else {
                self.stats.stale_completions += 1;
                continue;
            };
            let qp = self.objects.qps.get(qh).expect("live QP");
            let cqh = if matches!(wc.opcode, WcOpcode::Recv | WcOpcode::RecvRdmaWithImm) {
                qp.recv_cq
            } else {
                qp.send_cq
            };
            if qp.sched.stalled {
                restart.push(qh);
            }
            let Some(cq) = self.objects.cqs.get_mut(cqh) else {
                self.stats.stale_completions += 1;
                continue;
            };
            let cqe = cq::make_cqe(wc, qh, cq.ctx == 0);
            match cq.ring.push(&*mem, &cqe, cq::solicited_or_error(wc)) {
                Pushed::Written { notify: n } => {
                    self.stats.cqes += 1;
                    cq.cqes += 1;
                    self.count_completion(qh, wc);
                    if written.last() != Some(&cqh) && !written.contains(&cqh) {
                        written.push(cqh);
                    }
                    if n && !notify.contains(&cqh) {
                        notify.push(cqh);
                    }
                }
                Pushed::Overflow => {
                    self.stats.cq_overflows += 1;
                    cq.overflows += 1;
                    if !overflowed.contains(&cqh) {
                        overflowed.push(cqh);
                    }
                }
                Pushed::Dropped => {
                    self.stats.cq_overflows += 1;
                    cq.overflows += 1;
                }
                Pushed::Broken => {
                    self.stats.cq_overflows += 1;
                    self.stats.refused.dma += 1;
                    cq.overflows += 1;
                }
            }
        }
        // Each CQ's prod_tail once for the run, before any notification about it.
        for &cqh in &written {
            if let Some(cq) = self.objects.cqs.get_mut(cqh) {
                if !cq.ring.publish(&*mem) {
                    self.stats.cq_overflows += 1;
                    self.stats.refused.dma += 1;
                }
            }
        }
        self.cqs_written = written;
        drop(mem);
        let mut any = false;
        for cqh in notify {
            let mem = self.mem.memory();
            if let Some(d) = self.dsr.as_mut() {
                if matches!(d.post_cqne(&*mem, cqh), Ok(true)) {
                    any = true;
                }
            }
        }
        if any {
            self.raise(vector::CQ);
        }
        for cqh in overflowed {
            // Report a CQ overflow once per CQ (CQ_ERR, info = CQ handle).
            if self.objects.cqs.get(cqh).is_some() {
                self.post_event(event::CQ_ERR, cqh);
            }
        }
        restart.sort_unstable();
        restart.dedup();
        for qh in restart {
            if let Some(qp) = self.objects.qps.get_mut(qh) {
                qp.sched.stalled = false;
            }
            self.schedule_qp(qh);
        }
    }

    /// Counts a completion written for live QP `qh`: a successful receive by its opcode and
    /// bytes, an error on the QP.
    fn count_completion(&mut self, qh: u32, wc: &WorkCompletion) {
        let Some(qp) = self.objects.qps.get_mut(qh) else {
            return;
        };
        if wc.status != rdma_backend::WcStatus::Success {
            qp.completions.errors += 1;
        } else if let Some(i) = crate::stats::recv_op_index(wc.opcode) {
            let bytes = u64::from(wc.byte_len);
            qp.completions.recv_wqes += 1;
            qp.completions.recv_bytes += bytes;
            let d = &mut self.stats.recv[i];
            d.wqes += 1;
            d.bytes += bytes;
        }
    }

    pub(super) fn backend_event(&mut self, ev: AsyncEvent) {
        let (ty, cookie, is_srq) = match ev {
            AsyncEvent::QpFatal { qp_cookie } => (event::QP_FATAL, qp_cookie, false),
            AsyncEvent::QpReqErr { qp_cookie } => (event::QP_REQ_ERR, qp_cookie, false),
            AsyncEvent::QpAccessErr { qp_cookie } => (event::QP_ACCESS_ERR, qp_cookie, false),
            AsyncEvent::QpLastWqeReached { qp_cookie } => {
                (event::QP_LAST_WQE_REACHED, qp_cookie, false)
            }
            AsyncEvent::SrqLimitReached { srq_cookie } => {
                (event::SRQ_LIMIT_REACHED, srq_cookie, true)
            }
        };
        let (handle, gen) = split_cookie(cookie);
        let live = if is_srq {
            self.objects.srqs.get(handle).is_some_and(|s| s.gen == gen)
        } else {
            self.objects.qps.get(handle).is_some_and(|q| q.gen == gen)
        };
        if live {
            self.post_event(ty, handle);
        }
    }
}
