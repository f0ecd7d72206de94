//! The governor proper: the VMs it watches, and one sampling step.
//!
//! Synchronous and free of tokio, so tests drive it tick by tick; the daemon
//! (daemon.rs) calls `tick` on a timer and serves what it returns.

use std::collections::VecDeque;
use std::time::Instant;

use governor_common::{NetStats, Policer, QOS_SHAPE};
use serde::Serialize;
use thiserror::Error;

use crate::config::{Config, VmConfig};
use crate::qos::{tokens_bytes, Direction, Limit, Mode};
use crate::sampler::{rates, Sample, VmStatus};
use crate::shape::{ShapeError, Shaper};
use crate::telemetry::{Telemetry, TelemetryError};
use cgroupfs::{Cgroup, CgroupError, Layout};

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

/// HTB handle major of the qdiscs the governor creates (`7a:`), so they are
/// recognisable in `tc qdisc show`.
pub const HTB_MAJOR: u16 = 0x7a;

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

struct Vm {
    cfg: VmConfig,
    cgroup: Cgroup,
    id: u64,
    ifindexes: Vec<u32>,
    subtree: Vec<u64>,
    prev: Option<Sample>,
    /// QoS slot in the kernel maps (the VM's index).
    slot: u32,
    /// Limits by direction index (DIR_FROM_VM, DIR_TO_VM).
    limits: [Option<Limit>; 2],
    /// Traffic of interfaces the VM had before they were re-created (a new
    /// ifindex starts counting from zero; the VM's totals must not).
    net_retired: NetStats,
}

fn add_net(a: &mut NetStats, n: &NetStats) {
    a.rx_bytes += n.rx_bytes;
    a.rx_packets += n.rx_packets;
    a.tx_bytes += n.tx_bytes;
    a.tx_packets += n.tx_packets;
}

pub struct Governor {
    telemetry: Telemetry,
    vms: Vec<Vm>,
    status: Vec<VmStatus>,
    ooms: VecDeque<OomRecord>,
    /// Created on first use of `shape`.
    shaper: Option<Shaper>,
    ifb_name: String,
    /// The IFB device traffic from shaped VMs is redirected to.
    ifb: Option<u32>,
    ticks: u64,
}

/// Queue of a shaped VM's class: 10 ms at the rate, but room for two
/// 64 KiB GSO packets.
fn leaf_limit(limit: &Limit) -> u32 {
    let ten_ms = limit.rate_bps / 8 / 100;
    u32::try_from(ten_ms.max(128 * 1024)).unwrap_or(u32::MAX)
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer; CLOCK_MONOTONIC is what bpf_ktime_get_ns reads.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

const OOM_LOG: usize = 64;
/// Ticks between looks at how full the kernel's cgroup map is.
const PRUNE_EVERY: u64 = 60;

impl Governor {
    /// Load the programs and register every VM of the config. Either all of
    /// it is in place or, on error, nothing stays attached or pinned.
    pub fn new(cfg: &Config) -> Result<Governor, GovernorError> {
        let layout = Layout::detect().map_err(|source| GovernorError::Cgroup { vm: "*".into(), source })?;
        let telemetry = Telemetry::load(&cfg.pin_dir)?;
        let mut g = Governor {
            telemetry,
            vms: Vec::new(),
            status: Vec::new(),
            ooms: VecDeque::new(),
            shaper: None,
            ifb_name: cfg.qos_ifb.clone(),
            ifb: None,
            ticks: 0,
        };
        for vm in &cfg.vms {
            // On error `g` is dropped, which detaches, unpins and removes
            // any shaping set up so far.
            g.add_vm(&layout, vm)?;
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

    fn add_vm(&mut self, layout: &Layout, cfg: &VmConfig) -> Result<(), GovernorError> {
        let cg_err = |source| GovernorError::Cgroup { vm: cfg.name.clone(), source };
        let cgroup = layout.open(&cfg.cgroup).map_err(cg_err)?;
        let id = cgroup.id().map_err(cg_err)?;
        let slot = self.vms.len() as u32;
        let mut ifindexes = Vec::new();
        for ifname in &cfg.interfaces {
            let ifindex = self.telemetry.attach_interface(ifname)?;
            self.telemetry.set_vm_of_interface(ifindex, slot)?;
            ifindexes.push(ifindex);
        }
        self.vms.push(Vm {
            cfg: cfg.clone(),
            cgroup,
            id,
            ifindexes,
            subtree: vec![id],
            prev: None,
            slot,
            limits: [None, None],
            net_retired: NetStats::default(),
        });
        Ok(())
    }

    /// Read every counter once and return the per-VM rates since the last
    /// tick (the first tick has no rates yet, only totals).
    pub fn tick(&mut self) -> Result<&[VmStatus], GovernorError> {
        self.refresh_interfaces();
        let mut out = Vec::with_capacity(self.vms.len());
        for vm in &mut self.vms {
            let cg_err = |source| GovernorError::Cgroup { vm: vm.cfg.name.clone(), source };
            // The subtree can change (a VMM moving vCPU threads into child
            // cgroups). Ids are only ever added: a child cgroup that is gone
            // keeps its entry in the kernel map, so its CPU time stays in the
            // VM's total, which must never go back.
            if let Ok(ids) = vm.cgroup.subtree_ids() {
                for id in ids {
                    if !vm.subtree.contains(&id) {
                        vm.subtree.push(id);
                    }
                }
            }
            let cpu = self.telemetry.cgroups(&vm.subtree)?;
            let mut net = vm.net_retired;
            for ifindex in &vm.ifindexes {
                add_net(&mut net, &self.telemetry.net(*ifindex)?);
            }
            let memory = vm.cgroup.memory().map_err(cg_err)?;
            let cur = Sample { at: Instant::now(), cpu, net, memory };
            let prev = vm.prev.as_ref().unwrap_or(&cur);
            out.push(rates(&vm.cfg.name, vm.cfg.role.as_str(), vm.id, prev, &cur));
            vm.prev = Some(cur);
        }
        self.ticks += 1;
        if self.ticks.is_multiple_of(PRUNE_EVERY) {
            let keep: std::collections::HashSet<u64> =
                self.vms.iter().flat_map(|v| v.subtree.iter().copied()).collect();
            let n = self.telemetry.prune_cgroups(&keep);
            if n > 0 {
                tracing::info!(removed = n, "pruned cgroups outside every VM from the kernel map");
            }
        }
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
        self.status = out;
        Ok(&self.status)
    }

    pub fn status(&self) -> &[VmStatus] {
        &self.status
    }

    /// A VMM may delete and re-create a VM's tap: the name comes back with a
    /// new ifindex and without our filters and qdiscs. Re-attach the
    /// counters, the VM's QoS slot and its limits; an interface that is
    /// missing right now is looked at again next tick.
    fn refresh_interfaces(&mut self) {
        for i in 0..self.vms.len() {
            for k in 0..self.vms[i].ifindexes.len() {
                let name = self.vms[i].cfg.interfaces[k].clone();
                let old = self.vms[i].ifindexes[k];
                let Ok(now) = crate::netdev::ifindex(&name) else { continue };
                if now == old {
                    continue;
                }
                if let Ok(n) = self.telemetry.net(old) {
                    add_net(&mut self.vms[i].net_retired, &n);
                }
                self.telemetry.detach_interface(&name);
                self.telemetry.clear_vm_of_interface(old);
                let slot = self.vms[i].slot;
                let attached = self
                    .telemetry
                    .attach_interface(&name)
                    .and_then(|idx| self.telemetry.set_vm_of_interface(idx, slot).map(|_| idx));
                match attached {
                    Ok(idx) => {
                        self.vms[i].ifindexes[k] = idx;
                        tracing::warn!(vm = %self.vms[i].cfg.name, interface = %name, "interface re-created: re-attached");
                        if let Some(l) = self.vms[i].limits[Direction::Ingress.index() as usize] {
                            if l.mode == Mode::Shape {
                                self.shape_interface(i, idx, &l);
                            }
                        }
                    }
                    Err(e) => tracing::warn!(vm = %self.vms[i].cfg.name, interface = %name, "re-attach: {e}"),
                }
            }
        }
    }

    /// Shape traffic to the VM on one (re-created) interface.
    fn shape_interface(&mut self, i: usize, ifindex: u32, l: &Limit) {
        let minor = (self.vms[i].slot + 1) as u16;
        let burst = u32::try_from(l.burst_bytes).unwrap_or(u32::MAX);
        let Some(shaper) = self.shaper.as_mut() else { return };
        let r = shaper
            .add_htb(ifindex, HTB_MAJOR)
            .and_then(|_| shaper.set_class(ifindex, HTB_MAJOR, minor, l.rate_bps, burst))
            .and_then(|_| shaper.set_leaf_fifo(ifindex, HTB_MAJOR, minor, leaf_limit(l)));
        if let Err(e) = r {
            tracing::warn!(vm = %self.vms[i].cfg.name, "re-applying shaping: {e}");
        }
    }

    fn vm_index(&self, name: &str) -> Result<usize, GovernorError> {
        self.vms.iter().position(|v| v.cfg.name == name).ok_or_else(|| GovernorError::UnknownVm(name.into()))
    }

    /// Set or change the limit of one direction of a VM, at run time,
    /// without reattaching programs or touching other VMs. On error nothing
    /// of this call stays applied and the previous limit stays in force.
    pub fn set_limit(&mut self, vm: &str, dir: Direction, limit: Limit) -> Result<(), GovernorError> {
        let i = self.vm_index(vm)?;
        let qos_err = |reason: String| GovernorError::Qos { vm: vm.into(), direction: dir.as_str(), reason };
        if self.vms[i].ifindexes.is_empty() {
            return Err(qos_err("the vm has no interfaces to limit".into()));
        }
        // The interfaces must still be the ones we attached to.
        for (name, idx) in self.vms[i].cfg.interfaces.iter().zip(&self.vms[i].ifindexes) {
            match crate::netdev::ifindex(name) {
                Ok(now) if now == *idx => {}
                _ => return Err(qos_err(format!("interface {name} is gone"))),
            }
        }
        let d = dir.index() as usize;
        let slot = self.vms[i].slot;
        let old = self.vms[i].limits[d];
        match limit.mode {
            Mode::Police => {
                let prev = self.telemetry.policer(slot, dir.index()).ok();
                let p = limit.policer(prev.as_ref(), monotonic_ns());
                self.telemetry.set_policer(slot, dir.index(), p)?;
            }
            Mode::Shape => {
                let redirect = self.shape_setup(i, dir, &limit)?;
                let p = Policer {
                    mode: QOS_SHAPE,
                    classid: ((HTB_MAJOR as u32) << 16) | (slot + 1),
                    redirect_ifindex: redirect,
                    ..Policer::default()
                };
                if let Err(e) = self.telemetry.set_policer(slot, dir.index(), p) {
                    if old.map(|o| o.mode) != Some(Mode::Shape) {
                        self.shape_teardown(i, dir);
                    }
                    return Err(e.into());
                }
            }
        }
        if old.map(|o| o.mode) == Some(Mode::Shape) && limit.mode == Mode::Police {
            self.shape_teardown(i, dir);
        }
        self.vms[i].limits[d] = Some(limit);
        tracing::info!(vm, direction = dir.as_str(), ?limit, "limit set");
        Ok(())
    }

    /// Remove a limit: line rate again. Removing no limit is not an error.
    pub fn clear_limit(&mut self, vm: &str, dir: Direction) -> Result<(), GovernorError> {
        let i = self.vm_index(vm)?;
        let d = dir.index() as usize;
        let Some(old) = self.vms[i].limits[d] else { return Ok(()) };
        // Stop policing/classifying first, then remove the classes.
        self.telemetry.set_policer(self.vms[i].slot, dir.index(), Policer::default())?;
        if old.mode == Mode::Shape {
            self.shape_teardown(i, dir);
        }
        self.vms[i].limits[d] = None;
        tracing::info!(vm, direction = dir.as_str(), "limit removed");
        Ok(())
    }

    /// Every limit in force with its counters.
    pub fn limits(&self) -> Result<Vec<LimitStatus>, GovernorError> {
        let mut out = Vec::new();
        for vm in &self.vms {
            for dir in [Direction::Egress, Direction::Ingress] {
                let Some(l) = vm.limits[dir.index() as usize] else { continue };
                let st = self.telemetry.qos_stats(vm.slot, dir.index())?;
                let tokens = match l.mode {
                    Mode::Police => Some(tokens_bytes(&self.telemetry.policer(vm.slot, dir.index())?, monotonic_ns())),
                    Mode::Shape => None,
                };
                out.push(LimitStatus {
                    vm: vm.cfg.name.clone(),
                    direction: dir,
                    mode: l.mode,
                    rate_bps: l.rate_bps,
                    burst_bytes: l.burst_bytes,
                    packet_rate: l.packet_rate,
                    tokens_bytes: tokens,
                    passed_bytes: st.passed_bytes,
                    passed_packets: st.passed_packets,
                    dropped_bytes: st.dropped_bytes,
                    dropped_packets: st.dropped_packets,
                });
            }
        }
        Ok(out)
    }

    /// Create or change the VM's HTB class for this direction: on the IFB
    /// for traffic from the VM, on each of its interfaces for traffic to
    /// it. Returns the ifindex to redirect to (0 for none). What this call
    /// created is removed again if a later step fails.
    fn shape_setup(&mut self, i: usize, dir: Direction, limit: &Limit) -> Result<u32, GovernorError> {
        let vm = self.vms[i].cfg.name.clone();
        let minor = (self.vms[i].slot + 1) as u16;
        let burst = u32::try_from(limit.burst_bytes).unwrap_or(u32::MAX);
        let shape_err = |source: ShapeError| GovernorError::Shape { vm: vm.clone(), direction: dir.as_str(), source };
        if self.shaper.is_none() {
            self.shaper = Some(Shaper::new().map_err(&shape_err)?);
        }
        let Some(shaper) = self.shaper.as_mut() else { return Ok(0) };
        match dir {
            Direction::Egress => {
                let (ifb, created) = match self.ifb {
                    Some(ifb) => (ifb, false),
                    None => {
                        let ifb = match shaper.add_ifb(&self.ifb_name) {
                            // Left by a governor that died: the name is ours
                            // (the daemon holds a lock on it), start afresh.
                            Err(ShapeError::Exists { .. }) => {
                                let stale = shaper.link_index(&self.ifb_name).map_err(&shape_err)?;
                                shaper.delete_link(stale).map_err(&shape_err)?;
                                tracing::warn!(ifb = %self.ifb_name, "replaced a stale IFB device");
                                shaper.add_ifb(&self.ifb_name).map_err(&shape_err)?
                            }
                            r => r.map_err(&shape_err)?,
                        };
                        if let Err(e) = shaper.add_htb(ifb, HTB_MAJOR) {
                            let _ = shaper.delete_link(ifb);
                            return Err(shape_err(e));
                        }
                        (ifb, true)
                    }
                };
                if let Err(e) = shaper
                    .set_class(ifb, HTB_MAJOR, minor, limit.rate_bps, burst)
                    .and_then(|_| shaper.set_leaf_fifo(ifb, HTB_MAJOR, minor, leaf_limit(limit)))
                {
                    if created {
                        let _ = shaper.delete_link(ifb);
                    }
                    return Err(shape_err(e));
                }
                self.ifb = Some(ifb);
                Ok(ifb)
            }
            Direction::Ingress => {
                let had_class = self.vms[i].limits[dir.index() as usize].map(|l| l.mode) == Some(Mode::Shape);
                let mut done = Vec::new();
                for &ifindex in &self.vms[i].ifindexes {
                    let r = if had_class { Ok(()) } else { shaper.add_htb(ifindex, HTB_MAJOR) }
                        .and_then(|_| shaper.set_class(ifindex, HTB_MAJOR, minor, limit.rate_bps, burst))
                        .and_then(|_| shaper.set_leaf_fifo(ifindex, HTB_MAJOR, minor, leaf_limit(limit)));
                    if let Err(e) = r {
                        if !had_class {
                            for d in done.iter().chain(std::iter::once(&ifindex)) {
                                let _ = shaper.delete_root(*d);
                            }
                        }
                        return Err(shape_err(e));
                    }
                    done.push(ifindex);
                }
                Ok(0)
            }
        }
    }

    /// Remove the VM's HTB class for this direction (and the qdisc or IFB
    /// when nothing else uses it). Best effort: an interface that is gone
    /// took its qdisc with it.
    fn shape_teardown(&mut self, i: usize, dir: Direction) {
        let minor = (self.vms[i].slot + 1) as u16;
        let Some(shaper) = self.shaper.as_mut() else { return };
        match dir {
            Direction::Egress => {
                if let Some(ifb) = self.ifb {
                    let _ = shaper.delete_class(ifb, HTB_MAJOR, minor);
                    let others = self.vms.iter().enumerate().any(|(j, v)| {
                        j != i && v.limits[Direction::Egress.index() as usize].map(|l| l.mode) == Some(Mode::Shape)
                    });
                    if !others {
                        let _ = shaper.delete_link(ifb);
                        self.ifb = None;
                    }
                }
            }
            Direction::Ingress => {
                for &ifindex in &self.vms[i].ifindexes {
                    // Each interface belongs to one VM: its root is ours alone.
                    let _ = shaper.delete_root(ifindex);
                }
            }
        }
    }

    /// The most recent OOM kills, oldest first.
    pub fn ooms(&self) -> Vec<OomRecord> {
        self.ooms.iter().cloned().collect()
    }
}

impl Drop for Governor {
    /// Remove every qdisc, class and IFB device the governor created; the
    /// programs are detached and unpinned when `telemetry` drops after this.
    fn drop(&mut self) {
        // Stop classifying and redirecting first, so no packet is sent to an
        // IFB device that is about to go.
        for vm in &self.vms {
            for d in 0..2u32 {
                if vm.limits[d as usize].is_some() {
                    let _ = self.telemetry.set_policer(vm.slot, d, Policer::default());
                }
            }
        }
        for i in 0..self.vms.len() {
            for dir in [Direction::Egress, Direction::Ingress] {
                if self.vms[i].limits[dir.index() as usize].map(|l| l.mode) == Some(Mode::Shape) {
                    self.shape_teardown(i, dir);
                }
            }
        }
        if let (Some(shaper), Some(ifb)) = (self.shaper.as_mut(), self.ifb.take()) {
            let _ = shaper.delete_link(ifb);
        }
    }
}
