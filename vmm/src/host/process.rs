//! Running a VM in its own `vmm` process, for callers (the governor, the
//! card simulator) that want process isolation and a kill-safe boundary.
//! A dropped handle stops its child the way an operator would: SIGTERM, so
//! the `vmm` shuts its VM down, releases its cgroup and removes its control
//! socket; SIGKILL only if it has not exited after a grace period. SIGKILL
//! alone would leave a cgroup made with `--cgroup` (and the socket) behind.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use cgroupfs::Limits;
use serde_json::Value;

use super::api::AgentOp;
use super::client::Client;
use crate::error::{Error, Result};
use crate::vm::Reply;

/// How long a new process may take to open its control socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a child gets after SIGTERM before it is killed. Shutting the VM
/// down, releasing the cgroup and removing the socket take a few ms; the
/// rest is headroom for a loaded host (the cgroup rmdir alone retries for
/// up to a second while exiting threads leave it).
const STOP_GRACE: Duration = Duration::from_millis(2500);

/// How often the child is polled during the grace period.
const STOP_POLL: Duration = Duration::from_millis(5);

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

/// A `vmm` child process and its control connection. Dropping it stops the
/// child gracefully (see the module docs); [`VmmProcess::shutdown`] asks
/// over the socket instead and reports a failure.
pub struct VmmProcess {
    proc_: Proc,
    socket: PathBuf,
    client: Client,
}

/// The process behind a handle: a child this process started, or a `vmm`
/// another process started and left running (a governor that was killed),
/// adopted through its control socket. An adopted process is not our
/// child: it is signalled and watched through a pidfd, so a pid the kernel
/// reused is never hit, and its parent (init) reaps it.
#[derive(Debug)]
enum Proc {
    Child(Child),
    Adopted { pid: u32, pidfd: std::os::fd::OwnedFd },
}

/// Remove a socket file; one that is already gone is fine.
fn remove_socket(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(socket = %path.display(), error = %e, "cannot remove the control socket");
        }
    }
}

/// Stop a child that may have exited already: SIGTERM, up to `grace` for it
/// to exit, then SIGKILL; it is reaped in every case (a failure to reap is
/// logged and gives None).
fn stop_and_reap(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    match child.try_wait() {
        Ok(Some(status)) => return Some(status),
        Ok(None) => terminate(child, grace),
        // Cannot tell whether it still runs: skip the grace period; the
        // SIGKILL and the blocking wait below settle it.
        Err(e) => tracing::warn!(pid = child.id(), error = %e, "cannot poll the vmm process"),
    }
    // Exited during the grace period. A failed poll here is settled by the
    // kill and the blocking wait below.
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    // `Child::kill` signals only a child std has not reaped (std keeps the
    // status once `try_wait`/`wait` saw it), so a reused pid is never hit.
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

/// SIGTERM to a child that `try_wait` just found unreaped, then poll it for
/// up to `grace`. Until this handle waits for it the pid stays ours (an
/// exited child is a zombie holding it), so the signal cannot reach another
/// process; pid 0 (this process group) or a pid beyond `pid_t` is refused.
fn terminate(child: &mut Child, grace: Duration) {
    let pid = match libc::pid_t::try_from(child.id()) {
        Ok(pid) if pid > 0 => pid,
        _ => {
            tracing::warn!(pid = child.id(), "not a child pid; not sending SIGTERM");
            return;
        }
    };
    // SAFETY: kill(2) has no memory effects; `pid` is our unreaped child.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        let e = io::Error::last_os_error();
        tracing::warn!(pid, error = %e, "cannot send SIGTERM to the vmm process");
        return;
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(None) => std::thread::sleep(STOP_POLL),
            Ok(Some(_)) => return,
            Err(e) => {
                tracing::warn!(pid, error = %e, "cannot poll the vmm process after SIGTERM");
                return;
            }
        }
    }
    tracing::warn!(pid, ?grace, "the vmm process did not exit on SIGTERM; killing it");
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
        let connected = Client::connect_while(&o.socket, SOCKET_TIMEOUT, || matches!(child.try_wait(), Ok(None)));
        match connected {
            Ok(client) => Ok(VmmProcess { proc_: Proc::Child(child), socket: o.socket.clone(), client }),
            Err(e) => {
                // It may have joined (and made) a cgroup before it hung:
                // the same graceful stop as a dropped handle.
                let status = stop_and_reap(&mut child, STOP_GRACE);
                Err(Error::NoSocket { socket: o.socket.clone(), status, source: Box::new(e) })
            }
        }
    }

    /// Take over a `vmm` process already serving `socket` (one a killed
    /// governor started): its pid from the socket's peer credentials, held
    /// as a pidfd.
    pub fn attach(socket: &Path) -> Result<VmmProcess> {
        use std::os::fd::FromRawFd;
        let client = Client::connect(socket)?;
        let pid = client.peer_pid()?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(Error::Io { what: format!("pidfd of vmm {pid}"), source: io::Error::last_os_error() });
        }
        // SAFETY: a new fd that nothing else owns.
        let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
        Ok(VmmProcess { proc_: Proc::Adopted { pid, pidfd }, socket: socket.to_path_buf(), client })
    }

    pub fn pid(&self) -> u32 {
        match &self.proc_ {
            Proc::Child(c) => c.id(),
            Proc::Adopted { pid, .. } => *pid,
        }
    }

    /// Whether the process still runs (a failed poll counts as not).
    pub fn running(&mut self) -> bool {
        match &mut self.proc_ {
            Proc::Child(c) => matches!(c.try_wait(), Ok(None)),
            Proc::Adopted { pidfd, .. } => !exited(pidfd, Duration::ZERO),
        }
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
            tracing::warn!(pid = self.pid(), error = %e, "the shutdown request failed; waiting for the vmm process anyway");
        }
        match &mut self.proc_ {
            Proc::Child(c) => {
                c.wait().map_err(Error::io("waiting for vmm"))?;
            }
            Proc::Adopted { pid, pidfd } => {
                if !exited(pidfd, SOCKET_TIMEOUT) {
                    return Err(Error::Timeout(SOCKET_TIMEOUT, "the adopted vmm process to exit"));
                }
                tracing::debug!(pid = *pid, "the adopted vmm process exited");
            }
        }
        Ok(())
    }
}

/// Whether the process behind `pidfd` has exited, waiting up to `wait`
/// (a pidfd polls readable once it has).
fn exited(pidfd: &std::os::fd::OwnedFd, wait: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = wait.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    n > 0 && p.revents & libc::POLLIN != 0
}

/// [`stop_and_reap`] for an adopted process: SIGTERM through its pidfd,
/// up to `grace`, then SIGKILL. Its parent reaps it.
fn stop_adopted(pid: u32, pidfd: &std::os::fd::OwnedFd, grace: Duration) {
    use std::os::fd::AsRawFd;
    let signal = |sig: i32| {
        // SAFETY: pidfd_send_signal on our pidfd, no siginfo.
        let r =
            unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), sig, std::ptr::null::<u8>(), 0) };
        if r != 0 {
            let e = io::Error::last_os_error();
            // ESRCH: it has exited already.
            if e.raw_os_error() != Some(libc::ESRCH) {
                tracing::warn!(pid, error = %e, "cannot signal the adopted vmm process");
            }
        }
    };
    if exited(pidfd, Duration::ZERO) {
        return;
    }
    signal(libc::SIGTERM);
    if !exited(pidfd, grace) {
        tracing::warn!(pid, ?grace, "the adopted vmm process did not exit on SIGTERM; killing it");
        signal(libc::SIGKILL);
        if !exited(pidfd, STOP_GRACE) {
            tracing::warn!(pid, "the adopted vmm process survived SIGKILL");
        }
    }
}

impl Drop for VmmProcess {
    /// SIGTERM, so the child shuts its VM down and releases its cgroup and
    /// socket itself; SIGKILL after [`STOP_GRACE`]. A child already waited
    /// for ([`VmmProcess::shutdown`]) is not signalled.
    fn drop(&mut self) {
        match &mut self.proc_ {
            Proc::Child(c) => {
                stop_and_reap(c, STOP_GRACE);
            }
            Proc::Adopted { pid, pidfd } => stop_adopted(*pid, pidfd, STOP_GRACE),
        }
        // The child removes its socket on a clean exit; this covers a child
        // that had to be killed.
        remove_socket(&self.socket);
    }
}
