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
        PcrSelectionList, RsaExponent, RsaScheme, Signature, SignatureScheme, SymmetricDefinitionObject,
    },
    traits::Marshall,
};

use super::{
    AkAlg, AkRecord, HwTpm, HwTpmError, KeptAk, PCR_CACHE_ENTRIES, QuoteOut, RECORD_VERSION, Result,
    made_here_attrs, normalize_pcrs, pcr_selection, sha256_name,
};

/// How often [`HwTpm::quote`] retries when a PCR changes between the quote and the PCR read.
const QUOTE_RACE_RETRIES: usize = 3;

impl HwTpm {
    /// Creates a restricted signing attestation key under the SRK.
    pub fn create_ak(&mut self, alg: AkAlg) -> Result<AkRecord> {
        self.release_kept_ak();
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
    /// (≤ 64 bytes), and the values of those PCRs.
    ///
    /// In steady state this is exactly one TPM command: the AK stays loaded after a quote
    /// (`HwTpm::kept_ak`; another AK or any other object operation flushes it first), and
    /// the PCR values come from the values of an earlier quote of the same selection when their
    /// SHA-256 equals the `pcrDigest` the TPM has just signed. Otherwise — first quote of a
    /// selection, or a PCR changed — the PCRs are read after the quote. They may change between
    /// the two commands, so the values read are checked against the quoted digest too, and the
    /// quote is repeated (up to 3 times) when they do not match; it fails with
    /// [`HwTpmError::Unexpected`] if they never do. Either way the values returned hash to the
    /// signed digest. The verifier checks that again.
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
        let (key, kept) = self.keep_ak(ak)?;
        let res = match self.quote_with_key(key, &data, &sel, &pcrs) {
            // A kept handle may have gone stale (the TPM was reset, or someone flushed it):
            // load the AK afresh and quote once more.
            Err(HwTpmError::Tpm { op: "Quote", source }) if kept => {
                xvtpm_log::guest_debug!(error = %source, "Quote with the kept AK failed; reloading it");
                self.release_kept_ak();
                let (key, _) = self.keep_ak(ak)?;
                self.quote_with_key(key, &data, &sel, &pcrs)
            }
            r => r,
        };
        if res.is_err() {
            self.release_kept_ak();
        }
        res
    }

    /// Makes the next quote by `ak` one TPM command from the first: loads the AK and keeps it
    /// (as a quote does), and reads the whole SHA-256 bank (PCRs 0–23) into the PCR values
    /// that quotes reuse, so any selection's values come from it while they hash to what the
    /// TPM signs. Without it the first quote after a start costs `Load`, `Quote` and
    /// `PCR_Read`: three TPM commands that every request arriving meanwhile waits out too.
    pub fn warm_quote(&mut self, ak: &AkRecord) -> Result<()> {
        let bank: Vec<u8> = (0..=23).collect();
        let values = self.pcr_read(&bank)?;
        self.keep_ak(ak)?;
        self.remember_pcr_values(&bank, &values);
        Ok(())
    }

    /// The loaded handle of `ak`, loading it (and flushing any other kept AK) when it is not
    /// the one kept. The flag says whether it was already loaded.
    fn keep_ak(&mut self, ak: &AkRecord) -> Result<(KeyHandle, bool)> {
        if let Some(k) = &self.kept_ak
            && k.name == ak.name
            && k.private == ak.private
        {
            return Ok((k.handle, true));
        }
        let handle = self.load_ak(ak)?;
        self.kept_ak = Some(KeptAk { name: ak.name.clone(), private: ak.private.clone(), handle });
        Ok((handle, false))
    }

    fn quote_with_key(
        &mut self,
        key: KeyHandle,
        data: &Data,
        sel: &PcrSelectionList,
        pcrs: &[u8],
    ) -> Result<QuoteOut> {
        for _ in 0..QUOTE_RACE_RETRIES {
            let (attest, sig): (Attest, Signature) = self
                .ctx
                .execute_with_session(Some(AuthSession::Password), |ctx| {
                    ctx.quote(key, data.clone(), SignatureScheme::Null, sel.clone())
                })
                .map_err(HwTpmError::tpm("Quote"))?;
            let AttestInfo::Quote { info } = attest.attested() else {
                return Err(HwTpmError::Unexpected(
                    "Quote returned a non-quote attestation".into(),
                ));
            };
            let quoted = info.pcr_digest().value().to_vec();
            let values = match self.cached_pcr_values(pcrs, &quoted) {
                Some(v) => v,
                None => {
                    let v = self.pcr_read(pcrs)?;
                    if digest_of(&v) != quoted {
                        xvtpm_log::guest_debug!("PCRs changed between Quote and PCR_Read; re-quoting");
                        continue;
                    }
                    self.remember_pcr_values(pcrs, &v);
                    v
                }
            };
            return Ok(QuoteOut {
                attest: attest
                    .marshall()
                    .map_err(HwTpmError::tpm("marshal attest"))?,
                signature: sig
                    .marshall()
                    .map_err(HwTpmError::tpm("marshal signature"))?,
                pcrs: pcrs.to_vec(),
                pcr_values: values,
            });
        }
        Err(HwTpmError::Unexpected(
            "PCR values kept changing between Quote and PCR_Read".into(),
        ))
    }

    /// Remembered values of the normalised selection `pcrs` — remembered for that selection
    /// or picked from a remembered superset of it (the bank [`HwTpm::warm_quote`] read) — if
    /// they hash to `quoted`.
    fn cached_pcr_values(&self, pcrs: &[u8], quoted: &[u8]) -> Option<Vec<Vec<u8>>> {
        self.pcr_cache.iter().rev().find_map(|(p, v)| {
            let picked = pcrs
                .iter()
                .map(|i| p.iter().position(|x| x == i).map(|k| v[k].clone()))
                .collect::<Option<Vec<_>>>()?;
            (digest_of(&picked) == quoted).then_some(picked)
        })
    }

    fn remember_pcr_values(&mut self, pcrs: &[u8], values: &[Vec<u8>]) {
        self.pcr_cache.retain(|(p, _)| p != pcrs);
        if self.pcr_cache.len() >= PCR_CACHE_ENTRIES {
            self.pcr_cache.remove(0);
        }
        self.pcr_cache.push((pcrs.to_vec(), values.to_vec()));
    }
}

/// SHA-256 of the PCR values concatenated: a quote's `pcrDigest` for a sha256 selection.
fn digest_of(values: &[Vec<u8>]) -> Vec<u8> {
    let mut h = Sha256::new();
    for v in values {
        h.update(v);
    }
    h.finalize().to_vec()
}
