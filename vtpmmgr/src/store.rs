//! The manager's persistent store: provisioning record, groups and vTPM
//! identities, one JSON document replaced atomically on every change.
//!
//! Nothing secret is in it: the master secret exists on disk only as a TPM
//! sealed object (its private part encrypted under the SRK), and the AK
//! private parts are likewise TPM-wrapped blobs. The file is still mode 0600.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::hwtpm::{AkRecord, ProvisionRecord};

/// Store format version.
pub const STORE_VERSION: u32 = 1;

/// A group and its attestation key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Group {
    /// Group UUID.
    pub uuid: Uuid,
    /// Unique name.
    pub name: String,
    /// The group's attestation key.
    pub ak: AkRecord,
}

/// A vTPM identity.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VtpmEntry {
    /// vTPM UUID.
    pub uuid: Uuid,
    /// Group UUID.
    pub group: Uuid,
    /// Creation time (seconds since the epoch).
    pub created: u64,
}

/// The whole store.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct Store {
    /// Format version.
    pub version: u32,
    /// Present once provisioned.
    pub provision: Option<ProvisionRecord>,
    /// Groups; the first one is the default group.
    pub groups: Vec<Group>,
    /// vTPM identities.
    pub vtpms: Vec<VtpmEntry>,
}

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// I/O.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file does not parse.
    #[error("manager store {path} is corrupt ({source}); it was left untouched — restore it from backup")]
    Corrupt {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: serde_json::Error,
    },
    /// A newer format.
    #[error("manager store {0} has format version {1}; this vtpmmgr reads {STORE_VERSION}")]
    Version(PathBuf, u32),
}

impl Store {
    /// Loads the store, or an empty one if the file does not exist.
    pub fn load(path: &Path) -> Result<Store, StoreError> {
        xvtpm_fsutil::remove_stale_temps(path);
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Store { version: STORE_VERSION, ..Default::default() });
            }
            Err(source) => return Err(StoreError::Io { what: "reading", path: path.into(), source }),
        };
        let s: Store = serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt { path: path.into(), source })?;
        if s.version != STORE_VERSION {
            return Err(StoreError::Version(path.into(), s.version));
        }
        Ok(s)
    }

    /// Writes the store atomically.
    pub fn save(&self, path: &Path) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(self).expect("the store always serialises");
        xvtpm_fsutil::write_atomic(path, &bytes, 0o600).map_err(|source| StoreError::Io { what: "writing", path: path.into(), source })
    }

    /// Finds a group by UUID or name.
    pub fn group(&self, key: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.name == key || g.uuid.to_string() == key)
    }

    /// Finds a vTPM.
    pub fn vtpm(&self, uuid: &Uuid) -> Option<&VtpmEntry> {
        self.vtpms.iter().find(|v| v.uuid == *uuid)
    }
}
