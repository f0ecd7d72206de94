//! Shared pieces of the VMM tests: the guest ELF and the `vmm` binary
//! (built on demand) and a `vmm` child process with its control client.
//! Unique names and the guards that remove sockets, snapshot files,
//! cgroups and processes even when a test fails are the `fixtures` crate's
//! (through `integration_tests`).
//!
//! The guest ELF is `$VMM_GUEST_ELF` when set (`cargo xtask test` sets it),
//! else `target/vmm-guest/x86_64-unknown-linux-gnu/release/mc-guest`, which
//! `cargo xtask build-guest` makes (there is one recipe for it, in xtask).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

// Not every test file uses every piece.
#[allow(unused_imports)]
pub use integration_tests::{guest_elf, require_kvm, unique_long as unique, CgroupGuard, Guarded, TempPath};

use serde_json::Value;
use vmm::host::api::AgentOp;
use vmm::host::client::Client;
use vmm::Reply;

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The `vmm` binary of this build (same target dir as the test), built once.
pub fn vmm_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // target/<profile>/deps/<test> -> target/<profile>
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe.parent().and_then(Path::parent).expect("test binary in target/<profile>/deps");
        let target_dir = profile_dir.parent().expect("target dir");
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        c.current_dir(workspace())
            .env("CARGO_TARGET_DIR", target_dir)
            .args(["build", "-q", "-p", "vmm", "--bin", "vmm"]);
        if release {
            c.arg("--release");
        }
        let status = c.status().expect("run cargo to build the vmm binary");
        assert!(status.success(), "building the vmm binary failed: {status}");
        profile_dir.join("vmm")
    })
    .clone()
}

/// A `vmm` child process with a control socket; stopped (SIGTERM, then
/// SIGKILL) and reaped on drop.
pub struct VmmProc {
    pub child: Guarded,
    pub socket: TempPath,
    pub client: Client,
}

impl VmmProc {
    pub fn spawn(args: &[&str]) -> VmmProc {
        let socket = TempPath::new("vmm-test.sock");
        let child = Command::new(vmm_bin())
            .args(args)
            .arg("--socket")
            .arg(&socket.0)
            .arg("--serial")
            .arg("/dev/null")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn the vmm binary");
        let child = Guarded::new(child);
        let client =
            Client::connect_wait(&socket.0, Duration::from_secs(10)).expect("connect to the vmm control socket");
        VmmProc { child, socket, client }
    }

    /// A request as raw JSON (to see the reply exactly as sent); panics on failure.
    pub fn call(&mut self, req: Value) -> Value {
        match self.client.call_json(&req) {
            Ok(v) => v,
            Err(e) => panic!("control request {req} failed: {e}"),
        }
    }

    /// An agent request; panics on failure.
    pub fn request(&mut self, op: AgentOp, arg: u64) -> Reply {
        match self.client.request(op, arg) {
            Ok(a) => a.reply,
            Err(e) => panic!("agent request {op:?} {arg} failed: {e}"),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and reap: the process gets no chance to clean up.
    pub fn kill(&mut self) {
        let c = self.child.child();
        c.kill().expect("SIGKILL the vmm");
        c.wait().expect("reap the vmm");
    }
}
