//! `governor-demo --soak`: the demo scenario run long, and judged. Every
//! `EVERY` it samples the governor's threads, open fds and resident memory
//! and card-sim's threads; at the end it fails on any card death (the soak
//! injects none), any failed move, a scenario that moved nothing either
//! way, or growth past the bounds below over what the warm-up reached (the
//! warm-up holds whole ramp cycles, moves both ways and checkpoints, so
//! what it reached is what the scenario needs; more is a leak).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use governor::placement::Side;

use crate::watch::Watch;

/// How often the processes are sampled.
const EVERY: Duration = Duration::from_secs(10);
/// Growth allowed over the warm-up's peak.
const MORE_THREADS: usize = 2;
const MORE_FDS: usize = 4;
const MORE_RSS_KIB: u64 = 16 << 10;
/// card-sim's relay threads come and go with the user streams (two per
/// stream); a new peak this far above the warm-up's means they pile up.
const MORE_CARD_THREADS: usize = 8;

/// What is checked: its name, how it is read off a sample, how much more
/// than the warm-up's peak it may reach, and how it is shown.
type Check = (&'static str, fn(&Sample) -> u64, u64, fn(u64) -> String);

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    at_s: f64,
    threads: usize,
    fds: usize,
    rss_kib: u64,
    card_threads: usize,
}

pub struct Soak {
    start: Instant,
    warm_up: Duration,
    next: Instant,
    samples: Vec<Sample>,
}

fn count(pid: u32, dir: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/{dir}")).map_or(0, |d| d.count())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_string();
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

impl Soak {
    /// A soak of `run`: its warm-up is a fifth of it, from one to two minutes.
    pub fn new(run: Duration) -> Soak {
        let warm_up = (run / 5).clamp(Duration::from_secs(60), Duration::from_secs(120));
        let now = Instant::now();
        Soak { start: now, warm_up, next: now, samples: Vec::new() }
    }

    /// Sample the governor (`gov`) and card-sim (`card`) when one is due.
    pub fn sample(&mut self, gov: u32, card: u32) {
        let now = Instant::now();
        if now < self.next {
            return;
        }
        self.next = now + EVERY;
        self.samples.push(Sample {
            at_s: self.start.elapsed().as_secs_f64(),
            threads: count(gov, "task"),
            fds: count(gov, "fd"),
            rss_kib: rss_kib(gov),
            card_threads: count(card, "task"),
        });
    }

    /// The report, and an error naming every check that failed.
    /// `link_events` is what the governor counted on its card link.
    pub fn verdict(&self, w: &Watch, link_events: &str) -> Result<String> {
        let warm = self.warm_up.as_secs_f64();
        let (early, late): (Vec<Sample>, Vec<Sample>) = self.samples.iter().partition(|s| s.at_s <= warm);
        let peak = |v: &[Sample], f: fn(&Sample) -> u64| v.iter().map(f).max().unwrap_or(0);
        let low = |v: &[Sample], f: fn(&Sample) -> u64| v.iter().map(f).min().unwrap_or(0);
        let all = &self.samples;
        let mut problems = Vec::new();
        if late.is_empty() {
            problems.push(format!("no sample after the {warm:.0} s warm-up: run the soak longer"));
        }
        let mut rows = Vec::new();
        let checks: [Check; 4] = [
            ("governor threads", |s| s.threads as u64, MORE_THREADS as u64, |v| v.to_string()),
            ("governor fds", |s| s.fds as u64, MORE_FDS as u64, |v| v.to_string()),
            ("governor RSS", |s| s.rss_kib, MORE_RSS_KIB, |v| format!("{:.1} MiB", v as f64 / 1024.0)),
            ("card-sim threads", |s| s.card_threads as u64, MORE_CARD_THREADS as u64, |v| v.to_string()),
        ];
        for (what, f, more, show) in checks {
            let bound = peak(&early, f) + more;
            let after = peak(&late, f);
            rows.push(format!(
                "soak: {what}: {}..{} (warm-up peak {}, bound {}, after the warm-up peak {})",
                show(low(all, f)),
                show(peak(all, f)),
                show(peak(&early, f)),
                show(bound),
                show(after)
            ));
            if after > bound {
                problems.push(format!("{what} grew to {} past the bound {}", show(after), show(bound)));
            }
        }
        let failed: Vec<String> =
            w.moves.iter().filter(|m| !m.ok).map(|m| format!("{} to {:?} at +{:.0} s", m.task, m.to, m.at_s)).collect();
        if !failed.is_empty() {
            problems.push(format!("failed moves: {}", failed.join(", ")));
        }
        if !w.card_deaths.is_empty() {
            problems.push(format!(
                "the card died {} time(s) with nothing injected: {}",
                w.card_deaths.len(),
                w.card_deaths.join("; ")
            ));
        }
        if w.count(Side::Host) == 0 || w.count(Side::Card) == 0 {
            problems.push("the scenario did not move an MC VM both ways".into());
        }
        let mut report = vec![format!(
            "soak: {:.1} min, {} samples ({} s apart, warm-up {:.0} s): moves to host {}, to card {}, failed {}; \
             card deaths {} (none injected); card link: {link_events}",
            self.start.elapsed().as_secs_f64() / 60.0,
            all.len(),
            EVERY.as_secs(),
            warm,
            w.count(Side::Host),
            w.count(Side::Card),
            failed.len(),
            w.card_deaths.len(),
        )];
        report.extend(rows);
        let report = report.join("\n");
        if !problems.is_empty() {
            bail!("{report}\nsoak: FAILED: {}", problems.join("; "));
        }
        Ok(format!("{report}\nsoak: passed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn soak_of(samples: Vec<Sample>) -> Soak {
        Soak { start: Instant::now(), warm_up: Duration::from_secs(60), next: Instant::now(), samples }
    }

    fn at(at_s: f64, threads: usize, fds: usize, rss_kib: u64, card_threads: usize) -> Sample {
        Sample { at_s, threads, fds, rss_kib, card_threads }
    }

    fn moved_both_ways() -> Watch {
        let mut w = Watch::default();
        for to in [Side::Host, Side::Card] {
            w.moves.push(crate::watch::SeenMove {
                task: "log".into(),
                to,
                ok: true,
                pause_ms: 1.0,
                reason: governor::placement::Reason::Relieve,
                at_s: 10.0,
                time_ms: 0,
                tick: 1,
            });
        }
        w
    }

    #[test]
    fn steady_processes_pass_and_growth_past_a_bound_fails_naming_it() {
        let w = moved_both_ways();
        let steady = vec![at(0.0, 5, 60, 28_000, 30), at(50.0, 5, 64, 29_000, 54), at(100.0, 6, 63, 29_500, 54)];
        assert!(soak_of(steady).verdict(&w, "").is_ok());
        let leaking = vec![at(0.0, 5, 60, 28_000, 30), at(50.0, 5, 64, 29_000, 54), at(100.0, 5, 80, 29_000, 54)];
        let e = soak_of(leaking).verdict(&w, "").unwrap_err().to_string();
        assert!(e.contains("governor fds grew to 80 past the bound 68"), "{e}");
        let threads = vec![at(0.0, 5, 60, 28_000, 30), at(100.0, 5, 60, 28_000, 70)];
        let e = soak_of(threads).verdict(&w, "").unwrap_err().to_string();
        assert!(e.contains("card-sim threads grew to 70 past the bound 38"), "{e}");
    }

    #[test]
    fn a_card_death_a_failed_move_or_no_moves_fail() {
        let samples = vec![at(0.0, 5, 60, 28_000, 30), at(100.0, 5, 60, 28_000, 30)];
        let mut w = moved_both_ways();
        w.card_deaths.push("the card is dead (stalled)".into());
        w.moves[0].ok = false;
        let e = soak_of(samples.clone()).verdict(&w, "").unwrap_err().to_string();
        assert!(e.contains("the card died 1 time(s)") && e.contains("failed moves: log"), "{e}");
        let e = soak_of(samples).verdict(&Watch::default(), "").unwrap_err().to_string();
        assert!(e.contains("did not move an MC VM both ways"), "{e}");
    }
}
