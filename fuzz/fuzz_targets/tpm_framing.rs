//! Guest TPM packets: the framing check never panics, and whatever it
//! accepts has a header whose size equals the packet length.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tpm_wire::{Family, parse_command};

fuzz_target!(|data: &[u8]| {
    for family in [Family::Tpm2, Family::Tpm12] {
        if let Ok(h) = parse_command(data, family, 4096) {
            assert_eq!(h.size as usize, data.len());
            assert!(data.len() <= 4096 && data.len() >= 10);
        }
    }
});
