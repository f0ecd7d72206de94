//! The JSON forms of protocol 2's records on the `vmm` control socket
//! (`monitor_tick`, `log_take`, `qos_tick` in [`super::api`]): each mirrors
//! a fixed-size record of `mc_proto` and converts to and from it, refusing
//! what the record would refuse. Re-exported by [`super::api`].

use serde::{Deserialize, Serialize};

/// The card's network use and threshold, basis points of its capacity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardNetwork {
    pub use_bp: u32,
    pub threshold_bp: u32,
}

/// One user VM's rates and policy for the qos agent (the JSON form of
/// `mc_proto::qos::QosSignals`; rates in bytes/s, unknown fields refused).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QosVm {
    pub slot: u32,
    pub exists: bool,
    #[serde(default)]
    pub adaptive: bool,
    pub egress_rate: u64,
    pub ingress_rate: u64,
    /// The configured limits (0: none).
    #[serde(default)]
    pub egress_base: u64,
    #[serde(default)]
    pub ingress_base: u64,
    #[serde(default)]
    pub min_rate: u64,
    #[serde(default)]
    pub cpu_ppm: u32,
    #[serde(default)]
    pub runq_p99_us: u32,
}

impl QosVm {
    pub fn from_proto(s: &crate::proto::qos::QosSignals) -> QosVm {
        use crate::proto::qos::{QOS_ADAPTIVE, QOS_EXISTS};
        QosVm {
            slot: s.slot,
            exists: s.flags & QOS_EXISTS != 0,
            adaptive: s.flags & QOS_ADAPTIVE != 0,
            egress_rate: s.rate[0],
            ingress_rate: s.rate[1],
            egress_base: s.base[0],
            ingress_base: s.base[1],
            min_rate: s.min_rate,
            cpu_ppm: s.cpu_ppm,
            runq_p99_us: s.runq_p99_us,
        }
    }

    pub fn to_proto(&self) -> crate::proto::qos::QosSignals {
        use crate::proto::qos::{QosSignals, QOS_ADAPTIVE, QOS_EXISTS};
        let flags = if self.exists { QOS_EXISTS } else { 0 } | if self.adaptive { QOS_ADAPTIVE } else { 0 };
        QosSignals {
            slot: self.slot,
            flags,
            rate: [self.egress_rate, self.ingress_rate],
            base: [self.egress_base, self.ingress_base],
            min_rate: self.min_rate,
            cpu_ppm: self.cpu_ppm,
            runq_p99_us: self.runq_p99_us,
        }
    }
}

/// A limit change the qos agent decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QosLimitChange {
    pub slot: u32,
    /// egress | ingress
    pub direction: String,
    /// card-network | noisy-neighbour | calm
    pub reason: String,
    pub tick: u32,
    pub detail: u32,
    /// Bytes/s; 0 with `calm`: back to the configured limit.
    pub rate: u64,
}

impl From<&crate::proto::qos::QosChange> for QosLimitChange {
    fn from(c: &crate::proto::qos::QosChange) -> QosLimitChange {
        QosLimitChange {
            slot: c.slot,
            direction: c.dir.name().into(),
            reason: c.reason.name().into(),
            tick: c.tick,
            detail: c.detail,
            rate: c.rate,
        }
    }
}

impl QosLimitChange {
    /// Back to the agent's record; None for an unknown direction or
    /// reason, or a rate that does not go with the reason.
    pub fn to_proto(&self) -> Option<crate::proto::qos::QosChange> {
        use crate::proto::qos::{Dir, QosChange, QosReason};
        let dir = Dir::BOTH.into_iter().find(|d| d.name() == self.direction)?;
        let reason = (1..=3).filter_map(QosReason::from_u8).find(|r| r.name() == self.reason)?;
        let c = QosChange { slot: self.slot, dir, reason, tick: self.tick, detail: self.detail, rate: self.rate };
        QosChange::decode(&c.encode())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QosReply {
    pub changes: Vec<QosLimitChange>,
}

/// One log record on the control socket (`mc_proto::logs::LogRecord`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogLine {
    pub slot: u32,
    pub host_seq: u64,
    /// `mc_proto::logs` flags (1 continues, 2 stderr).
    #[serde(default)]
    pub flags: u16,
    /// At most `mc_proto::logs::TEXT_LEN` bytes of UTF-8.
    pub text: String,
}

impl LogLine {
    /// The agent's record; None when the text is too long.
    pub fn to_proto(&self) -> Option<crate::proto::logs::LogRecord> {
        use crate::proto::logs::{LogRecord, TEXT_LEN};
        let b = self.text.as_bytes();
        if b.len() > TEXT_LEN {
            return None;
        }
        let mut text = [0u8; TEXT_LEN];
        text[..b.len()].copy_from_slice(b);
        Some(LogRecord { slot: self.slot, flags: self.flags, host_seq: self.host_seq, len: b.len() as u16, text })
    }

    pub fn from_proto(r: &crate::proto::logs::LogRecord) -> LogLine {
        LogLine {
            slot: r.slot,
            host_seq: r.host_seq,
            flags: r.flags,
            text: String::from_utf8_lossy(r.text()).into_owned(),
        }
    }
}

/// One acknowledgement (`mc_proto::logs::LogAck`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub slot: u32,
    pub first_host: u64,
    pub last_host: u64,
    pub first_log: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogAcksReply {
    pub acks: Vec<Ack>,
}

/// One user VM's signals on the control socket (the JSON form of
/// `mc_proto::signals::VmSignals`; unknown fields refused).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signals {
    pub slot: u32,
    pub exists: bool,
    #[serde(default)]
    pub mem_limit: Option<u64>,
    pub cpu_ns_total: u64,
    pub quiet_ms: u32,
    #[serde(default)]
    pub cpu_ppm: u32,
    #[serde(default)]
    pub runq_p99_us: u32,
    #[serde(default)]
    pub oom_kills_total: u32,
    #[serde(default)]
    pub working_set: u64,
    #[serde(default)]
    pub drops_total: u64,
}

impl Signals {
    pub fn from_proto(s: &crate::proto::signals::VmSignals) -> Signals {
        use crate::proto::signals::{FLAG_EXISTS, FLAG_MEM_LIMIT};
        Signals {
            slot: s.slot,
            exists: s.flags & FLAG_EXISTS != 0,
            mem_limit: (s.flags & FLAG_MEM_LIMIT != 0).then_some(s.mem_limit),
            cpu_ns_total: s.cpu_ns_total,
            quiet_ms: s.quiet_ms,
            cpu_ppm: s.cpu_ppm,
            runq_p99_us: s.runq_p99_us,
            oom_kills_total: s.oom_kills_total,
            working_set: s.working_set,
            drops_total: s.drops_total,
        }
    }

    pub fn to_proto(&self) -> crate::proto::signals::VmSignals {
        use crate::proto::signals::{VmSignals, FLAG_EXISTS, FLAG_MEM_LIMIT};
        let mut flags = 0;
        if self.exists {
            flags |= FLAG_EXISTS;
        }
        if self.mem_limit.is_some() {
            flags |= FLAG_MEM_LIMIT;
        }
        VmSignals {
            slot: self.slot,
            flags,
            cpu_ns_total: self.cpu_ns_total,
            quiet_ms: self.quiet_ms,
            cpu_ppm: self.cpu_ppm,
            runq_p99_us: self.runq_p99_us,
            oom_kills_total: self.oom_kills_total,
            working_set: self.working_set,
            mem_limit: self.mem_limit.unwrap_or(0),
            drops_total: self.drops_total,
        }
    }
}

/// A health change on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub slot: u32,
    /// starting, running, degraded, stalled, stopped
    pub health: String,
    /// booting, healthy, oom-killed, memory-pressure, run-queue-delay, drops, no-progress, gone
    pub reason: String,
    pub tick: u32,
    pub detail: u32,
}

impl Change {
    /// Back to the agent's record; None for an unknown state or reason, or
    /// a reason that does not explain the state.
    pub fn to_proto(&self) -> Option<crate::proto::signals::HealthChange> {
        use crate::proto::signals::{Health, HealthChange, Reason};
        let health = [Health::Starting, Health::Running, Health::Degraded, Health::Stalled, Health::Stopped]
            .into_iter()
            .find(|h| h.name() == self.health)?;
        let reason = (1..=8).filter_map(Reason::from_u8).find(|r| r.name() == self.reason)?;
        reason.explains(health).then_some(HealthChange {
            slot: self.slot,
            health,
            reason,
            tick: self.tick,
            detail: self.detail,
        })
    }
}

impl From<&crate::proto::signals::HealthChange> for Change {
    fn from(c: &crate::proto::signals::HealthChange) -> Change {
        Change {
            slot: c.slot,
            health: c.health.name().into(),
            reason: c.reason.name().into(),
            tick: c.tick,
            detail: c.detail,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReply {
    pub changes: Vec<Change>,
}
