//! The one handler of vTPM requests. Both links — the per-vTPM Unix sockets ([`crate::daemon`])
//! and the Xen link ([`crate::xenlink`]) — reduce their caller to a [`Peer`], decode a
//! [`VtpmRequest`] and call [`Dispatcher::handle`]; nothing a request does depends on the
//! link it came over.
//!
//! Where each request runs: a state key is a lock and an HKDF (on the calling task); a deep
//! quote and a state anchor are queued for their batch ([`Batcher`], [`Anchorer`]) and awaited;
//! an EK certificate (a TPM signature, the first time a CA key) runs on the blocking pool, so a
//! slow physical TPM never stalls a link's task.

use std::sync::{Arc, Mutex, MutexGuard};

use vtpm_proto::mgr::{ErrorCode, Failure, VtpmReply, VtpmRequest};

use crate::failure::FromError as _;

use crate::anchor::{self, Anchorer};
use crate::deepquote::{self, Batcher};
use crate::manager::{self, Manager};
use crate::peer::Peer;

/// The manager shared between the links' tasks.
pub type Shared = Arc<Mutex<Manager>>;

/// Locks the manager, recovering from a poisoned lock.
pub fn lock(m: &Shared) -> MutexGuard<'_, Manager> {
    // A panic while holding the lock must not take the whole manager down.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The manager with its deep-quote batcher and state-anchor task. Cheap to clone; every clone
/// shares the same manager, batcher and anchorer, so requests from every link batch together.
#[derive(Clone)]
pub struct Dispatcher {
    mgr: Shared,
    batcher: Batcher,
    anchorer: Anchorer,
}

impl Dispatcher {
    /// Starts the batcher (with the manager's batching configuration) and the anchoring task
    /// for `mgr`. Must be called inside the runtime.
    pub fn new(mgr: Shared) -> Dispatcher {
        let (batch, stats) = {
            let m = lock(&mgr);
            (m.config().batch, m.stats())
        };
        let q = mgr.clone();
        // The manager lock only to look up the group's AK; the quote itself under the TPM lock.
        let quote: deepquote::QuoteFn = Arc::new(move |group, root, pcrs| {
            let job = lock(&q).quote_job(group)?;
            manager::quote_with(job, &root, &pcrs)
        });
        let a = mgr.clone();
        let decide: anchor::Decide = Arc::new(move |batch| lock(&a).anchor_batch(batch));
        Dispatcher { batcher: Batcher::spawn(quote, batch, stats), anchorer: Anchorer::spawn(decide), mgr }
    }

    /// The shared manager.
    pub fn manager(&self) -> &Shared {
        &self.mgr
    }

    /// Answers `req` from `peer`.
    pub async fn handle(&self, peer: Peer, req: VtpmRequest) -> VtpmReply {
        match req {
            VtpmRequest::GetStateKey { version, uuid: claimed } => lock(&self.mgr).state_key(&peer, version, claimed),
            req @ VtpmRequest::DeepQuote { .. } => self.deep_quote(peer, req).await,
            // Authorised inside the batch: queueing never waits for the manager lock.
            req @ VtpmRequest::AnchorState { .. } => match self.anchorer.submit(peer, req) {
                Ok(rx) => anchor::reply_for(rx).await,
                Err(reply) => reply,
            },
            VtpmRequest::IssueEkCert { uuid: claimed, ek_public, tpm } => {
                let m = self.mgr.clone();
                tokio::task::spawn_blocking(move || lock(&m).ek_cert(&peer, claimed, &ek_public, &tpm))
                    .await
                    .unwrap_or_else(|e| VtpmReply::Error(Failure::from_error(ErrorCode::Internal, "issuing the EK certificate", &e)))
            }
        }
    }

    async fn deep_quote(&self, peer: Peer, req: VtpmRequest) -> VtpmReply {
        let VtpmRequest::DeepQuote { uuid: claimed, .. } = &req else {
            return VtpmReply::Error(Failure::new(ErrorCode::BadRequest, "not a deep-quote request"));
        };
        let authorized = lock(&self.mgr).authorize(&peer, *claimed);
        let group = match authorized {
            Ok(g) => g,
            Err(f) => return VtpmReply::Error(f),
        };
        match deepquote::submit_request(&self.batcher, peer.vtpm(), group, req) {
            Ok(rx) => deepquote::reply_for(rx).await,
            Err(reply) => reply,
        }
    }
}
