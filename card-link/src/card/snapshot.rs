//! VM snapshots between card and host: take one on the card, stream it to
//! the host chunk by chunk (each chunk's length and the whole image's CRC
//! checked), and stream an image back to the card to restore it.
//!
//! Two ways, chosen per card: through a DMA-mapped host buffer (ABI 1.3,
//! DMA_STREAM: the mailbox carries descriptors, chunk n + 1 moves while
//! the host works on chunk n), or as mailbox payloads (chunks as large as
//! one slot allows).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use super::command::Pending;
use super::dma::{DmaBuffer, DMA_CHUNK};
use super::Card;
use crate::error::{CardError, Result};
use crate::mailbox::{Op, VmSpec};

/// Largest snapshot image either side accepts.
pub const MAX_SNAPSHOT: u64 = 4 << 30;

/// A snapshot held by the card, as `snapshot_vm` reported it.
pub struct SnapshotInfo {
    pub size: u64,
    pub crc: u32,
}

/// Where a snapshot goes: any writer (through a private staging chunk),
/// or a Vec (the chunk lands there directly).
enum Sink<'a> {
    Write(&'a mut dyn Write),
    Vec(&'a mut Vec<u8>),
}

/// How the last snapshot stream went (either direction): its data phase,
/// from the first chunk asked for to the last one checked.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamStats {
    pub bytes: u64,
    pub elapsed: Duration,
    /// Through the DMA buffer (else mailbox payloads).
    pub dma: bool,
    pub chunk: usize,
}

impl StreamStats {
    pub fn gib_per_s(&self) -> f64 {
        self.bytes as f64 / (1u64 << 30) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl Card {
    /// The last snapshot stream's size, time and path.
    pub fn last_stream(&self) -> Option<&StreamStats> {
        self.last_stream.as_ref()
    }

    /// Snapshot a VM on the card (it is paused); the image stays on the card
    /// until read with `read_snapshot`.
    pub fn snapshot_vm(&mut self, vm: u32) -> Result<SnapshotInfo> {
        self.snapshot_vm_with(vm, 0)
    }

    /// A snapshot with flags (`mailbox::SNAPSHOT_LIVE` or `SNAPSHOT_DIFF`,
    /// ABI 1.2 feature PRECOPY); `Unsupported`, with nothing sent, on a card
    /// without it.
    pub fn snapshot_vm_with(&mut self, vm: u32, flags: u64) -> Result<SnapshotInfo> {
        if flags != 0 && self.first.features & crate::abi::FEATURE_PRECOPY == 0 {
            return Err(CardError::Unsupported {
                what: "pre-copy snapshots (snapshot flags)",
                needs: "ABI 1.2 with feature bit 2",
                minor: self.first.abi_minor,
            });
        }
        if flags & !(crate::mailbox::SNAPSHOT_LIVE | crate::mailbox::SNAPSHOT_DIFF) != 0 {
            return Err(CardError::Invalid(format!("snapshot flags {flags:#x}: only LIVE and DIFF")));
        }
        let m = self.call(Op::Snapshot, vm, flags, 0, &[])?;
        if m.arg0 > MAX_SNAPSHOT {
            return Err(CardError::Range { what: "snapshot size", value: m.arg0, range: "<= 4 GiB" });
        }
        Ok(SnapshotInfo { size: m.arg0, crc: m.arg1 as u32 })
    }

    /// Stream a VM's snapshot from the card into `out`, chunk by chunk,
    /// checking each chunk's length and the whole image's CRC.
    pub fn read_snapshot(&mut self, vm: u32, info: &SnapshotInfo, out: &mut dyn Write) -> Result<u64> {
        self.read_snapshot_to(vm, info, Sink::Write(out))
    }

    /// `read_snapshot` appending to a Vec: by DMA, each chunk is copied
    /// once, straight from the buffer into `out`, and its CRC taken there
    /// (host memory the card cannot touch) while it is still in cache.
    /// On an error `out` may hold part of the image.
    pub fn read_snapshot_into(&mut self, vm: u32, info: &SnapshotInfo, out: &mut Vec<u8>) -> Result<u64> {
        if info.size <= MAX_SNAPSHOT {
            out.reserve(info.size as usize);
        }
        self.read_snapshot_to(vm, info, Sink::Vec(out))
    }

    fn read_snapshot_to(&mut self, vm: u32, info: &SnapshotInfo, mut out: Sink<'_>) -> Result<u64> {
        if info.size > MAX_SNAPSHOT {
            return Err(CardError::Range { what: "snapshot size", value: info.size, range: "<= 4 GiB" });
        }
        let t0 = Instant::now();
        let mut crc = crc32fast::Hasher::new();
        let dma = info.size > 0 && self.ensure_dma();
        let chunk = if dma { DMA_CHUNK } else { self.max_payload() };
        if dma {
            self.read_chunks_dma(vm, info.size, &mut crc, &mut out)?;
        } else {
            let w: &mut dyn Write = match &mut out {
                Sink::Write(w) => *w,
                Sink::Vec(v) => *v,
            };
            self.read_chunks_mailbox(vm, info.size, &mut crc, w)?;
        }
        let computed = crc.finalize();
        if computed != info.crc {
            return Err(CardError::Checksum { what: "snapshot image", stated: info.crc, computed });
        }
        self.last_stream = Some(StreamStats { bytes: info.size, elapsed: t0.elapsed(), dma, chunk });
        Ok(info.size)
    }

    fn read_chunks_mailbox(
        &mut self,
        vm: u32,
        size: u64,
        crc: &mut crc32fast::Hasher,
        out: &mut dyn Write,
    ) -> Result<()> {
        let chunk = self.max_payload() as u64;
        let mut off = 0u64;
        while off < size {
            let want = chunk.min(size - off);
            let m = self.call_expecting(Op::SnapshotRead, vm, off, want, &[], want as usize)?;
            if m.payload.len() as u64 != want || m.arg0 != off {
                return Err(CardError::Range {
                    what: "snapshot chunk length",
                    value: m.payload.len() as u64,
                    range: "as requested",
                });
            }
            crc.update(&m.payload);
            out.write_all(&m.payload).map_err(|source| CardError::Stream { what: "write to the host sink", source })?;
            off += want;
        }
        Ok(())
    }

    /// Card -> host by DMA, pipelined: ask for chunk n + 1 (into the other
    /// half) before copying chunk n out, so the card fills one half while
    /// the host drains the other. Each chunk is copied to host-private
    /// memory before its CRC is taken and it goes to `out`.
    fn read_chunks_dma(&mut self, vm: u32, size: u64, crc: &mut crc32fast::Hasher, out: &mut Sink<'_>) -> Result<()> {
        let n = size.div_ceil(DMA_CHUNK as u64);
        let span = |i: u64| (i * DMA_CHUNK as u64, (DMA_CHUNK as u64).min(size - i * DMA_CHUNK as u64) as usize);
        let ask = |c: &mut Card, i: u64| -> Result<Pending> {
            let (off, len) = span(i);
            c.submit(Op::SnapshotReadDma, vm, off, 0, &DmaBuffer::desc(i, len).encode(), 0)
        };
        let mut pending = Some(ask(self, 0)?);
        for i in 0..n {
            let (off, len) = span(i);
            let m = match pending.take() {
                Some(p) => self.finish(p)?,
                None => return Err(CardError::Invalid("DMA stream lost its command".into())),
            };
            if m.arg0 != off || m.arg1 != len as u64 {
                return Err(CardError::Range { what: "DMA snapshot chunk", value: m.arg1, range: "as requested" });
            }
            if i + 1 < n {
                pending = Some(ask(self, i + 1)?);
            }
            let done = self.drain_half(i, len, crc, out);
            if let Err(e) = done {
                // Leave nothing in flight: the next command must not meet
                // this one's answer.
                if let Some(p) = pending.take() {
                    let _ = self.finish(p);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Copy chunk `i` (`len` bytes) out of its half into host memory, then
    /// take its CRC there and pass it on.
    fn drain_half(&mut self, i: u64, len: usize, crc: &mut crc32fast::Hasher, out: &mut Sink<'_>) -> Result<()> {
        let b = self.dma.as_mut().ok_or(CardError::Invalid("DMA stream without its buffer".into()))?;
        match out {
            Sink::Vec(v) => {
                let start = v.len();
                b.mem.append_to(DmaBuffer::half(i), len, v)?;
                crc.update(&v[start..]);
                Ok(())
            }
            Sink::Write(w) => {
                let staging = &mut b.staging[..len];
                b.mem.copy_out(DmaBuffer::half(i), staging)?;
                crc.update(staging);
                w.write_all(staging).map_err(|source| CardError::Stream { what: "write to the host sink", source })
            }
        }
    }

    /// Send a snapshot image to the card and restore it as a new VM; returns its id.
    pub fn restore_vm(&mut self, spec: &VmSpec, size: u64, input: &mut dyn Read) -> Result<u32> {
        self.restore_with(spec, size, input, 0, 0)
    }

    /// Pre-copy (ABI 1.2, feature PRECOPY): restore a base paused, as a
    /// new VM that does not run until a diff and a resume.
    pub fn restore_vm_paused(&mut self, spec: &VmSpec, size: u64, input: &mut dyn Read) -> Result<u32> {
        self.needs_precopy()?;
        self.restore_with(spec, size, input, 0, crate::mailbox::RESTORE_PAUSED)
    }

    /// Pre-copy: apply a diff to the paused VM `vm` restored from its base.
    pub fn apply_diff_vm(&mut self, vm: u32, spec: &VmSpec, size: u64, input: &mut dyn Read) -> Result<()> {
        self.needs_precopy()?;
        if vm == 0 {
            return Err(CardError::Invalid("a diff needs the VM it applies to".into()));
        }
        let got = self.restore_with(spec, size, input, vm, 0)?;
        if got != vm {
            return Err(CardError::Range {
                what: "VM id of an applied diff",
                value: got as u64,
                range: "the VM asked",
            });
        }
        Ok(())
    }

    fn needs_precopy(&self) -> Result<()> {
        if self.first.features & crate::abi::FEATURE_PRECOPY == 0 {
            return Err(CardError::Unsupported {
                what: "pre-copy restores",
                needs: "ABI 1.2 with feature bit 2",
                minor: self.first.abi_minor,
            });
        }
        Ok(())
    }

    /// Restore-begin (arg1 = the VM a diff is for, 0 for a new VM), the
    /// chunks, restore-commit (arg1 = flags).
    fn restore_with(
        &mut self,
        spec: &VmSpec,
        size: u64,
        input: &mut dyn Read,
        diff_for: u32,
        flags: u64,
    ) -> Result<u32> {
        if size > MAX_SNAPSHOT {
            return Err(CardError::Invalid(format!("snapshot of {size} bytes is too large")));
        }
        let m = self.call(Op::RestoreBegin, 0, size, diff_for as u64, &spec.encode()?)?;
        let vm = u32::try_from(m.arg0).map_err(|_| CardError::Range { what: "VM id", value: m.arg0, range: "u32" })?;
        let t0 = Instant::now();
        let dma = size > 0 && self.ensure_dma();
        let crc =
            if dma { self.write_chunks_dma(vm, size, input)? } else { self.write_chunks_mailbox(vm, size, input)? };
        let chunk = if dma { DMA_CHUNK } else { self.max_payload() };
        self.last_stream = Some(StreamStats { bytes: size, elapsed: t0.elapsed(), dma, chunk });
        let done = self.call(Op::RestoreCommit, vm, crc as u64, flags, &[])?;
        if done.arg0 != vm as u64 {
            return Err(CardError::Range {
                what: "VM id at restore-commit",
                value: done.arg0,
                range: "the id reserved",
            });
        }
        Ok(vm)
    }

    fn write_chunks_mailbox(&mut self, vm: u32, size: u64, input: &mut dyn Read) -> Result<u32> {
        let chunk = self.max_payload();
        let mut buf = vec![0u8; chunk];
        let mut off = 0u64;
        let mut crc = crc32fast::Hasher::new();
        while off < size {
            let want = (chunk as u64).min(size - off) as usize;
            input
                .read_exact(&mut buf[..want])
                .map_err(|source| CardError::Stream { what: "read from the host source", source })?;
            crc.update(&buf[..want]);
            self.call(Op::RestoreWrite, vm, off, 0, &buf[..want])?;
            off += want as u64;
        }
        Ok(crc.finalize())
    }

    /// Host -> card by DMA, pipelined: fill chunk n + 1 into the other half
    /// while the card takes chunk n from its half.
    fn write_chunks_dma(&mut self, vm: u32, size: u64, input: &mut dyn Read) -> Result<u32> {
        let n = size.div_ceil(DMA_CHUNK as u64);
        let mut crc = crc32fast::Hasher::new();
        let mut pending: Option<(Pending, u64)> = None;
        for i in 0..n {
            let off = i * DMA_CHUNK as u64;
            let len = (DMA_CHUNK as u64).min(size - off) as usize;
            if let Err(e) = self.fill_half(i, len, &mut crc, input) {
                if let Some((p, _)) = pending.take() {
                    let _ = self.finish(p);
                }
                return Err(e);
            }
            if let Some((p, want)) = pending.take() {
                self.check_written(p, want)?;
            }
            let p = self.submit(Op::RestoreWriteDma, vm, off, 0, &DmaBuffer::desc(i, len).encode(), 0)?;
            pending = Some((p, off + len as u64));
        }
        if let Some((p, want)) = pending.take() {
            self.check_written(p, want)?;
        }
        Ok(crc.finalize())
    }

    fn check_written(&mut self, p: Pending, want: u64) -> Result<()> {
        let m = self.finish(p)?;
        if m.arg0 != want {
            return Err(CardError::Range { what: "restore bytes received", value: m.arg0, range: "as sent" });
        }
        Ok(())
    }

    /// Read chunk `i` (`len` bytes) from `input` and put it in its half.
    fn fill_half(&mut self, i: u64, len: usize, crc: &mut crc32fast::Hasher, input: &mut dyn Read) -> Result<()> {
        let b = self.dma.as_mut().ok_or(CardError::Invalid("DMA stream without its buffer".into()))?;
        let staging = &mut b.staging[..len];
        input.read_exact(staging).map_err(|source| CardError::Stream { what: "read from the host source", source })?;
        crc.update(staging);
        b.mem.copy_in(DmaBuffer::half(i), staging)
    }
}
