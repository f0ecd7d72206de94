//! `cargo xtask run`: the governor on a live demo, and the governor's benches.

use anyhow::Result;

use crate::bench::Row;

pub fn run(_seconds: Option<u64>) -> Result<()> {
    anyhow::bail!("the demo is not built yet")
}

pub fn bench_overhead() -> Result<Vec<Row>> {
    anyhow::bail!("bench overhead is not built yet")
}

pub fn bench_qos() -> Result<Vec<Row>> {
    anyhow::bail!("bench qos is not built yet (issue 3)")
}
