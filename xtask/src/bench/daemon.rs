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
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.terminate(Duration::from_secs(10)).is_none() {
            eprintln!("warning: the bench governor did not stop on SIGTERM; killed");
        }
    }
}
