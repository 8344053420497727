//! Attestation keys: [`HwTpm::create_ak`] makes a restricted signing key under the SRK, and
//! [`HwTpm::quote`] quotes sha256 PCRs with it, re-quoting when a PCR changes between the quote
//! and the PCR read.

use sha2::{Digest as _, Sha256};
use tss_esapi::{
    handles::KeyHandle,
    interface_types::{
        algorithm::{HashingAlgorithm, PublicAlgorithm},
        ecc::EccCurve,
        key_bits::RsaKeyBits,
        session_handles::AuthSession,
    },
    structures::{
        Attest, AttestInfo, Data, EccPoint, EccScheme, HashScheme, KeyDerivationFunctionScheme,
        PublicBuilder, PublicEccParametersBuilder, PublicKeyRsa, PublicRsaParametersBuilder,
        RsaExponent, RsaScheme, Signature, SignatureScheme, SymmetricDefinitionObject,
    },
    traits::Marshall,
};

use super::{
    AkAlg, AkRecord, HwTpm, HwTpmError, QuoteOut, RECORD_VERSION, Result, made_here_attrs,
    normalize_pcrs, pcr_selection, sha256_name,
};

/// How often [`HwTpm::quote`] retries when a PCR changes between the quote and the PCR read.
const QUOTE_RACE_RETRIES: usize = 3;

impl HwTpm {
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
