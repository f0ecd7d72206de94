//! The card's own cgroup: sized like a card (CPU quota, memory limit) and the
//! source of its CPU and memory telemetry. Supports pure cgroup v2 and the
//! hybrid layout (v1 controllers under /sys/fs/cgroup/<ctrl>, v2 at
//! /sys/fs/cgroup/unified) this machine has.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";

#[derive(Clone, Debug)]
pub enum Layout {
    /// Pure cgroup v2: one directory with cpu.max, cpu.stat, memory.max, memory.current.
    V2 { dir: PathBuf },
    /// Hybrid: v1 cpu (quota), cpuacct (usage), memory; v2 unified dir for identity.
    Hybrid { cpu: PathBuf, cpuacct: PathBuf, memory: PathBuf, unified: Option<PathBuf> },
}

#[derive(Clone, Debug)]
pub struct CardCgroup {
    pub name: String,
    pub layout: Layout,
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(|e| io::Error::new(e.kind(), format!("write {value:?} to {}: {e}", path.display())))
}

fn read_u64(path: &Path) -> io::Result<u64> {
    let s = fs::read_to_string(path)?;
    s.trim().parse::<u64>().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))
}

pub fn is_pure_v2() -> bool {
    Path::new(ROOT).join("cgroup.controllers").exists()
}

fn pure_v2_at(root: &Path) -> bool {
    root.join("cgroup.controllers").exists()
}

impl CardCgroup {
    /// The layout a cgroup named `name` has (or would have) on this machine.
    pub fn locate(name: &str) -> CardCgroup {
        Self::locate_in(Path::new(ROOT), name)
    }

    /// `locate` under another cgroup root (tests use a scratch directory).
    pub fn locate_in(root: &Path, name: &str) -> CardCgroup {
        let layout = if pure_v2_at(root) {
            Layout::V2 { dir: root.join(name) }
        } else {
            let unified = root.join("unified");
            Layout::Hybrid {
                cpu: root.join("cpu").join(name),
                cpuacct: root.join("cpuacct").join(name),
                memory: root.join("memory").join(name),
                unified: unified.join("cgroup.procs").exists().then(|| unified.join(name)),
            }
        };
        CardCgroup { name: name.to_string(), layout }
    }

    fn dirs(&self) -> Vec<PathBuf> {
        match &self.layout {
            Layout::V2 { dir } => vec![dir.clone()],
            Layout::Hybrid { cpu, cpuacct, memory, unified } => {
                let mut v = vec![cpu.clone(), cpuacct.clone(), memory.clone()];
                v.extend(unified.clone());
                v
            }
        }
    }

    /// Create the cgroup (idempotent) with `cpus` CPUs of quota and `mem_bytes` of memory.
    pub fn create(name: &str, cpus: f64, mem_bytes: u64) -> io::Result<CardCgroup> {
        Self::create_in(Path::new(ROOT), name, cpus, mem_bytes)
    }

    pub fn create_in(root: &Path, name: &str, cpus: f64, mem_bytes: u64) -> io::Result<CardCgroup> {
        let cg = CardCgroup::locate_in(root, name);
        let period = 100_000u64;
        let quota = ((cpus * period as f64) as u64).max(1000);
        match &cg.layout {
            Layout::V2 { dir } => {
                // Enable the controllers for children of the root; harmless if already on.
                let _ = write(&root.join("cgroup.subtree_control"), "+cpu +memory");
                fs::create_dir_all(dir)?;
                write(&dir.join("cpu.max"), &format!("{quota} {period}"))?;
                write(&dir.join("memory.max"), &mem_bytes.to_string())?;
            }
            Layout::Hybrid { cpu, cpuacct, memory, unified } => {
                for d in [cpu, cpuacct, memory] {
                    fs::create_dir_all(d)?;
                }
                if let Some(u) = unified {
                    fs::create_dir_all(u)?;
                }
                write(&cpu.join("cpu.cfs_period_us"), &period.to_string())?;
                write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
                write(&memory.join("memory.limit_in_bytes"), &mem_bytes.to_string())?;
            }
        }
        Ok(cg)
    }

    /// Move process `pid` (all its threads) into the cgroup.
    pub fn join(&self, pid: u32) -> io::Result<()> {
        for d in self.dirs() {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// CPU time used by everything in the cgroup (ns).
    pub fn cpu_usage_ns(&self) -> io::Result<u64> {
        match &self.layout {
            Layout::V2 { dir } => {
                let s = fs::read_to_string(dir.join("cpu.stat"))?;
                let usec = s
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse::<u64>().ok())
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "cpu.stat has no usage_usec"))?;
                Ok(usec * 1000)
            }
            Layout::Hybrid { cpuacct, .. } => read_u64(&cpuacct.join("cpuacct.usage")),
        }
    }

    pub fn memory_bytes(&self) -> io::Result<u64> {
        match &self.layout {
            Layout::V2 { dir } => read_u64(&dir.join("memory.current")),
            Layout::Hybrid { memory, .. } => read_u64(&memory.join("memory.usage_in_bytes")),
        }
    }

    pub fn memory_peak(&self) -> io::Result<u64> {
        match &self.layout {
            Layout::V2 { dir } => read_u64(&dir.join("memory.peak")).or_else(|_| self.memory_bytes()),
            Layout::Hybrid { memory, .. } => read_u64(&memory.join("memory.max_usage_in_bytes")),
        }
    }

    pub fn memory_limit(&self) -> io::Result<u64> {
        match &self.layout {
            Layout::V2 { dir } => {
                let s = fs::read_to_string(dir.join("memory.max"))?;
                Ok(s.trim().parse::<u64>().unwrap_or(u64::MAX))
            }
            Layout::Hybrid { memory, .. } => read_u64(&memory.join("memory.limit_in_bytes")),
        }
    }

    /// CPU quota in CPU-ns per second.
    pub fn cpu_capacity_ns(&self) -> io::Result<u64> {
        let (quota, period) = match &self.layout {
            Layout::V2 { dir } => {
                let s = fs::read_to_string(dir.join("cpu.max"))?;
                let mut it = s.split_whitespace();
                let q = it.next().unwrap_or("max");
                let p = it.next().and_then(|p| p.parse::<u64>().ok()).unwrap_or(100_000);
                (q.parse::<u64>().ok(), p)
            }
            Layout::Hybrid { cpu, .. } => {
                let q = fs::read_to_string(cpu.join("cpu.cfs_quota_us"))?;
                let p = read_u64(&cpu.join("cpu.cfs_period_us"))?;
                (q.trim().parse::<i64>().ok().filter(|&q| q > 0).map(|q| q as u64), p)
            }
        };
        let cpus = std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1);
        Ok(match quota {
            Some(q) if period > 0 => q * 1_000_000_000 / period,
            _ => cpus * 1_000_000_000,
        })
    }

    /// Pids still in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        let d = match &self.layout {
            Layout::V2 { dir } => dir.clone(),
            Layout::Hybrid { cpuacct, .. } => cpuacct.clone(),
        };
        fs::read_to_string(d.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Remove the cgroup directories (they must be empty of processes).
    pub fn remove(&self) -> io::Result<()> {
        let mut last = Ok(());
        for d in self.dirs() {
            if d.exists() {
                // rmdir can race with the exit of the last task; retry briefly.
                let mut r = fs::remove_dir(&d);
                for _ in 0..50 {
                    if r.is_ok() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    r = fs::remove_dir(&d);
                }
                if let Err(e) = r {
                    last = Err(io::Error::new(e.kind(), format!("rmdir {}: {e}", d.display())));
                }
            }
        }
        last
    }
}

#[cfg(test)]
mod tests {
    //! Both layouts against scratch directories shaped like cgroupfs (this
    //! machine is hybrid; the pure v2 path is exercised here only).
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("card-cg-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn pure_v2_sizing_and_accounting() {
        let root = scratch("v2");
        fs::write(root.join("cgroup.controllers"), "cpu memory\n").unwrap();
        let cg = CardCgroup::create_in(&root, "card0", 1.5, 512 << 20).unwrap();
        let Layout::V2 { dir } = &cg.layout else { panic!("expected v2: {:?}", cg.layout) };
        assert_eq!(fs::read_to_string(dir.join("cpu.max")).unwrap(), "150000 100000");
        assert_eq!(fs::read_to_string(dir.join("memory.max")).unwrap(), (512u64 << 20).to_string());
        fs::write(dir.join("cpu.stat"), "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n").unwrap();
        fs::write(dir.join("memory.current"), "4096\n").unwrap();
        assert_eq!(cg.cpu_usage_ns().unwrap(), 2_500_000);
        assert_eq!(cg.memory_bytes().unwrap(), 4096);
        assert_eq!(cg.memory_peak().unwrap(), 4096, "no memory.peak: falls back to current");
        assert_eq!(cg.memory_limit().unwrap(), 512 << 20);
        assert_eq!(cg.cpu_capacity_ns().unwrap(), 1_500_000_000);
        fs::write(dir.join("cpu.stat"), "user_usec 1\n").unwrap();
        assert!(cg.cpu_usage_ns().is_err(), "cpu.stat without usage_usec is an error");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn hybrid_sizing_and_accounting() {
        let root = scratch("hybrid");
        fs::create_dir_all(root.join("unified")).unwrap();
        fs::write(root.join("unified/cgroup.procs"), "").unwrap();
        let cg = CardCgroup::create_in(&root, "card0", 1.0, 256 << 20).unwrap();
        let Layout::Hybrid { cpu, cpuacct, memory, unified } = &cg.layout else { panic!("expected hybrid") };
        assert!(unified.as_ref().is_some_and(|u| u.is_dir()));
        assert_eq!(fs::read_to_string(cpu.join("cpu.cfs_quota_us")).unwrap(), "100000");
        fs::write(cpuacct.join("cpuacct.usage"), "123456789\n").unwrap();
        fs::write(memory.join("memory.usage_in_bytes"), "8192\n").unwrap();
        fs::write(memory.join("memory.max_usage_in_bytes"), "16384\n").unwrap();
        assert_eq!(cg.cpu_usage_ns().unwrap(), 123_456_789);
        assert_eq!(cg.memory_bytes().unwrap(), 8192);
        assert_eq!(cg.memory_peak().unwrap(), 16384);
        assert_eq!(cg.cpu_capacity_ns().unwrap(), 1_000_000_000);
        fs::write(cpuacct.join("cpuacct.usage"), "garbage").unwrap();
        assert!(cg.cpu_usage_ns().is_err());
        let _ = fs::remove_dir_all(&root);
    }
}
