//! `governor-demo`: the live demo of `cargo xtask run`. card-sim plays the
//! card with the monitor, log and qos MC VMs on it; three user VMs run real
//! load; `governor run` places the MC VMs; the user traffic through the
//! card is ramped so the card crosses its network threshold (the MC VMs
//! move to the host) and falls back (they come back). The view shows it
//! live; everything is removed at the end, on Ctrl-C or on an error.
//! A binary of its own, so the governor's binary carries no test fixtures.

mod ramp;
mod screen;
mod soak;
mod system;
mod view;
mod watch;

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use fixtures::TempPath;
use governor::placement::Side;

use crate::ramp::Ramp;
use crate::screen::{stop_requested, Screen};
use crate::system::{Paths, System};
use crate::view::Header;
use crate::watch::Watch;

#[derive(Parser)]
#[command(
    name = "governor-demo",
    about = "The governor placing MC VMs between a simulated card and the host under ramped user load \
             (everything removed at the end)"
)]
struct Cli {
    /// Stop after this many seconds (default: until Ctrl-C or q).
    #[arg(long)]
    seconds: Option<u64>,
    /// Judge the run at the end (needs --seconds): fail on any card death,
    /// any failed move, and growth of the governor's threads, fds or
    /// memory (or card-sim's threads) past the bounds of `soak.rs`.
    #[arg(long, requires = "seconds")]
    soak: bool,
    /// Kill the card (SIGKILL to card-sim and its VMs) this many seconds
    /// into the load, as the `k` key does on the terminal.
    #[arg(long)]
    kill_card_at: Option<u64>,
    /// Start the card again this many seconds into the load (`r`).
    #[arg(long, requires = "kill_card_at")]
    restart_card_at: Option<u64>,
}

/// How often the view reads the API and redraws.
const ROUND: Duration = Duration::from_millis(250);

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let tty = std::io::stdout().is_terminal();
    let stderr_log = TempPath::new("governor-demo-stderr.log");
    let r = screen::catch_signals().and_then(|()| run(&cli, tty, &stderr_log));
    // What the children said while the view had the terminal.
    if tty {
        if let Ok(text) = std::fs::read_to_string(stderr_log.path()) {
            let lines: Vec<&str> = text.lines().collect();
            if !lines.is_empty() {
                eprintln!("demo: the last of what card-sim and the governor logged:");
                for l in &lines[lines.len().saturating_sub(15)..] {
                    eprintln!("  {l}");
                }
            }
        }
    }
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("governor-demo: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli, tty: bool, stderr_log: &TempPath) -> Result<()> {
    let t0 = Instant::now();
    let deadline = cli.seconds.map(|s| t0 + Duration::from_secs(s));
    let over = || stop_requested() || deadline.is_some_and(|d| Instant::now() >= d);
    let paths = Paths::find()?;
    println!("demo: starting card-sim with the MC VMs, three user VMs and the governor...");
    // On the terminal the children's stderr (card-sim, the governor, the
    // load) goes to the log until the end: it would tear the view.
    let stderr = if tty { Some(screen::StderrTo::file(stderr_log.path())?) } else { None };
    let sys = System::start(&paths, &over);
    let mut sys = match sys {
        Ok(s) => s,
        Err(_) if over() => {
            println!("demo: stopped while starting; everything removed");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    println!(
        "demo: up in {:.1} s; metrics on http://{}/metrics; API `governor status --socket {}`",
        t0.elapsed().as_secs_f64(),
        sys.metrics,
        sys.socket.display()
    );
    let watched = watch_loop(&mut sys, cli, stderr.as_ref(), t0, &over);
    println!("demo: stopping: load, governor (its MC VMs, pins, qdiscs), card-sim, user VMs, network");
    let stopped = sys.stop();
    drop(stderr);
    let w = watched?;
    stopped.context("stopping the demo")?;
    summary(&w);
    if w.soak_failed {
        anyhow::bail!("the soak failed (see its report above)");
    }
    Ok(())
}

fn watch_loop(
    sys: &mut System,
    cli: &Cli,
    stderr: Option<&screen::StderrTo>,
    t0: Instant,
    over: &dyn Fn() -> bool,
) -> Result<Watch> {
    let tty = stderr.is_some();
    let mut ramp = Ramp::new(sys)?;
    let mut w = Watch::default();
    let mut soak = cli.soak.then(|| soak::Soak::new(Duration::from_secs(cli.seconds.unwrap_or(0))));
    let mut screen = Screen::open(stderr)?;
    let metrics = sys.metrics.to_string();
    let header = |ramp: &Ramp| Header {
        elapsed_s: t0.elapsed().as_secs_f64(),
        ramp_s: ramp.elapsed_s(),
        metrics: metrics.clone(),
        ends_in_s: cli.seconds.map(|s| s.saturating_sub(t0.elapsed().as_secs())),
        tty,
    };
    let (mut kill_at, mut restart_at) = (cli.kill_card_at, cli.restart_card_at);
    let mut key = None;
    while !over() {
        sys.check_alive()?;
        let at_s = ramp.elapsed_s();
        let scripted = if kill_at.is_some_and(|s| at_s >= s as f64) {
            kill_at = None;
            Some(screen::CardKey::Kill)
        } else if restart_at.is_some_and(|s| at_s >= s as f64) {
            restart_at = None;
            Some(screen::CardKey::Restart)
        } else {
            None
        };
        match key.take().or(scripted) {
            Some(screen::CardKey::Kill) if sys.card_running() => {
                sys.kill_card();
                w.card_event(format!("+{at_s:.0} s: the card was killed (SIGKILL to card-sim and its VMs)"));
                if !tty {
                    println!("demo: card killed at +{at_s:.1} s of load");
                }
            }
            Some(screen::CardKey::Restart) if !sys.card_running() => {
                sys.restart_card()?;
                w.card_event(format!("+{at_s:.0} s: the card was started again (nothing on it)"));
                if !tty {
                    println!("demo: card started again at +{at_s:.1} s of load");
                }
            }
            _ => {}
        }
        if let (Some(soak), (Some(gov), Some(card))) = (soak.as_mut(), sys.pids()) {
            soak.sample(gov, card);
        }
        let moved = w.poll(&sys.socket, ramp.elapsed_s());
        w.card_process_up = sys.card_running();
        ramp.step(w.placement.as_ref(), w.card_process_up)?;
        if !tty {
            for m in &moved {
                println!(
                    "demo: move {} to {} {} ({:?}) pause {:.2} ms at +{:.1} s of load",
                    m.task,
                    if m.to == Side::Host { "host" } else { "card" },
                    if m.ok { "ok" } else { "FAILED" },
                    m.reason,
                    m.pause_ms,
                    m.at_s
                );
            }
        }
        let h = header(&ramp);
        key = screen.show(&w, ramp.state(), &h, !moved.is_empty(), ROUND)?;
    }
    if !tty {
        // The last frame, as it stood when the demo ended.
        println!("{}", screen::frame_text(&w, ramp.state(), &header(&ramp))?);
    }
    drop(screen);
    ramp.stop();
    if let Some(soak) = soak {
        let events = link_events(&sys.metrics.to_string());
        // The verdict goes out before the stop, which takes a while.
        match soak.verdict(&w, &events) {
            Ok(report) => println!("{report}"),
            Err(e) => {
                println!("{e}");
                w.soak_failed = true;
            }
        }
    }
    Ok(w)
}

/// What the governor counted on its card link, from its metrics.
fn link_events(addr: &str) -> String {
    use std::io::{Read, Write};
    let text = std::net::TcpStream::connect(addr)
        .and_then(|mut s| {
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
            let mut t = String::new();
            s.read_to_string(&mut t)?;
            Ok(t)
        })
        .unwrap_or_default();
    let value = |start: &str| {
        text.lines().find(|l| l.starts_with(start)).and_then(|l| l.rsplit(' ').next()).unwrap_or("0").to_string()
    };
    let checks: f64 = value("governor_card_health_check_duration_seconds_count").parse().unwrap_or(0.0);
    let sum: f64 = value("governor_card_health_check_duration_seconds_sum").parse().unwrap_or(0.0);
    format!(
        "reconnects {}, late heartbeats {}, health checks {} (mean {:.2} ms)",
        value("governor_card_link_events_total{event=\"reconnected\"}"),
        value("governor_card_link_events_total{event=\"late_heartbeat\"}"),
        checks,
        if checks > 0.0 { sum / checks * 1000.0 } else { 0.0 }
    )
}

/// The closing lines (the test reads the first).
fn summary(w: &Watch) {
    let pauses: Vec<f64> = w.moves.iter().filter(|m| m.ok).map(|m| m.pause_ms).collect();
    let max = pauses.iter().copied().fold(0.0, f64::max);
    println!(
        "demo: moves to host {}, to card {}; failed moves {}; pause max {:.2} ms",
        w.count(Side::Host),
        w.count(Side::Card),
        w.moves.iter().filter(|m| !m.ok).count(),
        max
    );
    if let (Some((tick, ms)), Some(first)) = (w.first_crossing, w.moves.first()) {
        // The decision that moves runs on the tick that measured the
        // crossing: 0 ticks is the engine reacting at once.
        println!(
            "demo: the first move ({} to {}, +{:.1} s into the load) ran at tick {}, {} tick(s) and {} ms after the \
             first tick that measured the card over a threshold",
            first.task,
            if first.to == Side::Host { "host" } else { "card" },
            first.at_s,
            first.tick,
            first.tick.saturating_sub(tick),
            first.time_ms.saturating_sub(ms)
        );
    }
    println!("demo: everything it made is removed");
}
