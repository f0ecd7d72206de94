//! The real kernel side: the loaded programs and their maps (loading,
//! pinning and attaching are in load.rs, VM slots in slots.rs), the tc
//! programs attached per interface, and the counters read back.
//!
//! Maps are pinned under the pin directory (default `/sys/fs/bpf/governor`)
//! so `bpftool map dump pinned /sys/fs/bpf/governor/CGROUPS` prints the
//! per-cgroup counters with field names (the object carries BTF). Programs
//! are pinned beside them (`prog_*`). Everything is detached and unpinned
//! when the `Telemetry` is dropped.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::programs::tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::Ebpf;
use governor_common::{maps, CgroupStats, CpuState, NetEntry, NetStats, OomEvent, Policer, QosStats, MAX_QOS_VMS};

use super::load::program;
use super::vmstats::{Bases, SlotBases, VmStats};
use super::{pins, qos_index, Telemetry, TelemetryError, VmKeys};
use crate::qos::Direction;

pub(super) struct Attached {
    ifindex: u32,
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
}

pub struct BpfTelemetry {
    pub(super) ebpf: Ebpf,
    pub(super) pin_dir: PathBuf,
    pub(super) cgroups: PerCpuHashMap<MapData, u64, CgroupStats>,
    pub(super) net: PerCpuHashMap<MapData, u32, NetEntry>,
    pub(super) oom: RingBuf<MapData>,
    pub(super) qos: Array<MapData, Policer>,
    pub(super) qos_stats: PerCpuArray<MapData, QosStats>,
    pub(super) cpu_state: PerCpuArray<MapData, CpuState>,
    /// Each VM's counters, mapped (see slots.rs).
    pub(super) vm_stats: VmStats,
    pub(super) cg_slot: aya::maps::HashMap<MapData, u64, u32>,
    /// Whole-map reads of `CGROUPS` (to see how full it is).
    pub(super) batch: super::batch::BatchReader,
    /// What each VM cgroup and interface counted before its VM's slot did.
    pub(super) cg_bases: Bases<u64, CgroupStats>,
    pub(super) net_bases: Bases<u32, NetStats>,
    /// Each VM's bases added up, once settled.
    pub(super) slot_bases: SlotBases,
    /// The VM slot of every cgroup counted into one (`count_cgroup_in`).
    pub(super) registered: HashMap<u64, u32>,
    pub(super) interfaces: HashMap<String, Attached>,
    /// Keeps `kernel.bpf_stats_enabled` on from the first time the
    /// programs' costs are read (the kernel counts per-program run time
    /// only then; closing the fd turns it off again unless someone else
    /// holds it). Not before: with it on, every BPF program run on the host
    /// pays two clock reads (~30-60 ns per context switch here, as much as
    /// the sched_switch program itself), and only the metrics exporter
    /// reads the costs. Inner None: the kernel refused.
    pub(super) stats: std::sync::OnceLock<Option<std::os::fd::OwnedFd>>,
}

/// Map update flags (`include/uapi/linux/bpf.h`): create only / replace only.
const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

impl BpfTelemetry {
    /// Write `qos_slot` (VM slot + 1, 0 = none) into every CPU's copy of
    /// the interface's `NET` entry, keeping its counters. Before the tc
    /// programs are attached nothing else writes the entry; on an attached
    /// interface (a restarted governor whose VMs moved slots) an increment
    /// made between this read and write would be lost, so an entry that
    /// already holds the slot is left alone.
    fn set_net_slot(&mut self, ifindex: u32, qos_slot: u32) -> Result<(), TelemetryError> {
        let err = |source| TelemetryError::Map { name: maps::NET, source };
        // A new entry is created with NOEXIST: if a filter left on the
        // interface creates it first, it is read again, not zeroed.
        for _ in 0..2 {
            let (mut values, flags) = match self.net.get(&ifindex, 0) {
                Ok(v) => (v.iter().copied().collect::<Vec<_>>(), BPF_EXIST),
                Err(aya::maps::MapError::KeyNotFound) => {
                    (vec![NetEntry::default(); super::possible_cpus()?], BPF_NOEXIST)
                }
                Err(source) => return Err(err(source)),
            };
            if values.iter().all(|v| v.qos_slot == qos_slot) {
                return Ok(());
            }
            for v in &mut values {
                v.qos_slot = qos_slot;
            }
            let values = aya::maps::PerCpuValues::try_from(values).map_err(|source| TelemetryError::Io {
                op: "build per-CPU values",
                path: self.pin_dir.join(maps::NET),
                source,
            })?;
            match self.net.insert(ifindex, values, flags) {
                Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                    continue
                }
                r => return r.map_err(err),
            }
        }
        Err(TelemetryError::Interface {
            name: format!("ifindex {ifindex}"),
            reason: "its NET entry kept changing while its VM slot was set".into(),
        })
    }
}

impl Telemetry for BpfTelemetry {
    fn sched_fallbacks(&self) -> super::SchedFallbacks {
        let mut f = super::SchedFallbacks::default();
        match self.cpu_state.get(&0, 0) {
            Ok(states) => {
                for s in states.iter() {
                    f.unseen_switch_ins += s.unseen_switch_ins;
                    f.failed_flushes += s.failed_flushes;
                }
            }
            Err(e) => tracing::debug!("reading {}: {e}", maps::CPU_STATE),
        }
        f
    }

    fn program_stats(&self) -> Vec<super::ProgramStat> {
        self.stats.get_or_init(|| match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!("enabling BPF run-time statistics: {e}; program costs read as 0");
                None
            }
        });
        let mut out = Vec::new();
        for (name, p) in self.ebpf.programs() {
            match p.info() {
                Ok(i) => {
                    out.push(super::ProgramStat { name: name.to_string(), run_time: i.run_time(), runs: i.run_count() })
                }
                Err(e) => tracing::debug!(program = name, "reading its info: {e}"),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn ifindex(&self, name: &str) -> Result<u32, TelemetryError> {
        crate::netdev::ifindex(name).map_err(|source| TelemetryError::NoInterface { name: name.into(), source })
    }

    /// Filters of ours left on the interface by an earlier process are
    /// replaced, never doubled (clsact, direct action).
    fn attach_interface(&mut self, name: &str) -> Result<u32, TelemetryError> {
        if let Some(a) = self.interfaces.get(name) {
            return Ok(a.ifindex);
        }
        let ifindex = self.ifindex(name)?;
        ensure_clsact(name)?;
        let mut ids = Vec::with_capacity(2);
        for (prog, dir) in [("gov_tc_ingress", TcAttachType::Ingress), ("gov_tc_egress", TcAttachType::Egress)] {
            // A filter of ours from an earlier process may be there or not:
            // either way the attach below is the only one left.
            let _ = tc::qdisc_detach_program(name, dir, prog);
            let p: &mut SchedClassifier = program(&mut self.ebpf, prog)?;
            let id = p
                .attach_with_options(name, dir, TcAttachOptions::Netlink(NlOptions::default()))
                .map_err(|e| TelemetryError::Interface { name: name.into(), reason: format!("attach {prog}: {e}") })?;
            ids.push(id);
        }
        let egress = ids.pop().ok_or(TelemetryError::Missing("egress link"))?;
        let ingress = ids.pop().ok_or(TelemetryError::Missing("ingress link"))?;
        self.interfaces.insert(name.to_string(), Attached { ifindex, ingress, egress });
        Ok(ifindex)
    }

    fn detach_interface(&mut self, name: &str) {
        let Some(a) = self.interfaces.remove(name) else { return };
        for (prog, id) in [("gov_tc_ingress", a.ingress), ("gov_tc_egress", a.egress)] {
            let Some(p) = self.ebpf.program_mut(prog) else { continue };
            let detached = <&mut SchedClassifier>::try_from(p)
                .map_err(|e| e.to_string())
                .and_then(|p| p.detach(id).map_err(|e| e.to_string()));
            // A vanished interface took its filters with it: nothing to say.
            if let Err(e) = detached {
                if crate::netdev::ifindex(name).is_ok() {
                    tracing::warn!(interface = name, program = prog, "detaching: {e}");
                }
            }
        }
    }

    /// A cgroup counted into a VM's slot (`count_cgroup_in`) shows only
    /// what it counted before: its events since are in the VM's counters
    /// (what a CPU gathered for it and has not flushed is left out too, so
    /// the figure never goes back).
    fn cgroup(&self, id: u64) -> Result<CgroupStats, TelemetryError> {
        let mut total = cgroup_entry(&self.cgroups, id)?;
        if self.registered.contains_key(&id) {
            return Ok(total);
        }
        // After CGROUPS, never before (see CpuState::pending).
        let states =
            self.cpu_state.get(&0, 0).map_err(|source| TelemetryError::Map { name: maps::CPU_STATE, source })?;
        for (cg, acc) in states.iter().filter_map(CpuState::pending) {
            if cg == id {
                total.add(acc);
            }
        }
        Ok(total)
    }

    /// Only when more than half of the map is used: every VM's known subtree
    /// is kept, their totals must never go back.
    fn prune_cgroups(&mut self, keep: &HashSet<u64>) -> usize {
        // Counted in a few batch reads (listing the keys is a call each).
        let keys: Vec<u64> = match self.batch.cgroups() {
            Ok(all) if all.len() <= governor_common::MAX_CGROUPS / 2 => return 0,
            Ok(all) => all.into_keys().collect(),
            Err(e) => {
                tracing::warn!("counting the per-cgroup map's entries: {e}");
                return 0;
            }
        };
        let mut n = 0;
        for k in keys.into_iter().filter(|k| !keep.contains(k)) {
            match self.cgroups.remove(&k) {
                Ok(()) => n += 1,
                Err(e) => tracing::debug!(cgroup = k, "pruning: {e}"),
            }
        }
        n
    }

    /// An interface with a VM slot shows only what it counted before: its
    /// packets since are in the VM's counters.
    fn net(&self, ifindex: u32) -> Result<NetStats, TelemetryError> {
        net_entry(&self.net, ifindex)
    }

    fn claim_slot(&mut self, vm_id: u64, in_use: &[u32]) -> Result<u32, TelemetryError> {
        self.claim_slot_in_maps(vm_id, in_use)
    }

    fn release_slots(&mut self, keep: &[u64]) {
        self.release_slots_in_maps(keep)
    }

    fn count_cgroup_in(&mut self, id: u64, slot: u32) -> Result<(), TelemetryError> {
        self.count_cgroup_in_map(id, slot)
    }

    fn read_vms(&mut self, vms: &[VmKeys<'_>], out: &mut Vec<(CgroupStats, NetStats)>) -> Result<(), TelemetryError> {
        self.read_vms_in_place(vms, out)
    }

    fn uncount_cgroup(&mut self, id: u64) {
        self.uncount_cgroup_in_map(id)
    }

    fn forget_stale(&mut self, cgroups: &HashSet<u64>, interfaces: &HashSet<u32>) {
        self.forget_stale_in_maps(cgroups, interfaces)
    }

    fn set_vm_of_interface(&mut self, ifindex: u32, slot: u32) -> Result<(), TelemetryError> {
        if slot as usize >= MAX_QOS_VMS {
            return Err(TelemetryError::Interface {
                name: format!("ifindex {ifindex}"),
                reason: format!("more than {MAX_QOS_VMS} VMs with QoS slots"),
            });
        }
        self.set_net_slot(ifindex, slot + 1)
    }

    fn clear_vm_of_interface(&mut self, ifindex: u32) {
        // Should the index come back for another interface, it is read afresh.
        self.net_bases.forget(ifindex);
        if let Err(e) = self.set_net_slot(ifindex, 0) {
            tracing::warn!(ifindex, "clearing the interface's VM slot: {e}");
        }
    }

    fn policer(&self, slot: u32, dir: Direction) -> Result<Policer, TelemetryError> {
        self.qos.get(&qos_index(slot, dir), 0).map_err(|source| TelemetryError::Map { name: maps::QOS, source })
    }

    /// The whole value in one update; a packet meeting the change is judged
    /// again with the new fields if its bucket exchange finds the value
    /// replaced (governor-ebpf's police.rs).
    fn set_policer(&mut self, slot: u32, dir: Direction, p: Policer) -> Result<(), TelemetryError> {
        self.qos.set(qos_index(slot, dir), p, 0).map_err(|source| TelemetryError::Map { name: maps::QOS, source })
    }

    fn qos_stats(&self, slot: u32, dir: Direction) -> Result<QosStats, TelemetryError> {
        let v = self
            .qos_stats
            .get(&qos_index(slot, dir), 0)
            .map_err(|source| TelemetryError::Map { name: maps::QOS_STATS, source })?;
        Ok(v.iter().fold(QosStats::default(), |mut a, s| {
            a.add(s);
            a
        }))
    }

    fn drain_oom(&mut self) -> Vec<OomEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.oom.next() {
            if item.len() >= std::mem::size_of::<OomEvent>() {
                // SAFETY: OomEvent is plain integers; read_unaligned copes
                // with any alignment of the ring buffer record.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const OomEvent) });
            }
        }
        out
    }
}

impl Drop for BpfTelemetry {
    fn drop(&mut self) {
        let names: Vec<String> = self.interfaces.keys().cloned().collect();
        for n in names {
            self.detach_interface(&n);
        }
        // Unpinning lets the kernel free the maps once our fds close, and
        // detach the tracing programs once their links go.
        pins::clear_pins(&self.pin_dir);
    }
}

/// One cgroup's own entry of `CGROUPS`, summed over CPUs (zero if it
/// never ran outside a VM slot).
pub(super) fn cgroup_entry(
    map: &PerCpuHashMap<MapData, u64, CgroupStats>,
    id: u64,
) -> Result<CgroupStats, TelemetryError> {
    match map.get(&id, 0) {
        Ok(per_cpu) => Ok(per_cpu.iter().fold(CgroupStats::default(), |mut a, v| {
            a.add(v);
            a
        })),
        Err(aya::maps::MapError::KeyNotFound) => Ok(CgroupStats::default()),
        Err(source) => Err(TelemetryError::Map { name: maps::CGROUPS, source }),
    }
}

/// One interface's own counters in `NET`, summed over CPUs.
pub(super) fn net_entry(map: &PerCpuHashMap<MapData, u32, NetEntry>, ifindex: u32) -> Result<NetStats, TelemetryError> {
    match map.get(&ifindex, 0) {
        Ok(per_cpu) => Ok(per_cpu.iter().fold(NetStats::default(), |mut a, v| {
            a.add(&v.stats);
            a
        })),
        Err(aya::maps::MapError::KeyNotFound) => Ok(NetStats::default()),
        Err(source) => Err(TelemetryError::Map { name: maps::NET, source }),
    }
}

/// The clsact qdisc the tc programs attach under (one already there is
/// fine: ours from before, or another tool's).
pub(super) fn ensure_clsact(iface: &str) -> Result<(), TelemetryError> {
    match tc::qdisc_add_clsact(iface) {
        Ok(()) => Ok(()),
        Err(tc::TcError::NetlinkError(n)) if n.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(TelemetryError::Interface { name: iface.into(), reason: format!("add clsact: {e}") }),
    }
}
