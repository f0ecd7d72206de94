//! The control protocol of a `vmm` process: a UNIX stream socket speaking
//! JSON lines. One request object per line, one reply object per line, in
//! order on each connection. These types are the protocol; the `vmm` binary
//! serves it and [`super::client::Client`] speaks it.
//!
//! | cmd | fields | reply fields |
//! |---|---|---|
//! | `create` | `guest`, `mem_mib` | |
//! | `boot` | | `ready_ms` |
//! | `restore` | `path`, optional `diffs` (paths, oldest first) | `restore_ms` (VM comes up paused) |
//! | `pause` / `resume` | | |
//! | `snapshot` | `path`, optional `diff` (bool: only pages changed since the last snapshot), optional `stream` (bool: the stream format a link carries, sparse, instead of the mappable file layout), optional `live` (bool: pre-copy's base of the running VM, stream format) | `bytes`, `snapshot_ms` |
//! | `apply_diff` | `path` (a diff snapshot whose base this paused VM was restored from) | (VM stays paused) |
//! | `log_take` | `seq`, `epoch`, `records` (`slot`, `host_seq`, optional `flags`, `text`; each VM's together) | `acks` (`slot`, `first_host`, `last_host`, `first_log`) |
//! | `monitor_tick` | `seq`, `tick_ms`, `signals` (per user VM: `slot`, `exists`, `cpu_ns_total`, `quiet_ms`, optional `mem_limit`, `cpu_ppm`, `runq_p99_us`, `oom_kills_total`, `working_set`, `drops_total`) | `changes` (`slot`, `health`, `reason`, `tick`, `detail`) |
//! | `qos_tick` | `seq`, `card` (`use_bp`, `threshold_bp`), `vms` (per user VM: `slot`, `exists`, optional `adaptive`, `egress_rate`, `ingress_rate`, optional `egress_base`, `ingress_base`, `min_rate`, `cpu_ppm`, `runq_p99_us`; bytes/s) | `changes` (`slot`, `direction`, `reason`, `tick`, `detail`, `rate`) |
//! | `request` | `op` (an [`AgentOp`] name), optional `arg` (default 0) | `reply`, `rtt_us` |
//! | `state` | | `state`, `last_log`, `logs` |
//! | `stats` | | `rss_bytes`, `guest_resident_bytes`, `vcpu_tid`, `vm` (exit and log counters) |
//! | `shutdown` | | `state` (the process exits after replying) |
//!
//! Every reply has `ok`. A failure is `{"ok":false,"error":TEXT,"kind":KIND}`:
//! the text names the field and the reason for a bad request, and is the
//! typed error's message otherwise; `kind` ([`ErrorKind`]) classifies it.

use std::path::PathBuf;

use serde::de::{Deserializer, Error as _};
use serde::{Deserialize, Serialize};

use crate::proto::op;
use crate::vm::{Reply, RunState, VmStats};

/// An agent operation, by its name on the socket (`"ping"`, `"bad_mmio"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentOp {
    Ping,
    Step,
    Counters,
    Auto,
    Touch,
    Checksum,
    BadMmio,
    BadDescriptor,
    TripleFault,
    BadWidth,
    Shutdown,
}

impl AgentOp {
    pub const ALL: [AgentOp; 11] = [
        AgentOp::Ping,
        AgentOp::Step,
        AgentOp::Counters,
        AgentOp::Auto,
        AgentOp::Touch,
        AgentOp::Checksum,
        AgentOp::BadMmio,
        AgentOp::BadDescriptor,
        AgentOp::TripleFault,
        AgentOp::BadWidth,
        AgentOp::Shutdown,
    ];

    /// The op code in the request frame (see [`crate::proto::op`]).
    pub fn code(self) -> u64 {
        match self {
            AgentOp::Ping => op::PING,
            AgentOp::Step => op::STEP,
            AgentOp::Counters => op::COUNTERS,
            AgentOp::Auto => op::AUTO,
            AgentOp::Touch => op::TOUCH,
            AgentOp::Checksum => op::CHECKSUM,
            AgentOp::BadMmio => op::BAD_MMIO,
            AgentOp::BadDescriptor => op::BAD_DESCRIPTOR,
            AgentOp::TripleFault => op::TRIPLE_FAULT,
            AgentOp::BadWidth => op::BAD_WIDTH,
            AgentOp::Shutdown => op::SHUTDOWN,
        }
    }
}

/// Deserializers that put the field's name in front of serde's reason: a
/// field inside an internally tagged enum is otherwise reported without it
/// ("invalid type: string, expected u64").
mod named {
    use super::*;

    macro_rules! field {
        ($name:ident: $t:ty) => {
            pub(super) fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<$t, D::Error> {
                <$t>::deserialize(d).map_err(|e| D::Error::custom(format_args!("field `{}`: {e}", stringify!($name))))
            }
        };
    }
    field!(guest: PathBuf);
    field!(mem_mib: u64);
    field!(path: PathBuf);
    field!(diffs: Vec<PathBuf>);
    field!(diff: bool);
    field!(stream: bool);
    field!(live: bool);
    field!(op: AgentOp);
    field!(seq: u64);
    field!(tick_ms: u32);
    field!(epoch: u32);
    field!(records: Vec<LogLine>);
    field!(signals: Vec<Signals>);
    field!(card: CardNetwork);
    field!(vms: Vec<QosVm>);
    field!(arg: u64);
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One request line. Commands without arguments are empty struct
/// variants, not unit variants: serde ignores unknown fields of a unit
/// variant even under `deny_unknown_fields`, and a request with a field the
/// server does not know is refused whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Create the VM (not started) from an agent ELF.
    Create {
        #[serde(deserialize_with = "named::guest")]
        guest: PathBuf,
        #[serde(deserialize_with = "named::mem_mib")]
        mem_mib: u64,
    },
    /// Start the created VM and wait for the agent banner.
    Boot {},
    /// Restore a snapshot file (and diffs on top, oldest first); paused.
    Restore {
        #[serde(deserialize_with = "named::path")]
        path: PathBuf,
        #[serde(default, deserialize_with = "named::diffs", skip_serializing_if = "Vec::is_empty")]
        diffs: Vec<PathBuf>,
    },
    Pause {},
    Resume {},
    /// Snapshot the paused VM to a file (a diff when `diff`). With
    /// `stream`, a full snapshot is written in the stream format
    /// (`Vm::snapshot_to`: only pages that may hold data) rather than the
    /// file layout a restore maps: what a caller that ships the file over a
    /// link (the card simulator) wants. A diff is a stream either way.
    Snapshot {
        #[serde(deserialize_with = "named::path")]
        path: PathBuf,
        #[serde(default, deserialize_with = "named::diff", skip_serializing_if = "is_false")]
        diff: bool,
        #[serde(default, deserialize_with = "named::stream", skip_serializing_if = "is_false")]
        stream: bool,
        /// Pre-copy's base: a stream-format snapshot of the VM while it
        /// runs (parked only to capture its state); the diff at the final
        /// pause completes it.
        #[serde(default, deserialize_with = "named::live", skip_serializing_if = "is_false")]
        live: bool,
    },
    /// Status monitoring: one tick of every user VM's signals to the monitor
    /// agent (protocol 2); the reply has the health changes it decided.
    MonitorTick {
        #[serde(deserialize_with = "named::seq")]
        seq: u64,
        /// The tick period (ms) the agent's time bounds are measured in.
        #[serde(deserialize_with = "named::tick_ms")]
        tick_ms: u32,
        #[serde(deserialize_with = "named::signals")]
        signals: Vec<Signals>,
    },
    /// Log management: the host's pending log lines (each VM's together,
    /// in host order) to the log agent; the reply has its acknowledgements.
    LogTake {
        #[serde(deserialize_with = "named::seq")]
        seq: u64,
        #[serde(deserialize_with = "named::epoch")]
        epoch: u32,
        #[serde(deserialize_with = "named::records")]
        records: Vec<LogLine>,
    },
    /// QoS policy: one tick of every user VM's rates and policy, and the
    /// card's network use, to the qos agent; the reply has its limit changes.
    QosTick {
        #[serde(deserialize_with = "named::seq")]
        seq: u64,
        #[serde(deserialize_with = "named::card")]
        card: CardNetwork,
        #[serde(deserialize_with = "named::vms")]
        vms: Vec<QosVm>,
    },
    /// Apply a diff snapshot file to the paused VM (restored from the
    /// diff's base, not run since): pre-copy's last step before resume.
    ApplyDiff {
        #[serde(deserialize_with = "named::path")]
        path: PathBuf,
    },
    /// One agent request.
    Request {
        #[serde(deserialize_with = "named::op")]
        op: AgentOp,
        #[serde(default, deserialize_with = "named::arg")]
        arg: u64,
    },
    State {},
    Stats {},
    /// Stop the VM; the process exits after replying.
    Shutdown {},
}

/// Why a request line was refused before it was run.
#[derive(Debug, thiserror::Error)]
pub enum BadRequest {
    #[error("field `cmd`: unknown command {cmd:?} (one of {})", Request::COMMANDS.join(", "))]
    UnknownCommand { cmd: String },
    #[error("bad request: {0}")]
    Invalid(#[source] serde_json::Error),
}

impl Request {
    /// Every `cmd` name, for the error that refuses an unknown one.
    pub const COMMANDS: [&'static str; 14] = [
        "create",
        "boot",
        "restore",
        "pause",
        "resume",
        "snapshot",
        "apply_diff",
        "monitor_tick",
        "log_take",
        "qos_tick",
        "request",
        "state",
        "stats",
        "shutdown",
    ];

    /// Parse one request line.
    pub fn parse(line: &str) -> Result<Request, BadRequest> {
        serde_json::from_str(line).map_err(|e| {
            // serde reports an unknown tag as "unknown variant" without the
            // field's name; look at the tag alone to say which field it is.
            #[derive(Deserialize)]
            struct Tag {
                cmd: String,
            }
            match serde_json::from_str::<Tag>(line) {
                Ok(t) if !Request::COMMANDS.contains(&t.cmd.as_str()) => BadRequest::UnknownCommand { cmd: t.cmd },
                _ => BadRequest::Invalid(e),
            }
        })
    }
}

/// The class of a failed request, so a client can react without parsing
/// the message. There is no cgroup class: a `vmm` joins its cgroup at start,
/// before it serves the socket, and exits if it cannot, so no request fails
/// on a cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request line was refused before it ran (field and reason in the text).
    BadRequest,
    /// The VM (or its absence) does not allow this now.
    State,
    /// The VM stopped (the text has the reason).
    Stopped,
    Timeout,
    Config,
    Kvm,
    Memory,
    Load,
    Snapshot,
    Io,
    /// Talking to the VMM process failed (client side only).
    Connection,
    /// The agent refused a message (the text names the field).
    Agent,
}

/// A successful reply without fields (`create`, `pause`, `resume`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Done {}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Booted {
    /// From the `boot` request to the agent banner.
    pub ready_ms: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Restored {
    pub restore_ms: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SnapshotTaken {
    /// Bytes of the snapshot (file length; holes included).
    pub bytes: u64,
    pub snapshot_ms: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Answered {
    pub reply: Reply,
    /// Round trip inside the VMM process, queueing to reply.
    pub rtt_us: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateReply {
    pub state: RunState,
    pub last_log: Option<Reply>,
    pub logs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsReply {
    /// Resident bytes of the whole VMM process (guest RAM included).
    pub rss_bytes: u64,
    pub guest_resident_bytes: u64,
    pub vcpu_tid: Option<libc::pid_t>,
    pub vm: VmStats,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShutdownReply {
    /// Why the VM stopped; null when the process had no VM.
    pub state: Option<RunState>,
}

/// The fields of a successful reply, by request.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Response {
    Done(Done),
    Booted(Booted),
    Restored(Restored),
    SnapshotTaken(SnapshotTaken),
    Answered(Answered),
    State(StateReply),
    Stats(StatsReply),
    Shutdown(ShutdownReply),
    Health(HealthReply),
    LogAcks(LogAcksReply),
    Qos(QosReply),
}

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

/// A successful reply line: `ok` and the reply's fields.
#[derive(Debug, Serialize)]
pub struct OkLine<'a> {
    pub ok: bool,
    #[serde(flatten)]
    pub body: &'a Response,
}

impl OkLine<'_> {
    pub fn new(body: &Response) -> OkLine<'_> {
        OkLine { ok: true, body }
    }
}

/// A failed reply line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorLine {
    pub ok: bool,
    pub error: String,
    pub kind: ErrorKind,
}

impl ErrorLine {
    pub fn new(error: String, kind: ErrorKind) -> ErrorLine {
        ErrorLine { ok: false, error, kind }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_keep_their_wire_names() {
        let r = Request::parse(r#"{"cmd":"request","op":"ping","arg":0}"#).expect("ping");
        assert_eq!(r, Request::Request { op: AgentOp::Ping, arg: 0 });
        assert_eq!(
            Request::parse(r#"{"cmd":"request","op":"bad_mmio"}"#).expect("arg defaults to 0"),
            Request::Request { op: AgentOp::BadMmio, arg: 0 }
        );
        assert_eq!(
            Request::parse(r#"{"cmd":"snapshot","path":"/s","diff":true}"#).expect("snapshot"),
            Request::Snapshot { path: "/s".into(), diff: true, stream: false, live: false }
        );
        assert_eq!(
            Request::parse(r#"{"cmd":"snapshot","path":"/s","stream":true}"#).expect("stream snapshot"),
            Request::Snapshot { path: "/s".into(), diff: false, stream: true, live: false }
        );
        assert_eq!(
            Request::parse(r#"{"cmd":"restore","path":"/s","diffs":["/d1","/d2"]}"#).expect("restore"),
            Request::Restore { path: "/s".into(), diffs: vec!["/d1".into(), "/d2".into()] }
        );
        assert_eq!(Request::parse(r#"{"cmd":"state"}"#).expect("state"), Request::State {});
        // What the client sends is what the server reads.
        let all = [
            Request::Create { guest: "/g".into(), mem_mib: 32 },
            Request::Boot {},
            Request::Restore { path: "/s".into(), diffs: vec![] },
            Request::Pause {},
            Request::Resume {},
            Request::Snapshot { path: "/s".into(), diff: false, stream: false, live: false },
            Request::Snapshot { path: "/s".into(), diff: false, stream: true, live: false },
            Request::Snapshot { path: "/s".into(), diff: false, stream: true, live: true },
            Request::ApplyDiff { path: "/d".into() },
            Request::LogTake {
                seq: 4,
                epoch: 1,
                records: vec![LogLine { slot: 0, host_seq: 1, flags: 0, text: "hi".into() }],
            },
            Request::MonitorTick {
                seq: 3,
                tick_ms: 1000,
                signals: vec![Signals { slot: 1, exists: true, cpu_ns_total: 9, ..Signals::default() }],
            },
            Request::QosTick {
                seq: 5,
                card: CardNetwork { use_bp: 7000, threshold_bp: 6000 },
                vms: vec![QosVm { slot: 2, exists: true, adaptive: true, ingress_rate: 9, ..QosVm::default() }],
            },
            Request::Request { op: AgentOp::Touch, arg: 7 },
            Request::State {},
            Request::Stats {},
            Request::Shutdown {},
        ];
        for r in all {
            let line = serde_json::to_string(&r).expect("encode");
            let cmd = serde_json::from_str::<serde_json::Value>(&line).expect("json")["cmd"].clone();
            assert!(Request::COMMANDS.iter().any(|c| cmd == *c), "{cmd} is listed in COMMANDS");
            assert_eq!(Request::parse(&line).expect("decode"), r, "{line}");
        }
    }

    #[test]
    fn every_agent_op_has_its_code_and_name() {
        for op in AgentOp::ALL {
            let name = serde_json::to_string(&op).expect("name");
            let back: AgentOp = serde_json::from_str(&name).expect("parse");
            assert_eq!(back, op);
        }
        assert_eq!(serde_json::to_string(&AgentOp::TripleFault).expect("name"), r#""triple_fault""#);
        assert_eq!(AgentOp::Ping.code(), op::PING);
        assert_eq!(AgentOp::Shutdown.code(), op::SHUTDOWN);
        let mut codes: Vec<u64> = AgentOp::ALL.iter().map(|o| o.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), AgentOp::ALL.len(), "codes are distinct");
    }

    /// The message of a refused request names the field and the reason.
    fn refused(line: &str) -> String {
        Request::parse(line).expect_err(line).to_string()
    }

    #[test]
    fn bad_requests_name_the_field_and_the_reason() {
        let e = refused(r#"{"cmd":"request","op":"nonsense"}"#);
        assert!(e.contains("field `op`") && e.contains("nonsense"), "{e}");
        let e = refused(r#"{"cmd":"request","op":"ping","arg":"x"}"#);
        assert!(e.contains("field `arg`") && e.contains("invalid type"), "{e}");
        let e = refused(r#"{"cmd":"create","guest":"/x"}"#);
        assert!(e.contains("missing field `mem_mib`"), "{e}");
        let e = refused(r#"{"cmd":"snapshot","path":"/s","dif":true}"#);
        assert!(e.contains("unknown field `dif`"), "{e}");
        let e = refused(r#"{"cmd":"state","verbose":true}"#);
        assert!(e.contains("unknown field `verbose`"), "{e}");
        let e = refused(r#"{"cmd":"reboot"}"#);
        assert!(e.contains("field `cmd`") && e.contains("\"reboot\""), "{e}");
        let e = refused(r#"{"op":"ping"}"#);
        assert!(e.contains("missing field `cmd`"), "{e}");
        let e = refused("not json");
        assert!(e.starts_with("bad request"), "{e}");
    }

    #[test]
    fn replies_keep_their_wire_shape() {
        let body = Response::Booted(Booted { ready_ms: 1.5 });
        let line = serde_json::to_string(&OkLine::new(&body)).expect("encode");
        assert_eq!(line, r#"{"ok":true,"ready_ms":1.5}"#);
        let body = Response::Done(Done {});
        assert_eq!(serde_json::to_string(&OkLine::new(&body)).expect("encode"), r#"{"ok":true}"#);
        let body = Response::Shutdown(ShutdownReply { state: Some(RunState::Stopped(crate::StopReason::Requested)) });
        let line = serde_json::to_string(&OkLine::new(&body)).expect("encode");
        assert_eq!(line, r#"{"ok":true,"state":{"Stopped":"Requested"}}"#);
        let err = ErrorLine::new("field `op`: nope".into(), ErrorKind::BadRequest);
        let line = serde_json::to_string(&err).expect("encode");
        assert_eq!(line, r#"{"ok":false,"error":"field `op`: nope","kind":"bad_request"}"#);
        assert_eq!(serde_json::from_str::<ErrorLine>(&line).expect("decode"), err);
    }
}
