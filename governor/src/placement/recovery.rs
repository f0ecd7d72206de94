//! When the card dies: checkpoints of card-side MC VMs kept on the host,
//! health polled every half heartbeat, and on a dead card (stalled, silent,
//! crashed, garbage or failed registers) every card-side MC VM brought up
//! on the host from its latest checkpoint, or cold when it has none. The
//! decision log says which, and how old each checkpoint was.
//!
//! While the card is down the governor reconnects once a second; when it is
//! healthy again, any VM of ours still on it (a stalled card's copies ran
//! on, unfenced) is stopped before the normal rules may bring VMs back, so
//! a task never runs twice once the card answers. Until it answers, a
//! stalled card's copy cannot be stopped from the host (a real card would
//! be reset by a PCI function-level reset; vfio-user has none).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use card_link::CardOptions;

use super::card::CardSite;
use super::mover::Site;
use super::runtime::{wall_ms, Runtime};
use super::{Decision, Move, Reason, Side};

/// What the runtime knows of the card.
pub enum CardState {
    Healthy,
    Down { error: String, since: Instant, next_try: Instant },
}

impl CardState {
    pub fn describe(&self) -> String {
        match self {
            CardState::Healthy => "healthy".into(),
            CardState::Down { error, since, .. } => format!("down for {:.1} s: {error}", since.elapsed().as_secs_f64()),
        }
    }
}

/// Most diffs chained on one base before the next checkpoint takes a new
/// base (a restore applies them all; a longer chain restores slower).
const MAX_DIFFS: usize = 10;

/// One card-side MC VM's checkpoint on the host: a base and the diffs
/// taken after it, oldest first; restoring the base and applying them in
/// order gives the VM as it was at the last diff.
struct Chain {
    base: PathBuf,
    diffs: Vec<PathBuf>,
    /// When the last diff (or base) was taken.
    at: Instant,
    /// The card VM's dirty log was reset by something else (a pre-copy
    /// move's base): the next checkpoint must start a new chain.
    rebase: bool,
}

/// The checkpoints of card-side MC VMs, in files on the host. The first
/// checkpoint of a chain is a live base (copied while the VM runs) and a
/// diff taken paused; later ones are only diffs, so a checkpoint pauses
/// the VM for what it wrote since the last one, and streams only that.
pub struct Checkpoints {
    dir: PathBuf,
    chains: HashMap<String, Chain>,
    seq: u64,
}

/// What a checkpoint restores from.
pub struct Restorable {
    pub base: PathBuf,
    pub diffs: Vec<PathBuf>,
    pub age: Duration,
}

impl Checkpoints {
    pub fn new(dir: PathBuf) -> anyhow::Result<Checkpoints> {
        std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("create {}: {e}", dir.display()))?;
        Ok(Checkpoints { dir, chains: HashMap::new(), seq: 0 })
    }

    /// Whether the next checkpoint of `task` must take a new base.
    pub fn needs_base(&self, task: &str) -> bool {
        self.chains.get(task).is_none_or(|c| c.rebase || c.diffs.len() >= MAX_DIFFS)
    }

    fn write(&mut self, task: &str, what: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
        self.seq += 1;
        let path = self.dir.join(format!("{task}.{}.{what}", self.seq));
        std::fs::write(&path, bytes)?;
        Ok(path)
    }

    /// A new chain (the old one goes once this one is written).
    pub fn start_chain(&mut self, task: &str, base: &[u8], diff: Option<&[u8]>) -> std::io::Result<()> {
        let base = self.write(task, "base", base)?;
        let diffs = match diff {
            Some(d) => vec![self.write(task, "diff", d)?],
            None => Vec::new(),
        };
        let old = self.chains.insert(task.to_string(), Chain { base, diffs, at: Instant::now(), rebase: false });
        if let Some(old) = old {
            remove_chain(task, old);
        }
        Ok(())
    }

    pub fn push_diff(&mut self, task: &str, diff: &[u8]) -> std::io::Result<()> {
        let path = self.write(task, "diff", diff)?;
        match self.chains.get_mut(task) {
            Some(c) => {
                c.diffs.push(path);
                c.at = Instant::now();
                Ok(())
            }
            None => {
                remove_file(task, &path);
                Err(std::io::Error::other("a diff without a base"))
            }
        }
    }

    /// The latest checkpoint of a task.
    pub fn get(&self, task: &str) -> Option<Restorable> {
        let c = self.chains.get(task)?;
        Some(Restorable { base: c.base.clone(), diffs: c.diffs.clone(), age: c.at.elapsed() })
    }

    pub fn age_ms(&self, task: &str) -> Option<u64> {
        self.chains.get(task).map(|c| c.at.elapsed().as_millis() as u64)
    }

    /// Something reset the VM's dirty log: keep the chain for a recovery
    /// until the next checkpoint, which starts a new one.
    pub fn invalidate(&mut self, task: &str) {
        if let Some(c) = self.chains.get_mut(task) {
            c.rebase = true;
        }
    }

    /// The task runs on the host now: its card checkpoint is stale.
    pub fn drop_task(&mut self, task: &str) {
        if let Some(c) = self.chains.remove(task) {
            remove_chain(task, c);
        }
    }
}

fn remove_file(task: &str, path: &std::path::Path) {
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(task, "removing the checkpoint file {}: {e}", path.display());
    }
}

fn remove_chain(task: &str, c: Chain) {
    for p in std::iter::once(&c.base).chain(&c.diffs) {
        remove_file(task, p);
    }
}

impl Drop for Checkpoints {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing the checkpoints {}: {e}", self.dir.display());
            }
        }
    }
}

impl Runtime {
    /// Check the card's health; returns the heartbeat period (the next
    /// check is due in half of it).
    pub(super) fn poll_health(&mut self) -> Duration {
        let period = Duration::from_millis(self.sites.card.card().identity().heartbeat_period_ms as u64);
        match &self.card {
            CardState::Healthy => {
                let t = Instant::now();
                let r = self.sites.card.card().check_health();
                self.opts.metrics.card_health_check(t.elapsed().as_secs_f64());
                match r {
                    Ok(h) if h.late_beat => {
                        tracing::warn!(
                            "placement: the card's heartbeat was late ({} ms without a beat) but the card answers",
                            h.since_beat.as_millis()
                        );
                        self.opts.metrics.card_link_event("late_heartbeat");
                    }
                    Ok(h) if h.unanswered > 0 => {
                        tracing::warn!(
                            "placement: the card's mailbox has not answered {} command(s) given up on; its heartbeat \
                             and link go on (a slow card, not a dead one)",
                            h.unanswered
                        );
                    }
                    Ok(_) => {}
                    Err(e) => self.card_unwell(e),
                }
                period
            }
            CardState::Down { next_try, .. } => {
                if Instant::now() >= *next_try {
                    self.try_card_back();
                }
                period.max(Duration::from_millis(200))
            }
        }
    }

    /// A failed health check. A link that failed (no answer within the
    /// probe bound, closed, a malformed reply) gets one new connection,
    /// bounded by the probe timeout too: a card that answers on it, is the
    /// same card (serial, heartbeat not restarted) and still holds our MC
    /// VMs was only slow, and the new link replaces the old. Anything else
    /// (a frozen heartbeat with an unanswering mailbox, a failed or
    /// garbled card, a failed reconnect) is a dead card.
    fn card_unwell(&mut self, e: card_link::CardError) {
        use card_link::CardError as E;
        let link_failed = matches!(e, E::Timeout { .. } | E::LinkBroken(_) | E::Io { .. });
        if !link_failed {
            self.card_died(e.to_string());
            return;
        }
        match self.relink() {
            Ok(()) => {
                tracing::warn!(
                    "placement: the card link failed ({e}); reconnected, the card answers and holds its MC VMs"
                );
                self.opts.metrics.card_link_event("reconnected");
            }
            Err(again) => self.card_died(format!("{e}; a new connection failed too: {again}")),
        }
    }

    /// Close the card link and open a new one (see `card_unwell`).
    fn relink(&mut self) -> Result<(), String> {
        let (serial, beat) = {
            let old = self.sites.card.card();
            let serial = old.identity().serial;
            let beat = old.last_heartbeat();
            old.close("replaced by a new connection");
            (serial, beat)
        };
        let mut card = self.connect_card().map_err(|e| e.to_string())?;
        let h = card.check_health().map_err(|e| e.to_string())?;
        if card.identity().serial != serial || h.heartbeat < beat {
            return Err(format!(
                "another card answers (serial {:#x}, heartbeat {}; was {serial:#x} at {beat}): its MC VMs are gone",
                card.identity().serial,
                h.heartbeat
            ));
        }
        let probe = self.opts.probe_timeout;
        let list = card.with_command_timeout(probe, |c| c.list_vms()).map_err(|e| e.to_string())?;
        for (task, id) in self.sites.card.tasks() {
            let there = list.iter().any(|v| {
                v.id == id
                    && matches!(v.state, card_link::mailbox::VmState::Running | card_link::mailbox::VmState::Paused)
            });
            if !there {
                return Err(format!("{task}'s VM {id} is no longer on the card"));
            }
        }
        card.set_link_timeout(self.opts.command_timeout);
        self.sites.card.replace_card(card);
        Ok(())
    }

    /// A new link to the card, every exchange of its opening bounded by
    /// the probe timeout (a silent card costs that, and no thread or
    /// socket is left behind), later ones by the command timeout.
    fn connect_card(&self) -> Result<card_link::Card, card_link::CardError> {
        let o = &self.opts;
        let opts =
            CardOptions { command_timeout: o.command_timeout, probe_timeout: o.probe_timeout, ..Default::default() };
        let mut card = card_link::connect_vfio_user(&o.card_socket, o.probe_timeout, opts)?;
        card.set_link_timeout(o.command_timeout);
        Ok(card)
    }

    /// Checkpoint every card-side MC VM to the host: a diff of what it
    /// wrote since its last checkpoint (paused only for that), or, to start
    /// a chain, a base copied while it runs plus such a diff. A card
    /// without pre-copy gets full snapshots, paused.
    pub(super) fn checkpoint_all(&mut self) {
        if !matches!(self.card, CardState::Healthy) || self.engine.dry_run() {
            return;
        }
        for (task, _) in self.sites.card.tasks() {
            let t = Instant::now();
            let r = self.checkpoint(&task);
            match r {
                Ok(what) => tracing::debug!(task, ms = t.elapsed().as_millis(), "checkpoint: {what}"),
                Err(e) => tracing::warn!(task, "checkpointing the card-side MC VM: {e}"),
            }
            if self.sites.card.card().in_doubt() {
                // The card did not answer: its health is judged first (the
                // other checkpoints wait for the next round).
                break;
            }
        }
    }

    fn checkpoint(&mut self, task: &str) -> Result<&'static str, String> {
        let base = if self.checkpoints.needs_base(task) {
            match self.sites.card.snapshot_live(task)? {
                Some(b) => Some(b),
                None => {
                    let full = self.paused(task, |c, t| c.snapshot(t))?;
                    self.checkpoints.start_chain(task, &full, None).map_err(|e| e.to_string())?;
                    return Ok("full snapshot");
                }
            }
        } else {
            None
        };
        let diff = self.paused(task, |c, t| c.snapshot_diff(t))?;
        match base {
            Some(b) => {
                self.checkpoints.start_chain(task, &b, Some(&diff)).map_err(|e| e.to_string())?;
                Ok("new base and diff")
            }
            None => {
                self.checkpoints.push_diff(task, &diff).map_err(|e| e.to_string())?;
                Ok("diff")
            }
        }
    }

    /// `f` on the card-side VM paused, resumed whatever `f` did.
    fn paused(
        &mut self,
        task: &str,
        f: impl FnOnce(&mut CardSite, &str) -> Result<Vec<u8>, String>,
    ) -> Result<Vec<u8>, String> {
        let card = &mut self.sites.card;
        card.pause(task)?;
        let img = f(card, task);
        // The VM must go on.
        card.resume(task).and(img)
    }

    /// The card is dead: bring every card-side MC VM up on the host.
    fn card_died(&mut self, error: String) {
        tracing::error!("placement: the card is dead ({error}); bringing its MC VMs up on the host");
        let now = Instant::now();
        self.card = CardState::Down { error: error.clone(), since: now, next_try: now + Duration::from_secs(1) };
        let tasks = self.sites.card.forget_all();
        let mut notes = Vec::new();
        let mut moves = Vec::new();
        for task in tasks {
            let how = self.bring_up_on_host(&task);
            notes.push(format!("{task}: {how}"));
            self.engine.set_side(&task, Side::Host, self.now_ms());
            self.since.insert(task.clone(), wall_ms());
            moves.push(Move { task, to: Side::Host });
        }
        self.card_meter.reset();
        let d = Decision {
            moves,
            reason: Reason::CardDead,
            predicted: [0.0; 4],
            explain: format!(
                "the card is dead ({error}); {}",
                if notes.is_empty() { "no MC VM ran on it".into() } else { notes.join("; ") }
            ),
        };
        let m = self.measured([0.0; 4], HashMap::new(), HashMap::new());
        let r = self.engine.record(&m, &d);
        self.publish(r);
    }

    /// Restore from the checkpoint (or start cold) on the host; says how.
    fn bring_up_on_host(&mut self, task: &str) -> String {
        let mem = self.opts.specs.iter().find(|s| s.task == task).map_or(64, |s| s.mem_mib);
        if let Some(cp) = self.checkpoints.get(task) {
            let host = &mut self.sites.host;
            let t = Instant::now();
            let mut took = Vec::new();
            let restored = host
                .prepare(task)
                .and_then(|()| {
                    took.push(("prepare", t.elapsed()));
                    host.restore_chain(task, &cp.base, &cp.diffs)
                })
                .and_then(|()| {
                    took.push(("restore", t.elapsed()));
                    host.resume(task)
                });
            if t.elapsed() > Duration::from_secs(1) {
                tracing::warn!(
                    task,
                    "bringing the MC VM up on the host took {:?} (steps done at {took:?})",
                    t.elapsed()
                );
            }
            self.checkpoints.drop_task(task);
            match restored {
                Ok(()) => {
                    return format!(
                        "restored on the host from its checkpoint {} ms old (a base and {} diffs)",
                        cp.age.as_millis(),
                        cp.diffs.len()
                    )
                }
                Err(e) => tracing::warn!(task, "restoring the checkpoint failed, starting cold: {e}"),
            }
        }
        match self.sites.host.cold_start(task, mem) {
            Ok(()) => "started cold on the host (no usable checkpoint)".into(),
            Err(e) => {
                tracing::error!(task, "cannot start the MC VM on the host: {e}");
                format!("LOST: cannot start on the host ({e})")
            }
        }
    }

    /// Reconnect (a crashed card comes back as a new process on the same
    /// socket) and check health; when healthy, fence our old copies and let
    /// the normal rules bring VMs back. The old link is closed before a new
    /// one is tried (a card serves one host connection at a time), and a
    /// try costs at most the probe timeout.
    fn try_card_back(&mut self) {
        let healthy_now = self.sites.card.card().check_health().is_ok();
        if !healthy_now {
            self.sites.card.card().close("the card is down; reconnecting");
            match self.connect_card().and_then(|mut c| c.check_health().map(|_| c)) {
                Ok(c) => {
                    let mut site = CardSite::new(c);
                    for s in &self.opts.specs {
                        site.register(&s.task, s.mem_mib as u32);
                    }
                    // The dead card's site has nothing to stop: forget_all ran.
                    self.sites.card = site;
                }
                Err(e) => {
                    tracing::debug!("placement: the card is still down: {e}");
                    if let CardState::Down { next_try, .. } = &mut self.card {
                        *next_try = Instant::now() + Duration::from_secs(1);
                    }
                    return;
                }
            }
        }
        let fenced = self.fence();
        let was = self.card.describe();
        self.card = CardState::Healthy;
        self.card_meter.reset();
        let d = Decision {
            moves: Vec::new(),
            reason: Reason::CardBack,
            predicted: [0.0; 4],
            explain: format!(
                "the card is healthy again (was {was}){}; MC VMs come back by the normal rules",
                if fenced.is_empty() {
                    String::new()
                } else {
                    format!("; stopped stale copies: {}", fenced.join(", "))
                }
            ),
        };
        tracing::info!("placement: {}", d.explain);
        let m = self.measured([0.0; 4], HashMap::new(), HashMap::new());
        let r = self.engine.record(&m, &d);
        self.publish(r);
    }

    /// Stop every VM on the card named after one of our tasks that this
    /// site does not hold (copies left from before the card died).
    fn fence(&mut self) -> Vec<String> {
        let ours: Vec<u32> = self.sites.card.tasks().iter().map(|(_, id)| *id).collect();
        let card = self.sites.card.card();
        let list = match card.list_vms() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("listing the card's VMs to fence stale copies: {e}");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for v in list {
            if self.opts.specs.iter().any(|s| s.task == v.name) && !ours.contains(&v.id) {
                match card.stop_vm(v.id) {
                    Ok(()) => out.push(format!("{} (VM {})", v.name, v.id)),
                    Err(e) => tracing::warn!(vm = v.id, "stopping a stale copy of {}: {e}", v.name),
                }
            }
        }
        out
    }
}
