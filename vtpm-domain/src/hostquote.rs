//! The host's deep-quote socket (`--quote-socket PATH`): how the provider's attestation
//! service (`xvtpm-attestd`) asks this vTPM for a deep quote without the guest.
//!
//! A connection carries exactly one deep-quote vendor command
//! ([`vtpm_proto::deepquote_cmd`], the very packet a guest sends) and gets the very response
//! a guest gets, then is closed. The vPCRs are read inside this process's engine (the same
//! single thread that runs the guest's commands, so a quote never interleaves with one) and
//! the request goes to the manager as the same `VtpmRequest::DeepQuote`: host-initiated and
//! guest-initiated quotes share the manager's Merkle rounds. Nothing but that one command is
//! accepted here: no other TPM command reaches the engine through this socket.
//!
//! The socket is bound by root before the sandbox is entered, mode 0600, owned by root and
//! never handed to the consumer; only a root peer (`SO_PEERCRED`) is served.

use std::io;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tpm_wire::{self as tpm, HEADER_LEN};
use vtpm_proto::deepquote_cmd::{self, TPM2_CC_XVTPM_DEEP_QUOTE};
use xvtpm_log::guest_warn;

use crate::dispatch::Shared;

/// The longest deep-quote command: header, nonce (2 + 64), two one-bank selections (2 × 10),
/// flags (4). Anything longer is refused before it is read.
pub const MAX_REQUEST: usize = HEADER_LEN + 2 + vtpm_proto::evidence::MAX_NONCE + 2 * 10 + 4;
/// The whole request must arrive within this long after the connection is accepted.
pub const REQUEST_WAIT: Duration = Duration::from_secs(5);
/// Most host-quote connections open at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;

static OPEN: AtomicUsize = AtomicUsize::new(0);

struct Slot;

impl Slot {
    fn take() -> Option<Slot> {
        OPEN.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < MAX_CONNECTIONS).then_some(n + 1)).ok().map(|_| Slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Binds the socket at `p`, mode 0600. A stale socket from a killed predecessor is replaced
/// only if it is a socket owned by this process's user (root: the socket is bound before the
/// sandbox); a symlink is never followed and anything else there is refused, not removed.
pub fn bind(p: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let named = |e: io::Error| crate::errctx::io_named(format_args!("--quote-socket {}", p.display()))(e);
    if let Ok(meta) = std::fs::symlink_metadata(p) {
        if !meta.file_type().is_socket() {
            return Err(named(io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a socket; remove it or choose another path")));
        }
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            return Err(named(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("exists and is a socket of uid {}, not of uid {me}; it is not removed: remove it yourself if it is stale", meta.uid()),
            )));
        }
        std::fs::remove_file(p).map_err(named)?;
    }
    // Bound with a umask-independent mode: the socket is never wider than 0600, even briefly.
    let l = UnixListener::bind(p).map_err(named)?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).map_err(named)?;
    Ok(l)
}

/// Serves the socket until the process ends.
pub async fn serve(l: UnixListener, shared: Rc<Shared>) {
    loop {
        let conn = match l.accept().await {
            Ok((c, _)) => c,
            Err(e) => {
                guest_warn!(error = %e, "host-quote socket: accept failed; pausing");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match conn.peer_cred().map(|c| c.uid()) {
            Ok(0) => {}
            Ok(uid) => {
                guest_warn!(uid, "host-quote socket: refused a connection: only root may ask for a host-initiated deep quote");
                continue;
            }
            Err(e) => {
                guest_warn!(error = %e, "host-quote socket: refused a connection whose owner is unknown");
                continue;
            }
        }
        let Some(slot) = Slot::take() else {
            guest_warn!(limit = MAX_CONNECTIONS, "host-quote socket: refused a connection: too many open");
            continue;
        };
        let s = shared.clone();
        tokio::task::spawn_local(async move {
            let _slot = slot;
            serve_one(conn, s).await;
        });
    }
}

/// Why a request is refused before it reaches the engine: the TPM response code to answer.
fn frame(hdr: &[u8; HEADER_LEN]) -> Result<usize, u32> {
    let h = tpm::peek_header(hdr).ok_or(deepquote_cmd::rc::SIZE)?;
    if h.code != TPM2_CC_XVTPM_DEEP_QUOTE {
        return Err(tpm_wire::TPM2_RC_COMMAND_CODE);
    }
    let size = h.size as usize;
    if !(HEADER_LEN..=MAX_REQUEST).contains(&size) {
        return Err(deepquote_cmd::rc::SIZE);
    }
    Ok(size)
}

async fn serve_one(mut c: UnixStream, shared: Rc<Shared>) {
    let family = shared.vtpm.borrow().family();
    let read = async {
        let mut hdr = [0u8; HEADER_LEN];
        c.read_exact(&mut hdr).await?;
        let mut packet = hdr.to_vec();
        match frame(&hdr) {
            Ok(size) => {
                packet.resize(size, 0);
                c.read_exact(&mut packet[HEADER_LEN..]).await?;
                Ok::<_, io::Error>(Ok(packet))
            }
            Err(rc) => Ok(Err(rc)),
        }
    };
    let rsp = match tokio::time::timeout(REQUEST_WAIT, read).await {
        Err(_) => {
            guest_warn!(wait_s = REQUEST_WAIT.as_secs(), "host-quote socket: closed a connection that did not send a whole request in time");
            return;
        }
        Ok(Err(_)) => return,
        Ok(Ok(Err(rc))) => {
            guest_warn!(rc = %format!("{rc:#x}"), "host-quote socket: refused a request that is not one deep-quote command of at most {MAX_REQUEST} bytes");
            tpm::error_response(family, rc).to_vec()
        }
        // A TPM 1.2 vTPM has no deep quote; anything the dispatcher would not route to the
        // manager (never the engine from here) is refused.
        Ok(Ok(Ok(packet))) if !crate::dispatch::is_deep_quote(&shared, &packet) => {
            guest_warn!("host-quote socket: refused a request that is not a deep-quote command this vTPM serves (TPM 2.0 only)");
            tpm::error_response(family, deepquote_cmd::rc::SIZE).to_vec()
        }
        Ok(Ok(Ok(packet))) => crate::dispatch::execute(&shared, &packet).await,
    };
    let _ = c.write_all(&rsp).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(size: u32, code: u32) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..2].copy_from_slice(&0x8001u16.to_be_bytes());
        h[2..6].copy_from_slice(&size.to_be_bytes());
        h[6..10].copy_from_slice(&code.to_be_bytes());
        h
    }

    #[test]
    fn only_a_bounded_deep_quote_command_is_framed() {
        assert_eq!(frame(&hdr(40, TPM2_CC_XVTPM_DEEP_QUOTE)), Ok(40));
        assert_eq!(frame(&hdr(MAX_REQUEST as u32, TPM2_CC_XVTPM_DEEP_QUOTE)), Ok(MAX_REQUEST));
        assert_eq!(frame(&hdr(MAX_REQUEST as u32 + 1, TPM2_CC_XVTPM_DEEP_QUOTE)), Err(deepquote_cmd::rc::SIZE));
        assert_eq!(frame(&hdr(u32::MAX, TPM2_CC_XVTPM_DEEP_QUOTE)), Err(deepquote_cmd::rc::SIZE));
        assert_eq!(frame(&hdr(5, TPM2_CC_XVTPM_DEEP_QUOTE)), Err(deepquote_cmd::rc::SIZE));
        // TPM2_Clear (0x126) and every other command never reach the engine through this socket.
        assert_eq!(frame(&hdr(40, 0x126)), Err(tpm_wire::TPM2_RC_COMMAND_CODE));
    }
}
