//! A group's EK CA key (it signs the group's vTPM EK certificates; docs/trust-chain.md): an
//! unrestricted ECDSA P-256 key under the SRK whose authorisation value derives from the master
//! secret, used only in SRK-salted HMAC sessions, and `TPM2_Certify` of it by a group AK.


use serde::{Deserialize, Serialize};
use tss_esapi::{
    attributes::SessionAttributesBuilder,
    constants::SessionType,
    handles::KeyHandle,
    interface_types::{
        algorithm::{HashingAlgorithm, PublicAlgorithm},
        ecc::EccCurve,
        session_handles::AuthSession,
    },
    structures::{
        Auth, Data, Digest, EccPoint, EccScheme, HashScheme, Public, PublicBuilder,
        PublicEccParametersBuilder, Signature, SignatureScheme,
    },
    traits::Marshall,
};

use super::records::hexbytes;
use super::{
    AkRecord, HwTpm, HwTpmError, RECORD_VERSION, Result, left_pad32, made_here_attrs, sha256_name,
};

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
