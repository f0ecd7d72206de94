//! One management VM: KVM objects, guest memory, devices, the vCPU thread
//! and its life cycle (created -> running <-> paused -> stopped).
//!
//! Threads: the vCPU thread owns the run loop and handles every exit
//! synchronously (serial, idle port, exit port, virtio-mmio). Callers on other
//! threads inject requests into the receive queue, pause the vCPU (a signal
//! kicks it out of KVM_RUN) and read its state while it is parked.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_fpu, kvm_irqchip, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::error::{Error, Result, StopReason};
use crate::proto::{self, word};
use crate::serial::Serial;
use crate::snapshot::{self, VmState};
use crate::vcpu_state;
use crate::virtio::Console;

/// Where a new VM's console output and log records go.
#[derive(Default)]
pub struct Sinks {
    /// Serial console bytes, as written by the guest.
    pub serial: Option<Box<dyn Write + Send>>,
    /// Log records from the agent, one JSON object per line.
    pub log: Option<Box<dyn Write + Send>>,
}

/// What to boot.
pub struct VmConfig {
    /// Guest RAM in MiB (4..=3072; the MMIO window sits at 3.25 GiB).
    pub mem_mib: u64,
    /// The agent ELF (static, fixed address), or a Linux kernel when
    /// `linux_cmdline` is set.
    pub image: PathBuf,
    /// Boot `image` as Linux (ELF vmlinux or bzImage) with this command line.
    pub linux_cmdline: Option<String>,
}

impl VmConfig {
    pub fn new(image: impl Into<PathBuf>, mem_mib: u64) -> Self {
        VmConfig { mem_mib, image: image.into(), linux_cmdline: None }
    }
    /// A Linux guest (for hosts whose KVM can run one).
    pub fn linux(kernel: impl Into<PathBuf>, mem_mib: u64, cmdline: impl Into<String>) -> Self {
        VmConfig { mem_mib, image: kernel.into(), linux_cmdline: Some(cmdline.into()) }
    }
    fn validate(&self) -> Result<()> {
        if !(4..=3072).contains(&self.mem_mib) {
            return Err(Error::Config { field: "mem_mib", reason: format!("{} is outside 4..=3072", self.mem_mib) });
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RunState {
    Created,
    Running,
    Paused,
    Stopped(StopReason),
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunState::Created => write!(f, "created"),
            RunState::Running => write!(f, "running"),
            RunState::Paused => write!(f, "paused"),
            RunState::Stopped(r) => write!(f, "stopped ({r})"),
        }
    }
}

/// An agent answer (or log record), decoded from its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reply {
    pub op: u64,
    pub id: u64,
    pub work: u64,
    pub log_seq: u64,
    pub steps: u64,
    pub value: u64,
    pub requests: u64,
}

impl Reply {
    fn from_words(w: &[u64; 8]) -> Reply {
        Reply {
            op: w[word::OP],
            id: w[word::ID],
            work: w[word::WORK],
            log_seq: w[word::LOG_SEQ],
            steps: w[word::STEPS],
            value: w[word::VALUE],
            requests: w[word::REQUESTS],
        }
    }
}

struct Ctl {
    state: RunState,
    pause_req: bool,
    stop_req: Option<StopReason>,
    /// Set when a request was queued, so an idle vCPU goes back to the guest.
    wake: bool,
    tid: Option<libc::pthread_t>,
    /// Kernel thread id of the vCPU thread (for cgroup placement).
    os_tid: Option<libc::pid_t>,
    replies: HashMap<u64, Reply>,
    /// Request ids someone waits for; other replies are dropped.
    waiting: std::collections::HashSet<u64>,
    ready_at: Option<Instant>,
    last_log: Option<Reply>,
    logs: u64,
}

struct Devices {
    serial: Serial,
    console: Console,
}

struct Shared {
    mem: GuestMemoryMmap,
    vm: VmFd,
    vcpu: Mutex<VcpuFd>,
    dev: Mutex<Devices>,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    log: Mutex<Option<Box<dyn Write + Send>>>,
    exits: ExitCounters,
}

/// vCPU exits by kind, for status monitoring.
#[derive(Default)]
struct ExitCounters {
    pio: AtomicU64,
    mmio: AtomicU64,
    idle: AtomicU64,
    interrupted: AtomicU64,
}

/// Counters of one VM, as reported to status monitoring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmStats {
    /// Port I/O exits (serial, idle and exit ports).
    pub pio_exits: u64,
    /// MMIO exits (the virtio window).
    pub mmio_exits: u64,
    /// Times the agent parked on the idle port.
    pub idle_exits: u64,
    /// KVM_RUN returns caused by kicks (pause, stop).
    pub interrupted: u64,
    /// Log records received from the agent by this process.
    pub logs: u64,
    /// Guest RAM pages backed on the host, in bytes.
    pub guest_resident_bytes: u64,
}

/// Take a lock even if a thread panicked while holding it: the state
/// behind our mutexes stays consistent field by field.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Vm {
    sh: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    next_id: AtomicU64,
    mem_size: u64,
    /// Guest memory equals the last snapshot taken or restored, plus what
    /// the dirty log and the devices recorded since: diffs are possible.
    has_base: Mutex<bool>,
    /// Serializes life-cycle changes (pause, resume, snapshot, shutdown),
    /// so a resume from another control connection cannot run the guest
    /// while a snapshot is reading its memory.
    life: Mutex<()>,
}

/// Requests queued for a guest that has no free receive buffer.
const MAX_PENDING: usize = 256;
/// How long an idle vCPU parks before looking at the rings again.
const IDLE_PARK: Duration = Duration::from_millis(100);
/// TSS area KVM needs on Intel hosts, placed below the 4 GiB boundary.
const KVM_TSS_ADDR: usize = 0xfffb_d000;

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // An empty handler: delivery alone makes KVM_RUN return EINTR.
        let _ = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler);
    });
}

/// KVM VM with our memory registered and one vCPU with the host's CPUID.
fn create_kvm(mem: &GuestMemoryMmap) -> Result<(VmFd, VcpuFd)> {
    let kvm = Kvm::new().map_err(Error::Kvm)?;
    let vm = kvm.create_vm().map_err(Error::ioctl("KVM_CREATE_VM"))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem.get_host_address(region.start_addr()).map_err(|e| Error::Memory(e.to_string()))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            // Dirty logging feeds diff snapshots.
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping lives in `Shared::mem`, which outlives the VmFd.
        unsafe { vm.set_user_memory_region(r) }.map_err(Error::ioctl("KVM_SET_USER_MEMORY_REGION"))?;
    }
    // Memory slots go in first: on this host a slot added after KVM's own
    // private slots (TSS, APIC page) costs milliseconds of memslot update.
    vm.set_tss_address(KVM_TSS_ADDR).map_err(Error::ioctl("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(Error::ioctl("KVM_CREATE_IRQCHIP"))?;
    let vcpu = vm.create_vcpu(0).map_err(Error::ioctl("KVM_CREATE_VCPU"))?;
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(Error::ioctl("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(Error::ioctl("KVM_SET_CPUID2"))?;
    Ok((vm, vcpu))
}

impl Vm {
    /// Create a VM with the agent loaded and registers set; call [`Vm::start`].
    pub fn create(cfg: &VmConfig, sinks: Sinks) -> Result<Vm> {
        cfg.validate()?;
        let size = cfg.mem_mib << 20;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
            .map_err(|e| Error::Memory(e.to_string()))?;
        crate::boot::write_tables(&mem)?;
        let (regs, kernel) = match &cfg.linux_cmdline {
            None => (crate::boot::user_regs(crate::boot::load_elf(&mem, &cfg.image)?), false),
            Some(cmdline) => {
                let mut f = std::fs::File::open(&cfg.image).map_err(Error::io(cfg.image.display().to_string()))?;
                let b = crate::linux::load_linux(&mem, &mut f, cmdline)?;
                (crate::linux::linux_regs(&b), true)
            }
        };
        let (vm, vcpu) = create_kvm(&mem)?;
        let sregs = vcpu.get_sregs().map_err(Error::ioctl("KVM_GET_SREGS"))?;
        let sregs = if kernel { crate::linux::kernel_sregs(sregs) } else { crate::boot::user_sregs(sregs) };
        vcpu.set_sregs(&sregs).map_err(Error::ioctl("KVM_SET_SREGS"))?;
        vcpu.set_regs(&regs).map_err(Error::ioctl("KVM_SET_REGS"))?;
        let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
        vcpu.set_fpu(&fpu).map_err(Error::ioctl("KVM_SET_FPU"))?;
        let dev = Devices { serial: Serial::new(sinks.serial), console: Console::new() };
        Ok(Vm::assemble(mem, vm, vcpu, dev, sinks.log, None))
    }

    fn assemble(
        mem: GuestMemoryMmap,
        vm: VmFd,
        vcpu: VcpuFd,
        dev: Devices,
        log: Option<Box<dyn Write + Send>>,
        ready_at: Option<Instant>,
    ) -> Vm {
        let mem_size = mem.iter().map(|r| r.len()).sum();
        let sh = Shared {
            mem,
            vm,
            vcpu: Mutex::new(vcpu),
            dev: Mutex::new(dev),
            ctl: Mutex::new(Ctl {
                state: RunState::Created,
                pause_req: false,
                stop_req: None,
                wake: false,
                tid: None,
                os_tid: None,
                replies: HashMap::new(),
                waiting: std::collections::HashSet::new(),
                ready_at,
                last_log: None,
                logs: 0,
            }),
            cv: Condvar::new(),
            log: Mutex::new(log),
            exits: ExitCounters::default(),
        };
        Vm {
            sh: Arc::new(sh),
            thread: Mutex::new(None),
            next_id: AtomicU64::new(1),
            mem_size,
            has_base: Mutex::new(false),
            life: Mutex::new(()),
        }
    }

    /// Start the vCPU thread (running, or parked when `paused`).
    pub fn start(&self, paused: bool) -> Result<()> {
        let mut thread = lock(&self.thread);
        if thread.is_some() {
            return Err(Error::State(self.state().to_string()));
        }
        install_kick_handler();
        {
            let mut ctl = lock(&self.sh.ctl);
            ctl.pause_req = paused;
            if !paused {
                ctl.state = RunState::Running;
            }
        }
        let sh = self.sh.clone();
        let t = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || vcpu_loop(&sh))
            .map_err(Error::io("spawning the vCPU thread"))?;
        *thread = Some(t);
        drop(thread);
        // A paused start returns once the thread is parked, so the caller can
        // snapshot or resume right away.
        let mut ctl = lock(&self.sh.ctl);
        while ctl.state == RunState::Created {
            ctl = self.sh.cv.wait(ctl).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    pub fn state(&self) -> RunState {
        lock(&self.sh.ctl).state.clone()
    }

    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// The vCPU thread's id (to move it into a cgroup).
    pub fn vcpu_tid(&self) -> Option<libc::pid_t> {
        lock(&self.sh.ctl).os_tid
    }

    /// Wait until the agent printed its banner.
    pub fn wait_ready(&self, timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        let mut ctl = lock(&self.sh.ctl);
        loop {
            if let Some(t) = ctl.ready_at {
                return Ok(t);
            }
            if let RunState::Stopped(r) = &ctl.state {
                return Err(Error::Stopped(r.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(timeout, "the agent banner"));
            }
            ctl = self.sh.cv.wait_timeout(ctl, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Serial console lines seen so far.
    pub fn console_lines(&self) -> Vec<String> {
        lock(&self.sh.dev).serial.lines.clone()
    }

    /// The newest log record and the number received by this process.
    pub fn last_log(&self) -> (Option<Reply>, u64) {
        let ctl = lock(&self.sh.ctl);
        (ctl.last_log, ctl.logs)
    }

    /// Send a request to the agent and wait for its reply.
    pub fn request(&self, op: u64, arg: u64, timeout: Duration) -> Result<Reply> {
        {
            let ctl = lock(&self.sh.ctl);
            if ctl.state != RunState::Running || ctl.pause_req {
                return Err(Error::State(ctl.state.to_string()));
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut w = [0u64; 8];
        w[word::KIND] = proto::KIND_REQUEST;
        w[word::OP] = op;
        w[word::ID] = id;
        w[word::ARG] = arg;
        // Register before queueing: the reply may come back at once.
        lock(&self.sh.ctl).waiting.insert(id);
        let r = self.send_and_wait(id, &w, timeout);
        let mut ctl = lock(&self.sh.ctl);
        ctl.waiting.remove(&id);
        ctl.replies.remove(&id);
        r
    }

    fn send_and_wait(&self, id: u64, w: &[u64; 8], timeout: Duration) -> Result<Reply> {
        let pushed = {
            let mut dev = lock(&self.sh.dev);
            // A guest that stopped taking requests must not make us queue
            // without bound.
            if dev.console.pending_len() >= MAX_PENDING {
                return Err(Error::State(format!("running but not taking requests ({MAX_PENDING} queued)")));
            }
            dev.console.push_request(&self.sh.mem, Some(proto::encode(w)))
        };
        if let Err(e) = pushed {
            self.sh.fail(StopReason::Device(e.to_string()));
        }
        let deadline = Instant::now() + timeout;
        let mut ctl = lock(&self.sh.ctl);
        ctl.wake = true;
        self.sh.cv.notify_all();
        loop {
            if let Some(r) = ctl.replies.remove(&id) {
                return Ok(r);
            }
            if let RunState::Stopped(r) = &ctl.state {
                return Err(Error::Stopped(r.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(timeout, "the agent's reply"));
            }
            ctl = self.sh.cv.wait_timeout(ctl, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Park the vCPU outside KVM_RUN with all in-flight I/O completed.
    pub fn pause(&self) -> Result<()> {
        let _life = lock(&self.life);
        let mut ctl = lock(&self.sh.ctl);
        match &ctl.state {
            RunState::Paused => return Ok(()),
            RunState::Running => {}
            s => return Err(Error::State(s.to_string())),
        }
        ctl.pause_req = true;
        self.sh.cv.notify_all();
        let deadline = Instant::now() + Duration::from_secs(5);
        while ctl.state == RunState::Running {
            // Re-kick until the thread notices: a signal that lands just
            // before KVM_RUN is entered would otherwise be lost.
            if let Some(tid) = ctl.tid {
                // SAFETY: tid is our vCPU thread, alive while Running.
                unsafe { libc::pthread_kill(tid, kick_signal()) };
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(Duration::from_secs(5), "the vCPU to pause"));
            }
            ctl = self.sh.cv.wait_timeout(ctl, Duration::from_millis(1)).unwrap_or_else(|p| p.into_inner()).0;
        }
        match &ctl.state {
            RunState::Stopped(r) => Err(Error::Stopped(r.clone())),
            _ => Ok(()),
        }
    }

    pub fn resume(&self) -> Result<()> {
        let _life = lock(&self.life);
        let mut ctl = lock(&self.sh.ctl);
        match &ctl.state {
            RunState::Running => return Ok(()),
            RunState::Paused => {}
            s => return Err(Error::State(s.to_string())),
        }
        ctl.pause_req = false;
        self.sh.cv.notify_all();
        while ctl.state == RunState::Paused {
            ctl = self.sh.cv.wait(ctl).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    /// Stop the VM and join its vCPU thread. Returns why it stopped.
    pub fn shutdown(&self) -> RunState {
        let _life = lock(&self.life);
        self.sh.fail(StopReason::Requested);
        let t = lock(&self.thread).take();
        if let Some(t) = t {
            let _ = t.join();
        }
        let mut ctl = lock(&self.sh.ctl);
        if !matches!(ctl.state, RunState::Stopped(_)) {
            ctl.state = RunState::Stopped(StopReason::Requested);
        }
        ctl.state.clone()
    }

    /// Wait until the VM stops on its own (guest exit or error).
    pub fn wait_stopped(&self, timeout: Duration) -> Result<StopReason> {
        let deadline = Instant::now() + timeout;
        let mut ctl = lock(&self.sh.ctl);
        loop {
            if let RunState::Stopped(r) = &ctl.state {
                return Ok(r.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(timeout, "the VM to stop"));
            }
            ctl = self.sh.cv.wait_timeout(ctl, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    fn paused_state(&self) -> Result<VmState> {
        if self.state() != RunState::Paused {
            return Err(Error::State(format!("{} (snapshots need a paused VM)", self.state())));
        }
        let vcpu = vcpu_state::save(&lock(&self.sh.vcpu))?;
        let mut irqchips = Vec::new();
        for chip_id in 0..3 {
            let mut c = kvm_irqchip { chip_id, ..Default::default() };
            self.sh.vm.get_irqchip(&mut c).map_err(Error::ioctl("KVM_GET_IRQCHIP"))?;
            irqchips.push(c);
        }
        let console = lock(&self.sh.dev).console.snapshot();
        let ready = lock(&self.sh.ctl).ready_at.is_some();
        Ok(VmState { mem_size: self.mem_size, vcpu, irqchips, console, ready, diff_runs: None })
    }

    /// Pages written since the last snapshot: KVM's dirty log (guest
    /// writes; reading it also clears it) plus the devices' own writes.
    fn take_dirty(&self) -> Result<Vec<bool>> {
        let pages = (self.mem_size / 4096) as usize;
        let bitmap = self.sh.vm.get_dirty_log(0, self.mem_size as usize).map_err(Error::ioctl("KVM_GET_DIRTY_LOG"))?;
        let mut dirty: Vec<bool> =
            (0..pages).map(|p| bitmap.get(p / 64).is_some_and(|w| w >> (p % 64) & 1 == 1)).collect();
        for p in lock(&self.sh.dev).console.take_dirty() {
            if let Some(d) = dirty.get_mut(p as usize) {
                *d = true;
            }
        }
        Ok(dirty)
    }

    /// A full snapshot becomes the base for later diffs.
    fn new_base(&self) -> Result<()> {
        self.take_dirty()?;
        *lock(&self.has_base) = true;
        Ok(())
    }

    /// Write a diff snapshot of the paused VM: only pages changed since the
    /// previous snapshot (full or diff) taken or restored in this process.
    /// Restore with [`Vm::restore_chain`] from the base and every diff after it.
    pub fn snapshot_diff_to<W: Write>(&self, w: W) -> Result<u64> {
        let _life = lock(&self.life);
        if !*lock(&self.has_base) {
            return Err(Error::State("without a base snapshot (take a full one first)".into()));
        }
        let mut st = self.paused_state()?;
        let dirty = self.take_dirty()?;
        st.diff_runs = Some(snapshot::runs(&dirty));
        snapshot::write_diff_stream(w, &st, &self.sh.mem)
    }

    /// [`Vm::snapshot_diff_to`] into a file.
    pub fn snapshot_diff_to_file(&self, path: &Path) -> Result<u64> {
        let f = std::fs::File::create(path).map_err(Error::io(path.display().to_string()))?;
        self.snapshot_diff_to(std::io::BufWriter::with_capacity(1 << 20, f))
    }

    /// Restore from a full snapshot and the diffs taken after it, in order.
    pub fn restore_chain<R: std::io::Read, D: std::io::Read>(
        base: R,
        diffs: impl IntoIterator<Item = D>,
        sinks: Sinks,
    ) -> Result<Vm> {
        let (mut st, mem) = snapshot::read_stream(base)?;
        for d in diffs {
            st = snapshot::apply_diff(d, &mem)?;
        }
        Vm::rebuild(st, mem, sinks)
    }

    /// [`Vm::restore_chain`] from files; the base is mapped, not copied.
    pub fn restore_chain_files(base: &Path, diffs: &[PathBuf], sinks: Sinks) -> Result<Vm> {
        let (mut st, mem) = snapshot::read_file(base)?;
        for d in diffs {
            let f = std::fs::File::open(d).map_err(Error::io(d.display().to_string()))?;
            st = snapshot::apply_diff(std::io::BufReader::with_capacity(1 << 20, f), &mem)?;
        }
        Vm::rebuild(st, mem, sinks)
    }

    /// Write a snapshot of the paused VM to a stream (e.g. a card-link channel).
    pub fn snapshot_to<W: Write>(&self, w: W) -> Result<u64> {
        let _life = lock(&self.life);
        let st = self.paused_state()?;
        let n = snapshot::write_stream(w, st, &self.sh.mem)?;
        self.new_base()?;
        Ok(n)
    }

    /// Write a snapshot of the paused VM to a file (sparse: pages never
    /// touched are holes). Written to a temporary name and renamed, so a VM
    /// that was restored from `path` keeps its private mapping of the old file.
    pub fn snapshot_to_file(&self, path: &Path) -> Result<u64> {
        let _life = lock(&self.life);
        let st = self.paused_state()?;
        let n = snapshot::write_file(path, &st, &self.sh.mem)?;
        self.new_base()?;
        Ok(n)
    }

    /// Restore a VM from a snapshot stream; it comes up paused.
    pub fn restore_from<R: std::io::Read>(r: R, sinks: Sinks) -> Result<Vm> {
        let (st, mem) = snapshot::read_stream(r)?;
        Vm::rebuild(st, mem, sinks)
    }

    /// Restore a VM from a snapshot file; guest memory is a private mapping of
    /// the file, so restore cost does not grow with the guest's RAM.
    pub fn restore_from_file(path: &Path, sinks: Sinks) -> Result<Vm> {
        let (st, mem) = snapshot::read_file(path)?;
        Vm::rebuild(st, mem, sinks)
    }

    fn rebuild(st: VmState, mem: GuestMemoryMmap, sinks: Sinks) -> Result<Vm> {
        let console = Console::restore(&st.console).map_err(Error::Snapshot)?;
        let (vm, vcpu) = create_kvm(&mem)?;
        for c in &st.irqchips {
            vm.set_irqchip(c).map_err(Error::ioctl("KVM_SET_IRQCHIP"))?;
        }
        vcpu_state::restore(&vcpu, &st.vcpu)?;
        let dev = Devices { serial: Serial::new(sinks.serial), console };
        let ready = st.ready.then(Instant::now);
        let vm = Vm::assemble(mem, vm, vcpu, dev, sinks.log, ready);
        // Memory equals the snapshot and the fresh dirty log is empty.
        *lock(&vm.has_base) = true;
        vm.start(true)?;
        Ok(vm)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if lock(&self.thread).is_some() {
            self.shutdown();
        }
    }
}

impl Shared {
    /// Ask the vCPU thread to stop with `reason` (first reason wins).
    fn fail(&self, reason: StopReason) {
        let mut ctl = lock(&self.ctl);
        if ctl.stop_req.is_none() {
            ctl.stop_req = Some(reason);
        }
        self.cv.notify_all();
        if ctl.state == RunState::Running {
            if let Some(tid) = ctl.tid {
                // SAFETY: tid is our vCPU thread, alive while Running.
                unsafe { libc::pthread_kill(tid, kick_signal()) };
            }
        }
    }

    fn set_stopped(&self, reason: StopReason) {
        let mut ctl = lock(&self.ctl);
        ctl.state = RunState::Stopped(reason);
        ctl.tid = None;
        self.cv.notify_all();
    }

    fn deliver(&self, frames: Vec<[u8; proto::FRAME_LEN]>) {
        if frames.is_empty() {
            return;
        }
        let mut ctl = lock(&self.ctl);
        for f in &frames {
            let w = proto::decode(f);
            let r = Reply::from_words(&w);
            match w[word::KIND] {
                // Replies nobody waits for (timed out) are dropped.
                proto::KIND_RESPONSE if ctl.waiting.contains(&r.id) => {
                    ctl.replies.insert(r.id, r);
                }
                proto::KIND_LOG => {
                    ctl.last_log = Some(r);
                    ctl.logs += 1;
                    if let Some(out) = lock(&self.log).as_mut() {
                        let _ = writeln!(
                            out,
                            "{{\"seq\":{},\"work\":{},\"steps\":{},\"value\":{}}}",
                            r.log_seq, r.work, r.steps, r.value
                        );
                    }
                }
                _ => {}
            }
        }
        if let Some(out) = lock(&self.log).as_mut() {
            let _ = out.flush();
        }
        self.cv.notify_all();
    }

    /// Idle port: park until a request is queued, a pause/stop is asked, or
    /// a short timeout passes.
    fn idle(&self) {
        let mut ctl = lock(&self.ctl);
        if !ctl.wake && !ctl.pause_req && ctl.stop_req.is_none() {
            ctl = self.cv.wait_timeout(ctl, IDLE_PARK).unwrap_or_else(|p| p.into_inner()).0;
        }
        ctl.wake = false;
    }
}

enum Next {
    Continue,
    Idle,
    Stop(StopReason),
}

fn handle_exit(sh: &Shared, exit: VcpuExit<'_>) -> Next {
    let counter = match &exit {
        VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => Some(&sh.exits.pio),
        VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..) => Some(&sh.exits.mmio),
        VcpuExit::Intr => Some(&sh.exits.interrupted),
        _ => None,
    };
    if let Some(c) = counter {
        c.fetch_add(1, Ordering::Relaxed);
    }
    match exit {
        VcpuExit::IoOut(port, data) => {
            let byte = data.first().copied().unwrap_or(0);
            match port {
                p if (proto::SERIAL_PORT..proto::SERIAL_PORT + 8).contains(&p) => {
                    let line = lock(&sh.dev).serial.write(p - proto::SERIAL_PORT, byte);
                    if line.as_deref() == Some(proto::BANNER) {
                        let mut ctl = lock(&sh.ctl);
                        ctl.ready_at.get_or_insert_with(Instant::now);
                        sh.cv.notify_all();
                    }
                    Next::Continue
                }
                proto::IDLE_PORT => Next::Idle,
                proto::EXIT_PORT => Next::Stop(StopReason::GuestExit(byte)),
                _ => Next::Continue, // writes to absent ISA ports are dropped, as on hardware
            }
        }
        VcpuExit::IoIn(port, data) => {
            let v = if (proto::SERIAL_PORT..proto::SERIAL_PORT + 8).contains(&port) {
                lock(&sh.dev).serial.read(port - proto::SERIAL_PORT)
            } else {
                0xff
            };
            data.fill(v);
            Next::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if (proto::VIRTIO_MMIO_BASE..proto::VIRTIO_MMIO_BASE + proto::VIRTIO_MMIO_SIZE).contains(&addr) {
                match lock(&sh.dev).console.read(addr - proto::VIRTIO_MMIO_BASE, data) {
                    Ok(()) => Next::Continue,
                    Err(e) => Next::Stop(StopReason::Device(e.to_string())),
                }
            } else {
                Next::Stop(StopReason::UnknownMmio { addr, kind: format!("read of {} bytes", data.len()) })
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !(proto::VIRTIO_MMIO_BASE..proto::VIRTIO_MMIO_BASE + proto::VIRTIO_MMIO_SIZE).contains(&addr) {
                return Next::Stop(StopReason::UnknownMmio { addr, kind: format!("write of {} bytes", data.len()) });
            }
            let mut dev = lock(&sh.dev);
            let frames = match dev.console.write(&sh.mem, addr - proto::VIRTIO_MMIO_BASE, data) {
                Ok(Some(q)) if q == proto::TX_QUEUE => dev.console.pop_frames(&sh.mem),
                Ok(Some(_)) => dev.console.push_request(&sh.mem, None).map(|_| Vec::new()),
                Ok(None) => Ok(Vec::new()),
                Err(e) => Err(e),
            };
            drop(dev);
            match frames {
                Ok(f) => {
                    sh.deliver(f);
                    Next::Continue
                }
                Err(e) => Next::Stop(StopReason::Device(e.to_string())),
            }
        }
        VcpuExit::Hlt => Next::Stop(StopReason::Halted),
        VcpuExit::Shutdown => Next::Stop(StopReason::TripleFault { rip: 0 }),
        VcpuExit::FailEntry(reason, _) => Next::Stop(StopReason::FailEntry(reason)),
        VcpuExit::InternalError => Next::Stop(StopReason::InternalError(0)),
        VcpuExit::Intr => Next::Continue,
        other => Next::Stop(StopReason::UnexpectedExit(format!("{other:?}"))),
    }
}

fn vcpu_loop(sh: &Shared) {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t;
    {
        let mut ctl = lock(&sh.ctl);
        ctl.os_tid = Some(tid);
        // SAFETY: pthread_self has no preconditions.
        ctl.tid = Some(unsafe { libc::pthread_self() });
        sh.cv.notify_all();
    }
    let reason = run(sh);
    sh.set_stopped(reason);
}

fn run(sh: &Shared) -> StopReason {
    let mut vcpu = lock(&sh.vcpu);
    loop {
        {
            let ctl = lock(&sh.ctl);
            if let Some(r) = ctl.stop_req.clone() {
                return r;
            }
            if ctl.pause_req {
                drop(ctl);
                // Complete any I/O the last exit left half done (the data of
                // an IN or MMIO read reaches the guest only on the next
                // KVM_RUN), so the saved registers are consistent.
                vcpu.set_kvm_immediate_exit(1);
                let _ = vcpu.run();
                vcpu.set_kvm_immediate_exit(0);
                drop(vcpu);
                let mut ctl = lock(&sh.ctl);
                ctl.state = RunState::Paused;
                sh.cv.notify_all();
                while ctl.pause_req && ctl.stop_req.is_none() {
                    ctl = sh.cv.wait(ctl).unwrap_or_else(|p| p.into_inner());
                }
                if let Some(r) = ctl.stop_req.clone() {
                    return r;
                }
                ctl.state = RunState::Running;
                sh.cv.notify_all();
                drop(ctl);
                vcpu = lock(&sh.vcpu);
                continue;
            }
        }
        let next = match vcpu.run() {
            Ok(exit) => handle_exit(sh, exit),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                sh.exits.interrupted.fetch_add(1, Ordering::Relaxed);
                Next::Continue
            }
            Err(e) => Next::Stop(StopReason::Run(e.to_string())),
        };
        match next {
            Next::Continue => {}
            Next::Idle => {
                sh.exits.idle.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = lock(&sh.dev).console.push_request(&sh.mem, None) {
                    return StopReason::Device(e.to_string());
                }
                sh.idle();
            }
            Next::Stop(StopReason::TripleFault { .. }) => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                return StopReason::TripleFault { rip };
            }
            Next::Stop(r) => return r,
        }
    }
}

impl Vm {
    /// Exit and log counters, for status monitoring.
    pub fn stats(&self) -> VmStats {
        let e = &self.sh.exits;
        VmStats {
            pio_exits: e.pio.load(Ordering::Relaxed),
            mmio_exits: e.mmio.load(Ordering::Relaxed),
            idle_exits: e.idle.load(Ordering::Relaxed),
            interrupted: e.interrupted.load(Ordering::Relaxed),
            logs: lock(&self.sh.ctl).logs,
            guest_resident_bytes: self.guest_resident_bytes(),
        }
    }

    /// Guest RAM pages currently backed on the host (mincore), in bytes.
    pub fn guest_resident_bytes(&self) -> u64 {
        self.sh
            .mem
            .iter()
            .map(|r| {
                let Ok(host) = self.sh.mem.get_host_address(r.start_addr()) else {
                    return 0;
                };
                let len = r.len() as usize;
                let pages = len.div_ceil(4096);
                let mut v = vec![0u8; pages];
                // SAFETY: host..host+len is our mapping; v has one byte per page.
                let rc = unsafe { libc::mincore(host as *mut libc::c_void, len, v.as_mut_ptr()) };
                if rc != 0 {
                    return 0;
                }
                v.iter().filter(|b| *b & 1 == 1).count() as u64 * 4096
            })
            .sum()
    }
}
