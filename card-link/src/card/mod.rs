//! The host's driver for the card, over any `Transport`. Split by concern:
//!
//! - this file: opening a card (identity, ABI, mailbox geometry, interrupt),
//!   the register file and liveness (`registers`, `utilisation_since`,
//!   `check_health`)
//! - `command`: the mailbox command path (request slot, doorbell, completion
//!   eventfd, response checks) and the simple commands on top of it
//! - `snapshot`: streaming VM snapshots card -> host and host -> card
//! - `link`: how this card is reached (mapped BARs or socket messages),
//!   chosen at open, and the BAR accessors both command and snapshot use

use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::abi::{self, Health, RegisterSnapshot, BAR0_INDEX, BAR2_INDEX};
use crate::error::{CardError, Result};
use crate::mailbox::{self, HEADER_LEN};
use crate::transport::Transport;

mod command;
mod dma;
mod link;
mod snapshot;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_mapped;

pub use link::{Access, LinkMode, TransportInfo};
pub use snapshot::{SnapshotInfo, StreamStats, MAX_SNAPSHOT};

#[derive(Clone, Debug)]
pub struct CardOptions {
    /// Upper bound for one mailbox command (doorbell to response).
    pub command_timeout: Duration,
    /// Ring the doorbell with its own write even if the card offers the
    /// fused doorbell (for comparison and for 1.0 behaviour).
    pub classic_doorbell: bool,
}

impl Default for CardOptions {
    fn default() -> Self {
        CardOptions { command_timeout: Duration::from_secs(5), classic_doorbell: false }
    }
}

/// What `check_health` concluded.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthReport {
    pub heartbeat: u64,
    pub period_ms: u32,
    pub health: Health,
    /// Time since the heartbeat last moved.
    pub since_beat: Duration,
}

pub struct Card {
    t: Box<dyn Transport>,
    irq: EventFd,
    slots: u32,
    slot_size: u32,
    next_seq: u32,
    req_produced: u32,
    resp_consumed: u32,
    opts: CardOptions,
    first: RegisterSnapshot,
    last_beat: u64,
    last_beat_at: Instant,
    /// Commands given up on (timed out) that the card may still hold.
    abandoned: u32,
    scratch: Vec<u8>,
    /// BAR0 and BAR2 mapped into this process (ABI 1.3), or None: every
    /// access is a message on the transport.
    mem: Option<link::Mapped>,
    /// Why the message path was chosen (when `mem` is None).
    why_messages: &'static str,
    /// The host's DMA buffer, mapped to the card at the first stream.
    dma: Option<dma::DmaBuffer>,
    /// DMA streams are not used (not offered, or mapping failed once).
    no_dma: Option<String>,
    last_stream: Option<StreamStats>,
}

impl Card {
    /// Validate the card (identity, ABI, geometry), sync the mailbox counters
    /// and wire the completion interrupt.
    pub fn open(t: Box<dyn Transport>, opts: CardOptions) -> Result<Card> {
        Self::open_with(t, opts, LinkMode::Auto)
    }

    /// `open`, choosing how the BARs are reached: `Auto` maps them when the
    /// card offers it (ABI 1.3, feature MAPPED, mmap-able regions) and falls
    /// back to messages otherwise; `Messages` never maps. `transport_info`
    /// says what was chosen and why.
    pub fn open_with(mut t: Box<dyn Transport>, opts: CardOptions, mode: LinkMode) -> Result<Card> {
        let first = read_registers(t.as_mut())?;
        let bar2 =
            t.region_size(BAR2_INDEX).ok_or(CardError::Range { what: "BAR2 size", value: 0, range: "present" })?;
        let need = mailbox::bar2_size(first.mailbox_slots, first.mailbox_slot_size);
        if bar2 < need {
            return Err(CardError::Range { what: "BAR2 size", value: bar2, range: "covers both rings" });
        }
        let irq = EventFd::new(EFD_NONBLOCK)
            .map_err(|source| CardError::Os { what: "create the completion eventfd", source })?;
        t.set_completion_eventfd(&irq)?;
        let (mem, why_messages) = link::choose(t.as_mut(), &first, mode, bar2)?;
        let mut regs = [0u8; 16];
        match &mem {
            Some(m) => m.bar2.read(0, &mut regs)?,
            None => t.read(BAR2_INDEX, 0, &mut regs)?,
        }
        let reg = |r: u64| mailbox::get_reg(&regs, r).unwrap_or(0);
        let req_produced = reg(mailbox::REG_REQ_PRODUCED);
        let req_consumed = reg(mailbox::REG_REQ_CONSUMED);
        let resp_produced = reg(mailbox::REG_RESP_PRODUCED);
        if req_produced != req_consumed || resp_produced != req_consumed {
            // A previous host left a command in flight: its response would be
            // taken for ours. Counters further apart than the ring are not a
            // busy card but garbage.
            let in_flight = req_produced.wrapping_sub(resp_produced);
            if in_flight > first.mailbox_slots || req_produced.wrapping_sub(req_consumed) > in_flight {
                return Err(CardError::Range {
                    what: "mailbox requests in flight at open",
                    value: in_flight as u64,
                    range: "<= ring slots, consumed between answered and produced",
                });
            }
            return Err(CardError::MailboxBusy { in_flight, slots: first.mailbox_slots });
        }
        Ok(Card {
            t,
            irq,
            slots: first.mailbox_slots,
            slot_size: first.mailbox_slot_size,
            next_seq: req_produced.wrapping_mul(2654435761), // any start; responses must echo it
            req_produced,
            resp_consumed: resp_produced,
            opts,
            last_beat: first.heartbeat,
            last_beat_at: Instant::now(),
            abandoned: 0,
            scratch: Vec::new(),
            no_dma: (first.features & abi::FEATURE_DMA_STREAM == 0 || mem.is_none())
                .then(|| "the card offers no DMA streams (ABI 1.3 DMA_STREAM with mapped BARs)".to_string()),
            mem,
            why_messages,
            dma: None,
            last_stream: None,
            first,
        })
    }

    pub fn identity(&self) -> &RegisterSnapshot {
        &self.first
    }

    pub fn describe(&self) -> String {
        self.t.describe()
    }

    /// Largest payload one mailbox message can carry.
    pub fn max_payload(&self) -> usize {
        self.slot_size as usize - HEADER_LEN
    }

    /// Read and validate BAR0 (from the mapping under its sequence word,
    /// or by message).
    pub fn registers(&mut self) -> Result<RegisterSnapshot> {
        let s = match &self.mem {
            Some(m) => {
                self.t.link_state()?;
                abi::read_mapped(&m.bar0)?
            }
            None => read_registers(self.t.as_mut())?,
        };
        if s.serial != self.first.serial {
            return Err(CardError::Unknown { what: "card serial changed", value: s.serial });
        }
        Ok(s)
    }

    /// Read the registers and compute each resource's utilisation since
    /// `prev` (an earlier snapshot of this card). Returns the new snapshot to
    /// pass next time. This is what a placement engine samples.
    pub fn utilisation_since(&mut self, prev: &RegisterSnapshot) -> Result<(RegisterSnapshot, abi::Utilisation)> {
        let now = self.registers()?;
        let u = abi::utilisation(prev, &now)?;
        Ok((now, u))
    }

    /// Read the registers and judge liveness: a link timeout means the card
    /// is silent; a heartbeat that has not moved for three periods means it
    /// is stalled; health Failed is reported as such. Call it at least once
    /// per period to detect within three heartbeats.
    /// Run `f` with a different command timeout (e.g. a short one for
    /// telemetry that must not hold up a health check), then restore it.
    pub fn with_command_timeout<T>(&mut self, timeout: Duration, f: impl FnOnce(&mut Card) -> T) -> T {
        let old = std::mem::replace(&mut self.opts.command_timeout, timeout);
        let r = f(self);
        self.opts.command_timeout = old;
        r
    }

    pub fn check_health(&mut self) -> Result<HealthReport> {
        if self.mem.is_some() {
            // Mapped memory outlives a dead or frozen card: one message
            // across the link says whether the card still answers (a
            // timeout, or the link closed, as on the message path).
            let mut word = [0u8; 4];
            self.t.read(BAR0_INDEX, 0, &mut word)?;
        }
        let s = self.registers()?;
        let now = Instant::now();
        if s.heartbeat != self.last_beat {
            self.last_beat = s.heartbeat;
            self.last_beat_at = now;
        }
        let since = now.duration_since(self.last_beat_at);
        if since > Duration::from_millis(3 * s.heartbeat_period_ms as u64) {
            return Err(CardError::Stalled {
                heartbeat: s.heartbeat,
                stuck_ms: since.as_millis() as u64,
                period_ms: s.heartbeat_period_ms,
            });
        }
        if s.health == Health::Failed {
            return Err(CardError::Failed(s.health as u32));
        }
        Ok(HealthReport {
            heartbeat: s.heartbeat,
            period_ms: s.heartbeat_period_ms,
            health: s.health,
            since_beat: since,
        })
    }
}

/// Read BAR0 in one access and validate it as a unit.
pub fn read_registers(t: &mut dyn Transport) -> Result<RegisterSnapshot> {
    let mut buf = [0u8; abi::BAR0_SNAPSHOT_LEN];
    t.read(BAR0_INDEX, 0, &mut buf)?;
    RegisterSnapshot::decode(&buf)
}
