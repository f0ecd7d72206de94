//! One transport trait, two implementations (the shape of Cloud Hypervisor's
//! `Vfio` trait): vfio-user to a card process, kernel VFIO to a real card.
//! The trait is deliberately tiny: region reads and writes, region sizes, and
//! wiring the completion interrupt to an eventfd. Everything above it
//! (decoding, validation, the mailbox protocol) is shared.

use std::os::fd::BorrowedFd;

use vmm_sys_util::eventfd::EventFd;

use crate::error::{CardError, Result};
use crate::shm::SharedMem;

pub mod kernel_vfio;
pub mod vfio_user;

pub trait Transport: Send {
    /// Read `buf.len()` bytes at `offset` of region `index`.
    fn read(&mut self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Write `data` at `offset` of region `index`.
    fn write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<()>;
    /// Size of region `index` as the device reports it (None if absent).
    fn region_size(&self, index: u32) -> Option<u64>;
    /// Deliver the card's completion interrupt (MSI-X vector 0) to `fd`.
    fn set_completion_eventfd(&mut self, fd: &EventFd) -> Result<()>;
    /// A short label for logs: "vfio-user:/run/card.sock", "vfio:0000:65:00.0".
    fn describe(&self) -> String;

    /// Map region `index` if the device offers all of it as one mmap-able
    /// area (ABI 1.3); None: it does not, use `read`/`write`. Read-only
    /// unless `writable`.
    fn map_region(&mut self, _index: u32, _writable: bool) -> Result<Option<SharedMem>> {
        Ok(None)
    }

    /// Whether the link itself is still up, without touching the card: a
    /// transport that marks itself broken (a timeout, the peer gone) says
    /// so here, so mapped accesses stop when message accesses would.
    fn link_state(&self) -> Result<()> {
        Ok(())
    }

    /// Bound each later exchange by `timeout` (a quick health probe sets a
    /// short one, then puts the old one back); returns the bound before,
    /// or None when the transport has no such bound (kernel VFIO: an
    /// access is a system call on a mapped device).
    fn set_timeout(&mut self, _timeout: std::time::Duration) -> Option<std::time::Duration> {
        None
    }

    /// End the link now (`why` is what later accesses report): a card that
    /// serves one host at a time can then take the next connection.
    fn close(&mut self, _why: String) {}

    /// Let the card access `size` bytes of `fd` at I/O address `iova`
    /// (vfio-user DMA_MAP). Unsupported by default: the snapshot streams
    /// then go through the mailbox.
    fn dma_map(&mut self, _iova: u64, _size: u64, _fd: BorrowedFd<'_>) -> Result<()> {
        Err(CardError::Unsupported { what: "DMA mapping on this transport", needs: "vfio-user", minor: 0 })
    }

    /// Undo a `dma_map`.
    fn dma_unmap(&mut self, _iova: u64, _size: u64) -> Result<()> {
        Ok(())
    }
}

/// Check an access against a region size before it goes out, so a bad offset
/// is our error and not a device-side surprise.
pub fn check_access(size: Option<u64>, index: u32, offset: u64, len: usize) -> Result<()> {
    let size = size.ok_or_else(|| crate::CardError::Invalid(format!("region {index} does not exist")))?;
    let end = offset.checked_add(len as u64);
    match end {
        Some(end) if end <= size => Ok(()),
        _ => Err(crate::CardError::Invalid(format!(
            "access {offset:#x}+{len} outside region {index} of {size:#x} bytes"
        ))),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn access_bounds() {
        assert!(super::check_access(Some(16), 0, 8, 8).is_ok());
        assert!(super::check_access(Some(16), 0, 9, 8).is_err());
        assert!(super::check_access(Some(16), 0, u64::MAX, 2).is_err());
        assert!(super::check_access(None, 3, 0, 1).is_err());
    }
}
