//! The card as seen through vfio-user: the regions and interrupts it
//! exposes, the `ServerBackend` that maps region accesses onto BAR0/BAR2
//! (including the fused doorbell and the garbage-registers fault), and the
//! accept loop.

use std::fs::File;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use vfio_bindings::bindings::vfio::{
    vfio_region_info, vfio_region_sparse_mmap_area, VFIO_IRQ_INFO_EVENTFD, VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_BAR2_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_NUM_IRQS,
    VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{IrqInfo, Server, ServerBackend, ServerRegion, SparseArea};

use card_link::abi::BAR0_SIZE;
use card_link::mailbox;
use card_link::shm::SharedMem;

use crate::device::{lock, SimCard, SimConfig};
use crate::error::SimError;

/// A request written with the RING flag rings the doorbell, if its value is
/// the next count for exactly this slot and within the ring; otherwise the
/// write is only data (a host that lies about it just times out).
fn fused_doorbell(bar2: &SharedMem, data: &[u8], slot: u64, slots: u32) -> bool {
    let Some(ring) = mailbox::fused_ring(data) else { return false };
    let (Ok(produced), Ok(consumed)) =
        (bar2.word(mailbox::REG_REQ_PRODUCED as usize), bar2.word(mailbox::REG_REQ_CONSUMED as usize))
    else {
        return false;
    };
    let (produced_now, consumed) = (produced.load(Ordering::Acquire), consumed.load(Ordering::Acquire));
    let ahead = ring.wrapping_sub(consumed);
    let fits = (1..=slots).contains(&ahead) && (ring.wrapping_sub(1) % slots) as u64 == slot;
    if !fits || ring.wrapping_sub(produced_now) as i32 <= 0 {
        return false;
    }
    produced.store(ring, Ordering::SeqCst);
    true
}

/// The vfio-user device backend handing region accesses to the card.
pub struct Backend(pub Arc<SimCard>);

fn einval(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, what)
}

impl ServerBackend for Backend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), std::io::Error> {
        let c = &self.0;
        c.silent_wait();
        let copy = |src: &SharedMem, data: &mut [u8]| -> Result<(), std::io::Error> {
            let off = usize::try_from(offset).map_err(|_| einval(format!("read at {offset:#x}")))?;
            src.read(off, data).map_err(|e| einval(format!("read {offset:#x}+{} in region {region}: {e}", data.len())))
        };
        match region {
            VFIO_PCI_BAR0_REGION_INDEX => {
                if c.faults.garbage.load(Ordering::Relaxed) {
                    garbage(data);
                    return Ok(());
                }
                let t = Instant::now();
                let _whole = lock(&c.bar0_lock);
                if t.elapsed() > std::time::Duration::from_millis(100) {
                    tracing::warn!("card-sim: a BAR0 read waited {} ms for the register file", t.elapsed().as_millis());
                }
                copy(&c.bar0, data)
            }
            VFIO_PCI_BAR2_REGION_INDEX => copy(&c.bar2, data),
            _ => {
                data.fill(0);
                Ok(())
            }
        }
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        if region != VFIO_PCI_BAR2_REGION_INDEX {
            return Ok(()); // config space and BAR0 writes are ignored, as on the board
        }
        let c = &self.0;
        c.silent_wait();
        let (slots, slot_size) = (c.cfg.slots as u64, c.cfg.slot_size as u64);
        let req_ring = mailbox::RINGS_OFFSET..mailbox::RINGS_OFFSET + slots * slot_size;
        let end = offset.checked_add(data.len() as u64).ok_or_else(|| einval("overflow".into()))?;
        let doorbell = offset == mailbox::REG_REQ_PRODUCED && data.len() == 4;
        let consumed = offset == mailbox::REG_RESP_CONSUMED && data.len() == 4;
        let in_ring = req_ring.contains(&offset) && end <= req_ring.end;
        if !(doorbell || consumed || in_ring) {
            return Err(einval(format!("write {offset:#x}+{} is not host-writable", data.len())));
        }
        let mut ring = doorbell;
        {
            let _regs = lock(&c.bar2_lock);
            let off = usize::try_from(offset).map_err(|_| einval(format!("write at {offset:#x}")))?;
            if doorbell || consumed {
                // Registers are words the card reads atomically.
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                let w = c.bar2.word(off).map_err(|e| einval(e.to_string()))?;
                w.store(v, Ordering::SeqCst);
            } else {
                c.bar2.write(off, data).map_err(|e| einval(e.to_string()))?;
            }
            if in_ring && c.cfg.fused_doorbell && (offset - mailbox::RINGS_OFFSET).is_multiple_of(slot_size) {
                ring = fused_doorbell(&c.bar2, data, (offset - mailbox::RINGS_OFFSET) / slot_size, slots as u32);
            }
        }
        if ring {
            c.ring_doorbell();
        }
        Ok(())
    }

    /// A host buffer the card may use for DMA streams (ABI 1.3): mapped
    /// here, keyed by its I/O address. A card without mapping refuses.
    fn dma_map(
        &mut self,
        _: vfio_user::DmaMapFlags,
        offset: u64,
        iova: u64,
        size: u64,
        fd: Option<File>,
    ) -> Result<(), std::io::Error> {
        let c = &self.0;
        c.silent_wait();
        if !c.cfg.mmap {
            return Err(einval("this card takes no DMA mappings (--no-mmap)".into()));
        }
        let fd = fd.ok_or_else(|| einval("DMA map without a file descriptor".into()))?;
        if size == 0 || size > MAX_DMA_WINDOW || iova.checked_add(size).is_none() {
            return Err(einval(format!("DMA window {iova:#x}+{size:#x}")));
        }
        let mut windows = lock(&c.dma);
        if windows.iter().any(|w| iova < w.iova + w.mem.len() as u64 && w.iova < iova + size) {
            return Err(einval(format!("DMA window {iova:#x}+{size:#x} overlaps a mapped one")));
        }
        let mem = SharedMem::map(fd.as_fd(), offset, size as usize, true).map_err(|e| einval(e.to_string()))?;
        windows.push(crate::device::DmaWindow { iova, mem: Arc::new(mem) });
        Ok(())
    }

    /// Forget a DMA window; a command still copying holds its own reference.
    fn dma_unmap(&mut self, _: vfio_user::DmaUnmapFlags, iova: u64, _size: u64) -> Result<(), std::io::Error> {
        lock(&self.0.dma).retain(|w| w.iova != iova);
        Ok(())
    }

    fn reset(&mut self) -> Result<(), std::io::Error> {
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        _flags: u32,
        _start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> Result<(), std::io::Error> {
        if index == VFIO_PCI_MSIX_IRQ_INDEX {
            *lock(&self.0.irq) = if count > 0 { fds.into_iter().next() } else { None };
        }
        Ok(())
    }
}

/// Largest host buffer the card maps for DMA.
const MAX_DMA_WINDOW: u64 = 1 << 30;

/// Deterministic but meaningless bytes (the garbage-registers fault).
pub(crate) fn garbage(data: &mut [u8]) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ Instant::now().elapsed().as_nanos() as u64;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

/// The memfds behind BAR0 and BAR2, offered as one mmap-able area each.
#[derive(Clone, Copy, Debug)]
pub struct BarFds {
    pub bar0: RawFd,
    pub bar2: RawFd,
}

impl SimCard {
    /// What `regions` offers for mapping: the BARs' memfds, unless the
    /// card is configured not to (`SimConfig::mmap`).
    pub fn bar_fds(&self) -> Option<BarFds> {
        let fd = |m: &SharedMem| m.fd().map(|f| f.as_raw_fd());
        match (self.cfg.mmap, fd(&self.bar0), fd(&self.bar2)) {
            (true, Some(bar0), Some(bar2)) => Some(BarFds { bar0, bar2 }),
            _ => None,
        }
    }
}

/// The card's regions; with `fds`, BAR0 and BAR2 carry a sparse-mmap area
/// covering all of each and the memfd to map it from (the fds must stay
/// open as long as the server lives: the card owns them).
pub fn regions(cfg: &SimConfig, fds: Option<BarFds>) -> Vec<ServerRegion> {
    (0..VFIO_PCI_NUM_REGIONS)
        .map(|index| {
            let mut info =
                vfio_region_info { argsz: size_of::<vfio_region_info>() as u32, index, ..Default::default() };
            let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
            match index {
                VFIO_PCI_BAR0_REGION_INDEX => {
                    info.size = BAR0_SIZE;
                    info.flags = VFIO_REGION_INFO_FLAG_READ;
                }
                VFIO_PCI_BAR2_REGION_INDEX => {
                    info.size = mailbox::bar2_size(cfg.slots, cfg.slot_size);
                    info.flags = rw;
                }
                VFIO_PCI_CONFIG_REGION_INDEX => {
                    info.size = 256;
                    info.flags = rw;
                }
                _ => {}
            }
            let fd = match (index, fds) {
                (VFIO_PCI_BAR0_REGION_INDEX, Some(f)) => Some(f.bar0),
                (VFIO_PCI_BAR2_REGION_INDEX, Some(f)) => Some(f.bar2),
                _ => None,
            };
            let Some(fd) = fd else {
                return ServerRegion { region_info: info, sparse_areas: Vec::new(), mmap_fd: None };
            };
            info.flags |= VFIO_REGION_INFO_FLAG_MMAP;
            info.offset = 0;
            let area = vfio_region_sparse_mmap_area { offset: 0, size: info.size };
            ServerRegion { region_info: info, sparse_areas: vec![SparseArea { area }], mmap_fd: Some(fd) }
        })
        .collect()
}

pub fn irqs() -> Vec<IrqInfo> {
    (0..VFIO_PCI_NUM_IRQS)
        .map(|index| IrqInfo {
            index,
            count: u32::from(index == VFIO_PCI_MSIX_IRQ_INDEX),
            flags: if index == VFIO_PCI_MSIX_IRQ_INDEX { VFIO_IRQ_INFO_EVENTFD } else { 0 },
        })
        .collect()
}

/// Serve the card on its socket, one host connection at a time (a PCI
/// function has one driver), until `card.shutdown()`.
pub fn serve(card: Arc<SimCard>) -> Result<(), SimError> {
    remove_stale_socket(&card.cfg.socket);
    let server =
        Server::new(&card.cfg.socket, false, irqs(), regions(&card.cfg, card.bar_fds())).map_err(SimError::Server)?;
    let mut backend = Backend(card.clone());
    while !card.stop.load(Ordering::Relaxed) {
        if let Err(e) = server.run(&mut backend) {
            card.log(0, 3, format!("host connection ended: {e}"));
        }
        *lock(&card.irq) = None;
        // A new host maps its own buffers.
        lock(&card.dma).clear();
    }
    Ok(())
}

/// Remove a socket left by an earlier card at `path` so binding works; none
/// there is the normal case, anything else is worth a warning (the bind
/// that follows will then say why it failed).
pub fn remove_stale_socket(path: &std::path::Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("could not remove the stale socket {}: {e}", path.display()),
    }
}
