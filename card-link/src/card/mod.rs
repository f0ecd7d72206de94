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
    /// Upper bound for the link round trip of a health check: a card that
    /// answers a register read slower than this is taken as silent. Short
    /// (a few heartbeats) so that a silent card is known within a second,
    /// whatever the command timeout.
    pub probe_timeout: Duration,
    /// Ring the doorbell with its own write even if the card offers the
    /// fused doorbell (for comparison and for 1.0 behaviour).
    pub classic_doorbell: bool,
}

/// The default health probe bound: three heartbeats of a card beating
/// every 100 ms, the same allowance as a stalled heartbeat gets.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(300);

impl Default for CardOptions {
    fn default() -> Self {
        CardOptions {
            command_timeout: Duration::from_secs(5),
            probe_timeout: DEFAULT_PROBE_TIMEOUT,
            classic_doorbell: false,
        }
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
    /// The heartbeat had not moved for three periods, but the card
    /// answered an echo: late (a busy card's firmware), not stalled.
    pub late_beat: bool,
    /// Commands given up on that the card has still not answered while
    /// its heartbeat and link go on: a slow mailbox, not a dead card.
    pub unanswered: u32,
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
    /// Commands given up on since this card was opened, and that count as
    /// of the last health check: more now means a fresh doubt.
    abandoned_total: u64,
    abandoned_checked: u64,
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
        // A host before us (a link that broke) may have left commands the
        // card is still working on: give them the probe timeout to be
        // answered, so a reconnect after a slow moment finds the mailbox idle.
        let settle = Instant::now() + opts.probe_timeout;
        loop {
            let reg = |r: u64| mailbox::get_reg(&regs, r).unwrap_or(0);
            let (produced, consumed, answered) =
                (reg(mailbox::REG_REQ_PRODUCED), reg(mailbox::REG_REQ_CONSUMED), reg(mailbox::REG_RESP_PRODUCED));
            let busy = produced != consumed || answered != consumed;
            // Counters further apart than the ring are garbage, not a busy card.
            if !busy || produced.wrapping_sub(answered) > first.mailbox_slots || Instant::now() >= settle {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
            match &mem {
                Some(m) => m.bar2.read(0, &mut regs)?,
                None => t.read(BAR2_INDEX, 0, &mut regs)?,
            }
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
            abandoned_total: 0,
            abandoned_checked: 0,
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

    /// Judge liveness, every link round trip bounded by the probe timeout.
    /// The card is dead when its heartbeat has not moved for three periods
    /// and it does not answer either (commands given up on still pending,
    /// or an echo unanswered within the probe bound), or when it reports
    /// itself failed; a heartbeat that is only late while the card answers
    /// is not a stall (`HealthReport::late_beat`). The link must answer one
    /// message even when the BARs are mapped (their memory outlives a dead
    /// or frozen card), and commands given up on must be answered within
    /// the probe bound, followed by an echo.
    pub fn check_health(&mut self) -> Result<HealthReport> {
        let probe = self.opts.probe_timeout;
        let old = self.t.set_timeout(probe);
        let r = self.check_health_now(probe);
        if let Some(old) = old {
            self.t.set_timeout(old);
        }
        r
    }

    fn check_health_now(&mut self, probe: Duration) -> Result<HealthReport> {
        let s = self.registers()?;
        let since = self.note_heartbeat(s.heartbeat);
        let stale = since > Duration::from_millis(3 * s.heartbeat_period_ms as u64);
        let stalled = || CardError::Stalled {
            heartbeat: s.heartbeat,
            stuck_ms: since.as_millis() as u64,
            period_ms: s.heartbeat_period_ms,
        };
        if stale && self.abandoned > 0 && self.check_abandoned().is_err() {
            // Frozen mid-command: nothing more to ask.
            return Err(stalled());
        }
        if self.mem.is_some() {
            let mut word = [0u8; 4];
            self.t.read(BAR0_INDEX, 0, &mut word)?;
        }
        if s.health == Health::Failed {
            return Err(CardError::Failed(s.health as u32));
        }
        // Commands given up on since the last check get the probe bound to
        // be answered (a card slow for a moment catches up); older ones
        // were waited for already.
        let fresh = self.abandoned_total != self.abandoned_checked;
        self.abandoned_checked = self.abandoned_total;
        let mut unanswered = 0;
        if self.abandoned > 0 {
            let until = Instant::now() + if fresh { probe } else { Duration::ZERO };
            loop {
                match self.check_abandoned() {
                    Ok(()) => break,
                    Err(CardError::Unanswered { pending }) if Instant::now() >= until => {
                        unanswered = pending;
                        break;
                    }
                    Err(CardError::Unanswered { .. }) => std::thread::sleep(Duration::from_millis(2)),
                    Err(e) => return Err(e),
                }
            }
        }
        if unanswered > 0 {
            // Frozen (no heartbeat either), or slow: the heartbeat goes on
            // and the link answers, only the mailbox is behind.
            if stale {
                return Err(stalled());
            }
        } else if stale || fresh {
            // The card must show it takes commands: a late heartbeat with
            // an answer is late, without one it is a stall.
            let echo = self.with_command_timeout(probe, |c| c.echo(0x6865_616c_7468, b"health"));
            if let Err(e) = echo {
                return Err(if stale { stalled() } else { e });
            }
        }
        Ok(HealthReport {
            heartbeat: s.heartbeat,
            period_ms: s.heartbeat_period_ms,
            health: s.health,
            since_beat: since,
            late_beat: stale,
            unanswered,
        })
    }

    /// Note the heartbeat just read; returns the time since it last moved.
    pub(super) fn note_heartbeat(&mut self, heartbeat: u64) -> Duration {
        let now = Instant::now();
        if heartbeat != self.last_beat {
            self.last_beat = heartbeat;
            self.last_beat_at = now;
        }
        now.duration_since(self.last_beat_at)
    }

    /// Whether something since the last health check says the card may be
    /// slow or silent (a command given up on, the link broken): the caller
    /// should check its health now rather than at the next period.
    pub fn in_doubt(&self) -> bool {
        self.abandoned_total != self.abandoned_checked || self.t.link_state().is_err()
    }

    /// Bound each later link exchange by `timeout` (a reconnect opens with
    /// the short probe bound, then works with the command timeout).
    pub fn set_link_timeout(&mut self, timeout: Duration) {
        self.t.set_timeout(timeout);
    }

    /// End the link now: later calls fail with `LinkBroken`, and the card
    /// can take another host connection.
    pub fn close(&mut self, why: &str) {
        self.t.close(why.to_string());
    }

    /// The heartbeat as last seen (a restarted card starts counting again).
    pub fn last_heartbeat(&self) -> u64 {
        self.last_beat
    }
}

/// Read BAR0 in one access and validate it as a unit.
pub fn read_registers(t: &mut dyn Transport) -> Result<RegisterSnapshot> {
    let mut buf = [0u8; abi::BAR0_SNAPSHOT_LEN];
    t.read(BAR0_INDEX, 0, &mut buf)?;
    RegisterSnapshot::decode(&buf)
}
