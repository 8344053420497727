//! The testbed's package pins against a package index that moved on (ci/testbed/debs-resolve.sh,
//! which fetch.sh and guest/linux/build-module.sh run before downloading anything).
//!
//! Debian keeps one version per package and suite, so a pinned kernel version vanishes with every
//! security upload. Each test writes a small package index of its own (a flat `file:` repository),
//! points the real `apt-get`/`apt-cache` at it through `APT_CONFIG`, and runs the real script on
//! locks that name versions the index no longer has:
//! - drift re-resolves a consistent set (the whole kernel set to one ABI and version; the Xen
//!   packages to one version) with one NOTE line, and writes the locks as used;
//! - `XVTPM_TESTBED_STRICT=1` refuses drift;
//! - a published version whose SHA256 changed is a hard error (tampering, not drift);
//! - no drift leaves the locks as they are.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const OLD: &str = "6.1.192-2";
const NEW: &str = "6.1.192-3";
const XEN: &str = "4.17.7+13-g2445b30a44-0+deb12u1";
const LIBC: &str = "2.36-9+deb12u14";

fn sha(tag: &str) -> String {
    // a distinct, well-formed SHA256 per (package, version, tag); the index is never downloaded from
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(tag.as_bytes()))
}

struct Pkg {
    name: String,
    version: String,
    arch: &'static str,
    sha256: String,
}

fn pkg(name: &str, version: &str, arch: &'static str) -> Pkg {
    Pkg { name: name.into(), version: version.into(), arch, sha256: sha(&format!("{name} {version}")) }
}

fn lock_line(p: &Pkg) -> String {
    let file = format!("{}_{}_{}.deb", p.name, p.version.replace(':', "%3a"), p.arch);
    format!("{} {} {} {} {}\n", p.name, p.version, p.arch, p.sha256, file)
}

/// A private apt world: its own sources, lists, cache and (empty) dpkg status.
struct FakeApt {
    dir: tempfile::TempDir,
}

impl FakeApt {
    fn new(index: &[Pkg]) -> FakeApt {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["repo", "etc/sources.list.d", "etc/preferences.d", "lists/partial", "cache/archives/partial", "ci/testbed", "guest/linux"] {
            fs::create_dir_all(d.join(sub)).unwrap();
        }
        let mut packages = String::new();
        for p in index {
            write!(
                packages,
                "Package: {}\nVersion: {}\nArchitecture: {}\nMaintainer: test <t@example.invalid>\nFilename: pool/{}_{}_{}.deb\nSize: 1000\nSHA256: {}\nDescription: fake\n\n",
                p.name, p.version, p.arch, p.name, p.version, p.arch, p.sha256
            )
            .unwrap();
        }
        fs::write(d.join("repo/Packages"), packages).unwrap();
        fs::write(d.join("etc/sources.list"), format!("deb [trusted=yes] file:{} ./\n", d.join("repo").display())).unwrap();
        fs::write(d.join("status"), "").unwrap();
        let conf = format!(
            "Dir::Etc::sourcelist \"{d}/etc/sources.list\";\nDir::Etc::sourceparts \"{d}/etc/sources.list.d\";\n\
             Dir::Etc::preferencesparts \"{d}/etc/preferences.d\";\nDir::State::lists \"{d}/lists/\";\n\
             Dir::State::status \"{d}/status\";\nDir::Cache \"{d}/cache/\";\nAPT::Architecture \"amd64\";\n\
             APT::Architectures {{ \"amd64\"; }};\nAcquire::Languages \"none\";\nDebug::NoLocking \"true\";\n",
            d = d.display()
        );
        fs::write(d.join("etc/apt.conf"), conf).unwrap();
        let up = Command::new("apt-get")
            .args(["update", "-qq"])
            .env("APT_CONFIG", d.join("etc/apt.conf"))
            .output()
            .expect("apt-get must be installed (Debian's apt) to run the drift tests");
        assert!(up.status.success(), "apt-get update of the fake index failed: {}", String::from_utf8_lossy(&up.stderr));
        FakeApt { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Runs debs-resolve.sh on the two locks (testbed + guest module), as fetch.sh does.
    fn resolve(&self, testbed_lock: &[Pkg], guest_lock: &[Pkg], strict: bool) -> Output {
        let tb = self.path("ci/testbed/debs.lock");
        let gl = self.path("guest/linux/debs.lock");
        fs::write(&tb, testbed_lock.iter().map(lock_line).collect::<String>()).unwrap();
        fs::write(&gl, guest_lock.iter().map(lock_line).collect::<String>()).unwrap();
        let mut c = Command::new("bash");
        c.arg(script())
            .arg("--out")
            .arg(self.path("out"))
            .arg(&tb)
            .arg(&gl)
            .env("APT_CONFIG", self.path("etc/apt.conf"))
            .env("XVTPM_NO_APT_UPDATE", "1")
            .env_remove("XVTPM_TESTBED_STRICT");
        if strict {
            c.env("XVTPM_TESTBED_STRICT", "1");
        }
        c.output().unwrap()
    }

    fn used(&self, name: &str) -> Vec<String> {
        fs::read_to_string(self.path("out").join(name))
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(str::to_owned)
            .collect()
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ci/testbed/debs-resolve.sh")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn kernel_set(abi: u32, v: &str) -> Vec<Pkg> {
    vec![
        pkg(&format!("linux-image-6.1.0-{abi}-amd64-unsigned"), v, "amd64"),
        pkg(&format!("linux-headers-6.1.0-{abi}-amd64"), v, "amd64"),
        pkg(&format!("linux-headers-6.1.0-{abi}-common"), v, "all"),
        pkg("linux-kbuild-6.1", v, "amd64"),
        pkg("linux-source-6.1", v, "all"),
    ]
}

fn testbed_lock(kabi: u32, kv: &str, xen: &str) -> Vec<Pkg> {
    vec![
        pkg("xen-hypervisor-4.17-amd64", xen, "amd64"),
        pkg("libxenstore4", xen, "amd64"),
        pkg("libc6", LIBC, "amd64"),
        pkg(&format!("linux-image-6.1.0-{kabi}-amd64-unsigned"), kv, "amd64"),
    ]
}

fn guest_lock(kabi: u32, kv: &str) -> Vec<Pkg> {
    kernel_set(kabi, kv).into_iter().skip(1).collect()
}

fn lines(ps: &[Pkg]) -> Vec<String> {
    ps.iter().map(|p| lock_line(p).trim_end().to_owned()).collect()
}

/// The archive as it was on the day of the issue: the -56 image is still there, but kbuild and
/// source exist only at the -57 version.
fn moved_archive() -> Vec<Pkg> {
    let mut idx = vec![
        pkg("xen-hypervisor-4.17-amd64", XEN, "amd64"),
        pkg("libxenstore4", XEN, "amd64"),
        pkg("libc6", LIBC, "amd64"),
        pkg("linux-image-6.1.0-56-amd64-unsigned", OLD, "amd64"),
        pkg("linux-headers-6.1.0-56-amd64", OLD, "amd64"),
        pkg("linux-headers-6.1.0-56-common", OLD, "all"),
    ];
    idx.extend(kernel_set(57, NEW));
    idx
}

#[test]
fn a_vanished_kernel_pin_moves_the_whole_kernel_set_to_one_published_version() {
    let apt = FakeApt::new(&moved_archive());
    let o = apt.resolve(&testbed_lock(56, OLD, XEN), &guest_lock(56, OLD), false);
    let out = text(&o);
    assert!(o.status.success(), "drift must not fail the run: {out}");
    let notes: Vec<&str> = out.lines().filter(|l| l.contains("NOTE")).collect();
    assert_eq!(notes.len(), 1, "exactly one clear line says what moved: {out}");
    assert!(notes[0].contains("6.1.0-57") && notes[0].contains(NEW) && notes[0].contains(OLD), "{}", notes[0]);

    // the image moved with kbuild/source/headers; everything else stays as pinned
    assert_eq!(apt.used("testbed-debs.lock.used"), lines(&testbed_lock(57, NEW, XEN)));
    assert_eq!(apt.used("linux-debs.lock.used"), lines(&guest_lock(57, NEW)));
    // the repository's locks are never rewritten by a run
    let repo = fs::read_to_string(apt.path("ci/testbed/debs.lock")).unwrap();
    assert!(repo.contains("linux-image-6.1.0-56-amd64-unsigned 6.1.192-2"), "{repo}");
}

#[test]
fn strict_mode_refuses_drift() {
    let apt = FakeApt::new(&moved_archive());
    let o = apt.resolve(&testbed_lock(56, OLD, XEN), &guest_lock(56, OLD), true);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("XVTPM_TESTBED_STRICT=1") && out.contains("--update-lock"), "names the switch and the fix: {out}");
    assert!(!apt.path("out/testbed-debs.lock.used").exists(), "nothing is written when drift is refused");
}

#[test]
fn a_changed_sha256_of_a_still_published_version_is_a_hard_error() {
    let mut idx = moved_archive();
    let libc = idx.iter_mut().find(|p| p.name == "libc6").unwrap();
    libc.sha256 = sha("libc6 re-uploaded with other bytes");
    let apt = FakeApt::new(&idx);
    let o = apt.resolve(&testbed_lock(57, NEW, XEN), &guest_lock(57, NEW), false);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("libc6") && out.contains("SHA256 changed") && out.contains("not drift"), "{out}");
}

#[test]
fn vanished_xen_packages_move_together_to_one_version() {
    let new_xen = "4.17.7+20-gfeedface-0+deb12u2";
    let mut idx = vec![
        pkg("xen-hypervisor-4.17-amd64", new_xen, "amd64"),
        pkg("libxenstore4", new_xen, "amd64"),
        pkg("libc6", LIBC, "amd64"),
    ];
    idx.extend(kernel_set(57, NEW));
    let apt = FakeApt::new(&idx);
    let o = apt.resolve(&testbed_lock(57, NEW, XEN), &guest_lock(57, NEW), false);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(apt.used("testbed-debs.lock.used"), lines(&testbed_lock(57, NEW, new_xen)));
    assert_eq!(apt.used("linux-debs.lock.used"), lines(&guest_lock(57, NEW)));
}

#[test]
fn no_consistent_kernel_set_is_an_error_naming_the_gap() {
    // kbuild moved on, but no image of its version was published
    let mut idx: Vec<Pkg> = moved_archive().into_iter().filter(|p| !p.name.contains("-57-")).collect();
    idx.retain(|p| p.name != "linux-source-6.1" || p.version == NEW);
    let apt = FakeApt::new(&idx);
    let o = apt.resolve(&testbed_lock(56, OLD, XEN), &guest_lock(56, OLD), false);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("no 6.1 kernel ABI has its image, headers, kbuild and source at one version"), "{out}");
}

#[test]
fn without_drift_the_locks_are_used_as_pinned() {
    let apt = FakeApt::new(&moved_archive());
    let o = apt.resolve(&testbed_lock(57, NEW, XEN), &guest_lock(57, NEW), false);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(!out.contains("NOTE"), "no drift, no note: {out}");
    assert_eq!(apt.used("testbed-debs.lock.used"), lines(&testbed_lock(57, NEW, XEN)));
    assert_eq!(apt.used("linux-debs.lock.used"), lines(&guest_lock(57, NEW)));
}
