//! An HVM guest's emulated TPM (docs/hvm.md): `xl-vtpm create` of a config with
//! `vtpm = [ "model=tis" ]` starts the vTPM on sockets owned by the device model's user and
//! hands xl a config whose `device_model_args_hvm` attach it. There is no Xen here: a stand-in
//! `xl` keeps the config it is given, and the host's real `qemu-system-x86_64` (TCG, `-S`, no
//! guest) is started with exactly those arguments, as the device model's user, the way libxl
//! would start Xen's device model. QEMU's own start-up handshake with `-tpmdev emulator` and QMP
//! `query-tpm` prove the arguments are valid and reach the vTPM; a second QEMU after the first
//! one quit is the device model of the rebooted guest (a platform reset). The same path under
//! Xen needs a device model built with TPM support and runs in the testbed (docs/hvm.md).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use testkit::qmp::Qmp;
use xl_tools::xlcfg::XlConfig;
use xvtpm_tests::{Stack, VtpmHandle, rc};

/// The uid and gid QEMU runs as here (`device_model_user = "nobody"` in the guest's config).
const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;

fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

/// A stand-in for `xl`: `create CFG` keeps a copy of CFG (the config libxl would get) and makes
/// the guest exist as domid 7 until `destroy`; `migrate` fails before the guest moved.
fn fake_xl(s: &Stack) -> PathBuf {
    let d = s.dir.path();
    let script = format!(
        "#!/bin/sh\necho \"xl $*\" >> {d}/xl-calls.log\ncase \"$1\" in\n\
         create) cp \"$2\" {d}/xl-created.cfg; touch {d}/guest-made;;\n\
         domid) [ -e {d}/guest-made ] && {{ echo 7; exit 0; }}; exit 1;;\n\
         destroy) rm -f {d}/guest-made;;\n\
         migrate) echo 'migration sender: the receiver failed' >&2; exit 1;;\n\
         list) echo 'Name ID Mem VCPUs State Time(s) UUID';;\n\
         esac\nexit 0\n",
        d = d.display()
    );
    write(d, "xl", &script, 0o755)
}

fn xl_vtpm(s: &Stack, xl: &Path, args: &[&str]) -> std::process::Output {
    s.xl_command(args)
        .env("XVTPM_XL", xl)
        // xl-vtpm checks that xenstore is there before it makes anything; the emulated TPM needs
        // none, so a file standing in for its socket is enough.
        .env("XENSTORED_PATH", s.dir.path().join("xl"))
        .output()
        .unwrap()
}

/// The device model's arguments in the config xl was handed.
fn dm_args(s: &Stack) -> Vec<String> {
    let text = std::fs::read_to_string(s.dir.path().join("xl-created.cfg")).expect("xl create was not run");
    let cfg = XlConfig::parse(&text).unwrap_or_else(|e| panic!("xl would not read the config: {e}\n{text}"));
    assert!(cfg.get("vtpm").is_none(), "the vtpm= line reached xl, which would make a tpmif device of it:\n{text}");
    cfg.get_list("device_model_args_hvm")
        .unwrap_or_else(|| panic!("no device_model_args_hvm:\n{text}"))
        .iter()
        .map(|v| v.as_str().expect("string arguments").to_string())
        .collect()
}

/// QEMU (TCG, stopped with `-S`, no guest) with the device model arguments `args`, run as
/// the device model's user. Returns it with its QMP connection once it is up.
fn start_device_model(s: &Stack, args: &[String], n: u32) -> (Child, Qmp, PathBuf) {
    let dir = s.dir.path().join(format!("qemu{n}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOGROUP)).unwrap();
    let qmp = dir.join("qmp.sock");
    let log = dir.join("qemu.log");
    let found = Command::new("sh").args(["-c", "command -v qemu-system-x86_64"]).output().map(|o| o.status.success());
    assert!(
        matches!(found, Ok(true)),
        "qemu-system-x86_64 is not installed: this test runs a real QEMU against the vTPM. \
         Install it with `apt-get install qemu-system-x86` (scripts/install-deps.sh does)."
    );
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-machine", "pc", "-accel", "tcg", "-nodefaults", "-display", "none", "-m", "64", "-S"])
        .args(args)
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .uid(NOBODY)
        .gid(NOGROUP)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn qemu");
    let q = Qmp::connect(&qmp, &mut child, &log, Duration::from_secs(60));
    (child, q, log)
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("qemu still running after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls a TPM command on the vTPM's own data socket until its response code is `want`.
fn until_rc(v: &VtpmHandle, cmd: &[u8], want: u32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = rc(&v.command(cmd));
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: response code {got:#x}, waited for {want:#x}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pcr16(v: &VtpmHandle) -> [u8; 32] {
    let r = v.command(&tpm_wire::tpm2_pcr_read_bitmap(tpm_wire::TPM2_ALG_SHA256, [0, 0, 1]));
    assert_eq!(rc(&r), 0, "PCR_Read");
    r[30..62].try_into().unwrap()
}

/// A stack whose socket directories the device model's user can reach (the fixture's are root's
/// and 0700; the vTPM's own directory is made for that user by xl-vtpm), and a stand-in `xl`.
fn stack_for_device_model() -> (Stack, PathBuf) {
    let s = Stack::start();
    for d in [s.dir.path().to_path_buf(), s.run_dir()] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let xl = fake_xl(&s);
    (s, xl)
}

#[test]
fn hvm_guest_gets_a_tis_tpm_through_its_device_model() {
    let (s, xl) = stack_for_device_model();
    let cfg = write(
        s.dir.path(),
        "hvm1.cfg",
        "name = \"hvm1\"\ntype = \"hvm\"\nmemory = 256\ndevice_model_user = \"nobody\"\n\
         device_model_args_hvm = [ \"-no-user-config\" ]\nvtpm = [ \"model=tis\" ]\n",
        0o644,
    );
    let out = xl_vtpm(&s, &xl, &["create", cfg.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "xl-vtpm create: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let row: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let uuid = row["vtpm_uuid"].as_str().unwrap().to_string();
    let v = Stack::handle(&s.xl_json(&["vtpm", "show", &uuid]));
    let data = v.socket.clone().expect("the vTPM listens on its default data socket");
    let ctrl = PathBuf::from(format!("{}.ctrl", data.display()));

    // The sockets belong to the device model's user; the config xl got attaches them.
    let sockdir = std::fs::metadata(data.parent().unwrap()).unwrap();
    assert_eq!((sockdir.uid(), sockdir.mode() & 0o777), (NOBODY, 0o700), "socket directory owner and mode");
    let args = dm_args(&s);
    assert_eq!(
        args,
        [
            "-no-user-config".to_string(),
            "-chardev".into(),
            format!("socket,id=xvtpm-chr,path={}", ctrl.display()),
            "-tpmdev".into(),
            "emulator,id=xvtpm-tpm,chardev=xvtpm-chr".into(),
            "-device".into(),
            "tpm-tis,tpmdev=xvtpm-tpm".into(),
        ],
        "the user's own argument first, then the TPM's"
    );

    // The vTPM runs its TPM before any device model is there.
    let get_random = tpm_wire::tpm2_get_random(8);
    assert_eq!(rc(&v.command(&get_random)), 0);

    // The device model comes up with those arguments and has the TPM.
    let (mut qemu, mut q, log) = start_device_model(&s, &args, 1);
    let tpms = q.execute("query-tpm");
    assert_eq!(tpms[0]["model"], "tpm-tis", "{tpms}");
    assert_eq!(tpms[0]["options"]["type"], "emulator", "{tpms}");
    assert_eq!(tpms[0]["options"]["data"]["chardev"], "xvtpm-chr", "{tpms}");
    // Its start-up power-cycled our TPM (CMD_INIT): it wants TPM2_Startup, as after a reset.
    until_rc(&v, &get_random, tpm_wire::TPM2_RC_INITIALIZE, "the device model's CMD_INIT");
    assert_eq!(rc(&v.command(&tpm_wire::tpm2_startup(tpm_wire::TPM2_SU_CLEAR))), 0);
    assert_eq!(rc(&v.command(&tpm_wire::tpm2_pcr_extend(16, &[7; 32]))), 0);
    assert_ne!(pcr16(&v), [0; 32]);

    // The guest reboots: libxl ends its device model (QEMU sends CMD_SHUTDOWN as it exits) and
    // starts a new one on the same socket. The vTPM must still be there for it.
    q.execute("quit");
    let st = wait_exit(&mut qemu, Duration::from_secs(30));
    assert!(st.success(), "qemu exited with {st}:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    // QEMU's CMD_SHUTDOWN was answered in step (QEMU reports any other result at exit).
    let qlog = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!qlog.contains("tpm-emulator"), "QEMU complained about the TPM:\n{qlog}");
    let pid = v.pid.unwrap();
    let (mut qemu2, mut q2, _) = start_device_model(&s, &args, 2);
    assert_eq!(q2.execute("query-tpm")[0]["model"], "tpm-tis");
    // A platform reset: PCRs cleared, the TPM waits for the firmware's TPM2_Startup again.
    until_rc(&v, &get_random, tpm_wire::TPM2_RC_INITIALIZE, "the new device model's CMD_INIT");
    assert!(
        xvtpm_fsutil::pid_alive(pid),
        "the vTPM process that served the first device model is gone:\n{}",
        s.vtpm_log(&v.uuid)
    );
    assert_eq!(rc(&v.command(&tpm_wire::tpm2_startup(tpm_wire::TPM2_SU_CLEAR))), 0);
    assert_eq!(pcr16(&v), [0; 32], "PCR 16 survived the reboot");
    let vlog = s.vtpm_log(&v.uuid);
    assert!(vlog.contains("CMD_SHUTDOWN: TPM powered off"), "{vlog}");
    // Every control request of both device models was framed as QEMU sent it.
    for odd in ["shorter than its command code", "wrong size", "unknown control command"] {
        assert!(!vlog.contains(odd), "the vTPM logged {odd:?}:\n{vlog}");
    }

    // A crashed device model (killed) does not end the vTPM either.
    qemu2.kill().unwrap();
    qemu2.wait().unwrap();
    assert_eq!(rc(&v.command(&get_random)), 0, "the vTPM answers after its device model was killed");

    // xl-vtpm destroy: the guest, then its vTPM process; the vTPM (state, identity) stays bound
    // to the guest, and the next create starts it again with the same arguments.
    let out = xl_vtpm(&s, &xl, &["destroy", "hvm1"]);
    assert!(out.status.success(), "xl-vtpm destroy: {}", String::from_utf8_lossy(&out.stderr));
    assert!(xvtpm_tests::wait_gone(pid, Duration::from_secs(10)), "the vTPM outlived xl-vtpm destroy");
    std::fs::remove_file(s.dir.path().join("xl-created.cfg")).unwrap();
    let out = xl_vtpm(&s, &xl, &["create", cfg.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "second xl-vtpm create: {}", String::from_utf8_lossy(&out.stderr));
    let row: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(row["vtpm_uuid"].as_str(), Some(uuid.as_str()), "the guest got another vTPM");
    assert_eq!(dm_args(&s), args);
    let v2 = Stack::handle(&s.xl_json(&["vtpm", "show", &uuid]));
    assert_ne!(v2.pid, Some(pid));
    assert_eq!(rc(&v2.command(&get_random)), 0);

    // The guest's device model now runs as root: its vTPM serves another uid, which is refused
    // (naming both) before the guest is made, and the vTPM is left as it was.
    assert!(xl_vtpm(&s, &xl, &["destroy", "hvm1"]).status.success());
    std::fs::remove_file(s.dir.path().join("xl-created.cfg")).unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap().replace("device_model_user = \"nobody\"\n", "");
    std::fs::write(&cfg, text).unwrap();
    let out = xl_vtpm(&s, &xl, &["create", cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("uid 65534") && err.contains("root only"), "{err}");
    assert!(!s.dir.path().join("xl-created.cfg").exists(), "xl create ran");
    assert_eq!(s.xl_json(&["vtpm", "show", &uuid])["state"], "stopped");
}

/// `model=crb`: QEMU's tpm-crb on the vTPM, and the ACPI tables that describe it to the guest
/// handed to libxl in `acpi_firmware` (hvmloader has none for CRB; the testbed's `hvm-crb`
/// phase proves a guest finds it through them).
#[test]
fn hvm_guest_gets_a_crb_tpm_and_its_acpi_tables() {
    let (s, xl) = stack_for_device_model();
    let cfg = write(
        s.dir.path(),
        "hvm2.cfg",
        "name = \"hvm2\"\ntype = \"hvm\"\nmemory = 256\ndevice_model_user = \"nobody\"\nvtpm = [ \"model=crb\" ]\n",
        0o644,
    );
    let out = xl_vtpm(&s, &xl, &["create", cfg.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "xl-vtpm create: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let row: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let v = Stack::handle(&s.xl_json(&["vtpm", "show", row["vtpm_uuid"].as_str().unwrap()]));
    let args = dm_args(&s);
    assert_eq!(args.last().map(String::as_str), Some("tpm-crb,tpmdev=xvtpm-tpm"), "{args:?}");
    let text = std::fs::read_to_string(s.dir.path().join("xl-created.cfg")).unwrap();
    let created = XlConfig::parse(&text).unwrap();
    let acpi = PathBuf::from(created.get_str("acpi_firmware").unwrap_or_else(|| panic!("no acpi_firmware:\n{text}")));
    assert_eq!(acpi, s.run_dir().join("guests/hvm2.acpi"));
    let meta = std::fs::metadata(&acpi).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600), "root's, as the config beside it");
    assert_eq!(std::fs::read(&acpi).unwrap(), xl_tools::hvm_acpi::crb_tables());

    // A real QEMU with those arguments has the CRB TPM on our vTPM and power-cycles it.
    let get_random = tpm_wire::tpm2_get_random(8);
    assert_eq!(rc(&v.command(&get_random)), 0);
    let (mut qemu, mut q, log) = start_device_model(&s, &args, 1);
    let tpms = q.execute("query-tpm");
    assert_eq!((tpms[0]["model"].as_str(), tpms[0]["options"]["type"].as_str()), (Some("tpm-crb"), Some("emulator")), "{tpms}");
    until_rc(&v, &get_random, tpm_wire::TPM2_RC_INITIALIZE, "the device model's CMD_INIT");
    assert_eq!(rc(&v.command(&tpm_wire::tpm2_startup(tpm_wire::TPM2_SU_CLEAR))), 0);
    q.execute("quit");
    let st = wait_exit(&mut qemu, Duration::from_secs(30));
    assert!(st.success(), "qemu exited with {st}:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    let qlog = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!qlog.contains("tpm-emulator"), "QEMU complained about the TPM:\n{qlog}");
}

#[test]
fn emulated_tpm_configs_are_refused_before_anything_is_made() {
    let s = Stack::start();
    let xl = fake_xl(&s);
    for (name, text, needle) in [
        ("pv.cfg", "name = \"g\"\ntype = \"pv\"\nvtpm = [ \"model=tis\" ]\n", "type = \"pv\""),
        ("crb.cfg", "name = \"g\"\ntype = \"hvm\"\nacpi = 0\nvtpm = [ \"model=crb\" ]\n", "acpi = 0"),
        ("crb2.cfg", "name = \"g\"\ntype = \"hvm\"\nacpi_firmware = \"/nonexistent/tables.bin\"\nvtpm = [ \"model=crb\" ]\n", "/nonexistent/tables.bin"),
        ("dom.cfg", "name = \"g\"\ntype = \"hvm\"\nvtpm = [ \"backend=vtpm-g,model=tis\" ]\n", "backend=vtpm-g"),
        ("user.cfg", "name = \"g\"\ntype = \"hvm\"\ndevice_model_user = \"no-such-qemu-user\"\nvtpm = [ \"model=tis\" ]\n", "no-such-qemu-user"),
        ("two.cfg", "name = \"g\"\ntype = \"hvm\"\ndevice_model_args_hvm = [ \"-tpmdev\", \"passthrough,id=t\" ]\nvtpm = [ \"model=tis\" ]\n", "already gives"),
    ] {
        let cfg = write(s.dir.path(), name, text, 0o644);
        let out = xl_vtpm(&s, &xl, &["create", cfg.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(needle), "{name}: error does not say {needle:?}: {err}");
    }
    // A good one under --dry-run says what it would do, and makes nothing either.
    let cfg = write(s.dir.path(), "ok.cfg", "name = \"g\"\ntype = \"hvm\"\nvtpm = [ \"model=tis\" ]\n", 0o644);
    let out = xl_vtpm(&s, &xl, &["create", "--dry-run", cfg.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "dry run: {}", String::from_utf8_lossy(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((plan["plan"]["emulated_tpm"].as_str(), plan["plan"]["vtpm_backend"].as_str()), (Some("tis"), Some("0")), "{plan}");
    let mgr = s.xl_json(&["mgr", "vtpm", "list"]);
    assert_eq!(mgr.as_array().unwrap().len(), 0, "a refused config or a dry run made a vTPM: {mgr}");
    let calls = std::fs::read_to_string(s.dir.path().join("xl-calls.log")).unwrap_or_default();
    assert!(!calls.contains("create"), "xl create ran for a refused config:\n{calls}");
}

/// `xl-vtpm migrate` of an HVM guest (its TPM moves in the device model's stream, docs/hvm.md;
/// the move itself runs in the testbed's `hvm-migrate` phase): a move that fails before the guest
/// moved says nothing changed, and checks that the guest's TPM still answers (it names a TPM left
/// off); a guest whose vTPM does not run is refused before anything moves, and its vTPM is not
/// started anew (the device model would not reconnect to it).
#[test]
fn an_hvm_guest_s_move_checks_its_tpm_and_never_restarts_a_gone_vtpm() {
    let (s, xl) = stack_for_device_model();
    let cfg = write(s.dir.path(), "hvmm.cfg", "name = \"hvmm\"\ntype = \"hvm\"\ndevice_model_user = \"nobody\"\nvtpm = [ \"model=crb\" ]\n", 0o644);
    let out = xl_vtpm(&s, &xl, &["create", cfg.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "xl-vtpm create: {}", String::from_utf8_lossy(&out.stderr));
    let row: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let uuid = row["vtpm_uuid"].as_str().unwrap().to_string();
    let v = Stack::handle(&s.xl_json(&["vtpm", "show", &uuid]));
    let data = v.socket.clone().unwrap();

    // xl migrate fails before the move; the TPM runs: nothing changed
    let out = xl_vtpm(&s, &xl, &["migrate", "hvmm", "localhost"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("failed before the guest moved") && err.contains("nothing changed") && !err.contains("does not answer"), "{err}");
    assert!(xl_tools::guestmig::tpm_answers(&data).is_ok());

    // the TPM left off (a device model's CMD_STOP): the same failure names it
    let ctrl = PathBuf::from(format!("{}.ctrl", data.display()));
    let mut c = std::os::unix::net::UnixStream::connect(&ctrl).unwrap();
    std::io::Write::write_all(&mut c, &[0, 0, 0, 0x0e]).unwrap();
    let mut r = [0u8; 4];
    std::io::Read::read_exact(&mut c, &mut r).unwrap();
    assert_eq!(r, [0; 4], "CMD_STOP");
    let e = xl_tools::guestmig::tpm_answers(&data).unwrap_err();
    assert!(e.contains("0x101"), "{e}");
    let out = xl_vtpm(&s, &xl, &["migrate", "hvmm", "localhost"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("its TPM does not answer") && err.contains("xl-vtpm reboot hvmm"), "{err}");
    drop(c);

    // the vTPM gone: refused before xl migrate runs, and not started again
    let calls = || std::fs::read_to_string(s.dir.path().join("xl-calls.log")).unwrap_or_default().lines().filter(|l| l.starts_with("xl migrate ")).count();
    let before = calls();
    assert_eq!(before, 2);
    assert!(s.xl_command(&["vtpm", "stop", &uuid]).output().unwrap().status.success());
    assert!(xvtpm_tests::wait_gone(v.pid.unwrap(), Duration::from_secs(10)));
    let out = xl_vtpm(&s, &xl, &["migrate", "hvmm", "localhost"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("does not run") && err.contains("nothing moved") && err.contains(&format!("xl-vtpm vtpm start {uuid}")), "{err}");
    assert_eq!(calls(), before, "xl migrate ran for a guest whose vTPM is gone");
    assert_eq!(s.xl_json(&["vtpm", "show", &uuid])["state"], "stopped", "the vTPM was started again");
}

/// A guest that reboots during a move (xl's on_reboot makes it anew as another domain; seen in
/// the testbed, Xen saying `Triple fault - invoking HVM shutdown action 1` for an HVM guest under
/// TCG): during `xl save` the move says so and that nothing moved, removes the partial save
/// (restoring it would make a second guest) and never runs `xl restore`; during `xl migrate` it
/// does not take the new, running domain for the moved one (it did, and reported a move); the
/// registry follows the reboot either way.
#[test]
fn a_guest_that_reboots_during_a_move_is_not_taken_for_moved() {
    let (s, _) = stack_for_device_model();
    let d = s.dir.path();
    // `xl save` writes part of the guest, then the guest is domain 8, not 7: it rebooted
    let xl = write(
        d,
        "xl",
        &format!(
            "#!/bin/sh\necho \"xl $*\" >> {d}/xl-calls.log\ncase \"$1\" in\n\
             create) echo 7 > {d}/domid;;\n\
             domid) [ -s {d}/domid ] && {{ cat {d}/domid; exit 0; }}; exit 1;;\n\
             save) head -c 4096 /dev/zero > \"$3\"; echo 8 > {d}/domid; echo 'libxl: error: guest did not suspend' >&2; exit 1;;\n\
             migrate) echo 8 > {d}/domid; echo 'migration sender: domain has shut down' >&2; exit 1;;\n\
             list) echo 'Name ID Mem VCPUs State Time(s)'; [ -s {d}/domid ] && echo \"hvmr $(cat {d}/domid) 256 1 -b---- 1.0\";;\n\
             esac\nexit 0\n",
            d = d.display()
        ),
        0o755,
    );
    let cfg = write(d, "hvmr.cfg", "name = \"hvmr\"\ntype = \"hvm\"\ndevice_model_user = \"nobody\"\nvtpm = [ \"model=crb\" ]\n", 0o644);
    let out = xl_vtpm(&s, &xl, &["create", cfg.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "xl-vtpm create: {}", String::from_utf8_lossy(&out.stderr));
    let row: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let uuid = row["vtpm_uuid"].as_str().unwrap().to_string();
    let save = s.state_dir().join("migrate-save").join(format!("{uuid}.xlsave"));

    let out = xl_vtpm(&s, &xl, &["migrate", "hvmr", "localhost", "--non-live"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("restarted during xl save") && err.contains("domain 7 ended") && err.contains("now domain 8") && err.contains("nothing moved"), "{err}");
    assert!(err.contains("the registry now names domain 8"), "{err}");
    assert!(!save.exists(), "the partial save of a guest that rebooted was kept: {}", save.display());
    let calls = std::fs::read_to_string(d.join("xl-calls.log")).unwrap_or_default();
    assert!(calls.contains("xl save hvmr") && !calls.contains("xl restore"), "{calls}");
    // and the vTPM still serves the guest that runs
    let v = Stack::handle(&s.xl_json(&["vtpm", "show", &uuid]));
    assert!(xl_tools::guestmig::tpm_answers(&v.socket.clone().unwrap()).is_ok());

    // live: xl migrate fails with the guest made anew (running, where `xl migrate -p` leaves
    // the domain it made paused): a reboot, not a move (the move took it for the moved guest)
    std::fs::write(d.join("domid"), "9\n").unwrap();
    let mut reg = xl_tools::registry::Registry::connect(&xl_tools::registry::Location::Sqlite(s.state_dir().join("registry.sqlite")), &xl_tools::registry::this_host()).unwrap();
    let id = reg.get_by_name("hvmr").unwrap().unwrap().id;
    reg.mark_running(id, 9, 0).unwrap();
    drop(reg);
    let out = xl_vtpm(&s, &xl, &["migrate", "hvmr", "localhost"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("restarted during the migration") && err.contains("domain 9 ended") && err.contains("now domain 8") && err.contains("nothing moved"), "{err}");
    assert!(!err.contains("does not answer") && !err.contains("xl unpause"), "taken for the moved guest: {err}");
    let reg = xl_tools::registry::Registry::connect(&xl_tools::registry::Location::Sqlite(s.state_dir().join("registry.sqlite")), &xl_tools::registry::this_host()).unwrap();
    assert_eq!(reg.get_by_name("hvmr").unwrap().unwrap().guest_domid, Some(8));
    assert!(xl_tools::guestmig::tpm_answers(&v.socket.unwrap()).is_ok());
}
