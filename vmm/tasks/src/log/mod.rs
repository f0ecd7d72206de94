//! Log management: the log agent takes user VMs' log lines and sequences
//! them into each VM's log. The host numbers lines per VM as it captures
//! them (1, 2, 3... within one run of the governor, its *epoch*) and sends
//! every line until it is acknowledged; the agent takes each host number
//! once, in order, and gives it the next number of that VM's log. Within an
//! epoch both numbers advance together, so one offset maps host numbers to
//! log numbers and any range the agent holds can be acknowledged again
//! (the host may have lost an acknowledgement while the log VM moved).
//! A restarted governor starts a new epoch and numbers from 1 again; the
//! log goes on from where it was.
//!
//! The host sends a VM's lines from the oldest it has not written, so the
//! first host number of a VM in a batch says the host holds everything
//! below it. If that is past what the agent holds, the agent was brought
//! back from an older checkpoint (its card died): it moves on to that
//! number with the same offset, so the log numbers the host already wrote
//! are not given twice. A gap after the first record is refused (the host
//! sends those again).

use mc_proto::logs::{LogAck, LogRecord};

/// The agent's memory of one VM's log (in guest memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmLog {
    pub epoch: u32,
    /// The next host number it will take.
    pub next_host: u64,
    /// The next number of the VM's log.
    pub next_log: u64,
    pub lines: u64,
    pub bytes: u64,
}

impl VmLog {
    pub const NEW: VmLog = VmLog { epoch: 0, next_host: 1, next_log: 1, lines: 0, bytes: 0 };
}

/// Whether every VM's records are together (the order `take` needs): a
/// slot that comes back after another slot's records is refused.
pub fn grouped(slots: impl Iterator<Item = u32>) -> bool {
    let mut seen = [0u64; 16];
    let mut prev: Option<u32> = None;
    for s in slots {
        if prev == Some(s) {
            continue;
        }
        prev = Some(s);
        if s < 1024 {
            let (w, b) = ((s / 64) as usize, s % 64);
            if seen[w] & (1 << b) != 0 {
                return false;
            }
            seen[w] |= 1 << b;
        }
    }
    true
}

/// Take a batch of records from the host's `epoch`: each VM's records in
/// host order; a host number already held is skipped, the next one is
/// taken, one past it (a gap) ends that VM's part of the batch (the host
/// sends it again). One acknowledgement per VM that sent anything, for the
/// range of this batch's host numbers the agent holds. Returns how many
/// records named a slot outside `states`.
pub fn take(
    states: &mut [VmLog],
    epoch: u32,
    records: impl Iterator<Item = LogRecord>,
    mut ack: impl FnMut(LogAck),
) -> u32 {
    let mut out_of_range = 0;
    // The VM whose records are being read, and the smallest host number it
    // sent in this batch that the agent holds (for its acknowledgement).
    let mut open: Option<(u32, u64, bool)> = None;
    let flush = |open: &mut Option<(u32, u64, bool)>, states: &[VmLog], ack: &mut dyn FnMut(LogAck)| {
        if let Some((slot, first, _)) = open.take() {
            if let Some(st) = states.get(slot as usize) {
                if first < st.next_host {
                    let offset = st.next_log - st.next_host;
                    ack(LogAck { slot, first_host: first, last_host: st.next_host - 1, first_log: first + offset });
                }
            }
        }
    };
    for r in records {
        if r.slot as usize >= states.len() {
            out_of_range += 1;
            continue;
        }
        if open.is_some_and(|(slot, _, _)| slot != r.slot) {
            flush(&mut open, states, &mut ack);
        }
        let st = &mut states[r.slot as usize];
        if st.epoch != epoch {
            // A restarted host numbers from 1 again; the log goes on.
            st.epoch = epoch;
            st.next_host = 1;
        }
        let first_of_vm = open.is_none();
        let entry = open.get_or_insert((r.slot, r.host_seq, false));
        if entry.2 {
            continue; // a gap earlier in this batch: the rest comes again
        }
        if first_of_vm && r.host_seq > st.next_host {
            // The host wrote everything below: catch up, same offset.
            let skip = r.host_seq - st.next_host;
            st.next_host += skip;
            st.next_log += skip;
        }
        if r.host_seq < st.next_host {
            entry.1 = entry.1.min(r.host_seq);
        } else if r.host_seq == st.next_host {
            entry.1 = entry.1.min(r.host_seq);
            st.next_host += 1;
            st.next_log += 1;
            st.lines += 1;
            st.bytes += r.len as u64;
        } else {
            entry.2 = true;
        }
    }
    flush(&mut open, states, &mut ack);
    out_of_range
}

#[cfg(test)]
mod tests;
