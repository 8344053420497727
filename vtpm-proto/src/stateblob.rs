//! Sealed TPM state blobs for the swtpm control channel's
//! `CMD_GET_STATEBLOB` / `CMD_SET_STATEBLOB` (QEMU `savevm`/`loadvm`, migration).
//!
//! A blob never leaves the vTPM as plaintext libtpms state: it is an
//! AES-256-GCM envelope under the vTPM's own state key (released only by the
//! manager), bound to the vTPM's UUID, the blob type and the state generation
//! it was taken at. Layout (integers big-endian; see docs/state-blobs.md):
//!
//! ```text
//! off  len  field
//!   0    4  magic "XVTB"
//!   4    2  format version (1)
//!   6    1  blob type (1 permanent, 2 volatile, 3 savestate: PTM_BLOB_TYPE_*)
//!   7    1  TPM family (1 = TPM 2.0, 2 = TPM 1.2)
//!   8   16  vTPM UUID
//!  24    8  state generation at export
//!  32   12  nonce (fresh random per blob)
//!  44    …  ciphertext ‖ 16-byte tag (the 44-byte header is the associated data)
//! ```
//!
//! The magic differs from the state file's ("XVTS"), so neither can be passed
//! off as the other although both use the same key.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::sealed::{KEY_LEN, MAX_BLOB, TAG_LEN};
use tpm_wire::Family;

/// Blob magic.
pub const MAGIC: &[u8; 4] = b"XVTB";
/// Current format version.
pub const VERSION: u16 = 1;
/// Header (associated data) length.
pub const HEADER_LEN: usize = 44;
/// Largest sealed blob accepted (checked before allocating).
pub const MAX_SEALED: usize = HEADER_LEN + MAX_BLOB + TAG_LEN;

/// `PTM_BLOB_TYPE_PERMANENT`.
pub const TYPE_PERMANENT: u8 = 1;
/// `PTM_BLOB_TYPE_VOLATILE`.
pub const TYPE_VOLATILE: u8 = 2;
/// `PTM_BLOB_TYPE_SAVESTATE`.
pub const TYPE_SAVESTATE: u8 = 3;

/// Why a blob was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    /// Not an xvtpm state blob, or an unknown version.
    #[error("not an xvtpm state blob (bad magic, version or length)")]
    NotABlob,
    /// A blob of another type than the one it is loaded as.
    #[error("blob is of type {found}, loaded as type {expected}")]
    WrongType {
        /// In the blob.
        found: u8,
        /// Requested by the client.
        expected: u8,
    },
    /// Another vTPM's (or another family's) blob.
    #[error("blob belongs to vTPM {found}, this is {expected}")]
    WrongVtpm {
        /// In the blob.
        found: Uuid,
        /// This vTPM.
        expected: Uuid,
    },
    /// Another TPM family.
    #[error("blob is for another TPM family")]
    WrongFamily,
    /// Edited, or sealed under another key.
    #[error("blob failed authentication (edited, or sealed by another vTPM key)")]
    Authentication,
}

fn family_byte(f: Family) -> u8 {
    match f {
        Family::Tpm2 => 1,
        Family::Tpm12 => 2,
    }
}

/// Seals `plain` as a blob of `kind` taken at `generation`.
pub fn seal(key: &[u8; KEY_LEN], uuid: &Uuid, family: Family, kind: u8, generation: u64, plain: &[u8], nonce: &[u8; 12]) -> Vec<u8> {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_be_bytes());
    h[6] = kind;
    h[7] = family_byte(family);
    h[8..24].copy_from_slice(uuid.as_bytes());
    h[24..32].copy_from_slice(&generation.to_be_bytes());
    h[32..44].copy_from_slice(nonce);
    let cipher = Aes256Gcm::new(&Key::<Aes256Gcm>::from(*key));
    let ct = cipher
        .encrypt(&Nonce::from(*nonce), Payload { msg: plain, aad: &h })
        .expect("AES-GCM encryption of an in-memory buffer cannot fail");
    let mut out = Vec::with_capacity(HEADER_LEN + ct.len());
    out.extend_from_slice(&h);
    out.extend_from_slice(&ct);
    out
}

/// Opens a blob of `kind` for vTPM `uuid`: the plaintext and the generation it was taken at.
pub fn open(key: &[u8; KEY_LEN], uuid: &Uuid, family: Family, kind: u8, bytes: &[u8]) -> Result<(u64, Zeroizing<Vec<u8>>), BlobError> {
    if bytes.len() < HEADER_LEN + TAG_LEN || bytes.len() > MAX_SEALED || &bytes[0..4] != MAGIC
        || u16::from_be_bytes([bytes[4], bytes[5]]) != VERSION
    {
        return Err(BlobError::NotABlob);
    }
    if bytes[6] != kind {
        return Err(BlobError::WrongType { found: bytes[6], expected: kind });
    }
    if bytes[7] != family_byte(family) {
        return Err(BlobError::WrongFamily);
    }
    let found = Uuid::from_bytes(bytes[8..24].try_into().expect("16 bytes"));
    if found != *uuid {
        return Err(BlobError::WrongVtpm { found, expected: *uuid });
    }
    let generation = u64::from_be_bytes(bytes[24..32].try_into().expect("8 bytes"));
    let (hdr, ct) = bytes.split_at(HEADER_LEN);
    let nonce = Nonce::from(<[u8; 12]>::try_from(&hdr[32..44]).expect("12 bytes"));
    let cipher = Aes256Gcm::new(&Key::<Aes256Gcm>::from(*key));
    let pt = cipher.decrypt(&nonce, Payload { msg: ct, aad: hdr }).map_err(|_| BlobError::Authentication)?;
    Ok((generation, Zeroizing::new(pt)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_binding() {
        let key = [7u8; KEY_LEN];
        let id = Uuid::from_u128(1);
        let b = seal(&key, &id, Family::Tpm2, TYPE_VOLATILE, 9, b"libtpms volatile", &[1; 12]);
        assert!(!b.windows(8).any(|w| w == b"volatile"), "plaintext leaked");
        let (g, pt) = open(&key, &id, Family::Tpm2, TYPE_VOLATILE, &b).unwrap();
        assert_eq!((g, &pt[..]), (9, &b"libtpms volatile"[..]));
        assert_eq!(open(&key, &id, Family::Tpm2, TYPE_PERMANENT, &b), Err(BlobError::WrongType { found: 2, expected: 1 }));
        assert_eq!(open(&key, &id, Family::Tpm12, TYPE_VOLATILE, &b), Err(BlobError::WrongFamily));
        let other = Uuid::from_u128(2);
        assert!(matches!(open(&key, &other, Family::Tpm2, TYPE_VOLATILE, &b), Err(BlobError::WrongVtpm { .. })));
        assert_eq!(open(&[8u8; KEY_LEN], &id, Family::Tpm2, TYPE_VOLATILE, &b), Err(BlobError::Authentication));
        for at in [25, 40, 50, b.len() - 1] {
            let mut t = b.clone();
            t[at] ^= 1;
            assert_eq!(open(&key, &id, Family::Tpm2, TYPE_VOLATILE, &t), Err(BlobError::Authentication), "flip at {at}");
        }
        assert_eq!(open(&key, &id, Family::Tpm2, TYPE_VOLATILE, &b[..50]), Err(BlobError::NotABlob));
        let mut file = b.clone();
        file[0..4].copy_from_slice(b"XVTS");
        assert_eq!(open(&key, &id, Family::Tpm2, TYPE_VOLATILE, &file), Err(BlobError::NotABlob));
    }
}
