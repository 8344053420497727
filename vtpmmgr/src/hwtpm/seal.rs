//! The sealed master secret: [`HwTpm::provision`] creates it and seals it under the SRK to
//! `PolicyAuthorize` by the admin's policy key, [`HwTpm::unseal_master`] checks the record and
//! unseals it in an SRK-salted policy session, naming the PCRs that changed when the policy is
//! not satisfied.

use std::time::Instant;

use tss_esapi::{
    attributes::{ObjectAttributesBuilder, SessionAttributesBuilder},
    constants::SessionType,
    interface_types::{
        algorithm::{HashingAlgorithm, PublicAlgorithm},
        session_handles::{AuthSession, PolicySession},
    },
    structures::{
        Digest, KeyedHashScheme, Nonce, Private, Public, PublicBuilder, PublicKeyedHashParameters,
        SensitiveData,
    },
    traits::{Marshall, UnMarshall},
};
use zeroize::Zeroizing;

use super::policy::{ahash, policy_key_public};
use super::{
    HwTpm, HwTpmError, MasterSecret, PcrPolicySpec, PolicySigningKey, ProvisionRecord,
    RECORD_VERSION, Result, SRK_TEMPLATE_ID, Secret, normalize_pcrs, pcr_selection,
    policy_authorize_digest, sha256_name,
};

impl HwTpm {
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
        self.release_kept_ak();
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
            .map_err(HwTpmError::policy_key("PKCS#8 encoding"))?;
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

    pub(super) fn check_record(rec: &ProvisionRecord) -> Result<()> {
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
            .map_err(HwTpmError::record("sealed_public"))?;
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
        self.release_kept_ak();
        Self::check_record(rec)?;
        self.check_srk(&rec.srk_name)?;
        let approved = Digest::try_from(rec.approved_policy.clone())
            .map_err(HwTpmError::record("approved_policy"))?;
        let policy_ref = Nonce::try_from(rec.policy_ref.clone())
            .map_err(HwTpmError::record("policy_ref"))?;
        let sealed_public = Public::unmarshall(&rec.sealed_public)
            .map_err(HwTpmError::record("sealed_public"))?;
        let sealed_private = Private::try_from(rec.sealed_private.clone())
            .map_err(HwTpmError::record("sealed_private"))?;
        let sel = pcr_selection(&rec.pcrs)?;

        // 1. Ticket for the admin's signature over (approvedPolicy, policyRef).
        let a = ahash(&rec.approved_policy, &rec.policy_ref);
        let (key_name, ticket) =
            self.verify_policy_signature(&rec.policy_pubkey, &a, &rec.policy_signature)?;

        // 2. Policy session: PolicyPCR (current values) + PolicyAuthorize.
        let sess = self.start_salted_session(SessionType::Policy)?;
        let res = (|| {
            let psess = PolicySession::try_from(sess)
                .map_err(HwTpmError::unexpected("policy session"))?;
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
}
