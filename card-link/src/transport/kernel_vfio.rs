//! Kernel VFIO transport for a real card bound to vfio-pci, via `vfio-ioctls`.
//!
//! UNTESTED ON THIS MACHINE: its kernel has no VFIO (/dev/vfio is absent).
//! What does not touch /dev/vfio is unit tested: address parsing, sysfs
//! paths, bounds checks, and the all-ones convention below.
//!
//! `vfio-ioctls` logs and swallows region access errors. We pre-fill read
//! buffers with 0xff, which is what a PCI read from a vanished device returns,
//! so a failed read decodes as `BadMagic { found: 0xffffffff }` (card gone)
//! instead of stale data.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_MMAP;
use vfio_ioctls::{VfioContainer, VfioDevice, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;

use super::{check_access, Transport};
use crate::error::{CardError, Result};
use crate::shm::SharedMem;

/// A PCI address, domain:bus:device.function ("0000:65:00.0").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciAddress {
    pub domain: u16,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl FromStr for PciAddress {
    type Err = CardError;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || CardError::Invalid(format!("{s:?} is not a PCI address like 0000:65:00.0"));
        let (rest, func) = s.rsplit_once('.').ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (dom, bus, dev) = match parts[..] {
            [d, b, v] => (d, b, v),
            [b, v] => ("0000", b, v),
            _ => return Err(bad()),
        };
        let hex = |t: &str, n: usize| {
            if t.len() == n {
                u32::from_str_radix(t, 16).ok()
            } else {
                None
            }
        };
        let domain = hex(dom, 4).ok_or_else(bad)? as u16;
        let bus = hex(bus, 2).ok_or_else(bad)? as u8;
        let device = hex(dev, 2).ok_or_else(bad)?;
        let function = hex(func, 1).ok_or_else(bad)?;
        if device > 0x1f || function > 7 {
            return Err(bad());
        }
        Ok(PciAddress { domain, bus, device: device as u8, function: function as u8 })
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:02x}:{:02x}.{:x}", self.domain, self.bus, self.device, self.function)
    }
}

impl PciAddress {
    pub fn sysfs_path(&self, sysfs_root: &Path) -> PathBuf {
        sysfs_root.join("bus/pci/devices").join(self.to_string())
    }
}

/// Why kernel VFIO cannot be used here, if it cannot (checked before any ioctl).
pub fn unavailable_reason(dev_root: &Path) -> Option<String> {
    let vfio = dev_root.join("vfio/vfio");
    if !vfio.exists() {
        return Some(format!("{} is missing: this kernel has no VFIO", vfio.display()));
    }
    None
}

pub struct KernelVfioTransport {
    device: VfioDevice,
    /// The container whose IOMMU maps the host's DMA buffers.
    container: Arc<VfioContainer>,
    address: PciAddress,
    sizes: Vec<(u32, u64)>,
    /// Our own mappings of the DMA buffers the IOMMU maps (iova, mapping):
    /// kept until unmapped, so the card never reaches freed memory.
    dma: Vec<(u64, SharedMem)>,
}

impl KernelVfioTransport {
    /// Open the card at `address`, which must already be bound to vfio-pci.
    pub fn open(address: PciAddress) -> Result<Self> {
        if let Some(why) = unavailable_reason(Path::new("/dev")) {
            return Err(CardError::VfioUnavailable(why));
        }
        let container = Arc::new(
            VfioContainer::new(None)
                .map_err(|source| CardError::Vfio { what: "open the VFIO container".into(), source })?,
        );
        let path = address.sysfs_path(Path::new("/sys"));
        let device = VfioDevice::new(&path, container.clone(), false)
            .map_err(|source| CardError::Vfio { what: format!("open VFIO device {address}"), source })?;
        let sizes = [0u32, 1, 2, 3, 4, 5].iter().map(|&i| (i, device.get_region_size(i))).collect();
        Ok(KernelVfioTransport { device, container, address, sizes, dma: Vec::new() })
    }
}

/// The all-ones fill used before every kernel read (see the module comment).
pub fn fill_absent(buf: &mut [u8]) {
    buf.fill(0xff);
}

impl Transport for KernelVfioTransport {
    fn read(&mut self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_access(self.region_size(index), index, offset, buf.len())?;
        fill_absent(buf);
        self.device.region_read(index, buf, offset);
        Ok(())
    }

    fn write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        check_access(self.region_size(index), index, offset, data.len())?;
        self.device.region_write(index, data, offset);
        Ok(())
    }

    fn region_size(&self, index: u32) -> Option<u64> {
        self.sizes.iter().find(|(i, s)| *i == index && *s > 0).map(|(_, s)| *s)
    }

    fn set_completion_eventfd(&mut self, fd: &EventFd) -> Result<()> {
        self.device
            .enable_msix(vec![fd])
            .map_err(|source| CardError::Vfio { what: format!("enable MSI-X on {}", self.address), source })
    }

    fn describe(&self) -> String {
        format!("vfio:{}", self.address)
    }

    /// As Cloud Hypervisor maps a passed-through BAR: the device fd at the
    /// region's offset, when the region is mmap-able whole (no sparse
    /// capability, or one area covering it).
    fn map_region(&mut self, index: u32, writable: bool) -> Result<Option<SharedMem>> {
        let Some(size) = self.region_size(index) else { return Ok(None) };
        if self.device.get_region_flags(index) & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Ok(None);
        }
        let caps = self.device.get_region_caps(index);
        let sparse: Vec<_> = caps
            .iter()
            .filter_map(|c| match c {
                VfioRegionInfoCap::SparseMmap(s) => Some(s.areas.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        if !sparse.is_empty() && !sparse.iter().any(|a| a.offset == 0 && a.size >= size) {
            return Ok(None);
        }
        let len = usize::try_from(size).map_err(|_| CardError::Range {
            what: "mapped region size",
            value: size,
            range: "usize",
        })?;
        use std::os::fd::{AsRawFd, BorrowedFd};
        // SAFETY: the device fd is owned by `self.device`, which outlives
        // this call; the mapping made from it keeps its own reference to
        // the file, so it may outlive the borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(self.device.as_raw_fd()) };
        SharedMem::map(fd, self.device.get_region_offset(index), len, writable).map(Some)
    }

    /// The host buffer at `iova` in the card's IOMMU domain (a container
    /// DMA map of our own mapping of `fd`).
    fn dma_map(&mut self, iova: u64, size: u64, fd: std::os::fd::BorrowedFd<'_>) -> Result<()> {
        let len =
            usize::try_from(size).map_err(|_| CardError::Range { what: "DMA size", value: size, range: "usize" })?;
        let mem = SharedMem::map(fd, 0, len, true)?;
        // SAFETY: `mem` maps `len` bytes and is kept in `self.dma` until
        // `dma_unmap` (or drop) has removed the IOMMU mapping first.
        unsafe { self.container.vfio_dma_map(iova, len, mem.as_mut_ptr()) }
            .map_err(|source| CardError::Vfio { what: format!("DMA map {iova:#x}+{len:#x}"), source })?;
        self.dma.push((iova, mem));
        Ok(())
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<()> {
        let len =
            usize::try_from(size).map_err(|_| CardError::Range { what: "DMA size", value: size, range: "usize" })?;
        self.container
            .vfio_dma_unmap(iova, len)
            .map_err(|source| CardError::Vfio { what: format!("DMA unmap {iova:#x}+{len:#x}"), source })?;
        self.dma.retain(|(i, _)| *i != iova);
        Ok(())
    }
}

impl Drop for KernelVfioTransport {
    fn drop(&mut self) {
        // The IOMMU mappings go before the memory they point at.
        for (iova, mem) in std::mem::take(&mut self.dma) {
            if let Err(e) = self.container.vfio_dma_unmap(iova, mem.len()) {
                tracing::warn!(card = %self.address, "DMA unmap {iova:#x} at close: {e}");
                // Leak our mapping rather than free memory the card may reach.
                std::mem::forget(mem);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pci_addresses() {
        let a: PciAddress = "0000:65:00.1".parse().unwrap();
        assert_eq!(a, PciAddress { domain: 0, bus: 0x65, device: 0, function: 1 });
        assert_eq!(a.to_string(), "0000:65:00.1");
        assert_eq!("65:1f.7".parse::<PciAddress>().unwrap().device, 0x1f);
        for bad in ["", "0000:65:00", "0000:65:20.0", "0000:65:00.8", "zz:00.0", "0000:065:00.0"] {
            assert!(bad.parse::<PciAddress>().is_err(), "{bad}");
        }
    }

    #[test]
    fn sysfs_path_of_address() {
        let a: PciAddress = "0000:65:00.0".parse().unwrap();
        assert_eq!(a.sysfs_path(Path::new("/sys")), PathBuf::from("/sys/bus/pci/devices/0000:65:00.0"));
    }

    #[test]
    fn missing_vfio_is_reported_not_opened() {
        let dir = std::env::temp_dir().join(format!("card-link-novfio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(unavailable_reason(&dir).unwrap().contains("no VFIO"));
        std::fs::remove_dir_all(&dir).unwrap();
        if !Path::new("/dev/vfio/vfio").exists() {
            let e = KernelVfioTransport::open("0000:65:00.0".parse().unwrap()).err().unwrap();
            assert!(matches!(e, CardError::VfioUnavailable(_)), "{e}");
        }
    }

    #[test]
    fn absent_device_reads_decode_as_bad_magic() {
        let mut buf = vec![0u8; crate::abi::BAR0_SNAPSHOT_LEN];
        fill_absent(&mut buf);
        assert!(matches!(
            crate::abi::RegisterSnapshot::decode(&buf),
            Err(CardError::BadMagic { found: 0xffff_ffff, .. })
        ));
    }
}
