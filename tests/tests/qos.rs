//! QoS flow limiting with real traffic between namespaces the tests create.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use governor::config::Config;
use governor::governor::Governor;
use governor::qos::{Direction, Limit, Mode};
use integration_tests::*;
use serde_json::Value;

/// A governor watching `n` VMs named vm0.. on a fresh VM network.
struct Rig {
    gov: Governor,
    net: VmNet,
    _cgs: Vec<TestCgroup>,
    _pins: PinDir,
    port: u16,
}

fn rig(n: usize) -> Rig {
    require_root();
    require_tool("iperf3");
    let net = VmNet::new(n);
    let pins = PinDir::new();
    let mut text = format!("pin_dir = {:?}\nqos_ifb = {:?}\n", pins.0, unique("gifb"));
    let mut cgs = Vec::new();
    for (i, (_, host, _)) in net.ports.iter().enumerate() {
        let cg = TestCgroup::new("qos");
        text.push_str(&format!(
            "[[vm]]\nname = \"vm{i}\"\ncgroup = {:?}\ninterfaces = [{:?}]\n",
            cg.cg.rel().to_string_lossy(),
            host.name
        ));
        cgs.push(cg);
    }
    let cfg = Config::parse(&text).expect("config");
    let gov = Governor::new(&cfg).expect("governor");
    let port = 20000 + (std::process::id() % 20000) as u16;
    Rig { gov, net, _cgs: cgs, _pins: pins, port }
}

fn limit(mode: Mode, rate_bps: u64, burst_bytes: u64) -> Limit {
    Limit { mode, rate_bps, burst_bytes, packet_rate: None }
}

/// The burst a policer needs for TCP: what the governor asks for
/// (`governor::qos::tcp_min_burst`: 250 ms of the rate, at least 128 KiB),
/// unless GOV_TEST_BURST_MS says how many ms of the rate to try. Shaping
/// needs less, but the same value keeps the two modes comparable.
fn tcp_burst(rate_bps: u64) -> u64 {
    match std::env::var("GOV_TEST_BURST_MS").ok().and_then(|v| v.parse::<u64>().ok()) {
        Some(ms) => (rate_bps / 8 * ms / 1000).max(128 * 1024),
        None => governor::qos::tcp_min_burst(rate_bps),
    }
}

impl Rig {
    /// iperf3 server in VM `to`, client in VM `from`; returns the client's
    /// JSON report. `extra` adds client options.
    fn iperf(&self, from: usize, to: usize, secs: u32, extra: &[&str]) -> Value {
        let port = (self.port + to as u16).to_string();
        let (ns_to, _, addr_to) = &self.net.ports[to];
        let _server = Guarded(Some(
            ns_to
                .cmd(&["iperf3", "-s", "-1", "-B", addr_to, "-p", &port])
                .stdout(Stdio::null())
                .spawn()
                .expect("iperf3 -s"),
        ));
        std::thread::sleep(Duration::from_millis(300));
        let secs = secs.to_string();
        let mut args = vec!["iperf3", "-J", "-c", addr_to, "-p", &port, "-t", &secs];
        args.extend_from_slice(extra);
        let out = self.net.ports[from].0.exec(&args);
        serde_json::from_slice(&out.stdout).expect("iperf3 JSON")
    }
}

fn received_bps(report: &Value) -> f64 {
    report["end"]["sum_received"]["bits_per_second"].as_f64().expect("sum_received.bits_per_second")
}

fn check_tcp(mode: Mode, dir: Direction, rate_bps: u64) {
    check_tcp_with(limit(mode, rate_bps, tcp_burst(rate_bps)), dir);
}

/// One TCP flow through `l`: goodput within the mode's bounds of the rate.
fn check_tcp_with(l: Limit, dir: Direction) {
    let (mode, rate_bps, burst) = (l.mode, l.rate_bps, l.burst_bytes);
    let mut r = rig(2);
    r.gov.set_limit("vm0", dir, l).expect("set limit");
    // egress: vm0 sends; ingress: vm0 receives (-R makes the server send).
    let rev: &[&str] = if dir == Direction::Ingress { &["-R"] } else { &[] };
    let mut args = vec!["-O", "2"];
    args.extend_from_slice(rev);
    let (from, to) = (0, 1);
    let report = r.iperf(from, to, 8, &args);
    let got = received_bps(&report);
    let ratio = got / rate_bps as f64;
    eprintln!(
        "{mode:?} {dir:?} {} Mbit/s, burst {} KiB: goodput {:.2} Mbit/s ({:+.1}%)",
        rate_bps / 1_000_000,
        burst / 1024,
        got / 1e6,
        (ratio - 1.0) * 100.0
    );
    let (lo, hi) = match mode {
        Mode::Shape => (0.95, 1.05),
        Mode::Police => (0.90, 1.02),
    };
    assert!(ratio >= lo && ratio <= hi, "{mode:?} {dir:?} at {rate_bps} bit/s: goodput {got} bit/s (ratio {ratio:.3})");
    let st = r.gov.limits().expect("limits");
    let s = st.iter().find(|l| l.vm == "vm0" && l.direction == dir).expect("limit listed");
    assert!(s.passed_packets > 0, "counters: {s:?}");
    if mode == Mode::Police {
        assert!(s.tokens_bytes.is_some());
    }
}

/// What a user gets who polices TCP: a 64 KiB burst (what TCP then got
/// was a tenth of the rate) is refused at 10, 100 and 1,000 Mbit/s naming
/// the burst TCP needs, and with that burst, or the help text's example
/// (100mbit, 3mb), one TCP flow gets at least 90% of the rate.
#[test]
fn police_refuses_a_burst_too_small_for_tcp_and_the_burst_it_names_gives_tcp_the_rate() {
    use governor::qos::{LimitSpec, Quantity};
    let mut cases = Vec::new();
    for rate in ["10mbit", "100mbit", "1gbit"] {
        let spec = LimitSpec {
            mode: Mode::Police,
            rate: Quantity::Text(rate.into()),
            burst: Quantity::Text("64kb".into()),
            packet_rate: None,
        };
        let e = spec.check("limit.egress").expect_err("a 64 KiB police burst for TCP");
        assert_eq!(e.field, "limit.egress.burst");
        eprintln!("{rate}, 64kb: {}", e.reason);
        let named = e
            .reason
            .split("at least ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no burst named: {}", e.reason));
        cases.push((rate, named.to_string()));
    }
    cases.push(("100mbit", "3mb".to_string()));
    for (rate, burst) in cases {
        let spec = LimitSpec {
            mode: Mode::Police,
            rate: Quantity::Text(rate.into()),
            burst: Quantity::Text(burst.clone()),
            packet_rate: None,
        };
        let l = spec.check("limit.egress").unwrap_or_else(|e| panic!("{rate} with {burst}: {e}"));
        check_tcp_with(l, Direction::Egress);
    }
}

#[test]
fn shape_tcp_egress_10_100_1000() {
    for rate in [10_000_000, 100_000_000, 1_000_000_000] {
        check_tcp(Mode::Shape, Direction::Egress, rate);
    }
}

#[test]
fn police_and_shape_tcp_ingress_100() {
    check_tcp(Mode::Police, Direction::Ingress, 100_000_000);
    check_tcp(Mode::Shape, Direction::Ingress, 100_000_000);
}

/// UDP offered at twice the rate: at most rate + 2% is delivered, and the
/// policer's drop counter equals what the receiver lost (±1%).
#[test]
fn police_udp_at_twice_the_rate() {
    let mut r = rig(2);
    let rate = 100_000_000u64;
    r.gov.set_limit("vm0", Direction::Egress, limit(Mode::Police, rate, 64 * 1024)).expect("set limit");
    let before = r.gov.limits().expect("limits")[0].clone();
    let report = r.iperf(0, 1, 3, &["-u", "-b", "200M", "-l", "1400"]);
    let after = r.gov.limits().expect("limits")[0].clone();
    let sum = &report["end"]["sum"];
    let lost = sum["lost_packets"].as_f64().expect("lost_packets");
    let secs = sum["seconds"].as_f64().expect("seconds");
    let total = sum["packets"].as_f64().expect("packets");
    let delivered_bps = (total - lost) * 1400.0 * 8.0 / secs;
    let dropped = (after.dropped_packets - before.dropped_packets) as f64;
    eprintln!(
        "UDP 2x: delivered {:.1} Mbit/s payload, receiver lost {lost}, policer dropped {dropped}",
        delivered_bps / 1e6
    );
    assert!(delivered_bps <= rate as f64 * 1.02, "delivered {delivered_bps} bit/s over a {rate} bit/s limit");
    assert!(delivered_bps >= rate as f64 * 0.80, "delivered only {delivered_bps} bit/s");
    assert!(rel_err(dropped, lost) <= 0.01, "policer dropped {dropped}, receiver lost {lost}");
}

/// Lowering a running flow's limit from 100 to 20 Mbit/s takes effect
/// within a second; the flow is not restarted and no program is reattached.
/// Measured at the receiver, averaged from one second after the change to
/// the end (a policer's rate over half-second windows swings with TCP's
/// recoveries; its average is what it enforces).
#[test]
fn rate_change_takes_effect_within_a_second() {
    let mut r = rig(2);
    r.gov.set_limit("vm0", Direction::Egress, limit(Mode::Police, 100_000_000, tcp_burst(100_000_000))).expect("100");
    let port = (r.port + 1).to_string();
    let (ns_to, _, addr_to) = &r.net.ports[1];
    let server = ns_to
        .cmd(&["iperf3", "-s", "-1", "-J", "-i", "0.25", "-B", addr_to, "-p", &port])
        .stdout(Stdio::piped())
        .spawn()
        .expect("server");
    std::thread::sleep(Duration::from_millis(300));
    let mut client = Guarded(Some(
        r.net.ports[0]
            .0
            .cmd(&["iperf3", "-c", addr_to, "-p", &port, "-t", "8"])
            .stdout(Stdio::null())
            .spawn()
            .expect("client"),
    ));
    let started = Instant::now();
    // 2.5 s of "before" window: over 1.5 s one TCP recovery under the
    // policer was seen to pull the average to 70 Mbit/s (once, in a full
    // test run; 102-103 Mbit/s in isolation).
    std::thread::sleep(Duration::from_millis(4000));
    // The receiver's clock starts when the connection is accepted, a little
    // after `started`, so this is an upper bound of the change time on the
    // receiver's clock: the "after" window really starts >= 1 s after it.
    let changed_at = started.elapsed().as_secs_f64();
    r.gov.set_limit("vm0", Direction::Egress, limit(Mode::Police, 20_000_000, tcp_burst(20_000_000))).expect("20");
    client.wait_timeout(Duration::from_secs(20)).expect("client ends");
    let out = server.wait_with_output().expect("server output");
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let intervals = report["intervals"].as_array().expect("intervals");
    let (mut before, mut after) = ((0.0, 0.0), (0.0, 0.0));
    for iv in intervals {
        let s = &iv["sum"];
        let start = s["start"].as_f64().unwrap_or(0.0);
        let bytes = s["bytes"].as_f64().unwrap_or(0.0);
        let secs = s["seconds"].as_f64().unwrap_or(0.0);
        if start >= changed_at + 1.0 {
            after = (after.0 + bytes, after.1 + secs);
        } else if start >= 1.0 && start + secs <= changed_at - 0.5 {
            before = (before.0 + bytes, before.1 + secs);
        }
    }
    let (b, a) = (before.0 * 8.0 / before.1, after.0 * 8.0 / after.1);
    eprintln!("receiver: {:.1} Mbit/s before the change, {:.1} Mbit/s from 1 s after it", b / 1e6, a / 1e6);
    assert!(b > 80e6, "the flow ran near 100 Mbit/s before: {b}");
    // A token bucket's promise over any window of T seconds: at most
    // rate * T + burst. The burst at the new rate is what may carry over.
    let allowance = tcp_burst(20_000_000) as f64 * 8.0 / after.1;
    assert!(a <= 20e6 * 1.02 + allowance, "from a second after the change: {a} bit/s (burst allowance {allowance})");
    assert!(a >= 20e6 * 0.80, "the flow continued at the new rate: {a} bit/s");
}

/// Two VMs with different limits sending at once each get their own rate.
#[test]
fn two_vms_do_not_affect_each_other() {
    let mut r = rig(3);
    r.gov.set_limit("vm0", Direction::Egress, limit(Mode::Police, 30_000_000, tcp_burst(30_000_000))).expect("vm0");
    r.gov.set_limit("vm1", Direction::Egress, limit(Mode::Shape, 120_000_000, tcp_burst(120_000_000))).expect("vm1");
    let (ns2, _, addr2) = &r.net.ports[2];
    let ports = [(r.port + 10).to_string(), (r.port + 11).to_string()];
    let _servers: Vec<Guarded> = ports
        .iter()
        .map(|p| {
            Guarded(Some(
                ns2.cmd(&["iperf3", "-s", "-1", "-B", addr2, "-p", p]).stdout(Stdio::null()).spawn().expect("server"),
            ))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let clients: Vec<_> = (0..2)
        .map(|i| {
            r.net.ports[i]
                .0
                .cmd(&["iperf3", "-J", "-c", addr2, "-p", &ports[i], "-t", "6", "-O", "2"])
                .stdout(Stdio::piped())
                .spawn()
                .expect("client")
        })
        .collect();
    let reports: Vec<Value> = clients
        .into_iter()
        .map(|c| serde_json::from_slice(&c.wait_with_output().expect("output").stdout).expect("JSON"))
        .collect();
    let rates: Vec<f64> = reports.iter().map(received_bps).collect();
    // HTB's rate counts frames; TCP payload is at most mss / frame of it
    // (0.956 with timestamps on a 1500-byte MTU). Two flows, the policer
    // and the shaper's segmentation on two CPUs leave vm1 within 1% of that
    // ceiling, so its bound is taken on the frames it needed.
    let mtu: f64 = std::fs::read_to_string(format!("/sys/class/net/{}/mtu", r.net.ports[1].1.name))
        .expect("vm1's host-side MTU")
        .trim()
        .parse()
        .expect("MTU");
    let mss = reports[1]["start"]["tcp_mss_default"].as_f64().expect("start.tcp_mss_default");
    let vm1_frames_bps = rates[1] * (mtu + 14.0) / mss;
    eprintln!(
        "vm0 (police 30 Mbit/s): {:.1} Mbit/s, vm1 (shape 120 Mbit/s): {:.1} Mbit/s ({:.1} in frames, mss {mss}, {} retransmits)",
        rates[0] / 1e6,
        rates[1] / 1e6,
        vm1_frames_bps / 1e6,
        reports[1]["end"]["sum_sent"]["retransmits"]
    );
    // The police bound (-10%/+2%), plus what a token bucket may pass on top
    // of its rate in a 6 s window: one burst.
    let allowance = tcp_burst(30_000_000) as f64 * 8.0 / 6.0;
    assert!(rates[0] >= 30e6 * 0.90 && rates[0] <= 30e6 * 1.02 + allowance, "vm0 got {}", rates[0]);
    assert!(
        (120e6 * 0.95..=120e6 * 1.05).contains(&vm1_frames_bps),
        "vm1 got {} bit/s of payload, {vm1_frames_bps} in frames",
        rates[1]
    );
}

/// Shaping shows up in `tc` as the governor made it, and is gone after the
/// limit is removed and after shutdown.
#[test]
fn shaping_is_visible_in_tc_and_removed() {
    let mut r = rig(2);
    let host = r.net.ports[0].1.name.clone();
    r.gov.set_limit("vm0", Direction::Ingress, limit(Mode::Shape, 50_000_000, 200_000)).expect("shape");
    let classes = String::from_utf8_lossy(&run(Command::new("tc").args(["-s", "class", "show", "dev", &host])).stdout)
        .into_owned();
    assert!(classes.contains("class htb 7a:1") && classes.contains("rate 50Mbit"), "tc class show:\n{classes}");
    r.gov.clear_limit("vm0", Direction::Ingress).expect("clear");
    let qd =
        String::from_utf8_lossy(&run(Command::new("tc").args(["qdisc", "show", "dev", &host])).stdout).into_owned();
    assert!(!qd.contains("htb"), "htb left after clearing:\n{qd}");
    // Unknown VM, zero rate: refused, nothing applied.
    let e = r.gov.set_limit("nope", Direction::Egress, limit(Mode::Police, 10_000_000, 64 * 1024)).unwrap_err();
    assert!(e.to_string().contains("nope"));
    r.gov.set_limit("vm0", Direction::Egress, limit(Mode::Shape, 50_000_000, 200_000)).expect("shape egress");
    let ifb = r.gov.limits().expect("limits");
    assert_eq!(ifb.len(), 1);
    drop(r.gov);
    let links = String::from_utf8_lossy(&run(Command::new("ip").args(["-o", "link", "show", "type", "ifb"])).stdout)
        .into_owned();
    assert!(!links.contains(&format!("gifb{}", std::process::id() % 100_000)), "IFB left after shutdown:\n{links}");
}

/// The optional packet rate: small UDP datagrams far above it are held to
/// it, and the drops are counted.
#[test]
fn police_packet_rate() {
    let mut r = rig(2);
    let l = Limit { mode: Mode::Police, rate_bps: 1_000_000_000, burst_bytes: 1 << 20, packet_rate: Some(2000) };
    r.gov.set_limit("vm0", Direction::Egress, l).expect("set limit");
    let report = r.iperf(0, 1, 3, &["-u", "-b", "20M", "-l", "200"]);
    let sum = &report["end"]["sum"];
    let (lost, total, secs) = (
        sum["lost_packets"].as_f64().expect("lost"),
        sum["packets"].as_f64().expect("packets"),
        sum["seconds"].as_f64().expect("seconds"),
    );
    let pps = (total - lost) / secs;
    let dropped = r.gov.limits().expect("limits")[0].dropped_packets;
    eprintln!("packet rate 2000/s: delivered {pps:.0} pkt/s, dropped {dropped}");
    // The bucket starts with a burst of packets (1 MiB / 1514 B = 692).
    assert!(pps <= 2000.0 * 1.02 + 692.0 / secs, "delivered {pps} pkt/s over a 2000 pkt/s limit");
    assert!(pps >= 2000.0 * 0.9, "delivered only {pps} pkt/s");
    assert!(dropped > 0);
}

/// A limit on a VM whose interface is gone is refused, and the limit it
/// had stays listed (nothing half applied).
#[test]
fn limit_on_a_vanished_interface_is_refused() {
    let mut r = rig(2);
    let l = limit(Mode::Police, 50_000_000, 1 << 20);
    r.gov.set_limit("vm1", Direction::Egress, l).expect("first limit");
    let host = r.net.ports[1].1.name.clone();
    run(Command::new("ip").args(["link", "del", &host]));
    let e = r.gov.set_limit("vm1", Direction::Egress, limit(Mode::Shape, 10_000_000, 1 << 20)).unwrap_err();
    assert!(e.to_string().contains("gone"), "{e}");
    let ls = r.gov.limits().expect("limits");
    assert_eq!(ls.len(), 1);
    assert_eq!((ls[0].mode, ls[0].rate_bps), (Mode::Police, 50_000_000), "the old limit stays in force");
}

/// TCP sends 64 KiB GSO packets through the VM's interface; a packet rate
/// counts the segments on the wire, not the GSO packets.
#[test]
fn packet_rate_counts_gso_segments() {
    let mut r = rig(2);
    let l = Limit { mode: Mode::Police, rate_bps: 1_000_000_000, burst_bytes: 1 << 20, packet_rate: Some(1000) };
    r.gov.set_limit("vm0", Direction::Egress, l).expect("set limit");
    let report = r.iperf(0, 1, 4, &["-O", "1"]);
    let bps = received_bps(&report);
    let pps = bps / 8.0 / 1448.0;
    eprintln!("TCP under 1000 pkt/s: {:.2} Mbit/s = {pps:.0} full segments/s", bps / 1e6);
    // The packet bucket starts with 692 packets (1 MiB of full frames).
    assert!(pps <= 1000.0 * 1.02 + 692.0 / 4.0, "{pps} segments/s through a 1000 pkt/s limit");
    assert!(pps >= 300.0, "TCP still flows: {pps} segments/s");
}

/// Every CPU polices frames into one VM at once, millions a second, through
/// the kernel's BPF_PROG_TEST_RUN (`bpftool prog run` of the pinned egress
/// program, one per CPU, each pinned to its CPU). The policer takes no lock:
/// each bucket is one word moved by compare-and-exchange. What passes is
/// the burst plus the rate over the time, no more than one frame in advance
/// per CPU, and not much less; every frame is judged and counted once.
#[test]
fn police_is_exact_when_every_cpu_races_for_the_bucket() {
    race_for_the_bucket(None);
}

/// The same race with a packet rate that binds before the byte rate: the
/// packet bucket is asked first and charged after the byte bucket admits.
#[test]
fn packet_rate_is_exact_when_every_cpu_races_for_the_bucket() {
    race_for_the_bucket(Some(2_000));
}

/// The CPUs this process may run on (its affinity mask).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills the cpu_set_t on our stack.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
            0,
            "sched_getaffinity: {}",
            std::io::Error::last_os_error()
        );
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

fn race_for_the_bucket(packet_rate: Option<u64>) {
    require_tool("bpftool");
    require_tool("taskset");
    const RUNS: u64 = 20_000_000;
    // The interface's own traffic meanwhile (IPv6 neighbour discovery) is
    // judged and counted too: a few packets.
    const OWN_TRAFFIC: u64 = 50;
    let cpus = allowed_cpus();
    assert!(cpus.len() >= 2, "this test needs two CPUs to race; this process may use {cpus:?}");
    let mut r = rig(1);
    let lim = Limit { packet_rate, ..limit(Mode::Police, 100_000_000, 128 * 1024) };
    let dir = TempDir::new("police-race").expect("temp dir");
    // A full frame passing the VM's interface.
    let frame = testrun::frame();
    let frame_len = frame.len() as u64;
    std::fs::write(dir.path().join("frame"), &frame).expect("write frame");
    let ifindex = r.net.ports[0].1.ifindex().expect("the VM interface's ifindex");
    std::fs::write(dir.path().join("ctx"), testrun::skb_ctx(ifindex)).expect("write ctx");
    let prog = r._pins.0.join("prog_gov_tc_egress");

    r.gov.tick().expect("tick");
    let rx_before = r.gov.status()[0].rx_bytes_total;
    // Into the VM: the interface's egress. The buckets start full.
    r.gov.set_limit("vm0", Direction::Ingress, lim).expect("set limit");
    let start = Instant::now();
    let mut runs: Vec<_> = cpus
        .iter()
        .map(|cpu| {
            Guarded::new(
                Command::new("taskset")
                    .args(["-c", &cpu.to_string(), "bpftool", "prog", "run", "pinned"])
                    .arg(&prog)
                    .arg("data_in")
                    .arg(dir.path().join("frame"))
                    .arg("ctx_in")
                    .arg(dir.path().join("ctx"))
                    .args(["repeat", &RUNS.to_string()])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("start bpftool prog run"),
            )
        })
        .collect();
    let mut longest_ns = 0f64;
    for run in &mut runs {
        let (mut out, mut err) = (String::new(), String::new());
        let child = run.child();
        std::io::Read::read_to_string(&mut child.stdout.take().expect("stdout"), &mut out).expect("read stdout");
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err).expect("read stderr");
        let status = child.wait().expect("wait for bpftool");
        assert!(status.success(), "bpftool prog run: {err}");
        let avg = testrun::duration_ns(&out).unwrap_or_else(|| panic!("no duration in {out:?}"));
        longest_ns = longest_ns.max(avg * RUNS as f64);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let l = r.gov.limits().expect("limits")[0].clone();
    r.gov.tick().expect("tick");
    let rx = r.gov.status()[0].rx_bytes_total - rx_before;

    let offered = cpus.len() as u64 * RUNS;
    let ahead = cpus.len() as u64 + OWN_TRAFFIC;
    eprintln!(
        "{} CPUs x {RUNS} frames in {elapsed:.3} s (longest run {:.3} s): passed {} bytes in {} frames, dropped {}",
        cpus.len(),
        longest_ns / 1e9,
        l.passed_bytes,
        l.passed_packets,
        l.dropped_packets
    );
    let judged = l.passed_packets + l.dropped_packets;
    assert!((offered..=offered + OWN_TRAFFIC).contains(&judged), "{judged} judged for {offered} frames run");
    assert!(
        (offered * frame_len..=(offered + OWN_TRAFFIC) * frame_len).contains(&rx),
        "{rx} bytes counted on the interface for {offered} frames"
    );
    let bytes_per_s = (lim.rate_bps / 8) as f64;
    let most = lim.burst_bytes as f64 + bytes_per_s * elapsed + (ahead * frame_len) as f64;
    assert!(
        (l.passed_bytes as f64) <= most,
        "passed {} bytes, more than burst + rate x time {most:.0}",
        l.passed_bytes
    );
    match packet_rate {
        None => {
            let least = bytes_per_s * longest_ns / 1e9 * 0.9;
            assert!((l.passed_bytes as f64) >= least, "passed {} bytes, < 0.9 x rate x run {least:.0}", l.passed_bytes);
        }
        Some(pps) => {
            // The packet burst as the governor sets it.
            let b = lim.policer(None, 0).bucket;
            let burst_pkts = b.pkt_burst_ns / b.pkt_cost_ns;
            let most = burst_pkts as f64 + pps as f64 * elapsed + ahead as f64;
            let least = pps as f64 * longest_ns / 1e9 * 0.9;
            eprintln!("packet rate {pps}/s, burst {burst_pkts} packets: allowed {least:.0}..={most:.0} frames");
            assert!((l.passed_packets as f64) <= most, "passed {} frames, more than {most:.0}", l.passed_packets);
            assert!((l.passed_packets as f64) >= least, "passed {} frames, fewer than {least:.0}", l.passed_packets);
        }
    }
}
