//! Build helpers shared by the xtask commands.

use std::path::PathBuf;
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

/// A release binary of the workspace.
pub fn release_bin(name: &str) -> PathBuf {
    root().join("target/release").join(name)
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
    crate::vmm::build_guest()?;
    sh(cargo().args(["build", "--release", "--workspace", "--bins"]))
}
