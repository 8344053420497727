//! The xenbus backend for tpmif devices: discovery, handshake, connect, close, detach.
//!
//! [`Backend`] watches one backend root (`/local/domain/<be>/backend/vtpm`, or the relative
//! `backend/vtpm`) and keeps one [`TpmifDevice`] per `<root>/<fe>/<devid>` directory. It is
//! level-triggered: a watch event only says "look again", and each look ([`Backend::handle_watch_event`])
//! re-reads the current values and moves the device towards what they demand. Dropped or
//! coalesced events therefore cannot desynchronise it.
//!
//! Transitions (backend `state` in parentheses):
//!
//! | Trigger | Action |
//! |---|---|
//! | new `<root>/<fe>/<devid>` | read `frontend`, `frontend-id` (must equal `<fe>`), `uuid`; write `feature-protocol-v2=1`, then state InitWait(2); watch the frontend directory |
//! | frontend Initialised(3) / Connected(4), we are InitWait | read `ring-ref`, `event-channel`, require `feature-protocol-v2 == "1"`; map + bind via [`Transport`]; write `ready=1` (Mini-OS frontends; Linux ignores it); Connected(4) |
//! | frontend Closing(5) | mirror Closing(5); keep the mapping until Closed |
//! | frontend Closed(6), or back to ≤ InitWait while we are connected | unmap + unbind; InitWait(2), ready for a reconnect (kexec, module reload) |
//! | frontend directory vanished (guest destroyed) | unmap + unbind; Closing(5), Closed(6); `rm` the backend directory; [`BackendEvent::Gone`] |
//! | toolstack detach: backend `online=0`, or backend `state=5` we did not write | unmap + unbind; Closed(6) at once (libxl waits at most 10 s for 6); in dom0, wait for the toolstack to remove the directories; in a driver domain, `rm` the backend directory (libxl waits for that) and [`BackendEvent::Gone`] |
//! | backend directory removed | unmap + unbind; [`BackendEvent::Gone`] |
//!
//! Which devices are ours: every device under the root, unless narrowed by
//! [`Backend::only_uuid`] (other devices are skipped silently: they belong to another vTPM
//! process sharing the backend domain) and/or by an accept filter ([`Backend::accept`], over the
//! verified `frontend-id` and the backend `uuid`; both are toolstack-written, the guest can write
//! neither). A device the filter refuses is left untouched (no key written), reported once as
//! [`BackendEvent::Refused`], and re-evaluated on every change under its backend directory and on
//! every [`Backend::rescan`] — call that after whatever the filter consults changed.
//!
//! Values from the frontend directory are guest-controlled: bad ones produce a
//! [`BackendEvent::Error`] naming the key and value and leave the device in InitWait, so a
//! well-behaved frontend can still retry; nothing panics. A device reports the same error only
//! once until a pass succeeds or the error changes, so a guest rewriting its directory in a loop
//! cannot turn into a log flood.

use std::collections::BTreeMap;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::task::Poll;

use uuid::Uuid;

use crate::ids::{DevId, DomId, EvtchnPort, GrantRef, ParseError, XenbusState};
use crate::tpmif::{Rejections, SharedPage, Slot, StepOutcome, Taken, finish_submit, take_submit};
use crate::xenstore::{WatchEvent, WatchEvents, Xenstore, XsError};

/// A failure of the grant-mapping / event-channel layer.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Mapping the frontend's page failed.
    #[error("mapping grant {gref} of domain {domid}: {source}")]
    MapGrant {
        /// Granting domain.
        domid: DomId,
        /// Grant reference.
        gref: GrantRef,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Binding the frontend's event channel failed.
    #[error("binding event channel {port} of domain {domid}: {source}")]
    BindEvtchn {
        /// Remote domain.
        domid: DomId,
        /// Remote (unbound) port.
        port: EvtchnPort,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Granting our page to a backend failed (frontend side).
    #[error("granting a page to domain {domid}: {source}")]
    ShareGrant {
        /// The backend domain.
        domid: DomId,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Allocating an unbound event channel for a backend failed (frontend side).
    #[error("allocating an event channel for domain {domid}: {source}")]
    AllocEvtchn {
        /// The backend domain.
        domid: DomId,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Notifying or waiting on the event channel failed.
    #[error("event channel: {0}")]
    Evtchn(#[source] io::Error),
}

/// Something that maps a frontend's grant and binds its event channel: libxengnttab +
/// libxenevtchn in production (`XenTransport`), memory + channels in tests (`MemTransport`).
pub trait Transport: Send {
    /// A live connection; dropping it unmaps the page and unbinds the channel.
    type Connection: Connection;

    /// Maps `ring_ref` of `frontend` read/write and binds to its unbound `port`.
    fn connect(
        &mut self,
        frontend: DomId,
        ring_ref: GrantRef,
        port: EvtchnPort,
    ) -> Result<Self::Connection, TransportError>;
}

/// One connected tpmif: the mapped page and the bound event channel.
pub trait Connection: Send + Sync {
    /// The mapped shared page.
    type Page: SharedPage;

    /// The shared page.
    fn page(&self) -> &Self::Page;

    /// Signals the frontend.
    fn notify(&self) -> Result<(), TransportError>;

    /// Waits until the frontend signals us (consuming and re-arming the event).
    fn wait_event(&self) -> impl Future<Output = Result<(), TransportError>> + Send + '_;
}

/// Identifies a device: frontend domain and device id (`<root>/<fe>/<devid>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey {
    /// The frontend (guest) domain.
    pub frontend: DomId,
    /// The device id.
    pub devid: DevId,
}

impl std::fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "vtpm {}/{}", self.frontend, self.devid)
    }
}

/// An error while driving a device.
#[derive(Debug, thiserror::Error)]
pub enum XenbusError {
    /// A xenstore operation failed.
    #[error(transparent)]
    Xenstore(#[from] XsError),
    /// A value (usually guest-written) did not parse; names the key and value.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// A required key is absent.
    #[error("missing xenstore key {path:?}")]
    Missing {
        /// Full path of the key.
        path: String,
    },
    /// `frontend-id` disagrees with the `<fe>` component of the backend path.
    #[error("{path:?} says frontend {value}, but the device is under frontend {expected}")]
    FrontendIdMismatch {
        /// Path of `frontend-id`.
        path: String,
        /// Its value.
        value: DomId,
        /// The domain from the path.
        expected: DomId,
    },
    /// `frontend` is not an absolute path.
    #[error("invalid frontend path {value:?} at {path:?}")]
    BadFrontendPath {
        /// Path of the `frontend` key.
        path: String,
        /// Its value (truncated).
        value: String,
    },
    /// `uuid` is not a UUID.
    #[error("invalid uuid {value:?} at {path:?}")]
    BadUuid {
        /// Path of the `uuid` key.
        path: String,
        /// Its value (truncated).
        value: String,
    },
    /// The frontend does not speak protocol v2.
    #[error("frontend {path:?} is {value:?}: vTPM protocol 2 required")]
    ProtocolV2Required {
        /// Path of the frontend's `feature-protocol-v2`.
        path: String,
        /// Its value, if any (truncated).
        value: Option<String>,
    },
    /// Mapping or binding failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// What happened to a device, for the caller to log or act on.
#[derive(Debug)]
pub enum BackendEvent {
    /// A new device: InitWait written.
    Added {
        /// Device.
        key: DeviceKey,
        /// Its vTPM UUID from the backend directory.
        uuid: Uuid,
    },
    /// Page mapped, channel bound, Connected written.
    Connected {
        /// Device.
        key: DeviceKey,
    },
    /// The frontend is closing; Closing mirrored.
    Closing {
        /// Device.
        key: DeviceKey,
    },
    /// The frontend closed (or restarted); unmapped, back in InitWait.
    Disconnected {
        /// Device.
        key: DeviceKey,
    },
    /// The toolstack detached the device; Closed written.
    Detached {
        /// Device.
        key: DeviceKey,
    },
    /// The guest or the device is gone; everything released and the device forgotten.
    Gone {
        /// Device.
        key: DeviceKey,
    },
    /// The accept filter refused the device: nothing was written, it stays as the toolstack
    /// left it. Reported once per device and UUID until it is accepted or disappears.
    Refused {
        /// Device (its frontend domain is the verified `frontend-id`).
        key: DeviceKey,
        /// The vTPM UUID from the backend directory.
        uuid: Uuid,
    },
    /// Something went wrong for a device (or an unparseable device directory name).
    Error {
        /// The device, when known.
        key: Option<DeviceKey>,
        /// What.
        error: XenbusError,
    },
}

enum Phase<C> {
    /// InitWait written; waiting for the frontend.
    InitWait,
    /// Mapped and bound.
    Connected(C),
    /// Mirroring the frontend's Closing; the mapping (if any) is kept until Closed.
    Closing(Option<C>),
    /// Toolstack detach: Closed written; waiting for the directories to disappear.
    Detached,
}

/// One tpmif device's state.
pub struct TpmifDevice<C> {
    key: DeviceKey,
    backend_path: String,
    frontend_path: String,
    uuid: Uuid,
    phase: Phase<C>,
    /// The last state we wrote, to tell our own Closing from the toolstack's.
    written: XenbusState,
    /// Whether the frontend's `state` was ever readable (absent later = guest gone).
    seen_frontend: bool,
    /// A step is due without an event (right after connecting: a request may be waiting).
    kick: bool,
    /// Counts taken requests; each [`Ticket`] carries its number.
    taken: u64,
    /// The number of the request of the current connection that was taken and is not completed
    /// yet. A new connection clears it: tickets of earlier connections are stale.
    in_flight: Option<u64>,
    /// The last error reported, to report each distinct failure once.
    last_error: Option<String>,
}

impl<C: Connection> TpmifDevice<C> {
    /// The device's key.
    pub fn key(&self) -> DeviceKey {
        self.key
    }

    /// `<root>/<fe>/<devid>`.
    pub fn backend_path(&self) -> &str {
        &self.backend_path
    }

    /// The frontend directory, from the backend's `frontend` key.
    pub fn frontend_path(&self) -> &str {
        &self.frontend_path
    }

    /// The vTPM UUID from the backend's `uuid` key.
    pub fn uuid(&self) -> Uuid {
        self.uuid
    }

    /// The backend state we last wrote.
    pub fn state(&self) -> XenbusState {
        self.written
    }

    /// The live connection, if mapped.
    pub fn connection(&self) -> Option<&C> {
        match &self.phase {
            Phase::Connected(c) | Phase::Closing(Some(c)) => Some(c),
            _ => None,
        }
    }
}

/// What [`Backend::next`] saw.
#[derive(Debug)]
pub enum Activity {
    /// Xenstore changed; these are the resulting device events (possibly none).
    Xenstore(Vec<BackendEvent>),
    /// A frontend signalled (or a step is due): call [`Backend::service`] with this key.
    Guest(DeviceKey),
    /// Waiting on a device's event channel failed.
    GuestError(DeviceKey, TransportError),
    /// The xenstore connection is gone; the backend cannot continue.
    XenstoreClosed,
}

/// Names one taken request: the device, the connection it came from, and where its answer
/// goes. Plain data (`Send`), so the answer can be computed anywhere; only
/// [`Backend::complete`] writes it, and only to the connection it came from. Neither `Copy`
/// nor `Clone`: a request is answered at most once.
#[derive(Debug, PartialEq, Eq)]
pub struct Ticket {
    key: DeviceKey,
    number: u64,
    slot: Slot,
}

impl Ticket {
    /// The device the request came from.
    pub fn key(&self) -> DeviceKey {
        self.key
    }
}

/// A request taken off a device's page by [`Backend::take`].
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// Answer it with [`Backend::complete`].
    pub ticket: Ticket,
    /// The command: a private copy.
    pub command: Vec<u8>,
    /// The request's locality as written by the frontend.
    pub locality: u8,
}

/// What [`Backend::take`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Take {
    /// A request to answer.
    Request(Request),
    /// Handled in place (see [`Taken::Stepped`](crate::tpmif::Taken::Stepped)); the frontend was
    /// notified if the page changed.
    Stepped(StepOutcome),
    /// A request of this connection is still being answered; the signal is absorbed (the
    /// device is looked at again when it completes).
    InFlight,
}

/// An accept filter: `(verified frontend domain, backend uuid) -> serve it?`.
pub type AcceptFilter = Box<dyn Fn(DomId, Uuid) -> bool + Send + Sync>;

/// The tpmif backend for all devices under one backend root.
pub struct Backend<X, T: Transport> {
    xs: X,
    transport: T,
    root: String,
    devices: BTreeMap<DeviceKey, TpmifDevice<T::Connection>>,
    only_uuid: Option<Uuid>,
    accept: Option<AcceptFilter>,
    /// Devices the accept filter refused, with the UUID reported (to report each once).
    refused: BTreeMap<DeviceKey, Uuid>,
    /// A backend outside dom0 removes its own device directory after a toolstack detach.
    driver_domain: bool,
    /// The caller's answers to requests the page layer rejects.
    rejections: Rejections,
}

/// What [`Backend::attach`] found.
enum Attach<C> {
    /// A device of ours, now in InitWait.
    Device(TpmifDevice<C>),
    /// Absent, not filled in yet, or not ours (`only_uuid`).
    Skip,
    /// Refused by the accept filter.
    Refused(Uuid),
}

fn shown(value: &str) -> String {
    value.chars().take(64).collect()
}

impl<X: Xenstore, T: Transport> Backend<X, T> {
    /// A backend for the devices under `root` (e.g. `/local/domain/0/backend/vtpm`; a trailing
    /// `/` is ignored) that answers a request the page layer rejects with `rejections` (bytes
    /// of the caller's protocol: this crate knows no TPM). Nothing happens until
    /// [`start`](Self::start).
    pub fn new(xs: X, transport: T, root: impl Into<String>, rejections: Rejections) -> Self {
        let mut root = root.into();
        while root.len() > 1 && root.ends_with('/') {
            root.pop();
        }
        let driver_domain = is_driver_domain_root(&root);
        Self {
            xs,
            transport,
            root,
            devices: BTreeMap::new(),
            only_uuid: None,
            accept: None,
            refused: BTreeMap::new(),
            driver_domain,
            rejections,
        }
    }

    /// Whether this backend runs in a driver domain (not dom0). libxl removes a detached
    /// device's backend directory itself only when the backend is dom0; a driver domain must
    /// remove it ("the driver domain is in charge of removing what it can from the backend
    /// path"), or `xl destroy` of the guest waits 10 s for it and reports an error. Derived
    /// from the root (`/local/domain/<N>/…` with N ≠ 0); set it when the root is relative.
    pub fn driver_domain(mut self, yes: bool) -> Self {
        self.driver_domain = yes;
        self
    }

    /// Serves only devices for which `filter(frontend domain, uuid)` is true. The domain is the
    /// backend's `frontend-id` (checked to equal the `<fe>` path component) and the UUID its
    /// `uuid` key — both written by the toolstack in the backend's own directory. The filter is
    /// consulted before anything is written; it must be quick (it runs on the backend's task).
    /// Combines with [`only_uuid`](Self::only_uuid) (both must pass). A refused device is
    /// re-evaluated whenever its backend directory changes and on [`rescan`](Self::rescan);
    /// a device already being served is not re-checked (the caller decides per request).
    pub fn accept(mut self, filter: impl Fn(DomId, Uuid) -> bool + Send + Sync + 'static) -> Self {
        self.accept = Some(Box::new(filter));
        self
    }

    /// Serves only devices whose backend `uuid` key (written by the toolstack
    /// from the guest's `vtpm=[...,uuid=...]` line; the guest cannot write it)
    /// is `uuid`, and leaves every other device untouched — for one vTPM
    /// process per guest sharing a backend domain.
    pub fn only_uuid(mut self, uuid: Uuid) -> Self {
        self.only_uuid = Some(uuid);
        self
    }

    /// Watches the root (which also covers every device's `state` and `online`) and picks up
    /// devices that already exist. Start this before the toolstack adds devices: libxl waits
    /// only 10 s for InitWait.
    pub async fn start(&mut self) -> Result<Vec<BackendEvent>, XenbusError> {
        self.xs.watch(&self.root).await?;
        Ok(self.rescan().await)
    }

    /// The xenstore client.
    pub fn xenstore(&self) -> &X {
        &self.xs
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// A device, if known.
    pub fn device(&self, key: DeviceKey) -> Option<&TpmifDevice<T::Connection>> {
        self.devices.get(&key)
    }

    /// All known devices.
    pub fn devices(&self) -> impl Iterator<Item = &TpmifDevice<T::Connection>> {
        self.devices.values()
    }

    /// Lists the root and reconciles every device found there and every known device.
    pub async fn rescan(&mut self) -> Vec<BackendEvent> {
        let mut events = Vec::new();
        let mut keys: Vec<DeviceKey> = self.devices.keys().copied().collect();
        keys.extend(self.refused.keys().copied());
        match self.list_devices().await {
            Ok((found, errors)) => {
                events.extend(errors);
                keys.extend(found);
            }
            Err(e) => events.push(BackendEvent::Error {
                key: None,
                error: e,
            }),
        }
        keys.sort();
        keys.dedup();
        for key in keys {
            events.extend(self.reconcile(key).await);
        }
        events
    }

    async fn list_devices(&self) -> Result<(Vec<DeviceKey>, Vec<BackendEvent>), XenbusError> {
        let mut keys = Vec::new();
        let mut errors = Vec::new();
        for fe in self.xs.directory(&self.root).await?.unwrap_or_default() {
            let fe_path = format!("{}/{fe}", self.root);
            let frontend = match DomId::parse(&fe_path, &fe) {
                Ok(d) => d,
                Err(e) => {
                    errors.push(BackendEvent::Error {
                        key: None,
                        error: e.into(),
                    });
                    continue;
                }
            };
            for dev in self.xs.directory(&fe_path).await?.unwrap_or_default() {
                let dev_path = format!("{fe_path}/{dev}");
                match DevId::parse(&dev_path, &dev) {
                    Ok(devid) => keys.push(DeviceKey { frontend, devid }),
                    Err(e) => errors.push(BackendEvent::Error {
                        key: None,
                        error: e.into(),
                    }),
                }
            }
        }
        Ok((keys, errors))
    }

    /// Applies one watch event.
    pub async fn handle_watch_event(&mut self, event: WatchEvent) -> Vec<BackendEvent> {
        let path = match event {
            WatchEvent::Resync => return self.rescan().await,
            WatchEvent::Changed(path) => path,
        };
        if is_at_or_below(&path, &self.root) {
            let rest = path[self.root.len()..].trim_start_matches('/');
            let mut parts = rest.split('/');
            let (fe, dev) = (parts.next().unwrap_or(""), parts.next());
            let Some(dev) = dev.filter(|d| !d.is_empty()) else {
                // The root itself or a `<fe>` directory changed: look for new/removed devices.
                return self.rescan().await;
            };
            let frontend = DomId::parse(&format!("{}/{fe}", self.root), fe);
            let devid = DevId::parse(&format!("{}/{fe}/{dev}", self.root), dev);
            return match (frontend, devid) {
                (Ok(frontend), Ok(devid)) => self.reconcile(DeviceKey { frontend, devid }).await,
                (Err(e), _) | (_, Err(e)) => vec![BackendEvent::Error {
                    key: None,
                    error: e.into(),
                }],
            };
        }
        let keys: Vec<DeviceKey> = self
            .devices
            .values()
            .filter(|d| is_at_or_below(&path, &d.frontend_path))
            .map(|d| d.key)
            .collect();
        let mut events = Vec::new();
        for key in keys {
            events.extend(self.reconcile(key).await);
        }
        events
    }

    /// Brings one device in line with xenstore (creating or forgetting it as needed).
    pub async fn reconcile(&mut self, key: DeviceKey) -> Vec<BackendEvent> {
        let mut events = Vec::new();
        if !self.devices.contains_key(&key) {
            match self.attach(key).await {
                Ok(Attach::Device(dev)) => {
                    self.refused.remove(&key);
                    events.push(BackendEvent::Added {
                        key,
                        uuid: dev.uuid,
                    });
                    self.devices.insert(key, dev);
                }
                Ok(Attach::Skip) => {
                    self.refused.remove(&key);
                    return events;
                }
                Ok(Attach::Refused(uuid)) => {
                    if self.refused.insert(key, uuid) != Some(uuid) {
                        events.push(BackendEvent::Refused { key, uuid });
                    }
                    return events;
                }
                Err(error) => {
                    events.push(BackendEvent::Error {
                        key: Some(key),
                        error,
                    });
                    return events;
                }
            }
        }
        let Some(dev) = self.devices.get_mut(&key) else {
            return events;
        };
        let mut gone = false;
        match drive(
            &self.xs,
            &mut self.transport,
            dev,
            self.driver_domain,
            &mut events,
            &mut gone,
        )
        .await
        {
            Ok(()) => dev.last_error = None,
            Err(error) => {
                // Report a given failure once until something changes: the guest can trigger
                // a re-read (and thus the same error) with every write to its directory.
                let text = error.to_string();
                if dev.last_error.as_deref() != Some(text.as_str()) {
                    dev.last_error = Some(text);
                    events.push(BackendEvent::Error {
                        key: Some(key),
                        error,
                    });
                }
            }
        }
        if gone {
            if let Some(dev) = self.devices.remove(&key)
                && let Err(error) = self.xs.unwatch(&dev.frontend_path).await
            {
                events.push(BackendEvent::Error {
                    key: Some(key),
                    error: error.into(),
                });
            }
            events.push(BackendEvent::Gone { key });
        }
        events
    }

    /// Reads a new device's backend directory and announces InitWait. `Skip` if the
    /// directory is absent or not filled in yet.
    async fn attach(&mut self, key: DeviceKey) -> Result<Attach<T::Connection>, XenbusError> {
        let backend_path = format!("{}/{}/{}", self.root, key.frontend, key.devid);
        let fe_key = format!("{backend_path}/frontend");
        let Some(frontend_path) = self.xs.read(&fe_key).await? else {
            return Ok(Attach::Skip);
        };
        if !frontend_path.starts_with('/') || frontend_path.len() < 2 {
            return Err(XenbusError::BadFrontendPath {
                path: fe_key,
                value: shown(&frontend_path),
            });
        }
        let frontend_path = frontend_path.trim_end_matches('/').to_owned();
        let id_key = format!("{backend_path}/frontend-id");
        let id = read_required(&self.xs, &id_key).await?;
        let id = DomId::parse(&id_key, &id)?;
        if id != key.frontend {
            return Err(XenbusError::FrontendIdMismatch {
                path: id_key,
                value: id,
                expected: key.frontend,
            });
        }
        let uuid_key = format!("{backend_path}/uuid");
        let uuid_str = read_required(&self.xs, &uuid_key).await?;
        let uuid = Uuid::try_parse(&uuid_str).map_err(|_| XenbusError::BadUuid {
            path: uuid_key,
            value: shown(&uuid_str),
        })?;
        if self.only_uuid.is_some_and(|mine| mine != uuid) {
            // Another vTPM's device: not ours to touch.
            return Ok(Attach::Skip);
        }
        if let Some(filter) = &self.accept
            && !filter(key.frontend, uuid)
        {
            return Ok(Attach::Refused(uuid));
        }

        self.xs
            .write(&format!("{backend_path}/feature-protocol-v2"), "1")
            .await?;
        self.xs
            .write(
                &format!("{backend_path}/state"),
                XenbusState::InitWait.as_value(),
            )
            .await?;
        self.xs.watch(&frontend_path).await?;
        xvtpm_log::guest_debug!(%key, %uuid, frontend = %frontend_path, "tpmif device in InitWait");
        Ok(Attach::Device(TpmifDevice {
            key,
            backend_path,
            frontend_path,
            uuid,
            phase: Phase::InitWait,
            written: XenbusState::InitWait,
            seen_frontend: false,
            kick: false,
            taken: 0,
            in_flight: None,
            last_error: None,
        }))
    }

    /// Waits until some connected frontend signals (or a step is due). Never completes while no
    /// device is connected.
    pub async fn wait_guest(&self) -> Result<DeviceKey, (DeviceKey, TransportError)> {
        if let Some(dev) = self
            .devices
            .values()
            .find(|d| d.kick && d.connection().is_some())
        {
            return Ok(dev.key);
        }
        type Wait<'a> = Pin<Box<dyn Future<Output = Result<(), TransportError>> + Send + 'a>>;
        let mut waits: Vec<(DeviceKey, Wait<'_>)> = self
            .devices
            .values()
            .filter_map(|d| {
                d.connection()
                    .map(|c| (d.key, Box::pin(c.wait_event()) as Wait<'_>))
            })
            .collect();
        poll_fn(|cx| {
            for (key, wait) in waits.iter_mut() {
                if let Poll::Ready(result) = wait.as_mut().poll(cx) {
                    return Poll::Ready(result.map(|()| *key).map_err(|e| (*key, e)));
                }
            }
            Poll::Pending
        })
        .await
    }

    /// Devices the accept filter refused (and that still exist), with their UUIDs.
    pub fn refused(&self) -> impl Iterator<Item = (DeviceKey, Uuid)> + '_ {
        self.refused.iter().map(|(k, u)| (*k, *u))
    }

    /// Takes `key`'s request off its page: one header read, one copy. A valid SUBMIT comes back
    /// as a [`Request`] whose [`Ticket`] the caller later hands to [`complete`](Self::complete),
    /// now or after other work; everything else (a bad length, a CANCEL while idle, nothing to
    /// do) is handled in place and the frontend notified. While a request is in flight the
    /// device's further signals are absorbed ([`Take::InFlight`]): one request per interface.
    pub fn take(&mut self, key: DeviceKey) -> Result<Take, TransportError> {
        let Some(dev) = self.devices.get_mut(&key) else {
            return Ok(Take::Stepped(StepOutcome::Nothing));
        };
        dev.kick = false;
        if dev.in_flight.is_some() {
            return Ok(Take::InFlight);
        }
        let Some(conn) = dev.connection() else {
            return Ok(Take::Stepped(StepOutcome::Nothing));
        };
        match take_submit(conn.page(), &self.rejections) {
            Taken::Submitted(s) => {
                dev.taken += 1;
                let ticket = Ticket {
                    key,
                    number: dev.taken,
                    slot: s.slot,
                };
                dev.in_flight = Some(dev.taken);
                Ok(Take::Request(Request {
                    ticket,
                    command: s.command,
                    locality: s.locality,
                }))
            }
            Taken::Stepped(outcome) => {
                if outcome.notify_guest() {
                    conn.notify()?;
                }
                Ok(Take::Stepped(outcome))
            }
        }
    }

    /// Whether `ticket` still names its device's current connection (the request is answered
    /// if completed now). False after the frontend reconnected or the device went away.
    pub fn is_current(&self, ticket: &Ticket) -> bool {
        self.devices
            .get(&ticket.key)
            .is_some_and(|d| d.in_flight == Some(ticket.number) && d.connection().is_some())
    }

    /// Answers the request `ticket` names with `response` (FINISH, then notify). A stale
    /// ticket — the frontend reconnected (a guest reboot), or the device is gone — is dropped:
    /// `Ok(StepOutcome::Nothing)`, nothing written. Either way the device is looked at again,
    /// so a request the guest wrote meanwhile is not left waiting for another signal.
    pub fn complete(
        &mut self,
        ticket: Ticket,
        response: &[u8],
    ) -> Result<StepOutcome, TransportError> {
        let Some(dev) = self.devices.get_mut(&ticket.key) else {
            return Ok(StepOutcome::Nothing);
        };
        dev.kick = true;
        if dev.in_flight != Some(ticket.number) {
            return Ok(StepOutcome::Nothing);
        }
        dev.in_flight = None;
        let Some(conn) = dev.connection() else {
            return Ok(StepOutcome::Nothing);
        };
        let outcome = finish_submit(conn.page(), ticket.slot, response, &self.rejections);
        if outcome.notify_guest() {
            conn.notify()?;
        }
        Ok(outcome)
    }

    /// Takes and completes `key`'s request at once, answering it with `handler` (the command
    /// and its locality in, the response out). `Ok(StepOutcome::Nothing)` if the device is not
    /// connected or has nothing to do, [`StepOutcome::Nothing`] too while a request taken with
    /// [`take`](Self::take) is still in flight.
    pub fn service(
        &mut self,
        key: DeviceKey,
        handler: &mut dyn FnMut(&[u8], u8) -> Vec<u8>,
    ) -> Result<StepOutcome, TransportError> {
        match self.take(key)? {
            Take::Request(r) => {
                let response = handler(&r.command, r.locality);
                self.complete(r.ticket, &response)
            }
            Take::Stepped(outcome) => Ok(outcome),
            Take::InFlight => Ok(StepOutcome::Nothing),
        }
    }

    /// Waits for the next thing to do: a xenstore change (already applied) or a guest signal
    /// (to be answered with [`service`](Self::service)).
    pub async fn next(&mut self, events: &mut WatchEvents) -> Activity {
        enum Woke {
            Xs(Option<WatchEvent>),
            Guest(Result<DeviceKey, (DeviceKey, TransportError)>),
        }
        // Unbiased: neither a guest that keeps rewriting its xenstore directory nor one that
        // keeps kicking its event channel can starve the other source.
        let woke = tokio::select! {
            ev = events.next() => Woke::Xs(ev),
            g = self.wait_guest() => Woke::Guest(g),
        };
        match woke {
            Woke::Xs(None) => Activity::XenstoreClosed,
            Woke::Xs(Some(ev)) => Activity::Xenstore(self.handle_watch_event(ev).await),
            Woke::Guest(Ok(key)) => Activity::Guest(key),
            Woke::Guest(Err((key, e))) => Activity::GuestError(key, e),
        }
    }
}

/// `/local/domain/<N>/…` with N ≠ 0.
fn is_driver_domain_root(root: &str) -> bool {
    root.strip_prefix("/local/domain/")
        .and_then(|rest| rest.split('/').next())
        .is_some_and(|id| id != "0")
}

fn is_at_or_below(path: &str, dir: &str) -> bool {
    path == dir
        || path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
}

async fn read_required(xs: &impl Xenstore, path: &str) -> Result<String, XenbusError> {
    xs.read(path).await?.ok_or_else(|| XenbusError::Missing {
        path: path.to_owned(),
    })
}

async fn write_state<C>(
    xs: &impl Xenstore,
    dev: &mut TpmifDevice<C>,
    state: XenbusState,
) -> Result<(), XenbusError> {
    xs.write(&format!("{}/state", dev.backend_path), state.as_value())
        .await?;
    dev.written = state;
    Ok(())
}

/// One reconcile pass for a known device. Sets `gone` when the device must be forgotten.
async fn drive<X: Xenstore, T: Transport>(
    xs: &X,
    transport: &mut T,
    dev: &mut TpmifDevice<T::Connection>,
    driver_domain: bool,
    events: &mut Vec<BackendEvent>,
    gone: &mut bool,
) -> Result<(), XenbusError> {
    let key = dev.key;
    let be = dev.backend_path.clone();

    // 1. The toolstack removed the backend directory (forced removal): release and forget.
    if xs.read(&format!("{be}/frontend")).await?.is_none() {
        dev.phase = Phase::InitWait;
        *gone = true;
        return Ok(());
    }

    // 2. Toolstack detach: online=0 (libxl also writes state=5). Go to Closed at once.
    if !matches!(dev.phase, Phase::Detached) {
        let online = xs.read(&format!("{be}/online")).await?;
        let be_state = xs.read(&format!("{be}/state")).await?;
        let foreign_closing = be_state.as_deref() == Some(XenbusState::Closing.as_value())
            && dev.written != XenbusState::Closing;
        if online.as_deref() == Some("0") || foreign_closing {
            dev.phase = Phase::Detached; // drops (unmaps/unbinds) any connection
            write_state(xs, dev, XenbusState::Closed).await?;
            events.push(BackendEvent::Detached { key });
            if driver_domain {
                // libxl waits for us to remove it (see `Backend::driver_domain`).
                xs.rm(&be).await?;
                *gone = true;
                return Ok(());
            }
        }
    }

    // Detached: only the toolstack's removal of the backend directory (step 1) matters now.
    // The frontend is not read any more; its domain may be half torn down already, and then
    // xenstored denies the read, which is no error of the guest's.
    if matches!(dev.phase, Phase::Detached) {
        return Ok(());
    }

    // 3. The frontend.
    let fe_state_path = format!("{}/state", dev.frontend_path);
    let Some(raw) = xs.read(&fe_state_path).await? else {
        if !dev.seen_frontend {
            return Ok(()); // not created yet
        }
        // The guest was destroyed: Closing, Closed, remove our directory.
        dev.phase = Phase::InitWait;
        if dev.written != XenbusState::Closed {
            write_state(xs, dev, XenbusState::Closing).await?;
            write_state(xs, dev, XenbusState::Closed).await?;
        }
        xs.rm(&be).await?;
        *gone = true;
        return Ok(());
    };
    dev.seen_frontend = true;
    if matches!(dev.phase, Phase::Detached) {
        return Ok(());
    }
    let fe_state = XenbusState::parse(&fe_state_path, &raw)?;

    match fe_state {
        XenbusState::Initialised | XenbusState::Connected => {
            if matches!(dev.phase, Phase::InitWait) {
                let conn = connect(xs, transport, dev).await?;
                dev.phase = Phase::Connected(conn);
                dev.kick = true;
                dev.in_flight = None;
                xs.write(&format!("{be}/ready"), "1").await?;
                write_state(xs, dev, XenbusState::Connected).await?;
                xvtpm_log::guest_debug!(%key, "tpmif connected");
                events.push(BackendEvent::Connected { key });
            }
        }
        XenbusState::Closing => {
            if dev.written != XenbusState::Closing {
                let conn = match std::mem::replace(&mut dev.phase, Phase::InitWait) {
                    Phase::Connected(c) | Phase::Closing(Some(c)) => Some(c),
                    _ => None,
                };
                dev.phase = Phase::Closing(conn);
                write_state(xs, dev, XenbusState::Closing).await?;
                events.push(BackendEvent::Closing { key });
            }
        }
        XenbusState::Closed
        | XenbusState::Unknown
        | XenbusState::Initialising
        | XenbusState::InitWait => {
            let was_open = !matches!(dev.phase, Phase::InitWait);
            if was_open || dev.written != XenbusState::InitWait {
                dev.phase = Phase::InitWait; // drops the connection
                write_state(xs, dev, XenbusState::InitWait).await?;
                if was_open {
                    events.push(BackendEvent::Disconnected { key });
                }
            }
        }
        XenbusState::Reconfiguring | XenbusState::Reconfigured => {}
    }
    Ok(())
}

/// Reads and checks the frontend's ring details, then maps and binds.
async fn connect<X: Xenstore, T: Transport>(
    xs: &X,
    transport: &mut T,
    dev: &TpmifDevice<T::Connection>,
) -> Result<T::Connection, XenbusError> {
    let fe = &dev.frontend_path;
    let v2_key = format!("{fe}/feature-protocol-v2");
    let v2 = xs.read(&v2_key).await?;
    if v2.as_deref() != Some("1") {
        return Err(XenbusError::ProtocolV2Required {
            path: v2_key,
            value: v2.as_deref().map(shown),
        });
    }
    let ring_key = format!("{fe}/ring-ref");
    let ring_ref = GrantRef::parse(&ring_key, &read_required(xs, &ring_key).await?)?;
    let port_key = format!("{fe}/event-channel");
    let port = EvtchnPort::parse(&port_key, &read_required(xs, &port_key).await?)?;
    Ok(transport.connect(dev.key.frontend, ring_ref, port)?)
}

/// The key a toolstack writes into a device's backend directory (`<root>/<fe>/<devid>/`) before
/// the guest's frontend connects, when that connection resumes a guest that was running on
/// another domain (a migration: `xl-vtpm migrate`) instead of booting one. Its value names the
/// domain the guest came from (for the log). Only the backend domain and the toolstack can write
/// a backend directory; the guest cannot, so it cannot keep its PCRs across a reboot with it.
pub const RESUME_MARKER: &str = "xvtpm-resume";

/// Takes [`RESUME_MARKER`] from the backend directory `backend_path`: `Some(value)` if it was
/// there and is now removed, `None` if it was absent or could not be removed. Removing it first
/// makes it count for one connection only: a later reconnect of the same device (a kexec) is a
/// boot again. A marker that cannot be removed is not honoured (the caller power-cycles, the safe
/// side: PCRs lost, never kept across a boot).
pub async fn take_resume_marker<X: Xenstore>(xs: &X, backend_path: &str) -> Result<Option<String>, XsError> {
    let path = format!("{backend_path}/{RESUME_MARKER}");
    let Some(v) = xs.read(&path).await? else { return Ok(None) };
    xs.rm(&path).await?;
    Ok(Some(v.trim().to_string()))
}

#[cfg(test)]
#[path = "xenbus_tests.rs"]
mod tests;
