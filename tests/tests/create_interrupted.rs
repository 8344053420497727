//! A manager killed (`kill -9`) during `xl-vtpm vtpm create` leaves an identity whose vTPM
//! never wrote a state file. It is reported as never completely created — not as a state
//! file to restore from backup — and `vtpm destroy` removes it; nothing else is affected.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testkit::bin_path;
use xvtpm_tests::{Options, Stack};

#[test]
fn an_identity_whose_creation_was_killed_is_reported_as_such_and_can_be_destroyed() {
    // A slow physical TPM (50 ms per command) keeps the vTPM's first state write (after its EK
    // certificate, several TPM commands away) well behind the identity's creation.
    let mut s = Stack::start_with(Options { tpm_delay: Some(Duration::from_millis(50)), ..Default::default() });
    let before = s.mgr_log().matches("vTPM identity created").count();
    let create = Command::new(bin_path("xl-vtpm"))
        .args(["vtpm", "create", "--json"])
        .env("XVTPM_RUN_DIR", s.run_dir())
        .env("XVTPM_STATE_DIR", s.state_dir())
        .env("XVTPM_VTPM_DOMAIN", bin_path("vtpm-domain"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.mgr_log().matches("vTPM identity created").count() == before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    s.kill9_manager();
    let out = create.wait_with_output().unwrap();
    assert!(!out.status.success(), "create succeeded although the manager was killed: {}", String::from_utf8_lossy(&out.stdout));

    s.start_manager();
    let list = s.xl_json(&["vtpm", "list"]);
    let rows = list.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{list}");
    let uuid = rows[0]["uuid"].as_str().unwrap().to_string();
    let state_file = std::path::PathBuf::from(rows[0]["state_file"].as_str().unwrap());
    assert!(!state_file.exists(), "the vTPM wrote its state before the kill; the test did not interrupt the creation");

    let out = s.xl(&["vtpm", "start", &uuid]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("never completely created") && err.contains(&format!("xl-vtpm vtpm destroy {uuid}")), "{err}");
    assert!(!err.contains("backup"), "{err}");
    assert_eq!(rows[0]["state"], "incomplete", "{list}");

    let out = s.xl(&["vtpm", "destroy", &uuid, "--yes"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(s.xl_json(&["vtpm", "list"]).as_array().unwrap().is_empty());
    // And creating works as before.
    let v = s.create_vtpm();
    assert!(v.state_file.exists());
}
