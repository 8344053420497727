//! Wire formats of xvtpm (TPM command framing is the `tpm-wire` crate): the manager protocol,
//! swtpm's control channel, sealed-state envelopes, deep-quote evidence and its verifier, the
//! host's measured-boot event log (`eventlog`), and the X.509 EK certificates of vTPMs
//! (`ekcert`).
//!
//! This crate opens nothing (only `mgr_io` reads and writes, on a stream its caller opened) and
//! contains no `unsafe`: every byte it parses may
//! come from a guest or a peer, so every parser is a checked constructor that
//! returns an error carrying the offending numbers.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod swtpm_ctrl;
pub mod mgr;
pub mod mgr_io;
pub mod listen;
pub mod sealed;
pub mod secret;
pub mod stateblob;
pub mod merkle;
pub mod evidence;
pub mod verify;
pub mod ekcert;
pub mod credential;
pub mod eventlog;
pub mod transfer;
pub mod deepquote_cmd;
pub mod tpm12_compat;
