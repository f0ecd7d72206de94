//! The VM counters (`VM_STATS`) read in place, and what each cgroup and
//! interface counted before its events went to its VM.
//!
//! `VM_STATS` is a `BPF_F_MMAPABLE` array: the governor maps it once and
//! sums a VM's per-CPU copies with plain loads each tick. Copying the same
//! counters out of a per-CPU hash costs ~300 ns per entry in the kernel
//! (`BPF_MAP_LOOKUP_BATCH`, measured: whatever the map type), which at
//! 1,000 VMs was ~1.8 ms of a 3.8 ms tick; the sum in place is ~0.03 ms.
//! aya maps only ring buffers, so the mapping is made here with mmap(2).

use std::collections::HashMap;
use std::hash::Hash;
use std::os::fd::AsRawFd;

use governor_common::{CgroupStats, NetStats, VmCounters};

/// `VM_STATS`, mapped shared and writable: the programs write the
/// counters, the governor reads them and writes only each slot's owner
/// and the zeroes of a slot it claims.
pub(super) struct VmStats {
    base: *mut VmCounters,
    len: usize,
    cpus: usize,
    slots: usize,
}

// SAFETY: the mapping is shared memory that the kernel writes on every
// CPU anyway; every access here is a volatile load or store of a u64
// field, and the mapping lives until `drop`.
unsafe impl Send for VmStats {}
unsafe impl Sync for VmStats {}

/// u64 words of a `VmCounters` (all its fields are u64).
const WORDS: usize = std::mem::size_of::<VmCounters>() / 8;
/// Words that are counters (CPU and network), before `owner`.
const COUNTER_WORDS: usize = std::mem::offset_of!(VmCounters, owner) / 8;

impl VmStats {
    /// Map the array of `slots` x `cpus` values behind `fd`.
    pub fn map(fd: &impl AsRawFd, slots: usize, cpus: usize) -> std::io::Result<VmStats> {
        let len = slots * cpus * std::mem::size_of::<VmCounters>();
        // SAFETY: a new shared mapping of the map's fd; the kernel checks
        // the length against the map's size (an array map of
        // BPF_F_MMAPABLE lays its values out contiguously, each 8-byte
        // aligned, from offset 0: 384 bytes each here).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(VmStats { base: p.cast(), len, cpus, slots })
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    /// The words of one CPU's copy of a slot (None past the array).
    fn words(&self, slot: u32, cpu: usize) -> Option<*mut u64> {
        let slot = slot as usize;
        (slot < self.slots && cpu < self.cpus).then(|| {
            // SAFETY: in bounds of the mapping (checked above).
            unsafe { self.base.add(slot * self.cpus + cpu).cast::<u64>() }
        })
    }

    /// A slot's counters summed over CPUs (zero past the array).
    pub fn sum(&self, slot: u32) -> VmCounters {
        let mut acc = [0u64; WORDS];
        for cpu in 0..self.cpus {
            let Some(w) = self.words(slot, cpu) else { break };
            for (i, a) in acc.iter_mut().enumerate().take(COUNTER_WORDS) {
                // SAFETY: an aligned u64 of the mapping (a counter the
                // programs add to with plain stores: the load never tears).
                *a += unsafe { w.add(i).read_volatile() };
            }
        }
        // SAFETY: VmCounters is repr(C), all u64, exactly WORDS of them.
        unsafe { std::mem::transmute::<[u64; WORDS], VmCounters>(acc) }
    }

    /// The VM (its own cgroup's id) that holds a slot; 0: free.
    pub fn owner(&self, slot: u32) -> u64 {
        match self.words(slot, 0) {
            // SAFETY: the owner word of CPU 0's copy.
            Some(w) => unsafe { w.add(COUNTER_WORDS).read_volatile() },
            None => 0,
        }
    }

    /// Give a free slot to a VM: zero every CPU's copy (what a VM before
    /// left there), then write the owner. Nothing counts into the slot yet:
    /// no cgroup or interface names it until the caller says so.
    pub fn claim(&self, slot: u32, owner: u64) {
        for cpu in 0..self.cpus {
            let Some(w) = self.words(slot, cpu) else { return };
            for i in 0..WORDS {
                // SAFETY: in bounds of this copy.
                unsafe { w.add(i).write_volatile(0) };
            }
        }
        self.set_owner(slot, owner);
    }

    pub fn set_owner(&self, slot: u32, owner: u64) {
        if let Some(w) = self.words(slot, 0) {
            // SAFETY: the owner word of CPU 0's copy.
            unsafe { w.add(COUNTER_WORDS).write_volatile(owner) };
        }
    }
}

impl Drop for VmStats {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        if unsafe { libc::munmap(self.base.cast(), self.len) } != 0 {
            tracing::warn!("unmapping VM_STATS: {}", std::io::Error::last_os_error());
        }
    }
}

/// What each cgroup (or interface) counted in its own map entry before
/// its events went to its VM's slot: a VM's total is its slot plus these.
///
/// Read when first asked for, and once more the next time: a program that
/// looked the cgroup's slot up just before it was written may still add
/// to the old entry for a moment (an event in flight on another CPU);
/// the second read, a tick later, has it. After that the entry no longer
/// moves, and is never read again.
pub(super) struct Bases<K, V> {
    seen: HashMap<K, (V, bool)>,
}

impl<K: Copy + Eq + Hash, V: Copy> Bases<K, V> {
    pub fn new() -> Bases<K, V> {
        Bases { seen: HashMap::new() }
    }

    /// The base of `key`, and whether it is settled (will not be read
    /// again).
    pub fn get<E>(&mut self, key: K, read: impl FnOnce(K) -> Result<V, E>) -> Result<(V, bool), E> {
        match self.seen.get(&key) {
            Some((v, true)) => Ok((*v, true)),
            seen => {
                let settled = seen.is_some();
                let v = read(key)?;
                self.seen.insert(key, (v, settled));
                Ok((v, settled))
            }
        }
    }

    /// Forget a key (an interface index that no longer names the VM's
    /// interface): asked again, it is read again.
    pub fn forget(&mut self, key: K) {
        self.seen.remove(&key);
    }
}

/// Each VM's bases added up, by slot, once all of them are settled: the
/// tick then reads nothing per cgroup or interface, only the slot (a
/// lookup per cgroup in `Bases` is a cache miss or two each, ~0.5 ms a
/// tick at 1,000 VMs). An entry holds for as long as the VM's keys are
/// the same, told by `keys_signature`.
pub(super) struct SlotBases {
    by_slot: Vec<Option<(u64, CgroupStats, NetStats)>>,
}

impl SlotBases {
    pub fn new() -> SlotBases {
        SlotBases { by_slot: Vec::new() }
    }

    pub fn get(&self, slot: u32, signature: u64) -> Option<(&CgroupStats, &NetStats)> {
        match self.by_slot.get(slot as usize)? {
            Some((sig, cpu, net)) if *sig == signature => Some((cpu, net)),
            _ => None,
        }
    }

    pub fn set(&mut self, slot: u32, signature: u64, cpu: CgroupStats, net: NetStats) {
        let i = slot as usize;
        if self.by_slot.len() <= i {
            self.by_slot.resize(i + 1, None);
        }
        self.by_slot[i] = Some((signature, cpu, net));
    }

    pub fn clear(&mut self, slot: u32) {
        if let Some(e) = self.by_slot.get_mut(slot as usize) {
            *e = None;
        }
    }
}

/// What tells one set of a VM's keys from another without reading its
/// cgroup ids (another cache miss per VM): their number (a VM's cgroups
/// are only ever added to) and its interfaces' indexes (one that is
/// re-created comes back with another).
pub(super) fn keys_signature(cgroups: usize, ifindexes: &[u32]) -> u64 {
    ifindexes.iter().fold((cgroups as u64) << 32 | ifindexes.len() as u64, |h, i| {
        (h.rotate_left(17) ^ u64::from(*i)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_is_read_twice_then_kept() {
        let mut b: Bases<u64, u64> = Bases::new();
        let reads = std::cell::Cell::new(0);
        let read = |v: u64| {
            let reads = &reads;
            move |_k: u64| -> Result<u64, ()> {
                reads.set(reads.get() + 1);
                Ok(v)
            }
        };
        assert_eq!(b.get(7, read(10)), Ok((10, false)));
        assert_eq!(b.get(7, read(12)), Ok((12, true)), "the second read has the event in flight");
        assert_eq!(b.get(7, read(99)), Ok((12, true)), "settled: not read again");
        assert_eq!(reads.get(), 2);
        b.forget(7);
        assert_eq!(b.get(7, read(99)), Ok((99, false)), "forgotten: read afresh");
    }

    #[test]
    fn slot_bases_hold_while_the_keys_are_the_same() {
        let mut b = SlotBases::new();
        let sig = keys_signature(1, &[10]);
        assert!(b.get(3, sig).is_none());
        let cpu = CgroupStats { on_cpu_ns: 5, ..Default::default() };
        b.set(3, sig, cpu, NetStats::default());
        assert_eq!(b.get(3, sig).map(|(c, _)| c.on_cpu_ns), Some(5));
        for other in [keys_signature(2, &[10]), keys_signature(1, &[11]), keys_signature(1, &[10, 12])] {
            assert_ne!(other, sig);
            assert!(b.get(3, other).is_none(), "a new child or a re-created interface: read again");
        }
        b.clear(3);
        assert!(b.get(3, sig).is_none());
        assert!(b.get(900, sig).is_none());
    }

    #[test]
    fn a_failed_read_is_tried_again() {
        let mut b: Bases<u32, u64> = Bases::new();
        assert_eq!(b.get(1, |_| Err("gone")), Err("gone"));
        assert_eq!(b.get(1, |_| Ok::<u64, &str>(5)), Ok((5, false)));
        assert_eq!(b.get(1, |_| Ok::<u64, &str>(6)), Ok((6, true)), "the first good read is not yet settled");
        assert_eq!(b.get(1, |_| Ok::<u64, &str>(7)), Ok((6, true)));
    }

    #[test]
    fn counters_are_summed_in_place_over_cpus() {
        // An anonymous mapping stands in for the map's (same layout).
        let len = 3 * 2 * std::mem::size_of::<VmCounters>();
        // SAFETY: a private anonymous mapping, unmapped by VmStats::drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let m = VmStats { base: p.cast(), len, cpus: 2, slots: 3 };
        // SAFETY: in bounds: slot 1, CPUs 0 and 1.
        unsafe {
            let c0 = &mut *m.base.add(2);
            c0.cpu.on_cpu_ns = 5;
            c0.cpu.runq_hist[31] = 1;
            c0.net.tx_bytes = 100;
            let c1 = &mut *m.base.add(3);
            c1.cpu.on_cpu_ns = 7;
            c1.net.tx_bytes = 1;
            c1.owner = 1234; // only CPU 0's owner counts
        }
        m.set_owner(1, 42);
        let s = m.sum(1);
        assert_eq!((s.cpu.on_cpu_ns, s.cpu.runq_hist[31], s.net.tx_bytes), (12, 1, 101));
        assert_eq!(s.owner, 0, "the sum carries counters only");
        assert_eq!((m.owner(1), m.owner(0), m.owner(9)), (42, 0, 0));
        assert_eq!(m.sum(9), VmCounters::default(), "past the array: nothing");
        m.claim(1, 77);
        assert_eq!((m.sum(1), m.owner(1)), (VmCounters::default(), 77), "a claimed slot starts from zero");
    }
}
