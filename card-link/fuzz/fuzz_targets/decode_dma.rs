//! The ABI 1.3 DMA descriptor (the payload of snapshot-read-dma and
//! restore-write-dma) on arbitrary bytes, on both sides' checks: decode
//! must give a descriptor or a typed error, and a decoded descriptor's
//! placement in any mapping must be inside it or refused, never overflow.
#![no_main]

use card_link::mailbox::{DmaDesc, MAX_DMA_CHUNK};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(d) = DmaDesc::decode(data.get(..16).unwrap_or(data)) else { return };
    assert!(d.len >= 1 && d.len <= MAX_DMA_CHUNK);
    assert_eq!(DmaDesc::decode(&d.encode()).ok(), Some(d));
    // A mapping described by the rest of the input (base, size).
    let word = |i: usize| data.get(i..i + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
    let (base, size) = (word(16).unwrap_or(0), word(24).unwrap_or(u64::MAX));
    if let Ok(off) = d.offset_in(base, size) {
        let end = off as u64 + d.len as u64;
        assert!(end <= size && d.iova >= base && d.iova - base == off as u64);
    }
});
