//! Snapshots of a paused VM and restores into a new one: full snapshots (a
//! stream, or a sparse file that a restore maps instead of copying), diff
//! snapshots of what changed since the last full one, and chains of them.
//! The byte format is [`crate::snapshot`]'s; this is the VM side of it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use kvm_bindings::kvm_irqchip;
use vm_memory::GuestMemoryMmap;

use super::shared::{lock, Devices};
use super::{RunState, Sinks, Vm};
use crate::devices::serial::Serial;
use crate::devices::virtio::Console;
use crate::error::{Error, Result, SnapshotError};
use crate::snapshot::{self, VmState};
use crate::vcpu_state;

impl Vm {
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

    /// Write a diff snapshot of the paused VM: only pages changed since the
    /// previous snapshot (full or diff) taken or restored in this process.
    /// Restore with [`Vm::restore_chain`] from the base and every diff after it.
    pub fn snapshot_diff_to<W: Write>(&self, w: W) -> Result<u64> {
        let _life = lock(&self.life);
        if !*lock(&self.has_base) {
            return Err(Error::NoBase);
        }
        let mut st = self.paused_state()?;
        let dirty = self.take_dirty()?;
        st.diff_runs = Some(snapshot::runs(&dirty));
        snapshot::write_diff_stream(w, &st, &self.sh.mem)
    }

    /// Pre-copy's base: a full snapshot (stream format) of a *running* VM.
    /// The vCPU is parked only to capture its state and clear the dirty
    /// log (a fraction of a millisecond); guest memory is then copied while
    /// the guest runs. A page the guest writes during the copy may be torn
    /// in the base, but the dirty log recorded it, so the diff taken at the
    /// final pause ([`Vm::snapshot_diff_to`]) carries it whole: base + diff
    /// equals the paused VM, as in any pre-copy live migration. A paused VM
    /// stays paused and its base is exact.
    pub fn snapshot_live_to<W: Write>(&self, w: W) -> Result<u64> {
        let was_running = self.state() == RunState::Running;
        if was_running {
            self.pause()?;
        }
        let st = {
            let _life = lock(&self.life);
            // From here on every guest write is in the dirty log.
            self.paused_state().and_then(|st| self.new_base().map(|()| st))
        };
        let resumed = if was_running { self.resume() } else { Ok(()) };
        let st = st?;
        resumed?;
        snapshot::write_stream_live(w, st, &self.sh.mem)
    }

    /// Pre-copy's later rounds: a diff of a *running* VM, the pages written
    /// since the last snapshot, copied while it runs (parked only to take
    /// its state and the dirty log). Pages written during the copy are in
    /// the next diff; the last diff is taken paused.
    pub fn snapshot_diff_live_to<W: Write>(&self, w: W) -> Result<u64> {
        if !*lock(&self.has_base) {
            return Err(Error::NoBase);
        }
        let was_running = self.state() == RunState::Running;
        if was_running {
            self.pause()?;
        }
        let st = {
            let _life = lock(&self.life);
            self.paused_state().and_then(|mut st| {
                st.diff_runs = Some(snapshot::runs(&self.take_dirty()?));
                Ok(st)
            })
        };
        let resumed = if was_running { self.resume() } else { Ok(()) };
        let st = st?;
        resumed?;
        snapshot::write_diff_live(w, &st, &self.sh.mem)
    }

    /// Apply a diff snapshot to this paused VM, whose memory holds the diff's
    /// base (it was restored from that base and has not run since): the
    /// diff's pages go into guest memory, and its vCPU, interrupt
    /// controller and device state replace the VM's. The second half of a
    /// pre-copy move; the VM stays paused.
    pub fn apply_diff_from<R: Read>(&self, r: R) -> Result<()> {
        let _life = lock(&self.life);
        let state = self.state();
        if state != RunState::Paused {
            return Err(Error::State { state, action: "applying a diff (it must be paused)" });
        }
        let st = snapshot::apply_diff(r, &self.sh.mem)?;
        vcpu_state::restore(&lock(&self.sh.vcpu), &st.vcpu)?;
        for c in &st.irqchips {
            self.sh.vm.set_irqchip(c).map_err(Error::ioctl("KVM_SET_IRQCHIP"))?;
        }
        lock(&self.sh.dev).console = Console::restore(&st.console).map_err(SnapshotError::Console)?;
        if st.ready {
            lock(&self.sh.ctl).ready_at.get_or_insert_with(Instant::now);
        }
        // Memory equals the diff's point now: later diffs start from here.
        self.new_base()
    }

    /// [`Vm::apply_diff_from`] a file.
    pub fn apply_diff_file(&self, path: &Path) -> Result<()> {
        let f = std::fs::File::open(path).map_err(Error::io(path.display().to_string()))?;
        self.apply_diff_from(std::io::BufReader::with_capacity(1 << 20, f))
    }

    /// [`Vm::snapshot_diff_to`] into a file.
    pub fn snapshot_diff_to_file(&self, path: &Path) -> Result<u64> {
        let f = std::fs::File::create(path).map_err(Error::io(path.display().to_string()))?;
        self.snapshot_diff_to(std::io::BufWriter::with_capacity(1 << 20, f))
    }

    /// Restore a VM from a snapshot stream; it comes up paused.
    pub fn restore_from<R: Read>(r: R, sinks: Sinks) -> Result<Vm> {
        let (st, mem) = snapshot::read_stream(r)?;
        Vm::rebuild(st, mem, sinks)
    }

    /// Restore a VM from a snapshot file; guest memory is a private mapping of
    /// the file, so restore cost does not grow with the guest's RAM.
    pub fn restore_from_file(path: &Path, sinks: Sinks) -> Result<Vm> {
        let (st, mem) = snapshot::read_file(path)?;
        Vm::rebuild(st, mem, sinks)
    }

    /// Restore from a full snapshot and the diffs taken after it, in order.
    pub fn restore_chain<R: Read, D: Read>(base: R, diffs: impl IntoIterator<Item = D>, sinks: Sinks) -> Result<Vm> {
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

    fn paused_state(&self) -> Result<VmState> {
        let state = self.state();
        if state != RunState::Paused {
            return Err(Error::State { state, action: "a snapshot (pause it first)" });
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

    fn rebuild(st: VmState, mem: GuestMemoryMmap, sinks: Sinks) -> Result<Vm> {
        let console = Console::restore(&st.console).map_err(SnapshotError::Console)?;
        let (vm, vcpu) = super::builder::create_kvm(&mem)?;
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
