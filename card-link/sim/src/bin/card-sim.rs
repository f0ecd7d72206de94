//! card-sim: plays the management-and-control board card as a vfio-user
//! server. Usage:
//!   card-sim --socket PATH [--control PATH] [--cgroup NAME] [--period-ms N]
//!            [--load-threads N] [--serial N] [--guest AGENT_ELF [--vmm VMM_BIN]]
//!            [--run-dir DIR] [--no-mmap]
//! With --guest, management VMs are real KVM guests, each in its own `vmm`
//! process (the binary: --vmm, else $VMM_BIN, else `vmm` next to this
//! executable) and, with --cgroup, its own child cgroup `<cgroup>/vm-<id>`;
//! without it, modelled VMs (see card_sim::vms). The VMs' sockets, consoles
//! and snapshot files go to --run-dir (default: `<socket>.vms` beside the
//! socket), made at start and removed on SIGTERM/SIGINT, which also stop
//! every VM.
//! With --cgroup, the process joins that (already created) cgroup before it
//! starts any thread, and its CPU and memory telemetry come from it.
//! Diagnostics go to stderr through `tracing` (RUST_LOG, default warn).

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use card_sim::vmm_backend::VmmBackend;
use card_sim::{control, device, SimCard, SimConfig, SimError};
use cgroupfs::Layout;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("card-sim: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage(msg: String) -> SimError {
    SimError::Usage(msg)
}

fn run() -> Result<(), SimError> {
    let mut args = std::env::args().skip(1);
    let mut socket: Option<PathBuf> = None;
    let mut guest: Option<PathBuf> = None;
    let mut cfg = SimConfig::new(PathBuf::new());
    let mut cgroup: Option<String> = None;
    let mut vmm_bin: Option<PathBuf> = None;
    let mut run_dir: Option<PathBuf> = None;
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().ok_or_else(|| usage(format!("{name} needs a value")));
        match a.as_str() {
            "--socket" => socket = Some(PathBuf::from(val("--socket")?)),
            "--control" => cfg.control = Some(PathBuf::from(val("--control")?)),
            "--cgroup" => cgroup = Some(val("--cgroup")?),
            "--period-ms" => {
                cfg.period_ms = val("--period-ms")?.parse().map_err(|e| usage(format!("--period-ms: {e}")))?;
                if !(card_link::abi::MIN_PERIOD_MS..=card_link::abi::MAX_PERIOD_MS).contains(&cfg.period_ms) {
                    return Err(usage("--period-ms must be 10..=60000".into()));
                }
            }
            "--load-threads" => {
                cfg.load_threads = val("--load-threads")?.parse().map_err(|e| usage(format!("--load-threads: {e}")))?
            }
            "--guest" => guest = Some(PathBuf::from(val("--guest")?)),
            "--vmm" => vmm_bin = Some(PathBuf::from(val("--vmm")?)),
            "--run-dir" => run_dir = Some(PathBuf::from(val("--run-dir")?)),
            "--no-mmap" => cfg.mmap = false,
            "--serial" => cfg.serial = val("--serial")?.parse().map_err(|e| usage(format!("--serial: {e}")))?,
            "-h" | "--help" => {
                println!("card-sim --socket PATH [--control PATH] [--cgroup NAME] [--period-ms N] [--load-threads N] [--serial N] [--guest AGENT_ELF [--vmm VMM_BIN]] [--run-dir DIR] [--no-mmap]");
                return Ok(());
            }
            other => return Err(usage(format!("unknown argument {other:?}"))),
        }
    }
    cfg.socket = socket.ok_or_else(|| usage("--socket is required".into()))?;
    // Before any thread: every thread then has them blocked, and the
    // signal thread below takes them (children get a clean mask from std).
    let signals = block_exit_signals()?;
    // The layout is detected and the cgroup opened here, once: the card
    // measures the same cgroup this process joins.
    if let Some(name) = cgroup {
        let cg = Layout::detect()
            .and_then(|l| l.open(&name))
            .and_then(|cg| cg.attach(std::process::id()).map(|()| cg))
            .map_err(|source| SimError::Cgroup { name, source })?;
        cfg.cgroup = Some(cg);
    }
    let run_dir = run_dir.unwrap_or_else(|| default_run_dir(&cfg.socket));
    let card = match guest {
        Some(g) => {
            if !g.is_file() {
                return Err(usage(format!("--guest {}: no such file", g.display())));
            }
            let vmm_bin = match vmm_bin {
                Some(b) => b,
                None => find_vmm()?,
            };
            if !vmm_bin.is_file() {
                return Err(usage(format!("--vmm {}: no such file", vmm_bin.display())));
            }
            std::fs::create_dir_all(&run_dir).map_err(|source| SimError::Dir { path: run_dir.clone(), source })?;
            let backend = VmmBackend { guest: g, vmm_bin, run_dir: run_dir.clone(), cgroup: cfg.cgroup.clone() };
            SimCard::with_backend(cfg, Box::new(backend))?
        }
        None => SimCard::new(cfg)?,
    };
    let c = card.clone();
    device::spawn_thread("signals".into(), move || on_exit_signal(&signals, &c, &run_dir))?;
    card.spawn_threads()?;
    if let Some(path) = &card.cfg.control {
        device::remove_stale_socket(path);
        let l = UnixListener::bind(path).map_err(|source| SimError::Control {
            path: path.clone(),
            what: "bind",
            source,
        })?;
        let c = card.clone();
        device::spawn_thread("control".into(), move || control::serve(c, l))?;
    }
    // This thread serves the link from here on (every other thread is started).
    device::firmware_priority();
    device::serve(card)
}

/// The `vmm` binary: $VMM_BIN, else `vmm` next to this executable (cargo
/// puts both in target/<profile>).
fn find_vmm() -> Result<PathBuf, SimError> {
    if let Some(p) = std::env::var_os("VMM_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(SimError::CurrentExe)?;
    let cand = exe.with_file_name("vmm");
    if cand.is_file() {
        return Ok(cand);
    }
    Err(SimError::VmmNotFound { near: exe })
}

/// `<socket>.vms` beside the socket: `/run/card.sock` -> `/run/card.vms`.
fn default_run_dir(socket: &Path) -> PathBuf {
    socket.with_extension("vms")
}

/// Block SIGTERM and SIGINT in this (still single) thread; returns the set.
fn block_exit_signals() -> Result<libc::sigset_t, SimError> {
    // SAFETY: a zeroed sigset_t is valid storage for sigemptyset to fill;
    // the calls only touch `set` and this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(SimError::Signals(std::io::Error::from_raw_os_error(rc)));
        }
        Ok(set)
    }
}

/// Wait for SIGTERM/SIGINT, then go down the way a card does: every VM
/// stopped (its process, its cgroup), the run directory removed, exit.
fn on_exit_signal(set: &libc::sigset_t, card: &Arc<SimCard>, run_dir: &Path) {
    let mut sig = 0;
    // SAFETY: `set` is an initialised sigset; sigwait writes the signal number.
    let rc = unsafe { libc::sigwait(set, &mut sig) };
    if rc != 0 {
        tracing::warn!("sigwait failed ({}); exiting", std::io::Error::from_raw_os_error(rc));
    }
    card.shutdown();
    card.stop_vms();
    if let Err(e) = std::fs::remove_dir(run_dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %run_dir.display(), error = %e, "cannot remove the card's run directory");
        }
    }
    std::process::exit(0);
}
