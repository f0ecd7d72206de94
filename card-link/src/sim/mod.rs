//! card-sim: a process that plays the management-and-control board card.
//! `device` holds the card's state and threads, `pci` serves it over
//! vfio-user, `commands` executes mailbox ops, `control` takes ECS
//! service requests, load and faults (the card's cgroup, sized and measured
//! through the `cgroupfs` crate),
//! `load`/`fpga` make real and modelled work, `vms` is the card-side VMM
//! seam, and `process` launches card-sim for tests and benchmarks.

mod commands;
pub mod control;
pub mod device;
pub mod fpga;
pub mod load;
mod pci;
pub mod process;
pub mod vmm_backend;
pub mod vms;

pub use device::{SimCard, SimConfig};
pub use process::SimProcess;
