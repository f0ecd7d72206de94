//! [`NetlinkShaper`]: the qdisc, class and IFB operations of the governor's
//! shaping, over rtnetlink (nothing shells out to `tc` or `ip`).

use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::tc::{TcAttribute, TcHandle, TcMessage};
use netlink_packet_route::RouteNetlinkMessage;

use super::htb::{htb_glob_bytes, nla, HtbClassParams, DIRECT_QLEN, TCA_HTB_DIRECT_QLEN, TCA_HTB_INIT, TCA_OPTIONS};
use super::psched::PschedClock;
use super::rtnl::{Reply, Request, Rtnl};
use super::{Op, ShapeError, Shaper};

const IFNAMSIZ: usize = 16;

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

/// Shaping over one synchronous rtnetlink socket; `&mut self` keeps the
/// requests one at a time.
pub struct NetlinkShaper {
    rtnl: Rtnl,
    clock: PschedClock,
}

impl NetlinkShaper {
    /// Open the rtnetlink socket and read the psched clock once.
    pub fn new() -> Result<NetlinkShaper, ShapeError> {
        let clock = PschedClock::read()?;
        Ok(NetlinkShaper { rtnl: Rtnl::open()?, clock })
    }

    /// The clock used to convert bursts to ticks.
    pub fn clock(&self) -> PschedClock {
        self.clock
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

    /// One request whose target is an interface or a class on it.
    fn request(
        &mut self,
        op: Op,
        ifindex: u32,
        class: Option<(u16, u16)>,
        msg: Request,
        flags: u16,
    ) -> Result<Vec<Reply>, ShapeError> {
        let target = match class {
            Some((major, minor)) => format!("class {major:x}:{minor:x} on {}", iface_label(ifindex)),
            None => iface_label(ifindex),
        };
        self.rtnl.request(op, &target, msg, flags)
    }
}

impl Shaper for NetlinkShaper {
    /// Root HTB qdisc with handle `major`:0 on ifindex; unclassified traffic
    /// goes to the direct queue (defcls 0) i.e. unshaped. Idempotent: if the
    /// root is already HTB `major`: it is left alone together with its
    /// classes (HTB has no change operation, so a blind replace would fail);
    /// any other root qdisc is replaced.
    fn add_htb(&mut self, ifindex: u32, major: u16) -> Result<(), ShapeError> {
        self.add_htb_with_default(ifindex, major, 0)
    }

    /// Create or change class major:minor under the root with rate = ceil =
    /// rate_bps (bits/s), burst/cburst = burst_bytes.
    fn set_class(
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
    fn set_leaf(&mut self, ifindex: u32, major: u16, minor: u16, leaf: super::Leaf) -> Result<(), ShapeError> {
        let op = Op::SetLeaf;
        if leaf.segment_bytes == 0 || leaf.limit_bytes < leaf.segment_bytes {
            return Err(ShapeError::InvalidArgument {
                op,
                target: format!("class {major:x}:{minor:x} on {}", iface_label(ifindex)),
                reason: format!("leaf limit {} B under its segment {} B", leaf.limit_bytes, leaf.segment_bytes),
            });
        }
        let mut msg = TcMessage::with_index(ifindex_i32(op, ifindex)?);
        msg.header.parent = tc_handle(major, minor);
        // Handle 0: the kernel picks one for the new leaf.
        msg.header.handle = tc_handle(0, 0);
        msg.attributes.push(TcAttribute::Kind("tbf".into()));
        let options = leaf.options(&self.clock);
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
    fn delete_class(&mut self, ifindex: u32, major: u16, minor: u16) -> Result<(), ShapeError> {
        let op = Op::DeleteClass;
        let mut msg = TcMessage::with_index(ifindex_i32(op, ifindex)?);
        msg.header.parent = tc_handle(major, 0);
        msg.header.handle = tc_handle(major, minor);
        self.request(op, ifindex, Some((major, minor)), Request::plain(RouteNetlinkMessage::DelTrafficClass(msg)), 0)
            .map(drop)
    }

    /// Remove the root qdisc (NotFound is Ok: the device then already has its
    /// default qdisc, which the kernel refuses to delete with ENOENT).
    fn delete_root(&mut self, ifindex: u32) -> Result<(), ShapeError> {
        let op = Op::DeleteRoot;
        let mut msg = TcMessage::with_index(ifindex_i32(op, ifindex)?);
        msg.header.parent = TcHandle::ROOT;
        match self.request(op, ifindex, None, Request::plain(RouteNetlinkMessage::DelQueueDiscipline(msg)), 0) {
            Ok(_) | Err(ShapeError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Create an IFB device (up), return its ifindex; EEXIST is an error naming
    /// the device.
    fn add_ifb(&mut self, name: &str) -> Result<u32, ShapeError> {
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
        self.rtnl.request(op, &target, Request::plain(RouteNetlinkMessage::NewLink(msg)), NLM_F_CREATE | NLM_F_EXCL)?;
        self.link_index(name)
    }

    /// Look up an interface's index by name over rtnetlink.
    fn link_index(&mut self, name: &str) -> Result<u32, ShapeError> {
        let op = Op::LookupLink;
        let target = format!("device {name:?}");
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.into()));
        let replies = self.rtnl.request(op, &target, Request::plain(RouteNetlinkMessage::GetLink(msg)), 0)?;
        for r in replies {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&r.bytes)
                .map_err(|e| ShapeError::Protocol { op, target: target.clone(), reason: format!("reply: {e}") })?;
            if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) = msg.payload {
                return Ok(link.header.index);
            }
        }
        Err(ShapeError::Protocol { op, target, reason: "no RTM_NEWLINK in the reply".into() })
    }

    fn delete_link(&mut self, ifindex: u32) -> Result<(), ShapeError> {
        let op = Op::DeleteLink;
        let target = iface_label(ifindex);
        let mut msg = LinkMessage::default();
        msg.header.index = ifindex;
        self.rtnl.request(op, &target, Request::plain(RouteNetlinkMessage::DelLink(msg)), 0).map(drop)
    }

    fn gso_max_size(&mut self, ifindex: u32) -> Result<u32, ShapeError> {
        let op = Op::LookupLink;
        let target = iface_label(ifindex);
        let mut msg = LinkMessage::default();
        msg.header.index = ifindex;
        let replies = self.rtnl.request(op, &target, Request::plain(RouteNetlinkMessage::GetLink(msg)), 0)?;
        for r in replies {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&r.bytes)
                .map_err(|e| ShapeError::Protocol { op, target: target.clone(), reason: format!("reply: {e}") })?;
            if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) = msg.payload {
                let gso = link.attributes.iter().find_map(|a| match a {
                    LinkAttribute::GsoMaxSize(v) => Some(*v),
                    _ => None,
                });
                return gso.ok_or_else(|| ShapeError::Protocol { op, target, reason: "no IFLA_GSO_MAX_SIZE".into() });
            }
        }
        Err(ShapeError::Protocol { op, target, reason: "no RTM_NEWLINK in the reply".into() })
    }

    /// `ip link set dev X gso_max_size N`: RTM_NEWLINK on the index.
    fn set_gso_max_size(&mut self, ifindex: u32, bytes: u32) -> Result<(), ShapeError> {
        let op = Op::SetGso;
        let target = iface_label(ifindex);
        let mut msg = LinkMessage::default();
        msg.header.index = ifindex;
        msg.attributes.push(LinkAttribute::GsoMaxSize(bytes));
        self.rtnl.request(op, &target, Request::plain(RouteNetlinkMessage::SetLink(msg)), 0).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shaper_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<NetlinkShaper>();
        send::<ShapeError>();
    }
}
