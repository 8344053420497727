//! Deep-quote verifier: recomputes every hash of a [`Bundle`] and checks the
//! physical TPM's signature, in pure Rust (rsa, p256, sha2).
//!
//! The TPM structures (TPMT_PUBLIC, TPMT_SIGNATURE, TPMS_ATTEST) are parsed by
//! `vtpm_proto::tpms`. Checks run in this order and each failure has its own
//! [`VerifyError`] (or [`TpmsError`]) variant:
//!
//! 1. the bundle's AK public area equals the expected one, byte for byte;
//! 2. the AK parses and is a restricted, fixedTPM signing key of a supported type;
//! 3. the signature parses, its scheme fits the key, and it verifies over the
//!    TPMS_ATTEST bytes (nothing inside the attest is believed before this);
//! 4. TPMS_ATTEST parses: magic `TPM_GENERATED`, type `TPM_ST_ATTEST_QUOTE`;
//! 5. the leaf is re-encoded from its fields, hashed, and walked up the
//!    inclusion path; the root must equal `extraData` (32 bytes);
//! 6. the quote's PCR selection equals the bundle's, and `pcrDigest` equals
//!    SHA-256 of the bundle's host PCR values in selection order;
//! 7. the leaf's nonce equals the expected nonce;
//! 8. optional expectations: vTPM UUID, group UUID, flags, host-PCR policy,
//!    vPCR policy.

use std::collections::BTreeMap;

use uuid::Uuid;

use vtpm_proto::evidence::{
    Bundle, EvidenceError, HostPcrs, Leaf, PcrSelection, digest_size,
    pcr_digest_sha256,
};
use vtpm_proto::merkle::{self, Hash, MerkleError};

pub use vtpm_proto::tpms::{AkPublic, QuoteAttest, TpmSignature, TpmsError};

/// What the verifier requires of a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectations {
    /// The nonce the verifier sent (must equal the leaf's nonce).
    pub nonce: Vec<u8>,
    /// The manager AK's TPMT_PUBLIC, obtained out of band (must equal the bundle's).
    pub ak_public: Vec<u8>,
    /// Required host PCR values.
    pub host_pcrs: Option<PcrPolicy>,
    /// Required vPCR values.
    pub vpcrs: Option<PcrPolicy>,
    /// Required vTPM UUID.
    pub vtpm_uuid: Option<Uuid>,
    /// Required group UUID.
    pub group_uuid: Option<Uuid>,
    /// Required request flags.
    pub flags: Option<u32>,
}

impl Expectations {
    /// Expectations with only the nonce and the AK; everything optional is unset.
    pub fn new(nonce: impl Into<Vec<u8>>, ak_public: impl Into<Vec<u8>>) -> Self {
        Expectations {
            nonce: nonce.into(),
            ak_public: ak_public.into(),
            host_pcrs: None,
            vpcrs: None,
            vtpm_uuid: None,
            group_uuid: None,
            flags: None,
        }
    }
}

/// Required PCR values in one bank: every listed PCR must be covered and equal.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PcrPolicy {
    /// TPM_ALG_ID of the bank.
    pub hash_alg: u16,
    /// PCR index → required value.
    pub values: BTreeMap<u32, Vec<u8>>,
}

/// What a successful verification established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The leaf (vTPM UUID, group, vPCRs, nonce, flags, position).
    pub leaf: Leaf,
    /// Its Merkle leaf hash.
    pub leaf_hash: Hash,
    /// The Merkle root the TPM signed.
    pub root: Hash,
    /// The AK.
    pub ak: AkPublic,
    /// The signed quote.
    pub attest: QuoteAttest,
    /// The host PCRs, now known to match `pcrDigest`.
    pub host_pcrs: HostPcrs,
}

fn hexs(b: &[u8]) -> String {
    hex::encode(b)
}

/// Why a bundle was rejected. Each check has its own variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The bundle's AK public area differs from the expected one.
    #[error("AK public area differs from the expected AK")]
    AkMismatch,
    /// The AK, its signature or the TPMS_ATTEST is malformed, unsupported or does not verify.
    #[error(transparent)]
    Tpm(#[from] TpmsError),
    /// The leaf's fields violate the leaf format.
    #[error("leaf invalid: {0}")]
    Leaf(EvidenceError),
    /// The inclusion path does not fit the leaf's position.
    #[error("inclusion proof invalid: {0}")]
    Inclusion(MerkleError),
    /// The quote's extraData is not 32 bytes long.
    #[error("quote extraData is {got} bytes, a Merkle root is 32")]
    ExtraDataLength {
        /// Length found.
        got: usize,
    },
    /// The root recomputed from leaf and path differs from the quote's extraData.
    #[error("Merkle root {computed} recomputed from leaf and path differs from quoted extraData {quoted}", computed = hexs(.computed), quoted = hexs(.quoted))]
    RootMismatch {
        /// Root recomputed from the bundle.
        computed: Hash,
        /// Root in the signed quote.
        quoted: Hash,
    },
    /// The quote's PCR selection differs from the bundle's host PCR selection.
    #[error("quote PCR selection {quoted:?} differs from the bundle's {bundle:?}")]
    HostPcrSelectionMismatch {
        /// Selection in the signed quote.
        quoted: Vec<PcrSelection>,
        /// Selection in the bundle.
        bundle: Vec<PcrSelection>,
    },
    /// The bundle's host PCR values do not fit its selection.
    #[error("host PCR values invalid: {0}")]
    HostPcrValues(EvidenceError),
    /// SHA-256 of the host PCR values differs from the quote's pcrDigest.
    #[error("SHA-256 of host PCR values {computed} differs from quoted pcrDigest {quoted}", computed = hexs(.computed), quoted = hexs(.quoted))]
    PcrDigestMismatch {
        /// Digest of the bundle's values.
        computed: Hash,
        /// `pcrDigest` in the signed quote.
        quoted: Vec<u8>,
    },
    /// The leaf's nonce differs from the expected nonce.
    #[error("nonce {got} differs from the expected {expected}", got = hexs(.got), expected = hexs(.expected))]
    NonceMismatch {
        /// Nonce expected.
        expected: Vec<u8>,
        /// Nonce in the leaf.
        got: Vec<u8>,
    },
    /// The leaf is for another vTPM.
    #[error("vTPM UUID {got} differs from the expected {expected}")]
    VtpmUuidMismatch {
        /// UUID expected.
        expected: Uuid,
        /// UUID in the leaf.
        got: Uuid,
    },
    /// The leaf is for another group.
    #[error("group UUID {got} differs from the expected {expected}")]
    GroupUuidMismatch {
        /// UUID expected.
        expected: Uuid,
        /// UUID in the leaf.
        got: Uuid,
    },
    /// The leaf's flags differ from the expected flags.
    #[error("flags {got:#010x} differ from the expected {expected:#010x}")]
    FlagsMismatch {
        /// Flags expected.
        expected: u32,
        /// Flags in the leaf.
        got: u32,
    },
    /// A host PCR the policy names is not in the quote.
    #[error("host PCR {index} of bank {hash_alg:#06x} required by policy is not quoted")]
    HostPcrNotQuoted {
        /// Bank.
        hash_alg: u16,
        /// PCR index.
        index: u32,
    },
    /// A host PCR differs from the policy.
    #[error("host PCR {index} of bank {hash_alg:#06x} is {got}, policy requires {expected}", got = hexs(.got), expected = hexs(.expected))]
    HostPcrPolicy {
        /// Bank.
        hash_alg: u16,
        /// PCR index.
        index: u32,
        /// Required value.
        expected: Vec<u8>,
        /// Quoted value.
        got: Vec<u8>,
    },
    /// The vPCR policy names another bank than the leaf's.
    #[error("vPCR policy is for bank {policy:#06x}, the leaf carries bank {leaf:#06x}")]
    VpcrBank {
        /// Bank of the policy.
        policy: u16,
        /// Bank of the leaf.
        leaf: u16,
    },
    /// A vPCR the policy names is not in the leaf.
    #[error("vPCR {index} required by policy is not in the leaf")]
    VpcrNotSelected {
        /// vPCR index.
        index: u32,
    },
    /// A vPCR differs from the policy.
    #[error("vPCR {index} is {got}, policy requires {expected}", got = hexs(.got), expected = hexs(.expected))]
    VpcrPolicy {
        /// vPCR index.
        index: u32,
        /// Required value.
        expected: Vec<u8>,
        /// Value in the leaf.
        got: Vec<u8>,
    },
}


/// Checks that the host PCR values fit the selection (known banks, no bank
/// twice, one value of the bank's digest size per selected PCR).
fn check_host_values(host: &HostPcrs) -> Result<(), EvidenceError> {
    let mut expected_sizes = Vec::new();
    for (i, bank) in host.selection.iter().enumerate() {
        let size = digest_size(bank.hash_alg).ok_or(EvidenceError::UnknownHashAlg {
            what: "host PCR bank",
            alg: bank.hash_alg,
        })?;
        if host.selection[..i]
            .iter()
            .any(|b| b.hash_alg == bank.hash_alg)
        {
            return Err(EvidenceError::InvalidValue {
                what: "host PCR bank listed twice",
                value: bank.hash_alg.into(),
            });
        }
        expected_sizes.extend(bank.indices().map(|_| size));
    }
    if expected_sizes.len() != host.values.len() {
        return Err(EvidenceError::CountMismatch {
            what: "host PCR values",
            expected: expected_sizes.len(),
            got: host.values.len(),
        });
    }
    for (position, (v, &size)) in host.values.iter().zip(&expected_sizes).enumerate() {
        if v.len() != size {
            return Err(EvidenceError::ValueLength {
                what: "host PCR value",
                position,
                expected: size,
                got: v.len(),
            });
        }
    }
    Ok(())
}

/// The value of host PCR `index` in bank `hash_alg`, if quoted.
fn host_value(host: &HostPcrs, hash_alg: u16, index: u32) -> Option<&[u8]> {
    let mut pos = 0;
    for bank in &host.selection {
        for i in bank.indices() {
            if bank.hash_alg == hash_alg && i == index {
                return host.values.get(pos).map(Vec::as_slice);
            }
            pos += 1;
        }
    }
    None
}

/// Verifies a deep-quote bundle against the verifier's expectations.
pub fn verify(bundle: &Bundle, expected: &Expectations) -> Result<Verified, VerifyError> {
    // 1–3: the AK is the one we trust, and it signed these attest bytes.
    if bundle.ak_public != expected.ak_public {
        return Err(VerifyError::AkMismatch);
    }
    let ak = AkPublic::parse(&bundle.ak_public)?;
    let sig = TpmSignature::parse(&bundle.signature)?;
    ak.verify_signature(&bundle.attest, &sig)?;

    // 4: what was signed is a TPM-generated quote.
    let attest = QuoteAttest::parse(&bundle.attest)?;

    // 5: the leaf, recomputed from its fields, is under the signed root.
    let leaf_hash = bundle.leaf.leaf_hash().map_err(VerifyError::Leaf)?;
    let pos = bundle.leaf.position;
    let root = merkle::root_from_inclusion(
        &leaf_hash,
        pos.leaf_index.into(),
        pos.tree_size.into(),
        &bundle.path,
    )
    .map_err(VerifyError::Inclusion)?;
    let quoted: Hash =
        attest
            .extra_data
            .as_slice()
            .try_into()
            .map_err(|_| VerifyError::ExtraDataLength {
                got: attest.extra_data.len(),
            })?;
    if root != quoted {
        return Err(VerifyError::RootMismatch {
            computed: root,
            quoted,
        });
    }

    // 6: the host PCR values are the quoted ones.
    if attest.pcr_select != bundle.host_pcrs.selection {
        return Err(VerifyError::HostPcrSelectionMismatch {
            quoted: attest.pcr_select.clone(),
            bundle: bundle.host_pcrs.selection.clone(),
        });
    }
    check_host_values(&bundle.host_pcrs).map_err(VerifyError::HostPcrValues)?;
    let computed = pcr_digest_sha256(&bundle.host_pcrs.values);
    if attest.pcr_digest != computed {
        return Err(VerifyError::PcrDigestMismatch {
            computed,
            quoted: attest.pcr_digest.clone(),
        });
    }

    // 7: freshness.
    let leaf = &bundle.leaf;
    if leaf.nonce != expected.nonce {
        return Err(VerifyError::NonceMismatch {
            expected: expected.nonce.clone(),
            got: leaf.nonce.clone(),
        });
    }

    // 8: identity and policies.
    if let Some(want) = expected.vtpm_uuid
        && want != leaf.vtpm_uuid
    {
        return Err(VerifyError::VtpmUuidMismatch {
            expected: want,
            got: leaf.vtpm_uuid,
        });
    }
    if let Some(want) = expected.group_uuid
        && want != leaf.group_uuid
    {
        return Err(VerifyError::GroupUuidMismatch {
            expected: want,
            got: leaf.group_uuid,
        });
    }
    if let Some(want) = expected.flags
        && want != leaf.flags
    {
        return Err(VerifyError::FlagsMismatch {
            expected: want,
            got: leaf.flags,
        });
    }
    if let Some(policy) = &expected.host_pcrs {
        for (&index, want) in &policy.values {
            let got = host_value(&bundle.host_pcrs, policy.hash_alg, index).ok_or(
                VerifyError::HostPcrNotQuoted {
                    hash_alg: policy.hash_alg,
                    index,
                },
            )?;
            if got != want.as_slice() {
                return Err(VerifyError::HostPcrPolicy {
                    hash_alg: policy.hash_alg,
                    index,
                    expected: want.clone(),
                    got: got.to_vec(),
                });
            }
        }
    }
    if let Some(policy) = &expected.vpcrs {
        let sel = &leaf.vpcr_selection;
        if policy.hash_alg != sel.hash_alg && !policy.values.is_empty() {
            return Err(VerifyError::VpcrBank {
                policy: policy.hash_alg,
                leaf: sel.hash_alg,
            });
        }
        for (&index, want) in &policy.values {
            let pos = sel
                .pcrs
                .iter()
                .position(|&p| u32::from(p) == index)
                .ok_or(VerifyError::VpcrNotSelected { index })?;
            let got = &leaf.vpcr_values[pos];
            if got != want {
                return Err(VerifyError::VpcrPolicy {
                    index,
                    expected: want.clone(),
                    got: got.clone(),
                });
            }
        }
    }

    Ok(Verified {
        leaf: leaf.clone(),
        leaf_hash,
        root,
        ak,
        attest,
        host_pcrs: bundle.host_pcrs.clone(),
    })
}
