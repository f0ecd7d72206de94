//! The mailbox command path: write the request slot, ring the doorbell
//! (its own register, or fused into the slot write on ABI 1.1 cards), wait
//! for the completion eventfd, read and check the response. One command in
//! flight at a time; commands given up on are remembered so the host never
//! overwrites a request slot the card has not consumed.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::Card;
use crate::abi::{self, BAR2_INDEX};
use crate::costs::VmCosts;
use crate::error::{CardError, Result};
use crate::mailbox::{self, Event, Message, Op, Status, VmInfo, VmSpec, HEADER_LEN};

/// Bytes of a response slot read in the first access; larger payloads take a second.
const INLINE_READ: usize = 4096;
/// While waiting for a completion, look at RESP_PRODUCED this often in case
/// an interrupt was lost.
const POLL_SLICE: Duration = Duration::from_millis(50);
/// On a mapped link, look at RESP_PRODUCED this long before sleeping on
/// the eventfd: a quick command is answered well within it, and waking
/// from poll costs more than this much spinning.
const HOST_SPIN: Duration = Duration::from_micros(150);
/// How long a command waits for the card to answer commands given up on
/// before it is refused (`Unanswered`) without being sent.
const UNANSWERED_GRACE: Duration = Duration::from_millis(50);
/// The first part of a spin that does not yield (an answer from a card
/// that is already polling comes within it).
const PURE_SPIN: Duration = Duration::from_micros(5);
/// The spin for a snapshot stream's chunk: the card copies a chunk in a
/// few hundred microseconds, and the host has nothing else to do; a sleep
/// and a wake per chunk would cost more than the copy.
const STREAM_SPIN: Duration = Duration::from_millis(2);

impl Card {
    /// One mailbox command: write the request slot, ring the doorbell, wait
    /// for the completion eventfd, read and validate the response.
    pub fn call(&mut self, op: Op, vm: u32, arg0: u64, arg1: u64, payload: &[u8]) -> Result<Message> {
        self.call_expecting(op, vm, arg0, arg1, payload, 0)
    }

    /// `call`, reading `expect` bytes of response payload in the same access
    /// as the header (one round trip less for snapshot chunks).
    pub(super) fn call_expecting(
        &mut self,
        op: Op,
        vm: u32,
        arg0: u64,
        arg1: u64,
        payload: &[u8],
        expect: usize,
    ) -> Result<Message> {
        let p = self.submit(op, vm, arg0, arg1, payload, expect)?;
        self.finish(p)
    }

    /// Send a command without waiting for it (one in flight at a time:
    /// `finish` it before the next). The snapshot streams work on chunk n
    /// while the card runs the command for chunk n + 1.
    pub(super) fn submit(
        &mut self,
        op: Op,
        vm: u32,
        arg0: u64,
        arg1: u64,
        payload: &[u8],
        expect: usize,
    ) -> Result<Pending> {
        if payload.len() > self.max_payload() {
            return Err(CardError::Invalid(format!(
                "payload of {} bytes exceeds {}",
                payload.len(),
                self.max_payload()
            )));
        }
        if self.abandoned > 0 {
            // A card slow for a moment (a fault just cleared, a busy
            // firmware) answers a command given up on within moments.
            let until = Instant::now() + UNANSWERED_GRACE;
            while let Err(e) = self.check_abandoned() {
                if !matches!(e, CardError::Unanswered { .. }) || Instant::now() >= until {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        let mut req = Message::request(op, seq, vm, arg0, arg1, payload.to_vec());
        let index = self.req_produced;
        // The fused doorbell saves a message; in mapped memory the doorbell
        // is a store anyway, and the card watches REQ_PRODUCED, not slots.
        let fused =
            !self.mapped() && self.first.features & abi::FEATURE_FUSED_DOORBELL != 0 && !self.opts.classic_doorbell;
        if fused {
            req.ring = Some(index.wrapping_add(1));
        }
        let off = mailbox::req_slot_offset(self.slots, self.slot_size, index);
        self.bar2_write(off, &req.encode())?;
        let produced = self.req_produced.wrapping_add(1);
        let mut spin = if matches!(op, Op::SnapshotReadDma | Op::RestoreWriteDma) { STREAM_SPIN } else { HOST_SPIN };
        if self.mapped() {
            if self.ring_mapped(produced)? && spin == HOST_SPIN {
                // A sleeping card wakes best where we are (the scheduler
                // puts a woken thread on the waker's CPU): get out of its
                // way and sleep on the completion, as the message path does.
                spin = Duration::ZERO;
            }
        } else if !fused {
            self.t.write(BAR2_INDEX, mailbox::REG_REQ_PRODUCED, &produced.to_le_bytes())?;
        }
        self.req_produced = produced;
        Ok(Pending { index, seq, op, expect, spin })
    }

    /// Wait for a submitted command's response and check it.
    pub(super) fn finish(&mut self, p: Pending) -> Result<Message> {
        let Pending { index, seq, op, expect, spin } = p;
        let resp = match self.wait_response(index, seq, op, expect, spin) {
            // Given up on while the card may still hold it.
            Err(e @ (CardError::Timeout { .. } | CardError::Stalled { .. })) => {
                self.abandoned += 1;
                self.abandoned_total += 1;
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
            self.set_bar2_reg(mailbox::REG_RESP_CONSUMED, self.resp_consumed)?;
        }
        if resp.status != Status::Ok {
            let message = String::from_utf8_lossy(&resp.payload[..resp.payload.len().min(256)]).into_owned();
            return Err(CardError::Refused { op: op.name(), status: resp.status, message });
        }
        Ok(resp)
    }

    /// A command given up on (timed out) may still be in the card: until
    /// the card has answered every one, nothing more is sent (`Unanswered`,
    /// at once). A card that has merely been slow catches up and the next
    /// command goes; a silent one costs its caller one command timeout, not
    /// one per command. An answered count outside the ring is a register
    /// out of range.
    pub(super) fn check_abandoned(&mut self) -> Result<()> {
        let answered = self.bar2_reg(mailbox::REG_RESP_PRODUCED)?;
        let pending = self.req_produced.wrapping_sub(answered);
        if pending > self.slots {
            return Err(CardError::Range {
                what: "mailbox requests unanswered",
                value: pending as u64,
                range: "<= ring slots",
            });
        }
        if pending == 0 {
            self.abandoned = 0;
            return Ok(());
        }
        Err(CardError::Unanswered { pending })
    }

    fn wait_response(&mut self, index: u32, seq: u32, op: Op, expect: usize, spin: Duration) -> Result<Message> {
        if self.mapped() {
            return self.wait_mapped(index, seq, op, expect, spin);
        }
        let deadline = Instant::now() + self.opts.command_timeout;
        let off = mailbox::resp_slot_offset(self.slots, self.slot_size, index);
        let inline = INLINE_READ.max(HEADER_LEN.saturating_add(expect)).min(self.slot_size as usize);
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(self.command_timeout());
            }
            let fired = wait_fd(self.irq.as_raw_fd(), (deadline - now).min(POLL_SLICE))?;
            if fired {
                // Only resets the counter so the next poll waits again; the
                // response slot, read below, is what counts.
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
            let produced = self.bar2_reg(mailbox::REG_RESP_PRODUCED)?;
            if produced.wrapping_sub(index) as i32 <= 0 {
                continue; // not produced yet: the slot holds an older answer
            }
            // The card says it answered. The slot read above may predate the
            // answer (it can land between the two reads), so read it again:
            // only now is a mismatch a wrong answer.
            let msg = self.read_slot(off, inline)?;
            return check_answer(msg, seq, op);
        }
    }

    /// The mapped wait: RESP_PRODUCED is a load, so look at it first (spin
    /// a little: an echo is answered in microseconds), then sleep on the
    /// completion eventfd, re-checking every slice in case one is lost.
    /// Only a produced response is read: the card writes the slot before
    /// it publishes RESP_PRODUCED (release) and leaves it alone after, so
    /// an honest card's answer cannot be read torn; a card rewriting it
    /// anyway gives bytes that fail the same checks as any bad answer.
    fn wait_mapped(&mut self, index: u32, seq: u32, op: Op, expect: usize, spin: Duration) -> Result<Message> {
        let start = Instant::now();
        let deadline = start + self.opts.command_timeout;
        let off = mailbox::resp_slot_offset(self.slots, self.slot_size, index);
        let produced = |c: &mut Card| -> Result<bool> {
            Ok(c.bar2_reg(mailbox::REG_RESP_PRODUCED)?.wrapping_sub(index) as i32 > 0)
        };
        let mut done = false;
        while start.elapsed() < spin {
            if produced(self)? {
                done = true;
                break;
            }
            // Past the first microseconds, give the CPU away between looks:
            // the scheduler tends to wake the card's thread on the CPU that
            // woke it (ours), where a pure spin would keep it from running.
            if start.elapsed() < PURE_SPIN {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        while !done {
            let now = Instant::now();
            if now >= deadline {
                return Err(self.command_timeout());
            }
            if wait_fd(self.irq.as_raw_fd(), (deadline - now).min(POLL_SLICE))? {
                let _ = self.irq.read();
            }
            self.t.link_state()?;
            done = produced(self)?;
            if !done {
                // A card frozen mid-command (its heartbeat stopped too) is
                // known well before the command timeout: three heartbeats
                // and the probe bound (a heartbeat merely late, while the
                // card works on a long command, is given that much).
                let m = self.mem.as_ref().ok_or(CardError::Invalid("mapped wait on a message link".into()))?;
                let regs = abi::read_mapped(&m.bar0)?;
                let since = self.note_heartbeat(regs.heartbeat);
                let frozen = Duration::from_millis(3 * regs.heartbeat_period_ms as u64) + self.opts.probe_timeout;
                if since > frozen {
                    return Err(CardError::Stalled {
                        heartbeat: regs.heartbeat,
                        stuck_ms: since.as_millis() as u64,
                        period_ms: regs.heartbeat_period_ms,
                    });
                }
            }
        }
        let msg = self.read_slot(off, HEADER_LEN.saturating_add(expect).min(self.slot_size as usize))?;
        check_answer(msg, seq, op)
    }

    fn command_timeout(&self) -> CardError {
        CardError::Timeout { what: "mailbox command", timeout_ms: self.opts.command_timeout.as_millis() as u64 }
    }

    fn read_slot(&mut self, off: u64, inline: usize) -> Result<Message> {
        // Reuse one buffer across commands: snapshot chunks are ~1 MiB each.
        let mut buf = std::mem::take(&mut self.scratch);
        buf.resize(inline, 0);
        let r = self.read_slot_into(off, &mut buf);
        self.scratch = buf;
        r
    }

    /// Read a slot into `buf` (header first, then as much payload as the
    /// header says) and decode that copy: the length checked is the length
    /// of the bytes decoded, whatever the slot holds meanwhile.
    fn read_slot_into(&mut self, off: u64, buf: &mut Vec<u8>) -> Result<Message> {
        self.bar2_read(off, buf)?;
        let len = Message::peek_payload_len(buf)?;
        if len > self.max_payload() {
            return Err(CardError::Range { what: "mailbox payload length", value: len as u64, range: "<= slot room" });
        }
        if HEADER_LEN + len > buf.len() {
            let have = buf.len();
            buf.resize(HEADER_LEN + len, 0);
            self.bar2_read(off + have as u64, &mut buf[have..])?;
        }
        Message::decode(&buf[..HEADER_LEN + len], self.max_payload())
    }

    /// Echo `arg` and `payload` through the card; an answer in order but with
    /// other contents is `EchoMismatch`.
    pub fn echo(&mut self, arg: u64, payload: &[u8]) -> Result<Message> {
        let m = self.call(Op::Echo, 0, arg, 0, payload)?;
        if m.arg0 != arg || m.payload != payload {
            return Err(CardError::EchoMismatch { sent: arg, got: m.arg0, payload_differs: m.payload != payload });
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

    pub fn list_vms(&mut self) -> Result<Vec<VmInfo>> {
        let m = self.call(Op::ListVms, 0, 0, 0, &[])?;
        mailbox::decode_vm_list(&m.payload)
    }

    /// The card's measured cost of each VM it runs (ABI 1.2). A card that
    /// does not offer it (a 1.1 card, or the feature bit clear) gives
    /// `Unsupported` without anything being sent: it would not know the op.
    pub fn vm_costs(&mut self) -> Result<VmCosts> {
        if self.first.features & abi::FEATURE_VM_COSTS == 0 {
            return Err(CardError::Unsupported {
                what: "per-VM costs (mailbox op vm-costs)",
                needs: "ABI 1.2 with feature bit 1",
                minor: self.first.abi_minor,
            });
        }
        let m = self.call(Op::VmCosts, 0, 0, 0, &[])?;
        let costs = VmCosts::decode(&m.payload)?;
        if m.arg0 != costs.vms.len() as u64 {
            return Err(CardError::Range { what: "VM cost count vs arg0", value: m.arg0, range: "the table's count" });
        }
        costs.check_against(&self.first)?;
        Ok(costs)
    }

    /// One protocol-2 exchange with VM `vm`'s management agent (ABI 1.2
    /// feature AGENT_BULK): `message` in, the agent's answer out. The
    /// bytes are the agent protocol's (`mc_proto::msg`); the caller checks
    /// the answer whole. `Unsupported`, with nothing sent, on a card
    /// without the feature.
    pub fn agent_bulk(&mut self, vm: u32, task: u64, message: &[u8]) -> Result<Vec<u8>> {
        if self.first.features & abi::FEATURE_AGENT_BULK == 0 {
            return Err(CardError::Unsupported {
                what: "agent messages (mailbox op agent-bulk)",
                needs: "ABI 1.2 with feature bit 3",
                minor: self.first.abi_minor,
            });
        }
        if message.len() > self.max_payload() {
            return Err(CardError::Invalid(format!(
                "an agent message of {} bytes exceeds a slot ({} bytes)",
                message.len(),
                self.max_payload()
            )));
        }
        let m = self.call(Op::AgentBulk, vm, task, 0, message)?;
        Ok(m.payload)
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

/// A command sent and not yet finished (`Card::submit`).
#[must_use = "a submitted command must be finished before the next"]
pub(super) struct Pending {
    index: u32,
    seq: u32,
    op: Op,
    expect: usize,
    /// How long to poll for the answer before sleeping.
    spin: Duration,
}

/// Our answer, or `OutOfOrder`.
fn check_answer(msg: Message, seq: u32, op: Op) -> Result<Message> {
    if msg.kind == mailbox::Kind::Response && msg.seq == seq && msg.op == op {
        return Ok(msg);
    }
    Err(CardError::OutOfOrder { expected: seq, op: op as u16, got_seq: msg.seq, got_op: msg.op as u16 })
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
        return Err(CardError::Os { what: "poll the completion eventfd", source: e });
    }
    Ok(rc > 0 && p.revents & libc::POLLIN != 0)
}
