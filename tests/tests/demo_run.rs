//! `cargo xtask run --seconds 60`, as the test run can run it: the built
//! `governor-demo` with stdout not a terminal (so it prints text frames of
//! its view). Within the minute the ramped user load takes the card over
//! its threshold and back: at least one MC VM moves to the host and one
//! comes back to the card, and the view shows both. Afterwards nothing of
//! it is left: no cgroup, link, netns, pin, lock file, temporary file or
//! process (the demo's own included).

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
            .args(["--seconds", "60"])
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
    let status = child.wait_timeout(Duration::from_secs(120)).expect("the demo ends by itself after 60 s");
    let took = t0.elapsed();
    let out = reader.join().expect("reader").expect("the demo's output");
    for l in out.lines().filter(|l| l.starts_with("demo:")) {
        eprintln!("{l}");
    }
    assert!(status.success(), "governor-demo failed ({status}); its output:\n{out}");
    assert!(took >= Duration::from_secs(60), "ended early, after {took:?}");
    eprintln!("governor-demo --seconds 60 took {took:?}");

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

    let left = Inventory::take().left_since(&before);
    assert!(left.is_empty(), "the demo left: {left}");
    assert!(demo_processes().is_empty(), "governor-demo still runs: {:?}", demo_processes());
}
