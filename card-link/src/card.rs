//! The host's driver for the card: reads and validates the register file,
//! runs mailbox commands (doorbell + completion eventfd), streams snapshots,
//! and watches the heartbeat. Works over any `Transport`.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::abi::{self, Health, RegisterSnapshot, BAR0_INDEX, BAR2_INDEX};
use crate::error::{CardError, Result};
use crate::mailbox::{self, Event, Message, Op, Status, VmInfo, VmSpec, HEADER_LEN};
use crate::transport::Transport;

/// Bytes of a response slot read in the first access; larger payloads take a second.
const INLINE_READ: usize = 4096;
/// While waiting for a completion, look at RESP_PRODUCED this often in case
/// an interrupt was lost.
const POLL_SLICE: Duration = Duration::from_millis(50);

#[derive(Clone, Debug)]
pub struct CardOptions {
    /// Upper bound for one mailbox command (doorbell to response).
    pub command_timeout: Duration,
    /// Ring the doorbell with its own write even if the card offers the
    /// fused doorbell (for comparison and for 1.0 behaviour).
    pub classic_doorbell: bool,
}

impl Default for CardOptions {
    fn default() -> Self {
        CardOptions { command_timeout: Duration::from_secs(5), classic_doorbell: false }
    }
}

/// What `check_health` concluded.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthReport {
    pub heartbeat: u64,
    pub period_ms: u32,
    pub health: Health,
    /// Time since the heartbeat last moved.
    pub since_beat: Duration,
}

pub struct Card {
    t: Box<dyn Transport>,
    irq: EventFd,
    slots: u32,
    slot_size: u32,
    next_seq: u32,
    req_produced: u32,
    resp_consumed: u32,
    opts: CardOptions,
    first: RegisterSnapshot,
    last_beat: u64,
    last_beat_at: Instant,
    /// Commands given up on (timed out) that the card may still hold.
    abandoned: u32,
    scratch: Vec<u8>,
}

pub struct SnapshotInfo {
    pub size: u64,
    pub crc: u32,
}

impl Card {
    /// Validate the card (identity, ABI, geometry), sync the mailbox counters
    /// and wire the completion interrupt.
    pub fn open(mut t: Box<dyn Transport>, opts: CardOptions) -> Result<Card> {
        let first = read_snapshot(t.as_mut())?;
        let bar2 =
            t.region_size(BAR2_INDEX).ok_or(CardError::Range { what: "BAR2 size", value: 0, range: "present" })?;
        let need = mailbox::bar2_size(first.mailbox_slots, first.mailbox_slot_size);
        if bar2 < need {
            return Err(CardError::Range { what: "BAR2 size", value: bar2, range: "covers both rings" });
        }
        let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| CardError::Io(format!("eventfd: {e}")))?;
        t.set_completion_eventfd(&irq)?;
        let mut regs = [0u8; 16];
        t.read(BAR2_INDEX, 0, &mut regs)?;
        let word = |i: usize| u32::from_le_bytes([regs[i], regs[i + 1], regs[i + 2], regs[i + 3]]);
        let (req_produced, req_consumed, resp_produced) = (word(0), word(4), word(8));
        if req_produced != req_consumed || resp_produced != req_consumed {
            // A previous host left a command in flight; start after it.
            return Err(CardError::Range {
                what: "mailbox busy at open (requests in flight)",
                value: req_produced.wrapping_sub(resp_produced) as u64,
                range: "0",
            });
        }
        Ok(Card {
            t,
            irq,
            slots: first.mailbox_slots,
            slot_size: first.mailbox_slot_size,
            next_seq: req_produced.wrapping_mul(2654435761), // any start; responses must echo it
            req_produced,
            resp_consumed: resp_produced,
            opts,
            last_beat: first.heartbeat,
            last_beat_at: Instant::now(),
            abandoned: 0,
            scratch: Vec::new(),
            first,
        })
    }

    pub fn identity(&self) -> &RegisterSnapshot {
        &self.first
    }

    pub fn describe(&self) -> String {
        self.t.describe()
    }

    /// Largest payload one mailbox message can carry.
    pub fn max_payload(&self) -> usize {
        self.slot_size as usize - HEADER_LEN
    }

    /// Read and validate BAR0.
    pub fn registers(&mut self) -> Result<RegisterSnapshot> {
        let s = read_snapshot(self.t.as_mut())?;
        if s.serial != self.first.serial {
            return Err(CardError::Unknown { what: "card serial changed", value: s.serial });
        }
        Ok(s)
    }

    /// Read the registers and compute each resource's utilisation since
    /// `prev` (an earlier snapshot of this card). Returns the new snapshot to
    /// pass next time. This is what a placement engine samples.
    pub fn utilisation_since(&mut self, prev: &RegisterSnapshot) -> Result<(RegisterSnapshot, abi::Utilisation)> {
        let now = self.registers()?;
        let u = abi::utilisation(prev, &now)?;
        Ok((now, u))
    }

    /// Read the registers and judge liveness: a link timeout means the card
    /// is silent; a heartbeat that has not moved for three periods means it
    /// is stalled; health Failed is reported as such. Call it at least once
    /// per period to detect within three heartbeats.
    pub fn check_health(&mut self) -> Result<HealthReport> {
        let s = self.registers()?;
        let now = Instant::now();
        if s.heartbeat != self.last_beat {
            self.last_beat = s.heartbeat;
            self.last_beat_at = now;
        }
        let since = now.duration_since(self.last_beat_at);
        if since > Duration::from_millis(3 * s.heartbeat_period_ms as u64) {
            return Err(CardError::Stalled {
                heartbeat: s.heartbeat,
                stuck_ms: since.as_millis() as u64,
                period_ms: s.heartbeat_period_ms,
            });
        }
        if s.health == Health::Failed {
            return Err(CardError::Failed(s.health as u32));
        }
        Ok(HealthReport {
            heartbeat: s.heartbeat,
            period_ms: s.heartbeat_period_ms,
            health: s.health,
            since_beat: since,
        })
    }

    /// One mailbox command: write the request slot, ring the doorbell, wait
    /// for the completion eventfd, read and validate the response.
    pub fn call(&mut self, op: Op, vm: u32, arg0: u64, arg1: u64, payload: &[u8]) -> Result<Message> {
        self.call_expecting(op, vm, arg0, arg1, payload, 0)
    }

    /// `call`, reading `expect` bytes of response payload in the same access
    /// as the header (one round trip less for snapshot chunks).
    fn call_expecting(
        &mut self,
        op: Op,
        vm: u32,
        arg0: u64,
        arg1: u64,
        payload: &[u8],
        expect: usize,
    ) -> Result<Message> {
        if payload.len() > self.max_payload() {
            return Err(CardError::Invalid(format!(
                "payload of {} bytes exceeds {}",
                payload.len(),
                self.max_payload()
            )));
        }
        if self.abandoned > 0 {
            // Timed-out commands may still sit in the request ring: never
            // overwrite a slot the card has not consumed.
            let mut reg = [0u8; 4];
            self.t.read(BAR2_INDEX, mailbox::REG_REQ_CONSUMED, &mut reg)?;
            let in_flight = self.req_produced.wrapping_sub(u32::from_le_bytes(reg));
            if in_flight > self.slots {
                return Err(CardError::Range {
                    what: "mailbox requests in flight",
                    value: in_flight as u64,
                    range: "<= ring slots",
                });
            }
            if in_flight >= self.slots {
                return Err(CardError::Timeout {
                    what: "mailbox full: the card is not consuming commands",
                    timeout_ms: self.opts.command_timeout.as_millis() as u64,
                });
            }
            if in_flight == 0 {
                self.abandoned = 0;
            }
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        let mut req = Message::request(op, seq, vm, arg0, arg1, payload.to_vec());
        let index = self.req_produced;
        let fused = self.first.features & abi::FEATURE_FUSED_DOORBELL != 0 && !self.opts.classic_doorbell;
        if fused {
            req.ring = Some(index.wrapping_add(1));
        }
        let off = mailbox::req_slot_offset(self.slots, self.slot_size, index);
        self.t.write(BAR2_INDEX, off, &req.encode())?;
        self.req_produced = self.req_produced.wrapping_add(1);
        if !fused {
            self.t.write(BAR2_INDEX, mailbox::REG_REQ_PRODUCED, &self.req_produced.to_le_bytes())?;
        }
        let resp = match self.wait_response(index, seq, op, expect) {
            Err(e @ CardError::Timeout { .. }) => {
                self.abandoned += 1;
                self.resp_consumed = self.resp_consumed.wrapping_add(1);
                return Err(e);
            }
            r => r?,
        };
        self.resp_consumed = self.resp_consumed.wrapping_add(1);
        // The host never has more than one command in flight, so the card
        // cannot overrun the response ring; RESP_CONSUMED is informational
        // and written once per lap to save a round trip per command.
        if self.resp_consumed.is_multiple_of(self.slots) {
            self.t.write(BAR2_INDEX, mailbox::REG_RESP_CONSUMED, &self.resp_consumed.to_le_bytes())?;
        }
        if resp.status != Status::Ok {
            let message = String::from_utf8_lossy(&resp.payload[..resp.payload.len().min(256)]).into_owned();
            return Err(CardError::Refused { op: op.name(), status: resp.status, message });
        }
        Ok(resp)
    }

    fn wait_response(&mut self, index: u32, seq: u32, op: Op, expect: usize) -> Result<Message> {
        let deadline = Instant::now() + self.opts.command_timeout;
        let off = mailbox::resp_slot_offset(self.slots, self.slot_size, index);
        let inline = INLINE_READ.max(HEADER_LEN.saturating_add(expect)).min(self.slot_size as usize);
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(CardError::Timeout {
                    what: "mailbox command",
                    timeout_ms: self.opts.command_timeout.as_millis() as u64,
                });
            }
            let fired = wait_fd(self.irq.as_raw_fd(), (deadline - now).min(POLL_SLICE))?;
            if fired {
                let _ = self.irq.read();
            }
            // Fast path: read the slot straight away and recognise our answer
            // by its sequence number. Only when it is not ours do we spend a
            // round trip on RESP_PRODUCED to tell "not yet" from "wrong answer".
            let got = self.read_slot(off, inline);
            if let Ok(msg) = &got {
                if msg.kind == mailbox::Kind::Response && msg.seq == seq && msg.op == op {
                    return got;
                }
            }
            let mut reg = [0u8; 4];
            self.t.read(BAR2_INDEX, mailbox::REG_RESP_PRODUCED, &mut reg)?;
            let produced = u32::from_le_bytes(reg);
            if produced.wrapping_sub(index) as i32 <= 0 {
                continue; // not produced yet: the slot holds an older answer
            }
            // The card says it answered. The slot read above may predate the
            // answer (it can land between the two reads), so read it again:
            // only now is a mismatch a wrong answer.
            let msg = self.read_slot(off, inline)?;
            if msg.kind == mailbox::Kind::Response && msg.seq == seq && msg.op == op {
                return Ok(msg);
            }
            return Err(CardError::OutOfOrder {
                expected: seq,
                op: op as u16,
                got_seq: msg.seq,
                got_op: msg.op as u16,
            });
        }
    }

    fn read_slot(&mut self, off: u64, inline: usize) -> Result<Message> {
        // Reuse one buffer across commands: snapshot chunks are ~1 MiB each.
        let mut buf = std::mem::take(&mut self.scratch);
        buf.resize(inline, 0);
        let r = self.read_slot_into(off, &mut buf);
        self.scratch = buf;
        r
    }

    fn read_slot_into(&mut self, off: u64, buf: &mut Vec<u8>) -> Result<Message> {
        self.t.read(BAR2_INDEX, off, buf)?;
        let len = Message::peek_payload_len(buf)?;
        if len > self.max_payload() {
            return Err(CardError::Range { what: "mailbox payload length", value: len as u64, range: "<= slot room" });
        }
        if HEADER_LEN + len > buf.len() {
            let have = buf.len();
            buf.resize(HEADER_LEN + len, 0);
            self.t.read(BAR2_INDEX, off + have as u64, &mut buf[have..])?;
        }
        Message::decode(&buf[..HEADER_LEN + len], self.max_payload())
    }

    pub fn echo(&mut self, arg: u64, payload: &[u8]) -> Result<Message> {
        let m = self.call(Op::Echo, 0, arg, 0, payload)?;
        if m.arg0 != arg || m.payload != payload {
            return Err(CardError::OutOfOrder {
                expected: arg as u32,
                op: Op::Echo as u16,
                got_seq: m.arg0 as u32,
                got_op: Op::Echo as u16,
            });
        }
        Ok(m)
    }

    /// Start a management VM; returns its id on the card.
    pub fn start_vm(&mut self, spec: &VmSpec) -> Result<u32> {
        let m = self.call(Op::Start, 0, 0, 0, &spec.encode()?)?;
        u32::try_from(m.arg0).map_err(|_| CardError::Range { what: "VM id", value: m.arg0, range: "u32" })
    }

    pub fn stop_vm(&mut self, vm: u32) -> Result<()> {
        self.call(Op::Stop, vm, 0, 0, &[]).map(|_| ())
    }

    pub fn pause_vm(&mut self, vm: u32) -> Result<()> {
        self.call(Op::Pause, vm, 0, 0, &[]).map(|_| ())
    }

    pub fn resume_vm(&mut self, vm: u32) -> Result<()> {
        self.call(Op::Resume, vm, 0, 0, &[]).map(|_| ())
    }

    /// Snapshot a VM on the card (it is paused); the image stays on the card
    /// until read with `read_snapshot`.
    pub fn snapshot_vm(&mut self, vm: u32) -> Result<SnapshotInfo> {
        let m = self.call(Op::Snapshot, vm, 0, 0, &[])?;
        if m.arg0 > MAX_SNAPSHOT {
            return Err(CardError::Range { what: "snapshot size", value: m.arg0, range: "<= 4 GiB" });
        }
        Ok(SnapshotInfo { size: m.arg0, crc: m.arg1 as u32 })
    }

    /// Stream a VM's snapshot from the card into `out`, chunk by chunk,
    /// checking each chunk's length and the whole image's CRC.
    pub fn read_snapshot(&mut self, vm: u32, info: &SnapshotInfo, out: &mut dyn Write) -> Result<u64> {
        let chunk = self.max_payload() as u64;
        let mut off = 0u64;
        let mut crc = crc32fast::Hasher::new();
        while off < info.size {
            let want = chunk.min(info.size - off);
            let m = self.call_expecting(Op::SnapshotRead, vm, off, want, &[], want as usize)?;
            if m.payload.len() as u64 != want || m.arg0 != off {
                return Err(CardError::Range {
                    what: "snapshot chunk length",
                    value: m.payload.len() as u64,
                    range: "as requested",
                });
            }
            crc.update(&m.payload);
            out.write_all(&m.payload).map_err(|e| CardError::Io(format!("write snapshot: {e}")))?;
            off += want;
        }
        let computed = crc.finalize();
        if computed != info.crc {
            return Err(CardError::Checksum { what: "snapshot image", stated: info.crc, computed });
        }
        Ok(off)
    }

    /// Send a snapshot image to the card and restore it as a new VM; returns its id.
    pub fn restore_vm(&mut self, spec: &VmSpec, size: u64, input: &mut dyn Read) -> Result<u32> {
        if size > MAX_SNAPSHOT {
            return Err(CardError::Invalid(format!("snapshot of {size} bytes is too large")));
        }
        let m = self.call(Op::RestoreBegin, 0, size, 0, &spec.encode()?)?;
        let vm = u32::try_from(m.arg0).map_err(|_| CardError::Range { what: "VM id", value: m.arg0, range: "u32" })?;
        let chunk = self.max_payload();
        let mut buf = vec![0u8; chunk];
        let mut off = 0u64;
        let mut crc = crc32fast::Hasher::new();
        while off < size {
            let want = (chunk as u64).min(size - off) as usize;
            input.read_exact(&mut buf[..want]).map_err(|e| CardError::Io(format!("read snapshot: {e}")))?;
            crc.update(&buf[..want]);
            self.call(Op::RestoreWrite, vm, off, 0, &buf[..want])?;
            off += want as u64;
        }
        self.call(Op::RestoreCommit, vm, crc.finalize() as u64, 0, &[])?;
        Ok(vm)
    }

    pub fn list_vms(&mut self) -> Result<Vec<VmInfo>> {
        let m = self.call(Op::ListVms, 0, 0, 0, &[])?;
        mailbox::decode_vm_list(&m.payload)
    }

    /// Events with sequence >= `from`, at most `max`.
    pub fn read_events(&mut self, from: u64, max: u32) -> Result<Vec<Event>> {
        let m = self.call(Op::ReadEvents, 0, from, max as u64, &[])?;
        let ev = mailbox::decode_events(&m.payload)?;
        if ev.len() > max as usize || ev.first().is_some_and(|e| e.seq < from) {
            return Err(CardError::Range { what: "event log answer", value: ev.len() as u64, range: "as requested" });
        }
        Ok(ev)
    }
}

pub const MAX_SNAPSHOT: u64 = 4 << 30;

pub fn read_snapshot(t: &mut dyn Transport) -> Result<RegisterSnapshot> {
    let mut buf = [0u8; abi::BAR0_SNAPSHOT_LEN];
    t.read(BAR0_INDEX, 0, &mut buf)?;
    RegisterSnapshot::decode(&buf)
}

/// Wait until `fd` is readable or `timeout` passes.
fn wait_fd(fd: i32, timeout: Duration) -> Result<bool> {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut p, 1, ms) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(CardError::Io(format!("poll completion eventfd: {e}")));
    }
    Ok(rc > 0 && p.revents & libc::POLLIN != 0)
}

#[cfg(test)]
mod tests {
    //! A hostile card in memory: a transport whose "firmware" is a closure
    //! answering each doorbell with whatever bytes a test wants.
    use super::*;
    use crate::abi::{Resource, ResourceKind};
    use crate::mailbox::{DEFAULT_SLOTS, DEFAULT_SLOT_SIZE};

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
                        let _ = irq.write(1);
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
            self.irq = Some(fd.try_clone().map_err(|e| CardError::Io(e.to_string()))?);
            Ok(())
        }
        fn describe(&self) -> String {
            "fake".into()
        }
    }

    fn card_with(bar0: Vec<u8>, firmware: Firmware) -> Result<Card> {
        let mut bar0 = bar0;
        bar0.resize(abi::BAR0_SIZE as usize, 0);
        let fake = FakeCard {
            bar0,
            bar2: vec![0; mailbox::bar2_size(DEFAULT_SLOTS, DEFAULT_SLOT_SIZE) as usize],
            irq: None,
            firmware,
        };
        Card::open(Box::new(fake), CardOptions { command_timeout: Duration::from_millis(150), classic_doorbell: false })
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
        // Abandoned commands are counted; once the ring would overflow the
        // host refuses instead of overwriting unconsumed requests.
        for _ in 0..DEFAULT_SLOTS + 1 {
            let _ = c.echo(1, b"");
        }
        let e = c.echo(1, b"").unwrap_err();
        assert!(matches!(e, CardError::Timeout { what, .. } if what.contains("mailbox full")), "{e}");
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
}
