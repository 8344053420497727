//! Fuzz bytes become the shared page (and, past 4096, the handler's response length); one
//! `backend_step` runs; `check_step_invariants` asserts that nothing is accessed outside the
//! page, that every SUBMIT ends in FINISH with 0 < length ≤ 4088, that only `length`, `state`
//! and the response bytes change, and that IDLE/FINISH/unknown states change nothing.
#![no_main]

use libfuzzer_sys::{Corpus, fuzz_target};
use xen_platform::tpmif::{HEADER_SIZE, testing::check_step_invariants};

fuzz_target!(|data: &[u8]| -> Corpus {
    if data.len() < HEADER_SIZE {
        return Corpus::Reject;
    }
    check_step_invariants(data);
    Corpus::Keep
});
