//! Minimal TPM 2.0 command marshalling, enough for provisioning and tests.
//!
//! This is deliberately tiny: a [`Command`] builder that fills in the header size, the
//! empty-password authorization session, and [`response_code`] for reading replies.
#![forbid(unsafe_code)]

/// `TPM_ST_NO_SESSIONS`.
pub const ST_NO_SESSIONS: u16 = 0x8001;
/// `TPM_ST_SESSIONS`.
pub const ST_SESSIONS: u16 = 0x8002;
/// `TPM_RC_SUCCESS`.
pub const RC_SUCCESS: u32 = 0x000;
/// `TPM_RC_INITIALIZE`: TPM2_Startup was already executed.
pub const RC_INITIALIZE: u32 = 0x100;
/// `TPM_RC_FAILURE`: the code the engine uses for its own error responses.
pub const RC_FAILURE: u32 = 0x101;
/// `TPM_SU_CLEAR`.
pub const SU_CLEAR: u16 = 0x0000;
/// `TPM_SU_STATE`.
pub const SU_STATE: u16 = 0x0001;
/// `TPM_RS_PW`: the password authorization session handle.
pub const RS_PW: u32 = 0x4000_0009;
/// `TPM_RH_OWNER`.
pub const RH_OWNER: u32 = 0x4000_0001;
/// `TPM_RH_ENDORSEMENT`.
pub const RH_ENDORSEMENT: u32 = 0x4000_000B;
/// `TPM_RH_PLATFORM`.
pub const RH_PLATFORM: u32 = 0x4000_000C;
/// Persistent handle of the RSA-2048 EK (TCG EK Credential Profile).
pub const EK_RSA_HANDLE: u32 = 0x8101_0001;

/// `TPM_CC_Startup`.
pub const CC_STARTUP: u32 = 0x144;
/// `TPM_CC_Shutdown`.
pub const CC_SHUTDOWN: u32 = 0x145;
/// `TPM_CC_CreatePrimary`.
pub const CC_CREATE_PRIMARY: u32 = 0x131;
/// `TPM_CC_EvictControl`.
pub const CC_EVICT_CONTROL: u32 = 0x120;
/// `TPM_CC_FlushContext`.
pub const CC_FLUSH_CONTEXT: u32 = 0x165;
/// `TPM_CC_ReadPublic`.
pub const CC_READ_PUBLIC: u32 = 0x173;
/// `TPM_CC_NV_DefineSpace`.
pub const CC_NV_DEFINE_SPACE: u32 = 0x12A;
/// `TPM_CC_NV_Write`.
pub const CC_NV_WRITE: u32 = 0x137;
/// `TPM_CC_NV_WriteLock`.
pub const CC_NV_WRITE_LOCK: u32 = 0x138;
/// `TPM_CC_NV_Read`.
pub const CC_NV_READ: u32 = 0x14E;
/// `TPM_CC_NV_ReadPublic`.
pub const CC_NV_READ_PUBLIC: u32 = 0x169;
/// `TPM_CC_GetCapability`.
pub const CC_GET_CAPABILITY: u32 = 0x17A;

/// Builder for one TPM 2.0 command; [`Command::finish`] patches the size field.
#[derive(Debug, Clone)]
pub struct Command {
    buf: Vec<u8>,
}

impl Command {
    /// Starts a command with the given tag (`ST_NO_SESSIONS` / `ST_SESSIONS`) and command code.
    pub fn new(tag: u16, cc: u32) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&tag.to_be_bytes());
        buf.extend_from_slice(&0u32.to_be_bytes());
        buf.extend_from_slice(&cc.to_be_bytes());
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

    /// Appends an authorization area with one empty-password session (`TPM_RS_PW`).
    /// Call it after the handles and before the parameters.
    pub fn password_session(self) -> Self {
        self.u32(9).u32(RS_PW).u16(0).u8(0).u16(0)
    }

    /// Patches the size field and returns the command bytes.
    pub fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[2..6].copy_from_slice(&len.to_be_bytes());
        self.buf
    }
}

/// `TPM2_Startup(su)`.
pub fn startup(su: u16) -> Vec<u8> {
    Command::new(ST_NO_SESSIONS, CC_STARTUP).u16(su).finish()
}

/// `TPM2_Shutdown(su)`.
pub fn shutdown(su: u16) -> Vec<u8> {
    Command::new(ST_NO_SESSIONS, CC_SHUTDOWN).u16(su).finish()
}

/// The response code of a TPM response (bytes 6..10), or `None` if shorter than a header.
pub fn response_code(resp: &[u8]) -> Option<u32> {
    resp.get(6..10)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Reads a big-endian `u32` at `off`.
pub(crate) fn be_u32(buf: &[u8], off: usize) -> Option<u32> {
    let b = buf.get(off..off.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Returns the `TPM2B` (size prefix included) starting at `off`.
pub(crate) fn tpm2b_at(buf: &[u8], off: usize) -> Option<&[u8]> {
    let b = buf.get(off..off.checked_add(2)?)?;
    let n = usize::from(u16::from_be_bytes([b[0], b[1]]));
    buf.get(off..off + 2 + n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_bytes() {
        assert_eq!(
            startup(SU_CLEAR),
            [0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x44, 0, 0]
        );
    }

    #[test]
    fn parse_helpers() {
        let r = [0x80, 0x01, 0, 0, 0, 0x0a, 0, 0, 0x01, 0x01];
        assert_eq!(response_code(&r), Some(RC_FAILURE));
        assert_eq!(response_code(&r[..9]), None);
        assert_eq!(tpm2b_at(&[0, 2, 7, 8, 9], 0), Some(&[0, 2, 7, 8][..]));
        assert_eq!(tpm2b_at(&[0, 4, 7, 8, 9], 0), None);
        assert_eq!(be_u32(&r, 6), Some(0x101));
        assert_eq!(be_u32(&r, 7), None);
    }
}
