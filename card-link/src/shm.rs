//! Memory shared between host and card (ABI 1.3): a BAR the card exports as
//! a vfio-user sparse-mmap area (or a kernel VFIO mmap-able region), and the
//! DMA buffer the host owns and maps to the card. Both sides use this type:
//! the card creates its BARs with `create` (a memfd), the host maps what it
//! is offered with `map`, and owns its DMA buffer through `create`.
//!
//! The other side writes this memory at any time, so nothing here hands out
//! a Rust reference to its bytes (that would claim they cannot change):
//! byte ranges are copied in and out through raw pointers, registers are
//! 32-bit atomics at aligned offsets (the same instructions a device
//! driver's `readl`/`writel` plus fences would be). What is copied out is
//! only then decoded and validated, as for bytes from a socket.

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use crate::error::{CardError, Result};

/// A shared mapping of `len` bytes.
pub struct SharedMem {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
    /// The memfd behind a mapping this side created (to hand to the peer).
    fd: Option<OwnedFd>,
}

// SAFETY: the mapping is plain shared memory owned by this value until it
// is dropped; every access goes through raw-pointer copies or atomics, both
// of which are sound from any thread.
unsafe impl Send for SharedMem {}
// SAFETY: as above; `&SharedMem` allows only copies and atomic accesses.
unsafe impl Sync for SharedMem {}

impl std::fmt::Debug for SharedMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMem").field("len", &self.len).field("writable", &self.writable).finish()
    }
}

fn os(what: &'static str) -> CardError {
    CardError::Os { what, source: std::io::Error::last_os_error() }
}

impl SharedMem {
    /// A new zeroed memfd of `len` bytes, mapped read/write (`name` shows in
    /// /proc/PID/fd and maps, e.g. "card-bar2", "card-dma").
    pub fn create(name: &str, len: usize) -> Result<SharedMem> {
        let len = NonZeroUsize::new(len).ok_or(CardError::Invalid("a shared mapping of 0 bytes".into()))?;
        let cname = std::ffi::CString::new(name).map_err(|_| CardError::Invalid(format!("memfd name {name:?}")))?;
        // SAFETY: memfd_create reads the NUL-terminated name and returns a new fd or -1.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(os("memfd_create"));
        }
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len.get() as libc::off_t) } != 0 {
            return Err(os("size the memfd"));
        }
        let mut m = Self::map(fd.as_fd(), 0, len.get(), true)?;
        m.fd = Some(fd);
        Ok(m)
    }

    /// Map `len` bytes of `fd` at `offset`, shared; read-only unless `writable`.
    pub fn map(fd: BorrowedFd<'_>, offset: u64, len: usize, writable: bool) -> Result<SharedMem> {
        if len == 0 {
            return Err(CardError::Invalid("a shared mapping of 0 bytes".into()));
        }
        let off = libc::off_t::try_from(offset).map_err(|_| CardError::Range {
            what: "mmap offset",
            value: offset,
            range: "fits off_t",
        })?;
        let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        // SAFETY: a new shared mapping chosen by the kernel (addr NULL), so it
        // overlaps nothing of ours; failure is MAP_FAILED, checked below.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd.as_raw_fd(), off) };
        if p == libc::MAP_FAILED {
            return Err(os("mmap a shared region"));
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(CardError::Invalid("mmap returned NULL".into()))?;
        Ok(SharedMem { ptr, len, writable, fd: None })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapping's address, for handing to an IOMMU (kernel VFIO DMA
    /// maps); using it is the caller's unsafe business.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The memfd behind a mapping made by `create` (None for `map`).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }

    fn check(&self, off: usize, len: usize) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(CardError::Range { what: "shared memory access", value: off as u64, range: "inside the mapping" }),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(CardError::Invalid("write to a read-only mapping".into()))
        }
    }

    /// Copy `buf.len()` bytes at `off` out with volatile loads (8 bytes at a
    /// time where aligned), so the compiler neither elides nor merges them:
    /// the register-file and mailbox path.
    pub fn read(&self, off: usize, buf: &mut [u8]) -> Result<()> {
        self.check(off, buf.len())?;
        // SAFETY: [off, off + len) is inside the mapping (checked), which
        // lives as long as `self`; `buf` is our own memory.
        unsafe { volatile_copy_out(self.ptr.as_ptr().add(off), buf) };
        Ok(())
    }

    /// Copy `data` in at `off` with volatile stores.
    pub fn write(&self, off: usize, data: &[u8]) -> Result<()> {
        self.check(off, data.len())?;
        self.check_writable()?;
        // SAFETY: inside a writable mapping (checked) that lives as long as `self`.
        unsafe { volatile_copy_in(self.ptr.as_ptr().add(off), data) };
        Ok(())
    }

    /// Bulk copy out (DMA data): a plain memcpy, at memory speed. The bytes
    /// may change under it (a hostile peer); they are host-private once
    /// copied and validated (CRC) only after that, so a change shows as a
    /// checksum error, never as memory unsafety on our side.
    pub fn copy_out(&self, off: usize, buf: &mut [u8]) -> Result<()> {
        self.check(off, buf.len())?;
        // SAFETY: source inside the mapping (checked), destination our own
        // buffer; the two cannot overlap (the mapping is not Rust memory).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Bulk copy out (DMA data) appended to `out`, without zero-filling the
    /// new room first (one pass over the bytes instead of two).
    pub fn append_to(&self, off: usize, len: usize, out: &mut Vec<u8>) -> Result<()> {
        self.check(off, len)?;
        out.reserve(len);
        let have = out.len();
        // SAFETY: `reserve` made room for `len` more bytes after `have`; the
        // source is inside the mapping (checked) and cannot overlap a Vec's
        // heap buffer; after the copy those bytes are initialised, so the
        // length may cover them.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), out.as_mut_ptr().add(have), len);
            out.set_len(have + len);
        }
        Ok(())
    }

    /// Bulk copy in (DMA data), a plain memcpy.
    pub fn copy_in(&self, off: usize, data: &[u8]) -> Result<()> {
        self.check(off, data.len())?;
        self.check_writable()?;
        // SAFETY: destination inside a writable mapping (checked), source our
        // own slice; no overlap (the mapping is not Rust memory).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(off), data.len()) };
        Ok(())
    }

    /// The 32-bit register at `off` (4-byte aligned, inside the mapping).
    pub fn word(&self, off: usize) -> Result<&AtomicU32> {
        self.check(off, 4)?;
        if !off.is_multiple_of(4) {
            return Err(CardError::Range { what: "register offset", value: off as u64, range: "4-byte aligned" });
        }
        // SAFETY: aligned (the mapping is page aligned, `off` a multiple of
        // 4) and inside the mapping, which outlives the borrow of `self`.
        // AtomicU32 has u32's layout; the peer uses atomics on the same word.
        Ok(unsafe { AtomicU32::from_ptr(self.ptr.as_ptr().add(off).cast::<u32>()) })
    }

    /// Wake one waiter sleeping on the word at `off` (a shared futex: the
    /// peer's mapping of the same file page is the same futex).
    pub fn futex_wake(&self, off: usize) -> Result<()> {
        let w = self.word(off)?;
        // SAFETY: FUTEX_WAKE on an aligned word of a live mapping; it reads
        // nothing through the pointer, it only keys the wait queue.
        let rc = unsafe { libc::syscall(libc::SYS_futex, w.as_ptr(), libc::FUTEX_WAKE, 1, 0, 0, 0) };
        if rc < 0 {
            return Err(os("futex wake"));
        }
        Ok(())
    }

    /// Sleep until the word at `off` is woken or differs from `expected`,
    /// at most `timeout`. Spurious returns are fine: callers re-check.
    pub fn futex_wait(&self, off: usize, expected: u32, timeout: Duration) -> Result<()> {
        let w = self.word(off)?;
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: FUTEX_WAIT reads the aligned word of a live mapping and the
        // timespec on our stack.
        let rc = unsafe {
            libc::syscall(libc::SYS_futex, w.as_ptr(), libc::FUTEX_WAIT, expected, &ts as *const libc::timespec, 0, 0)
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            // EAGAIN: the word already differs; ETIMEDOUT, EINTR: re-check.
            if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ETIMEDOUT | libc::EINTR)) {
                return Ok(());
            }
            return Err(CardError::Os { what: "futex wait", source: e });
        }
        Ok(())
    }
}

impl Drop for SharedMem {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping this value owns; no
        // reference into it outlives `self` (`word` borrows `self`).
        if unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) } != 0 {
            tracing::warn!("munmap of a shared region: {}", std::io::Error::last_os_error());
        }
    }
}

/// Copy from shared memory at `src` into `dst` with volatile loads.
///
/// # Safety
/// `src..src + dst.len()` must be readable memory for the whole call.
unsafe fn volatile_copy_out(src: *const u8, dst: &mut [u8]) {
    let n = dst.len();
    let mut i = 0;
    while i < n && !(src as usize + i).is_multiple_of(8) {
        // SAFETY: i < n: inside the caller's range.
        dst[i] = unsafe { src.add(i).read_volatile() };
        i += 1;
    }
    while i + 8 <= n {
        // SAFETY: 8-byte aligned (loop above) and inside the range.
        let w = unsafe { src.add(i).cast::<u64>().read_volatile() };
        dst[i..i + 8].copy_from_slice(&w.to_ne_bytes());
        i += 8;
    }
    while i < n {
        // SAFETY: i < n.
        dst[i] = unsafe { src.add(i).read_volatile() };
        i += 1;
    }
}

/// Copy `src` into shared memory at `dst` with volatile stores.
///
/// # Safety
/// `dst..dst + src.len()` must be writable memory for the whole call.
unsafe fn volatile_copy_in(dst: *mut u8, src: &[u8]) {
    let n = src.len();
    let mut i = 0;
    while i < n && !(dst as usize + i).is_multiple_of(8) {
        // SAFETY: i < n: inside the caller's range.
        unsafe { dst.add(i).write_volatile(src[i]) };
        i += 1;
    }
    while i + 8 <= n {
        let mut w = [0u8; 8];
        w.copy_from_slice(&src[i..i + 8]);
        // SAFETY: 8-byte aligned (loop above) and inside the range.
        unsafe { dst.add(i).cast::<u64>().write_volatile(u64::from_ne_bytes(w)) };
        i += 8;
    }
    while i < n {
        // SAFETY: i < n.
        unsafe { dst.add(i).write_volatile(src[i]) };
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn two_mappings_of_one_memfd_see_each_other() {
        let a = SharedMem::create("card-link-test", 8192).unwrap();
        let b = SharedMem::map(a.fd().unwrap(), 4096, 4096, false).unwrap();
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        for off in [4096, 4097, 4100, 5000] {
            a.write(off, &data).unwrap();
            let mut back = vec![0u8; data.len()];
            b.read(off - 4096, &mut back).unwrap();
            assert_eq!(back, data, "at {off}");
            b.copy_out(off - 4096, &mut back).unwrap();
            assert_eq!(back, data);
            let mut grown = vec![7u8];
            b.append_to(off - 4096, data.len(), &mut grown).unwrap();
            assert_eq!((grown[0], &grown[1..]), (7, &data[..]));
        }
        a.word(4096 + 8).unwrap().store(77, Ordering::Release);
        assert_eq!(b.word(8).unwrap().load(Ordering::Acquire), 77);
        assert!(b.write(0, &[1]).is_err(), "read-only mapping refuses writes");
        assert!(b.read(4090, &mut [0u8; 8]).is_err(), "past the end");
        assert!(b.read(usize::MAX, &mut [0u8; 2]).is_err(), "overflow");
        assert!(b.word(2).is_err(), "unaligned register");
        assert!(b.append_to(4000, 200, &mut Vec::new()).is_err(), "append past the end");
        a.futex_wake(0).unwrap();
        a.futex_wait(0, 1, Duration::from_millis(1)).unwrap(); // value differs: returns at once
    }
}
