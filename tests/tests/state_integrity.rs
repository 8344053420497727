//! A tampered, truncated, swapped or missing state file stops the vTPM with a
//! clear error; the file is never overwritten and no new TPM is made.

use xvtpm_tests::Stack;

fn start_fails(s: &Stack, uuid: &uuid::Uuid, needle: &str) {
    let out = s.xl(&["vtpm", "start", &uuid.to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "vTPM started from a bad state file");
    assert!(err.contains(needle), "error does not say {needle:?}: {err}");
}

#[test]
fn bad_state_files_are_refused_and_left_untouched() {
    let s = Stack::start();
    let a = s.create_vtpm();
    let b = s.create_vtpm();
    s.stop_vtpm(&a.uuid);
    s.stop_vtpm(&b.uuid);
    let good = std::fs::read(&a.state_file).unwrap();

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("tampered", { let mut g = good.clone(); let i = g.len() / 2; g[i] ^= 0x01; g }, "failed authentication"),
        ("truncated", good[..good.len() - 100].to_vec(), "failed authentication"),
        ("truncated to header", good[..20].to_vec(), "truncated"),
        ("swapped (B's file)", std::fs::read(&b.state_file).unwrap(), "belongs to vTPM"),
        ("empty", vec![], "truncated"),
    ];
    for (what, bytes, needle) in cases {
        std::fs::write(&a.state_file, &bytes).unwrap();
        start_fails(&s, &a.uuid, needle);
        assert_eq!(std::fs::read(&a.state_file).unwrap(), bytes, "{what}: the file was modified");
        let log = s.vtpm_log(&a.uuid);
        assert!(log.contains("cannot be opened"), "{what}: log lacks the reason");
        // The error line names the cause once (the message quotes it; it is not repeated).
        let line = log.lines().rfind(|l| l.starts_with("vtpm-domain: error:")).unwrap_or_default();
        assert_eq!(line.matches(needle).count(), 1, "{what}: the cause once: {line}");
    }

    std::fs::remove_file(&a.state_file).unwrap();
    start_fails(&s, &a.uuid, "refusing to manufacture a new TPM");
    assert!(!a.state_file.exists(), "a missing state file was silently regenerated");

    // The original file still works: nothing was lost.
    std::fs::write(&a.state_file, &good).unwrap();
    let again = s.start_vtpm(&a.uuid);
    assert!(again.port.is_some());
    // A failed start leaves no process or attachment behind.
    let list = s.xl_json(&["vtpm", "list"]);
    let running = list.as_array().unwrap().iter().filter(|r| r["state"] == "running").count();
    assert_eq!(running, 1);
}
