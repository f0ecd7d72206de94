//! Reading and writing cgroupfs files, with errors that name the file.

use std::fs;
use std::io;
use std::path::Path;
use std::time::Duration;

use crate::error::CgroupError;
use crate::Result;

/// A whole file held open, read from offset 0 straight into `buf` (grown
/// while the text fills it; the caller's buffer is reused across reads).
/// cgroup files are seq_files, whose read fills the buffer unless the text
/// ends first: a short read is the end, and reading again to see 0 (one
/// more system call) is not needed.
pub fn read_whole_at(f: &fs::File, path: &Path, buf: &mut Vec<u8>) -> Result<()> {
    use std::os::unix::fs::FileExt;
    buf.clear();
    loop {
        let at = buf.len();
        buf.resize(at + 4096.max(buf.capacity() - at), 0);
        let n = f.read_at(&mut buf[at..], at as u64).map_err(CgroupError::io("read", path))?;
        let asked = buf.len() - at;
        buf.truncate(at + n);
        if n < asked {
            return Ok(());
        }
    }
}

pub fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(CgroupError::io("write", path))
}

pub fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(CgroupError::io("read", path))
}

pub fn read_u64(path: &Path) -> Result<u64> {
    let s = read(path)?;
    s.trim().parse().map_err(|_| CgroupError::Parse { path: path.to_path_buf(), what: s.trim().to_string() })
}

/// The value of a `key value` line of a stat file.
pub fn stat_field(path: &Path, key: &str) -> Result<u64> {
    let s = read(path)?;
    parse_stat(&s, key).ok_or_else(|| CgroupError::Parse { path: path.to_path_buf(), what: key.into() })
}

pub fn parse_stat(s: &str, key: &str) -> Option<u64> {
    s.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next() == Some(key)).then(|| f.next()?.parse().ok()).flatten()
    })
}

/// The values of several `key value` lines in one pass over the text.
pub fn parse_stats<const N: usize>(s: &str, keys: &[&str; N]) -> [Option<u64>; N] {
    let mut out = [None; N];
    for l in s.lines() {
        let mut f = l.split_whitespace();
        let Some(k) = f.next() else { continue };
        if let Some(i) = keys.iter().position(|&key| key == k) {
            out[i] = f.next().and_then(|v| v.parse().ok());
        }
    }
    out
}

/// The numbers in a `cgroup.procs`-like file (missing file: none).
pub fn ids(path: &Path) -> Vec<u32> {
    fs::read_to_string(path).map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect()).unwrap_or_default()
}

/// rmdir, retried for a second: exiting tasks keep a cgroup busy for a
/// moment after they are gone from `cgroup.procs`.
pub fn remove_dir(dir: &Path) -> Result<()> {
    let mut last = None;
    for _ in 0..50 {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(CgroupError::io("remove", dir)(last.unwrap_or_else(|| io::Error::other("busy"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_files_of_any_size_into_a_reused_buffer() {
        let dir = std::env::temp_dir().join(format!("cgroupfs-read-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let mut buf = Vec::new();
        for len in [0usize, 5, 4095, 4096, 4097, 10_000] {
            let path = dir.join(format!("f{len}"));
            let text: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            fs::write(&path, &text).expect("write");
            let f = fs::File::open(&path).expect("open");
            read_whole_at(&f, &path, &mut buf).expect("read");
            assert_eq!(buf, text, "{len} bytes");
        }
        fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn stat_lines() {
        let s = "usage_usec 123\nuser_usec 100\nsystem_usec 23\n";
        assert_eq!(parse_stat(s, "usage_usec"), Some(123));
        assert_eq!(parse_stat(s, "system_usec"), Some(23));
        assert_eq!(parse_stat(s, "nope"), None);
        assert_eq!(parse_stat("usage_usec x", "usage_usec"), None);
        assert_eq!(parse_stats(s, &["system_usec", "nope", "usage_usec"]), [Some(23), None, Some(123)]);
    }
}
