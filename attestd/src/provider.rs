//! What the answers are made of: the manager's admin socket (enrollment material, credential
//! activation), the registry (tenants), the host's event log file, and each vTPM's host
//! deep-quote socket (`vtpm-domain --quote-socket`, the same `VtpmRequest::DeepQuote` a guest's
//! command makes, so service quotes share the manager's Merkle rounds).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;
use vtpm_proto::attest_api::Activation;
use vtpm_proto::deepquote_cmd::{self, DeepQuoteCommand};
use vtpm_proto::mgr::{AdminReply, AdminRequest};
use xl_tools::admin::Admin;
use xl_tools::registry::{Registry, Tenant};

/// An answer that is not a success: HTTP status and a message for the tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// What went wrong (never a secret, never more than the tenant may know).
    pub message: String,
    /// Seconds to wait (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with `status`.
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), retry_after: None }
    }
}

/// How long a deep quote may take (the vTPM allows the manager 60 s).
pub const QUOTE_TIMEOUT: Duration = Duration::from_secs(90);
/// The largest deep-quote response read from a vTPM (its TPM buffer).
pub const MAX_QUOTE_RESPONSE: usize = 4096;

/// The provider side.
pub struct Provider {
    /// The manager's run directory (admin socket, `vtpms/<uuid>.quote`).
    pub run_dir: PathBuf,
    /// The registry (tenants).
    pub registry: Mutex<Registry>,
    /// The host's binary event log.
    pub event_log: PathBuf,
    /// Intermediate EK CA certificates added to the enrollment material.
    pub ek_intermediates: Vec<PathBuf>,
}

fn internal(what: &str, e: impl std::fmt::Display) -> ApiError {
    xvtpm_log::guest_warn!(error = %e, "{what} failed");
    ApiError::new(503, format!("{what} is unavailable on this host now; try again later"))
}

impl Provider {
    /// The tenant whose certificate key has this SHA-256 (blocking).
    pub fn tenant(&self, key_sha256: &str) -> Result<Option<Tenant>, ApiError> {
        let reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        reg.tenant_by_key(key_sha256).map_err(|e| internal("the registry", e))
    }

    /// The enrollment material, JSON (blocking).
    pub fn material(&self) -> Result<Vec<u8>, ApiError> {
        let mut admin = Admin::connect(&self.run_dir).map_err(|e| internal("the manager", e.text()))?;
        let m = xl_tools::attest::material(&mut admin, &self.ek_intermediates).map_err(|e| internal("enrollment material", e.text()))?;
        Ok(serde_json::to_vec(&m).expect("serialisable"))
    }

    /// TPM2_ActivateCredential with the group's AK (blocking); the secret.
    pub fn activate(&self, a: &Activation) -> Result<Vec<u8>, ApiError> {
        let mut admin = Admin::connect(&self.run_dir).map_err(|e| internal("the manager", e.text()))?;
        let req = AdminRequest::ActivateCredential {
            group: a.group.to_string(),
            credential_blob: hex::encode(&a.credential_blob),
            encrypted_secret: hex::encode(&a.encrypted_secret),
        };
        match admin.call(&req) {
            Ok(AdminReply::Activated { secret }) => Ok(secret.0.to_vec()),
            Ok(other) => Err(internal("the manager", format!("unexpected reply to ActivateCredential: {other:?}"))),
            Err(e) if e.code == xl_tools::exit::NO_MANAGER => Err(internal("the manager", e.text())),
            // The manager's refusal (wrong EK, wrong AK name, unknown group) is the tenant's
            // answer, as the manager words it (the tenant's command names the check).
            Err(e) => Err(ApiError::new(422, e.text())),
        }
    }

    /// The host's event log (blocking).
    pub fn event_log(&self) -> Result<Vec<u8>, ApiError> {
        use std::io::Read;
        let cap = vtpm_attest::eventlog::MAX_LOG as u64;
        let mut b = Vec::new();
        std::fs::File::open(&self.event_log)
            .and_then(|f| f.take(cap + 1).read_to_end(&mut b))
            .map_err(|e| internal("the host event log", format!("{}: {e}", self.event_log.display())))?;
        if b.len() as u64 > cap {
            return Err(internal("the host event log", format!("{} exceeds {cap} bytes", self.event_log.display())));
        }
        Ok(b)
    }

    /// A deep quote of `vtpm` over its host-quote socket; the evidence bundle.
    pub async fn deep_quote(&self, vtpm: Uuid, cmd: &DeepQuoteCommand) -> Result<Vec<u8>, ApiError> {
        let sock = xl_tools::local::quote_socket(&self.run_dir, &vtpm);
        let run = async {
            let mut s = tokio::net::UnixStream::connect(&sock).await.map_err(|_| {
                ApiError { status: 503, message: format!("vTPM {vtpm} is not running (or runs in its own domain, which has no host-quote socket)"), retry_after: Some(30) }
            })?;
            s.write_all(&cmd.encode()).await.map_err(|e| internal("the vTPM", e))?;
            let mut hdr = [0u8; 10];
            s.read_exact(&mut hdr).await.map_err(|e| internal("the vTPM", e))?;
            let size = u32::from_be_bytes([hdr[2], hdr[3], hdr[4], hdr[5]]) as usize;
            if !(10..=MAX_QUOTE_RESPONSE).contains(&size) {
                return Err(internal("the vTPM", format!("response size {size}")));
            }
            let mut rsp = hdr.to_vec();
            rsp.resize(size, 0);
            s.read_exact(&mut rsp[10..]).await.map_err(|e| internal("the vTPM", e))?;
            deepquote_cmd::parse_response(&rsp).map_err(|rc| match rc {
                deepquote_cmd::rc::RETRY => ApiError { status: 503, message: "the manager is busy; retry".into(), retry_after: Some(1) },
                deepquote_cmd::rc::NONCE | deepquote_cmd::rc::VPCRS | deepquote_cmd::rc::HOST_PCRS => {
                    ApiError::new(400, format!("the vTPM refused the request's parameters (TPM error {rc:#x})"))
                }
                deepquote_cmd::rc::SIZE => ApiError::new(400, "the evidence for this selection exceeds the vTPM's buffer; select fewer PCRs"),
                other => internal("the deep quote", format!("TPM error {other:#x}")),
            })
        };
        tokio::time::timeout(QUOTE_TIMEOUT, run).await.map_err(|_| ApiError { status: 503, message: "the deep quote timed out".into(), retry_after: Some(5) })?
    }
}
