//! Text views of the placement for the CLI: the table of MC VMs and one
//! line per decision.

use std::fmt::Write;

use super::audit::AuditRecord;
use super::runtime::PlacementStatus;
use super::{Resource, Side};

fn side(s: Side) -> &'static str {
    match s {
        Side::Card => "card",
        Side::Host => "host",
    }
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

/// The time of day (UTC) of a wall-clock ms.
fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}.{:03}", (s / 3600) % 24, (s / 60) % 60, s % 60, ms % 1000)
}

pub fn placement_table(p: &PlacementStatus) -> String {
    let mut out = String::new();
    let card = if p.card.healthy { "healthy".to_string() } else { p.card.error.clone().unwrap_or_default() };
    let _ = writeln!(out, "card: {card}{}", if p.dry_run { "  (dry run: nothing is moved)" } else { "" });
    if let Some(link) = &p.card.link {
        let _ = writeln!(out, "  link: {link}");
    }
    for r in &p.card.resources {
        let over = if r.used > r.threshold { "  OVER" } else { "" };
        let _ =
            writeln!(out, "  {:<8} {:>6} of threshold {:>6}{over}", r.resource.name(), pct(r.used), pct(r.threshold));
    }
    let _ = writeln!(
        out,
        "{:<14} {:<5} {:<13} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:<5} last move",
        "task", "side", "since (UTC)", "c.fpga", "c.cpu", "c.mem", "c.net", "h.cpu", "h.mem", "pin"
    );
    for t in &p.tasks {
        let c = |r: Resource| pct(t.card_cost[r.index()]);
        let last = if let Some(why) = &t.stopped {
            format!("STOPPED: {why}")
        } else {
            t.last_move.as_ref().map_or("-".to_string(), |m| {
                format!(
                    "to {} {} pause {:.2} ms{}",
                    side(m.to),
                    if m.ok { "ok" } else { "FAILED" },
                    m.pause_ms,
                    m.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
                )
            })
        };
        let _ = writeln!(
            out,
            "{:<14} {:<5} {:<13} {:>7} {:>7} {:>7} {:>7} {:>7.2} {:>6}Mi {:<5} {last}",
            t.task,
            side(t.side),
            clock(t.since_ms),
            c(Resource::Fpga),
            c(Resource::Cpu),
            c(Resource::Memory),
            c(Resource::Network),
            t.host_cost.cpus,
            t.host_cost.memory_bytes >> 20,
            t.pinned.map_or("-", side),
        );
    }
    out
}

/// One decision as a line: time, tick, reason, sentence, and each move's
/// outcome with its pause.
pub fn decision_line(d: &AuditRecord) -> String {
    let mut s = format!(
        "{} tick {} {:?}{}: {}",
        clock(d.time_ms),
        d.tick,
        d.reason,
        if d.dry_run { " (dry run)" } else { "" },
        d.explain
    );
    for r in &d.reports {
        let _ = write!(
            s,
            " [{} -> {}: {} pause {:.2} ms{}]",
            r.task,
            side(r.to),
            if r.ok { "ok" } else { "failed" },
            r.pause_ms,
            r.error.as_ref().map(|e| format!(", {e}")).unwrap_or_default()
        );
    }
    s
}
