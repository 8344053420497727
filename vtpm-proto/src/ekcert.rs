//! vTPM endorsement-key certificates: the X.509 side.
//!
//! Each manager group has an **EK CA**: an ECDSA P-256 signing key created in the physical TPM
//! under the manager's SRK, a self-signed CA certificate for it, and a `TPM2_Certify` of that key
//! by the group's attestation key ([`crate::mgr::CaCertify`]), which proves the CA key lives in the same TPM
//! as the AK that signs deep quotes. When a vTPM is manufactured, the manager issues an EK
//! certificate for its EK public key; the vTPM stores it at the TCG NV index.
//!
//! This module builds and parses the certificates, with DER done by the `der` crate and
//! signatures checked by `p256`; the signing itself happens in the physical TPM (the manager
//! hands [`Tbs::digest`] to `TPM2_Sign` and [`assemble`]s the result). Nothing here does I/O.
//! Checking a certificate against its CA is the verifier's (`vtpm_attest::ekcert`).
//!
//! **CA certificate**: X.509 v3, issuer = subject = `O=xvtpm, OU=vTPM EK CA, CN=<group name>,
//! serialNumber=<group UUID>`, ecdsa-with-SHA256, validity from issuance to 9999-12-31 (RFC 5280
//! "no well-defined expiration"), basicConstraints critical `cA=TRUE, pathLen=0`, keyUsage critical
//! `keyCertSign, cRLSign`, subjectKeyIdentifier.
//!
//! **EK certificate** (TCG EK Credential Profile for TPM 2.0 shape): empty subject; subjectAltName
//! (critical, because the subject is empty) with a directoryName of `tcg-at-tpmManufacturer`
//! (`id:XXXXXXXX`), `tcg-at-tpmModel` and `tcg-at-tpmVersion` (`id:XXXXXXXX`); basicConstraints
//! critical `cA=FALSE`; keyUsage critical `keyEncipherment` (RSA EK) or `keyAgreement` (ECC EK);
//! extendedKeyUsage `tcg-kp-EKCertificate`; authorityKeyIdentifier; subjectDirectoryAttributes with
//! `tcg-at-tpmSpecification` (family, level, revision); a random positive 128-bit serial; the same
//! long validity as the CA.

use der::asn1::{
    AnyRef, BitStringRef, GeneralizedTime, ObjectIdentifier, OctetStringRef, PrintableStringRef, UintRef, UtcTime,
    Utf8StringRef,
};
use der::{DateTime, Decode, Encode, Reader as _, SliceReader, Tag, TagNumber, Tagged};
use p256::ecdsa::signature::Verifier as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use crate::evidence::{EvidenceError, Reader};
use crate::mgr::TpmInfo;

/// Object identifiers used in the certificates.
pub mod oid {
    use der::asn1::ObjectIdentifier as O;
    /// ecdsa-with-SHA256 (RFC 5758).
    pub const ECDSA_WITH_SHA256: O = O::new_unwrap("1.2.840.10045.4.3.2");
    /// id-ecPublicKey.
    pub const EC_PUBLIC_KEY: O = O::new_unwrap("1.2.840.10045.2.1");
    /// rsaEncryption.
    pub const RSA_ENCRYPTION: O = O::new_unwrap("1.2.840.113549.1.1.1");
    /// commonName.
    pub const AT_COMMON_NAME: O = O::new_unwrap("2.5.4.3");
    /// serialNumber (attribute).
    pub const AT_SERIAL_NUMBER: O = O::new_unwrap("2.5.4.5");
    /// organizationName.
    pub const AT_ORGANIZATION: O = O::new_unwrap("2.5.4.10");
    /// organizationalUnitName.
    pub const AT_ORGANIZATIONAL_UNIT: O = O::new_unwrap("2.5.4.11");
    /// subjectDirectoryAttributes.
    pub const SUBJECT_DIRECTORY_ATTRIBUTES: O = O::new_unwrap("2.5.29.9");
    /// subjectKeyIdentifier.
    pub const SUBJECT_KEY_IDENTIFIER: O = O::new_unwrap("2.5.29.14");
    /// keyUsage.
    pub const KEY_USAGE: O = O::new_unwrap("2.5.29.15");
    /// subjectAltName.
    pub const SUBJECT_ALT_NAME: O = O::new_unwrap("2.5.29.17");
    /// basicConstraints.
    pub const BASIC_CONSTRAINTS: O = O::new_unwrap("2.5.29.19");
    /// certificatePolicies.
    pub const CERTIFICATE_POLICIES: O = O::new_unwrap("2.5.29.32");
    /// authorityKeyIdentifier.
    pub const AUTHORITY_KEY_IDENTIFIER: O = O::new_unwrap("2.5.29.35");
    /// extKeyUsage.
    pub const EXT_KEY_USAGE: O = O::new_unwrap("2.5.29.37");
    /// tcg-at-tpmManufacturer.
    pub const TCG_AT_TPM_MANUFACTURER: O = O::new_unwrap("2.23.133.2.1");
    /// tcg-at-tpmModel.
    pub const TCG_AT_TPM_MODEL: O = O::new_unwrap("2.23.133.2.2");
    /// tcg-at-tpmVersion.
    pub const TCG_AT_TPM_VERSION: O = O::new_unwrap("2.23.133.2.3");
    /// tcg-at-tpmSpecification.
    pub const TCG_AT_TPM_SPECIFICATION: O = O::new_unwrap("2.23.133.2.16");
    /// tcg-kp-EKCertificate.
    pub const TCG_KP_EK_CERTIFICATE: O = O::new_unwrap("2.23.133.8.1");
}

/// NV index of the RSA-2048 EK certificate (TCG EK Credential Profile, low range).
pub const EK_CERT_NV_RSA2048: u32 = 0x01C0_0002;
/// NV index of the ECC NIST P-256 EK certificate.
pub const EK_CERT_NV_ECC_P256: u32 = 0x01C0_000A;
pub use tpm_wire::TPM2_ST_ATTEST_CERTIFY as TPM_ST_ATTEST_CERTIFY;
/// Largest certificate accepted anywhere (an EK certificate is about 800 bytes; the TCG index
/// size limit of most TPMs is 2048).
pub const MAX_CERT_LEN: usize = 2048;

/// Why a certificate, an EK public area or a certification was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// DER encoding or decoding failed.
    #[error("{what}: DER: {detail}")]
    Der {
        /// What was being encoded or parsed.
        what: &'static str,
        /// The `der` crate's message.
        detail: String,
    },
    /// A structure has the wrong shape.
    #[error("{0}")]
    Malformed(String),
    /// The EK public area is not a TCG default EK.
    #[error("EK public area: {0}")]
    NotAnEk(String),
    /// A TPM property is out of range.
    #[error("TPM properties: {0}")]
    TpmInfo(String),
    /// An algorithm or key this code does not handle.
    #[error("unsupported {0}")]
    Unsupported(String),
    /// A signature does not verify.
    #[error("{0}: signature does not verify")]
    SignatureInvalid(&'static str),
    /// The certificate was not issued by this CA.
    #[error("the certificate's issuer is not the CA's subject: it was not issued by this CA")]
    IssuerMismatch,
    /// The CA certificate cannot act as a CA.
    #[error("CA certificate: {0}")]
    NotACa(String),
    /// Outside the validity period.
    #[error("{what} is not valid at {now} (valid {not_before}..={not_after}, seconds since the epoch)")]
    Validity {
        /// Which certificate.
        what: &'static str,
        /// The time checked.
        now: u64,
        /// notBefore.
        not_before: u64,
        /// notAfter.
        not_after: u64,
    },
    /// An extension is missing or wrong.
    #[error("{0}")]
    Extension(String),
    /// The EK in the certificate is not the expected one.
    #[error("the certificate's public key is not the EK read from the TPM")]
    EkMismatch,
    /// The certification names another AK than the expected one.
    #[error("the CA certification is signed by another AK than the expected one (compare with `xl-vtpm mgr group ak`)")]
    AkMismatch,
    /// The certification evidence does not hold.
    #[error("CA certification: {0}")]
    Certify(String),
}

impl CertError {
    fn der(what: &'static str) -> impl FnOnce(der::Error) -> CertError {
        move |e| CertError::Der { what, detail: e.to_string() }
    }
}

fn malformed(what: impl Into<String>) -> CertError {
    CertError::Malformed(what.into())
}

type Result<T> = std::result::Result<T, CertError>;

// ---------------------------------------------------------------------------------------------
// TPM side: EK public areas and properties
// ---------------------------------------------------------------------------------------------

/// Which TCG default EK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EkType {
    /// RSA-2048, template L-1.
    #[serde(rename = "rsa-2048")]
    Rsa2048,
    /// ECC NIST P-256, template L-2.
    #[serde(rename = "ecc-p256")]
    EccP256,
}

impl EkType {
    /// The TCG NV index of this EK's certificate.
    pub fn cert_nv_index(self) -> u32 {
        match self {
            EkType::Rsa2048 => EK_CERT_NV_RSA2048,
            EkType::EccP256 => EK_CERT_NV_ECC_P256,
        }
    }
}

impl std::fmt::Display for EkType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EkType::Rsa2048 => "rsa-2048",
            EkType::EccP256 => "ecc-p256",
        })
    }
}

/// authPolicy of the TCG default EK templates: `PolicySecret(TPM_RH_ENDORSEMENT)`.
const EK_AUTH_POLICY: [u8; 32] = [
    0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24, 0xfd, 0x52, 0xd7,
    0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa,
];

/// The bytes of a TCG default EK template before `unique` (identical for every EK of the kind).
pub fn template_head(t: EkType) -> Vec<u8> {
    let mut h = Vec::with_capacity(64);
    let (ty, params): (u16, &[u16]) = match t {
        // symmetric AES-128-CFB, scheme NULL, keyBits 2048, (exponent follows)
        EkType::Rsa2048 => (0x0001, &[0x0006, 128, 0x0043, 0x0010, 2048]),
        // symmetric AES-128-CFB, scheme NULL, curve NIST P-256, kdf NULL
        EkType::EccP256 => (0x0023, &[0x0006, 128, 0x0043, 0x0010, 0x0003, 0x0010]),
    };
    h.extend_from_slice(&ty.to_be_bytes());
    h.extend_from_slice(&0x000Bu16.to_be_bytes()); // nameAlg SHA-256
    // fixedTPM | fixedParent | sensitiveDataOrigin | adminWithPolicy | restricted | decrypt
    h.extend_from_slice(&0x0003_00B2u32.to_be_bytes());
    h.extend_from_slice(&32u16.to_be_bytes());
    h.extend_from_slice(&EK_AUTH_POLICY);
    for p in params {
        h.extend_from_slice(&p.to_be_bytes());
    }
    if t == EkType::Rsa2048 {
        h.extend_from_slice(&0u32.to_be_bytes()); // exponent: default (65537)
    }
    h
}

/// A vTPM's EK public area that follows a TCG default template (L-1 or L-2) exactly, apart from
/// the key itself. Only such keys are certified: they are restricted decryption keys that never
/// leave the TPM, with the TCG EK policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EkPublic {
    ty: EkType,
    tpmt: Vec<u8>,
    key: Vec<u8>,
}

impl EkPublic {
    /// Parses a `TPM2B_PUBLIC` (as `TPM2_ReadPublic` returns it and `tpm2_readpublic -o` writes
    /// it) or a bare `TPMT_PUBLIC`.
    pub fn parse(bytes: &[u8]) -> Result<EkPublic> {
        let tpmt = match bytes {
            [a, b, rest @ ..] if usize::from(u16::from_be_bytes([*a, *b])) == rest.len() => rest,
            _ => bytes,
        };
        let ty = match tpmt.get(..2) {
            Some([0x00, 0x01]) => EkType::Rsa2048,
            Some([0x00, 0x23]) => EkType::EccP256,
            _ => return Err(CertError::NotAnEk("type is neither RSA nor ECC".into())),
        };
        let head = template_head(ty);
        if tpmt.get(..head.len()) != Some(&head[..]) {
            return Err(CertError::NotAnEk(format!(
                "not the TCG default {ty} EK template (attributes, policy, symmetric or scheme differ)"
            )));
        }
        let mut r = Reader::new(&tpmt[head.len()..]);
        let bad = |e: EvidenceError| CertError::NotAnEk(e.to_string());
        let key = match ty {
            EkType::Rsa2048 => {
                let n = r.sized16("unique.rsa", 512).map_err(bad)?;
                if n.len() != 256 || n[0] & 0x80 == 0 {
                    return Err(CertError::NotAnEk("the RSA modulus is not 2048 bits".into()));
                }
                n.to_vec()
            }
            EkType::EccP256 => {
                let x = r.sized16("unique.ecc.x", 32).map_err(bad)?;
                let y = r.sized16("unique.ecc.y", 32).map_err(bad)?;
                let mut point = vec![0x04];
                point.extend_from_slice(&left_pad(x)?);
                point.extend_from_slice(&left_pad(y)?);
                point
            }
        };
        r.finish("TPMT_PUBLIC").map_err(bad)?;
        let ek = EkPublic { ty, tpmt: tpmt.to_vec(), key };
        ek.spki_der()?; // the crypto libraries accept the key
        Ok(ek)
    }

    /// RSA-2048 or ECC P-256.
    pub fn ek_type(&self) -> EkType {
        self.ty
    }

    /// The marshalled `TPMT_PUBLIC`.
    pub fn tpmt(&self) -> &[u8] {
        &self.tpmt
    }

    /// The EK's TPM name: `0x000b ‖ SHA-256(TPMT_PUBLIC)`.
    pub fn name(&self) -> Vec<u8> {
        sha256_name(&self.tpmt)
    }

    /// The key as an X.509 SubjectPublicKeyInfo (rsaEncryption, or id-ecPublicKey on prime256v1
    /// with an uncompressed point), DER.
    pub fn spki_der(&self) -> Result<Vec<u8>> {
        let bad = |_| CertError::NotAnEk("the crypto library rejects the public key".into());
        match self.ty {
            EkType::Rsa2048 => {
                use rsa::pkcs8::EncodePublicKey as _;
                let k = rsa::RsaPublicKey::new(rsa::BigUint::from_bytes_be(&self.key), rsa::BigUint::from(65537u32))
                    .map_err(|_| CertError::NotAnEk("the RSA key is invalid".into()))?;
                Ok(k.to_public_key_der().map_err(bad)?.as_bytes().to_vec())
            }
            EkType::EccP256 => {
                use p256::pkcs8::EncodePublicKey as _;
                let k = p256::PublicKey::from_sec1_bytes(&self.key)
                    .map_err(|_| CertError::NotAnEk("the point is not on P-256".into()))?;
                Ok(k.to_public_key_der().map_err(bad)?.as_bytes().to_vec())
            }
        }
    }
}

fn left_pad(b: &[u8]) -> Result<[u8; 32]> {
    if b.len() > 32 {
        return Err(malformed("an ECC coordinate is longer than 32 bytes"));
    }
    let mut out = [0u8; 32];
    out[32 - b.len()..].copy_from_slice(b);
    Ok(out)
}

/// `0x000b ‖ SHA-256(TPMT_PUBLIC)`.
pub fn sha256_name(tpmt: &[u8]) -> Vec<u8> {
    let mut n = vec![0x00, 0x0B];
    n.extend_from_slice(&Sha256::digest(tpmt));
    n
}

// ---------------------------------------------------------------------------------------------
// DER helpers (every tag and length is written by the `der` crate)
// ---------------------------------------------------------------------------------------------

fn tlv(tag: Tag, content: &[u8]) -> Result<Vec<u8>> {
    AnyRef::new(tag, content).and_then(|a| a.to_der()).map_err(CertError::der("TLV"))
}

fn seq(parts: &[&[u8]]) -> Result<Vec<u8>> {
    tlv(Tag::Sequence, &parts.concat())
}

/// A SET OF with exactly one element (so DER ordering is trivially satisfied).
fn set1(part: &[u8]) -> Result<Vec<u8>> {
    tlv(Tag::Set, part)
}

fn context(n: u8, constructed: bool, content: &[u8]) -> Result<Vec<u8>> {
    tlv(Tag::ContextSpecific { constructed, number: TagNumber::new(n) }, content)
}

fn enc<T: Encode>(what: &'static str, v: T) -> Result<Vec<u8>> {
    v.to_der().map_err(CertError::der(what))
}

fn oid(o: ObjectIdentifier) -> Result<Vec<u8>> {
    enc("OID", o)
}

fn utf8(s: &str) -> Result<Vec<u8>> {
    enc("UTF8String", Utf8StringRef::new(s).map_err(CertError::der("UTF8String"))?)
}

fn printable(s: &str) -> Result<Vec<u8>> {
    enc("PrintableString", PrintableStringRef::new(s).map_err(CertError::der("PrintableString"))?)
}

fn octets(b: &[u8]) -> Result<Vec<u8>> {
    enc("OCTET STRING", OctetStringRef::new(b).map_err(CertError::der("OCTET STRING"))?)
}

fn bits(unused: u8, b: &[u8]) -> Result<Vec<u8>> {
    enc("BIT STRING", BitStringRef::new(unused, b).map_err(CertError::der("BIT STRING"))?)
}

fn algid_ecdsa_sha256() -> Result<Vec<u8>> {
    seq(&[&oid(oid::ECDSA_WITH_SHA256)?])
}

/// A Name of one-attribute RDNs, in order.
fn name(attrs: &[(ObjectIdentifier, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut rdns = Vec::new();
    for (o, v) in attrs {
        rdns.extend(set1(&seq(&[&oid(*o)?, v])?)?);
    }
    tlv(Tag::Sequence, &rdns)
}

fn time(secs: u64) -> Result<Vec<u8>> {
    let d = std::time::Duration::from_secs(secs);
    // RFC 5280: UTCTime through 2049, GeneralizedTime from 2050.
    if secs < 2_524_608_000 {
        enc("UTCTime", UtcTime::from_unix_duration(d).map_err(CertError::der("UTCTime"))?)
    } else {
        enc("GeneralizedTime", GeneralizedTime::from_unix_duration(d).map_err(CertError::der("GeneralizedTime"))?)
    }
}

fn validity(not_before: u64) -> Result<Vec<u8>> {
    let forever = DateTime::new(9999, 12, 31, 23, 59, 59).map_err(CertError::der("notAfter"))?;
    let not_after = enc("GeneralizedTime", GeneralizedTime::from_date_time(forever))?;
    seq(&[&time(not_before)?, &not_after])
}

fn extension(o: ObjectIdentifier, critical: bool, value: &[u8]) -> Result<Vec<u8>> {
    if critical {
        seq(&[&oid(o)?, &enc("BOOLEAN", true)?, &octets(value)?])
    } else {
        seq(&[&oid(o)?, &octets(value)?])
    }
}

/// The key identifier of an SPKI: the leftmost 160 bits of SHA-256 of the subjectPublicKey bits
/// (RFC 7093, method 1).
pub fn key_identifier(spki_der: &[u8]) -> Result<Vec<u8>> {
    let (_, key_bits) = split_spki(spki_der)?;
    Ok(Sha256::digest(key_bits)[..20].to_vec())
}

/// (algorithm OID, subjectPublicKey bits) of an SPKI.
pub fn split_spki(spki_der: &[u8]) -> Result<(ObjectIdentifier, &[u8])> {
    let spki = seq_reader(spki_der, "SubjectPublicKeyInfo")?;
    let (mut r, _) = spki;
    let alg: AnyRef<'_> = r.decode().map_err(CertError::der("SPKI algorithm"))?;
    let (mut a, _) = seq_reader_any(alg, "SPKI algorithm")?;
    let alg_oid: ObjectIdentifier = a.decode().map_err(CertError::der("SPKI algorithm OID"))?;
    let key: BitStringRef<'_> = r.decode().map_err(CertError::der("SPKI key"))?;
    let key = key.as_bytes().ok_or_else(|| malformed("SPKI key has unused bits"))?;
    r.finish(()).map_err(CertError::der("SPKI"))?;
    Ok((alg_oid, key))
}

// ---------------------------------------------------------------------------------------------
// Building
// ---------------------------------------------------------------------------------------------

/// A to-be-signed certificate (DER `TBSCertificate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tbs(Vec<u8>);

impl Tbs {
    /// The DER bytes.
    pub fn der(&self) -> &[u8] {
        &self.0
    }

    /// SHA-256 of the DER bytes: what the CA key signs (ecdsa-with-SHA256).
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(&self.0).into()
    }
}

/// A certificate serial from 16 random bytes: positive and exactly 16 bytes long.
pub fn serial_from_random(mut r: [u8; 16]) -> [u8; 16] {
    r[0] = (r[0] & 0x7f) | 0x40;
    r
}

/// The CA's distinguished name: `O=xvtpm, OU=vTPM EK CA, CN=<group name>, serialNumber=<group UUID>`.
pub fn ca_name(group_name: &str, group: &Uuid) -> Result<Vec<u8>> {
    if group_name.is_empty() || group_name.len() > 64 {
        return Err(malformed(format!("group name {group_name:?} does not fit a commonName (1-64 characters)")));
    }
    name(&[
        (oid::AT_ORGANIZATION, utf8("xvtpm")?),
        (oid::AT_ORGANIZATIONAL_UNIT, utf8("vTPM EK CA")?),
        (oid::AT_COMMON_NAME, utf8(group_name)?),
        (oid::AT_SERIAL_NUMBER, printable(&group.to_string())?),
    ])
}

fn tbs(serial: &[u8], issuer: &[u8], not_before: u64, subject: &[u8], spki: &[u8], exts: &[Vec<u8>]) -> Result<Tbs> {
    let version = context(0, true, &enc("version", 2u8)?)?;
    let serial = enc("serial", UintRef::new(serial).map_err(CertError::der("serial"))?)?;
    let exts = context(3, true, &tlv(Tag::Sequence, &exts.concat())?)?;
    Ok(Tbs(seq(&[&version, &serial, &algid_ecdsa_sha256()?, issuer, &validity(not_before)?, subject, spki, &exts])?))
}

/// The CA's self-signed certificate body. `name` from [`ca_name`], `spki` the CA key's
/// SubjectPublicKeyInfo ([`CaPublic::spki_der`]).
pub fn ca_tbs(serial: &[u8], name: &[u8], not_before: u64, spki: &[u8]) -> Result<Tbs> {
    let exts = [
        extension(oid::BASIC_CONSTRAINTS, true, &seq(&[&enc("cA", true)?, &enc("pathLen", 0u8)?])?)?,
        // keyCertSign (5) | cRLSign (6): 0000 0110, one unused bit.
        extension(oid::KEY_USAGE, true, &bits(1, &[0x06])?)?,
        extension(oid::SUBJECT_KEY_IDENTIFIER, false, &octets(&key_identifier(spki)?)?)?,
    ];
    tbs(serial, name, not_before, name, spki, &exts)
}

/// An EK certificate body (TCG EK Credential Profile shape, see the module docs), issued by the
/// CA whose certificate is `ca`.
pub fn ek_tbs(serial: &[u8], ca: &Certificate, not_before: u64, ek: &EkPublic, tpm: &TpmInfo) -> Result<Tbs> {
    tpm.validate().map_err(|e| CertError::TpmInfo(e.0))?;
    let san_name = name(&[
        (oid::TCG_AT_TPM_MANUFACTURER, utf8(&tpm.manufacturer_id())?),
        (oid::TCG_AT_TPM_MODEL, utf8(&tpm.model)?),
        (oid::TCG_AT_TPM_VERSION, utf8(&tpm.version_id())?),
    ])?;
    // GeneralName directoryName is [4] EXPLICIT (Name is a CHOICE).
    let san = seq(&[&context(4, true, &san_name)?])?;
    let key_usage = match ek.ek_type() {
        EkType::Rsa2048 => bits(5, &[0x20])?, // keyEncipherment (2)
        EkType::EccP256 => bits(3, &[0x08])?, // keyAgreement (4)
    };
    let spec = seq(&[&utf8(&tpm.family)?, &enc("level", tpm.level)?, &enc("revision", tpm.revision)?])?;
    let sda = seq(&[&seq(&[&oid(oid::TCG_AT_TPM_SPECIFICATION)?, &set1(&spec)?])?])?;
    let aki = seq(&[&context(0, false, &key_identifier(&ca.spki)?)?])?;
    let exts = [
        extension(oid::BASIC_CONSTRAINTS, true, &seq(&[])?)?,
        extension(oid::KEY_USAGE, true, &key_usage)?,
        extension(oid::EXT_KEY_USAGE, false, &seq(&[&oid(oid::TCG_KP_EK_CERTIFICATE)?])?)?,
        extension(oid::AUTHORITY_KEY_IDENTIFIER, false, &aki)?,
        extension(oid::SUBJECT_ALT_NAME, true, &san)?,
        extension(oid::SUBJECT_DIRECTORY_ATTRIBUTES, false, &sda)?,
    ];
    let empty_subject = seq(&[])?;
    tbs(serial, &ca.subject, not_before, &empty_subject, &ek.spki_der()?, &exts)
}

/// The certificate: `tbs`, ecdsa-with-SHA256, and the signature (DER `ECDSA-Sig-Value`).
pub fn assemble(tbs: &Tbs, ecdsa_sig_der: &[u8]) -> Result<Vec<u8>> {
    seq(&[tbs.der(), &algid_ecdsa_sha256()?, &bits(0, ecdsa_sig_der)?])
}

/// The DER `ECDSA-Sig-Value` of a P-256 signature given as `(r, s)` (as `TPM2_Sign` returns it).
pub fn ecdsa_sig_der(r: &[u8; 32], s: &[u8; 32]) -> Result<Vec<u8>> {
    let sig = p256::ecdsa::Signature::from_scalars(*r, *s).map_err(|_| malformed("ECDSA signature scalars out of range"))?;
    Ok(sig.to_der().as_bytes().to_vec())
}

/// PEM (`-----BEGIN CERTIFICATE-----`) of a DER certificate.
pub fn to_pem(der: &[u8]) -> Result<String> {
    der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, der)
        .map_err(|e| CertError::Der { what: "PEM", detail: e.to_string() })
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

fn seq_reader<'a>(der_bytes: &'a [u8], what: &'static str) -> Result<(SliceReader<'a>, AnyRef<'a>)> {
    let any = AnyRef::from_der(der_bytes).map_err(CertError::der(what))?;
    seq_reader_any(any, what)
}

fn seq_reader_any<'a>(any: AnyRef<'a>, what: &'static str) -> Result<(SliceReader<'a>, AnyRef<'a>)> {
    if any.tag() != Tag::Sequence {
        return Err(malformed(format!("{what}: expected a SEQUENCE, found {}", any.tag())));
    }
    Ok((SliceReader::new(any.value()).map_err(CertError::der(what))?, any))
}

fn raw(any: AnyRef<'_>, what: &'static str) -> Result<Vec<u8>> {
    any.to_der().map_err(CertError::der(what))
}

fn parse_time(any: AnyRef<'_>) -> Result<u64> {
    let d = match any.tag() {
        Tag::UtcTime => any.decode_as::<UtcTime>().map_err(CertError::der("UTCTime"))?.to_unix_duration(),
        Tag::GeneralizedTime => {
            any.decode_as::<GeneralizedTime>().map_err(CertError::der("GeneralizedTime"))?.to_unix_duration()
        }
        t => return Err(malformed(format!("validity: {t} is not a time"))),
    };
    Ok(d.as_secs())
}

/// One certificate extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// `extnID`.
    pub oid: ObjectIdentifier,
    /// `critical`.
    pub critical: bool,
    /// `extnValue` contents (the extension's own DER).
    pub value: Vec<u8>,
}

/// A parsed X.509 v3 certificate (only what the EK checks need).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    /// The whole certificate, DER.
    pub der: Vec<u8>,
    /// `tbsCertificate`, DER: the signed bytes.
    pub tbs: Vec<u8>,
    /// `signatureAlgorithm`.
    pub signature_algorithm: ObjectIdentifier,
    /// `signatureValue` bits.
    pub signature: Vec<u8>,
    /// `serialNumber` contents (big-endian).
    pub serial: Vec<u8>,
    /// `issuer`, DER.
    pub issuer: Vec<u8>,
    /// `subject`, DER.
    pub subject: Vec<u8>,
    /// notBefore, seconds since the epoch.
    pub not_before: u64,
    /// notAfter, seconds since the epoch.
    pub not_after: u64,
    /// `subjectPublicKeyInfo`, DER.
    pub spki: Vec<u8>,
    /// Extensions, in order.
    pub extensions: Vec<Extension>,
}

impl Certificate {
    /// Parses a DER certificate, or a PEM one (`-----BEGIN CERTIFICATE-----`).
    pub fn from_pem_or_der(bytes: &[u8]) -> Result<Certificate> {
        if bytes.starts_with(b"-----BEGIN") {
            let (label, der) = der::pem::decode_vec(bytes).map_err(|e| CertError::Der { what: "PEM", detail: e.to_string() })?;
            if label != "CERTIFICATE" {
                return Err(malformed(format!("PEM label {label:?}: expected CERTIFICATE")));
            }
            return Certificate::parse(&der);
        }
        Certificate::parse(bytes)
    }

    /// Parses a DER X.509 v3 certificate (no trailing bytes).
    pub fn parse(der_bytes: &[u8]) -> Result<Certificate> {
        if der_bytes.len() > MAX_CERT_LEN {
            return Err(malformed(format!("certificate of {} bytes exceeds {MAX_CERT_LEN}", der_bytes.len())));
        }
        let (mut r, _) = seq_reader(der_bytes, "Certificate")?;
        let tbs_any: AnyRef<'_> = r.decode().map_err(CertError::der("tbsCertificate"))?;
        let alg: AnyRef<'_> = r.decode().map_err(CertError::der("signatureAlgorithm"))?;
        let sig: BitStringRef<'_> = r.decode().map_err(CertError::der("signatureValue"))?;
        r.finish(()).map_err(CertError::der("Certificate"))?;
        let (mut a, _) = seq_reader_any(alg, "signatureAlgorithm")?;
        let signature_algorithm: ObjectIdentifier = a.decode().map_err(CertError::der("signatureAlgorithm"))?;
        let signature = sig.as_bytes().ok_or_else(|| malformed("signatureValue has unused bits"))?.to_vec();

        let (mut t, _) = seq_reader_any(tbs_any, "tbsCertificate")?;
        let v0 = Tag::ContextSpecific { constructed: true, number: TagNumber::N0 };
        let mut next: AnyRef<'_> = t.decode().map_err(CertError::der("tbsCertificate"))?;
        if next.tag() == v0 {
            let version = u8::from_der(next.value()).map_err(CertError::der("version"))?;
            if version != 2 {
                return Err(malformed(format!("certificate version {} is not v3", u32::from(version) + 1)));
            }
            next = t.decode().map_err(CertError::der("serialNumber"))?;
        } else {
            return Err(malformed("certificate version 1 (no extensions) is not accepted"));
        }
        let serial = next.decode_as::<UintRef<'_>>().map_err(CertError::der("serialNumber"))?.as_bytes().to_vec();
        let inner_alg: AnyRef<'_> = t.decode().map_err(CertError::der("signature"))?;
        if inner_alg != alg {
            return Err(malformed("tbsCertificate.signature differs from signatureAlgorithm"));
        }
        let issuer = raw(t.decode().map_err(CertError::der("issuer"))?, "issuer")?;
        let validity: AnyRef<'_> = t.decode().map_err(CertError::der("validity"))?;
        let (mut v, _) = seq_reader_any(validity, "validity")?;
        let not_before = parse_time(v.decode().map_err(CertError::der("notBefore"))?)?;
        let not_after = parse_time(v.decode().map_err(CertError::der("notAfter"))?)?;
        v.finish(()).map_err(CertError::der("validity"))?;
        let subject = raw(t.decode().map_err(CertError::der("subject"))?, "subject")?;
        let spki = raw(t.decode().map_err(CertError::der("subjectPublicKeyInfo"))?, "subjectPublicKeyInfo")?;
        let mut extensions = Vec::new();
        while !t.is_finished() {
            let any: AnyRef<'_> = t.decode().map_err(CertError::der("tbsCertificate"))?;
            match any.tag() {
                Tag::ContextSpecific { number, .. } if number == TagNumber::N1 || number == TagNumber::N2 => {}
                Tag::ContextSpecific { constructed: true, number } if number == TagNumber::N3 => {
                    extensions = parse_extensions(any.value())?;
                }
                other => return Err(malformed(format!("unexpected {other} in tbsCertificate"))),
            }
        }
        Ok(Certificate {
            der: der_bytes.to_vec(),
            tbs: raw(tbs_any, "tbsCertificate")?,
            signature_algorithm,
            signature,
            serial,
            issuer,
            subject,
            not_before,
            not_after,
            spki,
            extensions,
        })
    }

    /// The extension `o`, if present.
    pub fn extension(&self, o: ObjectIdentifier) -> Option<&Extension> {
        self.extensions.iter().find(|e| e.oid == o)
    }

    /// Verifies this certificate's signature with `issuer_spki` (ECDSA P-256 with SHA-256 only).
    pub fn verify_signature(&self, issuer_spki: &[u8], what: &'static str) -> Result<()> {
        use p256::pkcs8::DecodePublicKey as _;
        if self.signature_algorithm != oid::ECDSA_WITH_SHA256 {
            return Err(CertError::Unsupported(format!("{what} signature algorithm {}", self.signature_algorithm)));
        }
        let vk = p256::ecdsa::VerifyingKey::from_public_key_der(issuer_spki)
            .map_err(|_| CertError::Unsupported(format!("{what} issuer key (an ECDSA P-256 key is required)")))?;
        let sig = p256::ecdsa::Signature::from_der(&self.signature).map_err(|_| CertError::SignatureInvalid(what))?;
        vk.verify(&self.tbs, &sig).map_err(|_| CertError::SignatureInvalid(what))
    }

    /// Checks that `now` (seconds since the epoch) is within the certificate's validity; `what`
    /// names the certificate in the error.
    pub fn check_validity(&self, now: u64, what: &'static str) -> Result<()> {
        if now < self.not_before || now > self.not_after {
            return Err(CertError::Validity { what, now, not_before: self.not_before, not_after: self.not_after });
        }
        Ok(())
    }

    /// basicConstraints `cA` (`None` without the extension).
    pub fn is_ca(&self) -> Result<Option<bool>> {
        let Some(e) = self.extension(oid::BASIC_CONSTRAINTS) else { return Ok(None) };
        let (mut r, _) = seq_reader(&e.value, "basicConstraints")?;
        if r.is_finished() {
            return Ok(Some(false));
        }
        let first: AnyRef<'_> = r.decode().map_err(CertError::der("basicConstraints"))?;
        Ok(Some(first.tag() == Tag::Boolean && first.decode_as::<bool>().map_err(CertError::der("basicConstraints.cA"))?))
    }

    /// keyUsage bit `n` (0 = digitalSignature … 6 = cRLSign); `None` without the extension.
    pub fn key_usage(&self, n: usize) -> Result<Option<bool>> {
        let Some(e) = self.extension(oid::KEY_USAGE) else { return Ok(None) };
        let b = BitStringRef::from_der(&e.value).map_err(CertError::der("keyUsage"))?;
        let bytes = b.raw_bytes();
        Ok(Some(bytes.get(n / 8).is_some_and(|byte| byte & (0x80 >> (n % 8)) != 0)))
    }

    /// The TCG attributes of the subjectAltName directoryName: (manufacturer, model, version).
    pub fn tcg_tpm_attributes(&self) -> Result<(Option<String>, Option<String>, Option<String>)> {
        let mut out = (None, None, None);
        let Some(e) = self.extension(oid::SUBJECT_ALT_NAME) else { return Ok(out) };
        let (mut names, _) = seq_reader(&e.value, "subjectAltName")?;
        while !names.is_finished() {
            let gn: AnyRef<'_> = names.decode().map_err(CertError::der("GeneralName"))?;
            if gn.tag() != (Tag::ContextSpecific { constructed: true, number: TagNumber::N4 }) {
                continue;
            }
            let (mut rdns, _) = seq_reader(gn.value(), "directoryName")?;
            while !rdns.is_finished() {
                let set: AnyRef<'_> = rdns.decode().map_err(CertError::der("RDN"))?;
                let mut atvs = SliceReader::new(set.value()).map_err(CertError::der("RDN"))?;
                while !atvs.is_finished() {
                    let atv: AnyRef<'_> = atvs.decode().map_err(CertError::der("AttributeTypeAndValue"))?;
                    let (mut a, _) = seq_reader_any(atv, "AttributeTypeAndValue")?;
                    let o: ObjectIdentifier = a.decode().map_err(CertError::der("attribute type"))?;
                    let v: AnyRef<'_> = a.decode().map_err(CertError::der("attribute value"))?;
                    let s = String::from_utf8_lossy(v.value()).into_owned();
                    match o {
                        o if o == oid::TCG_AT_TPM_MANUFACTURER => out.0 = Some(s),
                        o if o == oid::TCG_AT_TPM_MODEL => out.1 = Some(s),
                        o if o == oid::TCG_AT_TPM_VERSION => out.2 = Some(s),
                        _ => {}
                    }
                }
            }
        }
        Ok(out)
    }
}

fn parse_extensions(explicit: &[u8]) -> Result<Vec<Extension>> {
    let (mut list, _) = seq_reader(explicit, "extensions")?;
    let mut out: Vec<Extension> = Vec::new();
    while !list.is_finished() {
        let ext: AnyRef<'_> = list.decode().map_err(CertError::der("Extension"))?;
        let (mut e, _) = seq_reader_any(ext, "Extension")?;
        let o: ObjectIdentifier = e.decode().map_err(CertError::der("extnID"))?;
        let mut next: AnyRef<'_> = e.decode().map_err(CertError::der("Extension"))?;
        let mut critical = false;
        if next.tag() == Tag::Boolean {
            critical = next.decode_as::<bool>().map_err(CertError::der("critical"))?;
            next = e.decode().map_err(CertError::der("extnValue"))?;
        }
        let value = next.decode_as::<OctetStringRef<'_>>().map_err(CertError::der("extnValue"))?.as_bytes().to_vec();
        e.finish(()).map_err(CertError::der("Extension"))?;
        if out.iter().any(|x| x.oid == o) {
            return Err(malformed(format!("extension {o} appears twice")));
        }
        out.push(Extension { oid: o, critical, value });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Verification
// ---------------------------------------------------------------------------------------------

/// Extensions a verifier here understands; an unknown *critical* extension makes a certificate
/// unacceptable (RFC 5280 §4.2).
const KNOWN: [ObjectIdentifier; 8] = [
    oid::BASIC_CONSTRAINTS,
    oid::KEY_USAGE,
    oid::EXT_KEY_USAGE,
    oid::SUBJECT_KEY_IDENTIFIER,
    oid::AUTHORITY_KEY_IDENTIFIER,
    oid::SUBJECT_ALT_NAME,
    oid::SUBJECT_DIRECTORY_ATTRIBUTES,
    oid::CERTIFICATE_POLICIES,
];

/// Refuses a critical extension this code does not know; `what` names the certificate.
pub fn check_critical(c: &Certificate, what: &str) -> Result<()> {
    if let Some(e) = c.extensions.iter().find(|e| e.critical && !KNOWN.contains(&e.oid)) {
        return Err(CertError::Extension(format!("{what}: unknown critical extension {}", e.oid)));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The CA key in the physical TPM, certified by the group AK
// ---------------------------------------------------------------------------------------------

/// TPMA_OBJECT bits of the CA key that must be set: fixedTPM, fixedParent, sensitiveDataOrigin,
/// sign.
pub const CA_REQUIRED_ATTRIBUTES: u32 = (1 << 1) | (1 << 4) | (1 << 5) | (1 << 18);
/// TPMA_OBJECT bits of the CA key that must be clear: restricted, decrypt.
pub const CA_FORBIDDEN_ATTRIBUTES: u32 = (1 << 16) | (1 << 17);

/// The EK CA key as the physical TPM describes it (`TPMT_PUBLIC`): an unrestricted ECDSA P-256
/// signing key that cannot leave the TPM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaPublic {
    /// objectAttributes.
    pub attributes: u32,
    /// Uncompressed SEC1 point.
    pub point: Vec<u8>,
}

impl CaPublic {
    /// Parses the CA key's `TPMT_PUBLIC`: ECC, nameAlg SHA-256, NULL symmetric, ECDSA-SHA256 (or
    /// NULL) scheme, NIST P-256, NULL KDF, with [`CA_REQUIRED_ATTRIBUTES`] and none of
    /// [`CA_FORBIDDEN_ATTRIBUTES`].
    pub fn parse(tpmt: &[u8]) -> Result<CaPublic> {
        let m = |e: EvidenceError| CertError::Certify(format!("CA key TPMT_PUBLIC: {e}"));
        let mut r = Reader::new(tpmt);
        let ty = r.u16("type").map_err(m)?;
        let name_alg = r.u16("nameAlg").map_err(m)?;
        let attributes = r.u32("objectAttributes").map_err(m)?;
        r.sized16("authPolicy", 64).map_err(m)?;
        let sym = r.u16("symmetric").map_err(m)?;
        let scheme = r.u16("scheme").map_err(m)?;
        if scheme != 0x0010 {
            let hash = r.u16("scheme.hashAlg").map_err(m)?;
            if scheme != 0x0018 || hash != 0x000B {
                return Err(CertError::Certify(format!("CA key scheme {scheme:#06x}/{hash:#06x} is not ECDSA-SHA256")));
            }
        }
        let curve = r.u16("curveID").map_err(m)?;
        let kdf = r.u16("kdf").map_err(m)?;
        let x = r.sized16("unique.x", 32).map_err(m)?;
        let y = r.sized16("unique.y", 32).map_err(m)?;
        r.finish("TPMT_PUBLIC").map_err(m)?;
        if ty != 0x0023 || name_alg != 0x000B || sym != 0x0010 || curve != 0x0003 || kdf != 0x0010 {
            return Err(CertError::Certify(format!(
                "CA key is not an ECC P-256 signing key with SHA-256 name (type {ty:#06x}, nameAlg {name_alg:#06x}, curve {curve:#06x})"
            )));
        }
        if attributes & CA_REQUIRED_ATTRIBUTES != CA_REQUIRED_ATTRIBUTES || attributes & CA_FORBIDDEN_ATTRIBUTES != 0 {
            return Err(CertError::Certify(format!(
                "CA key attributes {attributes:#010x} are not fixedTPM|fixedParent|sensitiveDataOrigin|sign without restricted/decrypt"
            )));
        }
        let mut point = vec![0x04];
        point.extend_from_slice(&left_pad(x)?);
        point.extend_from_slice(&left_pad(y)?);
        Ok(CaPublic { attributes, point })
    }

    /// The key as a DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> Result<Vec<u8>> {
        use p256::pkcs8::EncodePublicKey as _;
        let k = p256::PublicKey::from_sec1_bytes(&self.point).map_err(|_| CertError::Certify("CA key point is not on P-256".into()))?;
        Ok(k.to_public_key_der().map_err(|e| CertError::Der { what: "SPKI", detail: e.to_string() })?.as_bytes().to_vec())
    }
}

// The EK-certificate fixtures are shared with the vtpm-attest crate's tests.
#[cfg(test)]
#[path = "../tests/ekcert_fixtures/mod.rs"]
mod ekcert_fixtures;

#[cfg(test)]
mod tests {
    use super::*;
    use super::ekcert_fixtures::*;

    #[test]
    fn only_tcg_default_eks_are_accepted() {
        EkPublic::parse(&ecc_ek()).unwrap();
        EkPublic::parse(&rsa_ek()).unwrap();
        let mut t = rsa_ek();
        t[7] ^= 0x40; // userWithAuth set: no longer the TCG template
        assert!(matches!(EkPublic::parse(&t), Err(CertError::NotAnEk(_))));
        let mut t = ecc_ek();
        let n = t.len();
        t[n - 1] ^= 0xff; // off the curve
        assert!(matches!(EkPublic::parse(&t), Err(CertError::NotAnEk(_))));
        assert!(EkPublic::parse(&[]).is_err());
        assert!(EkPublic::parse(&rsa_ek()[..100]).is_err());
        let mut long = rsa_ek();
        long.push(0);
        assert!(EkPublic::parse(&long).is_err());
    }

    #[test]
    fn tpm_info_is_bounded() {
        info().validate().unwrap();
        for bad in [
            TpmInfo { model: String::new(), ..info() },
            TpmInfo { model: "x".repeat(17), ..info() },
            TpmInfo { model: "a\u{7f}".into(), ..info() },
            TpmInfo { family: "2.0x".into(), ..info() },
            TpmInfo { revision: 10_000, ..info() },
        ] {
            assert!(matches!(bad.validate(), Err(crate::mgr::TpmInfoError(_))), "{bad:?}");
        }
    }

    #[test]
    fn pem_round_trip() {
        let ca = make_ca(&ca_key());
        let pem = to_pem(&ca.der).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert_eq!(Certificate::from_pem_or_der(pem.as_bytes()).unwrap(), ca);
        assert_eq!(Certificate::from_pem_or_der(&ca.der).unwrap(), ca);
    }
}

