//! Turns cumulative counters into per-VM rates.
//!
//! A `Sample` is what the kernel said at one instant; `rates` is a pure
//! function of two samples, so the arithmetic is tested without a kernel.

use std::time::Instant;

use governor_common::{CgroupStats, NetStats, DELAY_BUCKETS};
use serde::Serialize;

use cgroupfs::Memory;

/// Cumulative counters of one VM at one instant.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    pub cpu: CgroupStats,
    /// Sum over the VM's interfaces, in the interfaces' own direction.
    pub net: NetStats,
    pub memory: Option<Memory>,
}

/// What `governor status` shows for a VM. Network directions are the VM's:
/// the configured interfaces are the host-side ends, so what the interface
/// sends is what the VM receives.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct VmStatus {
    pub name: String,
    pub role: String,
    pub cgroup_id: u64,
    /// 100 = one CPU busy for the whole interval.
    pub cpu_percent: f64,
    pub cpu_seconds_total: f64,
    pub runq_delay_p50_us: Option<f64>,
    pub runq_delay_p99_us: Option<f64>,
    /// Run-queue delay accumulated per second of wall time (ms/s).
    pub runq_delay_ms_per_s: f64,
    pub runq_delay_seconds_total: f64,
    pub memory_working_set_bytes: Option<u64>,
    pub memory_resident_bytes: Option<u64>,
    pub page_faults_per_s: f64,
    pub page_faults_total: u64,
    pub oom_kills_total: u64,
    pub rx_bits_per_s: f64,
    pub tx_bits_per_s: f64,
    pub rx_packets_per_s: f64,
    pub tx_packets_per_s: f64,
    pub rx_bytes_total: u64,
    pub tx_bytes_total: u64,
}

fn per_s(cur: u64, prev: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    // Counters only grow; a smaller value means they were reset (programs
    // reloaded): report the new count over the interval rather than garbage.
    let d = if cur >= prev { cur - prev } else { cur };
    d as f64 / secs
}

/// Rates between two samples of the same VM.
pub fn rates(name: &str, role: &str, cgroup_id: u64, prev: &Sample, cur: &Sample) -> VmStatus {
    let secs = cur.at.saturating_duration_since(prev.at).as_secs_f64();
    let mut hist = [0u64; DELAY_BUCKETS];
    for (i, h) in hist.iter_mut().enumerate() {
        *h = cur.cpu.runq_hist[i].saturating_sub(prev.cpu.runq_hist[i]);
    }
    VmStatus {
        name: name.to_string(),
        role: role.to_string(),
        cgroup_id,
        cpu_percent: per_s(cur.cpu.on_cpu_ns, prev.cpu.on_cpu_ns, secs) / 1e7,
        cpu_seconds_total: cur.cpu.on_cpu_ns as f64 / 1e9,
        runq_delay_p50_us: percentile(&hist, 0.50),
        runq_delay_p99_us: percentile(&hist, 0.99),
        runq_delay_ms_per_s: per_s(cur.cpu.runq_delay_ns, prev.cpu.runq_delay_ns, secs) / 1e6,
        runq_delay_seconds_total: cur.cpu.runq_delay_ns as f64 / 1e9,
        memory_working_set_bytes: cur.memory.map(|m| m.working_set_bytes),
        memory_resident_bytes: cur.memory.map(|m| m.resident_bytes),
        page_faults_per_s: per_s(cur.cpu.page_faults, prev.cpu.page_faults, secs),
        page_faults_total: cur.cpu.page_faults,
        oom_kills_total: cur.cpu.oom_kills,
        // Host-side interface tx = VM rx.
        rx_bits_per_s: per_s(cur.net.tx_bytes, prev.net.tx_bytes, secs) * 8.0,
        tx_bits_per_s: per_s(cur.net.rx_bytes, prev.net.rx_bytes, secs) * 8.0,
        rx_packets_per_s: per_s(cur.net.tx_packets, prev.net.tx_packets, secs),
        tx_packets_per_s: per_s(cur.net.rx_packets, prev.net.rx_packets, secs),
        rx_bytes_total: cur.net.tx_bytes,
        tx_bytes_total: cur.net.rx_bytes,
    }
}

/// Quantile `q` of a log2 µs histogram, interpolating linearly inside the
/// bucket; None when the histogram is empty.
pub fn percentile(hist: &[u64; DELAY_BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut seen = 0.0;
    for (i, &n) in hist.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let next = seen + n as f64;
        if next >= rank {
            let (lo, hi) = if i == 0 { (0.0, 2.0) } else { ((1u64 << i) as f64, (1u64 << (i + 1)) as f64) };
            let frac = ((rank - seen) / n as f64).clamp(0.0, 1.0);
            return Some(lo + frac * (hi - lo));
        }
        seen = next;
    }
    Some((1u64 << DELAY_BUCKETS) as f64)
}

/// Human units for the status table.
pub fn bits(v: f64) -> String {
    human(v, "bit/s")
}

pub fn bytes(v: u64) -> String {
    let v = v as f64;
    if v >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", v / (1024.0 * 1024.0 * 1024.0))
    } else if v >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", v / (1024.0 * 1024.0))
    } else {
        format!("{:.0} KiB", v / 1024.0)
    }
}

fn human(v: f64, unit: &str) -> String {
    if v >= 1e9 {
        format!("{:.2} G{unit}", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.1} M{unit}", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} k{unit}", v / 1e3)
    } else {
        format!("{v:.0} {unit}")
    }
}

/// The `governor status` table.
pub fn table(vms: &[VmStatus]) -> String {
    let mut out = format!(
        "{:<14} {:<4} {:>7} {:>10} {:>10} {:>11} {:>9} {:>13} {:>13} {:>9} {:>9}\n",
        "VM", "ROLE", "CPU%", "RQ p50", "RQ p99", "WORKSET", "FAULT/s", "RX", "TX", "RX pkt/s", "TX pkt/s"
    );
    let us = |v: Option<f64>| v.map(|v| format!("{v:.0} µs")).unwrap_or_else(|| "-".into());
    for v in vms {
        out.push_str(&format!(
            "{:<14} {:<4} {:>7.1} {:>10} {:>10} {:>11} {:>9.0} {:>13} {:>13} {:>9.0} {:>9.0}\n",
            v.name,
            v.role,
            v.cpu_percent,
            us(v.runq_delay_p50_us),
            us(v.runq_delay_p99_us),
            v.memory_working_set_bytes.map(bytes).unwrap_or_else(|| "-".into()),
            v.page_faults_per_s,
            bits(v.rx_bits_per_s),
            bits(v.tx_bits_per_s),
            v.rx_packets_per_s,
            v.tx_packets_per_s,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sample(at: Instant, on_cpu_ns: u64, tx_bytes: u64) -> Sample {
        Sample {
            at,
            cpu: CgroupStats { on_cpu_ns, ..Default::default() },
            net: NetStats { tx_bytes, tx_packets: tx_bytes / 1000, ..Default::default() },
            memory: None,
        }
    }

    #[test]
    fn cpu_and_net_rates() {
        let t0 = Instant::now();
        let a = sample(t0, 0, 0);
        let b = sample(t0 + Duration::from_secs(2), 1_000_000_000, 2_000_000);
        let r = rates("vm", "user", 7, &a, &b);
        assert!((r.cpu_percent - 50.0).abs() < 1e-9);
        // 2 MB in 2 s out of the host-side interface = 8 Mbit/s into the VM.
        assert!((r.rx_bits_per_s - 8e6).abs() < 1e-6);
        assert_eq!(r.tx_bits_per_s, 0.0);
        assert!((r.rx_packets_per_s - 1000.0).abs() < 1e-9);
    }

    #[test]
    fn counter_reset_is_not_negative() {
        let t0 = Instant::now();
        let a = sample(t0, 5_000_000_000, 0);
        let b = sample(t0 + Duration::from_secs(1), 1_000_000_000, 0);
        assert!((rates("vm", "user", 1, &a, &b).cpu_percent - 100.0).abs() < 1e-9);
    }

    #[test]
    fn percentiles() {
        let mut h = [0u64; DELAY_BUCKETS];
        assert_eq!(percentile(&h, 0.5), None);
        h[3] = 100; // all in [8, 16) µs
        let p50 = percentile(&h, 0.5).expect("some");
        assert!((8.0..16.0).contains(&p50), "{p50}");
        h[10] = 1; // one outlier in [1024, 2048)
        let p99 = percentile(&h, 0.99).expect("some");
        assert!((8.0..16.0).contains(&p99), "{p99}");
        let p100 = percentile(&h, 1.0).expect("some");
        assert!((1024.0..=2048.0).contains(&p100), "{p100}");
    }

    #[test]
    fn table_has_a_row_per_vm() {
        let t = table(&[VmStatus { name: "a".into(), role: "user".into(), ..Default::default() }]);
        assert_eq!(t.lines().count(), 2);
        assert!(t.lines().nth(1).expect("row").starts_with("a "));
    }
}
