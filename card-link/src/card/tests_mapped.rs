//! A hostile card in shared memory (ABI 1.3): `MappedFake` offers its BARs
//! as mappings and takes DMA maps, and its "firmware" runs on a thread that
//! watches REQ_PRODUCED in memory, as card-sim's mailbox does. The tests
//! make it lie, tear and scribble; the host must answer with typed errors,
//! never a panic, a hang or an access outside a mapping.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::abi::{Resource, ResourceKind};
use crate::mailbox::{DmaDesc, Message, Op, Status, VmSpec, DEFAULT_SLOTS, DEFAULT_SLOT_SIZE};
use crate::shm::SharedMem;

/// What the firmware sees: the request and the host's DMA buffer, if mapped.
type Firmware = Box<dyn FnMut(&Message, Option<&SharedMem>) -> Option<Vec<u8>> + Send>;

#[derive(Default)]
struct Wires {
    irq: Mutex<Option<EventFd>>,
    dma: Mutex<Option<(u64, Arc<SharedMem>)>>,
    stop: AtomicBool,
}

struct MappedFake {
    bar0: Arc<SharedMem>,
    bar2: Arc<SharedMem>,
    wires: Arc<Wires>,
    firmware_thread: Option<JoinHandle<()>>,
}

/// The fake's registers. Its heartbeat never moves, so its period is the
/// longest the ABI allows: a frozen heartbeat is what only the stall test
/// (`open_beating_every`) is about.
fn regs() -> RegisterSnapshot {
    RegisterSnapshot {
        abi_minor: 3,
        serial: 3,
        model: "fake-mapped".into(),
        heartbeat: 1,
        heartbeat_period_ms: abi::MAX_PERIOD_MS,
        health: Health::Ok,
        card_time_ns: 1,
        mailbox_slots: DEFAULT_SLOTS,
        mailbox_slot_size: DEFAULT_SLOT_SIZE,
        vm_count: 0,
        features: abi::FEATURE_MAPPED | abi::FEATURE_DMA_STREAM,
        resources: vec![Resource { kind: ResourceKind::Cpu, capacity: 1_000_000_000, used: 0, total: 0 }],
    }
}

impl MappedFake {
    fn new(firmware: Firmware) -> MappedFake {
        Self::with_registers(firmware, regs())
    }

    fn with_registers(firmware: Firmware, regs: RegisterSnapshot) -> MappedFake {
        let bar0 = Arc::new(SharedMem::create("fake-bar0", abi::BAR0_SIZE as usize).unwrap());
        let bar2_len = mailbox::bar2_size(DEFAULT_SLOTS, DEFAULT_SLOT_SIZE) as usize;
        let bar2 = Arc::new(SharedMem::create("fake-bar2", bar2_len).unwrap());
        abi::publish_mapped(&bar0, &regs.encode()).unwrap();
        let wires = Arc::new(Wires::default());
        let (b2, w) = (bar2.clone(), wires.clone());
        let firmware_thread = std::thread::spawn(move || run_firmware(&b2, &w, firmware));
        MappedFake { bar0, bar2, wires, firmware_thread: Some(firmware_thread) }
    }
}

/// The fake's mailbox: answer each request the host publishes.
fn run_firmware(bar2: &SharedMem, wires: &Wires, mut firmware: Firmware) {
    let word = |r: u64| bar2.word(r as usize).unwrap();
    while !wires.stop.load(Ordering::Relaxed) {
        let consumed = word(mailbox::REG_REQ_CONSUMED).load(Ordering::Relaxed);
        if word(mailbox::REG_REQ_PRODUCED).load(Ordering::Acquire) == consumed {
            std::thread::sleep(Duration::from_micros(20));
            continue;
        }
        let off = mailbox::req_slot_offset(DEFAULT_SLOTS, DEFAULT_SLOT_SIZE, consumed) as usize;
        let mut buf = vec![0u8; HEADER_LEN + 4096];
        bar2.read(off, &mut buf).unwrap();
        let req = Message::decode(&buf[..HEADER_LEN + Message::peek_payload_len(&buf).unwrap()], 1 << 20)
            .expect("the host sends valid requests");
        let dma = wires.dma.lock().unwrap().as_ref().map(|(_, m)| m.clone());
        let next = consumed.wrapping_add(1);
        word(mailbox::REG_REQ_CONSUMED).store(next, Ordering::Release);
        if let Some(resp) = firmware(&req, dma.as_deref()) {
            let off = mailbox::resp_slot_offset(DEFAULT_SLOTS, DEFAULT_SLOT_SIZE, consumed) as usize;
            bar2.write(off, &resp[..resp.len().min(DEFAULT_SLOT_SIZE as usize)]).unwrap();
            word(mailbox::REG_RESP_PRODUCED).store(next, Ordering::Release);
            if let Some(irq) = wires.irq.lock().unwrap().as_ref() {
                irq.write(1).unwrap();
            }
        }
    }
}

impl Drop for MappedFake {
    fn drop(&mut self) {
        self.wires.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.firmware_thread.take() {
            t.join().expect("the fake's firmware thread");
        }
    }
}

impl Transport for MappedFake {
    fn read(&mut self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let bar = if index == BAR0_INDEX { &self.bar0 } else { &self.bar2 };
        bar.read(offset as usize, buf)
    }
    fn write(&mut self, _index: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.bar2.write(offset as usize, data)
    }
    fn region_size(&self, index: u32) -> Option<u64> {
        match index {
            BAR0_INDEX => Some(self.bar0.len() as u64),
            BAR2_INDEX => Some(self.bar2.len() as u64),
            _ => None,
        }
    }
    fn set_completion_eventfd(&mut self, fd: &EventFd) -> Result<()> {
        let fd = fd.try_clone().map_err(|source| CardError::Os { what: "clone the eventfd", source })?;
        *self.wires.irq.lock().unwrap() = Some(fd);
        Ok(())
    }
    fn describe(&self) -> String {
        "fake-mapped".into()
    }
    fn map_region(&mut self, index: u32, writable: bool) -> Result<Option<SharedMem>> {
        let bar = if index == BAR0_INDEX { &self.bar0 } else { &self.bar2 };
        SharedMem::map(bar.fd().unwrap(), 0, bar.len(), writable).map(Some)
    }
    fn dma_map(&mut self, iova: u64, size: u64, fd: std::os::fd::BorrowedFd<'_>) -> Result<()> {
        let m = SharedMem::map(fd, 0, size as usize, true)?;
        *self.wires.dma.lock().unwrap() = Some((iova, Arc::new(m)));
        Ok(())
    }
}

/// The fake's BARs (kept by a test to attack them) and the card on them.
fn open(firmware: Firmware) -> (Arc<SharedMem>, Arc<SharedMem>, Card) {
    let fake = MappedFake::new(firmware);
    let (bar0, bar2) = (fake.bar0.clone(), fake.bar2.clone());
    let opts = CardOptions { command_timeout: Duration::from_millis(300), ..CardOptions::default() };
    let card = Card::open(Box::new(fake), opts).expect("open the mapped fake");
    assert_eq!(card.transport_info().access, Access::Mapped);
    (bar0, bar2, card)
}

fn echo_firmware() -> Firmware {
    Box::new(|m, _| Some(Message::response_to(m, Status::Ok, m.arg0, m.arg1, m.payload.clone()).encode()))
}

/// The typed errors a hostile answer may give.
fn is_hostile_answer(e: &CardError) -> bool {
    matches!(
        e,
        CardError::Checksum { .. }
            | CardError::BadMagic { .. }
            | CardError::Range { .. }
            | CardError::Unknown { .. }
            | CardError::Truncated { .. }
            | CardError::OutOfOrder { .. }
            | CardError::EchoMismatch { .. }
            | CardError::Torn { .. }
            | CardError::AbiVersion { .. }
            | CardError::Timeout { .. }
    )
}

#[test]
fn honest_mapped_fake_answers_in_memory() {
    let (_b0, _b2, mut c) = open(echo_firmware());
    for i in 0..200 {
        assert_eq!(c.echo(i, &i.to_le_bytes()).unwrap().arg0, i);
    }
    assert_eq!(c.registers().unwrap().serial, 3);
}

#[test]
fn a_bar0_held_mid_rewrite_is_torn_never_accepted() {
    let (bar0, _b2, mut c) = open(echo_firmware());
    let seq = bar0.word(abi::OFF_SEQ).unwrap();
    seq.store(seq.load(Ordering::Relaxed) | 1, Ordering::Release);
    let t = Instant::now();
    assert!(matches!(c.registers(), Err(CardError::Torn { .. })));
    assert!(t.elapsed() < Duration::from_millis(200), "gave up in {:?}", t.elapsed());
    // Published properly again: read again.
    abi::publish_mapped(&bar0, &regs().encode()).unwrap();
    c.registers().unwrap();
}

#[test]
fn a_bar0_rewritten_under_the_reader_gives_whole_snapshots_or_typed_errors() {
    let (bar0, _b2, mut c) = open(echo_firmware());
    let (a, b) = (regs(), RegisterSnapshot { heartbeat: 99, vm_count: 7, ..regs() });
    let stop = Arc::new(AtomicBool::new(false));
    let (s, w, ea, eb) = (stop.clone(), bar0.clone(), a.encode(), b.encode());
    // Two valid files alternately, properly published, and raw (no
    // sequence) writes of a mix of both: a torn copy must never pass.
    let writer = std::thread::spawn(move || {
        let mut i = 0u64;
        while !s.load(Ordering::Relaxed) {
            let (x, y) = if i.is_multiple_of(2) { (&ea, &eb) } else { (&eb, &ea) };
            abi::publish_mapped(&w, x).unwrap();
            if i.is_multiple_of(3) {
                w.write(0, &y[..200]).unwrap();
            }
            i += 1;
        }
    });
    let (mut whole, mut refused) = (0, 0);
    for _ in 0..2000 {
        match c.registers() {
            Ok(r) => {
                assert!(r == a || r == b, "accepted a mixture: {r:?}");
                whole += 1;
            }
            Err(e) => {
                assert!(is_hostile_answer(&e), "{e}");
                refused += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(whole + refused == 2000 && whole > 0, "{whole} whole, {refused} refused");
}

#[test]
fn garbage_in_a_published_response_is_a_typed_error() {
    let (_b0, _b2, mut c) = open(Box::new(|m, _| {
        let mut b = Message::response_to(m, Status::Ok, m.arg0, 0, vec![7; 64]).encode();
        b[HEADER_LEN + 3] ^= 0x40;
        Some(b)
    }));
    assert!(matches!(c.echo(1, b"x"), Err(CardError::Checksum { .. })));
    let (_b0, _b2, mut c) = open(Box::new(|m, _| {
        let mut b = Message::response_to(m, Status::Ok, 0, 0, vec![]).encode();
        b[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        Some(b)
    }));
    assert!(matches!(c.echo(1, b"x"), Err(CardError::Range { .. })));
    let (_b0, _b2, mut c) = open(Box::new(|_, _| Some(vec![0xa5; 4096])));
    // All 0xa5: the stated payload length is refused before anything else.
    let e = c.echo(1, b"x").unwrap_err();
    assert!(matches!(e, CardError::Range { what: "mailbox payload length", .. }), "{e}");
}

#[test]
fn a_card_scribbling_on_the_ring_while_the_host_reads_gives_typed_errors() {
    let (_b0, bar2, mut c) = open(echo_firmware());
    let stop = Arc::new(AtomicBool::new(false));
    let (s, ring) = (stop.clone(), bar2.clone());
    let scribbler = std::thread::spawn(move || {
        let mut x = 0x9e37_79b9u32;
        let resp0 = mailbox::resp_slot_offset(DEFAULT_SLOTS, DEFAULT_SLOT_SIZE, 0) as usize;
        while !s.load(Ordering::Relaxed) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            // Anywhere in the response ring's headers and first payload bytes.
            let slot = (x as usize % DEFAULT_SLOTS as usize) * DEFAULT_SLOT_SIZE as usize;
            let at = resp0 + slot + (x as usize >> 8) % 96;
            ring.write(at, &x.to_le_bytes()[..1]).unwrap();
        }
    });
    let (mut ok, mut refused) = (0, 0);
    for i in 0..3000u64 {
        match c.echo(i, b"0123456789abcdef0123456789abcdef") {
            Ok(m) => {
                assert_eq!(m.arg0, i);
                ok += 1;
            }
            Err(e) => {
                assert!(is_hostile_answer(&e), "{e}");
                refused += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    scribbler.join().unwrap();
    assert_eq!(ok + refused, 3000);
}

#[test]
fn a_card_that_never_answers_in_memory_times_out_on_time() {
    let (_b0, _b2, mut c) = open(Box::new(|_, _| None));
    let t = Instant::now();
    assert!(matches!(c.echo(1, b""), Err(CardError::Timeout { .. })));
    assert!(t.elapsed() < Duration::from_millis(600), "{:?}", t.elapsed());
}

/// A card that answers a command after the host gave up on it takes the
/// next one once it has caught up; until then callers are refused at once.
#[test]
fn a_late_answer_is_skipped_and_the_card_takes_the_next_command() {
    let mut first = true;
    let (_b0, _b2, mut c) = open(Box::new(move |m, _| {
        if std::mem::take(&mut first) {
            std::thread::sleep(Duration::from_millis(500));
        }
        Some(Message::response_to(m, Status::Ok, m.arg0, m.arg1, m.payload.clone()).encode())
    }));
    assert!(matches!(c.echo(1, b"late"), Err(CardError::Timeout { .. })));
    let t = Instant::now();
    assert!(matches!(c.echo(2, b"early"), Err(CardError::Unanswered { pending: 1 })));
    assert!(t.elapsed() < Duration::from_millis(100), "refused after the grace: {:?}", t.elapsed());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.echo(3, b"next").expect("the next command after the late answer").arg0, 3);
    c.check_health().expect("healthy once caught up");
}

/// A card whose heartbeat stops while it holds a command is known stalled
/// within three heartbeats and the probe bound, long before the command
/// timeout.
#[test]
fn a_card_frozen_mid_command_is_stalled_long_before_the_command_timeout() {
    let fake =
        MappedFake::with_registers(Box::new(|_, _| None), RegisterSnapshot { heartbeat_period_ms: 100, ..regs() });
    let opts = CardOptions { command_timeout: Duration::from_secs(5), ..CardOptions::default() };
    let mut c = Card::open(Box::new(fake), opts).expect("open the mapped fake");
    let t = Instant::now();
    match c.echo(1, b"") {
        Err(CardError::Stalled { period_ms: 100, stuck_ms, .. }) => assert!(stuck_ms > 600, "{stuck_ms}"),
        other => panic!("expected a stall, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_millis(900), "known after {:?}", t.elapsed());
    // The health check says so at once: frozen, and the command unanswered.
    let t = Instant::now();
    assert!(matches!(c.check_health(), Err(CardError::Stalled { .. })));
    assert!(t.elapsed() < Duration::from_millis(100), "judged in {:?}", t.elapsed());
}

/// A heartbeat that stops while the card still answers is late, not a
/// stall; with the mailbox silent too, it is a stall.
#[test]
fn a_late_heartbeat_is_a_stall_only_when_the_card_does_not_answer() {
    let beat100 = RegisterSnapshot { heartbeat_period_ms: 100, ..regs() };
    let fake = MappedFake::with_registers(echo_firmware(), beat100.clone());
    let mut c = Card::open(Box::new(fake), CardOptions::default()).expect("open");
    assert!(!c.check_health().expect("fresh").late_beat);
    std::thread::sleep(Duration::from_millis(350));
    let h = c.check_health().expect("a late heartbeat with an answering card");
    assert!(h.late_beat && h.since_beat > Duration::from_millis(300), "{h:?}");

    let fake = MappedFake::with_registers(Box::new(|_, _| None), beat100);
    let mut c = Card::open(Box::new(fake), CardOptions::default()).expect("open");
    std::thread::sleep(Duration::from_millis(350));
    let t = Instant::now();
    assert!(matches!(c.check_health(), Err(CardError::Stalled { .. })));
    assert!(t.elapsed() < Duration::from_millis(500), "judged within the probe bound: {:?}", t.elapsed());
}

/// A dense image the fake "holds" for snapshot reads.
fn image() -> Vec<u8> {
    (0..(3 << 20) + 12345u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect()
}

/// Firmware serving snapshot-read-dma of `img`, with `lie` applied to each answer.
fn dma_reader(img: Vec<u8>, lie: fn(&mut Message, &SharedMem, &DmaDesc)) -> Firmware {
    Box::new(move |m, dma| {
        let resp = match m.op {
            Op::SnapshotReadDma => {
                let d = DmaDesc::decode(&m.payload).unwrap();
                let dma = dma.expect("the host mapped its buffer first");
                let at = d.offset_in(super::dma::DMA_IOVA, dma.len() as u64).unwrap();
                let off = m.arg0 as usize;
                dma.copy_in(at, &img[off..off + d.len as usize]).unwrap();
                let mut r = Message::response_to(m, Status::Ok, m.arg0, d.len as u64, vec![]);
                lie(&mut r, dma, &d);
                r
            }
            _ => Message::response_to(m, Status::Ok, m.arg0, 0, vec![]),
        };
        Some(resp.encode())
    })
}

#[test]
fn dma_snapshot_reads_are_checked_whole() {
    let img = image();
    let info = SnapshotInfo { size: img.len() as u64, crc: crc32fast::hash(&img) };
    let (_b0, _b2, mut c) = open(dma_reader(img.clone(), |_, _, _| {}));
    let mut out = Vec::new();
    assert_eq!(c.read_snapshot(1, &info, &mut out).unwrap(), img.len() as u64);
    assert!(out == img, "image differs");
    assert!(c.last_stream().unwrap().dma);
    // Straight into a Vec, appended.
    let mut v = vec![0xab];
    assert_eq!(c.read_snapshot_into(1, &info, &mut v).unwrap(), img.len() as u64);
    assert!(v[0] == 0xab && v[1..] == img[..], "image differs");

    // A chunk of another length than asked, or at another offset.
    let (_b0, _b2, mut c) = open(dma_reader(img.clone(), |r, _, _| r.arg1 -= 1));
    assert!(matches!(c.read_snapshot(1, &info, &mut Vec::new()), Err(CardError::Range { .. })));
    let (_b0, _b2, mut c) = open(dma_reader(img.clone(), |r, _, _| r.arg0 += 4096));
    assert!(matches!(c.read_snapshot(1, &info, &mut Vec::new()), Err(CardError::Range { .. })));
    // Data changed after the card said it was written: the image CRC.
    let (_b0, _b2, mut c) = open(dma_reader(img.clone(), |_, dma, d| {
        let at = d.offset_in(super::dma::DMA_IOVA, dma.len() as u64).unwrap();
        dma.write(at + 10, &[0xee]).unwrap();
    }));
    assert!(matches!(c.read_snapshot(1, &info, &mut Vec::new()), Err(CardError::Checksum { .. })));
    assert!(matches!(c.read_snapshot_into(1, &info, &mut Vec::new()), Err(CardError::Checksum { .. })));
    // After a failed stream the same link goes on, in order.
    assert_eq!(c.call(Op::Echo, 0, 5, 0, b"").unwrap().arg0, 5);
}

#[test]
fn dma_restores_check_what_the_card_says_it_took() {
    let img = image();
    let spec = VmSpec { name: "mc-dma".into(), mem_mib: 16, vcpus: 1 };
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let honest: Firmware = Box::new(move |m, dma| {
        let r = match m.op {
            Op::RestoreBegin => Message::response_to(m, Status::Ok, 9, 0, vec![]),
            Op::RestoreWriteDma => {
                let d = DmaDesc::decode(&m.payload).unwrap();
                let dma = dma.unwrap();
                let at = d.offset_in(super::dma::DMA_IOVA, dma.len() as u64).unwrap();
                let mut g = g.lock().unwrap();
                dma.append_to(at, d.len as usize, &mut g).unwrap();
                Message::response_to(m, Status::Ok, g.len() as u64, 0, vec![])
            }
            Op::RestoreCommit => {
                let ok = m.arg0 == crc32fast::hash(&g.lock().unwrap()) as u64;
                Message::response_to(m, if ok { Status::Ok } else { Status::BadRequest }, 9, 0, vec![])
            }
            _ => Message::response_to(m, Status::Internal, 0, 0, vec![]),
        };
        Some(r.encode())
    });
    let (_b0, _b2, mut c) = open(honest);
    assert_eq!(c.restore_vm(&spec, img.len() as u64, &mut img.as_slice()).unwrap(), 9);
    assert!(*got.lock().unwrap() == img, "the card received another image");

    // A card that says it received a byte less.
    let liar: Firmware = Box::new(|m, _| {
        let r = match m.op {
            Op::RestoreBegin => Message::response_to(m, Status::Ok, 9, 0, vec![]),
            Op::RestoreWriteDma => {
                let d = DmaDesc::decode(&m.payload).unwrap();
                Message::response_to(m, Status::Ok, m.arg0 + d.len as u64 - 1, 0, vec![])
            }
            _ => Message::response_to(m, Status::Ok, 9, 0, vec![]),
        };
        Some(r.encode())
    });
    let (_b0, _b2, mut c) = open(liar);
    let e = c.restore_vm(&spec, img.len() as u64, &mut img.as_slice()).unwrap_err();
    assert!(matches!(e, CardError::Range { what: "restore bytes received", .. }), "{e}");
    assert_eq!(c.call(Op::Echo, 0, 1, 0, b"").unwrap().status, Status::Ok, "the link goes on");
}

#[test]
fn a_card_that_does_not_offer_the_mapping_is_reached_by_messages() {
    // The 1.2 fake of `tests` has no map_region: messages, and it says why.
    let fake = MappedFake::new(echo_firmware());
    let bar0 = fake.bar0.clone();
    let mut old = regs();
    old.features = 0;
    old.abi_minor = 2;
    abi::publish_mapped(&bar0, &old.encode()).unwrap();
    let c = Card::open(Box::new(fake), CardOptions::default()).unwrap();
    let info = c.transport_info();
    assert!(matches!(info.access, Access::Messages { why } if why.contains("MAPPED")), "{info}");
    assert!(!info.dma_streams);
}
