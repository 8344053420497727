//! AK provenance on the manager's side: the physical TPM's EK certificate and
//! `TPM2_ActivateCredential` with a group AK (see docs/enrollment.md).
//!
//! A verifier that holds the host's EK certificate (chained to the TPM vendor's root) encrypts a
//! secret to (EK, AK name) with `TPM2_MakeCredential` in software
//! (`vtpm_attest::credential`). Only this TPM can release it, and only if the key loaded as
//! the activation object has that name: the manager loads the group AK under the SRK, re-creates
//! the TCG default RSA-2048 EK in the endorsement hierarchy (same template + same endorsement
//! seed ⇒ the certified key), satisfies the EK's policy `PolicySecret(TPM_RH_ENDORSEMENT)` and
//! runs `TPM2_ActivateCredential`. The manager learns the secret only by doing so.
//!
//! Three transient objects are loaded at once (SRK, AK, EK), the most a TPM without a resource
//! manager is guaranteed to hold; AK and EK are flushed before returning.

use tss_esapi::{
    abstraction::{ek, AsymmetricAlgorithmSelection},
    constants::SessionType,
    handles::{AuthHandle, KeyHandle, SessionHandle},
    interface_types::{
        algorithm::HashingAlgorithm,
        key_bits::RsaKeyBits,
        session_handles::{AuthSession, PolicySession},
    },
    structures::{EncryptedSecret, IdObject, Private, Public, SymmetricDefinition},
    traits::UnMarshall,
};

use crate::hwtpm::{sha256_name, AkRecord, HwTpm, HwTpmError};

/// Largest credential blob accepted: `TPM2B_DIGEST(HMAC)` ‖ encrypted `TPM2B_DIGEST(secret)`.
pub const MAX_CREDENTIAL_BLOB: usize = 2 + 64 + 2 + 64;
/// Largest encrypted secret accepted (an RSA-4096 OAEP ciphertext).
pub const MAX_ENCRYPTED_SECRET: usize = 512;

type Result<T> = std::result::Result<T, HwTpmError>;

/// The RSA-2048 EK certificate the TPM vendor (or, for swtpm, `swtpm_setup --create-ek-cert`)
/// wrote at the TCG NV index `0x01c00002`, DER.
pub fn ek_certificate(hw: &mut HwTpm) -> Result<Vec<u8>> {
    let (ctx, _) = hw.context_and_srk();
    ek::retrieve_ek_pubcert(ctx, AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048)).map_err(op(
        "NV_Read(RSA EK certificate, 0x01c00002): the TPM has no RSA-2048 EK certificate (for swtpm: swtpm_setup --create-ek-cert)",
    ))
}

/// `TPM2_ActivateCredential(activateHandle = ak, keyHandle = EK, credential_blob,
/// encrypted_secret)`: the secret, if the credential was made for this AK's name and this TPM's
/// EK.
pub fn activate_credential(
    hw: &mut HwTpm,
    ak: &AkRecord,
    credential_blob: &[u8],
    encrypted_secret: &[u8],
) -> Result<Vec<u8>> {
    if credential_blob.is_empty() || credential_blob.len() > MAX_CREDENTIAL_BLOB {
        return Err(HwTpmError::InvalidArgument(format!(
            "credential blob of {} bytes (1..={MAX_CREDENTIAL_BLOB})",
            credential_blob.len()
        )));
    }
    if encrypted_secret.is_empty() || encrypted_secret.len() > MAX_ENCRYPTED_SECRET {
        return Err(HwTpmError::InvalidArgument(format!(
            "encrypted secret of {} bytes (1..={MAX_ENCRYPTED_SECRET})",
            encrypted_secret.len()
        )));
    }
    let blob = IdObject::try_from(credential_blob.to_vec()).map_err(op("credential blob"))?;
    let secret =
        EncryptedSecret::try_from(encrypted_secret.to_vec()).map_err(op("encrypted secret"))?;
    if sha256_name(&ak.public) != ak.name {
        return Err(HwTpmError::InvalidRecord(
            "AK name does not match its public area".into(),
        ));
    }
    let public = Public::unmarshall(&ak.public)
        .map_err(HwTpmError::record("AK public"))?;
    let private = Private::try_from(ak.private.clone())
        .map_err(HwTpmError::record("AK private"))?;
    let (ctx, srk) = hw.context_and_srk();
    let ak_handle: KeyHandle = ctx
        .execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.load(srk, private, public)
        })
        .map_err(op("Load(AK)"))?;
    let res = (|| {
        let ek_handle = ek::create_ek_object_2(
            ctx,
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            None,
        )
        .map_err(op("CreatePrimary(EK, TCG default RSA-2048 template)"))?;
        let res = (|| {
            let session = ctx
                .start_auth_session(
                    None,
                    None,
                    None,
                    SessionType::Policy,
                    SymmetricDefinition::AES_128_CFB,
                    HashingAlgorithm::Sha256,
                )
                .map_err(op("StartAuthSession(policy, for the EK)"))?
                .ok_or_else(|| {
                    HwTpmError::Unexpected("StartAuthSession returned no handle".into())
                })?;
            let res = (|| {
                let policy = PolicySession::try_from(session).map_err(op("policy session"))?;
                ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
                    ctx.policy_secret(
                        policy,
                        AuthHandle::Endorsement,
                        Default::default(),
                        Default::default(),
                        Default::default(),
                        None,
                    )
                })
                .map_err(op("PolicySecret(TPM_RH_ENDORSEMENT)"))?;
                ctx.execute_with_sessions(
                    (Some(AuthSession::Password), Some(session), None),
                    |ctx| ctx.activate_credential(ak_handle, ek_handle, blob, secret),
                )
                .map_err(op("ActivateCredential"))
            })();
            // An ActivateCredential that succeeded has consumed the policy session already.
            let _ = ctx.flush_context(SessionHandle::from(session).into());
            res
        })();
        let _ = ctx.flush_context(ek_handle.into());
        res
    })();
    let _ = ctx.flush_context(ak_handle.into());
    Ok(res?.value().to_vec())
}

fn op(op: &'static str) -> impl FnOnce(tss_esapi::Error) -> HwTpmError {
    move |source| HwTpmError::Tpm { op, source }
}
