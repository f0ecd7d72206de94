//! `bench overhead`: what the governor's kernel programs cost per context
//! switch, against empty programs on the same hook (the floors) and against
//! the tools users already run for the same jobs (libbpf-tools' `runqlat`,
//! run-queue latency, and `cpudist`, on-CPU time), in one run: `perf bench
//! sched pipe` on one CPU, alternating detached / governor / raw-tracepoint
//! floor / tp_btf floor / runqlat / cpudist within each round.
//!
//! Each variant runs once per round, in turn, so all see the same drift of
//! the host; its cost is its lower-quartile run against the detached one
//! (noise here only adds time: two CPUs, builds running beside).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fixtures::Guarded;

use super::daemon::Daemon;
use super::Row;
use crate::build::release_bin;
use crate::stats::{median, median_ci, percentile};

/// A governor's sched_switch program may cost at most this many times the
/// empty program on the same hook (issue 12).
const GOAL_FLOOR_RATIO: f64 = 2.0;
/// `sched pipe` may slow down by at most this ratio with the governor attached.
const GOAL_SLOWDOWN: f64 = 1.05;
/// "Well ahead" of a peer tool: at most this fraction of its cost per switch.
const GOAL_PEER_FRACTION: f64 = 0.5;

/// Only an empty program (`which`: `raw_tp`, `tp_btf` or `tc:<interface>`):
/// what attaching anything to that hook costs on this host. Detached when
/// the returned process is dropped.
pub fn floor(which: &str) -> Result<Guarded> {
    let mut child = Guarded::new(
        Command::new(release_bin("governor"))
            .args(["floor-probe", "--hook", which])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("start governor floor-probe")?,
    );
    let out = child.child().stdout.take().context("floor-probe stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    if line.trim() != "attached" {
        let mut err = String::new();
        if let Some(e) = child.child().stderr.take() {
            // Best effort: the reason the probe gave, for the message below.
            let _ = BufReader::new(e).read_line(&mut err);
        }
        bail!("floor probe {which} did not attach: {line:?} {}", err.trim());
    }
    Ok(child)
}

/// A libbpf-tools peer (`runqlat`, `cpudist`) running with a long interval
/// (it prints nothing during the measurement), up once it holds `links`
/// BPF links (one per attached program).
fn peer(tool: &str, links: usize) -> Result<Guarded> {
    let mut child = Guarded::new(
        Command::new(tool)
            .args(["3600", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("start {tool} (package libbpf-tools; run cargo xtask setup)"))?,
    );
    let fds = format!("/proc/{}/fd", child.id());
    let start = Instant::now();
    loop {
        // An unreadable fd (closed meanwhile) is simply not counted.
        let held = std::fs::read_dir(&fds)
            .map(|d| {
                d.flatten()
                    .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:bpf_link"))
                    .count()
            })
            .unwrap_or(0);
        if held >= links {
            return Ok(child);
        }
        if start.elapsed() > Duration::from_secs(10) || child.child().try_wait()?.is_some() {
            bail!("{tool} did not attach ({held} of {links} links)");
        }
        std::thread::sleep(Duration::from_millis(20));
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

/// Whether the governor's pinned sched_switch program is a `tp_btf`
/// (BPF_PROG_TYPE_TRACING) program rather than a raw tracepoint: its cost
/// is compared with the empty program of the same kind.
fn governor_uses_tp_btf(d: &Daemon) -> Result<bool> {
    // The daemon's socket may appear before its programs are attached.
    let start = Instant::now();
    while !d.pins.join("link_sched_switch").exists() {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("the governor did not attach sched_switch within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = Command::new("bpftool")
        .args(["prog", "show", "pinned"])
        .arg(d.pins.join("prog_sched_switch"))
        .output()
        .context("run bpftool prog show")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "123: tracing  name sched_switch ..." or "123: raw_tracepoint  name ..."
    match text.split_whitespace().nth(1) {
        Some("tracing") => Ok(true),
        Some("raw_tracepoint") => Ok(false),
        _ => bail!("bpftool prog show of the governor's sched_switch: {text:?}"),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Detached,
    Governor,
    FloorRaw,
    FloorBtf,
    /// The tp_btf floor with kernel.bpf_stats_enabled on, as the governor
    /// keeps it once its metrics are read (per-program cost metrics): what
    /// that costs every BPF program on the host.
    FloorBtfStats,
    Runqlat,
    Cpudist,
}

const VARIANTS: [Variant; 7] = [
    Variant::Detached,
    Variant::Governor,
    Variant::FloorRaw,
    Variant::FloorBtf,
    Variant::FloorBtfStats,
    Variant::Runqlat,
    Variant::Cpudist,
];

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// kernel.bpf_stats_enabled on while it lives, restored after.
struct StatsOn(String);

impl StatsOn {
    fn new() -> Result<StatsOn> {
        let before = std::fs::read_to_string(BPF_STATS).with_context(|| format!("read {BPF_STATS}"))?;
        std::fs::write(BPF_STATS, "1").with_context(|| format!("write {BPF_STATS}"))?;
        Ok(StatsOn(before.trim().to_string()))
    }
}

impl Drop for StatsOn {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(BPF_STATS, &self.0) {
            eprintln!("warning: restoring {BPF_STATS} to {}: {e}", self.0);
        }
    }
}

/// Mean run time per run (ns) of each BPF program whose name starts with
/// one of `names`, by the kernel's own count (bpf_stats): run_time_ns /
/// run_cnt as `bpftool prog show --json` reports them.
fn run_times(names: &[&str]) -> Result<Vec<Option<f64>>> {
    let out = Command::new("bpftool").args(["prog", "show", "--json"]).output().context("run bpftool prog show")?;
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool prog show --json")?;
    let progs = progs.as_array().context("bpftool prog show --json: not a list")?;
    Ok(names
        .iter()
        .map(|want| {
            progs.iter().find_map(|p| {
                let name = p.get("name")?.as_str()?;
                let (t, n) = (p.get("run_time_ns")?.as_f64()?, p.get("run_cnt")?.as_f64()?);
                (name.starts_with(want) && n > 0.0).then_some(t / n)
            })
        })
        .collect())
}

/// The sched_switch program's own run time against the empty tp_btf
/// program's, both attached, bpf_stats on, over `sched pipe` on one CPU:
/// the body the governor adds per switch, without the noise of timing
/// whole runs (the stats' two clock reads are in both).
fn body_by_stats() -> Result<(f64, f64)> {
    let mut d = Daemon::start("")?;
    governor_uses_tp_btf(&d)?;
    d.wait_idle()?;
    let _floor = floor("tp_btf")?;
    let _stats = StatsOn::new()?;
    for _ in 0..3 {
        sched_pipe(100_000)?;
    }
    match run_times(&["sched_switch_floor_btf", "sched_switch"])?[..] {
        [Some(floor), Some(gov)] => Ok((gov, floor)),
        _ => bail!("bpftool showed no run time for sched_switch or the tp_btf floor"),
    }
}

pub fn bench() -> Result<Vec<Row>> {
    const ROUNDS: usize = 41;
    const LOOPS: u32 = 100_000;
    // ns/op of each variant, round by round.
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
    let mut tp_btf = None;
    sched_pipe(20_000)?; // warm up
    for _ in 0..ROUNDS {
        for (i, v) in VARIANTS.iter().enumerate() {
            // What is attached during this variant's run; dropped (detached) after.
            let attached: Option<Box<dyn std::any::Any>> = match v {
                Variant::Detached => None,
                // A governor with no VMs: the scheduler and memory programs
                // attached host-wide.
                Variant::Governor => {
                    let mut d = Daemon::start("")?;
                    tp_btf = Some(governor_uses_tp_btf(&d)?);
                    d.wait_idle()?;
                    Some(Box::new(d))
                }
                Variant::FloorRaw => Some(Box::new(floor("raw_tp")?)),
                Variant::FloorBtf => Some(Box::new(floor("tp_btf")?)),
                Variant::FloorBtfStats => Some(Box::new((floor("tp_btf")?, StatsOn::new()?))),
                Variant::Runqlat => Some(Box::new(peer("runqlat", 3)?)),
                Variant::Cpudist => Some(Box::new(peer("cpudist", 1)?)),
            };
            ns[i].push(sched_pipe(LOOPS)?);
            drop(attached);
        }
    }
    let tp_btf = tp_btf.context("the governor never ran")?;
    let (body_gov, body_floor) = body_by_stats()?;
    // The lower quartile of each variant's runs: on this host the noise
    // (another build on the other CPU, the hypervisor) mostly adds time, so
    // the fast end is the steadier estimate of each variant's own cost; a
    // quartile rather than the minimum, which one lucky run decides
    // (medians of paired differences moved by +-40 ns between runs).
    let runs = |v: Variant| -> &[f64] { &ns[VARIANTS.iter().position(|x| *x == v).unwrap_or(0)] };
    let quartile = |v: Variant| -> f64 { percentile(runs(v), 0.25) };
    // Per switch: half an op (an op is two switches).
    let added = |v: Variant| -> f64 { (quartile(v) - quartile(Variant::Detached)) / 2.0 };
    let slowdown = |v: Variant| -> f64 { quartile(v) / quartile(Variant::Detached) };
    // The same ratio taken round by round (each variant's run against the
    // detached run of its own round, so slow drift of the host cancels):
    // its median and a 90% interval for that median, which says whether
    // this run can tell the goal apart from the host's noise at all.
    let paired = |v: Variant| -> String {
        let r: Vec<f64> = runs(v).iter().zip(runs(Variant::Detached)).map(|(a, d)| a / d).collect();
        match median_ci(&r, 0.9) {
            Some((lo, hi)) => format!("round by round: median {:.3}, 90% interval {lo:.3}-{hi:.3}", median(&r)),
            None => format!("round by round: median {:.3}", median(&r)),
        }
    };
    let base = quartile(Variant::Detached);
    let gov = added(Variant::Governor);
    let (floor_raw, floor_btf) = (added(Variant::FloorRaw), added(Variant::FloorBtf));
    let (runqlat, cpudist) = (added(Variant::Runqlat), added(Variant::Cpudist));
    let floor_stats = added(Variant::FloorBtfStats);
    let (hook, floor_same) = if tp_btf { ("tp_btf", floor_btf) } else { ("raw tracepoint", floor_raw) };
    let ratio = gov / floor_same;
    // A floor this small is within the run's noise: no ratio can be judged.
    let floor_ok = floor_same >= 5.0;
    let gov_slowdown = slowdown(Variant::Governor);
    let verdict = |ok: bool| if ok { "meets" } else { "MISSES" };
    Ok(vec![
        Row::new("sched pipe, programs detached (ns/op)", format!("{base:.0}")).note(format!(
            "lower quartile of {ROUNDS} rounds x {LOOPS} loops (median {:.0}), pinned to CPU 1, each variant in turn per \
             round; 1 op = 2 switches + 2 wakeups; costs below: (lower quartile of the variant - of detached) / 2",
            median(&ns[0])
        )),
        Row::new("governor: added per context switch (ns)", format!("{gov:.0}"))
            .peer(format!("floor ({hook}) {floor_same:.0}"))
            .note(format!(
                "the governor's sched_switch is a {hook} program; no metrics exporter, so bpf_stats stay off \
                 (the governor turns them on when its metrics are first read: see the bpf_stats row)"
            )),
        Row::new("governor / empty program on the same hook", format!("{ratio:.2}"))
            .peer(format!("floor ({hook}) {floor_same:.0} ns"))
            .note(if floor_ok {
                format!("goal <= {GOAL_FLOOR_RATIO}: {}", verdict(ratio <= GOAL_FLOOR_RATIO))
            } else {
                format!("goal <= {GOAL_FLOOR_RATIO}: MISSES (floor within this run's noise; run again on a quieter host)")
            }),
        Row::new("sched_switch run time by bpf_stats (ns per run)", format!("{body_gov:.1}"))
            .peer(format!("empty tp_btf {body_floor:.1}"))
            .note(format!(
                "the kernel's own count, both attached, 3 x 100000 loops of sched pipe: the body adds {:.1} ns per switch \
                 (both include the stats' two clock reads)",
                body_gov - body_floor
            )),
        Row::new("floor: empty raw tracepoint on sched_switch (ns per switch)", format!("{floor_raw:.0}"))
            .peer("same run, alternating")
            .note("what attaching anything to the hook costs on this host"),
        Row::new("floor: empty tp_btf on sched_switch (ns per switch)", format!("{floor_btf:.0}"))
            .peer("same run, alternating")
            .note("same kernel path (no trampoline); the program may read task fields directly"),
        Row::new("floor with bpf_stats on: empty tp_btf (ns per switch)", format!("{floor_stats:.0}"))
            .peer(format!("floor (tp_btf) {floor_btf:.0}"))
            .note("kernel.bpf_stats_enabled adds two clock reads to every BPF program run on the host; the governor turns it on only once its metrics are read"),
        Row::new("slowdown ratio, empty tp_btf floor / detached", format!("{:.3}", slowdown(Variant::FloorBtf)))
            .peer(paired(Variant::FloorBtf))
            .note("what attaching anything to sched_switch costs sched pipe here: the slowdown goal's own floor"),
        Row::new("slowdown ratio (governor attached / detached)", format!("{gov_slowdown:.3}"))
            .peer(paired(Variant::Governor))
            .note(format!("goal <= {GOAL_SLOWDOWN}: {}", verdict(gov_slowdown <= GOAL_SLOWDOWN))),
        Row::new("runqlat (libbpf-tools): added per context switch (ns)", format!("{runqlat:.0}"))
            .peer(format!("governor {gov:.0}; governor / runqlat {:.2}", gov / runqlat))
            .note(format!(
                "run-queue latency (3 tp_btf programs: wakeup, wakeup_new, switch); goal governor <= {GOAL_PEER_FRACTION} x: {}",
                verdict(gov <= GOAL_PEER_FRACTION * runqlat)
            )),
        Row::new("cpudist (libbpf-tools): added per context switch (ns)", format!("{cpudist:.0}"))
            .peer(format!("governor {gov:.0}; governor / cpudist {:.2}", gov / cpudist))
            .note(format!(
                "on-CPU time (1 tp_btf program on sched_switch); goal governor <= {GOAL_PEER_FRACTION} x: {}",
                verdict(gov <= GOAL_PEER_FRACTION * cpudist)
            )),
    ])
}
