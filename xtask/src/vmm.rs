//! xtask pieces for the embedded VMM: building the management guest and the
//! `bench vmm` measurements. (Owned by the VMM work.)

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Result};

use crate::bench::Row;
use crate::build::{cargo_bin_dir, root, sh};

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
        .args([
            "build",
            "--release",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--target-dir",
        ])
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

/// `cargo xtask bench vmm`.
pub fn bench() -> Result<Vec<Row>> {
    anyhow::bail!("bench vmm is not built yet (issue 4)")
}
