//! The management MC VMs' work at run time (claim 14), on the placement
//! thread: each exchange goes to the task's VM wherever it runs (card or
//! host), its answer checked whole; when the VM cannot answer, the board
//! says why and what is in force stays (fail static).

use super::audit::{HealthEvent, QosEvent};
use super::recovery::CardState;
use super::runtime::{side_name, wall_ms, Runtime};
use super::{Resource, Side};
use crate::manage::board::PendingQos;

impl Runtime {
    /// Log management: new lines from every followed file, then exchanges
    /// with the log MC VM where it runs until nothing waits (or it cannot
    /// take them: they wait, bounded, and the board says why).
    pub(super) fn logs_tick(&mut self) {
        const TASK: &str = "log";
        let Some(mut pipe) = self.log_pipe.take() else { return };
        pipe.capture();
        let mut why = None;
        if let Some(side) = self.engine.side(TASK) {
            for _ in 0..64 {
                let batch = pipe.batch();
                if batch.is_empty() {
                    break;
                }
                self.log_seq += 1;
                let acks = match side {
                    Side::Card if !matches!(self.card, CardState::Healthy) => {
                        Err(format!("its card is down ({})", self.card.describe()))
                    }
                    Side::Card => self.sites.card.log_take(TASK, self.log_seq, pipe.epoch, &batch),
                    Side::Host => self.sites.host.log_take(TASK, self.log_seq, pipe.epoch, &batch),
                };
                match acks.and_then(|a| pipe.acked(&a)) {
                    Ok(()) => {}
                    Err(e) => {
                        why = Some(format!("the log VM on the {} cannot take lines: {e}", side_name(side)));
                        break;
                    }
                }
            }
        }
        let mut board = self.board.lock().unwrap_or_else(|e| e.into_inner());
        if why.is_some() && board.log_degraded != why {
            tracing::warn!("log management degraded: {}", why.as_deref().unwrap_or_default());
        }
        board.log_degraded = why;
        board.logs = pipe.stats();
        drop(board);
        self.log_pipe = Some(pipe);
    }

    /// One monitor tick with the monitor MC VM where it runs; the board
    /// keeps the last states and says why when it cannot answer.
    pub(super) fn monitor(&mut self, seq: u64, names: &[String], signals: &[vmm::proto::signals::VmSignals]) {
        const TASK: &str = "monitor";
        let Some(side) = self.engine.side(TASK) else { return };
        let tick_ms = self.opts.tick.as_millis().clamp(100, 60_000) as u32;
        let answer = match side {
            Side::Card if !matches!(self.card, CardState::Healthy) => {
                Err(format!("its card is down ({})", self.card.describe()))
            }
            Side::Card => self.sites.card.monitor_tick(TASK, seq, tick_ms, signals),
            Side::Host => self.sites.host.monitor_tick(TASK, seq, tick_ms, signals),
        };
        let now = wall_ms();
        let mut board = self.board.lock().unwrap_or_else(|e| e.into_inner());
        match answer {
            Ok(changes) => {
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
                let why = format!("the monitor VM on the {} does not answer: {e}", side_name(side));
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
        let Some(side) = self.engine.side(TASK) else { return };
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
        self.qos_seq += 1;
        let answer = match side {
            Side::Card if !healthy => Err(format!("its card is down ({})", self.card.describe())),
            Side::Card => self.sites.card.qos_tick(TASK, self.qos_seq, (use_bp, thr_bp), batch),
            Side::Host => self.sites.host.qos_tick(TASK, self.qos_seq, (use_bp, thr_bp), batch),
        };
        let mut board = self.board.lock().unwrap_or_else(|e| e.into_inner());
        match answer {
            Ok(changes) => {
                board.qos_degraded = None;
                for c in changes {
                    let Some(vm) = names.get(c.slot as usize) else { continue };
                    board.qos_pending.push(PendingQos { vm: vm.clone(), change: c, side });
                }
            }
            Err(e) => {
                let why =
                    format!("the qos VM on the {} does not answer (limits stay as they are): {e}", side_name(side));
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
