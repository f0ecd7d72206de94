//! The vCPU thread: its run loop, the pause protocol and the kick signal
//! that gets it out of KVM_RUN. Exits are handled on this thread by
//! [`super::bus`]; callers on other threads only flip flags in `Ctl` and
//! kick.

use std::sync::atomic::Ordering;
use std::sync::Once;

use super::bus::{handle_exit, Next};
use super::shared::{lock, Shared};
use super::RunState;
use crate::error::StopReason;

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

pub(super) fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // An empty handler: delivery alone makes KVM_RUN return EINTR.
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler) {
            tracing::error!(error = %e, "cannot install the vCPU kick signal handler: pausing and stopping a running guest will time out");
        }
    });
}

/// Kick the vCPU thread `tid` out of KVM_RUN.
pub(super) fn kick(tid: libc::pthread_t) {
    // SAFETY: callers pass our vCPU thread's id while it is alive (state
    // Running, before the thread clears `tid` on its way out).
    let rc = unsafe { libc::pthread_kill(tid, kick_signal()) };
    if rc != 0 {
        tracing::warn!(errno = rc, "cannot kick the vCPU thread");
    }
}

/// Body of the vCPU thread.
pub(super) fn vcpu_loop(sh: &Shared) {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t;
    {
        let mut ctl = lock(&sh.ctl);
        ctl.os_tid = Some(tid);
        // SAFETY: pthread_self has no preconditions.
        ctl.tid = Some(unsafe { libc::pthread_self() });
        sh.cv.notify_all();
    }
    let reason = run(sh);
    sh.set_stopped(reason);
}

fn run(sh: &Shared) -> StopReason {
    let mut vcpu = lock(&sh.vcpu);
    loop {
        {
            let ctl = lock(&sh.ctl);
            if let Some(r) = ctl.stop_req.clone() {
                return r;
            }
            if ctl.pause_req {
                drop(ctl);
                // Complete any I/O the last exit left half done (the data of
                // an IN or MMIO read reaches the guest only on the next
                // KVM_RUN), so the saved registers are consistent. With
                // immediate_exit set this KVM_RUN returns EINTR by design:
                // its result says nothing.
                vcpu.set_kvm_immediate_exit(1);
                let _ = vcpu.run();
                vcpu.set_kvm_immediate_exit(0);
                drop(vcpu);
                let mut ctl = lock(&sh.ctl);
                ctl.state = RunState::Paused;
                sh.cv.notify_all();
                while ctl.pause_req && ctl.stop_req.is_none() {
                    ctl = sh.wait(ctl);
                }
                if let Some(r) = ctl.stop_req.clone() {
                    return r;
                }
                ctl.state = RunState::Running;
                sh.cv.notify_all();
                drop(ctl);
                vcpu = lock(&sh.vcpu);
                continue;
            }
        }
        let next = match vcpu.run() {
            Ok(exit) => handle_exit(sh, exit),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                sh.exits.interrupted.fetch_add(1, Ordering::Relaxed);
                Next::Continue
            }
            Err(e) => Next::Stop(StopReason::Run(e.to_string())),
        };
        match next {
            Next::Continue => {}
            Next::Idle => {
                sh.exits.idle.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = lock(&sh.dev).console.push_request(&sh.mem, None) {
                    return StopReason::Device(e.to_string());
                }
                sh.idle();
            }
            Next::Stop(StopReason::TripleFault { .. }) => {
                // The shutdown exit carries no state: read where it happened.
                let rip = match vcpu.get_regs() {
                    Ok(r) => r.rip,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the registers after a triple fault; reporting rip 0");
                        0
                    }
                };
                return StopReason::TripleFault { rip };
            }
            Next::Stop(r) => return r,
        }
    }
}
