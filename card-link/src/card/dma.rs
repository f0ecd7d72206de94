//! The host's DMA buffer for snapshot streams (ABI 1.3, DMA_STREAM): a
//! memfd this host owns, mapped to the card once with DMA_MAP at a fixed
//! I/O address and kept until the card is dropped. It has two halves, so
//! the card fills (or drains) one while the host works on the other; the
//! mailbox carries only `DmaDesc`s saying which half and how much.

use super::Card;
use crate::error::Result;
use crate::mailbox::DmaDesc;
use crate::shm::SharedMem;

/// Where the buffer sits in the card's I/O address space (any fixed value
/// works: card-sim keys its mappings by it; 1 TiB keeps clear of zero).
pub(super) const DMA_IOVA: u64 = 1 << 40;
/// One chunk (half the buffer). Large enough that a command per chunk is
/// noise, small enough that a chunk and its private copy stay in a
/// core's L2 (measured: 1 MiB beat 512 KiB and 2 MiB here).
pub(super) const DMA_CHUNK: usize = 1 << 20;

pub(super) struct DmaBuffer {
    pub(super) mem: SharedMem,
    /// Host-private copy of one chunk: data is validated only once it is
    /// here, where the card cannot change it.
    pub(super) staging: Vec<u8>,
}

impl DmaBuffer {
    /// Byte offset of half `i % 2` in the buffer.
    pub(super) fn half(i: u64) -> usize {
        (i % 2) as usize * DMA_CHUNK
    }

    /// The descriptor of `len` bytes in half `i % 2`.
    pub(super) fn desc(i: u64, len: usize) -> DmaDesc {
        DmaDesc { iova: DMA_IOVA + Self::half(i) as u64, len: len as u32 }
    }
}

impl Card {
    /// True when streams go by DMA: the buffer exists, or was just made and
    /// mapped. A failure to map is logged and remembered (reported by
    /// `transport_info`); streams then use mailbox chunks.
    pub(super) fn ensure_dma(&mut self) -> bool {
        if self.dma.is_some() {
            return true;
        }
        if self.no_dma.is_some() {
            return false;
        }
        match self.map_dma() {
            Ok(b) => {
                self.dma = Some(b);
                true
            }
            Err(e) => {
                tracing::warn!(link = %self.t.describe(), "DMA buffer not mapped, streaming by mailbox: {e}");
                self.no_dma = Some(format!("mapping the DMA buffer failed: {e}"));
                false
            }
        }
    }

    fn map_dma(&mut self) -> Result<DmaBuffer> {
        let mem = SharedMem::create("card-link-dma", 2 * DMA_CHUNK)?;
        let fd = mem.fd().ok_or(crate::CardError::Invalid("DMA buffer without its memfd".into()))?;
        self.t.dma_map(DMA_IOVA, mem.len() as u64, fd)?;
        Ok(DmaBuffer { mem, staging: vec![0u8; DMA_CHUNK] })
    }
}

impl Drop for Card {
    fn drop(&mut self) {
        if let Some(b) = self.dma.take() {
            // A card already gone cannot be told; the memfd is ours and
            // goes with `b` either way.
            if let Err(e) = self.t.dma_unmap(DMA_IOVA, b.mem.len() as u64) {
                tracing::debug!(link = %self.t.describe(), "DMA unmap at close: {e}");
            }
        }
    }
}
