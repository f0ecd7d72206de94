//! The governor's API: HTTP/1.1 + JSON on a UNIX socket created 0600 (as
//! Firecracker and Docker serve theirs), served with axum (`server`); the
//! CLI and the tests are clients of it (`client`). Resources:
//!
//! - `GET /v1/status`: every watched VM's sample, OOM kills, health, logs
//! - `GET /v1/vms`, `GET /v1/vms/{vm}`: the per-VM samples
//! - `GET /v1/health`: each user VM's health and whether management is degraded
//! - `GET /v1/limits`: every limit in force with its counters
//! - `PUT /v1/vms/{vm}/limits/{direction}` with a limit
//!   (`{"mode":"police","rate":"100mbit","burst":"64kb"}`), `DELETE` clears it
//! - `GET /v1/placement`: where each MC VM runs, the card's use
//! - `POST /v1/placement/{task}/move` with `{"to":"host"}`: the decision record
//! - `PUT /v1/placement/{task}/pin`, `DELETE` unpins
//! - `GET /v1/decisions?after_tick=N`: the placement decisions held
//! - `GET /v1/vms/{vm}/logs?since=SEQ`: a VM's log as the log MC VM numbered it
//!
//! A refused request gets a 4xx (400 bad input, 404 no such VM or task,
//! 405 wrong method, 409 not possible now) and `{"error": "..."}` naming
//! the field and the reason; it changes nothing.

use serde::{Deserialize, Serialize};

use crate::governor::{LimitStatus, OomRecord};
use crate::placement::audit::AuditRecord;
use crate::placement::runtime::PlacementStatus;
use crate::placement::Side;
use crate::qos::{Direction, LimitSpec};
use crate::sampler::VmStatus;

pub mod client;
pub mod server;

pub use client::call;

/// What a client asks (the CLI's and tests' view of the resources above,
/// and the commands the server hands to the sampling loop or the
/// placement thread).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
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

/// The answer to a [`Request`], as the client sees it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// The HTTP status it came with (or goes out with).
    #[serde(skip)]
    pub code: u16,
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
        Response { ok: true, code: 200, status: None, limits: None, placement: None, decisions: None, error: None }
    }
    /// Refused: `code` is the HTTP status (4xx: the client's input or the
    /// state; 5xx: the governor could not do it).
    pub fn refused(code: u16, e: impl Into<String>) -> Response {
        Response { ok: false, code, error: Some(e.into()), ..Response::ok() }
    }
    /// Failed inside the governor (500).
    pub fn error(e: impl Into<String>) -> Response {
        Response::refused(500, e)
    }
}

/// The body of a refused request.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    /// A move that was decided and failed: its record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Box<AuditRecord>>,
}

/// `POST /v1/placement/{task}/move`
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveBody {
    pub to: Side,
}

/// `GET /v1/health`
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HealthBody {
    pub health: Vec<crate::manage::board::VmHealth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub management_degraded: Option<String>,
}
