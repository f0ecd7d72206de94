//! The card-side VMM on the `vmm` crate: management VMs are real KVM guests
//! (the management agent ELF), their console goes to the card's event log,
//! and their snapshots are the vmm's snapshot stream format, which is what
//! the mailbox streams to the host and back.

use std::path::PathBuf;
use std::time::Duration;

use vmm::{Sinks, Vm, VmConfig};

use card_link::mailbox::VmSpec;

use crate::error::VmError;
use crate::vms::{ManagedVm, VmBackend};

const BOOT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct VmmBackend {
    pub guest: PathBuf,
}

struct VmmVm {
    vm: Vm,
    /// Console lines already copied to the event log.
    seen: usize,
}

/// What was being done when the vmm failed, kept with its error.
fn err(what: &'static str) -> impl FnOnce(vmm::Error) -> VmError {
    move |source| VmError::Vmm { what, source }
}

impl VmBackend for VmmBackend {
    fn start(&mut self, _id: u32, spec: &VmSpec) -> Result<Box<dyn ManagedVm>, VmError> {
        let cfg = VmConfig::new(&self.guest, spec.mem_mib as u64);
        let vm = Vm::create(&cfg, Sinks::default()).map_err(err("create VM"))?;
        vm.start(false).map_err(err("start vCPU"))?;
        vm.wait_ready(BOOT_TIMEOUT).map_err(err("agent banner"))?;
        Ok(Box::new(VmmVm { vm, seen: 0 }))
    }

    fn restore(&mut self, _id: u32, _spec: &VmSpec, image: &[u8]) -> Result<Box<dyn ManagedVm>, VmError> {
        let vm = Vm::restore_from(image, Sinks::default()).map_err(err("restore VM"))?;
        // It comes up paused; a restored management VM goes back to work.
        vm.resume().map_err(err("resume restored VM"))?;
        Ok(Box::new(VmmVm { vm, seen: 0 }))
    }
}

impl ManagedVm for VmmVm {
    fn pause(&mut self) -> Result<(), VmError> {
        self.vm.pause().map_err(err("pause"))
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.vm.resume().map_err(err("resume"))
    }
    fn stop(&mut self) -> Result<(), VmError> {
        self.vm.shutdown();
        Ok(())
    }
    fn snapshot(&mut self) -> Result<Vec<u8>, VmError> {
        let mut img = Vec::with_capacity(self.vm.mem_size() as usize + (1 << 20));
        self.vm.snapshot_to(&mut img).map_err(err("snapshot"))?;
        Ok(img)
    }
    fn take_console(&mut self) -> Vec<String> {
        let lines = self.vm.console_lines();
        let new = lines.get(self.seen..).map(|s| s.to_vec()).unwrap_or_default();
        self.seen = lines.len();
        new
    }
    fn mem_bytes(&self) -> u64 {
        self.vm.mem_size()
    }
}
