//! Cgroups on pure v2 hosts and on hybrid hosts.
//!
//! A VM's identity is its cgroup v2 id (what `bpf_get_current_cgroup_id`
//! returns). Limits and memory accounting come from whichever controllers
//! exist: the unified hierarchy on pure v2 hosts, the v1 `cpu`, `cpuacct`
//! and `memory` hierarchies on hybrid hosts (this machine: v1 controllers
//! plus cgroup2 at `/sys/fs/cgroup/unified`). The same relative path is used
//! in every hierarchy, as systemd does.
//!
//! Why not cgroups-rs: it models a host as either all-v1 or all-v2; the
//! hybrid layout, where identity is v2 and limits are v1, is exactly the case
//! this module exists for, and what it needs is a handful of file reads.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

const ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, Error)]
pub enum CgroupError {
    #[error("no cgroup2 hierarchy is mounted (looked at {ROOT} and {ROOT}/unified)")]
    NoUnified,
    #[error("cgroup path {0:?} must be relative, without '..'")]
    BadPath(String),
    #[error("cgroup {path} does not exist in the v2 hierarchy")]
    Missing { path: PathBuf },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: cannot parse {what}")]
    Parse { path: PathBuf, what: String },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io { op, path: path.to_path_buf(), source }
}

/// Where the hierarchies are mounted on this host.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The cgroup2 mount.
    pub unified: PathBuf,
    /// True when the v1 controllers are mounted beside it (hybrid host).
    pub hybrid: bool,
}

impl Layout {
    pub fn detect() -> Result<Layout, CgroupError> {
        let mounts = fs::read_to_string("/proc/self/mounts").map_err(io_err("read", Path::new("/proc/self/mounts")))?;
        let mut unified = None;
        let mut v1 = false;
        for line in mounts.lines() {
            let mut f = line.split_whitespace();
            let (_src, target, fstype) = (f.next(), f.next(), f.next());
            match (target, fstype) {
                (Some(t), Some("cgroup2")) if t.starts_with(ROOT) && unified.is_none() => {
                    unified = Some(PathBuf::from(t))
                }
                (Some(t), Some("cgroup")) if t.starts_with(ROOT) => v1 = true,
                _ => {}
            }
        }
        let unified = unified.ok_or(CgroupError::NoUnified)?;
        Ok(Layout { unified, hybrid: v1 })
    }

    /// A v1 controller's directory for `rel`, if that controller is mounted.
    fn v1(&self, controller: &str, rel: &Path) -> Option<PathBuf> {
        if !self.hybrid {
            return None;
        }
        let base = Path::new(ROOT).join(controller);
        base.join("tasks").exists().then(|| base.join(rel))
    }

    /// Open an existing cgroup by its path relative to the hierarchy roots.
    pub fn open(&self, rel: &str) -> Result<Cgroup, CgroupError> {
        let rel = check_rel(rel)?;
        let dir = self.unified.join(&rel);
        if !dir.is_dir() {
            return Err(CgroupError::Missing { path: dir });
        }
        Ok(Cgroup { layout: self.clone(), rel, dir })
    }

    /// Create a cgroup (and its parents) in the unified hierarchy and, on a
    /// hybrid host, in the cpu, cpuacct, cpuset and memory hierarchies.
    pub fn create(&self, rel: &str) -> Result<Cgroup, CgroupError> {
        let rel = check_rel(rel)?;
        let dir = self.unified.join(&rel);
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let cg = Cgroup { layout: self.clone(), rel, dir };
        for c in V1_CONTROLLERS {
            if let Some(d) = self.v1(c, &cg.rel) {
                fs::create_dir_all(&d).map_err(io_err("create", &d))?;
                if *c == "cpuset" {
                    inherit_cpuset(&d)?;
                }
            }
        }
        if !self.hybrid {
            // Delegate the controllers we use down the path to this cgroup.
            let mut p = self.unified.clone();
            for comp in cg.rel.components() {
                let _ = fs::write(p.join("cgroup.subtree_control"), "+cpu +memory +cpuset");
                p.push(comp);
            }
        }
        Ok(cg)
    }
}

const V1_CONTROLLERS: &[&str] = &["cpu", "cpuacct", "cpuset", "memory"];

/// A new v1 cpuset starts empty; copy the parent's cpus and mems so tasks
/// can be attached.
fn inherit_cpuset(dir: &Path) -> Result<(), CgroupError> {
    let mut chain = vec![dir.to_path_buf()];
    let mut p = dir.to_path_buf();
    while let Some(parent) = p.parent() {
        if !parent.join("cpuset.cpus").exists() {
            break;
        }
        chain.push(parent.to_path_buf());
        p = parent.to_path_buf();
    }
    // Fill from the top down: each level needs its parent's values.
    for d in chain.iter().rev().skip(1) {
        let parent = d.parent().unwrap_or(d);
        for f in ["cpuset.cpus", "cpuset.mems"] {
            let cur = fs::read_to_string(d.join(f)).unwrap_or_default();
            if cur.trim().is_empty() {
                let v = fs::read_to_string(parent.join(f)).map_err(io_err("read", &parent.join(f)))?;
                fs::write(d.join(f), v.trim()).map_err(io_err("write", &d.join(f)))?;
            }
        }
    }
    Ok(())
}

fn check_rel(rel: &str) -> Result<PathBuf, CgroupError> {
    let p = Path::new(rel.trim_matches('/'));
    let ok = !rel.is_empty()
        && !rel.starts_with('/')
        && p.components().all(|c| matches!(c, std::path::Component::Normal(_)));
    if ok {
        Ok(p.to_path_buf())
    } else {
        Err(CgroupError::BadPath(rel.to_string()))
    }
}

/// One cgroup, present in the unified hierarchy (and maybe in v1 ones).
#[derive(Clone, Debug)]
pub struct Cgroup {
    layout: Layout,
    rel: PathBuf,
    dir: PathBuf,
}

/// Memory of a cgroup as cAdvisor defines it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// usage (memory.current / memory.usage_in_bytes)
    pub usage_bytes: u64,
    /// usage minus inactive file pages: what the kubelet calls working set.
    pub working_set_bytes: u64,
    /// anonymous memory (anon / total_rss)
    pub resident_bytes: u64,
    /// page faults the kernel counted (pgfault / total_pgfault)
    pub pgfault: u64,
}

impl Cgroup {
    pub fn rel(&self) -> &Path {
        &self.rel
    }

    /// The directory in the unified hierarchy.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// cgroup v2 id: the inode number of the cgroup's directory, which is
    /// what `bpf_get_current_cgroup_id()` returns for its tasks.
    pub fn id(&self) -> Result<u64, CgroupError> {
        fs::metadata(&self.dir).map(|m| m.ino()).map_err(io_err("stat", &self.dir))
    }

    /// Ids of this cgroup and every cgroup below it (a VMM may put its vCPU
    /// threads in child cgroups; they still belong to the VM).
    pub fn subtree_ids(&self) -> Result<Vec<u64>, CgroupError> {
        let mut ids = Vec::new();
        let mut stack = vec![self.dir.clone()];
        while let Some(d) = stack.pop() {
            let m = match fs::metadata(&d) {
                Ok(m) => m,
                // A child removed while we walk is simply gone.
                Err(e) if e.kind() == io::ErrorKind::NotFound && d != self.dir => continue,
                Err(e) => return Err(io_err("stat", &d)(e)),
            };
            ids.push(m.ino());
            if let Ok(rd) = fs::read_dir(&d) {
                for e in rd.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        stack.push(e.path());
                    }
                }
            }
        }
        Ok(ids)
    }

    /// Move a process (all its threads on v2; the given task on v1) in.
    pub fn add_pid(&self, pid: u32) -> Result<(), CgroupError> {
        for c in V1_CONTROLLERS {
            if let Some(d) = self.layout.v1(c, &self.rel) {
                let f = d.join("cgroup.procs");
                fs::write(&f, pid.to_string()).map_err(io_err("write", &f))?;
            }
        }
        let f = self.dir.join("cgroup.procs");
        fs::write(&f, pid.to_string()).map_err(io_err("write", &f))
    }

    /// The cgroup.procs files a process must be written into to join this
    /// cgroup in every hierarchy (used to start a command inside it).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = V1_CONTROLLERS
            .iter()
            .filter_map(|c| self.layout.v1(c, &self.rel))
            .map(|d| d.join("cgroup.procs"))
            .collect();
        v.push(self.dir.join("cgroup.procs"));
        v
    }

    /// CPU time the kernel charged to this cgroup, ns (cpu.stat usage_usec on
    /// v2, which exists in every v2 cgroup; cpuacct.usage on hybrid hosts).
    pub fn cpu_usage_ns(&self) -> Result<u64, CgroupError> {
        if let Some(d) = self.layout.v1("cpuacct", &self.rel) {
            let f = d.join("cpuacct.usage");
            return read_u64(&f);
        }
        let f = self.dir.join("cpu.stat");
        stat_field(&f, "usage_usec").map(|us| us * 1000)
    }

    /// Limit CPU to `quota_us` per `period_us` (cpu.max, or v1 cfs quota).
    pub fn set_cpu_quota(&self, quota_us: u64, period_us: u64) -> Result<(), CgroupError> {
        if let Some(d) = self.layout.v1("cpu", &self.rel) {
            write(&d.join("cpu.cfs_period_us"), &period_us.to_string())?;
            return write(&d.join("cpu.cfs_quota_us"), &quota_us.to_string());
        }
        write(&self.dir.join("cpu.max"), &format!("{quota_us} {period_us}"))
    }

    /// Limit memory (memory.max, or v1 memory.limit_in_bytes).
    pub fn set_memory_limit(&self, bytes: u64) -> Result<(), CgroupError> {
        if let Some(d) = self.layout.v1("memory", &self.rel) {
            return write(&d.join("memory.limit_in_bytes"), &bytes.to_string());
        }
        write(&self.dir.join("memory.max"), &bytes.to_string())
    }

    /// Memory as the kernel accounts it; None when no memory controller
    /// covers this cgroup.
    pub fn memory(&self) -> Result<Option<Memory>, CgroupError> {
        if let Some(d) = self.layout.v1("memory", &self.rel) {
            if !d.exists() {
                return Ok(None);
            }
            let usage = read_u64(&d.join("memory.usage_in_bytes"))?;
            let stat = d.join("memory.stat");
            let inactive = stat_field(&stat, "total_inactive_file")?;
            return Ok(Some(Memory {
                usage_bytes: usage,
                working_set_bytes: usage.saturating_sub(inactive),
                resident_bytes: stat_field(&stat, "total_rss")?,
                pgfault: stat_field(&stat, "total_pgfault")?,
            }));
        }
        let cur = self.dir.join("memory.current");
        if !cur.exists() {
            return Ok(None);
        }
        let usage = read_u64(&cur)?;
        let stat = self.dir.join("memory.stat");
        let inactive = stat_field(&stat, "inactive_file")?;
        Ok(Some(Memory {
            usage_bytes: usage,
            working_set_bytes: usage.saturating_sub(inactive),
            resident_bytes: stat_field(&stat, "anon")?,
            pgfault: stat_field(&stat, "pgfault")?,
        }))
    }

    /// Remove the cgroup from every hierarchy (children first). Tasks still
    /// inside are moved to the parent first so removal cannot fail on them.
    pub fn remove(&self) -> Result<(), CgroupError> {
        let mut dirs: Vec<PathBuf> = V1_CONTROLLERS.iter().filter_map(|c| self.layout.v1(c, &self.rel)).collect();
        dirs.push(self.dir.clone());
        for d in dirs {
            remove_tree(&d)?;
        }
        Ok(())
    }
}

fn remove_tree(dir: &Path) -> Result<(), CgroupError> {
    if !dir.exists() {
        return Ok(());
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path())?;
            }
        }
    }
    // Move stragglers up (to the parent) so rmdir does not fail with EBUSY.
    if let Some(parent) = dir.parent() {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                let _ = fs::write(parent.join("cgroup.procs"), pid);
            }
        }
    }
    let mut last = None;
    for _ in 0..50 {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            // Exiting tasks can keep a cgroup busy for a moment.
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Err(io_err("remove", dir)(last.unwrap_or_else(|| io::Error::other("busy"))))
}

fn write(path: &Path, v: &str) -> Result<(), CgroupError> {
    fs::write(path, v).map_err(io_err("write", path))
}

fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    let s = fs::read_to_string(path).map_err(io_err("read", path))?;
    s.trim().parse().map_err(|_| CgroupError::Parse { path: path.to_path_buf(), what: s.trim().to_string() })
}

/// A `key value` line of a stat file.
fn stat_field(path: &Path, key: &str) -> Result<u64, CgroupError> {
    let s = fs::read_to_string(path).map_err(io_err("read", path))?;
    parse_stat(&s, key).ok_or_else(|| CgroupError::Parse { path: path.to_path_buf(), what: key.into() })
}

pub(crate) fn parse_stat(s: &str, key: &str) -> Option<u64> {
    s.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next() == Some(key)).then(|| f.next()?.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_paths() {
        assert!(check_rel("a/b").is_ok());
        assert!(check_rel("").is_err());
        assert!(check_rel("/abs").is_err());
        assert!(check_rel("a/../b").is_err());
        assert!(check_rel("./a").is_err());
    }

    #[test]
    fn stat_lines() {
        let s = "usage_usec 123\nuser_usec 100\nsystem_usec 23\n";
        assert_eq!(parse_stat(s, "usage_usec"), Some(123));
        assert_eq!(parse_stat(s, "system_usec"), Some(23));
        assert_eq!(parse_stat(s, "nope"), None);
        assert_eq!(parse_stat("usage_usec x", "usage_usec"), None);
    }

    /// A pure cgroup v2 host, as files: memory and CPU come from the
    /// unified hierarchy's own files, limits go to cpu.max / memory.max.
    #[test]
    fn pure_v2_files() {
        let root = std::env::temp_dir().join(format!("governor-cg-v2-{}", std::process::id()));
        let dir = root.join("machine/web");
        fs::create_dir_all(dir.join("child")).expect("tmp tree");
        fs::write(dir.join("memory.current"), "10485760\n").expect("w");
        fs::write(dir.join("memory.stat"), "anon 4194304\nfile 6291456\ninactive_file 2097152\npgfault 1234\n")
            .expect("w");
        fs::write(dir.join("cpu.stat"), "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n").expect("w");
        let layout = Layout { unified: root.clone(), hybrid: false };
        let cg = layout.open("machine/web").expect("open");
        let m = cg.memory().expect("read").expect("v2 memory files present");
        assert_eq!(m.usage_bytes, 10 << 20);
        assert_eq!(m.working_set_bytes, 8 << 20);
        assert_eq!(m.resident_bytes, 4 << 20);
        assert_eq!(m.pgfault, 1234);
        assert_eq!(cg.cpu_usage_ns().expect("cpu"), 2_500_000_000);
        cg.set_cpu_quota(50_000, 100_000).expect("quota");
        assert_eq!(fs::read_to_string(dir.join("cpu.max")).expect("r"), "50000 100000");
        cg.set_memory_limit(1 << 30).expect("limit");
        assert_eq!(fs::read_to_string(dir.join("memory.max")).expect("r"), "1073741824");
        assert_eq!(cg.subtree_ids().expect("ids").len(), 2, "the cgroup and its child");
        assert_eq!(cg.procs_files(), vec![dir.join("cgroup.procs")]);
        assert!(matches!(layout.open("machine/none"), Err(CgroupError::Missing { .. })));
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn layout_of_this_host() {
        // Every supported host has a cgroup2 mount; this also checks the
        // /proc/self/mounts parsing against the real file.
        let l = Layout::detect().expect("cgroup2 mounted");
        assert!(l.unified.join("cgroup.procs").exists());
    }
}
