//! Long-mode set-up for the management guest: identity page tables (user
//! accessible), a GDT with user segments and a TSS, and vCPU registers that
//! start the guest directly at CPL3 with IOPL=3. On the PVM-backed KVM of our
//! hosts CPL0 code is emulated and slow, so the guest never runs at CPL0.

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{Error, LoadError, MemoryError, Result};
use crate::proto;

const PDPT_ADDR: u64 = proto::PML4_ADDR + 0x1000;
const PD_ADDR: u64 = PDPT_ADDR + 0x1000;
/// Present | writable | user.
const PTE_PWU: u64 = 0x7;
/// Large (2 MiB) page.
const PTE_PS: u64 = 0x80;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IOPL3: u64 = 3 << 12;

/// GDT: null, kernel code, kernel data, user data, user code, TSS (2 slots).
const GDT: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff, // 0x08 kernel code, 64-bit
    0x00cf_9300_0000_ffff, // 0x10 kernel data
    0x00cf_f300_0000_ffff, // 0x18 user data (DPL3)
    0x00af_fb00_0000_ffff, // 0x20 user code, 64-bit (DPL3)
];
const USER_DS: u16 = 0x18 | 3;
const USER_CS: u16 = 0x20 | 3;
const TSS_SEL: u16 = 0x28;
/// 104-byte TSS, then a full 8 KiB I/O bitmap and its 0xff terminator.
const TSS_IOMAP: u64 = 0x68;
const TSS_LIMIT: u32 = (TSS_IOMAP + 8192) as u32;

/// Load a static ELF (the agent) at its physical addresses; returns the entry.
pub fn load_elf(mem: &GuestMemoryMmap, path: &Path) -> Result<u64> {
    let mut f = File::open(path).map_err(Error::io(path.display().to_string()))?;
    let res =
        Elf::load(mem, None, &mut f, None).map_err(|source| LoadError::Elf { path: path.to_path_buf(), source })?;
    Ok(res.kernel_load.0)
}

/// Write page tables, GDT and TSS into guest memory.
pub fn write_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let w = |addr: u64, val: u64| {
        mem.write_obj(val, GuestAddress(addr)).map_err(|source| MemoryError::Access {
            what: "writing boot tables",
            addr,
            source,
        })
    };
    w(proto::PML4_ADDR, PDPT_ADDR | PTE_PWU)?;
    // Four PDs identity-map 0..4 GiB, which covers RAM and the MMIO window.
    for i in 0..4u64 {
        let pd = PD_ADDR + i * 0x1000;
        w(PDPT_ADDR + i * 8, pd | PTE_PWU)?;
        for j in 0..512u64 {
            w(pd + j * 8, ((i << 30) + (j << 21)) | PTE_PWU | PTE_PS)?;
        }
    }
    for (i, d) in GDT.iter().enumerate() {
        w(proto::GDT_ADDR + i as u64 * 8, *d)?;
    }
    let tss = proto::TSS_ADDR;
    let tss_lo = (TSS_LIMIT as u64 & 0xffff)
        | ((tss & 0xff_ffff) << 16)
        | (0x89u64 << 40) // present, type 9 (available 64-bit TSS)
        | ((tss >> 24) & 0xff) << 56;
    w(proto::GDT_ADDR + 5 * 8, tss_lo)?;
    w(proto::GDT_ADDR + 6 * 8, tss >> 32)?;
    // I/O permission bitmap right after the TSS: all ports allowed (zero
    // bits; guest RAM starts zeroed), then the required 0xff terminator.
    // IOPL=3 alone is not honoured for user mode by every KVM backend.
    let tss_io = |addr, source| MemoryError::Access { what: "writing the TSS", addr, source };
    mem.write_obj(TSS_IOMAP as u16, GuestAddress(tss + 0x66)).map_err(|e| tss_io(tss + 0x66, e))?;
    mem.write_obj(0xffu8, GuestAddress(tss + TSS_IOMAP + 8192)).map_err(|e| tss_io(tss + TSS_IOMAP + 8192, e))?;
    Ok(())
}

fn seg(selector: u16, type_: u8, dpl: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Special registers for 64-bit mode at CPL3.
pub fn user_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.cs = seg(USER_CS, 0xb, 3, true);
    let ds = seg(USER_DS, 0x3, 3, false);
    sregs.ds = ds;
    sregs.es = ds;
    sregs.fs = ds;
    sregs.gs = ds;
    sregs.ss = ds;
    sregs.tr = kvm_segment {
        base: proto::TSS_ADDR,
        limit: TSS_LIMIT,
        selector: TSS_SEL,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        ..Default::default()
    };
    sregs.ldt = kvm_segment { type_: 2, unusable: 1, ..Default::default() };
    sregs.gdt.base = proto::GDT_ADDR;
    sregs.gdt.limit = (7 * 8 - 1) as u16;
    // An empty IDT: any exception escalates to a triple fault, which the
    // VMM reports as a typed stop reason.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = proto::PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers: entry point, stack, IOPL=3 so the agent may use the
/// serial and idle ports from CPL3.
pub fn user_regs(entry: u64) -> kvm_regs {
    kvm_regs { rip: entry, rsp: proto::STACK_TOP, rflags: RFLAGS_RESERVED | RFLAGS_IOPL3, ..Default::default() }
}
