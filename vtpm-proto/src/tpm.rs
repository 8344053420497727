//! TPM command and response framing (TPM 2.0 Part 1 §18 "Command/Response
//! Structure", and the TPM 1.2 equivalent in TPM Main Part 3).
//!
//! Both families share a 10-byte big-endian header: `tag: u16`,
//! `size: u32` (whole packet, header included) and `code: u32` (command
//! code or response code). Everything a vTPM receives goes through
//! [`parse_command`] first; a packet it rejects is answered with
//! [`error_response`] and never reaches the engine.

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

/// `TPM2_Startup(su)`: the command a vTPM sends itself when it is started
/// with the `startup-clear` behaviour (as swtpm's `--flags startup-clear`).
pub fn tpm2_startup(su: u16) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0..2].copy_from_slice(&TPM2_ST_NO_SESSIONS.to_be_bytes());
    out[2..6].copy_from_slice(&12u32.to_be_bytes());
    out[6..10].copy_from_slice(&TPM2_CC_STARTUP.to_be_bytes());
    out[10..12].copy_from_slice(&su.to_be_bytes());
    out
}

/// `TPM2_Shutdown(su)`.
pub fn tpm2_shutdown(su: u16) -> [u8; 12] {
    let mut out = tpm2_startup(su);
    out[6..10].copy_from_slice(&TPM2_CC_SHUTDOWN.to_be_bytes());
    out
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
    fn startup_packet_parses() {
        let s = tpm2_startup(TPM2_SU_CLEAR);
        assert_eq!(parse_command(&s, Family::Tpm2, 4096).unwrap().code, TPM2_CC_STARTUP);
        assert_eq!(parse_command(&tpm2_shutdown(TPM2_SU_STATE), Family::Tpm2, 12).unwrap().code, TPM2_CC_SHUTDOWN);
    }
}

/// TPM 2.0 commands on an 8-byte NV counter under the owner hierarchy with an empty
/// password: what the tests and benchmarks send to make a vTPM change (and so write) its state.
pub mod nv_counter {
    const TPM_RH_OWNER: u32 = 0x4000_0001;
    /// A password session (`TPM_RS_PW`) with an empty password: authorizationSize 9.
    const PW_AUTH: [u8; 13] = [0, 0, 0, 9, 0x40, 0, 0, 0x09, 0, 0, 0, 0, 0];

    fn command(cc: u32, handles: &[u32], params: &[u8]) -> Vec<u8> {
        let mut c = super::TPM2_ST_SESSIONS.to_be_bytes().to_vec();
        c.extend_from_slice(&[0; 4]);
        c.extend_from_slice(&cc.to_be_bytes());
        for h in handles {
            c.extend_from_slice(&h.to_be_bytes());
        }
        c.extend_from_slice(&PW_AUTH);
        c.extend_from_slice(params);
        let n = c.len() as u32;
        c[2..6].copy_from_slice(&n.to_be_bytes());
        c
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
        command(0x12a, &[TPM_RH_OWNER], &p)
    }

    /// TPM2_NV_Increment of the counter at `index`.
    pub fn increment(index: u32) -> Vec<u8> {
        command(0x134, &[TPM_RH_OWNER, index], &[])
    }

    /// TPM2_NV_Read of the counter at `index` (8 bytes from offset 0).
    pub fn read(index: u32) -> Vec<u8> {
        command(0x14e, &[TPM_RH_OWNER, index], &[0, 8, 0, 0])
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
