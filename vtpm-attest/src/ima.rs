//! A guest's IMA runtime measurement log (Linux `binary_runtime_measurements`) replayed to the
//! SHA-256 PCR values a deep quote carries for the guest's vTPM.
//!
//! Each entry is: PCR index (u32), the SHA-1 template digest (20 bytes), the template name's
//! length (u32) and name, the template data's length (u32) and data; integers little-endian (x86
//! guests, and every guest booted with `ima_canonical_fmt`). For a SHA-256 bank the kernel
//! extends the PCR with SHA-256 of the template data (not with the SHA-1 digest the log carries),
//! so the replay hashes the data itself. The legacy `ima` template, whose digest is computed over
//! a padded name instead, is refused.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

/// The largest log read: a busy guest's log grows without bound; one this large is not
/// something a verifier should replay in memory.
pub const MAX_LOG: usize = 64 << 20;
/// The most entries replayed.
pub const MAX_ENTRIES: usize = 1 << 20;
/// The kernel's limit on a template name (`IMA_TEMPLATE_NAME_LEN_MAX` is far below it).
const MAX_NAME: usize = 255;
/// The most template data one entry carries (the kernel's `MAX_TEMPLATE_DATA_LEN` bound, with room).
const MAX_DATA: usize = 1 << 20;

/// Why a log was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImaError {
    /// Larger than [`MAX_LOG`].
    #[error("IMA log is {0} bytes, more than the {MAX_LOG}-byte limit")]
    TooLarge(usize),
    /// More than [`MAX_ENTRIES`] entries.
    #[error("IMA log has more than {MAX_ENTRIES} entries")]
    TooManyEntries,
    /// A length runs past the end or is out of bounds.
    #[error("not an IMA binary_runtime_measurements log: entry {entry} at byte {offset}: {what}")]
    Malformed {
        /// Entry index.
        entry: usize,
        /// Byte offset of the entry.
        offset: usize,
        /// What was wrong.
        what: String,
    },
    /// An entry whose SHA-1 template digest is not SHA-1 of its data.
    #[error("IMA log entry {entry} ({name}): its template digest is not SHA-1 of its template data (an edited entry)")]
    DigestMismatch {
        /// Entry index.
        entry: usize,
        /// The measured file's name, if the template carries one.
        name: String,
    },
    /// No entry at all: IMA without a TPM (TPM-bypass) still logs `boot_aggregate`.
    #[error("the IMA log is empty (even a guest in TPM-bypass logs boot_aggregate)")]
    Empty,
}

/// One entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImaEntry {
    /// The PCR it was extended into (10 unless the kernel was configured otherwise).
    pub pcr: u32,
    /// Template name (`ima-ng`, `ima-sig`, …).
    pub template: String,
    /// The file's digest as the template records it (`sha256:…`), if the template has one.
    pub file_digest: Option<String>,
    /// The file name, if the template has one.
    pub file_name: Option<String>,
    /// SHA-256 of the template data: what the kernel extended into the SHA-256 bank.
    pub sha256: [u8; 32],
}

/// A parsed log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImaLog {
    /// Entries in log order.
    pub entries: Vec<ImaEntry>,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

/// The `d-ng` (digest) and `n-ng` (name) fields of an `ima-ng`-style template's data: each
/// field is a u32 length and its bytes.
fn ng_fields(data: &[u8]) -> (Option<String>, Option<String>) {
    let mut fields = Vec::new();
    let mut at = 0;
    while let Some(len) = u32_at(data, at) {
        let Some(f) = data.get(at + 4..at + 4 + len as usize) else { break };
        fields.push(f);
        at += 4 + len as usize;
        if fields.len() == 2 {
            break;
        }
    }
    let digest = fields.first().and_then(|d| {
        let sep = d.iter().position(|&c| c == 0)?;
        let alg = std::str::from_utf8(d[..sep].strip_suffix(b":")?).ok()?;
        Some(format!("{alg}:{}", hex::encode(&d[sep + 1..])))
    });
    let name = fields.get(1).map(|n| String::from_utf8_lossy(n.strip_suffix(b"\0").unwrap_or(n)).into_owned());
    (digest, name)
}

impl ImaLog {
    /// Parses `binary_runtime_measurements`; every length is checked before it is used.
    pub fn parse(b: &[u8]) -> Result<ImaLog, ImaError> {
        if b.len() > MAX_LOG {
            return Err(ImaError::TooLarge(b.len()));
        }
        let mut entries = Vec::new();
        let mut at = 0;
        while at < b.len() {
            let entry = entries.len();
            if entry >= MAX_ENTRIES {
                return Err(ImaError::TooManyEntries);
            }
            let bad = |what: &str| ImaError::Malformed { entry, offset: at, what: what.into() };
            let pcr = u32_at(b, at).ok_or_else(|| bad("truncated PCR index"))?;
            let sha1 = b.get(at + 4..at + 24).ok_or_else(|| bad("truncated template digest"))?;
            let name_len = u32_at(b, at + 24).ok_or_else(|| bad("truncated template name length"))? as usize;
            if name_len == 0 || name_len > MAX_NAME {
                return Err(bad(&format!("template name length {name_len}")));
            }
            let name = b.get(at + 28..at + 28 + name_len).ok_or_else(|| bad("truncated template name"))?;
            let template = String::from_utf8_lossy(name).into_owned();
            if template == "ima" {
                return Err(bad("the legacy \"ima\" template (its digest is not a hash of the template data); boot the guest with ima_template=ima-ng"));
            }
            let data_at = at + 28 + name_len + 4;
            let data_len = u32_at(b, at + 28 + name_len).ok_or_else(|| bad("truncated template data length"))? as usize;
            if data_len > MAX_DATA {
                return Err(bad(&format!("template data length {data_len}")));
            }
            let data = b.get(data_at..data_at + data_len).ok_or_else(|| bad("truncated template data"))?;
            let (file_digest, file_name) = ng_fields(data);
            // boot_aggregate and violations aside, the kernel records SHA-1 of the data; a
            // violation is recorded as zeros (and extended as all-ones, which this replay
            // does not model: refused as an edit, which is what a verifier should see)
            if sha1 != sha1_of(data).as_slice() {
                return Err(ImaError::DigestMismatch { entry, name: file_name.unwrap_or_default() });
            }
            entries.push(ImaEntry { pcr, template, file_digest, file_name, sha256: Sha256::digest(data).into() });
            at = data_at + data_len;
        }
        if entries.is_empty() {
            return Err(ImaError::Empty);
        }
        Ok(ImaLog { entries })
    }

    /// The SHA-256 PCR values the log replays to, per PCR (each from zero).
    pub fn replay_sha256(&self) -> BTreeMap<u32, [u8; 32]> {
        let mut out = BTreeMap::new();
        for e in &self.entries {
            let v = out.entry(e.pcr).or_insert([0u8; 32]);
            let mut h = Sha256::new();
            h.update(*v);
            h.update(e.sha256);
            *v = h.finalize().into();
        }
        out
    }

    /// Checks the replay against quoted SHA-256 values (`quoted`: PCR → value): every PCR the
    /// log extends must be quoted and equal.
    pub fn check(&self, quoted: &BTreeMap<u32, Vec<u8>>) -> Result<BTreeMap<u32, [u8; 32]>, String> {
        let replayed = self.replay_sha256();
        for (pcr, v) in &replayed {
            let q = quoted.get(pcr).ok_or_else(|| {
                format!("PCR {pcr} is not in the quote's SHA-256 vPCRs (ask for a deep quote with --vpcrs {pcr})")
            })?;
            if q.as_slice() != v {
                return Err(format!(
                    "the IMA log ({} entries) does not replay to quoted PCR {pcr}: log {}, quote {}",
                    self.entries.len(),
                    hex::encode(v),
                    hex::encode(q)
                ));
            }
        }
        Ok(replayed)
    }
}

/// SHA-1, which the IMA log's template digests use (a consistency check of each entry; what
/// the verifier trusts is the SHA-256 replay against the signed quote).
fn sha1_of(data: &[u8]) -> [u8; 20] {
    sha1::Sha1::digest(data).into()
}

/// Builds a log of `ima-ng` entries for PCR 10 from `(file name, file sha256)` pairs, as the
/// kernel writes it. For tests and tools that measure into a TPM and must describe it.
pub fn build_ima_ng(files: &[(&str, [u8; 32])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, digest) in files {
        let mut d = b"sha256:\0".to_vec();
        d.extend_from_slice(digest);
        let mut n = name.as_bytes().to_vec();
        n.push(0);
        let mut data = Vec::new();
        for f in [&d, &n] {
            data.extend_from_slice(&(f.len() as u32).to_le_bytes());
            data.extend_from_slice(f);
        }
        out.extend_from_slice(&10u32.to_le_bytes());
        out.extend_from_slice(&sha1_of(&data));
        out.extend_from_slice(&6u32.to_le_bytes());
        out.extend_from_slice(b"ima-ng");
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha1_known_answers() {
        assert_eq!(hex::encode(sha1_of(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(hex::encode(sha1_of(b"abc")), "a9993e364706816aba3e25717850c26c9cd0d89d");
        let long = vec![b'a'; 1000];
        assert_eq!(hex::encode(sha1_of(&long)), "291e9a6c66994949b57ba5e650361e98fc36b1ba");
    }

    #[test]
    fn parse_replay_and_refusals() {
        let log = build_ima_ng(&[("boot_aggregate", [1; 32]), ("/init", [2; 32])]);
        let l = ImaLog::parse(&log).unwrap();
        assert_eq!(l.entries.len(), 2);
        assert_eq!(l.entries[1].file_name.as_deref(), Some("/init"));
        assert_eq!(l.entries[1].file_digest.as_deref(), Some(&*format!("sha256:{}", hex::encode([2u8; 32]))));
        let v = l.replay_sha256()[&10];
        let mut q = BTreeMap::new();
        q.insert(10, v.to_vec());
        assert!(l.check(&q).is_ok());
        q.insert(10, vec![0; 32]);
        assert!(l.check(&q).unwrap_err().contains("does not replay to quoted PCR 10"));
        assert!(l.check(&BTreeMap::new()).unwrap_err().contains("--vpcrs 10"));
        // An edited file digest no longer matches the entry's SHA-1 template digest.
        let mut edited = log.clone();
        let last = edited.len() - 10;
        edited[last] ^= 1;
        assert!(matches!(ImaLog::parse(&edited), Err(ImaError::DigestMismatch { entry: 1, .. })));
        // Truncation, absurd lengths, empty.
        assert!(matches!(ImaLog::parse(&log[..log.len() - 1]), Err(ImaError::Malformed { entry: 1, .. })));
        let mut huge = log.clone();
        huge[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(ImaLog::parse(&huge), Err(ImaError::Malformed { entry: 0, .. })));
        assert_eq!(ImaLog::parse(&[]), Err(ImaError::Empty));
    }
}
