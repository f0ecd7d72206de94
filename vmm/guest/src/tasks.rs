//! The management tasks' bulk exchanges (protocol 2): the VMM writes a
//! message into the in-window and names its length; the agent checks it
//! whole (`take_in`), runs the task's pure rules from `mc_tasks` over the
//! task's state (statics here: guest RAM, so a snapshot, a move or a
//! checkpoint carries them) and writes its answer message into the
//! out-window (`Answer`). Each returns the answer's length, or
//! BULK_REFUSED | the refusal code naming the field.

use core::ptr::addr_of_mut;

use mc_proto as proto;
use proto::msg::{self, MsgHeader, MsgKind};

const MAX: usize = proto::msg::MAX_RECORDS as usize;
/// A record that does not decode (or a VM twice in one qos tick).
const REFUSED_RECORD: u64 = proto::BULK_REFUSED | 10;
/// A log batch whose VMs' records are mixed.
const REFUSED_ORDER: u64 = proto::BULK_REFUSED | 11;

/// The monitor task's memory of every user VM, by slot, and its tick counter.
static mut MONITOR: [mc_tasks::monitor::VmState; MAX] = [mc_tasks::monitor::VmState::NEW; MAX];
static mut MONITOR_TICK: u32 = 0;

/// The log task's memory of every user VM's log, by slot.
static mut LOGS: [mc_tasks::log::VmLog; MAX] = [mc_tasks::log::VmLog::NEW; MAX];

/// The qos task's memory of every user VM's narrowed limits, and across
/// VMs; the decoded batch of the tick in hand (the rules look at every VM
/// more than once).
static mut QOS: [mc_tasks::qos::VmQos; MAX] = [mc_tasks::qos::VmQos::NEW; MAX];
static mut QOS_GLOBAL: mc_tasks::qos::Global = mc_tasks::qos::Global::NEW;
static mut QOS_BATCH: [proto::qos::QosSignals; MAX] =
    [proto::qos::QosSignals { slot: 0, flags: 0, rate: [0; 2], base: [0; 2], min_rate: 0, cpu_ppm: 0, runq_p99_us: 0 };
        MAX];

/// How every answer is spoiled (`proto::hostile`; a self test of the
/// host's checks). In guest RAM like the tasks' state.
static mut HOSTILE: u64 = proto::hostile::HONEST;

/// Op HOSTILE: set the mode; the reply is the mode set (unknown modes refused).
pub fn set_hostile(mode: u64) -> u64 {
    if mode > proto::hostile::LYING_COUNT {
        return proto::BULK_REFUSED | msg::MsgError::Param(mode as u32).code();
    }
    // SAFETY: single-threaded guest.
    unsafe { HOSTILE = mode };
    mode
}

/// The in-window's message of `len` bytes, checked whole and of `kind`.
fn take_in(len: u64, kind: MsgKind) -> Result<(MsgHeader, &'static [u8]), u64> {
    if len > proto::BULK_IN_LEN {
        return Err(proto::BULK_REFUSED | msg::MsgError::Len(0).code());
    }
    // SAFETY: the in-window is guest RAM the VMM wrote before it queued
    // this request; nothing writes it while the agent handles it.
    let input = unsafe { core::slice::from_raw_parts(proto::BULK_IN_ADDR as *const u8, len as usize) };
    let (hd, payload) = msg::check(input).map_err(|e| proto::BULK_REFUSED | e.code())?;
    if hd.kind != kind {
        return Err(proto::BULK_REFUSED | msg::MsgError::Kind(hd.kind as u16).code());
    }
    Ok((hd, payload))
}

/// The answer being written into the out-window: records of one size after
/// room for the header.
struct Answer {
    body: &'static mut [u8],
    n: usize,
    len: usize,
}

impl Answer {
    fn new(record_len: usize) -> Answer {
        // SAFETY: single-threaded guest; the out-window is guest RAM the
        // VMM reads only after the reply, and one Answer exists at a time.
        let out =
            unsafe { core::slice::from_raw_parts_mut(proto::BULK_OUT_ADDR as *mut u8, proto::BULK_OUT_LEN as usize) };
        Answer { body: &mut out[msg::MSG_HEADER_LEN..], n: 0, len: record_len }
    }

    fn push(&mut self, record: &[u8]) {
        // The window holds MAX_RECORDS of the largest record; a task never
        // answers more records than it was given.
        if let Some(dst) = self.body.get_mut(self.n * self.len..(self.n + 1) * self.len) {
            dst.copy_from_slice(record);
            self.n += 1;
        }
    }

    /// Write the header; the answer's length. A hostile agent spoils it
    /// here, the one place every answer passes.
    fn finish(self, kind: MsgKind, seq: u64) -> u64 {
        use proto::hostile;
        // SAFETY: single-threaded guest.
        let mode = unsafe { HOSTILE };
        let mut size = self.n * self.len;
        let (mut kind, mut count) = (kind, self.n as u32);
        match mode {
            hostile::WRONG_KIND => {
                // Well formed, empty, of another answer kind.
                kind = match kind {
                    MsgKind::Health => MsgKind::LogAcks,
                    MsgKind::LogAcks => MsgKind::QosChanges,
                    _ => MsgKind::Health,
                };
                (size, count) = (0, 0);
            }
            hostile::LYING_COUNT => count += 1,
            _ => {}
        }
        let mut h = [0u8; msg::MSG_HEADER_LEN];
        msg::write_header(&mut h, kind, 0, seq, count, &self.body[..size]);
        // SAFETY: as in `Answer::new`; the header room is before `body`.
        let head = unsafe { core::slice::from_raw_parts_mut(proto::BULK_OUT_ADDR as *mut u8, msg::MSG_HEADER_LEN) };
        head.copy_from_slice(&h);
        if mode == hostile::TOO_LONG {
            return proto::BULK_OUT_LEN + 4096;
        }
        (msg::MSG_HEADER_LEN + size) as u64
    }
}

/// One monitor tick over a Telemetry message (the tick period in its
/// parameter); the changes answer as a Health message.
pub fn monitor_tick(len: u64) -> u64 {
    use proto::signals::{VmSignals, CHANGE_LEN, SIGNALS_LEN};
    let (hd, payload) = match take_in(len, MsgKind::Telemetry) {
        Ok(x) => x,
        Err(refused) => return refused,
    };
    let record = |c: &[u8]| -> Option<VmSignals> { VmSignals::decode(c.try_into().ok()?) };
    if payload.chunks_exact(SIGNALS_LEN).any(|c| record(c).is_none()) {
        return REFUSED_RECORD;
    }
    // SAFETY: single-threaded guest; the statics are only used here.
    let (states, tick) = unsafe {
        MONITOR_TICK = MONITOR_TICK.wrapping_add(1);
        (&mut *addr_of_mut!(MONITOR), MONITOR_TICK)
    };
    let mut answer = Answer::new(CHANGE_LEN);
    let policy = mc_tasks::monitor::Policy::for_tick_ms(hd.param);
    let signals = payload.chunks_exact(SIGNALS_LEN).filter_map(record);
    mc_tasks::monitor::tick(states, signals, tick, &policy, |c| answer.push(&c.encode()));
    answer.finish(MsgKind::Health, hd.seq)
}

/// One log exchange over a LogLines message (the host's epoch in its
/// parameter); the acknowledgements answer as a LogAcks message.
pub fn log_take(len: u64) -> u64 {
    use proto::logs::{LogRecord, ACK_LEN, RECORD_LEN};
    let (hd, payload) = match take_in(len, MsgKind::LogLines) {
        Ok(x) => x,
        Err(refused) => return refused,
    };
    let record = |c: &[u8]| -> Option<LogRecord> { LogRecord::decode(c.try_into().ok()?) };
    if payload.chunks_exact(RECORD_LEN).any(|c| record(c).is_none()) {
        return REFUSED_RECORD;
    }
    if !mc_tasks::log::grouped(payload.chunks_exact(RECORD_LEN).filter_map(record).map(|r| r.slot)) {
        return REFUSED_ORDER;
    }
    // SAFETY: single-threaded guest; the static is only used here.
    let states = unsafe { &mut *addr_of_mut!(LOGS) };
    let mut answer = Answer::new(ACK_LEN);
    let records = payload.chunks_exact(RECORD_LEN).filter_map(record);
    mc_tasks::log::take(states, hd.param, records, |a| answer.push(&a.encode()));
    answer.finish(MsgKind::LogAcks, hd.seq)
}

/// One qos tick over a QosTick message (the card's network use and
/// threshold in its parameter; one record per VM); the limit changes answer
/// as a QosChanges message.
pub fn qos_tick(len: u64) -> u64 {
    use proto::qos::{split_card_param, QosSignals, QOS_CHANGE_LEN, QOS_SIGNALS_LEN};
    let (hd, payload) = match take_in(len, MsgKind::QosTick) {
        Ok(x) => x,
        Err(refused) => return refused,
    };
    let Some(card) = split_card_param(hd.param) else {
        return proto::BULK_REFUSED | msg::MsgError::Param(hd.param).code();
    };
    // SAFETY: single-threaded guest; the statics are only used here.
    let (batch, states, global) =
        unsafe { (&mut *addr_of_mut!(QOS_BATCH), &mut *addr_of_mut!(QOS), &mut *addr_of_mut!(QOS_GLOBAL)) };
    let mut n_in = 0usize;
    for c in payload.chunks_exact(QOS_SIGNALS_LEN) {
        let Some(s) = c.try_into().ok().and_then(QosSignals::decode) else {
            return REFUSED_RECORD;
        };
        // A VM twice in one tick is a lie about the batch.
        if batch[..n_in].iter().any(|o| o.slot == s.slot) {
            return REFUSED_RECORD;
        }
        batch[n_in] = s;
        n_in += 1;
    }
    let mut answer = Answer::new(QOS_CHANGE_LEN);
    let policy = mc_tasks::qos::Policy::default();
    mc_tasks::qos::tick(global, states, &batch[..n_in], card, &policy, |c| answer.push(&c.encode()));
    answer.finish(MsgKind::QosChanges, hd.seq)
}
