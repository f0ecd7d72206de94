//! Measurements behind `cargo xtask bench placement`. Prints one line per
//! row: `ROW<TAB>metric<TAB>value<TAB>peer<TAB>note` (as card-bench does).
//! Needs root, /dev/kvm, card-sim, vmm and the guest ELF (`cargo xtask
//! bench` builds them).
//!
//! One MC VM (64 MiB, the `log` task) moves 20 times each way between
//! card-sim (its VMM running real KVM guests) and the host site, through
//! the placement's own move sequence, with an empty VMM prepared on the
//! destination ahead of time as the running governor keeps one:
//! - crossing -> running: from the decision on inputs over a threshold to
//!   the agent answering on the host (decide + pause + snapshot + restore +
//!   resume + the first request's round trip; the release of the card's
//!   copy comes after it runs and is left out);
//! - pause: the VM's downtime (pause on the source to resume on the
//!   destination), for an idle agent and for one that re-dirtied 16 MiB
//!   (a second of 16 MiB/s) since the last move;
//! - the peer: a cold start of the same MC VM on the host (spawn the VMM,
//!   boot the agent, first answer), what a system without snapshots does.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use card_sim::{Request as CardRequest, SimOptions, SimProcess};
use governor::placement::card::CardSite;
use governor::placement::host::{HostSite, HostSiteOptions};
use governor::placement::mover::{move_task, Site, Sites};
use governor::placement::{decide, HostCost, Inputs, Policy, Side, Task};
use integration_tests::{bin_dir, guest_elf};
use vmm::host::api::AgentOp;

const MOVES: usize = 20;
const MEM_MIB: u32 = 64;
/// 16 MiB of 4 KiB pages.
const DIRTY_PAGES: u64 = 4096;

fn percentile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n => sorted[((n - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize],
    }
}

fn p50_p99(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (percentile(&v, 0.5), percentile(&v, 0.99))
}

fn row(metric: &str, value: String, peer: String, note: &str) {
    println!("ROW\t{metric}\t{value}\t{peer}\t{note}");
}

/// Dropped in this order: the sites (stopping their VMs, the card's over
/// the link) before the card itself.
struct Bench {
    sites: Sites<CardSite, HostSite>,
    sim: SimProcess,
}

impl Bench {
    fn card_agent(&mut self, op: AgentOp, arg: u64) -> Result<vmm::Reply> {
        let vm = self.sites.card.vm_id("log").context("log is not on the card")?;
        let r = self.sim.control(&CardRequest::Agent { vm, request: op, arg })?;
        r.agent.context("no agent reply")
    }

    fn host_agent(&mut self, op: AgentOp, arg: u64) -> Result<vmm::Reply> {
        let v = self.sites.host.vmm("log").context("log is not on the host")?;
        Ok(v.request(op, arg)?)
    }
}

fn policy() -> Policy {
    Policy {
        thresholds: [0.8, 0.7, 0.8, 0.6],
        hysteresis: 0.1,
        dwell_ms: 60_000,
        reserve: HostCost { cpus: 1.0, memory_bytes: 512 << 20 },
    }
}

/// One round: `MOVES` moves each way; returns (crossing -> running ms,
/// card -> host pause ms, host -> card pause ms).
fn round(b: &mut Bench, dirty: bool) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let (mut crossing, mut out, mut back) = (Vec::new(), Vec::new(), Vec::new());
    let policy = policy();
    let tasks = [Task {
        name: "log".into(),
        side: Side::Card,
        card_cost: [0.0, 0.3, 0.1, 0.0],
        host_cost: HostCost { cpus: 0.1, memory_bytes: (MEM_MIB as u64) << 20 },
        pin: None,
        order: 0,
        last_move_ms: None,
    }];
    for _ in 0..MOVES {
        if dirty {
            b.card_agent(AgentOp::Touch, DIRTY_PAGES)?;
        }
        b.sites.host.prepare("log").map_err(anyhow::Error::msg)?;
        let t0 = Instant::now();
        let d = decide(&Inputs {
            now_ms: 1_000_000,
            card: [0.1, 0.9, 0.3, 0.1],
            tasks: &tasks,
            host_used: HostCost::default(),
            calm_since_ms: None,
            policy: &policy,
        });
        if d.moves.len() != 1 {
            bail!("the decision did not move log: {}", d.explain);
        }
        let decided = t0.elapsed().as_secs_f64() * 1e3;
        let r = move_task(&mut b.sites, "log", Side::Card);
        if !r.ok {
            bail!("card -> host failed: {:?}", r.error);
        }
        let to_resume: f64 = r.steps.iter().filter(|s| !s.step.starts_with("release")).map(|s| s.ms).sum();
        let t1 = Instant::now();
        b.host_agent(AgentOp::Ping, 0)?;
        let first = t1.elapsed().as_secs_f64() * 1e3;
        crossing.push(decided + to_resume + first);
        out.push(r.pause_ms);
        if dirty {
            b.host_agent(AgentOp::Touch, DIRTY_PAGES)?;
        }
        let r = move_task(&mut b.sites, "log", Side::Host);
        if !r.ok {
            bail!("host -> card failed: {:?}", r.error);
        }
        back.push(r.pause_ms);
    }
    Ok((crossing, out, back))
}

fn cold_starts(b: &mut Bench) -> Result<Vec<f64>> {
    let mut v = Vec::new();
    for _ in 0..MOVES {
        let t0 = Instant::now();
        b.sites.host.cold_start("cold", MEM_MIB as u64)?;
        let p = b.sites.host.vmm("cold").context("cold VM")?;
        p.request(AgentOp::Ping, 0)?;
        v.push(t0.elapsed().as_secs_f64() * 1e3);
        b.sites.host.release("cold").map_err(anyhow::Error::msg)?;
    }
    Ok(v)
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    if !std::path::Path::new("/dev/kvm").exists() {
        bail!("/dev/kvm is missing: the MC VMs are KVM guests");
    }
    let sim = SimProcess::spawn(&SimOptions { guest: Some(guest_elf()), ..SimOptions::default() })?;
    let card =
        card_link::connect_vfio_user(sim.socket_path(), Duration::from_secs(5), card_link::CardOptions::default())?;
    let run = fixtures::TempDir::new("governor-bench-pl")?;
    let host = HostSite::new(
        HostSiteOptions {
            vmm_bin: bin_dir().join("vmm"),
            guest: guest_elf(),
            run_dir: run.path().join("host"),
            subtree: fixtures::unique_long("governor-bench-mc"),
            reserve: HostCost { cpus: 1.0, memory_bytes: 512 << 20 },
        },
        &cgroupfs::Layout::detect()?,
    )?;
    let mut b = Bench { sites: Sites { card: CardSite::new(card), host }, sim };
    b.sites.card.cold_start("log", MEM_MIB)?;

    let (crossing, out_idle, back_idle) = round(&mut b, false)?;
    let (_, out_dirty, back_dirty) = round(&mut b, true)?;
    let cold = cold_starts(&mut b)?;
    let (c50, c99) = p50_p99(cold);
    let fmt = |(a, z): (f64, f64)| format!("{a:.2} / {z:.2}");
    let cold_s = format!("cold start {c50:.1} / {c99:.1}");
    row(
        "placement: crossing -> running on host (ms p50/p99)",
        fmt(p50_p99(crossing)),
        cold_s.clone(),
        "goal <= 20 ms p99; idle 64 MiB agent, VMM prepared ahead",
    );
    row("placement: pause card->host, idle (ms p50/p99)", fmt(p50_p99(out_idle)), cold_s.clone(), "goal <= 10 ms p99");
    row("placement: pause host->card, idle (ms p50/p99)", fmt(p50_p99(back_idle)), cold_s.clone(), "goal <= 10 ms p99");
    row(
        "placement: pause card->host, 16 MiB dirtied (ms p50/p99)",
        fmt(p50_p99(out_dirty)),
        cold_s.clone(),
        "goal <= 10 ms p99; no pre-copy yet",
    );
    row(
        "placement: pause host->card, 16 MiB dirtied (ms p50/p99)",
        fmt(p50_p99(back_dirty)),
        cold_s,
        "goal <= 10 ms p99; no pre-copy yet",
    );
    Ok(())
}
