//! `governor run --config FILE` and `governor status`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use cgroupfs::Layout;
use clap::{Parser, Subcommand};
use governor::api::{self, Request};
use governor::config::{Config, DEFAULT_SOCKET};

#[derive(Parser)]
#[command(name = "governor", version, about = "eBPF host resource governor")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load the kernel programs, watch the configured VMs, serve status.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Also print the status table every tick.
        #[arg(long)]
        print: bool,
        /// Decide and log placements (audit log, `governor decisions`),
        /// move nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Where each management VM runs: side, since when, card and host cost, pin.
    Placement {
        #[command(subcommand)]
        op: Option<PlacementOp>,
        #[arg(long, global = true, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Print the raw JSON instead of the table.
        #[arg(long, global = true)]
        json: bool,
    },
    /// A user VM's log as the log MC VM numbered it.
    Logs {
        vm: String,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Read `<DIR>/<vm>.log` directly (`[placement] logs_dir`), e.g.
        /// while no governor runs, instead of asking the governor.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// From this log number on.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Keep printing new lines.
        #[arg(long)]
        follow: bool,
    },
    /// The placement decisions (the audit records held by the governor).
    Decisions {
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Keep printing new decisions as they are taken.
        #[arg(long)]
        follow: bool,
        /// One JSON object per line instead of sentences.
        #[arg(long)]
        json: bool,
    },
    /// Attach only an empty program until SIGINT/SIGTERM (the floors of
    /// `cargo xtask bench overhead` and `bench qos`).
    #[command(hide = true)]
    FloorProbe {
        /// raw_tp or tp_btf (sched_switch), or tc:<interface> (its egress).
        #[arg(long, default_value = "raw_tp")]
        hook: String,
    },
    /// Check a config file without applying anything.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Set, change, clear or show per-VM QoS limits on a running governor.
    Limit {
        #[command(subcommand)]
        op: LimitOp,
        #[arg(long, global = true, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Per-VM table from a running governor.
    Status {
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Print the raw JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PlacementOp {
    /// Move a management VM now (refused when pinned or already there).
    Move {
        task: String,
        /// card or host
        #[arg(long)]
        to: String,
    },
    /// Keep a management VM where it runs now; the decision never moves it.
    Pin { task: String },
    /// Let the decision move it again.
    Unpin { task: String },
}

#[derive(Subcommand)]
enum LimitOp {
    /// Set or change a limit (e.g. --rate 100mbit --burst 3mb). A police
    /// burst must hold 250 ms of the rate (at least 128kb) for TCP to get
    /// the rate; a smaller one is refused with the size it needs.
    /// Shaping queues instead, and takes a small burst (e.g. 64kb).
    Set {
        #[arg(long)]
        vm: String,
        /// egress (from the VM) or ingress (to the VM)
        #[arg(long)]
        direction: String,
        #[arg(long)]
        rate: String,
        #[arg(long)]
        burst: String,
        /// police (drop in tc-BPF) or shape (HTB)
        #[arg(long, default_value = "police")]
        mode: String,
        #[arg(long)]
        packet_rate: Option<u64>,
    },
    /// Remove a limit (line rate again).
    Clear {
        #[arg(long)]
        vm: String,
        #[arg(long)]
        direction: String,
    },
    /// Limits in force with passed/dropped counters and tokens.
    Show,
}

fn direction(s: &str) -> Result<governor::qos::Direction> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| anyhow::anyhow!("--direction: {s:?} is neither egress nor ingress"))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Run { config, print, dry_run } => {
            let layout = Layout::detect()?;
            let mut cfg = Config::load(&config, &layout)?;
            cfg.dry_run = dry_run;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(governor::daemon::run(cfg, layout, print, None))
        }
        Cmd::FloorProbe { hook } => {
            let _probe = governor::telemetry::attach_floor_probe(&hook)?;
            let mut set = [libc::SIGINT, libc::SIGTERM];
            // SAFETY: blocking the two signals, then waiting for one of them.
            unsafe {
                let mut mask: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut mask);
                for s in &mut set {
                    libc::sigaddset(&mut mask, *s);
                }
                libc::pthread_sigmask(libc::SIG_BLOCK, &mask, std::ptr::null_mut());
                println!("attached");
                let mut sig = 0;
                libc::sigwait(&mask, &mut sig);
            }
            Ok(())
        }
        Cmd::Check { config } => {
            let cfg = Config::load(&config, &Layout::detect()?)?;
            println!("{}: ok, {} vm(s)", config.display(), cfg.vms.len());
            Ok(())
        }
        Cmd::Limit { op, socket } => {
            let req = match op {
                LimitOp::Set { vm, direction: d, rate, burst, mode, packet_rate } => {
                    let mode = serde_json::from_value(serde_json::Value::String(mode.clone()))
                        .map_err(|_| anyhow::anyhow!("--mode: {mode:?} is neither police nor shape"))?;
                    Request::SetLimit {
                        vm,
                        direction: direction(&d)?,
                        limit: governor::qos::LimitSpec {
                            mode,
                            rate: governor::qos::Quantity::Text(rate),
                            burst: governor::qos::Quantity::Text(burst),
                            packet_rate,
                        },
                    }
                }
                LimitOp::Clear { vm, direction: d } => Request::ClearLimit { vm, direction: direction(&d)? },
                LimitOp::Show => Request::Limits,
            };
            let resp = api::call(&socket, &req)?;
            if !resp.ok {
                bail!("governor: {}", resp.error.unwrap_or_default());
            }
            for l in resp.limits.unwrap_or_default() {
                println!(
                    "{:<12} {:<7} {:<6} rate {:>12} burst {:>8} B  tokens {:>8}  passed {} B/{} pkt  dropped {} B/{} pkt",
                    l.vm,
                    l.direction.as_str(),
                    format!("{:?}", l.mode).to_lowercase(),
                    governor::sampler::bits(l.rate_bps as f64),
                    l.burst_bytes,
                    l.tokens_bytes.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
                    l.passed_bytes,
                    l.passed_packets,
                    l.dropped_bytes,
                    l.dropped_packets
                );
            }
            Ok(())
        }
        Cmd::Placement { op, socket, json } => placement_cmd(op, &socket, json),
        Cmd::Decisions { socket, follow, json } => decisions_cmd(&socket, follow, json),
        Cmd::Logs { vm, socket, dir, since, follow } => logs_cmd(&vm, &socket, dir.as_deref(), since, follow),
        Cmd::Status { socket, json } => {
            let resp = api::call(&socket, &Request::Status)?;
            let Some(status) = resp.status.filter(|_| resp.ok) else {
                bail!("governor: {}", resp.error.unwrap_or_else(|| "no status".into()));
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", governor::sampler::table(&status.vms));
                for h in &status.health {
                    println!("health: {:<14} {:<9} ({}, {})", h.vm, h.health, h.reason, h.detail);
                }
                if let Some(why) = &status.management_degraded {
                    println!("management degraded: {why}");
                }
                for o in &status.ooms {
                    println!("OOM kill: pid {} ({}) in {}", o.pid, o.comm, o.vm.as_deref().unwrap_or("?"));
                }
            }
            Ok(())
        }
    }
}

fn ask(socket: &std::path::Path, req: &Request) -> Result<api::Response> {
    let resp = api::call(socket, req)?;
    if !resp.ok {
        bail!("governor: {}", resp.error.unwrap_or_default());
    }
    Ok(resp)
}

fn placement_cmd(op: Option<PlacementOp>, socket: &std::path::Path, json: bool) -> Result<()> {
    use governor::placement::Side;
    let req = match op {
        None => Request::Placement,
        Some(PlacementOp::Move { task, to }) => {
            let to = match to.as_str() {
                "card" => Side::Card,
                "host" => Side::Host,
                other => bail!("--to: {other:?} is neither card nor host"),
            };
            Request::Move { task, to }
        }
        Some(PlacementOp::Pin { task }) => Request::Pin { task },
        Some(PlacementOp::Unpin { task }) => Request::Unpin { task },
    };
    let resp = ask(socket, &req)?;
    if let Some(p) = resp.placement {
        if json {
            println!("{}", serde_json::to_string_pretty(&p)?);
        } else {
            print!("{}", governor::placement::view::placement_table(&p));
        }
    }
    for d in resp.decisions.unwrap_or_default() {
        if json {
            println!("{}", serde_json::to_string(&d)?);
        } else {
            println!("{}", governor::placement::view::decision_line(&d));
        }
    }
    Ok(())
}

fn decisions_cmd(socket: &std::path::Path, follow: bool, json: bool) -> Result<()> {
    let mut after = 0;
    loop {
        let resp = ask(socket, &Request::Decisions { after_tick: after })?;
        for d in resp.decisions.unwrap_or_default() {
            after = after.max(d.tick);
            if json {
                println!("{}", serde_json::to_string(&d)?);
            } else {
                println!("{}", governor::placement::view::decision_line(&d));
            }
        }
        if !follow {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

fn logs_cmd(vm: &str, socket: &std::path::Path, dir: Option<&std::path::Path>, since: u64, follow: bool) -> Result<()> {
    let ok = !vm.is_empty() && vm.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !ok {
        bail!("VM: {vm:?} is not a VM name");
    }
    let mut next = since;
    loop {
        let lines: Vec<governor::manage::logs::LogLine> = match dir {
            Some(dir) => match governor::manage::logs::read(dir, vm, next) {
                Ok(l) => l,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => bail!("reading {}/{vm}.log: {e}", dir.display()),
            },
            None => {
                let (code, body) =
                    api::client::request(socket, "GET", &format!("/v1/vms/{vm}/logs?since={next}"), None)?;
                if code != 200 {
                    let e: api::ErrorBody = serde_json::from_slice(&body)?;
                    bail!("governor: {}", e.error);
                }
                serde_json::from_slice(&body)?
            }
        };
        for l in &lines {
            println!("{}\t{}{}", l.seq, l.text, if l.cont { " \\" } else { "" });
        }
        if let Some(l) = lines.last() {
            next = l.seq + 1;
        }
        if !follow {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}
