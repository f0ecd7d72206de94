//! Embedded KVM VMM for the management (MC) VMs: the host's second VMM
//! (claim 13) and, inside the card simulator, the card's first VMM.
//!
//! The library is the VM ([`Vm`]: create, run, pause, resume, snapshot,
//! restore, request, stats) and its devices; [`host`] is what a caller
//! needs to run VMs in separate `vmm` processes instead (the control
//! protocol, its client, spawning). The `vmm` binary (`src/bin/vmm`) is
//! the control server and event loop around one `Vm`.
//!
//! See `vmm/README.md` for the device model, the guest and the snapshot format.

pub mod boot;
pub mod devices;
pub mod error;
pub mod host;
pub mod linux;
mod sink;
pub mod snapshot;
pub mod vcpu_state;
pub mod vm;

pub use cgroupfs;
pub use error::{Error, LoadError, MemoryError, Result, SnapshotError, StopReason};
/// The guest/VMM contract (the `mc-proto` crate, shared with the guest).
pub use mc_proto as proto;
pub use vm::{Reply, RunState, Sinks, Vm, VmConfig, VmStats};
