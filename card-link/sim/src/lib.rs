//! card-sim: a process that plays the management-and-control board card.
//!
//! - `device`: the card's state (BAR0/BAR2 memory) and its heartbeat and
//!   mailbox threads; `pci` serves it over vfio-user
//! - `commands`: what each mailbox op does to the VM table and event log
//! - `request`, `control`: the control socket (ECS service requests, the
//!   load knob, fault injection): typed requests and their server
//! - `load`, `fpga`: real CPU/memory/network load and the modelled FPGA engine
//! - `forward`: user traffic relayed through the card (TCP forwards)
//! - `costs`: each VM's measured cost (ABI 1.2 `vm-costs`) and the counters
//!   the network client and FPGA engine charge on a VM's behalf
//! - `vms`, `vmm_backend`: the card-side VMM seam; modelled VMs, or real KVM
//!   guests, each in its own `vmm` process and child cgroup of the card's
//! - `process`: `SimProcess`, which launches card-sim in its own cgroup for
//!   tests and benchmarks
//!
//! The card's cgroup is sized and measured through `cgroupfs`. The card ABI
//! itself (register layout, mailbox wire format) is `card-link`'s.

pub mod bulk;
mod commands;
pub mod control;
pub mod costs;
pub mod device;
pub mod error;
pub mod forward;
pub mod fpga;
pub mod load;
mod pci;
pub mod process;
pub mod request;
pub mod vmm_backend;
pub mod vms;

pub use commands::Refusal;
pub use device::{SimCard, SimConfig};
pub use error::{ApplyError, RequestError, SimError, VmError};
pub use process::{SimOptions, SimProcess};
pub use request::{EcsRequest, Fault, Load, Reply, Request};
