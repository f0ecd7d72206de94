//! The guest/VMM contract: memory layout, ports and the control-channel
//! message frame. This file is `core`-only because the freestanding guest
//! includes it verbatim (`#[path]`), so both sides share one definition.

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
    /// Write one word into each of `arg` pages from [`super::SCRATCH_BASE`]
    /// (dirties guest RAM, e.g. to measure snapshots of a busy guest).
    pub const TOUCH: u64 = 5;
    /// Sum of the words TOUCH wrote into the first `arg` scratch pages.
    pub const CHECKSUM: u64 = 6;
    /// Self tests of the VMM's error handling (a hostile guest on purpose).
    pub const BAD_MMIO: u64 = 0x100;
    pub const BAD_DESCRIPTOR: u64 = 0x101;
    pub const TRIPLE_FAULT: u64 = 0x102;
    /// An 8-byte access to a 32-bit virtio-mmio register.
    pub const BAD_WIDTH: u64 = 0x104;
    /// Ask the VMM to stop the VM (exit port).
    pub const SHUTDOWN: u64 = 0x103;
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

/// Banner the agent prints on the serial console once it is ready.
pub const BANNER: &str = "mc-agent ready";

/// Encode eight words into a frame.
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
