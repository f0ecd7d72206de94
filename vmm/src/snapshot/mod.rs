//! Snapshot format (version 1), one byte stream so it can go to a file or
//! over the card link:
//!
//! ```text
//! offset 0   header, 64 bytes, little endian:
//!            magic "MCVMSNAP", u32 version, u32 flags (0),
//!            u64 state_len, u64 mem_size, u64 mem_offset, zero padding
//! offset 64  state: JSON of `VmState` (vCPU regs/sregs/xsave/xcrs/MSRs/
//!            LAPIC/events/mp_state, the three in-kernel irqchips, the
//!            virtio-mmio console with its queues), state_len bytes
//! mem_offset guest RAM image, mem_size bytes (mem_offset is 4 KiB aligned)
//! ```
//!
//! Files are written sparse (pages the host never backed are holes) and
//! restored by mapping the RAM image MAP_PRIVATE, so restore does not copy
//! guest memory. The header is versioned: a reader refuses other versions.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use kvm_bindings::kvm_irqchip;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

use crate::devices::virtio::ConsoleSnap;
use crate::error::{Error, MemoryError, Result, SnapshotError};

mod live;
use crate::vcpu_state::VcpuState;
pub use live::{write_diff_live, write_stream_live};

pub const MAGIC: [u8; 8] = *b"MCVMSNAP";
pub const VERSION: u32 = 1;
const HEADER_LEN: usize = 64;
const PAGE: usize = 4096;
const CHUNK: usize = 1 << 20;
/// Upper bound on the JSON state, to refuse absurd headers early.
const MAX_STATE: u64 = 16 << 20;
const MAX_MEM: u64 = 3072 << 20;
/// Upper bound on `mem_offset`: the page after the largest state. Writers
/// put RAM at the page after the state; a bound keeps a hostile header from
/// making a stream reader skip (and wait for) exabytes, and keeps every
/// offset sum far from overflowing.
const MAX_MEM_OFFSET: u64 = (HEADER_LEN as u64 + MAX_STATE).next_multiple_of(PAGE as u64);

#[derive(serde::Serialize, serde::Deserialize)]
pub struct VmState {
    pub mem_size: u64,
    pub vcpu: VcpuState,
    pub irqchips: Vec<kvm_irqchip>,
    pub console: ConsoleSnap,
    /// The agent had printed its banner.
    pub ready: bool,
    /// Diff snapshots only: the RAM pages carried, as (first page, count)
    /// runs in ascending order; their bytes follow back to back.
    #[serde(default)]
    pub diff_runs: Option<Vec<(u64, u64)>>,
}

/// Header flag: a diff snapshot (RAM section holds only `diff_runs`).
pub const FLAG_DIFF: u32 = 1;
/// Header flag: a sparse full snapshot (streams): the RAM section holds only
/// the `diff_runs` pages, every other page is zero.
pub const FLAG_SPARSE: u32 = 2;

struct Header {
    flags: u32,
    state_len: u64,
    mem_size: u64,
    mem_offset: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.flags.to_le_bytes());
        h[16..24].copy_from_slice(&self.state_len.to_le_bytes());
        h[24..32].copy_from_slice(&self.mem_size.to_le_bytes());
        h[32..40].copy_from_slice(&self.mem_offset.to_le_bytes());
        h
    }

    fn decode(h: &[u8; HEADER_LEN]) -> std::result::Result<Header, SnapshotError> {
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[o..o + 8]);
            u64::from_le_bytes(b)
        };
        if h[0..8] != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if version != VERSION {
            return Err(SnapshotError::Version { found: version, supported: VERSION });
        }
        let flags = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        if flags & !(FLAG_DIFF | FLAG_SPARSE) != 0 || flags == FLAG_DIFF | FLAG_SPARSE {
            return Err(SnapshotError::Flags(flags));
        }
        let hd = Header { flags, state_len: u64_at(16), mem_size: u64_at(24), mem_offset: u64_at(32) };
        let bad = |field, value, reason| Err(SnapshotError::Header { field, value, reason });
        if hd.state_len > MAX_STATE {
            return bad("state_len", hd.state_len, "above the 16 MiB limit");
        }
        if hd.mem_size == 0 || hd.mem_size > MAX_MEM {
            return bad("mem_size", hd.mem_size, "outside 1 byte..=3 GiB");
        }
        if !hd.mem_size.is_multiple_of(PAGE as u64) {
            return bad("mem_size", hd.mem_size, "not whole 4 KiB pages");
        }
        if !hd.mem_offset.is_multiple_of(PAGE as u64) {
            return bad("mem_offset", hd.mem_offset, "not 4 KiB aligned");
        }
        if hd.mem_offset > MAX_MEM_OFFSET {
            return bad("mem_offset", hd.mem_offset, "past the page after a 16 MiB state");
        }
        hd.padding()?;
        hd.end()?;
        Ok(hd)
    }

    /// Where the state ends: the header plus `state_len`.
    fn state_end(&self) -> std::result::Result<u64, SnapshotError> {
        (HEADER_LEN as u64).checked_add(self.state_len).ok_or(SnapshotError::Header {
            field: "state_len",
            value: self.state_len,
            reason: "overflows the file offsets",
        })
    }

    /// Zero bytes between the state and the RAM image.
    fn padding(&self) -> std::result::Result<u64, SnapshotError> {
        self.mem_offset.checked_sub(self.state_end()?).ok_or(SnapshotError::Header {
            field: "mem_offset",
            value: self.mem_offset,
            reason: "overlaps the header or the state",
        })
    }

    /// Where a full file's RAM image ends: `mem_offset + mem_size`.
    fn end(&self) -> std::result::Result<u64, SnapshotError> {
        self.mem_offset.checked_add(self.mem_size).ok_or(SnapshotError::Header {
            field: "mem_offset",
            value: self.mem_offset,
            reason: "plus mem_size overflows the file offsets",
        })
    }
}

fn prepare(st: &VmState, flags: u32) -> Result<(Header, Vec<u8>)> {
    let json = serde_json::to_vec(st).map_err(SnapshotError::Encode)?;
    let mem_offset = (HEADER_LEN + json.len()).div_ceil(PAGE) * PAGE;
    Ok((Header { flags, state_len: json.len() as u64, mem_size: st.mem_size, mem_offset: mem_offset as u64 }, json))
}

/// Host address of guest RAM (at guest address 0).
fn host_ram(mem: &GuestMemoryMmap) -> Result<*mut u8> {
    mem.get_host_address(GuestAddress(0))
        .map_err(|source| MemoryError::Access { what: "host address of RAM", addr: 0, source }.into())
}

/// Host view of guest RAM (one region starting at 0).
fn ram(mem: &GuestMemoryMmap, size: u64) -> Result<&[u8]> {
    let host = host_ram(mem)?;
    let regions = mem.iter().count();
    if regions != 1 {
        return Err(MemoryError::Regions(regions).into());
    }
    // SAFETY: the region maps `size` bytes; the vCPU is paused, so nothing
    // writes to it while we read.
    Ok(unsafe { std::slice::from_raw_parts(host, size as usize) })
}

/// Write a full snapshot to a stream, sparse: only pages that may hold data
/// (see [`data_pages`]) are sent, as runs; the reader zero-fills the rest.
pub fn write_stream<W: Write>(w: W, mut st: VmState, mem: &GuestMemoryMmap) -> Result<u64> {
    let buf = ram(mem, st.mem_size)?;
    st.diff_runs = Some(runs(&data_pages(mem, buf)));
    write_runs(w, &st, mem, FLAG_SPARSE)
}

/// Pages backed on the host (mincore); the rest read as zero and become holes.
fn resident_pages(buf: &[u8]) -> Vec<bool> {
    let pages = buf.len().div_ceil(PAGE);
    let mut vec = vec![0u8; pages];
    // SAFETY: buf is a page-aligned mapping of `len` bytes; vec has one byte per page.
    let rc = unsafe { libc::mincore(buf.as_ptr() as *mut libc::c_void, buf.len(), vec.as_mut_ptr()) };
    if rc != 0 {
        return vec![true; pages]; // cannot tell: write everything
    }
    vec.iter().map(|b| b & 1 == 1).collect()
}

/// Pages that may hold data: resident in our mapping, or, for RAM mapped
/// from an earlier snapshot file, backed by data in that file (pages not yet
/// faulted in are not resident but are not zero either).
fn data_pages(mem: &GuestMemoryMmap, buf: &[u8]) -> Vec<bool> {
    let mut pages = resident_pages(buf);
    if let Some(fo) = mem.iter().next().and_then(|r| r.file_offset()) {
        mark_file_data(fo.file(), fo.start(), &mut pages);
    }
    pages
}

/// Mark pages whose bytes in `f` (from `start`) are data rather than holes.
fn mark_file_data(f: &File, start: u64, pages: &mut [bool]) {
    let fd = f.as_raw_fd();
    // `start` came from a snapshot header; an end past u64 cannot be
    // searched, so every page counts as data.
    let Some(end) =
        u64::try_from(pages.len()).ok().and_then(|n| n.checked_mul(PAGE as u64)).and_then(|n| start.checked_add(n))
    else {
        pages.fill(true);
        return;
    };
    let mut off = start;
    while off < end {
        // SAFETY: lseek on a descriptor we own; only its offset changes.
        let data = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                pages.fill(true); // cannot tell: write everything
            }
            return; // ENXIO: no data after `off`
        }
        let data = data as u64;
        if data >= end {
            return;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 { end } else { (hole as u64).min(end) };
        let first = ((data - start) / PAGE as u64) as usize;
        let last = ((hole - start).div_ceil(PAGE as u64) as usize).min(pages.len());
        for p in &mut pages[first..last] {
            *p = true;
        }
        off = hole;
    }
}

pub fn write_file(path: &Path, st: &VmState, mem: &GuestMemoryMmap) -> Result<u64> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let r = write_file_at(path, &tmp, st, mem);
    if r.is_err() {
        if let Err(e) = std::fs::remove_file(&tmp) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %tmp.display(), error = %e, "cannot remove a half-written snapshot file");
            }
        }
    }
    r
}

fn write_file_at(path: &Path, tmp: &Path, st: &VmState, mem: &GuestMemoryMmap) -> Result<u64> {
    let (hd, json) = prepare(st, 0)?;
    let io = |what: &str| Error::io(format!("{} ({what})", tmp.display()));
    let f = OpenOptions::new().write(true).create(true).truncate(true).open(tmp).map_err(io("create"))?;
    let total = hd.end()?;
    f.write_all_at(&hd.encode(), 0).map_err(io("header"))?;
    f.write_all_at(&json, HEADER_LEN as u64).map_err(io("state"))?;
    let buf = ram(mem, hd.mem_size)?;
    let resident = data_pages(mem, buf);
    // Write runs of resident pages; the others stay holes.
    let mut i = 0;
    while i < resident.len() {
        if !resident[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < resident.len() && resident[i] {
            i += 1;
        }
        let (a, b) = (start * PAGE, (i * PAGE).min(buf.len()));
        // 1 MiB writes: one huge write is several times slower on ext4 here.
        for c in (a..b).step_by(CHUNK) {
            let e = (c + CHUNK).min(b);
            f.write_all_at(&buf[c..e], hd.mem_offset + c as u64).map_err(io("memory"))?;
        }
    }
    f.set_len(total).map_err(io("set_len"))?;
    drop(f);
    std::fs::rename(tmp, path).map_err(Error::io(path.display().to_string()))?;
    Ok(total)
}

fn parse_state(json: &[u8], hd: &Header) -> Result<VmState> {
    let st: VmState = serde_json::from_slice(json).map_err(SnapshotError::State)?;
    if st.mem_size != hd.mem_size {
        return Err(SnapshotError::Mismatch { field: "mem_size", state: st.mem_size, header: hd.mem_size }.into());
    }
    if st.irqchips.len() != 3 {
        return Err(SnapshotError::Irqchips(st.irqchips.len()).into());
    }
    Ok(st)
}

fn refuse_diff(hd: &Header) -> Result<()> {
    if hd.flags & FLAG_DIFF != 0 {
        return Err(SnapshotError::DiffWithoutBase.into());
    }
    Ok(())
}

pub fn read_stream<R: Read>(mut r: R) -> Result<(VmState, GuestMemoryMmap)> {
    let io = || Error::io("snapshot stream");
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).map_err(io())?;
    let hd = Header::decode(&h)?;
    refuse_diff(&hd)?;
    let mut json = vec![0u8; hd.state_len as usize];
    r.read_exact(&mut json).map_err(io())?;
    let st = parse_state(&json, &hd)?;
    skip_padding(&mut r, &hd, "snapshot stream")?;
    let mem = crate::vm::anonymous_ram(hd.mem_size)?;
    if hd.flags & FLAG_SPARSE != 0 {
        // Fresh anonymous memory is zero: fill in only the carried pages.
        let runs = st.diff_runs.clone().ok_or(SnapshotError::MissingRuns("sparse"))?;
        check_runs(&runs, hd.mem_size)?;
        read_runs(&mut r, &runs, &mem)?;
        let mut st = st;
        st.diff_runs = None;
        return Ok((st, mem));
    }
    let host = host_ram(&mem)?;
    // SAFETY: fresh private mapping of mem_size bytes, not yet shared with KVM.
    let buf = unsafe { std::slice::from_raw_parts_mut(host, hd.mem_size as usize) };
    r.read_exact(buf).map_err(io())?;
    Ok((st, mem))
}

pub fn read_file(path: &Path) -> Result<(VmState, GuestMemoryMmap)> {
    let io = |what: &str| Error::io(format!("{} ({what})", path.display()));
    let mut f = File::open(path).map_err(io("open"))?;
    let mut h = [0u8; HEADER_LEN];
    f.read_exact(&mut h).map_err(io("header"))?;
    let hd = Header::decode(&h)?;
    refuse_diff(&hd)?;
    if hd.flags & FLAG_SPARSE != 0 {
        // A stream saved to a file: read it as a stream.
        f.seek(SeekFrom::Start(0)).map_err(io("seek"))?;
        return read_stream(std::io::BufReader::with_capacity(1 << 20, f));
    }
    let len = f.metadata().map_err(io("stat"))?.len();
    let needed = hd.end()?;
    if len < needed {
        return Err(SnapshotError::Truncated { path: path.to_path_buf(), len, needed }.into());
    }
    let mut json = vec![0u8; hd.state_len as usize];
    f.seek(SeekFrom::Start(HEADER_LEN as u64)).map_err(io("seek"))?;
    f.read_exact(&mut json).map_err(io("state"))?;
    let st = parse_state(&json, &hd)?;
    let region = MmapRegionBuilder::new(hd.mem_size as usize)
        .with_file_offset(FileOffset::new(f, hd.mem_offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .map_err(|source| MemoryError::MapFile { path: path.to_path_buf(), bytes: hd.mem_size, source })?;
    let region = GuestRegionMmap::new(region, GuestAddress(0)).ok_or(MemoryError::Overflow { bytes: hd.mem_size })?;
    let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(MemoryError::Collection)?;
    Ok((st, mem))
}

/// Check diff runs: ascending, disjoint, inside RAM. Returns the data bytes.
fn check_runs(runs: &[(u64, u64)], mem_size: u64) -> std::result::Result<u64, SnapshotError> {
    let pages = mem_size / PAGE as u64;
    let mut next = 0u64;
    let mut total = 0u64;
    for &(first, count) in runs {
        let end = first.checked_add(count).filter(|e| count > 0 && *e <= pages);
        match end {
            Some(end) if first >= next => {
                next = end;
                total += count;
            }
            _ => return Err(SnapshotError::BadRun { first, count }),
        }
    }
    Ok(total * PAGE as u64)
}

/// Runs of set entries in a page map.
pub fn runs(pages: &[bool]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < pages.len() {
        if !pages[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < pages.len() && pages[i] {
            i += 1;
        }
        out.push((start as u64, (i - start) as u64));
    }
    out
}

/// Write a diff snapshot: `st.diff_runs` must list the pages to carry.
pub fn write_diff_stream<W: Write>(w: W, st: &VmState, mem: &GuestMemoryMmap) -> Result<u64> {
    write_runs(w, st, mem, FLAG_DIFF)
}

/// Header, state, then the bytes of the `st.diff_runs` pages back to back.
fn write_runs<W: Write>(mut w: W, st: &VmState, mem: &GuestMemoryMmap, flags: u32) -> Result<u64> {
    let runs = st.diff_runs.as_deref().ok_or(SnapshotError::MissingRuns(if flags & FLAG_DIFF != 0 {
        "diff"
    } else {
        "sparse"
    }))?;
    let data = check_runs(runs, st.mem_size)?;
    let (hd, json) = prepare(st, flags)?;
    let buf = ram(mem, hd.mem_size)?;
    let pad = vec![0u8; hd.padding()? as usize];
    let r = (|| {
        w.write_all(&hd.encode())?;
        w.write_all(&json)?;
        w.write_all(&pad)?;
        for &(first, count) in runs {
            let (a, b) = (first as usize * PAGE, (first + count) as usize * PAGE);
            w.write_all(&buf[a..b])?;
        }
        w.flush()
    })();
    r.map_err(Error::io("snapshot stream"))?;
    Ok(hd.mem_offset + data)
}

/// Apply a diff snapshot on top of `mem` (which holds its base); returns the
/// diff's machine state, which replaces the base's.
pub fn apply_diff<R: Read>(mut r: R, mem: &GuestMemoryMmap) -> Result<VmState> {
    let io = || Error::io("diff snapshot stream");
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).map_err(io())?;
    let hd = Header::decode(&h)?;
    if hd.flags & FLAG_DIFF == 0 {
        return Err(SnapshotError::NotADiff.into());
    }
    let mut json = vec![0u8; hd.state_len as usize];
    r.read_exact(&mut json).map_err(io())?;
    let st = parse_state(&json, &hd)?;
    let size: u64 = mem.iter().map(|r| r.len()).sum();
    if size != hd.mem_size {
        return Err(SnapshotError::DiffSize { diff: hd.mem_size, base: size }.into());
    }
    let runs = st.diff_runs.clone().ok_or(SnapshotError::MissingRuns("diff"))?;
    check_runs(&runs, hd.mem_size)?;
    skip_padding(&mut r, &hd, "diff snapshot stream")?;
    read_runs(&mut r, &runs, mem)?;
    Ok(st)
}

/// Skip the padding between the state (just read) and the RAM image. A
/// stream that ends inside it is refused here, not later in a RAM read.
fn skip_padding<R: Read>(r: &mut R, hd: &Header, what: &'static str) -> Result<()> {
    let pad = hd.padding()?;
    let skipped = std::io::copy(&mut r.take(pad), &mut std::io::sink()).map_err(Error::io(what))?;
    if skipped < pad {
        return Err(Error::io(what)(std::io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(())
}

/// Read the bytes of `runs` (already checked) into guest RAM.
fn read_runs<R: Read>(r: &mut R, runs: &[(u64, u64)], mem: &GuestMemoryMmap) -> Result<()> {
    let host = host_ram(mem)?;
    for &(first, count) in runs {
        // SAFETY: check_runs kept the run inside the RAM mapping, which is
        // not yet registered with KVM (restore in progress).
        let dst = unsafe { std::slice::from_raw_parts_mut(host.add(first as usize * PAGE), count as usize * PAGE) };
        r.read_exact(dst).map_err(Error::io("snapshot stream"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_rejects_nonsense() {
        let h = Header { flags: FLAG_DIFF, state_len: 100, mem_size: 1 << 20, mem_offset: 4096 };
        let d = Header::decode(&h.encode()).expect("decode");
        assert_eq!((d.flags, d.state_len, d.mem_size, d.mem_offset), (FLAG_DIFF, 100, 1 << 20, 4096));
        let mut bad = h.encode();
        bad[12] = 0x80; // unknown flag
        assert!(matches!(Header::decode(&bad), Err(SnapshotError::Flags(0x80))));
        bad[12] = (FLAG_DIFF | FLAG_SPARSE) as u8; // contradictory
        assert!(matches!(Header::decode(&bad), Err(SnapshotError::Flags(3))));
        bad[8] = 2;
        assert!(matches!(Header::decode(&bad), Err(SnapshotError::Version { found: 2, supported: 1 })));
        bad[0] = b'X';
        assert!(matches!(Header::decode(&bad), Err(SnapshotError::BadMagic)));
        let overlap = Header { flags: 0, state_len: 5000, mem_size: 1 << 20, mem_offset: 4096 };
        let e = Header::decode(&overlap.encode()).err();
        assert!(matches!(e, Some(SnapshotError::Header { field: "mem_offset", .. })), "state overlapping RAM: {e:?}");
        let unaligned = Header { flags: 0, state_len: 10, mem_size: 1000, mem_offset: 4096 };
        let e = Header::decode(&unaligned.encode()).err();
        assert!(matches!(e, Some(SnapshotError::Header { field: "mem_size", .. })), "RAM not whole pages: {e:?}");
    }

    /// Offsets a hostile file could carry: RAM near the end of the u64
    /// range, where `mem_offset + mem_size` wraps. Every reader refuses them
    /// with the field named, never by overflowing or panicking.
    #[test]
    fn hostile_header_offsets_are_refused_naming_the_field() {
        let top = u64::MAX - (PAGE as u64 - 1); // 4 KiB aligned, so only the sum is wrong
        let hostile = Header { flags: 0, state_len: 100, mem_size: 1 << 20, mem_offset: top };
        let is_mem_offset = |e: &Error| matches!(e, Error::Snapshot(SnapshotError::Header { field: "mem_offset", .. }));

        let e = Header::decode(&hostile.encode()).err();
        assert!(matches!(e, Some(SnapshotError::Header { field: "mem_offset", value, .. }) if value == top), "{e:?}");
        // The checked sums, on headers that did not come through decode.
        let e = hostile.end().err();
        assert!(matches!(e, Some(SnapshotError::Header { field: "mem_offset", .. })), "{e:?}");
        let huge_state = Header { flags: 0, state_len: u64::MAX, mem_size: 1 << 20, mem_offset: 4096 };
        let e = huge_state.padding().err();
        assert!(matches!(e, Some(SnapshotError::Header { field: "state_len", .. })), "{e:?}");
        // Just past the bound: aligned, no overflow, but a stream reader
        // would skip ~1 TiB of it.
        let far = Header { mem_offset: 1 << 40, ..hostile };
        let e = Header::decode(&far.encode()).err();
        assert!(matches!(e, Some(SnapshotError::Header { field: "mem_offset", .. })), "{e:?}");

        let mut bytes = hostile.encode().to_vec();
        bytes.extend_from_slice(&[b' '; 100]);
        match read_stream(&bytes[..]) {
            Err(e) => assert!(is_mem_offset(&e), "{e}"),
            Ok(_) => panic!("a stream with a wrapping header was read"),
        }
        match apply_diff(
            &Header { flags: FLAG_DIFF, ..hostile }.encode()[..],
            &crate::vm::anonymous_ram(4096).expect("ram"),
        ) {
            Err(e) => assert!(is_mem_offset(&e), "{e}"),
            Ok(_) => panic!("a diff with a wrapping header was applied"),
        }
        let path = std::env::temp_dir().join(format!("vmm-hostile-snapshot-{}", std::process::id()));
        std::fs::write(&path, &bytes).expect("write the hostile file");
        let r = read_file(&path);
        std::fs::remove_file(&path).expect("remove the hostile file");
        match r {
            Err(e) => assert!(is_mem_offset(&e), "{e}"),
            Ok(_) => panic!("a file with a wrapping header was mapped"),
        }
    }

    #[test]
    fn runs_and_their_checks() {
        let pages = [false, true, true, false, true, false, false, true];
        let r = runs(&pages);
        assert_eq!(r, vec![(1, 2), (4, 1), (7, 1)]);
        assert_eq!(check_runs(&r, 8 * 4096).expect("valid"), 4 * 4096);
        assert!(check_runs(&[(4, 1), (1, 2)], 8 * 4096).is_err(), "descending");
        assert!(check_runs(&[(1, 2), (2, 1)], 8 * 4096).is_err(), "overlapping");
        assert!(check_runs(&[(7, 2)], 8 * 4096).is_err(), "past the end");
        assert!(check_runs(&[(3, 0)], 8 * 4096).is_err(), "empty run");
        assert!(check_runs(&[(u64::MAX, 2)], 8 * 4096).is_err(), "overflow");
    }
}
