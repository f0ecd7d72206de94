//! Compiles the kernel programs (governor-ebpf) for bpfel-unknown-none and
//! lets the governor embed the object.
//!
//! Why not aya-build: it drives a rustup nightly with `-Z build-std`, while
//! this project builds BPF on stable with Debian's rustc-web, which ships a
//! prebuilt `core` for bpfel-unknown-none (see DESIGN.md). The recipe is the
//! same otherwise: a nested cargo with a clean environment and its own target
//! directory (so it cannot deadlock on the outer build's lock).

use std::path::{Path, PathBuf};
use std::process::Command;

const BPF_RUSTC: &str = "/usr/bin/rustc";
const BPF_CARGO: &str = "/usr/bin/cargo";

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest.parent().expect("governor/ has a parent").to_path_buf();
    let ebpf_dir = root.join("governor-ebpf");
    for p in ["src", "Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(p).display());
    }
    println!("cargo:rerun-if-changed={}", root.join("governor-common/src").display());

    let target_dir = root.join("target/bpf");
    let obj = target_dir.join("bpfel-unknown-none/release/governor-ebpf");
    for tool in [BPF_RUSTC, BPF_CARGO] {
        if !Path::new(tool).exists() {
            panic!("{tool} is missing: run `cargo xtask setup` (installs Debian's rustc-web for the BPF target)");
        }
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let cargo_home = std::env::var("CARGO_HOME").unwrap_or_else(|_| format!("{home}/.cargo"));
    let path = format!("{cargo_home}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    let mut cmd = Command::new(BPF_CARGO);
    cmd.current_dir(&ebpf_dir)
        .env_clear()
        .env("HOME", &home)
        .env("CARGO_HOME", &cargo_home)
        .env("PATH", path)
        .env("RUSTC", BPF_RUSTC)
        // aya-ebpf enables `asm_experimental_arch` for target_arch = "bpf";
        // Debian's stable rustc accepts it only with RUSTC_BOOTSTRAP.
        .env("RUSTC_BOOTSTRAP", "1")
        // BTF in the object is what makes `bpftool map dump` print field names.
        .env("CARGO_ENCODED_RUSTFLAGS", "-Cdebuginfo=2\x1f-Clink-arg=--btf")
        .args(["build", "--release", "--target", "bpfel-unknown-none", "--target-dir"])
        .arg(&target_dir);
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {BPF_CARGO}: {e}"));
    if !status.success() {
        panic!("building governor-ebpf failed ({status}); is bpf-linker installed? run `cargo xtask setup`");
    }
    println!("cargo:rustc-env=GOVERNOR_EBPF_OBJ={}", obj.display());
}
