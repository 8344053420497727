//! HwTpm against a real swtpm (one per test, see testkit).

use std::time::Instant;

use sha2::{Digest as _, Sha256};
use testkit::Swtpm;
use tss_esapi::{
    structures::{Attest, AttestInfo, Public, Signature},
    traits::UnMarshall,
};
use vtpmmgr::hwtpm::{
    AkAlg, AkRecord, HwTpm, HwTpmError, PcrPolicySpec, ProvisionRecord, QuoteOut, policy_pcr_digest,
};

const TEST_PCRS: &[u8] = &[0, 2, 4, 7, 16, 23];

fn open(t: &Swtpm) -> HwTpm {
    HwTpm::open(&t.tcti()).expect("open HwTpm")
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    eprintln!("TIMING {what}: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    r
}

fn provision(tpm: &mut HwTpm) -> (ProvisionRecord, Vec<u8>, [u8; 32]) {
    let (rec, key, secret) = timed("provision", || {
        tpm.provision(&PcrPolicySpec::with_pcrs(TEST_PCRS))
    })
    .expect("provision");
    // Records round-trip through JSON (the on-disk format).
    let json = serde_json::to_string_pretty(&rec).unwrap();
    let rec2: ProvisionRecord = serde_json::from_str(&json).unwrap();
    assert_eq!(rec, rec2);
    (rec2, key.to_vec(), *secret)
}

fn assert_policy_mismatch(r: Result<impl std::fmt::Debug, HwTpmError>, pcr: u8) {
    match r {
        Err(HwTpmError::PolicyMismatch { changed, .. }) => {
            assert_eq!(changed, vec![pcr], "changed PCR list");
        }
        other => panic!("expected PolicyMismatch, got {other:?}"),
    }
}

#[test]
fn provision_unseal_extend_reauthorize() {
    let t = Swtpm::start();
    let mut tpm = open(&t);
    assert!(
        tpm.is_software_tpm(),
        "swtpm must be detected as software TPM"
    );

    let (rec, admin_key, secret) = provision(&mut tpm);
    assert_eq!(rec.pcrs, TEST_PCRS);
    // The approved policy is the PolicyPCR digest of the values recorded.
    assert_eq!(
        rec.approved_policy,
        policy_pcr_digest(&rec.pcrs, &rec.approved_pcr_values).to_vec()
    );

    let s1 = timed("unseal", || tpm.unseal_master(&rec)).expect("unseal");
    assert_eq!(*s1, secret);
    // A second unseal in the same context works too (no handle leak: swtpm has 3 slots).
    for _ in 0..5 {
        assert_eq!(*tpm.unseal_master(&rec).unwrap(), secret);
    }

    // Extending a policy PCR breaks the policy.
    tpm.pcr_extend(16, &[0xAB; 32]).unwrap();
    let err = tpm.unseal_master(&rec);
    eprintln!("expected error: {}", err.as_ref().unwrap_err());
    assert_policy_mismatch(err, 16);

    // A non-policy PCR doesn't matter.
    tpm.pcr_extend(15, &[0xCD; 32]).unwrap();

    // A wrong admin key is refused.
    let other = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
    let e = tpm.reauthorize(&rec, &other.to_bytes()).unwrap_err();
    assert!(matches!(e, HwTpmError::PolicyKey(_)), "{e:?}");

    // Admin re-authorizes the current values: same sealed object, same secret.
    let rec2 = timed("reauthorize", || tpm.reauthorize(&rec, &admin_key)).expect("reauthorize");
    assert_eq!(rec2.sealed_public, rec.sealed_public);
    assert_eq!(rec2.sealed_private, rec.sealed_private);
    assert_ne!(rec2.approved_policy, rec.approved_policy);
    assert_eq!(*tpm.unseal_master(&rec2).unwrap(), secret);
    // The old record stays unusable.
    assert_policy_mismatch(tpm.unseal_master(&rec), 16);

    // Raw 32-byte scalar form of the admin key also works.
    use p256::pkcs8::DecodePrivateKey;
    let sk = p256::ecdsa::SigningKey::from_pkcs8_der(&admin_key).unwrap();
    tpm.pcr_extend(23, &[1; 32]).unwrap();
    assert_policy_mismatch(tpm.unseal_master(&rec2), 23);
    let rec3 = tpm.reauthorize(&rec2, &sk.to_bytes()).unwrap();
    assert_eq!(*tpm.unseal_master(&rec3).unwrap(), secret);
}

#[test]
fn reopen_and_restart() {
    let mut t = Swtpm::start();
    let (rec, secret) = {
        let mut tpm = open(&t);
        let (rec, _key, secret) = provision(&mut tpm);
        (rec, secret)
    }; // HwTpm dropped: SRK flushed, connection closed.

    // New Context on the same swtpm.
    let mut tpm = timed("open (CreatePrimary SRK)", || open(&t));
    assert_eq!(
        tpm.srk_name(),
        rec.srk_name.as_slice(),
        "SRK is deterministic"
    );
    assert_eq!(*tpm.unseal_master(&rec).unwrap(), secret);
    drop(tpm);

    // "Reboot": state dir kept, PCRs reset (they were never extended, so policy holds).
    t.restart();
    let mut tpm = open(&t);
    assert_eq!(tpm.srk_name(), rec.srk_name.as_slice());
    assert_eq!(
        *timed("unseal after restart", || tpm.unseal_master(&rec)).unwrap(),
        secret
    );
    drop(tpm);

    // Extend, restart → PCRs reset → unseal works again.
    let mut tpm = open(&t);
    tpm.pcr_extend(7, &[9; 32]).unwrap();
    assert_policy_mismatch(tpm.unseal_master(&rec), 7);
    drop(tpm);
    t.restart();
    let mut tpm = open(&t);
    assert_eq!(*tpm.unseal_master(&rec).unwrap(), secret);
}

#[test]
fn forged_policy_key_is_rejected() {
    let t = Swtpm::start();
    let mut tpm = open(&t);
    let (rec, _key, _secret) = provision(&mut tpm);
    // An attacker provisions their own key/record and transplants the signed policy.
    let (evil, evil_key, _) = tpm.provision(&PcrPolicySpec::with_pcrs(TEST_PCRS)).unwrap();
    let mut forged = rec.clone();
    forged.policy_pubkey = evil.policy_pubkey.clone();
    forged.policy_key_name = evil.policy_key_name.clone();
    let forged = match tpm.reauthorize(&forged, &evil_key) {
        Err(e) => {
            assert!(matches!(e, HwTpmError::InvalidRecord(_)), "{e:?}");
            forged
        }
        Ok(r) => r,
    };
    let e = tpm.unseal_master(&forged).unwrap_err();
    assert!(matches!(e, HwTpmError::InvalidRecord(_)), "{e:?}");
    // Tampered signature: the TPM refuses it.
    let mut bad = rec.clone();
    let n = bad.policy_signature.len();
    bad.policy_signature[n - 1] ^= 1;
    let e = tpm.unseal_master(&bad).unwrap_err();
    assert!(matches!(e, HwTpmError::PolicySignature(_)), "{e:?}");
}

#[test]
fn different_tpm_is_detected() {
    let a = Swtpm::start();
    let b = Swtpm::start();
    let (rec, _, _) = provision(&mut open(&a));
    let mut tb = open(&b);
    let e = tb.unseal_master(&rec).unwrap_err();
    assert!(matches!(e, HwTpmError::SrkMismatch), "{e:?}");
}

#[test]
fn secrets_are_redacted_in_debug() {
    let t = Swtpm::start();
    let mut tpm = open(&t);
    let (rec, key, secret) = tpm.provision(&PcrPolicySpec::default()).unwrap();
    let dbg = format!("{key:?} {secret:?} {tpm:?}");
    assert!(!dbg.contains(&hex::encode(*secret)));
    assert!(dbg.contains("REDACTED"));
    assert_eq!(rec.pcrs, vec![0, 2, 4, 7]);
    assert_eq!(*tpm.unseal_master(&rec).unwrap(), *secret);
}

// ---------------------------------------------------------------------------------------------
// Quote verification in pure Rust (the recipe of rust-deps §2).
// ---------------------------------------------------------------------------------------------

fn pad32(b: &[u8]) -> [u8; 32] {
    let mut o = [0u8; 32];
    o[32 - b.len()..].copy_from_slice(b);
    o
}

/// Verifies a quote the way a remote verifier would: Err(reason) if anything does not match.
fn verify_quote(ak: &AkRecord, q: &QuoteOut, nonce: &[u8]) -> Result<(), &'static str> {
    let public = Public::unmarshall(&ak.public).map_err(|_| "AK public")?;
    let sig = Signature::unmarshall(&q.signature).map_err(|_| "signature encoding")?;
    let attest = Attest::unmarshall(&q.attest).map_err(|_| "attest encoding")?;

    // Semantic checks.
    if attest.extra_data().value() != nonce {
        return Err("extraData != qualifying data");
    }
    let AttestInfo::Quote { info } = attest.attested() else {
        return Err("not a quote");
    };
    let mut h = Sha256::new();
    for v in &q.pcr_values {
        h.update(v);
    }
    if info.pcr_digest().value() != &h.finalize()[..] {
        return Err("pcrDigest != sha256(PCR values)");
    }

    let ok = match (&public, &sig) {
        (Public::Ecc { unique, .. }, Signature::EcDsa(es)) => {
            use p256::ecdsa::{VerifyingKey, signature::Verifier};
            let x = pad32(unique.x().value());
            let y = pad32(unique.y().value());
            let pt = p256::EncodedPoint::from_affine_coordinates(&x.into(), &y.into(), false);
            let vk = VerifyingKey::from_encoded_point(&pt).map_err(|_| "AK point")?;
            let s = p256::ecdsa::Signature::from_scalars(
                pad32(es.signature_r().value()),
                pad32(es.signature_s().value()),
            )
            .map_err(|_| "r/s")?;
            vk.verify(&q.attest, &s).is_ok()
        }
        (Public::Rsa { unique, .. }, Signature::RsaSsa(rs)) => {
            use rsa::{BigUint, RsaPublicKey, pkcs1v15, signature::Verifier};
            let pk = RsaPublicKey::new(BigUint::from_bytes_be(unique.value()), 65537u32.into())
                .map_err(|_| "RSA key")?;
            let vk = pkcs1v15::VerifyingKey::<Sha256>::new(pk);
            let s = pkcs1v15::Signature::try_from(rs.signature().value()).map_err(|_| "sig")?;
            vk.verify(&q.attest, &s).is_ok()
        }
        _ => return Err("unexpected key/signature combination"),
    };
    if ok { Ok(()) } else { Err("bad signature") }
}

fn quote_roundtrip(alg: AkAlg) {
    let t = Swtpm::start();
    let mut tpm = open(&t);
    let ak = timed(&format!("create_ak {alg}"), || tpm.create_ak(alg)).unwrap();
    let j = serde_json::to_string(&ak).unwrap();
    let ak: AkRecord = serde_json::from_str(&j).unwrap();
    tpm.pcr_extend(16, &[7; 32]).unwrap();

    let nonce = tpm.get_random(32).unwrap();
    let q = timed(&format!("quote {alg} (load+quote+pcr_read+flush)"), || {
        tpm.quote(&ak, &nonce, &[16, 0, 7, 23])
    })
    .unwrap();
    assert_eq!(q.pcrs, vec![0, 7, 16, 23]);
    assert_eq!(q.pcr_values, tpm.pcr_read(&[0, 7, 16, 23]).unwrap());
    assert_eq!(
        verify_quote(&ak, &q, &nonce),
        Ok(()),
        "valid quote verifies"
    );

    // Tampering is detected: flip a byte of clockInfo (magic 4, type 2, qualifiedSigner 2+34,
    // extraData 2+32 → clock at offset 76), which still parses and passes the semantic checks.
    let mut bad = q.clone();
    bad.attest[76] ^= 1;
    assert_eq!(verify_quote(&ak, &bad, &nonce), Err("bad signature"));
    // A changed PCR value no longer matches pcrDigest.
    let mut bad = q.clone();
    bad.pcr_values[0][0] ^= 1;
    assert_eq!(
        verify_quote(&ak, &bad, &nonce),
        Err("pcrDigest != sha256(PCR values)")
    );
    // A different nonce is rejected.
    assert_eq!(
        verify_quote(&ak, &q, &[0u8; 32]),
        Err("extraData != qualifying data")
    );

    // 64-byte qualifying data (a Merkle root + something) and a second quote; no handle leaks.
    let q64: Vec<u8> = (0..64).collect();
    for _ in 0..5 {
        let q = tpm
            .quote(&ak, &q64, &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
            .unwrap();
        assert_eq!(verify_quote(&ak, &q, &q64), Ok(()));
    }
    assert!(matches!(
        tpm.quote(&ak, &[0u8; 65], &[0]),
        Err(HwTpmError::InvalidArgument(_))
    ));

    // Latency of repeated quotes (debug build, swtpm).
    let n = 20;
    let t0 = Instant::now();
    for _ in 0..n {
        tpm.quote(&ak, &nonce, &[0, 2, 4, 7]).unwrap();
    }
    eprintln!(
        "TIMING quote {alg} avg over {n}: {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3 / n as f64
    );
}

/// Quotes `pcrs` with `ak` through the counting proxy; checks the quote as a verifier would and
/// that the values returned are the TPM's current ones. Returns the TPM commands the quote took.
fn counted_quote(tpm: &mut HwTpm, proxy: &testkit::delay::DelayProxy, ak: &AkRecord, n: u8) -> u64 {
    const PCRS: &[u8] = &[0, 7, 16];
    let before = proxy.commands();
    let q = tpm.quote(ak, &[n; 32], PCRS).expect("quote");
    let commands = proxy.commands() - before;
    assert_eq!(verify_quote(ak, &q, &[n; 32]), Ok(()));
    assert_eq!(q.pcr_values, tpm.pcr_read(PCRS).unwrap(), "quote {n}: stale PCR values");
    commands
}

/// A deep-quote round behind a slow TPM costs one delay per TPM command: once the AK is loaded
/// and the PCRs are unchanged, a quote is the one `TPM2_Quote` (no `Load`, `FlushContext` or
/// `PCR_Read`), and a changed PCR, another AK or another loaded object still give right quotes.
#[test]
fn a_warm_quote_is_one_tpm_command() {
    let t = Swtpm::start();
    let proxy = testkit::delay::DelayProxy::start(t.port(), std::time::Duration::ZERO);
    let mut tpm = HwTpm::open(&proxy.tcti()).expect("open HwTpm through the counting proxy");
    let ak = tpm.create_ak(AkAlg::EccP256).unwrap();
    let ak2 = tpm.create_ak(AkAlg::EccP256).unwrap();

    // First quote: Load(AK), Quote, PCR_Read.
    assert_eq!(counted_quote(&mut tpm, &proxy, &ak, 1), 3);
    for n in 2..6 {
        assert_eq!(counted_quote(&mut tpm, &proxy, &ak, n), 1, "warm quote {n}");
    }
    // A changed PCR: the remembered values no longer hash to the quoted digest → PCR_Read.
    tpm.pcr_extend(16, &[9; 32]).unwrap();
    assert_eq!(counted_quote(&mut tpm, &proxy, &ak, 6), 2);
    assert_eq!(counted_quote(&mut tpm, &proxy, &ak, 7), 1);
    // Another group's AK: FlushContext(AK), Load(AK2), Quote; then it stays loaded.
    assert_eq!(counted_quote(&mut tpm, &proxy, &ak2, 8), 3);
    assert_eq!(counted_quote(&mut tpm, &proxy, &ak2, 9), 1);
    // Any other object operation releases the kept AK first (swtpm has 3 object slots:
    // SRK, kept AK and two new objects would not fit), and the next quote loads it again.
    let _ak3 = tpm.create_ak(AkAlg::Rsa2048).unwrap();
    assert_eq!(counted_quote(&mut tpm, &proxy, &ak2, 10), 2);
    let admin = tpm.provision(&PcrPolicySpec::with_pcrs(&[23])).expect("provision with an AK kept");
    assert_eq!(*tpm.unseal_master(&admin.0).expect("unseal with an AK kept"), *admin.2);
    assert_eq!(counted_quote(&mut tpm, &proxy, &ak, 11), 2);
}

/// After `warm_quote` (what the manager does before it serves) even the first quote of a
/// selection is the one `TPM2_Quote`: the AK is loaded and the values come from the bank read
/// ahead; a PCR changed since then is read again, never served stale.
#[test]
fn a_warmed_first_quote_is_one_tpm_command() {
    let t = Swtpm::start();
    let proxy = testkit::delay::DelayProxy::start(t.port(), std::time::Duration::ZERO);
    let mut tpm = HwTpm::open(&proxy.tcti()).expect("open HwTpm through the counting proxy");
    let ak = tpm.create_ak(AkAlg::EccP256).unwrap();
    let before = proxy.commands();
    tpm.warm_quote(&ak).unwrap();
    assert_eq!(proxy.commands() - before, 4, "warm-up: PCR_Read × 3 (24 PCRs), Load(AK)");
    assert_eq!(counted_quote(&mut tpm, &proxy, &ak, 1), 1, "first quote after the warm-up");
    // Another selection is served from the same bank.
    let before = proxy.commands();
    let q = tpm.quote(&ak, &[2; 32], &[3, 23]).unwrap();
    assert_eq!(proxy.commands() - before, 1);
    assert_eq!(verify_quote(&ak, &q, &[2; 32]), Ok(()));
    assert_eq!(q.pcr_values, tpm.pcr_read(&[3, 23]).unwrap());
    // A PCR extended after the warm-up: its value is read again (counted_quote checks it).
    tpm.pcr_extend(16, &[7; 32]).unwrap();
    assert_eq!(counted_quote(&mut tpm, &proxy, &ak, 3), 2);
}

#[test]
fn create_ak_and_quote_ecc() {
    quote_roundtrip(AkAlg::EccP256);
}

#[test]
fn create_ak_and_quote_rsa() {
    quote_roundtrip(AkAlg::Rsa2048);
}

#[test]
fn get_random_lengths() {
    let t = Swtpm::start();
    let mut tpm = open(&t);
    for n in [0usize, 1, 32, 33, 100] {
        assert_eq!(tpm.get_random(n).unwrap().len(), n);
    }
}

#[test]
fn bad_tcti_is_a_clear_error() {
    let e = HwTpm::open("swtpm:host=127.0.0.1,port=1").unwrap_err();
    assert!(matches!(e, HwTpmError::TctiUnusable { .. }), "{e:?}");
    assert_eq!(e.to_string(), "connection refused to 127.0.0.1:1: is swtpm running and listening there?");
}

/// The EK CA key: created in the TPM with an authorisation value, signs digests (ECDSA P-256,
/// verified in software), refuses a wrong authorisation value, and the AK's TPM2_Certify of it
/// verifies with the pure-Rust checker a tenant runs.
#[test]
fn ek_ca_key_signs_and_is_certified_by_the_ak() {
    use p256::ecdsa::signature::hazmat::PrehashVerifier as _;
    use vtpm_attest::ekcert;
    use vtpm_proto::ekcert::{CaPublic, CertError};
    use vtpm_proto::mgr::{CA_CERTIFY_VERSION, CaCertify};
    let t = Swtpm::start();
    let mut tpm = open(&t);
    let ak = tpm.create_ak(AkAlg::EccP256).unwrap();
    let auth = [0x5a; 32];
    let key = timed("create CA key", || tpm.create_ca_key(&auth)).unwrap();
    let ca = CaPublic::parse(&key.public).unwrap();
    let digest: [u8; 32] = Sha256::digest(b"to be signed").into();
    let (r, s) = timed("CA sign", || tpm.ca_sign(&key, &auth, &digest)).unwrap();
    let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&ca.point).unwrap();
    vk.verify_prehash(&digest, &p256::ecdsa::Signature::from_scalars(r, s).unwrap()).unwrap();
    // The blob alone signs nothing.
    assert!(matches!(tpm.ca_sign(&key, &[0x5b; 32], &digest), Err(HwTpmError::Tpm { .. })));

    // A (fake) CA certificate body stands for the certificate the evidence is bound to.
    let cert_der = b"0\x03\x02\x01\x00".to_vec();
    let (attest, signature) = timed("certify CA key", || tpm.certify_ca(&key, &auth, &ak, &Sha256::digest(&cert_der))).unwrap();
    let ev = CaCertify {
        version: CA_CERTIFY_VERSION,
        group: uuid::Uuid::nil(),
        ak_public: hex::encode(&ak.public),
        ca_public: hex::encode(&key.public),
        attest: hex::encode(&attest),
        signature: hex::encode(&signature),
    };
    // The fake certificate does not parse as X.509, so the last step (key equality) fails, but
    // every TPM-side check before it passed; a wrong AK or certificate fails earlier.
    match ekcert::verify_ca_certify(&cert_der, &ev, &ak.public) {
        Err(CertError::Der { .. } | CertError::Malformed(_)) => {}
        other => panic!("{other:?}"),
    }
    let other_ak = tpm.create_ak(AkAlg::EccP256).unwrap();
    assert_eq!(ekcert::verify_ca_certify(&cert_der, &ev, &other_ak.public), Err(CertError::AkMismatch));
    match ekcert::verify_ca_certify(b"another certificate", &ev, &ak.public) {
        Err(CertError::Certify(m)) => assert!(m.contains("extraData"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The certify evidence from a wrong authorisation value is never produced.
    assert!(tpm.certify_ca(&key, &[1; 32], &ak, &[0; 32]).is_err());
}
