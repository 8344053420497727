//! swtpm's control channel, as QEMU (`-tpmdev emulator`) and the tpm2-tss
//! `swtpm` TCTI speak it.
//!
//! Source of truth: swtpm `include/swtpm/tpm_ioctl.h` ("Commands used by the
//! non-CUSE TPMs": every field big-endian) and swtpm's control-channel server.
//! A request is a `u32` command code followed by that command's request body;
//! a response is a `u32` result (`ptm_res`, 0 = success) followed by the
//! command's response fields — only the `u.resp` part of each C union.
//!
//! Request sizes differ between clients, and the server must take both: QEMU
//! sends whole C unions (`sizeof(ptm_loc)` = 4 bytes for `CMD_SET_LOCALITY`,
//! the locality and 3 padding bytes), `swtpm_ioctl` and the tpm2-tss TCTI send
//! only `u.req` (1 byte). swtpm reads a request as "the fixed part of the
//! command, plus whatever else the client wrote with it" and checks the size
//! afterwards, so a server must do the same: [`framing`] says how many bytes
//! must arrive, the server adds what is already queued (up to
//! [`MAX_BODY`]), and [`decode`] applies swtpm's size checks to the result.
//! Bodies that announce a length (`HASH_DATA`, `SET_STATEBLOB`) are read by
//! that length; the announced length is checked against a cap before anything
//! is allocated.

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
    pub const LOCK_STORAGE: u32 = 0x13;
}

/// Capability bits (`PTM_CAP_*`) returned by `CMD_GET_CAPABILITY`.
#[allow(missing_docs)]
pub mod cap {
    pub const INIT: u32 = 1;
    pub const SHUTDOWN: u32 = 1 << 1;
    pub const GET_TPMESTABLISHED: u32 = 1 << 2;
    pub const SET_LOCALITY: u32 = 1 << 3;
    pub const HASHING: u32 = 1 << 4;
    pub const CANCEL_TPM_CMD: u32 = 1 << 5;
    pub const STORE_VOLATILE: u32 = 1 << 6;
    pub const RESET_TPMESTABLISHED: u32 = 1 << 7;
    pub const GET_STATEBLOB: u32 = 1 << 8;
    pub const SET_STATEBLOB: u32 = 1 << 9;
    pub const STOP: u32 = 1 << 10;
    pub const GET_CONFIG: u32 = 1 << 11;
    pub const SET_DATAFD: u32 = 1 << 12;
    pub const SET_BUFFERSIZE: u32 = 1 << 13;
    pub const GET_INFO: u32 = 1 << 14;
    pub const SEND_COMMAND_HEADER: u32 = 1 << 15;
    pub const LOCK_STORAGE: u32 = 1 << 16;
}

/// `PTM_INIT_FLAG_DELETE_VOLATILE`: discard saved volatile state on init.
pub const INIT_FLAG_DELETE_VOLATILE: u32 = 1;

/// `PTM_STATE_FLAG_ENCRYPTED`: on `CMD_GET_STATEBLOB` output, the blob is encrypted.
pub const STATE_FLAG_ENCRYPTED: u32 = 2;

/// Result codes used on the control channel (TPM 1.2 numbering, as swtpm).
#[allow(missing_docs)]
pub mod res {
    pub const SUCCESS: u32 = 0;
    pub const BAD_PARAMETER: u32 = 0x03;
    pub const FAIL: u32 = 0x09;
    /// Unknown command, or one that needs a running TPM while it is stopped
    /// (or a stopped one while it runs).
    pub const BAD_ORDINAL: u32 = 0x0a;
    pub const SIZE: u32 = 0x17;
    pub const IOERROR: u32 = 0x1f;
    pub const DECRYPT_ERROR: u32 = 0x21;
    pub const BAD_LOCALITY: u32 = 0x3d;
}

/// The largest request body taken in one read, as swtpm's input buffer:
/// `ptm_hdata.u.req` (a `u32` length and 4096 data bytes) is the largest union.
pub const MAX_BODY: usize = 4 + 4096;

/// Cap on the data of length-announcing requests that are kept in memory.
/// Longer announced data is consumed in chunks and refused (never allocated).
pub const MAX_VARIABLE_BODY: usize = 4096;

/// How the body of a request is framed on the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// At least `min` bytes (swtpm's `sizeof(u.req)`; 0 for commands without
    /// input, and for unknown commands); bytes the client wrote together with
    /// them belong to the request too (QEMU's union padding).
    Fixed {
        /// Bytes that must arrive.
        min: usize,
    },
    /// A header of `header` bytes whose big-endian `u32` at `len_at`
    /// announces how many data bytes follow it.
    Announced {
        /// Header size.
        header: usize,
        /// Offset of the length in the header.
        len_at: usize,
    },
}

/// The framing of command `code`'s request body.
pub fn framing(code: u32) -> Framing {
    let min = match code {
        cmd::HASH_DATA => return Framing::Announced { header: 4, len_at: 0 },
        // ptm_setstate.u.req: state_flags, type, length, data.
        cmd::SET_STATEBLOB => return Framing::Announced { header: 12, len_at: 8 },
        cmd::INIT | cmd::SET_BUFFERSIZE | cmd::LOCK_STORAGE => 4,
        cmd::SET_LOCALITY | cmd::RESET_TPMESTABLISHED => 1,
        cmd::GET_STATEBLOB => 12,
        cmd::GET_INFO => 16,
        _ => 0,
    };
    Framing::Fixed { min }
}

/// The data length an [`Framing::Announced`] header announces.
pub fn announced_len(header: &[u8], len_at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(header.get(len_at..len_at + 4)?.try_into().ok()?))
}

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
    /// `CMD_SHUTDOWN`: stop the TPM and end the process (a vTPM that outlives its controller only stops the TPM).
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
    /// `CMD_GET_STATEBLOB`.
    GetStateBlob {
        /// `PTM_BLOB_TYPE_*`.
        kind: u32,
        /// Offset into the blob.
        offset: u32,
    },
    /// `CMD_SET_STATEBLOB`'s header; the `len` data bytes follow it.
    SetStateBlob {
        /// `PTM_BLOB_TYPE_*`.
        kind: u32,
        /// Announced data length.
        len: u32,
    },
    /// A command of `tpm_ioctl.h` this server does not implement (hashing,
    /// storage locking): its body was consumed whole and it is
    /// answered [`res::BAD_ORDINAL`], as swtpm answers what it does not know.
    Unsupported(u32),
    /// A code `tpm_ioctl.h` does not define: [`res::BAD_ORDINAL`].
    Unknown(u32),
    /// A known command whose body has the wrong size for it (swtpm's
    /// `err_bad_input`): [`res::BAD_PARAMETER`].
    BadSize(u32),
}

/// Decodes a request whose body was framed by [`framing`] (the minimum, plus
/// whatever arrived with it), applying swtpm's size checks: commands without
/// input take no body, `CMD_INIT` exactly `ptm_init` (4 bytes), the others at
/// least their `u.req` (extra bytes — QEMU's padding — are ignored).
/// `CMD_GET_CAPABILITY` and `CMD_SET_DATAFD` ignore any body, as in swtpm.
pub fn decode(code: u32, body: &[u8]) -> Request {
    let be32 = |at: usize| body.get(at..at + 4).map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")));
    let none = |r: Request| if body.is_empty() { r } else { Request::BadSize(code) };
    let at_least = |n: usize, r: &dyn Fn() -> Request| if body.len() >= n { r() } else { Request::BadSize(code) };
    match code {
        cmd::GET_CAPABILITY => Request::GetCapability,
        cmd::SET_DATAFD => Request::SetDataFd,
        cmd::INIT if body.len() == 4 => Request::Init { flags: be32(0).expect("4 bytes") },
        cmd::INIT => Request::BadSize(code),
        cmd::SHUTDOWN => none(Request::Shutdown),
        cmd::GET_TPMESTABLISHED => none(Request::GetTpmEstablished),
        cmd::SET_LOCALITY => at_least(1, &|| Request::SetLocality(body[0])),
        cmd::CANCEL_TPM_CMD => none(Request::Cancel),
        cmd::STORE_VOLATILE => none(Request::StoreVolatile),
        cmd::RESET_TPMESTABLISHED => at_least(1, &|| Request::ResetTpmEstablished(body[0])),
        cmd::STOP => none(Request::Stop),
        cmd::GET_CONFIG => none(Request::GetConfig),
        cmd::SET_BUFFERSIZE => at_least(4, &|| Request::SetBufferSize(be32(0).expect("4 bytes"))),
        cmd::GET_INFO => at_least(16, &|| Request::GetInfo {
            flags: u64::from_be_bytes(body[0..8].try_into().expect("8 bytes")),
            offset: be32(8).expect("4 bytes"),
        }),
        cmd::HASH_START | cmd::HASH_END => none(Request::Unsupported(code)),
        cmd::HASH_DATA => Request::Unsupported(code),
        cmd::SET_STATEBLOB => at_least(12, &|| Request::SetStateBlob { kind: be32(4).expect("4 bytes"), len: be32(8).expect("4 bytes") }),
        cmd::GET_STATEBLOB => at_least(12, &|| Request::GetStateBlob { kind: be32(4).expect("4 bytes"), offset: be32(8).expect("4 bytes") }),
        cmd::LOCK_STORAGE => at_least(4, &|| Request::Unsupported(code)),
        other => Request::Unknown(other),
    }
}

/// Encodes a response made of a result code and further big-endian fields.
pub fn response(result: u32, rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + rest.len());
    out.extend_from_slice(&result.to_be_bytes());
    out.extend_from_slice(rest);
    out
}

/// The `CMD_GET_CAPABILITY` response, `ptm_cap_n.u.resp`: result 0 and the
/// capability bits (QEMU reads the 8 bytes as one big-endian `u64`).
pub fn capability_response(caps: u32) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[4..8].copy_from_slice(&caps.to_be_bytes());
    out
}

/// The `CMD_GET_TPMESTABLISHED` response: `ptm_est.u.resp` is
/// `{u32 tpm_result; u8 bit; u8 pad[3]}`.
pub fn established_response(result: u32, bit: bool) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[0..4].copy_from_slice(&result.to_be_bytes());
    out[4] = bit as u8;
    out
}

/// The `CMD_GET_STATEBLOB` response, `ptm_getstate.u.resp` with the whole
/// blob in one piece (`length` = `totlength`, as QEMU requires).
pub fn stateblob_response(flags: u32, blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + blob.len());
    out.extend_from_slice(&res::SUCCESS.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&(blob.len() as u32).to_be_bytes());
    out.extend_from_slice(&(blob.len() as u32).to_be_bytes());
    out.extend_from_slice(blob);
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
    fn framing_follows_the_request_unions() {
        assert_eq!(framing(cmd::GET_CAPABILITY), Framing::Fixed { min: 0 });
        assert_eq!(framing(cmd::INIT), Framing::Fixed { min: 4 });
        assert_eq!(framing(cmd::SET_LOCALITY), Framing::Fixed { min: 1 });
        assert_eq!(framing(cmd::RESET_TPMESTABLISHED), Framing::Fixed { min: 1 });
        assert_eq!(framing(cmd::GET_STATEBLOB), Framing::Fixed { min: 12 });
        assert_eq!(framing(cmd::GET_INFO), Framing::Fixed { min: 16 });
        assert_eq!(framing(cmd::LOCK_STORAGE), Framing::Fixed { min: 4 });
        assert_eq!(framing(0x99), Framing::Fixed { min: 0 });
        assert_eq!(framing(cmd::HASH_DATA), Framing::Announced { header: 4, len_at: 0 });
        assert_eq!(framing(cmd::SET_STATEBLOB), Framing::Announced { header: 12, len_at: 8 });
        let mut set = [0u8; 12];
        set[8..12].copy_from_slice(&5000u32.to_be_bytes());
        assert_eq!(announced_len(&set, 8), Some(5000));
        assert_eq!(announced_len(&set[..10], 8), None);
    }

    #[test]
    fn qemu_padding_and_bare_requests_both_decode() {
        // QEMU: sizeof(ptm_loc) = 4 bytes; swtpm_ioctl/tpm2-tss: 1 byte.
        assert_eq!(decode(cmd::SET_LOCALITY, &[3, 0, 0, 0]), Request::SetLocality(3));
        assert_eq!(decode(cmd::SET_LOCALITY, &[3]), Request::SetLocality(3));
        assert_eq!(decode(cmd::RESET_TPMESTABLISHED, &[3, 0, 0, 0]), Request::ResetTpmEstablished(3));
        assert_eq!(decode(cmd::INIT, &[0, 0, 0, 1]), Request::Init { flags: 1 });
        assert_eq!(decode(cmd::SET_BUFFERSIZE, &[0, 0, 0x10, 0]), Request::SetBufferSize(4096));
    }

    #[test]
    fn sizes_are_checked_as_swtpm_does() {
        assert_eq!(decode(cmd::INIT, &[0]), Request::BadSize(cmd::INIT));
        assert_eq!(decode(cmd::INIT, &[0; 5]), Request::BadSize(cmd::INIT));
        assert_eq!(decode(cmd::STOP, &[0]), Request::BadSize(cmd::STOP));
        assert_eq!(decode(cmd::SHUTDOWN, &[]), Request::Shutdown);
        assert_eq!(decode(cmd::SET_LOCALITY, &[]), Request::BadSize(cmd::SET_LOCALITY));
        assert_eq!(decode(cmd::GET_INFO, &[0; 15]), Request::BadSize(cmd::GET_INFO));
        assert_eq!(decode(cmd::GET_CAPABILITY, &[1, 2]), Request::GetCapability);
        assert_eq!(decode(cmd::HASH_START, &[]), Request::Unsupported(cmd::HASH_START));
        assert_eq!(decode(cmd::LOCK_STORAGE, &[0, 0, 1, 44]), Request::Unsupported(cmd::LOCK_STORAGE));
        assert_eq!(decode(cmd::GET_STATEBLOB, &[0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0]), Request::GetStateBlob { kind: 2, offset: 0 });
        assert_eq!(decode(cmd::SET_STATEBLOB, &[0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 1, 0]), Request::SetStateBlob { kind: 1, len: 256 });
        assert_eq!(decode(cmd::GET_STATEBLOB, &[0; 8]), Request::BadSize(cmd::GET_STATEBLOB));
        assert_eq!(decode(0x99, &[1, 2, 3]), Request::Unknown(0x99));
    }

    #[test]
    fn response_layouts_match_tpm_ioctl_h() {
        assert_eq!(response(0, &[]), vec![0, 0, 0, 0]);
        assert_eq!(established_response(0, true), [0, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(buffersize_response(0, 4096, 128, 4096)[4..8], [0, 0, 0x10, 0]);
        // ptm_cap_n.u.resp {tpm_result = 0, caps}; QEMU reads it as a be64.
        let c = capability_response(cap::INIT | cap::STOP | cap::LOCK_STORAGE);
        assert_eq!(c, [0, 0, 0, 0, 0, 0x01, 0x04, 0x01]);
        assert_eq!(u64::from_be_bytes(c), u64::from(cap::INIT | cap::STOP | cap::LOCK_STORAGE));
    }
}
