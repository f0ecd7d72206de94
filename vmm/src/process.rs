//! Running a VM in its own `vmm` process, for callers (the governor, the
//! card simulator) that want process isolation and a kill-safe boundary.
//! The child is killed and reaped when the handle is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::control::Client;
use crate::error::{Error, Result};
use cgroupfs::Limits;

/// What the child process starts with.
#[derive(Debug, Clone)]
pub enum Start {
    /// Boot the agent ELF with this much RAM (MiB).
    Guest { elf: PathBuf, mem_mib: u64 },
    /// Restore a snapshot file and resume it.
    Restore { snapshot: PathBuf },
    /// Start empty; use `create`/`restore` over the socket.
    Empty,
}

#[derive(Debug, Clone)]
pub struct SpawnOptions {
    /// The `vmm` binary.
    pub bin: PathBuf,
    pub start: Start,
    /// Control socket path (removed when the handle drops).
    pub socket: PathBuf,
    /// Serial console destination (default: discarded).
    pub serial: Option<PathBuf>,
    /// Agent log records, JSON lines.
    pub log: Option<PathBuf>,
    /// Cgroup (relative name) and limits the child joins before starting the VM.
    pub cgroup: Option<(String, Limits)>,
}

pub struct VmmProcess {
    child: Child,
    socket: PathBuf,
    client: Client,
}

impl VmmProcess {
    pub fn spawn(o: &SpawnOptions) -> Result<VmmProcess> {
        let mut c = Command::new(&o.bin);
        match &o.start {
            Start::Guest { elf, mem_mib } => {
                c.arg("--guest").arg(elf).arg("--mem-mib").arg(mem_mib.to_string());
            }
            Start::Restore { snapshot } => {
                c.arg("--restore").arg(snapshot);
            }
            Start::Empty => {}
        }
        c.arg("--socket").arg(&o.socket);
        c.arg("--serial").arg(o.serial.as_deref().unwrap_or(Path::new("/dev/null")));
        if let Some(log) = &o.log {
            c.arg("--log").arg(log);
        }
        if let Some((name, l)) = &o.cgroup {
            c.arg("--cgroup").arg(name);
            if let Some(q) = l.cpu_quota_us {
                c.arg("--cpu-quota-us").arg(q.to_string());
            }
            if let Some(p) = l.cpu_period_us {
                c.arg("--cpu-period-us").arg(p.to_string());
            }
            if let Some(s) = &l.cpuset {
                c.arg("--cpuset").arg(s);
            }
            if let Some(m) = l.memory_bytes {
                c.arg("--memory-mib").arg((m >> 20).to_string());
            }
        }
        let _ = std::fs::remove_file(&o.socket);
        let mut child = c.stdin(Stdio::null()).spawn().map_err(Error::io(o.bin.display().to_string()))?;
        match Client::connect_wait(&o.socket, Duration::from_secs(10)) {
            Ok(client) => Ok(VmmProcess { child, socket: o.socket.clone(), client }),
            Err(e) => {
                let _ = child.kill();
                let status = child.wait().ok();
                Err(Error::Protocol(format!("vmm did not open its socket ({e}); exit status {status:?}")))
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One control request (see `vmm::control` for the commands).
    pub fn call(&mut self, req: Value) -> Result<Value> {
        self.client.call(req)
    }

    /// Shorthand for an agent request by op name.
    pub fn request(&mut self, op: &str, arg: u64) -> Result<Value> {
        Ok(self.call(json!({"cmd": "request", "op": op, "arg": arg}))?["reply"].clone())
    }

    /// Ask the VMM to stop and wait for the process to exit.
    pub fn shutdown(mut self) -> Result<()> {
        let _ = self.client.call(json!({"cmd": "shutdown"}));
        self.child.wait().map_err(Error::io("waiting for vmm"))?;
        Ok(())
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}
