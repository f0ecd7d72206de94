//! Per-VM eBPF telemetry against the kernel's own accounting, as root.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use governor::netdev;
use governor::telemetry::{BpfTelemetry, Telemetry};
use integration_tests::*;

fn load() -> (BpfTelemetry, PinDir) {
    require_root();
    let pins = PinDir::new();
    let t = BpfTelemetry::load(&pins.0).expect("load and attach the kernel programs");
    (t, pins)
}

/// Two cgroups with different CPU quotas run a CPU hog for 5 s; the eBPF
/// CPU time of each agrees with the kernel's accounting within 2%.
#[test]
fn cpu_time_matches_kernel_accounting() {
    require_tool("stress-ng");
    let (tel, _pins) = load();
    let a = TestCgroup::new("cpua");
    let b = TestCgroup::new("cpub");
    a.cg.set_cpu_quota(60_000, 100_000).expect("quota a");
    b.cg.set_cpu_quota(25_000, 100_000).expect("quota b");
    let (ida, idb) = (a.cg.id().expect("id"), b.cg.id().expect("id"));
    let (bpf_a0, bpf_b0) = (tel.cgroup(ida).expect("a").on_cpu_ns, tel.cgroup(idb).expect("b").on_cpu_ns);
    let (k_a0, k_b0) = (a.cg.cpu_usage_ns().expect("a"), b.cg.cpu_usage_ns().expect("b"));

    let mut ha = a.spawn(&["stress-ng", "--cpu", "1", "--timeout", "5s", "--quiet"]);
    let mut hb = b.spawn(&["stress-ng", "--cpu", "1", "--timeout", "5s", "--quiet"]);
    assert!(ha.wait_timeout(Duration::from_secs(20)).expect("hog a ends").success());
    assert!(hb.wait_timeout(Duration::from_secs(20)).expect("hog b ends").success());

    for (name, cg, id, bpf0, k0, quota) in [("a", &a, ida, bpf_a0, k_a0, 0.60), ("b", &b, idb, bpf_b0, k_b0, 0.25)] {
        let bpf = (tel.cgroup(id).expect("stats").on_cpu_ns - bpf0) as f64;
        let kernel = (cg.cg.cpu_usage_ns().expect("usage") - k0) as f64;
        let err = rel_err(bpf, kernel);
        eprintln!("cgroup {name}: eBPF {:.3} s, kernel {:.3} s, error {:.2}%", bpf / 1e9, kernel / 1e9, err * 100.0);
        assert!(err <= 0.02, "cgroup {name}: eBPF {bpf} ns vs kernel {kernel} ns ({:.2}% off)", err * 100.0);
        // The quota held (a ceiling: on a busy host a hog may get less).
        let ceiling = quota * 5e9 * 1.1;
        assert!(bpf > 0.0 && bpf < ceiling, "cgroup {name}: {bpf} ns of CPU under a {quota} quota for 5 s");
    }
}

/// iperf3 between two namespaces over a veth, both directions: the tc
/// counters on the host end agree with the interface statistics within 1%.
#[test]
fn network_bytes_match_interface_stats() {
    require_tool("iperf3");
    let (mut tel, _pins) = load();
    let net = VmNet::new(2);
    let (ns_a, host_a, _) = &net.ports[0];
    let (ns_b, _, addr_b) = &net.ports[1];
    let ifindex = tel.attach_interface(&host_a.name).expect("attach tc");
    assert_eq!(ifindex, netdev::ifindex(&host_a.name).expect("ifindex"));
    std::thread::sleep(Duration::from_millis(200));
    let bpf0 = tel.net(ifindex).expect("net");
    let if0 = netdev::stats(&host_a.name).expect("stats");

    iperf3_both_ways(ns_a, ns_b, addr_b, 2);

    let bpf = tel.net(ifindex).expect("net");
    let ifs = netdev::stats(&host_a.name).expect("stats");
    let pairs = [
        ("rx_bytes", bpf.rx_bytes - bpf0.rx_bytes, ifs.rx_bytes - if0.rx_bytes),
        ("tx_bytes", bpf.tx_bytes - bpf0.tx_bytes, ifs.tx_bytes - if0.tx_bytes),
        ("rx_packets", bpf.rx_packets - bpf0.rx_packets, ifs.rx_packets - if0.rx_packets),
        ("tx_packets", bpf.tx_packets - bpf0.tx_packets, ifs.tx_packets - if0.tx_packets),
    ];
    for (what, b, k) in pairs {
        let err = rel_err(b as f64, k as f64);
        eprintln!("{what}: eBPF {b}, interface {k}, error {:.3}%", err * 100.0);
        assert!(k > 1000, "{what}: too little traffic to compare ({k})");
        assert!(err <= 0.01, "{what}: eBPF {b} vs interface {k}");
    }
    tel.detach_interface(&host_a.name);
}

fn runq_delay_of(tel: &BpfTelemetry, cg: &TestCgroup, hogs: &str) -> (f64, u64) {
    let id = cg.cg.id().expect("id");
    let before = tel.cgroup(id).expect("stats");
    let mut h = cg.spawn(&["taskset", "-c", "1", "stress-ng", "--cpu", hogs, "--timeout", "3s", "--quiet"]);
    assert!(h.wait_timeout(Duration::from_secs(20)).expect("hogs end").success());
    let after = tel.cgroup(id).expect("stats");
    ((after.runq_delay_ns - before.runq_delay_ns) as f64, after.runq_count - before.runq_count)
}

/// Four CPU hogs pinned to one CPU wait in the run queue at least 10x as
/// long as one hog alone in the same cgroup.
#[test]
fn runq_delay_shows_noisy_neighbours() {
    require_tool("stress-ng");
    let (tel, _pins) = load();
    let cg = TestCgroup::new("rq");
    let (alone, n1) = runq_delay_of(&tel, &cg, "1");
    let (crowded, n4) = runq_delay_of(&tel, &cg, "4");
    eprintln!("run-queue delay: alone {:.1} ms ({n1} waits), 4 hogs {:.1} ms ({n4} waits)", alone / 1e6, crowded / 1e6);
    assert!(n4 > 0, "no run-queue waits seen with 4 hogs on one CPU");
    assert!(crowded >= 10.0 * alone, "4 hogs: {crowded} ns, alone: {alone} ns");
    // 4 runnable hogs on one CPU for ~3 s: each waits ~3/4 of the time.
    assert!(crowded > 3e9, "4 hogs on one CPU for 3 s waited only {crowded} ns");
    let stats = tel.cgroup(cg.cg.id().expect("id")).expect("stats");
    assert_eq!(stats.runq_hist.iter().sum::<u64>(), stats.runq_count, "histogram counts every wait");
}

/// A process touching N MiB raises the cgroup's working set by at least N
/// MiB, and the eBPF page-fault count agrees with memory.stat within 5%.
#[test]
fn memory_working_set_and_faults() {
    const MIB: u64 = 256;
    let (tel, _pins) = load();
    let cg = TestCgroup::new("mem");
    let id = cg.cg.id().expect("id");
    let m0 = cg.cg.memory().expect("memory").expect("a memory controller covers the cgroup");
    let f0 = tel.cgroup(id).expect("stats").page_faults;
    let touch = bin_dir().join("touch");
    assert!(touch.exists(), "{} missing (built with the tests)", touch.display());
    let mut h = cg.spawn(&[touch.to_str().expect("utf8 path"), &MIB.to_string()]);
    let mut line = String::new();
    BufReader::new(h.child().stdout.take().expect("stdout")).read_line(&mut line).expect("read");
    assert_eq!(line.trim(), "ready");
    let m1 = cg.cg.memory().expect("memory").expect("memory");
    let f1 = tel.cgroup(id).expect("stats").page_faults;
    drop(h.child().stdin.take());
    h.wait_timeout(Duration::from_secs(10)).expect("toucher exits");

    let grew = m1.working_set_bytes.saturating_sub(m0.working_set_bytes);
    eprintln!("working set grew {} MiB for {MIB} MiB touched", grew >> 20);
    assert!(grew >= MIB << 20, "working set grew {grew} bytes, expected >= {} ", MIB << 20);
    let bpf = (f1 - f0) as f64;
    let kernel = (m1.pgfault - m0.pgfault) as f64;
    let err = rel_err(bpf, kernel);
    eprintln!("page faults: eBPF {bpf}, memory.stat {kernel}, error {:.2}%", err * 100.0);
    assert!(bpf >= (MIB * 256) as f64, "at least one fault per 4 KiB page");
    assert!(err <= 0.05, "faults: eBPF {bpf} vs memory.stat {kernel}");
}

/// A process that outgrows its cgroup's memory limit is OOM-killed, and the
/// kill arrives through the ring buffer with the victim's pid.
#[test]
fn oom_kill_is_reported() {
    let (mut tel, _pins) = load();
    let cg = TestCgroup::new("oom");
    cg.cg.set_memory_limit(64 << 20).expect("limit");
    // Only kills from here on count (earlier events are not this test's).
    tel.drain_oom();
    let touch = bin_dir().join("touch");
    let mut h = cg.spawn(&[touch.to_str().expect("utf8 path"), "512"]);
    let pid = h.child().id();
    let st = h.wait_timeout(Duration::from_secs(20)).expect("the toucher dies");
    assert!(!st.success(), "a 512 MiB toucher survived a 64 MiB limit");
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut seen: Vec<u32> = Vec::new();
    while Instant::now() < deadline && !seen.contains(&pid) {
        seen.extend(tel.drain_oom().iter().map(|e| e.pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(seen.contains(&pid), "no OOM event for pid {pid}; saw {seen:?}");
    assert!(tel.cgroup(cg.cg.id().expect("id")).expect("stats").oom_kills >= 1);
}
