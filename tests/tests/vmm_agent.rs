//! Protocol 2 with a real KVM management agent: the monitor task runs in
//! the guest over a bulk Telemetry message of 1,000 user VMs a tick and
//! answers the health changes; its state lives in guest memory, so a
//! snapshot carries it; a message the agent finds malformed is refused
//! naming the field (the VM keeps running); a malformed answer stops only
//! that VM.

mod vmm_support;

use std::time::{Duration, Instant};

use vmm::proto::signals::{Health, Reason, VmSignals, FLAG_EXISTS, FLAG_MEM_LIMIT};
use vmm::vm::bulk::telemetry_message;
use vmm::{Error, RunState, Sinks, Vm, VmConfig};
use vmm_support::*;

const T: Duration = Duration::from_secs(10);

fn fleet(n: u32) -> Vec<VmSignals> {
    (0..n)
        .map(|slot| VmSignals {
            slot,
            flags: FLAG_EXISTS | FLAG_MEM_LIMIT,
            cpu_ns_total: 1_000_000 + slot as u64,
            quiet_ms: 0,
            cpu_ppm: 50_000,
            runq_p99_us: 300,
            oom_kills_total: 0,
            working_set: 64 << 20,
            mem_limit: 256 << 20,
            drops_total: 0,
        })
        .collect()
}

#[test]
fn the_monitor_agent_decides_health_for_1000_vms_a_tick_and_a_snapshot_keeps_its_state() {
    require_kvm();
    let vm = Vm::create(&VmConfig::new(guest_elf(), 32), Sinks::default()).expect("create");
    vm.start(false).expect("start");
    vm.wait_ready(T).expect("banner");
    let mut batch = fleet(1000);
    batch[5].quiet_ms = 20_000; // no sign of life: stalled
    batch[7].flags = 0; // its cgroup is gone: stopped
    let t = Instant::now();
    let first = vm.monitor_tick(1, 1000, &batch, T).expect("tick 1");
    eprintln!("tick of 1,000 VMs: {:?} ({} changes)", t.elapsed(), first.len());
    assert_eq!(first.len(), 1000, "every VM is new");
    let of = |changes: &[vmm::proto::signals::HealthChange], slot: u32| {
        changes.iter().find(|c| c.slot == slot).map(|c| (c.health, c.reason))
    };
    assert_eq!(of(&first, 0), Some((Health::Running, Reason::Healthy)));
    assert_eq!(of(&first, 5), Some((Health::Stalled, Reason::NoProgress)));
    assert_eq!(of(&first, 7), Some((Health::Stopped, Reason::Gone)));

    // Tick 2: one VM OOMs; only its change comes back.
    batch[9].oom_kills_total = 1;
    let second = vm.monitor_tick(2, 1000, &batch, T).expect("tick 2");
    assert_eq!(second.len(), 1, "{second:?}");
    assert_eq!(of(&second, 9), Some((Health::Degraded, Reason::OomKilled)));

    // Its memory of 1,000 VMs moves with a snapshot: the restored agent
    // reports nothing new for the same signals.
    let mut times = Vec::new();
    for seq in 3..23 {
        let t = Instant::now();
        vm.monitor_tick(seq, 1000, &batch, T).expect("tick");
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    eprintln!("1,000-VM tick round trip: p50 {:.2} ms, max {:.2} ms", times[10], times[19]);
    vm.pause().expect("pause");
    let mut image = Vec::new();
    vm.snapshot_to(&mut image).expect("snapshot");
    vm.shutdown();
    let vm2 = Vm::restore_from(image.as_slice(), Sinks::default()).expect("restore");
    vm2.resume().expect("resume");
    let third = vm2.monitor_tick(23, 1000, &batch, T).expect("tick after restore");
    assert!(third.is_empty(), "state carried: {third:?}");
    batch[5].quiet_ms = 0;
    let fourth = vm2.monitor_tick(24, 1000, &batch, T).expect("tick");
    assert_eq!(fourth.len(), 1);
    assert_eq!(of(&fourth, 5), Some((Health::Running, Reason::Healthy)));

    // A malformed message is refused naming the field; the VM runs on.
    let mut bad = telemetry_message(25, 1000, &batch).expect("message");
    bad[40] ^= 1; // a payload byte: the CRC no longer matches
    match vm2.monitor_tick_message(&bad, 25, &batch, T) {
        Err(Error::Refused { field }) => assert_eq!(field, "crc"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let mut lying = telemetry_message(26, 1000, &batch).expect("message");
    lying[16..20].copy_from_slice(&999u32.to_le_bytes()); // a count the length does not carry
    assert!(matches!(vm2.monitor_tick_message(&lying, 26, &batch, T), Err(Error::Refused { field: "payload length" })));
    assert!(vm2.monitor_tick(27, 1000, &batch, T).is_ok(), "still serving");

    // A malformed answer stops the VM (and only it).
    match vm2.monitor_tick_hostile_self_test(28, &batch, T) {
        Err(Error::Hostile { field }) => eprintln!("hostile answer refused: {field}"),
        other => panic!("expected a hostile answer, got {other:?}"),
    }
    let deadline = Instant::now() + T;
    while !matches!(vm2.state(), RunState::Stopped(_)) {
        assert!(Instant::now() < deadline, "the VM did not stop: {:?}", vm2.state());
        std::thread::sleep(Duration::from_millis(10));
    }
    vm2.shutdown();
}

/// The same over the `vmm` process's control socket: `monitor_tick` with
/// the signals as JSON; a malformed record is refused naming the field.
#[test]
fn monitor_ticks_over_the_control_socket() {
    require_kvm();
    let elf = guest_elf();
    let mut p = VmmProc::spawn(&["--guest", elf.to_str().expect("utf-8"), "--mem-mib", "32"]);
    let signals: Vec<vmm::host::api::Signals> = (0..3)
        .map(|slot| vmm::host::api::Signals { slot, exists: slot != 2, cpu_ns_total: 5, ..Default::default() })
        .collect();
    let r = p.client.monitor_tick(1, 1000, &signals).expect("monitor tick");
    let health: Vec<(u32, &str, &str)> =
        r.changes.iter().map(|c| (c.slot, c.health.as_str(), c.reason.as_str())).collect();
    assert_eq!(health, vec![(0, "running", "healthy"), (1, "running", "healthy"), (2, "stopped", "gone")]);
    let again = p.client.monitor_tick(2, 1000, &signals).expect("tick 2");
    assert!(again.changes.is_empty());
    let bad = p.client.call_json(&serde_json::json!({
        "cmd": "monitor_tick", "seq": 3, "tick_ms": 1000,
        "signals": [{"slot": 0, "exists": true, "cpu_ns_total": 1, "quiet_ms": 0, "cpu": 5}]
    }));
    let e = bad.expect_err("unknown field refused").to_string();
    assert!(e.contains("signals") && e.contains("cpu"), "{e}");
}

fn line(slot: u32, host_seq: u64) -> vmm::proto::logs::LogRecord {
    use vmm::proto::logs::{LogRecord, TEXT_LEN};
    let text_s = format!("vm {slot} line {host_seq}");
    let mut text = [0u8; TEXT_LEN];
    text[..text_s.len()].copy_from_slice(text_s.as_bytes());
    LogRecord { slot, flags: 0, host_seq, len: text_s.len() as u16, text }
}

/// The log agent in a real KVM guest: 100,000 lines of 4 VMs in
/// 1,000-record messages get log numbers 1, 2, 3... per VM; a message sent
/// again (its acknowledgement lost) changes nothing; a snapshot carries the
/// agent's numbering; a restarted host (new epoch) continues the log.
#[test]
fn the_log_agent_numbers_100000_lines_once_across_resends_and_a_snapshot() {
    use vmm::proto::logs::LogAck;
    require_kvm();
    let vm = Vm::create(&VmConfig::new(guest_elf(), 32), Sinks::default()).expect("create");
    vm.start(false).expect("start");
    vm.wait_ready(T).expect("banner");
    let mut next = [1u64; 4];
    let t = Instant::now();
    let mut seq = 0;
    for _ in 0..100 {
        seq += 1;
        // Each VM's lines together, in host order.
        let batch: Vec<_> = (0..1000u32)
            .map(|i| {
                let slot = i / 250;
                let r = line(slot, next[slot as usize]);
                next[slot as usize] += 1;
                r
            })
            .collect();
        let acks = vm.log_take(seq, 1, &batch, T).expect("log take");
        assert_eq!(acks.len(), 4);
        for a in &acks {
            assert_eq!(a.last_host, next[a.slot as usize] - 1, "{a:?}");
            assert_eq!(a.first_log, a.first_host, "one numbering within the epoch");
        }
        if seq == 50 {
            // The acknowledgement was lost: the same lines again.
            let again = vm.log_take(seq + 1000, 1, &batch, T).expect("again");
            assert_eq!(
                again.iter().map(|a| (a.slot, a.first_host, a.last_host, a.first_log)).collect::<Vec<_>>(),
                acks.iter().map(|a| (a.slot, a.first_host, a.last_host, a.first_log)).collect::<Vec<_>>()
            );
        }
    }
    eprintln!("100,000 log lines in 1,000-line messages: {:?}", t.elapsed());
    assert_eq!(next, [25_001; 4]);
    vm.pause().expect("pause");
    let mut image = Vec::new();
    vm.snapshot_to(&mut image).expect("snapshot");
    vm.shutdown();
    let vm2 = Vm::restore_from(image.as_slice(), Sinks::default()).expect("restore");
    vm2.resume().expect("resume");
    let acks = vm2.log_take(500, 1, &[line(2, 25_001)], T).expect("after restore");
    assert_eq!(acks, vec![LogAck { slot: 2, first_host: 25_001, last_host: 25_001, first_log: 25_001 }]);
    // A restarted governor numbers from 1 again; the log goes on.
    let acks = vm2.log_take(1, 2, &[line(2, 1)], T).expect("new epoch");
    assert_eq!(acks, vec![LogAck { slot: 2, first_host: 1, last_host: 1, first_log: 25_002 }]);
    // Mixed VMs in one message are refused, naming the order.
    match vm2.log_take(3, 2, &[line(0, 1), line(1, 1), line(0, 2)], T) {
        Err(Error::Refused { field }) => assert!(field.starts_with("order"), "{field}"),
        other => panic!("{other:?}"),
    }
    // A log message sent as a monitor tick is refused by its kind (the
    // records' own checks are mc-proto's unit tests).
    let mut bad = vmm::vm::bulk::log_message(2, 2, &[line(0, 1)]).expect("message");
    bad[32 + 6] = 0xff;
    bad[32 + 7] = 0xff;
    let crc = vmm::proto::msg::crc32(&bad[32..]);
    bad[24..28].copy_from_slice(&crc.to_le_bytes());
    match vm2.monitor_tick_message(&bad, 2, &[], T) {
        Err(Error::Refused { field }) => assert_eq!(field, "kind", "sent as a monitor tick"),
        other => panic!("{other:?}"),
    }
    vm2.shutdown();
}
