//! Control-channel requests: framing and decoding never panic and never ask
//! for more than the cap.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vtpm_proto::swtpm_ctrl::{MAX_VARIABLE_BODY, body_len, decode};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let code = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    let body = &data[4..];
    if let Ok(Some(n)) = body_len(code, body) {
        assert!(n <= 16 + MAX_VARIABLE_BODY);
        let _ = decode(code, &body[..n.min(body.len())]);
    }
});
