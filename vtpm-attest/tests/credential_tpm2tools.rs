//! Cross-check of the software TPM2_MakeCredential (`vtpm_attest::credential`) against
//! tpm2-tools' own software implementation (`tpm2_makecredential --tcti none`).
//!
//! The seed is random and OAEP-encrypted, so the two outputs never match byte for byte. The test
//! therefore gives tpm2-tools an RSA key whose private half it holds: it decrypts tpm2-tools'
//! encrypted seed (OAEP-SHA-256, label "IDENTITY\0"), recomputes the credential blob from that
//! seed with [`credential_blob_from_seed`] and requires the very bytes tpm2-tools wrote. It also
//! checks that the seed our `make_credential` encrypts decrypts under the same label and yields
//! our blob. (That a real TPM activates our credentials is tested end to end in
//! `tests/tests/enrollment.rs`, against swtpm.)

use std::process::Command;

use rsa::pkcs8::EncodePublicKey as _;
use sha2::Sha256;
use vtpm_attest::credential::{credential_blob_from_seed, make_credential};

fn tpm2_makecredential(
    dir: &std::path::Path,
    pem: &str,
    name: &[u8],
    secret: &[u8],
) -> (Vec<u8>, Vec<u8>) {
    std::fs::write(dir.join("ek.pem"), pem).unwrap();
    std::fs::write(dir.join("secret.bin"), secret).unwrap();
    let out = Command::new("tpm2_makecredential")
        .args(["--tcti", "none", "-G", "rsa", "-u"])
        .arg(dir.join("ek.pem"))
        .arg("-s")
        .arg(dir.join("secret.bin"))
        .arg("-n")
        .arg(hex::encode(name))
        .arg("-o")
        .arg(dir.join("cred.out"))
        .output()
        .expect("run tpm2_makecredential (tpm2-tools 5.x)");
    assert!(
        out.status.success(),
        "tpm2_makecredential: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f = std::fs::read(dir.join("cred.out")).unwrap();
    // magic 0xBADCC0DE, version 1, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET.
    assert_eq!(&f[..8], &[0xba, 0xdc, 0xc0, 0xde, 0, 0, 0, 1]);
    let n = u16::from_be_bytes([f[8], f[9]]) as usize;
    let blob = f[10..10 + n].to_vec();
    let m = u16::from_be_bytes([f[10 + n], f[11 + n]]) as usize;
    let enc = f[12 + n..12 + n + m].to_vec();
    assert_eq!(f.len(), 12 + n + m);
    (blob, enc)
}

#[test]
fn blob_equals_tpm2_tools_for_the_same_seed() {
    let mut rng = rand::rngs::OsRng;
    let key = rsa::RsaPrivateKey::new(&mut rng, 2048).unwrap();
    let pem = key
        .to_public_key()
        .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (i, secret_len) in [32usize, 16, 1, 64].into_iter().enumerate() {
        let mut name = vec![0x00, 0x0b];
        name.extend((0..32).map(|b| (b as u8).wrapping_mul(7).wrapping_add(i as u8)));
        let secret: Vec<u8> = (0..secret_len).map(|b| b as u8 ^ 0x5a).collect();
        let (blob, enc) = tpm2_makecredential(dir.path(), &pem, &name, &secret);
        let seed = key
            .decrypt(rsa::Oaep::new_with_label::<Sha256, _>("IDENTITY\0"), &enc)
            .expect("tpm2-tools' seed decrypts");
        assert_eq!(seed.len(), 32);
        assert_eq!(
            credential_blob_from_seed(&seed, &name, &secret).unwrap(),
            blob,
            "secret of {secret_len} bytes"
        );
        // A different name gives a different blob (the name is bound into key and HMAC).
        let mut other = name.clone();
        other[5] ^= 1;
        assert_ne!(
            credential_blob_from_seed(&seed, &other, &secret).unwrap(),
            blob
        );
    }
    // Ours: the encrypted seed decrypts under the same label and reproduces our blob.
    let name = [0x00, 0x0b]
        .iter()
        .copied()
        .chain([9u8; 32])
        .collect::<Vec<_>>();
    let c = make_credential(&key.to_public_key(), &name, &[3u8; 32]).unwrap();
    let seed = key
        .decrypt(
            rsa::Oaep::new_with_label::<Sha256, _>("IDENTITY\0"),
            &c.encrypted_secret,
        )
        .unwrap();
    assert_eq!(
        credential_blob_from_seed(&seed, &name, &[3u8; 32]).unwrap(),
        c.blob
    );
}
