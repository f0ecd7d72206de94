//! Measuring what the decision needs, each tick: the card's use per
//! resource (rates between two BAR0 snapshots), each card-side MC VM's cost
//! on the card (rates between two `vm-costs` tables: the card's own
//! accounting of that VM), and each host-side MC VM's cost on the host
//! (its cgroup: CPU rate and memory). Rates need two readings, so each
//! meter keeps the previous one; a reading that cannot give a rate (the
//! card's registers not refreshed yet, a VM new since the last table)
//! keeps the last rate instead of inventing one.

use std::collections::HashMap;
use std::time::Instant;

use card_link::abi::{utilisation, RegisterSnapshot};
use card_link::costs::{vm_utilisation, VmCosts};
use card_link::{Card, CardError};
use cgroupfs::Cgroup;

use super::{HostCost, PerResource, Resource};

/// The card's use and the per-VM costs, from two readings.
#[derive(Default)]
pub struct CardMeter {
    regs: Option<RegisterSnapshot>,
    costs: Option<VmCosts>,
    /// The last rates (kept while the registers have not refreshed).
    card: PerResource,
    vms: HashMap<u32, PerResource>,
    /// Whether the card offers per-VM costs (ABI 1.2); checked once.
    per_vm: Option<bool>,
}

/// One tick's reading of the card.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CardReading {
    pub card: PerResource,
    /// By VM id on the card.
    pub vms: HashMap<u32, PerResource>,
    /// False until two readings gave rates.
    pub rated: bool,
    /// The card's CPU capacity in cores.
    pub cpu_cores: f64,
}

fn per_resource(fpga: f64, cpu: f64, memory: f64, network: f64) -> PerResource {
    let mut p = [0.0; 4];
    p[Resource::Fpga.index()] = fpga;
    p[Resource::Cpu.index()] = cpu;
    p[Resource::Memory.index()] = memory;
    p[Resource::Network.index()] = network;
    p
}

impl CardMeter {
    /// Read the registers and the cost table, and give the rates since the
    /// last reading. A card without per-VM costs (ABI 1.1) is refused: the
    /// decision never uses assumed costs.
    pub fn read(&mut self, card: &mut Card) -> Result<CardReading, CardError> {
        let regs = card.registers()?;
        // A stalled mailbox must not hold the placement thread for a whole
        // command timeout: health is polled every half heartbeat, and a
        // stall is declared within three. Telemetry waits at most that.
        let period = std::time::Duration::from_millis(regs.heartbeat_period_ms as u64);
        let costs = match card.with_command_timeout(period * 3, |c| c.vm_costs()) {
            Ok(c) => c,
            Err(e @ CardError::Unsupported { .. }) => {
                self.per_vm = Some(false);
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        self.per_vm = Some(true);
        let rated = self.regs.is_some();
        if let Some(prev) = &self.regs {
            // BAR0 refreshes once per heartbeat: the same snapshot twice
            // gives no rate, and the last one stands.
            if regs.card_time_ns > prev.card_time_ns {
                let u = utilisation(prev, &regs)?;
                self.card = per_resource(u.fpga, u.cpu, u.memory, u.network);
            }
        }
        if let Some(prev) = &self.costs {
            if costs.card_time_ns > prev.card_time_ns {
                let vms = vm_utilisation(prev, &costs, &regs)?;
                // A VM gone from the table is gone from the card.
                self.vms.retain(|id, _| costs.get(*id).is_some());
                for v in vms {
                    self.vms.insert(v.vm, per_resource(v.fpga, v.cpu, v.memory, v.network));
                }
            }
        }
        if self.regs.as_ref().is_none_or(|p| regs.card_time_ns > p.card_time_ns) {
            self.regs = Some(regs);
        }
        self.costs = Some(costs);
        let cpu_cores = self
            .regs
            .as_ref()
            .and_then(|r| r.resource(card_link::abi::ResourceKind::Cpu))
            .map_or(0.0, |c| c.capacity as f64 / 1e9);
        Ok(CardReading { card: self.card, vms: self.vms.clone(), rated, cpu_cores })
    }

    /// Forget the readings (the card restarted or was replaced: its
    /// counters start again).
    pub fn reset(&mut self) {
        *self = CardMeter::default();
    }
}

/// Host-side MC VMs' costs from their cgroups.
#[derive(Default)]
pub struct HostMeter {
    last: HashMap<String, (Instant, u64)>,
}

impl HostMeter {
    /// CPU (cores, over the time since the last reading of this task) and
    /// memory (bytes now) of each task's cgroup. A task read for the first
    /// time has no CPU rate yet and is left out.
    pub fn read<'a>(&mut self, cgroups: impl Iterator<Item = (&'a str, &'a Cgroup)>) -> HashMap<String, HostCost> {
        let now = Instant::now();
        let mut out = HashMap::new();
        let mut seen = Vec::new();
        for (task, cg) in cgroups {
            seen.push(task.to_string());
            let cpu = match cg.cpu_usage_ns() {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(task, "reading the MC VM's CPU: {e}");
                    continue;
                }
            };
            let memory = match cg.memory() {
                Ok(m) => m.map_or(0, |m| m.usage_bytes),
                Err(e) => {
                    tracing::debug!(task, "reading the MC VM's memory: {e}");
                    continue;
                }
            };
            if let Some((t, c)) = self.last.insert(task.to_string(), (now, cpu)) {
                let dt = now.duration_since(t).as_secs_f64();
                if dt > 0.0 && cpu >= c {
                    let cpus = (cpu - c) as f64 / 1e9 / dt;
                    out.insert(task.to_string(), HostCost { cpus, memory_bytes: memory });
                }
            }
        }
        self.last.retain(|t, _| seen.contains(t));
        out
    }
}
