//! The tenant's side of attestation: checking what `vtpm-proto`'s formats carry. The deep-quote
//! verifier (`verify`), EK certificate checks (`ekcert`), credential activation and EK chains
//! for enrollment (`credential`), the host's measured-boot event log with its policy
//! (`eventlog`), and a guest's IMA runtime measurement log (`ima`).
//!
//! Pure: no I/O, no `unsafe`. It depends on `vtpm-proto` (formats), never the reverse; the
//! manager uses it only to check what it has just issued and a transfer's destination.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod verify;
pub mod ekcert;
pub mod credential;
pub mod eventlog;
pub mod ima;
