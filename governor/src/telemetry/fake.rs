//! An in-memory [`Telemetry`] for tests of the governor's logic: counters
//! are set by the test, interfaces are names with indexes that the test can
//! change (a re-created tap), and everything the governor writes is kept
//! for the test to read back. Clones share one state, so a test keeps a
//! handle after giving one to the governor.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use governor_common::{CgroupStats, NetStats, OomEvent, Policer, QosStats, QOS_OFF};

use super::{qos_index, Telemetry, TelemetryError};
use crate::qos::Direction;

#[derive(Default, Debug)]
pub struct FakeKernel {
    /// Interfaces on the "host": name -> ifindex.
    pub links: HashMap<String, u32>,
    /// Interfaces the tc programs are attached to: name -> ifindex.
    pub attached: HashMap<String, u32>,
    pub cgroups: HashMap<u64, CgroupStats>,
    pub net: HashMap<u32, NetStats>,
    pub vm_of_if: HashMap<u32, u32>,
    /// The VM slot each cgroup was counted into (`count_cgroup_in`).
    pub cg_slot: HashMap<u64, u32>,
    /// Each interface's VM slot as it stood when the programs were
    /// attached to it (the real programs read it from the first packet).
    pub slot_at_attach: HashMap<String, Option<u32>>,
    pub qos: HashMap<u32, Policer>,
    pub qos_stats: HashMap<u32, QosStats>,
    pub ooms: Vec<OomEvent>,
    /// Make the next `set_policer` fail (a full or broken map).
    pub fail_set_policer: bool,
}

#[derive(Clone, Default)]
pub struct FakeTelemetry(Arc<Mutex<FakeKernel>>);

impl FakeTelemetry {
    pub fn new() -> FakeTelemetry {
        FakeTelemetry::default()
    }

    /// The shared state, to set counters or read what the governor wrote.
    pub fn state(&self) -> MutexGuard<'_, FakeKernel> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Make an interface exist with this index.
    pub fn add_link(&self, name: &str, ifindex: u32) {
        self.state().links.insert(name.into(), ifindex);
    }
}

impl Telemetry for FakeTelemetry {
    fn ifindex(&self, name: &str) -> Result<u32, TelemetryError> {
        self.state()
            .links
            .get(name)
            .copied()
            .ok_or_else(|| TelemetryError::Interface { name: name.into(), reason: "no such interface".into() })
    }

    fn attach_interface(&mut self, name: &str) -> Result<u32, TelemetryError> {
        let idx = self.ifindex(name)?;
        let mut s = self.state();
        let slot = s.vm_of_if.get(&idx).copied();
        s.slot_at_attach.insert(name.into(), slot);
        s.attached.insert(name.into(), idx);
        Ok(idx)
    }

    fn detach_interface(&mut self, name: &str) {
        self.state().attached.remove(name);
    }

    fn cgroup(&self, id: u64) -> Result<CgroupStats, TelemetryError> {
        Ok(self.state().cgroups.get(&id).copied().unwrap_or_default())
    }

    fn net(&self, ifindex: u32) -> Result<NetStats, TelemetryError> {
        Ok(self.state().net.get(&ifindex).copied().unwrap_or_default())
    }

    fn set_vm_of_interface(&mut self, ifindex: u32, slot: u32) -> Result<(), TelemetryError> {
        self.state().vm_of_if.insert(ifindex, slot);
        Ok(())
    }

    fn count_cgroup_in(&mut self, id: u64, slot: u32) -> Result<(), TelemetryError> {
        self.state().cg_slot.insert(id, slot);
        Ok(())
    }

    fn uncount_cgroup(&mut self, id: u64) {
        self.state().cg_slot.remove(&id);
    }

    fn forget_stale(&mut self, cgroups: &HashSet<u64>, interfaces: &HashSet<u32>) {
        let mut st = self.state();
        st.cg_slot.retain(|id, _| cgroups.contains(id));
        st.vm_of_if.retain(|i, _| interfaces.contains(i));
    }

    fn clear_vm_of_interface(&mut self, ifindex: u32) {
        self.state().vm_of_if.remove(&ifindex);
    }

    fn policer(&self, slot: u32, dir: Direction) -> Result<Policer, TelemetryError> {
        Ok(self.state().qos.get(&qos_index(slot, dir)).copied().unwrap_or_default())
    }

    fn set_policer(&mut self, slot: u32, dir: Direction, p: Policer) -> Result<(), TelemetryError> {
        let mut st = self.state();
        if std::mem::take(&mut st.fail_set_policer) {
            return Err(TelemetryError::Missing("QOS (injected failure)"));
        }
        if p.mode == QOS_OFF {
            st.qos.remove(&qos_index(slot, dir));
        } else {
            st.qos.insert(qos_index(slot, dir), p);
        }
        Ok(())
    }

    fn qos_stats(&self, slot: u32, dir: Direction) -> Result<QosStats, TelemetryError> {
        Ok(self.state().qos_stats.get(&qos_index(slot, dir)).copied().unwrap_or_default())
    }

    fn drain_oom(&mut self) -> Vec<OomEvent> {
        std::mem::take(&mut self.state().ooms)
    }

    fn prune_cgroups(&mut self, keep: &HashSet<u64>) -> usize {
        let mut st = self.state();
        let before = st.cgroups.len();
        st.cgroups.retain(|id, _| keep.contains(id));
        before - st.cgroups.len()
    }
}
