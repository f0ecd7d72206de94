//! Each rule on hand-made inputs, then properties over random inputs.

use proptest::prelude::*;

use super::*;

const GIB: u64 = 1 << 30;

fn policy() -> Policy {
    Policy {
        thresholds: [0.8, 0.7, 0.8, 0.6],
        hysteresis: 0.1,
        dwell_ms: 60_000,
        reserve: HostCost { cpus: 2.0, memory_bytes: 2 * GIB },
    }
}

fn task(name: &str, side: Side, cpu: f64, net: f64, host_cpus: f64) -> Task {
    Task {
        name: name.into(),
        side,
        card_cost: [0.0, cpu, 0.02, net],
        host_cost: HostCost { cpus: host_cpus, memory_bytes: 256 << 20 },
        pin: None,
        order: 0,
        last_move_ms: None,
    }
}

fn inputs<'a>(card: PerResource, tasks: &'a [Task], p: &'a Policy) -> Inputs<'a> {
    Inputs { now_ms: 1_000_000, card, tasks, host_used: HostCost::default(), calm_since_ms: None, policy: p }
}

fn moved(d: &Decision) -> Vec<(&str, Side)> {
    d.moves.iter().map(|m| (m.task.as_str(), m.to)).collect()
}

#[test]
fn under_every_threshold_nothing_moves() {
    let p = policy();
    let tasks = [task("log", Side::Card, 0.1, 0.0, 0.2)];
    let d = decide(&inputs([0.1, 0.5, 0.3, 0.2], &tasks, &p));
    assert_eq!((d.reason, d.moves.len()), (Reason::Holds, 0));
}

#[test]
fn over_a_threshold_the_fewest_then_cheapest_sufficient_set_moves() {
    let p = policy();
    // CPU at 85% against 70%: 15 points must go.
    let tasks = [
        task("monitor", Side::Card, 0.10, 0.0, 0.1),
        task("log", Side::Card, 0.20, 0.0, 0.5),
        task("qos", Side::Card, 0.16, 0.0, 0.3),
        task("net-agent", Side::Card, 0.05, 0.0, 0.05),
    ];
    let d = decide(&inputs([0.1, 0.85, 0.3, 0.2], &tasks, &p));
    assert_eq!(d.reason, Reason::Relieve);
    // One VM suffices (log or qos); qos is the cheaper on the host.
    assert_eq!(moved(&d), vec![("qos", Side::Host)]);
    assert!((d.predicted[1] - 0.69).abs() < 1e-9);
}

#[test]
fn two_resources_over_may_need_two_vms() {
    let p = policy();
    let tasks = [task("monitor", Side::Card, 0.2, 0.0, 0.1), task("net-agent", Side::Card, 0.0, 0.2, 0.1)];
    let d = decide(&inputs([0.1, 0.8, 0.3, 0.7], &tasks, &p));
    assert_eq!(d.reason, Reason::Relieve);
    assert_eq!(d.moves.len(), 2);
}

#[test]
fn ties_follow_the_configured_order() {
    let p = policy();
    let mut a = task("a", Side::Card, 0.2, 0.0, 0.2);
    let mut b = task("b", Side::Card, 0.2, 0.0, 0.2);
    a.order = 0; // preferred on the card
    b.order = 1;
    let d = decide(&inputs([0.1, 0.8, 0.3, 0.2], &[a.clone(), b.clone()], &p));
    assert_eq!(moved(&d), vec![("b", Side::Host)]);
    (a.order, b.order) = (1, 0);
    let d = decide(&inputs([0.1, 0.8, 0.3, 0.2], &[a, b], &p));
    assert_eq!(moved(&d), vec![("a", Side::Host)]);
}

#[test]
fn a_host_reserve_too_small_moves_nothing_and_says_so() {
    let mut p = policy();
    p.reserve = HostCost { cpus: 0.25, memory_bytes: 2 * GIB };
    let tasks = [task("log", Side::Card, 0.2, 0.0, 0.5)];
    let d = decide(&inputs([0.1, 0.8, 0.3, 0.2], &tasks, &p));
    assert_eq!((d.reason, d.moves.len()), (Reason::HostReserve, 0));
    assert!(d.explain.contains("host reserve"), "{}", d.explain);
}

#[test]
fn pinned_and_recently_moved_vms_stay() {
    let p = policy();
    let mut pinned = task("qos", Side::Card, 0.3, 0.0, 0.1);
    pinned.pin = Some(Side::Card);
    let mut recent = task("log", Side::Card, 0.3, 0.0, 0.1);
    recent.last_move_ms = Some(1_000_000 - 1000);
    let d = decide(&inputs([0.1, 0.9, 0.3, 0.2], &[pinned, recent], &p));
    assert_eq!((d.reason, d.moves.len()), (Reason::NothingMovable, 0));
}

#[test]
fn user_load_alone_over_the_threshold_moves_what_helps() {
    let p = policy();
    let tasks = [task("monitor", Side::Card, 0.05, 0.0, 0.1), task("net-agent", Side::Card, 0.0, 0.1, 0.1)];
    // CPU 95%: even without both VMs still 90%.
    let d = decide(&inputs([0.1, 0.95, 0.3, 0.2], &tasks, &p));
    assert_eq!(d.reason, Reason::RelievePartly);
    assert_eq!(moved(&d), vec![("monitor", Side::Host)], "net-agent uses no CPU: it stays");
    // A VM whose cost is below the least useful relief is not moved (a VM
    // just arrived reads as costing nothing until its cost is measured).
    let tasks = [task("monitor", Side::Card, 0.005, 0.0, 0.1)];
    let d = decide(&inputs([0.1, 0.95, 0.3, 0.2], &tasks, &p));
    assert_eq!((d.reason, d.moves.len()), (Reason::RelievePartly, 0), "{}", d.explain);
}

#[test]
fn vms_come_back_one_at_a_time_best_fit_first_after_the_dwell() {
    let p = policy();
    let tasks = [task("small", Side::Host, 0.05, 0.0, 0.1), task("big", Side::Host, 0.25, 0.0, 0.1)];
    let mut i = inputs([0.1, 0.3, 0.3, 0.2], &tasks, &p);
    i.calm_since_ms = Some(i.now_ms - 30_000);
    assert_eq!(decide(&i).reason, Reason::Settling);
    i.calm_since_ms = Some(i.now_ms - 60_000);
    let d = decide(&i);
    assert_eq!(d.reason, Reason::ComeBack);
    assert_eq!(moved(&d), vec![("big", Side::Card)], "the best fit: 0.55 of a 0.6 margin");
    // Too big to fit under threshold minus hysteresis: the small one only.
    i.card[1] = 0.4;
    assert_eq!(moved(&decide(&i)), vec![("small", Side::Card)]);
    i.card[1] = 0.58;
    assert_eq!(decide(&i).reason, Reason::NothingFits);
}

#[test]
fn calm_tracking_starts_keeps_and_clears() {
    let p = policy();
    assert_eq!(calm_since(None, 5, &[0.1, 0.5, 0.1, 0.1], &p), Some(5));
    assert_eq!(calm_since(Some(2), 5, &[0.1, 0.5, 0.1, 0.1], &p), Some(2));
    assert_eq!(calm_since(Some(2), 5, &[0.1, 0.65, 0.1, 0.1], &p), None, "under the threshold but within the margin");
}

// ---------------------------------------------------------------- properties

fn arb_task(i: usize) -> impl Strategy<Value = Task> {
    (
        any::<bool>(),
        prop::array::uniform4(0.0f64..0.4),
        0.0f64..1.5,
        0u64..(2 * GIB),
        prop::option::weighted(0.2, prop_oneof![Just(Side::Card), Just(Side::Host)]),
        0u32..4,
        prop::option::weighted(0.4, 0u64..200_000),
    )
        .prop_map(move |(on_card, card_cost, cpus, mem, pin, order, last)| Task {
            name: format!("t{i}"),
            side: if on_card { Side::Card } else { Side::Host },
            card_cost,
            host_cost: HostCost { cpus, memory_bytes: mem },
            pin,
            order,
            last_move_ms: last,
        })
}

fn arb_tasks() -> impl Strategy<Value = Vec<Task>> {
    (1usize..7).prop_flat_map(|n| (0..n).map(arb_task).collect::<Vec<_>>())
}

fn arb_policy() -> impl Strategy<Value = Policy> {
    (prop::array::uniform4(0.3f64..0.95), 0.0f64..0.2, 0u64..120_000, 0.0f64..4.0, 0u64..(4 * GIB)).prop_map(
        |(thresholds, hysteresis, dwell_ms, cpus, mem)| Policy {
            thresholds,
            hysteresis,
            dwell_ms,
            reserve: HostCost { cpus, memory_bytes: mem },
        },
    )
}

/// Whether some set of movable card-side tasks brings every resource under
/// its threshold within the reserve (brute force, independent of `decide`).
fn feasible(i: &Inputs<'_>) -> bool {
    let cands: Vec<&Task> = i
        .tasks
        .iter()
        .filter(|t| {
            t.side == Side::Card
                && t.pin.is_none()
                && t.last_move_ms.is_none_or(|at| i.now_ms.saturating_sub(at) >= i.policy.dwell_ms)
        })
        .collect();
    (1u32..(1 << cands.len())).any(|mask| {
        let set: Vec<&Task> = (0..cands.len()).filter(|b| mask & (1 << b) != 0).map(|b| cands[b]).collect();
        let under = Resource::ALL.iter().all(|r| {
            let left = set.iter().fold(i.card[r.index()], |a, t| (a - t.card_cost[r.index()]).max(0.0));
            left <= i.policy.thresholds[r.index()]
        });
        let cpus: f64 = i.host_used.cpus + set.iter().map(|t| t.host_cost.cpus).sum::<f64>();
        let mem: u64 = i.host_used.memory_bytes + set.iter().map(|t| t.host_cost.memory_bytes).sum::<u64>();
        under && cpus <= i.policy.reserve.cpus + 1e-9 && mem <= i.policy.reserve.memory_bytes
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decisions_keep_every_rule(
        tasks in arb_tasks(),
        policy in arb_policy(),
        card in prop::array::uniform4(0.0f64..1.2),
        now_ms in 100_000u64..400_000,
        calm_for in prop::option::of(0u64..200_000),
        used_frac in 0.0f64..1.0,
    ) {
        let host_used = HostCost {
            cpus: policy.reserve.cpus * used_frac,
            memory_bytes: (policy.reserve.memory_bytes as f64 * used_frac) as u64,
        };
        let i = Inputs { now_ms, card, tasks: &tasks, host_used, calm_since_ms: calm_for.map(|c| now_ms.saturating_sub(c)), policy: &policy };
        let d = decide(&i);
        // The same inputs always give the same decision.
        prop_assert_eq!(&d, &decide(&i));
        let mut to_host = HostCost::default();
        for m in &d.moves {
            let t = tasks.iter().find(|t| t.name == m.task).expect("a move names a task");
            // Pinned tasks never move; a move goes to the other side.
            prop_assert!(t.pin.is_none(), "pinned {} moved", t.name);
            prop_assert_eq!(m.to, t.side.other());
            // No direction change within the dwell.
            if let Some(at) = t.last_move_ms {
                prop_assert!(now_ms - at >= policy.dwell_ms, "{} moved again after {} ms", t.name, now_ms - at);
            }
            if m.to == Side::Host {
                to_host.cpus += t.host_cost.cpus;
                to_host.memory_bytes += t.host_cost.memory_bytes;
            }
        }
        // The host reserve is never exceeded.
        prop_assert!(host_used.cpus + to_host.cpus <= policy.reserve.cpus + 1e-9);
        prop_assert!(host_used.memory_bytes + to_host.memory_bytes <= policy.reserve.memory_bytes);
        let over = Resource::ALL.iter().any(|r| card[r.index()] > policy.thresholds[r.index()]);
        if over && feasible(&i) {
            // When a feasible set exists, the card ends under every threshold.
            prop_assert_eq!(d.reason, Reason::Relieve);
            for r in Resource::ALL {
                prop_assert!(d.predicted[r.index()] <= policy.thresholds[r.index()] + 1e-9);
            }
        }
        if d.moves.iter().any(|m| m.to == Side::Card) {
            // Coming back: one at a time, never over threshold minus hysteresis.
            prop_assert_eq!(d.moves.len(), 1);
            prop_assert!(!over);
            for r in Resource::ALL {
                prop_assert!(d.predicted[r.index()] <= policy.thresholds[r.index()] - policy.hysteresis + 1e-9);
            }
        }
    }

    #[test]
    fn the_fewest_vms_move(
        tasks in arb_tasks(),
        policy in arb_policy(),
        card in prop::array::uniform4(0.0f64..1.2),
    ) {
        let i = Inputs { now_ms: 1_000_000, card, tasks: &tasks, host_used: HostCost::default(), calm_since_ms: None, policy: &policy };
        let d = decide(&i);
        if d.reason == Reason::Relieve {
            // No smaller set would do: every set of one fewer VMs (from the
            // same movable ones) leaves a resource over or the reserve exceeded.
            let k = d.moves.len();
            let fewer = Inputs { tasks: &tasks, ..i.clone() };
            let cands: Vec<&Task> = tasks.iter().filter(|t| t.side == Side::Card && t.pin.is_none()).collect();
            for mask in 1u32..(1 << cands.len()) {
                if (mask.count_ones() as usize) < k {
                    let set: Vec<&Task> = (0..cands.len()).filter(|b| mask & (1 << b) != 0).map(|b| cands[b]).collect();
                    let under = Resource::ALL.iter().all(|r| {
                        set.iter().fold(fewer.card[r.index()], |a, t| (a - t.card_cost[r.index()]).max(0.0)) <= policy.thresholds[r.index()]
                    });
                    let cpus: f64 = set.iter().map(|t| t.host_cost.cpus).sum();
                    let mem: u64 = set.iter().map(|t| t.host_cost.memory_bytes).sum();
                    prop_assert!(!(under && cpus <= policy.reserve.cpus + 1e-9 && mem <= policy.reserve.memory_bytes), "a set of {} would do", mask.count_ones());
                }
            }
        }
    }
}
