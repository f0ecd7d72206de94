//! The kernel's HTB option structs (`include/uapi/linux/pkt_sched.h`),
//! laid out by hand: netlink-packet-route has no HTB types.

use super::psched::PschedClock;

/// `TCA_OPTIONS` in a tcmsg (rtnetlink.h, enum TCA_*); netlink-packet-route
/// keeps its own copy private.
pub(crate) const TCA_OPTIONS: u16 = 2;
// Attribute numbers inside TCA_OPTIONS for kind "htb" (pkt_sched.h, enum
// TCA_HTB_*). RTAB/CTAB are never sent: with linklayer = ethernet the kernel
// computes transmit times itself and ignores rate tables.
pub(crate) const TCA_HTB_PARMS: u16 = 1;
pub(crate) const TCA_HTB_INIT: u16 = 2;
const TCA_HTB_RATE64: u16 = 6;
pub(crate) const TCA_HTB_DIRECT_QLEN: u16 = 5;
const TCA_HTB_CEIL64: u16 = 7;
/// Packets HTB's direct (unshaped) queue holds. Without the attribute the
/// kernel uses the device's tx_queue_len: 1000 on veth but 32 on an IFB,
/// where unclassified bursts would then be dropped instead of passed.
pub const DIRECT_QLEN: u32 = 1000;

/// `TC_HTB_PROTOVER`: htb_init rejects any other `tc_htb_glob.version`.
const HTB_PROTOVER: u32 = 3;
/// The kernel's default; only used when a class gives no quantum (we always do).
const HTB_RATE2QUANTUM: u32 = 10;
/// `TC_LINKLAYER_ETHERNET`: tells the kernel not to expect a rate table.
const TC_LINKLAYER_ETHERNET: u8 = 1;
/// HTB warns about (and the kernel clamps) quanta outside 1000..=200000.
const QUANTUM_MIN: u32 = 1514;
const QUANTUM_MAX: u32 = 200_000;

/// `sizeof(struct tc_htb_glob)`.
pub const TC_HTB_GLOB_LEN: usize = 20;
/// `sizeof(struct tc_ratespec)`.
pub const TC_RATESPEC_LEN: usize = 12;
/// `sizeof(struct tc_htb_opt)`.
pub const TC_HTB_OPT_LEN: usize = 2 * TC_RATESPEC_LEN + 5 * 4;

/// `struct tc_htb_glob` for TCA_HTB_INIT. `defcls` is the minor number of the
/// class unclassified packets go to; 0 means HTB's direct queue (unshaped).
pub fn htb_glob_bytes(defcls: u32) -> [u8; TC_HTB_GLOB_LEN] {
    let mut b = [0u8; TC_HTB_GLOB_LEN];
    b[0..4].copy_from_slice(&HTB_PROTOVER.to_ne_bytes()); // version
    b[4..8].copy_from_slice(&HTB_RATE2QUANTUM.to_ne_bytes()); // rate2quantum
    b[8..12].copy_from_slice(&defcls.to_ne_bytes()); // defcls
                                                     // debug = 0, direct_pkts = 0 (output only)
    b
}

/// `struct tc_ratespec` with linklayer ethernet; `rate` saturates at u32::MAX
/// (the 64-bit value then travels in TCA_HTB_RATE64/CEIL64, and the kernel
/// rejects a zero 32-bit rate, so it must not wrap).
fn ratespec_bytes(rate_bytes: u64) -> [u8; TC_RATESPEC_LEN] {
    let mut b = [0u8; TC_RATESPEC_LEN];
    b[0] = 0; // cell_log: only meaningful with a rate table
    b[1] = TC_LINKLAYER_ETHERNET;
    // overhead (u16), cell_align (i16), mpu (u16) = 0
    let rate32 = u32::try_from(rate_bytes).unwrap_or(u32::MAX);
    b[8..12].copy_from_slice(&rate32.to_ne_bytes());
    b
}

/// The parameters of one HTB class, in the kernel's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HtbClassParams {
    /// Guaranteed and ceiling rate, bytes/s.
    pub rate_bytes: u64,
    pub ceil_bytes: u64,
    /// Token bucket depths in psched ticks.
    pub buffer_ticks: u32,
    pub cbuffer_ticks: u32,
    pub quantum: u32,
}

impl HtbClassParams {
    /// rate = ceil = `rate_bps` (bits/s), burst = cburst = `burst_bytes`.
    pub fn new(clock: &PschedClock, rate_bps: u64, burst_bytes: u32) -> HtbClassParams {
        let rate_bytes = rate_bps / 8;
        let ticks = clock.xmittime(rate_bytes, burst_bytes);
        HtbClassParams {
            rate_bytes,
            ceil_bytes: rate_bytes,
            buffer_ticks: ticks,
            cbuffer_ticks: ticks,
            quantum: quantum_for(rate_bytes),
        }
    }

    /// `struct tc_htb_opt` for TCA_HTB_PARMS (level and prio 0: a leaf of the
    /// root at the highest priority).
    pub fn opt_bytes(&self) -> [u8; TC_HTB_OPT_LEN] {
        let mut b = [0u8; TC_HTB_OPT_LEN];
        b[0..12].copy_from_slice(&ratespec_bytes(self.rate_bytes));
        b[12..24].copy_from_slice(&ratespec_bytes(self.ceil_bytes));
        b[24..28].copy_from_slice(&self.buffer_ticks.to_ne_bytes());
        b[28..32].copy_from_slice(&self.cbuffer_ticks.to_ne_bytes());
        b[32..36].copy_from_slice(&self.quantum.to_ne_bytes());
        // level (u32) = 0, prio (u32) = 0
        b
    }

    /// The encoded TCA_OPTIONS attribute for the class.
    pub fn options(&self) -> Vec<u8> {
        let mut inner = nla(TCA_HTB_PARMS, &self.opt_bytes());
        // Like tc: the 64-bit rates only when the 32-bit fields overflow.
        if self.rate_bytes > u64::from(u32::MAX) {
            inner.extend(nla(TCA_HTB_RATE64, &self.rate_bytes.to_ne_bytes()));
        }
        if self.ceil_bytes > u64::from(u32::MAX) {
            inner.extend(nla(TCA_HTB_CEIL64, &self.ceil_bytes.to_ne_bytes()));
        }
        nla(TCA_OPTIONS, &inner)
    }
}

/// DRR quantum for a class: a tenth of a second's worth of bytes like the
/// kernel's default r2q = 10, but kept inside the range where HTB neither
/// warns nor starves (at least one full-size frame, at most 200000).
pub fn quantum_for(rate_bytes: u64) -> u32 {
    let q = (rate_bytes / u64::from(HTB_RATE2QUANTUM)).clamp(u64::from(QUANTUM_MIN), u64::from(QUANTUM_MAX));
    u32::try_from(q).unwrap_or(QUANTUM_MAX)
}

/// One netlink attribute: `struct nlattr { u16 len; u16 type; }`, the value,
/// and padding to 4 bytes (NLA_ALIGN). No NLA_F_NESTED on TCA_OPTIONS: the
/// kernel parses it with the deprecated (flag-less) parser, and tc omits it.
pub fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut b = Vec::with_capacity(align4(len));
    // Attributes we build are a few dozen bytes; u16 cannot overflow.
    b.extend_from_slice(&(len as u16).to_ne_bytes());
    b.extend_from_slice(&kind.to_ne_bytes());
    b.extend_from_slice(value);
    b.resize(align4(len), 0);
    b
}

pub(crate) fn align4(n: usize) -> usize {
    (n + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_u16(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([b[at], b[at + 1]])
    }

    fn read_u32(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    /// /proc/net/psched on this machine (and any kernel since 2.6.31's
    /// hrtimer-based psched): 1 tick = 64 ns.
    const PSCHED: &str = "000003e8 00000040 000f4240 3b9aca00\n";

    #[test]
    fn htb_glob_layout() {
        let b = htb_glob_bytes(0x10);
        assert_eq!(b.len(), 20);
        let words: Vec<u32> = b.chunks(4).map(|c| u32::from_ne_bytes(c.try_into().unwrap())).collect();
        // version, rate2quantum, defcls, debug, direct_pkts
        assert_eq!(words, vec![3, 10, 0x10, 0, 0]);
    }

    #[test]
    fn htb_opt_layout() {
        let c = PschedClock::parse(PSCHED).unwrap();
        let p = HtbClassParams::new(&c, 20_000_000, 30_000);
        let b = p.opt_bytes();
        assert_eq!(b.len(), 44);
        for spec in [&b[0..12], &b[12..24]] {
            assert_eq!(spec[0], 0, "cell_log");
            assert_eq!(spec[1], 1, "linklayer ethernet");
            assert_eq!(&spec[2..8], &[0; 6], "overhead, cell_align, mpu");
            assert_eq!(read_u32(spec, 8), 2_500_000, "rate bytes/s");
        }
        assert_eq!(read_u32(&b, 24), 187_500, "buffer");
        assert_eq!(read_u32(&b, 28), 187_500, "cbuffer");
        assert_eq!(read_u32(&b, 32), 200_000, "quantum capped");
        assert_eq!(read_u32(&b, 36), 0, "level");
        assert_eq!(read_u32(&b, 40), 0, "prio");
        // Only PARMS below 2^32 bytes/s: TCA_OPTIONS { TCA_HTB_PARMS }.
        let o = p.options();
        assert_eq!(o.len(), 4 + 4 + 44);
        assert_eq!((read_u16(&o, 0), read_u16(&o, 2)), (52, TCA_OPTIONS));
        assert_eq!((read_u16(&o, 4), read_u16(&o, 6)), (48, TCA_HTB_PARMS));
        assert_eq!(&o[8..], &b[..]);
    }

    #[test]
    fn htb_64bit_rates() {
        let c = PschedClock::parse(PSCHED).unwrap();
        // 40 Gbit/s = 5e9 bytes/s > u32::MAX.
        let p = HtbClassParams::new(&c, 40_000_000_000, 1_000_000);
        let b = p.opt_bytes();
        assert_eq!(read_u32(&b, 8), u32::MAX, "rate saturates, never wraps to 0");
        assert_eq!(read_u32(&b, 20), u32::MAX);
        let o = p.options();
        assert_eq!(o.len(), 4 + 48 + 12 + 12);
        assert_eq!((read_u16(&o, 52), read_u16(&o, 54)), (12, TCA_HTB_RATE64));
        assert_eq!(&o[56..64], &5_000_000_000u64.to_ne_bytes());
        assert_eq!((read_u16(&o, 64), read_u16(&o, 66)), (12, TCA_HTB_CEIL64));
        assert_eq!(&o[68..76], &5_000_000_000u64.to_ne_bytes());
        // 1 MB at 5 GB/s = 200 us = 3125 ticks.
        assert_eq!(p.buffer_ticks, 3125);
    }

    #[test]
    fn nla_padding() {
        assert_eq!(nla(7, &[1, 2, 3]), vec![7, 0, 7, 0, 1, 2, 3, 0]);
        assert_eq!(nla(1, &[]), vec![4, 0, 1, 0]);
    }

    #[test]
    fn quantum_range() {
        assert_eq!(quantum_for(1000), 1514);
        assert_eq!(quantum_for(125_000), 12_500);
        assert_eq!(quantum_for(u64::MAX), 200_000);
    }
}
