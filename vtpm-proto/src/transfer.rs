//! Moving a vTPM identity from one manager to another (docs/migration.md): the messages the
//! admin CLI carries between two managers' admin sockets, and the checks on them.
//!
//! ```text
//! source manager (A)                 xl-vtpm                  destination manager (B)
//!                                      │◀── enrollment material (EK certificate, group AK) ──
//! TransferChallenge ◀── material ──────│
//!   EK chain → roots, AK attributes; MakeCredential(EK, AK name, S)
//!   ──────────── Challenge ───────────▶│── Challenge ─────▶ TransferOffer
//!                                      │                    ActivateCredential → S; new transfer key
//!                                      │                    (RSA-2048 OAEP, fixedTPM, under the SRK);
//!                                      │                    Certify(key, AK), Quote(AK, policy PCRs),
//!                                      │◀── Offer ──────── both over the offer binding; proof HMAC(S, binding)
//! TransferExport ◀── Offer ───────────│
//!   every check again; vTPM marked "exporting" (durable) → Package sealed to the transfer key
//!   ─────────────── Package ──────────▶│── Package ───────▶ TransferImport: the TPM decrypts;
//!                                      │                    identity stored; offer consumed
//! TransferCommit ◀── Receipt ─────────│◀── Receipt ─────── (AK quote over the receipt statement)
//!   the source copy is retired
//! ```
//!
//! Everything here is pure: no I/O, no TPM. Every parser is bounded.

use std::collections::BTreeMap;

use aes_gcm::aead::{Aead, KeyInit, Payload as AeadPayload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::evidence::{EvidenceError, Reader, TPM_ALG_SHA256};
use crate::secret::SecretBytes;
use crate::tpms::{AkPublic, QuoteAttest, TpmSignature, TPM_GENERATED_VALUE};

/// Version of every message in this module.
pub const TRANSFER_VERSION: u32 = 1;
/// The admin-socket transfer protocol: 2 = the destination manager writes the imported vTPM's
/// state file itself before it answers the import (1, unnumbered, left it to the CLI). A
/// manager refuses an import from an older CLI, and the CLI refuses to use an older manager.
pub const IMPORT_PROTOCOL: u32 = 2;
/// The OAEP label of the package key (with its terminating zero, as the TPM uses it).
pub const OAEP_LABEL: &str = "XVTPM-TRANSFER\0";
/// How long a challenge may be used for an export, seconds.
pub const CHALLENGE_LIFETIME: u64 = 600;
/// Largest sealed state a package carries (the manager frame is 1 MiB and carries it as hex).
pub const MAX_STATE: usize = 256 * 1024;
/// Largest certificate (DER) accepted in a transfer message.
pub const MAX_CERT: usize = 4096;
/// Most intermediates an offer may carry.
pub const MAX_INTERMEDIATES: usize = 4;
pub use tpm_wire::TPM2_ST_ATTEST_CERTIFY as TPM_ST_ATTEST_CERTIFY;
use tpm_wire::{TPM2_ALG_NULL as TPM_ALG_NULL, TPM2_ALG_OAEP as TPM_ALG_OAEP, TPM2_ALG_RSA as TPM_ALG_RSA};

/// Why a transfer message was refused. Each variant names the check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    /// A field does not parse or is out of bounds.
    #[error("malformed {what}: {why}")]
    Malformed {
        /// Which field.
        what: &'static str,
        /// Why.
        why: String,
    },
    /// The transfer key's public area is not a TPM-resident decryption key.
    #[error("transfer key: {0}")]
    TransferKey(String),
    /// The AK's `TPM2_Certify` of the transfer key does not verify.
    #[error("transfer key certification by the destination's AK: {0}")]
    Certify(String),
    /// The destination's quote does not verify.
    #[error("destination quote: {0}")]
    Quote(String),
    /// The destination's PCRs do not satisfy the policy.
    #[error("destination host PCRs: {0}")]
    Policy(String),
    /// The activation proof is wrong: the AK is not in the TPM of the certified EK.
    #[error("credential activation: the destination did not prove that its AK lives in the TPM of its EK certificate (the activation proof does not match)")]
    Activation,
    /// The package does not open (tampered, or sealed to another key).
    #[error("package: {0}")]
    Package(String),
    /// A receipt does not verify.
    #[error("receipt: {0}")]
    Receipt(String),
}

fn malformed(what: &'static str, why: impl Into<String>) -> TransferError {
    TransferError::Malformed { what, why: why.into() }
}

/// Hex field → bytes, at most `max` bytes.
pub fn unhex(s: &str, what: &'static str, max: usize) -> Result<Vec<u8>, TransferError> {
    if s.len() > 2 * max {
        return Err(malformed(what, format!("{} hex digits (at most {})", s.len(), 2 * max)));
    }
    hex::decode(s).map_err(|_| malformed(what, "not hex"))
}

/// What the source sends the destination: a credential for the destination's AK (made for the
/// EK of its certificate) and the PCRs it must quote. `challenge_id` is also the quote's nonce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// [`TRANSFER_VERSION`].
    pub version: u32,
    /// The vTPM to be moved.
    pub vtpm: Uuid,
    /// 8-byte big-endian issue time (seconds) ‖ 24 random bytes, hex.
    pub challenge_id: String,
    /// Host PCRs (SHA-256 bank) the destination must quote.
    pub pcrs: Vec<u8>,
    /// `TPM2B_ID_OBJECT` contents, hex.
    pub credential_blob: String,
    /// `TPM2B_ENCRYPTED_SECRET` contents, hex.
    pub encrypted_secret: String,
}

/// The destination's answer to a challenge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// [`TRANSFER_VERSION`].
    pub version: u32,
    /// This offer (one import at most).
    pub offer_id: Uuid,
    /// The challenge it answers.
    pub challenge_id: String,
    /// The vTPM it is for.
    pub vtpm: Uuid,
    /// SHA-256 of the destination TPM's EK certificate, hex.
    pub host_id: String,
    /// The destination TPM's RSA-2048 EK certificate (DER), hex.
    pub ek_cert: String,
    /// Intermediates toward the vendor root (DER), hex.
    #[serde(default)]
    pub ek_intermediates: Vec<String>,
    /// The destination group the vTPM joins.
    pub group: Uuid,
    /// Its name.
    pub group_name: String,
    /// The group AK's `TPMT_PUBLIC`, hex.
    pub ak_public: String,
    /// The transfer key's `TPMT_PUBLIC`, hex.
    pub key_public: String,
    /// `TPMS_ATTEST` of the AK's `TPM2_Certify` of the transfer key, hex.
    pub certify_attest: String,
    /// Its `TPMT_SIGNATURE`, hex.
    pub certify_signature: String,
    /// `TPMS_ATTEST` of the AK's quote of `pcrs`, hex.
    pub quote_attest: String,
    /// Its `TPMT_SIGNATURE`, hex.
    pub quote_signature: String,
    /// Quoted PCRs (SHA-256 bank), ascending.
    pub pcrs: Vec<u8>,
    /// Their values, hex, in `pcrs` order.
    pub pcr_values: Vec<String>,
    /// `HMAC-SHA-256(activated secret, binding)`, hex.
    pub activation_proof: String,
}

/// What the certify and the quote of an offer sign (their `qualifyingData`) and what the
/// activation proof covers: `SHA-256("xvtpm/transfer-offer/v1\0" ‖ challenge_id ‖ offer_id ‖
/// vtpm ‖ group ‖ AK name ‖ transfer key name)`.
pub fn offer_binding(challenge_id: &[u8], offer_id: &Uuid, vtpm: &Uuid, group: &Uuid, ak_name: &[u8], key_name: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"xvtpm/transfer-offer/v1\0");
    for part in [challenge_id, offer_id.as_bytes(), vtpm.as_bytes(), group.as_bytes(), ak_name, key_name] {
        h.update((part.len() as u32).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// `HMAC-SHA-256(secret, binding)`.
pub fn activation_proof(secret: &[u8], binding: &[u8; 32]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(b"xvtpm/transfer-activation/v1\0");
    m.update(binding);
    m.finalize().into_bytes().into()
}

/// Checks an activation proof in constant time.
pub fn check_activation_proof(secret: &[u8], binding: &[u8; 32], proof_hex: &str) -> Result<(), TransferError> {
    let proof = unhex(proof_hex, "activation_proof", 32)?;
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(b"xvtpm/transfer-activation/v1\0");
    m.update(binding);
    m.verify_slice(&proof).map_err(|_| TransferError::Activation)
}

/// Checks the transfer key's `TPMT_PUBLIC`: an RSA-2048 (exponent 65537) decryption key with
/// the OAEP/SHA-256 scheme, made in the TPM and never leaving it (fixedTPM, fixedParent,
/// sensitiveDataOrigin), neither restricted nor a signing key, nameAlg SHA-256. Returns the key.
pub fn check_transfer_key(tpmt: &[u8]) -> Result<rsa::RsaPublicKey, TransferError> {
    let k = |e: EvidenceError| TransferError::TransferKey(e.to_string());
    let mut r = Reader::new(tpmt);
    let ty = r.u16("type").map_err(k)?;
    if ty != TPM_ALG_RSA {
        return Err(TransferError::TransferKey(format!("type {ty:#06x} is not RSA")));
    }
    let name_alg = r.u16("nameAlg").map_err(k)?;
    if name_alg != TPM_ALG_SHA256 {
        return Err(TransferError::TransferKey(format!("nameAlg {name_alg:#06x} is not SHA-256")));
    }
    let a = r.u32("objectAttributes").map_err(k)?;
    let need = [(1u32 << 1, "fixedTPM"), (1 << 4, "fixedParent"), (1 << 5, "sensitiveDataOrigin"), (1 << 17, "decrypt")];
    let missing: Vec<&str> = need.iter().filter(|(b, _)| a & b == 0).map(|(_, n)| *n).collect();
    if !missing.is_empty() {
        return Err(TransferError::TransferKey(format!("{} not set (objectAttributes {a:#010x})", missing.join(", "))));
    }
    for (b, n) in [(1u32 << 16, "restricted"), (1 << 18, "sign")] {
        if a & b != 0 {
            return Err(TransferError::TransferKey(format!("{n} is set (objectAttributes {a:#010x})")));
        }
    }
    r.sized16("authPolicy", 64).map_err(k)?;
    let sym = r.u16("symmetric").map_err(k)?;
    if sym != TPM_ALG_NULL {
        return Err(TransferError::TransferKey(format!("symmetric {sym:#06x} (an unrestricted key has none)")));
    }
    let scheme = r.u16("scheme").map_err(k)?;
    if scheme != TPM_ALG_OAEP {
        return Err(TransferError::TransferKey(format!("scheme {scheme:#06x} is not OAEP")));
    }
    let hash = r.u16("scheme hash").map_err(k)?;
    if hash != TPM_ALG_SHA256 {
        return Err(TransferError::TransferKey(format!("OAEP hash {hash:#06x} is not SHA-256")));
    }
    let bits = r.u16("keyBits").map_err(k)?;
    let exponent = r.u32("exponent").map_err(k)?;
    let modulus = r.sized16("unique", 512).map_err(k)?.to_vec();
    r.finish("TPMT_PUBLIC").map_err(k)?;
    if bits != 2048 || modulus.len() != 256 || !(exponent == 0 || exponent == 65537) {
        return Err(TransferError::TransferKey(format!("RSA-{bits} with exponent {exponent} (RSA-2048, 65537 required)")));
    }
    rsa::RsaPublicKey::new(rsa::BigUint::from_bytes_be(&modulus), rsa::BigUint::from(65537u32))
        .map_err(|e| TransferError::TransferKey(format!("RSA key rejected: {e}")))
}

fn signed_by(ak: &AkPublic, attest: &[u8], sig_hex: &str) -> Result<(), String> {
    let sig = TpmSignature::parse(&unhex(sig_hex, "signature", 1024).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    ak.verify_signature(attest, &sig).map_err(|e| format!("AK signature: {e}"))
}

/// Verifies the AK's `TPM2_Certify` of the object named `name` with `qualifyingData = extra`.
pub fn verify_certify(ak: &AkPublic, attest_hex: &str, sig_hex: &str, extra: &[u8], name: &[u8]) -> Result<(), TransferError> {
    let c = TransferError::Certify;
    let attest = unhex(attest_hex, "certify_attest", 1024)?;
    signed_by(ak, &attest, sig_hex).map_err(c)?;
    let m = |e: EvidenceError| TransferError::Certify(format!("TPMS_ATTEST: {e}"));
    let mut r = Reader::new(&attest);
    if r.u32("magic").map_err(m)? != TPM_GENERATED_VALUE {
        return Err(c("TPMS_ATTEST is not TPM-generated".into()));
    }
    let ty = r.u16("type").map_err(m)?;
    if ty != TPM_ST_ATTEST_CERTIFY {
        return Err(c(format!("TPMS_ATTEST type {ty:#06x} is not TPM_ST_ATTEST_CERTIFY")));
    }
    r.sized16("qualifiedSigner", 68).map_err(m)?;
    let got_extra = r.sized16("extraData", 64).map_err(m)?.to_vec();
    r.bytes(17, "clockInfo").map_err(m)?;
    r.u64("firmwareVersion").map_err(m)?;
    let certified = r.sized16("certifyInfo.name", 68).map_err(m)?.to_vec();
    r.sized16("certifyInfo.qualifiedName", 68).map_err(m)?;
    r.finish("TPMS_ATTEST").map_err(m)?;
    if got_extra != extra {
        return Err(c("extraData is not this offer's binding (a certification made for another offer)".into()));
    }
    if certified != name {
        return Err(c("the certified object is not the transfer key of the offer".into()));
    }
    Ok(())
}

/// Verifies an AK quote with `qualifyingData = extra` over exactly the SHA-256 PCRs `pcrs`
/// whose values are `values`.
pub fn verify_quote(ak: &AkPublic, attest_hex: &str, sig_hex: &str, extra: &[u8], pcrs: &[u8], values: &[Vec<u8>]) -> Result<(), TransferError> {
    let q = TransferError::Quote;
    let attest = unhex(attest_hex, "quote_attest", 1024)?;
    signed_by(ak, &attest, sig_hex).map_err(q)?;
    let parsed = QuoteAttest::parse(&attest).map_err(|e| q(e.to_string()))?;
    if parsed.extra_data != extra {
        return Err(q("the quote's nonce is not this transfer's (a replayed or foreign quote)".into()));
    }
    let quoted: Vec<u32> = match parsed.pcr_select.as_slice() {
        [bank] if bank.hash_alg == TPM_ALG_SHA256 => bank.indices().collect(),
        _ => return Err(q("the quote does not select exactly the SHA-256 bank".into())),
    };
    if quoted != pcrs.iter().map(|p| u32::from(*p)).collect::<Vec<_>>() || values.len() != pcrs.len() {
        return Err(q(format!("the quote covers PCRs {quoted:?}, the offer lists {pcrs:?}")));
    }
    let mut h = Sha256::new();
    for v in values {
        h.update(v);
    }
    if parsed.pcr_digest[..] != h.finalize()[..] {
        return Err(q("the PCR values do not match the quoted digest".into()));
    }
    Ok(())
}

/// Checks quoted values against a policy `{pcr: hex value}` (SHA-256 bank); the policy must not
/// be empty.
pub fn check_policy(pcrs: &[u8], values: &[Vec<u8>], policy: &BTreeMap<u8, String>) -> Result<(), TransferError> {
    if policy.is_empty() {
        return Err(TransferError::Policy("the policy names no PCR (give --host-pcrs-policy FILE with the values the destination must have)".into()));
    }
    for (pcr, want) in policy {
        let want = unhex(want, "policy value", 64)?;
        let Some(i) = pcrs.iter().position(|p| p == pcr) else {
            return Err(TransferError::Policy(format!("host PCR {pcr} was not quoted")));
        };
        if values.get(i) != Some(&want) {
            return Err(TransferError::Policy(format!(
                "host PCR {pcr} is {}, the policy requires {}",
                values.get(i).map(hex::encode).unwrap_or_default(),
                hex::encode(&want)
            )));
        }
    }
    Ok(())
}

/// The sealed package: the vTPM's identity, encrypted for the destination's transfer key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    /// [`TRANSFER_VERSION`].
    pub version: u32,
    /// The vTPM.
    pub vtpm: Uuid,
    /// The offer (and so the transfer key) it is sealed to.
    pub offer_id: Uuid,
    /// This export (the source records it; the receipt names it).
    pub export_id: Uuid,
    /// The identity's transfer generation: one more than at the source. A destination refuses a
    /// package not newer than the generation it last saw the vTPM leave at.
    pub generation: u64,
    /// SHA-256 of the source TPM's EK certificate, hex.
    pub source_host: String,
    /// SHA-256 of the destination TPM's EK certificate, hex.
    pub dest_host: String,
    /// RSA-OAEP(SHA-256, label [`OAEP_LABEL`]) of the 32-byte package key, hex.
    pub encrypted_key: String,
    /// AES-256-GCM nonce, hex.
    pub nonce: String,
    /// AES-256-GCM of the JSON [`Payload`] (tag appended), hex; the AAD is [`Package::aad`].
    pub ciphertext: String,
}

/// What a package carries, inside its encryption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    /// The vTPM (repeated inside the encryption).
    pub vtpm: Uuid,
    /// The vTPM's state key.
    pub state_key: SecretBytes,
    /// The vTPM's sealed state file (`XVTS`, under `state_key`), hex.
    pub state: String,
    /// The state generation the source anchored.
    pub anchor_generation: u64,
    /// Its anchor digest, hex.
    pub anchor_digest: String,
    /// SHA-256 of the EK the source certified for this identity, hex (if any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ek_sha256: Option<String>,
    /// Serial of that certificate, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ek_serial: Option<String>,
}

impl Package {
    /// The associated data: `"xvtpm/transfer-package/v1\0" ‖ version ‖ vtpm ‖ offer ‖ export ‖
    /// generation ‖ source host ‖ destination host` (hosts length-prefixed).
    pub fn aad(&self) -> Vec<u8> {
        let mut a = b"xvtpm/transfer-package/v1\0".to_vec();
        a.extend_from_slice(&self.version.to_be_bytes());
        a.extend_from_slice(self.vtpm.as_bytes());
        a.extend_from_slice(self.offer_id.as_bytes());
        a.extend_from_slice(self.export_id.as_bytes());
        a.extend_from_slice(&self.generation.to_be_bytes());
        for h in [&self.source_host, &self.dest_host] {
            a.extend_from_slice(&(h.len() as u32).to_be_bytes());
            a.extend_from_slice(h.as_bytes());
        }
        a
    }

    /// Seals `payload` for `key` (a checked transfer key) under a fresh package key.
    pub fn seal(mut self, key: &rsa::RsaPublicKey, payload: &Payload) -> Result<Package, TransferError> {
        use rand::RngCore as _;
        let mut rng = rand::rngs::OsRng;
        let mut pk = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(pk.as_mut());
        let mut nonce = [0u8; 12];
        rng.fill_bytes(&mut nonce);
        let enc = key
            .encrypt(&mut rng, rsa::Oaep::new_with_label::<Sha256, _>(OAEP_LABEL), pk.as_ref())
            .map_err(|e| TransferError::Package(format!("RSA-OAEP: {e}")))?;
        self.encrypted_key = hex::encode(enc);
        self.nonce = hex::encode(nonce);
        let plain = Zeroizing::new(serde_json::to_vec(payload).map_err(|e| TransferError::Package(e.to_string()))?);
        let aad = self.aad();
        let ct = Aes256Gcm::new(&Key::<Aes256Gcm>::from(*pk))
            .encrypt(&Nonce::from(nonce), AeadPayload { msg: &plain, aad: &aad })
            .map_err(|_| TransferError::Package("AES-GCM failed".into()))?;
        self.ciphertext = hex::encode(ct);
        Ok(self)
    }

    /// The RSA ciphertext of the package key (for the destination's TPM).
    pub fn encrypted_key(&self) -> Result<Vec<u8>, TransferError> {
        unhex(&self.encrypted_key, "encrypted_key", 512)
    }

    /// Opens the payload with the package key the TPM decrypted.
    pub fn open(&self, package_key: &[u8]) -> Result<Payload, TransferError> {
        let key: [u8; 32] = package_key.try_into().map_err(|_| TransferError::Package(format!("package key of {} bytes", package_key.len())))?;
        let nonce: [u8; 12] = unhex(&self.nonce, "nonce", 12)?.try_into().map_err(|_| malformed("nonce", "not 12 bytes"))?;
        let ct = unhex(&self.ciphertext, "ciphertext", 2 * MAX_STATE + 4096)?;
        let plain = Zeroizing::new(
            Aes256Gcm::new(&Key::<Aes256Gcm>::from(key))
                .decrypt(&Nonce::from(nonce), AeadPayload { msg: &ct, aad: &self.aad() })
                .map_err(|_| TransferError::Package("it does not authenticate under the key the destination's TPM decrypted (edited, or sealed for another offer)".into()))?,
        );
        let p: Payload = serde_json::from_slice(&plain).map_err(|e| TransferError::Package(format!("payload: {e}")))?;
        if p.vtpm != self.vtpm {
            return Err(TransferError::Package("the payload is for another vTPM".into()));
        }
        if p.state_key.0.len() != 32 {
            return Err(TransferError::Package("the state key is not 32 bytes".into()));
        }
        Ok(p)
    }
}

/// What a receipt says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReceiptKind {
    /// The destination imported the package durably: the source may retire its copy.
    Imported,
    /// The destination withdrew the offer without importing: the package can never be
    /// imported, and the source may return the vTPM to service.
    Cancelled,
}

/// A statement by the destination, signed by its group AK (as the qualifying data of a quote:
/// a restricted AK signs only TPM-made structures).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// [`TRANSFER_VERSION`].
    pub version: u32,
    /// What happened.
    pub kind: ReceiptKind,
    /// The vTPM.
    pub vtpm: Uuid,
    /// The offer.
    pub offer_id: Uuid,
    /// The export (imported receipts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_id: Option<Uuid>,
    /// The transfer generation imported (0 for a cancellation).
    pub generation: u64,
    /// `TPMS_ATTEST` of the quote, hex.
    pub attest: String,
    /// Its signature, hex.
    pub signature: String,
}

/// The qualifying data of a receipt's quote.
pub fn receipt_statement(kind: ReceiptKind, vtpm: &Uuid, offer_id: &Uuid, export_id: Option<&Uuid>, generation: u64) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"xvtpm/transfer-receipt/v1\0");
    h.update([match kind {
        ReceiptKind::Imported => 1,
        ReceiptKind::Cancelled => 2,
    }]);
    h.update(vtpm.as_bytes());
    h.update(offer_id.as_bytes());
    h.update(export_id.map(|e| *e.as_bytes()).unwrap_or([0; 16]));
    h.update(generation.to_be_bytes());
    h.finalize().into()
}

impl Receipt {
    /// Verifies the receipt with the destination AK `ak_public` (`TPMT_PUBLIC`) for `kind`, `vtpm`
    /// and `offer_id` (and `export_id`/`generation` for an import).
    pub fn verify(&self, ak_public: &[u8], kind: ReceiptKind, vtpm: &Uuid, offer_id: &Uuid, export: Option<(&Uuid, u64)>) -> Result<(), TransferError> {
        let r = TransferError::Receipt;
        if self.version != TRANSFER_VERSION {
            return Err(r(format!("version {} (this manager reads {TRANSFER_VERSION})", self.version)));
        }
        if self.kind != kind {
            return Err(r(format!("it says {:?}, {kind:?} is needed", self.kind)));
        }
        if self.vtpm != *vtpm || self.offer_id != *offer_id {
            return Err(r(format!("it is for vTPM {} and offer {}, not vTPM {vtpm} and offer {offer_id}", self.vtpm, self.offer_id)));
        }
        let (export_id, generation) = match export {
            Some((e, g)) => (Some(e), g),
            None => (None, 0),
        };
        if self.export_id.as_ref() != export_id || self.generation != generation {
            return Err(r("it names another export of this vTPM".into()));
        }
        let ak = AkPublic::parse(ak_public).map_err(|e| r(format!("destination AK: {e}")))?;
        let attest = unhex(&self.attest, "attest", 1024)?;
        signed_by(&ak, &attest, &self.signature).map_err(|e| r(format!("not signed by the destination's AK ({e})")))?;
        let q = QuoteAttest::parse(&attest).map_err(|e| r(e.to_string()))?;
        if q.extra_data != receipt_statement(kind, vtpm, offer_id, export_id, generation) {
            return Err(r("the signed statement is not this receipt's".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_tpmt(attrs: u32, scheme: u16) -> (rsa::RsaPrivateKey, Vec<u8>) {
        use rsa::traits::PublicKeyParts as _;
        let sk = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
        let mut t = vec![0x00, 0x01, 0x00, 0x0b];
        t.extend_from_slice(&attrs.to_be_bytes());
        t.extend_from_slice(&[0, 0, 0x00, 0x10]);
        t.extend_from_slice(&scheme.to_be_bytes());
        t.extend_from_slice(&[0x00, 0x0b, 0x08, 0x00, 0, 0, 0, 0, 0x01, 0x00]);
        t.extend_from_slice(&sk.n().to_bytes_be());
        (sk, t)
    }

    #[test]
    fn transfer_key_attributes_are_checked_and_a_package_round_trips() {
        // fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | noDA | decrypt
        let good = 0x0002_0472;
        let (sk, t) = key_tpmt(good, TPM_ALG_OAEP);
        let pk = check_transfer_key(&t).unwrap();
        let e = check_transfer_key(&key_tpmt(good & !2, TPM_ALG_OAEP).1).unwrap_err();
        assert!(e.to_string().contains("fixedTPM not set"), "{e}");
        let e = check_transfer_key(&key_tpmt(good | (1 << 18), TPM_ALG_OAEP).1).unwrap_err();
        assert!(e.to_string().contains("sign is set"), "{e}");
        assert!(check_transfer_key(&key_tpmt(good, TPM_ALG_NULL).1).is_err());

        let payload = Payload {
            vtpm: Uuid::from_u128(5),
            state_key: SecretBytes(Zeroizing::new(vec![7; 32])),
            state: "00".into(),
            anchor_generation: 3,
            anchor_digest: "ab".into(),
            ek_sha256: None,
            ek_serial: None,
        };
        let header = Package {
            version: TRANSFER_VERSION,
            vtpm: payload.vtpm,
            offer_id: Uuid::from_u128(1),
            export_id: Uuid::from_u128(2),
            generation: 1,
            source_host: "aa".into(),
            dest_host: "bb".into(),
            encrypted_key: String::new(),
            nonce: String::new(),
            ciphertext: String::new(),
        };
        let pkg = header.seal(&pk, &payload).unwrap();
        let key = sk.decrypt(rsa::Oaep::new_with_label::<Sha256, _>(OAEP_LABEL), &pkg.encrypted_key().unwrap()).unwrap();
        assert_eq!(pkg.open(&key).unwrap(), payload);
        // Every header field is bound.
        let mut older = pkg.clone();
        older.generation = 0;
        assert!(matches!(older.open(&key), Err(TransferError::Package(_))));
        let mut other = pkg.clone();
        other.dest_host = "cc".into();
        assert!(other.open(&key).is_err());
        let mut flipped = pkg;
        flipped.ciphertext.replace_range(0..2, if flipped.ciphertext.starts_with("00") { "01" } else { "00" });
        assert!(flipped.open(&key).is_err());
    }

    #[test]
    fn policy_names_the_pcr() {
        let v = vec![vec![1u8; 32], vec![2u8; 32]];
        let mut p = BTreeMap::new();
        p.insert(1u8, hex::encode([2u8; 32]));
        check_policy(&[0, 1], &v, &p).unwrap();
        p.insert(0, hex::encode([9u8; 32]));
        assert!(check_policy(&[0, 1], &v, &p).unwrap_err().to_string().contains("host PCR 0 is"));
        p.insert(7, hex::encode([9u8; 32]));
        p.remove(&0);
        assert!(check_policy(&[0, 1], &v, &p).unwrap_err().to_string().contains("host PCR 7 was not quoted"));
        assert!(check_policy(&[0], &v[..1], &BTreeMap::new()).is_err());
    }
}
