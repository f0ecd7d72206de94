//! The card's relay of protocol-2 messages to a card-side VM's agent (ABI
//! 1.2 `agent-bulk`): the host's Telemetry message is checked whole, as the
//! agent would, before it goes to the VM's VMM; the changes come back as a
//! Health message.

use vmm::host::api::{CardNetwork, Change, QosLimitChange, QosVm, Signals};
use vmm::proto::msg::{self, MsgKind};
use vmm::proto::signals::{VmSignals, SIGNALS_LEN};
use vmm::vm::bulk::message;

/// The host's Telemetry message -> (sequence, signals); the field at fault.
pub fn decode_telemetry(buf: &[u8]) -> Result<(u64, u32, Vec<Signals>), &'static str> {
    let (hd, payload) = msg::check(buf).map_err(|e| e.field())?;
    if hd.kind != MsgKind::Telemetry {
        return Err("kind");
    }
    let mut out = Vec::with_capacity(hd.count as usize);
    for c in payload.chunks_exact(SIGNALS_LEN) {
        let arr: &[u8; SIGNALS_LEN] = c.try_into().map_err(|_| "record")?;
        out.push(Signals::from_proto(&VmSignals::decode(arr).ok_or("record")?));
    }
    Ok((hd.seq, hd.param, out))
}

/// The changes -> a Health message.
pub fn encode_health(seq: u64, changes: &[Change]) -> Result<Vec<u8>, &'static str> {
    let records: Option<Vec<_>> = changes.iter().map(|c| c.to_proto().map(|h| h.encode())).collect();
    Ok(message(MsgKind::Health, 0, seq, records.ok_or("health or reason")?))
}

/// The host's LogLines message -> (sequence, epoch, records); the field at fault.
pub fn decode_log_lines(buf: &[u8]) -> Result<(u64, u32, Vec<vmm::host::api::LogLine>), &'static str> {
    use vmm::proto::logs::{LogRecord, RECORD_LEN};
    let (hd, payload) = msg::check(buf).map_err(|e| e.field())?;
    if hd.kind != MsgKind::LogLines {
        return Err("kind");
    }
    let mut out = Vec::with_capacity(hd.count as usize);
    for c in payload.chunks_exact(RECORD_LEN) {
        let arr: &[u8; RECORD_LEN] = c.try_into().map_err(|_| "record")?;
        out.push(vmm::host::api::LogLine::from_proto(&LogRecord::decode(arr).ok_or("record")?));
    }
    Ok((hd.seq, hd.param, out))
}

/// The host's QosTick message -> (sequence, card network, VMs); the field at fault.
pub fn decode_qos_tick(buf: &[u8]) -> Result<(u64, CardNetwork, Vec<QosVm>), &'static str> {
    use vmm::proto::qos::{split_card_param, QosSignals, QOS_SIGNALS_LEN};
    let (hd, payload) = msg::check(buf).map_err(|e| e.field())?;
    if hd.kind != MsgKind::QosTick {
        return Err("kind");
    }
    let (use_bp, threshold_bp) = split_card_param(hd.param).ok_or("parameter")?;
    let mut out = Vec::with_capacity(hd.count as usize);
    for c in payload.chunks_exact(QOS_SIGNALS_LEN) {
        let arr: &[u8; QOS_SIGNALS_LEN] = c.try_into().map_err(|_| "record")?;
        out.push(QosVm::from_proto(&QosSignals::decode(arr).ok_or("record")?));
    }
    Ok((hd.seq, CardNetwork { use_bp, threshold_bp }, out))
}

/// The limit changes -> a QosChanges message.
pub fn encode_qos_changes(seq: u64, changes: &[QosLimitChange]) -> Result<Vec<u8>, &'static str> {
    let records: Option<Vec<_>> = changes.iter().map(|c| c.to_proto().map(|q| q.encode())).collect();
    Ok(message(MsgKind::QosChanges, 0, seq, records.ok_or("direction, reason or rate")?))
}

/// The acknowledgements -> a LogAcks message.
pub fn encode_log_acks(seq: u64, acks: &[vmm::host::api::Ack]) -> Vec<u8> {
    use vmm::proto::logs::LogAck;
    let records = acks.iter().map(|a| {
        LogAck { slot: a.slot, first_host: a.first_host, last_host: a.last_host, first_log: a.first_log }.encode()
    });
    message(MsgKind::LogAcks, 0, seq, records)
}
