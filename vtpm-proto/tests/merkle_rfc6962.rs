//! RFC 6962 / RFC 9162 Merkle tree: Certificate Transparency vectors, every
//! proof of every tree up to 1025 leaves, and rejection of wrong positions.

use vtpm_proto::merkle::{self, Hash, MerkleError, Tree};

fn h(s: &str) -> Hash {
    hex::decode(s).unwrap().try_into().unwrap()
}

/// Leaf inputs of the Certificate Transparency test data (transparency-dev/merkle
/// `testonly/constants.go`, google/certificate-transparency `merkle_tree_test`).
const CT_LEAVES: [&str; 8] = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
];

/// Roots for tree sizes 0..=8 over `CT_LEAVES`.
const CT_ROOTS: [&str; 9] = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
];

fn ct_leaves() -> Vec<Vec<u8>> {
    CT_LEAVES.iter().map(|s| hex::decode(s).unwrap()).collect()
}

/// RFC 6962 §2.1 `MTH`, written recursively as the RFC states it: the oracle.
fn mth(leaf_hashes: &[Hash]) -> Hash {
    match leaf_hashes.len() {
        0 => merkle::empty_root(),
        1 => leaf_hashes[0],
        n => {
            let k = split(n);
            merkle::node_hash(&mth(&leaf_hashes[..k]), &mth(&leaf_hashes[k..]))
        }
    }
}

/// RFC 6962 §2.1.1 `PATH`, recursively: the oracle.
fn path(m: usize, leaf_hashes: &[Hash]) -> Vec<Hash> {
    let n = leaf_hashes.len();
    if n <= 1 {
        return Vec::new();
    }
    let k = split(n);
    if m < k {
        let mut p = path(m, &leaf_hashes[..k]);
        p.push(mth(&leaf_hashes[k..]));
        p
    } else {
        let mut p = path(m - k, &leaf_hashes[k..]);
        p.push(mth(&leaf_hashes[..k]));
        p
    }
}

/// Largest power of two strictly below `n` (n ≥ 2).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

#[test]
fn ct_roots_for_every_prefix() {
    let leaves = ct_leaves();
    for n in 0..=8 {
        assert_eq!(
            hex::encode(merkle::root(&leaves[..n])),
            CT_ROOTS[n],
            "root of the first {n} CT leaves"
        );
    }
    assert_eq!(merkle::root::<&[u8]>(&[]), merkle::empty_root());
}

#[test]
fn ct_inclusion_vectors() {
    // transparency-dev/merkle proof/verify_test.go `inclusionProofs` (1-based leaf numbers there).
    let vectors: [(usize, usize, &[&str]); 4] = [
        (
            0,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            5,
            8,
            &[
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            3,
            &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
        ),
        (
            1,
            5,
            &[
                "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
    ];
    let leaves = ct_leaves();
    for (index, size, want) in vectors {
        let want: Vec<Hash> = want.iter().map(|s| h(s)).collect();
        let got = merkle::inclusion_proof(&leaves[..size], index).unwrap();
        assert_eq!(got, want, "PATH({index}, D[{size}])");
        let lh = merkle::leaf_hash(&leaves[index]);
        merkle::verify_inclusion(&lh, index as u64, size as u64, &want, &h(CT_ROOTS[size]))
            .unwrap();
    }
    // Single-leaf tree: empty proof, root is the leaf hash.
    let lh = merkle::leaf_hash(b"data");
    merkle::verify_inclusion(&lh, 0, 1, &[], &lh).unwrap();
}

#[test]
fn bottom_up_tree_equals_rfc_recursion() {
    for n in 0..=130usize {
        let hashes: Vec<Hash> = (0..n)
            .map(|i| merkle::leaf_hash(&(i as u32).to_be_bytes()))
            .collect();
        let tree = Tree::from_leaf_hashes(hashes.clone());
        assert_eq!(tree.root(), mth(&hashes), "root n={n}");
        for m in 0..n {
            assert_eq!(
                tree.inclusion_proof(m).unwrap(),
                path(m, &hashes),
                "PATH({m}, D[{n}])"
            );
        }
    }
}

/// Every leaf of every tree size 1..=1025 has a proof of the predicted length
/// that verifies. One tree per size; proofs are read off it in O(log n); the
/// sizes are shared out over the available cores (≈5 M node hashes in all).
#[test]
fn every_proof_of_every_tree_up_to_1025_verifies() {
    const MAX: usize = 1025;
    let all: Vec<Hash> = (0..MAX)
        .map(|i| merkle::leaf_hash(&(i as u32).to_be_bytes()))
        .collect();
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8);
    let checked: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let all = &all;
                s.spawn(move || {
                    let mut checked = 0usize;
                    // Interleave sizes so every worker gets a similar share of the work.
                    for n in (1..=MAX).filter(|n| n % workers == w) {
                        let tree = Tree::from_leaf_hashes(all[..n].to_vec());
                        let root = tree.root();
                        for (i, lh) in all[..n].iter().enumerate() {
                            let proof = tree.inclusion_proof(i).unwrap();
                            assert_eq!(proof.len(), merkle::proof_len(i as u64, n as u64).unwrap());
                            merkle::verify_inclusion(lh, i as u64, n as u64, &proof, &root)
                                .unwrap_or_else(|e| panic!("leaf {i} of {n}: {e}"));
                            checked += 1;
                        }
                        assert!(matches!(
                            tree.inclusion_proof(n),
                            Err(MerkleError::IndexOutOfRange { .. })
                        ));
                    }
                    checked
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(checked, MAX * (MAX + 1) / 2);
}

#[test]
fn proof_for_leaf_i_fails_at_every_other_index() {
    for n in 1..=40usize {
        let hashes: Vec<Hash> = (0..n)
            .map(|i| merkle::leaf_hash(&[i as u8, 0xA5]))
            .collect();
        let tree = Tree::from_leaf_hashes(hashes.clone());
        let root = tree.root();
        for i in 0..n {
            let proof = tree.inclusion_proof(i).unwrap();
            for j in 0..n as u64 + 3 {
                if j == i as u64 {
                    continue;
                }
                // Same leaf hash at another index, and the other index's own leaf with i's proof.
                assert!(
                    merkle::verify_inclusion(&hashes[i], j, n as u64, &proof, &root).is_err(),
                    "leaf {i} of {n} verified at {j}"
                );
                if let Some(other) = hashes.get(j as usize) {
                    assert!(merkle::verify_inclusion(other, j, n as u64, &proof, &root).is_err());
                }
            }
        }
    }
}

#[test]
#[allow(clippy::needless_range_loop)]
fn proof_for_size_n_fails_in_a_tree_of_another_size() {
    let hashes: Vec<Hash> = (0..80u32)
        .map(|i| merkle::leaf_hash(&i.to_le_bytes()))
        .collect();
    let trees: Vec<Tree> = (0..=80)
        .map(|n| Tree::from_leaf_hashes(hashes[..n].to_vec()))
        .collect();
    for n in 1..=64usize {
        for i in 0..n {
            let proof = trees[n].inclusion_proof(i).unwrap();
            for m in (i + 1)..=80 {
                if m == n {
                    continue;
                }
                // Against the real root of the m-leaf tree over the same leaves.
                let r = merkle::verify_inclusion(
                    &hashes[i],
                    i as u64,
                    m as u64,
                    &proof,
                    &trees[m].root(),
                );
                assert!(
                    r.is_err(),
                    "leaf {i}: proof for size {n} verified in the tree of size {m}"
                );
                // Against the n-leaf root, a size whose proof shape differs is refused.
                if merkle::proof_len(i as u64, m as u64).unwrap() != proof.len() {
                    let r = merkle::verify_inclusion(
                        &hashes[i],
                        i as u64,
                        m as u64,
                        &proof,
                        &trees[n].root(),
                    );
                    assert!(
                        matches!(r, Err(MerkleError::WrongProofLength { .. })),
                        "{r:?}"
                    );
                }
            }
        }
    }
}

/// The limit of what an RFC 9162 inclusion proof binds: leaf 0's proof in a
/// 5-leaf tree has the same shape as in a 6-leaf tree, so (0, 6, proof₅, root₅)
/// passes. The deep-quote leaf therefore carries its own index and tree size.
#[test]
fn tree_size_is_not_bound_by_the_proof_alone() {
    let hashes: Vec<Hash> = (0..6u8).map(|i| merkle::leaf_hash(&[i])).collect();
    let t5 = Tree::from_leaf_hashes(hashes[..5].to_vec());
    let p = t5.inclusion_proof(0).unwrap();
    merkle::verify_inclusion(&hashes[0], 0, 5, &p, &t5.root()).unwrap();
    merkle::verify_inclusion(&hashes[0], 0, 6, &p, &t5.root()).unwrap();
    assert!(merkle::verify_inclusion(&hashes[0], 0, 4, &p, &t5.root()).is_err());
}

#[test]
fn malformed_proofs_are_rejected() {
    let leaves = ct_leaves();
    let tree = Tree::from_leaves(&leaves);
    let root = tree.root();
    let lh = merkle::leaf_hash(&leaves[5]);
    let proof = tree.inclusion_proof(5).unwrap();
    merkle::verify_inclusion(&lh, 5, 8, &proof, &root).unwrap();

    assert_eq!(
        merkle::verify_inclusion(&lh, 8, 8, &proof, &root),
        Err(MerkleError::IndexOutOfRange { index: 8, size: 8 })
    );
    assert_eq!(
        merkle::verify_inclusion(&lh, 0, 0, &[], &root),
        Err(MerkleError::IndexOutOfRange { index: 0, size: 0 })
    );
    assert!(matches!(
        merkle::verify_inclusion(&lh, 5, 8, &proof[..2], &root),
        Err(MerkleError::WrongProofLength {
            expected: 3,
            got: 2,
            ..
        })
    ));
    let mut longer = proof.clone();
    longer.push(root);
    assert!(matches!(
        merkle::verify_inclusion(&lh, 5, 8, &longer, &root),
        Err(MerkleError::WrongProofLength {
            expected: 3,
            got: 4,
            ..
        })
    ));
    let mut prepended = vec![root];
    prepended.extend_from_slice(&proof);
    assert!(merkle::verify_inclusion(&lh, 5, 8, &prepended, &root).is_err());
    for k in 0..proof.len() {
        for bit in 0..256 {
            let mut bad = proof.clone();
            bad[k][bit / 8] ^= 1 << (bit % 8);
            assert!(matches!(
                merkle::verify_inclusion(&lh, 5, 8, &bad, &root),
                Err(MerkleError::RootMismatch { .. })
            ));
        }
    }
    assert!(matches!(
        merkle::verify_inclusion(&merkle::leaf_hash(b"x"), 5, 8, &proof, &root),
        Err(MerkleError::RootMismatch { .. })
    ));
    assert!(matches!(
        merkle::verify_inclusion(&lh, 5, 8, &proof, &merkle::empty_root()),
        Err(MerkleError::RootMismatch { .. })
    ));
    // Huge indices and sizes do not overflow.
    assert!(merkle::verify_inclusion(&lh, u64::MAX - 1, u64::MAX, &proof, &root).is_err());
    assert_eq!(merkle::proof_len(u64::MAX - 1, u64::MAX).unwrap(), 63);
    assert!(merkle::inclusion_proof(&leaves, 8).is_err());
}

#[test]
fn leaf_and_node_hashes_are_domain_separated() {
    // An interior node's preimage presented as a leaf does not hash to the node.
    let a = merkle::leaf_hash(b"a");
    let b = merkle::leaf_hash(b"b");
    let mut concat = a.to_vec();
    concat.extend_from_slice(&b);
    assert_ne!(merkle::leaf_hash(&concat), merkle::node_hash(&a, &b));
}
