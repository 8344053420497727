//! One TPM command from any listener — the swtpm sockets ([`crate::server`]) or tpmif
//! ([`crate::xen`]) — and the state they share. The listeners import this module, never the
//! reverse: a deep-quote vendor command goes to [`crate::deepquote`] (the manager), every other
//! command to the engine.

use std::cell::RefCell;

use tokio::sync::Notify;
use tpm_wire as tpm;
use xvtpm_log::guest_warn;

use crate::vtpm::Vtpm;

/// The vTPM's service: what every listener shares.
pub struct Shared {
    /// The vTPM.
    pub vtpm: RefCell<Vtpm>,
    /// Notified when the process should exit (CMD_SHUTDOWN, signals).
    pub exit: Notify,
    /// This vTPM's UUID.
    pub uuid: uuid::Uuid,
    /// The link to the manager (for deep quotes).
    pub mgr: crate::mgr_client::MgrLink,
    /// Keep serving when the controller on a Unix control socket hangs up or sends
    /// `CMD_SHUTDOWN` (`--persist`, or a data socket beside the control socket: the TPM is
    /// powered off and the next controller's `CMD_INIT` powers it on); otherwise the process
    /// ends then, like swtpm `--terminate`.
    pub persist: bool,
    /// The vTPM's state key: `CMD_GET/SET_STATEBLOB` blobs are sealed under it.
    pub blob_key: zeroize::Zeroizing<[u8; 32]>,
    /// The oldest state generation a `CMD_SET_STATEBLOB` blob may carry: the
    /// generation this process opened, raised to the loaded blobs' at the `CMD_INIT` that
    /// resumes them, and past them (`import_pending`) once the TPM ran a command on that state.
    /// An older blob (a replay) is refused.
    pub import_floor: std::cell::Cell<u64>,
    /// The newest generation of the blobs loaded since the last `CMD_INIT`.
    pub imported: std::cell::Cell<Option<u64>>,
    /// The generation the loaded state was written at and the engine's command count at the
    /// `CMD_INIT` that resumed it: the floor's next value, once a command ran. Until then the
    /// same blobs may load again — nothing of that state changed (a destination whose restore
    /// failed after its device model loaded them is retried: `xl-vtpm migrate --finish`).
    pub import_pending: std::cell::Cell<Option<(u64, u64)>>,
    /// Control connections open now that gave a data channel (`CMD_SET_DATAFD`): device
    /// models. Two at once is a Xen HVM guest's localhost migration (the destination's device
    /// model loads the state while the source's still runs).
    pub device_models: std::cell::Cell<usize>,
    /// SIGUSR1 asked for a suspend: the process ends with the running TPM's volatile state
    /// (PCRs, loaded objects, sessions) saved into its state file beside the permanent state,
    /// so the next start (here, or on another host after a transfer) resumes it once.
    pub suspend: std::cell::Cell<bool>,
}

/// Whether `packet` is a well-framed deep-quote vendor command.
pub fn is_deep_quote(shared: &Shared, packet: &[u8]) -> bool {
    let v = shared.vtpm.borrow();
    v.family() == tpm::Family::Tpm2
        && tpm::parse_command(packet, v.family(), v.buffer_size() as usize).map(|h| h.code)
            == Ok(vtpm_proto::deepquote_cmd::TPM2_CC_XVTPM_DEEP_QUOTE)
}

fn deep_quote_response(shared: &Shared, result: Result<Vec<u8>, u32>) -> Vec<u8> {
    let (family, max) = {
        let v = shared.vtpm.borrow();
        (v.family(), v.buffer_size() as usize)
    };
    match result {
        Ok(bundle) => {
            let rsp = vtpm_proto::deepquote_cmd::response(&bundle);
            if rsp.len() > max {
                guest_warn!(len = rsp.len(), max, "deep-quote evidence exceeds the buffer; select fewer PCRs");
                return tpm::error_response(family, vtpm_proto::deepquote_cmd::rc::SIZE).to_vec();
            }
            rsp
        }
        Err(rc) => tpm::error_response(family, rc).to_vec(),
    }
}

/// Runs one command: a deep-quote vendor command goes to the manager
/// (asynchronously: other clients keep being served meanwhile); everything
/// else goes to the engine.
pub async fn execute(shared: &Shared, packet: &[u8]) -> Vec<u8> {
    if !is_deep_quote(shared, packet) {
        return shared.vtpm.borrow_mut().execute(packet);
    }
    deep_quote_response(shared, crate::deepquote::deep_quote(&shared.vtpm, shared.uuid, &shared.mgr, packet).await)
}

