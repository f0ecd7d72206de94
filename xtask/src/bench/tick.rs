//! `cargo xtask bench tick`: the governor's tick at 1,000 VMs (1,000 real
//! cgroups and veths), measured by the `tick-bench` binary (package
//! `integration-tests`, which links the governor library), printing `ROW`
//! lines as card-bench does.

use std::process::Command;

use anyhow::{bail, Context, Result};

use super::Row;

pub fn bench() -> Result<Vec<Row>> {
    let bench = crate::build::target_dir().join("release").join("tick-bench");
    let out = Command::new(&bench).output().with_context(|| format!("run {}", bench.display()))?;
    if !out.status.success() {
        bail!("tick-bench failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let rows = super::card::parse(&String::from_utf8_lossy(&out.stdout));
    if rows.is_empty() {
        bail!("tick-bench printed no rows");
    }
    Ok(rows)
}
