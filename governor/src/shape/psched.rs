//! The kernel's packet-scheduler clock, which HTB's token bucket depths are
//! expressed in.

use super::ShapeError;

/// The kernel's packet-scheduler clock as published in `/proc/net/psched`,
/// which is what iproute2's tc_core.c reads to turn times into HTB "ticks".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PschedClock {
    /// Nanoseconds per microsecond as the kernel reports it (`t2us`).
    pub t2us: u32,
    /// Nanoseconds per tick (`us2t`, `PSCHED_TICKS2NS(1)`).
    pub us2t: u32,
    /// Clock resolution (`clock_res`).
    pub clock_res: u32,
}

impl PschedClock {
    /// Parse the first three hex words of `/proc/net/psched`.
    pub fn parse(text: &str) -> Result<PschedClock, ShapeError> {
        let mut words = text.split_whitespace().map(|w| u32::from_str_radix(w, 16));
        let format_err = |field: &'static str, reason: &str| ShapeError::PschedFormat {
            field,
            text: text.to_string(),
            reason: reason.to_string(),
        };
        let mut next = |name: &'static str| -> Result<u32, ShapeError> {
            match words.next() {
                Some(Ok(v)) if v != 0 => Ok(v),
                Some(Ok(_)) => Err(format_err(name, "is zero")),
                Some(Err(e)) => Err(format_err(name, &e.to_string())),
                None => Err(format_err(name, "is missing")),
            }
        };
        let mut t2us = next("t2us")?;
        let us2t = next("us2t")?;
        let clock_res = next("clock_res")?;
        // Same compatibility hack as tc_core_init(): a kernel with a
        // nanosecond clock advertises t2us = 1000 meaning 1.
        if clock_res == 1_000_000_000 {
            t2us = us2t;
        }
        Ok(PschedClock { t2us, us2t, clock_res })
    }

    pub fn read() -> Result<PschedClock, ShapeError> {
        let text = std::fs::read_to_string("/proc/net/psched").map_err(ShapeError::PschedRead)?;
        PschedClock::parse(&text)
    }

    /// Ticks needed to send `size` bytes at `rate` bytes/s: iproute2's
    /// `tc_calc_xmittime` (1e6 * size / rate µs, times tick_in_usec =
    /// t2us / us2t * clock_res / 1e6), in exact integer arithmetic, truncated
    /// like tc's conversion to unsigned and saturated at u32::MAX. HTB turns
    /// this back into ns (ticks << 6) as the depth of the class's token
    /// bucket, so this is what makes `burst` bytes pass at line speed.
    pub fn xmittime(&self, rate_bytes: u64, size: u32) -> u32 {
        if rate_bytes == 0 {
            return u32::MAX;
        }
        let num = u128::from(size) * u128::from(self.t2us) * u128::from(self.clock_res);
        let den = u128::from(rate_bytes) * u128::from(self.us2t);
        u32::try_from(num / den).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// /proc/net/psched on this machine (and any kernel since 2.6.31's
    /// hrtimer-based psched): 1 tick = 64 ns.
    const PSCHED: &str = "000003e8 00000040 000f4240 3b9aca00\n";

    #[test]
    fn psched_parses_and_ticks_match_tc() {
        let c = PschedClock::parse(PSCHED).unwrap();
        assert_eq!(c, PschedClock { t2us: 1000, us2t: 64, clock_res: 1_000_000 });
        // 30000 bytes at 20 Mbit/s (2.5 MB/s) take 12 ms = 12e6 ns = 187500
        // ticks of 64 ns; `tc class add ... rate 20mbit burst 30000` sends
        // the same buffer.
        assert_eq!(c.xmittime(2_500_000, 30_000), 187_500);
        // 1600 bytes at 1 Mbit/s: 12.8 ms -> 200000 ticks.
        assert_eq!(c.xmittime(125_000, 1600), 200_000);
        // Truncation like tc: 1 byte at 3 B/s = 333333.33 us = 5208333.33 ticks.
        assert_eq!(c.xmittime(3, 1), 5_208_333);
        // Saturation instead of wrapping.
        assert_eq!(c.xmittime(1, u32::MAX), u32::MAX);
        assert_eq!(c.xmittime(0, 1), u32::MAX);
    }

    #[test]
    fn psched_nanosecond_compat_hack() {
        // clock_res 1e9 means t2us is really us2t (tc_core_init).
        let c = PschedClock::parse("000003e8 00000040 3b9aca00").unwrap();
        assert_eq!(c.t2us, 64);
        assert!(PschedClock::parse("000003e8 00000040").is_err());
        assert!(PschedClock::parse("zz 1 1").is_err());
        assert!(PschedClock::parse("1 0 1").is_err());
    }
}
