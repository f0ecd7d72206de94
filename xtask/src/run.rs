//! `cargo xtask run` (the governor's live demo) and the governor's benches.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench::Row;
use crate::build::{self, root, sh};

fn release_bin(name: &str) -> PathBuf {
    root().join("target/release").join(name)
}

pub fn run(seconds: Option<u64>) -> Result<()> {
    build::all()?;
    let mut cmd = Command::new(release_bin("governor"));
    cmd.arg("demo");
    if let Some(s) = seconds {
        cmd.args(["--seconds", &s.to_string()]);
    }
    sh(&mut cmd)
}

/// A governor with no VMs: the scheduler and memory programs attached
/// host-wide, which is what the overhead bench measures.
struct Attached(Child, PathBuf);

impl Attached {
    fn start() -> Result<Attached> {
        let tag = std::process::id();
        let cfg = std::env::temp_dir().join(format!("governor-bench-{tag}.toml"));
        let sock = format!("/run/governor/bench-{tag}.sock");
        std::fs::write(&cfg, format!("pin_dir = \"/sys/fs/bpf/governor-bench-{tag}\"\nsocket = {sock:?}\n"))?;
        let child = Command::new(release_bin("governor"))
            .args(["run", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start governor")?;
        let start = Instant::now();
        while !std::path::Path::new(&sock).exists() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("governor did not come up");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Attached(child, cfg))
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on our child: SIGTERM lets it unpin.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

/// Only an empty program on sched_switch: what attaching anything there
/// costs on this host.
struct Floor(Child);

impl Floor {
    fn start() -> Result<Floor> {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(release_bin("governor"))
            .arg("floor-probe")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start governor floor-probe")?;
        let out = child.stdout.take().context("floor-probe stdout")?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        if line.trim() != "attached" {
            bail!("floor probe did not attach: {line:?}");
        }
        Ok(Floor(child))
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// `perf bench sched pipe` pinned to one CPU: each op is two context
/// switches (and two wakeups). Returns ns per op.
fn sched_pipe(loops: u32) -> Result<f64> {
    let out = Command::new("taskset")
        .args(["-c", "1", "perf", "bench", "sched", "pipe", "-l", &loops.to_string()])
        .output()
        .context("run perf bench sched pipe")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("perf bench failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    // "            5.123 usecs/op"
    text.lines()
        .find_map(|l| l.trim().strip_suffix("usecs/op").and_then(|v| v.trim().parse::<f64>().ok()))
        .map(|us| us * 1000.0)
        .with_context(|| format!("no usecs/op in perf output:\n{text}"))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn bench_overhead() -> Result<Vec<Row>> {
    const ROUNDS: usize = 7;
    const LOOPS: u32 = 200_000;
    let (mut without, mut with, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    sched_pipe(20_000)?; // warm up
    for _ in 0..ROUNDS {
        without.push(sched_pipe(LOOPS)?);
        let g = Attached::start()?;
        with.push(sched_pipe(LOOPS)?);
        drop(g);
        let f = Floor::start()?;
        floor.push(sched_pipe(LOOPS)?);
        drop(f);
    }
    let (a, b, f) = (median(&mut without), median(&mut with), median(&mut floor));
    let per_switch = (b - a) / 2.0;
    let floor_per_switch = (f - a) / 2.0;
    let slowdown = b / a;
    let verdict = |ok: bool| if ok { "meets goal" } else { "MISSES goal" };
    Ok(vec![
        Row::new("sched pipe, programs detached (ns/op)", format!("{a:.0}"))
            .note(format!("median of {ROUNDS} x {LOOPS} loops, pinned to CPU 1; 1 op = 2 switches + 2 wakeups")),
        Row::new("sched pipe, programs attached (ns/op)", format!("{b:.0}")).peer("same run, alternating"),
        Row::new("added per context switch (ns)", format!("{per_switch:.0}"))
            .note(format!("goal <= 150 ns: {}", verdict(per_switch <= 150.0))),
        Row::new("floor: an empty program on sched_switch (ns per switch)", format!("{floor_per_switch:.0}"))
            .peer("same run, alternating")
            .note("what attaching anything to the hook costs on this host; the governor's own work is the difference"),
        Row::new(
            "governor's programs above the floor (ns per switch)",
            format!("{:.0}", per_switch - floor_per_switch),
        ),
        Row::new("slowdown ratio (attached / detached)", format!("{slowdown:.3}"))
            .note(format!("goal <= 1.03: {}", verdict(slowdown <= 1.03))),
    ])
}

/// Network namespaces and a bridge for the QoS bench: `vm` (watched by the
/// governor, host end `gqh0-N`) and `peer` (`gqh1-N`), 198.18.0.1/.2.
struct QosNet {
    tag: u32,
}

fn ip(args: &[&str]) -> Result<()> {
    sh(Command::new("ip").args(args))
}

impl QosNet {
    fn new() -> Result<QosNet> {
        let n = QosNet { tag: std::process::id() % 10_000 };
        let t = n.tag;
        ip(&["link", "add", &format!("gqbr{t}"), "type", "bridge"])?;
        ip(&["link", "set", &format!("gqbr{t}"), "up"])?;
        for i in 0..2 {
            let ns = format!("gq{i}-{t}");
            ip(&["netns", "add", &ns])?;
            ip(&["link", "add", &format!("gqh{i}-{t}"), "type", "veth", "peer", "name", &format!("gqp{i}-{t}")])?;
            ip(&["link", "set", &format!("gqp{i}-{t}"), "netns", &ns])?;
            ip(&["link", "set", &format!("gqh{i}-{t}"), "master", &format!("gqbr{t}"), "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("198.18.0.{}/24", i + 1), "dev", &format!("gqp{i}-{t}")])?;
            ip(&["-n", &ns, "link", "set", &format!("gqp{i}-{t}"), "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(n)
    }
    fn ns(&self, i: usize) -> String {
        format!("gq{i}-{}", self.tag)
    }
    fn host(&self, i: usize) -> String {
        format!("gqh{i}-{}", self.tag)
    }
}

impl Drop for QosNet {
    fn drop(&mut self) {
        for i in 0..2 {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(i)]).status();
        }
        let _ = Command::new("ip").args(["link", "del", &format!("gqbr{}", self.tag)]).status();
    }
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// One loaded run: a TCP flow into the VM for 8 s and, from its second
/// second, pings into the VM every 10 ms. Returns (goodput bit/s, RTTs ms).
fn loaded_run(net: &QosNet) -> Result<(f64, Vec<f64>)> {
    let server = Command::new("ip")
        .args(["netns", "exec", &net.ns(0), "iperf3", "-s", "-1", "-p", "5299", "-B", "198.18.0.1"])
        .stdout(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let client = Command::new("ip")
        .args(["netns", "exec", &net.ns(1), "iperf3", "-J", "-c", "198.18.0.1", "-p", "5299", "-t", "8", "-O", "2"])
        .stdout(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(2));
    let ping = Command::new("ip")
        .args(["netns", "exec", &net.ns(1), "ping", "-i", "0.01", "-c", "300", "198.18.0.1"])
        .output()?;
    let out = client.wait_with_output()?;
    let mut server = server;
    let _ = server.kill();
    let _ = server.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    let bps = text
        .split("\"sum_received\"")
        .nth(1)
        .and_then(|r| r.split("\"bits_per_second\":").nth(1))
        .and_then(|r| r.split([',', '}']).next())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .context("iperf3 sum_received.bits_per_second")?;
    let rtts: Vec<f64> = String::from_utf8_lossy(&ping.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    if rtts.is_empty() {
        bail!("no ping replies under load");
    }
    Ok((bps, rtts))
}

/// run_time_ns / run_cnt of a pinned program (needs kernel.bpf_stats_enabled).
fn prog_stats(pin: &std::path::Path) -> Result<(u64, u64)> {
    let out = Command::new("bpftool").args(["prog", "show", "pinned"]).arg(pin).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> u64 {
        text.split(name).nth(1).and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    Ok((field("run_time_ns "), field("run_cnt ")))
}

pub fn bench_qos() -> Result<Vec<Row>> {
    const RATE: &str = "100mbit";
    const RATE_BPS: f64 = 100e6;
    // 250 ms at the rate: the burst a policer needs for TCP (README, QoS).
    const BURST: &str = "3125kb";
    let net = QosNet::new()?;
    let tag = net.tag;
    let cfg = std::env::temp_dir().join(format!("governor-bench-qos-{tag}.toml"));
    let sock = format!("/run/governor/bench-qos-{tag}.sock");
    let pins = format!("/sys/fs/bpf/governor-bench-qos-{tag}");
    let layout_cg = format!("/sys/fs/cgroup/unified/governor-bench-qos-{tag}");
    std::fs::create_dir_all(&layout_cg)?;
    std::fs::write(
        &cfg,
        format!(
            "pin_dir = {pins:?}\nsocket = {sock:?}\nqos_ifb = \"gqifb{tag}\"\n[[vm]]\nname = \"vm\"\ncgroup = \"governor-bench-qos-{tag}\"\ninterfaces = [\"{}\"]\n",
            net.host(0)
        ),
    )?;
    let stats_before = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")?;
    let gov =
        Command::new(release_bin("governor")).args(["run", "--config"]).arg(&cfg).stderr(Stdio::null()).spawn()?;
    struct Cleanup(Child, PathBuf, String, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            // SAFETY: plain kill(2) on our child.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let _ = self.0.wait();
            let _ = std::fs::remove_file(&self.1);
            let _ = std::fs::remove_dir(&self.2);
            let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", self.3.trim());
        }
    }
    let _cleanup = Cleanup(
        gov,
        cfg.clone(),
        layout_cg.clone(),
        if stats_before.trim().is_empty() { "0".into() } else { stats_before },
    );
    let start = Instant::now();
    while !std::path::Path::new(&sock).exists() {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("governor did not come up");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let limit =
        |args: &[&str]| sh(Command::new(release_bin("governor")).args(["limit"]).args(args).args(["--socket", &sock]));
    let prog = PathBuf::from(&pins).join("prog_gov_tc_egress");

    let mut rows = Vec::new();
    let mut results = Vec::new();
    // No limit: the programs only count (the baseline of per-packet cost).
    let (c0, n0) = prog_stats(&prog)?;
    let (bps_free, _) = loaded_run(&net)?;
    let (c1, n1) = prog_stats(&prog)?;
    let count_ns = (c1 - c0) as f64 / (n1 - n0).max(1) as f64;
    for mode in ["police", "shape"] {
        limit(&["set", "--vm", "vm", "--direction", "ingress", "--mode", mode, "--rate", RATE, "--burst", BURST])?;
        let (c0, n0) = prog_stats(&prog)?;
        let (bps, mut rtt) = loaded_run(&net)?;
        let (c1, n1) = prog_stats(&prog)?;
        limit(&["clear", "--vm", "vm", "--direction", "ingress"])?;
        let per_pkt = (c1 - c0) as f64 / (n1 - n0).max(1) as f64;
        results.push((mode, bps, percentile(&mut rtt, 0.5), percentile(&mut rtt, 0.99), Some(per_pkt)));
    }
    // The kernel's own tbf on the same interface, same rate and burst.
    let host = net.host(0);
    sh(Command::new("tc")
        .args(["qdisc", "add", "dev", &host, "root", "tbf", "rate", RATE, "burst", BURST, "latency", "50ms"]))?;
    let tbf = loaded_run(&net);
    let _ = Command::new("tc").args(["qdisc", "del", "dev", &host, "root"]).status();
    let (bps, mut rtt) = tbf?;
    let (tbf_p50, tbf_p99) = (percentile(&mut rtt, 0.5), percentile(&mut rtt, 0.99));
    let tbf_acc = bps / RATE_BPS;
    results.push(("tbf (kernel)", bps, tbf_p50, tbf_p99, None));

    rows.push(
        Row::new("unlimited TCP into the VM (Mbit/s)", format!("{:.0}", bps_free / 1e6))
            .note(format!("tc-BPF counting only: {count_ns:.0} ns/packet")),
    );
    for (mode, bps, p50, p99, per_pkt) in results {
        let acc = bps / RATE_BPS;
        let mut r =
            Row::new(format!("{mode}: goodput / rate, ping p50 / p99 (ms)"), format!("{acc:.3}, {p50:.2} / {p99:.2}"));
        if mode != "tbf (kernel)" {
            r = r.peer(format!("tbf {tbf_acc:.3}, {tbf_p50:.2} / {tbf_p99:.2}; p99 ratio {:.2}", p99 / tbf_p99));
        }
        if let Some(ns) = per_pkt {
            r = r.note(format!("tc-BPF {ns:.0} ns/packet (bpf_stats)"));
        }
        rows.push(r);
    }
    rows.push(
        Row::new("setup", format!("{RATE}, burst {BURST}, one TCP flow into the VM + ping every 10 ms"))
            .note("goodput is TCP payload; rates count whole frames (payload/frame = 0.956); tbf splits 64 KiB GSO packets into frames, HTB does not: behind one GSO packet a ping waits 5.2 ms at 100 Mbit/s"),
    );
    Ok(rows)
}
