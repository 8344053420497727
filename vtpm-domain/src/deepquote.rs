//! The vTPM side of a deep quote: parse the guest's vendor command, read the
//! selected vPCRs from our own engine (the guest cannot choose what the
//! manager is told), and ask the manager over our per-vTPM socket.

use std::time::Duration;

use vtpm_proto::deepquote_cmd::{DeepQuoteCommand, rc};
use vtpm_proto::mgr::{ErrorCode, VtpmReply, VtpmRequest};

use std::cell::RefCell;

use uuid::Uuid;

use crate::guest_warn;
use crate::mgr_client::MgrLink;
use crate::vtpm::Vtpm;

/// How long the manager may take (a batch behind a slow discrete TPM).
pub const MANAGER_TIMEOUT: Duration = Duration::from_secs(60);

fn request(vtpm: &RefCell<Vtpm>, uuid: Uuid, packet: &[u8]) -> Result<VtpmRequest, u32> {
    let cmd = DeepQuoteCommand::parse(packet)?;
    let values = vtpm.borrow_mut().read_pcrs(cmd.vpcr_alg, &cmd.vpcrs)?;
    Ok(VtpmRequest::DeepQuote {
        uuid,
        nonce: hex(&cmd.nonce),
        vpcr_alg: cmd.vpcr_alg,
        vpcrs: cmd.vpcrs,
        vpcr_values: values.iter().map(|v| hex(v)).collect(),
        host_pcrs: cmd.host_pcrs,
        flags: cmd.flags,
    })
}

fn outcome(reply: Result<std::io::Result<VtpmReply>, tokio::time::error::Elapsed>) -> Result<Vec<u8>, u32> {
    let reply = match reply {
        Ok(Ok(r)) => r,
        // The manager's socket refused or dropped the request: it is down or restarting (a
        // killed manager comes back and serves again), so the caller may retry, as for Busy.
        Ok(Err(e)) => {
            guest_warn!(error = %e, "deep quote: manager unreachable");
            return Err(rc::RETRY);
        }
        Err(_) => {
            guest_warn!("deep quote: manager timed out");
            return Err(rc::RETRY);
        }
    };
    match reply {
        VtpmReply::DeepQuote { bundle } => unhex(&bundle).ok_or(rc::NO_RESULT),
        VtpmReply::Error(f) if f.code == ErrorCode::Busy => Err(rc::RETRY),
        VtpmReply::Error(f) => {
            guest_warn!(error = %f, "deep quote refused by the manager");
            Err(rc::NO_RESULT)
        }
        VtpmReply::StateKey { .. } | VtpmReply::EkCert { .. } | VtpmReply::StateAnchored { .. } => Err(rc::NO_RESULT),
    }
}

/// Runs a deep-quote command for vTPM `uuid` (its vPCRs read from `vtpm`, never borrowed
/// across the wait) over `mgr`; `Ok(bundle)` or a TPM response code.
pub async fn deep_quote(vtpm: &RefCell<Vtpm>, uuid: Uuid, mgr: &MgrLink, packet: &[u8]) -> Result<Vec<u8>, u32> {
    let req = request(vtpm, uuid, packet)?;
    outcome(tokio::time::timeout(MANAGER_TIMEOUT, mgr.ask(&req)).await)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}
