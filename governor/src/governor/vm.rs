//! One watched VM: its cgroup, its interfaces, its QoS slot and limits, and
//! what the last tick saw.

use cgroupfs::Cgroup;
use governor_common::NetStats;

use crate::config::VmConfig;
use crate::qos::{Direction, Limit, Mode};
use crate::sampler::Sample;

/// A value per QoS direction of a VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PerDirection<T> {
    /// From the VM.
    pub egress: T,
    /// To the VM.
    pub ingress: T,
}

impl<T> PerDirection<T> {
    pub fn get(&self, d: Direction) -> &T {
        match d {
            Direction::Egress => &self.egress,
            Direction::Ingress => &self.ingress,
        }
    }

    pub fn get_mut(&mut self, d: Direction) -> &mut T {
        match d {
            Direction::Egress => &mut self.egress,
            Direction::Ingress => &mut self.ingress,
        }
    }
}

/// A host-side interface of a VM as the programs are attached to it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
}

pub struct WatchedVm {
    pub cfg: VmConfig,
    pub cgroup: Cgroup,
    /// cgroup v2 id of the VM's own cgroup.
    pub id: u64,
    /// Ids of the cgroup and every child seen so far (only ever added: a
    /// child that is gone keeps its counters in the VM's total).
    pub subtree: Vec<u64>,
    /// Those of them that exist and are counted into the VM's slot now.
    pub live: Vec<u64>,
    pub interfaces: Vec<Interface>,
    /// QoS slot in the kernel maps.
    pub slot: u32,
    pub limits: PerDirection<Option<Limit>>,
    pub prev: Option<Sample>,
    /// Traffic of interfaces the VM had before they were re-created (a new
    /// ifindex starts counting from zero; the VM's totals must not).
    pub net_retired: NetStats,
    /// Its memory files, held open (opened on the first tick).
    pub mem_files: Option<cgroupfs::MemoryFiles>,
    /// The last full memory reading (memory.stat is read every
    /// `MEM_STAT_EVERY` ticks; usage every tick).
    pub mem_full: Option<cgroupfs::Memory>,
    /// The memory limit read with it (None: unlimited).
    pub mem_limit: Option<u64>,
    /// Its cgroup directory, held open to ask cheaply for children.
    pub dir: Option<std::fs::File>,
}

impl WatchedVm {
    /// This tick's memory: read now when `full` (or never read yet), else
    /// the last reading. Even the usage file is costly on a cgroup v1
    /// memory controller (its read flushes the per-CPU statistics), so
    /// memory, which moves slowly next to CPU and network, is read every
    /// few ticks (cAdvisor reads it every 10 s).
    pub fn memory(&mut self, full: bool) -> Result<Option<cgroupfs::Memory>, cgroupfs::CgroupError> {
        if self.mem_files.is_none() {
            self.mem_files = self.cgroup.memory_files()?;
        }
        let Some(files) = &self.mem_files else { return Ok(None) };
        match self.mem_full {
            Some(last) if !full => Ok(Some(last)),
            _ => {
                let m = files.read()?;
                self.mem_limit = files.limit()?;
                self.mem_full = Some(m);
                Ok(Some(m))
            }
        }
    }
}

impl WatchedVm {
    /// Look at the VM's cgroup subtree: the cgroups in it that the VM does
    /// not count yet (with their directories, to watch for theirs), and
    /// those it counts that are gone. The caller counts and uncounts them
    /// (see `Governor::tick`). A cgroup without children (most VMs) costs
    /// one fstat of its held directory; only one with children is walked (a
    /// readdir of every cgroup below and a stat of each).
    pub fn look_at_subtree(&mut self) -> (Vec<(u64, std::path::PathBuf)>, Vec<u64>) {
        if self.dir.is_none() {
            self.dir = self.cgroup.open_dir().ok();
        }
        let now: Vec<(u64, std::path::PathBuf)> =
            if self.dir.as_ref().is_some_and(|d| cgroupfs::has_children(d).is_ok_and(|c| !c)) {
                vec![(self.id, self.cgroup.dir())]
            } else {
                match self.cgroup.subtree() {
                    Ok(now) => now,
                    Err(e) => {
                        tracing::debug!(vm = %self.cfg.name, "walking the cgroup subtree: {e}");
                        return (Vec::new(), Vec::new());
                    }
                }
            };
        let gone = self.live.iter().copied().filter(|id| !now.iter().any(|(n, _)| n == id)).collect();
        let new = now.into_iter().filter(|(id, _)| !self.live.contains(id)).collect();
        (new, gone)
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// True when this direction is shaped (has an HTB class).
    pub fn shaped(&self, d: Direction) -> bool {
        self.limits.get(d).is_some_and(|l| l.mode == Mode::Shape)
    }

    /// HTB class minor of this VM (slot + 1; minor 0 is the qdisc itself).
    pub fn class_minor(&self) -> u16 {
        (self.slot + 1) as u16
    }
}
