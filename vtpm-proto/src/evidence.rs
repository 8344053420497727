//! Deep-quote evidence: the Merkle leaf a vTPM's request becomes, and the
//! bundle a verifier receives. Both are byte-exact, versioned and
//! domain-separated; `docs/deep-quote.md` describes them byte for byte.
//!
//! All integers are big-endian (TPM byte order). Every decoder here checks a
//! length against its cap before allocating, rejects trailing bytes, and
//! accepts only what the matching encoder produces, so `decode(encode(x)) == x`
//! and `encode(decode(b)) == b` for every `b` that decodes.
//!
//! # Leaf (version 1)
//!
//! ```text
//! "xvtpm-deepquote-leaf-v1\0"       24  domain tag
//! version                           u16 = 1
//! vTPM UUID                         16  (RFC 4122 byte order)
//! group UUID                        16
//! vPCR bank hash algorithm          u16 TPM_ALG_ID (SHA1/SHA256/SHA384/SHA512)
//! vPCR count                        u8  ≤ 24
//! vPCR indices                      u8 × count, strictly ascending, each < 24
//! vPCR value count                  u16 = vPCR count
//! vPCR values                       (u16 len = digest size of the bank ‖ value) × count
//! nonce                             u16 len ≤ 64 ‖ bytes
//! flags                             u32 (opaque to this crate)
//! leaf index                        u32 < tree size
//! tree size                         u32 ≥ 1
//! ```
//!
//! The last two fields bind the leaf to its position in the batch. RFC 9162
//! inclusion verification binds the index but not the tree size (see
//! [`crate::merkle`]), and the TPM signs only the 32-byte root, so without them
//! the tree size in a bundle could be altered undetected.
//!
//! The Merkle leaf hash is `SHA-256(0x00 ‖ leaf encoding)`.

use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::merkle::{self, Hash};

/// Domain tag that starts every leaf encoding.
pub const LEAF_DOMAIN: &[u8; 24] = b"xvtpm-deepquote-leaf-v1\0";
/// Version of the leaf encoding.
pub const LEAF_VERSION: u16 = 1;
/// Magic that starts an encoded [`Bundle`].
pub const BUNDLE_MAGIC: &[u8; 4] = b"XVDQ";
/// Version of the bundle encoding.
pub const BUNDLE_VERSION: u16 = 1;
/// Longest caller nonce a leaf carries.
pub const MAX_NONCE: usize = 64;
/// vPCR indices are below this (the vTPM implements 24 PCRs).
pub const MAX_VPCR_INDEX: u8 = 24;
/// Longest leaf encoding (24 vPCRs of SHA-512 and a 64-byte nonce fit).
pub const MAX_LEAF_LEN: usize = 2048;
/// Longest inclusion path: the tree size is a `u32`.
pub const MAX_PATH_LEN: usize = 32;
/// Cap on each of the TPM blobs (TPMS_ATTEST, TPMT_SIGNATURE, TPMT_PUBLIC).
pub const MAX_TPM_BLOB: usize = 2048;
/// Cap on the number of banks in a TPML_PCR_SELECTION (TPM `HASH_COUNT`).
pub const MAX_PCR_BANKS: usize = 16;
/// Cap on `sizeofSelect` in a TPMS_PCR_SELECTION (32 PCRs).
pub const MAX_PCR_SELECT: usize = 4;
/// Cap on the number of host PCR values in a bundle.
pub const MAX_HOST_PCR_VALUES: usize = MAX_PCR_BANKS * MAX_PCR_SELECT * 8;

pub use tpm_wire::{
    TPM2_ALG_SHA1 as TPM_ALG_SHA1, TPM2_ALG_SHA256 as TPM_ALG_SHA256, TPM2_ALG_SHA384 as TPM_ALG_SHA384,
    TPM2_ALG_SHA512 as TPM_ALG_SHA512,
};

/// Digest size of a PCR bank's hash algorithm, if it is one this crate knows.
pub fn digest_size(alg: u16) -> Option<usize> {
    match alg {
        TPM_ALG_SHA1 => Some(20),
        TPM_ALG_SHA256 => Some(32),
        TPM_ALG_SHA384 => Some(48),
        TPM_ALG_SHA512 => Some(64),
        _ => None,
    }
}

/// Why evidence (or a TPM structure inside it) could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvidenceError {
    /// The input ended inside a field.
    #[error("{what}: truncated at offset {offset}: need {need} bytes, {have} left")]
    Truncated {
        /// Field being read.
        what: &'static str,
        /// Offset of the field.
        offset: usize,
        /// Bytes the field needs.
        need: usize,
        /// Bytes left in the input.
        have: usize,
    },
    /// A length or count is above its cap.
    #[error("{what}: {len} exceeds the maximum {max}")]
    TooLong {
        /// Field.
        what: &'static str,
        /// Length or count found.
        len: usize,
        /// Cap.
        max: usize,
    },
    /// Bytes follow the end of a structure.
    #[error("{what}: {count} trailing bytes")]
    TrailingBytes {
        /// Structure.
        what: &'static str,
        /// Number of extra bytes.
        count: usize,
    },
    /// The bundle does not start with "XVDQ".
    #[error("bundle magic is {got:02x?}, expected \"XVDQ\"")]
    BadMagic {
        /// The four bytes found.
        got: [u8; 4],
    },
    /// The leaf does not start with its domain tag.
    #[error("leaf domain tag mismatch")]
    BadDomainTag,
    /// A version this code does not speak.
    #[error("{what}: unsupported version {got}")]
    UnsupportedVersion {
        /// Which version field.
        what: &'static str,
        /// Version found.
        got: u16,
    },
    /// A PCR bank hash algorithm this crate does not know.
    #[error("{what}: unknown hash algorithm {alg:#06x}")]
    UnknownHashAlg {
        /// Field.
        what: &'static str,
        /// TPM_ALG_ID found.
        alg: u16,
    },
    /// vPCR indices must be strictly ascending and below 24.
    #[error("vPCR index {index} at position {position} is out of range or not ascending")]
    VpcrIndex {
        /// Offending index.
        index: u8,
        /// Its position in the selection.
        position: usize,
    },
    /// Two counts that must agree do not.
    #[error("{what}: expected {expected}, got {got}")]
    CountMismatch {
        /// What is counted.
        what: &'static str,
        /// Count required.
        expected: usize,
        /// Count found.
        got: usize,
    },
    /// A digest has the wrong size for its bank.
    #[error("{what} #{position}: length {got}, the bank's digest size is {expected}")]
    ValueLength {
        /// Field.
        what: &'static str,
        /// Position of the value.
        position: usize,
        /// Digest size of the bank.
        expected: usize,
        /// Length found.
        got: usize,
    },
    /// The leaf's position is not inside its tree.
    #[error("leaf index {index} is not below tree size {size}")]
    Position {
        /// Leaf index.
        index: u32,
        /// Tree size.
        size: u32,
    },
    /// A field holds a value this code does not accept.
    #[error("{what}: invalid value {value:#x}")]
    InvalidValue {
        /// Field.
        what: &'static str,
        /// Value found.
        value: u64,
    },
}

/// Bounds-checked big-endian reader over untrusted bytes.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Takes `n` bytes.
    pub fn bytes(
        &mut self,
        n: usize,
        what: &'static str,
    ) -> Result<&'a [u8], EvidenceError> {
        let have = self.buf.len() - self.pos;
        if n > have {
            return Err(EvidenceError::Truncated {
                what,
                offset: self.pos,
                need: n,
                have,
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    /// Takes `N` bytes as an array.
    pub fn array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], EvidenceError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N, what)?);
        Ok(a)
    }

    /// Takes a byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, EvidenceError> {
        Ok(self.array::<1>(what)?[0])
    }

    /// Takes a big-endian u16.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, EvidenceError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    /// Takes a big-endian u32.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, EvidenceError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    /// Takes a big-endian u64.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, EvidenceError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// A `u16`-length-prefixed field (a TPM2B), length checked against `max` first.
    /// Takes a u16-length-prefixed field of at most `max` bytes.
    pub fn sized16(
        &mut self,
        what: &'static str,
        max: usize,
    ) -> Result<&'a [u8], EvidenceError> {
        let len = usize::from(self.u16(what)?);
        if len > max {
            return Err(EvidenceError::TooLong { what, len, max });
        }
        self.bytes(len, what)
    }

    /// Fails if bytes are left over.
    pub fn finish(&self, what: &'static str) -> Result<(), EvidenceError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            count => Err(EvidenceError::TrailingBytes { what, count }),
        }
    }
}

fn put_sized16(
    out: &mut Vec<u8>,
    what: &'static str,
    data: &[u8],
    max: usize,
) -> Result<(), EvidenceError> {
    if data.len() > max {
        return Err(EvidenceError::TooLong {
            what,
            len: data.len(),
            max,
        });
    }
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
    Ok(())
}

/// Which vPCRs of which bank a leaf carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VpcrSelection {
    /// TPM_ALG_ID of the vPCR bank (SHA1, SHA256, SHA384 or SHA512).
    pub hash_alg: u16,
    /// PCR indices, strictly ascending, each below [`MAX_VPCR_INDEX`].
    pub pcrs: Vec<u8>,
}

/// Where a leaf sits in its batch's tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeafPosition {
    /// Index of the leaf, `< tree_size`.
    pub leaf_index: u32,
    /// Number of leaves in the tree, `≥ 1`.
    pub tree_size: u32,
}

/// One deep-quote request as it enters the Merkle tree.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Leaf {
    /// UUID of the requesting vTPM (as the manager knows it, never self-asserted).
    pub vtpm_uuid: Uuid,
    /// UUID of the vTPM's group.
    pub group_uuid: Uuid,
    /// The vPCRs whose values follow.
    pub vpcr_selection: VpcrSelection,
    /// One value per selected vPCR, in selection order.
    pub vpcr_values: Vec<Vec<u8>>,
    /// Caller nonce, at most [`MAX_NONCE`] bytes.
    pub nonce: Vec<u8>,
    /// Request flags, carried and bound but not interpreted here.
    pub flags: u32,
    /// Position in the batch.
    pub position: LeafPosition,
}

impl Leaf {
    /// Checks every invariant the encoding requires.
    pub fn validate(&self) -> Result<(), EvidenceError> {
        let sel = &self.vpcr_selection;
        let size = digest_size(sel.hash_alg).ok_or(EvidenceError::UnknownHashAlg {
            what: "vPCR bank",
            alg: sel.hash_alg,
        })?;
        if sel.pcrs.len() > usize::from(MAX_VPCR_INDEX) {
            return Err(EvidenceError::TooLong {
                what: "vPCR count",
                len: sel.pcrs.len(),
                max: MAX_VPCR_INDEX.into(),
            });
        }
        let mut prev: Option<u8> = None;
        for (position, &index) in sel.pcrs.iter().enumerate() {
            if index >= MAX_VPCR_INDEX || prev.is_some_and(|p| index <= p) {
                return Err(EvidenceError::VpcrIndex { index, position });
            }
            prev = Some(index);
        }
        if self.vpcr_values.len() != sel.pcrs.len() {
            return Err(EvidenceError::CountMismatch {
                what: "vPCR values",
                expected: sel.pcrs.len(),
                got: self.vpcr_values.len(),
            });
        }
        for (position, v) in self.vpcr_values.iter().enumerate() {
            if v.len() != size {
                return Err(EvidenceError::ValueLength {
                    what: "vPCR value",
                    position,
                    expected: size,
                    got: v.len(),
                });
            }
        }
        if self.nonce.len() > MAX_NONCE {
            return Err(EvidenceError::TooLong {
                what: "nonce",
                len: self.nonce.len(),
                max: MAX_NONCE,
            });
        }
        let LeafPosition {
            leaf_index,
            tree_size,
        } = self.position;
        if leaf_index >= tree_size {
            return Err(EvidenceError::Position {
                index: leaf_index,
                size: tree_size,
            });
        }
        Ok(())
    }

    /// The leaf encoding (the Merkle leaf *data*).
    pub fn encode(&self) -> Result<Vec<u8>, EvidenceError> {
        self.validate()?;
        let mut out =
            Vec::with_capacity(128 + self.vpcr_values.iter().map(|v| v.len() + 2).sum::<usize>());
        out.extend_from_slice(LEAF_DOMAIN);
        out.extend_from_slice(&LEAF_VERSION.to_be_bytes());
        out.extend_from_slice(self.vtpm_uuid.as_bytes());
        out.extend_from_slice(self.group_uuid.as_bytes());
        out.extend_from_slice(&self.vpcr_selection.hash_alg.to_be_bytes());
        out.push(self.vpcr_selection.pcrs.len() as u8);
        out.extend_from_slice(&self.vpcr_selection.pcrs);
        out.extend_from_slice(&(self.vpcr_values.len() as u16).to_be_bytes());
        for v in &self.vpcr_values {
            put_sized16(&mut out, "vPCR value", v, 64)?;
        }
        put_sized16(&mut out, "nonce", &self.nonce, MAX_NONCE)?;
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.position.leaf_index.to_be_bytes());
        out.extend_from_slice(&self.position.tree_size.to_be_bytes());
        debug_assert!(out.len() <= MAX_LEAF_LEN);
        Ok(out)
    }

    /// The Merkle leaf hash, `SHA-256(0x00 ‖ encode())`.
    pub fn leaf_hash(&self) -> Result<Hash, EvidenceError> {
        Ok(merkle::leaf_hash(&self.encode()?))
    }

    /// Decodes a leaf encoding, accepting exactly what [`Leaf::encode`] produces.
    pub fn decode(bytes: &[u8]) -> Result<Leaf, EvidenceError> {
        if bytes.len() > MAX_LEAF_LEN {
            return Err(EvidenceError::TooLong {
                what: "leaf",
                len: bytes.len(),
                max: MAX_LEAF_LEN,
            });
        }
        let mut r = Reader::new(bytes);
        if r.bytes(LEAF_DOMAIN.len(), "leaf domain tag")? != LEAF_DOMAIN {
            return Err(EvidenceError::BadDomainTag);
        }
        let version = r.u16("leaf version")?;
        if version != LEAF_VERSION {
            return Err(EvidenceError::UnsupportedVersion {
                what: "leaf",
                got: version,
            });
        }
        let vtpm_uuid = Uuid::from_bytes(r.array("vTPM UUID")?);
        let group_uuid = Uuid::from_bytes(r.array("group UUID")?);
        let hash_alg = r.u16("vPCR bank")?;
        let size = digest_size(hash_alg).ok_or(EvidenceError::UnknownHashAlg {
            what: "vPCR bank",
            alg: hash_alg,
        })?;
        let count = usize::from(r.u8("vPCR count")?);
        if count > usize::from(MAX_VPCR_INDEX) {
            return Err(EvidenceError::TooLong {
                what: "vPCR count",
                len: count,
                max: MAX_VPCR_INDEX.into(),
            });
        }
        let pcrs = r.bytes(count, "vPCR indices")?.to_vec();
        let nvalues = usize::from(r.u16("vPCR value count")?);
        if nvalues != count {
            return Err(EvidenceError::CountMismatch {
                what: "vPCR values",
                expected: count,
                got: nvalues,
            });
        }
        let mut vpcr_values = Vec::with_capacity(count);
        for position in 0..count {
            let v = r.sized16("vPCR value", 64)?;
            if v.len() != size {
                return Err(EvidenceError::ValueLength {
                    what: "vPCR value",
                    position,
                    expected: size,
                    got: v.len(),
                });
            }
            vpcr_values.push(v.to_vec());
        }
        let nonce = r.sized16("nonce", MAX_NONCE)?.to_vec();
        let flags = r.u32("flags")?;
        let leaf_index = r.u32("leaf index")?;
        let tree_size = r.u32("tree size")?;
        r.finish("leaf")?;
        let leaf = Leaf {
            vtpm_uuid,
            group_uuid,
            vpcr_selection: VpcrSelection { hash_alg, pcrs },
            vpcr_values,
            nonce,
            flags,
            position: LeafPosition {
                leaf_index,
                tree_size,
            },
        };
        leaf.validate()?;
        Ok(leaf)
    }
}

/// One TPMS_PCR_SELECTION: a bank and a bitmap of PCRs (bit `i % 8` of byte
/// `i / 8` selects PCR `i`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PcrSelection {
    /// TPM_ALG_ID of the bank.
    pub hash_alg: u16,
    /// `pcrSelect[sizeofSelect]`, at most [`MAX_PCR_SELECT`] bytes.
    pub select: Vec<u8>,
}

impl PcrSelection {
    /// The selected PCR indices, ascending.
    pub fn indices(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.select.len() * 8)
            .filter(|i| self.select[i / 8] & (1 << (i % 8)) != 0)
            .map(|i| i as u32)
    }
}

/// Parses a TPML_PCR_SELECTION (`u32 count ‖ (u16 hash ‖ u8 sizeofSelect ‖ bitmap) × count`).
pub(crate) fn read_pcr_selection_list(
    r: &mut Reader<'_>,
) -> Result<Vec<PcrSelection>, EvidenceError> {
    let count = r.u32("TPML_PCR_SELECTION.count")? as usize;
    if count > MAX_PCR_BANKS {
        return Err(EvidenceError::TooLong {
            what: "TPML_PCR_SELECTION.count",
            len: count,
            max: MAX_PCR_BANKS,
        });
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let hash_alg = r.u16("TPMS_PCR_SELECTION.hash")?;
        let n = usize::from(r.u8("TPMS_PCR_SELECTION.sizeofSelect")?);
        if n > MAX_PCR_SELECT {
            return Err(EvidenceError::TooLong {
                what: "TPMS_PCR_SELECTION.sizeofSelect",
                len: n,
                max: MAX_PCR_SELECT,
            });
        }
        out.push(PcrSelection {
            hash_alg,
            select: r.bytes(n, "TPMS_PCR_SELECTION.pcrSelect")?.to_vec(),
        });
    }
    Ok(out)
}

/// Marshals a TPML_PCR_SELECTION.
pub fn encode_pcr_selection_list(list: &[PcrSelection]) -> Result<Vec<u8>, EvidenceError> {
    if list.len() > MAX_PCR_BANKS {
        return Err(EvidenceError::TooLong {
            what: "TPML_PCR_SELECTION.count",
            len: list.len(),
            max: MAX_PCR_BANKS,
        });
    }
    let mut out = Vec::with_capacity(4 + list.len() * (3 + MAX_PCR_SELECT));
    out.extend_from_slice(&(list.len() as u32).to_be_bytes());
    for s in list {
        if s.select.len() > MAX_PCR_SELECT {
            return Err(EvidenceError::TooLong {
                what: "TPMS_PCR_SELECTION.sizeofSelect",
                len: s.select.len(),
                max: MAX_PCR_SELECT,
            });
        }
        out.extend_from_slice(&s.hash_alg.to_be_bytes());
        out.push(s.select.len() as u8);
        out.extend_from_slice(&s.select);
    }
    Ok(out)
}

/// The host PCRs the physical quote covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPcrs {
    /// The selection, exactly as in the quote's TPMS_QUOTE_INFO.
    pub selection: Vec<PcrSelection>,
    /// The values, in selection order (banks in list order, PCRs ascending).
    pub values: Vec<Vec<u8>>,
}

/// Everything a verifier needs for one deep quote. The leaf's position
/// (index, tree size) is inside the leaf; `path` is the rest of the inclusion proof.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Bundle {
    /// The request, with its position in the tree.
    pub leaf: Leaf,
    /// RFC 6962 `PATH` from the leaf to the root, bottom-up.
    pub path: Vec<Hash>,
    /// TPMS_ATTEST exactly as signed (the contents of the TPM2B_ATTEST).
    pub attest: Vec<u8>,
    /// TPMT_SIGNATURE over `attest`.
    pub signature: Vec<u8>,
    /// The AK's TPMT_PUBLIC (the contents of TPM2B_PUBLIC, without its size).
    pub ak_public: Vec<u8>,
    /// Host PCR selection and values.
    pub host_pcrs: HostPcrs,
}

impl Bundle {
    /// Encodes the bundle:
    ///
    /// ```text
    /// "XVDQ" ‖ u16 version=1
    /// ‖ u16 len ‖ leaf encoding
    /// ‖ u8 n ‖ path[32] × n                 (n ≤ 32)
    /// ‖ u16 len ‖ TPMS_ATTEST               (≤ 2048)
    /// ‖ u16 len ‖ TPMT_SIGNATURE            (≤ 2048)
    /// ‖ u16 len ‖ TPMT_PUBLIC               (≤ 2048)
    /// ‖ TPML_PCR_SELECTION                  (≤ 16 banks, sizeofSelect ≤ 4)
    /// ‖ u16 n ‖ (u16 len ‖ value) × n       (n ≤ 512, len ≤ 64)
    /// ```
    pub fn encode(&self) -> Result<Vec<u8>, EvidenceError> {
        let leaf = self.leaf.encode()?;
        let mut out = Vec::with_capacity(
            16 + leaf.len()
                + self.path.len() * 32
                + self.attest.len()
                + self.signature.len()
                + self.ak_public.len()
                + 64 * self.host_pcrs.values.len(),
        );
        out.extend_from_slice(BUNDLE_MAGIC);
        out.extend_from_slice(&BUNDLE_VERSION.to_be_bytes());
        put_sized16(&mut out, "leaf", &leaf, MAX_LEAF_LEN)?;
        if self.path.len() > MAX_PATH_LEN {
            return Err(EvidenceError::TooLong {
                what: "inclusion path",
                len: self.path.len(),
                max: MAX_PATH_LEN,
            });
        }
        out.push(self.path.len() as u8);
        for h in &self.path {
            out.extend_from_slice(h);
        }
        put_sized16(&mut out, "TPMS_ATTEST", &self.attest, MAX_TPM_BLOB)?;
        put_sized16(&mut out, "TPMT_SIGNATURE", &self.signature, MAX_TPM_BLOB)?;
        put_sized16(&mut out, "TPMT_PUBLIC", &self.ak_public, MAX_TPM_BLOB)?;
        out.extend_from_slice(&encode_pcr_selection_list(&self.host_pcrs.selection)?);
        let values = &self.host_pcrs.values;
        if values.len() > MAX_HOST_PCR_VALUES {
            return Err(EvidenceError::TooLong {
                what: "host PCR value count",
                len: values.len(),
                max: MAX_HOST_PCR_VALUES,
            });
        }
        out.extend_from_slice(&(values.len() as u16).to_be_bytes());
        for v in values {
            put_sized16(&mut out, "host PCR value", v, 64)?;
        }
        Ok(out)
    }

    /// Decodes an encoded bundle. Never panics; every length is checked
    /// against its cap before anything is allocated.
    pub fn decode(bytes: &[u8]) -> Result<Bundle, EvidenceError> {
        let mut r = Reader::new(bytes);
        let magic: [u8; 4] = r.array("bundle magic")?;
        if &magic != BUNDLE_MAGIC {
            return Err(EvidenceError::BadMagic { got: magic });
        }
        let version = r.u16("bundle version")?;
        if version != BUNDLE_VERSION {
            return Err(EvidenceError::UnsupportedVersion {
                what: "bundle",
                got: version,
            });
        }
        let leaf = Leaf::decode(r.sized16("leaf", MAX_LEAF_LEN)?)?;
        let n = usize::from(r.u8("inclusion path length")?);
        if n > MAX_PATH_LEN {
            return Err(EvidenceError::TooLong {
                what: "inclusion path",
                len: n,
                max: MAX_PATH_LEN,
            });
        }
        let mut path = Vec::with_capacity(n);
        for _ in 0..n {
            path.push(r.array("inclusion path hash")?);
        }
        let attest = r.sized16("TPMS_ATTEST", MAX_TPM_BLOB)?.to_vec();
        let signature = r.sized16("TPMT_SIGNATURE", MAX_TPM_BLOB)?.to_vec();
        let ak_public = r.sized16("TPMT_PUBLIC", MAX_TPM_BLOB)?.to_vec();
        let selection = read_pcr_selection_list(&mut r)?;
        let nvalues = usize::from(r.u16("host PCR value count")?);
        if nvalues > MAX_HOST_PCR_VALUES {
            return Err(EvidenceError::TooLong {
                what: "host PCR value count",
                len: nvalues,
                max: MAX_HOST_PCR_VALUES,
            });
        }
        let mut values = Vec::with_capacity(nvalues);
        for _ in 0..nvalues {
            values.push(r.sized16("host PCR value", 64)?.to_vec());
        }
        r.finish("bundle")?;
        Ok(Bundle {
            leaf,
            path,
            attest,
            signature,
            ak_public,
            host_pcrs: HostPcrs { selection, values },
        })
    }
}

/// `SHA-256` of the concatenated values, as TPM2_Quote computes `pcrDigest`
/// with a SHA-256 signing scheme.
pub fn pcr_digest_sha256(values: &[Vec<u8>]) -> Hash {
    let mut h = Sha256::new();
    for v in values {
        h.update(v);
    }
    h.finalize().into()
}
