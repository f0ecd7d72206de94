//! Payloads of the mailbox's VM commands (start, list) and the card's event
//! log, with their validating decoders (re-exported from `mailbox`).

use crate::error::{CardError, Result};
use crate::mailbox::{MAX_EVENT_MSG, MAX_NAME, MAX_VMS};
use crate::wire::{Reader, Writer};

fn name_bytes(name: &str) -> Result<&[u8]> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(CardError::Invalid(format!("VM name must be 1..={MAX_NAME} bytes")));
    }
    Ok(name.as_bytes())
}

fn read_name(r: &mut Reader<'_>, len: usize, what: &'static str) -> Result<String> {
    if len > MAX_NAME {
        return Err(CardError::Range { what, value: len as u64, range: "0..=64" });
    }
    let b = r.bytes(len)?;
    String::from_utf8(b.to_vec()).map_err(|_| CardError::Unknown { what, value: len as u64 })
}

/// What the host asks the card to start: a management VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSpec {
    pub name: String,
    pub mem_mib: u32,
    pub vcpus: u32,
}

impl VmSpec {
    pub fn encode(&self) -> Result<Vec<u8>> {
        let name = name_bytes(&self.name)?;
        let mut w = Writer::default();
        w.u32(self.mem_mib).u32(self.vcpus).u16(name.len() as u16).bytes(name);
        Ok(w.buf)
    }
    pub fn decode(buf: &[u8]) -> Result<VmSpec> {
        let mut r = Reader::new(buf, "VM spec");
        let mem_mib = r.u32()?;
        let vcpus = r.u32()?;
        let n = r.u16()? as usize;
        let name = read_name(&mut r, n, "VM name")?;
        if name.is_empty() || !(1..=4096).contains(&mem_mib) || !(1..=8).contains(&vcpus) {
            return Err(CardError::Range {
                what: "VM spec",
                value: mem_mib as u64,
                range: "name 1..=64, mem 1..=4096 MiB, vcpus 1..=8",
            });
        }
        Ok(VmSpec { name, mem_mib, vcpus })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    Running = 1,
    Paused = 2,
    Stopped = 3,
}

impl VmState {
    pub fn from_u8(v: u8) -> Option<VmState> {
        match v {
            1 => Some(VmState::Running),
            2 => Some(VmState::Paused),
            3 => Some(VmState::Stopped),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmInfo {
    pub id: u32,
    pub state: VmState,
    pub name: String,
    pub mem_bytes: u64,
}

pub fn encode_vm_list(vms: &[VmInfo]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u32(vms.len() as u32);
    for v in vms {
        let name = &v.name.as_bytes()[..v.name.len().min(MAX_NAME)];
        w.u32(v.id).u8(v.state as u8).u8(0).u16(name.len() as u16).u64(v.mem_bytes).bytes(name);
    }
    w.buf
}

pub fn decode_vm_list(buf: &[u8]) -> Result<Vec<VmInfo>> {
    let mut r = Reader::new(buf, "VM list");
    let count = r.u32()?;
    if count > MAX_VMS {
        return Err(CardError::Range { what: "VM list count", value: count as u64, range: "0..=256" });
    }
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let id = r.u32()?;
        let st = r.u8()?;
        let state = VmState::from_u8(st).ok_or(CardError::Unknown { what: "VM state", value: st as u64 })?;
        let _pad = r.u8()?;
        let n = r.u16()? as usize;
        let mem_bytes = r.u64()?;
        let name = read_name(&mut r, n, "VM name")?;
        out.push(VmInfo { id, state, name, mem_bytes });
    }
    if r.remaining() != 0 {
        return Err(CardError::Range { what: "VM list trailing bytes", value: r.remaining() as u64, range: "0" });
    }
    Ok(out)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub seq: u64,
    pub time_ns: u64,
    pub vm: u32,
    pub level: u16,
    pub message: String,
}

pub fn encode_events(events: &[Event]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u32(events.len() as u32);
    for e in events {
        let mut m = e.message.as_str();
        while m.len() > MAX_EVENT_MSG {
            // Cut on a char boundary so the card never sends invalid UTF-8.
            let mut cut = MAX_EVENT_MSG;
            while !m.is_char_boundary(cut) {
                cut -= 1;
            }
            m = &m[..cut];
        }
        w.u64(e.seq).u64(e.time_ns).u32(e.vm).u16(e.level).u16(m.len() as u16).bytes(m.as_bytes());
    }
    w.buf
}

/// Events must come in increasing sequence order; the host relies on it to resume.
pub fn decode_events(buf: &[u8]) -> Result<Vec<Event>> {
    let mut r = Reader::new(buf, "event log");
    let count = r.u32()? as usize;
    // Each event takes at least 24 bytes: a count that cannot fit is a lie.
    if count > r.remaining() / 24 {
        return Err(CardError::Range { what: "event count", value: count as u64, range: "fits the payload" });
    }
    let mut out: Vec<Event> = Vec::with_capacity(count);
    for _ in 0..count {
        let seq = r.u64()?;
        let time_ns = r.u64()?;
        let vm = r.u32()?;
        let level = r.u16()?;
        let n = r.u16()? as usize;
        if n > MAX_EVENT_MSG {
            return Err(CardError::Range { what: "event message length", value: n as u64, range: "0..=1024" });
        }
        if level > 4 {
            return Err(CardError::Unknown { what: "event level", value: level as u64 });
        }
        let message = String::from_utf8(r.bytes(n)?.to_vec())
            .map_err(|_| CardError::Unknown { what: "event message (not UTF-8)", value: seq })?;
        if let Some(prev) = out.last() {
            if seq <= prev.seq {
                return Err(CardError::Range { what: "event sequence", value: seq, range: "increasing" });
            }
        }
        out.push(Event { seq, time_ns, vm, level, message });
    }
    if r.remaining() != 0 {
        return Err(CardError::Range { what: "event log trailing bytes", value: r.remaining() as u64, range: "0" });
    }
    Ok(out)
}
