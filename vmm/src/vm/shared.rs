//! The state one VM's handle and its vCPU thread share, and the few
//! operations on it both sides need (stop requests, reply delivery, the idle
//! park). Everything sits behind short-lived mutexes and one condition
//! variable; the vCPU thread never holds `ctl` across KVM_RUN.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::atomic::AtomicU64;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;

use super::vcpu::kick;
use super::{Reply, RunState};
use crate::devices::serial::Serial;
use crate::devices::virtio::Console;
use crate::error::StopReason;
use crate::proto::{self, word};
use crate::sink::Sink;

/// How long an idle vCPU parks before looking at the rings again.
const IDLE_PARK: Duration = Duration::from_millis(100);

pub(super) struct Ctl {
    pub(super) state: RunState,
    pub(super) pause_req: bool,
    pub(super) stop_req: Option<StopReason>,
    /// Set when a request was queued, so an idle vCPU goes back to the guest.
    pub(super) wake: bool,
    pub(super) tid: Option<libc::pthread_t>,
    /// Kernel thread id of the vCPU thread (for cgroup placement).
    pub(super) os_tid: Option<libc::pid_t>,
    pub(super) replies: HashMap<u64, Reply>,
    /// Request ids someone waits for; other replies are dropped.
    pub(super) waiting: HashSet<u64>,
    pub(super) ready_at: Option<Instant>,
    pub(super) last_log: Option<Reply>,
    pub(super) logs: u64,
}

impl Ctl {
    pub(super) fn new(ready_at: Option<Instant>) -> Ctl {
        Ctl {
            state: RunState::Created,
            pause_req: false,
            stop_req: None,
            wake: false,
            tid: None,
            os_tid: None,
            replies: HashMap::new(),
            waiting: HashSet::new(),
            ready_at,
            last_log: None,
            logs: 0,
        }
    }
}

pub(super) struct Devices {
    pub(super) serial: Serial,
    pub(super) console: Console,
}

/// vCPU exits by kind, for status monitoring.
#[derive(Default)]
pub(super) struct ExitCounters {
    pub(super) pio: AtomicU64,
    pub(super) mmio: AtomicU64,
    pub(super) idle: AtomicU64,
    pub(super) interrupted: AtomicU64,
}

pub(super) struct Shared {
    pub(super) mem: GuestMemoryMmap,
    pub(super) vm: VmFd,
    pub(super) vcpu: Mutex<VcpuFd>,
    pub(super) dev: Mutex<Devices>,
    pub(super) ctl: Mutex<Ctl>,
    pub(super) cv: Condvar,
    pub(super) log: Mutex<Option<Sink>>,
    pub(super) exits: ExitCounters,
}

/// Take a lock even if a thread panicked while holding it: the state
/// behind our mutexes stays consistent field by field.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub(super) fn new(
        mem: GuestMemoryMmap,
        vm: VmFd,
        vcpu: VcpuFd,
        dev: Devices,
        log: Option<Box<dyn Write + Send>>,
        ready_at: Option<Instant>,
    ) -> Shared {
        Shared {
            mem,
            vm,
            vcpu: Mutex::new(vcpu),
            dev: Mutex::new(dev),
            ctl: Mutex::new(Ctl::new(ready_at)),
            cv: Condvar::new(),
            log: Mutex::new(log.map(|l| Sink::new(l, "agent log"))),
            exits: ExitCounters::default(),
        }
    }

    /// Wait on the condition variable, at most `timeout`.
    pub(super) fn wait_timeout<'a>(&self, ctl: MutexGuard<'a, Ctl>, timeout: Duration) -> MutexGuard<'a, Ctl> {
        self.cv.wait_timeout(ctl, timeout).unwrap_or_else(|p| p.into_inner()).0
    }

    pub(super) fn wait<'a>(&self, ctl: MutexGuard<'a, Ctl>) -> MutexGuard<'a, Ctl> {
        self.cv.wait(ctl).unwrap_or_else(|p| p.into_inner())
    }

    /// Ask the vCPU thread to stop with `reason` (first reason wins).
    pub(super) fn fail(&self, reason: StopReason) {
        let mut ctl = lock(&self.ctl);
        if ctl.stop_req.is_none() {
            ctl.stop_req = Some(reason);
        }
        self.cv.notify_all();
        if ctl.state == RunState::Running {
            if let Some(tid) = ctl.tid {
                kick(tid);
            }
        }
    }

    pub(super) fn set_stopped(&self, reason: StopReason) {
        let mut ctl = lock(&self.ctl);
        ctl.state = RunState::Stopped(reason);
        ctl.tid = None;
        self.cv.notify_all();
    }

    /// Frames the guest posted on the transmit queue: replies go to their
    /// waiters, log records to the log sink.
    pub(super) fn deliver(&self, frames: Vec<[u8; proto::FRAME_LEN]>) {
        if frames.is_empty() {
            return;
        }
        let mut ctl = lock(&self.ctl);
        let mut log = lock(&self.log);
        for f in &frames {
            let w = proto::decode(f);
            let r = Reply::from_words(&w);
            match w[word::KIND] {
                // Replies nobody waits for (timed out) are dropped.
                proto::KIND_RESPONSE if ctl.waiting.contains(&r.id) => {
                    ctl.replies.insert(r.id, r);
                }
                proto::KIND_LOG => {
                    ctl.last_log = Some(r);
                    ctl.logs += 1;
                    if let Some(out) = log.as_mut() {
                        out.attempt(|w| {
                            writeln!(
                                w,
                                "{{\"seq\":{},\"work\":{},\"steps\":{},\"value\":{}}}",
                                r.log_seq, r.work, r.steps, r.value
                            )
                        });
                    }
                }
                _ => {}
            }
        }
        if let Some(out) = log.as_mut() {
            out.attempt(|w| w.flush());
        }
        drop(log);
        self.cv.notify_all();
    }

    /// Idle port: park until a request is queued, a pause/stop is asked, or
    /// a short timeout passes.
    pub(super) fn idle(&self) {
        let mut ctl = lock(&self.ctl);
        if !ctl.wake && !ctl.pause_req && ctl.stop_req.is_none() {
            ctl = self.wait_timeout(ctl, IDLE_PARK);
        }
        ctl.wake = false;
    }
}
