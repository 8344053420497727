//! Provision an EK and an NV index, save permanent state, restart from it: same EK, NV kept.
mod common;
use common::*;
use vtpm_engine::{Engine, TpmVersion, provision_ek, read_ek_public};

#[test]
fn permanent_state_survives_restart() {
    let mut e = Engine::start(TpmVersion::Tpm2, None, None).unwrap();
    let ek = provision_ek(&mut e).unwrap();
    assert_eq!(ek.len(), 2 + u16::from_be_bytes([ek[0], ek[1]]) as usize);
    assert_eq!(read_ek_public(&mut e).unwrap(), ek);
    // A second provisioning attempt must not replace the EK.
    let err = provision_ek(&mut e).unwrap_err();
    assert!(
        matches!(
            err,
            vtpm_engine::EngineError::Tpm {
                command: "EvictControl",
                ..
            }
        ),
        "{err:?}"
    );

    nv_define(&mut e, NV_INDEX, 8);
    nv_write(&mut e, NV_INDEX, b"xvtpm-nv");
    let dirty = e
        .take_dirty_permanent()
        .expect("EvictControl/NV writes store permall");
    ok(&mut e, &tpm_wire::tpm2_shutdown(tpm_wire::TPM2_SU_CLEAR));
    let snapshot = e.permanent_state().unwrap();
    drop(e);

    // 1) Restart from the GetState snapshot.
    let mut e = Engine::start(TpmVersion::Tpm2, Some(&snapshot), None).unwrap();
    assert!(
        e.take_dirty_permanent().is_none(),
        "resume clears the dirty flag"
    );
    startup_clear(&mut e);
    assert_eq!(
        read_ek_public(&mut e).unwrap(),
        ek,
        "EK changed across restart"
    );
    assert_eq!(nv_read(&mut e, NV_INDEX, 8), b"xvtpm-nv");
    drop(e);

    // 2) Restart from the blob reported through the storedata callback.
    let mut e = Engine::start(TpmVersion::Tpm2, Some(&dirty), None).unwrap();
    startup_clear(&mut e);
    assert_eq!(read_ek_public(&mut e).unwrap(), ek);
    assert_eq!(nv_read(&mut e, NV_INDEX, 8), b"xvtpm-nv");
    // Changing NV after a restart is reported as dirty again.
    nv_write(&mut e, NV_INDEX, b"second!!");
    let newer = e
        .take_dirty_permanent()
        .expect("NV write after resume is dirty");
    drop(e);

    let mut e = Engine::start(TpmVersion::Tpm2, Some(&newer), None).unwrap();
    startup_clear(&mut e);
    assert_eq!(nv_read(&mut e, NV_INDEX, 8), b"second!!");
    assert_eq!(read_ek_public(&mut e).unwrap(), ek);
}
