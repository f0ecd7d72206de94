//! The governor proper: the VMs it watches, one sampling step, and their
//! QoS limits.
//!
//! Synchronous and free of tokio, so tests drive it tick by tick; the daemon
//! (daemon.rs) calls `tick` on a timer and serves what it returns. The
//! kernel side ([`Telemetry`]) and shaping ([`Shaper`]) are traits: the
//! daemon uses the real ones, the unit tests (`tests.rs`) in-memory fakes.
//!
//! - `vm`: one watched VM (cgroup, interfaces, QoS slot, limits)
//! - `limits`: setting, changing and clearing limits at run time
//! - `shaping`: the HTB classes and IFB device behind `shape` limits

use std::collections::{HashSet, VecDeque};
use std::time::Instant;

use cgroupfs::{CgroupError, Layout};
use governor_common::{CgroupStats, NetStats, Policer};
use serde::Serialize;
use thiserror::Error;

use crate::config::{Config, VmConfig};
use crate::qos::{Direction, Mode};
use crate::sampler::{rates, Sample, VmStatus};
use crate::shape::{LazyShaper, NetlinkShaper, ShapeError, Shaper};
use crate::telemetry::{BpfTelemetry, Telemetry, TelemetryError, VmKeys};

mod limits;
mod shaping;
#[cfg(test)]
mod tests;
mod vm;

pub use shaping::HTB_MAJOR;
pub use vm::{Interface, PerDirection, WatchedVm};

#[derive(Debug, Error)]
pub enum GovernorError {
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    #[error("vm {vm}: {source}")]
    Cgroup {
        vm: String,
        #[source]
        source: CgroupError,
    },
    #[error("no vm named {0:?}")]
    UnknownVm(String),
    #[error("vm {vm} {direction}: {reason}")]
    Qos { vm: String, direction: &'static str, reason: String },
    #[error("vm {vm} {direction}: shaping: {source}")]
    Shape {
        vm: String,
        direction: &'static str,
        #[source]
        source: ShapeError,
    },
}

/// One VM direction's limit and what it did, as `governor limit show` and
/// the exporter show it.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct LimitStatus {
    pub vm: String,
    pub direction: Direction,
    pub mode: Mode,
    pub rate_bps: u64,
    pub burst_bytes: u64,
    pub packet_rate: Option<u64>,
    /// police: bytes left in the bucket.
    pub tokens_bytes: Option<u64>,
    pub passed_bytes: u64,
    pub passed_packets: u64,
    pub dropped_bytes: u64,
    pub dropped_packets: u64,
}

/// An OOM kill as the status shows it.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct OomRecord {
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    /// The VM whose cgroup subtree holds `cgroup_id`, if any.
    pub vm: Option<String>,
    pub anon_rss_kb: u64,
}

pub struct Governor<T: Telemetry = BpfTelemetry, S: Shaper = NetlinkShaper> {
    telemetry: T,
    shaper: LazyShaper<S>,
    layout: Layout,
    vms: Vec<WatchedVm>,
    status: Vec<VmStatus>,
    ooms: VecDeque<OomRecord>,
    ifb_name: String,
    /// The IFB device traffic from shaped VMs is redirected to, once made.
    ifb: Option<u32>,
    /// Each VM's counters of the last reading (kept: reused every tick).
    readings: Vec<(CgroupStats, NetStats)>,
    /// gso_max_size of each interface before shaping capped it.
    gso_before: std::collections::HashMap<u32, u32>,
    /// Link notifications: which interfaces to look up again each tick
    /// (None: all of them, as with the in-memory fakes).
    links: Option<crate::netdev::LinkWatch>,
    /// inotify on each VM's cgroup directories: which VMs to look at for
    /// new child cgroups (None: every VM every SUBTREE_EVERY ticks).
    children: Option<cgroupfs::ChildWatch>,
    ticks: u64,
}

const OOM_LOG: usize = 64;
/// Ticks between reads of a VM's memory files (see `WatchedVm::memory`).
pub const MEM_STAT_EVERY: u64 = 5;
/// At most this many VMs' memory files are read per tick (~20 us each on
/// a cgroup v1 memory controller, which formats every counter of
/// memory.stat per read, hierarchical totals included): with more than
/// `5 x` this many VMs, each VM's memory is read less often (every 50
/// ticks at 1,000 VMs: 50 s at the default tick, as cAdvisor stretches
/// its own housekeeping up to 60 s by default). 32 a tick was ~0.7 ms of
/// a 2 ms tick budget at 1,000 VMs.
pub const MEM_READS_PER_TICK: u64 = 20;
/// Ticks between walks of each VM's cgroup subtree without inotify, and
/// with it (a child made in a child before its own watch was in place).
const SUBTREE_EVERY: u64 = 10;
const SUBTREE_SAFETY_EVERY: u64 = 60;
/// Ticks between looks at how full the kernel's cgroup map is.
const PRUNE_EVERY: u64 = 60;

impl Governor {
    /// Load the programs and register every VM of the config. Either all of
    /// it is in place or, on error, nothing stays attached or pinned.
    pub fn new(cfg: &Config) -> Result<Governor, GovernorError> {
        let layout = Layout::detect().map_err(|source| GovernorError::Cgroup { vm: "*".into(), source })?;
        Governor::new_on(cfg, layout)
    }

    /// [`Governor::new`] on a cgroup layout detected by the caller. Shaping
    /// (rtnetlink) is opened at the first `shape` limit, not before.
    pub fn new_on(cfg: &Config, layout: Layout) -> Result<Governor, GovernorError> {
        let telemetry = BpfTelemetry::load(&cfg.pin_dir)?;
        let mut g = Governor::build(cfg, telemetry, LazyShaper::opening(NetlinkShaper::new), layout)?;
        g.links = crate::netdev::LinkWatch::open()
            .inspect_err(|e| tracing::warn!("no link notifications ({e}): every interface is looked up each tick"))
            .ok();
        Ok(g)
    }
}

impl<T: Telemetry, S: Shaper> Governor<T, S> {
    /// A governor over the given kernel side, shaper and cgroup layout.
    pub fn with(cfg: &Config, telemetry: T, shaper: S, layout: Layout) -> Result<Governor<T, S>, GovernorError> {
        Governor::build(cfg, telemetry, LazyShaper::ready(shaper), layout)
    }

    fn build(
        cfg: &Config,
        telemetry: T,
        shaper: LazyShaper<S>,
        layout: Layout,
    ) -> Result<Governor<T, S>, GovernorError> {
        let mut g = Governor {
            telemetry,
            shaper,
            layout,
            vms: Vec::new(),
            status: Vec::new(),
            ooms: VecDeque::new(),
            ifb_name: cfg.qos_ifb.clone(),
            ifb: None,
            gso_before: Default::default(),
            readings: Vec::new(),
            links: None,
            children: cgroupfs::ChildWatch::new()
                .inspect_err(|e| {
                    tracing::warn!("no inotify ({e}): each VM's cgroup is checked for children every few ticks")
                })
                .ok(),
            ticks: 0,
        };
        // On error `g` is dropped, which removes any shaping set up so far
        // (and the real telemetry detaches and unpins).
        // Slots of VMs that a governor before watched and this one does
        // not are freed first (a cgroup that cannot be opened fails below).
        let ids: Vec<u64> = cfg.vms.iter().filter_map(|v| g.layout.open(&v.cgroup).ok()?.id().ok()).collect();
        g.telemetry.release_slots(&ids);
        for vm in &cfg.vms {
            g.add_vm(vm)?;
        }
        for vm in &cfg.vms {
            for (dir, spec) in vm.qos_specs() {
                let limit = spec.check("").map_err(|e| GovernorError::Qos {
                    vm: vm.name.clone(),
                    direction: dir.as_str(),
                    reason: e.to_string(),
                })?;
                g.set_limit(&vm.name, dir, limit)?;
            }
        }
        Ok(g)
    }

    /// Attach the tc programs to one of a VM's interfaces with its QoS slot
    /// already given, so the first packet they see is the VM's (the slot
    /// lives in the interface's counter entry, which the programs only
    /// count into once attached).
    fn attach_for_vm(&mut self, name: &str, slot: u32) -> Result<u32, TelemetryError> {
        let ifindex = self.telemetry.ifindex(name)?;
        self.telemetry.set_vm_of_interface(ifindex, slot)?;
        let attached = match self.telemetry.attach_interface(name) {
            Ok(i) => i,
            Err(e) => {
                self.telemetry.clear_vm_of_interface(ifindex);
                return Err(e);
            }
        };
        if attached != ifindex {
            // Re-created between the two looks: the slot goes with the new
            // index (its first packets, before this, are counted only). An
            // interface whose slot cannot be given is not left attached.
            self.telemetry.clear_vm_of_interface(ifindex);
            if let Err(e) = self.telemetry.set_vm_of_interface(attached, slot) {
                self.telemetry.detach_interface(name);
                return Err(e);
            }
        }
        Ok(attached)
    }

    fn add_vm(&mut self, cfg: &VmConfig) -> Result<(), GovernorError> {
        let cg_err = |source| GovernorError::Cgroup { vm: cfg.name.clone(), source };
        let cgroup = self.layout.open(&cfg.cgroup).map_err(cg_err)?;
        let id = cgroup.id().map_err(cg_err)?;
        let in_use: Vec<u32> = self.vms.iter().map(|v| v.slot).collect();
        let slot = self.telemetry.claim_slot(id, &in_use)?;
        self.telemetry.count_cgroup_in(id, slot)?;
        if let Some(w) = &mut self.children {
            if let Err(e) = w.watch(&cgroup.dir(), self.vms.len()) {
                tracing::warn!(vm = %cfg.name, "watching its cgroup for children: {e}; looked at every {SUBTREE_SAFETY_EVERY} ticks");
            }
        }
        let mut interfaces = Vec::new();
        for name in &cfg.interfaces {
            let ifindex = self.attach_for_vm(name, slot)?;
            interfaces.push(Interface { name: name.clone(), ifindex });
        }
        self.vms.push(WatchedVm {
            cfg: cfg.clone(),
            cgroup,
            id,
            subtree: vec![id],
            live: vec![id],
            interfaces,
            slot,
            limits: PerDirection::default(),
            prev: None,
            net_retired: NetStats::default(),
            mem_files: None,
            mem_full: None,
            mem_limit: None,
            dir: None,
        });
        Ok(())
    }

    /// Read every counter once and return the per-VM rates since the last
    /// tick (the first tick has no rates yet, only totals).
    pub fn tick(&mut self) -> Result<&[VmStatus], GovernorError> {
        self.refresh_interfaces();
        // The subtree can change (a VMM moving vCPU threads into child
        // cgroups). Ids are only ever added: a child cgroup that is gone
        // keeps what it counted in the VM's total, which must never go
        // back. Walking the subtree is a readdir and a stat per cgroup,
        // and even the fstat that says a VM has no children costs ~2 us:
        // at 1,000 VMs a large cost. So a VM is looked at when inotify
        // says a directory was made in one of its cgroups, and every
        // SUBTREE_SAFETY_EVERY ticks (without inotify, SUBTREE_EVERY),
        // staggered by slot so no later tick walks them all (the first
        // does, so the first totals hold the children already there). A
        // child's events until it is seen are in its own entry of the
        // per-cgroup map, counted as its VM's once seen.
        let changed = match self.children.as_mut().map(cgroupfs::ChildWatch::changed) {
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => {
                tracing::warn!("reading inotify events: {e}; looking at every VM");
                Some(cgroupfs::Changed::All)
            }
            None => None,
        };
        let every = if changed.is_some() { SUBTREE_SAFETY_EVERY } else { SUBTREE_EVERY };
        for (i, vm) in self.vms.iter_mut().enumerate() {
            let told = match &changed {
                Some(cgroupfs::Changed::All) => true,
                Some(cgroupfs::Changed::Under(vms)) => vms.contains(&i),
                None => false,
            };
            if self.ticks == 0 || told || (self.ticks + u64::from(vm.slot)).is_multiple_of(every) {
                let (new, gone) = vm.look_at_subtree();
                // A child that is gone: what it counted stays in the slot
                // (and its id in `subtree`, for its base); its CG_SLOT
                // entry goes, so VMMs re-creating children do not fill it.
                for id in gone {
                    self.telemetry.uncount_cgroup(id);
                    vm.live.retain(|l| *l != id);
                }
                for (id, dir) in new {
                    // One the kernel side refuses is tried again next look.
                    if let Err(e) = self.telemetry.count_cgroup_in(id, vm.slot) {
                        tracing::warn!(vm = %vm.cfg.name, cgroup = id, "counting a child cgroup: {e}");
                        continue;
                    }
                    vm.live.push(id);
                    if !vm.subtree.contains(&id) {
                        vm.subtree.push(id);
                    }
                    if let Some(w) = &mut self.children {
                        if let Err(e) = w.watch(&dir, i) {
                            tracing::debug!(vm = %vm.cfg.name, dir = %dir.display(), "watching a child cgroup: {e}");
                        }
                    }
                }
            }
        }
        if self.ticks == 0 {
            // Every VM's cgroups and interfaces are known now: what a
            // governor before left pointing at their slots (a child since
            // removed, an interface no longer in the config) is forgotten.
            let cgroups: HashSet<u64> = self.vms.iter().flat_map(|v| v.live.iter().copied()).collect();
            let interfaces: HashSet<u32> =
                self.vms.iter().flat_map(|v| v.interfaces.iter().map(|i| i.ifindex)).collect();
            self.telemetry.forget_stale(&cgroups, &interfaces);
        }
        // Every VM's CPU, run-queue and network counters in one reading.
        let ifindexes: Vec<u32> = self.vms.iter().flat_map(|v| v.interfaces.iter().map(|i| i.ifindex)).collect();
        let mut keys = Vec::with_capacity(self.vms.len());
        let mut at = 0;
        for vm in &self.vms {
            let n = vm.interfaces.len();
            keys.push(VmKeys { slot: vm.slot, cgroups: &vm.subtree, ifindexes: &ifindexes[at..at + n] });
            at += n;
        }
        self.telemetry.read_vms(&keys, &mut self.readings)?;
        drop(keys);
        let mut out = Vec::with_capacity(self.vms.len());
        let mem_every = MEM_STAT_EVERY.max((self.vms.len() as u64).div_ceil(MEM_READS_PER_TICK));
        // One time for the whole reading: the counters were read at once.
        let now = Instant::now();
        for (vm, (cpu, net)) in self.vms.iter_mut().zip(&self.readings) {
            let mut net = *net;
            net.add(&vm.net_retired);
            // memory.stat is the costliest file the kernel formats: each VM
            // reads it every `mem_every` ticks, staggered by slot.
            let full = (self.ticks + u64::from(vm.slot)).is_multiple_of(mem_every);
            let memory = vm.memory(full).map_err(|source| GovernorError::Cgroup { vm: vm.cfg.name.clone(), source })?;
            let cur = Sample { at: now, cpu: *cpu, net, memory };
            let prev = vm.prev.as_ref().unwrap_or(&cur);
            out.push(rates(&vm.cfg.name, vm.cfg.role.as_str(), vm.id, prev, &cur));
            vm.prev = Some(cur);
        }
        self.ticks += 1;
        // Cgroups outside every VM (host processes, sessions) fill the
        // kernel's per-cgroup map over time: it is pruned when over half
        // full (the kernel side looks; VMs' cgroups are kept).
        if self.ticks.is_multiple_of(PRUNE_EVERY) {
            let keep: HashSet<u64> = self.vms.iter().flat_map(|v| v.subtree.iter().copied()).collect();
            let n = self.telemetry.prune_cgroups(&keep);
            if n > 0 {
                tracing::info!(removed = n, "pruned cgroups outside every VM from the kernel map");
            }
        }
        self.take_ooms();
        self.status = out;
        Ok(&self.status)
    }

    fn take_ooms(&mut self) {
        for ev in self.telemetry.drain_oom() {
            let end = ev.comm.iter().position(|&b| b == 0).unwrap_or(ev.comm.len());
            let vm = self.vms.iter().find(|v| v.subtree.contains(&ev.cgroup_id)).map(|v| v.cfg.name.clone());
            tracing::warn!(pid = ev.pid, vm = ?vm, "OOM kill");
            if self.ooms.len() == OOM_LOG {
                self.ooms.pop_front();
            }
            self.ooms.push_back(OomRecord {
                pid: ev.pid,
                comm: String::from_utf8_lossy(&ev.comm[..end]).into_owned(),
                cgroup_id: ev.cgroup_id,
                vm,
                anon_rss_kb: ev.anon_rss_kb,
            });
        }
    }

    pub fn status(&self) -> &[VmStatus] {
        &self.status
    }

    /// Each watched VM's memory limit, where it has one (the monitor
    /// compares the working set with it), as read with its memory (see
    /// `WatchedVm::memory`): no file read here.
    pub fn memory_limits(&self) -> std::collections::HashMap<String, u64> {
        self.vms.iter().filter_map(|v| Some((v.cfg.name.clone(), v.mem_limit?))).collect()
    }

    /// The scheduler program's fallbacks so far (Prometheus).
    pub fn sched_fallbacks(&self) -> crate::telemetry::SchedFallbacks {
        self.telemetry.sched_fallbacks()
    }

    /// The kernel programs' own cost (Prometheus).
    pub fn program_stats(&self) -> Vec<crate::telemetry::ProgramStat> {
        self.telemetry.program_stats()
    }

    /// The most recent OOM kills, oldest first.
    pub fn ooms(&self) -> Vec<OomRecord> {
        self.ooms.iter().cloned().collect()
    }

    /// A VMM may delete and re-create a VM's tap: the name comes back with a
    /// new ifindex and without our filters and qdiscs. Re-attach the
    /// counters, the VM's QoS slot and its limits (the old one's counters go
    /// to the VM's retired total). Only the interfaces the kernel said
    /// changed are looked up (see `LinkWatch`): one missing now is looked
    /// at again when it comes back.
    fn refresh_interfaces(&mut self) {
        let changes = self.links.as_mut().map_or(crate::netdev::LinkChanges::All, |w| w.changes());
        if changes.is_empty() {
            return;
        }
        for i in 0..self.vms.len() {
            for k in 0..self.vms[i].interfaces.len() {
                if !changes.touches(&self.vms[i].interfaces[k].name) {
                    continue;
                }
                let Interface { name, ifindex: old } = self.vms[i].interfaces[k].clone();
                let Ok(now) = self.telemetry.ifindex(&name) else { continue };
                if now == old {
                    continue;
                }
                match self.telemetry.net(old) {
                    Ok(n) => self.vms[i].net_retired.add(&n),
                    Err(e) => {
                        tracing::warn!(vm = %self.vms[i].name(), interface = %name, "counters of the old interface lost: {e}")
                    }
                }
                self.telemetry.detach_interface(&name);
                self.telemetry.clear_vm_of_interface(old);
                let slot = self.vms[i].slot;
                let attached = self.attach_for_vm(&name, slot);
                match attached {
                    Ok(idx) => {
                        self.vms[i].interfaces[k].ifindex = idx;
                        tracing::warn!(vm = %self.vms[i].name(), interface = %name, "interface re-created: re-attached");
                        if let Some(l) = self.vms[i].limits.ingress.filter(|l| l.mode == Mode::Shape) {
                            self.shape_interface(i, idx, &l);
                        }
                    }
                    Err(e) => tracing::warn!(vm = %self.vms[i].name(), interface = %name, "re-attach: {e}"),
                }
            }
        }
    }

    fn vm_index(&self, name: &str) -> Result<usize, GovernorError> {
        self.vms.iter().position(|v| v.cfg.name == name).ok_or_else(|| GovernorError::UnknownVm(name.into()))
    }
}

impl<T: Telemetry, S: Shaper> Drop for Governor<T, S> {
    /// Remove every qdisc, class and IFB device the governor created; the
    /// programs are detached and unpinned when `telemetry` drops after this.
    fn drop(&mut self) {
        // Stop classifying and redirecting first, so no packet is sent to an
        // IFB device that is about to go.
        for vm in &self.vms {
            for dir in [Direction::Egress, Direction::Ingress] {
                if vm.limits.get(dir).is_some() {
                    if let Err(e) = self.telemetry.set_policer(vm.slot, dir, Policer::default()) {
                        tracing::warn!(vm = %vm.name(), direction = dir.as_str(), "clearing the limit: {e}");
                    }
                }
            }
        }
        for i in 0..self.vms.len() {
            for dir in [Direction::Egress, Direction::Ingress] {
                if self.vms[i].shaped(dir) {
                    self.shape_teardown(i, dir);
                }
            }
        }
        self.remove_ifb();
    }
}
