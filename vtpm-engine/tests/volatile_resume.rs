//! Volatile state resumes the running TPM: PCRs survive without a new Startup.
mod common;
use common::*;
use vtpm_engine::{Engine, EngineError, TpmVersion};

#[test]
fn volatile_state_keeps_pcr() {
    let mut e = Engine::start(TpmVersion::Tpm2, None, None).unwrap();
    startup_clear(&mut e);
    let d = [0x11; 32];
    pcr_extend(&mut e, 16, &d);
    let pcr = pcr_read(&mut e, 16);
    assert_ne!(pcr, [0u8; 32]);
    let volatile = e.volatile_state().unwrap();
    assert!(!volatile.is_empty());
    let permanent = e.permanent_state().unwrap();
    drop(e);

    // Resume running state: no Startup needed, PCR kept.
    let mut e = Engine::start(TpmVersion::Tpm2, Some(&permanent), Some(&volatile)).unwrap();
    assert_eq!(pcr_read(&mut e, 16), pcr);
    pcr_extend(&mut e, 16, &d);
    assert_eq!(pcr_read(&mut e, 16), extended(&pcr, &d));
    drop(e);

    // Permanent only + Startup(CLEAR): PCRs reset.
    let mut e = Engine::start(TpmVersion::Tpm2, Some(&permanent), None).unwrap();
    startup_clear(&mut e);
    assert_eq!(pcr_read(&mut e, 16), [0u8; 32]);
    drop(e);

    // A corrupted volatile blob is rejected, not ignored.
    let mut bad = volatile.to_vec();
    bad.truncate(bad.len() / 2);
    assert!(matches!(
        Engine::start(TpmVersion::Tpm2, Some(&permanent), Some(&bad)),
        Err(EngineError::StateRejected {
            what: "volatile",
            ..
        })
    ));
    // Volatile without permanent is an argument error.
    assert!(matches!(
        Engine::start(TpmVersion::Tpm2, None, Some(&volatile)),
        Err(EngineError::InvalidArgument(_))
    ));
    let mut e = Engine::start(TpmVersion::Tpm2, Some(&permanent), Some(&volatile)).unwrap();
    assert_eq!(pcr_read(&mut e, 16), pcr);
}
