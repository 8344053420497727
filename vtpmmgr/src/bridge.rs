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
//! # Restarts
//!
//! The bridge follows the manager domain by name: before each request it checks that the
//! domain it is linked to still has that name and its backend is connected; if not (the
//! domain was restarted, or the manager in it), it makes the device again for the domain now
//! bearing the name. A request whose link breaks mid-way is answered with an error that says
//! its outcome is unknown; it is never sent twice.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use uuid::Uuid;
use vtpm_proto::mgr::{self, AdminReply, ErrorCode, Failure};
use vtpm_proto::mgr_io;
use xen_platform::frontend::{Frontend, FrontendConfig};
use xen_platform::xen::{XenFrontendLink, XenFrontendTransport};
use xen_platform::XenbusState;
use xen_platform::xenstore::{WatchEvents, Xenstore, XsClient};

use crate::xenlink::{admin_frontend, admin_root};

/// How long connecting to the manager domain's admin backend may take.
const CONNECT: Duration = Duration::from_secs(20);

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
    /// The admin socket.
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

struct Linked {
    domid: u32,
    frontend: Frontend<XsClient, XenFrontendLink>,
}

struct Bridge {
    xs: Arc<XsClient>,
    events: WatchEvents,
    transport: XenFrontendTransport,
    target: Target,
    link: Option<Linked>,
}

/// Writes the admin link's device for the manager in domain `domid` (anything an earlier bridge
/// left there removed first) and returns its frontend directory, for
/// `xen_platform::frontend::Frontend::connect`.
pub async fn make_device<X: Xenstore>(xs: &X, domid: u32) -> Result<String, xen_platform::xenstore::XsError> {
    let fe = admin_frontend(domid);
    let be = format!("{}/0/0", admin_root(domid));
    xs.rm(&format!("/local/domain/{domid}/data/xvtpm-admin")).await?;
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

impl Bridge {
    /// Makes the device for domain `domid` (anything an earlier bridge left there removed
    /// first) and connects to it.
    async fn connect(&mut self, domid: u32) -> Result<(), BridgeError> {
        let base = format!("/local/domain/{domid}/data/xvtpm-admin");
        let fe = make_device(&*self.xs, domid).await.map_err(BridgeError::Xenstore)?;
        let cfg = FrontendConfig { connect_timeout: CONNECT, ..FrontendConfig::default() };
        match Frontend::connect(self.xs.clone(), &mut self.events, &mut self.transport, &fe, cfg).await {
            Ok(frontend) => {
                xvtpm_log::host_info!(domid, "admin link to the manager domain connected");
                self.link = Some(Linked { domid, frontend });
                Ok(())
            }
            Err(source) => {
                let _ = self.xs.rm(&base).await;
                Err(BridgeError::Link { domid, source })
            }
        }
    }

    /// Whether the linked domain still bears the target and its backend is connected.
    async fn still_linked(&self) -> bool {
        let Some(l) = &self.link else { return false };
        let xs = &*self.xs;
        let be_state = xs.read(&format!("{}/0/0/state", admin_root(l.domid))).await.ok().flatten();
        if be_state.as_deref() != Some(XenbusState::Connected.as_value()) {
            return false;
        }
        matches!(resolve(xs, &self.target).await, Ok(Some(d)) if d == l.domid)
    }

    /// A link to the target domain, made again if the domain or its manager changed.
    async fn ensure(&mut self) -> Result<(), Failure> {
        if self.still_linked().await {
            return Ok(());
        }
        if let Some(old) = self.link.take() {
            xvtpm_log::host_warn!(domid = old.domid, "the admin link's manager domain is gone or restarted; linking again");
            old.frontend.close().await;
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
                    old.frontend.close().await;
                }
                encode_error(Failure::new(
                    ErrorCode::Internal,
                    format!("the admin link to the manager domain (domid {domid}) broke during the request ({e}); its outcome is unknown: check with `xl-vtpm mgr status` before retrying"),
                ))
            }
        }
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

fn encode_error(f: Failure) -> Vec<u8> {
    mgr::encode(&AdminReply::Error(f)).expect("a short error reply encodes")
}

/// Links dom0's admin socket `admin_path` to the manager in domain `target` until SIGTERM/SIGINT.
pub async fn run(target: Target, admin_path: &Path) -> Result<(), BridgeError> {
    let (xs, events) = XsClient::open().await.map_err(BridgeError::Xenstore)?;
    let xs = Arc::new(xs);
    let domid = resolve(&xs, &target).await.map_err(BridgeError::Xenstore)?.ok_or_else(|| match &target {
        Target::Name(n) => BridgeError::NoDomain(n.clone()),
        Target::Id(d) => BridgeError::NoDomain(format!("domid {d}")),
    })?;
    if domid == 0 {
        return Err(BridgeError::Dom0);
    }
    let transport = XenFrontendTransport::open().map_err(BridgeError::Devices)?;
    let mut bridge = Bridge { xs: xs.clone(), events, transport, target, link: None };
    bridge.connect(domid).await?;
    let bind_err = |source| BridgeError::Bind { path: admin_path.to_path_buf(), source };
    if let Some(dir) = admin_path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    let _ = std::fs::remove_file(admin_path);
    let listener = tokio::net::UnixListener::bind(admin_path).map_err(bind_err)?;
    std::fs::set_permissions(admin_path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(bind_err)?;
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(BridgeError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(BridgeError::Signals)?;
    println!("{}", serde_json::json!({"ready": true, "admin_socket": admin_path, "pid": std::process::id(), "xen_domain": domid}));
    let bridge = Arc::new(tokio::sync::Mutex::new(bridge));
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
    let _ = std::fs::remove_file(admin_path);
    let mut b = bridge.lock().await;
    if let Some(l) = b.link.take() {
        l.frontend.close().await;
        let _ = xs.rm(&format!("/local/domain/{}/data/xvtpm-admin", l.domid)).await;
    }
    Ok(())
}

/// One admin connection: root only, then its frames one at a time through the link.
async fn client(mut s: UnixStream, bridge: Arc<tokio::sync::Mutex<Bridge>>, my_uid: u32) {
    let uid = s.peer_cred().map(|c| c.uid()).ok();
    if uid != Some(0) && uid != Some(my_uid) {
        xvtpm_log::guest_warn!(uid = ?uid, "refused admin connection from a non-root peer");
        let _ = s.write_all(&encode_error(Failure::new(ErrorCode::Refused, "the admin socket is root-only"))).await;
        return;
    }
    while let Ok(Some(body)) = mgr_io::nonblocking::read_frame(&mut s).await {
        let mut frame = zeroize::Zeroizing::new(Vec::with_capacity(4 + body.len()));
        frame.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
        frame.extend_from_slice(&body);
        let reply = bridge.lock().await.forward(&frame).await;
        if s.write_all(&reply).await.is_err() {
            break;
        }
    }
}
