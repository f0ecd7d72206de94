//! The card's register layout, ABI 1.3 (see `card-link/ABI.md`, which this
//! file must match). BAR0 is a read-only register file: identity, ABI version,
//! health and heartbeat, and one telemetry entry per card resource. The host
//! reads it in one access of `BAR0_SNAPSHOT_LEN` bytes and decodes it here.

use crate::error::{CardError, Result};
use crate::wire::{Reader, Writer};

/// "MCCD" little endian: the first word of BAR0.
pub const MAGIC: u32 = u32::from_le_bytes(*b"MCCD");
pub const ABI_MAJOR: u16 = 1;
pub const ABI_MINOR: u16 = 3;

/// Feature bits at BAR0 0x64 (ABI 1.1). Unknown bits are ignored by hosts.
/// FUSED_DOORBELL: a request slot write whose header carries the RING flag
/// also rings the doorbell (one vfio-user round trip less per command).
pub const FEATURE_FUSED_DOORBELL: u32 = 1;
/// VM_COSTS (ABI 1.2): the card answers the `vm-costs` mailbox op with its
/// measured cost of each VM (`crate::costs`). A host never sends the op to
/// a card without this bit (a 1.1 card would not know the op).
pub const FEATURE_VM_COSTS: u32 = 1 << 1;
/// PRECOPY (ABI 1.2): the snapshot op takes flags in arg0
/// (`mailbox::SNAPSHOT_LIVE`, `mailbox::SNAPSHOT_DIFF`) for pre-copy moves.
/// A host never sends flags to a card without this bit.
pub const FEATURE_PRECOPY: u32 = 1 << 2;
/// AGENT_BULK (ABI 1.2): the `agent-bulk` op carries a protocol-2 message
/// (`mc_proto::msg`) to a VM's management agent and its answer back.
pub const FEATURE_AGENT_BULK: u32 = 1 << 3;
/// MAPPED (ABI 1.3): BAR0 and BAR2 are offered as mmap-able areas (vfio-user
/// sparse mmap, or kernel VFIO mmap-able regions). The card then publishes
/// BAR0 under the sequence word at `OFF_SEQ` and serves the mailbox from
/// memory: it watches REQ_PRODUCED itself and sleeps on it as a futex
/// (`mailbox::REG_CARD_WAITING`). A host that does not map still uses the
/// message path, which the card serves as before.
pub const FEATURE_MAPPED: u32 = 1 << 4;
/// DMA_STREAM (ABI 1.3): the card takes DMA_MAP of a host buffer and
/// answers `snapshot-read-dma` and `restore-write-dma`, whose payload is a
/// `mailbox::DmaDesc` (where in the mapped buffer), not the data.
pub const FEATURE_DMA_STREAM: u32 = 1 << 5;

/// VFIO region indices of the two BARs.
pub const BAR0_INDEX: u32 = 0;
pub const BAR2_INDEX: u32 = 2;

pub const BAR0_SIZE: u64 = 4096;
/// Header bytes before the first resource entry.
pub const BAR0_HEADER_LEN: usize = 0x80;
pub const RESOURCE_STRIDE: usize = 48;
pub const MAX_RESOURCES: usize = 8;
/// The host reads this many bytes of BAR0 per snapshot.
pub const BAR0_SNAPSHOT_LEN: usize = BAR0_HEADER_LEN + MAX_RESOURCES * RESOURCE_STRIDE;

// BAR0 offsets.
pub const OFF_MAGIC: usize = 0x00;
pub const OFF_ABI: usize = 0x04;
pub const OFF_LEN: usize = 0x08;
pub const OFF_CRC: usize = 0x0c;
pub const OFF_HEARTBEAT: usize = 0x38;
/// BAR0 sequence word (ABI 1.3, feature MAPPED), right after the snapshot
/// bytes and outside their CRC: odd while the card rewrites the register
/// file, advanced by 2 per rewrite. A mapped read that sees it odd or
/// changed is torn and retried.
pub const OFF_SEQ: usize = BAR0_SNAPSHOT_LEN;
/// A mapped snapshot read gives up (`CardError::Torn`) after this many torn
/// attempts: an honest card rewrites BAR0 once a period, in microseconds.
pub const SEQLOCK_TRIES: u32 = 10_000;

/// Heartbeat period bounds the host accepts (ms).
pub const MIN_PERIOD_MS: u32 = 10;
pub const MAX_PERIOD_MS: u32 = 60_000;

/// Read the register file from a mapped BAR0 under its sequence word and
/// validate it as `RegisterSnapshot::decode` does. A copy taken while the
/// card rewrote it (sequence odd, or moved during the copy) is retried; a
/// card that never lets a copy through is `CardError::Torn`, never accepted.
pub fn read_mapped(bar0: &crate::shm::SharedMem) -> Result<RegisterSnapshot> {
    use std::sync::atomic::{fence, Ordering};
    let seq = bar0.word(OFF_SEQ)?;
    let mut buf = [0u8; BAR0_SNAPSHOT_LEN];
    for _ in 0..SEQLOCK_TRIES {
        let before = seq.load(Ordering::Acquire);
        if before & 1 == 0 {
            bar0.read(0, &mut buf)?;
            // Orders the copy before the second look at the sequence.
            fence(Ordering::Acquire);
            if seq.load(Ordering::Relaxed) == before {
                return RegisterSnapshot::decode(&buf);
            }
        }
        std::hint::spin_loop();
    }
    Err(CardError::Torn { what: "BAR0 register file", tries: SEQLOCK_TRIES })
}

/// The card's side of `read_mapped`: publish `bytes` at the start of a
/// mapped BAR0 under the sequence word (odd while writing).
pub fn publish_mapped(bar0: &crate::shm::SharedMem, bytes: &[u8]) -> Result<()> {
    use std::sync::atomic::{fence, Ordering};
    let seq = bar0.word(OFF_SEQ)?;
    let s = seq.load(Ordering::Relaxed);
    let odd = s.wrapping_add(1) | 1;
    seq.store(odd, Ordering::Relaxed);
    // Readers that see any new byte also see the odd sequence.
    fence(Ordering::Release);
    bar0.write(0, bytes)?;
    seq.store(odd.wrapping_add(1), Ordering::Release);
    Ok(())
}

/// The four resources of claim 2: custom hardware (FPGA), processor, memory, network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    Fpga = 1,
    Cpu = 2,
    Memory = 3,
    Network = 4,
}

impl ResourceKind {
    pub const ALL: [ResourceKind; 4] =
        [ResourceKind::Fpga, ResourceKind::Cpu, ResourceKind::Memory, ResourceKind::Network];

    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(ResourceKind::Fpga),
            2 => Some(ResourceKind::Cpu),
            3 => Some(ResourceKind::Memory),
            4 => Some(ResourceKind::Network),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ResourceKind::Fpga => "fpga",
            ResourceKind::Cpu => "cpu",
            ResourceKind::Memory => "memory",
            ResourceKind::Network => "network",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Ok = 0,
    Degraded = 1,
    Failed = 2,
}

/// One resource entry. Meaning of the fields by kind (ABI.md has the table):
/// - cpu: capacity = quota in CPU-ns per second, total = CPU-ns used since start
/// - fpga: capacity = engine-ns per second, total = busy engine-ns, used = queue depth
/// - memory: capacity = limit bytes, used = current bytes, total = peak bytes
/// - network: capacity = link bytes per second, total = bytes through the network client
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resource {
    pub kind: ResourceKind,
    pub capacity: u64,
    pub used: u64,
    pub total: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterSnapshot {
    pub abi_minor: u16,
    pub serial: u64,
    pub model: String,
    pub heartbeat: u64,
    pub heartbeat_period_ms: u32,
    pub health: Health,
    /// Card's monotonic clock when the snapshot was taken (ns).
    pub card_time_ns: u64,
    pub mailbox_slots: u32,
    pub mailbox_slot_size: u32,
    pub vm_count: u32,
    /// Feature bits (ABI >= 1.1; 0 from a 1.0 card).
    pub features: u32,
    pub resources: Vec<Resource>,
}

impl RegisterSnapshot {
    pub fn resource(&self, kind: ResourceKind) -> Option<&Resource> {
        self.resources.iter().find(|r| r.kind == kind)
    }

    /// Encode as the card presents it in BAR0 (exactly `BAR0_SNAPSHOT_LEN` bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(BAR0_SNAPSHOT_LEN);
        let len = BAR0_HEADER_LEN + self.resources.len().min(MAX_RESOURCES) * RESOURCE_STRIDE;
        w.u32(MAGIC).u16(ABI_MAJOR).u16(self.abi_minor).u32(len as u32).u32(0);
        w.u64(self.serial);
        let mut model = [0u8; 32];
        let m = self.model.as_bytes();
        let n = m.len().min(32);
        model[..n].copy_from_slice(&m[..n]);
        w.bytes(&model);
        w.u64(self.heartbeat).u32(self.heartbeat_period_ms).u32(self.health as u32);
        w.u64(self.card_time_ns);
        w.u32(self.resources.len().min(MAX_RESOURCES) as u32).u32(RESOURCE_STRIDE as u32);
        w.u32(self.mailbox_slots).u32(self.mailbox_slot_size).u32(self.vm_count).u32(self.features);
        w.pad_to(BAR0_HEADER_LEN);
        for r in self.resources.iter().take(MAX_RESOURCES) {
            w.u32(r.kind as u32).u32(0).u64(r.capacity).u64(r.used).u64(r.total).u64(0).u64(0);
        }
        w.pad_to(BAR0_SNAPSHOT_LEN);
        let mut buf = w.buf;
        let crc = crc32fast::hash(&buf[..len]);
        crate::wire::put_u32(&mut buf, OFF_CRC, crc);
        buf
    }

    /// Decode and validate a BAR0 snapshot. Checks, in order: magic, ABI major,
    /// length, checksum, then every field's range.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Reader::new(buf, "BAR0 snapshot");
        let magic = r.u32()?;
        if magic != MAGIC {
            return Err(CardError::BadMagic { found: magic, expected: MAGIC });
        }
        let major = r.u16()?;
        let minor = r.u16()?;
        if major != ABI_MAJOR {
            return Err(CardError::AbiVersion { major, minor, host_major: ABI_MAJOR });
        }
        let len = r.u32()? as usize;
        if !(BAR0_HEADER_LEN..=BAR0_SNAPSHOT_LEN).contains(&len) {
            return Err(CardError::Range { what: "BAR0 length", value: len as u64, range: "0x80..=0x200" });
        }
        if buf.len() < len {
            return Err(CardError::Truncated { what: "BAR0 snapshot", need: len, have: buf.len() });
        }
        let stated = r.u32()?;
        let mut copy = buf[..len].to_vec();
        crate::wire::put_u32(&mut copy, OFF_CRC, 0);
        let computed = crc32fast::hash(&copy);
        if stated != computed {
            return Err(CardError::Checksum { what: "BAR0", stated, computed });
        }
        let body = &buf[..len];
        let mut r = Reader::at(body, 0x10, "BAR0 snapshot");
        let serial = r.u64()?;
        let model_raw = r.bytes(32)?;
        let end = model_raw.iter().position(|&b| b == 0).unwrap_or(32);
        let model = std::str::from_utf8(&model_raw[..end])
            .map_err(|_| CardError::Unknown { what: "model name (not UTF-8)", value: 0 })?
            .to_string();
        let heartbeat = r.u64()?;
        let heartbeat_period_ms = r.u32()?;
        if !(MIN_PERIOD_MS..=MAX_PERIOD_MS).contains(&heartbeat_period_ms) {
            return Err(CardError::Range {
                what: "heartbeat period (ms)",
                value: heartbeat_period_ms as u64,
                range: "10..=60000",
            });
        }
        let health = match r.u32()? {
            0 => Health::Ok,
            1 => Health::Degraded,
            2 => Health::Failed,
            v => return Err(CardError::Unknown { what: "health", value: v as u64 }),
        };
        let card_time_ns = r.u64()?;
        let count = r.u32()? as usize;
        let stride = r.u32()? as usize;
        if count > MAX_RESOURCES {
            return Err(CardError::Range { what: "resource count", value: count as u64, range: "0..=8" });
        }
        if stride != RESOURCE_STRIDE {
            return Err(CardError::Range { what: "resource stride", value: stride as u64, range: "48" });
        }
        if BAR0_HEADER_LEN + count * stride != len {
            return Err(CardError::Range {
                what: "BAR0 length vs resource count",
                value: len as u64,
                range: "0x80 + count * 48",
            });
        }
        let mailbox_slots = r.u32()?;
        let mailbox_slot_size = r.u32()?;
        crate::mailbox::check_geometry(mailbox_slots, mailbox_slot_size)?;
        let vm_count = r.u32()?;
        if vm_count > crate::mailbox::MAX_VMS {
            return Err(CardError::Range { what: "vm count", value: vm_count as u64, range: "0..=256" });
        }
        // Reserved (zero) in ABI 1.0, so a 1.0 card advertises no features.
        let features = r.u32()?;
        let mut resources: Vec<Resource> = Vec::with_capacity(count);
        for i in 0..count {
            let mut e = Reader::at(body, BAR0_HEADER_LEN + i * stride, "resource entry");
            let kind_raw = e.u32()?;
            let kind = ResourceKind::from_u32(kind_raw)
                .ok_or(CardError::Unknown { what: "resource kind", value: kind_raw as u64 })?;
            let _flags = e.u32()?;
            let capacity = e.u64()?;
            let used = e.u64()?;
            let total = e.u64()?;
            if resources.iter().any(|x| x.kind == kind) {
                return Err(CardError::Unknown { what: "duplicate resource kind", value: kind_raw as u64 });
            }
            if capacity == 0 {
                return Err(CardError::Range { what: "resource capacity", value: 0, range: "> 0" });
            }
            if kind == ResourceKind::Memory && used > capacity.saturating_mul(2) {
                // cgroup v1 can overshoot the limit briefly; more than 2x is a lie.
                return Err(CardError::Range { what: "memory used", value: used, range: "<= 2 x capacity" });
            }
            resources.push(Resource { kind, capacity, used, total });
        }
        Ok(RegisterSnapshot {
            abi_minor: minor,
            serial,
            model,
            heartbeat,
            heartbeat_period_ms,
            health,
            card_time_ns,
            mailbox_slots,
            mailbox_slot_size,
            vm_count,
            features,
            resources,
        })
    }
}

/// Utilisation of each resource between two snapshots, as ratios of capacity.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Utilisation {
    pub fpga: f64,
    pub cpu: f64,
    pub memory: f64,
    pub network: f64,
    /// Card time between the two snapshots (s).
    pub interval_s: f64,
    pub cpu_ns: u64,
    pub memory_bytes: u64,
    pub network_bytes: u64,
}

impl Utilisation {
    pub fn ratio(&self, kind: ResourceKind) -> f64 {
        match kind {
            ResourceKind::Fpga => self.fpga,
            ResourceKind::Cpu => self.cpu,
            ResourceKind::Memory => self.memory,
            ResourceKind::Network => self.network,
        }
    }
}

/// Rates from two snapshots of the same card. Counters that go backwards
/// (card restarted) or a clock that does not advance are refused.
pub fn utilisation(a: &RegisterSnapshot, b: &RegisterSnapshot) -> Result<Utilisation> {
    if b.card_time_ns <= a.card_time_ns {
        return Err(CardError::Range {
            what: "card clock between snapshots (ns)",
            value: b.card_time_ns.saturating_sub(a.card_time_ns),
            range: "> 0",
        });
    }
    let dt_ns = (b.card_time_ns - a.card_time_ns) as f64;
    let mut u = Utilisation { interval_s: dt_ns / 1e9, ..Default::default() };
    for rb in &b.resources {
        let Some(ra) = a.resource(rb.kind) else {
            continue;
        };
        if rb.total < ra.total {
            return Err(CardError::Range {
                what: "resource counter went backwards",
                value: rb.kind as u64,
                range: "monotonic",
            });
        }
        let delta = rb.total - ra.total;
        let rate = |cap: u64| delta as f64 / (dt_ns / 1e9) / cap as f64;
        match rb.kind {
            ResourceKind::Cpu => {
                u.cpu = rate(rb.capacity);
                u.cpu_ns = delta;
            }
            ResourceKind::Fpga => u.fpga = rate(rb.capacity),
            ResourceKind::Network => {
                u.network = rate(rb.capacity);
                u.network_bytes = delta;
            }
            ResourceKind::Memory => {
                u.memory = rb.used as f64 / rb.capacity as f64;
                u.memory_bytes = rb.used;
            }
        }
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> RegisterSnapshot {
        RegisterSnapshot {
            abi_minor: 0,
            serial: 42,
            model: "card-sim".into(),
            heartbeat: 7,
            heartbeat_period_ms: 100,
            health: Health::Ok,
            card_time_ns: 1_000_000_000,
            mailbox_slots: 4,
            mailbox_slot_size: crate::mailbox::DEFAULT_SLOT_SIZE,
            vm_count: 0,
            features: 0,
            resources: vec![
                Resource { kind: ResourceKind::Cpu, capacity: 1_000_000_000, used: 0, total: 5 },
                Resource { kind: ResourceKind::Memory, capacity: 512 << 20, used: 1 << 20, total: 2 << 20 },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let b = s.encode();
        assert_eq!(b.len(), BAR0_SNAPSHOT_LEN);
        assert_eq!(RegisterSnapshot::decode(&b).unwrap(), s);
    }

    #[test]
    fn all_ones_is_bad_magic() {
        let b = vec![0xffu8; BAR0_SNAPSHOT_LEN];
        assert!(matches!(RegisterSnapshot::decode(&b), Err(CardError::BadMagic { .. })));
    }

    #[test]
    fn flipped_bit_is_checksum_error() {
        let mut b = sample().encode();
        b[0x40] ^= 1;
        assert!(matches!(RegisterSnapshot::decode(&b), Err(CardError::Checksum { .. })));
    }

    #[test]
    fn wrong_major_is_refused() {
        let mut b = sample().encode();
        b[4] = 2;
        assert!(matches!(RegisterSnapshot::decode(&b), Err(CardError::AbiVersion { major: 2, .. })));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let b = sample().encode();
        for n in 0..BAR0_HEADER_LEN + 2 * RESOURCE_STRIDE {
            assert!(RegisterSnapshot::decode(&b[..n]).is_err(), "len {n}");
        }
    }

    #[test]
    fn rates_from_two_snapshots() {
        let a = sample();
        let mut b = sample();
        b.card_time_ns += 1_000_000_000;
        b.resources[0].total += 250_000_000;
        let u = utilisation(&a, &b).unwrap();
        assert!((u.cpu - 0.25).abs() < 1e-9);
        assert!((u.memory - 1.0 / 512.0).abs() < 1e-9);
        b.resources[0].total = 0;
        assert!(utilisation(&a, &b).is_err());
    }
}
