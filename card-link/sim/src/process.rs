//! Launch card-sim as a separate process inside its own card-sized cgroup,
//! for tests, benchmarks and the demo. Dropping the handle kills the process
//! and removes its cgroup and sockets, also when a test fails.
//!
//! The binary is found via $CARD_SIM_BIN, else next to the running
//! executable's target profile directory (target/<profile>/card-sim, which
//! `cargo xtask build`/`test` produce with `cargo build --workspace --bins`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use cgroupfs::{Cgroup, Layout, Limits};
use serde::Serialize;

use crate::error::SimError;
use crate::request::Reply;

/// How long card-sim may take to create its sockets.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound of one control exchange (an ECS create boots a VM).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

static COUNTER: AtomicU32 = AtomicU32::new(0);

#[derive(Clone, Debug)]
pub struct SimOptions {
    pub cpus: f64,
    pub mem_bytes: u64,
    pub period_ms: u32,
    /// Put the process in a cgroup of its own (needs root).
    pub cgroup: bool,
    /// The management agent ELF: VMs run on the vmm crate (else modelled).
    pub guest: Option<PathBuf>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions { cpus: 1.0, mem_bytes: 512 << 20, period_ms: 100, cgroup: true, guest: None }
    }
}

pub struct SimProcess {
    child: Option<Child>,
    pub socket: PathBuf,
    pub control: PathBuf,
    pub cgroup: Option<Cgroup>,
    dir: PathBuf,
}

/// Locate the card-sim binary (see the module comment).
pub fn find_binary() -> Result<PathBuf, SimError> {
    if let Some(p) = std::env::var_os("CARD_SIM_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(SimError::CurrentExe)?;
    for dir in exe.ancestors().skip(1).take(4) {
        let cand = dir.join("card-sim");
        if cand.is_file() {
            return Ok(cand);
        }
    }
    Err(SimError::BinaryNotFound { near: exe })
}

impl SimProcess {
    pub fn spawn(opts: &SimOptions) -> Result<SimProcess, SimError> {
        let bin = find_binary()?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("card-sim-{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(&tag);
        std::fs::create_dir_all(&dir).map_err(|source| SimError::Dir { path: dir.clone(), source })?;
        let mut me = SimProcess {
            child: None,
            socket: dir.join("card.sock"),
            control: dir.join("control.sock"),
            cgroup: None,
            dir,
        };
        let mut cmd = Command::new(&bin);
        cmd.arg("--socket").arg(&me.socket).arg("--control").arg(&me.control);
        cmd.arg("--period-ms").arg(opts.period_ms.to_string());
        cmd.arg("--load-threads").arg((opts.cpus.ceil() as usize).max(1).to_string());
        if let Some(g) = &opts.guest {
            cmd.arg("--guest").arg(g);
        }
        if opts.cgroup {
            let limits = Limits { memory_bytes: Some(opts.mem_bytes), ..Limits::cpus(opts.cpus) };
            let cg = Layout::detect()
                .and_then(|l| l.create(&tag, &limits))
                .map_err(|source| SimError::Cgroup { name: tag.clone(), source })?;
            me.cgroup = Some(cg);
            // card-sim joins it itself before starting any thread.
            cmd.arg("--cgroup").arg(&tag);
        }
        // SAFETY: prctl is async-signal-safe; it only sets a flag on the child.
        // If the launching process dies without running Drop, the card dies too.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit());
        me.child = Some(cmd.spawn().map_err(|source| SimError::Spawn { bin: bin.clone(), source })?);
        let deadline = Instant::now() + START_TIMEOUT;
        while !(me.socket.exists() && me.control.exists()) {
            if Instant::now() > deadline {
                return Err(SimError::NotReady(START_TIMEOUT));
            }
            if let Some(c) = me.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    return Err(SimError::ExitedEarly(st));
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(me)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Has the process exited (e.g. after the crash fault)?
    pub fn exited(&mut self) -> bool {
        self.child.as_mut().map(|c| matches!(c.try_wait(), Ok(Some(_)))).unwrap_or(true)
    }

    /// Send one request to the control socket: a typed `Request`, or any
    /// JSON value (tests of refusals). `ok: false` becomes `SimError::Refused`.
    pub fn control<R: Serialize + ?Sized>(&self, req: &R) -> Result<Reply, SimError> {
        control_at(&self.control, req)
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }
}

/// One exchange on the control socket at `path` (see `SimProcess::control`).
pub fn control_at<R: Serialize + ?Sized>(path: &Path, req: &R) -> Result<Reply, SimError> {
    let io = |what: &'static str| move |source| SimError::Control { path: path.to_path_buf(), what, source };
    let mut line = serde_json::to_string(req).map_err(SimError::ControlEncode)?;
    line.push('\n');
    let mut s = UnixStream::connect(path).map_err(io("connect"))?;
    s.set_read_timeout(Some(CONTROL_TIMEOUT)).map_err(io("set the read timeout"))?;
    s.set_write_timeout(Some(CONTROL_TIMEOUT)).map_err(io("set the write timeout"))?;
    s.write_all(line.as_bytes()).map_err(io("write the request"))?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).map_err(io("read the reply"))?;
    let reply: Reply =
        serde_json::from_str(&answer).map_err(|source| SimError::ControlReply { line: answer.clone(), source })?;
    if !reply.ok {
        return Err(SimError::Refused(reply.error.unwrap_or_else(|| "(no reason given)".into())));
    }
    Ok(reply)
}

impl Drop for SimProcess {
    /// Best effort, each step logged if it fails: the card must not outlive
    /// the test or benchmark that started it.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id();
            // A stopped (SIGSTOP) card must be continued to die cleanly.
            // SAFETY: signalling our own child by pid.
            if unsafe { libc::kill(pid as i32, libc::SIGCONT) } != 0 {
                let e = std::io::Error::last_os_error();
                // ESRCH: already reaped elsewhere; nothing to continue.
                if e.raw_os_error() != Some(libc::ESRCH) {
                    tracing::warn!("card-sim {pid}: cannot continue it before the kill: {e}");
                }
            }
            // kill() of a child that already exited (the crash fault) is Ok;
            // an error here means it cannot be signalled at all.
            if let Err(e) = c.kill() {
                tracing::warn!("card-sim {pid}: cannot kill it: {e}");
            }
            if let Err(e) = c.wait() {
                tracing::warn!("card-sim {pid}: cannot reap it (left a zombie): {e}");
            }
        }
        if let Some(cg) = self.cgroup.as_mut() {
            // kill_all logs what it could not kill itself.
            cg.kill_all(Duration::from_secs(5));
            if let Err(e) = cg.remove() {
                tracing::warn!("card-sim: cannot remove the card cgroup: {e}");
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!("card-sim: cannot remove its directory {} (sockets): {e}", self.dir.display());
        }
    }
}
