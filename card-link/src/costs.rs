//! The card's measured cost of each VM it runs (ABI 1.2, mailbox op
//! `vm-costs`, see ABI.md): CPU time and memory from the VM's own child
//! cgroup on the card, and the bytes and busy time the card's shared
//! engines (network client, FPGA) spent on its behalf. A placement engine
//! compares these with the card's thresholds, so they are measured on the
//! card, never assumed by the host.
//!
//! The table is the mailbox response's payload (whose CRC the message
//! header already carries): a 16-byte header and one 48-byte entry per VM.

use crate::abi::{RegisterSnapshot, ResourceKind};
use crate::error::{CardError, Result};
use crate::mailbox::MAX_VMS;
use crate::wire::{Reader, Writer};

/// Version of the table layout this host reads.
pub const COSTS_VERSION: u16 = 1;
pub const COSTS_HEADER_LEN: usize = 16;
pub const COST_STRIDE: usize = 48;
/// The largest table: `MAX_VMS` entries.
pub const MAX_COSTS_LEN: usize = COSTS_HEADER_LEN + MAX_VMS as usize * COST_STRIDE;

/// How the card measured a VM's CPU and memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CostSource {
    /// The VM's own child cgroup of the card's cgroup (cpuacct / cpu.stat,
    /// memory usage): the kernel's accounting of that VM alone.
    Cgroup = 1,
    /// The VM's VMM process (/proc/PID), on a card that runs without cgroups.
    Process = 2,
    /// A modelled VM's own accounting (no guest code runs; CPU 0, memory =
    /// the bytes it holds).
    Model = 3,
}

impl CostSource {
    pub fn from_u16(v: u16) -> Option<CostSource> {
        match v {
            1 => Some(CostSource::Cgroup),
            2 => Some(CostSource::Process),
            3 => Some(CostSource::Model),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CostSource::Cgroup => "cgroup",
            CostSource::Process => "process",
            CostSource::Model => "model",
        }
    }
}

/// One VM's cost on the card. Counters (`cpu_ns`, `net_bytes`,
/// `fpga_busy_ns`) only grow while the VM lives; `memory_bytes` is a gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmCost {
    pub vm: u32,
    pub source: CostSource,
    /// CPU time charged to the VM since it started on the card (ns).
    pub cpu_ns: u64,
    /// Memory charged to the VM now (bytes; its cgroup's usage).
    pub memory_bytes: u64,
    /// Bytes the card's network client sent on the VM's behalf.
    pub net_bytes: u64,
    /// Busy time of the custom-hardware engine on jobs submitted for the VM (ns).
    pub fpga_busy_ns: u64,
}

/// The cost table as the card sampled it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmCosts {
    /// The card's clock (the same as BAR0's `card_time_ns`) when sampled.
    pub card_time_ns: u64,
    /// By VM id, ascending.
    pub vms: Vec<VmCost>,
}

impl VmCosts {
    pub fn get(&self, vm: u32) -> Option<&VmCost> {
        self.vms.iter().find(|c| c.vm == vm)
    }

    /// The payload as the card sends it (entries beyond `MAX_VMS` dropped).
    pub fn encode(&self) -> Vec<u8> {
        let n = self.vms.len().min(MAX_VMS as usize);
        let mut w = Writer::with_capacity(COSTS_HEADER_LEN + n * COST_STRIDE);
        w.u16(COSTS_VERSION).u16(COST_STRIDE as u16).u32(n as u32).u64(self.card_time_ns);
        for c in &self.vms[..n] {
            w.u32(c.vm).u16(c.source as u16).u16(0);
            w.u64(c.cpu_ns).u64(c.memory_bytes).u64(c.net_bytes).u64(c.fpga_busy_ns).u64(0);
        }
        w.buf
    }

    /// Decode and validate a table: version, stride, count in range and
    /// matching the length exactly, each entry's source known, ids strictly
    /// ascending (so none appears twice).
    pub fn decode(buf: &[u8]) -> Result<VmCosts> {
        let mut r = Reader::new(buf, "VM cost table");
        let version = r.u16()?;
        if version != COSTS_VERSION {
            return Err(CardError::Unknown { what: "VM cost table version", value: version as u64 });
        }
        let stride = r.u16()? as usize;
        if stride != COST_STRIDE {
            return Err(CardError::Range { what: "VM cost entry stride", value: stride as u64, range: "48" });
        }
        let count = r.u32()?;
        if count > MAX_VMS {
            return Err(CardError::Range { what: "VM cost count", value: count as u64, range: "0..=256" });
        }
        let want = COSTS_HEADER_LEN + count as usize * COST_STRIDE;
        if buf.len() != want {
            return Err(CardError::Range {
                what: "VM cost table length",
                value: buf.len() as u64,
                range: "16 + count * 48, exactly",
            });
        }
        let card_time_ns = r.u64()?;
        let mut vms: Vec<VmCost> = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let vm = r.u32()?;
            let raw = r.u16()?;
            let source =
                CostSource::from_u16(raw).ok_or(CardError::Unknown { what: "VM cost source", value: raw as u64 })?;
            let _reserved = r.u16()?;
            let cost = VmCost {
                vm,
                source,
                cpu_ns: r.u64()?,
                memory_bytes: r.u64()?,
                net_bytes: r.u64()?,
                fpga_busy_ns: r.u64()?,
            };
            let _reserved = r.u64()?;
            if vms.last().is_some_and(|prev| prev.vm >= vm) {
                return Err(CardError::Range {
                    what: "VM cost entry id",
                    value: vm as u64,
                    range: "strictly ascending",
                });
            }
            vms.push(cost);
        }
        Ok(VmCosts { card_time_ns, vms })
    }

    /// Refuse a table whose memory figures cannot be true of this card:
    /// more than twice its memory capacity for one VM (the BAR0 rule; cgroup
    /// v1 overshoots a limit briefly, never by 2x).
    pub fn check_against(&self, card: &RegisterSnapshot) -> Result<()> {
        let Some(mem) = card.resource(ResourceKind::Memory) else { return Ok(()) };
        let cap = mem.capacity.saturating_mul(2);
        match self.vms.iter().find(|c| c.memory_bytes > cap) {
            Some(c) => Err(CardError::Range { what: "VM memory", value: c.memory_bytes, range: "<= 2 x card memory" }),
            None => Ok(()),
        }
    }
}

/// One VM's use of each card resource between two cost tables, as ratios of
/// the card's capacity (the same units as `abi::Utilisation`, so a placement
/// engine can subtract it from the card's use), and the raw amounts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VmUtilisation {
    pub vm: u32,
    pub cpu: f64,
    pub memory: f64,
    pub network: f64,
    pub fpga: f64,
    pub interval_s: f64,
    pub cpu_ns: u64,
    /// Memory at the later table (a gauge).
    pub memory_bytes: u64,
    pub net_bytes: u64,
    pub fpga_busy_ns: u64,
}

/// Per-VM rates from two tables of the same card, with capacities from
/// `card` (a register snapshot). VMs in `b` but not in `a` (started in
/// between) have no rate yet and are left out; a counter that went
/// backwards or a clock that did not advance is refused.
pub fn vm_utilisation(a: &VmCosts, b: &VmCosts, card: &RegisterSnapshot) -> Result<Vec<VmUtilisation>> {
    if b.card_time_ns <= a.card_time_ns {
        return Err(CardError::Range {
            what: "card clock between cost tables (ns)",
            value: b.card_time_ns.saturating_sub(a.card_time_ns),
            range: "> 0",
        });
    }
    let dt = (b.card_time_ns - a.card_time_ns) as f64 / 1e9;
    let cap = |k: ResourceKind| card.resource(k).map_or(0, |r| r.capacity);
    let ratio = |amount: f64, capacity: u64| if capacity == 0 { 0.0 } else { amount / capacity as f64 };
    let mut out = Vec::with_capacity(b.vms.len());
    for cb in &b.vms {
        let Some(ca) = a.get(cb.vm) else { continue };
        let delta = |x: u64, y: u64| {
            y.checked_sub(x).ok_or(CardError::Range {
                what: "VM cost counter went backwards",
                value: cb.vm as u64,
                range: "monotonic",
            })
        };
        let cpu_ns = delta(ca.cpu_ns, cb.cpu_ns)?;
        let net_bytes = delta(ca.net_bytes, cb.net_bytes)?;
        let fpga_busy_ns = delta(ca.fpga_busy_ns, cb.fpga_busy_ns)?;
        out.push(VmUtilisation {
            vm: cb.vm,
            cpu: ratio(cpu_ns as f64 / dt, cap(ResourceKind::Cpu)),
            memory: ratio(cb.memory_bytes as f64, cap(ResourceKind::Memory)),
            network: ratio(net_bytes as f64 / dt, cap(ResourceKind::Network)),
            fpga: ratio(fpga_busy_ns as f64 / dt, cap(ResourceKind::Fpga)),
            interval_s: dt,
            cpu_ns,
            memory_bytes: cb.memory_bytes,
            net_bytes,
            fpga_busy_ns,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{Health, Resource};

    fn table() -> VmCosts {
        let c = |vm, cpu_ns| VmCost {
            vm,
            source: CostSource::Cgroup,
            cpu_ns,
            memory_bytes: 40 << 20,
            net_bytes: 1000,
            fpga_busy_ns: 5,
        };
        VmCosts { card_time_ns: 1_000_000_000, vms: vec![c(1, 10), c(3, 20)] }
    }

    fn card() -> RegisterSnapshot {
        let r = |kind, capacity| Resource { kind, capacity, used: 0, total: 0 };
        RegisterSnapshot {
            abi_minor: 2,
            serial: 1,
            model: "t".into(),
            heartbeat: 0,
            heartbeat_period_ms: 100,
            health: Health::Ok,
            card_time_ns: 0,
            mailbox_slots: 4,
            mailbox_slot_size: 4096,
            vm_count: 2,
            features: 0,
            resources: vec![
                r(ResourceKind::Cpu, 1_000_000_000),
                r(ResourceKind::Memory, 512 << 20),
                r(ResourceKind::Network, 125_000_000),
                r(ResourceKind::Fpga, 1_000_000_000),
            ],
        }
    }

    #[test]
    fn round_trip() {
        let t = table();
        let b = t.encode();
        assert_eq!(b.len(), COSTS_HEADER_LEN + 2 * COST_STRIDE);
        assert_eq!(VmCosts::decode(&b).unwrap(), t);
        assert_eq!(VmCosts::decode(&VmCosts::default().encode()).unwrap(), VmCosts::default());
    }

    #[test]
    fn every_truncation_and_extension_is_refused() {
        let b = table().encode();
        for n in 0..b.len() {
            assert!(VmCosts::decode(&b[..n]).is_err(), "truncated to {n}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(matches!(VmCosts::decode(&long), Err(CardError::Range { what: "VM cost table length", .. })));
    }

    #[test]
    fn bad_version_stride_count_source_and_order_are_refused() {
        let b = table().encode();
        let patched = |off: usize, bytes: &[u8]| {
            let mut v = b.clone();
            v[off..off + bytes.len()].copy_from_slice(bytes);
            VmCosts::decode(&v).unwrap_err()
        };
        assert!(matches!(patched(0, &2u16.to_le_bytes()), CardError::Unknown { what: "VM cost table version", .. }));
        assert!(matches!(patched(2, &40u16.to_le_bytes()), CardError::Range { what: "VM cost entry stride", .. }));
        assert!(matches!(patched(4, &257u32.to_le_bytes()), CardError::Range { what: "VM cost count", .. }));
        // A count the length does not carry.
        assert!(matches!(patched(4, &3u32.to_le_bytes()), CardError::Range { what: "VM cost table length", .. }));
        assert!(matches!(patched(4, &u32::MAX.to_le_bytes()), CardError::Range { what: "VM cost count", .. }));
        let e1 = COSTS_HEADER_LEN;
        assert!(matches!(patched(e1 + 4, &9u16.to_le_bytes()), CardError::Unknown { what: "VM cost source", .. }));
        // The second entry's id equal to the first: a duplicate.
        let e2 = COSTS_HEADER_LEN + COST_STRIDE;
        assert!(matches!(patched(e2, &1u32.to_le_bytes()), CardError::Range { what: "VM cost entry id", .. }));
    }

    #[test]
    fn memory_beyond_the_card_is_refused() {
        let mut t = table();
        assert!(t.check_against(&card()).is_ok());
        t.vms[1].memory_bytes = 2 * (512 << 20) + 1;
        assert!(matches!(t.check_against(&card()), Err(CardError::Range { what: "VM memory", .. })));
    }

    #[test]
    fn rates_between_two_tables() {
        let a = table();
        let mut b = table();
        b.card_time_ns += 2_000_000_000;
        b.vms[0].cpu_ns += 1_000_000_000; // half a CPU over 2 s
        b.vms[0].net_bytes += 25_000_000; // 12.5 MB/s = 10 % of the link
        b.vms[1].fpga_busy_ns += 400_000_000; // 20 % of the engine
        b.vms.push(VmCost { vm: 7, ..b.vms[1] }); // new: no rate yet
        let u = vm_utilisation(&a, &b, &card()).unwrap();
        assert_eq!(u.len(), 2);
        assert!((u[0].cpu - 0.5).abs() < 1e-9 && (u[0].network - 0.1).abs() < 1e-9, "{u:?}");
        assert!((u[1].fpga - 0.2).abs() < 1e-9 && u[1].cpu == 0.0, "{u:?}");
        assert!((u[1].memory - 40.0 / 512.0).abs() < 1e-9);
        b.vms[0].cpu_ns = 0;
        assert!(matches!(vm_utilisation(&a, &b, &card()), Err(CardError::Range { .. })));
        assert!(vm_utilisation(&a, &a, &card()).is_err(), "no time passed");
    }

    proptest::proptest! {
        /// The fuzz target's property, run on every `cargo test`: any bytes
        /// decode or give a typed error; a decoded table round-trips.
        #[test]
        fn any_bytes_decode_or_are_refused(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            if let Ok(t) = VmCosts::decode(&data) {
                proptest::prop_assert_eq!(VmCosts::decode(&t.encode()).ok(), Some(t));
            }
        }

        /// One flipped byte of an honest table: refused, or decoded into a
        /// table that still holds every structural rule.
        #[test]
        fn a_flipped_byte_never_breaks_the_rules(pos in 0usize..112, bit in 0u8..8) {
            let mut b = table().encode();
            let pos = pos % b.len();
            b[pos] ^= 1 << bit;
            if let Ok(t) = VmCosts::decode(&b) {
                proptest::prop_assert!(t.vms.windows(2).all(|w| w[0].vm < w[1].vm));
                proptest::prop_assert_eq!(t.vms.len(), 2);
            }
        }
    }
}
