//! Management done by the MC VMs wherever they run (claim 14): status
//! monitoring by the monitor VM and log sequencing by the log VM, on the
//! card (their agents reached through the card's `agent-bulk` op) and on
//! the host (their vmm processes), moved live between them; what the
//! agents decided (health states, log numbering) stays with them.

use std::time::Duration;

use governor::placement::mover::move_task_with;
use governor::placement::Side;
use integration_tests::placement::two_sites;
use integration_tests::*;
use vmm::proto::signals::{Health, HealthChange, Reason, VmSignals, FLAG_EXISTS, FLAG_MEM_LIMIT};

fn fleet() -> Vec<VmSignals> {
    (0..200)
        .map(|slot| VmSignals {
            slot,
            flags: FLAG_EXISTS | FLAG_MEM_LIMIT,
            cpu_ns_total: 1_000 + slot as u64,
            working_set: 16 << 20,
            mem_limit: 64 << 20,
            ..VmSignals::default()
        })
        .collect()
}

fn of(changes: &[HealthChange], slot: u32) -> Option<(Health, Reason)> {
    changes.iter().find(|c| c.slot == slot).map(|c| (c.health, c.reason))
}

#[test]
fn the_monitor_vm_keeps_its_health_states_across_moves_between_card_and_host() {
    require_root();
    require_kvm();
    let before = Inventory::take();
    {
        let mut two = two_sites("mon");
        let sites = &mut two.sites;
        sites.card.cold_start("monitor", 32).expect("monitor on the card");

        // On the card: every VM new; a stalled one, an OOM on tick 2.
        let mut batch = fleet();
        batch[3].quiet_ms = 30_000;
        let first = sites.card.monitor_tick("monitor", 1, 1000, &batch).expect("tick on the card");
        assert_eq!(first.len(), 200);
        assert_eq!(of(&first, 3), Some((Health::Stalled, Reason::NoProgress)));
        batch[8].oom_kills_total = 2;
        let second = sites.card.monitor_tick("monitor", 2, 1000, &batch).expect("tick 2 on the card");
        assert_eq!(
            second.iter().map(|c| (c.slot, c.health, c.reason)).collect::<Vec<_>>(),
            vec![(8, Health::Degraded, Reason::OomKilled)]
        );

        // Moved to the host (pre-copy): the same states, nothing new.
        let r = move_task_with(sites, "monitor", Side::Card, true);
        assert!(r.ok, "{r:?}");
        let third = sites.host.monitor_tick("monitor", 3, 1000, &batch).expect("tick on the host");
        assert!(third.is_empty(), "the states moved with the VM: {third:?}");
        batch[3].quiet_ms = 0;
        let fourth = sites.host.monitor_tick("monitor", 4, 1000, &batch).expect("tick 4 on the host");
        assert_eq!(of(&fourth, 3), Some((Health::Running, Reason::Healthy)));

        // And back to the card: still the same memory.
        let r = move_task_with(sites, "monitor", Side::Host, true);
        assert!(r.ok, "{r:?}");
        let fifth = sites.card.monitor_tick("monitor", 5, 1000, &batch).expect("tick on the card again");
        assert!(fifth.is_empty(), "{fifth:?}");
        // The card's relay checks the host's message too: an oversize batch
        // is refused before it reaches the agent.
        let too_many: Vec<VmSignals> = (0..1025).map(|slot| VmSignals { slot, ..batch[0] }).collect();
        assert!(sites.card.monitor_tick("monitor", 6, 1000, &too_many).is_err());
    }
    let left = Inventory::take().left_since(&before);
    assert!(left.is_empty(), "left: {left}");
}

/// The whole loop in `governor run`: three user VMs (cgroups with real
/// processes): one busy, one that stops making progress (SIGSTOP), one
/// that OOMs under its memory limit. The monitor MC VM (on the card) says
/// `running`, `stalled` (no progress) and `degraded` (OOM-killed); after
/// it moves to the host the states are the same; while it cannot answer,
/// the status says management is degraded and keeps the last states.
#[test]
fn governor_run_shows_the_health_the_monitor_vm_decides_across_a_move() {
    use governor::api::Request;
    use integration_tests::placement::{System, SystemOptions};
    require_root();
    require_kvm();
    let busy = TestCgroup::new("mon-busy");
    let stuck = TestCgroup::new("mon-stuck");
    let oom = fixtures::ScopedCgroup::create(
        "test-mon-oom",
        &cgroupfs::Limits { memory_bytes: Some(32 << 20), ..Default::default() },
    )
    .expect("oom cgroup");
    let _b = busy.spawn(&["sh", "-c", "while :; do :; done"]);
    let _s = stuck.spawn(&["sh", "-c", "kill -STOP $$"]);
    let rel = |c: &fixtures::ScopedCgroup| c.cg.rel().to_string_lossy().into_owned();
    let mut s = System::start(&SystemOptions {
        mcs: vec![("monitor", None)],
        dwell_s: 60,
        user_vms: vec![("busy".into(), rel(&busy)), ("stuck".into(), rel(&stuck)), ("oom".into(), rel(&oom))],
        command_timeout_ms: 500,
        ..SystemOptions::default()
    });
    let health = |s: &System| {
        let st = s.call(&Request::Status).status.expect("status");
        st.health.iter().map(|h| (h.vm.clone(), h.health.clone(), h.reason.clone())).collect::<Vec<_>>()
    };
    let verdict = |vm: &str, h: &str, r: &str| (vm.to_string(), h.to_string(), r.to_string());
    let wait_for = |s: &mut System, what: &str, want: &[(String, String, String)]| {
        let t0 = std::time::Instant::now();
        while !want.iter().all(|w| health(s).contains(w)) {
            assert!(t0.elapsed() < Duration::from_secs(25), "{what}: {:?}", health(s));
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("{what} after {:?}", t0.elapsed());
    };
    // No sign of life for the stall time (10 s).
    wait_for(
        &mut s,
        "busy running, stuck stalled",
        &[verdict("busy", "running", "healthy"), verdict("stuck", "stalled", "no-progress")],
    );
    // It loses a process to the OOM killer and carries on (still making progress).
    let _o = oom.spawn(&["sh", "-c", "head -c 200000000 /dev/zero | tail; while :; do sleep 0.1; done"]);
    let want = vec![
        verdict("busy", "running", "healthy"),
        verdict("oom", "degraded", "oom-killed"),
        verdict("stuck", "stalled", "no-progress"),
    ];
    wait_for(&mut s, "oom degraded", &want);

    // Fail static: the card (and the monitor VM on it) too slow to answer:
    // the status says management is degraded and keeps the last verdicts.
    s.sim
        .control(&card_sim::Request::Fault { fault: card_sim::Fault::Slow, on: true, slow_ms: Some(1000) })
        .expect("slow card");
    let degraded = |s: &System| s.call(&Request::Status).status.expect("status").management_degraded;
    let t0 = std::time::Instant::now();
    while degraded(&s).is_none() {
        assert!(t0.elapsed() < Duration::from_secs(10), "management never said it was degraded");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("management degraded: {:?}", degraded(&s));
    assert_eq!(health(&s), want, "the last verdicts stay");
    s.sim.control(&card_sim::Request::fault(card_sim::Fault::Slow, false)).expect("clear");
    let t0 = std::time::Instant::now();
    while degraded(&s).is_some() {
        assert!(t0.elapsed() < Duration::from_secs(15), "management did not come back: {:?}", degraded(&s));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(health(&s), want, "the agent continues from its state");
    assert!(s.call(&Request::Move { task: "monitor".into(), to: governor::placement::Side::Host }).ok);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(health(&s), want, "the same verdicts after the monitor VM moved");
    let st = s.call(&Request::Status).status.expect("status");
    assert!(st.management_degraded.is_none(), "{:?}", st.management_degraded);
    // Every change is in the audit log, with where the monitor VM ran.
    let events = governor::placement::audit::read_health(&s.run.path().join("decisions.jsonl")).expect("audit log");
    assert!(events.iter().any(|e| e.vm == "stuck" && e.health == "stalled" && e.monitor == Side::Card), "{events:?}");
    assert!(events.iter().any(|e| e.vm == "oom" && e.reason == "oom-killed"), "{events:?}");
}

fn log_line(slot: u32, host_seq: u64) -> vmm::proto::logs::LogRecord {
    use vmm::proto::logs::{LogRecord, TEXT_LEN};
    let s = format!("vm{slot} #{host_seq}");
    let mut text = [0u8; TEXT_LEN];
    text[..s.len()].copy_from_slice(s.as_bytes());
    LogRecord { slot, flags: 0, host_seq, len: s.len() as u16, text }
}

/// The log VM's numbering goes with it: lines taken on the card, the VM
/// moved to the host and back, more lines and a resend after each move.
#[test]
fn the_log_vm_keeps_each_vms_numbering_across_moves() {
    require_root();
    require_kvm();
    let before = Inventory::take();
    {
        let mut two = two_sites("log");
        let sites = &mut two.sites;
        sites.card.cold_start("log", 32).expect("log VM on the card");
        let batch = |from: u64, n: u64| -> Vec<_> {
            (0..3u32).flat_map(|slot| (from..from + n).map(move |h| log_line(slot, h))).collect()
        };
        let acks = sites.card.log_take("log", 1, 7, &batch(1, 300)).expect("on the card");
        assert_eq!(acks.len(), 3);
        assert!(acks.iter().all(|a| (a.first_host, a.last_host, a.first_log) == (1, 300, 1)), "{acks:?}");

        assert!(move_task_with(sites, "log", Side::Card, true).ok);
        let again = sites.host.log_take("log", 2, 7, &batch(1, 300)).expect("resend on the host");
        assert_eq!(again, acks, "the same lines again: nothing new");
        let more = sites.host.log_take("log", 3, 7, &batch(301, 200)).expect("more on the host");
        assert!(more.iter().all(|a| (a.first_host, a.last_host, a.first_log) == (301, 500, 301)), "{more:?}");

        assert!(move_task_with(sites, "log", Side::Host, true).ok);
        let back = sites.card.log_take("log", 4, 7, &batch(501, 10)).expect("back on the card");
        assert!(back.iter().all(|a| (a.first_host, a.last_host, a.first_log) == (501, 510, 501)), "{back:?}");
    }
    let left = Inventory::take().left_since(&before);
    assert!(left.is_empty(), "left: {left}");
}

/// `governor run` with the log VM: three user VMs write 102,000 lines to
/// their log files; the log MC VM (on the card, then moved to the host in
/// the middle) numbers them and the governor writes them to each VM's log
/// file, rotated on the way: every line arrives exactly once, in order,
/// numbered 1, 2, 3... per VM; `governor logs` reads them back.
#[test]
fn governor_run_writes_every_log_line_once_in_order_across_a_rotation_and_a_move() {
    use governor::api::Request;
    use integration_tests::placement::{System, SystemOptions};
    use std::io::Write;
    require_root();
    require_kvm();
    let vms = ["web", "db", "batch"];
    let cgs: Vec<TestCgroup> = vms.iter().map(|v| TestCgroup::new(&format!("log-{v}"))).collect();
    let s = System::start(&SystemOptions {
        mcs: vec![("log", None)],
        // The log lines are card network while the log VM is on the card:
        // no threshold here, so the one move is the test's own.
        thresholds: "fpga = 1.0, cpu = 1.0, memory = 1.0, network = 1.0".into(),
        dwell_s: 60,
        user_vms: vms
            .iter()
            .zip(&cgs)
            .map(|(v, c)| (v.to_string(), c.cg.rel().to_string_lossy().into_owned()))
            .collect(),
        vm_logs: true,
        // ~1.9 MB of log per VM: one rotation, nothing aged out.
        log_max_bytes: 5 << 18,
        ..SystemOptions::default()
    });
    const PER_VM: u64 = 34_000;
    let mut files: Vec<std::fs::File> = vms
        .iter()
        .map(|v| std::fs::OpenOptions::new().append(true).open(s.vm_log_in(v)).expect("VM log file"))
        .collect();
    let mut written = 0u64;
    while written < PER_VM {
        for (i, f) in files.iter_mut().enumerate() {
            let mut chunk = String::new();
            for n in written + 1..=written + 2000 {
                chunk.push_str(&format!("{} line {n} of a managed VM\n", vms[i]));
            }
            f.write_all(chunk.as_bytes()).expect("write lines");
        }
        written += 2000;
        if written == 18_000 {
            let r = s.call(&Request::Move { task: "log".into(), to: governor::placement::Side::Host });
            assert!(r.ok, "{r:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let all_written = |s: &System| {
        let st = s.call(&Request::Status).status.expect("status");
        st.logs.len() == 3 && st.logs.iter().all(|l| l.written_log_seq == PER_VM && l.pending == 0)
    };
    let t0 = std::time::Instant::now();
    while !all_written(&s) {
        let st = s.call(&Request::Status).status.expect("status");
        assert!(t0.elapsed() < Duration::from_secs(60), "logs: {:?} {:?}", st.logs, st.management_degraded);
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("102,000 lines through the log VM in {:?} after the last write", t0.elapsed());
    let dir = s.logs_dir();
    for v in vms {
        assert!(governor::placement::audit::rotated(&dir.join(format!("{v}.log"))).exists(), "{v}: rotated once");
        let lines = governor::manage::logs::read(&dir, v, 0).expect("read the VM's log");
        assert_eq!(lines.len() as u64, PER_VM, "{v}: every line, once");
        for (i, l) in lines.iter().enumerate() {
            let n = i as u64 + 1;
            assert_eq!(l.seq, n, "{v}: numbered in order");
            assert_eq!(l.text, format!("{v} line {n} of a managed VM"), "{v}: in order");
        }
    }
    let st = s.call(&Request::Status).status.expect("status");
    assert!(st.logs.iter().all(|l| l.dropped == 0), "{:?}", st.logs);
    let out = std::process::Command::new(bin_dir().join("governor"))
        .args(["logs", "db", "--since", "33999", "--dir"])
        .arg(&dir)
        .output()
        .expect("governor logs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text, "33999\tdb line 33999 of a managed VM\n34000\tdb line 34000 of a managed VM\n");
}
