//! What a run left on the host: the fixtures' inventory (cgroups, links,
//! network namespaces, pins, lock files, temporary files, processes) taken
//! before and compared after `test`, `run` and `bench`, plus `governor-demo`
//! processes (the demo binary itself, which the inventory does not know).

use std::collections::BTreeSet;

use anyhow::{bail, Result};
use fixtures::inventory::Inventory;

pub struct Leftovers(Inventory);

/// The demo's own processes (not zombies), as inventory items.
fn demos() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let comm = stat.find('(').zip(stat.rfind(')')).map(|(a, b)| &stat[a + 1..b]).unwrap_or("");
        let zombie = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()) == Some("Z");
        if comm == "governor-demo" && !zombie {
            out.insert(format!("process {pid} (governor-demo)"));
        }
    }
    out
}

fn take() -> Inventory {
    let mut inv = Inventory::take();
    inv.items.extend(demos());
    inv
}

impl Leftovers {
    pub fn watch() -> Leftovers {
        Leftovers(take())
    }

    /// Fail, naming every object, if `what` left anything behind.
    pub fn check(&self, what: &str) -> Result<()> {
        // Exiting children may need a moment to be reaped and their
        // cgroups to empty.
        for _ in 0..20 {
            if take().left_since(&self.0).is_empty() {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let left = take().left_since(&self.0);
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
