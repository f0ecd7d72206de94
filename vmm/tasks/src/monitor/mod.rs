//! Status monitoring: every tick the monitor agent receives each user VM's
//! signals and decides its health, `starting`, `running`, `degraded`,
//! `stalled` or `stopped`, with a reason. Rules, first match wins:
//!
//! 1. its cgroup is gone: `stopped` (gone);
//! 2. no sign of life (CPU time, packets, log lines) for `stall_ms`:
//!    `stalled` (no progress). A VM that idles legitimately longer than
//!    that must show a heartbeat, as an agent in it would;
//! 3. seen for less than `start_ticks` and no CPU time yet: `starting`;
//! 4. a new OOM kill, or one within `oom_hold_ticks`: `degraded` (OOM);
//! 5. working set at `ws_ppm` of its memory limit or more: `degraded`
//!    (memory pressure);
//! 6. run-queue delay p99 at `runq_us` or more: `degraded` (starved);
//! 7. drops faster than `drops_per_tick`: `degraded` (drops);
//! 8. otherwise `running`.
//!
//! A VM leaves `degraded` only after `recover_ticks` ticks without a cause,
//! so a signal at the edge does not flap its state.

use mc_proto::signals::{Health, HealthChange, Reason, VmSignals, FLAG_EXISTS, FLAG_MEM_LIMIT};

/// The monitor's bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub stall_ms: u32,
    pub start_ticks: u32,
    pub oom_hold_ticks: u32,
    /// Working set / limit, parts per million.
    pub ws_ppm: u32,
    pub runq_us: u32,
    pub drops_per_tick: u64,
    pub recover_ticks: u32,
}

impl Policy {
    /// The default bounds at a tick of `tick_ms` (the Telemetry message's
    /// parameter): the times stay the same whatever the tick.
    pub fn for_tick_ms(tick_ms: u32) -> Policy {
        let ticks = |ms: u32| (ms / tick_ms.max(1)).max(1);
        Policy { start_ticks: ticks(5_000), oom_hold_ticks: ticks(30_000), ..Policy::default() }
    }
}

impl Default for Policy {
    /// At a 1 s tick: stalled after 10 s quiet; an OOM marks a VM degraded
    /// for 30 s; 95% of its memory limit; 50 ms run-queue delay p99 (a
    /// vCPU waiting that long is visibly starved); 1,000 drops a tick.
    fn default() -> Policy {
        Policy {
            stall_ms: 10_000,
            start_ticks: 5,
            oom_hold_ticks: 30,
            ws_ppm: 950_000,
            runq_us: 50_000,
            drops_per_tick: 1000,
            recover_ticks: 3,
        }
    }
}

/// What the monitor remembers of one VM between ticks (in guest memory).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmState {
    /// Zero until the VM is first seen.
    pub first_tick: u32,
    pub seen: bool,
    /// `Health as u8`, 0 before the first decision.
    pub health: u8,
    pub reason: u8,
    pub since_tick: u32,
    pub oom_total: u32,
    pub last_oom_tick: Option<u32>,
    pub drops_total: u64,
    /// Ticks in a row without a cause for `degraded`.
    pub calm_ticks: u32,
}

impl VmState {
    /// A VM not seen yet (a `const`, for the agent's static table).
    pub const NEW: VmState = VmState {
        first_tick: 0,
        seen: false,
        health: 0,
        reason: 0,
        since_tick: 0,
        oom_total: 0,
        last_oom_tick: None,
        drops_total: 0,
        calm_ticks: 0,
    };

    pub fn health(&self) -> Option<Health> {
        Health::from_u8(self.health)
    }
}

/// The health a VM's signals call for this tick, and the number behind it.
fn verdict(prev: &VmState, s: &VmSignals, tick: u32, p: &Policy) -> (Health, Reason, u32) {
    if s.flags & FLAG_EXISTS == 0 {
        return (Health::Stopped, Reason::Gone, 0);
    }
    if s.quiet_ms >= p.stall_ms {
        return (Health::Stalled, Reason::NoProgress, s.quiet_ms);
    }
    let first = if prev.seen { prev.first_tick } else { tick };
    if s.cpu_ns_total == 0 && tick.saturating_sub(first) < p.start_ticks {
        return (Health::Starting, Reason::Booting, 0);
    }
    let new_ooms = s.oom_kills_total.saturating_sub(prev.oom_total);
    let oom_recent = new_ooms > 0 || prev.last_oom_tick.is_some_and(|t| tick.saturating_sub(t) < p.oom_hold_ticks);
    if oom_recent && prev.seen {
        return (Health::Degraded, Reason::OomKilled, s.oom_kills_total);
    }
    if s.flags & FLAG_MEM_LIMIT != 0
        && s.mem_limit > 0
        && (s.working_set as u128) * 1_000_000 >= (s.mem_limit as u128) * p.ws_ppm as u128
    {
        return (Health::Degraded, Reason::MemoryPressure, (s.working_set >> 20) as u32);
    }
    if s.runq_p99_us >= p.runq_us {
        return (Health::Degraded, Reason::RunqDelay, s.runq_p99_us);
    }
    let drops = s.drops_total.saturating_sub(prev.drops_total);
    if prev.seen && drops >= p.drops_per_tick {
        return (Health::Degraded, Reason::Drops, drops.min(u32::MAX as u64) as u32);
    }
    (Health::Running, Reason::Healthy, 0)
}

/// One VM, one tick: the new state, and the change to report if its health
/// or reason changed.
pub fn assess(prev: &VmState, s: &VmSignals, tick: u32, p: &Policy) -> (VmState, Option<HealthChange>) {
    let (mut health, mut reason, mut detail) = verdict(prev, s, tick, p);
    let was = prev.health();
    // Out of `degraded` only after a few calm ticks (no flapping at an edge).
    let mut calm_ticks = 0;
    if was == Some(Health::Degraded) && health == Health::Running {
        calm_ticks = prev.calm_ticks + 1;
        if calm_ticks < p.recover_ticks {
            health = Health::Degraded;
            reason = Reason::from_u8(prev.reason).unwrap_or(Reason::OomKilled);
            detail = 0;
        }
    }
    let new_oom = s.oom_kills_total > prev.oom_total && prev.seen;
    let next = VmState {
        first_tick: if prev.seen { prev.first_tick } else { tick },
        seen: true,
        health: health as u8,
        reason: reason as u8,
        since_tick: if was == Some(health) { prev.since_tick } else { tick },
        oom_total: s.oom_kills_total,
        last_oom_tick: if new_oom { Some(tick) } else { prev.last_oom_tick },
        drops_total: s.drops_total,
        calm_ticks,
    };
    let changed = was != Some(health) || prev.reason != reason as u8;
    let change = changed.then_some(HealthChange { slot: s.slot, health, reason, tick, detail });
    (next, change)
}

/// A tick over a batch: `states` is indexed by slot (slots past its end are
/// ignored and counted); every change goes to `report`. Returns how many
/// records were out of range.
pub fn tick(
    states: &mut [VmState],
    batch: impl Iterator<Item = VmSignals>,
    tick: u32,
    p: &Policy,
    mut report: impl FnMut(HealthChange),
) -> u32 {
    let mut out_of_range = 0;
    for s in batch {
        let Some(st) = states.get_mut(s.slot as usize) else {
            out_of_range += 1;
            continue;
        };
        let (next, change) = assess(st, &s, tick, p);
        *st = next;
        if let Some(c) = change {
            report(c);
        }
    }
    out_of_range
}

#[cfg(test)]
mod tests;
