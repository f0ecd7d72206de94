//! Every mailbox decoder on arbitrary bytes: must return Ok or a typed error,
//! never panic, loop or read out of bounds. Each input is also tried with its
//! payload CRC fixed up, to reach the checks behind the checksum; a decoded
//! message must survive an encode/decode round trip.
#![no_main]

use card_link::mailbox::{
    decode_events, decode_vm_list, fused_ring, DmaDesc, Message, VmSpec, DEFAULT_SLOT_SIZE, HEADER_LEN,
};
use libfuzzer_sys::fuzz_target;

fn with_crc(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    if v.len() >= HEADER_LEN {
        let len = u32::from_le_bytes([v[20], v[21], v[22], v[23]]) as usize;
        if let Some(p) = v.get(HEADER_LEN..HEADER_LEN.saturating_add(len)) {
            let crc = crc32fast::hash(p);
            v[40..44].copy_from_slice(&crc.to_le_bytes());
        }
    }
    v
}

fuzz_target!(|data: &[u8]| {
    let max = DEFAULT_SLOT_SIZE as usize - HEADER_LEN;
    for buf in [data.to_vec(), with_crc(data)] {
        if let Ok(m) = Message::decode(&buf, max) {
            assert_eq!(Message::decode(&m.encode(), max).ok().as_ref(), Some(&m));
            let _ = decode_vm_list(&m.payload);
            let _ = decode_events(&m.payload);
            let _ = VmSpec::decode(&m.payload);
            let _ = DmaDesc::decode(&m.payload);
        }
        let _ = Message::peek_payload_len(&buf);
        let _ = fused_ring(&buf);
    }
    let _ = decode_vm_list(data);
    let _ = decode_events(data);
    let _ = VmSpec::decode(data);
});
