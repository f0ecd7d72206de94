//! `cargo xtask run`, as the test run can run it: the built `governor-demo`
//! with stdout not a terminal (so it prints text frames of its view).
//! Within the first 40 s the ramped user load takes the card over its
//! threshold and back: at least one MC VM moves to the host and one comes
//! back to the card, and the view shows both. Then the card is killed (as
//! the `k` key does) and started again (`r`): the demo goes on, shows the
//! card dead and the MC VMs restored on the host, and the VMs back on the
//! new card. Afterwards nothing of it is left: no cgroup, link, netns, pin,
//! lock file, temporary file or process (the demo's own included).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::*;

/// "demo: moves to host N, to card M; ..." -> (N, M).
fn moves(out: &str) -> Option<(u32, u32)> {
    let rest = out.lines().find_map(|l| l.strip_prefix("demo: moves to host "))?;
    let (host, rest) = rest.split_once(", to card ")?;
    let card = rest.split(';').next()?;
    Some((host.trim().parse().ok()?, card.trim().parse().ok()?))
}

/// governor-demo processes that are not zombies.
fn demo_processes() -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let running = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()) != Some("Z");
        if stat.contains("(governor-demo)") && running {
            found.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    found
}

#[test]
fn the_demo_moves_mc_vms_both_ways_shows_it_and_leaves_nothing() {
    require_root();
    require_kvm();
    require_tool("iperf3");
    require_tool("stress-ng");
    let demo = bin_dir().join("governor-demo");
    assert!(demo.exists(), "{} is missing: build it first (cargo xtask test does)", demo.display());
    let before = Inventory::take();
    assert!(demo_processes().is_empty(), "another governor-demo runs: {:?}", demo_processes());
    let t0 = Instant::now();
    let mut child = Guarded::new(
        Command::new(&demo)
            .args(["--seconds", "80", "--kill-card-at", "42", "--restart-card-at", "52"])
            .env("VMM_GUEST_ELF", guest_elf())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start governor-demo"),
    );
    // Read its output on a thread: a full pipe must not stall it.
    let mut stdout = child.child().stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).map(|_| s)
    });
    let status = child.wait_timeout(Duration::from_secs(150)).expect("the demo ends by itself after 80 s");
    let took = t0.elapsed();
    let out = reader.join().expect("reader").expect("the demo's output");
    for l in out.lines().filter(|l| l.starts_with("demo:")) {
        eprintln!("{l}");
    }
    assert!(status.success(), "governor-demo failed ({status}); its output:\n{out}");
    assert!(took >= Duration::from_secs(80), "ended early, after {took:?}");
    eprintln!("governor-demo --seconds 80 took {took:?}");

    let (to_host, to_card) = moves(&out).unwrap_or_else(|| panic!("no summary line in:\n{out}"));
    assert!(to_host >= 1 && to_card >= 1, "moves to host {to_host}, to card {to_card}; output:\n{out}");
    // Shown: the view's decision panel has each move with its outcome and
    // pause, and its MC VM table a task's last move to the host.
    let shown = |to: &str| out.lines().position(|l| l.starts_with('│') && l.contains(&format!("-> {to}: ok, pause")));
    let host_shown = shown("host").unwrap_or_else(|| panic!("no move to the host shown:\n{out}"));
    let card_shown = shown("card").unwrap_or_else(|| panic!("no move to the card shown:\n{out}"));
    assert!(host_shown < card_shown, "out to the host first, then back");
    assert!(out.contains("to host ok, pause"), "the MC VM table shows the last move:\n{out}");
    assert!(out.contains("card use | threshold") && out.contains("user VMs"), "the view's panels:\n{out}");
    assert!(out.contains("  60 s") && out.contains('▁'), "each resource's last minute under its bar:\n{out}");

    // The card killed: the demo goes on and shows it, the MC VMs come up
    // on the host from their checkpoints, and go back to the new card.
    let at = |what: &str| out.find(what).unwrap_or_else(|| panic!("{what:?} not in the output:\n{out}"));
    let killed = at("demo: card killed at");
    let restarted = at("demo: card started again at");
    assert!(killed < restarted);
    let dead_shown = at("card DEAD: card-sim killed");
    assert!(killed < dead_shown && dead_shown < restarted, "the view shows the card dead while it is");
    assert!(out[killed..].contains("CardDead: the card is dead"), "the governor's decision is shown:\n{out}");
    assert!(
        out[killed..].contains("host") && out[killed..].contains("restored, checkpoint"),
        "how each MC VM came up:\n{out}"
    );
    let back = out[restarted..].find("CardBack: the card is healthy again");
    assert!(back.is_some(), "the card back after it was started again:\n{out}");
    assert!(
        out[restarted..].lines().any(|l| l.starts_with('│') && l.contains("-> card: ok, pause")),
        "MC VMs moved back to the new card:\n{out}"
    );

    let left = Inventory::take().left_since(&before);
    assert!(left.is_empty(), "the demo left: {left}");
    assert!(demo_processes().is_empty(), "governor-demo still runs: {:?}", demo_processes());
}
