//! Network interfaces: names to ifindex, and the kernel's own statistics
//! (the ground truth the tc counters are checked against).

use std::ffi::CString;
use std::fs;
use std::io;
use std::path::Path;

/// The ifindex of an interface in this network namespace.
pub fn ifindex(name: &str) -> io::Result<u32> {
    if name.is_empty() || name.len() >= libc::IF_NAMESIZE || name.contains('/') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a valid interface name"));
    }
    let c = CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))?;
    // SAFETY: valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(io::Error::new(io::ErrorKind::NotFound, "no such interface"));
    }
    Ok(idx)
}

/// Counters from /sys/class/net/NAME/statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfStats {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
}

pub fn stats(name: &str) -> io::Result<IfStats> {
    let dir = Path::new("/sys/class/net").join(name).join("statistics");
    let read = |f: &str| -> io::Result<u64> {
        let s = fs::read_to_string(dir.join(f))?;
        s.trim().parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("{f}: {s:?}")))
    };
    Ok(IfStats {
        rx_bytes: read("rx_bytes")?,
        rx_packets: read("rx_packets")?,
        tx_bytes: read("tx_bytes")?,
        tx_packets: read("tx_packets")?,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_exists() {
        assert_eq!(super::ifindex("lo").expect("lo"), 1);
        assert!(super::ifindex("no-such-if0").is_err());
        assert!(super::ifindex("a/b").is_err());
        assert!(super::stats("lo").is_ok());
    }
}
