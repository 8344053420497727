//! The slot records of a vTPM domain's state disk: two slots, A and B, each holding one sealed
//! state ([`crate::sealed`]) with its generation and a checksum.
//!
//! ```text
//! offset 0            : slot A  (SLOT_SIZE bytes reserved)
//! offset SLOT_SIZE    : slot B  (SLOT_SIZE bytes reserved)
//!
//! slot record (starting at the slot's offset; the rest of the slot is ignored):
//!   0        generation   u64 big-endian
//!   8        len          u32 big-endian   (≤ SLOT_SIZE − 44)
//!   12       sealed blob  len bytes        (crate::sealed: AES-256-GCM, header as AAD)
//!   12+len   SHA-256      32 bytes over bytes [0, 12+len) of the record
//! ```
//!
//! The vTPM domain reads and writes them (`vtpm_domain::blockstore`, which opens the sealed blob
//! under the vTPM's key); dom0's tools read the newest record of a stopped vTPM's disk and write
//! the first record of a new one, when the vTPM moves to another host. Neither needs the key:
//! the checksum only tells a whole record from an empty, torn or damaged one, and whoever opens
//! the blob checks it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use sha2::{Digest, Sha256};

/// Bytes reserved per slot (1 MiB; libtpms' sealed state is ~20 KiB).
pub const SLOT_SIZE: u64 = 1 << 20;
/// Record header: generation (8) + length (4).
pub const RECORD_HEADER: usize = 12;
/// Trailing SHA-256.
pub const CHECKSUM_LEN: usize = 32;
/// Largest sealed blob a slot holds.
pub const MAX_SEALED: usize = SLOT_SIZE as usize - RECORD_HEADER - CHECKSUM_LEN;
/// Smallest device: two slots.
pub const DEVICE_SIZE: u64 = 2 * SLOT_SIZE;
/// The slots' offsets: A, then B.
pub const OFFSETS: [u64; 2] = [0, SLOT_SIZE];

/// Why a slot holds no whole record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The length field exceeds the slot.
    #[error("length {0} exceeds the slot")]
    BadLength(u32),
    /// The checksum does not match (empty, torn or corrupted).
    #[error("checksum mismatch (empty, torn or corrupted)")]
    Checksum,
}

/// Builds a slot record for `blob` at `generation`.
pub fn encode_record(generation: u64, blob: &[u8]) -> Vec<u8> {
    let mut rec = Vec::with_capacity(RECORD_HEADER + blob.len() + CHECKSUM_LEN);
    rec.extend_from_slice(&generation.to_be_bytes());
    rec.extend_from_slice(&(blob.len() as u32).to_be_bytes());
    rec.extend_from_slice(blob);
    let sum = Sha256::digest(&rec);
    rec.extend_from_slice(&sum);
    rec
}

/// Reads the record at `offset` of `file`: `(generation, sealed blob)` if its length and
/// checksum verify. The length is checked against [`MAX_SEALED`] before anything is allocated.
pub fn read_record(file: &File, offset: u64) -> io::Result<Result<(u64, Vec<u8>), RecordError>> {
    let mut hdr = [0u8; RECORD_HEADER];
    file.read_exact_at(&mut hdr, offset)?;
    let generation = u64::from_be_bytes(hdr[0..8].try_into().expect("8 bytes"));
    let len = u32::from_be_bytes(hdr[8..12].try_into().expect("4 bytes"));
    if len as usize > MAX_SEALED {
        return Ok(Err(RecordError::BadLength(len)));
    }
    let mut rest = vec![0u8; len as usize + CHECKSUM_LEN];
    file.read_exact_at(&mut rest, offset + RECORD_HEADER as u64)?;
    let (blob, sum) = rest.split_at(len as usize);
    let mut h = Sha256::new();
    h.update(hdr);
    h.update(blob);
    if h.finalize()[..] != *sum {
        return Ok(Err(RecordError::Checksum));
    }
    rest.truncate(len as usize);
    Ok(Ok((generation, rest)))
}

/// The whole records of both slots, the newest generation first (none: a fresh or wiped disk,
/// or one whose both slots are damaged).
pub fn records(file: &File) -> io::Result<Vec<(u64, Vec<u8>)>> {
    let mut out = Vec::new();
    for off in OFFSETS {
        if let Ok(r) = read_record(file, off)? {
            out.push(r);
        }
    }
    out.sort_by_key(|r| std::cmp::Reverse(r.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_read_newest_first_and_damage_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk");
        let f = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&p).unwrap();
        f.set_len(DEVICE_SIZE).unwrap();
        assert!(records(&f).unwrap().is_empty(), "a zeroed disk holds no record");
        f.write_all_at(&encode_record(7, b"seven"), OFFSETS[0]).unwrap();
        f.write_all_at(&encode_record(8, b"eight"), OFFSETS[1]).unwrap();
        assert_eq!(records(&f).unwrap(), vec![(8, b"eight".to_vec()), (7, b"seven".to_vec())]);
        // A torn write of slot B (its last byte lost) leaves slot A's record.
        f.write_all_at(&[0xff], OFFSETS[1] + (RECORD_HEADER + 5) as u64).unwrap();
        assert_eq!(read_record(&f, OFFSETS[1]).unwrap(), Err(RecordError::Checksum));
        assert_eq!(records(&f).unwrap(), vec![(7, b"seven".to_vec())]);
        // A length beyond the slot is refused before anything is allocated.
        let mut bad = encode_record(9, b"x");
        bad[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        f.write_all_at(&bad, OFFSETS[1]).unwrap();
        assert_eq!(read_record(&f, OFFSETS[1]).unwrap(), Err(RecordError::BadLength(u32::MAX)));
    }
}
