//! What `governor placement` and the API show of the placement: the card,
//! and each MC VM with where it runs and how it got there.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::audit::{MoveReport, ResourceView};
use super::{HostCost, Side};

/// One MC VM as `governor placement` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub task: String,
    pub side: Side,
    /// Wall-clock ms since the epoch when it started running there.
    pub since_ms: u64,
    /// Per resource (fpga, cpu, memory, network), fraction of the card.
    pub card_cost: [f64; 4],
    pub host_cost: HostCost,
    pub pinned: Option<Side>,
    /// Its VM id on the card (card side).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_vm: Option<u32>,
    /// Its VMM's control socket (host side).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_socket: Option<PathBuf>,
    /// Age of its latest checkpoint on the host (card-side VMs), ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_age_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_move: Option<MoveReport>,
    /// Why its VM was stopped (a malformed answer, a fault); it stays so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CardStatus {
    pub healthy: bool,
    /// Why not, when not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub resources: Vec<ResourceView>,
    /// How the link reaches it (mapped BARs or messages, DMA streams).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PlacementStatus {
    pub dry_run: bool,
    pub tick: u64,
    pub card: CardStatus,
    pub tasks: Vec<TaskStatus>,
}
