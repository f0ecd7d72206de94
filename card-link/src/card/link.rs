//! How the host reaches this card's BARs, chosen once at open: mapped into
//! this process (ABI 1.3, feature MAPPED, and the transport offers each BAR
//! as one mmap-able area) or one transport message per access (any card).
//! The accessors here hide the difference from the command and snapshot
//! code, except where the protocol differs (doorbell, waiting).

use std::fmt;
use std::sync::atomic::Ordering;

use super::Card;
use crate::abi::{self, RegisterSnapshot, BAR0_INDEX, BAR2_INDEX};
use crate::error::{CardError, Result};
use crate::mailbox;
use crate::shm::SharedMem;
use crate::transport::Transport;

/// What `Card::open_with` may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LinkMode {
    /// Map the BARs when the card offers it, else messages.
    #[default]
    Auto,
    /// Messages only (for comparison, or to rule the mapping out).
    Messages,
}

/// How the BARs are reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// Mapped: registers and mailbox read and written as memory, the
    /// doorbell a store plus a futex wake when the card sleeps.
    Mapped,
    /// Messages on the transport, and why the mapping is not used.
    Messages { why: &'static str },
}

/// What `Card::transport_info` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportInfo {
    /// The transport ("vfio-user:/run/card.sock").
    pub link: String,
    pub access: Access,
    /// Snapshot streams through a DMA-mapped host buffer (else mailbox chunks).
    pub dma_streams: bool,
    /// Why not, when not.
    pub why_no_dma: Option<String>,
}

impl fmt::Display for TransportInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.access {
            Access::Mapped => write!(f, "{}: BARs mapped, futex doorbell", self.link)?,
            Access::Messages { why } => write!(f, "{}: BAR accesses by message ({why})", self.link)?,
        }
        match &self.why_no_dma {
            None if self.dma_streams => write!(f, ", snapshot streams by DMA"),
            Some(why) => write!(f, ", snapshot streams by mailbox chunks ({why})"),
            None => write!(f, ", snapshot streams by mailbox chunks"),
        }
    }
}

pub(super) struct Mapped {
    pub(super) bar0: SharedMem,
    pub(super) bar2: SharedMem,
}

/// Map both BARs if the card offers them and `mode` allows; else say why not.
pub(super) fn choose(
    t: &mut dyn Transport,
    first: &RegisterSnapshot,
    mode: LinkMode,
    bar2_size: u64,
) -> Result<(Option<Mapped>, &'static str)> {
    if mode == LinkMode::Messages {
        return Ok((None, "messages asked for"));
    }
    if first.features & abi::FEATURE_MAPPED == 0 {
        return Ok((None, "the card does not offer mapped BARs (ABI 1.3 feature MAPPED)"));
    }
    let Some(bar0) = t.map_region(BAR0_INDEX, false)? else {
        return Ok((None, "BAR0 is not offered as an mmap-able area"));
    };
    let Some(bar2) = t.map_region(BAR2_INDEX, true)? else {
        return Ok((None, "BAR2 is not offered as an mmap-able area"));
    };
    // The sequence word must be inside the mapping, and the rings too.
    if bar0.len() < abi::OFF_SEQ + 4 || (bar2.len() as u64) < bar2_size {
        return Err(CardError::Range {
            what: "mapped BAR size",
            value: bar0.len() as u64,
            range: "covers the registers, sequence word and rings",
        });
    }
    Ok((Some(Mapped { bar0, bar2 }), ""))
}

impl Card {
    /// How this card is reached (chosen at open) and whether snapshot
    /// streams use DMA.
    pub fn transport_info(&self) -> TransportInfo {
        TransportInfo {
            link: self.t.describe(),
            access: match self.mem {
                Some(_) => Access::Mapped,
                None => Access::Messages { why: self.why_messages },
            },
            dma_streams: self.no_dma.is_none(),
            why_no_dma: self.no_dma.clone(),
        }
    }

    pub(super) fn mapped(&self) -> bool {
        self.mem.is_some()
    }

    /// Read BAR2 bytes (mapped: a volatile copy).
    pub(super) fn bar2_read(&mut self, off: u64, buf: &mut [u8]) -> Result<()> {
        match &self.mem {
            Some(m) => m.bar2.read(to_usize(off)?, buf),
            None => self.t.read(BAR2_INDEX, off, buf),
        }
    }

    /// Write BAR2 bytes (mapped: a volatile copy).
    pub(super) fn bar2_write(&mut self, off: u64, data: &[u8]) -> Result<()> {
        match &self.mem {
            Some(m) => m.bar2.write(to_usize(off)?, data),
            None => self.t.write(BAR2_INDEX, off, data),
        }
    }

    /// A BAR2 register (mapped: an acquire load, so what the card wrote
    /// before it is visible after).
    pub(super) fn bar2_reg(&mut self, reg: u64) -> Result<u32> {
        match &self.mem {
            Some(m) => Ok(m.bar2.word(to_usize(reg)?)?.load(Ordering::Acquire)),
            None => {
                let mut b = [0u8; 4];
                self.t.read(BAR2_INDEX, reg, &mut b)?;
                Ok(u32::from_le_bytes(b))
            }
        }
    }

    /// Store a BAR2 register the host owns (mapped: a release store).
    pub(super) fn set_bar2_reg(&mut self, reg: u64, value: u32) -> Result<()> {
        match &self.mem {
            Some(m) => {
                m.bar2.word(to_usize(reg)?)?.store(value, Ordering::Release);
                Ok(())
            }
            None => self.t.write(BAR2_INDEX, reg, &value.to_le_bytes()),
        }
    }

    /// The mapped doorbell: publish REQ_PRODUCED (after the request slot's
    /// bytes), then wake the card if, and only if, it sleeps on it. Both
    /// sides use sequentially consistent accesses on the two words, so
    /// either the card sees the new count before it sleeps or the host
    /// sees it sleeping (never neither).
    ///
    /// Returns whether the card had to be woken.
    pub(super) fn ring_mapped(&mut self, produced: u32) -> Result<bool> {
        self.t.link_state()?;
        let Some(m) = &self.mem else {
            return Err(CardError::Invalid("mapped doorbell on a message link".into()));
        };
        m.bar2.word(mailbox::REG_REQ_PRODUCED as usize)?.store(produced, Ordering::SeqCst);
        if m.bar2.word(mailbox::REG_CARD_WAITING as usize)?.load(Ordering::SeqCst) == 0 {
            return Ok(false);
        }
        m.bar2.futex_wake(mailbox::REG_REQ_PRODUCED as usize)?;
        Ok(true)
    }
}

fn to_usize(off: u64) -> Result<usize> {
    usize::try_from(off).map_err(|_| CardError::Range { what: "BAR offset", value: off, range: "usize" })
}
