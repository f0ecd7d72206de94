//! The placement engine at run time: one thread that owns the card link,
//! the host site and the engine. Every half heartbeat it checks the card's
//! health (a dead card is handled within three heartbeats, `recovery.rs`);
//! every tick it measures (card use, per-VM costs, host cgroups), decides,
//! moves and writes the audit record; every checkpoint period it streams a
//! snapshot of each card-side MC VM to the host. Operator commands (status,
//! decisions, move, pin) come in over a channel and are served between
//! those, so a move never interleaves with another.
//!
//! It runs apart from the telemetry loop: a slow card or a move of 100 ms
//! never delays per-VM sampling.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use card_link::CardOptions;
use cgroupfs::Layout;

use super::audit::{AuditLog, AuditRecord, MoveReport, ResourceView, DEFAULT_MAX_BYTES};
use super::card::CardSite;
use super::config::McSpec;
use super::engine::{Engine, Measured};
use super::host::{HostSite, HostSiteOptions};
use super::meter::{CardMeter, HostMeter};
use super::mover::{Site, Sites};
use super::recovery::{CardState, Checkpoints};
use super::{Decision, HostCost, Move, Policy, Reason, Refusal, Resource, Side};
use crate::manage::board::SharedBoard;

pub use super::status::{CardStatus, PlacementStatus, TaskStatus};

/// Everything the runtime needs, checked by the config.
#[derive(Clone, Debug)]
pub struct RuntimeOptions {
    pub policy: Policy,
    pub specs: Vec<McSpec>,
    pub card_socket: PathBuf,
    pub command_timeout: Duration,
    /// A health check's link round trip, and a reconnect, at most.
    pub probe_timeout: Duration,
    pub host: HostSiteOptions,
    pub audit_log: Option<PathBuf>,
    pub dry_run: bool,
    pub tick: Duration,
    pub checkpoint: Duration,
    pub precopy: bool,
    /// Each user VM's log files (slot = index), for the log MC VM.
    pub logs: Vec<(String, Vec<PathBuf>)>,
    pub logs_dir: PathBuf,
    pub log_max_bytes: u64,
    /// Moves and decisions are counted here as they happen (Prometheus).
    pub metrics: crate::metrics::Live,
}

/// An operator's request to the placement thread.
pub enum Command {
    Status(Sender<PlacementStatus>),
    /// Decisions after `after_tick` still held in memory (the last 1,024).
    Decisions {
        after_tick: u64,
        reply: Sender<Vec<AuditRecord>>,
    },
    Move {
        task: String,
        to: Side,
        reply: Sender<Result<AuditRecord, super::Refusal>>,
    },
    Pin {
        task: String,
        pin: bool,
        reply: Sender<Result<Option<Side>, super::Refusal>>,
    },
    /// Status monitoring: this tick's signals of the user VMs (named by
    /// slot) for the monitor MC VM, wherever it runs.
    Monitor {
        seq: u64,
        names: Vec<String>,
        signals: Vec<vmm::proto::signals::VmSignals>,
        /// The same VMs' rates and QoS policy, for the qos MC VM (empty when
        /// its period has not passed).
        qos: Vec<vmm::proto::qos::QosSignals>,
    },
    /// Limit changes the sampling loop applied (for the audit log).
    QosApplied(Vec<super::audit::QosEvent>),
    /// Stop the thread (API tasks may still hold senders, so the channel
    /// alone would not close).
    Stop,
}

/// The handle the daemon holds; dropping it stops the thread, which stops
/// every MC VM it started (card and host) and removes the MC subtree.
pub struct Placement {
    tx: Option<Sender<Command>>,
    /// The status after the thread's latest tick (Prometheus reads it
    /// without a round trip to the thread).
    latest: Arc<std::sync::Mutex<Option<PlacementStatus>>>,
    thread: Option<JoinHandle<()>>,
    board: SharedBoard,
    /// A monitor tick is queued or running (the next waits: never a backlog).
    monitoring: Arc<AtomicBool>,
}

const KEEP_RECORDS: usize = 1024;

pub(super) use super::audit::now_ms as wall_ms;

pub(super) struct Runtime {
    pub(super) opts: RuntimeOptions,
    pub(super) engine: Engine,
    pub(super) sites: Sites<CardSite, HostSite>,
    pub(super) card_meter: CardMeter,
    host_meter: HostMeter,
    pub(super) audit: Option<AuditLog>,
    records: VecDeque<AuditRecord>,
    pub(super) since: HashMap<String, u64>,
    last_move: HashMap<String, MoveReport>,
    pub(super) card: CardState,
    pub(super) checkpoints: Checkpoints,
    pub(super) status_card: PerResourceView,
    start: Instant,
    /// Wall time at `start`: records carry `wall_start_ms + now_ms`, so the
    /// intervals between them are the monotonic ones the engine decides on
    /// (two clocks read apart differ by up to a millisecond per interval,
    /// and a dwell of 2000 ms showed as 1999).
    wall_start_ms: u64,
    pub(super) board: SharedBoard,
    pub(super) monitoring: Arc<AtomicBool>,
    pub(super) log_pipe: Option<crate::manage::logs::LogPipe>,
    pub(super) log_seq: u64,
    pub(super) qos_seq: u64,
    /// The card's network use summed over the placement ticks since the
    /// last qos tick, and how many (the qos VM gets the mean).
    pub(super) card_net: (f64, u32),
    /// MC VMs stopped for their answers (or a fault), with why: not asked,
    /// moved or checkpointed again.
    pub(super) stopped: HashMap<String, String>,
    latest: Arc<std::sync::Mutex<Option<PlacementStatus>>>,
    /// The log positions last saved.
    pub(super) log_resume: Option<crate::manage::logs::Resume>,
}

pub(super) type PerResourceView = [f64; 4];

impl Placement {
    /// Connect to the card, make the host site, place every MC VM (pins
    /// first, then the board-card condition on the card's measured use) and
    /// start the thread.
    pub fn start(opts: RuntimeOptions, layout: &Layout) -> anyhow::Result<Placement> {
        use anyhow::Context;
        let mut rt = Runtime::new(opts, layout)?;
        rt.place_all().context("initial placement of the MC VMs")?;
        let (board, monitoring, latest) = (rt.board.clone(), rt.monitoring.clone(), rt.latest.clone());
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("placement".into())
            .spawn(move || rt.run(rx))
            .context("start the placement thread")?;
        Ok(Placement { tx: Some(tx), thread: Some(thread), board, monitoring, latest })
    }

    /// The placement status as of the thread's latest tick.
    pub fn latest(&self) -> Option<PlacementStatus> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The health board the monitor VM keeps up to date.
    pub fn board(&self) -> SharedBoard {
        self.board.clone()
    }

    /// Hand this tick's signals to the monitor VM, unless the previous
    /// tick's are still being handled (a move in progress): then this one
    /// is skipped, and the board says so if it lasts.
    pub fn monitor(
        &self,
        seq: u64,
        names: Vec<String>,
        signals: Vec<vmm::proto::signals::VmSignals>,
        qos: Vec<vmm::proto::qos::QosSignals>,
    ) {
        if self.monitoring.swap(true, Ordering::AcqRel) {
            return;
        }
        if self.send(Command::Monitor { seq, names, signals, qos }).is_none() {
            self.monitoring.store(false, Ordering::Release);
        }
    }

    /// Send a command; None when the thread is gone.
    pub fn send(&self, c: Command) -> Option<()> {
        self.tx.as_ref()?.send(c).ok()
    }

    /// A clone of the command channel (for the API's blocking tasks).
    pub fn sender(&self) -> Option<Sender<Command>> {
        self.tx.clone()
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            // A thread that is gone already has nothing to stop.
            let _ = tx.send(Command::Stop);
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::warn!("the placement thread panicked; its MC VMs were stopped by their guards");
            }
        }
    }
}

impl Runtime {
    fn new(opts: RuntimeOptions, layout: &Layout) -> anyhow::Result<Runtime> {
        use anyhow::Context;
        let card = card_link::connect_vfio_user(
            &opts.card_socket,
            opts.command_timeout,
            CardOptions {
                command_timeout: opts.command_timeout,
                probe_timeout: opts.probe_timeout,
                ..CardOptions::default()
            },
        )
        .with_context(|| {
            format!(
                "card.socket {}: the governor reaches the card there (is the card up? card-sim serves one with \
                 `card-sim --socket PATH`)",
                opts.card_socket.display()
            )
        })?;
        let mut card = CardSite::new(card);
        for s in &opts.specs {
            card.register(&s.task, s.mem_mib as u32);
        }
        let host = HostSite::new(opts.host.clone(), layout).context("the host's MC site")?;
        let audit = match &opts.audit_log {
            Some(p) => Some(
                AuditLog::open(p, DEFAULT_MAX_BYTES).with_context(|| format!("placement.audit_log {}", p.display()))?,
            ),
            None => None,
        };
        let checkpoints = Checkpoints::new(opts.host.run_dir.join("checkpoints"))?;
        let engine = Engine::new(opts.policy.clone(), &opts.specs, &[], opts.dry_run);
        let wants_logs = opts.specs.iter().any(|s| s.task == "log") && opts.logs.iter().any(|(_, f)| !f.is_empty());
        let log_pipe = if wants_logs {
            std::fs::create_dir_all(&opts.logs_dir)
                .with_context(|| format!("placement.logs_dir {}", opts.logs_dir.display()))?;
            // A new epoch each run: the log VM's numbering goes on past a restart.
            let epoch = (wall_ms() / 1000) as u32;
            Some(
                crate::manage::logs::LogPipe::new(
                    epoch,
                    &opts.logs,
                    &opts.logs_dir,
                    opts.log_max_bytes,
                    crate::manage::logs::Resume::load(&super::restart::log_resume_path(&opts)).as_ref(),
                )
                .with_context(|| format!("placement.logs_dir {}", opts.logs_dir.display()))?,
            )
        } else {
            None
        };
        Ok(Runtime {
            engine,
            sites: Sites { card, host },
            card_meter: CardMeter::default(),
            host_meter: HostMeter::default(),
            audit,
            records: VecDeque::new(),
            since: HashMap::new(),
            last_move: HashMap::new(),
            card: CardState::Healthy,
            checkpoints,
            status_card: [0.0; 4],
            start: Instant::now(),
            wall_start_ms: wall_ms(),
            board: SharedBoard::default(),
            monitoring: Arc::new(AtomicBool::new(false)),
            log_pipe,
            log_seq: 0,
            qos_seq: 0,
            card_net: (0.0, 0),
            stopped: HashMap::new(),
            latest: Arc::default(),
            log_resume: None,
            opts,
        })
    }

    pub(super) fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Two readings one heartbeat apart: the card's use before anything is
    /// placed on it.
    fn first_reading(&mut self) -> anyhow::Result<super::PerResource> {
        let card = self.sites.card.card();
        let period = Duration::from_millis(card.identity().heartbeat_period_ms as u64);
        self.card_meter.read(card)?;
        std::thread::sleep(period + Duration::from_millis(5));
        Ok(self.card_meter.read(self.sites.card.card())?.card)
    }

    fn place_all(&mut self) -> anyhow::Result<()> {
        let card_use = self.first_reading()?;
        let sides = Engine::initial(&self.opts.policy, &self.opts.specs, &card_use);
        let mut placed = Vec::new();
        let mut notes = Vec::new();
        let adopted = self.adopt_all();
        if !adopted.is_empty() {
            let what: Vec<String> = adopted.iter().map(|(t, s)| format!("{t} on the {}", side_name(*s))).collect();
            notes.push(format!("adopted from the governor before (still running): {}", what.join(", ")));
        }
        for (task, side) in &sides {
            if let Some((_, on)) = adopted.iter().find(|(t, _)| t == task) {
                placed.push((task.clone(), *on));
                continue;
            }
            let mem = self.opts.specs.iter().find(|s| &s.task == task).map_or(64, |s| s.mem_mib);
            let on = match side {
                Side::Card => match self.sites.card.cold_start(task, mem as u32) {
                    Ok(_) => Side::Card,
                    Err(e) => {
                        // A card that cannot take it (full, refusing): the host.
                        tracing::warn!(task, "starting on the card failed, starting on the host: {e}");
                        notes.push(format!("{task} could not start on the card ({e})"));
                        self.sites.host.cold_start(task, mem)?;
                        Side::Host
                    }
                },
                Side::Host => {
                    self.sites.host.cold_start(task, mem)?;
                    Side::Host
                }
            };
            placed.push((task.clone(), on));
        }
        let now = wall_ms();
        // Where they start is not a move: no dwell runs from it.
        self.engine = Engine::new(self.opts.policy.clone(), &self.opts.specs, &placed, self.opts.dry_run);
        self.engine.set_precopy(self.opts.precopy);
        for (task, _) in &placed {
            self.since.insert(task.clone(), now);
        }
        let holds = Resource::ALL.iter().all(|r| card_use[r.index()] <= self.opts.policy.thresholds[r.index()]);
        let mut explain = format!(
            "initial placement: the board-card condition {} ({}); {}",
            if holds { "holds" } else { "fails" },
            describe(&card_use),
            placed.iter().map(|(t, s)| format!("{t} on the {}", side_name(*s))).collect::<Vec<_>>().join(", ")
        );
        for n in notes {
            explain.push_str("; ");
            explain.push_str(&n);
        }
        let d = Decision {
            moves: placed.iter().map(|(t, s)| Move { task: t.clone(), to: *s }).collect(),
            reason: Reason::Initial,
            predicted: card_use,
            explain,
        };
        let m = self.measured(card_use, HashMap::new(), HashMap::new());
        let r = self.engine.record(&m, &d);
        self.publish(r);
        self.prepare_ahead();
        Ok(())
    }

    pub(super) fn measured(
        &self,
        card: super::PerResource,
        card_costs: HashMap<String, super::PerResource>,
        host_costs: HashMap<String, HostCost>,
    ) -> Measured {
        let now_ms = self.now_ms();
        Measured { now_ms, time_ms: self.wall_start_ms + now_ms, card, card_costs, host_costs, card_cpu_cores: 0.0 }
    }

    fn run(mut self, rx: Receiver<Command>) {
        // The control loop keeps its deadlines (health probes, moves, card
        // death) while user VMs load the host; the VMMs it starts do not
        // inherit the raise.
        if let Err(e) = cgroupfs::priority::raise_this_thread() {
            tracing::info!("placement: thread priority not raised ({e}); it shares the CPU with the host's load");
        }
        let tick = self.opts.tick;
        let mut next_tick = Instant::now() + tick;
        let mut next_health = Instant::now();
        let mut next_checkpoint = Instant::now() + self.opts.checkpoint;
        loop {
            let now = Instant::now();
            if matches!(self.card, CardState::Healthy) && self.sites.card.card().in_doubt() {
                // A command went unanswered or the link broke: judge the
                // card now, not half a heartbeat later.
                next_health = now;
            }
            let wake = next_tick.min(next_health).min(next_checkpoint);
            match rx.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(Command::Stop) => break,
                Ok(c) => {
                    self.serve(c);
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            if now >= next_health {
                let period = self.poll_health();
                next_health = now + period / 2;
            }
            if now >= next_checkpoint {
                self.checkpoint_all();
                next_checkpoint = now + self.opts.checkpoint;
            }
            if now >= next_tick {
                self.tick();
                next_tick = (next_tick + tick).max(now);
            }
            let st = self.status();
            *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(st);
        }
        tracing::info!("placement: stopping the MC VMs");
    }

    fn tick(&mut self) {
        self.logs_tick();
        if !matches!(self.card, CardState::Healthy) {
            return;
        }
        let reading = match self.card_meter.read(self.sites.card.card()) {
            Ok(r) => r,
            Err(e) => {
                // Health polling decides whether the card is dead; a tick
                // without a reading decides nothing.
                tracing::warn!("placement: reading the card: {e}");
                return;
            }
        };
        self.status_card = reading.card;
        let net = Resource::Network.index();
        self.card_net = (self.card_net.0 + reading.card[net], self.card_net.1 + 1);
        let card_costs = self
            .sites
            .card
            .tasks()
            .into_iter()
            .filter_map(|(task, id)| reading.vms.get(&id).map(|c| (task, *c)))
            .collect();
        let cgroups = self.sites.host.task_cgroups();
        let host_costs = self.host_meter.read(cgroups.iter().map(|(t, cg)| (t.as_str(), cg)));
        if !reading.rated {
            return;
        }
        let mut m = self.measured(reading.card, card_costs, host_costs);
        m.card_cpu_cores = reading.cpu_cores;
        let r = self.engine.step(&m, &mut self.sites);
        self.publish(r);
        self.prepare_ahead();
    }

    /// Keep an empty VMM ready on the host for every card-side MC VM, so a
    /// move to the host does not wait for a process to start (a dry run
    /// moves nothing and needs none).
    fn prepare_ahead(&mut self) {
        if self.engine.dry_run() {
            return;
        }
        for (task, _) in self.sites.card.tasks() {
            if let Err(e) = self.sites.host.prepare(&task) {
                tracing::warn!(task, "preparing a VMM on the host ahead of a move: {e}");
            }
        }
    }

    /// Keep the record (memory, audit log) and what it changed.
    pub(super) fn publish(&mut self, r: AuditRecord) {
        self.opts.metrics.decision(&r);
        for rep in &r.reports {
            // A move's pre-copy base reset the card VM's dirty log: its
            // checkpoint chain cannot take another diff.
            self.checkpoints.invalidate(&rep.task);
            if rep.ok {
                self.since.insert(rep.task.clone(), r.time_ms);
                if rep.to == Side::Host {
                    self.checkpoints.drop_task(&rep.task);
                }
            } else {
                tracing::warn!(task = rep.task, "move failed, the VM runs where it was: {:?}", rep.error);
            }
            self.last_move.insert(rep.task.clone(), rep.clone());
        }
        if !r.moves.is_empty() {
            tracing::info!(tick = r.tick, reason = ?r.reason, dry_run = r.dry_run, "{}", r.explain);
        }
        if let Some(a) = &mut self.audit {
            if let Err(e) = a.append(&r) {
                tracing::warn!("writing the audit log: {e}");
            }
        }
        if self.records.len() == KEEP_RECORDS {
            self.records.pop_front();
        }
        self.records.push_back(r);
    }

    fn serve(&mut self, c: Command) {
        // A client that went away does not want its answer.
        match c {
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Decisions { after_tick, reply } => {
                let _ = reply.send(self.records.iter().filter(|r| r.tick > after_tick).cloned().collect());
            }
            Command::Move { task, to, reply } => {
                let r = self.known(&task).and_then(|()| self.manual_move(&task, to).map_err(Refusal::NotNow));
                let _ = reply.send(r);
            }
            Command::Pin { task, pin, reply } => {
                let r = self.known(&task).and_then(|()| match self.stopped.get(&task) {
                    Some(why) => Err(Refusal::NotNow(format!("task: {task}'s VM was stopped ({why})"))),
                    None => self.engine.pin(&task, pin).map_err(Refusal::NotNow),
                });
                let _ = reply.send(r);
            }
            Command::Monitor { seq, names, signals, qos } => {
                self.monitor(seq, &names, &signals);
                self.qos(&names, &qos);
                self.monitoring.store(false, Ordering::Release);
            }
            Command::QosApplied(events) => self.qos_applied(&events),
            Command::Stop => {}
        }
    }

    fn known(&self, task: &str) -> Result<(), Refusal> {
        match self.engine.side(task) {
            Some(_) => Ok(()),
            None => Err(Refusal::NoTask(format!("task: no MC VM for {task:?}"))),
        }
    }

    fn manual_move(&mut self, task: &str, to: Side) -> Result<AuditRecord, String> {
        if let Some(why) = self.stopped.get(task) {
            return Err(format!("task: {task}'s VM was stopped ({why})"));
        }
        if to == Side::Card && !matches!(self.card, CardState::Healthy) {
            return Err(format!("to: the card is not healthy ({})", self.card.describe()));
        }
        let m = self.measured(self.status_card, HashMap::new(), HashMap::new());
        let r = self.engine.manual_move(task, to, &m, &mut self.sites)?;
        self.publish(r.clone());
        Ok(r)
    }

    fn status(&self) -> PlacementStatus {
        let policy = self.engine.policy();
        PlacementStatus {
            dry_run: self.engine.dry_run(),
            tick: self.records.back().map_or(0, |r| r.tick),
            card: CardStatus {
                healthy: matches!(self.card, CardState::Healthy),
                error: (!matches!(self.card, CardState::Healthy)).then(|| self.card.describe()),
                link: Some(self.sites.card.link().to_string()),
                resources: Resource::ALL
                    .iter()
                    .map(|r| ResourceView {
                        resource: *r,
                        used: self.status_card[r.index()],
                        threshold: policy.thresholds[r.index()],
                    })
                    .collect(),
            },
            tasks: self
                .engine
                .tasks()
                .iter()
                .map(|t| TaskStatus {
                    task: t.name.clone(),
                    side: t.side,
                    since_ms: self.since.get(&t.name).copied().unwrap_or(0),
                    card_cost: t.card_cost,
                    host_cost: t.host_cost,
                    pinned: t.pin,
                    card_vm: self.sites.card.vm_id(&t.name),
                    host_socket: self.sites.host.live_socket(&t.name).map(Path::to_path_buf),
                    checkpoint_age_ms: (t.side == Side::Card).then(|| self.checkpoints.age_ms(&t.name)).flatten(),
                    last_move: self.last_move.get(&t.name).cloned(),
                    stopped: self.stopped.get(&t.name).cloned(),
                })
                .collect(),
        }
    }
}

pub(super) fn side_name(s: Side) -> &'static str {
    match s {
        Side::Card => "card",
        Side::Host => "host",
    }
}

pub(super) fn describe(p: &super::PerResource) -> String {
    Resource::ALL.iter().map(|r| format!("{} {:.0}%", r.name(), p[r.index()] * 100.0)).collect::<Vec<_>>().join(", ")
}
