//! `cargo xtask bench placement`: moves of a management VM between
//! card-sim and the host, measured by the `placement-bench` binary (package
//! `integration-tests`, so xtask does not compile the VMM or the card link),
//! which prints `ROW` lines as card-bench does. `bench` has already run
//! `build::all()`, so target/release holds it, card-sim and vmm.

use std::process::Command;

use anyhow::{bail, Context, Result};

use super::Row;

pub fn bench() -> Result<Vec<Row>> {
    let bin_dir = crate::build::target_dir().join("release");
    let bench = bin_dir.join("placement-bench");
    let out = Command::new(&bench)
        .env("CARD_SIM_BIN", bin_dir.join("card-sim"))
        .env("VMM_GUEST_ELF", crate::build::guest_elf())
        .output()
        .with_context(|| format!("run {}", bench.display()))?;
    if !out.status.success() {
        bail!("placement-bench failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let rows = super::card::parse(&String::from_utf8_lossy(&out.stdout));
    if rows.is_empty() {
        bail!("placement-bench printed no rows");
    }
    Ok(rows)
}
