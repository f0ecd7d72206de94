use mc_proto::qos::{Dir, QosChange, QosReason, QosSignals, QOS_ADAPTIVE, QOS_EXISTS};
use proptest::prelude::*;

use super::*;

const MBIT: u64 = 125_000;

fn vm(slot: u32, egress: u64, ingress: u64) -> QosSignals {
    QosSignals {
        slot,
        flags: QOS_EXISTS | QOS_ADAPTIVE,
        rate: [egress, ingress],
        base: [0, 0],
        min_rate: 10 * MBIT,
        cpu_ppm: 50_000,
        runq_p99_us: 100,
    }
}

struct Agent {
    g: Global,
    st: Vec<VmQos>,
    p: Policy,
}

impl Agent {
    fn new() -> Agent {
        Agent { g: Global::NEW, st: vec![VmQos::NEW; 8], p: Policy::default() }
    }
    fn tick(&mut self, batch: &[QosSignals], card: (u32, u32)) -> Vec<QosChange> {
        let mut out = Vec::new();
        tick(&mut self.g, &mut self.st, batch, card, &self.p, |c| out.push(c));
        out
    }
}

#[test]
fn the_biggest_mover_through_a_full_card_is_narrowed_then_restored_when_calm() {
    let mut a = Agent::new();
    // Card at 120% of a 60% threshold; VM 1 receives 400 Mbit/s, VM 0 sends 50.
    let busy = [vm(0, 50 * MBIT, 0), vm(1, 0, 400 * MBIT)];
    let c = a.tick(&busy, (12_000, 6000));
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!((c[0].slot, c[0].dir, c[0].reason, c[0].detail), (1, Dir::Ingress, QosReason::CardNetwork, 12_000));
    // 400 x 0.6/1.2 x 0.9 = 180 Mbit/s.
    assert_eq!(c[0].rate, 180 * MBIT);
    // Still over on the next tick: it settles first (no second narrowing).
    assert!(a.tick(&busy, (12_000, 6000)).is_empty());
    // While it pushes against its limit and the card sits under the
    // threshold because of it, it stays narrowed.
    let pushing = [vm(0, 50 * MBIT, 0), vm(1, 0, 179 * MBIT)];
    for _ in 0..10 {
        assert!(a.tick(&pushing, (5500, 6000)).is_empty());
    }
    // Load gone: three calm ticks, then back.
    let calm = [vm(0, 50 * MBIT, 0), vm(1, 0, MBIT)];
    assert!(a.tick(&calm, (1000, 6000)).is_empty());
    assert!(a.tick(&calm, (1000, 6000)).is_empty());
    let c = a.tick(&calm, (1000, 6000));
    assert_eq!(
        c,
        vec![QosChange { slot: 1, dir: Dir::Ingress, reason: QosReason::Calm, tick: 15, detail: 3, rate: 0 }]
    );
    assert_eq!(a.st[1], VmQos::NEW);
}

#[test]
fn narrowing_goes_step_by_step_down_to_the_floor_and_then_to_the_next_vm() {
    let mut a = Agent::new();
    let mut rates = Vec::new();
    // The card stays over whatever is done (other traffic): each settled
    // tick narrows further, never below the floor; then VM 0 is next.
    for _ in 0..40 {
        let batch = [vm(0, 30 * MBIT, 0), vm(1, 100 * MBIT, 0)];
        for c in a.tick(&batch, (9000, 6000)) {
            rates.push((c.slot, c.rate));
        }
    }
    // VM 1 (100 Mbit/s): 100 x 2/3 x 0.9 = 60 Mbit/s; still over, it
    // moves on from its limit: 36, 21.6, 12.96, then its 10 Mbit/s floor;
    // then VM 0 (30 Mbit/s) the same way: 18, 10.8, 10.
    let m = |mbit: f64| (mbit * MBIT as f64) as u64;
    let want = [
        (1, m(60.0)),
        (1, m(36.0)),
        (1, m(21.6)),
        (1, m(12.96)),
        (1, m(10.0)),
        (0, m(18.0)),
        (0, m(10.8)),
        (0, m(10.0)),
    ];
    assert_eq!(rates, want);
}

#[test]
fn a_vm_without_an_adaptive_policy_is_never_touched() {
    let mut a = Agent::new();
    let fixed = QosSignals { flags: QOS_EXISTS, min_rate: 0, ..vm(0, 900 * MBIT, 0) };
    for _ in 0..10 {
        assert!(a.tick(&[fixed], (20_000, 6000)).is_empty());
    }
}

#[test]
fn a_configured_limit_bounds_the_narrowing_and_comes_back_on_restore() {
    let mut a = Agent::new();
    let limited = QosSignals { base: [100 * MBIT, 0], ..vm(0, 95 * MBIT, 0) };
    let c = a.tick(&[limited], (8000, 6000));
    assert_eq!(c[0].rate, 8_015_625, "95 Mbit/s x 0.75 x 0.9 = 64.125 Mbit/s");
    assert!(c[0].within(&limited));
    // A rate already under the target of a configured limit it honours.
    let mut b = Agent::new();
    let at_floor = QosSignals { base: [10 * MBIT, 0], ..vm(0, 10 * MBIT, 0) };
    assert!(b.tick(&[at_floor], (8000, 6000)).is_empty(), "the configured limit is already the floor");
}

#[test]
fn the_noisy_neighbour_is_halved_and_restored_when_the_victim_recovers() {
    let mut a = Agent::new();
    let victim = QosSignals { runq_p99_us: 80_000, ..vm(0, MBIT, MBIT) };
    let noisy = QosSignals { cpu_ppm: 900_000, ..vm(1, 200 * MBIT, 20 * MBIT) };
    let quiet = QosSignals { cpu_ppm: 100_000, ..vm(2, 300 * MBIT, 0) };
    let c = a.tick(&[victim, noisy, quiet], (1000, 6000));
    assert_eq!(c.len(), 1);
    assert_eq!(
        (c[0].slot, c[0].dir, c[0].reason, c[0].rate, c[0].detail),
        (1, Dir::Egress, QosReason::NoisyNeighbour, 100 * MBIT, 80_000)
    );
    let better = QosSignals { runq_p99_us: 2000, ..victim };
    let mut restored = Vec::new();
    for _ in 0..5 {
        restored.extend(a.tick(&[better, noisy, quiet], (1000, 6000)));
    }
    assert_eq!(restored.len(), 1, "{restored:?}");
    assert_eq!((restored[0].slot, restored[0].reason), (1, QosReason::Calm));
}

#[test]
fn a_vm_whose_policy_goes_away_gets_its_limit_back_at_once() {
    let mut a = Agent::new();
    assert_eq!(a.tick(&[vm(0, 100 * MBIT, 0)], (9000, 6000)).len(), 1);
    let plain = QosSignals { flags: QOS_EXISTS, min_rate: 0, ..vm(0, 100 * MBIT, 0) };
    let c = a.tick(&[plain], (9000, 6000));
    assert_eq!((c.len(), c[0].reason), (1, QosReason::Calm));
}

#[test]
fn slots_past_the_table_are_counted_not_used() {
    let mut g = Global::NEW;
    let mut st = [VmQos::NEW; 2];
    let n = tick(&mut g, &mut st, &[vm(5, 100 * MBIT, 0)], (9000, 6000), &Policy::default(), |_| panic!("no change"));
    assert_eq!(n, 1);
}

fn arb_vm() -> impl Strategy<Value = QosSignals> {
    (0u32..6, any::<bool>(), 0u64..2000, 0u64..2000, 0u64..3, 1u64..50, 0u32..1_000_000, 0u32..100_000).prop_map(
        |(slot, adaptive, e, i, base_sel, min, cpu, runq)| {
            let base = match base_sel {
                0 => 0,
                1 => 100 * MBIT,
                _ => 500 * MBIT,
            };
            QosSignals {
                slot,
                flags: QOS_EXISTS | if adaptive { QOS_ADAPTIVE } else { 0 },
                rate: [e * MBIT, i * MBIT],
                base: [base, 0],
                min_rate: min * MBIT,
                cpu_ppm: cpu,
                runq_p99_us: runq,
            }
        },
    )
}

proptest! {
    /// Over random ticks: every narrowing is within the VM's policy (at or
    /// above its floor, below its configured limit, only adaptive VMs), at
    /// most one narrowing a tick and none within the settle time, a restore
    /// only of a narrowed limit, and the same inputs give the same changes.
    #[test]
    fn changes_stay_within_policy(
        ticks in prop::collection::vec((prop::collection::vec(arb_vm(), 0..6), 0u32..20_000, 1u32..10_000), 1..40)
    ) {
        let mut a = Agent::new();
        let mut twin = Agent::new();
        let mut narrowed = [[false; 2]; 8];
        let mut last_narrow: Option<u32> = None;
        for (t, (batch, use_bp, thr)) in ticks.iter().enumerate() {
            // One record per slot, as the host sends.
            let mut seen = [false; 8];
            let batch: Vec<QosSignals> = batch.iter().copied().filter(|s| !std::mem::replace(&mut seen[s.slot as usize], true)).collect();
            let c = a.tick(&batch, (*use_bp, *thr));
            prop_assert_eq!(&c, &twin.tick(&batch, (*use_bp, *thr)));
            let narrowings: Vec<_> = c.iter().filter(|c| c.reason != QosReason::Calm).collect();
            prop_assert!(narrowings.len() <= 1);
            for ch in &c {
                let s = batch.iter().find(|s| s.slot == ch.slot).expect("asked about");
                let n = &mut narrowed[ch.slot as usize][ch.dir.index()];
                if ch.reason == QosReason::Calm {
                    prop_assert!(*n, "restore of a limit never narrowed");
                    *n = false;
                } else {
                    prop_assert!(ch.within(s), "{:?} outside {:?}", ch, s);
                    if let Some(l) = last_narrow {
                        prop_assert!(t as u32 + 1 - l >= Policy::default().settle_ticks);
                    }
                    last_narrow = Some(t as u32 + 1);
                    *n = true;
                }
            }
        }
    }
}

#[test]
fn a_second_narrowing_takes_the_busy_direction_again() {
    let mut a = Agent::new();
    let s = |i: u64| QosSignals { min_rate: 2_500_000, ..vm(0, 500_000, i) };
    let c = a.tick(&[s(31_000_000)], (2525, 2000));
    assert_eq!(c[0].dir, Dir::Ingress, "{c:?}");
    a.tick(&[s(25_000_000)], (2134, 2000));
    a.tick(&[s(25_000_000)], (2134, 2000));
    let c = a.tick(&[s(25_000_000)], (2134, 2000));
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].dir, Dir::Ingress, "{c:?}");
}
