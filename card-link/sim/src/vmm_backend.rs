//! The card-side VMM on the `vmm` crate: each management VM is a real KVM
//! guest (the management agent ELF) in its own `vmm` process, inside its
//! own child cgroup of the card's cgroup (`<card>/vm-<id>`). A process per
//! VM is what makes its cost measurable: cgroups account memory per
//! process, not per thread, so VMs sharing card-sim's process could only be
//! measured together. The card's own cgroup still covers them all (a child
//! is charged to its parent too).
//!
//! Pause, resume, snapshot and agent requests go over the process's control
//! socket (`vmm::host::client`). Snapshots pass through a file in the
//! card's run directory, in the vmm stream format (sparse: an idle agent's
//! RAM is mostly never touched), which is what the mailbox streams to the
//! host and a host-side vmm restores; a restore writes the received image
//! there and starts a process from it. Console lines come from the
//! process's serial file there and go to the card's event log.
//!
//! Without a card cgroup (card-sim run as a plain process) each VM is
//! measured through its process in /proc instead.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use card_link::costs::CostSource;
use card_link::mailbox::VmSpec;
use cgroupfs::{Cgroup, Limits};
use vmm::host::api::AgentOp;
use vmm::host::process::{SpawnOptions, Start, VmmProcess};

use crate::costs::{process_usage, VmUsage};
use crate::error::VmError;
use crate::vms::{ManagedVm, VmBackend};

pub struct VmmBackend {
    /// The management agent ELF.
    pub guest: PathBuf,
    /// The `vmm` binary.
    pub vmm_bin: PathBuf,
    /// Where the VMs' control sockets, consoles and snapshot files live.
    pub run_dir: PathBuf,
    /// The card's cgroup (each VM gets a child of it); None: VMs are
    /// measured through their processes.
    pub cgroup: Option<Cgroup>,
}

struct VmmVm {
    id: u32,
    /// None once stopped.
    proc: Option<VmmProcess>,
    /// The VM's child cgroup, removed when the VM stops.
    cgroup: Option<Cgroup>,
    console: ConsoleTail,
    run_dir: PathBuf,
    mem_bytes: u64,
}

/// What was being done when the vmm failed, kept with its error.
fn err(what: &'static str) -> impl FnOnce(vmm::Error) -> VmError {
    move |source| VmError::Vmm { what, source }
}

fn file_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> VmError {
    let path = path.to_path_buf();
    move |source| VmError::File { what, path, source }
}

/// Remove a file of a VM; one already gone is fine, any other failure is
/// logged (it is left behind in the run directory).
fn remove_file(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(file = %path.display(), error = %e, "cannot remove a card VM's file");
        }
    }
}

/// Name of VM `id`'s file `ext` in the run directory.
fn vm_file(run_dir: &Path, id: u32, ext: &str) -> PathBuf {
    run_dir.join(format!("vm-{id}.{ext}"))
}

impl VmmBackend {
    /// Make VM `id`'s child cgroup of the card's cgroup (None without one).
    /// One left by an earlier card process under the same name is emptied
    /// and removed first: it would mix that VM's counters into this one's.
    fn child_cgroup(&self, id: u32) -> Result<Option<Cgroup>, VmError> {
        let Some(card) = &self.cgroup else { return Ok(None) };
        let name = format!("{}/vm-{id}", card.rel().display());
        let cg_err = |what| {
            let name = name.clone();
            move |source| VmError::Cgroup { what, name, source }
        };
        let layout = card.layout();
        if layout.unified().join(&name).is_dir() {
            tracing::warn!(cgroup = name, "a VM cgroup of an earlier card is still there; emptying and removing it");
            let mut stale = layout.open(&name).map_err(cg_err("open stale"))?;
            stale.kill_all(std::time::Duration::from_secs(2));
            stale.remove().map_err(cg_err("remove stale"))?;
        }
        layout.create(&name, &Limits::default()).map(Some).map_err(cg_err("create"))
    }

    /// Start a `vmm` process for VM `id` inside its child cgroup.
    fn spawn(&self, id: u32, start: Start, mem_bytes: u64) -> Result<Box<dyn ManagedVm>, VmError> {
        let mut cgroup = self.child_cgroup(id)?;
        let console_path = vm_file(&self.run_dir, id, "console");
        let console = match ConsoleTail::create(&console_path) {
            Ok(c) => c,
            Err(e) => {
                release_cgroup(&mut cgroup);
                return Err(e);
            }
        };
        let opts = SpawnOptions {
            bin: self.vmm_bin.clone(),
            start,
            socket: vm_file(&self.run_dir, id, "sock"),
            serial: Some(console_path.clone()),
            log: None,
            // The process joins the cgroup made above; it leaves it in place
            // on exit (it did not make it), and the VM's stop removes it.
            cgroup: cgroup.as_ref().map(|cg| (cg.rel().display().to_string(), Limits::default())),
        };
        match VmmProcess::spawn(&opts) {
            Ok(proc) => {
                Ok(Box::new(VmmVm { id, proc: Some(proc), cgroup, console, run_dir: self.run_dir.clone(), mem_bytes }))
            }
            Err(e) => {
                release_cgroup(&mut cgroup);
                remove_file(&console_path);
                Err(VmError::Vmm { what: "start the VM's vmm process", source: e })
            }
        }
    }
}

/// Remove a VM's child cgroup on a failure path (logged: it is left behind).
fn release_cgroup(cg: &mut Option<Cgroup>) {
    if let Some(mut cg) = cg.take() {
        if let Err(e) = cg.remove() {
            tracing::warn!(cgroup = %cg.rel().display(), error = %e, "cannot remove a card VM's cgroup");
        }
    }
}

impl VmBackend for VmmBackend {
    fn precopy(&self) -> bool {
        true
    }

    fn restore_paused(&mut self, id: u32, spec: &VmSpec, image: &[u8]) -> Result<Box<dyn ManagedVm>, VmError> {
        // An empty VMM restores the image over its socket: it comes up
        // paused and stays so until its diff and a resume.
        let path = vm_file(&self.run_dir, id, "restore");
        File::create(&path).and_then(|mut f| f.write_all(image)).map_err(file_err("write", &path))?;
        let vm = self.spawn(id, Start::Empty, (spec.mem_mib as u64) << 20);
        let restored = vm.and_then(|mut vm| {
            vm.restore_image(&path)?;
            Ok(vm)
        });
        remove_file(&path);
        restored
    }

    fn start(&mut self, id: u32, spec: &VmSpec) -> Result<Box<dyn ManagedVm>, VmError> {
        // The vmm boots the agent and waits for its banner before it opens
        // its socket, so a spawned VM is ready.
        let start = Start::Guest { elf: self.guest.clone(), mem_mib: spec.mem_mib as u64 };
        self.spawn(id, start, (spec.mem_mib as u64) << 20)
    }

    fn restore(&mut self, id: u32, spec: &VmSpec, image: &[u8]) -> Result<Box<dyn ManagedVm>, VmError> {
        let path = vm_file(&self.run_dir, id, "restore");
        let written = File::create(&path).and_then(|mut f| f.write_all(image)).map_err(file_err("write", &path));
        // The process restores and resumes it before it opens its socket (a
        // restored management VM goes back to work). A stream image is read
        // into the VM's own memory, so the file can go as soon as it is up.
        let r = written
            .and_then(|()| self.spawn(id, Start::Restore { snapshot: path.clone() }, (spec.mem_mib as u64) << 20));
        remove_file(&path);
        r
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Full,
    Live,
    Diff,
    LiveDiff,
}

impl VmmVm {
    /// A snapshot of `kind` through a file in the run directory, read back.
    fn snapshot_kind(&mut self, kind: Kind) -> Result<Vec<u8>, VmError> {
        let path = vm_file(&self.run_dir, self.id, "snap");
        let c = self.proc()?.client();
        let taken = match kind {
            Kind::Full => c.snapshot_stream(&path),
            Kind::Live => c.snapshot_live(&path),
            Kind::Diff => c.snapshot(&path, true),
            Kind::LiveDiff => c.snapshot_live_diff(&path),
        }
        .map_err(err("snapshot"));
        let image = taken.and_then(|t| {
            let mut img = Vec::with_capacity(t.bytes as usize);
            File::open(&path).and_then(|mut f| f.read_to_end(&mut img)).map_err(file_err("read", &path))?;
            Ok(img)
        });
        // Its page cache is charged to the VM's cgroup while it exists.
        remove_file(&path);
        image
    }

    fn proc(&mut self) -> Result<&mut VmmProcess, VmError> {
        self.proc.as_mut().ok_or(VmError::Gone)
    }

    /// Stop the process (SIGTERM: it shuts the VM down and exits; SIGKILL
    /// after a grace period), then remove the VM's cgroup and socket.
    fn teardown(&mut self) -> Result<(), VmError> {
        drop(self.proc.take());
        remove_file(&vm_file(&self.run_dir, self.id, "console"));
        if let Some(mut cg) = self.cgroup.take() {
            let name = cg.rel().display().to_string();
            cg.remove().map_err(|source| VmError::Cgroup { what: "remove", name, source })?;
        }
        Ok(())
    }
}

impl ManagedVm for VmmVm {
    fn pause(&mut self) -> Result<(), VmError> {
        self.proc()?.client().pause().map_err(err("pause"))
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.proc()?.client().resume().map_err(err("resume"))
    }

    fn stop(&mut self) -> Result<(), VmError> {
        self.teardown()
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, VmError> {
        self.snapshot_kind(Kind::Full)
    }

    fn snapshot_live(&mut self) -> Result<Vec<u8>, VmError> {
        self.snapshot_kind(Kind::Live)
    }

    fn snapshot_diff(&mut self) -> Result<Vec<u8>, VmError> {
        self.snapshot_kind(Kind::Diff)
    }

    fn snapshot_live_diff(&mut self) -> Result<Vec<u8>, VmError> {
        self.snapshot_kind(Kind::LiveDiff)
    }

    fn take_console(&mut self) -> Vec<String> {
        self.console.lines()
    }

    fn mem_bytes(&self) -> u64 {
        self.mem_bytes
    }

    fn usage(&mut self) -> Result<VmUsage, VmError> {
        let Some(cg) = &self.cgroup else {
            return process_usage(self.proc()?.pid());
        };
        let name = || cg.rel().display().to_string();
        let cg_err = |source| VmError::Cgroup { what: "measure", name: name(), source };
        let cpu_ns = cg.cpu_usage_ns().map_err(cg_err)?;
        let memory = cg.memory().map_err(cg_err)?;
        match memory {
            Some(m) => Ok(VmUsage { source: CostSource::Cgroup, cpu_ns, memory_bytes: m.usage_bytes }),
            // No memory controller over it: the process's resident memory.
            None => {
                let p = process_usage(self.proc()?.pid())?;
                Ok(VmUsage { source: CostSource::Cgroup, cpu_ns, memory_bytes: p.memory_bytes })
            }
        }
    }

    fn apply_diff(&mut self, diff: &[u8]) -> Result<(), VmError> {
        let path = vm_file(&self.run_dir, self.id, "diff");
        File::create(&path).and_then(|mut f| f.write_all(diff)).map_err(file_err("write", &path))?;
        let r = self.proc().and_then(|p| p.client().apply_diff(&path).map_err(err("apply diff")));
        remove_file(&path);
        r
    }

    fn restore_image(&mut self, path: &Path) -> Result<(), VmError> {
        self.proc()?.client().restore(path, &[]).map(drop).map_err(err("restore"))
    }

    fn pids(&self) -> Vec<u32> {
        self.proc.as_ref().map(|p| p.pid()).into_iter().collect()
    }

    fn monitor_tick(
        &mut self,
        seq: u64,
        tick_ms: u32,
        signals: &[vmm::host::api::Signals],
    ) -> Result<Vec<vmm::host::api::Change>, VmError> {
        Ok(self.proc()?.client().monitor_tick(seq, tick_ms, signals).map_err(err("monitor tick"))?.changes)
    }

    fn log_take(
        &mut self,
        seq: u64,
        epoch: u32,
        records: &[vmm::host::api::LogLine],
    ) -> Result<Vec<vmm::host::api::Ack>, VmError> {
        Ok(self.proc()?.client().log_take(seq, epoch, records).map_err(err("log take"))?.acks)
    }

    fn qos_tick(
        &mut self,
        seq: u64,
        card: vmm::host::api::CardNetwork,
        vms: &[vmm::host::api::QosVm],
    ) -> Result<Vec<vmm::host::api::QosLimitChange>, VmError> {
        Ok(self.proc()?.client().qos_tick(seq, card, vms).map_err(err("qos tick"))?.changes)
    }

    fn agent(&mut self, op: AgentOp, arg: u64) -> Result<vmm::Reply, VmError> {
        Ok(self.proc()?.client().request(op, arg).map_err(err("agent request"))?.reply)
    }
}

impl Drop for VmmVm {
    /// A VM the card never stopped (the card is going down): stop it the
    /// same way; what cannot be removed is logged.
    fn drop(&mut self) {
        if self.proc.is_some() || self.cgroup.is_some() {
            if let Err(e) = self.teardown() {
                tracing::warn!(vm = self.id, error = %e, "card VM left something behind");
            }
        }
    }
}

/// The new lines of a VM's serial console file.
struct ConsoleTail {
    file: File,
    path: PathBuf,
    /// A line not finished yet.
    partial: Vec<u8>,
    /// Whether a read failure was logged already (logged once per run of them).
    failing: bool,
}

impl ConsoleTail {
    /// Create the (empty) console file the VM's process appends to, and
    /// keep it open to read; reads go on after the file is removed.
    fn create(path: &Path) -> Result<ConsoleTail, VmError> {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(file_err("create", path))?;
        Ok(ConsoleTail { file, path: path.to_path_buf(), partial: Vec::new(), failing: false })
    }

    fn lines(&mut self) -> Vec<String> {
        let mut buf = Vec::new();
        match self.file.read_to_end(&mut buf) {
            Ok(_) => self.failing = false,
            Err(e) => {
                if !self.failing {
                    tracing::warn!(file = %self.path.display(), error = %e, "cannot read a card VM's console");
                }
                self.failing = true;
            }
        }
        self.partial.extend_from_slice(&buf);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else { return Vec::new() };
        let rest = self.partial.split_off(end + 1);
        let done = std::mem::replace(&mut self.partial, rest);
        String::from_utf8_lossy(&done)
            .split('\n')
            .map(|l| l.trim_end_matches('\r'))
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_come_whole_and_once() {
        let dir = fixtures::TempDir::new("console-tail").expect("temp dir");
        let path = dir.path().join("c");
        let mut tail = ConsoleTail::create(&path).expect("console file");
        let mut w = File::options().append(true).open(&path).expect("writer");
        w.write_all(b"mc-agent ready\r\nhalf").expect("write");
        assert_eq!(tail.lines(), vec!["mc-agent ready".to_string()]);
        assert!(tail.lines().is_empty());
        w.write_all(b" a line\n\n").expect("write");
        // Read on after the file is gone (a stopped VM's last lines).
        std::fs::remove_file(&path).expect("remove");
        assert_eq!(tail.lines(), vec!["half a line".to_string()]);
    }
}
