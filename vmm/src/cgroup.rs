//! Isolation of MC VMs (claim 11): put a VMM process (all its threads,
//! vCPUs included) into a cgroup with CPU and memory limits.
//!
//! Two layouts are supported:
//! * pure cgroup v2 (`/sys/fs/cgroup/cgroup.controllers` exists): one
//!   directory, `cpu.max`, `cpuset.cpus`, `memory.max`;
//! * hybrid (v1 controllers at `/sys/fs/cgroup/<ctrl>`, cgroup2 at
//!   `/sys/fs/cgroup/unified`): a directory per v1 controller for the limits
//!   (`cpu.cfs_quota_us`, `cpuset.cpus`, `memory.limit_in_bytes`) and one in
//!   the unified tree for identity (the v2 id the eBPF programs see).
//!
//! This talks to cgroupfs directly rather than through cgroups-rs: 0.5 pulls
//! in zbus (systemd D-Bus) as a hard dependency, which costs start-up time and
//! binary size the VMM does not need, and the few files written here are
//! stable kernel ABI.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// CPU bandwidth: quota per period, in microseconds.
    pub cpu_quota_us: Option<u64>,
    pub cpu_period_us: Option<u64>,
    /// CPUs allowed, in cpuset list syntax ("0", "0-1").
    pub cpuset: Option<String>,
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
}

impl Limits {
    pub fn period(&self) -> u64 {
        self.cpu_period_us.unwrap_or(100_000)
    }
    fn validate(&self) -> Result<()> {
        let bad = |field, reason: &str| Err(Error::Config { field, reason: reason.into() });
        if let Some(q) = self.cpu_quota_us {
            if q < 1000 {
                return bad("cpu_quota_us", "must be at least 1000");
            }
        }
        if !(1000..=1_000_000).contains(&self.period()) {
            return bad("cpu_period_us", "must be within 1000..=1000000");
        }
        if let Some(c) = &self.cpuset {
            if c.is_empty() || !c.chars().all(|ch| ch.is_ascii_digit() || ch == ',' || ch == '-') {
                return bad("cpuset", "must be a CPU list such as 0-1");
            }
        }
        if let Some(m) = self.memory_bytes {
            if m < 16 << 20 {
                return bad("memory_bytes", "must be at least 16 MiB");
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    V2,
    Hybrid,
}

pub fn layout() -> Layout {
    if Path::new(ROOT).join("cgroup.controllers").exists() {
        Layout::V2
    } else {
        Layout::Hybrid
    }
}

/// A cgroup made (or adopted) for one VMM. `remove` deletes the directories
/// this value created.
#[derive(Debug)]
pub struct Cgroup {
    pub name: String,
    pub layout: Layout,
    /// Directories making up the cgroup; the first holds the v2 identity.
    pub dirs: Vec<PathBuf>,
    created: Vec<PathBuf>,
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value)
        .map_err(|e| Error::Cgroup { path: path.display().to_string(), reason: format!("writing {value:?}: {e}") })
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| Error::Cgroup { path: path.display().to_string(), reason: e.to_string() })
}

impl Cgroup {
    /// Create `name` (a relative path such as `mcvm/vm-1`) and apply `limits`.
    /// Nothing is left half applied: on error the directories made are removed.
    pub fn create(name: &str, limits: &Limits) -> Result<Cgroup> {
        limits.validate()?;
        if name.is_empty() || name.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            return Err(Error::Config { field: "cgroup", reason: format!("{name:?} is not a relative cgroup path") });
        }
        let layout = layout();
        let mut cg = Cgroup { name: name.to_string(), layout, dirs: Vec::new(), created: Vec::new() };
        let r = cg.build(limits);
        if let Err(e) = r {
            cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    fn mkdir(&mut self, base: &Path) -> Result<PathBuf> {
        let mut p = base.to_path_buf();
        for comp in self.name.split('/') {
            p.push(comp);
            if !p.exists() {
                fs::create_dir(&p)
                    .map_err(|e| Error::Cgroup { path: p.display().to_string(), reason: e.to_string() })?;
                self.created.push(p.clone());
            }
        }
        self.dirs.push(p.clone());
        Ok(p)
    }

    fn build(&mut self, l: &Limits) -> Result<()> {
        match self.layout {
            Layout::V2 => {
                // Enable the controllers down the path, then set limits.
                let mut parent = PathBuf::from(ROOT);
                for comp in self.name.split('/') {
                    let _ = write(&parent.join("cgroup.subtree_control"), "+cpu +cpuset +memory");
                    parent.push(comp);
                }
                let d = self.mkdir(Path::new(ROOT))?;
                if let Some(q) = l.cpu_quota_us {
                    write(&d.join("cpu.max"), &format!("{q} {}", l.period()))?;
                }
                if let Some(c) = &l.cpuset {
                    write(&d.join("cpuset.cpus"), c)?;
                }
                if let Some(m) = l.memory_bytes {
                    write(&d.join("memory.max"), &m.to_string())?;
                }
            }
            Layout::Hybrid => {
                self.mkdir(&Path::new(ROOT).join("unified"))?;
                let cpu = self.mkdir(&Path::new(ROOT).join("cpu"))?;
                self.mkdir(&Path::new(ROOT).join("cpuacct"))?;
                if let Some(q) = l.cpu_quota_us {
                    write(&cpu.join("cpu.cfs_period_us"), &l.period().to_string())?;
                    write(&cpu.join("cpu.cfs_quota_us"), &q.to_string())?;
                }
                let cs = self.mkdir(&Path::new(ROOT).join("cpuset"))?;
                // A v1 cpuset needs cpus and mems before it accepts tasks.
                let mut parent = cs.clone();
                parent.pop();
                let cpus = match &l.cpuset {
                    Some(c) => c.clone(),
                    None => read(&parent.join("cpuset.cpus"))?,
                };
                write(&cs.join("cpuset.cpus"), &cpus)?;
                write(&cs.join("cpuset.mems"), &read(&parent.join("cpuset.mems"))?)?;
                let mem = self.mkdir(&Path::new(ROOT).join("memory"))?;
                if let Some(m) = l.memory_bytes {
                    write(&mem.join("memory.limit_in_bytes"), &m.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// Move a whole process (every thread) into the cgroup.
    pub fn add_process(&self, pid: u32) -> Result<()> {
        for d in &self.dirs {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Move one thread (e.g. a vCPU thread) into the cgroup. On v2 this needs
    /// the cgroup to be threaded; on v1 each controller takes it via `tasks`.
    pub fn add_thread(&self, tid: libc::pid_t) -> Result<()> {
        let file = match self.layout {
            Layout::V2 => "cgroup.threads",
            Layout::Hybrid => "tasks",
        };
        for d in &self.dirs {
            // The unified tree of a hybrid host only gives identity, which is
            // per process; a lone thread cannot join a non-threaded v2 group.
            if self.layout == Layout::Hybrid && d.starts_with(Path::new(ROOT).join("unified")) {
                continue;
            }
            write(&d.join(file), &tid.to_string())?;
        }
        Ok(())
    }

    /// Directory holding a controller's files (`cpu`, `cpuacct`, `cpuset`,
    /// `memory`, or `unified` for the v2 identity).
    pub fn dir(&self, ctrl: &str) -> Option<&Path> {
        match self.layout {
            Layout::V2 => self.dirs.first().map(PathBuf::as_path),
            Layout::Hybrid => {
                let base = Path::new(ROOT).join(ctrl);
                self.dirs.iter().find(|d| d.starts_with(&base)).map(PathBuf::as_path)
            }
        }
    }

    /// The cgroup v2 id (inode number of its unified-tree directory), which
    /// is what `bpf_get_current_cgroup_id` returns for its threads.
    pub fn v2_id(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let d = self.dir("unified").ok_or_else(|| self.missing("unified"))?;
        fs::metadata(d)
            .map(|m| m.ino())
            .map_err(|e| Error::Cgroup { path: d.display().to_string(), reason: e.to_string() })
    }

    /// CPU time used by the cgroup, in nanoseconds, from the kernel's own accounting.
    pub fn cpu_usage_ns(&self) -> Result<u64> {
        match self.layout {
            Layout::V2 => {
                let d = self.dir("cpu").ok_or_else(|| self.missing("cpu"))?;
                let stat = read(&d.join("cpu.stat"))?;
                stat.lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|us| us * 1000)
                    .ok_or_else(|| Error::Cgroup { path: d.display().to_string(), reason: "no usage_usec".into() })
            }
            Layout::Hybrid => {
                let d = self.dir("cpuacct").ok_or_else(|| self.missing("cpuacct"))?;
                read(&d.join("cpuacct.usage"))?
                    .parse::<u64>()
                    .map_err(|e| Error::Cgroup { path: d.display().to_string(), reason: e.to_string() })
            }
        }
    }

    fn missing(&self, ctrl: &str) -> Error {
        Error::Cgroup { path: self.name.clone(), reason: format!("no {ctrl} directory") }
    }

    /// Move member processes to the parent and remove the directories this
    /// value created (deepest first). Best effort: used on clean-up paths.
    pub fn remove(&mut self) {
        for d in &self.dirs {
            let Ok(procs) = fs::read_to_string(d.join("cgroup.procs")) else {
                continue;
            };
            let mut root = d.clone();
            for _ in self.name.split('/') {
                root.pop();
            }
            for pid in procs.split_whitespace() {
                let _ = fs::write(root.join("cgroup.procs"), pid);
            }
        }
        for d in self.created.iter().rev() {
            let _ = fs::remove_dir(d);
        }
        self.created.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_validated_field_by_field() {
        let ok = Limits {
            cpu_quota_us: Some(50_000),
            cpuset: Some("0-1".into()),
            memory_bytes: Some(64 << 20),
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        assert_eq!(ok.period(), 100_000);
        let cases = [
            (Limits { cpu_quota_us: Some(10), ..Default::default() }, "cpu_quota_us"),
            (Limits { cpu_period_us: Some(10), ..Default::default() }, "cpu_period_us"),
            (Limits { cpuset: Some("0;rm".into()), ..Default::default() }, "cpuset"),
            (Limits { memory_bytes: Some(1), ..Default::default() }, "memory_bytes"),
        ];
        for (l, want) in cases {
            match l.validate() {
                Err(Error::Config { field, .. }) => assert_eq!(field, want),
                other => panic!("{want}: {other:?}"),
            }
        }
    }

    #[test]
    fn names_must_stay_below_the_root() {
        for bad in ["", "/abs", "a/../b", "a//b", "."] {
            assert!(
                matches!(Cgroup::create(bad, &Limits::default()), Err(Error::Config { field: "cgroup", .. })),
                "{bad:?}"
            );
        }
    }
}
