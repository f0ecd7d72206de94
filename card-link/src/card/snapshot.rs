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
        let done = self.call(Op::RestoreCommit, vm, crc.finalize() as u64, flags, &[])?;
        if done.arg0 != vm as u64 {
            return Err(CardError::Range {
                what: "VM id at restore-commit",
                value: done.arg0,
                range: "the id reserved",
            });
        }
        Ok(vm)
    }
}
