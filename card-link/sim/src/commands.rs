//! The card's command handlers: what each mailbox op does to the card's VM
//! table and event log, and the ECS control service's create/destroy, which
//! go through the same handlers.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use card_link::costs::{VmCost, VmCosts};
use card_link::mailbox::{self, Event, Message, Op, Status, VmInfo, VmSpec, VmState, HEADER_LEN};

use crate::costs::VmCounters;
use crate::device::{lock, SimCard};
use crate::error::VmError;
use crate::vms::{ManagedVm, VmBackend};

/// The card refused an ECS service request, as it refuses a mailbox command:
/// the mailbox status and the reason it logged.
#[derive(Debug, thiserror::Error)]
#[error("{status}: {reason}")]
pub struct Refusal {
    pub status: Status,
    pub reason: String,
}

pub(crate) struct VmEntry {
    spec: VmSpec,
    state: VmState,
    vm: Box<dyn ManagedVm>,
    snapshot: Option<Vec<u8>>,
    /// Work the card's engines did for this VM. The entry holds the only
    /// strong reference: engines still working for a stopped VM charge nobody.
    counters: Arc<VmCounters>,
}

impl VmEntry {
    fn new(spec: VmSpec, vm: Box<dyn ManagedVm>) -> VmEntry {
        VmEntry { spec, state: VmState::Running, vm, snapshot: None, counters: Arc::default() }
    }
}

pub(crate) struct Restore {
    spec: VmSpec,
    size: u64,
    data: Vec<u8>,
    /// A diff for this paused VM (pre-copy), not a new VM.
    diff_for: Option<u32>,
}

pub(crate) struct VmTable {
    backend: Box<dyn VmBackend>,
    next_id: u32,
    vms: BTreeMap<u32, VmEntry>,
    restores: BTreeMap<u32, Restore>,
    /// A committed restore's buffer, kept for the next one.
    spare: Option<Vec<u8>>,
}

pub(crate) const EVENT_CAP: usize = 4096;

#[derive(Default)]
pub(crate) struct EventLog {
    next_seq: u64,
    entries: VecDeque<Event>,
}

impl VmTable {
    pub(crate) fn new(backend: Box<dyn VmBackend>) -> VmTable {
        VmTable { backend, next_id: 1, vms: BTreeMap::new(), restores: BTreeMap::new(), spare: None }
    }

    pub(crate) fn len(&self) -> usize {
        self.vms.len()
    }

    /// Keep a restore's buffer for the next one, up to a bound (it counts
    /// as the card's memory).
    fn keep_spare(&mut self, buf: Vec<u8>) {
        const MAX_SPARE: usize = 128 << 20;
        if buf.capacity() <= MAX_SPARE {
            self.spare = Some(buf);
        }
    }

    /// The counters the card's engines charge for VM `id`.
    pub(crate) fn counters(&self, id: u32) -> Option<Arc<VmCounters>> {
        self.vms.get(&id).map(|e| e.counters.clone())
    }

    /// VM `id`'s management VM, to ask its agent something.
    pub(crate) fn vm_mut(&mut self, id: u32) -> Option<&mut dyn ManagedVm> {
        self.vms.get_mut(&id).map(|e| &mut *e.vm as &mut dyn ManagedVm)
    }

    /// The processes of every VM (a crash kills them with the card).
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.vms.values().flat_map(|e| e.vm.pids()).collect()
    }

    /// Take every VM out of the table (the card is going down).
    pub(crate) fn drain(&mut self) -> Vec<(u32, Box<dyn ManagedVm>)> {
        std::mem::take(&mut self.vms).into_iter().map(|(id, e)| (id, e.vm)).collect()
    }

    /// The measured cost of every VM, sampled now; one VM that cannot be
    /// measured fails the whole table (a VM left out would look stopped).
    fn costs(&mut self, card_time_ns: u64) -> Result<VmCosts, (u32, VmError)> {
        let mut vms = Vec::with_capacity(self.vms.len());
        for (id, e) in self.vms.iter_mut() {
            let u = e.vm.usage().map_err(|err| (*id, err))?;
            vms.push(VmCost {
                vm: *id,
                source: u.source,
                cpu_ns: u.cpu_ns,
                memory_bytes: u.memory_bytes,
                net_bytes: e.counters.net_bytes(),
                fpga_busy_ns: e.counters.fpga_busy_ns(),
            });
        }
        Ok(VmCosts { card_time_ns, vms })
    }

    /// Console lines of every VM since the last call, with the VM id.
    pub(crate) fn take_consoles(&mut self) -> Vec<(u32, String)> {
        self.vms.iter_mut().flat_map(|(id, e)| e.vm.take_console().into_iter().map(move |l| (*id, l))).collect()
    }
}

impl EventLog {
    pub(crate) fn new() -> EventLog {
        EventLog { next_seq: 1, entries: VecDeque::new() }
    }

    pub(crate) fn push(&mut self, time_ns: u64, vm: u32, level: u16, message: String) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.push_back(Event { seq, time_ns, vm, level, message });
        while self.entries.len() > EVENT_CAP {
            self.entries.pop_front();
        }
    }
}

/// An empty buffer with room for `cap` bytes, backed by transparent huge
/// pages where the kernel allows (`madvise` mode): an image streamed in
/// then costs one page fault per 2 MiB instead of per 4 KiB, as a card's
/// DRAM would cost none. Advice refused is only slower.
fn huge_buffer(cap: usize) -> Vec<u8> {
    const HUGE: usize = 2 << 20;
    let v: Vec<u8> = Vec::with_capacity(cap);
    let start = (v.as_ptr() as usize).next_multiple_of(HUGE);
    let end = (v.as_ptr() as usize + cap) & !(HUGE - 1);
    if end > start {
        // SAFETY: advice on whole huge pages inside the Vec's own
        // allocation (rounded inwards); it changes no contents.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
    v
}

impl SimCard {
    pub(crate) fn handle(&self, m: &Message, max_payload: usize) -> Message {
        match self.execute(m, max_payload) {
            Ok((a0, a1, p)) => Message::response_to(m, Status::Ok, a0, a1, p),
            Err((st, why)) => {
                self.log(m.vm, 3, format!("{} refused: {why}", m.op.name()));
                Message::response_to(m, st, 0, 0, why.into_bytes())
            }
        }
    }

    /// A bulk exchange with a VM's agent failed. A VM its VMM stopped (a
    /// hostile answer, a fault) stays in the table as stopped, so list-vms
    /// shows it and the host can tell it from a busy or slow agent.
    fn agent_failed(&self, vm: u32, e: &mut VmEntry, err: VmError) -> (Status, String) {
        if err.vm_stopped() {
            e.state = VmState::Stopped;
            self.log(vm, 2, format!("VM {} stopped: {err}", e.spec.name));
            (Status::BadState, format!("VM {vm} stopped: {err}"))
        } else {
            (Status::Internal, err.to_string())
        }
    }

    fn execute(&self, m: &Message, max_payload: usize) -> Result<(u64, u64, Vec<u8>), (Status, String)> {
        let bad = |s: String| (Status::BadRequest, s);
        let no_vm = || (Status::NoSuchVm, format!("no VM {}", m.vm));
        let vmerr = |e: VmError| (Status::Internal, e.to_string());
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
                t.vms.insert(id, VmEntry::new(spec.clone(), vm));
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
                let flags = m.arg0;
                if flags & !(mailbox::SNAPSHOT_LIVE | mailbox::SNAPSHOT_DIFF) != 0 {
                    return Err(bad(format!("snapshot flags {flags:#x}: only LIVE and DIFF")));
                }
                let live = flags & mailbox::SNAPSHOT_LIVE != 0;
                let mut t = lock(&self.vms);
                let e = t.vms.get_mut(&m.vm).ok_or_else(no_vm)?;
                // A live base leaves the VM as it is; a full or diff
                // snapshot is of the paused VM.
                if e.state == VmState::Running && !live {
                    e.vm.pause().map_err(vmerr)?;
                    e.state = VmState::Paused;
                }
                let img = match flags {
                    mailbox::SNAPSHOT_LIVE => e.vm.snapshot_live(),
                    mailbox::SNAPSHOT_DIFF => e.vm.snapshot_diff(),
                    3 => e.vm.snapshot_live_diff(),
                    _ => e.vm.snapshot(),
                }
                .map_err(vmerr)?;
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
            Op::SnapshotReadDma => {
                self.streaming.store(true, std::sync::atomic::Ordering::Relaxed);
                let d = mailbox::DmaDesc::decode(&m.payload).map_err(|e| bad(e.to_string()))?;
                let (mem, at) = self.dma_window(&d).map_err(bad)?;
                let t = lock(&self.vms);
                let e = t.vms.get(&m.vm).ok_or_else(no_vm)?;
                let img = e.snapshot.as_ref().ok_or((Status::BadState, "no snapshot taken".to_string()))?;
                let off = m.arg0;
                let end = off.checked_add(d.len as u64).filter(|&e| e <= img.len() as u64);
                let end = end.ok_or_else(|| bad(format!("chunk {off}+{} outside image of {}", d.len, img.len())))?;
                mem.copy_in(at, &img[off as usize..end as usize]).map_err(|e| bad(e.to_string()))?;
                Ok((off, d.len as u64, Vec::new()))
            }
            Op::RestoreWriteDma => {
                self.streaming.store(true, std::sync::atomic::Ordering::Relaxed);
                let d = mailbox::DmaDesc::decode(&m.payload).map_err(|e| bad(e.to_string()))?;
                let (mem, at) = self.dma_window(&d).map_err(bad)?;
                let mut t = lock(&self.vms);
                let r = t.restores.get_mut(&m.vm).ok_or_else(no_vm)?;
                let have = r.data.len();
                if m.arg0 != have as u64 || have as u64 + d.len as u64 > r.size {
                    return Err(bad(format!("chunk at {} out of order or past {} bytes", m.arg0, r.size)));
                }
                mem.append_to(at, d.len as usize, &mut r.data).map_err(|e| bad(e.to_string()))?;
                Ok((r.data.len() as u64, 0, Vec::new()))
            }
            Op::RestoreBegin => {
                let spec = VmSpec::decode(&m.payload).map_err(|e| bad(e.to_string()))?;
                if m.arg0 > card_link::card::MAX_SNAPSHOT || m.arg0 > (spec.mem_mib as u64 + 16) << 20 {
                    return Err(bad(format!("image of {} bytes too large", m.arg0)));
                }
                let mut t = lock(&self.vms);
                // arg1 (1.2, PRECOPY): the paused VM this image is a diff for.
                let diff_for = match m.arg1 {
                    0 => None,
                    v => {
                        let vm = u32::try_from(v).map_err(|_| bad(format!("VM id {v} out of range")))?;
                        let e = t.vms.get(&vm).ok_or_else(no_vm)?;
                        if e.state != VmState::Paused {
                            return Err((Status::BadState, format!("VM {vm} must be paused to take a diff")));
                        }
                        if t.restores.contains_key(&vm) {
                            return Err((Status::Busy, format!("a diff for VM {vm} is already being written")));
                        }
                        Some(vm)
                    }
                };
                let id = match diff_for {
                    Some(vm) => vm,
                    None => {
                        let id = t.next_id;
                        t.next_id += 1;
                        id
                    }
                };
                // The last restore's buffer, if large enough: its pages are
                // in place (a card's DMA landing zone is not re-zeroed).
                let data = match t.spare.take() {
                    Some(mut v) if v.capacity() >= m.arg0 as usize => {
                        v.clear();
                        v
                    }
                    _ => huge_buffer(m.arg0 as usize),
                };
                t.restores.insert(id, Restore { spec, size: m.arg0, data, diff_for });
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
                if m.arg1 & !mailbox::RESTORE_PAUSED != 0 {
                    return Err(bad(format!("restore flags {:#x}", m.arg1)));
                }
                if let Some(vm) = r.diff_for {
                    let e = t.vms.get_mut(&vm).ok_or_else(no_vm)?;
                    e.vm.apply_diff(&r.data).map_err(vmerr)?;
                    t.keep_spare(r.data);
                    drop(t);
                    self.log(vm, 1, format!("applied a diff of {} bytes to VM {vm}", r.size));
                    return Ok((vm as u64, 0, Vec::new()));
                }
                let paused = m.arg1 & mailbox::RESTORE_PAUSED != 0;
                let vm = if paused {
                    t.backend.restore_paused(m.vm, &r.spec, &r.data)
                } else {
                    t.backend.restore(m.vm, &r.spec, &r.data)
                }
                .map_err(vmerr)?;
                let mut entry = VmEntry::new(r.spec, vm);
                if paused {
                    entry.state = VmState::Paused;
                }
                t.vms.insert(m.vm, entry);
                t.keep_spare(r.data);
                drop(t);
                self.log(m.vm, 1, format!("restored VM {}{}", m.vm, if paused { " (paused)" } else { "" }));
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
            Op::AgentBulk => {
                // The host's message is checked whole, as the agent would.
                let answer = match m.arg0 {
                    mailbox::BULK_MONITOR => {
                        let (seq, tick_ms, signals) =
                            crate::bulk::decode_telemetry(&m.payload).map_err(|f| bad(format!("field {f}")))?;
                        let changes = {
                            let mut t = lock(&self.vms);
                            let e = t.vms.get_mut(&m.vm).ok_or_else(no_vm)?;
                            match e.vm.monitor_tick(seq, tick_ms, &signals) {
                                Ok(x) => x,
                                Err(err) => return Err(self.agent_failed(m.vm, e, err)),
                            }
                        };
                        crate::bulk::encode_health(seq, &changes).map_err(|f| bad(format!("agent answer: {f}")))?
                    }
                    mailbox::BULK_LOG => {
                        let (seq, epoch, records) =
                            crate::bulk::decode_log_lines(&m.payload).map_err(|f| bad(format!("field {f}")))?;
                        let acks = {
                            let mut t = lock(&self.vms);
                            let e = t.vms.get_mut(&m.vm).ok_or_else(no_vm)?;
                            match e.vm.log_take(seq, epoch, &records) {
                                Ok(x) => x,
                                Err(err) => return Err(self.agent_failed(m.vm, e, err)),
                            }
                        };
                        crate::bulk::encode_log_acks(seq, &acks)
                    }
                    mailbox::BULK_QOS => {
                        let (seq, card, vms) =
                            crate::bulk::decode_qos_tick(&m.payload).map_err(|f| bad(format!("field {f}")))?;
                        let changes = {
                            let mut t = lock(&self.vms);
                            let e = t.vms.get_mut(&m.vm).ok_or_else(no_vm)?;
                            match e.vm.qos_tick(seq, card, &vms) {
                                Ok(x) => x,
                                Err(err) => return Err(self.agent_failed(m.vm, e, err)),
                            }
                        };
                        crate::bulk::encode_qos_changes(seq, &changes).map_err(|f| bad(format!("agent answer: {f}")))?
                    }
                    other => return Err(bad(format!("agent task {other}"))),
                };
                if answer.len() > max_payload {
                    return Err((Status::Internal, format!("agent answer of {} bytes exceeds a slot", answer.len())));
                }
                Ok((0, 0, answer))
            }
            Op::VmCosts => {
                // Sampled at the request, stamped with the card's clock (the
                // one BAR0 reports), so the host's rates use the card's time.
                let now = self.card_time_ns();
                let costs = lock(&self.vms)
                    .costs(now)
                    .map_err(|(id, e)| (Status::Internal, format!("cannot measure VM {id}: {e}")))?;
                let table = costs.encode();
                if table.len() > max_payload {
                    return Err((Status::Internal, format!("cost table of {} bytes exceeds a slot", table.len())));
                }
                Ok((costs.vms.len() as u64, 0, table))
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

    /// The ECS control service's "create a management VM": the same path as
    /// the mailbox's start command, so both are logged and refused alike.
    pub fn ecs_create(&self, spec: &VmSpec) -> Result<u32, Refusal> {
        let payload = spec.encode().map_err(|e| Refusal { status: Status::BadRequest, reason: e.to_string() })?;
        let r = self.handle_ecs(Message::request(Op::Start, 0, 0, 0, 0, payload))?;
        u32::try_from(r.arg0)
            .map_err(|_| Refusal { status: Status::Internal, reason: format!("VM id {} out of range", r.arg0) })
    }

    /// The ECS control service's "destroy a management VM" (the mailbox's stop).
    pub fn ecs_destroy(&self, id: u32) -> Result<(), Refusal> {
        self.handle_ecs(Message::request(Op::Stop, 0, id, 0, 0, Vec::new())).map(|_| ())
    }

    fn handle_ecs(&self, m: Message) -> Result<Message, Refusal> {
        let max = self.cfg.slot_size as usize - HEADER_LEN;
        let r = self.handle(&m, max);
        if r.status == Status::Ok {
            Ok(r)
        } else {
            Err(Refusal { status: r.status, reason: String::from_utf8_lossy(&r.payload).into_owned() })
        }
    }
}
