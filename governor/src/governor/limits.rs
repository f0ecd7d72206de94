//! QoS limits at run time: set, change and clear a VM direction's limit
//! without reattaching programs or touching other VMs.

use governor_common::{Policer, QOS_SHAPE};

use super::shaping::HTB_MAJOR;
use super::{Governor, GovernorError, LimitStatus};
use crate::qos::{tokens_bytes, Direction, Limit, Mode};
use crate::shape::Shaper;
use crate::telemetry::Telemetry;

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer; CLOCK_MONOTONIC is what bpf_ktime_get_ns reads.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl<T: Telemetry, S: Shaper> Governor<T, S> {
    /// Set or change the limit of one direction of a VM. On error nothing
    /// of this call stays applied and the previous limit stays in force.
    pub fn set_limit(&mut self, vm: &str, dir: Direction, limit: Limit) -> Result<(), GovernorError> {
        let i = self.vm_index(vm)?;
        let qos_err = |reason: String| GovernorError::Qos { vm: vm.into(), direction: dir.as_str(), reason };
        if self.vms[i].interfaces.is_empty() {
            return Err(qos_err("the vm has no interfaces to limit".into()));
        }
        // The interfaces must still be the ones we attached to.
        for itf in &self.vms[i].interfaces {
            match self.telemetry.ifindex(&itf.name) {
                Ok(now) if now == itf.ifindex => {}
                _ => return Err(qos_err(format!("interface {} is gone", itf.name))),
            }
        }
        let slot = self.vms[i].slot;
        let was_shaped = self.vms[i].shaped(dir);
        match limit.mode {
            Mode::Police => {
                let prev = self.telemetry.policer(slot, dir).ok();
                let p = limit.policer(prev.as_ref(), monotonic_ns());
                self.telemetry.set_policer(slot, dir, p)?;
            }
            Mode::Shape => {
                let redirect = self.shape_setup(i, dir, &limit)?;
                let p = Policer {
                    mode: QOS_SHAPE,
                    classid: ((HTB_MAJOR as u32) << 16) | u32::from(self.vms[i].class_minor()),
                    redirect_ifindex: redirect,
                    ..Policer::default()
                };
                if let Err(e) = self.telemetry.set_policer(slot, dir, p) {
                    if !was_shaped {
                        self.shape_teardown(i, dir);
                    }
                    return Err(e.into());
                }
            }
        }
        if was_shaped && limit.mode == Mode::Police {
            self.shape_teardown(i, dir);
        }
        *self.vms[i].limits.get_mut(dir) = Some(limit);
        tracing::info!(vm, direction = dir.as_str(), ?limit, "limit set");
        Ok(())
    }

    /// Remove a limit: line rate again. Removing no limit is not an error.
    pub fn clear_limit(&mut self, vm: &str, dir: Direction) -> Result<(), GovernorError> {
        let i = self.vm_index(vm)?;
        if self.vms[i].limits.get(dir).is_none() {
            return Ok(());
        }
        // Stop policing/classifying first, then remove the classes.
        self.telemetry.set_policer(self.vms[i].slot, dir, Policer::default())?;
        if self.vms[i].shaped(dir) {
            self.shape_teardown(i, dir);
        }
        *self.vms[i].limits.get_mut(dir) = None;
        tracing::info!(vm, direction = dir.as_str(), "limit removed");
        Ok(())
    }

    /// Every limit in force with its counters.
    pub fn limits(&self) -> Result<Vec<LimitStatus>, GovernorError> {
        let mut out = Vec::new();
        for vm in &self.vms {
            for dir in [Direction::Egress, Direction::Ingress] {
                let Some(l) = *vm.limits.get(dir) else { continue };
                let st = self.telemetry.qos_stats(vm.slot, dir)?;
                let tokens = match l.mode {
                    Mode::Police => Some(tokens_bytes(&self.telemetry.policer(vm.slot, dir)?, monotonic_ns())),
                    Mode::Shape => None,
                };
                out.push(LimitStatus {
                    vm: vm.cfg.name.clone(),
                    direction: dir,
                    mode: l.mode,
                    rate_bps: l.rate_bps,
                    burst_bytes: l.burst_bytes,
                    packet_rate: l.packet_rate,
                    tokens_bytes: tokens,
                    passed_bytes: st.passed_bytes,
                    passed_packets: st.passed_packets,
                    dropped_bytes: st.dropped_bytes,
                    dropped_packets: st.dropped_packets,
                });
            }
        }
        Ok(out)
    }
}
