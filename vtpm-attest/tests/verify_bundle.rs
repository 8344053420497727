//! The deep-quote verifier on bundles signed by software P-256 and RSA-2048
//! AKs over hand-marshalled TPMS_ATTEST (real-TPM bundles are tested end to
//! end in the manager's integration tests).

// The signed-bundle fixtures are the format crate's (its evidence tests use them too).
#[path = "../../vtpm-proto/tests/verify_fixtures/mod.rs"]
mod verify_fixtures;

use std::collections::BTreeMap;

use verify_fixtures::*;
use vtpm_proto::evidence::{Bundle, EvidenceError, PcrSelection, TPM_ALG_SHA1, TPM_ALG_SHA256};
use vtpm_proto::merkle::{self, MerkleError};
use vtpm_attest::verify::{Expectations, PcrPolicy, TpmsError, VerifyError, verify};
use vtpm_proto::tpms::{AkKey, AkPublic, TpmSignature};

fn aks() -> [Ak; 2] {
    [Ak::ecc(), Ak::rsa()]
}

fn three(ak: &Ak) -> Vec<Bundle> {
    batch(ak, vec![request(1), request(2), request(3)], &host_pcrs())
}

fn exp(ak: &Ak, n: u8) -> Expectations {
    Expectations::new(nonce(n), ak.public.clone())
}

#[test]
fn every_bundle_of_a_batch_verifies_for_both_ak_types() {
    for ak in aks() {
        let bundles = three(&ak);
        for (i, b) in bundles.iter().enumerate() {
            let n = i as u8 + 1;
            let mut e = exp(&ak, n);
            e.vtpm_uuid = Some(uuid(n));
            e.group_uuid = Some(uuid(0xF0));
            e.flags = Some(1);
            let v = verify(b, &e).unwrap();
            assert_eq!(v.leaf, b.leaf);
            assert_eq!(v.leaf.position.leaf_index, i as u32);
            assert_eq!(v.leaf.position.tree_size, 3);
            assert_eq!(v.leaf_hash, merkle::leaf_hash(&b.leaf.encode().unwrap()));
            assert_eq!(v.root.as_slice(), v.attest.extra_data.as_slice());
            assert_eq!(v.attest.clock_info.reset_count, 7);
            assert_eq!(v.attest.firmware_version, 0x2023_0101_0000_0001);
            assert_eq!(v.host_pcrs, host_pcrs());
            // The binary form round-trips and still verifies.
            let again = Bundle::decode(&b.encode().unwrap()).unwrap();
            assert_eq!(&again, b);
            verify(&again, &e).unwrap();
        }
    }
}

#[test]
fn single_request_batch_and_large_batch() {
    let ak = Ak::ecc();
    let one = batch(&ak, vec![request(9)], &host_pcrs());
    assert!(one[0].path.is_empty());
    verify(&one[0], &exp(&ak, 9)).unwrap();
    let many = batch(&ak, (0..37).map(request).collect(), &host_pcrs());
    for n in [0u8, 1, 31, 32, 36] {
        verify(&many[n as usize], &exp(&ak, n)).unwrap();
    }
}

#[test]
fn wrong_nonce_fails_with_the_nonce_error() {
    for ak in aks() {
        let b = &three(&ak)[0];
        let err = verify(b, &exp(&ak, 2)).unwrap_err();
        assert_eq!(
            err,
            VerifyError::NonceMismatch {
                expected: nonce(2),
                got: nonce(1)
            }
        );
        let mut e = exp(&ak, 1);
        e.nonce.pop();
        assert!(matches!(
            verify(b, &e),
            Err(VerifyError::NonceMismatch { .. })
        ));
    }
}

#[test]
fn bundle_for_vtpm_a_fails_when_b_is_expected() {
    for ak in aks() {
        let bundles = three(&ak);
        let mut e = exp(&ak, 1);
        e.vtpm_uuid = Some(uuid(2));
        assert_eq!(
            verify(&bundles[0], &e).unwrap_err(),
            VerifyError::VtpmUuidMismatch {
                expected: uuid(2),
                got: uuid(1)
            }
        );
        e.vtpm_uuid = Some(uuid(1));
        verify(&bundles[0], &e).unwrap();
        // Even with B's nonce, A's bundle is A's.
        let mut e = exp(&ak, 2);
        e.vtpm_uuid = Some(uuid(2));
        assert!(matches!(
            verify(&bundles[0], &e),
            Err(VerifyError::NonceMismatch { .. })
        ));
    }
}

#[test]
fn claiming_another_leaf_of_the_batch_fails() {
    let ak = Ak::ecc();
    let bundles = three(&ak);
    // A's signed quote with B's leaf but A's path.
    let mut b = bundles[0].clone();
    b.leaf = bundles[1].leaf.clone();
    assert!(matches!(
        verify(&b, &exp(&ak, 2)),
        Err(VerifyError::RootMismatch { .. })
    ));
    // A's leaf rewritten to B's UUID.
    let mut b = bundles[0].clone();
    b.leaf.vtpm_uuid = uuid(2);
    assert!(matches!(
        verify(&b, &exp(&ak, 1)),
        Err(VerifyError::RootMismatch { .. })
    ));
    // A's leaf claiming another position or tree size.
    for (index, size) in [(1, 3), (0, 4), (0, 2), (2, 3)] {
        let mut b = bundles[0].clone();
        b.leaf.position.leaf_index = index;
        b.leaf.position.tree_size = size;
        let err = verify(&b, &exp(&ak, 1)).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::RootMismatch { .. } | VerifyError::Inclusion(_)
            ),
            "{index}/{size}: {err:?}"
        );
    }
    // Leaf 0 of 5 vs 6: the RFC 9162 walk accepts the size, the leaf encoding does not.
    let five = batch(&ak, (0..5).map(request).collect(), &host_pcrs());
    let mut b = five[0].clone();
    b.leaf.position.tree_size = 6;
    assert!(matches!(
        verify(&b, &exp(&ak, 0)),
        Err(VerifyError::RootMismatch { .. })
    ));
}

#[test]
fn inclusion_path_errors() {
    let ak = Ak::ecc();
    let mut b = three(&ak)[0].clone();
    b.path.pop();
    assert!(matches!(
        verify(&b, &exp(&ak, 1)),
        Err(VerifyError::Inclusion(MerkleError::WrongProofLength { .. }))
    ));
    let mut b = three(&ak)[0].clone();
    b.path[1][0] ^= 1;
    assert!(matches!(
        verify(&b, &exp(&ak, 1)),
        Err(VerifyError::RootMismatch { .. })
    ));
    let mut b = three(&ak)[0].clone();
    b.path.swap(0, 1);
    assert!(matches!(
        verify(&b, &exp(&ak, 1)),
        Err(VerifyError::RootMismatch { .. })
    ));
}

#[test]
fn ak_must_be_the_expected_one() {
    let ecc = Ak::ecc();
    let other = Ak::ecc_from_scalar(99);
    let rsa = Ak::rsa();
    let b = &three(&ecc)[0];
    assert_eq!(
        verify(b, &Expectations::new(nonce(1), other.public.clone())).unwrap_err(),
        VerifyError::AkMismatch
    );
    assert_eq!(
        verify(b, &Expectations::new(nonce(1), rsa.public.clone())).unwrap_err(),
        VerifyError::AkMismatch
    );
    // Someone else's key substituted in the bundle, with a matching signature: still not our AK.
    let forged = &three(&other)[0];
    assert_eq!(
        verify(forged, &exp(&ecc, 1)).unwrap_err(),
        VerifyError::AkMismatch
    );
    // A bundle claiming our AK but signed by another key.
    let mut b = three(&other)[0].clone();
    b.ak_public = ecc.public.clone();
    assert_eq!(
        verify(&b, &exp(&ecc, 1)).unwrap_err(),
        VerifyError::Tpm(TpmsError::SignatureInvalid)
    );
}

#[test]
fn signature_and_attest_tampering() {
    for ak in aks() {
        let good = three(&ak)[0].clone();
        let e = exp(&ak, 1);
        // Any change to the signed bytes.
        for at in [0, 7, 40, good.attest.len() - 1] {
            let mut b = good.clone();
            b.attest[at] ^= 0x20;
            assert_eq!(
                verify(&b, &e).unwrap_err(),
                VerifyError::Tpm(TpmsError::SignatureInvalid),
                "attest byte {at}"
            );
        }
        let mut b = good.clone();
        let last = b.signature.len() - 1;
        b.signature[last] ^= 1;
        assert_eq!(verify(&b, &e).unwrap_err(), VerifyError::Tpm(TpmsError::SignatureInvalid));
        let mut b = good.clone();
        b.signature.push(0);
        assert!(matches!(
            verify(&b, &e),
            Err(VerifyError::Tpm(TpmsError::SignatureMalformed(
                EvidenceError::TrailingBytes { .. }
            )))
        ));
        // Signature hash other than SHA-256.
        let mut b = good.clone();
        b.signature[2..4].copy_from_slice(&0x0004u16.to_be_bytes());
        assert!(matches!(
            verify(&b, &e),
            Err(VerifyError::Tpm(TpmsError::SignatureScheme {
                hash_alg: 0x0004,
                ..
            }))
        ));
        // Signature scheme of the other key type.
        let mut b = good.clone();
        let flipped = if b.signature[1] == 0x18 { 0x14 } else { 0x18 };
        b.signature[1] = flipped;
        assert!(verify(&b, &e).is_err());
    }
}

#[test]
fn attest_content_checks_past_the_signature() {
    let ak = Ak::ecc();
    let good = three(&ak)[0].clone();
    let host = host_pcrs();
    let root: [u8; 32] = good.attest[40..72].try_into().unwrap();
    let e = exp(&ak, 1);
    let digest = vtpm_proto::evidence::pcr_digest_sha256(&host.values);

    let mut b = good.clone();
    b.attest = quote_attest_with(0xff54_4348, 0x8018, &root, &host.selection, &digest);
    resign(&ak, &mut b);
    assert_eq!(
        verify(&b, &e).unwrap_err(),
        VerifyError::Tpm(TpmsError::AttestMagic { got: 0xff54_4348 })
    );

    let mut b = good.clone();
    b.attest = quote_attest_with(0xff54_4347, 0x8017, &root, &host.selection, &digest); // TPM_ST_ATTEST_CERTIFY
    resign(&ak, &mut b);
    assert_eq!(
        verify(&b, &e).unwrap_err(),
        VerifyError::Tpm(TpmsError::AttestType { got: 0x8017 })
    );

    let mut b = good.clone();
    b.attest = quote_attest_with(0xff54_4347, 0x8018, &root[..20], &host.selection, &digest);
    resign(&ak, &mut b);
    assert_eq!(
        verify(&b, &e).unwrap_err(),
        VerifyError::ExtraDataLength { got: 20 }
    );

    // A quote whose qualifyingData is some other value (e.g. a plain host quote).
    let mut b = good.clone();
    b.attest = quote_attest_with(0xff54_4347, 0x8018, &[0x55; 32], &host.selection, &digest);
    resign(&ak, &mut b);
    assert!(
        matches!(verify(&b, &e), Err(VerifyError::RootMismatch { quoted, .. }) if quoted == [0x55; 32])
    );

    let mut b = good.clone();
    b.attest.push(0);
    resign(&ak, &mut b);
    assert!(matches!(
        verify(&b, &e),
        Err(VerifyError::Tpm(TpmsError::AttestMalformed(
            EvidenceError::TrailingBytes { .. }
        )))
    ));

    let mut b = good.clone();
    b.attest.truncate(b.attest.len() - 3);
    resign(&ak, &mut b);
    assert!(matches!(
        verify(&b, &e),
        Err(VerifyError::Tpm(TpmsError::AttestMalformed(
            EvidenceError::Truncated { .. }
        )))
    ));
}

#[test]
fn host_pcr_checks() {
    let ak = Ak::ecc();
    let good = three(&ak)[0].clone();
    let e = exp(&ak, 1);

    let mut b = good.clone();
    b.host_pcrs.values[3][0] ^= 1;
    assert!(matches!(
        verify(&b, &e),
        Err(VerifyError::PcrDigestMismatch { .. })
    ));

    let mut b = good.clone();
    b.host_pcrs.values.swap(0, 1);
    assert!(matches!(
        verify(&b, &e),
        Err(VerifyError::PcrDigestMismatch { .. })
    ));

    let mut b = good.clone();
    b.host_pcrs.selection[0].select[0] = 0x7f;
    b.host_pcrs.values.remove(7);
    assert!(matches!(
        verify(&b, &e),
        Err(VerifyError::HostPcrSelectionMismatch { .. })
    ));

    let mut b = good.clone();
    b.host_pcrs.values.pop();
    assert!(matches!(
        verify(&b, &e),
        Err(VerifyError::HostPcrValues(
            EvidenceError::CountMismatch { .. }
        ))
    ));

    let mut b = good.clone();
    b.host_pcrs.values[8].push(0);
    assert!(matches!(
        verify(&b, &e),
        Err(VerifyError::HostPcrValues(EvidenceError::ValueLength {
            position: 8,
            expected: 20,
            ..
        }))
    ));

    // A quote with a bank listed twice is refused even when signed.
    let host = vtpm_proto::evidence::HostPcrs {
        selection: vec![
            PcrSelection {
                hash_alg: TPM_ALG_SHA256,
                select: vec![1, 0, 0],
            },
            PcrSelection {
                hash_alg: TPM_ALG_SHA256,
                select: vec![1, 0, 0],
            },
        ],
        values: vec![vec![1; 32], vec![2; 32]],
    };
    let b = batch(&ak, vec![request(1)], &host).remove(0);
    assert!(matches!(
        verify(&b, &e),
        Err(VerifyError::HostPcrValues(
            EvidenceError::InvalidValue { .. }
        ))
    ));
}

#[test]
fn host_pcr_policy() {
    let ak = Ak::rsa();
    let b = three(&ak)[0].clone();
    let mut e = exp(&ak, 1);
    let policy = |alg, pairs: &[(u32, Vec<u8>)]| {
        Some(PcrPolicy {
            hash_alg: alg,
            values: pairs.iter().cloned().collect::<BTreeMap<_, _>>(),
        })
    };

    e.host_pcrs = policy(TPM_ALG_SHA256, &[(0, vec![0x10; 32]), (7, vec![0x17; 32])]);
    verify(&b, &e).unwrap();
    e.host_pcrs = policy(TPM_ALG_SHA1, &[(0, vec![0xA0; 20])]);
    verify(&b, &e).unwrap();

    e.host_pcrs = policy(TPM_ALG_SHA256, &[(7, vec![0x18; 32])]);
    assert_eq!(
        verify(&b, &e).unwrap_err(),
        VerifyError::HostPcrPolicy {
            hash_alg: TPM_ALG_SHA256,
            index: 7,
            expected: vec![0x18; 32],
            got: vec![0x17; 32]
        }
    );
    e.host_pcrs = policy(TPM_ALG_SHA256, &[(8, vec![0; 32])]);
    assert_eq!(
        verify(&b, &e).unwrap_err(),
        VerifyError::HostPcrNotQuoted {
            hash_alg: TPM_ALG_SHA256,
            index: 8
        }
    );
    e.host_pcrs = policy(TPM_ALG_SHA1, &[(1, vec![0; 20])]);
    assert_eq!(
        verify(&b, &e).unwrap_err(),
        VerifyError::HostPcrNotQuoted {
            hash_alg: TPM_ALG_SHA1,
            index: 1
        }
    );
}

#[test]
fn vpcr_policy_group_and_flags() {
    let ak = Ak::ecc();
    let b = three(&ak)[1].clone(); // vTPM 2: vPCR0 = 02.., vPCR7 = 77..
    let mut e = exp(&ak, 2);
    let mut values = BTreeMap::new();
    values.insert(0, vec![2; 32]);
    values.insert(7, vec![0x77; 32]);
    e.vpcrs = Some(PcrPolicy {
        hash_alg: TPM_ALG_SHA256,
        values: values.clone(),
    });
    verify(&b, &e).unwrap();

    values.insert(0, vec![1; 32]);
    e.vpcrs = Some(PcrPolicy {
        hash_alg: TPM_ALG_SHA256,
        values: values.clone(),
    });
    assert_eq!(
        verify(&b, &e).unwrap_err(),
        VerifyError::VpcrPolicy {
            index: 0,
            expected: vec![1; 32],
            got: vec![2; 32]
        }
    );

    values.clear();
    values.insert(3, vec![0; 32]);
    e.vpcrs = Some(PcrPolicy {
        hash_alg: TPM_ALG_SHA256,
        values: values.clone(),
    });
    assert_eq!(
        verify(&b, &e).unwrap_err(),
        VerifyError::VpcrNotSelected { index: 3 }
    );

    e.vpcrs = Some(PcrPolicy {
        hash_alg: TPM_ALG_SHA1,
        values,
    });
    assert_eq!(
        verify(&b, &e).unwrap_err(),
        VerifyError::VpcrBank {
            policy: TPM_ALG_SHA1,
            leaf: TPM_ALG_SHA256
        }
    );

    let mut e = exp(&ak, 2);
    e.group_uuid = Some(uuid(0xF1));
    assert!(matches!(
        verify(&b, &e),
        Err(VerifyError::GroupUuidMismatch { .. })
    ));
    let mut e = exp(&ak, 2);
    e.flags = Some(0);
    assert_eq!(
        verify(&b, &e).unwrap_err(),
        VerifyError::FlagsMismatch {
            expected: 0,
            got: 1
        }
    );
}

#[test]
fn ak_public_parsing() {
    let ecc = Ak::ecc();
    let ak = AkPublic::parse(&ecc.public).unwrap();
    assert!(matches!(ak.key, AkKey::EccP256 { .. }));
    assert_eq!(ak.scheme_hash, Some(TPM_ALG_SHA256));
    let rsa = Ak::rsa();
    let ak = AkPublic::parse(&rsa.public).unwrap();
    assert!(matches!(
        ak.key,
        AkKey::Rsa2048 {
            exponent: 65537,
            ..
        }
    ));

    // Not restricted, or a decryption key: refused even if it is the expected one.
    let AkKey::EccP256 { x, y } = AkPublic::parse(&ecc.public).unwrap().key else {
        unreachable!()
    };
    for attrs in [
        AK_ATTRIBUTES & !(1 << 16),
        AK_ATTRIBUTES | (1 << 17),
        AK_ATTRIBUTES & !(1 << 18),
        AK_ATTRIBUTES & !(1 << 1),
    ] {
        let public = ecc_public(&x, &y, attrs);
        assert_eq!(
            AkPublic::parse(&public).unwrap_err(),
            TpmsError::AkAttributes { attributes: attrs }
        );
        let mut b = three(&ecc)[0].clone();
        b.ak_public = public.clone();
        assert_eq!(
            verify(&b, &Expectations::new(nonce(1), public)).unwrap_err(),
            VerifyError::Tpm(TpmsError::AkAttributes { attributes: attrs })
        );
    }
    // Another curve.
    let mut p = ecc.public.clone();
    p[16..18].copy_from_slice(&0x0004u16.to_be_bytes()); // curveID after type,nameAlg,attrs,authPolicy,sym,scheme,hash
    assert_eq!(
        AkPublic::parse(&p).unwrap_err(),
        TpmsError::AkUnsupported {
            what: "ECC curve",
            value: 4
        }
    );
    // A point not on the curve.
    let mut bad_y = y;
    bad_y[31] ^= 1;
    assert!(matches!(
        AkPublic::parse(&ecc_public(&x, &bad_y, AK_ATTRIBUTES)),
        Err(TpmsError::AkInvalidKey(_))
    ));
    // RSA-1024 modulus.
    assert!(matches!(
        AkPublic::parse(&rsa_public(&[0xC5; 128], AK_ATTRIBUTES)),
        Err(TpmsError::AkInvalidKey(_))
    ));
    // Unknown type, truncation, trailing bytes.
    assert!(matches!(
        AkPublic::parse(&[0x00, 0x08, 0, 0x0B, 0, 5, 0, 0x72, 0, 0]),
        Err(TpmsError::AkUnsupported {
            what: "TPMT_PUBLIC.type",
            ..
        })
    ));
    for cut in 0..ecc.public.len() {
        assert!(
            matches!(
                AkPublic::parse(&ecc.public[..cut]),
                Err(TpmsError::AkMalformed(_))
            ),
            "cut {cut}"
        );
    }
    let mut p = rsa.public.clone();
    p.push(0);
    assert!(matches!(
        AkPublic::parse(&p),
        Err(TpmsError::AkMalformed(
            EvidenceError::TrailingBytes { .. }
        ))
    ));
}

/// A TPM may drop leading zero bytes of x, y, r and s; the verifier left-pads.
#[test]
fn short_ecc_coordinates_and_scalars_are_left_padded() {
    // A key whose x or y starts with a zero byte.
    // Full-length ECC TPMT_PUBLIC is 88 bytes; shorter means a dropped leading zero.
    let ak = (1u64..)
        .map(Ak::ecc_from_scalar)
        .find(|ak| ak.public.len() < 88)
        .unwrap();
    assert!(matches!(
        AkPublic::parse(&ak.public).unwrap().key,
        AkKey::EccP256 { .. }
    ));
    // A message whose signature has a short r or s.
    let mut found = false;
    for n in 0..=255u8 {
        let b = batch(&ak, vec![request(n)], &host_pcrs()).remove(0);
        let TpmSignature::Ecdsa { .. } = TpmSignature::parse(&b.signature).unwrap() else {
            unreachable!()
        };
        let r_len = u16::from_be_bytes([b.signature[4], b.signature[5]]) as usize;
        let s_len = u16::from_be_bytes([b.signature[6 + r_len], b.signature[7 + r_len]]) as usize;
        verify(&b, &Expectations::new(nonce(n), ak.public.clone())).unwrap();
        if r_len < 32 || s_len < 32 {
            found = true;
            break;
        }
    }
    assert!(found, "no short r/s in 256 signatures");
    // Over-long scalars are refused.
    let mut sig = vec![0x00, 0x18, 0x00, 0x0B, 0x00, 33];
    sig.extend_from_slice(&[1; 33]);
    sig.extend_from_slice(&[0x00, 0x01, 0x01]);
    assert!(matches!(
        TpmSignature::parse(&sig),
        Err(TpmsError::SignatureMalformed(_))
    ));
}
