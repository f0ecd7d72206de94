//! The placement engine: the state the decision needs between ticks (where
//! each MC VM runs, when it last moved, its last measured card cost, since
//! when the card is calm), one step per tick (measure -> decide -> move ->
//! audit), and the operator's moves and pins. Measurements come in, moves go
//! out through an [`Actuator`]; the engine itself does no I/O.

use std::collections::HashMap;

use super::audit::{AuditRecord, MoveReport};
use super::config::McSpec;
use super::mover::{move_task_with, Actuator};
use super::{calm_since, decide, Decision, HostCost, Inputs, Move, PerResource, Policy, Reason, Resource, Side, Task};

/// What was measured this tick.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Measured {
    /// Monotonic ms (dwell and calm times).
    pub now_ms: u64,
    /// ms since the Unix epoch for the audit log: the wall time at start
    /// plus `now_ms` (see `AuditRecord::time_ms`).
    pub time_ms: u64,
    /// The card's use per resource.
    pub card: PerResource,
    /// Per card-side MC VM: its use of the card (from the card's per-VM costs).
    pub card_costs: HashMap<String, PerResource>,
    /// Per host-side MC VM: its use of the host (from its cgroup).
    pub host_costs: HashMap<String, HostCost>,
    /// The card's CPU capacity in host cores (its CPU resource's capacity
    /// in ns per s / 1e9); 0 when unknown. Translates a VM's CPU measured
    /// on one side into what it would use on the other.
    pub card_cpu_cores: f64,
}

pub struct Engine {
    policy: Policy,
    tasks: Vec<Task>,
    calm_since_ms: Option<u64>,
    tick: u64,
    dry_run: bool,
    /// Moves copy memory while the VM runs where both sides can.
    precopy: bool,
}

/// The host cost assumed for a VM never measured on the host: its guest RAM
/// and a tenth of a CPU (the agent idles most of the time). Replaced by the
/// measurement once it runs there.
fn nominal_host_cost(mem_mib: u64) -> HostCost {
    HostCost { cpus: 0.1, memory_bytes: mem_mib << 20 }
}

impl Engine {
    /// The MC VMs as configured, all on `start` sides (see [`Engine::initial`]).
    pub fn new(policy: Policy, specs: &[McSpec], sides: &[(String, Side)], dry_run: bool) -> Engine {
        let tasks = specs
            .iter()
            .map(|s| Task {
                name: s.task.clone(),
                side: sides.iter().find(|(t, _)| *t == s.task).map_or(Side::Host, |(_, side)| *side),
                card_cost: [0.0; 4],
                host_cost: nominal_host_cost(s.mem_mib),
                pin: s.pin,
                order: s.order,
                last_move_ms: None,
            })
            .collect();
        Engine { policy, tasks, calm_since_ms: None, tick: 0, dry_run, precopy: false }
    }

    /// Where each MC VM starts: a pinned one on its pin's side; the others
    /// on the card while the board-card condition holds, else on the host.
    pub fn initial(policy: &Policy, specs: &[McSpec], card: &PerResource) -> Vec<(String, Side)> {
        let holds = super::Resource::ALL.iter().all(|r| card[r.index()] <= policy.thresholds[r.index()]);
        specs.iter().map(|s| (s.task.clone(), s.pin.unwrap_or(if holds { Side::Card } else { Side::Host }))).collect()
    }

    pub fn tasks(&self) -> &[Task] {
        &self.tasks
    }

    pub fn side(&self, task: &str) -> Option<Side> {
        self.tasks.iter().find(|t| t.name == task).map(|t| t.side)
    }

    /// Host resources in use by host-side MC VMs, as measured.
    fn host_used(&self) -> HostCost {
        self.tasks.iter().filter(|t| t.side == Side::Host).fold(HostCost::default(), |a, t| HostCost {
            cpus: a.cpus + t.host_cost.cpus,
            memory_bytes: a.memory_bytes.saturating_add(t.host_cost.memory_bytes),
        })
    }

    fn absorb(&mut self, m: &Measured) {
        for t in &mut self.tasks {
            // A side's cost is measured while the VM runs there; the other
            // side's stays as last measured (what it would cost back).
            // Its CPU on the other side follows what it does now: a VM that
            // went idle after a move must not carry its busy cost back.
            let cpu = Resource::Cpu.index();
            let cores = m.card_cpu_cores;
            match t.side {
                Side::Card => {
                    if let Some(c) = m.card_costs.get(&t.name) {
                        t.card_cost = *c;
                        if cores > 0.0 {
                            t.host_cost.cpus = c[cpu] * cores;
                        }
                    }
                }
                Side::Host => {
                    if let Some(c) = m.host_costs.get(&t.name) {
                        t.host_cost = *c;
                        if cores > 0.0 {
                            t.card_cost[cpu] = c.cpus / cores;
                        }
                    }
                }
            }
        }
        self.calm_since_ms = calm_since(self.calm_since_ms, m.now_ms, &m.card, &self.policy);
    }

    /// One tick: take the measurements in, decide, carry the moves out
    /// (unless this is a dry run), and return the audit record.
    pub fn step(&mut self, m: &Measured, act: &mut impl Actuator) -> AuditRecord {
        self.absorb(m);
        self.tick += 1;
        let d = {
            let i = self.inputs(m);
            decide(&i)
        };
        let mut record = AuditRecord::of(&self.inputs(m), &d, self.tick, m.time_ms, self.dry_run);
        if !self.dry_run {
            record.reports = self.carry_out(&d.moves, m.now_ms, act);
        }
        record
    }

    fn inputs<'a>(&'a self, m: &Measured) -> Inputs<'a> {
        Inputs {
            now_ms: m.now_ms,
            card: m.card,
            tasks: &self.tasks,
            host_used: self.host_used(),
            calm_since_ms: self.calm_since_ms,
            policy: &self.policy,
        }
    }

    fn carry_out(&mut self, moves: &[Move], now_ms: u64, act: &mut impl Actuator) -> Vec<MoveReport> {
        let mut reports = Vec::new();
        for mv in moves {
            let Some(i) = self.tasks.iter().position(|t| t.name == mv.task) else { continue };
            let from = self.tasks[i].side;
            let r = move_task_with(act, &mv.task, from, self.precopy);
            if r.ok {
                self.tasks[i].side = mv.to;
                self.tasks[i].last_move_ms = Some(now_ms);
            }
            reports.push(r);
        }
        reports
    }

    /// An operator's move: done at once, whatever the decision would say
    /// (pins included: the operator is asked to unpin first). Refused with
    /// the reason when the task is unknown, pinned or already there.
    pub fn manual_move(
        &mut self,
        task: &str,
        to: Side,
        m: &Measured,
        act: &mut impl Actuator,
    ) -> Result<AuditRecord, String> {
        let t = self.tasks.iter().find(|t| t.name == task).ok_or_else(|| format!("task: no MC VM for {task:?}"))?;
        if let Some(p) = t.pin {
            return Err(format!("task: {task} is pinned to the {p:?} side (unpin it first)").to_lowercase());
        }
        if t.side == to {
            return Err(format!("to: {task} already runs there"));
        }
        let d = Decision {
            moves: vec![Move { task: task.to_string(), to }],
            reason: Reason::Manual,
            predicted: m.card,
            explain: format!("operator moved {task} to the {}", if to == Side::Card { "card" } else { "host" }),
        };
        self.tick += 1;
        let mut record = AuditRecord::of(&self.inputs(m), &d, self.tick, m.time_ms, self.dry_run);
        if !self.dry_run {
            record.reports = self.carry_out(&d.moves, m.now_ms, act);
        }
        Ok(record)
    }

    /// The audit record of a decision taken outside `step` (the initial
    /// placement; a card death), with this tick's inputs.
    pub fn record(&mut self, m: &Measured, d: &Decision) -> AuditRecord {
        self.absorb(m);
        self.tick += 1;
        AuditRecord::of(&self.inputs(m), d, self.tick, m.time_ms, self.dry_run)
    }

    /// Set where a task runs (a cold start or recovery done outside the
    /// mover), counting as a move for the dwell.
    pub fn set_side(&mut self, task: &str, side: Side, now_ms: u64) {
        if let Some(t) = self.tasks.iter_mut().find(|t| t.name == task) {
            if t.side != side {
                t.last_move_ms = Some(now_ms);
            }
            t.side = side;
        }
    }

    /// Copy memory while the VM runs (pre-copy) where both sides can.
    pub fn set_precopy(&mut self, on: bool) {
        self.precopy = on;
    }

    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Pin a task where it runs now (`None` unpins).
    pub fn pin(&mut self, task: &str, pin: bool) -> Result<Option<Side>, String> {
        let t = self.tasks.iter_mut().find(|t| t.name == task).ok_or_else(|| format!("task: no MC VM for {task:?}"))?;
        t.pin = pin.then_some(t.side);
        Ok(t.pin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::fake::Fake;
    use crate::placement::Side;

    fn policy() -> Policy {
        Policy {
            thresholds: [0.8, 0.7, 0.8, 0.6],
            hysteresis: 0.1,
            dwell_ms: 10_000,
            reserve: HostCost { cpus: 2.0, memory_bytes: 1 << 30 },
        }
    }

    fn spec(task: &str, pin: Option<Side>) -> McSpec {
        McSpec { task: task.into(), mem_mib: 32, pin, order: 0 }
    }

    fn measured(now_ms: u64, cpu: f64, costs: &[(&str, f64)]) -> Measured {
        Measured {
            now_ms,
            time_ms: 1_700_000_000_000 + now_ms,
            card: [0.1, cpu, 0.3, 0.1],
            card_costs: costs.iter().map(|(t, c)| (t.to_string(), [0.0, *c, 0.01, 0.0])).collect(),
            host_costs: HashMap::new(),
            card_cpu_cores: 0.0,
        }
    }

    #[test]
    fn initial_placement_follows_pins_and_the_condition() {
        let specs = [spec("log", None), spec("qos", Some(Side::Host))];
        let calm = Engine::initial(&policy(), &specs, &[0.1, 0.5, 0.3, 0.1]);
        assert_eq!(calm, vec![("log".into(), Side::Card), ("qos".into(), Side::Host)]);
        let busy = Engine::initial(&policy(), &specs, &[0.1, 0.9, 0.3, 0.1]);
        assert_eq!(busy[0], ("log".into(), Side::Host));
    }

    #[test]
    fn load_over_a_threshold_moves_a_vm_out_and_calm_brings_it_back() {
        let specs = [spec("log", None), spec("monitor", None)];
        let mut e = Engine::new(policy(), &specs, &Engine::initial(&policy(), &specs, &[0.0; 4]), false);
        let mut f = Fake::with("log", Side::Card, 5);
        f.copies.insert((Side::Card, "monitor".into()), (crate::placement::fake::State::Running, 9));
        // Calm, then over: log costs 20 points of card CPU, monitor 5.
        let r = e.step(&measured(1000, 0.5, &[("log", 0.2), ("monitor", 0.05)]), &mut f);
        assert_eq!(r.reason, Reason::Holds);
        let r = e.step(&measured(2000, 0.85, &[("log", 0.2), ("monitor", 0.05)]), &mut f);
        assert_eq!(r.reason, Reason::Relieve);
        assert_eq!(r.reports.len(), 1);
        assert!(r.reports[0].ok);
        assert_eq!(e.side("log"), Some(Side::Host));
        assert_eq!(f.state(Side::Host, "log").map(|s| s.1), Some(5), "state moved");
        // The load drops: calm, but log stays until the dwell has passed.
        let r = e.step(&measured(3000, 0.3, &[("monitor", 0.05)]), &mut f);
        assert_eq!(r.reason, Reason::Settling);
        let r = e.step(&measured(13_500, 0.3, &[("monitor", 0.05)]), &mut f);
        assert_eq!(r.reason, Reason::ComeBack, "{}", r.explain);
        assert_eq!(e.side("log"), Some(Side::Card), "log came back with its last measured card cost");
    }

    #[test]
    fn a_dry_run_decides_and_logs_but_does_not_move() {
        let specs = [spec("log", None)];
        let mut e = Engine::new(policy(), &specs, &[("log".into(), Side::Card)], true);
        let mut f = Fake::with("log", Side::Card, 1);
        let r = e.step(&measured(1000, 0.9, &[("log", 0.3)]), &mut f);
        assert!(r.dry_run);
        assert_eq!(r.reason, Reason::Relieve);
        assert_eq!(r.moves.len(), 1);
        assert!(r.reports.is_empty(), "nothing carried out");
        assert_eq!(e.side("log"), Some(Side::Card));
        assert!(f.log.is_empty(), "no actuator call: {:?}", f.log);
    }

    #[test]
    fn a_failed_move_keeps_the_side_and_reports_it() {
        let specs = [spec("log", None)];
        let mut e = Engine::new(policy(), &specs, &[("log".into(), Side::Card)], false);
        let mut f = Fake::with("log", Side::Card, 1);
        f.fail = Some(("restore", Side::Host));
        let r = e.step(&measured(1000, 0.9, &[("log", 0.3)]), &mut f);
        assert!(!r.reports[0].ok);
        assert_eq!(e.side("log"), Some(Side::Card));
        assert_eq!(f.state(Side::Card, "log").map(|s| s.0), Some(crate::placement::fake::State::Running));
    }

    #[test]
    fn manual_moves_and_pins() {
        let specs = [spec("log", None)];
        let mut e = Engine::new(policy(), &specs, &[("log".into(), Side::Card)], false);
        let mut f = Fake::with("log", Side::Card, 1);
        let m = measured(1000, 0.3, &[("log", 0.1)]);
        assert!(e.manual_move("nope", Side::Host, &m, &mut f).expect_err("unknown").starts_with("task:"));
        assert!(e.manual_move("log", Side::Card, &m, &mut f).expect_err("already there").starts_with("to:"));
        let r = e.manual_move("log", Side::Host, &m, &mut f).expect("move");
        assert_eq!((r.reason, r.reports[0].ok), (Reason::Manual, true));
        assert_eq!(e.pin("log", true), Ok(Some(Side::Host)));
        assert!(e.manual_move("log", Side::Card, &m, &mut f).expect_err("pinned").contains("pinned"));
        // Calm for long: a pinned VM still does not come back.
        let r = e.step(&measured(100_000, 0.1, &[]), &mut f);
        let r2 = e.step(&measured(200_000, 0.1, &[]), &mut f);
        assert!(r.moves.is_empty() && r2.moves.is_empty(), "{:?} {:?}", r.reason, r2.reason);
        assert_eq!(e.pin("log", false), Ok(None));
        let r = e.step(&measured(300_000, 0.1, &[]), &mut f);
        assert_eq!(r.reason, Reason::ComeBack);
    }
}
