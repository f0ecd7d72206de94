//! What each VM costs the card (ABI 1.2's `vm-costs` table): CPU and memory
//! as the card-side VMM measures them (`ManagedVm::usage`: the VM's child
//! cgroup, its process, or a modelled VM's own accounting), and the work the
//! card's shared engines did on its behalf, counted where it is done: the
//! network client adds the bytes it sends for a VM, the FPGA engine the
//! service time of jobs submitted for one (`VmCounters`).
//!
//! An engine holds a `Weak` reference to the counters of the VM it works
//! for: when the VM stops, its entry (the only strong reference) goes, and
//! work still in flight for it counts as the card's own.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Weak;

use card_link::costs::CostSource;

use crate::error::VmError;

/// Work the card's shared engines did for one VM.
#[derive(Debug, Default)]
pub struct VmCounters {
    /// Bytes the network client sent on the VM's behalf.
    pub net_bytes: AtomicU64,
    /// FPGA engine service time of jobs submitted for the VM (ns).
    pub fpga_busy_ns: AtomicU64,
}

/// On whose behalf an engine works: a VM's counters, or none (the card).
pub type Owner = Weak<VmCounters>;

/// Charge `f` to the owner's counters if the VM still exists.
pub fn charge(owner: &Owner, f: impl FnOnce(&VmCounters)) {
    if let Some(c) = owner.upgrade() {
        f(&c);
    }
}

impl VmCounters {
    pub fn net_bytes(&self) -> u64 {
        self.net_bytes.load(Ordering::Relaxed)
    }

    pub fn fpga_busy_ns(&self) -> u64 {
        self.fpga_busy_ns.load(Ordering::Relaxed)
    }
}

/// A VM's CPU and memory as the card-side VMM measured them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmUsage {
    pub source: CostSource,
    /// CPU time since the VM started (ns).
    pub cpu_ns: u64,
    /// Memory charged now (bytes).
    pub memory_bytes: u64,
}

/// CPU (all threads, live and exited: utime + stime of /proc/PID/stat) and
/// resident memory (VmRSS) of a process: how a card without cgroups
/// measures one VMM process.
pub fn process_usage(pid: u32) -> Result<VmUsage, VmError> {
    let read = |file: &str| {
        let path = PathBuf::from(format!("/proc/{pid}/{file}"));
        std::fs::read_to_string(&path).map_err(|source| VmError::Measure { path, source })
    };
    let stat = read("stat")?;
    let cpu_ticks = parse_stat_cpu(&stat)
        .ok_or_else(|| VmError::Unreadable { what: "utime/stime", path: PathBuf::from(format!("/proc/{pid}/stat")) })?;
    // SAFETY: sysconf has no preconditions.
    let hz = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        n if n > 0 => n as u64,
        _ => 100,
    };
    let status = read("status")?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    Ok(VmUsage {
        source: CostSource::Process,
        cpu_ns: cpu_ticks.saturating_mul(1_000_000_000 / hz),
        memory_bytes: rss_kib.saturating_mul(1024),
    })
}

/// utime + stime (clock ticks) from a /proc/PID/stat line. The command name
/// (field 2) may hold spaces and parentheses, so fields are counted after
/// its last ')'.
fn parse_stat_cpu(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn stat_cpu_fields_after_the_name() {
        let line = "1234 (vmm (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 5 0 0";
        assert_eq!(parse_stat_cpu(line), Some(300));
        assert_eq!(parse_stat_cpu("1234 (vmm) S 1"), None);
        assert_eq!(parse_stat_cpu("garbage"), None);
    }

    #[test]
    fn this_process_is_measured() {
        let u = process_usage(std::process::id()).expect("own /proc entry");
        assert_eq!(u.source, CostSource::Process);
        assert!(u.memory_bytes > 0);
    }

    #[test]
    fn work_for_a_gone_vm_is_not_charged() {
        let c = Arc::new(VmCounters::default());
        let owner = Arc::downgrade(&c);
        charge(&owner, |c| {
            c.net_bytes.fetch_add(5, Ordering::Relaxed);
        });
        assert_eq!(c.net_bytes(), 5);
        drop(c);
        charge(&owner, |_| panic!("charged a VM that is gone"));
        charge(&Weak::new(), |_| panic!("charged the card's own work to a VM"));
    }
}
