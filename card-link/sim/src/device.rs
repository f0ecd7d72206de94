//! The card as a PCI function served over vfio-user: BAR0 (register file,
//! refreshed every heartbeat), BAR2 (mailbox memory), the completion
//! interrupt, and the threads behind them (heartbeat/telemetry, mailbox).

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use card_link::abi::{self, Health, RegisterSnapshot, Resource, ResourceKind, BAR0_SIZE};
use card_link::mailbox::{self, Message, Op, Status, HEADER_LEN};
use cgroupfs::Cgroup;

use crate::commands::{EventLog, VmTable};
use crate::error::SimError;
use crate::fpga::Fpga;
use crate::load::{CpuLoad, MemLoad, NetClient};
pub use crate::pci::{irqs, regions, remove_stale_socket, serve, Backend};
use crate::vms::{ModelBackend, VmBackend};

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub socket: PathBuf,
    pub control: Option<PathBuf>,
    pub period_ms: u32,
    pub serial: u64,
    /// The card's cgroup, already created, opened and joined by the caller
    /// (the card-sim binary detects the layout once, for both), or None to
    /// account the process itself (library/in-process use).
    pub cgroup: Option<Cgroup>,
    pub net_capacity_bps: u64,
    pub load_threads: usize,
    pub slots: u32,
    pub slot_size: u32,
    /// Offer the fused doorbell (ABI 1.1 feature bit 0).
    pub fused_doorbell: bool,
}

impl SimConfig {
    pub fn new(socket: PathBuf) -> SimConfig {
        SimConfig {
            socket,
            control: None,
            period_ms: 100,
            serial: 0x5eed_0001,
            cgroup: None,
            net_capacity_bps: 125_000_000,
            load_threads: 1,
            slots: mailbox::DEFAULT_SLOTS,
            slot_size: mailbox::DEFAULT_SLOT_SIZE,
            fused_doorbell: true,
        }
    }
}

#[derive(Default)]
pub struct Faults {
    /// Firmware hang: heartbeat freezes, mailbox stops; registers still read.
    pub stall: AtomicBool,
    /// BAR0 reads return garbage.
    pub garbage: AtomicBool,
    /// Every mailbox command waits this long before it is handled.
    pub slow_ms: AtomicU64,
}

pub struct SimCard {
    pub cfg: SimConfig,
    start: Instant,
    pub(crate) bar0: Mutex<Vec<u8>>,
    pub(crate) bar2: Mutex<Vec<u8>>,
    doorbell: (Mutex<bool>, Condvar),
    /// Held by whoever answers requests, so they are answered one at a time, in order.
    serving: Mutex<()>,
    pub(crate) irq: Mutex<Option<File>>,
    heartbeat: AtomicU64,
    pub faults: Faults,
    pub cpu: CpuLoad,
    pub mem: MemLoad,
    pub net: NetClient,
    pub fpga: Fpga,
    /// User traffic relayed through the card.
    pub forwards: crate::forward::Forwards,
    pub(crate) vms: Mutex<VmTable>,
    /// The VMM takes pre-copy snapshots (fixed at start: BAR0's refresh
    /// must not wait for the VM table while a long snapshot holds it).
    precopy: bool,
    pub(crate) events: Mutex<EventLog>,
    pub(crate) stop: AtomicBool,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Start one of the card's threads; a card missing one would be a card that
/// silently does not work, so failing to start it is an error.
pub fn spawn_thread(name: String, f: impl FnOnce() + Send + 'static) -> Result<(), SimError> {
    match std::thread::Builder::new().name(name.clone()).spawn(f) {
        Ok(_) => Ok(()),
        Err(source) => Err(SimError::Thread { name, source }),
    }
}

impl SimCard {
    /// A card whose management VMs are modelled (`vms::ModelBackend`).
    pub fn new(cfg: SimConfig) -> Result<Arc<SimCard>, SimError> {
        Self::with_backend(cfg, Box::new(ModelBackend))
    }

    /// A card with its load, network client and FPGA engine threads running
    /// (heartbeat and mailbox start with `spawn_threads`).
    pub fn with_backend(cfg: SimConfig, backend: Box<dyn VmBackend>) -> Result<Arc<SimCard>, SimError> {
        let mut bar2 = vec![0u8; mailbox::bar2_size(cfg.slots, cfg.slot_size) as usize];
        bar2[mailbox::REG_SLOTS as usize..][..4].copy_from_slice(&cfg.slots.to_le_bytes());
        bar2[mailbox::REG_SLOT_SIZE as usize..][..4].copy_from_slice(&cfg.slot_size.to_le_bytes());
        let card = Arc::new(SimCard {
            start: Instant::now(),
            bar0: Mutex::new(vec![0u8; BAR0_SIZE as usize]),
            bar2: Mutex::new(bar2),
            doorbell: (Mutex::new(false), Condvar::new()),
            serving: Mutex::new(()),
            irq: Mutex::new(None),
            heartbeat: AtomicU64::new(0),
            faults: Faults::default(),
            cpu: CpuLoad::start(cfg.load_threads)?,
            mem: MemLoad::default(),
            net: NetClient::start()?,
            fpga: Fpga::start()?,
            forwards: crate::forward::Forwards::default(),
            precopy: backend.precopy(),
            vms: Mutex::new(VmTable::new(backend)),
            events: Mutex::new(EventLog::new()),
            stop: AtomicBool::new(false),
            cfg,
        });
        card.log(
            0,
            1,
            format!("card-sim up: serial {:#x}, ABI {}.{}", card.cfg.serial, abi::ABI_MAJOR, abi::ABI_MINOR),
        );
        card.refresh();
        Ok(card)
    }

    /// Start the heartbeat and mailbox threads.
    pub fn spawn_threads(self: &Arc<Self>) -> Result<(), SimError> {
        let c = self.clone();
        spawn_thread("heartbeat".into(), move || {
            let period = Duration::from_millis(c.cfg.period_ms as u64);
            let mut next = Instant::now() + period;
            while !c.stop.load(Ordering::Relaxed) {
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                next += period;
                if !c.faults.stall.load(Ordering::Relaxed) {
                    c.heartbeat.fetch_add(1, Ordering::Relaxed);
                }
                c.drain_consoles();
                c.refresh();
            }
        })?;
        let c = self.clone();
        spawn_thread("mailbox".into(), move || c.mailbox_loop())
    }

    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.doorbell.1.notify_all();
    }

    /// The card's cgroup as named on the command line, for `status`.
    pub fn cgroup_name(&self) -> Option<String> {
        self.cfg.cgroup.as_ref().map(|cg| cg.rel().display().to_string())
    }

    pub fn heartbeat(&self) -> u64 {
        self.heartbeat.load(Ordering::Relaxed)
    }

    pub fn log(&self, vm: u32, level: u16, message: String) {
        let time_ns = self.card_time_ns();
        lock(&self.events).push(time_ns, vm, level, message);
    }

    /// The card's monotonic clock (BAR0 `card_time_ns`, event and cost times).
    pub fn card_time_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Features this card offers (BAR0 0x64).
    pub fn features(&self) -> u32 {
        let mut f = 0;
        if self.cfg.fused_doorbell {
            f |= abi::FEATURE_FUSED_DOORBELL;
        }
        // The cost table is one response: offered only when a slot holds the
        // largest one.
        if self.cfg.slot_size as usize - HEADER_LEN >= card_link::costs::MAX_COSTS_LEN {
            f |= abi::FEATURE_VM_COSTS;
        }
        if self.precopy {
            f |= abi::FEATURE_PRECOPY | abi::FEATURE_AGENT_BULK;
        }
        f
    }

    /// The counters the card's engines charge for VM `id` (None: no such VM).
    pub fn vm_counters(&self, id: u32) -> Option<Arc<crate::costs::VmCounters>> {
        lock(&self.vms).counters(id)
    }

    /// One request to VM `id`'s management agent; None: no such VM.
    pub fn agent(
        &self,
        id: u32,
        op: vmm::host::api::AgentOp,
        arg: u64,
    ) -> Option<Result<vmm::Reply, crate::error::VmError>> {
        let mut t = lock(&self.vms);
        t.vm_mut(id).map(|vm| vm.agent(op, arg))
    }

    /// Stop every VM (the card is going down): each VM's process is
    /// stopped and its cgroup removed; what cannot be is logged.
    pub fn stop_vms(&self) {
        let vms = lock(&self.vms).drain();
        for (id, mut vm) in vms {
            if let Err(e) = vm.stop() {
                tracing::warn!(vm = id, error = %e, "stopping a VM as the card goes down");
            }
        }
    }

    pub(crate) fn drain_consoles(&self) {
        let lines: Vec<(u32, String)> = {
            let mut t = lock(&self.vms);
            t.take_consoles()
        };
        for (id, l) in lines {
            self.log(id, 2, l);
        }
    }

    /// CPU ns and memory bytes of the card: from its cgroup, or from the
    /// process itself when it runs without one.
    fn measure(&self) -> (u64, u64, u64, u64, u64) {
        if let Some(cg) = &self.cfg.cgroup {
            let cpu = cg.cpu_usage_ns().unwrap_or(0);
            let mem = cg.memory().ok().flatten().map_or(0, |m| m.usage_bytes);
            let peak = cg.memory_peak().unwrap_or(mem).max(mem);
            let limit = match cg.memory_limit() {
                Ok(Some(v)) => v,
                Ok(None) => 1 << 50,
                Err(_) => 512 << 20,
            }
            .clamp(1, 1 << 50);
            let cpus = std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1);
            let cap = match cg.cpu_quota() {
                Ok(Some((quota, period))) if period > 0 => quota * 1_000_000_000 / period,
                Ok(None) => cpus * 1_000_000_000,
                _ => 1_000_000_000,
            }
            .max(1);
            return (cpu, mem, peak, limit, cap);
        }
        // SAFETY: rusage is plain data filled by the kernel.
        let cpu = unsafe {
            let mut r: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut r);
            (r.ru_utime.tv_sec as u64 * 1_000_000
                + r.ru_utime.tv_usec as u64
                + r.ru_stime.tv_sec as u64 * 1_000_000
                + r.ru_stime.tv_usec as u64)
                * 1000
        };
        let rss = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0)
            * 4096;
        (cpu, rss, rss, 512 << 20, 1_000_000_000)
    }

    /// Sample every resource and rebuild the BAR0 register file.
    pub fn refresh(&self) {
        let (cpu_ns, mem, peak, limit, cpu_cap) = self.measure();
        let vm_count = lock(&self.vms).len() as u32;
        let snap = RegisterSnapshot {
            abi_minor: abi::ABI_MINOR,
            serial: self.cfg.serial,
            model: "card-sim mc-board".into(),
            heartbeat: self.heartbeat(),
            heartbeat_period_ms: self.cfg.period_ms,
            health: Health::Ok,
            card_time_ns: self.card_time_ns(),
            mailbox_slots: self.cfg.slots,
            mailbox_slot_size: self.cfg.slot_size,
            vm_count,
            features: self.features(),
            resources: vec![
                Resource {
                    kind: ResourceKind::Fpga,
                    capacity: 1_000_000_000,
                    used: self.fpga.depth(),
                    total: self.fpga.busy_ns(),
                },
                Resource { kind: ResourceKind::Cpu, capacity: cpu_cap, used: 0, total: cpu_ns },
                Resource { kind: ResourceKind::Memory, capacity: limit, used: mem, total: peak },
                Resource {
                    kind: ResourceKind::Network,
                    capacity: self.cfg.net_capacity_bps.max(1),
                    used: 0,
                    total: self.net.bytes.load(Ordering::Relaxed),
                },
            ],
        };
        let enc = snap.encode();
        let mut b = lock(&self.bar0);
        b[..enc.len()].copy_from_slice(&enc);
    }

    fn signal(&self) {
        if let Some(f) = lock(&self.irq).as_mut() {
            // A lost interrupt costs the host one poll slice (it re-checks
            // RESP_PRODUCED every 50 ms), so it is not an error of the card.
            if let Err(e) = f.write_all(&1u64.to_le_bytes()) {
                tracing::debug!("completion interrupt not delivered: {e}");
            }
        }
    }

    fn reg(b: &[u8], off: u64) -> u32 {
        mailbox::get_reg(b, off).unwrap_or(0)
    }

    fn mailbox_loop(&self) {
        while !self.stop.load(Ordering::Relaxed) {
            {
                let (m, cv) = &self.doorbell;
                let mut rung = lock(m);
                if !*rung {
                    rung = cv
                        .wait_timeout(rung, Duration::from_millis(50))
                        .map(|r| r.0)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
                *rung = false;
            }
            let _serving = lock(&self.serving);
            self.serve_ring(false);
        }
    }

    /// Called on the vfio-user thread right after a doorbell write: quick
    /// commands are answered at once (saving a thread hand-off per command);
    /// anything else, or a busy mailbox thread, is left to the mailbox thread
    /// so a long command never blocks register reads.
    pub(crate) fn ring_doorbell(&self) {
        let drained = match self.serving.try_lock() {
            Ok(_serving) => self.serve_ring(true),
            Err(_) => false,
        };
        if !drained {
            let (m, cv) = &self.doorbell;
            *lock(m) = true;
            cv.notify_one();
        }
    }

    /// Answer pending requests in order; true when the ring is empty.
    /// Callers hold `serving`.
    fn serve_ring(&self, inline: bool) -> bool {
        let (slots, slot_size) = (self.cfg.slots, self.cfg.slot_size);
        let max_payload = slot_size as usize - HEADER_LEN;
        loop {
            if self.faults.stall.load(Ordering::Relaxed) || self.stop.load(Ordering::Relaxed) {
                return false;
            }
            let slow = self.faults.slow_ms.load(Ordering::Relaxed);
            let (req, index) = {
                let b = lock(&self.bar2);
                let produced = Self::reg(&b, mailbox::REG_REQ_PRODUCED);
                let consumed = Self::reg(&b, mailbox::REG_REQ_CONSUMED);
                if produced == consumed {
                    return true;
                }
                let off = mailbox::req_slot_offset(slots, slot_size, consumed) as usize;
                let slot = &b[off..off + slot_size as usize];
                (Message::decode(slot, max_payload), consumed)
            };
            if inline && (slow > 0 || !req.as_ref().map(|m| quick(m.op)).unwrap_or(true)) {
                return false;
            }
            if slow > 0 {
                std::thread::sleep(Duration::from_millis(slow));
            }
            let resp = match req {
                Ok(m) if m.kind == mailbox::Kind::Request => self.handle(&m, max_payload),
                Ok(m) => Message::response_to(&m, Status::BadRequest, 0, 0, b"not a request".to_vec()),
                Err(e) => {
                    let dummy = Message::request(Op::Echo, 0, 0, 0, 0, Vec::new());
                    Message::response_to(&dummy, Status::BadRequest, 0, 0, e.to_string().into_bytes())
                }
            };
            {
                let mut b = lock(&self.bar2);
                let off = mailbox::resp_slot_offset(slots, slot_size, index) as usize;
                let slot = &mut b[off..off + slot_size as usize];
                if resp.encode_into(slot).is_none() {
                    // Cannot happen (payloads are bounded by the slot), but never
                    // write past it. This short answer always fits a slot, so the
                    // size `encode_into` returns says nothing new.
                    let why = b"response larger than a slot".to_vec();
                    let _ = Message::response_to(&resp, Status::Internal, 0, 0, why).encode_into(slot);
                }
                let next = index.wrapping_add(1);
                b[mailbox::REG_REQ_CONSUMED as usize..][..4].copy_from_slice(&next.to_le_bytes());
                b[mailbox::REG_RESP_PRODUCED as usize..][..4].copy_from_slice(&next.to_le_bytes());
            }
            self.signal();
        }
    }
}

/// Commands cheap enough to answer on the vfio-user thread.
fn quick(op: Op) -> bool {
    matches!(
        op,
        Op::Echo | Op::ListVms | Op::ReadEvents | Op::SnapshotRead | Op::RestoreBegin | Op::RestoreWrite | Op::VmCosts
    )
}
