//! Shared pieces of the integration tests: the fixtures (unique names and
//! guards that remove cgroups, namespaces, links, pins and processes when a
//! test ends, also when it fails) come from the `fixtures` crate, which the
//! demo and the benchmarks use too; what is here is test-only.

use std::path::PathBuf;
use std::process::{Command, Output};

pub use fixtures::inventory::Inventory;
pub use fixtures::{
    unique, unique_long, CgroupGuard, Guarded, Link, Netns, PinDir, TempDir, TempPath, VethPair, VmNet,
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
