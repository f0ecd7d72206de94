//! Typed errors at the library boundary.

use std::io;

/// Why a VM stopped. A stopped VM keeps its reason; the host process and the
/// other VMs carry on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum StopReason {
    #[error("shut down on request")]
    Requested,
    #[error("guest asked to exit with code {0}")]
    GuestExit(u8),
    #[error("guest accessed unmapped MMIO address {addr:#x} ({kind})")]
    UnknownMmio { addr: u64, kind: String },
    #[error("guest triple fault (shutdown exit) at rip {rip:#x}")]
    TripleFault { rip: u64 },
    #[error("guest halted with interrupts off")]
    Halted,
    #[error("virtio device error: {0}")]
    Device(String),
    #[error("KVM entry failed: hardware reason {0:#x}")]
    FailEntry(u64),
    #[error("KVM internal error, suberror {0}")]
    InternalError(u32),
    #[error("unexpected vCPU exit: {0}")]
    UnexpectedExit(String),
    #[error("KVM_RUN failed: {0}")]
    Run(String),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("/dev/kvm is not usable: {0}")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("KVM ioctl {what} failed: {source}")]
    Ioctl {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("loading the guest image: {0}")]
    Load(String),
    #[error("I/O on {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error("the VM is {0}, which does not allow this")]
    State(String),
    #[error("the VM stopped: {0}")]
    Stopped(StopReason),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(std::time::Duration, &'static str),
    #[error("cgroup: {0}")]
    Cgroup(#[from] cgroupfs::CgroupError),
    #[error("invalid configuration: field {field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("control protocol: {0}")]
    Protocol(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Ioctl { what, source }
    }
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}
