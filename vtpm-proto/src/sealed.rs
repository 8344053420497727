//! The sealed vTPM state file.
//!
//! A vTPM's state (libtpms' permanent blob, optionally its volatile blob) is
//! stored as one AES-256-GCM envelope under the vTPM's own key, which only
//! the manager releases. Layout (all integers big-endian):
//!
//! ```text
//! off  len  field
//!   0    4  magic "XVTS"
//!   4    2  format version (1)
//!   6    1  TPM family (1 = TPM 2.0, 2 = TPM 1.2)
//!   7    1  reserved, 0
//!   8   16  vTPM UUID
//!  24    8  generation (incremented on every write)
//!  32   12  nonce (fresh random per write)
//!  44    …  ciphertext ‖ 16-byte tag
//! ```
//!
//! The 44-byte header is the AEAD's associated data, so a file renamed to
//! another vTPM (UUID), rolled back within a file (generation) or edited
//! anywhere fails authentication. The plaintext is
//! `u32 len ‖ permanent ‖ u32 len ‖ volatile` (volatile may be empty).
//!
//! Nonces are 96-bit random values supplied by the caller; with one key per
//! vTPM and at most a few million writes in its life the collision
//! probability stays far below 2^-32 (NIST SP 800-38D §8.3).

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use uuid::Uuid;
use zeroize::Zeroizing;

use tpm_wire::Family;

/// File magic.
pub const MAGIC: &[u8; 4] = b"XVTS";
/// Current format version.
pub const VERSION: u16 = 1;
/// Header (associated data) length.
pub const HEADER_LEN: usize = 44;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// Largest blob accepted in either plaintext field. libtpms' permanent state
/// is ~6–8 KiB and its volatile state ~9–11 KiB; 1 MiB bounds allocation from a
/// corrupted length field.
pub const MAX_BLOB: usize = 1 << 20;

/// The state key length (AES-256).
pub const KEY_LEN: usize = 32;

/// The decrypted contents of a state file.
pub struct State {
    /// TPM family.
    pub family: Family,
    /// Generation number of this write.
    pub generation: u64,
    /// libtpms permanent state.
    pub permanent: Zeroizing<Vec<u8>>,
    /// libtpms volatile state, possibly empty.
    pub volatile: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("family", &self.family)
            .field("generation", &self.generation)
            .field("permanent_len", &self.permanent.len())
            .field("volatile_len", &self.volatile.len())
            .finish()
    }
}

/// Why a state file could not be opened. None of these is ever "fixed" by
/// starting a fresh TPM: the caller must fail loudly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Shorter than header plus tag.
    #[error("state file is truncated: {len} bytes, at least {} needed", HEADER_LEN + TAG_LEN)]
    Truncated {
        /// Bytes present.
        len: usize,
    },
    /// Not an xvtpm state file.
    #[error("not an xvtpm state file (bad magic)")]
    BadMagic,
    /// A format this build does not read.
    #[error("state format version {0} is not supported (this build reads {VERSION})")]
    UnsupportedVersion(u16),
    /// Unknown family byte.
    #[error("unknown TPM family byte {0}")]
    BadFamily(u8),
    /// The file belongs to another vTPM.
    #[error("state file belongs to vTPM {found}, not {expected}")]
    WrongVtpm {
        /// UUID in the file.
        found: Uuid,
        /// UUID expected.
        expected: Uuid,
    },
    /// Authentication failed: the file was modified, or the key is wrong.
    #[error("state file failed authentication (modified, or sealed under another key)")]
    Authentication,
    /// The decrypted contents are inconsistent.
    #[error("state contents are malformed")]
    Malformed,
}

fn family_byte(f: Family) -> u8 {
    match f {
        Family::Tpm2 => 1,
        Family::Tpm12 => 2,
    }
}

fn header(family: Family, uuid: &Uuid, generation: u64, nonce: &[u8; 12]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_be_bytes());
    h[6] = family_byte(family);
    h[8..24].copy_from_slice(uuid.as_bytes());
    h[24..32].copy_from_slice(&generation.to_be_bytes());
    h[32..44].copy_from_slice(nonce);
    h
}

/// Seals `state` for vTPM `uuid` under `key` with the caller's fresh `nonce`.
pub fn seal(key: &[u8; KEY_LEN], uuid: &Uuid, state: &State, nonce: &[u8; 12]) -> Vec<u8> {
    let hdr = header(state.family, uuid, state.generation, nonce);
    let mut pt = Zeroizing::new(Vec::with_capacity(8 + state.permanent.len() + state.volatile.len()));
    pt.extend_from_slice(&(state.permanent.len() as u32).to_be_bytes());
    pt.extend_from_slice(&state.permanent);
    pt.extend_from_slice(&(state.volatile.len() as u32).to_be_bytes());
    pt.extend_from_slice(&state.volatile);
    let cipher = Aes256Gcm::new(&Key::<Aes256Gcm>::from(*key));
    let ct = cipher
        .encrypt(&Nonce::from(*nonce), Payload { msg: &pt, aad: &hdr })
        .expect("AES-GCM encryption of an in-memory buffer cannot fail");
    let mut out = Vec::with_capacity(HEADER_LEN + ct.len());
    out.extend_from_slice(&hdr);
    out.extend_from_slice(&ct);
    out
}

/// Domain separation of [`anchor_digest`].
const ANCHOR_CONTEXT: &[u8] = b"xvtpm/state-anchor/v1\0";

/// What the manager's anchor records of one state write besides its generation: SHA-256 over
/// the family, generation and both plaintext blobs. Two writes with the same generation but
/// different contents (a copy kept from an interrupted write, then a new write at the same
/// generation) have different digests, so the anchor tells them apart.
pub fn anchor_digest(family: Family, generation: u64, permanent: &[u8], volatile: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(ANCHOR_CONTEXT);
    h.update([family_byte(family)]);
    h.update(generation.to_be_bytes());
    h.update((permanent.len() as u64).to_be_bytes());
    h.update(permanent);
    h.update((volatile.len() as u64).to_be_bytes());
    h.update(volatile);
    h.finalize().into()
}

/// Reads the unauthenticated header fields (for diagnostics such as
/// `xl-vtpm vtpm show`); trust nothing in it until [`open`] succeeds.
pub fn peek(bytes: &[u8]) -> Result<(Family, Uuid, u64), OpenError> {
    if bytes.len() < HEADER_LEN + TAG_LEN {
        return Err(OpenError::Truncated { len: bytes.len() });
    }
    if &bytes[0..4] != MAGIC {
        return Err(OpenError::BadMagic);
    }
    let version = u16::from_be_bytes([bytes[4], bytes[5]]);
    if version != VERSION {
        return Err(OpenError::UnsupportedVersion(version));
    }
    let family = match bytes[6] {
        1 => Family::Tpm2,
        2 => Family::Tpm12,
        other => return Err(OpenError::BadFamily(other)),
    };
    let uuid = Uuid::from_bytes(bytes[8..24].try_into().expect("16 bytes"));
    let generation = u64::from_be_bytes(bytes[24..32].try_into().expect("8 bytes"));
    Ok((family, uuid, generation))
}

/// Opens a state file for vTPM `expected` under `key`.
pub fn open(key: &[u8; KEY_LEN], expected: &Uuid, bytes: &[u8]) -> Result<State, OpenError> {
    let (family, found, generation) = peek(bytes)?;
    if found != *expected {
        return Err(OpenError::WrongVtpm { found, expected: *expected });
    }
    let (hdr, ct) = bytes.split_at(HEADER_LEN);
    let nonce = Nonce::from(<[u8; 12]>::try_from(&hdr[32..44]).expect("12 bytes"));
    let cipher = Aes256Gcm::new(&Key::<Aes256Gcm>::from(*key));
    let pt = Zeroizing::new(
        cipher.decrypt(&nonce, Payload { msg: ct, aad: hdr }).map_err(|_| OpenError::Authentication)?,
    );
    let mut at = 0usize;
    let mut take = || -> Result<Zeroizing<Vec<u8>>, OpenError> {
        let len_bytes = pt.get(at..at + 4).ok_or(OpenError::Malformed)?;
        let n = u32::from_be_bytes(len_bytes.try_into().expect("4 bytes")) as usize;
        if n > MAX_BLOB {
            return Err(OpenError::Malformed);
        }
        let v = pt.get(at + 4..at + 4 + n).ok_or(OpenError::Malformed)?.to_vec();
        at += 4 + n;
        Ok(Zeroizing::new(v))
    };
    let permanent = take()?;
    let volatile = take()?;
    if at != pt.len() || permanent.is_empty() {
        return Err(OpenError::Malformed);
    }
    Ok(State { family, generation, permanent, volatile })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (State, Uuid, [u8; 32]) {
        let st = State {
            family: Family::Tpm2,
            generation: 7,
            permanent: Zeroizing::new(vec![1, 2, 3, 4, 5]),
            volatile: Zeroizing::new(vec![9; 100]),
        };
        (st, Uuid::from_u128(0x1234), [0x42; 32])
    }

    #[test]
    fn round_trip() {
        let (st, id, key) = sample();
        let f = seal(&key, &id, &st, &[7; 12]);
        let back = open(&key, &id, &f).unwrap();
        assert_eq!(back.generation, 7);
        assert_eq!(*back.permanent, *st.permanent);
        assert_eq!(*back.volatile, *st.volatile);
        assert_eq!(peek(&f).unwrap(), (Family::Tpm2, id, 7));
    }

    #[test]
    fn every_bit_flip_is_detected() {
        let (st, id, key) = sample();
        let f = seal(&key, &id, &st, &[7; 12]);
        for i in 0..f.len() {
            for bit in 0..8 {
                let mut g = f.clone();
                g[i] ^= 1 << bit;
                assert!(open(&key, &id, &g).is_err(), "flip at byte {i} bit {bit} accepted");
            }
        }
    }

    #[test]
    fn truncation_wrong_key_and_swap_are_named() {
        let (st, id, key) = sample();
        let f = seal(&key, &id, &st, &[7; 12]);
        for len in 0..f.len() {
            assert!(open(&key, &id, &f[..len]).is_err());
        }
        assert_eq!(open(&key, &id, &f[..10]).unwrap_err(), OpenError::Truncated { len: 10 });
        assert_eq!(open(&[0x43; 32], &id, &f).unwrap_err(), OpenError::Authentication);
        let other = Uuid::from_u128(0x5678);
        assert_eq!(
            open(&key, &other, &f).unwrap_err(),
            OpenError::WrongVtpm { found: id, expected: other }
        );
        let mut bad = f.clone();
        bad[0] = b'Y';
        assert_eq!(open(&key, &id, &bad).unwrap_err(), OpenError::BadMagic);
    }

    #[test]
    fn anchor_digest_binds_every_field() {
        let base = anchor_digest(Family::Tpm2, 7, b"perm", b"vol");
        assert_eq!(base, anchor_digest(Family::Tpm2, 7, b"perm", b"vol"));
        for other in [
            anchor_digest(Family::Tpm12, 7, b"perm", b"vol"),
            anchor_digest(Family::Tpm2, 8, b"perm", b"vol"),
            anchor_digest(Family::Tpm2, 7, b"perm2", b"vol"),
            anchor_digest(Family::Tpm2, 7, b"perm", b""),
            anchor_digest(Family::Tpm2, 7, b"permv", b"ol"),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn debug_does_not_print_state() {
        let (st, _, _) = sample();
        let s = format!("{st:?}");
        assert!(s.contains("permanent_len: 5") && !s.contains("[1, 2"));
    }
}
