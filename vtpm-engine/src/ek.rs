//! Endorsement-key provisioning for a freshly manufactured TPM 2.0.
#![forbid(unsafe_code)]

use crate::{Engine, EngineError, TpmVersion};
use tpm_wire::{
    Command,
    TPM2_CC_CREATE_PRIMARY, TPM2_CC_EVICT_CONTROL, TPM2_CC_FLUSH_CONTEXT, TPM2_CC_GET_CAPABILITY,
    TPM2_CC_NV_DEFINE_SPACE, TPM2_CC_NV_READ, TPM2_CC_NV_READ_PUBLIC, TPM2_CC_NV_WRITE,
    TPM2_CC_NV_WRITE_LOCK, TPM2_CC_READ_PUBLIC, TPM2_RC_INITIALIZE, TPM2_RC_SUCCESS,
    TPM2_RH_ENDORSEMENT, TPM2_RH_OWNER, TPM2_RH_PLATFORM, TPM2_ST_NO_SESSIONS, TPM2_ST_SESSIONS,
};

/// Persistent handle of the RSA-2048 EK (TCG EK Credential Profile).
pub const EK_RSA_HANDLE: u32 = 0x8101_0001;

/// authPolicy of the TCG default EK templates: `PolicySecret(TPM_RH_ENDORSEMENT)`.
pub const EK_AUTH_POLICY: [u8; 32] = [
    0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24,
    0xfd, 0x52, 0xd7, 0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa,
];

/// fixedTPM | fixedParent | sensitiveDataOrigin | adminWithPolicy | restricted | decrypt.
pub const EK_ATTRIBUTES: u32 = 0x0003_00B2;

/// What the TCG default EK templates share, up to the algorithm-specific parameters: type
/// `alg`, nameAlg SHA-256, [`EK_ATTRIBUTES`], [`EK_AUTH_POLICY`], AES-128-CFB as the symmetric
/// algorithm and a NULL scheme. `tail` is the room the caller will add.
fn ek_template_head(alg: u16, tail: usize) -> Vec<u8> {
    let mut t = Vec::with_capacity(64 + tail);
    t.extend_from_slice(&alg.to_be_bytes());
    t.extend_from_slice(&0x000Bu16.to_be_bytes()); // nameAlg SHA-256
    t.extend_from_slice(&EK_ATTRIBUTES.to_be_bytes());
    t.extend_from_slice(&32u16.to_be_bytes());
    t.extend_from_slice(&EK_AUTH_POLICY);
    t.extend_from_slice(&0x0006u16.to_be_bytes()); // symmetric: AES
    t.extend_from_slice(&128u16.to_be_bytes()); //   128 bits
    t.extend_from_slice(&0x0043u16.to_be_bytes()); //   CFB
    t.extend_from_slice(&0x0010u16.to_be_bytes()); // scheme: TPM_ALG_NULL
    t
}

/// The TCG default RSA-2048 EK template (EK Credential Profile, template L-1) as a
/// marshalled `TPMT_PUBLIC`.
pub fn ek_rsa2048_template() -> Vec<u8> {
    let mut t = ek_template_head(0x0001, 256); // TPM_ALG_RSA
    t.extend_from_slice(&2048u16.to_be_bytes()); // keyBits
    t.extend_from_slice(&0u32.to_be_bytes()); // exponent (default 65537)
    t.extend_from_slice(&256u16.to_be_bytes()); // unique: 256 zero bytes
    t.extend_from_slice(&[0u8; 256]);
    t
}

/// The TCG default ECC NIST P-256 EK template (EK Credential Profile,
/// template L-2) as a marshalled `TPMT_PUBLIC`.
pub fn ek_ecc_p256_template() -> Vec<u8> {
    let mut t = ek_template_head(0x0023, 68); // TPM_ALG_ECC
    t.extend_from_slice(&0x0003u16.to_be_bytes()); // curveID: TPM_ECC_NIST_P256
    t.extend_from_slice(&0x0010u16.to_be_bytes()); // kdf: TPM_ALG_NULL
    t.extend_from_slice(&32u16.to_be_bytes()); // unique.x: 32 zero bytes
    t.extend_from_slice(&[0u8; 32]);
    t.extend_from_slice(&32u16.to_be_bytes()); // unique.y: 32 zero bytes
    t.extend_from_slice(&[0u8; 32]);
    t
}

/// Which endorsement key a new vTPM gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EkKind {
    /// RSA-2048 (template L-1) at 0x81010001: what most attestation software expects.
    #[default]
    Rsa2048,
    /// ECC NIST P-256 (template L-2) at 0x81010002: ~15× faster to create.
    EccP256,
}

impl EkKind {
    /// The persistent handle the EK is stored at (TCG provisioning guidance).
    pub fn handle(self) -> u32 {
        match self {
            EkKind::Rsa2048 => EK_RSA_HANDLE,
            EkKind::EccP256 => EK_ECC_HANDLE,
        }
    }

    /// The TCG NV index of this EK's certificate (EK Credential Profile, low range):
    /// [`EK_CERT_NV_RSA2048`] or [`EK_CERT_NV_ECC_P256`].
    pub fn cert_index(self) -> u32 {
        match self {
            EkKind::Rsa2048 => EK_CERT_NV_RSA2048,
            EkKind::EccP256 => EK_CERT_NV_ECC_P256,
        }
    }

    fn template(self) -> Vec<u8> {
        match self {
            EkKind::Rsa2048 => ek_rsa2048_template(),
            EkKind::EccP256 => ek_ecc_p256_template(),
        }
    }
}

/// Persistent handle of the ECC P-256 EK.
pub const EK_ECC_HANDLE: u32 = 0x8101_0002;

/// NV index of the RSA-2048 EK certificate.
pub const EK_CERT_NV_RSA2048: u32 = 0x01C0_0002;
/// NV index of the ECC NIST P-256 EK certificate.
pub const EK_CERT_NV_ECC_P256: u32 = 0x01C0_000A;
/// `TPMA_NV` of an EK certificate index, as TPM manufacturers and `swtpm_setup` define it:
/// `PPWRITE | WRITEDEFINE | PPREAD | OWNERREAD | AUTHREAD | NO_DA | PLATFORMCREATE`. Created by
/// the platform, written once and then write-locked for good (`WRITEDEFINE` + `NV_WriteLock`);
/// readable by the platform, the owner, and anyone with the index's (empty) authorisation value,
/// so `tpm2_nvread 0x1c00002` and `tpm2_getekcertificate` need no password.
pub const EK_CERT_NV_ATTRIBUTES: u32 = 0x4207_2001;
/// Largest EK certificate written to NV (libtpms' `MAX_NV_INDEX_SIZE`).
pub const MAX_EK_CERT_LEN: usize = 2048;
/// Bytes per `TPM2_NV_Write`/`TPM2_NV_Read` (the TCG minimum of `MAX_NV_BUFFER_SIZE`).
const NV_CHUNK: usize = 512;

fn check(resp: &[u8], command: &'static str) -> Result<(), EngineError> {
    match tpm_wire::response_code(resp) {
        Some(TPM2_RC_SUCCESS) => Ok(()),
        Some(rc) => Err(EngineError::Tpm { command, rc }),
        None => Err(EngineError::MalformedResponse(command)),
    }
}

fn require_tpm2(engine: &Engine) -> Result<(), EngineError> {
    match engine.version() {
        TpmVersion::Tpm2 => Ok(()),
        v => Err(EngineError::Unsupported(v)),
    }
}

/// Provisions the RSA-2048 endorsement key of a fresh TPM 2.0 and returns its public area.
///
/// Steps: `TPM2_Startup(CLEAR)` (`TPM_RC_INITIALIZE`, i.e. "already started", is accepted),
/// `TPM2_CreatePrimary` in the endorsement hierarchy with [`ek_rsa2048_template`],
/// `TPM2_EvictControl` to [`EK_RSA_HANDLE`] (0x81010001) and `TPM2_FlushContext` of the
/// transient copy. The TPM is left running (no `TPM2_Shutdown`). The endorsement and owner
/// hierarchies must still have empty authorization values, as after manufacture.
///
/// Returns the marshalled `TPM2B_PUBLIC` (size prefix included), byte-identical to what
/// [`read_ek_public`] returns later. Fails with `EngineError::Tpm { command: "EvictControl",
/// rc: 0x14c }` (`TPM_RC_NV_DEFINED`) if an EK is already persisted.
pub fn provision_ek(engine: &mut Engine) -> Result<Vec<u8>, EngineError> {
    provision_ek_kind(engine, EkKind::Rsa2048)
}

/// [`provision_ek`] for either kind of EK (see [`EkKind`]).
pub fn provision_ek_kind(engine: &mut Engine, kind: EkKind) -> Result<Vec<u8>, EngineError> {
    require_tpm2(engine)?;
    let resp = engine.process(&tpm_wire::tpm2_startup(tpm_wire::TPM2_SU_CLEAR));
    match tpm_wire::response_code(&resp) {
        Some(TPM2_RC_SUCCESS | TPM2_RC_INITIALIZE) => {}
        Some(rc) => {
            return Err(EngineError::Tpm {
                command: "Startup",
                rc,
            });
        }
        None => return Err(EngineError::MalformedResponse("Startup")),
    }

    let cmd = Command::new(TPM2_ST_SESSIONS, TPM2_CC_CREATE_PRIMARY)
        .u32(TPM2_RH_ENDORSEMENT)
        .password_session()
        .tpm2b(&[0, 0, 0, 0]) // TPM2B_SENSITIVE_CREATE: empty userAuth, empty data
        .tpm2b(&kind.template())
        .tpm2b(&[]) // outsideInfo
        .u32(0) // creationPCR: empty TPML_PCR_SELECTION
        .finish();
    let resp = engine.process(&cmd);
    check(&resp, "CreatePrimary")?;
    // header(10) | objectHandle(4) | parameterSize(4) | outPublic (TPM2B_PUBLIC) | ...
    let handle = tpm_wire::be_u32(&resp, 10).ok_or(EngineError::MalformedResponse("CreatePrimary"))?;
    let public = tpm_wire::tpm2b_at(&resp, 18)
        .ok_or(EngineError::MalformedResponse("CreatePrimary"))?
        .to_vec();

    let cmd = Command::new(TPM2_ST_SESSIONS, TPM2_CC_EVICT_CONTROL)
        .u32(TPM2_RH_OWNER)
        .u32(handle)
        .password_session()
        .u32(kind.handle())
        .finish();
    let evict = engine.process(&cmd);

    let flush = engine.process(
        &Command::new(TPM2_ST_NO_SESSIONS, TPM2_CC_FLUSH_CONTEXT)
            .u32(handle)
            .finish(),
    );
    check(&evict, "EvictControl")?;
    check(&flush, "FlushContext")?;
    Ok(public)
}

/// Reads the public area of the persisted EK at 0x81010001 with `TPM2_ReadPublic` and
/// returns it as a marshalled `TPM2B_PUBLIC` (size prefix included).
///
/// The TPM must have been started (`TPM2_Startup` done, or resumed from volatile state).
pub fn read_ek_public(engine: &mut Engine) -> Result<Vec<u8>, EngineError> {
    require_tpm2(engine)?;
    let read = |engine: &mut Engine, h: u32| engine.process(&Command::new(TPM2_ST_NO_SESSIONS, TPM2_CC_READ_PUBLIC).u32(h).finish());
    let mut resp = read(engine, EK_RSA_HANDLE);
    if tpm_wire::response_code(&resp) != Some(TPM2_RC_SUCCESS) {
        resp = read(engine, EK_ECC_HANDLE);
    }
    check(&resp, "ReadPublic")?;
    Ok(tpm_wire::tpm2b_at(&resp, 10)
        .ok_or(EngineError::MalformedResponse("ReadPublic"))?
        .to_vec())
}

/// Which EK this TPM holds (RSA-2048 at 0x81010001 is looked for first) and its public area
/// (`TPM2B_PUBLIC`, size prefix included).
pub fn read_ek(engine: &mut Engine) -> Result<(EkKind, Vec<u8>), EngineError> {
    require_tpm2(engine)?;
    let mut last = None;
    for kind in [EkKind::Rsa2048, EkKind::EccP256] {
        let resp = engine.process(&Command::new(TPM2_ST_NO_SESSIONS, TPM2_CC_READ_PUBLIC).u32(kind.handle()).finish());
        match tpm_wire::response_code(&resp) {
            Some(TPM2_RC_SUCCESS) => {
                let public = tpm_wire::tpm2b_at(&resp, 10).ok_or(EngineError::MalformedResponse("ReadPublic"))?;
                return Ok((kind, public.to_vec()));
            }
            Some(rc) => last = Some(rc),
            None => return Err(EngineError::MalformedResponse("ReadPublic")),
        }
    }
    Err(EngineError::Tpm { command: "ReadPublic", rc: last.unwrap_or(tpm_wire::TPM2_RC_FAILURE) })
}

/// Is `rc` a format-1 `TPM_RC_HANDLE` (the handle names nothing)?
fn is_rc_handle(rc: u32) -> bool {
    rc & 0x80 != 0 && rc & 0x3F == 0x0B
}

/// The size of the NV index `index`, or `None` if it is not defined (`TPM2_NV_ReadPublic`).
pub fn nv_size(engine: &mut Engine, index: u32) -> Result<Option<usize>, EngineError> {
    require_tpm2(engine)?;
    let resp = engine.process(&Command::new(TPM2_ST_NO_SESSIONS, TPM2_CC_NV_READ_PUBLIC).u32(index).finish());
    match tpm_wire::response_code(&resp) {
        Some(TPM2_RC_SUCCESS) => {}
        Some(rc) if is_rc_handle(rc) => return Ok(None),
        Some(rc) => return Err(EngineError::Tpm { command: "NV_ReadPublic", rc }),
        None => return Err(EngineError::MalformedResponse("NV_ReadPublic")),
    }
    // TPM2B_NV_PUBLIC: size | nvIndex(4) nameAlg(2) attributes(4) authPolicy(TPM2B) dataSize(2)
    let public = tpm_wire::tpm2b_at(&resp, 10).ok_or(EngineError::MalformedResponse("NV_ReadPublic"))?;
    let policy = tpm_wire::tpm2b_at(public, 12).ok_or(EngineError::MalformedResponse("NV_ReadPublic"))?;
    let at = 12 + policy.len();
    let size = public.get(at..at + 2).ok_or(EngineError::MalformedResponse("NV_ReadPublic"))?;
    Ok(Some(usize::from(u16::from_be_bytes([size[0], size[1]]))))
}

/// Stores an EK certificate the way a TPM manufacturer does: `TPM2_NV_DefineSpace` of
/// `kind`'s TCG index with [`EK_CERT_NV_ATTRIBUTES`] (platform authorisation, empty as after
/// manufacture), `TPM2_NV_Write` of `cert` (DER) in chunks, then `TPM2_NV_WriteLock`. Fails
/// with `EngineError::Tpm { command: "NV_DefineSpace", rc: 0x14c }` (`TPM_RC_NV_DEFINED`) if
/// the index exists.
pub fn write_ek_cert(engine: &mut Engine, kind: EkKind, cert: &[u8]) -> Result<(), EngineError> {
    require_tpm2(engine)?;
    if cert.is_empty() || cert.len() > MAX_EK_CERT_LEN {
        return Err(EngineError::InvalidArgument("an EK certificate is 1 to 2048 bytes"));
    }
    let index = kind.cert_index();
    let size = u16::try_from(cert.len()).map_err(|_| EngineError::InvalidArgument("EK certificate too long"))?;
    let mut public = Vec::with_capacity(14);
    public.extend_from_slice(&index.to_be_bytes());
    public.extend_from_slice(&0x000Bu16.to_be_bytes()); // nameAlg SHA-256
    public.extend_from_slice(&EK_CERT_NV_ATTRIBUTES.to_be_bytes());
    public.extend_from_slice(&0u16.to_be_bytes()); // authPolicy: empty
    public.extend_from_slice(&size.to_be_bytes());
    let define = Command::new(TPM2_ST_SESSIONS, TPM2_CC_NV_DEFINE_SPACE)
        .u32(TPM2_RH_PLATFORM)
        .password_session()
        .tpm2b(&[]) // auth: empty
        .tpm2b(&public)
        .finish();
    check(&engine.process(&define), "NV_DefineSpace")?;
    for (i, chunk) in cert.chunks(NV_CHUNK).enumerate() {
        let offset = u16::try_from(i * NV_CHUNK).map_err(|_| EngineError::InvalidArgument("EK certificate too long"))?;
        let write = Command::new(TPM2_ST_SESSIONS, TPM2_CC_NV_WRITE)
            .u32(TPM2_RH_PLATFORM)
            .u32(index)
            .password_session()
            .tpm2b(chunk)
            .u16(offset)
            .finish();
        check(&engine.process(&write), "NV_Write")?;
    }
    let lock = Command::new(TPM2_ST_SESSIONS, TPM2_CC_NV_WRITE_LOCK).u32(TPM2_RH_PLATFORM).u32(index).password_session().finish();
    check(&engine.process(&lock), "NV_WriteLock")
}

/// Reads the EK certificate of `kind` from its TCG index the way `tpm2_nvread` does (the
/// index's own, empty, authorisation); `None` if the index is not defined.
pub fn read_ek_cert(engine: &mut Engine, kind: EkKind) -> Result<Option<Vec<u8>>, EngineError> {
    let index = kind.cert_index();
    let Some(size) = nv_size(engine, index)? else { return Ok(None) };
    let mut out = Vec::with_capacity(size);
    while out.len() < size {
        let n = (size - out.len()).min(NV_CHUNK);
        let read = Command::new(TPM2_ST_SESSIONS, TPM2_CC_NV_READ)
            .u32(index)
            .u32(index)
            .password_session()
            .u16(n as u16)
            .u16(out.len() as u16)
            .finish();
        let resp = engine.process(&read);
        check(&resp, "NV_Read")?;
        // header(10) | parameterSize(4) | TPM2B_MAX_NV_BUFFER | sessions
        let data = tpm_wire::tpm2b_at(&resp, 14).ok_or(EngineError::MalformedResponse("NV_Read"))?;
        if data.len() != 2 + n {
            return Err(EngineError::MalformedResponse("NV_Read"));
        }
        out.extend_from_slice(&data[2..]);
    }
    Ok(Some(out))
}

/// The fixed properties that describe a TPM implementation (from
/// `TPM2_GetCapability(TPM_CAP_TPM_PROPERTIES, TPM_PT_FAMILY_INDICATOR, …)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmProperties {
    /// `TPM_PT_FAMILY_INDICATOR` as text ("2.0").
    pub family: String,
    /// `TPM_PT_LEVEL`.
    pub level: u32,
    /// `TPM_PT_REVISION`.
    pub revision: u32,
    /// `TPM_PT_MANUFACTURER`.
    pub manufacturer: u32,
    /// `TPM_PT_VENDOR_STRING_1..4` as text, trailing NULs and spaces removed.
    pub vendor: String,
    /// `TPM_PT_FIRMWARE_VERSION_1`.
    pub firmware_version_1: u32,
}

/// Reads [`TpmProperties`].
pub fn tpm_properties(engine: &mut Engine) -> Result<TpmProperties, EngineError> {
    require_tpm2(engine)?;
    let cmd = Command::new(TPM2_ST_NO_SESSIONS, TPM2_CC_GET_CAPABILITY).u32(tpm_wire::TPM2_CAP_TPM_PROPERTIES).u32(tpm_wire::TPM2_PT_FIXED).u32(13).finish();
    let resp = engine.process(&cmd);
    check(&resp, "GetCapability")?;
    // header(10) | moreData(1) | capability(4) | count(4) | (property(4) value(4))*
    let bad = EngineError::MalformedResponse("GetCapability");
    let count = tpm_wire::be_u32(&resp, 15).ok_or(bad.clone())? as usize;
    let mut props = std::collections::BTreeMap::new();
    for i in 0..count.min(64) {
        let at = 19 + 8 * i;
        let (Some(p), Some(v)) = (tpm_wire::be_u32(&resp, at), tpm_wire::be_u32(&resp, at + 4)) else { return Err(bad) };
        props.insert(p, v);
    }
    let get = |p: u32| props.get(&p).copied().ok_or(EngineError::MalformedResponse("GetCapability"));
    let text = |vals: &[u32]| {
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_be_bytes()).filter(|b| *b != 0).collect();
        String::from_utf8_lossy(&bytes).trim_end().to_string()
    };
    Ok(TpmProperties {
        family: text(&[get(0x100)?]),
        level: get(0x101)?,
        revision: get(0x102)?,
        manufacturer: get(0x105)?,
        vendor: text(&[get(0x106)?, get(0x107)?, get(0x108)?, get(0x109)?]),
        firmware_version_1: get(0x10B)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_shape() {
        let t = ek_rsa2048_template();
        // type, nameAlg, attributes, policy(2+32), sym(6), scheme(2), bits(2), exp(4), unique(2+256)
        assert_eq!(t.len(), 2 + 2 + 4 + 34 + 6 + 2 + 2 + 4 + 258);
        assert_eq!(&t[4..8], &[0x00, 0x03, 0x00, 0xb2]);
        let e = ek_ecc_p256_template();
        // type, nameAlg, attributes, policy, sym, scheme, curve, kdf, x(2+32), y(2+32)
        assert_eq!(e.len(), 2 + 2 + 4 + 34 + 6 + 2 + 2 + 2 + 34 + 34);
        assert_eq!(EkKind::EccP256.handle(), 0x8101_0002);
        assert_eq!(EkKind::Rsa2048.cert_index(), 0x01C0_0002);
        assert_eq!(EkKind::EccP256.cert_index(), 0x01C0_000A);
    }

    #[test]
    fn handle_errors() {
        assert!(is_rc_handle(0x18B)); // TPM_RC_HANDLE, handle 1
        assert!(!is_rc_handle(0x14C)); // TPM_RC_NV_DEFINED
        assert!(!is_rc_handle(0x00B));
    }
}
