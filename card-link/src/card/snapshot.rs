//! VM snapshots between card and host: take one on the card, stream it to
//! the host chunk by chunk (each chunk's length and the whole image's CRC
//! checked), and stream an image back to the card to restore it. Chunks are
//! as large as one mailbox slot allows.

use std::io::{Read, Write};

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

impl Card {
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
        if flags & !(crate::mailbox::SNAPSHOT_LIVE | crate::mailbox::SNAPSHOT_DIFF) != 0 || flags == 3 {
            return Err(CardError::Invalid(format!("snapshot flags {flags:#x}: LIVE or DIFF, not both")));
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
        let chunk = self.max_payload() as u64;
        let mut off = 0u64;
        let mut crc = crc32fast::Hasher::new();
        while off < info.size {
            let want = chunk.min(info.size - off);
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
        let computed = crc.finalize();
        if computed != info.crc {
            return Err(CardError::Checksum { what: "snapshot image", stated: info.crc, computed });
        }
        Ok(off)
    }

    /// Send a snapshot image to the card and restore it as a new VM; returns its id.
    pub fn restore_vm(&mut self, spec: &VmSpec, size: u64, input: &mut dyn Read) -> Result<u32> {
        if size > MAX_SNAPSHOT {
            return Err(CardError::Invalid(format!("snapshot of {size} bytes is too large")));
        }
        let m = self.call(Op::RestoreBegin, 0, size, 0, &spec.encode()?)?;
        let vm = u32::try_from(m.arg0).map_err(|_| CardError::Range { what: "VM id", value: m.arg0, range: "u32" })?;
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
        self.call(Op::RestoreCommit, vm, crc.finalize() as u64, 0, &[])?;
        Ok(vm)
    }
}
