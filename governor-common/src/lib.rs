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

impl CgroupStats {
    /// Add the scheduler counters of `o` (CPU time, switches, run-queue
    /// delay and its histogram): what a CPU gathers between flushes.
    /// Page faults and OOM kills are counted directly in the map.
    #[inline(always)]
    pub fn add_sched(&mut self, o: &CgroupStats) {
        self.on_cpu_ns += o.on_cpu_ns;
        self.switches += o.switches;
        self.runq_delay_ns += o.runq_delay_ns;
        self.runq_count += o.runq_count;
        let mut i = 0;
        while i < DELAY_BUCKETS {
            self.runq_hist[i] += o.runq_hist[i];
            i += 1;
        }
    }

    /// Add every counter of `o` (summing CPUs, or a VM's cgroups).
    #[inline(always)]
    pub fn add(&mut self, o: &CgroupStats) {
        self.add_sched(o);
        self.page_faults += o.page_faults;
        self.oom_kills += o.oom_kills;
    }
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
    /// Tasks found on this CPU that sched_switch did not see come in (at
    /// their switch-out or a `cpu_tick`): their slice is charged from the
    /// scheduler's own mark of its start instead (see `on_switch`).
    pub unseen_switch_ins: u64,
    /// Flushes the map refused (no entry could be made for the cgroup):
    /// that CPU's gathered counters are dropped, not given to another.
    pub failed_flushes: u64,
}

impl CpuState {
    /// What this CPU gathered and has not yet added into `CGROUPS`, and for
    /// which cgroup. Readers add it to that cgroup's total so a reading is
    /// exact at any moment, not up to a tick (or, on a CPU that only
    /// switches between one cgroup and idle, until the next tick) behind.
    /// Read `CGROUPS` first, then this: a flush in between leaves the sum
    /// short for one reading, never counted twice, so totals never go back.
    pub fn pending(&self) -> Option<(u64, &CgroupStats)> {
        (self.acc_cgroup != 0).then_some((self.acc_cgroup, &self.acc))
    }
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

impl NetStats {
    #[inline(always)]
    pub fn add(&mut self, o: &NetStats) {
        self.rx_bytes += o.rx_bytes;
        self.rx_packets += o.rx_packets;
        self.tx_bytes += o.tx_bytes;
        self.tx_packets += o.tx_packets;
    }
}

/// The value of the `NET` map: an interface's counters on one CPU, and the
/// QoS slot of the VM it belongs to (`slot + 1`; 0 = none), which user
/// space writes to every CPU's copy before it attaches the tc programs.
/// Carrying the slot here saves the tc program a second hash lookup per
/// packet (a map of ifindex -> slot cost ~680 ns of a cold packet's ~4 us,
/// bench qos).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetEntry {
    pub stats: NetStats,
    pub qos_slot: u32,
    pub _pad: u32,
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
    /// The token buckets, apart from `lock`: the tc program updates them
    /// through a `&mut Bucket` while other CPUs spin on the lock word, so
    /// the two must not overlap.
    pub bucket: Bucket,
    /// shape: TC_H_MAKE(major << 16, minor) for skb->priority.
    pub classid: u32,
    /// shape, traffic from the VM: ifindex of the IFB device.
    pub redirect_ifindex: u32,
}

/// The byte and packet token buckets of a [`Policer`], as time credit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Bucket {
    /// Bucket depth: the burst in bytes, as ns at the rate.
    pub burst_ns: u64,
    /// Credit in ns at the rate; may go one packet below zero.
    pub tokens_ns: i64,
    pub last_ns: u64,
    /// ns of credit one packet costs (1e9 / packet rate); 0 = no limit.
    pub pkt_cost_ns: u64,
    pub pkt_burst_ns: u64,
    pub pkt_tokens_ns: i64,
}

/// A token bucket's credit after `elapsed_ns` of refill, capped at its
/// depth. Credit is time at the bucket's rate, so nothing is lost to
/// rounding; it may be negative (one packet paid in advance).
#[inline(always)]
pub fn refill(tokens_ns: i64, elapsed_ns: u64, depth_ns: u64) -> i64 {
    let elapsed = if elapsed_ns > i64::MAX as u64 { i64::MAX } else { elapsed_ns as i64 };
    let depth = if depth_ns > i64::MAX as u64 { i64::MAX } else { depth_ns as i64 };
    let t = tokens_ns.saturating_add(elapsed);
    if t > depth {
        depth
    } else {
        t
    }
}

impl Bucket {
    /// Police one packet costing `cost_ns` of byte credit and
    /// `pkt_cost_ns` of packet credit at time `now_ns`; true = pass. The
    /// kernel calls this under the value's spin lock (it is inlined: no
    /// calls are allowed there). A packet is admitted while any credit is
    /// left and then paid in full, so credit may go one packet negative:
    /// the long-run rate is the same (refill is capped at the burst), but
    /// a 64 KiB GSO packet is not dropped merely for being larger than the
    /// credit left, which is what makes a policer brutal to TCP.
    #[inline(always)]
    pub fn admit(&mut self, now_ns: u64, cost_ns: u64, pkt_cost_ns: u64) -> bool {
        // `now` may have been read before another CPU took the lock and
        // wrote a later time: time never runs back here, or the same
        // stretch would be credited twice.
        let mut elapsed = 0;
        if now_ns > self.last_ns {
            elapsed = now_ns - self.last_ns;
            self.last_ns = now_ns;
        }
        let mut t = refill(self.tokens_ns, elapsed, self.burst_ns);
        let mut pt = refill(self.pkt_tokens_ns, elapsed, self.pkt_burst_ns);
        let pass = t > 0 && (pkt_cost_ns == 0 || pt > 0);
        if pass {
            t = t.saturating_sub(cost_ns as i64);
            pt = pt.saturating_sub(pkt_cost_ns as i64);
        }
        self.tokens_ns = t;
        self.pkt_tokens_ns = pt;
        pass
    }

    /// The byte credit the kernel would see at `now_ns` (what was stored
    /// plus the refill since the last packet, up to the burst).
    pub fn credit_ns(&self, now_ns: u64) -> i64 {
        refill(self.tokens_ns, now_ns.saturating_sub(self.last_ns), self.burst_ns)
    }
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

impl QosStats {
    #[inline(always)]
    pub fn add(&mut self, o: &QosStats) {
        self.passed_bytes += o.passed_bytes;
        self.passed_packets += o.passed_packets;
        self.dropped_bytes += o.dropped_bytes;
        self.dropped_packets += o.dropped_packets;
    }
}

/// Maps of the kernel programs, by name; pinned under the pin directory.
pub mod maps {
    pub const QOS: &str = "QOS";
    pub const QOS_STATS: &str = "QOS_STATS";
    pub const CGROUPS: &str = "CGROUPS";
    pub const NET: &str = "NET";
    pub const CPU_STATE: &str = "CPU_STATE";
    pub const OOM_EVENTS: &str = "OOM_EVENTS";
    /// Every map, as pinned.
    pub const ALL: &[&str] = &[CGROUPS, NET, CPU_STATE, OOM_EVENTS, QOS, QOS_STATS];
    /// Maps earlier builds pinned and this one does not have (removed with
    /// the others when pins are cleared): `VM_OF_IF` (ifindex -> slot,
    /// now in `NET`).
    pub const RETIRED: &[&str] = &["VM_OF_IF"];
}

/// Maximum number of cgroups and interfaces tracked at once.
pub const MAX_CGROUPS: usize = 16384;
pub const MAX_IFACES: usize = 4096;
/// Bucket index of a delay in nanoseconds: bucket b >= 1 holds delays of
/// [2^b, 2^(b+1)) whole microseconds, bucket 0 less than 2 us, the last
/// bucket everything above. Found by a binary search over the thresholds
/// `1000 << b` (five compares, unrolled): the kernel program runs this on
/// every context switch, and BPF has no bit-scan instruction (LLVM emits
/// ~20 instructions for leading_zeros) and a 64-bit division costs tens
/// of cycles. The same as `floor(log2(ns / 1000))`, capped (a test checks).
#[inline(always)]
pub fn delay_bucket(delay_ns: u64) -> usize {
    const _: () = assert!(DELAY_BUCKETS == 32, "the search below covers 0..=31");
    let mut b = 0usize;
    let mut step = 16usize;
    while step > 0 {
        if delay_ns >= 1000u64 << (b + step) {
            b += step;
        }
        step /= 2;
    }
    b
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all fields are plain integers with no padding holes that
    // matter (explicit _pad fields), valid for any bit pattern.
    unsafe impl aya::Pod for super::CgroupStats {}
    unsafe impl aya::Pod for super::NetStats {}
    unsafe impl aya::Pod for super::NetEntry {}
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
        // Against the definition, at every bucket edge and between.
        let by_log2 = |ns: u64| {
            let us = ns / 1000;
            if us < 2 {
                0
            } else {
                ((63 - us.leading_zeros()) as usize).min(DELAY_BUCKETS - 1)
            }
        };
        for b in 0..40u32 {
            let edge = 1000u64.saturating_mul(1u64 << b.min(53));
            for ns in [edge.saturating_sub(1), edge, edge + 1, edge.saturating_mul(3) / 2] {
                assert_eq!(delay_bucket(ns), by_log2(ns), "{ns} ns");
            }
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let ns = x >> (x % 64);
            assert_eq!(delay_bucket(ns), by_log2(ns), "{ns} ns");
        }
    }

    #[test]
    fn cgroup_sums() {
        let mut h = [0u64; DELAY_BUCKETS];
        h[3] = 2;
        let a = CgroupStats {
            on_cpu_ns: 5,
            switches: 1,
            runq_delay_ns: 7,
            runq_count: 1,
            page_faults: 3,
            oom_kills: 1,
            runq_hist: h,
        };
        let mut s = CgroupStats::default();
        s.add_sched(&a);
        assert_eq!((s.on_cpu_ns, s.switches, s.runq_delay_ns, s.runq_count, s.runq_hist[3]), (5, 1, 7, 1, 2));
        assert_eq!((s.page_faults, s.oom_kills), (0, 0), "not scheduler counters");
        s.add(&a);
        assert_eq!((s.on_cpu_ns, s.page_faults, s.oom_kills, s.runq_hist[3]), (10, 3, 1, 4));
    }

    #[test]
    fn refill_caps_and_saturates() {
        assert_eq!(refill(10, 5, 100), 15);
        assert_eq!(refill(90, 50, 100), 100, "capped at the depth");
        assert_eq!(refill(-40, 10, 100), -30, "debt is paid back first");
        assert_eq!(refill(i64::MAX - 1, u64::MAX, u64::MAX), i64::MAX, "no overflow");
    }

    fn bucket(burst_ns: u64) -> Bucket {
        Bucket { burst_ns, tokens_ns: burst_ns as i64, last_ns: 1000, ..Bucket::default() }
    }

    #[test]
    fn admit_pays_in_full_and_goes_one_packet_negative() {
        let mut p = bucket(1_000_000); // 1 ms of burst (1000 bytes at 1 MB/s)
        assert!(p.admit(1000, 64_000_000, 0), "a 64 KB packet passes on any credit");
        assert_eq!(p.tokens_ns, 1_000_000 - 64_000_000);
        assert!(!p.admit(2000, 1_000_000, 0), "no credit: dropped, nothing paid");
        assert_eq!(p.tokens_ns, 1_000_000 - 64_000_000 + 1000);
        // 63 ms later the debt is paid and credit is back.
        assert!(p.admit(2000 + 63_000_000, 1000, 0));
    }

    #[test]
    fn admit_never_runs_time_back() {
        let mut p = bucket(10_000_000);
        p.tokens_ns = 0;
        assert!(!p.admit(500, 1, 0), "an older clock reading gives no credit");
        assert_eq!(p.last_ns, 1000, "and does not move the clock back");
        assert!(p.admit(1001, 1, 0));
    }

    #[test]
    fn packet_rate_is_a_second_bucket() {
        let mut p = bucket(1_000_000_000);
        p.pkt_burst_ns = 2_000;
        p.pkt_tokens_ns = 2_000;
        assert!(p.admit(1000, 1, 1_000));
        assert!(p.admit(1000, 1, 1_000));
        assert!(!p.admit(1000, 1, 1_000), "two packets of burst");
        assert_eq!(p.credit_ns(1000), 1_000_000_000 - 2, "byte credit as the kernel sees it");
    }
}
