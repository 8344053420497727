//! AK provenance: `TPM2_MakeCredential` in software, the AK-name and attribute checks a
//! verifier makes before it, and the EK certificate chain that anchors the EK.
//!
//! A deep quote is only as good as its attestation key (AK). A restricted, fixedTPM key *says*
//! it lives in a TPM, but anybody can write those bits into a public area of a software key.
//! Credential activation (TPM 2.0 Part 1 §24) proves it:
//!
//! 1. the verifier takes the EK public key from an EK certificate that chains to the TPM
//!    vendor's root ([`verify_ek_chain`]);
//! 2. it computes the AK's name from the AK public area it was given and checks the area's
//!    attributes ([`ak_name`]);
//! 3. it encrypts a random secret to (EK, AK name) with [`make_credential`];
//! 4. the host's TPM releases the secret with `TPM2_ActivateCredential` only if the object
//!    loaded as the AK has exactly that name **and** is in the same TPM as the EK's private key.
//!
//! A secret that comes back equal proves the AK public area belongs to a key resident in the TPM
//! whose EK was certified; the attributes then say the TPM made it and will not let it leave
//! (fixedTPM, sensitiveDataOrigin) and that it signs only TPM-generated data (restricted).
//!
//! The construction, for an RSA-2048 EK with the TCG default template (nameAlg SHA-256,
//! AES-128-CFB):
//!
//! ```text
//! seed         = 32 random bytes
//! encSecret    = RSA-OAEP(SHA-256, label "IDENTITY\0", seed)
//! symKey       = KDFa(SHA-256, seed, "STORAGE", AKname, "", 128)
//! encIdentity  = AES-128-CFB(symKey, IV = 0, u16 len ‖ secret)
//! hmacKey      = KDFa(SHA-256, seed, "INTEGRITY", "", "", 256)
//! outerHMAC    = HMAC-SHA-256(hmacKey, encIdentity ‖ AKname)
//! credential   = u16 32 ‖ outerHMAC ‖ encIdentity       (contents of TPM2B_ID_OBJECT)
//! ```
//!
//! ECC EKs (ECDH + KDFe) are not implemented: the RSA-2048 EK certificate, which every TPM
//! certified for the TCG PC Client profile carries, is used.

use aes::cipher::{BlockEncrypt, KeyInit};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use vtpm_proto::ekcert::{self, oid, CertError, Certificate};
use vtpm_proto::tpms::AkPublic;

use vtpm_proto::evidence::TPM_ALG_SHA256;
/// Largest secret a credential carries (`sizeof(TPMU_HA)`).
pub const MAX_SECRET: usize = 64;
/// Most certificates between an EK certificate and a root that [`verify_ek_chain`] follows.
pub const MAX_CHAIN: usize = 4;

/// TPMA_OBJECT bits.
pub mod attr {
    /// fixedTPM: the key cannot be duplicated out of this TPM.
    pub const FIXED_TPM: u32 = 1 << 1;
    /// fixedParent: the key cannot be re-parented.
    pub const FIXED_PARENT: u32 = 1 << 4;
    /// sensitiveDataOrigin: the TPM generated the private part.
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    /// restricted: signs only TPM-generated structures.
    pub const RESTRICTED: u32 = 1 << 16;
    /// decrypt.
    pub const DECRYPT: u32 = 1 << 17;
    /// sign.
    pub const SIGN: u32 = 1 << 18;
}

/// Why AK provenance could not be established. Each variant names the check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredError {
    /// The AK public area does not parse or is not a supported AK.
    #[error("AK public area: {0}")]
    AkPublic(String),
    /// The AK public area lacks an attribute a TPM-resident attestation key has.
    #[error("AK attributes: {0}")]
    AkAttributes(String),
    /// The EK certificate chain does not lead to a trusted root.
    #[error("EK certificate chain: {0}")]
    EkChain(String),
    /// The certified EK is not a key this code can encrypt to.
    #[error("EK public key: {0}")]
    EkKey(String),
    /// The secret is empty or too long.
    #[error("credential secret: {0}")]
    Secret(String),
    /// Encryption failed.
    #[error("MakeCredential: {0}")]
    Crypto(String),
}

/// Checks the AK public area (`TPMT_PUBLIC`) and returns its TPM name,
/// `0x000b ‖ SHA-256(TPMT_PUBLIC)`.
///
/// Accepted: what [`AkPublic::parse`] accepts (RSA-2048 or P-256 restricted signing key), with
/// nameAlg SHA-256 and fixedTPM, fixedParent, sensitiveDataOrigin, restricted and sign set and
/// decrypt clear.
pub fn ak_name(ak_tpmt: &[u8]) -> Result<Vec<u8>, CredError> {
    // type(2) ‖ nameAlg(2) ‖ objectAttributes(4): checked first, so the error names the bit.
    let (Some(name_alg), Some(a)) = (ak_tpmt.get(2..4), ak_tpmt.get(4..8)) else {
        return Err(CredError::AkPublic(format!(
            "{} bytes is too short for a TPMT_PUBLIC",
            ak_tpmt.len()
        )));
    };
    let name_alg = u16::from_be_bytes([name_alg[0], name_alg[1]]);
    let a = u32::from_be_bytes([a[0], a[1], a[2], a[3]]);
    if name_alg != TPM_ALG_SHA256 {
        return Err(CredError::AkPublic(format!(
            "nameAlg {name_alg:#06x} is not SHA-256"
        )));
    }
    let need = [
        (attr::FIXED_TPM, "fixedTPM"),
        (attr::FIXED_PARENT, "fixedParent"),
        (attr::SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
        (attr::RESTRICTED, "restricted"),
        (attr::SIGN, "sign"),
    ];
    let missing: Vec<&str> = need
        .iter()
        .filter(|(b, _)| a & b == 0)
        .map(|(_, n)| *n)
        .collect();
    if !missing.is_empty() {
        return Err(CredError::AkAttributes(format!(
            "{} not set (objectAttributes {a:#010x})",
            missing.join(", ")
        )));
    }
    if a & attr::DECRYPT != 0 {
        return Err(CredError::AkAttributes(format!(
            "decrypt is set (objectAttributes {a:#010x})"
        )));
    }
    AkPublic::parse(ak_tpmt).map_err(|e| CredError::AkPublic(e.to_string()))?;
    Ok(ekcert::sha256_name(ak_tpmt))
}

/// KDFa (TPM 2.0 Part 1 §11.4.10.2, SP 800-108 counter mode) with HMAC-SHA-256:
/// `bits` (a multiple of 8) of `HMAC(key, [i]₃₂ ‖ label ‖ 0 ‖ context_u ‖ context_v ‖ [bits]₃₂)`.
/// `label` is given without its terminating zero, which is added here.
pub fn kdfa_sha256(
    key: &[u8],
    label: &[u8],
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Vec<u8> {
    assert!(
        bits.is_multiple_of(8) && bits > 0,
        "KDFa output must be whole bytes"
    );
    let want = (bits / 8) as usize;
    let mut out = Vec::with_capacity(want + 32);
    let mut i: u32 = 1;
    while out.len() < want {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
        m.update(&i.to_be_bytes());
        m.update(label);
        m.update(&[0]);
        m.update(context_u);
        m.update(context_v);
        m.update(&bits.to_be_bytes());
        out.extend_from_slice(&m.finalize().into_bytes());
        i += 1;
    }
    out.truncate(want);
    out
}

/// AES-128 in CFB mode (full-block feedback, IV = 0), as the TPM encrypts credentials.
fn aes128_cfb_encrypt(key: &[u8; 16], data: &mut [u8]) {
    let cipher = aes::Aes128::new(&(*key).into());
    let mut iv = [0u8; 16];
    for chunk in data.chunks_mut(16) {
        let mut block = iv.into();
        cipher.encrypt_block(&mut block);
        for (d, k) in chunk.iter_mut().zip(block.iter()) {
            *d ^= k;
        }
        if chunk.len() == 16 {
            iv.copy_from_slice(chunk);
        }
    }
}

/// The credential blob (contents of `TPM2B_ID_OBJECT`) for a given `seed` (SHA-256 EK nameAlg,
/// AES-128 EK symmetric): the deterministic half of MakeCredential.
pub fn credential_blob_from_seed(
    seed: &[u8],
    ak_name: &[u8],
    secret: &[u8],
) -> Result<Vec<u8>, CredError> {
    if secret.is_empty() || secret.len() > MAX_SECRET {
        return Err(CredError::Secret(format!(
            "{} bytes; 1..={MAX_SECRET} allowed",
            secret.len()
        )));
    }
    let sym_key = kdfa_sha256(seed, b"STORAGE", ak_name, &[], 128);
    let mut enc_identity = Vec::with_capacity(2 + secret.len());
    enc_identity.extend_from_slice(&(secret.len() as u16).to_be_bytes());
    enc_identity.extend_from_slice(secret);
    aes128_cfb_encrypt(
        &sym_key.try_into().expect("KDFa gave 16 bytes"),
        &mut enc_identity,
    );
    let hmac_key = kdfa_sha256(seed, b"INTEGRITY", &[], &[], 256);
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&hmac_key).expect("any key length");
    m.update(&enc_identity);
    m.update(ak_name);
    let outer = m.finalize().into_bytes();
    let mut blob = Vec::with_capacity(2 + outer.len() + enc_identity.len());
    blob.extend_from_slice(&(outer.len() as u16).to_be_bytes());
    blob.extend_from_slice(&outer);
    blob.extend_from_slice(&enc_identity);
    Ok(blob)
}

/// The output of MakeCredential, both without their TPM2B size fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// Contents of `TPM2B_ID_OBJECT` (`credentialBlob`).
    pub blob: Vec<u8>,
    /// Contents of `TPM2B_ENCRYPTED_SECRET` (the seed encrypted to the EK).
    pub encrypted_secret: Vec<u8>,
}

/// The RSA-2048 EK key of a certificate's SubjectPublicKeyInfo (DER).
pub fn ek_rsa_key(spki_der: &[u8]) -> Result<rsa::RsaPublicKey, CredError> {
    use rsa::pkcs8::DecodePublicKey as _;
    use rsa::traits::PublicKeyParts as _;
    let (alg, _) = ekcert::split_spki(spki_der).map_err(|e| CredError::EkKey(e.to_string()))?;
    if alg != oid::RSA_ENCRYPTION {
        return Err(CredError::EkKey(format!(
            "algorithm {alg}: only the RSA-2048 EK is supported (give the RSA EK certificate, NV index 0x01c00002)"
        )));
    }
    let k = rsa::RsaPublicKey::from_public_key_der(spki_der)
        .map_err(|e| CredError::EkKey(e.to_string()))?;
    if k.size() != 256 || k.e() != &rsa::BigUint::from(65537u32) {
        return Err(CredError::EkKey(
            "not an RSA-2048 key with exponent 65537 (the TCG default EK)".into(),
        ));
    }
    Ok(k)
}

/// TPM2_MakeCredential for the TCG default RSA-2048 EK `ek`, the AK name `ak_name` and
/// `secret`, with a fresh random seed.
pub fn make_credential(
    ek: &rsa::RsaPublicKey,
    ak_name: &[u8],
    secret: &[u8],
) -> Result<Credential, CredError> {
    use rand::RngCore as _;
    let mut rng = rand::rngs::OsRng;
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    rng.fill_bytes(seed.as_mut());
    let blob = credential_blob_from_seed(seed.as_ref(), ak_name, secret)?;
    let padding = rsa::Oaep::new_with_label::<Sha256, _>("IDENTITY\0");
    let encrypted_secret = ek
        .encrypt(&mut rng, padding, seed.as_ref())
        .map_err(|e| CredError::Crypto(e.to_string()))?;
    Ok(Credential {
        blob,
        encrypted_secret,
    })
}

// ---------------------------------------------------------------------------------------------
// EK certificate chain
// ---------------------------------------------------------------------------------------------

/// sha256WithRSAEncryption (RFC 4055).
const SHA256_WITH_RSA: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");

/// Verifies `cert`'s signature with `issuer_spki`: ECDSA P-256/SHA-256 or RSA (2048..=4096 bits)
/// PKCS #1 v1.5/SHA-256, the algorithms TPM vendors' CAs use.
fn verify_cert_signature(
    cert: &Certificate,
    issuer_spki: &[u8],
    what: &'static str,
) -> Result<(), CertError> {
    if cert.signature_algorithm == oid::ECDSA_WITH_SHA256 {
        return cert.verify_signature(issuer_spki, what);
    }
    if cert.signature_algorithm != SHA256_WITH_RSA {
        return Err(CertError::Unsupported(format!(
            "{what} signature algorithm {}",
            cert.signature_algorithm
        )));
    }
    use rsa::pkcs8::DecodePublicKey as _;
    use rsa::signature::Verifier as _;
    use rsa::traits::PublicKeyParts as _;
    let k = rsa::RsaPublicKey::from_public_key_der(issuer_spki).map_err(|_| {
        CertError::Unsupported(format!("{what} issuer key (RSA or ECDSA P-256 required)"))
    })?;
    if !(256..=512).contains(&k.size()) {
        return Err(CertError::Unsupported(format!(
            "{what} issuer RSA key of {} bits",
            k.size() * 8
        )));
    }
    let vk = rsa::pkcs1v15::VerifyingKey::<Sha256>::new(k);
    let sig = rsa::pkcs1v15::Signature::try_from(cert.signature.as_slice())
        .map_err(|_| CertError::SignatureInvalid(what))?;
    vk.verify(&cert.tbs, &sig)
        .map_err(|_| CertError::SignatureInvalid(what))
}

/// Checks that `ca` may issue certificates at `now`: basicConstraints cA, keyUsage keyCertSign
/// (if the extension is present), validity, no unknown critical extension.
fn check_issuer(ca: &Certificate, now: u64, what: &'static str) -> Result<(), CertError> {
    if ca.is_ca()? != Some(true) {
        return Err(CertError::NotACa(format!(
            "{what}: basicConstraints cA is not TRUE"
        )));
    }
    if ca.key_usage(5)? == Some(false) {
        return Err(CertError::NotACa(format!(
            "{what}: keyUsage does not include keyCertSign"
        )));
    }
    ekcert::check_critical(ca, what)?;
    ca.check_validity(now, what)
}

/// What [`verify_ek_chain`] established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EkChain {
    /// The certified EK, DER SubjectPublicKeyInfo.
    pub ek_spki: Vec<u8>,
    /// SHA-256 of the EK certificate (DER), hex: the host's identity in a trust store.
    pub ek_cert_sha256: String,
    /// The subjects' common names or raw DER of the chain, leaf first, for display.
    pub depth: usize,
}

/// Verifies the EK certificate `leaf` up to one of `roots` (the TPM vendors' root certificates,
/// trusted as given) through `intermediates` (untrusted, any order), at time `now`.
///
/// The leaf must be an EK certificate: not a CA, keyUsage keyEncipherment (RSA EK), no unknown
/// critical extension, within its validity. Each issuer is found by name and must verify the
/// signature; intermediates must be CAs with keyCertSign within their validity. At most
/// [`MAX_CHAIN`] intermediates.
pub fn verify_ek_chain(
    leaf: &Certificate,
    intermediates: &[Certificate],
    roots: &[Certificate],
    now: u64,
) -> Result<EkChain, CredError> {
    let chain = |e: CertError| CredError::EkChain(e.to_string());
    if roots.is_empty() {
        return Err(CredError::EkChain("no trusted root (--ek-ca) given".into()));
    }
    leaf.check_validity(now, "the EK certificate")
        .map_err(chain)?;
    if leaf.is_ca().map_err(chain)? == Some(true) {
        return Err(CredError::EkChain(
            "the EK certificate claims to be a CA".into(),
        ));
    }
    ekcert::check_critical(leaf, "EK certificate").map_err(chain)?;
    let (alg, _) = ekcert::split_spki(&leaf.spki).map_err(chain)?;
    if alg == oid::RSA_ENCRYPTION && leaf.key_usage(2).map_err(chain)? == Some(false) {
        return Err(CredError::EkChain(
            "the EK certificate's keyUsage lacks keyEncipherment".into(),
        ));
    }
    let mut cur = leaf;
    for depth in 0..=MAX_CHAIN {
        let what: &'static str = if depth == 0 {
            "EK certificate"
        } else {
            "intermediate certificate"
        };
        // A trusted root that issued `cur`?
        let mut last_err = None;
        for r in roots.iter().filter(|r| r.subject == cur.issuer) {
            match verify_cert_signature(cur, &r.spki, what)
                .and_then(|_| check_issuer(r, now, "the root certificate"))
            {
                Ok(()) => {
                    return Ok(EkChain {
                        ek_spki: leaf.spki.clone(),
                        ek_cert_sha256: hex::encode(Sha256::digest(&leaf.der)),
                        depth: depth + 1,
                    });
                }
                Err(e) => last_err = Some(e),
            }
        }
        // Otherwise an intermediate that issued it.
        let next = intermediates.iter().find(|i| {
            i.subject == cur.issuer
                && !std::ptr::eq(*i, cur)
                && verify_cert_signature(cur, &i.spki, what).is_ok()
        });
        match next {
            Some(i) => {
                check_issuer(i, now, "an intermediate certificate").map_err(chain)?;
                cur = i;
            }
            None => {
                return Err(match last_err {
                    Some(e) => CredError::EkChain(format!("{e} (a root of that name is trusted, but its key did not sign this certificate)")),
                    None => CredError::EkChain(format!(
                        "no trusted root (--ek-ca) or given intermediate issued the {what}: it does not chain to the TPM vendor's root"
                    )),
                });
            }
        }
    }
    Err(CredError::EkChain(format!(
        "longer than {MAX_CHAIN} intermediates"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdfa_is_sp800_108_counter_mode() {
        // Two blocks, truncated: the second block's counter is 2.
        let k = kdfa_sha256(b"key", b"LBL", b"u", b"v", 384);
        assert_eq!(k.len(), 48);
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(b"key").unwrap();
        m.update(&2u32.to_be_bytes());
        m.update(b"LBL\0uv");
        m.update(&384u32.to_be_bytes());
        assert_eq!(&k[32..], &m.finalize().into_bytes()[..16]);
    }

    #[test]
    fn cfb_round_trips_with_partial_block() {
        let mut d = b"0123456789abcdef012".to_vec();
        aes128_cfb_encrypt(&[7u8; 16], &mut d);
        assert_ne!(&d[..], b"0123456789abcdef012");
        // Decrypt: keystream from ciphertext blocks.
        let cipher = aes::Aes128::new(&[7u8; 16].into());
        let mut iv = [0u8; 16];
        let mut out = vec![];
        for chunk in d.chunks(16) {
            let mut b = iv.into();
            cipher.encrypt_block(&mut b);
            out.extend(chunk.iter().zip(b.iter()).map(|(c, k)| c ^ k));
            if chunk.len() == 16 {
                iv.copy_from_slice(chunk);
            }
        }
        assert_eq!(out, b"0123456789abcdef012");
    }

    #[test]
    fn secret_size_is_capped() {
        assert!(matches!(
            credential_blob_from_seed(&[1; 32], &[0; 34], &[]),
            Err(CredError::Secret(_))
        ));
        assert!(matches!(
            credential_blob_from_seed(&[1; 32], &[0; 34], &[0; 65]),
            Err(CredError::Secret(_))
        ));
        assert_eq!(
            credential_blob_from_seed(&[1; 32], &[0; 34], &[0; 32])
                .unwrap()
                .len(),
            2 + 32 + 2 + 32
        );
    }
}
