//! The card's side of MC VMs: VMs run by the card's own VMM (claim 12),
//! driven over card-link's mailbox; snapshots stream through it chunk by
//! chunk with their CRC checked.

use std::collections::HashMap;

use card_link::mailbox::VmSpec;
use card_link::Card;

use super::mover::Site;
use super::AgentError;

/// An answer that passed the card's checks but not ours: the card lies or
/// its checks are broken; either way the VM is not to be trusted.
fn malformed(task: &str, field: &str) -> AgentError {
    AgentError::Stopped(format!("{task}'s agent on the card answered malformed: field {field}"))
}

pub struct CardSite {
    card: Card,
    /// Task -> (VM id on the card, its spec).
    vms: HashMap<String, (u32, VmSpec)>,
    /// Pre-copy: task -> the VM id of a staged base (paused, waiting for its diff).
    staged: HashMap<String, u32>,
    /// Guest RAM of each task, for restores and cold starts.
    mem_mib: HashMap<String, u32>,
    /// The link as opened (`Card::transport_info`).
    link: String,
}

impl CardSite {
    pub fn new(card: Card) -> CardSite {
        let link = card.transport_info().to_string();
        tracing::info!("card link: {link}");
        CardSite { card, vms: HashMap::new(), staged: HashMap::new(), mem_mib: HashMap::new(), link }
    }

    /// How the link reaches the card (chosen at open).
    pub fn link(&self) -> &str {
        &self.link
    }

    /// Say how much guest RAM a task's VM has (restores and cold starts).
    pub fn register(&mut self, task: &str, mem_mib: u32) {
        self.mem_mib.insert(task.to_string(), mem_mib);
    }

    pub fn card(&mut self) -> &mut Card {
        &mut self.card
    }

    /// Put a new link to the same card in place of a failed one: the VMs
    /// it runs for us are the same (the caller checked they are there).
    pub fn replace_card(&mut self, card: Card) {
        self.link = card.transport_info().to_string();
        self.card = card;
    }

    fn spec(&self, task: &str) -> VmSpec {
        VmSpec { name: task.to_string(), mem_mib: self.mem_mib.get(task).copied().unwrap_or(64), vcpus: 1 }
    }

    /// Take over the VMs a killed governor left on the card: one named
    /// after each task (running, or paused mid-move: resumed) is adopted;
    /// a second copy or a stopped one is stopped. The tasks adopted.
    pub fn adopt(&mut self, tasks: &[String]) -> Vec<String> {
        let list = match self.card.list_vms() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("listing the card's VMs to adopt them: {e}");
                return Vec::new();
            }
        };
        let mut adopted = Vec::new();
        for v in list {
            let Some(task) = tasks.iter().find(|t| **t == v.name) else { continue };
            let usable = matches!(v.state, card_link::mailbox::VmState::Running | card_link::mailbox::VmState::Paused);
            if !usable || adopted.contains(task) {
                if let Err(e) = self.card.stop_vm(v.id) {
                    tracing::warn!(task, vm = v.id, "stopping a stale copy on the card: {e}");
                }
                continue;
            }
            if v.state == card_link::mailbox::VmState::Paused {
                if let Err(e) = self.card.resume_vm(v.id) {
                    tracing::warn!(task, vm = v.id, "resuming the adopted VM on the card: {e}");
                }
            }
            tracing::info!(task, vm = v.id, "adopted the MC VM a governor before left on the card");
            let spec = self.spec(task);
            self.vms.insert(task.clone(), (v.id, spec));
            adopted.push(task.clone());
        }
        adopted
    }

    /// Boot the task's VM on the card (a first placement there).
    pub fn cold_start(&mut self, task: &str, mem_mib: u32) -> Result<u32, card_link::CardError> {
        self.mem_mib.insert(task.to_string(), mem_mib);
        let spec = self.spec(task);
        let id = self.card.start_vm(&spec)?;
        self.vms.insert(task.to_string(), (id, spec));
        Ok(id)
    }

    /// One status-monitoring tick with `task`'s agent on the card (ABI 1.2
    /// `agent-bulk`): the answer is checked whole.
    pub fn monitor_tick(
        &mut self,
        task: &str,
        seq: u64,
        tick_ms: u32,
        batch: &[vmm::proto::signals::VmSignals],
    ) -> Result<Vec<vmm::proto::signals::HealthChange>, AgentError> {
        let message = vmm::vm::bulk::telemetry_message(seq, tick_ms, batch).map_err(|e| e.to_string())?;
        let answer = self.agent_bulk(task, card_link::mailbox::BULK_MONITOR, &message)?;
        vmm::vm::bulk::check_health_answer(&answer, seq, batch).map_err(|f| malformed(task, f))
    }

    /// One log exchange with `task`'s agent on the card (`agent-bulk`);
    /// the answer is checked whole.
    pub fn log_take(
        &mut self,
        task: &str,
        seq: u64,
        epoch: u32,
        records: &[vmm::proto::logs::LogRecord],
    ) -> Result<Vec<vmm::proto::logs::LogAck>, AgentError> {
        let message = vmm::vm::bulk::log_message(seq, epoch, records).map_err(|e| e.to_string())?;
        let answer = self.agent_bulk(task, card_link::mailbox::BULK_LOG, &message)?;
        vmm::vm::bulk::check_log_answer(&answer, seq, records).map_err(|f| malformed(task, f))
    }

    /// One QoS-policy tick with `task`'s agent on the card (`agent-bulk`);
    /// the answer is checked whole, each change against the VM's policy.
    pub fn qos_tick(
        &mut self,
        task: &str,
        seq: u64,
        card_bp: (u32, u32),
        batch: &[vmm::proto::qos::QosSignals],
    ) -> Result<Vec<vmm::proto::qos::QosChange>, AgentError> {
        let message = vmm::vm::bulk::qos_message(seq, card_bp.0, card_bp.1, batch).map_err(|e| e.to_string())?;
        let answer = self.agent_bulk(task, card_link::mailbox::BULK_QOS, &message)?;
        vmm::vm::bulk::check_qos_answer(&answer, seq, batch).map_err(|f| malformed(task, f))
    }

    /// One `agent-bulk` exchange. A card that refuses it because the VM is
    /// in the wrong state is asked whether the VM stopped (its VMM stops a
    /// VM whose agent answers malformed): that is final, not a slow tick.
    fn agent_bulk(&mut self, task: &str, kind: u64, message: &[u8]) -> Result<Vec<u8>, AgentError> {
        let id = self.id(task)?;
        let err = match self.card.agent_bulk(id, kind, message) {
            Ok(answer) => return Ok(answer),
            Err(e) => e,
        };
        let bad_state =
            matches!(&err, card_link::CardError::Refused { status: card_link::mailbox::Status::BadState, .. });
        let stopped = bad_state
            && self
                .card
                .list_vms()
                .is_ok_and(|l| l.iter().any(|v| v.id == id && v.state == card_link::mailbox::VmState::Stopped));
        Err(if stopped {
            AgentError::Stopped(format!("{task}'s VM on the card stopped: {err}"))
        } else {
            AgentError::Unavailable(err.to_string())
        })
    }

    /// Tasks with a VM on the card, with their VM ids.
    pub fn tasks(&self) -> Vec<(String, u32)> {
        self.vms.iter().map(|(t, (id, _))| (t.clone(), *id)).collect()
    }

    /// Forget the card's VMs without stopping them (the card died: they
    /// are gone with it).
    pub fn forget_all(&mut self) -> Vec<String> {
        self.staged.clear();
        self.vms.drain().map(|(t, _)| t).collect()
    }

    /// The card's VM id of a task, if it runs there.
    pub fn vm_id(&self, task: &str) -> Option<u32> {
        self.vms.get(task).map(|(id, _)| *id)
    }

    /// Take a snapshot of `flags` (0, LIVE or DIFF) on the card and stream
    /// it to the host, its CRC checked.
    fn read_snapshot_with(&mut self, task: &str, flags: u64) -> Result<Vec<u8>, String> {
        let id = self.id(task)?;
        let info = self.card.snapshot_vm_with(id, flags).map_err(|e| e.to_string())?;
        let mut image = Vec::with_capacity(usize::try_from(info.size).unwrap_or(0));
        self.card.read_snapshot(id, &info, &mut image).map_err(|e| e.to_string())?;
        Ok(image)
    }

    fn id(&self, task: &str) -> Result<u32, String> {
        self.vm_id(task).ok_or_else(|| format!("no {task} VM on the card"))
    }
}

impl Site for CardSite {
    /// The card's VMM takes a restore at any time.
    fn prepare(&mut self, _task: &str) -> Result<(), String> {
        Ok(())
    }

    fn pause(&mut self, task: &str) -> Result<(), String> {
        let id = self.id(task)?;
        self.card.pause_vm(id).map_err(|e| e.to_string())
    }

    fn resume(&mut self, task: &str) -> Result<(), String> {
        let id = self.id(task)?;
        self.card.resume_vm(id).map_err(|e| e.to_string())
    }

    fn snapshot(&mut self, task: &str) -> Result<Vec<u8>, String> {
        self.read_snapshot_with(task, 0)
    }

    /// The card's VMM resumes a restored VM itself; the source is paused
    /// until the mover's resume step, so the task still never runs twice.
    fn restore(&mut self, task: &str, image: &[u8]) -> Result<(), String> {
        let spec = self.spec(task);
        let id = self.card.restore_vm(&spec, image.len() as u64, &mut &image[..]).map_err(|e| e.to_string())?;
        self.vms.insert(task.to_string(), (id, spec));
        Ok(())
    }

    /// Pre-copy's base of the running VM, when the card offers it (ABI 1.2
    /// feature PRECOPY); None otherwise (the move copies all while paused).
    fn snapshot_live(&mut self, task: &str) -> Result<Option<Vec<u8>>, String> {
        if self.card.identity().features & card_link::abi::FEATURE_PRECOPY == 0 {
            return Ok(None);
        }
        self.read_snapshot_with(task, card_link::mailbox::SNAPSHOT_LIVE).map(Some)
    }

    fn snapshot_live_diff(&mut self, task: &str) -> Result<Option<Vec<u8>>, String> {
        if self.card.identity().features & card_link::abi::FEATURE_PRECOPY == 0 {
            return Ok(None);
        }
        let flags = card_link::mailbox::SNAPSHOT_LIVE | card_link::mailbox::SNAPSHOT_DIFF;
        self.read_snapshot_with(task, flags).map(Some)
    }

    fn apply_live_diff(&mut self, task: &str, diff: &[u8]) -> Result<(), String> {
        let id = *self.staged.get(task).ok_or_else(|| format!("no staged base for {task} on the card"))?;
        let spec = self.spec(task);
        self.card.apply_diff_vm(id, &spec, diff.len() as u64, &mut &diff[..]).map_err(|e| e.to_string())
    }

    fn snapshot_diff(&mut self, task: &str) -> Result<Vec<u8>, String> {
        self.read_snapshot_with(task, card_link::mailbox::SNAPSHOT_DIFF)
    }

    /// Pre-copy, destination: restore the base paused as a new VM on the
    /// card (when the card offers it).
    fn stage(&mut self, task: &str, base: &[u8]) -> Result<bool, String> {
        if self.card.identity().features & card_link::abi::FEATURE_PRECOPY == 0 {
            return Ok(false);
        }
        let spec = self.spec(task);
        let id = self.card.restore_vm_paused(&spec, base.len() as u64, &mut &base[..]).map_err(|e| e.to_string())?;
        self.staged.insert(task.to_string(), id);
        Ok(true)
    }

    fn apply_diff(&mut self, task: &str, diff: &[u8]) -> Result<(), String> {
        let id = *self.staged.get(task).ok_or_else(|| format!("no staged base for {task} on the card"))?;
        let spec = self.spec(task);
        self.card.apply_diff_vm(id, &spec, diff.len() as u64, &mut &diff[..]).map_err(|e| e.to_string())?;
        self.staged.remove(task);
        self.vms.insert(task.to_string(), (id, spec));
        Ok(())
    }

    fn release(&mut self, task: &str) -> Result<(), String> {
        if !self.vms.contains_key(task) {
            // A staged base that never got its diff.
            if let Some(id) = self.staged.remove(task) {
                return self.card.stop_vm(id).map_err(|e| e.to_string());
            }
        }
        let (id, _) = self.vms.remove(task).ok_or_else(|| format!("no {task} VM on the card"))?;
        self.card.stop_vm(id).map_err(|e| e.to_string())
    }
}

impl Drop for CardSite {
    /// The governor goes: the MC VMs it started on the card go with it (a
    /// restarted governor starts them again); what cannot be stopped is
    /// logged.
    fn drop(&mut self) {
        let staged: Vec<(String, u32)> = self.staged.drain().collect();
        for (task, id) in self.vms.drain().map(|(t, (id, _))| (t, id)).chain(staged) {
            if let Err(e) = self.card.stop_vm(id) {
                tracing::warn!(task, vm = id, "stopping the MC VM on the card: {e}");
            }
        }
    }
}
