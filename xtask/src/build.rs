//! Build helpers shared by the xtask commands.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Run a command with inherited stdio; fail with its command line on error.
pub fn sh(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."))
}

/// Where `cargo install` puts binaries (bpf-linker).
pub fn cargo_bin_dir() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo"));
    home.join("bin")
}

/// The workspace's cargo target directory (honours CARGO_TARGET_DIR, as
/// cargo does).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"))
}

/// A release binary of the workspace.
pub fn release_bin(name: &str) -> PathBuf {
    target_dir().join("release").join(name)
}

/// `cargo` of the toolchain that runs xtask.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

/// The kernel programs are compiled by governor's build script (so that a
/// plain `cargo build` also works); this builds the governor in release mode
/// and returns the path of the BPF object it embedded.
pub fn ebpf() -> Result<PathBuf> {
    sh(cargo().args(["build", "--release", "-p", "governor"]))?;
    let obj = root().join("target/bpf/bpfel-unknown-none/release/governor-ebpf");
    if !obj.exists() {
        bail!("the BPF object {} was not produced", obj.display());
    }
    eprintln!("build-ebpf: {}", obj.display());
    Ok(obj)
}

/// Build everything the run/test/bench commands need in release mode.
pub fn all() -> Result<()> {
    ebpf()?;
    build_guest()?;
    sh(cargo().args(["build", "--release", "--workspace", "--bins"]))
}

/// Where the guest ELF lands; tests read the same path (or `VMM_GUEST_ELF`).
pub fn guest_elf() -> PathBuf {
    root().join("target/vmm-guest/x86_64-unknown-linux-gnu/release/mc-guest")
}

/// The rustup stable cargo (the guest is built for the host target with the
/// stable toolchain, not Debian's rustc-web that builds the BPF programs).
fn stable_cargo(dir: &Path) -> Command {
    let proxy = cargo_bin_dir().join("cargo");
    let mut c = if proxy.exists() && cargo_bin_dir().join("rustup").exists() {
        let mut c = Command::new(proxy);
        c.arg("+stable");
        c
    } else {
        Command::new("cargo")
    };
    // Flags meant for the workspace build must not leak into the guest.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC",
        "RUSTC_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTUP_TOOLCHAIN",
    ] {
        c.env_remove(var);
    }
    c.current_dir(dir);
    c
}

/// Build the freestanding management guest; returns the ELF path.
pub fn build_guest() -> Result<Option<PathBuf>> {
    let dir = root().join("vmm/guest");
    sh(stable_cargo(&dir)
        .args(["build", "--release", "--target", "x86_64-unknown-linux-gnu", "--target-dir"])
        .arg(root().join("target/vmm-guest")))?;
    let elf = guest_elf();
    if !elf.exists() {
        bail!("the guest ELF {} was not produced", elf.display());
    }
    // `cargo xtask test` runs the tests as children: tell them where it is.
    std::env::set_var("VMM_GUEST_ELF", &elf);
    eprintln!("build-guest: {}", elf.display());
    Ok(Some(elf))
}
