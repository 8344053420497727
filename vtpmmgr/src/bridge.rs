//! `vtpmmgr bridge`: dom0's admin socket for a manager that runs in its own domain.
//!
//! With the manager in the manager domain, dom0 keeps the toolstack and the admin CLI
//! (`xl-vtpm mgr …`, `xl-vtpm vtpm …`), which speak the admin protocol on
//! `<run-dir>/admin.sock`. The bridge binds that socket (root only, mode 0600, as the manager
//! does in dom0) and carries each request frame unchanged over a Xen link to the manager
//! domain, and its reply back. No key and no state passes through it that the admin protocol
//! would not give dom0 root anyway.
//!
//! # The link
//!
//! A tpmif-style device (one shared page, one event channel, the page protocol and reply
//! chunking of `xen_platform::frontend`) whose frontend is this process in dom0 and whose
//! backend is the manager (`vtpmmgr serve --admin-xen`). The bridge writes both directories
//! under the manager domain's own `data` directory ([`crate::xenlink::admin_root`]): libxl makes
//! `/local/domain/<M>/data` writable by domain M only, so no other domain can make or alter the
//! device, and the manager serves only a device whose frontend is domain 0 (Xen checks the grant
//! and the event channel come from there). No kernel driver binds the device class.
//!
//! # dom0's vTPM processes
//!
//! A vTPM running as a dom0 process reaches its manager on a per-vTPM socket,
//! `<run-dir>/vtpm/<uuid>.sock`, where the manager names the caller by the kernel's
//! `SO_PEERCRED` pid and that process's start time. A manager in another domain cannot see dom0's
//! processes, so the bridge does that part in dom0:
//! - it turns `VtpmAttach { uuid, pid }` into `VtpmAttachRelayed { uuid, pid, start }` with the
//!   start time read here, and once the manager accepts, binds the vTPM's socket (mode 0660,
//!   group `VTPM_GID`, as the manager does);
//! - each request on that socket goes to the manager as `VtpmRelay { uuid, pid, start, request }`
//!   with the caller's pid and start time, and the manager authorises it exactly as on its own
//!   socket (only the attached process of that vTPM);
//! - it checks the attached processes every second and tells the manager when one exits
//!   (`VtpmRelayedExited`); `VtpmDetach`/`VtpmDel` unbind the socket;
//! - it keeps its attachments in `<run-dir>/relayed.json`, so a restarted bridge serves the
//!   processes still running; a manager that lost them (restarted) gets them again from the
//!   bridge on the first request it answers with "not attached".
//!
//! Requests travel on a few links at once ([`LINKS`]), so deep quotes from several vTPMs can
//! share one physical quote; admin requests and relays take whichever link is free.
//!
//! # Restarts
//!
//! The bridge follows the manager domain by name: before each request it checks that the
//! domain it is linked to still has that name and its backend is connected; if not (the
//! domain was restarted, or the manager in it), it makes the device again for the domain now
//! bearing the name. A request whose link breaks mid-way is answered with an error that says
//! its outcome is unknown; it is never sent twice.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use uuid::Uuid;
use vtpm_proto::mgr::{self, AdminReply, AdminRequest, ErrorCode, Failure, VtpmReply, VtpmRequest};
use vtpm_proto::mgr_io;
use xen_platform::XenbusState;
use xen_platform::frontend::{Frontend, FrontendConfig};
use xen_platform::xen::{XenFrontendLink, XenFrontendTransport};
use xen_platform::xenstore::{WatchEvents, Xenstore, XsClient};

use crate::xenlink::{admin_frontend, admin_root};

/// How long connecting to the manager domain's admin backend may take.
const CONNECT: Duration = Duration::from_secs(20);

/// Links (devices) the bridge keeps to the manager: requests in flight at once.
pub const LINKS: u32 = 4;

/// How often the relayed processes are checked for exit.
const WATCH: Duration = Duration::from_secs(1);

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// No xenstore (not dom0 of a Xen host?).
    #[error("cannot connect to xenstore (is this dom0 of a running Xen host?)")]
    Xenstore(#[source] xen_platform::xenstore::XsError),
    /// The named domain is not running.
    #[error("no running domain is named {0:?}; start the manager domain first (`xl create` of its config)")]
    NoDomain(String),
    /// The domain is dom0.
    #[error("--domain names dom0; the bridge links dom0 to a manager in another domain (in dom0, run `vtpmmgr serve`)")]
    Dom0,
    /// The link did not come up.
    #[error("the admin link to domain {domid} did not connect (is `vtpmmgr serve --admin-xen` running there?)")]
    Link {
        /// The manager domain.
        domid: u32,
        /// Cause.
        source: xen_platform::frontend::FrontendError,
    },
    /// The admin socket or the run directory.
    #[error("cannot bind the admin socket {}", path.display())]
    Bind {
        /// The socket.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The grant / event channel devices.
    #[error("cannot open the Xen grant / event channel devices (xen-gntalloc, xen-evtchn)")]
    Devices(#[source] std::io::Error),
    /// Signal handlers.
    #[error("cannot install the SIGTERM/SIGINT handlers")]
    Signals(#[source] std::io::Error),
}

/// Which domain the bridge serves: a name (followed across restarts) or a fixed id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The domain bearing this name now.
    Name(String),
    /// This domain id.
    Id(u32),
}

impl Target {
    /// `NAME` or a numeric domain id.
    pub fn parse(s: &str) -> Target {
        s.parse().map_or_else(|_| Target::Name(s.to_string()), Target::Id)
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Name(n) => write!(f, "{n:?}"),
            Target::Id(d) => write!(f, "(domid {d})"),
        }
    }
}

/// The admin link's directories under domain `domid`'s `data`.
fn base(domid: u32) -> String {
    format!("/local/domain/{domid}/data/xvtpm-admin")
}

/// Device `devid`'s frontend and backend directories of the admin link to domain `domid`.
fn device_dirs(domid: u32, devid: u32) -> (String, String) {
    (format!("{}/{devid}", admin_frontend(domid)), format!("{}/0/{devid}", admin_root(domid)))
}

/// Writes device `devid` of the admin link to the manager in domain `domid` (whatever an earlier
/// bridge left at that device removed first) and returns its frontend directory, for
/// `xen_platform::frontend::Frontend::connect`.
pub async fn make_device<X: Xenstore>(xs: &X, domid: u32, devid: u32) -> Result<String, xen_platform::xenstore::XsError> {
    let (fe, be) = device_dirs(domid, devid);
    xs.rm(&fe).await?;
    xs.rm(&be).await?;
    for (k, v) in [("backend", be.as_str()), ("backend-id", &domid.to_string()), ("state", XenbusState::Initialising.as_value())] {
        xs.write(&format!("{fe}/{k}"), v).await?;
    }
    // `frontend` last: the backend takes the device once that key is there.
    let uuid = Uuid::new_v4().to_string();
    for (k, v) in [("frontend-id", "0"), ("uuid", uuid.as_str()), ("online", "1"), ("state", XenbusState::Initialising.as_value()), ("frontend", fe.as_str())] {
        xs.write(&format!("{be}/{k}"), v).await?;
    }
    Ok(fe)
}

/// The domain `target` names now, if it runs.
async fn resolve(xs: &XsClient, target: &Target) -> Result<Option<u32>, xen_platform::xenstore::XsError> {
    match target {
        Target::Id(d) => Ok(xs.read(&format!("/local/domain/{d}/name")).await?.map(|_| *d)),
        Target::Name(name) => {
            for d in xs.directory("/local/domain").await?.unwrap_or_default() {
                let Ok(id) = d.parse::<u32>() else { continue };
                if id != 0 && xs.read(&format!("/local/domain/{id}/name")).await?.as_deref() == Some(name.as_str()) {
                    return Ok(Some(id));
                }
            }
            Ok(None)
        }
    }
}

struct Linked {
    domid: u32,
    frontend: Frontend<XsClient, XenFrontendLink>,
}

/// One device of the admin link.
struct Link {
    xs: Arc<XsClient>,
    events: WatchEvents,
    transport: XenFrontendTransport,
    target: Target,
    devid: u32,
    link: Option<Linked>,
}

impl Link {
    async fn open(target: Target, devid: u32) -> Result<Link, BridgeError> {
        let (xs, events) = XsClient::open().await.map_err(BridgeError::Xenstore)?;
        let transport = XenFrontendTransport::open().map_err(BridgeError::Devices)?;
        Ok(Link { xs: Arc::new(xs), events, transport, target, devid, link: None })
    }

    /// Makes the device for domain `domid` and connects to it.
    async fn connect(&mut self, domid: u32) -> Result<(), BridgeError> {
        let fe = make_device(&*self.xs, domid, self.devid).await.map_err(BridgeError::Xenstore)?;
        let cfg = FrontendConfig { connect_timeout: CONNECT, ..FrontendConfig::default() };
        match Frontend::connect(self.xs.clone(), &mut self.events, &mut self.transport, &fe, cfg).await {
            Ok(frontend) => {
                xvtpm_log::host_info!(domid, device = self.devid, "admin link to the manager domain connected");
                self.link = Some(Linked { domid, frontend });
                Ok(())
            }
            Err(source) => {
                let (fe, be) = device_dirs(domid, self.devid);
                let _ = self.xs.rm(&fe).await;
                let _ = self.xs.rm(&be).await;
                Err(BridgeError::Link { domid, source })
            }
        }
    }

    /// Ends a link: closed and its device removed while its domain lives; only released when
    /// the domain is gone (its directories went with it; writing there would make them again).
    async fn release(&self, old: Linked) {
        let home = format!("/local/domain/{}", old.domid);
        if matches!(self.xs.read(&format!("{home}/name")).await, Ok(Some(_))) {
            old.frontend.close().await;
            let (fe, be) = device_dirs(old.domid, self.devid);
            let _ = self.xs.rm(&fe).await;
            let _ = self.xs.rm(&be).await;
        } else {
            old.frontend.abandon();
        }
    }

    /// Whether the linked domain still bears the target and its backend is connected.
    async fn still_linked(&self) -> bool {
        let Some(l) = &self.link else { return false };
        let xs = &*self.xs;
        let be_state = xs.read(&format!("{}/state", device_dirs(l.domid, self.devid).1)).await.ok().flatten();
        if be_state.as_deref() != Some(XenbusState::Connected.as_value()) {
            return false;
        }
        // The linked domain's own name, one read on every request (names are unique in xl; a
        // restarted domain has a new domid, and the old one's directory is gone).
        let name = xs.read(&format!("/local/domain/{}/name", l.domid)).await.ok().flatten();
        match &self.target {
            Target::Name(n) => name.as_deref() == Some(n.as_str()),
            Target::Id(d) => *d == l.domid && name.is_some(),
        }
    }

    /// A link to the target domain, made again if the domain or its manager changed.
    async fn ensure(&mut self) -> Result<(), Failure> {
        if self.still_linked().await {
            return Ok(());
        }
        if let Some(old) = self.link.take() {
            xvtpm_log::host_warn!(domid = old.domid, device = self.devid, "the admin link's manager domain is gone or restarted; linking again");
            self.release(old).await;
        }
        let domid = match resolve(&self.xs, &self.target).await {
            Ok(Some(d)) => d,
            Ok(None) => return Err(Failure::new(ErrorCode::Busy, format!("the manager domain {} is not running; start it and retry", self.target))),
            Err(e) => return Err(Failure::new(ErrorCode::Internal, format!("xenstore: {e}"))),
        };
        self.connect(domid).await.map_err(|e| Failure::new(ErrorCode::Busy, format!("{}; retry once it serves", xvtpm_log::report(&e))))
    }

    /// One request frame (prefix included) and its reply frame.
    async fn forward(&mut self, frame: &[u8]) -> Vec<u8> {
        if let Err(f) = self.ensure().await {
            return encode_error(f);
        }
        let Some(l) = self.link.as_mut() else { return encode_error(Failure::new(ErrorCode::Internal, "no admin link")) };
        match l.frontend.transact(frame).await {
            Ok(reply) => reply,
            Err(xen_platform::frontend::FrontendError::RequestTooLarge { len }) => encode_error(Failure::new(
                ErrorCode::BadRequest,
                format!("this admin request is {len} bytes; the Xen admin link carries at most one page (4088 bytes) per request"),
            )),
            Err(e) => {
                let domid = l.domid;
                if let Some(old) = self.link.take() {
                    self.release(old).await;
                }
                encode_error(Failure::new(
                    ErrorCode::Internal,
                    format!("the admin link to the manager domain (domid {domid}) broke during the request ({e}); its outcome is unknown: check with `xl-vtpm mgr status` before retrying"),
                ))
            }
        }
    }
}

fn encode_error(f: Failure) -> Vec<u8> {
    mgr::encode(&AdminReply::Error(f)).expect("a short error reply encodes")
}

/// A dom0 process attached to a vTPM through the bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Relayed {
    pid: u32,
    start: u64,
}

/// The links, the relayed attachments and their sockets.
struct Bridge {
    links: Vec<tokio::sync::Mutex<Link>>,
    next: std::sync::atomic::AtomicUsize,
    run_dir: PathBuf,
    relayed: std::sync::Mutex<HashMap<Uuid, Relayed>>,
    sockets: std::sync::Mutex<HashMap<Uuid, JoinHandle<()>>>,
}

fn locked<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Bridge {
    /// One request frame through a free link (or, with all busy, the next in turn).
    async fn forward(&self, frame: &[u8]) -> Vec<u8> {
        for l in &self.links {
            if let Ok(mut l) = l.try_lock() {
                return l.forward(frame).await;
            }
        }
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.links.len();
        self.links[i].lock().await.forward(frame).await
    }

    /// One admin request and its decoded reply.
    async fn ask(&self, req: &AdminRequest) -> AdminReply {
        let frame = match mgr::encode(req) {
            Ok(f) => zeroize::Zeroizing::new(f),
            Err(e) => return AdminReply::Error(Failure::new(ErrorCode::BadRequest, e.to_string())),
        };
        let reply = self.forward(&frame).await;
        mgr_io::decode_frame::<AdminReply>(&reply).unwrap_or_else(|e| AdminReply::Error(Failure::new(ErrorCode::Internal, format!("the manager's reply did not decode: {e}"))))
    }

    fn relayed_path(&self) -> PathBuf {
        self.run_dir.join("relayed.json")
    }

    fn save(&self) {
        let list: Vec<(Uuid, Relayed)> = locked(&self.relayed).iter().map(|(u, r)| (*u, *r)).collect();
        let bytes = serde_json::to_vec(&list).expect("serialisable");
        if let Err(e) = xvtpm_fsutil::write_atomic(&self.relayed_path(), &bytes, 0o600) {
            xvtpm_log::host_warn!(error = %e, "could not record the relayed attachments; a restarted bridge will not serve the running dom0 vTPMs");
        }
    }

    /// Records `uuid`'s process and binds its socket.
    fn attached(self: &Arc<Self>, uuid: Uuid, r: Relayed) {
        locked(&self.relayed).insert(uuid, r);
        self.save();
        let path = crate::manager::vtpm_socket(&self.run_dir, &uuid);
        match crate::daemon::bind_vtpm_socket(&path) {
            Ok(l) => {
                let task = tokio::spawn(serve_vtpm(self.clone(), l, uuid));
                if let Some(old) = locked(&self.sockets).insert(uuid, task) {
                    old.abort();
                }
            }
            Err(e) => xvtpm_log::host_error!(vtpm = %uuid, error = %e, path = %path.display(), "cannot bind the vTPM socket"),
        }
    }

    /// Forgets `uuid`'s process and unbinds its socket.
    fn detached(&self, uuid: &Uuid) {
        let had = locked(&self.relayed).remove(uuid).is_some();
        if had {
            self.save();
        }
        if let Some(t) = locked(&self.sockets).remove(uuid) {
            t.abort();
        }
        let _ = std::fs::remove_file(crate::manager::vtpm_socket(&self.run_dir, uuid));
    }

    /// An admin request from dom0's CLI: attachments become relayed ones, and the bridge keeps
    /// its sockets in step with what the manager accepted.
    async fn admin(self: &Arc<Self>, body: &[u8]) -> Vec<u8> {
        let req = mgr::decode::<AdminRequest>(body).ok();
        let encode = |r: &AdminReply| mgr::encode(r).unwrap_or_else(|e| encode_error(Failure::new(ErrorCode::Internal, e.to_string())));
        match req {
            Some(AdminRequest::VtpmAttachRelayed { .. } | AdminRequest::VtpmRelayedExited { .. } | AdminRequest::VtpmRelay { .. }) => {
                encode_error(Failure::new(ErrorCode::Refused, "relayed requests are the bridge's own; attach a process with VtpmAttach"))
            }
            Some(AdminRequest::VtpmAttach { uuid, pid }) => {
                // Named now, while the caller (the vTPM's parent) keeps the child unreaped.
                let Some(start) = xvtpm_fsutil::start_time(pid).filter(|_| xvtpm_fsutil::pid_alive(pid)) else {
                    return encode_error(Failure::new(ErrorCode::BadRequest, format!("process {pid} is not running; attach a vTPM's process while it runs")));
                };
                // One live process per vTPM, decided here (the manager cannot see dom0's).
                let held = locked(&self.relayed).get(&uuid).copied();
                if let Some(old) = held.filter(|o| *o != Relayed { pid, start } && xvtpm_fsutil::instance_alive(o.pid, o.start)) {
                    return encode_error(Failure::new(ErrorCode::Exists, format!("vTPM {uuid} is already served by process {}; stop it first", old.pid)));
                }
                let reply = self.ask(&AdminRequest::VtpmAttachRelayed { uuid, pid, start }).await;
                if reply == AdminReply::Ok {
                    self.attached(uuid, Relayed { pid, start });
                }
                encode(&reply)
            }
            Some(AdminRequest::VtpmDetach { uuid } | AdminRequest::VtpmDel { uuid }) => {
                let reply = self.forward(&frame_of(body)).await;
                if matches!(mgr_io::decode_frame::<AdminReply>(&reply), Ok(AdminReply::Ok | AdminReply::Vtpm(_))) {
                    self.detached(&uuid);
                }
                reply
            }
            _ => self.forward(&frame_of(body)).await,
        }
    }

    /// A relayed vTPM request: to the manager with the caller's pid and start time; if the
    /// manager lost the attachment (it restarted) while the process still runs, it is attached
    /// again and the request asked once more.
    async fn relay(&self, uuid: Uuid, pid: u32, start: u64, request: VtpmRequest) -> VtpmReply {
        let ask = AdminRequest::VtpmRelay { uuid, pid, start, request: Box::new(request) };
        for attempt in 0..2 {
            match self.ask(&ask).await {
                AdminReply::Relayed { reply } => {
                    let lost = matches!(&*reply, VtpmReply::Error(f) if f.code == ErrorCode::NotAttached);
                    let mine = locked(&self.relayed).get(&uuid).copied();
                    match mine {
                        Some(r) if lost && attempt == 0 && xvtpm_fsutil::instance_alive(r.pid, r.start) => {
                            xvtpm_log::host_info!(vtpm = %uuid, pid = r.pid, "the manager lost a relayed attachment (restarted?); attaching again");
                            let again = self.ask(&AdminRequest::VtpmAttachRelayed { uuid, pid: r.pid, start: r.start }).await;
                            if again != AdminReply::Ok {
                                return *reply;
                            }
                        }
                        _ => return *reply,
                    }
                }
                AdminReply::Error(f) => return VtpmReply::Error(f),
                other => return VtpmReply::Error(Failure::new(ErrorCode::Internal, format!("the manager answered a relayed request with {}", reply_kind(&other)))),
            }
        }
        VtpmReply::Error(Failure::new(ErrorCode::NotAttached, format!("no process is attached to vTPM {uuid}")))
    }

    /// Tells the manager about relayed processes that exited, and unbinds their sockets.
    async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(WATCH);
        loop {
            tick.tick().await;
            let gone: Vec<(Uuid, Relayed)> = locked(&self.relayed).iter().filter(|(_, r)| !xvtpm_fsutil::instance_alive(r.pid, r.start)).map(|(u, r)| (*u, *r)).collect();
            for (uuid, r) in gone {
                let reply = self.ask(&AdminRequest::VtpmRelayedExited { uuid, pid: r.pid, start: r.start }).await;
                if let AdminReply::Error(f) = &reply {
                    xvtpm_log::host_warn!(vtpm = %uuid, pid = r.pid, error = %f, "could not tell the manager that a relayed vTPM process exited");
                }
                if locked(&self.relayed).get(&uuid) == Some(&r) {
                    self.detached(&uuid);
                }
                xvtpm_log::host_info!(vtpm = %uuid, pid = r.pid, "relayed vTPM process exited; socket unbound");
            }
        }
    }
}

/// The variant name of a reply, for an error message (never its content).
fn reply_kind(r: &AdminReply) -> String {
    serde_json::to_value(r).ok().and_then(|v| v.get("result").and_then(|k| k.as_str().map(str::to_string))).unwrap_or_else(|| "?".into())
}

fn frame_of(body: &[u8]) -> zeroize::Zeroizing<Vec<u8>> {
    let mut frame = zeroize::Zeroizing::new(Vec::with_capacity(4 + body.len()));
    frame.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    frame.extend_from_slice(body);
    frame
}

/// A vTPM's socket in dom0: each connection's requests relayed with its peer's pid.
async fn serve_vtpm(bridge: Arc<Bridge>, l: UnixListener, uuid: Uuid) {
    loop {
        let Ok((mut s, _)) = l.accept().await else { continue };
        let b = bridge.clone();
        tokio::spawn(async move {
            let pid = s.peer_cred().ok().and_then(|c| c.pid()).and_then(|p| u32::try_from(p).ok());
            let start = pid.and_then(xvtpm_fsutil::start_time);
            while let Ok(Some(body)) = mgr_io::nonblocking::read_frame(&mut s).await {
                let reply = match (mgr::decode::<VtpmRequest>(&body), pid, start) {
                    (Ok(req), Some(pid), Some(start)) => b.relay(uuid, pid, start, req).await,
                    (Err(e), ..) => VtpmReply::Error(Failure::new(ErrorCode::BadRequest, e.to_string())),
                    _ => VtpmReply::Error(Failure::new(ErrorCode::Refused, "the kernel did not name the calling process")),
                };
                let frame = zeroize::Zeroizing::new(mgr::encode(&reply).unwrap_or_else(|e| encode_error(Failure::new(ErrorCode::Internal, e.to_string()))));
                if s.write_all(&frame).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Links dom0's admin socket `<run_dir>/admin.sock` (and the relayed vTPMs' sockets in
/// `<run_dir>/vtpm`) to the manager in domain `target` until SIGTERM/SIGINT.
pub async fn run(target: Target, run_dir: &Path) -> Result<(), BridgeError> {
    let admin_path = run_dir.join("admin.sock");
    let (xs, _events) = XsClient::open().await.map_err(BridgeError::Xenstore)?;
    let domid = resolve(&xs, &target).await.map_err(BridgeError::Xenstore)?.ok_or_else(|| match &target {
        Target::Name(n) => BridgeError::NoDomain(n.clone()),
        Target::Id(d) => BridgeError::NoDomain(format!("domid {d}")),
    })?;
    if domid == 0 {
        return Err(BridgeError::Dom0);
    }
    xs.rm(&base(domid)).await.map_err(BridgeError::Xenstore)?;
    let mut links = Vec::new();
    for devid in 0..LINKS {
        let mut l = Link::open(target.clone(), devid).await?;
        l.connect(domid).await?;
        links.push(tokio::sync::Mutex::new(l));
    }
    let bind_err = |source| BridgeError::Bind { path: admin_path.clone(), source };
    std::fs::create_dir_all(run_dir.join("vtpm")).map_err(bind_err)?;
    let _ = std::fs::remove_file(&admin_path);
    let listener = UnixListener::bind(&admin_path).map_err(bind_err)?;
    std::fs::set_permissions(&admin_path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(bind_err)?;
    let bridge = Arc::new(Bridge {
        links,
        next: std::sync::atomic::AtomicUsize::new(0),
        run_dir: run_dir.to_path_buf(),
        relayed: std::sync::Mutex::new(HashMap::new()),
        sockets: std::sync::Mutex::new(HashMap::new()),
    });
    // A restarted bridge serves the dom0 vTPMs still running.
    let kept: Vec<(Uuid, Relayed)> = std::fs::read(bridge.relayed_path()).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    for (uuid, r) in kept.into_iter().filter(|(_, r)| xvtpm_fsutil::instance_alive(r.pid, r.start)) {
        bridge.attached(uuid, r);
    }
    bridge.save();
    tokio::spawn(bridge.clone().watch());
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(BridgeError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(BridgeError::Signals)?;
    println!("{}", serde_json::json!({"ready": true, "admin_socket": admin_path, "pid": std::process::id(), "xen_domain": domid, "links": LINKS}));
    let my_uid = nix::unistd::geteuid().as_raw();
    let accept = async {
        loop {
            let Ok((s, _)) = listener.accept().await else { continue };
            tokio::spawn(client(s, bridge.clone(), my_uid));
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = term.recv() => xvtpm_log::host_info!("SIGTERM: stopping"),
        _ = int.recv() => xvtpm_log::host_info!("SIGINT: stopping"),
    }
    let _ = std::fs::remove_file(&admin_path);
    for (_, t) in locked(&bridge.sockets).drain() {
        t.abort();
    }
    for l in &bridge.links {
        let mut l = l.lock().await;
        if let Some(old) = l.link.take() {
            l.release(old).await;
        }
    }
    Ok(())
}

/// One admin connection: root only, then its frames one at a time.
async fn client(mut s: UnixStream, bridge: Arc<Bridge>, my_uid: u32) {
    let uid = s.peer_cred().map(|c| c.uid()).ok();
    if uid != Some(0) && uid != Some(my_uid) {
        xvtpm_log::guest_warn!(uid = ?uid, "refused admin connection from a non-root peer");
        let _ = s.write_all(&encode_error(Failure::new(ErrorCode::Refused, "the admin socket is root-only"))).await;
        return;
    }
    while let Ok(Some(body)) = mgr_io::nonblocking::read_frame(&mut s).await {
        let reply = zeroize::Zeroizing::new(bridge.admin(&body).await);
        if s.write_all(&reply).await.is_err() {
            break;
        }
    }
}
