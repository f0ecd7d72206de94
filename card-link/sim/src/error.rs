//! card-sim's typed errors: `SimError` for starting and driving the card
//! (the launcher, the control client, the card's own threads and sockets),
//! `VmError` for the card-side VMM behind `vms::VmBackend`, and the control
//! socket's refusals: `RequestError` (a line that is not a valid request)
//! and `ApplyError` (a valid request the card refused). The text of the last
//! two is what the client reads back (`{"ok":false,"error":"field X: reason"}`).

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SimError {
    /// Command line of the card-sim binary.
    #[error("{0}")]
    Usage(String),
    #[error("cannot locate the running executable: {0}")]
    CurrentExe(#[source] io::Error),
    #[error(
        "card-sim binary not found near {near} (build it: cargo build --release -p card-sim --bin card-sim, or set CARD_SIM_BIN)"
    )]
    BinaryNotFound { near: PathBuf },
    #[error(
        "vmm binary not found next to {near} (build it: cargo build --release -p vmm --bin vmm, or give --vmm / VMM_BIN)"
    )]
    VmmNotFound { near: PathBuf },
    /// Blocking the exit signals the card's signal thread waits for.
    #[error("block SIGTERM/SIGINT: {0}")]
    Signals(#[source] io::Error),
    /// A directory of the card: the launcher's for its sockets (made under
    /// `path`), or card-sim's run directory for its VMs' files (`path`).
    /// A forward of user traffic could not listen on `addr`.
    #[error("forward: listen on {addr}: {source}")]
    Forward {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("create the card's directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Opening or joining the card's cgroup (the card-sim binary).
    #[error("card cgroup {name}: {source}")]
    Cgroup {
        name: String,
        #[source]
        source: cgroupfs::CgroupError,
    },
    /// Creating the card's cgroup (the launcher, `SimProcess`).
    #[error("create the card's cgroup: {0}")]
    CgroupCreate(#[source] fixtures::FixtureError),
    #[error("spawn {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("card-sim did not create its sockets within {0:?}")]
    NotReady(Duration),
    #[error("card-sim exited early: {0}")]
    ExitedEarly(ExitStatus),
    /// The card's BAR memory (a memfd) could not be made.
    #[error("the card's shared memory {name}: {source}")]
    SharedMemory {
        name: &'static str,
        #[source]
        source: card_link::CardError,
    },
    /// One of the card's own threads could not be started.
    #[error("start the card's {name} thread: {source}")]
    Thread {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("control socket {path}: {what}: {source}")]
    Control {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("encode a control request: {0}")]
    ControlEncode(#[source] serde_json::Error),
    #[error("control reply {line:?} is not a reply: {source}")]
    ControlReply {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    /// The card answered `ok: false`; the reason names the field.
    #[error("control request refused: {0}")]
    Refused(String),
    #[error("vfio-user server: {0}")]
    Server(#[source] vfio_user::Error),
}

/// Why the card-side VMM could not do what a mailbox op or ECS request asked.
#[derive(Debug, Error)]
pub enum VmError {
    /// The VM's `vmm` process (spawning it, or a request over its socket).
    #[error("{what}: {source}")]
    Vmm {
        what: &'static str,
        #[source]
        source: vmm::Error,
    },
    /// The VM's child cgroup of the card's cgroup (make, measure, remove).
    #[error("{what} VM cgroup {name}: {source}")]
    Cgroup {
        what: &'static str,
        name: String,
        #[source]
        source: cgroupfs::CgroupError,
    },
    /// A file of the card-side VMM in the card's run directory (console,
    /// snapshot or restore image).
    #[error("{what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Reading a VM process's accounting in /proc.
    #[error("measure {path}: {source}")]
    Measure {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: cannot read {what}")]
    Unreadable { what: &'static str, path: PathBuf },
    /// The VM's process was stopped already.
    #[error("the VM's process is gone")]
    Gone,
    /// A modelled VM has no dirty log for pre-copy snapshots.
    #[error("pre-copy snapshots need a KVM guest (start card-sim with --guest)")]
    NoPrecopy,
    /// A modelled VM runs no agent to ask.
    #[error("a modelled VM runs no agent (start card-sim with --guest)")]
    NoAgent,
    #[error("not a model VM image")]
    NotModelImage,
    #[error("model VM image holds {memory} bytes of memory, its header says {stated}")]
    ModelImageSize { memory: usize, stated: u64 },
}

impl VmError {
    /// The VM itself stopped (its VMM stopped it, e.g. for a hostile agent
    /// answer), as opposed to a request that failed with the VM running.
    pub fn vm_stopped(&self) -> bool {
        matches!(self, VmError::Vmm { source, .. } if source.kind() == vmm::host::api::ErrorKind::Stopped)
    }
}

/// A control line that is not a valid request; nothing of it was applied.
#[derive(Debug, Error)]
pub enum RequestError {
    /// Not JSON at all (bad syntax, or cut short).
    #[error("not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// A field the op needs is absent.
    #[error("field {field}: missing")]
    Missing {
        field: String,
        #[source]
        source: serde_json::Error,
    },
    /// JSON, but not a request: an unknown op or field, or a wrongly typed
    /// value. serde's own text, which names the field (see `request::field`).
    #[error("{0}")]
    Shape(#[source] serde_json::Error),
    /// Read, but out of range or at odds with another field.
    #[error("field {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// A valid control request that the card refused while applying it.
#[derive(Debug, Error)]
pub enum ApplyError {
    /// The request names a VM the card does not run; nothing was applied.
    #[error("field {field}: no VM {vm} on the card")]
    NoSuchVm { field: &'static str, vm: u32 },
    /// A forward could not be set up.
    #[error("forward: {0}")]
    Forward(#[source] SimError),
    /// No forward listens on that port.
    #[error("field port: no forward listens on {0}")]
    NoForward(u16),
    /// The VM's agent could not be asked (a modelled VM, or its VMM failed).
    #[error("agent of VM {vm}: {source}")]
    Agent {
        vm: u32,
        #[source]
        source: VmError,
    },
    /// The ECS control service refused a create or destroy, as the mailbox
    /// would (`op` is `create_vm` or `destroy_vm`).
    #[error("{op} refused: {source}")]
    Ecs {
        op: &'static str,
        #[source]
        source: crate::commands::Refusal,
    },
}
