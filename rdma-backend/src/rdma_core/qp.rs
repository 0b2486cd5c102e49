//! The QP verbs: create, modify (guest attributes merged and completed with IB's defaults for
//! the host), destroy, and posting sends and receives.

use super::*;

/// Longest wait for a QP in SQD to finish draining before a transition out of SQD.
pub(super) const SQD_DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Waits (at most [`SQD_DRAIN_WAIT`]) until the host QP no longer reports `sq_draining`.
pub(super) fn wait_drained(qp: &verbs::Qp) {
    let deadline = std::time::Instant::now() + SQD_DRAIN_WAIT;
    let mut pause = std::time::Duration::from_micros(100);
    loop {
        match qp.state_draining() {
            Ok((S::IBV_QPS_SQD, true)) => {}
            Ok(_) => return,
            Err(e) => {
                log::warn!("rdma-core: {e}");
                return;
            }
        }
        if std::time::Instant::now() >= deadline {
            log::warn!("rdma-core: QP still draining after {SQD_DRAIN_WAIT:?}");
            return;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(20));
    }
}

pub(super) fn qp_state_from_host(s: u32) -> QpState {
    match s {
        S::IBV_QPS_RESET => QpState::Reset,
        S::IBV_QPS_INIT => QpState::Init,
        S::IBV_QPS_RTR => QpState::Rtr,
        S::IBV_QPS_RTS => QpState::Rts,
        S::IBV_QPS_SQD => QpState::Sqd,
        S::IBV_QPS_SQE => QpState::Sqe,
        _ => QpState::Err,
    }
}

pub(super) fn merge(into: &mut QpAttrs, a: &QpAttrs) {
    macro_rules! m {
        ($($f:ident),*) => { $( if a.$f.is_some() { into.$f = a.$f; } )* };
    }
    m!(
        path_mtu,
        qkey,
        rq_psn,
        sq_psn,
        dest_qp_num,
        access,
        pkey_index,
        max_rd_atomic,
        max_dest_rd_atomic,
        min_rnr_timer,
        timeout,
        retry_cnt,
        rnr_retry,
        port_num,
        ah
    );
}

impl RdmaCoreBackend {
    pub(super) fn create_qp_impl(&self, init: &QpInit) -> Result<(QpId, u32)> {
        let s = &self.s;
        let ud = init.qp_type != QpType::Rc;
        let mut t = lock(&s.t);
        if init.qp_type == QpType::Gsi && lock(&s.gsi_qpn).is_some() {
            return Err(Error::Invalid("the device has a GSI QP already"));
        }
        let pd = t
            .pds
            .get(&init.pd.0)
            .ok_or(Error::NoSuchObject("PD"))?
            .pd
            .clone();
        let scq = t
            .cqs
            .get(&init.send_cq.0)
            .ok_or(Error::NoSuchObject("CQ"))?
            .cq
            .clone();
        let rcq = t
            .cqs
            .get(&init.recv_cq.0)
            .ok_or(Error::NoSuchObject("CQ"))?
            .cq
            .clone();
        let srq = match init.srq {
            Some(id) => Some(
                t.srqs
                    .get(&id.0)
                    .ok_or(Error::NoSuchObject("SRQ"))?
                    .srq
                    .clone(),
            ),
            None => None,
        };
        let caps = verbs::QpCaps {
            max_send_wr: init.max_send_wr.clamp(1, s.info.max_qp_wr),
            max_recv_wr: if srq.is_some() {
                0
            } else {
                init.max_recv_wr.clamp(1, s.info.max_qp_wr)
            },
            max_send_sge: init.max_send_sge.clamp(1, s.info.max_sge),
            max_recv_sge: if srq.is_some() {
                0
            } else {
                init.max_recv_sge.clamp(1, s.info.max_sge)
            },
        };
        let qp = verbs::Qp::new(&pd, &scq, &rcq, srq.as_ref(), ud, caps).map_err(host)?;
        let qpn = qp.qp_num;
        t.pds.get_mut(&init.pd.0).expect("checked").users += 1;
        t.cqs.get_mut(&init.send_cq.0).expect("checked").users += 1;
        t.cqs.get_mut(&init.recv_cq.0).expect("checked").users += 1;
        if let Some(id) = init.srq {
            if let Some(e) = t.srqs.get(&id.0) {
                e.users.fetch_add(1, Ordering::Relaxed);
            }
        }
        let id = t.new_id();
        t.qp_ids.insert(id, qpn);
        let e = Arc::new(QpEntry {
            qp,
            ty: init.qp_type,
            pd: init.pd,
            send_cq: init.send_cq,
            recv_cq: init.recv_cq,
            srq: init.srq,
            cookie: init.cookie,
            max_send_sge: caps.max_send_sge,
            max_recv_sge: caps.max_recv_sge.max(1),
            attrs: Mutex::new(QpAttrs::default()),
            pending: Mutex::new(Slab::default()),
            in_err: AtomicBool::new(false),
            host_recvs: AtomicU32::new(0),
            flushed: Mutex::new((Vec::new(), None)),
        });
        write(&s.qps).insert(qpn, e);
        if init.qp_type == QpType::Gsi {
            // QP1 emulated by a host UD QP, published under each of the guest's GIDs.
            *lock(&s.gsi_qpn) = Some(qpn);
            let gids: Vec<Gid> = read(&s.gids).iter().flatten().map(|g| g.0).collect();
            for g in gids {
                s.gsi_register(g);
            }
            return Ok((QpId(id), 1));
        }
        Ok((QpId(id), qpn))
    }

    pub(super) fn modify_qp_impl(&self, qp: QpId, attrs: &QpAttrs) -> Result<()> {
        let s = &self.s;
        let e = self.qp(qp)?;
        if let Some(m) = attrs.path_mtu {
            if !(1..=5).contains(&m) {
                return Err(Error::Invalid("path MTU"));
            }
        }
        if e.ty == QpType::Ud && attrs.qkey == Some(GSI_HOST_QKEY) {
            // Reserved for emulated QP1s: a guest UD QP must not receive their traffic.
            return Err(Error::Invalid("Q_Key reserved by the backend for QP1"));
        }
        let cur = qp_state_from_host(e.qp.state().map_err(host)?);
        let to = attrs.state.unwrap_or(cur);
        if attrs.state.is_some() && !cur.can_transition_to(to) {
            return Err(Error::BadTransition { from: cur, to });
        }
        let mut sh = lock(&e.attrs);
        merge(&mut sh, attrs);
        let h = s.host_qp_attrs(&e, &sh, attrs, cur, to)?;
        let mask = h.mask;
        if to == QpState::Reset {
            // The host drops queued work silently; so do we.
            let mut p = lock(&e.pending);
            e.qp.modify(&h)
                .map_err(|rc| Error::Host(format!("ibv_modify_qp: errno {rc}")))?;
            p.clear();
            *sh = QpAttrs::default();
            e.in_err.store(false, Ordering::Release);
            e.host_recvs.store(0, Ordering::Release);
            let dropped = std::mem::take(&mut lock(&e.flushed).0).len();
            s.flushes_gone(dropped);
            return Ok(());
        }
        if mask == 0 {
            return Ok(());
        }
        if cur == QpState::Sqd && attrs.state.is_some() && to != QpState::Sqd && to != QpState::Err
        {
            // A QP may leave SQD once its SQ has drained (IB's "SQ drained" point); rxe refuses
            // with EINVAL before that, and the guest's modify may come right after the one to
            // SQD. Wait a bounded time for the drain, then let the host decide.
            wait_drained(&e.qp);
        }
        e.qp.modify(&h).map_err(|rc| {
            Error::Host(format!(
                "ibv_modify_qp {cur:?} -> {to:?} (mask {mask:#x}): {}",
                std::io::Error::from_raw_os_error(rc)
            ))
        })?;
        if to == QpState::Err {
            e.set_err();
        }
        Ok(())
    }

    pub(super) fn destroy_qp_impl(&self, qp: QpId) -> Result<()> {
        let s = &self.s;
        let mut t = lock(&s.t);
        let qpn = t.qp_ids.remove(&qp.0).ok_or(Error::NoSuchObject("QP"))?;
        let e = write(&s.qps).remove(&qpn);
        if e.as_ref().is_some_and(|e| e.ty == QpType::Gsi) {
            s.gsi_drop();
        }
        if let Some(e) = &e {
            s.flushes_gone(lock(&e.flushed).0.len());
        }
        if let Some(e) = e {
            if let Some(p) = t.pds.get_mut(&e.pd.0) {
                p.users -= 1;
            }
            for c in [e.send_cq, e.recv_cq] {
                if let Some(c) = t.cqs.get_mut(&c.0) {
                    c.users -= 1;
                }
            }
            if let Some(srq) = e.srq {
                if let Some(x) = t.srqs.get(&srq.0) {
                    x.users.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    pub(super) fn post_send_impl(&self, qp: QpId, wr: &SendWr) -> Result<()> {
        let s = &self.s;
        let e = self.qp(qp)?;
        let (opcode, mut op, need_write, copy_in) = host_send(wr);
        let t = lock(&s.t);
        let mut prep = s.prepare(
            &t,
            e.pd,
            wr.sges.as_slice(),
            need_write,
            copy_in,
            e.max_send_sge,
        );
        let mut ah = None;
        if e.ty != QpType::Rc {
            let d = wr
                .ud
                .ok_or(Error::Invalid("UD send without a destination"))?;
            let (a, qpn, qkey, bound) = s.ud_destination(&t, &e, &d)?;
            if !bound {
                // Never sent: the WR completes in error (the QP is moved to ERR below).
                prep = Err(Unprepared::Fail(WcStatus::LocQpOpErr));
            }
            op.ud = Some((a.clone(), qpn, qkey));
            ah = Some(a);
        }
        drop(t);
        let mut pend = lock(&e.pending);
        let (mut sges, bounce, failed) = match (prep, refused_at_post(wr)) {
            (Ok((s, b)), None) => (s, b, None),
            (Err(Unprepared::Busy), _) => {
                drop(pend);
                return Err(Error::QueueFull);
            }
            (prep, refused) => {
                let status = match prep {
                    Err(Unprepared::Fail(status)) => status,
                    _ => refused.unwrap_or(WcStatus::LocProtErr),
                };
                fail_before_post(&e, &mut op)?;
                (vec![poison_sge()], None, Some(status))
            }
        };
        let slot = pend.put(Pending {
            wr_id: wr.wr_id,
            opcode,
            signaled: wr.signaled,
            bounce,
            _ah: ah,
            failed,
            ud_recv: None,
        });
        if let Err(rc) = e.qp.post_send(slot, &mut sges, &op) {
            pend.take(slot);
            return Err(post_err(rc));
        }
        Ok(())
    }

    pub(super) fn post_recv_impl(&self, qp: QpId, wr: &RecvWr) -> Result<()> {
        let s = &self.s;
        let e = self.qp(qp)?;
        if e.srq.is_some() {
            return Err(Error::Invalid("the QP receives from an SRQ"));
        }
        if e.in_err.load(Ordering::Acquire) {
            // Flushed by the backend, delivered by the completion thread after the receives
            // before it (see `deliver_flushed`).
            let wc = WorkCompletion {
                cq: e.recv_cq,
                qp_cookie: e.cookie,
                wr_id: wr.wr_id,
                status: WcStatus::WrFlushErr,
                opcode: WcOpcode::Recv,
                byte_len: 0,
                imm_data: None,
                invalidated: None,
                src_qp: 0,
                grh: None,
                solicited: false,
            };
            let mut f = lock(&e.flushed);
            f.0.push(wc);
            f.1.get_or_insert_with(Instant::now);
            s.flush_waiting.fetch_add(1, Ordering::AcqRel);
            return Ok(());
        }
        let t = lock(&s.t);
        let prep = s.prepare(&t, e.pd, wr.sges.as_slice(), true, false, e.max_recv_sge);
        if prep.as_ref().err() == Some(&Unprepared::Busy) {
            return Err(Error::QueueFull);
        }
        let prep = prep.ok();
        let head = if e.ty == QpType::Rc || prep.is_none() {
            None
        } else {
            s.host_sges(&t, e.pd, wr.sges.as_slice(), true, usize::MAX)
                .ok()
                .map(|runs| {
                    let mut left = 40usize;
                    let mut head = Vec::new();
                    for &(gpa, _, n, _) in &runs {
                        if left == 0 {
                            break;
                        }
                        head.push((gpa, n.min(left)));
                        left -= n.min(left);
                    }
                    head
                })
        };
        drop(t);
        let (mut sges, bounce) = prep.unwrap_or_else(|| (vec![poison_sge()], None));
        let ud_recv = head.map(|head| UdRecv {
            sges: sges.clone(),
            head,
        });
        let mut pend = lock(&e.pending);
        let slot = pend.put(Pending {
            wr_id: wr.wr_id,
            opcode: WcOpcode::Recv,
            signaled: true,
            bounce,
            _ah: None,
            failed: None,
            ud_recv,
        });
        e.host_recvs.fetch_add(1, Ordering::AcqRel);
        if let Err(rc) = e.qp.post_recv(slot | WR_RECV, &mut sges) {
            pend.take(slot);
            e.host_recvs.fetch_sub(1, Ordering::AcqRel);
            return Err(post_err(rc));
        }
        Ok(())
    }
}

/// A guest send WR as the host posts it: its completion opcode, the host WR (without SGEs and
/// UD destination), whether its local buffers are written (READ, atomics) and whether they are
/// read at post (a bounce buffer is filled then).
fn host_send(wr: &SendWr) -> (WcOpcode, verbs::HostSend, bool, bool) {
    let with_imm = |imm: Option<u32>, with, without| if imm.is_some() { with } else { without };
    let mut op = verbs::HostSend {
        opcode: 0,
        flags: consts::SEND_SIGNALED
            | if wr.solicited {
                consts::SEND_SOLICITED
            } else {
                0
            },
        imm: 0,
        remote_addr: 0,
        rkey: 0,
        compare_add: 0,
        swap: 0,
        ud: None,
    };
    let (opcode, need_write, copy_in) = match wr.op {
        // Refused before post (`refused_at_post`): libibverbs has no fast registration.
        SendOp::SendInv { .. } => (WcOpcode::Send, false, false),
        SendOp::LocalInv { .. } => (WcOpcode::LocalInv, false, false),
        SendOp::FastReg(_) => (WcOpcode::FastRegMr, false, false),
        SendOp::Send { imm } => {
            op.opcode = with_imm(imm, Op::IBV_WR_SEND_WITH_IMM, Op::IBV_WR_SEND);
            op.imm = imm.unwrap_or(0);
            (WcOpcode::Send, false, true)
        }
        SendOp::RdmaWrite {
            remote_addr,
            rkey,
            imm,
        } => {
            op.opcode = with_imm(imm, Op::IBV_WR_RDMA_WRITE_WITH_IMM, Op::IBV_WR_RDMA_WRITE);
            (op.remote_addr, op.rkey, op.imm) = (remote_addr, rkey, imm.unwrap_or(0));
            (WcOpcode::RdmaWrite, false, true)
        }
        SendOp::RdmaRead { remote_addr, rkey } => {
            op.opcode = Op::IBV_WR_RDMA_READ;
            (op.remote_addr, op.rkey) = (remote_addr, rkey);
            (WcOpcode::RdmaRead, true, false)
        }
        SendOp::CmpSwap {
            remote_addr,
            rkey,
            compare,
            swap,
        } => {
            op.opcode = Op::IBV_WR_ATOMIC_CMP_AND_SWP;
            (op.remote_addr, op.rkey, op.compare_add, op.swap) = (remote_addr, rkey, compare, swap);
            (WcOpcode::CompSwap, true, false)
        }
        SendOp::FetchAdd {
            remote_addr,
            rkey,
            add,
        } => {
            op.opcode = Op::IBV_WR_ATOMIC_FETCH_AND_ADD;
            (op.remote_addr, op.rkey, op.compare_add) = (remote_addr, rkey, add);
            (WcOpcode::FetchAdd, true, false)
        }
    };
    (opcode, op, need_write, copy_in)
}

/// WRs the host would refuse at post time (EINVAL), which a guest ring cannot report, as an
/// HCA completes them. Atomics: a local buffer other than 8 bytes is a local length error; a
/// misaligned target is NAKed by an HCA's responder (Invalid Request). Fast registration and
/// invalidation, which user-space verbs do not offer (the device does not advertise them with
/// this backend): a local QP operation error.
fn refused_at_post(wr: &SendWr) -> Option<WcStatus> {
    match wr.op {
        SendOp::SendInv { .. } | SendOp::LocalInv { .. } | SendOp::FastReg(_) => {
            Some(WcStatus::LocQpOpErr)
        }
        SendOp::CmpSwap { remote_addr, .. } | SendOp::FetchAdd { remote_addr, .. } => {
            let local: u64 = wr.sges.as_slice().iter().map(|s| u64::from(s.length)).sum();
            if local != 8 {
                Some(WcStatus::LocLenErr)
            } else if remote_addr % 8 != 0 {
                Some(WcStatus::RemInvReqErr)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// An error found before sending, as an HCA reports it: the QP goes to ERR, and the WR is
/// posted as a plain SEND (rxe would refuse an atomic) with a poisoned SGE, so it completes in
/// order after the earlier ones and later ones flush.
fn fail_before_post(e: &QpEntry, op: &mut verbs::HostSend) -> Result<()> {
    e.qp.modify(&verbs::HostQpAttr {
        mask: QpMask::IBV_QP_STATE,
        state: S::IBV_QPS_ERR,
        ..Default::default()
    })
    .map_err(|rc| Error::Host(format!("ibv_modify_qp to ERR: errno {rc}")))?;
    e.set_err();
    op.opcode = Op::IBV_WR_SEND;
    Ok(())
}

impl Shared {
    /// The host attributes of a guest MODIFY_QP from `cur` to `to`: what the guest set now, and
    /// for the attributes the transition requires, what it set earlier (`sh`, merged) or IB's
    /// usual defaults.
    fn host_qp_attrs(
        &self,
        e: &QpEntry,
        sh: &QpAttrs,
        attrs: &QpAttrs,
        cur: QpState,
        to: QpState,
    ) -> Result<verbs::HostQpAttr> {
        let mut h = verbs::HostQpAttr::default();
        let mut mask = 0u32;
        macro_rules! set {
            ($bit:ident, $field:ident, $v:expr) => {{
                mask |= QpMask::$bit;
                h.$field = $v;
            }};
        }
        if attrs.state.is_some() {
            set!(IBV_QP_STATE, state, to as u32);
        }
        let ud = e.ty != QpType::Rc;
        // Required attributes of the transition come from what the guest set now or earlier,
        // with IB's usual defaults for any it never set.
        let entering = |st| attrs.state == Some(st) && cur != st;
        if entering(QpState::Init) || (cur == QpState::Init && to == QpState::Init) {
            set!(IBV_QP_PKEY_INDEX, pkey_index, sh.pkey_index.unwrap_or(0));
            // The guest's port number is its own (1); the host port is configured.
            set!(IBV_QP_PORT, port_num, self.cfg.port);
            if ud {
                set!(IBV_QP_QKEY, qkey, host_qkey(e.ty, sh.qkey));
            } else {
                set!(
                    IBV_QP_ACCESS_FLAGS,
                    access,
                    sh.access.map_or(0, |a| a.bits() & 0xf)
                );
            }
        } else {
            if attrs.qkey.is_some() {
                set!(IBV_QP_QKEY, qkey, host_qkey(e.ty, sh.qkey));
            }
            if attrs.access.is_some() && !ud {
                set!(
                    IBV_QP_ACCESS_FLAGS,
                    access,
                    sh.access.map_or(0, |a| a.bits() & 0xf)
                );
            }
        }
        if entering(QpState::Rtr) && !ud {
            set!(
                IBV_QP_PATH_MTU,
                path_mtu,
                u32::from(sh.path_mtu.unwrap_or(3))
            );
            set!(IBV_QP_DEST_QPN, dest_qp_num, sh.dest_qp_num.unwrap_or(0));
            set!(IBV_QP_RQ_PSN, rq_psn, sh.rq_psn.unwrap_or(0));
            set!(
                IBV_QP_MAX_DEST_RD_ATOMIC,
                max_dest_rd_atomic,
                sh.max_dest_rd_atomic.unwrap_or(0)
            );
            set!(
                IBV_QP_MIN_RNR_TIMER,
                min_rnr_timer,
                sh.min_rnr_timer.unwrap_or(0)
            );
            // No path given: loop back to our own GID 0 (a real guest always gives one).
            let av = sh.ah.unwrap_or_else(|| crate::AddressVector {
                dgid: read(&self.gids)[0].map(|g| g.0).unwrap_or_default(),
                hop_limit: 64,
                ..Default::default()
            });
            mask |= QpMask::IBV_QP_AV;
            let (hav, bound) = self.host_av(&av);
            if !bound {
                return Err(Error::Invalid("the path's source GID index is not bound"));
            }
            h.av = Some(hav);
        }
        if entering(QpState::Rts) && cur == QpState::Rtr {
            set!(IBV_QP_SQ_PSN, sq_psn, sh.sq_psn.unwrap_or(0));
            if !ud {
                set!(IBV_QP_TIMEOUT, timeout, sh.timeout.unwrap_or(14));
                set!(IBV_QP_RETRY_CNT, retry_cnt, sh.retry_cnt.unwrap_or(7));
                set!(IBV_QP_RNR_RETRY, rnr_retry, sh.rnr_retry.unwrap_or(7));
                set!(
                    IBV_QP_MAX_QP_RD_ATOMIC,
                    max_rd_atomic,
                    sh.max_rd_atomic.unwrap_or(0)
                );
            }
        }
        h.mask = mask;
        Ok(h)
    }
}
