//! Launch card-sim as a separate process inside its own card-sized cgroup,
//! for tests, benchmarks and the demo. Dropping the handle kills the process
//! and removes its cgroup and sockets, also when a test fails. The guards
//! are the workspace's `fixtures` (`TempDir`, `Guarded` child,
//! `ScopedCgroup`), so card-sim leaves what every other fixture leaves.
//!
//! The binary is `SimOptions::binary` when given, else found via
//! $CARD_SIM_BIN, else next to the running executable's target profile
//! directory (target/<profile>/card-sim, which `cargo xtask build`/`test`
//! produce with `cargo build --workspace --bins`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cgroupfs::{Cgroup, Limits};
use fixtures::{Guarded, ScopedCgroup, TempDir};
use serde::Serialize;

use crate::error::SimError;
use crate::request::Reply;

/// The card cgroup's CPU weight: ten default cgroups' (cgroup v2 scale).
pub const CARD_CPU_WEIGHT: u64 = 1000;
/// How long card-sim may take to create its sockets.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound of one control exchange (an ECS create boots a VM).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct SimOptions {
    pub cpus: f64,
    pub mem_bytes: u64,
    pub period_ms: u32,
    /// Put the process in a cgroup of its own (needs root).
    pub cgroup: bool,
    /// The management agent ELF: VMs run on the vmm crate, each in its own
    /// `vmm` process and child cgroup (else modelled).
    pub guest: Option<PathBuf>,
    /// The `vmm` binary for those VMs; None: card-sim looks for it ($VMM_BIN,
    /// else next to card-sim).
    pub vmm: Option<PathBuf>,
    /// The card-sim binary to run; None: `find_binary()`.
    pub binary: Option<PathBuf>,
    /// Offer mapped BARs and DMA streams (ABI 1.3); false runs the card
    /// with `--no-mmap`, as a card the host must reach by messages.
    pub mmap: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            cpus: 1.0,
            mem_bytes: 512 << 20,
            period_ms: 100,
            cgroup: true,
            guest: None,
            vmm: None,
            binary: None,
            mmap: true,
        }
    }
}

/// A running card-sim. Fields drop in this order: the process (stopped and
/// reaped), then its cgroup (whatever is left killed, then removed), then
/// its directory (the sockets).
pub struct SimProcess {
    child: Guarded,
    cgroup: Option<ScopedCgroup>,
    pub socket: PathBuf,
    pub control: PathBuf,
    /// The binary and its arguments, to start the card again (`restart`).
    bin: PathBuf,
    args: Vec<std::ffi::OsString>,
    /// The sockets' directory.
    _dir: TempDir,
}

/// Start card-sim with `args` and wait until both its sockets exist.
fn start(bin: &Path, args: &[std::ffi::OsString], socket: &Path, control: &Path) -> Result<Guarded, SimError> {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    // SAFETY: prctl is async-signal-safe; it only sets a flag on the child.
    // If the launching process dies without running Drop, the card dies too.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit());
    let mut child = Guarded::new(cmd.spawn().map_err(|source| SimError::Spawn { bin: bin.to_path_buf(), source })?);
    let deadline = Instant::now() + START_TIMEOUT;
    while !(socket.exists() && control.exists()) {
        if Instant::now() > deadline {
            return Err(SimError::NotReady(START_TIMEOUT));
        }
        if let Ok(Some(st)) = child.child().try_wait() {
            return Err(SimError::ExitedEarly(st));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child)
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
        let bin = match &opts.binary {
            Some(b) => b.clone(),
            None => find_binary()?,
        };
        // Each guard is a local until the end, so an early return (no
        // sockets in time, an early exit) undoes what was made so far.
        let dir = TempDir::new("card-sim").map_err(|source| SimError::Dir { path: std::env::temp_dir(), source })?;
        let socket = dir.path().join("card.sock");
        let control = dir.path().join("control.sock");
        let mut args: Vec<std::ffi::OsString> = vec!["--socket".into(), socket.clone().into(), "--control".into()];
        args.push(control.clone().into());
        args.extend(["--period-ms".into(), opts.period_ms.to_string().into()]);
        if !opts.mmap {
            args.push("--no-mmap".into());
        }
        args.extend(["--load-threads".into(), (opts.cpus.ceil() as usize).max(1).to_string().into()]);
        if let Some(g) = &opts.guest {
            args.extend(["--guest".into(), g.clone().into()]);
        }
        if let Some(v) = &opts.vmm {
            args.extend(["--vmm".into(), v.clone().into()]);
        }
        let cgroup = if opts.cgroup {
            // The card's CPU is its own: the quota caps it, and the weight
            // holds it when the host's load wants the CPU too (on a card,
            // the user VMs' load runs elsewhere and cannot starve it).
            let limits = Limits {
                memory_bytes: Some(opts.mem_bytes),
                cpu_weight: Some(CARD_CPU_WEIGHT),
                ..Limits::cpus(opts.cpus)
            };
            let cg = ScopedCgroup::create("card-sim", &limits).map_err(SimError::CgroupCreate)?;
            // card-sim joins it itself before starting any thread, and
            // measures it.
            args.extend(["--cgroup".into(), cg.cg.rel().as_os_str().to_owned()]);
            Some(cg)
        } else {
            None
        };
        let child = start(&bin, &args, &socket, &control)?;
        Ok(SimProcess { child, cgroup, socket, control, bin, args, _dir: dir })
    }

    /// The card dies the hard way: SIGKILL to everything in its cgroup (the
    /// card-sim process and its VMs' `vmm` processes), or to the process
    /// alone without one. Its sockets stay until `restart`.
    pub fn kill(&mut self) {
        match &self.cgroup {
            Some(cg) => cg.cg.kill_all(Duration::from_secs(5)),
            None => {
                let pid = self.child.id() as libc::pid_t;
                if self.child.0.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None))) {
                    // SAFETY: kill(2) on our own child, not yet reaped.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        if self.child.wait_timeout(Duration::from_secs(5)).is_none() {
            tracing::warn!("card-sim {} did not die on SIGKILL within 5 s", self.child.id());
        }
    }

    /// Start the card again after it died (`kill`, a crash): the same
    /// binary, sockets and cgroup, a new process with nothing on it.
    pub fn restart(&mut self) -> Result<(), SimError> {
        if !self.exited() {
            self.kill();
        }
        // The dead card's sockets would pass for the new card's being up.
        for s in [&self.socket, &self.control] {
            crate::pci::remove_stale_socket(s);
        }
        self.child = start(&self.bin, &self.args, &self.socket, &self.control)?;
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The card's cgroup (None when launched without one).
    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref().map(|c| &c.cg)
    }

    /// Has the process exited (e.g. after the crash fault)?
    pub fn exited(&mut self) -> bool {
        self.child.0.as_mut().is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// Send one request to the control socket: a typed `Request`, or any
    /// JSON value (tests of refusals). `ok: false` becomes `SimError::Refused`.
    pub fn control<R: Serialize + ?Sized>(&self, req: &R) -> Result<Reply, SimError> {
        control_at(&self.control, req)
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The control socket (for `control_at` from another thread).
    pub fn control_path(&self) -> &Path {
        &self.control
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
    /// The fields' own guards do the work (see the struct); this only makes
    /// sure a card a test stopped (SIGSTOP, the silent-card fault) goes at
    /// once. `Guarded` stops a child with SIGTERM, and a stopped process
    /// keeps SIGTERM pending until it is continued: it would sit out the
    /// whole grace period before the SIGKILL. So SIGTERM here, then SIGCONT:
    /// the woken card takes the pending SIGTERM before it runs any code of
    /// its own (it does not serve the command left in its socket and log
    /// that the host is gone). `Guarded` then reaps it (its own SIGTERM to
    /// a dying process changes nothing).
    fn drop(&mut self) {
        let Some(c) = self.child.0.as_mut() else { return };
        // Only a child not yet reaped: its pid cannot have been reused.
        if !matches!(c.try_wait(), Ok(None)) {
            return;
        }
        let pid = c.id();
        for (sig, what) in [(libc::SIGTERM, "stop"), (libc::SIGCONT, "continue")] {
            // SAFETY: kill(2) on our own unreaped child's pid.
            if unsafe { libc::kill(pid as i32, sig) } != 0 {
                let e = std::io::Error::last_os_error();
                tracing::warn!("card-sim {pid}: cannot {what} it: {e}");
            }
        }
    }
}
