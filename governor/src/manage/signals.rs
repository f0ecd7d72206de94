//! From the governor's per-VM telemetry to protocol 2's signals: the slot
//! (the VM's place among the user VMs), CPU progress, how long since the
//! last sign of life (CPU time or traffic moved), run-queue delay, memory
//! against its limit, OOM kills and drops.

use std::collections::HashMap;
use std::time::Instant;

use vmm::proto::signals::{VmSignals, FLAG_EXISTS, FLAG_MEM_LIMIT};

use crate::sampler::VmStatus;

/// What the signals need beyond the status: per VM name, its memory limit
/// and its packets dropped so far.
#[derive(Clone, Debug, Default)]
pub struct Extras {
    pub mem_limit: HashMap<String, u64>,
    pub drops: HashMap<String, u64>,
}

/// Remembers when each VM last showed a sign of life.
#[derive(Default)]
pub struct SignalTracker {
    last: HashMap<String, Life>,
    /// Counts calls; a VM not seen in this call's generation is forgotten
    /// (a set of this call's names would cost a lookup per VM per VM).
    generation: u64,
}

/// A VM's CPU time and bytes when they last moved, and when that was.
struct Life {
    cpu_ns: u64,
    bytes: u64,
    since: Instant,
    generation: u64,
}

impl SignalTracker {
    /// The signals of the user VMs in `vms` (role `user`; the MC subtree is
    /// the governor's own), with the VM names by slot.
    pub fn signals(&mut self, now: Instant, vms: &[VmStatus], extras: &Extras) -> (Vec<String>, Vec<VmSignals>) {
        let mut names = Vec::new();
        let mut out = Vec::new();
        self.generation += 1;
        let generation = self.generation;
        for v in vms.iter().filter(|v| v.role == "user") {
            let cpu_ns = (v.cpu_seconds_total * 1e9) as u64;
            let bytes = v.rx_bytes_total.saturating_add(v.tx_bytes_total);
            // Look up before inserting: the name is cloned only for a new VM.
            if !self.last.contains_key(&v.name) {
                self.last.insert(v.name.clone(), Life { cpu_ns, bytes, since: now, generation });
            }
            let Some(life) = self.last.get_mut(&v.name) else { continue };
            if cpu_ns != life.cpu_ns || bytes != life.bytes {
                (life.cpu_ns, life.bytes, life.since) = (cpu_ns, bytes, now);
            }
            life.generation = generation;
            let quiet_ms = now.duration_since(life.since).as_millis().min(u32::MAX as u128) as u32;
            let limit = extras.mem_limit.get(&v.name).copied();
            let mut flags = FLAG_EXISTS;
            if limit.is_some() {
                flags |= FLAG_MEM_LIMIT;
            }
            out.push(VmSignals {
                slot: out.len() as u32,
                flags,
                cpu_ns_total: cpu_ns,
                quiet_ms,
                cpu_ppm: (v.cpu_percent * 10_000.0).clamp(0.0, u32::MAX as f64) as u32,
                runq_p99_us: v.runq_delay_p99_us.unwrap_or(0.0).clamp(0.0, u32::MAX as f64) as u32,
                oom_kills_total: v.oom_kills_total.min(u32::MAX as u64) as u32,
                working_set: v.memory_working_set_bytes.unwrap_or(0),
                mem_limit: limit.unwrap_or(0),
                drops_total: extras.drops.get(&v.name).copied().unwrap_or(0),
            });
            names.push(v.name.clone());
        }
        self.last.retain(|_, l| l.generation == generation);
        (names, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn vm(name: &str, role: &str, cpu_s: f64) -> VmStatus {
        VmStatus { name: name.into(), role: role.into(), cpu_seconds_total: cpu_s, ..VmStatus::default() }
    }

    #[test]
    fn quiet_time_grows_until_a_sign_of_life_and_mc_vms_are_left_out() {
        let mut t = SignalTracker::default();
        let t0 = Instant::now();
        let mut ex = Extras::default();
        ex.mem_limit.insert("a".into(), 64 << 20);
        let (names, s) = t.signals(t0, &[vm("a", "user", 1.0), vm("mc", "mc", 5.0), vm("b", "user", 2.0)], &ex);
        assert_eq!(names, vec!["a".to_string(), "b".to_string()]);
        assert_eq!((s[0].slot, s[1].slot), (0, 1));
        assert_eq!(s[0].flags, FLAG_EXISTS | FLAG_MEM_LIMIT);
        assert_eq!(s[1].flags, FLAG_EXISTS);
        let t1 = t0 + Duration::from_secs(3);
        let (_, s) = t.signals(t1, &[vm("a", "user", 1.0), vm("b", "user", 2.5)], &ex);
        assert_eq!((s[0].quiet_ms, s[1].quiet_ms), (3000, 0), "a made no progress, b did");
        assert_eq!(s[1].cpu_ns_total, 2_500_000_000);
        // A VM that left is forgotten: back later, it starts afresh.
        let t2 = t1 + Duration::from_secs(1);
        let (names, _) = t.signals(t2, &[vm("a", "user", 1.0)], &ex);
        assert_eq!(names, vec!["a".to_string()]);
        assert_eq!(t.last.len(), 1);
        let (_, s) = t.signals(t2 + Duration::from_secs(5), &[vm("a", "user", 1.0), vm("b", "user", 2.5)], &ex);
        assert_eq!((s[0].quiet_ms, s[1].quiet_ms), (9000, 0));
    }
}
