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

/// The latest snapshot of each card-side MC VM, in files on the host.
pub struct Checkpoints {
    dir: PathBuf,
    taken: HashMap<String, (PathBuf, Instant)>,
}

impl Checkpoints {
    pub fn new(dir: PathBuf) -> anyhow::Result<Checkpoints> {
        std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("create {}: {e}", dir.display()))?;
        Ok(Checkpoints { dir, taken: HashMap::new() })
    }

    pub fn store(&mut self, task: &str, image: &[u8]) -> std::io::Result<()> {
        let path = self.dir.join(format!("{task}.snap"));
        let tmp = self.dir.join(format!("{task}.snap.tmp"));
        // Written whole, then renamed: a crash mid-write leaves the last one.
        std::fs::write(&tmp, image)?;
        std::fs::rename(&tmp, &path)?;
        self.taken.insert(task.to_string(), (path, Instant::now()));
        Ok(())
    }

    /// The latest checkpoint of a task and its age.
    pub fn get(&self, task: &str) -> Option<(Vec<u8>, Duration)> {
        let (path, at) = self.taken.get(task)?;
        match std::fs::read(path) {
            Ok(image) => Some((image, at.elapsed())),
            Err(e) => {
                tracing::warn!(task, "reading the checkpoint {}: {e}", path.display());
                None
            }
        }
    }

    pub fn age_ms(&self, task: &str) -> Option<u64> {
        self.taken.get(task).map(|(_, at)| at.elapsed().as_millis() as u64)
    }

    /// The task runs on the host now: its card checkpoint is stale.
    pub fn drop_task(&mut self, task: &str) {
        if let Some((path, _)) = self.taken.remove(task) {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(task, "removing the checkpoint {}: {e}", path.display());
            }
        }
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
                if let Err(e) = self.sites.card.card().check_health() {
                    self.card_died(e.to_string());
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

    /// Snapshot every card-side MC VM to the host (paused for the snapshot
    /// only; it resumes on the card).
    pub(super) fn checkpoint_all(&mut self) {
        if !matches!(self.card, CardState::Healthy) || self.engine.dry_run() {
            return;
        }
        for (task, _) in self.sites.card.tasks() {
            let t = Instant::now();
            let card = &mut self.sites.card;
            let image = card.pause(&task).and_then(|()| {
                let img = card.snapshot(&task);
                // Resume whatever the snapshot did: the VM must go on.
                card.resume(&task).and(img)
            });
            match image {
                Ok(img) => match self.checkpoints.store(&task, &img) {
                    Ok(()) => tracing::debug!(task, bytes = img.len(), ms = t.elapsed().as_millis(), "checkpoint"),
                    Err(e) => tracing::warn!(task, "storing the checkpoint: {e}"),
                },
                Err(e) => tracing::warn!(task, "checkpointing the card-side MC VM: {e}"),
            }
        }
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
        if let Some((image, age)) = self.checkpoints.get(task) {
            let host = &mut self.sites.host;
            let restored =
                host.prepare(task).and_then(|()| host.restore(task, &image)).and_then(|()| host.resume(task));
            self.checkpoints.drop_task(task);
            match restored {
                Ok(()) => return format!("restored on the host from its checkpoint {} ms old", age.as_millis()),
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
    /// the normal rules bring VMs back.
    fn try_card_back(&mut self) {
        let healthy_now = self.sites.card.card().check_health().is_ok();
        if !healthy_now {
            let o = &self.opts;
            let opts = CardOptions { command_timeout: o.command_timeout, ..CardOptions::default() };
            let back = card_link::connect_vfio_user(&o.card_socket, o.command_timeout, opts)
                .ok()
                .and_then(|mut c| c.check_health().is_ok().then_some(c));
            match back {
                Some(c) => {
                    let mut site = CardSite::new(c);
                    for s in &self.opts.specs {
                        site.register(&s.task, s.mem_mib as u32);
                    }
                    // The dead card's site has nothing to stop: forget_all ran.
                    self.sites.card = site;
                }
                None => {
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
