//! `bench overhead`: what the governor's kernel programs cost per context
//! switch, against an empty program on the same hook (the floor), in one
//! run: `perf bench sched pipe` on one CPU, alternating detached /
//! attached / floor.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use fixtures::Guarded;

use super::daemon::Daemon;
use super::Row;
use crate::build::release_bin;
use crate::stats::median;

/// Only an empty program on sched_switch: what attaching anything there
/// costs on this host.
fn floor() -> Result<Guarded> {
    let mut child = Guarded::new(
        Command::new(release_bin("governor"))
            .arg("floor-probe")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start governor floor-probe")?,
    );
    let out = child.child().stdout.take().context("floor-probe stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    if line.trim() != "attached" {
        bail!("floor probe did not attach: {line:?}");
    }
    Ok(child)
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

pub fn bench() -> Result<Vec<Row>> {
    const ROUNDS: usize = 7;
    const LOOPS: u32 = 200_000;
    let (mut without, mut with, mut floors) = (Vec::new(), Vec::new(), Vec::new());
    sched_pipe(20_000)?; // warm up
    for _ in 0..ROUNDS {
        without.push(sched_pipe(LOOPS)?);
        // A governor with no VMs: the scheduler and memory programs
        // attached host-wide.
        let g = Daemon::start("")?;
        with.push(sched_pipe(LOOPS)?);
        drop(g);
        let f = floor()?;
        floors.push(sched_pipe(LOOPS)?);
        drop(f);
    }
    let (a, b, f) = (median(&without), median(&with), median(&floors));
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
