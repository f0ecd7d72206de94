//! Log management's host side (claim 14): each user VM's log files (a
//! process's redirected output, a VMM's serial console file) are followed,
//! their lines numbered per VM as they are read (host numbers, from 1 in
//! this run of the governor, its epoch) and kept until the log MC VM has
//! taken them; its acknowledgements say which log number each got, and only
//! then is a line written to the VM's log file (`<dir>/<vm>.log`, size
//! capped, one rotation). A line is never written twice (the pipe knows the
//! last host number it wrote) nor lost while the log VM pauses or moves
//! (lines wait, bounded; a line that does not fit is counted as dropped and
//! reported, never silently).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmm::proto::logs::{LogAck, LogRecord, FLAG_CONTINUES, TEXT_LEN};

use crate::placement::audit::AuditLog;

/// Records waiting per VM before new lines are dropped (and counted).
pub const MAX_PENDING: usize = 200_000;
/// Records in one exchange with the log VM.
pub const BATCH: usize = 1000;

/// A followed file: new complete lines since the last read. A file that
/// shrinks or is replaced (log rotation by its writer) is read from its start.
struct Tail {
    path: PathBuf,
    offset: u64,
    inode: u64,
    partial: Vec<u8>,
    /// (inode, offset) just after the last line written to the VM's log:
    /// where a governor taking over after a kill reads on from.
    written_at: (u64, u64),
}

impl Tail {
    /// New complete lines, each with the file offset just after it.
    fn lines(&mut self) -> Vec<(Vec<u8>, u64)> {
        let Ok(mut f) = File::open(&self.path) else { return Vec::new() };
        let Ok(meta) = f.metadata() else { return Vec::new() };
        if meta.ino() != self.inode || meta.len() < self.offset {
            self.inode = meta.ino();
            self.offset = 0;
            self.partial.clear();
        }
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(self.offset)).is_err() || f.read_to_end(&mut buf).is_err() {
            return Vec::new();
        }
        // Where `partial` begins in the file.
        let base = self.offset - self.partial.len() as u64;
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else { return Vec::new() };
        let rest = self.partial.split_off(end + 1);
        let done = std::mem::replace(&mut self.partial, rest);
        let mut out = Vec::new();
        let mut start = 0usize;
        for (i, _) in done.iter().enumerate().filter(|(_, b)| **b == b'\n') {
            if i > start {
                out.push((done[start..i].to_vec(), base + i as u64 + 1));
            }
            start = i + 1;
        }
        out
    }
}

/// Where each followed file was read up to for the lines already written
/// (and the last log number written), saved after every exchange with the
/// log VM: a governor that takes over after a kill reads on from there, so
/// no line is lost or written twice.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    pub vms: Vec<ResumeVm>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeVm {
    pub vm: String,
    pub written_log: u64,
    pub files: Vec<ResumeFile>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeFile {
    pub path: PathBuf,
    pub inode: u64,
    pub offset: u64,
}

impl Resume {
    pub fn load(path: &Path) -> Option<Resume> {
        let text = std::fs::read_to_string(path).ok()?;
        serde_json::from_str(&text)
            .map_err(|e| tracing::warn!(state = %path.display(), "ignoring the log positions left: {e}"))
            .ok()
    }

    /// Atomically (a temporary file renamed over it).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(self).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, path)
    }
}

/// What the status shows of one VM's log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogStat {
    pub vm: String,
    /// Lines waiting for the log VM.
    pub pending: u64,
    /// The last log number written to its file.
    pub written_log_seq: u64,
    /// Lines that did not fit while the log VM could not take them.
    pub dropped: u64,
}

struct VmLogs {
    name: String,
    tails: Vec<Tail>,
    next_host: u64,
    pending: VecDeque<LogRecord>,
    /// Beside each pending record: for the last record of a line, its
    /// file (tail index), inode and the offset just after it.
    ends: VecDeque<Option<(usize, u64, u64)>>,
    /// The last host number written.
    written: u64,
    written_log: u64,
    dropped: u64,
    out: AuditLog,
}

/// Every user VM's log, from its files to its log file through the log VM.
pub struct LogPipe {
    pub epoch: u32,
    vms: Vec<VmLogs>,
}

impl LogPipe {
    /// Follow `files` of each VM (slot = its index); write to `dir`. With
    /// `resume` (a governor before was killed), each file is read on from
    /// just after the last line written, if it is still the same file.
    pub fn new(
        epoch: u32,
        vms: &[(String, Vec<PathBuf>)],
        dir: &Path,
        max_bytes: u64,
        resume: Option<&Resume>,
    ) -> std::io::Result<LogPipe> {
        let mut out = Vec::new();
        for (name, files) in vms {
            let saved = resume.and_then(|r| r.vms.iter().find(|v| &v.vm == name));
            let tails = files
                .iter()
                .map(|p| {
                    // Lines written before the governor started are not
                    // ours, unless a governor before us left off there.
                    let (len, inode) = std::fs::metadata(p).map_or((0, 0), |m| (m.len(), m.ino()));
                    let from = saved
                        .and_then(|v| v.files.iter().find(|f| &f.path == p))
                        .filter(|f| f.inode == inode && f.offset <= len)
                        .map_or(len, |f| f.offset);
                    Tail { path: p.clone(), offset: from, inode, partial: Vec::new(), written_at: (inode, from) }
                })
                .collect();
            out.push(VmLogs {
                name: name.clone(),
                tails,
                next_host: 1,
                pending: VecDeque::new(),
                ends: VecDeque::new(),
                written: 0,
                written_log: saved.map_or(0, |v| v.written_log),
                dropped: 0,
                out: AuditLog::open(&dir.join(format!("{name}.log")), max_bytes)?,
            });
        }
        Ok(LogPipe { epoch, vms: out })
    }

    /// Read new lines from every followed file and number them.
    pub fn capture(&mut self) {
        for (slot, vm) in self.vms.iter_mut().enumerate() {
            for (ti, t) in vm.tails.iter_mut().enumerate() {
                for (line, end) in t.lines() {
                    let chunks: Vec<&[u8]> = line.chunks(TEXT_LEN).collect();
                    if vm.pending.len() + chunks.len() > MAX_PENDING {
                        vm.dropped += 1;
                        continue;
                    }
                    for (i, c) in chunks.iter().enumerate() {
                        let mut text = [0u8; TEXT_LEN];
                        text[..c.len()].copy_from_slice(c);
                        let flags = if i + 1 < chunks.len() { FLAG_CONTINUES } else { 0 };
                        vm.pending.push_back(LogRecord {
                            slot: slot as u32,
                            flags,
                            host_seq: vm.next_host,
                            len: c.len() as u16,
                            text,
                        });
                        vm.next_host += 1;
                        vm.ends.push_back((i + 1 == chunks.len()).then_some((ti, t.inode, end)));
                    }
                }
            }
        }
    }

    /// The next exchange's records: each VM's oldest waiting ones, together.
    pub fn batch(&self) -> Vec<LogRecord> {
        let mut out = Vec::new();
        for vm in &self.vms {
            let room = BATCH.saturating_sub(out.len());
            out.extend(vm.pending.iter().take(room).copied());
        }
        out
    }

    /// The log VM's acknowledgements: write what it took, in order, once.
    /// An acknowledgement of lines the pipe never sent is refused.
    pub fn acked(&mut self, acks: &[LogAck]) -> Result<(), String> {
        for a in acks {
            let vm = self.vms.get_mut(a.slot as usize).ok_or_else(|| format!("ack for slot {}", a.slot))?;
            if a.last_host >= vm.next_host {
                return Err(format!("{}: ack up to {} but only {} numbered", vm.name, a.last_host, vm.next_host - 1));
            }
            for h in a.first_host.max(vm.written + 1)..=a.last_host {
                let r = vm.pending.pop_front().ok_or_else(|| format!("{}: nothing waits for {h}", vm.name))?;
                let end = vm.ends.pop_front().flatten();
                if r.host_seq != h {
                    return Err(format!("{}: ack of {h} but {} waits", vm.name, r.host_seq));
                }
                let log_seq = a.first_log + (h - a.first_host);
                let line = LogLine {
                    seq: log_seq,
                    cont: r.flags & FLAG_CONTINUES != 0,
                    text: String::from_utf8_lossy(r.text()).into_owned(),
                };
                vm.out.append_json(&line).map_err(|e| format!("{}: writing its log: {e}", vm.name))?;
                vm.written = h;
                vm.written_log = log_seq;
                if let Some((ti, inode, off)) = end {
                    if let Some(t) = vm.tails.get_mut(ti) {
                        t.written_at = (inode, off);
                    }
                }
            }
        }
        Ok(())
    }

    /// Where a governor taking over would read on from (see [`Resume`]).
    pub fn resume(&self) -> Resume {
        Resume {
            vms: self
                .vms
                .iter()
                .map(|v| ResumeVm {
                    vm: v.name.clone(),
                    written_log: v.written_log,
                    files: v
                        .tails
                        .iter()
                        .map(|t| ResumeFile { path: t.path.clone(), inode: t.written_at.0, offset: t.written_at.1 })
                        .collect(),
                })
                .collect(),
        }
    }

    pub fn stats(&self) -> Vec<LogStat> {
        self.vms
            .iter()
            .map(|v| LogStat {
                vm: v.name.clone(),
                pending: v.pending.len() as u64,
                written_log_seq: v.written_log,
                dropped: v.dropped,
            })
            .collect()
    }
}

/// One line of a VM's log file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// The log VM's number for it (1, 2, 3... per VM).
    pub seq: u64,
    /// The line goes on in the next record (it was longer than a record).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cont: bool,
    pub text: String,
}

/// A VM's log lines from `dir` (its rotated file first), from `since` on.
pub fn read(dir: &Path, vm: &str, since: u64) -> std::io::Result<Vec<LogLine>> {
    let path = dir.join(format!("{vm}.log"));
    let mut out = Vec::new();
    for p in [crate::placement::audit::rotated(&path), path] {
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for l in text.lines() {
            let line: LogLine = serde_json::from_str(l)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", p.display())))?;
            if line.seq >= since {
                out.push(line);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn lines_flow_from_files_to_the_log_once_through_acks() {
        let dir = std::env::temp_dir().join(format!("governor-logs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let src = dir.join("a.out");
        std::fs::write(&src, "old line\n").expect("src");
        let mut pipe = LogPipe::new(1, &[("a".into(), vec![src.clone()])], &dir, 1 << 20, None).expect("pipe");
        let mut f = std::fs::OpenOptions::new().append(true).open(&src).expect("append");
        let long = "x".repeat(TEXT_LEN + 10);
        write!(f, "one\ntwo\n{long}\nhalf").expect("write");
        pipe.capture();
        let b = pipe.batch();
        assert_eq!(b.iter().map(|r| r.host_seq).collect::<Vec<_>>(), vec![1, 2, 3, 4], "the old line is not ours");
        assert_eq!(b[2].flags, FLAG_CONTINUES);
        // Take 1..=2 (an agent would number them 1, 2), then a resend of 1..=4.
        pipe.acked(&[LogAck { slot: 0, first_host: 1, last_host: 2, first_log: 1 }]).expect("ack");
        pipe.acked(&[LogAck { slot: 0, first_host: 1, last_host: 4, first_log: 1 }]).expect("ack again");
        assert!(pipe.acked(&[LogAck { slot: 0, first_host: 1, last_host: 9, first_log: 1 }]).is_err(), "never sent");
        let lines = read(&dir, "a", 0).expect("read");
        assert_eq!(lines.iter().map(|l| l.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(lines[0].text, "one");
        assert!(lines[2].cont && !lines[3].cont);
        assert_eq!(read(&dir, "a", 3).expect("since").len(), 2);
        // The partial line comes once it is finished.
        writeln!(f, " done").expect("finish");
        pipe.capture();
        assert_eq!(pipe.batch().len(), 1);
        assert_eq!(pipe.stats()[0].pending, 1);
        // A governor taking over after a kill reads on just after the last
        // line written: the pending one comes again, nothing written does.
        let r = pipe.resume();
        assert_eq!(r.vms[0].written_log, 4);
        drop(pipe);
        let mut again = LogPipe::new(2, &[("a".into(), vec![src.clone()])], &dir, 1 << 20, Some(&r)).expect("pipe");
        again.capture();
        let b = again.batch();
        assert_eq!(b.len(), 1, "only the line not yet written");
        assert_eq!(b[0].text(), b"half done");
        assert_eq!(again.stats()[0].written_log_seq, 4);
        // A file replaced meanwhile is not read from an offset of the old one.
        std::fs::remove_file(&src).expect("rm");
        std::fs::write(&src, "new file\n").expect("new");
        let fresh = LogPipe::new(3, &[("a".into(), vec![src.clone()])], &dir, 1 << 20, Some(&r)).expect("pipe");
        assert_eq!(fresh.resume().vms[0].files[0].offset, 9, "from its end");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
