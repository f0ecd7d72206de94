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

/// User traffic through the card (iperf3 through a card forward) plus the
/// net-agent's own traffic push the card's network over its threshold: the
/// net-agent (the only VM whose measured cost is network) moves to the
/// host and its traffic leaves the card with it; the card falls under.
#[test]
fn network_load_through_the_card_moves_the_vm_whose_traffic_relieves_it() {
    check_root_kvm();
    require_tool("iperf3");
    let before = Inventory::take();
    {
        let mut s = System::start(&SystemOptions {
            thresholds: "network = 0.3".into(),
            mcs: vec![("monitor", None), ("log", None), ("net-agent", None)],
            dwell_s: 30,
            ..SystemOptions::default()
        });
        let tick0 = s.decisions(0).last().map_or(0, |d| d.tick);
        // The net-agent's traffic: 20 MB/s = 16% of the card's link.
        let sink = Sink::start();
        let vm = s.task("net-agent").card_vm.expect("on the card");
        s.sim
            .control(&card_sim::Request::Load(card_sim::Load {
                net_bps: Some(20_000_000),
                net_target: Some(sink.addr),
                net_vm: Some(vm),
                ..Default::default()
            }))
            .expect("net-agent traffic");
        // User VMs' traffic crossing the card: 200 Mbit/s = 20% of it.
        let port = 20000 + (std::process::id() % 10000) as u16;
        let _server = Guarded::new(
            std::process::Command::new("iperf3")
                .args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("iperf3 server"),
        );
        let fwd = s
            .sim
            .control(&card_sim::Request::Forward {
                listen: "127.0.0.1:0".parse().expect("addr"),
                to: format!("127.0.0.1:{port}").parse().expect("addr"),
            })
            .expect("forward")
            .port
            .expect("port");
        std::thread::sleep(Duration::from_millis(200));
        let mut client = Guarded::new(
            std::process::Command::new("iperf3")
                .args(["-c", "127.0.0.1", "-p", &fwd.to_string(), "-b", "200M", "-t", "12"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("iperf3 client"),
        );
        s.wait("net-agent on the host", Duration::from_secs(8), |s| s.side("net-agent") == Side::Host);
        let ds = s.decisions(tick0);
        let over = ds.iter().find(|d| d.card[3].used > d.card[3].threshold).expect("the crossing");
        let moved = ds.iter().find(|d| !d.reports.is_empty()).expect("the move");
        eprintln!(
            "crossing at tick {} ({:.2}), moved at tick {}: {}",
            over.tick, over.card[3].used, moved.tick, moved.explain
        );
        assert!(moved.tick - over.tick <= 2, "within 3 ticks");
        assert_eq!(moved.moves.len(), 1, "{:?}", moved.moves);
        for t in ["monitor", "log"] {
            assert_eq!(s.side(t), Side::Card, "{t} uses no network: it stays");
        }
        s.wait("the card's network under its threshold", Duration::from_secs(5), |s| s.card_use("network") < 0.3);
        let after = s.card_use("network");
        eprintln!("card network after the move: {after:.3} (user traffic alone)");
        assert!(after > 0.1, "the user traffic still crosses the card: {after:.3}");
        client.terminate(Duration::from_secs(2));
    }
    let left = Inventory::take().left_since(&before);
    assert!(left.is_empty(), "left: {left}");
}

/// Load switching on and off faster than the dwell: a task changes
/// direction at most once per dwell window.
#[test]
fn oscillating_load_moves_each_task_at_most_once_per_dwell() {
    check_root_kvm();
    let mut s =
        System::start(&SystemOptions { thresholds: "cpu = 0.6".into(), dwell_s: 2, ..SystemOptions::default() });
    let start = std::time::Instant::now();
    let mut on = false;
    while start.elapsed() < Duration::from_secs(9) {
        on = !on;
        s.agent("log", AgentOp::Auto, if on { 2000 } else { 0 });
        std::thread::sleep(Duration::from_millis(400));
    }
    let moves: Vec<_> =
        s.decisions(0).into_iter().filter(|d| d.reason != Reason::Initial && !d.reports.is_empty()).collect();
    for d in &moves {
        eprintln!("{} tick {} {:?}: {}", d.time_ms, d.tick, d.reason, d.explain);
    }
    assert!(!moves.is_empty(), "the load did cross the threshold");
    for task in ["monitor", "log", "qos"] {
        let of: Vec<_> = moves.iter().filter(|d| d.reports.iter().any(|r| r.ok && r.task == task)).collect();
        for w in of.windows(2) {
            assert!(
                w[1].time_ms - w[0].time_ms >= 2000,
                "two moves of {task} within the dwell: {} -> {}",
                w[0].tick,
                w[1].tick
            );
        }
    }
    // Only the VM whose cost relieves the card moves, unless it is held by
    // its dwell (it just moved): then the fewest others that relieve it do.
    let log_moves: Vec<u64> =
        moves.iter().filter(|d| d.moves.iter().any(|m| m.task == "log")).map(|d| d.time_ms).collect();
    for d in moves.iter().filter(|d| d.moves.iter().any(|m| m.task != "log")) {
        let held = log_moves.iter().any(|&t| t <= d.time_ms && d.time_ms - t < 2000);
        assert!(held, "idle VMs were moved while log could move: tick {} {}", d.tick, d.explain);
    }
}

/// The VM that would have to move does not fit the host's MC reserve:
/// nothing moves and the decision log says why.
#[test]
fn a_host_reserve_too_small_moves_nothing_and_says_why() {
    check_root_kvm();
    let mut s =
        System::start(&SystemOptions { thresholds: "cpu = 0.6".into(), reserve_cpus: 0.2, ..SystemOptions::default() });
    let tick0 = s.decisions(0).last().map_or(0, |d| d.tick);
    s.agent("log", AgentOp::Auto, 2000);
    std::thread::sleep(Duration::from_secs(3));
    let ds = s.decisions(tick0);
    let why = ds.iter().rev().find(|d| d.card[1].used > d.card[1].threshold).expect("ticks over the threshold");
    eprintln!("{:?}: {}", why.reason, why.explain);
    assert_eq!(why.reason, Reason::HostReserve, "{}", why.explain);
    assert!(why.explain.contains("reserve"), "{}", why.explain);
    assert!(ds.iter().all(|d| d.moves.is_empty()), "nothing moved");
    assert_eq!(s.side("log"), Side::Card);
    s.agent("log", AgentOp::Auto, 0);
}

/// An operator's move, a pin and an unpin each do what they say and
/// nothing else; a dry run decides and logs, and moves nothing.
#[test]
fn manual_move_pin_and_dry_run() {
    check_root_kvm();
    {
        let mut s = System::start(&SystemOptions { dwell_s: 60, ..SystemOptions::default() });
        let before = s.agent("qos", AgentOp::Step, 10);
        let r = s.call(&Request::Move { task: "qos".into(), to: Side::Host });
        assert!(r.ok, "{r:?}");
        let rec = &r.decisions.expect("record")[0];
        assert_eq!(rec.reason, Reason::Manual);
        eprintln!("manual move: pause {:.2} ms {:?}", rec.reports[0].pause_ms, rec.reports[0].steps);
        assert_eq!(s.side("qos"), Side::Host);
        assert_eq!(s.side("log"), Side::Card, "nothing else moved");
        assert_eq!(s.agent("qos", AgentOp::Counters, 0).log_seq, before.log_seq);
        // Refusals name the field and change nothing.
        let e = s.call(&Request::Move { task: "qos".into(), to: Side::Host });
        assert!(!e.ok && e.error.as_deref().unwrap_or("").starts_with("to:"), "{e:?}");
        let e = s.call(&Request::Move { task: "backup".into(), to: Side::Host });
        assert!(!e.ok && e.error.as_deref().unwrap_or("").starts_with("task:"), "{e:?}");
        assert!(s.call(&Request::Pin { task: "qos".into() }).ok);
        assert_eq!(s.task("qos").pinned, Some(Side::Host));
        let e = s.call(&Request::Move { task: "qos".into(), to: Side::Card });
        assert!(!e.ok && e.error.as_deref().unwrap_or("").contains("pinned"), "{e:?}");
        assert!(s.call(&Request::Unpin { task: "qos".into() }).ok);
        assert!(s.call(&Request::Move { task: "qos".into(), to: Side::Card }).ok);
        assert_eq!(s.side("qos"), Side::Card);
        assert_eq!(s.agent("qos", AgentOp::Step, 10).log_seq, before.log_seq + 1, "state kept");
    }
    {
        let mut s =
            System::start(&SystemOptions { thresholds: "cpu = 0.6".into(), dry_run: true, ..SystemOptions::default() });
        assert!(s.placement().dry_run);
        s.agent("log", AgentOp::Auto, 2000);
        std::thread::sleep(Duration::from_secs(2));
        let ds = s.decisions(0);
        let would = ds.iter().find(|d| d.reason == Reason::Relieve).expect("a decision to relieve");
        assert!(would.dry_run && would.reports.is_empty(), "decided, not done: {would:?}");
        assert_eq!(would.moves[0].task, "log");
        assert_eq!(s.side("log"), Side::Card, "a dry run moves nothing");
        s.agent("log", AgentOp::Auto, 0);
    }
}

/// Claim 11: host-side MC VMs run under the MC subtree with the reserve as
/// its limits, apart from user VMs; the governor's eBPF telemetry watches
/// the subtree (VM `mc`, role `mc`) and agrees with the kernel's own
/// accounting, and the kernel holds the subtree to the reserve.
#[test]
fn host_side_mc_vms_are_held_to_the_reserve_and_watched_by_the_telemetry() {
    check_root_kvm();
    let mut s = System::start(&SystemOptions {
        mcs: vec![("log", None)],
        reserve_cpus: 0.3,
        reserve_mib: 256,
        dwell_s: 60,
        ..SystemOptions::default()
    });
    assert!(s.call(&Request::Move { task: "log".into(), to: Side::Host }).ok);
    s.agent("log", AgentOp::Auto, 2000);
    let layout = cgroupfs::Layout::detect().expect("layout");
    let subtree = layout.open(&s.mc_cgroup).expect("the MC subtree");
    assert_eq!(subtree.memory_limit().expect("limit"), Some(256 << 20), "the reserve's memory is the subtree's limit");
    std::thread::sleep(Duration::from_millis(1500));
    let tele = |s: &System| {
        let st = s.call(&Request::Status).status.expect("status");
        let mc = st.vms.into_iter().find(|v| v.name == "mc").expect("VM mc watched");
        assert_eq!(mc.role, "mc");
        mc.cpu_seconds_total
    };
    let (k0, t0, w0) = (subtree.cpu_usage_ns().expect("cpu"), tele(&s), std::time::Instant::now());
    std::thread::sleep(Duration::from_secs(4));
    let (k1, t1, w1) = (subtree.cpu_usage_ns().expect("cpu"), tele(&s), std::time::Instant::now());
    let secs = w1.duration_since(w0).as_secs_f64();
    let kernel = (k1 - k0) as f64 / 1e9 / secs;
    let ebpf = (t1 - t0) / secs;
    eprintln!("MC subtree: kernel {kernel:.3} CPUs, eBPF telemetry {ebpf:.3} CPUs, reserve 0.3");
    assert!((kernel - 0.3).abs() < 0.05, "the quota holds the subtree to the reserve: {kernel:.3}");
    // The telemetry is sampled per tick (200 ms): the two windows differ by
    // up to a tick at each end.
    assert!((ebpf - kernel).abs() < 0.05, "telemetry {ebpf:.3} vs kernel {kernel:.3}");
    let mem = subtree.memory().expect("memory").expect("memory controller");
    assert!(mem.usage_bytes <= 256 << 20, "under its limit: {}", mem.usage_bytes);
    // Apart from user VMs: the subtree is its own top-level cgroup.
    assert!(!s.mc_cgroup.contains('/'), "{}", s.mc_cgroup);
    s.agent("log", AgentOp::Auto, 0);
}

/// Custom hardware: user jobs and the storage-agent's own jobs on the
/// card's FPGA engine push it over its threshold; the storage-agent (the
/// only VM whose measured cost is engine time) moves, and its jobs leave
/// the card with it (the card refuses jobs for a VM it no longer runs).
#[test]
fn fpga_load_moves_the_vm_whose_jobs_relieve_the_engine() {
    check_root_kvm();
    let mut s = System::start(&SystemOptions {
        thresholds: "fpga = 0.7".into(),
        mcs: vec![("monitor", None), ("storage-agent", None)],
        dwell_s: 30,
        ..SystemOptions::default()
    });
    let tick0 = s.decisions(0).last().map_or(0, |d| d.tick);
    let vm = s.task("storage-agent").card_vm.expect("on the card");
    let control = s.sim.control_path().to_path_buf();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stop.clone();
    // The job generator: every 100 ms, 40 ms of user jobs and 40 ms of the
    // storage-agent's (while the card runs it).
    let gen = std::thread::spawn(move || {
        let mut agent_jobs = true;
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            let user = card_sim::Request::FpgaJobs { count: 4, service_us: 10_000, vm: None };
            card_sim::process::control_at(&control, &user).expect("user jobs");
            if agent_jobs {
                let own = card_sim::Request::FpgaJobs { count: 4, service_us: 10_000, vm: Some(vm) };
                agent_jobs = card_sim::process::control_at(&control, &own).is_ok();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        agent_jobs
    });
    s.wait("storage-agent on the host", Duration::from_secs(10), |s| s.side("storage-agent") == Side::Host);
    let ds = s.decisions(tick0);
    let over = ds.iter().find(|d| d.card[0].used > d.card[0].threshold).expect("the crossing");
    let moved = ds.iter().find(|d| !d.reports.is_empty()).expect("the move");
    eprintln!(
        "crossing at tick {} (fpga {:.2}), moved at tick {}: {}",
        over.tick, over.card[0].used, moved.tick, moved.explain
    );
    assert!(moved.tick - over.tick <= 2, "within 3 ticks");
    assert_eq!(moved.moves.len(), 1, "{:?}", moved.moves);
    assert_eq!(s.side("monitor"), Side::Card, "monitor uses no engine time: it stays");
    let cost = over.tasks.iter().find(|t| t.task == "storage-agent").expect("in the record").card_cost[0];
    assert!(cost > 0.25, "the storage-agent's measured engine share: {cost:.3}");
    s.wait("the engine under its threshold", Duration::from_secs(5), |s| s.card_use("fpga") < 0.7);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let still = gen.join().expect("generator");
    assert!(!still, "the card refused jobs for the VM that left it");
}

/// The CLI is a client of the same socket: `governor placement [--json]`,
/// `placement move|pin|unpin`, `governor decisions --json`, with refusals
/// naming what was wrong and a non-zero exit.
#[test]
fn the_cli_shows_moves_pins_and_lists_decisions() {
    check_root_kvm();
    let s = System::start(&SystemOptions { mcs: vec![("log", None)], dwell_s: 60, ..SystemOptions::default() });
    let sock = s.socket.to_str().expect("utf-8 path").to_string();
    let cli = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--socket", &sock]);
        std::process::Command::new(bin_dir().join("governor")).args(&all).output().expect("run the CLI")
    };
    let table = cli(&["placement"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success() && text.contains("card: healthy") && text.contains("log"), "{text}");
    let moved = cli(&["placement", "move", "log", "--to", "host"]);
    let line = String::from_utf8_lossy(&moved.stdout);
    assert!(moved.status.success() && line.contains("Manual") && line.contains("log -> host: ok"), "{line}");
    let json = cli(&["placement", "--json"]);
    let p: governor::placement::runtime::PlacementStatus =
        serde_json::from_slice(&json.stdout).expect("placement JSON");
    assert_eq!(p.tasks[0].side, Side::Host);
    assert!(p.tasks[0].last_move.as_ref().is_some_and(|m| m.ok));
    assert!(cli(&["placement", "pin", "log"]).status.success());
    let refused = cli(&["placement", "move", "log", "--to", "card"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("pinned"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let bad = cli(&["placement", "move", "log", "--to", "moon"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--to"));
    assert!(cli(&["placement", "unpin", "log"]).status.success());
    let ds = cli(&["decisions", "--json"]);
    assert!(ds.status.success());
    let records: Vec<governor::placement::audit::AuditRecord> = String::from_utf8_lossy(&ds.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert_eq!(records[0].reason, Reason::Initial);
    assert!(records.iter().any(|r| r.reason == Reason::Manual && r.reports.iter().all(|m| m.ok)));
}
