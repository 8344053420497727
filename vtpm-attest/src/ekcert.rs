//! Checking vTPM endorsement-key certificates (their format, building and parsing are
//! `vtpm_proto::ekcert`): a group's EK CA certificate, a vTPM's EK certificate against it, the
//! EK public area it certifies, and the [`CaCertify`] evidence that the CA key lives in the
//! same physical TPM as the group's AK. The manager runs the same checks on what it has just
//! issued; the tenant runs them offline (`xl-vtpm ekcert verify`).

use sha2::{Digest as _, Sha256};

use vtpm_proto::ekcert::{
    CaPublic, CertError, Certificate, EkPublic, EkType, TPM_ST_ATTEST_CERTIFY, check_critical, oid, sha256_name,
    split_spki,
};
use vtpm_proto::evidence::{EvidenceError, Reader};
use vtpm_proto::mgr::{CA_CERTIFY_VERSION, CaCertify};
use vtpm_proto::tpms::{AkPublic, TPM_GENERATED_VALUE, TpmSignature};

type Result<T> = std::result::Result<T, CertError>;

/// Checks that `ca` can act as an EK CA at time `now`: self-issued and self-signed (ECDSA P-256),
/// basicConstraints `cA=TRUE`, keyUsage `keyCertSign`, within its validity.
pub fn check_ca(ca: &Certificate, now: u64) -> Result<()> {
    if ca.issuer != ca.subject {
        return Err(CertError::NotACa("it is not self-issued (issuer differs from subject)".into()));
    }
    ca.verify_signature(&ca.spki, "CA certificate (self-signature)")?;
    if ca.is_ca()? != Some(true) {
        return Err(CertError::NotACa("basicConstraints cA is not TRUE".into()));
    }
    if ca.key_usage(5)? != Some(true) {
        return Err(CertError::NotACa("keyUsage does not include keyCertSign".into()));
    }
    check_critical(ca, "CA certificate")?;
    ca.check_validity(now, "the CA certificate")
}

/// What [`verify_ek_cert`] established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EkCertInfo {
    /// RSA-2048 or ECC P-256, from the certificate's key.
    pub ek_type: EkType,
    /// The certified key, DER SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
    /// Serial, hex.
    pub serial: String,
    /// `tcg-at-tpmManufacturer`.
    pub manufacturer: Option<String>,
    /// `tcg-at-tpmModel`.
    pub model: Option<String>,
    /// `tcg-at-tpmVersion`.
    pub version: Option<String>,
}

/// Verifies an EK certificate against the CA certificate `ca` at time `now`: `ca` passes
/// [`check_ca`]; the EK certificate names `ca`'s subject as issuer and verifies under its key;
/// it is within its validity; it is not a CA; its key is RSA or ECC with the keyUsage the TCG
/// profile gives an EK (keyEncipherment / keyAgreement); no unknown critical extension.
pub fn verify_ek_cert(ek: &Certificate, ca: &Certificate, now: u64) -> Result<EkCertInfo> {
    check_ca(ca, now)?;
    if ek.issuer != ca.subject {
        return Err(CertError::IssuerMismatch);
    }
    ek.verify_signature(&ca.spki, "EK certificate")?;
    ek.check_validity(now, "the EK certificate")?;
    if ek.is_ca()? == Some(true) {
        return Err(CertError::Extension("the EK certificate claims to be a CA".into()));
    }
    let (alg, _) = split_spki(&ek.spki)?;
    let (ek_type, bit, usage) = match alg {
        a if a == oid::RSA_ENCRYPTION => (EkType::Rsa2048, 2, "keyEncipherment"),
        a if a == oid::EC_PUBLIC_KEY => (EkType::EccP256, 4, "keyAgreement"),
        a => return Err(CertError::Unsupported(format!("EK key algorithm {a}"))),
    };
    if ek.key_usage(bit)? != Some(true) {
        return Err(CertError::Extension(format!("the EK certificate's keyUsage lacks {usage}")));
    }
    check_critical(ek, "EK certificate")?;
    let (manufacturer, model, version) = ek.tcg_tpm_attributes()?;
    Ok(EkCertInfo { ek_type, spki: ek.spki.clone(), serial: hex::encode(&ek.serial), manufacturer, model, version })
}

/// Checks that the EK certificate `ek` certifies exactly the EK whose public area is
/// `ek_public` (`TPM2B_PUBLIC` or `TPMT_PUBLIC`, e.g. from `tpm2_readpublic -o`).
pub fn check_ek_matches(ek: &Certificate, ek_public: &[u8]) -> Result<()> {
    let public = EkPublic::parse(ek_public)?;
    if public.spki_der()? != ek.spki {
        return Err(CertError::EkMismatch);
    }
    Ok(())
}


fn unhex(s: &str, what: &str) -> Result<Vec<u8>> {
    hex::decode(s).map_err(|_| CertError::Certify(format!("{what} is not hex")))
}

/// Verifies [`CaCertify`] evidence for the CA certificate `ca_der`:
///
/// 1. the evidence's AK equals `expected_ak` (the group's AK `TPMT_PUBLIC`, obtained out of band)
///    and is a restricted, fixedTPM signing key;
/// 2. the AK's signature over `attest` verifies;
/// 3. `attest` is TPM-generated (`TPM_GENERATED`), of type `TPM_ST_ATTEST_CERTIFY`, its
///    `extraData` is SHA-256 of `ca_der`, and its certified name is the SHA-256 name of
///    `ca_public`;
/// 4. `ca_public` is a fixedTPM, fixedParent, TPM-generated, unrestricted ECDSA P-256 signing key
///    (so it never left the TPM), and it is the key of the CA certificate.
pub fn verify_ca_certify(ca_der: &[u8], ev: &CaCertify, expected_ak: &[u8]) -> Result<CaPublic> {
    if ev.version != CA_CERTIFY_VERSION {
        return Err(CertError::Certify(format!("evidence version {} (this verifier reads {CA_CERTIFY_VERSION})", ev.version)));
    }
    let ak_public = unhex(&ev.ak_public, "ak_public")?;
    if ak_public != expected_ak {
        return Err(CertError::AkMismatch);
    }
    let ak = AkPublic::parse(&ak_public).map_err(|e| CertError::Certify(format!("AK: {e}")))?;
    let attest = unhex(&ev.attest, "attest")?;
    let sig = TpmSignature::parse(&unhex(&ev.signature, "signature")?).map_err(|e| CertError::Certify(e.to_string()))?;
    ak.verify_signature(&attest, &sig).map_err(|e| CertError::Certify(format!("AK signature over TPMS_ATTEST: {e}")))?;

    let m = |e: EvidenceError| CertError::Certify(format!("TPMS_ATTEST: {e}"));
    let mut r = Reader::new(&attest);
    let magic = r.u32("magic").map_err(m)?;
    if magic != TPM_GENERATED_VALUE {
        return Err(CertError::Certify(format!("TPMS_ATTEST magic {magic:#010x} is not TPM_GENERATED")));
    }
    let ty = r.u16("type").map_err(m)?;
    if ty != TPM_ST_ATTEST_CERTIFY {
        return Err(CertError::Certify(format!("TPMS_ATTEST type {ty:#06x} is not TPM_ST_ATTEST_CERTIFY (0x8017)")));
    }
    r.sized16("qualifiedSigner", 68).map_err(m)?;
    let extra = r.sized16("extraData", 64).map_err(m)?;
    r.bytes(17, "clockInfo").map_err(m)?;
    r.u64("firmwareVersion").map_err(m)?;
    let certified_name = r.sized16("certifyInfo.name", 68).map_err(m)?;
    r.sized16("certifyInfo.qualifiedName", 68).map_err(m)?;
    r.finish("TPMS_ATTEST").map_err(m)?;
    if extra != &Sha256::digest(ca_der)[..] {
        return Err(CertError::Certify("extraData is not SHA-256 of this CA certificate".into()));
    }
    let ca_public = unhex(&ev.ca_public, "ca_public")?;
    if certified_name != sha256_name(&ca_public).as_slice() {
        return Err(CertError::Certify("the certified object's name is not the name of ca_public".into()));
    }
    let ca = CaPublic::parse(&ca_public)?;
    let cert = Certificate::parse(ca_der)?;
    if cert.spki != ca.spki_der()? {
        return Err(CertError::Certify("the CA certificate's key is not the certified TPM key".into()));
    }
    Ok(ca)
}


// The EK-certificate fixtures are shared with the vtpm-proto crate's tests.
#[cfg(test)]
#[path = "../../vtpm-proto/tests/ekcert_fixtures/mod.rs"]
mod ekcert_fixtures;

#[cfg(test)]
mod tests {
    use super::*;
    use super::ekcert_fixtures::*;
    use p256::ecdsa::SigningKey;
    use uuid::Uuid;
    use vtpm_proto::ekcert::{assemble, ca_name, ca_tbs, ek_tbs, serial_from_random};

    #[test]
    fn ca_certificate_is_a_self_signed_ca() {
        let k = ca_key();
        let ca = make_ca(&k);
        check_ca(&ca, NOW).unwrap();
        assert_eq!(ca.issuer, ca.subject);
        assert_eq!(ca.is_ca().unwrap(), Some(true));
        assert_eq!(ca.key_usage(5).unwrap(), Some(true));
        assert_eq!(ca.serial.len(), 16);
        assert_eq!(ca.not_after, 253_402_300_799);
        assert!(matches!(check_ca(&ca, NOW - 1), Err(CertError::Validity { .. })));
        // A flipped byte in the body breaks the self-signature.
        let mut bad = ca.der.clone();
        let at = bad.len() / 2;
        bad[at] ^= 1;
        if let Ok(c) = Certificate::parse(&bad) {
            assert!(check_ca(&c, NOW).is_err());
        }
    }

    #[test]
    fn ek_certificates_verify_and_carry_the_tcg_fields() {
        let k = ca_key();
        let ca = make_ca(&k);
        for (ek_bytes, ty) in [(ecc_ek(), EkType::EccP256), (rsa_ek(), EkType::Rsa2048)] {
            let ek = EkPublic::parse(&ek_bytes).unwrap();
            assert_eq!(ek.ek_type(), ty);
            let tbs = ek_tbs(&serial_from_random([1; 16]), &ca, NOW, &ek, &info()).unwrap();
            let cert = Certificate::parse(&assemble(&tbs, &sign(&k, &tbs)).unwrap()).unwrap();
            let got = verify_ek_cert(&cert, &ca, NOW + 10).unwrap();
            assert_eq!(got.ek_type, ty);
            assert_eq!(got.manufacturer.as_deref(), Some("id:49424D00"));
            assert_eq!(got.model.as_deref(), Some("SW   TPM"));
            assert_eq!(got.version.as_deref(), Some("id:20191023"));
            assert_eq!(cert.subject, vec![0x30, 0x00]);
            assert!(cert.extension(oid::SUBJECT_ALT_NAME).unwrap().critical);
            check_ek_matches(&cert, &ek_bytes).unwrap();
            let other = if ty == EkType::EccP256 { rsa_ek() } else { ecc_ek() };
            assert_eq!(check_ek_matches(&cert, &other), Err(CertError::EkMismatch));
            // Another CA (another key, same name) does not verify it.
            let k2 = SigningKey::from_slice(&[8u8; 32]).unwrap();
            let ca2 = make_ca(&k2);
            assert_eq!(verify_ek_cert(&cert, &ca2, NOW), Err(CertError::SignatureInvalid("EK certificate")));
            // A CA with another name is not its issuer.
            let name3 = ca_name("other", &Uuid::from_u128(2)).unwrap();
            let tbs3 = ca_tbs(&[1], &name3, NOW, &ca_spki(&k)).unwrap();
            let ca3 = Certificate::parse(&assemble(&tbs3, &sign(&k, &tbs3)).unwrap()).unwrap();
            assert_eq!(verify_ek_cert(&cert, &ca3, NOW), Err(CertError::IssuerMismatch));
            // An EK certificate is no CA.
            assert!(matches!(check_ca(&cert, NOW), Err(CertError::NotACa(_))));
        }
    }
}
