//! An EK certificate lands at its TCG NV index with the manufacturer attributes, reads back
//! byte for byte, cannot be rewritten or redefined, and survives a restart.
use vtpm_engine::{
    EK_CERT_NV_ATTRIBUTES, EkKind, Engine, EngineError, TpmVersion, nv_size, provision_ek_kind, read_ek, read_ek_cert,
    tpm_properties, write_ek_cert,
};

/// TPM2_NV_ReadPublic → attributes.
fn nv_attributes(e: &mut Engine, index: u32) -> u32 {
    let cmd = tpm_wire::Command::new(tpm_wire::TPM2_ST_NO_SESSIONS, tpm_wire::TPM2_CC_NV_READ_PUBLIC).u32(index).finish();
    let r = e.process(&cmd);
    assert_eq!(tpm_wire::response_code(&r), Some(0));
    u32::from_be_bytes(r[18..22].try_into().unwrap())
}

#[test]
fn ek_certificate_in_nv() {
    let mut e = Engine::start(TpmVersion::Tpm2, None, None).unwrap();
    let ek = provision_ek_kind(&mut e, EkKind::EccP256).unwrap();
    assert_eq!(read_ek(&mut e).unwrap(), (EkKind::EccP256, ek));
    assert_eq!(read_ek_cert(&mut e, EkKind::EccP256).unwrap(), None);
    assert_eq!(nv_size(&mut e, 0x01C0_000A).unwrap(), None);

    // 1300 bytes: three NV_Write chunks.
    let cert: Vec<u8> = (0..1300u32).map(|i| (i * 7 % 251) as u8).collect();
    write_ek_cert(&mut e, EkKind::EccP256, &cert).unwrap();
    assert_eq!(read_ek_cert(&mut e, EkKind::EccP256).unwrap().as_deref(), Some(&cert[..]));
    let attrs = nv_attributes(&mut e, 0x01C0_000A);
    // The TPM adds WRITTEN (bit 29) and WRITELOCKED (bit 11).
    assert_eq!(attrs, EK_CERT_NV_ATTRIBUTES | (1 << 29) | (1 << 11), "{attrs:#010x}");

    // Defined once: a second write is refused, and the locked index cannot be rewritten.
    match write_ek_cert(&mut e, EkKind::EccP256, b"again") {
        Err(EngineError::Tpm { command: "NV_DefineSpace", rc: 0x14C }) => {}
        other => panic!("{other:?}"),
    }
    let w = tpm_wire::Command::new(tpm_wire::TPM2_ST_SESSIONS, tpm_wire::TPM2_CC_NV_WRITE)
        .u32(tpm_wire::TPM2_RH_PLATFORM)
        .u32(0x01C0_000A)
        .password_session()
        .tpm2b(b"x")
        .u16(0)
        .finish();
    assert_eq!(tpm_wire::response_code(&e.process(&w)), Some(0x148), "TPM_RC_NV_LOCKED");
    assert!(write_ek_cert(&mut e, EkKind::Rsa2048, &[]).is_err());
    assert!(write_ek_cert(&mut e, EkKind::Rsa2048, &[0; 2049]).is_err());

    let p = tpm_properties(&mut e).unwrap();
    assert_eq!(p.family, "2.0");
    assert_eq!(p.manufacturer, 0x4942_4D00, "libtpms reports IBM");
    assert!(!p.vendor.is_empty() && p.vendor.len() <= 16, "{p:?}");

    let perm = e.permanent_state().unwrap();
    drop(e);
    let mut e = Engine::start(TpmVersion::Tpm2, Some(&perm), None).unwrap();
    assert_eq!(tpm_wire::response_code(&e.process(&tpm_wire::tpm2_startup(tpm_wire::TPM2_SU_CLEAR))), Some(0));
    assert_eq!(read_ek_cert(&mut e, EkKind::EccP256).unwrap().as_deref(), Some(&cert[..]));
}
