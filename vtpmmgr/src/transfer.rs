//! Moving a vTPM identity to another manager, sealed to the destination's TPM
//! (docs/migration.md; the messages are `vtpm_proto::transfer`).
//!
//! A submodule of [`crate::manager`] (it reads the manager's store and master secret), with its
//! own records in the store: [`TransferRecord`] per vTPM that ever moved, [`OfferRecord`] per
//! outstanding or withdrawn offer. The rule that keeps exactly one live copy:
//!
//! * the source marks the vTPM *exporting* durably before any package leaves it; an exporting
//!   or retired vTPM gets no state key and no attachment;
//! * the destination imports an offer at most once (the offer, with its TPM key, is consumed in
//!   the same store write that adds the vTPM), and refuses a package whose transfer generation
//!   is not newer than the one it last saw the vTPM leave at;
//! * the source retires its copy only on an *imported* receipt, and returns it to service only
//!   on a *cancelled* receipt; the destination signs a cancellation only for an offer it has not
//!   imported and durably withdrew (its key is forgotten, so the package can never be opened).
//!   Both receipts are quotes by the destination group's AK, which the source verified.

use hkdf::Hkdf;
use sha2::{Digest as _, Sha256};
use tss_esapi::{
    attributes::{ObjectAttributesBuilder, SessionAttributesBuilder},
    constants::SessionType,
    handles::KeyHandle,
    interface_types::{
        algorithm::{HashingAlgorithm, PublicAlgorithm},
        key_bits::RsaKeyBits,
        session_handles::AuthSession,
    },
    structures::{
        Auth, Data, HashScheme, Public, PublicBuilder, PublicKeyRsa, PublicRsaParametersBuilder, RsaDecryptionScheme, RsaExponent,
        RsaScheme, SignatureScheme, SymmetricDefinitionObject,
    },
    traits::Marshall,
};
use uuid::Uuid;
use vtpm_proto::mgr::{AdminReply, AdminRequest, ErrorCode, Failure, Refusal, SecretBytes};

use vtpm_proto::transfer::{self as tp, Challenge, Offer, Package, Payload, Receipt, ReceiptKind, TransferError, TRANSFER_VERSION};
use zeroize::Zeroizing;

use super::{fail, fail_because, not_found, now, Manager};
use crate::failure::FromError as _;
use crate::hwtpm::{sha256_name, AkRecord, HwTpm, HwTpmError, MasterSecret};
use crate::store::{EkBinding, ImportRecord, KeyRecord, OfferRecord, Outgoing, OutgoingState, StateAnchor, TransferRecord, VtpmEntry, WrappedKey};

/// Most offers a manager keeps outstanding (each holds a TPM key blob in the store).
pub const MAX_OPEN_OFFERS: usize = 8;
/// Most withdrawn offers remembered (so a cancellation receipt can be asked for again).
pub const MAX_CANCELLED_OFFERS: usize = 64;

fn hkdf(master: &MasterSecret, salt: &[u8], info: &[&[u8]]) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(Some(salt), &master[..]);
    let mut okm = Zeroizing::new([0u8; 32]);
    hk.expand_multi_info(info, okm.as_mut()).expect("32 bytes is a valid HKDF-SHA256 output length");
    okm
}

fn challenge_secret(master: &MasterSecret, challenge_id: &[u8], vtpm: &Uuid, host_id: &str, ak_name: &[u8]) -> Zeroizing<[u8; 32]> {
    hkdf(master, b"xvtpm/transfer-challenge/v1", &[challenge_id, vtpm.as_bytes(), host_id.as_bytes(), ak_name])
}

fn key_auth(master: &MasterSecret, offer: &Uuid) -> Zeroizing<[u8; 32]> {
    hkdf(master, b"xvtpm/transfer-key-auth/v1", &[offer.as_bytes()])
}

fn wrap_key(master: &MasterSecret, vtpm: &Uuid, key: &[u8]) -> WrappedKey {
    use aes_gcm::aead::{Aead, KeyInit, Payload as P};
    use rand::RngCore as _;
    let k = hkdf(master, b"xvtpm/imported-state-key/v1", &[]);
    let mut nonce = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let ct = aes_gcm::Aes256Gcm::new(&aes_gcm::Key::<aes_gcm::Aes256Gcm>::from(*k))
        .encrypt(&aes_gcm::Nonce::from(nonce), P { msg: key, aad: vtpm.as_bytes() })
        .expect("AES-GCM encryption of 32 bytes");
    WrappedKey { nonce: hex::encode(nonce), ciphertext: hex::encode(ct) }
}

fn unwrap_key(master: &MasterSecret, vtpm: &Uuid, w: &WrappedKey) -> Option<Zeroizing<Vec<u8>>> {
    use aes_gcm::aead::{Aead, KeyInit, Payload as P};
    let k = hkdf(master, b"xvtpm/imported-state-key/v1", &[]);
    let nonce: [u8; 12] = hex::decode(&w.nonce).ok()?.try_into().ok()?;
    let ct = hex::decode(&w.ciphertext).ok()?;
    aes_gcm::Aes256Gcm::new(&aes_gcm::Key::<aes_gcm::Aes256Gcm>::from(*k))
        .decrypt(&aes_gcm::Nonce::from(nonce), P { msg: &ct, aad: vtpm.as_bytes() })
        .ok()
        .map(Zeroizing::new)
}

fn refused(msg: impl Into<String>) -> AdminReply {
    fail(ErrorCode::Refused, msg)
}

fn bad(e: TransferError) -> AdminReply {
    match e {
        TransferError::Malformed { .. } => fail_because(ErrorCode::BadRequest, "", &e),
        e => fail_because(ErrorCode::Refused, "transfer refused", &e),
    }
}

fn tpm_err(what: &str) -> impl FnOnce(HwTpmError) -> AdminReply + '_ {
    move |e| fail_because(ErrorCode::Tpm, what, &e)
}

fn op(op: &'static str) -> impl FnOnce(tss_esapi::Error) -> HwTpmError {
    move |source| HwTpmError::Tpm { op, source }
}

// ---------------------------------------------------------------------------------------------
// The transfer key in the physical TPM
// ---------------------------------------------------------------------------------------------

fn transfer_key_template() -> Result<Public, HwTpmError> {
    // fixedTPM/fixedParent/sensitiveDataOrigin: made here, never leaves (what the AK's Certify
    // attests); decrypt only, OAEP/SHA-256 only (no raw RSA oracle); noDA: its authorisation
    // value is 256 bits of HKDF output.
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_decrypt(true)
        .build()
        .map_err(op("transfer key attributes"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Rsa)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_rsa_parameters(
            PublicRsaParametersBuilder::new()
                .with_scheme(RsaScheme::Oaep(HashScheme::new(HashingAlgorithm::Sha256)))
                .with_key_bits(RsaKeyBits::Rsa2048)
                .with_exponent(RsaExponent::default())
                .with_is_decryption_key(true)
                .with_restricted(false)
                .with_symmetric(SymmetricDefinitionObject::Null)
                .build()
                .map_err(op("transfer key parameters"))?,
        )
        .with_rsa_unique_identifier(PublicKeyRsa::default())
        .build()
        .map_err(op("transfer key template"))
}

/// Creates a transfer key under the SRK with authorisation value `auth`, sent encrypted.
fn create_key(hw: &mut HwTpm, auth: &[u8]) -> Result<KeyRecord, HwTpmError> {
    let auth = Auth::try_from(auth.to_vec()).map_err(op("transfer key auth"))?;
    let template = transfer_key_template()?;
    let sess = hw.start_salted_session(SessionType::Hmac)?;
    let (attrs, mask) = SessionAttributesBuilder::new().with_decrypt(true).with_continue_session(true).build();
    let (ctx, srk) = hw.context_and_srk();
    let res = ctx
        .tr_sess_set_attributes(sess, attrs, mask)
        .map_err(op("TRSess_SetAttributes"))
        .and_then(|()| ctx.execute_with_session(Some(sess), |ctx| ctx.create(srk, template, Some(auth), None, None, None)).map_err(op("Create(transfer key)")));
    hw.flush_session(sess);
    let created = res?;
    Ok(KeyRecord {
        public: hex::encode(created.out_public.marshall().map_err(op("marshal transfer key public"))?),
        private: hex::encode(created.out_private.value()),
    })
}

fn load_key(hw: &mut HwTpm, key: &KeyRecord, auth: &[u8]) -> Result<KeyHandle, HwTpmError> {
    let public = hex::decode(&key.public).map_err(|_| HwTpmError::InvalidRecord("transfer key public is not hex".into()))?;
    let private = hex::decode(&key.private).map_err(|_| HwTpmError::InvalidRecord("transfer key private is not hex".into()))?;
    let h = hw.load_under_srk("transfer key", "Load(transfer key)", &public, &private, &sha256_name(&public))?;
    let set = Auth::try_from(auth.to_vec()).map_err(op("transfer key auth")).and_then(|a| {
        let (ctx, _) = hw.context_and_srk();
        ctx.tr_set_auth(h.into(), a).map_err(op("TR_SetAuth(transfer key)"))
    });
    if let Err(e) = set {
        hw.flush_object(h.into());
        return Err(e);
    }
    Ok(h)
}

/// `TPM2_Certify` of the transfer key by `ak` with `qualifyingData = qualifying`.
fn certify_key(hw: &mut HwTpm, key: &KeyRecord, auth: &[u8], ak: &AkRecord, qualifying: &[u8]) -> Result<(Vec<u8>, Vec<u8>), HwTpmError> {
    let data = Data::try_from(qualifying.to_vec()).map_err(op("qualifying data"))?;
    let k = load_key(hw, key, auth)?;
    let res = (|| {
        let signer = hw.load_ak(ak)?;
        let out = (|| {
            let sess = hw.hmac_session()?;
            let (ctx, _) = hw.context_and_srk();
            let out = ctx
                .execute_with_sessions((Some(sess), Some(AuthSession::Password), None), |ctx| ctx.certify(k.into(), signer, data, SignatureScheme::Null))
                .map_err(op("Certify(transfer key by the AK)"));
            hw.flush_session(sess);
            let (attest, sig) = out?;
            Ok((attest.marshall().map_err(op("marshal attest"))?, sig.marshall().map_err(op("marshal signature"))?))
        })();
        hw.flush_object(signer.into());
        out
    })();
    hw.flush_object(k.into());
    res
}

/// `TPM2_RSA_Decrypt` (OAEP/SHA-256, label [`tp::OAEP_LABEL`]) with the transfer key.
fn decrypt(hw: &mut HwTpm, key: &KeyRecord, auth: &[u8], ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, HwTpmError> {
    let ct = PublicKeyRsa::try_from(ciphertext.to_vec()).map_err(op("package key ciphertext"))?;
    let label = Data::try_from(tp::OAEP_LABEL.as_bytes().to_vec()).map_err(op("OAEP label"))?;
    let k = load_key(hw, key, auth)?;
    let res = (|| {
        let sess = hw.hmac_session()?;
        let (attrs, mask) = SessionAttributesBuilder::new().with_encrypt(true).with_continue_session(true).build();
        let (ctx, _) = hw.context_and_srk();
        let out = ctx.tr_sess_set_attributes(sess, attrs, mask).map_err(op("TRSess_SetAttributes")).and_then(|()| {
            ctx.execute_with_session(Some(sess), |ctx| ctx.rsa_decrypt(k, ct, RsaDecryptionScheme::Oaep(HashScheme::new(HashingAlgorithm::Sha256)), label))
                .map_err(op("RSA_Decrypt(package key)"))
        });
        hw.flush_session(sess);
        Ok(Zeroizing::new(out?.value().to_vec()))
    })();
    hw.flush_object(k.into());
    res
}

// ---------------------------------------------------------------------------------------------
// The manager's side
// ---------------------------------------------------------------------------------------------

impl Manager {
    fn master_secret(&self) -> Result<&MasterSecret, AdminReply> {
        self.master.as_ref().ok_or_else(|| fail(ErrorCode::NotProvisioned, "the manager is not provisioned"))
    }

    fn transfer_record(&self, uuid: &Uuid) -> Option<&TransferRecord> {
        self.store.transfers.iter().find(|t| t.uuid == *uuid)
    }

    /// Why vTPM `uuid` may not run here (it is being exported, or was moved away), if so: a
    /// refusal of class [`ErrorCode::Refused`] that names the transfer state.
    pub(super) fn transfer_refusal(&self, uuid: &Uuid) -> Option<Failure> {
        let o = self.transfer_record(uuid)?.outgoing.as_ref()?;
        let to = if o.destination.is_empty() { String::new() } else { format!("{} ", o.destination) };
        Some(match o.state {
            OutgoingState::Exporting => Failure::transfer(ErrorCode::Refused, Refusal::Exporting, format!(
                "vTPM {uuid} is being transferred to {to}(host {}, offer {}): it does not run here until the transfer is committed (`xl-vtpm vtpm transfer-commit`) or aborted on the destination's cancellation (`xl-vtpm vtpm transfer-abort`)",
                o.dest_host, o.offer_id
            )),
            OutgoingState::Retired => Failure::transfer(ErrorCode::Refused, Refusal::Retired, format!(
                "vTPM {uuid} was transferred to {to}(host {}) at transfer generation {}; this copy is retired — start it on that host",
                o.dest_host, o.generation
            )),
        })
    }

    /// The state key of an imported vTPM (`Some(None)` if its wrapped key does not open), or
    /// `None` if the key is derived here.
    pub(super) fn imported_state_key(&self, uuid: &Uuid) -> Option<Option<Zeroizing<Vec<u8>>>> {
        let w = self.transfer_record(uuid)?.imported_key.as_ref()?;
        Some(self.master.as_ref().and_then(|m| unwrap_key(m, uuid, w)))
    }

    fn own_host_id(&mut self) -> String {
        match crate::akprov::ek_certificate(&mut self.hw()) {
            Ok(c) => hex::encode(Sha256::digest(&c)),
            Err(_) => format!("srk-{}", hex::encode(self.hw().srk_name())),
        }
    }

    /// Transfer requests of the admin socket.
    pub(super) fn transfer_admin(&mut self, req: AdminRequest) -> Result<AdminReply, AdminReply> {
        match req {
            AdminRequest::TransferChallenge { uuid, ek_cert, ek_intermediates, ek_roots, ak_public, pcrs } => {
                self.challenge(uuid, &ek_cert, &ek_intermediates, &ek_roots, &ak_public, pcrs)
            }
            AdminRequest::TransferOffer { group, challenge } => self.offer(group, *challenge),
            AdminRequest::TransferVerify { uuid, offer, ek_roots, host_policy } => {
                if host_policy.len() > 24 {
                    return Err(fail(ErrorCode::BadRequest, "host_policy: at most 24 PCRs"));
                }
                self.store.vtpm(&uuid).ok_or_else(|| not_found(&uuid))?;
                self.verify_offer(&uuid, &offer, &ek_roots, &host_policy.into_iter().collect())?;
                Ok(AdminReply::Ok)
            }
            AdminRequest::TransferExport { uuid, offer, ek_roots, host_policy, state, destination } => {
                if host_policy.len() > 24 {
                    return Err(fail(ErrorCode::BadRequest, "host_policy: at most 24 PCRs"));
                }
                self.export(uuid, *offer, &ek_roots, &host_policy.into_iter().collect(), &state, destination)
            }
            AdminRequest::TransferImport { package, protocol } => {
                if protocol < tp::IMPORT_PROTOCOL {
                    return Err(refused(format!(
                        "import refused: this manager writes the imported vTPM's state file itself (transfer protocol {}), but the xl-vtpm that sent the import speaks protocol {protocol} and would install it again: use the xl-vtpm of this manager's release",
                        tp::IMPORT_PROTOCOL
                    )));
                }
                self.import(*package)
            }
            AdminRequest::TransferReceipt { uuid } => self.receipt_again(uuid),
            AdminRequest::TransferCancel { offer_id } => self.cancel(offer_id),
            AdminRequest::TransferCommit { uuid, receipt } => self.commit_transfer(uuid, *receipt),
            AdminRequest::TransferAbort { uuid, receipt: Some(receipt), lost_destination: None } => self.abort_transfer(uuid, *receipt),
            AdminRequest::TransferAbort { uuid, receipt: None, lost_destination: Some(host) } => self.force_abort(uuid, &host),
            AdminRequest::TransferAbort { .. } => Err(fail(
                ErrorCode::BadRequest,
                "an abort takes either the destination's cancellation receipt or, for a destination lost for good, its host id (not both, not neither)",
            )),
            other => Err(fail(ErrorCode::Internal, format!("not a transfer request: {other:?}"))),
        }
    }

    /// Verifies an EK certificate chain; returns (EK SPKI, host id).
    fn ek_chain(&self, ek_cert: &str, intermediates: &[String], roots: &[String]) -> Result<(Vec<u8>, String), AdminReply> {
        use vtpm_proto::ekcert::Certificate;
        if intermediates.len() > tp::MAX_INTERMEDIATES || roots.len() > 16 {
            return Err(fail(ErrorCode::BadRequest, format!("at most {} intermediates and 16 roots", tp::MAX_INTERMEDIATES)));
        }
        let parse = |h: &str, what: &'static str| -> Result<Certificate, AdminReply> {
            let der = tp::unhex(h, what, tp::MAX_CERT).map_err(bad)?;
            Certificate::from_pem_or_der(&der).map_err(|e| fail_because(ErrorCode::BadRequest, what, &e))
        };
        let leaf_der = tp::unhex(ek_cert, "EK certificate", tp::MAX_CERT).map_err(bad)?;
        let leaf = parse(ek_cert, "EK certificate")?;
        let inter = intermediates.iter().map(|h| parse(h, "EK intermediate")).collect::<Result<Vec<_>, _>>()?;
        let roots = roots.iter().map(|h| parse(h, "EK root")).collect::<Result<Vec<_>, _>>()?;
        let chain = vtpm_attest::credential::verify_ek_chain(&leaf, &inter, &roots, now())
            .map_err(|e| fail_because(ErrorCode::Refused, "transfer refused: the destination is not enrolled", &e))?;
        Ok((chain.ek_spki, hex::encode(Sha256::digest(&leaf_der))))
    }

    fn runnable_here(&self, uuid: &Uuid) -> Result<VtpmEntry, AdminReply> {
        let entry = self.store.vtpm(uuid).cloned().ok_or_else(|| not_found(uuid))?;
        if let Some(why) = self.transfer_refusal(uuid) {
            return Err(AdminReply::Error(why));
        }
        Ok(entry)
    }

    fn challenge(&mut self, uuid: Uuid, ek_cert: &str, inter: &[String], roots: &[String], ak_public: &str, mut pcrs: Vec<u8>) -> Result<AdminReply, AdminReply> {
        self.runnable_here(&uuid)?;
        pcrs.sort_unstable();
        pcrs.dedup();
        if pcrs.is_empty() || pcrs.iter().any(|p| *p > 23) {
            return Err(fail(ErrorCode::BadRequest, "pcrs: name 1 to 24 host PCRs in 0..=23 (the PCRs of the policy the destination must meet)"));
        }
        let (spki, host_id) = self.ek_chain(ek_cert, inter, roots)?;
        let ak = tp::unhex(ak_public, "ak_public", 1024).map_err(bad)?;
        let ak_name = vtpm_attest::credential::ak_name(&ak).map_err(|e| fail_because(ErrorCode::Refused, "transfer refused: the destination", &e))?;
        let ek = vtpm_attest::credential::ek_rsa_key(&spki).map_err(|e| fail_because(ErrorCode::Refused, "transfer refused: the destination", &e))?;
        let mut id = now().to_be_bytes().to_vec();
        let mut rnd = [0u8; 24];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut rnd);
        id.extend_from_slice(&rnd);
        let secret = challenge_secret(self.master_secret()?, &id, &uuid, &host_id, &ak_name);
        let cred = vtpm_attest::credential::make_credential(&ek, &ak_name, &secret[..]).map_err(|e| fail_because(ErrorCode::Internal, "", &e))?;
        Ok(AdminReply::TransferChallenge(Box::new(Challenge {
            version: TRANSFER_VERSION,
            vtpm: uuid,
            challenge_id: hex::encode(id),
            pcrs,
            credential_blob: hex::encode(cred.blob),
            encrypted_secret: hex::encode(cred.encrypted_secret),
        })))
    }

    fn offer(&mut self, group: Option<String>, ch: Challenge) -> Result<AdminReply, AdminReply> {
        if ch.version != TRANSFER_VERSION {
            return Err(fail(ErrorCode::BadRequest, format!("challenge version {} (this manager reads {TRANSFER_VERSION})", ch.version)));
        }
        let g = match &group {
            Some(k) => self.store.group(k).cloned().ok_or_else(|| fail(ErrorCode::NotFound, format!("--group {k:?}: no such group; see `xl-vtpm mgr group list`")))?,
            None => self.store.groups.first().cloned().ok_or_else(|| fail(ErrorCode::Internal, "no default group"))?,
        };
        if self.store.vtpm(&ch.vtpm).is_some() && self.transfer_refusal(&ch.vtpm).is_none() {
            return Err(fail(ErrorCode::Exists, format!("vTPM {} lives on this manager already; nothing to transfer here", ch.vtpm)));
        }
        let open: Vec<&OfferRecord> = self.store.offers.iter().filter(|o| o.key.is_some()).collect();
        if open.len() >= MAX_OPEN_OFFERS {
            let t = now();
            let list = open.iter().map(|o| format!("{} (vTPM {}, {} s old)", o.offer_id, o.vtpm, t.saturating_sub(o.created))).collect::<Vec<_>>().join(", ");
            return Err(fail(
                ErrorCode::Busy,
                format!("{} transfer offers are outstanding (at most {MAX_OPEN_OFFERS}): {list}; withdraw the unused ones with `xl-vtpm vtpm transfer cancel OFFER --out FILE`", open.len()),
            ));
        }
        let challenge_id = tp::unhex(&ch.challenge_id, "challenge_id", 32).map_err(bad)?;
        if ch.pcrs.is_empty() || ch.pcrs.len() > 24 || ch.pcrs.iter().any(|p| *p > 23) {
            return Err(fail(ErrorCode::BadRequest, "challenge pcrs: 1 to 24 PCRs in 0..=23"));
        }
        let blob = tp::unhex(&ch.credential_blob, "credential_blob", crate::akprov::MAX_CREDENTIAL_BLOB).map_err(bad)?;
        let enc = tp::unhex(&ch.encrypted_secret, "encrypted_secret", crate::akprov::MAX_ENCRYPTED_SECRET).map_err(bad)?;
        let secret = Zeroizing::new(
            crate::akprov::activate_credential(&mut self.hw(), &g.ak, &blob, &enc)
                .map_err(|e| AdminReply::Error(Failure::from_error_fix(ErrorCode::Refused, &format!("credential activation with the AK of group {:?} failed", g.name), &e, "the challenge was made for another AK or another TPM's EK")))?,
        );
        let offer_id = Uuid::new_v4();
        let auth = key_auth(self.master_secret()?, &offer_id);
        let key = create_key(&mut self.hw(), &auth[..]).map_err(tpm_err("creating the transfer key"))?;
        let key_public = hex::decode(&key.public).expect("hex we wrote");
        let binding = tp::offer_binding(&challenge_id, &offer_id, &ch.vtpm, &g.uuid, &g.ak.name, &sha256_name(&key_public));
        let (cattest, csig) = certify_key(&mut self.hw(), &key, &auth[..], &g.ak, &binding).map_err(tpm_err("certifying the transfer key"))?;
        let q = self.hw().quote(&g.ak, &binding, &ch.pcrs).map_err(tpm_err("quoting the host PCRs"))?;
        let ek_cert = crate::akprov::ek_certificate(&mut self.hw()).map_err(tpm_err("reading the EK certificate"))?;
        let mut next = self.store.clone();
        next.offers.push(OfferRecord { offer_id, vtpm: ch.vtpm, group: g.uuid, key: Some(key.clone()), created: now() });
        self.commit(next)?;
        xvtpm_log::host_info!(offer = %offer_id, vtpm = %ch.vtpm, group = %g.uuid, "transfer offer made");
        Ok(AdminReply::TransferOffer(Box::new(Offer {
            version: TRANSFER_VERSION,
            offer_id,
            challenge_id: ch.challenge_id,
            vtpm: ch.vtpm,
            host_id: hex::encode(Sha256::digest(&ek_cert)),
            ek_cert: hex::encode(&ek_cert),
            ek_intermediates: vec![],
            group: g.uuid,
            group_name: g.name.clone(),
            ak_public: hex::encode(&g.ak.public),
            key_public: key.public,
            certify_attest: hex::encode(cattest),
            certify_signature: hex::encode(csig),
            quote_attest: hex::encode(&q.attest),
            quote_signature: hex::encode(&q.signature),
            pcrs: q.pcrs.clone(),
            pcr_values: q.pcr_values.iter().map(hex::encode).collect(),
            activation_proof: hex::encode(tp::activation_proof(&secret[..], &binding)),
        })))
    }

    /// Every check of an offer; returns the transfer key.
    fn verify_offer(&self, uuid: &Uuid, o: &Offer, roots: &[String], policy: &std::collections::BTreeMap<u8, String>) -> Result<rsa::RsaPublicKey, AdminReply> {
        if o.version != TRANSFER_VERSION {
            return Err(fail(ErrorCode::BadRequest, format!("offer version {} (this manager reads {TRANSFER_VERSION})", o.version)));
        }
        if o.vtpm != *uuid {
            return Err(refused(format!("transfer refused: the offer is for vTPM {}, not {uuid}", o.vtpm)));
        }
        let id = tp::unhex(&o.challenge_id, "challenge_id", 32).map_err(bad)?;
        let issued = id.get(..8).map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes"))).unwrap_or(0);
        let t = now();
        if id.len() != 32 || issued > t + 60 || t.saturating_sub(issued) > tp::CHALLENGE_LIFETIME {
            return Err(AdminReply::Error(Failure::transfer(
                ErrorCode::Refused,
                Refusal::ChallengeExpired,
                format!("transfer refused: the offer answers a challenge that is not from the last {} s; start again with a new challenge", tp::CHALLENGE_LIFETIME),
            )));
        }
        let (_, host_id) = self.ek_chain(&o.ek_cert, &o.ek_intermediates, roots)?;
        if host_id != o.host_id {
            return Err(refused("transfer refused: the offer's host id is not the SHA-256 of its EK certificate"));
        }
        let ak_bytes = tp::unhex(&o.ak_public, "ak_public", 1024).map_err(bad)?;
        let ak_name = vtpm_attest::credential::ak_name(&ak_bytes).map_err(|e| fail_because(ErrorCode::Refused, "transfer refused: the destination", &e))?;
        let key_bytes = tp::unhex(&o.key_public, "key_public", 1024).map_err(bad)?;
        let key = tp::check_transfer_key(&key_bytes).map_err(bad)?;
        let binding = tp::offer_binding(&id, &o.offer_id, uuid, &o.group, &ak_name, &sha256_name(&key_bytes));
        let ak = vtpm_proto::tpms::AkPublic::parse(&ak_bytes).map_err(|e| fail_because(ErrorCode::Refused, "transfer refused: the destination's AK", &e))?;
        tp::verify_certify(&ak, &o.certify_attest, &o.certify_signature, &binding, &sha256_name(&key_bytes)).map_err(bad)?;
        if o.pcr_values.len() != o.pcrs.len() || o.pcrs.len() > 24 {
            return Err(fail(ErrorCode::BadRequest, "offer: one PCR value per quoted PCR"));
        }
        let values = o.pcr_values.iter().map(|v| tp::unhex(v, "pcr value", 64)).collect::<Result<Vec<_>, _>>().map_err(bad)?;
        tp::verify_quote(&ak, &o.quote_attest, &o.quote_signature, &binding, &o.pcrs, &values).map_err(bad)?;
        tp::check_policy(&o.pcrs, &values, policy).map_err(bad)?;
        // Last, the proof that the AK that signed all of the above lives in the TPM of the
        // certified EK.
        let secret = challenge_secret(self.master_secret()?, &id, uuid, &host_id, &ak_name);
        tp::check_activation_proof(&secret[..], &binding, &o.activation_proof).map_err(bad)?;
        Ok(key)
    }

    /// Opens a sealed state file of `uuid` with `key`; returns (generation, anchor digest).
    fn state_anchor(uuid: &Uuid, key: &[u8], state: &[u8]) -> Result<(u64, String), Box<dyn std::error::Error + Send + Sync>> {
        let key: [u8; 32] = key.try_into().map_err(|_| "state key is not 32 bytes")?;
        let (family, _, generation) = vtpm_proto::sealed::peek(state)?;
        let s = vtpm_proto::sealed::open(&key, uuid, state)?;
        Ok((generation, hex::encode(vtpm_proto::sealed::anchor_digest(family, generation, &s.permanent, &s.volatile))))
    }

    fn export(&mut self, uuid: Uuid, offer: Offer, roots: &[String], policy: &std::collections::BTreeMap<u8, String>, state: &str, destination: String) -> Result<AdminReply, AdminReply> {
        let entry = self.store.vtpm(&uuid).cloned().ok_or_else(|| not_found(&uuid))?;
        let rec = self.transfer_record(&uuid).cloned().unwrap_or(TransferRecord { uuid, generation: 0, imported_key: None, import: None, outgoing: None });
        let export_id = match &rec.outgoing {
            None => Uuid::new_v4(),
            Some(o) if o.state == OutgoingState::Exporting && o.offer_id == offer.offer_id => o.export_id,
            Some(_) => return Err(self.transfer_refusal(&uuid).map_or_else(|| refused(""), AdminReply::Error)),
        };
        if let Some(a) = self.attachment(&uuid) {
            return Err(refused(format!("vTPM {uuid} is running (process {}); stop it first (`xl-vtpm vtpm stop {uuid}`) — after a QEMU migration, once the source QEMU has stopped", a.pid)));
        }
        if let Some(d) = self.attached_domain(&uuid) {
            return Err(refused(format!("vTPM {uuid} is attached to domain {d}; stop it first (`xl-vtpm vtpm stop {uuid}`)")));
        }
        if destination.len() > 256 {
            return Err(fail(ErrorCode::BadRequest, "destination name longer than 256 bytes"));
        }
        let key = self.verify_offer(&uuid, &offer, roots, policy)?;
        let state_bytes = tp::unhex(state, "state", tp::MAX_STATE).map_err(bad)?;
        let sk = self.derive_key(&uuid).ok_or_else(|| fail(ErrorCode::NotProvisioned, "the manager is not provisioned"))?;
        let (generation, digest) = Self::state_anchor(&uuid, &sk, &state_bytes)
            .map_err(|e| fail_because(ErrorCode::BadRequest, &format!("the state file given for vTPM {uuid} does not open under its key"), &*e))?;
        if let Some(a) = &entry.state
            && (a.generation != generation || a.digest != digest)
        {
            return Err(fail(
                ErrorCode::StaleState,
                format!("the state file given is generation {generation}, but the newest state the manager anchored for vTPM {uuid} is generation {}: give the vTPM's current state file", a.generation),
            ));
        }
        let ek = entry.ek.clone();
        let source_host = self.own_host_id();
        let out = Outgoing {
            state: OutgoingState::Exporting,
            offer_id: offer.offer_id,
            export_id,
            generation: rec.generation + 1,
            dest_host: offer.host_id.clone(),
            destination,
            dest_ak_public: offer.ak_public.clone(),
            at: now(),
        };
        // Durable before anything leaves: from here on the vTPM does not run here.
        if rec.outgoing.is_none() {
            let mut next = self.store.clone();
            next.transfers.retain(|t| t.uuid != uuid);
            next.transfers.push(TransferRecord { outgoing: Some(out.clone()), ..rec.clone() });
            self.commit(next)?;
            xvtpm_log::host_info!(vtpm = %uuid, offer = %offer.offer_id, dest = %offer.host_id, generation = out.generation, "vTPM marked exporting");
        }
        let payload = Payload {
            vtpm: uuid,
            state_key: SecretBytes(sk),
            state: hex::encode(&state_bytes),
            anchor_generation: generation,
            anchor_digest: digest,
            ek_sha256: ek.as_ref().map(|e| e.ek_sha256.clone()),
            ek_serial: ek.as_ref().map(|e| e.serial.clone()),
        };
        let pkg = Package {
            version: TRANSFER_VERSION,
            vtpm: uuid,
            offer_id: offer.offer_id,
            export_id,
            generation: out.generation,
            source_host,
            dest_host: offer.host_id,
            encrypted_key: String::new(),
            nonce: String::new(),
            ciphertext: String::new(),
        }
        .seal(&key, &payload)
        .map_err(|e| fail_because(ErrorCode::Internal, "", &e))?;
        Ok(AdminReply::TransferPackage(Box::new(pkg)))
    }

    fn import(&mut self, pkg: Package) -> Result<AdminReply, AdminReply> {
        if pkg.version != TRANSFER_VERSION {
            return Err(fail(ErrorCode::BadRequest, format!("package version {} (this manager reads {TRANSFER_VERSION})", pkg.version)));
        }
        let uuid = pkg.vtpm;
        let rec = self.transfer_record(&uuid).cloned();
        if let Some(o) = rec.as_ref().and_then(|r| r.outgoing.as_ref())
            && pkg.generation <= o.generation
        {
            return Err(refused(format!(
                "import refused: the package carries transfer generation {} of vTPM {uuid}, but this manager saw it leave at generation {}: an older (replayed) package",
                pkg.generation, o.generation
            )));
        }
        let retired_here = rec.as_ref().and_then(|r| r.outgoing.as_ref()).is_some_and(|o| o.state == OutgoingState::Retired);
        if self.store.vtpm(&uuid).is_some() && !retired_here {
            if rec.as_ref().and_then(|r| r.import.as_ref()).is_some_and(|i| i.export_id == pkg.export_id) {
                return Err(AdminReply::Error(Failure::transfer(
                    ErrorCode::Exists,
                    Refusal::AlreadyImported,
                    format!("import refused: vTPM {uuid} was already imported from this package; its receipt: `xl-vtpm vtpm transfer receipt {uuid} --out FILE`"),
                )));
            }
            return Err(fail(ErrorCode::Exists, format!("import refused: vTPM {uuid} exists on this manager already")));
        }
        let Some(offer) = self.store.offers.iter().find(|o| o.offer_id == pkg.offer_id).cloned() else {
            return Err(refused(format!(
                "import refused: offer {} is not one this manager made (the package was sealed for another manager) or it was already used",
                pkg.offer_id
            )));
        };
        let Some(key) = offer.key.clone() else {
            return Err(refused(format!("import refused: offer {} was withdrawn (`xl-vtpm vtpm transfer cancel`); the package can no longer be opened", pkg.offer_id)));
        };
        if offer.vtpm != uuid {
            return Err(refused(format!("import refused: offer {} was made for vTPM {}, the package carries {uuid}", offer.offer_id, offer.vtpm)));
        }
        if pkg.dest_host != self.own_host_id() {
            return Err(refused("import refused: the package names another destination host"));
        }
        let enc = pkg.encrypted_key().map_err(bad)?;
        let auth = key_auth(self.master_secret()?, &offer.offer_id);
        let pk = decrypt(&mut self.hw(), &key, &auth[..], &enc)
            .map_err(|e| fail_because(ErrorCode::Refused, "import refused: the package key does not decrypt with the offer's transfer key (tampered, or sealed for another offer)", &e))?;
        let payload = pkg.open(&pk).map_err(|e| fail_because(ErrorCode::Refused, "import refused", &e))?;
        let state = tp::unhex(&payload.state, "state", tp::MAX_STATE).map_err(bad)?;
        let (generation, digest) = Self::state_anchor(&uuid, &payload.state_key.0, &state).map_err(|e| fail_because(ErrorCode::Refused, "import refused: the package's state does not open under its state key", &*e))?;
        if generation != payload.anchor_generation || digest != payload.anchor_digest {
            return Err(refused("import refused: the package's state is not the state its source anchored"));
        }
        // The state file first, durably: a kill after it and before the store write leaves the
        // offer unused (the import can be made again, rewriting the same file); a kill after
        // the store write leaves an imported vTPM whose state file is on disk.
        let state_file = self.write_imported_state(&uuid, &state)?;
        xvtpm_log::host_info!(vtpm = %uuid, path = %state_file.display(), "imported vTPM's state file written");
        let wrapped = wrap_key(self.master_secret()?, &uuid, &payload.state_key.0);
        let entry = VtpmEntry {
            uuid,
            group: offer.group,
            created: now(),
            ek: payload.ek_sha256.clone().map(|ek_sha256| EkBinding { ek_sha256, serial: payload.ek_serial.clone().unwrap_or_default(), issued: now() }),
            state: Some(StateAnchor { generation, digest, fence: None }),
        };
        let mut next = self.store.clone();
        next.vtpms.retain(|v| v.uuid != uuid);
        next.vtpms.push(entry.clone());
        next.transfers.retain(|t| t.uuid != uuid);
        next.transfers.push(TransferRecord {
            uuid,
            generation: pkg.generation,
            imported_key: Some(wrapped),
            import: Some(ImportRecord { offer_id: offer.offer_id, export_id: pkg.export_id, from_host: pkg.source_host.clone(), at: now() }),
            outgoing: None,
        });
        next.offers.retain(|o| o.offer_id != offer.offer_id);
        self.commit(next)?;
        self.refused_states.remove(&uuid);
        xvtpm_log::host_info!(vtpm = %uuid, offer = %offer.offer_id, from = %pkg.source_host, generation = pkg.generation, "vTPM imported");
        let receipt = self.make_receipt(ReceiptKind::Imported, uuid, offer.offer_id, Some(pkg.export_id), pkg.generation, entry.group).map_err(|e| {
            fail(e.code, format!("vTPM {uuid} was imported, but its receipt could not be made ({}); ask again with `xl-vtpm vtpm transfer receipt {uuid} --out FILE`", e.message))
        })?;
        Ok(AdminReply::TransferImported { receipt: Box::new(receipt), state_file: state_file.display().to_string() })
    }

    /// Writes an imported vTPM's sealed state file `VTPM_STATE_DIR/vtpms/UUID/state.xvts`
    /// (directory 0700, file 0600, root's until `xl-vtpm vtpm start` gives them to the vTPM's
    /// uid): a temporary file, fsynced, renamed over the target, the directory fsynced.
    fn write_imported_state(&self, uuid: &Uuid, state: &[u8]) -> Result<std::path::PathBuf, AdminReply> {
        use std::os::unix::fs::DirBuilderExt as _;
        let vtpms = self.cfg.vtpm_state_dir.join("vtpms");
        let dir = vtpms.join(uuid.to_string());
        let failed = |what: &str, p: &std::path::Path, e: std::io::Error| {
            AdminReply::Error(Failure::from_error_fix(
                ErrorCode::Internal,
                &format!("import not done: {what} {} failed", p.display()),
                &e,
                "nothing was imported — fix it (the manager's --vtpm-state-dir) and import the package again",
            ))
        };
        std::fs::DirBuilder::new().recursive(true).mode(0o755).create(&vtpms).map_err(|e| failed("creating", &vtpms, e))?;
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(failed("creating", &dir, e)),
            _ => {}
        }
        let path = dir.join("state.xvts");
        xvtpm_fsutil::remove_stale_temps(&path);
        xvtpm_fsutil::write_atomic(&path, state, 0o600).map_err(|e| failed("writing", &path, e))?;
        Ok(path)
    }

    fn make_receipt(&mut self, kind: ReceiptKind, vtpm: Uuid, offer_id: Uuid, export_id: Option<Uuid>, generation: u64, group: Uuid) -> Result<Receipt, Failure> {
        let g = self.store.groups.iter().find(|g| g.uuid == group).cloned().ok_or_else(|| Failure::new(ErrorCode::NotFound, format!("group {group} does not exist")))?;
        let stmt = tp::receipt_statement(kind, &vtpm, &offer_id, export_id.as_ref(), generation);
        let q = self.hw().quote(&g.ak, &stmt, &[0]).map_err(|e| Failure::from_error(ErrorCode::Tpm, "TPM2_Quote", &e))?;
        Ok(Receipt { version: TRANSFER_VERSION, kind, vtpm, offer_id, export_id, generation, attest: hex::encode(q.attest), signature: hex::encode(q.signature) })
    }

    fn receipt_again(&mut self, uuid: Uuid) -> Result<AdminReply, AdminReply> {
        let entry = self.store.vtpm(&uuid).cloned().ok_or_else(|| not_found(&uuid))?;
        let rec = self.transfer_record(&uuid).cloned();
        let Some(imp) = rec.as_ref().and_then(|r| r.import.clone()) else {
            return Err(fail(ErrorCode::NotFound, format!("vTPM {uuid} was not imported on this manager")));
        };
        let generation = rec.map(|r| r.generation).unwrap_or_default();
        let r = self.make_receipt(ReceiptKind::Imported, uuid, imp.offer_id, Some(imp.export_id), generation, entry.group).map_err(AdminReply::Error)?;
        Ok(AdminReply::TransferReceipt(Box::new(r)))
    }

    fn cancel(&mut self, offer_id: Uuid) -> Result<AdminReply, AdminReply> {
        let Some(offer) = self.store.offers.iter().find(|o| o.offer_id == offer_id).cloned() else {
            if let Some(t) = self.store.transfers.iter().find(|t| t.import.as_ref().is_some_and(|i| i.offer_id == offer_id)) {
                return Err(refused(format!(
                    "offer {offer_id} was imported (vTPM {}): it cannot be cancelled; give the source its receipt (`xl-vtpm vtpm transfer receipt {} --out FILE`) to commit",
                    t.uuid, t.uuid
                )));
            }
            return Err(fail(ErrorCode::NotFound, format!("no offer {offer_id} on this manager")));
        };
        if offer.key.is_some() {
            let mut next = self.store.clone();
            if let Some(o) = next.offers.iter_mut().find(|o| o.offer_id == offer_id) {
                o.key = None;
            }
            let cancelled: Vec<Uuid> = next.offers.iter().filter(|o| o.key.is_none()).map(|o| o.offer_id).collect();
            if cancelled.len() > MAX_CANCELLED_OFFERS {
                let drop: Vec<Uuid> = cancelled[..cancelled.len() - MAX_CANCELLED_OFFERS].to_vec();
                next.offers.retain(|o| !drop.contains(&o.offer_id));
            }
            self.commit(next)?;
            xvtpm_log::host_info!(offer = %offer_id, vtpm = %offer.vtpm, "transfer offer withdrawn");
        }
        let r = self.make_receipt(ReceiptKind::Cancelled, offer.vtpm, offer_id, None, 0, offer.group).map_err(AdminReply::Error)?;
        Ok(AdminReply::TransferReceipt(Box::new(r)))
    }

    fn outgoing(&self, uuid: &Uuid) -> Result<(TransferRecord, Outgoing), AdminReply> {
        self.store.vtpm(uuid).ok_or_else(|| not_found(uuid))?;
        let rec = self.transfer_record(uuid).cloned();
        match rec.as_ref().and_then(|r| r.outgoing.clone()) {
            Some(o) => Ok((rec.expect("has outgoing"), o)),
            None => Err(AdminReply::Error(Failure::transfer(ErrorCode::NotFound, Refusal::NotExported, format!("vTPM {uuid} is not being transferred")))),
        }
    }

    fn commit_transfer(&mut self, uuid: Uuid, receipt: Receipt) -> Result<AdminReply, AdminReply> {
        let (rec, o) = self.outgoing(&uuid)?;
        if o.state == OutgoingState::Retired {
            return Ok(AdminReply::Ok);
        }
        let ak = hex::decode(&o.dest_ak_public).map_err(|_| fail(ErrorCode::Internal, "stored AK is not hex"))?;
        receipt
            .verify(&ak, ReceiptKind::Imported, &uuid, &o.offer_id, Some((&o.export_id, o.generation)))
            .map_err(|e| fail_because(ErrorCode::Refused, "commit refused", &e))?;
        let mut next = self.store.clone();
        if let Some(t) = next.transfers.iter_mut().find(|t| t.uuid == uuid) {
            *t = TransferRecord {
                generation: o.generation,
                imported_key: None,
                outgoing: Some(Outgoing { state: OutgoingState::Retired, ..o.clone() }),
                ..rec
            };
        }
        self.commit(next)?;
        xvtpm_log::host_info!(vtpm = %uuid, dest = %o.dest_host, generation = o.generation, "vTPM transfer committed; this copy is retired");
        Ok(AdminReply::Ok)
    }

    /// Returns an exporting vTPM to service without the destination: the administrator declares
    /// the destination `lost` (its host id, which must be the export's). The transfer generation
    /// moves past the abandoned package's, so the next export of this vTPM is newer than it.
    fn force_abort(&mut self, uuid: Uuid, lost: &str) -> Result<AdminReply, AdminReply> {
        let (rec, o) = self.outgoing(&uuid)?;
        if o.state == OutgoingState::Retired {
            return Err(refused(format!("abort refused: the transfer of vTPM {uuid} was committed (the destination imported it)")));
        }
        if lost != o.dest_host {
            return Err(refused(format!(
                "forced abort refused: vTPM {uuid} is being exported to host {} (offer {}), not to host {lost}: name the destination that is lost",
                o.dest_host, o.offer_id
            )));
        }
        let mut next = self.store.clone();
        if let Some(t) = next.transfers.iter_mut().find(|t| t.uuid == uuid) {
            *t = TransferRecord { outgoing: None, generation: o.generation, ..rec };
        }
        self.commit(next)?;
        xvtpm_log::host_warn!(vtpm = %uuid, offer = %o.offer_id, dest = %o.dest_host, generation = o.generation, "vTPM transfer aborted by force (destination declared lost); the vTPM runs here again");
        Ok(AdminReply::Ok)
    }

    fn abort_transfer(&mut self, uuid: Uuid, receipt: Receipt) -> Result<AdminReply, AdminReply> {
        let (rec, o) = self.outgoing(&uuid)?;
        if o.state == OutgoingState::Retired {
            return Err(refused(format!("abort refused: the transfer of vTPM {uuid} was committed (the destination imported it)")));
        }
        let ak = hex::decode(&o.dest_ak_public).map_err(|_| fail(ErrorCode::Internal, "stored AK is not hex"))?;
        receipt
            .verify(&ak, ReceiptKind::Cancelled, &uuid, &o.offer_id, None)
            .map_err(|e| {
                AdminReply::Error(Failure::from_error_fix(
                    ErrorCode::Refused,
                    "abort refused",
                    &e,
                    &format!("only the destination's cancellation of this offer returns the vTPM to service: `xl-vtpm vtpm transfer cancel {} --out FILE` on the destination", o.offer_id),
                ))
            })?;
        let mut next = self.store.clone();
        if let Some(t) = next.transfers.iter_mut().find(|t| t.uuid == uuid) {
            *t = TransferRecord { outgoing: None, ..rec };
        }
        self.commit(next)?;
        xvtpm_log::host_warn!(vtpm = %uuid, offer = %o.offer_id, "vTPM transfer aborted on the destination's cancellation; the vTPM runs here again");
        Ok(AdminReply::Ok)
    }
}
