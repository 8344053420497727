//! Guest-written xenstore values (`ring-ref`, `event-channel`, `state`, …) through every parser:
//! no panic, and anything accepted round-trips to the same number.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xen_platform::{DevId, DomId, EvtchnPort, GrantRef, XenbusState};

fuzz_target!(|data: &[u8]| {
    // xenstore-rs hands us UTF-8 only; lossy conversion still covers odd code points.
    let value = String::from_utf8_lossy(data);
    let canonical = |n: u64| {
        value.trim_start_matches('0').is_empty() && n == 0
            || value.trim_start_matches('0') == n.to_string()
    };
    if let Ok(v) = GrantRef::parse("ring-ref", &value) {
        assert!(canonical(u64::from(v.get())));
    }
    if let Ok(v) = EvtchnPort::parse("event-channel", &value) {
        assert!(v.get() != 0 && canonical(u64::from(v.get())));
    }
    if let Ok(v) = DomId::parse("frontend-id", &value) {
        assert!(v.get() < DomId::FIRST_RESERVED && canonical(u64::from(v.get())));
    }
    if let Ok(v) = DevId::parse("handle", &value) {
        assert!(canonical(u64::from(v.get())));
    }
    match XenbusState::parse("state", &value) {
        Ok(s) => assert!(canonical(s as u64)),
        Err(e) => assert!(e.to_string().contains("\"state\"")),
    }
});
