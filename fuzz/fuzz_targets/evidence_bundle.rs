//! Evidence bundles come from an untrusted host: decoding and verifying any
//! bytes must return an error, never panic; a decoded bundle re-encodes to
//! the same bytes (the encoding is canonical).
#![no_main]
use libfuzzer_sys::{Corpus, fuzz_target};
use vtpm_proto::evidence::Bundle;
use vtpm_attest::verify::{Expectations, verify};

fuzz_target!(|data: &[u8]| -> Corpus {
    if data.len() < 8 {
        return Corpus::Reject;
    }
    let Ok(b) = Bundle::decode(data) else { return Corpus::Keep };
    assert_eq!(b.encode().expect("a decoded bundle encodes"), data);
    let exp = Expectations::new(b.leaf.nonce.clone(), b.ak_public.clone());
    let _ = verify(&b, &exp);
    Corpus::Keep
});
