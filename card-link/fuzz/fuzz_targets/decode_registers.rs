//! The BAR0 register snapshot decoder on arbitrary bytes, and the rate
//! computation on two decoded snapshots: Ok or a typed error, never a panic.
//! Each input is tried as is and with its CRC fixed up, so the fuzzer gets
//! past the checksum gate to the range checks behind it.
#![no_main]

use card_link::abi::{utilisation, RegisterSnapshot, BAR0_HEADER_LEN, OFF_CRC, OFF_LEN};
use libfuzzer_sys::fuzz_target;

fn with_crc(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    if v.len() >= BAR0_HEADER_LEN {
        let len = u32::from_le_bytes([v[OFF_LEN], v[OFF_LEN + 1], v[OFF_LEN + 2], v[OFF_LEN + 3]]) as usize;
        if len >= OFF_CRC + 4 && len <= v.len() {
            v[OFF_CRC..OFF_CRC + 4].copy_from_slice(&[0; 4]);
            let crc = crc32fast::hash(&v[..len]);
            v[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        }
    }
    v
}

fuzz_target!(|data: &[u8]| {
    let _ = RegisterSnapshot::decode(data);
    let fixed = with_crc(data);
    let half = fixed.len() / 2;
    let a = RegisterSnapshot::decode(&with_crc(&fixed[..half]));
    let b = RegisterSnapshot::decode(&with_crc(&fixed[half..]));
    if let Ok(s) = RegisterSnapshot::decode(&fixed) {
        // A valid snapshot re-encodes to a valid snapshot of the same content.
        assert_eq!(RegisterSnapshot::decode(&s.encode()).ok().as_ref(), Some(&s));
    }
    if let (Ok(a), Ok(b)) = (a, b) {
        if let Ok(u) = utilisation(&a, &b) {
            assert!(u.interval_s > 0.0);
        }
    }
});
