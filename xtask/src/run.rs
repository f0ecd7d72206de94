//! `cargo xtask run`: set up and build everything (the governor, card-sim,
//! vmm, the MC guest, the demo), run the live demo (`governor-demo`), then
//! check that it left nothing on the host.

use std::process::Command;

use anyhow::Result;

use crate::build::{self, release_bin, sh};
use crate::leftovers::Leftovers;

pub fn run(seconds: Option<u64>) -> Result<()> {
    build::all()?;
    let watch = Leftovers::watch();
    let mut cmd = Command::new(release_bin("governor-demo"));
    if let Some(s) = seconds {
        cmd.args(["--seconds", &s.to_string()]);
    }
    // Ctrl-C reaches the demo too (same process group); it stops cleanly,
    // and we wait for that before checking what it left.
    let _ignored = crate::leftovers::IgnoreInterrupt::install();
    let r = sh(&mut cmd);
    watch.check("cargo xtask run")?;
    r
}
