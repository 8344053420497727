//! swtpm's control channel, as QEMU (`-tpmdev emulator`) and the tpm2-tss
//! `swtpm` TCTI speak it.
//!
//! Source of truth: swtpm `include/swtpm/tpm_ioctl.h` ("Commands used by the
//! non-CUSE TPMs": every field big-endian) and the control channel
//! specification on swtpm's wiki. A request is a `u32` command code followed
//! by that command's fixed request body; a response is a `u32` result
//! (`ptm_res`, 0 = success) followed by the command's response fields.
//!
//! Unlike swtpm, which takes whatever one `read()` returns as the request, we
//! frame by the known body size of each command, so a request split across
//! reads is still understood. Variable-length bodies (`HASH_DATA`,
//! `SET_STATEBLOB`) are capped by [`MAX_VARIABLE_BODY`] before allocation.

/// Control command codes (`CMD_*` in `tpm_ioctl.h`).
#[allow(missing_docs)]
pub mod cmd {
    pub const GET_CAPABILITY: u32 = 0x01;
    pub const INIT: u32 = 0x02;
    pub const SHUTDOWN: u32 = 0x03;
    pub const GET_TPMESTABLISHED: u32 = 0x04;
    pub const SET_LOCALITY: u32 = 0x05;
    pub const HASH_START: u32 = 0x06;
    pub const HASH_DATA: u32 = 0x07;
    pub const HASH_END: u32 = 0x08;
    pub const CANCEL_TPM_CMD: u32 = 0x09;
    pub const STORE_VOLATILE: u32 = 0x0a;
    pub const RESET_TPMESTABLISHED: u32 = 0x0b;
    pub const GET_STATEBLOB: u32 = 0x0c;
    pub const SET_STATEBLOB: u32 = 0x0d;
    pub const STOP: u32 = 0x0e;
    pub const GET_CONFIG: u32 = 0x0f;
    pub const SET_DATAFD: u32 = 0x10;
    pub const SET_BUFFERSIZE: u32 = 0x11;
    pub const GET_INFO: u32 = 0x12;
}

/// Capability bits (`PTM_CAP_*`) returned by `CMD_GET_CAPABILITY`.
#[allow(missing_docs)]
pub mod cap {
    pub const INIT: u64 = 1;
    pub const SHUTDOWN: u64 = 1 << 1;
    pub const GET_TPMESTABLISHED: u64 = 1 << 2;
    pub const SET_LOCALITY: u64 = 1 << 3;
    pub const HASHING: u64 = 1 << 4;
    pub const CANCEL_TPM_CMD: u64 = 1 << 5;
    pub const STORE_VOLATILE: u64 = 1 << 6;
    pub const RESET_TPMESTABLISHED: u64 = 1 << 7;
    pub const GET_STATEBLOB: u64 = 1 << 8;
    pub const SET_STATEBLOB: u64 = 1 << 9;
    pub const STOP: u64 = 1 << 10;
    pub const GET_CONFIG: u64 = 1 << 11;
    pub const SET_DATAFD: u64 = 1 << 12;
    pub const SET_BUFFERSIZE: u64 = 1 << 13;
    pub const GET_INFO: u64 = 1 << 14;
}

/// `PTM_INIT_FLAG_DELETE_VOLATILE`: discard saved volatile state on init.
pub const INIT_FLAG_DELETE_VOLATILE: u32 = 1;

/// Result codes used on the control channel (TPM 1.2 numbering, as swtpm).
#[allow(missing_docs)]
pub mod res {
    pub const SUCCESS: u32 = 0;
    pub const BAD_PARAMETER: u32 = 0x03;
    pub const FAIL: u32 = 0x09;
    pub const BAD_ORDINAL: u32 = 0x0a;
    pub const BAD_LOCALITY: u32 = 0x3d;
}

/// Cap on variable-length request bodies. swtpm's own input buffer is 4 KiB;
/// we refuse more rather than allocate what a peer asks for.
pub const MAX_VARIABLE_BODY: usize = 4096;

/// A decoded control request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `CMD_GET_CAPABILITY`.
    GetCapability,
    /// `CMD_INIT` with its `init_flags`.
    Init {
        /// `PTM_INIT_FLAG_*` bits.
        flags: u32,
    },
    /// `CMD_SHUTDOWN`: stop the TPM and end the process.
    Shutdown,
    /// `CMD_GET_TPMESTABLISHED`.
    GetTpmEstablished,
    /// `CMD_SET_LOCALITY`.
    SetLocality(u8),
    /// `CMD_CANCEL_TPM_CMD`.
    Cancel,
    /// `CMD_STORE_VOLATILE`.
    StoreVolatile,
    /// `CMD_RESET_TPMESTABLISHED` at the given locality.
    ResetTpmEstablished(u8),
    /// `CMD_STOP`: stop the TPM, keep the process.
    Stop,
    /// `CMD_GET_CONFIG`.
    GetConfig,
    /// `CMD_SET_DATAFD`: the data-channel fd arrives as `SCM_RIGHTS`.
    SetDataFd,
    /// `CMD_SET_BUFFERSIZE`; 0 queries.
    SetBufferSize(u32),
    /// `CMD_GET_INFO`.
    GetInfo {
        /// `SWTPM_INFO_*` flags.
        flags: u64,
        /// Offset into the answer.
        offset: u32,
    },
    /// A command we know but do not implement (hashing, state blobs): answered
    /// with [`res::BAD_ORDINAL`] after its body has been consumed.
    Unsupported(u32),
}

/// Why a control request could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CtrlError {
    /// Unknown command code; the stream cannot be resynchronised.
    #[error("unknown control command {0:#x}")]
    UnknownCommand(u32),
    /// A variable body larger than [`MAX_VARIABLE_BODY`].
    #[error("control body of {0} bytes exceeds {MAX_VARIABLE_BODY}")]
    BodyTooLarge(usize),
}

/// How many body bytes follow the command code, given the bytes seen so far
/// of the body (variable-length commands carry their length up front).
///
/// Returns `Ok(None)` when more bytes are needed to know.
pub fn body_len(code: u32, body_so_far: &[u8]) -> Result<Option<usize>, CtrlError> {
    let fixed = match code {
        cmd::GET_CAPABILITY | cmd::SHUTDOWN | cmd::GET_TPMESTABLISHED | cmd::HASH_START
        | cmd::HASH_END | cmd::CANCEL_TPM_CMD | cmd::STORE_VOLATILE | cmd::STOP
        | cmd::GET_CONFIG | cmd::SET_DATAFD => 0,
        cmd::INIT | cmd::SET_BUFFERSIZE => 4,
        cmd::SET_LOCALITY | cmd::RESET_TPMESTABLISHED => 1,
        cmd::GET_STATEBLOB => 12,
        cmd::GET_INFO => 16,
        cmd::HASH_DATA => {
            if body_so_far.len() < 4 {
                return Ok(None);
            }
            let n = u32::from_be_bytes(body_so_far[0..4].try_into().expect("4 bytes")) as usize;
            if n > MAX_VARIABLE_BODY {
                return Err(CtrlError::BodyTooLarge(n));
            }
            4 + n
        }
        cmd::SET_STATEBLOB => {
            if body_so_far.len() < 12 {
                return Ok(None);
            }
            let n = u32::from_be_bytes(body_so_far[8..12].try_into().expect("4 bytes")) as usize;
            if n > MAX_VARIABLE_BODY {
                return Err(CtrlError::BodyTooLarge(n));
            }
            12 + n
        }
        other => return Err(CtrlError::UnknownCommand(other)),
    };
    Ok(Some(fixed))
}

/// Decodes a complete request (code plus exactly [`body_len`] body bytes).
pub fn decode(code: u32, body: &[u8]) -> Result<Request, CtrlError> {
    let need = body_len(code, body)?.unwrap_or(usize::MAX);
    if body.len() != need {
        // Callers frame with body_len first; a mismatch is a caller bug, but
        // it must not panic on peer input either.
        return Ok(Request::Unsupported(code));
    }
    let be32 = |at: usize| u32::from_be_bytes(body[at..at + 4].try_into().expect("4 bytes"));
    Ok(match code {
        cmd::GET_CAPABILITY => Request::GetCapability,
        cmd::INIT => Request::Init { flags: be32(0) },
        cmd::SHUTDOWN => Request::Shutdown,
        cmd::GET_TPMESTABLISHED => Request::GetTpmEstablished,
        cmd::SET_LOCALITY => Request::SetLocality(body[0]),
        cmd::CANCEL_TPM_CMD => Request::Cancel,
        cmd::STORE_VOLATILE => Request::StoreVolatile,
        cmd::RESET_TPMESTABLISHED => Request::ResetTpmEstablished(body[0]),
        cmd::STOP => Request::Stop,
        cmd::GET_CONFIG => Request::GetConfig,
        cmd::SET_DATAFD => Request::SetDataFd,
        cmd::SET_BUFFERSIZE => Request::SetBufferSize(be32(0)),
        cmd::GET_INFO => Request::GetInfo {
            flags: u64::from_be_bytes(body[0..8].try_into().expect("8 bytes")),
            offset: be32(8),
        },
        other => Request::Unsupported(other),
    })
}

/// Encodes a response made of a result code and further big-endian fields.
pub fn response(result: u32, rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + rest.len());
    out.extend_from_slice(&result.to_be_bytes());
    out.extend_from_slice(rest);
    out
}

/// The `CMD_GET_CAPABILITY` response: a bare big-endian `u64` (no result code).
pub fn capability_response(caps: u64) -> [u8; 8] {
    caps.to_be_bytes()
}

/// The `CMD_GET_TPMESTABLISHED` response: `ptm_est.u.resp` is
/// `{u32 tpm_result; u8 bit}` padded to 8 bytes by C alignment.
pub fn established_response(result: u32, bit: bool) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[0..4].copy_from_slice(&result.to_be_bytes());
    out[4] = bit as u8;
    out
}

/// The `CMD_SET_BUFFERSIZE` response: result, size in use, min, max.
pub fn buffersize_response(result: u32, size: u32, min: u32, max: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, v) in [result, size, min, max].into_iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_bodies() {
        assert_eq!(body_len(cmd::GET_CAPABILITY, &[]), Ok(Some(0)));
        assert_eq!(body_len(cmd::INIT, &[]), Ok(Some(4)));
        assert_eq!(body_len(cmd::SET_LOCALITY, &[]), Ok(Some(1)));
        assert_eq!(body_len(cmd::GET_INFO, &[]), Ok(Some(16)));
        assert_eq!(body_len(0x99, &[]), Err(CtrlError::UnknownCommand(0x99)));
    }

    #[test]
    fn variable_bodies_are_capped_before_allocation() {
        assert_eq!(body_len(cmd::HASH_DATA, &[0, 0]), Ok(None));
        assert_eq!(body_len(cmd::HASH_DATA, &[0, 0, 0, 8]), Ok(Some(12)));
        assert_eq!(body_len(cmd::HASH_DATA, &[0xff, 0xff, 0xff, 0xff]), Err(CtrlError::BodyTooLarge(0xffff_ffff)));
        let mut set = [0u8; 12];
        set[8..12].copy_from_slice(&5000u32.to_be_bytes());
        assert_eq!(body_len(cmd::SET_STATEBLOB, &set), Err(CtrlError::BodyTooLarge(5000)));
    }

    #[test]
    fn decodes_requests() {
        assert_eq!(decode(cmd::INIT, &[0, 0, 0, 1]), Ok(Request::Init { flags: 1 }));
        assert_eq!(decode(cmd::SET_LOCALITY, &[3]), Ok(Request::SetLocality(3)));
        assert_eq!(decode(cmd::SET_BUFFERSIZE, &[0, 0, 0x10, 0]), Ok(Request::SetBufferSize(4096)));
        assert_eq!(decode(cmd::HASH_START, &[]), Ok(Request::Unsupported(cmd::HASH_START)));
        // A body of the wrong length never panics.
        assert_eq!(decode(cmd::INIT, &[0]), Ok(Request::Unsupported(cmd::INIT)));
    }

    #[test]
    fn response_layouts_match_tpm_ioctl_h() {
        assert_eq!(response(0, &[]), vec![0, 0, 0, 0]);
        assert_eq!(established_response(0, true), [0, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(buffersize_response(0, 4096, 128, 4096)[4..8], [0, 0, 0x10, 0]);
        assert_eq!(capability_response(cap::INIT | cap::STOP), [0, 0, 0, 0, 0, 0, 0x04, 0x01]);
    }
}
