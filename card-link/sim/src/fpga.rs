//! The custom-hardware (FPGA) engine, modelled: a work queue served by one
//! engine. Jobs take their stated service time on the engine (it does not
//! use the card's CPU, as real offload hardware would not). The engine keeps
//! its own clock of service intervals: a job starts when it has arrived and
//! the previous one has finished, and ends one service time later; the
//! engine thread sleeps to that absolute end, so a late wake-up of the host
//! thread does not stretch the modelled hardware. Busy time is the sum of
//! completed service intervals: the ratio follows from queueing (arrivals,
//! backlog, idle gaps), not from the knob's setting. A job submitted on a
//! VM's behalf charges its service time to that VM too (`vm-costs`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::costs::{charge, Owner};
use crate::device::spawn_thread;
use crate::error::SimError;

#[derive(Default)]
struct Queue {
    /// (arrival, service time, on whose behalf)
    jobs: VecDeque<(Instant, Duration, Owner)>,
}

pub struct Fpga {
    queue: Arc<(Mutex<Queue>, Condvar)>,
    busy_ns: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
    /// Offered load from the knob, as a fraction of engine time.
    offered_ppm: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

pub const MAX_QUEUE: usize = 10_000;

impl Fpga {
    /// Start the engine and the knob's job generator. If a thread cannot be
    /// started, the one already running is stopped (by `Drop`).
    pub fn start() -> Result<Fpga, SimError> {
        let fpga = Fpga {
            queue: Arc::new((Mutex::new(Queue::default()), Condvar::new())),
            busy_ns: Arc::new(AtomicU64::new(0)),
            done: Arc::new(AtomicU64::new(0)),
            offered_ppm: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        {
            let (q, busy, done, stop) =
                (fpga.queue.clone(), fpga.busy_ns.clone(), fpga.done.clone(), fpga.stop.clone());
            spawn_thread("fpga-engine".into(), move || {
                let mut prev_end = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let job = {
                        let (m, cv) = &*q;
                        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
                        while g.jobs.is_empty() && !stop.load(Ordering::Relaxed) {
                            g = cv
                                .wait_timeout(g, Duration::from_millis(50))
                                .map(|r| r.0)
                                .unwrap_or_else(|e| e.into_inner().0);
                        }
                        g.jobs.pop_front()
                    };
                    if let Some((arrival, service, owner)) = job {
                        let start = arrival.max(prev_end);
                        let end = start + service;
                        std::thread::sleep(end.saturating_duration_since(Instant::now()));
                        let ns = service.as_nanos() as u64;
                        busy.fetch_add(ns, Ordering::Relaxed);
                        charge(&owner, |c| {
                            c.fpga_busy_ns.fetch_add(ns, Ordering::Relaxed);
                        });
                        done.fetch_add(1, Ordering::Relaxed);
                        prev_end = end;
                    }
                }
            })?;
        }
        {
            // The knob's job generator: 5 ms jobs at the offered rate (long
            // enough that sleep overshoot stays a small part of each job).
            let (q, offered, stop) = (fpga.queue.clone(), fpga.offered_ppm.clone(), fpga.stop.clone());
            spawn_thread("fpga-load".into(), move || {
                let mut credit = 0.0f64;
                let tick = Duration::from_millis(10);
                let mut last = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let rho = offered.load(Ordering::Relaxed) as f64 / 1e6;
                    // Credit by elapsed time, so a late tick does not lower the offered load.
                    let now = Instant::now();
                    credit += rho * now.duration_since(last).as_secs_f64() / 0.005;
                    last = now;
                    while credit >= 1.0 {
                        credit -= 1.0;
                        push(&q, Duration::from_millis(5), &Weak::new());
                    }
                    std::thread::sleep(tick);
                }
            })?;
        }
        Ok(fpga)
    }

    /// Submit `count` jobs of `service` each (the "real work routed
    /// through it"), on behalf of `owner` (a VM's counters, or none).
    pub fn submit(&self, count: u32, service: Duration, owner: &Owner) -> usize {
        let mut n = 0;
        for _ in 0..count {
            if push(&self.queue, service, owner) {
                n += 1;
            }
        }
        n
    }

    pub fn set_offered(&self, ratio: f64) {
        self.offered_ppm.store((ratio.clamp(0.0, 1.0) * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn busy_ns(&self) -> u64 {
        self.busy_ns.load(Ordering::Relaxed)
    }

    pub fn completed(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    pub fn depth(&self) -> u64 {
        self.queue.0.lock().map(|g| g.jobs.len() as u64).unwrap_or(0)
    }
}

fn push(q: &Arc<(Mutex<Queue>, Condvar)>, t: Duration, owner: &Owner) -> bool {
    let (m, cv) = &**q;
    let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
    if g.jobs.len() >= MAX_QUEUE {
        return false;
    }
    g.jobs.push_back((Instant::now(), t, owner.clone()));
    cv.notify_one();
    true
}

impl Drop for Fpga {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.queue.1.notify_all();
    }
}
