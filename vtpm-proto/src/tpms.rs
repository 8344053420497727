//! The TPM structures an attestation carries, as the TPM produces them: the AK's TPMT_PUBLIC
//! (RSA-2048 and ECC NIST P-256 restricted signing keys), TPMT_SIGNATURE (RSASSA-SHA256 and
//! ECDSA-SHA256) and TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE, parsed by hand, and the check of
//! an AK's signature. The tenant's verifier (`vtpm_attest::verify`), the manager's batcher and
//! the transfer checks ([`crate::transfer`]) all read them through here.

use p256::ecdsa::signature::Verifier as _;

use crate::evidence::{EvidenceError, PcrSelection, Reader, TPM_ALG_SHA256, read_pcr_selection_list};

pub use tpm_wire::{
    TPM2_ALG_ECC as TPM_ALG_ECC, TPM2_ALG_ECDSA as TPM_ALG_ECDSA, TPM2_ALG_NULL as TPM_ALG_NULL, TPM2_ALG_RSA as TPM_ALG_RSA,
    TPM2_ALG_RSASSA as TPM_ALG_RSASSA, TPM2_GENERATED_VALUE as TPM_GENERATED_VALUE, TPM2_ST_ATTEST_QUOTE as TPM_ST_ATTEST_QUOTE,
};
/// `TPM_ALG_ECDAA` (parsed, not accepted).
pub const TPM_ALG_ECDAA: u16 = 0x001A;
/// `TPM_ECC_NIST_P256`.
pub const TPM_ECC_NIST_P256: u16 = 0x0003;

/// TPMA_OBJECT `fixedTPM`.
pub const TPMA_OBJECT_FIXED_TPM: u32 = 1 << 1;
/// TPMA_OBJECT `restricted`.
pub const TPMA_OBJECT_RESTRICTED: u32 = 1 << 16;
/// TPMA_OBJECT `decrypt`.
pub const TPMA_OBJECT_DECRYPT: u32 = 1 << 17;
/// TPMA_OBJECT `sign`.
pub const TPMA_OBJECT_SIGN: u32 = 1 << 18;

/// The public key of the AK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AkKey {
    /// RSA-2048.
    Rsa2048 {
        /// Modulus, 256 bytes big-endian.
        modulus: Vec<u8>,
        /// Public exponent (TPM's 0 already mapped to 65537).
        exponent: u32,
    },
    /// ECC NIST P-256.
    EccP256 {
        /// x coordinate, left-padded to 32 bytes.
        x: [u8; 32],
        /// y coordinate, left-padded to 32 bytes.
        y: [u8; 32],
    },
}

/// A parsed TPMT_PUBLIC of an attestation key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AkPublic {
    /// `nameAlg`.
    pub name_alg: u16,
    /// `objectAttributes` (TPMA_OBJECT).
    pub object_attributes: u32,
    /// `authPolicy`.
    pub auth_policy: Vec<u8>,
    /// The signing scheme's hash, or `None` if the key's scheme is TPM_ALG_NULL.
    pub scheme_hash: Option<u16>,
    /// The key.
    pub key: AkKey,
}

/// TPMS_CLOCK_INFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockInfo {
    /// `clock`, ms.
    pub clock: u64,
    /// `resetCount`.
    pub reset_count: u32,
    /// `restartCount`.
    pub restart_count: u32,
    /// `safe`.
    pub safe: bool,
}

/// A parsed TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteAttest {
    /// `qualifiedSigner` (TPM2B_NAME contents).
    pub qualified_signer: Vec<u8>,
    /// `extraData`: the TPM2_Quote `qualifyingData`, here the Merkle root.
    pub extra_data: Vec<u8>,
    /// `clockInfo`.
    pub clock_info: ClockInfo,
    /// `firmwareVersion`.
    pub firmware_version: u64,
    /// `attested.quote.pcrSelect`.
    pub pcr_select: Vec<PcrSelection>,
    /// `attested.quote.pcrDigest`.
    pub pcr_digest: Vec<u8>,
}

/// A parsed TPMT_SIGNATURE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TpmSignature {
    /// TPM_ALG_RSASSA.
    RsaSsa {
        /// Hash algorithm.
        hash_alg: u16,
        /// Signature, big-endian.
        sig: Vec<u8>,
    },
    /// TPM_ALG_ECDSA.
    Ecdsa {
        /// Hash algorithm.
        hash_alg: u16,
        /// r, left-padded to 32 bytes.
        r: [u8; 32],
        /// s, left-padded to 32 bytes.
        s: [u8; 32],
    },
}

/// Why a TPM structure or an AK's signature was rejected. Each check has its own variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TpmsError {
    /// The AK's TPMT_PUBLIC does not parse.
    #[error("AK TPMT_PUBLIC malformed: {0}")]
    AkMalformed(EvidenceError),
    /// The AK uses an algorithm, curve, size or scheme this verifier refuses.
    #[error("AK unsupported: {what} = {value:#x}")]
    AkUnsupported {
        /// Field.
        what: &'static str,
        /// Value found.
        value: u64,
    },
    /// The AK is not a restricted, fixedTPM, signing-only key.
    #[error("AK attributes {attributes:#010x} are not restricted|sign|fixedTPM without decrypt")]
    AkAttributes {
        /// TPMA_OBJECT found.
        attributes: u32,
    },
    /// The AK's key material is not a valid public key.
    #[error("AK key material invalid: {0}")]
    AkInvalidKey(&'static str),
    /// The TPMT_SIGNATURE does not parse.
    #[error("TPMT_SIGNATURE malformed: {0}")]
    SignatureMalformed(EvidenceError),
    /// The signature algorithm or hash is not RSASSA/ECDSA with SHA-256 matching the AK.
    #[error(
        "signature scheme {sig_alg:#06x}/hash {hash_alg:#06x} does not fit AK type {key_alg:#06x} with SHA-256"
    )]
    SignatureScheme {
        /// TPM_ALG_ID of the key type.
        key_alg: u16,
        /// TPM_ALG_ID of the signature scheme.
        sig_alg: u16,
        /// TPM_ALG_ID of the signature hash.
        hash_alg: u16,
    },
    /// The signature does not verify over the TPMS_ATTEST bytes.
    #[error("signature does not verify over TPMS_ATTEST with the AK")]
    SignatureInvalid,
    /// TPMS_ATTEST does not parse.
    #[error("TPMS_ATTEST malformed: {0}")]
    AttestMalformed(EvidenceError),
    /// TPMS_ATTEST.magic is not TPM_GENERATED_VALUE.
    #[error("TPMS_ATTEST magic {got:#010x} is not TPM_GENERATED (0xff544347)")]
    AttestMagic {
        /// Magic found.
        got: u32,
    },
    /// TPMS_ATTEST.type is not TPM_ST_ATTEST_QUOTE.
    #[error("TPMS_ATTEST type {got:#06x} is not TPM_ST_ATTEST_QUOTE (0x8018)")]
    AttestType {
        /// Type found.
        got: u16,
    },
}

/// Reads a TPMT_SYM_DEF_OBJECT and returns its algorithm.
fn read_sym_def(r: &mut Reader<'_>) -> Result<u16, EvidenceError> {
    let alg = r.u16("TPMT_SYM_DEF_OBJECT.algorithm")?;
    if alg != TPM_ALG_NULL {
        r.u16("TPMT_SYM_DEF_OBJECT.keyBits")?;
        r.u16("TPMT_SYM_DEF_OBJECT.mode")?;
    }
    Ok(alg)
}

impl AkPublic {
    /// Parses a TPMT_PUBLIC and accepts only a restricted, fixedTPM signing key
    /// that is RSA-2048 (RSASSA or NULL scheme) or ECC NIST P-256 (ECDSA or NULL
    /// scheme), with a SHA-256 scheme hash if a scheme is set.
    pub fn parse(bytes: &[u8]) -> Result<AkPublic, TpmsError> {
        use TpmsError::{AkMalformed as M, AkUnsupported};
        let mut r = Reader::new(bytes);
        let ty = r.u16("TPMT_PUBLIC.type").map_err(M)?;
        let name_alg = r.u16("TPMT_PUBLIC.nameAlg").map_err(M)?;
        let object_attributes = r.u32("TPMT_PUBLIC.objectAttributes").map_err(M)?;
        let auth_policy = r.sized16("TPMT_PUBLIC.authPolicy", 64).map_err(M)?.to_vec();
        let (scheme_hash, key) = match ty {
            TPM_ALG_RSA => {
                let sym = read_sym_def(&mut r).map_err(M)?;
                let scheme = r.u16("TPMT_RSA_SCHEME.scheme").map_err(M)?;
                let scheme_hash = match scheme {
                    TPM_ALG_NULL => None,
                    TPM_ALG_RSASSA => Some(r.u16("TPMT_RSA_SCHEME.hashAlg").map_err(M)?),
                    other => {
                        return Err(AkUnsupported {
                            what: "RSA scheme",
                            value: other.into(),
                        });
                    }
                };
                let key_bits = r.u16("TPMS_RSA_PARMS.keyBits").map_err(M)?;
                let exponent = r.u32("TPMS_RSA_PARMS.exponent").map_err(M)?;
                let modulus = r.sized16("TPM2B_PUBLIC_KEY_RSA", 512).map_err(M)?.to_vec();
                r.finish("TPMT_PUBLIC").map_err(M)?;
                if sym != TPM_ALG_NULL {
                    return Err(AkUnsupported {
                        what: "symmetric algorithm of a signing key",
                        value: sym.into(),
                    });
                }
                if key_bits != 2048 {
                    return Err(AkUnsupported {
                        what: "RSA key bits",
                        value: key_bits.into(),
                    });
                }
                if modulus.len() != 256 || modulus[0] & 0x80 == 0 {
                    return Err(TpmsError::AkInvalidKey(
                        "RSA-2048 modulus is not 2048 bits",
                    ));
                }
                let exponent = if exponent == 0 { 65537 } else { exponent };
                (scheme_hash, AkKey::Rsa2048 { modulus, exponent })
            }
            TPM_ALG_ECC => {
                let sym = read_sym_def(&mut r).map_err(M)?;
                let scheme = r.u16("TPMT_ECC_SCHEME.scheme").map_err(M)?;
                let scheme_hash = match scheme {
                    TPM_ALG_NULL => None,
                    TPM_ALG_ECDSA => Some(r.u16("TPMT_ECC_SCHEME.hashAlg").map_err(M)?),
                    other => {
                        return Err(AkUnsupported {
                            what: "ECC scheme",
                            value: other.into(),
                        });
                    }
                };
                let curve = r.u16("TPMS_ECC_PARMS.curveID").map_err(M)?;
                let kdf = r.u16("TPMT_KDF_SCHEME.scheme").map_err(M)?;
                if kdf != TPM_ALG_NULL {
                    r.u16("TPMT_KDF_SCHEME.hashAlg").map_err(M)?;
                }
                let x = r.sized16("TPMS_ECC_POINT.x", 128).map_err(M)?;
                let y = r.sized16("TPMS_ECC_POINT.y", 128).map_err(M)?;
                r.finish("TPMT_PUBLIC").map_err(M)?;
                if sym != TPM_ALG_NULL {
                    return Err(AkUnsupported {
                        what: "symmetric algorithm of a signing key",
                        value: sym.into(),
                    });
                }
                if curve != TPM_ECC_NIST_P256 {
                    return Err(AkUnsupported {
                        what: "ECC curve",
                        value: curve.into(),
                    });
                }
                let x = left_pad_32(x).ok_or(TpmsError::AkInvalidKey(
                    "P-256 x coordinate longer than 32 bytes",
                ))?;
                let y = left_pad_32(y).ok_or(TpmsError::AkInvalidKey(
                    "P-256 y coordinate longer than 32 bytes",
                ))?;
                (scheme_hash, AkKey::EccP256 { x, y })
            }
            other => {
                return Err(AkUnsupported {
                    what: "TPMT_PUBLIC.type",
                    value: other.into(),
                });
            }
        };
        if let Some(h) = scheme_hash
            && h != TPM_ALG_SHA256
        {
            return Err(AkUnsupported {
                what: "scheme hash",
                value: h.into(),
            });
        }
        let need = TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_SIGN | TPMA_OBJECT_FIXED_TPM;
        if object_attributes & need != need || object_attributes & TPMA_OBJECT_DECRYPT != 0 {
            return Err(TpmsError::AkAttributes {
                attributes: object_attributes,
            });
        }
        let ak = AkPublic {
            name_alg,
            object_attributes,
            auth_policy,
            scheme_hash,
            key,
        };
        // Reject keys the crypto libraries refuse now, not at signature time.
        match &ak.key {
            AkKey::Rsa2048 { .. } => {
                ak.rsa_key()?;
            }
            AkKey::EccP256 { .. } => {
                ak.p256_key()?;
            }
        }
        Ok(ak)
    }

    /// TPM_ALG_ID of the key type.
    pub fn key_alg(&self) -> u16 {
        match self.key {
            AkKey::Rsa2048 { .. } => TPM_ALG_RSA,
            AkKey::EccP256 { .. } => TPM_ALG_ECC,
        }
    }

    fn rsa_key(&self) -> Result<rsa::RsaPublicKey, TpmsError> {
        match &self.key {
            AkKey::Rsa2048 { modulus, exponent } => rsa::RsaPublicKey::new(
                rsa::BigUint::from_bytes_be(modulus),
                rsa::BigUint::from(*exponent),
            )
            .map_err(|_| {
                TpmsError::AkInvalidKey("RSA public key rejected (exponent or modulus)")
            }),
            AkKey::EccP256 { .. } => Err(TpmsError::AkInvalidKey("not an RSA key")),
        }
    }

    fn p256_key(&self) -> Result<p256::ecdsa::VerifyingKey, TpmsError> {
        match &self.key {
            AkKey::EccP256 { x, y } => {
                let point = p256::EncodedPoint::from_affine_coordinates(x.into(), y.into(), false);
                p256::ecdsa::VerifyingKey::from_encoded_point(&point)
                    .map_err(|_| TpmsError::AkInvalidKey("point is not on P-256"))
            }
            AkKey::Rsa2048 { .. } => Err(TpmsError::AkInvalidKey("not an ECC key")),
        }
    }

    /// Verifies `sig` over `message` (SHA-256 inside the scheme).
    pub fn verify_signature(&self, message: &[u8], sig: &TpmSignature) -> Result<(), TpmsError> {
        let scheme_err = |sig_alg: u16, hash_alg: u16| TpmsError::SignatureScheme {
            key_alg: self.key_alg(),
            sig_alg,
            hash_alg,
        };
        match (&self.key, sig) {
            (AkKey::Rsa2048 { .. }, TpmSignature::RsaSsa { hash_alg, sig }) => {
                if *hash_alg != TPM_ALG_SHA256 {
                    return Err(scheme_err(TPM_ALG_RSASSA, *hash_alg));
                }
                if sig.len() != 256 {
                    return Err(TpmsError::SignatureInvalid);
                }
                let vk = rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(self.rsa_key()?);
                let s = rsa::pkcs1v15::Signature::try_from(sig.as_slice())
                    .map_err(|_| TpmsError::SignatureInvalid)?;
                vk.verify(message, &s)
                    .map_err(|_| TpmsError::SignatureInvalid)
            }
            (AkKey::EccP256 { .. }, TpmSignature::Ecdsa { hash_alg, r, s }) => {
                if *hash_alg != TPM_ALG_SHA256 {
                    return Err(scheme_err(TPM_ALG_ECDSA, *hash_alg));
                }
                let vk = self.p256_key()?;
                let s = p256::ecdsa::Signature::from_scalars(*r, *s)
                    .map_err(|_| TpmsError::SignatureInvalid)?;
                vk.verify(message, &s)
                    .map_err(|_| TpmsError::SignatureInvalid)
            }
            (_, TpmSignature::RsaSsa { hash_alg, .. }) => {
                Err(scheme_err(TPM_ALG_RSASSA, *hash_alg))
            }
            (_, TpmSignature::Ecdsa { hash_alg, .. }) => Err(scheme_err(TPM_ALG_ECDSA, *hash_alg)),
        }
    }
}

fn left_pad_32(b: &[u8]) -> Option<[u8; 32]> {
    if b.len() > 32 {
        return None;
    }
    let mut out = [0u8; 32];
    out[32 - b.len()..].copy_from_slice(b);
    Some(out)
}

impl TpmSignature {
    /// Parses a TPMT_SIGNATURE of scheme RSASSA or ECDSA (any hash; the hash is
    /// checked against the key in [`AkPublic::verify_signature`]).
    pub fn parse(bytes: &[u8]) -> Result<TpmSignature, TpmsError> {
        use TpmsError::SignatureMalformed as M;
        let mut r = Reader::new(bytes);
        let alg = r.u16("TPMT_SIGNATURE.sigAlg").map_err(M)?;
        let sig = match alg {
            TPM_ALG_RSASSA => {
                let hash_alg = r.u16("TPMS_SIGNATURE_RSA.hash").map_err(M)?;
                let sig = r
                    .sized16("TPMS_SIGNATURE_RSA.sig", 512)
                    .map_err(M)?
                    .to_vec();
                TpmSignature::RsaSsa { hash_alg, sig }
            }
            TPM_ALG_ECDSA => {
                let hash_alg = r.u16("TPMS_SIGNATURE_ECC.hash").map_err(M)?;
                let rr = r.sized16("TPMS_SIGNATURE_ECC.signatureR", 128).map_err(M)?;
                let ss = r.sized16("TPMS_SIGNATURE_ECC.signatureS", 128).map_err(M)?;
                r.finish("TPMT_SIGNATURE").map_err(M)?;
                let too_long = || {
                    M(EvidenceError::TooLong {
                        what: "P-256 signature scalar",
                        len: 33,
                        max: 32,
                    })
                };
                TpmSignature::Ecdsa {
                    hash_alg,
                    r: left_pad_32(rr).ok_or_else(too_long)?,
                    s: left_pad_32(ss).ok_or_else(too_long)?,
                }
            }
            other => {
                return Err(M(EvidenceError::InvalidValue {
                    what: "TPMT_SIGNATURE.sigAlg",
                    value: other.into(),
                }));
            }
        };
        r.finish("TPMT_SIGNATURE").map_err(M)?;
        Ok(sig)
    }
}

impl QuoteAttest {
    /// Parses a TPMS_ATTEST and accepts only magic TPM_GENERATED and type
    /// TPM_ST_ATTEST_QUOTE; no trailing bytes.
    pub fn parse(bytes: &[u8]) -> Result<QuoteAttest, TpmsError> {
        use TpmsError::AttestMalformed as M;
        let mut r = Reader::new(bytes);
        let magic = r.u32("TPMS_ATTEST.magic").map_err(M)?;
        if magic != TPM_GENERATED_VALUE {
            return Err(TpmsError::AttestMagic { got: magic });
        }
        let ty = r.u16("TPMS_ATTEST.type").map_err(M)?;
        if ty != TPM_ST_ATTEST_QUOTE {
            return Err(TpmsError::AttestType { got: ty });
        }
        let qualified_signer = r
            .sized16("TPMS_ATTEST.qualifiedSigner", 68)
            .map_err(M)?
            .to_vec();
        let extra_data = r.sized16("TPMS_ATTEST.extraData", 66).map_err(M)?.to_vec();
        let clock = r.u64("TPMS_CLOCK_INFO.clock").map_err(M)?;
        let reset_count = r.u32("TPMS_CLOCK_INFO.resetCount").map_err(M)?;
        let restart_count = r.u32("TPMS_CLOCK_INFO.restartCount").map_err(M)?;
        let safe = match r.u8("TPMS_CLOCK_INFO.safe").map_err(M)? {
            0 => false,
            1 => true,
            v => {
                return Err(M(EvidenceError::InvalidValue {
                    what: "TPMS_CLOCK_INFO.safe",
                    value: v.into(),
                }));
            }
        };
        let firmware_version = r.u64("TPMS_ATTEST.firmwareVersion").map_err(M)?;
        let pcr_select = read_pcr_selection_list(&mut r).map_err(M)?;
        let pcr_digest = r
            .sized16("TPMS_QUOTE_INFO.pcrDigest", 64)
            .map_err(M)?
            .to_vec();
        r.finish("TPMS_ATTEST").map_err(M)?;
        Ok(QuoteAttest {
            qualified_signer,
            extra_data,
            clock_info: ClockInfo {
                clock,
                reset_count,
                restart_count,
                safe,
            },
            firmware_version,
            pcr_select,
            pcr_digest,
        })
    }
}
