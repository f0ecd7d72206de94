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

use serde_json::Value;

use crate::error::{CardError, Result};
use cgroupfs::{Cgroup, Layout, Limits};

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
pub fn find_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CARD_SIM_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| CardError::Open(format!("current_exe: {e}")))?;
    for dir in exe.ancestors().skip(1).take(4) {
        let cand = dir.join("card-sim");
        if cand.is_file() {
            return Ok(cand);
        }
    }
    Err(CardError::Open(format!(
        "card-sim binary not found near {} (build it: cargo build --release -p card-link --bin card-sim, or set CARD_SIM_BIN)",
        exe.display()
    )))
}

impl SimProcess {
    pub fn spawn(opts: &SimOptions) -> Result<SimProcess> {
        let bin = find_binary()?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("card-sim-{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(&tag);
        std::fs::create_dir_all(&dir).map_err(|e| CardError::Open(format!("{}: {e}", dir.display())))?;
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
                .map_err(|e| CardError::Open(format!("card cgroup {tag}: {e}")))?;
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
        me.child = Some(cmd.spawn().map_err(|e| CardError::Open(format!("spawn {}: {e}", bin.display())))?);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(me.socket.exists() && me.control.exists()) {
            if Instant::now() > deadline {
                return Err(CardError::Open("card-sim did not create its sockets within 10 s".into()));
            }
            if let Some(c) = me.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    return Err(CardError::Open(format!("card-sim exited early: {st}")));
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

    /// Send one request to the control socket; `ok: false` becomes an error.
    pub fn control(&self, req: Value) -> Result<Value> {
        control_at(&self.control, req)
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }
}

pub fn control_at(path: &Path, req: Value) -> Result<Value> {
    let mut s = UnixStream::connect(path).map_err(|e| CardError::Open(format!("control {}: {e}", path.display())))?;
    let t = Some(Duration::from_secs(10));
    let _ = s.set_read_timeout(t);
    let _ = s.set_write_timeout(t);
    writeln!(s, "{req}").map_err(|e| CardError::Io(format!("control write: {e}")))?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).map_err(|e| CardError::Io(format!("control read: {e}")))?;
    let v: Value = serde_json::from_str(&line).map_err(|e| CardError::Io(format!("control reply {line:?}: {e}")))?;
    if v.get("ok").and_then(Value::as_bool) != Some(true) {
        return Err(CardError::Invalid(format!("control refused: {}", v.get("error").unwrap_or(&v))));
    }
    Ok(v)
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A stopped (SIGSTOP) card must be continued to die cleanly.
            // SAFETY: signalling our own child by pid.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGCONT);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(cg) = self.cgroup.as_mut() {
            cg.kill_all(Duration::from_secs(5));
            if let Err(e) = cg.remove() {
                eprintln!("card-sim launcher: removing the card cgroup: {e}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
