//! A hostile card in memory: a transport whose "firmware" is a closure
//! answering each doorbell with whatever bytes a test wants.

use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::abi::{Resource, ResourceKind};
use crate::costs::{CostSource, VmCost, VmCosts};
use crate::mailbox::{Event, Message, Op, Status, DEFAULT_SLOTS, DEFAULT_SLOT_SIZE};

type Firmware = Box<dyn FnMut(&Message) -> Option<Vec<u8>> + Send>;

struct FakeCard {
    bar0: Vec<u8>,
    bar2: Vec<u8>,
    irq: Option<EventFd>,
    firmware: Firmware,
}

fn regs() -> RegisterSnapshot {
    RegisterSnapshot {
        abi_minor: 0,
        serial: 1,
        model: "fake".into(),
        heartbeat: 1,
        heartbeat_period_ms: 100,
        health: Health::Ok,
        card_time_ns: 1,
        mailbox_slots: DEFAULT_SLOTS,
        mailbox_slot_size: DEFAULT_SLOT_SIZE,
        vm_count: 0,
        features: 0,
        resources: vec![Resource { kind: ResourceKind::Cpu, capacity: 1_000_000_000, used: 0, total: 0 }],
    }
}

impl Transport for FakeCard {
    fn read(&mut self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let src = if index == BAR0_INDEX { &self.bar0 } else { &self.bar2 };
        crate::transport::check_access(Some(src.len() as u64), index, offset, buf.len())?;
        buf.copy_from_slice(&src[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        assert_eq!(index, BAR2_INDEX);
        let o = offset as usize;
        self.bar2[o..o + data.len()].copy_from_slice(data);
        if offset == mailbox::REG_REQ_PRODUCED {
            let produced = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            let i = produced.wrapping_sub(1);
            let req_off = mailbox::req_slot_offset(DEFAULT_SLOTS, DEFAULT_SLOT_SIZE, i) as usize;
            let req = Message::decode(&self.bar2[req_off..], DEFAULT_SLOT_SIZE as usize - HEADER_LEN)
                .expect("host sends valid requests");
            if let Some(resp) = (self.firmware)(&req) {
                let off = mailbox::resp_slot_offset(DEFAULT_SLOTS, DEFAULT_SLOT_SIZE, i) as usize;
                let n = resp.len().min(DEFAULT_SLOT_SIZE as usize);
                self.bar2[off..off + n].copy_from_slice(&resp[..n]);
                self.bar2[8..12].copy_from_slice(&produced.to_le_bytes());
                self.bar2[4..8].copy_from_slice(&produced.to_le_bytes());
                if let Some(irq) = &self.irq {
                    irq.write(1).expect("signal the completion eventfd");
                }
            }
        }
        Ok(())
    }
    fn region_size(&self, index: u32) -> Option<u64> {
        match index {
            BAR0_INDEX => Some(self.bar0.len() as u64),
            BAR2_INDEX => Some(self.bar2.len() as u64),
            _ => None,
        }
    }
    fn set_completion_eventfd(&mut self, fd: &EventFd) -> Result<()> {
        self.irq = Some(fd.try_clone().map_err(|source| CardError::Os { what: "clone the eventfd", source })?);
        Ok(())
    }
    fn describe(&self) -> String {
        "fake".into()
    }
}

fn card_with(bar0: Vec<u8>, firmware: Firmware) -> Result<Card> {
    card_with_counters(bar0, [0; 3], firmware)
}

/// A fake card whose mailbox counters (REQ_PRODUCED, REQ_CONSUMED,
/// RESP_PRODUCED) start where a previous host left them.
fn card_with_counters(bar0: Vec<u8>, counters: [u32; 3], firmware: Firmware) -> Result<Card> {
    let mut bar0 = bar0;
    bar0.resize(abi::BAR0_SIZE as usize, 0);
    let mut bar2 = vec![0; mailbox::bar2_size(DEFAULT_SLOTS, DEFAULT_SLOT_SIZE) as usize];
    mailbox::set_reg(&mut bar2, mailbox::REG_REQ_PRODUCED, counters[0]);
    mailbox::set_reg(&mut bar2, mailbox::REG_REQ_CONSUMED, counters[1]);
    mailbox::set_reg(&mut bar2, mailbox::REG_RESP_PRODUCED, counters[2]);
    let fake = FakeCard { bar0, bar2, irq: None, firmware };
    Card::open(Box::new(fake), CardOptions { command_timeout: Duration::from_millis(150), ..CardOptions::default() })
}

fn answer(f: impl Fn(&Message) -> Message + Send + 'static) -> Firmware {
    Box::new(move |m| Some(f(m).encode()))
}

#[test]
fn honest_fake_answers() {
    let mut c =
        card_with(regs().encode(), answer(|m| Message::response_to(m, Status::Ok, m.arg0, 0, m.payload.clone())))
            .unwrap();
    for i in 0..20 {
        assert_eq!(c.echo(i, b"abc").unwrap().arg0, i);
    }
}

#[test]
fn wrong_sequence_is_out_of_order() {
    let mut c = card_with(
        regs().encode(),
        answer(|m| {
            let mut r = Message::response_to(m, Status::Ok, m.arg0, 0, vec![]);
            r.seq = r.seq.wrapping_add(7);
            r
        }),
    )
    .unwrap();
    assert!(matches!(c.echo(1, b""), Err(CardError::OutOfOrder { .. })));
}

#[test]
fn echo_with_other_contents_is_a_mismatch() {
    let mut c =
        card_with(regs().encode(), answer(|m| Message::response_to(m, Status::Ok, m.arg0 + 1, 0, m.payload.clone())))
            .unwrap();
    let e = c.echo(5, b"abc").unwrap_err();
    assert!(matches!(e, CardError::EchoMismatch { sent: 5, got: 6, payload_differs: false }), "{e}");
    let mut c = card_with(regs().encode(), answer(|m| Message::response_to(m, Status::Ok, m.arg0, 0, b"xyz".to_vec())))
        .unwrap();
    let e = c.echo(5, b"abc").unwrap_err();
    assert!(matches!(e, CardError::EchoMismatch { sent: 5, got: 5, payload_differs: true }), "{e}");
}

#[test]
fn command_left_in_flight_by_a_previous_host_is_busy_at_open() {
    // One request produced and consumed, its response not yet produced.
    let e = card_with_counters(regs().encode(), [8, 8, 7], Box::new(|_| None)).err().unwrap();
    assert!(matches!(e, CardError::MailboxBusy { in_flight: 1, slots: DEFAULT_SLOTS }), "{e}");
    // Counters further apart than the ring are garbage, not a busy card.
    let e = card_with_counters(regs().encode(), [100, 100, 7], Box::new(|_| None)).err().unwrap();
    assert!(matches!(e, CardError::Range { .. }), "{e}");
    let e = card_with_counters(regs().encode(), [8, 9, 8], Box::new(|_| None)).err().unwrap();
    assert!(matches!(e, CardError::Range { .. }), "{e}");
}

#[test]
fn hostile_payload_length_and_crc_are_refused() {
    let mut c = card_with(
        regs().encode(),
        Box::new(|m| {
            let mut b = Message::response_to(m, Status::Ok, 0, 0, vec![1, 2, 3]).encode();
            b[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
            Some(b)
        }),
    )
    .unwrap();
    assert!(matches!(c.echo(1, b""), Err(CardError::Range { .. })));
    let mut c = card_with(
        regs().encode(),
        Box::new(|m| {
            let mut b = Message::response_to(m, Status::Ok, m.arg0, 0, vec![1, 2, 3]).encode();
            let last = b.len() - 1;
            b[last] ^= 0xff;
            Some(b)
        }),
    )
    .unwrap();
    assert!(matches!(c.echo(1, b""), Err(CardError::Checksum { .. })));
}

#[test]
fn silent_firmware_times_out_on_time() {
    let mut c = card_with(regs().encode(), Box::new(|_| None)).unwrap();
    let t = Instant::now();
    assert!(matches!(c.echo(1, b""), Err(CardError::Timeout { .. })));
    assert!(t.elapsed() < Duration::from_millis(400));
    // The command given up on is remembered: until the card answers it,
    // nothing more is sent and callers are refused at once, so a silent
    // card costs one timeout, not one per command, and a request slot the
    // card has not consumed is never overwritten.
    for _ in 0..DEFAULT_SLOTS * 2 {
        let t = Instant::now();
        let e = c.echo(1, b"").unwrap_err();
        assert!(matches!(e, CardError::Unanswered { pending: 1 }), "{e}");
        assert!(t.elapsed() < Duration::from_millis(100), "refused at once, not waited for: {:?}", t.elapsed());
    }
    // The health check judges it: the card does not answer within the probe bound.
    assert!(c.check_health().is_err());
}

#[test]
fn hostile_lists_events_and_snapshots_are_refused() {
    let mut c = card_with(
        regs().encode(),
        answer(|m| match m.op {
            Op::ReadEvents => {
                let ev = Event { seq: 5, time_ns: 0, vm: 0, level: 1, message: "x".into() };
                let p = mailbox::encode_events(&[ev.clone(), ev]);
                Message::response_to(m, Status::Ok, 2, 0, p)
            }
            Op::Snapshot => Message::response_to(m, Status::Ok, u64::MAX, 0, vec![]),
            Op::SnapshotRead => Message::response_to(m, Status::Ok, m.arg0, 0, vec![0; 3]),
            Op::ListVms => Message::response_to(m, Status::Ok, 0, 0, vec![0xff; 4]),
            _ => Message::response_to(m, Status::Internal, 0, 0, b"no".to_vec()),
        }),
    )
    .unwrap();
    assert!(matches!(c.read_events(0, 10), Err(CardError::Range { .. })));
    assert!(matches!(c.snapshot_vm(1), Err(CardError::Range { .. })));
    let info = SnapshotInfo { size: 100, crc: 0 };
    assert!(matches!(c.read_snapshot(1, &info, &mut Vec::new()), Err(CardError::Range { .. })));
    assert!(matches!(c.list_vms(), Err(CardError::Range { .. })));
    assert!(matches!(c.stop_vm(1), Err(CardError::Refused { status: Status::Internal, .. })));
}

#[test]
fn hostile_registers_are_refused_at_open() {
    let mut r = regs();
    r.vm_count = 10_000;
    assert!(matches!(card_with(r.encode(), Box::new(|_| None)), Err(CardError::Range { .. })));
    let mut r = regs();
    r.mailbox_slots = 1000;
    assert!(matches!(card_with(r.encode(), Box::new(|_| None)), Err(CardError::Range { .. })));
    let mut r = regs();
    r.heartbeat_period_ms = 0;
    assert!(matches!(card_with(r.encode(), Box::new(|_| None)), Err(CardError::Range { .. })));
    assert!(matches!(card_with(vec![0xff; 512], Box::new(|_| None)), Err(CardError::BadMagic { .. })));
}

fn regs_with_costs() -> RegisterSnapshot {
    RegisterSnapshot {
        abi_minor: 2,
        features: abi::FEATURE_VM_COSTS,
        resources: vec![
            Resource { kind: ResourceKind::Cpu, capacity: 1_000_000_000, used: 0, total: 0 },
            Resource { kind: ResourceKind::Memory, capacity: 512 << 20, used: 0, total: 0 },
        ],
        ..regs()
    }
}

fn costs() -> VmCosts {
    let vm = |id| VmCost {
        vm: id,
        source: CostSource::Cgroup,
        cpu_ns: 5,
        memory_bytes: 8 << 20,
        net_bytes: 0,
        fpga_busy_ns: 0,
    };
    VmCosts { card_time_ns: 99, vms: vec![vm(1), vm(2)] }
}

#[test]
fn vm_costs_on_a_card_without_the_feature_is_unsupported_and_sends_nothing() {
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let s = sent.clone();
    // A 1.1 card (this fake rings through the doorbell register only, so
    // it offers no fused doorbell either).
    let old = RegisterSnapshot { abi_minor: 1, features: 0, ..regs() };
    let mut c = card_with(
        old.encode(),
        Box::new(move |m| {
            s.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Some(Message::response_to(m, Status::Ok, m.arg0, 0, m.payload.clone()).encode())
        }),
    )
    .unwrap();
    let e = c.vm_costs().unwrap_err();
    assert!(matches!(e, CardError::Unsupported { minor: 1, .. }), "{e}");
    assert!(e.to_string().contains("ABI 1.1"), "{e}");
    assert_eq!(sent.load(std::sync::atomic::Ordering::Relaxed), 0, "nothing sent to a 1.1 card");
    // The rest of the link works as before.
    c.echo(3, b"still here").unwrap();
    assert_eq!(sent.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[test]
fn vm_costs_are_decoded_from_an_honest_card() {
    let mut c =
        card_with(regs_with_costs().encode(), answer(|m| Message::response_to(m, Status::Ok, 2, 0, costs().encode())))
            .unwrap();
    assert_eq!(c.vm_costs().unwrap(), costs());
}

#[test]
fn hostile_vm_cost_tables_are_refused() {
    type Lie = fn(&Message) -> Message;
    let lies: [(Lie, &str); 4] = [
        (|m| Message::response_to(m, Status::Ok, 3, 0, costs().encode()), "VM cost count vs arg0"),
        (
            |m| {
                let mut p = costs().encode();
                p.truncate(p.len() - 1);
                Message::response_to(m, Status::Ok, 2, 0, p)
            },
            "VM cost table length",
        ),
        (
            |m| {
                let mut p = costs().encode();
                p[0] = 7;
                Message::response_to(m, Status::Ok, 2, 0, p)
            },
            "VM cost table version",
        ),
        (
            |m| {
                let mut t = costs();
                t.vms[0].memory_bytes = u64::MAX;
                Message::response_to(m, Status::Ok, 2, 0, t.encode())
            },
            "VM memory",
        ),
    ];
    for (lie, what) in lies {
        let mut c = card_with(regs_with_costs().encode(), answer(lie)).unwrap();
        match c.vm_costs() {
            Err(CardError::Range { what: w, .. } | CardError::Unknown { what: w, .. }) => assert_eq!(w, what),
            other => panic!("{what}: {other:?}"),
        }
    }
}
