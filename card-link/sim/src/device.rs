//! The card as a PCI function served over vfio-user: BAR0 (register file,
//! refreshed every heartbeat), BAR2 (mailbox memory), the completion
//! interrupt, and the threads behind them (heartbeat/telemetry, mailbox).
//!
//! Both BARs are shared memory (memfds, `card_link::shm`): offered to the
//! host as mmap-able areas (ABI 1.3, feature MAPPED) unless `SimConfig::mmap`
//! is off, and served by message either way. The mailbox thread watches
//! REQ_PRODUCED in memory: it spins for a while after each command, then
//! sleeps on that word as a futex, flagging REG_CARD_WAITING so a host that
//! rings in memory knows to wake it.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use card_link::abi::{self, Health, RegisterSnapshot, Resource, ResourceKind, BAR0_SIZE};
use card_link::mailbox::{self, Message, Op, Status, HEADER_LEN};
use card_link::shm::SharedMem;
use cgroupfs::Cgroup;

use crate::commands::{EventLog, VmTable};
use crate::error::SimError;
use crate::fpga::Fpga;
use crate::load::{CpuLoad, MemLoad, NetClient};
pub use crate::pci::{irqs, regions, remove_stale_socket, serve, Backend, BarFds};
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
    /// Offer BAR0 and BAR2 as mmap-able areas and DMA streams (ABI 1.3
    /// features MAPPED and DMA_STREAM); off, the card looks like a 1.2
    /// card to the host (`card-sim --no-mmap`).
    pub mmap: bool,
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
            mmap: true,
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
    /// The vfio-user link holds every request until cleared.
    pub silent: AtomicBool,
}

/// How long the mailbox thread keeps polling REQ_PRODUCED after its last
/// command before it sleeps on the futex: a host issuing commands back to
/// back (a snapshot stream, a burst of telemetry) finds it awake, at the
/// cost of this much card CPU per burst.
const CARD_SPIN: Duration = Duration::from_micros(100);
/// The poll after a snapshot stream's chunk: the host asks for the next
/// one as soon as it has taken this one, so the card stays awake for it.
const STREAM_SPIN: Duration = Duration::from_millis(2);
/// The first part of a poll that does not yield the CPU.
const PURE_SPIN: Duration = Duration::from_micros(5);
/// The mailbox thread's longest sleep (re-checks stop and stall).
const CARD_SLEEP: Duration = Duration::from_millis(50);
/// How often a command held by the slow fault looks whether it is cleared.
const SLOW_STEP: Duration = Duration::from_millis(5);

/// A host buffer DMA-mapped to the card (vfio-user DMA_MAP).
pub(crate) struct DmaWindow {
    pub(crate) iova: u64,
    pub(crate) mem: Arc<SharedMem>,
}

pub struct SimCard {
    pub cfg: SimConfig,
    start: Instant,
    /// BAR0 memory; `bar0_lock` serialises its writers (and message reads,
    /// which must not see a half-written file).
    pub(crate) bar0: SharedMem,
    pub(crate) bar0_lock: Mutex<()>,
    /// BAR2 memory; `bar2_lock` makes the card's own register updates and a
    /// message write with its fused doorbell check atomic with each other
    /// (a mapped host is outside it, as the protocol allows).
    pub(crate) bar2: SharedMem,
    pub(crate) bar2_lock: Mutex<()>,
    pub(crate) dma: Mutex<Vec<DmaWindow>>,
    /// The last command served was a DMA stream's chunk (poll longer).
    pub(crate) streaming: AtomicBool,
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

/// The card's firmware threads (the link, the mailbox, the heartbeat) run
/// before its data-plane work (relaying user traffic, the load knob, the
/// VMs) when the card's CPU is contended, as firmware on cores of its own
/// would (`cgroupfs::priority`). Best effort: without the privilege the
/// card runs on as it is.
pub fn firmware_priority() {
    if let Err(e) = cgroupfs::priority::raise_this_thread() {
        tracing::debug!("firmware thread priority not raised: {e}");
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
        let shm = |name: &'static str, len: u64| {
            SharedMem::create(name, len as usize).map_err(|source| SimError::SharedMemory { name, source })
        };
        let bar2 = shm("card-bar2", mailbox::bar2_size(cfg.slots, cfg.slot_size))?;
        let set = |reg: u64, v: u32| bar2.word(reg as usize).map(|w| w.store(v, Ordering::Relaxed));
        set(mailbox::REG_SLOTS, cfg.slots)
            .and(set(mailbox::REG_SLOT_SIZE, cfg.slot_size))
            .map_err(|source| SimError::SharedMemory { name: "card-bar2", source })?;
        let card = Arc::new(SimCard {
            start: Instant::now(),
            bar0: shm("card-bar0", BAR0_SIZE)?,
            bar0_lock: Mutex::new(()),
            bar2,
            bar2_lock: Mutex::new(()),
            dma: Mutex::new(Vec::new()),
            streaming: AtomicBool::new(false),
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
            firmware_priority();
            let period = Duration::from_millis(c.cfg.period_ms as u64);
            let mut next = Instant::now() + period;
            while !c.stop.load(Ordering::Relaxed) {
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                let late = Instant::now().saturating_duration_since(next);
                if late > period {
                    // The firmware's own clock says the card did not get to run.
                    tracing::warn!("card-sim: the heartbeat thread woke {} ms late", late.as_millis());
                }
                next += period;
                if !c.faults.stall.load(Ordering::Relaxed) {
                    c.heartbeat.fetch_add(1, Ordering::Relaxed);
                }
                c.drain_consoles();
                c.refresh();
            }
        })?;
        let c = self.clone();
        spawn_thread("mailbox".into(), move || {
            firmware_priority();
            c.mailbox_loop()
        })
    }

    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wake_mailbox();
    }

    /// Wake the mailbox thread if it sleeps on REQ_PRODUCED.
    fn wake_mailbox(&self) {
        if let Err(e) = self.bar2.futex_wake(mailbox::REG_REQ_PRODUCED as usize) {
            tracing::debug!("waking the mailbox thread: {e}");
        }
    }

    fn word(&self, reg: u64) -> &std::sync::atomic::AtomicU32 {
        // Every REG_* is an aligned offset well inside BAR2 (which holds
        // the rings after 0x1000), so this cannot fail.
        match self.bar2.word(reg as usize) {
            Ok(w) => w,
            Err(e) => unreachable!("BAR2 register {reg:#x}: {e}"),
        }
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
        if self.cfg.mmap {
            f |= abi::FEATURE_MAPPED | abi::FEATURE_DMA_STREAM;
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
        let mut enc = snap.encode();
        if self.faults.garbage.load(Ordering::Relaxed) {
            crate::pci::garbage(&mut enc);
        }
        let _writer = lock(&self.bar0_lock);
        if let Err(e) = abi::publish_mapped(&self.bar0, &enc) {
            tracing::error!("publishing BAR0: {e}");
        }
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

    /// A request waits: REQ_PRODUCED is ahead of REQ_CONSUMED.
    fn request_waiting(&self) -> bool {
        self.word(mailbox::REG_REQ_PRODUCED).load(Ordering::SeqCst)
            != self.word(mailbox::REG_REQ_CONSUMED).load(Ordering::Relaxed)
    }

    /// Serve requests as they come: poll REQ_PRODUCED while recently busy,
    /// else sleep on it (flagging REG_CARD_WAITING first, then looking once
    /// more, so a host ringing in between is never missed: it either sees
    /// the flag or we see its count).
    fn mailbox_loop(&self) {
        let mut busy_at = Instant::now();
        let mut spin = CARD_SPIN;
        while !self.stop.load(Ordering::Relaxed) {
            let stalled = self.faults.stall.load(Ordering::Relaxed);
            if !stalled && self.request_waiting() {
                let _serving = lock(&self.serving);
                self.serve_ring(false);
                busy_at = Instant::now();
                spin = if self.streaming.swap(false, Ordering::Relaxed) { STREAM_SPIN } else { CARD_SPIN };
                continue;
            }
            if !stalled && busy_at.elapsed() < spin {
                // Past the first microseconds, let whatever shares this CPU
                // run between looks: it may be the host's thread, whose
                // next request we are waiting for.
                if busy_at.elapsed() < PURE_SPIN {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
                continue;
            }
            let waiting = self.word(mailbox::REG_CARD_WAITING);
            waiting.store(1, Ordering::SeqCst);
            let seen = self.word(mailbox::REG_REQ_PRODUCED).load(Ordering::SeqCst);
            if stalled || seen == self.word(mailbox::REG_REQ_CONSUMED).load(Ordering::Relaxed) {
                if let Err(e) = self.bar2.futex_wait(mailbox::REG_REQ_PRODUCED as usize, seen, CARD_SLEEP) {
                    tracing::warn!("mailbox thread sleep: {e}");
                    std::thread::sleep(CARD_SLEEP);
                }
            }
            waiting.store(0, Ordering::SeqCst);
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
            self.wake_mailbox();
        }
    }

    /// The slow fault: hold a command `d`, but only while the fault is on.
    /// A wait begun under it ends when it is cleared, so a card that was
    /// slow for a moment is not still slow long after (the chaos test clears
    /// the fault within a millisecond and then expects quick answers).
    fn slow_wait(&self, d: Duration) {
        let until = Instant::now() + d;
        while self.faults.slow_ms.load(Ordering::Relaxed) > 0 && !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= until {
                break;
            }
            std::thread::sleep((until - now).min(SLOW_STEP));
        }
    }

    /// The silent fault: hold the link's current request while it is on
    /// (or until the card shuts down).
    pub(crate) fn silent_wait(&self) {
        while self.faults.silent.load(Ordering::Relaxed) && !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(SLOW_STEP);
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
                let produced = self.word(mailbox::REG_REQ_PRODUCED).load(Ordering::Acquire);
                let consumed = self.word(mailbox::REG_REQ_CONSUMED).load(Ordering::Relaxed);
                if produced == consumed {
                    return true;
                }
                let off = mailbox::req_slot_offset(slots, slot_size, consumed) as usize;
                (self.read_request(off, max_payload), consumed)
            };
            if inline && (slow > 0 || !req.as_ref().map(|m| quick(m.op)).unwrap_or(true)) {
                return false;
            }
            if slow > 0 {
                self.slow_wait(Duration::from_millis(slow));
            }
            let resp = match req {
                Ok(m) if m.kind == mailbox::Kind::Request => self.handle(&m, max_payload),
                Ok(m) => Message::response_to(&m, Status::BadRequest, 0, 0, b"not a request".to_vec()),
                Err(e) => {
                    let dummy = Message::request(Op::Echo, 0, 0, 0, 0, Vec::new());
                    Message::response_to(&dummy, Status::BadRequest, 0, 0, e.to_string().into_bytes())
                }
            };
            let off = mailbox::resp_slot_offset(slots, slot_size, index) as usize;
            let mut bytes = resp.encode();
            if bytes.len() > slot_size as usize {
                // Cannot happen (payloads are bounded by the slot), but never
                // write past it: this short answer always fits.
                bytes = Message::response_to(&resp, Status::Internal, 0, 0, b"response larger than a slot".to_vec())
                    .encode();
            }
            if let Err(e) = self.bar2.write(off, &bytes) {
                tracing::error!("writing response slot {off:#x}: {e}");
            }
            {
                // The slot first, then the counters (release): a host that
                // sees RESP_PRODUCED move sees the whole response.
                let _regs = lock(&self.bar2_lock);
                let next = index.wrapping_add(1);
                self.word(mailbox::REG_REQ_CONSUMED).store(next, Ordering::Release);
                self.word(mailbox::REG_RESP_PRODUCED).store(next, Ordering::Release);
            }
            self.signal();
        }
    }
}

impl SimCard {
    /// Copy one request out of its slot (header, then the payload it
    /// states) and decode the copy: the host may rewrite the slot meanwhile.
    fn read_request(&self, off: usize, max_payload: usize) -> card_link::Result<Message> {
        let mut buf = vec![0u8; HEADER_LEN];
        self.bar2.read(off, &mut buf)?;
        let len = Message::peek_payload_len(&buf)?.min(max_payload);
        buf.resize(HEADER_LEN + len, 0);
        self.bar2.read(off + HEADER_LEN, &mut buf[HEADER_LEN..])?;
        Message::decode(&buf, max_payload)
    }

    /// The host buffer mapped at the chunk `d` names, and the chunk's offset in it.
    pub(crate) fn dma_window(&self, d: &mailbox::DmaDesc) -> Result<(Arc<SharedMem>, usize), String> {
        let windows = lock(&self.dma);
        for w in windows.iter() {
            if let Ok(off) = d.offset_in(w.iova, w.mem.len() as u64) {
                return Ok((w.mem.clone(), off));
            }
        }
        Err(format!("no DMA mapping holds {:#x}+{}", d.iova, d.len))
    }
}

/// Commands cheap enough to answer on the vfio-user thread.
fn quick(op: Op) -> bool {
    matches!(
        op,
        Op::Echo
            | Op::ListVms
            | Op::ReadEvents
            | Op::SnapshotRead
            | Op::RestoreBegin
            | Op::RestoreWrite
            | Op::VmCosts
            | Op::SnapshotReadDma
            | Op::RestoreWriteDma
    )
}
