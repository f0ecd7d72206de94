//! Per-VM QoS flow limiting (claim 14): the limits, their validation, and
//! what the kernel programs are told.
//!
//! Two modes per VM and direction:
//! - `police`: a token bucket inside the tc-BPF program on the VM's
//!   interfaces; packets over the limit are dropped and counted.
//! - `shape`: an HTB class per VM (see `shape.rs`), chosen by the tc-BPF
//!   program; traffic from the VM is redirected to an IFB device first,
//!   because only egress can be shaped.
//!
//! Directions are the VM's: `egress` is what the VM sends, `ingress` what
//! it receives.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use governor_common::{Bucket, Policer, DIR_FROM_VM, DIR_TO_VM, QOS_POLICE};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// From the VM (tc ingress on the host-side interface).
    Egress,
    /// To the VM (tc egress on the host-side interface).
    Ingress,
}

impl Direction {
    pub fn index(self) -> u32 {
        match self {
            Direction::Egress => DIR_FROM_VM,
            Direction::Ingress => DIR_TO_VM,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Police,
    Shape,
}

/// A limit as written in the config or sent over the API. Rates accept
/// `100mbit`, `1gbit`, `64kbit`, `1500000` (bit/s); bursts `64kb`, `1mb`,
/// `1514` (bytes; k/m are 1024-based, as tc does).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    #[serde(default)]
    pub mode: Mode,
    pub rate: Quantity,
    pub burst: Quantity,
    #[serde(default)]
    pub packet_rate: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Quantity {
    Number(u64),
    Text(String),
}

/// A checked limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limit {
    pub mode: Mode,
    pub rate_bps: u64,
    pub burst_bytes: u64,
    pub packet_rate: Option<u64>,
}

#[derive(Debug, Error, PartialEq)]
#[error("{field}: {reason}")]
pub struct LimitError {
    pub field: String,
    pub reason: String,
}

pub const MIN_RATE_BPS: u64 = 8_000;
pub const MAX_RATE_BPS: u64 = 400_000_000_000;
/// One full Ethernet frame: a smaller bucket could never pass a packet.
pub const MIN_BURST: u64 = 1514;
pub const MAX_BURST: u64 = 1 << 30;
pub const MAX_PACKET_RATE: u64 = 100_000_000;

fn err(field: &str, reason: impl Into<String>) -> LimitError {
    LimitError { field: field.to_string(), reason: reason.into() }
}

/// A number with an optional unit suffix (the first matching suffix of
/// `units` wins, so longer ones come first); `what` names the kind for
/// errors.
fn parse_quantity(q: &Quantity, units: &[(&str, f64)], what: &str) -> Result<u64, String> {
    let t = match q {
        Quantity::Number(n) => return Ok(*n),
        Quantity::Text(t) => t.trim().to_ascii_lowercase(),
    };
    let (num, mult) =
        units.iter().find_map(|(suf, m)| t.strip_suffix(suf).map(|n| (n.trim(), *m))).unwrap_or((t.as_str(), 1.0));
    match num.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok((v * mult).round() as u64),
        _ => Err(format!("{t:?} is not {what}")),
    }
}

pub(crate) fn parse_rate(q: &Quantity) -> Result<u64, String> {
    parse_quantity(q, &[("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)], "a rate (e.g. 100mbit)")
}

pub(crate) fn parse_bytes(q: &Quantity) -> Result<u64, String> {
    let k = 1024.0;
    parse_quantity(q, &[("gb", k * k * k), ("mb", k * k), ("kb", k), ("b", 1.0)], "a size (e.g. 64kb)")
}

/// How much of the rate a policer's bucket must hold for TCP: more than
/// TCP's minimum retransmission timeout (200 ms), so a flow that stalls
/// after a drop finds its unused credit when it resumes. With this much
/// (and at least `TCP_MIN_BURST`) one TCP flow gets at least 90% of the
/// rate at 10, 100 and 1,000 Mbit/s (`tests/tests/qos.rs`); with less it
/// can get a tenth of it.
pub const TCP_BURST_MS: u64 = 250;
/// The smallest bucket that keeps TCP at the rate at low rates.
pub const TCP_MIN_BURST: u64 = 128 * 1024;

/// The smallest police burst TCP needs at `rate_bps` (see `TCP_BURST_MS`).
pub fn tcp_min_burst(rate_bps: u64) -> u64 {
    (rate_bps / 8).saturating_mul(TCP_BURST_MS).div_ceil(1000).max(TCP_MIN_BURST)
}

fn show_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}mb", b >> 20),
        b if b >= 1024 && b % 1024 == 0 => format!("{}kb", b >> 10),
        b => format!("{b} bytes"),
    }
}

fn show_rate(bps: u64) -> String {
    match bps {
        r if r >= 1_000_000_000 && r % 1_000_000_000 == 0 => format!("{}gbit", r / 1_000_000_000),
        r if r >= 1_000_000 && r % 1_000_000 == 0 => format!("{}mbit", r / 1_000_000),
        r if r >= 1000 && r % 1000 == 0 => format!("{}kbit", r / 1000),
        r => format!("{r} bit/s"),
    }
}

impl LimitSpec {
    /// Check the limit; `at` prefixes the field names in errors.
    pub fn check(&self, at: &str) -> Result<Limit, LimitError> {
        let f = |name: &str| if at.is_empty() { name.to_string() } else { format!("{at}.{name}") };
        let rate = parse_rate(&self.rate).map_err(|r| err(&f("rate"), r))?;
        if !(MIN_RATE_BPS..=MAX_RATE_BPS).contains(&rate) {
            return Err(err(&f("rate"), format!("{rate} bit/s is outside {MIN_RATE_BPS}..={MAX_RATE_BPS}")));
        }
        let burst = parse_bytes(&self.burst).map_err(|r| err(&f("burst"), r))?;
        if !(MIN_BURST..=MAX_BURST).contains(&burst) {
            return Err(err(&f("burst"), format!("{burst} bytes is outside {MIN_BURST}..={MAX_BURST}")));
        }
        if let Some(p) = self.packet_rate {
            if p == 0 || p > MAX_PACKET_RATE {
                return Err(err(&f("packet_rate"), format!("{p} is outside 1..={MAX_PACKET_RATE}")));
            }
            if self.mode == Mode::Shape {
                return Err(err(&f("packet_rate"), "HTB shapes bytes only; use mode = \"police\" for a packet rate"));
            }
        }
        let need = tcp_min_burst(rate);
        if self.mode == Mode::Police && burst < need {
            let kb = need.div_ceil(1024);
            return Err(err(
                &f("burst"),
                format!(
                    "{} is too small to police TCP at {}: a flow that stalls after a drop resumes with no credit \
                     and gets a fraction of the rate; give at least {kb}kb ({} ms of the rate), or use mode \
                     shape, which queues instead of dropping",
                    show_bytes(burst),
                    show_rate(rate),
                    TCP_BURST_MS
                ),
            ));
        }
        Ok(Limit { mode: self.mode, rate_bps: rate, burst_bytes: burst, packet_rate: self.packet_rate })
    }
}

const NS: u128 = 1_000_000_000;

impl Limit {
    pub fn rate_bytes_per_s(&self) -> u64 {
        (self.rate_bps / 8).max(1)
    }

    /// The kernel-side policer for this limit. `prev` carries the tokens
    /// of a limit being changed (converted to bytes and back), so a rate
    /// change neither refills nor empties the bucket; a new bucket starts
    /// full.
    pub fn policer(&self, prev: Option<&Policer>, now_ns: u64) -> Policer {
        let rate = self.rate_bytes_per_s();
        let burst_ns = (self.burst_bytes as u128 * NS / rate as u128) as u64;
        let tokens_ns = match prev {
            Some(p) if p.mode == QOS_POLICE && p.rate_bytes_per_s != 0 => {
                let bytes = p.bucket.credit_ns(now_ns) as i128 * p.rate_bytes_per_s as i128 / NS as i128;
                ((bytes * NS as i128 / rate as i128) as i64).min(burst_ns as i64)
            }
            _ => burst_ns as i64,
        };
        let (pkt_cost_ns, pkt_burst_ns) = match self.packet_rate {
            // The packet bucket holds as many packets as a byte burst of
            // full frames would, but at least 10.
            Some(p) => {
                let cost = (NS / p as u128) as u64;
                let pkts = (self.burst_bytes / MIN_BURST).max(10);
                (cost, cost.saturating_mul(pkts))
            }
            None => (0, 0),
        };
        let bucket = Bucket { burst_ns, tat_ns: 0, pkt_cost_ns, pkt_burst_ns, pkt_tat_ns: now_ns };
        Policer {
            mode: QOS_POLICE,
            rate_bytes_per_s: rate,
            bucket: Bucket { tat_ns: bucket.tat_for_credit(now_ns, tokens_ns), ..bucket },
            ..Policer::default()
        }
    }
}

/// Tokens left in a policer, in bytes.
pub fn tokens_bytes(p: &Policer, now_ns: u64) -> u64 {
    (p.bucket.credit_ns(now_ns).max(0) as u128 * p.rate_bytes_per_s as u128 / NS) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rate: &str, burst: &str) -> LimitSpec {
        LimitSpec {
            mode: Mode::Police,
            rate: Quantity::Text(rate.into()),
            burst: Quantity::Text(burst.into()),
            packet_rate: None,
        }
    }

    #[test]
    fn units() {
        let l = spec("100mbit", "3mb").check("").expect("valid");
        assert_eq!(l.rate_bps, 100_000_000);
        assert_eq!(l.burst_bytes, 3 << 20);
        assert_eq!(spec("1.5gbit", "45mb").check("").expect("ok").rate_bps, 1_500_000_000);
        let n = LimitSpec {
            mode: Mode::Shape,
            rate: Quantity::Number(10_000_000),
            burst: Quantity::Number(1514),
            ..spec("1", "1")
        };
        assert_eq!(n.check("").expect("ok").rate_bps, 10_000_000);
    }

    /// A police burst too small for TCP is refused with the size it needs,
    /// which is then taken; shaping takes a small burst.
    #[test]
    fn a_police_burst_too_small_for_tcp_names_the_burst_it_needs() {
        let e = spec("50mbit", "64kb").check("vm[0].qos.ingress").unwrap_err();
        assert_eq!(e.field, "vm[0].qos.ingress.burst");
        assert!(
            e.reason.contains("64kb is too small to police TCP at 50mbit") && e.reason.contains("at least 1526kb"),
            "{}",
            e.reason
        );
        assert_eq!(spec("50mbit", "1526kb").check("").expect("the burst it named").burst_bytes, 1526 * 1024);
        assert!(spec("50mbit", "1525kb").check("").is_err());
        for (rate, need) in
            [(10_000_000, 312_500), (100_000_000, 3_125_000), (1_000_000_000, 31_250_000), (8_000, 131_072)]
        {
            assert_eq!(tcp_min_burst(rate), need, "{rate} bit/s");
        }
        let shape = LimitSpec { mode: Mode::Shape, ..spec("50mbit", "64kb") };
        assert_eq!(shape.check("").expect("shaping queues").burst_bytes, 65536);
    }

    #[test]
    fn refusals_name_the_field() {
        assert_eq!(spec("0", "64kb").check("vm[0].qos.egress").unwrap_err().field, "vm[0].qos.egress.rate");
        assert_eq!(spec("fast", "64kb").check("").unwrap_err().field, "rate");
        assert_eq!(spec("1000gbit", "64kb").check("").unwrap_err().field, "rate");
        assert_eq!(spec("10mbit", "100").check("").unwrap_err().field, "burst");
        assert_eq!(spec("10mbit", "-1kb").check("").unwrap_err().field, "burst");
        let mut s = spec("10mbit", "1mb");
        s.packet_rate = Some(0);
        assert_eq!(s.check("").unwrap_err().field, "packet_rate");
        s.packet_rate = Some(1000);
        s.mode = Mode::Shape;
        assert_eq!(s.check("").unwrap_err().field, "packet_rate");
    }

    #[test]
    fn policer_time_credit() {
        let police = |rate_bps| Limit { mode: Mode::Police, rate_bps, burst_bytes: 102_400, packet_rate: None };
        let l = police(8_000_000); // 1 MB/s
        let p = l.policer(None, 5);
        assert_eq!(p.rate_bytes_per_s, 1_000_000);
        assert_eq!(p.bucket.burst_ns, 102_400_000); // 102400 bytes at 1 MB/s
        assert_eq!(p.bucket.credit_ns(5), p.bucket.burst_ns as i64, "a new bucket starts full");
        assert_eq!(tokens_bytes(&p, 5), 102_400);
        // Halve the rate with 50 KB left: still 50 KB, now worth twice the time.
        let half = Policer { bucket: Bucket { tat_ns: p.bucket.tat_for_credit(5, 51_200_000), ..p.bucket }, ..p };
        let l2 = police(4_000_000);
        let p2 = l2.policer(Some(&half), 5);
        assert_eq!(tokens_bytes(&p2, 5), 51_200);
        assert_eq!(p2.bucket.credit_ns(5), 51_200_000 * 2, "the same bytes at half the rate");
        // Idle for 10 ms at the old 1 MB/s since the last packet: 10,000 B more.
        let p3 = l2.policer(Some(&half), 5 + 10_000_000);
        assert_eq!(tokens_bytes(&p3, 5 + 10_000_000), 61_200);
        // A full bucket stays capped at the burst however long it idles.
        assert_eq!(tokens_bytes(&p, u64::MAX), 102_400);
    }

    /// The token bucket the policer kept before GCRA (credit refilled on
    /// each packet, under a spin lock): the reference GCRA must agree with.
    struct Refill {
        depth: u64,
        tokens: i64,
        last: u64,
    }

    impl Refill {
        fn admit(&mut self, now: u64, cost: u64) -> bool {
            let elapsed = now.saturating_sub(self.last);
            self.last = self.last.max(now);
            let t = (self.tokens + elapsed as i64).min(self.depth as i64);
            let pass = t > 0;
            self.tokens = if pass { t - cost as i64 } else { t };
            pass
        }
    }

    proptest::proptest! {
        /// On any sequence of packets (time moving forward), the GCRA bucket
        /// passes and drops exactly what the refilled token bucket did, and
        /// shows the same credit after each.
        #[test]
        fn gcra_decides_as_the_token_bucket_did(
            depth in 1u64..10_000_000,
            start in 0u64..1_000_000_000,
            full in proptest::bool::ANY,
            packets in proptest::collection::vec((0u64..3_000_000, 0u64..20_000_000), 1..300),
        ) {
            let tokens = if full { depth as i64 } else { 0 };
            let mut old = Refill { depth, tokens, last: start };
            let b = Bucket { burst_ns: depth, ..Bucket::default() };
            let mut new = Bucket { tat_ns: b.tat_for_credit(start, tokens), ..b };
            let mut now = start;
            for (gap, cost) in packets {
                now += gap;
                proptest::prop_assert_eq!(new.admit(now, cost, 0), old.admit(now, cost), "at {}", now);
                proptest::prop_assert_eq!(new.credit_ns(now), old.tokens);
            }
        }
    }
}
