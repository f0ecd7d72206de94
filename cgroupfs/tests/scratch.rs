//! The crate against scratch trees shaped like cgroupfs: a pure v2 host and
//! a hybrid host (this project's CI machines are hybrid, so the pure v2
//! paths are exercised here). Plain directories stand in for cgroupfs: the
//! kernel's files are written by the test where a read needs them.

use std::fs;
use std::path::{Path, PathBuf};

use cgroupfs::{CgroupError, Controller, Layout, Limits};

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("cgroupfs-{tag}-{}", std::process::id()));
        // A scratch tree of an earlier, killed run of this pid may be there.
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("scratch dir");
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("warning: removing {}: {e}", self.0.display());
        }
    }
}

fn put(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    fs::write(path, text).expect("write");
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

const V2: &str = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n";
const HYBRID: &str = "\
cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,cpuacct 0 0
cgroup /sys/fs/cgroup/cpuset cgroup rw,cpuset 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0
";

#[test]
fn pure_v2_create_limits_usage_remove() {
    let s = Scratch::new("v2");
    let root = s.0.join("sys/fs/cgroup");
    put(&root.join("cgroup.controllers"), "cpuset cpu io memory pids\n");
    put(&root.join("cgroup.subtree_control"), "");
    let layout = Layout::from_mounts_at(V2, &s.0).expect("layout");
    let limits = Limits {
        cpu_quota_us: Some(50_000),
        cpuset: Some("0".into()),
        memory_bytes: Some(64 << 20),
        cpu_weight: Some(1000),
        ..Limits::default()
    };
    let mut cg = layout.create("machine/web", &limits).expect("create");
    let dir = root.join("machine/web");
    assert_eq!(cg.dir(), dir);
    assert_eq!(read(&dir.join("cpu.max")), "50000 100000");
    assert_eq!(read(&dir.join("cpu.weight")), "1000");
    assert_eq!(read(&dir.join("cpuset.cpus")), "0");
    assert_eq!(read(&dir.join("memory.max")), (64u64 << 20).to_string());
    assert!(!read(&root.join("cgroup.subtree_control")).is_empty(), "controllers delegated below the root");
    assert_eq!(cg.controller_dir(Controller::Memory), dir, "every controller in the one v2 directory");

    put(&dir.join("memory.current"), "10485760\n");
    put(&dir.join("memory.stat"), "anon 4194304\nfile 6291456\ninactive_file 2097152\npgfault 1234\n");
    put(&dir.join("cpu.stat"), "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n");
    put(&dir.join("memory.peak"), "20971520\n");
    let m = cg.memory().expect("read").expect("v2 memory files present");
    assert_eq!((m.usage_bytes, m.working_set_bytes, m.resident_bytes, m.pgfault), (10 << 20, 8 << 20, 4 << 20, 1234));
    assert_eq!(cg.cpu_usage_ns().expect("cpu"), 2_500_000_000);
    assert_eq!(cg.cpu_quota().expect("quota"), Some((50_000, 100_000)));
    assert_eq!(cg.memory_limit().expect("limit"), Some(64 << 20));
    assert_eq!(cg.memory_peak().expect("peak"), 20 << 20);
    put(&dir.join("memory.max"), "max\n");
    put(&dir.join("cpu.max"), "max 100000\n");
    assert_eq!(cg.memory_limit().expect("limit"), None, "max = unlimited");
    assert_eq!(cg.cpu_quota().expect("quota"), None);
    put(&dir.join("cpu.stat"), "user_usec 1\n");
    assert!(matches!(cg.cpu_usage_ns(), Err(CgroupError::Parse { .. })), "cpu.stat without usage_usec");

    fs::create_dir(dir.join("child")).expect("child");
    assert_eq!(cg.subtree_ids().expect("ids").len(), 2, "the cgroup and its child");
    assert_eq!(cg.procs_files(), vec![dir.join("cgroup.procs")]);
    assert_eq!(layout.open("machine/web").expect("open").id().expect("id"), cg.id().expect("id"));
    assert!(matches!(layout.open("machine/none"), Err(CgroupError::Missing { .. })));

    // Plain directories are not cgroupfs: rmdir needs them empty.
    for f in [
        "cpu.max",
        "cpu.weight",
        "cpuset.cpus",
        "memory.max",
        "memory.current",
        "memory.stat",
        "cpu.stat",
        "memory.peak",
    ] {
        fs::remove_file(dir.join(f)).expect("rm");
    }
    cg.remove().expect("remove");
    assert!(!root.join("machine").exists(), "the parent this value created goes too");
}

#[test]
fn hybrid_create_limits_usage() {
    let s = Scratch::new("hybrid");
    let base = s.0.join("sys/fs/cgroup");
    put(&base.join("cpuset/cpuset.cpus"), "0-1\n");
    put(&base.join("cpuset/cpuset.mems"), "0\n");
    for ctrl in ["unified", "cpu", "cpuacct", "memory"] {
        fs::create_dir_all(base.join(ctrl)).expect("mount point");
    }
    let layout = Layout::from_mounts_at(HYBRID, &s.0).expect("layout");
    assert!(layout.is_hybrid());
    let limits = Limits { memory_bytes: Some(32 << 20), cpu_weight: Some(1000), ..Limits::cpus(0.25) };
    let cg = layout.create("mc/vm-1", &limits).expect("create");
    assert_eq!(read(&base.join("cpu/mc/vm-1/cpu.shares")), "10240", "v1 shares on systemd's scale");
    for ctrl in ["unified", "cpu", "cpuacct", "cpuset", "memory"] {
        assert!(base.join(ctrl).join("mc/vm-1").is_dir(), "{ctrl}");
    }
    assert_eq!(read(&base.join("cpu/mc/vm-1/cpu.cfs_quota_us")), "25000");
    assert_eq!(read(&base.join("cpu/mc/vm-1/cpu.cfs_period_us")), "100000");
    assert_eq!(read(&base.join("memory/mc/vm-1/memory.limit_in_bytes")), (32u64 << 20).to_string());
    assert_eq!(read(&base.join("cpuset/mc/cpuset.cpus")), "0-1", "a new v1 cpuset inherits cpus down the path");
    assert_eq!(read(&base.join("cpuset/mc/vm-1/cpuset.mems")), "0");
    assert_eq!(cg.dir(), base.join("unified/mc/vm-1"), "identity from v2");

    put(&base.join("cpuacct/mc/vm-1/cpuacct.usage"), "123456789\n");
    put(&base.join("memory/mc/vm-1/memory.usage_in_bytes"), "8192\n");
    put(&base.join("memory/mc/vm-1/memory.max_usage_in_bytes"), "16384\n");
    put(&base.join("memory/mc/vm-1/memory.stat"), "total_rss 4096\ntotal_inactive_file 1024\ntotal_pgfault 7\n");
    assert_eq!(cg.cpu_usage_ns().expect("cpu"), 123_456_789);
    let m = cg.memory().expect("mem").expect("v1 memory");
    assert_eq!((m.usage_bytes, m.working_set_bytes, m.resident_bytes, m.pgfault), (8192, 7168, 4096, 7));
    assert_eq!(cg.memory_peak().expect("peak"), 16384);
    put(&base.join("memory/mc/vm-1/memory.limit_in_bytes"), "9223372036854771712\n");
    assert_eq!(cg.memory_limit().expect("limit"), None, "v1's huge number means unlimited");
    assert_eq!(cg.cpu_quota().expect("quota"), Some((25_000, 100_000)));
    put(&base.join("cpuacct/mc/vm-1/cpuacct.usage"), "garbage");
    assert!(matches!(cg.cpu_usage_ns(), Err(CgroupError::Parse { .. })));
    assert_eq!(cg.procs_files().len(), 5);
}

#[test]
fn a_half_made_cgroup_is_rolled_back() {
    let s = Scratch::new("rollback");
    let base = s.0.join("sys/fs/cgroup");
    // No cpuset.cpus at the cpuset root: the new cpuset cannot inherit
    // its CPUs, after the unified, cpu and cpuacct directories were made.
    for ctrl in ["unified", "cpu", "cpuacct", "cpuset", "memory"] {
        fs::create_dir_all(base.join(ctrl)).expect("mkdir");
    }
    let layout = Layout::from_mounts_at(HYBRID, &s.0).expect("layout");
    let e = layout.create("a/b", &Limits::default()).expect_err("cpuset cannot be filled");
    assert!(e.to_string().contains("cpuset.cpus"), "the error names the file: {e}");
    for ctrl in ["unified", "cpu", "cpuacct", "cpuset", "memory"] {
        assert!(!base.join(ctrl).join("a").exists(), "{ctrl}/a left behind");
    }
}

#[test]
fn bad_paths_and_limits_are_refused_before_anything_is_made() {
    let s = Scratch::new("refuse");
    fs::create_dir_all(s.0.join("sys/fs/cgroup")).expect("root");
    let layout = Layout::from_mounts_at(V2, &s.0).expect("layout");
    for bad in ["", "/abs", "a/../b", "a//b", ".", "a/", "./a"] {
        assert!(matches!(layout.create(bad, &Limits::default()), Err(CgroupError::BadPath(_))), "{bad:?}");
    }
    let e = layout.create("x", &Limits { memory_bytes: Some(1), ..Limits::default() }).expect_err("tiny limit");
    assert!(matches!(e, CgroupError::Limit { field: "memory_bytes", .. }), "{e}");
    assert!(!s.0.join("sys/fs/cgroup/x").exists());
}

#[test]
fn release_removes_only_what_this_value_made() {
    let s = Scratch::new("release");
    fs::create_dir_all(s.0.join("sys/fs/cgroup/machine/web")).expect("an existing cgroup");
    let layout = Layout::from_mounts_at(V2, &s.0).expect("layout");
    let mut joined = layout.create("machine/web", &Limits::default()).expect("create over an existing one");
    assert!(!joined.created());
    joined.release().expect("release");
    assert!(s.0.join("sys/fs/cgroup/machine/web").is_dir(), "a cgroup that was there stays");
    let mut made = layout.create("machine/new", &Limits::default()).expect("create");
    assert!(made.created());
    made.release().expect("release");
    assert!(!s.0.join("sys/fs/cgroup/machine/new").exists(), "a cgroup this value made goes");
    assert!(s.0.join("sys/fs/cgroup/machine").is_dir(), "the parent it did not make stays");
}

#[test]
fn a_pure_v1_tree_is_refused_naming_the_reason() {
    let s = Scratch::new("v1");
    for ctrl in ["cpu", "cpuacct", "cpuset", "memory"] {
        fs::create_dir_all(s.0.join("sys/fs/cgroup").join(ctrl)).expect("v1 mount point");
    }
    let v1 = "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup /sys/fs/cgroup/cpuacct cgroup rw,cpuacct 0 0\n\
              cgroup /sys/fs/cgroup/cpuset cgroup rw,cpuset 0 0\ncgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n";
    let e = Layout::from_mounts_at(v1, &s.0).expect_err("no cgroup2 mount");
    assert!(matches!(e, CgroupError::NoUnified { .. }));
    assert!(e.to_string().contains("cgroup v2 id"), "{e}");
}
