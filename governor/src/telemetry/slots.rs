//! VM slots on the real kernel side: which slot each VM holds, which
//! cgroups count into it, and a tick's reading of every VM in place.
//!
//! A slot is a VM's index in `VM_STATS` (its counters), `QOS` and
//! `QOS_STATS` (its limits), and what its interfaces' `NET` entries and its
//! cgroups' `CG_SLOT` entries name. The owner word of each slot (the VM's
//! own cgroup id) is how a governor that adopts the pinned maps of one
//! that died finds each VM's slot again, whatever the order of its config:
//! its counters and limits go on.

use std::collections::HashSet;

use governor_common::{maps, CgroupStats, CpuState, NetStats, Policer, QosStats};

use super::bpf::BpfTelemetry;
use super::vmstats;
use super::{qos_index, Telemetry, TelemetryError, VmKeys};
use crate::qos::Direction;

impl BpfTelemetry {
    pub(super) fn claim_slot_in_maps(&mut self, vm_id: u64, in_use: &[u32]) -> Result<u32, TelemetryError> {
        // The slot whose owner word names the VM (the truth, also when its
        // CG_SLOT entry was never written: a governor that died in between).
        let slots = self.vm_stats.slots() as u32;
        if let Some(s) = (0..slots).find(|s| self.vm_stats.owner(*s) == vm_id && !in_use.contains(s)) {
            tracing::debug!(cgroup = vm_id, slot = s, "the VM keeps the slot it had");
            return Ok(s);
        }
        let slot = (0..self.vm_stats.slots() as u32)
            .find(|s| self.vm_stats.owner(*s) == 0 && !in_use.contains(s))
            .ok_or(TelemetryError::NoSlot)?;
        // A slot a VM before held: its limits and their counters go with it.
        let cpus = super::possible_cpus()?;
        for dir in [Direction::Egress, Direction::Ingress] {
            self.set_policer(slot, dir, Policer::default())?;
            let zero = aya::maps::PerCpuValues::try_from(vec![QosStats::default(); cpus]).map_err(|source| {
                TelemetryError::Io { op: "build per-CPU values", path: self.pin_dir.join(maps::QOS_STATS), source }
            })?;
            self.qos_stats
                .set(qos_index(slot, dir), zero, 0)
                .map_err(|source| TelemetryError::Map { name: maps::QOS_STATS, source })?;
        }
        self.vm_stats.claim(slot, vm_id);
        self.slot_bases.clear(slot);
        Ok(slot)
    }

    /// Slots owned by VMs outside `keep` (own cgroup ids): no cgroup or
    /// interface counts into them any more (an interface an earlier
    /// governor watched keeps its filter, now counting on its own), then
    /// they are free.
    pub(super) fn release_slots_in_maps(&mut self, keep: &[u64]) {
        let keep: HashSet<u64> = keep.iter().copied().collect();
        let freed: HashSet<u32> = (0..self.vm_stats.slots() as u32)
            .filter(|s| {
                let owner = self.vm_stats.owner(*s);
                owner != 0 && !keep.contains(&owner)
            })
            .collect();
        if freed.is_empty() {
            return;
        }
        self.unname(|_, slot| freed.contains(&slot), |_, slot| freed.contains(&slot));
        for s in &freed {
            self.vm_stats.set_owner(*s, 0);
        }
        tracing::info!(slots = freed.len(), "released the slots of VMs a governor before watched");
        // A program that read a freed slot from CG_SLOT or NET just before
        // may still be adding to it for a moment (a program's run is
        // microseconds): let it finish before a new VM's claim zeroes it.
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    pub(super) fn uncount_cgroup_in_map(&mut self, id: u64) {
        self.registered.remove(&id);
        match self.cg_slot.remove(&id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => tracing::warn!(cgroup = id, "removing its VM slot entry: {e}"),
        }
    }

    pub(super) fn forget_stale_in_maps(&mut self, cgroups: &HashSet<u64>, interfaces: &HashSet<u32>) {
        let (c, i) = self.unname(|id, _| !cgroups.contains(&id), |ifindex, _| !interfaces.contains(&ifindex));
        if c + i > 0 {
            tracing::info!(cgroups = c, interfaces = i, "no longer counted into VM slots (left by a governor before)");
        }
    }

    /// Stop counting into VM slots the cgroups (`CG_SLOT` entries) and the
    /// interfaces (`NET` entries naming a slot) that `cgroup` and
    /// `interface` pick, given the key and the slot; how many of each.
    fn unname(&mut self, cgroup: impl Fn(u64, u32) -> bool, interface: impl Fn(u32, u32) -> bool) -> (usize, usize) {
        let cgroups: Vec<u64> =
            self.cg_slot.iter().filter_map(Result::ok).filter(|(k, s)| cgroup(*k, *s)).map(|(k, _)| k).collect();
        for id in &cgroups {
            self.uncount_cgroup_in_map(*id);
        }
        // Every CPU's copy holds the same slot (set_net_slot writes them all).
        let interfaces: Vec<u32> = self
            .net
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| v.iter().any(|e| e.qos_slot != 0 && interface(*k, e.qos_slot - 1)))
            .map(|(k, _)| k)
            .collect();
        for ifindex in &interfaces {
            self.clear_vm_of_interface(*ifindex);
        }
        (cgroups.len(), interfaces.len())
    }

    pub(super) fn count_cgroup_in_map(&mut self, id: u64, slot: u32) -> Result<(), TelemetryError> {
        self.cg_slot.insert(id, slot, 0).map_err(|source| TelemetryError::Map { name: maps::CG_SLOT, source })?;
        self.registered.insert(id, slot);
        Ok(())
    }

    /// Each VM's slot, read in place, plus what its cgroups and interfaces
    /// counted before they were counted in it (`Bases`), plus what each
    /// CPU gathered for its cgroups and has not yet added (`pending`,
    /// read after the slots: a flush in between leaves a reading short
    /// for one tick, never counted twice).
    pub(super) fn read_vms_in_place(
        &mut self,
        vms: &[VmKeys<'_>],
        out: &mut Vec<(CgroupStats, NetStats)>,
    ) -> Result<(), TelemetryError> {
        out.clear();
        for k in vms {
            let c = self.vm_stats.sum(k.slot);
            let (mut cpu, mut net) = (c.cpu, c.net);
            let signature = vmstats::keys_signature(k.cgroups.len(), k.ifindexes);
            if let Some((base_cpu, base_net)) = self.slot_bases.get(k.slot, signature) {
                cpu.add(base_cpu);
                net.add(base_net);
                out.push((cpu, net));
                continue;
            }
            let (mut base_cpu, mut base_net, mut settled) = (CgroupStats::default(), NetStats::default(), true);
            for id in k.cgroups {
                let map = &self.cgroups;
                let (b, done) = self.cg_bases.get(*id, |id| super::bpf::cgroup_entry(map, id))?;
                base_cpu.add(&b);
                settled &= done;
            }
            for i in k.ifindexes {
                let map = &self.net;
                let (b, done) = self.net_bases.get(*i, |i| super::bpf::net_entry(map, i))?;
                base_net.add(&b);
                settled &= done;
            }
            if settled {
                self.slot_bases.set(k.slot, signature, base_cpu, base_net);
            }
            cpu.add(&base_cpu);
            net.add(&base_net);
            out.push((cpu, net));
        }
        let states =
            self.cpu_state.get(&0, 0).map_err(|source| TelemetryError::Map { name: maps::CPU_STATE, source })?;
        for (cg, acc) in states.iter().filter_map(CpuState::pending) {
            let Some(slot) = self.registered.get(&cg) else { continue };
            if let Some(i) = vms.iter().position(|k| k.slot == *slot) {
                if let Some((cpu, _)) = out.get_mut(i) {
                    cpu.add(acc);
                }
            }
        }
        Ok(())
    }
}
