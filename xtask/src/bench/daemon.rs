//! A `governor run` started for a benchmark: its config in a temporary
//! file, up when its socket appears, stopped with SIGTERM (so it unpins and
//! removes its qdiscs) and its config removed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fixtures::{unique, Guarded, TempPath};

use crate::build::release_bin;

pub struct Daemon {
    child: Guarded,
    _config: TempPath,
    pub socket: PathBuf,
    pub pins: PathBuf,
}

impl Daemon {
    /// Start a governor with unique pins, socket and IFB; `vms` is the
    /// `[[vm]]` part of its config.
    pub fn start(vms: &str) -> Result<Daemon> {
        let tag = unique("gb");
        let config = TempPath::new("governor-bench.toml");
        let socket = PathBuf::from(format!("/run/governor/bench-{tag}.sock"));
        let pins = PathBuf::from(format!("/sys/fs/bpf/governor-bench-{tag}"));
        std::fs::write(
            config.path(),
            format!(
                "pin_dir = {pins:?}\nsocket = {socket:?}\nqos_ifb = \"gbif{}\"\n{vms}",
                std::process::id() % 100_000
            ),
        )
        .with_context(|| format!("write {}", config.path().display()))?;
        let child = Command::new(release_bin("governor"))
            .args(["run", "--config"])
            .arg(config.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start governor")?;
        let mut d = Daemon { child: Guarded::new(child), _config: config, socket, pins };
        let start = Instant::now();
        while !d.socket.exists() {
            if start.elapsed() > Duration::from_secs(10) || d.child.child().try_wait()?.is_some() {
                bail!("governor did not come up");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Wait until the governor has finished starting: its CPU time stays the
    /// same over 100 ms. Its socket and first links appear while it is still
    /// loading the rest (verifying the tc programs, attaching the per-CPU
    /// timers): ~100 ms of CPU here, which would land in a measurement
    /// started at once.
    pub fn wait_idle(&mut self) -> Result<()> {
        let stat = format!("/proc/{}/stat", self.child.id());
        let cpu = || -> Result<u64> {
            let text = std::fs::read_to_string(&stat).with_context(|| format!("read {stat}"))?;
            // Fields after the command name (which may hold spaces): utime
            // and stime are the 14th and 15th of the line.
            let rest = text.rsplit_once(')').map(|(_, r)| r).with_context(|| format!("{stat}: {text:?}"))?;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let field = |i: usize| -> Result<u64> {
                f.get(i).and_then(|v| v.parse().ok()).with_context(|| format!("{stat}: field {}", i + 3))
            };
            Ok(field(11)? + field(12)?)
        };
        let start = Instant::now();
        let mut last = cpu()?;
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = cpu()?;
            if now == last {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(5) {
                bail!("the bench governor kept using CPU for 5 s after it started");
            }
            last = now;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.terminate(Duration::from_secs(10)).is_none() {
            eprintln!("warning: the bench governor did not stop on SIGTERM; killed");
        }
    }
}
