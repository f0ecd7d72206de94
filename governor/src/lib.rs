//! The host resource governor: loads the kernel programs, samples per-VM
//! telemetry into rates, and serves status.
//!
//! - `telemetry`: the kernel programs (load, pin, attach, read maps)
//! - `netdev`, `tracefs`: the host as the kernel shows it (cgroups: the
//!   `cgroupfs` crate)
//! - `sampler`: counters -> rates (pure)
//! - `governor`: the watched VMs and one sampling step
//! - `daemon`, `api`: `governor run` and its control socket

pub mod api;
pub mod btf;
pub mod config;
pub mod daemon;
pub mod governor;
pub mod manage;
pub mod metrics;
pub mod netdev;
pub mod placement;
pub mod qos;
pub mod runstate;
pub mod sampler;
pub mod shape;
pub mod telemetry;
pub mod tracefs;
