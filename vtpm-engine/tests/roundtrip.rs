//! Startup + GetRandom + PCR_Extend + PCR_Read through a freshly manufactured TPM 2.0.
mod common;
use common::*;
use vtpm_engine::{Engine, TpmVersion};

#[test]
fn startup_random_extend_read() {
    let mut e = Engine::start(TpmVersion::Tpm2, None, None).unwrap();
    assert_eq!(e.version(), TpmVersion::Tpm2);
    // Manufacture stored permall.
    let manufactured = e
        .take_dirty_permanent()
        .expect("manufacture stores permall");
    assert!(!manufactured.is_empty());
    assert!(
        e.take_dirty_permanent().is_none(),
        "dirty flag is cleared by take"
    );

    startup_clear(&mut e);
    let a = get_random(&mut e, 32);
    let b = get_random(&mut e, 32);
    assert_ne!(a, b);

    assert_eq!(pcr_read(&mut e, 16), [0u8; 32]);
    let d = [0x5a; 32];
    pcr_extend(&mut e, 16, &d);
    let want = extended(&[0u8; 32], &d);
    assert_eq!(pcr_read(&mut e, 16), want);
    pcr_extend(&mut e, 16, &d);
    assert_eq!(pcr_read(&mut e, 16), extended(&want, &d));

    // PCR 0 can only be extended from locality 0 (or 3/4) on the PC client profile; we
    // only check that changing locality is accepted by libtpms for a resettable PCR.
    e.set_locality(0);
    assert_eq!(e.locality(), 0);

    // Buffer size: query, clamp, and enforcement of the size in process().
    let full = e.buffer_size();
    let bs = e.set_buffer_size(0);
    assert_eq!(bs.size, full);
    assert_eq!(bs.max, full);
    let small = e.set_buffer_size(1);
    assert_eq!(small.size, small.min);
    assert_eq!(e.buffer_size(), small.min);
    let mut big = tpm_wire::tpm2_get_random(8);
    big.resize(small.min as usize + 1, 0);
    let n = big.len() as u32;
    big[2..6].copy_from_slice(&n.to_be_bytes());
    assert_eq!(e.process(&big), e.error_response());
    assert_eq!(e.set_buffer_size(u32::MAX).size, full);
    get_random(&mut e, 16);

    e.cancel();
    get_random(&mut e, 16); // cancel flag does not stick to the next command
}
