//! Endorsement-key provisioning for a freshly manufactured TPM 2.0.

use crate::tpm2::{
    self, CC_CREATE_PRIMARY, CC_EVICT_CONTROL, CC_FLUSH_CONTEXT, CC_READ_PUBLIC, Command,
    EK_RSA_HANDLE, RC_INITIALIZE, RC_SUCCESS, RH_ENDORSEMENT, RH_OWNER, ST_NO_SESSIONS,
    ST_SESSIONS,
};
use crate::{Engine, EngineError, TpmVersion};

/// authPolicy of the TCG default EK templates: `PolicySecret(TPM_RH_ENDORSEMENT)`.
pub const EK_AUTH_POLICY: [u8; 32] = [
    0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24,
    0xfd, 0x52, 0xd7, 0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa,
];

/// fixedTPM | fixedParent | sensitiveDataOrigin | adminWithPolicy | restricted | decrypt.
pub const EK_ATTRIBUTES: u32 = 0x0003_00B2;

/// The TCG default RSA-2048 EK template (EK Credential Profile, template L-1) as a
/// marshalled `TPMT_PUBLIC`.
pub fn ek_rsa2048_template() -> Vec<u8> {
    let mut t = Vec::with_capacity(64 + 256);
    t.extend_from_slice(&0x0001u16.to_be_bytes()); // TPM_ALG_RSA
    t.extend_from_slice(&0x000Bu16.to_be_bytes()); // nameAlg SHA-256
    t.extend_from_slice(&EK_ATTRIBUTES.to_be_bytes());
    t.extend_from_slice(&32u16.to_be_bytes());
    t.extend_from_slice(&EK_AUTH_POLICY);
    t.extend_from_slice(&0x0006u16.to_be_bytes()); // symmetric: AES
    t.extend_from_slice(&128u16.to_be_bytes()); //   128 bits
    t.extend_from_slice(&0x0043u16.to_be_bytes()); //   CFB
    t.extend_from_slice(&0x0010u16.to_be_bytes()); // scheme: TPM_ALG_NULL
    t.extend_from_slice(&2048u16.to_be_bytes()); // keyBits
    t.extend_from_slice(&0u32.to_be_bytes()); // exponent (default 65537)
    t.extend_from_slice(&256u16.to_be_bytes()); // unique: 256 zero bytes
    t.extend_from_slice(&[0u8; 256]);
    t
}

/// The TCG default ECC NIST P-256 EK template (EK Credential Profile,
/// template L-2) as a marshalled `TPMT_PUBLIC`.
pub fn ek_ecc_p256_template() -> Vec<u8> {
    let mut t = Vec::with_capacity(64 + 68);
    t.extend_from_slice(&0x0023u16.to_be_bytes()); // TPM_ALG_ECC
    t.extend_from_slice(&0x000Bu16.to_be_bytes()); // nameAlg SHA-256
    t.extend_from_slice(&EK_ATTRIBUTES.to_be_bytes());
    t.extend_from_slice(&32u16.to_be_bytes());
    t.extend_from_slice(&EK_AUTH_POLICY);
    t.extend_from_slice(&0x0006u16.to_be_bytes()); // symmetric: AES
    t.extend_from_slice(&128u16.to_be_bytes()); //   128 bits
    t.extend_from_slice(&0x0043u16.to_be_bytes()); //   CFB
    t.extend_from_slice(&0x0010u16.to_be_bytes()); // scheme: TPM_ALG_NULL
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

    fn template(self) -> Vec<u8> {
        match self {
            EkKind::Rsa2048 => ek_rsa2048_template(),
            EkKind::EccP256 => ek_ecc_p256_template(),
        }
    }
}

/// Persistent handle of the ECC P-256 EK.
pub const EK_ECC_HANDLE: u32 = 0x8101_0002;

fn check(resp: &[u8], command: &'static str) -> Result<(), EngineError> {
    match tpm2::response_code(resp) {
        Some(RC_SUCCESS) => Ok(()),
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
    let resp = engine.process(&tpm2::startup(tpm2::SU_CLEAR));
    match tpm2::response_code(&resp) {
        Some(RC_SUCCESS | RC_INITIALIZE) => {}
        Some(rc) => {
            return Err(EngineError::Tpm {
                command: "Startup",
                rc,
            });
        }
        None => return Err(EngineError::MalformedResponse("Startup")),
    }

    let cmd = Command::new(ST_SESSIONS, CC_CREATE_PRIMARY)
        .u32(RH_ENDORSEMENT)
        .password_session()
        .tpm2b(&[0, 0, 0, 0]) // TPM2B_SENSITIVE_CREATE: empty userAuth, empty data
        .tpm2b(&kind.template())
        .tpm2b(&[]) // outsideInfo
        .u32(0) // creationPCR: empty TPML_PCR_SELECTION
        .finish();
    let resp = engine.process(&cmd);
    check(&resp, "CreatePrimary")?;
    // header(10) | objectHandle(4) | parameterSize(4) | outPublic (TPM2B_PUBLIC) | ...
    let handle = tpm2::be_u32(&resp, 10).ok_or(EngineError::MalformedResponse("CreatePrimary"))?;
    let public = tpm2::tpm2b_at(&resp, 18)
        .ok_or(EngineError::MalformedResponse("CreatePrimary"))?
        .to_vec();

    let cmd = Command::new(ST_SESSIONS, CC_EVICT_CONTROL)
        .u32(RH_OWNER)
        .u32(handle)
        .password_session()
        .u32(kind.handle())
        .finish();
    let evict = engine.process(&cmd);

    let flush = engine.process(
        &Command::new(ST_NO_SESSIONS, CC_FLUSH_CONTEXT)
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
    let read = |engine: &mut Engine, h: u32| engine.process(&Command::new(ST_NO_SESSIONS, CC_READ_PUBLIC).u32(h).finish());
    let mut resp = read(engine, EK_RSA_HANDLE);
    if tpm2::response_code(&resp) != Some(RC_SUCCESS) {
        resp = read(engine, EK_ECC_HANDLE);
    }
    check(&resp, "ReadPublic")?;
    Ok(tpm2::tpm2b_at(&resp, 10)
        .ok_or(EngineError::MalformedResponse("ReadPublic"))?
        .to_vec())
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
    }
}
