//! Shared pieces of the integration tests: the fixtures (unique names and
//! guards that remove cgroups, namespaces, links, pins and processes when a
//! test ends, also when it fails) come from the `fixtures` crate, which the
//! demo and the benchmarks use too; what is here is test-only.

use std::path::PathBuf;
use std::process::{Command, Output};

pub use fixtures::inventory::Inventory;
pub use fixtures::{
    testrun, unique, unique_long, CgroupGuard, Guarded, Link, Netns, PinDir, TempDir, TempPath, VethPair, VmNet,
};

pub mod placement;

/// A cgroup made for a test, removed (with anything left in it) on drop.
pub type TestCgroup = fixtures::ScopedCgroup;

/// Fail (never skip) when a requirement of the real-kernel tests is missing.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests load BPF programs and create cgroups and namespaces: run them as root (cargo xtask test)"
    );
}

/// Fail (never skip) when KVM is not there.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("/dev/kvm is not usable ({e}): the VMM tests need KVM and root; they do not skip");
    }
}

pub fn require_tool(tool: &str) {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists())).unwrap_or(false);
    assert!(found, "{tool} is not installed: run `cargo xtask setup` (cargo xtask test does)");
}

/// Run a command to completion; panic with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    fixtures::run(cmd).unwrap_or_else(|e| panic!("{e}"))
}

pub fn sh(line: &str) -> Output {
    fixtures::sh(line).unwrap_or_else(|e| panic!("{e}"))
}

/// The management agent ELF: `$VMM_GUEST_ELF` (`cargo xtask test` builds
/// the guest and sets it), else where `cargo xtask build-guest` puts it.
/// Missing is a failure that says how to build it, never a skip.
pub fn guest_elf() -> PathBuf {
    let elf = std::env::var_os("VMM_GUEST_ELF").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/vmm-guest/x86_64-unknown-linux-gnu/release/mc-guest")
    });
    assert!(
        elf.is_file(),
        "the guest ELF {} is missing: run `cargo xtask build-guest` (cargo xtask test does)",
        elf.display()
    );
    elf
}

/// The workspace's target profile directory holding the built binaries
/// (test executables live in its `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("the executable's directory");
    // A test runs from <profile>/deps, a binary (placement-bench) from <profile>.
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("profile dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// A governor config of VMs (name, cgroup, optional interface) on a
/// test's own pin directory and IFB name.
pub fn governor_config(
    pins: &PinDir,
    ifb: &str,
    vms: &[(&str, &TestCgroup, Option<&str>)],
) -> governor::config::Config {
    let mut text = format!("pin_dir = {:?}\nqos_ifb = {ifb:?}\n", pins.0);
    for (name, cg, iface) in vms {
        text.push_str(&format!("[[vm]]\nname = {name:?}\ncgroup = {:?}\n", cg.cg.rel().to_string_lossy()));
        if let Some(i) = iface {
            text.push_str(&format!("interfaces = [{i:?}]\n"));
        }
    }
    governor::config::Config::parse(&text).expect("config")
}

/// TCP from namespace `from` to an iperf3 server in `to` at `addr` for
/// `secs` seconds each way (forward, then reversed), on a port of this
/// test process's own; the server is gone when it returns.
pub fn iperf3_both_ways(from: &Netns, to: &Netns, addr: &str, secs: u32) {
    let port = (20000 + (std::process::id() % 20000)).to_string();
    let server = Guarded(Some(
        to.cmd(&["iperf3", "-s", "-B", addr, "-p", &port])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("iperf3 -s"),
    ));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let secs = secs.to_string();
    for reverse in [false, true] {
        let mut args = vec!["iperf3", "-c", addr, "-p", &port, "-t", &secs];
        if reverse {
            args.push("-R");
        }
        from.exec(&args);
    }
    drop(server);
    std::thread::sleep(std::time::Duration::from_millis(300));
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

/// A loopback TCP peer that accepts any number of connections and counts
/// the bytes it receives (the card's network client, or traffic through a
/// card forward, send to it). Stopped and joined on drop.
pub struct Sink {
    pub addr: std::net::SocketAddr,
    pub received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    pub fn start() -> Sink {
        use std::io::Read;
        use std::sync::atomic::Ordering;
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("sink");
        let addr = l.local_addr().expect("addr");
        l.set_nonblocking(true).expect("nonblocking");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (st, r) = (stop.clone(), received.clone());
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !st.load(Ordering::Relaxed) {
                if let Ok((c, _)) = l.accept() {
                    c.set_nonblocking(true).expect("nonblocking");
                    conns.push(c);
                }
                let mut idle = true;
                for c in &mut conns {
                    if let Ok(n) = c.read(&mut buf) {
                        r.fetch_add(n as u64, Ordering::Relaxed);
                        idle &= n == 0;
                    }
                }
                if idle {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        });
        Sink { addr, received, stop, thread: Some(thread) }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                eprintln!("sink thread panicked");
            }
        }
    }
}

/// The child cgroup card-sim made for VM `id` (`<card>/vm-<id>`).
pub fn vm_cgroup(s: &card_sim::SimProcess, id: u32) -> cgroupfs::Cgroup {
    let card = s.cgroup().expect("the card's cgroup");
    let name = format!("{}/vm-{id}", card.rel().display());
    cgroupfs::Layout::detect().expect("layout").open(&name).expect("the VM's child cgroup")
}
