//! The records of protocol 2's telemetry and health messages: what the
//! governor measures of each user VM every tick ([`VmSignals`], 64 bytes)
//! and what the monitor agent decides of it ([`HealthChange`], 16 bytes).
//! Fixed size and little endian, so the freestanding agent reads them in
//! place without allocating.

use crate::le::{u32_at, u64_at};

pub const SIGNALS_LEN: usize = 64;
pub const CHANGE_LEN: usize = 16;

/// The VM's cgroup exists (clear: the VM is gone).
pub const FLAG_EXISTS: u32 = 1;
/// `mem_limit` is a real limit.
pub const FLAG_MEM_LIMIT: u32 = 2;

/// One user VM's signals in one tick.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmSignals {
    /// The VM's index in the governor's table (stable while it lives).
    pub slot: u32,
    pub flags: u32,
    /// CPU time consumed so far (ns): grows while the VM makes progress.
    pub cpu_ns_total: u64,
    /// How long since the host last saw a sign of life (CPU time, packets,
    /// a log line), ms.
    pub quiet_ms: u32,
    /// CPU used over the last tick, parts per million of one CPU.
    pub cpu_ppm: u32,
    /// Run-queue delay p99 over the last tick, µs.
    pub runq_p99_us: u32,
    /// OOM kills in the VM so far.
    pub oom_kills_total: u32,
    pub working_set: u64,
    pub mem_limit: u64,
    /// Packets dropped so far (QoS policing and the interfaces' own drops).
    pub drops_total: u64,
}

impl VmSignals {
    pub fn encode(&self) -> [u8; SIGNALS_LEN] {
        let mut b = [0u8; SIGNALS_LEN];
        b[0..4].copy_from_slice(&self.slot.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.cpu_ns_total.to_le_bytes());
        b[16..20].copy_from_slice(&self.quiet_ms.to_le_bytes());
        b[20..24].copy_from_slice(&self.cpu_ppm.to_le_bytes());
        b[24..28].copy_from_slice(&self.runq_p99_us.to_le_bytes());
        b[28..32].copy_from_slice(&self.oom_kills_total.to_le_bytes());
        b[32..40].copy_from_slice(&self.working_set.to_le_bytes());
        b[40..48].copy_from_slice(&self.mem_limit.to_le_bytes());
        b[48..56].copy_from_slice(&self.drops_total.to_le_bytes());
        b
    }

    /// Any 64 bytes decode (every field is a plain number); the message
    /// around them was checked whole. The reserved tail must be zero.
    pub fn decode(b: &[u8; SIGNALS_LEN]) -> Option<VmSignals> {
        if b[56..64].iter().any(|&x| x != 0) {
            return None;
        }
        Some(VmSignals {
            slot: u32_at(b, 0),
            flags: u32_at(b, 4),
            cpu_ns_total: u64_at(b, 8),
            quiet_ms: u32_at(b, 16),
            cpu_ppm: u32_at(b, 20),
            runq_p99_us: u32_at(b, 24),
            oom_kills_total: u32_at(b, 28),
            working_set: u64_at(b, 32),
            mem_limit: u64_at(b, 40),
            drops_total: u64_at(b, 48),
        })
    }
}

/// A VM's health, as the monitor agent decides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    Starting = 1,
    Running = 2,
    Degraded = 3,
    Stalled = 4,
    Stopped = 5,
}

impl Health {
    pub fn from_u8(v: u8) -> Option<Health> {
        Some(match v {
            1 => Health::Starting,
            2 => Health::Running,
            3 => Health::Degraded,
            4 => Health::Stalled,
            5 => Health::Stopped,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Health::Starting => "starting",
            Health::Running => "running",
            Health::Degraded => "degraded",
            Health::Stalled => "stalled",
            Health::Stopped => "stopped",
        }
    }
}

/// Why a VM is in its state (a bounded code; the host words it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Seen for less than the start-up grace, no progress yet.
    Booting = 1,
    /// Every signal within bounds.
    Healthy = 2,
    /// OOM kills in the VM (recently).
    OomKilled = 3,
    /// Working set at its memory limit.
    MemoryPressure = 4,
    /// Run-queue delay p99 over the bound (starved of CPU).
    RunqDelay = 5,
    /// Packets dropped faster than the bound.
    Drops = 6,
    /// No sign of life for the stall time.
    NoProgress = 7,
    /// Its cgroup is gone.
    Gone = 8,
}

impl Reason {
    pub fn from_u8(v: u8) -> Option<Reason> {
        Some(match v {
            1 => Reason::Booting,
            2 => Reason::Healthy,
            3 => Reason::OomKilled,
            4 => Reason::MemoryPressure,
            5 => Reason::RunqDelay,
            6 => Reason::Drops,
            7 => Reason::NoProgress,
            8 => Reason::Gone,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Reason::Booting => "booting",
            Reason::Healthy => "healthy",
            Reason::OomKilled => "oom-killed",
            Reason::MemoryPressure => "memory-pressure",
            Reason::RunqDelay => "run-queue-delay",
            Reason::Drops => "drops",
            Reason::NoProgress => "no-progress",
            Reason::Gone => "gone",
        }
    }

    /// The states a reason may explain (a lying agent is caught here).
    pub fn explains(self, h: Health) -> bool {
        matches!(
            (self, h),
            (Reason::Booting, Health::Starting)
                | (Reason::Healthy, Health::Running)
                | (Reason::OomKilled | Reason::MemoryPressure | Reason::RunqDelay | Reason::Drops, Health::Degraded)
                | (Reason::NoProgress, Health::Stalled)
                | (Reason::Gone, Health::Stopped)
        )
    }
}

/// A VM's health changed (agent -> host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthChange {
    pub slot: u32,
    pub health: Health,
    pub reason: Reason,
    /// The tick of the change (the agent's tick counter).
    pub tick: u32,
    /// A number behind the reason (OOM kills, delay µs, quiet ms...).
    pub detail: u32,
}

impl HealthChange {
    pub fn encode(&self) -> [u8; CHANGE_LEN] {
        let mut b = [0u8; CHANGE_LEN];
        b[0..4].copy_from_slice(&self.slot.to_le_bytes());
        b[4] = self.health as u8;
        b[5] = self.reason as u8;
        b[8..12].copy_from_slice(&self.tick.to_le_bytes());
        b[12..16].copy_from_slice(&self.detail.to_le_bytes());
        b
    }

    /// Refuses unknown states or reasons, a reason that does not explain
    /// the state, and non-zero padding.
    pub fn decode(b: &[u8; CHANGE_LEN]) -> Option<HealthChange> {
        let health = Health::from_u8(b[4])?;
        let reason = Reason::from_u8(b[5])?;
        if b[6] != 0 || b[7] != 0 || !reason.explains(health) {
            return None;
        }
        Some(HealthChange { slot: u32_at(b, 0), health, reason, tick: u32_at(b, 8), detail: u32_at(b, 12) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let s = VmSignals {
            slot: 3,
            flags: FLAG_EXISTS | FLAG_MEM_LIMIT,
            cpu_ns_total: u64::MAX - 1,
            quiet_ms: 12,
            cpu_ppm: 250_000,
            runq_p99_us: 900,
            oom_kills_total: 2,
            working_set: 64 << 20,
            mem_limit: 128 << 20,
            drops_total: 77,
        };
        assert_eq!(VmSignals::decode(&s.encode()), Some(s));
        let mut b = s.encode();
        b[60] = 1;
        assert_eq!(VmSignals::decode(&b), None, "reserved bytes must be zero");
        let c = HealthChange { slot: 9, health: Health::Degraded, reason: Reason::OomKilled, tick: 40, detail: 1 };
        assert_eq!(HealthChange::decode(&c.encode()), Some(c));
        let mut b = c.encode();
        b[5] = Reason::Healthy as u8;
        assert_eq!(HealthChange::decode(&b), None, "'healthy' does not explain 'degraded'");
        b[5] = 99;
        assert_eq!(HealthChange::decode(&b), None);
    }
}
