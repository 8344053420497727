//! The manager's sockets: the root-only admin socket and one socket per running vTPM.
//!
//! A vTPM's identity is the socket it connects to plus the process id the
//! kernel reports for the peer (`SO_PEERCRED`), which must be the process
//! xl-vtpm attached. Nothing the peer says about itself is trusted.
//!
//! A vTPM's socket is bound while a live process is attached to it (from `VtpmAttach`, or a
//! restored attachment at start, until the process exits or the vTPM is deleted), never for
//! identities at rest: the manager's descriptors grow with the running vTPMs, not with the
//! identities it holds. A vTPM process that starts before its attachment retries until the
//! socket appears.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use xvtpm_log::guest_warn;
use uuid::Uuid;
use vtpm_proto::mgr::{self, AdminReply, AdminRequest, ErrorCode, Failure, VtpmReply, VtpmRequest};
use vtpm_proto::mgr_io;

use crate::failure::FromError as _;


use crate::dispatch::{Dispatcher, Shared, lock};
use crate::manager::{Attachment, Manager};
use crate::peer::Peer;

async fn read_frame(s: &mut UnixStream) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, mgr_io::WireError> {
    mgr_io::nonblocking::read_frame(s).await
}

async fn write_msg<T: serde::Serialize>(s: &mut UnixStream, msg: &T) -> std::io::Result<()> {
    let f = match mgr::encode(msg) {
        Ok(f) => f,
        Err(e) => {
            // Never drop a reply silently: say why, in the log and to the peer.
            xvtpm_log::guest_error!(error = %e, "a reply does not fit in one manager frame");
            let fail = Failure::from_error_fix(ErrorCode::Internal, "the reply does not fit in one manager frame", &e, "list with paging (`VtpmListPage`)");
            mgr::encode(&AdminReply::Error(fail)).map_err(std::io::Error::other)?
        }
    };
    s.write_all(&f).await
}

/// Drops `uuid`'s attachment the moment its process exits: a pidfd taken now becomes readable
/// when that process (and no later holder of its pid) ends.
// tokio's `AsyncFd::register_with_interest` is `unsafe` (I/O safety of the registered fd): the
// only `unsafe` of this crate, denied everywhere else.
#[allow(unsafe_code)]
fn watch_attachment(m: &Shared, uuid: Uuid, att: Attachment, detached: &Arc<tokio::sync::Notify>) {
    let fd = match rustix::process::Pid::from_raw(att.pid as i32).map(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty())) {
        Some(Ok(fd)) => fd,
        Some(Err(e)) if e == rustix::io::Errno::SRCH => {
            lock(m).detach_exited(uuid, att);
            detached.notify_one();
            return;
        }
        other => {
            xvtpm_log::host_warn!(vtpm = %uuid, pid = att.pid, error = ?other.map(|r| r.err()), "cannot watch the attached process (pidfd_open); its exit is noticed at its next request");
            return;
        }
    };
    // The pid may have changed hands between the attach and the pidfd: then the pidfd names
    // another process, and the attachment is already dead.
    if !att.alive() {
        lock(m).detach_exited(uuid, att);
        detached.notify_one();
        return;
    }
    let m = m.clone();
    let detached = detached.clone();
    tokio::spawn(async move {
        // SAFETY: `fd` is an `OwnedFd` this task alone owns: it is open, it is closed only when
        // the `AsyncFd` (which owns it) drops, and its `as_raw_fd` never changes.
        match unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) } {
            Ok(afd) => {
                let _ = afd.readable().await;
            }
            Err(e) => {
                xvtpm_log::host_warn!(vtpm = %uuid, pid = att.pid, error = %e, "cannot poll the attached process's pidfd; its exit is noticed at its next request");
                return;
            }
        }
        lock(&m).detach_exited(uuid, att);
        // Unbind its socket.
        detached.notify_one();
    });
}

fn bind(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(l)
}

/// A vTPM's socket at `path`: sandboxed vTPMs run as their own uid in group `VTPM_GID`, so
/// `root:VTPM_GID` mode 0660; the identity is the peer's pid. (`vtpmmgr bridge` binds the same.)
pub(crate) fn bind_vtpm_socket(path: &Path) -> std::io::Result<UnixListener> {
    let l = bind(path, 0o660)?;
    std::os::unix::fs::chown(path, None, Some(vtpm_proto::mgr::VTPM_GID))?;
    Ok(l)
}

/// Keeps one listener per running (attached) vTPM in step with the attachments and the store.
struct VtpmSockets {
    tasks: HashMap<Uuid, JoinHandle<()>>,
    dispatch: Dispatcher,
}

impl VtpmSockets {
    /// Removes the socket files in `<run-dir>/vtpm` that are not in `want` (an earlier manager's,
    /// which may have bound one per identity).
    fn remove_stale(run_dir: &Path, want: &[Uuid]) {
        let Ok(rd) = std::fs::read_dir(run_dir.join("vtpm")) else { return };
        let want: std::collections::HashSet<String> = want.iter().map(|u| format!("{u}.sock")).collect();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".sock") && !want.contains(&name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    fn reconcile(&mut self, mgr: &Shared) {
        let (want, run_dir) = {
            let m = lock(mgr);
            (m.served_vtpms(), m.config().run_dir.clone())
        };
        self.tasks.retain(|uuid, task| {
            let keep = want.contains(uuid);
            if !keep {
                task.abort();
                let _ = std::fs::remove_file(crate::manager::vtpm_socket(&run_dir, uuid));
            }
            keep
        });
        for uuid in want {
            if self.tasks.contains_key(&uuid) {
                continue;
            }
            let path = crate::manager::vtpm_socket(&run_dir, &uuid);
            match bind_vtpm_socket(&path) {
                Ok(l) => {
                    self.tasks.insert(uuid, tokio::spawn(serve_vtpm_socket(l, uuid, self.dispatch.clone())));
                }
                Err(e) => xvtpm_log::host_error!(vtpm = %uuid, error = %e, path = %path.display(), "cannot bind the vTPM socket"),
            }
        }
    }
}

async fn serve_vtpm_socket(l: UnixListener, uuid: Uuid, dispatch: Dispatcher) {
    loop {
        let Ok((mut s, _)) = l.accept().await else { continue };
        let d = dispatch.clone();
        tokio::spawn(async move {
            let pid = s.peer_cred().ok().and_then(|c| c.pid()).and_then(|p| u32::try_from(p).ok());
            let peer = Peer::process(uuid, pid);
            while let Ok(Some(body)) = read_frame(&mut s).await {
                let reply = match mgr::decode::<VtpmRequest>(&body) {
                    Ok(req) => d.handle(peer, req).await,
                    Err(e) => VtpmReply::Error(Failure::from_error(ErrorCode::BadRequest, "", &e)),
                };
                if write_msg(&mut s, &reply).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Why the manager could not serve (each cause is its `source`).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The run directory or the admin socket.
    #[error("cannot bind the admin socket {}", path.display())]
    Bind {
        /// The socket.
        path: std::path::PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The Xen link (`--xen`).
    #[error("cannot start the Xen manager link")]
    Xen(#[source] crate::xenlink::OpenError),
    /// Signal handlers.
    #[error("cannot install the SIGTERM/SIGINT handlers")]
    Signals(#[source] std::io::Error),
    /// xenstore has no `domid` for this domain.
    #[error("xenstore has no `domid` key for this domain; is this a Xen domain with xenstore access?")]
    NoDomid,
    /// `--admin-xen` in dom0: dom0's admin CLI uses the admin socket directly.
    #[error("--admin-xen serves dom0's admin CLI from a manager in its own domain; in dom0 the admin socket serves it: drop --admin-xen")]
    AdminLinkInDom0,
}

/// Answers admin requests, from the root-only socket and from the Xen admin link alike: the
/// manager's answer, then the vTPM sockets and the Xen link brought in step with it.
#[derive(Clone)]
pub(crate) struct AdminService {
    shared: Shared,
    sockets: Arc<tokio::sync::Mutex<VtpmSockets>>,
    xen_poke: Option<Arc<tokio::sync::Notify>>,
    detached: Arc<tokio::sync::Notify>,
    dispatch: Dispatcher,
    /// Whether this is the Xen admin link, the only way in for `vtpmmgr bridge`'s relayed
    /// dom0 processes ([`AdminRequest::VtpmRelay`] and its attachments).
    relay: bool,
}

impl AdminService {
    fn standalone(dispatch: Dispatcher) -> AdminService {
        let shared = dispatch.manager().clone();
        let sockets = Arc::new(tokio::sync::Mutex::new(VtpmSockets { tasks: HashMap::new(), dispatch: dispatch.clone() }));
        AdminService { shared, sockets, xen_poke: None, detached: Arc::new(tokio::sync::Notify::new()), dispatch, relay: true }
    }

    /// The same service for the Xen admin link (relayed dom0 processes admitted).
    fn for_link(&self) -> Arc<dyn crate::xenlink::AdminHandler> {
        Arc::new(AdminService { relay: true, ..self.clone() })
    }

    /// A relayed dom0 process's vTPM request, authorised as on a per-vTPM socket, and only for
    /// a vTPM whose attachment the bridge made.
    async fn relay(&self, uuid: Uuid, pid: u32, start: u64, request: VtpmRequest) -> AdminReply {
        let relayed = lock(&self.shared).attachment(&uuid).is_some_and(|a| a.relayed);
        let reply = if relayed {
            self.dispatch.handle(Peer::Process { vtpm: uuid, pid: Some(pid), start: Some(start) }, request).await
        } else {
            VtpmReply::Error(Failure::new(ErrorCode::NotAttached, format!("no dom0 process is attached to vTPM {uuid} through the bridge (xl-vtpm attaches it after spawning)")))
        };
        AdminReply::Relayed { reply: Box::new(reply) }
    }

    /// One request (or the reason it did not decode) and its reply.
    pub(crate) async fn handle(&self, req: Result<AdminRequest, Failure>) -> AdminReply {
        let m = &self.shared;
        let reply = match req {
            Ok(AdminRequest::VtpmAttachRelayed { .. } | AdminRequest::VtpmRelayedExited { .. } | AdminRequest::VtpmRelay { .. }) if !self.relay => {
                AdminReply::Error(Failure::new(ErrorCode::Refused, "relayed dom0 processes reach a manager in its own domain through `vtpmmgr bridge` over the Xen admin link only"))
            }
            Ok(AdminRequest::VtpmRelay { uuid, pid, start, request }) => return self.relay(uuid, pid, start, *request).await,
            Ok(req) => {
                let m2 = m.clone();
                let attach = match &req {
                    AdminRequest::VtpmAttach { uuid, .. } => Some(*uuid),
                    _ => None,
                };
                match tokio::task::spawn_blocking(move || lock(&m2).admin(req)).await {
                    Ok(r) => {
                        let att = attach.filter(|_| r == AdminReply::Ok).and_then(|u| Some((u, lock(m).attachment(&u)?)));
                        if let Some((u, a)) = att {
                            watch_attachment(m, u, a, &self.detached);
                        }
                        r
                    }
                    Err(e) => AdminReply::Error(Failure::from_error(ErrorCode::Internal, "", &e)),
                }
            }
            Err(f) => AdminReply::Error(f),
        };
        self.sockets.lock().await.reconcile(m);
        if let Some(p) = &self.xen_poke {
            // Attachments may have changed: re-check refused vTPM domains now.
            p.notify_one();
        }
        reply
    }
}

impl crate::xenlink::AdminHandler for AdminService {
    fn handle(&self, req: Result<AdminRequest, Failure>) -> std::pin::Pin<Box<dyn std::future::Future<Output = AdminReply> + Send + '_>> {
        Box::pin(AdminService::handle(self, req))
    }
}

/// An admin service of its own (vTPM sockets bound for attached processes, no Xen vTPM link to
/// poke, relayed processes admitted), for an admin link served without [`serve`] (tests).
pub fn standalone_admin(dispatch: Dispatcher) -> Arc<dyn crate::xenlink::AdminHandler> {
    Arc::new(AdminService::standalone(dispatch))
}

/// This domain's id, from xenstore (`0` in dom0).
async fn own_domid() -> Result<u32, ServeError> {
    use xen_platform::xenstore::{Xenstore as _, XsClient};
    let (xs, _events) = XsClient::open().await.map_err(|e| ServeError::Xen(crate::xenlink::OpenError::Xenstore(e)))?;
    let v = xs.read("domid").await.map_err(|e| ServeError::Xen(crate::xenlink::OpenError::Xenstore(e)))?;
    v.as_deref()
        .map(str::trim)
        .and_then(|v| v.parse::<u32>().ok())
        .ok_or(ServeError::NoDomid)
}

/// Runs the manager until SIGTERM/SIGINT. `xen_root`: serve vTPM domains over tpmif there (a
/// relative root is under this domain's own xenstore directory); `admin_xen`: also serve the
/// admin link from dom0 ([`crate::xenlink::admin_root`]), for a manager in its own domain.
pub async fn serve(mut mgr: Manager, xen_root: Option<String>, admin_xen: bool) -> Result<(), ServeError> {
    let admin_path = mgr.config().admin_socket();
    let run_dir = mgr.config().run_dir.clone();
    let bind_err = |source| ServeError::Bind { path: admin_path.clone(), source };
    let domid = match (&xen_root, admin_xen) {
        (None, false) => None,
        (Some(r), false) if r.starts_with('/') => None,
        _ => Some(own_domid().await?),
    };
    if admin_xen && domid == Some(0) {
        return Err(ServeError::AdminLinkInDom0);
    }
    if let Some(d) = domid.filter(|d| *d != 0) {
        mgr.set_xen_domain(d);
    }
    if xen_root.is_some() {
        // (A link that fails to open ends `serve` below: Status never says so wrongly.)
        mgr.set_xen_link();
    }
    // Before anyone can connect: the first deep quote finds the AK loaded.
    mgr.warm_deep_quote();
    std::fs::create_dir_all(&run_dir).map_err(bind_err)?;
    let admin = bind(&admin_path, 0o600).map_err(bind_err)?;
    let shared: Shared = Arc::new(Mutex::new(mgr));
    let dispatch = Dispatcher::new(shared.clone());
    // Wakes the socket reconciler when an attached process exits.
    let detached = Arc::new(tokio::sync::Notify::new());
    let reloaded = lock(&shared).attachments();
    for (uuid, att) in reloaded {
        watch_attachment(&shared, uuid, att, &detached);
    }
    // vTPMs in their own Xen domains reach the manager over tpmif (xenlink).
    let xen_poke = match xen_root {
        Some(root) => {
            let root = match domid {
                Some(d) if !root.starts_with('/') => format!("/local/domain/{d}/{}", root.trim_end_matches('/')),
                _ => root,
            };
            let link = crate::xenlink::XenLink::open(&root, dispatch.clone()).await.map_err(ServeError::Xen)?;
            let poke = link.poker();
            tokio::spawn(link.run());
            xvtpm_log::host_info!(root = %root, "Xen manager link serving vTPM domains");
            Some(poke)
        }
        None => None,
    };
    let sockets = Arc::new(tokio::sync::Mutex::new(VtpmSockets { tasks: HashMap::new(), dispatch: dispatch.clone() }));
    {
        let mut socks = sockets.lock().await;
        socks.reconcile(&shared);
        let want: Vec<Uuid> = socks.tasks.keys().copied().collect();
        VtpmSockets::remove_stale(&run_dir, &want);
    }
    {
        let (socks, m, detached) = (sockets.clone(), shared.clone(), detached.clone());
        tokio::spawn(async move {
            loop {
                detached.notified().await;
                socks.lock().await.reconcile(&m);
            }
        });
    }
    let service = AdminService { shared: shared.clone(), sockets, xen_poke, detached, dispatch: dispatch.clone(), relay: false };
    if let Some(d) = domid.filter(|_| admin_xen) {
        let root = crate::xenlink::admin_root(d);
        let link = crate::xenlink::XenLink::open_admin(&root, dispatch, service.for_link()).await.map_err(ServeError::Xen)?;
        tokio::spawn(link.run());
        xvtpm_log::host_info!(root = %root, "Xen admin link serving dom0");
    }
    // Before readiness: a SIGTERM right after it must stop the manager cleanly, not kill it.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(ServeError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServeError::Signals)?;
    xvtpm_log::host_info!(admin = %admin_path.display(), "vtpmmgr serving");
    // Readiness marker for supervisors and tests.
    println!("{}", serde_json::json!({"ready": true, "admin_socket": admin_path, "pid": std::process::id(), "xen_domain": domid}));
    // systemd (Type=notify): ready once the admin socket accepts and every vTPM socket is bound.
    if let Err(e) = crate::sdnotify::notify("READY=1") {
        xvtpm_log::host_warn!(error = %e, "cannot tell the service manager that vtpmmgr is ready");
    }
    let my_uid = nix::unistd::geteuid().as_raw();
    let accept = async {
        loop {
            let Ok((mut s, _)) = admin.accept().await else { continue };
            let service = service.clone();
            tokio::spawn(async move {
                let uid = s.peer_cred().map(|c| c.uid()).ok();
                if uid != Some(0) && uid != Some(my_uid) {
                    guest_warn!(uid = ?uid, "refused admin connection from a non-root peer");
                    let _ = write_msg(&mut s, &AdminReply::Error(Failure::new(ErrorCode::Refused, "the admin socket is root-only"))).await;
                    return;
                }
                while let Ok(Some(body)) = read_frame(&mut s).await {
                    let req = mgr::decode::<AdminRequest>(&body).map_err(|e| Failure::from_error(ErrorCode::BadRequest, "", &e));
                    let reply = service.handle(req).await;
                    if write_msg(&mut s, &reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = term.recv() => xvtpm_log::host_info!("SIGTERM: stopping"),
        _ = int.recv() => xvtpm_log::host_info!("SIGINT: stopping"),
    }
    let _ = crate::sdnotify::notify("STOPPING=1");
    let _ = std::fs::remove_file(&admin_path);
    Ok(())
}
