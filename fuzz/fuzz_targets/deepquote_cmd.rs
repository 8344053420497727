//! The deep-quote vendor command and the GetCapability patch: never panic;
//! an accepted command re-encodes to the same packet.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vtpm_proto::deepquote_cmd::{DeepQuoteCommand, patch_getcap_response};

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = DeepQuoteCommand::parse(data) {
        let again = c.encode();
        assert_eq!(DeepQuoteCommand::parse(&again), Ok(c));
    }
    let (a, b) = data.split_at(data.len() / 2);
    let _ = patch_getcap_response(a, b);
});
