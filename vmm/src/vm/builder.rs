//! Building a VM: guest RAM, the KVM VM with its memory slots, in-kernel
//! irqchip and one vCPU, the guest image, and the registers it starts with.
//! A restore ([`super::persist`]) shares [`create_kvm`] and [`Vm::assemble`]
//! but takes RAM and registers from the snapshot.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{kvm_fpu, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::shared::{Devices, Shared};
use super::Vm;
use crate::devices::serial::Serial;
use crate::devices::virtio::Console;
use crate::error::{Error, MemoryError, Result};

/// TSS area KVM needs on Intel hosts, placed below the 4 GiB boundary.
const KVM_TSS_ADDR: usize = 0xfffb_d000;

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

/// Anonymous guest RAM of `bytes` bytes at guest address 0.
pub(crate) fn anonymous_ram(bytes: u64) -> Result<GuestMemoryMmap> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes as usize)])
        .map_err(|source| MemoryError::Allocate { bytes, source }.into())
}

/// KVM VM with our memory registered and one vCPU with the host's CPUID.
pub(super) fn create_kvm(mem: &GuestMemoryMmap) -> Result<(VmFd, VcpuFd)> {
    let kvm = Kvm::new().map_err(Error::Kvm)?;
    let vm = kvm.create_vm().map_err(Error::ioctl("KVM_CREATE_VM"))?;
    for (slot, region) in mem.iter().enumerate() {
        let addr = region.start_addr();
        let host = mem.get_host_address(addr).map_err(|source| MemoryError::Access {
            what: "host address of a RAM region",
            addr: addr.0,
            source,
        })?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            // Dirty logging feeds diff snapshots.
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: addr.0,
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
        let mem = anonymous_ram(cfg.mem_mib << 20)?;
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

    /// The handle around a built (or restored) VM; its vCPU thread is not
    /// started yet.
    pub(super) fn assemble(
        mem: GuestMemoryMmap,
        vm: VmFd,
        vcpu: VcpuFd,
        dev: Devices,
        log: Option<Box<dyn Write + Send>>,
        ready_at: Option<Instant>,
    ) -> Vm {
        let mem_size = mem.iter().map(|r| r.len()).sum();
        Vm {
            sh: Arc::new(Shared::new(mem, vm, vcpu, dev, log, ready_at)),
            thread: Mutex::new(None),
            next_id: AtomicU64::new(1),
            mem_size,
            has_base: Mutex::new(false),
            life: Mutex::new(()),
            bulk: Mutex::new(()),
        }
    }
}
