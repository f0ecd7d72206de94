//! The crate against this host's real hierarchies (root required; fails,
//! never skips, without it).

use std::process::Command;
use std::time::{Duration, Instant};

use cgroupfs::{Layout, Limits};

/// Kills what is left in a test's cgroup and removes it when the test
/// ends, also when an assertion fails half way.
struct Guard(cgroupfs::Cgroup);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.kill_all(Duration::from_secs(5));
        if let Err(e) = self.0.remove() {
            eprintln!("warning: removing {}: {e}", self.0.rel().display());
        }
    }
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "cgroupfs host tests create cgroups: run them as root (cargo xtask test)"
    );
}

#[test]
fn create_join_measure_limit_remove() {
    require_root();
    let layout = Layout::detect().expect("layout");
    let name = format!("cgroupfs-test-{}/leaf", std::process::id());
    let limits = Limits { memory_bytes: Some(64 << 20), ..Limits::cpus(0.2) };
    let mut guard = Guard(layout.create(&name, &limits).expect("create"));
    let cg = &mut guard.0;
    let dirs = cg.dirs();
    assert!(dirs.iter().all(|d| d.is_dir()), "{dirs:?}");

    let mut cmd = Command::new("sh");
    cmd.args(["-c", "while :; do :; done"]);
    cg.join_on_exec(&mut cmd).expect("prepare join");
    let mut child = cmd.spawn().expect("spawn into the cgroup");
    assert_eq!(cg.pids(), vec![child.id()], "the child is in the cgroup from its first instruction");
    let t0 = Instant::now();
    let u0 = cg.cpu_usage_ns().expect("usage");
    std::thread::sleep(Duration::from_secs(1));
    let used = (cg.cpu_usage_ns().expect("usage") - u0) as f64 / t0.elapsed().as_nanos() as f64;
    assert!((0.1..=0.3).contains(&used), "a busy loop under a 20% quota used {used:.3} CPUs");
    assert_eq!(cg.cpu_quota().expect("quota"), Some((20_000, 100_000)));
    assert_eq!(cg.memory_limit().expect("limit"), Some(64 << 20));
    let m = cg.memory().expect("memory").expect("memory controller present");
    assert!(m.usage_bytes > 0);
    assert_eq!(cg.subtree_ids().expect("ids"), vec![cg.id().expect("id")]);

    cg.kill_all(Duration::from_secs(5));
    child.wait().expect("reap the busy loop");
    assert!(cg.pids().is_empty());
    cg.remove().expect("remove");
    assert!(dirs.iter().all(|d| !d.exists()), "leaf removed everywhere");
    let parent = layout.unified().join(format!("cgroupfs-test-{}", std::process::id()));
    assert!(!parent.exists(), "the parent this value created is removed too");
}

#[test]
fn remove_moves_stragglers_out() {
    require_root();
    let layout = Layout::detect().expect("layout");
    let mut guard =
        Guard(layout.create(&format!("cgroupfs-test-s{}", std::process::id()), &Limits::default()).expect("c"));
    let cg = &mut guard.0;
    let mut child = Command::new("sleep").arg("30").spawn().expect("spawn sleep");
    cg.attach(child.id()).expect("attach");
    assert_eq!(cg.pids(), vec![child.id()]);
    cg.remove().expect("a populated cgroup is emptied, then removed");
    assert!(!cg.dir().exists());
    child.kill().expect("kill");
    child.wait().expect("reap");
}

/// inotify sees a child cgroup made in a watched cgroup of the unified
/// hierarchy (mkdir on cgroupfs notifies like on any filesystem).
#[test]
fn a_child_cgroup_is_told_by_its_watch() {
    require_root();
    let layout = Layout::detect().expect("layout");
    let name = format!("cgroupfs-watch-{}", std::process::id());
    let parent = Guard(layout.create(&name, &Limits::default()).expect("create"));
    let mut w = cgroupfs::ChildWatch::new().expect("inotify");
    w.watch(&parent.0.dir(), 7).expect("watch");
    assert_eq!(w.changed().expect("look"), cgroupfs::Changed::Under(Default::default()));
    let child = Guard(layout.create(&format!("{name}/vcpu0"), &Limits::default()).expect("child"));
    assert_eq!(w.changed().expect("look"), cgroupfs::Changed::Under([7].into()), "the child is told");
    let ids = parent.0.subtree().expect("subtree");
    assert_eq!(ids.len(), 2);
    assert!(ids.iter().any(|(id, dir)| *id == child.0.id().expect("id") && *dir == child.0.dir()));
    drop(child);
}
