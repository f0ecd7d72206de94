//! What a run left on the host: the fixtures' inventory (cgroups, links,
//! network namespaces, pins, lock files, temporary files, processes) taken
//! before and compared after `test`, `run` and `bench`.

use anyhow::{bail, Result};
use fixtures::inventory::Inventory;

pub struct Leftovers(Inventory);

impl Leftovers {
    pub fn watch() -> Leftovers {
        Leftovers(Inventory::take())
    }

    /// Fail, naming every object, if `what` left anything behind.
    pub fn check(&self, what: &str) -> Result<()> {
        // Exiting children may need a moment to be reaped and their
        // cgroups to empty.
        for _ in 0..20 {
            if Inventory::take().left_since(&self.0).is_empty() {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let left = Inventory::take().left_since(&self.0);
        if left.is_empty() {
            return Ok(());
        }
        bail!("{what} left on this host: {left}")
    }
}

/// SIGINT ignored in this process while it lives (the child handles Ctrl-C
/// and cleans up; xtask waits for it and checks the host afterwards).
pub struct IgnoreInterrupt(libc::sighandler_t);

impl IgnoreInterrupt {
    pub fn install() -> IgnoreInterrupt {
        // SAFETY: installing SIG_IGN for SIGINT; the old handler is restored on drop.
        IgnoreInterrupt(unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) })
    }
}

impl Drop for IgnoreInterrupt {
    fn drop(&mut self) {
        // SAFETY: restoring the handler that was there before.
        unsafe { libc::signal(libc::SIGINT, self.0) };
    }
}
