//! The load knob: real CPU burn, real memory, real network bytes, all inside
//! card-sim's cgroup so the card's own accounting sees them.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::costs::{charge, Owner};
use crate::device::spawn_thread;
use crate::error::SimError;

/// CPU burners: `target` is a fraction of the card's CPU capacity, spread
/// over `threads` spinners with a 10 ms duty cycle.
pub struct CpuLoad {
    /// Per-thread duty in parts per million.
    duty_ppm: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl CpuLoad {
    /// Start the burners (idle until `set`). If one cannot be started, those
    /// already running are stopped (by `Drop`).
    pub fn start(threads: usize) -> Result<CpuLoad, SimError> {
        let load = CpuLoad { duty_ppm: Arc::new(AtomicU64::new(0)), stop: Arc::new(AtomicBool::new(false)) };
        for i in 0..threads.max(1) {
            let duty = load.duty_ppm.clone();
            let stop = load.stop.clone();
            spawn_thread(format!("cpu-load-{i}"), move || {
                let window = Duration::from_millis(10);
                while !stop.load(Ordering::Relaxed) {
                    let d = duty.load(Ordering::Relaxed).min(1_000_000);
                    if d == 0 {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    let start = Instant::now();
                    let busy = window.mul_f64(d as f64 / 1e6);
                    let mut x = 0u64;
                    while start.elapsed() < busy {
                        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                    }
                    let rest = window.saturating_sub(start.elapsed());
                    if !rest.is_zero() {
                        std::thread::sleep(rest);
                    }
                }
            })?;
        }
        Ok(load)
    }

    /// `cores` = CPU cores worth of burn in total (e.g. 0.5).
    pub fn set(&self, cores: f64, threads: usize) {
        let per = (cores / threads.max(1) as f64).clamp(0.0, 1.0);
        self.duty_ppm.store((per * 1e6) as u64, Ordering::Relaxed);
    }
}

impl Drop for CpuLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Memory ballast: touched pages, so they are charged to the cgroup.
#[derive(Default)]
pub struct MemLoad {
    blocks: Mutex<Vec<Vec<u8>>>,
}

impl MemLoad {
    pub fn set_mib(&self, mib: u64) {
        let mut b = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        b.clear();
        b.shrink_to_fit();
        for _ in 0..mib {
            let mut v = vec![0u8; 1 << 20];
            for i in (0..v.len()).step_by(4096) {
                v[i] = 1;
            }
            b.push(v);
        }
    }
}

/// The card's network client: sends bytes to a peer at a set rate and counts
/// what the socket accepted. That count is the card's network telemetry
/// (documented in ABI.md: bytes through the network-client interface).
/// When it sends on a VM's behalf (`set_owner`), it sends only while that
/// VM runs on the card (the traffic is the VM's: it leaves with the VM),
/// and the same bytes are also
/// charged to that VM (its `net_bytes` in the `vm-costs` table).
pub struct NetClient {
    pub bytes: Arc<AtomicU64>,
    rate_bps: Arc<AtomicU64>,
    target: Arc<Mutex<Option<SocketAddr>>>,
    owner: Arc<Mutex<Option<Owner>>>,
    stop: Arc<AtomicBool>,
}

impl NetClient {
    pub fn start() -> Result<NetClient, SimError> {
        let bytes = Arc::new(AtomicU64::new(0));
        let rate_bps = Arc::new(AtomicU64::new(0));
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let owner: Arc<Mutex<Option<Owner>>> = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, r, t, o, s) = (bytes.clone(), rate_bps.clone(), target.clone(), owner.clone(), stop.clone());
        spawn_thread("net-client".into(), move || {
            let mut conn: Option<(SocketAddr, TcpStream)> = None;
            let buf = vec![0x5au8; 16 * 1024];
            let tick = Duration::from_millis(10);
            while !s.load(Ordering::Relaxed) {
                let start = Instant::now();
                let rate = r.load(Ordering::Relaxed);
                let want = *t.lock().unwrap_or_else(|e| e.into_inner());
                let owner = o.lock().unwrap_or_else(|e| e.into_inner()).clone();
                // A VM's traffic stops when the VM is gone from the card.
                let owner_gone = owner.as_ref().is_some_and(|w| w.strong_count() == 0);
                let owner = owner.unwrap_or_default();
                match (want, rate) {
                    (Some(addr), rate) if rate > 0 && !owner_gone => {
                        if conn.as_ref().map(|(a, _)| *a != addr).unwrap_or(true) {
                            conn =
                                TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok().map(|c| (addr, c));
                        }
                        if let Some((_, c)) = conn.as_mut() {
                            let mut left = (rate as f64 * tick.as_secs_f64()) as usize;
                            while left > 0 {
                                let n = left.min(buf.len());
                                match c.write(&buf[..n]) {
                                    Ok(w) => {
                                        b.fetch_add(w as u64, Ordering::Relaxed);
                                        charge(&owner, |c| {
                                            c.net_bytes.fetch_add(w as u64, Ordering::Relaxed);
                                        });
                                        left -= w;
                                    }
                                    Err(_) => {
                                        conn = None;
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    _ => conn = None,
                }
                let rest = tick.saturating_sub(start.elapsed());
                std::thread::sleep(rest);
            }
        })?;
        Ok(NetClient { bytes, rate_bps, target, owner, stop })
    }

    pub fn set(&self, target: Option<SocketAddr>, rate_bps: u64) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = target;
        self.rate_bps.store(rate_bps, Ordering::Relaxed);
    }

    /// On whose behalf it sends from now on (None: the card's own).
    pub fn set_owner(&self, owner: Option<Owner>) {
        *self.owner.lock().unwrap_or_else(|e| e.into_inner()) = owner;
    }
}

impl Drop for NetClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
