//! xtask pieces for card-link and card-sim: the `bench card` measurements.
//! (Owned by the card-link work.)

use anyhow::Result;

use crate::bench::Row;

/// `cargo xtask bench card`.
pub fn bench() -> Result<Vec<Row>> {
    anyhow::bail!("bench card is not built yet (issue 5)")
}
