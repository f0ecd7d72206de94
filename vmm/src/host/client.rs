//! Client side of a `vmm` process's control socket (see [`super::api`]).
//! Typed calls return the reply's fields; [`Client::call_json`] sends any
//! JSON (tests send malformed requests on purpose). A refused request comes
//! back as [`Error::Remote`] with its [`ErrorKind`](super::api::ErrorKind).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::api::{
    AgentOp, Answered, Booted, CardNetwork, Done, ErrorLine, HealthReply, LogAcksReply, LogLine, QosReply, QosVm,
    Request, Restored, ShutdownReply, Signals, SnapshotTaken, StateReply, StatsReply,
};
use crate::error::{Error, Result};

pub struct Client {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client> {
        let s = UnixStream::connect(path).map_err(Error::io(path.display().to_string()))?;
        Ok(Client { w: s.try_clone().map_err(Error::io("control socket"))?, r: BufReader::new(s) })
    }

    /// The pid of the process serving the socket (its peer credentials).
    pub fn peer_pid(&self) -> Result<u32> {
        use std::os::fd::AsRawFd;
        let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: SO_PEERCRED fills a ucred of `len` bytes.
        let r = unsafe {
            libc::getsockopt(
                self.w.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if r != 0 || cred.pid <= 0 {
            return Err(Error::Io {
                what: "peer credentials of the control socket".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(cred.pid as u32)
    }

    /// Connect, retrying until the socket appears or `timeout` passes.
    pub fn connect_wait(path: &Path, timeout: Duration) -> Result<Client> {
        Client::connect_while(path, timeout, || true)
    }

    /// [`Client::connect_wait`], giving up early once `alive` says the
    /// server is gone (a child that exited will never open its socket).
    pub fn connect_while(path: &Path, timeout: Duration, mut alive: impl FnMut() -> bool) -> Result<Client> {
        let deadline = Instant::now() + timeout;
        loop {
            match Client::connect(path) {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() > deadline || !alive() => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }

    /// Send one request; returns the reply's fields as `T`.
    pub fn call<T: DeserializeOwned>(&mut self, req: &Request) -> Result<T> {
        let line = serde_json::to_string(req).map_err(Error::Encode)?;
        let v = self.exchange(&line)?;
        serde_json::from_value(v).map_err(|source| Error::BadReply { source })
    }

    /// Send any JSON object as a request; returns the whole reply.
    pub fn call_json(&mut self, req: &Value) -> Result<Value> {
        self.exchange(&req.to_string())
    }

    /// One line out, one line back; a refused request becomes `Remote`.
    fn exchange(&mut self, line: &str) -> Result<Value> {
        writeln!(self.w, "{line}").map_err(Error::io("control socket write"))?;
        let mut reply = String::new();
        let n = self.r.read_line(&mut reply).map_err(Error::io("control socket read"))?;
        if n == 0 {
            return Err(Error::Disconnected);
        }
        let v: Value = serde_json::from_str(&reply).map_err(|source| Error::BadReply { source })?;
        if v.get("ok") == Some(&Value::Bool(true)) {
            return Ok(v);
        }
        let e: ErrorLine = serde_json::from_value(v).map_err(|source| Error::BadReply { source })?;
        Err(Error::Remote { kind: e.kind, message: e.error })
    }

    pub fn create(&mut self, guest: &Path, mem_mib: u64) -> Result<()> {
        self.call::<Done>(&Request::Create { guest: guest.to_path_buf(), mem_mib }).map(|_| ())
    }

    pub fn boot(&mut self) -> Result<Booted> {
        self.call(&Request::Boot {})
    }

    pub fn restore(&mut self, path: &Path, diffs: &[PathBuf]) -> Result<Restored> {
        self.call(&Request::Restore { path: path.to_path_buf(), diffs: diffs.to_vec() })
    }

    /// Pre-copy's base of the running VM, in the stream format.
    pub fn snapshot_live(&mut self, path: &Path) -> Result<SnapshotTaken> {
        self.call(&Request::Snapshot { path: path.to_path_buf(), diff: false, stream: true, live: true })
    }

    /// One log exchange (see `Request::LogTake`).
    pub fn log_take(&mut self, seq: u64, epoch: u32, records: &[LogLine]) -> Result<LogAcksReply> {
        self.call(&Request::LogTake { seq, epoch, records: records.to_vec() })
    }

    /// One qos tick (see `Request::QosTick`).
    pub fn qos_tick(&mut self, seq: u64, card: CardNetwork, vms: &[QosVm]) -> Result<QosReply> {
        self.call(&Request::QosTick { seq, card, vms: vms.to_vec() })
    }

    /// One status-monitoring tick (see `Request::MonitorTick`).
    pub fn monitor_tick(&mut self, seq: u64, tick_ms: u32, signals: &[Signals]) -> Result<HealthReply> {
        self.call(&Request::MonitorTick { seq, tick_ms, signals: signals.to_vec() })
    }

    /// A pre-copy round's diff of the running VM.
    pub fn snapshot_live_diff(&mut self, path: &Path) -> Result<SnapshotTaken> {
        self.call(&Request::Snapshot { path: path.to_path_buf(), diff: true, stream: false, live: true })
    }

    /// Apply a diff file to the paused VM (pre-copy's last step).
    pub fn apply_diff(&mut self, path: &Path) -> Result<()> {
        self.call::<Done>(&Request::ApplyDiff { path: path.to_path_buf() }).map(|_| ())
    }

    pub fn pause(&mut self) -> Result<()> {
        self.call::<Done>(&Request::Pause {}).map(|_| ())
    }

    pub fn resume(&mut self) -> Result<()> {
        self.call::<Done>(&Request::Resume {}).map(|_| ())
    }

    pub fn snapshot(&mut self, path: &Path, diff: bool) -> Result<SnapshotTaken> {
        self.call(&Request::Snapshot { path: path.to_path_buf(), diff, stream: false, live: false })
    }

    /// A full snapshot in the stream format (sparse), for shipping over a
    /// link; any `restore` reads it.
    pub fn snapshot_stream(&mut self, path: &Path) -> Result<SnapshotTaken> {
        self.call(&Request::Snapshot { path: path.to_path_buf(), diff: false, stream: true, live: false })
    }

    pub fn request(&mut self, op: AgentOp, arg: u64) -> Result<Answered> {
        self.call(&Request::Request { op, arg })
    }

    pub fn state(&mut self) -> Result<StateReply> {
        self.call(&Request::State {})
    }

    pub fn stats(&mut self) -> Result<StatsReply> {
        self.call(&Request::Stats {})
    }

    /// Ask the VMM to stop its VM and exit.
    pub fn shutdown(&mut self) -> Result<ShutdownReply> {
        self.call(&Request::Shutdown {})
    }
}
