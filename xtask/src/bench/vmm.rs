//! `bench vmm`: the embedded VMM's life cycle times (spawn to agent
//! banner, snapshot, restore, diff snapshots), its memory overhead and the
//! control round trip, over 20 runs, against Firecracker's published
//! figures.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fixtures::{Guarded, TempPath};
use serde_json::Value;

use super::Row;
use crate::build::{guest_elf, sh};
use crate::stats::{max, median};

/// Release-build `vmm` binary of the workspace.
fn vmm_bin() -> PathBuf {
    crate::build::release_bin("vmm")
}

/// A JSON-lines client for the VMM control socket (xtask does not build the
/// vmm crate: it would pull KVM and the rust-vmm crates into every xtask run).
struct Ctl {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Ctl {
    fn connect(path: &Path) -> Result<Ctl> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match UnixStream::connect(path) {
                Ok(s) => return Ok(Ctl { w: s.try_clone()?, r: BufReader::new(s) }),
                Err(e) if Instant::now() > deadline => {
                    return Err(e).with_context(|| format!("connect {}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    fn call(&mut self, req: &str) -> Result<Value> {
        writeln!(self.w, "{req}")?;
        let mut line = String::new();
        self.r.read_line(&mut line)?;
        let v: Value = serde_json::from_str(&line).with_context(|| format!("vmm reply to {req}: {line:?}"))?;
        if v["ok"] != Value::Bool(true) {
            bail!("vmm refused {req}: {}", line.trim());
        }
        Ok(v)
    }
}

/// The number named `key` in a reply (at its top level or in `reply`).
fn num(reply: &Value, key: &str) -> Result<f64> {
    reply[key].as_f64().or_else(|| reply["reply"][key].as_f64()).with_context(|| format!("no {key} in {reply}"))
}

fn spawn_vmm(cmd: &mut Command) -> Result<Guarded> {
    Ok(Guarded::new(cmd.spawn().context("spawn vmm")?))
}

struct Run {
    ready_ms: f64,
    ready_cpu_ms: f64,
    overhead_bytes: f64,
    snapshot_ms: f64,
    snapshot_disk_bytes: f64,
    restore_ms: f64,
    restore_to_ping_ms: f64,
    diff_ms: f64,
    diff_bytes: f64,
    rtt_us: Vec<f64>,
}

/// CPU time of every thread of `pid` so far (schedstat run time), in ms.
fn cpu_ms(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0.0 };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>()
        / 1e6
}

/// Guest pages the TOUCH request dirties in a 64 MiB guest (all RAM above
/// the 4 MiB scratch base).
const DIRTY_PAGES: u64 = (60 << 20) / 4096;

struct DirtyRun {
    snapshot_ms: f64,
    snapshot_disk_bytes: f64,
    restore_ms: f64,
    retouch_ms: f64,
}

fn one_run(elf: &Path) -> Result<Run> {
    let (sock, sock2, snap) =
        (TempPath::new("vmm-bench.sock"), TempPath::new("vmm-bench-r.sock"), TempPath::new("vmm-bench.snap"));
    let (sock, sock2, snap_path) = (sock.path(), sock2.path(), snap.path());

    // Process spawn -> the banner on the serial console (piped stdout).
    let t0 = Instant::now();
    let mut child = spawn_vmm(
        Command::new(vmm_bin())
            .args(["--mem-mib", "64", "--serial", "-", "--guest"])
            .arg(elf)
            .arg("--socket")
            .arg(sock)
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )?;
    let out = child.child().stdout.take().context("vmm stdout")?;
    let mut lines = BufReader::new(out).lines();
    loop {
        let line = lines.next().context("vmm exited before the banner")??;
        if line.trim() == "mc-agent ready" {
            break;
        }
    }
    let ready_ms = t0.elapsed().as_secs_f64() * 1e3;
    let ready_cpu_ms = cpu_ms(child.id());

    let mut c = Ctl::connect(sock)?;
    let mut rtt_us = Vec::new();
    for _ in 0..50 {
        rtt_us.push(num(&c.call(r#"{"cmd":"request","op":"ping"}"#)?, "rtt_us")?);
    }
    c.call(r#"{"cmd":"request","op":"step","arg":1000}"#)?;
    let stats = c.call(r#"{"cmd":"stats"}"#)?;
    let overhead_bytes = num(&stats, "rss_bytes")? - num(&stats, "guest_resident_bytes")?;
    c.call(r#"{"cmd":"pause"}"#)?;
    let s = c.call(&format!(r#"{{"cmd":"snapshot","path":"{}"}}"#, snap_path.display()))?;
    let snapshot_ms = num(&s, "snapshot_ms")?;
    let snapshot_disk_bytes = std::fs::metadata(snap_path).map(|m| m.blocks() as f64 * 512.0).unwrap_or(0.0);
    // A diff after one more management step: only what changed.
    c.call(r#"{"cmd":"resume"}"#)?;
    c.call(r#"{"cmd":"request","op":"step","arg":1000}"#)?;
    c.call(r#"{"cmd":"pause"}"#)?;
    let diff = TempPath::new("vmm-bench.diff");
    let d = c.call(&format!(r#"{{"cmd":"snapshot","path":"{}","diff":true}}"#, diff.path().display()))?;
    let (diff_ms, diff_bytes) = (num(&d, "snapshot_ms")?, num(&d, "bytes")?);
    c.call(r#"{"cmd":"shutdown"}"#)?;
    drop(child);

    // Restore into a fresh, empty VMM process.
    let t1 = Instant::now();
    let _child2 = spawn_vmm(
        Command::new(vmm_bin())
            .args(["--serial", "/dev/null", "--socket"])
            .arg(sock2)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    let mut c2 = Ctl::connect(sock2)?;
    let r = c2.call(&format!(r#"{{"cmd":"restore","path":"{}"}}"#, snap_path.display()))?;
    let restore_ms = num(&r, "restore_ms")?;
    c2.call(r#"{"cmd":"resume"}"#)?;
    let p = c2.call(r#"{"cmd":"request","op":"counters"}"#)?;
    let restore_to_ping_ms = t1.elapsed().as_secs_f64() * 1e3;
    if num(&p, "work")? != 1000.0 {
        bail!("restored agent lost its state: {p}");
    }
    c2.call(r#"{"cmd":"shutdown"}"#)?;
    Ok(Run {
        diff_ms,
        diff_bytes,
        ready_ms,
        ready_cpu_ms,
        overhead_bytes,
        snapshot_ms,
        snapshot_disk_bytes,
        restore_ms,
        restore_to_ping_ms,
        rtt_us,
    })
}

/// Snapshot and restore of a guest that dirtied all of its 64 MiB.
fn dirty_run(elf: &Path) -> Result<DirtyRun> {
    let (sock, sock2, snap) =
        (TempPath::new("vmm-bench.sock"), TempPath::new("vmm-bench-r.sock"), TempPath::new("vmm-bench.snap"));
    let (sock, sock2, snap) = (sock.path(), sock2.path(), snap.path());
    let spawn = |args: &[&str], s: &Path| -> Result<Guarded> {
        spawn_vmm(Command::new(vmm_bin()).args(args).arg("--socket").arg(s).stdout(Stdio::null()).stderr(Stdio::null()))
    };
    let elf_s = elf.to_str().context("guest path is not UTF-8")?;
    let child = spawn(&["--mem-mib", "64", "--serial", "/dev/null", "--guest", elf_s], sock)?;
    let mut c = Ctl::connect(sock)?;
    c.call(&format!(r#"{{"cmd":"request","op":"touch","arg":{DIRTY_PAGES}}}"#))?;
    c.call(r#"{"cmd":"pause"}"#)?;
    let s = c.call(&format!(r#"{{"cmd":"snapshot","path":"{}"}}"#, snap.display()))?;
    let snapshot_ms = num(&s, "snapshot_ms")?;
    let snapshot_disk_bytes = std::fs::metadata(snap).map(|m| m.blocks() as f64 * 512.0).unwrap_or(0.0);
    c.call(r#"{"cmd":"shutdown"}"#)?;
    drop(child);

    let _child2 = spawn(&["--serial", "/dev/null"], sock2)?;
    let mut c2 = Ctl::connect(sock2)?;
    let r = c2.call(&format!(r#"{{"cmd":"restore","path":"{}"}}"#, snap.display()))?;
    let restore_ms = num(&r, "restore_ms")?;
    c2.call(r#"{"cmd":"resume"}"#)?;
    // Restore maps RAM lazily: the cost of bringing pages back shows here.
    let t = c2.call(&format!(r#"{{"cmd":"request","op":"touch","arg":{DIRTY_PAGES}}}"#))?;
    let retouch_ms = num(&t, "rtt_us")? / 1e3;
    c2.call(r#"{"cmd":"shutdown"}"#)?;
    Ok(DirtyRun { snapshot_ms, snapshot_disk_bytes, restore_ms, retouch_ms })
}

/// p50 and max of a series.
fn p50_max(v: Vec<f64>) -> (f64, f64) {
    (median(&v), max(&v))
}

/// `cargo xtask bench vmm`.
pub fn bench() -> Result<Vec<Row>> {
    if std::fs::metadata("/dev/kvm").is_err() {
        bail!("/dev/kvm is missing: bench vmm needs KVM");
    }
    let elf = guest_elf();
    if !vmm_bin().exists() {
        sh(crate::build::cargo().args(["build", "--release", "-p", "vmm", "--bin", "vmm"]))?;
    }
    const RUNS: usize = 20;
    let mut runs = Vec::new();
    for i in 0..RUNS {
        runs.push(one_run(&elf).with_context(|| format!("run {i}"))?);
    }
    let mut dirty = Vec::new();
    for i in 0..RUNS {
        dirty.push(dirty_run(&elf).with_context(|| format!("dirty run {i}"))?);
    }
    let col = |f: fn(&Run) -> f64| p50_max(runs.iter().map(f).collect());
    let dcol = |f: fn(&DirtyRun) -> f64| p50_max(dirty.iter().map(f).collect());
    let rtt = p50_max(runs.iter().flat_map(|r| r.rtt_us.iter().copied()).collect());
    let ms = |(p, m): (f64, f64)| format!("p50 {p:.2} ms, max {m:.2} ms");
    let mib = |(p, m): (f64, f64)| format!("p50 {:.2} MiB, max {:.2} MiB", p / 1048576.0, m / 1048576.0);
    Ok(vec![
        Row::new("process spawn to agent banner (64 MiB guest)", ms(col(|r| r.ready_ms)))
            .peer("Firecracker: <= 8 CPU ms to API ready")
            .note(format!("goal < 10 ms; {RUNS} runs; wall time from fork/exec to the banner line")),
        Row::new("CPU time of the VMM to agent banner", ms(col(|r| r.ready_cpu_ms)))
            .peer("Firecracker: <= 8 CPU ms")
            .note("all threads, schedstat"),
        Row::new("VMM RSS excluding guest RAM", mib(col(|r| r.overhead_bytes)))
            .peer("Firecracker: <= 5 MiB")
            .note("VmRSS minus guest pages resident (mincore); goal < 5 MiB"),
        Row::new("control round trip (ping over virtio-console)", format!("p50 {:.1} us, max {:.1} us", rtt.0, rtt.1))
            .note(format!("{} pings; time inside the VMM from queueing the request to the reply", RUNS * 50)),
        Row::new("snapshot create, 64 MiB guest, idle agent", ms(col(|r| r.snapshot_ms)))
            .note(format!("sparse file: {:.0} KiB on disk (p50)", col(|r| r.snapshot_disk_bytes).0 / 1024.0)),
        Row::new("snapshot restore, 64 MiB guest, idle agent (in VMM)", ms(col(|r| r.restore_ms)))
            .peer("Firecracker: snapshot load < 8 ms")
            .note("file -> VM ready to run; RAM mapped MAP_PRIVATE; goal < 10 ms"),
        Row::new("spawn empty VMM + restore + resume + first reply", ms(col(|r| r.restore_to_ping_ms)))
            .note("end to end, from a new process"),
        Row::new("diff snapshot after one management step", ms(col(|r| r.diff_ms))).note(format!(
            "{:.0} KiB (p50): KVM dirty log + device-written pages, state JSON included",
            col(|r| r.diff_bytes).0 / 1024.0
        )),
        Row::new("snapshot create, 64 MiB guest, all RAM dirtied", ms(dcol(|r| r.snapshot_ms))).note(format!(
            "{:.1} MiB on disk (p50); bound by the host disk's page cache",
            dcol(|r| r.snapshot_disk_bytes).0 / 1048576.0
        )),
        Row::new("snapshot restore, 64 MiB guest, all RAM dirtied (in VMM)", ms(dcol(|r| r.restore_ms)))
            .peer("Firecracker: snapshot load < 8 ms")
            .note("does not grow with RAM: pages come back on first touch"),
        Row::new("guest re-touches its 60 MiB after restore", ms(dcol(|r| r.retouch_ms)))
            .note("the deferred cost of the lazy restore (page faults from the file)"),
    ])
}
