//! Per-VM counters from the kernel programs, behind one trait so the
//! governor's tick is testable without a kernel.
//!
//! - `bpf`: the real thing: loads the programs, pins their maps under the
//!   pin directory, attaches them and reads the maps back.
//! - `fake`: an in-memory stand-in that tests drive by hand.

use std::collections::HashSet;
use std::io;
use std::path::PathBuf;

use governor_common::{CgroupStats, NetStats, OomEvent, Policer, QosStats, MAX_QOS_VMS};
use thiserror::Error;

use crate::qos::Direction;

mod batch;
mod bpf;
/// In-memory fakes are for tests (this crate's, or others' with the
/// `fakes` feature); the daemon's binary does not carry them.
#[cfg(any(test, feature = "fakes"))]
pub mod fake;
mod floor;
mod load;
mod pins;
mod slots;
mod vmstats;

pub use bpf::BpfTelemetry;
#[cfg(any(test, feature = "fakes"))]
pub use fake::FakeTelemetry;
pub use floor::attach_floor_probe;

/// How many CPUs the kernel may run per-CPU map values for (what a
/// per-CPU value holds one copy per).
pub(crate) fn possible_cpus() -> Result<usize, TelemetryError> {
    aya::util::nr_cpus().map_err(|(what, source)| TelemetryError::Io {
        op: "count possible CPUs",
        path: std::path::PathBuf::from(what),
        source,
    })
}

/// One past the highest possible CPU id: the stride of `VM_STATS`, which
/// the programs index by CPU id (not the count of possible CPUs, which is
/// smaller when the possible mask has holes, as `0-3,8-11`).
pub(crate) fn cpu_id_end() -> Result<usize, TelemetryError> {
    const POSSIBLE: &str = "/sys/devices/system/cpu/possible";
    let io = |source| TelemetryError::Io { op: "read", path: PathBuf::from(POSSIBLE), source };
    let text = std::fs::read_to_string(POSSIBLE).map_err(io)?;
    parse_cpu_id_end(&text).ok_or_else(|| io(std::io::Error::new(std::io::ErrorKind::InvalidData, text.clone())))
}

/// `0-3,8-11` -> 12.
fn parse_cpu_id_end(text: &str) -> Option<usize> {
    text.trim()
        .split(',')
        .map(|r| r.rsplit('-').next().and_then(|n| n.trim().parse::<usize>().ok()))
        .try_fold(0, |end, n| Some(end.max(n? + 1)))
        .filter(|end| *end > 0)
}

#[derive(Debug, Error)]
pub enum TelemetryError {
    #[error("loading the kernel programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("the object has no {0}")]
    Missing(&'static str),
    #[error("interface {name:?}: {reason}")]
    Interface { name: String, reason: String },
    #[error("interface {name:?}: {source}")]
    NoInterface {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Tracefs(#[from] crate::tracefs::TracefsError),
    #[error("kernel BTF: {0}")]
    Btf(#[from] crate::btf::BtfError),
    #[error("raw tracepoint {tp} passes {got} arguments, the program expects {want} (unsupported kernel)")]
    RawTracepoint { tp: &'static str, got: u32, want: u32 },
    #[error("no free VM slot: at most {MAX_QOS_VMS} VMs are watched at once")]
    NoSlot,
}

/// One VM's keys, for [`Telemetry::read_vms`]: its slot, its cgroups (its
/// own and the children seen so far: only ever added to, never replaced)
/// and its interfaces' indexes.
pub struct VmKeys<'a> {
    pub slot: u32,
    pub cgroups: &'a [u64],
    pub ifindexes: &'a [u32],
}

/// What the governor needs from the kernel side: per-cgroup and
/// per-interface counters, the QoS maps, OOM events, and the interfaces
/// the tc programs are attached to. A VM's QoS slot is its index in the
/// QoS maps (two entries, one per direction).
pub trait Telemetry {
    /// The ifindex an interface name has now (a VMM may re-create it).
    fn ifindex(&self, name: &str) -> Result<u32, TelemetryError>;
    /// Attach the tc counters to both directions of an interface; returns
    /// its ifindex. Attaching twice is a no-op.
    fn attach_interface(&mut self, name: &str) -> Result<u32, TelemetryError>;
    /// Detach from an interface (a no-op when it is already gone).
    fn detach_interface(&mut self, name: &str);
    /// Counters of one cgroup, summed over CPUs (zero if it never ran). For
    /// a cgroup counted into a VM's slot (`count_cgroup_in`), only what it
    /// counted before: the VM's counters (`read_vms`) have the rest.
    fn cgroup(&self, id: u64) -> Result<CgroupStats, TelemetryError>;
    /// Counters of one interface, summed over CPUs.
    fn net(&self, ifindex: u32) -> Result<NetStats, TelemetryError>;
    /// Tell the tc programs which VM (QoS slot) an interface belongs to;
    /// done before attaching to it (see `BpfTelemetry::set_net_slot`).
    fn set_vm_of_interface(&mut self, ifindex: u32, slot: u32) -> Result<(), TelemetryError>;
    fn clear_vm_of_interface(&mut self, ifindex: u32);
    /// The policer of a VM direction.
    fn policer(&self, slot: u32, dir: Direction) -> Result<Policer, TelemetryError>;
    /// Replace the policer of a VM direction (one map update).
    fn set_policer(&mut self, slot: u32, dir: Direction, p: Policer) -> Result<(), TelemetryError>;
    /// QoS counters of a VM direction, summed over CPUs.
    fn qos_stats(&self, slot: u32, dir: Direction) -> Result<QosStats, TelemetryError>;
    /// OOM victims reported since the last call.
    fn drain_oom(&mut self) -> Vec<OomEvent>;
    /// When the cgroup map fills up, remove entries of cgroups outside
    /// `keep`; returns how many were removed.
    fn prune_cgroups(&mut self, keep: &HashSet<u64>) -> usize;

    /// The scheduler program's fallbacks so far (none for fakes).
    fn sched_fallbacks(&self) -> SchedFallbacks {
        SchedFallbacks::default()
    }
    /// Each loaded program's own cost as the kernel counts it
    /// (`kernel.bpf_stats_enabled`): (name, run time, runs).
    fn program_stats(&self) -> Vec<ProgramStat> {
        Vec::new()
    }

    /// A slot for the VM whose own cgroup has id `vm_id`, none of
    /// `in_use`: its index in the per-VM maps (counters, QoS limits). The
    /// kernel side gives back the slot the VM had when a governor before
    /// left its maps pinned (so its counters and limits go on); by default
    /// the lowest slot not in use.
    fn claim_slot(&mut self, vm_id: u64, in_use: &[u32]) -> Result<u32, TelemetryError> {
        let _ = vm_id;
        (0..MAX_QOS_VMS as u32).find(|s| !in_use.contains(s)).ok_or(TelemetryError::NoSlot)
    }
    /// Give up the slots of every VM but those whose own cgroups are
    /// `keep` (VMs a governor before watched and this one does not), so
    /// that they are free for the VMs of this one. Done before any claims.
    fn release_slots(&mut self, keep: &[u64]) {
        let _ = keep;
    }
    /// From now on count cgroup `id` (a VM's own cgroup or a child of it)
    /// into VM slot `slot`. By default a no-op: counters stay per cgroup.
    fn count_cgroup_in(&mut self, id: u64, slot: u32) -> Result<(), TelemetryError> {
        let _ = (id, slot);
        Ok(())
    }
    /// Stop counting cgroup `id` into a VM's slot (a child cgroup that is
    /// gone; what it counted stays in the slot).
    fn uncount_cgroup(&mut self, id: u64) {
        let _ = id;
    }
    /// Once every VM's cgroups and interfaces are known: stop counting any
    /// other cgroup or interface into a VM's slot (what a governor before
    /// left: a child since removed, an interface no longer in the config).
    fn forget_stale(&mut self, cgroups: &HashSet<u64>, interfaces: &HashSet<u32>) {
        let _ = (cgroups, interfaces);
    }
    /// Every VM's counters, summed over CPUs, into `out` (one per key, in
    /// order): its cgroups' and interfaces' by default. The real kernel
    /// side counts a VM's events in its slot and reads them in place.
    fn read_vms(&mut self, vms: &[VmKeys<'_>], out: &mut Vec<(CgroupStats, NetStats)>) -> Result<(), TelemetryError> {
        out.clear();
        for k in vms {
            let mut net = NetStats::default();
            for i in k.ifindexes {
                net.add(&self.net(*i)?);
            }
            out.push((self.cgroups(k.cgroups)?, net));
        }
        Ok(())
    }

    /// Counters of several cgroups added together (a VM's subtree).
    fn cgroups(&self, ids: &[u64]) -> Result<CgroupStats, TelemetryError> {
        let mut total = CgroupStats::default();
        for id in ids {
            total.add(&self.cgroup(*id)?);
        }
        Ok(total)
    }
}

/// How often the scheduler program had to fall back (see `CpuState`),
/// summed over CPUs: both should stay small; a growing `failed_flushes`
/// means the cgroup map is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedFallbacks {
    pub unseen_switch_ins: u64,
    pub failed_flushes: u64,
}

/// One kernel program's own cost (what ebpf_exporter exports).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramStat {
    pub name: String,
    pub run_time: std::time::Duration,
    pub runs: u64,
}

/// Index of a VM direction in the QoS maps.
pub fn qos_index(slot: u32, dir: Direction) -> u32 {
    slot * 2 + dir.index()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cpu_stride_is_one_past_the_highest_id() {
        assert_eq!(super::parse_cpu_id_end("0-1\n"), Some(2));
        assert_eq!(super::parse_cpu_id_end("0\n"), Some(1));
        assert_eq!(super::parse_cpu_id_end("0-3,8-11\n"), Some(12));
        assert_eq!(super::parse_cpu_id_end(""), None);
        assert_eq!(super::parse_cpu_id_end("x"), None);
    }
}
