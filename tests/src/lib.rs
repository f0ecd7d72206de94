//! Shared fixtures for the integration tests: unique names, and guards that
//! remove cgroups, namespaces, links, pins and processes when a test ends,
//! also when it fails (their Drop runs while a failed assertion unwinds).

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use cgroupfs::{Cgroup, Layout, Limits};

/// Fail (never skip) when a requirement of the real-kernel tests is missing.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests load BPF programs and create cgroups and namespaces: run them as root (cargo xtask test)"
    );
}

pub fn require_tool(tool: &str) {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists())).unwrap_or(false);
    assert!(found, "{tool} is not installed: run `cargo xtask setup` (cargo xtask test does)");
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, at most 15 bytes (IFNAMSIZ-1),
/// so two test runs on one host never collide.
pub fn unique(prefix: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id() % 100_000;
    let s = format!("{prefix}{pid}x{n}");
    assert!(s.len() <= 15, "name {s} too long");
    s
}

/// Run a command to completion; panic with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn sh(line: &str) -> Output {
    run(Command::new("sh").args(["-c", line]))
}

/// A cgroup created for a test and removed (with anything left in it) on drop.
pub struct TestCgroup {
    pub cg: Cgroup,
}

impl TestCgroup {
    pub fn new(tag: &str) -> TestCgroup {
        let layout = Layout::detect().expect("cgroup2 must be mounted");
        // Flat, unique names: no parent shared between test runs is left behind.
        let cg =
            layout.create(&format!("governor-test-{}", unique(tag)), &Limits::default()).expect("create test cgroup");
        TestCgroup { cg }
    }

    /// Start `argv` inside this cgroup: the child joins every hierarchy
    /// before it execs, so the command's first instruction already runs in
    /// the cgroup.
    pub fn spawn(&self, argv: &[&str]) -> Guarded {
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..]);
        self.cg.join_on_exec(&mut cmd).expect("prepare the cgroup join");
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {argv:?}: {e}"));
        Guarded(Some(child))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Kill what is left, then remove; errors are reported, not hidden.
        self.cg.kill_all(Duration::from_secs(5));
        if let Err(e) = self.cg.remove() {
            eprintln!("warning: removing test cgroup: {e}");
        }
    }
}

/// A child process killed and reaped on drop.
pub struct Guarded(pub Option<Child>);

impl Guarded {
    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child present until drop")
    }

    /// Wait for the child with a deadline; kill it if the deadline passes.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(st)) = self.child().try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A network namespace, deleted on drop (which also deletes the interfaces
/// inside it).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        let name = unique("gns");
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn cmd(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(argv);
        c
    }

    pub fn exec(&self, argv: &[&str]) -> Output {
        run(&mut self.cmd(argv))
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A link in the root namespace (veth end or bridge), deleted on drop.
pub struct Link {
    pub name: String,
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.name]).stderr(Stdio::null()).status();
    }
}

/// A small "VM network": a bridge in the root namespace and, per VM, a
/// namespace joined to it by a veth whose host end is what the governor
/// watches. Addresses come from 198.18.0.0/15 (the benchmarking range) and
/// exist only inside the namespaces this creates.
pub struct VmNet {
    pub bridge: Link,
    pub ports: Vec<(Netns, Link, String)>,
}

impl VmNet {
    pub fn new(vms: usize) -> VmNet {
        let bridge = Link { name: unique("gbr") };
        run(Command::new("ip").args(["link", "add", &bridge.name, "type", "bridge"]));
        run(Command::new("ip").args(["link", "set", &bridge.name, "up"]));
        let mut ports = Vec::new();
        for i in 0..vms {
            let ns = Netns::new();
            let host = Link { name: unique("gvh") };
            let peer = unique("gvp");
            run(Command::new("ip").args(["link", "add", &host.name, "type", "veth", "peer", "name", &peer]));
            run(Command::new("ip").args(["link", "set", &peer, "netns", &ns.name]));
            run(Command::new("ip").args(["link", "set", &host.name, "master", &bridge.name, "up"]));
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", host.name), "1");
            let addr = format!("198.18.0.{}", i + 1);
            ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
            ns.exec(&["ip", "addr", "add", &format!("{addr}/24"), "dev", &peer]);
            ns.exec(&["ip", "link", "set", &peer, "up"]);
            ports.push((ns, host, addr));
        }
        VmNet { bridge, ports }
    }
}

impl Drop for VmNet {
    fn drop(&mut self) {
        // Namespaces go first (taking the peers and so the veths with them).
        self.ports.clear();
    }
}

/// A unique pin directory under bpffs (removed by Telemetry's Drop; this
/// guard removes it too in case loading failed half way).
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new() -> PinDir {
        PinDir(PathBuf::from(format!("/sys/fs/bpf/governor-test-{}", unique("p"))))
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The workspace's target profile directory holding the built binaries
/// (test executables live in its `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

/// |a - b| / b
pub fn rel_err(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        if a == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (a - b).abs() / b
    }
}
