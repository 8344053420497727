//! The Debian package (`scripts/build-deb.sh`, `make deb`), built from the binaries under test:
//! its control fields and contents (`dpkg-deb -I/-c`), its installation into a scratch root
//! (`dpkg --root`, maintainer scripts run with `$DPKG_ROOT`), the installed binaries' man pages
//! and completions, and its systemd units (`systemd-analyze verify`, when systemd is installed).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::bin_path;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn the_package_carries_binaries_units_docs_and_config_and_installs_into_a_root() {
    let dir = tempfile::tempdir().unwrap();
    let bins = bin_path("vtpmmgr").parent().unwrap().to_path_buf();
    let deb = run(Command::new(repo().join("scripts/build-deb.sh"))
        .arg(&bins)
        .arg(dir.path().join("out"))
        .env("XVTPM_DEB_COMPRESSION", "none"));
    let deb = PathBuf::from(deb.trim());

    // Control: the name, and dependencies as dpkg-shlibdeps found them, each a real package
    // (installed here, where the same binaries run the other tests).
    let info = run(Command::new("dpkg-deb")
        .arg("-f")
        .arg(&deb)
        .args(["Package", "Depends"]));
    assert!(info.starts_with("Package: xvtpm\n"), "{info}");
    let depends = info
        .lines()
        .find_map(|l| l.strip_prefix("Depends: "))
        .unwrap();
    for want in [
        "libc6",
        "libtpms0",
        "libtss2-esys-3.0.2-0",
        "libtss2-tctildr0",
        "libtss2-tcti-device0",
    ] {
        assert!(
            depends
                .split(", ")
                .any(|d| d.split(' ').next() == Some(want)),
            "Depends lacks {want}: {depends}"
        );
    }
    for d in depends.split(", ") {
        let name = d.split(' ').next().unwrap();
        run(Command::new("dpkg-query").args(["-W", name]));
    }

    // Contents.
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let entry = |p: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(" .{p}")) || l.contains(&format!(" .{p} ")))
    };
    for (path, mode) in [
        ("/usr/bin/vtpmmgr", "-rwxr-xr-x"),
        ("/usr/bin/vtpm-domain", "-rwxr-xr-x"),
        ("/usr/bin/xl-vtpm", "-rwxr-xr-x"),
        ("/lib/systemd/system/xvtpm-mgr.service", "-rw-r--r--"),
        ("/lib/systemd/system/xvtpm-watch.service", "-rw-r--r--"),
        ("/etc/xvtpm/xvtpm.env", "-rw-r--r--"),
        ("/usr/share/man/man1/vtpmmgr.1.gz", "-rw-r--r--"),
        ("/usr/share/man/man1/vtpmmgr-serve.1.gz", "-rw-r--r--"),
        ("/usr/share/man/man1/vtpm-domain.1.gz", "-rw-r--r--"),
        ("/usr/share/man/man1/xl-vtpm.1.gz", "-rw-r--r--"),
        ("/usr/share/man/man1/xl-vtpm-vtpm-create.1.gz", "-rw-r--r--"),
        (
            "/usr/share/bash-completion/completions/xl-vtpm",
            "-rw-r--r--",
        ),
        ("/usr/share/zsh/vendor-completions/_vtpmmgr", "-rw-r--r--"),
        (
            "/usr/share/fish/vendor_completions.d/vtpm-domain.fish",
            "-rw-r--r--",
        ),
        ("/usr/share/doc/xvtpm/copyright", "-rw-r--r--"),
        ("/usr/bin/xvtpm-swtpm", "-rwxr-xr-x"),
        ("/usr/lib/xvtpm/libvirt/swtpm", "lrwxrwxrwx"),
        ("/usr/lib/xvtpm/libvirt/swtpm_setup", "lrwxrwxrwx"),
        ("/usr/lib/xvtpm/libvirt/swtpm_ioctl", "lrwxrwxrwx"),
        ("/usr/share/xvtpm/libvirt/libvirtd-xvtpm.conf", "-rw-r--r--"),
        ("/lib/systemd/system/xvtpm-libvirt-sweep.path", "-rw-r--r--"),
        ("/lib/systemd/system/xvtpm-libvirt-sweep.service", "-rw-r--r--"),
    ] {
        let line = entry(path).unwrap_or_else(|| panic!("{path} not in the package:\n{listing}"));
        assert!(
            line.starts_with(mode) && line.contains(" root/root "),
            "{line}"
        );
    }
    assert!(
        !listing.contains("./var/lib/xvtpm"),
        "state is made by postinst, not shipped:\n{listing}"
    );

    // Install into a scratch root; postinst makes the state directory root-only.
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("var/lib/dpkg/info")).unwrap();
    std::fs::create_dir_all(root.join("var/lib/dpkg/updates")).unwrap();
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--force-script-chrootless",
            "--force-depends",
            "--log=/dev/null",
            "-i",
        ])
        .arg(&deb));
    let status = run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["-s", "xvtpm"]));
    assert!(
        status.contains("Status: install ok installed") && status.contains("/etc/xvtpm/xvtpm.env"),
        "{status}"
    );
    let state = std::fs::metadata(root.join("var/lib/xvtpm")).unwrap();
    assert_eq!(state.permissions().mode() & 0o7777, 0o700);
    let version = run(Command::new(root.join("usr/bin/xl-vtpm")).arg("--version"));
    assert!(version.starts_with("xl-vtpm "), "{version}");
    let page =
        run(Command::new("zcat").arg(root.join("usr/share/man/man1/xl-vtpm-vtpm-create.1.gz")));
    assert!(
        page.contains("\\-\\-name") && page.contains("\\-\\-listen"),
        "{page}"
    );

    // The installed units, against the installed binaries.
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let units = dir.path().join("units");
        std::fs::create_dir_all(&units).unwrap();
        for u in ["xvtpm-mgr.service", "xvtpm-watch.service"] {
            let text = std::fs::read_to_string(root.join("lib/systemd/system").join(u)).unwrap();
            std::fs::write(
                units.join(u),
                text.replace("/usr/bin/", &format!("{}/usr/bin/", root.display())),
            )
            .unwrap();
        }
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(units.join("xvtpm-mgr.service"))
            .arg(units.join("xvtpm-watch.service"))
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "systemd-analyze verify: {said}"
        );
    } else {
        eprintln!("systemd-analyze not installed: units not verified");
    }
}

/// The units keep the properties the rest of the system relies on.
#[test]
fn the_units_keep_state_private_and_the_run_directory_across_restarts() {
    let mgr = std::fs::read_to_string(repo().join("dist/systemd/xvtpm-mgr.service")).unwrap();
    for line in [
        "Type=notify",
        "StateDirectoryMode=0700",
        // Running vTPMs, their sockets and records live there; the manager's restart must not remove them.
        "RuntimeDirectoryPreserve=yes",
        "RuntimeDirectoryMode=0755",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=CAP_CHOWN",
    ] {
        assert!(
            mgr.lines().any(|l| l == line),
            "xvtpm-mgr.service lacks {line}"
        );
    }
    let watch = std::fs::read_to_string(repo().join("dist/systemd/xvtpm-watch.service")).unwrap();
    for line in [
        "Requires=xvtpm-mgr.service",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "Restart=on-failure",
    ] {
        assert!(
            watch.lines().any(|l| l == line),
            "xvtpm-watch.service lacks {line}"
        );
    }
}
