//! A thread that watches a card's heartbeat and reports when the card goes
//! bad (stalled, silent, dead, failed, garbage) and when it comes back. It
//! polls at half the heartbeat period, so a silent link is reported within
//! the probe timeout and a frozen card within three heartbeats of the last
//! beat the host saw plus the probe timeout (its unanswered echo).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::card::{Card, HealthReport};
use crate::error::CardError;

/// What the watchdog reports on each change of verdict.
#[derive(Debug)]
pub enum Verdict {
    Healthy(HealthReport),
    Unhealthy(CardError),
}

pub struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn same_kind(a: &Verdict, b: &Verdict) -> bool {
    match (a, b) {
        (Verdict::Healthy(_), Verdict::Healthy(_)) => true,
        (Verdict::Unhealthy(x), Verdict::Unhealthy(y)) => std::mem::discriminant(x) == std::mem::discriminant(y),
        _ => false,
    }
}

impl Watchdog {
    /// Watch `card`; `report` is called with the first verdict and on every
    /// change (healthy <-> a kind of failure).
    pub fn spawn(
        card: Arc<Mutex<Card>>,
        mut report: impl FnMut(&Verdict) + Send + 'static,
    ) -> std::io::Result<Watchdog> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new().name("card-watchdog".into()).spawn(move || {
            let mut last: Option<Verdict> = None;
            while !s.load(Ordering::Relaxed) {
                let (v, period) = {
                    let mut c = card.lock().unwrap_or_else(|e| e.into_inner());
                    let period = Duration::from_millis(c.identity().heartbeat_period_ms as u64);
                    match c.check_health() {
                        Ok(h) => (Verdict::Healthy(h), period),
                        Err(e) => (Verdict::Unhealthy(e), period),
                    }
                };
                if last.as_ref().map(|l| !same_kind(l, &v)).unwrap_or(true) {
                    report(&v);
                    last = Some(v);
                }
                std::thread::sleep(period / 2);
            }
        })?;
        Ok(Watchdog { stop, thread: Some(thread) })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::warn!("the card watchdog thread panicked before it was stopped");
            }
        }
    }
}
