//! One cgroup implementation for the whole project: the governor (VM
//! identity and accounting), the vmm (isolation of MC VMs, claim 11),
//! card-sim (the card's own cgroup) and the tests all use it.
//!
//! - `layout`: where the hierarchies are, from `/proc/self/mounts` (pure v2,
//!   hybrid v1 + v2; pure v1 is refused); an injectable root for tests.
//! - `cgroup`: one cgroup: create with limits (rolled back when a step
//!   fails), attach processes and threads, usage, remove.
//! - `limits`: CPU quota, cpuset and memory limits, validated field by field.
//! - `watch`: child cgroups appearing under watched ones (inotify).
//! - `priority`: the calling thread's CPU priority (the thread-level
//!   counterpart of a cgroup's CPU weight).
//!
//! A VM's identity is its cgroup v2 id (what `bpf_get_current_cgroup_id`
//! returns), so a cgroup2 hierarchy is required. Each controller is used
//! where it is mounted: a v1 hierarchy on a hybrid host, the unified one
//! otherwise. The same relative path is used in every hierarchy, as systemd
//! does.
//!
//! Why not cgroups-rs: 0.5 hard-depends on zbus (the systemd D-Bus stack)
//! and models a host as all-v1 or all-v2, while hybrid hosts (identity from
//! v2, limits from v1, like this project's CI machines) are the case this
//! crate exists for; what is needed is a handful of stable kernel files.

mod cgroup;
mod error;
mod exec;
mod files;
mod layout;
mod limits;
pub mod priority;
mod watch;

pub use cgroup::{has_children, Cgroup, Memory, MemoryFiles};
pub use error::CgroupError;
pub use layout::{Controller, Layout};
pub use limits::Limits;
pub use watch::{Changed, ChildWatch};

pub type Result<T, E = CgroupError> = std::result::Result<T, E>;
