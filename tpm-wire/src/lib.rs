//! The TPM wire vocabulary every xvtpm crate shares (TPM 2.0 Part 1 §18 "Command/Response
//! Structure", Part 2 for the constants; TPM Main Part 2/3 for TPM 1.2).
//!
//! Both families share a 10-byte big-endian header: `tag: u16`, `size: u32` (whole packet,
//! header included) and `code: u32` (command code or response code). Everything a vTPM
//! receives goes through [`parse_command`] first; a packet it rejects is answered with
//! [`error_response`] and never reaches the engine. [`Command`] builds TPM 2.0 commands; the
//! `tpm2_*` and `tpm12_*` functions are the whole commands the vTPM, the tests and the
//! benchmarks send. No I/O, no `unsafe`, no dependency on another workspace crate; what is
//! specific to libtpms stays in `vtpm-engine`.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

/// Length of the command/response header shared by TPM 1.2 and 2.0.
pub const HEADER_LEN: usize = 10;

/// TPM 2.0 `TPM_ST_NO_SESSIONS`.
pub const TPM2_ST_NO_SESSIONS: u16 = 0x8001;
/// TPM 2.0 `TPM_ST_SESSIONS`.
pub const TPM2_ST_SESSIONS: u16 = 0x8002;
/// TPM 1.2 `TPM_TAG_RQU_COMMAND`.
pub const TPM12_TAG_RQU_COMMAND: u16 = 0x00C1;
/// TPM 1.2 `TPM_TAG_RQU_AUTH1_COMMAND`.
pub const TPM12_TAG_RQU_AUTH1_COMMAND: u16 = 0x00C2;
/// TPM 1.2 `TPM_TAG_RQU_AUTH2_COMMAND`.
pub const TPM12_TAG_RQU_AUTH2_COMMAND: u16 = 0x00C3;
/// TPM 1.2 `TPM_TAG_RSP_COMMAND`.
pub const TPM12_TAG_RSP_COMMAND: u16 = 0x00C4;

/// TPM 2.0 `TPM_RC_SUCCESS`.
pub const TPM2_RC_SUCCESS: u32 = 0x000;
/// TPM 2.0 `TPM_RC_BAD_TAG`: the tag is not one of the two command tags.
pub const TPM2_RC_BAD_TAG: u32 = 0x01E;
/// TPM 2.0 `TPM_RC_FAILURE`: the TPM is in failure mode or could not run.
pub const TPM2_RC_FAILURE: u32 = 0x101;
/// TPM 2.0 `TPM_RC_INITIALIZE`: the TPM is not initialised (no Startup yet).
pub const TPM2_RC_INITIALIZE: u32 = 0x100;
/// TPM 2.0 `TPM_RC_COMMAND_SIZE`: the size field disagrees with the bytes
/// received, or the packet is larger than the input buffer.
pub const TPM2_RC_COMMAND_SIZE: u32 = 0x142;
/// TPM 2.0 `TPM_RC_COMMAND_CODE`: command code not implemented.
pub const TPM2_RC_COMMAND_CODE: u32 = 0x143;
/// TPM 2.0 `TPM_RC_RETRY`: the TPM was busy; the caller should retry.
pub const TPM2_RC_RETRY: u32 = 0x922;
/// TPM 1.2 `TPM_BADTAG`.
pub const TPM12_BADTAG: u32 = 0x1E;
/// TPM 1.2 `TPM_BAD_PARAM_SIZE`.
pub const TPM12_BAD_PARAM_SIZE: u32 = 0x19;
/// TPM 1.2 `TPM_FAIL`.
pub const TPM12_FAIL: u32 = 0x09;

/// TPM 2.0 command code `TPM_CC_Startup`.
pub const TPM2_CC_STARTUP: u32 = 0x144;
/// TPM 2.0 command code `TPM_CC_Shutdown`.
pub const TPM2_CC_SHUTDOWN: u32 = 0x145;
/// TPM 2.0 `TPM_SU_CLEAR`.
pub const TPM2_SU_CLEAR: u16 = 0x0000;
/// TPM 2.0 `TPM_SU_STATE`.
pub const TPM2_SU_STATE: u16 = 0x0001;

/// TPM 2.0 `TPM_RC_NV_LOCKED`: the NV index is write-locked.
pub const TPM2_RC_NV_LOCKED: u32 = 0x148;

/// TPM 2.0 `TPM_RS_PW`: the password authorization session handle.
pub const TPM2_RS_PW: u32 = 0x4000_0009;
/// TPM 2.0 `TPM_RH_OWNER`.
pub const TPM2_RH_OWNER: u32 = 0x4000_0001;
/// TPM 2.0 `TPM_RH_ENDORSEMENT`.
pub const TPM2_RH_ENDORSEMENT: u32 = 0x4000_000B;
/// TPM 2.0 `TPM_RH_PLATFORM`.
pub const TPM2_RH_PLATFORM: u32 = 0x4000_000C;
/// TPM 2.0 `TPM_ALG_RSA`.
pub const TPM2_ALG_RSA: u16 = 0x0001;
/// TPM 2.0 `TPM_ALG_SHA1`.
pub const TPM2_ALG_SHA1: u16 = 0x0004;
/// TPM 2.0 `TPM_ALG_SHA256`.
pub const TPM2_ALG_SHA256: u16 = 0x000B;
/// TPM 2.0 `TPM_ALG_SHA384`.
pub const TPM2_ALG_SHA384: u16 = 0x000C;
/// TPM 2.0 `TPM_ALG_SHA512`.
pub const TPM2_ALG_SHA512: u16 = 0x000D;
/// TPM 2.0 `TPM_ALG_NULL`.
pub const TPM2_ALG_NULL: u16 = 0x0010;
/// TPM 2.0 `TPM_ALG_RSASSA` (PKCS#1 v1.5).
pub const TPM2_ALG_RSASSA: u16 = 0x0014;
/// TPM 2.0 `TPM_ALG_OAEP`.
pub const TPM2_ALG_OAEP: u16 = 0x0017;
/// TPM 2.0 `TPM_ALG_ECDSA`.
pub const TPM2_ALG_ECDSA: u16 = 0x0018;
/// TPM 2.0 `TPM_ALG_ECC`.
pub const TPM2_ALG_ECC: u16 = 0x0023;

/// TPM 2.0 `TPM_GENERATED_VALUE`, the magic of every `TPMS_ATTEST` the TPM makes.
pub const TPM2_GENERATED_VALUE: u32 = 0xff54_4347;
/// TPM 2.0 `TPM_ST_ATTEST_CERTIFY`.
pub const TPM2_ST_ATTEST_CERTIFY: u16 = 0x8017;
/// TPM 2.0 `TPM_ST_ATTEST_QUOTE`.
pub const TPM2_ST_ATTEST_QUOTE: u16 = 0x8018;

/// TPM 2.0 `TPM_CAP_COMMANDS`.
pub const TPM2_CAP_COMMANDS: u32 = 2;
/// TPM 2.0 `TPM_CAP_TPM_PROPERTIES`.
pub const TPM2_CAP_TPM_PROPERTIES: u32 = 6;
/// TPM 2.0 `PT_FIXED`, the first fixed TPM property.
pub const TPM2_PT_FIXED: u32 = 0x100;
/// TPM 2.0 `TPM_PT_TOTAL_COMMANDS`.
pub const TPM2_PT_TOTAL_COMMANDS: u32 = 0x129;
/// TPM 2.0 `TPM_PT_VENDOR_COMMANDS`.
pub const TPM2_PT_VENDOR_COMMANDS: u32 = 0x12B;

/// TPM 2.0 command code `TPM_CC_EvictControl`.
pub const TPM2_CC_EVICT_CONTROL: u32 = 0x120;
/// TPM 2.0 command code `TPM_CC_NV_DefineSpace`.
pub const TPM2_CC_NV_DEFINE_SPACE: u32 = 0x12A;
/// TPM 2.0 command code `TPM_CC_CreatePrimary`.
pub const TPM2_CC_CREATE_PRIMARY: u32 = 0x131;
/// TPM 2.0 command code `TPM_CC_NV_Increment`.
pub const TPM2_CC_NV_INCREMENT: u32 = 0x134;
/// TPM 2.0 command code `TPM_CC_NV_Write`.
pub const TPM2_CC_NV_WRITE: u32 = 0x137;
/// TPM 2.0 command code `TPM_CC_NV_WriteLock`.
pub const TPM2_CC_NV_WRITE_LOCK: u32 = 0x138;
/// TPM 2.0 command code `TPM_CC_NV_Read`.
pub const TPM2_CC_NV_READ: u32 = 0x14E;
/// TPM 2.0 command code `TPM_CC_FlushContext`.
pub const TPM2_CC_FLUSH_CONTEXT: u32 = 0x165;
/// TPM 2.0 command code `TPM_CC_NV_ReadPublic`.
pub const TPM2_CC_NV_READ_PUBLIC: u32 = 0x169;
/// TPM 2.0 command code `TPM_CC_ReadPublic`.
pub const TPM2_CC_READ_PUBLIC: u32 = 0x173;
/// TPM 2.0 command code `TPM_CC_GetCapability`.
pub const TPM2_CC_GET_CAPABILITY: u32 = 0x17A;
/// TPM 2.0 command code `TPM_CC_GetRandom`.
pub const TPM2_CC_GET_RANDOM: u32 = 0x17B;
/// TPM 2.0 command code `TPM_CC_PCR_Read`.
pub const TPM2_CC_PCR_READ: u32 = 0x17E;
/// TPM 2.0 command code `TPM_CC_PCR_Extend`.
pub const TPM2_CC_PCR_EXTEND: u32 = 0x182;

/// TPM 1.2 ordinal `TPM_ORD_GetRandom`.
pub const TPM12_ORD_GET_RANDOM: u32 = 0x46;
/// TPM 1.2 ordinal `TPM_ORD_GetCapability`.
pub const TPM12_ORD_GET_CAPABILITY: u32 = 0x65;
/// TPM 1.2 ordinal `TPM_ORD_Startup`.
pub const TPM12_ORD_STARTUP: u32 = 0x99;
/// TPM 1.2 `TPM_ST_CLEAR` (the Startup type).
pub const TPM12_ST_CLEAR: u16 = 0x0001;
/// TPM 1.2 `TPM_CAP_PROPERTY`.
pub const TPM12_CAP_PROPERTY: u32 = 5;
/// TPM 1.2 `TPM_CAP_PROP_TIS_TIMEOUT`.
pub const TPM12_CAP_PROP_TIS_TIMEOUT: u32 = 0x115;
/// TPM 1.2 `TPM_CAP_PROP_DURATION`.
pub const TPM12_CAP_PROP_DURATION: u32 = 0x120;

/// The TPM family a vTPM runs. Chosen at creation and fixed for its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// TPM 2.0 (the default).
    Tpm2,
    /// TPM 1.2, on request.
    Tpm12,
}

impl Family {
    /// The response code for a command whose size is wrong or larger than the TPM takes:
    /// `TPM_RC_COMMAND_SIZE` (TPM 2.0), `TPM_BAD_PARAM_SIZE` (TPM 1.2).
    pub fn command_size_code(self) -> u32 {
        match self {
            Family::Tpm2 => TPM2_RC_COMMAND_SIZE,
            Family::Tpm12 => TPM12_BAD_PARAM_SIZE,
        }
    }

    /// The response code for a command the TPM could not run: `TPM_RC_FAILURE` (TPM 2.0),
    /// `TPM_FAIL` (TPM 1.2).
    pub fn failure_code(self) -> u32 {
        match self {
            Family::Tpm2 => TPM2_RC_FAILURE,
            Family::Tpm12 => TPM12_FAIL,
        }
    }
}

/// A validated command header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandHeader {
    /// Command tag.
    pub tag: u16,
    /// Declared size of the whole packet.
    pub size: u32,
    /// Command code (TPM 2.0 `TPM_CC`, TPM 1.2 ordinal).
    pub code: u32,
}

/// Why a command packet was refused before reaching the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// Fewer bytes than a header.
    #[error("command of {len} bytes is shorter than the {HEADER_LEN}-byte header")]
    Short {
        /// Bytes received.
        len: usize,
    },
    /// The size field disagrees with the number of bytes received.
    #[error("command declares {declared} bytes but {actual} arrived")]
    SizeMismatch {
        /// The header's size field.
        declared: u32,
        /// Bytes actually received.
        actual: usize,
    },
    /// The packet does not fit the engine's input buffer.
    #[error("command of {size} bytes exceeds the {max}-byte buffer")]
    TooLarge {
        /// The header's size field (or bytes received, if larger).
        size: usize,
        /// The buffer size in force.
        max: usize,
    },
    /// The tag is not a command tag of this family.
    #[error("tag {0:#06x} is not a command tag")]
    BadTag(u16),
}

impl FramingError {
    /// The response code a TPM of `family` would return for this error.
    pub fn response_code(&self, family: Family) -> u32 {
        match (self, family) {
            (FramingError::BadTag(_), Family::Tpm2) => TPM2_RC_BAD_TAG,
            (FramingError::BadTag(_), Family::Tpm12) => TPM12_BADTAG,
            (_, family) => family.command_size_code(),
        }
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads the header of a packet without validating it against a family.
/// Returns `None` if fewer than [`HEADER_LEN`] bytes are given.
pub fn peek_header(buf: &[u8]) -> Option<CommandHeader> {
    if buf.len() < HEADER_LEN {
        return None;
    }
    Some(CommandHeader { tag: be16(buf, 0), size: be32(buf, 2), code: be32(buf, 6) })
}

/// Validates a whole command packet: header present, tag of `family`,
/// size field equal to the bytes received and no larger than `max`.
pub fn parse_command(buf: &[u8], family: Family, max: usize) -> Result<CommandHeader, FramingError> {
    let hdr = peek_header(buf).ok_or(FramingError::Short { len: buf.len() })?;
    if buf.len() > max || hdr.size as usize > max {
        return Err(FramingError::TooLarge { size: buf.len().max(hdr.size as usize), max });
    }
    if hdr.size as usize != buf.len() {
        return Err(FramingError::SizeMismatch { declared: hdr.size, actual: buf.len() });
    }
    let tag_ok = match family {
        Family::Tpm2 => matches!(hdr.tag, TPM2_ST_NO_SESSIONS | TPM2_ST_SESSIONS),
        Family::Tpm12 => matches!(
            hdr.tag,
            TPM12_TAG_RQU_COMMAND | TPM12_TAG_RQU_AUTH1_COMMAND | TPM12_TAG_RQU_AUTH2_COMMAND
        ),
    };
    if !tag_ok {
        return Err(FramingError::BadTag(hdr.tag));
    }
    Ok(hdr)
}

/// A 10-byte error response with response code `rc`.
pub fn error_response(family: Family, rc: u32) -> [u8; HEADER_LEN] {
    let tag = match family {
        Family::Tpm2 => TPM2_ST_NO_SESSIONS,
        Family::Tpm12 => TPM12_TAG_RSP_COMMAND,
    };
    let mut out = [0u8; HEADER_LEN];
    out[0..2].copy_from_slice(&tag.to_be_bytes());
    out[2..6].copy_from_slice(&(HEADER_LEN as u32).to_be_bytes());
    out[6..10].copy_from_slice(&rc.to_be_bytes());
    out
}

/// The response code of a response packet, or `None` if it is too short.
pub fn response_code(resp: &[u8]) -> Option<u32> {
    peek_header(resp).map(|h| h.code)
}

/// Big-endian `u32` at `at`, or `None` past the end.
pub fn be_u32(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The `TPM2B` (size prefix included) starting at `at`, or `None` if it runs past the end.
pub fn tpm2b_at(buf: &[u8], at: usize) -> Option<&[u8]> {
    let b = buf.get(at..at.checked_add(2)?)?;
    let n = usize::from(u16::from_be_bytes([b[0], b[1]]));
    buf.get(at..at + 2 + n)
}

/// Builder for one command; [`Command::finish`] patches the size field.
#[derive(Debug, Clone)]
pub struct Command {
    buf: Vec<u8>,
}

impl Command {
    /// Starts a command with `tag` ([`TPM2_ST_NO_SESSIONS`] / [`TPM2_ST_SESSIONS`], or a TPM 1.2
    /// request tag) and command `code`.
    pub fn new(tag: u16, code: u32) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&tag.to_be_bytes());
        buf.extend_from_slice(&0u32.to_be_bytes());
        buf.extend_from_slice(&code.to_be_bytes());
        Command { buf }
    }

    /// Appends one byte.
    pub fn u8(mut self, v: u8) -> Self {
        self.buf.push(v);
        self
    }

    /// Appends a big-endian `u16`.
    pub fn u16(mut self, v: u16) -> Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a big-endian `u32` (also used for handles).
    pub fn u32(mut self, v: u32) -> Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends raw bytes.
    pub fn bytes(mut self, v: &[u8]) -> Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// Appends a `TPM2B`: a big-endian `u16` length followed by the bytes.
    ///
    /// # Panics
    /// If `v` is longer than 65535 bytes (a programming error).
    pub fn tpm2b(self, v: &[u8]) -> Self {
        let len = u16::try_from(v.len()).expect("TPM2B longer than 65535 bytes");
        self.u16(len).bytes(v)
    }

    /// Appends an authorization area with one empty-password session ([`TPM2_RS_PW`]).
    /// Call it after the handles and before the parameters.
    pub fn password_session(self) -> Self {
        self.u32(9).u32(TPM2_RS_PW).u16(0).u8(0).u16(0)
    }

    /// Patches the size field and returns the command bytes.
    pub fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[2..6].copy_from_slice(&len.to_be_bytes());
        self.buf
    }
}

/// `TPM2_Startup(su)`: also the command a vTPM sends itself when it is started with the
/// `startup-clear` behaviour (as swtpm's `--flags startup-clear`).
pub fn tpm2_startup(su: u16) -> Vec<u8> {
    Command::new(TPM2_ST_NO_SESSIONS, TPM2_CC_STARTUP).u16(su).finish()
}

/// `TPM2_Shutdown(su)`.
pub fn tpm2_shutdown(su: u16) -> Vec<u8> {
    Command::new(TPM2_ST_NO_SESSIONS, TPM2_CC_SHUTDOWN).u16(su).finish()
}

/// `TPM2_GetRandom(n)`.
pub fn tpm2_get_random(n: u16) -> Vec<u8> {
    Command::new(TPM2_ST_NO_SESSIONS, TPM2_CC_GET_RANDOM).u16(n).finish()
}

/// `TPM2_ReadPublic(handle)`.
pub fn tpm2_read_public(handle: u32) -> Vec<u8> {
    Command::new(TPM2_ST_NO_SESSIONS, TPM2_CC_READ_PUBLIC).u32(handle).finish()
}

/// `TPM2_PCR_Read` of a marshalled `TPML_PCR_SELECTION` (count, then per bank: hash
/// algorithm, size of select, the bitmap).
pub fn tpm2_pcr_read(selection: &[u8]) -> Vec<u8> {
    Command::new(TPM2_ST_NO_SESSIONS, TPM2_CC_PCR_READ).bytes(selection).finish()
}

/// `TPM2_PCR_Read` of the PCRs set in the 3-byte bitmap `select` of bank `alg`.
pub fn tpm2_pcr_read_bitmap(alg: u16, select: [u8; 3]) -> Vec<u8> {
    Command::new(TPM2_ST_NO_SESSIONS, TPM2_CC_PCR_READ).u32(1).u16(alg).u8(3).bytes(&select).finish()
}

/// `TPM2_PCR_Extend(pcr, SHA-256 = digest)` with an empty-password session.
pub fn tpm2_pcr_extend(pcr: u32, digest: &[u8; 32]) -> Vec<u8> {
    Command::new(TPM2_ST_SESSIONS, TPM2_CC_PCR_EXTEND)
        .u32(pcr)
        .password_session()
        .u32(1) // TPML_DIGEST_VALUES.count
        .u16(TPM2_ALG_SHA256)
        .bytes(digest)
        .finish()
}

/// TPM 1.2 `TPM_Startup(TPM_ST_CLEAR)`.
pub fn tpm12_startup_clear() -> Vec<u8> {
    Command::new(TPM12_TAG_RQU_COMMAND, TPM12_ORD_STARTUP).u16(TPM12_ST_CLEAR).finish()
}

/// TPM 1.2 `TPM_GetRandom(n)`.
pub fn tpm12_get_random(n: u32) -> Vec<u8> {
    Command::new(TPM12_TAG_RQU_COMMAND, TPM12_ORD_GET_RANDOM).u32(n).finish()
}

/// TPM 1.2 `TPM_GetCapability(TPM_CAP_PROPERTY, prop)` (what Linux asks at probe).
pub fn tpm12_get_capability_property(prop: u32) -> Vec<u8> {
    Command::new(TPM12_TAG_RQU_COMMAND, TPM12_ORD_GET_CAPABILITY)
        .u32(TPM12_CAP_PROPERTY)
        .u32(4)
        .u32(prop)
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GETRANDOM: [u8; 12] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 16];

    #[test]
    fn accepts_well_formed_command() {
        let h = parse_command(&GETRANDOM, Family::Tpm2, 4096).unwrap();
        assert_eq!(h, CommandHeader { tag: 0x8001, size: 12, code: 0x17b });
    }

    #[test]
    fn rejects_short_header() {
        for len in 0..HEADER_LEN {
            assert_eq!(
                parse_command(&GETRANDOM[..len], Family::Tpm2, 4096),
                Err(FramingError::Short { len })
            );
        }
    }

    #[test]
    fn rejects_size_mismatch_both_ways() {
        let mut long = GETRANDOM.to_vec();
        long.push(0);
        assert_eq!(
            parse_command(&long, Family::Tpm2, 4096),
            Err(FramingError::SizeMismatch { declared: 12, actual: 13 })
        );
        let mut lying = GETRANDOM;
        lying[5] = 11;
        assert_eq!(
            parse_command(&lying, Family::Tpm2, 4096),
            Err(FramingError::SizeMismatch { declared: 11, actual: 12 })
        );
    }

    #[test]
    fn rejects_oversize_declared_or_actual() {
        let mut huge = GETRANDOM;
        huge[2] = 0xff;
        assert!(matches!(
            parse_command(&huge, Family::Tpm2, 4096),
            Err(FramingError::TooLarge { max: 4096, .. })
        ));
        let garbage = vec![0x80u8; 65536];
        assert!(matches!(
            parse_command(&garbage, Family::Tpm2, 4096),
            Err(FramingError::TooLarge { size, max: 4096 }) if size >= 65536
        ));
    }

    #[test]
    fn rejects_foreign_tags() {
        let mut t = GETRANDOM;
        t[0] = 0x00;
        t[1] = 0xC1;
        assert_eq!(parse_command(&t, Family::Tpm2, 4096), Err(FramingError::BadTag(0xC1)));
        assert!(parse_command(&t, Family::Tpm12, 4096).is_ok());
        assert_eq!(parse_command(&GETRANDOM, Family::Tpm12, 4096), Err(FramingError::BadTag(0x8001)));
    }

    #[test]
    fn error_response_is_a_valid_header() {
        let r = error_response(Family::Tpm2, TPM2_RC_COMMAND_SIZE);
        assert_eq!(r, [0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x01, 0x42]);
        assert_eq!(response_code(&r), Some(TPM2_RC_COMMAND_SIZE));
        let r = error_response(Family::Tpm12, TPM12_FAIL);
        assert_eq!(&r[..2], &[0x00, 0xC4]);
    }

    #[test]
    fn builders_make_the_tcg_bytes() {
        assert_eq!(tpm2_startup(TPM2_SU_CLEAR), [0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x44, 0, 0]);
        assert_eq!(tpm2_get_random(16), GETRANDOM);
        assert_eq!(tpm2_read_public(0x8101_0001), [0x80, 0x01, 0, 0, 0, 14, 0, 0, 0x01, 0x73, 0x81, 0x01, 0, 1]);
        assert_eq!(
            tpm2_pcr_read_bitmap(TPM2_ALG_SHA256, [1, 0, 0]),
            [0x80, 0x01, 0, 0, 0, 20, 0, 0, 0x01, 0x7e, 0, 0, 0, 1, 0, 0x0b, 3, 1, 0, 0]
        );
        let extend = tpm2_pcr_extend(16, &[0xaa; 32]);
        assert_eq!(hex::encode(&extend[..31]), "80020000004100000182000000100000000940000009000000000000000001");
        assert_eq!(&extend[31..33], &[0, 0x0b]);
        assert_eq!(extend.len(), 65);
        assert_eq!(tpm12_startup_clear(), [0x00, 0xC1, 0, 0, 0, 0x0C, 0, 0, 0, 0x99, 0, 0x01]);
        assert_eq!(tpm12_get_random(16), [0x00, 0xC1, 0, 0, 0, 0x0E, 0, 0, 0, 0x46, 0, 0, 0, 0x10]);
        assert_eq!(
            tpm12_get_capability_property(TPM12_CAP_PROP_TIS_TIMEOUT),
            [0x00, 0xC1, 0, 0, 0, 22, 0, 0, 0, 0x65, 0, 0, 0, 5, 0, 0, 0, 4, 0, 0, 0x01, 0x15]
        );
    }

    #[test]
    fn parse_helpers() {
        let r = [0x80, 0x01, 0, 0, 0, 0x0a, 0, 0, 0x01, 0x01];
        assert_eq!(response_code(&r), Some(TPM2_RC_FAILURE));
        assert_eq!(response_code(&r[..9]), None);
        assert_eq!(tpm2b_at(&[0, 2, 7, 8, 9], 0), Some(&[0, 2, 7, 8][..]));
        assert_eq!(tpm2b_at(&[0, 4, 7, 8, 9], 0), None);
        assert_eq!(be_u32(&r, 6), Some(0x101));
        assert_eq!(be_u32(&r, 7), None);
    }

    #[test]
    fn startup_packet_parses() {
        let s = tpm2_startup(TPM2_SU_CLEAR);
        assert_eq!(parse_command(&s, Family::Tpm2, 4096).unwrap().code, TPM2_CC_STARTUP);
        assert_eq!(parse_command(&tpm2_shutdown(TPM2_SU_STATE), Family::Tpm2, 12).unwrap().code, TPM2_CC_SHUTDOWN);
    }
}

/// TPM 2.0 commands on an 8-byte NV counter under the owner hierarchy with an empty
/// password: what the tests and benchmarks send to make a vTPM change (and so write) its state.
pub mod nv_counter {
    use super::TPM2_RH_OWNER as TPM_RH_OWNER;

    fn command(cc: u32, handles: &[u32], params: &[u8]) -> Vec<u8> {
        let c = handles.iter().fold(super::Command::new(super::TPM2_ST_SESSIONS, cc), |c, h| c.u32(*h));
        c.password_session().bytes(params).finish()
    }

    /// TPM2_NV_DefineSpace of an 8-byte `TPM_NT_COUNTER` at `index` (owner read/write, no auth value).
    pub fn define(index: u32) -> Vec<u8> {
        let mut p = vec![0, 0]; // auth: empty
        p.extend_from_slice(&14u16.to_be_bytes()); // TPM2B_NV_PUBLIC size
        p.extend_from_slice(&index.to_be_bytes());
        p.extend_from_slice(&0x000bu16.to_be_bytes()); // nameAlg SHA-256
        p.extend_from_slice(&0x0002_0012u32.to_be_bytes()); // OWNERWRITE | OWNERREAD | TPM_NT_COUNTER
        p.extend_from_slice(&[0, 0]); // authPolicy: empty
        p.extend_from_slice(&8u16.to_be_bytes()); // dataSize
        command(super::TPM2_CC_NV_DEFINE_SPACE, &[TPM_RH_OWNER], &p)
    }

    /// TPM2_NV_Increment of the counter at `index`.
    pub fn increment(index: u32) -> Vec<u8> {
        command(super::TPM2_CC_NV_INCREMENT, &[TPM_RH_OWNER, index], &[])
    }

    /// TPM2_NV_Read of the counter at `index` (8 bytes from offset 0).
    pub fn read(index: u32) -> Vec<u8> {
        command(super::TPM2_CC_NV_READ, &[TPM_RH_OWNER, index], &[0, 8, 0, 0])
    }

    /// The counter's value in a successful TPM2_NV_Read response.
    pub fn value(response: &[u8]) -> Option<u64> {
        Some(u64::from_be_bytes(response.get(16..24)?.try_into().ok()?))
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn the_bytes_are_the_tpm_2_0_commands() {
            // As the tests built them by hand before (kill9, durability, state rollback, P6).
            assert_eq!(hex::encode(super::define(0x0150_0020)), "80020000002d0000012a40000001000000094000000900000000000000000e01500020000b0002001200000008");
            assert_eq!(hex::encode(super::increment(0x0150_0020)), "80020000001f00000134400000010150002000000009400000090000000000");
            assert_eq!(hex::encode(super::read(0x0150_0020)), "8002000000230000014e40000001015000200000000940000009000000000000080000");
            let mut ok = vec![0u8; 24];
            ok[16..24].copy_from_slice(&7u64.to_be_bytes());
            assert_eq!(super::value(&ok), Some(7));
            assert_eq!(super::value(&ok[..20]), None);
        }
    }
}
