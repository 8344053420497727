//! TPM 1.2: start, TPM_Startup, GetCapability and GetRandom; restart from permanent state.
use vtpm_engine::{Engine, TpmVersion};

fn rc12(resp: &[u8]) -> u32 {
    tpm_wire::response_code(resp).unwrap()
}

/// TPM_GetCapability(TPM_CAP_VERSION_VAL, empty subCap).
fn getcap_version() -> Vec<u8> {
    tpm_wire::Command::new(tpm_wire::TPM12_TAG_RQU_COMMAND, tpm_wire::TPM12_ORD_GET_CAPABILITY).u32(0x1A).u32(0).finish()
}

#[test]
fn tpm12_start_and_commands() {
    let mut e = Engine::start(TpmVersion::Tpm12, None, None).unwrap();
    assert_eq!(e.version(), TpmVersion::Tpm12);
    assert_eq!(e.error_response(), [0x00, 0xC4, 0, 0, 0, 0x0A, 0, 0, 0, 0x09]);

    let r = e.process(&tpm_wire::tpm12_startup_clear());
    assert_eq!(rc12(&r), 0, "TPM_Startup: {r:02x?}");
    let r = e.process(&getcap_version());
    assert_eq!(rc12(&r), 0, "GetCapability: {r:02x?}");
    assert_eq!(&r[..2], &[0x00, 0xC4]);
    // TPM_CAP_VERSION_INFO: tag 0x0030, version 1.2
    assert_eq!(&r[14..18], &[0x00, 0x30, 0x01, 0x02]);

    let r = e.process(&tpm_wire::tpm12_get_random(16));
    assert_eq!(rc12(&r), 0, "GetRandom: {r:02x?}");
    assert_eq!(u32::from_be_bytes(r[10..14].try_into().unwrap()), 16);
    assert_eq!(r.len(), 14 + 16);
    // Garbage gets an error response (never a panic).
    let r = e.process(&[0x00, 0xC1, 0, 0, 0, 0x0A, 0xde, 0xad, 0xbe, 0xef]);
    assert_ne!(rc12(&r), 0);
    assert_eq!(e.process(&[1, 2, 3]), e.error_response());

    let perm = e.permanent_state().unwrap();
    let _ = e.take_dirty_permanent();
    drop(e);

    let mut e = Engine::start(TpmVersion::Tpm12, Some(&perm), None).unwrap();
    assert_eq!(rc12(&e.process(&tpm_wire::tpm12_startup_clear())), 0);
    assert_eq!(rc12(&e.process(&getcap_version())), 0);
    drop(e);

    // Corrupted 1.2 state is refused too.
    let half = &perm[..perm.len() / 2];
    assert!(Engine::start(TpmVersion::Tpm12, Some(half), None).is_err());

    // And TPM 2.0 can be started afterwards in the same process.
    let mut e = Engine::start(TpmVersion::Tpm2, None, None).unwrap();
    let r = e.process(&tpm_wire::tpm2_startup(tpm_wire::TPM2_SU_CLEAR));
    assert_eq!(rc12(&r), 0);
}
