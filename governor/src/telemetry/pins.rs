//! The pin directory: maps by name, programs `prog_*`, and the links of
//! the tracing programs `link_*`, so that a governor killed without its
//! cleanup leaves the kernel counting: its links keep the programs
//! attached, its maps keep the counters and the policers (limits stay
//! enforced). The next governor adopts them: it reuses the maps (counters
//! go on), replaces each link by its own program's, and replaces the tc
//! filters. Maps whose shape does not match this build's (a governor of
//! another version) are not adopted: the pins are cleared and it starts
//! afresh, saying so.

use std::fs;
use std::path::{Path, PathBuf};

use aya::maps::{MapData, MapType};
use governor_common::{
    maps, CgroupStats, CpuState, NetEntry, Policer, QosStats, VmCounters, MAX_CGROUPS, MAX_IFACES, MAX_QOS_VMS,
};

const LINK_PREFIX: &str = "link_";
const PROG_PREFIX: &str = "prog_";

/// What this build's maps look like: (name, type, key size, value size,
/// max entries). A pinned map is adopted only if it matches.
/// A map's name, type, key size, value size and max entries.
type Shape = (&'static str, MapType, u32, u32, u32);

fn shapes() -> Result<[Shape; 8], String> {
    let size = |n: usize| n as u32;
    let cpus = super::cpu_id_end().map_err(|e| e.to_string())?;
    Ok([
        (maps::CGROUPS, MapType::PerCpuHash, 8, size(std::mem::size_of::<CgroupStats>()), size(MAX_CGROUPS)),
        (maps::NET, MapType::PerCpuHash, 4, size(std::mem::size_of::<NetEntry>()), size(MAX_IFACES)),
        (maps::CPU_STATE, MapType::PerCpuArray, 4, size(std::mem::size_of::<CpuState>()), 1),
        (maps::OOM_EVENTS, MapType::RingBuf, 0, 0, 64 * 1024),
        (maps::QOS, MapType::Array, 4, size(std::mem::size_of::<Policer>()), size(MAX_QOS_VMS * 2)),
        (maps::QOS_STATS, MapType::PerCpuArray, 4, size(std::mem::size_of::<QosStats>()), size(MAX_QOS_VMS * 2)),
        (maps::VM_STATS, MapType::Array, 4, size(std::mem::size_of::<VmCounters>()), vm_stats_entries(cpus)),
        (maps::CG_SLOT, MapType::Hash, 8, 4, size(MAX_CGROUPS)),
    ])
}

/// Entries of `VM_STATS`: a copy of each VM slot per CPU id.
pub(super) fn vm_stats_entries(cpus: usize) -> u32 {
    (MAX_QOS_VMS * cpus) as u32
}

/// Whether the pin directory holds a whole set of maps of this build's
/// shape (a governor that died left them). Err: some are there but not
/// adoptable, and why.
pub(super) fn adoptable(dir: &Path) -> Result<bool, String> {
    let present = maps::ALL.iter().filter(|n| dir.join(n).exists()).count();
    if present == 0 {
        return Ok(false);
    }
    if present != maps::ALL.len() {
        return Err(format!("only {present} of {} maps are pinned", maps::ALL.len()));
    }
    for (name, kind, key, value, max) in shapes()? {
        let path = dir.join(name);
        let info = MapData::from_pin(&path).and_then(|m| m.info()).map_err(|e| format!("{name}: {e}"))?;
        let got = (info.map_type().map_err(|e| format!("{name}: {e}"))?, info.key_size(), info.value_size());
        if got != (kind, key, value) || info.max_entries() != max {
            return Err(format!(
                "{name} is a {:?} of {}+{} bytes x {}, this build's a {kind:?} of {key}+{value} x {max}",
                got.0,
                got.1,
                got.2,
                info.max_entries()
            ));
        }
    }
    Ok(true)
}

/// Where a tracing program's link is pinned (`what`: the program, or the
/// program and CPU).
pub(super) fn link_path(dir: &Path, what: &str) -> PathBuf {
    dir.join(format!("{LINK_PREFIX}{what}"))
}

/// Remove an earlier governor's link of `what`: the kernel detaches its
/// program once nothing holds it. Done just before our own attaches: the
/// per-CPU state in the adopted maps carries the time in between.
pub(super) fn drop_old_link(dir: &Path, what: &str) {
    let path = link_path(dir, what);
    match fs::remove_file(&path) {
        Ok(()) => tracing::info!(link = %path.display(), "replaced the link of the governor before"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(link = %path.display(), "cannot remove the old link: {e}"),
    }
}

/// Remove the pins of programs (`prog_*`) a governor before left: their
/// programs stay only as long as a link or filter holds them.
pub(super) fn drop_old_programs(dir: &Path) {
    remove_matching(dir, |n| n.starts_with(PROG_PREFIX));
}

fn remove_matching(dir: &Path, ours: impl Fn(&str) -> bool) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        if ours(&name.to_string_lossy()) {
            if let Err(err) = fs::remove_file(e.path()) {
                tracing::warn!(pin = %e.path().display(), "cannot unpin: {err}");
            }
        }
    }
}

/// Remove our pins (maps by name, `prog_*`, `link_*`) and then the
/// directory if that left it empty. Never a recursive delete: a
/// misconfigured pin directory must not take other tools' pins with it.
pub(super) fn clear_pins(dir: &Path) {
    remove_matching(dir, |n| {
        maps::ALL.contains(&n) || maps::RETIRED.contains(&n) || n.starts_with(PROG_PREFIX) || n.starts_with(LINK_PREFIX)
    });
    match fs::remove_dir(dir) {
        Ok(()) => {}
        // Someone else's pins are there too: the directory is theirs as well.
        Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
            tracing::info!(dir = %dir.display(), "pin directory holds other pins: left in place")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %dir.display(), "cannot remove the pin directory: {e}"),
    }
}

/// Removes the pins when loading fails half way.
pub(super) struct PinGuard(pub(super) Option<PathBuf>);

impl PinGuard {
    pub(super) fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            clear_pins(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clearing_takes_ours_and_retired_maps_and_leaves_the_rest() {
        let dir = std::env::temp_dir().join(format!("gov-pins-test-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        for n in ["NET", "QOS", "VM_OF_IF", "prog_gov_tc_egress", "link_sched_switch", "someone_elses"] {
            fs::write(dir.join(n), b"").expect("file");
        }
        clear_pins(&dir);
        let left: Vec<String> =
            fs::read_dir(&dir).expect("read").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(left, ["someone_elses"], "a retired map's pin (VM_OF_IF) goes too");
        clear_pins(&dir);
        fs::remove_file(dir.join("someone_elses")).expect("cleanup");
        clear_pins(&dir);
        assert!(!dir.exists(), "an emptied directory is removed");
    }
}
