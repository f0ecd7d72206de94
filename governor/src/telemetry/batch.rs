//! Reading a whole per-CPU counter map in a few system calls
//! (`BPF_MAP_LOOKUP_BATCH`) instead of one lookup per key: at 1,000 VMs a
//! tick otherwise makes ~2,000 `bpf(2)` calls for the cgroup and interface
//! counters, most of its cost. The maps are opened from their pins (the
//! loader pinned them), so this needs nothing from the loaded object. aya
//! has no batch operations; the syscall is made here with its documented
//! `union bpf_attr` layout.

use std::hash::Hash;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use foldhash::{HashMap, HashMapExt};
use governor_common::{maps, CgroupStats, CpuState, NetEntry, NetStats};

use super::TelemetryError;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Elements asked for per call.
const CHUNK: usize = 1024;

/// `union bpf_attr` for BPF_OBJ_GET.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` for BPF_MAP_LOOKUP_ELEM.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> std::io::Result<i64> {
    // SAFETY: bpf(2) reads and writes `attr` (its size given), and the
    // buffers it points to, which the callers size for `count` elements.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, std::mem::size_of::<A>()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The cgroup and interface counter maps, opened from their pins.
pub struct BatchReader {
    cgroups: (OwnedFd, PathBuf),
    net: (OwnedFd, PathBuf),
    cpu_state: (OwnedFd, PathBuf),
    /// The values buffer of a batch (CHUNK x value slot x CPUs, ~600 KiB
    /// for the cgroup map on 2 CPUs), kept: a fresh one every read is
    /// mapped and faulted in afresh by the allocator.
    values: std::cell::RefCell<Vec<u8>>,
    /// Possible CPUs: a per-CPU value has one slot per possible CPU.
    cpus: usize,
}

impl BatchReader {
    pub fn open(pin_dir: &Path) -> Result<BatchReader, TelemetryError> {
        let open = |name: &str| -> Result<(OwnedFd, PathBuf), TelemetryError> {
            let path = pin_dir.join(name);
            let io = |source| TelemetryError::Io { op: "open pinned map", path: path.clone(), source };
            let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
                .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
            let mut attr = ObjGetAttr { pathname: c.as_ptr() as u64, ..ObjGetAttr::default() };
            let fd = bpf(BPF_OBJ_GET, &mut attr).map_err(io)?;
            // SAFETY: a new fd from BPF_OBJ_GET that nothing else owns.
            Ok((unsafe { OwnedFd::from_raw_fd(fd as i32) }, path))
        };
        let cpus = super::possible_cpus()?;
        Ok(BatchReader {
            cgroups: open(maps::CGROUPS)?,
            net: open(maps::NET)?,
            cpu_state: open(maps::CPU_STATE)?,
            values: Default::default(),
            cpus,
        })
    }

    /// Every cgroup's counters, summed over CPUs, with what each CPU has
    /// gathered and not yet added (read after, see `CpuState::pending`).
    pub fn cgroups(&self) -> Result<HashMap<u64, CgroupStats>, TelemetryError> {
        let mut all = read_all(&self.cgroups, self.cpus, &self.values, |a: &mut CgroupStats, v| a.add(v))?;
        for state in self.cpu_states()? {
            if let Some((cg, acc)) = state.pending() {
                all.entry(cg).or_default().add(acc);
            }
        }
        Ok(all)
    }

    /// Each CPU's scheduler state (the one slot of the per-CPU array).
    fn cpu_states(&self) -> Result<Vec<CpuState>, TelemetryError> {
        let map = &self.cpu_state;
        let slot = std::mem::size_of::<CpuState>().div_ceil(8) * 8;
        let mut values = vec![0u8; slot * self.cpus];
        let key = 0u32;
        let mut attr = ElemAttr {
            map_fd: map.0.as_raw_fd() as u32,
            key: &key as *const u32 as u64,
            value: values.as_mut_ptr() as u64,
            ..ElemAttr::default()
        };
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).map_err(|source| TelemetryError::Io {
            op: "lookup",
            path: map.1.clone(),
            source,
        })?;
        Ok(values
            .chunks_exact(slot)
            // SAFETY: CpuState is plain repr(C) integers (any bytes are a
            // valid value) and each chunk holds at least its size.
            .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<CpuState>()) })
            .collect())
    }

    /// Every interface's counters, summed over CPUs.
    pub fn net(&self) -> Result<HashMap<u32, NetStats>, TelemetryError> {
        let all = read_all(&self.net, self.cpus, &self.values, |a: &mut NetEntry, v| a.stats.add(&v.stats))?;
        Ok(all.into_iter().map(|(k, v)| (k, v.stats)).collect())
    }
}

/// All of a per-CPU hash map: keys `K`, values `V` (plain `repr(C)`
/// integers, so any bytes are a valid value) summed over CPUs with `add`.
fn read_all<K, V>(
    map: &(OwnedFd, PathBuf),
    cpus: usize,
    values: &std::cell::RefCell<Vec<u8>>,
    add: impl Fn(&mut V, &V),
) -> Result<HashMap<K, V>, TelemetryError>
where
    K: Copy + Eq + Hash + Default,
    V: Copy + Default,
{
    let io = |source| TelemetryError::Io { op: "batch lookup", path: map.1.clone(), source };
    // The kernel copies per-CPU values in 8-byte aligned slots.
    let slot = std::mem::size_of::<V>().div_ceil(8) * 8;
    let mut keys = vec![K::default(); CHUNK];
    let mut values = values.borrow_mut();
    values.resize(CHUNK * slot * cpus, 0);
    // Hash maps' batch cursor is a bucket index (u32).
    let (mut cursor, mut next) = (0u32, 0u32);
    let mut out = HashMap::with_capacity(CHUNK);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &mut cursor as *mut u32 as u64 },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: map.0.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        // ENOENT: the last chunk (possibly with elements); anything else fails.
        let done = match r {
            Ok(_) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(io(e)),
        };
        let n = (attr.count as usize).min(CHUNK);
        for (i, k) in keys.iter().take(n).enumerate() {
            let mut sum = V::default();
            for c in 0..cpus {
                let off = (i * cpus + c) * slot;
                let Some(bytes) = values.get(off..off + std::mem::size_of::<V>()) else { break };
                // SAFETY: `bytes` holds size_of::<V>() bytes the kernel
                // wrote; V is plain integers, read unaligned.
                let v: V = unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const V) };
                add(&mut sum, &v);
            }
            out.insert(*k, sum);
        }
        if done {
            return Ok(out);
        }
        cursor = next;
        first = false;
    }
}
