//! Where the cgroup hierarchies are mounted, read from `/proc/self/mounts`.

use std::path::{Path, PathBuf};

use crate::cgroup::Cgroup;
use crate::error::CgroupError;
use crate::limits::Limits;
use crate::Result;

/// The controllers this project uses. `Cpuacct` exists only on v1; on v2
/// CPU usage is in every cgroup's `cpu.stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Controller {
    Cpu,
    Cpuacct,
    Cpuset,
    Memory,
}

impl Controller {
    pub const ALL: [Controller; 4] = [Controller::Cpu, Controller::Cpuacct, Controller::Cpuset, Controller::Memory];

    pub fn name(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::Cpuacct => "cpuacct",
            Controller::Cpuset => "cpuset",
            Controller::Memory => "memory",
        }
    }
}

/// The hierarchies of this host: the cgroup2 mount (identity, and every
/// controller not bound to v1) and the v1 mounts of our controllers on a
/// hybrid host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    unified: PathBuf,
    v1: Vec<(Controller, PathBuf)>,
}

/// The preferred place for the cgroup2 mount when there are several.
const USUAL_ROOT: &str = "/sys/fs/cgroup";
const MOUNTS: &str = "/proc/self/mounts";

impl Layout {
    /// The layout of this host.
    pub fn detect() -> Result<Layout> {
        let text = std::fs::read_to_string(MOUNTS).map_err(CgroupError::io("read", MOUNTS))?;
        Layout::parse(&text, None)
    }

    /// The layout a mount table describes.
    pub fn from_mounts(text: &str) -> Result<Layout> {
        Layout::parse(text, None)
    }

    /// The layout a mount table describes, with every mount point moved
    /// below `root` (tests build scratch trees shaped like cgroupfs there).
    pub fn from_mounts_at(text: &str, root: &Path) -> Result<Layout> {
        Layout::parse(text, Some(root))
    }

    fn parse(text: &str, root: Option<&Path>) -> Result<Layout> {
        let place = |target: &str| -> PathBuf {
            let p = PathBuf::from(unescape(target));
            match root {
                Some(r) => r.join(p.strip_prefix("/").unwrap_or(&p)),
                None => p,
            }
        };
        let mut unified: Option<(bool, PathBuf)> = None;
        let mut v1: Vec<(Controller, PathBuf)> = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [_src, target, fstype, opts, ..] = f[..] else { continue };
            match fstype {
                "cgroup2" => {
                    let usual = target.starts_with(USUAL_ROOT);
                    if unified.as_ref().is_none_or(|(was_usual, _)| usual && !was_usual) {
                        unified = Some((usual, place(target)));
                    }
                }
                "cgroup" => {
                    for opt in opts.split(',') {
                        if let Some(c) = Controller::ALL.into_iter().find(|c| c.name() == opt) {
                            if !v1.iter().any(|(have, _)| *have == c) {
                                v1.push((c, place(target)));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        let (_, unified) = unified.ok_or_else(|| CgroupError::NoUnified { mounts: MOUNTS.into() })?;
        v1.sort();
        Ok(Layout { unified, v1 })
    }

    /// The cgroup2 mount.
    pub fn unified(&self) -> &Path {
        &self.unified
    }

    /// True when some of our controllers are v1 hierarchies (hybrid host).
    pub fn is_hybrid(&self) -> bool {
        !self.v1.is_empty()
    }

    /// The v1 mount of a controller, if it is bound to v1.
    pub fn v1_root(&self, c: Controller) -> Option<&Path> {
        self.v1.iter().find(|(have, _)| *have == c).map(|(_, p)| p.as_path())
    }

    /// The hierarchy holding a controller's files.
    pub fn root_of(&self, c: Controller) -> &Path {
        self.v1_root(c).unwrap_or(&self.unified)
    }

    /// Every hierarchy a cgroup of ours lives in: the unified one first,
    /// then each distinct v1 mount (co-mounted controllers share one).
    pub fn roots(&self) -> Vec<&Path> {
        let mut v = vec![self.unified.as_path()];
        for (_, p) in &self.v1 {
            if !v.contains(&p.as_path()) {
                v.push(p);
            }
        }
        v
    }

    /// Open an existing cgroup by its path relative to the hierarchy roots.
    pub fn open(&self, rel: &str) -> Result<Cgroup> {
        Cgroup::open(self.clone(), rel)
    }

    /// Create a cgroup (and its missing parents) in every hierarchy and
    /// apply `limits`. Either all of it is in place or, on error, every
    /// directory this call made is removed again.
    pub fn create(&self, rel: &str, limits: &Limits) -> Result<Cgroup> {
        Cgroup::create(self.clone(), rel, limits)
    }
}

/// Undo the octal escapes of /proc/self/mounts (`\040` is a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = u32::from(b[i + 1] - b'0') * 64 + u32::from(b[i + 2] - b'0') * 8 + u32::from(b[i + 3] - b'0');
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's table (trimmed): v1 controllers plus cgroup2 at unified.
    pub const HYBRID: &str = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";

    #[test]
    fn hybrid_host() {
        let l = Layout::from_mounts(HYBRID).expect("hybrid");
        assert_eq!(l.unified(), Path::new("/sys/fs/cgroup/unified"));
        assert!(l.is_hybrid());
        assert_eq!(l.root_of(Controller::Memory), Path::new("/sys/fs/cgroup/memory"));
        assert_eq!(l.roots().len(), 5, "unified + cpu, cpuacct, cpuset, memory");
    }

    #[test]
    fn pure_v2_host() {
        let l =
            Layout::from_mounts("cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n").expect("v2");
        assert!(!l.is_hybrid());
        assert_eq!(l.root_of(Controller::Cpu), Path::new("/sys/fs/cgroup"));
        assert_eq!(l.roots(), vec![Path::new("/sys/fs/cgroup")]);
    }

    #[test]
    fn co_mounted_controllers_share_a_root() {
        let t = "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n\
                 cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        let l = Layout::from_mounts(t).expect("layout");
        assert_eq!(l.root_of(Controller::Cpu), l.root_of(Controller::Cpuacct));
        assert_eq!(l.root_of(Controller::Memory), Path::new("/sys/fs/cgroup/unified"), "not on v1: unified");
        assert_eq!(l.roots().len(), 2);
    }

    #[test]
    fn pure_v1_is_refused_with_the_reason() {
        let t = "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n";
        let e = Layout::from_mounts(t).expect_err("v1 only");
        assert!(matches!(e, CgroupError::NoUnified { .. }));
        assert!(e.to_string().contains("pure cgroup v1"), "{e}");
    }

    #[test]
    fn injected_root_and_escapes() {
        let l = Layout::from_mounts_at("cgroup2 /sys/fs/my\\040cg cgroup2 rw 0 0\n", Path::new("/tmp/x")).expect("l");
        assert_eq!(l.unified(), Path::new("/tmp/x/sys/fs/my cg"));
    }

    #[test]
    fn the_usual_cgroup2_mount_wins() {
        let t = "cgroup2 /run/other cgroup2 rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(Layout::from_mounts(t).expect("l").unified(), Path::new("/sys/fs/cgroup/unified"));
    }

    #[test]
    fn layout_of_this_host() {
        // Every supported host has a cgroup2 mount; this also checks the
        // parsing against the real /proc/self/mounts.
        let l = Layout::detect().expect("cgroup2 mounted");
        assert!(l.unified().join("cgroup.procs").exists());
    }
}
