//! Manager protocol frames from a (possibly compromised) vTPM or admin peer.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vtpm_proto::mgr::{AdminRequest, VtpmRequest, decode, frame_len};

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let _ = frame_len([data[0], data[1], data[2], data[3]]);
    }
    let _ = decode::<VtpmRequest>(data);
    let _ = decode::<AdminRequest>(data);
});
