//! The placement engine end to end: `governor run` with MC VMs on card-sim
//! (real KVM guests in per-VM child cgroups of the card) and on the host
//! (vmm processes in the MC subtree), real load on the card, decisions
//! read back over the control socket and from the audit log.

use std::time::Duration;

use governor::api::Request;
use governor::placement::{Reason, Side};
use integration_tests::placement::{System, SystemOptions};
use integration_tests::*;
use vmm::host::api::AgentOp;

fn check_root_kvm() {
    require_root();
    require_kvm();
}

/// A busy agent on the card pushes the card's CPU over its threshold: the
/// decision moves that VM (the only one whose measured cost relieves the
/// card) to the host within 3 ticks, the card falls back under the
/// threshold, the agent's counters continue; when it goes idle it comes
/// back after the dwell time, state intact.
#[test]
fn cpu_load_moves_the_busy_mc_vm_out_and_calm_brings_it_back() {
    check_root_kvm();
    let before = Inventory::take();
    {
        let mut s = System::start(&SystemOptions { thresholds: "cpu = 0.6".into(), ..SystemOptions::default() });
        let p = s.placement();
        assert!(p.tasks.iter().all(|t| t.side == Side::Card), "all start on the calm card: {p:?}");
        assert_eq!(s.decisions(0)[0].reason, Reason::Initial);
        let tick0 = s.decisions(0).last().map_or(0, |d| d.tick);

        s.agent("log", AgentOp::Auto, 2000);
        s.wait("log moved to the host", Duration::from_secs(10), |s| s.side("log") == Side::Host);
        let ds = s.decisions(tick0);
        for d in &ds {
            eprintln!("tick {} {:?}: {}", d.tick, d.reason, d.explain);
        }
        let over = ds.iter().find(|d| d.card.iter().any(|r| r.used > r.threshold)).expect("a tick saw the crossing");
        let moved = ds.iter().find(|d| !d.reports.is_empty()).expect("the move's record");
        eprintln!("crossing seen at tick {}, moved at tick {}: {}", over.tick, moved.tick, moved.explain);
        assert!(moved.tick - over.tick <= 2, "moved within 3 ticks of the crossing");
        assert_eq!(moved.reason, Reason::Relieve);
        assert_eq!(moved.moves.len(), 1, "the fewest sufficient: {:?}", moved.moves);
        assert!(moved.reports[0].ok, "{:?}", moved.reports[0]);
        for t in ["monitor", "qos"] {
            assert_eq!(s.side(t), Side::Card, "{t} stays");
        }
        // The card falls back under the threshold.
        s.wait("the card under its CPU threshold", Duration::from_secs(5), |s| s.card_use("cpu") < 0.6);
        // The agent goes on where it was: its counters are consistent
        // (every auto step counted once) and still growing on the host.
        let a = s.agent("log", AgentOp::Counters, 0);
        std::thread::sleep(Duration::from_millis(300));
        let b = s.agent("log", AgentOp::Auto, 0);
        assert!(b.log_seq > a.log_seq, "stepping on the host: {a:?} -> {b:?}");
        assert_eq!(b.work, b.steps * 2000, "no step lost or counted twice: {b:?}");
        // Idle now: after the dwell it comes back, with exactly that state.
        let t = s.wait("log back on the card", Duration::from_secs(15), |s| s.side("log") == Side::Card);
        eprintln!("log came back after {t:?}");
        let c = s.agent("log", AgentOp::Counters, 0);
        assert_eq!((c.work, c.log_seq, c.steps), (b.work, b.log_seq, b.steps), "state kept both ways");
        let back =
            s.decisions(moved.tick).into_iter().find(|d| d.reason == Reason::ComeBack).expect("come-back record");
        assert!(back.time_ms - moved.time_ms >= 3000, "not before the dwell");
        // The audit log on disk holds the same records.
        let on_disk = governor::placement::audit::read(&s.run.path().join("decisions.jsonl")).expect("audit log");
        assert!(on_disk.iter().any(|d| d.reason == Reason::Relieve && !d.reports.is_empty()));
        assert!(on_disk.iter().any(|d| d.reason == Reason::ComeBack));
        // The MC subtree is watched by the telemetry, role mc.
        let st = s.call(&Request::Status).status.expect("status");
        let mc = st.vms.iter().find(|v| v.name == "mc").expect("the MC subtree is watched");
        assert_eq!(mc.role, "mc");
    }
    let left = Inventory::take().left_since(&before);
    assert!(left.is_empty(), "left: {left}");
}
