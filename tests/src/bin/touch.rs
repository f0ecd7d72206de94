//! Test helper: map N MiB of anonymous memory (no huge pages, so every 4 KiB
//! page takes one user-mode fault), touch every page, print "ready", then
//! hold the memory until stdin closes.
//!
//! usage: touch MIB

use std::io::{Read, Write};

fn main() {
    let mib: usize = match std::env::args().nth(1).and_then(|a| a.parse().ok()) {
        Some(m) => m,
        None => {
            eprintln!("usage: touch MIB");
            std::process::exit(2);
        }
    };
    let len = mib << 20;
    // SAFETY: anonymous private mapping, checked for MAP_FAILED below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        eprintln!("mmap {mib} MiB failed");
        std::process::exit(1);
    }
    // SAFETY: p..p+len is our mapping.
    unsafe {
        libc::madvise(p, len, libc::MADV_NOHUGEPAGE);
        let b = p as *mut u8;
        let mut off = 0;
        while off < len {
            std::ptr::write_volatile(b.add(off), 1);
            off += 4096;
        }
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}
