//! The `vmm` process's main loop, on event-manager: it accepts control
//! connections, takes SIGTERM/SIGINT through a signalfd (so a governor can
//! stop a VMM and still have it shut the VM down and remove its cgroup), and,
//! without a control socket, ends when the VM stops on its own.

use std::fs::File;
use std::io::Read;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm::StopReason;
use vmm_sys_util::eventfd::EventFd;

use crate::server::Server;

/// Why the main loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A `shutdown` request on the control socket.
    Shutdown,
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// The VM stopped by itself (no control socket).
    VmStopped(StopReason),
}

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("event loop: {0}")]
    Events(#[source] event_manager::Error),
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> LoopError {
    move |source| LoopError::Io { what, source }
}

fn exit_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, zero-initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Block SIGTERM/SIGINT for this thread and every thread started after, so
/// they arrive only through the loop's signalfd. Call first in `main`.
pub fn block_exit_signals() -> Result<(), LoopError> {
    let set = exit_signals();
    // SAFETY: valid set; no old mask wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io_err("pthread_sigmask")(std::io::Error::from_raw_os_error(rc)));
    }
    Ok(())
}

struct Loop {
    server: Arc<Server>,
    listener: Option<UnixListener>,
    sigfd: File,
    stopped: Arc<EventFd>,
    stop_reason: Arc<Mutex<Option<StopReason>>>,
    outcome: Option<Outcome>,
}

impl MutEventSubscriber for Loop {
    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |e: Events| {
            if let Err(err) = ops.add(e) {
                tracing::error!(error = ?err, "event loop registration failed");
            }
        };
        if let Some(l) = &self.listener {
            add(Events::new(l, EventSet::IN));
        }
        add(Events::new(&self.sigfd, EventSet::IN));
        add(Events::new(self.stopped.as_ref(), EventSet::IN));
        add(Events::new(self.server.wake_fd(), EventSet::IN));
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if let Some(l) = self.listener.as_ref().filter(|l| l.as_raw_fd() == fd) {
            match l.accept() {
                Ok((conn, _)) => {
                    if let Err(e) = self.server.spawn_conn(conn) {
                        tracing::error!(error = %e, "cannot start a thread for a control connection");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "accepting a control connection failed"),
            }
        } else if fd == self.sigfd.as_raw_fd() {
            // struct signalfd_siginfo is 128 bytes; ssi_signo comes first.
            let mut buf = [0u8; 128];
            match self.sigfd.read_exact(&mut buf) {
                Ok(()) => {
                    let signo = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as i32;
                    self.outcome = Some(Outcome::Signal(signo));
                }
                Err(e) => tracing::warn!(error = %e, "reading the signalfd failed"),
            }
        } else if fd == self.stopped.as_raw_fd() {
            // Reading only resets the eventfd; the reason is in the slot.
            // EAGAIN (already reset) is the only way it fails here.
            let _ = self.stopped.read();
            let reason = self.stop_reason.lock().unwrap_or_else(|p| p.into_inner()).clone();
            self.outcome = Some(Outcome::VmStopped(reason.unwrap_or(StopReason::Requested)));
        } else if fd == self.server.wake_fd().as_raw_fd() {
            // As above: a reset, and the flag below is what counts.
            let _ = self.server.wake_fd().read();
            if self.server.exiting() {
                self.outcome = Some(Outcome::Shutdown);
            }
        }
    }
}

/// Without a control socket the process lives as long as its VM: a thread
/// waits for the VM to stop and signals `stopped`.
fn watch_vm(server: Arc<Server>, stopped: Arc<EventFd>, slot: Arc<Mutex<Option<StopReason>>>) -> Result<(), LoopError> {
    std::thread::Builder::new()
        .name("vm-watch".into())
        .spawn(move || loop {
            let Some(vm) = server.current_vm() else { return };
            if let Ok(r) = vm.wait_stopped(Duration::from_secs(3600)) {
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                if let Err(e) = stopped.write(1) {
                    tracing::error!(error = %e, "cannot tell the main loop that the VM stopped");
                }
                return;
            }
        })
        .map_err(io_err("spawning the VM watcher"))?;
    Ok(())
}

/// Run until shutdown, a signal, or (without a listener) the VM stopping.
/// The VM is shut down before this returns.
pub fn run(server: Arc<Server>, listener: Option<UnixListener>) -> Result<Outcome, LoopError> {
    let set = exit_signals();
    // SAFETY: valid set; the new descriptor is owned by the File below.
    let raw = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if raw < 0 {
        return Err(io_err("signalfd")(std::io::Error::last_os_error()));
    }
    // SAFETY: raw is a fresh descriptor we own.
    let sigfd = unsafe { File::from_raw_fd(raw) };
    let stopped = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?);
    let stop_reason = Arc::new(Mutex::new(None));
    if listener.is_none() {
        watch_vm(server.clone(), stopped.clone(), stop_reason.clone())?;
    }
    let lp =
        Arc::new(Mutex::new(Loop { server: server.clone(), listener, sigfd, stopped, stop_reason, outcome: None }));
    let mut em: EventManager<Arc<Mutex<Loop>>> = EventManager::new().map_err(LoopError::Events)?;
    em.add_subscriber(lp.clone());
    let outcome = loop {
        if let Err(e) = em.run() {
            // EINTR from the vCPU kick signal is harmless; anything else is not.
            if !matches!(e, event_manager::Error::Epoll(ref err) if err.errno() == libc::EINTR) {
                return Err(LoopError::Events(e));
            }
        }
        if let Some(o) = lp.lock().unwrap_or_else(|p| p.into_inner()).outcome.take() {
            break o;
        }
    };
    if outcome != Outcome::Shutdown {
        server.shutdown_vm();
    }
    Ok(outcome)
}
