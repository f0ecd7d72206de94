//! Limits a cgroup can be created with, checked before anything is written.

use crate::error::CgroupError;
use crate::Result;

/// CPU bandwidth, CPUs allowed and memory; `None` leaves the kernel default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Limits {
    /// CPU time allowed per period, µs (1000 = 1 ms).
    pub cpu_quota_us: Option<u64>,
    /// The period the quota applies to, µs (default 100000).
    pub cpu_period_us: Option<u64>,
    /// CPUs allowed, in cpuset list syntax ("0", "0-1", "0,2").
    pub cpuset: Option<String>,
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
    /// CPU weight under contention, on cgroup v2's scale: 1..=10000, 100
    /// being a default cgroup's (v1: cpu.shares = weight * 1024 / 100). A
    /// quota caps what a cgroup uses; a weight is what it gets when others
    /// want the CPU too: set both to hold CPU for a cgroup.
    pub cpu_weight: Option<u64>,
}

pub const DEFAULT_PERIOD_US: u64 = 100_000;

impl Limits {
    /// A quota of `cpus` CPUs (1.5 = one and a half) per default period.
    pub fn cpus(cpus: f64) -> Limits {
        let quota = (cpus * DEFAULT_PERIOD_US as f64).round().max(1000.0) as u64;
        Limits { cpu_quota_us: Some(quota), ..Limits::default() }
    }

    pub fn period(&self) -> u64 {
        self.cpu_period_us.unwrap_or(DEFAULT_PERIOD_US)
    }

    /// Check every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, reason: &str| Err(CgroupError::Limit { field, reason: reason.into() });
        if let Some(q) = self.cpu_quota_us {
            if q < 1000 {
                return bad("cpu_quota_us", "must be at least 1000");
            }
        }
        if !(1000..=1_000_000).contains(&self.period()) {
            return bad("cpu_period_us", "must be within 1000..=1000000");
        }
        if let Some(c) = &self.cpuset {
            let ok = !c.is_empty()
                && c.split(',').all(|part| {
                    let mut ends = part.splitn(2, '-');
                    let lo = ends.next().and_then(|v| v.parse::<u32>().ok());
                    match (lo, ends.next()) {
                        (Some(_), None) => true,
                        (Some(lo), Some(hi)) => hi.parse::<u32>().is_ok_and(|hi| hi >= lo),
                        _ => false,
                    }
                });
            if !ok {
                return bad("cpuset", "must be a CPU list such as 0-1 or 0,2");
            }
        }
        if let Some(m) = self.memory_bytes {
            if m < 16 << 20 {
                return bad("memory_bytes", "must be at least 16 MiB");
            }
        }
        if let Some(w) = self.cpu_weight {
            if !(1..=10_000).contains(&w) {
                return bad("cpu_weight", "must be within 1..=10000");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_validated_field_by_field() {
        let ok = Limits {
            cpu_quota_us: Some(50_000),
            cpuset: Some("0-1,3".into()),
            memory_bytes: Some(64 << 20),
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        assert!(Limits { cpu_weight: Some(1000), ..Default::default() }.validate().is_ok());
        for w in [0, 10_001] {
            let e = Limits { cpu_weight: Some(w), ..Default::default() }.validate().unwrap_err();
            assert!(e.to_string().contains("cpu_weight"), "{e}");
        }
        assert_eq!(ok.period(), 100_000);
        let cases = [
            (Limits { cpu_quota_us: Some(10), ..Default::default() }, "cpu_quota_us"),
            (Limits { cpu_period_us: Some(10), ..Default::default() }, "cpu_period_us"),
            (Limits { cpuset: Some("0;rm".into()), ..Default::default() }, "cpuset"),
            (Limits { cpuset: Some("3-1".into()), ..Default::default() }, "cpuset"),
            (Limits { cpuset: Some(String::new()), ..Default::default() }, "cpuset"),
            (Limits { memory_bytes: Some(1), ..Default::default() }, "memory_bytes"),
        ];
        for (l, want) in cases {
            match l.validate() {
                Err(CgroupError::Limit { field, .. }) => assert_eq!(field, want),
                other => panic!("{want}: {other:?}"),
            }
        }
    }

    #[test]
    fn cpus_to_quota() {
        assert_eq!(Limits::cpus(1.5).cpu_quota_us, Some(150_000));
        assert_eq!(Limits::cpus(0.0).cpu_quota_us, Some(1000), "never below the kernel's minimum");
    }
}
