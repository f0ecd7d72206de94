//! Boot the management agent on real KVM and talk to it over the virtio
//! control channel, in process (library API) and through the `vmm` binary.

mod vmm_support;

use std::time::{Duration, Instant};

use serde_json::json;
use vmm::host::api::{AgentOp, ErrorKind};
use vmm::host::client::Client;
use vmm::proto::{op, BANNER, PONG};
use vmm::{RunState, Sinks, StopReason, Vm, VmConfig};
use vmm_support::*;

const T: Duration = Duration::from_secs(10);

fn boot(mem_mib: u64) -> Vm {
    require_kvm();
    let vm = Vm::create(&VmConfig::new(guest_elf(), mem_mib), Sinks::default()).expect("create VM");
    vm.start(false).expect("start vCPU");
    vm
}

#[test]
fn boots_to_agent_banner() {
    let t = Instant::now();
    let vm = boot(64);
    let ready = vm.wait_ready(T).expect("agent banner");
    let took = ready - t;
    assert!(vm.console_lines().iter().any(|l| l == BANNER), "console: {:?}", vm.console_lines());
    assert_eq!(vm.state(), RunState::Running);
    assert!(took < Duration::from_secs(2), "banner took {took:?}");
    assert_eq!(vm.shutdown(), RunState::Stopped(StopReason::Requested));
}

#[test]
fn request_response_round_trip() {
    let vm = boot(32);
    vm.wait_ready(T).expect("agent banner");
    let r = vm.request(op::PING, 0, T).expect("ping");
    assert_eq!(r.value, PONG);
    assert_eq!(r.op, op::PING);
    // Many round trips: ids match, counters move exactly as asked.
    let mut last_work = 0;
    for i in 1..=50u64 {
        let r = vm.request(op::STEP, 1000, T).expect("step");
        assert_eq!(r.work, last_work + 1000, "work counter after step {i}");
        assert_eq!(r.log_seq, i);
        assert_eq!(r.steps, i);
        last_work = r.work;
    }
    let c = vm.request(op::COUNTERS, 0, T).expect("counters");
    assert_eq!((c.work, c.log_seq, c.requests), (50_000, 50, 52));
    let (last, logs) = vm.last_log();
    assert_eq!(logs, 50);
    let st = vm.stats();
    assert_eq!(st.logs, 50);
    // Every reply and log record is one transmit notify (an MMIO exit), and
    // the banner alone is 15 serial writes.
    assert!(st.mmio_exits >= 102, "{st:?}");
    assert!(st.pio_exits > BANNER.len() as u64, "{st:?}");
    assert!(st.guest_resident_bytes > 0 && st.guest_resident_bytes <= 32 << 20, "{st:?}");
    assert_eq!(last.map(|l| l.log_seq), Some(50));
    vm.shutdown();
}

#[test]
fn pause_resume_keeps_state() {
    let vm = boot(32);
    vm.wait_ready(T).expect("agent banner");
    vm.request(op::AUTO, 5000, T).expect("auto on");
    std::thread::sleep(Duration::from_millis(100));
    vm.pause().expect("pause");
    assert_eq!(vm.state(), RunState::Paused);
    let (a, _) = vm.last_log();
    std::thread::sleep(Duration::from_millis(100));
    let (b, _) = vm.last_log();
    assert_eq!(a, b, "a paused guest makes no progress");
    assert!(vm.request(op::PING, 0, T).is_err(), "requests are refused while paused");
    vm.resume().expect("resume");
    // Wait for progress (bounded), rather than a fixed sleep a loaded
    // machine may not honour.
    let before = a.map_or(0, |l| l.log_seq);
    let deadline = Instant::now() + T;
    while vm.last_log().0.map_or(0, |l| l.log_seq) <= before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = vm.request(op::AUTO, 0, T).expect("auto off");
    assert!(r.log_seq > a.map_or(0, |l| l.log_seq), "progress after resume");
    vm.shutdown();
}

#[test]
fn guest_exit_port_stops_cleanly() {
    let vm = boot(16);
    vm.wait_ready(T).expect("agent banner");
    // The agent answers first, then asks to stop: either the reply arrives
    // or the VM is already stopped; both are fine, the reason is what counts.
    let _ = vm.request(op::SHUTDOWN, 0, T);
    assert_eq!(vm.wait_stopped(T).expect("stopped"), StopReason::GuestExit(0));
}

#[test]
fn vmm_binary_boots_and_answers_over_the_socket() {
    require_kvm();
    let elf = guest_elf();
    let mut p = VmmProc::spawn(&["--guest", elf.to_str().expect("utf-8 path"), "--mem-mib", "64"]);
    let r = p.request(AgentOp::Ping, 0);
    assert_eq!(r.value, PONG);
    let s = p.call(json!({"cmd": "state"}));
    assert_eq!(s["state"], json!("Running"));
    let bad = p.client.call_json(&json!({"cmd": "request", "op": "nonsense"}));
    assert!(
        bad.as_ref().is_err_and(|e| e.kind() == ErrorKind::BadRequest && e.to_string().contains("field `op`")),
        "unknown op is refused naming the field: {bad:?}"
    );
    let down = p.call(json!({"cmd": "shutdown"}));
    assert_eq!(down["state"], json!({"Stopped": "Requested"}));
    let status = p.child.child().wait().expect("vmm exits");
    assert!(status.success(), "vmm exit status {status}");
}

#[test]
fn control_socket_serves_connections_in_parallel() {
    require_kvm();
    let elf = guest_elf();
    let mut p = VmmProc::spawn(&["--guest", elf.to_str().expect("utf-8 path"), "--mem-mib", "64"]);
    let sock = p.socket.0.clone();
    // A slow request on a second connection (a step of 1e8 work units runs
    // for a few hundred ms) must not hold up a state query on the first.
    let slow = std::thread::spawn(move || {
        let mut c = Client::connect(&sock).expect("second connection");
        let t = Instant::now();
        c.request(AgentOp::Step, 100_000_000).expect("step");
        t.elapsed()
    });
    std::thread::sleep(Duration::from_millis(20));
    let t = Instant::now();
    let s = p.client.state().expect("state");
    let quick = t.elapsed();
    let slow = slow.join().expect("slow client");
    assert_eq!(s.state, RunState::Running);
    assert!(quick * 4 < slow, "state took {quick:?} while a {slow:?} request ran");
    p.call(json!({"cmd": "shutdown"}));
}

#[test]
fn empty_vmm_process_creates_and_boots_over_the_socket() {
    require_kvm();
    use vmm::host::process::{SpawnOptions, Start, VmmProcess};
    let socket = TempPath::new("vmm-test-empty.sock");
    let opts = SpawnOptions {
        bin: vmm_bin(),
        start: Start::Empty,
        socket: socket.0.clone(),
        serial: None,
        log: None,
        cgroup: None,
    };
    let mut p = VmmProcess::spawn(&opts).expect("spawn an empty vmm");
    let err = p.client().state().expect_err("no VM yet");
    assert!(err.kind() == ErrorKind::State && err.to_string().contains("absent"), "{err}");
    let bad = p.call_json(&json!({"cmd": "create", "guest": "/x"})).expect_err("mem_mib missing");
    assert!(bad.kind() == ErrorKind::BadRequest && bad.to_string().contains("mem_mib"), "{bad}");
    p.client().create(&guest_elf(), 32).expect("create");
    let b = p.client().boot().expect("boot");
    assert!(b.ready_ms > 0.0, "{b:?}");
    assert_eq!(p.request(AgentOp::Ping, 0).expect("ping").value, PONG);
    p.shutdown().expect("clean shutdown");
}
