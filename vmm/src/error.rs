//! Typed errors at the library boundary. Each variant that wraps a foreign
//! failure keeps it as its `source`; format violations in snapshots are
//! small enums that name the field.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use crate::devices::virtio::ConsoleStateError;
use crate::host::api::ErrorKind;
use crate::vm::RunState;

/// Why a VM stopped. A stopped VM keeps its reason; the host process and the
/// other VMs carry on.
///
/// Unlike [`Error`], this is a serializable record, not an error chain: it
/// crosses process boundaries (the control socket's `state` reply, a
/// snapshot of a stopped VM's status on the card link) and outlives the
/// error that caused it, so a foreign cause (a virtio device error, a
/// KVM_RUN errno, an unexpected exit) is kept as its text.
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
    Memory(#[from] MemoryError),
    #[error("loading the guest image: {0}")]
    Load(#[from] LoadError),
    #[error("I/O on {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
    #[error("the VM is {state}, which does not allow {action}")]
    State { state: RunState, action: &'static str },
    #[error("a diff snapshot needs a base: take a full snapshot (or restore one) first")]
    NoBase,
    #[error("the agent is not taking requests ({queued} queued)")]
    Busy { queued: usize },
    #[error("the VM stopped: {0}")]
    Stopped(StopReason),
    /// The agent refused a bulk message the VMM sent (it names the field).
    #[error("the agent refused the message: field {field}")]
    Refused { field: &'static str },
    /// The agent answered with a malformed bulk message; the VM was stopped.
    #[error("the agent's answer is malformed (field {field}); the VM was stopped")]
    Hostile { field: &'static str },
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    #[error("invalid configuration: field {field}: {reason}")]
    Config { field: &'static str, reason: String },
    /// The VMM process answered a control request with an error; `message`
    /// is that process's rendering of its own typed error.
    #[error("the VMM refused the request: {message}")]
    Remote { kind: ErrorKind, message: String },
    #[error("encoding a control request: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("the VMM closed the control socket")]
    Disconnected,
    #[error("bad reply on the control socket: {source}")]
    BadReply {
        #[source]
        source: serde_json::Error,
    },
    #[error("the vmm process did not open its control socket {} (exit status {status:?}): {source}", socket.display())]
    NoSocket {
        socket: PathBuf,
        status: Option<ExitStatus>,
        #[source]
        source: Box<Error>,
    },
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

    /// The class of this error on the control socket (see [`ErrorKind`]).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Kvm(_) | Error::Ioctl { .. } => ErrorKind::Kvm,
            Error::Memory(_) => ErrorKind::Memory,
            Error::Load(_) => ErrorKind::Load,
            Error::Io { .. } => ErrorKind::Io,
            Error::Snapshot(_) => ErrorKind::Snapshot,
            Error::State { .. } | Error::NoBase | Error::Busy { .. } => ErrorKind::State,
            Error::Stopped(_) => ErrorKind::Stopped,
            Error::Timeout(..) => ErrorKind::Timeout,
            Error::Refused { .. } => ErrorKind::Agent,
            Error::Hostile { .. } => ErrorKind::Stopped,
            Error::Config { .. } => ErrorKind::Config,
            Error::Encode(_) => ErrorKind::BadRequest,
            Error::Remote { kind, .. } => *kind,
            Error::Disconnected | Error::BadReply { .. } | Error::NoSocket { .. } => ErrorKind::Connection,
        }
    }
}

/// Setting up or accessing guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("allocating {bytes} bytes of guest RAM: {source}")]
    Allocate {
        bytes: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("mapping {bytes} bytes of {} as guest RAM: {source}", path.display())]
    MapFile {
        path: PathBuf,
        bytes: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("a RAM region of {bytes} bytes at guest address 0 overflows the address space")]
    Overflow { bytes: u64 },
    #[error("building the guest memory map: {0}")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
    #[error("{what} at guest address {addr:#x}: {source}")]
    Access {
        what: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("snapshots support one RAM region, this VM has {0}")]
    Regions(usize),
}

/// Loading the agent ELF or a Linux kernel into guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("agent ELF {}: {source}", path.display())]
    Elf {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("Linux kernel (ELF): {0}")]
    KernelElf(#[source] linux_loader::loader::Error),
    #[error("Linux kernel: not an ELF, and as a bzImage: {0}")]
    KernelBzImage(#[source] linux_loader::loader::Error),
    #[error("kernel command line: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("writing the kernel command line into guest RAM: {0}")]
    CmdlineCopy(#[source] linux_loader::loader::Error),
    #[error("writing the zero page: {0}")]
    ZeroPage(#[source] linux_loader::configurator::Error),
}

/// A snapshot that is not what this VMM writes, or that cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a snapshot (bad magic)")]
    BadMagic,
    #[error("header field version is {found}, this VMM reads {supported}")]
    Version { found: u32, supported: u32 },
    #[error("header field flags is {0:#x}: unknown or contradictory bits")]
    Flags(u32),
    #[error("header field {field} is {value}: {reason}")]
    Header { field: &'static str, value: u64, reason: &'static str },
    #[error("encoding the state: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("decoding the state: {0}")]
    State(#[source] serde_json::Error),
    #[error("state field {field} is {state}, the header says {header}")]
    Mismatch { field: &'static str, state: u64, header: u64 },
    #[error("state field irqchips has {0} entries, expected 3")]
    Irqchips(usize),
    #[error("state field console: {0}")]
    Console(#[from] ConsoleStateError),
    #[error("state field diff_runs is missing from a {0} snapshot")]
    MissingRuns(&'static str),
    #[error(
        "state field diff_runs: bad run ({first}, {count}): runs are ascending, disjoint, non-empty and inside RAM"
    )]
    BadRun { first: u64, count: u64 },
    #[error("a diff snapshot needs its base (restore the chain)")]
    DiffWithoutBase,
    #[error("expected a diff snapshot, found a full one")]
    NotADiff,
    #[error("the diff is for {diff} bytes of RAM, its base has {base}")]
    DiffSize { diff: u64, base: u64 },
    #[error("{} is truncated ({len} bytes, the header needs {needed})", path.display())]
    Truncated { path: PathBuf, len: u64, needed: u64 },
    #[error("an MSR list of {count} entries: {source}")]
    MsrList {
        count: usize,
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    #[error("KVM_SET_MSRS accepted {accepted} of {total} MSRs (first refused: {first:#x})")]
    MsrsRefused { accepted: usize, total: usize, first: u32 },
}
