//! The placement engine when things fail: a move whose destination fails
//! (the host's VMM killed, the card too slow to take a restore) leaves the
//! VM running on its source; a card that crashes or stalls gets its MC VMs
//! brought up on the host from their checkpoints within three heartbeats
//! plus a restore; a stalled card that recovers has its stale copies
//! stopped and gets VMs back by the normal rules.

use std::time::{Duration, Instant};

use governor::api::Request;
use governor::placement::{Reason, Side};
use integration_tests::placement::{System, SystemOptions};
use integration_tests::*;
use vmm::host::api::AgentOp;

/// Card -> host: the host VMM is killed during the restore (the MC
/// reserve's memory limit is smaller than the VM's working set, so the
/// kernel's OOM killer takes it while it fills guest memory): the VM
/// resumes on the card with its memory intact. Host -> card: the card
/// does not take the restore in time: the VM resumes on the host.
#[test]
fn a_move_whose_destination_fails_keeps_the_vm_on_its_source() {
    require_root();
    require_kvm();
    let before = Inventory::take();
    for precopy in [false, true] {
        let mut s = System::start(&SystemOptions {
            mcs: vec![("log", None)],
            mc_mib: 64,
            reserve_mib: 16,
            precopy,
            ..SystemOptions::default()
        });
        // 24 MiB of written guest memory: more than the reserve holds.
        let pages = 6144;
        s.agent("log", AgentOp::Touch, pages);
        let sum = s.agent("log", AgentOp::Checksum, pages).value;
        let c0 = s.agent("log", AgentOp::Step, 10);
        let r = s.call(&Request::Move { task: "log".into(), to: Side::Host });
        assert!(!r.ok, "{r:?}");
        let rep = &r.decisions.expect("record")[0].reports[0];
        eprintln!("pre-copy {precopy}: host destination killed: {:?}, steps {:?}", rep.error, rep.steps);
        let steps: Vec<&str> = rep.steps.iter().map(|s| s.step.as_str()).collect();
        if precopy {
            // Killed while the base is staged: the VM never stopped running.
            assert!(rep.error.as_deref().is_some_and(|e| e.contains("stage base")), "{rep:?}");
            assert!(!steps.contains(&"pause (card)"), "{steps:?}");
        } else {
            // Killed in the restore while the VM was paused: resumed on the card.
            assert!(rep.error.as_deref().is_some_and(|e| e.contains("restore")), "{rep:?}");
            assert!(steps.contains(&"resume (card)"), "resumed on its source: {steps:?}");
        }
        assert!(!rep.ok);
        assert_eq!(s.side("log"), Side::Card, "it stays on its source");
        assert_eq!(s.agent("log", AgentOp::Checksum, pages).value, sum, "its memory intact");
        let c1 = s.agent("log", AgentOp::Step, 10);
        assert_eq!(c1.log_seq, c0.log_seq + 1, "running on the card, state intact");
    }
    {
        let mut s = System::start(&SystemOptions {
            mcs: vec![("log", None)],
            command_timeout_ms: 500,
            ..SystemOptions::default()
        });
        assert!(s.call(&Request::Move { task: "log".into(), to: Side::Host }).ok);
        let c1 = s.agent("log", AgentOp::Step, 10);
        s.sim
            .control(&card_sim::Request::Fault { fault: card_sim::Fault::Slow, on: true, slow_ms: Some(2000) })
            .expect("slow");
        let r = s.call(&Request::Move { task: "log".into(), to: Side::Card });
        s.sim.control(&card_sim::Request::fault(card_sim::Fault::Slow, false)).expect("clear");
        assert!(!r.ok, "{r:?}");
        let rep = &r.decisions.expect("record")[0].reports[0];
        eprintln!("card destination slow: {:?}", rep.error);
        assert_eq!(s.side("log"), Side::Host, "it stays on its source");
        assert_eq!(s.agent("log", AgentOp::Step, 10).log_seq, c1.log_seq + 1, "running on the host, state intact");
        // Exactly one copy runs: the card holds none of it.
        assert!(s.task("log").card_vm.is_none());
    }
    let left = Inventory::take().left_since(&before);
    assert!(left.is_empty(), "left: {left}");
}

/// Set distinct counters, wait for a checkpoint to hold them, kill the
/// card: every MC VM runs on the host within three heartbeats plus the
/// restores, from its checkpoint, with those counters.
#[test]
fn a_crashed_card_has_every_mc_vm_up_on_the_host_from_its_checkpoint() {
    require_root();
    require_kvm();
    let before = Inventory::take();
    {
        let mut s = System::start(&SystemOptions { checkpoint_s: 1, ..SystemOptions::default() });
        let tasks = ["monitor", "log", "qos"];
        let mut want = Vec::new();
        for (i, t) in tasks.iter().enumerate() {
            for _ in 0..=i {
                s.agent(t, AgentOp::Step, 7);
            }
            want.push(s.agent(t, AgentOp::Counters, 0));
        }
        // Two checkpoint periods: the latest checkpoint holds those counters.
        std::thread::sleep(Duration::from_millis(2300));
        let p = s.placement();
        assert!(p.tasks.iter().all(|t| t.checkpoint_age_ms.is_some_and(|a| a < 1500)), "checkpoints: {p:?}");
        let tick0 = s.decisions(0).last().map_or(0, |d| d.tick);
        let t0 = Instant::now();
        // The card kills itself (and what runs on it); the reply never comes.
        let _ = s.sim.control(&card_sim::Request::fault(card_sim::Fault::Crash, true));
        let took = s.wait("every MC VM on the host", Duration::from_secs(5), |s| {
            s.placement().tasks.iter().all(|t| t.side == Side::Host)
        });
        eprintln!("card crash -> all MC VMs on the host: {:?} (3 heartbeats = 300 ms)", t0.elapsed());
        assert!(took < Duration::from_millis(1000), "took {took:?}");
        let dead = s.decisions(tick0).into_iter().find(|d| d.reason == Reason::CardDead).expect("card-dead record");
        eprintln!("{}", dead.explain);
        for t in tasks {
            assert!(
                dead.explain.contains(&format!("{t}: restored on the host from its checkpoint")),
                "{}",
                dead.explain
            );
        }
        for (t, w) in tasks.iter().zip(&want) {
            let c = s.agent(t, AgentOp::Counters, 0);
            assert_eq!((c.work, c.log_seq), (w.work, w.log_seq), "{t} from its checkpoint");
        }
        assert!(!s.placement().card.healthy);
    }
    let left = Inventory::take().left_since(&before);
    assert!(left.is_empty(), "left: {left}");
}

/// A card that stalls is declared dead; its MC VMs come up on the host.
/// When it answers again its stale copies are stopped, and after the dwell
/// the VMs come back to it one at a time.
#[test]
fn a_stalled_card_that_recovers_gets_its_vms_back() {
    require_root();
    require_kvm();
    let mut s = System::start(&SystemOptions {
        checkpoint_s: 1,
        dwell_s: 2,
        mcs: vec![("log", None), ("qos", None)],
        ..SystemOptions::default()
    });
    std::thread::sleep(Duration::from_millis(1300));
    let tick0 = s.decisions(0).last().map_or(0, |d| d.tick);
    s.sim.control(&card_sim::Request::fault(card_sim::Fault::Stall, true)).expect("stall");
    let took = s
        .wait("both on the host", Duration::from_secs(5), |s| s.placement().tasks.iter().all(|t| t.side == Side::Host));
    eprintln!("card stall -> both MC VMs on the host: {took:?} (3 heartbeats = 300 ms)");
    // Three heartbeats, a poll, the restores, and the test's own polling.
    assert!(took < Duration::from_millis(1000), "took {took:?}");
    s.sim.control(&card_sim::Request::fault(card_sim::Fault::Stall, false)).expect("unstall");
    s.wait("both back on the card", Duration::from_secs(20), |s| {
        s.placement().tasks.iter().all(|t| t.side == Side::Card)
    });
    let ds = s.decisions(tick0);
    for d in &ds {
        if d.reason != Reason::Holds && d.reason != Reason::Settling {
            eprintln!("tick {} {:?}: {}", d.tick, d.reason, d.explain);
        }
    }
    let back = ds.iter().find(|d| d.reason == Reason::CardBack).expect("card-back record");
    assert!(back.explain.contains("stopped stale copies"), "{}", back.explain);
    let returns: Vec<_> = ds.iter().filter(|d| d.reason == Reason::ComeBack).collect();
    assert_eq!(returns.len(), 2, "one at a time");
    assert!(returns.iter().all(|d| d.moves.len() == 1));
    // One copy each on the card: two VMs there.
    assert_eq!(s.agent("log", AgentOp::Ping, 0).value, vmm::proto::PONG);
    assert_eq!(s.agent("qos", AgentOp::Ping, 0).value, vmm::proto::PONG);
}

/// A card that dies before any checkpoint was taken: its MC VMs start cold
/// on the host, and the record says so.
#[test]
fn a_card_dead_before_any_checkpoint_has_its_vms_started_cold() {
    require_root();
    require_kvm();
    let mut s =
        System::start(&SystemOptions { checkpoint_s: 3600, mcs: vec![("log", None)], ..SystemOptions::default() });
    assert!(s.task("log").checkpoint_age_ms.is_none(), "no checkpoint yet");
    let tick0 = s.decisions(0).last().map_or(0, |d| d.tick);
    let _ = s.sim.control(&card_sim::Request::fault(card_sim::Fault::Crash, true));
    s.wait("log on the host", Duration::from_secs(5), |s| s.side("log") == Side::Host);
    let dead = s.decisions(tick0).into_iter().find(|d| d.reason == Reason::CardDead).expect("card-dead record");
    assert!(dead.explain.contains("log: started cold on the host"), "{}", dead.explain);
    let c = s.agent("log", AgentOp::Counters, 0);
    assert_eq!((c.work, c.log_seq), (0, 0), "a cold start begins from nothing");
}

/// A loopback port nothing listens on now (for the governor's metrics).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// The value of a counter line of the exposition, 0 when absent.
fn counter(metrics: &str, line_start: &str) -> f64 {
    metrics.lines().find(|l| l.starts_with(line_start)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0)
}

/// The card link falls silent while the card itself runs on (the thread
/// serving its link stuck, its heartbeat and mailbox going on: how the demo
/// lost its card). A silence shorter than the probe bound goes unnoticed;
/// one a little longer is bridged by a new connection, with no card death.
/// A silence that lasts is a dead card: every MC VM is up on the host
/// within a second, and for the 60 s it stays silent the governor's
/// reconnect attempts hold no extra thread or socket (its threads and fds
/// stay within 2 of where they were) while the API answers at once. When
/// the link answers again, the card is back and the VMs return to it.
#[test]
fn a_silent_card_link_is_a_dead_card_within_a_second_and_comes_back_when_it_answers() {
    require_root();
    require_kvm();
    let port = free_port();
    let mut s = System::start(&SystemOptions {
        checkpoint_s: 1,
        dwell_s: 2,
        metrics_port: Some(port),
        ..SystemOptions::default()
    });
    std::thread::sleep(Duration::from_millis(1300));
    let silent = |s: &System, on: bool| {
        s.sim.control(&card_sim::Request::fault(card_sim::Fault::Silent, on)).expect("silent fault");
    };
    let card_deaths =
        |s: &System, after: u64| s.decisions(after).iter().filter(|d| d.reason == Reason::CardDead).count();
    let tick0 = s.decisions(0).last().map_or(0, |d| d.tick);

    // 100 ms: within the probe bound (300 ms), nothing happens.
    silent(&s, true);
    std::thread::sleep(Duration::from_millis(100));
    silent(&s, false);
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(card_deaths(&s, tick0), 0, "a 100 ms silence is not a dead card");
    assert!(s.placement().tasks.iter().all(|t| t.side == Side::Card));

    // 450 ms: the probe gives up, a new connection bridges it.
    let reconnects = counter(&s.metrics(port), "governor_card_link_events_total{event=\"reconnected\"}");
    silent(&s, true);
    std::thread::sleep(Duration::from_millis(450));
    silent(&s, false);
    std::thread::sleep(Duration::from_millis(1000));
    let now = counter(&s.metrics(port), "governor_card_link_events_total{event=\"reconnected\"}");
    eprintln!("450 ms of silence: reconnects {reconnects} -> {now}, card deaths {}", card_deaths(&s, tick0));
    assert_eq!(card_deaths(&s, tick0), 0, "a 450 ms silence is bridged by a new connection");
    assert_eq!(now, reconnects + 1.0, "one new connection");
    assert!(s.placement().tasks.iter().all(|t| t.side == Side::Card));

    // For good: a dead card.
    let before = s.governor_threads_and_fds();
    let tick1 = s.decisions(0).last().map_or(0, |d| d.tick);
    let t0 = Instant::now();
    silent(&s, true);
    let took = s.wait("every MC VM on the host", Duration::from_secs(5), |s| {
        s.placement().tasks.iter().all(|t| t.side == Side::Host)
    });
    eprintln!("silent card link -> every MC VM on the host: {:?}", t0.elapsed());
    assert!(took < Duration::from_millis(1000), "took {took:?}");
    let dead = s.decisions(tick1).into_iter().find(|d| d.reason == Reason::CardDead).expect("card-dead record");
    eprintln!("{}", dead.explain);
    assert!(dead.explain.contains("did not answer within 300 ms"), "{}", dead.explain);
    // The host's VMMs are up; from here the governor only tries the card.
    std::thread::sleep(Duration::from_secs(2));
    let (threads, fds) = s.governor_threads_and_fds();
    eprintln!("governor before the silence: {before:?} threads/fds; with its VMs on the host: ({threads}, {fds})");
    let until = Instant::now() + Duration::from_secs(60);
    let mut worst_api = Duration::ZERO;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_secs(3));
        let t = Instant::now();
        let p = s.placement();
        worst_api = worst_api.max(t.elapsed());
        assert!(!p.card.healthy);
        let (th, fd) = s.governor_threads_and_fds();
        assert!(
            th.abs_diff(threads) <= 2 && fd.abs_diff(fds) <= 2,
            "governor grew: ({threads}, {fds}) -> ({th}, {fd})"
        );
    }
    eprintln!(
        "60 s silent: governor threads/fds stayed within 2 of ({threads}, {fds}); slowest API answer {worst_api:?}"
    );
    assert!(worst_api < Duration::from_secs(1), "the API answered in {worst_api:?}");

    // It answers again: the card is back, and the VMs return.
    silent(&s, false);
    let back = s.wait("the card back", Duration::from_secs(5), |s| s.placement().card.healthy);
    eprintln!("card back {back:?} after its link answered again");
    s.wait("every MC VM back on the card", Duration::from_secs(30), |s| {
        s.placement().tasks.iter().all(|t| t.side == Side::Card)
    });
}
