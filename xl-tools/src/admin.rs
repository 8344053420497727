//! Client of vtpmmgr's admin socket.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vtpm_proto::mgr::{AdminReply, AdminRequest, VtpmInfo};
use vtpm_proto::mgr_io::{self, WireError};

use crate::exit::{CliError, NO_MANAGER, REFUSED};

/// A byte stream an admin conversation runs over.
pub trait Duplex: std::io::Read + std::io::Write + Send {}
impl<T: std::io::Read + std::io::Write + Send> Duplex for T {}

/// A connection to the admin socket (or, for a move to another host, to the destination's
/// manager through `xl-vtpm migrate-receive` there: [`Admin::over`]).
pub struct Admin {
    stream: Box<dyn Duplex>,
}

impl Admin {
    /// Connects to `<run_dir>/admin.sock`.
    pub fn connect(run_dir: &Path) -> Result<Admin, CliError> {
        let path: PathBuf = run_dir.join("admin.sock");
        let stream = UnixStream::connect(&path).map_err(|e| match e.kind() {
            // The manager may well be running: the admin socket is its owner's alone (mode 0600).
            std::io::ErrorKind::PermissionDenied => {
                use std::os::unix::fs::MetadataExt;
                let owner = match std::fs::metadata(&path) {
                    Ok(m) if m.uid() != 0 => format!("root or uid {} (the socket's owner)", m.uid()),
                    _ => "root (the socket's owner)".to_string(),
                };
                CliError::new(
                    REFUSED,
                    format!("cannot use vtpmmgr's admin socket {}: permission denied; it serves {owner} only: run xl-vtpm as root (e.g. with sudo)", path.display()),
                )
            }
            _ => CliError::caused(NO_MANAGER, format!("cannot reach vtpmmgr at {}", path.display()), e)
                .fix("start it: `systemctl start xvtpm-mgr`, or `vtpmmgr serve`; or pass --run-dir"),
        })?;
        // Provisioning can take a few seconds on a discrete TPM (RSA keys).
        stream.set_read_timeout(Some(Duration::from_secs(120))).ok();
        Ok(Admin { stream: Box::new(stream) })
    }

    /// An admin conversation over any stream (the receiver of a move to another host relays
    /// the destination's part of it to the manager there).
    pub fn over(stream: Box<dyn Duplex>) -> Admin {
        Admin { stream }
    }

    /// Sends one message of another protocol on the same stream and reads its reply.
    pub fn exchange<Req: serde::Serialize, Rep: serde::de::DeserializeOwned>(&mut self, req: &Req) -> Result<Rep, CliError> {
        mgr_io::call(&mut self.stream, req).map_err(|e| CliError::caused(NO_MANAGER, "the destination's receiver", e))
    }

    /// Sends one admin request and returns the reply as it came, an error reply included (a relay).
    pub fn forward(&mut self, req: &AdminRequest) -> Result<AdminReply, CliError> {
        mgr_io::call(&mut self.stream, req).map_err(|e| CliError::caused(NO_MANAGER, "admin socket", e))
    }

    /// Reads one message of another protocol (the answer to bulk data sent with [`Admin::raw`]).
    pub fn receive<Rep: serde::de::DeserializeOwned>(&mut self) -> Result<Rep, CliError> {
        let body = mgr_io::read_frame(&mut self.stream)
            .map_err(|e| CliError::caused(NO_MANAGER, "the destination's receiver", e))?
            .ok_or_else(|| CliError::new(NO_MANAGER, "the destination's receiver ended without an answer"))?;
        vtpm_proto::mgr::decode(&body).map_err(|e| CliError::caused(NO_MANAGER, "the destination's receiver", e))
    }

    /// The raw stream (bulk data after a message that announced it).
    pub fn raw(&mut self) -> &mut dyn std::io::Write {
        &mut self.stream
    }

    /// Every vTPM identity, page by page (a host may have far more than one frame holds).
    pub fn list_vtpms(&mut self) -> Result<Vec<VtpmInfo>, CliError> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            match self.call(&AdminRequest::VtpmListPage { after })? {
                AdminReply::VtpmPage { vtpms, next } => {
                    all.extend(vtpms);
                    match next {
                        // A cursor that does not move would loop for ever.
                        Some(n) if Some(n) != after => after = Some(n),
                        _ => return Ok(all),
                    }
                }
                other => return Err(CliError::new(1, format!("unexpected reply to VtpmListPage: {other:?}"))),
            }
        }
    }

    /// Sends one request and returns the reply; a manager error becomes a
    /// [`CliError`] with the matching exit code.
    pub fn call(&mut self, req: &AdminRequest) -> Result<AdminReply, CliError> {
        let reply = mgr_io::call(&mut self.stream, req).map_err(|e| match e {
            WireError::Frame(_) => CliError::caused(1, "", e),
            _ => CliError::caused(NO_MANAGER, "admin socket", e),
        })?;
        match reply {
            AdminReply::Error(f) => Err(CliError::from_manager(f)),
            other => Ok(other),
        }
    }
}
