//! Byte-exact deep-quote leaf and bundle encodings, their caps, and the worked
//! example of `docs/deep-quote.md` (run with `--nocapture` to print it).

mod verify_fixtures;

use uuid::Uuid;
use verify_fixtures::*;
use vtpm_proto::evidence::*;
use vtpm_proto::merkle::{self, Tree};

/// The worked example's leaf `n` (of 3).
fn example_leaf(n: u8) -> Leaf {
    Leaf {
        vtpm_uuid: Uuid::parse_str(&format!("0000000{n}-1111-4222-8333-444444444444")).unwrap(),
        group_uuid: Uuid::parse_str("99999999-aaaa-4bbb-8ccc-dddddddddddd").unwrap(),
        vpcr_selection: VpcrSelection {
            hash_alg: TPM_ALG_SHA256,
            pcrs: vec![0],
        },
        vpcr_values: vec![vec![n; 32]],
        nonce: format!("nonce-{n}").into_bytes(),
        flags: 0,
        position: LeafPosition {
            leaf_index: u32::from(n) - 1,
            tree_size: 3,
        },
    }
}

/// Values checked against an independent Python (hashlib) implementation.
const EXAMPLE_LEAF1: &str = "787674706d2d6465657071756f74652d6c6561662d76310000010000000111114222833344444444444499999999aaaa4bbb8cccdddddddddddd000b010000010020010101010101010101010101010101010101010101010101010101010101010100076e6f6e63652d31000000000000000000000003";
const EXAMPLE_LEAF_HASHES: [&str; 3] = [
    "79d4497b35f7a4b63f30226b9a5a1d09f48dd19bb9a9660e964093ef4ff2127f",
    "20d89a16696f7ce75c9bef7168b654b9515e9712551b3911923f83bf1a01f62e",
    "c781a038dabddd376f41d2e4690ce6faee3511cb5147a7bb45c2c88555c19cc9",
];
const EXAMPLE_NODE01: &str = "29957a4d7e7772c2f6b4b3e4975f94997678b048cf40c415559eda26139e55fd";
const EXAMPLE_ROOT: &str = "50fc6324c0ab1be6dd5e0321e3a56952ee58ef5e2a255a79484b5a1ccec4a768";

#[test]
fn worked_example() {
    let leaves: Vec<Leaf> = (1..=3).map(example_leaf).collect();
    let enc: Vec<Vec<u8>> = leaves.iter().map(|l| l.encode().unwrap()).collect();
    let tree = Tree::from_leaves(&enc);
    let proof = tree.inclusion_proof(0).unwrap();
    println!(
        "leaf[0] encoding ({} bytes): {}",
        enc[0].len(),
        hex::encode(&enc[0])
    );
    for (i, h) in tree.leaf_hashes().iter().enumerate() {
        println!("leaf hash[{i}]: {}", hex::encode(h));
    }
    let node01 = merkle::node_hash(&tree.leaf_hashes()[0], &tree.leaf_hashes()[1]);
    println!("node(leaf0,leaf1): {}", hex::encode(node01));
    println!("root: {}", hex::encode(tree.root()));
    for (i, p) in proof.iter().enumerate() {
        println!("proof[0][{i}]: {}", hex::encode(p));
    }
    assert_eq!(hex::encode(&enc[0]), EXAMPLE_LEAF1);
    assert_eq!(enc[0].len(), 119);
    for i in 0..3 {
        assert_eq!(hex::encode(tree.leaf_hashes()[i]), EXAMPLE_LEAF_HASHES[i]);
        assert_eq!(leaves[i].leaf_hash().unwrap(), tree.leaf_hashes()[i]);
    }
    assert_eq!(hex::encode(node01), EXAMPLE_NODE01);
    assert_eq!(hex::encode(tree.root()), EXAMPLE_ROOT);
    assert_eq!(
        proof.iter().map(hex::encode).collect::<Vec<_>>(),
        [EXAMPLE_LEAF_HASHES[1], EXAMPLE_LEAF_HASHES[2]]
    );
    merkle::verify_inclusion(&tree.leaf_hashes()[0], 0, 3, &proof, &tree.root()).unwrap();
    // Leaf 2 is promoted: its proof is the one node hash.
    assert_eq!(tree.inclusion_proof(2).unwrap(), vec![node01]);
    for l in &leaves {
        assert_eq!(&Leaf::decode(&l.encode().unwrap()).unwrap(), l);
    }
}

#[test]
fn leaf_round_trips_and_is_canonical() {
    let mut l = example_leaf(1);
    l.vpcr_selection = VpcrSelection {
        hash_alg: TPM_ALG_SHA384,
        pcrs: vec![0, 1, 2, 23],
    };
    l.vpcr_values = vec![vec![9; 48]; 4];
    l.nonce = vec![0xEE; MAX_NONCE];
    l.flags = 0xDEAD_BEEF;
    l.position = LeafPosition {
        leaf_index: u32::MAX - 1,
        tree_size: u32::MAX,
    };
    let enc = l.encode().unwrap();
    assert_eq!(Leaf::decode(&enc).unwrap(), l);
    // Empty selection and nonce are allowed.
    let mut e = example_leaf(1);
    e.vpcr_selection.pcrs.clear();
    e.vpcr_values.clear();
    e.nonce.clear();
    assert_eq!(Leaf::decode(&e.encode().unwrap()).unwrap(), e);
    // The largest leaf fits the cap.
    let mut big = example_leaf(1);
    big.vpcr_selection = VpcrSelection {
        hash_alg: TPM_ALG_SHA512,
        pcrs: (0..24).collect(),
    };
    big.vpcr_values = vec![vec![1; 64]; 24];
    big.nonce = vec![2; 64];
    assert!(big.encode().unwrap().len() <= MAX_LEAF_LEN);
    // Every truncation and any extension fails.
    for cut in 0..enc.len() {
        assert!(Leaf::decode(&enc[..cut]).is_err(), "cut {cut}");
    }
    let mut longer = enc.clone();
    longer.push(0);
    assert_eq!(
        Leaf::decode(&longer),
        Err(EvidenceError::TrailingBytes {
            what: "leaf",
            count: 1
        })
    );
}

#[test]
fn leaf_invariants_are_enforced_on_both_sides() {
    type Case = (fn(&mut Leaf), fn(&EvidenceError) -> bool);
    let cases: Vec<Case> = vec![
        (
            |l| l.nonce = vec![0; 65],
            |e| matches!(e, EvidenceError::TooLong { what: "nonce", .. }),
        ),
        (
            |l| l.vpcr_selection.pcrs = vec![24],
            |e| matches!(e, EvidenceError::VpcrIndex { index: 24, .. }),
        ),
        (
            |l| l.vpcr_selection.pcrs = vec![3, 3],
            |e| {
                matches!(
                    e,
                    EvidenceError::VpcrIndex {
                        index: 3,
                        position: 1
                    }
                )
            },
        ),
        (
            |l| l.vpcr_selection.pcrs = vec![5, 4],
            |e| matches!(e, EvidenceError::VpcrIndex { index: 4, .. }),
        ),
        (
            |l| l.vpcr_values.push(vec![0; 32]),
            |e| matches!(e, EvidenceError::CountMismatch { .. }),
        ),
        (
            |l| l.vpcr_values[0].pop().map(drop).unwrap_or(()),
            |e| {
                matches!(
                    e,
                    EvidenceError::ValueLength {
                        expected: 32,
                        got: 31,
                        ..
                    }
                )
            },
        ),
        (
            |l| l.vpcr_selection.hash_alg = 0x0012,
            |e| matches!(e, EvidenceError::UnknownHashAlg { alg: 0x0012, .. }),
        ),
        (
            |l| {
                l.position = LeafPosition {
                    leaf_index: 3,
                    tree_size: 3,
                }
            },
            |e| matches!(e, EvidenceError::Position { index: 3, size: 3 }),
        ),
        (
            |l| {
                l.position = LeafPosition {
                    leaf_index: 0,
                    tree_size: 0,
                }
            },
            |e| matches!(e, EvidenceError::Position { .. }),
        ),
    ];
    let good = example_leaf(1).encode().unwrap();
    for (i, (mutate, want)) in cases.into_iter().enumerate() {
        let mut l = example_leaf(1);
        mutate(&mut l);
        let err = l.encode().unwrap_err();
        assert!(want(&err), "case {i}: encode gave {err:?}");
        assert!(l.leaf_hash().is_err());
    }
    // Decode-side checks on hand-edited bytes.
    let edit = |at: usize, v: &[u8]| {
        let mut b = good.clone();
        b[at..at + v.len()].copy_from_slice(v);
        Leaf::decode(&b)
    };
    assert_eq!(edit(0, b"X"), Err(EvidenceError::BadDomainTag));
    assert_eq!(
        edit(24, &[0, 2]),
        Err(EvidenceError::UnsupportedVersion {
            what: "leaf",
            got: 2
        })
    );
    assert!(matches!(
        edit(58, &[0x00, 0x12]),
        Err(EvidenceError::UnknownHashAlg { .. })
    ));
    assert!(matches!(
        edit(60, &[25]),
        Err(EvidenceError::TooLong {
            what: "vPCR count",
            ..
        })
    ));
    assert!(matches!(
        edit(61, &[24]),
        Err(EvidenceError::VpcrIndex { index: 24, .. })
    ));
    assert!(matches!(
        edit(62, &[0, 2]),
        Err(EvidenceError::CountMismatch { .. })
    ));
    assert!(matches!(
        edit(64, &[0, 20]),
        Err(EvidenceError::ValueLength { .. })
    ));
    assert!(matches!(
        edit(98, &[0, 65]),
        Err(EvidenceError::TooLong { what: "nonce", .. })
    ));
    let n = good.len();
    assert!(matches!(
        edit(n - 8, &[0, 0, 0, 3]),
        Err(EvidenceError::Position { index: 3, size: 3 })
    ));
}

#[test]
fn bundle_layout_is_as_documented() {
    let ak = Ak::ecc();
    let b = batch(&ak, vec![request(1), request(2), request(3)], &host_pcrs()).remove(2);
    let enc = b.encode().unwrap();
    let leaf = b.leaf.encode().unwrap();
    assert_eq!(&enc[..6], b"XVDQ\x00\x01");
    assert_eq!(u16::from_be_bytes([enc[6], enc[7]]) as usize, leaf.len());
    assert_eq!(&enc[8..8 + leaf.len()], leaf.as_slice());
    let mut at = 8 + leaf.len();
    assert_eq!(enc[at] as usize, b.path.len());
    at += 1 + 32 * b.path.len();
    for blob in [&b.attest, &b.signature, &b.ak_public] {
        assert_eq!(
            u16::from_be_bytes([enc[at], enc[at + 1]]) as usize,
            blob.len()
        );
        assert_eq!(&enc[at + 2..at + 2 + blob.len()], blob.as_slice());
        at += 2 + blob.len();
    }
    let sel = encode_pcr_selection_list(&b.host_pcrs.selection).unwrap();
    assert_eq!(&enc[at..at + sel.len()], sel.as_slice());
    assert_eq!(
        sel,
        [
            0, 0, 0, 2, 0x00, 0x0B, 3, 0xff, 0, 0, 0x00, 0x04, 3, 1, 0, 0
        ]
    );
    at += sel.len();
    assert_eq!(u16::from_be_bytes([enc[at], enc[at + 1]]), 9);
    assert_eq!(Bundle::decode(&enc).unwrap(), b);
    assert_eq!(Bundle::decode(&enc).unwrap().encode().unwrap(), enc);
}

#[test]
fn bundle_caps_are_checked_before_allocation() {
    let ak = Ak::ecc();
    let b = batch(&ak, vec![request(1)], &host_pcrs()).remove(0);
    let enc = b.encode().unwrap();
    let leaf_len = b.leaf.encode().unwrap().len();
    // Leaf length above its cap.
    let mut m = enc.clone();
    m[6..8].copy_from_slice(&0xFFFFu16.to_be_bytes());
    assert!(matches!(
        Bundle::decode(&m),
        Err(EvidenceError::TooLong { what: "leaf", .. })
    ));
    // Path length above 32.
    let mut m = enc.clone();
    m[8 + leaf_len] = 33;
    assert!(matches!(
        Bundle::decode(&m),
        Err(EvidenceError::TooLong {
            what: "inclusion path",
            ..
        })
    ));
    // Path count within the cap but larger than the input.
    let mut m = enc.clone();
    m[8 + leaf_len] = 32;
    assert!(matches!(
        Bundle::decode(&m),
        Err(EvidenceError::Truncated { .. }) | Err(EvidenceError::TooLong { .. })
    ));
    // Attest length above its cap.
    let mut m = enc.clone();
    let at = 8 + leaf_len + 1;
    m[at..at + 2].copy_from_slice(&0x0801u16.to_be_bytes());
    assert!(matches!(
        Bundle::decode(&m),
        Err(EvidenceError::TooLong {
            what: "TPMS_ATTEST",
            len: 2049,
            ..
        })
    ));
    // Wrong magic and version.
    let mut m = enc.clone();
    m[0] = b'Y';
    assert!(matches!(
        Bundle::decode(&m),
        Err(EvidenceError::BadMagic { .. })
    ));
    let mut m = enc.clone();
    m[5] = 2;
    assert!(matches!(
        Bundle::decode(&m),
        Err(EvidenceError::UnsupportedVersion {
            what: "bundle",
            got: 2
        })
    ));
    // Encoding refuses what decoding would refuse.
    let mut big = b.clone();
    big.attest = vec![0; MAX_TPM_BLOB + 1];
    assert!(big.encode().is_err());
    let mut big = b.clone();
    big.path = vec![[0; 32]; 33];
    assert!(big.encode().is_err());
    let mut big = b.clone();
    big.host_pcrs.selection = vec![PcrSelection {
        hash_alg: TPM_ALG_SHA256,
        select: vec![0; 5],
    }];
    assert!(big.encode().is_err());
}

#[test]
fn pcr_selection_indices_are_in_bitmap_order() {
    let s = PcrSelection {
        hash_alg: TPM_ALG_SHA256,
        select: vec![0b1000_0001, 0, 0b0000_0100],
    };
    assert_eq!(s.indices().collect::<Vec<_>>(), [0, 7, 18]);
}
