//! The management MC VMs' work at run time (claim 14), on the placement
//! thread: each exchange goes to the task's VM wherever it runs (card or
//! host), its answer checked whole; when the VM cannot answer, the board
//! says why and what is in force stays (fail static).

use super::audit::{HealthEvent, McStoppedEvent, QosEvent};
use super::mover::Site;
use super::recovery::CardState;
use super::runtime::{side_name, wall_ms, Runtime};
use super::{Resource, Side};
use crate::manage::board::PendingQos;

/// Why an exchange with a task's agent failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentError {
    /// The VM stopped: its VMM (on the host or the card) stopped it for a
    /// malformed answer or a fault, or its answer passed the VMM's checks
    /// but not the governor's. Final: it is not asked again.
    Stopped(String),
    /// Not now (no VM there, busy, slow, a link error): the next tick asks again.
    Unavailable(String),
}

impl AgentError {
    /// A vmm control-socket error: `Stopped` when the VM stopped.
    pub fn from_vmm(e: vmm::Error) -> AgentError {
        if e.kind() == vmm::host::api::ErrorKind::Stopped {
            AgentError::Stopped(e.to_string())
        } else {
            AgentError::Unavailable(e.to_string())
        }
    }
}

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentError::Stopped(why) => write!(f, "stopped: {why}"),
            AgentError::Unavailable(why) => f.write_str(why),
        }
    }
}

impl From<String> for AgentError {
    fn from(why: String) -> AgentError {
        AgentError::Unavailable(why)
    }
}

impl Runtime {
    /// Where `task`'s VM can be asked now, or why not (none configured:
    /// `None`).
    fn reachable(&self, task: &str) -> Option<Result<Side, String>> {
        let side = self.engine.side(task)?;
        Some(if let Some(why) = self.stopped.get(task) {
            Err(format!("it was stopped ({why})"))
        } else if side == Side::Card && !matches!(self.card, CardState::Healthy) {
            Err(format!("its card is down ({})", self.card.describe()))
        } else {
            Ok(side)
        })
    }

    /// An exchange with `task`'s VM on `side` failed: the reason to show.
    /// A VM that stopped (or whose answer the governor refused) is
    /// stopped for good: released where it ran, held there by the engine,
    /// recorded in the audit log and in the placement status; the other
    /// MC VMs and the governor go on.
    fn failed(&mut self, task: &str, side: Side, e: AgentError) -> String {
        let why = match e {
            AgentError::Unavailable(why) => return why,
            AgentError::Stopped(why) => why,
        };
        tracing::error!(task, side = side_name(side), "the MC VM is stopped: {why}");
        let released = match side {
            Side::Card => self.sites.card.release(task),
            Side::Host => self.sites.host.release(task),
        };
        if let Err(e) = released {
            tracing::warn!(task, "releasing the stopped MC VM: {e}");
        }
        self.checkpoints.drop_task(task);
        if let Err(e) = self.engine.pin(task, true) {
            tracing::warn!(task, "holding the stopped MC VM in place: {e}");
        }
        if let Some(log) = &mut self.audit {
            let ev = McStoppedEvent {
                kind: "mc_stopped".into(),
                time_ms: wall_ms(),
                task: task.into(),
                side,
                reason: why.clone(),
            };
            if let Err(e) = log.append_json(&ev) {
                tracing::warn!("writing the audit log: {e}");
            }
        }
        self.stopped.insert(task.to_string(), why.clone());
        format!("it was stopped ({why})")
    }

    /// Log management: new lines from every followed file, then exchanges
    /// with the log MC VM where it runs until nothing waits (or it cannot
    /// take them: they wait, bounded, and the board says why).
    pub(super) fn logs_tick(&mut self) {
        const TASK: &str = "log";
        let Some(mut pipe) = self.log_pipe.take() else { return };
        pipe.capture();
        let mut why = None;
        match self.reachable(TASK) {
            None => {}
            Some(Err(e)) => why = Some(e),
            Some(Ok(side)) => {
                for _ in 0..64 {
                    let batch = pipe.batch();
                    if batch.is_empty() {
                        break;
                    }
                    self.log_seq += 1;
                    let acks = match side {
                        Side::Card => self.sites.card.log_take(TASK, self.log_seq, pipe.epoch, &batch),
                        Side::Host => self.sites.host.log_take(TASK, self.log_seq, pipe.epoch, &batch),
                    };
                    if let Err(e) = acks.and_then(|a| pipe.acked(&a).map_err(AgentError::Unavailable)) {
                        why = Some(self.failed(TASK, side, e));
                        break;
                    }
                }
            }
        }
        if let Some(w) = &mut why {
            *w = format!("the log VM cannot take lines: {w}");
        }
        let mut board = self.board.lock().unwrap_or_else(|e| e.into_inner());
        if why.is_some() && board.log_degraded != why {
            tracing::warn!("log management degraded: {}", why.as_deref().unwrap_or_default());
        }
        board.log_degraded = why;
        board.logs = pipe.stats();
        drop(board);
        self.log_pipe = Some(pipe);
        self.save_log_resume();
    }

    /// One monitor tick with the monitor MC VM where it runs; the board
    /// keeps the last states and says why when it cannot answer.
    pub(super) fn monitor(&mut self, seq: u64, names: &[String], signals: &[vmm::proto::signals::VmSignals]) {
        const TASK: &str = "monitor";
        let tick_ms = self.opts.tick.as_millis().clamp(100, 60_000) as u32;
        let answer = match self.reachable(TASK) {
            None => return,
            Some(Err(e)) => Err(e),
            Some(Ok(side)) => {
                let r = match side {
                    Side::Card => self.sites.card.monitor_tick(TASK, seq, tick_ms, signals),
                    Side::Host => self.sites.host.monitor_tick(TASK, seq, tick_ms, signals),
                };
                r.map(|c| (c, side)).map_err(|e| self.failed(TASK, side, e))
            }
        };
        let now = wall_ms();
        let mut board = self.board.lock().unwrap_or_else(|e| e.into_inner());
        match answer {
            Ok((changes, side)) => {
                board.apply(names, &changes, now);
                for c in &changes {
                    let Some(h) = names.get(c.slot as usize).and_then(|n| board.vms.get(n)) else { continue };
                    tracing::info!(vm = h.vm, health = h.health, reason = h.reason, detail = h.detail, "health");
                    if let Some(log) = &mut self.audit {
                        let ev = HealthEvent {
                            kind: "health".into(),
                            time_ms: now,
                            vm: h.vm.clone(),
                            health: h.health.clone(),
                            reason: h.reason.clone(),
                            detail: h.detail,
                            monitor: side,
                        };
                        if let Err(e) = log.append_json(&ev) {
                            tracing::warn!("writing the audit log: {e}");
                        }
                    }
                }
            }
            Err(e) => {
                let why = format!("the monitor VM does not answer: {e}");
                if board.degraded.as_deref() != Some(why.as_str()) {
                    tracing::warn!("management degraded: {why}");
                }
                board.degraded = Some(why);
            }
        }
    }

    /// One QoS-policy tick with the qos MC VM where it runs: its limit
    /// changes go to the board for the sampling loop to apply.
    pub(super) fn qos(&mut self, names: &[String], batch: &[vmm::proto::qos::QosSignals]) {
        const TASK: &str = "qos";
        if batch.is_empty() {
            return;
        }
        let net = Resource::Network.index();
        // The mean over the period; a card that is down carries no user traffic.
        let healthy = matches!(self.card, CardState::Healthy);
        let (sum, n) = std::mem::take(&mut self.card_net);
        let mean = if n > 0 { sum / n as f64 } else { self.status_card[net] };
        let use_bp = if healthy { (mean * 10_000.0).round().clamp(0.0, 65_535.0) as u32 } else { 0 };
        let thr_bp = (self.engine.policy().thresholds[net] * 10_000.0).round().clamp(1.0, 10_000.0) as u32;
        let answer = match self.reachable(TASK) {
            None => return,
            Some(Err(e)) => Err(e),
            Some(Ok(side)) => {
                self.qos_seq += 1;
                let r = match side {
                    Side::Card => self.sites.card.qos_tick(TASK, self.qos_seq, (use_bp, thr_bp), batch),
                    Side::Host => self.sites.host.qos_tick(TASK, self.qos_seq, (use_bp, thr_bp), batch),
                };
                r.map(|c| (c, side)).map_err(|e| self.failed(TASK, side, e))
            }
        };
        let mut board = self.board.lock().unwrap_or_else(|e| e.into_inner());
        match answer {
            Ok((changes, side)) => {
                board.qos_degraded = None;
                for c in changes {
                    let Some(vm) = names.get(c.slot as usize) else { continue };
                    board.qos_pending.push(PendingQos { vm: vm.clone(), change: c, side });
                }
            }
            Err(e) => {
                let why = format!("the qos VM does not answer (limits stay as they are): {e}");
                if board.qos_degraded.as_deref() != Some(why.as_str()) {
                    tracing::warn!("QoS policy degraded: {why}");
                }
                board.qos_degraded = Some(why);
            }
        }
    }
    /// The sampling loop applied limit changes: into the audit log.
    pub(super) fn qos_applied(&mut self, events: &[QosEvent]) {
        for ev in events {
            if let Some(log) = &mut self.audit {
                if let Err(e) = log.append_json(ev) {
                    tracing::warn!("writing the audit log: {e}");
                }
            }
        }
    }
}
