//! Garbage in, well-formed error response out; the engine keeps working.
mod common;
use common::*;
use vtpm_engine::{Engine, TpmVersion};

#[test]
fn garbage_is_answered_with_errors() {
    let mut e = Engine::start(TpmVersion::Tpm2, None, None).unwrap();
    startup_clear(&mut e);
    let failure = e.error_response();
    assert_eq!(failure, [0x80, 0x01, 0, 0, 0, 0x0a, 0, 0, 0x01, 0x01]);

    // Below the header size: the engine answers itself.
    assert_eq!(e.process(&[]), failure);
    assert_eq!(e.process(&[0x80, 0x01, 0, 0, 0, 5]), failure);

    let mut cases: Vec<Vec<u8>> = vec![
        vec![0xff; 10],                                                   // bad tag, bad size
        vec![0x80, 0x01, 0, 0, 0, 0x0a, 0, 0, 0x01, 0x7b], // GetRandom missing parameter
        vec![0x80, 0x01, 0, 0, 0, 0x0a, 0x20, 0, 0, 0],    // unknown command code
        vec![0x80, 0x02, 0, 0, 0, 0x0e, 0, 0, 0x01, 0x82, 0x40, 0, 0, 1], // extend w/o auth
        vec![0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x44, 0, 0], // second Startup
    ];
    // Pseudo-random garbage with a consistent size field, and some with a wrong one.
    let mut x: u32 = 0x1234_5678;
    for len in [10usize, 11, 17, 64, 300, 1024, 4096] {
        let mut v: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let mut fixed = v.clone();
        fixed[2..6].copy_from_slice(&(len as u32).to_be_bytes());
        fixed[0] = 0x80;
        fixed[1] = 0x01;
        cases.push(fixed);
        v[2..6].copy_from_slice(&(len as u32 + 7).to_be_bytes());
        cases.push(v);
    }
    for cmd in &cases {
        let resp = e.process(cmd);
        assert!(resp.len() >= 10);
        assert_eq!(
            u32::from_be_bytes(resp[2..6].try_into().unwrap()) as usize,
            resp.len()
        );
        assert_ne!(
            rc(&resp),
            0,
            "garbage {:02x?} succeeded",
            &cmd[..cmd.len().min(12)]
        );
        // The engine keeps working after each one.
        get_random(&mut e, 4);
    }
    // Oversized command (above the buffer size).
    let mut huge = vec![0u8; e.buffer_size() as usize + 1];
    huge[..2].copy_from_slice(&[0x80, 0x01]);
    let n = huge.len() as u32;
    huge[2..6].copy_from_slice(&n.to_be_bytes());
    assert_eq!(e.process(&huge), failure);
    let d = [7u8; 32];
    pcr_extend(&mut e, 16, &d);
    assert_eq!(pcr_read(&mut e, 16), extended(&[0; 32], &d));
}
