//! QoS flow-limit policy done by the qos MC VM (claim 14) with real load:
//! a user VM's traffic crosses the card (iperf3 through a card-sim
//! forward into the VM's namespace), fills the card's network past its
//! threshold, and the qos agent narrows that VM's limit; the governor
//! applies it to the eBPF policer. The qos VM moves from the card to the
//! host in the middle: the limit in force does not change, and the agent,
//! with its state carried by the move, restores the limit once the load
//! stops. Every change is in the audit log with its reason.

use std::process::Stdio;
use std::time::{Duration, Instant};

use governor::api::Request;
use governor::placement::Side;
use governor::qos::Direction;
use integration_tests::placement::{System, SystemOptions};
use integration_tests::*;
use serde_json::Value;

fn ingress_limit(s: &System, vm: &str) -> Option<u64> {
    let r = s.call(&Request::Limits);
    r.limits.expect("limits").iter().find(|l| l.vm == vm && l.direction == Direction::Ingress).map(|l| l.rate_bps)
}

fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> (T, Duration) {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return (v, t0.elapsed());
        }
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The receiver's rate (bit/s) over the intervals of an iperf3 JSON report
/// that lie within `from..to` seconds.
fn iperf_rate(report: &Value, from: f64, to: f64) -> f64 {
    let (mut bytes, mut secs) = (0.0, 0.0);
    for iv in report["intervals"].as_array().expect("intervals") {
        let (st, b, d) = (
            iv["sum"]["start"].as_f64().unwrap_or(0.0),
            iv["sum"]["bytes"].as_f64().unwrap_or(0.0),
            iv["sum"]["seconds"].as_f64().unwrap_or(0.0),
        );
        if st >= from && st + d <= to {
            bytes += b;
            secs += d;
        }
    }
    bytes * 8.0 / secs.max(1e-9)
}

#[test]
fn the_qos_vm_narrows_a_vm_filling_the_card_and_restores_it_across_a_move() {
    require_root();
    require_kvm();
    require_tool("iperf3");
    let pair = VethPair::new();
    let cg = TestCgroup::new("qos-noisy");
    let mut s = System::start(&SystemOptions {
        mcs: vec![("qos", None)],
        // Only the card's network matters here: 20% of its 1 Gbit/s.
        thresholds: "fpga = 1.0, cpu = 1.0, memory = 1.0, network = 0.2".into(),
        dwell_s: 600,
        user_vms: vec![("noisy".into(), cg.cg.rel().to_string_lossy().into_owned())],
        vm_extra: vec![(
            "noisy".into(),
            format!("interfaces = [{:?}]\n[vm.qos.adaptive]\nmin = \"20mbit\"\n", pair.host.name),
        )],
        ..SystemOptions::default()
    });
    let audit = s.run.path().join("decisions.jsonl");
    let port = 20000 + (std::process::id() % 20000) as u16;
    let server = pair
        .ns
        .cmd(&["iperf3", "-s", "-1", "-J", "-i", "0.25", "-B", &pair.peer_addr, "-p", &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("iperf3 server in the VM");
    let mut server = Guarded(Some(server));
    std::thread::sleep(Duration::from_millis(300));
    let fwd = s
        .sim
        .control(&card_sim::Request::Forward {
            listen: "127.0.0.1:0".parse().expect("addr"),
            to: format!("{}:{port}", pair.peer_addr).parse().expect("addr"),
        })
        .expect("a card forward to the VM");
    let fwd_port = fwd.port.expect("the forward's port");
    assert_eq!(ingress_limit(&s, "noisy"), None, "no limit before the load");
    // 400 Mbit/s into the VM through the card: 40% of its network.
    let started = Instant::now();
    let mut client = Guarded(Some(
        std::process::Command::new("iperf3")
            .args(["-c", "127.0.0.1", "-p", &fwd_port.to_string(), "-b", "400M", "-t", "30"])
            .stdout(Stdio::null())
            .spawn()
            .expect("iperf3 client"),
    ));
    let (first, after) = wait_for("the qos VM narrows the VM", Duration::from_secs(8), || ingress_limit(&s, "noisy"));
    eprintln!("narrowed to {:.1} Mbit/s {after:?} after the load began", first as f64 / 1e6);
    let first_at = started.elapsed().as_secs_f64();
    // It narrows step by step (one step per settle time) until the card's
    // network is under its threshold; then the limit holds still.
    let (mut narrowed, mut changed) = (first, Instant::now());
    while changed.elapsed() < Duration::from_secs(7) {
        assert!(started.elapsed() < Duration::from_secs(24), "the limit never settled (at {narrowed})");
        std::thread::sleep(Duration::from_millis(100));
        let l = ingress_limit(&s, "noisy").expect("still limited");
        if l != narrowed {
            eprintln!("narrowed further to {:.1} Mbit/s", l as f64 / 1e6);
            (narrowed, changed) = (l, Instant::now());
        }
    }
    let narrowed_at = started.elapsed().as_secs_f64() - changed.elapsed().as_secs_f64();
    assert!(narrowed >= 20_000_000, "never under its floor: {narrowed}");
    let card = s.card_use("network");
    assert!(card <= 0.22, "the card's network is back at its threshold: {card}");
    // Move the qos VM while the VM pushes against its narrowed limit.
    let moved_at = started.elapsed().as_secs_f64();
    let r = s.call(&Request::Move { task: "qos".into(), to: Side::Host });
    assert!(r.ok, "{r:?}");
    let pause = r.decisions.as_ref().and_then(|d| d[0].reports.first().map(|r| r.pause_ms));
    eprintln!("qos VM moved to the host, pause {pause:?} ms");
    assert_eq!(ingress_limit(&s, "noisy"), Some(narrowed), "the move changes no limit");
    client.wait_timeout(Duration::from_secs(40)).expect("client ends");
    let load_end = Instant::now();
    let (_, calm) = wait_for("the limit restored when calm", Duration::from_secs(10), || {
        ingress_limit(&s, "noisy").is_none().then_some(())
    });
    eprintln!("restored {calm:?} after the load stopped (from {:?})", load_end.elapsed() - calm);
    // The receiver's view: ~400 before the narrowing, the limit after it,
    // and the same on both sides of the move.
    let out = server.0.take().expect("server").wait_with_output().expect("server output");
    let report: Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    let rate = |from: f64, to: f64| iperf_rate(&report, from, to);
    let before = rate(0.0, first_at - 0.2);
    let pre_move = rate(narrowed_at + 0.25, moved_at);
    let post_move = rate(moved_at + 0.25, 29.5);
    eprintln!(
        "receiver: {:.1} Mbit/s before, {:.1} narrowed before the move, {:.1} after it (limit {:.1})",
        before / 1e6,
        pre_move / 1e6,
        post_move / 1e6,
        narrowed as f64 / 1e6
    );
    assert!(before > narrowed as f64 * 1.2, "the load ran over the narrowed limit before: {before}");
    for (what, r) in [("before the move", pre_move), ("after the move", post_move)] {
        assert!(r <= narrowed as f64 * 1.1, "{what}: {r} bit/s over the limit {narrowed}");
        assert!(r >= narrowed as f64 * 0.6, "{what}: {r} bit/s far under the limit {narrowed}");
    }
    assert!((post_move / pre_move - 1.0).abs() < 0.25, "the move is invisible to the VM: {pre_move} -> {post_move}");
    // The audit log: narrowings by the card-network rule decided on the
    // card, the restore decided on the host (the agent kept its state).
    let events = governor::placement::audit::read_qos(&audit).expect("audit log");
    eprintln!("{events:#?}");
    assert!(events.iter().all(|e| e.applied && e.vm == "noisy" && e.direction == "ingress"), "{events:?}");
    let narrowings: Vec<_> = events.iter().filter(|e| e.reason != "calm").collect();
    assert!(narrowings.iter().all(|e| e.reason == "card-network" && e.detail > 2000), "{narrowings:?}");
    assert!(narrowings.iter().any(|e| e.qos_vm == Side::Card && e.rate_bps == Some(first)), "{narrowings:?}");
    assert!(narrowings.iter().any(|e| e.rate_bps == Some(narrowed)), "{narrowings:?}");
    let last = events.last().expect("a restore");
    assert_eq!((last.reason.as_str(), last.qos_vm, last.rate_bps), ("calm", Side::Host, None));
    drop(s);
}

/// Give a cgroup a small CPU weight (cpu.shares on a hybrid host,
/// cpu.weight on cgroup v2): a VM of low priority.
fn low_cpu_weight(cg: &TestCgroup) {
    let layout = cgroupfs::Layout::detect().expect("layout");
    let (dir, file, value) = match layout.v1_root(cgroupfs::Controller::Cpu) {
        Some(root) => (root.join(cg.cg.rel()), "cpu.shares", "16"),
        None => (layout.unified().join(cg.cg.rel()), "cpu.weight", "1"),
    };
    std::fs::write(dir.join(file), value).unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()));
}

/// The noisy-neighbour rule with real load: a low-priority VM shares CPU 0
/// with a neighbour whose two busy loops and 400 Mbit/s of traffic take
/// it; the victim waits > 50 ms (p99) on the run queue. The qos VM halves
/// the neighbour's busier direction (not under its floor); when the
/// neighbour's busy loops stop and the victim runs again, the limit is
/// restored. iperf3's receiver measures it.
#[test]
fn the_qos_vm_halves_the_noisy_neighbour_of_a_delayed_vm_and_restores_it() {
    require_root();
    require_kvm();
    require_tool("iperf3");
    require_tool("taskset");
    let pair = VethPair::new();
    let noisy = TestCgroup::new("qos-nn-noisy");
    let victim = TestCgroup::new("qos-nn-victim");
    low_cpu_weight(&victim);
    let rel = |c: &TestCgroup| c.cg.rel().to_string_lossy().into_owned();
    let s = System::start(&SystemOptions {
        mcs: vec![("qos", None)],
        thresholds: "fpga = 1.0, cpu = 1.0, memory = 1.0, network = 1.0".into(),
        dwell_s: 600,
        // One histogram per second: the victim's few long waits each tick.
        tick_ms: 1000,
        user_vms: vec![("noisy".into(), rel(&noisy)), ("victim".into(), rel(&victim))],
        vm_extra: vec![(
            "noisy".into(),
            format!("interfaces = [{:?}]\n[vm.qos.adaptive]\nmin = \"100mbit\"\n", pair.host.name),
        )],
        ..SystemOptions::default()
    });
    let audit = s.run.path().join("decisions.jsonl");
    let port = 20000 + (std::process::id() % 20000) as u16;
    let server = pair
        .ns
        .cmd(&["iperf3", "-s", "-1", "-J", "-i", "0.25", "-B", &pair.peer_addr, "-p", &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("iperf3 server in the VM");
    let mut server = Guarded(Some(server));
    std::thread::sleep(Duration::from_millis(300));
    let hog = ["taskset", "-c", "0", "sh", "-c", "while :; do :; done"];
    let _victim_work = victim.spawn(&hog);
    let started = Instant::now();
    let mut client = Guarded(Some(
        std::process::Command::new("iperf3")
            .args(["-c", &pair.peer_addr, "-p", &port.to_string(), "-b", "400M", "-t", "24"])
            .stdout(Stdio::null())
            .spawn()
            .expect("iperf3 client"),
    ));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ingress_limit(&s, "noisy"), None, "no limit while the victim runs undisturbed");
    let hogs_at = started.elapsed().as_secs_f64();
    let hogs = [noisy.spawn(&hog), noisy.spawn(&hog)];
    let (first, after) = wait_for("the noisy neighbour halved", Duration::from_secs(10), || ingress_limit(&s, "noisy"));
    let first_at = started.elapsed().as_secs_f64();
    eprintln!("noisy neighbour narrowed to {:.1} Mbit/s {after:?} after its busy loops began", first as f64 / 1e6);
    assert!((150_000_000..=260_000_000).contains(&first), "half of ~400 Mbit/s: {first}");
    // Halved again while the victim still waits, never under the floor.
    std::thread::sleep(Duration::from_secs(6));
    let narrowed = ingress_limit(&s, "noisy").expect("still limited");
    assert!((100_000_000..=first).contains(&narrowed), "between the floor and the first step: {narrowed}");
    let calm_from = started.elapsed().as_secs_f64();
    drop(hogs);
    let (_, calm) = wait_for("the limit restored when the victim runs", Duration::from_secs(12), || {
        ingress_limit(&s, "noisy").is_none().then_some(())
    });
    eprintln!("restored {calm:?} after the busy loops stopped");
    let restored_at = started.elapsed().as_secs_f64();
    client.wait_timeout(Duration::from_secs(40)).expect("client ends");
    let out = server.0.take().expect("server").wait_with_output().expect("server output");
    let report: Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    let rate = |from: f64, to: f64| iperf_rate(&report, from, to);
    let before = rate(0.5, first_at - 0.3);
    let halved = rate(first_at + 0.5, calm_from);
    let back = rate(restored_at + 1.0, 23.5);
    eprintln!(
        "receiver: {:.1} Mbit/s before, {:.1} while narrowed (limits {:.1} then {:.1}), {:.1} after the restore; \
         busy loops from {hogs_at:.1} s",
        before / 1e6,
        halved / 1e6,
        first as f64 / 1e6,
        narrowed as f64 / 1e6,
        back / 1e6
    );
    assert!(halved <= first as f64 * 1.1, "the narrowed limit holds: {halved}");
    assert!(halved < before * 0.7, "the neighbour moves less while narrowed: {before} -> {halved}");
    assert!(back > halved * 1.3, "back after the restore: {halved} -> {back}");
    let events = governor::placement::audit::read_qos(&audit).expect("audit log");
    let narrowings: Vec<_> = events.iter().filter(|e| e.reason != "calm").collect();
    assert!(
        narrowings.iter().all(|e| e.reason == "noisy-neighbour" && e.vm == "noisy" && e.detail > 50_000),
        "narrowed for the victim's delay (µs): {narrowings:?}"
    );
    assert!(events.iter().all(|e| e.applied), "{events:?}");
    assert_eq!(events.last().map(|e| (e.reason.as_str(), e.rate_bps)), Some(("calm", None)), "{events:?}");
}
