//! `xl-vtpm create` without Xen: bad configs are refused naming the key, and
//! a create that fails half-way (here: no xenstore for the vTPM's backend)
//! leaves nothing behind — no registry row, no manager identity, no process.
//! The successful path needs Xen and is covered by the QEMU testbed.

use xvtpm_tests::Stack;

fn write(s: &Stack, name: &str, text: &str) -> String {
    let p = s.dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// No vTPM identity in the manager, no registry pair, nothing under the state directory.
fn assert_nothing_left(s: &Stack, fake_xl: &str) {
    let mgr = s.xl_json(&["mgr", "vtpm", "list"]);
    assert_eq!(mgr.as_array().unwrap().len(), 0, "manager kept an identity: {mgr}");
    let pairs = std::process::Command::new(testkit::bin_path("xl-vtpm"))
        .args(["list", "--json"])
        .env("XVTPM_RUN_DIR", s.run_dir())
        .env("XVTPM_STATE_DIR", s.state_dir())
        .env("XVTPM_XL", fake_xl)
        .output()
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&pairs.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 0, "registry kept a pair: {rows}");
    let vtpms = s.state_dir().join("vtpms");
    assert!(!vtpms.exists() || std::fs::read_dir(&vtpms).unwrap().count() == 0, "state or disk image left behind");
}

#[test]
fn bad_configs_name_the_key() {
    let s = Stack::start();
    let cases = [
        ("unknown.cfg", "name = \"g\"\nmemroy = 128\n", "memroy"),
        ("dup.cfg", "name = \"g\"\nmemory = 128\nmemory = 256\n", "memory"),
        ("vtpm-uuid.cfg", "name = \"g\"\nvtpm = [ \"backend=0,uuid=nope\" ]\n", "uuid"),
        ("vtpm-backend.cfg", "name = \"g\"\nvtpm = [ \"uuid=0b6e9d3a-1111-4222-8333-944455556666\" ]\n", "backend"),
        ("vtpm-key.cfg", "name = \"g\"\nvtpm = [ \"backend=0,colour=red\" ]\n", "colour"),
        ("noname.cfg", "memory = 128\n", "name"),
    ];
    for (file, text, key) in cases {
        let out = s.xl(&["create", &write(&s, file, text)]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{file}: {err}");
        assert!(err.contains(key), "{file}: error does not name {key:?}: {err}");
    }
}

#[test]
fn a_failed_create_rolls_back_everything() {
    let s = Stack::start();
    // A stand-in for `xl` (there is no Xen here): any call succeeds and says
    // no domain exists, so the create proceeds until the vTPM's Xen backend
    // cannot reach xenstore.
    let fake_xl = write(&s, "xl", "#!/bin/sh\ncase \"$1\" in domid) exit 1;; list) echo 'Name ID Mem VCPUs State Time(s) UUID'; exit 0;; esac\nexit 0\n");
    std::fs::set_permissions(&fake_xl, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cfg = write(&s, "g.cfg", "name = \"guest1\"\nmemory = 128\ntype = \"pv\"\n");
    let out = std::process::Command::new(testkit::bin_path("xl-vtpm"))
        .args(["create", &cfg])
        .env("XVTPM_RUN_DIR", s.run_dir())
        .env("XVTPM_STATE_DIR", s.state_dir())
        .env("XVTPM_VTPM_DOMAIN", testkit::bin_path("vtpm-domain"))
        .env("XVTPM_XL", &fake_xl)
        // xl-vtpm checks that xenstore is there before it makes anything: a file stands in for
        // its socket, which the vTPM then cannot connect to.
        .env("XENSTORED_PATH", write(&s, "xenstored-socket", ""))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "create succeeded without Xen");
    assert!(err.contains("did not start"), "{err}");
    // Nothing left: no vTPM identity, no registry pair, no process, no state.
    assert_nothing_left(&s, &fake_xl);
}

#[test]
fn a_failed_vtpm_domain_create_rolls_back_everything() {
    // `vtpm= [ "backend=vtpm-g" ]`: the vTPM gets its own domain. Stand-ins record every
    // call: `xl create -p` makes domain 5, `xl vtpm-attach` fails (as when the manager does
    // not take the device), and the rollback must destroy domain 5, detach the manager,
    // release the loop device and leave no identity, registry pair or disk image.
    let s = Stack::start();
    let log = s.dir.path().join("calls.log");
    let made = s.dir.path().join("made");
    let fake_xl = write(
        &s,
        "xl",
        &format!(
            "#!/bin/sh\necho \"xl $*\" >> {log}\ncase \"$1\" in\n\
             create) touch {made};;\n\
             domid) [ \"$2\" = vtpm-g ] && [ -e {made} ] && {{ echo 5; exit 0; }}; exit 1;;\n\
             destroy) rm -f {made};;\n\
             vtpm-attach) echo 'libxl: vtpm backend did not reach InitWait' >&2; exit 1;;\n\
             list) echo 'Name ID Mem VCPUs State Time(s) UUID';;\n\
             esac\nexit 0\n",
            log = log.display(),
            made = made.display()
        ),
    );
    let fake_losetup = write(
        &s,
        "losetup",
        &format!("#!/bin/sh\necho \"losetup $*\" >> {}\n[ \"$1\" = -f ] && echo /dev/loop7\nexit 0\n", log.display()),
    );
    for f in [&fake_xl, &fake_losetup] {
        std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let kernel = write(&s, "vmlinuz", "k");
    let ramdisk = write(&s, "initrd", "r");
    let cfg = write(&s, "g.cfg", "name = \"g\"\nmemory = 128\ntype = \"pv\"\nvtpm = [ \"backend=vtpm-g\" ]\n");
    let out = std::process::Command::new(testkit::bin_path("xl-vtpm"))
        .args(["create", &cfg])
        .env("XVTPM_RUN_DIR", s.run_dir())
        .env("XVTPM_STATE_DIR", s.state_dir())
        .env("XVTPM_XL", &fake_xl)
        .env("XVTPM_LOSETUP", &fake_losetup)
        .env("XENSTORED_PATH", write(&s, "xenstored-socket", ""))
        .env("XVTPM_VTPMDOM_KERNEL", &kernel)
        .env("XVTPM_VTPMDOM_RAMDISK", &ramdisk)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "create succeeded without Xen");
    assert!(err.contains("vtpm-attach") && err.contains("InitWait"), "{err}");
    // This machine's manager serves no Xen link (its Status says so): the error names the fix.
    assert_eq!(s.xl_json(&["mgr", "status"])["xen_link"], serde_json::Value::Bool(false));
    assert!(err.contains("run it with `vtpmmgr serve --xen`"), "{err}");
    let calls = std::fs::read_to_string(&log).unwrap();
    let at = |needle: &str| calls.find(needle).unwrap_or_else(|| panic!("no {needle:?} in:\n{calls}"));
    assert!(at("losetup /dev/loop7 ") < at("xl create -p "), "{calls}");
    assert!(at("xl create -p ") < at("xl destroy 5"), "{calls}");
    assert!(at("xl destroy 5") < at("losetup -d /dev/loop7"), "{calls}");
    assert!(!calls.contains("xl unpause"), "unpaused a half-made domain:\n{calls}");
    assert!(!calls.contains("xl create /"), "created the guest without its vTPM:\n{calls}");
    assert_nothing_left(&s, &fake_xl);
}

#[test]
fn a_vtpm_domain_backend_must_be_a_domain_name() {
    let s = Stack::start();
    for (file, text, key) in [
        ("self.cfg", "name = \"g\"\nvtpm = [ \"backend=g\" ]\n", "guest itself"),
        ("bad.cfg", "name = \"g\"\nvtpm = [ \"backend=12345\" ]\n", "backend"),
    ] {
        let out = s.xl(&["create", &write(&s, file, text)]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{file}: {err}");
        assert!(err.contains(key), "{file}: error does not say {key:?}: {err}");
    }
    // A backend xl's config syntax takes but xl would not take as a domain name: the error
    // names the key and the value once, not the value again under another flag's name.
    let out = s.xl(&["create", &write(&s, "colon.cfg", "name = \"g\"\nvtpm = [ \"backend=vtpm:g\" ]\n")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.matches("vtpm:g").count(), 1, "the value is named once: {err}");
    assert!(err.contains("vtpm= backend") && err.contains("is not a domain name"), "{err}");
    assert!(!err.contains("--domain"), "names a flag this command has not got: {err}");
}
