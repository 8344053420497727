//! `xl-vtpm migrate` of a PV guest whose vTPM runs in its own domain (the move itself runs in the
//! testbed's `migrate-vtpmdom` phase): with that domain not running, the move is refused before
//! xl is asked to move anything, and the refusal names the stopped vTPM domain and the fix — not
//! a device model (an HVM guest's case), even when the domain bears the default name
//! `vtpm-GUEST` a dom0-process vTPM's pair also carries.

use std::path::{Path, PathBuf};

use uuid::Uuid;
use xl_tools::registry::{Location, NewPair, Registry};
use xvtpm_tests::Stack;

fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    p
}

#[test]
fn a_guest_whose_vtpm_domain_is_stopped_is_refused_before_anything_moves() {
    let s = Stack::start();
    let d = s.dir.path();
    // Guest g is domain 9; no domain vtpm-g runs; every other xl call is recorded.
    let xl = write(
        d,
        "xl",
        &format!(
            "#!/bin/sh\necho \"xl $*\" >> {d}/xl-calls.log\ncase \"$1\" in\n\
             domid) [ \"$2\" = g ] && {{ echo 9; exit 0; }}; exit 1;;\n\
             list) echo 'Name ID Mem VCPUs State Time(s) UUID';;\n\
             esac\nexit 0\n",
            d = d.display()
        ),
        0o755,
    );
    // An identity with its state, not running (as a stopped vTPM domain's).
    let vtpm = s.create_vtpm().uuid;
    let stop = s.xl_command(&["vtpm", "stop", &vtpm.to_string()]).output().unwrap();
    assert!(stop.status.success(), "{}", String::from_utf8_lossy(&stop.stderr));
    // The pair as `xl-vtpm create` of `vtpm = [ "backend=vtpm-g" ]` left it: running, the vTPM
    // domain vtpm-g as domain 8.
    let host = xl_tools::registry::this_host();
    let mut reg = Registry::connect(&Location::Sqlite(s.state_dir().join("registry.sqlite")), &host).unwrap();
    let id = reg
        .begin_create(&NewPair { guest_uuid: Uuid::new_v4(), guest_name: "g".into(), vtpm_uuid: vtpm, vtpm_domain: "vtpm-g".into(), group: None })
        .unwrap();
    reg.mark_running(id, 9, 8).unwrap();
    drop(reg);
    for extra in [&[][..], &["--non-live"][..]] {
        let mut args = vec!["migrate", "g", "localhost"];
        args.extend_from_slice(extra);
        let out = s.xl_command(&args).env("XVTPM_XL", &xl).env("XENSTORED_PATH", &xl).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(6), "{args:?}: {err}");
        assert!(err.contains("runs in its own domain \"vtpm-g\", which is not running") && err.contains(&format!("xl-vtpm vtpm start {vtpm}")), "{args:?}: {err}");
        assert!(!err.contains("device model"), "{args:?}: taken for an HVM guest: {err}");
    }
    let calls = std::fs::read_to_string(d.join("xl-calls.log")).unwrap_or_default();
    assert!(!calls.contains("migrate") && !calls.contains("save"), "xl was asked to move the guest:\n{calls}");
}
