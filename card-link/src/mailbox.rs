//! The command mailbox in BAR2 (ABI 1.2, see ABI.md): a request ring and a
//! response ring of fixed-size slots, producer/consumer counters, a doorbell,
//! and a completion interrupt (an eventfd). This module holds the wire format
//! of messages and payloads and their validating decoders; `card.rs` drives it.

use std::fmt;

use crate::error::{CardError, Result};
use crate::wire::{Reader, Writer};

// The payloads of VM and event commands live in `vms.rs`; their paths
// stay `mailbox::*`.
pub use crate::vms::{decode_events, decode_vm_list, encode_events, encode_vm_list, Event, VmInfo, VmSpec, VmState};

// BAR2 register offsets.
pub const REG_REQ_PRODUCED: u64 = 0x00; // doorbell: host writes its producer count
pub const REG_REQ_CONSUMED: u64 = 0x04;
pub const REG_RESP_PRODUCED: u64 = 0x08;
pub const REG_RESP_CONSUMED: u64 = 0x0c;
pub const REG_SLOTS: u64 = 0x10;
pub const REG_SLOT_SIZE: u64 = 0x14;
/// ABI 1.3 (feature MAPPED): the card sets this word to 1 before it sleeps
/// on REQ_PRODUCED as a futex and back to 0 when it wakes. A host that rang
/// the doorbell in mapped memory wakes the futex only while it is 1, so a
/// card that is polling costs the host no system call.
pub const REG_CARD_WAITING: u64 = 0x18;
pub const RINGS_OFFSET: u64 = 0x1000;

pub const DEFAULT_SLOTS: u32 = 4;
/// 1 MiB less 4 KiB: a whole slot fits one vfio-user transfer (1 MiB max).
pub const DEFAULT_SLOT_SIZE: u32 = 0xff000;
pub const MAX_SLOTS: u32 = 64;
pub const MAX_SLOT_SIZE: u32 = 1 << 20;
pub const MAX_VMS: u32 = 256;
pub const MAX_NAME: usize = 64;
pub const MAX_EVENT_MSG: usize = 1024;

pub const MSG_MAGIC: u32 = u32::from_le_bytes(*b"MBOX");
pub const MSG_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 48;
pub const FLAG_RING: u16 = 1;
/// Offsets of the flags and ring fields in the header (the card reads them
/// straight from a slot write to see whether it rings the doorbell).
pub const OFF_FLAGS: usize = 18;
pub const OFF_RING: usize = 44;

/// If `data`, written at the start of a request slot, is a header with the
/// RING flag, the doorbell value it carries.
pub fn fused_ring(data: &[u8]) -> Option<u32> {
    let flags = u16::from_le_bytes([*data.get(OFF_FLAGS)?, *data.get(OFF_FLAGS + 1)?]);
    if data.len() < HEADER_LEN || flags & FLAG_RING == 0 {
        return None;
    }
    crate::wire::get_u32(data, OFF_RING)
}

/// Size of BAR2 for a geometry.
pub fn bar2_size(slots: u32, slot_size: u32) -> u64 {
    RINGS_OFFSET + 2 * slots as u64 * slot_size as u64
}

pub fn req_slot_offset(slots: u32, slot_size: u32, index: u32) -> u64 {
    RINGS_OFFSET + (index % slots) as u64 * slot_size as u64
}

pub fn resp_slot_offset(slots: u32, slot_size: u32, index: u32) -> u64 {
    RINGS_OFFSET + (slots as u64 + (index % slots) as u64) * slot_size as u64
}

/// Read a BAR2 register (REG_*) from an image of BAR2; None if `bar2` is too
/// short. The card side keeps BAR2 as plain memory and uses these.
pub fn get_reg(bar2: &[u8], reg: u64) -> Option<u32> {
    crate::wire::get_u32(bar2, usize::try_from(reg).ok()?)
}

/// Store a BAR2 register (REG_*) into an image of BAR2; ignored past its end.
pub fn set_reg(bar2: &mut [u8], reg: u64, value: u32) {
    if let Ok(off) = usize::try_from(reg) {
        crate::wire::put_u32(bar2, off, value);
    }
}

/// Mailbox geometry the host accepts from a card.
pub fn check_geometry(slots: u32, slot_size: u32) -> Result<()> {
    // A power of two, so `counter % slots` stays continuous when u32 counters wrap.
    if !(1..=MAX_SLOTS).contains(&slots) || !slots.is_power_of_two() {
        return Err(CardError::Range { what: "mailbox slots", value: slots as u64, range: "power of two, 1..=64" });
    }
    if !(4096..=MAX_SLOT_SIZE).contains(&slot_size) || !slot_size.is_multiple_of(8) {
        return Err(CardError::Range {
            what: "mailbox slot size",
            value: slot_size as u64,
            range: "4096..=1MiB, multiple of 8",
        });
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Echo = 1,
    Start = 2,
    Stop = 3,
    Pause = 4,
    Resume = 5,
    Snapshot = 6,
    SnapshotRead = 7,
    RestoreBegin = 8,
    RestoreWrite = 9,
    RestoreCommit = 10,
    ListVms = 11,
    ReadEvents = 12,
    /// ABI 1.2 (feature VM_COSTS): the measured cost of each VM (`crate::costs`).
    VmCosts = 13,
    /// ABI 1.2 (feature AGENT_BULK): vm, arg0 = the agent task (1 = monitor
    /// tick, 2 = log, 3 = qos), payload = a protocol-2 message; the response payload is the
    /// agent's answer message.
    AgentBulk = 14,
    /// ABI 1.3 (feature DMA_STREAM): vm, arg0 = image offset, payload = a
    /// `DmaDesc`; the card writes that chunk of the image into the host's
    /// DMA-mapped buffer. Response: arg0 = offset, arg1 = bytes written.
    SnapshotReadDma = 15,
    /// ABI 1.3 (feature DMA_STREAM): vm, arg0 = offset (bytes received so
    /// far), payload = a `DmaDesc`; the card reads the chunk from the
    /// host's buffer. Response: arg0 = bytes received.
    RestoreWriteDma = 16,
}

/// `agent-bulk` tasks (arg0).
pub const BULK_MONITOR: u64 = 1;
pub const BULK_LOG: u64 = 2;
pub const BULK_QOS: u64 = 3;

/// Snapshot op flags in arg0 (ABI 1.2, feature PRECOPY). LIVE: a base of
/// the VM while it keeps running (pre-copy; the card parks it only to
/// capture its state). DIFF: of the paused VM, only what changed since its
/// last snapshot. Both: a diff of the running VM (pre-copy's later rounds).
/// Unknown bits are refused.
pub const SNAPSHOT_LIVE: u64 = 1;
pub const SNAPSHOT_DIFF: u64 = 2;
/// Restore-commit flag in arg1 (ABI 1.2, feature PRECOPY): restore the VM
/// paused (a staged pre-copy base) instead of running it.
pub const RESTORE_PAUSED: u64 = 1;

impl Op {
    pub fn from_u16(v: u16) -> Option<Op> {
        use Op::*;
        Some(match v {
            1 => Echo,
            2 => Start,
            3 => Stop,
            4 => Pause,
            5 => Resume,
            6 => Snapshot,
            7 => SnapshotRead,
            8 => RestoreBegin,
            9 => RestoreWrite,
            10 => RestoreCommit,
            11 => ListVms,
            12 => ReadEvents,
            13 => VmCosts,
            14 => AgentBulk,
            15 => SnapshotReadDma,
            16 => RestoreWriteDma,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        use Op::*;
        match self {
            Echo => "echo",
            Start => "start",
            Stop => "stop",
            Pause => "pause",
            Resume => "resume",
            Snapshot => "snapshot",
            SnapshotRead => "snapshot-read",
            RestoreBegin => "restore-begin",
            RestoreWrite => "restore-write",
            RestoreCommit => "restore-commit",
            ListVms => "list-vms",
            ReadEvents => "read-events",
            VmCosts => "vm-costs",
            AgentBulk => "agent-bulk",
            SnapshotReadDma => "snapshot-read-dma",
            RestoreWriteDma => "restore-write-dma",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    NoSuchVm = 1,
    BadRequest = 2,
    Busy = 3,
    Internal = 4,
    Unsupported = 5,
    Exists = 6,
    BadState = 7,
}

impl Status {
    pub fn from_u16(v: u16) -> Option<Status> {
        use Status::*;
        Some(match v {
            0 => Ok,
            1 => NoSuchVm,
            2 => BadRequest,
            3 => Busy,
            4 => Internal,
            5 => Unsupported,
            6 => Exists,
            7 => BadState,
            _ => return None,
        })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Status::Ok => "ok",
            Status::NoSuchVm => "no such VM",
            Status::BadRequest => "bad request",
            Status::Busy => "busy",
            Status::Internal => "internal error",
            Status::Unsupported => "unsupported",
            Status::Exists => "already exists",
            Status::BadState => "wrong VM state",
        };
        f.write_str(s)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Request = 1,
    Response = 2,
}

/// One mailbox message (request or response). Header layout (48 bytes):
/// magic u32, version u8, kind u8, op u16, seq u32, vm u32, status u16,
/// flags u16, payload_len u32, arg0 u64, arg1 u64, payload_crc u32, ring u32.
/// Flag bit 0 (RING, requests only, ABI 1.1): this slot write also rings the
/// doorbell, setting REQ_PRODUCED to `ring`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub kind: Kind,
    /// Fused doorbell value (see above); None = ring separately.
    pub ring: Option<u32>,
    pub op: Op,
    pub seq: u32,
    pub vm: u32,
    pub status: Status,
    pub arg0: u64,
    pub arg1: u64,
    pub payload: Vec<u8>,
}

impl Message {
    pub fn request(op: Op, seq: u32, vm: u32, arg0: u64, arg1: u64, payload: Vec<u8>) -> Self {
        Message { kind: Kind::Request, ring: None, op, seq, vm, status: Status::Ok, arg0, arg1, payload }
    }

    pub fn response_to(req: &Message, status: Status, arg0: u64, arg1: u64, payload: Vec<u8>) -> Self {
        Message { kind: Kind::Response, ring: None, op: req.op, seq: req.seq, vm: req.vm, status, arg0, arg1, payload }
    }

    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    fn header(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(HEADER_LEN);
        w.u32(MSG_MAGIC).u8(MSG_VERSION).u8(self.kind as u8).u16(self.op as u16);
        w.u32(self.seq).u32(self.vm).u16(self.status as u16).u16(u16::from(self.ring.is_some()) * FLAG_RING);
        w.u32(self.payload.len() as u32).u64(self.arg0).u64(self.arg1);
        w.u32(crc32fast::hash(&self.payload)).u32(self.ring.unwrap_or(0));
        w.buf
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.header();
        v.extend_from_slice(&self.payload);
        v
    }

    /// Encode straight into a slot; None if it does not fit.
    pub fn encode_into(&self, out: &mut [u8]) -> Option<usize> {
        let n = self.encoded_len();
        let out = out.get_mut(..n)?;
        out[..HEADER_LEN].copy_from_slice(&self.header());
        out[HEADER_LEN..].copy_from_slice(&self.payload);
        Some(n)
    }

    /// Read just the payload length from a header (to size a second read).
    pub fn peek_payload_len(header: &[u8]) -> Result<usize> {
        let mut r = Reader::at(header, 20, "mailbox header");
        Ok(r.u32()? as usize)
    }

    /// Decode and validate one message; `max_payload` is the slot's room.
    pub fn decode(buf: &[u8], max_payload: usize) -> Result<Message> {
        let mut r = Reader::new(buf, "mailbox message");
        let magic = r.u32()?;
        if magic != MSG_MAGIC {
            return Err(CardError::BadMagic { found: magic, expected: MSG_MAGIC });
        }
        let version = r.u8()?;
        if version != MSG_VERSION {
            return Err(CardError::Unknown { what: "mailbox message version", value: version as u64 });
        }
        let kind = match r.u8()? {
            1 => Kind::Request,
            2 => Kind::Response,
            v => return Err(CardError::Unknown { what: "mailbox message kind", value: v as u64 }),
        };
        let op_raw = r.u16()?;
        let op = Op::from_u16(op_raw).ok_or(CardError::Unknown { what: "mailbox op", value: op_raw as u64 })?;
        let seq = r.u32()?;
        let vm = r.u32()?;
        let status_raw = r.u16()?;
        let status = Status::from_u16(status_raw)
            .ok_or(CardError::Unknown { what: "mailbox status", value: status_raw as u64 })?;
        let flags = r.u16()?;
        if flags & !FLAG_RING != 0 || (flags & FLAG_RING != 0 && kind != Kind::Request) {
            return Err(CardError::Unknown { what: "mailbox flags", value: flags as u64 });
        }
        let len = r.u32()? as usize;
        if len > max_payload {
            return Err(CardError::Range { what: "mailbox payload length", value: len as u64, range: "<= slot room" });
        }
        let arg0 = r.u64()?;
        let arg1 = r.u64()?;
        let stated = r.u32()?;
        let ring_raw = r.u32()?;
        let ring = (flags & FLAG_RING != 0).then_some(ring_raw);
        let payload = r.bytes(len)?.to_vec();
        let computed = crc32fast::hash(&payload);
        if stated != computed {
            return Err(CardError::Checksum { what: "mailbox payload", stated, computed });
        }
        Ok(Message { kind, ring, op, seq, vm, status, arg0, arg1, payload })
    }
}

/// Largest chunk one DMA descriptor may name.
pub const MAX_DMA_CHUNK: u32 = 64 << 20;
pub const DMA_DESC_LEN: usize = 16;

/// Where a chunk lives in a DMA-mapped buffer (ABI 1.3, DMA_STREAM): the
/// whole payload of `snapshot-read-dma` and `restore-write-dma`. Layout:
/// u64 iova, u32 length (1..=64 MiB), u32 flags (0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaDesc {
    pub iova: u64,
    pub len: u32,
}

impl DmaDesc {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(DMA_DESC_LEN);
        w.u64(self.iova).u32(self.len).u32(0);
        w.buf
    }

    /// Decode and check a descriptor on its own (either side).
    pub fn decode(buf: &[u8]) -> Result<DmaDesc> {
        if buf.len() != DMA_DESC_LEN {
            return Err(CardError::Range { what: "DMA descriptor length", value: buf.len() as u64, range: "16" });
        }
        let mut r = Reader::new(buf, "DMA descriptor");
        let iova = r.u64()?;
        let len = r.u32()?;
        let flags = r.u32()?;
        if flags != 0 {
            return Err(CardError::Unknown { what: "DMA descriptor flags", value: flags as u64 });
        }
        if !(1..=MAX_DMA_CHUNK).contains(&len) {
            return Err(CardError::Range { what: "DMA chunk length", value: len as u64, range: "1..=64 MiB" });
        }
        if iova.checked_add(len as u64).is_none() {
            return Err(CardError::Range { what: "DMA chunk end", value: iova, range: "no overflow" });
        }
        Ok(DmaDesc { iova, len })
    }

    /// The chunk's offset inside a mapping of `size` bytes at `base`, if it
    /// lies wholly inside it.
    pub fn offset_in(&self, base: u64, size: u64) -> Result<usize> {
        let off = self.iova.checked_sub(base);
        let inside = off.filter(|o| o.checked_add(self.len as u64).is_some_and(|end| end <= size));
        let off =
            inside.ok_or(CardError::Range { what: "DMA chunk", value: self.iova, range: "inside the mapping" })?;
        usize::try_from(off).map_err(|_| CardError::Range { what: "DMA chunk offset", value: off, range: "usize" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trip_and_corruption() {
        let m = Message::request(Op::Echo, 9, 3, 1, 2, b"hello".to_vec());
        let b = m.encode();
        assert_eq!(Message::decode(&b, 1024).unwrap(), m);
        let mut slot = vec![0u8; 100];
        assert_eq!(m.encode_into(&mut slot), Some(b.len()));
        assert_eq!(&slot[..b.len()], &b[..]);
        assert_eq!(m.encode_into(&mut slot[..b.len() - 1]), None);
        for n in 0..b.len() {
            assert!(Message::decode(&b[..n], 1024).is_err());
        }
        let mut bad = b.clone();
        *bad.last_mut().unwrap() ^= 0x20;
        assert!(matches!(Message::decode(&bad, 1024), Err(CardError::Checksum { .. })));
        assert!(matches!(Message::decode(&b, 2), Err(CardError::Range { .. })));
    }

    #[test]
    fn lists_and_events_round_trip() {
        let vms = vec![VmInfo { id: 1, state: VmState::Running, name: "mc-qos".into(), mem_bytes: 64 << 20 }];
        assert_eq!(decode_vm_list(&encode_vm_list(&vms)).unwrap(), vms);
        let ev = vec![
            Event { seq: 1, time_ns: 5, vm: 1, level: 2, message: "agent ready".into() },
            Event { seq: 2, time_ns: 6, vm: 0, level: 1, message: "é".repeat(600) },
        ];
        let dec = decode_events(&encode_events(&ev)).unwrap();
        assert_eq!(dec[0], ev[0]);
        assert!(dec[1].message.len() <= MAX_EVENT_MSG);
        let mut huge = Writer::default();
        huge.u32(u32::MAX);
        assert!(decode_events(&huge.buf).is_err());
    }

    #[test]
    fn fused_ring_round_trip() {
        let mut m = Message::request(Op::Echo, 1, 0, 0, 0, vec![9]);
        assert_eq!(fused_ring(&m.encode()), None);
        m.ring = Some(77);
        let b = m.encode();
        assert_eq!(fused_ring(&b), Some(77));
        assert_eq!(Message::decode(&b, 16).unwrap(), m);
        assert_eq!(fused_ring(&b[..20]), None);
        let mut resp = Message::response_to(&m, Status::Ok, 0, 0, vec![]).encode();
        resp[OFF_FLAGS] = 1;
        assert!(Message::decode(&resp, 16).is_err(), "RING on a response is refused");
    }

    #[test]
    fn dma_descriptors_are_checked() {
        let d = DmaDesc { iova: 1 << 32, len: 4096 };
        assert_eq!(DmaDesc::decode(&d.encode()).unwrap(), d);
        assert_eq!(d.offset_in(1 << 32, 8192).unwrap(), 0);
        assert_eq!(DmaDesc { iova: (1 << 32) + 4096, len: 4096 }.offset_in(1 << 32, 8192).unwrap(), 4096);
        assert!(DmaDesc { iova: (1 << 32) + 4097, len: 4096 }.offset_in(1 << 32, 8192).is_err());
        assert!(d.offset_in((1 << 32) + 1, 8192).is_err(), "below the mapping");
        assert!(DmaDesc::decode(&d.encode()[..15]).is_err());
        let mut bad = d.encode();
        bad[12] = 1;
        assert!(matches!(DmaDesc::decode(&bad), Err(CardError::Unknown { .. })));
        let zero = DmaDesc { iova: 0, len: 0 }.encode();
        assert!(matches!(DmaDesc::decode(&zero), Err(CardError::Range { .. })));
        let wrap = DmaDesc { iova: u64::MAX - 2, len: 4 }.encode();
        assert!(matches!(DmaDesc::decode(&wrap), Err(CardError::Range { .. })));
        let huge = DmaDesc { iova: 0, len: MAX_DMA_CHUNK + 1 }.encode();
        assert!(matches!(DmaDesc::decode(&huge), Err(CardError::Range { .. })));
    }

    #[test]
    fn geometry_is_checked() {
        assert!(check_geometry(DEFAULT_SLOTS, DEFAULT_SLOT_SIZE).is_ok());
        assert!(check_geometry(0, DEFAULT_SLOT_SIZE).is_err());
        assert!(check_geometry(3, DEFAULT_SLOT_SIZE).is_err());
        assert!(check_geometry(4, 100).is_err());
    }
}
