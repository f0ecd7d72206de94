//! Reading a whole per-CPU hash map in a few system calls
//! (`BPF_MAP_LOOKUP_BATCH`) instead of one lookup per key: how the
//! governor sees how full the per-cgroup map is (listing its keys one by
//! one is a system call each). The tick reads VMs' counters in place
//! instead (vmstats.rs): even batched, the kernel copies each entry at
//! ~300 ns. The map is opened from its pin, so this needs nothing from the
//! loaded object. aya has no batch operations; the syscall is made here
//! with its documented `union bpf_attr` layout.

use std::hash::Hash;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use foldhash::{HashMap, HashMapExt};
use governor_common::{maps, CgroupStats};

use super::TelemetryError;

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

/// The per-cgroup counter map, opened from its pin.
pub(super) struct BatchReader {
    cgroups: (OwnedFd, PathBuf),
    /// The values buffer of a batch (CHUNK x value slot x CPUs, ~600 KiB
    /// on 2 CPUs), kept: a fresh one every read is mapped and faulted in
    /// afresh by the allocator.
    values: std::cell::RefCell<Vec<u8>>,
    /// Possible CPUs: a per-CPU value has one slot per possible CPU.
    cpus: usize,
}

impl BatchReader {
    pub fn open(pin_dir: &Path) -> Result<BatchReader, TelemetryError> {
        let path = pin_dir.join(maps::CGROUPS);
        let io = |source| TelemetryError::Io { op: "open pinned map", path: path.clone(), source };
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
        let mut attr = ObjGetAttr { pathname: c.as_ptr() as u64, ..ObjGetAttr::default() };
        let fd = bpf(BPF_OBJ_GET, &mut attr).map_err(io)?;
        // SAFETY: a new fd from BPF_OBJ_GET that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(BatchReader { cgroups: (fd, path), values: Default::default(), cpus: super::possible_cpus()? })
    }

    /// Every cgroup's own counters (not those counted in VM slots), summed
    /// over CPUs.
    pub fn cgroups(&self) -> Result<HashMap<u64, CgroupStats>, TelemetryError> {
        read_all(&self.cgroups, self.cpus, &self.values, |a: &mut CgroupStats, v| a.add(v))
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
