//! The manager's physical-TPM layer (tss-esapi 7.7.0).
//!
//! Everything the manager asks of the host TPM goes through [`HwTpm`]:
//!
//! * **SRK** – an ECC P-256 restricted decryption primary key under the Owner hierarchy, re-created
//!   deterministically with `TPM2_CreatePrimary` every time the TPM is opened (same template + same
//!   owner seed ⇒ same key), so no persistent NV handle is needed. The SRK's name is recorded at
//!   provisioning time; a different name at unseal time means "different TPM or owner cleared".
//! * **Master secret** – 32 random bytes sealed in a keyed-hash *sealed data* object under the SRK.
//!   The object has `userWithAuth` clear and `authPolicy = PolicyAuthorize(policyKeyName, policyRef)`:
//!   it can only be unsealed in a policy session that satisfied a policy *signed by the admin's
//!   policy key*. The approved policy is `PolicyPCR(sha256: selected PCRs, their values at
//!   provisioning)`. After a host upgrade the admin signs the new PCR values ([`HwTpm::reauthorize`])
//!   and the **same** sealed object becomes unsealable again.
//! * **Attestation key** – a restricted signing key (ECDSA P-256/SHA-256, or RSA-2048 RSASSA/SHA-256)
//!   under the SRK, kept as (public, private) blobs and loaded on demand.
//! * **EK CA key** – an unrestricted ECDSA P-256 signing key under the SRK (it signs X.509 digests)
//!   with an authorisation value derived from the master secret; `TPM2_Certify` by a group AK
//!   attests that it lives in this TPM ([`HwTpm::certify_ca`]).
//!
//! Parameter encryption: the sealed object's sensitive data is sent to the TPM in an HMAC session
//! salted with the SRK (`decrypt` attribute), and `TPM2_Unseal`'s response travels in a policy
//! session salted with the SRK (`encrypt` attribute), so the master secret never crosses the TPM bus
//! in the clear.
//!
//! Transient objects and sessions are flushed after every operation; only the SRK stays loaded for
//! the lifetime of a [`HwTpm`] (and is flushed on drop). Without a resource manager (swtpm, or
//! `/dev/tpm0`) a TPM typically has only 3 transient object slots, and unseal needs exactly 3
//! (SRK + policy public key, then SRK + sealed object), so leaks would show up quickly.
//!
//! Nothing here logs key material or secrets; `Debug` of secret-holding types is redacted.

use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use p256::ecdsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tss_esapi::{
    Context, TctiNameConf,
    attributes::{
        NvIndexAttributes, NvIndexAttributesBuilder, ObjectAttributesBuilder,
        SessionAttributesBuilder,
    },
    constants::{
        CapabilityType, NvIndexType, PropertyTag, SessionType, response_code::Tss2ResponseCodeKind,
    },
    handles::{
        KeyHandle, NvIndexHandle, NvIndexTpmHandle, ObjectHandle, PcrHandle, SessionHandle,
        TpmHandle,
    },
    interface_types::{
        algorithm::{HashingAlgorithm, PublicAlgorithm},
        ecc::EccCurve,
        key_bits::RsaKeyBits,
        resource_handles::{Hierarchy, NvAuth, Provision},
        session_handles::{AuthSession, PolicySession},
    },
    structures::{
        Attest, AttestInfo, Auth, CapabilityData, Data, Digest, DigestValues, EccParameter,
        EccPoint, EccScheme, EccSignature, HashScheme, KeyDerivationFunctionScheme,
        KeyedHashScheme, Name, Nonce, NvPublic, NvPublicBuilder, PcrSelectSize, PcrSelectionList,
        PcrSelectionListBuilder, PcrSlot, Private, Public, PublicBuilder,
        PublicEccParametersBuilder, PublicKeyRsa, PublicKeyedHashParameters,
        PublicRsaParametersBuilder, RsaExponent, RsaScheme, SensitiveData, Signature,
        SignatureScheme, SymmetricDefinition, SymmetricDefinitionObject,
    },
    traits::{Marshall, UnMarshall},
};
use zeroize::{Zeroize, Zeroizing};

/// `TPM_CC_PolicyPCR`.
const TPM_CC_POLICY_PCR: u32 = 0x0000_017F;
/// `TPM_CC_PolicyAuthorize`.
const TPM_CC_POLICY_AUTHORIZE: u32 = 0x0000_016A;
/// `TPM_ALG_SHA256`.
const TPM_ALG_SHA256: u16 = 0x000B;
/// Record format version written by this code.
pub const RECORD_VERSION: u32 = 1;
/// Identifies the SRK template below; stored in records for diagnostics.
pub const SRK_TEMPLATE_ID: &str = "owner/ecc-p256/aes128cfb/noDA/v1";
/// Default policy reference (bound into the sealed object's authPolicy).
pub const DEFAULT_POLICY_REF: &[u8] = b"xvtpm-manager-master-v1";
/// How often [`HwTpm::quote`] retries when a PCR changes between the quote and the PCR read.
const QUOTE_RACE_RETRIES: usize = 3;

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// For a TCTI I/O error (response code `0x…000a`: the connection to the TPM failed or broke),
/// what that means; tss2 itself says only "response code not recognized".
fn io_hint(e: &tss_esapi::Error) -> &'static str {
    let mut cause: Option<&dyn std::error::Error> = Some(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if let Some(hex) = text.strip_prefix("Response code value: 0x")
            && u32::from_str_radix(hex.trim(), 16).is_ok_and(|rc| rc & 0xffff == 0x000a)
        {
            return " (an I/O error talking to the TPM: what answers at that address is not a TPM, or it closed the connection)";
        }
        cause = c.source();
    }
    ""
}

#[derive(Debug, thiserror::Error)]
pub enum HwTpmError {
    /// The TCTI cannot reach the TPM (checked before tss2 loads it): `reason` names the
    /// cause and the fix ([`crate::tcti::precheck`]).
    #[error("{reason}")]
    TctiUnusable { tcti: String, reason: String },
    #[error("tss2 cannot open the TCTI {tcti:?}: {source}{}", io_hint(.source))]
    Tcti {
        tcti: String,
        #[source]
        source: tss_esapi::Error,
    },
    #[error("TPM operation {op} failed: {source}{}", io_hint(.source))]
    Tpm {
        op: &'static str,
        #[source]
        source: tss_esapi::Error,
    },
    /// The PCR policy is not satisfied: the selected PCRs differ from the values the admin approved.
    #[error(
        "sealed master secret: PCR policy not satisfied (sha256 PCRs {pcrs:?}; changed: {changed:?}); \
         if this is an intended upgrade, re-authorize the current PCR values with the admin policy key ({detail})"
    )]
    PolicyMismatch {
        pcrs: Vec<u8>,
        changed: Vec<u8>,
        detail: String,
    },
    /// The TPM rejected the admin's signature over the approved policy.
    #[error("policy signature rejected by the TPM: {0}")]
    PolicySignature(String),
    /// The SRK re-created now differs from the one used at provisioning.
    #[error(
        "storage root key differs from the one used at provisioning (different TPM, or TPM owner cleared)"
    )]
    SrkMismatch,
    #[error("invalid policy signing key: {0}")]
    PolicyKey(String),
    #[error("invalid record: {0}")]
    InvalidRecord(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("unexpected TPM response: {0}")]
    Unexpected(String),
}

impl HwTpmError {
    fn tpm(op: &'static str) -> impl FnOnce(tss_esapi::Error) -> HwTpmError {
        move |source| HwTpmError::Tpm { op, source }
    }
}

type Result<T> = std::result::Result<T, HwTpmError>;

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

/// Secret bytes: zeroized on drop, redacted in `Debug`. Derefs to the inner value.
pub struct Secret<T: Zeroize>(Zeroizing<T>);

impl<T: Zeroize> Secret<T> {
    pub fn new(v: T) -> Self {
        Secret(Zeroizing::new(v))
    }
    pub fn into_inner(self) -> Zeroizing<T> {
        self.0
    }
}
impl<T: Zeroize> std::ops::Deref for Secret<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}
impl<T: Zeroize> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([REDACTED])")
    }
}

/// The manager's 32-byte master secret.
pub type MasterSecret = Secret<[u8; 32]>;
/// The admin's policy-signing private key as PKCS#8 DER (write it to a root-only file).
pub type PolicySigningKey = Secret<Vec<u8>>;

// ---------------------------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------------------------

mod hexbytes {
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
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// [`SRK_TEMPLATE_ID`] of the parent.
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

/// Output of [`HwTpm::quote`].
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

// ---------------------------------------------------------------------------------------------
// Pure helpers (also used by tests / verifiers)
// ---------------------------------------------------------------------------------------------

fn normalize_pcrs(pcrs: &[u8]) -> Result<Vec<u8>> {
    let mut v = pcrs.to_vec();
    v.sort_unstable();
    v.dedup();
    if v.is_empty() {
        return Err(HwTpmError::InvalidArgument("empty PCR selection".into()));
    }
    if let Some(bad) = v.iter().find(|&&p| p > 23) {
        return Err(HwTpmError::InvalidArgument(format!(
            "PCR index {bad} out of range 0..=23"
        )));
    }
    Ok(v)
}

/// Marshalled TPML_PCR_SELECTION for one sha256 bank with sizeofSelect = 3.
pub fn marshal_pcr_selection(pcrs: &[u8]) -> Vec<u8> {
    let mut bitmap = [0u8; 3];
    for &p in pcrs {
        bitmap[(p / 8) as usize] |= 1 << (p % 8);
    }
    let mut out = Vec::with_capacity(10);
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
    out.push(3);
    out.extend_from_slice(&bitmap);
    out
}

/// PolicyPCR digest starting from an all-zero sha256 policy digest:
/// `H(0^32 ‖ TPM_CC_PolicyPCR ‖ TPML_PCR_SELECTION ‖ H(concat values))`.
pub fn policy_pcr_digest(pcrs: &[u8], values: &[Vec<u8>]) -> [u8; 32] {
    let mut vh = Sha256::new();
    for v in values {
        vh.update(v);
    }
    let pcr_digest = vh.finalize();
    let mut h = Sha256::new();
    h.update([0u8; 32]);
    h.update(TPM_CC_POLICY_PCR.to_be_bytes());
    h.update(marshal_pcr_selection(pcrs));
    h.update(pcr_digest);
    h.finalize().into()
}

/// PolicyAuthorize digest: `H(H(0^32 ‖ TPM_CC_PolicyAuthorize ‖ keyName) ‖ policyRef)`.
pub fn policy_authorize_digest(key_name: &[u8], policy_ref: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0u8; 32]);
    h.update(TPM_CC_POLICY_AUTHORIZE.to_be_bytes());
    h.update(key_name);
    let d1 = h.finalize();
    let mut h = Sha256::new();
    h.update(d1);
    h.update(policy_ref);
    h.finalize().into()
}

/// TPM name of a public area with nameAlg sha256: `0x000b ‖ SHA-256(TPMT_PUBLIC)`.
pub fn sha256_name(tpmt_public: &[u8]) -> Vec<u8> {
    let mut n = TPM_ALG_SHA256.to_be_bytes().to_vec();
    n.extend_from_slice(&Sha256::digest(tpmt_public));
    n
}

fn ahash(approved_policy: &[u8], policy_ref: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(approved_policy);
    h.update(policy_ref);
    h.finalize().into()
}

fn left_pad32(b: &[u8]) -> Result<[u8; 32]> {
    if b.len() > 32 {
        return Err(HwTpmError::Unexpected(
            "ECC parameter longer than 32 bytes".into(),
        ));
    }
    let mut out = [0u8; 32];
    out[32 - b.len()..].copy_from_slice(b);
    Ok(out)
}

fn parse_policy_key(der_or_raw: &[u8]) -> Result<p256::ecdsa::SigningKey> {
    use p256::pkcs8::DecodePrivateKey;
    if der_or_raw.len() == 32 {
        p256::ecdsa::SigningKey::from_slice(der_or_raw)
            .map_err(|_| HwTpmError::PolicyKey("not a valid P-256 scalar".into()))
    } else {
        p256::ecdsa::SigningKey::from_pkcs8_der(der_or_raw)
            .map_err(|_| HwTpmError::PolicyKey("not a PKCS#8 DER P-256 private key".into()))
    }
}

/// The policy key's public area as loaded into the TPM (external, unrestricted ECDSA P-256).
fn policy_key_public(vk: &p256::ecdsa::VerifyingKey) -> Result<Public> {
    let pt = vk.to_encoded_point(false);
    let (x, y) = (
        pt.x()
            .ok_or_else(|| HwTpmError::PolicyKey("identity point".into()))?,
        pt.y()
            .ok_or_else(|| HwTpmError::PolicyKey("identity point".into()))?,
    );
    let attrs = ObjectAttributesBuilder::new()
        .with_user_with_auth(true)
        .with_sign_encrypt(true)
        .build()
        .map_err(HwTpmError::tpm("policy key attributes"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_unrestricted_signing_key(
                EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
                EccCurve::NistP256,
            )
            .build()
            .map_err(HwTpmError::tpm("policy key parameters"))?,
        )
        .with_ecc_unique_identifier(EccPoint::new(
            EccParameter::try_from(x.to_vec()).map_err(HwTpmError::tpm("policy key x"))?,
            EccParameter::try_from(y.to_vec()).map_err(HwTpmError::tpm("policy key y"))?,
        ))
        .build()
        .map_err(HwTpmError::tpm("policy key public"))
}

/// Attributes shared by the keys the manager creates (SRK, AKs, EK CA keys): made in this TPM
/// and never leaving it (fixedTPM, fixedParent, sensitiveDataOrigin), used with their
/// authorisation value (userWithAuth), exempt from dictionary-attack lockout (noDA).
fn made_here_attrs() -> ObjectAttributesBuilder {
    ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
}

fn srk_template() -> Result<Public> {
    let attrs = made_here_attrs()
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .map_err(HwTpmError::tpm("SRK attributes"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()
            .map_err(HwTpmError::tpm("SRK parameters"))?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(HwTpmError::tpm("SRK template"))
}

fn pcr_selection(pcrs: &[u8]) -> Result<PcrSelectionList> {
    let slots = pcrs
        .iter()
        .map(|&p| PcrSlot::try_from(1u32 << p).map_err(HwTpmError::tpm("PCR slot")))
        .collect::<Result<Vec<_>>>()?;
    PcrSelectionListBuilder::new()
        .with_size_of_select(PcrSelectSize::ThreeOctets)
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(HwTpmError::tpm("PCR selection"))
}

// ---------------------------------------------------------------------------------------------
// HwTpm
// ---------------------------------------------------------------------------------------------

/// A connection to the (physical) TPM with the manager's SRK loaded.
pub struct HwTpm {
    ctx: Context,
    srk: KeyHandle,
    srk_name: Vec<u8>,
    tcti: String,
    /// The store counter's ESYS handle and salted HMAC session, kept open between store writes
    /// ([`HwTpm::counter_bump`]).
    counter_link: Option<CounterLink>,
}

/// An open link to the store counter: its ESYS handle (authorisation value set) and one
/// SRK-salted HMAC session (continueSession). Reusing them makes a store write's counter
/// increment one TPM command instead of five (`NV_ReadPublic` for the handle,
/// `StartAuthSession` with its ECDH salt, `NV_Increment`, `NV_Read`, `FlushContext`).
struct CounterLink {
    handle: u32,
    auth: Zeroizing<Vec<u8>>,
    nv: NvIndexHandle,
    sess: AuthSession,
}

impl fmt::Debug for HwTpm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HwTpm")
            .field("tcti", &self.tcti)
            .field("srk_name", &hex::encode(&self.srk_name))
            .finish_non_exhaustive()
    }
}

impl Drop for HwTpm {
    fn drop(&mut self) {
        // Context's own Drop would flush it too, but be explicit: without a resource manager a
        // leaked SRK costs one of the (typically 3) transient slots until TPM reset.
        self.drop_counter_link();
        let _ = self.ctx.flush_context(self.srk.into());
    }
}

/// Flushes every transient object (0x80xxxxxx), loaded session (0x02…) and saved session
/// (0x03…) the TPM holds. Returns how many.
fn flush_all(ctx: &mut Context) -> Result<usize> {
    let mut n = 0;
    for (first, want) in [(0x8000_0000u32, &[0x80u8][..]), (0x0200_0000, &[0x02, 0x03]), (0x0300_0000, &[0x02, 0x03])] {
        let (data, _) = ctx
            .execute_without_session(|ctx| ctx.get_capability(CapabilityType::Handles, first, 64))
            .map_err(HwTpmError::tpm("GetCapability(handles)"))?;
        let CapabilityData::Handles(list) = data else {
            return Err(HwTpmError::Unexpected("GetCapability(handles) returned other data".into()));
        };
        for h in list.into_inner().into_iter().map(u32::from) {
            if !want.contains(&((h >> 24) as u8)) {
                continue;
            }
            let th = TpmHandle::try_from(h).map_err(|e| HwTpmError::Unexpected(format!("handle {h:#010x}: {e}")))?;
            let tr = ctx.tr_from_tpm_public(th).map_err(HwTpmError::tpm("TR_FromTPMPublic(leftover handle)"))?;
            ctx.flush_context(tr).map_err(HwTpmError::tpm("FlushContext(leftover handle)"))?;
            n += 1;
        }
    }
    Ok(n)
}

impl HwTpm {
    /// Connects via `tcti` (`device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=N`, …) and
    /// re-creates the SRK.
    pub fn open(tcti: &str) -> Result<Self> {
        Self::open_inner(tcti, false).map(|(hw, _)| hw)
    }

    /// Whether `tcti` reaches the TPM through a resource manager (`/dev/tpmrm*`, tpm2-abrmd),
    /// which gives each connection its own transient objects and sessions and flushes them
    /// when the connection closes.
    pub fn has_resource_manager(tcti: &str) -> bool {
        tcti.contains("tpmrm") || tcti.starts_with("tabrmd")
    }

    /// [`open`](Self::open) for the manager, which owns the TPM: without a resource manager
    /// (swtpm, `/dev/tpm0`) the transient objects and sessions a killed manager left behind
    /// stay loaded until the TPM resets and fill its few slots, so every transient object and
    /// every loaded or saved session is flushed first. Only the manager's instance lock
    /// (`crate::instance`) makes this safe. Returns how many handles were flushed.
    pub fn open_owned(tcti: &str) -> Result<(Self, usize)> {
        Self::open_inner(tcti, !Self::has_resource_manager(tcti))
    }

    fn open_inner(tcti: &str, flush_leftovers: bool) -> Result<(Self, usize)> {
        crate::tcti::precheck(tcti).map_err(|reason| HwTpmError::TctiUnusable { tcti: tcti.to_string(), reason })?;
        let conf = TctiNameConf::from_str(tcti).map_err(|source| HwTpmError::Tcti {
            tcti: tcti.to_string(),
            source,
        })?;
        let mut ctx = Context::new(conf).map_err(|source| HwTpmError::Tcti {
            tcti: tcti.to_string(),
            source,
        })?;
        let flushed = if flush_leftovers { flush_all(&mut ctx)? } else { 0 };
        let t = Instant::now();
        let srk = ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create_primary(Hierarchy::Owner, srk_template()?, None, None, None, None)
                    .map_err(HwTpmError::tpm("CreatePrimary(SRK)"))
            })?
            .key_handle;
        let srk_name = match ctx.tr_get_name(srk.into()) {
            Ok(n) => n.value().to_vec(),
            Err(e) => {
                let _ = ctx.flush_context(srk.into());
                return Err(HwTpmError::Tpm {
                    op: "TR_GetName(SRK)",
                    source: e,
                });
            }
        };
        xvtpm_log::host_debug!(elapsed_ms = t.elapsed().as_millis() as u64, "SRK created");
        Ok((
            HwTpm {
                ctx,
                srk,
                srk_name,
                tcti: tcti.to_string(),
                counter_link: None,
            },
            flushed,
        ))
    }

    /// TCTI string this connection was opened with.
    pub fn tcti(&self) -> &str {
        &self.tcti
    }

    /// Name of the SRK (0x000b ‖ SHA-256(TPMT_PUBLIC)).
    pub fn srk_name(&self) -> &[u8] {
        &self.srk_name
    }

    /// The ESAPI context and the loaded SRK, for the manager's other TPM modules
    /// (`crate::akprov`); they must flush whatever they load.
    pub(crate) fn context_and_srk(&mut self) -> (&mut Context, KeyHandle) {
        (&mut self.ctx, self.srk)
    }

    /// Is this a software TPM? True if the vendor strings contain "SW" (swtpm/libtpms report
    /// "SW   TPM", the Microsoft simulator "Microsoft" + "SW"…). The daemon should log
    /// "INSECURE: software TPM" when this is true.
    pub fn is_software_tpm(&mut self) -> bool {
        match tss_esapi::utils::get_tpm_vendor(&mut self.ctx) {
            Ok(v) => v.contains("SW") || v.contains("Simulator") || v.contains("SIMULATOR"),
            Err(_) => false,
        }
    }

    /// TPM manufacturer id (e.g. "IBM", "INTC", "STM ") as a 4-character string.
    pub fn manufacturer(&mut self) -> Result<String> {
        let v = self
            .ctx
            .get_tpm_property(PropertyTag::Manufacturer)
            .map_err(HwTpmError::tpm("GetCapability(manufacturer)"))?
            .unwrap_or(0);
        Ok(v.to_be_bytes().iter().map(|&b| b as char).collect())
    }

    /// `n` bytes from the TPM RNG (several commands if n > 32 / the TPM's per-call limit).
    pub fn get_random(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let want = (n - out.len()).min(32);
            let d = self
                .ctx
                .execute_without_session(|ctx| ctx.get_random(want))
                .map_err(HwTpmError::tpm("GetRandom"))?;
            if d.value().is_empty() {
                return Err(HwTpmError::Unexpected("GetRandom returned no bytes".into()));
            }
            out.extend_from_slice(d.value());
        }
        out.truncate(n);
        Ok(out)
    }

    /// Reads sha256 PCR values, returned in ascending PCR order of the normalised selection.
    /// Several `TPM2_PCR_Read` calls are issued when more than 8 PCRs are selected.
    pub fn pcr_read(&mut self, pcrs: &[u8]) -> Result<Vec<Vec<u8>>> {
        let pcrs = normalize_pcrs(pcrs)?;
        let mut out = Vec::with_capacity(pcrs.len());
        for chunk in pcrs.chunks(8) {
            let sel = pcr_selection(chunk)?;
            let (_, read_sel, digests) = self
                .ctx
                .execute_without_session(|ctx| ctx.pcr_read(sel.clone()))
                .map_err(HwTpmError::tpm("PCR_Read"))?;
            if read_sel != sel || digests.value().len() != chunk.len() {
                return Err(HwTpmError::Unexpected(format!(
                    "PCR_Read returned {} values for {} selected sha256 PCRs (bank not allocated?)",
                    digests.value().len(),
                    chunk.len()
                )));
            }
            out.extend(digests.value().iter().map(|d| d.value().to_vec()));
        }
        Ok(out)
    }

    /// `TPM2_PCR_Extend` of one sha256 PCR with a 32-byte digest (tests, measured events).
    pub fn pcr_extend(&mut self, pcr: u8, digest: &[u8; 32]) -> Result<()> {
        // ESYS_TR_PCRn == n.
        let handle = PcrHandle::try_from(u32::from(pcr))
            .ok()
            .filter(|_| pcr <= 23)
            .ok_or_else(|| HwTpmError::InvalidArgument(format!("PCR {pcr}")))?;
        let mut vals = DigestValues::new();
        vals.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(digest.to_vec()).map_err(HwTpmError::tpm("digest"))?,
        );
        self.ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.pcr_extend(handle, vals)
            })
            .map_err(HwTpmError::tpm("PCR_Extend"))
    }

    /// Starts an SRK-salted session (AES-128-CFB parameter encryption, SHA-256).
    pub(crate) fn start_salted_session(&mut self, ty: SessionType) -> Result<AuthSession> {
        self.ctx
            .start_auth_session(
                Some(self.srk),
                None,
                None,
                ty,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(HwTpmError::tpm("StartAuthSession"))?
            .ok_or_else(|| HwTpmError::Unexpected("StartAuthSession returned no handle".into()))
    }

    pub(crate) fn flush_session(&mut self, s: AuthSession) {
        if let Err(e) = self.ctx.flush_context(SessionHandle::from(s).into()) {
            xvtpm_log::guest_warn!(error = %e, "failed to flush session");
        }
    }

    pub(crate) fn flush_object(&mut self, h: ObjectHandle) {
        if let Err(e) = self.ctx.flush_context(h) {
            xvtpm_log::guest_warn!(error = %e, "failed to flush transient object");
        }
    }

    /// Loads `public` (TPMT_PUBLIC bytes) of the admin policy key into the Owner hierarchy
    /// (public part only — a NULL-hierarchy key would give a NULL ticket, which PolicyAuthorize
    /// rejects), verifies `signature` over `digest` and returns (key name, verified ticket).
    fn verify_policy_signature(
        &mut self,
        policy_pub: &[u8],
        digest: &[u8; 32],
        signature: &[u8],
    ) -> Result<(Name, tss_esapi::structures::VerifiedTicket)> {
        let public = Public::unmarshall(policy_pub)
            .map_err(|e| HwTpmError::InvalidRecord(format!("policy_pubkey: {e}")))?;
        let sig = Signature::unmarshall(signature)
            .map_err(|e| HwTpmError::InvalidRecord(format!("policy_signature: {e}")))?;
        let key = self
            .ctx
            .execute_without_session(|ctx| ctx.load_external_public(public, Hierarchy::Owner))
            .map_err(HwTpmError::tpm("LoadExternal(policy key)"))?;
        let res = (|| {
            let name = self
                .ctx
                .tr_get_name(key.into())
                .map_err(HwTpmError::tpm("TR_GetName(policy key)"))?;
            let d = Digest::try_from(digest.to_vec()).map_err(HwTpmError::tpm("digest"))?;
            let ticket = self
                .ctx
                .execute_without_session(|ctx| ctx.verify_signature(key, d, sig))
                .map_err(|e| HwTpmError::PolicySignature(e.to_string()))?;
            Ok((name, ticket))
        })();
        self.flush_object(key.into());
        res
    }

    fn check_srk(&self, rec_srk_name: &[u8]) -> Result<()> {
        if rec_srk_name != self.srk_name.as_slice() {
            return Err(HwTpmError::SrkMismatch);
        }
        Ok(())
    }

    /// Creates and seals the manager's master secret. See the module docs for the policy.
    ///
    /// Returns the record (store it, e.g. as JSON, next to the manager's state), the admin's
    /// policy-signing private key (PKCS#8 DER: the caller writes it to a root-only file, or
    /// off the host; it is needed only for [`HwTpm::reauthorize`]) and the master secret.
    pub fn provision(
        &mut self,
        spec: &PcrPolicySpec,
    ) -> Result<(ProvisionRecord, PolicySigningKey, MasterSecret)> {
        use p256::pkcs8::EncodePrivateKey;
        let pcrs = normalize_pcrs(&spec.pcrs)?;
        if spec.policy_ref.len() > 32 {
            return Err(HwTpmError::InvalidArgument(
                "policy_ref longer than 32 bytes".into(),
            ));
        }

        // Master secret: OS RNG xor TPM RNG (either alone suffices if honest).
        let mut master = Zeroizing::new([0u8; 32]);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, master.as_mut());
        let tpm_rand = Zeroizing::new(self.get_random(32)?);
        for (m, t) in master.iter_mut().zip(tpm_rand.iter()) {
            *m ^= t;
        }

        // Admin policy key (software).
        let sk = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
        let vk = *sk.verifying_key();
        let sk_der = sk
            .to_pkcs8_der()
            .map_err(|e| HwTpmError::PolicyKey(format!("PKCS#8 encoding: {e}")))?;
        let policy_key_der = Secret::new(sk_der.as_bytes().to_vec());
        let policy_pub = policy_key_public(&vk)?;
        let policy_pub_bytes = policy_pub
            .marshall()
            .map_err(HwTpmError::tpm("marshal policy key"))?;
        let policy_key_name = sha256_name(&policy_pub_bytes);
        let auth_policy = policy_authorize_digest(&policy_key_name, &spec.policy_ref);

        // Sealed data object.
        let attrs = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_user_with_auth(false)
            .with_admin_with_policy(true)
            .with_no_da(true)
            .build()
            .map_err(HwTpmError::tpm("sealed object attributes"))?;
        let public = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::KeyedHash)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_auth_policy(
                Digest::try_from(auth_policy.to_vec()).map_err(HwTpmError::tpm("digest"))?,
            )
            .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
            .with_keyed_hash_unique_identifier(Digest::default())
            .build()
            .map_err(HwTpmError::tpm("sealed object template"))?;
        let data =
            SensitiveData::try_from(master.to_vec()).map_err(HwTpmError::tpm("sensitive data"))?;

        let t = Instant::now();
        let sess = self.start_salted_session(SessionType::Hmac)?;
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_decrypt(true)
            .with_continue_session(true)
            .build();
        let created = self
            .ctx
            .tr_sess_set_attributes(sess, attrs, mask)
            .map_err(HwTpmError::tpm("TRSess_SetAttributes"))
            .and_then(|()| {
                self.ctx
                    .execute_with_session(Some(sess), |ctx| {
                        ctx.create(self.srk, public, None, Some(data), None, None)
                    })
                    .map_err(HwTpmError::tpm("Create(sealed master secret)"))
            });
        self.flush_session(sess);
        let created = created?;
        xvtpm_log::host_debug!(
            elapsed_ms = t.elapsed().as_millis() as u64,
            "sealed object created"
        );

        let sealed_public = created
            .out_public
            .marshall()
            .map_err(HwTpmError::tpm("marshal sealed public"))?;
        let sealed_private = created.out_private.value().to_vec();

        let mut rec = ProvisionRecord {
            version: RECORD_VERSION,
            srk_template: SRK_TEMPLATE_ID.to_string(),
            srk_name: self.srk_name.clone(),
            sealed_public,
            sealed_private,
            policy_pubkey: policy_pub_bytes,
            policy_pubkey_sec1: vk.to_encoded_point(false).as_bytes().to_vec(),
            policy_key_name,
            policy_ref: spec.policy_ref.clone(),
            pcr_bank: "sha256".into(),
            pcrs,
            approved_pcr_values: Vec::new(),
            approved_policy: Vec::new(),
            policy_signature: Vec::new(),
        };
        self.authorize_current(&mut rec, &sk)?;
        Ok((rec, policy_key_der, Secret(master)))
    }

    /// Reads the current PCR values, builds the PolicyPCR digest, signs it with `sk` and checks
    /// the TPM accepts the signature (so a bad key fails here, not at the next boot).
    fn authorize_current(
        &mut self,
        rec: &mut ProvisionRecord,
        sk: &p256::ecdsa::SigningKey,
    ) -> Result<()> {
        let values = self.pcr_read(&rec.pcrs)?;
        let approved = policy_pcr_digest(&rec.pcrs, &values);
        let a = ahash(&approved, &rec.policy_ref);
        let sig: p256::ecdsa::Signature = sk
            .sign_prehash(&a)
            .map_err(|e| HwTpmError::PolicyKey(format!("signing: {e}")))?;
        let (r, s) = sig.split_bytes();
        let tpm_sig = Signature::EcDsa(
            EccSignature::create(
                HashingAlgorithm::Sha256,
                EccParameter::try_from(r.to_vec()).map_err(HwTpmError::tpm("r"))?,
                EccParameter::try_from(s.to_vec()).map_err(HwTpmError::tpm("s"))?,
            )
            .map_err(HwTpmError::tpm("ECC signature"))?,
        );
        let sig_bytes = tpm_sig
            .marshall()
            .map_err(HwTpmError::tpm("marshal signature"))?;
        // TPM-side check (also proves policy_pubkey matches the signing key).
        let (name, _ticket) = self.verify_policy_signature(&rec.policy_pubkey, &a, &sig_bytes)?;
        if name.value() != rec.policy_key_name.as_slice() {
            return Err(HwTpmError::Unexpected(
                "TPM-computed policy key name differs from the software-computed one".into(),
            ));
        }
        rec.approved_pcr_values = values;
        rec.approved_policy = approved.to_vec();
        rec.policy_signature = sig_bytes;
        Ok(())
    }

    fn check_record(rec: &ProvisionRecord) -> Result<()> {
        if rec.version != RECORD_VERSION {
            return Err(HwTpmError::InvalidRecord(format!(
                "unsupported record version {}",
                rec.version
            )));
        }
        if rec.pcr_bank != "sha256" {
            return Err(HwTpmError::InvalidRecord(format!(
                "unsupported PCR bank {:?}",
                rec.pcr_bank
            )));
        }
        if normalize_pcrs(&rec.pcrs)? != rec.pcrs {
            return Err(HwTpmError::InvalidRecord("PCR list not normalised".into()));
        }
        // The policy key and policy_ref must be the ones the sealed object is bound to; checked
        // here so that a swapped key gives a clear error instead of a TPM policy failure.
        if sha256_name(&rec.policy_pubkey) != rec.policy_key_name {
            return Err(HwTpmError::InvalidRecord(
                "policy_key_name does not match policy_pubkey".into(),
            ));
        }
        let sealed = Public::unmarshall(&rec.sealed_public)
            .map_err(|e| HwTpmError::InvalidRecord(format!("sealed_public: {e}")))?;
        let expected = policy_authorize_digest(&rec.policy_key_name, &rec.policy_ref);
        if sealed.auth_policy().value() != expected.as_slice() {
            return Err(HwTpmError::InvalidRecord(
                "policy key / policy_ref are not the ones the sealed object is bound to".into(),
            ));
        }
        Ok(())
    }

    /// Unseals the master secret. Fails with [`HwTpmError::PolicyMismatch`] if the selected PCRs
    /// no longer have the approved values.
    pub fn unseal_master(&mut self, rec: &ProvisionRecord) -> Result<MasterSecret> {
        Self::check_record(rec)?;
        self.check_srk(&rec.srk_name)?;
        let approved = Digest::try_from(rec.approved_policy.clone())
            .map_err(|e| HwTpmError::InvalidRecord(format!("approved_policy: {e}")))?;
        let policy_ref = Nonce::try_from(rec.policy_ref.clone())
            .map_err(|e| HwTpmError::InvalidRecord(format!("policy_ref: {e}")))?;
        let sealed_public = Public::unmarshall(&rec.sealed_public)
            .map_err(|e| HwTpmError::InvalidRecord(format!("sealed_public: {e}")))?;
        let sealed_private = Private::try_from(rec.sealed_private.clone())
            .map_err(|e| HwTpmError::InvalidRecord(format!("sealed_private: {e}")))?;
        let sel = pcr_selection(&rec.pcrs)?;

        // 1. Ticket for the admin's signature over (approvedPolicy, policyRef).
        let a = ahash(&rec.approved_policy, &rec.policy_ref);
        let (key_name, ticket) =
            self.verify_policy_signature(&rec.policy_pubkey, &a, &rec.policy_signature)?;

        // 2. Policy session: PolicyPCR (current values) + PolicyAuthorize.
        let sess = self.start_salted_session(SessionType::Policy)?;
        let res = (|| {
            let psess = PolicySession::try_from(sess)
                .map_err(|e| HwTpmError::Unexpected(format!("policy session: {e}")))?;
            self.ctx
                .execute_without_session(|ctx| ctx.policy_pcr(psess, Digest::default(), sel))
                .map_err(HwTpmError::tpm("PolicyPCR"))?;
            // The session digest now reflects the *current* PCR values; compare it with the
            // approved policy ourselves for a precise error (PolicyAuthorize would only say
            // TPM_RC_VALUE on parameter 1).
            let current = self
                .ctx
                .execute_without_session(|ctx| ctx.policy_get_digest(psess))
                .map_err(HwTpmError::tpm("PolicyGetDigest"))?;
            if current.value() != approved.value() {
                return Err(self.policy_mismatch(
                    rec,
                    "current PolicyPCR digest differs from the approved policy".into(),
                ));
            }
            self.ctx
                .execute_without_session(|ctx| {
                    ctx.policy_authorize(psess, approved, policy_ref, &key_name, ticket)
                })
                .map_err(HwTpmError::tpm("PolicyAuthorize"))?;
            let (attrs, mask) = SessionAttributesBuilder::new()
                .with_encrypt(true)
                .with_continue_session(true)
                .build();
            self.ctx
                .tr_sess_set_attributes(sess, attrs, mask)
                .map_err(HwTpmError::tpm("TRSess_SetAttributes"))?;

            // 3. Load + unseal.
            let obj = self
                .ctx
                .execute_with_session(Some(AuthSession::Password), |ctx| {
                    ctx.load(self.srk, sealed_private, sealed_public)
                })
                .map_err(HwTpmError::tpm("Load(sealed object)"))?;
            let out = self
                .ctx
                .execute_with_session(Some(sess), |ctx| ctx.unseal(obj.into()));
            self.flush_object(obj.into());
            // (A TPM_RC_POLICY_FAIL here would mean the record checks above were bypassed;
            // PCR mismatches are caught before PolicyAuthorize.)
            let data = out.map_err(HwTpmError::tpm("Unseal"))?;
            let bytes = Zeroizing::new(data.value().to_vec());
            drop(data); // SensitiveData (Zeroizing<Vec<u8>>) zeroizes on drop
            if bytes.len() != 32 {
                return Err(HwTpmError::Unexpected(format!(
                    "unsealed {} bytes, expected 32",
                    bytes.len()
                )));
            }
            let mut m = Zeroizing::new([0u8; 32]);
            m.copy_from_slice(&bytes);
            Ok(Secret(m))
        })();
        self.flush_session(sess);
        res
    }

    fn policy_mismatch(&mut self, rec: &ProvisionRecord, detail: String) -> HwTpmError {
        let changed = match self.pcr_read(&rec.pcrs) {
            Ok(now) => rec
                .pcrs
                .iter()
                .zip(now.iter().zip(rec.approved_pcr_values.iter()))
                .filter(|(_, (a, b))| a != b)
                .map(|(p, _)| *p)
                .collect(),
            Err(_) => Vec::new(),
        };
        HwTpmError::PolicyMismatch {
            pcrs: rec.pcrs.clone(),
            changed,
            detail,
        }
    }

    /// Upgrade path: signs the CURRENT values of the record's PCRs with the admin's policy key
    /// (PKCS#8 DER or raw 32-byte scalar) and returns the updated record. The sealed object is
    /// unchanged, so the same master secret unseals. Fails with [`HwTpmError::PolicyKey`] if the key
    /// is not the one the record was provisioned with.
    pub fn reauthorize(
        &mut self,
        rec: &ProvisionRecord,
        policy_key: &[u8],
    ) -> Result<ProvisionRecord> {
        Self::check_record(rec)?;
        let sk = parse_policy_key(policy_key)?;
        let vk = *sk.verifying_key();
        let pub_bytes = policy_key_public(&vk)?
            .marshall()
            .map_err(HwTpmError::tpm("marshal policy key"))?;
        if pub_bytes != rec.policy_pubkey {
            return Err(HwTpmError::PolicyKey(
                "this key is not the policy key the master secret was sealed to".into(),
            ));
        }
        let mut new = rec.clone();
        self.authorize_current(&mut new, &sk)?;
        // Self-check of the software signature (cheap; catches encoding bugs early).
        let sig = Signature::unmarshall(&new.policy_signature)
            .map_err(HwTpmError::tpm("unmarshal signature"))?;
        if let Signature::EcDsa(es) = sig {
            let r = left_pad32(es.signature_r().value())?;
            let s = left_pad32(es.signature_s().value())?;
            let sig = p256::ecdsa::Signature::from_scalars(r, s)
                .map_err(|e| HwTpmError::Unexpected(e.to_string()))?;
            vk.verify_prehash(&ahash(&new.approved_policy, &new.policy_ref), &sig)
                .map_err(|e| HwTpmError::Unexpected(format!("self-verify: {e}")))?;
        }
        Ok(new)
    }

    /// Creates a restricted signing attestation key under the SRK.
    pub fn create_ak(&mut self, alg: AkAlg) -> Result<AkRecord> {
        let attrs = made_here_attrs()
            .with_restricted(true)
            .with_sign_encrypt(true)
            .with_decrypt(false)
            .build()
            .map_err(HwTpmError::tpm("AK attributes"))?;
        let b = PublicBuilder::new()
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs);
        let public = match alg {
            AkAlg::EccP256 => b
                .with_public_algorithm(PublicAlgorithm::Ecc)
                .with_ecc_parameters(
                    PublicEccParametersBuilder::new()
                        .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(
                            HashingAlgorithm::Sha256,
                        )))
                        .with_curve(EccCurve::NistP256)
                        .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                        .with_symmetric(SymmetricDefinitionObject::Null)
                        .with_is_signing_key(true)
                        .with_is_decryption_key(false)
                        .with_restricted(true)
                        .build()
                        .map_err(HwTpmError::tpm("AK ECC parameters"))?,
                )
                .with_ecc_unique_identifier(EccPoint::default()),
            AkAlg::Rsa2048 => b
                .with_public_algorithm(PublicAlgorithm::Rsa)
                .with_rsa_parameters(
                    PublicRsaParametersBuilder::new()
                        .with_scheme(RsaScheme::RsaSsa(HashScheme::new(HashingAlgorithm::Sha256)))
                        .with_key_bits(RsaKeyBits::Rsa2048)
                        .with_exponent(RsaExponent::default())
                        .with_symmetric(SymmetricDefinitionObject::Null)
                        .with_is_signing_key(true)
                        .with_is_decryption_key(false)
                        .with_restricted(true)
                        .build()
                        .map_err(HwTpmError::tpm("AK RSA parameters"))?,
                )
                .with_rsa_unique_identifier(PublicKeyRsa::default()),
        }
        .build()
        .map_err(HwTpmError::tpm("AK template"))?;
        let created = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create(self.srk, public, None, None, None, None)
            })
            .map_err(HwTpmError::tpm("Create(AK)"))?;
        let public = created
            .out_public
            .marshall()
            .map_err(HwTpmError::tpm("marshal AK public"))?;
        let name = sha256_name(&public);
        Ok(AkRecord {
            version: RECORD_VERSION,
            alg,
            public,
            private: created.out_private.value().to_vec(),
            name,
        })
    }

    pub(crate) fn load_ak(&mut self, ak: &AkRecord) -> Result<KeyHandle> {
        self.load_under_srk("AK", "Load(AK)", &ak.public, &ak.private, &ak.name)
    }

    /// Loads a key blob created under the SRK (`what` names it in errors), after checking that
    /// the recorded name is the name of the recorded public area.
    pub(crate) fn load_under_srk(
        &mut self,
        what: &str,
        op: &'static str,
        public: &[u8],
        private: &[u8],
        name: &[u8],
    ) -> Result<KeyHandle> {
        let public_area = Public::unmarshall(public)
            .map_err(|e| HwTpmError::InvalidRecord(format!("{what} public: {e}")))?;
        let private = Private::try_from(private.to_vec())
            .map_err(|e| HwTpmError::InvalidRecord(format!("{what} private: {e}")))?;
        if sha256_name(public) != name {
            return Err(HwTpmError::InvalidRecord(format!(
                "{what} name does not match its public area"
            )));
        }
        self.ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.load(self.srk, private, public_area)
            })
            .map_err(HwTpmError::tpm(op))
    }

    /// `TPM2_Quote` by `ak` over the sha256 PCRs `pcrs` with `qualifyingData = qualifying`
    /// (≤ 64 bytes), followed by `TPM2_PCR_Read` of the same PCRs.
    ///
    /// The PCRs may change between the quote and the read. The verifier must therefore always
    /// check `pcrDigest` in the signed TPMS_ATTEST against SHA-256 of the returned values; to
    /// make a mismatch unlikely this function re-quotes (up to 3 times) when the values read do
    /// not match the quoted digest, and fails with [`HwTpmError::Unexpected`] if they never do.
    pub fn quote(&mut self, ak: &AkRecord, qualifying: &[u8], pcrs: &[u8]) -> Result<QuoteOut> {
        if qualifying.len() > 64 {
            return Err(HwTpmError::InvalidArgument(format!(
                "qualifying data is {} bytes (max 64)",
                qualifying.len()
            )));
        }
        let pcrs = normalize_pcrs(pcrs)?;
        let sel = pcr_selection(&pcrs)?;
        let data =
            Data::try_from(qualifying.to_vec()).map_err(HwTpmError::tpm("qualifying data"))?;
        let key = self.load_ak(ak)?;
        let res = (|| {
            for _ in 0..QUOTE_RACE_RETRIES {
                let (attest, sig): (Attest, Signature) = self
                    .ctx
                    .execute_with_session(Some(AuthSession::Password), |ctx| {
                        ctx.quote(key, data.clone(), SignatureScheme::Null, sel.clone())
                    })
                    .map_err(HwTpmError::tpm("Quote"))?;
                let values = self.pcr_read(&pcrs)?;
                let AttestInfo::Quote { info } = attest.attested() else {
                    return Err(HwTpmError::Unexpected(
                        "Quote returned a non-quote attestation".into(),
                    ));
                };
                let mut h = Sha256::new();
                for v in &values {
                    h.update(v);
                }
                if info.pcr_digest().value() != &h.finalize()[..] {
                    xvtpm_log::guest_debug!("PCRs changed between Quote and PCR_Read; re-quoting");
                    continue;
                }
                return Ok(QuoteOut {
                    attest: attest
                        .marshall()
                        .map_err(HwTpmError::tpm("marshal attest"))?,
                    signature: sig
                        .marshall()
                        .map_err(HwTpmError::tpm("marshal signature"))?,
                    pcrs: pcrs.clone(),
                    pcr_values: values,
                });
            }
            Err(HwTpmError::Unexpected(
                "PCR values kept changing between Quote and PCR_Read".into(),
            ))
        })();
        self.flush_object(key.into());
        res
    }
}

// ---------------------------------------------------------------------------------------------
// The EK CA key (a group's vTPM EK certificates; docs/trust-chain.md)
// ---------------------------------------------------------------------------------------------

/// A group's EK CA key, stored as blobs (the private part is encrypted under the SRK). It has an
/// authorisation value the manager derives from its master secret, so the blob alone signs
/// nothing: only a manager that unsealed the master secret (a host in an approved state) can use
/// it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaKeyRecord {
    pub version: u32,
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

fn ca_key_template() -> Result<Public> {
    // An unrestricted signing key: it signs X.509 TBS digests, which a restricted key refuses.
    // fixedTPM/fixedParent/sensitiveDataOrigin: made in this TPM and never leaves it (what the
    // AK's TPM2_Certify attests). noDA: its authorisation value is 256 bits of HKDF output, and a
    // lockout caused by someone else must not stop certificate issuance.
    let attrs = made_here_attrs()
        .with_sign_encrypt(true)
        .build()
        .map_err(HwTpmError::tpm("CA key attributes"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_unrestricted_signing_key(
                EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
                EccCurve::NistP256,
            )
            .build()
            .map_err(HwTpmError::tpm("CA key parameters"))?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(HwTpmError::tpm("CA key template"))
}

impl HwTpm {
    /// Creates an EK CA key under the SRK with authorisation value `auth` (≤ 32 bytes), sent
    /// encrypted (SRK-salted session, `decrypt`).
    pub fn create_ca_key(&mut self, auth: &[u8]) -> Result<CaKeyRecord> {
        let auth = Auth::try_from(auth.to_vec()).map_err(HwTpmError::tpm("CA key auth"))?;
        let template = ca_key_template()?;
        let sess = self.start_salted_session(SessionType::Hmac)?;
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_decrypt(true)
            .with_continue_session(true)
            .build();
        let srk = self.srk;
        let res = self
            .ctx
            .tr_sess_set_attributes(sess, attrs, mask)
            .map_err(HwTpmError::tpm("TRSess_SetAttributes"))
            .and_then(|()| {
                self.ctx
                    .execute_with_session(Some(sess), |ctx| {
                        ctx.create(srk, template, Some(auth), None, None, None)
                    })
                    .map_err(HwTpmError::tpm("Create(EK CA key)"))
            });
        self.flush_session(sess);
        let created = res?;
        let public = created
            .out_public
            .marshall()
            .map_err(HwTpmError::tpm("marshal CA key public"))?;
        let name = sha256_name(&public);
        Ok(CaKeyRecord {
            version: RECORD_VERSION,
            public,
            private: created.out_private.value().to_vec(),
            name,
        })
    }

    /// Loads the CA key and sets its authorisation value on the ESYS handle.
    fn load_ca_key(&mut self, key: &CaKeyRecord, auth: &[u8]) -> Result<KeyHandle> {
        let handle = self.load_under_srk("CA key", "Load(EK CA key)", &key.public, &key.private, &key.name)?;
        let auth = match Auth::try_from(auth.to_vec()) {
            Ok(a) => a,
            Err(e) => {
                self.flush_object(handle.into());
                return Err(HwTpmError::Tpm { op: "CA key auth", source: e });
            }
        };
        if let Err(e) = self.ctx.tr_set_auth(handle.into(), auth) {
            self.flush_object(handle.into());
            return Err(HwTpmError::Tpm { op: "TR_SetAuth(EK CA key)", source: e });
        }
        Ok(handle)
    }

    /// An HMAC session salted with the SRK that stays open until flushed: the CA key's
    /// authorisation is proven by HMAC, never sent in the clear.
    pub(crate) fn hmac_session(&mut self) -> Result<AuthSession> {
        let sess = self.start_salted_session(SessionType::Hmac)?;
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .build();
        if let Err(e) = self.ctx.tr_sess_set_attributes(sess, attrs, mask) {
            self.flush_session(sess);
            return Err(HwTpmError::Tpm { op: "TRSess_SetAttributes", source: e });
        }
        Ok(sess)
    }

    /// `TPM2_Sign` of a SHA-256 `digest` with the CA key (ECDSA P-256): returns `(r, s)`.
    pub fn ca_sign(&mut self, key: &CaKeyRecord, auth: &[u8], digest: &[u8; 32]) -> Result<([u8; 32], [u8; 32])> {
        use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
        let handle = self.load_ca_key(key, auth)?;
        let res = (|| {
            let sess = self.hmac_session()?;
            let d = Digest::try_from(digest.to_vec()).map_err(HwTpmError::tpm("digest"));
            // A non-restricted key signs any digest; the NULL ticket says "not hashed by the TPM".
            let ticket = tss_esapi::structures::HashcheckTicket::try_from(
                tss_esapi::tss2_esys::TPMT_TK_HASHCHECK {
                    tag: TPM2_ST_HASHCHECK,
                    hierarchy: TPM2_RH_NULL,
                    digest: Default::default(),
                },
            )
            .map_err(HwTpmError::tpm("hashcheck ticket"));
            let out = match (d, ticket) {
                (Ok(d), Ok(ticket)) => self
                    .ctx
                    .execute_with_session(Some(sess), |ctx| {
                        ctx.sign(handle, d, SignatureScheme::Null, ticket)
                    })
                    .map_err(HwTpmError::tpm("Sign(EK CA key)")),
                (Err(e), _) | (_, Err(e)) => Err(e),
            };
            self.flush_session(sess);
            match out? {
                Signature::EcDsa(es) => Ok((
                    left_pad32(es.signature_r().value())?,
                    left_pad32(es.signature_s().value())?,
                )),
                _ => Err(HwTpmError::Unexpected("the CA key did not sign with ECDSA".into())),
            }
        })();
        self.flush_object(handle.into());
        res
    }

    /// `TPM2_Certify` of the CA key by the AK `ak`, with `qualifyingData = qualifying` (≤ 64
    /// bytes): the AK attests that the CA key is loaded in this TPM. Returns the marshalled
    /// TPMS_ATTEST and TPMT_SIGNATURE.
    pub fn certify_ca(
        &mut self,
        key: &CaKeyRecord,
        auth: &[u8],
        ak: &AkRecord,
        qualifying: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let data = Data::try_from(qualifying.to_vec()).map_err(HwTpmError::tpm("qualifying data"))?;
        let ca = self.load_ca_key(key, auth)?;
        let res = (|| {
            let signer = self.load_ak(ak)?;
            let out = (|| {
                let sess = self.hmac_session()?;
                // Session 1 authorises the certified object (ADMIN role: its authValue), the
                // password session the AK (USER role, empty authValue).
                let out = self
                    .ctx
                    .execute_with_sessions((Some(sess), Some(AuthSession::Password), None), |ctx| {
                        ctx.certify(ca.into(), signer, data, SignatureScheme::Null)
                    })
                    .map_err(HwTpmError::tpm("Certify(EK CA key by the AK)"));
                self.flush_session(sess);
                let (attest, sig) = out?;
                Ok((
                    attest.marshall().map_err(HwTpmError::tpm("marshal attest"))?,
                    sig.marshall().map_err(HwTpmError::tpm("marshal signature"))?,
                ))
            })();
            self.flush_object(signer.into());
            out
        })();
        self.flush_object(ca.into());
        res
    }
}

// ---------------------------------------------------------------------------------------------
// The store's rollback counter (an NV counter index)
// ---------------------------------------------------------------------------------------------

/// First handle of the range the manager defines its store counter in. `0x0180_0000..=0x01BF_FFFF`
/// is the owner's range in the TCG handle registry; `0x56` is "V".
pub const STORE_COUNTER_FIRST: u32 = 0x0180_5600;
/// How many handles from [`STORE_COUNTER_FIRST`] the manager may use (it takes the first free
/// one at provisioning; an earlier provisioning's index or another application's is skipped).
pub const STORE_COUNTER_SLOTS: u32 = 64;

/// What [`HwTpm::counter_probe`] found at a handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CounterProbe {
    /// No NV index is defined there.
    Missing,
    /// An NV index is defined there, but it is not a store counter of this manager: its public
    /// area differs from [`HwTpm::store_counter_public`], or it refuses the manager's
    /// authorisation value. The string says which.
    Foreign(String),
    /// The manager's counter, defined but never incremented (it has no value yet).
    Unwritten,
    /// The manager's counter and its value.
    Value(u64),
}

fn counter_value(b: &[u8]) -> Result<u64> {
    let b: [u8; 8] = b.try_into().map_err(|_| {
        HwTpmError::Unexpected(format!(
            "NV_Read of the store counter returned {} bytes",
            b.len()
        ))
    })?;
    Ok(u64::from_be_bytes(b))
}

fn is_kind(e: &tss_esapi::Error, kind: Tss2ResponseCodeKind) -> bool {
    matches!(e, tss_esapi::Error::Tss2Error(rc) if rc.kind() == Some(kind))
}

/// Attribute bits compared by [`HwTpm::counter_probe`]: everything but TPMA_NV_WRITTEN (and the
/// lock bits, which are state too; none is ever set on this index because it has no lock
/// attributes).
fn counter_attr_bits(a: NvIndexAttributes) -> Result<u32> {
    const WRITTEN: u32 = 1 << 29;
    const WRITELOCKED: u32 = 1 << 11;
    const READLOCKED: u32 = 1 << 28;
    let raw =
        tss_esapi::tss2_esys::TPMA_NV::try_from(a).map_err(HwTpmError::tpm("NV attributes"))?;
    Ok(raw & !(WRITTEN | WRITELOCKED | READLOCKED))
}

impl HwTpm {
    /// The public area of the manager's store counter at `handle`:
    ///
    /// * `TPM_NT_COUNTER`: the TPM only ever increments it, and a counter defined anew starts
    ///   above the largest value any counter of this TPM ever had, so deleting and re-creating
    ///   it never takes it backwards;
    /// * `AUTHWRITE`: only the holder of its authorisation value may increment it. That value is
    ///   derived from the master secret (`crate::store::StoreKeys`), so only a manager that
    ///   unsealed the master secret (a host in an approved state) can move it — the owner
    ///   cannot; anyone else incrementing it could only make the manager refuse to start;
    /// * `AUTHREAD` + `OWNERREAD`: the manager reads it with its authorisation value (which also
    ///   proves the index is its own); an administrator may read it with owner authorisation
    ///   (`tpm2_nvread -C o 0x…`) to cross-check `xl-vtpm mgr status`. The value is not secret;
    /// * `NO_DA`: the authorisation value is 256 random bits, so dictionary-attack protection
    ///   adds nothing, and a lockout caused by someone else must not stop the manager;
    /// * not `ORDERLY`: every increment reaches the TPM's NV at once. An orderly counter may
    ///   jump ahead after an unorderly shutdown, which would read as a rolled-back store;
    /// * nameAlg SHA-256, no policy, 8 bytes.
    ///
    /// The owner (with owner authorisation) can still delete it; the manager then refuses to
    /// start rather than trust an unprotected store.
    pub fn store_counter_public(handle: u32) -> Result<NvPublic> {
        let attrs = NvIndexAttributesBuilder::new()
            .with_nv_index_type(NvIndexType::Counter)
            .with_auth_write(true)
            .with_auth_read(true)
            .with_owner_read(true)
            .with_no_da(true)
            .build()
            .map_err(HwTpmError::tpm("NV counter attributes"))?;
        NvPublicBuilder::new()
            .with_nv_index(NvIndexTpmHandle::new(handle).map_err(|_| {
                HwTpmError::InvalidArgument(format!("{handle:#010x} is not an NV index handle"))
            })?)
            .with_index_name_algorithm(HashingAlgorithm::Sha256)
            .with_index_attributes(attrs)
            .with_index_auth_policy(Digest::default())
            .with_data_area_size(8)
            .build()
            .map_err(HwTpmError::tpm("NV counter template"))
    }

    /// The NV index handles defined in `first..first + count`.
    pub fn nv_indices_in(&mut self, first: u32, count: u32) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let end = u64::from(first) + u64::from(count);
        let mut next = first;
        loop {
            let (data, more) = self
                .ctx
                .execute_without_session(|ctx| {
                    ctx.get_capability(CapabilityType::Handles, next, count)
                })
                .map_err(HwTpmError::tpm("GetCapability(NV handles)"))?;
            let CapabilityData::Handles(list) = data else {
                return Err(HwTpmError::Unexpected(
                    "GetCapability(handles) returned other data".into(),
                ));
            };
            let handles: Vec<u32> = list.into_inner().into_iter().map(u32::from).collect();
            let Some(&last) = handles.last() else { break };
            out.extend(
                handles
                    .into_iter()
                    .filter(|h| u64::from(*h) >= u64::from(first) && u64::from(*h) < end),
            );
            if !more || u64::from(last) + 1 >= end {
                break;
            }
            next = last + 1;
        }
        Ok(out)
    }

    /// ESYS handle of the NV index at `handle` with `auth` set as its authorisation value.
    fn open_nv(&mut self, handle: u32, auth: &[u8]) -> Result<NvIndexHandle> {
        // ESYS keeps one object per TPM handle: TR_FromTPMPublic would return the kept link's
        // object, and closing it afterwards would leave the link dangling. Drop the link first
        // (the next `counter_bump` opens a new one).
        if self.counter_link.as_ref().is_some_and(|l| l.handle == handle) {
            self.drop_counter_link();
        }
        let tpm_handle = NvIndexTpmHandle::new(handle).map_err(|_| {
            HwTpmError::InvalidArgument(format!("{handle:#010x} is not an NV index handle"))
        })?;
        let obj = self
            .ctx
            .execute_without_session(|ctx| ctx.tr_from_tpm_public(TpmHandle::NvIndex(tpm_handle)))
            .map_err(HwTpmError::tpm("TR_FromTPMPublic(NV counter)"))?;
        let auth = Auth::try_from(auth.to_vec()).map_err(HwTpmError::tpm("NV counter auth"))?;
        if let Err(e) = self.ctx.tr_set_auth(obj, auth) {
            self.close_nv(obj.into());
            return Err(HwTpmError::Tpm {
                op: "TR_SetAuth(NV counter)",
                source: e,
            });
        }
        Ok(obj.into())
    }

    fn close_nv(&mut self, h: NvIndexHandle) {
        let mut obj: ObjectHandle = h.into();
        if let Err(e) = self.ctx.tr_close(&mut obj) {
            xvtpm_log::guest_warn!(error = %e, "failed to close an NV index handle");
        }
    }

    /// Runs `f` with the NV index at `handle` opened with `auth`, in an SRK-salted HMAC session
    /// (the authorisation value never crosses the TPM bus in the clear). The outer error is a
    /// failure to set up; the inner result is the command's own.
    fn with_nv_session<T>(
        &mut self,
        handle: u32,
        auth: &[u8],
        f: impl FnOnce(&mut Context, NvIndexHandle) -> tss_esapi::Result<T>,
    ) -> Result<tss_esapi::Result<T>> {
        let nv = self.open_nv(handle, auth)?;
        let sess = match self.start_salted_session(SessionType::Hmac) {
            Ok(s) => s,
            Err(e) => {
                self.close_nv(nv);
                return Err(e);
            }
        };
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .build();
        let res = match self.ctx.tr_sess_set_attributes(sess, attrs, mask) {
            Ok(()) => Ok(self.ctx.execute_with_session(Some(sess), |ctx| f(ctx, nv))),
            Err(e) => Err(HwTpmError::Tpm {
                op: "TRSess_SetAttributes",
                source: e,
            }),
        };
        self.flush_session(sess);
        self.close_nv(nv);
        res
    }

    /// Defines the manager's store counter at `handle` (owner authorisation; see
    /// [`HwTpm::store_counter_public`]) with authorisation value `auth` (≤ 32 bytes). The counter
    /// has no value until its first [`HwTpm::counter_increment`].
    pub fn counter_define(&mut self, handle: u32, auth: &[u8]) -> Result<()> {
        let public = Self::store_counter_public(handle)?;
        let auth = Auth::try_from(auth.to_vec()).map_err(HwTpmError::tpm("NV counter auth"))?;
        // The authorisation value is a command parameter: send it encrypted.
        let sess = self.start_salted_session(SessionType::Hmac)?;
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_decrypt(true)
            .with_continue_session(true)
            .build();
        let res = self
            .ctx
            .tr_sess_set_attributes(sess, attrs, mask)
            .map_err(HwTpmError::tpm("TRSess_SetAttributes"))
            .and_then(|()| {
                self.ctx
                    .execute_with_session(Some(sess), |ctx| {
                        ctx.nv_define_space(Provision::Owner, Some(auth), public)
                    })
                    .map_err(HwTpmError::tpm("NV_DefineSpace(store counter)"))
            });
        self.flush_session(sess);
        let nv = res?;
        self.close_nv(nv);
        Ok(())
    }

    /// Removes the NV index at `handle` (owner authorisation).
    pub fn counter_undefine(&mut self, handle: u32) -> Result<()> {
        let nv = self.open_nv(handle, &[])?;
        let res = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.nv_undefine_space(Provision::Owner, nv)
            })
            .map_err(HwTpmError::tpm("NV_UndefineSpace(store counter)"));
        if res.is_err() {
            self.close_nv(nv);
        }
        res
    }

    /// Increments the manager's counter at `handle` and returns its new value (read back in the
    /// same session).
    pub fn counter_increment(&mut self, handle: u32, auth: &[u8]) -> Result<u64> {
        let buf = self
            .with_nv_session(handle, auth, |ctx, nv| {
                ctx.nv_increment(NvAuth::NvIndex(nv), nv)?;
                ctx.nv_read(NvAuth::NvIndex(nv), nv, 8, 0)
            })?
            .map_err(HwTpmError::tpm("NV_Increment + NV_Read(store counter)"))?;
        counter_value(buf.value())
    }

    /// Flushes the kept counter session and closes the kept counter handle, if any.
    fn drop_counter_link(&mut self) {
        if let Some(l) = self.counter_link.take() {
            self.flush_session(l.sess);
            self.close_nv(l.nv);
        }
    }

    /// Increments the manager's counter at `handle` — one `TPM2_NV_Increment`, in an SRK-salted
    /// HMAC session that stays open between calls (the authorisation value never crosses the
    /// TPM bus in the clear, as with [`HwTpm::counter_increment`]). It does not read the value
    /// back: the caller knows it (only the holder of `auth`, the manager under its instance
    /// lock, moves this counter; should anyone else, the store and the counter disagree and the
    /// next start refuses the store). On an error the session and handle are dropped, so the
    /// next call starts afresh; whether the increment happened is then unknown, and the caller
    /// must look ([`HwTpm::counter_probe`]).
    pub fn counter_bump(&mut self, handle: u32, auth: &[u8]) -> Result<()> {
        if self.counter_link.as_ref().is_some_and(|l| l.handle != handle || l.auth[..] != *auth) {
            self.drop_counter_link();
        }
        if self.counter_link.is_none() {
            let nv = self.open_nv(handle, auth)?;
            let sess = match self.hmac_session() {
                Ok(s) => s,
                Err(e) => {
                    self.close_nv(nv);
                    return Err(e);
                }
            };
            self.counter_link = Some(CounterLink { handle, auth: Zeroizing::new(auth.to_vec()), nv, sess });
        }
        let (nv, sess) = {
            let l = self.counter_link.as_ref().expect("set above");
            (l.nv, l.sess)
        };
        let res = self.ctx.execute_with_session(Some(sess), |ctx| ctx.nv_increment(NvAuth::NvIndex(nv), nv));
        if let Err(e) = res {
            self.drop_counter_link();
            return Err(HwTpmError::Tpm { op: "NV_Increment(store counter)", source: e });
        }
        Ok(())
    }

    /// Does the NV index at `handle` (which must exist) have the public area of
    /// [`HwTpm::store_counter_public`]? `Some(why)` if not.
    pub fn counter_template_mismatch(&mut self, handle: u32) -> Result<Option<String>> {
        let want = Self::store_counter_public(handle)?;
        let nv = self.open_nv(handle, &[])?;
        let public = self
            .ctx
            .execute_without_session(|ctx| ctx.nv_read_public(nv))
            .map_err(HwTpmError::tpm("NV_ReadPublic(store counter)"));
        self.close_nv(nv);
        let (public, _name) = public?;
        if public.name_algorithm() != want.name_algorithm()
            || counter_attr_bits(public.attributes())? != counter_attr_bits(want.attributes())?
            || !public.authorization_policy().value().is_empty()
            || public.data_size() != 8
        {
            return Ok(Some(format!(
                "its public area is not the manager's counter template (nameAlg {:?}, attributes {:#010x}, policy of {} bytes, {} bytes of data)",
                public.name_algorithm(),
                tss_esapi::tss2_esys::TPMA_NV::try_from(public.attributes()).unwrap_or(0),
                public.authorization_policy().value().len(),
                public.data_size()
            )));
        }
        Ok(None)
    }

    /// Looks at `handle`: is it the manager's counter (the public area of
    /// [`HwTpm::store_counter_public`] and authorisation value `auth`), and what is its value?
    pub fn counter_probe(&mut self, handle: u32, auth: &[u8]) -> Result<CounterProbe> {
        if !self.nv_indices_in(handle, 1)?.contains(&handle) {
            return Ok(CounterProbe::Missing);
        }
        if let Some(why) = self.counter_template_mismatch(handle)? {
            return Ok(CounterProbe::Foreign(why));
        }
        match self.with_nv_session(handle, auth, |ctx, nv| {
            ctx.nv_read(NvAuth::NvIndex(nv), nv, 8, 0)
        })? {
            Ok(buf) => Ok(CounterProbe::Value(counter_value(buf.value())?)),
            // Authorisation is checked before the written state, so this is the manager's own.
            Err(e) if is_kind(&e, Tss2ResponseCodeKind::NvUninitialized) => {
                Ok(CounterProbe::Unwritten)
            }
            Err(e)
                if is_kind(&e, Tss2ResponseCodeKind::AuthFail)
                    || is_kind(&e, Tss2ResponseCodeKind::BadAuth) =>
            {
                Ok(CounterProbe::Foreign(
                    "it does not accept the manager's authorisation value".into(),
                ))
            }
            Err(e) => Err(HwTpmError::Tpm {
                op: "NV_Read(store counter)",
                source: e,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_marshalling() {
        assert_eq!(
            marshal_pcr_selection(&[0, 2, 4, 7, 23]),
            vec![0, 0, 0, 1, 0, 0x0b, 3, 0x95, 0, 0x80]
        );
    }

    #[test]
    fn normalize() {
        assert_eq!(normalize_pcrs(&[7, 0, 7, 2]).unwrap(), vec![0, 2, 7]);
        assert!(normalize_pcrs(&[]).is_err());
        assert!(normalize_pcrs(&[24]).is_err());
    }

    #[test]
    fn secret_debug_redacts() {
        let s = Secret::new([0x41u8; 32]);
        let d = format!("{s:?}");
        assert!(!d.contains("65") && !d.contains("41"), "{d}");
    }

    #[test]
    fn record_json_roundtrip() {
        let r = AkRecord {
            version: 1,
            alg: AkAlg::EccP256,
            public: vec![1, 2],
            private: vec![0xff],
            name: vec![],
        };
        let j = serde_json::to_string(&r).unwrap();
        assert!(j.contains("\"ecc-p256\"") && j.contains("\"0102\""), "{j}");
        assert_eq!(serde_json::from_str::<AkRecord>(&j).unwrap(), r);
    }
}
