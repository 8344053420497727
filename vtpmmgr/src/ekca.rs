//! The groups' EK CAs: vTPM EK certificates issued by a key in the
//! physical TPM, certified by the group's AK.
//!
//! **One CA per group.** A group is the unit a tenant trusts: its AK signs the deep quotes of its
//! vTPMs. With a CA per group, a tenant (or Keylime's `tpm_cert_store`) that adds its group's CA
//! certificate accepts EK certificates of that group's vTPMs only, not those of every tenant on
//! the host; and the CA's hardware evidence is made by the very AK the tenant already pins for
//! deep quotes. A CA costs one key blob and one certificate in the manager's store.
//!
//! The CA key is an unrestricted ECDSA P-256 signing key under the SRK (an X.509 TBS digest is
//! not a TPM-generated structure, so a restricted key would refuse to sign it). Its authorisation
//! value is `HKDF-SHA256(master secret, salt "xvtpm/ek-ca-auth/v1", info group UUID)`, so only a
//! manager that unsealed the master secret signs with it. Its self-signed certificate is bound to
//! the key's hardware residency by `TPM2_Certify` of the key by the group AK with
//! `qualifyingData = SHA-256(CA certificate)` ([`vtpm_attest::ekcert::verify_ca_certify`]).
//!
//! Every certificate made here is parsed and verified in software before it leaves the manager.

use hkdf::Hkdf;
use sha2::{Digest as _, Sha256};
use uuid::Uuid;
use vtpm_attest::ekcert::{check_ca, check_ek_matches, verify_ca_certify, verify_ek_cert};
use vtpm_proto::ekcert::{self, CaPublic, Certificate, EkPublic};
use vtpm_proto::mgr::{CA_CERTIFY_VERSION, CaCertify, TpmInfo};
use vtpm_proto::mgr::{ErrorCode, Failure, GroupCaInfo};

use crate::failure::FromError as _;
use zeroize::Zeroizing;

use crate::hwtpm::{HwTpm, HwTpmError, MasterSecret};
use crate::store::{Group, GroupCa};

/// notBefore is backdated this much, so a verifier whose clock is a little behind the host's
/// does not see a fresh certificate as "not yet valid".
const BACKDATE_SECS: u64 = 3600;

/// The CA key's authorisation value for `group`.
pub fn ca_auth(master: &MasterSecret, group: &Uuid) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(Some(b"xvtpm/ek-ca-auth/v1"), &master[..]);
    let mut okm = Zeroizing::new([0u8; 32]);
    hk.expand(group.as_bytes(), okm.as_mut()).expect("32 bytes is a valid HKDF-SHA256 output length");
    okm
}

fn tpm_err(what: &str) -> impl FnOnce(HwTpmError) -> Failure + '_ {
    move |e| Failure::from_error(ErrorCode::Tpm, what, &e)
}

fn cert_err(what: &str) -> impl FnOnce(ekcert::CertError) -> Failure + '_ {
    move |e| Failure::from_error(ErrorCode::Internal, what, &e)
}

fn serial() -> [u8; 16] {
    let mut r = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut r);
    ekcert::serial_from_random(r)
}

/// Signs `tbs` with the CA key and returns the certificate (DER).
fn sign(hw: &mut HwTpm, ca_key: &crate::hwtpm::CaKeyRecord, auth: &[u8], tbs: &ekcert::Tbs) -> Result<Vec<u8>, Failure> {
    let (r, s) = hw.ca_sign(ca_key, auth, &tbs.digest()).map_err(tpm_err("signing with the EK CA key"))?;
    let sig = ekcert::ecdsa_sig_der(&r, &s).map_err(cert_err("the TPM's signature"))?;
    ekcert::assemble(tbs, &sig).map_err(cert_err("encoding the certificate"))
}

/// Creates `group`'s EK CA: the key in the TPM, the self-signed certificate, the AK's
/// certification of the key. Checks all three before returning.
pub fn make_ca(hw: &mut HwTpm, master: &MasterSecret, group: &Group, now: u64) -> Result<GroupCa, Failure> {
    let auth = ca_auth(master, &group.uuid);
    let key = hw.create_ca_key(&auth[..]).map_err(tpm_err("creating the EK CA key"))?;
    let spki = CaPublic::parse(&key.public).and_then(|p| p.spki_der()).map_err(cert_err("the EK CA key"))?;
    let name = ekcert::ca_name(&group.name, &group.uuid).map_err(cert_err("the CA name"))?;
    let not_before = now.saturating_sub(BACKDATE_SECS);
    let tbs = ekcert::ca_tbs(&serial(), &name, not_before, &spki).map_err(cert_err("encoding the CA certificate"))?;
    let cert = sign(hw, &key, &auth[..], &tbs)?;
    let parsed = Certificate::parse(&cert).map_err(cert_err("the new CA certificate"))?;
    check_ca(&parsed, now).map_err(cert_err("the new CA certificate"))?;
    let (attest, signature) = hw
        .certify_ca(&key, &auth[..], &group.ak, &Sha256::digest(&cert))
        .map_err(tpm_err("certifying the EK CA key with the group AK"))?;
    let ca = GroupCa { key, cert, certify_attest: attest, certify_signature: signature };
    verify_ca_certify(&ca.cert, &certify(group, &ca), &group.ak.public)
        .map_err(cert_err("the new CA certification"))?;
    Ok(ca)
}

/// The certification evidence of `group`'s CA, as a verifier reads it.
pub fn certify(group: &Group, ca: &GroupCa) -> CaCertify {
    CaCertify {
        version: CA_CERTIFY_VERSION,
        group: group.uuid,
        ak_public: hex::encode(&group.ak.public),
        ca_public: hex::encode(&ca.key.public),
        attest: hex::encode(&ca.certify_attest),
        signature: hex::encode(&ca.certify_signature),
    }
}

/// What `xl-vtpm mgr group ca-cert` shows.
pub fn info(group: &Group, ca: &GroupCa) -> GroupCaInfo {
    GroupCaInfo { group: group.uuid, name: group.name.clone(), cert: hex::encode(&ca.cert), certify: certify(group, ca) }
}

/// Issues an EK certificate for `ek` by `group`'s CA. Returns the certificate (DER) and its
/// serial (hex).
pub fn issue(
    hw: &mut HwTpm,
    master: &MasterSecret,
    group: &Group,
    ca: &GroupCa,
    ek: &EkPublic,
    tpm: &TpmInfo,
    now: u64,
) -> Result<(Vec<u8>, String), Failure> {
    let ca_cert = Certificate::parse(&ca.cert).map_err(cert_err("the group's CA certificate"))?;
    let serial = serial();
    let tbs = ekcert::ek_tbs(&serial, &ca_cert, now.saturating_sub(BACKDATE_SECS), ek, tpm)
        .map_err(|e| Failure::from_error(ErrorCode::BadRequest, "encoding the EK certificate", &e))?;
    let auth = ca_auth(master, &group.uuid);
    let cert = sign(hw, &ca.key, &auth[..], &tbs)?;
    let parsed = Certificate::parse(&cert).map_err(cert_err("the new EK certificate"))?;
    verify_ek_cert(&parsed, &ca_cert, now).map_err(cert_err("the new EK certificate"))?;
    check_ek_matches(&parsed, ek.tpmt()).map_err(cert_err("the new EK certificate"))?;
    Ok((cert, hex::encode(serial)))
}
