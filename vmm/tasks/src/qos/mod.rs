//! QoS flow-limit policy: each tick the qos agent receives every user VM's
//! measured rates, CPU and run-queue delay with its policy (configured
//! limits, and for an adaptive VM the narrowest limit it may be given), and
//! the card's network use against its threshold. It decides limit changes;
//! the host applies them (eBPF policer or HTB) and records each with its
//! reason. Rules, at most one narrowing per tick and none within
//! `settle_ticks` of the last (so the effect of one is measured before the
//! next):
//!
//! 1. card network over its threshold: the adaptive VM moving the most
//!    bytes in one direction is narrowed in that direction to its measured
//!    rate (or its limit, if lower) x threshold / use x 9/10 (what brings
//!    the card back under if its traffic is what crosses the card), never
//!    below its floor; a narrowing that would not bite (at the floor, or
//!    above what the VM moves) passes to the next;
//! 2. otherwise, a VM whose run-queue delay p99 is over `runq_us` is a
//!    victim; the adaptive VM other than it using the most CPU (at least
//!    `noisy_cpu_ppm`) is the noisy neighbour: its busier direction is
//!    halved (network work costs the host CPU in softirq), not below its
//!    floor;
//! 3. a narrowed limit is restored (back to the configured limit, or none)
//!    after `recover_ticks` calm ticks in a row: for the card rule, card use
//!    under threshold minus the margin and the VM no longer pushing against
//!    its narrowed limit (under half of it) or the card half empty; for the
//!    noisy rule, no other VM over the delay bound.
//!
//! The state (each VM's narrowed limits and calm counts, the last
//! narrowing's tick) lives in guest memory: a move or checkpoint carries it,
//! so a restore after a move still happens.

use mc_proto::qos::{Dir, QosChange, QosReason, QosSignals};

/// The qos agent's bounds (ticks are the governor's ticks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub settle_ticks: u32,
    pub recover_ticks: u32,
    /// Card use at or under threshold x (1 - margin) is calm; basis points.
    pub calm_margin_bp: u32,
    pub runq_us: u32,
    pub noisy_cpu_ppm: u32,
}

impl Default for Policy {
    /// Three ticks to see a narrowing's effect (at the governor's 1 s qos
    /// period: a relay's buffers drain and TCP settles), three calm ticks to restore,
    /// calm 20% under the threshold (the placement engine's default
    /// hysteresis is 10%; a limit costs the VM more than a move, so give it
    /// back only with room), the monitor's 50 ms delay bound, and a
    /// neighbour is noisy only when it uses a fifth of a CPU.
    fn default() -> Policy {
        Policy { settle_ticks: 3, recover_ticks: 3, calm_margin_bp: 2000, runq_us: 50_000, noisy_cpu_ppm: 200_000 }
    }
}

/// What the agent remembers of one VM (in guest memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmQos {
    /// The narrowed limit per [`Dir::index`]; 0 when not narrowed.
    pub limit: [u64; 2],
    /// `QosReason as u8` of the narrowing.
    pub reason: [u8; 2],
    pub calm: [u32; 2],
}

impl VmQos {
    pub const NEW: VmQos = VmQos { limit: [0; 2], reason: [0; 2], calm: [0; 2] };
}

/// The agent's memory across VMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Global {
    pub tick: u32,
    /// The tick of the last narrowing (0: none yet).
    pub last_narrow: u32,
    pub changes: u64,
}

impl Global {
    pub const NEW: Global = Global { tick: 0, last_narrow: 0, changes: 0 };
}

/// `rate` x `num` / `den`, in one step (no rounding in between).
fn scaled(rate: u64, num: u64, den: u64) -> u64 {
    ((rate as u128 * num as u128) / (den.max(1) as u128)).min(u64::MAX as u128) as u64
}

/// The limit in force for `d`: the lower of the narrowed and the
/// configured one (the configuration may have changed since); 0: none.
fn cap(st: &VmQos, s: &QosSignals, d: Dir) -> u64 {
    match (st.limit[d.index()], s.base[d.index()]) {
        (0, b) => b,
        (l, 0) => l,
        (l, b) => l.min(b),
    }
}

/// A narrowing to `target` (never below the floor) if it bites: below
/// what is in force and below what the VM moves now (a direction that
/// moves less than its floor, such as a receiver's ACKs, is left alone).
fn narrowing(st: &VmQos, s: &QosSignals, d: Dir, target: u64) -> Option<u64> {
    let target = target.max(s.min_rate);
    let now = cap(st, s, d);
    ((now == 0 || target < now) && target < s.rate[d.index()]).then_some(target)
}

/// One tick over `batch` (records with slots past `states` are ignored and
/// counted); card use and threshold in basis points. Every change goes to
/// `report` and is already in the state when this returns.
pub fn tick(
    g: &mut Global,
    states: &mut [VmQos],
    batch: &[QosSignals],
    card: (u32, u32),
    p: &Policy,
    mut report: impl FnMut(QosChange),
) -> u32 {
    g.tick = g.tick.wrapping_add(1).max(1);
    let (use_bp, thr_bp) = card;
    let out_of_range = batch.iter().filter(|s| s.slot as usize >= states.len()).count() as u32;
    let n = states.len();
    let inside = || batch.iter().filter(move |s| (s.slot as usize) < n);
    let over = use_bp > thr_bp;
    let card_calm = (use_bp as u64) * 10_000 <= thr_bp as u64 * (10_000 - p.calm_margin_bp.min(10_000)) as u64;
    let victim = inside()
        .filter(|s| s.flags & mc_proto::qos::QOS_EXISTS != 0 && s.runq_p99_us >= p.runq_us)
        .max_by_key(|s| (s.runq_p99_us, core::cmp::Reverse(s.slot)));
    let mut emit = |g: &mut Global, c: QosChange| {
        g.changes += 1;
        report(c);
    };

    // 3. Restores.
    for s in inside() {
        let st = &mut states[s.slot as usize];
        for d in Dir::BOTH {
            let i = d.index();
            if st.limit[i] == 0 {
                continue;
            }
            let calm = if !s.adaptive() {
                // The policy went away: give the configured limit back now.
                true
            } else if st.reason[i] == QosReason::NoisyNeighbour as u8 {
                !over && victim.is_none_or(|v| v.slot == s.slot)
            } else {
                card_calm && (s.rate[i].saturating_mul(2) < st.limit[i] || use_bp * 2 <= thr_bp)
            };
            st.calm[i] = if calm { st.calm[i] + 1 } else { 0 };
            if calm && (st.calm[i] >= p.recover_ticks || !s.adaptive()) {
                let detail = st.calm[i];
                st.limit[i] = 0;
                st.reason[i] = 0;
                st.calm[i] = 0;
                emit(g, QosChange { slot: s.slot, dir: d, reason: QosReason::Calm, tick: g.tick, detail, rate: 0 });
            }
        }
    }

    // One narrowing, once the last one has settled.
    if g.last_narrow != 0 && g.tick.wrapping_sub(g.last_narrow) < p.settle_ticks {
        return out_of_range;
    }
    let mut chosen: Option<(u32, Dir, u64, QosReason, u32)> = None;
    if over {
        // 1. The biggest mover through the card first, then the next.
        let mut best: Option<(u64, u32, Dir, u64)> = None;
        for s in inside().filter(|s| s.adaptive()) {
            let st = &states[s.slot as usize];
            for d in Dir::BOTH {
                let rate = s.rate[d.index()];
                if rate == 0 {
                    continue;
                }
                // From what it can move: its measured rate, or its limit
                // if lower (a rate measured over the limit means the last
                // step was not enough; the next goes on from the limit).
                let now = cap(st, s, d);
                let basis = if now == 0 { rate } else { rate.min(now) };
                let target = scaled(basis, thr_bp as u64 * 9, use_bp as u64 * 10);
                let Some(t) = narrowing(st, s, d, target) else { continue };
                let better = match best {
                    None => true,
                    Some((r, slot, bd, _)) => {
                        (rate, core::cmp::Reverse(s.slot), core::cmp::Reverse(d))
                            > (r, core::cmp::Reverse(slot), core::cmp::Reverse(bd))
                    }
                };
                if better {
                    best = Some((rate, s.slot, d, t));
                }
            }
        }
        chosen = best.map(|(_, slot, d, t)| (slot, d, t, QosReason::CardNetwork, use_bp));
    } else if let Some(v) = victim {
        // 2. The noisy neighbour of the most delayed VM.
        let noisy = inside()
            .filter(|s| s.adaptive() && s.slot != v.slot && s.cpu_ppm >= p.noisy_cpu_ppm)
            .max_by_key(|s| (s.cpu_ppm, core::cmp::Reverse(s.slot)));
        if let Some(n) = noisy {
            let st = &states[n.slot as usize];
            let d = if n.rate[Dir::Ingress.index()] > n.rate[Dir::Egress.index()] { Dir::Ingress } else { Dir::Egress };
            // Half of what it moves now (or of its limit, if lower).
            let (now, rate) = (cap(st, n, d), n.rate[d.index()]);
            let from = if now == 0 { rate } else { now.min(rate) };
            if from > 0 {
                if let Some(t) = narrowing(st, n, d, from / 2) {
                    chosen = Some((n.slot, d, t, QosReason::NoisyNeighbour, v.runq_p99_us));
                }
            }
        }
    }
    if let Some((slot, d, rate, reason, detail)) = chosen {
        let st = &mut states[slot as usize];
        st.limit[d.index()] = rate;
        st.reason[d.index()] = reason as u8;
        st.calm[d.index()] = 0;
        g.last_narrow = g.tick;
        emit(g, QosChange { slot, dir: d, reason, tick: g.tick, detail, rate });
    }
    out_of_range
}

#[cfg(test)]
mod tests;
