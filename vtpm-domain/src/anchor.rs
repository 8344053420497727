//! State anchors, the vTPM's half: no state write is acknowledged before the manager has
//! anchored its generation, and a state older than the anchor does not start.
//!
//! [`Anchored`] wraps a [`StateStore`] (file or A/B block device). Its `save` writes through the
//! inner store, then asks the manager to anchor the new generation (`VtpmRequest::AnchorState`)
//! and returns only once it is anchored, so "a response implies durability" covers the anchor
//! too: `Vtpm` answers a command only after `save` returned. If the manager does not anchor
//! it, `save` fails (the client gets `TPM_RC_FAILURE`), and the next `save` anchors that
//! generation before writing another one, so the state on disk is never more than one
//! unacknowledged write ahead of the anchor. [`Anchored::present`] is the start-time check:
//! the opened state's generation (authenticated: it is in the AEAD's associated data) and
//! digest go to the manager before anything is written, and a refusal stops the vTPM with an
//! error naming the state, both generations and `xl-vtpm vtpm accept-state`. The manager side,
//! and why this refuses every older acknowledged state, is in `vtpmmgr::anchor`.

use std::path::Path;
use std::time::{Duration, Instant};

use uuid::Uuid;
use vtpm_proto::mgr::{ErrorCode, VtpmReply, VtpmRequest};
use vtpm_proto::sealed::{State, anchor_digest};
use tpm_wire::Family;

use crate::mgr_client::MgrLink;
use crate::store::StoreError;
use crate::vtpm::StateStore;

/// How long one anchor may take (a store write behind a slow discrete TPM, retries while the
/// manager's queue is full).
pub const ANCHOR_TIMEOUT: Duration = Duration::from_secs(60);

/// A state store whose generation counter can be moved forward.
pub trait SkipGeneration {
    /// Makes the next write use a generation above `generation`.
    fn skip_generation_to(&mut self, generation: u64);
}

impl SkipGeneration for crate::store::Store {
    fn skip_generation_to(&mut self, generation: u64) {
        crate::store::Store::skip_generation_to(self, generation)
    }
}

impl SkipGeneration for crate::blockstore::BlockStore {
    fn skip_generation_to(&mut self, generation: u64) {
        crate::blockstore::BlockStore::skip_generation_to(self, generation)
    }
}

/// Why an anchor was not obtained.
enum Refusal {
    /// The manager refused the state as stale (its explanation).
    Stale(String),
    /// Anything else (manager unreachable, TPM failure, …).
    Failed(String),
}

/// A state store whose every write is anchored in the manager (see the module docs).
pub struct Anchored<S> {
    inner: S,
    link: MgrLink,
    conn: Option<std::os::unix::net::UnixStream>,
    uuid: Uuid,
    family: Family,
    /// A written generation (and its digest) the manager has not anchored yet.
    unanchored: Option<(u64, [u8; 32])>,
    /// The next write is a new vTPM's first state, which is not anchored (see [`Anchored::for_create`]).
    first_of_new: bool,
}

impl<S: StateStore + SkipGeneration> Anchored<S> {
    /// Wraps `inner`, the state store of vTPM `uuid`, anchoring over `link`.
    pub fn new(inner: S, link: MgrLink, uuid: Uuid, family: Family) -> Self {
        Anchored { inner, link, conn: None, uuid, family, unanchored: None, first_of_new: false }
    }

    /// [`Anchored::new`] for a vTPM being manufactured (`--create`): its first state write is
    /// not anchored, which saves the create one store write (one physical NV increment). No
    /// older state of this vTPM exists to restore in its place, and the manager, holding no
    /// anchor yet, takes whatever the vTPM presents next as the anchor: its next write (which
    /// is anchored before it is acknowledged, as every later one) or, if it stops before
    /// writing again, this first state when it starts. Every acknowledged write after the
    /// first is anchored, so restoring this first state later is refused like any older one.
    pub fn for_create(inner: S, link: MgrLink, uuid: Uuid, family: Family) -> Self {
        Anchored { first_of_new: true, ..Anchored::new(inner, link, uuid, family) }
    }

    /// At start, before anything is written: presents the opened `state` of `path` to the
    /// manager, which refuses it if it is older than its anchor (or anchors it if newer).
    pub fn present(&mut self, path: &Path, state: &State) -> Result<(), StoreError> {
        let digest = anchor_digest(state.family, state.generation, &state.permanent, &state.volatile);
        match self.anchor(state.generation, &digest, true) {
            Ok(()) => Ok(()),
            Err(Refusal::Stale(reason)) => Err(StoreError::Stale { path: path.to_path_buf(), generation: state.generation, reason }),
            Err(Refusal::Failed(reason)) => Err(StoreError::Unanchored { generation: state.generation, reason: format!("presenting the state of {} at start: {reason}", path.display()) }),
        }
    }

    fn anchor(&mut self, generation: u64, digest: &[u8; 32], opening: bool) -> Result<(), Refusal> {
        let req = VtpmRequest::AnchorState { uuid: self.uuid, generation, digest: hex::encode(digest), opening };
        let deadline = Instant::now() + ANCHOR_TIMEOUT;
        let mut backoff = Duration::from_millis(1);
        loop {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            let reply = self.link.ask_blocking(&req, &mut self.conn, left).map_err(|e| Refusal::Failed(format!("manager link {}: {e}", self.link.describe())))?;
            match reply {
                VtpmReply::StateAnchored { generation: g, continue_after } if g == generation => {
                    // An accepted older state continues above the abandoned generations.
                    if let Some(after) = continue_after {
                        self.inner.skip_generation_to(after);
                    }
                    return Ok(());
                }
                VtpmReply::Error(f) if f.code == ErrorCode::StaleState => return Err(Refusal::Stale(f.message)),
                VtpmReply::Error(f) if f.code == ErrorCode::Busy && Instant::now() < deadline => {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(50));
                }
                VtpmReply::Error(f) => return Err(Refusal::Failed(f.to_string())),
                other => return Err(Refusal::Failed(format!("unexpected reply to a state-anchor request: {other:?}"))),
            }
        }
    }

    fn anchor_save(&mut self, generation: u64, digest: [u8; 32]) -> Result<(), StoreError> {
        match self.anchor(generation, &digest, false) {
            Ok(()) => {
                self.unanchored = None;
                Ok(())
            }
            Err(Refusal::Stale(reason) | Refusal::Failed(reason)) => {
                self.unanchored = Some((generation, digest));
                Err(StoreError::Unanchored { generation, reason })
            }
        }
    }
}

impl<S: StateStore + SkipGeneration> StateStore for Anchored<S> {
    fn save(&mut self, permanent: &[u8], volatile: &[u8]) -> Result<(), StoreError> {
        // Never two unanchored writes on disk: anchor the previous one first.
        if let Some((g, d)) = self.unanchored {
            self.anchor_save(g, d)?;
        }
        self.inner.save(permanent, volatile)?;
        if std::mem::take(&mut self.first_of_new) {
            return Ok(());
        }
        let generation = self.inner.generation();
        self.anchor_save(generation, anchor_digest(self.family, generation, permanent, volatile))
    }

    fn pin_dir(&mut self) -> Result<(), StoreError> {
        // The anchor link shares its socket target with the vTPM's own link, which lib.rs pins.
        self.inner.pin_dir()
    }
    fn generation(&self) -> u64 {
        self.inner.generation()
    }
}
