//! The control channel: a virtio-console device (device id 3, one port, no
//! multiport) behind a virtio-mmio (version 2) transport.
//!
//! * receiveq (queue 0): the VMM writes request frames into buffers the
//!   guest offered; the guest polls the used ring, so no interrupt is sent.
//! * transmitq (queue 1): the guest posts response and log frames and writes
//!   QueueNotify; the VMM consumes them during that MMIO exit.
//!
//! Frames are the fixed 64-byte records of [`crate::proto`]. Any descriptor
//! that points outside guest memory, is too short or has the wrong direction
//! is a device error: the VM is stopped with [`crate::StopReason::Device`].

use std::collections::{BTreeSet, VecDeque};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::proto::{FRAME_LEN, RX_QUEUE, TX_QUEUE};

const MAGIC: u32 = 0x7472_6976;
const VERSION: u32 = 2;
const DEVICE_ID_CONSOLE: u32 = 3;
const VENDOR_ID: u32 = 0x4d43_564d; // "MCVM"
const MAX_QUEUE_SIZE: u16 = 256;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_NEEDS_RESET: u32 = 0x40;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("descriptor {addr:#x}+{len} is outside guest memory or unusable: {why}")]
    BadDescriptor { addr: u64, len: u32, why: String },
    #[error("queue {0} was made ready with an invalid layout")]
    BadQueue(u16),
    #[error("register access at offset {0:#x} with width {1}")]
    BadAccess(u64, usize),
}

/// A console state from a snapshot that this device cannot take.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleStateError {
    #[error("{0} queues, the console has 2")]
    QueueCount(usize),
    #[error("queue {index}: {source}")]
    Queue {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("a pending request frame of {0} bytes (frames are 64)")]
    PendingFrame(usize),
}

/// Serializable state of one split queue (mirrors `virtio_queue::QueueState`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnap {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

/// Serializable transport and device state.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsoleSnap {
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueSnap>,
    /// Requests accepted but not yet placed in the receive queue.
    pub pending: Vec<Vec<u8>>,
}

pub struct Console {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    queues: [Queue; 2],
    pending: VecDeque<[u8; FRAME_LEN]>,
    /// Guest pages this device wrote since the last `take_dirty` (KVM's
    /// dirty log only sees guest writes; diff snapshots need both).
    dirty: BTreeSet<u64>,
}

fn new_queue() -> Queue {
    // MAX_QUEUE_SIZE is a power of two, which is all Queue::new checks.
    Queue::new(MAX_QUEUE_SIZE).expect("constant queue size is valid")
}

impl Default for Console {
    fn default() -> Self {
        Self::new()
    }
}

impl Console {
    pub fn new() -> Self {
        Console {
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            queues: [new_queue(), new_queue()],
            pending: VecDeque::new(),
            dirty: BTreeSet::new(),
        }
    }

    fn mark(&mut self, addr: u64, len: u64) {
        if len == 0 {
            return;
        }
        for page in addr / 4096..=(addr + len - 1) / 4096 {
            self.dirty.insert(page);
        }
    }

    fn mark_used_ring(&mut self, q: u16) {
        let (addr, size) = {
            let q = &self.queues[q as usize];
            (q.used_ring(), u64::from(q.size()))
        };
        self.mark(addr, 6 + 8 * size);
    }

    /// Requests accepted but not yet in the receive queue.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Guest pages written by the device since the last call.
    pub fn take_dirty(&mut self) -> BTreeSet<u64> {
        std::mem::take(&mut self.dirty)
    }

    fn device_features() -> u64 {
        VIRTIO_F_VERSION_1
    }

    pub fn driver_ok(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_NEEDS_RESET == 0
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// MMIO read of `data.len()` bytes at `offset` inside the device window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        if offset >= 0x100 {
            // Console config space (cols, rows, max_nr_ports, emerg_wr): zeros.
            data.fill(0);
            return Ok(());
        }
        if data.len() != 4 {
            return Err(DeviceError::BadAccess(offset, data.len()));
        }
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => DEVICE_ID_CONSOLE,
            0x00c => VENDOR_ID,
            0x010 => {
                let f = Self::device_features();
                if self.device_features_sel == 0 {
                    f as u32
                } else if self.device_features_sel == 1 {
                    (f >> 32) as u32
                } else {
                    0
                }
            }
            0x034 => self.selected().map_or(0, |q| u32::from(q.max_size())),
            0x044 => self.selected().map_or(0, |q| u32::from(q.ready())),
            0x060 => 0, // interrupt status: we never interrupt
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
        Ok(())
    }

    /// MMIO write. Returns the queue index when the guest notified a queue.
    pub fn write(&mut self, mem: &GuestMemoryMmap, offset: u64, data: &[u8]) -> Result<Option<u16>, DeviceError> {
        if offset >= 0x100 {
            return Ok(None); // config space is read-only for us
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return Err(DeviceError::BadAccess(offset, data.len()));
        };
        let v = u32::from_le_bytes(bytes);
        let lo = |old: u64| (old & !0xffff_ffff) | u64::from(v);
        let hi = |old: u64| (old & 0xffff_ffff) | (u64::from(v) << 32);
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => match self.driver_features_sel {
                0 => self.driver_features = lo(self.driver_features),
                1 => self.driver_features = hi(self.driver_features),
                _ => {}
            },
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 => {
                if let Some(q) = self.selected() {
                    q.set_size(v as u16);
                }
            }
            0x044 => {
                let sel = self.queue_sel as u16;
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                    if v == 1 && !q.is_valid(mem) {
                        q.set_ready(false);
                        return Err(DeviceError::BadQueue(sel));
                    }
                }
            }
            0x050 => return Ok(Some(v as u16)),
            0x064 => {} // interrupt ack
            0x070 => {
                if v == 0 {
                    *self = Console {
                        pending: std::mem::take(&mut self.pending),
                        dirty: std::mem::take(&mut self.dirty),
                        ..Console::new()
                    };
                } else {
                    let mut v = v;
                    if v & STATUS_FEATURES_OK != 0 && self.driver_features & !Self::device_features() != 0 {
                        v &= !STATUS_FEATURES_OK;
                    }
                    self.status = v;
                }
            }
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => {
                let (l, h) = if offset & 4 == 0 { (Some(v), None) } else { (None, Some(v)) };
                if let Some(q) = self.selected() {
                    match offset & !4 {
                        0x080 => q.set_desc_table_address(l, h),
                        0x090 => q.set_avail_ring_address(l, h),
                        _ => q.set_used_ring_address(l, h),
                    }
                }
            }
            _ => {}
        }
        Ok(None)
    }

    /// Queue a request frame and move as many pending frames as the guest
    /// has buffers for into the receive queue.
    pub fn push_request(&mut self, mem: &GuestMemoryMmap, frame: Option<[u8; FRAME_LEN]>) -> Result<(), DeviceError> {
        if let Some(f) = frame {
            self.pending.push_back(f);
        }
        if !self.driver_ok() {
            return Ok(());
        }
        while let Some(frame) = self.pending.front().copied() {
            let q = &mut self.queues[RX_QUEUE as usize];
            if !q.ready() {
                return Ok(());
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                return Ok(()); // no buffer yet; retried on the next guest exit
            };
            let head = chain.head_index();
            // The frame goes into the chain's first descriptor.
            let Some(d) = chain.into_iter().next() else {
                return Err(self.broken(0, 0, "empty chain"));
            };
            if !d.is_write_only() || (d.len() as usize) < FRAME_LEN {
                return Err(self.broken(d.addr().0, d.len(), "receive buffer not writable or short"));
            }
            if mem.write_slice(&frame, d.addr()).is_err() {
                return Err(self.broken(d.addr().0, d.len(), "outside guest memory"));
            }
            let len = FRAME_LEN as u32;
            self.mark(d.addr().0, FRAME_LEN as u64);
            self.mark_used_ring(RX_QUEUE);
            self.queues[RX_QUEUE as usize]
                .add_used(mem, head, len)
                .map_err(|e| self.broken(0, 0, &format!("used ring: {e}")))?;
            self.pending.pop_front();
        }
        Ok(())
    }

    /// Consume every frame the guest posted on the transmit queue.
    pub fn pop_frames(&mut self, mem: &GuestMemoryMmap) -> Result<Vec<[u8; FRAME_LEN]>, DeviceError> {
        let mut out = Vec::new();
        loop {
            let q = &mut self.queues[TX_QUEUE as usize];
            if !q.ready() {
                return Ok(out);
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                return Ok(out);
            };
            let head = chain.head_index();
            let mut frame = [0u8; FRAME_LEN];
            let mut got = 0usize;
            for d in chain {
                if d.is_write_only() {
                    return Err(self.broken(d.addr().0, d.len(), "transmit buffer is device-writable"));
                }
                let n = (d.len() as usize).min(FRAME_LEN - got);
                if mem.read_slice(&mut frame[got..got + n], d.addr()).is_err() {
                    return Err(self.broken(d.addr().0, d.len(), "outside guest memory"));
                }
                got += n;
                if got == FRAME_LEN {
                    break;
                }
            }
            if got != FRAME_LEN {
                return Err(self.broken(0, got as u32, "short frame"));
            }
            self.queues[TX_QUEUE as usize]
                .add_used(mem, head, 0)
                .map_err(|e| self.broken(0, 0, &format!("used ring: {e}")))?;
            self.mark_used_ring(TX_QUEUE);
            out.push(frame);
        }
    }

    /// Mark the device broken (virtio DEVICE_NEEDS_RESET) and build the error.
    fn broken(&mut self, addr: u64, len: u32, why: &str) -> DeviceError {
        self.status |= STATUS_NEEDS_RESET;
        DeviceError::BadDescriptor { addr, len, why: why.to_string() }
    }

    pub fn snapshot(&self) -> ConsoleSnap {
        ConsoleSnap {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            queues: self
                .queues
                .iter()
                .map(|q| QueueSnap {
                    max_size: q.max_size(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                    event_idx: q.event_idx_enabled(),
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                })
                .collect(),
            pending: self.pending.iter().map(|f| f.to_vec()).collect(),
        }
    }

    /// Rebuild from a snapshot; the state is untrusted input, so it is validated.
    pub fn restore(s: &ConsoleSnap) -> Result<Self, ConsoleStateError> {
        if s.queues.len() != 2 {
            return Err(ConsoleStateError::QueueCount(s.queues.len()));
        }
        let mut c = Console::new();
        c.status = s.status;
        c.device_features_sel = s.device_features_sel;
        c.driver_features_sel = s.driver_features_sel;
        c.driver_features = s.driver_features;
        c.queue_sel = s.queue_sel;
        c.config_generation = s.config_generation;
        for (i, qs) in s.queues.iter().enumerate() {
            let st = virtio_queue::QueueState {
                max_size: qs.max_size,
                next_avail: qs.next_avail,
                next_used: qs.next_used,
                event_idx_enabled: qs.event_idx,
                size: qs.size,
                ready: qs.ready,
                desc_table: qs.desc_table,
                avail_ring: qs.avail_ring,
                used_ring: qs.used_ring,
            };
            c.queues[i] = Queue::try_from(st).map_err(|source| ConsoleStateError::Queue { index: i, source })?;
        }
        for f in &s.pending {
            let frame =
                <[u8; FRAME_LEN]>::try_from(f.as_slice()).map_err(|_| ConsoleStateError::PendingFrame(f.len()))?;
            c.pending.push_back(frame);
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;
    use crate::proto::QUEUE_SIZE;

    fn w(c: &mut Console, m: &GuestMemoryMmap, off: u64, v: u32) -> Option<u16> {
        c.write(m, off, &v.to_le_bytes()).expect("register write")
    }

    fn r(c: &mut Console, off: u64) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b).expect("register read");
        u32::from_le_bytes(b)
    }

    /// Drive the transport like the agent does, with queues at fixed spots.
    fn ready_console(m: &GuestMemoryMmap) -> Console {
        let mut c = Console::new();
        assert_eq!((r(&mut c, 0), r(&mut c, 4), r(&mut c, 8)), (MAGIC, 2, 3));
        w(&mut c, m, 0x70, 3);
        w(&mut c, m, 0x24, 1);
        w(&mut c, m, 0x20, 1);
        w(&mut c, m, 0x70, 3 | 8);
        assert_eq!(r(&mut c, 0x70) & 8, 8, "VERSION_1 accepted");
        for q in 0..2u32 {
            let base = 0x10000 + u64::from(q) * 0x1000;
            w(&mut c, m, 0x30, q);
            w(&mut c, m, 0x38, u32::from(QUEUE_SIZE));
            w(&mut c, m, 0x80, base as u32);
            w(&mut c, m, 0x90, (base + 0x100) as u32);
            w(&mut c, m, 0xa0, (base + 0x200) as u32);
            w(&mut c, m, 0x44, 1);
        }
        w(&mut c, m, 0x70, 3 | 8 | 4);
        assert!(c.driver_ok());
        c
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory")
    }

    #[test]
    fn unknown_features_are_refused() {
        let m = mem();
        let mut c = Console::new();
        w(&mut c, &m, 0x24, 0);
        w(&mut c, &m, 0x20, 1 << 5); // not offered
        w(&mut c, &m, 0x70, 3 | 8);
        assert_eq!(r(&mut c, 0x70) & 8, 0);
    }

    #[test]
    fn a_queue_outside_memory_is_an_error() {
        let m = mem();
        let mut c = Console::new();
        w(&mut c, &m, 0x30, 0);
        w(&mut c, &m, 0x80, 0x7fff_0000);
        assert_eq!(c.write(&m, 0x44, &1u32.to_le_bytes()), Err(DeviceError::BadQueue(0)));
        assert!(c.write(&m, 0x44, &[1u8]).is_err(), "narrow register access");
    }

    #[test]
    fn request_frames_land_in_offered_buffers_and_wait_otherwise() {
        let m = mem();
        let mut c = ready_console(&m);
        // Nothing offered yet: the request waits.
        c.push_request(&m, Some([7u8; FRAME_LEN])).expect("queue");
        assert_eq!(c.pending_len(), 1);
        // Offer one writable buffer at 0x30000 in the receive queue.
        let (desc, avail) = (GuestAddress(0x10000), GuestAddress(0x10100));
        m.write_obj(0x30000u64, desc).expect("desc addr");
        m.write_obj(FRAME_LEN as u32, GuestAddress(0x10008)).expect("desc len");
        m.write_obj(2u16, GuestAddress(0x1000c)).expect("desc flags WRITE");
        m.write_obj(0u16, GuestAddress(0x10104)).expect("avail ring[0]");
        m.write_obj(1u16, GuestAddress(avail.0 + 2)).expect("avail idx");
        c.push_request(&m, None).expect("deliver");
        assert_eq!(c.pending_len(), 0);
        let mut got = [0u8; FRAME_LEN];
        m.read_slice(&mut got, GuestAddress(0x30000)).expect("frame");
        assert_eq!(got, [7u8; FRAME_LEN]);
        let used_idx: u16 = m.read_obj(GuestAddress(0x10202)).expect("used idx");
        assert_eq!(used_idx, 1);
        let dirty = c.take_dirty();
        assert!(dirty.contains(&0x30) && dirty.contains(&0x10), "device writes are tracked: {dirty:?}");
    }

    #[test]
    fn a_transmit_descriptor_outside_memory_breaks_the_device() {
        let m = mem();
        let mut c = ready_console(&m);
        let (desc, avail) = (0x11000u64, 0x11100u64);
        m.write_obj(0xffff_0000u64, GuestAddress(desc)).expect("desc addr");
        m.write_obj(FRAME_LEN as u32, GuestAddress(desc + 8)).expect("desc len");
        m.write_obj(0u16, GuestAddress(avail + 4)).expect("avail ring[0]");
        m.write_obj(1u16, GuestAddress(avail + 2)).expect("avail idx");
        let e = c.pop_frames(&m).expect_err("bad descriptor");
        assert!(matches!(e, DeviceError::BadDescriptor { addr: 0xffff_0000, .. }), "{e}");
        assert!(!c.driver_ok(), "DEVICE_NEEDS_RESET is set");
    }

    #[test]
    fn state_survives_snapshot_and_restore() {
        let m = mem();
        let mut c = ready_console(&m);
        c.push_request(&m, Some([1u8; FRAME_LEN])).expect("queue");
        let snap = c.snapshot();
        let c2 = Console::restore(&snap).expect("restore");
        assert_eq!(c2.snapshot(), snap);
        let mut bad = snap.clone();
        bad.queues.pop();
        assert!(matches!(Console::restore(&bad), Err(ConsoleStateError::QueueCount(1))));
        let mut bad = snap;
        bad.pending.push(vec![0; 3]);
        assert!(matches!(Console::restore(&bad), Err(ConsoleStateError::PendingFrame(3))));
    }
}
