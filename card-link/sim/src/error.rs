//! card-sim's typed errors: `SimError` for starting and driving the card
//! (the launcher, the control client, the card's own threads and sockets),
//! `VmError` for the card-side VMM behind `vms::VmBackend`.

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
    #[error("create the card's directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Creating, opening or joining the card's cgroup.
    #[error("card cgroup {name}: {source}")]
    Cgroup {
        name: String,
        #[source]
        source: cgroupfs::CgroupError,
    },
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
    #[error("{what}: {source}")]
    Vmm {
        what: &'static str,
        #[source]
        source: vmm::Error,
    },
    #[error("not a model VM image")]
    NotModelImage,
    #[error("model VM image holds {memory} bytes of memory, its header says {stated}")]
    ModelImageSize { memory: usize, stated: u64 },
}
