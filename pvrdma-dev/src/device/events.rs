//! Interrupts and async events.

use super::*;

impl Core {
    // ---- interrupts ----------------------------------------------------------------------

    pub(crate) fn raise(&mut self, vector: u16) {
        let cause = match vector {
            vector::RESPONSE => IntrCause::RESPONSE,
            vector::ASYNC => IntrCause::ASYNC,
            _ => IntrCause::CQ,
        };
        if self.regs.imr & (1 << vector) != 0 {
            return;
        }
        if self.config.msix_enabled() {
            if self.opts.msix_table_in_device
                && (self.config.msix_function_masked() || self.msix.is_masked(vector))
            {
                self.msix.set_pending(vector, true);
                return;
            }
            self.count_interrupt(vector);
            self.irq.trigger(vector);
        } else {
            // MSI/INTx fallback: only vector 0 is handled by the driver, which reads ICR.
            self.regs.icr |= cause.bits();
            if !self.config.intx_disabled() {
                self.stats.interrupts.intx += 1;
                self.irq.set_intx(true);
            }
        }
    }

    fn count_interrupt(&mut self, vector: u16) {
        let i = &mut self.stats.interrupts;
        match vector {
            vector::RESPONSE => i.response += 1,
            vector::ASYNC => i.async_events += 1,
            _ => i.cq += 1,
        }
    }

    pub(super) fn fire_unmasked_pending(&mut self) {
        if !self.opts.msix_table_in_device || !self.config.msix_enabled() {
            return;
        }
        for v in 0..3u16 {
            if self.msix.is_pending(v)
                && !self.msix.is_masked(v)
                && !self.config.msix_function_masked()
            {
                self.msix.set_pending(v, false);
                self.count_interrupt(v);
                self.irq.trigger(v);
            }
        }
    }

    pub(crate) fn post_event(&mut self, event_type: u32, info: u32) {
        if !self.active {
            return;
        }
        let mem = self.mem.memory();
        let Some(d) = self.dsr.as_mut() else { return };
        match d.post_event(&*mem, event_type, info) {
            Ok(true) => {
                self.stats.events += 1;
                self.raise(vector::ASYNC);
            }
            Ok(false) => log::debug!("async event ring full; event {event_type} dropped"),
            Err(e) => {
                self.stats.refused.dma += 1;
                log::debug!("async event ring unusable: {e}");
            }
        }
    }
}
