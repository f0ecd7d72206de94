//! Protocol 2 on the VMM side: a bulk message written into the guest's
//! in-window, a request frame naming its length, the agent's answer read
//! from the out-window and checked whole before anything in it is used. An
//! agent that answers with something malformed (a length past its window,
//! a bad header, a record that does not decode or names a VM it was not
//! asked about, more changes than VMs) is hostile: the VM is stopped, as for
//! a bad descriptor, and the error says which field was wrong. An in-message
//! the agent refuses (it says which field) leaves the VM running.

use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::shared::lock;
use super::Vm;
use crate::error::{Error, MemoryError, Result, StopReason};
use crate::proto::logs::{LogAck, LogRecord, ACK_LEN};
use crate::proto::msg::{self, MsgKind, MSG_HEADER_LEN};
use crate::proto::qos::{QosChange, QosReason, QosSignals, QOS_CHANGE_LEN};
use crate::proto::signals::{HealthChange, VmSignals, CHANGE_LEN};
use crate::proto::{self, op};

impl Vm {
    /// One status-monitoring tick: the signals of up to 1,024 user VMs in,
    /// the health changes the monitor agent decided out.
    pub fn monitor_tick(
        &self,
        seq: u64,
        tick_ms: u32,
        batch: &[VmSignals],
        timeout: Duration,
    ) -> Result<Vec<HealthChange>> {
        let message = telemetry_message(seq, tick_ms, batch)?;
        self.bulk_exchange(&message, op::MONITOR_TICK, timeout, |a| check_health_answer(a, seq, batch))
    }

    /// A Telemetry message as bytes (what a relay, e.g. the card, carries):
    /// sent as is, so the agent's own checks decide; `batch` is what the
    /// answer is checked against.
    pub fn monitor_tick_message(
        &self,
        message: &[u8],
        seq: u64,
        batch: &[VmSignals],
        timeout: Duration,
    ) -> Result<Vec<HealthChange>> {
        if message.len() as u64 > proto::BULK_IN_LEN {
            return Err(Error::Config { field: "message", reason: format!("{} bytes", message.len()) });
        }
        self.bulk_exchange(message, op::MONITOR_TICK, timeout, |a| check_health_answer(a, seq, batch))
    }

    /// [`Vm::monitor_tick`] with the agent's malformed-answer self test.
    pub fn monitor_tick_hostile_self_test(&self, seq: u64, batch: &[VmSignals], timeout: Duration) -> Result<()> {
        let message = telemetry_message(seq, 1000, batch)?;
        self.bulk_exchange(&message, op::BAD_BULK, timeout, |a| check_health_answer(a, seq, batch)).map(drop)
    }

    /// One log exchange: `records` (the host's pending lines, `epoch` its
    /// run) in, the log agent's acknowledgements out.
    pub fn log_take(&self, seq: u64, epoch: u32, records: &[LogRecord], timeout: Duration) -> Result<Vec<LogAck>> {
        let message = log_message(seq, epoch, records)?;
        self.bulk_exchange(&message, op::LOG_TAKE, timeout, |answer| check_log_answer(answer, seq, records))
    }

    /// One QoS-policy tick: every user VM's rates and policy and the
    /// card's network use (basis points) in, the limit changes out.
    pub fn qos_tick(
        &self,
        seq: u64,
        card_use_bp: u32,
        card_threshold_bp: u32,
        batch: &[QosSignals],
        timeout: Duration,
    ) -> Result<Vec<QosChange>> {
        let message = qos_message(seq, card_use_bp, card_threshold_bp, batch)?;
        self.bulk_exchange(&message, op::QOS_TICK, timeout, |answer| check_qos_answer(answer, seq, batch))
    }

    /// Write `message` into the in-window, ask the agent (`opcode`), read
    /// its answer and check it with `check`; a malformed answer stops the VM.
    fn bulk_exchange<T>(
        &self,
        message: &[u8],
        opcode: u64,
        timeout: Duration,
        check: impl FnOnce(&[u8]) -> std::result::Result<T, &'static str>,
    ) -> Result<T> {
        // One exchange at a time: the windows are single buffers.
        let _bulk = lock(&self.bulk);
        self.sh.mem.write_slice(message, GuestAddress(proto::BULK_IN_ADDR)).map_err(|source| MemoryError::Access {
            what: "the bulk in-window",
            addr: proto::BULK_IN_ADDR,
            source,
        })?;
        let reply = self.request(opcode, message.len() as u64, timeout)?;
        if reply.value & proto::BULK_REFUSED != 0 {
            return Err(Error::Refused { field: msg::MsgError::field_of_code(reply.value & 0xff) });
        }
        let hostile = |field: &'static str| {
            self.sh.fail(StopReason::Device(format!("hostile agent answer: {field}")));
            Error::Hostile { field }
        };
        let len = reply.value;
        if len < MSG_HEADER_LEN as u64 || len > proto::BULK_OUT_LEN {
            return Err(hostile("length"));
        }
        let mut buf = vec![0u8; len as usize];
        self.sh.mem.read_slice(&mut buf, GuestAddress(proto::BULK_OUT_ADDR)).map_err(|source| MemoryError::Access {
            what: "the bulk out-window",
            addr: proto::BULK_OUT_ADDR,
            source,
        })?;
        check(&buf).map_err(hostile)
    }
}

/// The LogLines message for `records` from the host's `epoch`.
pub fn log_message(seq: u64, epoch: u32, records: &[LogRecord]) -> Result<Vec<u8>> {
    if records.len() > msg::MAX_RECORDS as usize {
        return Err(Error::Config {
            field: "records",
            reason: format!("{} log records in one message; at most {}", records.len(), msg::MAX_RECORDS),
        });
    }
    Ok(message(MsgKind::LogLines, epoch, seq, records.iter().map(LogRecord::encode)))
}

/// A whole protocol-2 message of `kind`: its header over `records`, each
/// already encoded (the caller keeps to [`msg::MAX_RECORDS`]).
pub fn message<R: AsRef<[u8]>>(kind: MsgKind, param: u32, seq: u64, records: impl IntoIterator<Item = R>) -> Vec<u8> {
    let mut out = vec![0u8; MSG_HEADER_LEN];
    let mut count = 0u32;
    for r in records {
        out.extend_from_slice(r.as_ref());
        count += 1;
    }
    let mut head = [0u8; MSG_HEADER_LEN];
    msg::write_header(&mut head, kind, param, seq, count, &out[MSG_HEADER_LEN..]);
    out[..MSG_HEADER_LEN].copy_from_slice(&head);
    out
}

/// Check a log agent's answer to LogLines `seq` of `records` whole: a
/// LogAcks message, the same sequence, at most one acknowledgement per VM
/// that sent lines, each valid and about such a VM.
pub fn check_log_answer(buf: &[u8], seq: u64, records: &[LogRecord]) -> std::result::Result<Vec<LogAck>, &'static str> {
    let (hd, payload) = msg::check(buf).map_err(|e| e.field())?;
    if hd.kind != MsgKind::LogAcks {
        return Err("kind");
    }
    if hd.seq != seq {
        return Err("sequence");
    }
    let mut out: Vec<LogAck> = Vec::with_capacity(hd.count as usize);
    for c in payload.chunks_exact(ACK_LEN) {
        let arr: &[u8; ACK_LEN] = c.try_into().map_err(|_| "record")?;
        let a = LogAck::decode(arr).ok_or("record")?;
        if !records.iter().any(|r| r.slot == a.slot) {
            return Err("slot");
        }
        if out.iter().any(|o| o.slot == a.slot) {
            return Err("slot (twice)");
        }
        out.push(a);
    }
    Ok(out)
}

/// The QosTick message for `batch` with the card's network use and
/// threshold (basis points of its capacity; the threshold 1..=10000).
pub fn qos_message(seq: u64, use_bp: u32, threshold_bp: u32, batch: &[QosSignals]) -> Result<Vec<u8>> {
    if !(1..=10_000).contains(&threshold_bp) {
        return Err(Error::Config { field: "threshold_bp", reason: format!("{threshold_bp} is outside 1..=10000") });
    }
    if batch.len() > msg::MAX_RECORDS as usize {
        return Err(Error::Config {
            field: "vms",
            reason: format!("{} VMs in one tick; at most {}", batch.len(), msg::MAX_RECORDS),
        });
    }
    let param = crate::proto::qos::card_param(use_bp, threshold_bp);
    Ok(message(MsgKind::QosTick, param, seq, batch.iter().map(QosSignals::encode)))
}

/// Check a qos agent's answer to QosTick `seq` of `batch` whole: a
/// QosChanges message, the same sequence, every change valid and within the
/// policy of a VM that was asked about (an adaptive one; a narrowing at or
/// above its floor and below its configured limit), at most one change per
/// VM and direction.
pub fn check_qos_answer(
    buf: &[u8],
    seq: u64,
    batch: &[QosSignals],
) -> std::result::Result<Vec<QosChange>, &'static str> {
    let (hd, payload) = msg::check(buf).map_err(|e| e.field())?;
    if hd.kind != MsgKind::QosChanges {
        return Err("kind");
    }
    if hd.seq != seq {
        return Err("sequence");
    }
    if hd.count as usize > 2 * batch.len() {
        return Err("count");
    }
    let mut out: Vec<QosChange> = Vec::with_capacity(hd.count as usize);
    for c in payload.chunks_exact(QOS_CHANGE_LEN) {
        let arr: &[u8; QOS_CHANGE_LEN] = c.try_into().map_err(|_| "record")?;
        let change = QosChange::decode(arr).ok_or("record")?;
        let asked = batch.iter().find(|s| s.slot == change.slot).ok_or("slot")?;
        if change.reason != QosReason::Calm && !change.within(asked) {
            return Err("rate (outside the VM's policy)");
        }
        if out.iter().any(|o| o.slot == change.slot && o.dir == change.dir) {
            return Err("slot (twice)");
        }
        out.push(change);
    }
    Ok(out)
}

/// The Telemetry message for `batch`.
/// `tick_ms` is the tick period the agent's time bounds are measured in.
pub fn telemetry_message(seq: u64, tick_ms: u32, batch: &[VmSignals]) -> Result<Vec<u8>> {
    if !(100..=60_000).contains(&tick_ms) {
        return Err(Error::Config { field: "tick_ms", reason: format!("{tick_ms} is outside 100..=60000") });
    }
    if batch.len() > msg::MAX_RECORDS as usize {
        return Err(Error::Config {
            field: "signals",
            reason: format!("{} VMs in one tick; at most {}", batch.len(), msg::MAX_RECORDS),
        });
    }
    Ok(message(MsgKind::Telemetry, tick_ms, seq, batch.iter().map(VmSignals::encode)))
}

/// Check a monitor agent's answer to the Telemetry message `seq` of
/// `batch` whole: a Health message, the same sequence, no more changes than
/// VMs, every record valid (a reason that explains its state) and about a
/// VM that was asked about. Returns the changes, or the field at fault.
pub fn check_health_answer(
    buf: &[u8],
    seq: u64,
    batch: &[VmSignals],
) -> std::result::Result<Vec<HealthChange>, &'static str> {
    let (hd, payload) = msg::check(buf).map_err(|e| e.field())?;
    if hd.kind != MsgKind::Health {
        return Err("kind");
    }
    if hd.seq != seq {
        return Err("sequence");
    }
    if hd.count as usize > batch.len() {
        return Err("count");
    }
    let mut out = Vec::with_capacity(hd.count as usize);
    for c in payload.chunks_exact(CHANGE_LEN) {
        let arr: &[u8; CHANGE_LEN] = c.try_into().map_err(|_| "record")?;
        let change = HealthChange::decode(arr).ok_or("record")?;
        if !batch.iter().any(|s| s.slot == change.slot) {
            return Err("slot");
        }
        out.push(change);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::signals::{Health, Reason, FLAG_EXISTS};

    fn answer(seq: u64, changes: &[HealthChange]) -> Vec<u8> {
        message(MsgKind::Health, 0, seq, changes.iter().map(HealthChange::encode))
    }

    #[test]
    fn answers_are_checked_whole() {
        let batch = [VmSignals { slot: 4, flags: FLAG_EXISTS, ..VmSignals::default() }];
        let ok = HealthChange { slot: 4, health: Health::Running, reason: Reason::Healthy, tick: 1, detail: 0 };
        assert_eq!(check_health_answer(&answer(9, &[ok]), 9, &batch), Ok(vec![ok]));
        assert_eq!(check_health_answer(&answer(8, &[ok]), 9, &batch), Err("sequence"));
        assert_eq!(check_health_answer(&answer(9, &[ok, ok]), 9, &batch), Err("count"));
        let other = HealthChange { slot: 5, ..ok };
        assert_eq!(check_health_answer(&answer(9, &[other]), 9, &batch), Err("slot"));
        let mut lie = answer(9, &[ok]);
        lie[MSG_HEADER_LEN + 5] = Reason::Gone as u8; // "gone" does not explain "running"
        let crc = msg::crc32(&lie[MSG_HEADER_LEN..]);
        lie[24..28].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(check_health_answer(&lie, 9, &batch), Err("record"));
        assert_eq!(check_health_answer(&lie[..20], 9, &batch), Err("length"));
        let telemetry = telemetry_message(9, 1000, &batch).expect("message");
        assert_eq!(check_health_answer(&telemetry, 9, &batch), Err("kind"), "not a Health message");
    }
}
