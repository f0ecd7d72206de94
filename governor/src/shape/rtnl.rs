//! One rtnetlink request at a time: build it (netlink-packet-route, plus raw
//! attributes it has no types for), send it with NLM_F_ACK, collect the
//! replies up to the ACK, and turn a kernel errno and its extended ack into
//! a [`ShapeError`] naming the operation and the target. Replies are parsed
//! with netlink-packet-core's buffers.

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use netlink_packet_core::{
    ErrorBuffer, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable, NETLINK_HEADER_LEN,
    NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use super::htb::align4;
use super::{Op, ShapeError};

/// How long a request may wait for its ACK before it is reported as an I/O
/// error (rtnl_lock can be held for a while, but never this long in health).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// `NLMSGERR_ATTR_MSG` (uapi netlink.h): the kernel's human-readable reason;
/// netlink-packet-core has no name for the extended-ack attributes.
const NLMSGERR_ATTR_MSG: u16 = 1;

/// A message netlink-packet-route built, followed by attributes it has no
/// types for (HTB's TCA_OPTIONS), already encoded.
pub(crate) struct Request {
    pub msg: RouteNetlinkMessage,
    pub extra: Vec<u8>,
}

impl Request {
    pub fn plain(msg: RouteNetlinkMessage) -> Request {
        Request { msg, extra: Vec::new() }
    }
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

/// One netlink message from a reply datagram (header and payload), to be
/// parsed by whoever asked for it.
pub(crate) struct Reply {
    pub bytes: Vec<u8>,
}

/// A synchronous rtnetlink client. Not thread-safe by design (`&mut self`):
/// requests are strictly one at a time, so a reply is matched to its
/// request by sequence number alone.
pub(crate) struct Rtnl {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    /// A NETLINK_ROUTE socket with extended ACKs (errors carry the kernel's
    /// explanation) and capped ACKs (an ACK does not echo the whole request).
    pub fn open() -> Result<Rtnl, ShapeError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(ShapeError::Socket)?;
        socket.bind_auto().map_err(ShapeError::Socket)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(ShapeError::Socket)?;
        // Both are optional: old kernels lack them and work without.
        if let Err(e) = socket.set_ext_ack(true) {
            tracing::debug!("rtnetlink: no extended acks: {e}");
        }
        if let Err(e) = socket.set_cap_ack(true) {
            tracing::debug!("rtnetlink: no capped acks: {e}");
        }
        socket2::SockRef::from(&socket.as_fd()).set_read_timeout(Some(REPLY_TIMEOUT)).map_err(ShapeError::Socket)?;
        Ok(Rtnl { socket, seq: 0, buf: Vec::with_capacity(64 * 1024) })
    }

    /// Send one request with NLM_F_ACK and collect the replies up to the
    /// ACK; a non-zero error in the ACK becomes a typed error.
    pub fn request(&mut self, op: Op, target: &str, msg: Request, flags: u16) -> Result<Vec<Reply>, ShapeError> {
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
            while data.len() >= NETLINK_HEADER_LEN {
                let msg = NetlinkBuffer::new_checked(data).map_err(|e| proto(e.to_string()))?;
                let len = msg.length() as usize;
                let (msg_type, msg_flags, msg_seq) = (msg.message_type(), msg.flags(), msg.sequence_number());
                let payload = msg.payload();
                let whole = &data[..len];
                data = &data[align4(len).min(data.len())..];
                if msg_seq != seq {
                    continue; // a late reply to an earlier request
                }
                match msg_type {
                    NLMSG_ERROR => {
                        let err = ErrorBuffer::new_checked(payload).map_err(|e| proto(e.to_string()))?;
                        let Some(code) = err.code() else { return Ok(replies) };
                        let extack = parse_extack(msg_flags, payload);
                        return Err(ShapeError::from_errno(op, target.to_string(), -code.get(), extack));
                    }
                    NLMSG_DONE => return Ok(replies),
                    _ => replies.push(Reply { bytes: whole.to_vec() }),
                }
            }
        }
    }
}

fn read_u16(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

/// The NLMSGERR_ATTR_MSG string of an error message, if present. Layout:
/// `i32 error; struct nlmsghdr request (+ its payload unless NLM_F_CAPPED);`
/// then attributes when NLM_F_ACK_TLVS is set.
fn parse_extack(flags: u16, payload: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 || payload.len() < 4 + NETLINK_HEADER_LEN {
        return None;
    }
    let echoed = if flags & NLM_F_CAPPED != 0 {
        NETLINK_HEADER_LEN
    } else {
        align4(NetlinkBuffer::new_checked(payload.get(4..)?).ok()?.length() as usize)
    };
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
    use crate::shape::htb::{nla, TCA_OPTIONS};
    use netlink_packet_route::tc::{TcAttribute, TcMessage};

    fn read_u32(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
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
