//! The user load on the card, ramped so the card crosses its network
//! threshold and falls back under it.
//!
//! Each user VM receives iperf3 streams of `STREAM_BPS` that cross the card
//! (clients on the host's loopback -> a card-sim forward -> the iperf3
//! server in the VM's namespace); the level is how many streams per VM run.
//! Besides, the log MC VM ships the logs it collects off the card: while it
//! runs there, card-sim's network client sends `LOG_SHIPPING_BPS` on its
//! behalf (its measured card cost). At the peak the user traffic alone is
//! just under the threshold and with the log VM's shipping over it, so the
//! governor moves the log VM to the host, which brings the card under; when
//! the user load falls the card is calm, and after the dwell it comes back.
//!
//! One cycle (`CYCLE_S`) repeats while the demo runs.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use card_sim::{Load, Request as CardRequest};
use fixtures::Guarded;
use governor::placement::runtime::PlacementStatus;
use governor::placement::Side;

use crate::system::{System, STREAMS};

/// One stream: 50 Mbit/s, so the peak (3 VMs x 3 streams) is 450 Mbit/s,
/// 45% of the card's 1 Gbit/s.
pub const STREAM_BPS: u64 = 50_000_000;
/// The log VM's shipping from the card: 15 MB/s, 12% of the card's link
/// (the peak is then 57% with it and 45% without: a margin either way for
/// user traffic that delivers a little less or more than offered).
pub const LOG_SHIPPING_BPS: u64 = 15_000_000;
/// (from second, streams per VM, what it is) within a cycle.
const PHASES: [(u64, usize, &str); 4] =
    [(0, 1, "baseline"), (6, 2, "rising"), (10, 3, "peak"), (24, 1, "falling back to baseline")];
pub const CYCLE_S: u64 = 40;

/// What the view shows of the ramp.
#[derive(Clone, Debug, Default)]
pub struct RampState {
    pub phase: &'static str,
    pub streams_per_vm: usize,
    /// User traffic offered through the card, bit/s.
    pub offered_bps: u64,
    /// Seconds until the next phase.
    pub next_in_s: u64,
    /// The log VM's shipping runs on the card (its card VM id).
    pub shipping_vm: Option<u32>,
    /// Why the last attempt to start the shipping failed, if it did.
    pub note: Option<String>,
}

pub struct Ramp {
    started: Instant,
    control: std::path::PathBuf,
    /// Per user VM: (forward ports, running clients).
    vms: Vec<(Vec<u16>, Vec<Guarded>)>,
    sink: SocketAddr,
    state: RampState,
}

/// A loopback TCP sink for the log VM's shipping: reads and drops. Its
/// thread ends with the process; it holds nothing on the host but the
/// listening socket.
fn sink() -> Result<SocketAddr> {
    let l = TcpListener::bind(("127.0.0.1", 0)).context("the log shipping sink")?;
    let addr = l.local_addr().context("the sink's address")?;
    std::thread::Builder::new()
        .name("log-sink".into())
        .spawn(move || {
            for mut conn in l.incoming().flatten() {
                let _ = std::thread::Builder::new().name("log-sink-conn".into()).spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
                });
            }
        })
        .context("the sink's thread")?;
    Ok(addr)
}

impl Ramp {
    pub fn new(sys: &System) -> Result<Ramp> {
        Ok(Ramp {
            started: Instant::now(),
            control: sys.sim_control.clone(),
            vms: sys.vms.iter().map(|v| (v.forwards.clone(), Vec::new())).collect(),
            sink: sink()?,
            state: RampState::default(),
        })
    }

    pub fn state(&self) -> &RampState {
        &self.state
    }

    /// Seconds since the ramp began.
    pub fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Bring the load to where the schedule says it is now, and the log
    /// VM's shipping to where that VM runs.
    /// While the card is down (`card_up` false) its forwards are gone
    /// with it: no user traffic crosses it, and none is started until it
    /// is back.
    pub fn step(&mut self, placement: Option<&PlacementStatus>, card_up: bool) -> Result<()> {
        let t = self.started.elapsed().as_secs() % CYCLE_S;
        let i = PHASES.iter().rposition(|p| p.0 <= t).unwrap_or(0);
        let (_, level, phase) = PHASES[i];
        let next = PHASES.get(i + 1).map_or(CYCLE_S, |p| p.0);
        for v in 0..self.vms.len() {
            self.set_streams(v, if card_up { level } else { 0 })?;
        }
        if !card_up {
            // A card that comes back starts with no VM to ship for.
            self.state.shipping_vm = None;
        }
        self.state.phase = phase;
        self.state.streams_per_vm = level;
        self.state.offered_bps = STREAM_BPS * (level * self.vms.len()) as u64;
        self.state.next_in_s = next - t;
        if let Some(p) = placement.filter(|_| card_up) {
            self.follow_log_vm(p);
        }
        Ok(())
    }

    fn set_streams(&mut self, v: usize, level: usize) -> Result<()> {
        let (ports, clients) = &mut self.vms[v];
        // A client that ended (its server restarted) is started again.
        clients.retain_mut(|c| matches!(c.child().try_wait(), Ok(None)));
        while clients.len() > level.min(STREAMS) {
            if let Some(mut c) = clients.pop() {
                c.terminate(Duration::from_secs(2));
            }
        }
        while clients.len() < level.min(STREAMS) {
            let port = ports[clients.len()];
            let child = Command::new("iperf3")
                .args(["-c", "127.0.0.1", "-p", &port.to_string(), "-b", &STREAM_BPS.to_string(), "-t", "86400"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start an iperf3 client")?;
            clients.push(Guarded::new(child));
        }
        Ok(())
    }

    /// The shipping follows the log VM: on the card it is the card's
    /// traffic on that VM's behalf; once it left, card-sim stops it (the VM
    /// is no longer there), and when it is back (a new card VM id) it is
    /// started again for that VM.
    fn follow_log_vm(&mut self, p: &PlacementStatus) {
        let Some(log) = p.tasks.iter().find(|t| t.task == "log") else { return };
        let on_card = if log.side == Side::Card { log.card_vm } else { None };
        if on_card == self.state.shipping_vm {
            return;
        }
        if let Some(vm) = on_card {
            let req = CardRequest::Load(Load {
                net_bps: Some(LOG_SHIPPING_BPS),
                net_target: Some(self.sink),
                net_vm: Some(vm),
                ..Load::default()
            });
            // The VM may have left the card since the placement was read
            // (a move in between): the card refuses, and the next round
            // follows it wherever it is then.
            if let Err(e) = card_sim::process::control_at(&self.control, &req) {
                self.state.note = Some(format!("log shipping for card VM {vm}: {e}"));
                return;
            }
        }
        self.state.shipping_vm = on_card;
        self.state.note = None;
    }

    /// Stop every client (the servers go with their VMs).
    pub fn stop(&mut self) {
        for (_, clients) in &mut self.vms {
            for mut c in clients.drain(..) {
                c.terminate(Duration::from_secs(2));
            }
        }
    }
}

impl Drop for Ramp {
    fn drop(&mut self) {
        self.stop();
    }
}
