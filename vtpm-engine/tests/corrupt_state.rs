//! A corrupted or truncated permanent blob is rejected; libtpms never manufactures instead.
mod common;
use common::*;
use vtpm_engine::{Engine, EngineError, TpmVersion, provision_ek, read_ek_public};

fn expect_rejected(blob: &[u8], label: &str) {
    match Engine::start(TpmVersion::Tpm2, Some(blob), None) {
        Err(EngineError::StateRejected { .. }) | Err(EngineError::InvalidArgument(_)) => {}
        Err(other) => panic!("{label}: unexpected error {other:?}"),
        Ok(mut e) => {
            // Only acceptable if it really is the old TPM (e.g. a flip in padding).
            let _ = e.process(&tpm_wire::tpm2_startup(tpm_wire::TPM2_SU_CLEAR));
            panic!(
                "{label}: corrupted blob was accepted (EK readable: {:?})",
                read_ek_public(&mut e).is_ok()
            );
        }
    }
}

#[test]
fn corrupted_permanent_state_is_an_error() {
    let mut e = Engine::start(TpmVersion::Tpm2, None, None).unwrap();
    let ek = provision_ek(&mut e).unwrap();
    let blob = e.permanent_state().unwrap();
    drop(e);

    expect_rejected(&[], "empty");
    expect_rejected(&blob[..blob.len() / 2], "truncated to half");
    expect_rejected(&blob[..blob.len() - 1], "truncated by one byte");
    expect_rejected(&blob[..16], "truncated to 16 bytes");
    expect_rejected(&[0xAB; 4096], "garbage");
    // Magic numbers: bytes 2..6 and 10..14 of the blob are the NV_HEADER / PERSISTENT_ALL
    // magic values; libtpms checks them.
    for pos in [2usize, 3, 4, 5, 10, 11, 12, 13] {
        let mut bad = blob.to_vec();
        bad[pos] ^= 0xFF;
        expect_rejected(&bad, &format!("magic byte {pos} flipped"));
    }
    // libtpms' permanent blob carries no checksum or MAC (integrity is the sealing layer's
    // job), so flips elsewhere may be accepted. What must never happen is a silent
    // re-manufacture; a manufactured TPM would have no EK at 0x81010001.
    let (mut rejected, mut same, mut other_ek, mut no_ek) = (0, 0, 0, 0);
    for pos in (0..blob.len()).step_by(7) {
        let mut bad = blob.to_vec();
        bad[pos] ^= 0x01;
        match Engine::start(TpmVersion::Tpm2, Some(&bad), None) {
            Err(EngineError::StateRejected { .. }) => rejected += 1,
            Err(other) => panic!("flip at {pos}: unexpected error {other:?}"),
            Ok(mut e) => {
                let _ = e.process(&tpm_wire::tpm2_startup(tpm_wire::TPM2_SU_CLEAR));
                match read_ek_public(&mut e) {
                    Ok(p) if p == ek => same += 1,
                    Ok(_) => other_ek += 1,
                    Err(_) => no_ek += 1,
                }
            }
        }
    }
    eprintln!(
        "bit flips: rejected {rejected}, same EK {same}, other EK {other_ek}, EK unreadable {no_ek}"
    );
    assert!(rejected > 0);

    // The failures released the process slot and left no cached state behind.
    let mut e = Engine::start(TpmVersion::Tpm2, Some(&blob), None).unwrap();
    startup_clear(&mut e);
    assert_eq!(read_ek_public(&mut e).unwrap(), ek);
}
