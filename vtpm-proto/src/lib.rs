//! Wire formats of xvtpm (TPM command framing is the `tpm-wire` crate): the manager protocol, swtpm's
//! control channel, sealed-state envelopes, deep-quote evidence and its verifier, and the
//! X.509 EK certificates of vTPMs (`ekcert`).
//!
//! This crate does no I/O and contains no `unsafe`: every byte it parses may
//! come from a guest or a peer, so every parser is a checked constructor that
//! returns an error carrying the offending numbers.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod swtpm_ctrl;
pub mod mgr;
pub mod listen;
pub mod sealed;
pub mod stateblob;
pub mod merkle;
pub mod evidence;
pub mod verify;
pub mod ekcert;
pub mod credential;
pub mod deepquote_cmd;
pub mod tpm12_compat;
