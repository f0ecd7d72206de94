//! The demo's view: the card's resources as bars against their thresholds,
//! where each MC VM runs and its last move with its pause, the user VMs
//! with their health, and the latest decisions. The same widgets draw on
//! the terminal and, when stdout is not one, into a text buffer.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Row, Table, Wrap};
use ratatui::Frame;

use governor::placement::{Resource, Side};

use crate::ramp::RampState;
use crate::watch::{clock, Watch};

/// What the header says besides the data.
pub struct Header {
    pub elapsed_s: f64,
    pub ramp_s: f64,
    pub metrics: String,
    pub ends_in_s: Option<u64>,
    pub tty: bool,
}

fn side(s: Side) -> &'static str {
    match s {
        Side::Card => "card",
        Side::Host => "host",
    }
}

fn mbit(bps: f64) -> String {
    format!("{:.0}", bps / 1e6)
}

pub fn draw(f: &mut Frame, w: &Watch, ramp: &RampState, h: &Header) {
    let [top, mid, users, decisions, foot] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Length(10),
        Constraint::Length(6),
        Constraint::Min(6),
        Constraint::Length(1),
    ])
    .areas(f.area());
    f.render_widget(header(w, ramp, h), top);
    let [card, tasks] = Layout::horizontal([Constraint::Percentage(45), Constraint::Percentage(55)]).areas(mid);
    f.render_widget(card_bars(w, card.width.saturating_sub(24)), card);
    f.render_widget(tasks_table(w), tasks);
    f.render_widget(users_table(w), users);
    f.render_widget(decision_list(w, decisions), decisions);
    f.render_widget(footer(w, h), foot);
}

fn header(w: &Watch, ramp: &RampState, h: &Header) -> Paragraph<'static> {
    let card = match &w.placement {
        _ if !w.card_process_up => Span::styled(
            format!("card DEAD: card-sim killed{}", if h.tty { " (r starts it again)" } else { "" }),
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        ),
        Some(p) if p.card.healthy => Span::styled("card healthy", Style::new().fg(Color::Green)),
        Some(p) => Span::styled(
            format!("card DOWN: {}", p.card.error.clone().unwrap_or_default()),
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        ),
        None => Span::raw("card: no answer yet"),
    };
    let load = format!(
        "user load through the card: {} ({} Mbit/s, {} stream(s) per VM, next change in {} s)",
        ramp.phase,
        mbit(ramp.offered_bps as f64),
        ramp.streams_per_vm,
        ramp.next_in_s
    );
    let ends = h.ends_in_s.map_or(String::new(), |s| format!(", ends in {s} s"));
    Paragraph::new(vec![
        Line::from(vec![
            Span::styled("governor demo", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(format!("  +{:.0} s{ends}  ", h.elapsed_s)),
            card,
            Span::raw(format!("  metrics http://{}/metrics", h.metrics)),
        ]),
        Line::from(load),
        Line::from(match (&w.error, &ramp.note) {
            (Some(e), _) => Span::styled(format!("API: {e}"), Style::new().fg(Color::Red)),
            (None, Some(n)) => Span::styled(n.clone(), Style::new().fg(Color::Yellow)),
            (None, None) => Span::raw(format!(
                "load running for {:.0} s; the log MC VM ships its logs {}",
                h.ramp_s,
                if ramp.shipping_vm.is_some() { "from the card (its card network cost)" } else { "from the host" }
            )),
        }),
    ])
}

/// Levels of a sparkline cell, lowest to full.
const SPARKS: [&str; 8] = ["▁", "▂", "▃", "▄", "▅", "▆", "▇", "█"];

/// The last minute of one resource's use, a cell a second (the newest
/// right), red where it was over `threshold`: the crossing behind a move.
fn sparkline(w: &Watch, index: usize, threshold: f64, cells: usize) -> Line<'static> {
    let mut per_second: Vec<Option<f64>> = vec![None; cells];
    if let Some(&(newest, _)) = w.history.back() {
        for (at, used) in &w.history {
            let age = (newest - at).floor() as usize;
            if age < cells {
                let slot = &mut per_second[cells - 1 - age];
                *slot = Some(slot.unwrap_or(0.0).max(used[index]));
            }
        }
    }
    let mut spans = vec![Span::styled(format!("{:<8}", "  60 s"), Style::new().fg(Color::DarkGray))];
    for v in per_second {
        spans.push(match v {
            None => Span::raw(" "),
            Some(u) => {
                let level = ((u.clamp(0.0, 1.0) * (SPARKS.len() - 1) as f64).round()) as usize;
                let color = if u > threshold { Color::Red } else { Color::Green };
                Span::styled(SPARKS[level], Style::new().fg(color))
            }
        });
    }
    Line::from(spans)
}

/// One bar per resource: `width` cells for 0..100%, the threshold as `|`;
/// under each, its last minute.
fn card_bars(w: &Watch, width: u16) -> Paragraph<'static> {
    let width = width.max(10) as usize;
    let mut lines = Vec::new();
    if let Some(p) = &w.placement {
        for r in &p.card.resources {
            let used = (r.used.clamp(0.0, 1.0) * width as f64).round() as usize;
            let mark = ((r.threshold.clamp(0.0, 1.0) * width as f64).round() as usize).min(width - 1);
            let over = r.used > r.threshold;
            let color = if over { Color::Red } else { Color::Green };
            let mut spans = vec![Span::raw(format!("{:<8}", r.resource.name()))];
            for i in 0..width {
                let (ch, st) = if i == mark {
                    ("|", Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD))
                } else if i < used {
                    ("█", Style::new().fg(color))
                } else {
                    ("·", Style::new().fg(Color::DarkGray))
                };
                spans.push(Span::styled(ch, st));
            }
            spans.push(Span::styled(
                format!(" {:>3.0}%/{:.0}%{}", r.used * 100.0, r.threshold * 100.0, if over { " OVER" } else { "" }),
                Style::new().fg(color),
            ));
            lines.push(Line::from(spans));
            lines.push(sparkline(w, r.resource.index(), r.threshold, width.min(60)));
        }
    }
    Paragraph::new(lines).block(Block::bordered().title(" card use | threshold (and the last minute) "))
}

fn tasks_table(w: &Watch) -> Table<'static> {
    let rows: Vec<Row> = w
        .placement
        .iter()
        .flat_map(|p| p.tasks.iter())
        .map(|t| {
            let last = if let Some(why) = &t.stopped {
                format!("STOPPED: {why}")
            } else if let Some(how) = w.restored.get(&t.task).filter(|_| t.side == Side::Host) {
                how.clone()
            } else {
                t.last_move.as_ref().map_or("-".to_string(), |m| {
                    format!("to {} {}, pause {:.1} ms", side(m.to), if m.ok { "ok" } else { "FAILED" }, m.pause_ms)
                })
            };
            let st = if t.side == Side::Host { Style::new().fg(Color::Cyan) } else { Style::new() };
            Row::new(vec![
                t.task.clone(),
                side(t.side).to_string(),
                clock(t.since_ms),
                format!("{:.1}%", t.card_cost[Resource::Cpu.index()] * 100.0),
                format!("{:.1}%", t.card_cost[Resource::Network.index()] * 100.0),
                last,
            ])
            .style(st)
        })
        .collect();
    Table::new(
        rows,
        [
            Constraint::Length(8),
            Constraint::Length(5),
            Constraint::Length(9),
            Constraint::Length(6),
            Constraint::Length(6),
            Constraint::Min(20),
        ],
    )
    .header(
        Row::new(["task", "side", "since", "c.cpu", "c.net", "last move"])
            .style(Style::new().add_modifier(Modifier::BOLD)),
    )
    .block(Block::bordered().title(" MC VMs (c.: their measured cost on the card) "))
}

fn users_table(w: &Watch) -> Table<'static> {
    let mut rows = Vec::new();
    if let Some(st) = &w.status {
        for v in st.vms.iter().filter(|v| v.role == "user") {
            let health = st.health.iter().find(|h| h.vm == v.name);
            let (state, reason) =
                health.map_or(("-".to_string(), String::new()), |h| (h.health.clone(), h.reason.clone()));
            let color = match state.as_str() {
                "running" => Color::Green,
                "starting" | "-" => Color::Gray,
                _ => Color::Red,
            };
            rows.push(Row::new(vec![
                Span::raw(v.name.clone()),
                Span::raw(format!("{:.1}", v.cpu_percent)),
                Span::raw(mbit(v.rx_bits_per_s)),
                Span::raw(mbit(v.tx_bits_per_s)),
                Span::raw(v.memory_working_set_bytes.map_or("-".into(), |b| format!("{} MiB", b >> 20))),
                Span::styled(format!("{state} {reason}"), Style::new().fg(color)),
            ]));
        }
    }
    let degraded = w.status.as_ref().and_then(|s| s.management_degraded.clone());
    let title = match degraded {
        Some(why) => format!(" user VMs (management degraded: {why}) "),
        None => " user VMs (health decided by the monitor MC VM) ".to_string(),
    };
    Table::new(
        rows,
        [
            Constraint::Length(8),
            Constraint::Length(6),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(9),
            Constraint::Min(20),
        ],
    )
    .header(
        Row::new(["vm", "cpu%", "rx Mb/s", "tx Mb/s", "workset", "health"])
            .style(Style::new().add_modifier(Modifier::BOLD)),
    )
    .block(Block::bordered().title(title))
}

fn decision_list(w: &Watch, area: Rect) -> Paragraph<'static> {
    // The newest that fit, oldest first: a move is one line, a decision
    // may wrap to two.
    let (width, mut rows) = (area.width.saturating_sub(2).max(1) as usize, area.height.saturating_sub(2) as usize);
    let mut shown = Vec::new();
    for l in w.lines.iter().rev() {
        // Word wrap breaks early: count a line a little narrower.
        let need = l.text.chars().count().div_ceil(width.saturating_sub(12).max(1)).max(1);
        if need > rows {
            break;
        }
        rows -= need;
        let st = if l.is_move && l.text.contains(" MOVE ") {
            Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD)
        } else {
            Style::new()
        };
        shown.push(Line::styled(l.text.clone(), st));
    }
    shown.reverse();
    let lines = shown;
    Paragraph::new(lines).wrap(Wrap { trim: false }).block(Block::bordered().title(" latest decisions "))
}

fn footer(w: &Watch, h: &Header) -> Paragraph<'static> {
    let pauses: Vec<String> = w.moves.iter().filter(|m| m.ok).map(|m| format!("{:.1}", m.pause_ms)).collect();
    let keys =
        if h.tty { "  k: kill the card  r: start it again  q or Ctrl-C: stop and remove everything" } else { "" };
    Paragraph::new(format!(
        "moves to host {}, to card {} (pauses ms: {}){keys}",
        w.count(Side::Host),
        w.count(Side::Card),
        if pauses.is_empty() { "-".to_string() } else { pauses.join(", ") }
    ))
}

/// A buffer as plain text, one line per row, trailing blanks trimmed.
pub fn to_text(b: &Buffer) -> String {
    let mut out = String::new();
    for y in 0..b.area.height {
        let mut line = String::new();
        for x in 0..b.area.width {
            line.push_str(b[(x, y)].symbol());
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
