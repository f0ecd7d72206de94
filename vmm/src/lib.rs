//! Embedded KVM VMM for the management (MC) VMs: the host's second VMM
//! (claim 13) and, inside the card simulator, the card's first VMM.
//!
//! See `vmm/README.md` for the device model, the guest and the snapshot format.

pub mod boot;
pub mod error;
pub mod serial;
pub mod snapshot;
pub mod vcpu_state;
pub mod virtio;
pub mod vm;

pub use cgroupfs;
pub use error::{Error, Result, StopReason};
/// The guest/VMM contract (the `mc-proto` crate, shared with the guest).
pub use mc_proto as proto;
pub use vm::{Reply, RunState, Sinks, Vm, VmConfig, VmStats};
pub mod control;
pub mod event_loop;
pub mod linux;
pub mod process;
