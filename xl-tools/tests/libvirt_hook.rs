//! libvirt libxl hook decisions against recorded invocations (tests/data/libvirt/).

use std::path::PathBuf;

use uuid::Uuid;
use xl_tools::libvirt_hook::{
    Action, HookError, Invocation, Operation, RequestSource, TpmVersion, decide,
    exit_code_for_error, parse_domain_xml,
};

fn data(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/libvirt")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn kind(a: &Action) -> &'static str {
    match a {
        Action::EnsureVtpmRunning { .. } => "ensure",
        Action::AttachVtpm { .. } => "attach",
        Action::StopVtpm { .. } => "stop",
        Action::Verify { .. } => "verify",
        Action::RefuseMigration { .. } => "refuse",
        Action::CheckIncoming { .. } => "check-incoming",
    }
}

#[test]
fn recorded_invocations() {
    let mut n = 0;
    for (lineno, line) in data("invocations.txt").lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split('|').map(str::trim).collect();
        assert_eq!(f.len(), 4, "invocations.txt:{}: {line}", lineno + 1);
        let (xml, argv, expect, code) = (
            data(f[0]),
            f[1].split_whitespace().collect::<Vec<_>>(),
            f[2],
            f[3].parse::<i32>().unwrap(),
        );
        let at = format!("invocations.txt:{}: `{}`", lineno + 1, f[1]);
        let inv = Invocation::from_args(&argv).unwrap();
        match decide(&inv, &xml) {
            Ok(d) => {
                let kinds: Vec<&str> = d.actions.iter().map(kind).collect();
                if expect == "noop" {
                    assert!(d.is_noop(), "{at}: expected no-op, got {kinds:?}");
                    assert_eq!(d.exit_code(true), 0, "{at}");
                } else {
                    assert_eq!(kinds, [expect], "{at}");
                    let refused = expect == "refuse";
                    assert_eq!(
                        d.exit_code(true),
                        if refused { code } else { 0 },
                        "{at}: success exit code"
                    );
                }
                assert_eq!(d.exit_code(false), code, "{at}: failure exit code");
            }
            Err(e) => {
                assert_eq!(expect, "error", "{at}: unexpected error {e}");
                assert_eq!(exit_code_for_error(Some(&inv.operation)), code, "{at}: {e}");
                assert!(e.to_string().starts_with("libvirt hook: "), "{at}: {e}");
            }
        }
        n += 1;
    }
    assert!(n >= 20, "only {n} recorded invocations");
}

#[test]
fn actions_carry_the_guest_identity() {
    let web1 = Uuid::parse_str("4dea22b3-1d52-d8f3-2516-782e98a23fa0").unwrap();
    let inv = Invocation::from_args(["web1", "prepare", "begin", "-"]).unwrap();
    let d = decide(&inv, &data("web1-metadata.xml")).unwrap();
    let Action::EnsureVtpmRunning {
        guest_name,
        guest_uuid,
        request,
    } = &d.actions[0]
    else {
        panic!("{d:?}")
    };
    assert_eq!((guest_name.as_str(), *guest_uuid), ("web1", web1));
    assert_eq!(
        request.uuid,
        Some(Uuid::parse_str("ac0a5b9e-cbe2-4c07-b43b-1d69e46fb839").unwrap())
    );
    assert_eq!(request.group.as_deref(), Some("tenant-a"));
    assert_eq!(
        (request.version, request.source),
        (TpmVersion::V2, RequestSource::Metadata)
    );

    let inv = Invocation::from_args(["web1", "started", "begin", "-"]).unwrap();
    let d = decide(&inv, &data("web1-running.xml")).unwrap();
    assert_eq!(
        d.actions,
        [Action::AttachVtpm {
            guest_name: "web1".into(),
            guest_uuid: web1,
            guest_domid: Some(12)
        }]
    );

    let inv = Invocation::from_args(["db1", "prepare", "begin", "-"]).unwrap();
    let d = decide(&inv, &data("db1-tpm-device.xml")).unwrap();
    let Action::EnsureVtpmRunning { request, .. } = &d.actions[0] else {
        panic!("{d:?}")
    };
    assert_eq!(
        (request.uuid, request.source),
        (None, RequestSource::TpmDevice)
    );
}

#[test]
fn bad_input_gives_clear_errors() {
    let e = parse_domain_xml(&data("truncated.xml")).unwrap_err();
    assert!(matches!(e, HookError::BadXml(_)), "{e}");
    assert!(e.to_string().contains("not well-formed"), "{e}");

    let e = parse_domain_xml(&data("bad-metadata.xml")).unwrap_err();
    assert!(
        e.to_string().contains("uuid=\"ac0a5b9e\" is not a UUID"),
        "{e}"
    );
    let fixed = data("bad-metadata.xml").replace("uuid=\"ac0a5b9e\" ", "");
    let e = parse_domain_xml(&fixed).unwrap_err();
    assert!(e.to_string().contains("unknown attribute `grup`"), "{e}");

    let e = parse_domain_xml(&data("passthrough-tpm.xml")).unwrap_err();
    assert!(
        e.to_string()
            .contains("'passthrough' cannot be served on Xen"),
        "{e}"
    );

    let e = parse_domain_xml("<network><name>x</name></network>").unwrap_err();
    assert!(e.to_string().contains("expected <domain>"), "{e}");
    let e = parse_domain_xml("<domain><name>x</name><uuid>nope</uuid></domain>").unwrap_err();
    assert!(e.to_string().contains("<uuid> `nope`"), "{e}");
    let e = parse_domain_xml("<domain><name>x</name></domain>").unwrap_err();
    assert!(e.to_string().contains("no <uuid>"), "{e}");

    let two = data("web1-metadata.xml").replace(
        "</metadata>",
        "<xvtpm:vtpm xmlns:xvtpm=\"https://xvtpm.invalid/xmlns/1\"/></metadata>",
    );
    assert!(
        parse_domain_xml(&two)
            .unwrap_err()
            .to_string()
            .contains("more than one")
    );

    let conflict = data("db1-tpm-device.xml").replace(
        "<memory",
        "<metadata><v:vtpm xmlns:v=\"https://xvtpm.invalid/xmlns/1\" version=\"1.2\"/></metadata><memory",
    );
    assert!(
        parse_domain_xml(&conflict)
            .unwrap_err()
            .to_string()
            .contains("make them agree")
    );

    // Wrong argument count: libvirt always passes four.
    assert_eq!(
        Invocation::from_args(["web1", "prepare"]).unwrap_err(),
        HookError::Usage(2)
    );
    assert_eq!(exit_code_for_error(None), 2);
    assert_eq!(
        exit_code_for_error(Some(&Operation::Reconnect)),
        0,
        "reconnect must never kill guests"
    );
}

#[test]
fn metadata_in_other_namespaces_and_domid_minus_one() {
    let xml =
        data("web1-metadata.xml").replace("<domain type='xen'>", "<domain type='xen' id='-1'>");
    let d = parse_domain_xml(&xml).unwrap();
    assert_eq!(d.domid, None);
    assert!(d.vtpm.is_some());
    // The nova element alone does not opt in.
    let only_nova = data("web1-metadata.xml")
        .lines()
        .filter(|l| !l.contains("xvtpm:vtpm"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(parse_domain_xml(&only_nova).unwrap().vtpm.is_none());
}

/// The domain XML Debian 12's libvirtd 9.0 (libxl driver) passed to the hook in the testbed
/// (`ci/testbed/scenario` phases `libvirt-*`, 2026-12-04): one file per invocation, named
/// `NNN-<operation>-<sub-operation>.xml` in the order libvirt ran them (define, start, libvirtd
/// restart, reboot, save/restore, destroy of the guest `lv-a`).
#[test]
fn recorded_libxl_xml() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/libvirt/libxl-9.0");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "xml"))
        .collect();
    files.sort();
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    let mut uuid = None;
    for p in &files {
        let stem = p.file_stem().unwrap().to_str().unwrap();
        let mut parts = stem.splitn(3, '-');
        let (_, op, sub) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
        let xml = std::fs::read_to_string(p).unwrap();
        let at = p.file_name().unwrap().to_string_lossy().to_string();
        let info = parse_domain_xml(&xml).unwrap_or_else(|e| panic!("{at}: {e}"));
        assert_eq!(info.name, "lv-a", "{at}");
        assert_eq!(*uuid.get_or_insert(info.uuid), info.uuid, "{at}: the guest's UUID changed");
        let req = info.vtpm.as_ref().unwrap_or_else(|| panic!("{at}: the <xvtpm:vtpm/> metadata was lost"));
        assert_eq!((req.uuid, req.source, req.version), (None, RequestSource::Metadata, TpmVersion::V2), "{at}");
        let inv = Invocation::from_args(["lv-a", op, sub, "-"]).unwrap();
        let d = decide(&inv, &xml).unwrap_or_else(|e| panic!("{at}: {e}"));
        let kinds: Vec<&str> = d.actions.iter().map(kind).collect();
        let want: &[&str] = match op {
            "prepare" => &["ensure"],
            "started" => &["attach"],
            "release" => &["stop"],
            "reconnect" => &["verify"],
            "start" | "stopped" => &[],
            other => panic!("{at}: libvirt ran an operation this test does not know: {other}"),
        };
        assert_eq!(kinds, want, "{at}");
        match (op, &d.actions[..]) {
            // libvirt's XML of a running domain names its domid: the attach needs no lookup
            ("started", [Action::AttachVtpm { guest_domid, .. }]) => {
                assert!(guest_domid.is_some_and(|n| n > 0), "{at}: {guest_domid:?}")
            }
            ("prepare", _) => assert_eq!(info.domid, None, "{at}: no domain exists at prepare"),
            _ => {}
        }
        *seen.entry(format!("{op} {sub}")).or_default() += 1;
    }
    for op in ["prepare begin", "start begin", "started begin", "stopped end", "release end", "reconnect begin"] {
        assert!(seen.contains_key(op), "no recorded `{op}` in {}: {seen:?}", dir.display());
    }
}

/// libvirt 9.0's libxl driver runs `migrate begin` with an empty stdin (seen on two real Xen
/// hosts in the testbed). Failing closed on the missing XML refused every incoming migration;
/// the guest is judged by its name instead: against the registry, by the binary itself.
#[test]
fn an_incoming_migration_without_xml_is_judged_by_the_guest_s_name() {
    let inv = Invocation::from_args(["lv-m", "migrate", "begin", "-"]).unwrap();
    let d = decide(&inv, "").unwrap();
    assert_eq!(d.actions.iter().map(kind).collect::<Vec<_>>(), ["check-incoming"]);
    assert!(matches!(&d.actions[0], Action::CheckIncoming { guest_name } if guest_name == "lv-m"));
    assert_eq!(d.exit_code(false), 1, "a failed check refuses the migration");
    // the other operations still need their XML
    let prep = Invocation::from_args(["lv-m", "prepare", "begin", "-"]).unwrap();
    assert!(matches!(decide(&prep, "").unwrap_err(), HookError::BadXml(_)));

    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry.sqlite");
    let mut reg = xl_tools::registry::Registry::open(&registry).unwrap();
    let vtpm = Uuid::new_v4();
    reg.begin_create(&xl_tools::registry::NewPair {
        guest_uuid: Uuid::new_v4(),
        guest_name: "lv-v".into(),
        vtpm_uuid: vtpm,
        vtpm_domain: "vtpm-lv-v".into(),
        group: None,
    })
    .unwrap();
    drop(reg);
    let hook = |guest: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_xl-vtpm"))
            .args(["--registry", &registry.display().to_string(), "--state-dir", &dir.path().display().to_string()])
            .args(["--run-dir", &dir.path().join("run").display().to_string(), "libvirt-hook", guest, "migrate", "begin", "-"])
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (rc, out, err) = hook("lv-m");
    assert_eq!(rc, Some(0), "a guest the registry does not know migrates in: {err}");
    assert!(out.is_empty(), "no XML on stdout (libvirt would take it for a replacement definition): {out}");
    let (rc, _, err) = hook("lv-v");
    assert_eq!(rc, Some(1), "{err}");
    assert!(err.contains("lv-v") && err.contains(&vtpm.to_string()) && err.contains("cannot follow a libvirt migration"), "{err}");
    assert_eq!(err.matches("refused").count(), 1, "one cause, said once: {err}");

    // No manager runs here (no admin socket under --run-dir): a guest without a vTPM still
    // starts (before, every hook call connected first and exited 3).
    let plain = format!("<domain type='xen'><name>lv-m</name><uuid>{}</uuid></domain>", Uuid::new_v4());
    let (rc, err) = hook_on(dir.path(), &xl_tools::registry::this_host(), &dir.path().join("none.json"), &["lv-m", "prepare", "begin", "-"], &plain, &[]);
    assert_eq!(rc, Some(0), "{err}");
}

/// Runs `xl-vtpm --host HOST libvirt-hook ARGS` on the registry in `dir` with `xml` on stdin,
/// the libvirt migration configuration `config` (a path that may not exist) and `envs` (read by
/// the fake transport). No manager runs (no admin socket under the run directory): every action
/// that reached one would fail.
fn hook_on(dir: &std::path::Path, host: &str, config: &std::path::Path, args: &[&str], xml: &str, envs: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_xl-vtpm"))
        .args(["--registry", &dir.join("registry.sqlite").display().to_string(), "--state-dir", &dir.display().to_string()])
        .args(["--run-dir", &dir.join("run").display().to_string(), "--host", host, "libvirt-hook"])
        .args(args)
        .env("NO_COLOR", "1")
        .env("XVTPM_LIBVIRT_MIGRATE", config)
        .envs(envs.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut c.stdin.take().unwrap(), xml.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.stdout.is_empty(), "nothing on stdout (libvirt reads it): {}", String::from_utf8_lossy(&out.stdout));
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A libvirt migration that takes the vTPM along, as the hooks on both hosts see it (the
/// source's handoff is a fake transport here; the real one runs between the testbed's two Xen
/// hosts, `libvirt-2host`): the destination lets the guest in only with the migration
/// configuration and once the source's `--prepare` passed, makes no vTPM of its own at
/// `prepare`, pulls the identity at `started` — a failure before the vTPM left the source fails
/// the hook (libvirt cancels), one after it keeps the guest here and says how to finish — and
/// neither host's `release` touches a pair another host holds.
#[test]
fn a_libvirt_migration_brings_the_vtpm_along_through_the_hooks() {
    use xl_tools::registry::{Location, NewPair, Registry, State};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (guest, vtpm) = (Uuid::new_v4(), Uuid::new_v4());
    let mut a = Registry::connect(&Location::Sqlite(d.join("registry.sqlite")), "host-a").unwrap();
    let id = a.begin_create(&NewPair { guest_uuid: guest, guest_name: "lv-v".into(), vtpm_uuid: vtpm, vtpm_domain: "vtpm-lv-v".into(), group: None }).unwrap();
    a.mark_running(id, 5, 0).unwrap();
    let xml = format!(
        "<domain type='xen' id='9'><name>lv-v</name><uuid>{guest}</uuid><metadata><xvtpm:vtpm xmlns:xvtpm='https://xvtpm.invalid/xmlns/1' uuid='{vtpm}'/></metadata></domain>"
    );
    let config = d.join("libvirt-migrate.json");
    let marker = d.join("run/libvirt-incoming/lv-v.json");
    let args = d.join("handoff.args");
    let hook = |host: &str, op: &[&str], xml: &str, envs: &[(&str, &str)]| hook_on(d, host, &config, op, xml, envs);
    let begin = ["lv-v", "migrate", "begin", "-"];
    let row = || Registry::connect(&Location::Sqlite(d.join("registry.sqlite")), "host-b").unwrap().get_by_guest(guest).unwrap().unwrap();

    // Without the configuration on the destination: refused at migrate begin, saying how.
    let (rc, err) = hook("host-b", &begin, "", &[]);
    assert_eq!(rc, Some(1), "{err}");
    assert!(err.contains("host-a") && err.contains(&config.display().to_string()), "{err}");
    assert!(!marker.exists());

    // The fake transport: records its arguments; `--prepare` passes unless PREPARE_FAIL, the
    // move fails with MOVE_RC after a progress line.
    let fake_ssh = d.join("fake-ssh");
    std::fs::write(
        &fake_ssh,
        format!(
            "#!/bin/sh\necho \"$@\" >> {}\ncase \"$*\" in\n *--prepare*) [ -n \"$PREPARE_HANG\" ] && {{ sleep 30 & echo $! > {}.hang; wait; exit 0; }}; [ -n \"$PREPARE_FAIL\" ] && {{ echo 'xl-vtpm: error: host PCR 0 of host-b is not the policy' >&2; exit 6; }}; echo '{{}}'; exit 0;;\nesac\necho 'xl-vtpm: offer made by host-b' >&2\necho 'xl-vtpm: error: host-a refuses host-b: PCR 0 differs' >&2\nexit ${{MOVE_RC:-4}}\n",
            args.display(),
            args.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake_ssh, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(&config, format!(r#"{{"ssh": "{}", "ek_ca": ["/nonexistent/root.pem"], "host_pcrs_policy": "/nonexistent/pcrs.json"}}"#, fake_ssh.display())).unwrap();
    let last_args = || std::fs::read_to_string(&args).unwrap().lines().last().unwrap().to_string();

    // A source that does not answer --prepare: refused once the configured wait is over.
    std::fs::write(&config, format!(r#"{{"ssh": "{}", "ek_ca": ["/nonexistent/root.pem"], "host_pcrs_policy": "/nonexistent/pcrs.json", "prepare_timeout_s": 1}}"#, fake_ssh.display())).unwrap();
    let t = std::time::Instant::now();
    let (rc, err) = hook("host-b", &begin, "", &[("PREPARE_HANG", "1")]);
    assert_eq!(rc, Some(1), "{err}");
    assert!(t.elapsed() < std::time::Duration::from_secs(20), "the hook waited {:?}", t.elapsed());
    assert!(err.contains("host-a did not answer within 1 s"), "{err}");
    let hung: i32 = std::fs::read_to_string(format!("{}.hang", args.display())).unwrap().trim().parse().unwrap();
    // (killed: gone, or a zombie until init reaps it)
    let gone = || std::fs::read_to_string(format!("/proc/{hung}/stat")).map_or(true, |st| st.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')));
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !gone() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(gone(), "the transport {hung} outlived the timeout");
    assert!(!marker.exists());
    std::fs::write(&config, format!(r#"{{"ssh": "{}", "ek_ca": ["/nonexistent/root.pem"], "host_pcrs_policy": "/nonexistent/pcrs.json"}}"#, fake_ssh.display())).unwrap();

    // The source refuses this host at --prepare: a clean refusal, its cause on the line.
    let (rc, err) = hook("host-b", &begin, "", &[("PREPARE_FAIL", "1")]);
    assert_eq!(rc, Some(1), "{err}");
    assert_eq!(last_args(), "host-a xl-vtpm libvirt-handoff lv-v host-b --prepare");
    assert!(err.lines().any(|l| l.contains("refused") && l.contains("host PCR 0 of host-b is not the policy")), "{err}");
    assert!(!marker.exists());

    // It passes: let in, and noted (0600).
    let (rc, err) = hook("host-b", &begin, "", &[]);
    assert_eq!(rc, Some(0), "{err}");
    let m = std::fs::metadata(&marker).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777, 0o600);

    // prepare: no vTPM is made here and no manager is needed (none runs).
    let (rc, err) = hook("host-b", &["lv-v", "prepare", "begin", "-"], &xml, &[]);
    assert_eq!(rc, Some(0), "{err}");
    assert_eq!((row().state, row().active_on.as_deref().map(str::to_owned)), (State::Running, Some("host-a".into())), "the pair stays with its holder");

    // started: the source's handoff with this guest, this host and the arrived domain. It fails
    // before the vTPM left: the hook fails (libvirt destroys its incoming copy), with the cause.
    let (rc, err) = hook("host-b", &["lv-v", "started", "begin", "-"], &xml, &[]);
    assert_eq!(rc, Some(1), "{err}");
    assert_eq!(last_args(), "host-a xl-vtpm libvirt-handoff lv-v host-b --domid 9");
    assert!(
        err.lines().any(|l| l.contains("cannot take its vTPM") && l.contains("from host host-a: host-a refuses host-b: PCR 0 differs (")),
        "the cause, from the source, on the error's own line: {err}"
    );
    assert!(!err.contains("error: xl-vtpm: offer made"), "the source's progress is not the cause: {err}");
    assert!(!marker.exists(), "the note goes with the attempt");

    // Again, failing after the vTPM left the source (MOVE_UNFINISHED): the guest belongs here,
    // the hook succeeds (libvirt unpauses it here) and says how to finish.
    assert_eq!(hook("host-b", &begin, "", &[]).0, Some(0));
    assert_eq!(hook("host-b", &["lv-v", "prepare", "begin", "-"], &xml, &[]).0, Some(0));
    let (rc, err) = hook("host-b", &["lv-v", "started", "begin", "-"], &xml, &[("MOVE_RC", "9")]);
    assert_eq!(rc, Some(0), "{err}");
    assert!(err.contains("stays here without its TPM") && err.contains("xl-vtpm migrate lv-v host-b --finish"), "{err}");

    // release on the destination after a failed move, and on a source whose pair moved away:
    // nothing stopped, nothing changed, no manager asked.
    for host in ["host-b", "host-c"] {
        let (rc, err) = hook(host, &["lv-v", "release", "end", "-"], &xml, &[]);
        assert_eq!(rc, Some(0), "{host}: {err}");
        assert!(err.is_empty(), "{host}: {err}");
    }
    assert_eq!((row().state, row().active_on.as_deref().map(str::to_owned)), (State::Running, Some("host-a".into())));
    // The holder's own release still stops it (here: asks for the manager, which is absent).
    assert_eq!(hook("host-a", &["lv-v", "release", "end", "-"], &xml, &[]).0, Some(1));
}
