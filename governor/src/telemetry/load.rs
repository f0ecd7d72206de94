//! Loading the kernel programs: field offsets from the kernel's BTF and
//! tracefs patched in as read-only globals, maps created or adopted from
//! their pins, programs loaded, pinned and attached (tracing programs
//! through pinned links, so the kernel goes on counting if the governor
//! dies). The classifiers are attached per interface (bpf.rs).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use aya::maps::{Array, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::programs::{SchedClassifier, TracePoint};
use aya::{Ebpf, EbpfLoader};
use governor_common::{maps, MAX_QOS_VMS};

use super::bpf::BpfTelemetry;
use super::vmstats::{Bases, SlotBases, VmStats};
use super::{pins, TelemetryError};
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

impl BpfTelemetry {
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
