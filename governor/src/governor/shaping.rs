//! The HTB classes behind `shape` limits: traffic to a VM is shaped on each
//! of its host-side interfaces (one HTB root per interface, the VM's class
//! under it); traffic from a VM is redirected by the tc program to one IFB
//! device with a class per VM, because only egress can be shaped.

use super::{Governor, GovernorError};
use crate::qos::{Direction, Limit};
use crate::shape::{Leaf, ShapeError, Shaper};
use crate::telemetry::Telemetry;

/// HTB handle major of the qdiscs the governor creates (`7a:`), so they are
/// recognisable in `tc qdisc show`.
pub const HTB_MAJOR: u16 = 0x7a;

/// Queue of a shaped VM's class: 5 ms at the rate, but at least four
/// segments and [`MIN_QUEUE_FRAMES`] full frames; GSO packets split into
/// segments of 1 ms at the rate as they enter ([`gso_cap`]). Measured at
/// 100 Mbit/s with another namespace's TCP flow forwarded into the VM (its
/// sender's GSO size, not ours): ping p99 12.7 ms with a 128 KiB FIFO that
/// must hold whole 64 KiB packets, 5.3 ms with this leaf, tbf alone 17.8 ms,
/// goodput 98.6 Mbit/s throughout.
fn leaf(limit: &Limit) -> Leaf {
    let segment = gso_cap(limit.rate_bps);
    let five_ms = limit.rate_bps / 8 / 200;
    let floor = (4 * u64::from(segment)).max(MIN_QUEUE_FRAMES * FRAME_BYTES);
    let limit_bytes = u32::try_from(five_ms.max(floor)).unwrap_or(u32::MAX);
    Leaf { limit_bytes, segment_bytes: segment, class_rate_bps: limit.rate_bps }
}

/// TCP loses about 1 / (0.75 W^2) of its packets to a full tail-drop queue
/// when its window W is a few dozen packets, and each loss is resent over
/// the same shaped rate. 5 ms holds only 4 frames at 10 Mbit/s: W ~ 8, ~1%
/// of the rate went to retransmits and goodput fell under 95% of it (the
/// ceiling is 95.6%: 1448 of 1514 bytes). 32 frames (48 KiB, 39 ms at 10
/// Mbit/s) keep retransmits near 0.1%; from 78 Mbit/s up, 5 ms holds more.
const MIN_QUEUE_FRAMES: u64 = 32;
/// A full Ethernet frame at the common 1500-byte MTU.
const FRAME_BYTES: u64 = 1514;

/// The largest GSO packet for an interface shaped at `rate_bps`: one that
/// takes at most 1 ms on the wire at that rate, which is what tbf does in
/// effect (it splits a GSO packet larger than its burst). HTB sends a GSO
/// packet whole: at 100 Mbit/s a 64 KiB one holds every packet behind it
/// for 5.2 ms, and TCP's small-queue limit grows with the GSO size, so the
/// standing queue shrinks with it too. At least two full frames; at most
/// the kernel's 64 KiB default (fast rates are not capped).
pub fn gso_cap(rate_bps: u64) -> u32 {
    (rate_bps / 8 / 1000).clamp(2 * 1514, 65_536) as u32
}

fn burst(limit: &Limit) -> u32 {
    u32::try_from(limit.burst_bytes).unwrap_or(u32::MAX)
}

/// Log a best-effort teardown step that failed.
fn logged(what: &str, vm: &str, r: Result<(), ShapeError>) {
    if let Err(e) = r {
        tracing::warn!(vm, "{what}: {e}");
    }
}

impl<T: Telemetry, S: Shaper> Governor<T, S> {
    /// Create or change the VM's HTB class for this direction. Returns the
    /// ifindex the tc program redirects to (0 for none). What this call
    /// created is removed again if a later step fails.
    pub(super) fn shape_setup(&mut self, i: usize, dir: Direction, limit: &Limit) -> Result<u32, GovernorError> {
        let vm = self.vms[i].name().to_string();
        let minor = self.vms[i].class_minor();
        let shape_err = |source: ShapeError| GovernorError::Shape { vm: vm.clone(), direction: dir.as_str(), source };
        match dir {
            Direction::Egress => {
                let (ifb, created) = match self.ifb {
                    Some(ifb) => (ifb, false),
                    None => (self.make_ifb().map_err(&shape_err)?, true),
                };
                let r = self
                    .shaper
                    .set_class(ifb, HTB_MAJOR, minor, limit.rate_bps, burst(limit))
                    .and_then(|_| self.shaper.set_leaf(ifb, HTB_MAJOR, minor, leaf(limit)));
                if let Err(e) = r {
                    if created {
                        logged("removing the IFB device after a failed setup", &vm, self.shaper.delete_link(ifb));
                    }
                    return Err(shape_err(e));
                }
                self.ifb = Some(ifb);
                Ok(ifb)
            }
            Direction::Ingress => {
                let had_class = self.vms[i].shaped(dir);
                let mut done = Vec::new();
                for ifindex in self.vms[i].interfaces.iter().map(|i| i.ifindex).collect::<Vec<_>>() {
                    let r = if had_class { Ok(()) } else { self.shaper.add_htb(ifindex, HTB_MAJOR) }
                        .and_then(|_| self.shaper.set_class(ifindex, HTB_MAJOR, minor, limit.rate_bps, burst(limit)))
                        .and_then(|_| self.shaper.set_leaf(ifindex, HTB_MAJOR, minor, leaf(limit)));
                    if let Err(e) = r {
                        if !had_class {
                            for d in done.iter().chain(std::iter::once(&ifindex)) {
                                logged("removing a root qdisc after a failed setup", &vm, self.shaper.delete_root(*d));
                            }
                        }
                        return Err(shape_err(e));
                    }
                    done.push(ifindex);
                }
                for ifindex in done {
                    self.cap_gso(&vm, ifindex, limit.rate_bps);
                }
                Ok(0)
            }
        }
    }

    /// The IFB device with its HTB root. One left by a governor that died
    /// is replaced (the daemon holds a lock on the name: it is ours).
    fn make_ifb(&mut self) -> Result<u32, ShapeError> {
        let ifb = match self.shaper.add_ifb(&self.ifb_name) {
            Err(ShapeError::Exists { .. }) => {
                let stale = self.shaper.link_index(&self.ifb_name)?;
                self.shaper.delete_link(stale)?;
                tracing::warn!(ifb = %self.ifb_name, "replaced a stale IFB device");
                self.shaper.add_ifb(&self.ifb_name)?
            }
            r => r?,
        };
        if let Err(e) = self.shaper.add_htb(ifb, HTB_MAJOR) {
            logged("removing the IFB device after a failed setup", &self.ifb_name, self.shaper.delete_link(ifb));
            return Err(e);
        }
        Ok(ifb)
    }

    /// Shape traffic to the VM on one (re-created) interface.
    pub(super) fn shape_interface(&mut self, i: usize, ifindex: u32, l: &Limit) {
        let minor = self.vms[i].class_minor();
        let r = self
            .shaper
            .add_htb(ifindex, HTB_MAJOR)
            .and_then(|_| self.shaper.set_class(ifindex, HTB_MAJOR, minor, l.rate_bps, burst(l)))
            .and_then(|_| self.shaper.set_leaf(ifindex, HTB_MAJOR, minor, leaf(l)));
        let vm = self.vms[i].name().to_string();
        logged("re-applying shaping", &vm, r);
        // A new interface: its own default is what a teardown restores.
        self.gso_before.remove(&ifindex);
        self.cap_gso(&vm, ifindex, l.rate_bps);
    }

    /// Cap the interface's GSO size for shaping at `rate_bps` (see
    /// [`gso_cap`]), remembering what it was. Best effort: shaping works
    /// without it, with more latency.
    fn cap_gso(&mut self, vm: &str, ifindex: u32, rate_bps: u64) {
        if !self.gso_before.contains_key(&ifindex) {
            match self.shaper.gso_max_size(ifindex) {
                Ok(g) => {
                    self.gso_before.insert(ifindex, g);
                }
                Err(e) => {
                    tracing::warn!(vm, ifindex, "reading gso_max_size, not capping it: {e}");
                    return;
                }
            }
        }
        let before = self.gso_before.get(&ifindex).copied().unwrap_or(65_536);
        logged("capping gso_max_size", vm, self.shaper.set_gso_max_size(ifindex, gso_cap(rate_bps).min(before)));
    }

    /// Give an interface its GSO size back.
    fn restore_gso(&mut self, vm: &str, ifindex: u32) {
        if let Some(g) = self.gso_before.remove(&ifindex) {
            match self.shaper.set_gso_max_size(ifindex, g) {
                Ok(()) | Err(ShapeError::NoDevice { .. }) => {}
                Err(e) => tracing::warn!(vm, ifindex, "restoring gso_max_size: {e}"),
            }
        }
    }

    /// Remove the VM's HTB class for this direction (and the qdisc or IFB
    /// when nothing else uses it). Best effort: an interface that is gone
    /// took its qdisc with it.
    pub(super) fn shape_teardown(&mut self, i: usize, dir: Direction) {
        let minor = self.vms[i].class_minor();
        let vm = self.vms[i].name().to_string();
        match dir {
            Direction::Egress => {
                let Some(ifb) = self.ifb else { return };
                logged("removing the VM's class on the IFB", &vm, self.shaper.delete_class(ifb, HTB_MAJOR, minor));
                let others = self.vms.iter().enumerate().any(|(j, v)| j != i && v.shaped(Direction::Egress));
                if !others {
                    self.remove_ifb();
                }
            }
            Direction::Ingress => {
                for ifindex in self.vms[i].interfaces.iter().map(|i| i.ifindex).collect::<Vec<_>>() {
                    // Each interface belongs to one VM: its root is ours alone.
                    match self.shaper.delete_root(ifindex) {
                        Ok(()) | Err(ShapeError::NoDevice { .. }) => {}
                        Err(e) => tracing::warn!(vm, ifindex, "removing the root qdisc: {e}"),
                    }
                    self.restore_gso(&vm, ifindex);
                }
            }
        }
    }

    /// Remove the IFB device (with its classes), if there is one.
    pub(super) fn remove_ifb(&mut self) {
        if let Some(ifb) = self.ifb.take() {
            logged("removing the IFB device", &self.ifb_name.clone(), self.shaper.delete_link(ifb));
        }
    }
}
