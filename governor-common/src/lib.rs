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
    /// CPU; added into its VM's slot of `VM_STATS` (a cgroup of no VM: into
    /// `CGROUPS`) when another cgroup runs and at every `cpu_tick` (so
    /// readers lag at most 10 ms), which spares the hash lookup on the many
    /// switches between tasks of one cgroup or idle.
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
    /// What this CPU gathered and has not yet added into `VM_STATS` or
    /// `CGROUPS`, and for which cgroup. Readers add it to that cgroup's total so a reading is
    /// exact at any moment, not up to a tick (or, on a CPU that only
    /// switches between one cgroup and idle, until the next tick) behind.
    /// Read the counters first, then this: a flush in between leaves the sum
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
    /// Count one packet of `len` bytes: received by the interface
    /// (`ingress`) or sent by it.
    #[inline(always)]
    pub fn count(&mut self, ingress: bool, len: u64) {
        if ingress {
            self.rx_bytes += len;
            self.rx_packets += 1;
        } else {
            self.tx_bytes += len;
            self.tx_packets += 1;
        }
    }

    #[inline(always)]
    pub fn add(&mut self, o: &NetStats) {
        self.rx_bytes += o.rx_bytes;
        self.rx_packets += o.rx_packets;
        self.tx_bytes += o.tx_bytes;
        self.tx_packets += o.tx_packets;
    }
}

/// The value of the `NET` map: an interface's counters on one CPU, and the
/// slot of the VM it belongs to (`slot + 1`; 0 = none), which user space
/// writes to every CPU's copy before it attaches the tc programs. The
/// slot picks the VM's QoS limits, and its packets are counted in the VM's
/// [`VmCounters`] (`stats` then holds only what was counted before).
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

/// One VM's counters on one CPU: the value of the `VM_STATS` array, at
/// index `slot * NR_CPUS + cpu`. The programs add a VM's events here
/// directly (its cgroups are in `CG_SLOT`, its interfaces carry the slot
/// in `NET`), and the governor reads the array in place through a shared
/// mapping (`BPF_F_MMAPABLE`) instead of copying a per-CPU hash entry by
/// entry through bpf(2): at 1,000 VMs that copy was ~1.8 ms of a 3.8 ms
/// tick, summing in place ~0.03 ms. 384 bytes, a whole number of cache
/// lines, so no two CPUs' counters share one (the mapping is page aligned).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmCounters {
    pub cpu: CgroupStats,
    /// In the interfaces' own direction, as [`NetStats`].
    pub net: NetStats,
    /// The cgroup v2 id of the VM's own cgroup that holds this slot, in
    /// CPU 0's copy (written by the governor, never by the programs): how
    /// a restarted governor finds each VM's slot again.
    pub owner: u64,
    pub _pad: [u64; 5],
}

const _: () = assert!(core::mem::size_of::<VmCounters>().is_multiple_of(64), "whole cache lines per CPU");

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

/// QoS directions, as the VM sees them. The watched interface is the host
/// side of the VM's NIC: what the VM sends arrives at tc ingress.
pub const DIR_FROM_VM: u32 = 0;
pub const DIR_TO_VM: u32 = 1;

pub const QOS_OFF: u32 = 0;
pub const QOS_POLICE: u32 = 1;
pub const QOS_SHAPE: u32 = 2;

/// Most VMs with a QoS slot at once; slot `vm * 2 + direction` of `QOS`.
pub const MAX_QOS_VMS: usize = 1024;

/// One direction of one VM's limit. In `police` mode the byte and packet
/// buckets (GCRA, see [`Bucket`]); in `shape` mode the class to put packets
/// in (and, for traffic from the VM, the IFB device to redirect it to for
/// shaping). User space replaces the whole value when a limit changes; the
/// tc program reads each field with one aligned load (no tearing) and moves
/// only the two bucket words, each with one compare-and-exchange.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Policer {
    pub mode: u32,
    /// shape: TC_H_MAKE(major << 16, minor) for skb->priority.
    pub classid: u32,
    /// shape, traffic from the VM: ifindex of the IFB device.
    pub redirect_ifindex: u32,
    pub _pad: u32,
    /// Bytes per second (user space sets at least 1).
    pub rate_bytes_per_s: u64,
    pub bucket: Bucket,
}

/// The byte and packet buckets of a [`Policer`], each kept as one word:
/// its theoretical arrival time (GCRA, the "virtual scheduling" form of a
/// token bucket, ITU-T I.371): the CLOCK_MONOTONIC time at which
/// everything admitted so far is paid for at the rate. The credit at `now`
/// is the depth less what is still unpaid, `depth - (tat - now)`, or the
/// whole depth once `tat` is past. Credit is time at the bucket's rate, so
/// nothing is lost to integer bytes. One word per bucket is what lets the
/// tc program police on every CPU with a compare-and-exchange instead of a
/// spin lock (the lock was half the cost of a policed packet).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Bucket {
    /// Bucket depth: the burst in bytes, as ns at the rate.
    pub burst_ns: u64,
    /// The byte bucket's theoretical arrival time (ns, CLOCK_MONOTONIC).
    pub tat_ns: u64,
    /// ns of credit one packet costs (1e9 / packet rate); 0 = no limit.
    pub pkt_cost_ns: u64,
    pub pkt_burst_ns: u64,
    pub pkt_tat_ns: u64,
}

/// One GCRA step: a packet costing `cost_ns` arrives at `now_ns` at a
/// bucket whose theoretical arrival time is `tat_ns` and depth `depth_ns`.
/// Some(the new arrival time) if it passes, None if it is dropped (nothing
/// paid). A packet is admitted while any credit is left and then paid in
/// full, so credit may go one packet negative: the long-run rate is the
/// same (credit never exceeds the depth), but a 64 KiB GSO packet is not
/// dropped merely for being larger than the credit left, which is what
/// makes a policer brutal to TCP. A `now` read before another CPU moved
/// `tat` later is harmless: time is taken from the later of the two, so no
/// stretch is credited twice.
#[inline(always)]
pub fn conform(tat_ns: u64, now_ns: u64, depth_ns: u64, cost_ns: u64) -> Option<u64> {
    let base = if tat_ns > now_ns { tat_ns } else { now_ns };
    if base - now_ns >= depth_ns {
        None
    } else {
        Some(base.saturating_add(cost_ns))
    }
}

/// The credit (ns at the rate) of a bucket with arrival time `tat_ns` and
/// depth `depth_ns` at `now_ns`: negative while a packet is paid in
/// advance.
#[inline(always)]
pub fn credit(tat_ns: u64, now_ns: u64, depth_ns: u64) -> i64 {
    let unpaid = tat_ns.saturating_sub(now_ns);
    let clamp = |v: u64| if v > i64::MAX as u64 { i64::MAX } else { v as i64 };
    clamp(depth_ns) - clamp(unpaid)
}

impl Bucket {
    /// Police one packet costing `cost_ns` of byte credit and
    /// `pkt_cost_ns` of packet credit (0: no packet limit) at `now_ns`;
    /// true = pass. What the tc program does on one CPU (there each word
    /// moves by compare-and-exchange): the packet bucket is asked first,
    /// and a packet either bucket drops pays nothing.
    pub fn admit(&mut self, now_ns: u64, cost_ns: u64, pkt_cost_ns: u64) -> bool {
        let pkt = if pkt_cost_ns == 0 {
            None
        } else {
            match conform(self.pkt_tat_ns, now_ns, self.pkt_burst_ns, pkt_cost_ns) {
                Some(t) => Some(t),
                None => return false,
            }
        };
        let Some(t) = conform(self.tat_ns, now_ns, self.burst_ns, cost_ns) else { return false };
        self.tat_ns = t;
        if let Some(p) = pkt {
            self.pkt_tat_ns = p;
        }
        true
    }

    /// The byte credit the kernel would see at `now_ns`.
    pub fn credit_ns(&self, now_ns: u64) -> i64 {
        credit(self.tat_ns, now_ns, self.burst_ns)
    }

    /// The arrival time that leaves `credit_ns` of byte credit at `now_ns`
    /// (at most the depth: a bucket holds no more).
    pub fn tat_for_credit(&self, now_ns: u64, credit_ns: i64) -> u64 {
        let credit = credit_ns.min(self.burst_ns.min(i64::MAX as u64) as i64);
        let unpaid = (self.burst_ns as i128 - credit as i128).max(0);
        (now_ns as i128 + unpaid).min(u64::MAX as i128) as u64
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
    pub const VM_STATS: &str = "VM_STATS";
    pub const CG_SLOT: &str = "CG_SLOT";
    /// Every map, as pinned.
    pub const ALL: &[&str] = &[CGROUPS, NET, CPU_STATE, OOM_EVENTS, QOS, QOS_STATS, VM_STATS, CG_SLOT];
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
    unsafe impl aya::Pod for super::VmCounters {}
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
    fn a_packet_counts_in_its_direction() {
        let mut n = NetStats::default();
        n.count(true, 100);
        n.count(false, 7);
        n.count(false, 3);
        assert_eq!(n, NetStats { rx_bytes: 100, rx_packets: 1, tx_bytes: 10, tx_packets: 2 });
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
    fn conform_admits_on_any_credit_and_never_runs_time_back() {
        assert_eq!(conform(0, 1000, 100, 30), Some(1030), "an idle bucket starts from now");
        assert_eq!(conform(1050, 1000, 100, 30), Some(1080), "credit 50 left: pass, pay from the arrival time");
        assert_eq!(conform(1100, 1000, 100, 30), None, "no credit left: dropped");
        assert_eq!(conform(1099, 1000, 100, 500), Some(1599), "one ns of credit admits a large packet");
        assert_eq!(conform(u64::MAX - 1, 0, u64::MAX, 10), Some(u64::MAX), "no overflow");
        // A `now` older than the arrival time another CPU wrote: the later one counts.
        assert_eq!(conform(2000, 1000, 5000, 1), Some(2001));
    }

    #[test]
    fn credit_is_depth_less_unpaid() {
        assert_eq!(credit(0, 1000, 100), 100, "capped at the depth");
        assert_eq!(credit(1040, 1000, 100), 60);
        assert_eq!(credit(1500, 1000, 100), -400, "a packet paid in advance");
        assert_eq!(credit(u64::MAX, 0, 0), -i64::MAX, "no overflow");
    }

    fn bucket(burst_ns: u64) -> Bucket {
        Bucket { burst_ns, tat_ns: 1000, ..Bucket::default() }
    }

    #[test]
    fn admit_pays_in_full_and_goes_one_packet_negative() {
        let mut p = bucket(1_000_000); // 1 ms of burst (1000 bytes at 1 MB/s)
        assert!(p.admit(1000, 64_000_000, 0), "a 64 KB packet passes on any credit");
        assert_eq!(p.credit_ns(1000), 1_000_000 - 64_000_000);
        assert!(!p.admit(2000, 1_000_000, 0), "no credit: dropped, nothing paid");
        assert_eq!(p.credit_ns(2000), 1_000_000 - 64_000_000 + 1000);
        // 63 ms later the debt is paid and credit is back.
        assert!(p.admit(2000 + 63_000_000, 1000, 0));
    }

    #[test]
    fn admit_never_runs_time_back() {
        let mut p = bucket(10_000_000);
        p.tat_ns = p.tat_for_credit(1000, 0);
        assert!(!p.admit(500, 1, 0), "an older clock reading gives no credit");
        assert_eq!(p.credit_ns(1000), 0, "and does not move the bucket");
        assert!(p.admit(1001, 1, 0));
    }

    #[test]
    fn packet_rate_is_a_second_bucket() {
        let mut p = bucket(1_000_000_000);
        p.pkt_burst_ns = 2_000;
        p.pkt_tat_ns = 0;
        assert!(p.admit(1000, 1, 1_000));
        assert!(p.admit(1000, 1, 1_000));
        assert!(!p.admit(1000, 1, 1_000), "two packets of burst");
        assert_eq!(p.credit_ns(1000), 1_000_000_000 - 2, "byte credit as the kernel sees it; the drop paid nothing");
    }

    #[test]
    fn tat_for_credit_round_trips() {
        let p = bucket(1_000);
        for c in [-5_000, -1, 0, 1, 999, 1_000] {
            assert_eq!(Bucket { tat_ns: p.tat_for_credit(77, c), ..p }.credit_ns(77), c);
        }
        assert_eq!(Bucket { tat_ns: p.tat_for_credit(77, 5_000), ..p }.credit_ns(77), 1_000, "capped at the depth");
    }

    /// The long-run rate: over any stretch, what passes is at most the
    /// depth plus one packet plus the stretch at the rate.
    #[test]
    fn long_run_rate_is_the_rate() {
        let mut p = bucket(10_000);
        p.tat_ns = 0;
        let (mut passed, mut now) = (0u64, 0u64);
        for i in 0..100_000u64 {
            now += 7 + (i % 13);
            if p.admit(now, 97, 0) {
                passed += 97;
            }
        }
        assert!(passed <= now + 10_000 + 97, "{passed} ns of cost passed in {now} ns");
        assert!(passed + 10_000 + 97 >= now, "and the rate is used: {passed} in {now}");
    }
}
