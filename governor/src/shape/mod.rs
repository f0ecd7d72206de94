//! Traffic shaping through rtnetlink: an HTB root qdisc whose classes the
//! tc-BPF program selects by writing `skb->priority = major:minor`, plus the
//! IFB devices that let ingress traffic be shaped the same way.
//!
//! Everything goes over one synchronous `NETLINK_ROUTE` socket; nothing shells
//! out to `tc` or `ip` (issue 3). Every request asks for an ACK, and a kernel
//! errno becomes a [`ShapeError`] that names the operation and the interface.
//!
//! netlink-packet-route has no HTB types, so the HTB option structs
//! (`struct tc_htb_glob`, `struct tc_htb_opt`, from the kernel's
//! `include/uapi/linux/pkt_sched.h`) are laid out by hand below and sent as
//! raw attributes inside a hand-encoded `TCA_OPTIONS` (`htb`), appended to the
//! `tcmsg` + `TCA_KIND` that netlink-packet-route builds. (Its
//! `TcOption::Other(DefaultNla)` would need netlink-packet-utils as a direct
//! dependency only to name `DefaultNla`; appending the bytes needs nothing.)
//!
//! - `htb`, `psched`: the kernel's HTB option structs and clock arithmetic
//!   (pure, unit-tested);
//! - `rtnl`: one request, its ACK, and the kernel's errno and extended ack
//!   turned into a [`ShapeError`];
//! - `netlink`: [`NetlinkShaper`], the qdisc, class and IFB operations;
//! - `fake`: [`FakeShaper`], an in-memory stand-in for the governor's tests.

use std::fmt;
use std::io;

#[cfg(any(test, feature = "fakes"))]
mod fake;
mod htb;
mod lazy;
mod netlink;
mod psched;
mod rtnl;
mod tbf;

#[cfg(any(test, feature = "fakes"))]
pub use fake::{FakeNet, FakeShaper};
pub use htb::{
    htb_glob_bytes, nla, quantum_for, HtbClassParams, DIRECT_QLEN, TC_HTB_GLOB_LEN, TC_HTB_OPT_LEN, TC_RATESPEC_LEN,
};
pub use lazy::LazyShaper;
pub use netlink::NetlinkShaper;
pub use psched::PschedClock;
pub use tbf::Leaf;

/// The operations the governor shapes with: an HTB root qdisc per
/// interface, one class per VM with a byte-limited FIFO, and IFB devices
/// for traffic from VMs. [`NetlinkShaper`] does them over rtnetlink;
/// [`FakeShaper`] in memory.
pub trait Shaper {
    /// Root HTB qdisc `major:` on `ifindex` (unclassified traffic unshaped);
    /// leaves an existing HTB `major:` root and its classes alone.
    fn add_htb(&mut self, ifindex: u32, major: u16) -> Result<(), ShapeError>;
    /// Create or change class `major:minor` with rate = ceil = `rate_bps`
    /// (bits/s) and burst = cburst = `burst_bytes`.
    fn set_class(
        &mut self,
        ifindex: u32,
        major: u16,
        minor: u16,
        rate_bps: u64,
        burst_bytes: u32,
    ) -> Result<(), ShapeError>;
    /// Give class `major:minor` its queue: a byte-limited FIFO that splits
    /// GSO packets into frames as they enter (see [`Leaf`]).
    fn set_leaf(&mut self, ifindex: u32, major: u16, minor: u16, leaf: Leaf) -> Result<(), ShapeError>;
    fn delete_class(&mut self, ifindex: u32, major: u16, minor: u16) -> Result<(), ShapeError>;
    /// Remove the root qdisc (absent is fine).
    fn delete_root(&mut self, ifindex: u32) -> Result<(), ShapeError>;
    /// Create an IFB device (up); returns its ifindex. An existing one is
    /// [`ShapeError::Exists`].
    fn add_ifb(&mut self, name: &str) -> Result<u32, ShapeError>;
    fn link_index(&mut self, name: &str) -> Result<u32, ShapeError>;
    fn delete_link(&mut self, ifindex: u32) -> Result<(), ShapeError>;
    /// The largest GSO packet the stack builds for `ifindex`
    /// (`gso_max_size`).
    fn gso_max_size(&mut self, ifindex: u32) -> Result<u32, ShapeError>;
    fn set_gso_max_size(&mut self, ifindex: u32, bytes: u32) -> Result<(), ShapeError>;
}

/// What was being attempted when the kernel said no; part of every error so a
/// log line says which step of setting up shaping failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    AddHtb,
    SetClass,
    DeleteClass,
    DeleteRoot,
    AddIfb,
    LookupLink,
    DeleteLink,
    SetLeaf,
    SetGso,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::AddHtb => "add HTB root qdisc",
            Op::SetClass => "set HTB class",
            Op::DeleteClass => "delete HTB class",
            Op::DeleteRoot => "delete root qdisc",
            Op::AddIfb => "add IFB device",
            Op::LookupLink => "look up link",
            Op::DeleteLink => "delete link",
            Op::SetLeaf => "set class leaf qdisc",
            Op::SetGso => "set gso_max_size",
        })
    }
}

fn fmt_extack(extack: &Option<String>) -> String {
    match extack {
        Some(m) => format!(" ({m})"),
        None => String::new(),
    }
}

/// Errors from [`Shaper`]. `target` names the interface (`ifindex 7 (veth0)`)
/// or the class (`class 1:10 on ifindex 7 (veth0)`); `extack` is the kernel's
/// own explanation when it gave one.
#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    #[error("opening the rtnetlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("reading /proc/net/psched (needed to convert burst to HTB ticks): {0}")]
    PschedRead(#[source] io::Error),
    #[error("/proc/net/psched: {field} in {text:?}: {reason}")]
    PschedFormat { field: &'static str, text: String, reason: String },
    #[error("{op} on {target}: invalid argument: {reason}")]
    InvalidArgument { op: Op, target: String, reason: String },
    #[error("{op} on {target}: already exists{}", fmt_extack(.extack))]
    Exists { op: Op, target: String, extack: Option<String> },
    #[error("{op} on {target}: not found{}", fmt_extack(.extack))]
    NotFound { op: Op, target: String, extack: Option<String> },
    #[error("{op} on {target}: no such network device{}", fmt_extack(.extack))]
    NoDevice { op: Op, target: String, extack: Option<String> },
    #[error("{op} on {target}: permission denied (CAP_NET_ADMIN needed){}", fmt_extack(.extack))]
    PermissionDenied { op: Op, target: String, extack: Option<String> },
    #[error("{op} on {target}: kernel error {errno}: {source}{}", fmt_extack(.extack))]
    Kernel {
        op: Op,
        target: String,
        errno: i32,
        extack: Option<String>,
        #[source]
        source: io::Error,
    },
    #[error("{op} on {target}: netlink I/O: {source}")]
    Io {
        op: Op,
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("{op} on {target}: malformed netlink reply: {reason}")]
    Protocol { op: Op, target: String, reason: String },
}

impl ShapeError {
    /// The kernel's errno (positive), if the kernel rejected the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            ShapeError::Exists { .. } => Some(libc::EEXIST),
            ShapeError::NotFound { .. } => Some(libc::ENOENT),
            ShapeError::NoDevice { .. } => Some(libc::ENODEV),
            ShapeError::PermissionDenied { .. } => Some(libc::EPERM),
            ShapeError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    pub(crate) fn from_errno(op: Op, target: String, errno: i32, extack: Option<String>) -> ShapeError {
        match errno {
            libc::EEXIST => ShapeError::Exists { op, target, extack },
            libc::ENOENT => ShapeError::NotFound { op, target, extack },
            libc::ENODEV => ShapeError::NoDevice { op, target, extack },
            libc::EPERM | libc::EACCES => ShapeError::PermissionDenied { op, target, extack },
            _ => ShapeError::Kernel { op, target, errno, extack, source: io::Error::from_raw_os_error(errno) },
        }
    }
}
