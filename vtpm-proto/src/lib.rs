//! Wire formats of xvtpm (TPM command framing is the `tpm-wire` crate): the manager protocol,
//! swtpm's control channel, sealed-state envelopes, deep-quote evidence and the TPM structures
//! it carries (`tpms`), and the X.509 EK certificates of vTPMs (`ekcert`). Checking evidence,
//! certificates, credentials and event logs for a tenant is `vtpm-attest`'s.
//!
//! This crate opens nothing (only `mgr_io` reads and writes, on a stream its caller opened) and
//! contains no `unsafe`: every byte it parses may
//! come from a guest or a peer, so every parser is a checked constructor that
//! returns an error carrying the offending numbers.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

// Test fixtures shared with other crates' tests name this crate `vtpm_proto`.
#[cfg(test)]
extern crate self as vtpm_proto;

pub mod swtpm_ctrl;
pub mod mgr;
pub mod mgr_io;
pub mod listen;
pub mod sealed;
pub mod secret;
pub mod stateblob;
pub mod merkle;
pub mod evidence;
pub mod tpms;
pub mod ekcert;
pub mod transfer;
pub mod attest_api;
pub mod deepquote_cmd;
pub mod tpm12_compat;
pub mod slots;
