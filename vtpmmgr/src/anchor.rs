//! vTPM state anchors with group commit: the manager's defence against an older vTPM state.
//!
//! A vTPM's sealed state authenticates itself (AES-256-GCM under its own key, the generation in
//! the associated data), but an older copy of the file authenticates just as well. So the manager
//! keeps, for every vTPM, the generation and digest ([`vtpm_proto::sealed::anchor_digest`]) of
//! its newest state write in its own store ([`crate::store::StateAnchor`]), whose freshness the
//! physical TPM's NV counter guarantees ([`crate::rollback`]).
//!
//! # The protocol (`VtpmRequest::AnchorState`)
//!
//! * **After every state write** the vTPM asks the manager to anchor the new generation and
//!   answers the command that caused the write only once the manager says it is anchored
//!   (durably: store staged, counter incremented). It writes generation `g + 1` only once
//!   generation `g` is anchored (it retries a failed anchor before its next write), so its state
//!   on disk is never more than one write ahead of the anchor. The one exception is a new
//!   vTPM's first state (`vtpm-domain --create`): it has no predecessor to roll back to, so the
//!   create does not anchor it, and the identity has no anchor until the vTPM's next write or
//!   start (either anchors whatever it presents, which can only be that first state or a later
//!   one).
//! * **At start**, after opening its state and before writing anything, the vTPM presents the
//!   state's generation (authenticated: read from the sealed header) and digest (`opening`).
//!
//! For both, with anchor `(a, d)`: a generation `g < a` is refused, and so is `g == a` with a
//! digest other than `d`; `g == a` with digest `d` is answered at once; `g > a` (or no anchor
//! yet: a vTPM created, or last written, before anchors existed) becomes the new anchor. A
//! crash between a write and its anchor leaves the state one generation ahead — accepted, and
//! that write was never acknowledged. Every acknowledged write is anchored, and every state
//! accepted at start is the anchored one or a later write of it, so restoring any older
//! acknowledged state is refused. A refused state is remembered (in memory) until an
//! administrator accepts it ([`AdminRequest::VtpmAcceptState`](vtpm_proto::mgr::AdminRequest)),
//! which makes it the anchor.
//!
//! # Group commit
//!
//! Anchor requests (from the per-vTPM sockets and the Xen link) queue in a bounded channel. One
//! task takes everything queued, decides each request under the manager lock, and makes one
//! store write (one counter increment) for the whole batch. While that write is in flight new
//! requests queue for the next one, so a lone request waits for nothing and a burst of writes
//! from many vTPMs (and many writes from one) shares one increment. The requests are
//! authorised inside the batch, so queueing one never waits for the manager lock; the batch
//! holds that lock for its store write (as an admin change does), so a state-key request or a
//! deep quote's authorisation arriving meanwhile waits for that one write.
//!
//! An anchor write costs what any store write costs (stage: file and directory fsync; one
//! physical `TPM2_NV_Increment` in the manager's kept session; rename) and wears the physical counter accordingly: under
//! continuous NV writes the counter moves once per batch, i.e. at most once per store-write time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;
use vtpm_proto::mgr::{ErrorCode, Failure, VtpmReply, VtpmRequest};

use crate::peer::Peer;

/// Most anchor requests waiting; beyond it callers get `Busy` (and retry).
pub const MAX_QUEUE: usize = 4096;
/// Most anchor requests one store write covers.
pub const MAX_BATCH: usize = 4096;

/// One queued anchor request.
pub struct Request {
    /// The vTPM the link serves (`peer.vtpm()`).
    pub vtpm: Uuid,
    /// The peer, as its link established it.
    pub peer: Peer,
    /// The UUID the caller claims (must equal `vtpm`).
    pub claimed: Uuid,
    /// The presented generation.
    pub generation: u64,
    /// The presented digest (lower-case hex, 64 digits).
    pub digest: String,
    /// Presented at start.
    pub opening: bool,
    /// Where the answer goes.
    pub reply: oneshot::Sender<VtpmReply>,
}

/// Counters exposed in the manager's status.
#[derive(Debug, Default)]
pub struct Stats {
    /// Anchor requests answered.
    pub requests: AtomicU64,
    /// Store writes made for anchors.
    pub commits: AtomicU64,
}

/// Handle to the anchoring task.
#[derive(Clone)]
pub struct Anchorer {
    tx: mpsc::Sender<Request>,
}

impl Anchorer {
    /// Starts the anchoring task. `decide` authorises and decides one batch, makes its store
    /// write and answers every request in it (the manager's `anchor_batch`); it blocks, so it
    /// runs off the async threads.
    pub fn spawn(decide: Decide) -> Anchorer {
        let (tx, rx) = mpsc::channel(MAX_QUEUE);
        tokio::spawn(run(decide, rx));
        Anchorer { tx }
    }

    /// Queues an `AnchorState` that arrived from `peer`. Returns the receiver of the answer, or
    /// the answer to send at once (malformed, queue full).
    pub fn submit(&self, peer: Peer, req: VtpmRequest) -> Result<oneshot::Receiver<VtpmReply>, VtpmReply> {
        let VtpmRequest::AnchorState { uuid, generation, digest, opening } = req else {
            return Err(VtpmReply::Error(Failure::new(ErrorCode::BadRequest, "not a state-anchor request")));
        };
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(VtpmReply::Error(Failure::new(ErrorCode::BadRequest, "state-anchor digest must be 64 hex digits (SHA-256)")));
        }
        let (tx, rx) = oneshot::channel();
        let req = Request { vtpm: peer.vtpm(), peer, claimed: uuid, generation, digest: digest.to_ascii_lowercase(), opening, reply: tx };
        self.tx.try_send(req).map_err(|e| {
            VtpmReply::Error(match e {
                mpsc::error::TrySendError::Full(_) => Failure::new(ErrorCode::Busy, "state-anchor queue is full; retry shortly"),
                mpsc::error::TrySendError::Closed(_) => Failure::new(ErrorCode::Internal, "the state-anchor task stopped"),
            })
        })?;
        Ok(rx)
    }
}

/// The reply for a queued request.
pub async fn reply_for(rx: oneshot::Receiver<VtpmReply>) -> VtpmReply {
    rx.await.unwrap_or_else(|_| VtpmReply::Error(Failure::new(ErrorCode::Internal, "the state-anchor task dropped the request")))
}

/// What decides a batch of anchor requests (see [`Anchorer::spawn`]).
pub type Decide = Arc<dyn Fn(Vec<Request>) + Send + Sync>;

async fn run(decide: Decide, mut rx: mpsc::Receiver<Request>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let d = decide.clone();
        // The store write (file fsyncs, a TPM command) blocks: off the async threads. Requests
        // arriving meanwhile queue for the next batch.
        if let Err(e) = tokio::task::spawn_blocking(move || d(batch)).await {
            xvtpm_log::guest_error!(error = %e, "state-anchor batch failed");
        }
    }
}

/// Records `n` answered requests and `commits` store writes.
pub fn count(stats: &Arc<Stats>, n: usize, commits: u64) {
    stats.requests.fetch_add(n as u64, Ordering::Relaxed);
    stats.commits.fetch_add(commits, Ordering::Relaxed);
}
