//! RFC 6962 / RFC 9162 Merkle tree over SHA-256, as used to batch deep quotes.
//!
//! * leaf hash `MTH({d}) = SHA-256(0x00 ‖ d)`
//! * interior node `SHA-256(0x01 ‖ left ‖ right)`
//! * a tree of `n > 1` leaves splits at `k`, the largest power of two `< n`:
//!   `MTH(D[0:n]) = node(MTH(D[0:k]), MTH(D[k:n]))`
//! * the empty tree hashes to `SHA-256("")`
//!
//! The tree is built bottom-up (pairs hashed, a lone last node promoted
//! unchanged), which gives exactly the RFC 6962 shape, in `O(n)` hashes; an
//! inclusion proof is then read off in `O(log n)`. Proofs are RFC 6962 `PATH`
//! (bottom-up sibling hashes) and are checked with the RFC 9162 §2.1.3.2
//! algorithm.
//!
//! Note what an inclusion proof does and does not bind: for a fixed tree size
//! the leaf index is bound, but the tree size is only bound as far as it changes
//! the proof's shape (for example leaf 0's proof in a 5-leaf tree also "verifies"
//! as a proof in a 6-leaf tree against the 5-leaf root). A format that needs the
//! size authenticated must commit to it elsewhere; the deep-quote leaf does (see
//! [`crate::evidence`]).

use sha2::{Digest, Sha256};

/// A SHA-256 value (leaf hash, node hash, root).
pub type Hash = [u8; 32];

/// Domain-separation prefix of a leaf hash.
pub const LEAF_PREFIX: u8 = 0x00;
/// Domain-separation prefix of an interior-node hash.
pub const NODE_PREFIX: u8 = 0x01;

/// Why an inclusion proof or a request for one was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MerkleError {
    /// The leaf index is not inside the tree.
    #[error("leaf index {index} is not below tree size {size}")]
    IndexOutOfRange {
        /// Leaf index asked for.
        index: u64,
        /// Number of leaves in the tree.
        size: u64,
    },
    /// The proof has a different number of hashes than `(index, size)` requires.
    #[error("inclusion proof for leaf {index} of {size} needs {expected} hashes, got {got}")]
    WrongProofLength {
        /// Leaf index.
        index: u64,
        /// Tree size.
        size: u64,
        /// Proof length the shape requires.
        expected: usize,
        /// Proof length supplied.
        got: usize,
    },
    /// The proof is well formed but leads to a different root.
    #[error("inclusion proof leads to root {computed}, expected {expected}", computed = hex::encode(.computed), expected = hex::encode(.expected))]
    RootMismatch {
        /// Root recomputed from leaf hash and proof.
        computed: Hash,
        /// Root the caller expected.
        expected: Hash,
    },
}

/// `SHA-256(0x00 ‖ data)`: the hash of one leaf.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([LEAF_PREFIX]);
    h.update(data);
    h.finalize().into()
}

/// `SHA-256(0x01 ‖ left ‖ right)`: the hash of an interior node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([NODE_PREFIX]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// `SHA-256("")`, the root of the empty tree.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// A whole tree held in memory, level by level, so that every leaf's proof can
/// be read off without rehashing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    /// `levels[0]` are the leaf hashes; each next level halves (rounding up);
    /// the last level holds the root. Empty for the empty tree.
    levels: Vec<Vec<Hash>>,
}

impl Tree {
    /// Builds the tree over leaf *data* (each is hashed with the 0x00 prefix).
    pub fn from_leaves<T: AsRef<[u8]>>(leaves: &[T]) -> Self {
        Self::from_leaf_hashes(leaves.iter().map(|l| leaf_hash(l.as_ref())).collect())
    }

    /// Builds the tree over already-computed leaf hashes.
    pub fn from_leaf_hashes(leaf_hashes: Vec<Hash>) -> Self {
        if leaf_hashes.is_empty() {
            return Tree { levels: Vec::new() };
        }
        let mut levels = vec![leaf_hashes];
        while let Some(prev) = levels.last().filter(|l| l.len() > 1) {
            let next: Vec<Hash> = prev
                .chunks(2)
                .map(|pair| match pair {
                    [l, r] => node_hash(l, r),
                    // A lone last node is promoted unchanged: this is what makes the
                    // bottom-up build equal RFC 6962's "split at the largest power of two".
                    [only] => *only,
                    _ => unreachable!("chunks(2) yields 1 or 2 items"),
                })
                .collect();
            levels.push(next);
        }
        Tree { levels }
    }

    /// Number of leaves.
    pub fn size(&self) -> usize {
        self.levels.first().map_or(0, Vec::len)
    }

    /// The leaf hashes, in order.
    pub fn leaf_hashes(&self) -> &[Hash] {
        self.levels.first().map_or(&[], Vec::as_slice)
    }

    /// The Merkle tree head (root hash).
    pub fn root(&self) -> Hash {
        match self.levels.last() {
            Some(top) => top[0],
            None => empty_root(),
        }
    }

    /// RFC 6962 `PATH(index, D[n])`: sibling hashes from the leaf upwards.
    pub fn inclusion_proof(&self, index: usize) -> Result<Vec<Hash>, MerkleError> {
        let size = self.size();
        if index >= size {
            return Err(MerkleError::IndexOutOfRange {
                index: index as u64,
                size: size as u64,
            });
        }
        let mut proof = Vec::with_capacity(self.levels.len());
        let mut i = index;
        for level in &self.levels[..self.levels.len() - 1] {
            let sibling = i ^ 1;
            // No sibling means this node was promoted: it contributes no hash here.
            if let Some(h) = level.get(sibling) {
                proof.push(*h);
            }
            i >>= 1;
        }
        Ok(proof)
    }
}

/// The root over leaf data: `MTH(D[n])`.
pub fn root<T: AsRef<[u8]>>(leaves: &[T]) -> Hash {
    Tree::from_leaves(leaves).root()
}

/// The inclusion proof (RFC 6962 `PATH`) of leaf `index` in the tree over `leaves`.
///
/// Builds the whole tree; to prove many leaves of one tree, build a [`Tree`] once.
pub fn inclusion_proof<T: AsRef<[u8]>>(
    leaves: &[T],
    index: usize,
) -> Result<Vec<Hash>, MerkleError> {
    if index >= leaves.len() {
        return Err(MerkleError::IndexOutOfRange {
            index: index as u64,
            size: leaves.len() as u64,
        });
    }
    Tree::from_leaves(leaves).inclusion_proof(index)
}

/// Number of hashes in the inclusion proof of leaf `index` in a tree of `size`
/// leaves (RFC 9162 §2.1.3.2: `inner + border`).
pub fn proof_len(index: u64, size: u64) -> Result<usize, MerkleError> {
    if index >= size {
        return Err(MerkleError::IndexOutOfRange { index, size });
    }
    let last = size - 1;
    // Levels where the path to `index` and the path to the last leaf have split.
    let inner = (u64::BITS - (index ^ last).leading_zeros()) as usize;
    // Above that, the path runs along the right border; each 1 bit is a left sibling.
    let border = (index >> inner).count_ones() as usize;
    Ok(inner + border)
}

/// Recomputes the root from a leaf hash and its inclusion proof
/// (RFC 9162 §2.1.3.2 steps 1–4, plus the explicit length check).
pub fn root_from_inclusion(
    leaf_hash: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
) -> Result<Hash, MerkleError> {
    let expected = proof_len(index, size)?;
    if proof.len() != expected {
        return Err(MerkleError::WrongProofLength {
            index,
            size,
            expected,
            got: proof.len(),
        });
    }
    let mut fn_ = index;
    let mut sn = size - 1;
    let mut r = *leaf_hash;
    for p in proof {
        if sn == 0 {
            // Unreachable after the length check; kept as the RFC states it.
            return Err(MerkleError::WrongProofLength {
                index,
                size,
                expected,
                got: proof.len(),
            });
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(MerkleError::WrongProofLength {
            index,
            size,
            expected,
            got: proof.len(),
        });
    }
    Ok(r)
}

/// RFC 9162 §2.1.3.2: checks that `leaf_hash` is leaf `index` of the tree of
/// `size` leaves whose root is `root`.
pub fn verify_inclusion(
    leaf_hash: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), MerkleError> {
    let computed = root_from_inclusion(leaf_hash, index, size, proof)?;
    if computed != *root {
        return Err(MerkleError::RootMismatch {
            computed,
            expected: *root,
        });
    }
    Ok(())
}
