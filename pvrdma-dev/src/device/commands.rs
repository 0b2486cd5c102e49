//! A command's start (on REQUEST) and finish (response, ERR, vector 0).

use super::*;

impl Core {
    // ---- commands ------------------------------------------------------------------------

    pub(super) fn start_command(&mut self) {
        let Some(d) = self.dsr.as_ref() else {
            // CVE-2022-1050: REQUEST before a DSR is loaded.
            self.stats.refused.commands += 1;
            self.regs.err = err::EIO;
            self.raise(vector::RESPONSE);
            return;
        };
        let mut req = [0u8; CMD_SLOT_SIZE];
        if self.mem.memory().read_slice(&mut req, d.cmd_slot).is_err() {
            self.stats.refused.dma += 1;
            self.regs.err = err::EFAULT;
            self.raise(vector::RESPONSE);
            return;
        }
        let hdr = CmdHdr::from_slice(&req[..16]).copied().unwrap_or_default();
        self.stats.command(hdr.cmd).count += 1;
        let job = self.with_cmd_ctx(|dev| cmd::prepare(dev, hdr.cmd, &req));
        self.cmd_pending = true;
        let weak = self.weak.clone();
        let epoch = self.epoch;
        let inline = self.env.backend.inline_control() && cmd::is_quick(hdr.cmd, &req);
        self.exec.run_on(
            inline,
            self.env.clone(),
            move |env: &Env| job.and_then(|work| work(env)),
            move |r| {
                let Some(core) = weak.upgrade() else { return };
                let mut core = core.borrow_mut();
                if core.epoch != epoch {
                    // A reset abandoned the command: nothing of it reaches the new state (an
                    // object its worker made in the backend went with the backend's reset, or
                    // goes with the next one).
                    return;
                }
                let result = match r {
                    Ok(Ok(finish)) => core.with_cmd_ctx(finish),
                    Ok(Err(e)) => Err(e),
                    Err(panic) => Err(CmdError::Internal(panic)),
                };
                core.finish_command(hdr, result);
            },
        );
    }

    /// Runs `f` with the command context ([`cmd::Ctx`]) on this device, then does what the
    /// command asked for in it.
    fn with_cmd_ctx<R>(&mut self, f: impl FnOnce(&mut cmd::Ctx<'_>) -> R) -> R {
        let mut dev = cmd::Ctx {
            cfg: &self.cfg,
            mem: &self.mem,
            env: &self.env,
            active: self.active,
            uar_pfn: self.dsr.as_ref().map(|d| d.uar_pfn),
            objects: &mut self.objects,
            drain: None,
        };
        let r = f(&mut dev);
        if let Some(h) = dev.drain {
            self.schedule_qp(h);
        }
        r
    }

    pub(super) fn finish_command(&mut self, hdr: CmdHdr, result: cmd::CmdResult) {
        let ack = hdr.cmd | RESP_ACK;
        let (mut bytes, code) = match result {
            Ok(body) => (body, err::OK),
            Err(e) => {
                log::debug!("command {} failed: {e}", hdr.cmd);
                self.stats.command(hdr.cmd).errors += 1;
                match e.code() {
                    err::ENOMEM => self.stats.refused.over_limit += 1,
                    err::EIO => {}
                    _ => self.stats.refused.commands += 1,
                }
                (vec![0u8; std::mem::size_of::<RespHdr>()], e.code())
            }
        };
        if bytes.len() < std::mem::size_of::<RespHdr>() {
            bytes.resize(std::mem::size_of::<RespHdr>(), 0);
        }
        let rh = RespHdr {
            response: hdr.response,
            ack,
            err: code.min(255) as u8,
            reserved: [0; 3],
        };
        bytes[..16].copy_from_slice(rh.as_slice());
        if let Some(d) = self.dsr.as_ref() {
            if let Err(e) = self.mem.memory().write_slice(&bytes, d.resp_slot) {
                self.stats.refused.dma += 1;
                log::debug!("response slot unwritable: {e}");
            }
        }
        self.regs.err = code;
        self.cmd_pending = false;
        self.raise(vector::RESPONSE);
        self.drain_deferred();
    }
}
