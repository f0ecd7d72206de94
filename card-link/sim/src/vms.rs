//! The card-side VMM behind a small trait: `vmm_backend::VmmBackend` runs
//! each management VM as a real KVM guest in its own `vmm` process, inside
//! a child cgroup of the card's cgroup, and is used when card-sim is given
//! the agent ELF (`--guest`); `ModelBackend` otherwise.
//!
//! `ModelBackend` runs no guest code: each "VM" is its guest memory (real,
//! allocated and touched inside the card's cgroup, so it counts as card
//! memory) plus an agent that prints a banner and a tick counter. Its
//! snapshots are real byte images of that memory and state, which is what
//! the mailbox streams. It keeps card-sim usable where /dev/kvm or the guest
//! ELF is missing, and gives byte-exact restore checks. Its cost is its own
//! accounting: no CPU (it runs nothing), memory = the bytes it holds.

use card_link::costs::CostSource;
use card_link::mailbox::VmSpec;
use vmm::host::api::AgentOp;

use crate::costs::VmUsage;
use crate::error::VmError;

pub trait VmBackend: Send {
    fn start(&mut self, id: u32, spec: &VmSpec) -> Result<Box<dyn ManagedVm>, VmError>;
    fn restore(&mut self, id: u32, spec: &VmSpec, image: &[u8]) -> Result<Box<dyn ManagedVm>, VmError>;
    /// Restore without running it (a staged pre-copy base); default: not supported.
    fn restore_paused(&mut self, _id: u32, _spec: &VmSpec, _image: &[u8]) -> Result<Box<dyn ManagedVm>, VmError> {
        Err(VmError::NoPrecopy)
    }
    /// Whether its VMs take pre-copy snapshots (live base, diff).
    fn precopy(&self) -> bool {
        false
    }
}

pub trait ManagedVm: Send {
    fn pause(&mut self) -> Result<(), VmError>;
    fn resume(&mut self) -> Result<(), VmError>;
    fn stop(&mut self) -> Result<(), VmError>;
    /// A complete image of the VM (it should be paused).
    fn snapshot(&mut self) -> Result<Vec<u8>, VmError>;
    /// Console lines printed since the last call (go to the card's event log).
    fn take_console(&mut self) -> Vec<String>;
    fn mem_bytes(&self) -> u64;
    /// The VM's CPU and memory as measured now (the `vm-costs` table).
    fn usage(&mut self) -> Result<VmUsage, VmError>;
    /// One request to the VM's management agent.
    fn agent(&mut self, op: AgentOp, arg: u64) -> Result<vmm::Reply, VmError>;
    /// Pre-copy's base while the VM runs; default: not supported.
    fn snapshot_live(&mut self) -> Result<Vec<u8>, VmError> {
        Err(VmError::NoPrecopy)
    }
    /// The running VM's changes since its last snapshot (pre-copy rounds).
    fn snapshot_live_diff(&mut self) -> Result<Vec<u8>, VmError> {
        Err(VmError::NoPrecopy)
    }
    /// The paused VM's changes since its last snapshot; default: not supported.
    fn snapshot_diff(&mut self) -> Result<Vec<u8>, VmError> {
        Err(VmError::NoPrecopy)
    }
    /// Restore an image file into this VM's empty VMM (paused).
    fn restore_image(&mut self, _path: &std::path::Path) -> Result<(), VmError> {
        Err(VmError::NoPrecopy)
    }
    /// Apply a diff to this paused VM restored from the diff's base.
    fn apply_diff(&mut self, _diff: &[u8]) -> Result<(), VmError> {
        Err(VmError::NoPrecopy)
    }
    /// One status-monitoring tick with the VM's agent: the signals in, the
    /// changes it decided out; default: no agent.
    fn monitor_tick(
        &mut self,
        _seq: u64,
        _tick_ms: u32,
        _signals: &[vmm::host::api::Signals],
    ) -> Result<Vec<vmm::host::api::Change>, VmError> {
        Err(VmError::NoAgent)
    }
    /// One log exchange with the VM's agent; default: no agent.
    fn log_take(
        &mut self,
        _seq: u64,
        _epoch: u32,
        _records: &[vmm::host::api::LogLine],
    ) -> Result<Vec<vmm::host::api::Ack>, VmError> {
        Err(VmError::NoAgent)
    }
    /// One qos tick with the VM's agent; default: no agent.
    fn qos_tick(
        &mut self,
        _seq: u64,
        _card: vmm::host::api::CardNetwork,
        _vms: &[vmm::host::api::QosVm],
    ) -> Result<Vec<vmm::host::api::QosLimitChange>, VmError> {
        Err(VmError::NoAgent)
    }
    /// Processes of its own that must die with the card (a crash).
    fn pids(&self) -> Vec<u32> {
        Vec::new()
    }
}

pub struct ModelBackend;

const IMAGE_MAGIC: &[u8; 8] = b"MCVMIMG1";

struct ModelVm {
    name: String,
    memory: Vec<u8>,
    ticks: u64,
    console: Vec<String>,
}

impl ModelVm {
    fn new(id: u32, spec: &VmSpec) -> ModelVm {
        let mut memory = vec![0u8; (spec.mem_mib as usize) << 20];
        // Touch every page with a recognisable pattern (it is charged to the
        // card's cgroup, and a restore can be checked byte for byte).
        for (i, chunk) in memory.chunks_mut(4096).enumerate() {
            chunk[0] = (i as u8) ^ (id as u8);
            chunk[1] = 0xa5;
        }
        ModelVm { name: spec.name.clone(), memory, ticks: 0, console: Vec::new() }
    }
}

impl VmBackend for ModelBackend {
    fn start(&mut self, id: u32, spec: &VmSpec) -> Result<Box<dyn ManagedVm>, VmError> {
        let mut vm = ModelVm::new(id, spec);
        vm.console.push(format!("mc-agent {}: management agent ready (vm {id})", spec.name));
        Ok(Box::new(vm))
    }

    fn restore(&mut self, id: u32, spec: &VmSpec, image: &[u8]) -> Result<Box<dyn ManagedVm>, VmError> {
        if image.len() < 24 || &image[..8] != IMAGE_MAGIC {
            return Err(VmError::NotModelImage);
        }
        let mut w = [0u8; 8];
        w.copy_from_slice(&image[8..16]);
        let ticks = u64::from_le_bytes(w);
        w.copy_from_slice(&image[16..24]);
        let stated = u64::from_le_bytes(w);
        if (image.len() - 24) as u64 != stated {
            return Err(VmError::ModelImageSize { memory: image.len() - 24, stated });
        }
        let vm = ModelVm {
            name: spec.name.clone(),
            memory: image[24..].to_vec(),
            ticks,
            console: vec![format!("mc-agent {}: restored at tick {ticks} (vm {id})", spec.name)],
        };
        Ok(Box::new(vm))
    }
}

impl ManagedVm for ModelVm {
    fn pause(&mut self) -> Result<(), VmError> {
        self.ticks += 1;
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        Ok(())
    }
    fn stop(&mut self) -> Result<(), VmError> {
        self.console.push(format!("mc-agent {}: stopped", self.name));
        self.memory = Vec::new();
        Ok(())
    }
    fn snapshot(&mut self) -> Result<Vec<u8>, VmError> {
        let mut img = Vec::with_capacity(24 + self.memory.len());
        img.extend_from_slice(IMAGE_MAGIC);
        img.extend_from_slice(&self.ticks.to_le_bytes());
        img.extend_from_slice(&(self.memory.len() as u64).to_le_bytes());
        img.extend_from_slice(&self.memory);
        Ok(img)
    }
    fn take_console(&mut self) -> Vec<String> {
        std::mem::take(&mut self.console)
    }
    fn mem_bytes(&self) -> u64 {
        self.memory.len() as u64
    }
    fn usage(&mut self) -> Result<VmUsage, VmError> {
        Ok(VmUsage { source: CostSource::Model, cpu_ns: 0, memory_bytes: self.memory.len() as u64 })
    }
    fn agent(&mut self, _op: AgentOp, _arg: u64) -> Result<vmm::Reply, VmError> {
        Err(VmError::NoAgent)
    }
}
