//! A manager killed (`kill -9`) during `xl-vtpm vtpm create`, after it reserved the identity and
//! before the vTPM's EK certificate wrote it, leaves no identity: the create fails, the restarted
//! manager lists nothing, and creating works as before. (An identity whose vTPM never wrote a
//! state file — the manager killed between that write and the vTPM's first state — is reported
//! as never completely created and removed by `vtpm destroy`: `vtpm start` says so.)

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testkit::bin_path;
use xvtpm_tests::{Options, Stack};

#[test]
fn a_create_whose_manager_was_killed_leaves_no_identity() {
    // A slow physical TPM (50 ms per command) keeps the vTPM's EK certificate (several TPM
    // commands) well behind the identity's reservation.
    let mut s = Stack::start_with(Options { tpm_delay: Some(Duration::from_millis(50)), ..Default::default() });
    let before = s.mgr_log().matches("vTPM identity reserved").count();
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
    while s.mgr_log().matches("vTPM identity reserved").count() == before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    s.kill9_manager();
    let out = create.wait_with_output().unwrap();
    assert!(!out.status.success(), "create succeeded although the manager was killed: {}", String::from_utf8_lossy(&out.stdout));

    s.start_manager();
    // The identity was only reserved (it is written with its EK certificate): nothing durable.
    let list = s.xl_json(&["vtpm", "list"]);
    assert!(list.as_array().unwrap().is_empty(), "{list}");
    // And creating works as before.
    let v = s.create_vtpm();
    assert!(v.state_file.exists());
}
