//! Restart without loss (issue 11): `kill -9` of the governor under iperf3
//! traffic with a police limit set at run time. While it is down the
//! kernel keeps enforcing and counting (pinned maps, links and tc
//! filters); a restarted governor adopts them, takes over the run-time
//! limit, and its counters go on from where they were. A clean stop then
//! removes everything, the state file included.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use governor::api::{self, Request};
use governor::qos::{Direction, LimitSpec, Mode, Quantity};
use integration_tests::*;
use serde_json::Value;

fn start(cfg: &std::path::Path) -> Guarded {
    Guarded(Some(
        Command::new(bin_dir().join("governor"))
            .args(["run", "--config"])
            .arg(cfg)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .spawn()
            .expect("governor"),
    ))
}

fn status_of(socket: &std::path::Path, vm: &str) -> Option<governor::sampler::VmStatus> {
    let st = api::call(socket, &Request::Status).ok()?.status?;
    st.vms.into_iter().find(|v| v.name == vm)
}

fn wait_status(socket: &std::path::Path, vm: &str) -> governor::sampler::VmStatus {
    let t0 = Instant::now();
    loop {
        if let Some(v) = status_of(socket, vm).filter(|v| v.cpu_seconds_total > 0.0) {
            return v;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "no status from the governor");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ingress_limit(socket: &std::path::Path) -> Option<governor::governor::LimitStatus> {
    let l = api::call(socket, &Request::Limits).ok()?.limits?;
    l.into_iter().find(|l| l.vm == "web" && l.direction == Direction::Ingress)
}

#[test]
fn kill_9_under_traffic_keeps_the_limit_and_the_counters() {
    require_root();
    require_tool("iperf3");
    let pair = VethPair::new();
    let web = TestCgroup::new("restart-web");
    let _busy = web.spawn(&["sh", "-c", "while :; do :; done"]);
    let pins = PinDir::new();
    let dir = fixtures::TempDir::new("governor-test-restart").expect("dir");
    let socket = dir.path().join("governor.sock");
    let cfg = dir.path().join("governor.toml");
    std::fs::write(
        &cfg,
        format!(
            "tick_ms = 200\npin_dir = {:?}\nsocket = {socket:?}\nqos_ifb = {:?}\n[[vm]]\nname = \"web\"\ncgroup = {:?}\ninterfaces = [{:?}]\n",
            pins.0,
            fixtures::unique("grif"),
            web.cg.rel().to_string_lossy(),
            pair.host.name
        ),
    )
    .expect("config");
    let state = governor::runstate::path_for(&pins.0);
    let mut gov = start(&cfg);
    wait_status(&socket, "web");
    let limit = LimitSpec {
        mode: Mode::Police,
        rate: Quantity::Text("50mbit".into()),
        burst: Quantity::Text("2mb".into()),
        packet_rate: None,
    };
    let r =
        api::call(&socket, &Request::SetLimit { vm: "web".into(), direction: Direction::Ingress, limit }).expect("set");
    assert!(r.ok, "{r:?}");
    assert!(state.exists(), "the run-time state is saved: {}", state.display());

    let port = 20000 + (std::process::id() % 20000) as u16;
    let server = pair
        .ns
        .cmd(&["iperf3", "-s", "-1", "-J", "-i", "0.5", "-B", &pair.peer_addr, "-p", &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("iperf3 server");
    let mut server = Guarded(Some(server));
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let mut client = Guarded(Some(
        Command::new("iperf3")
            .args(["-c", &pair.peer_addr, "-p", &port.to_string(), "-b", "200M", "-t", "14"])
            .stdout(Stdio::null())
            .spawn()
            .expect("iperf3 client"),
    ));
    std::thread::sleep(Duration::from_secs(3));
    let before = wait_status(&socket, "web");
    let limit_before = ingress_limit(&socket).expect("the run-time limit");
    let killed_at = t0.elapsed().as_secs_f64();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(gov.child().id() as i32, libc::SIGKILL) };
    gov.wait_timeout(Duration::from_secs(5)).expect("the governor died");
    assert!(state.exists(), "a killed governor leaves its state");
    std::thread::sleep(Duration::from_secs(3));
    let restarted_at = t0.elapsed().as_secs_f64();
    let mut gov = start(&cfg);
    let after = wait_status(&socket, "web");
    let adopted_at = t0.elapsed().as_secs_f64();
    let limit_after = ingress_limit(&socket).expect("the run-time limit after the restart");
    eprintln!(
        "killed at {killed_at:.1} s, restarted at {restarted_at:.1} s, serving at {adopted_at:.1} s; \
         CPU {:.2} -> {:.2} s, rx {} -> {} B, limit passed {} -> {} B",
        before.cpu_seconds_total,
        after.cpu_seconds_total,
        before.rx_bytes_total,
        after.rx_bytes_total,
        limit_before.passed_bytes,
        limit_after.passed_bytes
    );
    assert_eq!(
        (limit_after.mode, limit_after.rate_bps, limit_after.burst_bytes),
        (Mode::Police, 50_000_000, 2 << 20),
        "the run-time limit, not the config's (none)"
    );
    // The counters went on while it was down: nothing reset, nothing lost.
    let down = restarted_at - killed_at;
    assert!(after.cpu_seconds_total >= before.cpu_seconds_total + 0.5 * down, "CPU counted while down");
    let bytes_down = (after.rx_bytes_total - before.rx_bytes_total) as f64;
    assert!(bytes_down >= 0.5 * 50e6 / 8.0 * down, "traffic counted while down: {bytes_down} B");
    assert!(limit_after.passed_bytes > limit_before.passed_bytes, "the limit's counters went on");

    client.wait_timeout(Duration::from_secs(30)).expect("iperf3 ends");
    let out = server.0.take().expect("server").wait_with_output().expect("server output");
    let report: Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    // The policer's contract over any window of T seconds: at most the
    // rate times T plus the burst. Each half second after the first, and
    // the whole run after it, kept to it, also while the governor was
    // down (unlimited, the veth carries gigabits).
    let (rate, burst_bits) = (50e6, (2u64 << 20) as f64 * 8.0);
    let (mut worst, mut worst_bound, mut bits_after, mut secs_after) = (0.0f64, 0.0f64, 0.0, 0.0);
    for iv in report["intervals"].as_array().expect("intervals") {
        let s = &iv["sum"];
        let (start, secs, bits) = (
            s["start"].as_f64().unwrap_or(0.0),
            s["seconds"].as_f64().unwrap_or(0.0),
            s["bits_per_second"].as_f64().unwrap_or(0.0),
        );
        if start >= 1.0 && secs > 0.0 {
            let bound = (rate * secs + burst_bits) / secs * 1.05;
            if bits / bound > worst / worst_bound.max(1.0) {
                (worst, worst_bound) = (bits, bound);
            }
            bits_after += bits * secs;
            secs_after += secs;
        }
    }
    let mean = bits_after / secs_after;
    let mean_bound = (rate * secs_after + burst_bits) / secs_after * 1.05;
    eprintln!(
        "receiver after the first second: fastest interval {:.1} Mbit/s (bound {:.1}), mean {:.1} Mbit/s over {secs_after:.1} s \
         (bound {:.1}; limit 50, burst 2 MiB)",
        worst / 1e6,
        worst_bound / 1e6,
        mean / 1e6,
        mean_bound / 1e6
    );
    assert!(worst <= worst_bound, "the limit held throughout, also while the governor was down: {worst}");
    assert!(mean <= mean_bound, "the limit held on average: {mean} bit/s");

    // A clean stop removes everything, the state file too.
    assert!(gov.terminate(Duration::from_secs(10)).is_some(), "stops on SIGTERM");
    assert!(!state.exists(), "a clean stop removes the state");
    let left: Vec<PathBuf> =
        std::fs::read_dir(&pins.0).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "pins left: {left:?}");
}

/// The MC VMs are untouched by a kill -9 and a restart: the new governor
/// adopts them where they run (the same card VM, the same host VMM
/// process), their agents' state goes on, and nothing is moved or
/// restarted. The user VM's log lines, also those written while the
/// governor was down, reach its log once each, in order.
#[test]
fn kill_9_leaves_the_mc_vms_running_and_the_next_governor_adopts_them() {
    use governor::placement::Side;
    use integration_tests::placement::{System, SystemOptions};
    use vmm::host::api::AgentOp;
    require_root();
    require_kvm();
    let web = TestCgroup::new("restart-logs");
    let mut s = System::start(&SystemOptions {
        mcs: vec![("monitor", None), ("log", None)],
        thresholds: "fpga = 1.0, cpu = 1.0, memory = 1.0, network = 1.0".into(),
        dwell_s: 60,
        user_vms: vec![("web".into(), web.cg.rel().to_string_lossy().into_owned())],
        vm_logs: true,
        ..SystemOptions::default()
    });
    let lines = |s: &System, from: u64, n: u64| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(s.vm_log_in("web")).expect("VM log file");
        for i in from..from + n {
            writeln!(f, "web line {i}").expect("write");
        }
    };
    let written = |s: &System| {
        let st = s.call(&Request::Status).status.expect("status");
        st.logs.iter().find(|l| l.vm == "web").map_or(0, |l| l.written_log_seq)
    };
    lines(&s, 1, 100);
    s.wait("100 lines written", Duration::from_secs(20), |s| written(s) == 100);
    assert!(s.call(&Request::Move { task: "log".into(), to: Side::Host }).ok);
    // Give each agent a state to keep: steps counted in guest memory.
    for task in ["monitor", "log"] {
        s.agent(task, AgentOp::Step, 7);
    }
    let before = s.placement();
    let monitor_vm = before.tasks.iter().find(|t| t.task == "monitor").and_then(|t| t.card_vm).expect("on the card");
    let log_sock =
        before.tasks.iter().find(|t| t.task == "log").and_then(|t| t.host_socket.clone()).expect("on the host");
    let log_pid = vmm::host::client::Client::connect(&log_sock).and_then(|c| c.peer_pid()).expect("log's vmm pid");
    let counters = |s: &mut System| (s.agent("monitor", AgentOp::Counters, 0), s.agent("log", AgentOp::Counters, 0));
    let (m0, l0) = counters(&mut s);
    let decisions_before = s.decisions(0).len();

    s.kill9();
    // Lines written while the governor is down come once it is back.
    lines(&s, 101, 50);
    std::thread::sleep(Duration::from_millis(500));
    s.restart();
    lines(&s, 151, 50);
    s.wait("every line written, the ones from while it was down too", Duration::from_secs(20), |s| written(s) == 200);
    let got = governor::manage::logs::read(&s.logs_dir(), "web", 0).expect("the VM's log");
    let texts: Vec<String> = got.iter().map(|l| l.text.clone()).collect();
    let want: Vec<String> = (1..=200).map(|i| format!("web line {i}")).collect();
    assert_eq!(texts, want, "every line once, in order, across the kill");
    assert_eq!(got.iter().map(|l| l.seq).collect::<Vec<_>>(), (1..=200).collect::<Vec<_>>());
    let after = s.placement();
    let t = |p: &governor::placement::runtime::PlacementStatus, n: &str| {
        p.tasks.iter().find(|t| t.task == n).cloned().expect("task")
    };
    assert_eq!(
        (t(&after, "monitor").side, t(&after, "monitor").card_vm),
        (Side::Card, Some(monitor_vm)),
        "the same card VM"
    );
    assert_eq!(t(&after, "log").side, Side::Host);
    let sock = t(&after, "log").host_socket.expect("log's socket");
    let pid = vmm::host::client::Client::connect(&sock).and_then(|c| c.peer_pid()).expect("pid");
    assert_eq!(pid, log_pid, "the same vmm process on the host");
    let (m1, l1) = counters(&mut s);
    eprintln!("monitor {m0:?} -> {m1:?}; log {l0:?} -> {l1:?}");
    assert!(m1.steps >= m0.steps && m1.work >= m0.work && m0.steps > 0, "monitor's agent state kept");
    assert!(l1.steps >= l0.steps && l1.work >= l0.work && l0.steps > 0, "log's agent state kept");
    let first = s.decisions(0);
    let initial = first.first().expect("the new governor's first record");
    assert!(initial.explain.contains("adopted"), "{}", initial.explain);
    eprintln!("{} decisions before, new governor: {}", decisions_before, initial.explain);
    // Its MC subtree and sockets go with a clean stop (System's drop
    // checks the subtree; the inventory test checks the rest).
}
