//! The card as seen through vfio-user: the regions and interrupts it
//! exposes, the `ServerBackend` that maps region accesses onto BAR0/BAR2
//! (including the fused doorbell and the garbage-registers fault), and the
//! accept loop.

use std::fs::File;
use std::mem::size_of;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_IRQ_INFO_EVENTFD, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_BAR2_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{IrqInfo, Server, ServerBackend, ServerRegion};

use card_link::abi::BAR0_SIZE;
use card_link::mailbox;

use crate::device::{lock, SimCard, SimConfig};
use crate::error::SimError;

/// A request written with the RING flag rings the doorbell, if its value is
/// the next count for exactly this slot and within the ring; otherwise the
/// write is only data (a host that lies about it just times out).
fn fused_doorbell(bar2: &mut [u8], data: &[u8], slot: u64, slots: u32) -> bool {
    let Some(ring) = mailbox::fused_ring(data) else { return false };
    let reg = |off: u64| mailbox::get_reg(bar2, off).unwrap_or(0);
    let (produced, consumed) = (reg(mailbox::REG_REQ_PRODUCED), reg(mailbox::REG_REQ_CONSUMED));
    let ahead = ring.wrapping_sub(consumed);
    let fits = (1..=slots).contains(&ahead) && (ring.wrapping_sub(1) % slots) as u64 == slot;
    if !fits || ring.wrapping_sub(produced) as i32 <= 0 {
        return false;
    }
    mailbox::set_reg(bar2, mailbox::REG_REQ_PRODUCED, ring);
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
        let copy = |src: &[u8], data: &mut [u8]| -> Result<(), std::io::Error> {
            let end = (offset as usize).checked_add(data.len()).filter(|&e| e <= src.len());
            let end = end.ok_or_else(|| einval(format!("read {offset:#x}+{} outside region {region}", data.len())))?;
            data.copy_from_slice(&src[offset as usize..end]);
            Ok(())
        };
        match region {
            VFIO_PCI_BAR0_REGION_INDEX => {
                if c.faults.garbage.load(Ordering::Relaxed) {
                    garbage(data);
                    return Ok(());
                }
                copy(&lock(&c.bar0), data)
            }
            VFIO_PCI_BAR2_REGION_INDEX => copy(&lock(&c.bar2), data),
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
            let mut b = lock(&c.bar2);
            b[offset as usize..end as usize].copy_from_slice(data);
            if in_ring && c.cfg.fused_doorbell && (offset - mailbox::RINGS_OFFSET).is_multiple_of(slot_size) {
                ring = fused_doorbell(&mut b, data, (offset - mailbox::RINGS_OFFSET) / slot_size, slots as u32);
            }
        }
        if ring {
            c.ring_doorbell();
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        _: vfio_user::DmaMapFlags,
        _: u64,
        _: u64,
        _: u64,
        _: Option<File>,
    ) -> Result<(), std::io::Error> {
        Ok(())
    }

    fn dma_unmap(&mut self, _: vfio_user::DmaUnmapFlags, _: u64, _: u64) -> Result<(), std::io::Error> {
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

/// Deterministic but meaningless bytes (the garbage-registers fault).
fn garbage(data: &mut [u8]) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ Instant::now().elapsed().as_nanos() as u64;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

pub fn regions(cfg: &SimConfig) -> Vec<ServerRegion> {
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
            ServerRegion { region_info: info, sparse_areas: Vec::new(), mmap_fd: None }
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
    let server = Server::new(&card.cfg.socket, false, irqs(), regions(&card.cfg)).map_err(SimError::Server)?;
    let mut backend = Backend(card.clone());
    while !card.stop.load(Ordering::Relaxed) {
        if let Err(e) = server.run(&mut backend) {
            card.log(0, 3, format!("host connection ended: {e}"));
        }
        *lock(&card.irq) = None;
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
