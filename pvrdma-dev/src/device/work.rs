//! Doorbells, the workers' drain jobs, and the backend's deferred work.

use super::*;

impl Core {
    /// Drains again every queue whose last drain stopped at a WR the backend did not take.
    pub(super) fn restart_stalled(&mut self) {
        let qps: Vec<u32> = self
            .objects
            .qps
            .iter_mut()
            .filter(|(_, q)| q.sched.stalled)
            .map(|(h, q)| {
                q.sched.stalled = false;
                h
            })
            .collect();
        for h in qps {
            self.schedule_qp(h);
        }
        let srqs: Vec<u32> = self
            .objects
            .srqs
            .iter_mut()
            .filter(|(_, s)| s.sched.stalled)
            .map(|(h, s)| {
                s.sched.stalled = false;
                h
            })
            .collect();
        for h in srqs {
            self.schedule_srq(h);
        }
    }

    /// Runs the backend's deferred work on a worker if it asked for it: one job at a time (as a
    /// queue's drain), queued behind the device's other work, and again for as long as the
    /// backend says more remains. Not tied to the reset epoch: the backend drops what a reset
    /// removes.
    pub(super) fn start_progress(&mut self) {
        if self.progress_running || !self.env.progress.swap(false, Ordering::AcqRel) {
            return;
        }
        self.progress_running = true;
        let weak = self.weak.clone();
        self.exec.run_on(
            false,
            self.env.clone(),
            |env: &Env| env.backend.progress(),
            move |more| {
                let Some(core) = weak.upgrade() else { return };
                let mut core = core.borrow_mut();
                core.progress_running = false;
                // The backend may have room again for WRs it refused (QueueFull).
                core.restart_stalled();
                match more {
                    Ok(true) => core.env.progress.store(true, Ordering::Release),
                    Ok(false) => {}
                    Err(e) => log::error!("the backend's deferred work failed: {e}"),
                }
                core.start_progress();
            },
        );
    }

    // ---- doorbells -----------------------------------------------------------------------

    pub(super) fn doorbell(&mut self, off: u64, v: u32) {
        let page = (off >> 12) as u32;
        let reg = off & 0xfff;
        let handle = v & uar::HANDLE_MASK;
        self.stats.doorbells += 1;
        let Some(ctx) = self.objects.page_ctx(page) else {
            self.refuse_doorbell(off, v, "a UAR page of no context");
            return;
        };
        if !self.active {
            self.refuse_doorbell(off, v, "the device is not active");
            return;
        }
        match reg {
            uar::QP => {
                let ok = self
                    .objects
                    .qps
                    .get(handle)
                    .is_some_and(|qp| self.objects.pd_ctx(qp.pd) == Some(ctx));
                let flags = QpDoorbell::from_bits_truncate(v);
                if !ok || flags.is_empty() {
                    self.refuse_doorbell(off, v, "no such QP in the page's context, or no flag");
                    return;
                }
                self.schedule_qp(handle);
            }
            uar::CQ => {
                let flags = CqDoorbell::from_bits_truncate(v);
                let Some(cq) = self.objects.cqs.get_mut(handle).filter(|c| c.ctx == ctx) else {
                    self.refuse_doorbell(off, v, "no such CQ in the page's context");
                    return;
                };
                if flags.contains(CqDoorbell::ARM) {
                    cq.ring.arm = Arm::Any;
                } else if flags.contains(CqDoorbell::ARM_SOL) && cq.ring.arm != Arm::Any {
                    cq.ring.arm = Arm::Solicited;
                }
                // POLL is a hint: completions are written as soon as they exist, so there is
                // nothing to flush.
            }
            uar::SRQ => {
                let ok = self
                    .objects
                    .srqs
                    .get(handle)
                    .is_some_and(|s| self.objects.pd_ctx(s.pd) == Some(ctx));
                if !ok || !SrqDoorbell::from_bits_truncate(v).contains(SrqDoorbell::RECV) {
                    self.refuse_doorbell(off, v, "no such SRQ in the page's context, or no flag");
                    return;
                }
                self.schedule_srq(handle);
            }
            _ => self.refuse_doorbell(off, v, "not a doorbell register"),
        }
    }

    /// Counts a doorbell that rings nothing, and says so (within the guest's log budget).
    pub(super) fn refuse_doorbell(&mut self, off: u64, v: u32, why: &str) {
        self.stats.refused.doorbells += 1;
        crate::limited_warn!(
            self.logs.bad_doorbells,
            "{}: doorbell {v:#010x} at UAR offset {off:#x} refused: {why}",
            self.opts.name
        );
    }

    pub(crate) fn schedule_qp(&mut self, handle: u32) {
        let epoch = self.epoch;
        let Some(qp) = self.objects.qps.get_mut(handle) else {
            return;
        };
        if qp.sched.busy {
            qp.sched.again = true;
            return;
        }
        qp.sched.busy = true;
        qp.sched.again = false;
        let gen = qp.gen;
        let resets = qp.shared.resets.load(Ordering::Acquire);
        let shared = qp.shared.clone();
        let weak = self.weak.clone();
        self.exec.run_on(
            false,
            self.env.clone(),
            move |env: &Env| {
                let d = datapath::drain_qp(&shared, env);
                datapath::progress_here(env);
                d
            },
            move |r| {
                let Some(core) = weak.upgrade() else { return };
                let mut core = core.borrow_mut();
                if core.epoch != epoch {
                    return;
                }
                core.qp_drained(
                    handle,
                    gen,
                    resets,
                    r.unwrap_or(Drained {
                        ring_error: true,
                        ..Default::default()
                    }),
                );
            },
        );
    }

    pub(super) fn qp_drained(&mut self, handle: u32, gen: u32, resets: u32, d: Drained) {
        let Some(qp) = self.objects.qps.get_mut(handle).filter(|q| q.gen == gen) else {
            return;
        };
        qp.sched.busy = false;
        qp.sched.stalled = d.stalled;
        let again = std::mem::take(&mut qp.sched.again);
        if d.ring_error && qp.shared.resets.load(Ordering::Acquire) == resets {
            // Broken ring indices or pages: the QP is unusable; tell the guest (QP_FATAL) and
            // move it to ERR so everything outstanding flushes.
            let b = qp.backend();
            let attrs = rdma_backend::QpAttrs {
                state: Some(QpState::Err),
                ..Default::default()
            };
            let _ = self.env.backend.modify_qp(b, &attrs);
            self.stats.refused.rings += 1;
            self.post_event(event::QP_FATAL, handle);
            return;
        }
        if again {
            self.schedule_qp(handle);
        }
    }

    pub(crate) fn schedule_srq(&mut self, handle: u32) {
        let epoch = self.epoch;
        let Some(srq) = self.objects.srqs.get_mut(handle) else {
            return;
        };
        if srq.sched.busy {
            srq.sched.again = true;
            return;
        }
        srq.sched.busy = true;
        srq.sched.again = false;
        let gen = srq.gen;
        let shared = srq.shared.clone();
        let weak = self.weak.clone();
        self.exec.run_on(
            false,
            self.env.clone(),
            move |env: &Env| datapath::drain_srq(&shared, env),
            move |r| {
                let Some(core) = weak.upgrade() else { return };
                let mut core = core.borrow_mut();
                if core.epoch != epoch {
                    return;
                }
                let d = r.unwrap_or_default();
                let Some(srq) = core.objects.srqs.get_mut(handle).filter(|s| s.gen == gen) else {
                    return;
                };
                srq.sched.busy = false;
                srq.sched.stalled = d.stalled;
                let again = std::mem::take(&mut srq.sched.again);
                core.stats.refused.rings += u64::from(d.ring_error);
                core.stats.refused.wqes += u64::from(d.malformed);
                if d.ring_error || d.malformed > 0 {
                    // SRQ_ERR: the guest's SRQ ring or one of its WQEs is unusable.
                    core.post_event(event::SRQ_ERR, handle);
                }
                if d.ring_error {
                    return;
                }
                if again {
                    core.schedule_srq(handle);
                }
            },
        );
    }
}
