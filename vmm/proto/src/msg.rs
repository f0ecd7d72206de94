//! Protocol 2 of the management channel: bulk messages. A tick's telemetry
//! for up to [`MAX_RECORDS`] user VMs, the health changes a monitor agent
//! decides, log lines, limit changes: each a 32-byte header and `count`
//! fixed-size records, checked whole (magic, kind, record size, count x
//! size = length, bounds, CRC-32) before any record is read, on both sides.
//! A message that fails a check is refused as a unit; the side that
//! receives it stops the peer that sent it (a hostile agent stops only its
//! own VM).
//!
//! Header (little endian): u32 magic "MCM2", u16 kind, u16 record size,
//! u64 sequence, u32 count, u32 payload length, u32 CRC-32 (IEEE) of the
//! payload, u32 parameter of the kind (Telemetry: the tick period in ms,
//! 100..=60000, so the agent's time bounds hold at any tick; LogLines: the
//! host's epoch; QosTick: the card's network use and threshold; Health,
//! LogAcks and QosChanges: zero).

use crate::le::{u16_at, u32_at, u64_at};

/// "MCM2" little endian.
pub const MSG_MAGIC: u32 = u32::from_le_bytes(*b"MCM2");
pub const MSG_HEADER_LEN: usize = 32;
/// The most records in one message (the scale: 1,000 VMs a tick).
pub const MAX_RECORDS: u32 = 1024;
/// The largest payload: [`MAX_RECORDS`] of the largest record.
pub const MAX_PAYLOAD: usize = MAX_RECORDS as usize * 256;

/// What a message carries, and the size of its records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsgKind {
    /// Host -> agent: one [`crate::signals::VmSignals`] per user VM.
    Telemetry = 1,
    /// Agent -> host: one [`crate::signals::HealthChange`] per VM whose state changed.
    Health = 2,
    /// Host -> agent: user VMs' log lines, one [`crate::logs::LogRecord`] each.
    LogLines = 3,
    /// Agent -> host: what the log agent sequenced, one [`crate::logs::LogAck`] per VM.
    LogAcks = 4,
    /// Host -> agent: one [`crate::qos::QosSignals`] per user VM; the
    /// parameter is the card's network use and threshold
    /// ([`crate::qos::card_param`]).
    QosTick = 5,
    /// Agent -> host: the limit changes the qos agent decided, one
    /// [`crate::qos::QosChange`] each.
    QosChanges = 6,
}

impl MsgKind {
    pub fn from_u16(v: u16) -> Option<MsgKind> {
        match v {
            1 => Some(MsgKind::Telemetry),
            2 => Some(MsgKind::Health),
            3 => Some(MsgKind::LogLines),
            4 => Some(MsgKind::LogAcks),
            5 => Some(MsgKind::QosTick),
            6 => Some(MsgKind::QosChanges),
            _ => None,
        }
    }

    /// The record size every message of this kind must use.
    pub fn record_len(self) -> usize {
        match self {
            MsgKind::Telemetry => crate::signals::SIGNALS_LEN,
            MsgKind::Health => crate::signals::CHANGE_LEN,
            MsgKind::LogLines => crate::logs::RECORD_LEN,
            MsgKind::LogAcks => crate::logs::ACK_LEN,
            MsgKind::QosTick => crate::qos::QOS_SIGNALS_LEN,
            MsgKind::QosChanges => crate::qos::QOS_CHANGE_LEN,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsgHeader {
    pub kind: MsgKind,
    /// Telemetry: the tick period (ms); LogLines: the host's epoch; else 0.
    pub param: u32,
    pub seq: u64,
    pub count: u32,
    pub len: u32,
    pub crc: u32,
}

/// Why a message was refused (the field that was wrong).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsgError {
    /// Shorter than its header, or than its header says.
    Short,
    Magic,
    Kind(u16),
    RecordLen(u16),
    /// More records than [`MAX_RECORDS`].
    Count(u32),
    /// Payload length other than count x record size, or past [`MAX_PAYLOAD`].
    Len(u32),
    Crc,
    /// The kind's parameter word is out of its range.
    Param(u32),
    /// Bytes after the payload.
    Trailing,
}

impl MsgError {
    /// A small code for a reply word (and back with [`MsgError::from_code`]).
    pub fn code(self) -> u64 {
        match self {
            MsgError::Short => 1,
            MsgError::Magic => 2,
            MsgError::Kind(_) => 3,
            MsgError::RecordLen(_) => 4,
            MsgError::Count(_) => 5,
            MsgError::Len(_) => 6,
            MsgError::Crc => 7,
            MsgError::Param(_) => 8,
            MsgError::Trailing => 9,
        }
    }

    /// The field a refusal code names ("record" for a record that did not
    /// decode, code 10; "order" for a batch whose VMs' records are mixed, 11).
    pub fn field_of_code(code: u64) -> &'static str {
        match code {
            1 => "length",
            2 => "magic",
            3 => "kind",
            4 => "record size",
            5 => "count",
            6 => "payload length",
            7 => "crc",
            8 => "parameter",
            9 => "trailing bytes",
            10 => "record",
            11 => "order (a VM's records must be together)",
            _ => "unknown",
        }
    }

    /// The field, for error messages.
    pub fn field(self) -> &'static str {
        match self {
            MsgError::Short => "length",
            MsgError::Magic => "magic",
            MsgError::Kind(_) => "kind",
            MsgError::RecordLen(_) => "record size",
            MsgError::Count(_) => "count",
            MsgError::Len(_) => "payload length",
            MsgError::Crc => "crc",
            MsgError::Param(_) => "parameter",
            MsgError::Trailing => "trailing bytes",
        }
    }
}

/// CRC-32 (IEEE, reflected, as `crc32fast` and the card ABI): a 1 KiB
/// table built at compile time, so the guest needs no allocation.
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Write the header of a message of `kind` whose payload is `payload`
/// (`count` records) into `out[..MSG_HEADER_LEN]`.
pub fn write_header(out: &mut [u8; MSG_HEADER_LEN], kind: MsgKind, param: u32, seq: u64, count: u32, payload: &[u8]) {
    out[0..4].copy_from_slice(&MSG_MAGIC.to_le_bytes());
    out[4..6].copy_from_slice(&(kind as u16).to_le_bytes());
    out[6..8].copy_from_slice(&(kind.record_len() as u16).to_le_bytes());
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    out[16..20].copy_from_slice(&count.to_le_bytes());
    out[20..24].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    out[24..28].copy_from_slice(&crc32(payload).to_le_bytes());
    out[28..32].copy_from_slice(&param.to_le_bytes());
}

/// Check a whole message (`buf` holds exactly one) and return its header
/// and payload. Nothing of the payload is trusted until this returns Ok.
pub fn check(buf: &[u8]) -> Result<(MsgHeader, &[u8]), MsgError> {
    if buf.len() < MSG_HEADER_LEN {
        return Err(MsgError::Short);
    }
    if u32_at(buf, 0) != MSG_MAGIC {
        return Err(MsgError::Magic);
    }
    let raw = u16_at(buf, 4);
    let kind = MsgKind::from_u16(raw).ok_or(MsgError::Kind(raw))?;
    let rec = u16_at(buf, 6);
    if rec as usize != kind.record_len() {
        return Err(MsgError::RecordLen(rec));
    }
    let count = u32_at(buf, 16);
    if count > MAX_RECORDS {
        return Err(MsgError::Count(count));
    }
    let len = u32_at(buf, 20);
    if len as usize > MAX_PAYLOAD || len as usize != count as usize * kind.record_len() {
        return Err(MsgError::Len(len));
    }
    let param = u32_at(buf, 28);
    let param_ok = match kind {
        MsgKind::Telemetry => (100..=60_000).contains(&param),
        // LogLines: the host's epoch (any value; see `crate::logs`).
        MsgKind::LogLines => true,
        MsgKind::QosTick => crate::qos::split_card_param(param).is_some(),
        MsgKind::Health | MsgKind::LogAcks | MsgKind::QosChanges => param == 0,
    };
    if !param_ok {
        return Err(MsgError::Param(param));
    }
    let end = MSG_HEADER_LEN + len as usize;
    if buf.len() < end {
        return Err(MsgError::Short);
    }
    if buf.len() > end {
        return Err(MsgError::Trailing);
    }
    let payload = &buf[MSG_HEADER_LEN..end];
    let crc = u32_at(buf, 24);
    if crc32(payload) != crc {
        return Err(MsgError::Crc);
    }
    Ok((MsgHeader { kind, param, seq: u64_at(buf, 8), count, len, crc }, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: MsgKind, count: u32) -> ([u8; MSG_HEADER_LEN], [u8; 4096]) {
        let payload = [0x5au8; 4096];
        let n = count as usize * kind.record_len();
        let mut h = [0u8; MSG_HEADER_LEN];
        write_header(&mut h, kind, 0, 7, count, &payload[..n]);
        (h, payload)
    }

    fn joined(h: &[u8], p: &[u8], n: usize, out: &mut [u8; 8192]) -> usize {
        out[..MSG_HEADER_LEN].copy_from_slice(h);
        out[MSG_HEADER_LEN..MSG_HEADER_LEN + n].copy_from_slice(&p[..n]);
        MSG_HEADER_LEN + n
    }

    #[test]
    fn crc_matches_the_ieee_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn a_message_round_trips_and_every_field_is_checked() {
        let (h, p) = message(MsgKind::Health, 3);
        let n = 3 * MsgKind::Health.record_len();
        let mut buf = [0u8; 8192];
        let len = joined(&h, &p, n, &mut buf);
        let (hd, payload) = check(&buf[..len]).expect("valid");
        assert_eq!((hd.kind, hd.seq, hd.count, payload.len()), (MsgKind::Health, 7, 3, n));
        let bad = |at: usize, v: u8| {
            let mut b = buf;
            b[at] ^= v;
            check(&b[..len]).unwrap_err()
        };
        assert_eq!(bad(0, 1), MsgError::Magic);
        assert_eq!(bad(4, 0x7f), MsgError::Kind(0x7d));
        assert!(matches!(bad(6, 1), MsgError::RecordLen(_)));
        assert!(matches!(bad(18, 1), MsgError::Count(_)));
        assert!(matches!(bad(16, 1), MsgError::Len(_)), "a count the length does not carry");
        assert_eq!(bad(24, 1), MsgError::Crc);
        assert_eq!(bad(29, 1), MsgError::Param(256), "a Health message has no parameter");
        assert_eq!(bad(MSG_HEADER_LEN + 1, 1), MsgError::Crc, "a payload byte changed");
        assert_eq!(check(&buf[..len - 1]), Err(MsgError::Short));
        assert_eq!(check(&buf[..len + 1]), Err(MsgError::Trailing));
        // A Telemetry message must say its tick period (100..=60000 ms).
        let mut t = [0u8; MSG_HEADER_LEN];
        write_header(&mut t, MsgKind::Telemetry, 99, 1, 0, &[]);
        assert_eq!(check(&t), Err(MsgError::Param(99)));
        write_header(&mut t, MsgKind::Telemetry, 1000, 1, 0, &[]);
        assert!(check(&t).is_ok());
        for cut in 0..MSG_HEADER_LEN {
            assert_eq!(check(&buf[..cut]), Err(MsgError::Short));
        }
    }
}
