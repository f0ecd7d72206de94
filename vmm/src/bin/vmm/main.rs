//! `vmm`: one management VM per process (usage in `args.rs`).
//!
//! Without `--socket` the process runs until the VM stops. With it, the
//! process serves the JSON-lines control protocol (`vmm::host::api`), and
//! may start empty (`create`/`restore` over the socket). Diagnostics go to
//! stderr through `tracing` (RUST_LOG, default `warn`).

mod args;
mod event_loop;
mod server;

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::prelude::*;
use vmm::cgroupfs::{Cgroup, Layout};
use vmm::{Sinks, StopReason, Vm, VmConfig};

use args::Args;
use event_loop::Outcome;
use server::Server;

/// Where `--serial`/`--log` output goes: `-` is stdout, else a file
/// (appended). A file that cannot be opened drops that output, logged.
fn sink(spec: &Option<String>, default_stdout: bool) -> Option<Box<dyn Write + Send>> {
    match spec.as_deref() {
        Some("-") => Some(Box::new(std::io::stdout())),
        Some(path) => match File::options().create(true).append(true).open(path) {
            Ok(f) => Some(Box::new(f)),
            Err(e) => {
                tracing::warn!(path, error = %e, "cannot open an output file; that output is dropped");
                None
            }
        },
        None if default_stdout => Some(Box::new(std::io::stdout())),
        None => None,
    }
}

/// Diagnostics to stderr, filtered by RUST_LOG (`warn`, `vmm=debug,info`:
/// targets and levels), `warn` by default. A `Targets` filter rather than an
/// `EnvFilter`: the latter links a regex engine (the binary grew from 1.3
/// to 2.4 MB) and compiles it at every start, which showed as 0.2 ms of CPU
/// and 0.4 MiB of RSS per VMM (the spawn-to-banner time is ~4 ms); span and
/// field filters are not needed here.
fn init_logging() {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => spec.parse::<Targets>().unwrap_or_else(|e| {
            eprintln!("vmm: ignoring RUST_LOG={spec:?} ({e}); logging warnings");
            Targets::new().with_default(LevelFilter::WARN)
        }),
        _ => Targets::new().with_default(LevelFilter::WARN),
    };
    // Colours only for a person at a terminal, not in a governor's log file.
    let ansi = std::io::stderr().is_terminal();
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    tracing_subscriber::registry().with(fmt).with(filter).init();
}

/// Remove a socket file; one that is already gone is fine.
fn remove_socket(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(socket = %path.display(), error = %e, "cannot remove the control socket");
        }
    }
}

/// Create the cgroup (or join it, when it is there already) and move this
/// process into it; a cgroup this call made is removed again on failure.
fn join_cgroup(name: &str, args: &Args) -> Result<Cgroup, vmm::cgroupfs::CgroupError> {
    let mut cg = Layout::detect()?.create(name, &args.limits)?;
    if let Err(e) = cg.attach(std::process::id()) {
        if let Err(r) = cg.release() {
            tracing::warn!(cgroup = name, error = %r, "cannot remove the half-made cgroup");
        }
        return Err(e);
    }
    Ok(cg)
}

fn main() -> ExitCode {
    let t0 = Instant::now();
    let args = match args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging();
    // Exit signals go to the main loop's signalfd: block them before any
    // thread exists, so every thread inherits the mask.
    if let Err(e) = event_loop::block_exit_signals() {
        tracing::error!(error = %e, "cannot block the exit signals");
        return ExitCode::from(2);
    }
    // Join the cgroup first, so every thread started later is inside it.
    let mut cgroup = None;
    if let Some(name) = &args.cgroup {
        match join_cgroup(name, &args) {
            Ok(cg) => cgroup = Some(cg),
            Err(e) => {
                tracing::error!(cgroup = name.as_str(), error = %e, "cannot join the cgroup");
                return ExitCode::from(2);
            }
        }
    }
    let code = run(&args, t0);
    // A cgroup that was there before (made by the governor or an operator)
    // stays; only one this process made is removed.
    if let Some(cg) = cgroup.as_mut() {
        if let Err(e) = cg.release() {
            tracing::warn!(cgroup = %cg.rel().display(), error = %e, "cannot remove the cgroup this process made");
        }
    }
    code
}

/// The VM the command line asks for, if any.
fn initial_vm(args: &Args, t0: Instant, make_sinks: &dyn Fn() -> Sinks) -> vmm::Result<Option<Vm>> {
    if let Some(g) = &args.guest {
        let v = Vm::create(&VmConfig::new(g.clone(), args.mem_mib), make_sinks())?;
        v.start(args.paused)?;
        if !args.paused {
            v.wait_ready(Duration::from_secs(10))?;
            tracing::info!("agent ready {:.3} ms after process start", t0.elapsed().as_secs_f64() * 1e3);
        }
        Ok(Some(v))
    } else if let Some(k) = &args.kernel {
        // Linux has no agent banner: the VM just runs until it stops.
        let cfg = VmConfig::linux(k.clone(), args.mem_mib, args.cmdline.clone());
        let v = Vm::create(&cfg, make_sinks())?;
        v.start(args.paused)?;
        Ok(Some(v))
    } else if let Some(s) = &args.restore {
        let v = Vm::restore_from_file(s, make_sinks())?;
        tracing::info!("restored in {:.3} ms after process start", t0.elapsed().as_secs_f64() * 1e3);
        if !args.paused {
            v.resume()?;
        }
        Ok(Some(v))
    } else {
        Ok(None)
    }
}

fn run(args: &Args, t0: Instant) -> ExitCode {
    let (serial, log) = (args.serial.clone(), args.log.clone());
    let make_sinks = move || Sinks { serial: sink(&serial, true), log: sink(&log, false) };
    let vm = match initial_vm(args, t0, &make_sinks) {
        Ok(vm) => vm,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the VM");
            return ExitCode::from(1);
        }
    };
    let listener = match &args.socket {
        Some(path) => {
            // A stale socket of an earlier process would make bind fail.
            remove_socket(path);
            match UnixListener::bind(path) {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::error!(socket = %path.display(), error = %e, "cannot bind the control socket");
                    return ExitCode::from(2);
                }
            }
        }
        None => None,
    };
    let outcome = match Server::new(vm, Box::new(make_sinks)) {
        Ok(server) => event_loop::run(server, listener),
        Err(e) => Err(event_loop::LoopError::Io { what: "eventfd", source: e }),
    };
    if let Some(path) = &args.socket {
        remove_socket(path);
    }
    match outcome {
        Ok(Outcome::Shutdown) => ExitCode::SUCCESS,
        Ok(Outcome::Signal(n)) => {
            tracing::info!(signal = n, "VM shut down on a signal");
            ExitCode::SUCCESS
        }
        Ok(Outcome::VmStopped(reason)) => match reason {
            StopReason::Requested | StopReason::GuestExit(0) => {
                tracing::info!(%reason, "VM stopped");
                ExitCode::SUCCESS
            }
            _ => {
                tracing::error!(%reason, "VM stopped");
                ExitCode::from(1)
            }
        },
        Err(e) => {
            tracing::error!(error = %e, "main loop failed");
            ExitCode::from(1)
        }
    }
}
