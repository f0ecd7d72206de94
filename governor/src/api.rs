//! The governor's control socket: one JSON object per line each way.
//!
//! - `{"cmd":"status"}` -> `{"ok":true,"status":{...}}`
//! - `{"cmd":"set_limit","vm":"web","direction":"egress","limit":{"mode":"police","rate":"100mbit","burst":"64kb"}}`
//! - `{"cmd":"clear_limit","vm":"web","direction":"egress"}`
//! - `{"cmd":"limits"}` -> `{"ok":true,"limits":[...]}`
//! - `{"cmd":"placement"}` -> `{"ok":true,"placement":{...}}` (where each MC VM runs)
//! - `{"cmd":"decisions","after_tick":0}` -> `{"ok":true,"decisions":[...]}` (audit records)
//! - `{"cmd":"move","task":"log","to":"host"}` -> `{"ok":true,"decisions":[the record]}`
//! - `{"cmd":"pin","task":"log"}`, `{"cmd":"unpin","task":"log"}`
//!
//! Errors come back as `{"ok":false,"error":"..."}` naming the field and the
//! reason; a refused request changes nothing.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::governor::{LimitStatus, OomRecord};
use crate::placement::audit::AuditRecord;
use crate::placement::runtime::PlacementStatus;
use crate::placement::Side;
use crate::qos::{Direction, LimitSpec};
use crate::sampler::VmStatus;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    SetLimit {
        vm: String,
        direction: Direction,
        limit: LimitSpec,
    },
    ClearLimit {
        vm: String,
        direction: Direction,
    },
    Limits,
    Placement,
    Decisions {
        #[serde(default)]
        after_tick: u64,
    },
    Move {
        task: String,
        to: Side,
    },
    Pin {
        task: String,
    },
    Unpin {
        task: String,
    },
}

impl Request {
    /// Served by the placement thread, not the sampling loop.
    pub fn is_placement(&self) -> bool {
        matches!(
            self,
            Request::Placement
                | Request::Decisions { .. }
                | Request::Move { .. }
                | Request::Pin { .. }
                | Request::Unpin { .. }
        )
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub tick: u64,
    pub tick_ms: u64,
    pub vms: Vec<VmStatus>,
    pub ooms: Vec<OomRecord>,
    /// Each user VM's health as the monitor MC VM decided it.
    #[serde(default)]
    pub health: Vec<crate::manage::board::VmHealth>,
    /// Why management is degraded (the monitor VM cannot answer; the
    /// health above is then its last word), when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub management_degraded: Option<String>,
    /// Each user VM's log as the log MC VM manages it.
    #[serde(default)]
    pub logs: Vec<crate::manage::logs::LogStat>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Vec<LimitStatus>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decisions: Option<Vec<AuditRecord>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok() -> Response {
        Response { ok: true, status: None, limits: None, placement: None, decisions: None, error: None }
    }
    pub fn error(e: impl Into<String>) -> Response {
        Response { ok: false, error: Some(e.into()), ..Response::ok() }
    }
}

/// Decode one request line; the error text is what goes back to the client.
pub fn parse_request(line: &str) -> Result<Request, String> {
    serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))
}

/// Client side, used by `governor status` and by tests.
pub fn call(socket: &Path, req: &Request) -> anyhow::Result<Response> {
    use anyhow::Context;
    let mut s = UnixStream::connect(socket).with_context(|| format!("connect {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut resp = String::new();
    BufReader::new(s).read_line(&mut resp).context("read response")?;
    serde_json::from_str(&resp).with_context(|| format!("bad response {resp:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        assert_eq!(parse_request(r#"{"cmd":"status"}"#), Ok(Request::Status));
        assert!(parse_request(r#"{"cmd":"nope"}"#).unwrap_err().contains("bad request"));
        assert!(parse_request("garbage").is_err());
        assert_eq!(
            parse_request(r#"{"cmd":"move","task":"log","to":"host"}"#),
            Ok(Request::Move { task: "log".into(), to: Side::Host })
        );
        assert!(parse_request(r#"{"cmd":"move","task":"log","to":"moon"}"#).unwrap_err().contains("unknown variant"));
        assert_eq!(parse_request(r#"{"cmd":"decisions"}"#), Ok(Request::Decisions { after_tick: 0 }));
    }
}
