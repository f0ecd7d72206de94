//! The BAR0 register snapshot decoder on arbitrary bytes, and the rate
//! computation on two decoded snapshots: Ok or a typed error, never a panic.
#![no_main]

use card_link::abi::{utilisation, RegisterSnapshot};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let half = data.len() / 2;
    let a = RegisterSnapshot::decode(&data[..half]);
    let b = RegisterSnapshot::decode(&data[half..]);
    let c = RegisterSnapshot::decode(data);
    if let Ok(s) = &c {
        // A valid snapshot re-encodes to a valid snapshot of the same content.
        assert_eq!(RegisterSnapshot::decode(&s.encode()).ok().as_ref(), Some(s));
    }
    if let (Ok(a), Ok(b)) = (a, b) {
        if let Ok(u) = utilisation(&a, &b) {
            assert!(u.interval_s > 0.0);
        }
    }
});
