//! xtask pieces for card-link and card-sim: the `bench card` measurements.
//! (Owned by the card-link work.)
//!
//! The measuring is done by card-sim's `card-bench` binary (package
//! `card-sim` in card-link/sim, so xtask does not compile the vfio crates);
//! it prints `ROW\tmetric\tvalue\tpeer\tnote` lines, turned into rows here.
//! The notes carry issue 13's goals with `meets` or `MISSES` (mapped
//! register snapshot, mailbox round trip beside an eventfd ping-pong floor,
//! DMA snapshot streams beside a 64 MiB memcpy), all from the same run.
//! `bench` has already run `build::all()`, so target/release holds
//! card-bench and card-sim.

use std::process::Command;

use anyhow::{bail, Context, Result};

use super::Row;

/// `cargo xtask bench card`.
pub fn bench() -> Result<Vec<Row>> {
    let bin_dir = crate::build::target_dir().join("release");
    let bench = bin_dir.join("card-bench");
    let out = Command::new(&bench)
        .env("CARD_SIM_BIN", bin_dir.join("card-sim"))
        .env("VMM_GUEST_ELF", crate::build::guest_elf())
        .output()
        .with_context(|| format!("run {}", bench.display()))?;
    if !out.status.success() {
        bail!("card-bench failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let rows = parse(&String::from_utf8_lossy(&out.stdout));
    if rows.is_empty() {
        bail!("card-bench printed no rows");
    }
    Ok(rows)
}

pub(super) fn parse(text: &str) -> Vec<Row> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.strip_prefix("ROW\t")?.split('\t');
            let (metric, value) = (f.next()?, f.next()?);
            Some(Row::new(metric, value).peer(f.next().unwrap_or("")).note(f.next().unwrap_or("")))
        })
        .collect()
}
