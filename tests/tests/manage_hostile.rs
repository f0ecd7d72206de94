//! A hostile management VM under `governor run` (claim 14's agents, issue
//! 10): an agent that answers its bulk exchange with a frame too long for
//! its window, of the wrong kind, or with a record count its length does
//! not carry is stopped by its VMM (on the card or the host). The governor
//! keeps it stopped, releases it, says so in the placement status, the
//! management status and the audit log, refuses to move it, and goes on
//! with the other MC VMs.

use std::io::Write;
use std::time::{Duration, Instant};

use governor::api::Request;
use governor::placement::Side;
use integration_tests::placement::{System, SystemOptions};
use integration_tests::*;
use vmm::host::api::AgentOp;
use vmm::proto::hostile;

/// Append `n` lines to a user VM's log and wait until the log VM took
/// them all (written with their numbers).
fn lines_through(s: &System, vm: &str, from: &mut u64, n: u64) {
    let mut f = std::fs::OpenOptions::new().append(true).open(s.vm_log_in(vm)).expect("VM log file");
    let mut chunk = String::new();
    for i in *from + 1..=*from + n {
        chunk.push_str(&format!("{vm} line {i}\n"));
    }
    f.write_all(chunk.as_bytes()).expect("write lines");
    *from += n;
    let t0 = Instant::now();
    loop {
        let st = s.call(&Request::Status).status.expect("status");
        if st.logs.iter().any(|l| l.vm == vm && l.written_log_seq == *from && l.pending == 0) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "lines not through: {:?} {:?}",
            st.logs,
            st.management_degraded
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until `task` is reported stopped; its reason.
fn stopped(s: &mut System, task: &str) -> String {
    let t0 = Instant::now();
    loop {
        if let Some(why) = s.task(task).stopped {
            eprintln!("{task} stopped after {:?}: {why}", t0.elapsed());
            return why;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{task} was not stopped: {:?}", s.task(task));
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn degraded(s: &System) -> String {
    s.call(&Request::Status).status.expect("status").management_degraded.unwrap_or_default()
}

/// Wait until the management status mentions `what` (it follows the
/// sampling loop's tick).
fn wait_degraded(s: &System, what: &str) {
    let t0 = Instant::now();
    while !degraded(s).contains(what) {
        assert!(t0.elapsed() < Duration::from_secs(10), "status does not say {what}: {}", degraded(s));
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_hostile_agent_frame_stops_only_that_mc_vm_and_the_governor_reports_it() {
    require_root();
    require_kvm();
    let web = TestCgroup::new("hostile-web");
    let _w = web.spawn(&["sh", "-c", "while :; do sleep 0.05; done"]);
    let mut s = System::start(&SystemOptions {
        // No threshold: the only moves are the test's.
        thresholds: "fpga = 1.0, cpu = 1.0, memory = 1.0, network = 1.0".into(),
        dwell_s: 60,
        user_vms: vec![("web".into(), web.cg.rel().to_string_lossy().into_owned())],
        vm_logs: true,
        command_timeout_ms: 2000,
        ..SystemOptions::default()
    });
    for task in ["monitor", "log", "qos"] {
        assert_eq!(s.side(task), Side::Card, "{task} starts on the calm card");
    }
    let mut seq = 0;
    lines_through(&s, "web", &mut seq, 100);
    let web_running = |s: &System| {
        let st = s.call(&Request::Status).status.expect("status");
        st.health.iter().any(|h| h.vm == "web" && h.health == "running")
    };
    let t0 = Instant::now();
    while !web_running(&s) {
        assert!(t0.elapsed() < Duration::from_secs(20), "web never running: {:?}", degraded(&s));
        std::thread::sleep(Duration::from_millis(100));
    }

    // 1. The qos agent on the card answers with the wrong kind of message.
    let qos_vm = s.task("qos").card_vm.expect("qos on the card");
    assert_eq!(s.agent("qos", AgentOp::Hostile, hostile::WRONG_KIND).value, hostile::WRONG_KIND);
    let why = stopped(&mut s, "qos");
    assert!(why.contains("kind"), "the reason names the field: {why}");
    wait_degraded(&s, "qos");
    // The card no longer runs it.
    let gone = s.sim.control(&card_sim::Request::Agent { vm: qos_vm, request: AgentOp::Ping, arg: 0 });
    assert!(gone.is_err() || !gone.as_ref().is_ok_and(|r| r.ok), "qos VM still on the card: {gone:?}");
    // The others go on: lines flow, the monitor answers.
    lines_through(&s, "web", &mut seq, 100);
    std::thread::sleep(Duration::from_millis(600));
    let d = degraded(&s);
    assert!(!d.contains("monitor VM") && !d.contains("log VM"), "only qos is degraded: {d}");
    // It is not moved (by the operator or the engine) nor pinned elsewhere.
    let r = s.call(&Request::Move { task: "qos".into(), to: Side::Host });
    assert!(!r.ok && r.error.as_deref().unwrap_or_default().contains("stopped"), "{r:?}");

    // 2. The log VM, moved to the host, answers longer than its window.
    let r = s.call(&Request::Move { task: "log".into(), to: Side::Host });
    assert!(r.ok, "{r:?}");
    lines_through(&s, "web", &mut seq, 100);
    let sock = s.task("log").host_socket.expect("log on the host");
    assert_eq!(s.agent("log", AgentOp::Hostile, hostile::TOO_LONG).value, hostile::TOO_LONG);
    let mut f = std::fs::OpenOptions::new().append(true).open(s.vm_log_in("web")).expect("VM log file");
    writeln!(f, "web line {}", seq + 1).expect("write a line");
    let why = stopped(&mut s, "log");
    assert!(why.contains("length"), "the reason names the field: {why}");
    let t = s.task("log");
    assert_eq!(t.side, Side::Host);
    assert!(t.host_socket.is_none() && !sock.exists(), "its VMM was released: {t:?}");
    // Lines wait (bounded) for a log VM: the status says why.
    let t0 = Instant::now();
    loop {
        let st = s.call(&Request::Status).status.expect("status");
        if st.logs.iter().any(|l| l.vm == "web" && l.pending == 1 && l.written_log_seq == seq) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "the line does not wait: {:?}", st.logs);
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_degraded(&s, "log VM");

    // 3. The monitor on the card lies about its record count.
    assert!(web_running(&s), "the monitor still decides");
    assert_eq!(s.agent("monitor", AgentOp::Hostile, hostile::LYING_COUNT).value, hostile::LYING_COUNT);
    let why = stopped(&mut s, "monitor");
    assert!(why.contains("payload length"), "the reason names the field: {why}");
    wait_degraded(&s, "monitor VM");

    // The governor is running and answers; every stop is in the audit log
    // with where the VM ran.
    let p = s.placement();
    assert!(p.tasks.iter().all(|t| t.stopped.is_some()), "{:?}", p.tasks);
    assert!(s.gov.child().try_wait().expect("governor").is_none(), "the governor keeps running");
    let audit = s.run.path().join("decisions.jsonl");
    let events = governor::placement::audit::read_mc_stopped(&audit).expect("audit log");
    let sides: Vec<(String, Side)> = events.iter().map(|e| (e.task.clone(), e.side)).collect();
    assert_eq!(
        sides,
        vec![("qos".to_string(), Side::Card), ("log".to_string(), Side::Host), ("monitor".to_string(), Side::Card)],
        "{events:?}"
    );
}
