//! vfio-user transport: our own client (`client`) over a UNIX socket.
//!
//! Every exchange is bounded by the link timeout (`set_timeout` changes it,
//! for a quick health probe). Any failure other than the card refusing an
//! access (a timeout, the card gone, a malformed reply) may leave the stream
//! out of step, so the transport then shuts the connection down at once and
//! refuses further use (`LinkBroken`) until the caller connects again. Shut
//! down, not merely abandoned: a card serves one host connection at a time,
//! and only a closed one lets it take the next.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
};
use vmm_sys_util::eventfd::EventFd;

use super::{check_access, Transport};
use crate::error::{CardError, Result};
use crate::shm::SharedMem;

pub mod client;

use client::Client;
pub use client::VfioUserError;

pub struct VfioUserTransport {
    client: Client,
    path: PathBuf,
    broken: Option<String>,
}

impl VfioUserTransport {
    /// Connect to a card's vfio-user socket and do the handshake. `timeout`
    /// bounds the whole connect and, after it, every exchange.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let client = Client::connect(path, timeout).map_err(|e| match e {
            VfioUserError::TimedOut { timeout_ms } => CardError::Timeout { what: "vfio-user connect", timeout_ms },
            VfioUserError::Io { what: "connect", source } if source.kind() == std::io::ErrorKind::NotFound => {
                CardError::NotListening { path: path.to_path_buf(), why: "the socket does not exist" }
            }
            VfioUserError::Io { what: "connect", source } if source.kind() == std::io::ErrorKind::ConnectionRefused => {
                CardError::NotListening {
                    path: path.to_path_buf(),
                    why: "the socket is there but nobody accepts on it (a card that stopped without removing it?)",
                }
            }
            source => CardError::Connect { path: path.to_path_buf(), source },
        })?;
        Ok(VfioUserTransport { client, path: path.to_path_buf(), broken: None })
    }

    fn check(&self) -> Result<()> {
        match &self.broken {
            Some(why) => Err(CardError::LinkBroken(why.clone())),
            None => Ok(()),
        }
    }

    /// Turn a client error into ours; unless the card only refused the
    /// access, the link is broken from here on and its connection closed.
    fn fail(&mut self, what: &'static str, e: VfioUserError) -> CardError {
        let err = match e {
            VfioUserError::TimedOut { timeout_ms } => CardError::Timeout { what, timeout_ms },
            source => CardError::Io { what, source },
        };
        if !matches!(&err, CardError::Io { source, .. } if source.in_step()) {
            self.close(err.to_string());
        }
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
        self.client.region(index).map(|r| r.size)
    }

    fn set_completion_eventfd(&mut self, fd: &EventFd) -> Result<()> {
        self.check()?;
        self.client
            .set_irqs(
                VFIO_PCI_MSIX_IRQ_INDEX,
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                0,
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
        let Some(file) = r.file.as_ref() else { return Ok(None) };
        // Only one area covering the whole region is used: the card's BARs
        // have no trapped holes, and a partial map would need both paths.
        let whole = r.sparse.iter().any(|&(offset, size)| offset == 0 && size >= r.size);
        if r.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || !whole {
            return Ok(None);
        }
        let len = usize::try_from(r.size).map_err(|_| CardError::Range {
            what: "mapped region size",
            value: r.size,
            range: "usize",
        })?;
        SharedMem::map(file.as_fd(), r.offset, len, writable).map(Some)
    }

    fn link_state(&self) -> Result<()> {
        self.check()?;
        if peer_hung_up(self.client.socket_fd())
            .map_err(|source| CardError::Os { what: "poll the vfio-user socket", source })?
        {
            return Err(CardError::LinkBroken(format!("{} closed the link (the card is gone)", self.describe())));
        }
        Ok(())
    }

    fn set_timeout(&mut self, timeout: Duration) -> Option<Duration> {
        Some(self.client.set_timeout(timeout))
    }

    fn close(&mut self, why: String) {
        if self.broken.is_none() {
            self.broken = Some(why);
        }
        if let Err(e) = self.client.shutdown() {
            // Already shut down, or the card reset it first: nothing left to end.
            if e.kind() != std::io::ErrorKind::NotConnected {
                tracing::warn!(link = %self.describe(), "shutting down the card link socket: {e}");
            }
        }
    }

    fn dma_map(&mut self, iova: u64, size: u64, fd: BorrowedFd<'_>) -> Result<()> {
        self.check()?;
        self.client.dma_map(0, iova, size, fd.as_raw_fd()).map_err(|e| self.fail("DMA map", e))
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<()> {
        self.check()?;
        self.client.dma_unmap(iova, size).map_err(|e| self.fail("DMA unmap", e))
    }
}

/// Whether the card closed its end of the socket: a zero-timeout poll, so it
/// costs one system call and never consumes a message.
fn peer_hung_up(fd: i32) -> std::io::Result<bool> {
    let mut p = libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid pollfd on our own socket, open while the client lives.
    let rc = unsafe { libc::poll(&mut p, 1, 0) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
    }
    Ok(p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0)
}

impl Drop for VfioUserTransport {
    fn drop(&mut self) {
        // Closing the fd (when the client drops) ends the connection too;
        // shutting it down first also ends it for any copy of the fd.
        if self.broken.is_none() {
            self.close("the host closed the link".into());
        }
    }
}
