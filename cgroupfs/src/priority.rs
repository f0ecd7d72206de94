//! The CPU priority of one thread: the thread-level counterpart of a
//! cgroup's CPU weight. A thread that must keep its deadlines while the
//! host is loaded (a card's firmware threads, the governor's placement
//! loop) raises its own nice value; processes and threads it starts begin
//! at the default priority again (SCHED_RESET_ON_FORK), so a VM it spawns
//! does not inherit the raise.

/// The nice value such threads take (on Linux nice is per thread).
pub const RAISED_NICE: i32 = -10;

/// Raise the calling thread to `RAISED_NICE`, reset on fork. Needs
/// CAP_SYS_NICE; without it the error says so and the thread runs on at
/// its priority.
pub fn raise_this_thread() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: both calls take plain values and act on the calling thread
    // (pid 0 for sched_setscheduler; who 0 with PRIO_PROCESS is the
    // calling thread on Linux).
    unsafe {
        if libc::sched_setscheduler(0, libc::SCHED_OTHER | libc::SCHED_RESET_ON_FORK, &param) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::setpriority(libc::PRIO_PROCESS, 0, RAISED_NICE) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_raised_thread_runs_at_the_raised_nice_and_its_threads_do_not() {
        let (me, child) = std::thread::spawn(|| {
            let raised = super::raise_this_thread();
            // SAFETY: getpriority reads the calling thread's nice value.
            let nice = || unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            let child = std::thread::spawn(nice).join().unwrap();
            (raised.map(|()| nice()), child)
        })
        .join()
        .unwrap();
        match me {
            Ok(n) => {
                assert_eq!(n, super::RAISED_NICE);
                assert_eq!(child, 0, "a thread it starts begins at the default priority");
            }
            // Unprivileged (a developer's machine): the error says so.
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}"),
        }
    }
}
