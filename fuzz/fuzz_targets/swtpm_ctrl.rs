//! Control-channel requests: framing and decoding never panic, whatever the
//! body's size.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vtpm_proto::swtpm_ctrl::{Framing, MAX_BODY, announced_len, decode, framing};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let code = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    let body = &data[4..];
    match framing(code) {
        Framing::Fixed { min } => assert!(min <= MAX_BODY),
        Framing::Announced { header, len_at } => {
            assert!(len_at + 4 <= header);
            let _ = announced_len(body, len_at);
        }
    }
    let _ = decode(code, body);
});
