//! Types shared by the kernel programs (governor-ebpf) and the governor.
//!
//! Every map value is `#[repr(C)]` with only fixed-size integer fields, so
//! the kernel side can write it, user space can read it byte for byte, and
//! the BTF emitted for it lets `bpftool map dump` print field names.
#![no_std]

/// Number of log2 buckets in the run-queue delay histogram.
/// Bucket `i` counts delays in `[2^i, 2^(i+1))` microseconds; bucket 0 also
/// holds everything under 2 µs. 32 buckets reach past an hour.
pub const DELAY_BUCKETS: usize = 32;

/// Per-cgroup counters, kept per CPU (a per-CPU hash keyed by cgroup v2 id),
/// so the hot path needs no atomics; user space sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// Nanoseconds tasks of this cgroup spent on a CPU, charged at each
    /// `sched_switch` to the task leaving the CPU.
    pub on_cpu_ns: u64,
    /// Context switches away from tasks of this cgroup.
    pub switches: u64,
    /// Sum of run-queue delays (wakeup or preemption -> on CPU), ns.
    pub runq_delay_ns: u64,
    /// Number of delays summed in `runq_delay_ns`.
    pub runq_count: u64,
    /// User-mode page faults (`exceptions:page_fault_user`).
    pub page_faults: u64,
    /// OOM victims chosen while a task of this cgroup was allocating.
    pub oom_kills: u64,
    /// log2 histogram of run-queue delay in µs, see [`DELAY_BUCKETS`].
    pub runq_hist: [u64; DELAY_BUCKETS],
}

/// Per-CPU scheduler state of the accounting program (a one-slot per-CPU
/// array): when the current slice began, and the run-queue delay of the task
/// now on the CPU, charged to its cgroup when it leaves the CPU (only then is
/// its cgroup `current`, with no need to read task_struct).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuState {
    pub slice_start_ns: u64,
    pub pending_delay_ns: u64,
    pub pending_pid: u32,
    pub _pad: u32,
}

/// Per-interface traffic counters, kept per CPU and keyed by ifindex.
/// Direction is the interface's own (as `ip -s link` shows it): `rx` is what
/// the interface received (tc ingress), `tx` what it sent (tc egress).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
}

/// An OOM victim, sent through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OomEvent {
    /// Victim pid.
    pub pid: u32,
    pub _pad: u32,
    /// cgroup v2 id of the task that was allocating when the OOM killer chose.
    pub cgroup_id: u64,
    pub total_vm_kb: u64,
    pub anon_rss_kb: u64,
    /// Victim command name, NUL padded.
    pub comm: [u8; 16],
}

/// Maps of the kernel programs, by name; pinned under the pin directory.
pub mod maps {
    pub const CGROUPS: &str = "CGROUPS";
    pub const NET: &str = "NET";
    pub const WAKEUPS: &str = "WAKEUPS";
    pub const CPU_STATE: &str = "CPU_STATE";
    pub const OOM_EVENTS: &str = "OOM_EVENTS";
}

/// Maximum number of cgroups and interfaces tracked at once.
pub const MAX_CGROUPS: usize = 16384;
pub const MAX_IFACES: usize = 4096;
/// Slots of the "runnable since" array (a power of two; indexed by pid
/// modulo this).
pub const WAITING_SLOTS: usize = 1 << 18;

/// Bucket index of a delay in nanoseconds.
#[inline(always)]
pub fn delay_bucket(delay_ns: u64) -> usize {
    let us = delay_ns / 1000;
    if us < 2 {
        return 0;
    }
    let b = 63 - us.leading_zeros() as usize;
    if b >= DELAY_BUCKETS {
        DELAY_BUCKETS - 1
    } else {
        b
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all fields are plain integers with no padding holes that
    // matter (explicit _pad fields), valid for any bit pattern.
    unsafe impl aya::Pod for super::CgroupStats {}
    unsafe impl aya::Pod for super::NetStats {}
    unsafe impl aya::Pod for super::OomEvent {}
    unsafe impl aya::Pod for super::CpuState {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets() {
        assert_eq!(delay_bucket(0), 0);
        assert_eq!(delay_bucket(1_999), 0);
        assert_eq!(delay_bucket(2_000), 1);
        assert_eq!(delay_bucket(3_999), 1);
        assert_eq!(delay_bucket(4_000), 2);
        assert_eq!(delay_bucket(1_000_000), 9); // 1 ms = 1000 µs, 2^9 = 512
        assert_eq!(delay_bucket(u64::MAX), DELAY_BUCKETS - 1);
    }
}
