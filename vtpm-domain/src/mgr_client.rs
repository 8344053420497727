//! The vTPM side of the manager protocol: one [`MgrLink`] per vTPM, over the
//! manager's per-vTPM Unix socket or, for a vTPM in its own Xen domain, over
//! a tpmif link to the manager's domain (`xen_platform::frontend`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;
use vtpm_proto::mgr::{self, ErrorCode, Failure, VtpmReply, VtpmRequest};
use xen_platform::frontend::{Frontend, FrontendConfig};
use xen_platform::xen::{XenFrontendLink, XenFrontendTransport};
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

/// A link to vtpmmgr.
pub enum MgrLink {
    /// The per-vTPM Unix socket (a new connection per request); once pinned
    /// ([`MgrLink::pin_dir`]), its open directory and the socket's path through it.
    Socket(PathBuf, Option<(crate::sandbox::PinnedDir, PathBuf)>),
    /// tpmif to the manager's domain; one request at a time (`None` once closed).
    Xen(Box<tokio::sync::Mutex<Option<Frontend<XsClient, XenFrontendLink>>>>),
}

impl MgrLink {
    /// Opens the link (for Xen: the frontend handshake with the manager's backend).
    pub async fn open(spec: &MgrSpec) -> Result<MgrLink, KeyError> {
        match spec {
            MgrSpec::Socket(p) => Ok(MgrLink::Socket(p.clone(), None)),
            MgrSpec::Xen(dir) => {
                let io = |e: String| KeyError::Connect { what: format!("Xen link {dir}"), source: std::io::Error::other(e) };
                let (xs, mut events) = XsClient::open().await.map_err(|e| io(format!("xenstore: {e}")))?;
                let mut transport = XenFrontendTransport::open().map_err(|e| io(format!("grant/event devices: {e}")))?;
                let f = Frontend::connect(std::sync::Arc::new(xs), &mut events, &mut transport, dir, FrontendConfig::default())
                    .await
                    .map_err(|e| io(e.to_string()))?;
                Ok(MgrLink::Xen(Box::new(tokio::sync::Mutex::new(Some(f)))))
            }
        }
    }

    /// One request and its reply.
    pub async fn ask(&self, req: &VtpmRequest) -> std::io::Result<VtpmReply> {
        let frame = mgr::encode(req).map_err(|e| std::io::Error::other(e.to_string()))?;
        let reply = match self {
            MgrLink::Socket(path, pinned) => {
                let mut s = tokio::net::UnixStream::connect(pinned.as_ref().map_or(path, |(_, via)| via)).await?;
                s.write_all(&frame).await?;
                let mut len = [0u8; 4];
                s.read_exact(&mut len).await?;
                let n = mgr::frame_len(len).map_err(|e| std::io::Error::other(e.to_string()))?;
                let mut body = Zeroizing::new(vec![0u8; n]);
                s.read_exact(&mut body).await?;
                return mgr::decode(&body).map_err(|e| std::io::Error::other(e.to_string()));
            }
            MgrLink::Xen(f) => {
                let mut f = f.lock().await;
                let f = f.as_mut().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotConnected, "the Xen link to the manager is closed"))?;
                Zeroizing::new(f.transact(&frame).await.map_err(|e| std::io::Error::other(e.to_string()))?)
            }
        };
        let body = reply.get(4..).ok_or_else(|| std::io::Error::other("short reply frame"))?;
        mgr::decode(body).map_err(|e| std::io::Error::other(e.to_string()))
    }

    /// Opens the socket's directory now and connects through it from then on, so the
    /// directories above it need not be reachable after the privilege drop.
    pub fn pin_dir(&mut self) -> std::io::Result<()> {
        if let MgrLink::Socket(path, pinned) = self {
            *pinned = Some(crate::sandbox::PinnedDir::for_file(path)?);
        }
        Ok(())
    }

    /// Closes the link the way Xen expects (the frontend goes Closing → Closed and releases
    /// its page), so the manager sees an orderly detach. A no-op for the socket.
    pub async fn close(&self) {
        if let MgrLink::Xen(f) = self
            && let Some(f) = f.lock().await.take()
        {
            f.close().await;
        }
    }

    fn describe(&self) -> String {
        match self {
            MgrLink::Socket(p, _) => p.display().to_string(),
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
            VtpmReply::DeepQuote { .. } | VtpmReply::EkCert { .. } => {
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
pub async fn fetch_ek_cert(link: &MgrLink, uuid: Uuid, ek_public: &[u8], tpm: &vtpm_proto::ekcert::TpmInfo) -> Result<Vec<u8>, EkCertError> {
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
    rt.block_on(fetch_state_key(&MgrLink::Socket(path.to_path_buf(), None), uuid, wait))
}
