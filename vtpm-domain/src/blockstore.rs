//! Sealed vTPM state on a raw block device (or a plain file) without a filesystem: two slots,
//! A and B, written alternately.
//!
//! A vTPM running as the only program of its own Xen domain has a disk (`/dev/xvda`) but no
//! filesystem, so the rename-based atomic replace of [`crate::store`] is unavailable. Instead, two
//! slots at fixed offsets, each holding a generation, a sealed blob and a checksum — the layout
//! and record format are [`vtpm_proto::slots`]'s (dom0's tools read and write them too, when a
//! vTPM moves to another host):
//!
//! * **save** writes generation `g + 1` into the slot that does *not* hold the current state
//!   (the older one), then `fsync`s the device. Only then is the save reported done, so "a
//!   response implies durability" holds as with files.
//! * **open** reads both slots and keeps those whose checksum verifies, whose length is in
//!   bounds, whose sealed blob opens under the key for this vTPM (AEAD), and whose authenticated
//!   generation (inside the sealed header) equals the slot's; it resumes the newest of them.
//! * A **torn write** (crash mid-save) damages only the slot being written, which held the older
//!   state; the other slot still holds the newest acknowledged state, and it wins. A slot whose
//!   record was completely written but not yet acknowledged may also win — the same as a crash
//!   after `rename` but before the answer in the file store.
//! * **Corruption of the newest slot** after it was acknowledged (a bit flip on the disk) makes
//!   open fall back to the other slot, i.e. one generation back. That is logged as a warning
//!   naming both slots; the manager then refuses that older state like any restored copy
//!   ([`crate::anchor`]) until an administrator accepts it (`xl-vtpm vtpm accept-state`). (A
//!   generation that fails AEAD is never used, so corruption never yields forged or garbled
//!   state.) A restored copy of the whole device is refused the same way.
//! * **Never regenerates**: a device on which no slot verifies is an error naming the device and
//!   each slot's failure; nothing is written. `create` refuses a device unless the start of both
//!   slots is zero (fresh, or wiped on purpose: `dd if=/dev/zero of=<dev> bs=1M count=2`), so a
//!   damaged state is never overwritten by a new TPM.
//!
//! The API mirrors [`crate::store::Store`] (`create` / `open` / `save` / `generation` / `path`,
//! same [`StoreError`]) so vtpm-domain can use either.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use uuid::Uuid;
use vtpm_proto::sealed::{self, OpenError, State};
use vtpm_proto::slots::{self, RecordError};
use tpm_wire::Family;
use zeroize::Zeroizing;

use crate::store::StoreError;

pub use vtpm_proto::slots::{CHECKSUM_LEN, DEVICE_SIZE, MAX_SEALED, RECORD_HEADER, SLOT_SIZE, encode_record};
/// Bytes at the start of each slot that must be zero for [`BlockStore::create`].
pub const CREATE_CHECK: usize = 4096;

/// Which slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// At offset 0.
    A,
    /// At offset [`SLOT_SIZE`].
    B,
}

impl Slot {
    /// The slot's byte offset.
    pub fn offset(self) -> u64 {
        match self {
            Slot::A => 0,
            Slot::B => SLOT_SIZE,
        }
    }

    fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
}

/// Why a slot was not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    /// The length field exceeds the slot.
    #[error("length {0} exceeds the slot")]
    BadLength(u32),
    /// The checksum does not match (empty, torn or corrupted).
    #[error("checksum mismatch (empty, torn or corrupted)")]
    Checksum,
    /// The sealed blob does not open.
    #[error("{0}")]
    Sealed(OpenError),
    /// The sealed generation differs from the slot's.
    #[error("sealed generation {sealed} differs from the slot's {slot}")]
    Generation {
        /// In the slot header.
        slot: u64,
        /// Authenticated, inside the blob.
        sealed: u64,
    },
}

/// The sealed state of one vTPM on a block device or file (see the [module docs](self)).
pub struct BlockStore {
    file: File,
    path: PathBuf,
    uuid: Uuid,
    family: Family,
    key: Zeroizing<[u8; sealed::KEY_LEN]>,
    generation: u64,
    /// The slot holding `generation` (`None` before the first save after `create`).
    current: Option<Slot>,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Opens `path` read/write and checks it holds two slots. A missing plain file is created (and
/// sized) only if `create_file`.
fn open_device(path: &Path, create_file: bool) -> Result<File, StoreError> {
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound && create_file => OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_err("creating", path))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StoreError::Missing(path.to_path_buf()));
        }
        Err(e) => return Err(io_err("opening", path)(e)),
    };
    // A block device's metadata length is 0: ask the end instead.
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(io_err("sizing", path))?;
    if size < DEVICE_SIZE {
        let meta = file.metadata().map_err(io_err("inspecting", path))?;
        if create_file && meta.is_file() {
            file.set_len(DEVICE_SIZE).map_err(io_err("sizing", path))?;
        } else {
            return Err(StoreError::Io {
                what: "checking the size of",
                path: path.to_path_buf(),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{size} bytes; two state slots need at least {DEVICE_SIZE}"),
                ),
            });
        }
    }
    Ok(file)
}

/// Reads a slot's record: `(generation, blob)` if its length and checksum verify.
fn read_record(file: &File, slot: Slot) -> io::Result<Result<(u64, Vec<u8>), SlotError>> {
    Ok(slots::read_record(file, slot.offset())?.map_err(|e| match e {
        RecordError::BadLength(n) => SlotError::BadLength(n),
        RecordError::Checksum => SlotError::Checksum,
    }))
}

impl BlockStore {
    /// Prepares a store for a vTPM that does not exist yet, on `path` (a block device, or a
    /// plain file created and sized to two slots). The first [`CREATE_CHECK`] bytes of both
    /// slots must be zero (a fresh or wiped device): anything else may be a vTPM's state, even
    /// a damaged one, and is refused. Nothing is written until the first [`save`](Self::save).
    pub fn create(
        path: &Path,
        uuid: Uuid,
        family: Family,
        key: Zeroizing<[u8; 32]>,
    ) -> Result<BlockStore, StoreError> {
        let file = open_device(path, true)?;
        for slot in [Slot::A, Slot::B] {
            let mut head = [0u8; CREATE_CHECK];
            file.read_exact_at(&mut head, slot.offset())
                .map_err(io_err("reading", path))?;
            if head.iter().any(|&b| b != 0) {
                return Err(StoreError::Exists(path.to_path_buf()));
            }
        }
        Ok(BlockStore {
            file,
            path: path.to_path_buf(),
            uuid,
            family,
            key,
            generation: 0,
            current: None,
        })
    }

    /// Opens the newest valid state on `path` (see the [module docs](self)).
    pub fn open(
        path: &Path,
        uuid: Uuid,
        family: Family,
        key: Zeroizing<[u8; 32]>,
    ) -> Result<(BlockStore, State), StoreError> {
        let file = open_device(path, false)?;
        let mut best: Option<(Slot, State)> = None;
        let mut failures: Vec<(Slot, SlotError)> = Vec::new();
        for slot in [Slot::A, Slot::B] {
            let outcome = read_record(&file, slot)
                .map_err(io_err("reading", path))?
                .and_then(|(generation, blob)| {
                    let state = sealed::open(&key, &uuid, &blob).map_err(SlotError::Sealed)?;
                    if state.generation != generation {
                        return Err(SlotError::Generation {
                            slot: generation,
                            sealed: state.generation,
                        });
                    }
                    Ok(state)
                });
            match outcome {
                Ok(state) => {
                    if best
                        .as_ref()
                        .is_none_or(|(_, b)| state.generation > b.generation)
                    {
                        best = Some((slot, state));
                    }
                }
                Err(e) => failures.push((slot, e)),
            }
        }
        let Some((slot, state)) = best else {
            if failures.iter().all(|(_, e)| *e == SlotError::Checksum) {
                return Err(StoreError::Missing(path.to_path_buf()));
            }
            // Report the most telling failure (a key or vTPM mismatch beats "checksum").
            let source = failures
                .iter()
                .find_map(|(_, e)| match e {
                    SlotError::Sealed(o) => Some(o.clone()),
                    _ => None,
                })
                .unwrap_or(OpenError::Malformed);
            let detail: Vec<String> = failures
                .iter()
                .map(|(s, e)| format!("slot {s:?}: {e}"))
                .collect();
            xvtpm_log::host_error!(path = %path.display(), slots = %detail.join("; "), "no state slot opens");
            return Err(StoreError::Open {
                path: path.to_path_buf(),
                source,
            });
        };
        if let Some((bad, e)) = failures
            .iter()
            .find(|(s, e)| *s == slot.other() && *e != SlotError::Checksum)
        {
            xvtpm_log::host_warn!(path = %path.display(), slot = ?bad, error = %e, "the other state slot does not open");
        } else if let Some((bad, e)) = failures.first() {
            xvtpm_log::host_debug!(path = %path.display(), slot = ?bad, error = %e, "the other state slot is empty or torn");
        }
        if state.family != family {
            return Err(StoreError::FamilyMismatch {
                path: path.to_path_buf(),
                found: state.family,
                wanted: family,
            });
        }
        let store = BlockStore {
            file,
            path: path.to_path_buf(),
            uuid,
            family,
            key,
            generation: state.generation,
            current: Some(slot),
        };
        Ok((store, state))
    }

    /// The generation of the last write.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Makes the next save write a generation above `generation` (no effect if it would
    /// anyway): after an administrator accepted an older state, so that its new writes
    /// outnumber every write of the abandoned newer states ([`crate::anchor`]).
    pub fn skip_generation_to(&mut self, generation: u64) {
        self.generation = self.generation.max(generation);
    }

    /// The device or file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The slot holding the current generation (`None` before the first save).
    pub fn current_slot(&self) -> Option<Slot> {
        self.current
    }

    /// Seals a new state and writes it into the older slot, then fsyncs.
    pub fn save(&mut self, permanent: &[u8], volatile: &[u8]) -> Result<(), StoreError> {
        let generation = self.generation + 1;
        let blob = crate::store::seal_generation(&self.key, &self.uuid, self.family, generation, permanent, volatile);
        if blob.len() > MAX_SEALED {
            return Err(StoreError::Io {
                what: "writing",
                path: self.path.clone(),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "sealed state of {} bytes exceeds the {MAX_SEALED}-byte slot",
                        blob.len()
                    ),
                ),
            });
        }
        let target = self.current.map_or(Slot::A, Slot::other);
        let record = encode_record(generation, &blob);
        self.file
            .write_all_at(&record, target.offset())
            .map_err(io_err("writing", &self.path))?;
        self.file
            .sync_all()
            .map_err(io_err("syncing", &self.path))?;
        self.generation = generation;
        self.current = Some(target);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> Zeroizing<[u8; 32]> {
        Zeroizing::new([b; 32])
    }

    fn read_slot(p: &Path, slot: Slot, len: usize) -> Vec<u8> {
        let f = File::open(p).unwrap();
        let mut v = vec![0u8; len];
        f.read_exact_at(&mut v, slot.offset()).unwrap();
        v
    }

    fn write_at(p: &Path, off: u64, data: &[u8]) {
        let f = OpenOptions::new().write(true).open(p).unwrap();
        f.write_all_at(data, off).unwrap();
    }

    fn open_gen(p: &Path, id: Uuid) -> Result<(u64, Vec<u8>), StoreError> {
        BlockStore::open(p, id, Family::Tpm2, key(1))
            .map(|(s, st)| (s.generation(), st.permanent.to_vec()))
    }

    /// A device with generations 1 (slot A) and 2 (slot B); returns the store.
    fn two_generations(p: &Path, id: Uuid) -> BlockStore {
        let mut s = BlockStore::create(p, id, Family::Tpm2, key(1)).unwrap();
        s.save(b"perm-1", b"vol-1").unwrap();
        assert_eq!(s.current_slot(), Some(Slot::A));
        s.save(b"perm-2", b"vol-2").unwrap();
        assert_eq!(s.current_slot(), Some(Slot::B));
        s
    }

    #[test]
    fn create_save_open_alternate_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("xvda");
        let id = Uuid::new_v4();
        assert!(matches!(
            BlockStore::open(&p, id, Family::Tpm2, key(1)),
            Err(StoreError::Missing(_))
        ));
        let s = BlockStore::create(&p, id, Family::Tpm2, key(1)).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), DEVICE_SIZE);
        drop(s);
        // Created but never saved: still nothing to resume, and never a fresh TPM.
        assert!(matches!(
            BlockStore::open(&p, id, Family::Tpm2, key(1)),
            Err(StoreError::Missing(_))
        ));
        let mut s = two_generations(&p, id);
        assert!(matches!(
            BlockStore::create(&p, id, Family::Tpm2, key(1)),
            Err(StoreError::Exists(_))
        ));
        let (mut s2, st) = BlockStore::open(&p, id, Family::Tpm2, key(1)).unwrap();
        assert_eq!(
            (s2.generation(), &st.permanent[..], &st.volatile[..]),
            (2, &b"perm-2"[..], &b"vol-2"[..])
        );
        assert_eq!(s2.current_slot(), Some(Slot::B));
        s2.save(b"perm-3", b"").unwrap();
        assert_eq!(
            s2.current_slot(),
            Some(Slot::A),
            "the older slot is overwritten"
        );
        assert_eq!(open_gen(&p, id).unwrap(), (3, b"perm-3".to_vec()));
        s.generation = 3; // keep the test's own handle consistent; unused further
        let before = std::fs::read(&p).unwrap();
        assert!(matches!(
            BlockStore::open(&p, id, Family::Tpm2, key(2)),
            Err(StoreError::Open {
                source: OpenError::Authentication,
                ..
            })
        ));
        assert!(matches!(
            BlockStore::open(&p, Uuid::new_v4(), Family::Tpm2, key(1)),
            Err(StoreError::Open {
                source: OpenError::WrongVtpm { .. },
                ..
            })
        ));
        assert!(matches!(
            BlockStore::open(&p, id, Family::Tpm12, key(1)),
            Err(StoreError::FamilyMismatch { .. })
        ));
        assert_eq!(
            std::fs::read(&p).unwrap(),
            before,
            "a failed open must not touch the device"
        );
    }

    #[test]
    fn a_too_small_device_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("small");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let e = BlockStore::open(&p, Uuid::new_v4(), Family::Tpm2, key(1))
            .err()
            .unwrap();
        assert!(e.to_string().contains("two state slots"), "{e}");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 4096);
    }

    /// A crash while writing generation 3 into slot A, torn at every byte boundary of the
    /// record, over both old contents (generation 1) and zeros: generation 2 (slot B) always
    /// opens, and only the complete record yields generation 3.
    #[test]
    fn torn_writes_at_every_byte_leave_the_other_slot() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("xvda");
        let id = Uuid::new_v4();
        two_generations(&p, id);
        // The record generation 3 would write, taken from a save on a copy.
        let copy = dir.path().join("copy");
        std::fs::copy(&p, &copy).unwrap();
        let (mut s, _) = BlockStore::open(&copy, id, Family::Tpm2, key(1)).unwrap();
        s.save(b"perm-3", b"vol-3").unwrap();
        let new_len = {
            let hdr = read_slot(&copy, Slot::A, RECORD_HEADER);
            RECORD_HEADER
                + u32::from_be_bytes(hdr[8..12].try_into().unwrap()) as usize
                + CHECKSUM_LEN
        };
        let new_rec = read_slot(&copy, Slot::A, new_len);
        let old_rec = read_slot(&p, Slot::A, new_len.max(200));
        let pristine = std::fs::read(&p).unwrap();
        for background in [old_rec.clone(), vec![0u8; old_rec.len()]] {
            for cut in 0..=new_len {
                std::fs::write(&p, &pristine).unwrap();
                let mut torn = background.clone();
                torn[..cut].copy_from_slice(&new_rec[..cut]);
                write_at(&p, Slot::A.offset(), &torn);
                let (generation, perm) =
                    open_gen(&p, id).unwrap_or_else(|e| panic!("cut {cut}: {e}"));
                // A cut whose remaining bytes happen to equal the background (the checksum's
                // last byte is 0, or equals the old record's, about 1 run in 128) is no tear.
                if torn[..new_len] == new_rec[..] {
                    assert_eq!((generation, perm), (3, b"perm-3".to_vec()), "cut {cut}");
                } else {
                    assert_eq!((generation, perm), (2, b"perm-2".to_vec()), "cut {cut}");
                }
            }
        }
    }

    /// Every single-bit flip in the newest record falls back to the other slot (never an
    /// error, never altered state); flips in both records are an error and touch nothing.
    #[test]
    fn bit_flips_fall_back_to_the_other_slot_or_fail_loudly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("xvda");
        let id = Uuid::new_v4();
        two_generations(&p, id);
        let pristine = std::fs::read(&p).unwrap();
        let len_b = {
            let hdr = read_slot(&p, Slot::B, RECORD_HEADER);
            RECORD_HEADER
                + u32::from_be_bytes(hdr[8..12].try_into().unwrap()) as usize
                + CHECKSUM_LEN
        };
        let rec_b = read_slot(&p, Slot::B, len_b);
        for byte in 0..len_b {
            for bit in 0..8 {
                let mut flipped = rec_b.clone();
                flipped[byte] ^= 1 << bit;
                write_at(&p, Slot::B.offset(), &flipped);
                assert_eq!(
                    open_gen(&p, id).unwrap(),
                    (1, b"perm-1".to_vec()),
                    "byte {byte} bit {bit}"
                );
            }
        }
        // Both slots damaged: a loud error, the device untouched.
        std::fs::write(&p, &pristine).unwrap();
        let mut bad_a = read_slot(&p, Slot::A, 64);
        bad_a[20] ^= 0x40;
        write_at(&p, Slot::A.offset(), &bad_a);
        let mut bad_b = rec_b.clone();
        bad_b[30] ^= 0x01;
        write_at(&p, Slot::B.offset(), &bad_b);
        let damaged = std::fs::read(&p).unwrap();
        assert!(BlockStore::open(&p, id, Family::Tpm2, key(1)).is_err());
        assert!(
            matches!(
                BlockStore::create(&p, id, Family::Tpm2, key(1)),
                Err(StoreError::Exists(_))
            ),
            "a damaged state is never replaced"
        );
        assert_eq!(std::fs::read(&p).unwrap(), damaged);
    }

    /// A record whose checksum is fixed up after tampering still fails AEAD, and a slot whose
    /// header generation was raised (checksum recomputed) is rejected: the sealed generation is
    /// authoritative.
    #[test]
    fn forged_records_do_not_win() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("xvda");
        let id = Uuid::new_v4();
        two_generations(&p, id);
        let hdr = read_slot(&p, Slot::A, RECORD_HEADER);
        let len = u32::from_be_bytes(hdr[8..12].try_into().unwrap()) as usize;
        let blob = read_slot(&p, Slot::A, RECORD_HEADER + len)[RECORD_HEADER..].to_vec();
        // Generation 1's blob relabelled as generation 9.
        write_at(&p, Slot::A.offset(), &encode_record(9, &blob));
        assert_eq!(open_gen(&p, id).unwrap(), (2, b"perm-2".to_vec()));
        // A tampered blob with a valid checksum.
        let mut tampered = blob.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        write_at(&p, Slot::A.offset(), &encode_record(9, &tampered));
        assert_eq!(open_gen(&p, id).unwrap(), (2, b"perm-2".to_vec()));
        // A length field beyond the slot.
        let mut huge = encode_record(9, &blob);
        huge[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        write_at(&p, Slot::A.offset(), &huge);
        assert_eq!(open_gen(&p, id).unwrap(), (2, b"perm-2".to_vec()));
    }

    #[test]
    fn rollback_to_the_other_slot_then_continue() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("xvda");
        let id = Uuid::new_v4();
        two_generations(&p, id);
        // Slot B (generation 2) is destroyed: generation 1 from slot A is resumed, and the next
        // save goes to slot B (the damaged one), never over the only good copy.
        write_at(&p, Slot::B.offset(), &[0xff; 64]);
        let (mut s, st) = BlockStore::open(&p, id, Family::Tpm2, key(1)).unwrap();
        assert_eq!((s.generation(), &st.permanent[..]), (1, &b"perm-1"[..]));
        assert_eq!(s.current_slot(), Some(Slot::A));
        s.save(b"perm-2b", b"").unwrap();
        assert_eq!(s.current_slot(), Some(Slot::B));
        assert_eq!(open_gen(&p, id).unwrap(), (2, b"perm-2b".to_vec()));
    }
}
