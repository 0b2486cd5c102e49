//! Guest SGEs into host SGEs: checked against the guest MR (key, PD, bounds, access) and
//! translated through the PD's registration of guest RAM, or copied through a bounce buffer.

use super::*;

/// Each page as a page of the file backing its guest RAM region, or `None` when some page's
/// region is anonymous or a private mapping (an alias would not share its pages).
pub(super) fn file_pages<'m>(
    m: &'m GuestMemoryMmap,
    pages: &[GuestAddress],
) -> Option<Vec<alias::FilePage<'m>>> {
    pages
        .iter()
        .map(|&p| {
            let r = m.find_region(p)?;
            if r.flags() & libc::MAP_SHARED == 0 || p.0 % alias::PAGE as u64 != 0 {
                return None;
            }
            let fo = r.file_offset()?;
            let offset = fo.start().checked_add(p.0 - r.start_addr().0)?;
            Some(alias::FilePage {
                fd: fo.file().as_fd(),
                offset,
            })
        })
        .collect()
}

pub(super) fn poison_sge() -> verbs::HostSge {
    verbs::HostSge {
        addr: 0,
        length: 1,
        lkey: POISON_LKEY,
    }
}

impl Shared {
    pub(super) fn translate(
        &self,
        cq: CqId,
        qps: &HashMap<u32, Arc<QpEntry>>,
        w: &verbs::HostWc,
    ) -> Option<WorkCompletion> {
        let qp = qps.get(&w.qp_num)?;
        let recv = w.wr_id & WR_RECV != 0;
        let p = if w.wr_id & WR_SRQ != 0 {
            let srq = lock(&self.t).srqs.get(&qp.srq?.0)?.clone();
            let p = lock(&srq.pending).take(w.wr_id);
            p
        } else {
            lock(&qp.pending).take(w.wr_id)
        }?;
        let mut status = wc_status(w.status);
        if recv && w.wr_id & WR_SRQ == 0 {
            let _ = qp
                .host_recvs
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        }
        if status != WcStatus::Success
            && (qp.ty == QpType::Rc || (recv && status == WcStatus::WrFlushErr))
        {
            // An RC error completion moves the QP to ERR; so does anything flushing receives.
            qp.set_err();
        }
        if let Some(f) = p.failed {
            if status == WcStatus::WrFlushErr {
                status = f;
            }
        }
        let mut header = crate::NetworkHeader::Grh;
        if status == WcStatus::Success {
            if let Some(b) = &p.bounce {
                let m = self.mem.memory();
                let mut at = 0usize;
                let limit = if recv {
                    w.byte_len as usize
                } else {
                    b.buf.len()
                };
                for &(gpa, n) in &b.copy_out {
                    if at >= limit {
                        break;
                    }
                    let n = n.min(limit - at);
                    let _ = m.write_slice(&b.buf[at..at + n], GuestAddress(gpa));
                    at += n;
                }
            }
            if !p.signaled && !recv {
                return None;
            }
            if recv && w.grh {
                if let Some(u) = &p.ud_recv {
                    let (kind, ours) = self.received_header(&u.head);
                    header = kind;
                    if !ours {
                        // Addressed to a GID the guest does not hold (host QPNs are shared by
                        // every GID of the host device): not for this guest. The receive stays
                        // posted, as if the datagram had gone elsewhere.
                        self.repost_ud_recv(qp, p);
                        return None;
                    }
                }
            }
        }
        let opcode = if recv && status == WcStatus::Success && w.opcode == 129 {
            WcOpcode::RecvRdmaWithImm
        } else {
            p.opcode
        };
        // RC completions carry no source QP on the host; the guest expects the connected peer.
        let src_qp = if recv && qp.ty == QpType::Rc {
            lock(&qp.attrs).dest_qp_num.unwrap_or(w.src_qp)
        } else if recv && qp.ty == QpType::Gsi {
            // Only emulated QP1s send with GSI_HOST_QKEY.
            1
        } else {
            w.src_qp
        };
        Some(WorkCompletion {
            cq,
            qp_cookie: qp.cookie,
            wr_id: p.wr_id,
            status,
            opcode,
            byte_len: w.byte_len,
            imm_data: w.imm,
            invalidated: None,
            src_qp,
            grh: w.grh.then_some(header),
            solicited: false,
        })
    }

    /// Translates guest SGEs to host SGEs of the PD's RAM registration (host-contiguous runs
    /// merged). `LocProtErr` when a check fails (the caller poisons the WR); `LocLenErr` when
    /// they make more than `max_runs` runs, which neither the device's SGEs nor a bounce buffer
    /// can carry (counted as they are built: aliased pages cost no more than that many steps).
    /// `need_write`: the MR must grant local write.
    pub(super) fn host_sges(
        &self,
        t: &Tables,
        pd: PdId,
        sges: &[Sge],
        need_write: bool,
        max_runs: usize,
    ) -> std::result::Result<Vec<Run>, WcStatus> {
        let bad = WcStatus::LocProtErr;
        let pde = t.pds.get(&pd.0).ok_or(bad)?;
        let m = self.mem.memory();
        let mut out: Vec<Run> = Vec::new();
        for s in sges {
            if s.length == 0 {
                continue;
            }
            let mr = t
                .lkeys
                .get(&s.lkey)
                .and_then(|id| t.mrs.get(id))
                .ok_or(bad)?;
            if mr.pd != pd || (need_write && !mr.access.contains(Access::LOCAL_WRITE)) {
                return Err(bad);
            }
            let mut a = s.addr;
            let end = s.addr.checked_add(u64::from(s.length)).ok_or(bad)?;
            if let MrKind::User { iova, length, .. } = &mr.kind {
                if a < *iova || iova.checked_add(*length).is_none_or(|e| end > e) {
                    return Err(bad);
                }
            }
            while a < end {
                if out.len() > max_runs {
                    return Err(WcStatus::LocLenErr);
                }
                let n = (0x1000 - (a & 0xfff)).min(end - a);
                let gpa = match &mr.kind {
                    MrKind::Dma => a,
                    MrKind::User { iova, pages, .. } => {
                        let i = ((a - (iova & !0xfff)) >> 12) as usize;
                        pages.get(i).ok_or(bad)?.0 + (a & 0xfff)
                    }
                    MrKind::Frmr { .. } => return Err(bad),
                };
                let hva = m.get_host_address(GuestAddress(gpa)).map_err(|_| bad)? as usize;
                let reg = pde
                    .ram
                    .iter()
                    .find(|r| hva >= r.host && hva + n as usize <= r.host + r.len)
                    .ok_or(bad)?;
                match out.last_mut() {
                    Some(l) if l.1 + l.2 == hva && l.3 == reg.mr.lkey => l.2 += n as usize,
                    _ => out.push((gpa, hva, n as usize, reg.mr.lkey)),
                }
                a += n;
            }
        }
        Ok(out)
    }

    /// Host SGEs for a WR, or a bounce buffer when there are too many runs. `copy_in`: the data
    /// goes out of guest memory (SEND/WRITE). If it cannot be posted: the status of its error
    /// completion (a bad SGE: `LocProtErr`; a bounce buffer past [`MAX_BOUNCE`]: `LocLenErr`),
    /// or `Busy` while bounce buffers in flight are at [`MAX_BOUNCE_IN_FLIGHT`].
    pub(super) fn prepare(
        &self,
        t: &Tables,
        pd: PdId,
        sges: &[Sge],
        need_write: bool,
        copy_in: bool,
        max_sge: u32,
    ) -> std::result::Result<(Vec<verbs::HostSge>, Option<Bounce>), Unprepared> {
        let fail = Unprepared::Fail;
        // Past this many runs only a bounce buffer could carry the WR, and it would pass
        // MAX_BOUNCE: a run is at most a page, plus a partial page at each end of each SGE.
        let max_runs = (max_sge as usize).max(MAX_BOUNCE / 4096 + 2 * crate::MAX_SGE);
        let runs = self
            .host_sges(t, pd, sges, need_write, max_runs)
            .map_err(fail)?;
        if runs.len() <= max_sge as usize {
            let v = runs
                .iter()
                .map(|&(_, hva, n, lkey)| verbs::HostSge {
                    addr: hva as u64,
                    length: n as u32,
                    lkey,
                })
                .collect();
            return Ok((v, None));
        }
        let total: usize = runs.iter().map(|r| r.2).sum();
        if total > MAX_BOUNCE {
            return Err(fail(WcStatus::LocLenErr));
        }
        let in_flight = InFlight::take(&self.bounce, total as u64).ok_or(Unprepared::Busy)?;
        let mut buf = vec![0u8; total];
        if copy_in {
            let m = self.mem.memory();
            let mut at = 0;
            for &(gpa, _, n, _) in &runs {
                m.read_slice(&mut buf[at..at + n], GuestAddress(gpa))
                    .map_err(|_| fail(WcStatus::LocProtErr))?;
                at += n;
            }
        }
        let pde = t.pds.get(&pd.0).ok_or(fail(WcStatus::LocProtErr))?;
        let mr = verbs::Mr::register(
            &pde.pd,
            buf.as_ptr() as usize,
            buf.len(),
            None,
            Access::LOCAL_WRITE.bits(),
        )
        .map_err(|e| {
            log::warn!("rdma-core: bounce buffer: {e}");
            fail(WcStatus::LocProtErr)
        })?;
        let sge = verbs::HostSge {
            addr: buf.as_ptr() as u64,
            // At most MAX_BOUNCE.
            length: total as u32,
            lkey: mr.lkey,
        };
        let copy_out = if copy_in {
            Vec::new()
        } else {
            runs.iter().map(|r| (r.0, r.2)).collect()
        };
        Ok((
            vec![sge],
            Some(Bounce {
                _mr: mr,
                buf,
                copy_out,
                _in_flight: in_flight,
            }),
        ))
    }
}
