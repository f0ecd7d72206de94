use mc_proto::signals::{Health, Reason, VmSignals, FLAG_EXISTS, FLAG_MEM_LIMIT};
use proptest::prelude::*;

use super::*;

fn healthy(cpu_ns: u64) -> VmSignals {
    VmSignals {
        slot: 0,
        flags: FLAG_EXISTS | FLAG_MEM_LIMIT,
        cpu_ns_total: cpu_ns,
        quiet_ms: 0,
        cpu_ppm: 100_000,
        runq_p99_us: 200,
        oom_kills_total: 0,
        working_set: 32 << 20,
        mem_limit: 128 << 20,
        drops_total: 0,
    }
}

/// Run ticks from `tick` on, returning the last state and every change.
fn run(states: &mut VmState, signals: &[VmSignals], from: u32) -> Vec<(u32, Health, Reason)> {
    let p = Policy::default();
    let mut out = Vec::new();
    for (i, s) in signals.iter().enumerate() {
        let (next, change) = assess(states, s, from + i as u32, &p);
        *states = next;
        if let Some(c) = change {
            out.push((c.tick, c.health, c.reason));
        }
    }
    out
}

#[test]
fn a_new_vm_starts_then_runs() {
    let mut st = VmState::default();
    let ch = run(&mut st, &[healthy(0), healthy(0), healthy(5_000_000)], 1);
    assert_eq!(ch, vec![(1, Health::Starting, Reason::Booting), (3, Health::Running, Reason::Healthy)]);
    // Still no CPU after the grace: judged as any other VM (here running).
    let mut st = VmState::default();
    let quiet: Vec<VmSignals> = (0..6).map(|_| healthy(0)).collect();
    let ch = run(&mut st, &quiet, 1);
    assert_eq!(ch.last(), Some(&(6, Health::Running, Reason::Healthy)));
}

#[test]
fn no_sign_of_life_for_the_stall_time_is_stalled() {
    let mut st = VmState::default();
    let mut s = healthy(1);
    run(&mut st, &[s], 1);
    s.quiet_ms = 9_999;
    assert!(run(&mut st, &[s], 2).is_empty(), "not yet");
    s.quiet_ms = 10_000;
    assert_eq!(run(&mut st, &[s], 3), vec![(3, Health::Stalled, Reason::NoProgress)]);
    s.quiet_ms = 0;
    assert_eq!(run(&mut st, &[s], 4), vec![(4, Health::Running, Reason::Healthy)], "alive again");
}

#[test]
fn an_oom_kill_degrades_for_the_hold_time_then_calm_brings_it_back() {
    let p = Policy::default();
    let mut st = VmState::default();
    let mut s = healthy(1);
    run(&mut st, &[s], 1);
    s.oom_kills_total = 1;
    assert_eq!(run(&mut st, &[s], 2), vec![(2, Health::Degraded, Reason::OomKilled)]);
    let held: Vec<VmSignals> = (0..p.oom_hold_ticks - 1).map(|_| s).collect();
    assert!(run(&mut st, &held, 3).is_empty(), "held degraded");
    // Hold over, then `recover_ticks` calm ticks before running again.
    let calm: Vec<VmSignals> = (0..p.recover_ticks).map(|_| s).collect();
    let ch = run(&mut st, &calm, 2 + p.oom_hold_ticks);
    assert_eq!(ch, vec![(2 + p.oom_hold_ticks + p.recover_ticks - 1, Health::Running, Reason::Healthy)]);
}

#[test]
fn pressure_starvation_and_drops_degrade_with_their_reason() {
    let p = Policy::default();
    type Make = fn(&mut VmSignals);
    let cases: [(Make, Reason); 3] = [
        (|s| s.working_set = s.mem_limit, Reason::MemoryPressure),
        (|s| s.runq_p99_us = 80_000, Reason::RunqDelay),
        (|s| s.drops_total += 5000, Reason::Drops),
    ];
    for (make, reason) in cases {
        let mut st = VmState::default();
        let mut s = healthy(1);
        run(&mut st, &[s], 1);
        make(&mut s);
        let (next, c) = assess(&st, &s, 2, &p);
        assert_eq!(c.map(|c| (c.health, c.reason)), Some((Health::Degraded, reason)));
        assert_eq!(next.health(), Some(Health::Degraded));
    }
    // No limit: a large working set is not pressure.
    let mut s = healthy(1);
    s.flags = FLAG_EXISTS;
    s.working_set = s.mem_limit;
    let mut st = VmState::default();
    assert_eq!(run(&mut st, &[s], 1), vec![(1, Health::Running, Reason::Healthy)]);
}

#[test]
fn a_gone_vm_is_stopped_and_a_batch_reports_only_changes() {
    let p = Policy::default();
    let mut states = [VmState::default(); 4];
    let mut batch: Vec<VmSignals> = (0..4).map(|i| VmSignals { slot: i, ..healthy(1) }).collect();
    batch.push(VmSignals { slot: 9, ..healthy(1) });
    let mut changes = Vec::new();
    let bad = tick(&mut states, batch.iter().copied(), 1, &p, |c| changes.push(c));
    assert_eq!((bad, changes.len()), (1, 4), "slot 9 is outside the table");
    changes.clear();
    batch[2].flags = 0;
    tick(&mut states, batch.iter().copied(), 2, &p, |c| changes.push(c));
    assert_eq!(changes.len(), 1);
    assert_eq!((changes[0].slot, changes[0].health, changes[0].reason), (2, Health::Stopped, Reason::Gone));
}

fn signals() -> impl Strategy<Value = VmSignals> {
    (
        any::<bool>(),
        any::<bool>(),
        0u64..3,
        prop::sample::select(vec![0u32, 1, 5_000, 9_999, 10_000, 20_000]),
        0u32..100_000,
        0u32..3,
        0u64..(256 << 20),
        0u64..(256 << 20),
        0u64..10_000,
    )
        .prop_map(|(exists, limit, cpu, quiet, runq, ooms, ws, lim, drops)| VmSignals {
            slot: 0,
            flags: if exists { FLAG_EXISTS } else { 0 } | if limit { FLAG_MEM_LIMIT } else { 0 },
            cpu_ns_total: cpu,
            quiet_ms: quiet,
            cpu_ppm: 0,
            runq_p99_us: runq,
            oom_kills_total: ooms,
            working_set: ws,
            mem_limit: lim,
            drops_total: drops,
        })
}

proptest! {
    /// Over any run of signals: every state has a reason that explains it;
    /// `stopped` exactly when the VM is gone; a live VM quiet for the stall
    /// time is `stalled`; a change is reported exactly when the state or
    /// its reason changes; the same inputs give the same outputs.
    #[test]
    fn the_monitor_is_consistent(run in proptest::collection::vec(signals(), 1..40)) {
        let p = Policy::default();
        let mut st = VmState::default();
        let mut again = VmState::default();
        for (i, s) in run.iter().enumerate() {
            let t = i as u32 + 1;
            let (next, change) = assess(&st, s, t, &p);
            let (next2, change2) = assess(&again, s, t, &p);
            prop_assert_eq!(next, next2);
            prop_assert_eq!(change, change2);
            let h = next.health().expect("a state");
            let r = Reason::from_u8(next.reason).expect("a reason");
            prop_assert!(r.explains(h), "{:?} does not explain {:?}", r, h);
            prop_assert_eq!(h == Health::Stopped, s.flags & FLAG_EXISTS == 0);
            if s.flags & FLAG_EXISTS != 0 && s.quiet_ms >= p.stall_ms {
                prop_assert_eq!(h, Health::Stalled);
            }
            let differs = st.health != next.health || st.reason != next.reason;
            prop_assert_eq!(change.is_some(), differs);
            if let Some(c) = change {
                let bytes = c.encode();
                prop_assert_eq!(mc_proto::signals::HealthChange::decode(&bytes), Some(c));
            }
            st = next;
            again = next2;
        }
    }
}

#[test]
fn the_time_bounds_hold_at_any_tick() {
    let at_1s = Policy::for_tick_ms(1000);
    assert_eq!((at_1s.start_ticks, at_1s.oom_hold_ticks), (5, 30));
    let at_200ms = Policy::for_tick_ms(200);
    assert_eq!((at_200ms.start_ticks, at_200ms.oom_hold_ticks), (25, 150), "the same 5 s and 30 s");
    assert_eq!(Policy::for_tick_ms(60_000).oom_hold_ticks, 1, "at least one tick");
    assert_eq!(at_200ms.stall_ms, at_1s.stall_ms, "quiet time is measured in ms already");
}
