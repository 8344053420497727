//! A second engine while one is alive is refused; after drop a new one starts.
mod common;
use common::*;
use vtpm_engine::{Engine, EngineError, TpmVersion};

#[test]
fn second_instance_is_refused() {
    let mut first = Engine::start(TpmVersion::Tpm2, None, None).unwrap();
    startup_clear(&mut first);
    assert_eq!(
        Engine::start(TpmVersion::Tpm2, None, None).unwrap_err(),
        EngineError::AlreadyRunning
    );
    assert_eq!(
        Engine::start(TpmVersion::Tpm12, None, None).unwrap_err(),
        EngineError::AlreadyRunning
    );
    // Argument errors are reported without touching the running TPM.
    assert!(matches!(
        Engine::start(TpmVersion::Tpm2, None, Some(&[1, 2, 3])),
        Err(EngineError::InvalidArgument(_))
    ));
    // The first engine is unaffected.
    get_random(&mut first, 8);

    // From another thread too (the guard is process-wide).
    let t = std::thread::spawn(|| Engine::start(TpmVersion::Tpm2, None, None).map(|_| ()));
    assert_eq!(t.join().unwrap(), Err(EngineError::AlreadyRunning));

    drop(first);
    let mut second = Engine::start(TpmVersion::Tpm2, None, None).unwrap();
    startup_clear(&mut second);
    get_random(&mut second, 8);
}
