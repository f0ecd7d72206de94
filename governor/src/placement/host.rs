//! The host's side of MC VMs (claims 11, 13): each host-side MC VM is a
//! `vmm` process in its own child cgroup of one MC subtree that carries the
//! configured reserve as its CPU and memory limits, apart from user VMs'
//! cgroups. A move in is restored into an empty VMM spawned beforehand
//! (`prepare`), so the spawn is off the critical path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cgroupfs::{Cgroup, Layout, Limits};
use vmm::host::process::{SpawnOptions, Start, VmmProcess};

use super::mover::Site;
use super::AgentError;
use super::HostCost;

/// Where the host site runs its VMMs and what they may use.
#[derive(Clone, Debug)]
pub struct HostSiteOptions {
    /// The `vmm` binary.
    pub vmm_bin: PathBuf,
    /// The management agent ELF (cold starts).
    pub guest: PathBuf,
    /// Directory for control sockets and snapshot files (created; removed
    /// with what is in it when the site drops).
    pub run_dir: PathBuf,
    /// The MC subtree, relative to the cgroup roots.
    pub subtree: String,
    /// CPU and memory of the whole subtree (the MC reserve).
    pub reserve: HostCost,
}

#[derive(Debug, thiserror::Error)]
pub enum HostSiteError {
    #[error("MC cgroup subtree {subtree}: {source}")]
    Cgroup {
        subtree: String,
        #[source]
        source: cgroupfs::CgroupError,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("task {task}: {source}")]
    Vmm {
        task: String,
        #[source]
        source: vmm::Error,
    },
}

/// The MC subtree's CPU weight: ten default cgroups' (cgroup v2 scale).
pub const MC_CPU_WEIGHT: u64 = 1000;

#[derive(Default)]
struct Slot {
    /// An empty VMM ready to restore into.
    spare: Option<VmmProcess>,
    /// The VMM running (or holding, paused) the task.
    live: Option<VmmProcess>,
    /// The live VMM's control socket.
    live_socket: Option<PathBuf>,
    /// Pre-copy: the prepared VMM holding a restored base, paused, waiting
    /// for its diff.
    staged: Option<VmmProcess>,
}

pub struct HostSite {
    opts: HostSiteOptions,
    layout: Layout,
    subtree: Cgroup,
    slots: HashMap<String, Slot>,
}

impl HostSite {
    /// Make the MC subtree with the reserve as its limits, and the run
    /// directory.
    pub fn new(opts: HostSiteOptions, layout: &Layout) -> Result<HostSite, HostSiteError> {
        let quota = (opts.reserve.cpus * 100_000.0).round().max(1000.0) as u64;
        // The reserve is held for the MC VMs, not only capped: the quota
        // caps them, the weight gets them that much when user VMs load the
        // host (a default cgroup's weight would share the CPU with every
        // busy user process alike).
        let limits = Limits {
            cpu_quota_us: Some(quota),
            memory_bytes: Some(opts.reserve.memory_bytes),
            cpu_weight: Some(MC_CPU_WEIGHT),
            ..Limits::default()
        };
        let subtree = layout
            .create(&opts.subtree, &limits)
            .map_err(|source| HostSiteError::Cgroup { subtree: opts.subtree.clone(), source })?;
        std::fs::create_dir_all(&opts.run_dir).map_err(|source| HostSiteError::Io {
            what: "create",
            path: opts.run_dir.clone(),
            source,
        })?;
        Ok(HostSite { opts, layout: layout.clone(), subtree, slots: HashMap::new() })
    }

    /// The MC subtree (the governor watches it with role `mc`).
    pub fn subtree(&self) -> &Cgroup {
        &self.subtree
    }

    /// The cgroup of one task's VM, relative to the roots.
    pub fn task_cgroup(&self, task: &str) -> String {
        format!("{}/{task}", self.opts.subtree)
    }

    fn socket(&self, task: &str, n: &str) -> PathBuf {
        self.opts.run_dir.join(format!("{task}-{n}.sock"))
    }

    fn image(&self, task: &str) -> PathBuf {
        self.opts.run_dir.join(format!("{task}.snap"))
    }

    fn spawn(&self, task: &str, start: Start, n: &str) -> Result<VmmProcess, HostSiteError> {
        let o = SpawnOptions {
            bin: self.opts.vmm_bin.clone(),
            start,
            socket: self.socket(task, n),
            serial: None,
            log: None,
            cgroup: Some((self.task_cgroup(task), Limits::default())),
        };
        VmmProcess::spawn(&o).map_err(|source| HostSiteError::Vmm { task: task.into(), source })
    }

    /// Boot the task's VM from scratch on the host (a first placement on
    /// the host, or a card that died with no checkpoint).
    pub fn cold_start(&mut self, task: &str, mem_mib: u64) -> Result<(), HostSiteError> {
        let p = self.spawn(task, Start::Guest { elf: self.opts.guest.clone(), mem_mib }, "live")?;
        let socket = self.socket(task, "live");
        let slot = self.slots.entry(task.into()).or_default();
        slot.live = Some(p);
        slot.live_socket = Some(socket);
        Ok(())
    }

    /// Take over the task's VMM a killed governor left running (its
    /// control socket in the run directory): the one holding a running or
    /// paused VM becomes the live one (resumed if paused); an empty or
    /// stopped one is stopped. Whether a VM was adopted.
    pub fn adopt(&mut self, task: &str) -> bool {
        let mut live: Option<(VmmProcess, PathBuf)> = None;
        for n in ["live", "spare"] {
            let sock = self.socket(task, n);
            if !sock.exists() {
                continue;
            }
            let mut p = match VmmProcess::attach(&sock) {
                Ok(p) => p,
                Err(e) => {
                    tracing::info!(task, socket = %sock.display(), "not adopting a dead VMM's socket: {e}");
                    remove(&sock);
                    continue;
                }
            };
            let state = p.client().state().map(|s| s.state);
            match state {
                Ok(vmm::RunState::Running | vmm::RunState::Paused) if live.is_none() => {
                    if matches!(state, Ok(vmm::RunState::Paused)) {
                        if let Err(e) = p.client().resume() {
                            tracing::warn!(task, "resuming the adopted VM: {e}");
                        }
                    }
                    tracing::info!(task, pid = p.pid(), "adopted the MC VM's VMM a governor before left");
                    live = Some((p, sock));
                }
                // Empty (a spare), stopped, or a second copy: dropping the
                // handle stops it.
                other => tracing::info!(task, ?other, "stopping a VMM a governor before left"),
            }
        }
        let Some((p, sock)) = live else { return false };
        let slot = self.slots.entry(task.into()).or_default();
        slot.live = Some(p);
        slot.live_socket = Some(sock);
        true
    }

    /// Restore a task from a base and diffs in files (a checkpoint), into
    /// the prepared VMM; it comes up paused.
    pub fn restore_chain(&mut self, task: &str, base: &Path, diffs: &[PathBuf]) -> Result<(), String> {
        let slot = self.slots.entry(task.into()).or_default();
        let Some(mut spare) = slot.spare.take() else { return Err(format!("no VMM prepared for {task}")) };
        spare.client().restore(base, diffs).map_err(|e| e.to_string())?;
        slot.live = Some(spare);
        slot.live_socket = Some(self.opts.run_dir.join(format!("{task}-spare.sock")));
        Ok(())
    }

    /// The cgroup of each task running here (their costs are read from them).
    pub fn task_cgroups(&self) -> Vec<(String, Cgroup)> {
        self.slots
            .iter()
            .filter(|(_, s)| s.live.is_some())
            .filter_map(|(task, _)| match self.layout.open(&self.task_cgroup(task)) {
                Ok(cg) => Some((task.clone(), cg)),
                Err(e) => {
                    tracing::debug!(task, "opening the MC VM's cgroup: {e}");
                    None
                }
            })
            .collect()
    }

    /// Tasks with a live VM here.
    pub fn tasks(&self) -> Vec<String> {
        self.slots.iter().filter(|(_, s)| s.live.is_some()).map(|(t, _)| t.clone()).collect()
    }

    /// One status-monitoring tick with `task`'s agent running here: the
    /// signals in, its health changes out, checked (valid states and
    /// reasons, only VMs asked about).
    pub fn monitor_tick(
        &mut self,
        task: &str,
        seq: u64,
        tick_ms: u32,
        batch: &[vmm::proto::signals::VmSignals],
    ) -> Result<Vec<vmm::proto::signals::HealthChange>, AgentError> {
        let signals: Vec<vmm::host::api::Signals> = batch.iter().map(vmm::host::api::Signals::from_proto).collect();
        let reply = self.live(task)?.client().monitor_tick(seq, tick_ms, &signals).map_err(AgentError::from_vmm)?;
        if reply.changes.len() > batch.len() {
            let n = (reply.changes.len(), batch.len());
            return Err(AgentError::Stopped(format!("{task}'s agent answered {} changes for {} VMs", n.0, n.1)));
        }
        reply
            .changes
            .iter()
            .map(|c| {
                c.to_proto()
                    .filter(|h| batch.iter().any(|s| s.slot == h.slot))
                    .ok_or_else(|| AgentError::Stopped(format!("{task}'s agent answered a malformed change {c:?}")))
            })
            .collect()
    }

    /// One QoS-policy tick with `task`'s agent running here: each change
    /// checked against the policy of a VM that was asked about.
    pub fn qos_tick(
        &mut self,
        task: &str,
        seq: u64,
        card_bp: (u32, u32),
        batch: &[vmm::proto::qos::QosSignals],
    ) -> Result<Vec<vmm::proto::qos::QosChange>, AgentError> {
        use vmm::host::api::{CardNetwork, QosVm};
        let vms: Vec<QosVm> = batch.iter().map(QosVm::from_proto).collect();
        let card = CardNetwork { use_bp: card_bp.0, threshold_bp: card_bp.1 };
        let reply = self.live(task)?.client().qos_tick(seq, card, &vms).map_err(AgentError::from_vmm)?;
        let mut out: Vec<vmm::proto::qos::QosChange> = Vec::new();
        for c in &reply.changes {
            let ok = c.to_proto().filter(|q| {
                batch.iter().any(|s| s.slot == q.slot && (q.reason == vmm::proto::qos::QosReason::Calm || q.within(s)))
                    && !out.iter().any(|o| o.slot == q.slot && o.dir == q.dir)
            });
            out.push(ok.ok_or_else(|| {
                AgentError::Stopped(format!("{task}'s agent answered a malformed limit change {c:?}"))
            })?);
        }
        Ok(out)
    }

    /// One log exchange with `task`'s agent running here.
    pub fn log_take(
        &mut self,
        task: &str,
        seq: u64,
        epoch: u32,
        records: &[vmm::proto::logs::LogRecord],
    ) -> Result<Vec<vmm::proto::logs::LogAck>, AgentError> {
        let lines: Vec<vmm::host::api::LogLine> = records.iter().map(vmm::host::api::LogLine::from_proto).collect();
        let reply = self.live(task)?.client().log_take(seq, epoch, &lines).map_err(AgentError::from_vmm)?;
        let mut out: Vec<vmm::proto::logs::LogAck> = Vec::new();
        for a in &reply.acks {
            let ok = records.iter().any(|r| r.slot == a.slot)
                && !out.iter().any(|o| o.slot == a.slot)
                && a.first_host >= 1
                && a.last_host >= a.first_host
                && a.first_log >= 1;
            if !ok {
                return Err(AgentError::Stopped(format!("{task}'s agent answered a malformed acknowledgement {a:?}")));
            }
            out.push(vmm::proto::logs::LogAck {
                slot: a.slot,
                first_host: a.first_host,
                last_host: a.last_host,
                first_log: a.first_log,
            });
        }
        Ok(out)
    }

    /// The control socket of a task's live VMM (operators and tests may
    /// connect to it; it serves several clients).
    pub fn live_socket(&self, task: &str) -> Option<&Path> {
        self.slots.get(task).filter(|s| s.live.is_some())?.live_socket.as_deref()
    }

    /// The live VMM of a task (for agent requests and stats).
    pub fn vmm(&mut self, task: &str) -> Option<&mut VmmProcess> {
        self.slots.get_mut(task)?.live.as_mut()
    }

    fn live(&mut self, task: &str) -> Result<&mut VmmProcess, String> {
        self.vmm(task).ok_or_else(|| format!("no {task} VM on the host"))
    }
}

fn remove(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(file = %path.display(), "removing: {e}"),
    }
}

impl Site for HostSite {
    fn prepare(&mut self, task: &str) -> Result<(), String> {
        // A spare that died (killed, crashed) is replaced.
        if let Some(spare) = self.slots.get_mut(task).and_then(|s| s.spare.as_mut()) {
            if spare.running() {
                return Ok(());
            }
            tracing::warn!(task, "the prepared VMM died; spawning another");
        }
        let p = self.spawn(task, Start::Empty, "spare").map_err(|e| e.to_string())?;
        self.slots.entry(task.into()).or_default().spare = Some(p);
        Ok(())
    }

    fn pause(&mut self, task: &str) -> Result<(), String> {
        self.live(task)?.client().pause().map_err(|e| e.to_string())
    }

    fn resume(&mut self, task: &str) -> Result<(), String> {
        self.live(task)?.client().resume().map_err(|e| e.to_string())
    }

    fn snapshot(&mut self, task: &str) -> Result<Vec<u8>, String> {
        let path = self.image(task);
        // The stream format: only pages the guest touched, so an idle agent's
        // image is small (the dense file format would carry all its RAM).
        self.live(task)?.client().snapshot_stream(&path).map_err(|e| e.to_string())?;
        let image = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()));
        remove(&path);
        image
    }

    fn restore(&mut self, task: &str, image: &[u8]) -> Result<(), String> {
        let path = self.image(task);
        std::fs::write(&path, image).map_err(|e| format!("writing {}: {e}", path.display()))?;
        let slot = self.slots.entry(task.into()).or_default();
        let Some(mut spare) = slot.spare.take() else {
            remove(&path);
            return Err(format!("no VMM prepared for {task}"));
        };
        // The VMM maps the file privately: it may go once restored.
        let r = spare.client().restore(&path, &[]).map(drop).map_err(|e| e.to_string());
        remove(&path);
        r?;
        slot.live = Some(spare);
        slot.live_socket = Some(self.opts.run_dir.join(format!("{task}-spare.sock")));
        Ok(())
    }

    fn release(&mut self, task: &str) -> Result<(), String> {
        let slot = self.slots.get_mut(task).ok_or_else(|| format!("no {task} VM on the host"))?;
        if let Some(p) = slot.live.take() {
            return p.shutdown().map_err(|e| e.to_string());
        }
        // A staged base that never got its diff: its VMM goes (drop stops it).
        slot.staged.take().map(drop).ok_or_else(|| format!("no {task} VM on the host"))
    }

    /// Pre-copy, source: the running VM's base (the vmm parks it only to
    /// capture its state).
    fn snapshot_live(&mut self, task: &str) -> Result<Option<Vec<u8>>, String> {
        let path = self.image(task);
        self.live(task)?.client().snapshot_live(&path).map_err(|e| e.to_string())?;
        let image = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()));
        remove(&path);
        image.map(Some)
    }

    fn snapshot_live_diff(&mut self, task: &str) -> Result<Option<Vec<u8>>, String> {
        let path = self.image(task);
        self.live(task)?.client().snapshot_live_diff(&path).map_err(|e| e.to_string())?;
        let image = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()));
        remove(&path);
        image.map(Some)
    }

    fn apply_live_diff(&mut self, task: &str, diff: &[u8]) -> Result<(), String> {
        let path = self.opts.run_dir.join(format!("{task}.round"));
        std::fs::write(&path, diff).map_err(|e| format!("writing {}: {e}", path.display()))?;
        let r = match self.slots.get_mut(task).and_then(|s| s.staged.as_mut()) {
            Some(staged) => staged.client().apply_diff(&path).map_err(|e| e.to_string()),
            None => Err(format!("no staged base for {task}")),
        };
        remove(&path);
        r
    }

    fn snapshot_diff(&mut self, task: &str) -> Result<Vec<u8>, String> {
        let path = self.image(task);
        self.live(task)?.client().snapshot(&path, true).map_err(|e| e.to_string())?;
        let image = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()));
        remove(&path);
        image
    }

    fn stage(&mut self, task: &str, base: &[u8]) -> Result<bool, String> {
        let path = self.opts.run_dir.join(format!("{task}.base"));
        std::fs::write(&path, base).map_err(|e| format!("writing {}: {e}", path.display()))?;
        let slot = self.slots.entry(task.into()).or_default();
        let Some(mut spare) = slot.spare.take() else {
            remove(&path);
            return Err(format!("no VMM prepared for {task}"));
        };
        // Restored paused; it never runs until its diff is applied. A
        // failed restore drops (stops) the spare.
        let r = spare.client().restore(&path, &[]).map(drop).map_err(|e| e.to_string());
        remove(&path);
        r?;
        slot.staged = Some(spare);
        Ok(true)
    }

    fn apply_diff(&mut self, task: &str, diff: &[u8]) -> Result<(), String> {
        let path = self.opts.run_dir.join(format!("{task}.diff"));
        std::fs::write(&path, diff).map_err(|e| format!("writing {}: {e}", path.display()))?;
        let slot = self.slots.entry(task.into()).or_default();
        let Some(staged) = slot.staged.as_mut() else {
            remove(&path);
            return Err(format!("no staged base for {task}"));
        };
        let r = staged.client().apply_diff(&path).map_err(|e| e.to_string());
        remove(&path);
        r?;
        slot.live = slot.staged.take();
        slot.live_socket = Some(self.opts.run_dir.join(format!("{task}-spare.sock")));
        Ok(())
    }
}

impl Drop for HostSite {
    /// Stop every VMM (their drop stops them and they release their
    /// cgroups), then remove the subtree and the run directory.
    fn drop(&mut self) {
        self.slots.clear();
        self.subtree.kill_all(std::time::Duration::from_secs(5));
        // Ours whoever made it: a governor that took over after a kill
        // found it there.
        if let Err(e) = self.subtree.remove() {
            tracing::warn!(subtree = %self.opts.subtree, "removing the MC cgroup subtree: {e}");
        }
        if let Err(e) = std::fs::remove_dir_all(&self.opts.run_dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.opts.run_dir.display(), "removing the run directory: {e}");
            }
        }
    }
}
