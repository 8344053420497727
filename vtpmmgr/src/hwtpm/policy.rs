//! The master secret's policy: the PolicyPCR / PolicyAuthorize digests and TPM names computed in
//! software (also used by tests and verifiers), the admin's policy-signing key, the TPM-checked
//! signature over an approved policy, and re-authorisation of the current PCR values after a host
//! upgrade ([`HwTpm::reauthorize`]).

use p256::ecdsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
use sha2::{Digest as _, Sha256};
use tss_esapi::{
    attributes::ObjectAttributesBuilder,
    interface_types::{
        algorithm::{HashingAlgorithm, PublicAlgorithm},
        ecc::EccCurve,
        resource_handles::Hierarchy,
    },
    structures::{
        Digest, EccParameter, EccPoint, EccScheme, EccSignature, HashScheme, Name, Public,
        PublicBuilder, PublicEccParametersBuilder, Signature,
    },
    traits::{Marshall, UnMarshall},
};

use super::{HwTpm, HwTpmError, ProvisionRecord, Result, left_pad32};

/// `TPM_CC_PolicyPCR`.
const TPM_CC_POLICY_PCR: u32 = 0x0000_017F;
/// `TPM_CC_PolicyAuthorize`.
const TPM_CC_POLICY_AUTHORIZE: u32 = 0x0000_016A;
use vtpm_proto::evidence::TPM_ALG_SHA256;

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

pub(super) fn ahash(approved_policy: &[u8], policy_ref: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(approved_policy);
    h.update(policy_ref);
    h.finalize().into()
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
pub(super) fn policy_key_public(vk: &p256::ecdsa::VerifyingKey) -> Result<Public> {
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

impl HwTpm {
    /// Loads `public` (TPMT_PUBLIC bytes) of the admin policy key into the Owner hierarchy
    /// (public part only — a NULL-hierarchy key would give a NULL ticket, which PolicyAuthorize
    /// rejects), verifies `signature` over `digest` and returns (key name, verified ticket).
    pub(super) fn verify_policy_signature(
        &mut self,
        policy_pub: &[u8],
        digest: &[u8; 32],
        signature: &[u8],
    ) -> Result<(Name, tss_esapi::structures::VerifiedTicket)> {
        let public = Public::unmarshall(policy_pub)
            .map_err(HwTpmError::record("policy_pubkey"))?;
        let sig = Signature::unmarshall(signature)
            .map_err(HwTpmError::record("policy_signature"))?;
        self.release_kept_ak();
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
                .map_err(HwTpmError::PolicySignature)?;
            Ok((name, ticket))
        })();
        self.flush_object(key.into());
        res
    }

    /// Reads the current PCR values, builds the PolicyPCR digest, signs it with `sk` and checks
    /// the TPM accepts the signature (so a bad key fails here, not at the next boot).
    pub(super) fn authorize_current(
        &mut self,
        rec: &mut ProvisionRecord,
        sk: &p256::ecdsa::SigningKey,
    ) -> Result<()> {
        let values = self.pcr_read(&rec.pcrs)?;
        let approved = policy_pcr_digest(&rec.pcrs, &values);
        let a = ahash(&approved, &rec.policy_ref);
        let sig: p256::ecdsa::Signature = sk
            .sign_prehash(&a)
            .map_err(HwTpmError::policy_key("signing"))?;
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
                .map_err(HwTpmError::unexpected("self-verify"))?;
        }
        Ok(new)
    }
}
