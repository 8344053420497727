//! `xl-vtpm verify` reads its inputs with a size cap: an endless input (a device such as
//! /dev/zero, or a file that is not a bundle) is refused with exit 2 before it fills memory
//! (it grew to 12 GB before the cap).

use std::process::Command;

fn xl_vtpm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_xl-vtpm"))
}

#[test]
fn verify_refuses_an_endless_evidence_file() {
    let dir = tempfile::tempdir().unwrap();
    let ak = dir.path().join("ak");
    std::fs::write(&ak, [0u8; 8]).unwrap();
    let out = xl_vtpm()
        .args(["verify", "/dev/zero", "--nonce", "00", "--any-vtpm", "--insecure-unenrolled-ak", "--ak"])
        .arg(&ak)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(err.contains("/dev/zero") && err.contains("larger than 1048576 bytes"), "stderr: {err}");
}

#[test]
fn verify_refuses_an_endless_key_or_policy_file() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    std::fs::write(&bundle, [0u8; 16]).unwrap();
    let unenrolled = ["--any-vtpm", "--insecure-unenrolled-ak"];
    for (flag, extra) in [("--ak", unenrolled.to_vec()), ("--host-pcrs-policy", [&unenrolled[..], &["--ak", "/dev/null"]].concat())] {
        let out = xl_vtpm()
            .arg("verify")
            .arg(&bundle)
            .args(["--nonce", "00"])
            .args(&extra)
            .args([flag, "/dev/zero"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: stderr: {err}");
        assert!(err.contains(flag) && err.contains("larger than 65536 bytes"), "{flag}: stderr: {err}");
    }
}
