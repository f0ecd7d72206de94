//! card-link against card-sim, for real: card-sim runs as a separate process
//! inside its own card-sized cgroup (1 CPU of quota, 512 MiB), the host side
//! talks to it over vfio-user. The card-sim binary is found next to this
//! test's target profile directory (`cargo xtask test` builds all workspace
//! binaries first) or via $CARD_SIM_BIN; a missing binary fails the test.
//!
//! Every `SimProcess` is a Drop guard: process, cgroup and sockets are
//! removed even when an assertion fails.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use card_link::abi::{utilisation, ResourceKind};
use card_link::mailbox::{VmSpec, VmState};
use card_link::{Card, CardError, CardOptions};
use card_sim::{EcsRequest, Fault, Load, Request, SimOptions, SimProcess};
use integration_tests::{vm_cgroup, Sink};

const PERIOD_MS: u64 = 100;
const LINK_TIMEOUT: Duration = Duration::from_millis(200);

fn sim() -> SimProcess {
    sim_with(true)
}

/// card-sim offering mapped BARs and DMA streams (ABI 1.3), or not (a card
/// reached by socket messages only: the fallback path).
fn sim_with(mmap: bool) -> SimProcess {
    SimProcess::spawn(&SimOptions { period_ms: PERIOD_MS as u32, mmap, ..Default::default() }).expect("start card-sim")
}

fn load(l: Load) -> Request {
    Request::Load(l)
}

/// The slow fault: every command waits `ms` first.
fn slow(ms: u64) -> Request {
    Request::Fault { fault: Fault::Slow, on: true, slow_ms: Some(ms) }
}

fn connect(sim: &SimProcess, cmd_timeout: Duration) -> Card {
    card_link::connect_vfio_user(
        sim.socket_path(),
        LINK_TIMEOUT,
        CardOptions { command_timeout: cmd_timeout, ..Default::default() },
    )
    .expect("connect to card-sim")
}

#[test]
fn card_sim_runs_in_its_cgroup_and_reports_identity() {
    let s = sim();
    let cg = s.cgroup().expect("card cgroup");
    assert!(cg.pids().contains(&s.pid()), "card-sim pid {} not in its cgroup {:?}", s.pid(), cg.pids());
    let mut card = connect(&s, Duration::from_secs(2));
    let id = card.identity().clone();
    assert_eq!(id.model, "card-sim mc-board");
    let cpu = id.resource(ResourceKind::Cpu).expect("cpu resource");
    assert_eq!(cpu.capacity, 1_000_000_000, "1 CPU of quota");
    let mem = id.resource(ResourceKind::Memory).expect("memory resource");
    assert_eq!(mem.capacity, 512 << 20);
    for k in ResourceKind::ALL {
        assert!(id.resource(k).is_some(), "resource {} missing", k.name());
    }
    let h = card.check_health().expect("healthy card");
    assert_eq!(h.period_ms, PERIOD_MS as u32);
}

#[test]
fn card_mailbox_1000_commands_in_order() {
    card_mailbox_1000_commands_in_order_on(true);
}

/// The same over socket messages only (a card that offers no mmap).
#[test]
fn card_mailbox_1000_commands_in_order_by_messages() {
    card_mailbox_1000_commands_in_order_on(false);
}

fn card_mailbox_1000_commands_in_order_on(mmap: bool) {
    let s = sim_with(mmap);
    let mut card = connect(&s, Duration::from_secs(2));
    let info = card.transport_info();
    assert_eq!(matches!(info.access, card_link::Access::Mapped), mmap, "the path chosen at open: {info}");
    for i in 0..1000u64 {
        let payload = i.to_le_bytes().repeat((i % 7) as usize + 1);
        let m = card.echo(i, &payload).unwrap_or_else(|e| panic!("command {i}: {e}"));
        assert_eq!(m.arg0, i, "command {i} answered out of order");
        assert_eq!(m.payload, payload, "command {i} payload changed");
    }
    let t = Instant::now();
    card.check_health().expect("card healthy after 1000 commands");
    // Nothing was refused on the card side either.
    let refusals: Vec<_> =
        card.read_events(0, 256).expect("events").into_iter().filter(|e| e.message.contains("refused")).collect();
    assert!(refusals.is_empty(), "card refused commands: {refusals:?}");
    assert!(t.elapsed() < Duration::from_secs(1));
    // The same through the doorbell register (ABI 1.0 style), on a new link.
    assert!(
        card.identity().features & card_link::abi::FEATURE_FUSED_DOORBELL != 0,
        "card-sim offers the fused doorbell"
    );
    drop(card);
    let opts =
        CardOptions { command_timeout: Duration::from_secs(2), classic_doorbell: true, ..CardOptions::default() };
    let mut card = card_link::connect_vfio_user(s.socket_path(), LINK_TIMEOUT, opts).expect("reconnect");
    for i in 0..200u64 {
        let m = card.echo(5000 + i, &i.to_be_bytes()).unwrap_or_else(|e| panic!("classic command {i}: {e}"));
        assert_eq!(m.arg0, 5000 + i, "classic command {i} answered out of order");
    }
}

#[test]
fn card_model_vm_lifecycle_event_log_and_snapshot_stream() {
    let s = sim();
    let mut card = connect(&s, Duration::from_secs(10));
    let spec = VmSpec { name: "mc-qos".into(), mem_mib: 32, vcpus: 1 };
    let vm = card.start_vm(&spec).expect("start management VM");
    let events = card.read_events(0, 256).expect("read event log");
    assert!(
        events.iter().any(|e| e.vm == vm && e.message.contains("management agent ready")),
        "agent banner not in the event log: {events:?}"
    );
    let list = card.list_vms().expect("list");
    assert_eq!(list.len(), 1);
    assert_eq!((list[0].id, list[0].state, list[0].name.as_str()), (vm, VmState::Running, "mc-qos"));

    card.pause_vm(vm).expect("pause");
    let info = card.snapshot_vm(vm).expect("snapshot on the card");
    assert!(info.size > 32 << 20, "snapshot holds the VM memory: {} bytes", info.size);
    let mut image = Vec::new();
    let n = card.read_snapshot(vm, &info, &mut image).expect("stream snapshot card -> host");
    assert_eq!(n, info.size);
    assert_eq!(crc32(&image), info.crc);

    // And back: host -> card, restored as a second VM.
    let spec2 = VmSpec { name: "mc-qos-restored".into(), mem_mib: 32, vcpus: 1 };
    let vm2 = card.restore_vm(&spec2, image.len() as u64, &mut image.as_slice()).expect("restore");
    let info2 = card.snapshot_vm(vm2).expect("snapshot restored VM");
    let mut image2 = Vec::new();
    card.read_snapshot(vm2, &info2, &mut image2).expect("stream restored snapshot");
    assert_eq!(image2.len(), image.len());
    assert!(image2[24..] == image[24..], "restored VM memory differs from the original");
    assert_eq!(card.list_vms().expect("list").len(), 2);
    card.stop_vm(vm).expect("stop");
    card.stop_vm(vm2).expect("stop restored");
    assert!(card.list_vms().expect("list").is_empty());
    // A stopped VM is gone: the card says so with a typed refusal.
    match card.stop_vm(vm) {
        Err(CardError::Refused { status, .. }) => {
            assert_eq!(status, card_link::mailbox::Status::NoSuchVm)
        }
        other => panic!("stop of a gone VM: {other:?}"),
    }
}

#[test]
fn card_ecs_control_service_creates_and_destroys_vms() {
    let s = sim();
    let mut card = connect(&s, Duration::from_secs(5));
    let create = Request::Ecs(EcsRequest::CreateVm { name: "mc-log".into(), mem_mib: 8 });
    let id = s.control(&create).expect("ecs create").vm.expect("vm id");
    let list = card.list_vms().expect("list");
    assert!(list.iter().any(|v| v.id == id && v.name == "mc-log"), "{list:?}");
    s.control(&Request::Ecs(EcsRequest::DestroyVm { vm: id })).expect("ecs destroy");
    assert!(card.list_vms().expect("list").is_empty());
    // A raw line (no typed request can lack the name): refused, naming the field.
    let bad = s.control(&serde_json::json!({"op": "ecs", "request": "create_vm"}));
    assert!(format!("{bad:?}").contains("field name"), "refusal names the field: {bad:?}");
}

/// Read the card's registers and its cgroup's own CPU counter back to back.
fn cpu_pair(card: &mut Card, s: &SimProcess) -> (card_link::abi::RegisterSnapshot, u64, Instant) {
    let cg = s.cgroup().expect("cgroup");
    let snap = card.registers().expect("registers");
    (snap, cg.cpu_usage_ns().expect("cgroup cpu"), Instant::now())
}

#[test]
fn card_telemetry_cpu_agrees_with_cgroup() {
    let s = sim();
    let mut card = connect(&s, Duration::from_secs(2));
    s.control(&load(Load { cpu: Some(0.5), ..Load::default() })).expect("cpu load");
    std::thread::sleep(Duration::from_millis(1000));
    let (a, ca, ta) = cpu_pair(&mut card, &s);
    std::thread::sleep(Duration::from_millis(3000));
    let (b, cb, tb) = cpu_pair(&mut card, &s);
    let u = utilisation(&a, &b).expect("rates");
    let truth = (cb - ca) as f64 / tb.duration_since(ta).as_secs_f64() / 1e9;
    eprintln!("cpu: card says {:.3}, cgroup says {:.3}", u.cpu, truth);
    assert!(truth > 0.2, "load knob did not load the card's cgroup: {truth:.3}");
    assert!((u.cpu - truth).abs() <= 0.02, "card cpu {:.3} vs cgroup {:.3}: more than 2 points apart", u.cpu, truth);
}

#[test]
fn card_telemetry_memory_agrees_with_cgroup() {
    let s = sim();
    let mut card = connect(&s, Duration::from_secs(2));
    s.control(&load(Load { mem_mib: Some(128), ..Load::default() })).expect("memory load");
    std::thread::sleep(Duration::from_millis(3 * PERIOD_MS));
    let snap = card.registers().expect("registers");
    let truth = s.cgroup().expect("cgroup").memory().expect("cgroup memory").map_or(0, |m| m.usage_bytes) as f64;
    let mem = snap.resource(ResourceKind::Memory).expect("memory");
    let cap = mem.capacity as f64;
    eprintln!("memory: card says {} B, cgroup says {truth} B", mem.used);
    assert!(truth >= 128.0 * 1048576.0, "ballast not charged to the cgroup: {truth}");
    assert!(
        ((mem.used as f64 - truth) / cap).abs() <= 0.02,
        "card memory {} vs cgroup {truth}: more than 2 points of capacity apart",
        mem.used
    );
}

#[test]
fn card_telemetry_network_agrees_with_peer() {
    let s = sim();
    let mut card = connect(&s, Duration::from_secs(2));
    // The peer is ours: a loopback sink that counts what it receives.
    let sink = Sink::start();
    let (addr, received) = (sink.addr, sink.received.clone());
    s.control(&load(Load { net_bps: Some(20_000_000), net_target: Some(addr), ..Load::default() })).expect("net load");
    std::thread::sleep(Duration::from_millis(1000));
    let a = card.registers().expect("registers");
    let ra = received.load(Ordering::Relaxed);
    let ta = Instant::now();
    std::thread::sleep(Duration::from_millis(3000));
    let b = card.registers().expect("registers");
    let rb = received.load(Ordering::Relaxed);
    let tb = Instant::now();
    s.control(&load(Load { net_bps: Some(0), ..Load::default() })).expect("net off");
    drop(sink);
    let u = utilisation(&a, &b).expect("rates");
    let cap = b.resource(ResourceKind::Network).expect("network").capacity as f64;
    let truth = (rb - ra) as f64 / tb.duration_since(ta).as_secs_f64() / cap;
    eprintln!("network: card says {:.4}, peer says {:.4} of {cap} B/s", u.network, truth);
    assert!(truth > 0.1, "peer received too little: {truth:.4}");
    assert!((u.network - truth).abs() <= 0.02, "card {:.4} vs peer {:.4}: more than 2 points apart", u.network, truth);
}

#[test]
fn card_telemetry_fpga_busy_ratio_follows_offered_load() {
    let s = sim();
    let mut card = connect(&s, Duration::from_secs(2));
    s.control(&load(Load { fpga: Some(0.4), ..Load::default() })).expect("fpga load");
    std::thread::sleep(Duration::from_millis(500));
    let a = card.registers().expect("registers");
    std::thread::sleep(Duration::from_millis(2000));
    let b = card.registers().expect("registers");
    let u = utilisation(&a, &b).expect("rates");
    eprintln!("fpga busy ratio {:.3} for 0.4 offered", u.fpga);
    // The engine's busy time comes from its own service intervals; with 0.4
    // offered and no backlog it is 0.4, give or take jobs straddling the window.
    assert!((0.35..=0.45).contains(&u.fpga), "fpga busy ratio {:.3} for 0.4 offered", u.fpga);
    // Work routed through the engine: a burst of 50 x 10 ms jobs queues up
    // (depth shows in `used`) and is worked off at one engine's pace.
    s.control(&load(Load { fpga: Some(0.0), ..Load::default() })).expect("knob off");
    std::thread::sleep(Duration::from_millis(100));
    let before = card.registers().expect("registers");
    let r = s.control(&Request::FpgaJobs { count: 50, service_us: 10_000, vm: None }).expect("submit jobs");
    assert_eq!(r.queued, Some(50));
    std::thread::sleep(Duration::from_millis(2 * PERIOD_MS));
    let busy = card.registers().expect("registers");
    let depth = busy.resource(ResourceKind::Fpga).expect("fpga").used;
    assert!(depth >= 20, "queue depth {depth} while a 500 ms burst is queued");
    std::thread::sleep(Duration::from_millis(700));
    let after = card.registers().expect("registers");
    let fa = after.resource(ResourceKind::Fpga).expect("fpga");
    let worked = fa.total - before.resource(ResourceKind::Fpga).expect("fpga").total;
    assert_eq!(fa.used, 0, "burst not worked off");
    assert!(worked >= 500_000_000, "engine busy {worked} ns for 500 ms of jobs");
}

/// Poll health every half period until it fails; return the error and how
/// long after `since` it came.
fn wait_unhealthy(card: &mut Card, since: Instant, limit: Duration) -> (CardError, Duration) {
    loop {
        match card.check_health() {
            Err(e) => return (e, since.elapsed()),
            Ok(_) if since.elapsed() > limit => {
                panic!("card still reported healthy after {limit:?}")
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(PERIOD_MS / 2)),
        }
    }
}

#[test]
fn card_fault_stall_is_detected_within_three_heartbeats() {
    let s = sim();
    let mut card = connect(&s, Duration::from_millis(500));
    card.check_health().expect("healthy before");
    s.control(&Request::fault(Fault::Stall, true)).expect("inject stall");
    let t0 = Instant::now();
    let (e, after) = wait_unhealthy(&mut card, t0, Duration::from_secs(5));
    eprintln!("stall detected after {after:?}: {e}");
    assert!(matches!(e, CardError::Stalled { .. }), "expected Stalled, got {e}");
    // Three periods without a beat, the echo that goes unanswered within
    // the probe bound, the polling interval and one period of phase.
    let probe = card_link::card::DEFAULT_PROBE_TIMEOUT;
    assert!(
        after <= Duration::from_millis(4 * PERIOD_MS + PERIOD_MS / 2) + probe,
        "stall detected too late: {after:?}"
    );
    // The stalled firmware does not run commands: refused at once (its
    // echo is still unanswered) or a typed timeout, on time.
    let t1 = Instant::now();
    let r = card.echo(1, b"x");
    assert!(
        matches!(r, Err(CardError::Timeout { .. } | CardError::Unanswered { .. })),
        "command on a stalled card: {r:?}"
    );
    assert!(t1.elapsed() < Duration::from_millis(900), "timeout took {:?}", t1.elapsed());
    s.control(&Request::fault(Fault::Stall, false)).expect("clear stall");
    std::thread::sleep(Duration::from_millis(2 * PERIOD_MS));
    card.check_health().expect("healthy after the stall clears");
    // The command sent during the stall is answered late and skipped; new ones work.
    let mut ok = false;
    for i in 0..3 {
        if card.echo(100 + i, b"y").is_ok() {
            ok = true;
            break;
        }
    }
    assert!(ok, "mailbox did not recover after the stall");
}

#[test]
fn card_fault_silent_card_is_detected_within_three_heartbeats() {
    let s = sim();
    let mut card = connect(&s, Duration::from_secs(2));
    card.check_health().expect("healthy before");
    // SAFETY: stopping our own child process.
    unsafe { libc::kill(s.pid() as i32, libc::SIGSTOP) };
    let t0 = Instant::now();
    let (e, after) = wait_unhealthy(&mut card, t0, Duration::from_secs(5));
    eprintln!("silent card detected after {after:?}: {e}");
    assert!(matches!(e, CardError::Timeout { .. }), "expected Timeout, got {e}");
    // The health check's link round trip is bounded by the probe timeout
    // (three heartbeats), whatever the link timeout of other exchanges.
    let probe = card_link::card::DEFAULT_PROBE_TIMEOUT;
    assert!(after <= probe + Duration::from_millis(PERIOD_MS / 2), "silence detected too late: {after:?}");
    // The link is now refused until reconnect; still a typed error, no hang.
    assert!(matches!(card.registers(), Err(CardError::LinkBroken(_))));
}

#[test]
fn card_fault_garbage_registers_are_refused() {
    card_fault_garbage_registers_are_refused_on(true);
}

/// The same over socket messages only (a card that offers no mmap).
#[test]
fn card_fault_garbage_registers_are_refused_by_messages() {
    card_fault_garbage_registers_are_refused_on(false);
}

fn card_fault_garbage_registers_are_refused_on(mmap: bool) {
    let s = sim_with(mmap);
    let mut card = connect(&s, Duration::from_secs(2));
    s.control(&Request::fault(Fault::Garbage, true)).expect("inject garbage");
    for _ in 0..50 {
        match card.registers() {
            Err(
                CardError::BadMagic { .. }
                | CardError::Checksum { .. }
                | CardError::AbiVersion { .. }
                | CardError::Range { .. },
            ) => {}
            other => panic!("garbage registers gave {other:?}"),
        }
        let h = card.check_health();
        assert!(h.is_err(), "health on garbage registers: {h:?}");
    }
    s.control(&Request::fault(Fault::Garbage, false)).expect("clear garbage");
    card.check_health().expect("healthy after garbage clears");
}

#[test]
fn card_fault_slow_mailbox_times_out_on_time() {
    card_fault_slow_mailbox_times_out_on_time_on(true);
}

/// The same over socket messages only (a card that offers no mmap).
#[test]
fn card_fault_slow_mailbox_times_out_on_time_by_messages() {
    card_fault_slow_mailbox_times_out_on_time_on(false);
}

fn card_fault_slow_mailbox_times_out_on_time_on(mmap: bool) {
    let s = sim_with(mmap);
    let mut card = connect(&s, Duration::from_millis(500));
    s.control(&slow(200)).expect("slow 200 ms");
    let t = Instant::now();
    card.echo(1, b"slow").expect("slow but within the timeout");
    assert!(t.elapsed() >= Duration::from_millis(200), "slow fault had no effect: {:?}", t.elapsed());
    s.control(&slow(2000)).expect("slow 2 s");
    let t = Instant::now();
    let r = card.echo(2, b"too slow");
    let took = t.elapsed();
    assert!(matches!(r, Err(CardError::Timeout { .. })), "expected Timeout, got {r:?}");
    assert!(took >= Duration::from_millis(500) && took < Duration::from_millis(800), "timeout after {took:?}");
    // Heartbeat keeps going: the card is slow, not dead.
    card.check_health().expect("slow mailbox is not a dead card");
}

#[test]
fn card_fault_crash_is_reported_and_host_keeps_running() {
    let mut s = sim();
    let mut card = connect(&s, Duration::from_secs(2));
    card.check_health().expect("healthy before");
    // The control reply never comes: the card dies while handling it.
    let _ = s.control(&Request::fault(Fault::Crash, true));
    let t0 = Instant::now();
    while !s.exited() {
        assert!(t0.elapsed() < Duration::from_secs(5), "card-sim did not crash");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (e, after) = wait_unhealthy(&mut card, t0, Duration::from_secs(5));
    eprintln!("crash detected after {after:?}: {e}");
    assert!(
        matches!(e, CardError::Io { .. } | CardError::Timeout { .. } | CardError::LinkBroken(_)),
        "expected the link closed (Io or LinkBroken) or Timeout, got {e}"
    );
    assert!(after <= Duration::from_millis(3 * PERIOD_MS), "crash detected too late: {after:?}");
    assert!(card.echo(1, b"x").is_err());
    // The host goes on: a new card works.
    let s2 = sim();
    let mut card2 = connect(&s2, Duration::from_secs(2));
    card2.echo(7, b"alive").expect("host keeps working with a new card");
}

/// A card that dies while a command waits on mapped memory (no socket
/// exchange in flight to notice) is reported within a poll slice of its
/// death, not at the end of the command's timeout.
#[test]
fn card_death_during_a_mapped_command_is_reported_at_once() {
    let s = sim_with(true);
    let mut card = connect(&s, Duration::from_secs(5));
    s.control(&slow(10_000)).expect("slow 10 s");
    let pid = s.pid() as libc::pid_t;
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: kill(2) on the card-sim child this test spawned.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        Instant::now()
    });
    let r = card.echo(3, b"never answered");
    let killed = killer.join().expect("killer thread");
    let after = killed.elapsed();
    eprintln!("card death seen {after:?} after the kill: {r:?}");
    assert!(matches!(r, Err(CardError::LinkBroken(_))), "expected LinkBroken, got {r:?}");
    assert!(after < Duration::from_millis(200), "death seen {after:?} after the kill (command timeout 5 s)");
}

#[test]
fn card_watchdog_reports_stall_and_recovery() {
    let s = sim();
    let card = Arc::new(std::sync::Mutex::new(connect(&s, Duration::from_millis(500))));
    let (tx, rx) = std::sync::mpsc::channel();
    let _w = card_link::Watchdog::spawn(card.clone(), move |v| {
        // The receiver is gone once the test has seen what it needs.
        let _ = tx.send((Instant::now(), format!("{v:?}"), matches!(v, card_link::Verdict::Healthy(_))));
    })
    .expect("watchdog");
    let (_, first, healthy) = rx.recv_timeout(Duration::from_secs(2)).expect("first verdict");
    assert!(healthy, "first verdict: {first}");
    s.control(&Request::fault(Fault::Stall, true)).expect("inject stall");
    let t0 = Instant::now();
    let (at, v, healthy) = rx.recv_timeout(Duration::from_secs(2)).expect("stall reported");
    eprintln!("watchdog: {v} after {:?}", at - t0);
    assert!(!healthy && v.contains("Stalled"), "expected a stall report, got {v}");
    let probe = card_link::card::DEFAULT_PROBE_TIMEOUT;
    assert!(at - t0 <= Duration::from_millis(4 * PERIOD_MS + PERIOD_MS / 2) + probe, "reported after {:?}", at - t0);
    s.control(&Request::fault(Fault::Stall, false)).expect("clear stall");
    let (_, v, healthy) = rx.recv_timeout(Duration::from_secs(2)).expect("recovery reported");
    assert!(healthy, "expected recovery, got {v}");
}

/// A command the slow fault holds is released when the fault is cleared:
/// a card slow for a moment is quick again at once, not after the whole
/// delay (the chaos test below toggles faults within a millisecond).
#[test]
fn a_cleared_slow_fault_does_not_outlast_itself() {
    let s = sim();
    let mut card = connect(&s, Duration::from_millis(300));
    s.control(&slow(5000)).expect("inject");
    let r = card.echo(1, b"held");
    assert!(matches!(r, Err(CardError::Timeout { .. })), "expected a timeout, got {r:?}");
    s.control(&Request::fault(Fault::Slow, false)).expect("clear");
    let t = Instant::now();
    let m = card.echo(2, b"quick").expect("answered once the fault is cleared");
    assert_eq!(m.arg0, 2);
    assert!(t.elapsed() < Duration::from_millis(200), "answered after {:?}", t.elapsed());
}

#[test]
fn card_fault_chaos_gives_only_typed_errors_and_recovers() {
    card_fault_chaos_gives_only_typed_errors_and_recovers_on(true);
}

/// The same over socket messages only (a card that offers no mmap).
#[test]
fn card_fault_chaos_gives_only_typed_errors_and_recovers_by_messages() {
    card_fault_chaos_gives_only_typed_errors_and_recovers_on(false);
}

fn card_fault_chaos_gives_only_typed_errors_and_recovers_on(mmap: bool) {
    let s = sim_with(mmap);
    let mut card = connect(&s, Duration::from_millis(300));
    let faults = [Request::fault(Fault::Garbage, true), slow(400), Request::fault(Fault::Stall, true)];
    let clear = [
        Request::fault(Fault::Garbage, false),
        Request::fault(Fault::Slow, false),
        Request::fault(Fault::Stall, false),
    ];
    let (mut ok, mut failed) = (0u32, 0u32);
    let t0 = Instant::now();
    for round in 0..12usize {
        s.control(&faults[round % 3]).expect("inject");
        for i in 0..20u64 {
            let t = Instant::now();
            let r = if i % 2 == 0 { card.echo(i, b"chaos").map(|_| ()) } else { card.registers().map(|_| ()) };
            // Every call ends within its timeout, with a result or a typed error.
            assert!(t.elapsed() < Duration::from_millis(900), "call took {:?}", t.elapsed());
            match r {
                Ok(()) => ok += 1,
                Err(CardError::LinkBroken(_)) => panic!("link broke: the card never went silent"),
                Err(_) => failed += 1,
            }
        }
        s.control(&clear[round % 3]).expect("clear");
    }
    eprintln!("chaos: {ok} ok, {failed} typed errors in {:?}", t0.elapsed());
    assert!(failed > 0, "faults had no effect");
    // Calm again: the same link works, in order.
    std::thread::sleep(Duration::from_millis(3 * PERIOD_MS));
    card.check_health().expect("healthy after chaos");
    let mut answered = 0;
    for i in 0..50u64 {
        match card.echo(1000 + i, b"after") {
            Ok(m) => {
                assert_eq!(m.arg0, 1000 + i);
                answered += 1;
            }
            Err(e) if i < 3 => eprintln!("after chaos, echo {i}: {e}"),
            Err(_) => {}
        }
    }
    assert_eq!(answered, 50, "commands lost after the chaos");
}

#[test]
fn card_vmm_guest_banner_snapshot_stream_and_restore() {
    let guest = integration_tests::guest_elf();
    assert!(std::path::Path::new("/dev/kvm").exists(), "/dev/kvm is required for the card-side VMM");
    let s = SimProcess::spawn(&SimOptions { period_ms: PERIOD_MS as u32, guest: Some(guest), ..Default::default() })
        .expect("start card-sim with the vmm backend");
    let mut card = connect(&s, Duration::from_secs(20));
    let vm =
        card.start_vm(&VmSpec { name: "mc-monitor".into(), mem_mib: 32, vcpus: 1 }).expect("boot MC VM on the card");
    let events = card.read_events(0, 256).expect("event log");
    assert!(
        events.iter().any(|e| e.vm == vm && e.message == vmm::proto::BANNER),
        "agent banner {:?} not in the card's event log: {events:?}",
        vmm::proto::BANNER
    );
    // The guest runs in its own vmm process, in a child cgroup of the card's.
    let cg = s.cgroup().expect("cgroup");
    assert!(cg.pids().contains(&s.pid()));
    let child = vm_cgroup(&s, vm);
    assert_eq!(child.pids().len(), 1, "one vmm process in {}", child.rel().display());

    let info = card.snapshot_vm(vm).expect("snapshot on the card");
    // The vmm stream may leave untouched RAM out, so only its use proves it:
    // the host restores it below and the agent answers.
    assert!(info.size > 4096, "snapshot of a running agent: {} bytes", info.size);
    let mut image = Vec::new();
    let t = Instant::now();
    card.read_snapshot(vm, &info, &mut image).expect("stream snapshot card -> host");
    eprintln!("streamed {} KiB card -> host in {:?}", image.len() >> 10, t.elapsed());
    assert_eq!(crc32(&image), info.crc);
    // The host-side vmm can read what the card streamed: same format end to end.
    let host_vm =
        vmm::Vm::restore_from(image.as_slice(), vmm::Sinks::default()).expect("host restores the card's snapshot");
    host_vm.resume().expect("host resumes it");
    let pong = host_vm.request(vmm::proto::op::PING, 0, Duration::from_secs(10)).expect("agent answers on the host");
    assert_eq!(pong.value, vmm::proto::PONG);
    drop(host_vm);

    // And back to the card: restored there as a second VM that runs.
    let vm2 = card
        .restore_vm(
            &VmSpec { name: "mc-monitor-2".into(), mem_mib: 32, vcpus: 1 },
            image.len() as u64,
            &mut image.as_slice(),
        )
        .expect("stream host -> card and restore");
    let list = card.list_vms().expect("list");
    assert!(list.iter().any(|v| v.id == vm2 && v.state == VmState::Running), "{list:?}");
    card.stop_vm(vm).expect("stop");
    card.stop_vm(vm2).expect("stop restored");
    assert!(card.list_vms().expect("list").is_empty());
}

fn crc32(b: &[u8]) -> u32 {
    // Same CRC-32 (IEEE) the ABI uses, kept local to keep the test's deps small.
    let mut crc = !0u32;
    for &x in b {
        crc ^= x as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// Every user the governor has of the card link, at once, each from a
/// thread of its own (the governor takes turns on one thread; here they
/// race for the link as closely as a shared one allows): health polls, the
/// placement tick's telemetry (registers and per-VM costs), the three
/// agents' bulk exchanges with real MC VMs, checkpoints (a live base, then
/// pause, a diff, resume) and echoes. 200,000 of them, through the
/// governor's own card site and meter, with the card's CPU loaded to its
/// quota: every one is answered, and answered right.
#[test]
fn every_user_of_the_card_link_at_once_gets_every_command_answered() {
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::sync::Mutex;

    use governor::placement::card::CardSite;
    use governor::placement::meter::CardMeter;
    use governor::placement::mover::Site;
    use vmm::proto::logs::LogRecord;
    use vmm::proto::qos::QosSignals;
    use vmm::proto::signals::{VmSignals, FLAG_EXISTS};

    integration_tests::require_root();
    integration_tests::require_kvm();
    const TARGET: u64 = 200_000;
    let s = SimProcess::spawn(&SimOptions {
        period_ms: PERIOD_MS as u32,
        guest: Some(integration_tests::guest_elf()),
        ..Default::default()
    })
    .expect("card-sim with real MC VMs");
    // The governor's settings in the demo: 3 s a command, the default probe.
    let card = connect(&s, Duration::from_secs(3));
    let mut site = CardSite::new(card);
    for task in ["monitor", "log", "qos"] {
        site.cold_start(task, 32).unwrap_or_else(|e| panic!("{task} on the card: {e}"));
    }
    s.control(&load(Load { cpu: Some(1.0), ..Default::default() })).expect("load the card's CPU");
    let site = Arc::new(Mutex::new(site));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(Mutex::new(None::<String>));
    let stop = Arc::new(AtomicBool::new(false));
    type User = Box<dyn FnMut(&mut CardSite, u64) -> Result<(), String> + Send>;
    let fleet: Vec<VmSignals> = (0..50)
        .map(|slot| VmSignals { slot, flags: FLAG_EXISTS, cpu_ns_total: 1000 + slot as u64, ..VmSignals::default() })
        .collect();
    let qos: Vec<QosSignals> = (0..50).map(|slot| QosSignals { slot, ..QosSignals::default() }).collect();
    let mut meter = CardMeter::default();
    let mut live_base = false;
    let users: Vec<(&str, User)> = vec![
        ("health", Box::new(|s, _| s.card().check_health().map(|_| ()).map_err(|e| e.to_string()))),
        ("tick", Box::new(move |s, _| meter.read(s.card()).map(|_| ()).map_err(|e| e.to_string()))),
        (
            "monitor",
            Box::new(move |s, i| s.monitor_tick("monitor", i + 1, 500, &fleet).map(|_| ()).map_err(|e| e.to_string())),
        ),
        (
            "log",
            Box::new(|s, i| {
                let mut text = [0u8; vmm::proto::logs::TEXT_LEN];
                text[..4].copy_from_slice(b"line");
                let r = LogRecord { slot: 0, flags: 0, host_seq: i + 1, len: 4, text };
                let acks = s.log_take("log", i + 1, 1, &[r]).map_err(|e| e.to_string())?;
                match acks.as_slice() {
                    [a] if a.last_host == i + 1 => Ok(()),
                    other => Err(format!("log line {} acknowledged as {other:?}", i + 1)),
                }
            }),
        ),
        (
            "qos",
            Box::new(move |s, i| s.qos_tick("qos", i + 1, (1000, 5000), &qos).map(|_| ()).map_err(|e| e.to_string())),
        ),
        (
            "checkpoint",
            Box::new(move |s, _| {
                // As the governor checkpoints: a live base once, then a
                // diff taken paused, resumed whatever the diff did.
                if !std::mem::replace(&mut live_base, true) {
                    s.snapshot_live("monitor")?.ok_or("no pre-copy on card-sim")?;
                }
                s.pause("monitor")?;
                let diff = s.snapshot_diff("monitor");
                s.resume("monitor")?;
                diff.map(|_| ())
            }),
        ),
        (
            "echo",
            Box::new(|s, i| {
                let payload = i.to_le_bytes().repeat((i % 13) as usize + 1);
                let m = s.card().echo(i, &payload).map_err(|e| e.to_string())?;
                if m.arg0 != i || m.payload != payload {
                    return Err(format!("echo {i} answered with {} ({} bytes)", m.arg0, m.payload.len()));
                }
                Ok(())
            }),
        ),
    ];
    let t0 = Instant::now();
    let threads: Vec<_> = users
        .into_iter()
        .map(|(name, mut user)| {
            let (site, done, failed, stop) = (site.clone(), done.clone(), failed.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut mine = 0u64;
                while !stop.load(Ordering::Relaxed) && done.load(Ordering::Relaxed) < TARGET {
                    let r = {
                        let mut s = site.lock().unwrap_or_else(|e| e.into_inner());
                        user(&mut s, mine)
                    };
                    if let Err(e) = r {
                        let n = done.load(Ordering::Relaxed);
                        failed
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(format!("{name} call {mine} (after {n} commands, {:?}): {e}", t0.elapsed()));
                        stop.store(true, Ordering::Relaxed);
                        break;
                    }
                    mine += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                    // Let the others have the link in turn.
                    std::thread::yield_now();
                }
                (name, mine)
            })
        })
        .collect();
    let counts: Vec<(&str, u64)> = threads.into_iter().map(|t| t.join().expect("user thread")).collect();
    let took = t0.elapsed();
    eprintln!("{} commands in {took:?}: {counts:?}", done.load(Ordering::Relaxed));
    s.control(&load(Load { cpu: Some(0.0), ..Default::default() })).expect("unload");
    if let Some(e) = failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
        panic!("a command was not answered right: {e}");
    }
    assert!(done.load(Ordering::Relaxed) >= TARGET);
    assert!(counts.iter().all(|(_, n)| *n > 0), "every user got the link: {counts:?}");
    let mut site = site.lock().unwrap_or_else(|e| e.into_inner());
    site.card().check_health().expect("healthy after them all");
}
