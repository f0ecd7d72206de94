//! The health board: the latest state the monitor agent decided for each
//! user VM, and whether management is working. Shared between the
//! placement thread (which feeds it) and the status (which reads it), so a
//! status request never waits for a move.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vmm::proto::signals::HealthChange;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmHealth {
    pub vm: String,
    pub health: String,
    pub reason: String,
    /// Wall-clock ms when it entered this state.
    pub since_ms: u64,
    /// The number behind the reason (OOM kills, µs of delay, ms quiet...).
    pub detail: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Board {
    pub vms: BTreeMap<String, VmHealth>,
    /// None while the monitor answers; otherwise why management is degraded
    /// (the states above are then the last it decided).
    pub degraded: Option<String>,
    /// Monitor ticks answered.
    pub ticks: u64,
    /// Each user VM's log: waiting, written, dropped.
    #[serde(default)]
    pub logs: Vec<crate::manage::logs::LogStat>,
    /// Why log management is degraded (the log VM cannot take lines; they
    /// wait, bounded), when it is.
    #[serde(default)]
    pub log_degraded: Option<String>,
    /// Why QoS policy is degraded (the qos VM does not answer; the limits
    /// in force stay), when it is.
    #[serde(default)]
    pub qos_degraded: Option<String>,
    /// Limit changes the qos VM decided, for the sampling loop to apply.
    #[serde(skip)]
    pub qos_pending: Vec<PendingQos>,
}

/// A limit change decided by the qos VM, not yet applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingQos {
    pub vm: String,
    pub change: vmm::proto::qos::QosChange,
    /// Where the qos VM ran.
    pub side: crate::placement::Side,
}

pub type SharedBoard = Arc<Mutex<Board>>;

impl Board {
    /// Apply the agent's changes (for the VMs named by slot).
    pub fn apply(&mut self, names: &[String], changes: &[HealthChange], now_ms: u64) {
        for c in changes {
            let Some(name) = names.get(c.slot as usize) else { continue };
            self.vms.insert(
                name.clone(),
                VmHealth {
                    vm: name.clone(),
                    health: c.health.name().into(),
                    reason: c.reason.name().into(),
                    since_ms: now_ms,
                    detail: c.detail,
                },
            );
        }
        // VMs no longer watched leave the board.
        self.vms.retain(|n, _| names.contains(n));
        self.degraded = None;
        self.ticks += 1;
    }
}
