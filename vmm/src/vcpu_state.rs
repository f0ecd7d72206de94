//! Saving and restoring one vCPU's architectural state.

use kvm_bindings::{
    kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;

use crate::error::{Error, Result, SnapshotError};

/// MSRs a 64-bit guest may have changed. Ones the host KVM cannot read are
/// dropped at save time (KVM_GET_MSRS stops at the first failure).
const MSRS: &[u32] = &[
    0x10,        // TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SYSCALL_MASK
    0xc000_0100, // FS_BASE
    0xc000_0101, // GS_BASE
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    0x1a0,       // MISC_ENABLE
];

#[derive(serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: Option<kvm_xsave>,
    pub xcrs: Option<kvm_xcrs>,
    pub msrs: Vec<(u32, u64)>,
    pub lapic: Option<kvm_lapic_state>,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
}

pub fn save(vcpu: &VcpuFd) -> Result<VcpuState> {
    let mut msrs = Vec::new();
    for &index in MSRS {
        let mut one = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }])
            .map_err(|source| SnapshotError::MsrList { count: 1, source })?;
        if let Ok(1) = vcpu.get_msrs(&mut one) {
            msrs.push((index, one.as_slice()[0].data));
        }
    }
    Ok(VcpuState {
        regs: vcpu.get_regs().map_err(Error::ioctl("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(Error::ioctl("KVM_GET_SREGS"))?,
        // Optional pieces: a host without XSAVE support still snapshots.
        xsave: vcpu.get_xsave().ok(),
        xcrs: vcpu.get_xcrs().ok(),
        msrs,
        lapic: vcpu.get_lapic().ok(),
        mp_state: vcpu.get_mp_state().map_err(Error::ioctl("KVM_GET_MP_STATE"))?,
        events: vcpu.get_vcpu_events().map_err(Error::ioctl("KVM_GET_VCPU_EVENTS"))?,
    })
}

pub fn restore(vcpu: &VcpuFd, s: &VcpuState) -> Result<()> {
    vcpu.set_mp_state(s.mp_state).map_err(Error::ioctl("KVM_SET_MP_STATE"))?;
    vcpu.set_sregs(&s.sregs).map_err(Error::ioctl("KVM_SET_SREGS"))?;
    vcpu.set_regs(&s.regs).map_err(Error::ioctl("KVM_SET_REGS"))?;
    if let Some(x) = &s.xsave {
        // SAFETY: the buffer is a full kvm_xsave taken by KVM_GET_XSAVE.
        unsafe { vcpu.set_xsave(x) }.map_err(Error::ioctl("KVM_SET_XSAVE"))?;
    }
    if let Some(x) = &s.xcrs {
        vcpu.set_xcrs(x).map_err(Error::ioctl("KVM_SET_XCRS"))?;
    }
    if let Some(l) = &s.lapic {
        vcpu.set_lapic(l).map_err(Error::ioctl("KVM_SET_LAPIC"))?;
    }
    if !s.msrs.is_empty() {
        let entries: Vec<kvm_msr_entry> =
            s.msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        let msrs =
            Msrs::from_entries(&entries).map_err(|source| SnapshotError::MsrList { count: entries.len(), source })?;
        let n = vcpu.set_msrs(&msrs).map_err(Error::ioctl("KVM_SET_MSRS"))?;
        if let Some(refused) = entries.get(n) {
            return Err(SnapshotError::MsrsRefused { accepted: n, total: entries.len(), first: refused.index }.into());
        }
    }
    vcpu.set_vcpu_events(&s.events).map_err(Error::ioctl("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}
