//! The control socket's protocol: one JSON object per line each way (see
//! ABI.md, "card-sim control socket").
//!
//! - `{"op":"status"}` -> `{"ok":true,"pid":..,"heartbeat":..,"fpga_completed":..,"net_bytes":..,"cgroup":..}`
//! - `{"op":"load","cpu":0.5,"mem_mib":128,"net_bps":20000000,"net_target":"127.0.0.1:9000","net_vm":1,"fpga":0.4}`
//! - `{"op":"fpga_jobs","count":50,"service_us":10000,"vm":1}` -> `{"ok":true,"queued":50}`
//! - `{"op":"agent","vm":1,"request":"auto","arg":100}` -> `{"ok":true,"agent":{..the agent's reply..}}`
//! - `{"op":"forward","listen":"127.0.0.1:0","to":"127.0.0.1:5201"}` -> `{"ok":true,"port":40123}`
//! - `{"op":"unforward","port":40123}`
//! - `{"op":"fault","fault":"stall"|"garbage"|"slow"|"crash","on":true,"slow_ms":200}`
//! - `{"op":"ecs","request":"create_vm","name":"mc-log","mem_mib":8}` -> `{"ok":true,"vm":1}`
//! - `{"op":"ecs","request":"destroy_vm","vm":1}`
//!
//! A request is parsed and checked whole (`parse`) before anything is
//! applied; a refusal is `{"ok":false,"error":"field X: reason"}`, the text
//! of a `RequestError`.

use std::net::SocketAddr;

use card_link::mailbox::MAX_NAME;
use serde::{Deserialize, Serialize};
use vmm::host::api::AgentOp;

use crate::error::RequestError;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// pid, heartbeat and counters of the card. An empty struct variant, not
    /// a unit one: serde ignores extra fields of a unit variant of an
    /// internally tagged enum even under `deny_unknown_fields`, and a
    /// misspelt field must be refused like any other op's.
    Status {},
    /// The load knob.
    Load(Load),
    /// Queue work on the custom-hardware (FPGA) engine.
    FpgaJobs {
        #[serde(default = "one", deserialize_with = "field::count")]
        count: u32,
        #[serde(default = "default_service_us", deserialize_with = "field::service_us")]
        service_us: u64,
        /// On whose behalf: a VM on the card (its `fpga_busy_ns` cost);
        /// absent: the card's own work.
        #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "field::vm")]
        vm: Option<u32>,
    },
    /// One request to the management agent of a VM on the card (real KVM
    /// guests only): `auto` makes it busy, `counters` reads its state.
    Agent {
        #[serde(deserialize_with = "field::vm")]
        vm: u32,
        #[serde(deserialize_with = "field::request")]
        request: AgentOp,
        #[serde(default, deserialize_with = "field::arg")]
        arg: u64,
    },
    /// Relay TCP connections to `listen` on to `to` through the card (user
    /// traffic crossing it); replies with the port it listens on.
    Forward {
        #[serde(deserialize_with = "field::listen")]
        listen: SocketAddr,
        #[serde(deserialize_with = "field::to")]
        to: SocketAddr,
    },
    /// Stop the forward listening on `port`.
    Unforward {
        #[serde(deserialize_with = "field::port")]
        port: u16,
    },
    /// Fault injection.
    Fault {
        #[serde(deserialize_with = "field::fault")]
        fault: Fault,
        #[serde(default = "yes", deserialize_with = "field::on")]
        on: bool,
        /// Only for `slow`: how long each command waits (default 1000 ms).
        #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "field::slow_ms")]
        slow_ms: Option<u64>,
    },
    /// A service request to the card's ECS control service.
    Ecs(EcsRequest),
}

/// The load knob: each field given replaces that load; absent ones stay.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Load {
    /// CPU cores worth of burn inside the card's cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "field::cpu")]
    pub cpu: Option<f64>,
    /// Memory ballast (touched, so charged to the card's cgroup).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "field::mem_mib")]
    pub mem_mib: Option<u64>,
    /// Bytes per second the network client sends to `net_target`.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "field::net_bps")]
    pub net_bps: Option<u64>,
    /// The network client's peer: a loopback `ip:port`.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "field::net_target")]
    pub net_target: Option<SocketAddr>,
    /// On whose behalf the network client sends: a VM on the card (its
    /// `net_bytes` cost), or 0 for the card itself (the default).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "field::net_vm")]
    pub net_vm: Option<u32>,
    /// Offered load on the FPGA engine, as a fraction of its time.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "field::fpga")]
    pub fpga: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// Heartbeat frozen, mailbox not served; registers still readable.
    Stall,
    /// BAR0 reads return noise.
    Garbage,
    /// Each mailbox command waits `slow_ms` first.
    Slow,
    /// The process kills itself (SIGKILL).
    Crash,
    /// The vfio-user link stops answering (the thread serving it holds
    /// every request) while the process, its heartbeat and its mailbox go
    /// on: firmware whose link thread is stuck. Cleared, it answers again.
    Silent,
}

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::Stall => "stall",
            Fault::Garbage => "garbage",
            Fault::Slow => "slow",
            Fault::Crash => "crash",
            Fault::Silent => "silent",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum EcsRequest {
    /// Create a management VM (1 vCPU).
    CreateVm {
        #[serde(deserialize_with = "field::name")]
        name: String,
        #[serde(default = "default_vm_mib", deserialize_with = "field::mem_mib")]
        mem_mib: u32,
    },
    /// Destroy a management VM by its id on the card.
    DestroyVm {
        #[serde(deserialize_with = "field::vm")]
        vm: u32,
    },
}

/// The answer to a request. Fields not given by an op are left out of the line.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `ecs create_vm`: the new VM's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<u32>,
    /// `fpga_jobs`: how many jobs the engine's queue took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued: Option<u64>,
    /// `forward`: the port the card listens on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `agent`: the agent's reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<vmm::Reply>,
    /// `status`: its fields sit at the top level of the line.
    #[serde(flatten)]
    pub status: Option<CardStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CardStatus {
    pub pid: u32,
    pub heartbeat: u64,
    pub fpga_completed: u64,
    pub net_bytes: u64,
    /// The card's cgroup (null when card-sim accounts its own process).
    pub cgroup: Option<String>,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply { ok: true, ..Reply::default() }
    }

    pub fn refused(error: String) -> Reply {
        Reply { ok: false, error: Some(error), ..Reply::default() }
    }
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

fn default_service_us() -> u64 {
    1000
}

fn default_vm_mib() -> u32 {
    16
}

/// Default wait of the `slow` fault when `slow_ms` is not given.
pub const DEFAULT_SLOW_MS: u64 = 1000;
/// Limits a request is checked against (what the card can sensibly do).
pub const MAX_CPU_CORES: f64 = 64.0;
pub const MAX_LOAD_MIB: u64 = 65536;
pub const MAX_JOBS: u32 = crate::fpga::MAX_QUEUE as u32;
pub const MAX_SERVICE_US: u64 = 1_000_000;
pub const MAX_SLOW_MS: u64 = 600_000;
pub const MAX_VM_MIB: u32 = 4096;

/// Parse one request line and check it whole; the error's text is what
/// goes back to the client, naming the field and the reason.
pub fn parse(line: &str) -> Result<Request, RequestError> {
    let req: Request = serde_json::from_str(line).map_err(explain)?;
    req.validate()?;
    Ok(req)
}

/// serde says "missing field `x`"; say it the way every other refusal does.
fn explain(e: serde_json::Error) -> RequestError {
    let msg = e.to_string();
    if let Some((field, _)) = msg.strip_prefix("missing field `").and_then(|rest| rest.split_once('`')) {
        return RequestError::Missing { field: field.to_string(), source: e };
    }
    if e.is_syntax() || e.is_eof() {
        return RequestError::NotJson(e);
    }
    RequestError::Shape(e)
}

/// A field out of range or at odds with another one.
fn invalid(field: &'static str, reason: impl Into<String>) -> RequestError {
    RequestError::Invalid { field, reason: reason.into() }
}

impl Request {
    /// Ranges and relations serde's types do not express.
    pub fn validate(&self) -> Result<(), RequestError> {
        match self {
            Request::Status {} => Ok(()),
            Request::Load(l) => l.validate(),
            Request::Agent { .. } => Ok(()),
            Request::FpgaJobs { count, service_us, .. } => {
                if *count > MAX_JOBS {
                    return Err(invalid("count", format!("at most {MAX_JOBS} jobs (the engine's queue)")));
                }
                if *service_us > MAX_SERVICE_US {
                    return Err(invalid("service_us", format!("at most {MAX_SERVICE_US} µs per job")));
                }
                Ok(())
            }
            Request::Fault { fault, slow_ms, .. } => match (fault, slow_ms) {
                (Fault::Slow, Some(ms)) if *ms > MAX_SLOW_MS => {
                    Err(invalid("slow_ms", format!("at most {MAX_SLOW_MS} ms")))
                }
                (Fault::Slow, _) | (_, None) => Ok(()),
                (_, Some(_)) => Err(invalid("slow_ms", "only for fault slow")),
            },
            Request::Ecs(EcsRequest::CreateVm { name, mem_mib }) => {
                if name.is_empty() || name.len() > MAX_NAME {
                    return Err(invalid("name", format!("must be 1..={MAX_NAME} bytes")));
                }
                if !(1..=MAX_VM_MIB).contains(mem_mib) {
                    return Err(invalid("mem_mib", format!("must be 1..={MAX_VM_MIB} MiB")));
                }
                Ok(())
            }
            Request::Ecs(EcsRequest::DestroyVm { .. }) => Ok(()),
            Request::Forward { listen, to } => {
                if !listen.ip().is_loopback() {
                    return Err(invalid("listen", "only loopback addresses are allowed"));
                }
                // Loopback, or a user VM's namespace on the benchmarking
                // range our test and demo networks use (198.18.0.0/15):
                // never a peer outside this host.
                let vm_net = match to.ip() {
                    std::net::IpAddr::V4(a) => a.octets()[0] == 198 && a.octets()[1] & 0xfe == 18,
                    std::net::IpAddr::V6(_) => false,
                };
                if !to.ip().is_loopback() && !vm_net {
                    return Err(invalid("to", "only loopback peers or user VMs on 198.18.0.0/15 are allowed"));
                }
                if to.port() == 0 {
                    return Err(invalid("to", "needs a port"));
                }
                Ok(())
            }
            Request::Unforward { .. } => Ok(()),
        }
    }

    /// `{"op":"fault","fault":..,"on":..}` (the slow fault's wait left at its default).
    pub fn fault(fault: Fault, on: bool) -> Request {
        Request::Fault { fault, on, slow_ms: None }
    }
}

impl Load {
    pub fn validate(&self) -> Result<(), RequestError> {
        if let Some(c) = self.cpu {
            if !(c.is_finite() && (0.0..=MAX_CPU_CORES).contains(&c)) {
                return Err(invalid("cpu", format!("must be 0..={MAX_CPU_CORES} cores")));
            }
        }
        if self.mem_mib.is_some_and(|m| m > MAX_LOAD_MIB) {
            return Err(invalid("mem_mib", format!("at most {MAX_LOAD_MIB} MiB")));
        }
        if let Some(f) = self.fpga {
            if !(f.is_finite() && (0.0..=1.0).contains(&f)) {
                return Err(invalid("fpga", "must be 0..=1 (a fraction of the engine's time)"));
            }
        }
        if self.net_target.is_some_and(|t| !t.ip().is_loopback()) {
            return Err(invalid("net_target", "only loopback peers are allowed"));
        }
        Ok(())
    }
}

/// Inside an internally tagged enum serde reports a wrongly typed value
/// without naming its field; each field is read through its own function
/// here, so the refusal says which field it was.
mod field {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer};

    macro_rules! named {
        ($($name:ident),* $(,)?) => {$(
            pub fn $name<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
                T::deserialize(d).map_err(|e| D::Error::custom(format_args!("field {}: {e}", stringify!($name))))
            }
        )*};
    }

    named!(
        cpu, mem_mib, net_bps, net_target, net_vm, fpga, count, service_us, fault, on, slow_ms, name, vm, request, arg,
        listen, to, port
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line that must parse; the request it reads as.
    fn ok(line: &str) -> Request {
        parse(line).unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    /// A line that must be refused; the refusal as the client reads it.
    fn refused(line: &str) -> String {
        match parse(line) {
            Ok(r) => panic!("{line} accepted as {r:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn documented_lines_parse_to_requests() {
        assert_eq!(ok(r#"{"op":"status"}"#), Request::Status {});
        assert_eq!(ok(r#"{"op":"load","cpu":0.5}"#), Request::Load(Load { cpu: Some(0.5), ..Load::default() }));
        assert_eq!(
            ok(r#"{"op":"load","net_bps":20000000,"net_target":"127.0.0.1:9000"}"#),
            Request::Load(Load {
                net_bps: Some(20_000_000),
                net_target: Some("127.0.0.1:9000".parse().unwrap()),
                ..Load::default()
            })
        );
        assert_eq!(ok(r#"{"op":"fault","fault":"stall"}"#), Request::fault(Fault::Stall, true));
        assert_eq!(
            ok(r#"{"op":"fault","fault":"slow","slow_ms":200}"#),
            Request::Fault { fault: Fault::Slow, on: true, slow_ms: Some(200) }
        );
        assert_eq!(ok(r#"{"op":"fault","fault":"stall","on":false}"#), Request::fault(Fault::Stall, false));
        assert_eq!(ok(r#"{"op":"fpga_jobs"}"#), Request::FpgaJobs { count: 1, service_us: 1000, vm: None });
        assert_eq!(
            ok(r#"{"op":"fpga_jobs","count":5,"vm":2}"#),
            Request::FpgaJobs { count: 5, service_us: 1000, vm: Some(2) }
        );
        assert_eq!(ok(r#"{"op":"load","net_vm":3}"#), Request::Load(Load { net_vm: Some(3), ..Load::default() }));
        assert_eq!(
            ok(r#"{"op":"agent","vm":1,"request":"auto","arg":100}"#),
            Request::Agent { vm: 1, request: AgentOp::Auto, arg: 100 }
        );
        assert_eq!(
            ok(r#"{"op":"agent","vm":1,"request":"ping"}"#),
            Request::Agent { vm: 1, request: AgentOp::Ping, arg: 0 }
        );
        assert_eq!(
            ok(r#"{"op":"ecs","request":"create_vm","name":"mc-log","mem_mib":8}"#),
            Request::Ecs(EcsRequest::CreateVm { name: "mc-log".into(), mem_mib: 8 })
        );
        assert_eq!(ok(r#"{"op":"ecs","request":"destroy_vm","vm":3}"#), Request::Ecs(EcsRequest::DestroyVm { vm: 3 }));
    }

    #[test]
    fn status_is_one_op_with_no_fields() {
        // Both ways: the bare line reads as the typed request and back.
        assert_eq!(serde_json::to_string(&Request::Status {}).unwrap(), r#"{"op":"status"}"#);
        assert_eq!(ok(r#"{"op":"status"}"#), Request::Status {});
        // A field it does not have is refused, as for every other op.
        assert!(refused(r#"{"op":"status","bogus":1}"#).contains("unknown field `bogus`"));
    }

    #[test]
    fn refusals_keep_their_kind_and_source() {
        use std::error::Error as _;
        assert!(matches!(parse("nope"), Err(RequestError::NotJson(_))));
        let missing = parse(r#"{"op":"fault"}"#).expect_err("no fault field");
        assert!(matches!(&missing, RequestError::Missing { field, .. } if field == "fault"), "{missing:?}");
        assert!(missing.source().is_some(), "serde's error kept as the source");
        assert!(matches!(parse(r#"{"op":"dance"}"#), Err(RequestError::Shape(_))));
        assert!(matches!(parse(r#"{"op":"load","cpu":65}"#), Err(RequestError::Invalid { field: "cpu", .. })));
    }

    #[test]
    fn typed_requests_serialize_to_the_documented_lines() {
        let line = |r: &Request| serde_json::to_string(r).unwrap();
        assert_eq!(line(&Request::Load(Load { cpu: Some(0.5), ..Load::default() })), r#"{"op":"load","cpu":0.5}"#);
        assert_eq!(line(&Request::fault(Fault::Garbage, false)), r#"{"op":"fault","fault":"garbage","on":false}"#);
        assert_eq!(
            line(&Request::Ecs(EcsRequest::CreateVm { name: "x".into(), mem_mib: 8 })),
            r#"{"op":"ecs","request":"create_vm","name":"x","mem_mib":8}"#
        );
        // And every typed request reads back as itself.
        for r in [
            Request::Status {},
            Request::FpgaJobs { count: 50, service_us: 10_000, vm: None },
            Request::FpgaJobs { count: 50, service_us: 10_000, vm: Some(4) },
            Request::Agent { vm: 2, request: AgentOp::Counters, arg: 0 },
            Request::Load(Load { net_bps: Some(1), net_vm: Some(0), ..Load::default() }),
            Request::Fault { fault: Fault::Slow, on: true, slow_ms: Some(400) },
            Request::Ecs(EcsRequest::DestroyVm { vm: 7 }),
        ] {
            assert_eq!(ok(&line(&r)), r);
        }
    }

    #[test]
    fn refusals_name_the_field_and_the_reason() {
        assert_eq!(refused(r#"{"op":"ecs","request":"create_vm"}"#), "field name: missing");
        assert_eq!(refused(r#"{"op":"ecs","request":"destroy_vm"}"#), "field vm: missing");
        assert_eq!(refused(r#"{"op":"agent","request":"auto"}"#), "field vm: missing");
        assert!(refused(r#"{"op":"agent","vm":1,"request":"dance"}"#).starts_with("field request: unknown variant"));
        assert!(refused(r#"{"op":"fpga_jobs","vm":-1}"#).starts_with("field vm: invalid value"));
        assert!(refused(r#"{"op":"load","net_vm":"x"}"#).starts_with("field net_vm: invalid type"));
        assert_eq!(
            ok(r#"{"op":"forward","listen":"127.0.0.1:0","to":"127.0.0.1:5201"}"#),
            Request::Forward { listen: "127.0.0.1:0".parse().unwrap(), to: "127.0.0.1:5201".parse().unwrap() }
        );
        assert!(refused(r#"{"op":"forward","listen":"10.0.0.1:0","to":"127.0.0.1:5201"}"#).starts_with("field listen"));
        assert!(refused(r#"{"op":"forward","listen":"127.0.0.1:0","to":"8.8.8.8:53"}"#).starts_with("field to"));
        assert!(refused(r#"{"op":"forward","listen":"127.0.0.1:0","to":"198.20.0.1:5201"}"#).starts_with("field to"));
        ok(r#"{"op":"forward","listen":"127.0.0.1:0","to":"198.19.3.2:5201"}"#);
        assert!(refused(r#"{"op":"forward","listen":"127.0.0.1:0","to":"127.0.0.1:0"}"#).starts_with("field to"));
        assert!(refused(r#"{"op":"unforward","port":"x"}"#).starts_with("field port"));
        assert_eq!(refused(r#"{"op":"fault"}"#), "field fault: missing");
        assert_eq!(refused(r#"{"cpu":1}"#), "field op: missing");
        assert!(refused(r#"{"op":"load","cpu":"lots"}"#).starts_with("field cpu: invalid type"));
        assert!(refused(r#"{"op":"load","mem_mib":-1}"#).starts_with("field mem_mib: invalid value"));
        assert!(refused(r#"{"op":"load","net_target":"nowhere"}"#).starts_with("field net_target:"));
        assert!(refused(r#"{"op":"fault","fault":"melt"}"#).starts_with("field fault: unknown variant `melt`"));
        assert!(refused(r#"{"op":"fault","fault":"slow","slow_sm":1}"#).contains("unknown field `slow_sm`"));
        assert!(refused(r#"{"op":"dance"}"#).contains("unknown variant `dance`"));
        assert!(refused("nope").starts_with("not JSON"));
        assert_eq!(refused(r#"{"op":"load","cpu":65}"#), "field cpu: must be 0..=64 cores");
        assert_eq!(
            refused(r#"{"op":"load","fpga":1.5}"#),
            "field fpga: must be 0..=1 (a fraction of the engine's time)"
        );
        assert_eq!(
            refused(r#"{"op":"load","net_target":"10.0.0.1:80"}"#),
            "field net_target: only loopback peers are allowed"
        );
        assert_eq!(
            refused(r#"{"op":"fpga_jobs","count":10001}"#),
            "field count: at most 10000 jobs (the engine's queue)"
        );
        assert_eq!(refused(r#"{"op":"fault","fault":"stall","slow_ms":5}"#), "field slow_ms: only for fault slow");
        assert_eq!(
            refused(r#"{"op":"ecs","request":"create_vm","name":"x","mem_mib":0}"#),
            "field mem_mib: must be 1..=4096 MiB"
        );
        assert_eq!(refused(r#"{"op":"ecs","request":"create_vm","name":""}"#), "field name: must be 1..=64 bytes");
    }

    #[test]
    fn replies_keep_the_wire_shape() {
        let status = Reply {
            status: Some(CardStatus { pid: 7, heartbeat: 3, fpga_completed: 0, net_bytes: 9, cgroup: None }),
            ..Reply::ok()
        };
        let line = serde_json::to_string(&status).unwrap();
        assert_eq!(line, r#"{"ok":true,"pid":7,"heartbeat":3,"fpga_completed":0,"net_bytes":9,"cgroup":null}"#);
        assert_eq!(serde_json::from_str::<Reply>(&line).unwrap(), status);
        let created: Reply = serde_json::from_str(r#"{"ok":true,"vm":4}"#).unwrap();
        assert_eq!((created.vm, created.status), (Some(4), None));
        let no = Reply::refused("field name: missing".into());
        assert_eq!(serde_json::to_string(&no).unwrap(), r#"{"ok":false,"error":"field name: missing"}"#);
    }
}
