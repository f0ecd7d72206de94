//! `vmm`: one management VM per process.
//!
//! ```text
//! vmm [--guest ELF | --kernel VMLINUX|BZIMAGE [--cmdline S] | --restore SNAPSHOT]
//!     [--mem-mib N] [--paused]
//!     [--socket PATH] [--serial PATH|-] [--log PATH|-]
//!     [--cgroup NAME [--cpu-quota-us N] [--cpu-period-us N] [--cpuset LIST] [--memory-mib N]]
//! ```
//!
//! Without `--socket` the process runs until the VM stops. With it, the
//! process serves the JSON-lines control protocol (see `vmm::control`), and
//! may start empty (`create`/`restore` over the socket).

use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use vmm::cgroupfs::{Layout, Limits};
use vmm::control::Server;
use vmm::event_loop::Outcome;
use vmm::{Sinks, StopReason, Vm, VmConfig};

#[derive(Default)]
struct Args {
    guest: Option<PathBuf>,
    kernel: Option<PathBuf>,
    cmdline: String,
    mem_mib: u64,
    restore: Option<PathBuf>,
    paused: bool,
    socket: Option<PathBuf>,
    serial: Option<String>,
    log: Option<String>,
    cgroup: Option<String>,
    limits: Limits,
}

fn parse() -> Result<Args, String> {
    let mut a = Args { mem_mib: 64, cmdline: "console=ttyS0 panic=1".into(), ..Default::default() };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().ok_or(format!("{k} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|e| format!("{k}: {e}"));
        match k.as_str() {
            "--guest" => a.guest = Some(val()?.into()),
            "--kernel" => a.kernel = Some(val()?.into()),
            "--cmdline" => a.cmdline = val()?,
            "--mem-mib" => a.mem_mib = num(val()?)?,
            "--restore" => a.restore = Some(val()?.into()),
            "--paused" => a.paused = true,
            "--socket" => a.socket = Some(val()?.into()),
            "--serial" => a.serial = Some(val()?),
            "--log" => a.log = Some(val()?),
            "--cgroup" => a.cgroup = Some(val()?),
            "--cpu-quota-us" => a.limits.cpu_quota_us = Some(num(val()?)?),
            "--cpu-period-us" => a.limits.cpu_period_us = Some(num(val()?)?),
            "--cpuset" => a.limits.cpuset = Some(val()?),
            "--memory-mib" => a.limits.memory_bytes = Some(num(val()?)? << 20),
            "-h" | "--help" => return Err("usage: see the module docs of vmm/src/main.rs".into()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let sources = [a.guest.is_some(), a.kernel.is_some(), a.restore.is_some()];
    if sources.iter().filter(|x| **x).count() > 1 {
        return Err("--guest, --kernel and --restore exclude each other".into());
    }
    if !sources.contains(&true) && a.socket.is_none() {
        return Err("give --guest, --kernel, --restore or --socket".into());
    }
    Ok(a)
}

fn sink(spec: &Option<String>, default_stdout: bool) -> Option<Box<dyn Write + Send>> {
    match spec.as_deref() {
        Some("-") => Some(Box::new(std::io::stdout())),
        Some(path) => match File::options().create(true).append(true).open(path) {
            Ok(f) => Some(Box::new(f)),
            Err(e) => {
                eprintln!("vmm: cannot open {path}: {e}; output dropped");
                None
            }
        },
        None if default_stdout => Some(Box::new(std::io::stdout())),
        None => None,
    }
}

fn main() -> ExitCode {
    let t0 = Instant::now();
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(2);
        }
    };
    // Exit signals go to the main loop's signalfd: block them before any
    // thread exists, so every thread inherits the mask.
    if let Err(e) = vmm::event_loop::block_exit_signals() {
        eprintln!("vmm: {e}");
        return ExitCode::from(2);
    }
    // Join the cgroup first, so every thread started later is inside it.
    let mut cgroup = None;
    if let Some(name) = &args.cgroup {
        let made = Layout::detect().and_then(|l| l.create(name, &args.limits)).and_then(|mut cg| {
            match cg.attach(std::process::id()) {
                Ok(()) => Ok(cg),
                Err(e) => {
                    if let Err(r) = cg.remove() {
                        eprintln!("vmm: removing the half-made cgroup {name}: {r}");
                    }
                    Err(e)
                }
            }
        });
        match made {
            Ok(cg) => cgroup = Some(cg),
            Err(e) => {
                eprintln!("vmm: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let code = run(&args, t0);
    if let Some(cg) = cgroup.as_mut() {
        if let Err(e) = cg.remove() {
            eprintln!("vmm: removing cgroup {}: {e}", cg.rel().display());
        }
    }
    code
}

fn run(args: &Args, t0: Instant) -> ExitCode {
    let (serial, log) = (args.serial.clone(), args.log.clone());
    let make_sinks = move || Sinks { serial: sink(&serial, true), log: sink(&log, false) };
    let mut vm = None;
    let result = (|| -> vmm::Result<()> {
        if let Some(g) = &args.guest {
            let v = Vm::create(&VmConfig::new(g.clone(), args.mem_mib), make_sinks())?;
            v.start(args.paused)?;
            if !args.paused {
                v.wait_ready(Duration::from_secs(10))?;
                eprintln!("vmm: agent ready {:.3} ms after process start", t0.elapsed().as_secs_f64() * 1e3);
            }
            vm = Some(v);
        } else if let Some(k) = &args.kernel {
            // Linux has no agent banner: the VM just runs until it stops.
            let cfg = VmConfig::linux(k.clone(), args.mem_mib, args.cmdline.clone());
            let v = Vm::create(&cfg, make_sinks())?;
            v.start(args.paused)?;
            vm = Some(v);
        } else if let Some(s) = &args.restore {
            let v = Vm::restore_from_file(s, make_sinks())?;
            eprintln!("vmm: restored in {:.3} ms after process start", t0.elapsed().as_secs_f64() * 1e3);
            if !args.paused {
                v.resume()?;
            }
            vm = Some(v);
        }
        Ok(())
    })();
    if let Err(e) = result {
        eprintln!("vmm: {e}");
        return ExitCode::from(1);
    }
    let listener = match &args.socket {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            match UnixListener::bind(path) {
                Ok(l) => Some(l),
                Err(e) => {
                    eprintln!("vmm: binding {}: {e}", path.display());
                    return ExitCode::from(2);
                }
            }
        }
        None => None,
    };
    let outcome = Server::new(vm, Box::new(make_sinks), Box::new(|_| {}))
        .and_then(|server| vmm::event_loop::run(server, listener));
    if let Some(path) = &args.socket {
        let _ = std::fs::remove_file(path);
    }
    match outcome {
        Ok(Outcome::Shutdown) => ExitCode::SUCCESS,
        Ok(Outcome::Signal(n)) => {
            eprintln!("vmm: signal {n}: VM shut down");
            ExitCode::SUCCESS
        }
        Ok(Outcome::VmStopped(reason)) => {
            eprintln!("vmm: VM stopped: {reason}");
            match reason {
                StopReason::Requested | StopReason::GuestExit(0) => ExitCode::SUCCESS,
                _ => ExitCode::from(1),
            }
        }
        Err(e) => {
            eprintln!("vmm: {e}");
            ExitCode::from(1)
        }
    }
}
