//! xtask pieces for the embedded VMM: building the management guest and the
//! `bench vmm` measurements. (Owned by the VMM work.)

use std::path::PathBuf;

use anyhow::Result;

use crate::bench::Row;

/// Build the freestanding management guest; returns the ELF path.
pub fn build_guest() -> Result<Option<PathBuf>> {
    Ok(None)
}

/// `cargo xtask bench vmm`.
pub fn bench() -> Result<Vec<Row>> {
    anyhow::bail!("bench vmm is not built yet (issue 4)")
}
