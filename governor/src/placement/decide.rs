//! The placement rules.
//!
//! Over a threshold, MC VMs leave the card: the fewest that bring every
//! resource back under its threshold, of those the cheapest on the host
//! (the smallest share of the MC reserve), ties by the configured order; the
//! reserve is never exceeded. Calm for the dwell time, they come back one
//! at a time, the one that fits best first (the largest that still leaves
//! every resource under its threshold minus the hysteresis), so the card is
//! filled without overshooting. A task moved within the dwell does not move
//! again, and pinned tasks never move.

use super::{Decision, HostCost, Inputs, Move, PerResource, Policy, Reason, Resource, Side, Task};

/// The least relief (a fraction of a resource's capacity) worth a move when
/// no set gets the card under: moving a VM that frees less than this only
/// churns (a VM just arrived, whose cost is not measured yet, reads as 0).
pub const MIN_RELIEF: f64 = 0.01;

/// Most card-side candidates searched exhaustively (2^16 subsets); beyond
/// this the cheapest are searched (management tasks are a handful).
const MAX_SEARCH: usize = 16;

/// Since when the card has been calm, given the previous value and the use
/// measured now: kept while calm, started now when it becomes calm, cleared
/// when it is not. The caller keeps it between ticks.
pub fn calm_since(prev: Option<u64>, now_ms: u64, card: &PerResource, policy: &Policy) -> Option<u64> {
    if calm(card, policy) {
        Some(prev.unwrap_or(now_ms))
    } else {
        None
    }
}

/// Every resource at or under its threshold.
fn holds(card: &PerResource, policy: &Policy) -> bool {
    Resource::ALL.iter().all(|r| card[r.index()] <= policy.thresholds[r.index()])
}

/// Every resource at or under its threshold minus the hysteresis.
fn calm(card: &PerResource, policy: &Policy) -> bool {
    Resource::ALL.iter().all(|r| card[r.index()] <= policy.thresholds[r.index()] - policy.hysteresis)
}

fn may_move(t: &Task, now_ms: u64, policy: &Policy) -> bool {
    t.pin.is_none() && t.last_move_ms.is_none_or(|at| now_ms.saturating_sub(at) >= policy.dwell_ms)
}

fn fits_reserve(used: &HostCost, add: &HostCost, reserve: &HostCost) -> bool {
    used.cpus + add.cpus <= reserve.cpus + 1e-9
        && used.memory_bytes.saturating_add(add.memory_bytes) <= reserve.memory_bytes
}

/// A task's host cost as a share of the reserve: what "cheapest" compares.
fn share(c: &HostCost, reserve: &HostCost) -> f64 {
    let cpu = if reserve.cpus > 0.0 { c.cpus / reserve.cpus } else { c.cpus };
    let mem = if reserve.memory_bytes > 0 { c.memory_bytes as f64 / reserve.memory_bytes as f64 } else { 0.0 };
    cpu + mem
}

fn sum_host(tasks: &[&Task]) -> HostCost {
    tasks.iter().fold(HostCost::default(), |a, t| HostCost {
        cpus: a.cpus + t.host_cost.cpus,
        memory_bytes: a.memory_bytes.saturating_add(t.host_cost.memory_bytes),
    })
}

fn minus(card: &PerResource, tasks: &[&Task]) -> PerResource {
    let mut p = *card;
    for t in tasks {
        for r in Resource::ALL {
            p[r.index()] = (p[r.index()] - t.card_cost[r.index()]).max(0.0);
        }
    }
    p
}

fn pct(v: f64) -> String {
    format!("{:.0}%", v * 100.0)
}

/// The resources over their thresholds, for the explanation.
fn over(card: &PerResource, policy: &Policy) -> String {
    let v: Vec<String> = Resource::ALL
        .iter()
        .filter(|r| card[r.index()] > policy.thresholds[r.index()])
        .map(|r| format!("{} {} > {}", r.name(), pct(card[r.index()]), pct(policy.thresholds[r.index()])))
        .collect();
    v.join(", ")
}

fn moves(tasks: &[&Task], to: Side) -> Vec<Move> {
    tasks.iter().map(|t| Move { task: t.name.clone(), to }).collect()
}

fn names(tasks: &[&Task]) -> String {
    tasks.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ")
}

/// The placement decision for these inputs.
pub fn decide(i: &Inputs<'_>) -> Decision {
    let p = i.policy;
    if !holds(&i.card, p) {
        return relieve(i);
    }
    let stay = |reason, explain: String| Decision { moves: Vec::new(), reason, predicted: i.card, explain };
    if !i.tasks.iter().any(|t| t.side == Side::Host && t.pin.is_none()) {
        return stay(Reason::Holds, "the card is under every threshold".into());
    }
    let calm_for = match i.calm_since_ms {
        Some(since) if calm(&i.card, p) => i.now_ms.saturating_sub(since),
        _ => return stay(Reason::Holds, "the card is under every threshold, not yet by the hysteresis margin".into()),
    };
    if calm_for < p.dwell_ms {
        return stay(
            Reason::Settling,
            format!("calm for {} ms of the {} ms dwell before VMs come back", calm_for, p.dwell_ms),
        );
    }
    come_back(i)
}

/// Over a threshold: move card-side VMs to the host.
fn relieve(i: &Inputs<'_>) -> Decision {
    let p = i.policy;
    let mut cands: Vec<&Task> = i.tasks.iter().filter(|t| t.side == Side::Card && may_move(t, i.now_ms, p)).collect();
    // Cheapest first, then the configured order, then the name: the search
    // below meets sets in this order, so its first find is the one wanted.
    cands.sort_by(|a, b| {
        share(&a.host_cost, &p.reserve)
            .total_cmp(&share(&b.host_cost, &p.reserve))
            .then(b.order.cmp(&a.order))
            .then(a.name.cmp(&b.name))
    });
    cands.truncate(MAX_SEARCH);
    let why = over(&i.card, p);
    if cands.is_empty() {
        return Decision {
            moves: Vec::new(),
            reason: Reason::NothingMovable,
            predicted: i.card,
            explain: format!("over threshold ({why}), but every card-side MC VM is pinned or within its dwell"),
        };
    }
    let n = cands.len();
    let mut best: Option<(usize, f64, Vec<&Task>)> = None;
    let mut blocked_by_reserve = false;
    for mask in 1u32..(1u32 << n) {
        let k = mask.count_ones() as usize;
        if best.as_ref().is_some_and(|(bk, _, _)| k > *bk) {
            continue;
        }
        let set: Vec<&Task> = (0..n).filter(|b| mask & (1 << b) != 0).map(|b| cands[b]).collect();
        if !holds(&minus(&i.card, &set), p) {
            continue;
        }
        let host = sum_host(&set);
        if !fits_reserve(&i.host_used, &host, &p.reserve) {
            blocked_by_reserve = true;
            continue;
        }
        let cost = share(&host, &p.reserve);
        let better = match &best {
            None => true,
            Some((bk, bc, bset)) => {
                k < *bk || (k == *bk && (cost < *bc - 1e-12 || (cost <= *bc + 1e-12 && key(&set) < key(bset))))
            }
        };
        if better {
            best = Some((k, cost, set));
        }
    }
    if let Some((_, _, set)) = best {
        let predicted = minus(&i.card, &set);
        return Decision {
            explain: format!("over threshold ({why}): {} to the host brings every resource under", names(&set)),
            moves: moves(&set, Side::Host),
            reason: Reason::Relieve,
            predicted,
        };
    }
    if blocked_by_reserve {
        return Decision {
            moves: Vec::new(),
            reason: Reason::HostReserve,
            predicted: i.card,
            explain: format!(
                "over threshold ({why}); the MC VMs that would bring it under exceed the host reserve ({:.2} CPUs, {} MiB, {:.2} CPUs and {} MiB in use)",
                p.reserve.cpus,
                p.reserve.memory_bytes >> 20,
                i.host_used.cpus,
                i.host_used.memory_bytes >> 20
            ),
        };
    }
    // No set gets under every threshold: move what helps, cheapest first,
    // while it fits the reserve.
    let mut set: Vec<&Task> = Vec::new();
    for t in cands {
        let helps = Resource::ALL
            .iter()
            .any(|r| i.card[r.index()] > p.thresholds[r.index()] && t.card_cost[r.index()] >= MIN_RELIEF);
        let mut with = set.clone();
        with.push(t);
        if helps && fits_reserve(&i.host_used, &sum_host(&with), &p.reserve) {
            set = with;
        }
    }
    let predicted = minus(&i.card, &set);
    Decision {
        explain: if set.is_empty() {
            format!("over threshold ({why}); no movable MC VM uses an exceeded resource within the host reserve")
        } else {
            format!("over threshold ({why}) even without any MC VM; {} to the host relieve what they can", names(&set))
        },
        moves: moves(&set, Side::Host),
        reason: Reason::RelievePartly,
        predicted,
    }
}

/// Tie-break of equal-size, equal-cost sets: the configured order, then names.
fn key(set: &[&Task]) -> Vec<(u32, String)> {
    let mut k: Vec<(u32, String)> = set.iter().map(|t| (u32::MAX - t.order, t.name.clone())).collect();
    k.sort();
    k
}

/// Calm for the dwell: bring one host-side VM back, the best fit.
fn come_back(i: &Inputs<'_>) -> Decision {
    let p = i.policy;
    let mut best: Option<(f64, &Task, PerResource)> = None;
    for t in i.tasks.iter().filter(|t| t.side == Side::Host && may_move(t, i.now_ms, p)) {
        let mut after = i.card;
        for r in Resource::ALL {
            after[r.index()] += t.card_cost[r.index()];
        }
        if !calm(&after, p) {
            continue;
        }
        // How full the fullest resource would be against its margin: the
        // higher, the better the fit.
        let fill = Resource::ALL
            .iter()
            .map(|r| after[r.index()] / (p.thresholds[r.index()] - p.hysteresis).max(1e-9))
            .fold(0.0, f64::max);
        let better = match &best {
            None => true,
            Some((bf, bt, _)) => {
                fill > *bf + 1e-12 || (fill >= *bf - 1e-12 && (t.order, &t.name) < (bt.order, &bt.name))
            }
        };
        if better {
            best = Some((fill, t, after));
        }
    }
    match best {
        Some((_, t, after)) => Decision {
            moves: vec![Move { task: t.name.clone(), to: Side::Card }],
            reason: Reason::ComeBack,
            predicted: after,
            explain: format!("calm for the {} ms dwell: {} comes back to the card (best fit)", p.dwell_ms, t.name),
        },
        None => Decision {
            moves: Vec::new(),
            reason: Reason::NothingFits,
            predicted: i.card,
            explain:
                "calm, but no host-side MC VM fits back under the thresholds minus the hysteresis (or may move yet)"
                    .into(),
        },
    }
}
