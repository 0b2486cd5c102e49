//! Register and config-space accesses, the DSR, CTL commands and reset.

use super::*;

/// Whether an access of `len` bytes at `off` lies inside a BAR of `size` bytes. UAR accesses
/// outside BAR2 must not alias a UAR page: `off >> 12` truncated to 32 bits would map
/// offset 2^44 onto the kernel's page 0.
fn access_in_bar(off: u64, len: usize, size: u64) -> bool {
    off.checked_add(len as u64).is_some_and(|end| end <= size)
}

impl Core {
    pub(super) fn new(
        cfg: DeviceConfig,
        opts: DeviceOptions,
        mem: GuestMem,
        irq: Arc<dyn InterruptSink>,
        env: Arc<Env>,
        exec: Exec,
        weak: Weak<RefCell<Core>>,
    ) -> Core {
        let config = ConfigSpace::new(cfg.uar_bar_size(), crate::pci::DEFAULT_SUBSYSTEM);
        Core {
            config,
            msix: MsixTable::new(),
            regs: Regs::power_on(),
            dsr: None,
            active: false,
            epoch: 0,
            cmd_pending: false,
            deferred: VecDeque::new(),
            objects: Objects::new(&cfg),
            stats: MainCounters::default(),
            cqs_written: Vec::new(),
            progress_running: false,
            logs: GuestLogs::default(),
            cfg,
            opts,
            mem,
            irq,
            env,
            exec,
            weak,
        }
    }

    pub(super) fn on_msg(&mut self, msg: Msg) {
        if self.cmd_pending {
            if let Msg::Reset { .. } = msg {
                // A reset does not wait for the command in progress (its backend work may take
                // long): the command is abandoned, and what waited behind it is answered as a
                // device being reset answers.
                self.abandon_command();
                self.serve(msg);
                return;
            }
            if self.deferred.len() >= MAX_DEFERRED {
                // Only posted writes can pile up here (every other access waits for its
                // answer); a guest that posts this many while one command runs loses them.
                self.stats.refused.dropped_writes += 1;
                crate::limited_warn!(
                    self.logs.dropped_writes,
                    "{}: {MAX_DEFERRED} accesses wait for a command; dropping one",
                    self.opts.name
                );
                if let Msg::Read { reply, .. } = msg {
                    let _ = reply.send(u64::MAX);
                }
                return;
            }
            self.deferred.push_back(msg);
            return;
        }
        self.serve(msg);
    }

    pub(super) fn serve(&mut self, msg: Msg) {
        match msg {
            Msg::Read {
                region,
                offset,
                len,
                reply,
            } => {
                let v = self.read(region, offset, len);
                let _ = reply.send(v);
            }
            Msg::Write {
                region,
                offset,
                len,
                value,
                done,
            } => {
                self.write(region, offset, len, value);
                if let Some(d) = done {
                    let _ = d.send(());
                }
            }
            Msg::Reset { done } => {
                self.reset();
                self.config.reset();
                self.msix.reset();
                let _ = done.send(());
            }
            Msg::Stats { reply } => {
                let _ = reply.send(self.report());
            }
            Msg::Resources { reply } => {
                let _ = reply.send(self.resources());
            }
            Msg::Stop => {}
        }
    }

    /// Gives up the command in progress (for a reset, which follows at once): its completion,
    /// from before the reset, is dropped when it comes; reads that waited behind it read
    /// all-ones, writes are dropped.
    pub(super) fn abandon_command(&mut self) {
        self.cmd_pending = false;
        for m in std::mem::take(&mut self.deferred) {
            match m {
                Msg::Read { reply, .. } => {
                    let _ = reply.send(u64::MAX);
                }
                Msg::Write { done, .. } => {
                    if let Some(d) = done {
                        let _ = d.send(());
                    }
                }
                Msg::Reset { done } => {
                    let _ = done.send(());
                }
                Msg::Stats { reply } => {
                    let _ = reply.send(self.report());
                }
                Msg::Resources { reply } => {
                    let _ = reply.send(self.resources());
                }
                Msg::Stop => {}
            }
        }
    }

    /// Serves accesses that waited for a command, until one starts another command.
    pub(super) fn drain_deferred(&mut self) {
        while !self.cmd_pending {
            let Some(m) = self.deferred.pop_front() else {
                break;
            };
            self.serve(m);
        }
    }

    pub(super) fn read(&mut self, region: Region, off: u64, len: usize) -> u64 {
        let mut buf = [0xffu8; 8];
        if len == 0 {
            // A zero-length read touches nothing (an ICR read would otherwise clear it).
            return u64::from_le_bytes(buf);
        }
        let len = len.min(8);
        match region {
            Region::Config => self.config.read(off, &mut buf[..len]),
            Region::Bar(b) if usize::from(b) == MSIX_BAR => self.msix.read(off, &mut buf[..len]),
            Region::Bar(b) if usize::from(b) == REG_BAR => {
                // Registers are 32-bit; any size and alignment is answered from the bytes.
                for (i, byte) in buf[..len].iter_mut().enumerate() {
                    let o = off.wrapping_add(i as u64);
                    let reg = self.read_reg(o & !3, len <= 4 && o & !3 == off & !3);
                    *byte = reg.to_le_bytes()[(o & 3) as usize];
                }
            }
            // UAR reads return all-ones (CVE-2018-20191: QEMU crashed on them).
            _ => {}
        }
        u64::from_le_bytes(buf)
    }

    pub(super) fn read_reg(&mut self, off: u64, side_effects: bool) -> u32 {
        match off {
            offset::VERSION => self.cfg.version,
            offset::DSRLOW => self.regs.dsr_low,
            offset::DSRHIGH => self.regs.dsr_high,
            offset::ERR => self.regs.err,
            offset::ICR => {
                let v = self.regs.icr;
                if side_effects {
                    self.regs.icr = 0;
                    self.irq.set_intx(false);
                }
                v
            }
            offset::IMR => self.regs.imr,
            offset::MACL => self.regs.macl,
            offset::MACH => self.regs.mach,
            _ => 0,
        }
    }

    pub(super) fn write(&mut self, region: Region, off: u64, len: usize, value: u64) {
        if len == 0 {
            // A zero-length write is not a one-byte write of 0.
            return;
        }
        let len = len.min(8);
        let bytes = value.to_le_bytes();
        match region {
            Region::Config => {
                self.config.write(off, &bytes[..len]);
            }
            Region::Bar(b) if usize::from(b) == MSIX_BAR => {
                self.msix.write(off, &bytes[..len]);
                self.fire_unmasked_pending();
            }
            Region::Bar(b) if usize::from(b) == REG_BAR => {
                if len == 4 && off % 4 == 0 {
                    self.write_reg(off, value as u32);
                } else if len == 8 && off % 8 == 0 {
                    self.write_reg(off, value as u32);
                    self.write_reg(off + 4, (value >> 32) as u32);
                } else {
                    self.stats.refused.registers += 1;
                    log::debug!("ignored {len}-byte register write at {off:#x}");
                }
            }
            Region::Bar(b) if usize::from(b) == UAR_BAR => {
                if !access_in_bar(off, len, self.config.bar_size(UAR_BAR)) {
                    self.stats.doorbells += 1;
                    self.refuse_doorbell(off, value as u32, "outside the UAR BAR");
                } else if len == 4 && off % 4 == 0 {
                    self.doorbell(off, value as u32);
                } else if len == 8 && off % 8 == 0 {
                    self.doorbell(off, value as u32);
                    self.doorbell(off + 4, (value >> 32) as u32);
                } else {
                    self.stats.doorbells += 1;
                    self.refuse_doorbell(off, value as u32, "not a 4- or 8-byte aligned write");
                }
            }
            _ => {}
        }
    }

    pub(super) fn write_reg(&mut self, off: u64, v: u32) {
        match off {
            offset::DSRLOW => self.regs.dsr_low = v,
            offset::DSRHIGH => {
                self.regs.dsr_high = v;
                self.load_dsr();
            }
            offset::CTL => self.control(v),
            offset::REQUEST => {
                if v == 0 {
                    self.start_command();
                } else {
                    self.stats.refused.registers += 1;
                    log::debug!("REQUEST write of {v:#x} ignored");
                }
            }
            offset::IMR => {
                self.regs.imr = v;
            }
            offset::MACL => self.regs.macl = v,
            offset::MACH => self.regs.mach = v,
            _ => {
                self.stats.refused.registers += 1;
                log::debug!("write to read-only or unknown register {off:#x} ignored");
            }
        }
    }

    pub(super) fn load_dsr(&mut self) {
        let addr = (u64::from(self.regs.dsr_high) << 32) | u64::from(self.regs.dsr_low);
        // A second DSR load while objects exist (hazard 9) starts from a clean device.
        if self.dsr.is_some() || self.active {
            self.reset_objects();
        }
        let mem = self.mem.memory();
        match dsr::load(&*mem, addr, &self.cfg) {
            Ok(d) => {
                log::debug!(
                    "DSR loaded at {addr:#x}, driver version {}",
                    d.driver_version
                );
                self.dsr = Some(d);
                self.regs.err = err::OK;
            }
            Err(e) => {
                self.stats.refused.dsr += 1;
                crate::limited_warn!(
                    self.logs.bad_dsr,
                    "{}: DSR at {addr:#x} rejected: {e}",
                    self.opts.name
                );
                self.dsr = None;
                self.regs.err = err::EFAULT;
            }
        }
    }

    pub(super) fn control(&mut self, v: u32) {
        match v {
            ctl::ACTIVATE => {
                if self.dsr.is_some() {
                    let was = self.active;
                    self.active = true;
                    self.regs.err = err::OK;
                    if !was {
                        // There is no link-state caching in the driver: the port is ACTIVE
                        // from activation, and an event says so.
                        self.post_event(event::PORT_ACTIVE, 1);
                    }
                } else {
                    self.regs.err = err::EIO;
                }
            }
            ctl::UNQUIESCE => {
                self.regs.err = if self.active { err::OK } else { err::EIO };
            }
            ctl::RESET => {
                self.reset();
                self.regs.err = err::OK;
            }
            _ => {
                self.stats.refused.registers += 1;
                log::debug!("unknown CTL value {v:#x}");
                self.regs.err = err::EINVAL;
            }
        }
    }

    /// Frees every object; the backend and rings are reset; in-flight work is disowned.
    pub(super) fn reset_objects(&mut self) {
        for (_, qp) in self.objects.qps.iter() {
            qp.shared.dead.store(true, Ordering::Release);
        }
        for (_, srq) in self.objects.srqs.iter() {
            srq.shared.dead.store(true, Ordering::Release);
        }
        self.env.backend.reset();
        self.objects.clear();
        self.epoch = self.epoch.wrapping_add(1);
    }

    /// CTL RESET / DEVICE_RESET: back to the power-on state of the register file.
    pub(crate) fn reset(&mut self) {
        self.stats.resets += 1;
        self.reset_objects();
        self.dsr = None;
        self.active = false;
        self.regs = Regs::power_on();
        self.irq.set_intx(false);
    }

    pub(super) fn teardown(&mut self) {
        self.reset_objects();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uar_accesses_outside_the_bar_are_rejected() {
        let size = DeviceConfig::default().uar_bar_size();
        assert!(access_in_bar(0, 4, size));
        assert!(access_in_bar(size - 4, 4, size));
        assert!(!access_in_bar(size - 2, 4, size));
        assert!(!access_in_bar(size, 4, size));
        assert!(
            !access_in_bar(1 << 44, 4, size),
            "2^44 must not alias page 0"
        );
        assert!(!access_in_bar(u64::MAX - 1, 4, size));
    }
}
