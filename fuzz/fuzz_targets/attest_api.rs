//! The attestation service's request parsing: method + path routing (UUID path parameters)
//! and the JSON bodies of /v1/activate and /v1/vtpms/{uuid}/deep-quote. Never a panic; a
//! parsed quote request always encodes to a command the vTPM's parser accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vtpm_proto::attest_api::{ActivateRequest, QuoteRequest, route};

fuzz_target!(|data: &[u8]| {
    let (head, body) = data.split_at(data.len().min(64));
    if let Ok(s) = std::str::from_utf8(head) {
        let (method, path) = s.split_once(' ').unwrap_or(("GET", s));
        let _ = route(method, path);
    }
    let _ = ActivateRequest::parse(body);
    if let Ok(cmd) = QuoteRequest::parse(body) {
        let packet = cmd.encode();
        assert_eq!(vtpm_proto::deepquote_cmd::DeepQuoteCommand::parse(&packet), Ok(cmd));
    }
});
