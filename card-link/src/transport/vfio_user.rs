//! vfio-user transport: the `vfio_user` crate's client over a UNIX socket.
//!
//! The crate's client blocks forever if the server goes silent and exposes no
//! socket to set a timeout on. A silent card must not hang the host, so after
//! connecting we find the client's socket among our own fds (the one new
//! socket whose peer is the card's path) and set SO_RCVTIMEO/SO_SNDTIMEO on
//! it. A timed-out exchange may leave the stream out of step, so the transport
//! then refuses further use (`LinkBroken`) until the caller reconnects.

use std::collections::HashSet;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_user::Client;
use vmm_sys_util::eventfd::EventFd;

use super::{check_access, Transport};
use crate::error::{CardError, Result};
use crate::shm::SharedMem;

/// Connections are made one at a time so the fd that appears is ours.
static CONNECT_LOCK: Mutex<()> = Mutex::new(());

pub struct VfioUserTransport {
    client: Client,
    path: PathBuf,
    timeout: Duration,
    broken: Option<String>,
    sizes: Vec<(u32, u64)>,
    /// The client's socket (found at connect; owned by `client`): polled
    /// for a hang-up so a card that died is seen while the host waits on
    /// mapped memory, where no socket exchange would notice it.
    fd: i32,
}

/// Our fds that are sockets connected to `path`, with their inode (an fd
/// number alone can be reused between two listings).
fn sockets_to(path: &Path, canon: &Path) -> HashSet<(i32, u64)> {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()).collect())
        .unwrap_or_default();
    fds.into_iter()
        .filter(|&fd| peer_path(fd).map(|p| p == canon || p == path).unwrap_or(false))
        .filter_map(|fd| {
            // SAFETY: fstat fills a plain struct for an fd we just listed.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((fd, st.st_ino))
        })
        .collect()
}

/// Path a UNIX socket fd is connected to, if it is one.
///
/// `fd` is a number listed from /proc/self/fd, not ours: another thread may
/// close it (and the number be reused) at any moment, so it is not borrowed
/// as a `BorrowedFd`, whose contract is that the fd stays open. getpeername(2)
/// on a stale number fails (EBADF, ENOTSOCK) or describes whatever file now
/// has it; it reads only, and `connect` accepts only the one new socket to
/// the card, told apart by its inode too.
fn peer_path(fd: i32) -> Option<PathBuf> {
    // SAFETY: getpeername writes at most `*len` bytes (the storage's size,
    // set by try_init) into the storage try_init provides, and sets `*len`.
    let (_, addr) = unsafe {
        socket2::SockAddr::try_init(|storage, len| {
            if libc::getpeername(fd, storage.cast(), len) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
    }
    .ok()?;
    addr.as_pathname().map(Path::to_path_buf)
}

/// Run `f` on `fd`, the socket of `_client` (private to the vfio_user crate;
/// `connect` found its number), borrowed for the call only. The client is
/// passed so the caller must hold it, alive, for as long as the borrow lasts.
fn with_socket<R>(_client: &Client, fd: i32, f: impl FnOnce(socket2::SockRef<'_>) -> R) -> R {
    // SAFETY: `fd` is the socket `connect` identified as the client's: the
    // one socket to the card's path that appeared while `Client::new` ran
    // (card-link's connects are serialised by the connect lock; two new ones
    // are refused as `SocketNotFound`). The client owns it and closes it only
    // when dropped, which cannot happen while `_client` is borrowed here, and
    // the `BorrowedFd` lives only until `f` returns.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    f(socket2::SockRef::from(&fd))
}

/// Whether the card closed its end of the socket: a zero-timeout poll, so it
/// costs one system call and never consumes a message.
fn peer_hung_up(client: &Client, fd: i32) -> std::io::Result<bool> {
    with_socket(client, fd, |s| {
        let mut p = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: one valid pollfd on a socket borrowed for this call.
        let rc = unsafe { libc::poll(&mut p, 1, 0) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
        }
        Ok(p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0)
    })
}

/// The vfio_user crate sets no socket timeouts: bound every exchange.
fn set_timeouts(client: &Client, fd: i32, t: Duration) -> std::io::Result<()> {
    with_socket(client, fd, |s| {
        s.set_read_timeout(Some(t))?;
        s.set_write_timeout(Some(t))
    })
}

impl VfioUserTransport {
    /// Connect to a card's vfio-user socket. `timeout` bounds every exchange,
    /// including the version negotiation of the connect itself.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let _guard = CONNECT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let canon = path.canonicalize().map_err(|source| CardError::SocketPath { path: path.to_path_buf(), source })?;
        let before = sockets_to(path, &canon);
        let (tx, rx) = mpsc::channel();
        let p = path.to_path_buf();
        // The crate's connect negotiates without a timeout; run it on a helper
        // thread so a silent card costs us a leaked thread, not a hang.
        std::thread::Builder::new()
            .name("card-connect".into())
            .spawn(move || {
                // After a timeout nobody receives: the client is dropped here,
                // which closes its socket. Nothing else to do about it.
                let _ = tx.send(Client::new(&p));
            })
            .map_err(|source| CardError::Os { what: "spawn the vfio-user connect thread", source })?;
        let client = match rx.recv_timeout(timeout) {
            Ok(Ok(c)) => c,
            Ok(Err(source)) => return Err(CardError::Connect { path: path.to_path_buf(), source }),
            Err(_) => {
                return Err(CardError::Timeout { what: "vfio-user connect", timeout_ms: timeout.as_millis() as u64 })
            }
        };
        let fresh: Vec<i32> = sockets_to(path, &canon).difference(&before).map(|(fd, _)| *fd).collect();
        let [fd] = fresh[..] else {
            return Err(CardError::SocketNotFound { candidates: fresh.len() });
        };
        set_timeouts(&client, fd, timeout)
            .map_err(|source| CardError::Os { what: "set timeouts on the vfio-user socket", source })?;
        let sizes = [0u32, 1, 2, 3, 4, 5].iter().filter_map(|&i| client.region(i).map(|r| (i, r.size))).collect();
        Ok(VfioUserTransport { client, path: path.to_path_buf(), timeout, broken: None, sizes, fd })
    }

    fn check(&self) -> Result<()> {
        match &self.broken {
            Some(why) => Err(CardError::LinkBroken(why.clone())),
            None => Ok(()),
        }
    }

    fn fail(&mut self, what: &'static str, e: vfio_user::Error) -> CardError {
        let timed_out = matches!(&e, vfio_user::Error::StreamRead(io) | vfio_user::Error::StreamWrite(io)
            if matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
        let err = if timed_out {
            CardError::Timeout { what, timeout_ms: self.timeout.as_millis() as u64 }
        } else {
            CardError::Io { what, source: e }
        };
        self.broken = Some(err.to_string());
        err
    }
}

impl Transport for VfioUserTransport {
    fn read(&mut self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check()?;
        check_access(self.region_size(index), index, offset, buf.len())?;
        self.client.region_read(index, offset, buf).map_err(|e| self.fail("region read", e))
    }

    fn write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.check()?;
        check_access(self.region_size(index), index, offset, data.len())?;
        self.client.region_write(index, offset, data).map_err(|e| self.fail("region write", e))
    }

    fn region_size(&self, index: u32) -> Option<u64> {
        self.sizes.iter().find(|(i, _)| *i == index).map(|(_, s)| *s)
    }

    fn set_completion_eventfd(&mut self, fd: &EventFd) -> Result<()> {
        self.check()?;
        self.client
            .set_irqs(
                VFIO_PCI_MSIX_IRQ_INDEX,
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                0,
                1,
                &[fd.as_raw_fd()],
            )
            .map_err(|e| self.fail("set irqs", e))
    }

    fn describe(&self) -> String {
        format!("vfio-user:{}", self.path.display())
    }

    fn map_region(&mut self, index: u32, writable: bool) -> Result<Option<SharedMem>> {
        self.check()?;
        let Some(r) = self.client.region(index) else { return Ok(None) };
        let Some(fo) = r.file_offset.as_ref() else { return Ok(None) };
        // Only one area covering the whole region is used: the card's BARs
        // have no trapped holes, and a partial map would need both paths.
        let whole = r.sparse_areas.iter().any(|a| a.offset == 0 && a.size >= r.size);
        if r.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || !whole {
            return Ok(None);
        }
        let len = usize::try_from(r.size).map_err(|_| CardError::Range {
            what: "mapped region size",
            value: r.size,
            range: "usize",
        })?;
        use std::os::fd::AsFd;
        SharedMem::map(fo.file().as_fd(), fo.start(), len, writable).map(Some)
    }

    fn link_state(&self) -> Result<()> {
        self.check()?;
        if peer_hung_up(&self.client, self.fd)
            .map_err(|source| CardError::Os { what: "poll the vfio-user socket", source })?
        {
            return Err(CardError::LinkBroken(format!("{} closed the link (the card is gone)", self.describe())));
        }
        Ok(())
    }

    fn dma_map(&mut self, iova: u64, size: u64, fd: std::os::fd::BorrowedFd<'_>) -> Result<()> {
        self.check()?;
        self.client.dma_map(0, iova, size, fd.as_raw_fd()).map_err(|e| self.fail("DMA map", e))
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<()> {
        self.check()?;
        self.client.dma_unmap(iova, size).map_err(|e| self.fail("DMA unmap", e))
    }
}

impl Drop for VfioUserTransport {
    fn drop(&mut self) {
        if let Err(e) = self.client.shutdown() {
            // A link already known broken (card gone or silent) cannot be shut
            // down cleanly; only an unexpected failure is worth a warning.
            match &self.broken {
                Some(why) => tracing::debug!(link = %self.describe(), %why, "shutdown of a broken card link: {e}"),
                None => tracing::warn!(link = %self.describe(), "could not shut down the card link socket: {e}"),
            }
        }
    }
}
