//! One management VM: the [`Vm`] handle and its life cycle (created ->
//! running <-> paused -> stopped), agent requests and status counters.
//!
//! Threads: the vCPU thread ([`vcpu`]) owns the run loop and handles every
//! exit synchronously through the I/O bus ([`bus`]: serial, idle port, exit
//! port, virtio-mmio). Callers on other threads inject requests into the
//! receive queue, pause the vCPU (a signal kicks it out of KVM_RUN) and read
//! its state while it is parked. Building a VM is [`builder`]; snapshots
//! and restores are [`persist`].

mod builder;
pub mod bulk;
mod bus;
mod persist;
mod shared;
mod vcpu;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

pub(crate) use builder::anonymous_ram;
pub use builder::{Sinks, VmConfig};
use shared::{lock, Shared};

use crate::error::{Error, Result, StopReason};
use crate::proto::{self, word};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RunState {
    Created,
    Running,
    Paused,
    Stopped(StopReason),
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunState::Created => write!(f, "created"),
            RunState::Running => write!(f, "running"),
            RunState::Paused => write!(f, "paused"),
            RunState::Stopped(r) => write!(f, "stopped ({r})"),
        }
    }
}

/// An agent answer (or log record), decoded from its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reply {
    pub op: u64,
    pub id: u64,
    pub work: u64,
    pub log_seq: u64,
    pub steps: u64,
    pub value: u64,
    pub requests: u64,
}

impl Reply {
    fn from_words(w: &[u64; 8]) -> Reply {
        Reply {
            op: w[word::OP],
            id: w[word::ID],
            work: w[word::WORK],
            log_seq: w[word::LOG_SEQ],
            steps: w[word::STEPS],
            value: w[word::VALUE],
            requests: w[word::REQUESTS],
        }
    }
}

/// Counters of one VM, as reported to status monitoring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmStats {
    /// Port I/O exits (serial, idle and exit ports).
    pub pio_exits: u64,
    /// MMIO exits (the virtio window).
    pub mmio_exits: u64,
    /// Times the agent parked on the idle port.
    pub idle_exits: u64,
    /// KVM_RUN returns caused by kicks (pause, stop).
    pub interrupted: u64,
    /// Log records received from the agent by this process.
    pub logs: u64,
    /// Guest RAM pages backed on the host, in bytes.
    pub guest_resident_bytes: u64,
}

pub struct Vm {
    sh: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    next_id: AtomicU64,
    mem_size: u64,
    /// Guest memory equals the last snapshot taken or restored, plus what
    /// the dirty log and the devices recorded since: diffs are possible.
    has_base: Mutex<bool>,
    /// Serializes life-cycle changes (pause, resume, snapshot, shutdown),
    /// so a resume from another control connection cannot run the guest
    /// while a snapshot is reading its memory.
    life: Mutex<()>,
    /// Serializes protocol-2 exchanges (one in-window, one out-window).
    bulk: Mutex<()>,
}

/// Requests queued for a guest that has no free receive buffer.
const MAX_PENDING: usize = 256;
/// How long [`Vm::pause`] waits for the vCPU thread to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

impl Vm {
    /// Start the vCPU thread (running, or parked when `paused`).
    pub fn start(&self, paused: bool) -> Result<()> {
        let mut thread = lock(&self.thread);
        if thread.is_some() {
            return Err(Error::State { state: self.state(), action: "a second start" });
        }
        vcpu::install_kick_handler();
        {
            let mut ctl = lock(&self.sh.ctl);
            ctl.pause_req = paused;
            if !paused {
                ctl.state = RunState::Running;
            }
        }
        let sh = self.sh.clone();
        let t = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || vcpu::vcpu_loop(&sh))
            .map_err(Error::io("spawning the vCPU thread"))?;
        *thread = Some(t);
        drop(thread);
        // A paused start returns once the thread is parked, so the caller can
        // snapshot or resume right away.
        let mut ctl = lock(&self.sh.ctl);
        while ctl.state == RunState::Created {
            ctl = self.sh.wait(ctl);
        }
        Ok(())
    }

    pub fn state(&self) -> RunState {
        lock(&self.sh.ctl).state.clone()
    }

    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// The vCPU thread's id (to move it into a cgroup).
    pub fn vcpu_tid(&self) -> Option<libc::pid_t> {
        lock(&self.sh.ctl).os_tid
    }

    /// Wait until the agent printed its banner.
    pub fn wait_ready(&self, timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        let mut ctl = lock(&self.sh.ctl);
        loop {
            if let Some(t) = ctl.ready_at {
                return Ok(t);
            }
            if let RunState::Stopped(r) = &ctl.state {
                return Err(Error::Stopped(r.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(timeout, "the agent banner"));
            }
            ctl = self.sh.wait_timeout(ctl, deadline - now);
        }
    }

    /// Serial console lines seen so far.
    pub fn console_lines(&self) -> Vec<String> {
        lock(&self.sh.dev).serial.lines.clone()
    }

    /// The newest log record and the number received by this process.
    pub fn last_log(&self) -> (Option<Reply>, u64) {
        let ctl = lock(&self.sh.ctl);
        (ctl.last_log, ctl.logs)
    }

    /// Send a request to the agent and wait for its reply.
    pub fn request(&self, op: u64, arg: u64, timeout: Duration) -> Result<Reply> {
        {
            let ctl = lock(&self.sh.ctl);
            if ctl.state != RunState::Running || ctl.pause_req {
                return Err(Error::State { state: ctl.state.clone(), action: "agent requests" });
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut w = [0u64; 8];
        w[word::KIND] = proto::KIND_REQUEST;
        w[word::OP] = op;
        w[word::ID] = id;
        w[word::ARG] = arg;
        // Register before queueing: the reply may come back at once.
        lock(&self.sh.ctl).waiting.insert(id);
        let r = self.send_and_wait(id, &w, timeout);
        let mut ctl = lock(&self.sh.ctl);
        ctl.waiting.remove(&id);
        ctl.replies.remove(&id);
        r
    }

    fn send_and_wait(&self, id: u64, w: &[u64; 8], timeout: Duration) -> Result<Reply> {
        let pushed = {
            let mut dev = lock(&self.sh.dev);
            // A guest that stopped taking requests must not make us queue
            // without bound.
            let queued = dev.console.pending_len();
            if queued >= MAX_PENDING {
                return Err(Error::Busy { queued });
            }
            dev.console.push_request(&self.sh.mem, Some(proto::encode(w)))
        };
        if let Err(e) = pushed {
            self.sh.fail(StopReason::Device(e.to_string()));
        }
        let deadline = Instant::now() + timeout;
        let mut ctl = lock(&self.sh.ctl);
        ctl.wake = true;
        self.sh.cv.notify_all();
        loop {
            if let Some(r) = ctl.replies.remove(&id) {
                return Ok(r);
            }
            if let RunState::Stopped(r) = &ctl.state {
                return Err(Error::Stopped(r.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(timeout, "the agent's reply"));
            }
            ctl = self.sh.wait_timeout(ctl, deadline - now);
        }
    }

    /// Park the vCPU outside KVM_RUN with all in-flight I/O completed.
    pub fn pause(&self) -> Result<()> {
        let _life = lock(&self.life);
        let mut ctl = lock(&self.sh.ctl);
        match &ctl.state {
            RunState::Paused => return Ok(()),
            RunState::Running => {}
            s => return Err(Error::State { state: s.clone(), action: "pause" }),
        }
        ctl.pause_req = true;
        self.sh.cv.notify_all();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while ctl.state == RunState::Running {
            // Re-kick until the thread notices: a signal that lands just
            // before KVM_RUN is entered would otherwise be lost.
            if let Some(tid) = ctl.tid {
                vcpu::kick(tid);
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(PAUSE_TIMEOUT, "the vCPU to pause"));
            }
            ctl = self.sh.wait_timeout(ctl, Duration::from_millis(1));
        }
        match &ctl.state {
            RunState::Stopped(r) => Err(Error::Stopped(r.clone())),
            _ => Ok(()),
        }
    }

    pub fn resume(&self) -> Result<()> {
        let _life = lock(&self.life);
        let mut ctl = lock(&self.sh.ctl);
        match &ctl.state {
            RunState::Running => return Ok(()),
            RunState::Paused => {}
            s => return Err(Error::State { state: s.clone(), action: "resume" }),
        }
        ctl.pause_req = false;
        self.sh.cv.notify_all();
        while ctl.state == RunState::Paused {
            ctl = self.sh.wait(ctl);
        }
        Ok(())
    }

    /// Stop the VM and join its vCPU thread. Returns why it stopped.
    pub fn shutdown(&self) -> RunState {
        let _life = lock(&self.life);
        self.sh.fail(StopReason::Requested);
        let t = lock(&self.thread).take();
        if let Some(t) = t {
            if t.join().is_err() {
                tracing::error!("the vCPU thread panicked; the VM is stopped regardless");
            }
        }
        let mut ctl = lock(&self.sh.ctl);
        if !matches!(ctl.state, RunState::Stopped(_)) {
            ctl.state = RunState::Stopped(StopReason::Requested);
        }
        ctl.state.clone()
    }

    /// Wait until the VM stops on its own (guest exit or error).
    pub fn wait_stopped(&self, timeout: Duration) -> Result<StopReason> {
        let deadline = Instant::now() + timeout;
        let mut ctl = lock(&self.sh.ctl);
        loop {
            if let RunState::Stopped(r) = &ctl.state {
                return Ok(r.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(timeout, "the VM to stop"));
            }
            ctl = self.sh.wait_timeout(ctl, deadline - now);
        }
    }

    /// Exit and log counters, for status monitoring.
    pub fn stats(&self) -> VmStats {
        let e = &self.sh.exits;
        VmStats {
            pio_exits: e.pio.load(Ordering::Relaxed),
            mmio_exits: e.mmio.load(Ordering::Relaxed),
            idle_exits: e.idle.load(Ordering::Relaxed),
            interrupted: e.interrupted.load(Ordering::Relaxed),
            logs: lock(&self.sh.ctl).logs,
            guest_resident_bytes: self.guest_resident_bytes(),
        }
    }

    /// Guest RAM pages currently backed on the host (mincore), in bytes.
    /// A region whose residency cannot be read counts as 0 (this is a
    /// status figure, not something a decision rests on).
    pub fn guest_resident_bytes(&self) -> u64 {
        self.sh
            .mem
            .iter()
            .map(|r| {
                let Ok(host) = self.sh.mem.get_host_address(r.start_addr()) else {
                    return 0;
                };
                let len = r.len() as usize;
                let pages = len.div_ceil(4096);
                let mut v = vec![0u8; pages];
                // SAFETY: host..host+len is our mapping; v has one byte per page.
                let rc = unsafe { libc::mincore(host as *mut libc::c_void, len, v.as_mut_ptr()) };
                if rc != 0 {
                    return 0;
                }
                v.iter().filter(|b| *b & 1 == 1).count() as u64 * 4096
            })
            .sum()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if lock(&self.thread).is_some() {
            self.shutdown();
        }
    }
}
