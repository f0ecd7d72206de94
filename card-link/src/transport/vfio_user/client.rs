//! A vfio-user client: the subset of the protocol the card link uses
//! (version, device and region info, interrupts, region access, DMA
//! mapping), every exchange bounded by a deadline.
//!
//! Written here rather than taken from the `vfio_user` crate (0.1.7), whose
//! client card-sim's server is still checked against in `card-bench`. That
//! client cannot be used safely against a card that may be slow or hostile:
//! - it has no timeouts and owns its socket privately, so a silent card
//!   hangs the caller (the transport used to find the socket among the
//!   process's fds to set timeouts, and ran the handshake on a helper thread
//!   that leaked, with its socket, on every attempt at a silent card);
//! - it reads each reply by the size it expects, without looking at the
//!   reply's error flag or its message id: a refused access (a 16-byte
//!   error header) leaves the stream out of step for every later exchange;
//! - a short vectored write is ignored, so a large region write can lose its
//!   tail and both ends then wait for each other.
//!
//! Here every reply is matched to its request (id, command, reply flag), read
//! whole by the size it states (bounded), and an error reply is an error
//! with the stream still in step. The socket is non-blocking and every
//! read and write waits with poll(2) against the exchange's deadline.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use thiserror::Error;
use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_FLAG_CAPS,
};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The commands of the protocol this client sends (vfio-user spec numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Command {
    Version = 1,
    DmaMap = 2,
    DmaUnmap = 3,
    DeviceGetInfo = 4,
    DeviceGetRegionInfo = 5,
    SetIrqs = 8,
    RegionRead = 9,
    RegionWrite = 10,
}

impl Command {
    pub fn name(self) -> &'static str {
        match self {
            Command::Version => "version",
            Command::DmaMap => "DMA map",
            Command::DmaUnmap => "DMA unmap",
            Command::DeviceGetInfo => "device info",
            Command::DeviceGetRegionInfo => "region info",
            Command::SetIrqs => "set irqs",
            Command::RegionRead => "region read",
            Command::RegionWrite => "region write",
        }
    }
}

/// Every message starts with this header (16 bytes, little-endian).
pub const HEADER_LEN: usize = 16;
/// Header flags: the message type in the low nibble, then no-reply and error.
const TYPE_MASK: u32 = 0xf;
const TYPE_REPLY: u32 = 1;
const FLAG_ERROR: u32 = 1 << 5;
/// The largest data one message carries (the spec's default
/// `max_data_xfer_size`); a reply larger than this plus its fixed part is
/// not believed.
pub const MAX_DATA: usize = 1 << 20;
const MAX_REPLY: usize = HEADER_LEN + 4096 + MAX_DATA;
/// Room offered for a region's capability list in the first region-info
/// request, so one exchange usually suffices.
const CAPS_ROOM: u32 = 1024;
/// A region's capability list larger than this is not believed.
const MAX_CAPS: u32 = 64 * 1024;
/// `sizeof(struct vfio_region_info)`.
const REGION_INFO_LEN: usize = 32;
/// Regions of a PCI function with a meaning to us (BARs 0-5).
const MAX_REGIONS: u32 = 64;

/// What can go wrong on the link. `TimedOut` and `Closed` mean the card did
/// not answer; the others that it answered wrongly. All but `Refused` leave
/// the stream in an unknown state: the caller must drop the connection.
#[derive(Debug, Error)]
pub enum VfioUserError {
    #[error("no answer within {timeout_ms} ms")]
    TimedOut { timeout_ms: u64 },
    #[error("the card closed the link")]
    Closed,
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed reply: {0}")]
    BadReply(String),
    /// The card answered with the error flag (the stream stays in step).
    #[error("the card refused it (errno {errno})")]
    Refused { errno: u32 },
    #[error("not a PCI device (device flags {flags:#x})")]
    NotPci { flags: u32 },
}

impl VfioUserError {
    /// Whether the connection is still usable after this error.
    pub fn in_step(&self) -> bool {
        matches!(self, VfioUserError::Refused { .. })
    }
}

type Result<T> = std::result::Result<T, VfioUserError>;

/// One region as the card describes it.
#[derive(Debug)]
pub struct Region {
    pub flags: u32,
    pub size: u64,
    /// Where the region starts in `file` when mapped.
    pub offset: u64,
    /// Areas that may be mapped (offset, size), from the sparse-mmap capability.
    pub sparse: Vec<(u64, u64)>,
    /// The file to map the region from, when the card offers one.
    pub file: Option<File>,
}

pub struct Client {
    stream: UnixStream,
    next_id: u16,
    timeout: Duration,
    regions: Vec<Option<Region>>,
}

/// A received message: its header fields and its body (the bytes after the header).
struct Reply {
    size: usize,
    flags: u32,
    error: u32,
    body: Vec<u8>,
    file: Option<File>,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// A body whose length must be at least `need` before fields are read.
fn need(body: &[u8], need: usize, what: &str) -> Result<()> {
    if body.len() < need {
        return Err(VfioUserError::BadReply(format!("{what}: {} bytes, need {need}", body.len())));
    }
    Ok(())
}

impl Client {
    /// Connect to the card at `path` and do the handshake (version, device
    /// info, every region's info), all within `timeout`; later exchanges
    /// are each bounded by `timeout` too (see `set_timeout`).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client> {
        let deadline = Instant::now() + timeout;
        let stream = connect_nonblocking(path, deadline, timeout)?;
        let mut c = Client { stream, next_id: 0, timeout, regions: Vec::new() };
        c.negotiate_version(deadline)?;
        let regions = c.device_info(deadline)?;
        for index in 0..regions.min(MAX_REGIONS) {
            let r = c.region_info(index, deadline)?;
            c.regions.push(r);
        }
        Ok(c)
    }

    /// Bound each later exchange by `t`; returns the bound before.
    pub fn set_timeout(&mut self, t: Duration) -> Duration {
        std::mem::replace(&mut self.timeout, t)
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn region(&self, index: u32) -> Option<&Region> {
        self.regions.get(index as usize)?.as_ref()
    }

    pub fn socket_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// End the connection both ways at once (the card sees it closed and
    /// may take the next host); the fd itself goes when the client drops.
    pub fn shutdown(&self) -> std::io::Result<()> {
        self.stream.shutdown(std::net::Shutdown::Both)
    }

    pub fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<()> {
        let count = u32::try_from(data.len())
            .ok()
            .filter(|&c| c as usize <= MAX_DATA)
            .ok_or_else(|| VfioUserError::BadReply(format!("a read of {} bytes is too large", data.len())))?;
        let body = access_body(offset, region, count);
        let r = self.exchange(Command::RegionRead, &body, &[], &[], false)?;
        need(&r.body, 16, "region read reply")?;
        let (got_off, got_region, got_count) = (le_u64(&r.body, 0), le_u32(&r.body, 8), le_u32(&r.body, 12));
        if got_off != offset || got_region != region || got_count != count || r.body.len() != 16 + data.len() {
            return Err(VfioUserError::BadReply(format!(
                "region read of {count} bytes at {offset:#x} in region {region} answered with {got_count} bytes \
                 at {got_off:#x} in region {got_region} ({} bytes of body)",
                r.body.len()
            )));
        }
        data.copy_from_slice(&r.body[16..]);
        Ok(())
    }

    pub fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<()> {
        let count = u32::try_from(data.len())
            .ok()
            .filter(|&c| c as usize <= MAX_DATA)
            .ok_or_else(|| VfioUserError::BadReply(format!("a write of {} bytes is too large", data.len())))?;
        let body = access_body(offset, region, count);
        let r = self.exchange(Command::RegionWrite, &body, data, &[], false)?;
        need(&r.body, 16, "region write reply")?;
        if le_u32(&r.body, 12) != count {
            return Err(VfioUserError::BadReply(format!(
                "region write of {count} bytes acknowledged as {}",
                le_u32(&r.body, 12)
            )));
        }
        Ok(())
    }

    /// Wire interrupt `index`'s vectors `start..start + fds.len()` to `fds`.
    pub fn set_irqs(&mut self, index: u32, flags: u32, start: u32, fds: &[RawFd]) -> Result<()> {
        let mut body = Vec::with_capacity(20);
        for w in [20u32, flags, index, start, fds.len() as u32] {
            body.extend_from_slice(&w.to_le_bytes());
        }
        self.exchange(Command::SetIrqs, &body, &[], fds, false).map(|_| ())
    }

    /// Let the card access `size` bytes of `fd` from `offset` at I/O address `iova`.
    pub fn dma_map(&mut self, offset: u64, iova: u64, size: u64, fd: RawFd) -> Result<()> {
        const READ_WRITE: u32 = 3;
        let mut body = Vec::with_capacity(32);
        body.extend_from_slice(&32u32.to_le_bytes());
        body.extend_from_slice(&READ_WRITE.to_le_bytes());
        for w in [offset, iova, size] {
            body.extend_from_slice(&w.to_le_bytes());
        }
        self.exchange(Command::DmaMap, &body, &[], &[fd], false).map(|_| ())
    }

    pub fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<()> {
        let mut body = Vec::with_capacity(24);
        body.extend_from_slice(&24u32.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        for w in [iova, size] {
            body.extend_from_slice(&w.to_le_bytes());
        }
        self.exchange(Command::DmaUnmap, &body, &[], &[], false).map(|_| ())
    }

    fn negotiate_version(&mut self, deadline: Instant) -> Result<()> {
        // Our capabilities as the spec's JSON, NUL-terminated (a server
        // reads it as a C string).
        let page = page_size();
        let caps = format!(
            "{{\"capabilities\":{{\"max_msg_fds\":1,\"max_data_xfer_size\":{MAX_DATA},\"migration\":{{\"pgsize\":{page}}}}}}}\0"
        );
        let mut body = Vec::with_capacity(4 + caps.len());
        body.extend_from_slice(&0u16.to_le_bytes()); // major
        body.extend_from_slice(&1u16.to_le_bytes()); // minor
        body.extend_from_slice(caps.as_bytes());
        let r = self.exchange_by(Command::Version, &body, &[], &[], false, deadline)?;
        need(&r.body, 4, "version reply")?;
        let major = le_u16(&r.body, 0);
        if major != 0 {
            return Err(VfioUserError::BadReply(format!("the card speaks vfio-user {major}.x, we speak 0.x")));
        }
        Ok(())
    }

    /// The device's region count (it must be a PCI function).
    fn device_info(&mut self, deadline: Instant) -> Result<u32> {
        let mut body = Vec::with_capacity(16);
        for w in [16u32, 0, 0, 0] {
            body.extend_from_slice(&w.to_le_bytes());
        }
        let r = self.exchange_by(Command::DeviceGetInfo, &body, &[], &[], false, deadline)?;
        need(&r.body, 16, "device info reply")?;
        let flags = le_u32(&r.body, 4);
        if flags & VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(VfioUserError::NotPci { flags });
        }
        Ok(le_u32(&r.body, 8))
    }

    /// One region's info; None for a region the card does not have (size 0).
    fn region_info(&mut self, index: u32, deadline: Instant) -> Result<Option<Region>> {
        let mut room = REGION_INFO_LEN as u32 + CAPS_ROOM;
        // At most twice: the second time with the room the card said it needs.
        for _ in 0..2 {
            let mut body = Vec::with_capacity(REGION_INFO_LEN);
            for w in [room, 0, index, 0] {
                body.extend_from_slice(&w.to_le_bytes());
            }
            body.extend_from_slice(&[0u8; 16]);
            let r = self.exchange_by(Command::DeviceGetRegionInfo, &body, &[], &[], true, deadline)?;
            need(&r.body, REGION_INFO_LEN, "region info reply")?;
            let b = &r.body;
            let (argsz, flags, got_index, cap_offset) = (le_u32(b, 0), le_u32(b, 4), le_u32(b, 8), le_u32(b, 12));
            let (size, offset) = (le_u64(b, 16), le_u64(b, 24));
            if got_index != index {
                return Err(VfioUserError::BadReply(format!("region {index} answered as region {got_index}")));
            }
            if size == 0 {
                return Ok(None);
            }
            let caps = &b[REGION_INFO_LEN..];
            if flags & VFIO_REGION_INFO_FLAG_CAPS != 0 && caps.is_empty() && argsz > room {
                if argsz > REGION_INFO_LEN as u32 + MAX_CAPS {
                    return Err(VfioUserError::BadReply(format!("region {index} needs {argsz} bytes of info")));
                }
                room = argsz;
                continue;
            }
            let sparse =
                if flags & VFIO_REGION_INFO_FLAG_CAPS != 0 { sparse_areas(caps, cap_offset)? } else { Vec::new() };
            return Ok(Some(Region { flags, size, offset, sparse, file: r.file }));
        }
        Err(VfioUserError::BadReply(format!("region {index}: its capabilities never fit")))
    }

    fn exchange(&mut self, cmd: Command, body: &[u8], data: &[u8], fds: &[RawFd], want_fd: bool) -> Result<Reply> {
        let deadline = Instant::now() + self.timeout;
        self.exchange_by(cmd, body, data, fds, want_fd, deadline)
    }

    /// Send one command and read its reply by `deadline`. The reply must
    /// carry our id and command with the reply type; its stated size is
    /// read whole, so an error reply leaves the stream in step.
    fn exchange_by(
        &mut self,
        cmd: Command,
        body: &[u8],
        data: &[u8],
        fds: &[RawFd],
        want_fd: bool,
        deadline: Instant,
    ) -> Result<Reply> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let size = HEADER_LEN + body.len() + data.len();
        let size32 = u32::try_from(size).map_err(|_| VfioUserError::BadReply(format!("{size} bytes to send")))?;
        let mut header = [0u8; HEADER_LEN];
        header[0..2].copy_from_slice(&id.to_le_bytes());
        header[2..4].copy_from_slice(&(cmd as u16).to_le_bytes());
        header[4..8].copy_from_slice(&size32.to_le_bytes());
        self.send(&[&header, body, data], fds, deadline)?;
        let r = self.receive(want_fd, deadline)?;
        let (got_id, got_cmd) = (le_u16(&r.head, 0), le_u16(&r.head, 2));
        if got_id != id || got_cmd != cmd as u16 || r.reply.flags & TYPE_MASK != TYPE_REPLY {
            return Err(VfioUserError::BadReply(format!(
                "{} (id {id}) answered by command {got_cmd}, id {got_id}, flags {:#x}",
                cmd.name(),
                r.reply.flags
            )));
        }
        if r.reply.flags & FLAG_ERROR != 0 {
            return Err(VfioUserError::Refused { errno: r.reply.error });
        }
        debug_assert_eq!(r.reply.size, HEADER_LEN + r.reply.body.len());
        Ok(r.reply)
    }

    /// Write every byte of `parts` (the fds, if any, with the first bytes).
    fn send(&mut self, parts: &[&[u8]], fds: &[RawFd], deadline: Instant) -> Result<()> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut sent = 0;
        let mut fds_sent = fds.is_empty();
        while sent < total {
            self.wait(libc::POLLOUT, deadline)?;
            let n = if !fds_sent {
                let bufs: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
                match self.stream.send_with_fds(&bufs, fds) {
                    Ok(n) => {
                        fds_sent = true;
                        n
                    }
                    Err(e) if e.errno() == libc::EAGAIN || e.errno() == libc::EINTR => continue,
                    Err(e) => {
                        return Err(VfioUserError::Io {
                            what: "send",
                            source: std::io::Error::from_raw_os_error(e.errno()),
                        })
                    }
                }
            } else {
                let slices = remaining(parts, sent);
                match self.stream.write_vectored(&slices) {
                    Ok(n) => n,
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => {
                        continue
                    }
                    Err(e) if is_gone(&e) => return Err(VfioUserError::Closed),
                    Err(source) => return Err(VfioUserError::Io { what: "send", source }),
                }
            };
            if n == 0 {
                return Err(VfioUserError::Closed);
            }
            sent += n;
        }
        Ok(())
    }

    /// Read one message: its header (collecting a passed fd when asked),
    /// then the body its size states.
    fn receive(&mut self, want_fd: bool, deadline: Instant) -> Result<Received> {
        let mut head = [0u8; HEADER_LEN];
        let mut file = None;
        let mut got = 0;
        while got < HEADER_LEN {
            self.wait(libc::POLLIN, deadline)?;
            let n = if want_fd && file.is_none() {
                let mut fd = [-1 as RawFd; 1];
                let mut iov = [libc::iovec { iov_base: head[got..].as_mut_ptr().cast(), iov_len: HEADER_LEN - got }];
                // SAFETY: the iovec covers the unfilled part of `head`, ours
                // for the call; received fds are owned at once below.
                match unsafe { self.stream.recv_with_fds(&mut iov, &mut fd) } {
                    Ok((n, nfds)) => {
                        if nfds > 0 {
                            // SAFETY: the kernel just installed this fd for us.
                            file = Some(File::from(unsafe { OwnedFd::from_raw_fd(fd[0]) }));
                        }
                        n
                    }
                    Err(e) if e.errno() == libc::EAGAIN || e.errno() == libc::EINTR => continue,
                    Err(e) => {
                        return Err(VfioUserError::Io {
                            what: "receive",
                            source: std::io::Error::from_raw_os_error(e.errno()),
                        })
                    }
                }
            } else {
                match self.stream.read(&mut head[got..]) {
                    Ok(n) => n,
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => {
                        continue
                    }
                    Err(e) if is_gone(&e) => return Err(VfioUserError::Closed),
                    Err(source) => return Err(VfioUserError::Io { what: "receive", source }),
                }
            };
            if n == 0 {
                return Err(VfioUserError::Closed);
            }
            got += n;
        }
        let size = le_u32(&head, 4) as usize;
        if !(HEADER_LEN..=MAX_REPLY).contains(&size) {
            return Err(VfioUserError::BadReply(format!("a message of {size} bytes")));
        }
        let mut body = vec![0u8; size - HEADER_LEN];
        self.read_full(&mut body, deadline)?;
        let reply = Reply { size, flags: le_u32(&head, 8), error: le_u32(&head, 12), body, file };
        Ok(Received { head, reply })
    }

    fn read_full(&mut self, buf: &mut [u8], deadline: Instant) -> Result<()> {
        let mut got = 0;
        while got < buf.len() {
            self.wait(libc::POLLIN, deadline)?;
            match self.stream.read(&mut buf[got..]) {
                Ok(0) => return Err(VfioUserError::Closed),
                Ok(n) => got += n,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => {}
                Err(e) if is_gone(&e) => return Err(VfioUserError::Closed),
                Err(source) => return Err(VfioUserError::Io { what: "receive", source }),
            }
        }
        Ok(())
    }

    /// Wait until the socket is ready for `events` or `deadline` passes
    /// (then `TimedOut`, stated as the exchange's whole bound).
    fn wait(&self, events: i16, deadline: Instant) -> Result<()> {
        poll_until(self.stream.as_raw_fd(), events, deadline, self.timeout)
    }
}

struct Received {
    head: [u8; HEADER_LEN],
    reply: Reply,
}

fn access_body(offset: u64, region: u32, count: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&offset.to_le_bytes());
    b[8..12].copy_from_slice(&region.to_le_bytes());
    b[12..16].copy_from_slice(&count.to_le_bytes());
    b
}

/// The parts of `parts` after the first `skip` bytes.
fn remaining<'a>(parts: &[&'a [u8]], mut skip: usize) -> Vec<std::io::IoSlice<'a>> {
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        if skip >= p.len() {
            skip -= p.len();
            continue;
        }
        out.push(std::io::IoSlice::new(&p[skip..]));
        skip = 0;
    }
    out
}

fn is_gone(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::NotConnected
    )
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// poll(2) one fd for `events` until `deadline`.
fn poll_until(fd: RawFd, events: i16, deadline: Instant, bound: Duration) -> Result<()> {
    loop {
        // Past the deadline, one look that does not wait: a thread that
        // was not scheduled until after it must not call an answer that is
        // already there late.
        let now = Instant::now();
        let last = now >= deadline;
        // Round up so a wait never spins on a sub-millisecond remainder.
        let ms = if last { 0 } else { (deadline - now).as_micros().div_ceil(1000).min(i32::MAX as u128) as i32 };
        let mut p = libc::pollfd { fd, events, revents: 0 };
        // SAFETY: one valid pollfd on our own socket.
        let rc = unsafe { libc::poll(&mut p, 1, ms) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(VfioUserError::Io { what: "poll", source: e });
        }
        // Readable, writable, or hung up / in error: the read or write that
        // follows says which.
        if rc > 0 && p.revents != 0 {
            return Ok(());
        }
        if last {
            return Err(VfioUserError::TimedOut { timeout_ms: bound.as_millis() as u64 });
        }
    }
}

/// Connect without blocking on a card whose accept queue is full (a silent
/// card does not accept): retried until `deadline`.
fn connect_nonblocking(path: &Path, deadline: Instant, bound: Duration) -> Result<UnixStream> {
    let addr = socket2::SockAddr::unix(path).map_err(|source| VfioUserError::Io { what: "socket address", source })?;
    loop {
        let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM.cloexec(), None)
            .map_err(|source| VfioUserError::Io { what: "socket", source })?;
        s.set_nonblocking(true).map_err(|source| VfioUserError::Io { what: "set non-blocking", source })?;
        match s.connect(&addr) {
            Ok(()) => return Ok(UnixStream::from(OwnedFd::from(s))),
            // The accept queue is full: the card is not taking hosts now.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(VfioUserError::TimedOut { timeout_ms: bound.as_millis() as u64 });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(source) => return Err(VfioUserError::Io { what: "connect", source }),
        }
    }
}

/// The sparse-mmap areas of a region's capability list. `caps` holds the
/// bytes after `vfio_region_info`; offsets in the list count from the start
/// of that struct.
pub fn sparse_areas(caps: &[u8], first: u32) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut next = first as usize;
    let mut previous = 0usize;
    while next != 0 {
        if next <= previous {
            return Err(VfioUserError::BadReply(format!("capability list loops back to offset {next}")));
        }
        previous = next;
        let at = next
            .checked_sub(REGION_INFO_LEN)
            .filter(|&a| a.checked_add(8).is_some_and(|end| end <= caps.len()))
            .ok_or_else(|| VfioUserError::BadReply(format!("capability at offset {next} is outside the list")))?;
        let (id, next_off) = (le_u16(caps, at), le_u32(caps, at + 4));
        next = next_off as usize;
        if u32::from(id) != VFIO_REGION_INFO_CAP_SPARSE_MMAP {
            continue;
        }
        let body = &caps[at + 8..];
        need(body, 8, "sparse mmap capability")?;
        let count = le_u32(body, 0) as usize;
        let areas = &body[8..];
        if count.checked_mul(16).is_none_or(|n| n > areas.len()) {
            return Err(VfioUserError::BadReply(format!("a sparse mmap capability claims {count} areas")));
        }
        for i in 0..count {
            out.push((le_u64(areas, i * 16), le_u64(areas, i * 16 + 8)));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(id: u16, next: u32, areas: &[(u64, u64)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&id.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&next.to_le_bytes());
        b.extend_from_slice(&(areas.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for (o, s) in areas {
            b.extend_from_slice(&o.to_le_bytes());
            b.extend_from_slice(&s.to_le_bytes());
        }
        b
    }

    #[test]
    fn sparse_areas_follow_the_list_and_refuse_loops_and_overruns() {
        let one = cap(1, 0, &[(0, 4096), (8192, 4096)]);
        assert_eq!(sparse_areas(&one, 32).expect("one cap"), vec![(0, 4096), (8192, 4096)]);
        // An unknown capability first, then the sparse one after it.
        let mut two = cap(7, 32 + 16, &[]);
        two.truncate(8);
        two.extend_from_slice(&[0u8; 8]);
        two.extend(cap(1, 0, &[(0, 1 << 20)]));
        assert_eq!(sparse_areas(&two, 32).expect("two caps"), vec![(0, 1 << 20)]);
        // A list pointing back at itself.
        let looped = cap(1, 32, &[(0, 1)]);
        assert!(sparse_areas(&looped, 32).is_err());
        // More areas claimed than bytes hold.
        let mut lying = cap(1, 0, &[(0, 1)]);
        lying[8..12].copy_from_slice(&1000u32.to_le_bytes());
        assert!(sparse_areas(&lying, 32).is_err());
        // A first offset inside the region info itself, or past the end.
        assert!(sparse_areas(&one, 8).is_err());
        assert!(sparse_areas(&one, 4096).is_err());
        assert!(sparse_areas(&[], 0).expect("no list").is_empty());
    }

    /// A thread that only runs again after its deadline still takes an
    /// answer that is already there; with nothing there it times out.
    #[test]
    fn an_answer_already_there_is_taken_past_the_deadline() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let past = Instant::now() - Duration::from_secs(1);
        let bound = Duration::from_millis(300);
        assert!(matches!(
            poll_until(a.as_raw_fd(), libc::POLLIN, past, bound),
            Err(VfioUserError::TimedOut { timeout_ms: 300 })
        ));
        b.write_all(b"x").unwrap();
        poll_until(a.as_raw_fd(), libc::POLLIN, past, bound).expect("the answer is there");
    }

    #[test]
    fn remaining_skips_whole_and_partial_parts() {
        let (a, b, c) = (&b"abcd"[..], &b""[..], &b"efgh"[..]);
        let r = remaining(&[a, b, c], 0);
        assert_eq!(r.iter().map(|s| s.len()).sum::<usize>(), 8);
        let r = remaining(&[a, b, c], 6);
        assert_eq!(r.len(), 1);
        assert_eq!(&*r[0], b"gh");
    }
}
