//! card-sim: plays the management-and-control board card as a vfio-user
//! server. Usage:
//!   card-sim --socket PATH [--control PATH] [--cgroup NAME] [--period-ms N]
//!            [--load-threads N] [--serial N] [--guest AGENT_ELF]
//! With --guest, management VMs are real KVM guests run by the vmm crate;
//! without it, modelled VMs (see card_sim::vms).
//! With --cgroup, the process joins that (already created) cgroup before it
//! starts any thread, and its CPU and memory telemetry come from it.
//! Diagnostics go to stderr through `tracing` (RUST_LOG, default warn).

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;

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
            "--serial" => cfg.serial = val("--serial")?.parse().map_err(|e| usage(format!("--serial: {e}")))?,
            "-h" | "--help" => {
                println!("card-sim --socket PATH [--control PATH] [--cgroup NAME] [--period-ms N] [--load-threads N] [--serial N] [--guest AGENT_ELF]");
                return Ok(());
            }
            other => return Err(usage(format!("unknown argument {other:?}"))),
        }
    }
    cfg.socket = socket.ok_or_else(|| usage("--socket is required".into()))?;
    // The layout is detected and the cgroup opened here, once: the card
    // measures the same cgroup this process joins.
    if let Some(name) = cgroup {
        let cg = Layout::detect()
            .and_then(|l| l.open(&name))
            .and_then(|cg| cg.attach(std::process::id()).map(|()| cg))
            .map_err(|source| SimError::Cgroup { name, source })?;
        cfg.cgroup = Some(cg);
    }
    let card = match guest {
        Some(g) => {
            if !g.is_file() {
                return Err(usage(format!("--guest {}: no such file", g.display())));
            }
            SimCard::with_backend(cfg, Box::new(VmmBackend { guest: g }))?
        }
        None => SimCard::new(cfg)?,
    };
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
    device::serve(card)
}
