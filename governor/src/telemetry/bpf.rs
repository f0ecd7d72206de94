//! Loads the kernel programs, pins their maps, attaches them, and reads the
//! counters back.
//!
//! Maps are pinned under the pin directory (default `/sys/fs/bpf/governor`)
//! so `bpftool map dump pinned /sys/fs/bpf/governor/CGROUPS` prints the
//! per-cgroup counters with field names (the object carries BTF). Programs
//! are pinned beside them (`prog_*`). Everything is detached and unpinned
//! when the `Telemetry` is dropped.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::programs::tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions};
use aya::programs::{SchedClassifier, TcAttachType, TracePoint};
use aya::{Ebpf, EbpfLoader};
use governor_common::{maps, CgroupStats, CpuState, NetEntry, NetStats, OomEvent, Policer, QosStats, MAX_QOS_VMS};

use super::vmstats::{Bases, SlotBases, VmStats};
use super::{pins, qos_index, Telemetry, TelemetryError, VmKeys};
use crate::qos::Direction;
use crate::tracefs;

/// The kernel programs, compiled by build.rs and embedded.
pub(super) static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("GOVERNOR_EBPF_OBJ"));

/// BTF-typed raw tracepoints (`tp_btf`, the hot scheduler events) and the
/// number of arguments the programs expect each to pass. The program has
/// the tracepoint's name.
const BTF_TRACEPOINTS: &[(&str, u32)] = &[("sched_switch", 4)];

/// How often each CPU charges the slice in progress (see `cpu_tick`): a
/// task that never switches is seen within 10 ms.
const CPU_TICK_HZ: u64 = 100;

/// Classic tracepoints (rare events).
const TRACEPOINTS: &[(&str, &str, &str)] =
    &[("page_fault_user", "exceptions", "page_fault_user"), ("mark_victim", "oom", "mark_victim")];

/// (global in the object, tracepoint, field)
const OFFSETS: &[(&str, &str, &str)] = &[
    ("VICTIM_PID", "oom/mark_victim", "pid"),
    ("VICTIM_COMM", "oom/mark_victim", "comm"),
    ("VICTIM_TOTAL_VM", "oom/mark_victim", "total_vm"),
    ("VICTIM_ANON_RSS", "oom/mark_victim", "anon_rss"),
];

struct Attached {
    ifindex: u32,
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
}

pub struct BpfTelemetry {
    ebpf: Ebpf,
    pub(super) pin_dir: PathBuf,
    pub(super) cgroups: PerCpuHashMap<MapData, u64, CgroupStats>,
    pub(super) net: PerCpuHashMap<MapData, u32, NetEntry>,
    oom: RingBuf<MapData>,
    qos: Array<MapData, Policer>,
    pub(super) qos_stats: PerCpuArray<MapData, QosStats>,
    pub(super) cpu_state: PerCpuArray<MapData, CpuState>,
    /// Each VM's counters, mapped (see slots.rs).
    pub(super) vm_stats: VmStats,
    pub(super) cg_slot: aya::maps::HashMap<MapData, u64, u32>,
    /// Whole-map reads of `CGROUPS` (to see how full it is).
    batch: super::batch::BatchReader,
    /// What each VM cgroup and interface counted before its VM's slot did.
    pub(super) cg_bases: Bases<u64, CgroupStats>,
    pub(super) net_bases: Bases<u32, NetStats>,
    /// Each VM's bases added up, once settled.
    pub(super) slot_bases: SlotBases,
    /// The VM slot of every cgroup counted into one (`count_cgroup_in`).
    pub(super) registered: HashMap<u64, u32>,
    interfaces: HashMap<String, Attached>,
    /// Keeps `kernel.bpf_stats_enabled` on from the first time the
    /// programs' costs are read (the kernel counts per-program run time
    /// only then; closing the fd turns it off again unless someone else
    /// holds it). Not before: with it on, every BPF program run on the host
    /// pays two clock reads (~30-60 ns per context switch here, as much as
    /// the sched_switch program itself), and only the metrics exporter
    /// reads the costs. Inner None: the kernel refused.
    stats: std::sync::OnceLock<Option<std::os::fd::OwnedFd>>,
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

    /// Load, pin and attach the scheduler and memory programs. Stale pins
    /// left by a process that died are replaced.
    pub fn load(pin_dir: &Path) -> Result<BpfTelemetry, TelemetryError> {
        tracefs::ensure_mounts()?;
        let mut offsets = Vec::new();
        for (global, event, field) in OFFSETS {
            offsets.push((*global, tracefs::field_offset(event, field)?));
        }
        let btf = crate::btf::Btf::from_sys_fs()?;
        for (tp, want) in BTF_TRACEPOINTS {
            let got = btf.raw_tracepoint_args(tp)?;
            if got != *want {
                return Err(TelemetryError::RawTracepoint { tp, got, want: *want });
            }
        }
        let run_delay =
            btf.member_offset("task_struct", "sched_info")? + btf.member_offset("sched_info", "run_delay")?;
        // Globals the sched_switch program reads task fields at (tp_btf).
        let task_fields = [
            ("TASK_RUN_DELAY", run_delay),
            ("TASK_PID", btf.member_offset("task_struct", "pid")?),
            (
                "TASK_SUM_EXEC",
                btf.member_offset("task_struct", "se")? + btf.member_offset("sched_entity", "sum_exec_runtime")?,
            ),
            (
                "TASK_PREV_SUM_EXEC",
                btf.member_offset("task_struct", "se")? + btf.member_offset("sched_entity", "prev_sum_exec_runtime")?,
            ),
            ("TASK_POLICY", btf.member_offset("task_struct", "policy")?),
            ("TASK_CGROUPS", btf.member_offset("task_struct", "cgroups")?),
            ("CSS_SET_DFL_CGRP", btf.member_offset("css_set", "dfl_cgrp")?),
            ("CGROUP_KN", btf.member_offset("cgroup", "kn")?),
            ("KERNFS_NODE_ID", btf.member_offset("kernfs_node", "id")?),
        ];
        // A governor that died left its maps (and links) pinned: adopt them,
        // so counters and limits go on. Pins of another build's shape are
        // cleared. Anything else in the directory is not ours and stays.
        let adopted = match pins::adoptable(pin_dir) {
            Ok(a) => a,
            Err(why) => {
                tracing::warn!(dir = %pin_dir.display(), "not adopting the pinned maps ({why}): starting afresh");
                pins::clear_pins(pin_dir);
                false
            }
        };
        if adopted {
            tracing::info!(dir = %pin_dir.display(), "adopting the maps a governor before left: counters and limits go on");
            pins::drop_old_programs(pin_dir);
        } else {
            pins::clear_pins(pin_dir);
        }
        fs::create_dir_all(pin_dir).map_err(|source| TelemetryError::Io {
            op: "create",
            path: pin_dir.to_path_buf(),
            source,
        })?;
        let mut loader = EbpfLoader::new();
        // VM_STATS holds a copy of each slot per CPU id.
        let cpus = super::cpu_id_end()?;
        let nr_cpus = cpus as u32;
        loader.override_global("NR_CPUS", &nr_cpus, true);
        loader.map_max_entries(maps::VM_STATS, pins::vm_stats_entries(cpus));
        for (global, off) in &task_fields {
            loader.override_global(global, off, true);
        }
        for (global, off) in &offsets {
            loader.override_global(global, off, true);
        }
        // Each map is created and pinned by name, or, when pinned already,
        // opened from its pin (adopted).
        let paths: Vec<(&str, PathBuf)> = maps::ALL.iter().map(|n| (*n, pin_dir.join(n))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        // From here on, an error drops `pins`, which removes what was
        // pinned (an adopted set too: a half-loaded governor leaves nothing).
        let pins = pins::PinGuard(Some(pin_dir.to_path_buf()));
        let mut ebpf = loader.load(OBJECT)?;

        // aya's own BTF parser: BtfTracePoint::load needs the kernel's type
        // id of `btf_trace_<tp>` (what the program is verified against).
        let kernel_btf = aya::Btf::from_sys_fs().map_err(|e| TelemetryError::Program {
            name: "sched_switch",
            source: aya::programs::ProgramError::Btf(e),
        })?;
        for (tp, _) in BTF_TRACEPOINTS {
            let p: &mut aya::programs::BtfTracePoint = program(&mut ebpf, tp)?;
            p.load(tp, &kernel_btf).map_err(|source| TelemetryError::Program { name: tp, source })?;
            let path = pin_dir.join(format!("prog_{tp}"));
            p.pin(&path).map_err(|source| TelemetryError::Pin { path, source })?;
            pins::drop_old_link(pin_dir, tp);
            let id = p.attach().map_err(|source| TelemetryError::Program { name: tp, source })?;
            let link = p.take_link(id).map_err(|source| TelemetryError::Program { name: tp, source })?;
            pin_link(aya::programs::links::FdLink::from(link), &pins::link_path(pin_dir, tp))?;
        }
        for (prog, category, event) in TRACEPOINTS {
            let p: &mut TracePoint = load_and_pin(&mut ebpf, prog, pin_dir)?;
            pins::drop_old_link(pin_dir, prog);
            let id = p.attach(category, event).map_err(|source| TelemetryError::Program { name: prog, source })?;
            let link = p.take_link(id).map_err(|source| TelemetryError::Program { name: prog, source })?;
            match aya::programs::links::FdLink::try_from(link) {
                Ok(fd) => pin_link(fd, &pins::link_path(pin_dir, prog))?,
                // A kernel without BPF links for perf events: attached for
                // this process's life only.
                Err(e) => tracing::debug!(program = prog, "not pinnable ({e}); attached while the governor runs"),
            }
        }
        // The slice flush timer, on every online CPU.
        {
            use aya::programs::perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent};
            let p: &mut aya::programs::PerfEvent = load_and_pin(&mut ebpf, "cpu_tick", pin_dir)?;
            let cpus = aya::util::online_cpus().map_err(|(what, source)| TelemetryError::Io {
                op: "list online CPUs",
                path: PathBuf::from(what),
                source,
            })?;
            for cpu in cpus {
                let what = format!("cpu_tick_{cpu}");
                pins::drop_old_link(pin_dir, &what);
                let id = p
                    .attach(
                        PerfEventConfig::Software(SoftwareEvent::CpuClock),
                        PerfEventScope::AllProcessesOneCpu { cpu },
                        SamplePolicy::Period(1_000_000_000 / CPU_TICK_HZ),
                        false,
                    )
                    .map_err(|source| TelemetryError::Program { name: "cpu_tick", source })?;
                let link = p.take_link(id).map_err(|source| TelemetryError::Program { name: "cpu_tick", source })?;
                match aya::programs::links::FdLink::try_from(link) {
                    Ok(fd) => pin_link(fd, &pins::link_path(pin_dir, &what))?,
                    Err(e) => tracing::debug!(cpu, "cpu_tick not pinnable ({e}); attached while the governor runs"),
                }
            }
        }
        // The classifiers are attached per interface (attach_interface).
        for prog in ["gov_tc_ingress", "gov_tc_egress"] {
            let _: &mut SchedClassifier = load_and_pin(&mut ebpf, prog, pin_dir)?;
        }

        let take = |ebpf: &mut Ebpf, name: &'static str| ebpf.take_map(name).ok_or(TelemetryError::Missing(name));
        let cgroups = PerCpuHashMap::try_from(take(&mut ebpf, maps::CGROUPS)?)
            .map_err(|source| TelemetryError::Map { name: maps::CGROUPS, source })?;
        let net = PerCpuHashMap::try_from(take(&mut ebpf, maps::NET)?)
            .map_err(|source| TelemetryError::Map { name: maps::NET, source })?;
        let oom = RingBuf::try_from(take(&mut ebpf, maps::OOM_EVENTS)?)
            .map_err(|source| TelemetryError::Map { name: maps::OOM_EVENTS, source })?;
        let qos = Array::try_from(take(&mut ebpf, maps::QOS)?)
            .map_err(|source| TelemetryError::Map { name: maps::QOS, source })?;
        let qos_stats = PerCpuArray::try_from(take(&mut ebpf, maps::QOS_STATS)?)
            .map_err(|source| TelemetryError::Map { name: maps::QOS_STATS, source })?;
        let cpu_state = PerCpuArray::try_from(take(&mut ebpf, maps::CPU_STATE)?)
            .map_err(|source| TelemetryError::Map { name: maps::CPU_STATE, source })?;
        let cg_slot = aya::maps::HashMap::try_from(take(&mut ebpf, maps::CG_SLOT)?)
            .map_err(|source| TelemetryError::Map { name: maps::CG_SLOT, source })?;
        let vm_stats = match take(&mut ebpf, maps::VM_STATS)? {
            aya::maps::Map::Array(data) => VmStats::map(&std::os::fd::AsFd::as_fd(data.fd()), MAX_QOS_VMS, cpus)
                .map_err(|source| TelemetryError::Io { op: "map", path: pin_dir.join(maps::VM_STATS), source })?,
            _ => return Err(TelemetryError::Missing("VM_STATS as an array")),
        };
        let batch = super::batch::BatchReader::open(pin_dir)?;
        pins.disarm();
        Ok(BpfTelemetry {
            batch,
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            cgroups,
            net,
            oom,
            qos,
            qos_stats,
            cpu_state,
            vm_stats,
            cg_slot,
            cg_bases: Bases::new(),
            net_bases: Bases::new(),
            slot_bases: SlotBases::new(),
            registered: HashMap::new(),
            interfaces: HashMap::new(),
            stats: std::sync::OnceLock::new(),
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

/// Pin a tracing program's link: it stays attached if the governor dies
/// (the kernel goes on counting); a clean stop removes the pin.
fn pin_link(link: aya::programs::links::FdLink, path: &Path) -> Result<(), TelemetryError> {
    link.pin(path).map(drop).map_err(|source| TelemetryError::Pin { path: path.to_path_buf(), source })
}

/// Program `name` of the object as its type `P` (a program missing from
/// the object, or of another type, is an error naming it).
pub(super) fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, TelemetryError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(TelemetryError::Missing(name))?
        .try_into()
        .map_err(|source| TelemetryError::Program { name, source })
}

/// Load program `name` of the object into the kernel and pin it as
/// `prog_<name>` (so `bpftool prog show pinned` finds it).
fn load_and_pin<'a, P>(ebpf: &'a mut Ebpf, name: &'static str, pin_dir: &Path) -> Result<&'a mut P, TelemetryError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    P: ProgramLoad,
{
    let p: &mut P = program(ebpf, name)?;
    p.load_program().map_err(|source| TelemetryError::Program { name, source })?;
    let path = pin_dir.join(format!("prog_{name}"));
    p.pin_program(&path).map_err(|source| TelemetryError::Pin { path, source })?;
    Ok(p)
}

/// The load/pin calls aya's program types each have (not a trait there).
trait ProgramLoad {
    fn load_program(&mut self) -> Result<(), aya::programs::ProgramError>;
    fn pin_program(&mut self, path: &Path) -> Result<(), aya::pin::PinError>;
}

macro_rules! program_load {
    ($($t:ty),*) => {$(
        impl ProgramLoad for $t {
            fn load_program(&mut self) -> Result<(), aya::programs::ProgramError> {
                self.load()
            }
            fn pin_program(&mut self, path: &Path) -> Result<(), aya::pin::PinError> {
                self.pin(path)
            }
        }
    )*};
}
program_load!(aya::programs::RawTracePoint, TracePoint, SchedClassifier, aya::programs::PerfEvent);
