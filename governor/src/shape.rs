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
//! raw attributes inside a hand-encoded `TCA_OPTIONS`, appended to the
//! `tcmsg` + `TCA_KIND` that netlink-packet-route builds. (Its
//! `TcOption::Other(DefaultNla)` would need netlink-packet-utils as a direct
//! dependency only to name `DefaultNla`; appending the bytes needs nothing.)

use std::fmt;
use std::io;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::tc::{TcAttribute, TcHandle, TcMessage};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// `TCA_OPTIONS` in a tcmsg (rtnetlink.h, enum TCA_*).
const TCA_OPTIONS: u16 = 2;
// Attribute numbers inside TCA_OPTIONS for kind "htb" (pkt_sched.h, enum
// TCA_HTB_*). RTAB/CTAB are never sent: with linklayer = ethernet the kernel
// computes transmit times itself and ignores rate tables.
const TCA_HTB_PARMS: u16 = 1;
const TCA_HTB_INIT: u16 = 2;
const TCA_HTB_RATE64: u16 = 6;
const TCA_HTB_DIRECT_QLEN: u16 = 5;
const TCA_HTB_CEIL64: u16 = 7;
/// Packets HTB's direct (unshaped) queue holds. Without the attribute the
/// kernel uses the device's tx_queue_len: 1000 on veth but 32 on an IFB,
/// where unclassified bursts would then be dropped instead of passed.
pub const DIRECT_QLEN: u32 = 1000;
/// How long a request may wait for its ACK before it is reported as an I/O
/// error (rtnl_lock can be held for a while, but never this long in health).
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `TC_HTB_PROTOVER`: htb_init rejects any other `tc_htb_glob.version`.
const HTB_PROTOVER: u32 = 3;
/// The kernel's default; only used when a class gives no quantum (we always do).
const HTB_RATE2QUANTUM: u32 = 10;
/// `TC_LINKLAYER_ETHERNET`: tells the kernel not to expect a rate table.
const TC_LINKLAYER_ETHERNET: u8 = 1;
/// HTB warns about (and the kernel clamps) quanta outside 1000..=200000.
const QUANTUM_MIN: u32 = 1514;
const QUANTUM_MAX: u32 = 200_000;

/// `sizeof(struct tc_htb_glob)`.
pub const TC_HTB_GLOB_LEN: usize = 20;
/// `sizeof(struct tc_ratespec)`.
pub const TC_RATESPEC_LEN: usize = 12;
/// `sizeof(struct tc_htb_opt)`.
pub const TC_HTB_OPT_LEN: usize = 2 * TC_RATESPEC_LEN + 5 * 4;

// Netlink protocol numbers we parse replies with (uapi netlink.h / rtnetlink.h).
const NLMSG_HDR_LEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
/// `NLM_F_CAPPED` on an error message: only the request's header is echoed.
const NLM_F_CAPPED: u16 = 0x100;
/// `NLM_F_ACK_TLVS` on an error message: extended-ack attributes follow.
const NLM_F_ACK_TLVS: u16 = 0x200;
/// `NLMSGERR_ATTR_MSG`: the kernel's human-readable reason (extack).
const NLMSGERR_ATTR_MSG: u16 = 1;
const IFNAMSIZ: usize = 16;

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
    Psched(String),
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

    fn from_errno(op: Op, target: String, errno: i32, extack: Option<String>) -> ShapeError {
        match errno {
            libc::EEXIST => ShapeError::Exists { op, target, extack },
            libc::ENOENT => ShapeError::NotFound { op, target, extack },
            libc::ENODEV => ShapeError::NoDevice { op, target, extack },
            libc::EPERM | libc::EACCES => ShapeError::PermissionDenied { op, target, extack },
            _ => ShapeError::Kernel { op, target, errno, extack, source: io::Error::from_raw_os_error(errno) },
        }
    }
}

/// The kernel's packet-scheduler clock as published in `/proc/net/psched`,
/// which is what iproute2's tc_core.c reads to turn times into HTB "ticks".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PschedClock {
    /// Nanoseconds per microsecond as the kernel reports it (`t2us`).
    pub t2us: u32,
    /// Nanoseconds per tick (`us2t`, `PSCHED_TICKS2NS(1)`).
    pub us2t: u32,
    /// Clock resolution (`clock_res`).
    pub clock_res: u32,
}

impl PschedClock {
    /// Parse the first three hex words of `/proc/net/psched`.
    pub fn parse(text: &str) -> Result<PschedClock, ShapeError> {
        let mut words = text.split_whitespace().map(|w| u32::from_str_radix(w, 16));
        let mut next = |name: &str| -> Result<u32, ShapeError> {
            match words.next() {
                Some(Ok(v)) if v != 0 => Ok(v),
                Some(Ok(_)) => Err(ShapeError::Psched(format!("{name} is zero in {text:?}"))),
                Some(Err(e)) => Err(ShapeError::Psched(format!("{name} in {text:?}: {e}"))),
                None => Err(ShapeError::Psched(format!("{name} missing in {text:?}"))),
            }
        };
        let mut t2us = next("t2us")?;
        let us2t = next("us2t")?;
        let clock_res = next("clock_res")?;
        // Same compatibility hack as tc_core_init(): a kernel with a
        // nanosecond clock advertises t2us = 1000 meaning 1.
        if clock_res == 1_000_000_000 {
            t2us = us2t;
        }
        Ok(PschedClock { t2us, us2t, clock_res })
    }

    pub fn read() -> Result<PschedClock, ShapeError> {
        let text = std::fs::read_to_string("/proc/net/psched").map_err(|e| ShapeError::Psched(e.to_string()))?;
        PschedClock::parse(&text)
    }

    /// Ticks needed to send `size` bytes at `rate` bytes/s: iproute2's
    /// `tc_calc_xmittime` (1e6 * size / rate µs, times tick_in_usec =
    /// t2us / us2t * clock_res / 1e6), in exact integer arithmetic, truncated
    /// like tc's conversion to unsigned and saturated at u32::MAX. HTB turns
    /// this back into ns (ticks << 6) as the depth of the class's token
    /// bucket, so this is what makes `burst` bytes pass at line speed.
    pub fn xmittime(&self, rate_bytes: u64, size: u32) -> u32 {
        if rate_bytes == 0 {
            return u32::MAX;
        }
        let num = u128::from(size) * u128::from(self.t2us) * u128::from(self.clock_res);
        let den = u128::from(rate_bytes) * u128::from(self.us2t);
        u32::try_from(num / den).unwrap_or(u32::MAX)
    }
}

/// `struct tc_htb_glob` for TCA_HTB_INIT. `defcls` is the minor number of the
/// class unclassified packets go to; 0 means HTB's direct queue (unshaped).
pub fn htb_glob_bytes(defcls: u32) -> [u8; TC_HTB_GLOB_LEN] {
    let mut b = [0u8; TC_HTB_GLOB_LEN];
    b[0..4].copy_from_slice(&HTB_PROTOVER.to_ne_bytes()); // version
    b[4..8].copy_from_slice(&HTB_RATE2QUANTUM.to_ne_bytes()); // rate2quantum
    b[8..12].copy_from_slice(&defcls.to_ne_bytes()); // defcls
                                                     // debug = 0, direct_pkts = 0 (output only)
    b
}

/// `struct tc_ratespec` with linklayer ethernet; `rate` saturates at u32::MAX
/// (the 64-bit value then travels in TCA_HTB_RATE64/CEIL64, and the kernel
/// rejects a zero 32-bit rate, so it must not wrap).
fn ratespec_bytes(rate_bytes: u64) -> [u8; TC_RATESPEC_LEN] {
    let mut b = [0u8; TC_RATESPEC_LEN];
    b[0] = 0; // cell_log: only meaningful with a rate table
    b[1] = TC_LINKLAYER_ETHERNET;
    // overhead (u16), cell_align (i16), mpu (u16) = 0
    let rate32 = u32::try_from(rate_bytes).unwrap_or(u32::MAX);
    b[8..12].copy_from_slice(&rate32.to_ne_bytes());
    b
}

/// The parameters of one HTB class, in the kernel's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HtbClassParams {
    /// Guaranteed and ceiling rate, bytes/s.
    pub rate_bytes: u64,
    pub ceil_bytes: u64,
    /// Token bucket depths in psched ticks.
    pub buffer_ticks: u32,
    pub cbuffer_ticks: u32,
    pub quantum: u32,
}

impl HtbClassParams {
    /// rate = ceil = `rate_bps` (bits/s), burst = cburst = `burst_bytes`.
    pub fn new(clock: &PschedClock, rate_bps: u64, burst_bytes: u32) -> HtbClassParams {
        let rate_bytes = rate_bps / 8;
        let ticks = clock.xmittime(rate_bytes, burst_bytes);
        HtbClassParams {
            rate_bytes,
            ceil_bytes: rate_bytes,
            buffer_ticks: ticks,
            cbuffer_ticks: ticks,
            quantum: quantum_for(rate_bytes),
        }
    }

    /// `struct tc_htb_opt` for TCA_HTB_PARMS (level and prio 0: a leaf of the
    /// root at the highest priority).
    pub fn opt_bytes(&self) -> [u8; TC_HTB_OPT_LEN] {
        let mut b = [0u8; TC_HTB_OPT_LEN];
        b[0..12].copy_from_slice(&ratespec_bytes(self.rate_bytes));
        b[12..24].copy_from_slice(&ratespec_bytes(self.ceil_bytes));
        b[24..28].copy_from_slice(&self.buffer_ticks.to_ne_bytes());
        b[28..32].copy_from_slice(&self.cbuffer_ticks.to_ne_bytes());
        b[32..36].copy_from_slice(&self.quantum.to_ne_bytes());
        // level (u32) = 0, prio (u32) = 0
        b
    }

    /// The encoded TCA_OPTIONS attribute for the class.
    pub fn options(&self) -> Vec<u8> {
        let mut inner = nla(TCA_HTB_PARMS, &self.opt_bytes());
        // Like tc: the 64-bit rates only when the 32-bit fields overflow.
        if self.rate_bytes > u64::from(u32::MAX) {
            inner.extend(nla(TCA_HTB_RATE64, &self.rate_bytes.to_ne_bytes()));
        }
        if self.ceil_bytes > u64::from(u32::MAX) {
            inner.extend(nla(TCA_HTB_CEIL64, &self.ceil_bytes.to_ne_bytes()));
        }
        nla(TCA_OPTIONS, &inner)
    }
}

/// DRR quantum for a class: a tenth of a second's worth of bytes like the
/// kernel's default r2q = 10, but kept inside the range where HTB neither
/// warns nor starves (at least one full-size frame, at most 200000).
pub fn quantum_for(rate_bytes: u64) -> u32 {
    let q = (rate_bytes / u64::from(HTB_RATE2QUANTUM)).clamp(u64::from(QUANTUM_MIN), u64::from(QUANTUM_MAX));
    u32::try_from(q).unwrap_or(QUANTUM_MAX)
}

/// One netlink attribute: `struct nlattr { u16 len; u16 type; }`, the value,
/// and padding to 4 bytes (NLA_ALIGN). No NLA_F_NESTED on TCA_OPTIONS: the
/// kernel parses it with the deprecated (flag-less) parser, and tc omits it.
pub fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut b = Vec::with_capacity(align4(len));
    // Attributes we build are a few dozen bytes; u16 cannot overflow.
    b.extend_from_slice(&(len as u16).to_ne_bytes());
    b.extend_from_slice(&kind.to_ne_bytes());
    b.extend_from_slice(value);
    b.resize(align4(len), 0);
    b
}

/// A message netlink-packet-route built, followed by attributes it has no
/// types for (HTB's TCA_OPTIONS), already encoded.
struct Request {
    msg: RouteNetlinkMessage,
    extra: Vec<u8>,
}

impl NetlinkSerializable for Request {
    fn message_type(&self) -> u16 {
        NetlinkSerializable::message_type(&self.msg)
    }

    fn buffer_len(&self) -> usize {
        align4(NetlinkSerializable::buffer_len(&self.msg)) + self.extra.len()
    }

    fn serialize(&self, buffer: &mut [u8]) {
        let n = NetlinkSerializable::buffer_len(&self.msg);
        let start = align4(n);
        self.msg.serialize(&mut buffer[..n]);
        buffer[n..start].fill(0);
        buffer[start..start + self.extra.len()].copy_from_slice(&self.extra);
    }
}

fn tc_handle(major: u16, minor: u16) -> TcHandle {
    TcHandle { major, minor }
}

/// Name an interface for an error message: the index always, the name when it
/// still resolves (it may not, e.g. after the device went away).
fn iface_label(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; IFNAMSIZ];
    // SAFETY: buf is IFNAMSIZ bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("ifindex {ifindex}");
    }
    // SAFETY: on success if_indextoname wrote a NUL-terminated name into buf.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    format!("ifindex {ifindex} ({})", name.to_string_lossy())
}

fn ifindex_i32(op: Op, ifindex: u32) -> Result<i32, ShapeError> {
    i32::try_from(ifindex).map_err(|_| ShapeError::InvalidArgument {
        op,
        target: format!("ifindex {ifindex}"),
        reason: "ifindex out of range".into(),
    })
}

/// One netlink message from a reply datagram: its type and payload.
struct Reply {
    msg_type: u16,
    payload: Vec<u8>,
}

/// A synchronous rtnetlink client for the shaping setup. Not thread-safe by
/// design (`&mut self`): requests are strictly one at a time, so a reply can
/// be matched to its request by sequence number alone.
pub struct Shaper {
    socket: Socket,
    seq: u32,
    clock: PschedClock,
    buf: Vec<u8>,
}

impl Shaper {
    /// Open a NETLINK_ROUTE socket with extended ACKs (so errors carry the
    /// kernel's explanation) and capped ACKs (so an ACK does not echo our whole
    /// request back), and read the psched clock once.
    pub fn new() -> Result<Shaper, ShapeError> {
        let clock = PschedClock::read()?;
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(ShapeError::Socket)?;
        socket.bind_auto().map_err(ShapeError::Socket)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(ShapeError::Socket)?;
        // Both are best-effort: old kernels lack them and work without.
        let _ = socket.set_ext_ack(true);
        let _ = socket.set_cap_ack(true);
        set_rcv_timeout(&socket, REPLY_TIMEOUT).map_err(ShapeError::Socket)?;
        Ok(Shaper { socket, seq: 0, clock, buf: Vec::with_capacity(64 * 1024) })
    }

    /// The clock used to convert bursts to ticks.
    pub fn clock(&self) -> PschedClock {
        self.clock
    }

    /// Root HTB qdisc with handle `major`:0 on ifindex; unclassified traffic
    /// goes to the direct queue (defcls 0) i.e. unshaped. Idempotent: if the
    /// root is already HTB `major`: it is left alone together with its
    /// classes (HTB has no change operation, so a blind replace would fail);
    /// any other root qdisc is replaced.
    pub fn add_htb(&mut self, ifindex: u32, major: u16) -> Result<(), ShapeError> {
        self.add_htb_with_default(ifindex, major, 0)
    }

    /// [`Shaper::add_htb`] with a default class `major:defcls` for unclassified
    /// traffic (0 = unshaped direct queue).
    pub fn add_htb_with_default(&mut self, ifindex: u32, major: u16, defcls: u16) -> Result<(), ShapeError> {
        let op = Op::AddHtb;
        let index = ifindex_i32(op, ifindex)?;
        if major == 0 || major == 0xffff {
            return Err(ShapeError::InvalidArgument {
                op,
                target: iface_label(ifindex),
                reason: format!("qdisc major {major:#x} is reserved"),
            });
        }
        let mut msg = TcMessage::with_index(index);
        msg.header.parent = TcHandle::ROOT;
        msg.header.handle = tc_handle(major, 0);
        msg.attributes.push(TcAttribute::Kind("htb".into()));
        // Step 1: "change" without CREATE and without options. If the root is
        // already HTB major: this is a no-op success; otherwise the kernel
        // answers ENOENT (it would have to create), and we create.
        let probe = Request { msg: RouteNetlinkMessage::NewQueueDiscipline(msg.clone()), extra: Vec::new() };
        match self.request(op, ifindex, None, probe, NLM_F_REPLACE) {
            Ok(_) => return Ok(()),
            Err(ShapeError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        let mut inner = nla(TCA_HTB_INIT, &htb_glob_bytes(u32::from(defcls)));
        inner.extend(nla(TCA_HTB_DIRECT_QLEN, &DIRECT_QLEN.to_ne_bytes()));
        let options = nla(TCA_OPTIONS, &inner);
        self.request(
            op,
            ifindex,
            None,
            Request { msg: RouteNetlinkMessage::NewQueueDiscipline(msg), extra: options },
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    /// Create or change class major:minor under the root with rate = ceil =
    /// rate_bps (bits/s), burst/cburst = burst_bytes.
    pub fn set_class(
        &mut self,
        ifindex: u32,
        major: u16,
        minor: u16,
        rate_bps: u64,
        burst_bytes: u32,
    ) -> Result<(), ShapeError> {
        let op = Op::SetClass;
        let index = ifindex_i32(op, ifindex)?;
        let invalid = |reason: String| ShapeError::InvalidArgument {
            op,
            target: format!("class {major:x}:{minor:x} on {}", iface_label(ifindex)),
            reason,
        };
        if major == 0 || minor == 0 {
            return Err(invalid("class major and minor must be non-zero".into()));
        }
        // The kernel rejects a zero byte rate; 8 bit/s is the least we can say.
        if rate_bps < 8 {
            return Err(invalid(format!("rate {rate_bps} bit/s is below 1 byte/s")));
        }
        if burst_bytes == 0 {
            return Err(invalid("burst must be at least one byte".into()));
        }
        let params = HtbClassParams::new(&self.clock, rate_bps, burst_bytes);
        let mut msg = TcMessage::with_index(index);
        // Parent major:0 is the qdisc itself: a class directly under the root.
        msg.header.parent = tc_handle(major, 0);
        msg.header.handle = tc_handle(major, minor);
        msg.attributes.push(TcAttribute::Kind("htb".into()));
        self.request(
            op,
            ifindex,
            Some((major, minor)),
            Request { msg: RouteNetlinkMessage::NewTrafficClass(msg), extra: params.options() },
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    /// Give class major:minor a byte-limited FIFO (bfifo) as its queue. HTB's
    /// default leaf is a pfifo of txqueuelen packets, which at low rates
    /// holds hundreds of milliseconds (and GSO packets count as one); a
    /// byte limit bounds the queueing delay a shaped VM sees.
    pub fn set_leaf_fifo(&mut self, ifindex: u32, major: u16, minor: u16, limit_bytes: u32) -> Result<(), ShapeError> {
        let op = Op::SetLeaf;
        let mut msg = TcMessage::with_index(ifindex_i32(op, ifindex)?);
        msg.header.parent = tc_handle(major, minor);
        // Handle 0: the kernel picks one for the new leaf.
        msg.header.handle = tc_handle(0, 0);
        msg.attributes.push(TcAttribute::Kind("bfifo".into()));
        // struct tc_fifo_qopt { __u32 limit; } is the whole TCA_OPTIONS.
        let options = nla(TCA_OPTIONS, &limit_bytes.to_ne_bytes());
        self.request(
            op,
            ifindex,
            Some((major, minor)),
            Request { msg: RouteNetlinkMessage::NewQueueDiscipline(msg), extra: options },
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    /// Delete class major:minor (NotFound if it does not exist; EBUSY while a
    /// filter still points at it).
    pub fn delete_class(&mut self, ifindex: u32, major: u16, minor: u16) -> Result<(), ShapeError> {
        let op = Op::DeleteClass;
        let mut msg = TcMessage::with_index(ifindex_i32(op, ifindex)?);
        msg.header.parent = tc_handle(major, 0);
        msg.header.handle = tc_handle(major, minor);
        self.request(op, ifindex, Some((major, minor)), plain(RouteNetlinkMessage::DelTrafficClass(msg)), 0).map(drop)
    }

    /// Remove the root qdisc (NotFound is Ok: the device then already has its
    /// default qdisc, which the kernel refuses to delete with ENOENT).
    pub fn delete_root(&mut self, ifindex: u32) -> Result<(), ShapeError> {
        let op = Op::DeleteRoot;
        let mut msg = TcMessage::with_index(ifindex_i32(op, ifindex)?);
        msg.header.parent = TcHandle::ROOT;
        match self.request(op, ifindex, None, plain(RouteNetlinkMessage::DelQueueDiscipline(msg)), 0) {
            Ok(_) | Err(ShapeError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Create an IFB device (up), return its ifindex; EEXIST is an error naming
    /// the device.
    pub fn add_ifb(&mut self, name: &str) -> Result<u32, ShapeError> {
        let op = Op::AddIfb;
        let target = format!("device {name:?}");
        if name.is_empty()
            || name.len() >= IFNAMSIZ
            || name == "."
            || name == ".."
            || name.bytes().any(|c| c == b'/' || c == b':' || c == 0 || c.is_ascii_whitespace())
        {
            return Err(ShapeError::InvalidArgument {
                op,
                target,
                reason: "not a valid interface name (1-15 bytes, no '/', ':' or whitespace)".into(),
            });
        }
        let mut msg = LinkMessage::default();
        // Bring it up in the same request, like `ip link add ... up`.
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        msg.attributes.push(LinkAttribute::IfName(name.into()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Ifb)]));
        self.request_named(op, &target, plain(RouteNetlinkMessage::NewLink(msg)), NLM_F_CREATE | NLM_F_EXCL)?;
        self.link_index(name)
    }

    /// Look up an interface's index by name over rtnetlink.
    pub fn link_index(&mut self, name: &str) -> Result<u32, ShapeError> {
        let op = Op::LookupLink;
        let target = format!("device {name:?}");
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.into()));
        let replies = self.request_named(op, &target, plain(RouteNetlinkMessage::GetLink(msg)), 0)?;
        for r in replies {
            // struct ifinfomsg { u8 family; u8 pad; u16 type; i32 index; ... }
            if r.msg_type == RTM_NEWLINK {
                let idx = r.payload.get(4..8).ok_or_else(|| ShapeError::Protocol {
                    op,
                    target: target.clone(),
                    reason: format!("RTM_NEWLINK payload of {} bytes", r.payload.len()),
                })?;
                let mut b = [0u8; 4];
                b.copy_from_slice(idx);
                return Ok(i32::from_ne_bytes(b) as u32);
            }
        }
        Err(ShapeError::Protocol { op, target, reason: "no RTM_NEWLINK in the reply".into() })
    }

    pub fn delete_link(&mut self, ifindex: u32) -> Result<(), ShapeError> {
        let op = Op::DeleteLink;
        let target = iface_label(ifindex);
        let mut msg = LinkMessage::default();
        msg.header.index = ifindex;
        self.request_named(op, &target, plain(RouteNetlinkMessage::DelLink(msg)), 0).map(drop)
    }

    fn request(
        &mut self,
        op: Op,
        ifindex: u32,
        class: Option<(u16, u16)>,
        msg: Request,
        flags: u16,
    ) -> Result<Vec<Reply>, ShapeError> {
        let target = match class {
            Some((major, minor)) => {
                format!("class {major:x}:{minor:x} on {}", iface_label(ifindex))
            }
            None => iface_label(ifindex),
        };
        self.request_named(op, &target, msg, flags)
    }

    /// Send one request with NLM_F_ACK and collect the replies up to the ACK;
    /// a non-zero error in the ACK becomes a typed error.
    fn request_named(&mut self, op: Op, target: &str, msg: Request, flags: u16) -> Result<Vec<Reply>, ShapeError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let mut out = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut out);
        let io_err = |source: io::Error| ShapeError::Io { op, target: target.to_string(), source };
        self.socket.send(&out, 0).map_err(io_err)?;

        let proto = |reason: String| ShapeError::Protocol { op, target: target.to_string(), reason };
        let mut replies = Vec::new();
        loop {
            self.buf.clear();
            let n = loop {
                match self.socket.recv(&mut self.buf, 0) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Err(io_err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no reply from the kernel within {REPLY_TIMEOUT:?}"),
                        )))
                    }
                    Err(e) => return Err(io_err(e)),
                }
            };
            if n > self.buf.len() {
                return Err(proto(format!("datagram of {n} bytes truncated to {}", self.buf.len())));
            }
            let mut data: &[u8] = &self.buf;
            while data.len() >= NLMSG_HDR_LEN {
                let len = read_u32(data, 0) as usize;
                let msg_type = read_u16(data, 4);
                let msg_flags = read_u16(data, 6);
                let msg_seq = read_u32(data, 8);
                if len < NLMSG_HDR_LEN || len > data.len() {
                    return Err(proto(format!("message length {len} with {} bytes left", data.len())));
                }
                let payload = &data[NLMSG_HDR_LEN..len];
                data = &data[align4(len).min(data.len())..];
                if msg_seq != seq {
                    continue; // a late reply to an earlier request
                }
                match msg_type {
                    NLMSG_ERROR => {
                        if payload.len() < 4 {
                            return Err(proto("short NLMSG_ERROR".into()));
                        }
                        let code = read_u32(payload, 0) as i32;
                        if code == 0 {
                            return Ok(replies);
                        }
                        let extack = parse_extack(msg_flags, payload);
                        return Err(ShapeError::from_errno(op, target.to_string(), -code, extack));
                    }
                    NLMSG_DONE => return Ok(replies),
                    _ => replies.push(Reply { msg_type, payload: payload.to_vec() }),
                }
            }
        }
    }
}

fn set_rcv_timeout(socket: &Socket, t: std::time::Duration) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(t.subsec_micros() as i32),
    };
    // SAFETY: a valid socket fd and a timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn plain(msg: RouteNetlinkMessage) -> Request {
    Request { msg, extra: Vec::new() }
}

fn read_u16(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The NLMSGERR_ATTR_MSG string of an error message, if present. Layout:
/// `i32 error; struct nlmsghdr request (+ its payload unless NLM_F_CAPPED);`
/// then attributes when NLM_F_ACK_TLVS is set.
fn parse_extack(flags: u16, payload: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 || payload.len() < 4 + NLMSG_HDR_LEN {
        return None;
    }
    let echoed = if flags & NLM_F_CAPPED != 0 { NLMSG_HDR_LEN } else { align4(read_u32(payload, 4) as usize) };
    let mut tlvs = payload.get(4 + echoed..)?;
    while tlvs.len() >= 4 {
        let len = usize::from(read_u16(tlvs, 0));
        let kind = read_u16(tlvs, 2) & 0x3fff;
        if len < 4 || len > tlvs.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let s = &tlvs[4..len];
            let s = s.split(|&c| c == 0).next().unwrap_or(s);
            return Some(String::from_utf8_lossy(s).into_owned());
        }
        tlvs = &tlvs[align4(len).min(tlvs.len())..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// /proc/net/psched on this machine (and any kernel since 2.6.31's
    /// hrtimer-based psched): 1 tick = 64 ns.
    const PSCHED: &str = "000003e8 00000040 000f4240 3b9aca00\n";

    #[test]
    fn psched_parses_and_ticks_match_tc() {
        let c = PschedClock::parse(PSCHED).unwrap();
        assert_eq!(c, PschedClock { t2us: 1000, us2t: 64, clock_res: 1_000_000 });
        // 30000 bytes at 20 Mbit/s (2.5 MB/s) take 12 ms = 12e6 ns = 187500
        // ticks of 64 ns; `tc class add ... rate 20mbit burst 30000` sends
        // the same buffer.
        assert_eq!(c.xmittime(2_500_000, 30_000), 187_500);
        // 1600 bytes at 1 Mbit/s: 12.8 ms -> 200000 ticks.
        assert_eq!(c.xmittime(125_000, 1600), 200_000);
        // Truncation like tc: 1 byte at 3 B/s = 333333.33 us = 5208333.33 ticks.
        assert_eq!(c.xmittime(3, 1), 5_208_333);
        // Saturation instead of wrapping.
        assert_eq!(c.xmittime(1, u32::MAX), u32::MAX);
        assert_eq!(c.xmittime(0, 1), u32::MAX);
    }

    #[test]
    fn psched_nanosecond_compat_hack() {
        // clock_res 1e9 means t2us is really us2t (tc_core_init).
        let c = PschedClock::parse("000003e8 00000040 3b9aca00").unwrap();
        assert_eq!(c.t2us, 64);
        assert!(PschedClock::parse("000003e8 00000040").is_err());
        assert!(PschedClock::parse("zz 1 1").is_err());
        assert!(PschedClock::parse("1 0 1").is_err());
    }

    #[test]
    fn htb_glob_layout() {
        let b = htb_glob_bytes(0x10);
        assert_eq!(b.len(), 20);
        let words: Vec<u32> = b.chunks(4).map(|c| u32::from_ne_bytes(c.try_into().unwrap())).collect();
        // version, rate2quantum, defcls, debug, direct_pkts
        assert_eq!(words, vec![3, 10, 0x10, 0, 0]);
    }

    #[test]
    fn htb_opt_layout() {
        let c = PschedClock::parse(PSCHED).unwrap();
        let p = HtbClassParams::new(&c, 20_000_000, 30_000);
        let b = p.opt_bytes();
        assert_eq!(b.len(), 44);
        for spec in [&b[0..12], &b[12..24]] {
            assert_eq!(spec[0], 0, "cell_log");
            assert_eq!(spec[1], 1, "linklayer ethernet");
            assert_eq!(&spec[2..8], &[0; 6], "overhead, cell_align, mpu");
            assert_eq!(read_u32(spec, 8), 2_500_000, "rate bytes/s");
        }
        assert_eq!(read_u32(&b, 24), 187_500, "buffer");
        assert_eq!(read_u32(&b, 28), 187_500, "cbuffer");
        assert_eq!(read_u32(&b, 32), 200_000, "quantum capped");
        assert_eq!(read_u32(&b, 36), 0, "level");
        assert_eq!(read_u32(&b, 40), 0, "prio");
        // Only PARMS below 2^32 bytes/s: TCA_OPTIONS { TCA_HTB_PARMS }.
        let o = p.options();
        assert_eq!(o.len(), 4 + 4 + 44);
        assert_eq!((read_u16(&o, 0), read_u16(&o, 2)), (52, TCA_OPTIONS));
        assert_eq!((read_u16(&o, 4), read_u16(&o, 6)), (48, TCA_HTB_PARMS));
        assert_eq!(&o[8..], &b[..]);
    }

    #[test]
    fn htb_64bit_rates() {
        let c = PschedClock::parse(PSCHED).unwrap();
        // 40 Gbit/s = 5e9 bytes/s > u32::MAX.
        let p = HtbClassParams::new(&c, 40_000_000_000, 1_000_000);
        let b = p.opt_bytes();
        assert_eq!(read_u32(&b, 8), u32::MAX, "rate saturates, never wraps to 0");
        assert_eq!(read_u32(&b, 20), u32::MAX);
        let o = p.options();
        assert_eq!(o.len(), 4 + 48 + 12 + 12);
        assert_eq!((read_u16(&o, 52), read_u16(&o, 54)), (12, TCA_HTB_RATE64));
        assert_eq!(&o[56..64], &5_000_000_000u64.to_ne_bytes());
        assert_eq!((read_u16(&o, 64), read_u16(&o, 66)), (12, TCA_HTB_CEIL64));
        assert_eq!(&o[68..76], &5_000_000_000u64.to_ne_bytes());
        // 1 MB at 5 GB/s = 200 us = 3125 ticks.
        assert_eq!(p.buffer_ticks, 3125);
    }

    #[test]
    fn nla_padding() {
        assert_eq!(nla(7, &[1, 2, 3]), vec![7, 0, 7, 0, 1, 2, 3, 0]);
        assert_eq!(nla(1, &[]), vec![4, 0, 1, 0]);
    }

    #[test]
    fn request_appends_raw_attributes_aligned() {
        let mut msg = TcMessage::with_index(3);
        msg.attributes.push(TcAttribute::Kind("htb".into()));
        let r = Request { msg: RouteNetlinkMessage::NewTrafficClass(msg), extra: nla(TCA_OPTIONS, &[9; 4]) };
        // tcmsg (20) + TCA_KIND "htb\0" (8) + TCA_OPTIONS (8)
        assert_eq!(r.buffer_len(), 36);
        let mut b = vec![0xffu8; 36];
        r.serialize(&mut b);
        assert_eq!(read_u32(&b, 4), 3, "tcm_ifindex");
        assert_eq!(&b[20..28], &[8, 0, 1, 0, b'h', b't', b'b', 0]);
        assert_eq!(&b[28..36], &[8, 0, 2, 0, 9, 9, 9, 9]);
    }

    #[test]
    fn shaper_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<Shaper>();
        send::<ShapeError>();
    }

    #[test]
    fn quantum_range() {
        assert_eq!(quantum_for(1000), 1514);
        assert_eq!(quantum_for(125_000), 12_500);
        assert_eq!(quantum_for(u64::MAX), 200_000);
    }

    #[test]
    fn extack_is_parsed() {
        // error -22, capped echoed header, one NLMSGERR_ATTR_MSG.
        let mut p = Vec::new();
        p.extend_from_slice(&(-22i32).to_ne_bytes());
        p.extend_from_slice(&[0u8; 16]);
        let msg = b"Change operation not supported\0";
        p.extend_from_slice(&((4 + msg.len()) as u16).to_ne_bytes());
        p.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        p.extend_from_slice(msg);
        assert_eq!(parse_extack(NLM_F_CAPPED | NLM_F_ACK_TLVS, &p).as_deref(), Some("Change operation not supported"));
        assert_eq!(parse_extack(NLM_F_CAPPED, &p), None);
        assert_eq!(parse_extack(NLM_F_CAPPED | NLM_F_ACK_TLVS, &p[..10]), None);
    }
}
