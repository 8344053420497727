//! Rollback protection of the manager's store: a monotonic counter in the physical TPM's NV.
//!
//! Someone with access to dom0's disk could otherwise put back an older copy of
//! `manager.json` — resurrecting a deleted vTPM identity, a deleted group and its AK, or an old
//! provisioning record. The store is authenticated ([`crate::store`]: HMAC under a key derived
//! from the master secret), and every copy records the value of a TPM NV counter
//! ([`HwTpm::store_counter_public`]: `TPM_NT_COUNTER`, incremented only with an authorisation
//! value derived from the master secret) that the manager increments for each write. A copy
//! whose value is not the counter's is not the newest one, and the manager refuses to start
//! from it.
//!
//! # The write protocol (one durable write of the store)
//!
//! With the counter at `n` and the store recording `n`:
//!
//! 1. **stage**: the new store, recording `n + 1` and MAC'd, is written to
//!    `manager.json.pending` (temp file, fsync, rename, fsync dir);
//! 2. **increment** the counter to `n + 1` — this is the commit point;
//! 3. **publish**: rename `manager.json.pending` over `manager.json`. The rename is made durable
//!    by the next write's staging (same directory) or, after a crash, completed by the start
//!    (the crash window of step 2–3 below); a start that completes a write fsyncs it.
//!
//! A staged store is a write-ahead record: once it is durable the change is committed, and
//! whoever comes next — the same manager's next write, or the next start — completes it.
//!
//! # What a start accepts
//!
//! Let `s` be the value the store records and `n` the counter's:
//!
//! * `s == n`: the newest store. A leftover pending file (a write that died while staging) is
//!   removed.
//! * `s == n - 1` **and** a pending store recording `n` that verifies: the manager died between
//!   the increment and the rename (the crash window of step 2–3). The pending store *is* write
//!   `n` — no other content can carry value `n` with a valid MAC — so the start publishes it.
//! * `s == n` and a pending store recording `n + 1`: the manager died between staging and the
//!   increment. The start increments and publishes (write-ahead semantics: the change was
//!   requested and durably recorded; it is applied, never half-applied).
//! * `s == n - 1` with **no** such pending store is refused like any older copy. A lost write
//!   cannot produce it, because the pending file is durable before the counter moves; accepting
//!   it would let anyone who kept the previous copy undo the last change (say, a vTPM's
//!   deletion) at will.
//! * `s < n - 1`, and `s > n` (a store the counter never saw: another host's, or a replaced
//!   counter), are refused. So is a counter that is missing or not the manager's own.
//!
//! Refusals leave every file as it is and name the store, both values and the remedies:
//! restore the newest copy, or accept this one knowingly (`vtpmmgr accept-store --yes`).
//!
//! # Residual risk
//!
//! If the manager dies after staging write `n + 1` and before incrementing, and the pending
//! file is then removed (by someone, before the next start), a later write `n + 1` has
//! different content, and whoever kept the removed pending file holds a second store that
//! verifies with value `n + 1`. It differs from the real one by one change that was requested
//! but never acknowledged. Closing this would need more than a counter in the TPM.
//! Likewise the TPM owner can delete the counter (the manager then refuses to start) and,
//! together with a pre-migration (format 1) copy of the store, make the manager migrate that
//! copy; anyone who can do both on a running host in its approved state can also unseal the
//! master secret, i.e. is the manager.
//!
//! # Migration
//!
//! A format-1 store (from before this counter) is migrated at the first start: the manager
//! defines its counter, increments it and writes the store as format 2 through the protocol
//! above, logging "migrating manager store" and "migrated". A format-1 store on a TPM that
//! already holds this manager's counter is refused as a downgrade.
//!
//! Every write costs two fsyncs (the staged file and its directory) and one
//! `TPM2_NV_Increment` in a salted HMAC session the manager keeps open between writes
//! ([`HwTpm::counter_bump`]; no read-back: the manager alone moves the counter, and a counter
//! moved by anyone else makes the next start refuse the store). The store changes on admin operations
//! (provision, groups, vTPM create/delete) and when vTPMs anchor new state generations
//! ([`crate::anchor`]); those are group-committed, one write for every anchor queued while the
//! previous write ran, so a vTPM writing NV continuously costs one increment per store write
//! (a few ms), not per command. A TPM's NV counter endures 100k+ increments before it may
//! throttle (`TPM_RC_NV_RATE`); NV-write-heavy guests wear the physical TPM accordingly.

use std::path::{Path, PathBuf};


use crate::hwtpm::{CounterProbe, HwTpm, HwTpmError, MasterSecret, ProvisionRecord, STORE_COUNTER_FIRST, STORE_COUNTER_SLOTS};
use crate::store::{self, CounterRecord, STORE_VERSION, Store, StoreError, StoreKeys};

/// Why the store cannot be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    /// Reading or writing a file.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The master secret did not unseal (the caller explains).
    #[error("{0}")]
    Unseal(HwTpmError),
    /// The physical TPM failed.
    #[error("physical TPM: {0}")]
    Tpm(#[from] HwTpmError),
    /// An older copy of the store.
    #[error(
        "manager store {path} is an older copy: it records write {store} of the rollback counter, but the physical TPM's counter {nv_index:#010x} is at {tpm}. \
         Someone restored an old copy, or the disk lost writes; the file was left untouched and the manager serves nothing from it. \
         Put back the newest copy of the store (its \"counter\" records \"value\": {tpm}), or — knowing that every change after write {store} is lost and \
         that deleted vTPMs and groups may come back — accept this copy with `vtpmmgr accept-store --yes`"
    )]
    Behind {
        /// Store file.
        path: PathBuf,
        /// Counter handle.
        nv_index: u32,
        /// The store's value.
        store: u64,
        /// The TPM's value.
        tpm: u64,
    },
    /// A store ahead of the counter.
    #[error(
        "manager store {path} records write {store} of the rollback counter, but the physical TPM's counter {nv_index:#010x} is only at {tpm}: \
         the store was not written against this TPM's counter (a store from another host, or a counter that was deleted and defined again). \
         The file was left untouched. Put back this host's own store, or accept this one with `vtpmmgr accept-store --yes`"
    )]
    Ahead {
        /// Store file.
        path: PathBuf,
        /// Counter handle.
        nv_index: u32,
        /// The store's value.
        store: u64,
        /// The TPM's value.
        tpm: u64,
    },
    /// There is no store, but the TPM holds store counters of a provisioning.
    #[error(
        "manager store {path} does not exist, but the physical TPM holds the rollback counter(s) {counters} of a provisioned manager: \
         the store was deleted or lost, and starting unprovisioned would abandon every vTPM identity. Put the newest copy of the store back \
         (if it is older than the counter, then also run `vtpmmgr accept-store --yes`); or, to give up every vTPM of that provisioning for good \
         and provision anew, remove the counter(s) as TPM owner (`tpm2_nvundefine -C o <index>` for each) and start again"
    )]
    StoreMissing {
        /// Store file.
        path: PathBuf,
        /// The counters' handles.
        counters: String,
    },
    /// The counter is gone or not the manager's.
    #[error(
        "manager store {path} is covered by the rollback counter {nv_index:#010x}, but {why}: without its counter the store's freshness \
         cannot be checked (the TPM owner deleted or replaced the index, or this is another TPM). The file was left untouched. \
         To bind the store as it is to a new counter, run `vtpmmgr accept-store --yes`"
    )]
    Counter {
        /// Store file.
        path: PathBuf,
        /// Counter handle.
        nv_index: u32,
        /// What is wrong with it.
        why: String,
    },
    /// A format-1 store although the TPM holds this manager's counter.
    #[error(
        "manager store {path} has format 1 (from before the rollback counter), but the physical TPM already holds this manager's store counter {nv_index:#010x} ({state}): \
         the store was replaced by a copy from before its migration, or a migration was interrupted right after defining the counter \
         (the log then shows \"migrating manager store\" without \"migrated\"). The file was left untouched. \
         Put back the newest copy of the store, or accept this one with `vtpmmgr accept-store --yes`"
    )]
    Downgrade {
        /// Store file.
        path: PathBuf,
        /// Counter handle.
        nv_index: u32,
        /// Its value, or "never incremented".
        state: String,
    },
    /// A pending (staged) store that cannot be completed.
    #[error("{0}; the files were left untouched")]
    Pending(String),
    /// A staged write whose counter increment did not happen.
    #[error(
        "the change was staged in {pending}, but the physical TPM did not increment the store counter {nv_index:#010x} ({cause}); \
         the manager applies it at its next start and accepts no other change until then — restart it once the TPM works"
    )]
    Staged {
        /// Pending file.
        pending: PathBuf,
        /// Counter handle.
        nv_index: u32,
        /// TPM error.
        cause: String,
    },
    /// An earlier write failure blocks writes.
    #[error("the manager accepts no change until it restarts: {0}")]
    Blocked(String),
}

/// How [`open`] treats a store that does not match the counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Refuse it (`vtpmmgr serve`, `reauthorize`).
    Refuse,
    /// The administrator accepted the store as it is (`vtpmmgr accept-store --yes`): bind it to
    /// the counter (a new one if the old is gone) at the counter's next value.
    Accept,
}

/// The pending (staged) store next to `path`.
pub fn pending_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".pending");
    PathBuf::from(s)
}

/// The store's on-disk life once the manager is provisioned: where it is, its keys, and the
/// counter value it and the TPM agree on.
#[derive(Debug)]
pub struct Protected {
    path: PathBuf,
    keys: StoreKeys,
    counter: CounterRecord,
    /// The last write is committed (counter moved) but its rename failed: the pending file
    /// holds it. The next write publishes it first.
    unpublished: bool,
    /// Why writes are refused until a restart.
    blocked: Option<String>,
}

/// The result of [`open`].
#[derive(Debug)]
pub struct Opened {
    /// The store (empty if unprovisioned).
    pub store: Store,
    /// The master secret, if provisioned.
    pub master: Option<MasterSecret>,
    /// Present if provisioned.
    pub protected: Option<Protected>,
    /// What happened (for `accept-store` to print).
    pub note: Option<String>,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RollbackError + 'a {
    move |source| RollbackError::Store(StoreError::Io { what, path: path.into(), source })
}

fn fsync_dir(path: &Path) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// Renames the pending store over the store (step 3) and makes the rename durable.
fn publish(path: &Path) -> std::io::Result<()> {
    std::fs::rename(pending_path(path), path)?;
    fsync_dir(path)
}

impl Protected {
    /// The counter handle and the value the store and the TPM agree on.
    pub fn counter(&self) -> CounterRecord {
        self.counter
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the TPM's counter holds now.
    pub fn tpm_value(&self, hw: &mut HwTpm) -> Result<CounterProbe, HwTpmError> {
        hw.counter_probe(self.counter.nv_index, self.keys.nv_auth())
    }

    /// Writes `next` durably under the protocol in the module docs and returns it as written
    /// (with its counter record). On error nothing changed, except as [`RollbackError::Staged`]
    /// says.
    pub fn commit(&mut self, hw: &mut HwTpm, mut next: Store) -> Result<Store, RollbackError> {
        if let Some(why) = &self.blocked {
            return Err(RollbackError::Blocked(why.clone()));
        }
        let pending = pending_path(&self.path);
        if self.unpublished {
            publish(&self.path).map_err(io("replacing the store with", &pending))?;
            self.unpublished = false;
        }
        let h = self.counter.nv_index;
        let k = self.counter.value + 1;
        next.version = STORE_VERSION;
        next.counter = Some(CounterRecord { nv_index: h, value: k });
        // 1. stage
        if let Err(e) = xvtpm_fsutil::write_atomic(&pending, &store::encode(&next, &self.keys), 0o600) {
            // The counter has not moved: this staged write never happened.
            let _ = std::fs::remove_file(&pending);
            return Err(io("staging the store in", &pending)(e));
        }
        // 2. increment (the commit point)
        // One NV_Increment in the kept session; no read-back (see `HwTpm::counter_bump`).
        if let Err(e) = hw.counter_bump(h, self.keys.nv_auth()) {
            xvtpm_log::host_warn!(error = %e, nv_index = %format!("{h:#010x}"), "store counter increment failed in the kept session; reading the counter to see whether it moved");
            // The answer may be lost although the increment happened, or the kept session may
            // have gone stale (a TPM reset): look, and if the counter did not move, increment
            // once more in a fresh session, reading the value back.
            let retried = match hw.counter_probe(h, self.keys.nv_auth()) {
                Ok(CounterProbe::Value(v)) if v == k => Ok(()),
                Ok(CounterProbe::Value(v)) if v + 1 == k => match hw.counter_increment(h, self.keys.nv_auth()) {
                    Ok(v) if v == k => Ok(()),
                    Ok(v) => {
                        let why = format!("the store counter {h:#010x} should be at {k} after its increment, but reads {v}; the change is staged in {}", pending.display());
                        self.blocked = Some(why.clone());
                        return Err(RollbackError::Blocked(why));
                    }
                    Err(e2) => Err(format!("{e}; again in a fresh session: {e2}")),
                },
                _ => Err(e.to_string()),
            };
            if let Err(cause) = retried {
                let err = RollbackError::Staged { pending: pending.clone(), nv_index: h, cause };
                self.blocked = Some(err.to_string());
                return Err(err);
            }
        }
        self.counter.value = k;
        // 3. publish. The rename is not fsynced here: the write is already durable (staged,
        // counter moved), and a rename lost in a crash leaves exactly the state a start
        // completes (store `k - 1`, pending `k`, counter `k`). The next write's staging fsyncs
        // this directory, which makes the rename durable before the counter moves again.
        if let Err(e) = std::fs::rename(&pending, &self.path) {
            xvtpm_log::host_warn!(error = %e, store = %self.path.display(), pending = %pending.display(),
                "store write {k} is committed (counter moved, change staged) but the store file could not be replaced; the next write or start completes it");
            self.unpublished = true;
        }
        Ok(next)
    }
}

/// Defines the manager's counter at the first free handle of its range, gives it a value, and
/// writes `store` at the next one. For provisioning, migration and `accept-store`.
pub fn bind_new_counter(hw: &mut HwTpm, path: &Path, keys: StoreKeys, store: Store) -> Result<(Store, Protected), RollbackError> {
    let used = hw.nv_indices_in(STORE_COUNTER_FIRST, STORE_COUNTER_SLOTS)?;
    let h = (STORE_COUNTER_FIRST..STORE_COUNTER_FIRST + STORE_COUNTER_SLOTS)
        .find(|h| !used.contains(h))
        .ok_or_else(|| HwTpmError::Unexpected(format!("all NV handles {STORE_COUNTER_FIRST:#010x}..+{STORE_COUNTER_SLOTS} are in use; remove unused ones (tpm2_getcap handles-nv-index)")))?;
    if !used.is_empty() {
        xvtpm_log::host_warn!(in_use = ?used.iter().map(|h| format!("{h:#010x}")).collect::<Vec<_>>(), using = %format!("{h:#010x}"),
            "NV handles of the store-counter range are in use (an earlier provisioning's counter, or another application's); skipping them");
    }
    hw.counter_define(h, keys.nv_auth())?;
    let bound = (|| {
        let v = hw.counter_increment(h, keys.nv_auth())?;
        bind_existing(hw, path, keys, store, h, v)
    })();
    if bound.is_err() {
        // Best effort: nothing refers to the counter yet (the store was not published). If a
        // staged store does, it survives this and the next start reports it.
        if !pending_path(path).exists() {
            let _ = hw.counter_undefine(h);
        }
    }
    bound
}

/// Writes `store` at value `v + 1` of the manager's counter `h`, which is at `v`.
fn bind_existing(hw: &mut HwTpm, path: &Path, keys: StoreKeys, store: Store, h: u32, v: u64) -> Result<(Store, Protected), RollbackError> {
    let mut p = Protected { path: path.into(), keys, counter: CounterRecord { nv_index: h, value: v }, unpublished: false, blocked: None };
    let store = p.commit(hw, store)?;
    if p.unpublished {
        return Err(RollbackError::Pending(format!("the store was staged in {} and the counter moved, but it could not replace {}", pending_path(path).display(), path.display())));
    }
    Ok((store, p))
}

/// Handles of this manager's counters in its range (public area and authorisation value match).
fn own_counters(hw: &mut HwTpm, keys: &StoreKeys) -> Result<Vec<(u32, CounterProbe)>, RollbackError> {
    let mut out = Vec::new();
    for h in hw.nv_indices_in(STORE_COUNTER_FIRST, STORE_COUNTER_SLOTS)? {
        match hw.counter_probe(h, keys.nv_auth())? {
            p @ (CounterProbe::Value(_) | CounterProbe::Unwritten) => out.push((h, p)),
            CounterProbe::Missing | CounterProbe::Foreign(_) => {}
        }
    }
    Ok(out)
}

/// Completes a staged write `p` (recording `p.value` at `p.nv_index`), whose predecessor on disk
/// records `prev` (`None`: no store yet). Returns `Ok(None)` if `p` is not the next write.
fn roll_forward(hw: &mut HwTpm, path: &Path, keys: &StoreKeys, p: &Store, prev: Option<u64>) -> Result<Option<CounterRecord>, RollbackError> {
    let c = p.counter.expect("verified stores record a counter");
    if prev.is_some_and(|s| s.checked_add(1) != Some(c.value)) {
        return Ok(None);
    }
    let now = match hw.counter_probe(c.nv_index, keys.nv_auth())? {
        CounterProbe::Value(v) => v,
        _ => return Ok(None),
    };
    let pending = pending_path(path);
    if now + 1 == c.value && prev.is_none_or(|s| s == now) {
        xvtpm_log::host_warn!(pending = %pending.display(), value = c.value, "completing a store write that was staged when the manager stopped: incrementing the counter");
        if hw.counter_increment(c.nv_index, keys.nv_auth())? != c.value {
            return Err(RollbackError::Pending(format!("{} records write {} but the counter {:#010x} did not reach it", pending.display(), c.value, c.nv_index)));
        }
    } else if now != c.value {
        return Ok(None);
    } else {
        xvtpm_log::host_warn!(pending = %pending.display(), value = c.value, "completing a store write interrupted after its counter increment");
    }
    publish(path).map_err(io("replacing the store with", &pending))?;
    xvtpm_log::host_info!(store = %path.display(), value = c.value, "store write completed");
    Ok(Some(c))
}

/// Opens the store at `path`: reads it, unseals the master secret with `unseal` (given the
/// store's provisioning record), verifies the MAC, completes an interrupted write, migrates a
/// format-1 store, and checks the store against the rollback counter (see the module docs).
pub fn open(
    hw: &mut HwTpm,
    path: &Path,
    unseal: &mut dyn FnMut(&mut HwTpm, &ProvisionRecord) -> Result<MasterSecret, HwTpmError>,
    mode: Mode,
) -> Result<Opened, RollbackError> {
    let pending = pending_path(path);
    xvtpm_fsutil::remove_stale_temps(path);
    xvtpm_fsutil::remove_stale_temps(&pending);
    let main = store::read(path)?;
    // A pending file that does not even parse is a torn stage (the counter never moved for it).
    let staged = match store::read(&pending) {
        Ok(p) => p,
        Err(e) => {
            xvtpm_log::host_warn!(error = %e, "ignoring a pending store that does not parse");
            None
        }
    };
    let rec = main.as_ref().and_then(|m| m.provision()).or_else(|| staged.as_ref().and_then(|p| p.provision())).cloned();
    let Some(rec) = rec else {
        if let Some(m) = main {
            // Format 1 wrote no store before provisioning, format 2 neither; keep whatever this is.
            xvtpm_log::host_warn!(store = %path.display(), "manager store has no provisioning record");
            return Ok(Opened { store: m.unprotected().unwrap_or_else(Store::empty), master: None, protected: None, note: None });
        }
        let _ = std::fs::remove_file(&pending);
        refuse_orphan_counters(hw, path)?;
        return Ok(Opened { store: Store::empty(), master: None, protected: None, note: None });
    };
    let master = unseal(hw, &rec).map_err(RollbackError::Unseal)?;
    let keys = StoreKeys::derive(&master);
    let staged = staged.and_then(|p| match p.verify(&keys) {
        Ok(s) => Some(s),
        Err(e) => {
            xvtpm_log::host_warn!(error = %e, "ignoring a pending store that does not verify");
            None
        }
    });
    let opened = |store: Store, prot: Protected, note: Option<&str>| Opened {
        store,
        master: Some(master),
        protected: Some(prot),
        note: note.map(str::to_string),
    };
    let at_rest = |store: &Store, keys: StoreKeys| Protected {
        path: path.into(),
        keys,
        counter: store.counter.expect("protected stores record a counter"),
        unpublished: false,
        blocked: None,
    };
    let Some(main) = main else {
        // Provisioning staged its first store and stopped.
        let p = staged.ok_or_else(|| RollbackError::Pending(format!("{} holds a provisioning record but does not verify", pending.display())))?;
        if roll_forward(hw, path, &keys, &p, None)?.is_none() {
            return Err(RollbackError::Pending(format!(
                "{} holds the first store of an interrupted provisioning, but the counter it names does not match it",
                pending.display()
            )));
        }
        let prot = at_rest(&p, keys);
        return Ok(opened(p, prot, Some("completed an interrupted provisioning")));
    };

    if main.version() == store::STORE_VERSION_UNPROTECTED {
        let legacy = main.unprotected().expect("format 1");
        if let Some(p) = staged
            && roll_forward(hw, path, &keys, &p, None)?.is_some()
        {
            let prot = at_rest(&p, keys);
            return Ok(opened(p, prot, Some("completed an interrupted migration")));
        }
        if let Some((h, probe)) = own_counters(hw, &keys)?.into_iter().next() {
            if mode == Mode::Refuse {
                let state = match probe {
                    CounterProbe::Value(v) => format!("value {v}"),
                    _ => "never incremented".into(),
                };
                return Err(RollbackError::Downgrade { path: path.into(), nv_index: h, state });
            }
            xvtpm_log::host_warn!(store = %path.display(), nv_index = %format!("{h:#010x}"), "accept-store: binding a format-1 store to this manager's existing counter");
            let v = match probe {
                CounterProbe::Value(v) => v,
                _ => hw.counter_increment(h, keys.nv_auth())?,
            };
            let (store, prot) = bind_existing(hw, path, keys, legacy, h, v)?;
            let note = format!("accepted the format-1 store as write {} of counter {h:#010x}", prot.counter.value);
            return Ok(opened(store, prot, Some(&note)));
        }
        xvtpm_log::host_info!(store = %path.display(), "migrating manager store from format 1: defining its rollback counter in the physical TPM and authenticating the store (HMAC-SHA256)");
        let (store, prot) = bind_new_counter(hw, path, keys, legacy)?;
        xvtpm_log::host_info!(store = %path.display(), nv_index = %format!("{:#010x}", prot.counter.nv_index), value = prot.counter.value, "migrated manager store to format 2");
        return Ok(opened(store, prot, Some("migrated the store from format 1")));
    }

    let store = main.verify(&keys)?;
    let c = store.counter.expect("verified stores record a counter");
    let n = match hw.counter_probe(c.nv_index, keys.nv_auth())? {
        CounterProbe::Value(n) => n,
        other => {
            let why = match other {
                CounterProbe::Missing => "that NV index does not exist".to_string(),
                CounterProbe::Foreign(why) => format!("the NV index there is not the manager's counter: {why}"),
                _ => "it was never incremented (it was defined anew)".to_string(),
            };
            if mode == Mode::Refuse {
                return Err(RollbackError::Counter { path: path.into(), nv_index: c.nv_index, why });
            }
            xvtpm_log::host_warn!(store = %path.display(), "accept-store: binding the store to a new counter ({why})");
            let (store, prot) = bind_new_counter(hw, path, keys, store)?;
            let note = format!("bound the store to a new counter ({why}): it is now write {} of counter {:#010x}", prot.counter.value, prot.counter.nv_index);
            return Ok(opened(store, prot, Some(&note)));
        }
    };
    if let Some(p) = staged.filter(|p| p.counter.is_some_and(|pc| pc.nv_index == c.nv_index))
        && roll_forward(hw, path, &keys, &p, Some(c.value))?.is_some()
    {
        let prot = at_rest(&p, keys);
        return Ok(opened(p, prot, Some("completed an interrupted store write")));
    }
    if c.value == n {
        if pending.exists() {
            xvtpm_log::host_info!(pending = %pending.display(), "removing a pending store that was never committed");
            let _ = std::fs::remove_file(&pending);
        }
        let prot = at_rest(&store, keys);
        return Ok(opened(store, prot, None));
    }
    if mode == Mode::Accept {
        xvtpm_log::host_warn!(store = %path.display(), store_value = c.value, tpm_value = n, "accept-store: accepting a store that does not match the counter");
        let (store2, prot) = bind_existing(hw, path, keys, store, c.nv_index, n)?;
        let note = format!("accepted a store that recorded write {} while the counter was at {n}: it is now write {}", c.value, prot.counter.value);
        return Ok(opened(store2, prot, Some(&note)));
    }
    if c.value < n {
        Err(RollbackError::Behind { path: path.into(), nv_index: c.nv_index, store: c.value, tpm: n })
    } else {
        Err(RollbackError::Ahead { path: path.into(), nv_index: c.nv_index, store: c.value, tpm: n })
    }
}

/// With no store: warn if the TPM holds counters that look like an earlier provisioning's.
/// A missing store while the TPM holds counters that look like the manager's is refused.
fn refuse_orphan_counters(hw: &mut HwTpm, path: &Path) -> Result<(), RollbackError> {
    let used = hw.nv_indices_in(STORE_COUNTER_FIRST, STORE_COUNTER_SLOTS)?;
    let ours: Vec<String> = used
        .into_iter()
        // Without the master secret only the public area can be compared.
        .filter(|h| matches!(hw.counter_template_mismatch(*h), Ok(None)))
        .map(|h| format!("{h:#010x}"))
        .collect();
    if ours.is_empty() {
        return Ok(());
    }
    Err(RollbackError::StoreMissing { path: path.into(), counters: ours.join(", ") })
}
