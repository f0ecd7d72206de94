//! What the view shows, read from the governor's API a few times a second:
//! the placement (card use, where each MC VM runs, its last move), the
//! status (user VMs' rates and health) and the decisions since the last
//! read, of which the moves are counted by direction.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::time::Instant;

use governor::api::{self, Request, Status};
use governor::placement::audit::AuditRecord;
use governor::placement::runtime::PlacementStatus;
use governor::placement::view::decision_line;
use governor::placement::{Reason, Side};

/// Decision lines kept for the view.
const KEEP_LINES: usize = 64;

/// A line of the decisions panel.
#[derive(Clone, Debug)]
pub struct ShownLine {
    pub reason: Reason,
    pub text: String,
    /// A move's line: kept, never replaced by the next record.
    pub is_move: bool,
}

/// The time of day (UTC) of a wall-clock ms.
pub fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

fn side(s: Side) -> &'static str {
    match s {
        Side::Card => "card",
        Side::Host => "host",
    }
}

/// One move as the demo saw it.
#[derive(Clone, Debug)]
pub struct SeenMove {
    pub task: String,
    pub to: Side,
    pub ok: bool,
    pub pause_ms: f64,
    pub reason: Reason,
    /// Seconds since the demo's load began (when the demo saw it).
    pub at_s: f64,
    /// The decision's wall-clock ms and tick.
    pub time_ms: u64,
    pub tick: u64,
}

#[derive(Default)]
pub struct Watch {
    pub placement: Option<PlacementStatus>,
    pub status: Option<Status>,
    /// Latest decisions, oldest first: a record whose reason is the same
    /// as the one before and that moved nothing replaces it, so a calm
    /// card's tick after tick of "holds" is one line that stays current.
    pub lines: VecDeque<ShownLine>,
    pub moves: Vec<SeenMove>,
    /// The first decision that saw the card over a threshold: (tick,
    /// wall-clock ms), as the record says.
    pub first_crossing: Option<(u64, u64)>,
    /// Why the last read failed, if it did.
    pub error: Option<String>,
    /// Each time the governor declared the card dead: when, and why.
    pub card_deaths: Vec<String>,
    /// `--soak` judged the run a failure.
    pub soak_failed: bool,
    /// Whether card-sim's process runs (the demo may have killed it).
    pub card_process_up: bool,
    /// The card's use per resource over the last `HISTORY_S`: (seconds
    /// since the watch began, use by `Resource::index`).
    pub history: VecDeque<(f64, [f64; 4])>,
    /// How each MC VM the card's death brought to the host came up there
    /// ("restored ... from its checkpoint 737 ms old ..."), until it moves
    /// again.
    pub restored: HashMap<String, String>,
    started: Option<Instant>,
    after_tick: u64,
}

/// "restored on the host from its checkpoint 737 ms old (a base and 1
/// diffs)" -> "restored, checkpoint 737 ms old"; a cold start likewise.
fn short_restore(how: &str) -> String {
    if let Some(age) = how.split("checkpoint ").nth(1).and_then(|r| r.split(" old").next()) {
        return format!("restored, checkpoint {age} old");
    }
    if how.contains("started cold") {
        return "started cold (no checkpoint)".into();
    }
    how.to_string()
}

/// How much of the card's use history is kept and drawn.
pub const HISTORY_S: f64 = 60.0;

impl Watch {
    /// Read everything; `now_s` stamps what is new. Returns the moves seen
    /// for the first time.
    pub fn poll(&mut self, socket: &Path, now_s: f64) -> Vec<SeenMove> {
        self.error = None;
        match api::call(socket, &Request::Placement) {
            Ok(r) => self.placement = r.placement,
            Err(e) => self.error = Some(format!("placement: {e:#}")),
        }
        let t = self.started.get_or_insert_with(Instant::now).elapsed().as_secs_f64();
        if let Some(p) = self.placement.as_ref().filter(|p| p.card.healthy) {
            let mut used = [0.0; 4];
            for r in &p.card.resources {
                used[r.resource.index()] = r.used;
            }
            self.history.push_back((t, used));
        }
        while self.history.front().is_some_and(|(at, _)| t - at > HISTORY_S) {
            self.history.pop_front();
        }
        match api::call(socket, &Request::Status) {
            Ok(r) => self.status = r.status,
            Err(e) => self.error = Some(format!("status: {e:#}")),
        }
        match api::call(socket, &Request::Decisions { after_tick: self.after_tick }) {
            Ok(r) => self.take(r.decisions.unwrap_or_default(), now_s),
            Err(e) => {
                self.error = Some(format!("decisions: {e:#}"));
                Vec::new()
            }
        }
    }

    fn take(&mut self, records: Vec<AuditRecord>, now_s: f64) -> Vec<SeenMove> {
        let mut new = Vec::new();
        for d in records {
            // The API answers ticks after `after_tick`; a record is
            // complete (its moves ran) when it is there.
            if d.tick <= self.after_tick && self.after_tick > 0 {
                continue;
            }
            self.after_tick = d.tick;
            if d.reason == Reason::CardDead {
                self.card_deaths.push(format!("{} {}", clock(d.time_ms), d.explain));
                // "...; monitor: restored on the host from its checkpoint
                // 737 ms old (...); log: started cold on the host ..."
                for part in d.explain.split("; ") {
                    if let Some((task, how)) = part.split_once(": ") {
                        if d.moves.iter().any(|m| m.task == task) {
                            self.restored.insert(task.to_string(), short_restore(how));
                        }
                    }
                }
            }
            if self.first_crossing.is_none() && d.card.iter().any(|r| r.used > r.threshold) {
                self.first_crossing = Some((d.tick, d.time_ms));
            }
            // Where the MC VMs start is not a move.
            let moved = d.reason != Reason::Initial && !d.reports.is_empty();
            if moved {
                for r in &d.reports {
                    // Short enough never to wrap: the move, its outcome
                    // and pause stand on a line of their own.
                    self.push(ShownLine {
                        reason: d.reason,
                        text: format!(
                            "{} MOVE {} -> {}: {}, pause {:.2} ms ({:?})",
                            clock(d.time_ms),
                            r.task,
                            side(r.to),
                            if r.ok { "ok" } else { "FAILED" },
                            r.pause_ms,
                            d.reason
                        ),
                        is_move: true,
                    });
                    let m = SeenMove {
                        task: r.task.clone(),
                        to: r.to,
                        ok: r.ok,
                        pause_ms: r.pause_ms,
                        reason: d.reason,
                        at_s: now_s,
                        time_ms: d.time_ms,
                        tick: d.tick,
                    };
                    self.restored.remove(&r.task);
                    self.moves.push(m.clone());
                    new.push(m);
                }
            }
            let line = ShownLine { reason: d.reason, text: decision_line(&d), is_move: moved };
            match self.lines.back_mut() {
                Some(last) if !last.is_move && !moved && last.reason == d.reason => *last = line,
                _ => self.push(line),
            }
        }
        new
    }

    /// Something the demo did to the card, as a line of the decisions panel.
    pub fn card_event(&mut self, text: String) {
        self.push(ShownLine { reason: Reason::CardDead, text, is_move: true });
    }

    fn push(&mut self, line: ShownLine) {
        self.lines.push_back(line);
        while self.lines.len() > KEEP_LINES {
            self.lines.pop_front();
        }
    }

    /// Successful moves to `side`.
    pub fn count(&self, side: Side) -> usize {
        self.moves.iter().filter(|m| m.ok && m.to == side).count()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn how_an_mc_vm_came_up_is_said_short() {
        assert_eq!(
            super::short_restore("restored on the host from its checkpoint 737 ms old (a base and 1 diffs)"),
            "restored, checkpoint 737 ms old"
        );
        assert_eq!(
            super::short_restore("started cold on the host (no usable checkpoint)"),
            "started cold (no checkpoint)"
        );
        assert_eq!(super::short_restore("LOST: cannot start"), "LOST: cannot start");
    }
}
