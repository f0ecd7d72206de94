//! Every mailbox decoder on arbitrary bytes: must return Ok or a typed error,
//! never panic, loop or read out of bounds. A decoded message must survive an
//! encode/decode round trip.
#![no_main]

use card_link::mailbox::{decode_events, decode_vm_list, Message, VmSpec, DEFAULT_SLOT_SIZE, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let max = DEFAULT_SLOT_SIZE as usize - HEADER_LEN;
    if let Ok(m) = Message::decode(data, max) {
        assert_eq!(Message::decode(&m.encode(), max).ok().as_ref(), Some(&m));
        let _ = decode_vm_list(&m.payload);
        let _ = decode_events(&m.payload);
    }
    let _ = Message::peek_payload_len(data);
    let _ = decode_vm_list(data);
    let _ = decode_events(data);
    let _ = VmSpec::decode(data);
});
