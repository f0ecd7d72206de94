//! Starting a command inside a cgroup: the child joins every hierarchy
//! between fork and exec, so the command's first instruction already runs
//! (and is accounted) in the cgroup.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::cgroup::Cgroup;
use crate::error::CgroupError;
use crate::Result;

impl Cgroup {
    /// Make `cmd` join this cgroup before it execs. Writing "0" to
    /// `cgroup.procs` moves the writer itself, so the child needs no pid
    /// formatting; the paths are prepared here, so the child only calls
    /// open/write/close (async-signal-safe, no allocation after fork).
    pub fn join_on_exec(&self, cmd: &mut Command) -> Result<()> {
        let mut paths = Vec::new();
        for f in self.procs_files() {
            let c =
                CString::new(f.as_os_str().as_bytes()).map_err(|_| CgroupError::BadPath(f.display().to_string()))?;
            paths.push(c);
        }
        // SAFETY: the closure only calls open, write and close on
        // pre-built C strings, all async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                for p in &paths {
                    let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let err = io::Error::last_os_error();
                    libc::close(fd);
                    if n != 1 {
                        return Err(err);
                    }
                }
                Ok(())
            });
        }
        Ok(())
    }
}
