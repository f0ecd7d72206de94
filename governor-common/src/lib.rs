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
/// array): when the current slice began, and the kernel's run-delay total
/// of the task now on the CPU as it was when the task got the CPU; the
/// difference at its switch-out is the wait that ended at its switch-in,
/// charged to its cgroup then (only then is its cgroup `current`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuState {
    pub slice_start_ns: u64,
    pub run_delay_at_switch_in: u64,
    /// Address of the task_struct that got the CPU at the last switch.
    pub task_at_switch_in: u64,
    /// The cgroup whose scheduler counters are gathered in `acc` on this
    /// CPU; added into `CGROUPS` when another cgroup runs and at every
    /// `cpu_tick` (so readers lag at most 10 ms), which spares the hash
    /// lookup on the many switches between tasks of one cgroup or idle.
    pub acc_cgroup: u64,
    pub acc: CgroupStats,
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

/// The kernel's `struct bpf_spin_lock`; the verifier finds it in a map
/// value by this exact BTF name.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct bpf_spin_lock {
    pub val: u32,
}

/// QoS directions, as the VM sees them. The watched interface is the host
/// side of the VM's NIC: what the VM sends arrives at tc ingress.
pub const DIR_FROM_VM: u32 = 0;
pub const DIR_TO_VM: u32 = 1;

pub const QOS_OFF: u32 = 0;
pub const QOS_POLICE: u32 = 1;
pub const QOS_SHAPE: u32 = 2;

/// Most VMs with a QoS slot at once; slot `vm * 2 + direction` of `QOS`.
pub const MAX_QOS_VMS: usize = 1024;

/// One direction of one VM's limit. In `police` mode a token bucket kept as
/// time credit (ns at the configured rate, so no precision is lost to
/// integer bytes); in `shape` mode the class to put packets in (and, for
/// traffic from the VM, the IFB device to redirect it to for shaping).
/// Updated by user space with BPF_F_LOCK, so a rate change is atomic.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Policer {
    pub lock: bpf_spin_lock,
    pub mode: u32,
    /// Bytes per second; 0 = no byte limit.
    pub rate_bytes_per_s: u64,
    /// Bucket depth: the burst in bytes, as ns at `rate`.
    pub burst_ns: u64,
    /// Credit in ns at `rate`; may go one packet below zero.
    pub tokens_ns: i64,
    pub last_ns: u64,
    /// ns of credit one packet costs (1e9 / packet rate); 0 = no limit.
    pub pkt_cost_ns: u64,
    pub pkt_burst_ns: u64,
    pub pkt_tokens_ns: i64,
    /// shape: TC_H_MAKE(major << 16, minor) for skb->priority.
    pub classid: u32,
    /// shape, traffic from the VM: ifindex of the IFB device.
    pub redirect_ifindex: u32,
}

/// Per-CPU QoS counters of one VM direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QosStats {
    pub passed_bytes: u64,
    pub passed_packets: u64,
    pub dropped_bytes: u64,
    pub dropped_packets: u64,
}

/// Maps of the kernel programs, by name; pinned under the pin directory.
pub mod maps {
    pub const QOS: &str = "QOS";
    pub const QOS_STATS: &str = "QOS_STATS";
    pub const VM_OF_IF: &str = "VM_OF_IF";
    pub const CGROUPS: &str = "CGROUPS";
    pub const NET: &str = "NET";
    pub const CPU_STATE: &str = "CPU_STATE";
    pub const OOM_EVENTS: &str = "OOM_EVENTS";
    /// Every map, as pinned.
    pub const ALL: &[&str] = &[CGROUPS, NET, CPU_STATE, OOM_EVENTS, QOS, QOS_STATS, VM_OF_IF];
}

/// Maximum number of cgroups and interfaces tracked at once.
pub const MAX_CGROUPS: usize = 16384;
pub const MAX_IFACES: usize = 4096;
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
    unsafe impl aya::Pod for super::Policer {}
    unsafe impl aya::Pod for super::QosStats {}
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
