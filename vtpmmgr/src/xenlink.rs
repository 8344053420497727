//! The manager's Xen link: a tpmif backend in dom0 through which vTPMs running in their own
//! domains reach the manager.
//!
//! Each vTPM domain's xl config carries `vtpm = [ "backend=0,uuid=<vTPM UUID>" ]`, so libxl
//! creates a tpmif device whose **backend is the manager** and whose frontend is the vTPM domain
//! (`xen_platform::frontend`). Manager-protocol frames (`u32` BE length ‖ JSON, see
//! `vtpm_proto::mgr`) ride in the shared page: SUBMIT carries a request frame, FINISH the reply;
//! replies above one page (a deep-quote bundle) are chunked with `CONT` requests as documented
//! byte for byte in `xen_platform::frontend`. Requests above one page (4088 bytes) never arrive
//! (the frontend refuses them); what the page layer rejects is answered with a manager-protocol
//! error frame ([`rejections`]).
//!
//! # Identity
//!
//! Nothing the vTPM domain says about itself is trusted. The caller is the pair the toolstack
//! wrote into the manager's **own** backend directory, `/local/domain/0/backend/vtpm/<fe>/<dev>`:
//! `uuid` (the vTPM) and `frontend-id` (the vTPM domain; the xenbus layer checks it equals
//! `<fe>`). A vTPM domain cannot write there.
//!
//! * A device is taken at all (InitWait written, page mapped) only if that `uuid` names a known
//!   vTPM to which `frontend-id` was attached by `AdminRequest::VtpmAttachDomain` (the Xen
//!   counterpart of the pid attachment). Refused devices are left untouched and logged once;
//!   they are re-checked when their directory changes, when [`XenLink::poker`] is poked (do it
//!   after every admin request) and every [`RECHECK`] while any device is refused.
//! * Every request is authorised again with [`Manager::authorize_domain`](crate::manager::Manager::authorize_domain)
//!   (a detach after connecting takes effect at the next request), and the UUID the vTPM claims
//!   must equal the backend directory's.
//!
//! # Concurrency: deep quotes are answered when ready
//!
//! The link takes each SUBMITted request off its page once (a private copy and a ticket, see
//! `xen_platform::xenbus::Backend::take`). State-key requests are answered at once (a lock and
//! an HKDF). A deep quote or a state anchor is queued with the shared [`Batcher`] / anchorer and
//! the page left in SUBMIT; when the batch is done the reply is completed by its ticket (a
//! ticket from before a reconnect is dropped, and the backend looks at the page again). So the
//! link's task never blocks, other vTPM domains are served meanwhile, and deep quotes from many
//! domains (and from the Unix sockets) share one physical quote — natural batching is preserved.
//! Blocking the handler instead (`block_in_place` + `Handle::block_on`) would have serialised
//! every Xen vTPM behind each physical quote and defeated the batching.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::task::JoinSet;
use xvtpm_log::{guest_info, guest_warn};
use uuid::Uuid;
use vtpm_proto::mgr::{self, ErrorCode, Failure, VtpmReply, VtpmRequest};
use xen_platform::frontend::ReplyChunker;

use xen_platform::tpmif::{MAX_PACKET, Rejection, Rejections};
use xen_platform::xen::XenTransport;
use xen_platform::xenbus::{Backend, BackendEvent, DeviceKey, Take, Ticket, Transport, TransportError};
use xen_platform::xenstore::{WatchEvent, WatchEvents, Xenstore, XsClient};

use crate::daemon::{Shared, lock};
use crate::anchor::{self, Anchorer};
use crate::deepquote::{self, Batcher};

/// Where libxl puts the devices of `vtpm = ["backend=0,..."]`: the manager's backend root.
pub const DEFAULT_ROOT: &str = "/local/domain/0/backend/vtpm";

/// How often refused devices are re-checked without a poke.
pub const RECHECK: Duration = Duration::from_secs(2);

/// A deep quote or anchor that was waiting for its batch: its ticket and the reply frame.
type Ready = (Ticket, Vec<u8>);

/// The manager's tpmif backend. Build it with [`XenLink::open`] (real Xen) or
/// [`XenLink::new`] (any xenstore/transport, e.g. the fakes), then [`run`](XenLink::run) it.
pub struct XenLink<X: Xenstore, T: Transport> {
    backend: Backend<X, T>,
    events: WatchEvents,
    mgr: Shared,
    batcher: Batcher,
    anchorer: Anchorer,
    poke: Arc<Notify>,
    chunkers: HashMap<DeviceKey, ReplyChunker>,
    ready: JoinSet<Ready>,
}

impl XenLink<XsClient, XenTransport> {
    /// Connects to xenstore and the grant/event-channel devices and starts watching `root`
    /// ([`DEFAULT_ROOT`] in dom0). Start it before any vTPM domain is created: libxl gives a
    /// backend only 10 s to reach InitWait.
    pub async fn open(root: &str, mgr: Shared, batcher: Batcher) -> std::io::Result<Self> {
        let (xs, events) = XsClient::open()
            .await
            .map_err(|e| std::io::Error::other(format!("xenstore: {e}")))?;
        let transport = XenTransport::open().map_err(|e| {
            std::io::Error::new(e.kind(), format!("Xen grant / event channel devices: {e}"))
        })?;
        Self::new(xs, events, transport, root, mgr, batcher)
            .await
            .map_err(|e| std::io::Error::other(format!("watching {root}: {e}")))
    }
}

impl<X: Xenstore, T: Transport> XenLink<X, T> {
    /// A link over `xs` (whose watch queue is `events`) and `transport`, serving the devices
    /// under `root` whose frontend domain is attached to their vTPM.
    pub async fn new(
        xs: X,
        events: WatchEvents,
        transport: T,
        root: &str,
        mgr: Shared,
        batcher: Batcher,
    ) -> Result<Self, xen_platform::xenbus::XenbusError> {
        let m = mgr.clone();
        let mut backend = Backend::new(xs, transport, root, rejections()).accept(move |domid, uuid| {
            // Quiet check first (the filter is re-run on every change); `authorize_domain`
            // covers "known vTPM" and "provisioned".
            let m = lock(&m);
            m.attached_domain(&uuid) == Some(u32::from(domid.get()))
                && m.authorize_domain(uuid, u32::from(domid.get()), uuid)
                    .is_ok()
        });
        let initial = backend.start().await?;
        initial.iter().for_each(log_event);
        xvtpm_log::host_info!(root, "Xen manager link watching");
        let anchorer = Anchorer::spawn(mgr.clone());
        Ok(XenLink {
            backend,
            events,
            mgr,
            batcher,
            anchorer,
            poke: Arc::new(Notify::new()),
            chunkers: HashMap::new(),
            ready: JoinSet::new(),
        })
    }

    /// Shares `anchorer` (the daemon's, so that anchors from the sockets and the Xen link share
    /// store writes) instead of the link's own.
    pub fn with_anchorer(mut self, anchorer: Anchorer) -> Self {
        self.anchorer = anchorer;
        self
    }

    /// A handle to make the link re-check refused devices now (e.g. after `VtpmAttachDomain`).
    pub fn poker(&self) -> Arc<Notify> {
        self.poke.clone()
    }

    /// Serves until the xenstore connection closes.
    pub async fn run(mut self) {
        let mut recheck = tokio::time::interval(RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        enum Woke {
            Xs(Option<WatchEvent>),
            Guest(Result<DeviceKey, (DeviceKey, TransportError)>),
            Ready(Option<Result<Ready, tokio::task::JoinError>>),
            Recheck(bool),
        }
        loop {
            let woke = tokio::select! {
                ev = self.events.next() => Woke::Xs(ev),
                g = self.backend.wait_guest() => Woke::Guest(g),
                r = self.ready.join_next(), if !self.ready.is_empty() => Woke::Ready(r),
                _ = self.poke.notified() => Woke::Recheck(true),
                _ = recheck.tick() => Woke::Recheck(false),
            };
            match woke {
                Woke::Xs(None) => {
                    xvtpm_log::host_warn!("xenstore connection closed; the Xen manager link stops");
                    return;
                }
                Woke::Xs(Some(ev)) => {
                    let evs = self.backend.handle_watch_event(ev).await;
                    self.after(evs);
                }
                Woke::Guest(Ok(key)) => self.on_guest(key),
                Woke::Guest(Err((key, e))) => {
                    guest_warn!(device = %key, error = %e, "vTPM domain event channel error")
                }
                Woke::Ready(Some(Ok((ticket, reply)))) => self.finish(ticket, reply),
                Woke::Ready(Some(Err(e))) => guest_warn!(error = %e, "deep-quote waiter failed"),
                Woke::Ready(None) => {}
                Woke::Recheck(poked) => {
                    if poked || self.backend.refused().next().is_some() {
                        let evs = self.backend.rescan().await;
                        self.after(evs);
                    }
                }
            }
        }
    }

    fn after(&mut self, events: Vec<BackendEvent>) {
        for ev in &events {
            log_event(ev);
            if let BackendEvent::Disconnected { key }
            | BackendEvent::Detached { key }
            | BackendEvent::Gone { key }
            | BackendEvent::Connected { key } = ev
            {
                self.chunkers.remove(key);
            }
        }
    }

    fn on_guest(&mut self, key: DeviceKey) {
        let req = match self.backend.take(key) {
            Ok(Take::Request(req)) => req,
            // Handled in place, or one request per interface: the one in flight is answered
            // when the batcher is done.
            Ok(Take::Stepped(_) | Take::InFlight) => return,
            Err(e) => {
                guest_warn!(device = %key, error = %e, "notifying the vTPM domain failed");
                return;
            }
        };
        let Some(uuid) = self.backend.device(key).map(|d| d.uuid()) else {
            return;
        };
        let domid = u32::from(key.frontend.get());
        if !ReplyChunker::is_cont(&req.command)
            && let Ok(r @ (VtpmRequest::DeepQuote { .. } | VtpmRequest::AnchorState { .. })) =
                decode_request(&req.command)
        {
            // Both wait for a batch (a physical quote, a store write): answered later by ticket,
            // never blocking.
            type Pending = std::pin::Pin<Box<dyn std::future::Future<Output = VtpmReply> + Send>>;
            let queued = match r {
                r @ VtpmRequest::AnchorState { .. } => self
                    .anchorer
                    .submit(uuid, anchor::Peer::Domain(domid), r)
                    .map(|rx| Box::pin(anchor::reply_for(rx)) as Pending),
                r => submit_deep_quote(&self.mgr, &self.batcher, uuid, domid, r)
                    .map(|rx| Box::pin(deepquote::reply_for(rx)) as Pending),
            };
            match queued {
                Ok(reply) => {
                    let ticket = req.ticket;
                    self.ready.spawn(async move {
                        let reply = reply.await;
                        (ticket, encode_reply(&reply))
                    });
                    xvtpm_log::guest_debug!(device = %key, "deep quote queued");
                }
                // Refused or malformed: answer at once.
                Err(reply) => self.finish(req.ticket, encode_reply(&reply)),
            }
            return;
        }
        let chunker = self.chunkers.entry(key).or_default();
        let page = if ReplyChunker::is_cont(&req.command) {
            chunker.next_chunk().unwrap_or_else(|| {
                encode_reply(&VtpmReply::Error(Failure::new(
                    ErrorCode::BadRequest,
                    "CONT without a pending reply",
                )))
            })
        } else {
            chunker.start(encode_reply(&answer(&self.mgr, uuid, domid, &req.command)))
        };
        self.complete(req.ticket, &page);
    }

    /// Answers a request with a whole reply frame (the first chunk of it; the vTPM domain
    /// fetches the rest with `CONT`). A ticket from before a reconnect is dropped untouched,
    /// and so is the chunker of the new connection.
    fn finish(&mut self, ticket: Ticket, frame: Vec<u8>) {
        if !self.backend.is_current(&ticket) {
            let _ = self.backend.complete(ticket, &[]);
            return;
        }
        let page = self.chunkers.entry(ticket.key()).or_default().start(frame);
        self.complete(ticket, &page);
    }

    fn complete(&mut self, ticket: Ticket, page: &[u8]) {
        let key = ticket.key();
        if let Err(e) = self.backend.complete(ticket, page) {
            guest_warn!(device = %key, error = %e, "notifying the vTPM domain failed");
        }
    }
}

/// The link's answers to what the tpmif page layer rejects: error frames of the manager protocol,
/// which the vTPM domain's frontend returns like any other reply. A request of length 0 or above
/// the page is `BadRequest` (a frontend following `xen_platform::frontend` never sends one); a
/// reply chunk that does not fit is `Internal` (the chunker never makes one).
pub fn rejections() -> Rejections {
    Rejections::new(|why| {
        encode_reply(&VtpmReply::Error(match why {
            Rejection::CommandSize => Failure::new(
                ErrorCode::BadRequest,
                format!("a request must be 1 to {MAX_PACKET} bytes, one tpmif page"),
            ),
            Rejection::ResponseSize => Failure::new(ErrorCode::Internal, "the manager's reply chunk did not fit the page"),
        }))
    })
    .expect("a short error frame fits any tpmif page")
}

/// A synchronous answer to one request frame from the vTPM of backend `uuid`, domain `domid`.
fn answer(mgr: &Shared, uuid: Uuid, domid: u32, cmd: &[u8]) -> VtpmReply {
    match decode_request(cmd) {
        Ok(VtpmRequest::GetStateKey {
            version,
            uuid: claimed,
        }) => lock(mgr).state_key_domain(uuid, domid, version, claimed),
        // Once per vTPM (at manufacture): signed in the physical TPM while this task waits.
        Ok(VtpmRequest::IssueEkCert { uuid: claimed, ek_public, tpm }) => {
            lock(mgr).ek_cert_domain(uuid, domid, claimed, &ek_public, &tpm)
        }
        // Never reached: the link answers these by ticket when their batch is done.
        Ok(VtpmRequest::DeepQuote { .. } | VtpmRequest::AnchorState { .. }) => VtpmReply::Error(Failure::new(
            ErrorCode::Internal,
            "a batched request reached the synchronous path",
        )),
        Err(f) => VtpmReply::Error(f),
    }
}

/// Parses one whole request frame (`u32` BE length ‖ JSON) from the page.
fn decode_request(cmd: &[u8]) -> Result<VtpmRequest, Failure> {
    let bad = |m: String| Failure::new(ErrorCode::BadRequest, m);
    let prefix: [u8; 4] = cmd
        .get(..4)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| {
            bad(format!(
                "request of {} bytes has no length prefix",
                cmd.len()
            ))
        })?;
    let n = mgr::frame_len(prefix).map_err(|e| bad(e.to_string()))?;
    if n != cmd.len() - 4 {
        return Err(bad(format!(
            "length prefix says {n} bytes, the page carries {}",
            cmd.len() - 4
        )));
    }
    mgr::decode(&cmd[4..]).map_err(|e| bad(e.to_string()))
}

fn encode_reply(reply: &VtpmReply) -> Vec<u8> {
    mgr::encode(reply).unwrap_or_else(|e| {
        mgr::encode(&VtpmReply::Error(Failure::new(
            ErrorCode::Internal,
            format!("encoding the reply: {e}"),
        )))
        .expect("a short error reply encodes")
    })
}

/// Authorises a deep quote from vTPM domain `domid` on the device whose
/// backend `uuid` is `backend_uuid`, and queues it.
fn submit_deep_quote(
    mgr: &Shared,
    batcher: &Batcher,
    backend_uuid: Uuid,
    domid: u32,
    req: VtpmRequest,
) -> Result<oneshot::Receiver<Result<Vec<u8>, Failure>>, VtpmReply> {
    let VtpmRequest::DeepQuote { uuid, .. } = &req else {
        return Err(VtpmReply::Error(Failure::new(ErrorCode::BadRequest, "not a deep-quote request")));
    };
    let group = lock(mgr).authorize_domain(backend_uuid, domid, *uuid).map_err(VtpmReply::Error)?;
    deepquote::submit_request(batcher, backend_uuid, group, req)
}

fn log_event(ev: &BackendEvent) {
    match ev {
        BackendEvent::Refused { key, uuid } => guest_warn!(
            device = %key,
            vtpm = %uuid,
            domid = key.frontend.get(),
            "refused a tpmif link: the frontend domain is not the domain attached to this vTPM (or the vTPM is unknown); attach it with VtpmAttachDomain"
        ),
        BackendEvent::Error { .. } => guest_warn!(event = ?ev, "tpmif device error"),
        other => guest_info!(event = ?other, "Xen manager link"),
    }
}
