//! One cgroup, present in the unified hierarchy and, on a hybrid host, in
//! the v1 hierarchies of the controllers we use.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::CgroupError;
use crate::files::{self, read_u64, stat_field, write};
use crate::layout::{Controller, Layout};
use crate::limits::Limits;
use crate::Result;

const PROCS: &str = "cgroup.procs";

thread_local! {
    /// The text of the last memory.stat read (~1.5 KiB on v1), kept: a
    /// tick reads dozens.
    static STAT_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A cgroup's memory files held open and read with pread from offset 0
/// (the kernel regenerates a cgroup file for each read from its start): a
/// tick at 1,000 cgroups cannot afford an open(2) path walk per file per
/// cgroup, which cost more than the reads themselves.
#[derive(Debug)]
pub struct MemoryFiles {
    usage: (fs::File, PathBuf),
    stat: (fs::File, PathBuf),
    /// memory.limit_in_bytes (v1) or memory.max (v2).
    limit: (fs::File, PathBuf),
    /// inactive file, resident, page faults in memory.stat.
    keys: [&'static str; 3],
}

impl MemoryFiles {
    /// The whole file from offset 0. These are seq_files, whose read fills
    /// the buffer unless the text ends first: a short read is the end, and
    /// reading again to see 0 (one more system call) is not needed.
    /// A small file (a number) as text.
    fn small(f: &(fs::File, PathBuf)) -> Result<([u8; 64], usize)> {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 64];
        let n = f.0.read_at(&mut b, 0).map_err(CgroupError::io("read", &f.1))?;
        Ok((b, n))
    }

    /// Usage in bytes (one small read).
    pub fn usage(&self) -> Result<u64> {
        let (b, n) = Self::small(&self.usage)?;
        let s = std::str::from_utf8(&b[..n]).unwrap_or_default();
        s.trim().parse().map_err(|_| CgroupError::Parse { path: self.usage.1.clone(), what: "usage".into() })
    }

    /// The limit; None when unlimited (v1 says so with a huge number, v2
    /// with "max").
    pub fn limit(&self) -> Result<Option<u64>> {
        let (b, n) = Self::small(&self.limit)?;
        parse_limit(std::str::from_utf8(&b[..n]).unwrap_or_default(), &self.limit.1)
    }

    /// Everything [`Cgroup::memory`] reads: usage and one read of memory.stat.
    pub fn read(&self) -> Result<Memory> {
        let usage = self.usage()?;
        let values = STAT_BUF.with_borrow_mut(|b| -> Result<_> {
            files::read_whole_at(&self.stat.0, &self.stat.1, b)?;
            // The kernel writes ASCII; anything else parses as nothing.
            Ok(files::parse_stats(std::str::from_utf8(b).unwrap_or_default(), &self.keys))
        })?;
        let field = |i: usize| {
            values[i].ok_or_else(|| CgroupError::Parse { path: self.stat.1.clone(), what: self.keys[i].into() })
        };
        Ok(Memory {
            usage_bytes: usage,
            working_set_bytes: usage.saturating_sub(field(0)?),
            resident_bytes: field(1)?,
            pgfault: field(2)?,
        })
    }
}

/// A memory limit file's text: None when unlimited (v1 says so with a
/// huge page-aligned number, v2 with "max").
fn parse_limit(text: &str, path: &Path) -> Result<Option<u64>> {
    let s = text.trim();
    if s == "max" {
        return Ok(None);
    }
    let v: u64 = s.parse().map_err(|_| CgroupError::Parse { path: path.to_path_buf(), what: "limit".into() })?;
    Ok((v < 1 << 60).then_some(v))
}

/// Whether the cgroup directory `dir` (from [`Cgroup::open_dir`]) has child
/// cgroups: its link count is 2 plus its subdirectories (kernfs refreshes
/// it on every stat). One fstat, no path walk and no listing of its files.
pub fn has_children(dir: &fs::File) -> io::Result<bool> {
    Ok(dir.metadata()?.nlink() > 2)
}

/// Memory of a cgroup as the kernel accounts it (cAdvisor's definitions).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// memory.current / memory.usage_in_bytes
    pub usage_bytes: u64,
    /// usage minus inactive file pages: what the kubelet calls working set.
    pub working_set_bytes: u64,
    /// anonymous memory (anon / total_rss)
    pub resident_bytes: u64,
    /// page faults the kernel counted (pgfault / total_pgfault)
    pub pgfault: u64,
}

#[derive(Clone, Debug)]
pub struct Cgroup {
    layout: Layout,
    rel: PathBuf,
    /// Directories this value created, in creation order (parents first):
    /// what a rollback or `remove` may delete beyond the cgroup itself.
    created: Vec<PathBuf>,
}

fn check_rel(rel: &str) -> Result<PathBuf> {
    let p = Path::new(rel);
    let ok = !rel.is_empty()
        && !rel.starts_with('/')
        && !rel.contains("//")
        && !rel.ends_with('/')
        && p.components().all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(p.to_path_buf())
    } else {
        Err(CgroupError::BadPath(rel.to_string()))
    }
}

impl Cgroup {
    pub(crate) fn open(layout: Layout, rel: &str) -> Result<Cgroup> {
        let rel = check_rel(rel)?;
        let dir = layout.unified().join(&rel);
        if !dir.is_dir() {
            return Err(CgroupError::Missing { path: dir });
        }
        Ok(Cgroup { layout, rel, created: Vec::new() })
    }

    pub(crate) fn create(layout: Layout, rel: &str, limits: &Limits) -> Result<Cgroup> {
        let rel = check_rel(rel)?;
        limits.validate()?;
        let mut cg = Cgroup { layout, rel, created: Vec::new() };
        if let Err(e) = cg.build(limits) {
            cg.rollback();
            return Err(e);
        }
        Ok(cg)
    }

    fn build(&mut self, limits: &Limits) -> Result<()> {
        let roots: Vec<PathBuf> = self.layout.roots().into_iter().map(Path::to_path_buf).collect();
        for root in roots {
            let unified = root == self.layout.unified();
            let mut dir = root.clone();
            for comp in self.rel.components() {
                if unified {
                    self.delegate(&dir);
                }
                dir.push(comp);
                if dir.is_dir() {
                    continue;
                }
                match fs::create_dir(&dir) {
                    Ok(()) => self.created.push(dir.clone()),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(CgroupError::io("create", &dir)(e)),
                }
                if Some(root.as_path()) == self.layout.v1_root(Controller::Cpuset) {
                    inherit_cpuset(&dir)?;
                }
            }
        }
        self.set_limits(limits)
    }

    /// Enable, below `dir` of the unified hierarchy, the controllers that
    /// live there (not bound to v1) and that `dir` offers. Best effort: a
    /// controller that cannot be enabled makes its limit's write fail later,
    /// with the file named.
    fn delegate(&self, dir: &Path) {
        let offered = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
        for c in [Controller::Cpu, Controller::Cpuset, Controller::Memory] {
            let name = c.name();
            let has = |s: &str| s.split_whitespace().any(|w| w == name);
            if self.layout.v1_root(c).is_some() || !has(&offered) || has(&enabled) {
                continue;
            }
            let f = dir.join("cgroup.subtree_control");
            if let Err(e) = fs::write(&f, format!("+{name}")) {
                tracing::debug!(file = %f.display(), controller = name, "cannot enable controller: {e}");
            }
        }
    }

    /// Undo a half-made cgroup: remove what this value created, deepest first.
    fn rollback(&mut self) {
        for d in self.created.drain(..).rev() {
            if let Err(e) = fs::remove_dir(&d) {
                tracing::warn!(dir = %d.display(), "rollback of a half-made cgroup: cannot remove: {e}");
            }
        }
    }

    /// The path relative to the hierarchy roots.
    pub fn rel(&self) -> &Path {
        &self.rel
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The directory in the unified hierarchy.
    pub fn dir(&self) -> PathBuf {
        self.layout.unified().join(&self.rel)
    }

    /// The cgroup's (unified) directory, opened: a cheap way to ask again
    /// whether it has children (see [`has_children`]).
    pub fn open_dir(&self) -> Result<fs::File> {
        let d = self.dir();
        fs::File::open(&d).map_err(CgroupError::io("open", &d))
    }

    /// The directory holding a controller's files.
    pub fn controller_dir(&self, c: Controller) -> PathBuf {
        self.layout.root_of(c).join(&self.rel)
    }

    /// Every directory making up this cgroup, unified first.
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.layout.roots().into_iter().map(|r| r.join(&self.rel)).collect()
    }

    /// cgroup v2 id: the inode number of the unified directory, which is
    /// what `bpf_get_current_cgroup_id()` returns for its tasks.
    pub fn id(&self) -> Result<u64> {
        let d = self.dir();
        fs::metadata(&d).map(|m| m.ino()).map_err(CgroupError::io("stat", d))
    }

    /// Ids of this cgroup and every cgroup below it (a VMM may put its vCPU
    /// threads in child cgroups; they still belong to the VM).
    pub fn subtree_ids(&self) -> Result<Vec<u64>> {
        Ok(self.subtree()?.into_iter().map(|(id, _)| id).collect())
    }

    /// [`Cgroup::subtree_ids`] with each cgroup's unified directory.
    pub fn subtree(&self) -> Result<Vec<(u64, PathBuf)>> {
        let top = self.dir();
        let mut ids = Vec::new();
        let mut stack = vec![top.clone()];
        while let Some(d) = stack.pop() {
            let m = match fs::metadata(&d) {
                Ok(m) => m,
                // A child removed while we walk is simply gone.
                Err(e) if e.kind() == io::ErrorKind::NotFound && d != top => continue,
                Err(e) => return Err(CgroupError::io("stat", &d)(e)),
            };
            ids.push((m.ino(), d.clone()));
            // A cgroup directory's link count is 2 plus its subdirectories
            // (kernfs keeps it so): with none, there is nothing to list,
            // which spares reading the names of all its control files.
            if m.nlink() <= 2 {
                continue;
            }
            if let Ok(rd) = fs::read_dir(&d) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
            }
        }
        Ok(ids)
    }

    /// The files a process is written into to join this cgroup in every
    /// hierarchy.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs().into_iter().map(|d| d.join(PROCS)).collect()
    }

    /// Move a process (all its threads) in, in every hierarchy.
    pub fn attach(&self, pid: u32) -> Result<()> {
        for f in self.procs_files() {
            write(&f, &pid.to_string())?;
        }
        Ok(())
    }

    /// Move one thread (a vCPU thread) in. On v1 each controller takes it
    /// through `tasks`; on pure v2 the cgroup must be threaded
    /// (`cgroup.threads`). On a hybrid host the unified tree only gives
    /// identity, which is per process, so it is left alone there.
    pub fn attach_thread(&self, tid: u32) -> Result<()> {
        if self.layout.is_hybrid() {
            for root in self.layout.roots().into_iter().skip(1) {
                write(&root.join(&self.rel).join("tasks"), &tid.to_string())?;
            }
            Ok(())
        } else {
            write(&self.dir().join("cgroup.threads"), &tid.to_string())
        }
    }

    /// Processes in the cgroup itself (not its children).
    pub fn pids(&self) -> Vec<u32> {
        files::ids(&self.dir().join(PROCS))
    }

    /// Apply limits (those set in `l`; others stay as they are).
    pub fn set_limits(&self, l: &Limits) -> Result<()> {
        l.validate()?;
        if let Some(q) = l.cpu_quota_us {
            self.set_cpu_quota(q, l.period())?;
        }
        if let Some(c) = &l.cpuset {
            write(&self.controller_dir(Controller::Cpuset).join("cpuset.cpus"), c)?;
        }
        if let Some(m) = l.memory_bytes {
            self.set_memory_limit(m)?;
        }
        if let Some(w) = l.cpu_weight {
            self.set_cpu_weight(w)?;
        }
        Ok(())
    }

    /// The CPU weight (cpu.weight, or v1 cpu.shares on the same scale as
    /// systemd maps them: weight * 1024 / 100).
    pub fn set_cpu_weight(&self, weight: u64) -> Result<()> {
        let d = self.controller_dir(Controller::Cpu);
        if self.layout.v1_root(Controller::Cpu).is_some() {
            return write(&d.join("cpu.shares"), &(weight * 1024 / 100).max(2).to_string());
        }
        write(&d.join("cpu.weight"), &weight.to_string())
    }

    /// Limit CPU to `quota_us` per `period_us` (cpu.max, or v1 CFS quota).
    pub fn set_cpu_quota(&self, quota_us: u64, period_us: u64) -> Result<()> {
        let d = self.controller_dir(Controller::Cpu);
        if self.layout.v1_root(Controller::Cpu).is_some() {
            write(&d.join("cpu.cfs_period_us"), &period_us.to_string())?;
            return write(&d.join("cpu.cfs_quota_us"), &quota_us.to_string());
        }
        write(&d.join("cpu.max"), &format!("{quota_us} {period_us}"))
    }

    /// Limit memory (memory.max, or v1 memory.limit_in_bytes).
    pub fn set_memory_limit(&self, bytes: u64) -> Result<()> {
        let d = self.controller_dir(Controller::Memory);
        let file =
            if self.layout.v1_root(Controller::Memory).is_some() { "memory.limit_in_bytes" } else { "memory.max" };
        write(&d.join(file), &bytes.to_string())
    }

    /// The CPU quota as (quota µs, period µs); None when unlimited.
    pub fn cpu_quota(&self) -> Result<Option<(u64, u64)>> {
        let d = self.controller_dir(Controller::Cpu);
        if self.layout.v1_root(Controller::Cpu).is_some() {
            let q = files::read(&d.join("cpu.cfs_quota_us"))?;
            let p = read_u64(&d.join("cpu.cfs_period_us"))?;
            return Ok(q.trim().parse::<i64>().ok().filter(|q| *q > 0).map(|q| (q as u64, p)));
        }
        let f = d.join("cpu.max");
        let s = files::read(&f)?;
        let mut it = s.split_whitespace();
        let (q, p) = (it.next().unwrap_or("max"), it.next().unwrap_or("100000"));
        let p = p.parse::<u64>().map_err(|_| CgroupError::Parse { path: f.clone(), what: s.trim().into() })?;
        Ok(q.parse::<u64>().ok().map(|q| (q, p)))
    }

    /// CPU time the kernel charged to this cgroup, ns (cpuacct.usage on v1,
    /// cpu.stat usage_usec on v2, which every v2 cgroup has).
    pub fn cpu_usage_ns(&self) -> Result<u64> {
        if self.layout.v1_root(Controller::Cpuacct).is_some() {
            return read_u64(&self.controller_dir(Controller::Cpuacct).join("cpuacct.usage"));
        }
        stat_field(&self.dir().join("cpu.stat"), "usage_usec").map(|us| us * 1000)
    }

    fn memory_v1(&self) -> bool {
        self.layout.v1_root(Controller::Memory).is_some()
    }

    /// Memory as the kernel accounts it; None when no memory controller
    /// covers this cgroup.
    pub fn memory(&self) -> Result<Option<Memory>> {
        let d = self.controller_dir(Controller::Memory);
        let (usage_file, inactive, rss, faults) = if self.memory_v1() {
            ("memory.usage_in_bytes", "total_inactive_file", "total_rss", "total_pgfault")
        } else {
            ("memory.current", "inactive_file", "anon", "pgfault")
        };
        let usage_path = d.join(usage_file);
        let usage = match read_u64(&usage_path) {
            Ok(u) => u,
            Err(CgroupError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        // One read of memory.stat for the three fields: the kernel formats
        // the whole file (dozens of counters) for every read, which is most
        // of a tick's cost at 1,000 VMs.
        let stat = d.join("memory.stat");
        let text = files::read(&stat)?;
        let keys = [inactive, rss, faults];
        let values = files::parse_stats(&text, &keys);
        let field = |i: usize| values[i].ok_or_else(|| CgroupError::Parse { path: stat.clone(), what: keys[i].into() });
        Ok(Some(Memory {
            usage_bytes: usage,
            working_set_bytes: usage.saturating_sub(field(0)?),
            resident_bytes: field(1)?,
            pgfault: field(2)?,
        }))
    }

    /// The memory files of this cgroup kept open, for reading every tick
    /// (see [`MemoryFiles`]); None when no memory controller covers it.
    pub fn memory_files(&self) -> Result<Option<MemoryFiles>> {
        let d = self.controller_dir(Controller::Memory);
        let (usage_file, limit_file, keys) = if self.memory_v1() {
            ("memory.usage_in_bytes", "memory.limit_in_bytes", ["total_inactive_file", "total_rss", "total_pgfault"])
        } else {
            ("memory.current", "memory.max", ["inactive_file", "anon", "pgfault"])
        };
        let open = |name: &str| {
            let p = d.join(name);
            fs::File::open(&p).map_err(CgroupError::io("open", &p)).map(|f| (f, p))
        };
        let usage = match open(usage_file) {
            Ok(u) => u,
            Err(CgroupError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(Some(MemoryFiles { usage, stat: open("memory.stat")?, limit: open(limit_file)?, keys }))
    }

    /// The memory limit in bytes; None when unlimited.
    pub fn memory_limit(&self) -> Result<Option<u64>> {
        let d = self.controller_dir(Controller::Memory);
        let path = d.join(if self.memory_v1() { "memory.limit_in_bytes" } else { "memory.max" });
        parse_limit(&files::read(&path)?, &path)
    }

    /// The highest memory usage seen (v1 max_usage_in_bytes, v2
    /// memory.peak where the kernel has it, else the current usage).
    pub fn memory_peak(&self) -> Result<u64> {
        let d = self.controller_dir(Controller::Memory);
        if self.memory_v1() {
            return read_u64(&d.join("memory.max_usage_in_bytes"));
        }
        read_u64(&d.join("memory.peak")).or_else(|_| read_u64(&d.join("memory.current")))
    }

    /// SIGKILL every process in the cgroup and below, except this process,
    /// and wait (up to `timeout`) until none is left. For tests and demos
    /// that must leave nothing behind.
    pub fn kill_all(&self, timeout: Duration) {
        let me = std::process::id();
        let deadline = Instant::now() + timeout;
        loop {
            // 0 stands for a task outside our pid namespace: never a pid to signal.
            let pids: Vec<u32> = self
                .all_dirs_below()
                .iter()
                .flat_map(|d| files::ids(&d.join(PROCS)))
                .filter(|p| *p != me && *p != 0)
                .collect();
            if pids.is_empty() || Instant::now() > deadline {
                if !pids.is_empty() {
                    tracing::warn!(cgroup = %self.rel.display(), ?pids, "processes still alive after SIGKILL");
                }
                return;
            }
            for p in pids {
                // SAFETY: kill(2) with a pid read from the cgroup; no memory is touched.
                unsafe { libc::kill(p as i32, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// This cgroup's directories in every hierarchy and everything below.
    fn all_dirs_below(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = self.dirs();
        while let Some(d) = stack.pop() {
            if let Ok(rd) = fs::read_dir(&d) {
                stack.extend(rd.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
                out.push(d);
            }
        }
        out
    }

    /// True when this value made the cgroup itself (in the unified
    /// hierarchy), rather than opening or joining one that was there.
    pub fn created(&self) -> bool {
        self.created.contains(&self.dir())
    }

    /// Undo what `create` did: remove the cgroup only if this value made
    /// it (see [`Cgroup::remove`]); a cgroup that was there before (one the
    /// governor or an operator made and a VMM only joined) stays, with
    /// whatever else is in it.
    pub fn release(&mut self) -> Result<()> {
        if self.created() {
            self.remove()
        } else {
            self.created.clear();
            Ok(())
        }
    }

    /// Remove the cgroup and its children from every hierarchy, whoever
    /// made it; processes still inside are moved to the hierarchy's root
    /// first (rmdir fails on a populated cgroup). Then the parents this value
    /// created are removed when nothing else uses them. Every directory is
    /// tried; the first error is returned.
    pub fn remove(&mut self) -> Result<()> {
        let mut first = None;
        for root in self.layout.roots() {
            if let Err(e) = remove_tree(root, &root.join(&self.rel)) {
                first.get_or_insert(e);
            }
        }
        let leaves = self.dirs();
        for d in self.created.drain(..).rev().filter(|d| !leaves.contains(d)) {
            match fs::remove_dir(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // Another cgroup below it is still in use: its owner removes it.
                Err(e) => tracing::debug!(dir = %d.display(), "parent cgroup stays: {e}"),
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// A new v1 cpuset starts empty; copy the parent's cpus and mems so tasks
/// can be attached.
fn inherit_cpuset(dir: &Path) -> Result<()> {
    let Some(parent) = dir.parent() else { return Ok(()) };
    for f in ["cpuset.cpus", "cpuset.mems"] {
        let cur = fs::read_to_string(dir.join(f)).unwrap_or_default();
        if cur.trim().is_empty() {
            let v = files::read(&parent.join(f))?;
            write(&dir.join(f), v.trim())?;
        }
    }
    Ok(())
}

fn remove_tree(root: &Path, dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(root, &e.path())?;
            }
        }
    }
    // Stragglers go to the root, which always accepts processes (a v2
    // parent with controllers enabled would refuse them).
    for pid in files::ids(&dir.join(PROCS)) {
        if let Err(e) = fs::write(root.join(PROCS), pid.to_string()) {
            tracing::warn!(pid, cgroup = %dir.display(), "cannot move a process out before removal: {e}");
        }
    }
    for tid in files::ids(&dir.join("tasks")) {
        if let Err(e) = fs::write(root.join("tasks"), tid.to_string()) {
            tracing::warn!(tid, cgroup = %dir.display(), "cannot move a thread out before removal: {e}");
        }
    }
    files::remove_dir(dir)
}
