//! Typed errors of the card link. Everything the card says is untrusted: any
//! malformed, hostile or silent answer ends up as one of these, never a panic.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CardError {
    /// The transport could not be opened (socket missing, /dev/vfio absent, ...).
    #[error("cannot open the card link: {0}")]
    Open(String),
    /// A read or write on the link failed at the transport level.
    #[error("card link I/O failed: {0}")]
    Io(String),
    /// The card did not answer a link access within the timeout: it is silent.
    #[error("card did not answer within {timeout_ms} ms ({what})")]
    Timeout { what: &'static str, timeout_ms: u64 },
    /// The link was lost earlier (timeout or peer gone); reconnect first.
    #[error("card link is broken ({0}); reconnect")]
    LinkBroken(String),
    /// The card's heartbeat did not advance for three periods.
    #[error("card stalled: heartbeat stuck at {heartbeat} for {stuck_ms} ms (period {period_ms} ms)")]
    Stalled { heartbeat: u64, stuck_ms: u64, period_ms: u32 },
    /// The card reports a health state of failed.
    #[error("card reports itself failed (health {0})")]
    Failed(u32),
    /// BAR0 does not start with the card's magic: not our card, garbage, or all-ones (gone).
    #[error("bad magic {found:#010x} in BAR0 (expected {expected:#010x})")]
    BadMagic { found: u32, expected: u32 },
    /// The card speaks an ABI major version this host does not.
    #[error("card ABI {major}.{minor} is not supported (host speaks {host_major}.x)")]
    AbiVersion { major: u16, minor: u16, host_major: u16 },
    /// A checksum over card data did not match.
    #[error("checksum mismatch in {what}: card says {stated:#010x}, data gives {computed:#010x}")]
    Checksum { what: &'static str, stated: u32, computed: u32 },
    /// A length or count field is out of its documented range.
    #[error("{what} = {value} is out of range ({range})")]
    Range { what: &'static str, value: u64, range: &'static str },
    /// Data is shorter than its header says.
    #[error("{what} truncated: need {need} bytes, have {have}")]
    Truncated { what: &'static str, need: usize, have: usize },
    /// A field holds a value with no meaning in the ABI.
    #[error("{what} has unknown value {value}")]
    Unknown { what: &'static str, value: u64 },
    /// The response does not belong to the request (sequence or opcode mismatch).
    #[error("mailbox response out of order: expected seq {expected} op {op}, got seq {got_seq} op {got_op}")]
    OutOfOrder { expected: u32, op: u16, got_seq: u32, got_op: u16 },
    /// The card executed the command and refused it.
    #[error("card refused {op}: {status} ({message})")]
    Refused { op: &'static str, status: crate::mailbox::Status, message: String },
    /// A host-side argument was refused before anything was sent.
    #[error("invalid request: {0}")]
    Invalid(String),
}

pub type Result<T, E = CardError> = std::result::Result<T, E>;
