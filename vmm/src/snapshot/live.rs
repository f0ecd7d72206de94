//! Snapshots of a *running* guest for pre-copy: the base and the rounds'
//! diffs, in the same byte format as the paused ones. The vCPU may write
//! the memory while it is read, so no `&[u8]` is made over it: pages are
//! copied with volatile reads (vm-memory's `VolatileSlice`, as Cloud
//! Hypervisor's pre-copy does) through a bounce buffer. A page written
//! during the copy may be torn; the dirty log recorded it, and the next
//! diff (the last one taken paused) carries it whole.

use std::io::Write;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::{check_runs, host_ram, mark_file_data, prepare, runs, VmState, FLAG_DIFF, FLAG_SPARSE, PAGE};
use crate::error::{Error, Result, SnapshotError};

/// [`write_stream`] of a running guest's memory (pre-copy's base): the
/// same format; see `Vm::snapshot_live_to` for why torn pages are fine.
pub fn write_stream_live<W: Write>(w: W, mut st: VmState, mem: &GuestMemoryMmap) -> Result<u64> {
    // The vCPU may write the memory while it is read here, so no `&[u8]`
    // over it is made: pages are copied with volatile reads (vm-memory's
    // `VolatileSlice`, as Cloud Hypervisor's pre-copy does) into a bounce
    // buffer. A page written meanwhile may be torn; the diff re-sends it.
    let host = host_ram(mem)?;
    let size = st.mem_size as usize;
    let pages = {
        let mut v = vec![0u8; size.div_ceil(PAGE)];
        // SAFETY: mincore only reads the page tables of this mapping of
        // `size` bytes; it does not touch the memory.
        let rc = unsafe { libc::mincore(host.cast(), size, v.as_mut_ptr()) };
        if rc != 0 {
            vec![true; v.len()]
        } else {
            let mut p: Vec<bool> = v.iter().map(|b| b & 1 == 1).collect();
            if let Some(fo) = mem.iter().next().and_then(|r| r.file_offset()) {
                mark_file_data(fo.file(), fo.start(), &mut p);
            }
            p
        }
    };
    st.diff_runs = Some(runs(&pages));
    write_runs_volatile(w, &st, mem, FLAG_SPARSE)
}

/// A diff of a running guest's memory (pre-copy's later rounds): the pages
/// in `st.diff_runs`, copied with volatile reads as [`write_stream_live`].
pub fn write_diff_live<W: Write>(w: W, st: &VmState, mem: &GuestMemoryMmap) -> Result<u64> {
    write_runs_volatile(w, st, mem, FLAG_DIFF)
}

/// [`write_runs`] for memory the vCPU may be writing: no slice over it,
/// volatile copies through a bounce buffer.
fn write_runs_volatile<W: Write>(mut w: W, st: &VmState, mem: &GuestMemoryMmap, flags: u32) -> Result<u64> {
    let runs = st.diff_runs.as_deref().ok_or(SnapshotError::MissingRuns("live"))?;
    let data = check_runs(runs, st.mem_size)?;
    let (hd, json) = prepare(st, flags)?;
    let pad = vec![0u8; hd.padding()? as usize];
    let io = Error::io("snapshot stream");
    w.write_all(&hd.encode()).map_err(io)?;
    let io = Error::io("snapshot stream");
    w.write_all(&json).and_then(|()| w.write_all(&pad)).map_err(io)?;
    let mut bounce = vec![0u8; 1 << 20];
    for &(first, count) in runs {
        let mut at = first * PAGE as u64;
        let end = (first + count) * PAGE as u64;
        while at < end {
            let n = ((end - at) as usize).min(bounce.len());
            let slice = mem
                .get_slice(GuestAddress(at), n)
                .map_err(|e| Error::io("guest memory")(std::io::Error::other(e.to_string())))?;
            let got = slice.copy_to(&mut bounce[..n]);
            w.write_all(&bounce[..got]).map_err(Error::io("snapshot stream"))?;
            at += n as u64;
        }
    }
    w.flush().map_err(Error::io("snapshot stream"))?;
    Ok(hd.mem_offset + data)
}
