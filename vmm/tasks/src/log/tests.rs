use mc_proto::logs::{LogAck, LogRecord, TEXT_LEN};
use proptest::prelude::*;

use super::*;

fn rec(slot: u32, host_seq: u64) -> LogRecord {
    let mut text = [0u8; TEXT_LEN];
    text[0] = b'x';
    LogRecord { slot, flags: 0, host_seq, len: 1, text }
}

fn run(states: &mut [VmLog], epoch: u32, recs: &[LogRecord]) -> Vec<LogAck> {
    let mut acks = Vec::new();
    take(states, epoch, recs.iter().copied(), |a| acks.push(a));
    acks
}

#[test]
fn lines_are_taken_once_in_order_and_acknowledged_again() {
    let mut st = [VmLog::NEW; 2];
    let a = run(&mut st, 1, &[rec(0, 1), rec(0, 2), rec(1, 1)]);
    assert_eq!(
        a,
        vec![
            LogAck { slot: 0, first_host: 1, last_host: 2, first_log: 1 },
            LogAck { slot: 1, first_host: 1, last_host: 1, first_log: 1 },
        ]
    );
    // The ack was lost: the host sends 1..=3 again; 1 and 2 are held, 3 is new.
    let a = run(&mut st, 1, &[rec(0, 1), rec(0, 2), rec(0, 3)]);
    assert_eq!(a, vec![LogAck { slot: 0, first_host: 1, last_host: 3, first_log: 1 }]);
    assert_eq!(st[0].lines, 3, "each line counted once");
    // A gap inside a batch: 6 without 5 is not taken.
    let a = run(&mut st, 1, &[rec(0, 4), rec(0, 6)]);
    assert_eq!(a, vec![LogAck { slot: 0, first_host: 4, last_host: 4, first_log: 4 }]);
    assert_eq!(st[0].next_host, 5);
    // A batch that starts past what the agent holds: the host wrote the
    // rest (the agent came back from an older checkpoint): catch up.
    let a = run(&mut st, 1, &[rec(0, 9)]);
    assert_eq!(a, vec![LogAck { slot: 0, first_host: 9, last_host: 9, first_log: 9 }]);
}

#[test]
fn a_batch_must_keep_each_vms_records_together() {
    assert!(grouped([0, 0, 1, 1, 2].into_iter()));
    assert!(!grouped([0, 1, 0].into_iter()));
    assert!(grouped([].into_iter()));
}

#[test]
fn a_restarted_host_numbers_from_one_and_the_log_goes_on() {
    let mut st = [VmLog::NEW; 1];
    run(&mut st, 1, &[rec(0, 1), rec(0, 2)]);
    let a = run(&mut st, 2, &[rec(0, 1)]);
    assert_eq!(a, vec![LogAck { slot: 0, first_host: 1, last_host: 1, first_log: 3 }]);
}

/// The host side of the loop, as simple as can be: lines numbered per VM,
/// kept until acknowledged, written once when they are.
#[derive(Default, Clone)]
struct Host {
    next: Vec<u64>,
    pending: Vec<Vec<u64>>,
    written: Vec<Vec<(u64, u64)>>,
}

impl Host {
    fn new(vms: usize) -> Host {
        Host { next: vec![1; vms], pending: vec![Vec::new(); vms], written: vec![Vec::new(); vms] }
    }
    fn capture(&mut self, vm: usize) {
        self.pending[vm].push(self.next[vm]);
        self.next[vm] += 1;
    }
    fn batch(&self) -> Vec<LogRecord> {
        let mut v = Vec::new();
        for (vm, p) in self.pending.iter().enumerate() {
            v.extend(p.iter().map(|h| rec(vm as u32, *h)));
        }
        v
    }
    fn acked(&mut self, a: &LogAck) {
        let vm = a.slot as usize;
        let done = self.written[vm].last().map_or(0, |w| w.0);
        for h in a.first_host.max(done + 1)..=a.last_host {
            assert_eq!(self.pending[vm].first(), Some(&h), "acks come in host order");
            self.pending[vm].remove(0);
            self.written[vm].push((h, a.first_log + (h - a.first_host)));
        }
    }
}

#[derive(Clone, Debug)]
enum Step {
    Capture(usize),
    /// An exchange: the request may be lost (the agent never saw it), or
    /// the answer may be lost (the agent took the lines, the host never
    /// heard); or it goes through.
    Exchange {
        lost_request: bool,
        lost_answer: bool,
    },
    /// A checkpoint of the log VM (its state saved).
    Checkpoint,
    /// Its card died: it comes back from the last checkpoint (older state).
    Restore,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0usize..3).prop_map(Step::Capture),
        3 => (any::<bool>(), any::<bool>()).prop_map(|(a, b)| Step::Exchange { lost_request: a, lost_answer: b }),
        1 => Just(Step::Checkpoint),
        1 => Just(Step::Restore),
    ]
}

proptest! {
    /// Whatever is lost on the way, and even when the log VM comes back
    /// from an older checkpoint, once the last exchange goes through every
    /// captured line is written exactly once, in order, with log numbers
    /// 1, 2, 3... per VM. (A move keeps the state exactly: the easy case.)
    #[test]
    fn every_line_is_written_exactly_once_in_order(steps in proptest::collection::vec(step(), 1..80)) {
        let mut host = Host::new(3);
        let mut agent = [VmLog::NEW; 3];
        let mut checkpoint = agent;
        for s in &steps {
            match s {
                Step::Capture(vm) => host.capture(*vm),
                Step::Exchange { lost_request, lost_answer } => {
                    if *lost_request {
                        continue;
                    }
                    let acks = run(&mut agent, 1, &host.batch());
                    if !*lost_answer {
                        for a in &acks {
                            host.acked(a);
                        }
                    }
                }
                Step::Checkpoint => checkpoint = agent,
                Step::Restore => agent = checkpoint,
            }
        }
        for a in run(&mut agent, 1, &host.batch()) {
            host.acked(&a);
        }
        for (vm, a) in agent.iter().enumerate() {
            prop_assert!(host.pending[vm].is_empty());
            let want: Vec<(u64, u64)> = (1..host.next[vm]).map(|h| (h, h)).collect();
            prop_assert_eq!(&host.written[vm], &want);
            prop_assert!(a.lines < host.next[vm]);
        }
    }
}
