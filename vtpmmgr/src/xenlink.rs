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
//! * Every request is authorised again as a [`Peer::Domain`] by [`crate::dispatch`] (a detach
//!   after connecting takes effect at the next request), and the UUID the vTPM claims must equal
//!   the backend directory's.
//!
//! # Concurrency: deep quotes are answered when ready
//!
//! The link takes each SUBMITted request off its page once (a private copy and a ticket, see
//! `xen_platform::xenbus::Backend::take`) and hands it to the same [`Dispatcher`] the Unix
//! sockets use, in a task of its own; the page stays in SUBMIT and the reply is completed by its
//! ticket when that task is done (a ticket from before a reconnect is dropped, and the backend
//! looks at the page again). So the link's task never blocks — not on a batch, not on an EK
//! certificate's TPM signature — other vTPM domains are served meanwhile, and deep quotes from
//! many domains (and from the Unix sockets) share one physical quote.
//! Blocking the handler instead (`block_in_place` + `Handle::block_on`) would have serialised
//! every Xen vTPM behind each physical quote and defeated the batching.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use xvtpm_log::{guest_info, guest_warn};
use vtpm_proto::mgr::{self, AdminReply, AdminRequest, ErrorCode, Failure, VtpmReply, VtpmRequest};

use crate::failure::FromError as _;
use xen_platform::frontend::ReplyChunker;

use xen_platform::tpmif::{MAX_PACKET, Rejection, Rejections};
use xen_platform::xen::XenTransport;
use xen_platform::xenbus::{Backend, BackendEvent, DeviceKey, Take, Ticket, Transport, TransportError};
use xen_platform::xenstore::{WatchEvent, WatchEvents, Xenstore, XsClient};

use crate::dispatch::{Dispatcher, lock};
use crate::peer::Peer;

/// Where libxl puts the devices of `vtpm = ["backend=0,..."]`: the manager's backend root.
pub const DEFAULT_ROOT: &str = "/local/domain/0/backend/vtpm";

/// How often refused devices are re-checked without a poke.
pub const RECHECK: Duration = Duration::from_secs(2);

/// A request answered by its task: its ticket and the reply frame.
type Ready = (Ticket, Vec<u8>);

/// Why the Xen link could not start (each cause is its `source`).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No xenstore connection.
    #[error("cannot connect to xenstore")]
    Xenstore(#[source] xen_platform::xenstore::XsError),
    /// The grant or event-channel device did not open.
    #[error("cannot open the Xen grant / event channel devices")]
    Devices(#[source] std::io::Error),
    /// The backend directory cannot be watched.
    #[error("cannot watch {root}")]
    Watch {
        /// The backend directory.
        root: String,
        /// Cause.
        source: xen_platform::xenbus::XenbusError,
    },
}

/// The manager's tpmif backend. Build it with [`XenLink::open`] (real Xen) or
/// [`XenLink::new`] (any xenstore/transport, e.g. the fakes), then [`run`](XenLink::run) it.
pub struct XenLink<X: Xenstore, T: Transport> {
    backend: Backend<X, T>,
    events: WatchEvents,
    dispatch: Dispatcher,
    poke: Arc<Notify>,
    chunkers: HashMap<DeviceKey, ReplyChunker>,
    ready: JoinSet<Ready>,
    /// `Some` on the admin link ([`XenLink::open_admin`]): requests are admin requests.
    admin: Option<Arc<dyn AdminHandler>>,
}

/// Answers the admin link's requests: the daemon's admin service, the same that answers the
/// admin socket (with relayed dom0 processes admitted, as only the link carries them).
pub trait AdminHandler: Send + Sync + 'static {
    /// One request (or why it did not decode) and its reply.
    fn handle(&self, req: Result<AdminRequest, Failure>) -> std::pin::Pin<Box<dyn std::future::Future<Output = AdminReply> + Send + '_>>;
}

/// Where the admin link of a manager in domain `domid` lives: under the domain's own `data`
/// directory, which only that domain and dom0 can write (libxl makes it the domain's), so a
/// device there was made by dom0 (`vtpmmgr bridge`); its frontend must be domain 0 as well.
pub fn admin_root(domid: u32) -> String {
    format!("/local/domain/{domid}/data/xvtpm-admin/backend")
}

/// The frontend directory `vtpmmgr bridge` makes for the admin link of domain `domid`.
pub fn admin_frontend(domid: u32) -> String {
    format!("/local/domain/{domid}/data/xvtpm-admin/frontend")
}

impl XenLink<XsClient, XenTransport> {
    /// Connects to xenstore and the grant/event-channel devices and starts watching `root`
    /// ([`DEFAULT_ROOT`] in dom0). Start it before any vTPM domain is created: libxl gives a
    /// backend only 10 s to reach InitWait.
    pub async fn open(root: &str, dispatch: Dispatcher) -> Result<Self, OpenError> {
        let (xs, events) = XsClient::open().await.map_err(OpenError::Xenstore)?;
        let transport = XenTransport::open().map_err(OpenError::Devices)?;
        Self::new(xs, events, transport, root, dispatch)
            .await
            .map_err(|source| OpenError::Watch { root: root.to_string(), source })
    }

    /// The admin link of a manager in its own domain: serves the device `vtpmmgr bridge` in
    /// dom0 makes under `root` ([`admin_root`]), and only one whose frontend is domain 0.
    pub async fn open_admin(root: &str, dispatch: Dispatcher, service: Arc<dyn AdminHandler>) -> Result<Self, OpenError> {
        let (xs, events) = XsClient::open().await.map_err(OpenError::Xenstore)?;
        let transport = XenTransport::open().map_err(OpenError::Devices)?;
        Self::new_admin(xs, events, transport, root, dispatch, service)
            .await
            .map_err(|source| OpenError::Watch { root: root.to_string(), source })
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
        dispatch: Dispatcher,
    ) -> Result<Self, xen_platform::xenbus::XenbusError> {
        let m = dispatch.manager().clone();
        let backend = Backend::new(xs, transport, root, rejections()).accept(move |domid, uuid| {
            // Quiet check first (the filter is re-run on every change); `authorize` covers
            // "known vTPM" and "provisioned".
            let m = lock(&m);
            let domid = u32::from(domid.get());
            m.attached_domain(&uuid) == Some(domid) && m.authorize(&Peer::Domain { vtpm: uuid, domid }, uuid).is_ok()
        });
        Self::started(backend, events, dispatch, None, root).await
    }

    /// The admin link over any xenstore/transport (e.g. the fakes): devices under `root` whose
    /// frontend is domain 0 carry admin requests, answered by `service`.
    pub async fn new_admin(
        xs: X,
        events: WatchEvents,
        transport: T,
        root: &str,
        dispatch: Dispatcher,
        service: Arc<dyn AdminHandler>,
    ) -> Result<Self, xen_platform::xenbus::XenbusError> {
        let backend = Backend::new(xs, transport, root, admin_rejections()).accept(|domid, _| domid.get() == 0);
        Self::started(backend, events, dispatch, Some(service), root).await
    }

    async fn started(
        mut backend: Backend<X, T>,
        events: WatchEvents,
        dispatch: Dispatcher,
        admin: Option<Arc<dyn AdminHandler>>,
        root: &str,
    ) -> Result<Self, xen_platform::xenbus::XenbusError> {
        let initial = backend.start().await?;
        initial.iter().for_each(log_event);
        xvtpm_log::host_info!(root, admin = admin.is_some(), "Xen manager link watching");
        Ok(XenLink {
            backend,
            events,
            dispatch,
            poke: Arc::new(Notify::new()),
            chunkers: HashMap::new(),
            ready: JoinSet::new(),
            admin,
        })
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
                Woke::Ready(Some(Err(e))) => guest_warn!(error = %e, "a request's task failed"),
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
        if ReplyChunker::is_cont(&req.command) {
            let page = self.chunkers.entry(key).or_default().next_chunk().unwrap_or_else(|| {
                let no_reply = Failure::new(ErrorCode::BadRequest, "CONT without a pending reply");
                match self.admin {
                    Some(_) => encode_admin(&AdminReply::Error(no_reply)),
                    None => encode_reply(&VtpmReply::Error(no_reply)),
                }
            });
            self.complete(req.ticket, &page);
            return;
        }
        if let Some(service) = &self.admin {
            let request = vtpm_proto::mgr_io::decode_frame::<AdminRequest>(&req.command).map_err(|e| Failure::from_error(ErrorCode::BadRequest, "", &e));
            let (service, ticket) = (service.clone(), req.ticket);
            self.ready.spawn(async move {
                let reply = service.handle(request).await;
                (ticket, encode_admin(&reply))
            });
            return;
        }
        let peer = Peer::Domain { vtpm: uuid, domid: u32::from(key.frontend.get()) };
        match decode_request(&req.command) {
            // Answered by ticket when its task is done (a batch, a TPM signature): never blocking.
            Ok(r) => {
                let (d, ticket) = (self.dispatch.clone(), req.ticket);
                self.ready.spawn(async move { (ticket, encode_reply(&d.handle(peer, r).await)) });
                xvtpm_log::guest_debug!(device = %key, "request queued");
            }
            // Malformed: answered at once.
            Err(f) => self.finish(req.ticket, encode_reply(&VtpmReply::Error(f))),
        }
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

/// [`rejections`] for the admin link: the same causes as admin error replies.
fn admin_rejections() -> Rejections {
    Rejections::new(|why| {
        encode_admin(&AdminReply::Error(match why {
            Rejection::CommandSize => Failure::new(
                ErrorCode::BadRequest,
                format!("an admin request over the Xen link must be 1 to {MAX_PACKET} bytes, one tpmif page"),
            ),
            Rejection::ResponseSize => Failure::new(ErrorCode::Internal, "the manager's reply chunk did not fit the page"),
        }))
    })
    .expect("a short error frame fits any tpmif page")
}

fn encode_admin(reply: &AdminReply) -> Vec<u8> {
    mgr::encode(reply).unwrap_or_else(|e| {
        let fail = Failure::from_error_fix(ErrorCode::Internal, "the reply does not fit in one manager frame", &e, "list with paging (`VtpmListPage`)");
        mgr::encode(&AdminReply::Error(fail)).expect("a short error reply encodes")
    })
}

/// Parses one whole request frame (`u32` BE length ‖ JSON) from the page.
fn decode_request(cmd: &[u8]) -> Result<VtpmRequest, Failure> {
    vtpm_proto::mgr_io::decode_frame(cmd).map_err(|e| Failure::from_error(ErrorCode::BadRequest, "", &e))
}

fn encode_reply(reply: &VtpmReply) -> Vec<u8> {
    mgr::encode(reply).unwrap_or_else(|e| {
        mgr::encode(&VtpmReply::Error(Failure::from_error(ErrorCode::Internal, "encoding the reply", &e)))
        .expect("a short error reply encodes")
    })
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
