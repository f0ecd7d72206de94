//! The card as a PCI function served over vfio-user: BAR0 (register file,
//! refreshed every heartbeat), BAR2 (mailbox memory), the completion
//! interrupt, and the threads behind them (heartbeat/telemetry, mailbox).

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::mem::size_of;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_IRQ_INFO_EVENTFD, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_BAR2_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{IrqInfo, Server, ServerBackend, ServerRegion};

use super::cgroup::CardCgroup;
use super::fpga::Fpga;
use super::load::{CpuLoad, MemLoad, NetClient};
use super::vms::{ManagedVm, ModelBackend, VmBackend};
use crate::abi::{self, Health, RegisterSnapshot, Resource, ResourceKind, BAR0_SIZE};
use crate::mailbox::{self, Event, Message, Op, Status, VmInfo, VmSpec, VmState, HEADER_LEN};

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub socket: PathBuf,
    pub control: Option<PathBuf>,
    pub period_ms: u32,
    pub serial: u64,
    /// Name of the card's cgroup (already created and joined by the caller),
    /// or None to account the process itself (library/in-process use).
    pub cgroup: Option<String>,
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

struct VmEntry {
    spec: VmSpec,
    state: VmState,
    vm: Box<dyn ManagedVm>,
    snapshot: Option<Vec<u8>>,
}

struct Restore {
    spec: VmSpec,
    size: u64,
    data: Vec<u8>,
}

struct VmTable {
    backend: Box<dyn VmBackend>,
    next_id: u32,
    vms: BTreeMap<u32, VmEntry>,
    restores: BTreeMap<u32, Restore>,
}

const EVENT_CAP: usize = 4096;

#[derive(Default)]
struct EventLog {
    next_seq: u64,
    entries: VecDeque<Event>,
}

pub struct SimCard {
    pub cfg: SimConfig,
    start: Instant,
    bar0: Mutex<Vec<u8>>,
    bar2: Mutex<Vec<u8>>,
    doorbell: (Mutex<bool>, Condvar),
    /// Held by whoever answers requests, so they are answered one at a time, in order.
    serving: Mutex<()>,
    irq: Mutex<Option<File>>,
    heartbeat: AtomicU64,
    pub faults: Faults,
    pub cgroup: Option<CardCgroup>,
    pub cpu: CpuLoad,
    pub mem: MemLoad,
    pub net: NetClient,
    pub fpga: Fpga,
    vms: Mutex<VmTable>,
    events: Mutex<EventLog>,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SimCard {
    pub fn new(cfg: SimConfig) -> Arc<SimCard> {
        Self::with_backend(cfg, Box::new(ModelBackend))
    }

    pub fn with_backend(cfg: SimConfig, backend: Box<dyn VmBackend>) -> Arc<SimCard> {
        let cgroup = cfg.cgroup.as_deref().map(CardCgroup::locate);
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
            cgroup,
            cpu: CpuLoad::start(cfg.load_threads),
            mem: MemLoad::default(),
            net: NetClient::start(),
            fpga: Fpga::start(),
            vms: Mutex::new(VmTable { backend, next_id: 1, vms: BTreeMap::new(), restores: BTreeMap::new() }),
            events: Mutex::new(EventLog { next_seq: 1, entries: VecDeque::new() }),
            stop: AtomicBool::new(false),
            cfg,
        });
        card.log(
            0,
            1,
            format!("card-sim up: serial {:#x}, ABI {}.{}", card.cfg.serial, abi::ABI_MAJOR, abi::ABI_MINOR),
        );
        card.refresh();
        card
    }

    /// Start the heartbeat and mailbox threads.
    pub fn spawn_threads(self: &Arc<Self>) {
        let c = self.clone();
        let _ = std::thread::Builder::new().name("heartbeat".into()).spawn(move || {
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
        });
        let c = self.clone();
        let _ = std::thread::Builder::new().name("mailbox".into()).spawn(move || c.mailbox_loop());
    }

    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.doorbell.1.notify_all();
    }

    pub fn heartbeat(&self) -> u64 {
        self.heartbeat.load(Ordering::Relaxed)
    }

    pub fn log(&self, vm: u32, level: u16, message: String) {
        let mut l = lock(&self.events);
        let seq = l.next_seq;
        l.next_seq += 1;
        let time_ns = self.start.elapsed().as_nanos() as u64;
        l.entries.push_back(Event { seq, time_ns, vm, level, message });
        while l.entries.len() > EVENT_CAP {
            l.entries.pop_front();
        }
    }

    fn drain_consoles(&self) {
        let lines: Vec<(u32, String)> = {
            let mut t = lock(&self.vms);
            t.vms.iter_mut().flat_map(|(id, e)| e.vm.take_console().into_iter().map(move |l| (*id, l))).collect()
        };
        for (id, l) in lines {
            self.log(id, 2, l);
        }
    }

    /// CPU ns and memory bytes of the card: from its cgroup, or from the
    /// process itself when it runs without one.
    fn measure(&self) -> (u64, u64, u64, u64, u64) {
        if let Some(cg) = &self.cgroup {
            let cpu = cg.cpu_usage_ns().unwrap_or(0);
            let mem = cg.memory_bytes().unwrap_or(0);
            let peak = cg.memory_peak().unwrap_or(mem).max(mem);
            let limit = cg.memory_limit().unwrap_or(512 << 20).clamp(1, 1 << 50);
            let cap = cg.cpu_capacity_ns().unwrap_or(1_000_000_000).max(1);
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
        let vm_count = lock(&self.vms).vms.len() as u32;
        let snap = RegisterSnapshot {
            abi_minor: abi::ABI_MINOR,
            serial: self.cfg.serial,
            model: "card-sim mc-board".into(),
            heartbeat: self.heartbeat(),
            heartbeat_period_ms: self.cfg.period_ms,
            health: Health::Ok,
            card_time_ns: self.start.elapsed().as_nanos() as u64,
            mailbox_slots: self.cfg.slots,
            mailbox_slot_size: self.cfg.slot_size,
            vm_count,
            features: if self.cfg.fused_doorbell { abi::FEATURE_FUSED_DOORBELL } else { 0 },
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
            let _ = f.write_all(&1u64.to_le_bytes());
        }
    }

    fn reg(b: &[u8], off: u64) -> u32 {
        crate::wire::get_u32(b, off as usize).unwrap_or(0)
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
    fn ring_doorbell(&self) {
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
                let enc = resp.encode();
                b[off..off + enc.len()].copy_from_slice(&enc);
                let next = index.wrapping_add(1);
                b[mailbox::REG_REQ_CONSUMED as usize..][..4].copy_from_slice(&next.to_le_bytes());
                b[mailbox::REG_RESP_PRODUCED as usize..][..4].copy_from_slice(&next.to_le_bytes());
            }
            self.signal();
        }
    }

    fn handle(&self, m: &Message, max_payload: usize) -> Message {
        match self.execute(m, max_payload) {
            Ok((a0, a1, p)) => Message::response_to(m, Status::Ok, a0, a1, p),
            Err((st, why)) => {
                self.log(m.vm, 3, format!("{} refused: {why}", m.op.name()));
                Message::response_to(m, st, 0, 0, why.into_bytes())
            }
        }
    }

    fn execute(&self, m: &Message, max_payload: usize) -> Result<(u64, u64, Vec<u8>), (Status, String)> {
        let bad = |s: String| (Status::BadRequest, s);
        let no_vm = || (Status::NoSuchVm, format!("no VM {}", m.vm));
        let vmerr = |s: String| (Status::Internal, s);
        match m.op {
            Op::Echo => Ok((m.arg0, m.arg1, m.payload.clone())),
            Op::Start => {
                let spec = VmSpec::decode(&m.payload).map_err(|e| bad(e.to_string()))?;
                let mut t = lock(&self.vms);
                if t.vms.len() >= mailbox::MAX_VMS as usize {
                    return Err((Status::Busy, "VM table full".into()));
                }
                if t.vms.values().any(|e| e.spec.name == spec.name) {
                    return Err((Status::Exists, format!("VM {} exists", spec.name)));
                }
                let id = t.next_id;
                t.next_id += 1;
                let vm = t.backend.start(id, &spec).map_err(vmerr)?;
                t.vms.insert(id, VmEntry { spec: spec.clone(), state: VmState::Running, vm, snapshot: None });
                drop(t);
                self.log(id, 1, format!("started VM {} ({} MiB)", spec.name, spec.mem_mib));
                self.drain_consoles();
                Ok((id as u64, 0, Vec::new()))
            }
            Op::Stop => {
                let mut e = lock(&self.vms).vms.remove(&m.vm).ok_or_else(no_vm)?;
                let r = e.vm.stop();
                for l in e.vm.take_console() {
                    self.log(m.vm, 2, l);
                }
                r.map_err(vmerr)?;
                self.log(m.vm, 1, format!("stopped VM {}", e.spec.name));
                Ok((0, 0, Vec::new()))
            }
            Op::Pause | Op::Resume => {
                let mut t = lock(&self.vms);
                let e = t.vms.get_mut(&m.vm).ok_or_else(no_vm)?;
                if m.op == Op::Pause {
                    e.vm.pause().map_err(vmerr)?;
                    e.state = VmState::Paused;
                } else {
                    e.vm.resume().map_err(vmerr)?;
                    e.state = VmState::Running;
                    e.snapshot = None;
                }
                Ok((0, 0, Vec::new()))
            }
            Op::Snapshot => {
                let mut t = lock(&self.vms);
                let e = t.vms.get_mut(&m.vm).ok_or_else(no_vm)?;
                if e.state == VmState::Running {
                    e.vm.pause().map_err(vmerr)?;
                    e.state = VmState::Paused;
                }
                let img = e.vm.snapshot().map_err(vmerr)?;
                let (len, crc) = (img.len() as u64, crc32fast::hash(&img));
                e.snapshot = Some(img);
                drop(t);
                self.log(m.vm, 1, format!("snapshot of VM {} taken: {len} bytes", m.vm));
                Ok((len, crc as u64, Vec::new()))
            }
            Op::SnapshotRead => {
                let t = lock(&self.vms);
                let e = t.vms.get(&m.vm).ok_or_else(no_vm)?;
                let img = e.snapshot.as_ref().ok_or((Status::BadState, "no snapshot taken".to_string()))?;
                let (off, len) = (m.arg0, m.arg1);
                let end = off.checked_add(len).filter(|&e| e <= img.len() as u64 && len as usize <= max_payload);
                let end = end.ok_or_else(|| bad(format!("chunk {off}+{len} outside image of {}", img.len())))?;
                Ok((off, 0, img[off as usize..end as usize].to_vec()))
            }
            Op::RestoreBegin => {
                let spec = VmSpec::decode(&m.payload).map_err(|e| bad(e.to_string()))?;
                if m.arg0 > crate::card::MAX_SNAPSHOT || m.arg0 > (spec.mem_mib as u64 + 16) << 20 {
                    return Err(bad(format!("image of {} bytes too large", m.arg0)));
                }
                let mut t = lock(&self.vms);
                let id = t.next_id;
                t.next_id += 1;
                t.restores.insert(id, Restore { spec, size: m.arg0, data: Vec::with_capacity(m.arg0 as usize) });
                Ok((id as u64, 0, Vec::new()))
            }
            Op::RestoreWrite => {
                let mut t = lock(&self.vms);
                let r = t.restores.get_mut(&m.vm).ok_or_else(no_vm)?;
                if m.arg0 != r.data.len() as u64 || r.data.len() as u64 + m.payload.len() as u64 > r.size {
                    return Err(bad(format!("chunk at {} out of order or past {} bytes", m.arg0, r.size)));
                }
                r.data.extend_from_slice(&m.payload);
                Ok((r.data.len() as u64, 0, Vec::new()))
            }
            Op::RestoreCommit => {
                let mut t = lock(&self.vms);
                let r = t.restores.remove(&m.vm).ok_or_else(no_vm)?;
                let crc = crc32fast::hash(&r.data) as u64;
                if r.data.len() as u64 != r.size || crc != m.arg0 {
                    return Err(bad(format!("image incomplete or corrupt ({} of {} bytes)", r.data.len(), r.size)));
                }
                let vm = t.backend.restore(m.vm, &r.spec, &r.data).map_err(vmerr)?;
                t.vms.insert(m.vm, VmEntry { spec: r.spec, state: VmState::Running, vm, snapshot: None });
                drop(t);
                self.log(m.vm, 1, format!("restored VM {}", m.vm));
                self.drain_consoles();
                Ok((m.vm as u64, 0, Vec::new()))
            }
            Op::ListVms => {
                let t = lock(&self.vms);
                let list: Vec<VmInfo> = t
                    .vms
                    .iter()
                    .map(|(id, e)| VmInfo {
                        id: *id,
                        state: e.state,
                        name: e.spec.name.clone(),
                        mem_bytes: e.vm.mem_bytes(),
                    })
                    .collect();
                Ok((list.len() as u64, 0, mailbox::encode_vm_list(&list)))
            }
            Op::ReadEvents => {
                let l = lock(&self.events);
                let max = m.arg1.min(256) as usize;
                let mut out = Vec::new();
                let mut size = 4;
                for e in l.entries.iter().filter(|e| e.seq >= m.arg0).take(max) {
                    size += 24 + e.message.len().min(mailbox::MAX_EVENT_MSG);
                    if size > max_payload {
                        break;
                    }
                    out.push(e.clone());
                }
                Ok((out.len() as u64, l.next_seq, mailbox::encode_events(&out)))
            }
        }
    }

    /// Create and test-drive ECS service requests (create/destroy management VM).
    pub fn ecs_create(&self, spec: &VmSpec) -> Result<u32, String> {
        let payload = spec.encode().map_err(|e| e.to_string())?;
        let m = Message::request(Op::Start, 0, 0, 0, 0, payload);
        let max = self.cfg.slot_size as usize - HEADER_LEN;
        let r = self.handle(&m, max);
        if r.status == Status::Ok {
            Ok(r.arg0 as u32)
        } else {
            Err(String::from_utf8_lossy(&r.payload).into_owned())
        }
    }

    pub fn ecs_destroy(&self, id: u32) -> Result<(), String> {
        let m = Message::request(Op::Stop, 0, id, 0, 0, Vec::new());
        let max = self.cfg.slot_size as usize - HEADER_LEN;
        let r = self.handle(&m, max);
        if r.status == Status::Ok {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&r.payload).into_owned())
        }
    }
}

/// A request written with the RING flag rings the doorbell, if its value is
/// the next count for exactly this slot and within the ring; otherwise the
/// write is only data (a host that lies about it just times out).
fn fused_doorbell(bar2: &mut [u8], data: &[u8], slot: u64, slots: u32) -> bool {
    let Some(ring) = mailbox::fused_ring(data) else { return false };
    let reg = |off: u64| crate::wire::get_u32(bar2, off as usize).unwrap_or(0);
    let (produced, consumed) = (reg(mailbox::REG_REQ_PRODUCED), reg(mailbox::REG_REQ_CONSUMED));
    let ahead = ring.wrapping_sub(consumed);
    let fits = (1..=slots).contains(&ahead) && (ring.wrapping_sub(1) % slots) as u64 == slot;
    if !fits || ring.wrapping_sub(produced) as i32 <= 0 {
        return false;
    }
    crate::wire::put_u32(bar2, mailbox::REG_REQ_PRODUCED as usize, ring);
    true
}

/// Commands cheap enough to answer on the vfio-user thread.
fn quick(op: Op) -> bool {
    matches!(op, Op::Echo | Op::ListVms | Op::ReadEvents | Op::SnapshotRead | Op::RestoreBegin | Op::RestoreWrite)
}

/// The vfio-user device backend handing region accesses to the card.
pub struct Backend(pub Arc<SimCard>);

fn einval(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, what)
}

impl ServerBackend for Backend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), std::io::Error> {
        let c = &self.0;
        let copy = |src: &[u8], data: &mut [u8]| -> Result<(), std::io::Error> {
            let end = (offset as usize).checked_add(data.len()).filter(|&e| e <= src.len());
            let end = end.ok_or_else(|| einval(format!("read {offset:#x}+{} outside region {region}", data.len())))?;
            data.copy_from_slice(&src[offset as usize..end]);
            Ok(())
        };
        match region {
            VFIO_PCI_BAR0_REGION_INDEX => {
                if c.faults.garbage.load(Ordering::Relaxed) {
                    garbage(data);
                    return Ok(());
                }
                copy(&lock(&c.bar0), data)
            }
            VFIO_PCI_BAR2_REGION_INDEX => copy(&lock(&c.bar2), data),
            _ => {
                data.fill(0);
                Ok(())
            }
        }
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        if region != VFIO_PCI_BAR2_REGION_INDEX {
            return Ok(()); // config space and BAR0 writes are ignored, as on the board
        }
        let c = &self.0;
        let (slots, slot_size) = (c.cfg.slots as u64, c.cfg.slot_size as u64);
        let req_ring = mailbox::RINGS_OFFSET..mailbox::RINGS_OFFSET + slots * slot_size;
        let end = offset.checked_add(data.len() as u64).ok_or_else(|| einval("overflow".into()))?;
        let doorbell = offset == mailbox::REG_REQ_PRODUCED && data.len() == 4;
        let consumed = offset == mailbox::REG_RESP_CONSUMED && data.len() == 4;
        let in_ring = req_ring.contains(&offset) && end <= req_ring.end;
        if !(doorbell || consumed || in_ring) {
            return Err(einval(format!("write {offset:#x}+{} is not host-writable", data.len())));
        }
        let mut ring = doorbell;
        {
            let mut b = lock(&c.bar2);
            b[offset as usize..end as usize].copy_from_slice(data);
            if in_ring && c.cfg.fused_doorbell && (offset - mailbox::RINGS_OFFSET).is_multiple_of(slot_size) {
                ring = fused_doorbell(&mut b, data, (offset - mailbox::RINGS_OFFSET) / slot_size, slots as u32);
            }
        }
        if ring {
            c.ring_doorbell();
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        _: vfio_user::DmaMapFlags,
        _: u64,
        _: u64,
        _: u64,
        _: Option<File>,
    ) -> Result<(), std::io::Error> {
        Ok(())
    }

    fn dma_unmap(&mut self, _: vfio_user::DmaUnmapFlags, _: u64, _: u64) -> Result<(), std::io::Error> {
        Ok(())
    }

    fn reset(&mut self) -> Result<(), std::io::Error> {
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        _flags: u32,
        _start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> Result<(), std::io::Error> {
        if index == VFIO_PCI_MSIX_IRQ_INDEX {
            *lock(&self.0.irq) = if count > 0 { fds.into_iter().next() } else { None };
        }
        Ok(())
    }
}

/// Deterministic but meaningless bytes (the garbage-registers fault).
fn garbage(data: &mut [u8]) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ Instant::now().elapsed().as_nanos() as u64;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

pub fn regions(cfg: &SimConfig) -> Vec<ServerRegion> {
    (0..VFIO_PCI_NUM_REGIONS)
        .map(|index| {
            let mut info =
                vfio_region_info { argsz: size_of::<vfio_region_info>() as u32, index, ..Default::default() };
            let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
            match index {
                VFIO_PCI_BAR0_REGION_INDEX => {
                    info.size = BAR0_SIZE;
                    info.flags = VFIO_REGION_INFO_FLAG_READ;
                }
                VFIO_PCI_BAR2_REGION_INDEX => {
                    info.size = mailbox::bar2_size(cfg.slots, cfg.slot_size);
                    info.flags = rw;
                }
                VFIO_PCI_CONFIG_REGION_INDEX => {
                    info.size = 256;
                    info.flags = rw;
                }
                _ => {}
            }
            ServerRegion { region_info: info, sparse_areas: Vec::new(), mmap_fd: None }
        })
        .collect()
}

pub fn irqs() -> Vec<IrqInfo> {
    (0..VFIO_PCI_NUM_IRQS)
        .map(|index| IrqInfo {
            index,
            count: u32::from(index == VFIO_PCI_MSIX_IRQ_INDEX),
            flags: if index == VFIO_PCI_MSIX_IRQ_INDEX { VFIO_IRQ_INFO_EVENTFD } else { 0 },
        })
        .collect()
}

/// Serve the card on its socket, one host connection at a time (a PCI
/// function has one driver), until `card.shutdown()`.
pub fn serve(card: Arc<SimCard>) -> Result<(), vfio_user::Error> {
    let _ = std::fs::remove_file(&card.cfg.socket);
    let server = Server::new(&card.cfg.socket, false, irqs(), regions(&card.cfg))?;
    let mut backend = Backend(card.clone());
    while !card.stop.load(Ordering::Relaxed) {
        if let Err(e) = server.run(&mut backend) {
            card.log(0, 3, format!("host connection ended: {e}"));
        }
        *lock(&card.irq) = None;
    }
    Ok(())
}
