//! Xen platform layer for xvtpm: how a Xen guest's TPM requests reach a vTPM.
//!
//! - [`ids`]: `DomId`, `GrantRef`, `EvtchnPort`, `DevId`, `XenbusState`, with strict parsers for
//!   (untrusted) xenstore values.
//! - [`tpmif`]: the tpmif v2 shared page exactly as Linux `xen-tpmfront` speaks it, accessed
//!   only by volatile copies ([`tpmif::SharedPage`]), and [`tpmif::backend_step`].
//! - [`xenbus`]: the backend state machine for tpmif devices over the [`xenstore::Xenstore`] and
//!   [`xenbus::Transport`] traits (InitWait → Connected, Closed → InitWait, detach, guest gone).
//! - [`frontend`]: a userspace tpmif frontend ([`frontend::Frontend`]) and the chunking layer
//!   that carries manager-protocol frames larger than a page (a vTPM domain → vtpmmgr in dom0).
//! - [`xenstore`]: the xenstore trait, the coalescing watch queue, and [`xenstore::XsClient`]
//!   (xenstore-rs 0.8.0).
//! - [`xen`]: the production transports, over `xen-sys`'s safe libxenevtchn / libxengnttab /
//!   libxengntshr handles (bindgen and every `unsafe` live there; this crate forbids it).
//! - `fake` (feature `test-utils`): in-memory xenstore and transport.
//!
//! Nothing in this crate knows what the TPM commands mean (a request the page layer rejects is
//! answered with bytes the caller supplies, [`tpmif::Rejections`]): the vTPM engine plugs in as the
//! handler closure of [`tpmif::backend_step`] / [`xenbus::Backend::service`], or takes a request
//! with [`xenbus::Backend::take`] (one copy out of guest memory, and a ticket) and answers it
//! later with [`xenbus::Backend::complete`]; a ticket from before the frontend reconnected is
//! dropped. Either way every SUBMIT of a live connection ends in FINISH.
//!
//! ```no_run
//! # async fn run(mut engine: impl FnMut(&[u8]) -> Vec<u8>) -> Result<(), Box<dyn std::error::Error>> {
//! use xen_platform::{tpmif::{Rejection, Rejections}, xen::XenTransport};
//! use xen_platform::{xenbus::{Activity, Backend}, xenstore::XsClient};
//! // The caller's protocol answers what the page layer rejects (here: two fixed error packets).
//! let rejections = Rejections::new(|why| match why {
//!     Rejection::CommandSize => b"bad command size".to_vec(),
//!     Rejection::ResponseSize => b"bad response size".to_vec(),
//! })?;
//! let (xs, mut events) = XsClient::open().await?;
//! let mut backend = Backend::new(xs, XenTransport::open()?, "backend/vtpm", rejections);
//! backend.start().await?;
//! loop {
//!     match backend.next(&mut events).await {
//!         Activity::Guest(key) => {
//!             let _ = backend.service(key, &mut |cmd, _locality| engine(cmd))?;
//!         }
//!         Activity::Xenstore(device_events) => { /* log them */ }
//!         Activity::GuestError(key, e) => { /* log; the device stays until xenstore says */ }
//!         Activity::XenstoreClosed => break,
//!     }
//! }
//! # Ok(()) }
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod frontend;
pub mod ids;
pub mod tpmif;
pub mod xen;
pub mod xenbus;
pub mod xenstore;

#[cfg(any(test, feature = "test-utils"))]
pub mod fake;

pub use ids::{DevId, DomId, EvtchnPort, GrantRef, ParseError, XenbusState};
