//! The vTPM side of the manager protocol: fetch this vTPM's state key.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use uuid::Uuid;
use vtpm_proto::mgr::{self, ErrorCode, Failure, VtpmReply, VtpmRequest};
use zeroize::Zeroizing;

/// Why no key was obtained.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The manager socket could not be reached.
    #[error("cannot reach the manager at {path}: {source} (is vtpmmgr running and was this vTPM created with `xl-vtpm vtpm create`?)")]
    Connect {
        /// Socket path.
        path: String,
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

/// One request/reply on a connected manager socket.
fn exchange_on(mut s: UnixStream, req: &VtpmRequest, timeout: Duration) -> std::io::Result<VtpmReply> {
    s.set_read_timeout(Some(timeout))?;
    let frame = mgr::encode(req).map_err(|e| std::io::Error::other(e.to_string()))?;
    s.write_all(&frame)?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let n = mgr::frame_len(len).map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut body = Zeroizing::new(vec![0u8; n]);
    s.read_exact(&mut body)?;
    mgr::decode(&body).map_err(|e| std::io::Error::other(e.to_string()))
}

/// One request/reply on the manager socket with blocking I/O.
pub fn exchange_timeout(path: &Path, req: &VtpmRequest, timeout: Duration) -> std::io::Result<VtpmReply> {
    exchange_on(UnixStream::connect(path)?, req, timeout)
}

fn exchange(path: &Path, req: &VtpmRequest) -> Result<VtpmReply, KeyError> {
    let s = UnixStream::connect(path)
        .map_err(|source| KeyError::Connect { path: path.display().to_string(), source })?;
    exchange_on(s, req, Duration::from_secs(30)).map_err(|e| KeyError::Protocol(format!("manager exchange: {e}")))
}

/// Asks the manager for this vTPM's state key, retrying while the manager
/// has not yet been told which process serves the vTPM (`NotAttached`) or is
/// not listening yet, until `wait` has passed.
pub fn fetch_state_key(path: &Path, uuid: Uuid, wait: Duration) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let deadline = Instant::now() + wait;
    let mut backoff = Duration::from_millis(1);
    let req = VtpmRequest::GetStateKey { version: mgr::PROTOCOL_VERSION, uuid };
    loop {
        let outcome = exchange(path, &req);
        let retryable = match &outcome {
            Ok(VtpmReply::Error(f)) => matches!(f.code, ErrorCode::NotAttached | ErrorCode::Busy),
            Err(KeyError::Connect { .. }) => true,
            _ => false,
        };
        if retryable && Instant::now() < deadline {
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(50));
            continue;
        }
        return match outcome? {
            VtpmReply::StateKey { key, .. } => {
                let arr: [u8; 32] = key.0.as_slice().try_into().map_err(|_| {
                    KeyError::Protocol(format!("state key has {} bytes, expected 32", key.0.len()))
                })?;
                Ok(Zeroizing::new(arr))
            }
            VtpmReply::Error(f) => Err(KeyError::Refused(f)),
            VtpmReply::DeepQuote { .. } => Err(KeyError::Protocol("unexpected deep-quote reply".into())),
        };
    }
}
