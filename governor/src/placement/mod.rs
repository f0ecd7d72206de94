//! Where the management (MC) VMs run: on the card while the board-card
//! condition holds (claims 2, 3, 7, 8), on the host otherwise (claims 5, 6),
//! one MC VM per management task (claim 4).
//!
//! `decide` is one pure function of measured inputs: the card's use per
//! resource, each MC VM's measured cost on the card and on the host, where
//! each runs, pins, the host's MC reserve and its use, and the clock. No I/O
//! and no hidden state: the same inputs give the same decision, which is
//! what makes it property-testable and its audit log replayable.
//!
//! - `decide.rs`: the rules (relieve the card; bring VMs back when calm)
//! - `tests.rs`: unit tests of each rule and property tests (proptest)
//! - `engine.rs`: state between ticks; one step = measure, decide, move, audit
//! - `mover.rs`, `card.rs`, `host.rs`: a move as one sequence over two sites
//! - `meter.rs`: the card's use, per-VM card costs and host costs as rates
//! - `runtime.rs`, `recovery.rs`: the placement thread; checkpoints and card death
//! - `agents.rs`: the management VMs' work on that thread (monitor, log, qos)
//! - `audit.rs`, `config.rs`: the decision log; `[placement]`, `[[mc]]`, `[card]`

use serde::{Deserialize, Serialize};

mod agents;
pub mod audit;
pub mod card;
pub mod config;
mod decide;
pub mod engine;
#[cfg(test)]
mod fake;
pub mod host;
pub mod meter;
pub mod mover;
mod recovery;
mod restart;
pub mod runtime;
mod status;
#[cfg(test)]
mod tests;
pub mod view;

pub use agents::AgentError;

/// Why the placement thread refused an operator's request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No MC VM runs that task.
    NoTask(String),
    /// Not possible now (pinned, already there, stopped, the card down).
    NotNow(String),
}
pub use decide::{calm_since, decide};

/// The card's resources, each with its own threshold (claim 8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resource {
    /// The custom hardware (FPGA engine).
    Fpga,
    Cpu,
    Memory,
    Network,
}

impl Resource {
    pub const ALL: [Resource; 4] = [Resource::Fpga, Resource::Cpu, Resource::Memory, Resource::Network];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Resource::Fpga => "fpga",
            Resource::Cpu => "cpu",
            Resource::Memory => "memory",
            Resource::Network => "network",
        }
    }
}

/// A value per card resource, as a fraction of the resource's capacity
/// (0.7 = 70%), indexed by [`Resource::index`].
pub type PerResource = [f64; 4];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Card,
    Host,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Card => Side::Host,
            Side::Host => Side::Card,
        }
    }
}

/// What an MC VM uses (or is allowed) on the host: CPUs and memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostCost {
    pub cpus: f64,
    pub memory_bytes: u64,
}

/// An MC VM as the decision sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// The management task (`monitor`, `log`, ...): one MC VM each.
    pub name: String,
    pub side: Side,
    /// Its measured use of the card, per resource, as a fraction of the
    /// card's capacity: measured now if it runs there, the last measurement
    /// otherwise (what it would add back).
    pub card_cost: PerResource,
    /// Its measured (or last measured) use of the host.
    pub host_cost: HostCost,
    /// Pinned tasks are never moved by the decision.
    pub pin: Option<Side>,
    /// The configured preference order (lower = preferred to stay on the
    /// card); ties are broken by it, then by name.
    pub order: u32,
    /// When it last moved (ms on the caller's monotonic clock).
    pub last_move_ms: Option<u64>,
}

/// The configured rules.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Per resource, the fraction of capacity the card may use with MC VMs
    /// on it (the board-card condition: every resource at or under).
    pub thresholds: PerResource,
    /// VMs come back only while every resource is at or under its threshold
    /// minus this (a fraction of capacity).
    pub hysteresis: f64,
    /// No task changes direction within this many ms of its last move, and
    /// VMs come back only after the card stayed calm this long.
    pub dwell_ms: u64,
    /// CPU and memory set aside on the host for MC VMs.
    pub reserve: HostCost,
}

/// Everything `decide` looks at.
#[derive(Clone, Debug, PartialEq)]
pub struct Inputs<'a> {
    pub now_ms: u64,
    /// The card's measured use per resource (user load and card-side MC VMs).
    pub card: PerResource,
    pub tasks: &'a [Task],
    /// What host-side MC VMs use of the reserve now.
    pub host_used: HostCost,
    /// Since when the card has been calm (every resource at or under its
    /// threshold minus the hysteresis); see [`calm_since`].
    pub calm_since_ms: Option<u64>,
    pub policy: &'a Policy,
}

/// One MC VM to move.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub task: String,
    pub to: Side,
}

/// Why the decision is what it is: a bounded code for metrics and the audit
/// log (the decision's `explain` has the human sentence).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The condition holds and nothing waits to come back.
    Holds,
    /// Over a threshold: the fewest, then cheapest, sufficient VMs move.
    Relieve,
    /// Over a threshold, and no set of movable VMs gets every resource
    /// under it: every movable VM that helps and fits the reserve moves.
    RelievePartly,
    /// Over a threshold; a sufficient set exists but would exceed the host
    /// reserve: nothing moves.
    HostReserve,
    /// Over a threshold, but every card-side VM is pinned or within its dwell.
    NothingMovable,
    /// Calm, but not yet for the dwell time.
    Settling,
    /// Calm for the dwell time: one VM comes back to the card.
    ComeBack,
    /// Calm, but no host-side VM fits back (or may move yet).
    NothingFits,
    /// An operator's move (`governor placement move`).
    Manual,
    /// Where the MC VMs start (at start-up).
    Initial,
    /// The card died: its MC VMs came up on the host (from checkpoints or cold).
    CardDead,
    /// The card is healthy again after it was declared dead.
    CardBack,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub moves: Vec<Move>,
    pub reason: Reason,
    /// The card's use per resource predicted after the moves.
    pub predicted: PerResource,
    /// One sentence for the audit log and the operator.
    pub explain: String,
}
