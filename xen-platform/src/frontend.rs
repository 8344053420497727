//! A userspace tpmif v2 **frontend**, and the chunking layer that carries frames larger than one
//! page over it.
//!
//! A vTPM running in its own Xen domain reaches the manager (vtpmmgr, in dom0) the way Mini-OS
//! stub domains always have: through a tpmif device whose frontend is the vTPM domain and whose
//! backend is the manager. The toolstack creates the device from the vTPM domain's xl config
//! (`vtpm = [ "backend=0,uuid=<vTPM UUID>" ]`): it writes the backend directory
//! `/local/domain/0/backend/vtpm/<vtpm-domid>/0` (with `uuid` and `frontend-id`, which the vTPM
//! domain cannot write — that is where the manager learns who is calling) and the frontend
//! directory `/local/domain/<vtpm-domid>/device/vtpm/0`, which [`Frontend::connect`] drives.
//!
//! # Handshake ([`Frontend::connect`])
//!
//! 1. Read `<dir>/backend` (an absolute path) and `<dir>/backend-id` (a domain id).
//! 2. Grant one zeroed page to the backend domain and allocate an unbound event channel for it
//!    ([`FrontendTransport::share`]).
//! 3. Write `<dir>/ring-ref`, `<dir>/event-channel`, `<dir>/feature-protocol-v2 = 1`, then
//!    `<dir>/state = 3` (Initialised). The backend reads the three keys only once it sees
//!    Initialised, so writing them first stands in for a xenstore transaction.
//! 4. Wait (watching the backend directory, bounded by [`FrontendConfig::connect_timeout`]) until
//!    the backend's `state` is 4 (Connected); a backend in Closing(5)/Closed(6) is an error.
//! 5. Require the backend's `feature-protocol-v2 == "1"`, then write `<dir>/state = 4`.
//!
//! Closing ([`Frontend::close`], or dropping the frontend inside a tokio runtime): `state = 5`,
//! remove `ring-ref` and `event-channel`, `state = 6`, then unshare the page and close the event
//! channel (the backend unmaps on Closed and returns to InitWait, ready for a new frontend).
//!
//! # Page protocol ([`Frontend::transact`] uses it per chunk)
//!
//! Exactly the tpmif v2 of [`crate::tpmif`], from the other side: copy the packet to offset 8,
//! write `length` (host-endian u32), fence, write `state = 1` (SUBMIT), notify; wait for
//! `state = 2` (FINISH), read `length` once, require `1 ..= 4088`, copy that many bytes from
//! offset 8. `nr_extra_pages` stays 0. A request that does not finish within
//! [`FrontendConfig::request_timeout`] gets `state = 3` (CANCEL) and poisons the link: the
//! backend may still answer it later, so every further call fails until a reconnect.
//!
//! # Chunking layer (byte for byte)
//!
//! The payloads are length-prefixed frames: `len: u32 big-endian ‖ len bytes`
//! (the manager protocol, `vtpm_proto::mgr`). One page carries at most 4088 bytes; a deep-quote
//! reply is up to ~8 KiB. So:
//!
//! * **Request**: one SUBMIT carrying the whole frame, `4 + len` bytes, at most **4088** bytes
//!   in total. [`Frontend::transact`] refuses larger requests locally
//!   ([`FrontendError::RequestTooLarge`]); nothing is sent. (A backend receiving a page length
//!   of 0 or above 4088 answers what its caller chose, see below.)
//! * **Reply, first chunk**: the FINISH of that SUBMIT carries bytes `[0, min(T, 4088))` of the
//!   reply frame `R` (`T = |R| = 4 + len`). The frontend reads `len` from the first four bytes
//!   and checks it against [`FrontendConfig::max_reply`] before allocating.
//! * **Reply, further chunks**: while it holds fewer than `T` bytes, the frontend SUBMITs exactly
//!   the four bytes **`43 4F 4E 54`** (ASCII `CONT`). The backend answers the next
//!   `min(T − sent, 4088)` bytes of `R`. Chunks are never empty; the frontend rejects a chunk that
//!   would overrun `T`.
//! * `CONT` can never be mistaken for a frame: as a length prefix it would be `0x434F4E54`
//!   (1 129 270 868) bytes, far above any frame limit.
//! * Any non-`CONT` request discards a reply remainder the backend still holds (the frontend gave
//!   up on it). A `CONT` with no remainder is answered with a complete error frame of the
//!   manager protocol; a frontend following these rules never sends one.
//! * If the backend's page layer rejects a request (length 0 or above 4088) or the backend's
//!   reply chunk (empty or above 4088), it answers with the bytes its caller supplied
//!   ([`crate::tpmif::Rejections`]); the manager answers a complete error frame of the manager
//!   protocol, which the frontend returns like any other reply.
//!
//! # Where to use it
//!
//! This crate stays ignorant of what the frames mean: the vTPM domain encodes a
//! `VtpmRequest` with `vtpm_proto::mgr::encode`, calls [`Frontend::transact`], and decodes the
//! reply (after the 4-byte prefix). Give the frontend its own xenstore client (its watch events
//! are consumed during [`Frontend::connect`]).

use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};
use std::time::Duration;

use tokio::time::Instant;

use crate::ids::{DomId, EvtchnPort, GrantRef, ParseError, XenbusState};
use crate::tpmif::{
    DATA_OFFSET, Header, MAX_PACKET, OFFSET_LENGTH, OFFSET_STATE, OutOfBounds, PageState,
    SharedPage,
};
use crate::xenbus::{Connection, TransportError};
use crate::xenstore::{WatchEvents, Xenstore, XsError};

/// The four bytes a frontend SUBMITs to fetch the next chunk of a reply (`"CONT"`).
pub const CONT: [u8; 4] = *b"CONT";

/// Largest request frame: one page of packet.
pub const MAX_REQUEST: usize = MAX_PACKET;

/// Grants our page and allocates our event channel: libxengntshr + libxenevtchn in production
/// (`xen::XenFrontendTransport`), memory in tests (`fake::FakeFrontendTransport`).
pub trait FrontendTransport: Send {
    /// The shared page plus the event channel; dropping it unbinds and unshares.
    type Link: Connection + 'static;

    /// Grants a fresh zeroed page to `backend` (read/write) and allocates an unbound event
    /// channel port that `backend` may bind.
    fn share(&mut self, backend: DomId) -> Result<SharedRing<Self::Link>, TransportError>;
}

/// What [`FrontendTransport::share`] produced: the values to publish and the live link.
pub struct SharedRing<L> {
    /// Grant reference of the page (published as `ring-ref`).
    pub ring_ref: GrantRef,
    /// Our unbound port (published as `event-channel`).
    pub port: EvtchnPort,
    /// The page and the channel.
    pub link: L,
}

/// Timeouts and limits of a [`Frontend`].
#[derive(Debug, Clone, Copy)]
pub struct FrontendConfig {
    /// How long [`Frontend::connect`] waits for the backend to reach Connected.
    pub connect_timeout: Duration,
    /// How long one page exchange (one chunk) may take.
    pub request_timeout: Duration,
    /// Largest reply payload (after the 4-byte prefix) accepted; checked before allocating.
    pub max_reply: usize,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        FrontendConfig {
            connect_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            max_reply: 1 << 20,
        }
    }
}

/// A frontend failure; each names the key, value or limit involved.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// A xenstore operation failed.
    #[error(transparent)]
    Xenstore(#[from] XsError),
    /// A xenstore value did not parse.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// A required key is absent (is the domain's xl config missing its `vtpm=` line?).
    #[error(
        "missing xenstore key {path:?} (does the domain's xl config have `vtpm = [\"backend=0,uuid=...\"]`?)"
    )]
    Missing {
        /// Full path of the key.
        path: String,
    },
    /// `backend` is not an absolute path.
    #[error("invalid backend path {value:?} at {path:?}")]
    BadBackendPath {
        /// Path of the `backend` key.
        path: String,
        /// Its value (truncated).
        value: String,
    },
    /// Granting the page or allocating the channel, or notifying, failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The backend is closing or closed.
    #[error("backend {path:?} is in state {state} (detached, or the manager refused this domain)")]
    BackendClosed {
        /// Path of the backend's `state`.
        path: String,
        /// Its state.
        state: XenbusState,
    },
    /// The backend does not speak protocol v2.
    #[error("backend {path:?} is {value:?}: vTPM protocol 2 required")]
    ProtocolV2Required {
        /// Path of the backend's `feature-protocol-v2`.
        path: String,
        /// Its value, if any (truncated).
        value: Option<String>,
    },
    /// Waiting for the backend timed out.
    #[error(
        "timed out after {after:?} waiting for {what} (is vtpmmgr serving Xen links, and was this domain attached with `VtpmAttachDomain`?)"
    )]
    Timeout {
        /// What we waited for.
        what: &'static str,
        /// How long.
        after: Duration,
    },
    /// An earlier request timed out; the link state is unknown.
    #[error("an earlier request on this link timed out; reconnect")]
    Poisoned,
    /// The request frame does not fit one page.
    #[error("request frame of {len} bytes exceeds the {MAX_REQUEST}-byte page limit")]
    RequestTooLarge {
        /// Its length.
        len: usize,
    },
    /// The bytes passed to [`Frontend::transact`] or received are not a well-formed frame.
    #[error("malformed frame: {0}")]
    BadFrame(String),
    /// The reply announces more than [`FrontendConfig::max_reply`] bytes.
    #[error("reply of {len} bytes exceeds the {max}-byte limit")]
    ReplyTooLarge {
        /// Announced length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The backend wrote a page state a backend must not write (IDLE after SUBMIT, or garbage).
    #[error("backend wrote page state {0} in answer to SUBMIT")]
    BadPageState(u8),
    /// A page access was out of bounds (a bug).
    #[error(transparent)]
    Page(#[from] OutOfBounds),
}

/// A connected tpmif frontend. Drop closes it (inside a tokio runtime; see [`close`](Self::close)).
pub struct Frontend<X: Xenstore + 'static, L: Connection + 'static> {
    xs: Arc<X>,
    dir: String,
    backend_path: String,
    backend_id: DomId,
    link: Option<L>,
    cfg: FrontendConfig,
    poisoned: bool,
}

fn shown(value: &str) -> String {
    value.chars().take(64).collect()
}

async fn read_required(xs: &impl Xenstore, path: &str) -> Result<String, FrontendError> {
    xs.read(path).await?.ok_or_else(|| FrontendError::Missing {
        path: path.to_owned(),
    })
}

impl<X: Xenstore + 'static, L: Connection + 'static> Frontend<X, L> {
    /// Runs the handshake on the frontend directory `dir` (e.g.
    /// `/local/domain/<us>/device/vtpm/0`, or the relative `device/vtpm/0` with a real
    /// xenstore). `events` must be `xs`'s watch queue. See the [module docs](self).
    pub async fn connect<T>(
        xs: Arc<X>,
        events: &mut WatchEvents,
        transport: &mut T,
        dir: &str,
        cfg: FrontendConfig,
    ) -> Result<Self, FrontendError>
    where
        T: FrontendTransport<Link = L>,
    {
        let dir = dir.trim_end_matches('/').to_owned();
        let be_key = format!("{dir}/backend");
        let backend_path = read_required(&*xs, &be_key).await?;
        if !backend_path.starts_with('/') || backend_path.len() < 2 {
            return Err(FrontendError::BadBackendPath {
                path: be_key,
                value: shown(&backend_path),
            });
        }
        let backend_path = backend_path.trim_end_matches('/').to_owned();
        let id_key = format!("{dir}/backend-id");
        let backend_id = DomId::parse(&id_key, read_required(&*xs, &id_key).await?.trim())?;

        let ring = transport.share(backend_id)?;
        let mut fe = Frontend {
            xs,
            dir,
            backend_path,
            backend_id,
            link: Some(ring.link),
            cfg,
            poisoned: false,
        };
        match fe.handshake(events, ring.ring_ref, ring.port).await {
            Ok(()) => Ok(fe),
            Err(e) => {
                if let Some(link) = fe.link.take() {
                    shutdown(&*fe.xs, &fe.dir, link).await;
                }
                Err(e)
            }
        }
    }

    async fn handshake(
        &mut self,
        events: &mut WatchEvents,
        ring_ref: GrantRef,
        port: EvtchnPort,
    ) -> Result<(), FrontendError> {
        let (xs, dir, be) = (&*self.xs, &self.dir, &self.backend_path);
        xs.write(&format!("{dir}/ring-ref"), &ring_ref.to_string())
            .await?;
        xs.write(&format!("{dir}/event-channel"), &port.to_string())
            .await?;
        xs.write(&format!("{dir}/feature-protocol-v2"), "1").await?;
        xs.write(&format!("{dir}/state"), XenbusState::Initialised.as_value())
            .await?;

        let state_key = format!("{be}/state");
        xs.watch(be).await?;
        let waited = wait_backend_connected(xs, events, &state_key, self.cfg.connect_timeout).await;
        let _ = xs.unwatch(be).await;
        waited?;

        let v2_key = format!("{be}/feature-protocol-v2");
        let v2 = xs.read(&v2_key).await?;
        if v2.as_deref() != Some("1") {
            return Err(FrontendError::ProtocolV2Required {
                path: v2_key,
                value: v2.as_deref().map(shown),
            });
        }
        xs.write(&format!("{dir}/state"), XenbusState::Connected.as_value())
            .await?;
        xvtpm_log::host_debug!(frontend = %dir, backend = %be, "tpmif frontend connected");
        Ok(())
    }

    /// The backend domain.
    pub fn backend_id(&self) -> DomId {
        self.backend_id
    }

    /// The backend directory (from our `backend` key).
    pub fn backend_path(&self) -> &str {
        &self.backend_path
    }

    /// The frontend directory.
    pub fn dir(&self) -> &str {
        &self.dir
    }

    /// Sends one request frame (`u32 BE length ‖ payload`, at most 4088 bytes in total) and
    /// returns the whole reply frame (prefix included), fetching further chunks with `CONT`.
    pub async fn transact(&mut self, frame: &[u8]) -> Result<Vec<u8>, FrontendError> {
        if frame.len() > MAX_REQUEST {
            return Err(FrontendError::RequestTooLarge { len: frame.len() });
        }
        let declared = frame
            .get(..4)
            .map(|p| u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize);
        if declared != Some(frame.len().wrapping_sub(4)) {
            return Err(FrontendError::BadFrame(format!(
                "request of {} bytes does not carry a matching 4-byte length prefix",
                frame.len()
            )));
        }
        let mut reply = self.exchange(frame).await?;
        let total = {
            let prefix: [u8; 4] =
                reply
                    .get(..4)
                    .and_then(|p| p.try_into().ok())
                    .ok_or_else(|| {
                        FrontendError::BadFrame(format!("reply chunk of {} bytes", reply.len()))
                    })?;
            let len = u32::from_be_bytes(prefix) as usize;
            if len > self.cfg.max_reply {
                return Err(FrontendError::ReplyTooLarge {
                    len,
                    max: self.cfg.max_reply,
                });
            }
            4 + len
        };
        if reply.len() > total {
            return Err(FrontendError::BadFrame(format!(
                "first chunk of {} bytes overruns the {total}-byte reply",
                reply.len()
            )));
        }
        reply.reserve_exact(total - reply.len());
        while reply.len() < total {
            let chunk = self.exchange(&CONT).await?;
            if reply.len() + chunk.len() > total {
                return Err(FrontendError::BadFrame(format!(
                    "chunk of {} bytes overruns the {total}-byte reply at offset {}",
                    chunk.len(),
                    reply.len()
                )));
            }
            reply.extend_from_slice(&chunk);
        }
        Ok(reply)
    }

    /// One SUBMIT → FINISH exchange of at most one page.
    async fn exchange(&mut self, packet: &[u8]) -> Result<Vec<u8>, FrontendError> {
        if self.poisoned {
            return Err(FrontendError::Poisoned);
        }
        let link = self.link.as_ref().ok_or(FrontendError::Poisoned)?;
        let page = link.page();
        page.write_bytes(DATA_OFFSET, packet)?;
        page.write_u32_ne(OFFSET_LENGTH, packet.len() as u32)?;
        fence(Ordering::SeqCst);
        page.write_u8(OFFSET_STATE, PageState::Submit as u8)?;
        fence(Ordering::SeqCst);
        link.notify()?;

        let deadline = Instant::now() + self.cfg.request_timeout;
        loop {
            let header = Header::read_from(page)?;
            match PageState::try_from(header.state) {
                Ok(PageState::Finish) => {
                    let len = header.length as usize;
                    if len == 0 || len > MAX_PACKET {
                        return Err(FrontendError::BadFrame(format!(
                            "backend answered with page length {len}"
                        )));
                    }
                    let mut out = vec![0u8; len];
                    page.read_bytes(DATA_OFFSET, &mut out)?;
                    return Ok(out);
                }
                Ok(PageState::Submit | PageState::Cancel) => {}
                Ok(PageState::Idle) => return Err(FrontendError::BadPageState(header.state)),
                Err(raw) => return Err(FrontendError::BadPageState(raw)),
            }
            let now = Instant::now();
            if now >= deadline {
                self.poisoned = true;
                page.write_u8(OFFSET_STATE, PageState::Cancel as u8)?;
                let _ = link.notify();
                return Err(FrontendError::Timeout {
                    what: "the backend's answer (FINISH)",
                    after: self.cfg.request_timeout,
                });
            }
            // Events are the fast path; the bounded wait re-checks the page even if a
            // notification was consumed before we started waiting.
            let wait = (deadline - now).min(Duration::from_millis(200));
            if let Ok(Err(e)) = tokio::time::timeout(wait, link.wait_event()).await {
                return Err(e.into());
            }
        }
    }

    /// Closes the device: Closing, remove `ring-ref`/`event-channel`, Closed; then unshares
    /// the page and closes the channel.
    pub async fn close(mut self) {
        if let Some(link) = self.link.take() {
            shutdown(&*self.xs, &self.dir, link).await;
        }
    }
}

impl<X: Xenstore + 'static, L: Connection + 'static> Frontend<X, L> {
    /// Releases the page and the channel without touching xenstore: for a backend domain that
    /// is gone, whose directories (the frontend's among them, when it lived there) went with it.
    /// Writing the frontend's state then would only make those keys again under a dead domain.
    pub fn abandon(mut self) {
        drop(self.link.take());
        xvtpm_log::host_debug!(frontend = %self.dir, "tpmif frontend abandoned (its backend domain is gone)");
    }
}

impl<X: Xenstore + 'static, L: Connection + 'static> Drop for Frontend<X, L> {
    fn drop(&mut self) {
        let Some(link) = self.link.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let xs = self.xs.clone();
                let dir = self.dir.clone();
                rt.spawn(async move { shutdown(&*xs, &dir, link).await });
            }
            Err(_) => xvtpm_log::host_warn!(
                frontend = %self.dir,
                "tpmif frontend dropped outside a tokio runtime: page released without closing the device"
            ),
        }
    }
}

/// The backend's half of the chunking layer (see the [module docs](self)), one per device:
/// holds the unsent remainder of the last reply.
#[derive(Debug, Default)]
pub struct ReplyChunker {
    pending: Vec<u8>,
    sent: usize,
}

impl ReplyChunker {
    /// A chunker with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `request` is a `CONT` (fetch the next chunk).
    pub fn is_cont(request: &[u8]) -> bool {
        request == CONT
    }

    /// Starts answering with `reply` (a whole frame): returns its first chunk (at most 4088
    /// bytes) and keeps the rest for [`next_chunk`](Self::next_chunk). Discards any earlier
    /// remainder.
    pub fn start(&mut self, reply: Vec<u8>) -> Vec<u8> {
        if reply.len() <= MAX_PACKET {
            self.discard();
            return reply;
        }
        self.pending = reply;
        self.sent = MAX_PACKET;
        self.pending[..MAX_PACKET].to_vec()
    }

    /// The next chunk for a `CONT`; `None` when nothing is pending.
    pub fn next_chunk(&mut self) -> Option<Vec<u8>> {
        if self.sent >= self.pending.len() {
            self.discard();
            return None;
        }
        let end = (self.sent + MAX_PACKET).min(self.pending.len());
        let chunk = self.pending[self.sent..end].to_vec();
        self.sent = end;
        if self.sent == self.pending.len() {
            self.discard();
        }
        Some(chunk)
    }

    /// Forgets any remainder (the frontend sent a new request, or went away).
    pub fn discard(&mut self) {
        self.pending.fill(0);
        self.pending = Vec::new();
        self.sent = 0;
    }

    /// Bytes still to send.
    pub fn remaining(&self) -> usize {
        self.pending.len() - self.sent
    }
}

/// `80 01 00 00 00 0A rc`: the page layer's own error answer (never a valid frame prefix).
async fn wait_backend_connected(
    xs: &impl Xenstore,
    events: &mut WatchEvents,
    state_key: &str,
    timeout: Duration,
) -> Result<(), FrontendError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(raw) = xs.read(state_key).await? {
            match XenbusState::parse(state_key, raw.trim())? {
                XenbusState::Connected => return Ok(()),
                state @ (XenbusState::Closing | XenbusState::Closed) => {
                    return Err(FrontendError::BackendClosed {
                        path: state_key.to_owned(),
                        state,
                    });
                }
                _ => {}
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(FrontendError::Timeout {
                what: "the backend to reach Connected(4)",
                after: timeout,
            });
        }
        // Level-triggered: any event (or a periodic re-read) means "look again".
        let wait = (deadline - now).min(Duration::from_millis(500));
        let _ = tokio::time::timeout(wait, events.next()).await;
    }
}

async fn shutdown<L>(xs: &impl Xenstore, dir: &str, link: L) {
    let steps: [(&str, Option<&str>); 4] = [
        ("state", Some(XenbusState::Closing.as_value())),
        ("ring-ref", None),
        ("event-channel", None),
        ("state", Some(XenbusState::Closed.as_value())),
    ];
    for (key, value) in steps {
        let path = format!("{dir}/{key}");
        let r = match value {
            Some(v) => xs.write(&path, v).await,
            None => xs.rm(&path).await,
        };
        if let Err(e) = r {
            xvtpm_log::host_warn!(error = %e, "closing the tpmif frontend");
        }
    }
    drop(link);
    xvtpm_log::host_debug!(frontend = %dir, "tpmif frontend closed");
}

#[cfg(test)]
#[path = "frontend_tests.rs"]
mod tests;
