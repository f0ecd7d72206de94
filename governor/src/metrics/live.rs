//! Metrics that are events rather than readings (moves, decisions, QoS
//! changes, tick durations): counted and observed as they happen, by the
//! placement thread and the sampling loop, into prometheus-client families.
//! The families are Arc-backed, so each scrape's fresh registry registers
//! clones of the same ones and nothing is reset between scrapes.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::placement::audit::{AuditRecord, QosEvent};
use crate::placement::Side;

type Labels = Vec<(&'static str, String)>;
type Counters = Family<Labels, Counter<f64, AtomicU64>>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

fn move_buckets() -> Histogram {
    // 1 ms .. 33 s: a pre-copy move of a small VM to a cold start.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn pause_buckets() -> Histogram {
    // 0.25 ms .. 8 s: a pre-copy pause to a stop-and-copy of a large VM.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

fn tick_buckets() -> Histogram {
    // 50 µs .. 1.6 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

#[derive(Clone, Debug)]
pub struct Live {
    moves: Counters,
    move_seconds: Histograms,
    pause_seconds: Histograms,
    decisions: Counters,
    qos_changes: Counters,
    tick_seconds: Histograms,
    card_health_seconds: Histograms,
    card_link: Counters,
}

impl Default for Live {
    fn default() -> Live {
        Live {
            moves: Counters::default(),
            move_seconds: Histograms::new_with_constructor(move_buckets),
            pause_seconds: Histograms::new_with_constructor(pause_buckets),
            decisions: Counters::default(),
            qos_changes: Counters::default(),
            tick_seconds: Histograms::new_with_constructor(tick_buckets),
            card_health_seconds: Histograms::new_with_constructor(tick_buckets),
            card_link: Counters::default(),
        }
    }
}

fn direction(to: Side) -> String {
    match to {
        Side::Card => "to_card".into(),
        Side::Host => "to_host".into(),
    }
}

/// A serde enum's name as its label value.
fn name_of<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_else(|| "unknown".into())
}

impl Live {
    /// Register (clones of) the families with a scrape's registry.
    pub fn register(&self, reg: &mut Registry) {
        reg.register("mc_moves", "Moves of MC VMs between card and host, by outcome", self.moves.clone());
        reg.register(
            "mc_move_duration_seconds",
            "How long a move of an MC VM took, first step to last",
            self.move_seconds.clone(),
        );
        reg.register(
            "mc_move_pause_seconds",
            "How long an MC VM was paused by its move (its downtime)",
            self.pause_seconds.clone(),
        );
        reg.register(
            "placement_decisions",
            "Placement decisions taken, one per tick, by reason",
            self.decisions.clone(),
        );
        reg.register(
            "qos_changes",
            "Limit changes the qos MC VM decided, by reason and outcome",
            self.qos_changes.clone(),
        );
        reg.register("tick_duration_seconds", "CPU-side duration of one sampling tick", self.tick_seconds.clone());
        reg.register(
            "card_health_check_duration_seconds",
            "How long one health check of the card took (its link round trips included)",
            self.card_health_seconds.clone(),
        );
        reg.register(
            "card_link_events",
            "Card link events short of a dead card: reconnected after a failed link, heartbeat late while the card answered",
            self.card_link.clone(),
        );
    }

    /// A placement record: the decision and each move it ran.
    pub fn decision(&self, r: &AuditRecord) {
        let l: Labels = vec![("reason", name_of(&r.reason)), ("dry_run", r.dry_run.to_string())];
        self.decisions.get_or_create(&l).inc();
        for m in &r.reports {
            let dir = direction(m.to);
            let l: Labels = vec![
                ("task", m.task.clone()),
                ("direction", dir.clone()),
                ("reason", name_of(&r.reason)),
                ("result", if m.ok { "ok" } else { "failed" }.to_string()),
            ];
            self.moves.get_or_create(&l).inc();
            let total_ms: f64 = m.steps.iter().map(|s| s.ms).sum();
            let d: Labels = vec![("direction", dir)];
            self.move_seconds.get_or_create(&d).observe(total_ms / 1000.0);
            if m.ok {
                self.pause_seconds.get_or_create(&d).observe(m.pause_ms / 1000.0);
            }
        }
    }

    pub fn qos_change(&self, e: &QosEvent) {
        let l: Labels = vec![
            ("vm", e.vm.clone()),
            ("direction", e.direction.clone()),
            ("reason", e.reason.clone()),
            ("result", if e.applied { "applied" } else { "failed" }.to_string()),
        ];
        self.qos_changes.get_or_create(&l).inc();
    }

    pub fn card_health_check(&self, seconds: f64) {
        self.card_health_seconds.get_or_create(&Vec::new()).observe(seconds);
    }

    /// `event`: "reconnected" or "late_heartbeat".
    pub fn card_link_event(&self, event: &'static str) {
        self.card_link.get_or_create(&vec![("event", event.to_string())]).inc();
    }

    pub fn tick(&self, seconds: f64) {
        self.tick_seconds.get_or_create(&Vec::new()).observe(seconds);
    }
}
