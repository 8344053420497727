//! The manager's records of what it made in the TPM, stored as JSON with byte fields in lowercase
//! hex: the PCR policy spec, the provisioning record of the sealed master secret, attestation
//! keys and quote output. They hold no secret: private parts are blobs encrypted under the SRK.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{DEFAULT_POLICY_REF, HwTpmError, Result};

pub(super) mod hexbytes {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

mod hexvec {
    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeSeq};
    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for x in v {
            seq.serialize_element(&hex::encode(x))?;
        }
        seq.end()
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.into_iter()
            .map(|s| hex::decode(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// Which PCRs the master secret's policy covers (always the sha256 bank).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PcrPolicySpec {
    /// PCR indices (0..=23). Order and duplicates do not matter; they are normalised.
    pub pcrs: Vec<u8>,
    /// Policy reference bound into the sealed object's authPolicy.
    #[serde(with = "hexbytes")]
    pub policy_ref: Vec<u8>,
}

impl Default for PcrPolicySpec {
    /// sha256 PCRs 0 (firmware), 2 (option ROMs), 4 (boot loader), 7 (Secure Boot policy).
    fn default() -> Self {
        PcrPolicySpec {
            pcrs: vec![0, 2, 4, 7],
            policy_ref: DEFAULT_POLICY_REF.to_vec(),
        }
    }
}

impl PcrPolicySpec {
    pub fn with_pcrs(pcrs: &[u8]) -> Self {
        PcrPolicySpec {
            pcrs: pcrs.to_vec(),
            ..Default::default()
        }
    }
}

/// Everything needed to unseal the master secret later (no secret in here: the sealed object's
/// private part is encrypted under the SRK). Stored as JSON; byte fields are lowercase hex.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionRecord {
    /// [`RECORD_VERSION`](super::RECORD_VERSION).
    pub version: u32,
    /// [`SRK_TEMPLATE_ID`](super::SRK_TEMPLATE_ID) of the parent.
    pub srk_template: String,
    /// Name (nameAlg ‖ H(TPMT_PUBLIC)) of the SRK at provisioning time.
    #[serde(with = "hexbytes")]
    pub srk_name: Vec<u8>,
    /// Sealed data object: marshalled TPMT_PUBLIC.
    #[serde(with = "hexbytes")]
    pub sealed_public: Vec<u8>,
    /// Sealed data object: TPM2B_PRIVATE buffer contents (without the size prefix).
    #[serde(with = "hexbytes")]
    pub sealed_private: Vec<u8>,
    /// Admin policy-signing public key: marshalled TPMT_PUBLIC (ECC P-256, ECDSA/SHA-256).
    #[serde(with = "hexbytes")]
    pub policy_pubkey: Vec<u8>,
    /// Admin policy-signing public key as SEC1 uncompressed point (for humans / other tools).
    #[serde(with = "hexbytes")]
    pub policy_pubkey_sec1: Vec<u8>,
    /// Name of the policy key (0x000b ‖ SHA-256(policy_pubkey)).
    #[serde(with = "hexbytes")]
    pub policy_key_name: Vec<u8>,
    #[serde(with = "hexbytes")]
    pub policy_ref: Vec<u8>,
    /// Always "sha256".
    pub pcr_bank: String,
    /// Sorted, deduplicated PCR indices.
    pub pcrs: Vec<u8>,
    /// PCR values the admin approved (same order as `pcrs`), for diagnostics only.
    #[serde(with = "hexvec")]
    pub approved_pcr_values: Vec<Vec<u8>>,
    /// PolicyPCR digest over `approved_pcr_values`.
    #[serde(with = "hexbytes")]
    pub approved_policy: Vec<u8>,
    /// Marshalled TPMT_SIGNATURE (ECDSA/SHA-256) over aHash = SHA-256(approved_policy ‖ policy_ref).
    #[serde(with = "hexbytes")]
    pub policy_signature: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum AkAlg {
    #[default]
    #[serde(rename = "ecc-p256")]
    EccP256,
    #[serde(rename = "rsa-2048")]
    Rsa2048,
}

impl fmt::Display for AkAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AkAlg::EccP256 => "ecc-p256",
            AkAlg::Rsa2048 => "rsa-2048",
        })
    }
}

impl FromStr for AkAlg {
    type Err = HwTpmError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ecc-p256" | "ecc" | "p256" => Ok(AkAlg::EccP256),
            "rsa-2048" | "rsa" => Ok(AkAlg::Rsa2048),
            o => Err(HwTpmError::InvalidArgument(format!(
                "unknown AK algorithm {o:?}"
            ))),
        }
    }
}

/// An attestation key, stored as blobs (the private part is encrypted under the SRK).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AkRecord {
    pub version: u32,
    pub alg: AkAlg,
    /// Marshalled TPMT_PUBLIC.
    #[serde(with = "hexbytes")]
    pub public: Vec<u8>,
    /// TPM2B_PRIVATE buffer contents (without size prefix).
    #[serde(with = "hexbytes")]
    pub private: Vec<u8>,
    /// TPM name: 0x000b ‖ SHA-256(public).
    #[serde(with = "hexbytes")]
    pub name: Vec<u8>,
}

/// Output of [`HwTpm::quote`](super::HwTpm::quote).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuoteOut {
    /// Marshalled TPMS_ATTEST: exactly the bytes the AK signed.
    #[serde(with = "hexbytes")]
    pub attest: Vec<u8>,
    /// Marshalled TPMT_SIGNATURE.
    #[serde(with = "hexbytes")]
    pub signature: Vec<u8>,
    /// sha256 PCR indices quoted (sorted, deduplicated).
    pub pcrs: Vec<u8>,
    /// sha256 PCR values, in `pcrs` order, read right after the quote.
    #[serde(with = "hexvec")]
    pub pcr_values: Vec<Vec<u8>>,
}
