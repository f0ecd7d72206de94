//! The governor proper: the VMs it watches, and one sampling step.
//!
//! Synchronous and free of tokio, so tests drive it tick by tick; the daemon
//! (daemon.rs) calls `tick` on a timer and serves what it returns.

use std::collections::VecDeque;
use std::time::Instant;

use governor_common::NetStats;
use serde::Serialize;
use thiserror::Error;

use crate::cgroup::{Cgroup, CgroupError, Layout};
use crate::config::{Config, VmConfig};
use crate::sampler::{rates, Sample, VmStatus};
use crate::telemetry::{Telemetry, TelemetryError};

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
}

pub struct Governor {
    telemetry: Telemetry,
    vms: Vec<Vm>,
    status: Vec<VmStatus>,
    ooms: VecDeque<OomRecord>,
}

const OOM_LOG: usize = 64;

impl Governor {
    /// Load the programs and register every VM of the config. Either all of
    /// it is in place or, on error, nothing stays attached or pinned.
    pub fn new(cfg: &Config) -> Result<Governor, GovernorError> {
        let layout = Layout::detect().map_err(|source| GovernorError::Cgroup {
            vm: "*".into(),
            source,
        })?;
        let telemetry = Telemetry::load(&cfg.pin_dir)?;
        let mut g = Governor {
            telemetry,
            vms: Vec::new(),
            status: Vec::new(),
            ooms: VecDeque::new(),
        };
        for vm in &cfg.vms {
            // On error `g` is dropped, which detaches and unpins everything.
            g.add_vm(&layout, vm)?;
        }
        Ok(g)
    }

    fn add_vm(&mut self, layout: &Layout, cfg: &VmConfig) -> Result<(), GovernorError> {
        let cg_err = |source| GovernorError::Cgroup {
            vm: cfg.name.clone(),
            source,
        };
        let cgroup = layout.open(&cfg.cgroup).map_err(cg_err)?;
        let id = cgroup.id().map_err(cg_err)?;
        let mut ifindexes = Vec::new();
        for ifname in &cfg.interfaces {
            ifindexes.push(self.telemetry.attach_interface(ifname)?);
        }
        self.vms.push(Vm {
            cfg: cfg.clone(),
            cgroup,
            id,
            ifindexes,
            subtree: vec![id],
            prev: None,
        });
        Ok(())
    }

    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// Read every counter once and return the per-VM rates since the last
    /// tick (the first tick has no rates yet, only totals).
    pub fn tick(&mut self) -> Result<&[VmStatus], GovernorError> {
        let mut out = Vec::with_capacity(self.vms.len());
        for vm in &mut self.vms {
            let cg_err = |source| GovernorError::Cgroup {
                vm: vm.cfg.name.clone(),
                source,
            };
            // The subtree can change (a VMM moving vCPU threads into child
            // cgroups); a VM whose cgroup vanished keeps its last ids.
            if let Ok(ids) = vm.cgroup.subtree_ids() {
                vm.subtree = ids;
            }
            let cpu = self.telemetry.cgroups(&vm.subtree)?;
            let mut net = NetStats::default();
            for ifindex in &vm.ifindexes {
                let n = self.telemetry.net(*ifindex)?;
                net.rx_bytes += n.rx_bytes;
                net.rx_packets += n.rx_packets;
                net.tx_bytes += n.tx_bytes;
                net.tx_packets += n.tx_packets;
            }
            let memory = vm.cgroup.memory().map_err(cg_err)?;
            let cur = Sample {
                at: Instant::now(),
                cpu,
                net,
                memory,
            };
            let prev = vm.prev.as_ref().unwrap_or(&cur);
            out.push(rates(&vm.cfg.name, vm.cfg.role.as_str(), vm.id, prev, &cur));
            vm.prev = Some(cur);
        }
        for ev in self.telemetry.drain_oom() {
            let end = ev
                .comm
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(ev.comm.len());
            let vm = self
                .vms
                .iter()
                .find(|v| v.subtree.contains(&ev.cgroup_id))
                .map(|v| v.cfg.name.clone());
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

    /// The most recent OOM kills, oldest first.
    pub fn ooms(&self) -> Vec<OomRecord> {
        self.ooms.iter().cloned().collect()
    }
}
