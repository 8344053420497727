//! The manager's store is covered by a monotonic counter in the physical TPM's NV: the real
//! daemon refuses to start from an older copy of its store (here: one that would resurrect a
//! destroyed vTPM), says why and what to do, leaves the file alone, and `xl-vtpm mgr status`
//! shows the counter — which tpm2-tools reads back from the TPM with owner authorisation.

use xvtpm_tests::{Stack, tpm2};

fn status(s: &Stack) -> serde_json::Value {
    s.xl_json(&["mgr", "status"])
}

/// The counter's handle and values (without the per-run state-anchor statistics).
fn counter_of(st: &serde_json::Value) -> [serde_json::Value; 3] {
    let c = &st["store_counter"];
    [c["nv_index"].clone(), c["store_value"].clone(), c["tpm_value"].clone()]
}

#[test]
fn an_older_store_is_refused_and_status_shows_the_counter() {
    let mut s = Stack::start();
    let st = status(&s);
    let c = &st["store_counter"];
    assert_eq!(c["nv_index"], "0x01805600", "{st}");
    assert_eq!(c["tpm_value"], c["store_value"], "{st}");
    let text = String::from_utf8(s.xl(&["mgr", "status"]).stdout).unwrap();
    assert!(text.contains("store counter: NV 0x01805600 = ") && text.contains("matches the TPM"), "{text}");

    let v = s.create_vtpm();
    s.stop_vtpm(&v.uuid);
    let store = s.state_dir().join("mgr").join("manager.json");
    let with_v = std::fs::read(&store).unwrap();
    let created = status(&s)["store_counter"]["store_value"].as_u64().unwrap();
    assert!(
        created == c["store_value"].as_u64().unwrap() + 1,
        "create writes the identity together with the EK it certified, in one store write (not the first state: nothing older exists): {created}"
    );
    let out = s.xl(&["vtpm", "destroy", &v.uuid.to_string(), "--yes"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after = status(&s)["store_counter"].clone();
    assert_eq!(after["store_value"].as_u64(), Some(created + 1), "destroy is one write");

    // Normal restarts keep working.
    s.stop_manager();
    s.start_manager();
    assert_eq!(counter_of(&status(&s)), counter_of(&serde_json::json!({ "store_counter": after })));

    // The TPM holds the same value (owner-readable by design).
    s.stop_manager();
    let out = s.dir.path().join("counter.bin");
    tpm2(&s.swtpm.tcti(), &["tpm2_nvread", "-C", "o", "0x01805600", "-o", out.to_str().unwrap()]);
    let nv = u64::from_be_bytes(std::fs::read(&out).unwrap().try_into().unwrap());
    assert_eq!(Some(nv), after["store_value"].as_u64());

    // Roll the store back to the copy that still knows the destroyed vTPM.
    let newest = std::fs::read(&store).unwrap();
    std::fs::write(&store, &with_v).unwrap();
    assert!(!s.try_start_manager(), "the manager started from an older store");
    let log = s.mgr_log();
    for needle in [
        store.display().to_string(),
        format!("records write {}", nv - 1),
        format!("0x01805600 is at {nv}"),
        "accept-store --yes".into(),
    ] {
        assert!(log.contains(&needle), "the refusal does not say {needle:?}:\n{log}");
    }
    assert_eq!(std::fs::read(&store).unwrap(), with_v, "the refused store was changed");
    // accept-store wants to be told it means it.
    let out = std::process::Command::new(testkit::bin_path("vtpmmgr"))
        .args(["--tcti", &s.mgr_tcti(), "--state-dir"])
        .arg(s.state_dir().join("mgr"))
        .arg("accept-store")
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--yes"), "{out:?}");
    assert_eq!(std::fs::read(&store).unwrap(), with_v);

    // Putting the newest copy back is the fix.
    std::fs::write(&store, &newest).unwrap();
    s.start_manager();
    let out = s.xl(&["vtpm", "show", &v.uuid.to_string()]);
    assert!(!out.status.success(), "the destroyed vTPM is back");
    assert_eq!(counter_of(&status(&s)), counter_of(&serde_json::json!({ "store_counter": after })));

    // A store that disappears altogether while its counter exists: the manager refuses to start
    // (unprovisioned, it would abandon every vTPM) and names the counter and both fixes.
    s.stop_manager();
    let kept = std::fs::read(&store).unwrap();
    std::fs::remove_file(&store).unwrap();
    assert!(!s.try_start_manager(), "the manager started unprovisioned although its store counter exists");
    let log = s.mgr_log();
    assert!(log.contains("does not exist, but the physical TPM holds the rollback counter(s) 0x01805600"), "{log}");
    assert!(log.contains("Put the newest copy of the store back") && log.contains("tpm2_nvundefine -C o"), "{log}");
    // Putting it back is one fix; undefining the counter (giving every vTPM up) the other.
    std::fs::write(&store, &kept).unwrap();
    s.start_manager();
    s.stop_manager();
    std::fs::remove_file(&store).unwrap();
    xvtpm_tests::tpm2(&s.swtpm.tcti(), &["tpm2_nvundefine", "-C", "o", "0x01805600"]);
    s.start_manager();
    let out = s.xl(&["mgr", "provision", "--yes", "--pcrs", "0-7"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(status(&s)["store_counter"]["nv_index"], "0x01805600");
}
