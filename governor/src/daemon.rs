//! `governor run`: sample on a timer, serve status on the control socket,
//! clean up (detach, unpin, remove the socket) on SIGINT/SIGTERM.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};

use crate::api::server::{Backend, Job};
use crate::api::{Request, Response, Status};
use cgroupfs::Layout;

use crate::config::{Config, Role, VmConfig, MC_VM_NAME};
use crate::governor::{Governor, LimitStatus};
use crate::placement::config::check_mcs;
use crate::placement::host::HostSiteOptions;
use crate::placement::runtime::{Command, Placement, RuntimeOptions};

/// SIGTERM and SIGINT, caught from the moment this is made: install it
/// before anything that must be undone (programs, pins, qdiscs, the demo's
/// namespaces), so a signal that arrives while they are set up is served
/// by the loop as a clean stop instead of killing the process.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn install() -> Result<Signals> {
        Ok(Signals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }
}

/// Run until SIGINT/SIGTERM, or until `stop_after` when given.
pub async fn run(cfg: Config, layout: Layout, print: bool, stop_after: Option<Duration>) -> Result<()> {
    run_with(cfg, layout, print, stop_after, Signals::install()?).await
}

/// [`run`] with signal handlers installed earlier by the caller.
pub async fn run_with(
    cfg: Config,
    layout: Layout,
    print: bool,
    stop_after: Option<Duration>,
    signals: Signals,
) -> Result<()> {
    let Signals { mut term, mut int } = signals;
    // Locks and the socket next: if another governor uses the same pins,
    // IFB device or socket, stop before touching any of them.
    let _locks = [lock("pins", &cfg.pin_dir.to_string_lossy())?, lock("ifb", &cfg.qos_ifb)?];
    let listener = crate::api::server::bind(&cfg.socket)?;
    let _socket = RemoveOnDrop(cfg.socket.clone());
    // A governor killed before us left the limits it had in force: they,
    // not the config's, are what holds (its pinned maps are adopted too).
    let state_path = crate::runstate::path_for(&cfg.pin_dir);
    let mut cfg = cfg;
    if let Some(st) = crate::runstate::RunState::load(&state_path) {
        tracing::info!(state = %state_path.display(), limits = st.limits.len(), "taking over the limits of the governor before");
        st.apply(&mut cfg);
    }
    // The MC VMs first: their cgroup subtree must exist before the
    // governor watches it (role `mc`). Dropped last (after the governor).
    let live = crate::metrics::Live::default();
    let (placement, cfg) = start_placement(cfg, &layout, &live)?;
    let mut gov = Governor::new_on(&cfg, layout).context("starting the governor")?;
    save_state(&gov, &state_path);
    let _state = RemoveOnDrop(state_path.clone());
    tracing::info!(vms = cfg.vms.len(), pin_dir = %cfg.pin_dir.display(), "programs loaded and pinned");
    let (tx, mut rx) = mpsc::channel::<Job>(64);
    let logs_dir =
        cfg.placement.as_ref().map(|p| p.logs_dir.clone()).filter(|_| cfg.mc.iter().any(|m| m.task == "log"));
    let backend = Backend { jobs: tx, placement: placement.as_ref().and_then(|p| p.sender()), logs_dir };
    tokio::spawn(crate::api::server::serve(listener, backend));
    let (metrics_tx, metrics_rx) = watch::channel(std::sync::Arc::new(crate::metrics::Readings::default()));
    if let Some(addr) = cfg.metrics_addr {
        crate::metrics::serve(addr, metrics_rx, live.clone()).await?;
        tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    }

    let mut timer = tokio::time::interval(Duration::from_millis(cfg.tick_ms));
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = tokio::time::sleep(stop_after.unwrap_or(Duration::from_secs(u64::MAX / 4)));
    tokio::pin!(deadline);
    let mut status = Status { tick_ms: cfg.tick_ms, ..Status::default() };
    let mut tracker = crate::manage::signals::SignalTracker::default();
    let qos_policies = crate::manage::qos::policies(&cfg.vms);
    let mut qos_meter = crate::manage::qos::QosMeter::default();
    loop {
        tokio::select! {
            _ = timer.tick() => {}
            Some((req, reply)) = rx.recv() => {
                let changes = matches!(req, Request::SetLimit { .. } | Request::ClearLimit { .. });
                let resp = handle(&mut gov, &status, req);
                if changes && resp.ok {
                    save_state(&gov, &state_path);
                }
                // A client that hung up does not want its answer.
                let _ = reply.send(resp);
                continue;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = &mut deadline => break,
        }
        let tick_start = std::time::Instant::now();
        match gov.tick() {
            Ok(v) => {
                status.tick += 1;
                status.vms = v.to_vec();
                status.ooms = gov.ooms();
                if let Some(p) = &placement {
                    // Feed the management MC VMs (one read of the limits'
                    // counters for both), and show what they decided so far.
                    let limits = gov.limits().unwrap_or_default();
                    let extras =
                        crate::manage::signals::Extras { mem_limit: gov.memory_limits(), drops: drops_by_vm(&limits) };
                    let now = std::time::Instant::now();
                    let (names, signals) = tracker.signals(now, &status.vms, &extras);
                    let passed = passed_bytes(&limits);
                    let qos = qos_meter.sample(now, &names, &status.vms, &passed, &qos_policies).unwrap_or_default();
                    p.monitor(status.tick, names, signals, qos);
                    let board = p.board();
                    let pending = std::mem::take(&mut board.lock().unwrap_or_else(|e| e.into_inner()).qos_pending);
                    if !pending.is_empty() {
                        let events = apply_qos(&mut gov, &qos_policies, pending);
                        events.iter().for_each(|e| live.qos_change(e));
                        save_state(&gov, &state_path);
                        // Fails only when the placement thread is gone (then nobody audits).
                        let _ = p.send(Command::QosApplied(events));
                    }
                    let b = board.lock().unwrap_or_else(|e| e.into_inner());
                    status.health = b.vms.values().cloned().collect();
                    status.logs = b.logs.clone();
                    let why: Vec<&str> = [&b.degraded, &b.log_degraded, &b.qos_degraded]
                        .into_iter()
                        .flatten()
                        .map(String::as_str)
                        .collect();
                    status.management_degraded = (!why.is_empty()).then(|| why.join("; "));
                }
                live.tick(tick_start.elapsed().as_secs_f64());
                if cfg.metrics_addr.is_some() {
                    let readings = crate::metrics::Readings {
                        status: status.clone(),
                        limits: gov.limits().unwrap_or_default(),
                        placement: placement.as_ref().and_then(Placement::latest),
                        programs: gov.program_stats(),
                        sched: gov.sched_fallbacks(),
                    };
                    // Fails only when the metrics server is gone (then nobody reads).
                    let _ = metrics_tx.send(std::sync::Arc::new(readings));
                }
                if print && status.tick > 1 {
                    println!("tick {}\n{}", status.tick, crate::sampler::table(&status.vms));
                }
            }
            // A VM whose cgroup went away must not stop the others'
            // telemetry; the error names the VM.
            Err(e) => tracing::warn!("sampling: {e:#}"),
        }
    }
    tracing::info!("shutting down: removing shaping, detaching programs, removing pins");
    drop(gov);
    drop(placement);
    Ok(())
}

/// Start the placement thread when MC VMs are configured, and add their
/// subtree to the watched VMs (name `mc`, role `mc`).
fn start_placement(
    mut cfg: Config,
    layout: &Layout,
    live: &crate::metrics::Live,
) -> Result<(Option<Placement>, Config)> {
    let (Some(p), Some(card)) = (&cfg.placement, &cfg.card) else { return Ok((None, cfg)) };
    if cfg.mc.is_empty() {
        return Ok((None, cfg));
    }
    let policy = p.policy()?;
    let specs = check_mcs(&cfg.mc)?;
    let vmm_bin = match &p.vmm {
        Some(v) => v.clone(),
        None => std::env::current_exe().context("locating the vmm binary next to the governor")?.with_file_name("vmm"),
    };
    if !vmm_bin.is_file() {
        anyhow::bail!("placement.vmm: {} is not a file (build it: cargo build --release -p vmm)", vmm_bin.display());
    }
    let agent = p.agent.clone().context("placement.agent: missing")?;
    if !agent.is_file() {
        anyhow::bail!("placement.agent: {} is not a file (build it: cargo xtask build-guest)", agent.display());
    }
    let opts = RuntimeOptions {
        specs,
        card_socket: card.socket.clone(),
        command_timeout: Duration::from_millis(card.command_timeout_ms),
        probe_timeout: Duration::from_millis(card.probe_timeout_ms),
        host: HostSiteOptions {
            vmm_bin,
            guest: agent,
            run_dir: p.run_dir.clone(),
            subtree: p.mc_cgroup.clone(),
            reserve: policy.reserve,
        },
        audit_log: p.audit_log.clone(),
        dry_run: cfg.dry_run,
        tick: Duration::from_millis(cfg.tick_ms),
        checkpoint: Duration::from_secs(p.checkpoint_s),
        precopy: p.precopy,
        logs: cfg.vms.iter().filter(|v| v.role == Role::User).map(|v| (v.name.clone(), v.logs.clone())).collect(),
        logs_dir: p.logs_dir.clone(),
        log_max_bytes: p.log_max_bytes,
        metrics: live.clone(),
        policy,
    };
    let mc_cgroup = p.mc_cgroup.clone();
    let placement = Placement::start(opts, layout).context("starting the placement engine")?;
    cfg.vms.push(VmConfig {
        name: MC_VM_NAME.into(),
        cgroup: mc_cgroup,
        interfaces: Vec::new(),
        role: Role::Mc,
        qos: Default::default(),
        logs: Vec::new(),
    });
    Ok((Some(placement), cfg))
}

/// Apply the qos VM's limit changes, each as one step (a change that cannot
/// be applied leaves that limit as it was and says why); the events for
/// the audit log.
fn apply_qos(
    gov: &mut Governor,
    policies: &crate::manage::qos::Policies,
    pending: Vec<crate::manage::board::PendingQos>,
) -> Vec<crate::placement::audit::QosEvent> {
    let before = gov.limits().unwrap_or_default();
    let mut events = Vec::with_capacity(pending.len());
    for p in pending {
        let policy = policies.get(&p.vm).copied().unwrap_or_default();
        let a = crate::manage::qos::action(&p.vm, &policy, &p.change);
        let before_bps = before.iter().find(|l| l.vm == a.vm && l.direction == a.direction).map(|l| l.rate_bps);
        let r = match a.limit {
            Some(l) => gov.set_limit(&a.vm, a.direction, l),
            None => gov.clear_limit(&a.vm, a.direction),
        };
        let rate_bps = a.limit.map(|l| l.rate_bps);
        match &r {
            Ok(()) => tracing::info!(
                vm = a.vm,
                direction = a.direction.as_str(),
                reason = a.reason,
                ?before_bps,
                ?rate_bps,
                "QoS limit changed by the qos VM"
            ),
            Err(e) => tracing::warn!(vm = a.vm, direction = a.direction.as_str(), "QoS limit change not applied: {e}"),
        }
        events.push(crate::placement::audit::QosEvent {
            kind: "qos".into(),
            time_ms: crate::placement::audit::now_ms(),
            vm: a.vm.clone(),
            direction: a.direction.as_str().into(),
            reason: a.reason.into(),
            detail: a.detail,
            rate_bps: if r.is_ok() { rate_bps } else { before_bps },
            before_bps,
            qos_vm: p.side,
            applied: r.is_ok(),
            error: r.err().map(|e| e.to_string()),
        });
    }
    events
}

/// Bytes passed so far per VM by its limits, (egress, ingress); None where
/// it has no limit.
fn passed_bytes(limits: &[LimitStatus]) -> std::collections::HashMap<String, [Option<u64>; 2]> {
    let mut out = std::collections::HashMap::new();
    for l in limits {
        let i = match l.direction {
            crate::qos::Direction::Egress => 0,
            crate::qos::Direction::Ingress => 1,
        };
        out.entry(l.vm.clone()).or_insert([None; 2])[i] = Some(l.passed_bytes);
    }
    out
}

/// Packets dropped so far per VM (both directions' QoS).
fn drops_by_vm(limits: &[LimitStatus]) -> std::collections::HashMap<String, u64> {
    let mut out = std::collections::HashMap::new();
    for l in limits {
        *out.entry(l.vm.clone()).or_insert(0) += l.dropped_packets;
    }
    out
}

/// Record the limits in force for a governor that takes over after a kill.
fn save_state(gov: &Governor, path: &Path) {
    match gov.limits() {
        Ok(l) => {
            if let Err(e) = crate::runstate::RunState::of(&l).save(path) {
                tracing::warn!(state = %path.display(), "saving the limits in force: {e}");
            }
        }
        Err(e) => tracing::warn!("reading the limits in force: {e}"),
    }
}

/// A governor error as the API answers it: the client named a VM that is
/// not there (404) or a limit the VM cannot have (400); else the governor
/// failed (500).
fn refused(e: crate::governor::GovernorError) -> Response {
    use crate::governor::GovernorError as E;
    let code = match &e {
        E::UnknownVm(_) => 404,
        E::Qos { .. } => 400,
        _ => 500,
    };
    let text = match &e {
        E::UnknownVm(_) => format!("vm: {e}"),
        _ => e.to_string(),
    };
    Response::refused(code, text)
}

fn handle(gov: &mut Governor, status: &Status, req: Request) -> Response {
    match req {
        Request::Status => Response { status: Some(status.clone()), ..Response::ok() },
        Request::SetLimit { vm, direction, limit } => {
            let field = format!("limit.{}", direction.as_str());
            match limit.check(&field) {
                Ok(l) => match gov.set_limit(&vm, direction, l) {
                    Ok(()) => Response::ok(),
                    Err(e) => refused(e),
                },
                Err(e) => Response::refused(400, e.to_string()),
            }
        }
        Request::ClearLimit { vm, direction } => match gov.clear_limit(&vm, direction) {
            Ok(()) => Response::ok(),
            Err(e) => refused(e),
        },
        Request::Limits => match gov.limits() {
            Ok(l) => Response { limits: Some(l), ..Response::ok() },
            Err(e) => Response::error(e.to_string()),
        },
        // Routed to the placement thread by the client task.
        Request::Placement
        | Request::Decisions { .. }
        | Request::Move { .. }
        | Request::Pin { .. }
        | Request::Unpin { .. } => Response::error("placement request sent to the sampling loop"),
    }
}

/// An exclusive flock on /run/governor/<what>-<name>.lock, held for the
/// life of the process (the kernel drops it if the process dies); the file
/// is removed when the lock is released, so a clean stop leaves none.
struct LockFile {
    path: PathBuf,
    _file: std::fs::File,
}

fn lock(what: &str, name: &str) -> Result<LockFile> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let dir = Path::new("/run/governor");
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let safe: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    let path = dir.join(format!("{what}-{safe}.lock"));
    loop {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            anyhow::bail!("another governor is using the same {what} ({name}); lock {}", path.display());
        }
        // The previous holder removes the file when it stops: if it did so
        // between our open and our flock, we hold a lock on a file nobody
        // else will see; take the one at the path instead.
        let same = match (f.metadata(), std::fs::metadata(&path)) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        };
        if same {
            return Ok(LockFile { path, _file: f });
        }
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        // Removed while still locked (the file closes after this), so no
        // other governor can be holding it.
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(lock = %self.path.display(), "removing the lock file: {e}");
        }
    }
}

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            tracing::warn!(socket = %self.0.display(), "removing the socket: {e}");
        }
    }
}
