//! QoS policy's host side (claim 14): every tick the governor hands the qos
//! MC VM each user VM's measured rates, CPU and run-queue delay with its
//! policy from the config (its configured limits; for `[vm.qos.adaptive]`
//! the narrowest limit the agent may set), and the card's network use
//! against its threshold. The agent decides; the governor applies what it
//! decided to the eBPF policer or HTB and writes each change to the audit
//! log. While the qos VM cannot answer, nothing changes: the limits in
//! force stay (fail static).

use std::collections::HashMap;

use vmm::proto::qos::{Dir, QosChange, QosReason, QosSignals, QOS_ADAPTIVE, QOS_EXISTS};

use crate::config::VmConfig;
use crate::qos::{Direction, Limit, Mode, MAX_BURST};
use crate::sampler::VmStatus;

/// One VM's policy as the qos agent gets it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmPolicy {
    /// The configured limits, per [`Dir::index`].
    pub base: [Option<Limit>; 2],
    /// The floor of an adaptive VM (bit/s).
    pub min_bps: Option<u64>,
}

pub type Policies = HashMap<String, VmPolicy>;

/// The user VMs' policies from a checked config (an unparsable value was
/// refused by the config check already, so none is skipped here).
pub fn policies(vms: &[VmConfig]) -> Policies {
    let mut out = HashMap::new();
    for vm in vms {
        let mut p = VmPolicy::default();
        for (dir, spec) in vm.qos_specs() {
            p.base[dir_of(dir).index()] = spec.check("").ok();
        }
        p.min_bps = vm.qos.adaptive.as_ref().and_then(|a| a.min_bps(&vm.qos, "").ok());
        out.insert(vm.name.clone(), p);
    }
    out
}

fn dir_of(d: Direction) -> Dir {
    match d {
        Direction::Egress => Dir::Egress,
        Direction::Ingress => Dir::Ingress,
    }
}

pub fn direction_of(d: Dir) -> Direction {
    match d {
        Dir::Egress => Direction::Egress,
        Dir::Ingress => Direction::Ingress,
    }
}

/// How often the qos VM decides: rates over a second or more, so a TCP
/// flow's swings within a tick and the card's and the host's measurement
/// windows not lining up do not read as a change (a policy acts on seconds).
pub const PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// Rates over the qos period from the VMs' byte totals: what was
/// delivered, so bytes a policer dropped (counted by the interface programs
/// before the limit's verdict) do not read as the VM's rate.
#[derive(Default)]
pub struct QosMeter {
    last: Option<(std::time::Instant, HashMap<String, Totals>)>,
}

/// A VM's bytes so far per direction (egress, ingress): seen on its
/// interfaces, and passed by its limit where it has one.
#[derive(Clone, Copy, Debug, Default)]
pub struct Totals {
    pub seen: [u64; 2],
    pub passed: [Option<u64>; 2],
}

impl QosMeter {
    /// The records for `names` (the monitor's slots) when a period has
    /// passed since the last ones, with rates over it; None otherwise.
    /// `passed`: per VM, bytes its limits passed so far per direction.
    pub fn sample(
        &mut self,
        now: std::time::Instant,
        names: &[String],
        vms: &[VmStatus],
        passed: &HashMap<String, [Option<u64>; 2]>,
        policies: &Policies,
    ) -> Option<Vec<QosSignals>> {
        let totals: HashMap<String, Totals> = vms
            .iter()
            .map(|v| {
                let t = Totals {
                    seen: [v.tx_bytes_total, v.rx_bytes_total],
                    passed: passed.get(&v.name).copied().unwrap_or_default(),
                };
                (v.name.clone(), t)
            })
            .collect();
        let Some((then, prev)) = &self.last else {
            self.last = Some((now, totals));
            return None;
        };
        let secs = now.duration_since(*then).as_secs_f64();
        if secs < PERIOD.as_secs_f64() {
            return None;
        }
        let mut out = signals(names, vms, policies);
        for s in &mut out {
            let name = &names[s.slot as usize];
            let (Some(a), Some(b)) = (prev.get(name), totals.get(name)) else { continue };
            // What a limit passed over the whole period; otherwise (no
            // limit, or one set or removed within it) all that was seen.
            let delivered = |i: usize| match (a.passed[i], b.passed[i]) {
                (Some(x), Some(y)) if y >= x => y - x,
                _ => b.seen[i].saturating_sub(a.seen[i]),
            };
            s.rate = [(delivered(0) as f64 / secs) as u64, (delivered(1) as f64 / secs) as u64];
        }
        self.last = Some((now, totals));
        Some(out)
    }
}

/// The records for the user VMs `names` (the monitor's slots), from this
/// tick's status.
pub fn signals(names: &[String], vms: &[VmStatus], policies: &Policies) -> Vec<QosSignals> {
    let mut out = Vec::with_capacity(names.len());
    for (slot, name) in names.iter().enumerate() {
        let Some(v) = vms.iter().find(|v| &v.name == name) else { continue };
        let p = policies.get(name).copied().unwrap_or_default();
        let bytes = |bits: f64| (bits / 8.0).clamp(0.0, u64::MAX as f64) as u64;
        let base = |d: Dir| p.base[d.index()].map_or(0, |l| l.rate_bytes_per_s());
        let min_rate = p.min_bps.map_or(0, |m| (m / 8).max(1));
        let mut flags = QOS_EXISTS;
        if p.min_bps.is_some() {
            flags |= QOS_ADAPTIVE;
        }
        out.push(QosSignals {
            slot: slot as u32,
            flags,
            rate: [bytes(v.tx_bits_per_s), bytes(v.rx_bits_per_s)],
            base: [base(Dir::Egress), base(Dir::Ingress)],
            min_rate,
            cpu_ppm: (v.cpu_percent * 10_000.0).clamp(0.0, u32::MAX as f64) as u32,
            runq_p99_us: v.runq_delay_p99_us.unwrap_or(0.0).clamp(0.0, u32::MAX as f64) as u32,
        });
    }
    out
}

/// What the governor applies for one change: the limit to set, or None to
/// remove the limit (a restore of a VM with no configured limit).
#[derive(Clone, Debug, PartialEq)]
pub struct LimitAction {
    pub vm: String,
    pub direction: Direction,
    pub limit: Option<Limit>,
    pub reason: &'static str,
    pub detail: u32,
}

/// The action for the agent's change `c` of the VM `vm`. A narrowed limit
/// keeps the configured mode (police when none) and gets a burst of 250 ms
/// at its rate, what TCP needs to reach the rate through a policer (see
/// README), at least 64 KiB.
pub fn action(vm: &str, policy: &VmPolicy, c: &QosChange) -> LimitAction {
    let base = policy.base[c.dir.index()];
    let limit = if c.reason == QosReason::Calm {
        base
    } else {
        let rate_bps = c.rate.saturating_mul(8).max(crate::qos::MIN_RATE_BPS);
        Some(Limit {
            mode: base.map_or(Mode::Police, |b| b.mode),
            rate_bps,
            burst_bytes: (c.rate / 4).clamp(64 << 10, MAX_BURST),
            packet_rate: None,
        })
    };
    LimitAction { vm: vm.to_string(), direction: direction_of(c.dir), limit, reason: c.reason.name(), detail: c.detail }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn policies_signals_and_actions() {
        let cfg = Config::parse(
            "[[vm]]\nname = \"a\"\ncgroup = \"a\"\ninterfaces = [\"va\"]\n\
             [vm.qos.ingress]\nmode = \"shape\"\nrate = \"100mbit\"\nburst = \"64kb\"\n\
             [vm.qos.adaptive]\nmin = \"20mbit\"\n\
             [[vm]]\nname = \"b\"\ncgroup = \"b\"\n",
        )
        .expect("config");
        let pol = policies(&cfg.vms);
        assert_eq!(pol["a"].min_bps, Some(20_000_000));
        assert_eq!(pol["a"].base[Dir::Ingress.index()].map(|l| l.rate_bps), Some(100_000_000));
        assert_eq!(pol["b"], VmPolicy::default());
        let vms = [
            VmStatus { name: "b".into(), role: "user".into(), rx_bits_per_s: 8e6, ..VmStatus::default() },
            VmStatus {
                name: "a".into(),
                role: "user".into(),
                tx_bits_per_s: 16e6,
                rx_bits_per_s: 80e6,
                cpu_percent: 50.0,
                runq_delay_p99_us: Some(1200.0),
                ..VmStatus::default()
            },
        ];
        let s = signals(&["a".into(), "b".into()], &vms, &pol);
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].slot, s[0].flags, s[0].rate, s[0].base),
            (0, QOS_EXISTS | QOS_ADAPTIVE, [2_000_000, 10_000_000], [0, 12_500_000])
        );
        assert_eq!((s[0].min_rate, s[0].cpu_ppm, s[0].runq_p99_us), (2_500_000, 500_000, 1200));
        assert_eq!((s[1].slot, s[1].flags, s[1].rate[1]), (1, QOS_EXISTS, 1_000_000));
        let narrow = QosChange {
            slot: 0,
            dir: Dir::Ingress,
            reason: QosReason::CardNetwork,
            tick: 1,
            detail: 7000,
            rate: 5_000_000,
        };
        let a = action("a", &pol["a"], &narrow);
        let l = a.limit.expect("a limit");
        assert_eq!((l.mode, l.rate_bps, l.burst_bytes), (Mode::Shape, 40_000_000, 1_250_000));
        assert_eq!((a.direction, a.reason), (Direction::Ingress, "card-network"));
        let calm = QosChange { reason: QosReason::Calm, rate: 0, ..narrow };
        assert_eq!(action("a", &pol["a"], &calm).limit, pol["a"].base[1], "back to the configured limit");
        let calm_egress = QosChange { dir: Dir::Egress, ..calm };
        assert_eq!(action("a", &pol["a"], &calm_egress).limit, None, "no configured limit: removed");
    }
}
