//! Tamper evidence of the encoded bundle: every single-bit flip of every byte
//! is caught by `Bundle::decode` or by `verify`, never accepted and never a
//! panic; truncated and random inputs never panic.

// The signed-bundle fixtures are the format crate's (its evidence tests use them too).
#[path = "../../vtpm-proto/tests/verify_fixtures/mod.rs"]
mod verify_fixtures;

use verify_fixtures::*;
use vtpm_proto::evidence::{Bundle, EvidenceError};
use vtpm_attest::verify::{Expectations, TpmsError, VerifyError, verify};

#[derive(Debug)]
enum Outcome {
    Decode(EvidenceError),
    Verify(VerifyError),
}

fn check(bytes: &[u8], e: &Expectations) -> Result<(), Outcome> {
    let b = Bundle::decode(bytes).map_err(Outcome::Decode)?;
    verify(&b, e).map_err(Outcome::Verify)?;
    Ok(())
}

/// Byte ranges of the interesting fields of an encoded bundle.
struct Layout {
    leaf: usize,
    leaf_len: usize,
    path: usize,
    attest: usize,
    sig: usize,
    ak: usize,
    host: usize,
}

fn layout(b: &Bundle) -> Layout {
    let leaf_len = b.leaf.encode().unwrap().len();
    let path = 8 + leaf_len + 1;
    let attest = path + 32 * b.path.len() + 2;
    let sig = attest + b.attest.len() + 2;
    let ak = sig + b.signature.len() + 2;
    let host = ak + b.ak_public.len();
    Layout {
        leaf: 8,
        leaf_len,
        path,
        attest,
        sig,
        ak,
        host,
    }
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).unwrap()
}

fn flip_everything(ak: Ak) {
    let bundle = batch(&ak, vec![request(1), request(2), request(3)], &host_pcrs()).remove(1);
    let e = Expectations::new(nonce(2), ak.public.clone());
    let bytes = bundle.encode().unwrap();
    check(&bytes, &e).unwrap();
    let l = layout(&bundle);
    assert_eq!(&bytes[l.ak..l.host], bundle.ak_public.as_slice());

    let bits = bytes.len() * 8;
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8);
    let results: Vec<(usize, Outcome)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..workers)
            .map(|w| {
                let (bytes, e) = (&bytes, &e);
                s.spawn(move || {
                    let mut out = Vec::new();
                    let mut m = bytes.clone();
                    for bit in (0..bits).filter(|b| b % workers == w) {
                        m[bit / 8] ^= 1 << (bit % 8);
                        match check(&m, e) {
                            Ok(()) => panic!(
                                "bit {bit} (byte {}) flipped and the bundle still verified",
                                bit / 8
                            ),
                            Err(o) => out.push((bit, o)),
                        }
                        m[bit / 8] ^= 1 << (bit % 8);
                    }
                    out
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.len(), bits);
    let at = |byte: usize| -> Vec<&Outcome> {
        results
            .iter()
            .filter(|(b, _)| b / 8 == byte)
            .map(|(_, o)| o)
            .collect()
    };
    let all = |byte: usize, what: &str, ok: &dyn Fn(&Outcome) -> bool| {
        for o in at(byte) {
            assert!(ok(o), "byte {byte} ({what}): unexpected {o:?}");
        }
    };

    // Framing.
    all(0, "magic", &|o| {
        matches!(o, Outcome::Decode(EvidenceError::BadMagic { .. }))
    });
    all(5, "bundle version", &|o| {
        matches!(
            o,
            Outcome::Decode(EvidenceError::UnsupportedVersion { what: "bundle", .. })
        )
    });
    all(l.leaf + 3, "leaf domain tag", &|o| {
        matches!(o, Outcome::Decode(EvidenceError::BadDomainTag))
    });
    // Leaf fields: the recomputed root no longer matches the signed one.
    let leaf = bundle.leaf.encode().unwrap();
    let uuid_at = l.leaf + find(&leaf, bundle.leaf.vtpm_uuid.as_bytes());
    let nonce_at = l.leaf + find(&leaf, &bundle.leaf.nonce);
    let flags_at = l.leaf + l.leaf_len - 12;
    let size_low = l.leaf + l.leaf_len - 1;
    for (byte, what) in [
        (uuid_at, "vTPM UUID"),
        (uuid_at + 15, "vTPM UUID"),
        (nonce_at, "nonce"),
        (nonce_at + 31, "nonce"),
        (flags_at + 3, "flags"),
        (l.leaf + 40, "vPCR value"),
    ] {
        all(byte, what, &|o| {
            matches!(o, Outcome::Verify(VerifyError::RootMismatch { .. }))
        });
    }
    all(size_low, "tree size", &|o| {
        matches!(
            o,
            Outcome::Decode(EvidenceError::Position { .. })
                | Outcome::Verify(VerifyError::RootMismatch { .. } | VerifyError::Inclusion(_))
        )
    });
    all(size_low - 4, "leaf index", &|o| {
        matches!(
            o,
            Outcome::Decode(EvidenceError::Position { .. })
                | Outcome::Verify(VerifyError::RootMismatch { .. } | VerifyError::Inclusion(_))
        )
    });
    // Path.
    for byte in [l.path, l.path + 31, l.path + 32 * bundle.path.len() - 1] {
        all(byte, "inclusion path", &|o| {
            matches!(o, Outcome::Verify(VerifyError::RootMismatch { .. }))
        });
    }
    // Signed bytes and signature.
    let clock_at = l.attest + find(&bundle.attest, &0x0000_0000_0123_4567u64.to_be_bytes());
    let extra_at = l.attest + find(&bundle.attest, &bundle.attest[40..72]);
    for (byte, what) in [
        (l.attest, "attest magic"),
        (clock_at + 7, "clock"),
        (extra_at + 5, "extraData"),
        (l.sig - 3, "pcrDigest"),
        (l.ak - 3, "signature"),
        (l.ak - 40, "signature"),
    ] {
        all(byte, what, &|o| {
            matches!(o, Outcome::Verify(VerifyError::Tpm(TpmsError::SignatureInvalid)))
        });
    }
    // AK: compared byte for byte before anything else.
    for byte in [l.ak, l.ak + 10, l.host - 1] {
        all(byte, "AK", &|o| {
            matches!(o, Outcome::Verify(VerifyError::AkMismatch))
        });
    }
    // Host PCRs.
    all(l.host + 7, "host PCR bitmap", &|o| {
        matches!(
            o,
            Outcome::Verify(VerifyError::HostPcrSelectionMismatch { .. })
        )
    });
    let first_value = l.host + find(&bytes[l.host..], &[0x10; 32]);
    for byte in [first_value, first_value + 31, bytes.len() - 1] {
        all(byte, "host PCR value", &|o| {
            matches!(o, Outcome::Verify(VerifyError::PcrDigestMismatch { .. }))
        });
    }

    let decode = results
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Decode(_)))
        .count();
    eprintln!(
        "{bits} flips of a {}-byte bundle: {decode} rejected by decode, {} by verify",
        bytes.len(),
        bits - decode
    );
}

#[test]
fn every_bit_flip_is_rejected_ecc() {
    flip_everything(Ak::ecc());
}

#[test]
fn every_bit_flip_is_rejected_rsa() {
    flip_everything(Ak::rsa());
}

#[test]
fn truncations_and_extensions_are_rejected() {
    let ak = Ak::ecc();
    let bundle = batch(&ak, vec![request(1), request(2)], &host_pcrs()).remove(0);
    let bytes = bundle.encode().unwrap();
    for cut in 0..bytes.len() {
        assert!(
            Bundle::decode(&bytes[..cut]).is_err(),
            "prefix of {cut} bytes decoded"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        Bundle::decode(&longer),
        Err(EvidenceError::TrailingBytes { .. })
    ));
}

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_inputs_never_panic() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let ak = Ak::ecc();
    let e = Expectations::new(nonce(1), ak.public.clone());
    let good = batch(&ak, vec![request(1), request(2), request(3)], &host_pcrs())
        .remove(0)
        .encode()
        .unwrap();
    for round in 0..30_000 {
        let len = (rng.next() % 1500) as usize;
        let mut buf: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if round % 2 == 0 && buf.len() >= 6 {
            buf[..6].copy_from_slice(b"XVDQ\x00\x01"); // get past the magic and version
        }
        if let Ok(b) = Bundle::decode(&buf) {
            let _ = verify(&b, &e);
        }
    }
    // Several random byte changes of a valid bundle: mostly decodes, then must not verify.
    for _ in 0..300 {
        let mut m = good.clone();
        for _ in 0..1 + rng.next() % 4 {
            let i = (rng.next() % m.len() as u64) as usize;
            m[i] = rng.next() as u8;
        }
        if m == good {
            continue;
        }
        if let Ok(b) = Bundle::decode(&m) {
            assert!(verify(&b, &e).is_err());
        }
    }
}
