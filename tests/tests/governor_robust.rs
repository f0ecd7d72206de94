//! The governor over a host that changes under it: child cgroups that come
//! and go, interfaces re-created by a VMM, leftovers of a governor that died.

use std::process::{Command, Stdio};
use std::time::Duration;

use governor::governor::Governor;
use governor::qos::{Direction, Limit, Mode};
use integration_tests::*;

/// A VMM's child cgroup (vCPU threads) that is removed does not take its
/// CPU time out of the VM's total, and the rate shows no spike.
#[test]
fn a_vanished_child_cgroup_keeps_its_cpu_time() {
    require_root();
    let pins = PinDir::new();
    let cg = TestCgroup::new("rob");
    let layout = cgroupfs::Layout::detect().expect("layout");
    let mut child =
        layout.create(&format!("{}/vcpu0", cg.cg.rel().to_string_lossy()), &Default::default()).expect("child cgroup");
    let mut gov = Governor::new(&governor_config(&pins, &unique("gifb"), &[("vm", &cg, None)])).expect("governor");
    gov.tick().expect("tick");
    let mut hog = {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "while :; do :; done"]);
        child.join_on_exec(&mut cmd).expect("join");
        Guarded(Some(cmd.spawn().expect("hog")))
    };
    std::thread::sleep(Duration::from_millis(1500));
    let before = gov.tick().expect("tick")[0].cpu_seconds_total;
    hog.child().kill().expect("kill the hog");
    hog.child().wait().expect("reap the hog");
    child.remove().expect("remove the child cgroup");
    std::thread::sleep(Duration::from_millis(300));
    let st = gov.tick().expect("tick")[0].clone();
    eprintln!("before removal {before:.3} s, after {:.3} s, rate {:.1}%", st.cpu_seconds_total, st.cpu_percent);
    assert!(before > 0.3, "the child's busy loop was counted: {before}");
    assert!(st.cpu_seconds_total >= before, "total went back: {} < {before}", st.cpu_seconds_total);
    assert!(st.cpu_percent < 150.0, "no spike: {}%", st.cpu_percent);
}

/// A VMM re-creates the VM's interface: the governor re-attaches on the
/// next tick, the counters continue and the limit holds again.
#[test]
fn a_recreated_interface_is_governed_again() {
    require_root();
    require_tool("iperf3");
    let pins = PinDir::new();
    let net = VmNet::new(2);
    let (cg0, cg1) = (TestCgroup::new("rob"), TestCgroup::new("rob"));
    let host = net.ports[0].1.name.clone();
    let cfg = governor_config(
        &pins,
        &unique("gifb"),
        &[("vm0", &cg0, Some(&host)), ("vm1", &cg1, Some(&net.ports[1].1.name))],
    );
    let mut gov = Governor::new(&cfg).expect("governor");
    gov.set_limit(
        "vm0",
        Direction::Egress,
        Limit { mode: Mode::Police, rate_bps: 20_000_000, burst_bytes: 625_000, packet_rate: None },
    )
    .expect("limit");
    gov.tick().expect("tick");
    net.ports[0].0.exec(&["ping", "-c", "3", "-i", "0.05", "-q", &net.ports[1].2]);
    let tx_before = gov.tick().expect("tick")[0].tx_bytes_total;
    assert!(tx_before > 0);

    // Re-create the veth pair under the same host-side name.
    let (ns, _, addr) = &net.ports[0];
    let peer = unique("gvp");
    run(Command::new("ip").args(["link", "del", &host]));
    run(Command::new("ip").args(["link", "add", &host, "type", "veth", "peer", "name", &peer]));
    run(Command::new("ip").args(["link", "set", &peer, "netns", &ns.name]));
    run(Command::new("ip").args(["link", "set", &host, "master", &net.bridge.name, "up"]));
    ns.exec(&["ip", "addr", "add", &format!("{addr}/24"), "dev", &peer]);
    ns.exec(&["ip", "link", "set", &peer, "up"]);
    gov.tick().expect("tick re-attaches");
    // The new link needs a moment (carrier, bridge port) before it carries.
    let reachable = (0..30).any(|_| {
        let ok = ns
            .cmd(&["ping", "-c", "1", "-W", "1", &net.ports[1].2])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success());
        ok.unwrap_or(false) || {
            std::thread::sleep(Duration::from_millis(100));
            false
        }
    });
    assert!(reachable, "the re-created link never carried traffic");

    let port = (20000 + std::process::id() % 20000).to_string();
    let (ns1, _, addr1) = &net.ports[1];
    let _server = Guarded(Some(
        ns1.cmd(&["iperf3", "-s", "-1", "-B", addr1, "-p", &port]).stdout(Stdio::null()).spawn().expect("server"),
    ));
    std::thread::sleep(Duration::from_millis(300));
    let out = ns.exec(&["iperf3", "-J", "-c", addr1, "-p", &port, "-t", "5", "-O", "2"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("iperf3: {}", report["error"]));
    let st = gov.tick().expect("tick")[0].clone();
    eprintln!(
        "after re-creation: {:.1} Mbit/s under a 20 Mbit/s limit; tx total {} -> {}",
        bps / 1e6,
        tx_before,
        st.tx_bytes_total
    );
    assert!(st.tx_bytes_total > tx_before, "the VM's counters continue");
    assert!(bps < 20e6 * 1.1 && bps > 20e6 * 0.8, "the limit holds on the new interface: {bps}");
}

/// An IFB device left by a governor that died does not stop a new one
/// from shaping, and the new one removes it on exit.
#[test]
fn a_stale_ifb_is_replaced() {
    require_root();
    let pins = PinDir::new();
    let net = VmNet::new(1);
    let cg = TestCgroup::new("rob");
    let ifb = unique("gifb");
    run(Command::new("ip").args(["link", "add", &ifb, "type", "ifb"]));
    let _leftover = Link { name: ifb.clone() };
    let mut gov =
        Governor::new(&governor_config(&pins, &ifb, &[("vm", &cg, Some(&net.ports[0].1.name))])).expect("governor");
    gov.set_limit(
        "vm",
        Direction::Egress,
        Limit { mode: Mode::Shape, rate_bps: 10_000_000, burst_bytes: 64 * 1024, packet_rate: None },
    )
    .expect("shaping despite the stale IFB");
    let classes = run(Command::new("tc").args(["class", "show", "dev", &ifb]));
    assert!(String::from_utf8_lossy(&classes.stdout).contains("htb 7a:1"));
    drop(gov);
    let st = Command::new("ip").args(["link", "show", &ifb]).stderr(Stdio::null()).status().expect("ip");
    assert!(!st.success(), "the IFB device is removed on exit");
}

/// A busy task that never leaves its CPU (nothing else wants it) is still
/// seen tick by tick: the per-CPU timer charges the slice in progress. The
/// per-tick CPU time agrees with the kernel's accounting over the same tick.
#[test]
fn a_task_that_never_switches_is_counted_every_tick() {
    require_root();
    let pins = PinDir::new();
    let cg = TestCgroup::new("rob");
    let mut gov = Governor::new(&governor_config(&pins, &unique("gifb"), &[("vm", &cg, None)])).expect("governor");
    let _hog = cg.spawn(&["taskset", "-c", "1", "sh", "-c", "while :; do :; done"]);
    std::thread::sleep(Duration::from_millis(300));
    gov.tick().expect("tick");
    let k0 = cg.cg.cpu_usage_ns().expect("kernel usage");
    let b0 = gov.status()[0].cpu_seconds_total;
    std::thread::sleep(Duration::from_secs(1));
    let st = gov.tick().expect("tick")[0].clone();
    let k1 = cg.cg.cpu_usage_ns().expect("kernel usage");
    let (bpf, kernel) = (st.cpu_seconds_total - b0, (k1 - k0) as f64 / 1e9);
    eprintln!("one tick: eBPF {bpf:.3} s, kernel {kernel:.3} s ({:.1}% CPU)", st.cpu_percent);
    assert!(kernel > 0.2, "the hog ran: {kernel} s");
    // 100 Hz flush: at most 10 ms per CPU unseen at each end of the tick.
    assert!((bpf - kernel).abs() <= 0.03 + 0.02 * kernel, "eBPF {bpf} s vs kernel {kernel} s in one tick");
}
