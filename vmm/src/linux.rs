//! Linux direct boot with linux-loader, for hosts whose KVM can run a stock
//! kernel (ours cannot: the PVM emulator lacks instructions Linux needs, so
//! the MC VMs run the freestanding agent instead). Supports an ELF `vmlinux`
//! and a bzImage, using the 64-bit boot protocol: zero page at [`ZERO_PAGE`],
//! command line at [`CMDLINE_ADDR`], entry at CPL0 with `rsi` = zero page.

use std::io::{Read, Seek};

use kvm_bindings::{kvm_regs, kvm_sregs};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, ReadVolatile};

use crate::error::{LoadError, Result};

/// Zero page (struct boot_params); below the TSS, after the page tables.
pub const ZERO_PAGE: u64 = 0x7000;
pub const CMDLINE_ADDR: u64 = 0x2_0000;
pub const CMDLINE_MAX: usize = 4096;
/// Kernels load at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
const EBDA_START: u64 = 0x9_fc00;
const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxBoot {
    pub format: KernelFormat,
    /// 64-bit entry point.
    pub entry: u64,
    pub kernel_end: u64,
    pub zero_page: u64,
}

/// Load `kernel` (ELF vmlinux or bzImage), the command line and the zero page.
pub fn load_linux<F>(mem: &GuestMemoryMmap, kernel: &mut F, cmdline: &str) -> Result<LinuxBoot>
where
    F: Read + ReadVolatile + Seek,
{
    let himem = Some(GuestAddress(HIMEM_START));
    let (format, res) = match Elf::load(mem, None, kernel, himem) {
        Ok(r) => (KernelFormat::Elf, r),
        Err(loader::Error::Elf(linux_loader::loader::elf::Error::InvalidElfMagicNumber)) => {
            let r = BzImage::load(mem, None, kernel, himem).map_err(LoadError::KernelBzImage)?;
            (KernelFormat::BzImage, r)
        }
        Err(e) => return Err(LoadError::KernelElf(e).into()),
    };
    // The 64-bit entry of a bzImage sits 0x200 into the protected-mode code.
    let entry = match format {
        KernelFormat::Elf => res.kernel_load.0,
        KernelFormat::BzImage => res.kernel_load.0 + 0x200,
    };

    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(LoadError::Cmdline)?;
    cl.insert_str(cmdline).map_err(LoadError::Cmdline)?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl).map_err(LoadError::CmdlineCopy)?;

    let mut params = boot_params::default();
    if let Some(hdr) = res.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    let mem_end: u64 = mem.iter().map(|r| r.start_addr().0 + r.len()).max().unwrap_or(0);
    let e820 = [
        boot_e820_entry { addr: 0, size: EBDA_START, r#type: E820_RAM },
        boot_e820_entry { addr: HIMEM_START, size: mem_end.saturating_sub(HIMEM_START), r#type: E820_RAM },
    ];
    params.e820_table[..2].copy_from_slice(&e820);
    params.e820_entries = 2;
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, GuestAddress(ZERO_PAGE)), mem)
        .map_err(LoadError::ZeroPage)?;
    Ok(LinuxBoot { format, entry, kernel_end: res.kernel_end, zero_page: ZERO_PAGE })
}

/// Special registers for the 64-bit boot protocol: long mode, CPL0, the
/// same identity page tables and GDT as the agent (see `boot`).
pub fn kernel_sregs(sregs: kvm_sregs) -> kvm_sregs {
    let mut s = crate::boot::user_sregs(sregs);
    for seg in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss] {
        seg.selector = 0x10;
        seg.dpl = 0;
    }
    s.cs.selector = 0x08;
    s.cs.dpl = 0;
    s
}

pub fn linux_regs(boot: &LinuxBoot) -> kvm_regs {
    kvm_regs { rip: boot.entry, rsi: boot.zero_page, rflags: 2, rsp: 0x8ff0, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use vm_memory::Bytes;

    use super::*;
    use crate::error::Error;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).expect("guest memory")
    }

    /// A minimal ELF64 vmlinux: one PT_LOAD of `payload` at 16 MiB, entry there.
    fn synthetic_elf(payload: &[u8]) -> Vec<u8> {
        let paddr: u64 = 0x100_0000;
        let mut f = vec![0u8; 64 + 56];
        f[0..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little endian
        f[6] = 1; // version
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = 64;
        f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        f[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        f[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        f[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes()); // p_vaddr
        f[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes()); // p_paddr
        f[ph + 32..ph + 40].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        f[ph + 40..ph + 48].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        f[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A minimal bzImage: boot sector + 4 setup sectors with a 2.15 header,
    /// then `payload` as the protected-mode kernel.
    fn synthetic_bzimage(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 5 * 512];
        f[0x1f1] = 4; // setup_sects
        f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        f[0x202..0x206].copy_from_slice(b"HdrS");
        f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        f[0x211] = 1; // loadflags: LOADED_HIGH
        f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        f.extend_from_slice(payload);
        f
    }

    fn zero_page(m: &GuestMemoryMmap) -> boot_params {
        m.read_obj(GuestAddress(ZERO_PAGE)).expect("zero page")
    }

    #[test]
    fn loads_a_synthetic_elf_vmlinux() {
        let m = mem();
        let payload = [0xf4u8; 300]; // hlt
        let img = synthetic_elf(&payload);
        let b = load_linux(&m, &mut Cursor::new(&img), "console=ttyS0 panic=1").expect("load");
        assert_eq!(b.format, KernelFormat::Elf);
        assert_eq!(b.entry, 0x100_0000);
        let mut got = [0u8; 300];
        m.read_slice(&mut got, GuestAddress(0x100_0000)).expect("read kernel");
        assert_eq!(got, payload);
        let zp = zero_page(&m);
        assert_eq!({ zp.hdr.boot_flag }, 0xaa55);
        assert_eq!({ zp.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ zp.e820_entries }, 2);
        assert_eq!({ zp.e820_table[1].size }, (32 << 20) - HIMEM_START);
        let mut cl = [0u8; 21];
        m.read_slice(&mut cl, GuestAddress(CMDLINE_ADDR)).expect("cmdline");
        assert_eq!(&cl, b"console=ttyS0 panic=1");
        let r = linux_regs(&b);
        assert_eq!((r.rip, r.rsi), (0x100_0000, ZERO_PAGE));
    }

    #[test]
    fn loads_a_synthetic_bzimage() {
        let m = mem();
        let payload: Vec<u8> = (0..2048u32).map(|i| i as u8).collect();
        let img = synthetic_bzimage(&payload);
        let b = load_linux(&m, &mut Cursor::new(&img), "quiet").expect("load");
        assert_eq!(b.format, KernelFormat::BzImage);
        assert_eq!(b.entry, 0x10_0200);
        let mut got = vec![0u8; payload.len()];
        m.read_slice(&mut got, GuestAddress(0x10_0000)).expect("read kernel");
        assert_eq!(got, payload);
        let zp = zero_page(&m);
        assert_eq!(&{ zp.hdr.header }.to_le_bytes(), b"HdrS");
        assert_eq!({ zp.hdr.type_of_loader }, 0xff);
        let s = kernel_sregs(kvm_sregs::default());
        assert_eq!((s.cs.dpl, s.cs.selector, s.cs.l), (0, 0x08, 1));
    }

    #[test]
    fn refuses_garbage_and_bad_cmdline() {
        let m = mem();
        let junk = vec![0x55u8; 4096];
        let e = load_linux(&m, &mut Cursor::new(&junk), "").err();
        assert!(matches!(e, Some(Error::Load(LoadError::KernelBzImage(_)))), "{e:?}");
        let img = synthetic_elf(&[0xf4; 16]);
        let nul = "a\0b";
        let e = load_linux(&m, &mut Cursor::new(&img), nul).err();
        assert!(matches!(e, Some(Error::Load(LoadError::Cmdline(_)))), "{e:?}");
    }

    /// The boot protocol set-up on real KVM: a tiny 64-bit "kernel" at CPL0
    /// prints a line, checks that rsi points at a zero page with the boot
    /// flag, and leaves through the exit port (code 1 if a check failed).
    #[test]
    fn a_synthetic_kernel_boots_at_cpl0_with_the_zero_page_in_rsi() {
        if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
            panic!("/dev/kvm is not usable ({e}): this test needs KVM and root");
        }
        #[rustfmt::skip]
        let code: [u8; 46] = [
            0x66, 0xba, 0xf8, 0x03,                   // mov dx, 0x3f8
            0xb0, b'L', 0xee,                         // mov al, 'L'; out dx, al
            0xb0, b'\n', 0xee,                        // mov al, '\n'; out dx, al
            0x48, 0x81, 0xfe, 0x00, 0x70, 0x00, 0x00, // cmp rsi, ZERO_PAGE
            0x75, 0x13,                               // jne fail
            0x66, 0x81, 0xbe, 0xfe, 0x01, 0x00, 0x00, 0x55, 0xaa, // cmp word [rsi+0x1fe], 0xaa55
            0x75, 0x08,                               // jne fail
            0x66, 0xba, 0x11, 0x05, 0xb0, 0x00, 0xee, // exit port <- 0
            0xf4,                                     // hlt
            0x66, 0xba, 0x11, 0x05, 0xb0, 0x01, 0xee, // fail: exit port <- 1
            0xf4,
        ];
        let path = std::env::temp_dir().join(format!("vmm-synthetic-vmlinux-{}", std::process::id()));
        std::fs::write(&path, synthetic_elf(&code)).expect("write image");
        let vm = crate::Vm::create(&crate::VmConfig::linux(&path, 32, "console=ttyS0"), crate::Sinks::default());
        std::fs::remove_file(&path).expect("remove image");
        let vm = vm.expect("create");
        vm.start(false).expect("start");
        let reason = vm.wait_stopped(std::time::Duration::from_secs(10)).expect("stops");
        assert_eq!(reason, crate::StopReason::GuestExit(0), "console: {:?}", vm.console_lines());
        assert_eq!(vm.console_lines(), vec!["L".to_string()]);
    }
}
