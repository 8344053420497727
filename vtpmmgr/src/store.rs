//! The manager's persistent store: provisioning record, groups, vTPM identities and
//! the store's rollback counter, one JSON document replaced atomically on every change.
//!
//! Nothing secret is in it: the master secret exists on disk only as a TPM
//! sealed object (its private part encrypted under the SRK), and the AK
//! private parts are likewise TPM-wrapped blobs. The file is still mode 0600.
//!
//! **Integrity** (format 2): the document carries `mac`, HMAC-SHA256 under a key derived
//! from the master secret ([`StoreKeys`]) over the rest of the document, so nobody who
//! cannot unseal the master secret can edit it — in particular not the counter value it
//! records. The MAC covers the document's meaning, not its bytes: it is computed over the
//! compact JSON serialisation of [`Store`] (fixed field order, no maps), so re-formatting
//! the file does not break it, but changing, adding or removing any field the manager reads
//! does. **Freshness** is the rollback counter's job ([`crate::rollback`]).
//!
//! Format 1 (before the rollback counter) had neither `counter` nor `mac`; it is read once,
//! to migrate it ([`crate::rollback`]).

use std::path::{Path, PathBuf};

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::hwtpm::{AkRecord, CaKeyRecord, MasterSecret, ProvisionRecord};

/// Store format version written by this code.
pub const STORE_VERSION: u32 = 2;
/// The format before the rollback counter: no counter, no MAC. Read only to migrate it.
pub const STORE_VERSION_UNPROTECTED: u32 = 1;

/// Domain separation of the store MAC.
const MAC_CONTEXT: &[u8] = b"xvtpm/manager-store/v2\0";

/// A group and its attestation key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Group {
    /// Group UUID.
    pub uuid: Uuid,
    /// Unique name.
    pub name: String,
    /// The group's attestation key.
    pub ak: AkRecord,
    /// The group's EK CA (made at provisioning / group creation; stores written before EK
    /// certificates existed get it on first use). Absent from the JSON while `None`, so older
    /// stores keep their MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<GroupCa>,
}

/// A group's EK CA: a signing key in the physical TPM, its self-signed certificate, and the
/// group AK's `TPM2_Certify` of the key (qualifyingData = SHA-256 of the certificate).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupCa {
    /// The key (TPM-wrapped).
    pub key: CaKeyRecord,
    /// The CA certificate, DER, hex in JSON.
    #[serde(with = "hexbytes")]
    pub cert: Vec<u8>,
    /// TPMS_ATTEST of the AK's TPM2_Certify of the key.
    #[serde(with = "hexbytes")]
    pub certify_attest: Vec<u8>,
    /// The AK's TPMT_SIGNATURE over `certify_attest`.
    #[serde(with = "hexbytes")]
    pub certify_signature: Vec<u8>,
}

/// The EK a vTPM identity was certified for: the manager certifies one EK per identity.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EkBinding {
    /// SHA-256 of the EK's TPMT_PUBLIC, hex.
    pub ek_sha256: String,
    /// Serial of the first certificate issued, hex.
    pub serial: String,
    /// When it was issued (seconds since the epoch).
    pub issued: u64,
}

mod hexbytes {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        hex::decode(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
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
    /// The EK certified for this vTPM (absent until its first EK certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ek: Option<EkBinding>,
    /// The newest state the vTPM anchored (absent until its first `AnchorState`; stores
    /// written before state anchors have none, and keep their MAC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<StateAnchor>,
}

/// A vTPM's state anchor: the generation of its newest state write and that write's
/// `vtpm_proto::sealed::anchor_digest`. The manager refuses a state whose generation is lower,
/// or equal with another digest ([`crate::anchor`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StateAnchor {
    /// State generation.
    pub generation: u64,
    /// Its digest, hex.
    pub digest: String,
    /// Set when an administrator accepted this (older) state: the newest generation of the
    /// abandoned states. Generations above `generation` up to this one are refused; the vTPM's
    /// next write skips above it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<u64>,
}

/// Which NV counter covers the store, and which of its values this copy of the store is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct CounterRecord {
    /// TPM handle of the NV counter index (JSON: `"0x01805600"`).
    #[serde(with = "hexhandle")]
    pub nv_index: u32,
    /// The counter's value right after the increment that preceded this write.
    pub value: u64,
}

mod hexhandle {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:#010x}"))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let s = String::deserialize(d)?;
        let hex = s.strip_prefix("0x").ok_or_else(|| serde::de::Error::custom("NV index: expected 0x…"))?;
        u32::from_str_radix(hex, 16).map_err(serde::de::Error::custom)
    }
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
    /// The rollback counter (format 2; set by [`crate::rollback`] on every write).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter: Option<CounterRecord>,
    /// Transfers of vTPMs to and from other managers ([`crate::manager::transfer`]); absent from
    /// the JSON while empty, so older stores keep their MAC.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transfers: Vec<TransferRecord>,
    /// Transfer offers this manager made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offers: Vec<OfferRecord>,
}

/// The file: the store plus its MAC.
#[derive(Serialize, Deserialize)]
struct OnDisk {
    #[serde(flatten)]
    store: Store,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac: Option<String>,
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
    /// A format this code does not read.
    #[error("manager store {0} has format version {1}; this vtpmmgr reads {STORE_VERSION_UNPROTECTED} and {STORE_VERSION}")]
    Version(PathBuf, u32),
    /// The MAC does not verify.
    #[error("manager store {path} fails its integrity check ({why}): it was edited or damaged after the manager wrote it, or it belongs to another provisioning; it was left untouched — restore the newest copy from backup")]
    Tampered {
        /// Path.
        path: PathBuf,
        /// What is wrong.
        why: &'static str,
    },
}

/// The keys the manager derives from its master secret for its store: the store MAC key
/// and the rollback counter's authorisation value. Zeroed on drop, redacted in `Debug`.
pub struct StoreKeys {
    mac: Zeroizing<[u8; 32]>,
    nv_auth: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for StoreKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKeys([REDACTED])")
    }
}

fn hkdf32(master: &MasterSecret, salt: &[u8]) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(Some(salt), &master[..]);
    let mut okm = Zeroizing::new([0u8; 32]);
    hk.expand(b"", okm.as_mut()).expect("32 bytes is a valid HKDF-SHA256 output length");
    okm
}

impl StoreKeys {
    /// `mac = HKDF-SHA256(master, salt "xvtpm/store-mac/v1")`,
    /// `nv_auth = HKDF-SHA256(master, salt "xvtpm/store-counter-auth/v1")` (state keys use
    /// salt "xvtpm/state-key/v1", so none of these can equal another).
    pub fn derive(master: &MasterSecret) -> StoreKeys {
        StoreKeys { mac: hkdf32(master, b"xvtpm/store-mac/v1"), nv_auth: hkdf32(master, b"xvtpm/store-counter-auth/v1") }
    }

    /// The rollback counter's authorisation value.
    pub fn nv_auth(&self) -> &[u8] {
        &self.nv_auth[..]
    }

    fn mac(&self, store: &Store) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.mac[..]).expect("HMAC takes any key length");
        m.update(MAC_CONTEXT);
        m.update(&serde_json::to_vec(store).expect("the store always serialises"));
        m
    }
}

/// A store as read from disk, not yet authenticated.
#[derive(Debug)]
pub struct Unverified {
    store: Store,
    mac: Option<String>,
    path: PathBuf,
}

impl Unverified {
    /// The format version the file claims.
    pub fn version(&self) -> u32 {
        self.store.version
    }

    /// The provisioning record (needed to unseal the master secret, which the MAC check
    /// needs; an edited record simply does not unseal, or unseals nothing that verifies).
    pub fn provision(&self) -> Option<&ProvisionRecord> {
        self.store.provision.as_ref()
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks the MAC (format 2).
    pub fn verify(self, keys: &StoreKeys) -> Result<Store, StoreError> {
        let tampered = |why| StoreError::Tampered { path: self.path.clone(), why };
        if self.store.version != STORE_VERSION {
            return Err(tampered("it is not a format-2 store"));
        }
        let mac = self.mac.as_deref().ok_or_else(|| tampered("it has no mac"))?;
        let mac = hex::decode(mac).map_err(|_| tampered("its mac is not hex"))?;
        keys.mac(&self.store).verify_slice(&mac).map_err(|_| tampered("HMAC-SHA256 under the master secret does not match"))?;
        if self.store.counter.is_none() {
            return Err(tampered("it records no rollback counter"));
        }
        Ok(self.store)
    }

    /// A format-1 store as it is (it has no MAC: the caller migrates it).
    pub fn unprotected(self) -> Option<Store> {
        (self.store.version == STORE_VERSION_UNPROTECTED).then_some(self.store)
    }
}

/// Reads the store at `path`; `None` if there is no file.
pub fn read(path: &Path) -> Result<Option<Unverified>, StoreError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StoreError::Io { what: "reading", path: path.into(), source }),
    };
    let d: OnDisk = serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt { path: path.into(), source })?;
    if d.store.version != STORE_VERSION && d.store.version != STORE_VERSION_UNPROTECTED {
        return Err(StoreError::Version(path.into(), d.store.version));
    }
    Ok(Some(Unverified { store: d.store, mac: d.mac, path: path.into() }))
}

/// The file contents of `store` (format 2) with its MAC.
pub fn encode(store: &Store, keys: &StoreKeys) -> Vec<u8> {
    let mac = hex::encode(keys.mac(store).finalize().into_bytes());
    serde_json::to_vec_pretty(&OnDisk { store: store.clone(), mac: Some(mac) }).expect("the store always serialises")
}

impl Store {
    /// An empty (unprovisioned) store.
    pub fn empty() -> Store {
        Store { version: STORE_VERSION, ..Default::default() }
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

// ---------------------------------------------------------------------------------------------
// Transfer records (written by `manager::transfer`)
// ---------------------------------------------------------------------------------------------

/// A vTPM's transfer history on this manager.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TransferRecord {
    /// The vTPM.
    pub uuid: Uuid,
    /// Transfer generation: how many times the identity moved (0 = never).
    pub generation: u64,
    /// The state key the vTPM brought (it cannot be derived here), wrapped under this
    /// manager's master secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported_key: Option<WrappedKey>,
    /// Where it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import: Option<ImportRecord>,
    /// Where it is going or went: the vTPM does not run here while this is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outgoing: Option<Outgoing>,
}

/// A state key wrapped under the master secret (AES-256-GCM, AAD = the vTPM UUID).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WrappedKey {
    /// Nonce, hex.
    pub nonce: String,
    /// Ciphertext and tag, hex.
    pub ciphertext: String,
}

/// How an imported vTPM arrived.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImportRecord {
    /// The offer it was sealed to.
    pub offer_id: Uuid,
    /// The export.
    pub export_id: Uuid,
    /// The source host's id.
    pub from_host: String,
    /// When (seconds since the epoch).
    pub at: u64,
}

/// The state of an outgoing transfer.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OutgoingState {
    /// A package may have left; the vTPM is not runnable here.
    Exporting,
    /// The destination confirmed the import; this copy is retired for good.
    Retired,
}

/// An outgoing transfer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Outgoing {
    /// Exporting or retired.
    pub state: OutgoingState,
    /// The destination's offer.
    pub offer_id: Uuid,
    /// This export.
    pub export_id: Uuid,
    /// The package's transfer generation.
    pub generation: u64,
    /// The destination's host id.
    pub dest_host: String,
    /// The destination's name as the administrator gave it.
    pub destination: String,
    /// The destination group's AK (`TPMT_PUBLIC`, hex): receipts must verify under it.
    pub dest_ak_public: String,
    /// When the export started.
    pub at: u64,
}

/// A transfer key this manager offered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OfferRecord {
    /// The offer.
    pub offer_id: Uuid,
    /// The vTPM it is for.
    pub vtpm: Uuid,
    /// The group the vTPM will join.
    pub group: Uuid,
    /// The key (TPM-wrapped); `None` once withdrawn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<KeyRecord>,
    /// When it was made.
    pub created: u64,
}

/// A TPM key as blobs (private part encrypted under the SRK).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyRecord {
    /// `TPMT_PUBLIC`, hex.
    pub public: String,
    /// `TPM2B_PRIVATE` contents, hex.
    pub private: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hwtpm::Secret;

    fn keys(b: u8) -> StoreKeys {
        StoreKeys::derive(&Secret::new([b; 32]))
    }

    fn sample() -> Store {
        Store {
            version: STORE_VERSION,
            provision: None,
            groups: vec![],
            vtpms: vec![VtpmEntry { uuid: Uuid::from_u128(7), group: Uuid::from_u128(1), created: 5, ek: None, state: None }],
            counter: Some(CounterRecord { nv_index: 0x0180_5600, value: 42 }),
            ..Store::default()
        }
    }

    fn roundtrip(bytes: &[u8], k: &StoreKeys) -> Result<Store, StoreError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("manager.json");
        std::fs::write(&p, bytes).unwrap();
        read(&p).unwrap().unwrap().verify(k)
    }

    #[test]
    fn mac_verifies_and_binds_every_field() {
        let k = keys(1);
        let bytes = encode(&sample(), &k);
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains("\"nv_index\": \"0x01805600\""), "{text}");
        assert_eq!(roundtrip(&bytes, &k).unwrap(), sample());
        // Re-formatting keeps the meaning, so the MAC still holds.
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(roundtrip(&serde_json::to_vec(&v).unwrap(), &k).unwrap(), sample());
        // Another master secret, an edited counter, an added vTPM: refused.
        assert!(matches!(roundtrip(&bytes, &keys(2)), Err(StoreError::Tampered { .. })));
        let edited = text.replace("\"value\": 42", "\"value\": 43");
        assert_ne!(edited, text);
        assert!(matches!(roundtrip(edited.as_bytes(), &k), Err(StoreError::Tampered { .. })));
        let mut more = v.clone();
        let first = more["vtpms"][0].clone();
        more["vtpms"].as_array_mut().unwrap().push(first);
        assert!(matches!(roundtrip(&serde_json::to_vec(&more).unwrap(), &k), Err(StoreError::Tampered { .. })));
        let mut nomac = v;
        nomac.as_object_mut().unwrap().remove("mac");
        assert!(matches!(roundtrip(&serde_json::to_vec(&nomac).unwrap(), &k), Err(StoreError::Tampered { .. })));
    }

    /// Stores written before EK certificates (no `ca`, no `ek`) keep verifying: the new fields
    /// are absent from the JSON, and so from the MAC, while unset.
    #[test]
    fn optional_ek_fields_keep_old_macs() {
        let k = keys(4);
        let bytes = encode(&sample(), &k);
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(!text.contains("\"ek\"") && !text.contains("\"ca\"") && !text.contains("\"state\""), "{text}");
        let mut with = sample();
        with.vtpms[0].ek = Some(EkBinding { ek_sha256: "ab".into(), serial: "01".into(), issued: 9 });
        assert_eq!(roundtrip(&encode(&with, &k), &k).unwrap(), with);
        with.vtpms[0].state = Some(StateAnchor { generation: 3, digest: "cd".into(), fence: None });
        assert_eq!(roundtrip(&encode(&with, &k), &k).unwrap(), with);
        // Dropping the binding from the file is an edit the MAC catches.
        let mut v: serde_json::Value = serde_json::from_slice(&encode(&with, &k)).unwrap();
        v["vtpms"][0].as_object_mut().unwrap().remove("ek");
        assert!(matches!(roundtrip(&serde_json::to_vec(&v).unwrap(), &k), Err(StoreError::Tampered { .. })));
    }

    #[test]
    fn keys_are_distinct_and_redacted() {
        let k = keys(3);
        assert_ne!(&k.mac[..], k.nv_auth());
        assert_eq!(format!("{k:?}"), "StoreKeys([REDACTED])");
    }
}
