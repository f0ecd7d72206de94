//! `cargo xtask run`: set up and build everything (the governor, card-sim,
//! vmm, the MC guest, the demo), run the live demo (`governor-demo`), then
//! check that it left nothing on the host. `cargo xtask soak` runs the same
//! scenario for a given time and judges it (`governor-demo --soak`).

use std::process::Command;

use anyhow::Result;

use crate::build::{self, release_bin, sh};
use crate::leftovers::Leftovers;

pub fn run(seconds: Option<u64>) -> Result<()> {
    demo(seconds, false)
}

/// `cargo xtask soak`: the demo for `minutes`, judged by `--soak`.
pub fn soak(minutes: u64) -> Result<()> {
    if minutes == 0 {
        anyhow::bail!("--minutes: a soak needs at least 1 minute");
    }
    demo(Some(minutes * 60), true)
}

fn demo(seconds: Option<u64>, soak: bool) -> Result<()> {
    build::all()?;
    let watch = Leftovers::watch();
    let mut cmd = Command::new(release_bin("governor-demo"));
    if let Some(s) = seconds {
        cmd.args(["--seconds", &s.to_string()]);
    }
    if soak {
        cmd.arg("--soak");
    }
    // Ctrl-C reaches the demo too (same process group); it stops cleanly,
    // and we wait for that before checking what it left.
    let _ignored = crate::leftovers::IgnoreInterrupt::install();
    let r = sh(&mut cmd);
    watch.check(if soak { "cargo xtask soak" } else { "cargo xtask run" })?;
    r
}
