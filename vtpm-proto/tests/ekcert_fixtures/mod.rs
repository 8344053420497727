//! Test fixtures shared by the EK-certificate unit tests of `vtpm_proto::ekcert` (the format)
//! and `vtpm_attest::ekcert` (the checks): a software P-256 CA key, its self-signed CA
//! certificate, and TCG-template EK public areas (P-256 and RSA-2048) without a TPM.
#![allow(dead_code)]

use p256::ecdsa::SigningKey;
use p256::ecdsa::signature::hazmat::PrehashSigner as _;
use uuid::Uuid;
use vtpm_proto::ekcert::{Certificate, EkType, Tbs, assemble, ca_name, ca_tbs, serial_from_random, template_head};
use vtpm_proto::mgr::TpmInfo;

/// The time the fixtures' certificates are made at.
pub const NOW: u64 = 1_790_000_000;

pub fn ca_key() -> SigningKey {
    SigningKey::from_slice(&[7u8; 32]).unwrap()
}

pub fn sign(k: &SigningKey, tbs: &Tbs) -> Vec<u8> {
    let sig: p256::ecdsa::Signature = k.sign_prehash(&tbs.digest()).unwrap();
    sig.to_der().as_bytes().to_vec()
}

pub fn ca_spki(k: &SigningKey) -> Vec<u8> {
    use p256::pkcs8::EncodePublicKey as _;
    k.verifying_key().to_public_key_der().unwrap().as_bytes().to_vec()
}

/// A self-signed EK CA certificate (group `default`) under `k`.
pub fn make_ca(k: &SigningKey) -> Certificate {
    let name = ca_name("default", &Uuid::from_u128(1)).unwrap();
    let tbs = ca_tbs(&serial_from_random([9; 16]), &name, NOW, &ca_spki(k)).unwrap();
    Certificate::parse(&assemble(&tbs, &sign(k, &tbs)).unwrap()).unwrap()
}

/// A TPM2B_PUBLIC of the TCG default P-256 EK template.
pub fn ecc_ek() -> Vec<u8> {
    let sk = SigningKey::from_slice(&[3u8; 32]).unwrap();
    let pt = sk.verifying_key().to_encoded_point(false);
    let mut t = template_head(EkType::EccP256);
    t.extend_from_slice(&32u16.to_be_bytes());
    t.extend_from_slice(pt.x().unwrap());
    t.extend_from_slice(&32u16.to_be_bytes());
    t.extend_from_slice(pt.y().unwrap());
    let mut b = (t.len() as u16).to_be_bytes().to_vec();
    b.extend_from_slice(&t);
    b
}

/// A TPMT_PUBLIC of the TCG default RSA-2048 EK template.
pub fn rsa_ek() -> Vec<u8> {
    let mut t = template_head(EkType::Rsa2048);
    t.extend_from_slice(&256u16.to_be_bytes());
    // A modulus only has to be odd and 2048 bits for the public-key encoders.
    let mut n = vec![0xC5u8; 256];
    n[255] = 0x01;
    t.extend_from_slice(&n);
    t
}

pub fn info() -> TpmInfo {
    TpmInfo { manufacturer: 0x4942_4D00, model: "SW   TPM".into(), firmware_version: 0x2019_1023, family: "2.0".into(), level: 0, revision: 164 }
}
