//! Protocol 2's log records. The host captures each user VM's log lines and
//! numbers them per VM as it captures them (`host_seq`, from 1, no gaps);
//! the log agent sequences them into its own per-VM log (`log_seq`) and
//! acknowledges, per VM, the host numbers it has taken. The host keeps a
//! line until it is acknowledged and sends it again after a failed or
//! interrupted exchange (a move of the log VM); the agent recognises what it
//! has already taken by its host number, so every line is in the log
//! exactly once, in order.
//!
//! The LogLines message's header parameter is the host's epoch (a number
//! a restarted governor changes).
//!
//! A line longer than [`TEXT_LEN`] bytes is cut into records; every record
//! but the last of a line carries [`FLAG_CONTINUES`]. A record is one unit
//! for numbering (`host_seq`) and for the log.

pub const RECORD_LEN: usize = 256;
pub const ACK_LEN: usize = 32;
/// Text bytes one record carries.
pub const TEXT_LEN: usize = RECORD_LEN - 16;
/// More of the same line follows in the next record.
pub const FLAG_CONTINUES: u16 = 1;
/// From the VM's error stream (stderr).
pub const FLAG_STDERR: u16 = 2;

/// One captured piece of a user VM's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogRecord {
    pub slot: u32,
    pub flags: u16,
    pub host_seq: u64,
    pub len: u16,
    pub text: [u8; TEXT_LEN],
}

impl LogRecord {
    pub fn text(&self) -> &[u8] {
        &self.text[..self.len as usize]
    }

    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[0..4].copy_from_slice(&self.slot.to_le_bytes());
        b[4..6].copy_from_slice(&self.flags.to_le_bytes());
        b[6..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..16].copy_from_slice(&self.host_seq.to_le_bytes());
        b[16..].copy_from_slice(&self.text);
        b
    }

    /// Refuses a length past the text, unknown flags, host number 0, and
    /// bytes after the text that are not zero.
    pub fn decode(b: &[u8; RECORD_LEN]) -> Option<LogRecord> {
        let flags = u16::from_le_bytes([b[4], b[5]]);
        let len = u16::from_le_bytes([b[6], b[7]]);
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&b[8..16]);
        let host_seq = u64::from_le_bytes(seq);
        if len as usize > TEXT_LEN || flags & !(FLAG_CONTINUES | FLAG_STDERR) != 0 || host_seq == 0 {
            return None;
        }
        if b[16 + len as usize..].iter().any(|&x| x != 0) {
            return None;
        }
        let mut text = [0u8; TEXT_LEN];
        text.copy_from_slice(&b[16..]);
        Some(LogRecord { slot: u32::from_le_bytes([b[0], b[1], b[2], b[3]]), flags, host_seq, len, text })
    }
}

/// What the log agent took for one VM in one exchange: host numbers
/// `first_host..=last_host` now have log numbers `first_log..`, and the
/// agent holds every host number up to `last_host`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogAck {
    pub slot: u32,
    pub first_host: u64,
    pub last_host: u64,
    pub first_log: u64,
}

impl LogAck {
    pub fn encode(&self) -> [u8; ACK_LEN] {
        let mut b = [0u8; ACK_LEN];
        b[0..4].copy_from_slice(&self.slot.to_le_bytes());
        b[8..16].copy_from_slice(&self.first_host.to_le_bytes());
        b[16..24].copy_from_slice(&self.last_host.to_le_bytes());
        b[24..32].copy_from_slice(&self.first_log.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; ACK_LEN]) -> Option<LogAck> {
        let w = |at: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(x)
        };
        if b[4..8].iter().any(|&x| x != 0) {
            return None;
        }
        let a = LogAck {
            slot: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            first_host: w(8),
            last_host: w(16),
            first_log: w(24),
        };
        (a.first_host >= 1 && a.last_host >= a.first_host && a.first_log >= 1).then_some(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_lies_are_refused() {
        let mut text = [0u8; TEXT_LEN];
        text[..5].copy_from_slice(b"hello");
        let r = LogRecord { slot: 2, flags: FLAG_STDERR, host_seq: 7, len: 5, text };
        assert_eq!(LogRecord::decode(&r.encode()), Some(r));
        assert_eq!(r.text(), b"hello");
        let mut b = r.encode();
        b[6..8].copy_from_slice(&(TEXT_LEN as u16 + 1).to_le_bytes());
        assert_eq!(LogRecord::decode(&b), None, "a length past the text");
        let mut b = r.encode();
        b[16 + 6] = b'x';
        assert_eq!(LogRecord::decode(&b), None, "bytes after the text");
        let mut b = r.encode();
        b[8..16].copy_from_slice(&0u64.to_le_bytes());
        assert_eq!(LogRecord::decode(&b), None, "host number 0");
        let a = LogAck { slot: 2, first_host: 3, last_host: 9, first_log: 100 };
        assert_eq!(LogAck::decode(&a.encode()), Some(a));
        let bad = LogAck { last_host: 2, ..a };
        assert_eq!(LogAck::decode(&bad.encode()), None, "an empty or backwards range");
    }
}
