//! The control socket: a UNIX stream socket speaking JSON lines. One request
//! object per line, one reply object per line, in order on each connection;
//! each connection has its own thread. The governor and the card simulator
//! use it (or the [`Client`] below) to drive a VMM process.
//!
//! Requests (`cmd` selects, other fields are arguments):
//!
//! | cmd | fields | reply fields |
//! |---|---|---|
//! | `create` | `guest`, `mem_mib` | |
//! | `boot` | | `ready_ms` |
//! | `restore` | `path`, optional `diffs` (paths, oldest first) | `restore_ms` (VM comes up paused) |
//! | `pause` / `resume` | | |
//! | `snapshot` | `path`, optional `diff` (bool: only pages changed since the last snapshot) | `bytes`, `snapshot_ms` |
//! | `request` | `op` (`ping`, `step`, `counters`, `auto`, `touch`, `checksum`, `bad_mmio`, `bad_descriptor`, `triple_fault`, `shutdown`), `arg` | `reply` |
//! | `state` | | `state`, `last_log`, `logs` |
//! | `stats` | | `rss_bytes`, `guest_resident_bytes`, `vcpu_tid`, `vm` (exit and log counters) |
//! | `shutdown` | | `state` (the process exits after replying) |
//!
//! Every reply has `ok`; failures carry `error` with the typed error's text.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};
use crate::proto::op;
use crate::vm::{Sinks, Vm, VmConfig};

pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub fn op_code(name: &str) -> Option<u64> {
    Some(match name {
        "ping" => op::PING,
        "step" => op::STEP,
        "counters" => op::COUNTERS,
        "auto" => op::AUTO,
        "touch" => op::TOUCH,
        "checksum" => op::CHECKSUM,
        "bad_mmio" => op::BAD_MMIO,
        "bad_descriptor" => op::BAD_DESCRIPTOR,
        "triple_fault" => op::TRIPLE_FAULT,
        "bad_width" => op::BAD_WIDTH,
        "shutdown" => op::SHUTDOWN,
        _ => return None,
    })
}

/// Makes new sinks for a VM created or restored over the socket.
pub type SinkFactory = Box<dyn Fn() -> Sinks + Send + Sync>;
/// Called with every newly started VM (e.g. to place its threads in a cgroup).
pub type StartHook = Box<dyn Fn(&Vm) + Send + Sync>;

/// A VMM process's state as seen by the control socket. Each connection is
/// served by its own thread; requests to the VM run concurrently (a slow
/// agent request does not block a `state` query from another client).
pub struct Server {
    vm: Mutex<Option<Arc<Vm>>>,
    sinks: SinkFactory,
    on_start: StartHook,
    exiting: AtomicBool,
    /// Signalled after a `shutdown` request, to wake the main loop.
    wake: EventFd,
}

fn field<'a>(req: &'a Value, name: &'static str) -> Result<&'a Value> {
    req.get(name).ok_or(Error::Config { field: name, reason: "missing".into() })
}

fn str_field<'a>(req: &'a Value, name: &'static str) -> Result<&'a str> {
    field(req, name)?.as_str().ok_or(Error::Config { field: name, reason: "not a string".into() })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Resident bytes of this process (VmRSS).
pub fn self_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

impl Server {
    pub fn new(vm: Option<Vm>, sinks: SinkFactory, on_start: StartHook) -> Result<Arc<Server>> {
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::io("eventfd"))?;
        Ok(Arc::new(Server {
            vm: Mutex::new(vm.map(Arc::new)),
            sinks,
            on_start,
            exiting: AtomicBool::new(false),
            wake,
        }))
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<Vm>>> {
        self.vm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The VM, if one was created or restored.
    pub fn current_vm(&self) -> Option<Arc<Vm>> {
        self.slot().clone()
    }

    fn vm(&self) -> Result<Arc<Vm>> {
        self.slot().clone().ok_or_else(|| Error::State("absent (no VM created)".into()))
    }

    /// Handle one request; returns the reply and whether to exit afterwards.
    pub fn handle(&self, req: &Value) -> (Value, bool) {
        match self.dispatch(req) {
            Ok((mut v, exit)) => {
                v["ok"] = json!(true);
                (v, exit)
            }
            Err(e) => (json!({"ok": false, "error": e.to_string()}), false),
        }
    }

    fn dispatch(&self, req: &Value) -> Result<(Value, bool)> {
        let cmd = str_field(req, "cmd")?;
        let out = match cmd {
            "create" => {
                let mem = field(req, "mem_mib")?
                    .as_u64()
                    .ok_or(Error::Config { field: "mem_mib", reason: "not an integer".into() })?;
                let cfg = VmConfig::new(PathBuf::from(str_field(req, "guest")?), mem);
                let mut slot = self.slot();
                if slot.is_some() {
                    return Err(Error::State("already created".into()));
                }
                *slot = Some(Arc::new(Vm::create(&cfg, (self.sinks)())?));
                json!({})
            }
            "boot" => {
                let t = Instant::now();
                let vm = self.vm()?;
                vm.start(false)?;
                (self.on_start)(&vm);
                let ready = vm.wait_ready(REQUEST_TIMEOUT)?;
                json!({"ready_ms": ms(ready.saturating_duration_since(t))})
            }
            "restore" => {
                let path = PathBuf::from(str_field(req, "path")?);
                let mut slot = self.slot();
                if slot.is_some() {
                    return Err(Error::State("already has a VM".into()));
                }
                let t = Instant::now();
                let diffs = match req.get("diffs") {
                    None => Vec::new(),
                    Some(v) => v
                        .as_array()
                        .and_then(|a| a.iter().map(|p| p.as_str().map(PathBuf::from)).collect::<Option<Vec<_>>>())
                        .ok_or(Error::Config { field: "diffs", reason: "not a list of paths".into() })?,
                };
                let vm = Vm::restore_chain_files(&path, &diffs, (self.sinks)())?;
                let took = t.elapsed();
                (self.on_start)(&vm);
                *slot = Some(Arc::new(vm));
                json!({"restore_ms": ms(took)})
            }
            "pause" => {
                self.vm()?.pause()?;
                json!({})
            }
            "resume" => {
                self.vm()?.resume()?;
                json!({})
            }
            "snapshot" => {
                let path = PathBuf::from(str_field(req, "path")?);
                let vm = self.vm()?;
                let t = Instant::now();
                let diff = req.get("diff").and_then(Value::as_bool).unwrap_or(false);
                let bytes = if diff { vm.snapshot_diff_to_file(&path)? } else { vm.snapshot_to_file(&path)? };
                json!({"bytes": bytes, "snapshot_ms": ms(t.elapsed())})
            }
            "request" => {
                let name = str_field(req, "op")?;
                let code =
                    op_code(name).ok_or(Error::Config { field: "op", reason: format!("unknown op {name:?}") })?;
                let arg = req.get("arg").and_then(Value::as_u64).unwrap_or(0);
                let vm = self.vm()?;
                let t = Instant::now();
                let r = vm.request(code, arg, REQUEST_TIMEOUT)?;
                json!({"reply": r, "rtt_us": t.elapsed().as_secs_f64() * 1e6})
            }
            "state" => {
                let vm = self.vm()?;
                let (last, logs) = vm.last_log();
                json!({"state": vm.state(), "last_log": last, "logs": logs})
            }
            "stats" => {
                let vm = self.vm()?;
                json!({
                    "rss_bytes": self_rss(),
                    "guest_resident_bytes": vm.guest_resident_bytes(),
                    "vcpu_tid": vm.vcpu_tid(),
                    "vm": vm.stats(),
                })
            }
            "shutdown" => {
                let vm = self.slot().clone();
                let state = match vm {
                    Some(vm) => json!(vm.shutdown()),
                    None => json!(null),
                };
                return Ok((json!({"state": state}), true));
            }
            other => return Err(Error::Config { field: "cmd", reason: format!("unknown command {other:?}") }),
        };
        Ok((out, false))
    }

    /// True once a `shutdown` request was served.
    pub fn exiting(&self) -> bool {
        self.exiting.load(Ordering::SeqCst)
    }

    /// Readable when the process should exit (see `crate::event_loop`).
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// Serve one accepted connection on its own thread.
    pub fn spawn_conn(self: &Arc<Self>, conn: UnixStream) -> Result<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                if me.serve_conn(conn) {
                    me.exiting.store(true, Ordering::SeqCst);
                    let _ = me.wake.write(1);
                }
            })
            .map(|_| ())
            .map_err(Error::io("spawning a control thread"))
    }

    /// Serve one connection; true when it asked the process to exit.
    fn serve_conn(&self, conn: UnixStream) -> bool {
        let Ok(mut w) = conn.try_clone() else { return false };
        let r = BufReader::new(conn);
        for line in r.lines() {
            let Ok(line) = line else { return false };
            if line.trim().is_empty() {
                continue;
            }
            let (reply, exit) = match serde_json::from_str::<Value>(&line) {
                Ok(req) => self.handle(&req),
                Err(e) => (json!({"ok": false, "error": format!("control protocol: bad JSON: {e}")}), false),
            };
            let _ = writeln!(w, "{reply}");
            if exit {
                return true;
            }
        }
        false
    }
}

/// Client side of the control socket.
pub struct Client {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client> {
        let s = UnixStream::connect(path).map_err(Error::io(path.display().to_string()))?;
        Ok(Client { w: s.try_clone().map_err(Error::io("control socket"))?, r: BufReader::new(s) })
    }

    /// Connect, retrying until the socket appears or `timeout` passes.
    pub fn connect_wait(path: &Path, timeout: Duration) -> Result<Client> {
        let deadline = Instant::now() + timeout;
        loop {
            match Client::connect(path) {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }

    /// Send one request; returns the reply, or the remote error as `Protocol`.
    pub fn call(&mut self, req: Value) -> Result<Value> {
        writeln!(self.w, "{req}").map_err(Error::io("control socket write"))?;
        let mut line = String::new();
        let n = self.r.read_line(&mut line).map_err(Error::io("control socket read"))?;
        if n == 0 {
            return Err(Error::Protocol("the VMM closed the control socket".into()));
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| Error::Protocol(format!("bad reply: {e}")))?;
        if v.get("ok") == Some(&json!(true)) {
            Ok(v)
        } else {
            Err(Error::Protocol(v.get("error").and_then(Value::as_str).unwrap_or("no error text").to_string()))
        }
    }
}
