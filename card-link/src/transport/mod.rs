//! One transport trait, two implementations (the shape of Cloud Hypervisor's
//! `Vfio` trait): vfio-user to a card process, kernel VFIO to a real card.
//! The trait is deliberately tiny: region reads and writes, region sizes, and
//! wiring the completion interrupt to an eventfd. Everything above it
//! (decoding, validation, the mailbox protocol) is shared.

use vmm_sys_util::eventfd::EventFd;

use crate::error::Result;

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
