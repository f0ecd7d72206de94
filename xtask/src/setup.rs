//! `cargo xtask setup`: idempotent machine set-up.
//!
//! Installs only what is missing: Debian's rustc-web (its prebuilt `core` for
//! bpfel-unknown-none is what lets us build BPF programs on stable), LLVM 22
//! and bpf-linker 0.13, and the real tools the tests use as peers (bpftool,
//! iperf3, stress-ng, perf). Mounts tracefs and bpffs when they are missing.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::build::{cargo_bin_dir, sh};

/// Debian packages and why each is needed.
const PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "rustc 1.96 that ships core for bpfel-unknown-none"),
    ("cargo-web", "cargo for rustc-web"),
    ("libstd-rust-web-dev-bpf", "prebuilt core/alloc for bpfel-unknown-none"),
    ("llvm-22-dev", "LLVM that bpf-linker links against"),
    ("bpftool", "inspecting pinned maps and programs"),
    ("iproute2", "ip and tc, for namespaces, veths and the tc checks"),
    ("iperf3", "network load and accuracy peer"),
    ("stress-ng", "CPU and memory load"),
    ("linux-perf", "perf bench sched pipe for the overhead benchmark"),
    ("libbpf-tools", "runqlat and cpudist: the peers the overhead benchmark measures beside the governor"),
    ("procps", "ps/pgrep for the demo"),
    ("iputils-ping", "ping, for traffic and RTT in tests and benches"),
    ("prometheus", "the real scraper the exporter is tested against"),
    ("curl", "HTTP queries to Prometheus and the API in tests"),
    ("systemd", "systemd-analyze verify for the unit file test"),
];

const BPF_LINKER_VERSION: &str = "0.13";

pub fn setup() -> Result<()> {
    if !is_root() {
        bail!("cargo xtask setup must run as root (it installs packages and mounts bpffs/tracefs)");
    }
    install_packages()?;
    install_bpf_linker()?;
    mount_if_missing("tracefs", "/sys/kernel/tracing", "tracefs")?;
    mount_if_missing("bpf", "/sys/fs/bpf", "bpf")?;
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn install_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().filter(|(p, _)| !installed(p)).map(|(p, _)| *p).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    sh(Command::new("apt-get").args(["update", "-qq"]))?;
    sh(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing))
    .context("apt-get install")?;
    Ok(())
}

fn install_bpf_linker() -> Result<()> {
    let linker = cargo_bin_dir().join("bpf-linker");
    if let Ok(out) = Command::new(&linker).arg("--version").output() {
        let v = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && v.contains(&format!(" {BPF_LINKER_VERSION}.")) {
            return Ok(());
        }
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    sh(Command::new("cargo")
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22")
        .args(["install", "bpf-linker"])
        .args(["--version", &format!("~{BPF_LINKER_VERSION}")])
        .args(["--no-default-features", "--features", "llvm-22"]))
    .context("cargo install bpf-linker")
}

fn mounted(target: &str, fstype: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines().any(|l| {
                let mut f = l.split_whitespace();
                let _src = f.next();
                f.next() == Some(target) && f.next() == Some(fstype)
            })
        })
        .unwrap_or(false)
}

fn mount_if_missing(src: &str, target: &str, fstype: &str) -> Result<()> {
    if mounted(target, fstype) {
        return Ok(());
    }
    if !Path::new(target).exists() {
        std::fs::create_dir_all(target).with_context(|| format!("create {target}"))?;
    }
    sh(Command::new("mount").args(["-t", fstype, src, target])).with_context(|| format!("mount {fstype} on {target}"))
}
