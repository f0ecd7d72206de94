//! The records of protocol 2's QoS messages: what the governor measures of
//! each user VM every tick together with its policy ([`QosSignals`], 64
//! bytes; the card's network use and threshold ride in the message's
//! parameter word, see [`card_param`]) and the limit changes the qos agent
//! decides ([`QosChange`], 32 bytes). Rates are bytes per second.

use crate::le::{u32_at, u64_at};

pub const QOS_SIGNALS_LEN: usize = 64;
pub const QOS_CHANGE_LEN: usize = 32;

/// The VM's cgroup exists.
pub const QOS_EXISTS: u32 = 1;
/// The VM has an adaptive policy: the agent may narrow its limits down to
/// `min_rate` and restore them.
pub const QOS_ADAPTIVE: u32 = 2;

/// The card's network use and threshold in one parameter word: basis
/// points of its capacity, use (capped at 65535, 6.5x) in the low half,
/// threshold (1..=10000) in the high half.
pub fn card_param(use_bp: u32, threshold_bp: u32) -> u32 {
    use_bp.min(0xffff) | (threshold_bp.clamp(1, 10_000) << 16)
}

/// (use, threshold) in basis points, or None for a threshold out of range.
pub fn split_card_param(p: u32) -> Option<(u32, u32)> {
    let (u, t) = (p & 0xffff, p >> 16);
    (1..=10_000).contains(&t).then_some((u, t))
}

/// A direction as the VM sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dir {
    /// What the VM sends.
    Egress = 1,
    /// What it receives.
    Ingress = 2,
}

impl Dir {
    pub const BOTH: [Dir; 2] = [Dir::Egress, Dir::Ingress];

    pub fn from_u8(v: u8) -> Option<Dir> {
        match v {
            1 => Some(Dir::Egress),
            2 => Some(Dir::Ingress),
            _ => None,
        }
    }

    pub fn index(self) -> usize {
        self as usize - 1
    }

    pub fn name(self) -> &'static str {
        match self {
            Dir::Egress => "egress",
            Dir::Ingress => "ingress",
        }
    }
}

/// Why the agent changed a limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QosReason {
    /// User traffic through the card pushed its network over the threshold.
    CardNetwork = 1,
    /// The VM is the noisy neighbour: others wait on the run queue.
    NoisyNeighbour = 2,
    /// Calm again: back to the configured limit.
    Calm = 3,
}

impl QosReason {
    pub fn from_u8(v: u8) -> Option<QosReason> {
        match v {
            1 => Some(QosReason::CardNetwork),
            2 => Some(QosReason::NoisyNeighbour),
            3 => Some(QosReason::Calm),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QosReason::CardNetwork => "card-network",
            QosReason::NoisyNeighbour => "noisy-neighbour",
            QosReason::Calm => "calm",
        }
    }
}

/// One user VM's measurements and policy in one tick.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QosSignals {
    pub slot: u32,
    pub flags: u32,
    /// Measured over the last tick, per [`Dir::index`].
    pub rate: [u64; 2],
    /// The configured limit per direction (0: none, line rate).
    pub base: [u64; 2],
    /// The narrowest the agent may set (0 unless adaptive).
    pub min_rate: u64,
    /// CPU used over the last tick, parts per million of one CPU.
    pub cpu_ppm: u32,
    /// Run-queue delay p99 over the last tick, µs.
    pub runq_p99_us: u32,
}

impl QosSignals {
    pub fn encode(&self) -> [u8; QOS_SIGNALS_LEN] {
        let mut b = [0u8; QOS_SIGNALS_LEN];
        b[0..4].copy_from_slice(&self.slot.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.rate[0].to_le_bytes());
        b[16..24].copy_from_slice(&self.rate[1].to_le_bytes());
        b[24..32].copy_from_slice(&self.base[0].to_le_bytes());
        b[32..40].copy_from_slice(&self.base[1].to_le_bytes());
        b[40..48].copy_from_slice(&self.min_rate.to_le_bytes());
        b[48..52].copy_from_slice(&self.cpu_ppm.to_le_bytes());
        b[52..56].copy_from_slice(&self.runq_p99_us.to_le_bytes());
        b
    }

    /// Refuses unknown flags, a reserved tail that is not zero, and a
    /// floor above a configured limit (a policy that cannot hold).
    pub fn decode(b: &[u8; QOS_SIGNALS_LEN]) -> Option<QosSignals> {
        if b[56..64].iter().any(|&x| x != 0) {
            return None;
        }
        let s = QosSignals {
            slot: u32_at(b, 0),
            flags: u32_at(b, 4),
            rate: [u64_at(b, 8), u64_at(b, 16)],
            base: [u64_at(b, 24), u64_at(b, 32)],
            min_rate: u64_at(b, 40),
            cpu_ppm: u32_at(b, 48),
            runq_p99_us: u32_at(b, 52),
        };
        if s.flags & !(QOS_EXISTS | QOS_ADAPTIVE) != 0 {
            return None;
        }
        if s.base.iter().any(|&base| base != 0 && base < s.min_rate) {
            return None;
        }
        Some(s)
    }

    pub fn adaptive(&self) -> bool {
        self.flags & (QOS_EXISTS | QOS_ADAPTIVE) == QOS_EXISTS | QOS_ADAPTIVE && self.min_rate > 0
    }
}

/// A limit change the agent decided (agent -> host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QosChange {
    pub slot: u32,
    pub dir: Dir,
    pub reason: QosReason,
    /// The agent's tick.
    pub tick: u32,
    /// The number behind the reason (card use in basis points, the
    /// victim's delay in µs, calm ticks).
    pub detail: u32,
    /// The new limit (bytes/s); 0 with [`QosReason::Calm`]: back to the
    /// configured limit (or none).
    pub rate: u64,
}

impl QosChange {
    pub fn encode(&self) -> [u8; QOS_CHANGE_LEN] {
        let mut b = [0u8; QOS_CHANGE_LEN];
        b[0..4].copy_from_slice(&self.slot.to_le_bytes());
        b[4] = self.dir as u8;
        b[5] = self.reason as u8;
        b[8..12].copy_from_slice(&self.tick.to_le_bytes());
        b[12..16].copy_from_slice(&self.detail.to_le_bytes());
        b[16..24].copy_from_slice(&self.rate.to_le_bytes());
        b
    }

    /// Refuses unknown directions or reasons, non-zero padding, and a rate
    /// that does not go with the reason (a restore carries none, a
    /// narrowing one).
    pub fn decode(b: &[u8; QOS_CHANGE_LEN]) -> Option<QosChange> {
        let dir = Dir::from_u8(b[4])?;
        let reason = QosReason::from_u8(b[5])?;
        if b[6] != 0 || b[7] != 0 || b[24..32].iter().any(|&x| x != 0) {
            return None;
        }
        let rate = u64_at(b, 16);
        if (reason == QosReason::Calm) != (rate == 0) {
            return None;
        }
        Some(QosChange { slot: u32_at(b, 0), dir, reason, tick: u32_at(b, 8), detail: u32_at(b, 12), rate })
    }

    /// Within the VM's policy: a narrowing at or above its floor and below
    /// its configured limit, only for an adaptive VM.
    pub fn within(&self, s: &QosSignals) -> bool {
        if !s.adaptive() || s.slot != self.slot {
            return false;
        }
        let base = s.base[self.dir.index()];
        self.reason == QosReason::Calm || (self.rate >= s.min_rate && (base == 0 || self.rate < base))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_lies_are_refused() {
        let s = QosSignals {
            slot: 7,
            flags: QOS_EXISTS | QOS_ADAPTIVE,
            rate: [1, u64::MAX],
            base: [0, 12_500_000],
            min_rate: 2_500_000,
            cpu_ppm: 500_000,
            runq_p99_us: 12,
        };
        assert_eq!(QosSignals::decode(&s.encode()), Some(s));
        let mut b = s.encode();
        b[63] = 1;
        assert_eq!(QosSignals::decode(&b), None, "reserved tail");
        let floor_over = QosSignals { min_rate: 20_000_000, ..s };
        assert_eq!(QosSignals::decode(&floor_over.encode()), None, "a floor above the limit");
        let c =
            QosChange { slot: 7, dir: Dir::Ingress, reason: QosReason::CardNetwork, tick: 3, detail: 9000, rate: 5 };
        assert_eq!(QosChange::decode(&c.encode()), Some(c));
        let calm_with_rate = QosChange { reason: QosReason::Calm, ..c };
        assert_eq!(QosChange::decode(&calm_with_rate.encode()), None);
        let narrow_without = QosChange { rate: 0, ..c };
        assert_eq!(QosChange::decode(&narrow_without.encode()), None);
        assert!(!c.within(&s), "under the floor");
        assert!(QosChange { rate: 2_500_000, ..c }.within(&s));
        assert!(!QosChange { rate: 12_500_000, ..c }.within(&s), "not below the configured limit");
        assert!(!QosChange { rate: 3_000_000, ..c }.within(&QosSignals { flags: QOS_EXISTS, ..s }), "not adaptive");
        assert_eq!(split_card_param(card_param(12_000, 6000)), Some((12_000, 6000)));
        assert_eq!(split_card_param(card_param(99_999, 0)), Some((0xffff, 1)));
        assert_eq!(split_card_param(20_000 << 16), None);
    }
}
