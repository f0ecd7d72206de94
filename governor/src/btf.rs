//! Just enough of a BTF reader to find struct member offsets and function
//! prototypes in the kernel's own BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The sched_switch program is a BTF-typed raw tracepoint (`tp_btf`: no
//! perf record is built per event, which is most of a tracepoint's cost)
//! and receives `struct task_struct *`; it reads the task's fields (pid,
//! run delay, CPU time, the pointers to its cgroup id) with plain loads at
//! offsets this module finds, passed as read-only globals: CO-RE done at
//! load time. aya parses BTF internally but does not export member lookups,
//! hence this small reader.

use std::path::Path;

use thiserror::Error;

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("BTF has no {0}")]
    NotFound(String),
}

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_PTR: u32 = 2;
const KIND_FUNC_PROTO: u32 = 13;

struct Type {
    name: u32,
    kind: u32,
    vlen: u32,
    kflag: bool,
    size_or_type: u32,
    /// Byte range of the trailing data in the type section.
    extra: (usize, usize),
}

pub struct Btf {
    data: Vec<u8>,
    strs: (usize, usize),
    /// Index 0 is the void type; ids are indices.
    types: Vec<Type>,
}

fn u32_at(d: &[u8], off: usize) -> Result<u32, BtfError> {
    d.get(off..off + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Btf, BtfError> {
        Btf::from_file(Path::new(VMLINUX))
    }

    pub fn from_file(path: &Path) -> Result<Btf, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read { path: path.display().to_string(), source })?;
        Btf::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Btf, BtfError> {
        if data.len() < 24 || data[0..2] != [0x9f, 0xeb] {
            return Err(BtfError::Malformed("bad magic (only little-endian BTF)"));
        }
        let hdr_len = u32_at(&data, 4)? as usize;
        let type_off = u32_at(&data, 8)? as usize;
        let type_len = u32_at(&data, 12)? as usize;
        let str_off = u32_at(&data, 16)? as usize;
        let str_len = u32_at(&data, 20)? as usize;
        let types_at = hdr_len.checked_add(type_off).ok_or(BtfError::Malformed("type offset"))?;
        let types_end = types_at.checked_add(type_len).ok_or(BtfError::Malformed("type length"))?;
        let strs_at = hdr_len.checked_add(str_off).ok_or(BtfError::Malformed("string offset"))?;
        let strs_end = strs_at.checked_add(str_len).ok_or(BtfError::Malformed("string length"))?;
        if types_end > data.len() || strs_end > data.len() {
            return Err(BtfError::Malformed("sections past the end"));
        }
        let mut types = vec![Type { name: 0, kind: 0, vlen: 0, kflag: false, size_or_type: 0, extra: (0, 0) }];
        let mut off = types_at;
        while off < types_end {
            let name = u32_at(&data, off)?;
            let info = u32_at(&data, off + 4)?;
            let size_or_type = u32_at(&data, off + 8)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = info & 0xffff;
            let extra_len = match kind {
                1 | 14 | 17 => 4,                      // INT, VAR, DECL_TAG
                3 => 12,                               // ARRAY
                4 | 5 | 15 | 19 => 12 * vlen as usize, // STRUCT, UNION, DATASEC, ENUM64
                6 | 13 => 8 * vlen as usize,           // ENUM, FUNC_PROTO
                2 | 7..=12 | 16 | 18 => 0,
                _ => return Err(BtfError::Malformed("unknown kind")),
            };
            let start = off + 12;
            let end = start + extra_len;
            if end > types_end {
                return Err(BtfError::Malformed("type runs past the section"));
            }
            types.push(Type { name, kind, vlen, kflag: info >> 31 == 1, size_or_type, extra: (start, end) });
            off = end;
        }
        Ok(Btf { data, strs: (strs_at, strs_end), types })
    }

    fn name(&self, off: u32) -> &str {
        let start = self.strs.0 + off as usize;
        if start >= self.strs.1 {
            return "";
        }
        let s = &self.data[start..self.strs.1];
        let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    fn find(&self, kind: u32, name: &str) -> Option<&Type> {
        self.types.iter().find(|t| t.kind == kind && self.name(t.name) == name)
    }

    /// Byte offset of `member` in `struct strukt` (searching anonymous
    /// structs and unions nested in it, as the kernel's task_struct has).
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let t = self.find(KIND_STRUCT, strukt).ok_or_else(|| BtfError::NotFound(format!("struct {strukt}")))?;
        self.member_bits(t, member, 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::NotFound(format!("member {member} of struct {strukt}")))
    }

    fn member_bits(&self, t: &Type, member: &str, depth: u32) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        for i in 0..t.vlen as usize {
            let at = t.extra.0 + i * 12;
            let name = u32_at(&self.data, at).ok()?;
            let ty = u32_at(&self.data, at + 4).ok()?;
            let raw = u32_at(&self.data, at + 8).ok()?;
            let bits = if t.kflag { raw & 0xff_ffff } else { raw };
            let mname = self.name(name);
            if mname == member {
                return Some(bits);
            }
            if mname.is_empty() {
                let inner = self.types.get(ty as usize)?;
                if inner.kind == KIND_STRUCT || inner.kind == KIND_UNION {
                    if let Some(b) = self.member_bits(inner, member, depth + 1) {
                        return Some(bits + b);
                    }
                }
            }
        }
        None
    }

    /// Number of arguments of raw tracepoint `tp` (without the leading
    /// `void *__data`), from its `btf_trace_<tp>` typedef.
    pub fn raw_tracepoint_args(&self, tp: &str) -> Result<u32, BtfError> {
        let missing = || BtfError::NotFound(format!("btf_trace_{tp}"));
        let td = self.find(KIND_TYPEDEF, &format!("btf_trace_{tp}")).ok_or_else(missing)?;
        let ptr = self.types.get(td.size_or_type as usize).filter(|t| t.kind == KIND_PTR).ok_or_else(missing)?;
        let proto =
            self.types.get(ptr.size_or_type as usize).filter(|t| t.kind == KIND_FUNC_PROTO).ok_or_else(missing)?;
        Ok(proto.vlen.saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_btf() {
        let btf = Btf::from_sys_fs().expect("this kernel exposes BTF at /sys/kernel/btf/vmlinux");
        let pid = btf.member_offset("task_struct", "pid").expect("task_struct.pid");
        let tgid = btf.member_offset("task_struct", "tgid").expect("task_struct.tgid");
        assert_eq!(tgid, pid + 4, "pid and tgid are adjacent pid_t fields");
        assert_eq!(btf.raw_tracepoint_args("sched_switch").expect("sched_switch"), 4);
        assert_eq!(btf.raw_tracepoint_args("sched_wakeup").expect("sched_wakeup"), 1);
        assert!(btf.member_offset("task_struct", "no_such_member").is_err());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Btf::parse(vec![0u8; 10]).is_err());
        let mut d = vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0];
        d.extend_from_slice(&[0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(Btf::parse(d).is_err(), "sections past the end");
    }
}
