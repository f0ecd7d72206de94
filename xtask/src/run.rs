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
        std::fs::write(
            &cfg,
            format!("pin_dir = \"/sys/fs/bpf/governor-bench-{tag}\"\nsocket = {sock:?}\n"),
        )?;
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

/// `perf bench sched pipe` pinned to one CPU: each op is two context
/// switches (and two wakeups). Returns ns per op.
fn sched_pipe(loops: u32) -> Result<f64> {
    let out = Command::new("taskset")
        .args([
            "-c",
            "1",
            "perf",
            "bench",
            "sched",
            "pipe",
            "-l",
            &loops.to_string(),
        ])
        .output()
        .context("run perf bench sched pipe")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "perf bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // "            5.123 usecs/op"
    text.lines()
        .find_map(|l| {
            l.trim()
                .strip_suffix("usecs/op")
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
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
    let (mut without, mut with) = (Vec::new(), Vec::new());
    sched_pipe(20_000)?; // warm up
    for _ in 0..ROUNDS {
        without.push(sched_pipe(LOOPS)?);
        let g = Attached::start()?;
        with.push(sched_pipe(LOOPS)?);
        drop(g);
    }
    let (a, b) = (median(&mut without), median(&mut with));
    let per_switch = (b - a) / 2.0;
    let slowdown = b / a;
    let verdict = |ok: bool| if ok { "meets goal" } else { "MISSES goal" };
    Ok(vec![
        Row::new("sched pipe, programs detached (ns/op)", format!("{a:.0}")).note(format!(
            "median of {ROUNDS} x {LOOPS} loops, pinned to CPU 1; 1 op = 2 switches + 2 wakeups"
        )),
        Row::new("sched pipe, programs attached (ns/op)", format!("{b:.0}"))
            .peer("same run, alternating"),
        Row::new("added per context switch (ns)", format!("{per_switch:.0}"))
            .note(format!("goal <= 150 ns: {}", verdict(per_switch <= 150.0))),
        Row::new(
            "slowdown ratio (attached / detached)",
            format!("{slowdown:.3}"),
        )
        .note(format!("goal <= 1.03: {}", verdict(slowdown <= 1.03))),
    ])
}

pub fn bench_qos() -> Result<Vec<Row>> {
    bail!("bench qos is not built yet (issue 3)")
}
