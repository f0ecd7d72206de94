//! The kernel's tbf option structs (`include/uapi/linux/pkt_sched.h`),
//! laid out by hand like HTB's: netlink-packet-route has no tbf types. The
//! governor uses tbf not to shape but as the queue under a VM's HTB class:
//! tbf splits a GSO packet larger than its burst into frames as it enters
//! (`tbf_segment`), so HTB schedules frames and a ping is never held behind
//! one 64 KiB unit; its rate is set well above the class's, so it never
//! holds a frame HTB asks for.

use super::htb::{nla, TCA_OPTIONS};
use super::psched::PschedClock;

// Attribute numbers inside TCA_OPTIONS for kind "tbf" (enum TCA_TBF_*).
const TCA_TBF_PARMS: u16 = 1;
const TCA_TBF_RATE64: u16 = 4;
const TCA_TBF_BURST: u16 = 6;
/// `TC_LINKLAYER_ETHERNET`: no rate table expected.
const TC_LINKLAYER_ETHERNET: u8 = 1;
/// `sizeof(struct tc_tbf_qopt)`: rate, peakrate (tc_ratespec each), limit,
/// buffer, mtu.
pub const TC_TBF_QOPT_LEN: usize = 12 + 12 + 3 * 4;

/// The queue under a VM's class: a FIFO of `limit_bytes` that splits GSO
/// packets larger than `segment_bytes` into frames as they enter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    pub limit_bytes: u32,
    pub segment_bytes: u32,
    /// The class's rate (bits/s): the leaf passes at four times it.
    pub class_rate_bps: u64,
}

impl Leaf {
    /// The leaf's own rate, bytes/s: well above the class's, so HTB alone
    /// decides when a frame leaves.
    pub fn pass_rate_bytes(&self) -> u64 {
        (self.class_rate_bps / 8).saturating_mul(4).max(1)
    }

    /// The encoded TCA_OPTIONS attribute for a tbf qdisc.
    pub fn options(&self, clock: &PschedClock) -> Vec<u8> {
        let rate = self.pass_rate_bytes();
        let mut q = [0u8; TC_TBF_QOPT_LEN];
        q[1] = TC_LINKLAYER_ETHERNET; // rate.linklayer; cell_log, overhead, align, mpu 0
        q[8..12].copy_from_slice(&u32::try_from(rate).unwrap_or(u32::MAX).to_ne_bytes());
        // peakrate (12 bytes) stays zero: no peak rate.
        q[24..28].copy_from_slice(&self.limit_bytes.to_ne_bytes());
        q[28..32].copy_from_slice(&clock.xmittime(rate, self.segment_bytes).to_ne_bytes());
        // mtu (u32) = 0: no peak rate, no mtu.
        let mut inner = nla(TCA_TBF_PARMS, &q);
        if rate > u64::from(u32::MAX) {
            inner.extend(nla(TCA_TBF_RATE64, &rate.to_ne_bytes()));
        }
        // The burst in bytes (the kernel derives its max packet size from
        // it: the size above which GSO packets are split).
        inner.extend(nla(TCA_TBF_BURST, &self.segment_bytes.to_ne_bytes()));
        nla(TCA_OPTIONS, &inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_carry_the_limit_the_burst_and_a_rate_above_the_class() {
        let clock = PschedClock::parse("000003e8 00000040 000f4240 3b9aca00\n").expect("clock");
        let leaf = Leaf { limit_bytes: 62_500, segment_bytes: 12_500, class_rate_bps: 100_000_000 };
        assert_eq!(leaf.pass_rate_bytes(), 50_000_000);
        let o = leaf.options(&clock);
        // TCA_OPTIONS header, TCA_TBF_PARMS header, then the qopt.
        assert_eq!(u16::from_ne_bytes([o[2], o[3]]), TCA_OPTIONS);
        assert_eq!(u16::from_ne_bytes([o[6], o[7]]), TCA_TBF_PARMS);
        let q = &o[8..8 + TC_TBF_QOPT_LEN];
        assert_eq!(u32::from_ne_bytes([q[8], q[9], q[10], q[11]]), 50_000_000, "rate");
        assert_eq!(u32::from_ne_bytes([q[24], q[25], q[26], q[27]]), 62_500, "limit");
        let burst = &o[8 + TC_TBF_QOPT_LEN..];
        assert_eq!(u16::from_ne_bytes([burst[2], burst[3]]), TCA_TBF_BURST);
        assert_eq!(u32::from_ne_bytes([burst[4], burst[5], burst[6], burst[7]]), 12_500);
        // Past 4 GB/s the rate travels in RATE64.
        let fast = Leaf { class_rate_bps: 40_000_000_000, ..leaf }.options(&clock);
        assert!(fast.len() > o.len());
    }
}
