//! Typed errors of the card link. Everything the card says is untrusted: any
//! malformed, hostile or silent answer ends up as one of these, never a panic.
//! Errors that come from below (the OS, the vfio-user client, `vfio-ioctls`)
//! keep that error as their source and say what was being done.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CardError {
    /// The card's socket path does not resolve: nothing is there to connect to.
    #[error("card socket {path}: {source}")]
    SocketPath {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Nothing answers at the card's socket: it does not exist, or nobody
    /// accepts on it (a card process gone without removing it).
    #[error("no card is listening at {path}: {why}")]
    NotListening { path: PathBuf, why: &'static str },
    /// The vfio-user handshake with the card failed (refused, hung up, not a
    /// vfio-user server).
    #[error("vfio-user connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: crate::transport::vfio_user::VfioUserError,
    },
    /// Kernel VFIO is missing on this host (checked before any ioctl).
    #[error("kernel VFIO is unavailable: {0}")]
    VfioUnavailable(String),
    /// A kernel VFIO operation (container, device, interrupts) failed.
    #[error("kernel VFIO: {what}: {source}")]
    Vfio {
        what: String,
        #[source]
        source: vfio_ioctls::VfioError,
    },
    /// A host-side resource of the link failed (eventfd, poll, socket
    /// options): a problem of this host, not of the card.
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// The host-side sink or source of a snapshot stream failed (the file or
    /// buffer the caller handed in), not the card.
    #[error("snapshot stream: {what}: {source}")]
    Stream {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// A transfer on the link failed at the transport level: the card hung
    /// up (process gone, link closed) or the stream broke.
    #[error("card link {what} failed: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: crate::transport::vfio_user::VfioUserError,
    },
    /// The card did not answer a link access within the timeout: it is silent.
    #[error("card did not answer within {timeout_ms} ms ({what})")]
    Timeout { what: &'static str, timeout_ms: u64 },
    /// The link was lost earlier (timeout or peer gone); reconnect first.
    #[error("card link is broken ({0}); reconnect")]
    LinkBroken(String),
    /// No request slot is free: the card holds `in_flight` requests it has
    /// not consumed (commands the host gave up on, or a previous host's).
    /// Nothing was sent; retry once the card consumes again.
    #[error("card mailbox busy: {in_flight} of {slots} request slots not yet consumed by the card")]
    MailboxBusy { in_flight: u32, slots: u32 },
    /// A command the host gave up on (timed out) is still unanswered by
    /// the card: nothing was sent. The card is slow or silent; its health
    /// check says which.
    #[error("card has not answered {pending} command(s) given up on; nothing sent")]
    Unanswered { pending: u32 },
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
    /// An echo came back (in order) with other contents than were sent: the
    /// card corrupts data it should return untouched.
    #[error("echo mismatch: sent {sent}, got {got}{}", payload_note(.payload_differs))]
    EchoMismatch { sent: u64, got: u64, payload_differs: bool },
    /// The card executed the command and refused it.
    #[error("card refused {op}: {status} ({message})")]
    Refused { op: &'static str, status: crate::mailbox::Status, message: String },
    /// The card's ABI does not offer this (an older minor, or the feature
    /// bit is clear); nothing was sent.
    #[error("card (ABI 1.{minor}) does not offer {what}: it needs {needs}")]
    Unsupported { what: &'static str, needs: &'static str, minor: u16 },
    /// Memory the card shares with the host (a mapped BAR, a DMA buffer)
    /// was being rewritten on every attempt to read it consistently: a
    /// torn copy is never accepted.
    #[error("{what}: torn by the card on all {tries} reads")]
    Torn { what: &'static str, tries: u32 },
    /// A host-side argument was refused before anything was sent.
    #[error("invalid request: {0}")]
    Invalid(String),
}

fn payload_note(differs: &bool) -> &'static str {
    if *differs {
        " (payload differs)"
    } else {
        ""
    }
}

pub type Result<T, E = CardError> = std::result::Result<T, E>;
