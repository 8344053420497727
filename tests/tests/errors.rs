//! Errors a user can act on: each names its cause once, with the fix, and a command that is
//! going to fail refuses before it creates anything.

use std::process::{Command, Output, Stdio};

use testkit::bin_path;
use xvtpm_tests::Stack;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `vtpmmgr --tcti T serve` in fresh directories: it must fail at the TPM.
fn mgr_with_tcti(tcti: &str) -> Output {
    let dir = testkit::tempdir();
    Command::new(bin_path("vtpmmgr"))
        .args(["--tcti", tcti, "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .arg("serve")
        .env_remove("TSS2_LOG")
        .env_remove("XVTPM_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run vtpmmgr")
}

#[test]
fn physical_tpm_errors_name_the_cause_once_without_tss2_noise() {
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = mgr_with_tcti(&format!("swtpm:host=127.0.0.1,port={free}"));
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        all.contains(&format!("connection refused to 127.0.0.1:{free}")),
        "names the refused address: {all}"
    );
    assert!(
        !all.contains("invalid TCTI configuration"),
        "not a configuration problem: {all}"
    );
    assert!(
        !all.contains("response code not recognized"),
        "no tss2 response-code noise: {all}"
    );
    assert!(
        !all.contains("ERROR:tcti"),
        "tss2's own log is silenced: {all}"
    );
    assert_eq!(
        all.lines().filter(|l| l.contains("error")).count(),
        1,
        "one error line: {all}"
    );

    // Something listens, but it is no TPM: the checks pass and tss2 fails. Its own log lines
    // (ERROR:tcti:…) stay silent unless TSS2_LOG asks for them.
    let (data, ctrl) = loop {
        let d = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = d.local_addr().unwrap().port();
        if let Ok(c) = std::net::TcpListener::bind(("127.0.0.1", p + 1)) {
            break (d, c);
        }
    };
    let port = data.local_addr().unwrap().port();
    for l in [data, ctrl] {
        std::thread::spawn(move || {
            for c in l.incoming() {
                drop(c);
            }
        });
    }
    let out = mgr_with_tcti(&format!("swtpm:host=127.0.0.1,port={port}"));
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(!all.contains("ERROR:"), "tss2's own log is silenced: {all}");
    assert_eq!(all.lines().count(), 1, "one line: {all}");
    assert!(
        all.contains("not a TPM"),
        "says what the I/O error means: {all}"
    );

    let all = text(&mgr_with_tcti("device:/nonexistent/tpm9"));
    assert!(all.contains("/nonexistent/tpm9 does not exist"), "{all}");
    assert_eq!(all.lines().count(), 1, "one line: {all}");

    let all = text(&mgr_with_tcti("swtmp:host=127.0.0.1,port=2321"));
    assert!(all.contains("unknown TCTI name \"swtmp\""), "{all}");
    for example in [
        "device:/dev/tpmrm0",
        "swtpm:host=127.0.0.1,port=2321",
        "mssim:",
        "tabrmd",
    ] {
        assert!(all.contains(example), "lists {example}: {all}");
    }
}

/// The physical TPM's store counter: every vTPM identity made (or deleted) moves it.
fn store_counter(s: &Stack) -> u64 {
    s.xl_json(&["mgr", "status"])["store_counter"]["store_value"]
        .as_u64()
        .expect("store counter")
}

fn assert_nothing_created(s: &Stack, counter_before: u64, what: &str) {
    assert_eq!(
        store_counter(s),
        counter_before,
        "{what}: the physical TPM's counter moved (a vTPM was made)"
    );
    let ids = s.xl_json(&["mgr", "vtpm", "list"]);
    assert_eq!(
        ids.as_array().unwrap().len(),
        0,
        "{what}: the manager kept an identity: {ids}"
    );
    let vtpms = s.state_dir().join("vtpms");
    assert!(
        !vtpms.exists() || std::fs::read_dir(&vtpms).unwrap().count() == 0,
        "{what}: a state directory was made"
    );
}

#[test]
fn bad_listeners_and_options_are_refused_before_a_vtpm_is_made() {
    let s = Stack::start();
    let before = store_counter(&s);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let missing = s.dir.path().join("no-such-dir").join("tpm.sock");
    let data_missing = format!("data:{}", missing.display());
    let tcp_busy = format!("tcp:127.0.0.1:{port}");
    let busy_addr = format!("127.0.0.1:{port}");
    let cases: [(&[&str], &str); 7] = [
        (
            &["--uuid", "00000000-0000-0000-0000-000000000000"],
            "nil UUID",
        ),
        // a vTPM domain's memory outside 8..=4096 MiB, refused before the manager makes anything
        (&["--domain", "vtpm-x", "--memory", "4"], "--memory 4"),
        (&["--domain", "vtpm-x", "--memory", "1000000"], "8..=4096"),
        (&["--listen", "udp:1"], "udp:1"),
        (&["--listen", &data_missing], "no-such-dir"),
        (&["--listen", &tcp_busy], &busy_addr),
        (&["--tpm12", "--ek", "ecc"], "RSA-2048"),
    ];
    for (args, needle) in cases {
        let mut a = vec!["vtpm", "create"];
        a.extend_from_slice(args);
        let out = s.xl(&a);
        let all = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?} is bad usage: {all}");
        assert!(
            all.contains(needle),
            "{args:?}: the error names {needle:?}: {all}"
        );
        assert_nothing_created(&s, before, &format!("{args:?}"));
    }
    drop(busy);
}

fn write(s: &Stack, name: &str, body: &str, mode: u32) -> String {
    let p = s.dir.path().join(name);
    std::fs::write(&p, body).unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    p.display().to_string()
}

#[test]
fn xl_create_checks_for_xen_before_it_makes_a_vtpm_and_dry_run_makes_nothing() {
    let s = Stack::start();
    let before = store_counter(&s);
    // A stand-in for `xl` that says yes to everything and knows no domain.
    let fake_xl = write(
        &s,
        "xl",
        "#!/bin/sh\ncase \"$1\" in domid) exit 1;; esac\nexit 0\n",
        0o755,
    );
    let xenstore = write(&s, "xenstored-socket", "", 0o600);
    let cfg = write(
        &s,
        "g.cfg",
        "name = \"g1\"\nmemory = 128\ntype = \"pv\"\nvtpm = [ \"backend=0\" ]\n",
        0o644,
    );
    let nil = write(
        &s,
        "nil.cfg",
        "name = \"g2\"\nvtpm = [ \"backend=0,uuid=00000000-0000-0000-0000-000000000000\" ]\n",
        0o644,
    );
    let xl = |args: &[&str], xenstored: &str| {
        Command::new(bin_path("xl-vtpm"))
            .args(args)
            .env("XVTPM_RUN_DIR", s.run_dir())
            .env("XVTPM_STATE_DIR", s.state_dir())
            .env("XVTPM_VTPM_DOMAIN", bin_path("vtpm-domain"))
            .env("XVTPM_XL", &fake_xl)
            .env("XENSTORED_PATH", xenstored)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let no_xen = s.dir.path().join("no-xenstored").display().to_string();

    let out = xl(&["create", &cfg], &no_xen);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains("Xen is not running") && all.contains("xl-vtpm vtpm create"),
        "{all}"
    );
    assert_nothing_created(&s, before, "create without Xen");

    let out = xl(&["create", &nil], &xenstore);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(all.contains("nil UUID"), "{all}");
    assert_nothing_created(&s, before, "create with a nil vTPM UUID");

    let out = xl(&["create", "--dry-run", &cfg], &xenstore);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(
        all.contains("dry run, nothing created")
            && all.contains("create vTPM")
            && all.contains("guest g1"),
        "{all}"
    );
    let out = xl(&["create", "--dry-run", "--json", &cfg], &xenstore);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        (
            plan["dry_run"].as_bool(),
            plan["plan"]["guest_name"].as_str(),
            plan["plan"]["vtpm_exists"].as_bool()
        ),
        (Some(true), Some("g1"), Some(false)),
        "{plan}"
    );
    assert_nothing_created(&s, before, "create --dry-run");
    assert!(
        !s.state_dir().join("registry.sqlite").exists(),
        "--dry-run made the registry"
    );
}

#[test]
fn refusals_name_what_is_wrong() {
    let s = Stack::start();
    let out = s.xl(&["mgr", "group", "del", "nosuch"]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(5), "{all}");
    assert!(
        all.contains("no such group \"nosuch\"") && !all.contains("--yes"),
        "{all}"
    );

    // Not root: the manager runs, so "start vtpmmgr serve" would be wrong advice.
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(bin_path("xl-vtpm"))
        .args(["mgr", "status"])
        .env("XVTPM_RUN_DIR", s.run_dir())
        .env("XVTPM_STATE_DIR", s.state_dir())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(6), "{all}");
    assert!(
        all.contains("permission denied") && all.contains("as root"),
        "{all}"
    );
    assert!(!all.contains("vtpmmgr serve"), "wrong advice: {all}");
}

fn keys(v: &serde_json::Value) -> Vec<String> {
    v.as_object().expect("an object").keys().cloned().collect()
}

#[test]
fn one_versioned_json_shape_per_object() {
    let s = Stack::start();
    let created = s.xl_json(&["vtpm", "create", "--listen", "tcp:127.0.41.1:0"]);
    let uuid = created["uuid"].as_str().unwrap().to_string();
    assert_eq!(created["schema"], "xvtpm.vtpm/1", "{created}");
    let port = created["runtime"]["tcp_ports"][0][0].as_u64().unwrap();
    let tcti = format!("swtpm:host=127.0.41.1,port={port}");
    assert_eq!(
        created["tcti"],
        tcti.as_str(),
        "the TCTI names the address it listens on: {created}"
    );
    assert_eq!(
        xvtpm_tests::tpm2(&tcti, &["tpm2_getrandom", "--hex", "4"])
            .trim()
            .len(),
        8,
        "the TCTI reaches it"
    );
    let shown = s.xl_json(&["vtpm", "show", &uuid]);
    assert!(shown.is_object(), "show prints the object: {shown}");
    assert_eq!(keys(&shown), keys(&created));
    assert_eq!(shown["tcti"], created["tcti"]);

    let unix = s.xl_json(&["vtpm", "create"]);
    assert!(
        unix["tcti"]
            .as_str()
            .is_some_and(|t| t.starts_with("swtpm:path=")),
        "{unix}"
    );
    let list = s.xl_json(&["vtpm", "list"]);
    let rows = list.as_array().expect("list prints an array");
    assert_eq!(rows.len(), 2);
    for r in rows {
        assert_eq!(keys(r), keys(&created), "list has the same objects: {r}");
        assert!(r["tcti"].is_string(), "{r}");
    }

    let st = s.xl_json(&["mgr", "status"]);
    assert_eq!(st["schema"], "xvtpm.mgr-status/1", "{st}");
    assert_eq!(
        st["store_counter"]["nv_index"], "0x01805600",
        "handles in hex, as in the text: {st}"
    );

    let g = s.xl_json(&["mgr", "group", "add", "tenant-x"]);
    assert!(g.is_object(), "group add prints the object: {g}");
    assert_eq!(g["schema"], "xvtpm.group/1");
    let groups = s.xl_json(&["mgr", "group", "list"]);
    for gg in groups.as_array().unwrap() {
        assert_eq!(keys(gg), keys(&g));
    }
}

/// `vtpmmgr serve --xen` where there is no xenstore: one error line, the link, then its cause.
#[test]
fn a_xen_link_that_cannot_start_names_its_cause_once() {
    let tpm = testkit::Swtpm::start();
    let dir = testkit::tempdir();
    let out = Command::new(bin_path("vtpmmgr"))
        .args(["--tcti", &tpm.tcti(), "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .args(["serve", "--xen", "/local/domain/0/backend/vtpm"])
        .env_remove("XVTPM_LOG")
        .env("XENSTORED_PATH", dir.path().join("no-xenstored"))
        .stdin(Stdio::null())
        .output()
        .expect("run vtpmmgr");
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    let errors: Vec<&str> = all.lines().filter(|l| l.starts_with("vtpmmgr: error:")).collect();
    assert_eq!(errors.len(), 1, "{all}");
    assert!(errors[0].starts_with("vtpmmgr: error: cannot start the Xen manager link: cannot connect to xenstore: "), "{all}");
}
