//! xl-vtpm: the dom0 tool of xvtpm.
//!
//! [`admin`] speaks to vtpmmgr's root-only admin socket; [`local`] runs vTPMs
//! as local processes (vtpm-domain serving swtpm's protocol) — the mode used
//! without Xen, by QEMU/KVM hosts and by the test suite; [`vtpmdom`] runs a vTPM
//! as the only program of its own Xen domain; [`xenlife`] couples guests and vTPMs ([`hvm`]: an
//! HVM guest's TPM emulated by its device model);
//! [`ekcert`] exports a group's EK CA and verifies vTPM EK certificates; [`attest`] is the
//! tenant's side: enrollment (AK provenance by credential activation) and `verify`.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod admin;
pub mod attest;
pub mod attest_client;
pub mod crosshost;
pub mod ekcert;
pub mod eventlog;
pub mod exit;
pub mod guest;
pub mod guestmig;
pub mod hvm;
pub mod hvm_acpi;
pub mod local;
pub mod vtpmdom;
pub mod xenlife;
pub mod libvirt_hook;
pub mod libvirt_migrate;
pub mod registry;
pub mod swtpm_compat;
pub mod tenant;
pub mod transfer;
pub mod xlcfg;
mod xs;
