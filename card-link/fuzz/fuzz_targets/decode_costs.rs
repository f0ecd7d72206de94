//! The VM cost table decoder (ABI 1.2 `vm-costs`) on arbitrary bytes: Ok or
//! a typed error, never a panic or an out-of-bounds read; a decoded table
//! survives an encode/decode round trip, and rates between it and any other
//! decoded table are refused or finite.
#![no_main]

use card_link::abi::{Health, RegisterSnapshot, Resource, ResourceKind};
use card_link::costs::{vm_utilisation, VmCosts};
use libfuzzer_sys::fuzz_target;

fn card() -> RegisterSnapshot {
    let r = |kind, capacity| Resource { kind, capacity, used: 0, total: 0 };
    RegisterSnapshot {
        abi_minor: 2,
        serial: 1,
        model: "fuzz".into(),
        heartbeat: 0,
        heartbeat_period_ms: 100,
        health: Health::Ok,
        card_time_ns: 0,
        mailbox_slots: 4,
        mailbox_slot_size: 65536,
        vm_count: 0,
        features: 0,
        resources: vec![
            r(ResourceKind::Cpu, 1_000_000_000),
            r(ResourceKind::Memory, 512 << 20),
            r(ResourceKind::Network, 125_000_000),
            r(ResourceKind::Fpga, 1_000_000_000),
        ],
    }
}

fuzz_target!(|data: &[u8]| {
    let split = data.len() / 2;
    let (a, b) = (VmCosts::decode(&data[..split]), VmCosts::decode(&data[split..]));
    let whole = VmCosts::decode(data);
    for t in [&a, &b, &whole].into_iter().flatten() {
        assert_eq!(VmCosts::decode(&t.encode()).ok().as_ref(), Some(t));
        let _ = t.check_against(&card());
    }
    if let (Ok(a), Ok(b)) = (&a, &b) {
        if let Ok(rates) = vm_utilisation(a, b, &card()) {
            for r in rates {
                assert!(r.cpu.is_finite() && r.network.is_finite() && r.fpga.is_finite() && r.memory.is_finite());
            }
        }
    }
});
