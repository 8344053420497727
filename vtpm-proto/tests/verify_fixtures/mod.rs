//! Test fixtures shared by the `verify_*` and `evidence_*` tests: software AKs
//! (P-256 and RSA-2048) and hand-marshalled TPMS_ATTEST / TPMT_SIGNATURE /
//! TPMT_PUBLIC, so that bundles look like a real TPM's without a TPM.
//! Bundles from a real (software or physical) TPM are tested end to end in the
//! manager's integration tests, not here.
#![allow(dead_code)]

use p256::ecdsa::signature::Signer as _;
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::traits::PublicKeyParts;
use uuid::Uuid;
use vtpm_proto::evidence::{
    Bundle, HostPcrs, Leaf, LeafPosition, PcrSelection, TPM_ALG_SHA1, TPM_ALG_SHA256,
    VpcrSelection, encode_pcr_selection_list, pcr_digest_sha256,
};
use vtpm_proto::merkle::Tree;

/// fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | restricted | sign.
pub const AK_ATTRIBUTES: u32 = 0x0005_0072;

pub const RSA_PEM: &str = include_str!("rsa2048.pem");

pub fn tpm2b(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
}

fn strip(b: &[u8]) -> &[u8] {
    let z = b.iter().take_while(|&&x| x == 0).count();
    &b[z..]
}

pub enum Key {
    Ecc(p256::ecdsa::SigningKey),
    Rsa(Box<rsa::pkcs1v15::SigningKey<sha2::Sha256>>),
}

/// A software attestation key with its TPMT_PUBLIC.
pub struct Ak {
    pub key: Key,
    pub public: Vec<u8>,
}

pub fn ecc_public(x: &[u8], y: &[u8], attributes: u32) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&0x0023u16.to_be_bytes()); // TPM_ALG_ECC
    p.extend_from_slice(&0x000Bu16.to_be_bytes()); // nameAlg SHA256
    p.extend_from_slice(&attributes.to_be_bytes());
    tpm2b(&mut p, &[]); // authPolicy
    p.extend_from_slice(&0x0010u16.to_be_bytes()); // symmetric NULL
    p.extend_from_slice(&0x0018u16.to_be_bytes()); // ECDSA
    p.extend_from_slice(&0x000Bu16.to_be_bytes()); // SHA256
    p.extend_from_slice(&0x0003u16.to_be_bytes()); // NIST P-256
    p.extend_from_slice(&0x0010u16.to_be_bytes()); // kdf NULL
    tpm2b(&mut p, strip(x)); // a TPM may drop leading zero bytes
    tpm2b(&mut p, strip(y));
    p
}

pub fn rsa_public(n: &[u8], attributes: u32) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&0x0001u16.to_be_bytes()); // TPM_ALG_RSA
    p.extend_from_slice(&0x000Bu16.to_be_bytes());
    p.extend_from_slice(&attributes.to_be_bytes());
    tpm2b(&mut p, &[]);
    p.extend_from_slice(&0x0010u16.to_be_bytes()); // symmetric NULL
    p.extend_from_slice(&0x0014u16.to_be_bytes()); // RSASSA
    p.extend_from_slice(&0x000Bu16.to_be_bytes()); // SHA256
    p.extend_from_slice(&2048u16.to_be_bytes());
    p.extend_from_slice(&0u32.to_be_bytes()); // exponent 0 = 65537
    tpm2b(&mut p, n);
    p
}

impl Ak {
    /// A P-256 AK from a fixed scalar.
    pub fn ecc_from_scalar(scalar: u64) -> Ak {
        let mut d = [0u8; 32];
        d[24..].copy_from_slice(&scalar.to_be_bytes());
        d[0] = 0x5a;
        let sk = p256::ecdsa::SigningKey::from_bytes(&d.into()).unwrap();
        let pt = sk.verifying_key().to_encoded_point(false);
        let public = ecc_public(pt.x().unwrap(), pt.y().unwrap(), AK_ATTRIBUTES);
        Ak {
            key: Key::Ecc(sk),
            public,
        }
    }

    pub fn ecc() -> Ak {
        Ak::ecc_from_scalar(0x1234_5678)
    }

    pub fn rsa() -> Ak {
        let sk = rsa::RsaPrivateKey::from_pkcs1_pem(RSA_PEM).unwrap();
        let public = rsa_public(&sk.n().to_bytes_be(), AK_ATTRIBUTES);
        Ak {
            key: Key::Rsa(Box::new(rsa::pkcs1v15::SigningKey::new(sk))),
            public,
        }
    }

    /// TPMT_SIGNATURE over `msg` (r and s with leading zeros dropped, as a TPM may).
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        match &self.key {
            Key::Ecc(sk) => {
                let sig: p256::ecdsa::Signature = sk.sign(msg);
                let (r, s) = sig.split_bytes();
                out.extend_from_slice(&0x0018u16.to_be_bytes());
                out.extend_from_slice(&0x000Bu16.to_be_bytes());
                tpm2b(&mut out, strip(&r));
                tpm2b(&mut out, strip(&s));
            }
            Key::Rsa(sk) => {
                use rsa::signature::{SignatureEncoding, Signer};
                let sig = sk.sign(msg);
                out.extend_from_slice(&0x0014u16.to_be_bytes());
                out.extend_from_slice(&0x000Bu16.to_be_bytes());
                tpm2b(&mut out, &sig.to_vec());
            }
        }
        out
    }
}

/// TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE, as TPM2_Quote marshals it.
pub fn quote_attest_with(
    magic: u32,
    ty: u16,
    extra_data: &[u8],
    sel: &[PcrSelection],
    pcr_digest: &[u8],
) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&magic.to_be_bytes());
    a.extend_from_slice(&ty.to_be_bytes());
    let mut name = vec![0x00, 0x0B];
    name.extend_from_slice(&[0x42; 32]);
    tpm2b(&mut a, &name); // qualifiedSigner
    tpm2b(&mut a, extra_data);
    a.extend_from_slice(&0x0000_0000_0123_4567u64.to_be_bytes()); // clock
    a.extend_from_slice(&7u32.to_be_bytes()); // resetCount
    a.extend_from_slice(&3u32.to_be_bytes()); // restartCount
    a.push(1); // safe
    a.extend_from_slice(&0x2023_0101_0000_0001u64.to_be_bytes()); // firmwareVersion
    a.extend_from_slice(&encode_pcr_selection_list(sel).unwrap());
    tpm2b(&mut a, pcr_digest);
    a
}

pub fn quote_attest(extra_data: &[u8], host: &HostPcrs) -> Vec<u8> {
    quote_attest_with(
        0xff54_4347,
        0x8018,
        extra_data,
        &host.selection,
        &pcr_digest_sha256(&host.values),
    )
}

/// SHA-256 PCRs 0–7 and SHA-1 PCR 0, with distinct values.
pub fn host_pcrs() -> HostPcrs {
    let mut values: Vec<Vec<u8>> = (0..8u8).map(|i| vec![0x10 + i; 32]).collect();
    values.push(vec![0xA0; 20]);
    HostPcrs {
        selection: vec![
            PcrSelection {
                hash_alg: TPM_ALG_SHA256,
                select: vec![0xff, 0x00, 0x00],
            },
            PcrSelection {
                hash_alg: TPM_ALG_SHA1,
                select: vec![0x01, 0x00, 0x00],
            },
        ],
        values,
    }
}

pub fn uuid(n: u8) -> Uuid {
    Uuid::from_bytes([
        n, 0x11, 0x22, 0x33, 0x44, 0x55, 0x46, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, n,
    ])
}

pub fn nonce(n: u8) -> Vec<u8> {
    (0..32).map(|i| i ^ n).collect()
}

/// A request from vTPM `n` with vPCRs 0 and 7 (SHA-256); position filled in by [`batch`].
pub fn request(n: u8) -> Leaf {
    Leaf {
        vtpm_uuid: uuid(n),
        group_uuid: uuid(0xF0),
        vpcr_selection: VpcrSelection {
            hash_alg: TPM_ALG_SHA256,
            pcrs: vec![0, 7],
        },
        vpcr_values: vec![vec![n; 32], vec![0x77; 32]],
        nonce: nonce(n),
        flags: 0x0000_0001,
        position: LeafPosition {
            leaf_index: 0,
            tree_size: 1,
        },
    }
}

/// What the manager does for one physical quote: position the requests, build
/// the tree, quote its root, and hand each caller a bundle.
pub fn batch(ak: &Ak, mut requests: Vec<Leaf>, host: &HostPcrs) -> Vec<Bundle> {
    let n = requests.len() as u32;
    for (i, r) in requests.iter_mut().enumerate() {
        r.position = LeafPosition {
            leaf_index: i as u32,
            tree_size: n,
        };
    }
    let encodings: Vec<Vec<u8>> = requests.iter().map(|r| r.encode().unwrap()).collect();
    let tree = Tree::from_leaves(&encodings);
    let attest = quote_attest(&tree.root(), host);
    let signature = ak.sign(&attest);
    requests
        .into_iter()
        .enumerate()
        .map(|(i, leaf)| Bundle {
            leaf,
            path: tree.inclusion_proof(i).unwrap(),
            attest: attest.clone(),
            signature: signature.clone(),
            ak_public: ak.public.clone(),
            host_pcrs: host.clone(),
        })
        .collect()
}

/// Re-sign a bundle after changing its attest (to reach checks past the signature).
pub fn resign(ak: &Ak, b: &mut Bundle) {
    b.signature = ak.sign(&b.attest);
}
