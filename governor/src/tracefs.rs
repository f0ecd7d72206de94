//! tracefs and bpffs: mounted when missing (this machine boots without
//! them), and the tracepoint formats the kernel programs read fields by.

use std::ffi::CString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

pub const TRACEFS: &str = "/sys/kernel/tracing";
pub const BPFFS: &str = "/sys/fs/bpf";

#[derive(Debug, Error)]
pub enum TracefsError {
    #[error("mount {fstype} on {target}: {source}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("tracepoint {event} has no field {field} (format: {path})")]
    NoField { event: String, field: String, path: PathBuf },
}

fn mounted(target: &str, fstype: &str) -> bool {
    fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 2 && f[1] == target && f[2] == fstype
            })
        })
        .unwrap_or(false)
}

fn mount(fstype: &'static str, target: &'static str) -> Result<(), TracefsError> {
    if mounted(target, fstype) {
        return Ok(());
    }
    let err = |source| TracefsError::Mount { fstype, target, source };
    fs::create_dir_all(target).map_err(err)?;
    let src = CString::new(fstype).map_err(|e| err(io::Error::other(e)))?;
    let tgt = CString::new(target).map_err(|e| err(io::Error::other(e)))?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), src.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}

/// Mount tracefs and bpffs if this host booted without them.
pub fn ensure_mounts() -> Result<(), TracefsError> {
    mount("tracefs", TRACEFS)?;
    mount("bpf", BPFFS)
}

/// Byte offset of `field` in the record of tracepoint `event`
/// ("category/name"), from its tracefs `format` file.
pub fn field_offset(event: &str, field: &str) -> Result<u32, TracefsError> {
    let path = Path::new(TRACEFS).join("events").join(event).join("format");
    let text = fs::read_to_string(&path).map_err(|source| TracefsError::Read { path: path.clone(), source })?;
    parse_offset(&text, field).ok_or(TracefsError::NoField { event: event.into(), field: field.into(), path })
}

/// A format line looks like
/// `\tfield:pid_t prev_pid;\toffset:24;\tsize:4;\tsigned:1;`.
fn parse_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';');
        let decl = parts.next()?.trim().strip_prefix("field:")?;
        // The name is the last word, minus any array suffix.
        let name = decl.split_whitespace().last()?.split('[').next()?;
        if name != field {
            return None;
        }
        parts.find_map(|p| p.trim().strip_prefix("offset:")?.parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::parse_offset;

    const SWITCH: &str = "name: sched_switch\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\n\tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\tfield:pid_t prev_pid;\toffset:24;\tsize:4;\tsigned:1;\n\tfield:long prev_state;\toffset:32;\tsize:8;\tsigned:1;\n\tfield:__data_loc char[] comm;\toffset:12;\tsize:4;\tsigned:0;\n";

    #[test]
    fn offsets() {
        assert_eq!(parse_offset(SWITCH, "prev_pid"), Some(24));
        assert_eq!(parse_offset(SWITCH, "prev_state"), Some(32));
        assert_eq!(parse_offset(SWITCH, "prev_comm"), Some(8));
        assert_eq!(parse_offset(SWITCH, "comm"), Some(12));
        assert_eq!(parse_offset(SWITCH, "next_pid"), None);
    }
}
