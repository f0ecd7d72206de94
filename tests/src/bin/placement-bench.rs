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
//!   destination), for an idle agent and for one dirtying 16 MiB/s (a
//!   thread asks the agent every 10 ms to write 41 more pages of a 16 MiB
//!   area, wherever it runs), without and with pre-copy (the card copies
//!   the VM's memory while it runs and the host stages it; the pause
//!   covers only what was written since; host -> card the same way round:
//!   the host copies, the card stages the base paused and applies the diff);
//! - the peer: a cold start of the same MC VM on the host (spawn the VMM,
//!   boot the agent, first answer), what a system without snapshots does.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use card_sim::{Request as CardRequest, SimOptions, SimProcess};
use governor::placement::card::CardSite;
use governor::placement::host::{HostSite, HostSiteOptions};
use governor::placement::mover::{move_task_with, Site, Sites};
use governor::placement::{decide, HostCost, Inputs, Policy, Side, Task};
use integration_tests::{bin_dir, guest_elf};
use vmm::host::api::AgentOp;

const MOVES: usize = 20;
const MEM_MIB: u32 = 64;
/// 16 MiB of 4 KiB pages.
const DIRTY_PAGES: u64 = 4096;
/// Pages written every 10 ms: 16.4 MiB/s.
const DIRTY_STEP: u64 = 41;

/// Where the agent runs, for the dirtier.
#[derive(Clone)]
enum Where {
    Card(u32),
    Host(PathBuf),
}

/// A thread writing 16 MiB/s of the agent's memory, wherever it runs.
struct Dirtier {
    target: Arc<Mutex<Where>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Dirtier {
    fn start(control: PathBuf, at: Where) -> Dirtier {
        let target = Arc::new(Mutex::new(at));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (target.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let (mut page, mut done, mut client) = (0u64, 0u64, None::<(PathBuf, vmm::host::client::Client)>);
            let mut next = Instant::now();
            while !s.load(Ordering::Relaxed) {
                let arg = DIRTY_STEP | page << 32;
                let at = t.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let ok = match at {
                    Where::Card(vm) => card_sim::process::control_at(
                        &control,
                        &CardRequest::Agent { vm, request: AgentOp::Touch, arg },
                    )
                    .is_ok(),
                    Where::Host(sock) => {
                        if client.as_ref().is_none_or(|(p, _)| *p != sock) {
                            client = vmm::host::client::Client::connect(&sock).ok().map(|c| (sock.clone(), c));
                        }
                        let r = client.as_mut().map(|(_, c)| c.request(AgentOp::Touch, arg));
                        if !matches!(r, Some(Ok(_))) {
                            client = None;
                        }
                        matches!(r, Some(Ok(_)))
                    }
                };
                if ok {
                    page = (page + DIRTY_STEP) % (DIRTY_PAGES - DIRTY_STEP);
                    done += 1;
                }
                next += Duration::from_millis(10);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                next = next.max(Instant::now() - Duration::from_millis(10));
            }
            done
        });
        Dirtier { target, stop, thread: Some(thread) }
    }

    fn set(&self, at: Where) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = at;
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map_or(0, |t| t.join().unwrap_or(0))
    }
}

impl Drop for Dirtier {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                eprintln!("the dirtier thread panicked");
            }
        }
    }
}

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

/// One round: `MOVES` moves each way, with a dirtier running or not and
/// with pre-copy or not; returns (crossing -> running ms, card -> host
/// pause ms, host -> card pause ms).
fn round(b: &mut Bench, dirty: bool, precopy: bool) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    round_with(b, dirty, precopy, DIRTY_PAGES)
}

/// [`round`], checking afterwards that the first `resident` scratch pages
/// hold what was written to them.
fn round_with(b: &mut Bench, dirty: bool, precopy: bool, resident: u64) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
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
    let card_vm = |b: &Bench| b.sites.card.vm_id("log").context("log is not on the card");
    let dirtier = dirty.then(|| Dirtier::start(b.sim.control_path().to_path_buf(), Where::Card(0)));
    for _ in 0..MOVES {
        if let Some(d) = &dirtier {
            d.set(Where::Card(card_vm(b)?));
            // Let it write for a while on the card before the move.
            std::thread::sleep(Duration::from_millis(100));
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
        let r = move_task_with(&mut b.sites, "log", Side::Card, precopy);
        if !r.ok {
            bail!("card -> host failed: {:?}", r.error);
        }
        if precopy != r.steps.iter().any(|s| s.step.starts_with("pre-copy")) {
            bail!("pre-copy {precopy} but the steps were {:?}", r.steps);
        }
        if let Some(d) = &dirtier {
            d.set(Where::Host(b.sites.host.live_socket("log").context("host socket")?.to_path_buf()));
        }
        let to_resume: f64 = r.steps.iter().filter(|s| !s.step.starts_with("release")).map(|s| s.ms).sum();
        let t1 = Instant::now();
        b.host_agent(AgentOp::Ping, 0)?;
        let first = t1.elapsed().as_secs_f64() * 1e3;
        crossing.push(decided + to_resume + first);
        out.push(r.pause_ms);
        if dirtier.is_some() {
            std::thread::sleep(Duration::from_millis(100));
        }
        let r = move_task_with(&mut b.sites, "log", Side::Host, precopy);
        if !r.ok {
            bail!("host -> card failed: {:?}", r.error);
        }
        if precopy != r.steps.iter().any(|s| s.step.starts_with("pre-copy")) {
            bail!("pre-copy {precopy} but the steps back were {:?}", r.steps);
        }
        back.push(r.pause_ms);
    }
    if let Some(d) = dirtier {
        let writes = d.stop();
        if writes < MOVES as u64 * 10 {
            bail!("the dirtier wrote only {writes} times");
        }
    }
    // The state went through every move whole: its memory is what the
    // dirtier and the first touch wrote.
    let sum = b.card_agent(AgentOp::Checksum, resident)?.value;
    if sum != resident * resident.saturating_sub(1) / 2 {
        bail!("guest memory changed across the moves: checksum {sum}");
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
    // A fresh agent first: only what it touched to boot moves.
    let (crossing_fresh, out_fresh, back_fresh) = round_with(&mut b, false, false, 0)?;
    // A 16 MiB working set, written once (the dirtier rewrites it).
    b.card_agent(AgentOp::Touch, DIRTY_PAGES)?;

    let (crossing, out_idle, back_idle) = round(&mut b, false, false)?;
    let (_, out_dirty, back_dirty) = round(&mut b, true, false)?;
    let (crossing_pc, out_idle_pc, back_idle_pc) = round(&mut b, false, true)?;
    let (_, out_dirty_pc, back_dirty_pc) = round(&mut b, true, true)?;
    let cold = cold_starts(&mut b)?;
    let (c50, c99) = p50_p99(cold);
    let fmt = |(a, z): (f64, f64)| format!("{a:.2} / {z:.2}");
    let cold_s = format!("cold start {c50:.1} / {c99:.1}");
    row(
        "placement: crossing -> running on host, fresh agent (ms p50/p99)",
        fmt(p50_p99(crossing_fresh)),
        cold_s.clone(),
        "goal <= 20 ms p99; 64 MiB agent that wrote nothing yet, VMM prepared ahead",
    );
    row(
        "placement: pause card->host, fresh agent (ms p50/p99)",
        fmt(p50_p99(out_fresh)),
        cold_s.clone(),
        "goal <= 10 ms p99",
    );
    row(
        "placement: pause host->card, fresh agent (ms p50/p99)",
        fmt(p50_p99(back_fresh)),
        cold_s.clone(),
        "goal <= 10 ms p99",
    );
    row(
        "placement: crossing -> running on host (ms p50/p99)",
        fmt(p50_p99(crossing)),
        cold_s.clone(),
        "goal <= 20 ms p99; 64 MiB agent with 16 MiB written, VMM prepared ahead",
    );
    row(
        "placement: crossing -> running on host, pre-copy (ms p50/p99)",
        fmt(p50_p99(crossing_pc)),
        cold_s.clone(),
        "goal <= 20 ms p99; includes copying the base while it runs",
    );
    row(
        "placement: pause card->host, 16 MiB resident, idle (ms p50/p99)",
        fmt(p50_p99(out_idle)),
        cold_s.clone(),
        "goal <= 10 ms p99",
    );
    row(
        "placement: pause card->host, 16 MiB resident, idle, pre-copy (ms p50/p99)",
        fmt(p50_p99(out_idle_pc)),
        cold_s.clone(),
        "goal <= 5 ms p99",
    );
    row(
        "placement: pause card->host, dirtying 16 MiB/s (ms p50/p99)",
        fmt(p50_p99(out_dirty)),
        cold_s.clone(),
        "goal <= 10 ms p99",
    );
    row(
        "placement: pause card->host, dirtying 16 MiB/s, pre-copy (ms p50/p99)",
        fmt(p50_p99(out_dirty_pc)),
        cold_s.clone(),
        "goal <= 5 ms p99",
    );
    row(
        "placement: pause host->card, 16 MiB resident, idle (ms p50/p99)",
        fmt(p50_p99(back_idle)),
        cold_s.clone(),
        "goal <= 10 ms p99",
    );
    row(
        "placement: pause host->card, 16 MiB resident, idle, pre-copy (ms p50/p99)",
        fmt(p50_p99(back_idle_pc)),
        cold_s.clone(),
        "goal <= 5 ms p99",
    );
    row(
        "placement: pause host->card, dirtying 16 MiB/s (ms p50/p99)",
        fmt(p50_p99(back_dirty)),
        cold_s.clone(),
        "goal <= 10 ms p99",
    );
    row(
        "placement: pause host->card, dirtying 16 MiB/s, pre-copy (ms p50/p99)",
        fmt(p50_p99(back_dirty_pc)),
        cold_s,
        "goal <= 5 ms p99",
    );
    Ok(())
}
