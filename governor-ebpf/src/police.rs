//! The policer's step on each packet, without a lock: each bucket of a
//! [`Policer`] is one word (its GCRA arrival time, see
//! `governor_common::Bucket`), which every CPU moves with one
//! compare-and-exchange. Under `bpf_spin_lock` the lock was ~45 of the 107
//! ns a policed packet cost (BENCHMARKS.md).
//!
//! `BPF_CMPXCHG` and `BPF_ATOMIC` add need kernel 5.12 or later.

use core::ptr::{addr_of, addr_of_mut, read_volatile};

use governor_common::{conform, Policer};

const NS_PER_S: u64 = 1_000_000_000;

/// Exchanges tried before the packet is judged once more and charged with
/// one atomic add. A failure means another CPU's packet (or user space)
/// moved the word in the few ns since it was read. One: each try is a copy
/// of the judging code (the compiler unrolls the loop), and with
/// three the program grew from 1.4 to 2.0 KB of machine code, which a cold
/// packet pays for in instruction cache misses (cold police +200-300 ns).
/// The race test passes with the add taking over at the first failure.
const CAS_TRIES: usize = 1;

/// Police one packet of `len` bytes, `segs` segments on the wire, at `now`
/// (CLOCK_MONOTONIC ns); true = pass.
///
/// The byte bucket's arrival time is read before the limit's other fields,
/// and its exchange fails if user space replaced the value after that read
/// (a new limit's arrival time differs from the old): the packet is then
/// judged again with the new fields, so one limit's cost is never charged
/// to another limit's bucket. User space replaces the value with one copy
/// (the kernel's copy_map_value); like every field read here, that assumes
/// the copy writes each aligned u64 whole, as x86-64's and arm64's memcpy do.
///
/// The packet bucket (if the limit has a packet rate) is asked first; a
/// packet either bucket drops pays nothing. One the byte bucket admits is
/// then charged to the packet bucket without being judged again, so a
/// packet of another CPU in between can leave that bucket one packet
/// further in debt, which the next packets pay.
///
/// SAFETY: `p` points to a live `QOS` map value.
#[inline(always)]
pub unsafe fn police(p: *mut Policer, len: u64, segs: u64, now: u64) -> bool {
    let b = addr_of_mut!((*p).bucket);
    let tat = addr_of_mut!((*b).tat_ns);
    let pkt_tat = addr_of_mut!((*b).pkt_tat_ns);
    let mut seen = read_volatile(tat);
    for attempt in 0..=CAS_TRIES {
        let rate = read_volatile(addr_of!((*p).rate_bytes_per_s));
        let depth = read_volatile(addr_of!((*b).burst_ns));
        let pkt_cost = read_volatile(addr_of!((*b).pkt_cost_ns)) * segs;
        if pkt_cost != 0 {
            let pkt_depth = read_volatile(addr_of!((*b).pkt_burst_ns));
            if conform(read_volatile(pkt_tat), now, pkt_depth, pkt_cost).is_none() {
                return false;
            }
        }
        let cost = if rate != 0 { len * NS_PER_S / rate } else { 0 };
        let Some(next) = conform(seen, now, depth, cost) else { return false };
        if attempt == CAS_TRIES {
            // Still contended: charge what the exchange would have, from
            // the arrival time last seen (others' charges since then stay;
            // if that time was behind `now`, this pays the gap too, a few
            // ns more, never less).
            atomic_add(tat, next - seen);
        } else {
            let was = cmpxchg(tat, seen, next);
            if was != seen {
                seen = was;
                continue;
            }
        }
        if pkt_cost != 0 {
            charge(pkt_tat, now, pkt_cost);
        }
        return true;
    }
    // Not reached: the last attempt always returns.
    false
}

/// Charge `cost` to a bucket word without judging (GCRA: from the later of
/// its arrival time and now), by exchange, or after `CAS_TRIES` failures by
/// one atomic add as in [`police`].
///
/// SAFETY: `tat` points into a live map value.
#[inline(always)]
unsafe fn charge(tat: *mut u64, now: u64, cost: u64) {
    let mut seen = read_volatile(tat);
    for _ in 0..CAS_TRIES {
        let base = if seen > now { seen } else { now };
        let was = cmpxchg(tat, seen, base.saturating_add(cost));
        if was == seen {
            return;
        }
        seen = was;
    }
    let base = if seen > now { seen } else { now };
    atomic_add(tat, base.saturating_add(cost) - seen);
}

/// BPF_CMPXCHG (64-bit): store `new` at `p` if it holds `old`; returns
/// what `p` held. Written as the instruction itself: core's atomics are
/// not available for the BPF target.
///
/// SAFETY: `p` is a valid, 8-byte aligned pointer into a map value.
#[inline(always)]
unsafe fn cmpxchg(p: *mut u64, old: u64, new: u64) -> u64 {
    let mut r0 = old;
    core::arch::asm!(
        "r0 = cmpxchg_64({p} + 0, r0, {new})",
        p = in(reg) p,
        new = in(reg) new,
        inout("r0") r0,
        options(nostack)
    );
    r0
}

/// BPF_ATOMIC add (64-bit) of `v` at `p`.
///
/// SAFETY: `p` is a valid, 8-byte aligned pointer into a map value.
#[inline(always)]
unsafe fn atomic_add(p: *mut u64, v: u64) {
    core::arch::asm!("lock *(u64 *)({p} + 0) += {v}", p = in(reg) p, v = in(reg) v, options(nostack));
}
