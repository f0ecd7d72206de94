//! Network interfaces: names to ifindex, and the kernel's own statistics
//! (the ground truth the tc counters are checked against).

use std::collections::HashSet;
use std::ffi::CString;
use std::fs;
use std::io;
use std::path::Path;

use netlink_packet_core::{NetlinkBuffer, NetlinkMessage, NetlinkPayload, NETLINK_HEADER_LEN};
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// The ifindex of an interface in this network namespace.
pub fn ifindex(name: &str) -> io::Result<u32> {
    if name.is_empty() || name.len() >= libc::IF_NAMESIZE || name.contains('/') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a valid interface name"));
    }
    let c = CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))?;
    // SAFETY: valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(io::Error::new(io::ErrorKind::NotFound, "no such interface"));
    }
    Ok(idx)
}

/// Counters from /sys/class/net/NAME/statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfStats {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
}

pub fn stats(name: &str) -> io::Result<IfStats> {
    let dir = Path::new("/sys/class/net").join(name).join("statistics");
    let read = |f: &str| -> io::Result<u64> {
        let s = fs::read_to_string(dir.join(f))?;
        s.trim().parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("{f}: {s:?}")))
    };
    Ok(IfStats {
        rx_bytes: read("rx_bytes")?,
        rx_packets: read("rx_packets")?,
        tx_bytes: read("tx_bytes")?,
        tx_packets: read("tx_packets")?,
    })
}

/// Which interfaces may have changed (been created, re-created, renamed
/// or deleted) since the last look.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkChanges {
    /// Any of them: look every interface up again.
    All,
    /// Only these names.
    Names(HashSet<String>),
}

impl LinkChanges {
    /// Whether interface `name` needs looking up again.
    pub fn touches(&self, name: &str) -> bool {
        match self {
            LinkChanges::All => true,
            LinkChanges::Names(n) => n.contains(name),
        }
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, LinkChanges::Names(n) if n.is_empty())
    }
}

/// Link notifications (rtnetlink's link multicast group) on a non-blocking
/// socket, so the tick looks up only the interfaces the kernel said
/// changed: resolving 1,000 names every tick (if_nametoindex is a socket,
/// an ioctl and a close each) was most of a tick at 1,000 VMs. A lost
/// notification (the socket's buffer overflowed: ENOBUFS), a truncated or
/// unparsable one, and the first look all mean `All`, never a miss.
pub struct LinkWatch {
    socket: Socket,
    buf: Vec<u8>,
    all: bool,
}

impl LinkWatch {
    pub fn open() -> io::Result<LinkWatch> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind(&SocketAddr::new(0, libc::RTMGRP_LINK as u32))?;
        socket.set_non_blocking(true)?;
        // The first look is a full one: a link may have changed between the
        // caller's own lookups and this socket's bind.
        Ok(LinkWatch { socket, buf: Vec::with_capacity(64 * 1024), all: true })
    }

    /// Drain the notifications that arrived since the last call.
    pub fn changes(&mut self) -> LinkChanges {
        let mut all = std::mem::take(&mut self.all);
        let mut names = HashSet::new();
        loop {
            self.buf.clear();
            // MSG_TRUNC: the datagram's whole length is returned, so a
            // notification longer than the buffer is seen as cut.
            match self.socket.recv(&mut self.buf, libc::MSG_TRUNC) {
                Ok(n) if n > self.buf.len() => all = true,
                Ok(_) => all |= !link_names(&self.buf, &mut names),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => all = true,
                Err(e) => {
                    tracing::warn!("reading link notifications: {e}; looking every interface up");
                    all = true;
                    break;
                }
            }
        }
        if all {
            LinkChanges::All
        } else {
            LinkChanges::Names(names)
        }
    }
}

/// Add the interface names of the link messages in one datagram to `names`;
/// false if a message could not be parsed (the caller then looks at all).
fn link_names(mut data: &[u8], names: &mut HashSet<String>) -> bool {
    while data.len() >= NETLINK_HEADER_LEN {
        let Ok(buf) = NetlinkBuffer::new_checked(data) else { return false };
        let len = buf.length() as usize;
        let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[..len]) else { return false };
        if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l)) =
            msg.payload
        {
            for a in l.attributes {
                if let LinkAttribute::IfName(n) = a {
                    names.insert(n);
                }
            }
        }
        data = &data[len.next_multiple_of(4).min(data.len())..];
    }
    true
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_exists() {
        assert_eq!(super::ifindex("lo").expect("lo"), 1);
        assert!(super::ifindex("no-such-if0").is_err());
        assert!(super::ifindex("a/b").is_err());
        assert!(super::stats("lo").is_ok());
    }

    /// The watch names a veth when it is created and when it is deleted,
    /// and its first look is a full one.
    #[test]
    fn link_watch_names_created_and_deleted_links() {
        use super::{LinkChanges, LinkWatch};
        let run = |args: &[&str]| {
            let st = std::process::Command::new("ip").args(args).status().expect("ip");
            assert!(st.success(), "ip {args:?}: {st} (needs root)");
        };
        let mut w = LinkWatch::open().expect("link notification socket");
        assert_eq!(w.changes(), LinkChanges::All);
        let name = format!("lw{}", std::process::id());
        let peer = format!("lwp{}", std::process::id());
        run(&["link", "add", &name, "type", "veth", "peer", "name", &peer]);
        let seen = w.changes();
        run(&["link", "del", &name]);
        assert!(seen.touches(&name) && !seen.touches("lo"), "after create: {seen:?}");
        let seen = w.changes();
        assert!(seen.touches(&name), "after delete: {seen:?}");
    }
}
