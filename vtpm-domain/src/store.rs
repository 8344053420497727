//! Sealed, crash-safe state storage for one vTPM.
//!
//! Every write goes to a temporary file in the same directory, is fsynced,
//! renamed over the state file and the directory is fsynced, so a crash or
//! `kill -9` at any point leaves either the old or the new state, never a
//! mix. A state file that cannot be opened is an error the caller must
//! surface; nothing here ever replaces it with a fresh TPM.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rand::RngCore;
use uuid::Uuid;
use vtpm_proto::sealed::{self, OpenError, State};
use tpm_wire::Family;
use zeroize::Zeroizing;

/// Errors from the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state file is missing for a vTPM that should exist.
    #[error("state file {0} does not exist; refusing to manufacture a new TPM for an existing vTPM (restore the file from backup, or destroy and re-create the vTPM)")]
    Missing(PathBuf),
    /// `--create` was given but a state file exists.
    #[error("state file {0} already exists; refusing to overwrite it with a new TPM (start without --create to use it)")]
    Exists(PathBuf),
    /// The file exists but does not open.
    #[error("state file {path} cannot be opened: {source}; it was left untouched")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: OpenError,
    },
    /// The file belongs to a different TPM family than requested.
    #[error("state file {path} holds a {found:?} TPM but {wanted:?} was requested")]
    FamilyMismatch {
        /// The file.
        path: PathBuf,
        /// Family in the file.
        found: Family,
        /// Family requested.
        wanted: Family,
    },
    /// The manager refused the state as older than (or different from) the newest state it
    /// anchored for this vTPM ([`crate::anchor`]).
    #[error("state {path} (generation {generation}) was refused by the manager: {reason}")]
    Stale {
        /// The state file or device.
        path: PathBuf,
        /// Its authenticated generation.
        generation: u64,
        /// The manager's explanation (names the anchored generation and the admin command).
        reason: String,
    },
    /// A state was written, but the manager did not anchor it: the command that changed it is
    /// not acknowledged ([`crate::anchor`]).
    #[error("state generation {generation} was written but not anchored by the manager ({reason}); the change is not acknowledged, and the next write retries the anchor first")]
    Unanchored {
        /// The generation written.
        generation: u64,
        /// Why.
        reason: String,
    },
    /// An I/O error.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { what, path: path.to_path_buf(), source }
}

/// The sealed state file of one vTPM.
pub struct Store {
    path: PathBuf,
    uuid: Uuid,
    family: Family,
    key: Zeroizing<[u8; sealed::KEY_LEN]>,
    generation: u64,
    /// Set by [`Store::pin_dir`]: the open directory and the state file's path through it.
    via: Option<(crate::sandbox::PinnedDir, PathBuf)>,
}

impl Store {
    /// Prepares a store for a vTPM that does not exist yet. Fails if the
    /// file exists.
    pub fn create(path: &Path, uuid: Uuid, family: Family, key: Zeroizing<[u8; 32]>) -> Result<Store, StoreError> {
        if path.exists() {
            return Err(StoreError::Exists(path.to_path_buf()));
        }
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io_err("creating directory", dir))?;
        }
        xvtpm_fsutil::remove_stale_temps(path);
        Ok(Store { path: path.to_path_buf(), uuid, family, key, generation: 0, via: None })
    }

    /// Opens the existing state of a vTPM.
    pub fn open(path: &Path, uuid: Uuid, family: Family, key: Zeroizing<[u8; 32]>) -> Result<(Store, State), StoreError> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::Missing(path.to_path_buf())),
            Err(e) => return Err(io_err("reading", path)(e)),
        };
        let state = sealed::open(&key, &uuid, &bytes)
            .map_err(|source| StoreError::Open { path: path.to_path_buf(), source })?;
        if state.family != family {
            return Err(StoreError::FamilyMismatch { path: path.to_path_buf(), found: state.family, wanted: family });
        }
        xvtpm_fsutil::remove_stale_temps(path);
        let store = Store { path: path.to_path_buf(), uuid, family, key, generation: state.generation, via: None };
        Ok((store, state))
    }

    /// The generation of the last write.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Makes the next save write a generation above `generation` (no effect if it would
    /// anyway): after an administrator accepted an older state, so that its new writes
    /// outnumber every write of the abandoned newer states ([`crate::anchor`]).
    pub fn skip_generation_to(&mut self, generation: u64) {
        self.generation = self.generation.max(generation);
    }

    /// The state file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the state file's directory now and writes through it from then on, so the
    /// directories above it need not be reachable after the privilege drop.
    pub fn pin_dir(&mut self) -> Result<(), StoreError> {
        let (dir, via) = crate::sandbox::PinnedDir::for_file(&self.path).map_err(io_err("opening the directory of", &self.path))?;
        self.via = Some((dir, via));
        Ok(())
    }

    /// Seals and atomically writes a new state.
    pub fn save(&mut self, permanent: &[u8], volatile: &[u8]) -> Result<(), StoreError> {
        let generation = self.generation + 1;
        let blob = seal_generation(&self.key, &self.uuid, self.family, generation, permanent, volatile);
        let target = self.via.as_ref().map_or(&self.path, |(_, p)| p);
        xvtpm_fsutil::write_atomic(target, &blob, 0o600).map_err(io_err("writing", &self.path))?;
        self.generation = generation;
        Ok(())
    }
}

/// Seals `permanent` and `volatile` as generation `generation` of vTPM `uuid`
/// under `key`, with a fresh random nonce (shared by every state store).
pub fn seal_generation(
    key: &[u8; sealed::KEY_LEN],
    uuid: &Uuid,
    family: Family,
    generation: u64,
    permanent: &[u8],
    volatile: &[u8],
) -> Vec<u8> {
    let state = State {
        family,
        generation,
        permanent: Zeroizing::new(permanent.to_vec()),
        volatile: Zeroizing::new(volatile.to_vec()),
    };
    let mut nonce = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    sealed::seal(key, uuid, &state, &nonce)
}

/// Writes `data` atomically (see [`xvtpm_fsutil::write_atomic`]).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    xvtpm_fsutil::write_atomic(path, data, 0o600).map_err(io_err("writing", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> Zeroizing<[u8; 32]> {
        Zeroizing::new([b; 32])
    }

    #[test]
    fn create_save_open_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s/state.xvts");
        let id = Uuid::new_v4();
        assert!(matches!(Store::open(&p, id, Family::Tpm2, key(1)), Err(StoreError::Missing(_))));
        let mut s = Store::create(&p, id, Family::Tpm2, key(1)).unwrap();
        s.save(b"perm", b"").unwrap();
        s.save(b"perm2", b"vol").unwrap();
        assert!(matches!(Store::create(&p, id, Family::Tpm2, key(1)), Err(StoreError::Exists(_))));
        let (s2, st) = Store::open(&p, id, Family::Tpm2, key(1)).unwrap();
        assert_eq!((s2.generation(), &st.permanent[..], &st.volatile[..]), (2, &b"perm2"[..], &b"vol"[..]));
        let before = fs::read(&p).unwrap();
        assert!(matches!(Store::open(&p, id, Family::Tpm2, key(2)), Err(StoreError::Open { .. })));
        assert!(matches!(Store::open(&p, id, Family::Tpm12, key(1)), Err(StoreError::FamilyMismatch { .. })));
        assert_eq!(fs::read(&p).unwrap(), before, "a failed open must not touch the file");
        // No temp files left behind.
        assert_eq!(fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }
}
