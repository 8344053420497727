//! The vTPM side of the manager protocol: one [`MgrLink`] per vTPM, over the
//! manager's per-vTPM Unix socket or, for a vTPM in its own Xen domain, over
//! a tpmif link to the manager's domain (`xen_platform::frontend`).

use crate::errctx::{io_named, io_other};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use uuid::Uuid;
use vtpm_proto::mgr::{self, ErrorCode, Failure, VtpmReply, VtpmRequest};
use vtpm_proto::mgr_io;
use xen_platform::frontend::{Frontend, FrontendConfig};
use xen_platform::xen::XenFrontendTransport;
use xen_platform::xenstore::XsClient;
use zeroize::Zeroizing;

use crate::config::MgrSpec;

/// Why no key was obtained.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The manager could not be reached.
    #[error("cannot reach the manager ({what}): {source} (is vtpmmgr running and was this vTPM created with `xl-vtpm vtpm create`?)")]
    Connect {
        /// Which link.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The exchange broke.
    #[error("manager protocol error: {0}")]
    Protocol(String),
    /// The manager refused.
    #[error("the manager refused to release the state key: {0}")]
    Refused(Failure),
}

/// A link to vtpmmgr. Cheap to clone; every clone talks to the same manager link.
#[derive(Clone)]
pub enum MgrLink {
    /// The per-vTPM Unix socket (a new connection per request). Clones share the target, so
    /// pinning it ([`MgrLink::pin_dir`]) reaches every holder (the state store's anchor link too).
    Socket(std::sync::Arc<SocketTarget>),
    /// tpmif to the manager's domain, driven by its own thread ([`XenWorker`]) so that it can
    /// be used from async code and — for state anchors, inside a state write — synchronously.
    Xen(XenWorker),
}

/// The thread that owns the tpmif frontend to the manager: one request at a time, in order.
#[derive(Clone)]
pub struct XenWorker {
    tx: tokio::sync::mpsc::UnboundedSender<XenJob>,
}

type Frame = std::io::Result<Zeroizing<Vec<u8>>>;

enum ReplyTo {
    Async(tokio::sync::oneshot::Sender<Frame>),
    Sync(std::sync::mpsc::Sender<Frame>),
}

enum XenJob {
    Ask(Vec<u8>, ReplyTo),
    Close(tokio::sync::oneshot::Sender<()>),
}

fn link_closed() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotConnected, "the Xen link to the manager is closed")
}

/// Runs the frontend on the worker thread until closed or every handle is dropped.
async fn xen_worker(dir: String, mut jobs: tokio::sync::mpsc::UnboundedReceiver<XenJob>, ready: tokio::sync::oneshot::Sender<std::io::Result<()>>) {
    let connected = async {
        let (xs, mut events) = XsClient::open().await.map_err(io_other("xenstore"))?;
        let mut transport = XenFrontendTransport::open().map_err(io_named("grant/event devices"))?;
        Frontend::connect(std::sync::Arc::new(xs), &mut events, &mut transport, &dir, FrontendConfig::default())
            .await
            .map_err(std::io::Error::other)
    }
    .await;
    let mut f = match connected {
        Ok(f) => {
            let _ = ready.send(Ok(()));
            f
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    while let Some(job) = jobs.recv().await {
        match job {
            XenJob::Ask(frame, to) => {
                let r = f.transact(&frame).await.map(Zeroizing::new).map_err(std::io::Error::other);
                match to {
                    ReplyTo::Async(tx) => drop(tx.send(r)),
                    ReplyTo::Sync(tx) => drop(tx.send(r)),
                }
            }
            XenJob::Close(done) => {
                f.close().await;
                let _ = done.send(());
                return;
            }
        }
    }
    f.close().await;
}

fn reply_of(frame: &[u8]) -> std::io::Result<VtpmReply> {
    Ok(mgr_io::decode_frame(frame)?)
}

/// Where the manager's per-vTPM socket is: its path, and once pinned the directory opened before
/// the privilege drop and the socket's path through it (`/proc/self/fd/N/NAME`).
#[derive(Debug)]
pub struct SocketTarget {
    path: PathBuf,
    pinned: std::sync::OnceLock<(crate::sandbox::PinnedDir, PathBuf)>,
}

impl SocketTarget {
    fn connect_path(&self) -> &std::path::Path {
        self.pinned.get().map_or(&self.path, |(_, via)| via)
    }
}

impl MgrLink {
    /// A link over the per-vTPM Unix socket at `path`.
    pub fn socket(path: &std::path::Path) -> MgrLink {
        MgrLink::Socket(std::sync::Arc::new(SocketTarget { path: path.to_path_buf(), pinned: std::sync::OnceLock::new() }))
    }

    /// Opens the link (for Xen: the frontend handshake with the manager's backend, on the
    /// link's own thread).
    pub async fn open(spec: &MgrSpec) -> Result<MgrLink, KeyError> {
        match spec {
            MgrSpec::Socket(p) => Ok(MgrLink::socket(p)),
            MgrSpec::Xen(dir) => {
                let io = |source: std::io::Error| KeyError::Connect { what: format!("Xen link {dir}"), source };
                let (tx, jobs) = tokio::sync::mpsc::unbounded_channel();
                let (ready_tx, ready) = tokio::sync::oneshot::channel();
                let d = dir.clone();
                std::thread::Builder::new()
                    .name("mgr-xen-link".into())
                    .spawn(move || match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(rt) => rt.block_on(xen_worker(d, jobs, ready_tx)),
                        Err(e) => drop(ready_tx.send(Err(io_named("runtime")(e)))),
                    })
                    .map_err(|e| io(io_named("starting the link thread")(e)))?;
                ready.await.map_err(|_| io(std::io::Error::other("the link thread stopped")))?.map_err(io)?;
                Ok(MgrLink::Xen(XenWorker { tx }))
            }
        }
    }

    /// One request and its reply.
    pub async fn ask(&self, req: &VtpmRequest) -> std::io::Result<VtpmReply> {
        match self {
            MgrLink::Socket(t) => {
                let mut s = tokio::net::UnixStream::connect(t.connect_path()).await?;
                Ok(mgr_io::nonblocking::call(&mut s, req).await?)
            }
            MgrLink::Xen(w) => {
                let frame = mgr::encode(req).map_err(std::io::Error::other)?;
                let (tx, rx) = tokio::sync::oneshot::channel();
                w.tx.send(XenJob::Ask(frame, ReplyTo::Async(tx))).map_err(|_| link_closed())?;
                let reply = rx.await.map_err(|_| link_closed())??;
                reply_of(&reply)
            }
        }
    }

    /// One request and its reply, blocking the calling thread (at most `timeout`). `conn`
    /// caches the socket connection between calls. For callers inside a synchronous step, such
    /// as a state write ([`crate::anchor`]); safe to call from within the runtime's thread,
    /// because the Xen link runs on its own thread.
    pub fn ask_blocking(&self, req: &VtpmRequest, conn: &mut Option<std::os::unix::net::UnixStream>, timeout: Duration) -> std::io::Result<VtpmReply> {
        match self {
            MgrLink::Socket(t) => {
                // A cached connection the manager closed (restart) fails the write or the read:
                // then once more on a fresh one.
                for attempt in 0..2 {
                    let s = match conn {
                        Some(s) => s,
                        None => {
                            let s = std::os::unix::net::UnixStream::connect(t.connect_path())?;
                            s.set_read_timeout(Some(timeout))?;
                            s.set_write_timeout(Some(timeout))?;
                            conn.insert(s)
                        }
                    };
                    let exchange = mgr_io::call::<_, _, VtpmReply>(s, req).map_err(std::io::Error::from);
                    match exchange {
                        Ok(r) => return Ok(r),
                        Err(e) => {
                            *conn = None;
                            let stale = matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset);
                            if attempt == 1 || !stale {
                                return Err(e);
                            }
                        }
                    }
                }
                unreachable!("the loop returns")
            }
            MgrLink::Xen(w) => {
                let frame = mgr::encode(req).map_err(std::io::Error::other)?;
                let (tx, rx) = std::sync::mpsc::channel();
                w.tx.send(XenJob::Ask(frame, ReplyTo::Sync(tx))).map_err(|_| link_closed())?;
                let reply = rx.recv_timeout(timeout).map_err(|e| match e {
                    std::sync::mpsc::RecvTimeoutError::Timeout => std::io::Error::new(std::io::ErrorKind::TimedOut, "the manager did not answer over the Xen link"),
                    std::sync::mpsc::RecvTimeoutError::Disconnected => link_closed(),
                })??;
                reply_of(&reply)
            }
        }
    }

    /// Opens the socket's directory now and connects through it from then on, so the
    /// directories above it need not be reachable after the privilege drop.
    pub fn pin_dir(&self) -> std::io::Result<()> {
        if let MgrLink::Socket(t) = self
            && t.pinned.get().is_none()
        {
            let _ = t.pinned.set(crate::sandbox::PinnedDir::for_file(&t.path)?);
        }
        Ok(())
    }

    /// Closes the link the way Xen expects (the frontend goes Closing → Closed and releases
    /// its page), so the manager sees an orderly detach. A no-op for the socket.
    pub async fn close(&self) {
        if let MgrLink::Xen(w) = self {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if w.tx.send(XenJob::Close(tx)).is_ok() {
                let _ = rx.await;
            }
        }
    }

    /// What the link is, for messages.
    pub fn describe(&self) -> String {
        match self {
            MgrLink::Socket(t) => t.path.display().to_string(),
            MgrLink::Xen(_) => "Xen link".into(),
        }
    }
}

/// Asks the manager for this vTPM's state key, retrying while the manager
/// has not yet been told which process/domain serves the vTPM
/// (`NotAttached`), is busy, or is not listening yet, until `wait` has passed.
pub async fn fetch_state_key(link: &MgrLink, uuid: Uuid, wait: Duration) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let deadline = Instant::now() + wait;
    let mut backoff = Duration::from_millis(1);
    let req = VtpmRequest::GetStateKey { version: mgr::PROTOCOL_VERSION, uuid };
    loop {
        let outcome = link.ask(&req).await;
        let retryable = match &outcome {
            Ok(VtpmReply::Error(f)) => matches!(f.code, ErrorCode::NotAttached | ErrorCode::Busy),
            Err(e) => matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused),
            _ => false,
        };
        if retryable && Instant::now() < deadline {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(50));
            continue;
        }
        let reply = outcome.map_err(|source| KeyError::Connect { what: link.describe(), source })?;
        return match reply {
            VtpmReply::StateKey { key, .. } => {
                let arr: [u8; 32] = key.0.as_slice().try_into().map_err(|_| {
                    KeyError::Protocol(format!("state key has {} bytes, expected 32", key.0.len()))
                })?;
                Ok(Zeroizing::new(arr))
            }
            VtpmReply::Error(f) => Err(KeyError::Refused(f)),
            VtpmReply::DeepQuote { .. } | VtpmReply::EkCert { .. } | VtpmReply::StateAnchored { .. } => {
                Err(KeyError::Protocol("unexpected reply to a state-key request".into()))
            }
        };
    }
}

/// Why no EK certificate was obtained.
#[derive(Debug, thiserror::Error)]
pub enum EkCertError {
    /// The manager could not be reached.
    #[error("cannot reach the manager ({what}) for the EK certificate: {source}")]
    Connect {
        /// Which link.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The exchange broke.
    #[error("manager protocol error while asking for the EK certificate: {0}")]
    Protocol(String),
    /// The manager refused or failed.
    #[error("the manager did not issue an EK certificate: {0}")]
    Refused(Failure),
}

/// Asks the manager to certify this vTPM's EK (`ek_public`: its `TPM2B_PUBLIC`). Returns the
/// certificate (X.509, DER). One attempt: by now the manager has released the state key, so it
/// knows and has authorised this vTPM.
pub async fn fetch_ek_cert(link: &MgrLink, uuid: Uuid, ek_public: &[u8], tpm: &vtpm_proto::mgr::TpmInfo) -> Result<Vec<u8>, EkCertError> {
    let req = VtpmRequest::IssueEkCert { uuid, ek_public: hex::encode(ek_public), tpm: tpm.clone() };
    match link.ask(&req).await.map_err(|source| EkCertError::Connect { what: link.describe(), source })? {
        VtpmReply::EkCert { cert } => {
            let der = hex::decode(&cert).map_err(|_| EkCertError::Protocol("the certificate is not hex".into()))?;
            if der.is_empty() || der.len() > vtpm_engine::MAX_EK_CERT_LEN {
                return Err(EkCertError::Protocol(format!("a certificate of {} bytes does not fit the EK certificate index", der.len())));
            }
            Ok(der)
        }
        VtpmReply::Error(f) => Err(EkCertError::Refused(f)),
        _ => Err(EkCertError::Protocol("unexpected reply to an EK certificate request".into())),
    }
}

/// [`fetch_state_key`] over a Unix socket for callers without a runtime
/// (tools, benchmarks).
pub fn fetch_state_key_blocking(path: &std::path::Path, uuid: Uuid, wait: Duration) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| KeyError::Connect { what: "runtime".into(), source })?;
    rt.block_on(fetch_state_key(&MgrLink::socket(path), uuid, wait))
}
