//! The control socket's server side (protocol: `vmm::host::api`). Each
//! connection is served by its own thread; requests to the VM run
//! concurrently (a slow agent request does not block a `state` query from
//! another client).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm::host::api::{
    Ack, Answered, BadRequest, Booted, Change, Done, ErrorKind, ErrorLine, HealthReply, LogAcksReply, OkLine,
    QosLimitChange, QosReply, Request, Response, Restored, ShutdownReply, SnapshotTaken, StateReply, StatsReply,
};
use vmm::{RunState, Sinks, Vm, VmConfig};
use vmm_sys_util::eventfd::EventFd;

/// How long `boot` waits for the banner and `request` for the agent.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Makes new sinks for a VM created or restored over the socket.
pub type SinkFactory = Box<dyn Fn() -> Sinks + Send + Sync>;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the VM is absent (none created or restored yet)")]
    NoVm,
    #[error("this process already has a VM ({0}); it runs one")]
    HasVm(RunState),
    #[error(transparent)]
    BadRequest(#[from] BadRequest),
    #[error(transparent)]
    Vm(#[from] vmm::Error),
}

impl ServeError {
    fn kind(&self) -> ErrorKind {
        match self {
            ServeError::NoVm | ServeError::HasVm(_) => ErrorKind::State,
            ServeError::BadRequest(_) => ErrorKind::BadRequest,
            ServeError::Vm(e) => e.kind(),
        }
    }
}

/// A VMM process's state as seen by the control socket.
pub struct Server {
    vm: Mutex<Option<Arc<Vm>>>,
    sinks: SinkFactory,
    exiting: AtomicBool,
    /// Signalled after a `shutdown` request, to wake the main loop.
    wake: EventFd,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Resident bytes of this process (VmRSS); 0 when it cannot be read (a
/// status figure only).
fn self_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb.saturating_mul(1024))
}

/// A full snapshot in the stream format, into a new file at `path`.
fn stream_to_file(vm: &Vm, path: &std::path::Path) -> vmm::Result<u64> {
    let io = |source| vmm::Error::Io { what: path.display().to_string(), source };
    let f = std::fs::File::create(path).map_err(io)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let n = vm.snapshot_to(&mut w)?;
    // BufWriter's drop would swallow a failed final write.
    w.flush().map_err(io)?;
    Ok(n)
}

/// Pre-copy's base of the running VM, into a new file at `path`.
fn live_to_file(vm: &Vm, path: &std::path::Path) -> vmm::Result<u64> {
    let io = |source| vmm::Error::Io { what: path.display().to_string(), source };
    let f = std::fs::File::create(path).map_err(io)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let n = vm.snapshot_live_to(&mut w)?;
    w.flush().map_err(io)?;
    Ok(n)
}

/// A pre-copy round's diff of the running VM, into a new file at `path`.
fn live_diff_to_file(vm: &Vm, path: &std::path::Path) -> vmm::Result<u64> {
    let io = |source| vmm::Error::Io { what: path.display().to_string(), source };
    let f = std::fs::File::create(path).map_err(io)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let n = vm.snapshot_diff_live_to(&mut w)?;
    w.flush().map_err(io)?;
    Ok(n)
}

impl Server {
    pub fn new(vm: Option<Vm>, sinks: SinkFactory) -> std::io::Result<Arc<Server>> {
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        Ok(Arc::new(Server { vm: Mutex::new(vm.map(Arc::new)), sinks, exiting: AtomicBool::new(false), wake }))
    }

    fn slot(&self) -> MutexGuard<'_, Option<Arc<Vm>>> {
        self.vm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The VM, if one was created or restored.
    pub fn current_vm(&self) -> Option<Arc<Vm>> {
        self.slot().clone()
    }

    fn vm(&self) -> Result<Arc<Vm>, ServeError> {
        self.current_vm().ok_or(ServeError::NoVm)
    }

    /// Shut the VM down (if any); returns its final state.
    pub fn shutdown_vm(&self) -> Option<RunState> {
        self.current_vm().map(|vm| vm.shutdown())
    }

    /// Run one request; returns the reply fields and whether to exit afterwards.
    pub fn handle(&self, req: Request) -> Result<(Response, bool), ServeError> {
        let out = match req {
            Request::Create { guest, mem_mib } => {
                let mut slot = self.slot();
                if let Some(vm) = slot.as_ref() {
                    return Err(ServeError::HasVm(vm.state()));
                }
                *slot = Some(Arc::new(Vm::create(&VmConfig::new(guest, mem_mib), (self.sinks)())?));
                Response::Done(Done {})
            }
            Request::Boot {} => {
                let t = Instant::now();
                let vm = self.vm()?;
                vm.start(false)?;
                let ready = vm.wait_ready(REQUEST_TIMEOUT)?;
                Response::Booted(Booted { ready_ms: ms(ready.saturating_duration_since(t)) })
            }
            Request::Restore { path, diffs } => {
                let mut slot = self.slot();
                if let Some(vm) = slot.as_ref() {
                    return Err(ServeError::HasVm(vm.state()));
                }
                let t = Instant::now();
                let vm = Vm::restore_chain_files(&path, &diffs, (self.sinks)())?;
                let took = t.elapsed();
                *slot = Some(Arc::new(vm));
                Response::Restored(Restored { restore_ms: ms(took) })
            }
            Request::Pause {} => {
                self.vm()?.pause()?;
                Response::Done(Done {})
            }
            Request::Resume {} => {
                self.vm()?.resume()?;
                Response::Done(Done {})
            }
            Request::ApplyDiff { path } => {
                self.vm()?.apply_diff_file(&path)?;
                Response::Done(Done {})
            }
            Request::Snapshot { path, diff, stream, live } => {
                let vm = self.vm()?;
                let t = Instant::now();
                let bytes = if live && diff {
                    live_diff_to_file(&vm, &path)?
                } else if live {
                    live_to_file(&vm, &path)?
                } else if diff {
                    vm.snapshot_diff_to_file(&path)?
                } else if stream {
                    stream_to_file(&vm, &path)?
                } else {
                    vm.snapshot_to_file(&path)?
                };
                Response::SnapshotTaken(SnapshotTaken { bytes, snapshot_ms: ms(t.elapsed()) })
            }
            Request::Request { op, arg } => {
                let vm = self.vm()?;
                let t = Instant::now();
                let reply = vm.request(op.code(), arg, REQUEST_TIMEOUT)?;
                Response::Answered(Answered { reply, rtt_us: t.elapsed().as_secs_f64() * 1e6 })
            }
            Request::LogTake { seq, epoch, records } => {
                let recs: Option<Vec<_>> = records.iter().map(|r| r.to_proto()).collect();
                let recs = recs.ok_or_else(|| vmm::Error::Config {
                    field: "records",
                    reason: format!("a text longer than {} bytes", vmm::proto::logs::TEXT_LEN),
                })?;
                let acks = self.vm()?.log_take(seq, epoch, &recs, REQUEST_TIMEOUT)?;
                Response::LogAcks(LogAcksReply {
                    acks: acks
                        .iter()
                        .map(|a| Ack {
                            slot: a.slot,
                            first_host: a.first_host,
                            last_host: a.last_host,
                            first_log: a.first_log,
                        })
                        .collect(),
                })
            }
            Request::MonitorTick { seq, tick_ms, signals } => {
                let batch: Vec<_> = signals.iter().map(|s| s.to_proto()).collect();
                let changes = self.vm()?.monitor_tick(seq, tick_ms, &batch, REQUEST_TIMEOUT)?;
                Response::Health(HealthReply { changes: changes.iter().map(Change::from).collect() })
            }
            Request::QosTick { seq, card, vms } => {
                let batch: Vec<_> = vms.iter().map(|v| v.to_proto()).collect();
                let changes = self.vm()?.qos_tick(seq, card.use_bp, card.threshold_bp, &batch, REQUEST_TIMEOUT)?;
                Response::Qos(QosReply { changes: changes.iter().map(QosLimitChange::from).collect() })
            }
            Request::State {} => {
                let vm = self.vm()?;
                let (last_log, logs) = vm.last_log();
                Response::State(StateReply { state: vm.state(), last_log, logs })
            }
            Request::Stats {} => {
                let vm = self.vm()?;
                Response::Stats(StatsReply {
                    rss_bytes: self_rss(),
                    guest_resident_bytes: vm.guest_resident_bytes(),
                    vcpu_tid: vm.vcpu_tid(),
                    vm: vm.stats(),
                })
            }
            Request::Shutdown {} => return Ok((Response::Shutdown(ShutdownReply { state: self.shutdown_vm() }), true)),
        };
        Ok((out, false))
    }

    /// One request line to one reply line; true when the process should exit.
    fn serve_line(&self, line: &str) -> (String, bool) {
        let result = Request::parse(line).map_err(ServeError::from).and_then(|req| self.handle(req));
        let encoded = match &result {
            Ok((body, _)) => serde_json::to_string(&OkLine::new(body)),
            Err(e) => serde_json::to_string(&ErrorLine::new(e.to_string(), e.kind())),
        };
        let exit = matches!(result, Ok((_, true)));
        match encoded {
            Ok(reply) => (reply, exit),
            Err(e) => {
                // Only a non-UTF-8 path could get here; say so rather than
                // leaving the client without a line.
                tracing::error!(error = %e, "cannot encode a control reply");
                let e = ErrorLine::new(format!("encoding the reply: {e}"), ErrorKind::BadRequest);
                (serde_json::to_string(&e).unwrap_or_else(|_| r#"{"ok":false}"#.into()), exit)
            }
        }
    }

    /// True once a `shutdown` request was served.
    pub fn exiting(&self) -> bool {
        self.exiting.load(Ordering::SeqCst)
    }

    /// Readable when the process should exit (see `event_loop`).
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// Serve one accepted connection on its own thread.
    pub fn spawn_conn(self: &Arc<Self>, conn: UnixStream) -> std::io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new().name("control".into()).spawn(move || {
            if me.serve_conn(conn) {
                me.exiting.store(true, Ordering::SeqCst);
                if let Err(e) = me.wake.write(1) {
                    tracing::error!(error = %e, "cannot wake the main loop after a shutdown request");
                }
            }
        })?;
        Ok(())
    }

    /// Serve one connection; true when it asked the process to exit.
    fn serve_conn(&self, conn: UnixStream) -> bool {
        let mut w = match conn.try_clone() {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot clone a control connection; dropping it");
                return false;
            }
        };
        for line in BufReader::new(conn).lines() {
            let line = match line {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "reading a control connection failed; closing it");
                    return false;
                }
            };
            if line.trim().is_empty() {
                continue;
            }
            let (reply, exit) = self.serve_line(&line);
            if let Err(e) = writeln!(w, "{reply}") {
                // The client went away; a shutdown it asked for still happens.
                tracing::warn!(error = %e, "cannot send a control reply; closing the connection");
                return exit;
            }
            if exit {
                return true;
            }
        }
        false
    }
}
