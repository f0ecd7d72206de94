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
// The management tasks' records, part of this protocol (kept apart: one
// concern, the JSON forms of protocol 2's records).
pub use super::records::*;
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
    /// From now on spoil every bulk answer (arg: `proto::hostile`).
    Hostile,
}

impl AgentOp {
    pub const ALL: [AgentOp; 12] = [
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
        AgentOp::Hostile,
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
            AgentOp::Hostile => op::HOSTILE,
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
