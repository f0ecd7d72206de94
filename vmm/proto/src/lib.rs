//! The guest/VMM contract: memory layout, ports and the control-channel
//! message frame. One crate used by both sides (the `vmm` library and the
//! freestanding guest in `vmm/guest`), so a change to the contract is one
//! change that both compile against. `no_std` and without dependencies
//! because the guest runs with no runtime at all.
#![no_std]

/// Little-endian fields of the fixed-size records (callers check lengths).
mod le {
    pub fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    pub fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    pub fn u64_at(b: &[u8], at: usize) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(w)
    }
}

pub mod logs;
pub mod msg;
pub mod qos;
pub mod signals;

/// Guest-physical address where the guest image is linked and loaded.
pub const IMAGE_BASE: u64 = 0x20_0000;
/// Page tables built by the VMM: PML4, one PDPT, four PDs (identity map of
/// the low 4 GiB with 2 MiB pages, all user-accessible).
pub const PML4_ADDR: u64 = 0x1000;
/// GDT built by the VMM (null, kernel code/data, user data/code, TSS).
pub const GDT_ADDR: u64 = 0x500;
/// TSS built by the VMM, with an all-zero I/O permission bitmap so the
/// agent may use the serial, idle and exit ports from CPL3 (0x8000..0xa068).
pub const TSS_ADDR: u64 = 0x8000;
/// Initial stack pointer (top of a stack just below the image).
pub const STACK_TOP: u64 = 0x1f_f000;

/// Start of the scratch area the TOUCH request dirties (above the image).
pub const SCRATCH_BASE: u64 = 0x40_0000;

/// Protocol 2's bulk windows in guest RAM, between the image and the
/// scratch area: the VMM writes one message ([`msg`]) into the in-window
/// and sends a request frame naming its length; the agent checks it whole,
/// answers into the out-window and replies with that length. Guest memory,
/// so a snapshot carries what is in them.
pub const BULK_IN_ADDR: u64 = 0x30_0000;
pub const BULK_IN_LEN: u64 = 0x8_0000;
pub const BULK_OUT_ADDR: u64 = 0x38_0000;
pub const BULK_OUT_LEN: u64 = 0x8_0000;
/// A reply value with this bit set is the agent refusing the in-message;
/// the low byte is [`msg::MsgError::code`].
pub const BULK_REFUSED: u64 = 1 << 63;

/// 16550/8250 console (COM1).
pub const SERIAL_PORT: u16 = 0x3f8;
/// `out` here means "nothing to do": the VMM parks the vCPU until a request
/// arrives (or a short timeout), a paravirtual halt for a CPL3 guest.
pub const IDLE_PORT: u16 = 0x510;
/// `out` here with a byte: the guest asks to stop; the byte is its exit code.
pub const EXIT_PORT: u16 = 0x511;

/// The virtio-mmio control device (virtio-console, one port).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// An address where nothing is mapped (used by the bad-MMIO self test).
pub const UNMAPPED_MMIO: u64 = 0xe000_0000;

/// Queue size the guest driver uses for both queues.
pub const QUEUE_SIZE: u16 = 16;
/// Queue 0 (receiveq): VMM -> guest requests.  Queue 1 (transmitq):
/// guest -> VMM responses and log records.
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;

/// One frame on the control channel: eight little-endian u64 words.
pub const FRAME_LEN: usize = 64;

pub const KIND_REQUEST: u64 = 0x5145_5251; // "QREQ"
pub const KIND_RESPONSE: u64 = 0x5053_4552; // "RESP"
pub const KIND_LOG: u64 = 0x474f_4c00; // "LOG"

/// Request operations (word 1 of a request frame).
pub mod op {
    /// Answer with value = PONG.
    pub const PING: u64 = 1;
    /// Run one management task step of `arg` work units; emits one log record.
    pub const STEP: u64 = 2;
    /// Report counters.
    pub const COUNTERS: u64 = 3;
    /// Autonomous stepping: arg = work units per step, 0 = off.
    pub const AUTO: u64 = 4;
    /// Write one word (its page index) into each of `count` pages from
    /// scratch page `first` ([`super::SCRATCH_BASE`] is page 0), with
    /// arg = count | first << 32 (dirties guest RAM, e.g. to measure
    /// snapshots of a busy guest).
    pub const TOUCH: u64 = 5;
    /// Sum of the words TOUCH wrote into the first `arg` scratch pages.
    pub const CHECKSUM: u64 = 6;
    /// Status monitoring: the in-window holds a Telemetry message of `arg`
    /// bytes; the agent answers a Health message (the changes) in the
    /// out-window and replies with its length (or BULK_REFUSED | code).
    pub const MONITOR_TICK: u64 = 7;
    /// Self test: answer a monitor tick with a malformed out-message.
    pub const BAD_BULK: u64 = 0x105;
    /// Self test that persists (agent state, so a snapshot carries it):
    /// from now on every bulk answer is hostile in the way `arg` names
    /// ([`super::hostile`]); 0 makes the agent honest again.
    pub const HOSTILE: u64 = 0x106;
    /// Log management: the in-window holds a LogLines message of `arg`
    /// bytes; the agent answers a LogAcks message (or BULK_REFUSED | code).
    pub const LOG_TAKE: u64 = 8;
    /// QoS policy: the in-window holds a QosTick message of `arg` bytes;
    /// the agent answers a QosChanges message (or BULK_REFUSED | code).
    pub const QOS_TICK: u64 = 9;
    /// Self tests of the VMM's error handling (a hostile guest on purpose).
    pub const BAD_MMIO: u64 = 0x100;
    pub const BAD_DESCRIPTOR: u64 = 0x101;
    pub const TRIPLE_FAULT: u64 = 0x102;
    /// An 8-byte access to a 32-bit virtio-mmio register.
    pub const BAD_WIDTH: u64 = 0x104;
    /// Ask the VMM to stop the VM (exit port).
    pub const SHUTDOWN: u64 = 0x103;
}

/// How a hostile agent ([`op::HOSTILE`]) spoils its bulk answers.
pub mod hostile {
    pub const HONEST: u64 = 0;
    /// An answer length past the out-window.
    pub const TOO_LONG: u64 = 1;
    /// A well-formed message of another kind than the task answers with.
    pub const WRONG_KIND: u64 = 2;
    /// A record count the message's length does not carry.
    pub const LYING_COUNT: u64 = 3;
}

pub const PONG: u64 = 0x676e_6f70;

/// Frame word indices.
pub mod word {
    pub const KIND: usize = 0;
    pub const OP: usize = 1;
    pub const ID: usize = 2;
    pub const ARG: usize = 3;
    /// In responses and logs: the work counter, the log sequence number,
    /// the number of steps, a result value.
    pub const WORK: usize = 3;
    pub const LOG_SEQ: usize = 4;
    pub const STEPS: usize = 5;
    pub const VALUE: usize = 6;
    pub const REQUESTS: usize = 7;
}

// The layout checked where both sides compile it: a change that makes two
// regions overlap fails the build of the VMM and of the guest alike.
// GDT (7 slots) < page tables (PML4, PDPT, 4 PDs) < TSS + I/O bitmap +
// terminator < stack top <= image < scratch < MMIO window < unmapped probe.
const _: () = {
    assert!(GDT_ADDR + 7 * 8 <= PML4_ADDR);
    assert!(PML4_ADDR + 6 * 0x1000 <= TSS_ADDR);
    assert!(TSS_ADDR + 0x68 + 8192 < STACK_TOP);
    assert!(STACK_TOP <= IMAGE_BASE && IMAGE_BASE < SCRATCH_BASE);
    assert!(SCRATCH_BASE < VIRTIO_MMIO_BASE && VIRTIO_MMIO_BASE + VIRTIO_MMIO_SIZE <= UNMAPPED_MMIO);
    assert!(QUEUE_SIZE.is_power_of_two() && RX_QUEUE != TX_QUEUE);
    assert!(IDLE_PORT >= SERIAL_PORT + 8 && EXIT_PORT >= SERIAL_PORT + 8);
    assert!(KIND_REQUEST != KIND_RESPONSE && KIND_RESPONSE != KIND_LOG && KIND_LOG != KIND_REQUEST);
    // The bulk windows sit between the image (linked below BULK_IN_ADDR,
    // checked by the guest's linker script) and the scratch area, and hold
    // the largest message.
    assert!(IMAGE_BASE < BULK_IN_ADDR && BULK_IN_ADDR + BULK_IN_LEN <= BULK_OUT_ADDR);
    assert!(BULK_OUT_ADDR + BULK_OUT_LEN <= SCRATCH_BASE);
    assert!(msg::MSG_HEADER_LEN as u64 + msg::MAX_PAYLOAD as u64 <= BULK_IN_LEN);
    assert!(msg::MSG_HEADER_LEN as u64 + msg::MAX_PAYLOAD as u64 <= BULK_OUT_LEN);
};

/// Banner the agent prints on the serial console once it is ready.
pub const BANNER: &str = "mc-agent ready";

/// Encode eight words into a frame.
///
/// `#[inline]` on both: the guest is optimized for size, and without the
/// hint it no longer inlines these across the crate boundary (its image was
/// 42 bytes larger than when the contract was a module of the guest; with
/// it the image is byte for byte the same).
#[inline]
pub fn encode(words: &[u64; 8]) -> [u8; FRAME_LEN] {
    let mut out = [0u8; FRAME_LEN];
    let mut i = 0;
    while i < 8 {
        let b = words[i].to_le_bytes();
        let mut j = 0;
        while j < 8 {
            out[i * 8 + j] = b[j];
            j += 1;
        }
        i += 1;
    }
    out
}

/// Decode a frame into eight words.
#[inline]
pub fn decode(bytes: &[u8; FRAME_LEN]) -> [u64; 8] {
    let mut words = [0u64; 8];
    let mut i = 0;
    while i < 8 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
        words[i] = u64::from_le_bytes(b);
        i += 1;
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_are_little_endian() {
        let words = [KIND_REQUEST, op::STEP, 7, 1000, u64::MAX, 0, 0x0102_0304_0506_0708, 1 << 63];
        let bytes = encode(&words);
        assert_eq!(decode(&bytes), words);
        // Word i occupies bytes 8i..8i+8, least significant byte first.
        assert_eq!(&bytes[0..8], &KIND_REQUEST.to_le_bytes());
        assert_eq!(&bytes[48..56], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(bytes[63], 0x80);
    }

    #[test]
    fn word_indices_fit_a_frame_and_do_not_collide() {
        let request = [word::KIND, word::OP, word::ID, word::ARG];
        let reply =
            [word::KIND, word::OP, word::ID, word::WORK, word::LOG_SEQ, word::STEPS, word::VALUE, word::REQUESTS];
        for set in [&request[..], &reply[..]] {
            for (i, a) in set.iter().enumerate() {
                assert!(*a < FRAME_LEN / 8, "index {a} is outside the frame");
                for b in &set[i + 1..] {
                    assert_ne!(a, b, "two fields share word {a}");
                }
            }
        }
        // A reply's work counter sits where a request's argument was.
        assert_eq!(word::WORK, word::ARG);
    }

    #[test]
    fn op_codes_are_distinct() {
        let ops = [
            op::PING,
            op::STEP,
            op::COUNTERS,
            op::AUTO,
            op::TOUCH,
            op::CHECKSUM,
            op::BAD_MMIO,
            op::BAD_DESCRIPTOR,
            op::TRIPLE_FAULT,
            op::BAD_WIDTH,
            op::SHUTDOWN,
            op::MONITOR_TICK,
            op::BAD_BULK,
            op::LOG_TAKE,
            op::QOS_TICK,
            op::HOSTILE,
        ];
        for (i, a) in ops.iter().enumerate() {
            assert!(!ops[i + 1..].contains(a), "op code {a:#x} used twice");
        }
    }
}
