//! Running a VM in its own `vmm` process, for callers (the governor, the
//! card simulator) that want process isolation and a kill-safe boundary.
//! The child is killed and reaped when the handle is dropped.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cgroupfs::Limits;
use serde_json::Value;

use super::api::AgentOp;
use super::client::Client;
use crate::error::{Error, Result};
use crate::vm::Reply;

/// How long a new process may take to open its control socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Remove a socket file; one that is already gone is fine.
fn remove_socket(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(socket = %path.display(), error = %e, "cannot remove the control socket");
        }
    }
}

/// Kill and reap a child that may have exited already.
fn kill_and_reap(child: &mut Child) -> Option<std::process::ExitStatus> {
    match child.try_wait() {
        Ok(Some(status)) => return Some(status),
        Ok(None) => {}
        Err(e) => tracing::warn!(pid = child.id(), error = %e, "cannot poll the vmm process"),
    }
    if let Err(e) = child.kill() {
        tracing::warn!(pid = child.id(), error = %e, "cannot kill the vmm process");
    }
    match child.wait() {
        Ok(status) => Some(status),
        Err(e) => {
            tracing::warn!(pid = child.id(), error = %e, "cannot reap the vmm process");
            None
        }
    }
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
        // A stale socket from an earlier process would be connected to
        // before the new one binds.
        remove_socket(&o.socket);
        let mut child = c.stdin(Stdio::null()).spawn().map_err(Error::io(o.bin.display().to_string()))?;
        match Client::connect_wait(&o.socket, SOCKET_TIMEOUT) {
            Ok(client) => Ok(VmmProcess { child, socket: o.socket.clone(), client }),
            Err(e) => {
                let status = kill_and_reap(&mut child);
                Err(Error::NoSocket { socket: o.socket.clone(), status, source: Box::new(e) })
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The control connection, for typed requests.
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// One control request as JSON (see [`super::api`] for the commands).
    pub fn call_json(&mut self, req: &Value) -> Result<Value> {
        self.client.call_json(req)
    }

    /// Shorthand for an agent request.
    pub fn request(&mut self, op: AgentOp, arg: u64) -> Result<Reply> {
        Ok(self.client.request(op, arg)?.reply)
    }

    /// Ask the VMM to stop and wait for the process to exit.
    pub fn shutdown(mut self) -> Result<()> {
        if let Err(e) = self.client.shutdown() {
            // It may have died already; the wait below tells.
            tracing::warn!(pid = self.child.id(), error = %e, "the shutdown request failed; waiting for the vmm process anyway");
        }
        self.child.wait().map_err(Error::io("waiting for vmm"))?;
        Ok(())
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
        remove_socket(&self.socket);
    }
}
